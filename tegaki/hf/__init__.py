"""Checkpoints in transformers' format, both ways, as data.

Each family (GPT-2, Llama, Qwen3, GPT-OSS) is a set of name tables (`tables.py`); the same tables
drive `tegaki.load.from_pretrained` (import) and `tegaki.load.export_hf` (export), so there is no
per-model loading code. `config.py` turns config.json into a ModelConfig and back; `weights.py`
renames and reshapes the tensors. This package only converts names, configs and tensors: reading and
writing folders is `load.py`'s job, and transformers itself is never imported here.
"""

from tegaki.hf.config import config_from_hf, config_to_hf, family_for_config
from tegaki.hf.tables import FAMILIES, Family, family_of, supported_architectures
from tegaki.hf.weights import state_dict_from_hf, state_dict_to_hf

__all__ = [
    "FAMILIES",
    "Family",
    "config_from_hf",
    "config_to_hf",
    "family_for_config",
    "family_of",
    "state_dict_from_hf",
    "state_dict_to_hf",
    "supported_architectures",
]
