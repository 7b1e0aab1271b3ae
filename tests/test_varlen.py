"""The varlen attention for packed rows (sft_pipeline/varlen.py), on CPU.

PyTorch's flash-attention varlen kernel runs on CUDA only; here a reference kernel with the same call (per-sequence
causal SDPA over the cumulative starts) stands in for it, so what is tested is ours: the layout and head handling
around the kernel, the sequence starts from position_ids, the grouped-query check, the choice of attention, the
config check. The kernel itself was measured on an H200 (BENCHMARKS.md: the same losses as flex attention).
"""
from __future__ import annotations

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
