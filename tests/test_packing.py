"""Padding-free packing keeps examples apart: a packed batch's loss is the token-weighted loss of its examples."""
from __future__ import annotations

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from tests.conftest import tiny_trainer_inputs


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_token_weighted_loss_alone(attn):
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, sliding_window=None,
                                             attn_implementation=attn)).eval()
    examples = [{"input_ids": torch.randint(3, 97, (n,)).tolist()} for n in (7, 13, 5)]
    with torch.no_grad():
        alone = [(model(input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["input_ids"]])).loss.item(),
                  len(e["input_ids"]) - 1) for e in examples]
        expected = sum(loss * n for loss, n in alone) / sum(n for _, n in alone)
        packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
        assert packed["input_ids"].shape == (1, 25) and "attention_mask" not in packed
        got = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], labels=packed["labels"],
                    use_cache=False).loss
        # the same tokens with causal attention across examples (what packing without per-sequence attention does)
        leaky = model(input_ids=packed["input_ids"], labels=packed["labels"]).loss
    assert got.item() == pytest.approx(expected, abs=1e-5)
    assert abs(leaky.item() - expected) > 1e-3


def test_train_stage_packs_with_per_sequence_attention(tiny_run, tmp_path):
    """The trainer the train stage builds: packed batches are padding-free, and the model keeps no KV cache
    (with one, transformers ignores packed position_ids and attends across examples)."""
    from sft_pipeline.config import load_config
    from sft_pipeline.training.build import build_trainer
    from sft_pipeline.training.job import TrainData, TrainJob

    cfg = load_config("tiny", ["training.packing=true", "training.max_steps=1"])
    ds, tok, model_dir = tiny_trainer_inputs(tiny_run, rows=16)
    job = TrainJob.from_config(cfg, model_path=str(model_dir), work=str(tmp_path), device="cpu")
    trainer, _ = build_trainer(job, TrainData(ds, None, tok))
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and "position_ids" in batch
    assert (batch["position_ids"][0] == 0).sum() > 1  # several examples in one row, positions restart for each
    assert trainer.model.config.use_cache is False


def test_evaluate_scores_packed_rows_as_it_scores_padded_ones(tmp_path):
    """The evaluate stage scores each batch as one padding-free row: the same base and tuned losses as padded batches
    (a row count that leaves a short last batch), and the model's attention and KV-cache settings are given back
    for generation afterwards."""
    import datasets
    from peft import LoraConfig, get_peft_model

    from tasks.evaluate import score

    torch.manual_seed(0)
    base = MistralForCausalLM(MistralConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, sliding_window=None,
                                            attn_implementation="eager"))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False)).eval()  # a non-zero adapter: tuned != base
    lengths = (7, 30, 5, 18, 11, 3, 25)
    rows = [{"input_ids": torch.randint(3, 97, (n,)).tolist()} for n in lengths]
    for r in rows[:3]:  # assistant-only loss on some rows: labels given, the prompt's tokens not scored
        r["labels"] = [-100] * 2 + r["input_ids"][2:]
    for r in rows[3:]:
        r["labels"] = list(r["input_ids"])
    ds = datasets.Dataset.from_list(rows)
    with torch.no_grad():
        padded = score(model, ds, 0, 3, "cpu", str(tmp_path / "a"), packed=False)
        packed = score(model, ds, 0, 3, "cpu", str(tmp_path / "b"), attn="sdpa")
    for which in ("base", "tuned"):
        assert packed[which]["eval_loss"] == pytest.approx(padded[which]["eval_loss"], rel=1e-5)
    assert abs(packed["tuned"]["eval_loss"] - packed["base"]["eval_loss"]) > 1e-3
    assert packed["tokens"] == sum(lengths)
    assert base.config._attn_implementation == "eager" and base.config.use_cache is True


def test_evaluate_scores_padding_free_only_with_a_per_sequence_kernel(monkeypatch):
    """The stage's choice (also what the bench's eval setting times): padding-free rows with torch's varlen kernel
    on CUDA, padded batches without it and on CPU."""
    from sft_pipeline import varlen
    from sft_pipeline.config import ModelConfig
    from tasks.evaluate import PAD_TO, scoring_mode

    padded = {"attn": None, "packed": False, "pad_to_multiple_of": PAD_TO}
    assert scoring_mode(ModelConfig(), "cpu") == padded
    monkeypatch.setattr(varlen, "available", lambda: True)
    assert scoring_mode(ModelConfig(), "cuda") == {"attn": varlen.VARLEN, "packed": True, "pad_to_multiple_of": PAD_TO}
    monkeypatch.setattr(varlen, "available", lambda: False)
    assert scoring_mode(ModelConfig(), "cuda") == padded
