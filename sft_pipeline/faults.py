"""Test-only fault injection: off unless ``SFT_PIPELINE_FAULT`` is set. The kill tests use it to know *when* to kill.

``SFT_PIPELINE_FAULT="<stage>:<point>:<action>[,...]"``

- point: ``start`` (the stage begins computing), ``write`` (its files are in the temp dir, before the manifest and
  the rename), ``step=N`` (training, after N optimizer steps and their checkpoint, before step N+1), ``upload``
  (a store on object storage: the artifact's files are uploaded, its manifest not yet)
- action: ``hang`` (write ``$SFT_PIPELINE_FAULT_MARKER`` if set, then sleep until killed, or in training until
  a stop is requested), ``pause`` (write the
  marker, then wait until the test removes it, and go on), ``oom`` (raise ``torch.OutOfMemoryError``, a simulated
  CUDA out-of-memory), ``ioerror`` (a transient ``OSError``), ``error`` (a ``RuntimeError`` that no retry fixes)

Each fault fires once per process (a retried or resumed stage gets past it).
"""
from __future__ import annotations

import errno
import os
import time
from pathlib import Path

ENV = "SFT_PIPELINE_FAULT"
MARKER_ENV = "SFT_PIPELINE_FAULT_MARKER"
ACTIONS = ("hang", "pause", "oom", "ioerror", "error")
_fired: set[str] = set()


def parse(spec: str) -> list[tuple[str, str, str]]:
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split(":")
        if len(parts) != 3 or parts[2] not in ACTIONS:
            raise ValueError(f"{ENV}: {item!r} is not <stage>:<start|write|step=N>:<{'|'.join(ACTIONS)}>")
        faults.append((parts[0], parts[1], parts[2]))
    return faults


def point(stage: str, where: str) -> None:
    """Called where a fault may be injected; does nothing unless ``SFT_PIPELINE_FAULT`` names this point."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    for f_stage, f_where, action in parse(spec):
        item = f"{f_stage}:{f_where}:{action}"
        if (f_stage, f_where) != (stage, where) or item in _fired:
            continue
        _fired.add(item)
        if action in ("hang", "pause"):
            marker = os.environ.get(MARKER_ENV)
            if marker:
                Path(marker).write_text(f"{os.getpid()} {item}\n")
            from sft_pipeline.training import stop

            # a SIGTERM that asks training to stop (training.stop) ends the wait too: the step goes on to its end
            while (action == "hang" or (marker and Path(marker).exists())) and not stop.requested():
                time.sleep(0.2)
            return
        if action == "oom":
            import torch

            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated by {ENV}={item})")
        if action == "ioerror":
            raise OSError(errno.EIO, f"I/O error (simulated by {ENV}={item})")
        raise RuntimeError(f"injected failure ({ENV}={item})")
