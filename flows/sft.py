"""The fine-tune as one Prefect flow: the seven stages of ``flows/stages.py``, top to bottom, then promotion.

    authenticate → data → format → train → evaluate → save_adapter → generate

Each stage runs as a Prefect task (the UI's graph, retries of transient failures, logs). Whether it computes or
reuses is decided by the artifact store alone (``sft_pipeline/stage.py``): a finished artifact under the stage's key
is reused and the task ends ``Cached``; Prefect keeps no cache records of its own. Only artifact references (path +
fingerprint) go from one stage to the next.

Run it: ``sft-pipeline run --recipe tiny`` (or ``python -m sft_pipeline.cli run ...``); deploy it: ``deployments/``.
"""
# (no ``from __future__ import annotations`` here: Prefect validates a served run's parameters against the real
# annotations of ``sft``; as strings, ``RecipeName`` cannot be resolved and every served run fails)
import functools
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.states import Completed, Failed

from flows.stages import STAGES
from sft_pipeline import health, preflight, promote, quiet, report
from sft_pipeline.config import OverrideValue, PipelineConfig, RecipeName, load_config
from sft_pipeline.errors import ConfigError, StageError, StageFailure, failure_message, is_transient
from sft_pipeline.models import describe
from sft_pipeline.stage import Facts, Stage, execute
from sft_pipeline.store import ArtifactRef, Store, check_paths, default_store, write_json_atomic

RETRY_DELAYS = [10, 60, 300]  # seconds before retry 1, 2, 3 of a transient failure


def _retry_if_transient(task_obj, task_run, state) -> bool:
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - only classified here
        if is_transient(exc):  # say it now ("... unreachable. Retry 1/2 in 10 s"); Prefect only says it at INFO
            quiet.say_retry(task_obj, task_run, exc)
            return True
    return False


class Attempts:
    """How many times each stage of this run was started (1 + its retries). A plain object: Prefect passes it to
    the task as it is (it copies dicts and models it finds in task parameters)."""

    def __init__(self):
        self.count: dict[str, int] = {}


@task(cache_policy=NO_CACHE, persist_result=False, retry_condition_fn=_retry_if_transient)
def run_stage(stage: Stage, cfg: PipelineConfig, store: str, upstream: dict[str, ArtifactRef], facts: Facts,
              attempts: Attempts) -> ArtifactRef:
    """One stage as a Prefect task: ``Cached`` when the store had its artifact, ``Completed`` when computed."""
    attempts.count[stage.name] = attempts.count.get(stage.name, 0) + 1
    log = get_run_logger()
    try:
        ref, reused = execute(stage, cfg, Store(store), upstream, facts, log, run_label=flow_run.get_name())
    except (StageFailure, ConfigError) as exc:  # ours: one line, no traceback (a bug still gets Prefect's)
        log.error("%s", failure_message(exc))
        return Failed(message=failure_message(exc), data=exc)
    return Completed(data=ref, name="Cached") if reused else ref


class RunRecord:
    """The run summary: each stage's state, seconds, attempts and artifact, rewritten after every stage.

    Written to ``<store>/runs/`` (and ``--summary-json``) with status ``Running`` while stages run, so a killed run
    still says what it finished; ``sft-pipeline plan`` reads these records to recognise a deleted artifact.
    """

    def __init__(self, store: Store, cfg: PipelineConfig, summary_path: str | None):
        self.store, self.cfg, self.summary_path = store, cfg, summary_path
        self.stages: dict[str, dict[str, Any]] = {}
        self.attempts = Attempts()
        self.path = store.root / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json"

    def run(self, stage: Stage, facts: Facts, refs: dict[str, ArtifactRef], cfg=None) -> ArtifactRef:
        """Run one stage as a task. ``cfg``: the config that stage sees, when not the run's (the DPO flow runs the
        SFT recipe's stages with that recipe's config)."""
        t0 = time.perf_counter()
        task_ = run_stage.with_options(name=stage.name, retries=stage.retries,
                                       retry_delay_seconds=RETRY_DELAYS[: max(stage.retries, 1)])
        try:
            state = task_(stage, cfg or self.cfg, str(self.store.root), {n: refs[n] for n in stage.needs}, facts,
                          self.attempts, return_state=True)
        except KeyboardInterrupt:  # Ctrl-C: the summary says where it stopped; the same command resumes there
            self.stages[stage.name] = {"state": "Interrupted", "seconds": round(time.perf_counter() - t0, 2)}
            self.write(status="Interrupted")
            raise
        record = self.stages[stage.name] = {"state": state.name, "seconds": round(time.perf_counter() - t0, 2)}
        if stage.name in self.attempts.count:
            record["attempts"] = self.attempts.count[stage.name]
        if not state.is_completed():
            try:
                state.result()
            except BaseException as exc:  # noqa: BLE001 - recorded, then raised as the stage's failure
                record.update(state="Failed", error=failure_message(exc))
                publish(self.write(status="Failed"), refs)
                raise StageError(stage.name, exc) from exc
        ref: ArtifactRef = state.result()
        record.update(artifact=ref.path, key=ref.key, fingerprint=ref.fingerprint)
        if stage.name == "data":  # rows kept and invalid rows per reason, for the summary's last lines
            record["splits"] = ref.read_json("stats.json")["splits"]
        self.write(status="Running")
        return ref

    def write(self, status: str, **extra) -> dict:
        summary = {"recipe": self.cfg.recipe, "store": str(self.store.root), "model": describe(self.cfg.model),
                   "flow_run_id": str(flow_run.id), "status": status, "stages": self.stages,
                   "config": self.cfg.model_dump(mode="json"), **extra}
        for path in [self.path] + ([Path(self.summary_path)] if self.summary_path else []):
            write_json_atomic(path, summary)
        return summary


def _artifact_key(kind: str, recipe: str) -> str:
    """Prefect artifact keys allow lower-case letters, digits and dashes: one history per kind and recipe."""
    return f"sft-{kind}-" + (re.sub(r"[^a-z0-9-]+", "-", recipe.lower()).strip("-") or "recipe")


def _history(refs: dict[str, ArtifactRef]) -> list[dict]:
    train = refs.get("train")
    return json.loads(train.file("log_history.json").read_text()) if train else []


def publish(summary: dict, refs: dict[str, ArtifactRef]) -> None:
    """The run's report in the Prefect UI, on every run (one whose stages were all Cached too, and a failed one):
    a markdown report with the loss picture, the loss curve as a table, and the samples."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    recipe, train, history = summary["recipe"], refs.get("train"), _history(refs)
    checked = summary.get("health") or (health.check(history, summary.get("eval")) if history else None)
    png = train.file("loss.png").read_bytes() if train and train.file("loss.png").is_file() else None
    create_markdown_artifact(report.markdown(summary, checked, png), key=_artifact_key("report", recipe),
                             description=f"Fine-tune {recipe}: {summary['status']}")
    if history:
        create_table_artifact(report.loss_rows(history), key=_artifact_key("loss", recipe),
                              description="Loss curve: train and eval loss and learning rate per step")
    if refs.get("generate"):
        create_markdown_artifact(refs["generate"].file("samples.md").read_text(), key=_artifact_key("samples", recipe),
                                 description="Samples from the base and the tuned model")


class _OurFailureHasItsLine(logging.Filter):
    """Drops the engine's "Engine execution exited with unexpected exception" traceback when the exception is one of
    ours (a bad config, a stage that failed for good): its one line is already the last log line and the Failed
    state's message. Any other exception keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, (StageError, ConfigError)) and "unexpected exception" in str(record.msg))


# A worker runs the flow through Prefect's engine, which logs the failed flow's exception with its traceback.
logging.getLogger("prefect.flow_runs").addFilter(_OurFailureHasItsLine())
# A transient failure that used up its retries (hub unreachable) is not a bug: its line, without a traceback.
logging.getLogger("prefect.task_runs").addFilter(quiet.NoTracebackWhenTransient())


def fail_cleanly(fn):
    """End the flow run Failed with one line when a stage failed or the config is bad, instead of a traceback.

    The failed stage's own log has the details; the caller of ``sft()`` still gets the exception.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (StageError, ConfigError) as exc:
            get_run_logger().error("%s", failure_message(exc))
            return Failed(message=failure_message(exc), data=exc)

    return wrapper


@flow(name="sft-pipeline")
@fail_cleanly
def sft(recipe: RecipeName = "tiny", overrides: dict[str, OverrideValue] | None = None, store: str | None = None,
        summary_json: str | None = None, recipe_file: str | None = None) -> dict:
    """Fine-tune a causal LM with QLoRA: seven cached stages, then promote the adapter if it is the best so far.

    Args:
        recipe: a built-in recipe: tiny (offline CPU demo), mistral-7b-qlora (the seed notebook), zephyr-7b-qlora.
        overrides: config fields to change, as {"section.key": value}, e.g. {"lora.r": 4, "training.max_steps": 20}.
            The whole config is validated before any stage runs. Secrets are never values: name Prefect Secret
            blocks instead ({"auth.hf_token_block": "my-hf-token"}).
        store: the artifact store directory (default $SFT_PIPELINE_STORE or ~/.cache/sft-pipeline); shared storage
            when workers run on several machines.
        summary_json: also write the run summary to this path.
        recipe_file: a recipe YAML on the machine that runs the flow, used instead of recipe.
    """
    cfg = load_config(recipe_file or recipe, overrides or {})
    st = Store(store or default_store())
    check_paths(str(st.root), summary_json)  # a file, read-only, or someone else's non-empty directory: refused
    preflight.check(cfg, st.root, blocks=True)
    st.clean_tmp()
    record, facts, refs = RunRecord(st, cfg, summary_json), Facts(cfg, store=st), {}
    for stage in STAGES:  # authenticate → data → format → train → evaluate → save_adapter → generate
        refs[stage.name] = record.run(stage, facts, refs)

    metrics, adapter = refs["evaluate"], refs["save_adapter"]
    eval_metrics, train_metrics = metrics.read_json("metrics.json"), refs["train"].read_json("train_metrics.json")
    checked = health.check(_history(refs), eval_metrics)
    promotion = promote.consider(st, cfg.recipe, adapter=adapter, metrics=metrics, chats=refs["format"],
                                 test_split=cfg.data.test_split, flow_run=flow_run.get_id(),
                                 margin=cfg.evaluation.promotion_margin, checked=checked)
    summary = record.write(status="Completed", eval=eval_metrics, adapter=adapter.path,
                           samples=refs["generate"].file("samples.json").as_posix(), train=train_metrics,
                           promotion=promotion, health=checked,
                           **({"wandb": train_metrics["wandb"]} if "wandb" in train_metrics else {}))
    publish(summary, refs)
    get_run_logger().info("adapter: %s; promoted: %s (%s)", adapter.path, promotion["promoted"],
                          promotion["reason"])
    return summary
