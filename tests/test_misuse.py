"""Hardening against a hostile or careless user (issue 11), one table per class of harm:

1. data loss: a directory that is not a store is refused; clean-up touches only what ``Store.write`` made;
2. worse adapters promoted: the base must be beaten by a margin, a diverged run never promoted, pointers survive a
   moved store and an unreadable pointer;
3. secrets and files echoed: block names must be names; a file that is not a recipe is never quoted;
4. writes outside the store: names that become path components are checked; ``--summary-json`` must be a file;
5. one odd row fails the whole load: local files are read raw, odd rows counted, undecodable files named;
6. failures that repeat forever: a damaged checkpoint is skipped, values that would fail later are refused, YAML
   alias bombs are refused before they expand;
7. interrupts: Ctrl-C stops within seconds with one line and exit code 130;
8. W&B: a user's WANDB_MODE wins under ``tracking.mode=auto``.

The CLI cases of these classes (exit 2, one line, no canary printed, nothing in the test's directory changed) are
rows of the one bad-input table in ``test_bad_inputs.py``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sft_pipeline import health, promote
from sft_pipeline.chat_data import chat_problem, read_local_splits
from sft_pipeline.cli import main
from sft_pipeline.config import DataConfig, load_config
from sft_pipeline.errors import ConfigError, StageFailure
from sft_pipeline.secrets import wandb_mode
from sft_pipeline.store import STORE_MARKER, Store
from sft_pipeline.training.checkpoints import SEALED, last_checkpoint, seal_checkpoint
from tests.conftest import ROOT
from tests.test_bad_inputs import CANARY, snapshot, write_jsonl


@pytest.fixture
def store(tmp_path) -> Path:
    """A store in use: marked, one finished artifact."""
    root = tmp_path / "store"
    st = Store(root)
    st.claim()
    with st.write("data", "k" * 24) as tmp:
        (tmp / "train_sft.parquet").write_bytes(b"finished work")
    return root


def test_the_store_from_the_environment_is_checked_too(home, capsys, monkeypatch):
    monkeypatch.setenv("SFT_PIPELINE_STORE", str(home))
    before = snapshot(home)
    with pytest.raises(SystemExit) as exit_:
        main(["run"])
    assert exit_.value.code == 2 and "is not an sft-pipeline store" in capsys.readouterr().err
    assert snapshot(home) == before


def test_a_read_only_store_is_refused(store, capsys, monkeypatch):
    """Root ignores permission bits here, so the read-only mount is simulated where the store asks the OS."""
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == store else real(p, mode))
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--store", str(store)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.strip() == f"error: store {store} is read-only: give a directory you can " \
                                                    "write to"


# ------------------------------------------------------------------------------------------- 1. clean-up
def test_clean_tmp_refuses_a_foreign_directory_and_removes_nothing(home):
    before = snapshot(home)
    with pytest.raises(ConfigError, match="is not an sft-pipeline store"):
        Store(home).clean_tmp()
    assert snapshot(home) == before


def test_clean_tmp_removes_only_what_store_write_left(tmp_path):
    st = Store(tmp_path / "store")
    st.claim()
    tmp = st.root / ".tmp"
    child = subprocess.Popen(["true"])
    child.wait()
    dead = child.pid  # a process that just ended: its pid is free
    ours = {f"data-{'a' * 24}-{dead}-0123abcd": False, f"old-train-{'b' * 24}-89abcdef": False,
            f"format-fmt-6d2e-{dead}-deadbeef": False,            # a key with a dash
            f"train-{'c' * 24}-{os.getpid()}-0badc0de": True}     # a live writer: kept
    foreign = ["my-project", "nodash", "a-b", "x-y-12-notours", "data-k-12-0123abcd-extra", "old-notes"]
    for name in [*ours, *foreign]:
        (tmp / name).mkdir(parents=True)
        (tmp / name / "f").write_text("x")
    (tmp / "a-file-1-0123abcd").write_text("a file, not a dir")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("x")
    os.symlink(outside, tmp / f"data-{'d' * 24}-{dead}-0123abcd")  # our pattern, but a link: never followed
    st.clean_tmp()
    left = sorted(p.name for p in tmp.iterdir())
    expected = sorted([n for n, keep in ours.items() if keep] + foreign + ["a-file-1-0123abcd",
                                                                          f"data-{'d' * 24}-{dead}-0123abcd"])
    assert left == expected
    assert (outside / "precious").read_text() == "x"


def test_a_store_from_before_the_marker_is_adopted(tmp_path):
    root = tmp_path / "old-store"
    for d in ("data", ".tmp", "runs", ".prefect", "models"):
        (root / d).mkdir(parents=True)
    with Store(root).write("report", "k1") as tmp:  # a stage added later: known by its manifests
        (tmp / "r.md").write_text("x")
    Store(root).clean_tmp()
    assert (root / STORE_MARKER).is_file()
    (tmp_path / "other" / "stuff" / "k1").mkdir(parents=True)  # looks like a stage dir, but has no manifest
    with pytest.raises(ConfigError, match="1 other entries"):
        Store(tmp_path / "other").clean_tmp()


# ------------------------------------------------------------------------------------------- 2. promotion
def _artifacts(st: Store, tag: str, base: float, tuned: float, history: list | None = None,
               test_split: bytes = b"test rows v1"):
    with st.write("format", f"fmt-{test_split.hex()[:12]}") as tmp:
        (tmp / "test_sft.parquet").write_bytes(test_split)
    with st.write("evaluate", f"ev-{tag}") as tmp:
        (tmp / "metrics.json").write_text(json.dumps({"split": "test_sft", "rows": 8, "base": {"eval_loss": base},
                                                      "tuned": {"eval_loss": tuned}}))
    with st.write("save_adapter", f"ad-{tag}") as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps({"tag": tag}))
    metrics = st.ref("evaluate", f"ev-{tag}")
    checked = health.check(history or [{"loss": 3.0}, {"loss": 2.0}], metrics.read_json("metrics.json"))
    return {"adapter": st.ref("save_adapter", f"ad-{tag}"), "metrics": metrics,
            "chats": st.ref("format", f"fmt-{test_split.hex()[:12]}"), "checked": checked}


RISING = [{"loss": x} for x in (2.0, 1.9, 2.5, 3.1, 4.0, 6.0, 9.0, 12.0)]
FALLING = [{"loss": x} for x in (9.0, 6.0, 4.0, 3.0, 2.5, 2.2, 2.1, 2.0)]
PROMOTION_CASES = [
    # (base, tuned, log history, margin) -> promoted?, diverged?, text in the reason
    ("learning rate 1: worse than its base", 10.4, 43.9, FALLING, 0.01, False, True,
     "training diverged (the tuned model's test loss (43.9) is higher than the base model's (10.4))"),
    ("train loss rising", 10.4, 9.0, RISING, 0.01, False, True, "training diverged (the training loss rose over the run"),
    ("train loss nan", 10.4, 9.0, [{"loss": 3.0}, {"loss": math.nan}], 0.01, False, True,
     "training diverged (the training loss became NaN or infinite"),
    ("tuned loss nan", 10.0, math.nan, FALLING, 0.01, False, True, "tuned eval loss is nan"),
    ("equal to its base", 10.4, 10.4, FALLING, 0.01, False, False, "does not beat the base model's 10.4000 by"),
    ("within the margin", 10.0, 9.95, FALLING, 0.01, False, False, "evaluation.promotion_margin=0.01"),
    ("base loss inf", math.inf, 3.0, FALLING, 0.01, False, False, "no baseline to beat"),
    ("beats its base by the margin", 10.0, 9.8, FALLING, 0.01, True, False, "first adapter promoted"),
    ("no margin asked", 10.0, 9.99, FALLING, 0.0, True, False, "first adapter promoted"),
    # ... and the benchmark stage's main scores (base, tuned) -> benchmark.max_regression (a share: 0.05 = 5 points)
    ("a benchmark regressed", 10.0, 9.0, FALLING, 0.01, False, False, "the tuned model regressed a benchmark by more "
     "than benchmark.max_regression=0.05 (5 points): ifbench prompt-level strict 30.0 % -> 20.0 % (-10.0 points)",
     {"ifbench": (0.30, 0.20)}, 0.05),
    ("two benchmarks regressed", 10.0, 9.0, FALLING, 0.01, False, False, "regressed 2 benchmarks by more than "
     "benchmark.max_regression=0.02 (2 points): ifbench prompt-level strict 30.0 % -> 27.0 % (-3.0 points); arc_easy",
     {"ifbench": (0.30, 0.27), "arc_easy": (0.60, 0.50)}, 0.02),
    ("a regression within max_regression", 10.0, 9.0, FALLING, 0.01, True, False, "first adapter promoted",
     {"ifbench": (0.30, 0.25)}, 0.05),  # exactly 5 points: not more than
    ("a benchmark improved", 10.0, 9.0, FALLING, 0.01, True, False, "first adapter promoted",
     {"ifbench": (0.30, 0.60)}, 0.0),
    ("the loss decides first", 10.0, 10.0, FALLING, 0.01, False, False, "evaluation.promotion_margin",
     {"ifbench": (0.30, 0.0)}, 0.05),
]


def _main_scores(benchmarks: dict | None) -> list[dict]:
    """The benchmark stage's rows for ``{benchmark: (base, tuned)}``: one main score each, and a score that is not
    main and regressed (never a reason)."""
    rows = []
    for name, (base, tuned) in (benchmarks or {}).items():
        rows.append({"benchmark": name, "metric": "prompt_strict", "label": "prompt-level strict", "primary": True,
                     "base": base, "tuned": tuned, "delta": tuned - base})
        rows.append({"benchmark": name, "metric": "other", "label": "other", "primary": False, "base": 1.0,
                     "tuned": 0.0, "delta": -1.0})
    return rows


@pytest.mark.parametrize("base, tuned, history, margin, promoted, diverged, reason, benchmarks, max_regression",
                         [(*c[1:], *(None, 0.05)[len(c) - 8:]) for c in PROMOTION_CASES],
                         ids=[c[0] for c in PROMOTION_CASES])
def test_only_an_adapter_that_beats_its_base_is_promoted(base, tuned, history, margin, promoted, diverged, reason,
                                                         benchmarks, max_regression, tmp_path):
    st = Store(tmp_path)
    decision = promote.consider(st, "tiny", test_split="test_sft", margin=margin, max_regression=max_regression,
                                benchmarks=_main_scores(benchmarks), **_artifacts(st, "a", base, tuned, history))
    assert decision["promoted"] is promoted and reason in decision["reason"], decision["reason"]
    assert (promote.read_pointer(st, "tiny") is not None) is promoted
    assert (decision["diverged"] is not None) is diverged
    dropped = [n for n, (b, t) in (benchmarks or {}).items() if b - t > max_regression + 1e-9]
    assert [r["benchmark"] for r in decision["regressions"]] == dropped  # also where the loss decided first


def test_the_pointer_is_relative_and_survives_a_moved_store(tmp_path):
    st = Store(tmp_path / "a")
    assert promote.consider(st, "tiny", test_split="test_sft", **_artifacts(st, "a", 10.0, 2.0))["promoted"]
    assert json.loads(promote.pointer_path(st, "tiny").read_text())["adapter"] == "save_adapter/ad-a"
    shutil.move(tmp_path / "a", tmp_path / "b")
    moved = Store(tmp_path / "b")
    worse = promote.consider(moved, "tiny", test_split="test_sft", **_artifacts(moved, "w", 10.0, 3.0))
    assert not worse["promoted"] and "3.0000 does not beat the promoted 2.0000" in worse["reason"]
    assert worse["promoted_adapter"] == str(moved.root / "save_adapter" / "ad-a")


def test_an_absolute_pointer_from_a_moved_store_is_still_found(tmp_path):
    st = Store(tmp_path / "b")
    arts = _artifacts(st, "a", 10.0, 2.0)
    promote.pointer_path(st, "tiny").parent.mkdir(parents=True)
    promote.pointer_path(st, "tiny").write_text(json.dumps({"adapter": "/gone/elsewhere/save_adapter/ad-a",
                                                            "eval_loss": 2.0, "test_set": "x"}))
    assert promote.read_pointer(st, "tiny")["adapter"] == str(Path(arts["adapter"].path))


@pytest.mark.parametrize("content", [b"{not json", b"", b"\xff\xfe\x00", b'{"adapter": 5}', b"[1, 2]"],
                         ids=["truncated", "empty", "binary", "wrong type", "not a mapping"])
def test_an_unreadable_pointer_is_moved_aside_and_named(content, tmp_path, caplog):
    st = Store(tmp_path)
    path = promote.pointer_path(st, "tiny")
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="sft_pipeline.promote"):
        decision = promote.consider(st, "tiny", test_split="test_sft", **_artifacts(st, "a", 10.0, 2.0))
    assert decision["promoted"] and "could not be read and was moved aside to" in decision["reason"]
    aside = [p for p in path.parent.iterdir() if ".unreadable-" in p.name]
    assert len(aside) == 1 and aside[0].read_bytes() == content  # kept for a look, out of the way
    assert str(path) in caplog.text
    again = promote.consider(st, "tiny", test_split="test_sft", **_artifacts(st, "b", 10.0, 3.0))
    assert not again["promoted"] and "does not beat the promoted 2.0000" in again["reason"]  # recovered


@pytest.mark.parametrize("recipe", ["../evil", "/tmp/evil", "a/b", ".hidden", ""])
def test_a_recipe_name_never_becomes_a_path_outside_promoted(recipe, tmp_path):
    with pytest.raises(ConfigError, match="recipe must be a plain name"):
        promote.pointer_path(Store(tmp_path), recipe)


# ------------------------------------------------------------------------------------------- 5. odd rows
GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
ODD_ROWS = [
    # (row, what row validation says: None = kept)
    ({"messages": "Hi there"}, "messages is not a non-empty list"),
    ({"messages": [{"role": "user", "content": "Hi", "name": "bob"},
                   {"role": "assistant", "content": "Ho", "weight": 1}]}, None),  # extra keys dropped
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]},
     "empty or non-string content"),
    ({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "x"}]},
     "empty or non-string content"),
    ({"messages": ["Hi", "Ho"]}, "a message is not a {role, content} mapping"),
    ({"messages": [{"role": 3, "content": "x"}, {"role": "assistant", "content": "x"}]}, "unknown role '3' (roles: system, user, assistant)"),
    ({"messages": None}, "messages is not a non-empty list"),
    ({"prompt": "no messages at all"}, "messages is not a non-empty list"),
    (["not", "a", "mapping"], "messages is not a non-empty list"),
    ({"messages": {"role": "user"}}, "messages is not a non-empty list"),
]


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_one_odd_row_is_counted_not_fatal(fmt, tmp_path):
    rows = [GOOD] * 3 + [r for r, _ in ODD_ROWS]
    train = tmp_path / f"train_sft.{fmt}"
    if fmt == "json":
        train.write_text(json.dumps(rows))
    else:
        write_jsonl(train, rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([GOOD] * 8), tmp_path / "test_sft.parquet")
    data = DataConfig(source="local", dataset=str(tmp_path))
    dsd = read_local_splits(data, {"train_sft": [str(train)], "test_sft": [str(tmp_path / "test_sft.parquet")]})
    problems = [chat_problem(m) for m in dsd["train_sft"]["messages"]]
    assert problems == [None] * 3 + [why for _, why in ODD_ROWS]
    assert dsd["train_sft"]["messages"][4] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ho"}]
    assert dsd["test_sft"].num_rows == 8


def test_a_string_messages_column_in_parquet_is_counted_invalid(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"messages": ["a", "b"]}), tmp_path / "train_sft.parquet")
    dsd = read_local_splits(DataConfig(source="local", dataset=str(tmp_path)),
                            {"train_sft": [str(tmp_path / "train_sft.parquet")]})
    assert [chat_problem(m) for m in dsd["train_sft"]["messages"]] == ["messages is not a non-empty list"] * 2


UNDECODABLE = [
    ("train_sft.parquet", b"PAR1 garbage " + CANARY.encode(), "could not read the parquet file"),
    ("train_sft.jsonl", b'{"messages": []}\n{"messages": [' + CANARY.encode() + b"\n", "line 2 is not valid JSON"),
    ("train_sft.jsonl", b"\xff\xfe\xfa" + CANARY.encode(), "is not UTF-8 text"),
    ("train_sft.json", b"[{" + CANARY.encode(), "is not valid JSON"),
]


@pytest.mark.parametrize("name, content, text", UNDECODABLE, ids=[f"{u[0]}: {u[2]}" for u in UNDECODABLE])
def test_an_undecodable_file_is_named(name, content, text, tmp_path):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(StageFailure) as raised:
        read_local_splits(DataConfig(source="local", dataset=str(tmp_path)), {"train_sft": [str(tmp_path / name)]})
    assert text in str(raised.value) and str(tmp_path / name) in str(raised.value)
    assert CANARY not in str(raised.value)


# ------------------------------------------------------------------------------------------- 6. checkpoints
def _checkpoints(work: Path, steps: list[int]) -> None:
    for s in steps:
        c = work / f"checkpoint-{s}"
        c.mkdir(parents=True)
        (c / "adapter_model.safetensors").write_bytes(os.urandom(4096))
        (c / "optimizer.pt").write_bytes(os.urandom(8192))
        (c / "trainer_state.json").write_text(json.dumps({"global_step": s}))
        seal_checkpoint(c)


def _truncate(c: Path):
    (c / "optimizer.pt").write_bytes(b"")


def _flip(c: Path):  # same size, other bytes: only the hash sees it
    p = c / "adapter_model.safetensors"
    p.write_bytes(bytes(b ^ 0xFF for b in p.read_bytes()))


def _delete(c: Path):
    (c / "trainer_state.json").unlink()


def _bad_seal(c: Path):
    (c / SEALED).write_text("{half")


def _unsealed(c: Path):
    (c / SEALED).unlink()


CHECKPOINT_CASES = [  # damage to the newest checkpoint -> what is resumed from, and whether it is warned about
    ("truncated", _truncate, "size changed: optimizer.pt", True),
    ("bytes flipped", _flip, "content changed: adapter_model.safetensors", True),
    ("file deleted", _delete, "file missing: trainer_state.json", True),
    ("seal unreadable", _bad_seal, "seal file", True),
    ("cut short while saving", _unsealed, None, False),
]


@pytest.mark.parametrize("damage, why, warned", [c[1:] for c in CHECKPOINT_CASES],
                         ids=[c[0] for c in CHECKPOINT_CASES])
def test_a_damaged_checkpoint_falls_back_to_the_one_before(damage, why, warned, tmp_path, caplog):
    _checkpoints(tmp_path, [5, 10])
    damage(tmp_path / "checkpoint-10")
    with caplog.at_level(logging.WARNING, logger="sft_pipeline.train"):
        assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-5")
    assert not (tmp_path / "checkpoint-10").exists()
    assert (why in caplog.text and "checkpoint-10" in caplog.text) if warned else not caplog.text
    damage(tmp_path / "checkpoint-5")
    assert last_checkpoint(tmp_path) is None  # nothing intact left: training starts fresh


def test_a_checkpoint_sealed_before_hashes_were_recorded_still_resumes(tmp_path):
    _checkpoints(tmp_path, [5])
    (tmp_path / "checkpoint-5" / SEALED).write_text("")  # what seal_checkpoint wrote before
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-5")


# ------------------------------------------------------------------------------------------- 8. W&B mode
WANDB_MODES = [
    # (tracking.mode, key found?, the user's WANDB_MODE) -> the mode used
    ("auto", True, None, "online"),
    ("auto", False, None, "offline"),
    ("auto", True, "offline", "offline"),
    ("auto", True, "disabled", "disabled"),
    ("auto", True, "dryrun", "offline"),
    ("auto", False, "online", "online"),  # authenticate then says a key is needed
    ("auto", True, "bogus", "online"),
    ("offline", True, "online", "offline"),
    ("online", True, "offline", "online"),
]


@pytest.mark.parametrize("mode, key, env, expected", WANDB_MODES)
def test_a_users_wandb_mode_wins_under_auto(mode, key, env, expected):
    assert wandb_mode(mode, "env:WANDB_API_KEY" if key else None, {"WANDB_MODE": env} if env else {}) == expected


# ------------------------------------------------------------------------------------------- config, directly
def test_what_the_config_accepts_today_still_loads():
    for recipe in ("tiny", "mistral-7b-qlora", "zephyr-7b-qlora"):
        cfg = load_config(recipe)
        assert cfg.evaluation.promotion_margin == 0.01 and cfg.recipe == recipe


# ------------------------------------------------------------------------------------------- 7. Ctrl-C
@pytest.mark.slow  # 21 s in CI here (2-core, 2026-12-07)
def test_ctrl_c_stops_within_seconds_with_one_line_and_exit_130(tmp_path):
    """Takes ~1-3 min here: a tiny run long enough to be interrupted in training, SIGINT to its process group."""
    store, summary = tmp_path / "store", tmp_path / "summary.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sft_pipeline.cli", "run", "--store", str(store), "--summary-json", str(summary),
         "--set", "training.max_steps=2000", "--set", "training.save_steps=5"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "PYTHONFAULTHANDLER": "1"},  # SIGABRT below prints where every thread is
        # as from a terminal: a pytest started in the background by a shell without job control ignores SIGINT, and
        # a child inheriting that would never see the Ctrl-C (Python installs its handler only over the default)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:  # until training has a checkpoint
        if any(store.glob(".work/train/*/checkpoint-*")):
            break
        time.sleep(1)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    t0 = time.monotonic()
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGABRT)
        err = proc.communicate(timeout=60)[1]
        pytest.fail(f"still running 120 s after SIGINT; its threads:\n{err[-12000:]}")
    took = time.monotonic() - t0
    assert proc.returncode == 130, err[-3000:]
    assert took < 30, took
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: interrupted; run the same command again to resume"), err[-3000:]
    assert "ConnectError" not in err
    assert not [p for p in (store / ".tmp").iterdir()] if (store / ".tmp").exists() else True


# ------------------------------------------------------------------------------------------- 7. exit codes
class ConnectError(Exception):
    """Stands for httpx's: the Prefect server went away."""


OUTCOMES = [
    # (exception, summary status) -> exit code, start of the last line
    (ConnectError("All connection attempts failed"), "Completed", 0, "warning: the run completed"),
    (ConnectError("All connection attempts failed"), "Running", 1, "error: ConnectError"),
    (ConnectError("All connection attempts failed"), None, 1, "error: ConnectError"),
    (StageFailure("data: bad rows"), "Failed", 1, "error: data: bad rows"),
    (StageFailure("data: bad rows"), "Completed", 1, "error: data: bad rows"),  # only a lost server is forgiven
    (ConfigError("invalid config: x"), None, 2, "error: invalid config: x"),
]


@pytest.mark.parametrize("exc, status, code, line", OUTCOMES, ids=[f"{type(o[0]).__name__}-{o[1]}" for o in OUTCOMES])
def test_exit_code_and_summary_agree(exc, status, code, line):
    from sft_pipeline.cli import outcome

    got_code, got_line = outcome(exc, {"status": status} if status else None)
    assert (got_code, got_line.startswith(line)) == (code, True), got_line


def test_a_diverged_run_ends_with_a_warning(capsys):
    from sft_pipeline.cli import _print_summary

    _print_summary({"stages": {}, "promotion": {"promoted": False, "reason": "training diverged (x)", "pointer": "p",
                                                "diverged": "tuned eval loss 43.9000 is above the base model's 10.4"}})
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == "warning: training diverged (tuned eval loss 43.9000 is above the base model's 10.4); the " \
                   "adapter was not promoted"


@pytest.mark.parametrize("rows, fails", [(0, True), (7, True), (8, False), (500, False)])
def test_a_split_left_tiny_by_a_fraction_is_one_line(rows, fails):
    from sft_pipeline.chat_data import check_split_rows

    if fails:
        with pytest.raises(StageFailure, match=rf"data.test_subset: split 'test_sft' keeps {rows} rows .* at least 8"):
            check_split_rows("test_sft", "test_subset", rows, 8)
    else:
        check_split_rows("test_sft", "test_subset", rows, 8)
