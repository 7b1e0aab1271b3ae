"""DPO stage 1 — preference_data: preference pairs as parquet, subset and checked, with row counts.

Sources: the hub (``datasets.load_dataset``: ``HuggingFaceH4/ultrafeedback_binarized``, splits ``train_prefs`` /
``test_prefs``), local parquet/jsonl files, or the built-in synthetic set (``sft_pipeline/preference.py``). Each
split is subset by fraction or count (first rows, or a seeded shuffle), every row is checked
(``preference.pair_problem``: prompt, chosen, rejected), and bad rows are dropped and counted per reason; above
``preference_data.max_invalid_share`` the stage fails naming the first bad rows. The data stage does the same for
chats (``tasks/data.py``).
"""
from __future__ import annotations

import json
from collections import Counter

from sft_pipeline.chat_data import check_split_rows
from sft_pipeline.config import MIN_TEST_ROWS, MIN_TRAIN_ROWS
from sft_pipeline.errors import StageFailure, explain_hub_error
from sft_pipeline.stage import StageContext

VERSION = "1"


def _subset(n: int, subset, selection: str, seed: int) -> list[int]:
    """The indices of the rows a split keeps: a fraction or a count of its first (or seeded shuffled) rows."""
    import random

    k = min(subset.count, n) if subset.count is not None else max(1, int(n * subset.fraction)) \
        if subset.fraction is not None else n
    order = list(range(n))
    if selection == "shuffle":
        random.Random(seed).shuffle(order)
    return order[:k]


def _load(pref, token: str | None) -> tuple[dict[str, tuple[int, list[dict]]], str]:
    """Per configured split: how many rows the source has and the rows its subset keeps; and where they came from."""
    from sft_pipeline import preference

    subsets = {pref.train_split: pref.train_subset, pref.test_split: pref.test_subset}
    if pref.source == "hub":
        import datasets

        try:
            dsd = datasets.load_dataset(pref.dataset, revision=pref.revision, token=token, split=None)
        except Exception as e:  # noqa: BLE001 - classified by explain_hub_error
            raise explain_hub_error(e, f"data set {pref.dataset!r}") from e
        for field in ("train_split", "test_split"):
            if getattr(pref, field) not in dsd:
                raise StageFailure(f"preference_data.{field}: split {getattr(pref, field)!r} not in {pref.dataset} "
                                   f"(it has: {', '.join(dsd)})")
        out = {}
        for split, subset in subsets.items():
            ds = dsd[split]
            missing = [c for c in ("prompt", "chosen", "rejected") if c not in ds.column_names]
            if missing:
                raise StageFailure(f"preference_data: split {split!r} of {pref.dataset} has no "
                                   f"{', '.join(map(repr, missing))} column (columns: {ds.column_names})")
            keep = ds.select(_subset(len(ds), subset, pref.selection, pref.seed))  # before reading rows: 60k are big
            cols = [c for c in preference.COLUMNS if c in ds.column_names]
            out[split] = (len(ds), keep.select_columns(cols).to_list())
        return out, pref.dataset
    if pref.source == "synthetic":
        rows, origin = preference.synthetic_splits(pref.synthetic_train_rows, pref.synthetic_test_rows,
                                                   seed=pref.seed), "synthetic"
    else:
        rows, origin = preference.read_local_splits(pref), pref.dataset  # raw: one odd row never fails the file
    return {s: (len(rows[s]), [rows[s][i] for i in _subset(len(rows[s]), sub, pref.selection, pref.seed)])
            for s, sub in subsets.items()}, origin


def run(ctx: StageContext) -> dict:
    from sft_pipeline.preference import arrow_rows, pair_problem

    pref = ctx.cfg.preference_data
    splits, origin = _load(pref, ctx.secret("hf_token") if pref.source == "hub" else None)
    stats: dict = {"origin": origin, "splits": {}}
    for split, field, least in ((pref.train_split, "train_subset", MIN_TRAIN_ROWS),
                                (pref.test_split, "test_subset", MIN_TEST_ROWS)):
        total, rows = splits[split]
        problems = [pair_problem(r) for r in rows]
        bad = [i for i, p in enumerate(problems) if p]
        if rows and len(bad) / len(rows) > pref.max_invalid_share:
            first = "; ".join(f"row {i}: {problems[i]}" for i in bad[:5])
            raise StageFailure(f"preference_data: {len(bad)} of {len(rows)} rows in split {split!r} are invalid "
                               f"(more than preference_data.max_invalid_share={pref.max_invalid_share}); "
                               f"first: {first}")
        kept = [r for r, p in zip(rows, problems) if not p]
        if not kept:
            raise StageFailure(f"preference_data: split {split!r} has no valid rows left (after subsetting and "
                               f"dropping {len(bad)} invalid ones)")
        try:
            check_split_rows(split, field, len(kept), least)
        except StageFailure as e:  # chat_data names the data section's field: this is preference_data's
            raise StageFailure(str(e).replace("data.", "preference_data.", 1)) from None
        arrow_rows(kept).to_parquet(str(ctx.out / f"{split}.parquet"))
        stats["splits"][split] = {"available": total, "rows": len(kept), "invalid": len(bad),
                                  "invalid_reasons": dict(Counter(p for p in problems if p))}
    (ctx.out / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats
