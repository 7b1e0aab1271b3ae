"""The artifact store: atomic writes, manifests, and detection of missing or tampered artifacts."""
from __future__ import annotations

import pytest

from sft_pipeline.store import Store


def test_write_is_atomic_and_checked(tmp_path):
    st = Store(tmp_path)
    with st.write("data", "k1", inputs={"a": 1}) as d:
        (d / "x.txt").write_text("hello")
    ok, _ = st.check("data", "k1")
    assert ok and st.ref("data", "k1").fingerprint
    (tmp_path / "data" / "k1" / "x.txt").write_text("HELLO")  # same size, other content
    assert st.check("data", "k1") == (False, "content changed: x.txt")
    assert st.ref("data", "k1") is None


def test_failed_write_leaves_nothing(tmp_path):
    st = Store(tmp_path)
    with pytest.raises(RuntimeError):
        with st.write("data", "k2") as d:
            (d / "half.bin").write_bytes(b"0" * 10)
            raise RuntimeError("disk full")
    assert not (tmp_path / "data" / "k2").exists()
    assert list((tmp_path / ".tmp").iterdir()) == []


def test_fingerprint_follows_content(tmp_path):
    st = Store(tmp_path)
    for key, text in (("a", "one"), ("b", "one"), ("c", "two")):
        with st.write("s", key) as d:
            (d / "f").write_text(text)
    fp = {k: st.ref("s", k).fingerprint for k in "abc"}
    assert fp["a"] == fp["b"] != fp["c"]


def test_memos_are_kept_verified_and_never_fail_a_stage(tmp_path, monkeypatch, caplog):
    """A memo (the base model's eval numbers or sample replies, shared by runs that only retrain) is written like an
    artifact and verified when read; failing to write one (a full disk) is logged, not raised."""
    st = Store(tmp_path)
    assert st.read_memo("evaluate_base", "m1") is None and st.read_memo("evaluate_base", None) is None
    st.write_memo("evaluate_base", "m1", {"scores": {"eval_loss": 1.5}})
    data, created = st.read_memo("evaluate_base", "m1")
    assert data == {"scores": {"eval_loss": 1.5}} and created.endswith("Z")
    (tmp_path / "evaluate_base" / "m1" / "memo.json").write_text('{"scores": {"eval_loss": 0.1}}')  # tampered
    assert st.read_memo("evaluate_base", "m1") is None
    st.write_memo("evaluate_base", None, {"x": 1})  # outside the flow: nothing kept
    assert sorted(p.name for p in (tmp_path / "evaluate_base").iterdir()) == ["m1"]
    monkeypatch.setenv("SFT_PIPELINE_FAULT_DISK_FULL", "generate_base")
    with caplog.at_level("WARNING", logger="sft_pipeline.store"):
        st.write_memo("generate_base", "m2", {"replies": []})
    assert "could not keep generate_base" in caplog.text and st.read_memo("generate_base", "m2") is None
    assert list((tmp_path / ".tmp").iterdir()) == []
