"""Resume after real faults: SIGKILL in every stage and mid-training, corrupted and deleted artifacts, a simulated
CUDA out-of-memory, errors that must not be retried, `prefect flow-run retry`, two runs at once, and `plan`.

The runs use the tiny recipe cut down (6 training steps, checkpoints every 2) to keep CI short. A fault point
(`SFT_PIPELINE_FAULT`, see sft_pipeline/faults.py) only tells the test *when* to kill: it writes a marker file and
waits; the kill is a real SIGKILL of the run's process group (the CLI and its temporary Prefect server).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, STAGES, cli, error_line, run_flow

SMALL = ["training.max_steps=6", "training.save_steps=2", "training.logging_steps=1", "data.synthetic_train_rows=200",
         "evaluation.max_samples=16", "generation.max_new_tokens=4"]


def states(summary: dict) -> dict[str, str]:
    return {name: rec["state"] for name, rec in summary.get("stages", {}).items()}


def run_args(store: Path, summary: Path, *overrides: str) -> list[str]:
    args = ["run", "--store", str(store), "--summary-json", str(summary)]
    for o in (*SMALL, *overrides):
        args += ["--set", o]
    return args


def start(store: Path, summary: Path, *overrides: str, env: dict | None = None) -> subprocess.Popen:
    """`sft-pipeline run` in its own process group (so the kill takes its temporary Prefect server too)."""
    return subprocess.Popen([sys.executable, "-m", "sft_pipeline.cli", *run_args(store, summary, *overrides)],
                            cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def run_and_kill(store: Path, summary: Path, fault: str, marker: Path, timeout: float = 600) -> dict:
    """Run until the fault point is reached, SIGKILL the run there, and return what its summary says."""
    marker.unlink(missing_ok=True)
    proc = start(store, summary, env={"SFT_PIPELINE_FAULT": f"{fault}:hang", "SFT_PIPELINE_FAULT_MARKER": str(marker)})
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before reaching {fault}:\n{proc.stdout.read()[-4000:]}")
        assert time.monotonic() < deadline, f"{fault} not reached in {timeout}s"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(60)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    return json.loads(summary.read_text()) if summary.exists() else {}


def adapter_tensors(artifact: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(artifact) / "adapter_model.safetensors"))


def assert_same_adapter(a: str | Path, b: str | Path) -> None:
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert ta.keys() == tb.keys()
    diff = max((ta[k].float() - tb[k].float()).abs().max().item() for k in ta)
    assert diff <= 1e-6, f"adapters differ by {diff}"


def losses(summary: dict) -> list[float]:
    history = json.loads((Path(summary["stages"]["train"]["artifact"]) / "log_history.json").read_text())
    return [h["loss"] for h in history if "loss" in h]


def seed_store(src: Path, dst: Path, stages: list[str]) -> None:
    """Copy finished artifacts into a new store, so a test starts further down the flow."""
    for stage in ["models", *stages]:
        shutil.copytree(src / stage, dst / stage)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted cut-down run: what every resumed run must end with."""
    store = tmp_path_factory.mktemp("reference") / "store"
    proc, summary = run_flow(store, *SMALL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert list(states(summary).values()) == ["Completed"] * len(STAGES)
    return store, summary


@pytest.mark.slow  # 90 s in CI here (2-core, 2026-12-07)
def test_sigkill_in_every_stage_resumes_where_it_stopped(reference, tmp_path):
    ref_store, ref = reference
    store, marker = tmp_path / "store", tmp_path / "reached"
    faults = [("authenticate", "write"), ("data", "write"), ("format", "write"), ("train", "step=5"),
              ("evaluate", "write"), ("benchmark", "write"), ("save_adapter", "write"), ("generate", "write")]
    finished: list[str] = []  # stages that finished before the last kill
    for i, (stage, where) in enumerate(faults):
        got = run_and_kill(store, tmp_path / f"killed-in-{stage}.json", f"{stage}:{where}", marker)
        # what finished before the previous kill is Cached; the stage killed last time now completes
        # and the summary names the stage the kill hit as Running (a SIGKILL leaves no time to say more)
        expected = ({s: "Cached" for s in finished[:-1]} | ({finished[-1]: "Completed"} if finished else {})
                    | {stage: "Running"})
        assert states(got) == expected, (stage, got)
        if where == "write":  # killed half-way through writing: a temp dir, nothing at the artifact's place
            assert any((store / ".tmp").glob(f"{stage}-*")), stage
            assert not (store / stage).exists() or not any((store / stage).iterdir())
        finished.append(stage)

        if stage == "train":  # killed mid-training, after the checkpoint of step 4 (every 2 steps, keep 2)
            work = next((store / ".work" / "train").iterdir())
            assert sorted(p.name for p in work.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
        if stage == "evaluate":  # the run before finished training from the checkpoint, not from step 0
            train = json.loads((Path(got["stages"]["train"]["artifact"]) / "train_metrics.json").read_text())
            assert train["resumed_from_step"] == 4 and train["steps"] == 6, train

    proc, summary = run_flow(store, *SMALL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert states(summary) == {s: "Cached" for s in STAGES[:-1]} | {"generate": "Completed"}
    assert not any((store / ".tmp").iterdir())  # the half-written temp dirs were cleaned up
    assert_same_adapter(summary["adapter"], ref["adapter"])
    assert_same_adapter(Path(summary["stages"]["train"]["artifact"]) / "adapter",
                        Path(ref["stages"]["train"]["artifact"]) / "adapter")


def plan(store: Path, tmp_path: Path, *overrides: str) -> tuple[list[dict], str]:
    """`sft-pipeline plan`, as JSON and as printed."""
    out = tmp_path / "plan.json"
    proc = cli("plan", *run_args(store, out, *overrides)[1:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "temporary server" not in proc.stdout + proc.stderr  # plan needs no Prefect server
    return json.loads(out.read_text())["plan"], proc.stdout


def test_plan_names_the_changed_field(reference, tmp_path):
    ref_store, _ = reference
    steps, printed = plan(ref_store, tmp_path, "lora.r=4", "training.price_per_hour=2")
    assert "lora.r: 8 -> 4" in printed
    # the time and cost before training: the format stage's tokens at the reference run's speed
    assert re.search(r"training estimate: [\d,]+ tokens at [\d,]+ tok/s \(the last run of this model in this store\) "
                     r"-> [\d.]+ h, cost [\d.]+", printed), printed
    assert [s["decision"] for s in steps] == ["reuse"] * 3 + ["run"] * (len(STAGES) - 3)
    assert steps[3]["reason"] == "lora.r: 8 -> 4"
    assert steps[4]["reason"].startswith("after train runs")
    assert not (ref_store / "train" / steps[3]["key"]).exists()  # nothing ran


@pytest.mark.slow  # 25 s in CI here (2-core, 2026-12-07)
def test_cuda_oom_falls_back_to_half_micro_batch(reference, tmp_path):
    ref_store, ref = reference
    store = tmp_path / "store"
    seed_store(ref_store, store, ["authenticate", "data", "format"])
    # time-based checkpoints only (every 0.006 s = every step), then a simulated CUDA OOM before step 4
    proc, summary = run_flow(store, *SMALL, "training.save_steps=1000", "training.save_minutes=0.0001",
                             env={"SFT_PIPELINE_FAULT": "train:step=3:oom"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert states(summary)["format"] == "Cached" and states(summary)["train"] == "Completed"
    train = summary["train"]
    assert train["oom_fallbacks"] == [{
        "at_step": 3, "from": {"per_device_batch_size": 8, "gradient_accumulation_steps": 1},
        "to": {"per_device_batch_size": 4, "gradient_accumulation_steps": 2}, "resumed_from": "checkpoint-3",
        "error": train["oom_fallbacks"][0]["error"]}]
    assert "CUDA out of memory" in train["oom_fallbacks"][0]["error"]
    assert (train["per_device_batch_size"], train["gradient_accumulation_steps"], train["effective_batch"]) == (4, 2, 8)
    assert train["resumed_from_step"] == 3 and train["steps"] == 6
    assert summary["stages"]["train"]["attempts"] == 1  # handled inside the stage, not by a blind retry
    out = proc.stdout + proc.stderr
    assert "out of memory at step 3" in out and "micro-batch 4 x accumulation 2" in out
    assert "training ran out of memory at step 3: micro-batch 8 x accumulation 1 -> 4 x 2" in proc.stdout
    work = next((store / ".work" / "train").iterdir())
    assert len(list(work.glob("checkpoint-*"))) == 2  # keeps the last K (save_total_limit)
    # same data order and effective batch: the same loss at every step as the uninterrupted reference, and the same
    # adapter up to summation order in bf16 (measured 1.3e-3; another data order / seed differs by ~0.2)
    assert losses(summary) == pytest.approx(losses(ref), abs=1e-3)
    ta, tb = adapter_tensors(summary["adapter"]), adapter_tensors(ref["adapter"])
    assert max((ta[k].float() - tb[k].float()).abs().max().item() for k in ta) < 1e-2


@pytest.mark.slow  # 21 s in CI here (2-core, 2026-12-07)
def test_data_errors_fail_once_and_transient_errors_are_retried(tmp_path):
    # a data set whose rows mostly lack an assistant turn: an error only the data stage can see (not the config)
    from sft_pipeline import synthetic

    chats = tmp_path / "chats"
    chats.mkdir()
    train = [{**row, "messages": row["messages"][:1]} for row in synthetic.conversations(40, seed=1)]
    for split, rows in (("train_sft", train), ("test_sft", synthetic.conversations(8, seed=2))):
        (chats / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # an I/O error in authenticate is retried (after 10 s); the bad data fails the data stage once
    proc, summary = run_flow(tmp_path / "store", *SMALL, "data.source=local", f"data.dataset={chats}",
                             env={"SFT_PIPELINE_FAULT": "authenticate:start:ioerror"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "rows in split 'train_sft' are invalid" in error_line(proc), error_line(proc)
    auth, data = summary["stages"]["authenticate"], summary["stages"]["data"]
    assert (auth["state"], auth["attempts"]) == ("Completed", 2)
    assert (data["state"], data["attempts"]) == ("Failed", 1)
    assert list(summary["stages"]) == ["authenticate", "data"]


@pytest.mark.slow  # 30 s in CI here (2-core, 2026-12-07)
def test_prefect_flow_run_retry_resumes_a_failed_run(reference, tmp_path):
    ref_store, _ = reference
    store, out = tmp_path / "store", tmp_path / "summary.json"
    seed_store(ref_store, store, STAGES[:-1])
    proc = cli(*run_args(store, out), env={"SFT_PIPELINE_FAULT": "generate:start:error"})
    assert proc.returncode == 1 and "injected failure" in error_line(proc)
    failed = json.loads(out.read_text())
    assert failed["status"] == "Failed" and failed["stages"]["generate"]["attempts"] == 1  # an error: no retry
    retry = subprocess.run([sys.executable, "-m", "prefect", "flow-run", "retry", failed["flow_run_id"],
                            "--entrypoint", "flows/sft.py:sft"], cwd=ROOT, capture_output=True, text=True,
                           timeout=900)
    assert retry.returncode == 0, retry.stdout[-3000:] + retry.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["flow_run_id"] == failed["flow_run_id"] and summary["status"] == "Completed"
    assert states(summary) == {**{s: "Cached" for s in STAGES[:-1]}, "generate": "Completed"}


@pytest.mark.slow  # 30 s in CI here (2-core, 2026-12-07)
def test_two_runs_at_once_compute_each_stage_once(tmp_path):
    store = tmp_path / "store"
    procs = [start(store, tmp_path / f"run{i}.json") for i in (0, 1)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    a, b = (json.loads((tmp_path / f"run{i}.json").read_text()) for i in (0, 1))
    for stage in STAGES:  # one computed it, the other waited and reused it
        assert {a["stages"][stage]["state"], b["stages"][stage]["state"]} == {"Completed", "Cached"}, stage
        assert a["stages"][stage]["artifact"] == b["stages"][stage]["artifact"]
    assert "waiting for" in outs[0] + outs[1]
    assert not any((store / ".tmp").iterdir())
    for stage in STAGES:
        for d in (store / stage).iterdir():
            assert json.loads((d / "manifest.json").read_text())["files"]


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_tampered_and_deleted_artifacts_are_recomputed(reference, tmp_path):
    """Last in this file: it breaks the reference store (and the run at its end repairs it)."""
    store, ref = reference
    data, fmt = Path(ref["stages"]["data"]["artifact"]), Path(ref["stages"]["format"]["artifact"])
    _flip_byte(data / "train_sft.parquet")  # tampered: same size, other bytes
    shutil.rmtree(fmt)  # deleted by hand: only the run records still name it

    steps, printed = plan(store, tmp_path)
    by_stage = {s["stage"]: s for s in steps}
    assert by_stage["authenticate"]["decision"] == "reuse"
    assert by_stage["data"]["decision"] == "run" and "content changed: train_sft.parquet" in by_stage["data"]["reason"]
    assert by_stage["format"]["decision"] == "run" and "deleted" in by_stage["format"]["reason"]
    assert by_stage["train"]["decision"] == "reuse" and "if format reproduces" in by_stage["train"]["reason"]
    assert "content changed: train_sft.parquet" in printed

    proc, summary = run_flow(store, *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # only the two broken stages re-run; they reproduce the same content, so nothing downstream does
    assert states(summary) == {"authenticate": "Cached", "data": "Completed", "format": "Completed",
                               "train": "Cached", "evaluate": "Cached", "benchmark": "Cached",
                               "save_adapter": "Cached", "generate": "Cached"}
    assert summary["adapter"] == ref["adapter"]


def run_and_sigterm(store: Path, summary: Path, fault: str, marker: Path, *overrides: str,
                    pause: bool = False, timeout: float = 600) -> tuple[subprocess.CompletedProcess, dict]:
    """Run until the fault point, SIGTERM the CLI there (as `kill`, a pod eviction or a spot preemption would), and
    return how it ended. ``pause``: the point waits for its marker to go, so training goes on to the step's end."""
    marker.unlink(missing_ok=True)
    action = "pause" if pause else "hang"
    proc = start(store, summary, *overrides, env={"SFT_PIPELINE_FAULT": f"{fault}:{action}",
                                                  "SFT_PIPELINE_FAULT_MARKER": str(marker)})
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before reaching {fault}:\n{proc.stdout.read()[-4000:]}")
        assert time.monotonic() < deadline, f"{fault} not reached in {timeout}s"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    if pause:
        time.sleep(1)  # the handler runs between two of the pause's sleeps
        marker.unlink()
    out, _ = proc.communicate(timeout=300)
    took = time.monotonic() - sent
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, out)
    return done, {**json.loads(summary.read_text()), "_took": took}


@pytest.mark.slow  # four cut-down runs of tiny: ~4 min on free cores, ~12 min on a loaded 2-core machine
def test_sigterm_checkpoints_training_and_stops_other_stages_cleanly(reference, tmp_path):
    _, ref = reference
    store, marker, summary = tmp_path / "store", tmp_path / "reached", tmp_path / "summary.json"
    every5 = "training.save_steps=5"  # the step-4 checkpoint can only come from the SIGTERM

    # in training: a sealed checkpoint at the step it was in, exit 143, the summary says Interrupted
    proc, s = run_and_sigterm(store, summary, "train:step=3", marker, every5, pause=True)
    assert proc.returncode == 143, proc.stdout[-4000:]
    assert s["status"] == "Interrupted" and s["stages"]["train"]["state"] == "Interrupted", s["stages"]
    line = error_line(proc)
    assert "SIGTERM during train" in line and "checkpoint-4" in line and "same command" in line, line
    ckpt = store / ".work" / "train" / s["stages"]["train"]["key"] / "checkpoint-4"
    assert (ckpt / "sft-pipeline-complete").is_file(), sorted(p.name for p in ckpt.parent.iterdir())
    assert not (store / "train").exists()  # no half-trained adapter became an artifact

    # in evaluate and in save_adapter (while its files are written): stopped at once, nothing half-written kept
    for stage, point in (("evaluate", "start"), ("save_adapter", "write")):
        proc, s = run_and_sigterm(store, summary, f"{stage}:{point}", marker, every5)
        assert proc.returncode == 143, proc.stdout[-4000:]
        assert s["_took"] < 60, s["_took"]
        assert s["status"] == "Interrupted" and s["stages"][stage]["state"] == "Interrupted", s["stages"]
        assert "SIGTERM during " + stage in error_line(proc)
        assert not (store / stage).exists()
        assert not [p for p in (store / ".tmp").iterdir() if p.name.startswith(stage)]
        if stage == "evaluate":
            assert s["stages"]["train"]["state"] == "Completed"
            assert json.loads((Path(s["stages"]["train"]["artifact"]) / "train_metrics.json").read_text())[
                "resumed_from_step"] == 4  # resumed from the SIGTERM's checkpoint

    proc, s = run_flow_small(store, summary, every5)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    before = STAGES[:STAGES.index("save_adapter")]
    assert [states(s)[n] for n in before] == ["Cached"] * len(before), states(s)
    assert_same_adapter(Path(s["stages"]["train"]["artifact"]) / "adapter",
                        Path(ref["stages"]["train"]["artifact"]) / "adapter")


def run_flow_small(store: Path, summary: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.run([sys.executable, "-m", "sft_pipeline.cli", *run_args(store, summary, *overrides)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    return proc, json.loads(summary.read_text())
