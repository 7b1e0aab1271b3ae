"""The real model / data-set path, exercised with local stand-ins, and its failures offline."""
from __future__ import annotations

import shutil
from pathlib import Path

import datasets
import pytest

from sft_pipeline import synthetic
from tests.conftest import error_line, run_flow


def _local_model(store: Path, dest: Path) -> Path:
    built = next(p for p in (store / "models").iterdir() if (p / "config.json").is_file())
    shutil.copytree(built, dest, ignore=shutil.ignore_patterns("manifest.json"))
    return dest


def _local_ultrachat(dest: Path) -> Path:
    """parquet files in ultrachat_200k's schema, named after its splits."""
    dest.mkdir(parents=True)
    for split, rows in synthetic.splits(160, 24, seed=7).items():
        datasets.Dataset.from_list(rows).to_parquet(str(dest / f"{split}.parquet"))
    return dest


@pytest.mark.slow  # 23 s in CI here (2-core, 2026-12-07)
def test_local_model_and_local_parquet(tiny_run, tmp_path):
    store, _, _ = tiny_run
    model = _local_model(store, tmp_path / "model")
    data = _local_ultrachat(tmp_path / "ultrachat")
    proc, summary = run_flow(tmp_path / "store", "model.source=local", f"model.name={model}", "data.source=local",
                             f"data.dataset={data}", "data.train_subset.fraction=0.5", "training.max_steps=4",
                             "generation.max_new_tokens=4")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert all(s["state"] == "Completed" for s in summary["stages"].values())
    stats = (Path(summary["stages"]["data"]["artifact"]) / "stats.json").read_text()
    assert '"rows": 80' in stats and str(data) in stats


def test_gated_model_without_token_fails_early_and_clearly(tmp_path):
    proc, summary = run_flow(tmp_path / "store", recipe="mistral-7b-qlora")
    assert proc.returncode == 2  # refused before any stage (the flow's preflight also asks the Secret block)
    last = error_line(proc)
    assert "gated" in last and "HF_TOKEN" in last and "hf-token" in last
    assert not summary.get("stages")  # nothing ran


def test_hub_data_offline_is_a_clear_error(tmp_path):
    proc, summary = run_flow(tmp_path / "store", recipe="mistral-7b-qlora", env={"HF_TOKEN": "hf_test_not_real"})
    assert proc.returncode == 1
    last = error_line(proc)
    assert "HuggingFaceH4/ultrachat_200k" in last and "offline" in last
    assert summary["stages"]["authenticate"]["state"] == "Completed"
    assert summary["stages"]["data"]["state"] == "Failed"
    assert not any((tmp_path / "store" / "data").glob("*")) if (tmp_path / "store" / "data").exists() else True
