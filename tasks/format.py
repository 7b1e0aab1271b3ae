"""Stage 3 — format: apply the chat template and tokenize once; save token ids as parquet with length stats.

The tokenizer's own chat template is used (``format.chat_template: auto``) unless it has none or ``zephyr`` is
asked for. An empty system message is inserted where a conversation has none (``format.system_message``).
Sequences longer than ``format.max_length`` are truncated and counted. Training reads these ids as they are:
nothing is tokenized twice. The tokenizer (with its template) is saved beside them for the later stages.
"""
from __future__ import annotations

import json

from sft_pipeline.errors import StageFailure
from sft_pipeline.stage import StageContext
from sft_pipeline.tokenizing import encode_chats

VERSION = "3"


def _stats(lengths: list[int], truncated: int) -> dict:
    import numpy as np

    a = np.asarray(lengths) if lengths else np.zeros(1)
    return {"rows": len(lengths), "tokens": int(a.sum()), "mean": round(float(a.mean()), 1),
            "p50": int(np.percentile(a, 50)), "p95": int(np.percentile(a, 95)), "max": int(a.max()),
            "truncated": truncated}


def _with_system(messages: list[dict], system_message: str | None) -> list[dict]:
    if system_message is not None and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_message}] + messages
    return messages


def run(ctx: StageContext) -> dict:
    import datasets

    from sft_pipeline.models import load_tokenizer
    from sft_pipeline.tokens import template_overhead

    fmt, data = ctx.cfg.format, ctx.cfg.data
    tok = load_tokenizer(ctx.base_model(), ctx.cfg.model, fmt.chat_template, token=ctx.hf_token)
    overhead = template_overhead(tok, fmt.system_message)
    if fmt.max_length <= overhead:
        raise StageFailure(f"format.max_length={fmt.max_length} is not longer than the chat template's own "
                           f"overhead ({overhead} tokens)")
    stats = {}
    for split in (data.train_split, data.test_split):
        ds = datasets.Dataset.from_parquet(str(ctx.upstream["data"].file(f"{split}.parquet")))
        enc = encode_chats(ds, tok, system_message=fmt.system_message, max_length=fmt.max_length,
                           assistant_only_loss=fmt.assistant_only_loss)
        lengths = enc["length"]
        if fmt.assistant_only_loss and not any(any(m) for m in enc["assistant_masks"][:50]):
            raise StageFailure("format.assistant_only_loss needs a chat template with {% generation %} marks "
                               "(format.chat_template=zephyr or chatml)")
        stats[split] = _stats(lengths, sum(1 for n in lengths if n > fmt.max_length))
        enc.remove_columns(["length"]).to_parquet(str(ctx.out / f"{split}.parquet"))
        # the conversations as tokenized (system message included): the evaluate stage's generation prompts
        with_system = [_with_system(list(m), fmt.system_message) for m in ds["messages"]]
        datasets.Dataset.from_dict({"messages": with_system}).to_parquet(str(ctx.out / f"{split}.messages.parquet"))
    tok.save_pretrained(ctx.out / "tokenizer")
    (ctx.out / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats
