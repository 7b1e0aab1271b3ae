"""The 4-bit base kept dequantized when the card has room (``sft_pipeline/base_weights.py``), on CPU."""
from __future__ import annotations

import pytest
import torch

from sft_pipeline import base_weights
from sft_pipeline.training.batch import choose_batch
from tests.conftest import tiny_trainer_inputs

GIB = 2**30


def _tuned(model_dir):
    """The tiny recipe's 4-bit base (bitsandbytes nf4 + double quant, on CPU) with its LoRA adapter."""
    from peft import LoraConfig, get_peft_model

    from sft_pipeline.config import load_config
    from sft_pipeline.models import load_model

    cfg = load_config("tiny", [])
    assert cfg.quantization.load_in_4bit and cfg.quantization.double_quant
    torch.manual_seed(0)
    model = load_model(str(model_dir), cfg.model, cfg.quantization, "cpu", training=True)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False,
                                            target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM"))


def _step(model, ids):
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_dequantized_base_gives_the_same_loss_and_gradients(tiny_run):
    from bitsandbytes.nn import Linear4bit

    _, _, model_dir = tiny_trainer_inputs(tiny_run, rows=1)
    four_bit, kept = _tuned(model_dir), _tuned(model_dir)
    ids = torch.randint(3, four_bit.config.vocab_size, (2, 24))
    n4 = sum(isinstance(m, Linear4bit) for m in kept.modules())
    extra = base_weights.extra_bytes(kept)
    states = [m.weight.quant_state for m in kept.modules() if isinstance(m, Linear4bit)]
    absmax = sum(t.numel() * t.element_size() for q in states for t in (q.absmax, q.state2.absmax))  # not parameters
    params_before = sum(p.numel() * p.element_size() for p in kept.parameters())
    assert n4 > 0 and extra > 0

    assert base_weights.keep_dequantized(kept) == n4
    assert not any(isinstance(m, Linear4bit) for m in kept.modules())
    assert base_weights.extra_bytes(kept) == 0  # nothing left to dequantize
    params_after = sum(p.numel() * p.element_size() for p in kept.parameters())
    # the memory it takes is what the parameters grew by, less the 4-bit weights' scales that went with them
    assert extra == params_after - params_before - absmax > 0
    assert all(not p.requires_grad for n, p in kept.named_parameters() if "lora_" not in n)

    loss, grads = _step(four_bit, ids)
    kept_loss, kept_grads = _step(kept, ids)
    assert kept_loss == pytest.approx(loss, rel=1e-6)
    assert grads.keys() == kept_grads.keys() and len(grads) > 0
    assert all(torch.allclose(grads[n], kept_grads[n], rtol=1e-5, atol=1e-7) for n in grads)


def test_a_model_without_4bit_layers_has_nothing_to_keep():
    layer = torch.nn.Sequential(torch.nn.Linear(8, 8))
    assert base_weights.extra_bytes(layer) == 0 and base_weights.keep_dequantized(layer) == 0


# The 7B's numbers measured on an H200 (BENCHMARKS.md): 4.4 GiB that do not grow with the micro-batch, 7.3 GiB a
# packed row of 2048, and 9.6 GiB more for the linear layers in bf16 than in nf4 + double quant.
FIXED, PER_ROW, EXTRA = 4.4 * GIB, 7.3 * GIB, 9.6 * GIB


@pytest.mark.parametrize("card_gib, micro, keeps", [(139.1, 8, True), (79.1, 8, False), (50, 4, True),
                                                    (40, 4, False)])
def test_the_micro_batch_comes_first_then_the_dequantized_weights(card_gib, micro, keeps):
    plan = choose_batch(16, int(card_gib * GIB), int(FIXED), int(PER_ROW), 32)
    assert plan.per_device_batch_size == micro and not plan.gradient_checkpointing
    assert base_weights.room_for(plan, int(EXTRA)) is keeps
    assert not base_weights.room_for(plan, 0)  # no 4-bit layers: nothing to keep
