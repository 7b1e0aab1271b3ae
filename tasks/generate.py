"""Stage 7 — generate: sample replies from the base and the tuned model for a list of prompts.

Saved as samples.json and samples.md (the run report shows them). The default prompt list includes the seed
notebook's pirate prompt.
"""
from __future__ import annotations

import json

from sft_pipeline.stage import StageContext

VERSION = "2"


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

    from sft_pipeline.models import is_random, load_tuned

    cfg, adapter, generation = ctx.cfg, ctx.upstream["save_adapter"], ctx.cfg.generation
    tok = AutoTokenizer.from_pretrained(adapter.path)
    peft_model = load_tuned(ctx.base_model(), adapter.path, cfg.model, cfg.quantization, ctx.device, ctx.hf_token)
    kwargs = dict(max_new_tokens=generation.max_new_tokens, do_sample=generation.do_sample,
                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    if generation.do_sample:
        kwargs.update(temperature=generation.temperature, top_k=generation.top_k, top_p=generation.top_p)

    def sample(inputs) -> tuple[str, bool]:
        torch.manual_seed(generation.seed)
        with torch.no_grad():
            out = peft_model.generate(**inputs, **kwargs)
        new = out[0, inputs["input_ids"].shape[1]:]
        finished = bool((new == tok.eos_token_id).any())  # stopped by EOS, not by max_new_tokens
        return tok.decode(new, skip_special_tokens=True).strip(), finished

    samples = []
    for messages in generation.prompts:
        inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        inputs = {k: v.to(ctx.device) for k, v in inputs.items()}
        tuned_text, tuned_finished = sample(inputs)
        with peft_model.disable_adapter():
            base_text, _ = sample(inputs)
        samples.append({"messages": messages, "base": base_text, "tuned": tuned_text,
                        "tuned_finished": tuned_finished})
    (ctx.out / "samples.json").write_text(json.dumps(samples, indent=2, ensure_ascii=False))
    (ctx.out / "samples.md").write_text(_markdown(samples, is_random(cfg.model)))
    return {"prompts": len(samples), "tuned_finished": sum(s["tuned_finished"] for s in samples)}
