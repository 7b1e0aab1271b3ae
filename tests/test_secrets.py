"""Secrets never leak: one whole tiny run (W&B on, offline) with canary secrets in the environment AND in Prefect
Secret blocks, then every file under the store, PREFECT_HOME (its SQLite database included), the W&B directories
and the captured output is searched for them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_flow

CANARIES = {
    "env_hf": "hf_CANARY-env-token-7c1e",
    "env_wandb": "CANARY-env-wandb-key-3b9a",
    "block_hf": "hf_CANARY-block-token-52d0",
    "block_wandb": "CANARY-block-wandb-key-e84f",
}
SAVE_BLOCKS = """
import os
from prefect.blocks.system import Secret
Secret(value=os.environ["CANARY_HF"]).save("hf-token", overwrite=True)
Secret(value=os.environ["CANARY_WANDB"]).save("wandb-api-key", overwrite=True)
"""


def files_containing(roots: list[Path], needles: dict[str, str]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for root in roots:
        for p in root.rglob("*"):
            if p.is_file() and not p.is_symlink():
                data = p.read_bytes()
                for name, value in needles.items():
                    if value.encode() in data:
                        found.setdefault(name, []).append(str(p))
    return found


@pytest.mark.slow  # 44 s in CI here (2-core, 2026-12-07)
def test_canary_secrets_appear_nowhere(tmp_path):
    home, store, wandb_home = tmp_path / "prefect-home", tmp_path / "store", tmp_path / "wandb-home"
    env = {
        "PREFECT_HOME": str(home),
        "HF_TOKEN": CANARIES["env_hf"], "WANDB_API_KEY": CANARIES["env_wandb"], "WANDB_MODE": "offline",
        "WANDB_CONFIG_DIR": str(wandb_home / "config"), "WANDB_CACHE_DIR": str(wandb_home / "cache"),
        "WANDB_DATA_DIR": str(wandb_home / "data"),
    }
    # the blocks live in this test's own Prefect database (the run below starts its temporary server on it)
    made = subprocess.run([sys.executable, "-c", SAVE_BLOCKS], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env, "CANARY_HF": CANARIES["block_hf"],
                               "CANARY_WANDB": CANARIES["block_wandb"],
                               "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"})
    assert made.returncode == 0, made.stderr[-3000:]

    # the HF token comes from the environment, the W&B key from its block (its env variable is renamed away)
    proc, summary = run_flow(store, "tracking.backend=wandb", "tracking.mode=offline",
                             "auth.wandb_key_env=SFT_TEST_UNSET_WANDB_KEY", "training.max_steps=4",
                             "training.save_steps=2", "evaluation.max_samples=16", "generation.max_new_tokens=4",
                             env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert all(s["state"] == "Completed" for s in summary["stages"].values()), summary["stages"]

    auth = json.loads((Path(summary["stages"]["authenticate"]["artifact"]) / "auth.json").read_text())
    assert (auth["hf_token"], auth["wandb_key"], auth["wandb_mode"]) == ("env:HF_TOKEN", "block:wandb-api-key",
                                                                         "offline")
    # W&B really ran and wrote its files; the trainer really checkpointed (training_args.bin included)
    assert list((store / ".work" / "wandb").rglob("offline-run-*")), "no W&B offline run was written"
    sync = summary["wandb"]["sync_command"]  # the report says how to upload the offline run
    assert sync.startswith("wandb sync ") and Path(sync.split(" ", 2)[2]).name.startswith("offline-run-"), sync
    assert list((store / ".work" / "train").rglob("checkpoint-*/training_args.bin"))
    assert not list(store.rglob("adapter/training_args.bin"))
    assert not (Path(summary["adapter"]) / "training_args.bin").exists()

    roots = [r for r in (store, home, wandb_home) if r.exists()]
    # the search works: it finds what is there (the blocks' names in the database)
    assert files_containing([home], {"block name": "wandb-api-key"}), "the Prefect database was not searched"
    assert any(p.suffix == ".db" for p in home.rglob("*"))
    assert files_containing(roots, CANARIES) == {}
    assert not any(v in proc.stdout + proc.stderr for v in CANARIES.values())
