"""Turn Hugging Face Hub failures into clear messages, and decide which ones a retry can fix."""
from __future__ import annotations

import re
from pathlib import Path

from sft_pipeline.caching import StageFailure, is_transient


def explain_hub_error(exc: BaseException, what: str) -> BaseException:
    """A StageFailure with a clear message for what a retry cannot fix; the original error otherwise."""
    name = type(exc).__name__
    status = getattr(getattr(exc, "response", None), "status_code", None)
    text = str(exc).splitlines()[0][:300] if str(exc) else name
    if name == "GatedRepoError" or status in (401, 403):
        return StageFailure(
            f"{what} is gated or the HF token was rejected (HTTP {status or 'gated'}): accept its terms on the hub, "
            "then set HF_TOKEN or create the Prefect Secret block named in auth.hf_token_block")
    if name in ("RepositoryNotFoundError", "RevisionNotFoundError", "EntryNotFoundError", "DatasetNotFoundError") \
            or status == 404:
        return StageFailure(f"{what} was not found on the hub (check the name and revision): {text}")
    if name in ("OfflineModeIsEnabled", "LocalEntryNotFoundError") or "offline" in text.lower() \
            or "HF_HUB_OFFLINE" in text:
        return StageFailure(f"{what} is not available offline (HF_HUB_OFFLINE is set or the hub is unreachable, and "
                            f"it is not in the local cache): {text}")
    if is_transient(exc):
        return exc
    return StageFailure(f"could not load {what}: {name}: {text}")


def dataset_commit(repo_id: str, revision: str | None, cache_dir: str | Path | None = None) -> str | None:
    """The commit a data set's revision (branch, tag or sha; None = main) points to now.

    Asked of the hub; offline or unreachable, read from the local hub cache (``refs/<revision>``); None when
    neither knows. A scheduled run uses it so that a new commit on the hub re-runs the data stage.
    """
    revision = revision or "main"
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    from huggingface_hub import HfApi, constants
    from huggingface_hub.file_download import repo_folder_name

    try:
        return HfApi().dataset_info(repo_id, revision=revision, timeout=20).sha
    except Exception:  # noqa: BLE001 - offline, unreachable or gated: fall back to what the cache knows
        pass
    ref = (Path(cache_dir or constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="dataset")
           / "refs" / revision)
    return ref.read_text().strip() if ref.is_file() else None
