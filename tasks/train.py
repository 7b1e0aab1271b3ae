"""Stage 4 — train: QLoRA with trl's SFTTrainer on the token ids of the format stage.

The base model is loaded 4-bit (bitsandbytes nf4, double quant; it works on CPU too; on CUDA kept dequantized when
the measured batch plan leaves the room, ``sft_pipeline/base_weights.py``), LoRA is added by peft,
attention is flash-attn when importable, else SDPA (flex attention for training on CUDA). Trainer checkpoints go to
the stage's work dir (``<store>/.work/train/<key>``) every ``training.save_steps`` steps and every
``training.save_minutes`` minutes, keeping the last ``training.save_total_limit``; a rerun after a crash resumes from
the last complete one (optimizer, scheduler, RNG and data order restored; a checkpoint cut short by a kill is
skipped). CUDA out of memory: training restarts from the last checkpoint at half the micro-batch with twice the
gradient accumulation (same effective batch). A stop requested (``sft_pipeline.training.stop``, SIGTERM) saves a
checkpoint at the current step and raises ``TrainingInterrupted``: no artifact. W&B logs when
``tracking.backend: wandb`` (offline without a key).

The machinery is ``sft_pipeline/training/``; this file is the stage: it builds the ``TrainJob`` once and runs it in
this process or in several (``training.num_processes``; the same training function in each rank).
"""
from __future__ import annotations

import contextlib
import io
import json
from dataclasses import replace

from sft_pipeline.stage import StageContext

VERSION = "2"  # bump for a change the code hash below cannot see
# The code this stage runs, hashed into its key without comments and docstrings (``sft_pipeline.source_hash``):
# editing code here retrains, editing a comment re-runs nothing. Left out: the launcher's process handling
# (``launch``), what the log, the progress bar and the curve files show (``progress``, ``report``, ``health``),
# and the config (its values are in the key).
CODE = ("tasks/train.py", "sft_pipeline/training", "sft_pipeline/rank_train.py", "sft_pipeline/parallel.py",
        "sft_pipeline/varlen.py", "sft_pipeline/base_weights.py",
        "sft_pipeline/models.py:compute_dtype,attn_implementation,flash_attn_2_installed,attn_label,bnb_config,"
        "load_model,hub_kwargs")


@contextlib.contextmanager
def _wandb_run(ctx: StageContext):
    """A W&B run for this training when ``tracking.backend: wandb`` (trl's callback logs into it); yields report_to.

    Settings go to ``wandb.init``, not into ``os.environ``, so nothing is left behind in a served process. A user's
    own ``WANDB_MODE=offline`` (or ``disabled``) wins over the mode chosen from the key.
    """
    tracking = ctx.cfg.tracking
    if tracking.backend != "wandb":
        yield "none", None
        return
    import wandb

    from sft_pipeline.secrets import wandb_mode

    key = ctx.secret("wandb_key")
    mode = wandb_mode(tracking.mode, "key" if key else None)  # a user's own WANDB_MODE wins under auto
    # the run's name and config point back at the Prefect flow run (its name is what the UI lists)
    name = tracking.run_name or f"{ctx.run_label or 'sft'}-{ctx.key[:8]}"
    run = wandb.init(project=tracking.project, name=name, mode=mode, dir=str(ctx.store.work_dir("wandb", ctx.key)),
                     reinit="finish_previous", config={"prefect_flow_run": ctx.run_label, "stage_key": ctx.key},
                     settings=wandb.Settings(api_key=key) if key and mode == "online" else None)
    try:
        yield "wandb", run
    finally:
        run.finish()


def _wandb_links(run, png: bytes) -> dict:
    """Log the loss picture into the W&B run; return where to see it (online) or how to upload it (offline)."""
    import wandb
    from PIL import Image

    run.log({"loss_curve": wandb.Image(Image.open(io.BytesIO(png)))})
    if run.settings.mode == "online" and run.url:
        return {"url": run.url}
    return {"sync_command": f"wandb sync {run.dir.removesuffix('/files')}"}


def run(ctx: StageContext) -> dict:
    from sft_pipeline.launch import multinode_from_env
    from sft_pipeline.parallel import resolve_num_processes

    from sft_pipeline.training import stop

    job = train_job(ctx)
    nproc = resolve_num_processes(job.training.num_processes, job.device, job.training.effective_batch, ctx.log)
    with stop.accepting():  # a SIGTERM now asks for a checkpoint at the current step (training.stop)
        if nproc > 1 or multinode_from_env()["nnodes"] > 1:
            return _train_ranks(ctx, job, nproc)
        return _train_here(ctx, job)


def train_job(ctx: StageContext):
    """Everything this training needs: the format stage's files, the base model, the config sections."""
    from sft_pipeline.training.job import TrainJob

    cfg, chats = ctx.cfg, ctx.upstream["format"]
    return TrainJob.from_config(
        cfg, train=chats.file(f"{cfg.data.train_split}.parquet"),
        eval=chats.file(f"{cfg.data.test_split}.parquet") if cfg.training.eval_strategy != "no" else None,
        tokenizer=chats.file("tokenizer"), model_path=ctx.base_model(), work=ctx.work, out=ctx.out,
        device=ctx.device, run_name=cfg.tracking.run_name or f"sft-{ctx.key[:8]}")


def _train_here(ctx: StageContext, job) -> dict:
    """One process: this one (its W&B run, the progress lines and the UI's progress bar)."""
    from sft_pipeline import report
    from sft_pipeline.progress import Progress
    from sft_pipeline.tokens import planned_tokens
    from sft_pipeline.training.run import save_trained, train_until_done

    progress = Progress(ctx.log, total_tokens=planned_tokens(job.training, job.train))
    with _wandb_run(ctx) as (report_to, wandb_run):
        trainer, metrics = train_until_done(replace(job, report_to=report_to), callbacks=[progress],
                                            token=ctx.hf_token, logger=ctx.log)
        history = trainer.state.log_history
        png = report.loss_png(history)
        if wandb_run is not None:
            metrics["wandb"] = _wandb_links(wandb_run, png)
    save_trained(trainer, metrics, ctx.out)
    _curve_files(ctx.out, history, png)
    return metrics


def _train_ranks(ctx: StageContext, job, nproc: int) -> dict:
    """Several processes (``training.num_processes``): torchrun starts them (``sft_pipeline/launch.py``); rank 0
    writes the adapter, the log history and the metrics into ``ctx.out``."""
    from sft_pipeline import report
    from sft_pipeline.launch import TOKEN_ENV, run_ranks

    token = ctx.hf_token
    metrics = run_ranks(job, nproc, ctx.log, env={TOKEN_ENV: token} if token else None)
    history = json.loads((ctx.out / "log_history.json").read_text())
    _curve_files(ctx.out, history, report.loss_png(history))
    return metrics


def _curve_files(out, history: list[dict], png: bytes) -> None:
    from sft_pipeline import health

    (out / "loss.png").write_bytes(png)
    (out / "health.json").write_text(json.dumps(health.check(history), indent=2))  # the flow adds eval
