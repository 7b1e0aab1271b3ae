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
