"""How a stage becomes a cached, retried Prefect task.

A stage's cache key is ``sha256(stage, code version, the stage's inputs)``: its inputs are exactly the config
sections it reads and its upstream artifacts' *fingerprints* (content hashes), never models or data sets. The
key names the artifact directory (``<store>/<stage>/<key>``) and Prefect's cache record
(``<store>/.prefect/<key>``). Before Prefect looks a key up, the artifact is verified: a deleted, half-written or
tampered artifact drops the record, so the stage re-runs instead of handing a broken path downstream.

Retries: transient errors (network, hub 5xx, I/O, CUDA out of memory) are retried with backoff; ``StageFailure``
(bad config, bad data, a gated model without a token) and programming errors never are.

Kills and concurrent runs: a stage computes under a file lock on its key (``Store.lock``), so a second run with the
same inputs waits and then reuses the artifact instead of writing it too; a run killed after writing an artifact
but before Prefect recorded it reuses the artifact on the next run. Each computed key is also recorded with its
inputs in ``<store>/.keys/<stage>/<key>.json``, which ``sft-pipeline plan`` diffs to say why a stage would re-run.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from prefect import task
from prefect.cache_policies import CachePolicy
from pydantic import BaseModel

from sft_pipeline.store import ArtifactRef, Store

CODE_VERSION = "1"  # bump to invalidate every stage at once
_CURRENT_KEY: contextvars.ContextVar[str] = contextvars.ContextVar("sft_stage_key")
_ATTEMPTS: dict[str, int] = {}  # task run id -> how many times its stage function was started (1 + retries)


from sft_pipeline.errors import StageFailure, is_oom, is_transient  # noqa: E402,F401


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


def key_inputs(stage: str, fn: Callable, inputs: dict[str, Any], ignore: tuple[str, ...] = ()) -> dict:
    """What the key is made of: the stage, its code version, its inputs (upstream refs by fingerprint only)."""
    parts = {}
    for name, value in inputs.items():
        if name == "store" or name in ignore:
            continue
        parts[name] = value.fingerprint if isinstance(value, ArtifactRef) else _jsonable(value)
    return {"stage": stage, "code": code_version(fn), "inputs": parts}


def _hash_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def stage_key(stage: str, fn: Callable, inputs: dict[str, Any], ignore: tuple[str, ...] = ()) -> str:
    """The cache key from exactly what the stage depends on. Upstream refs count by fingerprint only."""
    return _hash_key(key_inputs(stage, fn, inputs, ignore))


def records_dir(store: str | Path) -> Path:
    return Path(store).expanduser().resolve() / ".prefect"


def keys_dir(store: str | Path, stage: str) -> Path:
    return Path(store).expanduser().resolve() / ".keys" / stage


def _record_intact(record: Path, artifact: Path) -> bool:
    """Does Prefect's cache record read back, and name this artifact? (A kill can cut it short.)"""
    from prefect.results import ResultRecord

    try:
        ref = ResultRecord.deserialize(record.read_bytes()).result
    except Exception:  # noqa: BLE001 - unreadable in any way: not a record to trust
        return False
    return isinstance(ref, ArtifactRef) and Path(ref.path) == artifact


@dataclass
class StageCache(CachePolicy):
    """Prefect cache policy: our stage key, valid only while the artifact it names is intact."""

    stage: str = ""
    fn: Callable | None = None
    ignore: tuple[str, ...] = ()

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs) -> str | None:
        key = stage_key(self.stage, self.fn, inputs, self.ignore)
        store = Store(inputs["store"])
        record = records_dir(store.root) / key
        if record.exists():
            ok, _reason = store.check(self.stage, key)
            # drop a stale record: the artifact it points to is gone or broken, or the record itself is cut short
            if not ok or not _record_intact(record, store.artifact_dir(self.stage, key)):
                record.unlink(missing_ok=True)
        return key


def _retry_condition(task_obj, task_run, state) -> bool:
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - we only classify it
        return is_transient(exc)
    return False


def attempts(task_run_id) -> int | None:
    """How many times this process started the stage of a task run (None: never, e.g. Prefect's cache hit)."""
    return _ATTEMPTS.get(str(task_run_id))


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


def _write_key_record(st: Store, stage: str, key: str, parts: dict, ref: ArtifactRef) -> None:
    """Remember what this key was made of (for ``sft-pipeline plan``), written whole or not at all."""
    record = keys_dir(st.root, stage) / f"{key}.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.with_name(f".{key}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({**parts, "key": key, "fingerprint": ref.fingerprint}, default=str))
    os.replace(tmp, record)


def _log():
    from prefect.logging import get_logger, get_run_logger

    try:
        return get_run_logger()
    except Exception:  # noqa: BLE001 - called outside a run (tests)
        return get_logger("sft_pipeline")


def stage_task(stage: str, *, retries: int = 2, retry_delays: list[float] | None = None,
               ignore: tuple[str, ...] = ()) -> Callable:
    """Turn ``fn(store, ...) -> ArtifactRef`` into a Prefect task cached by its stage key.

    ``ignore`` names inputs that must not change the key (e.g. where a secret is read from).
    Inside the function, ``current_key()`` is the key of the artifact to write. The function runs under the
    key's lock; if the artifact is already complete (another run wrote it while this one waited, or a previous run
    was killed after writing it but before Prefect recorded it), it is returned as is.
    """

    def decorate(fn: Callable) -> Any:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args, **kwargs):
            from prefect.context import TaskRunContext

            from sft_pipeline import faults

            ctx = TaskRunContext.get()
            if ctx is not None:
                run_id = str(ctx.task_run.id)
                _ATTEMPTS[run_id] = _ATTEMPTS.get(run_id, 0) + 1
            bound = sig.bind(*args, **kwargs)
            parts = key_inputs(stage, fn, dict(bound.arguments), ignore)
            key = _hash_key(parts)
            st = Store(bound.arguments["store"])

            def wait(holder: str) -> None:
                _log().info("%s: waiting for %s, which is computing %s", stage, holder, key)

            with st.lock(stage, key, on_wait=wait):
                done = st.ref(stage, key)
                if done is None:
                    faults.point(stage, "start")
                    with _running(key):
                        done = fn(*args, **kwargs)
                else:
                    _log().info("%s: reusing the finished artifact %s", stage, done.path)
            _write_key_record(st, stage, key, parts, done)
            return done

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

