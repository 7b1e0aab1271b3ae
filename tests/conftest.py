"""Shared test fixtures: one Prefect home, one tiny-recipe run, offline everywhere.

Environment is set before anything imports prefect (its settings are read at import time). Everything the session
makes lives under one ``sft-tests-*`` directory (the tiny run's store, PREFECT_HOME: ~500 MB), removed when the
session ends, also when tests failed or were interrupted; ``SFT_TESTS_KEEP=1`` keeps it for a look.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# pytest imports this file as `conftest`, and test modules import it again as `tests.conftest`: one directory for
# both; a process the session starts that imports it too (a served flow, a worker) finds it in the environment
_SESSION = next((m._SESSION for m in (sys.modules.get("conftest"), sys.modules.get("tests.conftest"))
                 if getattr(m, "_SESSION", None)), None) or (
    Path(os.environ["SFT_TESTS_SESSION"]) if os.environ.get("SFT_TESTS_SESSION") else
    Path(tempfile.mkdtemp(prefix="sft-tests-")))
(_SESSION / "tmp").mkdir(exist_ok=True)
os.environ.setdefault("SFT_TESTS_SESSION_OWNER", str(os.getpid()))  # the pytest process that made it removes it
# under `pytest -n 2` (xdist) each worker has its own Prefect home and tiny run: two runs on one SQLite database, or
# two workers' runs on one store, would race where the tests count servers, summaries or promotions
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
_OWN = f"-{WORKER}" if WORKER else ""
os.environ.update({
    "SFT_TESTS_SESSION": str(_SESSION),
    # what the session's processes put in the temporary folder (W&B's offline media and artifact folders, which
    # it leaves behind) goes with the session's directory
    "TMPDIR": str(_SESSION / "tmp"),
    "PREFECT_HOME": str(_SESSION / f"prefect-home{_OWN}"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",  # 20 s is too short on 2 busy cores
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_MODE": "offline",
})
os.environ.pop("HF_TOKEN", None)
os.environ.pop("WANDB_API_KEY", None)
os.environ.pop("PREFECT_API_URL", None)

from flows.stages import STAGES as _TABLE  # noqa: E402 - after the environment above; imports no prefect

STAGES = [s.name for s in _TABLE]  # the stage names in flow order, from the one table


# `-m "not slow"` (the fast tier) leaves out every test that needs one of these (directly or through another
# fixture): the shared tiny or SmolLM2 run, a Prefect or S3 server of its own (a minute or more each here)
_SLOW_FIXTURES = {"tiny_run", "smollm2_run", "prefect", "s3"}
# Under xdist (README's `-n 2 --dist loadfile --no-loadscope-reorder`) a module stays on one worker, so that its
# module fixtures are built once, and modules are handed out in this order: the longest first (seconds in CI,
# 2026-12-07), test_smollm2 last (it reuses the SmolLM2 run that test_dpo's worker made by then); the rest keep their
# file order between.
_FIRST = ["test_dpo", "test_deployments", "test_object_store", "test_resume", "test_multiprocess", "test_benchmark",
          "test_training", "test_bad_inputs"]
_LAST = ["test_smollm2"]


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    if not WORKER:
        return
    rank = {m: i for i, m in enumerate(_FIRST)} | {m: len(_FIRST) + 1 + i for i, m in enumerate(_LAST)}

    def module(item):
        return Path(str(item.fspath)).stem
    items.sort(key=lambda item: rank.get(module(item), len(_FIRST)))  # stable: file order within and between


def _once(name: str, compute) -> tuple[subprocess.CompletedProcess, dict]:
    """``compute()`` -> (process, summary) done once per session, also across xdist workers: the first caller runs it
    under a lock and keeps its outcome in the session directory; a later caller (another worker) waits, then reads."""
    from sft_pipeline.store import file_lock

    kept = _SESSION / f"{name}.json"
    with file_lock(_SESSION / f"{name}.lock"):
        if not kept.exists():
            proc, summary = compute()
            kept.write_text(json.dumps({"args": proc.args, "returncode": proc.returncode, "stdout": proc.stdout,
                                        "stderr": proc.stderr, "summary": summary}))
    data = json.loads(kept.read_text())
    proc = subprocess.CompletedProcess(data["args"], data["returncode"], data["stdout"], data["stderr"])
    return proc, data["summary"]


@pytest.hookimpl(trylast=True)  # after the session fixtures' teardown (a Prefect harness using PREFECT_HOME)
def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("SFT_TESTS_KEEP"):
        print(f"\nkept the test session's directory: {_SESSION}")
        return
    if os.environ.get("SFT_TESTS_SESSION_OWNER") == str(os.getpid()):
        shutil.rmtree(_SESSION, ignore_errors=True)


class LogLines(logging.Handler):
    """The messages a logger got, in order."""

    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def capture_log(name: str) -> tuple[logging.Logger, LogLines]:
    """A logger at INFO whose messages land in the returned handler's ``lines``."""
    logger, handler = logging.getLogger(name), LogLines()
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return logger, handler


def cli(*args: str, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run `sft-pipeline ...` in a fresh process, as a user would."""
    return subprocess.run([sys.executable, "-m", "sft_pipeline.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def run_flow(store: Path, *overrides: str, recipe: str = "tiny", env: dict | None = None,
             timeout: float = 900) -> tuple[subprocess.CompletedProcess, dict]:
    summary = store / f"summary-{len(list(store.glob('summary-*.json'))) if store.exists() else 0}.json"
    args = ["run", "--recipe", recipe, "--store", str(store), "--summary-json", str(summary)]
    for o in overrides:
        args += ["--set", o]
    proc = cli(*args, env=env, timeout=timeout)
    data = json.loads(summary.read_text()) if summary.exists() else {}
    return proc, data


def prefect_servers(home: str | Path) -> list[int]:
    """Pids of the Prefect servers running on the Prefect home ``home`` (a run's temporary one included)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
            if b"prefect.server.api.server:create_app" in cmdline or b"prefect\x00server\x00start" in cmdline:
                if f"PREFECT_HOME={home}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                    found.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return found


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The CLI's one-line error message (Prefect's own log lines around it are not part of it)."""
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="session")
def session_dir() -> Path:
    return _SESSION


@pytest.fixture(scope="session")
def tiny_run(session_dir):
    """The tiny recipe run once, end to end, through the CLI. Returns (store, summary, process)."""
    store = session_dir / f"store{_OWN}"
    proc, summary = run_flow(store)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return store, summary, proc


@pytest.fixture(scope="session")
def smollm2_run(session_dir):
    """The smollm2-135m recipe run once into ``<session>/smollm2-store`` (tests/test_smollm2.py; tests/test_dpo.py
    runs the DPO recipe on top of it). Returns (store, summary, process)."""
    store = session_dir / "smollm2-store"
    # 13.5 min measured at load 6-8, 32 min at load 8-17 (2026-12-02): more than run_flow's default 15
    proc, summary = _once("smollm2-run", lambda: run_flow(store, recipe="smollm2-135m", timeout=3600))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return store, summary, proc


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")


def tiny_lora_model(targets=LORA_TARGETS, dropout: float = 0.0, alpha: int = 16, vocab: int = 97, **config):
    """The LoRA tests' model: a 2-layer Mistral (hidden 32) with random weights (seed 0) and LoRA r4 whose B is not
    zero, so the adapters change the output; SDPA attention, on CPU."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    base = MistralForCausalLM(MistralConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa",
                                            **config))
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights=False,
                                           target_modules=list(targets), task_type="CAUSAL_LM"))


def tiny_trainer_inputs(tiny_run, rows: int):
    """What build_trainer takes from the shared tiny run (its first ``rows`` train rows, the tokenizer, the model
    directory), for tests that build the train stage's trainer themselves."""
    import datasets
    from transformers import AutoTokenizer

    store, summary, _ = tiny_run
    chats = summary["stages"]["format"]["artifact"]
    ds = datasets.Dataset.from_parquet(f"{chats}/train_sft.parquet").select(range(rows))
    tok = AutoTokenizer.from_pretrained(f"{chats}/tokenizer")
    model_dir = next(p for p in (store / "models").iterdir() if (p / "config.json").is_file())
    return ds, tok, model_dir


@pytest.fixture
def home(tmp_path) -> Path:
    """A user's home-like directory: a project under .tmp (with a dash), a file, a dash-less dir."""
    h = tmp_path / "home"
    (h / ".tmp" / "my-project").mkdir(parents=True)
    (h / ".tmp" / "my-project" / "thesis.tex").write_text("years of work")
    (h / ".tmp" / "nodash").mkdir()
    (h / "notes.txt").write_text("keep me")
    return h
