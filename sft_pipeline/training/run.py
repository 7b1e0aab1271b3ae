"""One training, the same function on both paths: the train stage's own process (``train_until_done``, which adds
the out-of-memory fallback) and every rank of a group (``rank_train``; the launcher restarts the group on out of
memory). Then its metrics (``finish_metrics``) and its files (``save_trained``).

``train`` ends in one of three ways: it returns (trainer, metrics); it raises ``fallback.OutOfMemory`` (the
attempt's memory given back); or, once a stop was requested (``stop.request``, SIGTERM), it raises
``TrainingInterrupted`` after a sealed checkpoint at the step it reached, so no half-trained adapter is ever saved.
"""
from __future__ import annotations

import gc
import json
import logging
from pathlib import Path

from sft_pipeline.errors import TrainingInterrupted, is_oom
from sft_pipeline.training import fallback, stop
from sft_pipeline.training.checkpoints import last_checkpoint
from sft_pipeline.training.job import Rank, TrainData, TrainJob, load_data

log = logging.getLogger("sft_pipeline.train")
LAST = "last"  # resume from the newest intact checkpoint in the job's work dir, looked up once the trainer is built
PLAN_KEYS = ("per_device_batch_size", "gradient_accumulation_steps", "effective_batch")


def train(job: TrainJob, data: TrainData | None = None, *, rank: Rank = Rank(), batch: dict | None = None,
          resume: str | None = LAST, callbacks=(), token: str | None = None, logger: logging.Logger = log):
    """Train ``job`` from ``resume`` (a checkpoint, None for the start, or ``LAST``) with ``batch`` (an
    out-of-memory fallback's micro-batch, accumulation and fallbacks so far, or None to plan); returns
    (trainer, metrics)."""
    from sft_pipeline.training.build import build_trainer

    data = data or load_data(job)
    if stop.requested():  # asked before the first step: nothing new to save
        checkpoint = last_checkpoint(job.work, logger) if resume == LAST else resume
        raise TrainingInterrupted(_step(checkpoint), checkpoint, stop.requested())
    trainer, metrics = build_trainer(job, data, rank, batch=batch, callbacks=callbacks, token=token)
    if resume == LAST:
        resume = last_checkpoint(job.work, logger)
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    except Exception as exc:  # noqa: BLE001 - only out of memory is handled here
        if not is_oom(exc):
            raise
        error = f"{type(exc).__name__}: {exc}"
    else:
        _raise_if_stopped(trainer, job, rank)
        return trainer, finish_metrics(metrics, result, batch, rank, job.training.strategy)
    step, plan = trainer.state.global_step, metrics["batch_plan"]
    trainer.accelerator.free_memory()  # drop every reference to the model and optimizer before trying again
    del trainer
    _collect()
    raise fallback.OutOfMemory(step, plan, error)


def train_until_done(job: TrainJob, data: TrainData | None = None, *, callbacks=(), token: str | None = None,
                     logger: logging.Logger = log):
    """The train stage's own process: ``train`` from the last sealed checkpoint until it does not run out of memory
    (``fallback.until_done``); returns (trainer, metrics)."""
    data = data or load_data(job)

    def attempt(batch):
        return train(job, data, batch=batch, resume=LAST, callbacks=callbacks, token=token, logger=logger)

    return fallback.until_done(attempt, job.work, 1, logger)


def finish_metrics(metrics: dict, result, batch: dict | None, rank: Rank, strategy: str) -> dict:
    """What train_metrics.json holds after training: Trainer's own numbers, where it resumed, the fallbacks, and the
    batch it ran (per rank: micro-batch x accumulation x world_size = the effective batch)."""
    metrics.update(result.metrics)
    metrics["resumed_from_step"] = metrics.get("start_step", 0)
    metrics["oom_fallbacks"] = (batch or {}).get("oom_fallbacks", [])
    if rank.launched:
        metrics.update(world_size=rank.world, strategy=strategy)
    metrics.update({k: metrics["batch_plan"][k] for k in PLAN_KEYS})
    return metrics


def save_trained(trainer, metrics: dict, out: Path, save_model: bool = True) -> None:
    """The adapter, the log history, the metrics and the (token-free) training arguments, into ``out``.

    ``save_model=False``: the adapter is there already (several ranks save it together; rank 0 then calls this).
    """
    if save_model:
        trainer.save_model(str(out / "adapter"))
    (out / "adapter" / "training_args.bin").unlink(missing_ok=True)  # pickled args can hold hub_token
    (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    (out / "train_metrics.json").write_text(json.dumps(metrics, indent=2))
    args_public = {k: v for k, v in trainer.args.to_dict().items() if "token" not in k}
    (out / "training_args.json").write_text(json.dumps(args_public, indent=1, default=str))


def save_ranks(trainer, metrics: dict, out: Path, rank: Rank) -> None:
    """Several ranks: the adapter saved together (FSDP gathers its shards; only rank 0 writes), rank 0's files."""
    if trainer.is_fsdp_enabled:  # gather the sharded adapter into one file (peft's FSDP-QLoRA recipe)
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(out / "adapter"))  # every rank: FSDP gathers; only rank 0 writes
    if rank.rank == 0:
        save_trained(trainer, metrics, out, save_model=False)
    trainer.accelerator.wait_for_everyone()


def _raise_if_stopped(trainer, job: TrainJob, rank: Rank) -> None:
    """``TrainingInterrupted`` when the Checkpoint callback stopped training on a request (every rank alike)."""
    from sft_pipeline.training.callbacks import Checkpoint

    ckpt = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, Checkpoint))
    if ckpt.stopped_at is None:
        return
    if rank.world > 1:  # rank 0 seals after the others wrote their parts: no rank leaves before the seal
        trainer.accelerator.wait_for_everyone()
    raise TrainingInterrupted(ckpt.stopped_at, str(Path(job.work) / f"checkpoint-{ckpt.stopped_at}"),
                              stop.requested() or "stop requested by another rank")


def _step(checkpoint: str | None) -> int | None:
    return int(checkpoint.rsplit("-", 1)[1]) if checkpoint else None


def _collect() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
