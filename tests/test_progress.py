"""Live training progress: the log line per logging step (a real tiny Trainer) and the Prefect progress artifact."""
from __future__ import annotations

import logging
import re

import pytest

from sft_pipeline.progress import Progress
from tests.conftest import capture_log as capture


def test_one_line_per_logging_step_from_a_real_trainer(tmp_path):
    # ~5 s here (most of it importing torch/transformers): 6 steps of a 2-layer model on CPU, outside any Prefect run,
    # a checkpoint every 3 steps
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (12, 16))]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, logging_steps=2, per_device_train_batch_size=2,
                             learning_rate=1e-2, use_cpu=True, report_to="none", save_strategy="steps", save_steps=3,
                             disable_tqdm=True, include_num_input_tokens_seen=True)
    logger, lines = capture("test.progress.trainer")
    progress = Progress(logger, total_tokens=6 * 2 * 16)
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[progress]).train()

    assert lines.lines[0] == "train: 6 optimizer steps, 192 tokens"
    steps = [line for line in lines.lines if line.startswith("train: step")]
    assert len(steps) == 3, lines.lines
    for line, step, pct in zip(steps, (2, 4, 6), (33, 67, 100)):
        assert re.fullmatch(rf"train: step {step}/6 \({pct}%\)  loss \d+\.\d+  lr \d\.\de-\d\d  grad norm \S+  "
                            rf"[\d,]+ tok/s  ETA \d:\d\d:\d\d", line), line
    assert steps[-1].endswith("ETA 0:00:00")
    saved = [line for line in lines.lines if line.startswith("train: saved")]
    assert saved == [f"train: saved checkpoint-{n} ({tmp_path / f'checkpoint-{n}'})" for n in (3, 6)]
    assert all((tmp_path / f"checkpoint-{n}").is_dir() for n in (3, 6))  # the line names what is on disk
    assert progress.artifact_id is None  # no Prefect run: no artifact, no temporary server started, no error


def test_eval_and_final_entries_log_no_train_line():
    from transformers import TrainerState

    logger, lines = capture("test.progress.eval")
    progress = Progress(logger, artifact=False)
    state = TrainerState(max_steps=10, global_step=4)  # resumed from a checkpoint at step 4
    progress.on_train_begin(None, state, None)
    state.global_step = 10
    progress.on_log(None, state, None, logs={"eval_loss": 1.5, "step": 10})
    progress.on_log(None, state, None, logs={"train_loss": 2.0, "train_runtime": 3.0})
    assert lines.lines == ["train: 10 optimizer steps, resuming at step 4", "eval: step 10/10  eval loss 1.5"]


@pytest.mark.slow  # 17 s in CI here (2-core, 2026-12-07)
def test_progress_artifact_says_step_loss_and_eta_and_one_card_serves_every_attempt(tmp_path):
    # ~15 s here: prefect_test_harness starts a temporary server
    from prefect import flow, get_run_logger
    from prefect.client.orchestration import get_client
    from prefect.testing.utilities import prefect_test_harness
    from transformers import TrainerState, TrainingArguments

    from sft_pipeline.stop_marks import mark_stopped

    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)

    def card(client) -> tuple[float, str]:
        [art] = [a for a in client.read_artifacts() if a.type == "progress"]
        return art.data, art.description

    @flow
    def fake_training() -> tuple[list[str], list[tuple[float, str]]]:
        ids, seen = [], []
        with get_client(sync_client=True) as client:
            # attempt 1: starts, logs step 2, saves checkpoint-2, and is stopped at step 3 (no on_train_end)
            progress = Progress(get_run_logger(), total_tokens=1000)
            state = TrainerState(max_steps=4, num_input_tokens_seen=0)
            progress.on_train_begin(args, state, None)
            seen.append(card(client))
            state.global_step, state.num_input_tokens_seen = 2, 500
            progress.on_log(args, state, None, logs={"loss": 2.3456, "learning_rate": 1e-4, "step": 2})
            seen.append(card(client))
            progress.on_save(args, state, None)
            seen.append(card(client))
            ids.append(str(progress.artifact_id))
            mark_stopped(client, progress_flow_run(client), "Cancelled: checkpoint-2 kept; Retry resumes from step 2")
            seen.append(card(client))
            # attempt 2 (a Retry of the same flow run) resumes from checkpoint-2 and finishes, on the same card
            progress = Progress(get_run_logger(), total_tokens=1000)
            state = TrainerState(max_steps=4, global_step=2, num_input_tokens_seen=500)
            progress.on_train_begin(args, state, None)
            seen.append(card(client))
            state.global_step, state.num_input_tokens_seen = 4, 1000
            progress.on_log(args, state, None, logs={"loss": 1.25, "learning_rate": 1e-4, "step": 4})
            progress.on_train_end(args, state, None)
            seen.append(card(client))
            ids.append(str(progress.artifact_id))
            assert mark_stopped(client, progress_flow_run(client), "Cancelled") == 0  # a finished card stays
        return ids, seen

    def progress_flow_run(client):
        return client.read_artifacts()[0].flow_run_id

    with prefect_test_harness(server_startup_timeout=120):
        ids, seen = fake_training()
        with get_client(sync_client=True) as client:
            cards = [a for a in client.read_artifacts() if a.type == "progress"]
    assert ids[0] == ids[1] and [str(a.id) for a in cards] == ids[:1]  # one card, taken over by the Retry
    assert seen[0] == (0.0, "step 0/4 · starting: 4 optimizer steps, 1,000 tokens")
    assert seen[1][0] == 50.0 and re.fullmatch(r"step 2/4 · loss 2\.35 · ETA \d:\d\d:\d\d", seen[1][1]), seen[1]
    assert re.fullmatch(r"step 2/4 · loss 2\.35 · ETA \d:\d\d:\d\d · checkpoint-2 saved", seen[2][1]), seen[2]
    assert seen[3] == (50.0, "stopped at step 2/4 · loss 2.35 · Cancelled: checkpoint-2 kept; Retry resumes from "
                             "step 2")
    assert seen[4] == (50.0, "step 2/4 · resuming from checkpoint-2")
    assert seen[5][0] == 100.0 and re.fullmatch(r"step 4/4 · loss 1\.25 · done in \d:\d\d:\d\d", seen[5][1])


def test_the_card_is_refreshed_between_logging_steps_at_most_every_few_seconds(monkeypatch):
    from transformers import TrainerState

    import sft_pipeline.progress as progress_module

    clock = [100.0]
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: clock[0])
    progress = Progress(logging.getLogger("test.progress.card"))
    progress.artifact_id, shown = "card", []
    progress._update_artifact = lambda percent, text=None: (shown.append((percent, text)),
                                                            setattr(progress, "shown", clock[0]))
    state = TrainerState(max_steps=10, global_step=0)
    progress.on_train_begin(None, state, None)
    for step in range(1, 5):  # 2 s a step: refreshed after 6 s, not after each step
        clock[0] += 2.0
        state.global_step = step
        progress.on_step_end(None, state, None)
    assert shown == [(0.0, "step 0/10 · starting: 10 optimizer steps"), (30.0, "step 3/10 · ETA 0:00:14")]


def test_newest_sealed_checkpoint(tmp_path):
    from sft_pipeline.stop_marks import SEALED, newest_checkpoint

    from sft_pipeline.training.checkpoints import SEALED as TRAIN_SEAL  # the train stage's seal file
    assert SEALED == TRAIN_SEAL
    assert newest_checkpoint(tmp_path) is None
    for step, sealed in ((5, True), (10, True), (15, False)):  # checkpoint-15 was cut short while saving
        (tmp_path / f"checkpoint-{step}").mkdir()
        if sealed:
            (tmp_path / f"checkpoint-{step}" / SEALED).write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    assert newest_checkpoint(tmp_path) == (10, tmp_path / "checkpoint-10")


@pytest.mark.parametrize("step, expected", [(0, 0.0), (5, 50.0), (10, 100.0)])
def test_percent_by_optimizer_step(step, expected):
    from transformers import TrainerState

    assert Progress._percent(TrainerState(max_steps=10, global_step=step)) == expected


def test_resumed_run_counts_speed_and_eta_from_its_own_start(monkeypatch):
    from transformers import TrainerState

    import sft_pipeline.progress as progress_module

    clock = iter([100.0, 110.0])
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: next(clock))
    progress = Progress(logging.getLogger("test.progress.resume"), artifact=False)
    state = TrainerState(max_steps=10, global_step=4, num_input_tokens_seen=4000)  # reloaded from checkpoint-4
    progress.on_train_begin(None, state, None)
    state.global_step, state.num_input_tokens_seen = 6, 5000
    line = progress.line(state, {"loss": 0.51234, "learning_rate": 5.9e-3, "grad_norm": 0.8213})
    # 2 steps and 1,000 tokens in 10 s: 100 tok/s, 4 steps left at 5 s each
    assert line == "train: step 6/10 (60%)  loss 0.5123  lr 5.9e-03  grad norm 0.821  100 tok/s  ETA 0:00:20"


def test_steady_rate_ends_with_the_last_step_not_the_final_save(monkeypatch):
    """tokens_per_second_warm (what `plan` and the scaling bench read) stops at the last step's end: the checkpoint
    and evaluation Trainer runs after it are one-off costs; tokens_per_second still covers the whole call."""
    from transformers import TrainerState

    from sft_pipeline.config import TrainingConfig
    from sft_pipeline.training import callbacks as callbacks_module

    clock = [100.0]
    monkeypatch.setattr(callbacks_module.time, "perf_counter", lambda: clock[0])
    metrics: dict = {}
    _, throughput, _ = callbacks_module.standard(TrainingConfig(), metrics, total_tokens=10_000)
    state = TrainerState(max_steps=8, num_input_tokens_seen=0)
    throughput.on_train_begin(None, state, None)
    for step in range(1, 9):  # 8 steps of 1,000 tokens, 1 s each
        clock[0] += 1.0
        state.global_step, state.num_input_tokens_seen = step, step * 1000
        throughput.on_step_end(None, state, None)
    clock[0] += 20.0  # the final checkpoint and evaluation
    throughput.on_train_end(None, state, None)
    assert metrics["tokens_per_second_warm"] == 1000.0  # steps 4-8: 5,000 tokens in 5 s
    assert metrics["tokens_per_second"] == round(8000 / 28, 1) and metrics["train_seconds"] == 28.0
