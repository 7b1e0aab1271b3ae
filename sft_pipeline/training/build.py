"""The SFTTrainer of one training, built from a ``TrainJob`` in named steps: the model, the batch plan the trainer
starts with, the trainer, LoRA's glue, the measured plan, what the log shows.

What each speed lever gave alone: BENCHMARKS.md (the "Issue 14" sections).
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import NamedTuple

from sft_pipeline import base_weights, how_it_ran, varlen
from sft_pipeline.training import batch as batch_plan
from sft_pipeline.training.batch import BatchPlan
from sft_pipeline.training.job import Rank, TrainData, TrainJob

log = logging.getLogger("sft_pipeline.train")

# The speed levers (``job.speed`` changes entries; the benchmarks turn them one by one):
# plan: "measure" (a real step's peak memory decides the micro-batch) or "estimate" (a constant per token);
# head: the LM head and loss (``loss.fast_loss``; auto: liger with Liger kernels, else lean);
# compile: regional torch.compile of the decoder layers; cap: the largest micro-batch the measured plan may pick;
# warm: compile flex attention's mask for two small lengths before the first step when no plan is measured
# (``cuda.warm_masks``); workers: data-loader processes collating the next micro-batches (CUDA only; 0 = in the
# training process); lora_add: "addmm" (``lora.fuse_lora_add``) or "peft" (peft's own forward);
# lora_a: "fused" (``lora.fuse_lora_a``; needs addmm and one dropout mask per input) or "per-module";
# base: "auto" (a 4-bit base kept dequantized where the measured plan leaves room: ``base_weights``; one process
# only) or "4bit"; attention: the kernel under varlen attention, "auto" (flash-attention 4 where installed and
# checked, else PyTorch's: ``varlen``) or "torch". How LoRA dropout draws its masks is the recipe's
# lora.shared_dropout.
SPEED = {"plan": "measure", "head": "auto", "compile": False, "cap": batch_plan.MICRO_CAP, "warm": True,
         "workers": 0, "lora_add": "addmm", "lora_a": "fused", "base": "auto", "attention": "auto"}


class Choices(NamedTuple):
    liger: bool
    head: str
    optim: str


def build_trainer(job: TrainJob, data: TrainData, rank: Rank = Rank(), *, batch: dict | None = None,
                  callbacks=(), token: str | None = None):
    """The SFTTrainer this job runs, with its speed settings. Returns (trainer, metrics dict filled by training).

    ``batch`` (micro-batch, accumulation) replaces the planned one: an out-of-memory fallback's. Several ranks:
    ``rank.world`` splits the effective batch, ``rank.local_rank`` is this rank's GPU; every rank measures its own
    plan for its share and all take the most cautious one. ``token``: the HF token for a hub model.
    """
    import torch

    from sft_pipeline.parallel import parallel_args

    speed = {**SPEED, **(job.speed or {})}
    training = job.training
    parallel = parallel_args(training.strategy, training.collective_timeout_minutes, rank.world, job.device)
    model = _model(job, speed, rank, parallel, token)
    measure = job.device == "cuda" and training.auto_batch and not batch and speed["plan"] == "measure"
    free = torch.cuda.mem_get_info()[0] if job.device == "cuda" else None
    plan = batch_plan.first_plan(training, model.config, job.max_length, free, measure=measure, world=rank.world,
                                 lowered=batch)
    model = _prepare_4bit(job, model, plan)
    choices = _choices(job, speed, parallel)
    args = _sft_config(job, plan, choices, speed, parallel, model)
    metrics = _metrics(job, model, choices, speed)
    trainer = _trainer(job, data, model, args, choices.head, metrics, callbacks)
    layers = _decoder_layers(trainer)
    _glue(trainer, job, speed, parallel, layers, choices.liger, args, metrics)
    attention = model.config._attn_implementation
    plan = _plan_from_the_trainer(trainer, job, speed, plan, layers, measure, rank, metrics, attention)
    _finish(trainer, plan, layers, metrics, attention)
    return trainer, metrics


def _model(job: TrainJob, speed: dict, rank: Rank, parallel: dict, token: str | None):
    """The base model on this process's device, its CUDA settings applied first, no KV cache."""
    from sft_pipeline.models import load_model
    from sft_pipeline.training import cuda

    if job.device == "cuda":
        cuda.expandable_segments()
        varlen.use_kernel(speed["attention"])
    model = load_model(job.model_path, job.model, job.quantization, job.device, token, training=True,
                       device_index=rank.local_rank, quant_storage="fsdp" in parallel, packed=job.training.packing)
    # no KV cache in training: with a cache, transformers ignores packed position_ids and attends across examples
    model.config.use_cache = False
    return model


def _prepare_4bit(job: TrainJob, model, plan: BatchPlan):
    if not (job.quantization.load_in_4bit and job.device == "cpu"):
        return model
    from peft import prepare_model_for_kbit_training

    # fp32 on CPU anyway; on CUDA this would upcast the frozen bf16 norms/embeddings/lm_head to fp32 (slower)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=plan.gradient_checkpointing,
                                           gradient_checkpointing_kwargs={"use_reentrant": False})


def _choices(job: TrainJob, speed: dict, parallel: dict) -> Choices:
    """Liger kernels, the LM head, the optimizer (fused AdamW on CUDA)."""
    from sft_pipeline.training import cuda

    device, training = job.device, job.training
    optim = "adamw_torch_fused" if device == "cuda" and training.optim == "adamw_torch" else training.optim
    liger = cuda.use_liger(training, device)
    if liger:
        cuda.pin_liger_triton()
    head = speed["head"] if speed["head"] != "auto" else ("liger" if liger else "lean") if device == "cuda" else "trl"
    if head == "liger" and "fsdp" in parallel:  # FSDP holds the head's weight sharded outside its forward
        head = "lean"
    return Choices(liger, head, optim)


def _sft_config(job: TrainJob, plan: BatchPlan, choices: Choices, speed: dict, parallel: dict, model):
    import torch
    from trl import SFTConfig

    training, device, liger = job.training, job.device, choices.liger
    cuda = device == "cuda"
    return SFTConfig(
        output_dir=job.work, max_length=job.max_length, packing=training.packing,
        num_train_epochs=training.epochs, max_steps=training.max_steps,
        per_device_train_batch_size=plan.per_device_batch_size, per_device_eval_batch_size=plan.per_device_batch_size,
        gradient_accumulation_steps=plan.gradient_accumulation_steps,
        gradient_checkpointing=plan.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if plan.gradient_checkpointing else None,
        learning_rate=training.learning_rate, lr_scheduler_type=training.lr_scheduler,
        warmup_steps=training.warmup_ratio, weight_decay=training.weight_decay,  # a float < 1 is a ratio
        max_grad_norm=training.max_grad_norm, optim=choices.optim, seed=training.seed, data_seed=training.seed,
        bf16=cuda and model.dtype == torch.bfloat16, fp16=cuda and model.dtype == torch.float16,
        use_cpu=device == "cpu", logging_steps=training.logging_steps,
        save_strategy="steps", save_steps=training.save_steps, save_total_limit=training.save_total_limit,
        eval_strategy=training.eval_strategy, eval_steps=training.eval_steps,
        report_to=job.report_to, run_name=job.run_name, include_num_input_tokens_seen=True, use_liger_kernel=liger,
        dataloader_num_workers=speed["workers"] if cuda else 0,
        dataloader_persistent_workers=bool(speed["workers"]) and cuda, disable_tqdm=True,
        **parallel,
        # compiled decoder layers fuse norms, rotary and SwiGLU themselves, and Dynamo cannot trace Liger's
        # autograd functions inside them: Liger keeps the head
        liger_kernel_config={"rms_norm": False, "rope": False, "swiglu": False} if liger and speed["compile"] else None,
    )


def _metrics(job: TrainJob, model, choices: Choices, speed: dict) -> dict:
    """What train_metrics.json says about how it trained (the callbacks and ``run`` add the rest)."""
    from sft_pipeline.models import attn_label

    return {"batch_plan": None, "liger": choices.liger, "optim": choices.optim, "device": job.device,
            "attn_implementation": attn_label(model.config._attn_implementation), "head": choices.head,
            "compile": bool(speed["compile"])}


def _trainer(job: TrainJob, data: TrainData, model, args, head: str, metrics: dict, callbacks):
    from peft import LoraConfig
    from trl import SFTTrainer

    from sft_pipeline.training.callbacks import standard
    from sft_pipeline.training.checkpoints import resumable
    from sft_pipeline.training.loss import fast_loss

    lora = job.lora
    peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias=lora.bias,
                             target_modules=lora.target_modules, modules_to_save=lora.modules_to_save or None,
                             task_type="CAUSAL_LM")
    # what the estimate covers: the run, not only an epoch
    tokens = job.training.planned_tokens([min(n, job.max_length) for n in map(len, data.train["input_ids"])])
    return fast_loss(resumable(SFTTrainer), head)(
        model=model, args=args, train_dataset=data.train, eval_dataset=data.eval, processing_class=data.tokenizer,
        peft_config=peft_config, callbacks=standard(job.training, metrics, tokens) + list(callbacks))


def _decoder_layers(trainer):
    base = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    return base.model.layers


def _glue(trainer, job: TrainJob, speed: dict, parallel: dict, layers, liger: bool, args, metrics: dict) -> None:
    """Liger's kernels, LoRA's cheaper glue and regional compile, on the built trainer's model."""
    from sft_pipeline.training import cuda, lora

    if liger:  # Trainer applies these at train start; now already, so that the memory probe runs the same kernels
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=trainer.model.get_base_model(), **args.liger_kernel_config)
    if job.lora.shared_dropout:
        metrics["shared_dropout_modules"] = lora.share_dropout(layers)
    addmm, fused_a = lora.lora_glue(speed, parallel)
    if addmm:
        metrics["addmm_lora_modules"] = lora.fuse_lora_add(trainer.model)
    if fused_a:
        metrics["fused_lora_a_modules"] = lora.fuse_lora_a(layers, job.lora.shared_dropout)
    if speed["compile"]:
        cuda.compile_layers(layers)


def _plan_from_the_trainer(trainer, job: TrainJob, speed: dict, plan: BatchPlan, layers, measure: bool,
                           rank: Rank, metrics: dict, attention: str) -> BatchPlan:
    """The plan measured on this trainer (CUDA), the base kept dequantized where it leaves room, agreed by the
    ranks, and set on the trainer."""
    from sft_pipeline.training import cuda

    if measure:
        plan = batch_plan.measured(trainer, job.training, job.max_length, len(layers), speed["cap"], rank.world)
        extra = base_weights.extra_bytes(trainer.model) if speed["base"] == "auto" and rank.world == 1 else 0
        if base_weights.room_for(plan, extra):
            metrics["dequantized_modules"] = base_weights.keep_dequantized(trainer.model)
            plan = replace(plan, dequantized_gib=round(extra / 2**30, 1))
    elif speed["warm"] and job.device == "cuda" and attention == "flex_attention":
        cuda.warm_masks(trainer)
    if rank.world > 1:  # ranks that planned differently would hang at the first collective: all take one plan
        plan = batch_plan.agreed(plan)
    if measure or rank.world > 1:
        batch_plan.apply(trainer, plan)
    return plan


def _finish(trainer, plan: BatchPlan, layers, metrics: dict, attention: str) -> None:
    from transformers.trainer_callback import PrinterCallback

    from sft_pipeline.training.callbacks import Selective

    metrics["batch_plan"] = plan.to_dict()
    if plan.checkpointed_layers:
        trainer.add_callback(Selective(layers, plan.checkpointed_layers))
    if attention == varlen.VARLEN:  # which kernel (chosen by the plan's probe steps if measured)
        metrics["attention_kernel"] = varlen.kernel_label()
    trainer.remove_callback(PrinterCallback)  # raw per-step dicts on stdout; sft_pipeline.progress logs one line
    log.info("training settings: %s", how_it_ran.describe(metrics))  # the numbers: train_metrics.json
