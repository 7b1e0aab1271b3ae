"""Building and running trl's DPOTrainer on the SFT adapter: its reference, sealed checkpoints, resume, OOM fallback.

Shared by the dpo_train stage (``tasks/dpo_train.py``) and the benchmark (``bench/dpo.py``). Nothing here knows about
the store or Prefect.

**Which model DPO trains, and against which reference.** trl 1.16 offers two documented ways to start DPO from a
LoRA-tuned (QLoRA) SFT model; its ``model_adapter_name`` / ``ref_adapter_name`` arguments are gone:

(a) pass the SFT model as a ``PeftModel`` (the base with the SFT adapter loaded trainable): DPOTrainer copies the
    adapter into a frozen adapter named ``ref`` and computes the reference log-probabilities with it, so DPO trains
    the SFT adapter itself onward; (b) merge the SFT adapter into the base, save that model, and train a new adapter
    on it with the adapter-disabled model as the reference (what DPOTrainer's error asks for when it gets a
    ``PeftModel`` and a ``peft_config`` together, which the alignment-handbook's ``run_dpo.py`` passes).

This project takes **(a)**. The reference is then exactly the SFT model that the SFT stages evaluated and saved
(the 4-bit base plus the SFT adapter), where (b) would merge LoRA's update into nf4 weights and round it away in
the requantization, so DPO would start from, and be measured against, a slightly different model. (a) stores no
merged copy of the base (14 GB for a 7B in bf16) and its DPO adapter loads with plain peft on the very base the SFT
adapter loads on. Its cost: DPO keeps the SFT adapter's LoRA shape (rank, target modules); the handbook's
zephyr-7b-dpo-qlora uses the same r16/α16/all-linear as its SFT, so nothing is lost there. The reference pass runs
the same 4-bit base with the other adapter: no second copy of the model in memory.

trl 1.16's DPO pads its batches (its padding-free path is switched off), so attention is SDPA (flash-attn 2 when
installed), not the packed kernels of the SFT train stage. The rows come tokenized from the preference_format stage:
``PreTokenized`` keeps them as they are instead of letting DPOTrainer template and tokenize again.
"""
from __future__ import annotations

import gc
import json
import logging
from pathlib import Path

from sft_pipeline import faults
from sft_pipeline.errors import StageFailure, TrainingInterrupted, is_oom
from sft_pipeline.training import fallback, stop
from sft_pipeline.training.callbacks import Checkpoint, Throughput
from sft_pipeline.training.checkpoints import last_checkpoint, resumable

log = logging.getLogger("sft_pipeline.dpo_train")
REF_ADAPTER = "ref"  # the name DPOTrainer gives its frozen copy of the adapter it was given


def _pretokenized(trainer_cls):
    class PreTokenized(trainer_cls):
        """DPOTrainer on rows that already have ``prompt_ids``, ``chosen_ids`` and ``rejected_ids`` (the
        preference_format stage's): they are used as they are, not templated and tokenized a second time."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(dataset.column_names):
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    return PreTokenized


def _fault(stage: str):
    from transformers import TrainerCallback

    class Fault(TrainerCallback):
        """Test-only fault point ``<stage>:step=N`` (after N steps and their checkpoint); off by default."""

        def on_step_begin(self, args, state, control, **kw):
            faults.point(stage, f"step={state.global_step}")

    return Fault()


def planned_tokens(train_ds, dpo) -> int:
    """Tokens a run trains on (what tok/s counts): each pair is two sequences, prompt + chosen and prompt +
    rejected; all pairs times the epochs, or fewer when ``max_steps`` stops first."""
    per_pair = [2 * len(p) + len(c) + len(r) for p, c, r in zip(train_ds["prompt_ids"], train_ds["chosen_ids"],
                                                                train_ds["rejected_ids"])]
    tokens = sum(per_pair) * dpo.epochs
    if dpo.max_steps > 0 and per_pair:
        effective = dpo.per_device_batch_size * dpo.gradient_accumulation_steps
        tokens = min(tokens, dpo.max_steps * effective * sum(per_pair) / len(per_pair))
    return int(tokens)


def build_dpo_trainer(train_ds, tok, model_path: str, sft_adapter: str | Path, model, quantization, dpo,
                      max_length: int, output_dir: str, device: str, token: str | None = None,
                      report_to: str = "none", run_name: str | None = None, extra_callbacks: list | None = None,
                      batch: dict | None = None, stage: str = "dpo_train"):
    """The DPOTrainer for the SFT model: the base (4-bit when configured) with the SFT adapter trainable, and its
    frozen copy as the reference. Returns (trainer, metrics dict filled by training).

    ``batch`` (micro-batch, accumulation) replaces the recipe's: an out-of-memory fallback's.
    """
    import torch
    from peft import PeftModel, prepare_model_for_kbit_training
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    from sft_pipeline.models import attn_label, load_model

    plan = {"per_device_batch_size": dpo.per_device_batch_size,
            "gradient_accumulation_steps": dpo.gradient_accumulation_steps, **(batch or {})}
    plan["effective_batch"] = plan["per_device_batch_size"] * plan["gradient_accumulation_steps"]
    base = load_model(model_path, model, quantization, device, token)  # padded batches: SDPA or flash-attn 2
    base.config.use_cache = False
    if quantization.load_in_4bit and device == "cpu":  # as the SFT train stage does (fp32 on CPU anyway)
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=dpo.gradient_checkpointing,
                                               gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = PeftModel.from_pretrained(base, str(sft_adapter), is_trainable=True)
    bf16 = device == "cuda" and base.dtype == torch.bfloat16
    args = DPOConfig(
        output_dir=output_dir, max_length=max_length, beta=dpo.beta, loss_type=[dpo.loss_type],
        num_train_epochs=dpo.epochs, max_steps=dpo.max_steps,
        per_device_train_batch_size=plan["per_device_batch_size"],
        per_device_eval_batch_size=plan["per_device_batch_size"],
        gradient_accumulation_steps=plan["gradient_accumulation_steps"],
        gradient_checkpointing=dpo.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if dpo.gradient_checkpointing else None,
        learning_rate=dpo.learning_rate, lr_scheduler_type=dpo.lr_scheduler,
        warmup_steps=dpo.warmup_ratio,  # a float < 1 is a ratio
        weight_decay=dpo.weight_decay, max_grad_norm=dpo.max_grad_norm, optim=dpo.optim, seed=dpo.seed,
        data_seed=dpo.seed, bf16=bf16, fp16=device == "cuda" and base.dtype == torch.float16,
        use_cpu=device == "cpu", logging_steps=dpo.logging_steps, save_strategy="steps", save_steps=dpo.save_steps,
        save_total_limit=dpo.save_total_limit, report_to=report_to, run_name=run_name,
        include_num_input_tokens_seen="non_padding", disable_tqdm=True, dataloader_num_workers=0,
    )
    metrics: dict = {"batch_plan": plan, "device": device, "optim": dpo.optim,
                     "attn_implementation": attn_label(base.config._attn_implementation),
                     "reference": "the SFT adapter (a frozen copy, trl's 'ref' adapter)"}
    # the SFT train stage's callbacks: sealed checkpoints (by steps, minutes and on a stop request), tokens/s
    checkpoint, throughput = Checkpoint(dpo.save_minutes), Throughput(dpo, metrics, planned_tokens(train_ds, dpo))
    trainer = resumable(_pretokenized(DPOTrainer))(
        model=policy, ref_model=None, args=args, train_dataset=train_ds, processing_class=tok,
        callbacks=[checkpoint, throughput, _fault(stage), *(extra_callbacks or [])])
    if REF_ADAPTER not in trainer.model.peft_config:  # trl's contract this module relies on: say so, loudly
        raise RuntimeError(f"DPOTrainer made no frozen {REF_ADAPTER!r} copy of the SFT adapter (trl changed?)")
    trainer.remove_callback(PrinterCallback)  # raw per-step dicts on stdout; sft_pipeline.progress logs one line
    log.info("dpo training settings: %s", json.dumps({k: metrics[k] for k in ("batch_plan", "optim",
                                                                               "attn_implementation")}))
    return trainer, metrics


def train_until_done(train_ds, tok, model_path: str, sft_adapter: str | Path, model, quantization, dpo,
                     max_length: int, work: Path, device: str, token: str | None = None, report_to: str = "none",
                     run_name: str | None = None, logger: logging.Logger | logging.LoggerAdapter = log,
                     extra_callbacks: list | None = None, stage: str = "dpo_train"):
    """Train to the end, resuming from the last sealed checkpoint in ``work``; returns (trainer, metrics).

    CUDA out of memory: restart from the last checkpoint at half the micro-batch and twice the accumulation (the
    same effective batch), down to 1: the SFT train stage's fallback (``training.fallback``), saved in ``work`` for
    reruns. A stop request (``training.stop``, SIGTERM): a sealed checkpoint at the current step, then
    ``TrainingInterrupted``.
    """
    def attempt(batch):
        if stop.requested():  # asked before the first step: nothing new to save
            last = last_checkpoint(work, logger)
            raise TrainingInterrupted(int(last.rsplit("-", 1)[1]) if last else None, last, stop.requested())
        trainer, metrics = build_dpo_trainer(train_ds, tok, model_path, sft_adapter, model, quantization, dpo,
                                             max_length, str(work), device, token, report_to, run_name,
                                             extra_callbacks, batch, stage)
        try:
            result = trainer.train(resume_from_checkpoint=last_checkpoint(work, logger))
        except Exception as exc:  # noqa: BLE001 - only out of memory is handled here
            if not is_oom(exc):
                raise
            error, step, plan = f"{type(exc).__name__}: {exc}", trainer.state.global_step, metrics["batch_plan"]
            trainer.accelerator.free_memory()
            del trainer
            _collect()
            raise fallback.OutOfMemory(step, plan, error) from None
        ckpt = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, Checkpoint))
        if ckpt.stopped_at is not None:
            raise TrainingInterrupted(ckpt.stopped_at, str(Path(work) / f"checkpoint-{ckpt.stopped_at}"),
                                      stop.requested() or "stop requested")
        metrics.update(result.metrics)
        metrics["resumed_from_step"] = metrics.get("start_step", 0)
        metrics["oom_fallbacks"] = (batch or {}).get("oom_fallbacks", [])
        metrics.update({k: metrics["batch_plan"][k] for k in ("per_device_batch_size", "gradient_accumulation_steps",
                                                              "effective_batch")})
        return trainer, metrics

    try:
        return fallback.until_done(attempt, work, 1, logger)
    except StageFailure as exc:  # the fallback's message names the SFT train stage's fields
        if "per_device_batch_size=1" not in str(exc):
            raise
        raise StageFailure(f"{stage}: out of memory at dpo_training.per_device_batch_size=1; lower "
                           "preference_format.max_length, turn on dpo_training.gradient_checkpointing, or use a "
                           "bigger GPU") from None


def _collect() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def save_trained(trainer, metrics: dict, out: Path) -> None:
    """The trained adapter alone (not trl's frozen reference copy), the log history and the metrics, into ``out``."""
    trainer.model.save_pretrained(str(out / "adapter"), selected_adapters=["default"])
    (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    (out / "train_metrics.json").write_text(json.dumps(metrics, indent=2))
    args_public = {k: v for k, v in trainer.args.to_dict().items() if "token" not in k}
    (out / "training_args.json").write_text(json.dumps(args_public, indent=1, default=str))
