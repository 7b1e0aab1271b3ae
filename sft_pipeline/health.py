"""Loss-curve health: did training run long enough, go down, stay steady, and end better than it began?

``check(log_history, eval_metrics)`` reads what HF Trainer logged (``trainer.state.log_history``) and, when given,
the evaluate stage's ``metrics.json``, and returns a JSON-able report whose ``sentences`` explain the curve in plain
words. How each verdict is reached:

- steps: the highest ``step`` logged (one step = one weight update). Below ``min_steps`` the curve says little.
- trend: the median of the first ``w`` logged train losses against the median of the last ``w`` (``w`` = 1 below 6
  points, 3 below 50, else 5). Medians, so one noisy or spiking point does not decide. More than ``FLAT`` (5 %) lower
  is falling, more than 5 % higher is rising, else flat. A falling curve whose last points sit well above the
  middle ones also gets a "went back up" warning. The sentence quotes the curve's first and last logged points (the
  ends of the picture, with their steps) when they go the same way as the verdict, else the medians.
- spikes: a logged loss more than ``spike_margin`` (relative) and ``MIN_JUMP`` (absolute) above the median of the
  ``WINDOW`` points before it.
- train/eval gap: the final eval loss (the evaluate stage's tuned loss, else the last logged ``eval_loss``)
  against the train loss at the end of the run (the ``w``-point median above).
- diverged: tuned eval loss above the base model's, a rising trend, or a loss that is not a number.
"""
from __future__ import annotations

import math
from statistics import median

FLAT = 0.05  # start/end medians within 5 % of each other: flat
WINDOW = 5  # points before a step that make its running trend
MIN_JUMP = 0.05  # nats: below this a "spike" is noise, whatever its ratio (matters once the loss is near 0)
EVAL_BELOW = 0.02  # eval more than 2 % below train: worth explaining
EVAL_ABOVE = 0.25  # eval more than 25 % above train: the model may be learning the training rows by heart

GAP_CAUSES = [
    "dropout (randomly switching off part of the model) is active only while training, so the same model scores "
    "better when it is evaluated",
    "the train loss is measured while the model is still learning (and the run's average covers its worst, "
    "earliest steps), while the eval loss is measured once, at the end, with the final weights",
    "with packing, several conversations are joined into one training sequence and the start of each is hard to "
    "predict from the one before it; evaluation may not pack",
    "the loss is averaged over tokens in one place and over sequences or batches in another, so long and short "
    "examples weigh differently",
    "the test rows may simply be easier or fewer than the training rows",
]


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} is {value!r}: not a number")
    return float(value)


def _finite(x: float | None) -> float | None:
    """JSON has no NaN or infinity: those become None (the report says what happened in words)."""
    return x if x is not None and math.isfinite(x) else None


def _points(log_history: list[dict]) -> tuple[list[tuple[int, float]], list[tuple[int, float]], float | None, int]:
    """(step, train loss) and (step, eval loss) pairs, the run's average train loss and the last step."""
    if not isinstance(log_history, list):
        raise ValueError(f"log_history is a {type(log_history).__name__}: expected a list of dicts")
    train, evals, average, steps = [], [], None, 0
    for i, entry in enumerate(log_history):
        if not isinstance(entry, dict):
            raise ValueError(f"log_history[{i}] is {entry!r}: expected a dict")
        step = int(_number(entry.get("step", 0), f"log_history[{i}].step"))
        steps = max(steps, step)
        if "loss" in entry:
            train.append((step, _number(entry["loss"], f"log_history[{i}].loss")))
        if "eval_loss" in entry:
            evals.append((step, _number(entry["eval_loss"], f"log_history[{i}].eval_loss")))
        if "train_loss" in entry:
            average = _number(entry["train_loss"], f"log_history[{i}].train_loss")
    return train, evals, average, steps


def _spikes(train: list[tuple[int, float]], margin: float) -> list[dict]:
    spikes = []
    for i in range(2, len(train)):  # a trend needs at least two earlier points
        step, loss = train[i]
        trend = median(x for _, x in train[max(0, i - WINDOW):i])
        if math.isfinite(loss) and loss > trend * (1 + margin) and loss - trend > MIN_JUMP:
            spikes.append({"step": step, "loss": round(loss, 4), "trend": round(trend, 4),
                           "above_trend": round(loss / trend - 1, 3)})
    return spikes


def _trend(points: list[tuple[int, float]]) -> dict:
    losses = [x for _, x in points]
    if len(losses) < 2:
        return {"direction": "unknown", "rule": "needs at least two logged train losses"}
    # few points so the numbers match what the picture shows at its ends; 3 or 5 so one odd point does not decide
    w = 1 if len(losses) < 6 else 3 if len(losses) < 50 else 5
    start, end = median(losses[:w]), median(losses[-w:])
    change = end / start - 1 if start > 0 else 0.0
    direction = "falling" if change < -FLAT else "rising" if change > FLAT else "flat"
    out = {"direction": direction, "start_loss": round(start, 4), "end_loss": round(end, 4),
           "change": round(change, 3), "window": w,
           "first": {"step": points[0][0], "loss": round(losses[0], 4)},
           "last": {"step": points[-1][0], "loss": round(losses[-1], 4)},
           "rule": f"median of the first {w} vs the last {w} logged train losses; beyond ±{FLAT:.0%} is a trend"}
    middle = losses[len(losses) // 3: len(losses) - len(losses) // 3]
    if direction == "falling" and len(losses) >= 3 * w and middle:
        low = min(median(middle), start)
        out["late_rise"] = end > low * (1 + FLAT) and end - low > MIN_JUMP
    return out


def _plot_ends_agree(trend: dict) -> bool:
    """Whether the curve's first and last points go the way the medians say (a noisy end point may not)."""
    first, last = trend["first"]["loss"], trend["last"]["loss"]
    return first > 0 and (last < first if trend["direction"] == "falling" else last > first)


def _ends(trend: dict) -> str:
    """Where the curve starts and ends, as the picture shows it: ``10.4 at step 2 to 1.05 at step 40``."""
    if _plot_ends_agree(trend):
        first, last = trend["first"], trend["last"]
        return f"{first['loss']:.3g} at step {first['step']} to {last['loss']:.3g} at step {last['step']}"
    return f"about {trend['start_loss']:.3g} to about {trend['end_loss']:.3g}"


def _ends_change(trend: dict) -> float:
    return trend["last"]["loss"] / trend["first"]["loss"] - 1 if _plot_ends_agree(trend) else trend["change"]


def check(log_history: list[dict], eval_metrics: dict | None = None, *, min_steps: int = 50,
          spike_margin: float = 0.3) -> dict:
    """The health report of one training run's loss curve (see the module docstring for each rule).

    ``spike_margin`` is relative: 0.3 flags a logged loss 30 % above the median of the points before it.
    """
    train, evals, average, steps = _points(log_history)
    finite = [(s, x) for s, x in train if math.isfinite(x)]
    not_a_number = [s for s, x in train if not math.isfinite(x)]
    trend = _trend(finite)
    spikes = _spikes(finite, spike_margin)
    warnings: list[str] = []
    notes: list[str] = []

    # how long it ran
    if steps < min_steps:
        warnings.append(
            f"Only {steps} training step{'s' if steps != 1 else ''} ran (one step = one update of the weights). "
            f"Below {min_steps} the model barely changes and the loss curve says little: use more data, a smaller "
            f"gradient accumulation, more epochs or a higher training.max_steps.")
    else:
        notes.append(f"Training ran {steps} steps (one step = one update of the weights).")

    # which way the loss went
    direction = trend["direction"]
    if direction == "falling":
        notes.append(f"The training loss went down from {_ends(trend)} ({-_ends_change(trend):.0%} lower): the "
                     f"model learned from the data.")
        if trend.get("late_rise"):
            warnings.append("The training loss went back up toward the end of the run: the learning rate may be "
                            "too high for the last part, or the last batches are unlike the earlier ones.")
    elif direction == "flat":
        warnings.append(f"The training loss stayed at about {trend['end_loss']:.3g} from start to end: the model "
                        f"learned little. Try a higher learning rate or more steps.")
    elif direction == "rising":
        warnings.append(f"The training loss went up, from {_ends(trend)}: training is making the model worse. Lower "
                        f"the learning rate.")
    elif not train:
        notes.append("No training loss was recorded.")
    if not_a_number:
        warnings.append(f"The training loss stopped being a number at step {not_a_number[0]}: training broke down "
                        f"(often a learning rate that is too high, or float16 overflowing).")
    if spikes:
        where = ", ".join(str(s["step"]) for s in spikes[:5]) + (" and more" if len(spikes) > 5 else "")
        warnings.append(f"The loss jumped up suddenly at step{'s' if len(spikes) > 1 else ''} {where} (more than "
                        f"{spike_margin:.0%} above the steps just before). A few jumps are harmless if the curve comes "
                        f"back down; many mean the learning rate is too high or some training rows are odd.")

    # train vs eval
    tuned = (eval_metrics or {}).get("tuned") or {}
    base = (eval_metrics or {}).get("base") or {}
    if "eval_loss" in tuned:
        eval_loss, eval_source = _number(tuned["eval_loss"], "eval_metrics.tuned.eval_loss"), "evaluate"
    elif evals:
        eval_loss, eval_source = evals[-1][1], "log_history"
    else:
        eval_loss, eval_source = None, None
    train_end = trend.get("end_loss")
    gap = None
    if eval_loss is not None and train_end and math.isfinite(eval_loss):
        rel = eval_loss / train_end - 1
        gap = {"train_loss_end": train_end, "eval_loss": round(eval_loss, 4), "eval_minus_train":
               round(eval_loss - train_end, 4), "relative": round(rel, 3), "eval_below_train": rel < -EVAL_BELOW,
               "causes": GAP_CAUSES if rel < -EVAL_BELOW else []}
        if rel < -EVAL_BELOW:
            notes.append(f"The test loss ({eval_loss:.3g}) is lower than the training loss ({train_end:.3g}). "
                         f"That is common and usually harmless: dropout (randomly switching off parts of the model) "
                         f"runs only in training, the training loss is measured while the model is still learning "
                         f"and the test loss once at the end, and packing or a different way of averaging the loss "
                         f"also play a part.")
        elif rel > EVAL_ABOVE:
            warnings.append(f"The test loss ({eval_loss:.3g}) is well above the training loss ({train_end:.3g}): "
                            f"the model may be memorising the training rows instead of learning what generalises. "
                            f"More data, fewer epochs or more dropout help.")

    # did the fine-tune help at all
    reasons = []
    if "eval_loss" in base and "eval_loss" in tuned:
        b, t = _number(base["eval_loss"], "eval_metrics.base.eval_loss"), eval_loss
        if not math.isfinite(t) or t > b:
            reasons.append(f"the tuned model's test loss ({t:.4g}) is higher than the base model's ({b:.4g})")
        else:
            notes.append(f"On the test rows the tuned model's loss is {t:.4g}, against {b:.4g} for the model before "
                         f"fine-tuning (lower is better).")
    if direction == "rising":
        reasons.append("the training loss rose over the run")
    if not_a_number:
        reasons.append(f"the training loss became NaN or infinite at step {not_a_number[0]}")
    if reasons and reasons[0].startswith("the tuned"):
        warnings.append(f"Fine-tuning made the model worse on the test rows: {reasons[0]}.")

    return {
        "ok": not warnings,
        "steps": steps,
        "min_steps": min_steps,
        "too_few_steps": steps < min_steps,
        "logged_points": len(train),
        "trend": direction,
        "trend_detail": trend,
        "spikes": spikes,
        "spike_margin": spike_margin,
        "train_loss_average": _finite(average),
        "eval_loss": _finite(eval_loss),
        "eval_source": eval_source,
        "gap": gap,
        "diverged": bool(reasons),
        "diverged_reason": "; ".join(reasons) or None,
        "warnings": warnings,
        "sentences": warnings + notes,
    }
