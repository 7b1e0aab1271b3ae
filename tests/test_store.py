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
