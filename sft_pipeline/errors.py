"""Every error the pipeline raises on purpose, which ones a retry can fix, and the one line a user reads.

- ``ConfigError``: a bad recipe, override or input named by the config; exit 2, before any stage runs.
- ``StageFailure``: a failure a retry cannot fix (bad data, a gated model without a token); never retried.
- ``HubUnreachable``: the hub did not answer; retried, then reported with its message.
- ``TrainingInterrupted``: training stopped on request (SIGTERM) after a sealed checkpoint; not retried.
- ``StageError(stage, cause)``: what the flow raises when a stage failed for good; ``failure_message`` turns it
  into ``stage 'train' failed: ...``, the same line in the CLI, the run summary and the Failed state.

This module imports nothing from the package, so every other module can import it.
"""
from __future__ import annotations

import errno

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# hub errors that name a missing or forbidden thing: asking again gives the same answer
_HUB_FINAL = ("GatedRepoError", "RepositoryNotFoundError", "RevisionNotFoundError", "EntryNotFoundError",
              "LocalEntryNotFoundError", "OfflineModeIsEnabled", "DatasetNotFoundError")
_CONNECTION = ("ConnectError", "ConnectTimeout", "ReadTimeout", "ConnectionError", "RemoteProtocolError",
               "NameResolutionError", "gaierror")


class ConfigError(ValueError):
    """A bad recipe or override: reported as one clear message, exit code 2, before any stage runs."""


class StageFailure(RuntimeError):
    """A failure that a retry cannot fix: bad config, bad data, missing token. Never retried."""


class ModelSourceError(StageFailure):
    """The base model cannot be had (offline, gated without a token, bad path)."""


class HubUnreachable(ConnectionError):
    """The hub could not be reached: retried (the network may come back), then reported with this message."""


class TrainingInterrupted(Exception):
    """Training stopped on request (``training.stop``: SIGTERM) at ``step``, after saving the sealed checkpoint
    ``checkpoint`` (None: stopped before its first step). Not a failure a retry should fix: the same command again
    resumes from that checkpoint."""

    def __init__(self, step: int | None, checkpoint: str | None, reason: str = "stop requested"):
        name = checkpoint.rstrip("/").rsplit("/", 1)[-1] if checkpoint else None
        saved = f"{name} is saved" if name else "no checkpoint yet"
        at = f"at step {step}" if step is not None else "before its first step"
        super().__init__(f"train: stopped {at} ({reason}); {saved}: run the same command again to resume")
        self.step, self.checkpoint, self.reason = step, checkpoint, reason

    def __reduce__(self):  # pickled with its own arguments (Prefect keeps a failed task's exception)
        return type(self), (self.step, self.checkpoint, self.reason)


class StageError(RuntimeError):
    """A stage failed for good (after its retries). ``cause`` is what it raised."""

    def __init__(self, stage: str, cause: BaseException):
        super().__init__(f"stage {stage!r} failed: {_message(cause)}")
        self.stage, self.cause = stage, cause


# ------------------------------------------------------------------------------------------- what a retry fixes
def is_oom(exc: BaseException) -> bool:
    """CUDA (or other accelerator) out of memory."""
    return type(exc).__name__ == "OutOfMemoryError" or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def is_transient(exc: BaseException) -> bool:
    """Whether a retry can help: network, hub 5xx/429, I/O, out of memory; never bad input or a bug."""
    if isinstance(exc, (StageFailure, ConfigError)):
        return False
    if is_oom(exc):
        return True
    name = type(exc).__name__
    if name in _HUB_FINAL:
        return False
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status is not None:
        return status >= 500 or status == 429
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and not isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError,
                                                         NotADirectoryError)):
        return exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
    return name in ("HfHubHTTPError",) + _CONNECTION


# ------------------------------------------------------------------------------------------- hub failures
def explain_hub_error(exc: BaseException, what: str) -> BaseException:
    """A StageFailure with a clear message for what a retry cannot fix; a clear transient error otherwise."""
    name = type(exc).__name__
    status = getattr(getattr(exc, "response", None), "status_code", None)
    text = str(exc).splitlines()[0][:300] if str(exc) else name
    if name == "GatedRepoError" or status == 403:
        return StageFailure(
            f"{what} is gated and this HF token has no access to it (HTTP {status or 'gated'}): accept its terms on "
            "the hub with the token's account, then set HF_TOKEN or the Prefect Secret block named in "
            "auth.hf_token_block")
    if name in ("RepositoryNotFoundError", "RevisionNotFoundError", "EntryNotFoundError", "DatasetNotFoundError") \
            or status == 404:
        return StageFailure(f"{what} was not found on the hub, or is private to another account (check the name, "
                            f"the revision and the token): {text}")
    if status == 401:
        return StageFailure(
            f"{what}: the Hugging Face Hub rejected the HF token (HTTP 401: invalid or expired): create a new token "
            "at https://huggingface.co/settings/tokens, then set HF_TOKEN or the Prefect Secret block named in "
            "auth.hf_token_block")
    if name in ("OfflineModeIsEnabled", "LocalEntryNotFoundError") or "offline" in text.lower() \
            or "HF_HUB_OFFLINE" in text:
        return StageFailure(f"{what} is not available offline (HF_HUB_OFFLINE is set or the hub is unreachable, and "
                            f"it is not in the local cache): {text}")
    if name in _CONNECTION or (isinstance(exc, ConnectionError) and not isinstance(exc, HubUnreachable)):
        from huggingface_hub import constants

        return HubUnreachable(f"{what}: the Hugging Face Hub at {constants.ENDPOINT} is unreachable ({name}: {text}); "
                              "check the network, or set HF_HUB_OFFLINE=1 to use only the local cache")
    if is_transient(exc):
        return exc
    return StageFailure(f"could not load {what}: {name}: {text}")


# ------------------------------------------------------------------------------------------- the one line
def failure_message(exc: BaseException) -> str:
    """One clear line for an exception that ended a stage or the run."""
    if isinstance(exc, StageError):
        return str(exc)
    return _message(exc)


def _message(exc: BaseException) -> str:
    if isinstance(exc, (StageFailure, ConfigError, HubUnreachable, TrainingInterrupted)):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in DISK_FULL:
        where = f" while writing {exc.filename}" if exc.filename else ""
        return (f"no space left on device{where}: free some space (or pass --store on a bigger disk) and run the "
                "same command again; finished stages are kept and reused")
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:500]}" if text else type(exc).__name__
