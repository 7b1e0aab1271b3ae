"""DPO stage 6 — dpo_generate: replies of the SFT model and of the DPO model to the recipe's prompts, side by side.

One base model with both adapters (the SFT stages' and the DPO one), switched; all prompts generated together
(left-padded batches, ``answers.generate_replies``), each model's draws seeded the same. Saved as samples.json and
samples.md (the run report shows them).
"""
from __future__ import annotations

import json

from sft_pipeline.stage import StageContext

VERSION = "1"


def _markdown(samples: list[dict], random_weights: bool) -> str:
    lines = ["# Samples: SFT vs DPO", ""]
    if random_weights:
        lines += ["*Base model with random weights (built from a config).*", ""]
    for i, s in enumerate(samples, 1):
        prompt = " / ".join(f"**{m['role']}**: {m['content']}" for m in s["messages"])
        lines += [f"## Prompt {i}", prompt, "", "**SFT:**", "```", s["sft"], "```", "**DPO:**", "```", s["dpo"], "```",
                  ""]
    return "\n".join(lines)


def run(ctx: StageContext) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from sft_pipeline.answers import generate_replies
    from sft_pipeline.models import is_random, load_model

    cfg, generation = ctx.cfg, ctx.cfg.dpo_generation
    adapter = ctx.upstream["dpo_save_adapter"].path
    tok = AutoTokenizer.from_pretrained(adapter)
    base = load_model(ctx.base_model(), cfg.model, cfg.quantization, ctx.device, ctx.hf_token)
    model = PeftModel.from_pretrained(base, ctx.upstream["save_adapter"].path, adapter_name="sft").eval()
    model.load_adapter(adapter, adapter_name="dpo")
    kwargs = dict(max_new_tokens=generation.max_new_tokens, do_sample=generation.do_sample)
    if generation.do_sample:
        kwargs.update(temperature=generation.temperature, top_k=generation.top_k, top_p=generation.top_p)
    prompts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
               for m in generation.prompts]
    replies = {}
    for name in ("sft", "dpo"):
        model.set_adapter(name)
        torch.manual_seed(generation.seed)
        replies[name] = generate_replies(model, tok, prompts, device=ctx.device, end_token_id=tok.eos_token_id,
                                         **kwargs)
    samples = [{"messages": m, "sft": s, "dpo": d, "sft_finished": sf, "dpo_finished": df}
               for m, (s, sf), (d, df) in zip(generation.prompts, replies["sft"], replies["dpo"])]
    (ctx.out / "samples.json").write_text(json.dumps(samples, indent=2, ensure_ascii=False))
    (ctx.out / "samples.md").write_text(_markdown(samples, is_random(cfg.model)))
    return {"prompts": len(samples), "dpo_finished": sum(s["dpo_finished"] for s in samples)}
