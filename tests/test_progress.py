"""Live training progress: the log line per logging step (a real tiny Trainer) and the Prefect progress artifact."""
from __future__ import annotations

import logging
import re

import pytest

from sft_pipeline.progress import Progress
from tests.conftest import capture_log as capture


def test_one_line_per_logging_step_from_a_real_trainer(tmp_path):
    # ~5 s here (most of it importing torch/transformers): 6 steps of a 2-layer model on CPU, outside any Prefect run
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (12, 16))]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, logging_steps=2, per_device_train_batch_size=2,
                             learning_rate=1e-2, use_cpu=True, report_to="none", save_strategy="no",
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


def test_progress_artifact_goes_to_100_inside_a_flow_run():
    # ~15 s here: prefect_test_harness starts a temporary server
    from prefect import flow, get_run_logger
    from prefect.client.orchestration import get_client
    from prefect.testing.utilities import prefect_test_harness
    from transformers import TrainerState

    @flow
    def fake_training() -> tuple[str, list[float]]:
        progress = Progress(get_run_logger(), total_tokens=1000)
        state = TrainerState(max_steps=4, num_input_tokens_seen=0)
        progress.on_train_begin(None, state, None)
        seen = []
        with get_client(sync_client=True) as client:
            for step in (2, 4):
                state.global_step, state.num_input_tokens_seen = step, step * 250
                progress.on_log(None, state, None, logs={"loss": 1.0 / step, "learning_rate": 1e-4, "step": step})
                seen.append(client.read_artifacts()[0].data)
            progress.on_train_end(None, state, None)
        return str(progress.artifact_id), seen

    with prefect_test_harness(server_startup_timeout=120):
        artifact_id, seen = fake_training()
        with get_client(sync_client=True) as client:
            artifacts = client.read_artifacts()
    assert seen == [50.0, 100.0]
    [art] = [a for a in artifacts if str(a.id) == artifact_id]
    assert art.type == "progress" and art.data == 100.0 and art.flow_run_id is not None
    assert art.description.startswith("training: 4 optimizer steps, 1,000 tokens")


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
