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

from sft_pipeline import base_weights, faults, varlen
from sft_pipeline.config import LoraSection, ModelConfig, QuantizationConfig, TrainingConfig
from sft_pipeline.errors import StageFailure, is_oom
from sft_pipeline.store import fsync_tree, write_json_atomic

log = logging.getLogger("sft_pipeline.train")
# activation bytes per (token x hidden unit x layer) for a QLoRA step without checkpointing, measured on an H100
# (Mistral-7B architecture, 2048 tokens, SDPA: 12.5 GiB for one sequence); with checkpointing only layer inputs stay.
# Only the first guess now: on CUDA the plan measures a real step (measure_step_memory) and decides from that.
ACT_BYTES, ACT_BYTES_CKPT = 52, 6
# The largest micro-batch the plan picks. 8 rows of 2048 need ~63 GiB (4.4 fixed + 7.3 a row, H200, shared LoRA
# dropout): by the plan's own arithmetic that fits an 80 GB H100 (not measured there). 16 read +1.3 % on an H200
# at 121.5 GiB (BENCHMARKS.md): within the spread between machines, ~18 GiB left on the card: not the default.
MICRO_CAP = 8
MARGIN = 0.10  # of the memory there is, kept free: allocator fragmentation from packed rows of varying length
MARGIN_MIN = 2 * 2**30


def plan_batch(training: TrainingConfig, model_config, max_length: int, free_bytes: int | None) -> dict:
    """Micro-batch, accumulation and checkpointing for the recipe's effective batch and the memory there is."""
    effective = training.effective_batch
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


def choose_batch(effective: int, available: int, fixed: int, per_seq: int, layers: int,
                 ckpt_ratio: float = ACT_BYTES_CKPT / ACT_BYTES, cap: int = MICRO_CAP) -> dict:
    """The fastest micro-batch that fits, from measured bytes; degrades gradually when none fits.

    ``available``: bytes this process may use in all (free on the card + what its allocator holds unused + what
    it has allocated); ``fixed``: bytes that do not grow with the micro-batch (weights, adapter, optimizer, and a
    step's share that does not scale); ``per_seq``: what one more packed row of max length adds at the peak.
    Order: the largest micro-batch (a divisor of ``effective``, at most ``cap``) without checkpointing; else
    micro-batch 1 with the fewest decoder layers checkpointed (each one keeps ``ckpt_ratio`` of its activations);
    else every layer checkpointed (the out-of-memory fallback still stands behind that).
    """
    usable = available - max(MARGIN * available, MARGIN_MIN)
    plan = {"effective_batch": effective, "auto": True, "available_gib": round(available / 2**30, 1),
            "need_gib": None, "checkpointed_layers": 0}
    for micro in sorted((d for d in range(1, min(effective, cap) + 1) if effective % d == 0), reverse=True):
        need = fixed + micro * per_seq
        if need <= usable:
            return {**plan, "per_device_batch_size": micro, "gradient_accumulation_steps": effective // micro,
                    "gradient_checkpointing": False, "need_gib": round(need / 2**30, 1),
                    "spare_gib": round((usable - need) / 2**30, 2)}
    per_layer_saved = per_seq / layers * (1 - ckpt_ratio)
    for ckpt in range(1, layers + 1):
        need = fixed + per_seq - ckpt * per_layer_saved
        if need <= usable:
            break
    return {**plan, "per_device_batch_size": 1, "gradient_accumulation_steps": effective,
            "gradient_checkpointing": True, "checkpointed_layers": ckpt, "need_gib": round(need / 2**30, 1)}


# The speed levers (BENCHMARKS.md says what each gave alone on an H100). plan: "measure" (a real step's peak
# memory decides the micro-batch) or "estimate" (a constant per token, the earlier plan); head: the LM head and
# loss (see _fast_loss; auto: liger with Liger kernels, else lean); compile: regional torch.compile of the decoder
# layers; cap: the largest micro-batch the measured plan may pick; warm: compile flex attention's mask for two small
# lengths before the first step when no measured plan does (see _warm_masks); workers: data-loader processes that
# collate the next micro-batches while the GPU trains (CUDA only; 0 = in the training process, as measured so far);
# lora_add: "addmm" (each adapter's second GEMM adds its scaled product to the base output, see _fuse_lora_add: +2.1 %
# alone on an H200) or "peft" (peft's forward: an output copy, a scaling multiply and an add as three more passes);
# lora_a: "fused" (the adapters that read one input, q/k/v, run their A matrices as one GEMM, see _fuse_lora_a: +1.3 %
# on an H200; needs lora_add addmm and one dropout mask per input) or "per-module" (one GEMM per adapter). Neither
# fused path runs under FSDP (lora_glue). base: "auto" (a 4-bit base is kept dequantized when the measured plan's
# micro-batch leaves room for it, see sft_pipeline/base_weights.py; one process only) or "4bit" (dequantized in every
# forward and backward, as bitsandbytes does). attention: the kernel under varlen attention, "auto" (flash-attention 4
# where installed on a Hopper/Blackwell GPU and checked once per process, else PyTorch's; sft_pipeline/varlen.py) or
# "torch" (PyTorch's).
# How LoRA dropout draws its masks is the recipe's lora.shared_dropout (+1.5 % and 16 % less peak memory when shared).
SPEED = {"plan": "measure", "head": "auto", "compile": False, "cap": MICRO_CAP, "warm": True, "workers": 0,
         "lora_add": "addmm", "lora_a": "fused", "base": "auto", "attention": "auto"}
SAME_INPUT = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}  # per decoder layer


ALLOC_CONF = "expandable_segments:True"


def expandable_segments() -> None:
    """Fewer, growable GPU memory segments: packed micro-batches change length every step and fragment fixed ones.

    The variable is read when CUDA starts. A process that started CUDA before training (the CLI's preflight reads the
    free memory; a ``model.source=build`` model is built on the GPU) would keep fixed segments: on an H200 the seed's
    job then reserved 132 GB for a 63.5 GiB peak (BENCHMARKS.md), which on an 80 GB card means allocator retries or
    an out-of-memory fallback. So the setting is also applied to the running allocator. A value the user set in
    ``PYTORCH_CUDA_ALLOC_CONF`` is kept (and applied as it is)."""
    conf = os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", ALLOC_CONF)
    import torch

    if torch.cuda.is_initialized():
        # torch >= 2.12 names it _accelerator_setAllocatorSettings; earlier ones torch.cuda.memory's
        setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
        try:
            (setter or torch.cuda.memory._set_allocator_settings)(conf)
        except (RuntimeError, AttributeError) as e:  # training still runs, on the segments it has
            log.warning("could not apply PYTORCH_CUDA_ALLOC_CONF=%s to the running allocator: %s", conf, e)


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


LIGER_IMPL = "nvidia-triton"


def pin_liger_triton() -> str | None:
    """Keep Liger on its Triton kernels, the ones measured (BENCHMARKS.md); returns the pinned name, or None.

    Liger >= 0.8.5 picks a kernel set per op when it is called, and prefers its CuTe DSL kernels wherever NVIDIA's
    CUTLASS DSL imports, which flash-attention 4 installs. On an H200 with packed rows that made the whole step 42 %
    slower (17,527 -> 10,060 tok/s, the same attention kernel). A user's own choice (``LIGER_KERNEL_IMPL``, or a
    per-op ``LIGER_KERNEL_IMPL_<OP>``, which Liger reads first) is kept; an older Liger has Triton kernels only."""
    if os.environ.get("LIGER_KERNEL_IMPL") or os.environ.get("LIGER_KERNEL_BACKEND"):
        return None
    try:
        from liger_kernel.backends import get_impl, set_impl
    except ImportError:
        return None
    if get_impl() is None:
        set_impl(LIGER_IMPL)
    return get_impl()


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
        """Trained tokens per second (padding excluded), and an estimate of time and cost after warm-up.

        ``tokens_per_second``: the whole training call; ``tokens_per_second_warm``: from the end of warm-up to the
        end of the last step, without the checkpoint and evaluation Trainer runs after it (what ``plan`` and the
        scaling bench read as the steady rate)."""

        warm = 3

        def on_train_begin(self, args, state, control, **kw):
            metrics["start_step"] = state.global_step
            self.t0, self.n0 = time.perf_counter(), state.num_input_tokens_seen
            self.tw = self.last = None

        def on_step_end(self, args, state, control, **kw):
            if state.global_step >= state.max_steps:  # the steady rate ends here, before the final save and eval
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.last = time.perf_counter()
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
                log.info("estimate: %s tokens at %s tok/s -> %.2f h%s", f"{total_tokens:,}",
                         f"{est['tokens_per_second']:,}", est["hours"], f", cost {est['cost']}" if "cost" in est else "")

        def on_train_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                metrics["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            now = time.perf_counter()
            metrics["train_seconds"] = round(now - self.t0, 2)
            metrics["tokens"] = int(state.num_input_tokens_seen - self.n0)
            metrics["tokens_per_second"] = round(metrics["tokens"] / (now - self.t0), 1)
            if self.tw and state.num_input_tokens_seen > self.nw:  # steady state: warm-up, final save and eval excluded
                end = self.last if self.last and self.last > self.tw else now
                metrics["tokens_per_second_warm"] = round((state.num_input_tokens_seen - self.nw) / (end - self.tw), 1)
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


def _fast_loss(trainer_cls, head: str):
    """The trainer, with the LM head and loss ``head`` asks for.

    trl 1.16 scores every micro-batch with a chunked LM head that also computes each token's entropy and whether
    it is the top-1 guess, and reads both back to the host (two device syncs per micro-batch) for its metrics.
    ``trl``: as trl does. ``lean``: trl's chunked head computing the log-probabilities alone, no syncs.
    ``liger``: Liger's fused linear cross-entropy (never forms the logits; its gradient is computed in the forward).
    The loss is the same sum over labelled tokens divided by the tokens of the whole effective batch.
    """
    if head == "trl":
        return trainer_cls

    class FastLoss(trainer_cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            import torch

            if not model.training:  # evaluation wants trl's outputs (and metrics); it is not the hot path
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            labels = inputs["labels"]
            rest = {k: v for k, v in inputs.items() if k != "labels"}
            n = (labels[:, 1:] != -100).sum() if num_items_in_batch is None else num_items_in_batch
            n = torch.as_tensor(n, device=labels.device).clamp(min=1)
            if head == "liger":
                from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

                # the forward goes through ``model`` as given (under DDP its wrapper, which syncs the gradients;
                # calling the inner model would skip that), with the LM head out of it for this call: the
                # "logits" it returns are the final hidden states, and the fused loss applies the head's weight
                base = self.accelerator.unwrap_model(model).get_base_model()
                head_layer = base.lm_head
                base.lm_head = torch.nn.Identity()
                try:
                    # (accelerate's mixed precision returns a wrapped model's outputs in float32)
                    hidden = model(**rest, use_cache=False).logits[:, :-1].to(head_layer.weight.dtype)
                finally:
                    base.lm_head = head_layer
                flce = LigerFusedLinearCrossEntropyLoss(reduction="sum")
                loss = flce(head_layer.weight, hidden.reshape(-1, hidden.size(-1)), labels[:, 1:].reshape(-1)) / n
            else:
                out = model(**inputs, use_cache=False, fused_lm_head=True)
                # summed in float32: under FSDP's bf16 mixed precision the log-probs come in bf16, and a bf16 sum
                # over ~16k tokens rounded the logged loss to steps of 1/32 (measured on 2 H200s)
                loss = -out.log_probs.float().sum() / n
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            if self.model.training and "position_ids" in inputs:  # trl's num_tokens metric, no device sync
                self._total_train_tokens += inputs["position_ids"].size(1)
                self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            return (loss, None) if return_outputs else loss

    if head == "lean":
        FastLoss.__init__ = _lean_init(trainer_cls)
    return FastLoss


def _lean_init(trainer_cls):
    def __init__(self, *args, **kwargs):
        from trl.trainer.utils import add_fused_lm_head

        trainer_cls.__init__(self, *args, **kwargs)
        # trl patched the base model's forward to compute entropy and top-1 too; patch it again for log-probs alone
        # (the fused path never calls the forward it wraps, so the two patches do not stack)
        add_fused_lm_head(self.model.get_base_model(), outputs=("log_probs",))

    return __init__


def measure_step_memory(trainer, micro: int, max_length: int) -> int:
    """Peak bytes one forward and backward of ``micro`` packed rows of ``max_length`` tokens adds (CUDA).

    The trainer's own loss path on a worst-case packed batch (every row full), so what the batch plan decides from
    is this model, this attention and this head as they are, not a constant from another setting.
    """
    import torch

    model = trainer.model
    ids = torch.randint(3, model.config.vocab_size, (1, micro * max_length), device="cuda")
    pos = torch.arange(max_length, device="cuda").repeat(micro)[None]
    labels = ids.masked_fill(pos == 0, -100)
    model.train()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    try:
        loss = trainer.compute_loss(model, {"input_ids": ids, "position_ids": pos, "labels": labels})
        loss.backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    finally:
        loss = None
        model.zero_grad(set_to_none=True)
        # the probe's tokens and metrics are not training's
        trainer._total_train_tokens = 0
        for mode in getattr(trainer, "_metrics", {}).values():
            mode.clear()


def measured_plan(trainer, training: TrainingConfig, max_length: int, layers: int, cap: int = MICRO_CAP,
                  world_size: int = 1) -> dict:
    """The batch plan from two measured steps (1 and 2 packed rows): the fastest micro-batch that fits (CUDA).

    With several ranks each measures its own GPU for its share of the effective batch (``parallel.agree_plan``
    then makes every rank take the most cautious of their plans).
    """
    import torch

    effective = training.effective_batch // world_size  # this rank's share (build_trainer's split checked it)
    probes = {}
    for micro in (1, 2):
        try:
            probes[micro] = measure_step_memory(trainer, micro, max_length)
        except Exception as exc:  # noqa: BLE001 - only out of memory is handled; it decides the plan
            if not is_oom(exc):
                raise
            torch.cuda.empty_cache()
            break
    if 2 in probes:
        per_seq = probes[2] - probes[1]
        step_fixed = max(probes[1] - per_seq, 0)
    else:  # not even one row, or not two, without checkpointing: one row's share, or the old estimate
        per_seq = probes.get(1) or trainer.model.config.hidden_size * layers * max_length * ACT_BYTES
        step_fixed = 0
    trainable = sum(p.numel() * p.element_size() for p in trainer.model.parameters() if p.requires_grad)
    fixed = torch.cuda.memory_allocated() + step_fixed + 2 * trainable  # + the optimizer's two moments
    free, _ = torch.cuda.mem_get_info()
    available = free + torch.cuda.memory_reserved()  # what this process's allocator holds is its own to use
    plan = choose_batch(effective, available, fixed, per_seq, layers, cap=cap)
    if world_size > 1:
        plan.update(effective_batch=training.effective_batch, world_size=world_size)
    plan["measured_gib"] = {m: round(b / 2**30, 2) for m, b in probes.items()}
    plan["per_seq_gib"], plan["fixed_gib"] = round(per_seq / 2**30, 2), round(fixed / 2**30, 2)
    return plan


def _warm_masks(trainer) -> None:
    """Compile flex attention's block mask for two short lengths, so the first real step finds it compiled for any.

    transformers builds the mask with ``torch.compile(create_block_mask)``; its first compile specializes on the
    first length it sees and only a second length makes Dynamo recompile it for every length. A first step of
    micro-batch 8 x 2048 packed tokens (16,384) stalled in that specialized compile for minutes on 2 H200s (both
    ranks in Triton's LLVM passes, BENCHMARKS.md), while the measured plan's probes (2,048 then 4,096 tokens) had
    always warmed it before training. This does the same when the plan is not measured (a given or fallen-back
    batch). Forward only, no gradients: a second or two.
    """
    import torch

    model = trainer.model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for n in (64, 128):  # two packed sequences of n tokens, as training's packed rows come
                ids = torch.randint(3, model.config.vocab_size, (1, 2 * n), device=model.device)
                pos = torch.arange(n, device=model.device).repeat(2)[None]
                model(input_ids=ids, position_ids=pos, use_cache=False)
    finally:
        model.train(was_training)


def _apply_plan(trainer, plan: dict) -> None:
    """Set a plan on a built trainer (before ``train``: the data loader and checkpointing are set up there)."""
    a = trainer.args
    a.per_device_train_batch_size = a.per_device_eval_batch_size = plan["per_device_batch_size"]
    trainer._train_batch_size = a.train_batch_size
    a.gradient_accumulation_steps = plan["gradient_accumulation_steps"]
    kwargs = {"use_reentrant": False} if plan["gradient_checkpointing"] else None
    for name in ("gradient_checkpointing", "activation_checkpointing"):  # transformers 5.17 / 5.24 names
        if hasattr(a, name):
            setattr(a, name, plan["gradient_checkpointing"])
            setattr(a, f"{name}_kwargs", kwargs)


def _decoder_layers(trainer):
    base = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    return base.model.layers


def _selective_checkpointing(layers, checkpointed: int):
    """Checkpoint only the first ``checkpointed`` decoder layers (Trainer turns it on for all at train start)."""
    from transformers import TrainerCallback

    class Selective(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            for i, layer in enumerate(layers):
                if hasattr(layer, "gradient_checkpointing"):
                    layer.gradient_checkpointing = i < checkpointed

    return Selective()


def _same_input(layers):
    """Per decoder layer and block (``SAME_INPUT``), the LoRA modules that read one input, where there are two or
    more: what ``_share_dropout`` and ``_fuse_lora_a`` group."""
    from peft.tuners.lora import LoraLayer

    for layer in layers:
        for block_name, names in SAME_INPUT.items():
            block = getattr(layer, block_name, None)
            modules = [m for m in (getattr(block, n, None) for n in names) if isinstance(m, LoraLayer)]
            if len(modules) >= 2:
                yield modules


def _share_dropout(layers) -> int:
    """One LoRA dropout mask per input instead of one per adapted module; returns how many modules now share one.

    q, k and v (and gate and up) read the same input. peft gives each adapter its own dropout, so a step draws three
    masks over that input, keeps three dropped copies for the backward and runs three dropout backwards. LoRA dropout
    at 0.1 cost 3.9 % of the speed and 20 GiB at micro-batch 8 on an H200 (BENCHMARKS.md, ``nodrop``). Sharing keeps
    one. The same mask for q, k and v is a different noise from three independent ones (still dropout on the
    adapters' input, with the same rate); the base model's path is untouched. The mask is reused only for the very
    same input tensor (a weak reference), so a recomputed forward (gradient checkpointing) draws its own again.
    """
    import weakref

    import torch

    class SharedDropout(torch.nn.Module):
        def __init__(self, p: float, users: int):
            super().__init__()
            self.p, self.users, self.seen, self.out, self.served = p, users, None, None, 0

        def forward(self, x):
            if not self.training or self.p == 0:
                self.seen = self.out = None
                return x
            if self.seen is None or self.seen() is not x:
                self.seen, self.out, self.served = weakref.ref(x), torch.nn.functional.dropout(x, self.p, True), 0
            out, self.served = self.out, self.served + 1
            if self.served == self.users:  # every adapter has it: hold nothing past this layer (autograd keeps it)
                self.seen = self.out = None
            return out

    shared = 0
    for modules in _same_input(layers):
        for adapter, first in modules[0].lora_dropout.items():
            if isinstance(first, torch.nn.Dropout) and first.p > 0:
                one = SharedDropout(first.p, len(modules)).train(first.training)
                for m in modules:
                    m.lora_dropout[adapter] = one
                shared += len(modules)
    return shared


def _fuse_lora_add(model) -> int:
    """Each LoRA module adds its adapter inside the adapter's second GEMM; returns how many modules do.

    peft computes ``result = base(x).clone() + lora_B(lora_A(dropout(x))) * scaling``: besides the two small GEMMs a
    copy, a multiply and an add, each a full pass over the layer's output (on an H200 ~36 ms of a ~1,950 ms step:
    the device copies, the scaling multiplies and the forward's share of the adds in the profile, BENCHMARKS.md).
    ``torch.addmm(base, lora_A(dropout(x)), B^T, alpha=scaling)`` does the multiply-add in the GEMM (one rounding
    instead of three). Anything else takes peft's own forward: several or disabled adapters, merged weights,
    variants (DoRA), an adapter bias, or mixed dtypes without autocast.
    """
    import torch
    from peft.tuners.lora import LoraLayer

    def forward(self, x, *args, **kwargs):
        names = self.active_adapters
        name = names[0] if len(names) == 1 else None
        if (args or kwargs or self.disable_adapters or self.merged or name not in self.lora_A
                or name in self.lora_variant or self.lora_B[name].bias is not None
                or (not torch.is_autocast_enabled(x.device.type)
                    and not x.dtype == self.lora_A[name].weight.dtype == self.lora_B[name].weight.dtype)):
            return type(self).forward(self, x, *args, **kwargs)
        base = self.base_layer(x)
        group = self.__dict__.get("_sft_lora_a")  # _fuse_lora_a: one GEMM for the adapters reading this input
        t = group.take(self, x, name) if group is not None else self.lora_A[name](self.lora_dropout[name](x))
        out = torch.addmm(base.reshape(-1, base.shape[-1]), t.reshape(-1, t.shape[-1]), self.lora_B[name].weight.t(),
                          alpha=self.scaling[name])
        return out.view(base.shape)

    fused = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and isinstance(getattr(module, "base_layer", None), torch.nn.Linear):
            module.forward = forward.__get__(module)
            fused += 1
    return fused


def _fuse_lora_a(layers, shared_dropout: bool) -> int:
    """The adapters that read one input (q, k and v) run their A matrices as one GEMM; returns how many modules do.

    peft runs ``lora_A(dropout(x))`` once per adapter: three GEMMs that each read ``x`` (a full pass over the layer's
    input for an output of r columns), and in the backward three input gradients summed by two more passes. One GEMM
    with the A matrices stacked reads ``x`` once and gives one input gradient. Only with one dropout mask for the
    group (``lora.shared_dropout``, or no dropout): the mask is drawn once, as ``_share_dropout`` draws it, so the
    numbers equal the unfused path's up to rounding. Works through ``_fuse_lora_add``'s forward (call that first);
    a module that takes peft's own forward (disabled or several adapters, merged weights) reads ``x`` alone.
    """
    import weakref

    import torch

    class FusedA:
        def __init__(self, modules, p: float):
            self.modules, self.p, self.seen, self.name, self.parts, self.served = modules, p, None, None, None, 0

        def take(self, module, x, name):
            if any(name not in m.lora_A for m in self.modules):
                return module.lora_A[name](module.lora_dropout[name](x))
            if self.seen is None or self.seen() is not x or self.name != name:
                h = torch.nn.functional.dropout(x, self.p, True) if self.p and module.training else x
                w = torch.cat([m.lora_A[name].weight for m in self.modules])
                self.parts = torch.nn.functional.linear(h, w).split([m.r[name] for m in self.modules], dim=-1)
                self.seen, self.name, self.served = weakref.ref(x), name, 0
            part = self.parts[self.modules.index(module)]
            self.served += 1
            if self.served == len(self.modules):  # every adapter has its part: hold nothing past this layer
                self.seen = self.parts = None
            return part

    fused = 0
    for modules in _same_input(layers):
        modules = [m for m in modules
                   if "_sft_lora_a" not in m.__dict__ and isinstance(getattr(m, "base_layer", None), torch.nn.Linear)]
        rates = {getattr(d, "p", 0.0) for m in modules for d in m.lora_dropout.values()}
        if len(modules) < 2 or len(rates) != 1 or (rates != {0.0} and not shared_dropout):
            continue
        group = FusedA(modules, rates.pop())
        for m in modules:
            m.__dict__["_sft_lora_a"] = group
        fused += len(modules)
    return fused


def lora_glue(speed: dict, parallel: dict | None) -> tuple[bool, bool]:
    """Whether the adapters add inside their second GEMM (``_fuse_lora_add``) and q/k/v's A matrices run as one GEMM
    (``_fuse_lora_a``). Neither under FSDP: peft's wrap policy makes each LoRA matrix its own FSDP unit, whose weight
    is whole only inside its own forward, which these paths do not call. The fused A needs the addmm forward, and
    not regional torch.compile (its Python-side bookkeeping is not for Dynamo)."""
    addmm = speed["lora_add"] == "addmm" and "fsdp" not in (parallel or {})
    return addmm, addmm and speed["lora_a"] == "fused" and not speed["compile"]


def _compile_layers(layers) -> None:
    """Regional torch.compile: each decoder layer alone (one graph reused by all 32), shapes dynamic (packing)."""
    import torch

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for layer in layers:
        layer.compile(dynamic=True)


SEALED = "sft-pipeline-complete"  # written into a checkpoint once all its files are on disk: their sizes and sha256


def _checkpoint_files(ckpt: Path) -> dict[str, dict]:
    from sft_pipeline.store import HASH_LIMIT, file_sha256

    files = {}
    for p in sorted(ckpt.rglob("*")):
        if p.is_file() and p.name != SEALED:
            size = p.stat().st_size
            files[str(p.relative_to(ckpt))] = {"size": size, "sha256": file_sha256(p) if size <= HASH_LIMIT else None}
    return files


def seal_checkpoint(ckpt: Path) -> None:
    """Flush a checkpoint Trainer just saved to disk, then mark it complete, recording each file's size and hash."""
    fsync_tree(ckpt)
    write_json_atomic(ckpt / SEALED, {"files": _checkpoint_files(ckpt)})
    fsync_tree(ckpt)


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why a checkpoint cannot be resumed from, or None: not sealed (cut short), or a file missing, resized or
    changed since it was sealed. A seal from before hashes were recorded (empty) only says it was complete."""
    seal = Path(ckpt) / SEALED
    if not seal.is_file():
        return "not sealed (cut short while saving)"
    try:
        text = seal.read_text()
        recorded = json.loads(text)["files"] if text.strip() else None
    except (OSError, ValueError, KeyError, TypeError):
        return f"its seal file {SEALED} is unreadable"
    if recorded is None:
        return None
    for rel, meta in recorded.items():
        p = Path(ckpt) / rel
        if not p.is_file():
            return f"file missing: {rel}"
        if p.stat().st_size != meta["size"]:
            return f"size changed: {rel}"
        if meta.get("sha256"):
            from sft_pipeline.store import file_sha256

            if file_sha256(p) != meta["sha256"]:
                return f"content changed: {rel}"
    return None


def last_checkpoint(work: Path, logger: logging.Logger = log) -> str | None:
    """The newest intact checkpoint in ``work``. One cut short (a kill or a crash while saving) is removed; a
    sealed one that was damaged since is removed with a WARNING, and the one before it is used (or none: training
    starts fresh), so a corrupted checkpoint never fails every rerun."""
    def step(p: Path) -> int:
        return int(p.name.rsplit("-", 1)[1])

    found = [p for p in Path(work).glob("checkpoint-*") if p.is_dir() and p.name.rsplit("-", 1)[1].isdigit()]
    for ckpt in sorted(found, key=step, reverse=True):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return str(ckpt)
        if (ckpt / SEALED).exists():
            logger.warning("train: checkpoint %s is damaged (%s); removed, resuming from an earlier checkpoint or "
                           "from the start", ckpt, problem)
        shutil.rmtree(ckpt, ignore_errors=True)
    return None


def _saved_batch(work: Path) -> dict | None:
    """The micro-batch and accumulation an earlier out-of-memory fallback lowered to (kept for reruns), or None."""
    saved = Path(work) / "batch.json"
    return json.loads(saved.read_text()) if saved.is_file() else None


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
    write_json_atomic(Path(work) / "batch.json", plan)
    return plan


def build_trainer(train_ds, eval_ds, tok, model_path: str, model: ModelConfig, quantization: QuantizationConfig,
                  lora: LoraSection, training: TrainingConfig, max_length: int, output_dir: str, device: str,
                  token: str | None = None, report_to: str = "none", run_name: str | None = None,
                  extra_callbacks: list | None = None, batch: dict | None = None, speed: dict | None = None,
                  world_size: int = 1, local_rank: int = 0, parallel: dict | None = None):
    """The SFTTrainer this stage runs, with its speed settings. Returns (trainer, metrics dict filled by training).

    ``batch`` (micro-batch, accumulation) replaces the planned one: an out-of-memory fallback's. ``speed`` replaces
    entries of ``SPEED`` (the levers measured in BENCHMARKS.md; the benchmark turns them one by one).
    Several processes (``sft_pipeline/rank_train.py``): ``world_size`` splits the effective batch over the ranks,
    ``local_rank`` is this rank's GPU, ``parallel`` the DDP/FSDP arguments (``launch.parallel_args``); every rank
    measures its own plan for its share and all take the most cautious one (``parallel.agree_plan``).
    """
    import torch
    from peft import LoraConfig, prepare_model_for_kbit_training
    from trl import SFTConfig, SFTTrainer

    from sft_pipeline.models import attn_label, load_model

    speed = {**SPEED, **(speed or {})}
    if device == "cuda":
        expandable_segments()
        varlen.use_kernel(speed["attention"])
    m = load_model(model_path, model, quantization, device, token, training=True, device_index=local_rank,
                   quant_storage="fsdp" in (parallel or {}), packed=training.packing)
    # no KV cache in training: with a cache, transformers ignores packed position_ids and attends across examples
    m.config.use_cache = False
    measure = device == "cuda" and training.auto_batch and not batch and speed["plan"] == "measure"
    free = torch.cuda.mem_get_info()[0] if device == "cuda" else None
    plan = plan_batch(training, m.config, max_length, free)
    if measure:  # a provisional plan until a step of this very trainer is measured below
        plan = {**plan, "per_device_batch_size": 1, "gradient_accumulation_steps": plan["effective_batch"],
                "gradient_checkpointing": False}
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
    if liger:
        pin_liger_triton()
    head = speed["head"] if speed["head"] != "auto" else ("liger" if liger else "lean") if device == "cuda" else "trl"
    if head == "liger" and "fsdp" in (parallel or {}):  # FSDP holds the head's weight sharded outside its forward
        head = "lean"
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
        dataloader_num_workers=speed["workers"] if device == "cuda" else 0,
        dataloader_persistent_workers=bool(speed["workers"]) and device == "cuda", disable_tqdm=True,
        **(parallel or {}),
        # compiled decoder layers fuse norms, rotary and SwiGLU themselves, and Dynamo cannot trace Liger's
        # autograd functions inside them (AssertionError in its RMSNorm, measured on an H200): Liger keeps the head
        liger_kernel_config={"rms_norm": False, "rope": False, "swiglu": False} if liger and speed["compile"] else None,
    )
    peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias=lora.bias,
                             target_modules=lora.target_modules, modules_to_save=lora.modules_to_save or None,
                             task_type="CAUSAL_LM")
    # what the estimate covers: the run, not only an epoch
    epochs_tokens = training.planned_tokens([min(n, max_length) for n in map(len, train_ds["input_ids"])])
    metrics: dict = {"batch_plan": plan, "liger": liger, "optim": optim, "device": device,
                     "attn_implementation": attn_label(m.config._attn_implementation), "head": head,
                     "compile": bool(speed["compile"])}
    trainer = _fast_loss(_resumable(SFTTrainer), head)(
        model=m, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tok,
        peft_config=peft_config, callbacks=_callbacks(training, metrics, epochs_tokens) + list(extra_callbacks or []))
    layers = _decoder_layers(trainer)
    if liger:  # Trainer applies these at train start; now already, so that the memory probe runs the same kernels
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=trainer.model.get_base_model(), **args.liger_kernel_config)
    if lora.shared_dropout:
        metrics["shared_dropout_modules"] = _share_dropout(layers)
    addmm, fused_a = lora_glue(speed, parallel)
    if addmm:
        metrics["addmm_lora_modules"] = _fuse_lora_add(trainer.model)
    if fused_a:
        metrics["fused_lora_a_modules"] = _fuse_lora_a(layers, lora.shared_dropout)
    if speed["compile"]:
        _compile_layers(layers)
    if measure:
        plan = measured_plan(trainer, training, max_length, len(layers), speed["cap"], world_size)
        extra = base_weights.extra_bytes(trainer.model) if speed["base"] == "auto" and world_size == 1 else 0
        if base_weights.room_for(plan, extra):
            metrics["dequantized_modules"] = base_weights.keep_dequantized(trainer.model)
            plan["dequantized_gib"] = round(extra / 2**30, 1)
    elif speed["warm"] and device == "cuda" and m.config._attn_implementation == "flex_attention":
        _warm_masks(trainer)
    if world_size > 1:  # ranks that planned differently would hang at the first collective: all take one plan
        from sft_pipeline.parallel import agree_plan

        plan = agree_plan(plan)
    if measure or world_size > 1:
        _apply_plan(trainer, plan)
        metrics["batch_plan"] = plan
    if plan.get("checkpointed_layers"):
        trainer.add_callback(_selective_checkpointing(layers, plan["checkpointed_layers"]))
    if m.config._attn_implementation == varlen.VARLEN:  # which kernel (chosen by the plan's probe steps if measured)
        metrics["attention_kernel"] = varlen.kernel_label()
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # raw per-step dicts on stdout; sft_pipeline.progress logs one line
    shown = ("batch_plan", "liger", "optim", "attn_implementation", "attention_kernel", "head", "compile")
    log.info("training settings: %s", json.dumps({k: metrics[k] for k in shown if k in metrics}))
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
    batch = _saved_batch(work)
    if batch:
        logger.warning("train: micro-batch %d x accumulation %d, kept from an earlier out-of-memory fallback",
                       batch["per_device_batch_size"], batch["gradient_accumulation_steps"])
    while True:
        trainer, metrics = build_trainer(
            train_ds, eval_ds, tok, model_path, model, quantization, lora, training, max_length, str(work), device,
            token, report_to, run_name, extra_callbacks=extra_callbacks, batch=batch)
        last = last_checkpoint(work, logger)
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
        batch = _halve_batch(work, plan, step, last_checkpoint(work, logger), error)
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
