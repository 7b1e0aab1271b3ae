"""Out of memory in training: restart from the last sealed checkpoint at half the micro-batch and twice the
gradient accumulation (the same effective batch), down to 1. The one fallback of both paths: one process
(``run.train_until_done``) and a group of ranks (``launch.run_ranks``, which restarts the whole group).

The lowered batch is saved in the work dir (``batch.json``), so a rerun keeps it; a group keeps it only for the same
number of processes.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, TypeVar

from sft_pipeline.errors import StageFailure
from sft_pipeline.store import write_json_atomic
from sft_pipeline.training.checkpoints import last_checkpoint

log = logging.getLogger("sft_pipeline.train")
BATCH_FILE = "batch.json"
T = TypeVar("T")


class OutOfMemory(Exception):
    """Training ran out of memory at ``step`` with the batch ``plan`` (a dict: ``BatchPlan.to_dict``); raised once
    the attempt's memory is given back."""

    def __init__(self, step: int | None, plan: dict, error: str):
        super().__init__(f"train: out of memory at step {step}: {error}")
        self.step, self.plan, self.error = step, plan, error


def saved(work: str | Path, world: int = 1) -> dict | None:
    """The micro-batch and accumulation an earlier fallback lowered to (kept for reruns), or None. One made for
    another number of processes is not used: the plan is made afresh."""
    path = Path(work) / BATCH_FILE
    if not path.is_file():
        return None
    batch = json.loads(path.read_text())
    return batch if batch.get("world_size", 1) == world else None


def halve(work: str | Path, plan: dict, step: int | None, resume: str | None, error: str, world: int = 1) -> dict:
    """Half the micro-batch, twice the accumulation: the same effective batch. Saved so a rerun keeps it.

    ``plan``: the batch that ran out of memory, with the earlier fallbacks under ``oom_fallbacks``."""
    bs, ga = plan["per_device_batch_size"], plan["gradient_accumulation_steps"]
    if bs == 1:
        more = ", use training.strategy=fsdp" if world > 1 else ""
        raise StageFailure(f"train: out of memory at training.per_device_batch_size=1 ({error}); lower "
                           f"format.max_length, turn on training.gradient_checkpointing{more}, or use a bigger GPU")
    if bs % 2 == 0:
        new = {"per_device_batch_size": bs // 2, "gradient_accumulation_steps": ga * 2}
    else:  # an odd micro-batch goes to 1 × (bs × ga): still the same effective batch
        new = {"per_device_batch_size": 1, "gradient_accumulation_steps": ga * bs}
    fallback = {"at_step": step, "from": {"per_device_batch_size": bs, "gradient_accumulation_steps": ga},
                "to": dict(new), "resumed_from": Path(resume).name if resume else None, "error": error[:300]}
    batch = {**new, "oom_fallbacks": plan.get("oom_fallbacks", []) + [fallback]}
    if world > 1:
        fallback["world_size"] = batch["world_size"] = world
    write_json_atomic(Path(work) / BATCH_FILE, batch)
    return batch


def until_done(attempt: Callable[[dict | None], T], work: str | Path, world: int = 1,
               logger: logging.Logger = log) -> T:
    """``attempt(batch)`` until it does not run out of memory (``OutOfMemory``), halving the batch each time.

    ``batch``: None (plan afresh) or the lowered micro-batch, accumulation and fallbacks so far."""
    batch = saved(work, world)
    if batch:
        logger.warning("train: micro-batch %d x accumulation %d, kept from an earlier out-of-memory fallback",
                       batch["per_device_batch_size"], batch["gradient_accumulation_steps"])
    while True:
        try:
            return attempt(batch)
        except OutOfMemory as oom:
            plan = {**oom.plan, "oom_fallbacks": (batch or {}).get("oom_fallbacks", [])}
            step, error = oom.step, oom.error
        batch = halve(work, plan, step, last_checkpoint(work, logger), error, world)
        micro, accumulation = batch["per_device_batch_size"], batch["gradient_accumulation_steps"]
        logger.warning("train: out of memory at step %s (%s); retrying from %s with micro-batch %d x accumulation "
                       "%d%s (same effective batch %d)", step, error, batch["oom_fallbacks"][-1]["resumed_from"] or
                       "the start", micro, accumulation, f" per rank, {world} ranks" if world > 1 else "",
                       micro * accumulation * world)
