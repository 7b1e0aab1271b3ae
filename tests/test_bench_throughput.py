"""bench/throughput.py's command line, on CPU: what can be checked before any GPU work."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_an_unknown_setting_is_refused_before_the_model_is_built(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.throughput", "--order", "project,glue,notebook@hold30,nope@prof",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown setting(s) glue, nope@prof" in proc.stderr and "peftlora" in proc.stderr  # names the known ones
    assert list(tmp_path.iterdir()) == []  # nothing prepared, nothing written
