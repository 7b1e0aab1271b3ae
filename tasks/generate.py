"""Stage 7 — generate: sample replies from the base and the tuned model for a list of prompts.

Saved as samples.json and samples.md (the run report shows them). The default prompt list includes the seed
notebook's pirate prompt. All prompts are generated together (left-padded batches of 16, as the evaluate stage's
held-out answers), not one after another.

The base model's replies do not depend on training: a run that only retrains takes them from the store
(``<store>/generate_base/<key>``: this stage's config, i.e. base model, quantization and generation settings, the
prompts as tokenized, its code and the device) instead of generating them again; samples.md says so.
"""
from __future__ import annotations

import json

from sft_pipeline.stage import StageContext, memo_key

VERSION = "3"  # 3: the prompts generated together (left-padded batches), the draws seeded once per model
BASE_MEMO = "generate_base"  # the store's directory of the base model's replies, shared by runs that only retrain


def base_memo_key(key_parts: dict, prompts: list[list[int]], device: str) -> str | None:
    """What the base model's replies depend on: this stage's key parts without the adapter (base model,
    quantization, generation settings with the seed, this stage's code), the prompts' token ids (the chat template
    comes with the adapter's tokenizer) and the device. None without key parts (called outside the flow)."""
    return memo_key(BASE_MEMO, key_parts, prompts=prompts, device=device)


def _markdown(samples: list[dict], random_weights: bool, base_kept_from: str | None = None) -> str:
    lines = ["# Samples: base vs tuned", ""]
    if random_weights:
        lines += ["*Base model with random weights (built from a config).*", ""]
    if base_kept_from:
        from sft_pipeline.report import utc_minute

        lines += [f"*The base model's replies are kept from {utc_minute(base_kept_from)}: same base model, prompts "
                  "and settings, so not generated again.*", ""]
    for i, s in enumerate(samples, 1):
        prompt = " / ".join(f"**{m['role']}**: {m['content']}" for m in s["messages"])
        lines += [f"## Prompt {i}", prompt, "", "**base:**", "```", s["base"], "```", "**tuned:**", "```",
                  s["tuned"], "```", ""]
    return "\n".join(lines)


def run(ctx: StageContext) -> dict:
    import torch
    from transformers import AutoTokenizer

    from sft_pipeline.answers import generate_replies
    from sft_pipeline.models import is_random, load_tuned

    cfg, adapter, generation = ctx.cfg, ctx.upstream["save_adapter"], ctx.cfg.generation
    tok = AutoTokenizer.from_pretrained(adapter.path)
    peft_model = load_tuned(ctx.base_model(), adapter.path, cfg.model, cfg.quantization, ctx.device, ctx.hf_token)
    kwargs = dict(max_new_tokens=generation.max_new_tokens, do_sample=generation.do_sample)
    if generation.do_sample:
        kwargs.update(temperature=generation.temperature, top_k=generation.top_k, top_p=generation.top_p)
    prompts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
               for m in generation.prompts]

    def replies() -> list[tuple[str, bool]]:  # all prompts at once (batches of 16): one decode step for all
        torch.manual_seed(generation.seed)
        return generate_replies(peft_model, tok, prompts, device=ctx.device, end_token_id=tok.eos_token_id, **kwargs)

    memo = base_memo_key(ctx.key_parts, prompts, ctx.device)
    kept, kept_from = ctx.store.read_memo(BASE_MEMO, memo) or ({}, None)  # {"replies"}, when
    tuned = replies()
    if kept_from:
        ctx.log.info("generate: the base model's replies kept from %s (same base, prompts and settings)", kept_from)
        base = [tuple(r) for r in kept["replies"]]
    else:
        with peft_model.disable_adapter():
            base = replies()
        ctx.store.write_memo(BASE_MEMO, memo, {"replies": base})
    samples = [{"messages": m, "base": b, "tuned": t, "tuned_finished": finished}
               for m, (b, _), (t, finished) in zip(generation.prompts, base, tuned)]
    (ctx.out / "samples.json").write_text(json.dumps(samples, indent=2, ensure_ascii=False))
    (ctx.out / "samples.md").write_text(_markdown(samples, is_random(cfg.model), kept_from))
    return {"prompts": len(samples), "tuned_finished": sum(s["tuned_finished"] for s in samples),
            **({"base_kept_from": kept_from} if kept_from else {})}
