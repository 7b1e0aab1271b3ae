"""The pieces behind resuming, fast: fault points, the per-key lock, checkpoint choice, the OOM batch plan,
broken artifacts and which errors are retried."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from sft_pipeline import faults
from flows.stages import BY_NAME
from sft_pipeline.config import load_config
from sft_pipeline.errors import ConfigError, StageFailure, is_transient
from sft_pipeline.stage import Facts, execute, key_parts, stage_key
from sft_pipeline.store import Store
from sft_pipeline.training.checkpoints import last_checkpoint, seal_checkpoint
from sft_pipeline.training.fallback import halve as _halve_batch, saved as _saved_batch


def test_fault_points_are_off_by_default_and_fire_once(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.point("train", "step=3")  # nothing happens
    monkeypatch.setenv(faults.ENV, "train:step=3:oom,data:start:ioerror")
    monkeypatch.setattr(faults, "_fired", set())
    faults.point("train", "step=2")
    with pytest.raises(torch.OutOfMemoryError) as oom:
        faults.point("train", "step=3")
    faults.point("train", "step=3")  # once per process: a resumed run gets past it
    with pytest.raises(OSError) as io:
        faults.point("data", "start")
    assert is_transient(oom.value) and is_transient(io.value) and io.value.errno == errno.EIO
    monkeypatch.setenv(faults.ENV, "train:step=3:explode")
    with pytest.raises(ValueError, match="SFT_PIPELINE_FAULT"):
        faults.point("train", "step=3")


def test_config_and_data_errors_are_not_transient():
    assert not is_transient(StageFailure("data: 90 of 100 rows are invalid"))
    assert not is_transient(ConfigError("lora.r: must be >= 1"))
    assert not is_transient(FileNotFoundError(errno.ENOENT, "no such file"))
    assert not is_transient(OSError(errno.ENOSPC, "disk full"))
    assert not is_transient(ValueError("a bug"))
    assert is_transient(ConnectionError("reset")) and is_transient(RuntimeError("CUDA out of memory. Tried ..."))


def test_lock_makes_a_second_writer_wait(tmp_path):
    st = Store(tmp_path)
    order, waited = [], []

    def second():
        with st.lock("train", "k", on_wait=waited.append):
            order.append("second")

    with st.lock("train", "k"):
        t = threading.Thread(target=second, daemon=True)
        t.start()
        time.sleep(0.5)
        order.append("first done")
    t.join(10)
    assert order == ["first done", "second"]
    assert waited and ":" in waited[0]  # told who holds it (host:pid:id)


def test_lock_of_a_killed_holder_is_free(tmp_path):
    code = ("import sys, time; from sft_pipeline.store import Store; "
            "cm = Store(sys.argv[1]).lock('train', 'k'); cm.__enter__(); print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert proc.stdout.readline().strip() == "held"
    got = []

    def take():
        with Store(tmp_path).lock("train", "k"):
            got.append(1)

    t = threading.Thread(target=take, daemon=True)
    t.start()
    time.sleep(0.5)
    assert not got  # still held
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    t.join(10)
    assert got == [1]


def _checkpoint(work: Path, step: int, complete: bool = True) -> Path:
    d = work / f"checkpoint-{step}"
    d.mkdir(parents=True)
    for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (d / name).write_bytes(b"x")
    (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if complete:
        seal_checkpoint(d)
    return d


def test_last_checkpoint_skips_one_cut_short_by_a_kill(tmp_path):
    assert last_checkpoint(tmp_path) is None
    _checkpoint(tmp_path, 2)
    _checkpoint(tmp_path, 4)
    cut = _checkpoint(tmp_path, 6, complete=False)  # killed (or the machine died) before it was sealed
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    assert not cut.exists()


def test_oom_halves_micro_batch_and_keeps_effective_batch(tmp_path):
    assert _saved_batch(tmp_path) is None  # no fallback yet: the planned batch is used
    plan = {"per_device_batch_size": 8, "gradient_accumulation_steps": 2, "oom_fallbacks": []}
    plan = _halve_batch(tmp_path, plan, 7, str(tmp_path / "checkpoint-6"), "OutOfMemoryError: CUDA out of memory")
    assert (plan["per_device_batch_size"], plan["gradient_accumulation_steps"]) == (4, 4)
    assert plan["oom_fallbacks"][0]["resumed_from"] == "checkpoint-6"
    assert _saved_batch(tmp_path) == plan  # a rerun after a crash keeps the lower micro-batch
    odd = _halve_batch(tmp_path, {**plan, "per_device_batch_size": 3, "gradient_accumulation_steps": 2}, 1, None,
                       "oom")
    assert (odd["per_device_batch_size"], odd["gradient_accumulation_steps"]) == (1, 6)
    with pytest.raises(StageFailure, match="per_device_batch_size=1"):
        _halve_batch(tmp_path, odd, 2, None, "oom")


def test_broken_artifact_is_recomputed_and_a_finished_one_reused(tmp_path):
    """The store is the only cache: a finished artifact is reused; a tampered one is computed again in place."""
    import logging

    cfg = load_config("tiny", ["data.synthetic_train_rows=20", "data.synthetic_test_rows=8",
                               "data.test_subset.count=8"])
    st, facts, log = Store(tmp_path), Facts(cfg, blocks=False), logging.getLogger("test")
    stage = BY_NAME["data"]
    ref, reused = execute(stage, cfg, st, {}, facts, log)
    assert not reused and ref.key == stage_key(key_parts(stage, cfg, {}, facts))
    assert execute(stage, cfg, st, {}, facts, log) == (ref, True)
    manifest = json.loads((Path(ref.path) / "manifest.json").read_text())
    assert manifest["inputs"]["config"]["data"]["synthetic_train_rows"] == 20  # the exact key parts, for plan
    (Path(ref.path) / "train_sft.parquet").write_bytes(b"tampered")
    again, reused = execute(stage, cfg, st, {}, facts, log)
    assert not reused and again.path == ref.path and again.fingerprint == ref.fingerprint
