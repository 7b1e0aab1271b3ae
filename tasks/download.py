"""Stage 2 — download & subset: the chat data set as parquet, validated, with row counts.

Sources: the hub (``datasets.load_dataset(id, revision=...)``), local parquet/jsonl files, or the built-in
synthetic set. Each split is subset by fraction or count (first rows, or a seeded shuffle), each row is checked
against the chat schema, and invalid rows are dropped and counted per reason; above ``data.max_invalid_share``
the stage fails, naming the first bad rows.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from sft_pipeline.caching import StageFailure, current_key, stage_task
from sft_pipeline.chat_data import chat_problem, local_files, read_local_splits, split_files
from sft_pipeline.config import DataConfig, Subset
from sft_pipeline.store import ArtifactRef, Store, digest, file_sha256


def source_fingerprint(data: DataConfig) -> str:
    """What identifies the data's content before downloading: the revision's commit, or local files' bytes."""
    if data.source == "hub":
        from sft_pipeline.hub import dataset_commit

        return digest({"hub": data.dataset, "revision": data.revision,
                       "commit": dataset_commit(data.dataset, data.revision)})
    if data.source == "synthetic":
        from sft_pipeline import synthetic

        return digest({"synthetic": synthetic.VERSION})
    return digest({p: file_sha256(Path(p)) for p in local_files(data)})


def _subset(ds, subset: Subset, selection: str, seed: int):
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


def _load(data: DataConfig, token: str | None):
    """A DatasetDict with the two configured splits."""
    import datasets

    if data.source == "hub":
        try:
            return datasets.load_dataset(data.dataset, revision=data.revision, token=token,
                                         split=None), data.dataset
        except Exception as e:
            from sft_pipeline.errors import explain_hub_error

            raise explain_hub_error(e, f"data set {data.dataset!r}") from e
    if data.source == "synthetic":
        from sft_pipeline import synthetic

        rows = synthetic.splits(data.synthetic_train_rows, data.synthetic_test_rows, seed=data.seed,
                                style=data.synthetic_style)
        return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in rows.items()}), "synthetic"
    files = local_files(data)
    by_split = split_files(data, files)
    return read_local_splits(data, by_split), data.dataset  # raw rows: one odd row never fails the whole file


@stage_task("data", retries=2, ignore=("auth",))
def download_data(store: str, data: DataConfig, source: str, auth: ArtifactRef) -> ArtifactRef:
    """Download (or generate) the chat data, subset and validate it, and save each split as parquet."""
    from sft_pipeline.secrets import hf_token_for

    dsd, origin = _load(data, hf_token_for(auth) if data.source == "hub" else None)
    for split in (data.train_split, data.test_split):
        if split not in dsd:
            raise StageFailure(f"data.{'train_split' if split == data.train_split else 'test_split'}: split "
                               f"{split!r} not in {origin} (it has: {', '.join(dsd)})")
    stats: dict = {"origin": origin, "splits": {}}
    st = Store(store)
    with st.write("data", current_key(), inputs={"data": data.model_dump(), "source": source},
                  metrics=stats) as tmp:
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
                keep = set(range(ds.num_rows)) - set(bad)
                ds = ds.select(sorted(keep))
            if not ds.num_rows:
                raise StageFailure(f"data: split {split!r} has no valid rows left (after subsetting and dropping "
                                   f"{len(bad)} invalid ones)")
            ds.to_parquet(str(tmp / f"{split}.parquet"))
            stats["splits"][split] = {"available": total, "rows": ds.num_rows, "invalid": len(bad),
                                      "invalid_reasons": dict(reasons)}
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2))
    return st.ref("data", current_key())
