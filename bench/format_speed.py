"""Format-stage tokenization speed: the encodings the stage had, and the format stage itself as the flow runs it.

    python -m bench.format_speed [--rows 4000] [--tokenizer DIR] [--out DIR] [--stage]

Same synthetic long conversations (ultrachat-like lengths) and the Mistral v1 tokenizer with the Zephyr template.
``TOKENIZERS_PARALLELISM=false`` as the CLI sets it for every run. Prints tokens/s for: ``before`` (datasets.map, one
process, as tasks/format.py did before issue 14); ``encode_chats 1 proc, 1 thread`` (what the flow's format stage
did before issue 32: the CLI's setting kept the Rust tokenizer on one core); ``encode_chats 1 proc`` (now: the Rust
tokenizer's threads on for the encoding); ``encode_chats N procs`` (forked workers, one per core); each with and
without assistant masks. Checks that all give the same ids. ``--stage``: also the format stage itself, data → format
through the stage table and the store (``tiny``'s model, so no 7B is built), once with the tokenizer's threads and
once without, with the artifact's fingerprint (byte-identical output: the same fingerprint).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
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


@contextlib.contextmanager
def _one_thread():
    """encode_chats as it was before issue 32: the CLI's TOKENIZERS_PARALLELISM=false left in force."""
    from sft_pipeline import tokenizing

    saved = tokenizing.rust_threads
    tokenizing.rust_threads = contextlib.nullcontext
    try:
        yield
    finally:
        tokenizing.rust_threads = saved


def _stage(rows: int, runs: int = 2) -> list[dict]:
    """The format stage through ``stage.execute`` (what the flow's task runs), with and without the threads,
    alternating ``runs`` times each after a warm-up pass (which builds tiny's model into the store)."""
    import logging
    import shutil

    from flows.stages import BY_NAME
    from sft_pipeline.config import load_config
    from sft_pipeline.stage import Facts, execute
    from sft_pipeline.store import Store

    log = logging.getLogger("bench.format_speed")
    cfg = load_config("tiny", ["data.synthetic_style=long", f"data.synthetic_train_rows={rows}",
                               "data.synthetic_test_rows=300", "format.max_length=2048", "format.system_message=''"])
    out = []
    with tempfile.TemporaryDirectory(prefix="format-stage-") as d:
        store = Store(d)
        facts = Facts(cfg, blocks=False, store=store)
        data, _ = execute(BY_NAME["data"], cfg, store, {}, facts, log)
        passes = [("warm-up", contextlib.nullcontext)] + [
            ("format stage, 1 thread (before)", _one_thread), ("format stage (now)", contextlib.nullcontext)] * runs
        for name, ctx in passes:
            shutil.rmtree(store.root / "format", ignore_errors=True)
            t = time.perf_counter()
            with ctx():
                ref, _ = execute(BY_NAME["format"], cfg, store, {"data": data}, facts, log)
            dt = time.perf_counter() - t
            if name == "warm-up":
                continue
            tokens = sum(s["tokens"] for s in ref.read_json("stats.json").values())
            out.append({"what": name, "tokens": tokens, "seconds": round(dt, 2), "tok_s": round(tokens / dt),
                        "fingerprint": ref.fingerprint, "load": round(os.getloadavg()[0], 2)})
            print(json.dumps(out[-1]), flush=True)
    return out


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # as the CLI (and bench/gpu_run.sh) set it
    import datasets
    from transformers import AutoTokenizer

    from sft_pipeline import synthetic
    from sft_pipeline.tokenizing import cores, encode_chats

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=4000)
    p.add_argument("--tokenizer", default=os.environ.get("SFT_BENCH_TOKENIZER"))
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--stage", action="store_true", help="also time the format stage itself (data -> format)")
    a = p.parse_args()
    datasets.disable_progress_bars()
    if a.tokenizer:
        tok = AutoTokenizer.from_pretrained(a.tokenizer)
    else:
        from sft_pipeline.models import build_tokenizer

        tok = build_tokenizer()
    path = Path(tempfile.gettempdir()) / "format-speed.parquet"
    datasets.Dataset.from_list(synthetic.long_conversations(a.rows, seed=0)).to_parquet(str(path))
    ds = datasets.Dataset.from_parquet(str(path))
    n = cores()
    rows, ref = [], {}

    def chats(masks, procs):
        return lambda: encode_chats(ds, tok, system_message="", max_length=2048, assistant_only_loss=masks,
                                    num_proc=procs)

    for masks in (False, True):
        for name, fn, ctx in (("before", lambda: _before(ds, tok, masks), contextlib.nullcontext),
                              ("encode_chats 1 proc, 1 thread", chats(masks, 1), _one_thread),
                              ("encode_chats 1 proc", chats(masks, 1), contextlib.nullcontext),
                              (f"encode_chats {n} procs", chats(masks, n), contextlib.nullcontext)):
            t = time.perf_counter()
            with ctx():
                enc = fn()
            dt = time.perf_counter() - t
            tokens = sum(enc["length"])
            same = ref.setdefault(masks, enc["input_ids"]) == enc["input_ids"]
            rows.append({"what": name, "masks": masks, "rows": len(enc), "tokens": tokens, "seconds": round(dt, 2),
                         "tok_s": round(tokens / dt), "same_ids": same, "load": round(os.getloadavg()[0], 2)})
            print(json.dumps(rows[-1]), flush=True)
    stage = _stage(a.rows) if a.stage else []
    Path(a.out, "format_speed.json").write_text(json.dumps({"cores": n, "tokenizer": type(tok).__name__,
                                                             "results": rows, "stage": stage}, indent=1))
    print(f"\nformat tokenization, {a.rows} conversations, {n} cores, {type(tok).__name__}")
    for r in rows:
        print(f"{r['what']:<32}masks={r['masks']!s:<6}{r['tok_s']:>11,} tok/s  {r['seconds']:>6} s  "
              f"same={r['same_ids']}  load {r['load']}")
    for r in stage:
        print(f"{r['what']:<38}{r['tok_s']:>11,} tok/s  {r['seconds']:>6} s  fingerprint {r['fingerprint']}  "
              f"load {r['load']}")


if __name__ == "__main__":
    main()
