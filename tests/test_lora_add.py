"""The adapter added inside its own GEMM (``speed`` lora_add: addmm, ``training.lora.fuse_lora_add``), on CPU."""
from __future__ import annotations

import pytest
import torch

from sft_pipeline.training.lora import fuse_lora_add as _fuse_lora_add
from tests.conftest import tiny_lora_model, tiny_trainer_inputs


def _model(dropout: float):
    return tiny_lora_model(["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"], dropout)


def _step(model, ids):
    model.train()
    torch.manual_seed(1)  # the same dropout masks: the fused path draws them in the same order as peft's
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_same_loss_and_gradients_as_peft(dropout):
    ids = torch.randint(3, 97, (2, 12))
    loss, grads = _step(_model(dropout), ids)
    fused_model = _model(dropout)
    assert _fuse_lora_add(fused_model) == 2 * 5
    fused_loss, fused_grads = _step(fused_model, ids)
    assert fused_loss == pytest.approx(loss, abs=1e-6)
    assert grads.keys() == fused_grads.keys()
    assert all(torch.allclose(grads[n], fused_grads[n], atol=1e-6, rtol=1e-5) for n in grads)


def test_other_cases_take_peft_forward():
    ids = torch.randint(3, 97, (1, 8))
    model = _model(0.0)
    _fuse_lora_add(model)
    model.eval()
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        with model.disable_adapter():  # the base alone
            base = model(input_ids=ids).logits
        model.merge_adapter()  # merged weights: the adapter must not be added a second time
        merged = model(input_ids=ids).logits
    assert not torch.allclose(tuned, base, atol=1e-4)
    assert torch.allclose(merged, tuned, atol=1e-5)
    plain = _model(0.0).eval()
    with torch.no_grad(), plain.disable_adapter():
        assert torch.allclose(plain(input_ids=ids).logits, base, atol=1e-6)


def test_the_train_stage_on_4bit_weights_trains_the_same(tiny_run, tmp_path):
    """Through build_trainer on the tiny recipe's 4-bit (bitsandbytes nf4) base: one step, the same loss."""
    from sft_pipeline.config import load_config
    from sft_pipeline.training.build import build_trainer
    from sft_pipeline.training.job import TrainData, TrainJob

    cfg = load_config("tiny", ["training.max_steps=2", "training.logging_steps=1", "training.save_steps=100"])
    ds, tok, model_dir = tiny_trainer_inputs(tiny_run, rows=16)
    losses = {}
    for addmm in (False, True):  # peft's own forward, then the default (addmm)
        job = TrainJob.from_config(cfg, model_path=str(model_dir), work=str(tmp_path / str(addmm)), device="cpu",
                                   speed=None if addmm else {"lora_add": "peft"})
        trainer, metrics = build_trainer(job, TrainData(ds, None, tok))
        assert cfg.quantization.load_in_4bit and (metrics.get("addmm_lora_modules", 0) > 0) is addmm
        trainer.train()
        losses[addmm] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses[True]) == 2 and losses[True] == pytest.approx(losses[False], abs=1e-4)
