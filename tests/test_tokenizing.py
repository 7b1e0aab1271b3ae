"""encode_chats gives the format stage's ids as they were before: one apply_chat_template call per batch."""
from __future__ import annotations

import datasets
import pytest

from sft_pipeline import synthetic, tokenizing
from sft_pipeline.models import build_tokenizer


def _reference(ds, tok, system_message, max_length, masks):
    """The format stage's encoding before sft_pipeline.tokenizing (tasks/format.py, 2026-11-28), verbatim."""
    def encode(batch):
        convs = []
        for messages in batch["messages"]:
            messages = list(messages)
            if system_message is not None and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": system_message}] + messages
            convs.append(messages)
        out = tok.apply_chat_template(convs, tokenize=True, return_dict=True, return_assistant_tokens_mask=masks)
        rows = {"input_ids": [list(ids)[:max_length] for ids in out["input_ids"]],
                "length": [len(ids) for ids in out["input_ids"]]}
        if masks:
            rows["assistant_masks"] = [list(m)[:max_length] for m in out["assistant_masks"]]
        return rows

    return ds.map(encode, batched=True, batch_size=256, remove_columns=ds.column_names)


@pytest.fixture(scope="module")
def chats():
    # short chats (some with a pirate system turn) and long ones (past max_length, so the cut is exercised)
    rows = synthetic.conversations(300, seed=1) + synthetic.long_conversations(40, seed=2)
    return build_tokenizer(), datasets.Dataset.from_list(rows)


@pytest.mark.parametrize("masks", [False, True])
@pytest.mark.parametrize("procs", [1, 3])
def test_same_ids_as_the_format_stage_before(chats, masks, procs, monkeypatch):
    # ~10 s here (2 cores); tiny slices so that 3 forked workers each take several
    tok, ds = chats
    monkeypatch.setattr(tokenizing, "SLICE_ROWS", 37)
    monkeypatch.setattr(tokenizing, "MIN_ROWS_PER_PROC", 50)
    got = tokenizing.encode_chats(ds, tok, system_message="", max_length=1024, assistant_only_loss=masks,
                                  num_proc=procs)
    want = _reference(ds, tok, "", 1024, masks)
    assert got.features == want.features
    assert got.to_dict() == want.to_dict()
    assert max(got["length"]) > 1024 and max(map(len, got["input_ids"])) == 1024
    if masks:
        assert any(any(m) for m in got["assistant_masks"]) and not all(all(m) for m in got["assistant_masks"])


def test_no_system_message_and_empty_input(chats):
    tok, ds = chats
    small = ds.select(range(5))
    got = tokenizing.encode_chats(small, tok, system_message=None, max_length=4096, assistant_only_loss=False)
    assert got.to_dict() == _reference(small, tok, None, 4096, False).to_dict()
    empty = tokenizing.encode_chats(ds.select([]), tok, system_message="", max_length=64, assistant_only_loss=True)
    assert len(empty) == 0 and empty.column_names == ["input_ids", "length", "assistant_masks"]


def test_workers_for_small_and_large_inputs():
    assert tokenizing.workers_for(10, 16) == 1  # process start costs more than 10 rows
    assert tokenizing.workers_for(100_000, 16) == 16
    assert tokenizing.workers_for(100_000, 1) == 1
    assert tokenizing.workers_for(3 * tokenizing.MIN_ROWS_PER_PROC, 16) == 3


def test_missing_messages_column_is_named(chats):
    tok, _ = chats
    with pytest.raises(ValueError, match="'messages'"):
        tokenizing.encode_chats(datasets.Dataset.from_dict({"text": ["hi"]}), tok, system_message="", max_length=8,
                                assistant_only_loss=False)


def test_planned_tokens_are_the_ids_training_reads(chats, tmp_path):
    """The train stage's "N optimizer steps, T tokens" line and `plan`'s estimate count the ids as the format stage
    saved them (cut to max_length), not the lengths before the cut (stats.json's tokens): on the 7B job those differed
    by 8.5 % (14.16M printed, 13.05M trained)."""
    from sft_pipeline.config import TrainingConfig
    from sft_pipeline.plan import planned_tokens

    tok, ds = chats
    enc = tokenizing.encode_chats(ds, tok, system_message="", max_length=512, assistant_only_loss=False)
    before_cut, cut = sum(enc["length"]), sum(min(n, 512) for n in enc["length"])
    assert cut < before_cut
    path = tmp_path / "train_sft.parquet"
    enc.remove_columns(["length"]).to_parquet(str(path))
    assert planned_tokens(TrainingConfig(epochs=2), path) == 2 * cut
    capped = TrainingConfig(max_steps=3, per_device_batch_size=2, gradient_accumulation_steps=4)  # 24 rows
    assert planned_tokens(capped, path) == int(3 * 8 * cut / len(enc))


FORMAT_STAGE = """
import shutil, sys
from flows.stages import BY_NAME
from sft_pipeline.config import load_config
from sft_pipeline.stage import Facts, execute
from sft_pipeline.store import Store
import logging
store, log = Store(sys.argv[1]), logging.getLogger("test")
cfg = load_config("tiny", ["data.synthetic_style=long", "data.synthetic_train_rows=400", "data.synthetic_test_rows=40",
                           "format.max_length=1024", "format.system_message=''", "format.assistant_only_loss=true"])
facts = Facts(cfg, blocks=False, store=store)
data, _ = execute(BY_NAME["data"], cfg, store, {}, facts, log)
shutil.rmtree(store.root / "format", ignore_errors=True)
ref, reused = execute(BY_NAME["format"], cfg, store, {"data": data}, facts, log)
assert not reused
print(ref.fingerprint)
"""


@pytest.mark.slow  # 19 s in CI here (2-core, 2026-12-07)
def test_the_format_stage_writes_the_same_bytes_whatever_the_threads(tmp_path):
    """~20-50 s here. The format stage's fingerprint is in every later stage's key, so its files must not depend on the
    machine's cores: the stage (through the stage table and the store) run in processes whose Rust tokenizer has 1
    thread, 4 threads, and its threads left off (TOKENIZERS_PARALLELISM=false, as the CLI sets it), gives one
    fingerprint."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    prints = []
    for env in ({"RAYON_NUM_THREADS": "1"}, {"RAYON_NUM_THREADS": "4"}, {"TOKENIZERS_PARALLELISM": "false"}):
        child = subprocess.run([sys.executable, "-c", FORMAT_STAGE, str(tmp_path / "store")], cwd=ROOT,
                               capture_output=True, text=True, timeout=600, env={**os.environ, **env})
        assert child.returncode == 0, child.stderr[-3000:]
        prints.append(child.stdout.split()[-1])
    assert len(set(prints)) == 1, prints


def test_the_tokenizers_threads_are_on_while_encoding_and_the_setting_is_put_back(chats, monkeypatch):
    """In one process the encoding runs on the Rust tokenizer's threads whatever TOKENIZERS_PARALLELISM says (the
    CLI's false kept the flow's format stage on one core), and the variable is as it was afterwards."""
    import os

    tok, ds = chats
    seen = []
    encode = tok.apply_chat_template

    def recording(*a, **kw):
        seen.append(os.environ.get("TOKENIZERS_PARALLELISM"))
        return encode(*a, **kw)

    monkeypatch.setattr(tok, "apply_chat_template", recording)
    for before in ("false", None):
        if before is None:
            monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
        else:
            monkeypatch.setenv("TOKENIZERS_PARALLELISM", before)
        seen.clear()
        tokenizing.encode_chats(ds.select(range(20)), tok, system_message="", max_length=256,
                                assistant_only_loss=False)
        assert seen and set(seen) == {"true"}
        assert os.environ.get("TOKENIZERS_PARALLELISM") == before
