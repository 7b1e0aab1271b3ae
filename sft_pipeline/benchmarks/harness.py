"""lm-evaluation-harness (``lm-eval``, the ``bench`` extra) tasks, scored on the model the stage already loaded.

A task is named as lm-eval names it (``arc_easy``, ``hellaswag``: their data comes from the hub, so online only) or
given as the path of a local task YAML (``my_tasks/quiz.yaml``: offline, its data beside it). A local YAML's relative
``data_files`` are read from the YAML's folder (lm-eval itself would read them from the working directory), and the
benchmark stage's key holds the content of that folder's files (``task_files``), not only the path.

``lm_eval.simple_evaluate`` runs with an ``HFLM`` that wraps the loaded model and tokenizer (the caller disables the
adapter for the base), no request cache, and ``log_samples`` on: every score is computed here from the per-item
values, with its item count and a 95 % interval (``stats.score``: Wilson's for pass/fail items).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
from pathlib import Path

from sft_pipeline.benchmarks.stats import score as item_score

INSTALL = "pip install -e '.[bench]'"
LOCAL_SUFFIXES = (".yaml", ".yml")
FILE_LIMIT = 64 << 20  # a local task's folder is hashed into the stage's key: a data file past this is refused


def installed() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def version() -> str:
    try:
        return importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def is_local(name: str) -> bool:
    return name.endswith(LOCAL_SUFFIXES)


@functools.lru_cache(maxsize=1)
def task_names() -> frozenset[str]:
    """Every task, group and tag lm-eval knows (it reads its task folders: ~6 s once per process)."""
    from lm_eval.tasks import TaskManager

    return frozenset(TaskManager().all_tasks)


def local_config(path: str | Path) -> dict:
    """A local task YAML as lm-eval reads it (``include`` and ``!function`` resolved), its relative data files made
    absolute against the YAML's folder. Raises ValueError with a reason."""
    from lm_eval.tasks._yaml_loader import load_yaml

    path = Path(path).expanduser().resolve()
    try:
        config = load_yaml(path)
    except (OSError, ValueError, ImportError, AttributeError) as e:
        raise ValueError(f"local task {path} cannot be read: {e}") from None
    except Exception as e:  # noqa: BLE001 - a YAML error of any kind: named in one line
        raise ValueError(f"local task {path} is not valid YAML: {type(e).__name__}") from None
    if not isinstance(config.get("task"), str):
        raise ValueError(f"local task {path} names no task (a 'task: <name>' line)")
    files = (config.get("dataset_kwargs") or {}).get("data_files")

    def absolute(p):
        return str(path.parent / p) if isinstance(p, str) and not Path(p).is_absolute() else p

    if isinstance(files, dict):
        files = {k: [absolute(p) for p in v] if isinstance(v, list) else absolute(v) for k, v in files.items()}
    elif isinstance(files, list):
        files = [absolute(p) for p in files]
    elif isinstance(files, str):
        files = absolute(files)
    if files is not None:
        config["dataset_kwargs"] = {**config["dataset_kwargs"], "data_files": files}
    return config


def task_files(path: str | Path) -> dict[str, str]:
    """What a local task's results depend on besides the model: the sha256 of each file in its YAML's folder
    (the YAML, the files it includes, its data). A key part of the benchmark stage."""
    folder = Path(path).expanduser().resolve().parent
    out = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and not p.name.startswith("."):
            if p.stat().st_size > FILE_LIMIT:
                raise ValueError(f"local task {path}: {p.name} is over {FILE_LIMIT >> 20} MiB")
            out[p.name] = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
    return out


def task_label(name: str) -> str:
    """The name a task's results go under: a local YAML's ``task``, else the name as given."""
    return local_config(name)["task"] if is_local(name) else name


def evaluate(model, tok, names: list[str], *, limit: int | None, batch_size: int, max_new_tokens: int) -> dict:
    """Score ``model`` (as it is: the caller disables the adapter for the base) on lm-eval tasks ``names``.

    Returns ``{label: {"metrics": {metric: stats.score}, "items": n}}`` per task (a group's subtasks each get
    theirs). ``max_new_tokens`` is the generation tasks' ``max_gen_toks``; multiple-choice tasks generate nothing.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    local = [local_config(n) for n in names if is_local(n)]
    hub = [n for n in names if not is_local(n)]
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=hub + local, limit=limit, log_samples=True, use_cache=None,
                                  bootstrap_iters=0, gen_kwargs={"max_gen_toks": max_new_tokens},
                                  task_manager=TaskManager(include_defaults=bool(hub)), random_seed=0,
                                  numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    scores = {}
    for task, samples in out["samples"].items():
        metrics: dict[str, dict] = {}
        for key in out["results"].get(task, {}):
            metric, _, kept = key.partition(",")
            if not kept or metric.endswith("_stderr") or metric == "alias":
                continue
            try:
                values = [float(s[metric]) for s in samples if s.get("filter") == kept and metric in s]
            except (TypeError, ValueError):
                continue  # a corpus-level metric (BLEU's per-item pairs): no per-item score to count
            if values:
                label = metric if kept == "none" else f"{metric} ({kept})"
                metrics[label] = item_score(values)
        if metrics:
            scores[task] = {"metrics": metrics, "items": max(m["n"] for m in metrics.values())}
    return scores
