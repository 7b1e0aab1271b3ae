"""The artifact store: one directory per (stage, cache key), written atomically, with a manifest.

Layout under the store root::

    <stage>/<key>/            a finished artifact (manifest.json + the stage's files)
    .work/<stage>/<key>/      a stage's scratch space that survives a crash (training checkpoints)
    .tmp/                     artifacts being written; renamed into place only when complete
    .locks/                   one lock file per (stage, key): one writer at a time, even across processes
    models/<fingerprint>/     base models built from a config or converted from a file, made once
    runs/                     one summary per run (``sft-pipeline plan`` reads them for deleted artifacts)
    promoted/<recipe>.json    the promoted adapter of each recipe

A stage writes into a temp dir and renames it into place after writing ``manifest.json`` (files, sizes, hashes),
so a killed process never leaves a half artifact that looks finished. ``Store.check`` re-verifies an artifact
before it is reused; a deleted or tampered one is recomputed.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel

MANIFEST = "manifest.json"
HASH_LIMIT = 512 * 2**20  # files larger than this are checked by size only (a 7B model would take minutes)
WRITER_ID = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"  # this process, in manifests and locks


class ArtifactRef(BaseModel):
    """What crosses a task border: where an artifact is and a fingerprint of its content."""

    stage: str
    key: str
    path: str
    fingerprint: str

    def file(self, name: str) -> Path:
        return Path(self.path) / name

    def read_json(self, name: str) -> Any:
        return json.loads(self.file(name).read_text())


def default_store() -> Path:
    return Path(os.environ.get("SFT_PIPELINE_STORE", Path.home() / ".cache" / "sft-pipeline")).expanduser()


def digest(obj: Any, length: int = 16) -> str:
    """A stable short hash of JSON-able data."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON whole or not at all: a temp file beside it, flushed to disk, then renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


@contextlib.contextmanager
def file_lock(path: Path, on_wait=None) -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on ``path`` (created if missing); a second holder waits.

    The kernel releases the lock when its holder dies, even by SIGKILL, so a killed run never blocks the next (a
    local file system is needed: flock over NFS is not reliable). ``on_wait(holder)`` is called before waiting, with
    the ``WRITER_ID`` the holder wrote into the file.
    """
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                f.seek(0)
                on_wait(f.read().strip() or "another process")
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(WRITER_ID)
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` and the directory itself to disk (a machine that dies loses no part)."""
    for p in Path(root).rglob("*"):
        if p.is_file():
            with open(p, "rb+") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


class Store:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

    # ------------------------------------------------------------------ paths
    def artifact_dir(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def work_dir(self, stage: str, key: str) -> Path:
        d = self.root / ".work" / stage / key
        d.mkdir(parents=True, exist_ok=True)
        return d

    # ------------------------------------------------------------------ reading
    def check(self, stage: str, key: str) -> tuple[bool, str]:
        """Is the artifact complete and unmodified? Returns (ok, reason)."""
        d = self.artifact_dir(stage, key)
        if not d.is_dir():
            return False, "missing"
        try:
            manifest = json.loads((d / MANIFEST).read_text())
        except (OSError, ValueError):
            return False, "no readable manifest"
        for rel, meta in manifest.get("files", {}).items():
            p = d / rel
            if not p.is_file():
                return False, f"file missing: {rel}"
            if p.stat().st_size != meta["size"]:
                return False, f"size changed: {rel}"
            if meta.get("sha256") and file_sha256(p) != meta["sha256"]:
                return False, f"content changed: {rel}"
        return True, "ok"

    def ref(self, stage: str, key: str) -> ArtifactRef | None:
        ok, _ = self.check(stage, key)
        if not ok:
            return None
        manifest = json.loads((self.artifact_dir(stage, key) / MANIFEST).read_text())
        return ArtifactRef(stage=stage, key=key, path=str(self.artifact_dir(stage, key)),
                           fingerprint=manifest["fingerprint"])

    def manifest(self, ref: ArtifactRef) -> dict:
        return json.loads((Path(ref.path) / MANIFEST).read_text())

    # ------------------------------------------------------------------ one writer at a time
    def lock(self, stage: str, key: str, on_wait=None):
        """One writer at a time for ``<stage>/<key>``, across processes (see ``file_lock``)."""
        return file_lock(self.root / ".locks" / f"{stage}-{key}.lock", on_wait)

    # ------------------------------------------------------------------ writing
    @contextlib.contextmanager
    def write(self, stage: str, key: str, inputs: dict | None = None,
              metrics: dict | None = None) -> Iterator[Path]:
        """Yield a temp dir; on success write the manifest and rename it to ``<stage>/<key>``.

        On any exception the temp dir is removed and nothing at the final path changes. ``metrics`` may be
        filled in by the caller inside the block (it is read after the block ends).
        """
        tmp_root = self.root / ".tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        tmp = tmp_root / f"{stage}-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
            from sft_pipeline import faults

            faults.point(stage, "write")
            files = {}
            for p in sorted(tmp.rglob("*")):
                if p.is_file() and p.name != MANIFEST:
                    size = p.stat().st_size
                    files[str(p.relative_to(tmp))] = {
                        "size": size, "sha256": file_sha256(p) if size <= HASH_LIMIT else None}
            _disk_full_fault(stage, tmp)
            manifest = {
                "stage": stage, "key": key, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "writer": WRITER_ID, "inputs": inputs or {}, "metrics": metrics or {}, "files": files,
                "fingerprint": digest({"stage": stage, "files": files}),
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
            fsync_tree(tmp)
            final = self.artifact_dir(stage, key)
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():  # an invalid leftover: move it aside first, then replace
                trash = tmp_root / f"old-{stage}-{key}-{uuid.uuid4().hex[:8]}"
                final.rename(trash)
                shutil.rmtree(trash, ignore_errors=True)
            tmp.rename(final)
            _fsync_dir(final.parent)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def clean_tmp(self, max_age_s: float = 0) -> None:
        """Remove temp dirs left by killed processes (their pid is gone)."""
        tmp_root = self.root / ".tmp"
        if not tmp_root.is_dir():
            return
        for p in tmp_root.iterdir():
            parts = p.name.split("-")  # <stage>-<key>-<pid>-<random>, or old-... (already moved aside)
            pid = int(parts[-2]) if not p.name.startswith("old-") and parts[-2].isdigit() else None
            alive = pid is not None and _pid_alive(pid)
            if not alive and time.time() - p.stat().st_mtime >= max_age_s:
                shutil.rmtree(p, ignore_errors=True)


def _disk_full_fault(stage: str, tmp: Path) -> None:
    """Test hook, off by default: ``SFT_PIPELINE_FAULT_DISK_FULL=<stage>`` fails writing that stage's artifact
    the way a full disk does (ENOSPC), after its files are in the temp dir and before the manifest."""
    if os.environ.get("SFT_PIPELINE_FAULT_DISK_FULL") == stage:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / MANIFEST))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
