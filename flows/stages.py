"""The stage table: what each stage is, what it reads, and what its cache key is made of. One row a stage.

The flow runs these rows top to bottom, ``sft-pipeline plan`` predicts them, the run summary lists them: all three
read this table, so they cannot drift apart. Per row:

- ``needs``: the stages whose artifacts it reads (their fingerprints are in its key);
- ``keyed``: the config fields its output depends on (a section, or one field of it); ``model`` counts by the base
  model's content fingerprint, ``data`` with the data's content fingerprint, ``secrets`` by where each is found;
- ``reads``: fields it reads that do not change its output (left out of the key);
- ``code``: its code version and the texts it applies; editing a docstring re-runs nothing, editing a template or
  bumping a VERSION re-runs the stage and everything after it. The train stage's also holds a hash of the code it
  runs (``tasks/train.py``'s ``CODE``, comments and docstrings left out): editing that code retrains.

Changing a field re-runs the first stage that keys on it and every stage after it that reads its artifact: e.g.
``lora.r`` → train, evaluate, benchmark, save_adapter, generate; ``format.max_length`` → format onwards.
"""
from __future__ import annotations

from sft_pipeline import chat_data, synthetic
from sft_pipeline.models import ZEPHYR_TEMPLATE
from sft_pipeline.source_hash import source_hash
from sft_pipeline.stage import Stage
from tasks import authenticate, benchmark, data, evaluate, format, generate, save_adapter, train

STAGES: tuple[Stage, ...] = (
    Stage("authenticate", authenticate.run,
          keyed=("auth", "model.source", "model.name", "model.revision", "model.requires_token", "data.source",
                 "data.dataset", "data.revision", "tracking.backend", "tracking.mode", "secrets"),
          code=(authenticate.VERSION,)),
    Stage("data", data.run,
          keyed=("data",),
          code=(data.VERSION, chat_data.SCHEMA_VERSION, str(synthetic.VERSION))),
    Stage("format", format.run, needs=("data",),
          keyed=("model", "format", "data.train_split", "data.test_split"),
          code=(format.VERSION, ZEPHYR_TEMPLATE)),
    Stage("train", train.run, needs=("format",),
          keyed=("model", "model.attn_implementation", "quantization", "lora", "training", "format.max_length",
                 "data.train_split", "data.test_split"),
          # where logs go, the cost estimate's price, and how many processes share the same effective batch
          reads=("tracking", "training.price_per_hour", "training.num_processes", "training.strategy",
                 "training.collective_timeout_minutes"),
          code=(train.VERSION, source_hash(train.CODE)), retries=1),
    Stage("evaluate", evaluate.run, needs=("format", "train"),
          keyed=("model", "quantization", "evaluation", "data.test_split"),
          code=(evaluate.VERSION,)),
    # benchmark.sources: the benchmarks' package versions and local task files' content; the promotion gate's
    # max_regression is the flow's, not part of this output
    Stage("benchmark", benchmark.run, needs=("format", "train"),
          keyed=("model", "quantization", "benchmark", "benchmark.sources"),
          reads=("benchmark.max_regression", "tracking"),
          code=(benchmark.VERSION,)),
    Stage("save_adapter", save_adapter.run, needs=("format", "train", "evaluate"),
          keyed=("model", "quantization", "data.dataset", "recipe"),
          code=(save_adapter.VERSION,)),
    Stage("generate", generate.run, needs=("save_adapter",),
          keyed=("model", "quantization", "generation"),
          code=(generate.VERSION,)),
)
BY_NAME = {s.name: s for s in STAGES}
