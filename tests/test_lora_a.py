"""The A matrices of the adapters that read one input as one GEMM (``speed`` lora_a: fused, ``training.lora.fuse_lora_a``),
on CPU: the same loss and gradients as one GEMM per adapter with the same (shared) dropout mask."""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import MistralConfig, MistralForCausalLM

from sft_pipeline.training.lora import fuse_lora_a as _fuse_lora_a, fuse_lora_add as _fuse_lora_add, \
    share_dropout as _share_dropout
from tests.conftest import LORA_TARGETS as TARGETS, tiny_lora_model, tiny_trainer_inputs

def _model(dropout: float, fuse_a: bool):
    model = tiny_lora_model(TARGETS, dropout)
    layers = model.base_model.model.model.layers
    _share_dropout(layers)
    _fuse_lora_add(model)
    fused = _fuse_lora_a(layers, shared_dropout=True) if fuse_a else 0
    return model, fused


def _grads(model, ids, checkpointing: bool = False):
    if checkpointing:
        model.base_model.model.gradient_checkpointing_enable({"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    torch.manual_seed(1)  # the same masks: the fused path draws one per input, as the shared dropout does
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_same_loss_and_gradients_as_one_gemm_per_adapter(dropout):
    ids = torch.randint(3, 97, (2, 12))
    loss, grads = _grads(_model(dropout, False)[0], ids)
    model, fused = _model(dropout, True)
    assert fused == 2 * (3 + 2)  # q/k/v and gate/up in each of the 2 layers; o_proj reads its own input
    fused_loss, fused_grads = _grads(model, ids)
    assert fused_loss == pytest.approx(loss, abs=1e-6)
    assert grads.keys() == fused_grads.keys()
    assert all(torch.allclose(grads[n], fused_grads[n], atol=1e-6, rtol=1e-5) for n in grads)
    assert all(g.abs().sum() > 0 for n, g in fused_grads.items() if "lora_A" in n)  # every A matrix learns
    group = model.base_model.model.model.layers[0].self_attn.q_proj.__dict__["_sft_lora_a"]
    assert group.parts is None  # nothing held once q, k and v have their part (autograd keeps what it needs)


def test_gradient_checkpointing_recomputes_the_group():
    ids = torch.randint(3, 97, (1, 16))
    loss, plain = _grads(_model(0.3, True)[0], ids)
    ckpt_loss, ckpt = _grads(_model(0.3, True)[0], ids, checkpointing=True)
    assert ckpt_loss == pytest.approx(loss, abs=1e-6)
    assert all(torch.allclose(plain[n], ckpt[n], atol=1e-6) for n in plain)


def test_not_fused_when_each_adapter_draws_its_own_mask():
    torch.manual_seed(0)
    base = MistralForCausalLM(MistralConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=4, num_key_value_heads=2))
    model = get_peft_model(base, LoraConfig(r=4, lora_dropout=0.3, target_modules=TARGETS))
    assert _fuse_lora_a(model.base_model.model.model.layers, shared_dropout=False) == 0
    nodrop = get_peft_model(MistralForCausalLM(base.config), LoraConfig(r=4, lora_dropout=0.0, target_modules=TARGETS))
    assert _fuse_lora_a(nodrop.base_model.model.model.layers, shared_dropout=False) == 3 + 2  # no masks to share


def test_evaluation_disabled_and_merged_adapters():
    ids = torch.randint(3, 97, (1, 8))
    plain = _model(0.0, False)[0].eval()
    model = _model(0.0, True)[0].eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-5)
        with model.disable_adapter(), plain.disable_adapter():
            assert torch.allclose(model(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-6)
        tuned = model(input_ids=ids).logits
        model.merge_adapter()  # merged weights: the adapters must not be added a second time
        assert torch.allclose(model(input_ids=ids).logits, tuned, atol=1e-5)


def test_the_train_stage_fuses_when_asked_and_trains_the_same(tiny_run, tmp_path):
    """Through build_trainer on the tiny recipe's 4-bit base, with dropout: two steps, the same losses."""
    from sft_pipeline.config import load_config
    from sft_pipeline.training.build import build_trainer
    from sft_pipeline.training.job import TrainData, TrainJob

    cfg = load_config("tiny", ["training.max_steps=2", "training.logging_steps=1", "training.save_steps=100",
                               "lora.dropout=0.2"])
    ds, tok, model_dir = tiny_trainer_inputs(tiny_run, rows=16)
    losses = {}
    for lora_a in ("per-module", "fused"):
        job = TrainJob.from_config(cfg, model_path=str(model_dir), work=str(tmp_path / lora_a), device="cpu",
                                   speed={"lora_a": lora_a})
        trainer, metrics = build_trainer(job, TrainData(ds, None, tok))
        assert (metrics.get("fused_lora_a_modules", 0) > 0) is (lora_a == "fused")
        trainer.train()
        losses[lora_a] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses["fused"]) == 2 and losses["fused"] == pytest.approx(losses["per-module"], abs=1e-4)


def test_the_glue_paths_step_aside_under_fsdp_and_compile():
    """FSDP wraps each LoRA matrix as its own unit (peft's policy): its weight is whole only in its own forward."""
    from sft_pipeline.parallel import parallel_args
    from sft_pipeline.training.build import SPEED
    from sft_pipeline.training.lora import lora_glue

    assert lora_glue(SPEED, None) == (True, True)  # one process: both, the default
    assert lora_glue(SPEED, parallel_args("ddp", 5, 2, "cuda")) == (True, True)  # DDP: whole weights on each rank
    assert lora_glue(SPEED, parallel_args("fsdp", 5, 2, "cuda")) == (False, False)
    assert lora_glue({**SPEED, "compile": True}, None) == (True, False)
    assert lora_glue({**SPEED, "lora_add": "peft"}, None) == (False, False)  # the fused A goes through addmm's forward
