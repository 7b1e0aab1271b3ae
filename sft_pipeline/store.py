"""The artifact store: one directory per (stage, cache key), written atomically, with a manifest.

Layout under the store root::

    <stage>/<key>/            a finished artifact (manifest.json + the stage's files)
    .work/<stage>/<key>/      a stage's scratch space that survives a crash (training checkpoints)
    .tmp/                     artifacts being written; renamed into place only when complete
    .locks/                   one lock file per (stage, key): one writer at a time, even across processes
    models/<fingerprint>/     base models built from a config or converted from a file, made once
    evaluate_base/<key>/      the base model's eval numbers, shared by runs that only retrain (tasks/evaluate.py)
    generate_base/<key>/      the base model's sample replies, the same way (tasks/generate.py)
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
import re
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

    # ------------------------------------------------------------------ memos: small results shared across keys
    def read_memo(self, name: str, key: str | None) -> tuple[Any, str] | None:
        """``(data, when it was written)`` of ``<name>/<key>/memo.json`` (verified like an artifact), or None."""
        ref = self.ref(name, key) if key else None
        if ref is None:
            return None
        return ref.read_json("memo.json"), self.manifest(ref)["created"]

    def write_memo(self, name: str, key: str | None, data: Any) -> None:
        """Keep ``data`` as ``<name>/<key>/memo.json`` (atomically, under the key's lock). A memo saves work in later
        runs only: failing to write one (a full disk) is logged, not raised."""
        if not key:
            return
        try:
            with self.lock(name, key), self.write(name, key, inputs={"key": key}) as tmp:
                (tmp / "memo.json").write_text(json.dumps(data, indent=2, default=str))
        except OSError as e:
            import logging

            logging.getLogger("sft_pipeline.store").warning("could not keep %s for later runs: %s", name, e)

    def claim(self) -> None:
        """Make sure the root is a store this project may write to, and mark it as one (first use).

        Raises ConfigError (one line) for a file, a read-only directory, or a directory that holds other things.
        """
        from sft_pipeline.errors import ConfigError

        problem = check_root(self.root)
        if problem:
            raise ConfigError(problem)
        self.root.mkdir(parents=True, exist_ok=True)
        marker = self.root / STORE_MARKER
        if not marker.exists():
            marker.write_text("This directory is an sft-pipeline artifact store; sft-pipeline may create and "
                              "remove files under it.\n")

    def clean_tmp(self, max_age_s: float = 0) -> None:
        """Remove temp dirs left by killed processes (their pid is gone).

        Only in a store this project marked (``claim``), and only names ``Store.write`` makes
        (``<stage>-<key>-<pid>-<8 hex>``, ``old-<stage>-<key>-<8 hex>``): anything else under ``.tmp`` is left
        alone, so a directory mistaken for a store (``--store ~``) never loses a file.
        """
        self.claim()
        tmp_root = self.root / ".tmp"
        if not tmp_root.is_dir() or tmp_root.is_symlink():
            return
        for p in tmp_root.iterdir():
            if p.is_symlink() or not p.is_dir():
                continue
            if OLD_TMP_NAME.fullmatch(p.name):
                pid = None  # already moved aside by a writer: garbage whoever made it
            elif m := TMP_NAME.fullmatch(p.name):
                pid = int(m["pid"])
            else:
                continue  # not ours
            alive = pid is not None and _pid_alive(pid)
            if not alive and time.time() - p.lstat().st_mtime >= max_age_s:
                shutil.rmtree(p, ignore_errors=True)


# the names Store.write gives its temp dirs: clean_tmp removes nothing else
TMP_NAME = re.compile(r"(?P<stage>[A-Za-z0-9_]+)-(?P<key>[A-Za-z0-9_.-]+)-(?P<pid>[0-9]+)-[0-9a-f]{8}")
OLD_TMP_NAME = re.compile(r"old-[A-Za-z0-9_]+-[A-Za-z0-9_.-]+-[0-9a-f]{8}")
STORE_MARKER = ".sft-pipeline-store"  # written into a store on first use; see Store.claim
# what a store made before the marker existed can hold: such a directory is adopted (and marked)
STORE_LAYOUT = {"authenticate", "data", "format", "train", "evaluate", "evaluate_base", "save_adapter", "generate",
                "generate_base", "models", ".work", ".tmp", ".prefect", ".keys", ".locks", "runs", "promoted",
                STORE_MARKER}


def _stage_dir(p: Path) -> bool:
    """A directory of finished artifacts (``<key>/manifest.json`` each): a stage this list does not know yet."""
    if p.is_symlink() or not p.is_dir():
        return False
    children = list(p.iterdir())
    return bool(children) and all(c.is_dir() and (c / MANIFEST).is_file() for c in children[:1000])


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK | os.X_OK)


def check_root(root: Path) -> str | None:
    """Why ``root`` cannot be a store, or None. Reads only; ``Store.claim`` marks it."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        return f"store {root} is not a directory; give a new or empty directory, or an existing store"
    if root.is_dir():
        if not (root / STORE_MARKER).is_file():
            foreign = sorted(n for n in os.listdir(root) if n not in STORE_LAYOUT and not _stage_dir(root / n))
            if foreign:
                return (f"store {root} is not empty and is not an sft-pipeline store (no {STORE_MARKER} file; "
                        f"it holds {len(foreign)} other entries): give a new or empty directory, e.g. "
                        f"{root / 'sft-store'}")
        if not _writable(root):
            return f"store {root} is read-only: give a directory you can write to"
        return None
    parent = root.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"store {root} cannot be created: {parent} is not a directory"
    if not _writable(parent):
        return f"store {root} cannot be created: {parent} is read-only"
    return None


def check_paths(store: str | Path | None, summary_json: str | None = None) -> None:
    """Raise ConfigError (one line) when the store or the summary path cannot be used; writes nothing."""
    from sft_pipeline.errors import ConfigError

    root = Path(store).expanduser().resolve() if store else default_store().resolve()
    problem = check_root(root) or (check_summary_path(summary_json) if summary_json else None)
    if problem:
        raise ConfigError(problem)


def check_summary_path(path: str | Path) -> str | None:
    """Why the run summary cannot be written to ``path`` (a directory, an unwritable place), or None."""
    p = Path(path).expanduser()
    if p.is_dir() or str(path).endswith(os.sep):
        return f"--summary-json {path} is a directory: give a file path, e.g. {p / 'summary.json'}"
    if p.exists() and not p.is_file():
        return f"--summary-json {path} is not a regular file"
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"--summary-json {path}: {parent} is not a directory"
    if not _writable(parent):  # written as a temp file beside it, then renamed over it: the folder must be writable
        return f"--summary-json {path} is not writable"
    return None


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
