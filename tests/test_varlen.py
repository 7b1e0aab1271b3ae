"""The varlen attention for packed rows (sft_pipeline/varlen.py), on CPU.

PyTorch's flash-attention varlen kernel runs on CUDA only; here a reference kernel with the same call (per-sequence
causal SDPA over the cumulative starts) stands in for it, so what is tested is ours: the layout and head handling
around the kernel, the sequence starts from position_ids, the grouped-query check, the choice of attention, the
config check. The kernel itself was measured on an H200 (BENCHMARKS.md: the same losses as flex attention).
"""
from __future__ import annotations

import importlib.machinery
import os

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from sft_pipeline import varlen


def reference_kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
    """torch 2.11's varlen_attn call (no enable_gqa; causal as window (-1, 0)), computed per sequence with SDPA."""
    assert torch.equal(cu_q, cu_k) and max_q == int((cu_q[1:] - cu_q[:-1]).max())
    assert q.shape[0] == int(cu_q[-1]) and q.dim() == 3  # (tokens, heads, dim)
    out = []
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        qs, ks, vs = (t[a:b].transpose(0, 1)[None] for t in (q, k, v))
        out.append(torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, is_causal=tuple(window_size) == (-1, 0), scale=scale,
            enable_gqa=ks.size(1) != qs.size(1))[0].transpose(0, 1))
    return torch.cat(out)


def strict_kernel(q, k, v, *args, **kwargs):
    """A kernel that refuses fewer key/value heads than query heads."""
    if k.size(1) != q.size(1):
        raise RuntimeError("number of heads in key/value must equal the query's")
    return reference_kernel(q, k, v, *args, **kwargs)


@pytest.fixture(params=[reference_kernel, strict_kernel], ids=["grouped-heads", "repeated-heads"])
def kernel(request, monkeypatch):
    monkeypatch.setattr(varlen, "_kernel", lambda: request.param)
    monkeypatch.setattr(varlen, "_gqa", {})
    return request.param


def test_cu_seqlens_from_position_ids():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    cu, longest = varlen.cu_seqlens(pos)
    assert cu.tolist() == [0, 3, 5, 9] and cu.dtype == torch.int32 and longest == 4
    assert varlen.cu_seqlens(pos)[0] is cu  # remembered for the other layers of the same forward
    other = torch.tensor([[0, 1, 0, 1, 2, 3, 4, 5, 6]])  # a new batch: computed again, never mistaken for the last
    assert varlen.cu_seqlens(other)[0].tolist() == [0, 2, 9]
    assert varlen.cu_seqlens(torch.tensor([[5, 6, 7, 0, 1]]))[0].tolist() == [0, 3, 5]  # row starting mid-sequence


def test_packed_rows_attend_within_each_sequence(kernel):
    """Loss and gradients of a packed row through varlen equal those of each sequence alone (SDPA)."""
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=None)
    model = MistralForCausalLM(config).train()
    examples = [{"input_ids": torch.randint(3, 97, (n,)).tolist()} for n in (7, 13, 5)]
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)

    model.config._attn_implementation = varlen.register()
    loss = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], labels=packed["labels"],
                 use_cache=False).loss
    grads = torch.autograd.grad(loss, [p for p in model.parameters()])

    model.config._attn_implementation = "sdpa"
    alone = [model(input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["input_ids"]])) for e in examples]
    n = [len(e["input_ids"]) - 1 for e in examples]
    expected = sum(out.loss * k for out, k in zip(alone, n)) / sum(n)
    expected_grads = torch.autograd.grad(expected, [p for p in model.parameters()])
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, expected_grads))
    # grouped heads passed as they are when the kernel computes them right, else repeated
    assert varlen._gqa == {"cpu": kernel is reference_kernel}


def test_unpacked_batches_are_refused():
    model = MistralForCausalLM(MistralConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2)).eval()
    model.config._attn_implementation = varlen.register()
    with pytest.raises(ValueError, match="training.packing=true"):
        model(input_ids=torch.randint(3, 97, (2, 9)), use_cache=False)


def test_choice_of_attention(monkeypatch):
    from sft_pipeline.config import ModelConfig
    from sft_pipeline.models import attn_implementation, attn_label

    auto, asked = ModelConfig(), ModelConfig(attn_implementation="varlen")
    monkeypatch.setattr(varlen, "available", lambda: True)
    assert attn_implementation(auto, "cuda", training=True, packed=True) == varlen.VARLEN
    assert attn_implementation(auto, "cuda", training=True, packed=False) == "flex_attention"
    assert attn_implementation(auto, "cuda", packed=True) == varlen.VARLEN  # the evaluate stage's packed scoring
    assert attn_implementation(asked, "cuda", packed=True) == varlen.VARLEN
    assert attn_label(varlen.VARLEN) == "varlen" and attn_label("flex_attention") == "flex_attention"  # the log's name
    assert attn_implementation(auto, "cuda") == "sdpa"  # generation pads its batches
    assert attn_implementation(asked, "cuda") == "sdpa"
    assert attn_implementation(asked, "cpu", training=True, packed=True) == "sdpa"
    monkeypatch.setattr(varlen, "available", lambda: False)  # a torch without the kernel
    assert attn_implementation(auto, "cuda", training=True, packed=True) == "flex_attention"
    assert attn_implementation(auto, "cuda", packed=True) == "sdpa"  # scoring: SDPA finds the packed rows itself


def test_varlen_without_packing_is_a_config_error():
    from sft_pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="training.packing"):
        load_config("tiny", ["model.attn_implementation=varlen", "training.packing=false"])
    assert load_config("tiny", ["model.attn_implementation=varlen", "training.packing=true"])


# flash-attention 4 (``flash-attn-4``: CuTe DSL kernels) is CUDA-only and not installed here; a stand-in with its
# varlen function's keyword names (flash_attn.cute.interface.flash_attn_varlen_func, 4.0.0b36) and return value
# ((out, lse)) is computed by the per-sequence reference, so what is tested is ours: the call, the check, the choice.
def fake_fa4(q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, *,
             softmax_scale=None, causal=False, wrong=False):
    out = varlen.reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale=softmax_scale,
                           is_causal=causal and not wrong)
    return out, torch.zeros(q.size(1), q.size(0))


@pytest.fixture
def choice(monkeypatch):
    """The kernel choice as on a Hopper GPU (the check runs on CPU tensors), restored afterwards."""
    monkeypatch.setattr(varlen, "_choice", {"use": "auto", "kernel": None})
    monkeypatch.setattr(varlen, "_fa4_targets", lambda device: True)
    monkeypatch.setattr(varlen, "_torch_kernel", lambda: reference_kernel)
    return monkeypatch


def test_fa4_is_chosen_when_installed_and_it_agrees(choice):
    choice.setattr(varlen, "_fa4_function", lambda: fake_fa4)
    assert varlen._choose("cpu") is varlen.fa4_kernel
    varlen._choice["kernel"] = varlen.fa4_kernel
    assert varlen.kernel_label() == "flash-attn 4"
    varlen.use_kernel("torch")  # the benchmark's baseline: PyTorch's kernel even with flash-attention 4 installed
    assert varlen._choose("cpu") is reference_kernel
    with pytest.raises(ValueError, match="not one of auto, torch"):
        varlen.use_kernel("fa3")


@pytest.mark.parametrize("fa4", [None, "wrong", "raises"])
def test_fa4_is_not_used_when_absent_wrong_or_failing(choice, caplog, fa4):
    def raises(*a, **kw):
        raise RuntimeError("cutlass DSL: no compiler for this GPU")

    fn = {None: None, "wrong": lambda *a, **kw: fake_fa4(*a, **kw, wrong=True), "raises": raises}[fa4]
    choice.setattr(varlen, "_fa4_function", lambda: fn)
    with caplog.at_level("WARNING", logger="sft_pipeline.varlen"):
        assert varlen._choose("cpu") is reference_kernel
    varlen._choice["kernel"] = reference_kernel
    assert varlen.kernel_label() == "torch"
    assert ("using PyTorch's varlen kernel" in caplog.text) == (fa4 is not None)  # said why, when it was tried


def test_fa4_kernel_gives_a_packed_row_the_per_sequence_result(choice):
    """Through the model: a packed row's loss and gradients with the flash-attention 4 call equal the reference
    kernel's, grouped heads passed as they are (no repeat: flash-attention 4 takes them)."""
    choice.setattr(varlen, "_fa4_function", lambda: fake_fa4)
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=None)
    model = MistralForCausalLM(config).train()
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(
        [{"input_ids": torch.randint(3, 97, (n,)).tolist()} for n in (7, 13, 5)])
    model.config._attn_implementation = varlen.register()
    seen = []
    choice.setattr(varlen, "reference", lambda q, k, *a, **kw: seen.append(k.size(1)) or reference_kernel(
        q, k, *a, scale=kw.get("scale"), window_size=(-1, 0) if kw.get("is_causal") else (-1, -1)))
    losses = {}
    for name, kernel in (("fa4", varlen.fa4_kernel), ("torch", reference_kernel)):
        varlen._choice["kernel"] = kernel
        loss = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], labels=packed["labels"],
                     use_cache=False).loss
        losses[name] = (loss.item(), torch.autograd.grad(loss, list(model.parameters())))
    assert seen and set(seen) == {2}  # flash-attention 4 was called with the 2 key/value heads as they are
    assert losses["fa4"][0] == pytest.approx(losses["torch"][0], abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(losses["fa4"][1], losses["torch"][1]))


def test_flash_attention_4_alone_is_not_taken_for_flash_attn_2(tmp_path, monkeypatch):
    """flash-attention 4 installs ``flash_attn/cute`` only: ``import flash_attn`` then succeeds (a namespace
    package), yet transformers' flash_attention_2 would fail. auto must keep the varlen attention."""
    import sys

    from sft_pipeline.config import ModelConfig
    from sft_pipeline.models import attn_implementation, flash_attn_2_installed

    def fake_modules() -> list[str]:
        return [n for n in sys.modules if n == "flash_attn" or n.startswith("flash_attn.")]

    (tmp_path / "flash_attn" / "cute").mkdir(parents=True)
    (tmp_path / "flash_attn" / "cute" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in fake_modules():
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(varlen, "available", lambda: True)
    try:
        assert not flash_attn_2_installed()
        assert attn_implementation(ModelConfig(), "cuda", training=True, packed=True) == varlen.VARLEN
        (tmp_path / "flash_attn" / "flash_attn_interface.py").write_text("")  # flash-attn 2's own module
        assert flash_attn_2_installed()
        assert attn_implementation(ModelConfig(), "cuda", training=True, packed=True) == "flash_attention_2"
    finally:  # the namespace package find_spec imported stays in sys.modules: later tests would find it
        for name in fake_modules():
            del sys.modules[name]


@pytest.mark.parametrize("user", [None, "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR",
                                  "unwritable"])
def test_fa4_keeps_its_compiled_kernels_across_processes_unless_the_user_chose(tmp_path, monkeypatch, user):
    """flash-attention 4 reads its cache variables when imported: they must be set before, to a directory that
    exists; a user's own setting (either variable) is left as it is; where the cache cannot be made, flash-attention
    4 is still used (compiling in each process)."""
    import sys
    import types

    seen = {}
    cute = types.ModuleType("flash_attn.cute")

    def module_getattr(name):  # records the environment as flash-attention 4's import would read it
        seen.update({n: os.environ.get(n) for n in varlen.FA4_CACHE_ENV})
        if name == "flash_attn_varlen_func":
            return fake_fa4
        raise AttributeError(name)

    cute.__getattr__ = module_getattr
    package = types.ModuleType("flash_attn")
    package.__path__, package.__spec__ = [], importlib.machinery.ModuleSpec("flash_attn", None, is_package=True)
    package.cute = cute
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for name in varlen.FA4_CACHE_ENV:
        monkeypatch.setenv(name, "x")  # recorded, so that the teardown restores the variables' absence
        monkeypatch.delenv(name)
    if user == "unwritable":  # the cache's parent is a file
        (tmp_path / "cache").write_text("")
    elif user:
        monkeypatch.setenv(user, "0" if user.endswith("ENABLED") else str(tmp_path / "mine"))
    varlen._fa4_function.cache_clear()
    try:
        assert varlen._fa4_function() is fake_fa4
    finally:
        varlen._fa4_function.cache_clear()
    if user is None:
        where = tmp_path / "cache" / "sft-pipeline" / "flash-attn-cute"
        assert seen == {"FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED": "1", "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR": str(where)}
        assert where.is_dir()
    elif user == "unwritable":
        assert seen == {n: None for n in varlen.FA4_CACHE_ENV}
    else:
        assert seen == {n: os.environ.get(n) for n in varlen.FA4_CACHE_ENV} and list(seen.values()).count(None) == 1
        assert not (tmp_path / "cache").exists()
