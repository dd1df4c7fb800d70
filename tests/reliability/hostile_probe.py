"""The hostile probe of issue 26, as a program: several hundred careless or hostile uses of every
surface (serve, generate, chat, eval, tokenizer, finetune, export, train, loading), each checked
for the three things that must never happen: a traceback, a hang, a person's file lost or changed.

    python tests/reliability/hostile_probe.py            # a few minutes on 2 cores
    python tests/reliability/hostile_probe.py --only serve

Commands run in this process through `tegaki.cli.main`, as the reliability tests run them; the
server is a real `tegaki serve` process on 127.0.0.1 (tests/serve_models.py), asked over real
sockets. A command case holds when it exits 0, 1 or 2 with no traceback on stderr, and every folder
that is not its own output (the person's) is byte for byte what it was (sha256 of each file); a
server case holds when the answer is not a 5xx, an error is OpenAI's JSON error object, and the
server still answers /health afterwards. A watchdog ends the whole probe, with every thread's
stack, if one case runs past --case-timeout seconds: that is a hang. Every case is written out
with its result; the last line counts them.

The cases are the kinds issue 26 listed, each tried with many values instead of one; the fixed
regressions live in tests/reliability/test_*.py.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import http.client
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parents[1])]

from finetune_models import write_records  # noqa: E402
from reliability_helpers import snapshot, train_args  # noqa: E402
from serve_models import server_process, write_model_folder  # noqa: E402

from tegaki import data  # noqa: E402
from tegaki.cli import main as tegaki_main  # noqa: E402

BAD_NUMBERS = ["0", "-1", "1e-300", "1e-308", "1e308", "nan", "inf", "-inf", "abc", "", "9" * 400]
BAD_JSON_VALUES = [None, -1, 0, 1e-300, 1e308, -1e308, "x", [], {}, True, 10**4000, [[[[1]]]]]


class Probe:
    def __init__(self, root: Path, case_timeout: float):
        self.root, self.case_timeout = root, case_timeout
        self.results: list[tuple[str, str, bool, str]] = []  # (surface, case, held, what was seen)
        self.kept: list[Path] = []  # a person's folders: never changed by any case

    def record(self, surface: str, case: str, held: bool, seen: str) -> None:
        self.results.append((surface, case, held, seen))
        print(f"{'held  ' if held else 'BROKEN'} {surface:9} {case[:110]}  [{seen[:140]}]", flush=True)

    def command(self, surface: str, args: list[str], stdin: str = "", case: str | None = None) -> None:
        """Run `tegaki ARGS` here; held: exit 0/1/2, no traceback, the person's folders unchanged."""
        before = [snapshot(f) for f in self.kept]
        err, out = io.StringIO(), io.StringIO()
        faulthandler.dump_traceback_later(self.case_timeout, exit=True)
        old_stdin = sys.stdin
        sys.stdin = io.StringIO(stdin)
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                try:
                    rc = tegaki_main(args)
                except SystemExit as e:
                    rc = e.code if isinstance(e.code, int) else 2
                except BaseException as e:  # noqa: BLE001 - what a person would see as a traceback
                    import traceback

                    err.write("Traceback (escaped the command)\n" + "".join(traceback.format_exception(e)))
                    rc = -1
        finally:
            faulthandler.cancel_dump_traceback_later()
            sys.stdin = old_stdin
        text = err.getvalue()
        unchanged = [snapshot(f) for f in self.kept] == before
        held = rc in (0, 1, 2) and "Traceback" not in text and unchanged
        last = (text.strip().splitlines() or [""])[-1]
        seen = f"rc {rc}; " + ("" if unchanged else "A PERSON'S FILE CHANGED; ") + last
        if "Traceback" in text:
            seen += " | " + text[-400:].replace("\n", " / ")
        self.record(surface, case or " ".join(args), held, seen)

    def request(self, port: int, method: str, path: str, body: bytes | None, headers: dict, case: str) -> None:
        """One HTTP request; held: no 5xx, errors are JSON error objects, /health answers after."""
        faulthandler.dump_traceback_later(self.case_timeout, exit=True)
        try:
            status, answer = http_call(port, method, path, body, headers)
            health, _ = http_call(port, "GET", "/health", None, {})
        except OSError as e:
            status, answer, health = 0, f"{type(e).__name__}: {e}".encode(), 0
        finally:
            faulthandler.cancel_dump_traceback_later()
        error_shape = True
        if status >= 400 and path.startswith("/v1"):
            try:
                error_shape = isinstance(json.loads(answer)["error"]["message"], str)
            except (ValueError, KeyError, TypeError):
                error_shape = False
        held = 0 < status < 500 and health == 200 and error_shape
        seen = f"{status}; health {health}; " + answer[:120].decode("utf-8", "replace").replace("\n", " ")
        self.record("serve", case, held, seen)


def http_call(port: int, method: str, path: str, body: bytes | None, headers: dict) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


# -------------------------------------------------------------------------------------------------
# What the cases use: a corpus, a trained run, a transformers folder, records, a fine-tune
# -------------------------------------------------------------------------------------------------


def make_fixtures(root: Path) -> dict[str, Path]:
    f = {"corpus": root / "plays.txt", "records": write_records(root / "records.jsonl")}
    f["corpus"].write_text(data.shakespeare_text()[:30_000])
    f["run"] = root / "run"
    assert tegaki_main(train_args(f["run"], f["corpus"], 2)) == 0
    f["hf"] = write_model_folder(root / "hf", train_steps=0)
    f["ft"] = root / "ft"
    finetune = ["finetune", "--model", str(f["hf"]), "--data", str(f["records"]), "--out", str(f["ft"])]
    finetune += ["--max-steps", "2", "--max-seq-len", "48", "--batch-size", "2", "--lora-targets", "all"]
    assert tegaki_main([*finetune, "--device", "cpu", "--dtype", "fp32", "--no-progress"]) == 0
    return f


def person(root: Path, name: str, files: dict[str, bytes]) -> Path:
    folder = root / "people" / name
    for rel, content in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(content)
    return folder


PEOPLES_FOLDERS = {
    "notes": {"notes.txt": b"mine"},
    "metrics-and-plot": {"metrics.jsonl": b'{"step": 1, "loss": 0.5}\n', "loss.png": b"\x89PNG mine"},
    "config-and-tokenizer": {"config.json": b'{"mine": true}', "tokenizer.json": b'{"mine": true}'},
    "adapter": {"adapter_config.json": b'{"peft_type": "LORA"}', "adapter_model.safetensors": b"mine"},
    "old-index": {"model.safetensors.index.json": b'{"weight_map": {}}'},
    "tokenizer-dir": {"tokenizer/tegaki_tokenizer.json": b"{}", "tokenizer/vocab.json": b"{}"},
    "data-dir": {"data/train_000000.bin": b"\0" * 64, "data/meta.json": b"{}"},
    "run-json-only": {"run.json": b'{"model_config": "mine"}'},
    "checkpoints": {"checkpoints/step_000002/state.json": b"{}"},
    "hidden": {".git/HEAD": b"ref: refs/heads/main\n"},
}


def people(root: Path, f: dict[str, Path], probe: Probe) -> dict[str, Path]:
    """A person's folders (their own files, and copies of tegaki's outputs they keep), all watched."""
    folders = {name: person(root, name, files) for name, files in PEOPLES_FOLDERS.items()}
    tok_and_data = root / "people" / "tokenizer-and-shards"
    shutil.copytree(f["run"] / "tokenizer", tok_and_data / "tokenizer")
    shutil.copytree(f["run"] / "data", tok_and_data / "data")
    folders["tokenizer-and-shards"] = tok_and_data
    for name in ("run", "ft", "hf"):  # someone's runs and exports, kept as they are
        shutil.copytree(f[name], root / "people" / f"a-{name}")
        folders[f"a-{name}"] = root / "people" / f"a-{name}"
    probe.kept = [*folders.values(), f["corpus"].parent / "kept"]
    return folders


# -------------------------------------------------------------------------------------------------
# The cases
# -------------------------------------------------------------------------------------------------


def generate_cases(probe: Probe, f: dict[str, Path]) -> None:
    base = ["generate", "--model", str(f["hf"]), "--max-new-tokens", "3", "--device", "cpu", "a"]
    flags = ["--temperature", "--top-k", "--top-p", "--min-p", "--repetition-penalty", "--presence-penalty"]
    flags += ["--max-new-tokens", "--num-samples", "--seed"]
    for flag in flags:
        for value in BAD_NUMBERS:
            if flag == "--num-samples" and len(value) > 20:
                continue  # 10**400 samples, printed one after another as asked (Ctrl-C stops them): no case
            probe.command("generate", [*base, flag, value], case=f"generate {flag} {value[:20]!r}")
    for stop in ["", "\\", "\\x", "\\n" * 100, "\0", "🙂"]:
        probe.command("generate", [*base, "--stop", stop], case=f"generate --stop {stop[:20]!r}")
    for prompt in [
        "",
        "\0",
        "x" * 5000,
        "<|endoftext|>" * 50,
        "\udcff",
    ]:
        probe.command("generate", [*base[:-1], prompt], case=f"generate --prompt {prompt[:20]!r}")


def chat_cases(probe: Probe, f: dict[str, Path]) -> None:
    base = ["chat", "--model", str(f["hf"]), "--max-tokens", "3", "--device", "cpu"]
    for flag in ["--temperature", "--top-p", "--top-k", "--max-tokens"]:
        for value in ["0", "-1", "1e-300", "nan", "abc"]:
            probe.command("chat", [*base, flag, value], stdin="hello\n/exit\n", case=f"chat {flag} {value}")
    for stdin in ["", "\n\n\n", "x" * 20_000 + "\n", "/reset\n/reset\n", "\0\n", "hello"]:
        probe.command("chat", base, stdin=stdin, case=f"chat, typed {stdin[:20]!r}")


def write_bad_files(root: Path) -> dict[str, Path]:
    folder = root / "bad"
    folder.mkdir()
    files = {
        "empty.jsonl": b"",
        "not-utf8.jsonl": b'{"instruction": "\xff\xfe", "output": "x"}\n',
        "nested.jsonl": b"[" * 100_000 + b"]" * 100_000 + b"\n",
        "not-json.jsonl": b"hello\n",
        "wrong-types.jsonl": b'{"instruction": 5, "output": ["x"]}\n',
        "list.jsonl": b"[1, 2, 3]\n",
        "huge-number.jsonl": b'{"instruction": "a", "output": "b", "x": ' + b"9" * 5000 + b"}\n",
        "label-true.jsonl": b'{"context": "a", "endings": ["b", "c"], "label": true}\n',
        "label-out.jsonl": b'{"context": "a", "endings": ["b", "c"], "label": 7}\n',
        "not-utf8.txt": b"\xff\xfe\xfd text",
        "empty.txt": b"",
        "not-utf8.jinja": b"{{ \xff }}",
        "bad.jinja": b"{% for %}",
        "not-utf8.toml": b'preset = "\xff"\n',
        "wrong-type.toml": b'max_steps = "many"\n',
        "not-toml.toml": b"[[[\n",
    }
    for name, content in files.items():
        (folder / name).write_bytes(content)
    (folder / "a-folder.jsonl").mkdir()
    return {name: folder / name for name in [*files, "a-folder.jsonl"]}


def eval_cases(probe: Probe, f: dict[str, Path], bad: dict[str, Path]) -> None:
    base = ["eval", "--model", str(f["hf"])]
    for flag in ["--window", "--stride", "--max-seq-len"]:
        for value in ["0", "-5", "1", "abc", "1e308", "9" * 30]:
            extra = ["--records", str(f["records"])] if flag == "--max-seq-len" else ["--text", str(f["corpus"])]
            probe.command("eval", [*base, *extra, flag, value], case=f"eval {flag} {value[:20]}")
    for name, path in bad.items():
        kind = "--text" if name.endswith(".txt") else "--tasks" if name.startswith("label") else "--records"
        probe.command("eval", [*base, kind, str(path)], case=f"eval {kind} {name}")
    probe.command("eval", [*base, "--records", str(f["records"]), "--chat-template", str(bad["not-utf8.jinja"])])
    probe.command("eval", [*base, "--adapter", str(bad["empty.txt"]), "--text", str(f["corpus"])])


def tokenizer_cases(probe: Probe, f: dict[str, Path], bad: dict[str, Path], out: Path) -> None:
    for backend in ["readable", "tokenizers"]:
        for vocab in ["0", "1", "255", "256", "-1", "1000000000", "abc"]:
            args = ["tokenizer", "train", "--input", str(f["corpus"]), "--vocab-size", vocab, "--backend", backend]
            probe.command("tokenizer", [*args, "--out", str(out / f"tok-{backend}-{vocab}")])
        for name in ["empty.txt", "not-utf8.txt", "a-folder.jsonl"]:
            args = ["tokenizer", "train", "--input", str(bad[name]), "--vocab-size", "300", "--backend", backend]
            probe.command("tokenizer", [*args, "--out", str(out / f"tok-{backend}-{name}")])
    tok = str(f["run"] / "tokenizer")
    for name in ["empty.txt", "not-utf8.txt", "a-folder.jsonl", "nested.jsonl"]:
        probe.command("tokenizer", ["tokenizer", "stats", "--tokenizer", tok, "--input", str(bad[name])])
    for text in ["", "\0", "\udcff", "x" * 100_000]:
        probe.command("tokenizer", ["tokenizer", "show", text, "--tokenizer", tok], case=f"tokenizer show {text[:9]!r}")
    for name in ["empty.txt", "not-utf8.txt", "nested.jsonl"]:
        probe.command("tokenizer", ["tokenizer", "show", "x", "--tokenizer", str(bad[name])])


def folder_cases(probe: Probe, f: dict[str, Path], bad: dict[str, Path], folders: dict[str, Path]) -> None:
    """train, finetune and export into every folder of a person's, and into each other's outputs."""
    finetune = ["--max-steps", "2", "--max-seq-len", "48", "--batch-size", "2", "--no-progress", "--device", "cpu"]
    for name, folder in folders.items():  # each command's own output (a-run for train...) is left out: it is theirs
        for fresh in ([], ["--fresh"]) if name != "a-run" else ():
            args = train_args(folder, f["corpus"], 2, *fresh)
            probe.command("train", args, case=f"train --out {name} {' '.join(fresh)}")
        if name != "a-ft":
            args = ["finetune", "--model", str(f["hf"]), "--data", str(f["records"]), "--out", str(folder), *finetune]
            probe.command("finetune", args, case=f"finetune --out {name}")
        if name != "a-hf":
            probe.command("export", ["export", str(f["ft"]), str(folder)], case=f"export into {name}")
        probe.command("export", ["export", "--peft", str(f["ft"]), str(folder)], case=f"export --peft into {name}")
    probe.command("export", ["export", str(f["run"]), str(bad["empty.txt"])], case="export into a file")


def input_cases(probe: Probe, f: dict[str, Path], bad: dict[str, Path], out: Path) -> None:
    finetune = ["--max-steps", "1", "--max-seq-len", "48", "--batch-size", "2", "--no-progress", "--device", "cpu"]
    for name, path in bad.items():
        args = ["finetune", "--model", str(f["hf"]), "--data", str(path), "--out", str(out / f"ft-{name}")]
        probe.command("finetune", [*args, *finetune], case=f"finetune --data {name}")
    for flag, value in [
        ("--max-steps", "0"),
        ("--max-steps", "-1"),
        ("--lr", "nan"),
        ("--lr", "-1"),
        ("--lora-r", "0"),
        ("--lora-r", "-3"),
        ("--max-seq-len", "0"),
        ("--batch-size", "0"),
        ("--lora-targets", "nothing"),
        ("--chat-template", str(bad["not-utf8.jinja"])),
        ("--chat-template", str(bad["bad.jinja"])),
        ("--chat-template", "nonexistent.jinja"),
    ]:
        args = ["finetune", "--model", str(f["hf"]), "--data", str(f["records"]), "--out", str(out / "ft-flags")]
        probe.command("finetune", [*args, *finetune, flag, value], case=f"finetune {flag} {value[-30:]}")
    for name in ["not-utf8.toml", "wrong-type.toml", "not-toml.toml"]:
        args = [*train_args(out / f"train-{name}", f["corpus"], 2), "--config", str(bad[name])]
        probe.command("train", args, case=f"train --config {name}")
    for setting in ["n_layer=0", "n_embd=-1", "n_head=3", "block_size=abc", "nonsense=1", "vocab_size=1"]:
        args = [*train_args(out / "train-set", f["corpus"], 2), "--set", setting]
        probe.command("train", args, case=f"train --set {setting}")
    for data_path in [bad["empty.txt"], bad["not-utf8.txt"], bad["a-folder.jsonl"], out / "missing.txt"]:
        probe.command("train", train_args(out / "train-data", data_path, 2), case=f"train --data {data_path.name}")


def damaged_runs(f: dict[str, Path], out: Path) -> dict[str, Path]:
    """Copies of the run and of the fine-tune, each damaged one way."""
    from safetensors.torch import load_file, save_file

    def run_copy(name: str, source: str = "run") -> Path:
        shutil.copytree(f[source], out / name)
        return out / name

    runs = {}
    weights = lambda run: sorted(run.glob("checkpoints/step_*/model.safetensors"))[-1]  # noqa: E731
    path = weights(run := run_copy("truncated"))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    runs["truncated weights"] = run
    path = weights(run := run_copy("zeroed"))
    path.write_bytes(b"\0" * path.stat().st_size)
    runs["zeroed weights"] = run
    path = weights(run := run_copy("forged"))
    path.write_bytes(b"\xff\xff\xff\xff\xff\xff\xff\x7f" + path.read_bytes()[8:])
    runs["forged header"] = run
    path = weights(run := run_copy("renamed"))
    tensors = load_file(path)
    save_file({k + ".x": v for k, v in tensors.items()}, str(path))
    runs["renamed tensors"] = run
    (run := run_copy("run-json-garbage")).joinpath("run.json").write_bytes(b"\xff{")
    runs["run.json garbage"] = run
    (run := run_copy("run-json-types")).joinpath("run.json").write_text('{"model_config": [1, 2]}')
    runs["run.json wrong types"] = run
    shutil.rmtree((run := run_copy("no-tokenizer")) / "tokenizer")
    runs["no tokenizer"] = run
    (run := run_copy("tokenizer-garbage")).joinpath("tokenizer", "tegaki_tokenizer.json").write_text("[")
    runs["tokenizer garbage"] = run
    (run := run_copy("adapter-truncated", "ft"))
    for p in run.glob("checkpoints/step_*/model.safetensors"):
        p.write_bytes(p.read_bytes()[:100])
    runs["fine-tune truncated"] = run
    hf = out / "hf-config"
    shutil.copytree(f["hf"], hf)
    (hf / "config.json").write_text('{"model_type": "gpt2", "n_layer": "two"}')
    runs["hf config wrong types"] = hf
    return runs


def loading_cases(probe: Probe, runs: dict[str, Path], f: dict[str, Path], out: Path) -> None:
    for what, run in runs.items():
        probe.command(
            "loading",
            ["generate", "--model", str(run), "--max-new-tokens", "2", "a"],
            case=f"generate {what}",
        )
        probe.command(
            "loading", ["eval", "--model", str(run), "--text", str(f["corpus"]), "--window", "16"], case=f"eval {what}"
        )
        probe.command("loading", ["export", str(run), str(out / f"export-{run.name}")], case=f"export {what}")
        probe.command(
            "loading", ["chat", "--model", str(run), "--max-tokens", "2"], stdin="hi\n/exit\n", case=f"chat {what}"
        )
        probe.command("loading", train_args(run, f["corpus"], 4), case=f"resume {what}")


def serve_cases(probe: Probe, f: dict[str, Path]) -> None:
    with server_process(f["hf"], "--name", "probe", "--max-body-mb", "1") as (_, url):
        port = int(url.rsplit(":", 1)[1])
        json_headers = {"Content-Type": "application/json"}

        def post(path: str, body: dict, case: str) -> None:
            data = json.dumps(body, allow_nan=True).encode()
            probe.request(port, "POST", path, data, json_headers, case)

        base = {"model": "probe", "prompt": "a", "max_tokens": 2}
        fields = ["max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty"]
        fields += ["frequency_penalty", "n", "seed", "logprobs", "stop", "prompt", "stream", "echo", "best_of"]
        fields += ["logit_bias", "model", "stream_options", "suffix", "user"]
        for name in fields:
            for value in BAD_JSON_VALUES:
                body = {**base, name: value}
                if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 1e300:
                    text = json.dumps({**base, name: 0}).replace(f'"{name}": 0', f'"{name}": {value}')
                    probe.request(port, "POST", "/v1/completions", text.encode(), json_headers, f"{name}: 4000 digits")
                    continue
                post("/v1/completions", body, f"completions {name}: {json.dumps(value)[:30]}")
        for value in ["NaN", "Infinity", "-Infinity"]:
            text = json.dumps(base)[:-1] + f', "temperature": {value}}}'
            probe.request(port, "POST", "/v1/completions", text.encode(), json_headers, f"temperature: {value}")
        chat = {"model": "probe", "max_tokens": 2}
        messages = [
            None,
            [],
            "hi",
            [{}],
            [{"role": "user"}],
            [{"role": "user", "content": None}],
            [{"role": "user", "content": 5}],
            [{"role": "robot", "content": "hi"}],
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            [{"role": "user", "content": "x" * 3000}],
            [{"role": "user", "content": "<|im_end|>" * 40}],
            [{"role": "system", "content": "s"}] * 50,
            [{"role": "user", "content": "\ud800"}],
        ]
        for m in messages:
            post("/v1/chat/completions", {**chat, "messages": m}, f"chat messages: {json.dumps(m)[:40]}")
        for extra in [{"max_tokens": None}, {"response_format": {"type": "json_object"}}, {"tools": [{}]}]:
            body = {**chat, "messages": [{"role": "user", "content": "x" * 2000}], **extra}
            post("/v1/chat/completions", body, f"chat long message, {json.dumps(extra)[:40]}")
        good = json.dumps(base).encode()
        for headers, case in [
            ({"Content-Type": "text/plain"}, "text/plain body"),
            ({"Content-Type": "application/x-www-form-urlencoded"}, "form-encoded body"),
            ({}, "no content type"),
            ({**json_headers, "Origin": "http://evil.example"}, "another origin"),
            ({**json_headers, "Host": "evil.example"}, "another host (DNS rebinding)"),
            ({**json_headers, "Origin": "null"}, "origin null"),
            ({**json_headers, "Authorization": "Bearer x" * 1000}, "a long Authorization"),
            ({**json_headers, "Content-Length": "999999999"}, "a Content-Length far past the body"),
        ]:
            probe.request(port, "POST", "/v1/completions", good, headers, case)
        for body, case in [
            (b"", "empty body"),
            (b"{", "torn JSON"),
            (b"\xff\xfe", "not UTF-8"),
            (b"[]", "a list"),
            (b"null", "null"),
            (b"[" * 100_000 + b"]" * 100_000, "nested 100k deep"),
            (b'{"a": ' * 50_000 + b"1" + b"}" * 50_000, "objects nested 50k deep"),
            (b'{"prompt": "' + b"a" * 2_000_000 + b'"}', "a 2 MB prompt (over --max-body-bytes)"),
            (json.dumps({**base, "prompt": "a " * 400_000}).encode()[:999_000], "a torn 1 MB body"),
            (json.dumps({**base, "prompt": ["a"] * 5000}).encode(), "5000 prompts"),
            (json.dumps({**base, "prompt": [[1, 2]] * 10 + [[10**9]]}).encode(), "token ids out of range"),
            (json.dumps({**base, "prompt": [[-1]]}).encode(), "a negative token id"),
            (json.dumps({**base, "n": 16, "prompt": ["a"] * 64}).encode(), "64 prompts x n=16"),
        ]:
            probe.request(port, "POST", "/v1/completions", body, json_headers, case)
        for path in [
            "/../../etc/passwd",
            "/static/../../../etc/passwd",
            "/static/%2e%2e/%2e%2e/etc/passwd",
            "/static/..%2f..%2fetc/passwd",
            "/%00",
            "/v1/models/../../x",
            "/" + "a" * 10_000,
            "/v1/models",
            "/favicon.ico",
            "/static/app.js",
            "/insides",
            "/v1",
        ]:
            probe.request(port, "GET", path, None, {}, f"GET {path[:60]}")
        for method in ["PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"]:
            probe.request(port, method, "/v1/completions", good, json_headers, f"{method} /v1/completions")
        for path in ["/v1/embeddings", "/v1/completions/x", "/api/insides", "/health"]:
            probe.request(port, "POST", path, good, json_headers, f"POST {path}")


SURFACES = ("serve", "generate", "chat", "eval", "tokenizer", "folders", "inputs", "loading")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=SURFACES, action="append", help="run only these surfaces (repeatable)")
    p.add_argument("--case-timeout", type=float, default=120.0, help="seconds before a case counts as a hang")
    args = p.parse_args()
    only = set(args.only or SURFACES)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        probe = Probe(root, args.case_timeout)
        f = make_fixtures(root)
        (root / "kept").mkdir()
        shutil.copy(f["corpus"], root / "kept" / "plays.txt")
        folders = people(root, f, probe)
        bad = write_bad_files(root)
        out = root / "outputs"
        out.mkdir()
        if "serve" in only:
            serve_cases(probe, f)
        if "generate" in only:
            generate_cases(probe, f)
        if "chat" in only:
            chat_cases(probe, f)
        if "eval" in only:
            eval_cases(probe, f, bad)
        if "tokenizer" in only:
            tokenizer_cases(probe, f, bad, out)
        if "folders" in only:
            folder_cases(probe, f, bad, folders)
        if "inputs" in only:
            input_cases(probe, f, bad, out)
        if "loading" in only:
            loading_cases(probe, damaged_runs(f, out), f, out)
    broken = [r for r in probe.results if not r[2]]
    by_surface: dict[str, list[int]] = {}
    for surface, _, held, _ in probe.results:
        by_surface.setdefault(surface, [0, 0])[0 if held else 1] += 1
    counts = ", ".join(f"{s} {h}/{h + b}" for s, (h, b) in by_surface.items())
    print(
        f"\n{len(probe.results)} cases in {time.monotonic() - started:.0f} s: {len(probe.results) - len(broken)} "
        f"held, {len(broken)} broken ({counts})"
    )
    for surface, case, _, seen in broken:
        print(f"  BROKEN {surface}: {case[:120]} [{seen[:300]}]")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
