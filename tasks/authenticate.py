"""Stage 1 — authenticate: find the HF token and W&B key, and fail early when a gated model needs a token.

Only *where* each secret was found (``env:HF_TOKEN``, ``block:hf-token``) is written to the artifact, never a
value; stages that need a secret read it again from there (``ctx.secret``). Online, the token is checked against the
hub (a rejected token or a model it cannot access fails here, not an hour later); offline (``HF_HUB_OFFLINE=1``)
that check is skipped.
"""
from __future__ import annotations

import json

from sft_pipeline import secrets
from sft_pipeline.errors import StageFailure, explain_hub_error
from sft_pipeline.models import offline
from sft_pipeline.stage import StageContext

VERSION = "2"


def run(ctx: StageContext) -> dict:
    auth, model, data, tracking = ctx.cfg.auth, ctx.cfg.model, ctx.cfg.data, ctx.cfg.tracking
    hf_token, hf_source = secrets.resolve(auth.hf_token_env, auth.hf_token_block)
    if model.source == "hub" and model.requires_token and not hf_token:
        raise StageFailure(
            f"model {model.name!r} is gated and needs a Hugging Face token: set the {auth.hf_token_env} environment "
            f"variable or create a Prefect Secret block named {auth.hf_token_block!r} (auth.hf_token_block)")
    checked = []
    if not offline() and hf_token and "hub" in (model.source, data.source):
        from huggingface_hub import HfApi

        api = HfApi(token=hf_token)
        for kind, source, repo, rev, call in (("model", model.source, model.name, model.revision, api.model_info),
                                              ("data set", data.source, data.dataset, data.revision,
                                               api.dataset_info)):
            if source != "hub":
                continue
            try:
                call(repo, revision=rev)
            except Exception as e:  # noqa: BLE001 - classified by explain_hub_error
                raise explain_hub_error(e, f"{kind} {repo!r}") from None
            checked.append(f"{kind} {repo}")
    wandb_mode = wandb_source = None
    if tracking.backend == "wandb":
        _, wandb_source = secrets.resolve(auth.wandb_key_env, auth.wandb_key_block)
        wandb_mode = secrets.wandb_mode(tracking.mode, wandb_source)  # a user's own WANDB_MODE wins under auto
        if wandb_mode == "online" and not wandb_source:
            raise StageFailure(f"tracking.mode=online needs a W&B key: set {auth.wandb_key_env} or create a Prefect "
                               f"Secret block named {auth.wandb_key_block!r}")
    record = {"hf_token": hf_source, "wandb_key": wandb_source, "wandb_mode": wandb_mode,
              "checked_on_hub": checked, "offline": offline()}
    (ctx.out / "auth.json").write_text(json.dumps(record, indent=2))
    return record
