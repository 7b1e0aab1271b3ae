"""DPO stage 2 — preference_format: the pairs through the SFT model's chat template, tokenized once.

The tokenizer and its chat template are the SFT format stage's (``<format>/tokenizer``), and a system message is put
first where the SFT format section says so, so DPO sees its prompts exactly as the SFT model saw its chats. Per pair:
``prompt_ids`` (the turns before the reply, with the assistant header: what generation starts from), ``chosen_ids``
and ``rejected_ids`` (each reply as the template ends it, end-of-turn token included), the columns trl's
``DataCollatorForPreference`` takes. Prompt plus reply is cut to ``preference_format.max_length`` (counted); a pair
whose prompt alone fills it is dropped (counted: it has nothing to learn from).
"""
from __future__ import annotations

import json

from sft_pipeline.errors import StageFailure
from sft_pipeline.stage import StageContext

VERSION = "1"


def _encode(tok, rows: list[dict], system_message: str | None, max_length: int) -> tuple[dict, dict]:
    from sft_pipeline.preference import common_prefix, prompt_turns

    prompts = [prompt_turns(r, system_message) for r in rows]
    prompt_ids = tok.apply_chat_template(prompts, add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]
    cols: dict[str, list] = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    full = {side: tok.apply_chat_template([p + [dict(r[side][-1])] for p, r in zip(prompts, rows)], tokenize=True,
                                          return_dict=True)["input_ids"] for side in ("chosen", "rejected")}
    dropped = truncated = 0
    lengths = []
    for i, p in enumerate(prompt_ids):
        p = list(p)
        c, r = list(full["chosen"][i]), list(full["rejected"][i])
        start = min(common_prefix(p, c), common_prefix(p, r))
        if start >= max_length:
            dropped += 1
            continue
        room = max_length - start
        cut = len(c) - start > room or len(r) - start > room
        truncated += cut
        cols["prompt_ids"].append(p[:start])
        cols["chosen_ids"].append(c[start:start + room])
        cols["rejected_ids"].append(r[start:start + room])
        lengths.append(min(max(len(c), len(r)), max_length))
    stats = {"rows": len(cols["prompt_ids"]), "prompt_too_long": dropped, "truncated": truncated,
             "mean_prompt": round(sum(map(len, cols["prompt_ids"])) / max(len(lengths), 1), 1),
             "max_sequence": max(lengths, default=0)}
    return cols, stats


def run(ctx: StageContext) -> dict:
    import datasets
    import pyarrow as pa
    from transformers import AutoTokenizer

    cfg, pref = ctx.cfg, ctx.cfg.preference_data
    tok = AutoTokenizer.from_pretrained(str(ctx.upstream["format"].file("tokenizer")))  # the SFT model's template
    max_length = cfg.preference_format.max_length
    stats = {}
    for split in (pref.train_split, pref.test_split):
        rows = datasets.Dataset.from_parquet(str(ctx.upstream["preference_data"].file(f"{split}.parquet"))).to_list()
        cols, stats[split] = _encode(tok, rows, cfg.format.system_message, max_length)
        if not cols["prompt_ids"]:
            raise StageFailure(f"preference_format: every pair of split {split!r} has a prompt of "
                               f"preference_format.max_length={max_length} tokens or more: raise it")
        ids = pa.list_(pa.int32())
        pa_table = pa.table({k: pa.array(v, type=ids) for k, v in cols.items()})
        datasets.Dataset(pa_table).to_parquet(str(ctx.out / f"{split}.parquet"))
    (ctx.out / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats
