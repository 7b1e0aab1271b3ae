"""Turn Hugging Face Hub failures into clear messages, and decide which ones a retry can fix."""
from __future__ import annotations

import re
from pathlib import Path

from sft_pipeline.caching import StageFailure, is_transient

CONNECTION_ERRORS = ("ConnectError", "ConnectTimeout", "ReadTimeout", "ConnectionError", "RemoteProtocolError",
                     "NameResolutionError", "gaierror")


class HubUnreachable(ConnectionError):
    """The hub could not be reached: retried (the network may come back), then reported with this message."""


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def explain_hub_error(exc: BaseException, what: str) -> BaseException:
    """A StageFailure with a clear message for what a retry cannot fix; a clear transient error otherwise."""
    name = type(exc).__name__
    status = getattr(getattr(exc, "response", None), "status_code", None)
    text = str(exc).splitlines()[0][:300] if str(exc) else name
    if name == "GatedRepoError" or status == 403:
        return StageFailure(
            f"{what} is gated and this HF token has no access to it (HTTP {status or 'gated'}): accept its terms on "
            "the hub with the token's account, then set HF_TOKEN or the Prefect Secret block named in "
            "auth.hf_token_block")
    if name in ("RepositoryNotFoundError", "RevisionNotFoundError", "EntryNotFoundError", "DatasetNotFoundError") \
            or status == 404:
        return StageFailure(f"{what} was not found on the hub, or is private to another account (check the name, "
                            f"the revision and the token): {text}")
    if status == 401:
        return StageFailure(
            f"{what}: the Hugging Face Hub rejected the HF token (HTTP 401: invalid or expired): create a new token "
            "at https://huggingface.co/settings/tokens, then set HF_TOKEN or the Prefect Secret block named in "
            "auth.hf_token_block")
    if name in ("OfflineModeIsEnabled", "LocalEntryNotFoundError") or "offline" in text.lower() \
            or "HF_HUB_OFFLINE" in text:
        return StageFailure(f"{what} is not available offline (HF_HUB_OFFLINE is set or the hub is unreachable, and "
                            f"it is not in the local cache): {text}")
    if name in CONNECTION_ERRORS or (isinstance(exc, ConnectionError) and not isinstance(exc, HubUnreachable)):
        return HubUnreachable(f"{what}: the Hugging Face Hub at {_endpoint()} is unreachable ({name}: {text}); "
                              "check the network, or set HF_HUB_OFFLINE=1 to use only the local cache")
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
