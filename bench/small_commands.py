"""How long the small commands take: ``sft-pipeline plan`` after a run, and a fully cached rerun of ``tiny``.

    python -m bench.small_commands --out DIR [--runs 5] [--store DIR] [--busy N] [--code CHECKOUT]

Makes a store with one ``tiny`` run (``DIR/store``; ``--store``: one that already has it), then, alternating,
``--runs`` times each (every command a fresh process, as a user runs it; its own ``PREFECT_HOME`` under ``DIR``):

- ``plan``: ``sft-pipeline plan`` on that store;
- ``rerun``: ``sft-pipeline run`` on it, every stage Cached, with Prefect's temporary server;
- ``rerun@server``: the same against a long-lived ``prefect server start`` (``PREFECT_API_URL``), started once;

and the floors they stand on: ``python -c pass``, ``import prefect``, and the temporary server alone (its process
started until it answers ``/api/health``). Each command's phases come from timestamps taken inside it (the bench
wraps ``preflight.check``, ``prefect_server.connect``, ``cli._plan`` and ``cli._stop_prefect``; nothing in the
package is changed): start-up (interpreter, CLI, config), the checks, importing the flow (Prefect), waiting for the
server, the flow run, and the end (summary, stopping the server, exit). It also checks that a cached rerun and
``plan`` import neither torch nor transformers. ``--busy N`` runs N CPU-bound processes beside it (the machine
"under load"); ``--code`` runs another checkout's CLI (one from before issue 32: its phases are coarser). Prints a
table with the median, the range and the load average; writes ``DIR/small_commands.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "trl", "peft", "datasets")  # not to be imported by a cached rerun or a plan

# run inside the measured process: the CLI with timestamps around the functions it looks up at call time
_DRIVER = r"""
import atexit, json, os, sys, time
T = {"driver": time.time()}
def wrap(mod, name, label):
    fn = getattr(mod, name)
    def timed(*a, **k):  # the first call (the flow checks again: inside its run)
        first = label + ".start" not in T
        T.setdefault(label + ".start", time.time())
        try:
            return fn(*a, **k)
        finally:
            if first:
                T[label + ".end"] = time.time()
    setattr(mod, name, timed)
import sft_pipeline.cli as cli
from sft_pipeline import preflight
T["cli_imported"] = time.time()
wrap(preflight, "check", "checks"); wrap(cli, "_plan", "plan"); wrap(cli, "_stop_prefect", "stop")
try:
    from sft_pipeline import prefect_server
    wrap(prefect_server, "connect", "connect")
except ImportError:  # --code: a checkout from before issue 32 (Prefect starts its server on the first API call)
    wrap(cli, "_server_in_own_group", "connect")
def dump():
    T["heavy"] = sorted(m for m in %r if m in sys.modules)
    T["exit"] = time.time()
    with open(os.environ["SFT_BENCH_PHASES"], "w") as f:
        json.dump(T, f)
atexit.register(dump)
sys.argv = ["sft-pipeline", *sys.argv[1:]]
sys.exit(cli.main(sys.argv[1:]))
""" % (HEAVY,)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _health(url: str, timeout: float) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter() - t0
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"no answer from {url} within {timeout} s")


def _phases(t: dict, spawned: float, ended: float) -> dict:
    """Seconds per phase from the timestamps (absent phases left out)."""
    out = {"start-up": t["checks.start"] - spawned}
    out["checks"] = t["checks.end"] - t["checks.start"]  # the CLI's config and preflight checks
    if "plan.start" in t:
        out["plan"] = t["plan.end"] - t["plan.start"]
        out["end"] = ended - t["plan.end"]
        return out
    out["import flow"] = t["connect.start"] - t["checks.end"]
    out["wait for server"] = t["connect.end"] - t["connect.start"]  # before issue 32: import it, start it, wait
    out["flow run"] = t["stop.start"] - t["connect.end"]
    out["stop"] = t["stop.end"] - t["stop.start"]  # flush Prefect's log and event workers, stop the server
    out["end"] = ended - t["stop.end"]  # the summary table, exit hooks, the interpreter's exit
    return out


class Bench:
    def __init__(self, out: Path, store: Path, code: Path = ROOT):
        self.out, self.store, self.code = out, store, code
        self.env = {**os.environ, "PREFECT_HOME": str(out / "prefect-home"), "HF_HUB_OFFLINE": "1",
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(code)}
        self.env.pop("PREFECT_API_URL", None)
        self.results: dict[str, list[dict]] = {}

    def command(self, label: str, args: list[str], env: dict | None = None) -> dict:
        phases = self.out / "phases.json"
        load = os.getloadavg()[0]
        spawned = time.time()
        proc = subprocess.run([sys.executable, "-c", _DRIVER, *args], cwd=self.code, capture_output=True, text=True,
                              env={**self.env, **(env or {}), "SFT_BENCH_PHASES": str(phases)})
        ended = time.time()
        if proc.returncode != 0:
            raise SystemExit(f"{label}: {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        if args[0] == "run" and proc.stderr.count("Cached(") < 7:
            raise SystemExit(f"{label}: not every stage was Cached:\n{proc.stderr[-3000:]}")
        t = json.loads(phases.read_text())
        rec = {"seconds": round(ended - spawned, 3), "load": round(load, 2), "heavy_imports": t["heavy"],
               "phases": {k: round(v, 3) for k, v in _phases(t, spawned, ended).items()}}
        self.results.setdefault(label, []).append(rec)
        print(f"{label:<14}{rec['seconds']:>7.2f} s  load {load:5.2f}  " +
              "  ".join(f"{k} {v:.2f}" for k, v in rec["phases"].items()), flush=True)
        return rec

    def floor(self, label: str, code: list[str]) -> None:
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        subprocess.run(code, cwd=ROOT, env=self.env, check=True, capture_output=True)
        rec = {"seconds": round(time.perf_counter() - t0, 3), "load": round(load, 2)}
        self.results.setdefault(label, []).append(rec)
        print(f"{label:<14}{rec['seconds']:>7.2f} s  load {load:5.2f}", flush=True)

    def server_alone(self) -> None:
        sys.path.insert(0, str(ROOT))
        from sft_pipeline.prefect_server import TemporaryServer

        os.environ.update({k: v for k, v in self.env.items() if k.startswith("PREFECT_")})
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        server = TemporaryServer()
        server.wait(300)
        up = time.perf_counter() - t0
        server.stop()
        rec = {"seconds": round(up, 3), "load": round(load, 2),
               "stop": round(time.perf_counter() - t0 - up, 3)}
        self.results.setdefault("server alone", []).append(rec)
        print(f"{'server alone':<14}{up:>7.2f} s  load {load:5.2f}  (stop {rec['stop']:.2f} s)", flush=True)


def _long_lived_server(env: dict, out: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    log = open(out / "prefect-server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start"], cwd=out, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env={**env, "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port)})
    url = f"http://127.0.0.1:{port}/api"
    print(f"long-lived server: up after {_health(url, 300):.1f} s at {url}", flush=True)
    return proc, url


def _busy(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.small_commands", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="where the store, Prefect's home and the JSON go "
                                                           "(default: a new temp dir)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--store", type=Path, default=None, help="a store that holds a finished tiny run")
    p.add_argument("--busy", type=int, default=0, help="CPU-bound processes running beside the bench")
    p.add_argument("--code", type=Path, default=ROOT, help="run the CLI of this checkout (e.g. one from before "
                                                            "issue 32, for a comparison on the same machine)")
    a = p.parse_args(argv)
    out = (a.out or Path(tempfile.mkdtemp(prefix="small-commands-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    store = (a.store or out / "store").resolve()
    bench = Bench(out, store, a.code.resolve())
    # a run that makes every stage of this code's keys (minutes the first time: it trains), and warms the OS's file
    # cache and the .pyc files
    print(f"a tiny run into {store} (minutes unless every stage is there) ...", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "sft_pipeline.cli", "run", "--store", str(store)], cwd=a.code,
                          env=bench.env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the first run failed:\n{proc.stderr[-3000:]}")
    print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)
    busy = _busy(a.busy)
    server = None
    try:
        server, url = _long_lived_server(bench.env, out)
        for _ in range(a.runs):
            bench.floor("python", [sys.executable, "-c", "pass"])
            bench.floor("import prefect", [sys.executable, "-c", "import prefect"])
            bench.server_alone()
            bench.command("plan", ["plan", "--store", str(store)])
            bench.command("rerun", ["run", "--store", str(store)])
            bench.command("rerun@server", ["run", "--store", str(store)], env={"PREFECT_API_URL": url})
    finally:
        for proc in busy:
            proc.kill()
        if server is not None:
            os.killpg(server.pid, 15)
            server.wait(30)
    summary = {}
    print(f"\n{'what':<14}{'median s':>9}{'min':>7}{'max':>7}{'load':>12}  phases (median s)   [{a.runs} runs, "
          f"busy {a.busy}, {os.cpu_count()} cores]")
    for label, recs in bench.results.items():
        secs = [r["seconds"] for r in recs]
        loads = [r["load"] for r in recs]
        phases = {k: round(statistics.median(r["phases"][k] for r in recs), 2) for k in recs[0].get("phases", {})}
        heavy = sorted({m for r in recs for m in r.get("heavy_imports", [])})
        summary[label] = {"median": round(statistics.median(secs), 2), "min": min(secs), "max": max(secs),
                          "load": [min(loads), max(loads)], "phases": phases, "heavy_imports": heavy, "runs": recs}
        s = summary[label]
        print(f"{label:<14}{s['median']:>9.2f}{s['min']:>7.2f}{s['max']:>7.2f}{min(loads):>6.1f}-{max(loads):<5.1f}  "
              + "  ".join(f"{k} {v}" for k, v in phases.items())
              + (f"  imports {','.join(heavy)}" if heavy else "" if "phases" not in recs[0] else "  no torch"))
    (out / "small_commands.json").write_text(json.dumps({"busy": a.busy, "cores": os.cpu_count(), "runs": a.runs,
                                                         "code": str(a.code), "results": summary}, indent=1))
    print(f"\n{out / 'small_commands.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
