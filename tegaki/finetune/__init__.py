"""Fine-tuning a pretrained model on instruction records (full or LoRA), and its files.

    data.py    records (Alpaca, chat) -> chat template -> tokens with the prompts masked -> packed rows
    loop.py    FineTuneConfig and `finetune(ft, cfg)`: tegaki.train's loop with a fine-tune's setup
    peft.py    LoRA adapters in PEFT's format (adapter_config.json + adapter_model.safetensors), both ways
    instructions/  the bundled English + Japanese instruction set (CC0), made by scripts/make_instructions.py

The LoRA layer itself is tegaki/lora.py, below the run folder, which merges adapters when it loads a run.
"""

from tegaki.finetune.data import BUNDLED, records_path

__all__ = ["BUNDLED", "records_path"]
