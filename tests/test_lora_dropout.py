"""One LoRA dropout mask per input (``speed`` dropout: per-input, ``training.lora.share_dropout``), on CPU."""
from __future__ import annotations

import torch

from sft_pipeline.training.lora import share_dropout as _share_dropout
from tests.conftest import LORA_TARGETS as TARGETS, tiny_lora_model, tiny_trainer_inputs

def _model(dropout: float = 0.5):
    model = tiny_lora_model(TARGETS, dropout, alpha=8)
    return model, model.base_model.model.model.layers


def _adapter_inputs(model) -> dict[str, torch.Tensor]:
    """What each adapter of the first layer reads (its dropout's output), from one training forward."""
    seen, hooks = {}, []
    for name, module in model.base_model.model.model.layers[0].named_modules():
        if name.endswith("lora_A.default"):
            hooks.append(module.register_forward_pre_hook(lambda m, a, n=name: seen.__setitem__(n.split(".")[1], a[0])))
    model.train()
    model(input_ids=torch.randint(3, 97, (1, 12)))
    for h in hooks:
        h.remove()
    return seen


def test_adapters_reading_one_input_share_one_mask():
    model, layers = _model()
    before = _adapter_inputs(model)
    assert before["q_proj"] is not before["k_proj"] and not torch.equal(before["q_proj"], before["k_proj"])
    assert _share_dropout(layers) == 2 * (3 + 2)  # q/k/v and gate/up in each of the 2 layers; o_proj keeps its own
    after = _adapter_inputs(model)
    assert after["q_proj"] is after["k_proj"] is after["v_proj"] and after["gate_proj"] is after["up_proj"]
    assert after["o_proj"] is not after["q_proj"]
    dropped = (after["q_proj"] == 0).float().mean().item()
    assert 0.3 < dropped < 0.7  # still dropout at the configured rate (0.5)
    shared = layers[0].self_attn.q_proj.lora_dropout["default"]
    assert shared.out is None  # nothing held once q, k and v have their input (autograd keeps what it needs)


def test_evaluation_is_unchanged_and_training_still_learns_through_every_adapter():
    model, layers = _model()
    ids = torch.randint(3, 97, (2, 10))
    model.eval()
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    _share_dropout(layers)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, plain)  # no dropout in evaluation, shared or not
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_gradient_checkpointing_recomputes_the_same_shared_mask():
    """The recomputed forward draws its mask again from the restored RNG (a new input tensor: never the stale
    cached one), so the gradients equal those of the same step without checkpointing."""
    ids = torch.randint(3, 97, (1, 16))

    def grads(checkpointing: bool):
        model, layers = _model()
        _share_dropout(layers)
        if checkpointing:
            model.base_model.model.gradient_checkpointing_enable({"use_reentrant": False})
            model.enable_input_require_grads()
        model.train()
        torch.manual_seed(1)
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys()
    assert all(torch.allclose(plain[n], ckpt[n], atol=1e-6) for n in plain)


def test_the_train_stage_shares_masks_unless_the_recipe_says_not(tiny_run, tmp_path):
    from sft_pipeline.config import load_config
    from sft_pipeline.training.build import build_trainer
    from sft_pipeline.training.job import TrainData, TrainJob

    ds, tok, model_dir = tiny_trainer_inputs(tiny_run, rows=8)
    for shared in (True, False):
        cfg = load_config("tiny", ["training.max_steps=1", "lora.dropout=0.1", f"lora.shared_dropout={shared}"])
        job = TrainJob.from_config(cfg, model_path=str(model_dir), work=str(tmp_path), device="cpu")
        trainer, metrics = build_trainer(job, TrainData(ds, None, tok))
        attn = trainer.model.get_base_model().model.layers[0].self_attn
        same = attn.q_proj.lora_dropout["default"] is attn.k_proj.lora_dropout["default"]
        assert same is shared and (metrics.get("shared_dropout_modules", 0) > 0) is shared
