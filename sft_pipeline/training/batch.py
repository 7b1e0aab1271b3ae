"""The batch plan: micro-batch, gradient accumulation and checkpointing for the recipe's effective batch.

Built in named steps. Before the trainer exists (``first_plan``): the recipe's numbers, or an estimate from the free
GPU memory, or (when a step will be measured) a provisional micro-batch of 1; split over the ranks; lowered by an
out-of-memory fallback. Once the trainer exists (CUDA): ``measured`` from two probe steps of this very trainer, then
``agreed`` by the ranks. ``train_metrics.json`` keeps it as ``batch_plan`` (``BatchPlan.to_dict``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from sft_pipeline.errors import is_oom

# Activation bytes per (token x hidden unit x layer) of a QLoRA step without checkpointing, and with it (only layer
# inputs stay): the first guess only, measured once on an H100 (BENCHMARKS.md, "Issue 30: measurements moved out of
# the code"); on CUDA the plan measures a real step (``measured``) and decides from that.
ACT_BYTES, ACT_BYTES_CKPT = 52, 6
# The largest micro-batch the measured plan picks: 8 rows of 2048 fit an 80 GB card by the plan's own arithmetic; 16
# was within the spread between machines (BENCHMARKS.md, "Issue 14, target 1: the LoRA glue levers").
MICRO_CAP = 8
MARGIN = 0.10  # of the memory there is, kept free: allocator fragmentation from packed rows of varying length
MARGIN_MIN = 2 * 2**30
GIB = 2**30


@dataclass(frozen=True)
class BatchPlan:
    """A batch plan and the numbers it came from (None: not part of this kind of plan)."""

    per_device_batch_size: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    effective_batch: int
    auto: bool = False  # planned here (estimated or measured), not the recipe's numbers
    free_gib: float | None = None  # the estimate: free GPU memory it planned from
    available_gib: float | None = None  # measured: what this process may use in all
    need_gib: float | None = None  # measured: what the chosen micro-batch needs at its peak
    spare_gib: float | None = None  # measured: what it leaves (``base_weights.room_for`` reads it)
    checkpointed_layers: int | None = None  # measured: decoder layers checkpointed (0: none)
    measured_gib: dict | None = None  # peak GiB of the probe steps, by micro-batch
    per_seq_gib: float | None = None
    fixed_gib: float | None = None
    world_size: int | None = None  # several ranks: this plan is one rank's share
    rank_plans: list | None = None  # several ranks: each rank's own micro-batch before they agreed
    dequantized_gib: float | None = None  # the 4-bit base kept dequantized in what the plan left

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, plan: dict) -> "BatchPlan":
        return cls(**{f.name: plan[f.name] for f in fields(cls) if f.name in plan})


def recipe_plan(training) -> BatchPlan:
    return BatchPlan(training.per_device_batch_size, training.gradient_accumulation_steps,
                     training.gradient_checkpointing, training.effective_batch)


def estimate(training, model_config, max_length: int, free_bytes: int | None) -> BatchPlan:
    """The recipe's numbers, or (``training.auto_batch`` with a GPU) the largest micro-batch whose activations at
    ``ACT_BYTES`` fit 80 % of the free memory, else with checkpointing at ``ACT_BYTES_CKPT``."""
    effective = training.effective_batch
    if not training.auto_batch or free_bytes is None:
        return recipe_plan(training)
    per_seq = model_config.hidden_size * model_config.num_hidden_layers * max_length
    budget = 0.8 * free_bytes
    divisors = [d for d in range(1, effective + 1) if effective % d == 0]
    fits = [d for d in divisors if d * per_seq * ACT_BYTES <= budget and d <= 16]
    if fits:
        micro, ckpt = max(fits), False
    else:
        fits = [d for d in divisors if d * per_seq * ACT_BYTES_CKPT <= budget and d <= 16] or [1]
        micro, ckpt = max(fits), True
    return BatchPlan(micro, effective // micro, ckpt, effective, auto=True, free_gib=round(free_bytes / GIB, 1))


def first_plan(training, model_config, max_length: int, free_bytes: int | None, *, measure: bool, world: int,
               lowered: dict | None) -> BatchPlan:
    """The plan the trainer is built with: the estimate; micro-batch 1 until a step is measured (``measure``); this
    rank's share of the effective batch (``world`` > 1); an out-of-memory fallback's micro-batch (``lowered``)."""
    plan = estimate(training, model_config, max_length, free_bytes)
    if measure:
        plan = replace(plan, per_device_batch_size=1, gradient_accumulation_steps=plan.effective_batch,
                       gradient_checkpointing=False)
    if world > 1:
        from sft_pipeline.parallel import split_batch

        plan = BatchPlan.from_dict(split_batch(plan.to_dict(), world))
    if lowered:
        plan = replace(plan, per_device_batch_size=lowered["per_device_batch_size"],
                       gradient_accumulation_steps=lowered["gradient_accumulation_steps"])
    return plan


def choose_batch(effective: int, available: int, fixed: int, per_seq: int, layers: int,
                 ckpt_ratio: float = ACT_BYTES_CKPT / ACT_BYTES, cap: int = MICRO_CAP) -> BatchPlan:
    """The fastest micro-batch that fits, from measured bytes; degrades gradually when none fits.

    ``available``: bytes this process may use in all (free on the card + what its allocator holds unused + what
    it has allocated); ``fixed``: bytes that do not grow with the micro-batch (weights, adapter, optimizer, and a
    step's share that does not scale); ``per_seq``: what one more packed row of max length adds at the peak.
    Order: the largest micro-batch (a divisor of ``effective``, at most ``cap``) without checkpointing; else
    micro-batch 1 with the fewest decoder layers checkpointed (each one keeps ``ckpt_ratio`` of its activations);
    else every layer checkpointed (the out-of-memory fallback still stands behind that).
    """
    usable = available - max(MARGIN * available, MARGIN_MIN)
    base = dict(effective_batch=effective, auto=True, available_gib=round(available / GIB, 1))
    for micro in sorted((d for d in range(1, min(effective, cap) + 1) if effective % d == 0), reverse=True):
        need = fixed + micro * per_seq
        if need <= usable:
            return BatchPlan(micro, effective // micro, False, **base, need_gib=round(need / GIB, 1),
                             spare_gib=round((usable - need) / GIB, 2), checkpointed_layers=0)
    per_layer_saved = per_seq / layers * (1 - ckpt_ratio)
    for ckpt in range(1, layers + 1):
        need = fixed + per_seq - ckpt * per_layer_saved
        if need <= usable:
            break
    return BatchPlan(1, effective, True, **base, need_gib=round(need / GIB, 1), checkpointed_layers=ckpt)


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


def _probe(trainer, max_length: int) -> dict[int, int]:
    """Peak bytes of a step of 1 and of 2 packed rows; fewer entries where one ran out of memory."""
    import torch

    probes = {}
    for micro in (1, 2):
        try:
            probes[micro] = measure_step_memory(trainer, micro, max_length)
        except Exception as exc:  # noqa: BLE001 - only out of memory is handled; it decides the plan
            if not is_oom(exc):
                raise
            torch.cuda.empty_cache()
            break
    return probes


def measured(trainer, training, max_length: int, layers: int, cap: int = MICRO_CAP, world: int = 1) -> BatchPlan:
    """The batch plan from two measured steps (1 and 2 packed rows): the fastest micro-batch that fits (CUDA).

    With several ranks each measures its own GPU for its share of the effective batch (``agreed`` then makes every
    rank take the most cautious of their plans).
    """
    import torch

    effective = training.effective_batch // world  # this rank's share (first_plan's split checked it)
    probes = _probe(trainer, max_length)
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
    if world > 1:
        plan = replace(plan, effective_batch=training.effective_batch, world_size=world)
    return replace(plan, measured_gib={m: round(b / GIB, 2) for m, b in probes.items()},
                   per_seq_gib=round(per_seq / GIB, 2), fixed_gib=round(fixed / GIB, 2))


def agreed(plan: BatchPlan) -> BatchPlan:
    """Every rank's plan gathered; all take the most cautious one (``parallel.agree_plan``)."""
    from sft_pipeline.parallel import agree_plan

    return BatchPlan.from_dict(agree_plan(plan.to_dict()))


def apply(trainer, plan: BatchPlan) -> None:
    """Set a plan on a built trainer (before ``train``: the data loader and checkpointing are set up there)."""
    a = trainer.args
    a.per_device_train_batch_size = a.per_device_eval_batch_size = plan.per_device_batch_size
    trainer._train_batch_size = a.train_batch_size
    a.gradient_accumulation_steps = plan.gradient_accumulation_steps
    kwargs = {"use_reentrant": False} if plan.gradient_checkpointing else None
    for name in ("gradient_checkpointing", "activation_checkpointing"):  # transformers 5.17 / 5.24 names
        if hasattr(a, name):
            setattr(a, name, plan.gradient_checkpointing)
            setattr(a, f"{name}_kwargs", kwargs)
