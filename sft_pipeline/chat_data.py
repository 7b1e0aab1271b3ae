"""The chat data's schema and, for ``data.source=local``, its files: shared by the data stage and the up-front
checks (``sft_pipeline/preflight.py``), so a missing split is reported before any stage runs.

A conversation is a list of ``{role, content}`` messages: roles system/user/assistant, content a non-empty string,
a system message only first, then user and assistant alternating, starting with user.
"""
from __future__ import annotations

import json
from pathlib import Path

from sft_pipeline.config import DataConfig
from sft_pipeline.errors import ConfigError, StageFailure
from sft_pipeline.store import digest, file_sha256

SCHEMA_VERSION = "1"  # bump when chat_problem accepts or rejects other rows: it is part of the data stage's key
ROLES = ("system", "user", "assistant")
DATA_SUFFIXES = (".parquet", ".jsonl", ".json")


def chat_problem(messages, prompt: bool = False) -> str | None:
    """Why ``messages`` breaks the chat schema, or None when it is fine.

    A training row needs at least one assistant turn; a generation prompt (``prompt=True``) must end with a user
    turn instead (the model writes the reply).
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        return "messages is not a non-empty list"
    expected = "user"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not {"role", "content"} <= set(m):
            return "a message is not a {role, content} mapping"
        role, content = m["role"], m["content"]
        if role not in ROLES:
            return f"unknown role {role!r} (roles: {', '.join(ROLES)})"
        if not isinstance(content, str) or not content.strip():
            return "empty or non-string content"
        if role == "system":
            if i != 0:
                return "system message not first"
            continue
        if role != expected:
            return "user/assistant turns do not alternate"
        expected = "assistant" if role == "user" else "user"
    if prompt:
        return None if messages[-1]["role"] == "user" else "a prompt must end with a user turn"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant turn"
    return None


def local_files(data: DataConfig) -> list[str]:
    """The data files under ``data.dataset`` (a file or a directory), resolved and sorted."""
    root = Path(data.dataset).expanduser()
    if root.is_file():
        return [str(root.resolve())]
    if not root.is_dir():
        raise ConfigError(f"data.dataset: local path not found: {root} (data.source=local takes a parquet/jsonl "
                          "file or a directory of them)")
    files = sorted(str(p.resolve()) for p in root.rglob("*") if p.suffix in DATA_SUFFIXES)
    if not files:
        raise ConfigError(f"data.dataset: no {'/'.join(DATA_SUFFIXES)} files under {root}")
    return files


def split_files(data: DataConfig, files: list[str]) -> dict[str, list[str]]:
    """Files per configured split: ``<split>.parquet``, ``<split>-*.parquet`` or ``<split>/*.parquet``.

    Raises ConfigError naming the split field when a split has no file.
    """
    by_split: dict[str, list[str]] = {}
    for f in files:
        name = Path(f).stem
        split = next((s for s in (data.train_split, data.test_split) if name == s or name.startswith(s + "-")
                      or Path(f).parent.name == s), None)
        if split:
            by_split.setdefault(split, []).append(f)
    for field in ("train_split", "test_split"):
        split = getattr(data, field)
        if split not in by_split:
            found = sorted({Path(f).stem for f in files})
            raise ConfigError(
                f"data.{field}: no file for split {split!r} under {data.dataset} (files are matched by name: "
                f"{split}.parquet, {split}-*.parquet or {split}/*.parquet; found: {', '.join(found)})")
    return by_split


def source_fingerprint(data: DataConfig) -> str:
    """What identifies the data's content before reading it: the hub revision's commit, the synthetic generator's
    version, or the local files' bytes."""
    if data.source == "hub":
        from sft_pipeline.hub import dataset_commit

        return digest({"hub": data.dataset, "revision": data.revision,
                       "commit": dataset_commit(data.dataset, data.revision)})
    if data.source == "synthetic":
        from sft_pipeline import synthetic

        return digest({"synthetic": synthetic.VERSION})
    root = Path(data.dataset).expanduser().resolve()
    base = root if root.is_dir() else root.parent
    # relative names: the same files moved elsewhere keep their fingerprint
    return digest({str(Path(p).relative_to(base)): file_sha256(Path(p)) for p in local_files(data)})
# ------------------------------------------------------------------------------------- reading local files raw
def _message(m):
    """One message in a shape Arrow can hold whatever it was, keeping ``chat_problem``'s verdict: extra keys
    (``name``, ``weight``) are dropped, a non-mapping becomes null, non-string content becomes null."""
    if not isinstance(m, dict) or not {"role", "content"} <= set(m):
        return None
    role, content = m["role"], m["content"]
    return {"role": role if isinstance(role, str) else repr(role),
            "content": content if isinstance(content, str) else None}


def normalize_messages(messages):
    """``messages`` as a list of ``{role, content}`` Arrow can store; anything that is not a list becomes ``[]``
    (``chat_problem`` says "messages is not a non-empty list" for both)."""
    if not isinstance(messages, (list, tuple)):
        return []
    return [_message(m) for m in messages]


def _rows(path: Path, fmt: str):
    """The ``messages`` of each row of one file, read raw (no schema inferred across rows)."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
            if "messages" not in pf.schema_arrow.names:
                raise StageFailure(f"data: {path} has no 'messages' column (columns: {pf.schema_arrow.names})")
            for batch in pf.iter_batches(columns=["messages"], batch_size=4096):
                yield from batch.column(0).to_pylist()
        except StageFailure:
            raise
        except Exception as e:  # noqa: BLE001 - an undecodable file is bad input: name it, never retry
            raise StageFailure(f"data.dataset: could not read the parquet file {path} ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
        return
    try:
        with open(path, encoding="utf-8") as f:
            if path.suffix == ".json" and f.read(1) == "[":  # one JSON array of rows
                f.seek(0)
                rows = json.load(f)
                yield from (r.get("messages") if isinstance(r, dict) else None for r in rows)
                return
            f.seek(0)
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    raise StageFailure(f"data.dataset: could not read the json files under {path.parent}: {path} "
                                       f"line {n} is not valid JSON") from None
                yield row.get("messages") if isinstance(row, dict) else None
    except UnicodeDecodeError:
        raise StageFailure(f"data.dataset: could not read the json files under {path.parent}: {path} is not "
                           "UTF-8 text") from None
    except ValueError as e:  # a .json array that is not valid JSON
        raise StageFailure(f"data.dataset: could not read the json files under {path.parent}: {path} is not "
                           f"valid JSON ({str(e)[:100]})") from None


def read_local_splits(data: DataConfig, by_split: dict[str, list[str]]):
    """The local files of each split as a ``datasets.DatasetDict`` with one ``messages`` column.

    Each file is read raw (pyarrow for parquet, ``json`` per line for jsonl) and every row's messages are made
    storable (``normalize_messages``), so one odd row (messages a string, an extra key) is counted invalid, or
    cleaned, by row validation instead of failing the cast of the whole file. An undecodable file is named.
    """
    import datasets
    import pyarrow as pa

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    schema = pa.schema([("messages", pa.list_(message))])
    out = {}
    for split, files in by_split.items():
        rows = []
        for f in files:
            fmt = data.format if data.format != "auto" else ("parquet" if f.endswith(".parquet") else "json")
            rows.extend({"messages": normalize_messages(m)} for m in _rows(Path(f), fmt))
        out[split] = datasets.Dataset(pa.Table.from_pylist(rows, schema=schema))
    return datasets.DatasetDict(out)


def check_split_rows(split: str, field: str, rows: int, minimum: int) -> None:
    """Raise StageFailure when a split kept fewer than ``minimum`` rows (a fraction of a small file can)."""
    if rows < minimum:
        raise StageFailure(f"data.{field}: split {split!r} keeps {rows} rows after subsetting and dropping invalid "
                           f"ones; at least {minimum} are needed (raise the subset's fraction or count)")
