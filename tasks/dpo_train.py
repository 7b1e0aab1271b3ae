"""DPO stage 3 — dpo_train: trl's DPOTrainer on the SFT model, against the SFT model as the reference.

The base model is loaded as the SFT stages load it (4-bit when ``quantization.load_in_4bit``), the SFT adapter
(``save_adapter``'s, the verified one) on top of it, trainable; DPOTrainer keeps a frozen copy of it as the
reference (trl's ``ref`` adapter), so DPO trains the SFT adapter onward and the reference is exactly the SFT model.
Why this and not merging the SFT adapter into the base: ``sft_pipeline/dpo_trainer.py``'s docstring. Checkpoints
are the SFT train stage's sealed ones (``<store>/.work/dpo_train/<key>``, every ``dpo_training.save_steps`` steps
and ``save_minutes`` minutes); a rerun after a kill resumes from the last complete one. CUDA out of memory restarts
from the last checkpoint at half the micro-batch (same effective batch). A line per logging step shows the loss and
the reward accuracy; the Prefect UI gets a progress bar.
"""
from __future__ import annotations

import logging

from sft_pipeline.stage import StageContext

VERSION = "1"  # bump for a change the code hash below cannot see
# The code this stage runs, hashed into its key without comments and docstrings (as the SFT train stage's CODE)
CODE = ("tasks/dpo_train.py", "sft_pipeline/dpo_trainer.py", "sft_pipeline/training/callbacks.py",
        "sft_pipeline/training/checkpoints.py", "sft_pipeline/training/fallback.py",
        "sft_pipeline/models.py:compute_dtype,attn_implementation,flash_attn_2_installed,attn_label,bnb_config,"
        "load_model,hub_kwargs")


class _Named(logging.LoggerAdapter):
    """The progress callback's lines, which say ``train:``, as this stage's (``dpo_train:``)."""

    def process(self, msg, kwargs):
        if isinstance(msg, str) and msg.startswith("train:"):
            msg = "dpo_train:" + msg.removeprefix("train:")
        return msg, kwargs


def _progress(log, total_tokens: int):
    from sft_pipeline.progress import Progress

    class DPOProgress(Progress):
        """``dpo_train: step 10/20 (50%)  loss 0.52 ... reward accuracy 0.81  margin 0.43``."""

        def line(self, state, logs: dict) -> str:
            text = "dpo_train:" + super().line(state, logs).removeprefix("train:")
            if "rewards/accuracies" in logs:
                text += f"  reward accuracy {logs['rewards/accuracies']:.2f}  margin {logs['rewards/margins']:.3g}"
            return text

    return DPOProgress(_Named(log, {}), total_tokens=total_tokens)


def run(ctx: StageContext) -> dict:
    import datasets
    from transformers import AutoTokenizer

    from sft_pipeline import report
    from sft_pipeline.dpo_trainer import planned_tokens, save_trained, train_until_done
    from sft_pipeline.training import stop

    cfg, pairs, sft = ctx.cfg, ctx.upstream["preference_format"], ctx.upstream["save_adapter"]
    tok = AutoTokenizer.from_pretrained(sft.path)  # saved with the SFT adapter: the format stage's, template included
    train_ds = datasets.Dataset.from_parquet(str(pairs.file(f"{cfg.preference_data.train_split}.parquet")))
    tokens = planned_tokens(train_ds, cfg.dpo_training)
    with stop.accepting():  # a SIGTERM now asks for a checkpoint at the current step (training.stop)
        trainer, metrics = train_until_done(
            train_ds, tok, ctx.base_model(), sft.path, cfg.model, cfg.quantization, cfg.dpo_training,
            cfg.preference_format.max_length, ctx.work, ctx.device, ctx.hf_token, run_name=f"dpo-{ctx.key[:8]}",
            logger=_Named(ctx.log, {}), extra_callbacks=[_progress(ctx.log, tokens)], stage=ctx.stage)
    save_trained(trainer, metrics, ctx.out)
    (ctx.out / "rewards.png").write_bytes(report.dpo_png(trainer.state.log_history))
    return metrics
