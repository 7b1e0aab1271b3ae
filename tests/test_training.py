"""The training package as one can read it (module and function sizes, no CLI-side imports), the train key's code
hash (comments and docstrings left out, the same on every Python), and a stop requested mid-training (SIGTERM): a
sealed checkpoint at that step, ``TrainingInterrupted``, and a rerun that ends with the uninterrupted adapter."""
from __future__ import annotations

import ast
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

TRAINING = ROOT / "sft_pipeline" / "training"


def test_every_training_module_and_function_is_short():
    for path in sorted(TRAINING.glob("*.py")):
        text = path.read_text()
        assert len(text.splitlines()) <= 300, f"{path.name}: {len(text.splitlines())} lines"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= 60, f"{path.name}: {node.name} is {length} lines"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_stages_and_training_never_import_the_cli_side():
    """tasks/ and sft_pipeline/training/ (and every project module they import, at any depth) import neither the CLI
    nor the CLI-side modules plan and preflight."""
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for d in ("flows", "tasks", "sft_pipeline") for p in (ROOT / d).rglob("*.py")}
    cli_side = {"sft_pipeline.cli", "sft_pipeline.plan", "sft_pipeline.preflight"}
    start = [m for m in files if m.startswith(("tasks.", "sft_pipeline.training"))]
    seen, todo, bad = set(), list(start), []
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        for dep in _imports(files[mod]):
            if dep in cli_side:
                bad.append(f"{mod} imports {dep}")
            elif dep in files:
                todo.append(dep)
    assert len(start) > 10 and not bad, bad


# ------------------------------------------------------------------------------------------------ the code hash
def _copy_train_code(dst: Path) -> None:
    import tasks.train
    from sft_pipeline.source_hash import sources

    for spec in tasks.train.CODE:
        path = spec.partition(":")[0]
        src = ROOT / path
        if src.is_dir():
            shutil.copytree(src, dst / path, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (dst / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst / path)
    assert sources(tasks.train.CODE[0], dst)


def test_a_comment_or_docstring_edit_keeps_the_train_key_and_a_code_edit_changes_it(tmp_path):
    import flows.stages
    import tasks.train
    from sft_pipeline.source_hash import source_hash

    here = source_hash(tasks.train.CODE)
    assert here in flows.stages.BY_NAME["train"].code  # the train row's code holds the hash
    _copy_train_code(tmp_path)
    assert source_hash(tasks.train.CODE, tmp_path) == here
    run = tmp_path / "sft_pipeline" / "training" / "run.py"
    original = run.read_text()
    edits = {
        "comment": original.replace("# noqa: BLE001 - only out of memory is handled here",
                                    "# noqa: BLE001 - an edited comment"),
        "docstring": original.replace('"""One training, the same function', '"""One training (edited), the same'),
        "blank lines": original.replace("\n\n\ndef ", "\n\n\n\n# a new comment line\ndef "),
        "code": original.replace('metrics["resumed_from_step"] = metrics.get("start_step", 0)',
                                 'metrics["resumed_from_step"] = metrics.get("start_step", 1)'),
    }
    got = {}
    for what, text in edits.items():
        assert text != original, what
        run.write_text(text)
        got[what] = source_hash(tasks.train.CODE, tmp_path)
    run.write_text(original)
    models = tmp_path / "sft_pipeline" / "models.py"
    models.write_text(models.read_text().replace('def load_tuned(', 'def load_tuned(  # not the train stage\'s\n'))
    got["a function the stage does not run"] = source_hash(tasks.train.CODE, tmp_path)
    assert got == {**{k: here for k in got}, "code": got["code"]} and got["code"] != here


def _interpreters() -> list[Path]:
    """Other CPython versions on this machine (pyenv's), to check the hash is the same on each."""
    found = sorted(Path.home().glob(".pyenv/versions/3.1[0-9]*/bin/python"))
    return [p for p in found if os.access(p, os.X_OK)]


def test_the_code_hash_is_the_same_on_every_python():
    import sys

    import tasks.train
    from sft_pipeline.source_hash import source_hash

    others = [p for p in _interpreters() if not str(p.resolve()).startswith(sys.base_prefix)]
    if not others:
        pytest.skip("no other Python version on this machine")
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from sft_pipeline.source_hash import source_hash; "
            f"print(sys.version_info[:2], source_hash({tasks.train.CODE!r}))")
    want = source_hash(tasks.train.CODE)
    for python in others:
        proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.split(")")[-1].strip() == want, (python, proc.stdout)


# ------------------------------------------------------------------------------------------------ stop requests
def test_sigterm_requests_a_stop_and_changes_nothing_else():
    from sft_pipeline.training import stop

    before = stop.install_sigterm()
    try:
        assert stop.requested() is None
        os.kill(os.getpid(), signal.SIGTERM)  # delivered to the main thread before kill returns here
        os.kill(os.getpid(), signal.SIGTERM)  # a second one: still only the request
        assert stop.requested() == "SIGTERM"
    finally:
        signal.signal(signal.SIGTERM, before)
        stop.clear()
    assert stop.requested() is None


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """The tiny recipe's base model (random weights) and token ids as the format stage writes them."""
    import datasets
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from sft_pipeline import synthetic
    from sft_pipeline.models import ARCHITECTURES, build_tokenizer

    root = tmp_path_factory.mktemp("tiny-train")
    torch.manual_seed(0)
    MistralForCausalLM(MistralConfig(**ARCHITECTURES["tiny-mistral"])).save_pretrained(root / "model")
    tok = build_tokenizer()
    tok.save_pretrained(root / "tokenizer")
    rows = synthetic.splits(64, 8, seed=0)["train_sft"]
    ids = tok.apply_chat_template([r["messages"] for r in rows], tokenize=True, return_dict=True)["input_ids"]
    datasets.Dataset.from_dict({"input_ids": [list(x)[:256] for x in ids]}).to_parquet(str(root / "train.parquet"))
    return root


def _job(root: Path, run: Path):
    from sft_pipeline.config import load_config
    from sft_pipeline.training.job import TrainJob

    cfg = load_config("tiny", ["training.max_steps=6", "training.save_steps=2", "training.logging_steps=1",
                               "training.device=cpu", "training.eval_strategy=no"])
    return TrainJob.from_config(cfg, train=root / "train.parquet", tokenizer=root / "tokenizer",
                                model_path=root / "model", work=run / "work", out=run / "out", device="cpu")


def _adapter(trainer, out: Path):
    from safetensors.torch import load_file

    from sft_pipeline.training.run import save_trained

    out.mkdir(parents=True, exist_ok=True)
    save_trained(trainer, {}, out)
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


# 166 s here with the 2 cores loaded (load average ~14; idle not measured): three short trainings of the tiny
# model on CPU (uninterrupted, stopped at step 3, resumed)
@pytest.mark.slow
def test_a_stop_at_step_k_saves_a_sealed_checkpoint_there_and_the_rerun_ends_as_if_uninterrupted(tiny_files, tmp_path):
    from transformers import TrainerCallback

    from sft_pipeline.errors import TrainingInterrupted, is_transient
    from sft_pipeline.training import stop
    from sft_pipeline.training.checkpoints import checkpoint_problem
    from sft_pipeline.training.run import train_until_done

    class StopDuringStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 2:  # step 3 runs: the request comes in the middle of it
                stop.request("SIGTERM")

    trainer, _ = train_until_done(_job(tiny_files, tmp_path / "reference"))
    reference = _adapter(trainer, tmp_path / "reference" / "out")
    job = _job(tiny_files, tmp_path / "stopped")
    try:
        with pytest.raises(TrainingInterrupted) as stopped:
            train_until_done(job, callbacks=[StopDuringStep()])
    finally:
        stop.clear()
    err = stopped.value
    assert (err.step, Path(err.checkpoint).name) == (3, "checkpoint-3") and not is_transient(err)
    assert str(err) == "train: stopped at step 3 (SIGTERM); checkpoint-3 is saved: run the same command again to resume"
    assert checkpoint_problem(Path(job.work) / "checkpoint-3") is None  # sealed like every checkpoint
    assert not (Path(job.out) / "adapter").exists()  # nothing half-trained was saved
    trainer, metrics = train_until_done(job)
    assert metrics["resumed_from_step"] == 3 and metrics["steps"] == 6
    resumed = _adapter(trainer, Path(job.out))
    assert resumed.keys() == reference.keys()
    diff = max((resumed[k].float() - reference[k].float()).abs().max().item() for k in resumed)
    assert diff <= 1e-6, f"adapters differ by {diff}"


def test_a_stop_requested_before_training_raises_at_once(tiny_files, tmp_path):
    from sft_pipeline.errors import TrainingInterrupted
    from sft_pipeline.training import run, stop

    stop.request("SIGTERM")
    try:
        with pytest.raises(TrainingInterrupted, match="stopped before its first step .*no checkpoint yet"):
            run.train(_job(tiny_files, tmp_path), data=object())  # nothing is built: the data is not even read
    finally:
        stop.clear()


def test_the_job_travels_as_json():
    from sft_pipeline.config import load_config
    from sft_pipeline.training.job import TrainJob

    job = TrainJob.from_config(load_config("tiny", ["lora.r=4"]), train=Path("/f/train.parquet"), tokenizer="/f/tok",
                               model_path="/m", work="/w", device="cpu", speed={"head": "lean"})
    again = TrainJob.from_json(json.loads(json.dumps(job.to_json())))
    assert again == job and again.lora.r == 4 and again.train == "/f/train.parquet" and again.out == "/w"
    from dataclasses import fields

    data = job.to_json()
    assert set(data) == {f.name for f in fields(TrainJob)}  # paths and config sections: no field for a secret
    assert not [k for k in data if k.endswith(("_token", "_key", "secret"))]
