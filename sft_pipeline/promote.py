"""Promotion: point ``<store>/promoted/<recipe>.json`` at the best adapter so far.

At the end of every run the adapter must first be worth having: its tuned eval loss beats its own base model's on
the held-out split by ``evaluation.promotion_margin``, the run did not diverge (``health.check``), and no benchmark
the recipe lists dropped by more than ``benchmark.max_regression`` (tuned vs base, its main score). Then it is
compared with the promoted adapter's: the pointer moves only when both were evaluated on the same test set (the
tokenized test split's content hash and the number of rows scored) and the new loss is lower; otherwise it stays
and ``reason`` says why. The pointer is replaced atomically (temp file + ``os.replace``) under a file lock, so a
reader never sees half a pointer and two runs finishing at once cannot lose the better one; with a store on
object storage, the store's copy is fetched and replaced under a lease there too (``Store.lock``), across machines.
The adapter path in the pointer is relative to the store, so a store that is moved or mounted elsewhere keeps its
pointer; a pointer that cannot be read is moved aside (named in the reason) instead of failing every later run.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import NamedTuple

from sft_pipeline.config import safe_name
from sft_pipeline.errors import ConfigError
from sft_pipeline.store import ArtifactRef, Store, digest, file_lock, write_json_atomic

log = logging.getLogger("sft_pipeline.promote")
DEFAULT_MARGIN = 0.01  # evaluation.promotion_margin's default
DEFAULT_MAX_REGRESSION = 0.05  # benchmark.max_regression's default


def pointer_path(store: Store, recipe: str) -> Path:
    try:
        safe_name(recipe, "recipe")  # the config checks it too; the name is joined into a path here
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return store.root / "promoted" / f"{recipe}.json"


def adapter_dir(store: Store, stored: str) -> Path:
    """The adapter a pointer names: relative to the store; an absolute one (older pointers) as it is, or, when it is
    gone, its last two parts (``save_adapter/<key>``) in this store (the store was moved)."""
    p = Path(stored)
    if not p.is_absolute():
        return store.root / p
    if p.is_dir():
        return p
    return store.root / Path(*p.parts[-2:])


def _relative(store: Store, path: str) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(store.root)) if p.is_relative_to(store.root) else str(p)


def read_pointer(store: Store, recipe: str, moved_aside: list | None = None, metric: str = "eval_loss") -> dict | None:
    """The pointer with ``adapter`` resolved to a path on this machine; None when there is none.

    An unreadable one (not JSON, fields missing) is moved aside to ``<recipe>.json.unreadable-<time>`` with a
    WARNING and treated as absent (its path is appended to ``moved_aside``): it would fail every run otherwise.
    """
    path = pointer_path(store, recipe)
    if not path.is_file():
        return None
    try:
        pointer = json.loads(path.read_text())
        if not isinstance(pointer, dict) or not isinstance(pointer.get("adapter"), str) \
                or not isinstance(pointer.get(metric), (int, float)) or "test_set" not in pointer:
            raise ValueError(f"fields adapter, {metric}, test_set missing or of the wrong type")
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        aside = path.with_name(f"{path.name}.unreadable-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
        os.replace(path, aside)
        log.warning("promotion pointer %s could not be read (%s); moved aside to %s", path, type(e).__name__, aside)
        if moved_aside is not None:
            moved_aside.append(str(aside))
        return None
    return {**pointer, "adapter": str(adapter_dir(store, pointer["adapter"]))}


def test_set_fingerprint(store: Store, chats: ArtifactRef, test_split: str, rows: int) -> str:
    """What the eval loss was measured on: the tokenized test split's bytes and how many rows were scored."""
    meta = store.manifest(chats)["files"][f"{test_split}.parquet"]
    return digest({"test_split": meta["sha256"] or [chats.fingerprint, meta["size"]], "rows": rows})


def regressions(rows: list[dict], max_regression: float) -> list[dict]:
    """The benchmarks whose main score (a ``primary`` row of the benchmark stage) the tuned model lowered by more than
    ``max_regression`` (a share: 0.05 = 5 points) against its base."""
    return [r for r in rows if r.get("primary") and r["delta"] < -max_regression - 1e-9]  # float noise: not "more"


def _regression_reason(worse: list[dict], max_regression: float) -> str:
    said = "; ".join(f"{r['benchmark']} {r['label']} {100 * r['base']:.1f} % -> {100 * r['tuned']:.1f} % "
                     f"({100 * r['delta']:+.1f} points)" for r in worse)
    return (f"the tuned model regressed {'a benchmark' if len(worse) == 1 else f'{len(worse)} benchmarks'} by more "
            f"than benchmark.max_regression={max_regression:g} ({100 * max_regression:g} points): {said}: not promoted")


def _worth_having(candidate: dict, margin: float, why_diverged: str | None, worse: list[dict] | None = None,
                  max_regression: float = 0.0) -> str | None:
    """Why this adapter may not be promoted whatever the pointer says, or None."""
    loss, base = candidate["eval_loss"], candidate["base_eval_loss"]
    if not math.isfinite(loss):
        return f"tuned eval loss is {loss}: not promoted"
    if why_diverged:
        return f"training diverged ({why_diverged}): not promoted"
    if not math.isfinite(base):
        return f"the base model's eval loss is {base}: no baseline to beat, not promoted"
    if loss > base * (1 - margin):
        return (f"tuned eval loss {loss:.4f} does not beat the base model's {base:.4f} by "
                f"evaluation.promotion_margin={margin:g}: not promoted")
    if worse:
        return _regression_reason(worse, max_regression)
    return None


class Metric(NamedTuple):
    """What a pointer compares adapters by: its field, how a person reads it, and which way is better."""

    key: str
    label: str
    higher_is_better: bool
    beats_baseline: str  # what a candidate already did before it is compared (the gone-pointer message says it)


EVAL_LOSS = Metric("eval_loss", "tuned eval loss", False, "beating its base")
PREFERENCE_ACCURACY = Metric("preference_accuracy", "held-out preference accuracy", True, "beating the SFT model's")


def _decide(store: Store, current: dict | None, candidate: dict, metric: Metric = EVAL_LOSS) -> tuple[bool, str]:
    """Whether this run's adapter replaces the promoted one, said so that it cannot be misread in a run's summary."""
    value, what = candidate[metric.key], metric.label
    if current is None:
        return True, "this run's adapter is promoted: the first adapter promoted for this recipe"
    by = f" (promoted by flow run {current['flow_run']})" if current.get("flow_run") else ""
    if Path(current["adapter"]) == adapter_dir(store, candidate["adapter"]):
        return False, f"this run's adapter is already the promoted one{by}"
    if not store.exists(current["adapter"]):  # with an object store: there, when not here
        return True, (f"this run's adapter is promoted: the promoted adapter {current['adapter']} is gone from the "
                      f"store (deleted or moved), so it cannot be compared; this one ({what} {value:.4f}, "
                      f"{metric.beats_baseline}) replaces it")
    kept = f"kept the promoted adapter from flow run {current['flow_run']}" if current.get("flow_run") \
        else "kept the promoted adapter"
    if current["test_set"] != candidate["test_set"]:
        return False, (f"{kept}: not comparable: the promoted adapter was evaluated on another test set "
                       f"({current['test_set']}, this run {candidate['test_set']})")
    promoted = current[metric.key]
    if (value > promoted) if metric.higher_is_better else (value < promoted):
        return True, f"this run's adapter is promoted: {what} {value:.4f} beats the promoted {promoted:.4f}"
    return False, f"{kept}: this run's {what} {value:.4f} does not beat the promoted {promoted:.4f}"


def consider(store: Store, recipe: str, adapter: ArtifactRef, metrics: ArtifactRef, chats: ArtifactRef,
             test_split: str, checked: dict, flow_run: str | None = None, margin: float = DEFAULT_MARGIN,
             benchmarks: list[dict] | None = None, max_regression: float = DEFAULT_MAX_REGRESSION) -> dict:
    """Promote ``adapter`` if it beats its base by ``margin``, did not diverge, regressed no benchmark by more than
    ``max_regression`` and beats the promoted one for ``recipe``; returns the decision for the summary.

    ``checked``: the loss-curve health check's result (``health.check``; the flow reports it too): a run it calls
    diverged is never promoted. The result's ``diverged`` is that reason, or None: the flow shows it as a warning.
    ``benchmarks``: the benchmark stage's rows (base vs tuned per score); the result's ``regressions`` lists those
    that block promotion.
    """
    m = metrics.read_json("metrics.json")
    why_diverged = checked["diverged_reason"]
    candidate = {"recipe": recipe, "adapter": _relative(store, adapter.path), "adapter_fingerprint": adapter.fingerprint,
                 "eval_loss": m["tuned"]["eval_loss"], "base_eval_loss": m["base"]["eval_loss"],
                 "test_set": test_set_fingerprint(store, chats, test_split, m["rows"]),
                 "flow_run": flow_run, "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    main_scores = [r for r in benchmarks or [] if r.get("primary")]
    if main_scores:
        candidate["benchmarks"] = {r["benchmark"]: {"score": r["metric"], "base": r["base"], "tuned": r["tuned"]}
                                   for r in main_scores}
    worse = regressions(main_scores, max_regression)
    path = pointer_path(store, recipe)
    moved_aside: list[str] = []
    unsent = None
    # with an object store, its copy of the pointer is the one: fetched and replaced under a lease there too
    with file_lock(path.parent / ".lock"), \
            store.lock("promoted", recipe) if store.remote is not None else contextlib.nullcontext():
        store.pull(path)
        current = read_pointer(store, recipe, moved_aside)
        refused = _worth_having(candidate, margin, why_diverged, worse, max_regression)
        promoted, reason = (False, refused) if refused else _decide(store, current, candidate)
        if promoted:
            write_json_atomic(path, candidate)
        if promoted or moved_aside:
            unsent = store.push(path, quiet=False)
    if moved_aside:
        reason += f" (the old pointer could not be read and was moved aside to {moved_aside[0]})"
    if unsent:
        log.warning("the promotion pointer is not in the object store: %s", unsent)
        reason += f" (but the pointer could not be uploaded to the object store: {unsent})"
    return {"promoted": promoted, "reason": reason, "pointer": store.location_of(path),
            "eval_loss": candidate["eval_loss"],
            "test_set": candidate["test_set"], "previous": current, "diverged": why_diverged,
            "regressions": [{k: r[k] for k in ("benchmark", "metric", "base", "tuned", "delta")} for r in worse],
            "promoted_adapter": str(adapter_dir(store, candidate["adapter"])) if promoted
            else (current or {}).get("adapter")}


def consider_dpo(store: Store, recipe: str, adapter: ArtifactRef, metrics: ArtifactRef, pairs: ArtifactRef,
                 test_split: str, flow_run: str | None = None, margin: float = 0.0) -> dict:
    """Promote a DPO adapter (``<store>/promoted/<dpo recipe>.json``) if its held-out preference accuracy beats the
    SFT model's by more than ``margin`` and beats the promoted DPO adapter's on the same held-out pairs; returns the
    decision for the summary. ``metrics``: the dpo_evaluate artifact; ``pairs``: the preference_format artifact
    (what the test set's fingerprint is made of). The pointer mechanics are ``consider``'s."""
    m = metrics.read_json("metrics.json")
    dpo, sft = m["dpo"]["preference_accuracy"], m["sft"]["preference_accuracy"]
    candidate = {"recipe": recipe, "adapter": _relative(store, adapter.path),
                 "adapter_fingerprint": adapter.fingerprint, "preference_accuracy": dpo, "sft_preference_accuracy": sft,
                 "reward_accuracy": m["dpo"]["reward_accuracy"],
                 "test_set": test_set_fingerprint(store, pairs, test_split, m["pairs"]),
                 "flow_run": flow_run, "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    refused = None
    if not (math.isfinite(dpo) and dpo > sft + margin):
        refused = (f"the DPO model's held-out preference accuracy {dpo:.4f} does not beat the SFT model's {sft:.4f}"
                   + (f" by more than dpo_evaluation.promotion_margin={margin:g}" if margin else "")
                   + ": not promoted")
    path = pointer_path(store, recipe)
    moved_aside: list[str] = []
    with file_lock(path.parent / ".lock"):
        current = read_pointer(store, recipe, moved_aside, PREFERENCE_ACCURACY.key)
        promoted, reason = (False, refused) if refused else _decide(store, current, candidate, PREFERENCE_ACCURACY)
        if promoted:
            write_json_atomic(path, candidate)
    if moved_aside:
        reason += f" (the old pointer could not be read and was moved aside to {moved_aside[0]})"
    return {"promoted": promoted, "reason": reason, "pointer": str(path), "preference_accuracy": dpo,
            "sft_preference_accuracy": sft, "test_set": candidate["test_set"], "previous": current,
            "diverged": None, "promoted_adapter": str(adapter_dir(store, candidate["adapter"])) if promoted
            else (current or {}).get("adapter")}
