"""What the flow's cancellation and crash hooks need after a run was stopped from outside (they run in the worker,
or in the CLI, after the flow's process is gone): the newest sealed checkpoint a Retry resumes from, and the run's
progress cards marked stopped. Imports neither torch nor transformers (a cancel has a grace period; importing
transformers alone takes seconds), and nothing from the training package.
"""
from __future__ import annotations

from pathlib import Path

SEALED = "sft-pipeline-complete"  # the train stage's seal of a complete checkpoint (training.checkpoints.SEALED)


def newest_checkpoint(work: Path) -> tuple[int, Path] | None:
    """The newest sealed checkpoint in a train work dir (``<store>/.work/train/<key>``): what training resumes from.

    Only looks (a seal's file hashes are checked, and a damaged checkpoint removed, when training resumes)."""
    found = [(int(p.name.rsplit("-", 1)[1]), p) for p in Path(work).glob("checkpoint-*")
             if p.name.rsplit("-", 1)[1].isdigit() and (p / SEALED).is_file()]
    return max(found) if found else None


def mark_stopped(client, flow_run_id, why: str) -> int:
    """Say on every unfinished progress card of a flow run that training stopped, and why; returns how many.

    ``client``: a sync Prefect client. The bar keeps the percentage it reached; the description becomes
    ``stopped at step 23/50 · loss 2.1 · Cancelled: checkpoint-20 kept, Retry resumes there`` (its step and loss
    from what the card said last)."""
    from prefect.client.schemas.actions import ArtifactUpdate
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType

    cards = client.read_artifacts(artifact_filter=ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), type=ArtifactFilterType(any_=["progress"])))
    marked = 0
    for card in cards:
        if isinstance(card.data, (int, float)) and card.data >= 100:
            continue  # that training finished
        said = (card.description or "").removeprefix("stopped at ").split(" · ")
        where = [p for p in said if p.startswith(("step ", "loss "))]
        text = " · ".join(["stopped at " + where[0]] + where[1:] if where else ["stopped"]) + f" · {why}"
        client.update_artifact(card.id, ArtifactUpdate(description=text))
        marked += 1
    return marked
