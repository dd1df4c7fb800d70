"""Loading any model tegaki can read, and writing transformers folders.

`ModelSource` is a --model resolved once: a tegaki run folder (`tegaki.checkpoint` reads it), a
transformers folder (config.json + safetensors, converted by the tables in `tegaki/hf/`) or a hub id
(downloaded when first needed, when `huggingface_hub` is installed), with its config, its tokenizer
and its chat template's folders. `from_pretrained` and `tokenizer_for` ask it one thing each;
`export_hf` writes any model back in transformers' format.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

import tegaki.tokenizer as tokenizers
from tegaki.chat_template import local_template_folders
from tegaki.checkpoint import load_run_model, load_run_tokenizer, read_run_json, read_safetensors, safetensors_metadata
from tegaki.config import ModelConfig
from tegaki.device import LAYER_OBJECT_BYTES, check_fits
from tegaki.errors import TegakiError
from tegaki.files import atomic_write, atomic_write_json
from tegaki.hf import config_from_hf, config_to_hf, family_of, state_dict_from_hf, state_dict_to_hf
from tegaki.model import GPT, parameter_count
from tegaki.mxfp4 import dequantize_experts
from tegaki.rope import rope_frequencies
from tegaki.tokenizer import export_hf_tokenizer


def _index_shards(index: Path) -> list[str]:
    """The shard files a *.index.json names, each checked to be a file beside it (an index from the
    internet must not make tegaki read files elsewhere)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise TegakiError(f"{index} is damaged ({type(e).__name__}: {e}); download it again") from None
    for name in names:
        if not isinstance(name, str) or name != Path(name).name or name in (".", ".."):
            raise TegakiError(f"{index} names the shard {name!r}, outside its folder; refused")
    return names


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The weights of a transformers folder, found in transformers' order: model.safetensors before
    a sharded index (a folder can hold both, and transformers then loads the single file)."""
    if (folder / "model.safetensors").exists():
        return read_safetensors(folder / "model.safetensors")
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = _index_shards(index)
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            if not (folder / shard).exists():
                raise TegakiError(f"{folder}: the index names shard {shard}, which is missing")
            state.update(read_safetensors(folder / shard))
        return state
    bin_index = folder / "pytorch_model.bin.index.json"
    bins = _index_shards(bin_index) if bin_index.exists() else []
    if not bins and (folder / "pytorch_model.bin").exists():
        bins = ["pytorch_model.bin"]
    if bins:
        state = {}
        for b in bins:
            try:  # weights_only: a pickle cannot run code on load
                state.update(torch.load(folder / b, map_location="cpu", weights_only=True))
            except pickle.UnpicklingError:
                raise TegakiError(
                    f"{folder / b} was refused for safety: it holds Python objects beyond plain tensors, and "
                    "loading them could run code. Use the model's model.safetensors, or convert this file "
                    "with a tool you trust"
                ) from None
            except Exception as e:  # noqa: BLE001 - any other failure is the file's fault
                raise TegakiError(
                    f"{folder / b}: could not read weights ({type(e).__name__}); the file may be truncated or damaged"
                ) from None
        return state
    raise TegakiError(f"{folder}: no weights found (expected model.safetensors, a sharded index, or pytorch_model.bin)")


def read_hf_config(folder: Path) -> tuple[dict, ModelConfig]:
    """A transformers folder's config.json, as it is and as a ModelConfig."""
    try:
        hf_config = json.loads((folder / "config.json").read_text())
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8; JSON nested too deep
        raise TegakiError(f"{folder / 'config.json'} is not valid JSON: {e}") from None
    try:
        return hf_config, config_from_hf(hf_config)
    except (TypeError, ValueError, KeyError, AttributeError) as e:  # "num_hidden_layers": "twelve", [] ...
        raise TegakiError(
            f"{folder / 'config.json'} has a field of the wrong type or a missing one ({type(e).__name__}: {e})"
        ) from None


def load_hf_folder(folder: Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    hf_config, config = read_hf_config(folder)
    fam = family_of(hf_config)
    if str(device) == "meta":  # shapes only (parameter counts): no need to read the weights
        check_fits(config.n_layer, LAYER_OBJECT_BYTES, "cpu", f"describing the model of {folder}", items="layers")
        with torch.device("meta"):
            return GPT(config).eval()
    check_fits(parameter_count(config), (dtype or torch.float32).itemsize, device, f"loading {folder}")
    hf_state = read_hf_weights(folder)
    if (hf_config.get("quantization_config") or {}).get("quant_method") == "mxfp4":
        # The experts come out in the dtype of the checkpoint's other tensors (bfloat16 on the hub).
        float_dtypes = [t.dtype for k, t in hf_state.items() if t.is_floating_point()]
        hf_state = dequantize_experts(hf_state, dtype or (float_dtypes[0] if float_dtypes else torch.bfloat16))
    with torch.device("meta"):
        model = GPT(config)
    state = state_dict_from_hf(model, hf_state, fam)
    model.load_state_dict(state, strict=False, assign=True)
    if hasattr(model, "inv_freq"):  # the rotary table is a buffer computed from the config, not saved
        model.inv_freq = rope_frequencies(config)[0]
    if config.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval()


# What a hub snapshot needs: the model's own files, not the extra copies some repositories carry
# (GPT-OSS ships its weights again under original/ and metal/).
_MODEL_FILES = ["config.json", "model*.safetensors", "model.safetensors.index.json", "generation_config.json"]
_TOKENIZER_FILES = ["tokenizer*", "vocab.json", "merges.txt", "special_tokens_map.json", "chat_template.jinja"]


def _download(repo_id: str, patterns: list[str]) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise TegakiError(
            f"{repo_id!r} is not a local folder; to download it from the Hugging Face hub install "
            "the hub extra: pip install -e '.[hub]'"
        ) from None
    try:
        path = snapshot_download(repo_id, allow_patterns=patterns)
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, auth: all become one message
        raise TegakiError(
            f"{repo_id}: no such local folder, and could not download {repo_id!r} from the Hugging Face hub "
            f"({type(e).__name__}). Are you offline, or is there no such model? Check the path, or pass a local "
            "folder with config.json and model.safetensors"
        ) from None
    return Path(path)


def _resolve(name_or_path: str | os.PathLike) -> tuple[Path | None, str]:
    """(an existing folder, or None for a hub id, and the text). Bad paths fail here, clearly."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path, str(name_or_path)
    text = str(name_or_path)
    if path.exists():
        raise TegakiError(f"{text} is a file; expected a folder (config.json + weights, or a tegaki run folder)")
    looks_local = text.startswith((".", "/", "~")) or os.sep in text and text.count("/") != 1
    # "runs/demo" has the shape of a hub id; if its first part is a local folder, the user meant a path.
    first_part_is_local = "/" in text and Path(text.split("/")[0]).is_dir()
    if looks_local or first_part_is_local:
        raise TegakiError(f"{text}: no such folder (train one with `tegaki train --out {text}`, or check the path)")
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", text):
        raise TegakiError(f"{text!r} is neither a folder nor a hub id like 'gpt2' or 'openai-community/gpt2'")
    return None, text


class ModelSource:
    """A --model resolved once: a tegaki run folder, a transformers folder, or a hub id whose files
    are downloaded when first needed. It carries what a command asks of a model beside its weights:
    its folder, its config, its tokenizer and where its chat template may be; `load` builds the model.
    `from_pretrained` and `tokenizer_for` are this, for one question each."""

    def __init__(self, name_or_path: str | os.PathLike):
        self.folder, self.name = _resolve(name_or_path)  # folder: None for a hub id

    @property
    def is_run(self) -> bool:
        return self.folder is not None and (self.folder / "run.json").exists()

    @property
    def short_name(self) -> str:
        """runs/demo -> "demo"; a hub id stays itself ("Qwen/Qwen3-0.6B")."""
        return self.folder.resolve().name if self.folder is not None else self.name

    @functools.cached_property
    def config(self) -> ModelConfig:
        """The model's config, read without its weights."""
        if self.is_run:
            return ModelConfig.from_dict(self.run_info["model_config"])
        if self.folder is not None and not (self.folder / "config.json").exists():
            raise TegakiError(self._neither)
        return read_hf_config(self.folder or _download(self.name, ["config.json"]))[1]

    @functools.cached_property
    def run_info(self) -> dict:
        """A run folder's run.json, read once."""
        return read_run_json(self.folder)

    def load(self, device: str | torch.device = "cpu", dtype=None):
        """The model, in eval mode. device="meta" builds it from the config alone (shapes, no weights read)."""
        if self.folder is None:
            config_only = str(device) == "meta"
            return load_hf_folder(_download(self.name, ["config.json"] if config_only else _MODEL_FILES), device, dtype)
        if self.is_run:
            return load_run_model(self.folder, device=device, dtype=dtype, info=self.run_info)
        if (self.folder / "config.json").exists():
            return load_hf_folder(self.folder, device, dtype)
        raise TegakiError(self._neither)

    @property
    def _neither(self) -> str:
        return f"{self.folder}: neither a transformers folder (config.json) nor a tegaki run folder (run.json)"

    @functools.cached_property
    def tokenizer(self):
        """The tokenizer that goes with the model."""
        if self.folder is None and self.name in GPT2_NAMES:
            return tokenizers.load("gpt2")  # shipped with tegaki: no download
        path = self.folder or self._hub_tokenizer_folder
        if self.is_run:
            return load_run_tokenizer(path, info=self.run_info)
        return _folder_tokenizer(path)

    def template_folders(self) -> list[Path]:
        """Where a chat template may be: the folder and a run folder's tokenizer/; for a hub id, its
        downloaded tokenizer files (tokenizer_config.json, chat_template.jinja)."""
        if self.folder is not None:
            return local_template_folders(self.folder)
        return [] if self.name in GPT2_NAMES else [self._hub_tokenizer_folder]

    @functools.cached_property
    def _hub_tokenizer_folder(self) -> Path:
        return _download(self.name, _TOKENIZER_FILES)


GPT2_NAMES = ("gpt2", "openai-community/gpt2")


def from_pretrained(name_or_path: str | os.PathLike, device: str | torch.device = "cpu", dtype=None):
    """Load a model: a transformers folder, a tegaki run folder, or a hub id such as "gpt2".

    device="meta" builds the model from config.json alone (shapes, no weights read)."""
    return ModelSource(name_or_path).load(device, dtype)


def tokenizer_for(name_or_path: str | os.PathLike):
    """The tokenizer that goes with a model: a tegaki run folder, a transformers folder, or a hub id."""
    return ModelSource(name_or_path).tokenizer


def _folder_tokenizer(path: Path):
    """The tokenizer of a transformers folder (or a tegaki tokenizer saved there)."""
    hf_formats = [f for f in ("tokenizer.json", "vocab.json", "merges.txt") if (path / f).exists()]
    try:
        return tokenizers.load(path)
    except (ValueError, KeyError, OSError, RecursionError) as e:  # a damaged file (bad JSON, a missing key)
        files = ", ".join(hf_formats) or "the tokenizer files"
        raise TegakiError(f"{path}: could not read {files} ({type(e).__name__}: {e})") from None
    except TegakiError as e:
        if not hf_formats and _is_gpt2_vocabulary(path):
            return tokenizers.load("gpt2")  # a GPT-2 checkpoint saved without its tokenizer files
        if not hf_formats:
            raise TegakiError(
                f"{path}: no tokenizer found (expected a tegaki run folder, a saved tegaki tokenizer, "
                "tokenizer.json, or GPT-2's vocab.json + merges.txt)"
            ) from None
        raise TegakiError(
            f"{path} holds a transformers tokenizer ({', '.join(hf_formats)}) that tegaki.tokenizer cannot read: {e}"
        ) from None


def _is_gpt2_vocabulary(folder: Path) -> bool:
    """A GPT-2 config.json whose vocabulary is GPT-2's 50,257 tokens (or that padded to 50,304)."""
    try:
        hf_config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return hf_config.get("model_type") == "gpt2" and hf_config.get("vocab_size", 50257) in (50257, 50304)


# What `tegaki export` writes into a folder: a transformers model, or with --peft an adapter (and,
# for a run that added chat tokens, its base in base/). The first name is the weights file, whose
# safetensors metadata carries EXPORT_MARK: the proof that the folder is an earlier export's.
EXPORT_FILES = {
    "model": ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"),
    "adapter": ("adapter_model.safetensors", "adapter_config.json", "base"),
    "web": (  # --web: the page's static folder (tegaki.web)
        "model.safetensors",
        "tokenizer.bpe.json",
        "index.html",
        "style.css",
        "app.js",
        "views.js",
        "model.js",
        "kernels.js",
        "tokenizer.js",
        "kernels.wasm",
    ),
}
EXPORT_MARK = "tegaki_export"
_WRITING = re.compile(r"\..*\.(tmp|old)")  # an atomic write's temporary file, killed mid-way


def claim_export_folder(out: str | os.PathLike, kind: str) -> None:
    """Refuse, with nothing written, to export into a folder that holds anything but an earlier
    export of the same kind: a person's config.json or tokenizer.json would be overwritten, and a
    stray model.safetensors.index.json would be read in place of the new weights."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TegakiError(f"{out} is a file, not a folder: tegaki export writes a folder; choose another path")
    if not _export_folder(out, kind):
        entries = sorted(e.name for e in out.iterdir() if not _WRITING.fullmatch(e.name))
        strangers = [e for e in entries if e not in EXPORT_FILES[kind]]
        if not strangers and (out / "base").is_dir() and not _export_folder(out / "base", "model"):
            inside = sorted(e.name for e in (out / "base").iterdir())
            strangers = [f"base/{e}" for e in ([e for e in inside if e not in EXPORT_FILES["model"]] or inside)]
        strangers = strangers or entries  # tegaki's names, but no export's mark on the weights
        raise TegakiError(
            f"{out} holds files tegaki export did not write ({', '.join(strangers[:5])}"
            f"{' ...' if len(strangers) > 5 else ''}); nothing was written. Export into a new or empty "
            "folder, or one an earlier tegaki export wrote"
        )


def _export_folder(out: Path, kind: str) -> bool:
    """True for a missing or empty folder, or one holding only what an export of `kind` wrote."""
    entries = [e for e in out.iterdir() if not _WRITING.fullmatch(e.name)] if out.is_dir() else []
    if not entries:
        return True
    if any(e.name not in EXPORT_FILES[kind] for e in entries):
        return False
    if kind == "adapter" and (out / "base").exists():
        if not (out / "base").is_dir() or not _export_folder(out / "base", "model"):
            return False
        if len(entries) == 1:  # the base, written just before the adapter
            return True
    weights = out / EXPORT_FILES[kind][0]
    try:
        return weights.is_file() and EXPORT_MARK in safetensors_metadata(weights)
    except TegakiError:  # a damaged weights file proves nothing
        return False


def export_hf(model, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    """Write config.json, generation_config.json and model.safetensors that transformers'
    AutoModelForCausalLM loads (and the tokenizer, when given). Each file is written atomically.

    The end-of-text id goes into both configs, so that transformers' generation stops where the
    model learned to: the tokenizer's own id when one is given; otherwise the family's default
    (GPT-2's 50256) only when it lies inside the vocabulary."""
    out = Path(out_dir)
    claim_export_folder(out, "model")
    hf_config = config_to_hf(model.config)  # raises first if no transformers class fits
    state = state_dict_to_hf(model)
    hf_config["torch_dtype"] = str(next(iter(state.values())).dtype).replace("torch.", "")
    hf_config.update(special_token_ids(model.config, tokenizer))
    umask = os.umask(0)
    os.umask(umask)

    def write_weights(tmp: str) -> None:
        save_file(state, tmp, metadata={"format": "pt", EXPORT_MARK: "model"})
        os.chmod(tmp, 0o666 & ~umask)  # as readable as the other files beside it

    atomic_write(out / "model.safetensors", write_weights)
    atomic_write_json(out / "config.json", hf_config)
    generation = {k: v for k, v in hf_config.items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    atomic_write_json(out / "generation_config.json", {"_from_model_config": True, **generation})
    if tokenizer is not None:
        export_hf_tokenizer(tokenizer, out)
    else:  # an earlier export's tokenizer is not this model's
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (out / name).unlink(missing_ok=True)
    return out


def special_token_ids(config, tokenizer=None) -> dict[str, int | None]:
    """bos/eos ids for config.json. tegaki's tokenizers have one special token that starts and ends
    a text (<|endoftext|>, as GPT-2); a tokenizer without one, or a default outside the vocabulary,
    gives None rather than an id the model never saw."""
    if tokenizer is not None:
        eot = tokenizer.eot_id
    else:
        eot = 50256 if config.vocab_size > 50256 else None  # GPT-2's, transformers' default
    if eot is not None and eot >= config.vocab_size:
        eot = None
    return {"bos_token_id": eot, "eos_token_id": eot}
