"""Format-stage tokenization speed: the stage's encoding before issue 14 vs ``sft_pipeline.tokenizing``.

    python -m bench.format_speed [--rows 4000] [--tokenizer DIR] [--out DIR]

Same synthetic long conversations (ultrachat-like lengths) and the Mistral v1 tokenizer with the Zephyr template;
prints tokens/s for: ``before`` (datasets.map, one process, as tasks/format.py did), ``encode_chats`` with one
process and with one per core, with and without assistant masks. Checks that all give the same ids.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def _before(ds, tok, masks):
    def encode(batch):
        convs = [[{"role": "system", "content": ""}] + list(m) if m[0]["role"] != "system" else list(m)
                 for m in batch["messages"]]
        out = tok.apply_chat_template(convs, tokenize=True, return_dict=True, return_assistant_tokens_mask=masks)
        rows = {"input_ids": [list(x)[:2048] for x in out["input_ids"]], "length": [len(x) for x in out["input_ids"]]}
        if masks:
            rows["assistant_masks"] = [list(m)[:2048] for m in out["assistant_masks"]]
        return rows

    return ds.map(encode, batched=True, batch_size=256, remove_columns=ds.column_names)


def main() -> None:
    import datasets
    from transformers import AutoTokenizer

    from sft_pipeline import synthetic
    from sft_pipeline.tokenizing import encode_chats

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=4000)
    p.add_argument("--tokenizer", default=os.environ.get("SFT_BENCH_TOKENIZER"))
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    a = p.parse_args()
    datasets.disable_progress_bars()
    if a.tokenizer:
        tok = AutoTokenizer.from_pretrained(a.tokenizer)
    else:
        from sft_pipeline.models import build_tokenizer

        tok = build_tokenizer()
    path = Path("/tmp/format-speed.parquet")
    datasets.Dataset.from_list(synthetic.long_conversations(a.rows, seed=0)).to_parquet(str(path))
    ds = datasets.Dataset.from_parquet(str(path))
    cores = os.cpu_count()
    rows, ref = [], {}
    for masks in (False, True):
        for name, fn in (("before", lambda: _before(ds, tok, masks)),
                         ("encode_chats 1 proc", lambda: encode_chats(ds, tok, system_message="", max_length=2048,
                                                                      assistant_only_loss=masks, num_proc=1)),
                         (f"encode_chats {cores} procs", lambda: encode_chats(
                             ds, tok, system_message="", max_length=2048, assistant_only_loss=masks,
                             num_proc=cores))):
            t = time.perf_counter()
            enc = fn()
            dt = time.perf_counter() - t
            tokens = sum(enc["length"])
            same = ref.setdefault(masks, enc["input_ids"]) == enc["input_ids"]
            rows.append({"what": name, "masks": masks, "rows": len(enc), "tokens": tokens, "seconds": round(dt, 2),
                         "tok_s": round(tokens / dt), "same_ids": same})
            print(json.dumps(rows[-1]), flush=True)
    Path(a.out, "format_speed.json").write_text(json.dumps({"cores": cores, "tokenizer": type(tok).__name__,
                                                             "results": rows}, indent=1))
    print(f"\nformat tokenization, {a.rows} conversations, {cores} cores, {type(tok).__name__}")
    for r in rows:
        print(f"{r['what']:<26}masks={r['masks']!s:<6}{r['tok_s']:>11,} tok/s  {r['seconds']:>6} s  same={r['same_ids']}")


if __name__ == "__main__":
    main()
