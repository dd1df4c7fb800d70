"""The training loop: `Run` holds one run (model, optimizer, data, logs) and `train(cfg)` runs it.

One optimizer step, the whole of what training is:

    for each of grad_accum micro-batches:           # accumulate gradients of a bigger batch
        loss = model(inputs, targets)[1]             # forward under bf16 autocast or in fp32
        (loss / grad_accum).backward()               # DDP/FSDP average gradients across ranks here
    clip the gradient norm to --grad-clip            # one bad batch cannot throw the weights away
    lr = warmup, then cosine or warmup-stable-decay  # `lr_at`
    AdamW step (weight decay on matrices only)       # `build_optimizer`

Around it: validation loss and bits per byte every --eval-every steps, a sample every
--sample-every steps, a NaN/inf guard, `metrics.jsonl`, and checkpoints that resume bit for bit.
The run folder (run.json, the lock, checkpoints with the random generators' states) is
tegaki.checkpoint's; what a run holds before its first step is built by tegaki/train/setup.py.

Three hooks let other code change or watch a run without changing this file:
`setup(run)` builds the run's parts in place of `setup_run` (tegaki/train/setup.py lists them;
`tegaki finetune` loads a pretrained model and instruction records this way),
`on_batch(step, micro, inputs, targets)` sees every training batch (`tegaki compare` hashes them),
and `plot_losses(run_dir)` draws the loss curves at the end (`tegaki train` passes
`tegaki.analysis.plot.plot_run_losses`).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tegaki.checkpoint import (
    MetricsLog,
    find_checkpoint,
    locked_run_folder,
    restore_training_state,
    save_training_state,
    undone_if_refused,
)
from tegaki.data import validation_batches
from tegaki.device import mfu, peak_flops, pick_device, pick_dtype, synchronize
from tegaki.errors import TegakiError
from tegaki.train.distributed import broadcast_object, destroy_process_group, init_distributed
from tegaki.train.report import explain_out_of_memory, progress_bar, tensorboard_writer
from tegaki.train.schedule import DEFAULT_WARMUP, flops_per_token, lr_at, warmup_steps
from tegaki.train.settings import TrainConfig, check_settings
from tegaki.train.setup import flushed_subnormals, setup_run

# on_batch(step, micro, inputs, targets): every micro-batch this process trains on, before its forward
BatchHook = Callable[[int, int, torch.Tensor, torch.Tensor], None]
# plot_losses(run_dir) -> the picture written (None: none drawn)
PlotHook = Callable[[Path], "Path | None"]
# setup(run): builds the run's model and data instead of setup_run (described at the top of this file)
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
        self.setup_hook = setup or setup_run
        self.run_dir = Path(cfg.out)
        wants_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
        self.dist = init_distributed("cuda" if wants_cuda else "cpu")
        self.device = pick_device(cfg.device, self.dist.local_rank if self.dist.enabled else None)
        self.dtype = pick_dtype(cfg.dtype, self.device)
        self.say = self._say if self.dist.is_main else (lambda *a, **k: None)
        self.started = False  # set once setup is done and the steps begin

    def _say(self, message: str) -> None:
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stderr)

    # --- checkpoints ----------------------------------------------------------------------------
    def save(self, step: int, val_loss: float | None) -> None:
        extra = {
            "loader": self.loader.state_dict(),
            "val_loss": val_loss,
            "train_config": self.cfg.to_dict(),
            "tokenizer": self.tokenizer_ref,
            "time": time.time(),
        }
        path = save_training_state(
            self.run_dir,
            step,
            self.model,
            self.optimizer,
            extra,
            self.model_config,
            self.cfg.keep,
            write=self.dist.is_main,
        )
        if path is not None:
            self.say(f"saved checkpoint {path}")
        self.last_saved = step
        self.dist.barrier()

    def resume(self) -> int:
        """Load the newest intact checkpoint, if any; the step to continue from (0: a new run)."""
        found = find_checkpoint(self.run_dir, say=self.say) if self.dist.is_main else None
        found = broadcast_object(str(found) if found else None, self.dist)
        if found is None:
            return 0
        folder = Path(found)
        state = restore_training_state(folder, self.model, self.raw_model, self.optimizer)
        if self.dist.rank != 0:  # rank 0's RNG was saved; the others take their own stream
            torch.manual_seed(self.cfg.seed + 1000 * self.dist.rank + state["step"])
        self.loader.load_state_dict(state["loader"])
        self.say(f"resuming from {folder} (step {state['step']}); pass --fresh to start over")
        return int(state["step"])

    # --- one step -------------------------------------------------------------------------------
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

    # --- the loop -------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Set up, resume, and take the steps up to --max-steps; the last step's numbers. The run
        folder is locked first (one process per run folder, whatever sets it up), and released
        however this ends."""
        with locked_run_folder(self.run_dir, self.say, enabled=self.dist.is_main):
            self.setup_hook(self)
            start_step = self.resume()
            self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", start_step, enabled=self.dist.is_main)
            self._describe(start_step)
            return self._steps(start_step)

    def _describe(self, start_step: int) -> None:
        """What is about to train, said once at the start of a run, and a warmup cut short."""
        cfg = self.cfg
        if start_step == 0:
            shape = (
                f"{cfg.batch_size} x {self.block_size}"
                + (f" x {cfg.grad_accum} accum" if cfg.grad_accum > 1 else "")
                + (f" x {self.dist.world_size} ranks" if self.dist.enabled else "")
            )
            self.say(
                f"model: {cfg.preset}, {self.raw_model.num_parameters() / 1e6:.2f}M parameters; "
                f"{self.tokens_per_step:,} tokens per step ({shape}); {self.device} {self.dtype}"
            )
        if cfg.warmup is None and warmup_steps(cfg) < DEFAULT_WARMUP and start_step < cfg.max_steps:
            self.say(
                f"note: warmup shortened to {warmup_steps(cfg)} steps (a tenth of --max-steps {cfg.max_steps}); "
                "set --warmup to choose"
            )
        if start_step >= cfg.max_steps:
            self.say(f"{self.run_dir} has already trained {start_step} steps (--max-steps {cfg.max_steps})")

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.block_size * self.cfg.grad_accum * self.dist.world_size

    def _steps(self, start_step: int) -> dict[str, Any]:
        """The steps from `start_step` to --max-steps, each logged, validated and saved on its turn."""
        cfg = self.cfg
        # Measuring the peak draws random matrices: from a forked generator, so that the stream a
        # resumed run restored (dropout) is the uninterrupted run's, the first call in a process or not.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            self.peak = peak_flops(self.device, self.dtype)[0] * self.dist.world_size
        self.flops_token = flops_per_token(self.model_config, self.block_size)
        self.bar = progress_bar(cfg.max_steps, start_step, enabled=self.dist.is_main and cfg.progress)
        self.tb = tensorboard_writer(self.run_dir) if self.dist.is_main else None
        self.started = True  # from here on, the run folder holds work worth keeping
        self.last_saved = start_step or None
        self.last_val, result, step = None, {"step": start_step}, start_step
        try:
            for step in range(start_step, cfg.max_steps):
                result = self._one_step(step)
        except KeyboardInterrupt:
            self.bar.close()
            self._say_interrupted(step + 1)
            raise
        self.bar.close()
        self.metrics.close()
        if self.tb is not None:
            self.tb.close()
        if self.dist.is_main and self.plot_losses is not None:
            self._draw_losses()
        return result

    def _one_step(self, step: int) -> dict[str, Any]:
        """Step `step`, then what falls due after it: the log, validation, a checkpoint, a sample."""
        cfg = self.cfg
        t0 = time.perf_counter()
        with explain_out_of_memory(cfg, self.device):
            loss, grad_norm, lr = self.train_step(step)
        synchronize(self.device)
        dt = time.perf_counter() - t0
        done = step + 1
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.bar.close()
            self._stop_on_nan(done, loss, grad_norm)
        self._log_step(done, loss, grad_norm, lr, dt)
        if done % cfg.eval_every == 0 or done == cfg.max_steps:
            self._validate(done, loss)
        # The checkpoint first: what follows is optional and must never cost the step.
        if done % cfg.save_every == 0 or done == cfg.max_steps:
            self.save(done, self.last_val)
        # Under FSDP every rank must take part in each forward (the weights are gathered from all).
        if cfg.sample_every and done % cfg.sample_every == 0 and (self.dist.is_main or cfg.fsdp):
            self._write_sample(done)
        return {"step": done, "loss": loss, "val_loss": self.last_val}

    def _log_step(self, done: int, loss: float, grad_norm: float, lr: float, dt: float) -> None:
        tok_s = self.tokens_per_step / dt
        utilisation = mfu(tok_s, self.flops_token, self.peak)
        record = {"step": done, "loss": loss, "lr": lr, "grad_norm": grad_norm}
        record |= {"tokens_per_s": round(tok_s, 1), "mfu": round(utilisation, 4), "dt": round(dt, 4)}
        self.metrics.write(record)
        if self.tb is not None:
            self.tb.add_scalar("train/loss", loss, done)
            self.tb.add_scalar("train/lr", lr, done)
        self.bar.set_postfix_str(f"loss {loss:.3f}  {tok_s:,.0f} tok/s  mfu {utilisation:.1%}")
        self.bar.update(1)

    def _validate(self, done: int, loss: float) -> None:
        val_loss, bpb = self.evaluate()
        self.last_val = val_loss
        self.metrics.write({"step": done, "kind": "val", "val_loss": val_loss, "val_bpb": bpb})
        if self.tb is not None:
            self.tb.add_scalar("val/loss", val_loss, done)
            self.tb.add_scalar("val/bpb", bpb, done)
        self.say(f"step {done}: train loss {loss:.4f}, val loss {val_loss:.4f}, {bpb:.3f} bits/byte")

    def _say_interrupted(self, step: int) -> None:
        if not self.dist.is_main:
            return
        kept = (
            f"the last checkpoint is step {self.last_saved}"
            if self.last_saved
            else f"no checkpoint was saved yet (every --save-every {self.cfg.save_every} steps)"
        )
        self.say(
            f"stopped during step {step}; {kept}. Run the same command again to "
            + ("resume from it" if self.last_saved else "start over")
        )

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
    run = Run(cfg, on_batch=on_batch, plot_losses=plot_losses, setup=setup)
    try:
        refused = undone_if_refused(run.run_dir, enabled=run.dist.is_main, started=lambda: run.started)
        with refused, flushed_subnormals(cfg.device):
            return run.train()
    finally:
        if run.dist.enabled or cfg.fsdp:
            destroy_process_group()
