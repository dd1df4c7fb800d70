"""tegaki (手書き): an LLM written by hand in PyTorch.

Read in pipeline order: tokenizer/ → data.py → config.py → model.py → train.py → generate.py →
hf.py → analysis/.
"""

__version__ = "0.1.0"
