"""The run folder: what `tegaki train --out DIR` (and `tegaki finetune`) writes, and every other command reads.

    DIR/run.json                 model config, tokenizer ("gpt2" or "tokenizer"), training settings
    DIR/made_by.json             the command that made the folder, written before anything else there
    DIR/tokenizer/               the run's tokenizer, unless a named one ("gpt2") is used
    DIR/data/                    token shards prepared from raw --data
    DIR/checkpoints/step_NNNNNN/ model.safetensors, optimizer.pt, state.json (sizes + sha256)
    DIR/metrics.jsonl            one JSON line per optimizer step, plus validation and sample lines
    DIR/loss.png                 the loss curves, drawn at the end
    DIR/.lock                    the PID of the process training in DIR, while it does

Every file is written atomically (tegaki/files.py, or a folder renamed into place), so a kill at any
moment leaves the old file or the new one; paths recorded inside the folder stay inside it.

    layout.py             the names above
    folder.py             whose folder it is (claim, mark, --fresh), run.json checked and written, the lock
    checkpoints.py        a checkpoint saved atomically, checked against its hashes, found
    training.py           a run's whole state (weights, AdamW, random generators) saved and restored
    reading.py            run.json, the tokenizer and the model of a run, read back
    three_projections.py  checkpoints whose attention holds q_proj, k_proj and v_proj, joined into qkv
    metrics.py            metrics.jsonl, written and read
"""

from tegaki.checkpoint.checkpoints import (
    check_checkpoint,
    file_sha256,
    find_checkpoint,
    model_tensors,
    prune_checkpoints,
    save_checkpoint,
)
from tegaki.checkpoint.folder import (
    check_same_run,
    claim_run_folder,
    clear_run_folder,
    locked_run_folder,
    made_by,
    mark_run_folder,
    prepare_run_folder,
    run_command,
    undone_if_refused,
    write_run_json,
)
from tegaki.checkpoint.layout import (
    LOCK_FILE,
    MADE_BY_FILE,
    METRICS_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    RUN_ENTRIES,
    RUN_FILE,
    STATE_FILE,
)
from tegaki.checkpoint.metrics import MetricsLog, read_metrics
from tegaki.checkpoint.reading import (
    check_inside,
    check_shapes,
    load_model_tensors,
    load_run_model,
    load_run_tokenizer,
    read_model_tensors,
    read_optimizer_state,
    read_resume_state,
    read_run_json,
    read_safetensors,
    rebuild_run_json,
    safetensors_metadata,
)
from tegaki.checkpoint.three_projections import upgrade_optimizer_state, upgrade_state_dict
from tegaki.checkpoint.training import restore_rng_state, restore_training_state, rng_state, save_training_state

__all__ = [
    "check_checkpoint",
    "check_inside",
    "check_same_run",
    "check_shapes",
    "claim_run_folder",
    "clear_run_folder",
    "file_sha256",
    "find_checkpoint",
    "load_model_tensors",
    "load_run_model",
    "load_run_tokenizer",
    "LOCK_FILE",
    "locked_run_folder",
    "MADE_BY_FILE",
    "made_by",
    "mark_run_folder",
    "METRICS_FILE",
    "MetricsLog",
    "MODEL_FILE",
    "model_tensors",
    "OPTIMIZER_FILE",
    "prepare_run_folder",
    "prune_checkpoints",
    "read_metrics",
    "read_model_tensors",
    "read_optimizer_state",
    "read_resume_state",
    "read_run_json",
    "read_safetensors",
    "rebuild_run_json",
    "restore_rng_state",
    "restore_training_state",
    "rng_state",
    "RUN_ENTRIES",
    "run_command",
    "RUN_FILE",
    "safetensors_metadata",
    "save_checkpoint",
    "save_training_state",
    "STATE_FILE",
    "undone_if_refused",
    "upgrade_optimizer_state",
    "upgrade_state_dict",
    "write_run_json",
]
