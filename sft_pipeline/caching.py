"""How a stage becomes a cached, retried Prefect task.

A stage's cache key is ``sha256(stage, code version, the stage's inputs)``: its inputs are exactly the config
sections it reads and its upstream artifacts' *fingerprints* (content hashes), never models or data sets. The
key names the artifact directory (``<store>/<stage>/<key>``) and Prefect's cache record
(``<store>/.prefect/<key>``). Before Prefect looks a key up, the artifact is verified: a deleted, half-written or
tampered artifact drops the record, so the stage re-runs instead of handing a broken path downstream.

Retries: transient errors (network, hub 5xx, I/O) are retried with backoff; ``StageFailure`` (bad config, bad
data, a gated model without a token) and programming errors never are.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from prefect import task
from prefect.cache_policies import CachePolicy
from pydantic import BaseModel

from sft_pipeline.store import ArtifactRef, Store

CODE_VERSION = "1"  # bump to invalidate every stage at once
_CURRENT_KEY: contextvars.ContextVar[str] = contextvars.ContextVar("sft_stage_key")


class StageFailure(RuntimeError):
    """A failure that a retry cannot fix: bad config, bad data, missing token. Never retried."""


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def code_version(fn: Callable) -> str:
    """The stage's code: its module's source (the stage file) plus the shared code version."""
    src = inspect.getsource(inspect.getmodule(fn))
    return hashlib.sha256((CODE_VERSION + src).encode()).hexdigest()[:16]


def stage_key(stage: str, fn: Callable, inputs: dict[str, Any], ignore: tuple[str, ...] = ()) -> str:
    """The cache key from exactly what the stage depends on. Upstream refs count by fingerprint only."""
    parts = {}
    for name, value in inputs.items():
        if name == "store" or name in ignore:
            continue
        parts[name] = value.fingerprint if isinstance(value, ArtifactRef) else _jsonable(value)
    blob = json.dumps({"stage": stage, "code": code_version(fn), "inputs": parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def records_dir(store: str | Path) -> Path:
    return Path(store).expanduser().resolve() / ".prefect"


@dataclass
class StageCache(CachePolicy):
    """Prefect cache policy: our stage key, valid only while the artifact it names is intact."""

    stage: str = ""
    fn: Callable | None = None
    ignore: tuple[str, ...] = ()

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs) -> str | None:
        key = stage_key(self.stage, self.fn, inputs, self.ignore)
        store = Store(inputs["store"])
        ok, _reason = store.check(self.stage, key)
        if not ok:  # drop a stale record: the artifact it points to is gone or broken
            (records_dir(store.root) / key).unlink(missing_ok=True)
        return key


def is_transient(exc: BaseException) -> bool:
    """Whether a retry can help."""
    from sft_pipeline.config import ConfigError

    if isinstance(exc, (StageFailure, ConfigError)):
        return False
    name = type(exc).__name__
    if name in ("OutOfMemoryError",):
        return True
    if name in ("GatedRepoError", "RepositoryNotFoundError", "RevisionNotFoundError", "EntryNotFoundError",
                "LocalEntryNotFoundError", "OfflineModeIsEnabled"):
        return False
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if status is not None:
        return status >= 500 or status == 429
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and not isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError,
                                                         NotADirectoryError)):
        import errno

        return exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
    return name in ("HfHubHTTPError", "ConnectTimeout", "ReadTimeout", "ConnectError", "RemoteProtocolError")


def _retry_condition(task_obj, task_run, state) -> bool:
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - we only classify it
        return is_transient(exc)
    return False


def current_key() -> str:
    """The running stage's cache key (its artifact is ``<store>/<stage>/<key>``)."""
    return _CURRENT_KEY.get()


@contextlib.contextmanager
def _running(key: str):
    """``current_key()`` is ``key`` inside. (A module-level helper keeps stage tasks picklable, for flow.serve.)"""
    token = _CURRENT_KEY.set(key)
    try:
        yield
    finally:
        _CURRENT_KEY.reset(token)


def stage_task(stage: str, *, retries: int = 0, retry_delays: list[float] | None = None,
               ignore: tuple[str, ...] = ()) -> Callable:
    """Turn ``fn(store, ...) -> ArtifactRef`` into a Prefect task cached by its stage key.

    ``ignore`` names inputs that must not change the key (e.g. where a secret is read from).
    Inside the function, ``current_key()`` is the key of the artifact to write. If that artifact is already
    complete (a previous run was killed after writing it but before Prefect recorded it), it is returned as is.
    """

    def decorate(fn: Callable) -> Any:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            key = stage_key(stage, fn, dict(bound.arguments), ignore)
            done = Store(bound.arguments["store"]).ref(stage, key)
            if done is not None:
                return done
            with _running(key):
                return fn(*args, **kwargs)

        return task(
            run,
            name=stage,
            cache_policy=StageCache(stage=stage, fn=fn, ignore=ignore),
            persist_result=True,
            cache_result_in_memory=False,
            retries=retries,
            retry_delay_seconds=retry_delays or [10, 60, 300][: max(retries, 1)],
            retry_condition_fn=_retry_condition,
        )

    return decorate


def bind_store(stage_task_obj, store: str | Path):
    """The stage with its Prefect cache records kept inside the artifact store."""
    return stage_task_obj.with_options(result_storage=records_dir(store))

