"""Stage 7 — generate: sample replies from the base and the tuned model for a list of prompts.

Saved as samples.json and samples.md (the run report shows them). The default prompt list includes the seed
notebook's pirate prompt. All prompts are generated together (left-padded batches of 16, as the evaluate stage's
held-out answers), not one after another.
"""
from __future__ import annotations

import json

from sft_pipeline.stage import StageContext

VERSION = "3"  # 3: the prompts generated together (left-padded batches), the draws seeded once per model


def _markdown(samples: list[dict], random_weights: bool) -> str:
    lines = ["# Samples: base vs tuned", ""]
    if random_weights:
        lines += ["*Base model with random weights (built from a config).*", ""]
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

    tuned = replies()
    with peft_model.disable_adapter():
        base = replies()
    samples = [{"messages": m, "base": b, "tuned": t, "tuned_finished": finished}
               for m, (b, _), (t, finished) in zip(generation.prompts, base, tuned)]
    (ctx.out / "samples.json").write_text(json.dumps(samples, indent=2, ensure_ascii=False))
    (ctx.out / "samples.md").write_text(_markdown(samples, is_random(cfg.model)))
    return {"prompts": len(samples), "tuned_finished": sum(s["tuned_finished"] for s in samples)}
