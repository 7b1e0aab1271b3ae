"""The Trainer callbacks of every training: when to checkpoint beyond ``save_steps`` (by time, and on a stop
request), tokens per second and the estimate, the test-only fault point, and checkpointing some layers only."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from sft_pipeline import faults
from sft_pipeline.training import stop
from sft_pipeline.training.checkpoints import seal_checkpoint

log = logging.getLogger("sft_pipeline.train")


class Checkpoint(TrainerCallback):
    """Save every ``save_minutes`` minutes too (steps alone can be hours apart on a long GPU run), and at once when
    a stop is requested (``stop.request``: training then stops after that checkpoint; ``stopped_at`` says where).
    Every checkpoint is sealed, once every rank has written its part."""

    def __init__(self, save_minutes: float | None):
        self.save_minutes, self.last, self.stopped_at = save_minutes, time.monotonic(), None

    def on_step_end(self, args, state, control, **kw):
        due = bool(self.save_minutes) and time.monotonic() - self.last >= self.save_minutes * 60
        halt = stop.requested() is not None
        if args.world_size > 1:  # all ranks save and stop at the same step: rank 0's clock, any rank's request
            flags = torch.tensor([int(due and state.is_world_process_zero), int(halt)], device=args.device)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            due, halt = bool(flags[0].item()), bool(flags[1].item())
        if due or halt:
            control.should_save = True
        if halt:
            control.should_training_stop = True
            self.stopped_at = state.global_step

    def on_save(self, args, state, control, **kw):
        self.last = time.monotonic()
        if args.world_size > 1:  # seal once every rank has written its part (rank 0 the weights, each its RNG)
            torch.distributed.barrier()
        if state.is_world_process_zero:
            seal_checkpoint(Path(args.output_dir) / f"checkpoint-{state.global_step}")


class Throughput(TrainerCallback):
    """Trained tokens per second (padding excluded), and an estimate of time and cost after warm-up, into
    ``metrics``.

    ``tokens_per_second``: the whole training call; ``tokens_per_second_warm``: from the end of warm-up to the
    end of the last step, without the checkpoint and evaluation Trainer runs after it (what ``plan`` and the
    scaling bench read as the steady rate)."""

    warm = 3

    def __init__(self, training, metrics: dict, total_tokens: int):
        self.price, self.metrics, self.total_tokens = training.price_per_hour, metrics, total_tokens

    def on_train_begin(self, args, state, control, **kw):
        self.metrics["start_step"] = state.global_step
        self.t0, self.n0 = time.perf_counter(), state.num_input_tokens_seen
        self.tw = self.last = None

    def on_step_end(self, args, state, control, **kw):
        done = state.global_step - self.metrics["start_step"]
        if state.global_step >= state.max_steps:  # the steady rate ends here, before the final save and eval
            _sync()
            self.last = time.perf_counter()
        if done == self.warm:
            _sync()
            self.tw, self.nw = time.perf_counter(), state.num_input_tokens_seen
        elif self.tw and done == 2 * self.warm:
            self._estimate(state)

    def _estimate(self, state) -> None:
        rate = (state.num_input_tokens_seen - self.nw) / (time.perf_counter() - self.tw)
        total = self.total_tokens
        left = max(total - state.num_input_tokens_seen, 0)
        est = {"tokens_per_second": round(rate), "tokens": total, "hours": round(left / rate / 3600, 3)}
        if self.price is not None:
            est["cost"] = round(est["hours"] * self.price, 2)
        self.metrics["estimate"] = est
        log.info("estimate: %s tokens at %s tok/s -> %.2f h%s", f"{total:,}", f"{est['tokens_per_second']:,}",
                 est["hours"], f", cost {est['cost']}" if "cost" in est else "")

    def on_train_end(self, args, state, control, **kw):
        metrics = self.metrics
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            metrics["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        now = time.perf_counter()
        metrics["train_seconds"] = round(now - self.t0, 2)
        metrics["tokens"] = int(state.num_input_tokens_seen - self.n0)
        metrics["tokens_per_second"] = round(metrics["tokens"] / (now - self.t0), 1)
        if self.tw and state.num_input_tokens_seen > self.nw:  # steady state: warm-up, final save and eval excluded
            end = self.last if self.last and self.last > self.tw else now
            metrics["tokens_per_second_warm"] = round((state.num_input_tokens_seen - self.nw) / (end - self.tw), 1)
        metrics["steps"] = state.global_step


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Fault(TrainerCallback):
    """Test-only fault point ``train:step=N`` (after N steps and their checkpoint); off by default."""

    def on_step_begin(self, args, state, control, **kw):
        faults.point("train", f"step={state.global_step}")


class Selective(TrainerCallback):
    """Checkpoint only the first ``checkpointed`` decoder layers (Trainer turns it on for all at train start)."""

    def __init__(self, layers, checkpointed: int):
        self.layers, self.checkpointed = layers, checkpointed

    def on_train_begin(self, args, state, control, **kw):
        for i, layer in enumerate(self.layers):
            if hasattr(layer, "gradient_checkpointing"):
                layer.gradient_checkpointing = i < self.checkpointed


def standard(training, metrics: dict, total_tokens: int) -> list:
    """The callbacks every training runs, in this order."""
    return [Checkpoint(training.save_minutes), Throughput(training, metrics, total_tokens), Fault()]
