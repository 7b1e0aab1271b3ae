"""A stage's key comes from exactly its row of the stage table: the config it reads, its upstream fingerprints, the
code and templates it applies; nothing else."""
from __future__ import annotations

import importlib
import pytest

import flows.stages
from sft_pipeline.config import PipelineConfig, load_config
from sft_pipeline.stage import FACTS, ConfigView, Facts, key_parts, stage_key
from sft_pipeline.store import ArtifactRef
from tests.conftest import ROOT


def _keys(cfg, table=None, fingerprint: str = "f0") -> dict[str, str]:
    table = table or flows.stages.STAGES
    facts = Facts(cfg, blocks=False)
    up = {s.name: ArtifactRef(stage=s.name, key="k", path="/p", fingerprint=fingerprint) for s in table}
    return {s.name: stage_key(key_parts(s, cfg, up, facts)) for s in table}


def test_lora_rank_changes_train_and_nothing_before_it():
    a, b = _keys(load_config("tiny")), _keys(load_config("tiny", ["lora.r=4"]))
    assert [s for s in a if a[s] != b[s]] == ["train"]  # later stages change through train's new fingerprint


def test_data_and_format_fields_change_their_stages():
    a = _keys(load_config("tiny"))
    b = _keys(load_config("tiny", ["data.synthetic_train_rows=50"]))
    c = _keys(load_config("tiny", ["format.max_length=300"]))
    assert a["data"] != b["data"] and a["format"] == b["format"]
    assert a["data"] == c["data"] and a["format"] != c["format"] and a["train"] != c["train"]


def test_where_logs_go_and_the_price_do_not_retrain():
    a = _keys(load_config("tiny"))
    b = _keys(load_config("tiny", ["tracking.project=other", "training.price_per_hour=2.5"]))
    assert a == b


def test_upstream_fingerprint_changes_key():
    cfg = load_config("tiny")
    a, b = _keys(cfg, fingerprint="f1"), _keys(cfg, fingerprint="f2")
    assert a["authenticate"] == b["authenticate"] and a["data"] == b["data"]
    assert all(a[s] != b[s] for s in ("format", "train", "evaluate", "save_adapter", "generate"))


def test_editing_the_chat_template_changes_the_format_key_and_a_docstring_does_not(monkeypatch):
    import sft_pipeline.models
    import tasks.format

    cfg = load_config("tiny")
    before = _keys(cfg)
    try:
        monkeypatch.setattr(tasks.format, "__doc__", "an edited docstring")
        monkeypatch.setattr(tasks.format.run, "__doc__", "an edited docstring")
        docs = _keys(cfg, importlib.reload(flows.stages).STAGES)
        monkeypatch.setattr(sft_pipeline.models, "ZEPHYR_TEMPLATE", sft_pipeline.models.ZEPHYR_TEMPLATE + " ")
        template = _keys(cfg, importlib.reload(flows.stages).STAGES)
    finally:
        monkeypatch.undo()
        importlib.reload(flows.stages)
    assert docs == before
    assert template["format"] != before["format"] and template["data"] == before["data"]


def test_every_keyed_field_exists_in_the_config():
    cfg = PipelineConfig()
    for stage in flows.stages.STAGES:
        for name in stage.keyed + stage.reads:
            if name in FACTS:
                continue
            obj = cfg
            for part in name.split("."):
                assert hasattr(obj, part), f"stage {stage.name}: {name} is not a config field"
                obj = getattr(obj, part)


def test_a_stage_cannot_read_a_field_its_row_does_not_name():
    view = ConfigView(load_config("tiny"), frozenset({"lora", "format.max_length"}), "train")
    assert view.lora.r == 8 and view.format.max_length == 256
    with pytest.raises(AttributeError, match="stage 'train' reads format.chat_template"):
        view.format.chat_template
    with pytest.raises(AttributeError, match="reads generation"):
        view.generation


def _import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (at any depth of the file: lazy imports count too)."""
    import ast

    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for d in ("flows", "tasks", "sft_pipeline", "bench") for p in (ROOT / d).rglob("*.py")}
    graph = {}
    for mod, path in files.items():
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[mod] = {n for n in names if n in files and n != mod}
    return graph


def test_the_package_has_no_import_cycles():
    graph, state, cycles = _import_graph(), {}, []

    def visit(mod: str, path: list[str]) -> None:
        state[mod] = "open"
        for dep in sorted(graph[mod]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[mod] = "done"

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])
    assert len(graph) > 20 and not cycles, cycles


def test_the_base_models_eval_is_kept_across_retraining_and_nothing_else(monkeypatch):
    """The evaluate stage keeps the base model's numbers under a key of its own: its key without the trained adapter,
    plus device and scoring mode. Retraining keeps it; what changes the base's numbers changes it."""
    from tasks.evaluate import base_memo_key

    monkeypatch.setattr("sft_pipeline.varlen._choice", {"use": "auto", "kernel": None})  # chosen here: not kept
    evaluate = flows.stages.BY_NAME["evaluate"]

    def memo(cfg, train="t0", fmt="f0", device="cuda", packed=True):
        up = {"format": ArtifactRef(stage="format", key="k", path="/p", fingerprint=fmt),
              "train": ArtifactRef(stage="train", key="k", path="/p", fingerprint=train)}
        mode = {"attn": "sft_varlen" if packed else None, "packed": packed, "pad_to_multiple_of": 64}
        return base_memo_key(key_parts(evaluate, cfg, up, Facts(cfg, blocks=False)), mode, device)

    cfg = load_config("tiny")
    first = memo(cfg)
    assert memo(cfg, train="t1") == first  # another adapter: same base numbers
    assert memo(load_config("tiny", ["training.learning_rate=0.001", "lora.r=4"]), train="t2") == first
    changed = [memo(cfg, fmt="f1"),  # another formatted test set (template, max length, data)
               memo(load_config("tiny", ["evaluation.max_samples=20"])),
               memo(load_config("tiny", ["quantization.quant_type=fp4"])),
               memo(load_config("tiny", ["model.name=mistral-7b"])),  # another base model
               memo(cfg, device="cpu"), memo(cfg, packed=False)]
    monkeypatch.setattr("sft_pipeline.varlen.kernel_label", lambda: "flash-attn 4")  # another attention kernel
    changed.append(memo(cfg))
    assert first not in changed and len(set(changed)) == len(changed)
    assert base_memo_key({}, {}, "cuda") is None  # outside the flow (the bench): nothing kept


def test_the_base_models_samples_are_kept_across_retraining_and_nothing_else():
    """The generate stage keeps the base model's replies the same way: its key parts without the adapter, the
    prompts' token ids and the device."""
    from tasks.generate import base_memo_key

    generate = flows.stages.BY_NAME["generate"]

    def memo(cfg, adapter="a0", prompts=((1, 2, 3),), device="cuda"):
        up = {"save_adapter": ArtifactRef(stage="save_adapter", key="k", path="/p", fingerprint=adapter)}
        return base_memo_key(key_parts(generate, cfg, up, Facts(cfg, blocks=False)), [list(p) for p in prompts],
                             device)

    cfg = load_config("tiny")
    first = memo(cfg)
    assert memo(cfg, adapter="a1") == first  # another adapter: the same base replies
    changed = [memo(cfg, prompts=((1, 2, 4),)),  # the prompts as tokenized (another chat template)
               *(memo(load_config("tiny", [o])) for o in ("generation.seed=7", "generation.max_new_tokens=5",
                                                          "quantization.quant_type=fp4", "model.name=mistral-7b")),
               memo(cfg, device="cpu")]
    assert first not in changed and len(set(changed)) == len(changed)
    assert base_memo_key({}, [[1]], "cuda") is None
