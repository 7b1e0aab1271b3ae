"""The measured batch plan's decision, and the lean LM head's loss against trl's, on CPU."""
from __future__ import annotations

import pytest

from sft_pipeline.training.batch import MARGIN_MIN, choose_batch

GIB = 2**30


def test_largest_micro_batch_that_fits_without_checkpointing():
    # an 80 GiB card alone: 4 rows need 5 + 4 x 9 = 41 GiB, 8 rows 77 GiB > 90 % of 79: micro 4 x accumulation 4
    plan = choose_batch(16, 79 * GIB, 5 * GIB, 9 * GIB, 32)
    assert (plan.per_device_batch_size, plan.gradient_accumulation_steps) == (4, 4)
    assert plan.gradient_checkpointing is False and plan.checkpointed_layers == 0


def test_another_process_holding_30_gib_keeps_the_same_plan():
    # the case: 49 GiB left to us; the old per-token estimate picked micro-batch 2 here
    assert choose_batch(16, 49 * GIB, 5 * GIB, 9 * GIB, 32).per_device_batch_size == 4


def test_degrades_to_smaller_micro_batches_then_selective_checkpointing():
    micro = [choose_batch(16, a * GIB, 5 * GIB, 9 * GIB, 32).per_device_batch_size for a in (79, 40, 27, 18)]
    assert micro == [4, 2, 2, 1]
    some = choose_batch(16, 15 * GIB, 5 * GIB, 9 * GIB, 32)  # 1 row needs 14 GiB, usable 13 GiB
    assert some.per_device_batch_size == 1 and some.gradient_checkpointing
    assert 0 < some.checkpointed_layers < 32
    fewer = choose_batch(16, 14 * GIB, 5 * GIB, 9 * GIB, 32).checkpointed_layers
    assert fewer > some.checkpointed_layers  # less memory, more layers checkpointed
    assert choose_batch(16, 6 * GIB, 5 * GIB, 9 * GIB, 32).checkpointed_layers == 32  # nothing fits: all


def test_micro_batch_divides_the_effective_batch_and_respects_the_cap():
    assert choose_batch(12, 200 * GIB, GIB, GIB, 32).per_device_batch_size == 6  # 8 does not divide 12
    assert choose_batch(16, 200 * GIB, GIB, GIB, 32, cap=4).per_device_batch_size == 4
    # the margin: at least 2 GiB even on a small card (5 GiB there, 1 GiB fixed: a row may need 2 GiB, no more)
    assert choose_batch(1, 5 * GIB, GIB, 5 * GIB - MARGIN_MIN - GIB, 32).gradient_checkpointing is False
    assert choose_batch(1, 5 * GIB, GIB, 5 * GIB - MARGIN_MIN - GIB + 1, 32).gradient_checkpointing is True


def test_lean_head_gives_trls_loss(tmp_path):
    """The lean head (log-probs only, no metric syncs) trains on the same loss as trl's chunked head; ~15 s here."""
    import datasets
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from sft_pipeline.config import load_config
    from sft_pipeline.models import build_tokenizer
    from sft_pipeline.training.build import build_trainer
    from sft_pipeline.training.job import TrainData, TrainJob

    torch.manual_seed(0)
    MistralForCausalLM(MistralConfig(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "m")
    build_tokenizer().save_pretrained(tmp_path / "m")
    ds = datasets.Dataset.from_dict({"input_ids": [list(range(5, 5 + n)) for n in (7, 13, 5, 9)]})
    cfg = load_config("tiny", ["training.packing=true", "training.max_steps=1", "quantization.load_in_4bit=false"])
    losses = {}
    for head in ("trl", "lean"):
        job = TrainJob.from_config(cfg, model_path=str(tmp_path / "m"), work=str(tmp_path / head), device="cpu",
                                   max_length=64, speed={"head": head})
        trainer, metrics = build_trainer(job, TrainData(ds, None, build_tokenizer()))
        assert metrics["head"] == head
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.model.train()
        losses[head] = trainer.compute_loss(trainer.model, batch, num_items_in_batch=30).item()
    assert losses["lean"] == pytest.approx(losses["trl"], rel=1e-5)


# ~30 s here (two small CPU compiles): the mechanism behind the 2-GPU first-step stall's fix
@pytest.mark.slow  # 51 s in CI here (2-core, 2026-12-07)
def test_mask_warm_up_leaves_flex_attention_compiled_for_any_length():
    """After ``_warm_masks`` a new, long packed length runs without compiling again (what a first step of 16,384
    tokens needs: compiled for that length alone it stalled for minutes on GPUs); one length alone is not enough."""
    import types

    import torch
    from torch._dynamo.utils import counters
    from transformers import MistralConfig, MistralForCausalLM

    from sft_pipeline.training.cuda import warm_masks as _warm_masks

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=1000, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    model.config._attn_implementation = "flex_attention"

    def packed_forward(n: int) -> int:
        """Compiled graphs made by a forward of two packed sequences of n tokens."""
        before = counters["stats"]["unique_graphs"]
        with torch.no_grad():
            model(input_ids=torch.randint(3, 1000, (1, 2 * n)), position_ids=torch.arange(n).repeat(2)[None],
                  use_cache=False)
        return counters["stats"]["unique_graphs"] - before

    try:
        assert packed_forward(96) > 0  # one length seen: compiled for that length only
        assert packed_forward(512) > 0  # so a new length compiles again
        torch._dynamo.reset()
        model.train()
        _warm_masks(types.SimpleNamespace(model=model))
        assert model.training  # the warm-up leaves the mode as it was
        assert packed_forward(1024) == 0 and packed_forward(700) == 0
    finally:
        torch._dynamo.reset()


def _allocator_calls(monkeypatch, cuda_started: bool) -> list[str]:
    import torch

    calls: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: cuda_started)
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", calls.append, raising=False)
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", calls.append, raising=False)
    return calls


@pytest.mark.parametrize("cuda_started", [False, True])
def test_growable_memory_segments_even_when_cuda_started_before_training(monkeypatch, cuda_started):
    # the seed's job on an H200: the flow's preflight (or a model built on the GPU) had started CUDA before the train
    # stage set the variable, and the allocator reserved 132 GB for a 63.5 GiB peak; the running allocator is told too
    from sft_pipeline.training.cuda import ALLOC_CONF, expandable_segments

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    calls = _allocator_calls(monkeypatch, cuda_started)
    expandable_segments()
    import os

    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == ALLOC_CONF == "expandable_segments:True"
    assert calls == ([ALLOC_CONF] if cuda_started else [])


def test_the_users_allocator_setting_is_kept(monkeypatch):
    from sft_pipeline import cli
    from sft_pipeline.training.cuda import expandable_segments

    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    calls = _allocator_calls(monkeypatch, True)
    cli._quiet_env()
    expandable_segments()
    import os

    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128" and calls == ["max_split_size_mb:128"]


def test_the_cli_sets_it_before_anything_starts_cuda(monkeypatch):
    import os

    from sft_pipeline import cli

    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PREFECT_SERVER_ANALYTICS_ENABLED", "TOKENIZERS_PARALLELISM",
                 "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "TRANSFORMERS_NO_ADVISORY_WARNINGS"):
        monkeypatch.delenv(name, raising=False)  # what _quiet_env sets: restored after the test
    cli._quiet_env()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


def test_an_allocator_that_refuses_the_setting_is_warned_about_not_fatal(monkeypatch):
    import torch

    from sft_pipeline.training.cuda import expandable_segments
    from tests.conftest import capture_log

    def refuse(conf):
        raise RuntimeError("unrecognized allocator setting")

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", refuse, raising=False)
    logger, got = capture_log("sft_pipeline.train")
    try:
        expandable_segments()
    finally:
        logger.removeHandler(got)
    assert any("could not apply PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in line and "unrecognized" in line
               for line in got.lines), got.lines
