"""Chat-template tokenization of conversations, in parallel over processes, for the format stage.

``encode_chats`` gives the same ids (and assistant masks) as one ``apply_chat_template`` call per batch, the way the
format stage encoded before; it is faster because:

- no ``datasets.map``: that hashes the tokenizer with dill for the cache fingerprint (~1.5 s a split here) and
  pickles it again for every worker process; here forked workers inherit the tokenizer and the table for free;
- the columns are built as Arrow arrays directly (no per-row Python dicts through datasets' writer).

Measured on the 16-core GPU machine (3,000 long conversations, ~4M tokens, BENCHMARKS.md): one process 2.6M tok/s
(its Rust tokenizer already spreads a batch over the cores) vs 1.0M tok/s with forked workers (each one
single-threaded, plus fork and collection costs), vs 1.5M tok/s for the stage's earlier datasets.map. So one process
is the default; ``num_proc`` > 1 cuts the rows into slices for forked workers, for templates whose Python rendering
dominates. A small input is always encoded in this process.

In one process the Rust tokenizer's threads are switched on for the encoding (``rust_threads``) whatever
``TOKENIZERS_PARALLELISM`` says: the CLI sets it to false (a fork after the threads ran would print the library's
warning), and with it the flow's format stage tokenized on one core (BENCHMARKS.md, *Issue 32*). The ids do not
depend on the number of threads or processes: each conversation is encoded on its own, the rows stay in order.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os

log = logging.getLogger("sft_pipeline.format")
SLICE_ROWS = 512  # rows per task: large enough for batch tokenization, small enough to balance the workers
MIN_ROWS_PER_PROC = 1024  # below this many rows per worker, forking and collecting cost more than they save

_job: dict = {}  # what forked workers inherit: the table, the tokenizer and the settings


def _encode_slice(bounds: tuple[int, int]):
    import pyarrow as pa

    start, stop = bounds
    tok, ds, system_message, max_length, masks = (_job[k] for k in ("tok", "ds", "system", "max_length", "masks"))
    convs = []
    for messages in ds[start:stop]["messages"]:
        messages = list(messages)
        if system_message is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system_message}] + messages
        convs.append(messages)
    out = tok.apply_chat_template(convs, tokenize=True, return_dict=True, return_assistant_tokens_mask=masks)
    ids = out["input_ids"]
    # the types datasets.map gave these columns before (it stores input_ids as int32), so the parquet keeps its schema
    cols = {"input_ids": pa.array([list(x)[:max_length] for x in ids], type=pa.list_(pa.int32())),
            "length": pa.array([len(x) for x in ids], type=pa.int64())}
    if masks:
        cols["assistant_masks"] = pa.array([list(m)[:max_length] for m in out["assistant_masks"]],
                                           type=pa.list_(pa.int64()))
    return pa.table(cols)


def _worker_init() -> None:
    # one tokenizer thread per process: the processes are the parallelism (and Rust threads do not survive a fork)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


@contextlib.contextmanager
def rust_threads():
    """The fast tokenizer encodes a batch on every core this process may use (its thread pool), then
    ``TOKENIZERS_PARALLELISM`` is put back as it was (false keeps a later fork quiet: the library warns when a
    process forks after its threads ran and the variable is unset)."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's share), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def workers_for(rows: int, num_proc: int | None) -> int:
    """Processes worth starting for ``rows`` conversations: at most ``num_proc`` (None: the cores there are)."""
    cap = num_proc or cores()
    return max(1, min(cap, rows // MIN_ROWS_PER_PROC))


def encode_chats(ds, tok, *, system_message: str | None, max_length: int, assistant_only_loss: bool,
                 num_proc: int | None = 1):
    """Token ids of every conversation in ``ds`` (a ``messages`` column) through ``tok``'s chat template.

    Returns a ``datasets.Dataset`` with ``input_ids`` (cut to ``max_length``), ``length`` (before the cut) and, with
    ``assistant_only_loss``, ``assistant_masks``; rows in the input's order. ``system_message`` (unless None) is put
    first where a conversation has no system turn. ``num_proc``: processes at most (None: one per core; 1, the default, measured fastest).
    """
    import datasets
    import pyarrow as pa

    if "messages" not in ds.column_names:
        raise ValueError(f"format: the data has no 'messages' column (columns: {ds.column_names})")
    n = len(ds)
    bounds = [(i, min(i + SLICE_ROWS, n)) for i in range(0, n, SLICE_ROWS)]
    procs = workers_for(n, num_proc) if "fork" in mp.get_all_start_methods() else 1
    _job.update(tok=tok, ds=ds.select_columns(["messages"]), system=system_message, max_length=max_length,
                masks=assistant_only_loss)
    try:
        if procs == 1:
            with rust_threads():
                tables = [_encode_slice(b) for b in bounds]
        else:
            with mp.get_context("fork").Pool(procs, initializer=_worker_init) as pool:
                tables = pool.map(_encode_slice, bounds, chunksize=1)
    finally:
        _job.clear()
    log.debug("format: tokenized %d conversations in %d process(es)", n, procs)
    if not tables:
        cols = ["input_ids", "length"] + (["assistant_masks"] if assistant_only_loss else [])
        types = {"input_ids": pa.list_(pa.int32()), "length": pa.int64(), "assistant_masks": pa.list_(pa.int64())}
        schema = pa.schema([(c, types[c]) for c in cols])
        return datasets.Dataset(schema.empty_table())
    return datasets.Dataset(pa.concat_tables(tables).combine_chunks())
