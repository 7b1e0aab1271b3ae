"""Stage 7 — generate: sample replies from the base and the tuned model for a list of prompts.

Saved as samples.json and shown as a Prefect markdown artifact (``sft-samples``). The default prompt list
includes the seed notebook's pirate prompt.
"""
from __future__ import annotations

import json

from sft_pipeline.caching import current_key, stage_task
from sft_pipeline.config import GenerationConfig, ModelConfig, QuantizationConfig, TrainingConfig
from sft_pipeline.store import ArtifactRef, Store


def _markdown(samples: list[dict], random_weights: bool) -> str:
    lines = ["# Samples: base vs tuned", ""]
    if random_weights:
        lines += ["*Base model with random weights (built from a config).*", ""]
    for i, s in enumerate(samples, 1):
        prompt = " / ".join(f"**{m['role']}**: {m['content']}" for m in s["messages"])
        lines += [f"## Prompt {i}", prompt, "", "**base:**", "```", s["base"], "```", "**tuned:**", "```",
                  s["tuned"], "```", ""]
    return "\n".join(lines)


@stage_task("generate", ignore=("model", "auth", "training"))
def generate(store: str, adapter: ArtifactRef, model: ModelConfig, base: str, quantization: QuantizationConfig,
             generation: GenerationConfig, training: TrainingConfig, auth: ArtifactRef) -> ArtifactRef:
    """Generate from base (adapter disabled) and tuned for each prompt; save samples.json."""
    import torch
    from transformers import AutoTokenizer

    from sft_pipeline.models import base_model_path, is_random, load_tuned, resolve_device
    from sft_pipeline.secrets import hf_token_for

    st = Store(store)
    device = resolve_device(training.device)
    token = hf_token_for(auth, model)
    tok = AutoTokenizer.from_pretrained(adapter.path)
    peft_model = load_tuned(base_model_path(model, st, token), adapter.path, model, quantization, device, token)
    dev = "cuda" if device == "cuda" else "cpu"
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
        inputs = {k: v.to(dev) for k, v in inputs.items()}
        tuned_text, tuned_finished = sample(inputs)
        with peft_model.disable_adapter():
            base_text, _ = sample(inputs)
        samples.append({"messages": messages, "base": base_text, "tuned": tuned_text,
                        "tuned_finished": tuned_finished})
    markdown = _markdown(samples, is_random(model))
    with st.write("generate", current_key()) as tmp:
        (tmp / "samples.json").write_text(json.dumps(samples, indent=2, ensure_ascii=False))
        (tmp / "samples.md").write_text(markdown)
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(markdown, key="sft-samples", description="Samples from base and tuned model")
    except Exception:  # noqa: BLE001 - an artifact is a view, the JSON is the record
        pass
    return st.ref("generate", current_key())
