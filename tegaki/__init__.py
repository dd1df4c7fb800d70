"""tegaki (手書き): an LLM written by hand in PyTorch.

Read in pipeline order: tokenizer/ → data/ → config.py → model.py → train/ → generate.py →
hf/ → analysis/.

    import tegaki
    model = tegaki.from_pretrained("gpt2")          # or a transformers folder, or a tegaki run
    model = tegaki.GPT(tegaki.ModelConfig.preset("tiny-llama"))
    tegaki.export_hf(model, "out/")                 # config.json + model.safetensors for transformers
"""

__version__ = "0.1.0"

__all__ = ["ModelConfig", "GPT", "from_pretrained", "export_hf", "tokenizer_for"]

# Where each public name lives. Imported on first use, so `import tegaki.tokenizer` stays light
# (no torch) and the CLI starts quickly.
_EXPORTS = {
    "ModelConfig": "tegaki.config",
    "GPT": "tegaki.model",
    "from_pretrained": "tegaki.load",
    "export_hf": "tegaki.load",
    "tokenizer_for": "tegaki.load",
}


# Subpackages reachable as attributes after a plain `import tegaki` (tegaki.tokenizer.load(...)).
_SUBMODULES = ("config", "model", "rope", "tokenizer", "data", "train", "generate", "hf", "quant", "analysis")


def __getattr__(name: str):
    import importlib

    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"tegaki.{name}")
    raise AttributeError(f"module 'tegaki' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
