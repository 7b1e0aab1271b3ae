"""The fine-tune as one Prefect flow: seven cached stages, top to bottom.

    authenticate → download & subset → format → train → evaluate → save adapter → generate

Each stage is a task in ``tasks/`` that takes the config sections it reads and its upstream artifacts
(path + fingerprint) and returns its own artifact; its cache key is built from exactly those, so a rerun skips
every finished stage and ``--set lora.r=4`` re-runs only train → generate.

Run it: ``sft-pipeline run --recipe tiny`` (or ``python -m flows.sft run ...``); deploy it: ``deployments/``.
"""

import functools
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import Failed

from sft_pipeline import preflight, promote, secrets
from sft_pipeline.caching import attempts, bind_store
from sft_pipeline.config import ConfigError, OverrideValue, PipelineConfig, RecipeName, load_config
from sft_pipeline.errors import failure_message
from sft_pipeline.models import describe, model_fingerprint
from sft_pipeline.store import WRITER_ID, ArtifactRef, Store, default_store
from tasks.authenticate import authenticate
from tasks.download import download_data, source_fingerprint
from tasks.evaluate import evaluate
from tasks.format import format_chats
from tasks.generate import generate
from tasks.save_adapter import save_adapter
from tasks.train import train


class StageRunner:
    """Runs stages in order on one store and records each one's state, seconds and artifact for the summary.

    The summary is rewritten after every stage (status ``Running``), so a killed run still says what it finished.
    A stage whose finished artifact was found in the store (written by another run, or by a run killed before
    Prefect recorded it) counts as ``Cached``, like one Prefect found in its own cache.
    """

    def __init__(self, store: Store, cfg: PipelineConfig, summary_path: str | None):
        self.store, self.cfg, self.summary_path = store, cfg, summary_path
        self.stages: dict[str, dict[str, Any]] = {}
        self.run_file = store.root / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json"

    def __call__(self, stage, **inputs) -> ArtifactRef:
        t0 = time.perf_counter()
        state = bind_store(stage, self.store.root)(store=str(self.store.root), **inputs, return_state=True)
        record = {"state": state.name, "seconds": round(time.perf_counter() - t0, 2)}
        if tries := attempts(state.state_details.task_run_id):
            record["attempts"] = tries
        self.stages[stage.name] = record
        if not state.is_completed():
            record["state"] = "Failed"
            try:
                state.result()
            except BaseException as exc:  # noqa: BLE001 - reported in the summary, then re-raised
                record["error"] = failure_message(exc)
                self.write_summary(failed=stage.name)
                exc.sft_stage = stage.name  # for the flow's one-line failure (see fail_cleanly)
                raise
        ref: ArtifactRef = state.result()
        record["artifact"] = ref.path
        writer = self.store.manifest(ref).get("writer")
        if record["state"] == "Completed" and writer and writer != WRITER_ID:
            record.update(state="Cached", reused=f"finished artifact written by {writer}")
        self.write_summary(running=True)
        return ref

    def write_summary(self, failed: str | None = None, running: bool = False, **extra) -> dict:
        status = "Failed" if failed else "Running" if running else "Completed"
        summary = {"recipe": self.cfg.recipe, "store": str(self.store.root), "model": describe(self.cfg.model),
                   "flow_run_id": str(flow_run.id), "status": status, "stages": self.stages,
                   "config": self.cfg.model_dump(mode="json"), **extra}
        paths = [self.run_file]
        if self.summary_path:
            paths.append(Path(self.summary_path))
        for p in paths:
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(summary, indent=2, default=str))
            os.replace(tmp, p)
        return summary


def stages(cfg: PipelineConfig, run: Callable[..., ArtifactRef]) -> dict[str, ArtifactRef]:
    """The seven stages, top to bottom. ``run(stage, **inputs)`` runs one (``sft-pipeline plan`` predicts it)."""
    base = model_fingerprint(cfg.model)
    found = {"hf_token": secrets.resolve(cfg.auth.hf_token_env, cfg.auth.hf_token_block)[1],
             "wandb_key": secrets.resolve(cfg.auth.wandb_key_env, cfg.auth.wandb_key_block)[1]
             if cfg.tracking.backend == "wandb" else None}
    splits = [cfg.data.train_split, cfg.data.test_split]

    auth = run(authenticate, auth=cfg.auth, model=cfg.model, data=cfg.data, tracking=cfg.tracking, found=found)
    data = run(download_data, data=cfg.data, source=source_fingerprint(cfg.data), auth=auth)
    if isinstance(run, StageRunner):  # rows kept, invalid rows per reason, in the summary
        run.stages["data"]["splits"] = data.read_json("stats.json")["splits"]
    chats = run(format_chats, data=data, splits=splits, model=cfg.model, base=base, fmt=cfg.format, auth=auth)
    tuned = run(train, chats=chats, train_split=splits[0], test_split=splits[1], model=cfg.model, base=base,
                model_settings={"attn_implementation": cfg.model.attn_implementation},
                quantization=cfg.quantization, lora=cfg.lora, training=cfg.training,
                max_length=cfg.format.max_length, auth=auth, tracking=cfg.tracking)
    metrics = run(evaluate, tuned=tuned, chats=chats, test_split=splits[1], model=cfg.model, base=base,
                  quantization=cfg.quantization, evaluation=cfg.evaluation,
                  training=cfg.training, auth=auth)
    adapter = run(save_adapter, tuned=tuned, metrics=metrics, chats=chats, model=cfg.model, base=base,
                  quantization=cfg.quantization, training=cfg.training, dataset=cfg.data.dataset,
                  recipe=cfg.recipe, auth=auth)
    samples = run(generate, adapter=adapter, model=cfg.model, base=base, quantization=cfg.quantization,
                  generation=cfg.generation, training=cfg.training, auth=auth)
    return {"authenticate": auth, "data": data, "format": chats, "train": tuned, "evaluate": metrics,
            "save_adapter": adapter, "generate": samples}



def fail_cleanly(fn):
    """End the flow run Failed with one line when a stage failed or the config is bad, instead of a traceback.

    The failed stage's own log has the details; the caller of ``sft()`` still gets the exception.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - only ours are turned into a Failed state
            if getattr(exc, "sft_stage", None) is None and not isinstance(exc, ConfigError):
                raise
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
    preflight.check(cfg)
    st = Store(store or default_store())
    st.clean_tmp()
    run = StageRunner(st, cfg, summary_json)
    out = stages(cfg, run)
    metrics, adapter, samples, tuned = out["evaluate"], out["save_adapter"], out["generate"], out["train"]
    promotion = promote.consider(st, cfg.recipe, adapter=adapter, metrics=metrics, chats=out["format"],
                                 test_split=cfg.data.test_split, flow_run=flow_run.get_id())
    summary = run.write_summary(eval=metrics.read_json("metrics.json"), adapter=adapter.path,
                                samples=samples.file("samples.json").as_posix(),
                                train=tuned.read_json("train_metrics.json"), promotion=promotion)
    get_run_logger().info("adapter: %s; promoted: %s (%s)", adapter.path, promotion["promoted"],
                          promotion["reason"])
    return summary


if __name__ == "__main__":
    from sft_pipeline.cli import main

    main()
