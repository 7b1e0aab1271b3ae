"""A newcomer's first hour: a quiet terminal, adapters that load after the store moved, no litter under /tmp."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT, STAGES, cli, prefect_servers
from sft_pipeline import base_origin
from sft_pipeline.errors import HubUnreachable
from sft_pipeline.quiet import QuietConsole, retry_line

PREFECT_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} \| (?P<level>[A-Z]+) *\| Task run '(?P<task>[a-z_]+)(-\w+)?' - "
                          r"(?P<msg>.*)$")  # a task run is named after its stage
# what a quiet run may say about a stage, besides "Finished in state ..."
STAGE_START = re.compile(r"^(?P<stage>[a-z_]+): (computing [0-9a-f]{24}|reusing the finished artifact \S+)$")
TRAINING = re.compile(r"^(train: (step \d+/\d+ \(\d+%\)  loss .* tok/s  ETA \d+:\d\d:\d\d|\d+ optimizer steps.*|"
                      r"saved checkpoint-\d+ \(\S+\))"
                      r"|training settings: micro-batch \d+ x accumulation \d+ = effective batch \d+ [^{}]*"
                      r"|estimate: .*)$")
# transformers prints "[INFO] Running in WANDB offline mode" when imported with WANDB_MODE=offline (as in the tests)
SUMMARY = re.compile(r"^(|stage +state +seconds +artifact|[a-z_]+ +(Completed|Cached) +[\d.]+  \S+|"
                     r"eval loss: base .*|held-out answers correct: .*|adapter: \S+|promoted: .*|"
                     r"\[INFO\] Running in WANDB offline mode)$")


def _stage_lines(stderr: str) -> dict[str, list[tuple[str, str]]]:
    """stderr of a quiet run -> per stage its (level, message) lines; any other line fails the test."""
    per_stage: dict[str, list[tuple[str, str]]] = {}
    for line in stderr.splitlines():
        m = PREFECT_LINE.match(line)
        assert m, f"a line that a quiet run does not promise: {line!r}\n{stderr[-3000:]}"
        per_stage.setdefault(m["task"], []).append((m["level"], m["msg"]))
    return per_stage


def test_a_run_prints_only_the_promised_lines(tiny_run):
    """Quiet by default: per stage a start and an end line, training progress, no warnings (the tiny run has nothing
    to act on), then the summary table; no progress bars, library warnings, metrics dicts or Prefect chatter."""
    _, summary, proc = tiny_run
    per_stage = _stage_lines(proc.stderr)
    assert list(per_stage) == STAGES, list(per_stage)
    for stage, lines in per_stage.items():
        levels = {level for level, _ in lines}
        assert levels == {"INFO"}, (stage, lines)
        first, last = lines[0][1], lines[-1][1]
        assert STAGE_START.match(first) and STAGE_START.match(first)["stage"] == stage, (stage, lines)
        assert last == "Finished in state Completed()", (stage, lines)
        middle = [msg for _, msg in lines[1:-1]]
        if stage == "train":
            assert all(TRAINING.match(msg) for msg in middle), middle
            steps = [msg for msg in middle if msg.startswith("train: step ")]
            cfg = summary["config"]["training"]
            assert len(steps) == cfg["max_steps"] // cfg["logging_steps"], middle  # one per logging step
        else:
            assert middle == [], (stage, middle)
    for line in proc.stdout.splitlines():
        assert SUMMARY.match(line), f"stdout line that is not the summary: {line!r}"
    assert "Cached" not in proc.stdout and "train " in proc.stdout


@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
def test_a_cached_run_quiet_and_verbose(tiny_run, verbose):
    """~25 s each here (the temporary Prefect server). Quiet: each stage says it reuses its artifact, then Cached.
    --verbose brings back Prefect's own lines (the temporary server, the flow run's start and end)."""
    store, _, _ = tiny_run
    before = set(prefect_servers(os.environ["PREFECT_HOME"]))  # another test module's long-lived server may be up
    proc = cli("run", "--store", str(store), *(["--verbose"] if verbose else []))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(prefect_servers(os.environ["PREFECT_HOME"])) <= before  # the temporary server went with the CLI
    if verbose:
        assert "Starting temporary server" in proc.stderr and "Beginning flow run" in proc.stderr, proc.stderr
        return
    per_stage = _stage_lines(proc.stderr)
    assert list(per_stage) == STAGES
    for stage, lines in per_stage.items():
        assert re.fullmatch(r"Finished in state Cached\((type=COMPLETED)?\)", lines[-1][1]), lines
        assert len(lines) == 2 and lines[0][1].startswith(f"{stage}: reusing the finished artifact "), lines


def _record(name: str, level: int, msg: str, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, None) if exc else None
    return logging.LogRecord(name, level, __file__, 1, msg, (), exc_info)


def test_the_terminal_filter():
    """What the console keeps: the stage's lines, warnings, a bug's traceback; drops Prefect's own INFO lines, its
    long retry lines for a transient failure (ours say it), and the flow's copy of the CLI's error line."""
    keep = QuietConsole(cli_prints_errors=True).filter
    unreachable = HubUnreachable("model 'm': the Hugging Face Hub at http://h is unreachable (ConnectError: x)")
    assert keep(_record("prefect.task_runs", logging.INFO, "train: step 10/50"))
    assert keep(_record("prefect.task_runs", logging.INFO, "Finished in state Completed()"))
    assert not keep(_record("prefect.task_runs", logging.INFO, "Task run failed with exception: X - Retry 1/2 will "
                                                               "start 10 second(s) from now"))
    assert not keep(_record("prefect.task_runs", logging.ERROR, "Task run failed with exception: X - Retries are "
                                                                "exhausted", unreachable))
    assert keep(_record("prefect.task_runs", logging.ERROR, "Task run failed with exception: ZeroDivisionError()",
                        ZeroDivisionError()))  # a bug keeps its line and traceback
    assert not keep(_record("prefect", logging.INFO, "Starting temporary server on http://127.0.0.1:8000"))
    assert not keep(_record("prefect.flow_runs", logging.INFO, "Beginning flow run 'x' for flow 'sft-pipeline'"))
    assert keep(_record("prefect.flow_runs", logging.INFO, "View at http://127.0.0.1:4200/runs/flow-run/1"))
    assert not keep(_record("prefect.flow_runs", logging.ERROR, "stage 'data' failed: ..."))
    assert QuietConsole(cli_prints_errors=False).filter(_record("prefect.flow_runs", logging.ERROR, "stage 'd' ..."))
    assert keep(_record("prefect.flow_runs", logging.WARNING, "something to act on"))
    assert retry_line("authenticate", unreachable, 1, 2, 10) == \
        "authenticate: model 'm': the Hugging Face Hub at http://h is unreachable. Retry 1/2 in 10 s"
    assert retry_line("train", RuntimeError("CUDA out of memory. Tried"), 2, 2, 0) == \
        "train: out of memory. Retry 2/2 now"


# ------------------------------------------------------------------------------------------- portable adapters
def _card_snippet(adapter: Path) -> str:
    card = (adapter / "README.md").read_text()
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    assert 'Path("<this directory>")' in code
    return code.replace("<this directory>", str(adapter))


def _run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the snippet needs only the libraries
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def test_flash_attention_4_compiler_notes_are_hidden_unless_verbose(monkeypatch):
    """flash-attention 4's CUTLASS DSL warns at each kernel's first call with advice for its own authors: quiet
    hides it in this process and (through PYTHONWARNINGS) in child processes such as torchrun's ranks; other
    UserWarnings stay; verbose keeps it."""
    import warnings

    from sft_pipeline.quiet import QUIET_ENV, quiet

    note = ("Argument aux_data (position 17) cannot be converted to a JitArgument for function 'cutlass___call___"
            "flash_attncuteflash_fwd_sm90'. Its type `<class 'flash_attn.cute.utils.AuxData'>` is not supported.")
    for name in QUIET_ENV:  # quiet sets what the user has not: restored after the test
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)
    for verbose in (False, True):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            quiet(verbose)
            warnings.warn(note, UserWarning)
            warnings.warn("a warning of the project's own", UserWarning)
        messages = [str(w.message) for w in seen]
        assert "a warning of the project's own" in messages
        assert (note in messages) == verbose
    child = subprocess.run([sys.executable, "-c", f"import warnings; warnings.warn({note!r}, UserWarning); "
                            "warnings.warn('a warning of the project', UserWarning)"], capture_output=True, text=True,
                           env={**os.environ, "PYTHONWARNINGS": QUIET_ENV["PYTHONWARNINGS"]})
    assert "a warning of the project" in child.stderr and "aux_data" not in child.stderr


LIGER_SCRIPT = """
import logging, sys
from sft_pipeline.quiet import quiet, quiet_prefect
verbose = sys.argv[1] == "verbose"
quiet(verbose)
from prefect.logging.configuration import ensure_logging_setup
from prefect.logging.loggers import PrefectLogAdapter
from sft_pipeline.launch import _emit
ensure_logging_setup()  # as importing the flow does
quiet_prefect(verbose)
note = "Backend impl '%s' for op '%s' could not be imported: %s: %s"
registry = logging.getLogger("liger_kernel.backends.registry")  # where Liger 0.8.5 logs it
cutedsl = ("liger_kernel.ops.backends._cutedsl.rope", "rope", "ModuleNotFoundError", "No module named 'cutlass'")
registry.warning(note, *cutedsl)
registry.warning(note, "liger_kernel.ops.backends._triton.rope", "rope", "ModuleNotFoundError", "No module 'triton'")
registry.warning(note, "liger_kernel.ops.backends._cutedsl.rms_norm", "rms_norm", "RuntimeError", "a broken install")
# a torchrun rank's lines, as the launcher passes them on to the stage's logger (Prefect's task run logger)
stage = PrefectLogAdapter(logging.getLogger("prefect.task_runs"), extra={"task_run_name": "train-1a2"})
_emit(stage, "[rank 1] WARNING liger_kernel.backends.registry: " + note % cutedsl)
_emit(stage, "[rank 1] WARNING sft_pipeline.train: a warning of the project's own")
"""


def test_ligers_cute_dsl_note_is_hidden_unless_verbose():
    """~10 s here. On a GPU without NVIDIA's CUTLASS DSL, Liger 0.8.5 warns that its CuTe DSL kernels cannot be
    imported (liger_kernel/backends/registry.py); the train stage keeps Liger on Triton, so nothing is missing. The
    same records through the real Prefect console handler: hidden when quiet, logged in this process or passed on
    from a rank; another backend's failure, another error and the project's own warnings stay; --verbose shows all."""
    for verbose in (False, True):
        child = subprocess.run([sys.executable, "-c", LIGER_SCRIPT, "verbose" if verbose else "quiet"], cwd=ROOT,
                               capture_output=True, text=True, timeout=300,
                               env={**os.environ, "PREFECT_LOGGING_TO_API_ENABLED": "false"})
        assert child.returncode == 0, child.stderr[-3000:]
        err = child.stderr
        assert "Traceback" not in err, err
        assert "_triton.rope" in err and "RuntimeError: a broken install" in err, err
        assert "a warning of the project's own" in err, err
        assert (err.count("_cutedsl.rope") == 2) == verbose, err  # once logged here, once from a rank
        assert verbose or "_cutedsl.rope" not in err, err


def test_adapter_loads_from_another_directory_after_the_store_moved(tiny_run, tmp_path):
    """~20 s here. The model card's snippet, run from an unrelated directory on a copy of the store, while the
    original store's base model is out of the way: it loads the base the copy holds and generates."""
    store, summary, _ = tiny_run
    adapter = Path(summary["adapter"])
    origin = json.loads((adapter / "base_model.json").read_text())
    assert origin["source"] == "build" and origin["random_weights"] and not os.path.isabs(origin["path"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"].startswith(str(store))  # PEFT's own record: the old absolute path

    moved = tmp_path / "elsewhere" / "store"
    for part in ("models", "save_adapter"):
        shutil.copytree(store / part, moved / part)
    moved_adapter = moved / adapter.relative_to(store)
    assert Path(base_origin.where(moved_adapter)[0]).is_relative_to(moved)
    hidden = store / "models.hidden"
    (store / "models").rename(hidden)  # the snippet must not find the base at its old path
    try:
        workdir = tmp_path / "somewhere"
        workdir.mkdir()
        proc = _run_python(_card_snippet(moved_adapter), cwd=workdir)
    finally:
        hidden.rename(store / "models")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip(), "generated nothing"


def test_a_built_base_is_rebuilt_when_the_adapter_travels_alone(tiny_run, tmp_path):
    """~15 s here. Only the adapter directory is copied: the base is built again (same seed) into another store,
    its weights match the recorded sha256, and the adapter loads on it."""
    _, summary, _ = tiny_run
    adapter = shutil.copytree(summary["adapter"], tmp_path / "adapter")
    assert not Path(base_origin.where(adapter)[0]).exists()
    proc = subprocess.run([sys.executable, "-m", "sft_pipeline.base_origin", str(adapter), str(tmp_path / "store")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rebuilt = proc.stdout.strip()
    assert Path(rebuilt).is_relative_to(tmp_path / "store") and (Path(rebuilt) / "config.json").is_file()
    code = _card_snippet(adapter).replace('adapter / base["path"]', repr(rebuilt))
    proc = _run_python(code, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr[-3000:]


# ------------------------------------------------------------------------------------------- no litter
def test_probe_session_dir_is_removed(session_dir):
    """Run only by the test below, in a pytest of its own: writes into the session directory, then fails."""
    probe = os.environ.get("SFT_TESTS_PROBE")
    if not probe:
        pytest.skip("run by test_the_suite_leaves_nothing_in_tmp")
    (session_dir / "store").mkdir(parents=True, exist_ok=True)
    (session_dir / "store" / "weights.bin").write_bytes(b"\0" * 1024)
    # a process of the session that imports the test helpers (as a served flow does) and writes a temporary file
    # (as W&B does) uses the session's directory, not one of its own
    code = "import tempfile, tests.conftest as c; print(c._SESSION); print(tempfile.mkdtemp(prefix='wandb-media-'))"
    child = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr[-2000:]
    child_session, child_tmp = child.stdout.split()
    Path(probe).write_text(json.dumps({"session": str(session_dir), "child_session": child_session,
                                       "child_tmp": child_tmp}))
    assert False, "fails on purpose: the session directory goes also when tests fail"


def test_the_suite_leaves_nothing_in_tmp(tmp_path):
    """~10 s here. A pytest session whose one test writes into the session directory and fails leaves no
    sft-tests-* directory in TMPDIR."""
    tmpdir, probe = tmp_path / "tmp", tmp_path / "probe.txt"
    tmpdir.mkdir()
    fresh = {k: v for k, v in os.environ.items()  # a session of its own, not an xdist worker's
             if not k.startswith(("SFT_TESTS_", "PYTEST_XDIST_"))}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_newcomer.py::test_probe_session_dir_is_removed"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**fresh, "TMPDIR": str(tmpdir), "SFT_TESTS_PROBE": str(probe)})
    assert proc.returncode == 1 and "1 failed" in proc.stdout, proc.stdout[-3000:]
    seen = json.loads(probe.read_text())
    session = Path(seen["session"])
    assert session.parent == tmpdir and session.name.startswith("sft-tests-")
    assert seen["child_session"] == seen["session"] and Path(seen["child_tmp"]).is_relative_to(session)
    assert not session.exists() and not list(tmpdir.iterdir())


def test_a_non_editable_install_has_every_package(tmp_path):
    """`pip install .` (a Docker image, a GPU box) gets every package of the source tree, sft_pipeline.training and
    the recipes included: the wheel built from pyproject.toml, imported from outside the checkout. ~15 s."""
    src, wheel_dir = tmp_path / "src", tmp_path / "wheel"  # a copy: setuptools would reuse the checkout's build/
    for top in ("flows", "tasks", "sft_pipeline"):
        shutil.copytree(ROOT / top, src / top, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]  # else from the index
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, str(src),
                           "-w", str(wheel_dir)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = wheel_dir.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {str(p.parent.relative_to(ROOT)) for top in ("flows", "tasks", "sft_pipeline")
                for p in (ROOT / top).rglob("__init__.py")}
    assert packages and {f"{p}/__init__.py" for p in packages} <= names, sorted(packages - {
        n.rsplit("/", 1)[0] for n in names})
    assert {f"sft_pipeline/recipes/{p.name}" for p in (ROOT / "sft_pipeline" / "recipes").glob("*.yaml")} <= names
    # the installed tree alone (not the checkout) imports the training stage and its package
    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)
    code = "import tasks.train, sft_pipeline.training, sft_pipeline.config as c; print(tasks.train.__file__)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(unpacked)})
    assert proc.returncode == 0 and proc.stdout.startswith(str(unpacked)), proc.stdout + proc.stderr[-3000:]


def test_the_flows_import_without_the_ml_libraries():
    """A cached rerun and a cancel's hooks import the flows; torch, transformers and peft would cost them seconds
    (5 s of a cached rerun of tiny here, issue 32): only the stages that compute import them."""
    code = ("import sys, flows.sft, flows.dpo, sft_pipeline.cli; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'trl', 'datasets') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr[-3000:]
