"""The frozen 4-bit base kept dequantized, when the card has the room (a speed lever of the train stage).

bitsandbytes dequantizes every 4-bit weight in each forward and again in each backward (for the input gradient):
for a packed micro-batch it unpacks the nested absmax, dequantizes the weight into a fresh bf16 buffer and calls
``F.linear``. The base is frozen, so the dequantized weights never change: holding them once gives the same GEMMs
on the same numbers, without the dequantization kernels and the buffers they fill (twice a micro-batch, forward and
backward). It costs memory: a 7B's linear layers take about four times as much in bf16 as in nf4, so the train stage
does it only when the measured batch plan's micro-batch leaves that much room (``training.build``). QLoRA's point,
training a 7B on a small card, is untouched: there the plan leaves no room and the weights stay 4-bit. What it gave
and cost on a GPU: BENCHMARKS.md, "Issue 14: baselines as medians of 3, ... the base kept dequantized".
"""
from __future__ import annotations


def _four_bit(model):
    """(parent, attribute name, layer) for every bitsandbytes 4-bit linear layer in ``model``."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # no bitsandbytes: nothing is 4-bit
        return []
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, Linear4bit)]


def _bytes(t) -> int:
    return t.numel() * t.element_size()


def _compute_dtype(layer):
    return layer.compute_dtype or layer.weight.quant_state.dtype


def extra_bytes(model) -> int:
    """How much more memory the 4-bit linear layers take dequantized (0 when there are none)."""
    extra = 0
    for _, _, layer in _four_bit(model):
        state = layer.weight.quant_state
        held = _bytes(layer.weight.data) + _bytes(state.absmax)
        if state.nested:
            held += _bytes(state.state2.absmax)
        dtype = _compute_dtype(layer)
        extra += state.shape.numel() * dtype.itemsize - held
    return max(extra, 0)


def room_for(plan, extra: int) -> bool:
    """Whether a batch plan (``training.batch.BatchPlan``) leaves ``extra`` bytes beside its micro-batch (its
    ``spare_gib``): the fastest micro-batch comes first, the dequantized weights take only what it leaves."""
    return 0 < extra <= (plan.spare_gib or 0) * 2**30


def keep_dequantized(model) -> int:
    """Replace every 4-bit linear layer by a frozen layer holding its dequantized weight; returns how many.

    The forward is bitsandbytes' own for a batch of rows (input in the compute dtype, ``F.linear`` with the
    dequantized weight, output back in the input's dtype), so losses and gradients stay the same."""
    import torch
    from bitsandbytes.functional import dequantize_4bit

    class Dequantized(torch.nn.Linear):
        def forward(self, x):
            return torch.nn.functional.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)

    layers = _four_bit(model)
    count = len(layers)
    while layers:  # one at a time, each 4-bit weight freed before the next: memory grows by about extra_bytes
        parent, name, layer = layers.pop()
        dtype = _compute_dtype(layer)
        weight = dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(dtype)
        new = Dequantized(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        new.weight = torch.nn.Parameter(weight, requires_grad=False)
        if layer.bias is not None:
            new.bias = torch.nn.Parameter(layer.bias.data.to(dtype), requires_grad=False)
        new.train(layer.training)
        setattr(parent, name, new)
        del layer  # the 4-bit weight goes with the old layer, before the next is dequantized
    return count
