"""Stage 5 — evaluate: eval loss and perplexity on the test subset, for the base model and the tuned one.

The base is the same loaded model with the adapter disabled, so both numbers come from one forward pass setup.
"""
from __future__ import annotations

import json
import math

from sft_pipeline.caching import current_key, stage_task
from sft_pipeline.config import EvaluationConfig, ModelConfig, QuantizationConfig, TrainingConfig
from sft_pipeline.store import ArtifactRef, Store


@stage_task("evaluate", ignore=("model", "auth", "training"))
def evaluate(store: str, tuned: ArtifactRef, chats: ArtifactRef, test_split: str, model: ModelConfig, base: str,
             quantization: QuantizationConfig, evaluation: EvaluationConfig,
             training: TrainingConfig, auth: ArtifactRef) -> ArtifactRef:
    """Write metrics.json: eval loss and perplexity of base and tuned on the formatted test split."""
    import datasets
    from transformers import AutoTokenizer, Trainer, TrainingArguments
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from sft_pipeline.models import base_model_path, load_tuned, resolve_device
    from sft_pipeline.secrets import hf_token_for

    st = Store(store)
    device = resolve_device(training.device)
    token = hf_token_for(auth, model)
    tok = AutoTokenizer.from_pretrained(str(chats.file("tokenizer")))
    ds = datasets.Dataset.from_parquet(str(chats.file(f"{test_split}.parquet")))
    if "assistant_masks" in ds.column_names:  # assistant-only loss: score the assistant tokens only
        ds = ds.map(lambda r: {"labels": [t if m else -100 for t, m in zip(r["input_ids"], r["assistant_masks"])]},
                    remove_columns=["assistant_masks"])
    if evaluation.max_samples:
        ds = ds.select(range(min(evaluation.max_samples, len(ds))))
    peft_model = load_tuned(base_model_path(model, st, token), tuned.file("adapter"), model, quantization, device,
                            token)
    bf16 = device == "cuda" and str(peft_model.dtype) == "torch.bfloat16"
    args = TrainingArguments(output_dir=str(st.work_dir("evaluate", current_key())), report_to="none",
                             per_device_eval_batch_size=evaluation.batch_size, use_cpu=device == "cpu", bf16=bf16,
                             disable_tqdm=True, remove_unused_columns=False)
    # the token ids are already truncated to format.max_length; assistant_masks (if any) select the loss tokens
    collator = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)
    trainer = Trainer(model=peft_model, args=args, eval_dataset=ds, data_collator=collator)
    tuned_loss = trainer.evaluate()["eval_loss"]
    with peft_model.disable_adapter():
        base_loss = trainer.evaluate()["eval_loss"]
    metrics = {"split": test_split, "rows": len(ds),
               "base": {"eval_loss": base_loss, "perplexity": math.exp(min(base_loss, 50))},
               "tuned": {"eval_loss": tuned_loss, "perplexity": math.exp(min(tuned_loss, 50))}}
    from sft_pipeline.answers import generation_metrics  # answers to held-out prompts, base vs tuned

    metrics.update(generation_metrics(peft_model, tok, chats.file(f"{test_split}.messages.parquet"),
                                      samples=evaluation.generation_samples,
                                      max_new_tokens=evaluation.generation_max_new_tokens, device=device))
    with st.write("evaluate", current_key(), metrics=metrics) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return st.ref("evaluate", current_key())
