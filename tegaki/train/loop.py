"""The training loop: `Run` holds one run (model, optimizer, data, logs) and `train(cfg)` runs it.

One optimizer step, the whole of what training is:

    for each of grad_accum micro-batches:           # accumulate gradients of a bigger batch
        loss = model(inputs, targets)[1]             # forward under bf16 autocast or in fp32
        (loss / grad_accum).backward()               # DDP/FSDP average gradients across ranks here
    clip the gradient norm to --grad-clip            # one bad batch cannot throw the weights away
    lr = warmup, then cosine or warmup-stable-decay  # `lr_at`
    AdamW step (weight decay on matrices only)       # `build_optimizer`

Around it: validation loss and bits per byte every --eval-every steps, a sample every
--sample-every steps, a NaN/inf guard, `metrics.jsonl`, and checkpoints that resume bit for bit
(the run folder: tegaki/checkpoint.py).

Two hooks let other code watch a run without changing it: `on_batch(step, micro, inputs, targets)`
sees every training batch (`tegaki compare` hashes them), and `plot_losses(run_dir)` draws the
loss curves at the end (`tegaki train` passes `tegaki.analysis.plot.plot_run_losses`).

A third, `setup(run)`, builds the run's parts in place of `Run.setup`: tokenizer, tokenizer_ref,
model_config, block_size, data_dir, loader (a BatchLoader), val_windows, token_bytes, raw_model, model,
optimizer, forward. `tegaki finetune` (tegaki/finetune/loop.py) loads a pretrained model and packed
instruction records this way; the steps, validation, checkpoints and resume are this file's.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tegaki.checkpoint import (
    MADE_BY_FILE,
    RUN_FILE,
    MetricsLog,
    check_shapes,
    claim_run_folder,
    clear_run_folder,
    find_checkpoint,
    mark_run_folder,
    read_model_tensors,
    read_optimizer_state,
    read_resume_state,
    read_run_json,
    save_checkpoint,
    upgrade_optimizer_state,
)
from tegaki.config import ModelConfig
from tegaki.data import BatchLoader, TokenWindows, validation_batches
from tegaki.device import check_fits, mfu, peak_flops, pick_device, pick_dtype, synchronize
from tegaki.errors import TegakiError
from tegaki.files import FolderLock, atomic_write_json
from tegaki.model import GPT, parameter_count
from tegaki.tokenizer import load as load_tokenizer
from tegaki.train.distributed import (
    broadcast_object,
    destroy_process_group,
    init_distributed,
    init_single_process_group,
)
from tegaki.train.report import explain_out_of_memory, progress_bar, tensorboard_writer
from tegaki.train.schedule import (
    DEFAULT_WARMUP,
    build_optimizer,
    flops_per_token,
    lr_at,
    warmup_steps,
)
from tegaki.train.settings import RESUME_KEYS, TrainConfig, check_settings
from tegaki.train.setup import (
    build_model_config,
    flushed_subnormals,
    is_named_tokenizer,
    setup_data,
    setup_tokenizer,
    token_byte_lengths,
)

# on_batch(step, micro, inputs, targets): every micro-batch this process trains on, before its forward
BatchHook = Callable[[int, int, torch.Tensor, torch.Tensor], None]
# plot_losses(run_dir) -> the picture written (None: none drawn)
PlotHook = Callable[[Path], "Path | None"]
# setup(run): builds the run's model and data instead of Run.setup (described at the top of this file)
SetupHook = Callable[["Run"], None]


class Run:
    """Everything one `tegaki train` holds: model, optimizer, data, logs. `run.train()` does it."""

    def __init__(
        self,
        cfg: TrainConfig,
        on_batch: BatchHook | None = None,
        plot_losses: PlotHook | None = None,
        setup: SetupHook | None = None,
    ):
        """`on_batch`, `plot_losses`, `setup`: the hooks described at the top of this file; None: not used."""
        check_settings(cfg)
        self.cfg = cfg
        self.on_batch = on_batch
        self.plot_losses = plot_losses
        self.setup_hook = setup
        self.run_dir = Path(cfg.out)
        wants_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
        device_kind = "cuda" if wants_cuda else "cpu"
        self.dist = init_distributed(device_kind)
        self.device = pick_device(cfg.device, self.dist.local_rank if self.dist.enabled else None)
        self.dtype = pick_dtype(cfg.dtype, self.device)
        self.say = self._say if self.dist.is_main else (lambda *a, **k: None)
        self.started = False  # set once setup is done and the steps begin
        self.lock = FolderLock(self.run_dir, "run folder")  # taken by the main process in setup()

    def _say(self, message: str) -> None:
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stderr)

    # --- setup --------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg, d = self.cfg, self.dist
        if d.is_main:
            claim_run_folder(self.run_dir, "train")
        if d.is_main and cfg.fresh:
            clear_run_folder(self.run_dir, {"--data": cfg.data, "--tokenizer": cfg.tokenizer})
        if d.is_main:
            mark_run_folder(self.run_dir, "train")  # before the tokenizer and the shards it writes
        d.barrier()
        if d.is_main:
            preset = ModelConfig.preset(cfg.preset)
            preset_vocab = (preset.with_overrides(cfg.set) if cfg.set else preset).vocab_size
            tokenizer, self.tokenizer_ref = setup_tokenizer(cfg, self.run_dir, preset_vocab, self.say)
            self.data_dir = setup_data(cfg, self.run_dir, tokenizer, self.tokenizer_ref, cfg.progress, self.say)
        # Other ranks wait for rank 0 to train the tokenizer and write the shards, then read them.
        self.tokenizer_ref, self.data_dir = broadcast_object(
            (self.tokenizer_ref, str(self.data_dir)) if d.is_main else None, d
        )
        self.data_dir = Path(self.data_dir)
        if not d.is_main:
            ref = self.tokenizer_ref
            tokenizer = load_tokenizer(ref if is_named_tokenizer(ref) else self.run_dir / ref)
        self.tokenizer = tokenizer
        self.model_config = build_model_config(cfg, tokenizer)
        self.block_size = cfg.block_size or self.model_config.block_size
        if self.block_size > self.model_config.block_size:
            raise TegakiError(
                f"--block-size {self.block_size} is larger than the model's context "
                f"(block_size={self.model_config.block_size}); lower --block-size or raise it with --set block_size=N"
            )
        self._check_run_json()
        self._build_data()
        self._build_model()

    def _check_run_json(self) -> None:
        path = self.run_dir / RUN_FILE
        info = {
            "model_config": self.model_config.to_dict(),
            "tokenizer": self.tokenizer_ref,
            # inside the run folder: relative to it, so the folder can be moved
            "data": (
                os.path.relpath(self.data_dir, self.run_dir) if self._inside_run(self.data_dir) else str(self.data_dir)
            ),
            "train": self.cfg.to_dict(),
        }
        if path.exists():
            old = read_run_json(self.run_dir, say=self.say)
            if old.get("model_config") != info["model_config"]:
                changed = sorted(k for k, v in info["model_config"].items() if old.get("model_config", {}).get(k) != v)
                raise TegakiError(
                    f"{self.run_dir} holds a run of another model ({', '.join(changed)} differ); "
                    "use another --out, or --fresh to start over there"
                )
            old_train = old.get("train", {})
            changed = [k for k in RESUME_KEYS if k in old_train and old_train[k] != info["train"][k]]
            if changed and (self.run_dir / "checkpoints").exists():
                raise TegakiError(
                    f"{self.run_dir} was trained with other {', '.join(changed)}; resuming would not continue "
                    "the same run. Use the same settings, another --out, or --fresh"
                )
        if self.dist.is_main:
            atomic_write_json(path, info)

    def _inside_run(self, path: Path) -> bool:
        return Path(path).resolve().is_relative_to(self.run_dir.resolve())

    def _build_data(self) -> None:
        cfg, d = self.cfg, self.dist
        train_windows = TokenWindows(self.data_dir, "train", self.block_size)
        self.val_windows = TokenWindows(self.data_dir, "val", self.block_size)
        if len(self.val_windows) == 0:
            raise TegakiError(
                f"the validation split has {self.val_windows.tokens:,} tokens, fewer than one block of "
                f"{self.block_size + 1}; lower --block-size or raise --val-fraction"
            )
        self.loader = BatchLoader(train_windows, cfg.batch_size, cfg.seed, d.rank, d.world_size)
        self.token_bytes = token_byte_lengths(self.tokenizer, self.model_config.vocab_size).to(self.device)

    def _build_model(self) -> None:
        cfg, d = self.cfg, self.dist
        # Refused with the figure before a byte is allocated: weights, gradients and AdamW's two
        # moments are four float32 numbers a parameter.
        check_fits(parameter_count(self.model_config), 16, self.device, f"training this {cfg.preset} model")
        torch.manual_seed(cfg.seed)  # every rank builds the same initial weights
        model = GPT(self.model_config).to(self.device)
        self.raw_model = model
        if cfg.fsdp:
            if not d.enabled:
                self.say("note: --fsdp with one process shards nothing; it still runs, through FSDP2")
                init_single_process_group(self.device)
            from torch.distributed.fsdp import fully_shard

            for block in model.blocks:
                fully_shard(block)  # each block's weights live in shards, gathered just for its turn
            fully_shard(model)
        elif d.enabled:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=device_ids)
        self.model = model
        self.optimizer = build_optimizer(model, cfg, self.device)
        self.forward = torch.compile(model) if cfg.compile else model

    # --- state ----------------------------------------------------------------------------------
    def _state_dicts(self) -> tuple[dict, dict]:
        """Full (unsharded) model and optimizer states; a collective call under DDP/FSDP."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(self.model, options=options)
        optim_state = get_optimizer_state_dict(self.model, self.optimizer, options=options)
        return model_state, optim_state

    def save(self, step: int, val_loss: float | None) -> None:
        model_state, optim_state = self._state_dicts()
        if self.dist.is_main:
            # Tensors, ints, floats, strings and lists only: optimizer.pt then loads with
            # torch.load(weights_only=True), which runs no code from a downloaded run folder.
            kind, keys, pos, has_gauss, gauss = np.random.get_state()
            version, py_state, py_gauss = random.getstate()
            rng = {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
                "python": [version, list(py_state), py_gauss],
            }
            extra = {
                "loader": self.loader.state_dict(),
                "val_loss": val_loss,
                "train_config": self.cfg.to_dict(),
                "tokenizer": self.tokenizer_ref,
                "time": time.time(),
            }
            path = save_checkpoint(
                self.run_dir,
                step,
                model_state,
                {"optimizer": optim_state, "rng": rng},
                extra,
                self.model_config,
                self.cfg.keep,
            )
            self.say(f"saved checkpoint {path}")
        self.last_saved = step
        self.dist.barrier()

    def resume(self) -> int:
        """Load the newest intact checkpoint, if any; the step to continue from (0: a new run)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        found = find_checkpoint(self.run_dir, say=self.say) if self.dist.is_main else None
        found = broadcast_object(str(found) if found else None, self.dist)
        if found is None:
            return 0
        folder = Path(found)
        state = read_resume_state(folder)
        tensors = read_model_tensors(folder)
        check_shapes(self.raw_model.state_dict(), tensors, where=f"checkpoint {folder}")
        if self.model_config.tie_embeddings:  # the head's tensors are the embedding's
            tensors |= {"lm_head" + k.removeprefix("wte"): v for k, v in tensors.items() if k.startswith("wte.")}
        saved = read_optimizer_state(folder)
        options = StateDictOptions(full_state_dict=True, cpu_offload=False)
        set_model_state_dict(self.model, tensors, options=options)
        # a run saved before attention had one qkv projection: its AdamW moments are joined like its weights
        set_optimizer_state_dict(
            self.model, self.optimizer, upgrade_optimizer_state(saved["optimizer"]), options=options
        )
        rng = saved["rng"]
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        kind, keys, pos, has_gauss, gauss = rng["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        version, py_state, py_gauss = rng["python"]
        random.setstate((version, tuple(py_state), py_gauss))
        if self.dist.rank != 0:  # rank 0's RNG was saved; the others take their own stream
            torch.manual_seed(self.cfg.seed + 1000 * self.dist.rank + state["step"])
        self.loader.load_state_dict(state["loader"])
        self.say(f"resuming from {folder} (step {state['step']}); pass --fresh to start over")
        return int(state["step"])

    # --- the loop -------------------------------------------------------------------------------
    def autocast(self):
        if self.dtype == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _sync_context(self, last_micro: bool):
        """Under DDP, gradients are averaged across ranks in backward; skip that on every micro
        step but the last (the sum is the same, and one all-reduce is cheaper than grad_accum)."""
        if not self.dist.enabled or last_micro:
            return contextlib.nullcontext()
        if hasattr(self.model, "no_sync"):
            return self.model.no_sync()
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2
            self.model.set_requires_gradient_sync(False)
        return contextlib.nullcontext()

    def train_step(self, step: int) -> tuple[float, float, float]:
        """One optimizer step. Returns (mean loss across ranks, grad norm, lr)."""
        cfg = self.cfg
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            last = micro == cfg.grad_accum - 1
            if last and hasattr(self.model, "set_requires_gradient_sync"):
                self.model.set_requires_gradient_sync(True)
            inputs, targets = self.loader.next_batch()  # (B, T) each, on the CPU
            self._check_ids(inputs, targets)
            if self.on_batch is not None:
                self.on_batch(step, micro, inputs, targets)
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            with self._sync_context(last), self.autocast():
                _, loss = self.forward(inputs, targets)
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach().float()
        loss_mean = loss_sum / cfg.grad_accum
        if self.dist.enabled:
            torch.distributed.all_reduce(loss_mean, op=torch.distributed.ReduceOp.SUM)
            loss_mean = loss_mean / self.dist.world_size
        # --grad-clip 0: no clipping (the norm is still measured, for the NaN guard and the log)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip or float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
            grad_norm = grad_norm.full_tensor()
        loss_value, norm_value = float(loss_mean), float(grad_norm)
        lr = lr_at(step, cfg)
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            return loss_value, norm_value, lr  # the caller stops before the weights are touched
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, norm_value, lr

    def _check_ids(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Token ids past the vocabulary come from damaged shards (or another tokenizer's): say so,
        instead of an index error deep in the embedding."""
        largest = max(int(inputs.max()), int(targets.max())) if targets.numel() else 0
        if largest >= self.model_config.vocab_size:
            raise TegakiError(
                f"the token shards in {self.data_dir} hold id {largest}, outside the vocabulary of "
                f"{self.model_config.vocab_size}: they are damaged or were prepared with another tokenizer. "
                "Prepare them again (`tegaki prepare`, or delete the run's data/ folder)"
            )

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """(validation loss in nats per token, bits per byte) over the same batches every time."""
        self.model.eval()
        sums = torch.zeros(3, device=self.device, dtype=torch.float64)  # loss sum, tokens, bytes
        for inputs, targets in validation_batches(
            self.val_windows, self.cfg.batch_size, self.cfg.eval_batches, self.dist.rank, self.dist.world_size
        ):
            self._check_ids(inputs, targets)
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            with self.autocast():
                logits = self.forward(inputs)  # (B, T, V)
            losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")  # (B*T,)
            learned = targets.flatten() != -100  # targets of -100 (fine-tuning's prompts) count for nothing
            count = learned.sum().double()
            byte_count = (self.token_bytes[targets.flatten().clamp(min=0)] * learned).sum().double()
            sums += torch.stack([losses.sum().double(), count, byte_count])
        if self.dist.enabled:
            torch.distributed.all_reduce(sums)
        loss = float(sums[0] / sums[1])
        bpb = float(sums[0] / (math.log(2) * sums[2])) if sums[2] > 0 else float("nan")
        return loss, bpb

    @torch.no_grad()
    def sample(self, step: int) -> str:
        """A short continuation of the end-of-text token (a fresh start), at most the model's context
        long (a learned position table has no row past it). The training RNG stream is left untouched."""
        self.raw_model.eval()
        eot = self.tokenizer.eot_id
        start = torch.tensor([[eot if eot is not None else 0]], device=self.device)
        length = min(self.cfg.sample_tokens, self.model_config.block_size - 1)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.cfg.seed + step)
            with self.autocast():
                out = self.raw_model.generate(start, length, temperature=0.8, top_k=50)
        ids = [i for i in out[0, 1:].tolist() if i < self.tokenizer.vocab_size]
        return self.tokenizer.decode(ids)

    def train(self) -> dict[str, Any]:
        """Set up, resume, and take the steps up to --max-steps; the last step's numbers. The run
        folder is locked first (one process per run folder, whatever sets it up), and released
        however this ends."""
        if self.dist.is_main:
            self.lock.acquire()  # before anything is read or written
            if self.lock.took_over:
                self.say(f"note: took over the lock of process {self.lock.took_over}, which is no longer running")
        try:
            return self._train()
        finally:
            self.lock.release()

    def _train(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.setup_hook is not None:
            self.setup_hook(self)
        else:
            self.setup()
        start_step = self.resume()
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", start_step, enabled=self.dist.is_main)
        tokens_per_step = cfg.batch_size * self.block_size * cfg.grad_accum * self.dist.world_size
        n_params = self.raw_model.num_parameters()
        flops_token = flops_per_token(self.model_config, self.block_size)
        # Measuring the peak draws random matrices: from a forked generator, so that the stream a
        # resumed run restored (dropout) is the uninterrupted run's, the first call in a process or not.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            peak = peak_flops(self.device, self.dtype)[0] * self.dist.world_size
        if start_step == 0:
            shape = (
                f"{cfg.batch_size} x {self.block_size}"
                + (f" x {cfg.grad_accum} accum" if cfg.grad_accum > 1 else "")
                + (f" x {self.dist.world_size} ranks" if self.dist.enabled else "")
            )
            trainable = sum(p.numel() for p in self.raw_model.parameters() if p.requires_grad)
            frozen = sum(p.numel() for p in self.raw_model.parameters() if not p.requires_grad)
            trains = f" ({trainable:,} train, {frozen:,} frozen: adapters only)" if frozen else ""
            self.say(
                f"model: {self.cfg.preset}, {n_params / 1e6:.2f}M parameters{trains}; {tokens_per_step:,} tokens "
                f"per step ({shape}); {self.device} {self.dtype}"
            )
        if cfg.warmup is None and warmup_steps(cfg) < DEFAULT_WARMUP and start_step < cfg.max_steps:
            self.say(
                f"note: warmup shortened to {warmup_steps(cfg)} steps (a tenth of --max-steps {cfg.max_steps}); "
                "set --warmup to choose"
            )
        bar = progress_bar(cfg.max_steps, start_step, enabled=self.dist.is_main and cfg.progress)
        last_val, result = None, {"step": start_step}
        if start_step >= cfg.max_steps:
            self.say(f"{self.run_dir} has already trained {start_step} steps (--max-steps {cfg.max_steps})")
        tb = tensorboard_writer(self.run_dir) if self.dist.is_main else None
        self.started = True  # from here on, the run folder holds work worth keeping
        self.last_saved = start_step or None
        step = start_step
        try:
            for step in range(start_step, cfg.max_steps):
                t0 = time.perf_counter()
                with explain_out_of_memory(cfg, self.device):
                    loss, grad_norm, lr = self.train_step(step)
                synchronize(self.device)
                dt = time.perf_counter() - t0
                done = step + 1
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    bar.close()
                    self._stop_on_nan(done, loss, grad_norm)
                tok_s = tokens_per_step / dt
                utilisation = mfu(tok_s, flops_token, peak)
                self.metrics.write(
                    {
                        "step": done,
                        "loss": loss,
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "tokens_per_s": round(tok_s, 1),
                        "mfu": round(utilisation, 4),
                        "dt": round(dt, 4),
                    }
                )
                if tb is not None:
                    tb.add_scalar("train/loss", loss, done)
                    tb.add_scalar("train/lr", lr, done)
                bar.set_postfix_str(f"loss {loss:.3f}  {tok_s:,.0f} tok/s  mfu {utilisation:.1%}")
                bar.update(1)
                if done % cfg.eval_every == 0 or done == cfg.max_steps:
                    val_loss, bpb = self.evaluate()
                    last_val = val_loss
                    self.metrics.write({"step": done, "kind": "val", "val_loss": val_loss, "val_bpb": bpb})
                    if tb is not None:
                        tb.add_scalar("val/loss", val_loss, done)
                        tb.add_scalar("val/bpb", bpb, done)
                    self.say(f"step {done}: train loss {loss:.4f}, val loss {val_loss:.4f}, {bpb:.3f} bits/byte")
                # The checkpoint first: what follows is optional and must never cost the step.
                if done % cfg.save_every == 0 or done == cfg.max_steps:
                    self.save(done, last_val)
                # Under FSDP every rank must take part in each forward (the weights are gathered from all).
                if cfg.sample_every and done % cfg.sample_every == 0 and (self.dist.is_main or cfg.fsdp):
                    self._write_sample(done)
                result = {"step": done, "loss": loss, "val_loss": last_val}
        except KeyboardInterrupt:
            bar.close()
            if self.dist.is_main:
                kept = (
                    f"the last checkpoint is step {self.last_saved}"
                    if self.last_saved
                    else f"no checkpoint was saved yet (every --save-every {cfg.save_every} steps)"
                )
                self.say(
                    f"stopped during step {step + 1}; {kept}. Run the same command again to "
                    + ("resume from it" if self.last_saved else "start over")
                )
            raise
        bar.close()
        self.metrics.close()
        if tb is not None:
            tb.close()
        if self.dist.is_main and self.plot_losses is not None:
            self._draw_losses()
        return result

    def _write_sample(self, step: int) -> None:
        """A sample into the log; one that fails is reported, and training goes on."""
        try:
            text = self.sample(step)
        except Exception as e:  # noqa: BLE001 - a sample is for a person to look at, never worth a run
            self.say(f"warning: the sample at step {step} failed ({type(e).__name__}: {e}); training goes on")
            return
        if self.dist.is_main:
            self.metrics.write({"step": step, "kind": "sample", "text": text})
            self.say(f"--- sample at step {step} ---\n{text}\n---")

    def _draw_losses(self) -> None:
        """The loss curves at the end; a failure (no display back end, a full disk) is only reported."""
        try:
            plot = self.plot_losses(self.run_dir)
        except Exception as e:  # noqa: BLE001 - the run is done and saved; a picture is optional
            self.say(
                f"warning: could not draw the loss curves ({type(e).__name__}: {e}); "
                f"`tegaki plot {self.run_dir}` draws them later"
            )
            return
        if plot is not None:
            self.say(f"loss curve: {plot}")

    def _stop_on_nan(self, step: int, loss: float, grad_norm: float) -> None:
        try:
            good = find_checkpoint(self.run_dir, say=lambda m: None)
        except TegakiError:
            good = None
        where = f"the last good checkpoint is {good}" if good else "no checkpoint was written yet"
        raise TegakiError(
            f"training stopped at step {step}: the loss is {loss} and the gradient norm {grad_norm} "
            "(not finite). "
            f"The weights were not updated with it; {where}. Lower --lr, raise --warmup, or use --dtype fp32"
        )


def train(
    cfg: TrainConfig,
    on_batch: BatchHook | None = None,
    plot_losses: PlotHook | None = None,
    setup: SetupHook | None = None,
) -> dict[str, Any]:
    """Train (or resume) the run described by `cfg`; returns the last step's numbers.
    `on_batch`, `plot_losses`, `setup`: the hooks of `Run` (described at the top of this file)."""
    out = Path(cfg.out)
    created = not out.exists()
    was_empty = out.is_dir() and not any(out.iterdir())
    run = Run(cfg, on_batch=on_batch, plot_losses=plot_losses, setup=setup)
    try:
        with flushed_subnormals(cfg.device):
            return run.train()
    except TegakiError:
        # Refused before any step (bad preset, data, --set, ...): leave no half-made --out behind,
        # nor a mark alone in a folder that was empty (it would keep other commands out).
        if created and not run.started and run.dist.is_main:
            shutil.rmtree(out, ignore_errors=True)
        elif was_empty and not run.started and run.dist.is_main and [p.name for p in out.iterdir()] == [MADE_BY_FILE]:
            (out / MADE_BY_FILE).unlink()
        raise
    finally:
        if run.dist.enabled or cfg.fsdp:
            destroy_process_group()
