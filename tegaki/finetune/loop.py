"""Fine-tuning a pretrained model on instruction records: `finetune(ft, train_cfg)`.

The steps are the training loop's own (tegaki.train.loop.Run: AdamW, schedule, validation,
checkpoints, exact resume, torchrun, metrics, the loss plot). What differs is set up here, through
Run's `setup` hook, before the first step:

    the model     loaded with tegaki.load.from_pretrained (a run folder, a transformers folder, a hub id)
                  and, with --method lora, frozen with adapters added (tegaki.lora)
    the format    the model's chat template; a model without one gets ChatML, its two markers added
                  to the tokenizer (saved in the run folder) and as embedding rows (tegaki.finetune.tokens)
    the data      records -> chat template -> (ids, labels) with the prompts masked -> packed rows
                  (tegaki.finetune.data); a seeded share of the records is the validation split,
                  so the logged val_loss is the loss on held-out responses
    the folder    run.json records the base model, the method and the LoRA settings, so every command
                  that loads a run (generate, serve, trace, export) merges the adapters on loading
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from tegaki.chat_template import (
    DEFAULT_SPECIAL_TOKENS,
    DEFAULT_TEMPLATE,
    NAMED,
    PLAIN_TEMPLATE,
    chatml,
    find_chat_template,
    local_template_folders,
)
from tegaki.checkpoint import prepare_run_folder, read_run_json, write_run_json
from tegaki.data import BatchLoader
from tegaki.errors import TegakiError
from tegaki.files import atomic_write_text
from tegaki.finetune.data import (
    PackedRows,
    describe_too_long,
    encode_records,
    read_records,
    split_records,
)
from tegaki.finetune.tokens import add_chat_tokens, needs_chat_tokens
from tegaki.load import from_pretrained, tokenizer_for
from tegaki.lora import LoRASettings, add_lora, parse_targets
from tegaki.train.loop import PlotHook, Run, train
from tegaki.train.schedule import build_optimizer
from tegaki.train.settings import RESUME_KEYS, TrainConfig, check_settings
from tegaki.train.setup import token_byte_lengths

METHODS = ("lora", "full")
# The training settings a fine-tune starts from (any of them can be given on the command line).
TRAIN_DEFAULTS = {
    "max_steps": 200,
    "batch_size": 8,
    "eval_every": 50,
    "eval_batches": 20,
    "save_every": 50,
    "warmup": 10,
    "weight_decay": 0.0,
    "sample_every": 0,
    "val_fraction": 0.1,
}
LR = {"lora": 1e-3, "full": 1e-4}  # adapters start at zero and need bigger steps than whole weights


@dataclass
class FineTuneConfig:
    """What `tegaki finetune` adds to the training settings."""

    model: str  # the base: a tegaki run folder, a transformers folder or a hub id
    data: str  # the .jsonl records
    method: str = "lora"
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "q,v"
    max_seq_len: int = 256
    chat_template: str | None = None  # a jinja2 file, "chatml" or "plain"; None: the model's own, else ChatML

    def lora(self, new_tokens: tuple[int, ...] = ()) -> LoRASettings:
        """The adapters' settings; new_tokens: ids added for the chat format, whose rows learn too."""
        targets = parse_targets(self.lora_targets)
        return LoRASettings(self.lora_r, self.lora_alpha, self.lora_dropout, targets, tuple(new_tokens))

    def check(self) -> None:
        if self.method not in METHODS:
            raise TegakiError(f"--method must be lora or full, got {self.method!r}")
        if self.max_seq_len < 2:
            raise TegakiError(f"--max-seq-len must be at least 2, got {self.max_seq_len}")
        if self.method == "lora":
            self.lora()  # refuses bad targets before anything is loaded
            alpha_ok = math.isfinite(self.lora_alpha) and self.lora_alpha > 0  # nan and inf end in a nan loss
            if self.lora_r < 1 or not alpha_ok or not 0 <= self.lora_dropout < 1:
                raise TegakiError(
                    "--lora-r must be >= 1, --lora-alpha a finite number > 0 and --lora-dropout in [0, 1); "
                    f"got {self.lora_r}, {self.lora_alpha}, {self.lora_dropout}"
                )


def train_settings(ft: FineTuneConfig, values: dict[str, Any]) -> TrainConfig:
    """A TrainConfig for a fine-tune: TRAIN_DEFAULTS and the method's lr, then the given values."""
    merged = {
        **TRAIN_DEFAULTS,
        "lr": LR.get(ft.method, LR["lora"]),
        **{k: v for k, v in values.items() if v is not None},
        "data": ft.data,
        "preset": ft.model,
        "block_size": ft.max_seq_len,
    }
    cfg = TrainConfig(**merged)
    check_settings(cfg)
    return cfg


def chat_template_for(model_ref: str, model, tokenizer, override: str | None):
    """The template that writes records out: the model's own (or --chat-template's), else ChatML --
    with its two markers added to the tokenizer and the model (tegaki.finetune.tokens) when they are
    missing. The model and tokenizer are changed in place; `tegaki serve` then finds ChatML in the run."""
    folder = Path(model_ref)
    folders = local_template_folders(model_ref)
    if override is None and (folder / "run.json").is_file():  # a fine-tune keeps the format it learned
        used = (read_run_json(folder).get("finetune") or {}).get("chat_template")
        override = used if used in NAMED else None
    template = find_chat_template(folders, tokenizer, override)
    if template is None:  # no format of its own: ChatML, as transformers' TRL sets one up
        template = chatml(template_specials(folders, tokenizer))
    if needs_chat_tokens(template, tokenizer):
        add_chat_tokens(model, tokenizer)
    return template


def template_specials(folders, tokenizer) -> dict[str, str]:
    """The special-token variables a template sees (bos_token, ...), as find_chat_template reads them."""
    return find_chat_template(folders, tokenizer, "plain").special_tokens


def trainable_parameters(model: torch.nn.Module, ft: FineTuneConfig) -> str:
    """What trains, in a line: "LoRA r=8 on q,v: 294,912 of 124,734,720 parameters train (0.24%)"."""
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    what = f"LoRA r={ft.lora_r} on {','.join(ft.lora().targets)}" if ft.method == "lora" else "full fine-tune"
    return f"{what}: {trained:,} of {total:,} parameters train ({trained / total:.2%})"


class FineTuneSetup:
    """Run's `setup` hook for a fine-tune (see this file's docstring)."""

    def __init__(self, ft: FineTuneConfig):
        ft.check()
        self.ft = ft

    def __call__(self, run: Run) -> None:
        ft, cfg = self.ft, run.cfg
        if run.dist.is_main:
            prepare_run_folder(run.run_dir, "finetune", cfg.fresh, {"--model": ft.model, "--data": ft.data})
        run.dist.barrier()
        model = from_pretrained(ft.model)
        tokenizer = tokenizer_for(ft.model)
        before = dict(tokenizer.special_tokens)
        template = chat_template_for(ft.model, model, tokenizer, ft.chat_template)
        self.new_tokens = tuple(i for t, i in tokenizer.special_tokens.items() if t not in before)
        if self.new_tokens:
            run.say(
                f"added {', '.join(DEFAULT_SPECIAL_TOKENS)} to the tokenizer as ids {self.new_tokens} "
                f"(embedding rows: {model.config.vocab_size:,})"
            )
        run.tokenizer, run.model_config, run.block_size = tokenizer, model.config, ft.max_seq_len
        run.tokenizer_ref = "tokenizer"  # saved into the run folder by write_run_folder
        if ft.max_seq_len > model.config.block_size:  # rows of it would be allocated, then trained on
            raise TegakiError(
                f"--max-seq-len {ft.max_seq_len} is beyond the context of {ft.model} "
                f"(block_size={model.config.block_size}); choose at most {model.config.block_size}"
            )
        run.data_dir = Path(ft.data)
        self.build_data(run, template)
        if ft.method == "lora":
            # A's random start comes from --seed, not from whatever the loading left in torch's
            # generator: the same command gives the same adapters (and every rank the same ones)
            torch.manual_seed(cfg.seed)
            add_lora(model, ft.lora(self.new_tokens))
        run.say(trainable_parameters(model, ft))
        run.raw_model = model.float().to(run.device)
        run.model = run.raw_model
        if run.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [run.device.index] if run.device.type == "cuda" else None
            run.model = DistributedDataParallel(run.raw_model, device_ids=ids)
        run.optimizer = build_optimizer(run.model, cfg, run.device)
        run.forward = torch.compile(run.model) if cfg.compile else run.model
        if run.dist.is_main:
            self.write_run_folder(run, tokenizer, template)
        run.dist.barrier()

    def build_data(self, run: Run, template) -> None:
        ft, cfg = self.ft, run.cfg
        train_records, val_records = split_records(read_records(ft.data), cfg.val_fraction, cfg.seed)
        pad = run.tokenizer.eot_id if run.tokenizer.eot_id is not None else 0
        rows = {}
        for split, records in (("train", train_records), ("validation", val_records)):
            encoded = encode_records(records, template, run.tokenizer, ft.max_seq_len)
            note = describe_too_long(encoded, ft.max_seq_len)
            if note:
                run.say(f"{split}: {note}")
            if not encoded.pairs:
                raise TegakiError(f"{ft.data}: no {split} record fits in --max-seq-len {ft.max_seq_len}")
            rows[split] = PackedRows(encoded.pairs, ft.max_seq_len, pad)
        run.say(
            f"{ft.data}: {len(train_records)} train records in {len(rows['train'])} rows "
            f"({rows['train'].response_tokens:,} response tokens learned), {len(val_records)} held out; "
            f"template: {template.origin}"
        )
        run.loader = BatchLoader(rows["train"], cfg.batch_size, cfg.seed, run.dist.rank, run.dist.world_size)
        run.val_windows = rows["validation"]
        run.token_bytes = token_byte_lengths(run.tokenizer, run.model_config.vocab_size).to(run.device)

    def template_name(self, template) -> str | None:
        """How run.json names the format: "chatml", "plain", or the file given (copied beside it)."""
        named = {DEFAULT_TEMPLATE: "chatml", PLAIN_TEMPLATE: "plain"}
        return named.get(template.source, self.ft.chat_template)

    def write_run_folder(self, run: Run, tokenizer, template) -> None:
        """run.json (refusing a folder that holds another fine-tune), the tokenizer, the template."""
        ft = self.ft
        info = {
            "model_config": run.model_config.to_dict(),
            "tokenizer": "tokenizer",
            "data": str(ft.data),
            "train": run.cfg.to_dict(),
            "finetune": asdict(ft) | {"chat_template": self.template_name(template)},
            "lora": ft.lora(self.new_tokens).to_dict() if ft.method == "lora" else None,
        }
        write_run_json(run.run_dir, info, RESUME_KEYS, run.say)  # first: from here on the folder is this fine-tune's
        tokenizer.save(run.run_dir / "tokenizer")  # the base's, with any chat tokens added: the same on a resume
        if template.source not in (DEFAULT_TEMPLATE, PLAIN_TEMPLATE):  # serve finds it here afterwards
            atomic_write_text(run.run_dir / "chat_template.jinja", template.source)


def finetune(ft: FineTuneConfig, cfg: TrainConfig, plot_losses: PlotHook | None = None) -> dict[str, Any]:
    """Fine-tune (or resume fine-tuning) `ft.model` on `ft.data` into `cfg.out`; the last step's numbers."""
    return train(cfg, plot_losses=plot_losses, setup=FineTuneSetup(ft))
