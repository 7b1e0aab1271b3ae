"""Live training progress: one log line per logging step and a Prefect progress artifact, both seen in the UI.

``Progress(get_run_logger(), total_tokens)`` is a ``TrainerCallback``: pass it with the trainer's callbacks. The
line goes through the logger it is given (Prefect's run logger reaches the UI; a plain logger does not). The
progress artifact exists only inside a Prefect flow or task run; anywhere else (a bench script, a test, a rank
process started by torchrun) the callback just logs.
"""
from __future__ import annotations

import logging
import time
from datetime import timedelta

from transformers import TrainerCallback


def _eta(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


class Progress(TrainerCallback):
    """Logs ``train: step 20/50 (40%)  loss 1.234  lr 5.9e-03  grad norm 0.82  1,234 tok/s  ETA 0:01:10``.

    tok/s is tokens trained (``state.num_input_tokens_seen``, which needs ``include_num_input_tokens_seen``) over
    the wall time since this process began training; the ETA is the steps left times the mean step time so far.
    Both count from ``on_train_begin``, so a run resumed from a checkpoint is not credited with the steps it reloaded.
    The same instance may serve several trainers of one stage (the OOM fallback builds a new trainer): it keeps
    one progress artifact.
    """

    def __init__(self, logger: logging.Logger | logging.LoggerAdapter, total_tokens: int | None = None,
                 artifact: bool = True):
        self.logger, self.total_tokens, self.artifact = logger, total_tokens, artifact
        self.artifact_id = None
        self.t0 = self.step0 = self.tokens0 = None

    # ---- Prefect's progress artifact ---------------------------------------------------------------------------

    def _create_artifact(self, description: str) -> None:
        from prefect.artifacts import create_progress_artifact
        from prefect.context import get_run_context
        from prefect.exceptions import MissingContextError

        try:
            get_run_context()
        except MissingContextError:  # not in a flow or task run: nowhere to attach it, and no server to ask
            self.artifact = False
            return
        try:
            self.artifact_id = create_progress_artifact(0.0, description=description)
        except Exception as exc:  # noqa: BLE001 - the progress bar is a view: an API hiccup must not stop training
            self.artifact = False
            self.logger.warning("train: no progress artifact in the UI (%s: %s)", type(exc).__name__, exc)

    def _update_artifact(self, percent: float) -> None:
        from prefect.artifacts import update_progress_artifact

        try:
            update_progress_artifact(self.artifact_id, percent)
        except Exception as exc:  # noqa: BLE001 - as above; stop updating rather than warn at every step
            self.artifact = False
            self.logger.warning("train: progress artifact no longer updated (%s: %s)", type(exc).__name__, exc)

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
        if self.artifact and self.artifact_id is None:
            self._create_artifact(f"training: {what}")
        elif self.artifact and self.artifact_id is not None:  # a new trainer of the same stage (OOM fallback)
            self._update_artifact(self._percent(state))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "loss" in logs:
            self.logger.info("%s", self.line(state, logs))
            if self.artifact and self.artifact_id is not None:
                self._update_artifact(self._percent(state))
        elif "eval_loss" in logs:
            self.logger.info("eval: step %s/%s  eval loss %.4g", f"{state.global_step:,}", f"{state.max_steps:,}",
                             logs["eval_loss"])

    def on_train_end(self, args, state, control, **kwargs):
        # training ended normally (an exception skips this event): the bar shows done even after an early stop
        if state.is_world_process_zero and self.artifact and self.artifact_id is not None:
            self._update_artifact(100.0)

    # ---- the line -----------------------------------------------------------------------------------------------

    @staticmethod
    def _percent(state) -> float:
        return min(100.0, 100.0 * state.global_step / state.max_steps) if state.max_steps else 0.0

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
            done = step - self.step0
            if done > 0 and total >= step:
                parts.append(f"ETA {_eta((total - step) * elapsed / done)}")
        return "  ".join(parts)
