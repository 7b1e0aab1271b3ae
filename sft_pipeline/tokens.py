"""Token counts that both the stages and the CLI read: a chat template's own overhead and the tokens a training run
will see. Shared here so that no stage imports the CLI-side modules (``plan``, ``preflight``)."""
from __future__ import annotations

from pathlib import Path


def template_overhead(tok, system_message: str | None) -> int:
    """Tokens a conversation takes beyond its content: a one-token user turn and reply, templated."""
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    if system_message is not None:
        messages.insert(0, {"role": "system", "content": system_message})
    return len(tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


def planned_tokens(training, ids_parquet: str | Path) -> int:
    """``training.planned_tokens`` of a split's token ids as the format stage saved them (cut to
    ``format.max_length``; its stats.json counts them before the cut)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    # one file: ParquetFile, not read_table, whose data-set machinery took 0.2 s of plan's 1 s here
    ids = pq.ParquetFile(str(ids_parquet)).read(columns=["input_ids"]).column("input_ids")
    return training.planned_tokens(pc.list_value_length(ids).to_pylist())
