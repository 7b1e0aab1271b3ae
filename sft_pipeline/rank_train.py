"""One rank of a data-parallel training: ``python -m sft_pipeline.rank_train JOB.json``, started by torchrun.

``sft_pipeline.launch.run_ranks`` writes the attempt (the ``TrainJob``: paths and config sections, no secret; the
checkpoint to resume from; an out-of-memory fallback's batch) and starts torchrun; every rank loads its own 4-bit
model on its GPU (``device_map={"": local_rank}``), reads the format stage's token ids (no rank tokenizes), and
trains with ``training.run.train``, the function one process runs too (DDP, or FSDP with
``training.strategy=fsdp``); Trainer shards the batches. Rank 0 writes the adapter and metrics into ``job.out``.
``@record`` writes a failing rank's error and traceback where torchrun finds it; ``launch.explain`` turns it into
one line. SIGTERM (torchrun passes a stop on so) stops every rank at one step after its checkpoint: exit code 143.
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

from sft_pipeline.errors import TrainingInterrupted
from sft_pipeline.launch import HEARTBEATS, INTERRUPTED_EXIT, INTERRUPTED_FILE, OOM_FILE, TOKEN_ENV
from sft_pipeline.store import write_json_atomic
from sft_pipeline.training import stop
from sft_pipeline.training.fallback import OutOfMemory
from sft_pipeline.training.job import Rank, TrainJob, load_data

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
    spec = json.loads(Path(argv[0]).read_text())
    rank = Rank.from_env()
    stop.install_sigterm()  # first: a SIGTERM from now on asks for a checkpoint instead of ending the rank
    # one format for every rank; the launcher adds "[rank k] " and maps the level to the caller's logger
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, force=True, format="%(levelname)s %(name)s: %(message)s")
    _watch_parent()
    # `kill -USR1 <pid>` (and the launcher's watchdog before it stops a hung group) prints where every thread is
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    if every := float(os.environ.get("SFT_PIPELINE_STACKS_EVERY", 0)):  # debugging a hang: stacks every N s
        faulthandler.dump_traceback_later(every, repeat=True)
    job = TrainJob.from_json(spec["job"])
    _set_up_device(job, rank)
    data = load_data(job)
    log.info("rank %d of %d (local %d) on %s: %d training rows", rank.rank, rank.world, rank.local_rank, job.device,
             len(data.train))
    from sft_pipeline.training import run

    try:
        trainer, metrics = run.train(job, data, rank=rank, batch=spec.get("batch"), resume=spec.get("resume"),
                                     callbacks=[_heartbeat_callback(Path(job.work), rank.rank)],
                                     token=os.environ.get(TOKEN_ENV) or None)
    except OutOfMemory as oom:  # what the launcher halves: the step and the plan this group ran out of memory with
        write_json_atomic(Path(job.work) / OOM_FILE, {"at_step": oom.step, "plan": oom.plan, "error": oom.error})
        raise
    except TrainingInterrupted as stopped:
        if rank.rank == 0:
            where = {"step": stopped.step, "checkpoint": stopped.checkpoint, "reason": stopped.reason}
            write_json_atomic(Path(job.work) / INTERRUPTED_FILE, where)
        log.warning("%s", stopped)
        sys.exit(INTERRUPTED_EXIT)
    run.save_ranks(trainer, metrics, Path(job.out), rank)


def _set_up_device(job: TrainJob, rank: Rank) -> None:
    import torch

    if job.device == "cuda":
        torch.cuda.set_device(rank.local_rank)
    if rank.world > 1:
        # Dynamo's DDP optimizer splits compiled graphs at DDP's bucket boundaries: it is for compiling the whole
        # wrapped model. Here only flex attention's mask and kernels are compiled inside DDP's forward, and with it
        # the first step compiled for minutes (BENCHMARKS.md, "Issue 30: measurements moved out of the code")
        import torch._dynamo

        torch._dynamo.config.optimize_ddp = False


if __name__ == "__main__":
    main()
