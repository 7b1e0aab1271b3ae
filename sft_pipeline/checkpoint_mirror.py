"""A stage's work dir mirrored to the object store, so that training checkpoints outlive the machine.

The training code is not touched: it writes ``<work>/checkpoint-N`` and seals it (``seal_checkpoint`` writes the
file ``sft-pipeline-complete`` last, listing every file with its size and sha256), one process or several. Around
the stage (``Store.mirror_work``):

- ``restore`` (before it runs): the newest remote checkpoint whose seal is there, when it is newer than the newest
  sealed one on this disk, is downloaded, checked against its seal and renamed into the work dir, with
  ``batch.json`` (an out-of-memory fallback's smaller micro-batch); the trainer then resumes from it as usual;
- a thread (while it runs) uploads each newly sealed checkpoint, its files first and its seal LAST, and removes the
  remote ones that the local side pruned (Trainer's ``save_total_limit``), so the remote holds what the disk holds;
- ``flush`` does one such round at once and returns whether everything sealed is uploaded. The end of a stage that
  raised (a crash, Ctrl-C, a stop request that training answers with a checkpoint and an exception) calls it, so
  the checkpoint written just before the process ends is uploaded too; code that seals a checkpoint on its way out
  and does not raise can call ``StageContext.flush_work()``.
"""
from __future__ import annotations

import json
import logging
import shutil
import threading
import time
import uuid
from pathlib import Path

from sft_pipeline.remote import Remote, RemoteBroken, RemoteError

SEAL = "sft-pipeline-complete"  # the trainer's SEALED, the seal file's name (tests/test_object_store.py checks it)
STATE = ("batch.json",)  # files beside the checkpoints that a resume reads
POLL_SECONDS = 5.0  # how often the thread looks for a newly sealed checkpoint (a local directory listing)


def _step(name: str) -> int | None:
    head, _, n = name.rpartition("-")
    return int(n) if head == "checkpoint" and n.isdigit() else None


class WorkMirror:
    def __init__(self, remote: Remote, rel: str, local: Path, log: logging.Logger | logging.LoggerAdapter,
                 what: str = "train"):
        self.remote, self.rel, self.local, self.log, self.what = remote, rel, Path(local), log, what
        self.uploaded: set[str] = set()  # checkpoints whose seal is in the object store
        self.partial: set[str] = set()  # checkpoints uploaded in part (their seal is not there)
        self.sent: dict[str, tuple[int, int]] = {}  # state file -> (size, mtime_ns) uploaded
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    # ------------------------------------------------------------------ before the stage
    def _local_sealed(self) -> dict[str, Path]:
        if not self.local.is_dir():
            return {}
        return {p.name: p for p in self.local.iterdir()
                if p.is_dir() and _step(p.name) is not None and (p / SEAL).is_file()}

    def restore(self) -> str | None:
        """Bring the newest sealed remote checkpoint here when this disk has none as new; returns its name."""
        found = self.remote.find(self.rel)
        sealed: set[str] = set()
        for rel in found:
            top, _, rest = rel.partition("/")
            if _step(top) is not None:
                (sealed.add(top) if rest == SEAL else self.partial.add(top))
        self.partial -= sealed
        self.uploaded = set(sealed)
        newest_here = max((_step(n) for n in self._local_sealed()), default=-1)
        for name in sorted(sealed, key=_step, reverse=True):
            if _step(name) <= newest_here:
                return None
            t0 = time.monotonic()
            tmp = self.local / f".incoming-{name}-{uuid.uuid4().hex[:8]}"
            try:
                seal = self.remote.get_dir(f"{self.rel}/{name}", SEAL, tmp)
            except RemoteBroken as e:
                shutil.rmtree(tmp, ignore_errors=True)
                self.log.warning("%s: the object store's %s is damaged (%s); trying an older one", self.what, name, e)
                continue
            except BaseException:  # noqa: BLE001 - removes the half download, then re-raises
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            if (self.local / name).exists():  # cut short here (no seal): the remote one is whole
                shutil.rmtree(self.local / name)
            tmp.rename(self.local / name)
            for state in STATE:
                if state in found:
                    data = self.remote.read_bytes(f"{self.rel}/{state}")
                    if data is not None:
                        (self.local / state).write_bytes(data)
                        st = (self.local / state).stat()
                        self.sent[state] = (st.st_size, st.st_mtime_ns)
            files = seal.get("files") or {}
            size = sum(m.get("size", 0) for m in files.values())
            self.log.info("%s: restored %s from %s (%d files, %.1f MB, %.1f s)", self.what, name,
                          self.remote.url_of(self.rel), len(files), size / 1e6, time.monotonic() - t0)
            return name
        return None

    # ------------------------------------------------------------------ while it runs
    def flush(self) -> bool:
        """Upload what is sealed here and not there yet, then prune; True when all of it is in the store."""
        with self._lock:
            try:
                self._upload_new()
                self._upload_state()
                self._prune()
            except RemoteError as e:
                if not self._failing:
                    self.log.warning("%s: could not upload checkpoints to the object store (%s); trying again",
                                     self.what, e)
                self._failing = True
                return False
            self._failing = False
            return True

    def _upload_new(self) -> None:
        for name, path in sorted(self._local_sealed().items(), key=lambda kv: _step(kv[0])):
            if name in self.uploaded:
                continue
            try:
                text = (path / SEAL).read_text()
                listed = (json.loads(text) if text.strip() else {}).get("files")
            except (OSError, ValueError):
                continue  # pruned or rewritten meanwhile: the next round sees it
            files = sorted(listed) if listed else sorted(str(p.relative_to(path)) for p in path.rglob("*")
                                                          if p.is_file() and p.name != SEAL)
            t0 = time.monotonic()
            self.partial.add(name)
            try:
                self.remote.put_dir(path, f"{self.rel}/{name}", SEAL, files)
            except RemoteError:
                if not (path / SEAL).is_file():
                    continue  # the trainer pruned it while it was being uploaded
                raise
            self.partial.discard(name)
            self.uploaded.add(name)
            size = sum((listed or {}).get(f, {}).get("size", 0) for f in files)
            self.log.info("%s: %s uploaded to the object store (%d files, %.1f MB, %.1f s)", self.what, name,
                          len(files), size / 1e6, time.monotonic() - t0)

    def _upload_state(self) -> None:
        for state in STATE:
            p = self.local / state
            if not p.is_file():
                continue
            st = p.stat()
            if self.sent.get(state) != (st.st_size, st.st_mtime_ns):
                self.remote.write_bytes(f"{self.rel}/{state}", p.read_bytes())
                self.sent[state] = (st.st_size, st.st_mtime_ns)

    def _prune(self) -> None:
        """Remove remote checkpoints that are gone here and older than the newest uploaded (seal first)."""
        if not self.uploaded:
            return
        newest = max(_step(n) for n in self.uploaded)
        here = {p.name for p in self.local.iterdir()} if self.local.is_dir() else set()
        for name in sorted((self.uploaded | self.partial) - here, key=_step):
            if _step(name) >= newest:
                continue
            self.remote.delete([f"{self.rel}/{name}/{SEAL}"])
            self.remote.delete_tree(f"{self.rel}/{name}")
            self.uploaded.discard(name)
            self.partial.discard(name)

    def start(self) -> None:
        def loop():
            while not self._stop.wait(POLL_SECONDS):
                self.flush()

        self._thread = threading.Thread(target=loop, name=f"mirror-{self.rel}", daemon=True)
        self._thread.start()

    def stop(self, flush: bool) -> None:
        """Stop the thread; ``flush``: one last round (the stage raised: its last checkpoint must be uploaded)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if flush:
            self.flush()

    # ------------------------------------------------------------------ after it finished
    def drop(self) -> None:
        """The stage's artifact is in the store: its checkpoints are not needed there any more."""
        try:
            self.remote.delete_tree(self.rel, retries=0)
        except RemoteError as e:
            self.log.warning("%s: could not remove its checkpoints from the object store (%s)", self.what, e)
