"""Config: recipes, overrides, and clear errors (exit code 2, before any stage)."""
from __future__ import annotations

import pytest

from sft_pipeline.config import ConfigError, load_config, recipe_names
from tests.conftest import cli


def test_builtin_recipes_load():
    assert {"tiny", "mistral-7b-qlora", "zephyr-7b-qlora"} <= set(recipe_names())
    seed = load_config("mistral-7b-qlora")
    assert seed.model.name == "mistralai/Mistral-7B-v0.1" and seed.model.requires_token
    assert seed.data.train_subset.fraction == 0.05 and seed.data.test_subset.fraction == 0.1
    assert (seed.lora.r, seed.lora.alpha, seed.lora.dropout) == (64, 16, 0.1)
    assert seed.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert seed.quantization.quant_type == "nf4" and seed.quantization.double_quant
    assert (seed.training.per_device_batch_size, seed.training.gradient_accumulation_steps) == (1, 128)
    assert seed.training.gradient_checkpointing and seed.format.max_length == 2048
    zephyr = load_config("zephyr-7b-qlora")
    assert (zephyr.lora.r, zephyr.lora.dropout, zephyr.training.learning_rate) == (16, 0.05, 2e-4)
    assert len(zephyr.lora.target_modules) == 7 and zephyr.training.warmup_ratio == 0.1


def test_overrides_are_typed_and_validated():
    cfg = load_config("tiny", ["lora.r=4", "training.learning_rate=1e-4", "data.test_subset.count=10"])
    assert cfg.lora.r == 4 and cfg.training.learning_rate == 1e-4 and cfg.data.test_subset.count == 10
    with pytest.raises(ConfigError, match=r"lora\.r"):
        load_config("tiny", ["lora.r=0"])
    with pytest.raises(ConfigError, match=r"did you mean 'lora\.alpha'"):
        load_config("tiny", ["lora.alpah=8"])


def test_recipe_file_path(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("model: {source: build, name: tiny-mistral}\nlora: {r: 2}\n")
    cfg = load_config(str(p))
    assert cfg.recipe == "mine" and cfg.lora.r == 2


def test_cli_bad_config_exits_2_before_any_stage(tmp_path):
    proc = cli("run", "--store", str(tmp_path / "s"), "--set", "training.learning_rate=fast")
    assert proc.returncode == 2
    assert "training.learning_rate" in proc.stderr
    assert not (tmp_path / "s").exists()  # nothing ran, nothing written
    proc = cli("run", "--recipe", "tinny", "--store", str(tmp_path / "s"))
    assert proc.returncode == 2 and "did you mean 'tiny'" in proc.stderr
