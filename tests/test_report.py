"""The run report: loss table rows, the loss PNG and the markdown page."""
from __future__ import annotations

import base64
import re
import struct

from sft_pipeline import health, report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

HISTORY = [
    {"loss": 10.4, "grad_norm": 3.1, "learning_rate": 2e-4, "epoch": 0.2, "step": 10},
    {"loss": 6.2, "grad_norm": 2.0, "learning_rate": 1.6e-4, "epoch": 0.4, "step": 20},
    {"eval_loss": 5.9, "eval_runtime": 1.2, "epoch": 0.4, "step": 20},
    {"loss": 2.5, "grad_norm": 1.1, "learning_rate": 8e-5, "epoch": 0.8, "step": 40},
    {"eval_loss": 2.1, "eval_runtime": 1.2, "epoch": 1.0, "step": 50},
    {"train_runtime": 30.0, "train_loss": 5.1, "epoch": 1.0, "step": 50},
]

SUMMARY = {
    "recipe": "tiny", "status": "Completed", "flow_run_id": "0b6c7f9e-1111-2222-3333-444455556666",
    "stages": {
        "authenticate": {"state": "Cached", "seconds": 0.41, "artifact": "/s/authenticate/aa"},
        "train": {"state": "Completed", "seconds": 63.27, "artifact": "/s/train/bb", "attempts": 2},
        "evaluate": {"state": "Completed", "seconds": 9.5, "artifact": "/s/evaluate/cc"},
    },
    "eval": {"split": "test_sft", "rows": 20, "base": {"eval_loss": 10.37124, "perplexity": 31918.42,
                                                       "tokens_per_second": 20512},
             "tuned": {"eval_loss": 0.81234, "perplexity": 2.2531, "tokens_per_second": 18034}},
    "train": {"tokens_per_second": 1234.56, "tokens_per_second_warm": 1500.2, "train_seconds": 4321.0, "steps": 50,
              "estimate": {"tokens_per_second": 1450, "tokens": 2_500_000, "hours": 0.479, "cost": 1.92}},
    "adapter": "/s/save_adapter/dd",
    "promotion": {"promoted": True, "reason": "first adapter promoted for this recipe", "pointer": "/s/p.json"},
    "wandb": {"sync_command": "wandb sync /s/wandb/offline-run-1"},
}


def test_loss_rows_merge_train_and_eval_by_step():
    rows = report.loss_rows(HISTORY)
    assert [r["step"] for r in rows] == [10, 20, 40, 50]
    assert rows[1] == {"step": 20, "train_loss": 6.2, "eval_loss": 5.9, "learning_rate": 1.6e-4}
    assert rows[3] == {"step": 50, "train_loss": None, "eval_loss": 2.1, "learning_rate": None}  # not the average
    assert report.loss_rows([]) == []


def test_loss_rows_are_rounded_and_carry_the_evaluate_stages_eval_loss():
    history = [{"loss": 10.412345678, "learning_rate": 0.005943234, "step": 10},
               {"loss": 0.8312999, "learning_rate": 0.0001234567, "step": 50},
               {"train_runtime": 30.0, "train_loss": 5.1, "step": 50}]
    rows = report.loss_rows(history, SUMMARY["eval"])
    assert rows == [{"step": 0, "train_loss": None, "eval_loss": 10.37, "learning_rate": None},  # the base model
                    {"step": 10, "train_loss": 10.41, "eval_loss": None, "learning_rate": 0.00594},
                    {"step": 50, "train_loss": 0.8313, "eval_loss": 0.8123, "learning_rate": 0.000123}]  # tuned
    # training's own eval at the last step keeps its number; the base still fills step 0
    assert report.loss_rows(HISTORY, SUMMARY["eval"])[-1]["eval_loss"] == 2.1
    assert report.loss_rows(HISTORY, SUMMARY["eval"])[0] == {"step": 0, "train_loss": None, "eval_loss": 10.37,
                                                             "learning_rate": None}
    assert report.loss_rows(history, None) == report.loss_rows(history)


def _red_pixels(png: bytes) -> int:
    """Pixels of the evaluate stage's markers (matplotlib's tab:red, #d62728) in a PNG."""
    import io

    from PIL import Image

    pixels = Image.open(io.BytesIO(png)).convert("RGB").get_flattened_data()
    return sum(1 for r, g, b in pixels if abs(r - 0xd6) < 12 and abs(g - 0x27) < 12 and abs(b - 0x28) < 12)


def test_the_picture_shows_the_evaluate_stages_eval_loss_as_points():
    train_only = [e for e in HISTORY if "eval_loss" not in e]
    assert _red_pixels(report.loss_png(train_only)) == 0
    with_eval = report.loss_png(train_only, SUMMARY["eval"])
    assert png_size(with_eval) == (700, 400) and _red_pixels(with_eval) > 100  # two diamonds and their labels


def png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == PNG_SIGNATURE
    return struct.unpack(">II", png[16:24])  # IHDR width, height


def test_loss_png_with_eval_without_eval_and_with_one_point():
    assert png_size(report.loss_png(HISTORY)) == (700, 400)
    assert png_size(report.loss_png([e for e in HISTORY if "eval_loss" not in e])) == (700, 400)
    assert png_size(report.loss_png([{"loss": 1.0, "step": 1}])) == (700, 400)
    assert png_size(report.loss_png([])) == (700, 400)


def test_markdown_has_the_numbers_and_a_decodable_png():
    png = report.loss_png(HISTORY)
    h = health.check(HISTORY, SUMMARY["eval"], min_steps=100)
    md = report.markdown(SUMMARY, h, png)
    assert md.startswith("# Fine-tune `tiny`: Completed")
    assert "| train | Completed (2 attempts) | 63.3 | `/s/train/bb` |" in md
    assert "| authenticate | Cached | 0.4 | `/s/authenticate/aa` |" in md
    assert "| base (before fine-tuning) | 10.3712 | 31,918 | 20,512 |" in md
    assert "| tuned | 0.8123 | 2.253 | 18,034 |" in md
    assert "-9.5589 (better" in md
    assert "1,235 tokens/s (1,500 after warm-up)" in md
    assert "1 h 12 min for 50 steps (1.20 h)" in md
    assert "2,500,000 tokens at 1,450 tokens/s: 0.48 h, cost about 1.92" in md
    assert "`/s/save_adapter/dd`" in md
    assert "**Promoted**: first adapter promoted for this recipe" in md
    assert "Only 50 training steps ran" in md  # the health section, a warning under min_steps=100
    assert "wandb sync /s/wandb/offline-run-1" in md
    data = re.search(r"!\[loss curve\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", md).group(1)
    decoded = base64.b64decode(data)
    assert decoded == png and png_size(decoded) == (700, 400)


def test_markdown_of_a_failed_run_without_eval_or_train():
    failed = {"recipe": "tiny", "status": "Failed",
              "stages": {"authenticate": {"state": "Completed", "seconds": 0.5, "artifact": "/s/a"},
                         "data": {"state": "Failed", "seconds": 1.25,
                                  "error": "data: split 'train' | row 3: no messages"}}}
    md = report.markdown(failed, None, None)
    assert md.startswith("# Fine-tune `tiny`: Failed")
    assert "| data | Failed | 1.2 | data: split 'train' \\| row 3: no messages |" in md
    for absent in ("Evaluation", "Training", "Adapter", "Promotion", "data:image", "W&B"):
        assert absent not in md


def test_markdown_links_the_wandb_run():
    md = report.markdown({"recipe": "tiny", "status": "Completed", "wandb": {"url": "https://wandb.ai/u/p/runs/x"}},
                         None, None)
    assert "W&B run: [https://wandb.ai/u/p/runs/x](https://wandb.ai/u/p/runs/x)" in md


def test_the_report_says_how_training_ran():
    measured = {"per_device_batch_size": 8, "gradient_accumulation_steps": 2, "gradient_checkpointing": False,
                "checkpointed_layers": 0, "auto": True, "measured_gib": {"1": 7.56, "2": 14.9}, "dequantized_gib": 9.6}
    page = report.markdown({**SUMMARY, "train": {**SUMMARY["train"], "batch_plan": measured, "liger": True,
                                                 "attn_implementation": "varlen",
                                                 "attention_kernel": "torch"}}, None, None)
    assert ("- how it ran: micro-batch 8 x accumulation 2 = effective batch 16 (measured), no gradient checkpointing, "
            "attention varlen, Liger kernels, 4-bit base kept dequantized (+9.6 GiB)") in page
    fa4 = report._how_it_ran({"batch_plan": measured, "attn_implementation": "varlen",
                              "attention_kernel": "flash-attn 4"})
    assert "attention varlen (flash-attn 4), 4-bit base" in fa4
    tight = {**measured, "per_device_batch_size": 1, "gradient_accumulation_steps": 16, "gradient_checkpointing": True,
             "checkpointed_layers": 12, "dequantized_gib": None, "world_size": 2, "effective_batch": 32}
    line = report._how_it_ran({"batch_plan": tight, "liger": False, "attn_implementation": "sdpa"})
    assert line == "micro-batch 1 x accumulation 16 x 2 GPUs = effective batch 32 (measured), gradient " \
                   "checkpointing on 12 layers, attention sdpa"
    recipe = {"per_device_batch_size": 2, "gradient_accumulation_steps": 4, "gradient_checkpointing": True,
              "auto": False}
    assert report._how_it_ran({"batch_plan": recipe}) == \
        "micro-batch 2 x accumulation 4 = effective batch 8 (as the recipe sets), gradient checkpointing"
    assert "how it ran" not in report.markdown(SUMMARY, None, None)  # an older run's metrics: no line


def test_the_training_settings_line_is_the_reports_sentence():
    """The train stage's log line (``training settings: ...``) and the report's "how it ran" are one sentence, made
    by one function: the memory a measured plan needs out of what the card has, the head and the optimizer, and no
    raw dict. Memory figures only where they mean something: a tiny model's probe steps on a GPU gave a negative
    per-row figure, which the line leaves out."""
    from sft_pipeline.how_it_ran import describe

    gpu = {"batch_plan": {"per_device_batch_size": 8, "gradient_accumulation_steps": 16,
                          "gradient_checkpointing": False, "effective_batch": 128, "auto": True, "available_gib": 139.1, "need_gib": 63.1,
                          "spare_gib": 62.0, "checkpointed_layers": 0, "measured_gib": {"1": 13.2, "2": 20.5},
                          "per_seq_gib": 7.3, "fixed_gib": 4.4, "dequantized_gib": 9.6},
           "liger": True, "optim": "adamw_torch_fused", "device": "cuda", "attn_implementation": "varlen",
           "attention_kernel": "flash-attn 4", "head": "liger", "compile": False}
    assert describe(gpu) == (
        "micro-batch 8 x accumulation 16 = effective batch 128 (measured: needs 63.1 of 139.1 GiB), no gradient "
        "checkpointing, attention varlen (flash-attn 4), Liger kernels, Liger's fused cross-entropy head, fused AdamW, "
        "4-bit base kept dequantized (+9.6 GiB)")
    assert describe(gpu) == report._how_it_ran(gpu)
    tiny_gpu = {**gpu, "batch_plan": {**gpu["batch_plan"], "need_gib": 0.4, "per_seq_gib": -0.01, "fixed_gib": 0.42,
                                      "dequantized_gib": None}}
    line = describe(tiny_gpu)
    assert "GiB" not in line and "-0" not in line and "(measured)" in line, line
    estimated = {"batch_plan": {"per_device_batch_size": 4, "gradient_accumulation_steps": 2, "effective_batch": 8,
                                "gradient_checkpointing": False, "auto": True, "free_gib": 70.4}, "head": "lean"}
    assert describe(estimated) == ("micro-batch 4 x accumulation 2 = effective batch 8 (planned from 70.4 GiB free), "
                                   "no gradient checkpointing, lean LM head (no per-token metrics)")
    cpu = {"batch_plan": {"per_device_batch_size": 8, "gradient_accumulation_steps": 1, "gradient_checkpointing": False,
                          "effective_batch": 8, "auto": False}, "liger": False, "optim": "adamw_torch", "device": "cpu",
           "attn_implementation": "sdpa", "head": "trl", "compile": False}
    assert describe(cpu) == ("micro-batch 8 x accumulation 1 = effective batch 8 (as the recipe sets), no gradient "
                             "checkpointing, attention sdpa")
    assert describe({}) == ""


def test_the_report_says_when_the_base_models_numbers_were_kept():
    kept = {**SUMMARY, "eval": {**SUMMARY["eval"], "base": {**SUMMARY["eval"]["base"],
                                                          "kept_from": "2026-11-29T02:10:00Z"}}}
    page = report.markdown(kept, None, None)
    assert "The base model's numbers (loss, tokens/s, answers) are kept from its scoring on 2026-11-29 02:10 UTC" \
        in page
    assert "| base (before fine-tuning) | 10.3712 |" in page  # still shown, as scored then
    assert "kept from" not in report.markdown(SUMMARY, None, None)


BENCH = {
    "rows": [
        {"benchmark": "ifbench", "metric": "prompt_strict", "label": "prompt-level strict", "primary": True,
         "items": 32, "unit": "prompts", "base": 0.125, "tuned": 0.1875, "delta": 0.0625,
         "base_ci": [0.0497, 0.2813], "tuned_ci": [0.0889, 0.3531], "interval": "wilson"},
        {"benchmark": "ifbench", "metric": "instruction_loose", "label": "instruction-level loose", "primary": False,
         "items": 36, "unit": "instructions", "base": 0.25, "tuned": 0.2222, "delta": -0.0278,
         "base_ci": [0.1375, 0.4108], "tuned_ci": [0.1172, 0.3802], "interval": "wilson"},
    ],
    "benchmarks": {"ifbench": {"items": 32, "scorable": 269, "total": 294, "excluded_prompts": 25,
                               "excluded_instructions": {"format:title_case": "punkt_tab",
                                                         "ratio:stop_words": "stopwords"},
                               "base": {"cut_short": 0.5}, "tuned": {"cut_short": 0.0625},
                               "base_kept_from": "2026-11-29T02:10:00Z"}},
    "settings": {"limit": 32, "max_new_tokens": 128},
    "wandb": {"sync_command": "wandb sync /s/wandb/offline-run-2"},
}


def test_the_report_has_the_benchmarks_table_notes_and_chart():
    png = report.benchmark_png(BENCH["rows"])
    assert png_size(png)[0] == 700
    assert png_size(report.benchmark_png([]))[0] == 700  # no rows: a picture that says so
    perfect = {**BENCH["rows"][0], "tuned": 1.0, "tuned_ci": [0.8, 0.9999999999999999]}  # an older rounding
    assert png_size(report.benchmark_png([perfect]))[0] == 700
    page = report.markdown({**SUMMARY, "benchmark": BENCH}, None, None, png)
    assert "| ifbench | **prompt-level strict** | 32 prompts | 12.5 % | 18.8 % | +6.2 points | " \
           "5.0 %-28.1 %; 8.9 %-35.3 % |" in page
    assert "| ifbench | instruction-level loose | 36 instructions | 25.0 % | 22.2 % | -2.8 points |" in page
    assert "at most 128 new tokens; the first 32 items of each benchmark (`benchmark.limit`)" in page
    assert "32 of its 269 scorable prompts scored; 25 of its 294 prompts excluded: their instructions " \
           "(format:title_case, ratio:stop_words) need NLTK data (punkt_tab, stopwords)" in page
    assert "replies cut short at the token cap: base 50%, tuned 6%" in page
    assert "the base model's scores kept from 2026-11-29 02:10 UTC" in page
    assert "upload it with `wandb sync /s/wandb/offline-run-2`" in page
    data = re.search(r"!\[benchmarks\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", page).group(1)
    assert base64.b64decode(data) == png
    assert page.index("## Evaluation") < page.index("## Benchmarks") < page.index("## Training")
    assert "Benchmarks" not in report.markdown(SUMMARY, None, None)  # an older run's summary: no section


def test_the_outcome_line_says_how_the_run_ended():
    assert report.outcome(SUMMARY) == "Completed · eval loss 10.37 → 0.8123 · promoted"
    failed = {"status": "Failed", "stages": {"data": {"state": "Failed", "error": "data: 40 of 40 rows invalid"}}}
    assert report.outcome(failed) == "Failed · data: data: 40 of 40 rows invalid"
    refused = {"status": "Failed", "error": "invalid config: training: training.num_processes=3 must divide ..."}
    assert report.outcome(refused) == "Failed · invalid config: training: training.num_processes=3 must divide ..."
    cancelled = {"status": "Cancelled", "attempt": 2,
                 "stopped": {"how": "Cancelled", "stage": "train", "resume": "checkpoint-20 kept; Retry resumes "
                                                                              "from step 20"}}
    assert report.outcome(cancelled) == "Cancelled during train · checkpoint-20 kept; Retry resumes from step 20 · " \
                                        "attempt 2"


def test_a_resumed_attempt_says_its_attempt_and_the_steps_it_trained():
    resumed = {**SUMMARY, "attempt": 2, "train": {**SUMMARY["train"], "resumed_from_step": 10, "train_seconds": 62.0}}
    page = report.markdown(resumed, None, None)
    assert "**Attempt 2** of this flow run (a Retry): stages an earlier attempt finished are reused (Cached); " \
           "training resumed from checkpoint-10." in page
    assert "- training time: 1 min 02 s for steps 10→50 (0.02 h)" in page
    assert "- resumed from checkpoint-10" in page
    assert "Attempt" not in report.markdown(SUMMARY, None, None)


def test_a_cancelled_run_and_a_refused_one_have_their_report():
    cancelled = {"recipe": "tiny", "status": "Cancelled", "stages": {
        "format": {"state": "Cached", "seconds": 0.3, "artifact": "/s/format/ff"},
        "train": {"state": "Cancelled", "seconds": 41.0, "key": "abc"}},
        "stopped": {"how": "Cancelled", "stage": "train", "resume": "checkpoint-20 kept; Retry resumes from step 20",
                    "checkpoint": "/s/.work/train/abc/checkpoint-20", "step": 20}}
    page = report.markdown(cancelled, None, None)
    assert page.startswith("# Fine-tune `tiny`: Cancelled")
    assert "The run was **Cancelled** during the **train** stage: checkpoint-20 kept; Retry resumes from step 20." \
        in page
    assert "Checkpoint kept: `/s/.work/train/abc/checkpoint-20`" in page and "| train | Cancelled | 41.0 |" in page
    refused = report.markdown({"recipe": "tiny", "status": "Failed",
                               "error": "invalid config: training: num_processes=3 must divide the effective batch"},
                              None, None)
    assert "## Refused before any stage ran" in refused
    assert "invalid config: training: num_processes=3 must divide the effective batch" in refused
