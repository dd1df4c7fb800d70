"""The engines bench_generate times, each in a process of its own.

    python -m benchmarks.engines '{"engine": "tegaki", "folder": "/abs/path", "precision": "fp32", "threads": 2}'

Engines bring their own kernel libraries and thread pools (PyTorch's OpenMP and MKL, CTranslate2's
OpenMP and oneDNN, llama.cpp's ggml threads), and two of them in one process disturb each other:
ctranslate2 loaded beside PyTorch slowed tegaki's fp32 decoding by a quarter for the rest of the run
(30 instead of 40 tokens/s, measured 2026-11-29). So the benchmark starts one worker per engine
(this module, given the engine's spec), keeps it for every round, and feeds it jobs over a pipe.
At the top this module imports the standard library and benchmarks.common (standard library only):
a worker loads its own engine alone. A worker runs in the repository root, so a spec names its
folders by absolute paths.

The protocol, one JSON line each way:

    worker -> benchmark, once its model is loaded:  {"ready": "what it loaded, in words"}
    benchmark -> worker, a job:                      {"ids": [[prompt ids], ...], "new": n}
    worker -> benchmark, the job done:               {"tokens": [[n new ids], ...], "seconds": s}

The worker times the call itself, so the pipe is not in the figure. Every engine is given token ids
(no tokenizer on the way), decodes greedily and makes exactly `new` tokens a row (an end-of-text id
does not stop it: random weights may well pick one). A worker ends when its stdin closes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, module_command

PRECISIONS = ("fp32", "bf16", "int8")


# --- the benchmark's end of the pipe -------------------------------------------------------------


class Worker:
    """One engine in a process of its own, started once and kept for every call. Calling it runs one
    job there: (prompt ids (B, T) as lists, new tokens) -> (the new tokens of each row, seconds)."""

    def __init__(self, spec: dict):
        self.spec = spec
        # stderr is the benchmark's own: a worker's warnings and errors show where the run shows.
        command = module_command("engines", json.dumps(spec))
        self.process = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.about: str | None = None

    def ready(self) -> str:
        """Wait until the worker has loaded its model; what it loaded, in words."""
        if self.about is None:
            self.about = self._reply()["ready"]
        return self.about

    def __call__(self, ids: list[list[int]], new: int) -> tuple[list[list[int]], float]:
        self.ready()
        try:
            self.process.stdin.write(json.dumps({"ids": ids, "new": new}) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            self._stopped()
        reply = self._reply()
        return reply["tokens"], reply["seconds"]

    def _reply(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self._stopped()
        return json.loads(line)

    def _stopped(self):
        code = self.process.wait()
        raise RuntimeError(
            f"the {self.spec['engine']} worker ({json.dumps(self.spec)}) stopped with exit status {code}; "
            "its error is printed above"
        )

    def close(self) -> None:
        """End the worker: its stdin closes, it returns from its loop."""
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()


# --- the worker's end ----------------------------------------------------------------------------


def serve(spec: dict) -> None:
    """Load the engine the spec names, say so, then answer jobs until stdin closes."""
    # The protocol keeps stdout's file for itself; anything an engine prints goes to stderr instead.
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    run, about = LOADERS[spec["engine"]](spec)
    print(json.dumps({"ready": about}), file=protocol)
    for line in sys.stdin:
        job = json.loads(line)
        t = time.perf_counter()
        tokens = run(job["ids"], job["new"])
        seconds = time.perf_counter() - t
        print(json.dumps({"tokens": tokens, "seconds": seconds}), file=protocol)


def engine_available(module: str) -> bool:
    """Whether `import module` would work, without importing it here: in the benchmark's process
    an engine's libraries would disturb PyTorch's (see the module's docstring)."""
    if module in sys.modules:
        return sys.modules[module] is not None  # None: a test made the import fail
    return importlib.util.find_spec(module) is not None


# --- transformers --------------------------------------------------------------------------------


def transformers_generator(model):
    """transformers' own `generate`, greedy, exactly `new` tokens (min_new_tokens holds the end-of-text
    id back)."""
    import torch

    def run(ids: list[list[int]], new: int) -> list[list[int]]:
        prompt = torch.tensor(ids)
        with torch.inference_mode():
            out = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
            )
        return out[:, prompt.shape[1] :].tolist()

    return run


def load_transformers(spec: dict):
    import torch
    import transformers

    torch.set_num_threads(spec["threads"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["precision"]]
    model = transformers.AutoModelForCausalLM.from_pretrained(spec["folder"]).to(dtype).eval()
    about = f"transformers {transformers.__version__}, {type(model).__name__} in {dtype}"
    return transformers_generator(model), about


# --- tegaki --------------------------------------------------------------------------------------
#
# tegaki's decoding API is the one the benchmark follows most closely: when it changes, the three
# functions below are what move.


def tegaki_variant(base, precision: str):
    """A copy of `base` as tegaki runs it in `precision` (fp32, bf16, int8, or int4 for the quality
    lines): the one place the benchmark's tegaki models are made. int8 is llama.cpp's q8_0 blocks
    (groups of 32, int8 activations in a decode step); int4's kernel takes bf16 activations faster,
    so that model is cast (as `--dtype bf16 --quantize int4`)."""
    import torch

    from tegaki.model import GPT
    from tegaki.quant import quantize_model

    model = GPT(base.config).eval()
    model.load_state_dict(base.state_dict())
    if precision in ("int8", "int4"):
        quantize_model(model, precision)
    if precision in ("bf16", "int4"):
        model = model.to(torch.bfloat16)
    return model


def prepare_tegaki(model, path: str | None):
    """The model with its linear layers swapped for good by tegaki's speed layer: `path=None` is the
    layer's own choice (what `tegaki generate` runs), "plain" keeps F.linear's products."""
    from tegaki.decoding import prepare_for_decoding

    return prepare_for_decoding(model, path=path)


def tegaki_generate(model, ids, new: int, compile: bool = False):
    """Greedy tokens from a model made by prepare_tegaki, which decodes through the layers it holds."""
    from tegaki.generate import generate

    return generate(model, ids, new, temperature=0, compile=compile)


def tegaki_generator(model, compile: bool):
    import torch

    def run(ids: list[list[int]], new: int) -> list[list[int]]:
        prompt = torch.tensor(ids)
        return tegaki_generate(model, prompt, new, compile=compile)[:, prompt.shape[1] :].tolist()

    return run


def decode_layers(model) -> list:
    """The layers a decode step multiplies by, in order: per block the joint q/k/v projection, the
    attention's output, the MLP's two; then the LM head."""
    layers = []
    for block in model.blocks:
        layers += [block.attn.qkv, block.attn.o_proj, block.mlp.fc, block.mlp.proj]
    return layers + [model.lm_head]


def linear_weights(model) -> list:
    """The weights a decode step multiplies by, with q/k/v as one (3C, C) matrix as in GPT-2."""
    return [layer.weight for layer in decode_layers(model)]


def layer_summary(model) -> str:
    """Which products a decode step runs, for the report: per weight shape, the speed layer's path
    (its measured choice, or the one forced), or the layer's class where it has none (int8)."""
    paths = {}
    for layer in decode_layers(model):
        shape = "x".join(str(n) for n in (layer.out_features, layer.in_features))
        paths.setdefault(shape, getattr(layer, "path", type(layer).__name__))
    return "linear layers (out x in): " + ", ".join(f"{shape} {path}" for shape, path in paths.items())


def load_tegaki(spec: dict):
    import torch

    from tegaki.load import from_pretrained

    torch.set_num_threads(spec["threads"])
    model = tegaki_variant(from_pretrained(spec["folder"]), spec["precision"])
    model = prepare_tegaki(model, spec.get("path"))
    compiled = ", compiled decode step" if spec.get("compile") else ""
    about = f"tegaki, {spec['precision']}, {layer_summary(model)}{compiled}"
    return tegaki_generator(model, spec.get("compile", False)), about


# --- CTranslate2 ---------------------------------------------------------------------------------


def ct2_name(token_id: int) -> str:
    """The converter reads the vocabulary from a tokenizer; these random weights have none, and
    CTranslate2 only needs one name per id, so the names are the ids themselves: "<0>", "<1>", ..."""
    return f"<{token_id}>"


def ct2_convert(hf_folder: str, out_folder: str, vocab_size: int) -> None:
    """CTranslate2's own converter on the transformers folder, float32 (int8 is quantized when loaded):
    `python -m benchmarks.engines --ct2-convert HF_FOLDER OUT_FOLDER VOCAB_SIZE`, in a process of its own."""
    from ctranslate2.converters import TransformersConverter

    names = [ct2_name(i) for i in range(vocab_size)]

    class IdNames:
        bos_token = eos_token = unk_token = names[-1]

        def get_vocab(self):
            return {name: i for i, name in enumerate(names)}

    class Converter(TransformersConverter):
        def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
            return IdNames()

    Converter(hf_folder).convert(out_folder, force=True)


def load_ctranslate2(spec: dict):
    import ctranslate2

    generator = ctranslate2.Generator(
        spec["folder"], device="cpu", compute_type=spec["compute_type"], intra_threads=spec["threads"], inter_threads=1
    )

    def run(ids: list[list[int]], new: int) -> list[list[int]]:
        results = generator.generate_batch(
            [[ct2_name(i) for i in row] for row in ids],
            max_length=new,  # new tokens only, since the prompt is not in the result
            sampling_topk=1,  # greedy
            include_prompt_in_result=False,  # the prompt goes through in one forward, as a prefill
            end_token=[],  # never stop early
        )
        return [r.sequences_ids[0] for r in results]

    # "int8" is int8_float32 on a CPU: the report names what ran.
    return run, f"CTranslate2 {ctranslate2.__version__}, compute type {generator.compute_type}"


# --- llama.cpp -----------------------------------------------------------------------------------
#
# llama.cpp reads GGUF files, made by its own converter (convert_hf_to_gguf.py, beside the C++ in
# llama.cpp's source) from the same transformers folder the other engines load. llama-cpp-python
# ships the C++ built but not the converter, so the converter is taken from llama.cpp's source: a
# folder or a source distribution the user names, else the source distribution of the installed
# llama-cpp-python (its vendor/llama.cpp, the llama.cpp it was built from), downloaded once.

CONVERTER = "convert_hf_to_gguf.py"


def cache_folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tegaki" / "llama.cpp"


def find_converter(folder: Path) -> Path | None:
    """The llama.cpp folder inside `folder`: llama.cpp's own checkout, or a llama-cpp-python source."""
    for candidate in (folder, folder / "vendor" / "llama.cpp"):
        if (candidate / CONVERTER).is_file() and (candidate / "gguf-py" / "gguf").is_dir():
            return candidate
    return None


def unpack_converter(sdist: Path, into: Path) -> Path:
    """The converter's Python files (convert_hf_to_gguf.py, the package it imports and its own
    gguf-py) out of a llama-cpp-python source distribution, into `into`/<the sdist's name>."""
    out = into / sdist.name.removesuffix(".tar.gz")
    if find_converter(out):
        return out
    with tarfile.open(sdist) as tar:
        members = []
        for member in tar.getmembers():
            _, _, inside = member.name.partition("/vendor/llama.cpp/")
            if inside and member.isfile() and inside.endswith(".py") and not inside.startswith((".", "tests/")):
                member.name = inside  # llama.cpp's own layout, converter at the top
                members.append(member)
        if not any(m.name == CONVERTER for m in members):
            raise SystemExit(f"{sdist} holds no vendor/llama.cpp/{CONVERTER}: is it llama-cpp-python's source?")
        into.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=into)  # renamed into place whole, or not at all
        try:
            tar.extractall(tmp, members=members, filter="data")
            shutil.rmtree(out, ignore_errors=True)  # what an interrupted run left
            os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def llama_cpp_converter(source: str | None) -> Path:
    """The llama.cpp folder whose converter makes the GGUF files: `source` (a llama.cpp folder, or a
    llama-cpp-python source distribution, unpacked or .tar.gz), else the installed llama-cpp-python's
    own source, downloaded once with pip into the cache folder."""
    from importlib.metadata import version

    cache = cache_folder()
    if source is not None:
        path = Path(source).expanduser()
        if path.is_file() and path.name.endswith(".tar.gz"):
            return unpack_converter(path, cache)
        found = find_converter(path) if path.is_dir() else None
        if found is None:
            raise SystemExit(
                f"--llama-cpp-source {source}: expected llama.cpp's source folder (with {CONVERTER} and "
                "gguf-py/), or llama-cpp-python's source distribution (.tar.gz or unpacked)"
            )
        return found
    wanted = version("llama-cpp-python")
    unpacked = find_converter(cache / f"llama_cpp_python-{wanted}")
    if unpacked is not None:
        return unpacked
    sdist = cache / f"llama_cpp_python-{wanted}.tar.gz"
    if not sdist.exists():
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        command += [f"llama-cpp-python=={wanted}", "--dest", str(cache)]
        print(
            f"llama.cpp's converter is not part of llama-cpp-python's install: downloading its source "
            f"(llama-cpp-python {wanted}) into {cache} once; --llama-cpp-source names a copy you have",
            file=sys.stderr,
        )
        subprocess.run(command, check=True, stdout=sys.stderr)
    return unpack_converter(sdist, cache)


def make_gguf(converter: Path, hf_folder: str, out: Path, outtype: str) -> Path:
    """llama.cpp's converter on the transformers folder, in a process of its own with its own gguf-py
    first on the path (PyPI's gguf may be older or newer than the converter)."""
    path = out / f"model-{outtype}.gguf"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(converter / "gguf-py"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, str(converter / CONVERTER), hf_folder, "--outfile", str(path), "--outtype", outtype]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stdout + done.stderr, file=sys.stderr)
        raise SystemExit(f"llama.cpp's converter failed on {hf_folder} ({outtype}): `{' '.join(command)}`")
    return path


def load_llama_cpp(spec: dict):
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(
        model_path=spec["gguf"],
        n_ctx=spec["n_ctx"],
        n_batch=spec["n_ctx"],  # a whole prompt in one forward, as the other engines' prefill
        n_threads=spec["threads"],
        n_threads_batch=spec["threads"],
        logits_all=False,
        verbose=False,
    )
    vocab = llm.n_vocab()

    def last_logits():
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))

    def run(ids: list[list[int]], new: int) -> list[list[int]]:
        rows = []
        for prompt in ids:  # llama-cpp-python's Llama holds one sequence: rows one after another
            llm.reset()
            llm.eval(prompt)  # the ids as they are: llama.cpp's tokenizer is never called
            row = [int(np.argmax(last_logits()))]
            while len(row) < new:
                llm.eval(row[-1:])
                row.append(int(np.argmax(last_logits())))
            rows.append(row)
        return rows

    return run, f"llama-cpp-python {llama_cpp.__version__}, {Path(spec['gguf']).name}"


LOADERS = {
    "transformers": load_transformers,
    "tegaki": load_tegaki,
    "ctranslate2": load_ctranslate2,
    "llama.cpp": load_llama_cpp,
}


if __name__ == "__main__":
    if sys.argv[1:2] == ["--ct2-convert"]:
        ct2_convert(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        serve(json.loads(sys.argv[1]))
