"""The Liger loss head goes through the model as the Trainer hands it over (under DDP, the wrapper that syncs the
gradients), and gives trl's loss: the sum of labelled tokens' cross-entropy over the effective batch's token count.

Liger's kernels need CUDA; here a plain-torch stand-in with the same call (weight, hidden, targets) takes their
place, so what is tested is the project's side: which forward runs, what reaches the loss, and that the LM head is
back in place afterwards (also when the forward fails).
"""
from __future__ import annotations

import sys
import types

import pytest
import torch

from sft_pipeline.training.loss import fast_loss as _fast_loss
from tests.conftest import tiny_lora_model


class _Reference(torch.nn.Module):
    """What LigerFusedLinearCrossEntropyLoss(reduction="sum") computes, without a kernel."""

    def __init__(self, reduction="sum"):
        super().__init__()
        self.reduction = reduction

    def forward(self, weight, hidden, target):
        if hidden.dtype != weight.dtype:  # as Liger's kernel: one dtype for the matmul
            raise RuntimeError(f"expected mat1 and mat2 to have the same dtype, but got: {hidden.dtype} != {weight.dtype}")
        return torch.nn.functional.cross_entropy(hidden @ weight.T, target, ignore_index=-100, reduction="sum")


class _Wrapper(torch.nn.Module):
    """Stands in for DistributedDataParallel around accelerate's mixed-precision forward: counts the forwards that
    went through it, and returns the outputs in a wider dtype (accelerate returns float32 from a bf16 model)."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.calls = 0

    def forward(self, *a, **kw):
        self.calls += 1
        out = self.module(*a, **kw)
        out.logits = out.logits.double()
        return out


@pytest.fixture()
def liger_stub(monkeypatch):
    pkg = types.ModuleType("liger_kernel")
    sub = types.ModuleType("liger_kernel.transformers")
    sub.LigerFusedLinearCrossEntropyLoss = _Reference
    pkg.transformers = sub
    monkeypatch.setitem(sys.modules, "liger_kernel", pkg)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", sub)


def _model():
    model = tiny_lora_model(["q_proj", "v_proj"], alpha=8, vocab=64, max_position_embeddings=64)
    model.base_model.model.config.use_cache = False
    return model


def _trainer_self(peft_model, world: int = 1):
    """The attributes FastLoss.compute_loss reads from the Trainer."""
    return types.SimpleNamespace(
        accelerator=types.SimpleNamespace(unwrap_model=lambda m: m.module if isinstance(m, _Wrapper) else m,
                                          num_processes=world),
        args=types.SimpleNamespace(average_tokens_across_devices=True), model=peft_model, _total_train_tokens=0,
        _metrics={"train": {}})


def _inputs():
    ids = torch.randint(3, 64, (1, 12))
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None]  # two packed rows
    labels = ids.clone()
    labels[0, :2] = -100
    labels[0, 5] = -100
    return {"input_ids": ids, "position_ids": pos, "labels": labels}


def test_liger_head_goes_through_the_wrapper_and_gives_the_reference_loss(liger_stub):
    peft_model = _model()
    wrapped = _Wrapper(peft_model)
    cls = _fast_loss(object, "liger")
    inputs = _inputs()
    n = (inputs["labels"][:, 1:] != -100).sum()

    peft_model.train()
    loss = cls.compute_loss(_trainer_self(peft_model), wrapped, inputs, num_items_in_batch=n)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in peft_model.named_parameters() if p.requires_grad}

    assert wrapped.calls == 1, "the loss's forward must go through the wrapper (DDP syncs gradients there)"
    assert isinstance(peft_model.get_base_model().lm_head, torch.nn.Linear), "the LM head is put back"

    peft_model.zero_grad(set_to_none=True)
    logits = peft_model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"]).logits
    expected = torch.nn.functional.cross_entropy(logits[0, :-1], inputs["labels"][0, 1:], ignore_index=-100,
                                                 reduction="sum") / n
    expected.backward()
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-6)
    assert grads and all(torch.allclose(grads[k], p.grad, rtol=1e-4, atol=1e-6)
                         for k, p in peft_model.named_parameters() if p.requires_grad)


def test_liger_head_puts_the_lm_head_back_when_the_forward_fails(liger_stub):
    peft_model = _model()
    head = peft_model.get_base_model().lm_head

    class Broken(_Wrapper):
        def forward(self, *a, **kw):
            raise RuntimeError("CUDA out of memory (simulated)")

    peft_model.train()
    with pytest.raises(RuntimeError, match="out of memory"):
        _fast_loss(object, "liger").compute_loss(_trainer_self(peft_model), Broken(peft_model), _inputs(),
                                                 num_items_in_batch=torch.tensor(8))
    assert peft_model.get_base_model().lm_head is head


@pytest.mark.parametrize("env", [None, "LIGER_KERNEL_IMPL", "LIGER_KERNEL_BACKEND"])
def test_liger_is_kept_on_its_triton_kernels(monkeypatch, env):
    """Liger >= 0.8.5 prefers its CuTe DSL kernels wherever NVIDIA's CUTLASS DSL imports (flash-attention 4 installs
    it): 42 % slower on an H200 (BENCHMARKS.md). The train stage pins the Triton kernels it measured, unless the user
    chose (their environment variable is kept), and does nothing on a Liger without the choice."""
    from sft_pipeline.training.cuda import LIGER_IMPL, pin_liger_triton

    pinned = {"impl": None}
    backends = types.ModuleType("liger_kernel.backends")
    backends.get_impl = lambda: pinned["impl"]
    backends.set_impl = lambda name: pinned.update(impl=name)
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.backends", backends)
    for name in ("LIGER_KERNEL_IMPL", "LIGER_KERNEL_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    if env:
        monkeypatch.setenv(env, "nvidia-cutedsl")
    assert LIGER_IMPL == "nvidia-triton"
    assert pin_liger_triton() == (None if env else "nvidia-triton")
    assert pinned["impl"] == (None if env else "nvidia-triton")
    if not env:  # a pin made elsewhere in the process (set_impl by the user's code) is kept too
        pinned["impl"] = "nvidia-cutile"
        assert pin_liger_triton() == "nvidia-cutile"
    monkeypatch.setitem(sys.modules, "liger_kernel.backends", None)  # Liger < 0.8.5: Triton kernels only
    monkeypatch.delenv("LIGER_KERNEL_IMPL", raising=False)
    monkeypatch.delenv("LIGER_KERNEL_BACKEND", raising=False)
    assert pin_liger_triton() is None
