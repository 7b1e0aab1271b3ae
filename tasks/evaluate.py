"""Stage 5 — evaluate: eval loss and perplexity on the test subset, for the base model and the tuned one.

The base is the same loaded model with the adapter disabled, so both numbers come from one forward pass setup.
With a per-sequence attention kernel (CUDA: flash-attn, or the varlen kernel) each batch is scored as one
padding-free row; else batches are padded.

The base model's numbers (eval loss, tokens/s, held-out answers) do not depend on training, so a run that only
retrains (another learning rate, a scheduled retraining on the same test set) takes them from the store instead of
scoring the base again (~79 s of the 7B job's evaluate stage on an H200): ``<store>/evaluate_base/<key>``, keyed by
this stage's key without the trained adapter, plus the device and the scoring mode. metrics.json marks them with
``kept_from`` (when they were scored).
"""
from __future__ import annotations

import json
import math

from sft_pipeline import varlen
from sft_pipeline.stage import StageContext, memo_key
from sft_pipeline.varlen import VARLEN

# Padded batches (no per-sequence attention kernel: CPU, or CUDA without flash-attn and torch's varlen kernel) are
# padded to a multiple of 64 tokens: a few dozen distinct shapes instead of one per batch, so the GPU's per-shape
# set-up is paid a few times (on an H200 the first scoring pass went from 13,418 to 18,428 tok/s, BENCHMARKS.md).
PAD_TO = 64
# The attention implementations that attend within each conversation of a padding-free row by themselves; with
# one of them the stage scores padding-free rows (+60 % on an H200 over padded batches with SDPA, BENCHMARKS.md).
# SDPA and flex could too (transformers masks the rows apart from their positions), but with a mask over the whole
# row: not measured, so they keep the padded batches.
PER_SEQUENCE = (VARLEN, "flash_attention_2")

VERSION = "6"  # 4: eval tokens/s of the base and the tuned model; 5: padded to a multiple of 64; 6: padding-free
BASE_MEMO = "evaluate_base"  # the store's directory of the base model's numbers, shared by runs that only retrain


def base_memo_key(key_parts: dict, mode: dict, device: str) -> str | None:
    """What the base model's numbers depend on: this stage's key parts without the trained adapter (base model,
    quantization, evaluation settings, test split, the formatted test set, this stage's code), plus the device and
    how it scores (with the varlen attention: which kernel). Not the libraries' versions: after an upgrade the base
    keeps its numbers (they would move in the last digits). None without key parts (called outside the flow)."""
    if key_parts and mode.get("attn") == VARLEN:
        mode = {**mode, "kernel": varlen.kernel_label()}
    return memo_key(BASE_MEMO, key_parts, ("format",), scoring=mode, device=device)


def run(ctx: StageContext) -> dict:
    import datasets
    from transformers import AutoTokenizer

    from sft_pipeline.models import load_tuned

    cfg, chats = ctx.cfg, ctx.upstream["format"]
    test_split, evaluation = cfg.data.test_split, cfg.evaluation
    tok = AutoTokenizer.from_pretrained(str(chats.file("tokenizer")))
    ds = datasets.Dataset.from_parquet(str(chats.file(f"{test_split}.parquet")))
    if "assistant_masks" in ds.column_names:  # assistant-only loss: score the assistant tokens only
        ds = ds.map(lambda r: {"labels": [t if m else -100 for t, m in zip(r["input_ids"], r["assistant_masks"])]},
                    remove_columns=["assistant_masks"])
    if evaluation.max_samples:
        ds = ds.select(range(min(evaluation.max_samples, len(ds))))
    peft_model = load_tuned(ctx.base_model(), ctx.upstream["train"].file("adapter"), cfg.model, cfg.quantization,
                            ctx.device, ctx.hf_token)
    mode = scoring_mode(cfg.model, ctx.device)
    memo = base_memo_key(ctx.key_parts, mode, ctx.device)
    kept, kept_from = ctx.store.read_memo(BASE_MEMO, memo) or ({}, None)  # {"scores", "answers"}, when
    if kept_from:
        ctx.log.info("evaluate: the base model's numbers kept from %s (same base, test set and scoring)", kept_from)
    metrics = {"split": test_split, "rows": len(ds), **score(
        peft_model, ds, tok.pad_token_id, evaluation.batch_size, ctx.device, str(ctx.work), **mode,
        base=kept.get("scores"))}
    ctx.log.debug("evaluate: %s rows, %s tokens: base %s tok/s, tuned %s tok/s", f"{len(ds):,}",
                  f"{metrics['tokens']:,}", f"{metrics['base']['tokens_per_second']:,}",
                  f"{metrics['tuned']['tokens_per_second']:,}")
    from sft_pipeline.answers import generation_metrics  # answers to held-out prompts, base vs tuned

    generation, answers = generation_metrics(peft_model, tok, chats.file(f"{test_split}.messages.parquet"),
                                             samples=evaluation.generation_samples,
                                             max_new_tokens=evaluation.generation_max_new_tokens, device=ctx.device,
                                             base=kept.get("answers"))
    metrics.update(generation)
    if kept_from:
        metrics["base"]["kept_from"] = kept_from
    else:
        ctx.store.write_memo(BASE_MEMO, memo, {"scores": metrics["base"], "answers": answers})
    (ctx.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def scoring_mode(model_cfg, device: str) -> dict:
    """How this stage scores on ``device`` (``score``'s keyword arguments): padding-free rows with a per-sequence
    attention kernel when there is one, else padded batches."""
    from sft_pipeline.models import attn_implementation

    attn = attn_implementation(model_cfg, device, packed=True)
    packed = attn in PER_SEQUENCE
    return {"attn": attn if packed else None, "packed": packed, "pad_to_multiple_of": PAD_TO}


def score(peft_model, ds, pad_token_id: int, batch_size: int, device: str, work: str, attn: str | None = None,
          packed: bool = True, pad_to_multiple_of: int | None = None, base: dict | None = None) -> dict:
    """Eval loss, perplexity, seconds and tokens/s of the tuned model and of the base (its adapter disabled).
    ``base``: the base's scores from an earlier run with the same base, test set and scoring (returned as they are;
    the base is not scored again).

    ``packed`` (the default): each batch's rows go into one padding-free row, positions restarting at every
    conversation, scored with ``attn`` (the per-sequence attention: PyTorch's varlen flash kernel on CUDA; SDPA finds
    the conversations from the positions itself) and no KV cache (with one, transformers would attend across
    conversations). No pad token is computed, and the loss is the same as with padded batches: Trainer averages
    per-batch losses either way, each batch the token mean of the same rows. ``packed=False``: padded batches (to a
    multiple of ``pad_to_multiple_of``: fewer distinct shapes), with the model's own attention: what this stage does
    without a per-sequence attention kernel (``PER_SEQUENCE``), and the bench's baseline.
    The model's attention and cache settings are restored afterwards (generation needs padded batches and a cache).

    Also what ``bench.throughput``'s ``eval`` setting times on a GPU (the same code as this stage)."""
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    bf16 = device == "cuda" and str(peft_model.dtype) == "torch.bfloat16"
    args = TrainingArguments(output_dir=work, report_to="none", per_device_eval_batch_size=batch_size,
                             use_cpu=device == "cpu", bf16=bf16, disable_tqdm=True, remove_unused_columns=False)
    # the token ids are already truncated to format.max_length; assistant_masks (if any) select the loss tokens
    collator = DataCollatorForLanguageModeling(pad_token_id=pad_token_id, padding_free=packed,
                                               pad_to_multiple_of=None if packed else pad_to_multiple_of)
    config = peft_model.get_base_model().config
    was = config._attn_implementation, config.use_cache  # before Trainer, which sets use_cache from its arguments
    trainer = Trainer(model=peft_model, args=args, eval_dataset=ds, data_collator=collator)
    trainer.remove_callback(PrinterCallback)  # it prints each metrics dict on stdout; metrics.json has them
    tokens = sum(map(len, ds["input_ids"]))  # scored forward tokens (padding excluded)
    try:
        if packed:
            config.use_cache = False
            if attn and attn != was[0]:
                peft_model.get_base_model().set_attn_implementation(attn)
        tuned = trainer.evaluate()
        if base is None:
            with peft_model.disable_adapter():
                base_run = trainer.evaluate()
    finally:
        config.use_cache = was[1]
        if config._attn_implementation != was[0]:
            peft_model.get_base_model().set_attn_implementation(was[0])

    def scores(m: dict) -> dict:
        return {"eval_loss": m["eval_loss"], "perplexity": math.exp(min(m["eval_loss"], 50)),
                "seconds": round(m["eval_runtime"], 2), "tokens_per_second": round(tokens / max(m["eval_runtime"], 1e-9))}

    return {"tokens": tokens, "base": scores(base_run) if base is None else dict(base), "tuned": scores(tuned)}
