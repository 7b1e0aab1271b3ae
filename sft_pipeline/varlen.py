"""Attention for packed rows through PyTorch's own flash-attention varlen kernel (no flash-attn package needed).

trl's padding-free packing puts several conversations into one row and marks where each starts with
``position_ids`` (0 at every start). Flash attention's "varlen" form takes exactly that: the cumulative sequence
starts, and attends within each conversation only. flash-attn has no wheel for this torch; PyTorch ships the same
kind of kernel as ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10, CUDA). Registered with transformers
under the name ``VARLEN`` (``model.attn_implementation: varlen``), for packed rows only: training with packing and
the evaluate stage's scoring (generation pads its batches and uses SDPA).
"""
from __future__ import annotations

import functools
import inspect
import weakref

VARLEN = "sft_varlen"
_seqlens: dict = {"ref": None, "value": None}  # the last position_ids seen and its (cu_seqlens, max_len)


def available() -> bool:
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


def _kernel():
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn


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
    when it raises or differs, key/value heads are repeated (what torch 2.11 cost: +0.75 GiB a packed row and two
    copies per layer, measured on an H200)."""
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
