"""The run folder's names: its files, and what `tegaki train` and `tegaki finetune` write there."""

from __future__ import annotations

import re

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"
MADE_BY_FILE = "made_by.json"  # which command made a run folder, written before anything else there
LOCK_FILE = ".lock"

# What `tegaki train` writes in a run folder, and, for the folders among them, what they may hold.
RUN_ENTRIES = {
    RUN_FILE: None,
    METRICS_FILE: None,
    "loss.png": None,
    "tb": r"events\.out\.tfevents\..*",
    "tokenizer": r".*",
    "checkpoints": r"step_\d{6}(\.tmp|\.old)?",
    "data": r"(train|val)_\d{6}\.bin(\.tmp)?|meta\.json|prepare\.json|\..*\.tmp",
    "chat_template.jinja": None,  # a fine-tune's template (tegaki finetune)
    MADE_BY_FILE: None,
}
# An atomic write's temporary file, a set-aside copy, the lock: never a person's file.
LEFTOVER = re.compile(r"\..*\.(tmp|old)|\.lock")
