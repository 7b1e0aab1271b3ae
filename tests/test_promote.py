"""Promotion: the `promoted` pointer moves only to a better adapter on the same recipe and test set, atomically."""
from __future__ import annotations

import json
import math
import random
import threading
from pathlib import Path

import pytest

from sft_pipeline import health, promote
from sft_pipeline.store import Store


def _artifacts(st: Store, tag: str, loss: float, test_split: bytes = b"test rows v1", rows: int = 8):
    """The three artifacts promotion reads, written through the store like the stages write them."""
    with st.write("format", f"fmt-{test_split.hex()[:12]}") as tmp:
        (tmp / "test_sft.parquet").write_bytes(test_split)
        (tmp / "train_sft.parquet").write_bytes(b"train rows")
    with st.write("evaluate", f"ev-{tag}") as tmp:
        (tmp / "metrics.json").write_text(json.dumps({"split": "test_sft", "rows": rows,
                                                      "base": {"eval_loss": 10.0}, "tuned": {"eval_loss": loss}}))
    with st.write("save_adapter", f"ad-{tag}") as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps({"r": 4, "tag": tag}))
    metrics = st.ref("evaluate", f"ev-{tag}")
    return {"adapter": st.ref("save_adapter", f"ad-{tag}"), "metrics": metrics,
            "chats": st.ref("format", f"fmt-{test_split.hex()[:12]}"),
            "checked": health.check([], metrics.read_json("metrics.json"))}  # no loss curve: eval losses only


def _consider(st: Store, tag: str, loss: float, **kw) -> dict:
    return promote.consider(st, "tiny", test_split="test_sft", flow_run=f"run-{tag}", **_artifacts(st, tag, loss, **kw))


def test_first_adapter_is_promoted_then_only_a_better_one_moves_the_pointer(tmp_path):
    st = Store(tmp_path)
    first = _consider(st, "a", 2.0)
    assert first["promoted"] and "first" in first["reason"]
    assert promote.read_pointer(st, "tiny")["adapter"] == str(tmp_path / "save_adapter" / "ad-a")

    worse = _consider(st, "b", 2.5)
    assert not worse["promoted"] and "2.5000 does not beat the promoted 2.0000" in worse["reason"]
    assert promote.read_pointer(st, "tiny")["adapter"].endswith("ad-a")
    assert worse["promoted_adapter"].endswith("ad-a")

    again = _consider(st, "a", 2.0)  # the same run again (all stages cached)
    assert not again["promoted"] and "already the promoted" in again["reason"]

    better = _consider(st, "c", 1.5)
    assert better["promoted"] and "1.5000 beats the promoted 2.0000" in better["reason"]
    pointer = promote.read_pointer(st, "tiny")
    assert pointer["adapter"].endswith("ad-c") and pointer["eval_loss"] == 1.5 and pointer["flow_run"] == "run-c"
    assert better["previous"]["adapter"].endswith("ad-a")


def test_a_different_test_set_is_not_comparable(tmp_path):
    st = Store(tmp_path)
    assert _consider(st, "a", 2.0)["promoted"]
    other_rows = _consider(st, "b", 0.5, test_split=b"test rows v2")
    assert not other_rows["promoted"] and "not comparable" in other_rows["reason"]
    fewer_scored = _consider(st, "c", 0.5, rows=4)  # evaluation.max_samples changed: another test set
    assert not fewer_scored["promoted"] and "not comparable" in fewer_scored["reason"]
    assert promote.read_pointer(st, "tiny")["adapter"].endswith("ad-a")
    assert other_rows["test_set"] != fewer_scored["test_set"] != promote.read_pointer(st, "tiny")["test_set"]


def test_recipes_have_separate_pointers(tmp_path):
    st = Store(tmp_path)
    assert _consider(st, "a", 2.0)["promoted"]
    other = promote.consider(st, "zephyr-7b-qlora", test_split="test_sft", **_artifacts(st, "z", 3.0))
    assert other["promoted"] and "first" in other["reason"]
    assert promote.read_pointer(st, "tiny")["adapter"].endswith("ad-a")
    assert promote.read_pointer(st, "zephyr-7b-qlora")["adapter"].endswith("ad-z")


def test_a_pointer_to_a_deleted_adapter_is_replaced(tmp_path):
    st = Store(tmp_path)
    _consider(st, "a", 1.0)
    (tmp_path / "save_adapter" / "ad-a" / "adapter_config.json").unlink()
    (tmp_path / "save_adapter" / "ad-a" / "manifest.json").unlink()
    (tmp_path / "save_adapter" / "ad-a").rmdir()
    moved = _consider(st, "b", 3.0)
    assert moved["promoted"] and "gone" in moved["reason"]


def test_a_nan_loss_is_never_promoted(tmp_path):
    st = Store(tmp_path)
    decision = _consider(st, "a", math.nan)
    assert not decision["promoted"] and "nan" in decision["reason"]
    assert promote.read_pointer(st, "tiny") is None


def test_the_pointer_is_never_half_written(tmp_path, monkeypatch):
    st = Store(tmp_path)
    _consider(st, "a", 2.0)
    before = promote.pointer_path(st, "tiny").read_bytes()

    def crash(src, dst):
        raise OSError("disk went away between writing and renaming")

    monkeypatch.setattr(promote.os, "replace", crash)
    with pytest.raises(OSError, match="disk went away"):
        _consider(st, "b", 1.0)
    assert promote.pointer_path(st, "tiny").read_bytes() == before  # old pointer intact, still valid JSON
    assert sorted(p.name for p in promote.pointer_path(st, "tiny").parent.iterdir()) == [".lock", "tiny.json"]


def test_runs_finishing_together_keep_the_best(tmp_path):
    st = Store(tmp_path)
    losses = [round(random.Random(i).uniform(1, 5), 4) for i in range(12)]
    args = [_artifacts(st, f"t{i}", loss) for i, loss in enumerate(losses)]
    start = threading.Barrier(len(args))

    def finish(i):
        start.wait()
        promote.consider(st, "tiny", test_split="test_sft", **args[i])

    threads = [threading.Thread(target=finish, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pointer = promote.read_pointer(st, "tiny")
    assert pointer["eval_loss"] == min(losses)
    assert pointer["adapter"].endswith(f"ad-t{losses.index(min(losses))}")


def test_tiny_run_records_its_loss_and_promotes_its_adapter(tiny_run):
    store, summary, proc = tiny_run
    promotion = summary["promotion"]
    assert promotion["eval_loss"] == summary["eval"]["tuned"]["eval_loss"]
    assert promotion["promoted"] and promotion["promoted_adapter"] == summary["adapter"]  # first run, fresh store
    assert Path(promotion["pointer"]) == store.resolve() / "promoted" / "tiny.json"
    pointer = json.loads(Path(promotion["pointer"]).read_text())
    assert not Path(pointer["adapter"]).is_absolute()  # relative to the store: a moved store keeps its pointer
    assert (store.resolve() / pointer["adapter"]).is_dir() and str(store.resolve() / pointer["adapter"]) == \
        summary["adapter"]
    assert "promoted: yes (this run's adapter is promoted: the first adapter promoted for this recipe)" in proc.stdout
