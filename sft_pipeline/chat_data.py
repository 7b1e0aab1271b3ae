"""The chat data's schema and, for ``data.source=local``, its files: shared by the data stage and the up-front
checks (``sft_pipeline/preflight.py``), so a missing split is reported before any stage runs.

A conversation is a list of ``{role, content}`` messages: roles system/user/assistant, content a non-empty string,
a system message only first, then user and assistant alternating, starting with user.
"""
from __future__ import annotations

from pathlib import Path

from sft_pipeline.config import DataConfig
from sft_pipeline.errors import ConfigError
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
