"""Building and running the QLoRA trainer: batch planning, speed settings, sealed checkpoints, OOM fallback.

Shared by the train stage (``tasks/train.py``), the benchmark (``bench/``) and, for several processes, the
per-rank training entry point. Nothing here knows about the store or Prefect.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import time
from pathlib import Path

from sft_pipeline import faults
from sft_pipeline.config import LoraSection, ModelConfig, QuantizationConfig, TrainingConfig
from sft_pipeline.errors import StageFailure, is_oom
from sft_pipeline.store import fsync_tree

log = logging.getLogger("sft_pipeline.train")
# activation bytes per (token x hidden unit x layer) for a QLoRA step without checkpointing, measured on an H100
# (Mistral-7B architecture, 2048 tokens, SDPA: 12.5 GiB for one sequence); with checkpointing only layer inputs stay
ACT_BYTES, ACT_BYTES_CKPT = 52, 6


def plan_batch(training: TrainingConfig, model_config, max_length: int, free_bytes: int | None) -> dict:
    """Micro-batch, accumulation and checkpointing for the recipe's effective batch and the memory there is."""
    effective = training.per_device_batch_size * training.gradient_accumulation_steps
    plan = {"per_device_batch_size": training.per_device_batch_size, "gradient_checkpointing":
            training.gradient_checkpointing, "gradient_accumulation_steps": training.gradient_accumulation_steps,
            "effective_batch": effective, "auto": False}
    if not training.auto_batch or free_bytes is None:
        return plan
    per_seq = model_config.hidden_size * model_config.num_hidden_layers * max_length
    budget = 0.8 * free_bytes
    divisors = [d for d in range(1, effective + 1) if effective % d == 0]
    fits = [d for d in divisors if d * per_seq * ACT_BYTES <= budget and d <= 16]
    if fits:
        micro, ckpt = max(fits), False
    else:
        fits = [d for d in divisors if d * per_seq * ACT_BYTES_CKPT <= budget and d <= 16] or [1]
        micro, ckpt = max(fits), True
    return {"per_device_batch_size": micro, "gradient_checkpointing": ckpt,
            "gradient_accumulation_steps": effective // micro, "effective_batch": effective, "auto": True,
            "free_gib": round(free_bytes / 2**30, 1)}


def _liger(training: TrainingConfig, device: str) -> bool:
    if training.use_liger_kernel != "auto":
        return bool(training.use_liger_kernel)
    if device != "cuda":
        return False
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return False
    return True


def _callbacks(training: TrainingConfig, metrics: dict, total_tokens: int):
    import torch
    from transformers import TrainerCallback

    class Checkpoint(TrainerCallback):
        """Save every `save_minutes` minutes too: steps alone can be hours apart on a long GPU run."""

        def __init__(self):
            self.last = time.monotonic()

        def on_step_end(self, args, state, control, **kw):
            due = bool(training.save_minutes) and time.monotonic() - self.last >= training.save_minutes * 60
            if training.save_minutes and args.world_size > 1:  # all ranks must save at the same step: rank 0's clock
                flag = torch.tensor([int(due)], device=args.device)
                torch.distributed.broadcast(flag, 0)
                due = bool(flag.item())
            if due:
                control.should_save = True

        def on_save(self, args, state, control, **kw):
            self.last = time.monotonic()
            if args.world_size > 1:  # seal once every rank has written its part (rank 0 the weights, each its RNG)
                torch.distributed.barrier()
            if state.is_world_process_zero:
                seal_checkpoint(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    class Throughput(TrainerCallback):
        """Trained tokens per second (padding excluded), and an estimate of time and cost after warm-up."""

        warm = 3

        def on_train_begin(self, args, state, control, **kw):
            metrics["start_step"] = state.global_step
            self.t0, self.n0 = time.perf_counter(), state.num_input_tokens_seen
            self.tw = None

        def on_step_end(self, args, state, control, **kw):
            if state.global_step - metrics["start_step"] == self.warm:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.tw, self.nw = time.perf_counter(), state.num_input_tokens_seen
            elif self.tw and state.global_step - metrics["start_step"] == 2 * self.warm:
                rate = (state.num_input_tokens_seen - self.nw) / (time.perf_counter() - self.tw)
                left = max(total_tokens - state.num_input_tokens_seen, 0)
                est = {"tokens_per_second": round(rate), "tokens": total_tokens, "hours": round(left / rate / 3600, 3)}
                if training.price_per_hour is not None:
                    est["cost"] = round(est["hours"] * training.price_per_hour, 2)
                metrics["estimate"] = est
                log.warning("estimate: %s tokens at %s tok/s -> %.2f h%s", total_tokens, est["tokens_per_second"],
                            est["hours"], f", cost {est['cost']}" if "cost" in est else "")

        def on_train_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                metrics["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            now = time.perf_counter()
            metrics["train_seconds"] = round(now - self.t0, 2)
            metrics["tokens"] = int(state.num_input_tokens_seen - self.n0)
            metrics["tokens_per_second"] = round(metrics["tokens"] / (now - self.t0), 1)
            if self.tw and state.num_input_tokens_seen > self.nw:  # steady state, warm-up excluded
                metrics["tokens_per_second_warm"] = round((state.num_input_tokens_seen - self.nw) / (now - self.tw), 1)
            metrics["steps"] = state.global_step

    class Fault(TrainerCallback):
        """Test-only fault point ``train:step=N`` (after N steps and their checkpoint); off by default."""

        def on_step_begin(self, args, state, control, **kw):
            faults.point("train", f"step={state.global_step}")

    return [Checkpoint(), Throughput(), Fault()]


def _resumable(trainer_cls):
    """The trainer, resuming with each trainable weight in the dtype it trains in.

    Trainer reloads a PEFT checkpoint with ``load_adapter``, which upcasts bf16 adapter weights to float32, while
    trl trains QLoRA adapters in bf16: a resumed run would then train differently from an uninterrupted one.
    """

    class Resumable(trainer_cls):
        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            target = model if model is not None else self.model
            dtypes = {n: p.dtype for n, p in target.named_parameters() if p.requires_grad}
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            for n, p in target.named_parameters():
                if n in dtypes and p.dtype != dtypes[n]:
                    p.data = p.data.to(dtypes[n])

    return Resumable


SEALED = "sft-pipeline-complete"  # written into a checkpoint once all its files are on disk


def seal_checkpoint(ckpt: Path) -> None:
    """Flush a checkpoint Trainer just saved to disk, then mark it complete."""
    fsync_tree(ckpt)
    (ckpt / SEALED).write_text("")
    fsync_tree(ckpt)


def last_checkpoint(work: Path) -> str | None:
    """The newest complete checkpoint in ``work``; ones cut short (a kill or a crash while saving) are removed."""
    def step(p: Path) -> int:
        return int(p.name.rsplit("-", 1)[1])

    found = [p for p in Path(work).glob("checkpoint-*") if p.is_dir() and p.name.rsplit("-", 1)[1].isdigit()]
    for ckpt in sorted(found, key=step, reverse=True):
        if (ckpt / SEALED).is_file():
            return str(ckpt)
        shutil.rmtree(ckpt, ignore_errors=True)
    return None


def _batch_plan(work: Path, training: TrainingConfig) -> dict:
    """Micro-batch and accumulation to train with: the config's, unless an out-of-memory fallback lowered them."""
    saved = Path(work) / "batch.json"
    if saved.is_file():
        return json.loads(saved.read_text())
    return {"per_device_batch_size": training.per_device_batch_size,
            "gradient_accumulation_steps": training.gradient_accumulation_steps, "oom_fallbacks": []}


def _halve_batch(work: Path, plan: dict, step: int, resume: str | None, error: str) -> dict:
    """Half the micro-batch, twice the accumulation: the same effective batch. Saved so a rerun keeps it."""
    bs, ga = plan["per_device_batch_size"], plan["gradient_accumulation_steps"]
    if bs == 1:
        raise StageFailure(f"train: out of memory at training.per_device_batch_size=1 ({error}); lower "
                           f"format.max_length, turn on training.gradient_checkpointing, or use a bigger GPU")
    if bs % 2 == 0:
        new = {"per_device_batch_size": bs // 2, "gradient_accumulation_steps": ga * 2}
    else:  # an odd micro-batch goes to 1 × (bs × ga): still the same effective batch
        new = {"per_device_batch_size": 1, "gradient_accumulation_steps": ga * bs}
    fallback = {"at_step": step, "from": {"per_device_batch_size": bs, "gradient_accumulation_steps": ga},
                "to": dict(new), "resumed_from": Path(resume).name if resume else None, "error": error[:300]}
    plan = {**new, "oom_fallbacks": plan["oom_fallbacks"] + [fallback]}
    tmp = Path(work) / "batch.json.tmp"
    tmp.write_text(json.dumps(plan, indent=2))
    os.replace(tmp, Path(work) / "batch.json")
    return plan


def build_trainer(train_ds, eval_ds, tok, model_path: str, model: ModelConfig, quantization: QuantizationConfig,
                  lora: LoraSection, training: TrainingConfig, max_length: int, output_dir: str, device: str,
                  token: str | None = None, report_to: str = "none", run_name: str | None = None,
                  extra_callbacks: list | None = None, batch: dict | None = None, world_size: int = 1,
                  local_rank: int = 0, parallel: dict | None = None):
    """The SFTTrainer this stage runs, with its speed settings. Returns (trainer, metrics dict filled by training).

    ``batch`` (micro-batch, accumulation) replaces the planned one: an out-of-memory fallback's.
    Several processes (``sft_pipeline/rank_train.py``): ``world_size`` splits the effective batch over the ranks,
    ``local_rank`` is this rank's GPU, ``parallel`` the DDP/FSDP arguments (``launch.parallel_args``).
    """
    import torch
    from peft import LoraConfig, prepare_model_for_kbit_training
    from trl import SFTConfig, SFTTrainer

    from sft_pipeline.models import load_model

    m = load_model(model_path, model, quantization, device, token, training=True, device_index=local_rank,
                   quant_storage="fsdp" in (parallel or {}))
    # no KV cache in training: with a cache, transformers ignores packed position_ids and attends across examples
    m.config.use_cache = False
    free = torch.cuda.mem_get_info()[0] if device == "cuda" else None
    plan = plan_batch(training, m.config, max_length, free)
    if world_size > 1:
        from sft_pipeline.parallel import split_batch

        plan = split_batch(plan, world_size)
    if batch:
        plan.update(batch)
    if quantization.load_in_4bit and device == "cpu":
        # fp32 on CPU anyway; on CUDA this would upcast the frozen bf16 norms/embeddings/lm_head to fp32 (slower)
        m = prepare_model_for_kbit_training(m, use_gradient_checkpointing=plan["gradient_checkpointing"],
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    bf16 = device == "cuda" and m.dtype == torch.bfloat16
    optim = "adamw_torch_fused" if device == "cuda" and training.optim == "adamw_torch" else training.optim
    liger = _liger(training, device)
    args = SFTConfig(
        output_dir=output_dir, max_length=max_length, packing=training.packing,
        num_train_epochs=training.epochs, max_steps=training.max_steps,
        per_device_train_batch_size=plan["per_device_batch_size"],
        per_device_eval_batch_size=plan["per_device_batch_size"],
        gradient_accumulation_steps=plan["gradient_accumulation_steps"],
        gradient_checkpointing=plan["gradient_checkpointing"],
        gradient_checkpointing_kwargs={"use_reentrant": False} if plan["gradient_checkpointing"] else None,
        learning_rate=training.learning_rate, lr_scheduler_type=training.lr_scheduler,
        warmup_steps=training.warmup_ratio, weight_decay=training.weight_decay,  # a float < 1 is a ratio
        max_grad_norm=training.max_grad_norm, optim=optim, seed=training.seed, data_seed=training.seed,
        bf16=bf16, fp16=device == "cuda" and m.dtype == torch.float16, use_cpu=device == "cpu",
        logging_steps=training.logging_steps,
        save_strategy="steps", save_steps=training.save_steps, save_total_limit=training.save_total_limit,
        eval_strategy=training.eval_strategy, eval_steps=training.eval_steps,
        report_to=report_to, run_name=run_name, include_num_input_tokens_seen=True, use_liger_kernel=liger,
        dataloader_num_workers=0, disable_tqdm=True, **(parallel or {}),
    )
    peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias=lora.bias,
                             target_modules=lora.target_modules, modules_to_save=lora.modules_to_save or None,
                             task_type="CAUSAL_LM")
    epochs_tokens = int(sum(min(n, max_length) for n in map(len, train_ds["input_ids"])) * training.epochs)
    metrics: dict = {"batch_plan": plan, "liger": liger, "optim": optim, "device": device,
                     "attn_implementation": m.config._attn_implementation}
    trainer = _resumable(SFTTrainer)(model=m, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tok,
                                     peft_config=peft_config,
                                     callbacks=_callbacks(training, metrics, epochs_tokens) + list(extra_callbacks or []))
    log.warning("training settings: %s", json.dumps({k: metrics[k] for k in ("batch_plan", "liger", "optim",
                                                                               "attn_implementation")}))
    return trainer, metrics


def train_until_done(train_ds, eval_ds, tok, model_path: str, model: ModelConfig, quantization: QuantizationConfig,
                     lora: LoraSection, training: TrainingConfig, max_length: int, work: Path, device: str,
                     token: str | None = None, report_to: str = "none", run_name: str | None = None,
                     logger: logging.Logger = log, extra_callbacks: list | None = None):
    """Train to the end, resuming from the last sealed checkpoint in ``work``; returns (trainer, metrics).

    CUDA out of memory: restart from the last checkpoint at half the micro-batch and twice the accumulation (the
    same effective batch), down to 1; the fallback is saved in ``work`` so a rerun keeps it.
    """
    import torch

    # an out-of-memory fallback of an earlier attempt is kept for reruns; else build_trainer plans the batch
    batch = _batch_plan(work, training) if (Path(work) / "batch.json").is_file() else None
    if batch:
        logger.warning("train: micro-batch %d x accumulation %d, kept from an earlier out-of-memory fallback",
                       batch["per_device_batch_size"], batch["gradient_accumulation_steps"])
    while True:
        trainer, metrics = build_trainer(
            train_ds, eval_ds, tok, model_path, model, quantization, lora, training, max_length, str(work), device,
            token, report_to, run_name, extra_callbacks=extra_callbacks, batch=batch)
        last = last_checkpoint(work)
        try:
            result = trainer.train(resume_from_checkpoint=last)
            break
        except Exception as exc:  # noqa: BLE001 - only out of memory is handled here
            if not is_oom(exc):
                raise
            error = f"{type(exc).__name__}: {exc}"
        step = trainer.state.global_step
        plan = {**metrics["batch_plan"], "oom_fallbacks": (batch or {}).get("oom_fallbacks", [])}
        trainer.accelerator.free_memory()  # drop every reference to the model and optimizer before trying again
        del trainer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        batch = _halve_batch(work, plan, step, last_checkpoint(work), error)
        logger.warning("train: out of memory at step %d (%s); retrying from %s with micro-batch %d x accumulation "
                       "%d (same effective batch %d)", step, error, batch["oom_fallbacks"][-1]["resumed_from"] or
                       "the start", batch["per_device_batch_size"], batch["gradient_accumulation_steps"],
                       batch["per_device_batch_size"] * batch["gradient_accumulation_steps"])
    metrics.update(result.metrics)
    metrics["resumed_from_step"] = metrics.get("start_step", 0)
    metrics["oom_fallbacks"] = (batch or {}).get("oom_fallbacks", [])
    metrics.update({k: metrics["batch_plan"][k] for k in ("per_device_batch_size", "gradient_accumulation_steps",
                                                          "effective_batch")})
    return trainer, metrics


def save_trained(trainer, metrics: dict, out: Path, save_model: bool = True) -> None:
    """The adapter, the log history, the metrics and the (token-free) training arguments, into ``out``.

    ``save_model=False``: the adapter is there already (several ranks save it together; rank 0 then calls this).
    """
    if save_model:
        trainer.save_model(str(out / "adapter"))
    (out / "adapter" / "training_args.bin").unlink(missing_ok=True)  # pickled args can hold hub_token
    (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    (out / "train_metrics.json").write_text(json.dumps(metrics, indent=2))
    args_public = {k: v for k, v in trainer.args.to_dict().items() if "token" not in k}
    (out / "training_args.json").write_text(json.dumps(args_public, indent=1, default=str))
