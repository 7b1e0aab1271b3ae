"""The artifact store: one directory per (stage, cache key), written atomically, with a manifest.

Layout under the store root::

    <stage>/<key>/            a finished artifact (manifest.json + the stage's files)
    .work/<stage>/<key>/      a stage's scratch space that survives a crash (training checkpoints)
    .tmp/                     artifacts being written; renamed into place only when complete
    .locks/                   one lock file per (stage, key): one writer at a time, even across processes
    models/<fingerprint>/     base models built from a config or converted from a file, made once
    evaluate_base/<key>/      the base model's eval numbers, shared by runs that only retrain (tasks/evaluate.py)
    generate_base/<key>/      the base model's sample replies, the same way (tasks/generate.py)
    preflight/<key>/          what the up-front checks measured once (a template's overhead, a model's sizes)
    runs/                     one summary per run (``sft-pipeline plan`` reads them for deleted artifacts)
    promoted/<recipe>.json    the promoted adapter of each recipe

A stage writes into a temp dir and renames it into place after writing ``manifest.json`` (files, sizes, hashes),
so a killed process never leaves a half artifact that looks finished. ``Store.check`` re-verifies an artifact
before it is reused; a deleted or tampered one is recomputed.

On object storage (``Store("s3://bucket/prefix")``) the same layout lives under the URL, and the local directory
(``root``) is its cache (``--cache-dir``; by default ``~/.cache/sft-pipeline/remote/<hash of the URL>``): stages still
read local paths. ``ref`` downloads a finished artifact the cache lacks (checked against its manifest before it is
renamed into place); ``write`` writes locally, then uploads the files, then the manifest last; ``lock`` adds a lease
in the object store (``sft_pipeline/lease.py``) to the local lock; ``mirror_work`` mirrors a stage's checkpoints
(``sft_pipeline/checkpoint_mirror.py``). ``models/`` stays local: each machine builds or converts its base again.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
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


def _log() -> logging.Logger:
    return logging.getLogger("sft_pipeline.store")


def default_store() -> Path | str:
    """``$SFT_PIPELINE_STORE`` (a directory or an object-store URL), else ``~/.cache/sft-pipeline``."""
    location = os.environ.get("SFT_PIPELINE_STORE") or str(Path.home() / ".cache" / "sft-pipeline")
    return location if is_url(location) else Path(location).expanduser()


def is_url(location: Any) -> bool:
    """``s3://...``, ``gs://...``: a store on object storage (any fsspec URL), not a local directory."""
    return isinstance(location, str) and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*://.*", location) is not None


def default_cache(location: str) -> Path:
    """Where a store on object storage is cached on this machine: ``$SFT_PIPELINE_CACHE``, else a directory per URL
    under ``~/.cache/sft-pipeline/remote``."""
    if os.environ.get("SFT_PIPELINE_CACHE"):
        return Path(os.environ["SFT_PIPELINE_CACHE"]).expanduser()
    return Path.home() / ".cache" / "sft-pipeline" / "remote" / digest(location.rstrip("/"), 12)


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


# what stays on this machine with a store on object storage: bases built from a config or converted from a file
# (deterministic and large: each machine makes its own)
LOCAL_ONLY = ("models",)


class Store:
    """A local directory of artifacts, or, given a URL, the object store at that URL with ``root`` as its cache.

    ``block``: a Prefect block with the object store's credentials (``aws-credentials/<name>``,
    ``s3-bucket/<name>``), read where it is used; the URL may then come from an ``S3Bucket`` block.
    """

    def __init__(self, root: str | Path, cache_dir: str | Path | None = None, block: str | None = None):
        self.remote = None
        if is_url(root) or block:
            from sft_pipeline.remote import Remote

            url = str(root) if is_url(root) else None
            self.remote = Remote(url, block)
            cache_dir = cache_dir or default_cache(url or f"block:{block}")
            self.root = Path(cache_dir).expanduser().resolve()
        else:
            self.root = Path(root).expanduser().resolve()
        self._leases: dict[tuple[str, str], Any] = {}  # (stage, key) -> the lease held on it now
        self._mirrors: dict[tuple[str, str], Any] = {}  # (stage, key) -> its work dir's mirror, while it runs

    @property
    def location(self) -> str:
        """What the user named: the URL of a store on object storage, else the directory."""
        return self.remote.url if self.remote is not None else str(self.root)

    def location_of(self, path: str | Path) -> str:
        """Where a file under ``root`` lives for other machines: its URL with an object store, else its path."""
        return self.remote.url_of(self._rel(Path(path))) if self.remote is not None else str(path)

    def _remote_for(self, stage: str):
        return self.remote if self.remote is not None and stage not in LOCAL_ONLY else None

    def _rel(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.root).as_posix()

    # ------------------------------------------------------------------ paths
    def artifact_dir(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def work_dir(self, stage: str, key: str) -> Path:
        d = self.root / ".work" / stage / key
        d.mkdir(parents=True, exist_ok=True)
        return d

    # ------------------------------------------------------------------ reading
    def check(self, stage: str, key: str) -> tuple[bool, str]:
        """Is the artifact complete and unmodified? Returns (ok, reason). With an object store: here, or there
        (its manifest; the files are checked when it is downloaded)."""
        ok, why = self._check_local(stage, key)
        remote = self._remote_for(stage)
        if not ok and remote is not None and remote.exists(f"{stage}/{key}/{MANIFEST}"):
            return True, "ok"
        return ok, why

    def _check_local(self, stage: str, key: str) -> tuple[bool, str]:
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
        """The finished artifact on this machine, or None. With an object store, one that only the store has is
        downloaded into the cache first (checked against its manifest; a broken one counts as absent)."""
        ok, _ = self._check_local(stage, key)
        if not ok:
            return self._download(stage, key) if self._remote_for(stage) is not None else None
        manifest = json.loads((self.artifact_dir(stage, key) / MANIFEST).read_text())
        return ArtifactRef(stage=stage, key=key, path=str(self.artifact_dir(stage, key)),
                           fingerprint=manifest["fingerprint"])

    def peek(self, stage: str, key: str) -> ArtifactRef | None:
        """Like ``ref`` without downloading: an artifact only the object store has comes back with its URL as
        ``path`` (``sft-pipeline plan``)."""
        ok, _ = self._check_local(stage, key)
        if ok:
            return self.ref(stage, key)
        remote = self._remote_for(stage)
        manifest = remote.read_json(f"{stage}/{key}/{MANIFEST}") if remote is not None else None
        if not isinstance(manifest, dict) or "fingerprint" not in manifest:
            return None
        return ArtifactRef(stage=stage, key=key, path=remote.url_of(f"{stage}/{key}"),
                           fingerprint=manifest["fingerprint"])

    def _download(self, stage: str, key: str) -> ArtifactRef | None:
        from sft_pipeline.remote import RemoteBroken

        remote, rel = self._remote_for(stage), f"{stage}/{key}"
        t0 = time.monotonic()
        tmp_root = self.root / ".tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        tmp = tmp_root / f"{stage}-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            manifest = remote.get_dir(rel, MANIFEST, tmp)
        except RemoteBroken as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if str(e) != "no marker":
                _log().warning("%s: the object store's %s is broken (%s): computed again", stage,
                               remote.url_of(rel), e)
            return None
        except BaseException:  # noqa: BLE001 - removes the half download, then re-raises
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_tree(tmp)
        final = self.artifact_dir(stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        if self._check_local(stage, key)[0]:  # another process of this machine was quicker: its copy is in use
            shutil.rmtree(tmp, ignore_errors=True)
            return self.ref(stage, key)
        if final.exists():  # a broken local copy: move it aside, then replace it
            trash = tmp_root / f"old-{stage}-{key}-{uuid.uuid4().hex[:8]}"
            final.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        tmp.rename(final)
        _fsync_dir(final.parent)
        size = sum(m["size"] for m in manifest.get("files", {}).values())
        _log().info("%s: downloaded %s (%d files, %.1f MB, %.1f s)", stage, remote.url_of(rel),
                    len(manifest.get("files", {})), size / 1e6, time.monotonic() - t0)
        return ArtifactRef(stage=stage, key=key, path=str(final), fingerprint=manifest["fingerprint"])

    # ------------------------------------------------------------------ the object store's copy
    def synced(self, stage: str, key: str) -> bool:
        """Does the object store have this artifact (its manifest)? Always True for a local store."""
        remote = self._remote_for(stage)
        return remote is None or remote.exists(f"{stage}/{key}/{MANIFEST}")

    def upload(self, stage: str, key: str) -> None:
        """Put the local artifact into the object store: its files, then its manifest LAST (under the key's lock:
        ``lock``). A store copy with another manifest (broken) is withdrawn first, its manifest before its files are
        overwritten. RemoteError (one line) when the store does not answer after the retries; the local artifact
        stays, and a later run only uploads."""
        remote = self._remote_for(stage)
        if remote is None:
            return
        from sft_pipeline import faults

        lease = self._leases.get((stage, key))
        if lease is not None and lease.lost:
            _log().warning("%s: %s holds the lease on %s now; this run's artifact stays in the local cache %s",
                           stage, lease.lost, key, self.artifact_dir(stage, key))
            return
        rel, local = f"{stage}/{key}", self.artifact_dir(stage, key)
        manifest = json.loads((local / MANIFEST).read_text())
        raw = remote.read_bytes(f"{rel}/{MANIFEST}")
        try:
            there = json.loads(raw) if raw is not None else None
        except ValueError:
            there = None
        if isinstance(there, dict) and there.get("fingerprint") == manifest["fingerprint"]:
            return
        if raw is not None:  # a broken copy there (we hold the lease): withdrawn before its files are overwritten
            remote.delete([f"{rel}/{MANIFEST}"])
        t0 = time.monotonic()
        done = remote.put_dir(local, rel, MANIFEST, sorted(manifest["files"]),
                              before_marker=lambda: faults.point(stage, "upload"),
                              create_marker=bool(remote.conditional))
        size = sum(m["size"] for m in manifest["files"].values())
        _log().info("%s: uploaded to %s (%d files, %.1f MB, %.1f s)%s", stage, remote.url_of(rel),
                    len(manifest["files"]), size / 1e6, time.monotonic() - t0,
                    "" if done else "; another run had just uploaded it: its copy is kept")

    def exists(self, path: str | Path) -> bool:
        """Is the artifact directory ``path`` (under ``root``) here, or in the object store?"""
        p = Path(path)
        if p.is_dir():
            return True
        try:
            rel = self._rel(p)
        except ValueError:
            return False
        remote = self._remote_for(rel.split("/", 1)[0])
        return remote is not None and remote.exists(f"{rel}/{MANIFEST}")

    def push(self, path: str | Path, quiet: bool = True) -> str | None:
        """Copy the file ``path`` (under ``root``) to the object store, or delete the store's copy when the file is
        gone: run summaries, the promotion pointer. One attempt (``quiet``: a summary is rewritten after every
        stage); returns why it failed, or None."""
        if self.remote is None:
            return None
        from sft_pipeline.remote import RemoteError

        p = Path(path)
        rel = self._rel(p)
        retries = {"retries": 0} if quiet else {}
        try:
            if p.is_file():
                self.remote.write_bytes(rel, p.read_bytes(), **retries)
            else:
                self.remote.delete([rel], **retries)
        except RemoteError as e:
            return str(e)
        return None

    def pull(self, path: str | Path) -> None:
        """Make the file ``path`` (under ``root``) what the object store holds (absent there: absent here)."""
        if self.remote is None:
            return
        p = Path(path)
        data = self.remote.read_bytes(self._rel(p))
        if data is None:
            p.unlink(missing_ok=True)
            return
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, p)

    def manifests(self, stage: str) -> list[dict]:
        """Every manifest of ``stage`` (here and in the object store), for ``plan``'s diffs."""
        found: dict[str, dict] = {}
        for path in sorted((self.root / stage).glob(f"*/{MANIFEST}")):
            try:
                found[path.parent.name] = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
        remote = self._remote_for(stage)
        if remote is not None:
            for rel in remote.find(stage):
                key, _, name = rel.partition("/")
                if name == MANIFEST and key not in found:
                    m = remote.read_json(f"{stage}/{rel}")
                    if isinstance(m, dict):
                        found[key] = m
        return list(found.values())

    def run_records(self) -> list[dict]:
        """Every run summary (``runs/*.json``); with an object store, those of every machine (downloaded once)."""
        runs = self.root / "runs"
        if self.remote is not None:
            for name, size in self.remote.find("runs").items():
                here = runs / name
                if "/" not in name and name.endswith(".json") and not (here.is_file() and here.stat().st_size == size):
                    self.pull(here)
        out = []
        for path in sorted(runs.glob("*.json")):
            try:
                out.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
        return out

    def manifest(self, ref: ArtifactRef) -> dict:
        return json.loads((Path(ref.path) / MANIFEST).read_text())

    # ------------------------------------------------------------------ one writer at a time
    @contextlib.contextmanager
    def lock(self, stage: str, key: str, on_wait=None) -> Iterator[None]:
        """One writer at a time for ``<stage>/<key>``, across processes (see ``file_lock``); with an object store,
        across machines too: a lease there (``sft_pipeline/lease.py``), taken after the local lock."""
        with file_lock(self.root / ".locks" / f"{stage}-{key}.lock", on_wait):
            remote = self._remote_for(stage)
            if remote is None or not self._conditional():
                yield
                return
            from sft_pipeline.lease import Lease

            with Lease(remote, f"{stage}-{key}", WRITER_ID, on_wait=on_wait) as lease:
                self._leases[(stage, key)] = lease
                try:
                    yield
                finally:
                    self._leases.pop((stage, key), None)

    def _conditional(self) -> bool:
        if self.remote.conditional is None:
            self.remote.check()
        return bool(self.remote.conditional)

    # ------------------------------------------------------------------ a stage's checkpoints in the object store
    @contextlib.contextmanager
    def mirror_work(self, stage: str, key: str, log=None) -> Iterator[None]:
        """While a stage runs: its work dir's sealed checkpoints mirrored to the object store (restored before,
        uploaded as they are sealed, a last upload when the stage raises; see ``sft_pipeline/checkpoint_mirror.py``).
        Nothing for a local store."""
        remote = self._remote_for(stage)
        if remote is None:
            yield
            return
        from sft_pipeline.checkpoint_mirror import WorkMirror

        mirror = WorkMirror(remote, f".work/{stage}/{key}", self.work_dir(stage, key), log or _log(), stage)
        mirror.restore()
        mirror.start()
        self._mirrors[(stage, key)] = mirror
        try:
            yield
        except BaseException:  # noqa: BLE001 - a last upload, then re-raised
            mirror.stop(flush=True)  # the checkpoint written just before the end (a crash, Ctrl-C, SIGTERM)
            raise
        else:
            mirror.stop(flush=False)  # the artifact follows; its checkpoints are not needed any more
        finally:
            self._mirrors.pop((stage, key), None)

    def flush_work(self, stage: str, key: str) -> bool:
        """Upload the stage's sealed checkpoints now (while ``mirror_work`` runs); True when all are in the store
        (or the store is local). For code that seals a checkpoint on its way out (a SIGTERM handler)."""
        mirror = self._mirrors.get((stage, key))
        return mirror.flush() if mirror is not None else True

    def drop_work(self, stage: str, key: str) -> None:
        """The stage's artifact is in the object store: remove its checkpoints there (best effort)."""
        remote = self._remote_for(stage)
        if remote is not None:
            from sft_pipeline.checkpoint_mirror import WorkMirror

            WorkMirror(remote, f".work/{stage}/{key}", self.work_dir(stage, key), _log(), stage).drop()

    # ------------------------------------------------------------------ writing
    @contextlib.contextmanager
    def write(self, stage: str, key: str, inputs: dict | None = None,
              metrics: dict | None = None) -> Iterator[Path]:
        """Yield a temp dir; on success write the manifest and rename it to ``<stage>/<key>``; with an object store,
        then upload it (``upload``).

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
        self.upload(stage, key)  # an object store: the files, then the manifest

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
        from sft_pipeline.errors import StageFailure

        try:
            with self.lock(name, key), self.write(name, key, inputs={"key": key}) as tmp:
                (tmp / "memo.json").write_text(json.dumps(data, indent=2, default=str))
        except (OSError, StageFailure) as e:  # a full disk; the object store not answering (RemoteError)
            _log().warning("could not keep %s for later runs: %s", name, e)

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
                STORE_MARKER, "remote",  # remote: the default caches of stores on object storage (default_cache)
                "preflight", ".hashes"}  # .hashes: remembered file hashes (sft_pipeline/gguf.py)


def _stage_dir(p: Path) -> bool:
    """A directory of finished artifacts (``<key>/manifest.json`` each): a stage this list does not know yet."""
    if p.is_symlink() or not p.is_dir():
        return False
    children = list(p.iterdir())
    return bool(children) and all(c.is_dir() and (c / MANIFEST).is_file() for c in children[:1000])


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK | os.X_OK)


def check_root(root: Path, what: str = "store") -> str | None:
    """Why ``root`` cannot be a store (``what``: or the cache of one), or None. Reads only; ``Store.claim`` marks
    it."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        return f"{what} {root} is not a directory; give a new or empty directory, or an existing store"
    if root.is_dir():
        if not (root / STORE_MARKER).is_file():
            foreign = sorted(n for n in os.listdir(root) if n not in STORE_LAYOUT and not _stage_dir(root / n))
            if foreign:
                return (f"{what} {root} is not empty and is not an sft-pipeline store (no {STORE_MARKER} file; "
                        f"it holds {len(foreign)} other entries): give a new or empty directory, e.g. "
                        f"{root / 'sft-store'}")
        if not _writable(root):
            return f"{what} {root} is read-only: give a directory you can write to"
        return None
    parent = root.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{what} {root} cannot be created: {parent} is not a directory"
    if not _writable(parent):
        return f"{what} {root} cannot be created: {parent} is read-only"
    return None


BLOCK_REF = r"[a-z0-9][a-z0-9-]*/[a-z0-9][a-z0-9-]*"  # a Prefect block: <block type slug>/<block name>


def check_paths(store: str | Path | None, summary_json: str | None = None, cache_dir: str | Path | None = None,
                block: str | None = None, connect: bool = True) -> None:
    """Raise ConfigError (one line) when the store or the summary path cannot be used; writes nothing.

    An object store (a URL, or ``block``): its scheme, its cache dir, and (``connect``) the bucket and the
    credentials; connecting writes one probe object and removes it. ``connect=False`` where no Prefect API is
    up yet to read ``block`` from (the CLI before the flow starts: the flow checks it).
    """
    from sft_pipeline.errors import ConfigError

    if block is not None and (not re.fullmatch(BLOCK_REF, block) or len(block) > 200
                              or re.search(r"[0-9a-f]{32,}", block)):
        raise ConfigError("--store-block must name a Prefect block as <type>/<name>, e.g. aws-credentials/sft-store "
                          "or s3-bucket/sft-store (lower case letters, digits and dashes), not a secret")
    if block is not None and store and not is_url(store):
        raise ConfigError(f"--store-block {block} holds an object store's credentials, but --store {store} is a "
                          "local directory: give --store s3://bucket/prefix (or an s3-bucket block alone)")
    location = store or (None if block else default_store())
    if is_url(location) or block:
        from sft_pipeline import remote
        from sft_pipeline.lease import ttl_from_env

        if location:
            remote.check_scheme(str(location))
        ttl_from_env()
        cache = Path(cache_dir or default_cache(str(location) if location else f"block:{block}"))
        problem = check_root(cache.expanduser().resolve(), "cache dir")
        if not problem and connect:
            Store(location or "", cache_dir, block).remote.check()
    else:
        problem = check_root(Path(location).expanduser().resolve())
    problem = problem or (check_summary_path(summary_json) if summary_json else None)
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
