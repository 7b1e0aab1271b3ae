"""The temporary Prefect server of ``sft-pipeline run`` (``sft_pipeline/prefect_server.py``): started while the CLI
starts up, used only when no server is named, and gone when the CLI is."""
from __future__ import annotations

import time

import pytest

from tests.conftest import cli, error_line, prefect_servers


def _gone(home, within: float = 10) -> bool:
    deadline = time.monotonic() + within
    while prefect_servers(home) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not prefect_servers(home)


def test_a_refused_run_leaves_no_server_behind(tmp_path):
    """A bad config is refused (exit 2) after the server was started: the server goes with the CLI."""
    home = tmp_path / "prefect-home"
    proc = cli("run", "--store", str(tmp_path / "store"), "--set", "lora.r=0", env={"PREFECT_HOME": str(home)})
    assert proc.returncode == 2 and "lora.r" in error_line(proc), proc.stderr[-2000:]
    assert _gone(home)


@pytest.mark.slow  # 15 s in CI here (2-core, 2026-12-07)
def test_a_server_named_by_the_profile_is_the_one_used(tmp_path):
    """~10 s here. PREFECT_API_URL in the active Prefect profile (not the environment): the run talks to that server
    (here nothing listens there, so it fails saying so), and the temporary server started meanwhile is stopped."""
    home = tmp_path / "prefect-home"
    home.mkdir()
    (home / "profiles.toml").write_text('active = "elsewhere"\n\n[profiles.elsewhere]\n'
                                        'PREFECT_API_URL = "http://127.0.0.1:9/api"\n')
    proc = cli("run", "--store", str(tmp_path / "store"), "--verbose",  # verbose: Prefect's own lines too
               env={"PREFECT_HOME": str(home), "PREFECT_CLIENT_MAX_RETRIES": "0"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "http://127.0.0.1:9/api" in error_line(proc)
    assert "Starting temporary server" not in proc.stderr
    assert _gone(home)
