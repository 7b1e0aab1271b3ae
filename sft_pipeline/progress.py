"""Live training progress: one log line per logging step and a Prefect progress artifact, both seen in the UI.

``Progress(get_run_logger(), total_tokens)`` is a ``TrainerCallback``: pass it with the trainer's callbacks. The
line goes through the logger it is given (Prefect's run logger reaches the UI; a plain logger does not). The
progress artifact exists only inside a Prefect flow or task run; anywhere else (a bench script, a test, a rank
process started by torchrun) the callback just logs. The artifact's description is what the UI's card shows
(``step 20/50 · loss 2.35 · ETA 0:11:10 · checkpoint-20 saved``); its value is the bar's percentage.

What a run stopped from outside needs (its card marked stopped, the checkpoint a Retry resumes from) is in
``sft_pipeline.stop_marks``, which the flow's hooks import without transformers.
"""
from __future__ import annotations

import logging
import time
from datetime import timedelta
from pathlib import Path

from transformers import TrainerCallback

UPDATE_SECONDS = 5.0  # between logging steps the card is refreshed at most this often (one API call each)


def _eta(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


class Progress(TrainerCallback):
    """Logs ``train: step 20/50 (40%)  loss 1.234  lr 5.9e-03  grad norm 0.82  1,234 tok/s  ETA 0:01:10``.

    tok/s is tokens trained (``state.num_input_tokens_seen``, which needs ``include_num_input_tokens_seen``) over
    the wall time since this process began training; the ETA is the steps left times the mean step time so far.
    Both count from ``on_train_begin``, so a run resumed from a checkpoint is not credited with the steps it reloaded.
    The same instance may serve several trainers of one stage (the OOM fallback builds a new trainer): it keeps
    one progress artifact, and so does a later attempt of the same flow run (a Retry, a task retry): it takes over
    the card the earlier attempt left instead of adding a second one.
    """

    def __init__(self, logger: logging.Logger | logging.LoggerAdapter, total_tokens: int | None = None,
                 artifact: bool = True):
        self.logger, self.total_tokens, self.artifact = logger, total_tokens, artifact
        self.artifact_id = None
        self.t0 = self.step0 = self.tokens0 = None
        self.loss: float | None = None  # the last logged train loss: the card shows it between logging steps
        self.saved: int | None = None  # the step of the last checkpoint saved in this attempt
        self.shown = 0.0  # when the card was last refreshed (perf_counter)

    # ---- Prefect's progress artifact ---------------------------------------------------------------------------

    def _create_artifact(self, description: str) -> None:
        from prefect.artifacts import create_progress_artifact
        from prefect.context import get_run_context
        from prefect.exceptions import MissingContextError

        try:
            ctx = get_run_context()
        except MissingContextError:  # not in a flow or task run: nowhere to attach it, and no server to ask
            self.artifact = False
            return
        try:
            self.artifact_id = _earlier_card(ctx)
            if self.artifact_id is None:
                self.artifact_id = create_progress_artifact(0.0, description=description)
        except Exception as exc:  # noqa: BLE001 - the progress bar is a view: an API hiccup must not stop training
            self.artifact = False
            self.logger.warning("train: no progress artifact in the UI (%s: %s)", type(exc).__name__, exc)

    def _update_artifact(self, percent: float, description: str | None = None) -> None:
        from prefect.artifacts import update_progress_artifact

        self.shown = time.perf_counter()
        try:
            update_progress_artifact(self.artifact_id, percent, description=description)
        except Exception as exc:  # noqa: BLE001 - as above; stop updating rather than warn at every step
            self.artifact = False
            self.logger.warning("train: progress artifact no longer updated (%s: %s)", type(exc).__name__, exc)

    def _show(self, state, done: str | None = None) -> None:
        if state.is_world_process_zero and self.artifact and self.artifact_id is not None:
            self._update_artifact(100.0 if done else self._percent(state), self.card(state, done))

    # ---- trainer events -----------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        self.t0, self.step0, self.tokens0 = time.perf_counter(), state.global_step, state.num_input_tokens_seen
        if not state.is_world_process_zero:
            return
        tokens = f", {self.total_tokens:,} tokens" if self.total_tokens else ""
        what = f"{state.max_steps:,} optimizer steps{tokens}"
        if state.global_step:
            what += f", resuming at step {state.global_step:,}"
        self.logger.info("train: %s", what)
        start = f"step {state.global_step:,}/{state.max_steps:,} · " + (
            f"resuming from checkpoint-{state.global_step}" if state.global_step else f"starting: {what}")
        if self.artifact and self.artifact_id is None:
            self._create_artifact(start)
        if self.artifact and self.artifact_id is not None:  # a new attempt or trainer: the same card, from here
            self._update_artifact(self._percent(state), start)

    def on_step_end(self, args, state, control, **kwargs):
        if time.perf_counter() - self.shown >= UPDATE_SECONDS:
            self._show(state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "loss" in logs:
            self.loss = logs["loss"]
            self.logger.info("%s", self.line(state, logs))
            self._show(state)
        elif "eval_loss" in logs:
            self.logger.info("eval: step %s/%s  eval loss %.4g", f"{state.global_step:,}", f"{state.max_steps:,}",
                             logs["eval_loss"])

    def on_save(self, args, state, control, **kwargs):
        # after the trainer's own on_save, which seals the checkpoint: what a stop would now resume from
        if not state.is_world_process_zero:
            return
        self.saved = state.global_step
        self.logger.info("train: saved checkpoint-%d (%s)", state.global_step,
                         Path(args.output_dir) / f"checkpoint-{state.global_step}")
        self._show(state)

    def on_train_end(self, args, state, control, **kwargs):
        # training ended normally (an exception skips this event): the bar shows done even after an early stop, but
        # not after a stop on SIGTERM (training.stop): that run ends interrupted, and its card says where it stopped
        from sft_pipeline.training import stop

        if stop.requested():
            self._show(state)
            return
        elapsed = time.perf_counter() - self.t0 if self.t0 is not None else 0.0
        self._show(state, done=f"done in {_eta(elapsed)}")

    # ---- the line and the card ----------------------------------------------------------------------------------

    @staticmethod
    def _percent(state) -> float:
        return min(100.0, 100.0 * state.global_step / state.max_steps) if state.max_steps else 0.0

    def _eta_seconds(self, state, elapsed: float | None = None) -> float | None:
        """Steps left times the mean step time since this attempt began (None before its first step)."""
        done, step, total = state.global_step - (self.step0 or 0), state.global_step, state.max_steps
        if self.t0 is None or done <= 0 or total < step:
            return None
        return (total - step) * (time.perf_counter() - self.t0 if elapsed is None else elapsed) / done

    def card(self, state, done: str | None = None) -> str:
        """What the UI's progress card says: ``step 20/50 · loss 2.35 · ETA 0:11:10 · checkpoint-20 saved``."""
        parts = [f"step {state.global_step:,}/{state.max_steps:,}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.3g}")
        if done:
            parts.append(done)
        elif (eta := self._eta_seconds(state)) is not None:
            parts.append(f"ETA {_eta(eta)}")
        if self.saved is not None and not done:
            parts.append(f"checkpoint-{self.saved} saved")
        return " · ".join(parts)

    def line(self, state, logs: dict) -> str:
        step, total = state.global_step, state.max_steps
        parts = [f"train: step {step:,}/{total:,} ({self._percent(state):.0f}%)", f"loss {logs['loss']:.4g}"]
        if logs.get("learning_rate") is not None:
            parts.append(f"lr {logs['learning_rate']:.1e}")
        if logs.get("grad_norm") is not None:
            parts.append(f"grad norm {logs['grad_norm']:.3g}")
        if self.t0 is not None:
            elapsed = time.perf_counter() - self.t0
            tokens = state.num_input_tokens_seen - (self.tokens0 or 0)
            if tokens > 0 and elapsed > 0:
                parts.append(f"{tokens / elapsed:,.0f} tok/s")
            if (eta := self._eta_seconds(state, elapsed)) is not None:
                parts.append(f"ETA {_eta(eta)}")
        return "  ".join(parts)


def _earlier_card(ctx) -> str | None:
    """The progress artifact an earlier attempt of this flow run left for the same task (a Retry after a cancel or a
    crash, a task retry), or None."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType,
                                                TaskRunFilter, TaskRunFilterName)

    task_run = getattr(ctx, "task_run", None)
    flow_run_id = task_run.flow_run_id if task_run is not None else ctx.flow_run.id
    if flow_run_id is None:
        return None
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
                                           type=ArtifactFilterType(any_=["progress"])),
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=[task_run.name])) if task_run else None)
    return found[-1].id if found else None
