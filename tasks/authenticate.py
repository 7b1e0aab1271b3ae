"""Stage 1 — authenticate: find the HF token and W&B key, and fail early when a gated model needs a token.

Only *where* each secret was found (``env:HF_TOKEN``, ``block:hf-token``) is written to the artifact; stages
that need a secret read it again from that place. Online, the token is checked against the hub (a rejected token
or a model it cannot access fails here, not an hour later); offline (``HF_HUB_OFFLINE=1``) that check is skipped.
"""
from __future__ import annotations

import json

from sft_pipeline import secrets
from sft_pipeline.caching import StageFailure, current_key, stage_task
from sft_pipeline.config import AuthConfig, DataConfig, ModelConfig, TrackingConfig
from sft_pipeline.models import offline
from sft_pipeline.store import ArtifactRef, Store


@stage_task("authenticate", retries=2)
def authenticate(store: str, auth: AuthConfig, model: ModelConfig, data: DataConfig, tracking: TrackingConfig,
                 found: dict[str, str | None]) -> ArtifactRef:
    """Check that every secret the run needs is available; record where each one comes from.

    ``found`` is where the flow saw each secret (``{"hf_token": "env:HF_TOKEN", ...}``): part of the cache key,
    so adding or removing a token re-runs this check. It never holds a value.
    """
    hf_token, hf_source = secrets.resolve(auth.hf_token_env, auth.hf_token_block)
    if model.source == "hub" and model.requires_token and not hf_token:
        raise StageFailure(
            f"model {model.name!r} is gated and needs a Hugging Face token: set the {auth.hf_token_env} environment "
            f"variable or create a Prefect Secret block named {auth.hf_token_block!r} (auth.hf_token_block)")
    checked = []
    if not offline() and hf_token and (model.source == "hub" or data.source == "hub"):
        from huggingface_hub import HfApi

        from sft_pipeline.errors import explain_hub_error

        api = HfApi(token=hf_token)
        for kind, repo, rev, call in (("model", model.name, model.revision, api.model_info),
                                      ("data set", data.dataset, data.revision, api.dataset_info)):
            if (kind == "model" and model.source != "hub") or (kind == "data set" and data.source != "hub"):
                continue
            try:
                call(repo, revision=rev)
            except Exception as e:  # noqa: BLE001 - classified below
                raise explain_hub_error(e, f"{kind} {repo!r}") from None
            checked.append(f"{kind} {repo}")
    wandb_mode = None
    wandb_source = None
    if tracking.backend == "wandb":
        _, wandb_source = secrets.resolve(auth.wandb_key_env, auth.wandb_key_block)
        wandb_mode = tracking.mode if tracking.mode != "auto" else ("online" if wandb_source else "offline")
        if wandb_mode == "online" and not wandb_source:
            raise StageFailure(f"tracking.mode=online needs a W&B key: set {auth.wandb_key_env} or create a Prefect "
                               f"Secret block named {auth.wandb_key_block!r}")
    record = {"config": auth.model_dump(), "hf_token": hf_source, "wandb_key": wandb_source,
              "wandb_mode": wandb_mode, "checked_on_hub": checked, "offline": offline()}
    st = Store(store)
    with st.write("authenticate", current_key(), inputs={"found": found}) as tmp:
        (tmp / "auth.json").write_text(json.dumps(record, indent=2))
    return st.ref("authenticate", current_key())
