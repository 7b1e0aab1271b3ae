"""Stage 6 — save adapter: the PEFT adapter (safetensors) + tokenizer + metrics + a model card, verified.

Verification reloads the saved directory the way a user will (``AutoPeftModelForCausalLM.from_pretrained``) and
compares its logits on a probe conversation with the model built from the training artifact. Only a verified
adapter is renamed into place.
"""
from __future__ import annotations

import json
import shutil

from sft_pipeline import base_origin
from sft_pipeline.errors import StageFailure
from sft_pipeline.stage import StageContext

VERSION = "3"  # 3: base_model.json (where the base came from) and a loading snippet that works anywhere
PROBE = [{"role": "user", "content": "What colour is the sky?"}]


def _where_from(origin: dict) -> str:
    """The model card's sentence on where the base came from (``base_model.json`` has the details)."""
    if origin["source"] == "hub":
        return f"the hub model `{origin['hub_id']}` at revision `{origin['revision']}`"
    if origin["source"] == "build":
        return (f"`{origin['name']}` **with random weights**, built from a config by sft-pipeline into the store the "
                f"adapter is in (`{origin['path']}` from this directory). It moves with the store; copied elsewhere "
                "without it, rebuild it with `python -m sft_pipeline.base_origin <this directory> <a store dir>` "
                "(same seed, weights checked against their recorded sha256) and load the printed directory")
    return f"`{origin['name']}` ({origin['source']}), loaded from `{origin['path']}`"


def _card(model_name: str, random_weights: bool, dataset: str, recipe: str, metrics: dict, train: dict,
          origin: dict) -> str:
    from sft_pipeline.base_origin import snippet

    warn = "\n> **The base model has random weights** (built from a config for tests or speed work).\n" \
        if random_weights else ""
    return f"""---
library_name: peft
base_model: {model_name}
tags: [sft, lora, qlora, sft-pipeline]
---
# LoRA adapter for {model_name}
{warn}
Fine-tuned by sft-pipeline, recipe `{recipe}`, on `{dataset}`.

| | eval loss | perplexity |
|---|---|---|
| base | {metrics['base']['eval_loss']:.4f} | {metrics['base']['perplexity']:.2f} |
| tuned | {metrics['tuned']['eval_loss']:.4f} | {metrics['tuned']['perplexity']:.2f} |

Training: {train.get('steps')} steps, {train.get('tokens')} tokens, train loss {train.get('train_loss')}.

**Base model**: {_where_from(origin)}. `base_model.json` records it; `adapter_config.json`'s
`base_model_name_or_path` holds the path it was loaded from at training time, so use the code below rather than
`AutoPeftModelForCausalLM` once the adapter has moved. It works from any working directory (set `adapter`):

```python
{snippet()}```
"""


def run(ctx: StageContext) -> dict:
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    from sft_pipeline.models import attn_implementation, bnb_config, compute_dtype, is_random, load_tuned

    cfg, tuned, out = ctx.cfg, ctx.upstream["train"], ctx.out
    tok = AutoTokenizer.from_pretrained(str(ctx.upstream["format"].file("tokenizer")))
    probe = tok.apply_chat_template(PROBE, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    eval_metrics = ctx.upstream["evaluate"].read_json("metrics.json")
    train_metrics = tuned.read_json("train_metrics.json")
    shutil.copytree(tuned.file("adapter"), out, dirs_exist_ok=True)
    tok.save_pretrained(out)
    (out / "metrics.json").write_text(json.dumps({"eval": eval_metrics, "train": train_metrics}, indent=2))
    device, base = ctx.device, ctx.base_model()
    origin = base_origin.origin(cfg.model, base, ctx.store.artifact_dir("save_adapter", ctx.key), ctx.store.root)
    (out / base_origin.FILE).write_text(json.dumps(origin, indent=2))
    (out / "README.md").write_text(_card(cfg.model.name, is_random(cfg.model), cfg.data.dataset, cfg.recipe,
                                         eval_metrics, train_metrics, origin))
    with torch.no_grad():
        expected = load_tuned(base, tuned.file("adapter"), cfg.model, cfg.quantization, device, ctx.hf_token)
        want = expected(**{k: v.to(device) for k, v in probe.items()}).logits.float().cpu()
        del expected
        dtype = compute_dtype(cfg.quantization, device)
        reloaded = AutoPeftModelForCausalLM.from_pretrained(
            str(out), quantization_config=bnb_config(cfg.quantization, dtype), dtype=dtype,
            device_map={"": 0 if device == "cuda" else "cpu"}, attn_implementation=attn_implementation(cfg.model, device),
            token=ctx.hf_token).eval()
        got = reloaded(**{k: v.to(device) for k, v in probe.items()}).logits.float().cpu()
    diff = (got - want).abs().max().item()
    if not diff <= 1e-3:
        raise StageFailure(f"save_adapter: the reloaded adapter's logits differ from the trained model's by {diff}")
    (out / "verification.json").write_text(json.dumps({"max_abs_logit_diff": diff, "probe": PROBE}))
    return {"eval": eval_metrics}
