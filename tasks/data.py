"""Stage 2 — data: the chat data set as parquet, subset and validated, with row counts.

Sources: the hub (``datasets.load_dataset(id, revision=...)``), local parquet/jsonl files, or the built-in
synthetic set. Each split is subset by fraction or count (first rows, or a seeded shuffle), each row is checked
against the chat schema (``sft_pipeline/chat_data.py``), and invalid rows are dropped and counted per reason; above
``data.max_invalid_share`` the stage fails, naming the first bad rows.
"""
from __future__ import annotations

import json
from collections import Counter

from sft_pipeline.chat_data import chat_problem, check_split_rows, local_files, read_local_splits, split_files
from sft_pipeline.config import MIN_TEST_ROWS, MIN_TRAIN_ROWS
from sft_pipeline.errors import StageFailure, explain_hub_error
from sft_pipeline.stage import StageContext

VERSION = "3"


def _subset(ds, subset, selection: str, seed: int):
    n = len(ds)
    if subset.count is not None:
        k = min(subset.count, n)
    elif subset.fraction is not None:
        k = max(1, int(n * subset.fraction))
    else:
        k = n
    if selection == "shuffle":
        ds = ds.shuffle(seed=seed)
    return ds.select(range(k))


def _load(data, token: str | None):
    """A DatasetDict with the two configured splits, and where it came from."""
    import datasets

    if data.source == "hub":
        try:
            return datasets.load_dataset(data.dataset, revision=data.revision, token=token, split=None), data.dataset
        except Exception as e:  # noqa: BLE001 - classified by explain_hub_error
            raise explain_hub_error(e, f"data set {data.dataset!r}") from e
    if data.source == "synthetic":
        from sft_pipeline import synthetic

        rows = synthetic.splits(data.synthetic_train_rows, data.synthetic_test_rows, seed=data.seed,
                                style=data.synthetic_style)
        return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in rows.items()}), "synthetic"
    by_split = split_files(data, local_files(data))
    return read_local_splits(data, by_split), data.dataset  # raw rows: one odd row never fails the whole file


def run(ctx: StageContext) -> dict:
    data = ctx.cfg.data
    dsd, origin = _load(data, ctx.hf_token)
    for field in ("train_split", "test_split"):
        if getattr(data, field) not in dsd:
            raise StageFailure(f"data.{field}: split {getattr(data, field)!r} not in {origin} "
                               f"(it has: {', '.join(dsd)})")
    stats: dict = {"origin": origin, "splits": {}}
    for split, subset in ((data.train_split, data.train_subset), (data.test_split, data.test_subset)):
        ds = dsd[split]
        if "messages" not in ds.column_names:
            raise StageFailure(f"data: split {split!r} has no 'messages' column (columns: {ds.column_names})")
        total = len(ds)
        ds = _subset(ds, subset, data.selection, data.seed)
        problems = [chat_problem(m) for m in ds["messages"]]
        reasons = Counter(p for p in problems if p)
        bad = [i for i, p in enumerate(problems) if p]
        if ds.num_rows and len(bad) / ds.num_rows > data.max_invalid_share:
            first = "; ".join(f"row {i}: {problems[i]}" for i in bad[:5])
            raise StageFailure(f"data: {len(bad)} of {ds.num_rows} rows in split {split!r} are invalid "
                               f"(more than data.max_invalid_share={data.max_invalid_share}); first: {first}")
        if bad:
            ds = ds.select(sorted(set(range(ds.num_rows)) - set(bad)))
        if not ds.num_rows:
            raise StageFailure(f"data: split {split!r} has no valid rows left (after subsetting and dropping "
                               f"{len(bad)} invalid ones)")
        field = "train_subset" if split == data.train_split else "test_subset"
        check_split_rows(split, field, ds.num_rows, MIN_TRAIN_ROWS if field == "train_subset" else MIN_TEST_ROWS)
        ds.to_parquet(str(ctx.out / f"{split}.parquet"))
        stats["splits"][split] = {"available": total, "rows": ds.num_rows, "invalid": len(bad),
                                  "invalid_reasons": dict(reasons)}
    (ctx.out / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats
