"""Promotion: point ``<store>/promoted/<recipe>.json`` at the best adapter so far.

At the end of every run the tuned eval loss is compared with the promoted adapter's. The pointer moves only
when both were evaluated on the same test set (the tokenized test split's content hash and the number of rows
scored) and the new loss is lower; otherwise it stays and ``reason`` says why. The pointer is replaced
atomically (temp file + ``os.replace``) under a file lock, so a reader never sees half a pointer and two runs
finishing at once cannot lose the better one.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import time
import uuid
from pathlib import Path
from typing import Iterator

from sft_pipeline.store import ArtifactRef, Store, digest


def pointer_path(store: Store, recipe: str) -> Path:
    return store.root / "promoted" / f"{recipe}.json"


def read_pointer(store: Store, recipe: str) -> dict | None:
    path = pointer_path(store, recipe)
    return json.loads(path.read_text()) if path.is_file() else None


def test_set_fingerprint(store: Store, chats: ArtifactRef, test_split: str, rows: int) -> str:
    """What the eval loss was measured on: the tokenized test split's bytes and how many rows were scored."""
    meta = store.manifest(chats)["files"][f"{test_split}.parquet"]
    return digest({"test_split": meta["sha256"] or [chats.fingerprint, meta["size"]], "rows": rows})


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _write_atomically(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _decide(current: dict | None, candidate: dict) -> tuple[bool, str]:
    loss = candidate["eval_loss"]
    if not math.isfinite(loss):
        return False, f"tuned eval loss is {loss}: not promoted"
    if current is None:
        return True, "first adapter promoted for this recipe"
    if current["adapter"] == candidate["adapter"]:
        return False, "this adapter is already the promoted one"
    if not Path(current["adapter"]).is_dir():
        return True, f"the promoted adapter {current['adapter']} is gone from the store"
    if current["test_set"] != candidate["test_set"]:
        return False, (f"not comparable: the promoted adapter was evaluated on another test set "
                       f"({current['test_set']}, this run {candidate['test_set']}); the pointer stays")
    if loss < current["eval_loss"]:
        return True, f"tuned eval loss {loss:.4f} beats the promoted {current['eval_loss']:.4f}"
    return False, f"tuned eval loss {loss:.4f} does not beat the promoted {current['eval_loss']:.4f}"


def consider(store: Store, recipe: str, adapter: ArtifactRef, metrics: ArtifactRef, chats: ArtifactRef,
             test_split: str, flow_run: str | None = None) -> dict:
    """Promote ``adapter`` if it beats the promoted one for ``recipe``; returns the decision for the summary."""
    m = metrics.read_json("metrics.json")
    candidate = {"recipe": recipe, "adapter": adapter.path, "adapter_fingerprint": adapter.fingerprint,
                 "eval_loss": m["tuned"]["eval_loss"], "base_eval_loss": m["base"]["eval_loss"],
                 "test_set": test_set_fingerprint(store, chats, test_split, m["rows"]),
                 "flow_run": flow_run, "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path = pointer_path(store, recipe)
    with _locked(path.parent):
        current = read_pointer(store, recipe)
        promoted, reason = _decide(current, candidate)
        if promoted:
            _write_atomically(path, candidate)
    return {"promoted": promoted, "reason": reason, "pointer": str(path), "eval_loss": candidate["eval_loss"],
            "test_set": candidate["test_set"], "previous": current,
            "promoted_adapter": candidate["adapter"] if promoted else (current or {}).get("adapter")}
