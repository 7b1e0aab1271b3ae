"""The tiny recipe end to end through the CLI: every stage, caching, partial re-runs, a loadable adapter."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, STAGES, run_flow, tiny_trainer_inputs



def states(summary: dict) -> list[str]:
    return [summary["stages"][s]["state"] for s in STAGES]


def test_first_run_completes_every_stage(tiny_run):
    store, summary, proc = tiny_run
    assert STAGES == ["authenticate", "data", "format", "train", "evaluate", "benchmark", "save_adapter", "generate"]
    assert states(summary) == ["Completed"] * len(STAGES)
    for s in STAGES:
        path = Path(summary["stages"][s]["artifact"])
        assert path.is_dir() and (path / "manifest.json").is_file() and path.parent.parent == store.resolve()
    assert f"adapter: {summary['adapter']}" in proc.stdout


def test_tuned_model_learned(tiny_run):
    _, summary, _ = tiny_run
    ev = summary["eval"]
    assert ev["tuned"]["eval_loss"] < 0.5 * ev["base"]["eval_loss"], ev
    # the evaluate stage's speed: every scored token of the test rows, over each pass's own time
    assert ev["tokens"] > ev["rows"] > 0
    for m in (ev["base"], ev["tuned"]):
        assert m["seconds"] > 0  # rounded to 0.01 s in the metrics, tokens/s to a whole number (hence the 0.5)
        fastest, slowest = ev["tokens"] / max(m["seconds"] - 0.006, 1e-3), ev["tokens"] / (m["seconds"] + 0.006)
        assert slowest - 0.5 <= m["tokens_per_second"] <= fastest + 0.5
    train = summary["train"]
    assert train["steps"] == 50 and train["tokens"] > 0 and train["resumed_from_step"] == 0


def test_samples_follow_the_chat_format(tiny_run):
    _, summary, _ = tiny_run
    samples = json.loads(Path(summary["samples"]).read_text())
    assert any("pirate" in m["content"] for s in samples for m in s["messages"])  # the seed's prompt is there
    for s in samples:
        reply = s["tuned"]
        assert reply and "<|" not in reply, reply  # a reply, not template markers
        assert s["tuned_finished"], s  # stopped on EOS before max_new_tokens


def test_data_and_format_artifacts(tiny_run):
    _, summary, _ = tiny_run
    data = json.loads((Path(summary["stages"]["data"]["artifact"]) / "stats.json").read_text())
    assert data["splits"]["train_sft"]["rows"] == 1200 and data["splits"]["test_sft"]["rows"] == 64
    fmt = json.loads((Path(summary["stages"]["format"]["artifact"]) / "stats.json").read_text())
    for split in ("train_sft", "test_sft"):
        st = fmt[split]
        assert st["rows"] > 0 and st["p50"] <= st["p95"] <= st["max"] and st["truncated"] == 0


def test_rerun_is_all_cached(tiny_run):
    store, first, _ = tiny_run
    t0 = time.perf_counter()
    proc, summary = run_flow(store)
    print(f"\ncached rerun took {time.perf_counter() - t0:.1f}s wall (interpreter start included)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert states(summary) == ["Cached"] * len(STAGES)
    assert summary["adapter"] == first["adapter"]


@pytest.mark.slow  # 50 s in CI here (2-core, 2026-12-07)
def test_lora_rank_reruns_only_train_and_after(tiny_run):
    store, first, _ = tiny_run

    def kept() -> dict[str, int]:  # the session's store also holds other tests' runs
        return {d: len(list((store / d).iterdir())) for d in ("evaluate_base", "generate_base")}

    before = kept()
    proc, summary = run_flow(store, "lora.r=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert states(summary) == ["Cached"] * 3 + ["Completed"] * (len(STAGES) - 3)
    assert summary["adapter"] != first["adapter"]
    cfg = json.loads((Path(summary["adapter"]) / "adapter_config.json").read_text())
    assert cfg["r"] == 4
    # the base model's numbers do not depend on training: kept from the first run's scoring, not scored again
    base, first_base = summary["eval"]["base"], first["eval"]["base"]
    assert "kept_from" not in first_base and base["kept_from"]
    assert {k: base[k] for k in first_base} == first_base  # loss, seconds and tokens/s exactly as first scored
    assert summary["eval"]["generation"]["base"] == first["eval"]["generation"]["base"]
    assert summary["eval"]["tuned"] != first["eval"]["tuned"]
    assert "base model's numbers kept from" in proc.stdout + proc.stderr
    # the same for the generate stage's sample replies
    samples, first_samples = (json.loads(Path(s["samples"]).read_text()) for s in (summary, first))
    assert [x["base"] for x in samples] == [x["base"] for x in first_samples]
    assert "The base model's replies are kept from" in (Path(summary["samples"]).parent / "samples.md").read_text()
    assert "kept from" not in (Path(first["samples"]).parent / "samples.md").read_text()
    assert kept() == before  # nothing scored or generated again for the base


def test_adapter_loads_in_a_fresh_process(tiny_run):
    _, summary, _ = tiny_run
    code = f"""
import torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer
path = {summary['adapter']!r}
tok = AutoTokenizer.from_pretrained(path)
model = AutoPeftModelForCausalLM.from_pretrained(path)
ids = tok.apply_chat_template([{{"role": "user", "content": "What does the cow say?"}}], add_generation_prompt=True,
                              return_tensors="pt", return_dict=True)
out = model.generate(**ids, max_new_tokens=12, do_sample=False)
print("REPLY:", tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reply = proc.stdout.split("REPLY:", 1)[1].strip()
    assert reply and "<|" not in reply


def test_prompts_generated_together_give_each_prompt_its_own_reply(tiny_run):
    # the generate stage and the held-out answers decode all prompts in left-padded batches: greedy, a prompt's reply
    # is the one it gets alone (prompts of different lengths: padding and positions must not leak into a reply)
    from sft_pipeline.answers import generate_replies
    from sft_pipeline.config import load_config
    from sft_pipeline.models import load_tuned

    _, tok, model_dir = tiny_trainer_inputs(tiny_run, 1)
    adapter = tiny_run[1]["stages"]["save_adapter"]["artifact"]
    cfg = load_config("tiny")
    model = load_tuned(str(model_dir), adapter, cfg.model, cfg.quantization, "cpu")
    chats = [[{"role": "user", "content": q}] for q in
             ("What does the cow say?", "What colour is the sky on a clear summer day at noon, seen from a beach?",
              "Count to three.")]
    prompts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
               for c in chats]
    assert len({len(p) for p in prompts}) == 3
    kw = dict(device="cpu", end_token_id=tok.eos_token_id, max_new_tokens=12, do_sample=False)
    together = generate_replies(model, tok, prompts, **kw)
    alone = [generate_replies(model, tok, [p], **kw)[0] for p in prompts]
    assert together == alone and any(text for text, _ in together)
