"""Sealed checkpoints: a Trainer checkpoint counts only once every file is on disk and recorded with its size and
sha256; the newest intact one is what training resumes from.

Every checkpoint is sealed (``callbacks.Checkpoint``), by rank 0 once every rank has written its part.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from sft_pipeline.store import fsync_tree, write_json_atomic

log = logging.getLogger("sft_pipeline.train")
SEALED = "sft-pipeline-complete"  # written into a checkpoint once all its files are on disk: their sizes and sha256


def _checkpoint_files(ckpt: Path) -> dict[str, dict]:
    from sft_pipeline.store import HASH_LIMIT, file_sha256

    files = {}
    for p in sorted(ckpt.rglob("*")):
        if p.is_file() and p.name != SEALED:
            size = p.stat().st_size
            files[str(p.relative_to(ckpt))] = {"size": size, "sha256": file_sha256(p) if size <= HASH_LIMIT else None}
    return files


def seal_checkpoint(ckpt: Path) -> None:
    """Flush a checkpoint Trainer just saved to disk, then mark it complete, recording each file's size and hash."""
    fsync_tree(ckpt)
    write_json_atomic(ckpt / SEALED, {"files": _checkpoint_files(ckpt)})
    fsync_tree(ckpt)


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why a checkpoint cannot be resumed from, or None: not sealed (cut short), or a file missing, resized or
    changed since it was sealed. A seal from before hashes were recorded (empty) only says it was complete."""
    seal = Path(ckpt) / SEALED
    if not seal.is_file():
        return "not sealed (cut short while saving)"
    try:
        text = seal.read_text()
        recorded = json.loads(text)["files"] if text.strip() else None
    except (OSError, ValueError, KeyError, TypeError):
        return f"its seal file {SEALED} is unreadable"
    if recorded is None:
        return None
    for rel, meta in recorded.items():
        p = Path(ckpt) / rel
        if not p.is_file():
            return f"file missing: {rel}"
        if p.stat().st_size != meta["size"]:
            return f"size changed: {rel}"
        if meta.get("sha256"):
            from sft_pipeline.store import file_sha256

            if file_sha256(p) != meta["sha256"]:
                return f"content changed: {rel}"
    return None


def last_checkpoint(work: Path, logger: logging.Logger = log) -> str | None:
    """The newest intact checkpoint in ``work``. One cut short (a kill or a crash while saving) is removed; a
    sealed one that was damaged since is removed with a WARNING, and the one before it is used (or none: training
    starts fresh), so a corrupted checkpoint never fails every rerun."""
    def step(p: Path) -> int:
        return int(p.name.rsplit("-", 1)[1])

    found = [p for p in Path(work).glob("checkpoint-*") if p.is_dir() and p.name.rsplit("-", 1)[1].isdigit()]
    for ckpt in sorted(found, key=step, reverse=True):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return str(ckpt)
        if (ckpt / SEALED).exists():
            logger.warning("train: checkpoint %s is damaged (%s); removed, resuming from an earlier checkpoint or "
                           "from the start", ckpt, problem)
        shutil.rmtree(ckpt, ignore_errors=True)
    return None


def resumable(trainer_cls):
    """The trainer, resuming with each trainable weight in the dtype it trains in.

    Trainer reloads a PEFT checkpoint with ``load_adapter``, which upcasts bf16 adapter weights to float32, while
    trl trains QLoRA adapters in bf16: a resumed run would then train differently from an uninterrupted one.
    """

    class Resumable(trainer_cls):
        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            target = model if model is not None else self.model
            dtypes = {n: p.dtype for n, p in target.named_parameters() if p.requires_grad}
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            for n, p in target.named_parameters():
                if n in dtypes and p.dtype != dtypes[n]:
                    p.data = p.data.to(dtypes[n])

    return Resumable
