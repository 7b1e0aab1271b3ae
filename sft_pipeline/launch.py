"""Training as N data-parallel processes, launched with torchrun, waited for, its faults told in one line.

``run_ranks(job, nproc, logger)`` starts ``python -m torch.distributed.run`` (torchrun) in its own process group
with ``nproc`` copies of ``sft_pipeline.rank_train`` (one 4-bit model per rank, DDP or FSDP), streams every rank's
output line by line into ``logger`` as ``[rank k] ...``, and returns rank 0's training metrics. Every rank runs the
same training function as one process does (``training.run.train``) on the ``TrainJob``; the ranks only read the
format stage's token ids; rank 0 writes the artifact's files into ``job.out``.

Faults: torchrun stops the whole group when one rank dies (its ``--max-restarts 0``), every collective gives up
after ``training.collective_timeout_minutes``, and a watchdog here stops the group when no rank has made progress
for longer than that (or after ``timeout_s``). The first failure, read from torchrun's per-rank error files
(``@record`` in ``rank_train``), becomes one line naming the rank. CUDA out of memory in any rank restarts the group
from the last sealed checkpoint at half the per-rank micro-batch (the same effective batch; ``training.fallback``, the
one-process path's fallback); a killed or lost rank raises ``RankLost`` (retried: the retry resumes from the last
sealed checkpoint), a rank's own error ``RankFailure``.

A stop requested in this process (``training.stop.request``, e.g. by a SIGTERM handler) is passed on to the group as
SIGTERM to torchrun, which sends it to every rank and waits for them (its shutdown timeout, 30 s unless
``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` says otherwise, then SIGKILL). The ranks stop together at the end of one step
after its sealed checkpoint, rank 0 writes where (``INTERRUPTED_FILE``), every rank exits with 143, torchrun too,
and ``run_ranks`` raises ``TrainingInterrupted``.

Across machines: every node runs ``python -m sft_pipeline.launch node`` except the one running the flow, which
publishes the job on the shared store (``job.publish``); all join torchrun's c10d rendezvous
(see ``deployments/k8s-multinode-job-template.json``).
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from sft_pipeline.errors import StageFailure, TrainingInterrupted, is_oom
from sft_pipeline.parallel import checkpoint_world_size
from sft_pipeline.store import write_json_atomic
from sft_pipeline.training import fallback, stop
from sft_pipeline.training.checkpoints import last_checkpoint
from sft_pipeline.training.job import TrainJob

log = logging.getLogger("sft_pipeline.launch")
TOKEN_ENV = "SFT_PIPELINE_RANK_HF_TOKEN"  # the HF token reaches the ranks by environment, never in a file
HEARTBEATS = ".ranks"  # in the work dir: one file per rank, touched at every step (the watchdog reads them)
OOM_FILE = "oom.json"  # in the work dir: a rank that ran out of memory in training says at which step, which plan
INTERRUPTED_FILE = "interrupted.json"  # in the work dir: rank 0 of a group stopped on request says where
INTERRUPTED_EXIT = 128 + signal.SIGTERM  # a rank (and torchrun) that stopped on SIGTERM after its checkpoint
# messages of a rank that only saw another rank go away (a symptom, not the cause)
_PEER_GONE = re.compile(r"connection (closed|reset)|broken pipe|peer|gloo|nccl|timed out|timeout|socket|"
                        r"ProcessGroup|DistBackendError|Watchdog caught collective", re.IGNORECASE)
_LINE = re.compile(r"^\[rank (\d+)\] (DEBUG|INFO|WARNING|ERROR|CRITICAL)\b")


class RankFailure(RuntimeError):
    """A rank raised an error of its own (a bug, bad data): not retried."""


class RankLost(ConnectionError):
    """A rank was killed, lost its peers or timed out: retried (a retry resumes from the last sealed checkpoint)."""


# --------------------------------------------------------------------------------------------- the launcher
def torchrun_args(job_file: Path, nproc: int, log_dir: Path, nnodes: int = 1, rdzv_endpoint: str | None = None,
                  rdzv_id: str | None = None, is_host: bool = True) -> list[str]:
    """torchrun's arguments: tee every rank's output (prefixed by rank), no restarts (we resume ourselves)."""
    args = ["--nproc-per-node", str(nproc), "--max-restarts", "0", "--tee", "3", "--log-dir", str(log_dir)]
    if nnodes == 1 and not rdzv_endpoint:
        args += ["--standalone", "--nnodes", "1"]
    else:
        args += ["--nnodes", str(nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint,
                 "--rdzv-id", rdzv_id or "sft-train", "--rdzv-conf", f"is_host={int(is_host)}"]
    return args + ["-m", "sft_pipeline.rank_train", str(job_file)]


def _spawn(targs: list[str], failures: Path, env: dict | None, nproc: int = 1) -> subprocess.Popen:
    """torchrun through our wrapper (it turns torchrun's ChildFailedError into ``failures``), in its own group,
    killed by the kernel when this process dies (PR_SET_PDEATHSIG): no rank outlives the stage that started it."""
    def die_with_parent():
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG

    full_env = {**os.environ, **(env or {})}
    full_env = {**full_env, "PYTHONUNBUFFERED": "1",
                # torchrun sets 1 thread per rank when unset; the ranks share this machine's cores instead
                "OMP_NUM_THREADS": full_env.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // nproc)),
                "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE": "[rank ${rank}] "}
    return subprocess.Popen([sys.executable, "-m", "sft_pipeline.launch", "torchrun", str(failures), *targs],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=full_env,
                            start_new_session=True, preexec_fn=die_with_parent if sys.platform == "linux" else None)


def _stop(proc: subprocess.Popen, work: Path) -> None:
    """Stop the launcher's group (``_stop_group``), then SIGKILL any rank of ``work`` still alive: torchrun starts
    each rank in a session of its own, so a rank that does not end on SIGTERM (stopped, or wedged) would outlive a
    torchrun killed before it got to SIGKILL."""
    _stop_group(proc)
    _signal_ranks(work, signal.SIGKILL)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the launcher's group (torchrun, which stops its ranks), SIGKILL to what is left after 15 s."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            if sig == signal.SIGKILL:
                return
        except subprocess.TimeoutExpired:
            continue
    try:  # the launcher is gone; ranks of its group may linger a moment
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _emit(logger: logging.Logger, line: str) -> None:
    m = _LINE.match(line)
    if m:
        logger.log(getattr(logging, m.group(2)), "%s", line)
    elif line.startswith("[rank "):
        logger.info("%s", line)
    elif line.strip():
        logger.info("[launcher] %s", line)


def _latest_heartbeat(work: Path) -> float | None:
    beats = [p.stat().st_mtime for p in (work / HEARTBEATS).glob("rank-*")] if (work / HEARTBEATS).is_dir() else []
    return max(beats) if beats else None


def _signal_ranks(work: Path, sig: signal.Signals) -> None:
    """``sig`` to every live rank of this work dir (the pids its heartbeat files hold). Only processes that are
    ranks of this work dir get it (pids are reused): their command line names its job file."""
    beats = (work / HEARTBEATS).glob("rank-*") if (work / HEARTBEATS).is_dir() else []
    for beat in beats:
        try:
            pid = int(beat.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"sft_pipeline.rank_train" in cmdline and str(work).encode() in cmdline:
                os.kill(pid, sig)
        except (ValueError, OSError):
            continue


def _dump_stacks(work: Path) -> None:
    """SIGUSR1 to every live rank: ``rank_train`` prints all its threads' stacks (faulthandler), so a hang says where
    each rank waited."""
    _signal_ranks(work, signal.SIGUSR1)


def _lines(proc: subprocess.Popen) -> queue.Queue:
    """The group's output, line by line, from a reader thread (None at its end)."""
    lines: queue.Queue = queue.Queue()

    def read():
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=read, daemon=True, name="rank-output").start()
    return lines


def _wait(proc: subprocess.Popen, logger: logging.Logger, work: Path, started: float, timeout_s: float | None,
          stall_s: float | None) -> tuple[int, str | None, list[str]]:
    """Stream the group's output into ``logger`` until it exits or the watchdog stops it; pass a stop request of
    this process on to the group (SIGTERM to torchrun, which sends it to every rank). Returns (exit code, the
    watchdog's reason or None, the last lines)."""
    lines = _lines(proc)
    tail: list[str] = []
    reason = dump_until = asked = None
    while True:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            line = ""
        if line is None:
            break
        if line:
            _emit(logger, line)
            tail = (tail + [line])[-40:]
        if asked is None and stop.requested():
            asked = stop.requested()
            logger.warning("train: %s: every rank saves a checkpoint at the end of its current step, then stops", asked)
            _signal_group(proc, signal.SIGTERM)
        now = time.time()
        if timeout_s is not None and now - started > timeout_s:
            reason = f"the ranks did not finish within {timeout_s:.0f} s"
        beat = _latest_heartbeat(work)
        if reason is None and stall_s is not None and beat is not None and beat >= started and now - beat > stall_s:
            reason = f"no rank made progress for {now - beat:.0f} s (watchdog: {stall_s:.0f} s)"
        if reason and dump_until is None:
            logger.warning("train: %s; the ranks' stacks follow, then the process group is stopped", reason)
            _dump_stacks(work)
            dump_until = now + 5  # the stacks arrive through the ranks' output
        if dump_until is not None and now >= dump_until:
            _stop(proc, work)
            break
    return proc.wait(), reason, tail


def _signal_group(proc: subprocess.Popen, sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def explain(failures: dict, world: int, timeout_minutes: float) -> Exception:
    """The first real failure among the ranks' failures (one line naming the rank), as RankFailure/RankLost or the
    out-of-memory error. Symptoms rank last: a rank that only lost its peers, or one that torchrun stopped
    (SIGTERM) after another failed; a rank failing on its own or killed otherwise is the cause."""
    def own(item):
        rank, f = item
        code = f.get("exitcode", 1)
        symptom = 2 if code > 0 and _PEER_GONE.search(f.get("message") or "") else 1 if code == -15 else 0
        return (symptom, f.get("timestamp", 0), int(rank))

    rank, f = sorted(failures.items(), key=own)[0]
    msg = (f.get("message") or "").strip().splitlines()[0][:400] if f.get("message") else ""
    code = f.get("exitcode")
    where = f"train: rank {rank} of {world}"
    if code is not None and code < 0:
        name = f.get("signal") or f"signal {-code}"
        return RankLost(f"{where} was killed by {name} (exit code {code}); the other ranks were stopped")
    if "out of memory" in msg.lower() or msg.startswith("OutOfMemoryError"):
        import torch

        return torch.OutOfMemoryError(f"{where}: {msg}")
    if _PEER_GONE.search(msg):
        hint = (f" (training.collective_timeout_minutes={timeout_minutes:g})" if "time" in msg.lower() else "")
        return RankLost(f"{where} lost the other ranks{hint}: {msg}; if a rank on another node failed first, its "
                        "node's log says why")
    return RankFailure(f"{where} failed: {msg or f'exit code {code}'}")


def multinode_from_env() -> dict:
    """Several machines, as the multi-node job template sets them for the flow's pod: ``SFT_PIPELINE_NODES``
    (``<nodes>x<gpus_per_node>``), ``SFT_PIPELINE_RDZV_ENDPOINT`` (host:port of the flow's pod),
    ``SFT_PIPELINE_RDZV_ID`` (the same on every pod) and ``SFT_PIPELINE_PUBLISH`` (a file on the shared store that
    the other pods' ``launch node`` watch)."""
    topology = os.environ.get("SFT_PIPELINE_NODES", "").strip()
    m = re.fullmatch(r"(\d+)x(\d+)", topology) if topology else None
    if topology and not m:
        raise StageFailure(f"train: SFT_PIPELINE_NODES={topology!r} must look like <nodes>x<gpus_per_node>, e.g. 2x8")
    nnodes = int(m.group(1)) if m else 1
    if nnodes <= 1:
        return {"nnodes": 1}
    missing = [v for v in ("SFT_PIPELINE_RDZV_ENDPOINT", "SFT_PIPELINE_RDZV_ID", "SFT_PIPELINE_PUBLISH")
               if not os.environ.get(v)]
    if missing:
        raise StageFailure(f"train: SFT_PIPELINE_NODES={topology} needs {', '.join(missing)} set too")
    return {"nnodes": nnodes, "rdzv_endpoint": os.environ["SFT_PIPELINE_RDZV_ENDPOINT"],
            "rdzv_id": os.environ["SFT_PIPELINE_RDZV_ID"], "publish": os.environ["SFT_PIPELINE_PUBLISH"]}


@dataclass(frozen=True)
class _Group:
    """How the ranks are started: processes per node, nodes, the rendezvous, limits, extra environment."""

    nproc: int
    nnodes: int
    rdzv_endpoint: str | None
    rdzv_id: str | None
    timeout_s: float | None
    stall_s: float
    env: dict | None

    @property
    def world(self) -> int:
        return self.nproc * self.nnodes


def run_ranks(job: TrainJob, nproc: int, logger: logging.Logger = log, *, nnodes: int | None = None,
              rdzv_endpoint: str | None = None, rdzv_id: str | None = None, timeout_s: float | None = None,
              stall_s: float | None = None, env: dict | None = None) -> dict:
    """Train with ``nproc`` processes per node (``nnodes`` nodes); resume from the last sealed checkpoint in
    ``job.work``; return the training metrics rank 0 wrote into ``job.out``. Out of memory in a rank restarts
    the group at half the per-rank micro-batch (``fallback.until_done``, as one process does); a stop requested in
    this process (``stop.request``) stops every rank at one step after its checkpoint: ``TrainingInterrupted``.

    ``job``: what ``rank_train`` reads (no secret: the HF token goes by ``env`` under ``TOKEN_ENV``). ``stall_s``
    defaults to the collective timeout plus 10 minutes. ``nnodes`` None: from the environment
    (``multinode_from_env``), one node unless the multi-node job template says otherwise.
    """
    if nnodes is None:
        multi = multinode_from_env()
        nnodes = multi["nnodes"]
        rdzv_endpoint, rdzv_id = multi.get("rdzv_endpoint", rdzv_endpoint), multi.get("rdzv_id", rdzv_id)
        job = replace(job, publish=multi.get("publish", job.publish))
    Path(job.work).mkdir(parents=True, exist_ok=True)
    timeout_min = job.training.collective_timeout_minutes
    group = _Group(nproc, nnodes, rdzv_endpoint, rdzv_id, timeout_s,
                   stall_s if stall_s is not None else timeout_min * 60 + 600, env)
    attempts = itertools.count(1)
    return fallback.until_done(lambda batch: _attempt(job, batch, next(attempts), group, logger), job.work,
                               group.world, logger)


def _resume(job: TrainJob, world: int, logger: logging.Logger) -> str | None:
    """The last sealed checkpoint, and whether this number of processes can resume it."""
    work = Path(job.work)
    resume = last_checkpoint(work)
    before = checkpoint_world_size(resume)
    if resume and before != world:
        if job.training.strategy == "fsdp":
            raise StageFailure(f"train: {Path(resume).name} holds FSDP shards of {before} process(es); resume it "
                               f"with training.num_processes={before} (or delete {work} to start over)")
        logger.warning("train: resuming from %s, written by %d process(es), with %d now: the data order from here "
                       "on differs from an uninterrupted run (same effective batch and optimizer state)",
                       Path(resume).name, before, world)
    elif resume:
        logger.info("train: resuming from %s", Path(resume).name)
    return resume


def _attempt(job: TrainJob, batch: dict | None, attempt: int, group: _Group, logger: logging.Logger) -> dict:
    """One torchrun group, from the last sealed checkpoint to its end; returns rank 0's metrics."""
    if stop.requested():
        resume = last_checkpoint(job.work)
        raise TrainingInterrupted(_step(resume), resume, stop.requested())
    work, world = Path(job.work), group.world
    resume = _resume(job, world, logger)
    job_file = work / "rank-job.json"
    write_json_atomic(job_file, {"job": job.to_json(), "resume": resume, "batch": batch, "attempt": attempt,
                                 "world_size": world})
    if job.publish:  # the other nodes' `launch node` wait for this file, then join the rendezvous
        Path(job.publish).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(job.publish), {"job": str(job_file), "attempt": attempt, "nproc": group.nproc,
                                              "nnodes": group.nnodes, "rdzv_endpoint": group.rdzv_endpoint,
                                              "rdzv_id": group.rdzv_id})
    failures = work / f"failures-{attempt}.json"
    for stale in (failures, work / OOM_FILE, work / INTERRUPTED_FILE):
        stale.unlink(missing_ok=True)
    rid = f"{group.rdzv_id}-{attempt}" if group.rdzv_id else None
    targs = torchrun_args(job_file, group.nproc, work / "torchrun-logs", group.nnodes, group.rdzv_endpoint, rid,
                          is_host=True)
    logger.info("train: launching %d process(es)%s with torchrun (%s)", world,
                f" on {group.nnodes} nodes" if group.nnodes > 1 else "", job.training.strategy)
    started = time.time()
    proc = _spawn(targs, failures, group.env, group.nproc)
    try:
        code, reason, tail = _wait(proc, logger, work, started, group.timeout_s, group.stall_s)
    finally:
        _stop(proc, work)  # whatever happened, no rank of this group survives
    return _outcome(job, code, reason, tail, failures, world)


def _outcome(job: TrainJob, code: int, reason: str | None, tail: list[str], failures: Path, world: int) -> dict:
    """Rank 0's metrics, or what ended the group as one exception: TrainingInterrupted (a stop, rank 0 says where),
    RankLost (the watchdog, a killed or lost rank), fallback.OutOfMemory (a rank in training), or the rank's error."""
    work, done = Path(job.work), Path(job.out) / "train_metrics.json"
    stopped = work / INTERRUPTED_FILE
    if code == 0 and reason is None and done.is_file() and not stopped.is_file():
        return json.loads(done.read_text())
    if stopped.is_file() or stop.requested():
        where = json.loads(stopped.read_text()) if stopped.is_file() else {}
        resume = where.get("checkpoint") or last_checkpoint(work)  # no rank got to say: the last sealed one
        raise TrainingInterrupted(where.get("step", _step(resume)), resume, where.get("reason") or stop.requested())
    if reason:
        raise RankLost(f"train: {reason} ({world} processes); the group was stopped")
    if not failures.is_file():
        last = next((ln for ln in reversed(tail) if ln.strip()), "")
        raise RankLost(f"train: the launcher exited with code {code} and no rank failure recorded: {last[:300]}")
    exc = explain(json.loads(failures.read_text()), world, job.training.collective_timeout_minutes)
    if not is_oom(exc) or not (work / OOM_FILE).is_file():  # out of memory outside training: retried like others
        raise exc
    oom = json.loads((work / OOM_FILE).read_text())
    raise fallback.OutOfMemory(oom["at_step"], oom["plan"], str(exc))


def _step(checkpoint: str | None) -> int | None:
    return int(checkpoint.rsplit("-", 1)[1]) if checkpoint else None


# --------------------------------------------------------------------------------------------- command line
def _torchrun_main(failures: str, targs: list[str]) -> int:
    """torchrun itself (``torch.distributed.run``), with its ChildFailedError kept as JSON for ``explain``."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        torchrun.run(torchrun.parse_args(targs))
        return 0
    except SignalException as e:  # stopped (a stop request passed on as SIGTERM): it stopped its ranks first
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        record = {}
        for rank, f in e.failures.items():
            message = f.message.get("message", "") if isinstance(f.message, dict) else str(f.message or "")
            if message.startswith("To enable traceback"):
                message = ""
            record[str(rank)] = {"exitcode": f.exitcode, "message": message, "timestamp": f.timestamp,
                                 "signal": f.signal_name() if f.exitcode < 0 else None, "error_file": f.error_file,
                                 "local_rank": f.local_rank, "pid": f.pid}
        write_json_atomic(Path(failures), record)
        return 1


def node_main(publish: str, node_timeout_s: float) -> int:
    """A node other than the flow's: join every attempt the flow's node publishes, until this pod is stopped
    (the Job's successPolicy ends it when the flow's pod succeeds)."""
    path, seen, waited = Path(publish), 0, time.time()
    while True:
        spec = json.loads(path.read_text()) if path.is_file() else None
        if spec and spec["attempt"] > seen:
            seen = spec["attempt"]
            targs = torchrun_args(Path(spec["job"]), spec["nproc"], Path(spec["job"]).parent / "torchrun-logs",
                                  spec["nnodes"], spec["rdzv_endpoint"], f"{spec['rdzv_id']}-{seen}", is_host=False)
            proc = _spawn(targs, Path(spec["job"]).parent / f"failures-node-{os.getpid()}-{seen}.json", None,
                          spec["nproc"])
            for line in proc.stdout:
                print(line, end="", flush=True)
            proc.wait()
            waited = time.time()
        elif time.time() - waited > node_timeout_s:
            print(f"no training job published at {path} for {node_timeout_s:.0f} s; exiting", flush=True)
            return 0
        time.sleep(2)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["torchrun"]:  # internal: run_ranks' child
        return _torchrun_main(argv[1], argv[2:])
    p = argparse.ArgumentParser(prog="python -m sft_pipeline.launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    n = sub.add_parser("node", help="a non-flow node of a multi-node training: join what the flow's node publishes")
    n.add_argument("--publish", required=True, help="the file the flow's node publishes (on the shared store)")
    n.add_argument("--timeout", type=float, default=24 * 3600, help="give up after this long without a job (s)")
    a = p.parse_args(argv)
    return node_main(a.publish, a.timeout)


if __name__ == "__main__":
    sys.exit(main())
