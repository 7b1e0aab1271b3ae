"""How a training ran, in one sentence a user reads: the train stage's ``training settings:`` log line and the report's
"how it ran" line are both this sentence, made from the train stage's metrics (``train_metrics.json``, which keeps
the full batch plan and settings as numbers).

    micro-batch 8 x accumulation 16 = effective batch 128 (measured: needs 63.1 of 139.1 GiB), no gradient
    checkpointing, attention varlen (flash-attn 4), Liger kernels, Liger's fused cross-entropy head, fused AdamW,
    4-bit base kept dequantized (+9.6 GiB)

Outside ``sft_pipeline/training`` on purpose: rewording it does not change the train stage's code hash (its key).
"""
from __future__ import annotations

HEADS = {"liger": "Liger's fused cross-entropy head", "lean": "lean LM head (no per-token metrics)"}  # trl: trl's own


def _memory(plan: dict) -> str:
    """``needs X of Y GiB`` (measured) or ``from X GiB free`` (estimated), only where the figures mean something: a
    tiny model's probe steps differ by less than the allocator's rounding, and their difference can be negative."""
    need, available, per_row = plan.get("need_gib"), plan.get("available_gib"), plan.get("per_seq_gib")
    if need is not None and available and need > 0 and (per_row is None or per_row > 0):
        return f": needs {need:.1f} of {available:.1f} GiB"
    if plan.get("free_gib"):
        return f" from {plan['free_gib']:.1f} GiB free"
    return ""


def _batch(plan: dict) -> list[str]:
    if "per_device_batch_size" not in plan:
        return []
    micro, acc = plan["per_device_batch_size"], plan.get("gradient_accumulation_steps", 1)
    world = plan.get("world_size") or 1
    gpus = f" x {world} GPUs" if world > 1 else ""
    effective = plan.get("effective_batch") or micro * acc * world
    how = ("measured" if "measured_gib" in plan else "planned" if plan.get("auto") else "as the recipe sets")
    layers = plan.get("checkpointed_layers")
    ckpt = (f"gradient checkpointing on {layers} layers" if layers else "gradient checkpointing"
            if plan.get("gradient_checkpointing") else "no gradient checkpointing")
    return [f"micro-batch {micro} x accumulation {acc}{gpus} = effective batch {effective} ({how}{_memory(plan)})",
            ckpt]


def describe(metrics: dict) -> str:
    """The sentence for the train stage's metrics (``build_trainer``'s, as in ``train_metrics.json``); parts the
    metrics lack are left out ("" for none)."""
    plan = metrics.get("batch_plan") or {}
    parts = _batch(plan)
    if metrics.get("attn_implementation"):
        kernel = metrics.get("attention_kernel")  # under varlen: PyTorch's or flash-attention 4's
        parts.append(f"attention {metrics['attn_implementation']}" + (f" ({kernel})" if kernel not in (None, "torch")
                                                                        else ""))
    if metrics.get("liger"):
        parts.append("Liger kernels")
    if metrics.get("head") in HEADS:
        parts.append(HEADS[metrics["head"]])
    if metrics.get("compile"):
        parts.append("decoder layers compiled (torch.compile)")
    optim = metrics.get("optim")
    if optim == "adamw_torch_fused":
        parts.append("fused AdamW")
    elif optim and optim != "adamw_torch":
        parts.append(f"optimizer {optim}")
    if plan.get("dequantized_gib"):
        parts.append(f"4-bit base kept dequantized (+{plan['dequantized_gib']:.1f} GiB)")
    return ", ".join(parts)
