"""Prefect's temporary server for one ``sft-pipeline run``, started while the CLI starts up rather than after.

With no ``PREFECT_API_URL``, Prefect starts a temporary server (``SubprocessASGIServer``) on the flow's first API
call: it imports the whole server in the calling process (~3 s of CPU on 2 cores) to run one command, then waits
~4 s for that server process to answer. ``start()`` runs the same command (uvicorn serving
``prefect.server.api.server:create_app``, its UI off, with Prefect's markers of an ephemeral server) as the CLI's
first step, so the server comes up while the CLI imports Prefect and checks the config; ``connect()`` then points
Prefect at it (``PREFECT_API_URL``), or stops it when the settings name a server after all (a profile, a
``prefect.toml``); ``stop()`` ends it. Measured: BENCHMARKS.md, *Issue 32*.

Like the CLI's earlier start of Prefect's own server, the process runs in its own process group (Ctrl-C reaches only
the CLI, which still reports the interrupt to it) and gets SIGTERM when the CLI dies (PR_SET_PDEATHSIG, Linux).
Imports nothing from Prefect before ``connect()``.
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

STARTUP_FAILURE = 3  # uvicorn's exit code when it cannot start (its port taken meanwhile): started again elsewhere
_server: "TemporaryServer | None" = None


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _detach() -> None:  # runs in the child between fork and exec
    os.setpgrp()
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: Linux only
    except Exception:  # noqa: BLE001 - elsewhere the atexit hook stops it; a SIGKILLed parent leaves it running
        pass


class TemporaryServer:
    """One server process on 127.0.0.1 at a free port."""

    def __init__(self):
        self.port = _free_port()
        self.process = self._spawn()
        self.started = time.monotonic()
        self.in_use = False  # connect() pointed Prefect at it

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def _spawn(self) -> subprocess.Popen:
        spec = importlib.util.find_spec("prefect")  # its folder, without importing it
        app_dir = str(Path(list(spec.submodule_search_locations)[0]).parent)
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        return subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", app_dir, "--factory", "prefect.server.api.server:create_app",
             "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
            env=env, preexec_fn=_detach)

    def wait(self, timeout: float) -> None:
        """Until the server answers ``/health``; RuntimeError when it exits or ``timeout`` passes first."""
        deadline = self.started + timeout
        while True:
            code = self.process.poll()
            if code == STARTUP_FAILURE:
                self.port, self.process = _free_port(), self._spawn()
                continue
            if code is not None:
                raise RuntimeError(f"the temporary Prefect server exited with code {code} before it answered")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the temporary Prefect server did not answer within {timeout:g} s "
                                   "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start() -> TemporaryServer | None:
    """Start the server now unless ``PREFECT_API_URL`` is set in the environment (a profile's is seen by
    ``connect``). Stopped at exit."""
    global _server
    if os.environ.get("PREFECT_API_URL") or _server is not None:
        return _server
    _server = TemporaryServer()
    atexit.register(stop)
    return _server


def connect() -> bool:
    """Point Prefect at the server ``start`` started, once it answers; True when it is in use. False when none was
    started, when Prefect's settings name a server (it is stopped then), or when this Prefect cannot be pointed
    at it after import (then Prefect starts its own, as before)."""
    global _server
    if _server is None:
        return False
    import prefect.context
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    refresh = getattr(prefect.context, "refresh_global_settings_context", None)
    if PREFECT_API_URL.value() or refresh is None:
        stop()
        return False
    logging.getLogger("prefect").info("Starting temporary server on %s", _server.api_url.removesuffix("/api"))
    _server.wait(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    os.environ["PREFECT_API_URL"] = _server.api_url
    os.environ.setdefault("PREFECT_UI_URL", "")  # it serves no UI: no "View at" link to a page that is not there
    refresh()  # the settings every thread reads (log and event workers included) now name it
    _server.in_use = True
    return True


def stop() -> None:
    """Stop the server (at most 5 s, then killed); nothing when none runs."""
    global _server
    if _server is not None:
        server, _server = _server, None
        if server.in_use:
            logging.getLogger("prefect").info("Stopping temporary server on %s", server.api_url.removesuffix("/api"))
        server.stop()
