"""A stage's key comes from exactly the config it reads and its upstream fingerprints."""
from __future__ import annotations

from sft_pipeline.caching import stage_key
from sft_pipeline.config import load_config
from sft_pipeline.store import ArtifactRef
from tasks.download import download_data
from tasks.format import format_chats
from tasks.train import train


def _keys(cfg):
    ref = ArtifactRef(stage="x", key="k", path="/p", fingerprint="f0")
    data = stage_key("data", download_data.fn.__wrapped__, {"store": "/s", "data": cfg.data, "source": "s"})
    fmt = stage_key("format", format_chats.fn.__wrapped__, {"store": "/s", "data": ref, "splits": ["a", "b"],
                                                              "base": "b", "fmt": cfg.format})
    tr = stage_key("train", train.fn.__wrapped__, {"store": "/s", "chats": ref, "lora": cfg.lora,
                                                    "training": cfg.training, "quantization": cfg.quantization})
    return data, fmt, tr


def test_lora_rank_changes_only_training():
    a = _keys(load_config("tiny"))
    b = _keys(load_config("tiny", ["lora.r=4"]))
    assert a[0] == b[0] and a[1] == b[1] and a[2] != b[2]


def test_data_change_changes_data_key():
    a = _keys(load_config("tiny"))
    b = _keys(load_config("tiny", ["data.synthetic_train_rows=50"]))
    assert a[0] != b[0]


def test_upstream_fingerprint_changes_key():
    cfg = load_config("tiny")
    keys = set()
    for fp in ("f1", "f2"):
        ref = ArtifactRef(stage="data", key="k", path="/p", fingerprint=fp)
        keys.add(stage_key("format", format_chats.fn.__wrapped__, {"store": "/s", "data": ref, "fmt": cfg.format}))
    assert len(keys) == 2
