"""The deployments against a real Prefect server, used the way people will use them.

One `prefect server start` on 127.0.0.1 (SQLite in a temp PREFECT_HOME, a free port in 4310-4999), the process work
pool, `prefect deploy` of deployments/prefect.yaml and one `prefect worker start`; runs are triggered with
`prefect deployment run ... --param`, from the UI in headless Chromium, by a schedule, and through
`sft-pipeline serve`. The worker shares the store of the session's tiny run, so unchanged inputs come back Cached.
Every process started here is stopped by its PID (its own process group). The browser tests save a screenshot of
each page they check into $SFT_PIPELINE_SHOTS (to look at), else into their tmp dir.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import datasets
import httpx
import pytest

from flows.stages import STAGES as TABLE
from sft_pipeline import synthetic
from sft_pipeline.config import override_schema
from tests.conftest import ROOT, STAGES
from tests.test_report import _red_pixels

PREFECT = str(Path(sys.executable).with_name("prefect"))
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _free_port() -> int:
    """A free port from 4310-4999, picked at random: other sessions' test servers may be starting too."""
    for port in random.sample(range(4310, 5000), 690):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 4310-4999")


class PrefectServer:
    """A real Prefect server plus the processes that talk to it, all stopped by PID at the end."""

    def __init__(self, home: Path):
        self.home = home
        self.procs: list[subprocess.Popen] = []
        self._use_port(_free_port())

    def _use_port(self, port: int) -> None:
        self.port, self.url = port, f"http://127.0.0.1:{port}"
        self.env = {**os.environ, "PREFECT_HOME": str(self.home), "PREFECT_API_URL": f"{self.url}/api",
                    "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port),
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5"}
        self.env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)  # SQLite under PREFECT_HOME

    def spawn(self, *cmd: str, log: str, env: dict | None = None) -> subprocess.Popen:
        out = open(self.home / log, "ab")
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**self.env, **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        """SIGTERM to the process group we started (the process and its children), SIGKILL if it lingers."""
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)

    def start(self) -> None:
        """Start `prefect server start` and wait until *our* server answers (its settings name our PREFECT_HOME);
        if another session's server took the port first, ours exits and we try another port."""
        self.home.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            proc = self.spawn(PREFECT, "server", "start", log="server.log")
            deadline = time.time() + 240
            while time.time() < deadline and proc.poll() is None:
                try:
                    if httpx.get(f"{self.url}/api/admin/settings", timeout=5).json().get("home") == str(self.home):
                        return
                except (httpx.HTTPError, ValueError):
                    pass
                time.sleep(1)
            self.stop(proc)
            self._use_port(_free_port())
        raise AssertionError("our prefect server did not come up: " + (self.home / "server.log").read_text()[-3000:])

    def cli(self, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([PREFECT, *args], cwd=ROOT, env={**self.env, **(env or {})}, capture_output=True,
                              text=True, timeout=timeout)

    def api(self, method: str, path: str, **kw):
        r = httpx.request(method, f"{self.url}/api{path}", timeout=30, **kw)
        r.raise_for_status()
        return r.json() if r.content else None

    def deployment(self, name: str) -> dict:
        return self.api("GET", f"/deployments/name/{name}")

    def flow_runs(self, deployment_id: str) -> list[dict]:
        return self.api("POST", "/flow_runs/filter", json={"flow_runs": {"deployment_id": {"any_": [deployment_id]}},
                                                             "limit": 200})

    def wait_final(self, flow_run_id: str, timeout: float = 900) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            run = self.api("GET", f"/flow_runs/{flow_run_id}")
            if run["state"]["type"] in FINAL:
                return run
            time.sleep(2)
        raise AssertionError(f"flow run {flow_run_id} not finished after {timeout} s: {run['state']}")

    def run_deployment(self, name: str, *params: str) -> dict:
        """`prefect deployment run NAME --param k=v ...`, then wait for the run to finish."""
        args = ["deployment", "run", name]
        for p in params:
            args += ["--param", p]
        proc = self.cli(*args)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return self.wait_final(re.search(r"UUID: ([0-9a-f-]{36})", proc.stdout).group(1))


def summary_of(store: Path, flow_run: dict) -> dict:
    """The run summary the flow wrote for this flow run (``<store>/runs/*.json``)."""
    for p in sorted((store / "runs").glob("*.json"), reverse=True):
        data = json.loads(p.read_text())
        if data.get("flow_run_id") == flow_run["id"]:
            return data
    raise AssertionError(f"no summary for flow run {flow_run['id']} in {store / 'runs'}")


def states(summary: dict) -> list[str]:
    return [summary["stages"].get(s, {}).get("state") for s in STAGES]


def completed(server: PrefectServer, run: dict) -> dict:
    assert run["state"]["type"] == "COMPLETED", (run["state"], (server.home / "worker.log").read_text()[-4000:])
    return run


@pytest.fixture(scope="module")
def prefect(tiny_run, session_dir):
    """Server up, process pool created, `tiny` deployed, a worker on the pool sharing the tiny run's store."""
    store = tiny_run[0]
    server = PrefectServer(session_dir / "prefect-server")
    try:
        server.start()
        proc = server.cli("work-pool", "create", "sft-process", "--type", "process")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        proc = server.cli("--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", "--name", "tiny")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        server.spawn(PREFECT, "worker", "start", "--pool", "sft-process", log="worker.log",
                     env={"SFT_PIPELINE_STORE": str(store)})
        yield server, store
    finally:
        server.stop_all()


def test_the_overrides_schema_says_every_fields_range():
    """No server: the schema Prefect validates a deployment run's overrides against (what the form is made of)."""
    import jsonschema

    schema = override_schema()
    validator = jsonschema.Draft202012Validator(schema)
    props = schema["properties"]
    assert props["lora.r"] == {"title": "lora.r", "type": "integer", "minimum": 1, "maximum": 4096,
                               "description": "Allowed: an integer from 1 to 4,096."}
    assert props["lora.dropout"]["description"] == "Allowed: a number ≥ 0 and < 1."
    assert props["training.num_processes"]["description"].endswith("Allowed: an integer ≥ 1, or 'auto'.")
    # true/false as a choice: the form sends an untouched switch as false, an untouched choice not at all
    assert props["lora.shared_dropout"]["enum"] == [True, False] and "type" not in props["lora.shared_dropout"]
    assert props["training.use_liger_kernel"]["enum"] == [True, False, "auto"]
    assert not any("default" in p for p in props.values())  # the form must not send what the recipe did not ask
    assert "`<package>`" in props["model.name"]["description"]  # the form reads markdown: not an HTML tag
    for good in ({"lora.r": 4}, {"lora.target_modules": ["q_proj"]}, {"lora.target_modules": "all-linear"},
                 {"data.train_subset": {"count": 8}}, {"data.train_subset.count": 8}, {"format.system_message": None},
                 {"training.num_processes": "auto"}, {"model.build": {"num_hidden_layers": 2}}):
        assert not list(validator.iter_errors(good)), good
    refused = {json.dumps(bad): [e.message for e in validator.iter_errors(bad)]
               for bad in ({"lora.r": 0}, {"lora.r": 4097}, {"lora.shared_dropout": 1}, {"auth.hf_token": "hf_x"},
                           {"training.learning_rate": 0}, {"training.device": "tpu"})}
    assert refused == {'{"lora.r": 0}': ["0 is less than the minimum of 1"],
                       '{"lora.r": 4097}': ["4097 is greater than the maximum of 4096"],
                       '{"lora.shared_dropout": 1}': ["1 is not one of [True, False]"],
                       '{"auth.hf_token": "hf_x"}': ["Additional properties are not allowed ('auth.hf_token' was "
                                                     "unexpected)"],
                       '{"training.learning_rate": 0}': ["0 is less than or equal to the minimum of 0"],
                       '{"training.device": "tpu"}': ["'tpu' is not one of ['auto', 'cpu', 'cuda']"]}


def test_deployment_has_the_typed_form_and_a_schedule(prefect):
    server, _ = prefect
    dep = server.deployment("sft-pipeline/tiny")
    props = dep["parameter_openapi_schema"]["properties"]
    assert props["recipe"]["enum"] == ["mistral-7b-qlora", "smollm2-135m", "tiny", "zephyr-7b-qlora"] and props["recipe"]["default"] == "tiny"
    assert all(name in props["recipe"]["description"] for name in props["recipe"]["enum"])  # each one described
    assert "name Prefect Secret blocks" in " ".join(props["overrides"]["description"].split())
    assert props["overrides"]["properties"] == override_schema()["properties"]  # every field, with its range
    assert props["overrides"]["additionalProperties"] is False
    assert dep["parameters"] == {"recipe": "tiny", "overrides": {}} and dep["enforce_parameter_schema"]
    assert [s["schedule"].get("cron") for s in dep["schedules"]] == ["0 3 * * *"]
    assert dep["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]


def test_cli_triggered_run_completes_with_its_parameter(prefect):
    server, store = prefect
    run = completed(server, server.run_deployment("sft-pipeline/tiny", 'overrides={"generation.max_new_tokens": 6}'))
    assert run["parameters"]["overrides"] == {"generation.max_new_tokens": 6}
    summary = summary_of(store, run)
    assert summary["config"]["generation"]["max_new_tokens"] == 6
    assert states(summary) == ["Cached"] * (len(STAGES) - 1) + ["Completed"]  # only generation depends on it


def _browser(tmp: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file(), \
        "the UI test needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver"
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,2000",
                f"--user-data-dir={tmp / 'chromium-profile'}"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def _shot(browser, tmp_path: Path, name: str) -> Path:
    """A screenshot of the page a test just checked: into $SFT_PIPELINE_SHOTS (to look at), else the test's tmp dir."""
    folder = Path(os.environ.get("SFT_PIPELINE_SHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    assert browser.save_screenshot(str(path)) and path.stat().st_size > 10_000, path
    return path


def _form_field(browser, wait, label: str):
    """The run form's input for one parameter or override (its label reads ``lora.r (Optional)``)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC

    prop = wait.until(EC.presence_of_element_located((By.XPATH, (
        f"//span[contains(@class,'schema-form-property__label') and starts-with(normalize-space(.), '{label} ')]"
        "/ancestor::div[contains(concat(' ', normalize-space(@class), ' '), ' schema-form-property ')][1]"))))
    box = prop.find_element(By.XPATH, ".//input | .//textarea")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", box)
    return prop, box


def _body(browser) -> str:
    from selenium.webdriver.common.by import By

    return browser.find_element(By.TAG_NAME, "body").text


def test_custom_run_from_the_ui(prefect, tmp_path):
    """The run form has a field per config field with its range; out of range is refused when the run would be
    created, a valid value runs, and the runs list shows the run by its recipe and overrides, with its tags."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    server, store = prefect
    dep = server.deployment("sft-pipeline/tiny")
    before = {r["id"] for r in server.flow_runs(dep["id"])}
    browser = _browser(tmp_path)
    try:
        wait = WebDriverWait(browser, 60)
        browser.get(f"{server.url}/deployments")
        wait.until(EC.element_to_be_clickable((By.XPATH, "//a[normalize-space(.)='tiny']"))).click()
        wait.until(EC.element_to_be_clickable((By.XPATH, "//button[normalize-space(.)='Run']"))).click()
        wait.until(EC.element_to_be_clickable((By.XPATH, "//*[normalize-space(.)='Custom run']"))).click()
        prop, rank = _form_field(browser, wait, "lora.r")
        assert "Allowed: an integer from 1 to 4,096." in prop.text
        rank.send_keys("0")
        browser.find_element(By.XPATH, "//button[normalize-space(.)='Submit']").click()
        wait.until(lambda b: "Validation failed for field \"overrides['lora.r']\". Failure reason: 0 is less than the "
                             "minimum of 1" in " ".join(_body(b).split()))
        _form_field(browser, wait, "lora.r")  # the field, its range and the refusal in one picture
        _shot(browser, tmp_path, "form-refuses-lora-r-0.png")
        assert {r["id"] for r in server.flow_runs(dep["id"])} == before  # refused: no run was created

        browser.get(browser.current_url)  # a fresh form
        _, tokens = _form_field(browser, wait, "generation.max_new_tokens")
        tokens.send_keys("5")
        browser.find_element(By.XPATH, "//button[normalize-space(.)='Submit']").click()
        wait.until(lambda b: len({r["id"] for r in server.flow_runs(dep["id"])} - before) == 1)
        (new,) = {r["id"] for r in server.flow_runs(dep["id"])} - before
        run = completed(server, server.wait_final(new))
        browser.get(f"{server.url}/runs/flow-run/{new}")  # the UI shows it Completed too
        wait.until(EC.presence_of_element_located((By.XPATH, "//*[contains(@class,'state-badge')]"
                                                             "[normalize-space(.)='Completed']")))
        browser.get(f"{server.url}/runs")
        row = wait.until(EC.presence_of_element_located((By.XPATH, (
            "//a[normalize-space(.)='tiny: generation.max_new_tokens=5']"
            "/ancestor::div[contains(concat(' ', normalize-space(@class), ' '), ' flow-run-list-item ')][1]"))))
        wait.until(lambda b: all(x in row.text for x in ("recipe:tiny", "model:tiny-mistral", "sft-process")))
        _shot(browser, tmp_path, "runs-list.png")
    except Exception:
        browser.save_screenshot(str(server.home / "ui-failure.png"))
        raise
    finally:
        browser.quit()
    # the form sent the one field that was set (an untouched true/false field would have been sent as false)
    assert run["parameters"]["overrides"] == {"generation.max_new_tokens": 5} and run["parameters"]["recipe"] == "tiny"
    assert run["name"] == "tiny: generation.max_new_tokens=5" and {"recipe:tiny", "model:tiny-mistral"} <= set(run["tags"])
    summary = summary_of(store, run)
    assert summary["config"]["generation"]["max_new_tokens"] == 5
    assert states(summary) == ["Cached"] * (len(STAGES) - 1) + ["Completed"]


def _artifacts(server: PrefectServer, flow_run_id: str) -> list[dict]:
    return server.api("POST", "/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})


def _logs(server: PrefectServer, flow_run_id: str, until=None) -> list[dict]:
    """The flow run's log entries, oldest first; with ``until(entries)``, polled (logs arrive in batches) up to 60 s."""
    deadline = time.time() + 60
    while True:
        entries = server.api("POST", "/logs/filter", json={"logs": {"flow_run_id": {"any_": [flow_run_id]}},
                                                           "limit": 200, "sort": "TIMESTAMP_ASC"})
        if until is None or until(entries) or time.time() > deadline:
            return entries
        time.sleep(2)


def _errors(entries: list[dict]) -> list[str]:
    return [e["message"] for e in entries if e["level"] >= 40]


WATCH = json.dumps({"training.max_steps": 8, "training.logging_steps": 2, "evaluation.max_samples": 16,
                    "generation.max_new_tokens": 4})


def _rows(table: dict) -> list[dict]:
    return json.loads(table["data"]) if isinstance(table["data"], str) else table["data"]


def _task_runs(server: PrefectServer, flow_run_id: str) -> list[dict]:
    return server.api("POST", "/task_runs/filter", json={"flow_runs": {"id": {"any_": [flow_run_id]}},
                                                          "sort": "EXPECTED_START_TIME_ASC"})


def _outcome(summary: dict) -> str:
    ev = summary["eval"]
    return (f"Completed · eval loss {ev['base']['eval_loss']:.4g} → {ev['tuned']['eval_loss']:.4g} · "
            f"{'promoted' if summary['promotion']['promoted'] else 'not promoted'}")


def test_a_training_run_can_be_watched_in_the_ui(prefect, tmp_path):
    """Progress, a log line per logging step and per checkpoint, the estimate, the report with eval, adapter and
    promotion, the loss table with the evaluate stage's eval loss; the run named after its overrides and tagged, its
    task runs named after their stages with their code versions, the eval result as its final message; a rerun (all
    Cached) has its report too; a retraining run's report says the base model's numbers were kept; the report page
    shows the loss picture, eval points included, in a real browser."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    server, store = prefect
    run = completed(server, server.run_deployment("sft-pipeline/tiny", f"overrides={WATCH}"))
    summary = summary_of(store, run)
    assert states(summary)[3:] == ["Completed"] * (len(STAGES) - 3)
    assert run["name"] == "tiny: training.max_steps=8, training.logging_steps=2, evaluation.max_samples=16, +1 more"
    assert {"recipe:tiny", "model:tiny-mistral"} <= set(run["tags"])
    assert run["state"]["message"] == _outcome(summary)  # the eval result, in the run's final state
    tasks = _task_runs(server, run["id"])
    assert [(t["name"], t["task_version"]) for t in tasks] == [(s.name, s.code_version) for s in TABLE]
    assert all({"recipe:tiny", "model:tiny-mistral"} <= set(t["tags"]) for t in tasks)
    arts = {a["key"] or a["type"]: a for a in _artifacts(server, run["id"])}
    assert arts["progress"]["data"] == 100
    assert re.fullmatch(r"step 8/8 · loss [\d.]+ · done in \d:\d\d:\d\d", arts["progress"]["description"])
    report = arts["sft-report-tiny"]["data"]
    assert f"{summary['eval']['tuned']['eval_loss']:.4f}" in report and summary["adapter"] in report
    assert "Promot" in report and "data:image/png;base64," in report
    assert arts["sft-report-tiny"]["description"] == _outcome(summary)  # what the key's history lists
    rows = _rows(arts["sft-loss-tiny"])
    assert [r["step"] for r in rows if r.get("train_loss") is not None] == [2, 4, 6, 8]
    # the evaluate stage's eval loss: the base model's at step 0, the tuned one's at the last step; rounded
    ev = summary["eval"]
    assert rows[0] == {"step": 0, "train_loss": None, "eval_loss": float(f"{ev['base']['eval_loss']:.4g}"),
                       "learning_rate": None}
    assert rows[-1]["step"] == 8 and rows[-1]["eval_loss"] == float(f"{ev['tuned']['eval_loss']:.4g}")
    assert all(r[k] is None or r[k] == float(f"{r[k]:.4g}") for r in rows for k in ("train_loss", "eval_loss"))
    # the health check quotes the ends of the picture
    first, last = rows[1]["train_loss"], rows[-1]["train_loss"]
    assert f"went down from {first:.3g} at step 2 to {last:.3g} at step 8" in report, report[-2500:]
    picture = base64.b64decode(re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", report).group(1))
    assert _red_pixels(picture) > 100  # the evaluate stage's two points
    lines = [entry["message"] for entry in _logs(server, run["id"], until=lambda e: len(e) > 20)]
    steps = [m for m in lines if re.search(r"train: step \d+/8 .* loss \d", m)]
    assert len(steps) == 4, lines
    assert any(m.startswith("estimate:") for m in lines) and any(m.startswith("training settings:") for m in lines)
    work = Path(summary["store"]) / ".work" / "train" / summary["stages"]["train"]["key"]
    assert f"train: saved checkpoint-8 ({work / 'checkpoint-8'})" in lines, lines  # the final save

    again = completed(server, server.run_deployment("sft-pipeline/tiny", f"overrides={WATCH}"))
    assert states(summary_of(store, again)) == ["Cached"] * len(STAGES)
    report_again = next(a for a in _artifacts(server, again["id"]) if a["key"] == "sft-report-tiny")
    assert f"{summary['eval']['tuned']['eval_loss']:.4f}" in report_again["data"]

    retrain = json.dumps({**json.loads(WATCH), "training.learning_rate": 0.01})  # the same base and test set
    retrained = completed(server, server.run_deployment("sft-pipeline/tiny", f"overrides={retrain}"))
    summary_retrained = summary_of(store, retrained)
    assert states(summary_retrained)[3:] == ["Completed"] * (len(STAGES) - 3)
    report_retrained = next(a for a in _artifacts(server, retrained["id"]) if a["key"] == "sft-report-tiny")
    assert "The base model's numbers (loss, tokens/s, answers) are kept from its scoring on" in report_retrained["data"]
    assert summary_retrained["eval"]["base"]["eval_loss"] == summary["eval"]["base"]["eval_loss"]
    samples_retrained = next(a for a in _artifacts(server, retrained["id"]) if a["key"] == "sft-samples-tiny")
    assert "The base model's replies are kept from" in samples_retrained["data"]

    browser = _browser(tmp_path)
    try:
        browser.get(f"{server.url}/artifacts/artifact/{report_retrained['id']}")
        img = WebDriverWait(browser, 60).until(EC.presence_of_element_located((By.XPATH, "//img[@alt='loss curve']")))
        WebDriverWait(browser, 30).until(lambda b: b.execute_script("return arguments[0].naturalWidth", img) > 0)
        body = browser.find_element(By.TAG_NAME, "body").text
        assert f"{summary_retrained['eval']['tuned']['eval_loss']:.4f}" in body and "kept from its scoring" in body
        browser.execute_script("arguments[0].scrollIntoView()", img)
        _shot(browser, tmp_path, "report-with-eval-points.png")
        if os.environ.get("SFT_PIPELINE_SCREENSHOT_SAMPLES"):  # the samples page, to look at
            browser.get(f"{server.url}/artifacts/artifact/{samples_retrained['id']}")
            WebDriverWait(browser, 60).until(lambda b: "kept from" in b.find_element(By.TAG_NAME, "body").text)
            browser.save_screenshot(os.environ["SFT_PIPELINE_SCREENSHOT_SAMPLES"])
        if os.environ.get("SFT_PIPELINE_SCREENSHOT"):  # README's picture: SFT_PIPELINE_SCREENSHOT=docs/watch-a-run.png
            browser.get(f"{server.url}/artifacts/artifact/{report_retrained['id']}")
            img = WebDriverWait(browser, 60).until(EC.presence_of_element_located((By.XPATH,
                                                                                 "//img[@alt='loss curve']")))
            WebDriverWait(browser, 30).until(lambda b: b.execute_script("return arguments[0].naturalWidth", img) > 0)
            browser.execute_script("arguments[0].scrollIntoView({block: 'end'})", img)  # the picture, and above it
            time.sleep(2)  # the eval table, training, promotion and health sections
            browser.save_screenshot(os.environ["SFT_PIPELINE_SCREENSHOT"])
    except Exception:
        browser.save_screenshot(str(server.home / "ui-failure.png"))
        raise
    finally:
        browser.quit()


STOPPED = json.dumps({"training.max_steps": 8, "training.logging_steps": 2, "training.save_steps": 2,
                      "training.learning_rate": 0.004, "evaluation.max_samples": 16, "generation.max_new_tokens": 4})


def _artifacts_tab(browser, wait, run_id: str, server: PrefectServer) -> None:
    """The run page's Artifacts tab as a list (the cards' grid cuts their descriptions short)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC

    browser.get(f"{server.url}/runs/flow-run/{run_id}")
    wait.until(EC.element_to_be_clickable((By.XPATH, "//*[normalize-space(.)='Artifacts'][not(*)]"))).click()
    wait.until(EC.element_to_be_clickable((By.XPATH, "(//button[contains(@class,'p-button-group__button')])[last()]"
                                           ))).click()


def _click(browser, wait, button: str, confirm: str) -> None:
    """Click a run page's button, then the dialog's confirming one, as a user does."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC

    wait.until(EC.element_to_be_clickable((By.XPATH, f"//button[normalize-space(.)='{button}']"))).click()
    wait.until(EC.element_to_be_clickable((By.XPATH, f"//*[@role='dialog']//button[normalize-space(.)='{confirm}']")
                                          )).click()


@pytest.mark.slow  # ~4 min here: 8 steps trained in two attempts, the cancel's hook process (~40 s), the other stages
def test_a_cancelled_run_says_where_it_stopped_and_retry_resumes_there(prefect, tmp_path):
    """Cancel from the UI while training (held after step 4 and its checkpoint by a test fault): the SIGTERM makes
    training finish step 5 and save checkpoint-5 (training.stop), the run ends Cancelled, its summary says Cancelled,
    its report and progress card say that checkpoint-5 is kept; Retry from the
    UI resumes there, on the same progress card, and the report marks the attempt and the steps it trained."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    server, store = prefect
    marker = tmp_path / "held"
    env = json.dumps({"SFT_PIPELINE_FAULT": "train:step=4:hang", "SFT_PIPELINE_FAULT_MARKER": str(marker)})
    proc = server.cli("deployment", "run", "sft-pipeline/tiny", "--param", f"overrides={STOPPED}",
                      "--job-variable", f"env={env}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", proc.stdout).group(1)
    deadline = time.time() + 600
    while not marker.exists():
        state = server.api("GET", f"/flow_runs/{run_id}")["state"]
        assert time.time() < deadline and state["type"] not in FINAL, ("never held at step 4", state)
        time.sleep(1)
    pid = int(marker.read_text().split()[0])  # the flow's process, held before step 5

    def card() -> dict:
        (progress,) = [a for a in _artifacts(server, run_id) if a["type"] == "progress"]  # one card, all along
        return progress

    browser = _browser(tmp_path)
    try:
        wait = WebDriverWait(browser, 60)
        _artifacts_tab(browser, wait, run_id, server)
        shown = wait.until(EC.presence_of_element_located((By.XPATH, "//*[starts-with(normalize-space(.), "
                                                                     "'step 4/8 · loss ')][not(*)]")))
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", shown)
        _shot(browser, tmp_path, "running-progress-card.png")
        assert re.fullmatch(r"step 4/8 · loss [\d.]+ · ETA \d:\d\d:\d\d · checkpoint-4 saved", card()["description"])
        assert card()["data"] == 50

        _click(browser, wait, "Cancel", "Confirm")
        cancelled = server.wait_final(run_id, timeout=300)
        assert cancelled["state"]["type"] == "CANCELLED", cancelled["state"]
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # SIGTERM stopped it, well inside the 30 s before Prefect's SIGKILL
        summary = summary_of(store, cancelled)
        assert summary["status"] == "Cancelled" and summary["stages"]["train"]["state"] == "Cancelled"
        ckpt = Path(summary["stopped"]["checkpoint"])
        assert summary["stopped"]["step"] == 5 and ckpt.name == "checkpoint-5" and (ckpt / "sft-pipeline-complete").is_file()
        kept = "checkpoint-5 kept; Retry resumes from step 5"
        (stopped,) = [a for a in _artifacts(server, run_id) if a["key"] == "sft-report-tiny"]
        assert stopped["description"] == f"Cancelled during train · {kept}"
        assert f"The run was **Cancelled** during the **train** stage: {kept}." in stopped["data"]
        assert re.fullmatch(rf"stopped at step 5/8 · loss [\d.]+ · Cancelled: {kept}", card()["description"])
        lines = [e["message"] for e in _logs(server, run_id, until=lambda e: any(kept in x["message"] for x in e))]
        assert f"Cancelled during train: {kept}" in lines, lines[-10:]
        browser.get(f"{server.url}/artifacts/artifact/{stopped['id']}")
        wait.until(lambda b: "Checkpoint kept:" in _body(b))
        _shot(browser, tmp_path, "cancelled-report.png")

        # Retry from the UI. The test fault would hold the retried attempt too (the run keeps its job variables):
        # the pool is paused while the Retry drops them, as it waits for a worker (Prefect allows it only then).
        assert server.cli("work-pool", "pause", "sft-process").returncode == 0
        try:
            browser.get(f"{server.url}/runs/flow-run/{run_id}")
            _click(browser, wait, "Retry", "Retry")
            deadline = time.time() + 60
            while server.api("GET", f"/flow_runs/{run_id}")["state"]["type"] != "SCHEDULED":
                assert time.time() < deadline
                time.sleep(1)
            server.api("PATCH", f"/flow_runs/{run_id}", json={"job_variables": {}})
        finally:
            assert server.cli("work-pool", "resume", "sft-process").returncode == 0
        retried = completed(server, server.wait_final(run_id))
        assert retried["run_count"] == 2
        summary = summary_of(store, retried)
        assert summary["attempt"] == 2 and summary["train"]["resumed_from_step"] == 5
        assert card()["data"] == 100 and card()["description"].startswith("step 8/8 · loss ")  # the same card
        (report,) = [a for a in _artifacts(server, run_id) if a["key"] == "sft-report-tiny"
                     and a["description"].startswith("Completed")]
        assert report["description"] == _outcome(summary) + " · attempt 2" == retried["state"]["message"]
        assert "**Attempt 2** of this flow run (a Retry)" in report["data"] and "training resumed from checkpoint-5" \
            in report["data"]
        assert re.search(r"- training time: [\w ]+ for steps 5→8 ", report["data"]), report["data"]
        browser.get(f"{server.url}/artifacts/artifact/{report['id']}")
        wait.until(lambda b: "Attempt 2" in _body(b))
        _shot(browser, tmp_path, "retried-report.png")
        _artifacts_tab(browser, wait, run_id, server)  # both attempts' reports, by outcome; one progress card
        wait.until(lambda b: all(x in _body(b) for x in (report["description"], stopped["description"], "done in")))
        _shot(browser, tmp_path, "retried-run-artifacts.png")
    except Exception:
        browser.save_screenshot(str(server.home / "ui-failure.png"))
        raise
    finally:
        browser.quit()


def test_scheduled_run_with_unchanged_inputs_is_all_cached(prefect):
    server, store = prefect
    dep = server.deployment("sft-pipeline/tiny")
    # first run 45 s from now (the scheduler only creates runs in the future), the next one an hour later
    anchor = (datetime.now(timezone.utc) + timedelta(seconds=45)).replace(microsecond=0)
    proc = server.cli("deployment", "schedule", "create", "sft-pipeline/tiny", "--interval", "3600",
                      "--anchor-date", anchor.strftime("%Y-%m-%dT%H:%M:%SZ"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (schedule,) = [s for s in server.deployment("sft-pipeline/tiny")["schedules"] if s["schedule"].get("interval")]

    def from_schedule() -> list[dict]:
        runs = [r for r in server.flow_runs(dep["id"]) if (r.get("created_by") or {}).get("id") == schedule["id"]]
        return sorted(runs, key=lambda r: r["expected_start_time"])

    def active() -> bool:
        return {s["id"]: s["active"] for s in server.deployment("sft-pipeline/tiny")["schedules"]}[schedule["id"]]

    deadline = time.time() + 120
    while not from_schedule() and time.time() < deadline:
        time.sleep(2)
    runs = from_schedule()
    assert runs and datetime.fromisoformat(runs[0]["expected_start_time"].replace("Z", "+00:00")) == anchor, runs[:1]
    run = completed(server, server.wait_final(runs[0]["id"], timeout=600))
    assert run["auto_scheduled"] and run["parameters"] == {"recipe": "tiny", "overrides": {}}
    summary = summary_of(store, run)
    assert states(summary) == ["Cached"] * len(STAGES)
    assert sum(s["seconds"] for s in summary["stages"].values()) < 30, summary["stages"]
    assert not summary["promotion"]["promoted"]  # the same adapter as the tiny run: nothing to promote

    # pause (its scheduled runs are removed), resume, then delete it: the commands the README gives
    proc = server.cli("deployment", "schedule", "pause", "sft-pipeline/tiny", schedule["id"])
    assert proc.returncode == 0 and not active(), proc.stdout + proc.stderr
    assert not [r for r in from_schedule() if r["state"]["type"] == "SCHEDULED"]
    proc = server.cli("deployment", "schedule", "resume", "sft-pipeline/tiny", schedule["id"])
    assert proc.returncode == 0 and active(), proc.stdout + proc.stderr
    proc = server.cli("deployment", "schedule", "delete", "sft-pipeline/tiny", schedule["id"], "-y")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _write_local_chats(dest: Path, train_seed: int) -> None:
    """Local parquet files in ultrachat_200k's schema; the test split stays the same across seeds."""
    dest.mkdir(parents=True, exist_ok=True)
    test = synthetic.splits(8, 24, seed=7)["test_sft"]
    train = synthetic.splits(160, 8, seed=train_seed)["train_sft"]
    datasets.Dataset.from_list(train).to_parquet(str(dest / "train_sft.parquet"))
    datasets.Dataset.from_list(test).to_parquet(str(dest / "test_sft.parquet"))


def test_new_local_data_retrains_from_the_data_stage(prefect, tmp_path):
    server, store = prefect
    data = tmp_path / "chats"
    _write_local_chats(data, train_seed=1)
    overrides = json.dumps({"data.source": "local", "data.dataset": str(data), "training.max_steps": 3,
                            "evaluation.max_samples": 8, "generation.max_new_tokens": 4})
    pointer = (store / "promoted" / "tiny.json").read_text()

    first = summary_of(store, completed(server, server.run_deployment("sft-pipeline/tiny", f"overrides={overrides}")))
    assert states(first) == ["Completed"] * len(STAGES)
    assert not first["promotion"]["promoted"] and "not comparable" in first["promotion"]["reason"]

    _write_local_chats(data, train_seed=2)  # same file names and config, new content
    second = summary_of(store, completed(server, server.run_deployment("sft-pipeline/tiny", f"overrides={overrides}")))
    assert states(second) == ["Cached"] + ["Completed"] * (len(STAGES) - 1)  # from the data stage on
    assert second["stages"]["data"]["artifact"] != first["stages"]["data"]["artifact"]
    assert second["adapter"] != first["adapter"]
    assert (store / "promoted" / "tiny.json").read_text() == pointer  # another test set: the pointer stays
    assert "not comparable" in second["promotion"]["reason"]


def test_bad_parameters_are_refused_before_any_stage(prefect):
    server, _ = prefect
    proc = server.cli("deployment", "run", "sft-pipeline/tiny", "--param", "recipe=tinny")
    assert proc.returncode != 0 and "'tinny' is not one of" in proc.stdout + proc.stderr  # refused by the server

    # out of range, or no config field: refused by the server when the run would be created, naming the field
    for overrides, says in (('{"lora.r": 0}', "Validation failed for field \"overrides['lora.r']\". Failure reason: 0 "
                                              "is less than the minimum of 1"),
                            ('{"auth.hf_token": "hf_not_a_param"}', "Additional properties are not allowed "
                                                                    "('auth.hf_token' was unexpected)")):
        proc = server.cli("deployment", "run", "sft-pipeline/tiny", "--param", f"overrides={overrides}")
        out = " ".join((proc.stdout + proc.stderr).split())
        assert proc.returncode != 0 and says in out and "hf_not_a_param" not in out, out

    # what one field means next to another only the config can say: the run fails at once, with its report
    proc = server.cli("deployment", "run", "sft-pipeline/tiny", "--param", 'overrides={"training.num_processes": 3}')
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = server.wait_final(re.search(r"UUID: ([0-9a-f-]{36})", proc.stdout).group(1))
    assert run["state"]["type"] == "FAILED"
    message = run["state"]["message"]
    assert message.startswith("invalid config: training: training.num_processes=3 must divide the effective batch") \
        and "\n" not in message, message
    assert _task_runs(server, run["id"]) == []  # no stage ran
    errors = _errors(_logs(server, run["id"], until=_errors))
    assert errors and not [m for m in errors if "Traceback" in m], errors  # the one line, no traceback wall
    assert errors[-1] == message
    (report,) = _artifacts(server, run["id"])  # every run leaves its report
    assert report["key"] == "sft-report-tiny" and report["description"] == f"Failed · {message}"
    assert "## Refused before any stage ran" in report["data"] and message in report["data"]
    assert "recipe:tiny" in server.api("GET", f"/flow_runs/{run['id']}")["tags"]


def test_a_stage_failing_on_bad_rows_ends_with_its_line_and_no_traceback(prefect, tmp_path):
    server, _ = prefect
    chats = tmp_path / "chats"
    chats.mkdir()
    bad = [{**row, "messages": row["messages"][:1]} for row in synthetic.conversations(40, seed=1)]  # no assistant
    for split, rows in (("train_sft", bad), ("test_sft", synthetic.conversations(8, seed=2))):
        datasets.Dataset.from_list(rows).to_parquet(str(chats / f"{split}.parquet"))
    overrides = json.dumps({"data.source": "local", "data.dataset": str(chats)})
    run = server.run_deployment("sft-pipeline/tiny", f"overrides={overrides}")
    assert run["state"]["type"] == "FAILED"
    assert run["state"]["message"].startswith("stage 'data' failed: data: 40 of 40 rows"), run["state"]["message"]
    errors = _errors(_logs(server, run["id"], until=lambda e: run["state"]["message"] in _errors(e)))
    assert not [m for m in errors if "Traceback" in m], errors
    assert errors[-1] == run["state"]["message"], errors


def test_serve_makes_a_deployment_that_runs(prefect):
    server, store = prefect
    proc = server.spawn(sys.executable, "-m", "sft_pipeline.cli", "serve", "--cron", "0 4 * * *",
                        "--store", str(store), log="serve.log")
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            assert proc.poll() is None, (server.home / "serve.log").read_text()[-3000:]
            try:
                dep = server.deployment("sft-pipeline/served")
                break
            except httpx.HTTPStatusError:
                time.sleep(2)
        else:
            raise AssertionError("sft-pipeline serve created no deployment in 180 s")
        assert [s["schedule"].get("cron") for s in dep["schedules"]] == ["0 4 * * *"]
        assert dep["parameters"] == {"recipe": "tiny", "overrides": {}, "store": str(store)}
        run = server.run_deployment("sft-pipeline/served")
        assert run["state"]["type"] == "COMPLETED", (server.home / "serve.log").read_text()[-4000:]
        assert states(summary_of(store, run)) == ["Cached"] * len(STAGES)
    finally:
        server.stop(proc)
    assert proc.poll() is not None


def test_gpu_deployment_renders_a_kubernetes_job(prefect):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    server, _ = prefect
    proc = server.cli("work-pool", "create", "sft-gpu", "--type", "kubernetes",
                      "--base-job-template", "deployments/k8s-gpu-job-template.json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = server.cli("--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml",
                      "--name", "mistral-7b-qlora")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    dep = server.deployment("sft-pipeline/mistral-7b-qlora")
    pool = server.api("GET", "/work_pools/sft-gpu")
    assert dep["parameters"]["recipe"] == "mistral-7b-qlora" and dep["work_pool_name"] == "sft-gpu"
    assert dep["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "/opt/sft-pipeline"}}]
    assert [s["schedule"].get("cron") for s in dep["schedules"]] == ["0 2 * * 0"]

    async def render(job_variables: dict) -> dict:
        with temporary_settings({PREFECT_API_URL: f"{server.url}/api"}):
            async with get_client() as client:
                cfg = await KubernetesWorkerJobConfiguration.from_template_and_values(
                    pool["base_job_template"], job_variables, client=client)
        return cfg.job_manifest["spec"]["template"]

    pod = asyncio.run(render(dep["job_variables"]))
    (container,) = pod["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1 == container["resources"]["requests"]["nvidia.com/gpu"]
    assert container["image"] == "sft-pipeline:gpu" and container["resources"]["requests"]["memory"] == "48Gi"
    assert _k8s_env(container)["SFT_PIPELINE_STORE"] == "/mnt/sft-store"
    assert {"name": "sft-store", "mountPath": "/mnt/sft-store"} in container["volumeMounts"]
    assert {"name": "sft-store", "persistentVolumeClaim": {"claimName": "sft-store"}} in pod["spec"]["volumes"]
    assert pod["metadata"]["labels"]["sft-pipeline/recipe"] == dep["parameters"]["recipe"]
    assert json.loads(pod["metadata"]["annotations"]["sft-pipeline/overrides"]) == dep["parameters"]["overrides"]

    pod = asyncio.run(render({**dep["job_variables"], "gpu_count": 2, "store_mount_path": "/data",
                              "store_volume": {"name": "sft-store",
                                               "persistentVolumeClaim": {"claimName": "team-store"}},
                              "recipe": "zephyr-7b-qlora"}))
    (container,) = pod["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert _k8s_env(container)["SFT_PIPELINE_STORE"] == "/data"  # the store follows the mount
    assert {"name": "sft-store", "persistentVolumeClaim": {"claimName": "team-store"}} in pod["spec"]["volumes"]
    assert pod["metadata"]["labels"]["sft-pipeline/recipe"] == "zephyr-7b-qlora"

    # on an object store: no claim at all, the URL and a Secret with the credentials; the pod's disk is the cache
    pod = asyncio.run(render({**dep["job_variables"], "store": "s3://team-bucket/sft",
                              "store_volume": {"name": "sft-store", "emptyDir": {}},
                              "store_credentials_secret": "aws-sft"}))
    (container,) = pod["spec"]["containers"]
    assert not any("persistentVolumeClaim" in v for v in pod["spec"]["volumes"])
    assert {"name": "sft-store", "emptyDir": {}} in pod["spec"]["volumes"]
    assert {"secretRef": {"name": "aws-sft", "optional": True}} in container["envFrom"]
    env = _k8s_env(container)
    assert env["SFT_PIPELINE_STORE"] == "s3://team-bucket/sft" and env["SFT_PIPELINE_CACHE"] == "/mnt/sft-store/cache"
    from sft_pipeline.store import Store, default_store  # what the flow makes of that environment

    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        st = Store(default_store())
        assert st.remote is not None and st.location == "s3://team-bucket/sft"
        assert str(st.root) == "/mnt/sft-store/cache"


def _k8s_env(container: dict) -> dict[str, str]:
    """The container's environment as Kubernetes sets it: ``$(NAME)`` expands to an earlier variable's value."""
    env: dict[str, str] = {}
    for e in container["env"]:
        env[e["name"]] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), e.get("value", ""))
    return env
