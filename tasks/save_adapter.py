"""Stage 6 — save adapter: the PEFT adapter (safetensors) + tokenizer + metrics + a model card, verified.

Verification reloads the saved directory the way a user will (``AutoPeftModelForCausalLM.from_pretrained``) and
compares its logits on a probe conversation with the model built from the training artifact. Only a verified
adapter is renamed into place.
"""
from __future__ import annotations

import json
import shutil

from sft_pipeline.caching import StageFailure, current_key, stage_task
from sft_pipeline.config import ModelConfig, QuantizationConfig, TrainingConfig
from sft_pipeline.store import ArtifactRef, Store

PROBE = [{"role": "user", "content": "What colour is the sky?"}]


def _card(model_name: str, random_weights: bool, dataset: str, recipe: str, metrics: dict, train: dict) -> str:
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

```python
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer
model = AutoPeftModelForCausalLM.from_pretrained("<this directory>")
tokenizer = AutoTokenizer.from_pretrained("<this directory>")
```
"""


@stage_task("save_adapter", ignore=("model", "auth", "training"))
def save_adapter(store: str, tuned: ArtifactRef, metrics: ArtifactRef, chats: ArtifactRef, model: ModelConfig,
                 base: str, quantization: QuantizationConfig, training: TrainingConfig, dataset: str, recipe: str,
                 auth: ArtifactRef) -> ArtifactRef:
    """Copy adapter + tokenizer + metrics, write the model card, verify by reloading, then publish."""
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer, BitsAndBytesConfig

    from sft_pipeline.models import (attn_implementation, base_model_path, compute_dtype, is_random, load_tuned,
                                     resolve_device)
    from sft_pipeline.secrets import hf_token_for

    st = Store(store)
    device = resolve_device(training.device)
    token = hf_token_for(auth, model)
    base_path = base_model_path(model, st, token)
    tok = AutoTokenizer.from_pretrained(str(chats.file("tokenizer")))
    probe = tok.apply_chat_template(PROBE, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    eval_metrics = metrics.read_json("metrics.json")
    train_metrics = tuned.read_json("train_metrics.json")
    with st.write("save_adapter", current_key(), metrics={"eval": eval_metrics}) as tmp:
        shutil.copytree(tuned.file("adapter"), tmp, dirs_exist_ok=True)
        tok.save_pretrained(tmp)
        (tmp / "metrics.json").write_text(json.dumps({"eval": eval_metrics, "train": train_metrics}, indent=2))
        (tmp / "README.md").write_text(_card(model.name, is_random(model), dataset, recipe, eval_metrics,
                                             train_metrics))
        dev = "cuda" if device == "cuda" else "cpu"
        with torch.no_grad():
            expected = load_tuned(base_path, tuned.file("adapter"), model, quantization, device, token)
            want = expected(**{k: v.to(dev) for k, v in probe.items()}).logits.float().cpu()
            del expected
            dtype = compute_dtype(quantization, device)
            quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization.quant_type,
                                       bnb_4bit_use_double_quant=quantization.double_quant,
                                       bnb_4bit_compute_dtype=dtype) if quantization.load_in_4bit else None
            reloaded = AutoPeftModelForCausalLM.from_pretrained(
                str(tmp), quantization_config=quant, dtype=dtype, device_map={"": 0 if dev == "cuda" else "cpu"},
                attn_implementation=attn_implementation(model, device), token=token).eval()
            got = reloaded(**{k: v.to(dev) for k, v in probe.items()}).logits.float().cpu()
        diff = (got - want).abs().max().item()
        if not diff <= 1e-3:
            raise StageFailure(f"save_adapter: the reloaded adapter's logits differ from the trained model's by {diff}")
        (tmp / "verification.json").write_text(json.dumps({"max_abs_logit_diff": diff, "probe": PROBE}))
    return st.ref("save_adapter", current_key())
