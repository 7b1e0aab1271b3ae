"""Preference tuning after SFT as one Prefect flow: the SFT recipe's eight stages, then six DPO stages, then promotion.

    authenticate → data → format → train → evaluate → benchmark → save_adapter → generate   (flows/stages.py)
    → preference_data → preference_format → dpo_train → dpo_evaluate → dpo_save_adapter → dpo_generate
                                                                                      (flows/dpo_stages.py)

The SFT stages are the very rows of the SFT flow, run with the config of the DPO recipe's ``sft_recipe``, so their
keys are exactly a plain SFT run's: after ``sft-pipeline run --recipe smollm2-135m`` they are ``Cached`` here and a DPO
run pays only for what is new. Stages run as Prefect tasks through the SFT flow's machinery (``flows/sft.py``:
``RunRecord``, ``run_stage``, retries, the summary rewritten after every stage, ``fail_cleanly``). The DPO adapter is
promoted (``<store>/promoted/<dpo recipe>.json``) only when it beats the SFT model on held-out preference accuracy.

Run it: ``sft-pipeline run --recipe smollm2-135m-dpo``; deploy it: ``deployments/prefect.yaml`` (``smollm2-135m-dpo``).
"""
# (no ``from __future__ import annotations``: Prefect validates a served run's parameters against the real
# annotations of ``dpo``, as for ``flows/sft.py``'s ``sft``)
import os

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.dpo_stages import DPO_STAGES, DPOStageConfig
from flows.sft import RunRecord, _artifact_key, fail_cleanly, publish, stopped
from flows.stages import STAGES
from sft_pipeline import preference, preflight, promote, report
from sft_pipeline.config import DPORecipeName, OverrideValue, load_dpo_config
from sft_pipeline.stage import Facts
from sft_pipeline.store import ArtifactRef, Store, check_paths, default_store
from sft_pipeline.training import stop


def publish_dpo(summary: dict, refs: dict[str, ArtifactRef]) -> None:
    """The SFT flow's report (``publish``: every stage, the SFT model's loss curve and samples, the promotion), then
    the DPO part: a markdown report with the held-out reward and preference accuracies, the loss and reward-accuracy
    curves, the reward curve as a table, and the SFT vs DPO samples."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    recipe, dpo = summary["recipe"], refs.get("dpo_train")
    publish(summary, refs)
    history = dpo.read_json("log_history.json") if dpo else []
    png = dpo.file("rewards.png").read_bytes() if dpo and dpo.file("rewards.png").is_file() else None
    create_markdown_artifact(report.dpo_markdown(summary, png), key=_artifact_key("dpo-report", recipe),
                             description=f"DPO {recipe}: {summary['status']}")
    if history:
        create_table_artifact(report.dpo_rows(history), key=_artifact_key("dpo-rewards", recipe),
                              description="DPO training: loss, reward accuracy and margins per logging step")
    if refs.get("dpo_generate"):
        create_markdown_artifact(refs["dpo_generate"].file("samples.md").read_text(),
                                 key=_artifact_key("dpo-samples", recipe), description="Samples: SFT vs DPO")


@flow(name="sft-pipeline-dpo", on_cancellation=[stopped], on_crashed=[stopped])
@fail_cleanly
def dpo(recipe: DPORecipeName = "smollm2-135m-dpo", overrides: dict[str, OverrideValue] | None = None,
        store: str | None = None, summary_json: str | None = None, recipe_file: str | None = None,
        cache_dir: str | None = None, store_block: str | None = None) -> dict:
    """Align the SFT model with DPO: the SFT recipe's stages (reused when cached), six DPO stages, then promote.

    Args:
        recipe: a built-in DPO recipe: smollm2-135m-dpo (offline CPU), zephyr-7b-dpo-qlora (the handbook's 7B),
            tiny-dpo (random weights, for tests).
        overrides: fields to change, as {"section.key": value}: a DPO section ({"dpo_training.beta": 0.05}) or one
            of the SFT recipe's ({"training.max_steps": 20}: its stages then key on it). Validated before any stage.
        store: the artifact store: a directory, or an object-store URL (s3://bucket/prefix, any fsspec URL) that
            machines share (default $SFT_PIPELINE_STORE or ~/.cache/sft-pipeline).
        summary_json: also write the run summary to this path.
        recipe_file: a DPO recipe YAML on the machine that runs the flow, used instead of recipe.
        cache_dir: with an object store, this machine's copy of it (as for the SFT flow).
        store_block: with an object store, a Prefect block holding its credentials (as for the SFT flow).
    """
    cfg = load_dpo_config(recipe_file or recipe, overrides or {})
    sft_cfg, view = cfg.sft, DPOStageConfig(cfg)
    store_block = store_block or os.environ.get("SFT_PIPELINE_STORE_BLOCK") or None
    check_paths(store, summary_json, cache_dir=cache_dir, block=store_block)
    st = Store(store or ("" if store_block else default_store()), cache_dir=cache_dir, block=store_block)
    preflight.check(sft_cfg, st.root, blocks=True)
    preference.check(cfg)
    st.clean_tmp()
    record, refs = RunRecord(st, view, summary_json), {}
    stop.clear()  # SIGTERM in training: a checkpoint at the current step, then the run stops (training.stop)
    # ---- the SFT recipe's stages, keyed exactly as a plain run of it: Cached when it ran before
    sft_facts = Facts(sft_cfg, store=st)
    for stage in STAGES:
        refs[stage.name] = record.run(stage, sft_facts, refs, cfg=sft_cfg)
    # ---- the DPO stages: preference data → format → train → evaluate → save adapter → generate
    for stage in DPO_STAGES:  # their keyed facts: the base model's fingerprint, the SFT recipe's model
        refs[stage.name] = record.run(stage, sft_facts, refs)
        if stage.name == "preference_data":  # pairs kept and dropped per reason, for the summary's last lines
            record.stages[stage.name]["splits"] = refs[stage.name].read_json("stats.json")["splits"]

    metrics, adapter = refs["dpo_evaluate"].read_json("metrics.json"), refs["dpo_save_adapter"]
    train_metrics = refs["dpo_train"].read_json("train_metrics.json")
    promotion = promote.consider_dpo(st, cfg.recipe, adapter=adapter, metrics=refs["dpo_evaluate"],
                                     pairs=refs["preference_format"], test_split=cfg.preference_data.test_split,
                                     flow_run=flow_run.get_id(), margin=cfg.dpo_evaluation.promotion_margin)
    summary = record.write(status="Completed", sft={"recipe": sft_cfg.recipe, "adapter": refs["save_adapter"].path,
                                                    "eval": refs["evaluate"].read_json("metrics.json")},
                           dpo_eval=metrics, dpo_train=train_metrics, adapter=adapter.path,
                           samples=refs["dpo_generate"].file("samples.json").as_posix(), promotion=promotion)
    publish_dpo(summary, refs)
    get_run_logger().info("DPO adapter: %s; promoted: %s (%s)", adapter.path, promotion["promoted"],
                          promotion["reason"])
    return summary
