"""Stage 3 — format: apply the chat template and tokenize once; save token ids as parquet with length stats.

The tokenizer's own chat template is used (``format.chat_template: auto``) unless it has none or ``zephyr`` is
asked for. An empty system message is inserted where a conversation has none (``format.system_message``).
Sequences longer than ``format.max_length`` are truncated and counted. Training reads these ids as they are:
nothing is tokenized twice. The tokenizer (with its template) is saved beside them for the later stages.
"""
from __future__ import annotations

import json

from sft_pipeline.caching import StageFailure, current_key, stage_task
from sft_pipeline.config import FormatConfig, ModelConfig
from sft_pipeline.store import ArtifactRef, Store


def _stats(lengths: list[int], truncated: int) -> dict:
    import numpy as np

    a = np.asarray(lengths) if lengths else np.zeros(1)
    return {"rows": len(lengths), "tokens": int(a.sum()), "mean": round(float(a.mean()), 1),
            "p50": int(np.percentile(a, 50)), "p95": int(np.percentile(a, 95)), "max": int(a.max()),
            "truncated": truncated}


@stage_task("format", ignore=("model", "auth"))
def format_chats(store: str, data: ArtifactRef, splits: list[str], model: ModelConfig, base: str,
                 fmt: FormatConfig, auth: ArtifactRef) -> ArtifactRef:
    """Tokenize every conversation with the chat template; ``base`` is the base model's fingerprint."""
    import datasets

    from sft_pipeline.models import base_model_path, load_tokenizer
    from sft_pipeline.preflight import template_overhead
    from sft_pipeline.secrets import hf_token_for

    st = Store(store)
    tok = load_tokenizer(base_model_path(model, st), model, fmt.chat_template, token=hf_token_for(auth, model))
    overhead = template_overhead(tok, fmt.system_message)
    if fmt.max_length <= overhead:
        raise StageFailure(f"format.max_length={fmt.max_length} is not longer than the chat template's own "
                           f"overhead ({overhead} tokens)")
    stats = {}
    with st.write("format", current_key(), inputs={"format": fmt.model_dump(), "base": base}, metrics=stats) as tmp:
        for split in splits:
            ds = datasets.Dataset.from_parquet(str(data.file(f"{split}.parquet")))

            def encode(batch):
                convs = []
                for messages in batch["messages"]:
                    messages = list(messages)
                    if fmt.system_message is not None and messages[0]["role"] != "system":
                        messages = [{"role": "system", "content": fmt.system_message}] + messages
                    convs.append(messages)
                out = tok.apply_chat_template(convs, tokenize=True, return_dict=True,
                                              return_assistant_tokens_mask=fmt.assistant_only_loss)
                rows = {"input_ids": [list(ids)[: fmt.max_length] for ids in out["input_ids"]],
                        "length": [len(ids) for ids in out["input_ids"]], "messages": convs}
                if fmt.assistant_only_loss:
                    rows["assistant_masks"] = [list(m)[: fmt.max_length] for m in out["assistant_masks"]]
                return rows

            enc = ds.map(encode, batched=True, batch_size=256, remove_columns=ds.column_names,
                         desc=f"tokenize {split}")
            lengths = enc["length"]
            if fmt.assistant_only_loss and not any(any(m) for m in enc["assistant_masks"][:50]):
                raise StageFailure("format.assistant_only_loss needs a chat template with {% generation %} marks "
                                   "(use format.chat_template=zephyr)")
            stats[split] = _stats(lengths, sum(1 for n in lengths if n > fmt.max_length))
            # the conversations as tokenized (system message included): the evaluate stage's generation prompts
            enc.select_columns(["messages"]).to_parquet(str(tmp / f"{split}.messages.parquet"))
            enc.remove_columns(["length", "messages"]).to_parquet(str(tmp / f"{split}.parquet"))
        tok.save_pretrained(tmp / "tokenizer")
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2))
    return st.ref("format", current_key())
