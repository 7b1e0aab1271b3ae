"""Bad input never hurts: each bad input gives one clear message and its exit code, and leaves the store as it was
(config errors: byte for byte) or still valid (failures while running: earlier artifacts intact, no partial one).

The config table runs the CLI's ``main`` in-process (no flow starts for any of them); the runtime failures run the
CLI in a subprocess with the flow, a few runs each sharing one store.
"""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from sft_pipeline import synthetic
from sft_pipeline.errors import StageFailure, is_transient
from sft_pipeline.cli import main
from sft_pipeline.errors import HubUnreachable, explain_hub_error
from sft_pipeline.store import STORE_MARKER, Store
from tests.conftest import ROOT, error_line, run_flow


# ------------------------------------------------------------------------------------------------- helpers
def snapshot(root: Path) -> dict[str, str]:
    """Every path under root with the hash of its bytes (directories as 'dir')."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def assert_intact(store: Path, stages: list[str]) -> None:
    """The named stages' artifacts verify; nothing half-written is left where a later run would look."""
    st = Store(store)
    for stage in stages:
        keys = [d.name for d in (store / stage).iterdir()]
        assert keys and all(st.check(stage, k)[0] for k in keys), (stage, [st.check(stage, k) for k in keys])
    assert not any((store / ".tmp").glob("*")) if (store / ".tmp").exists() else True


def no_artifact(store: Path, stage: str) -> bool:
    return not (store / stage).exists() or not any((store / stage).iterdir())


def last_line_is_the_error(proc) -> str:
    line = error_line(proc)
    assert proc.stderr.strip().splitlines()[-1] == line, proc.stderr[-2000:]
    return line


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def store(tmp_path) -> Path:
    """A store that already holds a finished artifact and a run summary."""
    root = tmp_path / "store"
    Store(root).claim()
    with Store(root).write("data", "k" * 24, metrics={"rows": 1}) as tmp:
        (tmp / "train_sft.parquet").write_bytes(b"finished work")
    (root / "runs").mkdir()
    (root / "runs" / "earlier.json").write_text("{}")
    return root


# ---------------------------------------------------- one table of bad input: exit 2, one line, before any stage
def _recipe(text: str):
    def make(tmp: Path, home: Path, store: Path) -> list[str]:
        (tmp / "mine.yaml").write_text(text)
        return ["--recipe", str(tmp / "mine.yaml")]
    return make


def _local_data(files: dict[str, int], *extra: str):
    """A directory of jsonl files (name -> valid rows) used as data.source=local."""
    def make(tmp: Path, home: Path, store: Path) -> list[str]:
        for name, n in files.items():
            write_jsonl(tmp / "chats" / name, synthetic.conversations(n, seed=1))
        args = ["--set", "data.source=local", "--set", f"data.dataset={tmp / 'chats'}"]
        for e in extra:
            args += ["--set", e]
        return args
    return make


def _set(*items: str):
    return lambda tmp, home, store: [a for i in items for a in ("--set", i)]


def _no_cuda(tmp, home, store):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    return ["--set", "training.device=cuda"]


CONFIG_CASES = [
    # unknown keys, with "did you mean"
    ("unknown key", _set("lora.alpah=8"), ["unknown key 'lora.alpah'", "did you mean 'lora.alpha'", "allowed: r,"]),
    ("unknown section", _set("lroa.r=4"), ["unknown key 'lroa'", "did you mean 'lora'"]),
    ("unknown key in a recipe file", _recipe("model: {source: build, name: tiny-mistral}\n"
                                              "training: {learning_rat: 1.0e-4}\n"),
     ["unknown key 'training.learning_rat'", "did you mean 'training.learning_rate'"]),
    ("a token as a config value", _set("auth.hf_token=hf_pasted_secret_value"),
     ["unknown key 'auth.hf_token'", "allowed: hf_token_env, hf_token_block"]),
    ("a token where a variable name goes", _set("auth.hf_token_env=hf_pasted_secret_value"),
     ["auth.hf_token_env: must be the name of an environment variable"]),
    # wrong types
    ("number expected", _set("training.learning_rate=fast"),
     ["training.learning_rate", "valid number", "'fast'"]),
    ("boolean expected", _set("training.gradient_checkpointing=maybe"),
     ["training.gradient_checkpointing", "valid boolean"]),
    ("list or all-linear expected", _set("lora.target_modules=5"),
     ["lora.target_modules", "valid list", "'all-linear'"]),
    ("section expected", _set("data.train_subset=5"), ["data.train_subset", "Subset"]),
    # out of range
    ("fraction above 1", _set("data.train_subset.fraction=1.5"),
     ["data.train_subset.fraction", "less than or equal to 1", "1.5"]),
    ("fraction of 0", _set("data.train_subset.fraction=0"), ["data.train_subset.fraction", "greater than 0"]),
    ("fraction and count", _set("data.train_subset.fraction=0.5", "data.train_subset.count=10"),
     ["data.train_subset", "not both"]),
    ("rank 0", _set("lora.r=0"), ["lora.r", "greater than or equal to 1"]),
    ("learning rate above 1", _set("training.learning_rate=3"), ["training.learning_rate", "less than or equal to 1"]),
    ("negative learning rate", _set("training.learning_rate=-1e-4"), ["training.learning_rate", "greater than 0"]),
    ("dropout of 1", _set("lora.dropout=1"), ["lora.dropout", "less than 1"]),
    ("invalid share above 1", _set("data.max_invalid_share=2"), ["data.max_invalid_share", "less than or equal to 1"]),
    ("unknown device", _set("training.device=tpu"), ["training.device", "'auto', 'cpu' or 'cuda'", "'tpu'"]),
    ("max_length below the schema", _set("format.max_length=8"),
     ["format.max_length", "greater than or equal to 16"]),
    ("max_length within the template overhead", _set("format.max_length=18"),
     ["format.max_length=18 is not longer than the chat template's own overhead", "allowed values are above"]),
    ("unknown build architecture", _set("model.name=gpt2"), ["model.name must be one of", "tiny-mistral"]),
    # recipes and overrides
    ("unknown recipe", lambda tmp, home, store: ["--recipe", "tinny"], ["unknown recipe 'tinny'", "did you mean 'tiny'"]),
    ("recipe file not found", lambda tmp, home, store: ["--recipe", str(tmp / "nope.yaml")], ["recipe file not found"]),
    ("malformed YAML recipe", _recipe("lora:\n  r: 4\n  alpha: [1, 2\ntraining: {}\n"),
     ["is not valid YAML", "line 4"]),
    ("recipe that is not a mapping", _recipe("- lora\n- training\n"), ["must be a mapping of sections"]),
    ("override without =", _set("lora.r"), ["override 'lora.r' must look like section.key=value"]),
    ("override value not YAML", _set("lora.target_modules=[q_proj"), ["value is not valid YAML"]),
    # the machine and the inputs the config names
    ("CUDA requested without CUDA", _no_cuda, ["training.device=cuda", "allowed here: auto, cpu"]),
    ("local model directory missing", lambda tmp, home, store: ["--set", "model.source=local", "--set", f"model.name={tmp}/none"],
     ["model.name: local model directory not found"]),
    ("local data path missing", lambda tmp, home, store: ["--set", "data.source=local", "--set", f"data.dataset={tmp}/none"],
     ["data.dataset: local path not found"]),
    ("local data without the test split", _local_data({"train_sft.jsonl": 8}),
     ["data.test_split: no file for split 'test_sft'", "found: train_sft"]),
    ("split name not in the local files", _local_data({"train_sft.jsonl": 8, "test_sft.jsonl": 4},
                                                      "data.test_split=validation"),
     ["data.test_split: no file for split 'validation'", "found: test_sft, train_sft"]),
    ("split name not in the synthetic set", _set("data.train_split=train"),
     ["data.train_split: split 'train' is not in the synthetic data set", "allowed: train_sft, test_sft"]),
    ("prompt with an unknown role", _set("generation.prompts=[[{role: bot, content: hi}]]"),
     ["generation.prompts[0]: unknown role 'bot'", "system, user, assistant"]),
    ("prompt ending with a reply", _set("generation.prompts=[[{role: user, content: hi}, "
                                        "{role: assistant, content: ho}]]"),
     ["generation.prompts[0]: a prompt must end with a user turn"]),
]


CANARY = "CANARYx9f3c2d1e0b7a6"  # stands for a secret or a line of someone's file: must never be printed
SHADOW = (f"root:$6$saltsalt${CANARY}hashhashhashhashhashhash:19700:0:99999:7:::\n"
          "daemon:*:19700:0:99999:7:::\n"
          f"alice:$y$j9T${CANARY}yescrypthashyescrypthash:19701:0:99999:7:::\n")


def _bomb(levels: int = 6, width: int = 10) -> str:
    """A one-line YAML alias bomb: ``width ** levels`` values from a few hundred bytes."""
    parts = [f"&l0 [{', '.join(['x'] * width)}]"]
    for i in range(1, levels):
        parts.append(f"&l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    return "[" + ", ".join(parts) + "]"


def _file_as_recipe(text: str | bytes):
    def make(tmp, home, store):
        p = tmp / "elsewhere" / "not-a-recipe"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        return ["--recipe", str(p)]
    return make


def _store_at(where):
    return lambda tmp, home, store: ["--store", str(where(tmp, home, store))]


def _file_store(tmp, home, store):
    (tmp / "a-file").write_text("not a directory")
    return tmp / "a-file"


def _summary_dir(tmp, home, store):
    (tmp / "out").mkdir(exist_ok=True)
    return ["--summary-json", str(tmp / "out")]


HOSTILE_CASES = [  # from a hostile or careless user (issue 11): data loss, secrets and files echoed, paths
    # 1. data loss: a directory that is not a store is refused before anything is written or removed
    ("home as the store", _store_at(lambda t, h, s: h), ["is not empty and is not an sft-pipeline store",
                                                         STORE_MARKER]),
    ("a file as the store", _store_at(_file_store), ["is not a directory"]),
    ("a store under a file", _store_at(lambda t, h, s: _file_store(t, h, s) / "sub"), ["is not a directory"]),
    # 2. what would promote a worse adapter, or evaluate on the training rows
    ("max_steps 0", _set("training.max_steps=0"), ["training.max_steps: must be -1", "or at least 1, not 0"]),
    ("test split = train split", _set("data.test_split=train_sft"),
     ["data.test_split must differ from data.train_split"]),
    ("a tiny test subset", _set("data.test_subset.count=3"), ["data.test_subset.count=3", "at least 8"]),
    ("a tiny train subset", _set("data.train_subset.count=2"), ["data.train_subset.count=2", "at least 8"]),
    ("a tiny synthetic test set", _set("data.synthetic_test_rows=4"), ["data.synthetic_test_rows",
                                                                       "greater than or equal to 8"]),
    ("evaluating fewer than 8 rows", _set("evaluation.max_samples=2"), ["evaluation.max_samples"]),
    ("a margin of 1", _set("evaluation.promotion_margin=1"), ["evaluation.promotion_margin", "less than 1"]),
    # 3. secrets pasted where names go; files that are not recipes
    ("a token as the HF block name", _set(f"auth.hf_token_block=hf_{CANARY}"),
     ["auth.hf_token_block: must be the name of a Prefect Secret block"]),
    ("a W&B key as the W&B block name", _set(f"auth.wandb_key_block={'0123456789abcdef' * 2}{CANARY[-8:]}"),
     ["auth.wandb_key_block: must be the name of a Prefect Secret block"]),  # 40 hex: a name by the pattern
    ("a block name with a slash", _set("auth.hf_token_block=../hf-token"), ["auth.hf_token_block: must be the name"]),
    ("a shadow-style file as the recipe", _file_as_recipe(SHADOW), ["is not a recipe: none of its top-level keys"]),
    ("shadow lines in a recipe", _file_as_recipe("training: {max_steps: 5}\n" + SHADOW),
     ["unknown keys that do not look like config keys (not shown)"]),
    ("a key-value file as the recipe", _file_as_recipe(f"password: {CANARY}\napi key: {CANARY}\n"), ["is not a recipe"]),
    ("a binary file as the recipe", _file_as_recipe(b"\x89PNG\r\n\x1a\n\xff\xfe" + CANARY.encode()), ["not UTF-8 text"]),
    ("a long value from a recipe file", _file_as_recipe(f"training: {{learning_rate: '{CANARY * 4}'}}\n"),
     ["training.learning_rate"]),
    ("a huge file as the recipe", _file_as_recipe("# " + "x" * (1 << 20) + "\n"), ["is not a recipe", "bytes"]),
    # 4. names that become path components
    ("recipe name as a path", _set("recipe=/tmp/elsewhere/evil"), ["recipe must be a plain name"]),
    ("recipe name climbing out", _set("recipe=../../evil"), ["recipe must be a plain name"]),
    ("recipe name with dots", _set("recipe=a..b"), ["recipe must be a plain name"]),
    ("split name as a path", _set("data.train_split=../../evil"), ["a split name must be a plain name"]),
    ("summary path is a directory", _summary_dir, ["--summary-json", "is a directory: give a file path"]),
    # 6. values that would fail later, every run; YAML that would blow up memory
    ("infinite epochs", _set("training.epochs=.inf"), ["training.epochs", "finite number"]),
    ("nan learning rate", _set("training.learning_rate=.nan"), ["training.learning_rate", "finite number"]),
    ("negative seed", _set("training.seed=-1"), ["training.seed", "greater than or equal to 0"]),
    ("seed above 2**32-1", _set("data.seed=4294967296"), ["data.seed", "less than or equal to 4294967295"]),
    ("huge generation seed", _set("generation.seed=1099511627776"), ["generation.seed"]),
    ("alias bomb in an override", _set(f"lora.target_modules={_bomb()}"),
     ["expands to more than 100,000 values (YAML aliases): refused"]),
    ("alias bomb in a recipe", _file_as_recipe(f"lora:\n  target_modules: {_bomb()}\n"),
     ["expands to more than 100,000 values (YAML aliases): refused"]),
]


CASES = CONFIG_CASES + HOSTILE_CASES


@pytest.mark.parametrize("make_args, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_and_touches_nothing(make_args, expected, tmp_path, home, store, capsys,
                                                             monkeypatch):
    """Every bad config value, recipe, path or name: exit code 2 before any stage, one line naming the field or the
    file, no secret or file content echoed, and nothing in the test's directory (the store, a "home" beside it)
    changed, byte for byte."""
    monkeypatch.delenv("SFT_PIPELINE_STORE", raising=False)
    args = make_args(tmp_path, home, store)
    if "--store" not in args:
        args = ["--store", str(store), *args]
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["run", *args])
    out, err = capsys.readouterr()
    assert exit_.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err  # one clear line
    for text in expected:
        assert text in lines[0], (text, lines[0])
    for secret in (CANARY, CANARY.lower(), "$6$", "hf_pasted_secret_value"):  # a value in the wrong place, unechoed
        assert secret not in out + err, secret
    assert snapshot(tmp_path) == before
    assert_intact(store, ["data"])
    assert not Path("/tmp/elsewhere/evil.json").exists()


def test_unknown_cli_option_exits_2(store, capsys):
    before = snapshot(store)
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--store", str(store), "--stroe", "x"])
    assert exit_.value.code == 2 and "unrecognized arguments: --stroe" in capsys.readouterr().err
    assert snapshot(store) == before


# ------------------------------------------------------------------ the hub: a rejected token, an unreachable hub
class FakeHub(http.server.ThreadingHTTPServer):
    """Answers every API call with one status, as the hub does (default: 401 for a rejected token)."""

    def __init__(self, status: int = 401, message: str = "Invalid credentials in Authorization header",
                 code: str | None = None):
        self.requests: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(handler):  # noqa: N805
                self.requests.append(handler.path)
                body = json.dumps({"error": message}).encode()
                handler.send_response(status)
                handler.send_header("Content-Type", "application/json")
                handler.send_header("X-Error-Message", message)
                if code:
                    handler.send_header("X-Error-Code", code)
                handler.send_header("Content-Length", str(len(body)))
                handler.end_headers()
                handler.wfile.write(body)

            def log_message(handler, *args):  # noqa: N805
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HUB_ANSWERS = [
    ("rejected token", dict(status=401), StageFailure, "rejected the HF token (HTTP 401: invalid or expired)"),
    ("gated, no access", dict(status=403, message="Access to model is restricted", code="GatedRepo"), StageFailure,
     "is gated and this HF token has no access to it (HTTP 403)"),
    ("no such repo", dict(status=404, message="Repository not found", code="RepoNotFound"), StageFailure,
     "was not found on the hub"),
    ("hub down", dict(status=503, message="Service Unavailable"), Exception, "503"),
    ("unreachable", None, HubUnreachable, "is unreachable"),
]


@pytest.mark.parametrize("answer, kind, text", [a[1:] for a in HUB_ANSWERS], ids=[a[0] for a in HUB_ANSWERS])
def test_hub_answers_are_classified(answer, kind, text, monkeypatch):
    """What the hub answers -> one clear message, and whether a retry may help (only 5xx and no connection)."""
    from huggingface_hub import HfApi, constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub = FakeHub(**answer) if answer else None
    endpoint = f"http://127.0.0.1:{hub.server_port if hub else _closed_port()}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    with pytest.raises(Exception) as raised:
        HfApi(endpoint=endpoint, token="hf_not_a_real_token").model_info("org/model", revision="main")
    err = explain_hub_error(raised.value, "model 'org/model'")
    assert isinstance(err, kind) and text in str(err), (type(err), str(err))
    assert is_transient(err) == (kind is not StageFailure)
    assert "hf_not_a_real_token" not in str(err)
    if hub:
        hub.shutdown()


# run the CLI with retry delays of 0 s, so that retries take no time in a test
FAST_RETRIES = ("import sys, flows.sft as f; f.RETRY_DELAYS = [0, 0, 0]; from sft_pipeline.cli import main; "
                "sys.exit(main(sys.argv[1:]))")


@pytest.mark.slow  # 31 s in CI here (2-core, 2026-12-07)
def test_rejected_token_and_unreachable_hub(tmp_path):
    hub = FakeHub()
    store = tmp_path / "store"
    online = {"HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_rejected_canary_token",
              "HF_ENDPOINT": f"http://127.0.0.1:{hub.server_port}"}
    proc, summary = run_flow(store, recipe="mistral-7b-qlora", env=online)
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = last_line_is_the_error(proc)
    assert "stage 'authenticate' failed" in line and "rejected the HF token (HTTP 401" in line, line
    assert [p for p in hub.requests if p.startswith("/api/models/")] == \
        ["/api/models/mistralai/Mistral-7B-v0.1/revision/main"]  # asked once: a rejected token is not retried
    assert "Retry 1/" not in proc.stderr
    assert "hf_rejected_canary_token" not in proc.stdout + proc.stderr
    assert summary["stages"]["authenticate"]["state"] == "Failed" and list(summary["stages"]) == ["authenticate"]
    assert no_artifact(store, "authenticate")
    assert_intact(store, [])

    hub.shutdown()
    unreachable = {**online, "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}",
                   "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}  # prefect is imported before main()
    args = ["run", "--recipe", "mistral-7b-qlora", "--store", str(store), "--summary-json", str(tmp_path / "s.json")]
    proc = subprocess.run([sys.executable, "-c", FAST_RETRIES, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **unreachable})
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = last_line_is_the_error(proc)
    assert f"the Hugging Face Hub at {unreachable['HF_ENDPOINT']} is unreachable" in line, line
    assert "HF_HUB_OFFLINE=1" in line
    assert "Retry 1/2" in proc.stderr and "Retry 2/2" in proc.stderr  # the network may come back: retried
    assert no_artifact(store, "authenticate")


# -------------------------------------------------------------------- bad rows, unreadable files, a full disk
BAD_ROWS = {
    5: ([{"role": "user", "content": "Anyone there?"}], "no assistant turn"),
    17: ([{"role": "bot", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
         "unknown role 'bot' (roles: system, user, assistant)"),
    40: ([{"role": "user", "content": "   "}, {"role": "assistant", "content": "Yes?"}],
         "empty or non-string content"),
}


def _chats_with_bad_rows(dest: Path) -> Path:
    train = synthetic.conversations(60, seed=3)
    for i, (messages, _) in BAD_ROWS.items():
        train[i] = {**train[i], "messages": messages}
    write_jsonl(dest / "train_sft.jsonl", train)
    write_jsonl(dest / "test_sft.jsonl", synthetic.conversations(16, seed=4))
    return dest


@pytest.mark.slow  # 39 s in CI here (2-core, 2026-12-07)
def test_bad_rows_unreadable_files_and_a_full_disk(tmp_path):
    store = tmp_path / "store"
    chats = _chats_with_bad_rows(tmp_path / "chats")
    local = ("data.source=local", f"data.dataset={chats}")

    # 1. the disk fills while the data stage writes: one clear line, no retry, no partial artifact
    proc, summary = run_flow(store, *local, env={"SFT_PIPELINE_FAULT_DISK_FULL": "data"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = last_line_is_the_error(proc)
    assert "stage 'data' failed: no space left on device while writing" in line, line
    assert "Retry 1/" not in proc.stderr  # the data stage has retries, but not for a full disk
    assert [summary["stages"][s]["state"] for s in ("authenticate", "data")] == ["Completed", "Failed"]
    assert no_artifact(store, "data")
    assert_intact(store, ["authenticate"])

    # 2. the data stage drops the 3 bad rows of 60 (5%, the default limit) and counts them per reason in its
    #    artifact and the summary; then the disk fills while the format stage writes
    proc, summary = run_flow(store, *local, env={"SFT_PIPELINE_FAULT_DISK_FULL": "format"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "stage 'format' failed: no space left on device" in last_line_is_the_error(proc)
    reasons = {why: 1 for _, why in BAD_ROWS.values()}
    train = summary["stages"]["data"]["splits"]["train_sft"]
    assert (train["rows"], train["invalid"], train["invalid_reasons"]) == (57, 3, reasons)
    stats = json.loads((Path(summary["stages"]["data"]["artifact"]) / "stats.json").read_text())
    assert stats["splits"]["train_sft"]["invalid_reasons"] == reasons
    assert summary["stages"]["authenticate"]["state"] == "Cached" and summary["stages"]["format"]["state"] == "Failed"
    assert no_artifact(store, "format")
    assert_intact(store, ["authenticate", "data"])
    data_before = snapshot(store / "data")

    # 3. a stricter limit: the stage fails, naming the first bad rows and why
    proc, summary = run_flow(store, *local, "data.max_invalid_share=0.01")
    assert proc.returncode == 1
    line = last_line_is_the_error(proc)
    assert "3 of 60 rows in split 'train_sft' are invalid (more than data.max_invalid_share=0.01)" in line, line
    for i, (_, why) in BAD_ROWS.items():
        assert f"row {i}: {why}" in line
    assert snapshot(store / "data") == data_before  # the earlier data artifact is untouched
    assert_intact(store, ["authenticate", "data"])

    # 4. a file that is not JSON lines
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "train_sft.jsonl").write_text('{"messages": [}\nnot json at all\n')
    (tmp_path / "broken" / "test_sft.jsonl").write_text("also not json\n")
    proc, summary = run_flow(store, "data.source=local", f"data.dataset={tmp_path / 'broken'}")
    assert proc.returncode == 1
    line = last_line_is_the_error(proc)
    assert "stage 'data' failed: data.dataset: could not read the json files under" in line, line
    assert "Retry 1/" not in proc.stderr
    assert snapshot(store / "data") == data_before
    assert_intact(store, ["authenticate", "data"])
