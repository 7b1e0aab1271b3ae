"""Stage 4 — train: QLoRA with trl's SFTTrainer on the token ids of the format stage.

The base model is loaded 4-bit (bitsandbytes nf4, double quant; it works on CPU too; on CUDA kept dequantized when
the measured batch plan leaves the room, ``sft_pipeline/base_weights.py``), LoRA is added by peft,
attention is flash-attn when importable, else SDPA (flex attention for training on CUDA). Trainer checkpoints go to
the stage's work dir (``<store>/.work/train/<key>``) every ``training.save_steps`` steps and every
``training.save_minutes`` minutes, keeping the last ``training.save_total_limit``; a rerun after a crash resumes from
the last complete one (optimizer, scheduler, RNG and data order restored; a checkpoint cut short by a kill is
skipped). CUDA out of memory: training restarts from the last checkpoint at half the micro-batch with twice the
gradient accumulation (same effective batch). The machinery is ``sft_pipeline/trainer.py``; this file is the stage.
W&B logs when ``tracking.backend: wandb`` (offline without a key).
"""
from __future__ import annotations

import contextlib
import io
import json

from sft_pipeline.stage import StageContext

VERSION = "2"


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
    import datasets
    from transformers import AutoTokenizer

    from sft_pipeline import health, report
    from sft_pipeline.plan import planned_tokens
    from sft_pipeline.progress import Progress
    from sft_pipeline.trainer import save_trained, train_until_done

    cfg, chats = ctx.cfg, ctx.upstream["format"]
    tok = AutoTokenizer.from_pretrained(str(chats.file("tokenizer")))
    train_ds = datasets.Dataset.from_parquet(str(chats.file(f"{cfg.data.train_split}.parquet")))
    eval_ds = datasets.Dataset.from_parquet(str(chats.file(f"{cfg.data.test_split}.parquet"))) \
        if cfg.training.eval_strategy != "no" else None
    from sft_pipeline.launch import multinode_from_env
    from sft_pipeline.parallel import resolve_num_processes

    nproc = resolve_num_processes(cfg.training.num_processes, ctx.device, cfg.training.effective_batch, ctx.log)
    if nproc > 1 or multinode_from_env()["nnodes"] > 1:
        return _run_ranks(ctx, nproc)
    tokens = planned_tokens(cfg.training, chats.file(f"{cfg.data.train_split}.parquet"))
    progress = Progress(ctx.log, total_tokens=tokens)  # a line per logging step + the UI's progress bar
    with _wandb_run(ctx) as (report_to, wandb_run):
        trainer, metrics = train_until_done(
            train_ds, eval_ds, tok, ctx.base_model(), cfg.model, cfg.quantization, cfg.lora, cfg.training,
            cfg.format.max_length, ctx.work, ctx.device, ctx.hf_token, report_to,
            cfg.tracking.run_name or f"sft-{ctx.key[:8]}", logger=ctx.log, extra_callbacks=[progress])
        history = trainer.state.log_history
        png = report.loss_png(history)
        if wandb_run is not None:
            metrics["wandb"] = _wandb_links(wandb_run, png)
    save_trained(trainer, metrics, ctx.out)
    (ctx.out / "loss.png").write_bytes(png)
    (ctx.out / "health.json").write_text(json.dumps(health.check(history), indent=2))  # the flow adds eval
    return metrics


def _run_ranks(ctx: StageContext, nproc: int) -> dict:
    """Several processes (``training.num_processes``): torchrun starts them (``sft_pipeline/launch.py``); each reads
    only the format stage's files; rank 0 writes the adapter, the log history and the metrics into ``ctx.out``."""
    from sft_pipeline import health, report
    from sft_pipeline.launch import TOKEN_ENV, rank_job, run_ranks

    cfg, chats = ctx.cfg, ctx.upstream["format"]
    job = rank_job(train=chats.file(f"{cfg.data.train_split}.parquet"),
                   eval=chats.file(f"{cfg.data.test_split}.parquet") if cfg.training.eval_strategy != "no" else None,
                   tokenizer=chats.file("tokenizer"), model_path=ctx.base_model(), model=cfg.model,
                   quantization=cfg.quantization, lora=cfg.lora, training=cfg.training,
                   max_length=cfg.format.max_length, work=ctx.work, out=ctx.out, device=ctx.device,
                   run_name=cfg.tracking.run_name or f"sft-{ctx.key[:8]}")
    token = ctx.hf_token
    metrics = run_ranks(job, nproc, ctx.log, env={TOKEN_ENV: token} if token else None)
    history = json.loads((ctx.out / "log_history.json").read_text())
    (ctx.out / "loss.png").write_bytes(report.loss_png(history))
    (ctx.out / "health.json").write_text(json.dumps(health.check(history), indent=2))
    return metrics
