"""Attention for packed rows through PyTorch's own flash-attention varlen kernel (no flash-attn package needed).

trl's padding-free packing puts several conversations into one row and marks where each starts with
``position_ids`` (0 at every start). Flash attention's "varlen" form takes exactly that: the cumulative sequence
starts, and attends within each conversation only. flash-attn has no wheel for this torch; PyTorch ships the same
kind of kernel as ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10, CUDA). Registered with transformers
under the name ``VARLEN`` (``model.attn_implementation: varlen``), for packed rows only: training with packing and
the evaluate stage's scoring (generation pads its batches and uses SDPA).

The kernel under it: flash-attention 4 (the ``flash-attn-4`` package: pure-Python wheels, kernels compiled on first
use by NVIDIA's CuTe DSL) on Hopper and Blackwell GPUs when it is installed and, checked once per process, gives the
same output and gradients as per-sequence SDPA on a small packed row; else PyTorch's own. ``use_kernel("torch")``
keeps PyTorch's (the benchmark compares the two).
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
import os
import weakref
from pathlib import Path

log = logging.getLogger("sft_pipeline.varlen")
VARLEN = "sft_varlen"
_seqlens: dict = {"ref": None, "value": None}  # the last position_ids seen and its (cu_seqlens, max_len)


def available() -> bool:
    """Whether the varlen attention can run here: CUDA and this torch's kernel (flash-attention 4, where it is used,
    runs on top of it: PyTorch's kernel is the fallback when its check fails)."""
    import torch

    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def cu_seqlens(position_ids):
    """(cumulative starts as int32, longest sequence) of a packed row: a sequence starts where the position is 0.

    Computed once per forward pass: the same ``position_ids`` tensor reaches all decoder layers, and it is
    remembered by identity (a weak reference, so a new batch at the same address is never mistaken for it).
    One device sync per forward (the longest length must be a host int for the kernel).
    """
    import torch

    if _seqlens["ref"] is not None and _seqlens["ref"]() is position_ids:
        return _seqlens["value"]
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).reshape(-1).to(torch.int32)
    if starts.numel() == 0 or int(starts[0]) != 0:  # a row that does not start a sequence: treat it as one
        starts = torch.cat([torch.zeros(1, dtype=torch.int32, device=flat.device), starts])
    cu = torch.cat([starts, torch.tensor([flat.numel()], dtype=torch.int32, device=flat.device)])
    value = (cu, int((cu[1:] - cu[:-1]).max()))
    _seqlens.update(ref=weakref.ref(position_ids), value=value)
    return value


FA4_ARCHS = (9, 10)  # compute capability majors flash-attention 4 targets (Hopper, Blackwell); measured on 9 only
_choice: dict = {"use": "auto", "kernel": None}  # "auto" or "torch"; the kernel chosen for this process


def use_kernel(use: str) -> None:
    """``"auto"``: flash-attention 4 where it is installed, targets this GPU and agrees with the reference (checked
    once per process); ``"torch"``: PyTorch's kernel. Takes effect at the next attention call."""
    if use not in ("auto", "torch"):
        raise ValueError(f"varlen kernel: {use!r} is not one of auto, torch")
    _choice.update(use=use, kernel=None)


def _torch_kernel():
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn


FA4_CACHE_ENV = ("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR")


def fa4_cache_dir() -> Path:
    """Where flash-attention 4 keeps the kernels it compiled, across processes and runs: each process otherwise
    compiles its kernels again on its first attention call (what that costs: BENCHMARKS.md, "Issue 14: the defaults
    beside the baselines ... flash-attention 4's compile cache"). Keyed there by its sources,
    the CUTLASS DSL's version, the GPU architecture and the kernel's shape parameters: a stale entry is never used."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sft-pipeline" / "flash-attn-cute"


@functools.lru_cache(maxsize=None)
def _fa4_function():
    """flash-attention 4's varlen function, or None when it is not installed (or does not import); looked up once
    (``fa4_kernel`` calls it in every layer). Its persistent compile cache is switched on (``fa4_cache_dir``) unless
    the user set either of its variables: they are read when flash-attention 4 is imported."""
    if importlib.util.find_spec("flash_attn") is None:
        return None
    if not any(name in os.environ for name in FA4_CACHE_ENV):
        where = fa4_cache_dir()
        try:  # a home that cannot be written (a locked-down container): compile in each process, as it would
            where.mkdir(parents=True, exist_ok=True)
            os.environ.update({FA4_CACHE_ENV[0]: "1", FA4_CACHE_ENV[1]: str(where)})
        except OSError as e:
            log.info("flash-attention 4: no persistent compile cache (%s)", e)
    try:
        from flash_attn.cute import flash_attn_varlen_func
    except Exception:  # noqa: BLE001 - a beta package whose compiler stack may be missing pieces: use torch's kernel
        return None
    return flash_attn_varlen_func


def fa4_kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, is_causal=False, enable_gqa=False):
    """flash-attention 4 behind torch's ``varlen_attn`` call: (tokens, heads, dim) in and out. Grouped key/value
    heads are taken as they are (``enable_gqa`` is accepted for the same call and needs nothing)."""
    out = _fa4_function()(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k,
                          softmax_scale=scale, causal=is_causal)
    return out[0] if isinstance(out, tuple) else out


def reference(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, is_causal=False, enable_gqa=False):
    """The same call computed per sequence with SDPA: what a kernel must agree with (and the CPU tests' kernel)."""
    import torch

    out = []
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        qs, ks, vs = (t[a:b].transpose(0, 1)[None] for t in (q, k, v))
        out.append(torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, is_causal=is_causal, scale=scale, enable_gqa=ks.size(1) != qs.size(1))[0].transpose(0, 1))
    return torch.cat(out)


def agrees(kernel, device, dtype) -> bool:
    """Whether ``kernel`` gives per-sequence causal attention's output and gradients on a small packed row with
    grouped heads (3 sequences, 8 query and 2 key/value heads of 128), within bf16 tolerance. Raising counts as no."""
    import torch

    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(120, h, 128, device=device, dtype=dtype, generator=g).requires_grad_() for h in (8, 2, 2))
    cu = torch.tensor([0, 40, 96, 120], dtype=torch.int32, device=device)
    try:
        with torch.enable_grad():  # the first call may come from an evaluation under no_grad
            got = kernel(q, k, v, cu, cu, 56, 56, is_causal=True, enable_gqa=True)
            grads = torch.autograd.grad(got.float().square().sum(), (q, k, v))
            want = reference(q, k, v, cu, cu, 56, 56, is_causal=True)
            want_grads = torch.autograd.grad(want.float().square().sum(), (q, k, v))
    except Exception as e:  # noqa: BLE001 - any failure of the candidate kernel means: do not use it
        log.warning("flash-attention 4 failed its check (%s: %s); using PyTorch's varlen kernel",
                    type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
        return False

    def close(a, b) -> bool:  # bf16 rounds 0.4 % of a value; summed over grouped heads, ~1 % of the largest
        a, b = a.detach().float(), b.detach().float()
        return a.shape == b.shape and float((a - b).abs().max()) <= 0.02 * float(b.abs().max())

    ok = close(got, want) and all(close(a, b) for a, b in zip(grads, want_grads))
    if not ok:
        log.warning("flash-attention 4 differs from per-sequence attention on a test row; using PyTorch's varlen "
                    "kernel")
    return ok


def _kernel():
    """The kernel for this process (chosen at the first attention call; see ``use_kernel``)."""
    if _choice["kernel"] is None:
        _choice["kernel"] = _choose()
    return _choice["kernel"]


def _choose(device: str = "cuda"):
    import torch

    if _choice["use"] == "auto" and _fa4_targets(device) and _fa4_function() is not None \
            and agrees(fa4_kernel, device, torch.bfloat16):
        log.info("attention: flash-attention 4's varlen kernel")
        return fa4_kernel
    return _torch_kernel()


def _fa4_targets(device: str) -> bool:
    import torch

    return device == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] in FA4_ARCHS


def kernel_label() -> str:
    """Which kernel the varlen attention runs (chosen now if no attention call has chosen it yet): ``flash-attn 4``
    or ``torch``."""
    return "flash-attn 4" if _kernel() is fa4_kernel else "torch"


@functools.lru_cache(maxsize=None)
def _accepts(kernel) -> frozenset:
    """The keyword arguments this torch's kernel takes (read once, not in every layer's call)."""
    return frozenset(inspect.signature(kernel).parameters)


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
              sliding_window: int | None = None, **kwargs):
    """transformers' attention-function interface: query/key/value (batch, heads, tokens, dim) -> (out, None)."""
    position_ids = kwargs.get("position_ids")
    if position_ids is None or query.size(0) != 1:  # transformers builds no padding mask for this implementation
        raise ValueError("model.attn_implementation=varlen attends within packed rows only: it needs "
                         "training.packing=true (one row with position_ids per micro-batch)")
    if dropout:
        raise ValueError("model.attn_implementation=varlen: attention dropout is not supported")
    cu, longest = cu_seqlens(position_ids)
    if sliding_window is not None and longest > sliding_window:
        raise ValueError(f"model.attn_implementation=varlen: a packed sequence of {longest} tokens is longer than "
                         f"the model's sliding window ({sliding_window}); use flex_attention")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, dim)
    kernel = _kernel()
    params = _accepts(kernel)
    extra = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    if k.size(1) != q.size(1):
        if "enable_gqa" in params:
            extra["enable_gqa"] = True
        elif not _native_gqa(q.device, q.dtype, extra):  # repeat each key/value head for its group of query heads
            k, v = (t.repeat_interleave(q.size(1) // t.size(1), dim=1) for t in (k, v))
    out = kernel(q, k, v, cu, cu, longest, longest, scale=scaling, **extra)
    return out[None], None  # (1, tokens, heads, dim), as transformers' other attention functions return


_gqa: dict = {}


def _native_gqa(device, dtype, extra: dict) -> bool:
    """Whether the kernel takes fewer key/value heads than query heads as they are (grouped-query attention).

    torch 2.11's ``varlen_attn`` has no ``enable_gqa`` flag; the flash kernel under it may still handle grouped
    heads. Checked once per process against repeated heads on a small input, forward and backward, never assumed:
    when it raises or differs, key/value heads are repeated (two copies per layer; what they cost: BENCHMARKS.md,
    "Issue 14, continued")."""
    import torch

    if device.type not in _gqa:
        kernel = _kernel()
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(96, h, 128, device=device, dtype=dtype, generator=g).requires_grad_()
                   for h in (8, 2, 2))
        cu = torch.tensor([0, 40, 96], dtype=torch.int32, device=device)
        try:
            with torch.enable_grad():  # the first call may come from an evaluation under no_grad
                native = kernel(q, k, v, cu, cu, 56, 56, **extra)
                grads = torch.autograd.grad(native.float().square().sum(), (q, k, v))
                rk, rv = (t.repeat_interleave(4, dim=1) for t in (k, v))
                ref = kernel(q, rk, rv, cu, cu, 56, 56, **extra)
                ref_grads = torch.autograd.grad(ref.float().square().sum(), (q, k, v))
            _gqa[device.type] = torch.allclose(native, ref, atol=2e-2, rtol=2e-2) and all(
                torch.allclose(a, b, atol=5e-2, rtol=5e-2) for a, b in zip(grads, ref_grads))
        except (RuntimeError, ValueError):
            _gqa[device.type] = False
    return _gqa[device.type]


def register() -> str:
    """Make ``VARLEN`` an attention implementation transformers knows (idempotent); returns the name."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, attention)
    return VARLEN
