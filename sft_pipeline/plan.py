"""``sft-pipeline plan``: for each stage, whether a run would reuse it or compute it, and why. Runs nothing.

It walks the stage table (``flows/stages.py``) as the flow does and computes each key with the same function
(``stage.key_parts``), then looks it up in the store. Why a stage would run comes from the artifact's state (broken,
or deleted: a run record under ``<store>/runs/`` names the key) or from a diff against the key parts in the
manifest of the stage's latest earlier artifact: which config field, which upstream artifact, or the stage's code
changed. Once a stage would run, the stages that read its artifact run after it (its new fingerprint is only known
then). No Prefect server is started: secrets in Prefect Secret blocks are looked up only when ``PREFECT_API_URL``
names a server (else a token kept only in a block shows as absent, and authenticate may run where the plan said
reuse; it takes a second). With a store on object storage it reads the manifests and run summaries there and
downloads no artifact (one that only the object store has shows its URL; the estimate reads the format stage's
token ids from there).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from sft_pipeline.stage import Facts, Stage, key_parts, stage_key
from sft_pipeline.tokens import planned_tokens
from sft_pipeline.store import MANIFEST, ArtifactRef, Store


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}"))
        return out or {prefix: {}}
    return {prefix: value}


def _config_changes(old: dict, new: dict) -> list[str]:
    a = {k[1:]: v for k, v in _flatten(old, "").items()}
    b = {k[1:]: v for k, v in _flatten(new, "").items()}
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k, "(unset)") == b.get(k, "(unset)"):
            continue
        if k == "model.fingerprint":
            out.append("the base model changed (its name, revision or files)")
        elif k == "data.content":
            out.append("the data's content changed")
        elif k == "preference_content":  # the DPO stages' fact (flows/dpo_stages.py)
            out.append("the preference data's content changed")
        elif k.startswith("secrets."):
            out.append(f"where the {k.split('.', 1)[1]} is found changed")
        else:
            out.append(f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}")
    return out


def _run_history(store: Store) -> dict[tuple[str, str], str]:
    """(stage, key) -> fingerprint of every artifact a run recorded: what a deleted artifact was."""
    known: dict[tuple[str, str], str] = {}
    for record in store.run_records():
        stages = record.get("stages", {}) if isinstance(record, dict) else {}
        for name, rec in stages.items():
            if isinstance(rec, dict) and rec.get("key") and rec.get("fingerprint"):
                known[(name, rec["key"])] = rec["fingerprint"]
    return known


def _only_in_object_store(path: str) -> bool:
    """An artifact ``Store.peek`` found only in the object store: its path is the URL there."""
    from sft_pipeline.store import is_url

    return is_url(path)


def _earlier_fingerprint(store: Store, stage: str, key: str, history: dict) -> str | None:
    try:
        return json.loads((store.artifact_dir(stage, key) / MANIFEST).read_text())["fingerprint"]
    except (OSError, ValueError, KeyError):
        return history.get((stage, key))  # an object store's copy, when there is one, was found by check


def _why_new(store: Store, stage: str, parts: dict) -> str:
    """What differs from the stage's latest earlier artifact (preferring an intact one)."""
    earlier = []
    for m in store.manifests(stage):  # with an object store: those of every machine
        if "config" not in m.get("inputs", {}):
            continue  # written by an older version of the pipeline: not comparable
        intact = store.check(stage, m.get("key", ""))[0]
        earlier.append((intact, m.get("created", ""), m["inputs"]))
    if not earlier:
        return "no earlier run of this stage in this store"
    prev = max(earlier, key=lambda t: (t[0], t[1]))[2]
    changes = [] if prev.get("code") == parts["code"] else [f"the code of stage {stage} changed"]
    changes += _config_changes(prev.get("config", {}), parts["config"])
    old_up = prev.get("upstream", {})
    changes += [f"upstream {n} changed" for n in sorted(set(old_up) | set(parts["upstream"]))
                if old_up.get(n) != parts["upstream"].get(n)]
    return "; ".join(changes) or "inputs differ from the earlier run"


def plan(cfg, store: Store, stages: Iterable[Stage], then: Iterable[tuple[Any, Iterable[Stage]]] = ()) -> list[dict]:
    """One step per stage: ``{"stage", "decision": "reuse"|"run", "key", "reason", "artifact"}``.

    ``then``: more (config, stage table) pairs walked after ``stages``, reading their artifacts (a DPO recipe's
    stages, with the config they see, after its SFT recipe's)."""
    blocks, history = bool(os.environ.get("PREFECT_API_URL")), _run_history(store)
    refs: dict[str, ArtifactRef | None] = {}  # None: this run would make a new artifact, its fingerprint unknown
    redo: set[str] = set()  # stages that would re-run an earlier key: expected to reproduce its output
    steps: list[dict] = []

    def add(stage: str, decision: str, key: str | None, reason: str, artifact: str | None = None) -> None:
        steps.append({"stage": stage, "decision": decision, "key": key, "reason": reason, "artifact": artifact})

    for cfg, stage, facts in _walk([(cfg, stages), *then], blocks, store):
        pending = [n for n in stage.needs if refs[n] is None]
        if pending:
            verb = "runs" if len(pending) == 1 else "run"
            add(stage.name, "run", None, f"after {' and '.join(pending)} {verb} (new upstream output)")
            refs[stage.name] = None
            continue
        parts = key_parts(stage, cfg, {n: refs[n] for n in stage.needs}, facts)
        key = stage_key(parts)
        ok, why = store.check(stage.name, key)
        ref = store.peek(stage.name, key) if ok else None  # an object store's copy is not downloaded
        if ref is not None:
            again = [n for n in stage.needs if n in redo]
            where = "the object store" if _only_in_object_store(ref.path) else "the store"
            add(stage.name, "reuse", key, f"finished artifact in {where}" + (
                f" (if {' and '.join(again)} reproduces its earlier output)" if again else ""), ref.path)
            refs[stage.name] = ref
            continue
        earlier = _earlier_fingerprint(store, stage.name, key, history)
        if earlier:  # made before under this very key: a re-run is expected to reproduce it
            add(stage.name, "run", key, "its artifact was deleted" if why == "missing"
                else f"its artifact is broken ({why})")
            redo.add(stage.name)
            refs[stage.name] = ArtifactRef(stage=stage.name, key=key, path="", fingerprint=earlier)
            continue
        add(stage.name, "run", key, f"its artifact is broken ({why})" if why != "missing"
            else _why_new(store, stage.name, parts))
        refs[stage.name] = None
    return steps


def _walk(tables, blocks: bool, store: Store):
    """(config, stage, facts) for every stage of every (config, stage table), in order; the facts once per config."""
    for cfg, stages in tables:
        facts = Facts(cfg, blocks=blocks, store=store)
        for stage in stages:
            yield cfg, stage, facts


# measured on one H100 80GB, Mistral-7B architecture, QLoRA, packing, max length 2048 (BENCHMARKS.md)
H100_7B_TOKENS_PER_SECOND = 13_000


def _measured_rate(cfg, store: Store) -> tuple[float, str] | None:
    """tok/s of the newest train artifact in this store with the same base model and device."""
    facts = Facts(cfg, blocks=False, store=store)
    found = []
    for m in store.manifests("train"):
        try:
            same = m["inputs"]["config"]["model"]["fingerprint"] == facts.model and \
                m["inputs"]["config"]["training"]["device"] == cfg.training.device
            rate = m["metrics"].get("tokens_per_second_warm") or m["metrics"].get("tokens_per_second")
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if same and rate:
            found.append((m.get("created", ""), float(rate)))
    return (max(found)[1], "the last run of this model in this store") if found else None


def estimate(cfg, store: Store, steps: list[dict]) -> dict | None:
    """Training time and cost before training: the format stage's token count (when its artifact is there) at the
    last run's tok/s for this model, else the H100 figure for a 7B model; None when neither is known."""
    fmt = next((s for s in steps if s["stage"] == "format" and s["decision"] == "reuse"), None)
    if fmt is None:
        return None
    name = f"{cfg.data.train_split}.parquet"
    if _only_in_object_store(fmt["artifact"]):  # its one file fetched into the cache's .tmp, then removed
        tmp = store.root / ".tmp" / f"plan-{os.getpid()}-{name}"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        try:
            store.remote.fs.get(store.remote.path(f"format/{fmt['key']}/{name}"), str(tmp))
            tokens = planned_tokens(cfg.training, tmp)
        finally:
            tmp.unlink(missing_ok=True)
    else:
        tokens = planned_tokens(cfg.training, Path(fmt["artifact"]) / name)
    rate = _measured_rate(cfg, store)
    if rate is None:
        from sft_pipeline.preflight import model_shape, parameter_count

        mc = model_shape(cfg, store.root)  # the sizes the checks kept: no transformers import
        if mc is None or parameter_count(mc) < 5e9:
            return {"tokens": int(tokens)}
        rate = (H100_7B_TOKENS_PER_SECOND, "a 7B model on one H100, BENCHMARKS.md")
    out = {"tokens": int(tokens), "tokens_per_second": rate[0], "rate_from": rate[1],
           "hours": round(tokens / rate[0] / 3600, 3)}
    if cfg.training.price_per_hour is not None:
        out["cost"] = round(out["hours"] * cfg.training.price_per_hour, 2)
    return out


def print_plan(steps: list[dict], file=None, est: dict | None = None) -> None:
    w = max([14] + [len(s["stage"]) + 2 for s in steps])  # the DPO stages' names are longer
    print(f"{'stage':<{w}}{'plan':<7}{'key':<26}why", file=file)
    for s in steps:
        why = s["reason"] + (f": {s['artifact']}" if s["artifact"] else "")
        print(f"{s['stage']:<{w}}{s['decision']:<7}{(s['key'] or '?'):<26}{why}", file=file)
    if est and "hours" in est:
        cost = f", cost {est['cost']:.2f} at training.price_per_hour" if "cost" in est else ""
        print(f"\ntraining estimate: {est['tokens']:,} tokens at {est['tokens_per_second']:,.0f} tok/s "
              f"({est['rate_from']}) -> {est['hours']:.2f} h{cost}", file=file)
    elif est:
        print(f"\ntraining estimate: {est['tokens']:,} tokens; no tok/s figure for this model here yet (one run "
              "measures it)", file=file)


def write_plan(steps: list[dict], path: str | Path, est: dict | None = None) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"plan": steps, "estimate": est}, indent=2))
