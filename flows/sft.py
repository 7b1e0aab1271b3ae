"""The fine-tune as one Prefect flow: the stages of ``flows/stages.py``, top to bottom, then promotion.

    authenticate → data → format → train → evaluate → benchmark → save_adapter → generate

Each stage runs as a Prefect task (the UI's graph, retries of transient failures, logs). Whether it computes or
reuses is decided by the artifact store alone (``sft_pipeline/stage.py``): a finished artifact under the stage's key
is reused and the task ends ``Cached``; Prefect keeps no cache records of its own. Only artifact references (path +
fingerprint) go from one stage to the next.

Run it: ``sft-pipeline run --recipe tiny`` (or ``python -m sft_pipeline.cli run ...``); deploy it: ``deployments/``.
"""
# (no ``from __future__ import annotations`` here: Prefect validates a served run's parameters against the real
# annotations of ``sft``; as strings, ``RecipeName`` cannot be resolved and every served run fails)
import functools
import inspect
import json
import logging
import os
import re
import signal
import time
from pathlib import Path
from typing import Any, NoReturn

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import TerminationSignal
from prefect.runtime import flow_run
from prefect.states import Cancelled, Completed, Failed

from flows.stages import STAGES
from sft_pipeline import health, preflight, promote, quiet, report, stop_marks
from sft_pipeline.config import Overrides, PipelineConfig, RecipeName, load_config
from sft_pipeline.errors import (ConfigError, StageError, StageFailure, TrainingInterrupted, failure_message,
                                 is_transient)
from sft_pipeline.models import describe
from sft_pipeline.stage import Facts, Stage, execute, key_parts, stage_key
from sft_pipeline.store import ArtifactRef, Store, check_paths, default_store, write_json_atomic
from sft_pipeline.training import stop

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
def run_stage(stage: Stage, cfg: PipelineConfig, store: Store, upstream: dict[str, ArtifactRef], facts: Facts,
              attempts: Attempts) -> ArtifactRef:
    """One stage as a Prefect task: ``Cached`` when the store had its artifact, ``Completed`` when computed."""
    attempts.count[stage.name] = attempts.count.get(stage.name, 0) + 1
    log = get_run_logger()
    try:
        ref, reused = execute(stage, cfg, store, upstream, facts, log, run_label=flow_run.get_name())
    except (StageFailure, ConfigError) as exc:  # ours: one line, no traceback (a bug still gets Prefect's)
        log.error("%s", failure_message(exc))
        return Failed(message=failure_message(exc), data=exc)
    except TrainingInterrupted as exc:  # SIGTERM: a sealed checkpoint at the current step; the run stops (RunRecord)
        log.warning("%s", exc)
        return Cancelled(message=str(exc))
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
        self.attempt = flow_run.get_run_count() or 1  # 2, 3 ... after a Retry of the same flow run
        self.path = store.root / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json"
        self.push_failed = False

    def run(self, stage: Stage, facts: Facts, refs: dict[str, ArtifactRef], cfg=None) -> ArtifactRef:
        """Run one stage as a task. ``cfg``: the config that stage sees, when not the run's (the DPO flow runs the
        SFT recipe's stages with that recipe's config)."""
        t0 = time.perf_counter()
        task_ = run_stage.with_options(name=stage.name, retries=stage.retries,
                                       retry_delay_seconds=RETRY_DELAYS[: max(stage.retries, 1)])
        # in the UI: the task run named after its stage, the run's recipe and model tags, and as its version the
        # stage's code version (its key's "code" part)
        task_ = task_.with_options(task_run_name=stage.name, tags=_run_tags(self.cfg))
        task_.version = stage.code_version
        self.stages[stage.name] = self._running(stage, facts, refs)
        self.write(status="Running")  # a stop from outside (Cancel) finds the stage, and its work dir, here
        try:
            state = task_(stage, cfg or self.cfg, self.store, {n: refs[n] for n in stage.needs}, facts,
                          self.attempts, return_state=True)
        except (KeyboardInterrupt, TerminationSignal):  # Ctrl-C, or SIGTERM (a Cancel from the UI): the summary
            # says where it stopped; the same command (or Retry) resumes there. A Cancel's hook then says Cancelled.
            self.stages[stage.name] = {**self.stages[stage.name], "state": "Interrupted",
                                       "seconds": round(time.perf_counter() - t0, 2)}
            self.write(status="Interrupted")
            raise
        started = {k: v for k, v in self.stages[stage.name].items() if k == "key"}
        record = self.stages[stage.name] = {"state": state.name, "seconds": round(time.perf_counter() - t0, 2)}
        if stage.name in self.attempts.count:
            record["attempts"] = self.attempts.count[stage.name]
        if state.is_cancelled():  # the train stage stopped on SIGTERM at a checkpoint: the run ends as Prefect ends a
            # run on SIGTERM (a Cancel from the UI, else a crash; the hook ``stopped`` then writes its report)
            record.update(state="Interrupted", error=state.message, **started)  # its key names its checkpoints
            self.write(status="Interrupted")
            _end_stopped_run()
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
        if stop.requested():  # a SIGTERM while training was finishing: this stage is done, the run stops here
            self.write(status="Interrupted")
            _end_stopped_run()
        self.write(status="Running")
        return ref

    def _running(self, stage: Stage, facts: Facts, refs: dict[str, ArtifactRef]) -> dict:
        """The record of a stage that is starting; for the train stage with its key, which names its work dir (the
        checkpoints a Retry resumes from: ``<store>/.work/train/<key>``)."""
        record: dict[str, Any] = {"state": "Running"}
        if stage.name == "train":
            try:
                record["key"] = stage_key(key_parts(stage, self.cfg, {n: refs[n] for n in stage.needs}, facts))
            except Exception:  # noqa: BLE001 - the task computes the key again and reports what failed
                pass
        return record

    def write(self, status: str, **extra) -> dict:
        summary = {"recipe": self.cfg.recipe, "store": self.store.location, "model": describe(self.cfg.model),
                   "flow_run_id": str(flow_run.id), "status": status, "attempt": self.attempt, "stages": self.stages,
                   "config": self.cfg.model_dump(mode="json"), **extra}
        for path in [self.path] + ([Path(self.summary_path)] if self.summary_path else []):
            write_json_atomic(path, summary)
        problem = self.store.push(self.path)  # an object store: one attempt now, the next write tries again
        if problem and not self.push_failed:
            logging.getLogger("sft_pipeline.store").warning("the run summary is not in the object store yet: %s",
                                                            problem)
        self.push_failed = bool(problem)
        return summary


def _end_stopped_run() -> NoReturn:
    """End a run whose training stopped on SIGTERM (``training.stop``: its checkpoint is sealed) as Prefect ends a
    run on SIGTERM. A Cancel from the UI: the worker sent it while training held the SIGTERM handler, so Prefect's
    engine could not take the cancel as its own; once this process is gone the worker runs the cancellation hooks and
    marks the run Cancelled, so exit now, the run's logs sent (143: as SIGTERM's). Any other SIGTERM (``kill``, an
    eviction): Prefect's ``TerminationSignal``, as if its own handler had caught it (a crash; the CLI exits 143)."""
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            cancelling = client.read_flow_run(flow_run.get_id()).state.is_cancelling()
    except Exception:  # noqa: BLE001 - no API to ask (it went away): end as a crash, which the CLI reports
        cancelling = False
    if cancelling:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)
        EventsWorker.drain_all()
        os._exit(143)
    raise TerminationSignal(signal.SIGTERM)


def _artifact_key(kind: str, recipe: str) -> str:
    """Prefect artifact keys allow lower-case letters, digits and dashes: one history per kind and recipe."""
    return f"sft-{kind}-" + (re.sub(r"[^a-z0-9-]+", "-", recipe.lower()).strip("-") or "recipe")


def _history(refs: dict[str, ArtifactRef]) -> list[dict]:
    train = refs.get("train")
    return json.loads(train.file("log_history.json").read_text()) if train else []


def publish(summary: dict, refs: dict[str, ArtifactRef]) -> None:
    """The run's report in the Prefect UI, on every run (one whose stages were all Cached too, and a failed one):
    a markdown report with the loss picture, the loss curve as a table, and the samples.

    The report's description (what the Artifacts page lists in the key's history) is its outcome in one line:
    ``Completed · eval loss 10.37 → 0.8123 · promoted``. The picture and the table add the evaluate stage's eval
    loss to the trainer's log: the base model's at step 0 (before any update), the tuned one's at the last step."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    recipe, history, ev = summary["recipe"], _history(refs), summary.get("eval")
    checked = summary.get("health") or (health.check(history, ev) if history else None)
    png = report.loss_png(history, ev) if history else None  # train/<key>/loss.png plus the evaluate stage's points
    bench = refs.get("benchmark")
    bench_png = bench.file("benchmark.png").read_bytes() if bench and bench.file("benchmark.png").is_file() else None
    create_markdown_artifact(report.markdown(summary, checked, png, bench_png), key=_artifact_key("report", recipe),
                             description=report.outcome(summary))
    if history:
        create_table_artifact(report.loss_rows(history, ev), key=_artifact_key("loss", recipe),
                              description=report.LOSS_TABLE)
    if refs.get("generate"):
        create_markdown_artifact(refs["generate"].file("samples.md").read_text(), key=_artifact_key("samples", recipe),
                                 description="Samples from the base and the tuned model")


def _recipe_of(parameters: dict) -> str:
    """The recipe's name as the report's key and the run's name use it: a recipe file's stem, else the name."""
    return Path(parameters["recipe_file"]).stem if parameters.get("recipe_file") else parameters.get("recipe") or "tiny"


def _publish_markdown(flow_run_id, markdown: str, key: str, description: str) -> None:
    """A markdown artifact of a given flow run, from outside it (a hook in the worker has no run context)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import ArtifactCreate

    with get_client(sync_client=True) as client:
        client.create_artifact(ArtifactCreate(key=key, type="markdown", data=markdown, description=description,
                                              flow_run_id=flow_run_id))


def _report_config_failure(parameters: dict, line: str) -> None:
    """A run refused before any stage (its config, the machine) still leaves its report, naming the field."""
    recipe = _recipe_of(parameters)
    summary = {"recipe": recipe, "status": "Failed", "flow_run_id": str(flow_run.id), "error": line,
               "attempt": flow_run.get_run_count() or 1}
    _tag([f"recipe:{recipe}"])  # the model is not known: the config that names it was refused
    try:
        _publish_markdown(flow_run.get_id(), report.markdown(summary, None, None), _artifact_key("report", recipe),
                          report.outcome(summary))
    except Exception as exc:  # noqa: BLE001 - the run's own failure is what it must end with; this only logs
        get_run_logger().warning("no report artifact for this failure (%s: %s)", type(exc).__name__, exc)


def _newest_summary(root: Path, flow_run_id: str) -> tuple[Path, dict] | None:
    """The newest run summary (``<store>/runs/*.json``) of a flow run: a Retry writes one per attempt."""
    runs = sorted((root / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True) \
        if (root / "runs").is_dir() else []
    for path in runs:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if data.get("flow_run_id") == flow_run_id:
            return path, data
    return None


def stopped(flow, flow_run, state) -> None:  # these names: Prefect passes them by keyword
    """The ``on_cancellation`` and ``on_crashed`` hook: the run summary says ``Cancelled`` (or ``Crashed``), the
    report says where it stopped and what a Retry resumes from, and the progress card says it stopped. A run this
    process stopped itself (Ctrl-C, SIGTERM: the summary already says ``Interrupted``, and Prefect calls it Crashed)
    stays ``Interrupted``, and the same command resumes it.

    Where Prefect 3.9.1 runs it (seen with a process worker): the worker SIGTERMs the flow's process group on a
    Cancel (SIGKILL after 30 s), waits for it to exit, then starts a new process in the run's working directory and
    environment that imports this module and calls the hook (by keyword) with no run context; a run the CLI
    started calls it in its own process. So it reads everything from the store: the summary the flow wrote when
    each stage started (the train stage's with its key) and the train stage's newest sealed checkpoint.
    """
    from prefect.client.orchestration import get_client
    from prefect.logging.loggers import flow_run_logger

    run = flow_run  # the FlowRun object; the module's ``flow_run`` (Prefect's runtime view) is not set here
    params = dict(run.parameters or {})
    # the summaries and the work dir are on this machine (with an object store: in its cache, pushed after)
    st = Store(params.get("store") or default_store(), cache_dir=params.get("cache_dir"),
               block=params.get("store_block") or os.environ.get("SFT_PIPELINE_STORE_BLOCK") or None)
    root = st.root
    found = _newest_summary(root, str(run.id))
    summary = found[1] if found else {"recipe": _recipe_of(params), "flow_run_id": str(run.id), "stages": {},
                                      "attempt": run.run_count or 1}
    how = "Cancelled" if not state.is_crashed() else "Interrupted" if summary.get("status") == "Interrupted" \
        else "Crashed"
    again = "the same command" if how == "Interrupted" else "Retry"
    stages = summary.setdefault("stages", {})
    stage = next((n for n, r in stages.items() if r.get("state") in ("Running", "Interrupted")), None)
    checkpoint = None
    if stage == "train" and stages[stage].get("key"):
        checkpoint = stop_marks.newest_checkpoint(root / ".work" / "train" / stages[stage]["key"])
    if checkpoint:
        resume = f"checkpoint-{checkpoint[0]} kept; {again} resumes from step {checkpoint[0]:,}"
    elif stage == "train":
        resume = f"no checkpoint yet; {again} trains from the start and reuses every finished stage"
    else:
        resume = f"{again} reuses every finished stage"
    summary["status"] = how
    summary["stopped"] = {"how": how, "stage": stage, "resume": resume,
                          **({"checkpoint": str(checkpoint[1]), "step": checkpoint[0]} if checkpoint else {})}
    if stage:
        stages[stage]["state"] = how
    for path in ([found[0]] if found else []) + ([Path(params["summary_json"])] if params.get("summary_json") else []):
        write_json_atomic(path, summary)
    if found:
        st.push(found[0])
    flow_run_logger(run).info("%s%s: %s", how, f" during {stage}" if stage else " before any stage", resume)
    with get_client(sync_client=True) as client:
        stop_marks.mark_stopped(client, run.id, f"{how}: {resume}")
    _publish_markdown(run.id, report.markdown(summary, None, None), _artifact_key("report", summary["recipe"]),
                      report.outcome(summary))


def _run_name() -> str:
    """The flow run's name in the UI's lists: the recipe and the overrides it was given, e.g.
    ``tiny: lora.r=4, training.learning_rate=0.001`` (at most ~100 characters)."""
    params = flow_run.get_parameters()
    parts = [f"{k}={v if isinstance(v, str) else json.dumps(v, separators=(',', ':'))}"
             for k, v in (params.get("overrides") or {}).items()]
    name, shown = _recipe_of(params), []
    for i, part in enumerate(parts):
        if len(", ".join(shown + [part])) > 90:
            shown.append(f"+{len(parts) - i} more")
            break
        shown.append(part)
    return f"{name}: {', '.join(shown)}" if shown else name


def _run_tags(cfg: PipelineConfig) -> list[str]:
    """``recipe:<name>`` and ``model:<name>`` (a hub id's last part, a file's name): the runs list filters on them."""
    model = cfg.model.name.rstrip("/").rsplit("/", 1)[-1].removesuffix(".gguf")
    return [f"recipe:{cfg.recipe}", f"model:{model}"]


def _tag(run_tags: list[str]) -> None:
    """Add the tags to this flow run (a deployment's run was created before its config was known)."""
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run(flow_run.get_id(), tags=sorted(set(flow_run.get_tags()) | set(run_tags)))
    except Exception as exc:  # noqa: BLE001 - tags help find a run; a run does not fail for want of them
        get_run_logger().warning("could not tag the flow run (%s: %s)", type(exc).__name__, exc)


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
            if isinstance(exc, ConfigError):  # refused before any stage: no stage published a report yet
                bound = inspect.signature(fn).bind_partial(*args, **kwargs)
                bound.apply_defaults()
                _report_config_failure(dict(bound.arguments), failure_message(exc))
            return Failed(message=failure_message(exc), data=exc)

    return wrapper


@flow(name="sft-pipeline", flow_run_name=_run_name, on_cancellation=[stopped], on_crashed=[stopped])
@fail_cleanly
def sft(recipe: RecipeName = "tiny", overrides: Overrides = None, store: str | None = None,
        summary_json: str | None = None, recipe_file: str | None = None, cache_dir: str | None = None,
        store_block: str | None = None) -> dict:
    """Fine-tune a causal LM with QLoRA: eight cached stages, then promote the adapter if it is the best so far.

    Args:
        recipe: a built-in recipe: tiny (offline CPU demo, random weights), smollm2-135m (a real pretrained chat
            model, offline), mistral-7b-qlora (the seed notebook, GPU), zephyr-7b-qlora (alignment-handbook's QLoRA
            recipe, GPU).
        overrides: config fields to change, as {"section.key": value}, e.g. {"lora.r": 4, "training.max_steps": 20};
            each field below says what it allows, and a value out of range is refused when the run is created.
            The whole config is validated again before any stage runs. Secrets are never values: name Prefect Secret
            blocks instead ({"auth.hf_token_block": "my-hf-token"}).
        store: the artifact store: a directory, or an object-store URL (s3://bucket/prefix, any fsspec URL) that
            machines share (default $SFT_PIPELINE_STORE or ~/.cache/sft-pipeline).
        summary_json: also write the run summary to this path.
        recipe_file: a recipe YAML on the machine that runs the flow, used instead of recipe.
        cache_dir: with an object store, this machine's copy of it (default $SFT_PIPELINE_CACHE or
            ~/.cache/sft-pipeline/remote/<hash of the URL>).
        store_block: with an object store, a Prefect block holding its credentials (aws-credentials/<name>,
            minio-credentials/<name>, or s3-bucket/<name>, whose bucket and folder are then the store).
    """
    cfg = load_config(recipe_file or recipe, overrides or {})
    store_block = store_block or os.environ.get("SFT_PIPELINE_STORE_BLOCK") or None
    # a file, read-only, someone else's non-empty directory; an unknown scheme, a missing bucket, bad credentials
    check_paths(store, summary_json, cache_dir=cache_dir, block=store_block)
    st = Store(store or ("" if store_block else default_store()), cache_dir=cache_dir, block=store_block)
    preflight.check(cfg, st.root, blocks=True)
    st.clean_tmp()
    _tag(_run_tags(cfg))
    record, facts, refs = RunRecord(st, cfg, summary_json), Facts(cfg, store=st), {}
    stop.clear()  # SIGTERM in training: a checkpoint at the current step, then the run stops (training.stop)
    for stage in STAGES:  # authenticate → data → format → train → evaluate → benchmark → save_adapter → generate
        refs[stage.name] = record.run(stage, facts, refs)

    metrics, adapter = refs["evaluate"], refs["save_adapter"]
    eval_metrics, train_metrics = metrics.read_json("metrics.json"), refs["train"].read_json("train_metrics.json")
    checked = health.check(_history(refs), eval_metrics)
    bench = refs["benchmark"].read_json("metrics.json")
    promotion = promote.consider(st, cfg.recipe, adapter=adapter, metrics=metrics, chats=refs["format"],
                                 test_split=cfg.data.test_split, flow_run=flow_run.get_id(),
                                 margin=cfg.evaluation.promotion_margin, checked=checked,
                                 benchmarks=bench["rows"], max_regression=cfg.benchmark.max_regression)
    summary = record.write(status="Completed", eval=eval_metrics, benchmark=bench, adapter=adapter.path,
                           samples=refs["generate"].file("samples.json").as_posix(), train=train_metrics,
                           promotion=promotion, health=checked,
                           **({"wandb": train_metrics["wandb"]} if "wandb" in train_metrics else {}))
    publish(summary, refs)
    get_run_logger().info("adapter: %s; promoted: %s (%s)", adapter.path, promotion["promoted"],
                          promotion["reason"])
    return Completed(message=report.outcome(summary), data=summary)  # the message: the eval result, in the UI
