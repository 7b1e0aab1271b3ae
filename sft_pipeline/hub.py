"""What the Hugging Face Hub says about a data set's revision (its errors are explained in ``errors.py``)."""
from __future__ import annotations

import re
from pathlib import Path


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
