"""Data-parallel training on CPU (gloo): torchrun through ``launch.run_ranks``, faults across ranks, two "nodes"
through torchrun's c10d rendezvous, the multi-node job template, and the scaling benchmark's CPU-side parts.

The train-stage-level tests call ``run_ranks`` with the tiny recipe's model and token ids made here (no flow):
the same inputs the train stage hands it.
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sft_pipeline.config import load_config
from sft_pipeline.errors import ConfigError, is_transient
from sft_pipeline.launch import RankFailure, RankLost, explain, run_ranks
from sft_pipeline.parallel import agree_plan, most_cautious, parallel_args, resolve_num_processes, split_batch
from tests.conftest import ROOT, capture_log

MAX_STEPS, SAVE_STEPS = 40, 10


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory):
    """The tiny recipe's base model (random weights) and its format-stage output: token ids as parquet."""
    import datasets
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from sft_pipeline import synthetic
    from sft_pipeline.models import ARCHITECTURES, build_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    cfg = load_config("tiny")
    torch.manual_seed(0)
    MistralForCausalLM(MistralConfig(**ARCHITECTURES["tiny-mistral"])).save_pretrained(root / "model")
    tok = build_tokenizer()
    tok.save_pretrained(root / "model")
    tok.save_pretrained(root / "tokenizer")
    for split, rows in synthetic.splits(cfg.data.synthetic_train_rows, 64, seed=0).items():
        ids = tok.apply_chat_template([r["messages"] for r in rows], tokenize=True, return_dict=True)["input_ids"]
        datasets.Dataset.from_dict({"input_ids": [list(x)[:cfg.format.max_length] for x in ids]}).to_parquet(
            str(root / f"{split}.parquet"))
    return root


def _job(root: Path, run: Path, *overrides: str, publish: Path | None = None, steps: int = MAX_STEPS,
         save_steps: int = SAVE_STEPS):
    cfg = load_config("tiny", [f"training.max_steps={steps}", f"training.save_steps={save_steps}",
                               "training.save_total_limit=10", "training.device=cpu", *overrides])
    from sft_pipeline.training.job import TrainJob

    return TrainJob.from_config(cfg, train=root / "train_sft.parquet", eval=None, tokenizer=root / "tokenizer",
                                model_path=root / "model", work=run / "work", out=run / "out", device="cpu",
                                publish=publish)


def _logger(name: str):
    return capture_log(f"test.multiprocess.{name}")


def _eval_loss(root: Path, adapter: Path | None) -> float:
    """Mean token loss of the test rows, base model or base + adapter (4-bit, CPU)."""
    import datasets
    import torch

    from sft_pipeline.models import load_model, load_tuned

    cfg = load_config("tiny")
    model = (load_tuned(str(root / "model"), adapter, cfg.model, cfg.quantization, "cpu") if adapter else
             load_model(str(root / "model"), cfg.model, cfg.quantization, "cpu").eval())
    total = n = 0.0
    with torch.no_grad():
        for ids in datasets.Dataset.from_parquet(str(root / "test_sft.parquet"))["input_ids"][:32]:
            x = torch.tensor([ids])
            total += model(input_ids=x, labels=x).loss.item() * (len(ids) - 1)
            n += len(ids) - 1
    return total / n


# ------------------------------------------------------------------------------------------------ pure parts
def test_batch_is_split_over_the_ranks_keeping_the_effective_batch():
    plan = {"per_device_batch_size": 8, "gradient_accumulation_steps": 1, "effective_batch": 8}
    for world in (1, 2, 4, 8):
        p = split_batch(plan, world)
        assert p["per_device_batch_size"] * p["gradient_accumulation_steps"] * world == 8
    big = split_batch({"per_device_batch_size": 1, "gradient_accumulation_steps": 128, "effective_batch": 128}, 2)
    assert (big["per_device_batch_size"], big["gradient_accumulation_steps"]) == (1, 64)
    auto = split_batch({"per_device_batch_size": 4, "gradient_accumulation_steps": 4, "effective_batch": 16}, 2)
    assert (auto["per_device_batch_size"], auto["gradient_accumulation_steps"]) == (4, 2)  # micro as planned


def _plan(micro: int, layers: int = 0, ckpt: bool = False) -> dict:
    return {"per_device_batch_size": micro, "gradient_accumulation_steps": 8 // micro, "effective_batch": 16,
            "checkpointed_layers": layers, "gradient_checkpointing": ckpt or bool(layers)}


def test_the_most_cautious_plan_needs_the_least_memory():
    assert most_cautious([_plan(8), _plan(4), _plan(8)])["per_device_batch_size"] == 4
    assert most_cautious([_plan(1, 3), _plan(1, 12), _plan(2)])["checkpointed_layers"] == 12
    # the estimate plan's "checkpoint everything" (no layer count) beats any selective count
    assert most_cautious([_plan(1, 12), _plan(1, 0, ckpt=True)]) == _plan(1, 0, ckpt=True)


def _agree_in_rank(rank: int, store: str, plans: list, out) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=len(plans))
    try:
        out.put((rank, agree_plan(plans[rank])))
    finally:
        dist.destroy_process_group()


def test_ranks_that_planned_differently_all_take_the_most_cautious_plan(tmp_path):
    """Two gloo processes whose GPUs had different free memory: both end with micro-batch 4 (no hang later)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    out = ctx.Queue()
    plans = [_plan(8), _plan(4)]
    procs = [ctx.Process(target=_agree_in_rank, args=(r, str(tmp_path / "store"), plans, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = dict(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert got[0] == got[1]
    assert got[0]["per_device_batch_size"] == 4 and got[0]["gradient_accumulation_steps"] == 2
    assert got[0]["rank_plans"] == [8, 4]
    assert agree_plan(_plan(8)) == _plan(8)  # one process, no group: unchanged


def test_config_checks_processes_and_strategy():
    assert load_config("tiny", ["training.num_processes=2"]).training.num_processes == 2
    assert load_config("tiny", ["training.num_processes=auto"]).training.num_processes == "auto"
    with pytest.raises(ConfigError, match="training.num_processes=3 must divide the effective batch"):
        load_config("tiny", ["training.num_processes=3"])  # 8 x 1 is not divisible by 3
    with pytest.raises(ConfigError, match="training.strategy=fsdp shards the model over several processes"):
        load_config("tiny", ["training.strategy=fsdp"])
    with pytest.raises(ConfigError, match="training.strategy"):
        load_config("tiny", ["training.strategy=deepspeed"])
    assert resolve_num_processes("auto", "cpu") == 1 and resolve_num_processes(4, "cpu") == 4


def test_auto_takes_the_most_gpus_that_divide_the_effective_batch(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    logger, lines = capture_log("test.auto")
    assert resolve_num_processes("auto", "cuda", 16, logger) == 2
    assert any("uses 2 of the 3 visible GPUs" in ln and "effective batch 16" in ln for ln in lines.lines)
    assert resolve_num_processes("auto", "cuda", 12) == 3 and resolve_num_processes("auto", "cuda") == 3
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert resolve_num_processes("auto", "cuda", 16) == 8 and resolve_num_processes("auto", "cuda", 12) == 6


def test_ranks_share_the_cores_unless_the_caller_sets_omp_threads(monkeypatch, tmp_path):
    from sft_pipeline import launch

    seen = []
    monkeypatch.setattr(launch.subprocess, "Popen", lambda *a, **kw: seen.append(kw["env"]))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(launch.os, "cpu_count", lambda: 16)
    launch._spawn([], tmp_path / "f.json", None, nproc=4)
    launch._spawn([], tmp_path / "f.json", {"OMP_NUM_THREADS": "3"}, nproc=4)
    assert [env["OMP_NUM_THREADS"] for env in seen] == ["4", "3"]
    assert all(env["TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE"] == "[rank ${rank}] " for env in seen)


def test_fsdp_settings_follow_the_fsdp_qlora_recipe():
    """FSDP-QLoRA needs CUDA (bitsandbytes 4-bit + FSDP): here only its settings; the GPU run is bench/scaling.py."""
    args = parallel_args("fsdp", 5, 2, "cuda")
    assert args["fsdp"] == "full_shard auto_wrap" and args["ddp_timeout"] == 300 and args["ddp_backend"] == "nccl"
    assert args["fsdp_config"]["use_orig_params"] is False and args["fsdp_config"]["auto_wrap_policy"] == \
        "TRANSFORMER_BASED_WRAP"
    assert parallel_args("ddp", 5, 1, "cpu") == {}
    assert "fsdp" not in parallel_args("ddp", 5, 2, "cpu")


def test_fsdp_loads_4bit_weights_stored_in_the_compute_dtype_on_the_rank_gpu(monkeypatch):
    import torch
    import transformers

    from sft_pipeline import models

    seen = {}

    def fake(path, quantization_config=None, **kw):
        seen.update(storage=quantization_config.bnb_4bit_quant_storage, device_map=kw["device_map"])

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    cfg = load_config("mistral-7b-qlora", ["quantization.compute_dtype=bfloat16"])
    models.load_model("x", cfg.model, cfg.quantization, "cuda", device_index=1, quant_storage=True)
    assert seen == {"storage": torch.bfloat16, "device_map": {"": 1}}
    models.load_model("x", cfg.model, cfg.quantization, "cuda", device_index=0)
    assert seen == {"storage": torch.uint8, "device_map": {"": 0}}  # DDP: bitsandbytes' default packing


def test_first_real_failure_names_the_rank():
    killed = explain({"0": {"exitcode": 1, "message": "RuntimeError: [gloo] Connection closed by peer", "timestamp": 5},
                      "1": {"exitcode": -9, "signal": "SIGKILL", "message": "", "timestamp": 6},
                      "2": {"exitcode": -15, "signal": "SIGTERM", "message": "", "timestamp": 4}}, 3, 30)
    assert isinstance(killed, RankLost) and is_transient(killed)
    assert str(killed) == "train: rank 1 of 3 was killed by SIGKILL (exit code -9); the other ranks were stopped"
    bug = explain({"1": {"exitcode": 1, "message": "ValueError: bad row 7\nmore", "timestamp": 9}}, 2, 30)
    assert isinstance(bug, RankFailure) and not is_transient(bug) and str(bug) == \
        "train: rank 1 of 2 failed: ValueError: bad row 7"
    oom = explain({"0": {"exitcode": 1, "message": "OutOfMemoryError: CUDA out of memory. Tried", "timestamp": 1}}, 2, 30)
    assert type(oom).__name__ == "OutOfMemoryError" and "rank 0 of 2" in str(oom)
    lost = explain({"0": {"exitcode": 1, "message": "DistBackendError: Watchdog caught collective operation timeout",
                          "timestamp": 1}}, 4, 7)
    assert isinstance(lost, RankLost) and "collective_timeout_minutes=7" in str(lost)


# ------------------------------------------------------------------------------------------------ with torchrun
# ~30 s here idle, ~90 s with the 2 cores busy (two ranks: imports, 4-bit load, 40 steps)
@pytest.mark.slow  # 41 s in CI here (2-core, 2026-12-07)
def test_two_ranks_train_the_tiny_recipe(tiny_inputs, tmp_path):
    logger, lines = _logger("two")
    t0 = time.time()
    metrics = run_ranks(_job(tiny_inputs, tmp_path), 2, logger, timeout_s=600)
    took = time.time() - t0
    assert metrics["world_size"] == 2 and metrics["steps"] == MAX_STEPS
    assert metrics["per_device_batch_size"] * metrics["gradient_accumulation_steps"] * 2 == metrics["effective_batch"] == 8
    assert any(l.startswith("[rank 0] ") for l in lines.lines) and any(l.startswith("[rank 1] ") for l in lines.lines)
    out = tmp_path / "out"
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "log_history.json").is_file()
    assert not (out / "adapter" / "training_args.bin").exists()
    base, tuned = _eval_loss(tiny_inputs, None), _eval_loss(tiny_inputs, out / "adapter")
    assert tuned < 0.5 * base, (base, tuned)
    print(f"two ranks: {took:.0f} s, eval loss {base:.2f} -> {tuned:.2f}")


# ~25 s here idle, ~2 min busy: 2 ranks until the checkpoint at step 4, SIGKILL, then 1 rank resumes to step 16
@pytest.mark.slow  # 37 s in CI here (2-core, 2026-12-07)
def test_a_killed_rank_fails_in_one_line_and_a_rerun_resumes_with_another_n(tiny_inputs, tmp_path):
    from sft_pipeline.training.checkpoints import SEALED

    steps, save = 16, 4
    job = _job(tiny_inputs, tmp_path, steps=steps, save_steps=save)
    work = Path(job.work)
    logger, lines = _logger("kill")
    caught: list[BaseException] = []

    def train():
        try:
            run_ranks(job, 2, logger, timeout_s=600)
        except BaseException as e:  # noqa: BLE001 - the test inspects what the launcher raised
            caught.append(e)

    t = threading.Thread(target=train)
    t.start()
    deadline = time.time() + 300
    while not (work / f"checkpoint-{save}" / SEALED).is_file():
        assert time.time() < deadline and t.is_alive(), lines.lines[-20:]
        time.sleep(0.2)
    os.kill(int((work / ".ranks" / "rank-1").read_text()), signal.SIGKILL)
    killed = time.time()
    t.join(120)
    assert not t.is_alive() and caught
    took = time.time() - killed
    err = caught[0]
    assert isinstance(err, RankLost) and "\n" not in str(err)
    assert str(err) == "train: rank 1 of 2 was killed by SIGKILL (exit code -9); the other ranks were stopped"
    assert took < 60, took
    assert not (tmp_path / "out" / "train_metrics.json").exists()

    logger, lines = _logger("resume")
    t0 = time.time()
    metrics = run_ranks(job, 1, logger, timeout_s=600)  # the rerun has one process where there were two
    assert metrics["resumed_from_step"] >= save and metrics["steps"] == steps
    assert metrics["world_size"] == 1 and metrics["effective_batch"] == 8
    assert any("written by 2 process(es), with 1 now: the data order from here on differs" in l for l in lines.lines)
    print(f"kill noticed in {took:.1f} s; resumed from step {metrics['resumed_from_step']}, "
          f"rerun {time.time() - t0:.0f} s")


# 120 s here with the 2 cores loaded (idle not measured): 2 ranks train, a stop is requested in the launcher's
# process (what a SIGTERM handler does); both ranks stop at one step after its sealed checkpoint, then 2 ranks resume from it to the end
@pytest.mark.slow
def test_a_stop_request_stops_every_rank_at_one_step_and_the_rerun_resumes_there(tiny_inputs, tmp_path):
    from sft_pipeline.errors import TrainingInterrupted
    from sft_pipeline.launch import INTERRUPTED_EXIT
    from sft_pipeline.training import stop
    from sft_pipeline.training.checkpoints import SEALED, checkpoint_problem

    steps, save = 16, 4
    job = _job(tiny_inputs, tmp_path, steps=steps, save_steps=save)
    work = Path(job.work)
    logger, lines = _logger("stop")
    caught: list[BaseException] = []

    def train():
        try:
            run_ranks(job, 2, logger, timeout_s=600)
        except BaseException as e:  # noqa: BLE001 - the test inspects what the launcher raised
            caught.append(e)

    t = threading.Thread(target=train)
    t.start()
    try:
        deadline = time.time() + 300
        while not (work / f"checkpoint-{save}" / SEALED).is_file():
            assert time.time() < deadline and t.is_alive(), lines.lines[-20:]
            time.sleep(0.2)
        stop.request("SIGTERM")
        t.join(180)
    finally:
        stop.clear()
    assert not t.is_alive() and caught and isinstance(caught[0], TrainingInterrupted), (caught, lines.lines[-30:])
    err = caught[0]
    assert err.step >= save and Path(err.checkpoint).name == f"checkpoint-{err.step}"
    assert checkpoint_problem(Path(err.checkpoint)) is None  # sealed, once both ranks wrote their parts
    said = {r: [ln for ln in lines.lines if ln.startswith(f"[rank {r}] ") and "train: stopped at step" in ln]
            for r in (0, 1)}
    assert all(f"stopped at step {err.step} " in said[r][0] for r in (0, 1)), said  # the same step on both ranks
    failures = json.loads(next(work.glob("failures-*.json")).read_text()) if list(work.glob("failures-*.json")) else {}
    assert all(f["exitcode"] == INTERRUPTED_EXIT for f in failures.values()), failures  # 143 where torchrun saw any
    assert not (tmp_path / "out" / "train_metrics.json").exists()

    logger, lines = _logger("stop-resume")
    metrics = run_ranks(job, 2, logger, timeout_s=600)
    assert metrics["resumed_from_step"] == err.step and metrics["steps"] == steps


def _gone(pid: int) -> bool:
    """No such process, or one that has exited and waits only to be reaped."""
    try:
        return "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True


# ~45 s here idle: 2 ranks train, one is frozen (SIGSTOP) so the other waits in a collective; the watchdog stops the
# group after `stall_s` without progress, and the waiting rank's stack (faulthandler, SIGUSR1) is in the log first
@pytest.mark.slow  # 39 s in CI here (2-core, 2026-12-07)
def test_a_hung_group_is_stopped_by_the_watchdog_and_says_where_ranks_waited(tiny_inputs, tmp_path):
    job = _job(tiny_inputs, tmp_path, steps=400, save_steps=1000)
    work = Path(job.work)
    logger, lines = _logger("hang")
    caught: list[BaseException] = []

    def train():
        try:
            run_ranks(job, 2, logger, timeout_s=600, stall_s=8)
        except BaseException as e:  # noqa: BLE001 - the test inspects what the launcher raised
            caught.append(e)

    t = threading.Thread(target=train)
    t.start()
    deadline, beat, first = time.time() + 300, work / ".ranks" / "rank-1", None
    while first is None or beat.stat().st_mtime <= first + 0.5:  # touched again: the rank is past a step
        assert time.time() < deadline and t.is_alive(), lines.lines[-20:]
        if first is None and beat.is_file():
            first = beat.stat().st_mtime
        time.sleep(0.2)
    stopped = int(beat.read_text())
    os.kill(stopped, signal.SIGSTOP)  # a rank that hangs, and ignores SIGTERM while it does
    t.join(120)
    assert not t.is_alive() and caught
    deadline = time.time() + 10  # SIGKILL reaches a stopped process; its exit may take a moment
    while not _gone(stopped) and time.time() < deadline:
        time.sleep(0.2)
    assert _gone(stopped), "the stopped rank outlived the stage (torchrun starts ranks in sessions of their own)"
    err = caught[0]
    assert isinstance(err, RankLost) and "no rank made progress" in str(err) and "\n" not in str(err)
    assert any(re.match(r"\[rank 0\] +File \".*\", line \d+ in ", line) for line in lines.lines), lines.lines[-30:]
    assert not (tmp_path / "out" / "train_metrics.json").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ~40 s here idle (10 s of it node 1 waiting for another attempt), ~90 s busy: two launcher processes ("nodes",
# one rank each) meet through torchrun's c10d rendezvous
@pytest.mark.slow  # 50 s in CI here (2-core, 2026-12-07)
def test_two_nodes_through_the_c10d_rendezvous(tiny_inputs, tmp_path):
    publish = tmp_path / "store" / ".launch" / "job-1.json"
    node1 = subprocess.Popen([sys.executable, "-m", "sft_pipeline.launch", "node", "--publish", str(publish),
                              "--timeout", "10"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    try:
        logger, lines = _logger("nodes")
        metrics = run_ranks(_job(tiny_inputs, tmp_path, publish=publish, steps=16), 1, logger, nnodes=2,
                            rdzv_endpoint=f"127.0.0.1:{_free_port()}", rdzv_id="sft-test", timeout_s=600)
        assert metrics["world_size"] == 2 and metrics["steps"] == 16 and metrics["effective_batch"] == 8
        assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
        assert any("on 2 nodes" in line for line in lines.lines)
        node1_out = node1.communicate(timeout=120)[0]
        assert node1.returncode == 0 and "[rank " in node1_out, node1_out[-3000:]
    finally:
        if node1.poll() is None:
            os.killpg(node1.pid, signal.SIGKILL)
            node1.wait()


# ------------------------------------------------------------------------------------------------ documents
def test_multinode_job_template_renders_an_indexed_job_of_nodes_pods(tmp_path):
    """The K8s work-pool template, as Prefect's Kubernetes worker fills it: N pods x G GPUs, pod 0 runs the flow
    and hosts the rendezvous, the others run `launch node`; its container script is run here with sh."""
    import jsonschema
    from prefect.utilities.templating import apply_values
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = json.loads((ROOT / "deployments" / "k8s-multinode-job-template.json").read_text())
    variables = template["variables"]
    assert {"nodes", "gpus_per_node"} <= set(variables["properties"])
    values = {k: v.get("default") for k, v in variables["properties"].items()}
    values.update(nodes=3, gpus_per_node=4, command="prefect flow-run execute", env={}, labels={}, annotations={})
    jsonschema.validate({k: v for k, v in values.items() if v is not None and k != "cluster_config"},
                        {**variables, "definitions": variables.get("definitions", {})})
    rendered = apply_values(template["job_configuration"], values)
    KubernetesWorkerJobConfiguration(**rendered)  # the worker's own model accepts it
    spec = rendered["job_manifest"]["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 3, 3)
    assert spec["successPolicy"] == {"rules": [{"succeededIndexes": "0"}]}
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == "sft-rdzv" and spec["template"]["metadata"]["labels"]["sft-pipeline/rdzv"] == "sft-rdzv"
    c = pod["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 4 == c["resources"]["requests"]["nvidia.com/gpu"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}
    assert env["SFT_PIPELINE_NODES"] == "3x4" and env["SFT_PIPELINE_RDZV_ENDPOINT"] == "$(JOB_NAME)-0.sft-rdzv:29400"
    assert env["JOB_NAME"] == {"fieldRef": {"fieldPath": "metadata.labels['job-name']"}}
    assert env["SFT_PIPELINE_PUBLISH"] == "/mnt/sft-store/.launch/$(JOB_NAME).json"
    # the container's script: index 0 runs the flow command, every other index `launch node`
    (tmp_path / "python").write_text("#!/bin/sh\necho python \"$@\"\n")
    (tmp_path / "python").chmod(0o755)
    runs = {}
    for index in ("0", "2"):
        runs[index] = subprocess.run(c["command"] + ["echo", "flow"], capture_output=True, text=True, env={
            "PATH": f"{tmp_path}:/usr/bin:/bin", "JOB_COMPLETION_INDEX": index,
            "SFT_PIPELINE_PUBLISH": "/s/.launch/j.json"}).stdout.strip()
    assert runs == {"0": "flow", "2": "python -m sft_pipeline.launch node --publish /s/.launch/j.json"}
    from sft_pipeline import launch  # what the flow's pod reads from those variables

    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            if isinstance(v, str):
                mp.setenv(k, v.replace("$(JOB_NAME)", "sft-abc"))
        assert launch.multinode_from_env() == {"nnodes": 3, "rdzv_endpoint": "sft-abc-0.sft-rdzv:29400",
                                               "rdzv_id": "sft-abc", "publish": "/mnt/sft-store/.launch/sft-abc.json"}


# ------------------------------------------------------------------------------------------------ bench/scaling.py
def test_scaling_bench_arguments_and_table():
    from bench import scaling

    a = scaling.parse_args(["--gpus", "4", "--strategies", "ddp,fsdp", "--out", "/x"])
    assert (a.gpus, a.strategies, a.device, a.runs) == (4, ["ddp", "fsdp"], "cuda", 2)
    for bad in (["--gpus", "3"], ["--gpus", "1"], ["--strategies", "zero3"], ["--device", "cpu"],
                ["--device", "cpu", "--tiny", "--strategies", "fsdp"], ["--speed", "turbo=1"],
                ["--set", "model.attn_implementation=fastest"]):
        with pytest.raises(SystemExit):
            scaling.parse_args(bad)
    a = scaling.parse_args(["--speed", "plan=estimate,warm=false,cap=4", "--set", "model.attn_implementation=sdpa"])
    assert a.speed_dict == {"plan": "estimate", "warm": False, "cap": 4}
    job = scaling.make_job({"model": "/m", "train": "/t.parquet", "tokenizer": "/m"}, 2, "ddp", 5, "cuda", False,
                           Path("/r"), a.set, a.speed_dict)
    assert job.model.attn_implementation == "sdpa" and job.speed == a.speed_dict
    assert job.training.num_processes == 2 and job.training.max_steps == 5
    results = [{"setting": "1gpu-run0", "gpus": 1, "strategy": "ddp", "tok_s": 9000.0, "per_device_batch_size": 4,
                "gradient_accumulation_steps": 4, "peak_gpu_gib_rank0": 30.0, "losses": [2.0, 1.5]},
               {"setting": "2gpu-ddp-run0", "gpus": 2, "strategy": "ddp", "tok_s": 16200.0, "per_device_batch_size": 4,
                "gradient_accumulation_steps": 2, "peak_gpu_gib_rank0": 30.5, "losses": [2.0, 1.49]},
               {"setting": "1gpu-run1", "gpus": 1, "strategy": "ddp", "tok_s": 9200.0, "per_device_batch_size": 4,
                "gradient_accumulation_steps": 4, "peak_gpu_gib_rank0": 30.0, "losses": [2.0, 1.5]},
               {"setting": "2gpu-fsdp-run0", "gpus": 2, "strategy": "fsdp", "error": "ValueError: boom"}]
    rows = scaling.summarize(results, 2)
    assert rows["1gpu"]["median"] == 9100 and rows["2gpu-ddp"]["efficiency"] == round(16200 / (2 * 9100), 3)
    text = scaling.table(rows, "card")
    assert "0.89" in text and "failed: ValueError: boom" in text and "1.4900" in text


# ~25 s here idle: the bench's CPU dry run, 1 vs 2 processes; the same effective batch gives the same loss curve
@pytest.mark.slow  # 37 s in CI here (2-core, 2026-12-07)
def test_scaling_dry_run_same_effective_batch_same_losses(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.scaling", "--device", "cpu", "--tiny", "--gpus", "2",
                           "--runs", "1", "--steps", "4", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "scaling.json").read_text())
    one, two = (data["summary"][k] for k in ("1gpu", "2gpu-ddp"))
    assert one["batch"] == "4x2" and two["batch"] == "4x1"  # micro x accumulation (x 2 ranks) = 8 either way
    assert len(one["losses"]) == 4 and all(math.isclose(x, y, abs_tol=2e-3) for x, y in zip(one["losses"], two["losses"]))
    assert "efficiency" in proc.stdout


@pytest.mark.slow  # 67 s in CI here (2-core, 2026-12-07)
def test_the_flow_trains_with_two_processes_and_one_process_reuses_it(tmp_path):
    """The tiny recipe through the CLI with two ranks (gloo), then again with one: the process count is not in the
    train key, so every stage is reused. ~2-3 min here."""
    from tests.conftest import STAGES, run_flow

    store = tmp_path / "store"
    proc, summary = run_flow(store, "training.num_processes=2", "training.device=cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [summary["stages"][s]["state"] for s in STAGES] == ["Completed"] * len(STAGES)
    assert summary["train"]["world_size"] == 2 and summary["train"]["effective_batch"] == 8
    assert summary["eval"]["tuned"]["eval_loss"] < 0.5 * summary["eval"]["base"]["eval_loss"], summary["eval"]
    proc, again = run_flow(store, "training.num_processes=1", "training.device=cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [again["stages"][s]["state"] for s in STAGES] == ["Cached"] * len(STAGES)
