"""Locks across machines: a lease in the object store, taken with a conditional create, expiring when not renewed.

A lease on a name (``train-<key>``) is a series of objects ``.locks/<name>/<generation>.json``. Each generation is
written with ``Remote.create`` (S3 ``If-None-Match: *``), so exactly one process creates it: that process holds the
lease. The holder rewrites its own generation every ttl/3 (its ``beat`` goes up); nobody else writes it. A waiter
reads the newest generation and takes the next one when it is released, or when its content has not changed for
the lease's ttl by the waiter's own clock (no clocks are compared across machines): a holder killed by SIGKILL, or
whose machine died, is taken over after at most one ttl. A holder that finds a newer generation than its own has
lost the lease (it stalled longer than the ttl) and says so; the store then keeps its artifact local.

Generations are never deleted (a few hundred bytes each, one per time a lease is taken): so no generation can be
created twice, and a listing that lags behind (or comes back empty) only makes a waiter try a generation that
exists, fail, and look again; it can never give two processes the lease.

Only conditional create is needed, not conditional overwrite: on SeaweedFS 4.48 here, eight clients overwriting
one object with ``If-Match`` on the same ETag had two winners in 13 of 40 rounds, while eight creating one object
with ``If-None-Match: *`` had exactly one winner in 40 of 40.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from typing import Callable

from sft_pipeline.errors import ConfigError
from sft_pipeline.remote import Remote, RemoteError

log = logging.getLogger("sft_pipeline.lease")
TTL_ENV = "SFT_PIPELINE_LEASE_SECONDS"
DEFAULT_TTL = 60.0  # a dead holder blocks the others this long at most; renewed every ttl/3 (20 s)
TTL_RANGE = (3.0, 3600.0)


def ttl_from_env() -> float:
    """``$SFT_PIPELINE_LEASE_SECONDS`` (default 60): ConfigError when it is not a number of seconds in range."""
    raw = os.environ.get(TTL_ENV)
    if not raw:
        return DEFAULT_TTL
    try:
        ttl = float(raw)
    except ValueError:
        ttl = float("nan")
    if not TTL_RANGE[0] <= ttl <= TTL_RANGE[1]:
        raise ConfigError(f"{TTL_ENV} must be a number of seconds from {TTL_RANGE[0]:g} to {TTL_RANGE[1]:g} (how "
                          "long a lease outlives a holder that stopped renewing it)")
    return ttl


class Lease:
    """``with Lease(remote, name, holder):`` holds the lease on ``name`` for the block (see the module docstring).

    ``on_wait(holder)`` is called when a wait starts and whenever the holder waited for changes.
    """

    def __init__(self, remote: Remote, name: str, holder: str, ttl: float | None = None,
                 on_wait: Callable[[str], None] | None = None):
        self.remote, self.name, self.holder = remote, name, holder
        self.ttl = ttl or ttl_from_env()
        self.on_wait = on_wait
        self.gen: int | None = None
        self.beat = 0
        self.lost: str | None = None  # who took the lease over, once it was lost
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False
        self._token = uuid.uuid4().hex  # tells this process's generation from another's with the same holder

    def _key(self, gen: int) -> str:
        return f".locks/{self.name}/{gen:08d}.json"

    def _body(self, released: bool = False) -> bytes:
        return json.dumps({"holder": self.holder, "token": self._token, "ttl": self.ttl, "beat": self.beat,
                           "released": released, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode()

    def _generations(self, retries: int | None = None) -> list[int]:
        kw = {} if retries is None else {"retries": retries}
        names = self.remote.find(f".locks/{self.name}", **kw)
        return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())

    # ------------------------------------------------------------------ taking it
    def acquire(self) -> None:
        seen: dict[int, tuple[bytes, float]] = {}  # generation -> (its content, when this process first saw it)
        told, delay = None, 0.5
        while True:
            gens = self._generations()
            top = gens[-1] if gens else 0
            raw = self.remote.read_bytes(self._key(top)) if top else None
            if top and raw is None:
                time.sleep(0.2)
                continue  # removed between the listing and the read: list again
            if not top or self._free(top, raw, seen):
                self.beat = 0
                if self.remote.create(self._key(top + 1), self._body()) or self._mine(top + 1):
                    self.gen = top + 1
                    break
                continue  # another waiter took it first (or the listing lagged: that generation exists)
            holder = _field(raw, "holder") or "another process"
            if holder != told and self.on_wait is not None:
                self.on_wait(holder)
            told = holder
            time.sleep(delay)
            delay = min(delay * 1.5, max(1.0, self.ttl / 6))
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{self.name}", daemon=True)
        self._thread.start()

    def _mine(self, gen: int) -> bool:
        """Did our own create of ``gen`` succeed after all? (A request retried after the store did the first one
        gets 412: the object is there, with our token.)"""
        return _field(self.remote.read_bytes(self._key(gen)), "token") == self._token

    def _free(self, gen: int, raw: bytes, seen: dict[int, tuple[bytes, float]]) -> bool:
        """Is generation ``gen`` (its content ``raw``) released, or unchanged for a ttl as seen from here?"""
        if _field(raw, "released"):
            return True
        now = time.monotonic()
        if gen not in seen or seen[gen][0] != raw:
            seen[gen] = (raw, now)
            return False
        ttl = _field(raw, "ttl")
        return now - seen[gen][1] >= (float(ttl) if isinstance(ttl, (int, float)) else self.ttl)

    # ------------------------------------------------------------------ keeping it
    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                newer = [g for g in self._generations(retries=0) if g > self.gen]
                if newer:
                    self.lost = _field(self.remote.read_bytes(self._key(newer[-1]), retries=0), "holder") \
                        or "another process"
                    log.warning("lost the lease on %s to %s: this process stalled longer than its %g s; its result "
                                "stays in the local cache", self.name, self.lost, self.ttl)
                    return
                self.beat += 1
                self.remote.write_bytes(self._key(self.gen), self._body(), retries=0)
                self._failing = False
            except RemoteError as e:
                if not self._failing:
                    log.warning("could not renew the lease on %s (%s); trying again in %g s", self.name, e,
                                self.ttl / 3)
                self._failing = True

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.gen is None or self.lost:
            return
        try:
            self.remote.write_bytes(self._key(self.gen), self._body(released=True), retries=0)
        except RemoteError as e:
            log.warning("could not release the lease on %s (%s); it expires in %g s", self.name, e, self.ttl)

    def __enter__(self) -> "Lease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _field(raw: bytes | None, name: str):
    try:
        data = json.loads(raw) if raw else {}
    except ValueError:
        return None
    return data.get(name) if isinstance(data, dict) else None
