"""``sft-pipeline plan``: for each stage, whether a run would reuse it or compute it, and why. Runs nothing.

The flow's own stage wiring (``flows.sft.stages``) is walked with a ``Planner`` in place of the stage runner: each
stage's key is computed from the config and the upstream fingerprints exactly as the run computes it, and looked up
in the store. Why a stage would run comes from the artifact's state (deleted, broken) or from a diff against the
inputs of the stage's latest earlier key (``<store>/.keys/<stage>/<key>.json``, written when a stage finishes):
which config field, which upstream artifact, or the stage's code changed. Once a stage would run, the stages that
read its artifact run after it (its new fingerprint is only known then).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from sft_pipeline.caching import key_inputs, keys_dir, stage_key
from sft_pipeline.store import ArtifactRef, Store

PENDING = "pending:"  # the fingerprint of an artifact that does not exist yet


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}"))
        return out or {prefix: {}}
    return {prefix: value}


def _changes(label: str, old: Any, new: Any) -> list[str]:
    a, b = _flatten(old, label), _flatten(new, label)
    return [f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}" for k in sorted(set(a) | set(b))
            if a.get(k, "(unset)") != b.get(k, "(unset)")]


class Planner:
    """Stands in for the stage runner: predicts each stage instead of running it."""

    def __init__(self, store: Store, cfg: BaseModel):
        self.store, self.cfg = store, cfg
        self.steps: list[dict[str, Any]] = []
        self.redo: set[str] = set()  # stages that re-run an earlier key: expected to reproduce its output

    def __call__(self, stage_task, **inputs) -> ArtifactRef:
        policy = stage_task.cache_policy
        stage = policy.stage
        refs = [v for v in inputs.values() if isinstance(v, ArtifactRef)]
        pending = [r.stage for r in refs if r.fingerprint.startswith(PENDING)]
        if pending:
            verb = "runs" if len(pending) == 1 else "run"
            return self._add(stage, "run", None, f"after {' and '.join(pending)} {verb} (new upstream output)")
        key = stage_key(stage, policy.fn, inputs, policy.ignore)
        ok, why = self.store.check(stage, key)
        if ok:
            redo = [r.stage for r in refs if r.stage in self.redo]
            reason = "finished artifact in the store" + (
                f" (if {' and '.join(redo)} reproduces its earlier output)" if redo else "")
            return self._add(stage, "reuse", key, reason, self.store.ref(stage, key))
        record = keys_dir(self.store.root, stage) / f"{key}.json"
        if record.is_file():  # computed before under this very key: its output is expected to come out the same
            reason = "its artifact was deleted" if why == "missing" else f"its artifact is broken ({why})"
            try:
                fingerprint = json.loads(record.read_text())["fingerprint"]
            except (OSError, ValueError, KeyError):
                return self._add(stage, "run", key, reason)
            self.redo.add(stage)
            self._add(stage, "run", key, reason)
            return ArtifactRef(stage=stage, key=key, path="", fingerprint=fingerprint)
        if why != "missing":
            return self._add(stage, "run", key, f"its artifact is broken ({why})")
        return self._add(stage, "run", key, self._why_new(stage, key_inputs(stage, policy.fn, inputs, policy.ignore),
                                                          inputs))

    def _add(self, stage: str, decision: str, key: str | None, reason: str, ref: ArtifactRef | None = None):
        self.steps.append({"stage": stage, "decision": decision, "key": key, "reason": reason,
                           "artifact": ref.path if ref else None})
        return ref or ArtifactRef(stage=stage, key=key or "", path="", fingerprint=f"{PENDING}{stage}")

    def _why_new(self, stage: str, parts: dict, inputs: dict) -> str:
        """What differs from the latest earlier key of this stage (preferring one whose artifact is intact)."""
        earlier = []
        for p in keys_dir(self.store.root, stage).glob("*.json"):
            try:
                rec = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            intact = self.store.check(stage, rec.get("key", ""))[0]
            earlier.append((intact, p.stat().st_mtime, rec))
        if not earlier:
            return "no earlier run of this stage in this store"
        _, _, prev = max(earlier, key=lambda t: (t[0], t[1]))
        changes = [] if prev.get("code") == parts["code"] else [f"the code of stage {stage} changed"]
        old_inputs = prev.get("inputs", {})
        for name in sorted(set(old_inputs) | set(parts["inputs"])):
            old, new = old_inputs.get(name), parts["inputs"].get(name)
            if old == new:
                continue
            value = inputs.get(name)
            if isinstance(value, ArtifactRef):
                changes.append(f"upstream {value.stage} changed")
                continue
            section = next((f for f in type(self.cfg).model_fields if getattr(self.cfg, f) is value), name)
            changes += _changes(section, old, new)
        return "; ".join(changes) or "inputs differ from the earlier run"


def print_plan(steps: list[dict], file=None) -> None:
    print(f"{'stage':<14}{'plan':<7}{'key':<26}why", file=file)
    for s in steps:
        why = s["reason"] + (f": {s['artifact']}" if s["artifact"] else "")
        print(f"{s['stage']:<14}{s['decision']:<7}{(s['key'] or '?'):<26}{why}", file=file)


def write_plan(steps: list[dict], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"plan": steps}, indent=2))
