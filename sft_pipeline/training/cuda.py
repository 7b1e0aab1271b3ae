"""The training process's CUDA settings: growable allocator segments, Liger on its Triton kernels, regional
torch.compile, and flex attention's mask compiled for any length before the first step.

Cheap to import (the CLI reads ``ALLOC_CONF`` before anything starts CUDA); torch is imported where it is used.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger("sft_pipeline.train")
ALLOC_CONF = "expandable_segments:True"
LIGER_IMPL = "nvidia-triton"


def expandable_segments() -> None:
    """Fewer, growable GPU memory segments: packed micro-batches change length every step and fragment fixed ones.

    The variable is read when CUDA starts. A process that started CUDA before training (the CLI's preflight reads the
    free memory; a ``model.source=build`` model is built on the GPU) would keep fixed segments, which reserve far
    more than the peak (BENCHMARKS.md, "Issue 14: the seed's whole job with the new default"): so the setting is
    also applied to the running allocator. A value the user set in ``PYTORCH_CUDA_ALLOC_CONF`` is kept (and
    applied as it is)."""
    conf = os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", ALLOC_CONF)
    import torch

    if torch.cuda.is_initialized():
        # torch >= 2.12 names it _accelerator_setAllocatorSettings; earlier ones torch.cuda.memory's
        setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
        try:
            (setter or torch.cuda.memory._set_allocator_settings)(conf)
        except (RuntimeError, AttributeError) as e:  # training still runs, on the segments it has
            log.warning("could not apply PYTORCH_CUDA_ALLOC_CONF=%s to the running allocator: %s", conf, e)


def use_liger(training, device: str) -> bool:
    """``training.use_liger_kernel``; auto: on CUDA when liger-kernel is installed."""
    if training.use_liger_kernel != "auto":
        return bool(training.use_liger_kernel)
    if device != "cuda":
        return False
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return False
    return True


def pin_liger_triton() -> str | None:
    """Keep Liger on its Triton kernels, the ones measured (BENCHMARKS.md); returns the pinned name, or None.

    Liger >= 0.8.5 picks a kernel set per op when it is called, and prefers its CuTe DSL kernels wherever NVIDIA's
    CUTLASS DSL imports, which flash-attention 4 installs; with packed rows those made the whole step much slower
    (BENCHMARKS.md, "Liger's CuTe DSL trap"). A user's own choice (``LIGER_KERNEL_IMPL``, or a per-op
    ``LIGER_KERNEL_IMPL_<OP>``, which Liger reads first) is kept; an older Liger has Triton kernels only."""
    if os.environ.get("LIGER_KERNEL_IMPL") or os.environ.get("LIGER_KERNEL_BACKEND"):
        return None
    try:
        from liger_kernel.backends import get_impl, set_impl
    except ImportError:
        return None
    if get_impl() is None:
        set_impl(LIGER_IMPL)
    return get_impl()


def compile_layers(layers) -> None:
    """Regional torch.compile: each decoder layer alone (one graph reused by all 32), shapes dynamic (packing)."""
    import torch

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for layer in layers:
        layer.compile(dynamic=True)


def warm_masks(trainer) -> None:
    """Compile flex attention's block mask for two short lengths, so the first real step finds it compiled for any.

    transformers builds the mask with ``torch.compile(create_block_mask)``; its first compile specializes on the
    first length it sees and only a second length makes Dynamo recompile it for every length. A first step of a
    full packed micro-batch stalled in that specialized compile for minutes (BENCHMARKS.md, "Issue 15: ... the
    first-step stall"), while the measured plan's probes (one row, then two) had always warmed it before training.
    This does the same when the plan is not measured (a given or fallen-back batch). Forward only, no gradients.
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
