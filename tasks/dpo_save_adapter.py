"""DPO stage 5 — dpo_save_adapter: the DPO adapter (safetensors) + tokenizer + metrics + a model card, verified.

The DPO adapter is the SFT adapter trained onward (``sft_pipeline/dpo_trainer.py``), so it loads with plain peft on
the very base model the SFT adapter loads on: ``base_model.json`` records that base as the SFT save_adapter stage
records it (a hub id and revision, or a path relative to this directory for a base in the store). It replaces the
SFT adapter; it is not stacked on it. Verification reloads the saved directory as a user will
(``AutoPeftModelForCausalLM.from_pretrained``) and compares its logits on a probe conversation with the base plus the
trained adapter; only a verified adapter is renamed into place.
"""
from __future__ import annotations

import json
import shutil

from sft_pipeline import base_origin
from sft_pipeline.errors import StageFailure
from sft_pipeline.stage import StageContext

VERSION = "1"
PROBE = [{"role": "user", "content": "What colour is the sky?"}]


def _card(cfg, metrics: dict, train: dict, origin: dict, random_weights: bool) -> str:
    dpo, sft = metrics["dpo"], metrics["sft"]
    warn = "\n> **The base model has random weights** (built from a config for tests or speed work).\n" \
        if random_weights else ""
    where = (f"the hub model `{origin['hub_id']}` at revision `{origin['revision']}`" if origin["source"] == "hub"
             else f"`{origin['name']}` ({origin['source']}), at `{origin['path']}` from this directory")
    return f"""---
library_name: peft
base_model: {cfg.model.name}
tags: [dpo, lora, qlora, sft-pipeline]
---
# DPO LoRA adapter for {cfg.model.name}
{warn}
Preference-tuned by sft-pipeline, recipe `{cfg.recipe}`: DPO (trl's DPOTrainer, beta {metrics['beta']:g}) on
`{cfg.preference_data.dataset}`, starting from the SFT adapter of recipe `{cfg.sft_recipe}`, which was also the
reference. It replaces that SFT adapter: load it on the base model alone.

| held-out pairs ({metrics['pairs']}) | preference accuracy | reward accuracy | reward margin |
|---|---|---|---|
| SFT model | {sft['preference_accuracy']:.3f} | (the reference) | |
| DPO model | {dpo['preference_accuracy']:.3f} | {dpo['reward_accuracy']:.3f} | {dpo['reward_margin']:.4f} |

Preference accuracy: the share of held-out pairs where the model gives the chosen reply a higher log-probability
than the rejected one. Reward accuracy: the share where DPO's implicit reward (beta x the log-probability ratio to
the SFT model) is higher for the chosen reply. Training: {train.get('steps')} steps.

**Base model**: {where}. `base_model.json` records it; load it with the code below (from any working directory):

```python
{base_origin.snippet()}```
"""


def run(ctx: StageContext) -> dict:
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    from sft_pipeline.models import attn_implementation, bnb_config, compute_dtype, is_random, load_tuned

    cfg, trained, out = ctx.cfg, ctx.upstream["dpo_train"], ctx.out
    tok = AutoTokenizer.from_pretrained(ctx.upstream["save_adapter"].path)  # the SFT model's, template included
    probe = tok.apply_chat_template(PROBE, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    metrics = ctx.upstream["dpo_evaluate"].read_json("metrics.json")
    train = trained.read_json("train_metrics.json")
    shutil.copytree(trained.file("adapter"), out, dirs_exist_ok=True)
    tok.save_pretrained(out)
    (out / "metrics.json").write_text(json.dumps({"dpo_eval": metrics, "dpo_train": train}, indent=2))
    device, base = ctx.device, ctx.base_model()
    origin = base_origin.origin(cfg.model, base, ctx.store.artifact_dir(ctx.stage, ctx.key), ctx.store.root)
    (out / base_origin.FILE).write_text(json.dumps(origin, indent=2))
    (out / "README.md").write_text(_card(cfg, metrics, train, origin, is_random(cfg.model)))
    with torch.no_grad():
        expected = load_tuned(base, trained.file("adapter"), cfg.model, cfg.quantization, device, ctx.hf_token)
        want = expected(**{k: v.to(device) for k, v in probe.items()}).logits.float().cpu()
        del expected
        dtype = compute_dtype(cfg.quantization, device)
        reloaded = AutoPeftModelForCausalLM.from_pretrained(
            str(out), quantization_config=bnb_config(cfg.quantization, dtype), dtype=dtype,
            device_map={"": 0 if device == "cuda" else "cpu"},
            attn_implementation=attn_implementation(cfg.model, device), token=ctx.hf_token).eval()
        got = reloaded(**{k: v.to(device) for k, v in probe.items()}).logits.float().cpu()
    diff = (got - want).abs().max().item()
    if not diff <= 1e-3:
        raise StageFailure(f"dpo_save_adapter: the reloaded adapter's logits differ from the trained model's by {diff}")
    (out / "verification.json").write_text(json.dumps({"max_abs_logit_diff": diff, "probe": PROBE}))
    return {"dpo_eval": metrics}
