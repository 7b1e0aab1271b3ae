"""``TrainJob``: everything one training needs, built once by the train stage (``tasks/train.py``) and read back by
every rank (``rank_train``) from JSON. Paths and config sections only: no model, no data, no secret (the HF token
travels through the environment).

``Rank``: which process of a data-parallel group this is (one process: rank 0 of 1).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import NamedTuple

from sft_pipeline.config import LoraSection, ModelConfig, QuantizationConfig, TrainingConfig

SECTIONS = {"model": ModelConfig, "quantization": QuantizationConfig, "lora": LoraSection, "training": TrainingConfig}
PATHS = ("train", "eval", "tokenizer", "model_path", "work", "out", "publish")


@dataclass(frozen=True)
class TrainJob:
    """One training: the format stage's token ids and tokenizer, the base model, the config sections it trains with,
    where checkpoints go (``work``, survives a crash) and where the artifact's files go (``out``)."""

    train: str | None  # the format stage's token ids of the train split (parquet); None: data given in memory
    eval: str | None  # ... of the test split; None when training.eval_strategy is "no"
    tokenizer: str | None  # the format stage's tokenizer directory
    model_path: str  # what from_pretrained loads: a hub id or a directory
    model: ModelConfig
    quantization: QuantizationConfig
    lora: LoraSection
    training: TrainingConfig
    max_length: int  # format.max_length
    work: str  # checkpoints, the out-of-memory fallback's batch, the ranks' files
    out: str  # the artifact's files (the adapter, log history, metrics)
    device: str  # "cuda" or "cpu" (resolved)
    run_name: str | None = None
    report_to: str = "none"  # "wandb" inside a W&B run of this process (the ranks report to none)
    speed: dict | None = None  # entries of build.SPEED to change (the benchmarks turn them one by one)
    publish: str | None = None  # several machines: the file on the shared store the other nodes watch

    def __post_init__(self):
        for name in PATHS:  # pathlib.Path given: kept as str, the form JSON takes
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                object.__setattr__(self, name, str(value))

    @classmethod
    def from_config(cls, cfg, *, model_path: str, work: str, device: str, out: str | None = None,
                    train: str | None = None, eval: str | None = None, tokenizer: str | None = None,
                    max_length: int | None = None, **rest) -> "TrainJob":
        """From a pipeline config (or a stage's view of it): its model, quantization, lora and training sections
        and ``format.max_length`` (unless ``max_length`` is given); ``out`` defaults to ``work``."""
        return cls(train=train, eval=eval, tokenizer=tokenizer, model_path=model_path, model=cfg.model,
                   quantization=cfg.quantization, lora=cfg.lora, training=cfg.training,
                   max_length=max_length or cfg.format.max_length, work=work, out=out or work, device=device, **rest)

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name).model_dump(mode="json") if f.name in SECTIONS else getattr(self, f.name)
                for f in fields(self)}

    @classmethod
    def from_json(cls, data: dict) -> "TrainJob":
        return cls(**{k: SECTIONS[k](**v) if k in SECTIONS else v for k, v in data.items()})


class TrainData(NamedTuple):
    train: object  # datasets.Dataset of input_ids (and assistant_masks)
    eval: object | None
    tokenizer: object


def load_data(job: TrainJob) -> TrainData:
    """The format stage's token ids and tokenizer: no process tokenizes again."""
    import datasets
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(job.tokenizer)
    train = datasets.Dataset.from_parquet(job.train)
    return TrainData(train, datasets.Dataset.from_parquet(job.eval) if job.eval else None, tok)


@dataclass(frozen=True)
class Rank:
    rank: int = 0
    local_rank: int = 0  # this process's GPU on its machine
    world: int = 1
    launched: bool = False  # started by torchrun (a group, perhaps of one): its metrics say world_size and strategy

    @classmethod
    def from_env(cls) -> "Rank":
        """As torchrun sets it (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``)."""
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)), True)
