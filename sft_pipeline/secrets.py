"""Read secrets where they are used; never pass them around, cache them or log them.

Order: the environment variable (``HF_TOKEN`` / ``WANDB_API_KEY``, names configurable in ``auth``), then the
Prefect Secret block (``hf-token`` / ``wandb-api-key``). What crosses task borders is only *where* a secret was
found (e.g. ``"env:HF_TOKEN"``), never its value.
"""
from __future__ import annotations

import os


def _block(name: str) -> str | None:
    try:
        from prefect.blocks.system import Secret

        value = Secret.load(name, _sync=True).get()
    except Exception:  # no such block, or no Prefect API reachable: this source is simply absent
        return None
    return str(value) if value else None


def resolve(env_name: str, block_name: str | None) -> tuple[str | None, str | None]:
    """(value, source) where source is 'env:NAME' or 'block:NAME', or (None, None). ``block_name=None``: the
    environment only."""
    value = os.environ.get(env_name)
    if value:
        return value, f"env:{env_name}"
    value = _block(block_name) if block_name else None
    if value:
        return value, f"block:{block_name}"
    return None, None


def wandb_mode(tracking_mode: str, key_source: str | None, env: dict | None = None) -> str:
    """The W&B mode a run uses: ``tracking.mode`` when set; with ``auto`` the user's own ``WANDB_MODE`` wins
    (``offline``/``disabled`` must never be overridden to online), else online with a key, offline without."""
    if tracking_mode != "auto":
        return tracking_mode
    user = (os.environ if env is None else env).get("WANDB_MODE", "").strip().lower()
    if user in ("online", "offline", "disabled", "dryrun"):
        return "offline" if user == "dryrun" else user
    return "online" if key_source else "offline"
