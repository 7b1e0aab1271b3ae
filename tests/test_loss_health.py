"""Loss-curve health report on synthetic curves shaped like HF Trainer's log_history."""
from __future__ import annotations

import json
import math
import random

import pytest

from sft_pipeline import health


def history(losses, every: int = 1, evals: dict | None = None) -> list[dict]:
    """A log_history: one train entry per logged loss, eval entries at the given steps, the final summary entry."""
    out = []
    for i, loss in enumerate(losses, 1):
        step = i * every
        out.append({"loss": loss, "grad_norm": 0.5, "learning_rate": 1e-4, "epoch": step / 100, "step": step})
        if evals and step in evals:
            out.append({"eval_loss": evals[step], "eval_runtime": 1.0, "epoch": step / 100, "step": step})
    out.append({"train_runtime": 10.0, "train_loss": sum(losses) / len(losses), "epoch": 1.0,
                "step": len(losses) * every})
    return out


def falling(n: int = 60, noise: float = 0.02, seed: int = 0) -> list[float]:
    rnd = random.Random(seed)
    return [1.0 + 2.0 * math.exp(-i / 15) + rnd.uniform(-noise, noise) for i in range(n)]


METRICS = {"split": "test", "rows": 20, "base": {"eval_loss": 3.5, "perplexity": 33.1},
           "tuned": {"eval_loss": 1.1, "perplexity": 3.0}}


def test_healthy_falling_curve_gives_no_warning():
    report = health.check(history(falling()), METRICS)
    assert report["warnings"] == [] and report["ok"]
    assert report["trend"] == "falling" and not report["diverged"] and report["spikes"] == []
    assert report["steps"] == 60 and not report["too_few_steps"]
    assert not report["gap"]["eval_below_train"]
    assert any("went down" in s for s in report["sentences"])
    json.dumps(report, allow_nan=False)  # JSON-able, no NaN


def test_spike_is_found_at_its_step():
    losses = falling()
    losses[40] = losses[39] * 2.0
    report = health.check(history(losses), METRICS)
    assert [s["step"] for s in report["spikes"]] == [41]
    assert report["trend"] == "falling"  # one spike does not turn the trend
    assert any("jumped up suddenly at step 41" in w for w in report["warnings"])


def test_noise_below_the_margin_is_not_a_spike():
    report = health.check(history(falling(noise=0.1, seed=3)), METRICS)
    assert report["spikes"] == []


def test_too_few_steps_warns():
    # the seed's 1/20 subset with accumulation 128: a handful of optimizer steps, logged every 5
    report = health.check(history([2.0, 1.8, 1.7], every=5), METRICS)
    assert report["steps"] == 15 and report["too_few_steps"]
    assert "Only 15 training steps ran" in report["warnings"][0]
    assert health.check(history(falling()), min_steps=100)["too_few_steps"]


def test_rising_trend_is_divergence():
    losses = list(reversed(falling()))
    report = health.check(history(losses))
    assert report["trend"] == "rising" and report["diverged"]
    assert "rose" in report["diverged_reason"]
    assert any("went up" in w for w in report["warnings"])


def test_flat_curve_warns():
    report = health.check(history([2.0 + 0.01 * (i % 3) for i in range(60)]))
    assert report["trend"] == "flat" and not report["ok"]


def test_tuned_worse_than_base_is_divergence_even_with_a_falling_curve():
    metrics = {**METRICS, "tuned": {"eval_loss": 3.9, "perplexity": 49.4}}
    report = health.check(history(falling()), metrics)
    assert report["diverged"] and "higher than the base" in report["diverged_reason"]


def test_eval_below_train_lists_the_usual_causes():
    metrics = {**METRICS, "tuned": {"eval_loss": 0.8, "perplexity": 2.2}}
    report = health.check(history(falling()), metrics)
    gap = report["gap"]
    assert gap["eval_below_train"] and gap["eval_minus_train"] < 0 and gap["eval_loss"] == 0.8
    causes = " ".join(gap["causes"])
    for cause in ("dropout", "packing", "averaged", "at the end"):
        assert cause in causes
    assert report["ok"]  # common and harmless: a note, not a warning
    assert any("lower than the training loss" in s for s in report["sentences"])


def test_eval_from_log_history_when_no_metrics():
    report = health.check(history(falling(), every=1, evals={30: 1.5, 60: 1.2}))
    assert report["eval_source"] == "log_history" and report["eval_loss"] == 1.2


def test_nan_loss_is_divergence_and_json_stays_valid():
    losses = falling()
    losses[50:] = [float("nan")] * 10
    report = health.check(history(losses))
    assert report["diverged"] and "step 51" in report["diverged_reason"]
    json.dumps(report, allow_nan=False)


def test_empty_history_of_a_failed_run():
    report = health.check([])
    assert report["steps"] == 0 and report["trend"] == "unknown" and report["too_few_steps"]


def test_bad_entry_names_the_row_and_field():
    with pytest.raises(ValueError, match=r"log_history\[1\]\.loss is 'x': not a number"):
        health.check([{"loss": 1.0, "step": 1}, {"loss": "x", "step": 2}])


def test_curve_that_goes_back_up_at_the_end_warns():
    losses = [1 + 2 * math.exp(-i / 8) for i in range(40)] + [1 + 0.02 * i for i in range(20)]
    report = health.check(history(losses))
    assert report["trend"] == "falling" and report["trend_detail"]["late_rise"]
    assert any("went back up" in w for w in report["warnings"])


def test_the_sentence_quotes_the_ends_of_the_picture():
    # 20 logged points (a median window of 3): the verdict is the medians', the numbers are the plot's ends
    losses = [10.36, 9.508, 7.687] + [6 - 0.25 * i for i in range(16)] + [1.05]
    report = health.check(history(losses, every=2))
    assert report["trend_detail"]["start_loss"] == 9.508 and report["trend_detail"]["first"] == {"step": 2,
                                                                                                  "loss": 10.36}
    assert "The training loss went down from 10.4 at step 2 to 1.05 at step 40 (90% lower)" in " ".join(
        report["sentences"])
    # a last point that jumped back above the first: the medians say falling, so the medians are quoted
    odd = health.check(history([2.0, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.5, 2.5], every=1))
    assert odd["trend"] == "falling" and any("went down from about" in s for s in odd["sentences"])
