"""LoRA's glue made cheaper than peft's, with the same numbers: one dropout mask per input, the adapter added inside
its second GEMM, and the A matrices of the adapters that read one input as one GEMM.

What each gave on a GPU: BENCHMARKS.md, "Issue 14, target 1: the LoRA glue levers".
"""
from __future__ import annotations

SAME_INPUT = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}  # per decoder layer


def lora_glue(speed: dict, parallel: dict | None) -> tuple[bool, bool]:
    """Whether the adapters add inside their second GEMM (``fuse_lora_add``) and q/k/v's A matrices run as one GEMM
    (``fuse_lora_a``). Neither under FSDP: peft's wrap policy makes each LoRA matrix its own FSDP unit, whose weight
    is whole only inside its own forward, which these paths do not call. The fused A needs the addmm forward, and
    not regional torch.compile (its Python-side bookkeeping is not for Dynamo)."""
    addmm = speed["lora_add"] == "addmm" and "fsdp" not in (parallel or {})
    return addmm, addmm and speed["lora_a"] == "fused" and not speed["compile"]


def same_input(layers):
    """Per decoder layer and block (``SAME_INPUT``), the LoRA modules that read one input, where there are two or
    more: what ``share_dropout`` and ``fuse_lora_a`` group."""
    from peft.tuners.lora import LoraLayer

    for layer in layers:
        for block_name, names in SAME_INPUT.items():
            block = getattr(layer, block_name, None)
            modules = [m for m in (getattr(block, n, None) for n in names) if isinstance(m, LoraLayer)]
            if len(modules) >= 2:
                yield modules


def share_dropout(layers) -> int:
    """One LoRA dropout mask per input instead of one per adapted module; returns how many modules now share one.

    q, k and v (and gate and up) read the same input. peft gives each adapter its own dropout, so a step draws three
    masks over that input, keeps three dropped copies for the backward and runs three dropout backwards (what that
    costs: BENCHMARKS.md, "Issue 14, continued", ``nodrop``). Sharing keeps one. The same mask for q, k and v is a
    different noise from three independent ones (still dropout on the adapters' input, with the same rate); the base
    model's path is untouched. The mask is reused only for the very same input tensor (a weak reference), so a
    recomputed forward (gradient checkpointing) draws its own again.
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
    for modules in same_input(layers):
        for adapter, first in modules[0].lora_dropout.items():
            if isinstance(first, torch.nn.Dropout) and first.p > 0:
                one = SharedDropout(first.p, len(modules)).train(first.training)
                for m in modules:
                    m.lora_dropout[adapter] = one
                shared += len(modules)
    return shared


def fuse_lora_add(model) -> int:
    """Each LoRA module adds its adapter inside the adapter's second GEMM; returns how many modules do.

    peft computes ``result = base(x).clone() + lora_B(lora_A(dropout(x))) * scaling``: besides the two small GEMMs a
    copy, a multiply and an add, each a full pass over the layer's output. ``torch.addmm(base, lora_A(dropout(x)),
    B^T, alpha=scaling)`` does the multiply-add in the GEMM (one rounding instead of three). Anything else takes
    peft's own forward: several or disabled adapters, merged weights, variants (DoRA), an adapter bias, or mixed
    dtypes without autocast.
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
        group = self.__dict__.get("_sft_lora_a")  # fuse_lora_a: one GEMM for the adapters reading this input
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


def _fused_a(modules, p: float):
    """One GEMM for the A matrices of ``modules`` (which read one input); each module takes its part of it."""
    import weakref

    import torch

    class FusedA:
        def __init__(self):
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

    return FusedA()


def fuse_lora_a(layers, shared_dropout: bool) -> int:
    """The adapters that read one input (q, k and v) run their A matrices as one GEMM; returns how many modules do.

    peft runs ``lora_A(dropout(x))`` once per adapter: three GEMMs that each read ``x`` (a full pass over the layer's
    input for an output of r columns), and in the backward three input gradients summed by two more passes. One GEMM
    with the A matrices stacked reads ``x`` once and gives one input gradient. Only with one dropout mask for the
    group (``lora.shared_dropout``, or no dropout): the mask is drawn once, as ``share_dropout`` draws it, so the
    numbers equal the unfused path's up to rounding. Works through ``fuse_lora_add``'s forward (call that first);
    a module that takes peft's own forward (disabled or several adapters, merged weights) reads ``x`` alone.
    """
    import torch

    fused = 0
    for modules in same_input(layers):
        modules = [m for m in modules
                   if "_sft_lora_a" not in m.__dict__ and isinstance(getattr(m, "base_layer", None), torch.nn.Linear)]
        rates = {getattr(d, "p", 0.0) for m in modules for d in m.lora_dropout.values()}
        if len(modules) < 2 or len(rates) != 1 or (rates != {0.0} and not shared_dropout):
            continue
        group = _fused_a(modules, rates.pop())
        for m in modules:
            m.__dict__["_sft_lora_a"] = group
        fused += len(modules)
    return fused
