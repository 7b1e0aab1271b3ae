"""One rank of a data-parallel training: ``python -m sft_pipeline.rank_train JOB.json``, started by torchrun.

``sft_pipeline.launch.run_ranks`` writes the job (paths and config sections, no secret) and starts torchrun; every
rank loads its own 4-bit model on its GPU (``device_map={"": local_rank}``), reads the format stage's token ids
(no rank tokenizes), and trains with ``build_trainer`` (DDP, or FSDP with ``training.strategy=fsdp``); Trainer
shards the batches. Rank 0 writes the adapter and metrics into ``job["out"]``. ``@record`` writes a failing
rank's error and traceback where torchrun finds it; ``launch.explain`` turns it into one line.
"""
from __future__ import annotations

import faulthandler
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

from sft_pipeline.launch import HEARTBEATS, TOKEN_ENV
from sft_pipeline.parallel import parallel_args

log = logging.getLogger("sft_pipeline.rank_train")


def _watch_parent() -> None:
    """Exit when torchrun goes away (killed with the flow): an orphan rank must not go on writing checkpoints."""
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(2)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def _heartbeat_callback(work: Path, rank: int):
    from transformers import TrainerCallback

    beat = work / HEARTBEATS / f"rank-{rank}"
    beat.parent.mkdir(parents=True, exist_ok=True)
    beat.write_text(str(os.getpid()))

    class Heartbeat(TrainerCallback):
        """Touch this rank's file at every step and evaluation step: the launcher's watchdog reads the times."""

        def _touch(self, *a, **kw):
            os.utime(beat)

        on_step_end = on_train_begin = on_prediction_step = on_save = _touch

    return Heartbeat()


@record
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    job = json.loads(Path(argv[0]).read_text())
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    # one format for every rank; the launcher adds "[rank k] " and maps the level to the caller's logger
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, force=True, format="%(levelname)s %(name)s: %(message)s")
    _watch_parent()
    # `kill -USR1 <pid>` (and the launcher's watchdog before it stops a hung group) prints where every thread is
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    if every := float(os.environ.get("SFT_PIPELINE_STACKS_EVERY", 0)):  # debugging a hang: stacks every N s
        faulthandler.dump_traceback_later(every, repeat=True)
    work, out = Path(job["work"]), Path(job["out"])

    import datasets
    import torch
    from transformers import AutoTokenizer

    from sft_pipeline.config import LoraSection, ModelConfig, QuantizationConfig, TrainingConfig
    from sft_pipeline.trainer import build_trainer, save_trained

    model, quantization = ModelConfig(**job["model"]), QuantizationConfig(**job["quantization"])
    lora, training = LoraSection(**job["lora"]), TrainingConfig(**job["training"])
    device = job["device"]
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    if world > 1:
        # Dynamo's DDP optimizer splits compiled graphs at DDP's bucket boundaries: it is for compiling the whole
        # wrapped model. Here only flex attention's mask and kernels are compiled inside DDP's forward, and with it
        # the first step compiled for minutes (both ranks in Triton, measured on 2 H200s); without it, as on one GPU.
        import torch._dynamo

        torch._dynamo.config.optimize_ddp = False
    tok = AutoTokenizer.from_pretrained(job["tokenizer"])
    train_ds = datasets.Dataset.from_parquet(job["train"])
    eval_ds = datasets.Dataset.from_parquet(job["eval"]) if job.get("eval") else None
    log.info("rank %d of %d (local %d) on %s: %d training rows", rank, world, local_rank, device, len(train_ds))
    trainer, metrics = build_trainer(
        train_ds, eval_ds, tok, job["model_path"], model, quantization, lora, training, job["max_length"], str(work),
        device, os.environ.get(TOKEN_ENV) or None, job.get("report_to", "none"), job.get("run_name"),
        extra_callbacks=[_heartbeat_callback(work, rank)], batch=job.get("batch"), speed=job.get("speed"),
        world_size=world, local_rank=local_rank,
        parallel=parallel_args(training.strategy, training.collective_timeout_minutes, world, device))
    if rank == 0:  # what an out-of-memory restart halves
        (work / "rank-plan.json").write_text(json.dumps(metrics["batch_plan"]))
    result = trainer.train(resume_from_checkpoint=job.get("resume"))
    metrics.update(result.metrics)
    metrics.update({"resumed_from_step": metrics.get("start_step", 0), "oom_fallbacks": job.get("oom_fallbacks", []),
                    "world_size": world, "strategy": training.strategy,
                    **{k: metrics["batch_plan"][k] for k in ("per_device_batch_size", "gradient_accumulation_steps",
                                                             "effective_batch")}})
    if trainer.is_fsdp_enabled:  # gather the sharded adapter into one file (peft's FSDP-QLoRA recipe)
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(out / "adapter"))  # every rank: FSDP gathers; only rank 0 writes
    if rank == 0:
        save_trained(trainer, metrics, out, save_model=False)
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
