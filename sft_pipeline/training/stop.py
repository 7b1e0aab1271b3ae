"""A process-wide request to stop training: checkpoint at the end of the current optimizer step, then stop.

SIGTERM is what a Prefect cancellation, a pod eviction or a spot preemption sends, with a grace period before
SIGKILL. ``request`` only sets a flag (safe in a signal handler); ``callbacks.Checkpoint`` reads it at every step
end, saves a sealed checkpoint there and stops the Trainer, and ``run.train`` then raises
``errors.TrainingInterrupted`` instead of returning: no half-trained adapter becomes an artifact, and the same
command again resumes from that checkpoint. Several ranks stop at the same step (any rank's request counts: the
callback reduces the flag over the group).

How a training process uses it: ``install_sigterm()`` once, in the main thread, before training (``rank_train``
does; the CLI should do the same before it starts the flow, and map ``TrainingInterrupted`` to its exit code 143).
SIGINT keeps Python's behaviour (KeyboardInterrupt); a later SIGTERM changes nothing (the SIGKILL that ends a grace
period ends the process at once).
"""
from __future__ import annotations

import contextlib
import signal

_state: dict = {"reason": None, "accepting": 0}  # accepting: how many ``accepting`` blocks are open


def request(reason: str = "stop requested") -> None:
    """Ask the running training to stop after a checkpoint at its current step. Safe to call from a signal
    handler or another thread (it sets a flag, nothing else); the first reason given is kept."""
    if _state["reason"] is None:
        _state["reason"] = reason


def requested() -> str | None:
    """Why a stop was requested, or None."""
    return _state["reason"]


def clear() -> None:
    """Forget a request (a long-lived process that trains again after an interrupted run)."""
    _state["reason"] = None


def install_sigterm():
    """Make SIGTERM request a stop (``request("SIGTERM")``) in this process; returns the handler it replaced.

    Python allows this only in the main thread. A SIGTERM before training starts stops it before its first step
    (``run.train`` raises at once); during training, at the end of the current step.
    """
    def on_sigterm(signum, frame):
        request("SIGTERM")

    return signal.signal(signal.SIGTERM, on_sigterm)


@contextlib.contextmanager
def accepting():
    """While training runs in this process (or its ranks are launched from it): SIGTERM requests a stop (a sealed
    checkpoint at the current step, then ``TrainingInterrupted``) instead of doing what it did before (in a Prefect
    flow: Prefect's handler, which ends the run at once). The earlier handler is back afterwards. Outside the main
    thread (where Python allows no handler) only a stop requested by other means (``request``) is seen."""
    try:
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: request("SIGTERM"))
    except ValueError:  # not the main thread
        previous = None
    _state["accepting"] += 1
    try:
        yield
    finally:
        _state["accepting"] -= 1
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
