"""What a user reads when a run fails: one line per failure, the same in the CLI and in the run summary."""
from __future__ import annotations

import errno

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def failure_message(exc: BaseException) -> str:
    """One clear line for an exception that ended a stage or the run (``stage '<name>' failed: ...`` when the
    flow marked the stage it came from)."""
    stage = getattr(exc, "sft_stage", None)
    return (f"stage {stage!r} failed: " if stage else "") + _message(exc)


def _message(exc: BaseException) -> str:
    from sft_pipeline.caching import StageFailure
    from sft_pipeline.config import ConfigError
    from sft_pipeline.hub import HubUnreachable

    if isinstance(exc, (StageFailure, ConfigError, HubUnreachable)):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in DISK_FULL:
        where = f" while writing {exc.filename}" if exc.filename else ""
        return (f"no space left on device{where}: free some space (or pass --store on a bigger disk) and run the "
                "same command again; finished stages are kept and reused")
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:500]}" if text else type(exc).__name__
