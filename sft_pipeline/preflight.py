"""Checks that need more than the config schema, run before any stage: a failure is a ConfigError (exit code 2).

The schema (``sft_pipeline/config.py``) catches unknown keys, wrong types and out-of-range values. These look at
the machine and the inputs the config names:

- ``training.device=cuda`` on a machine without CUDA;
- ``model.source=local``: the model directory exists;
- ``data.source=local``: the path exists and has a file for each split name; ``synthetic``: the split names exist;
- ``generation.prompts``: each prompt is a chat ending with a user turn;
- ``format.max_length`` longer than the chat template's own overhead (measured with the real tokenizer for
  ``build`` and ``local`` models when max_length < 512; the format stage checks it again for every model).

Hub models and data sets are not contacted here; their problems surface in the stage that loads them.
"""
from __future__ import annotations

import functools

from sft_pipeline.config import PipelineConfig
from sft_pipeline.errors import ConfigError, ModelSourceError

OVERHEAD_CHECK_BELOW = 512  # a chat template adds a few dozen tokens; only a shorter max_length can be too short


def template_overhead(tok, system_message: str | None) -> int:
    """Tokens a conversation takes beyond its content: a one-token user turn and reply, templated."""
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    if system_message is not None:
        messages.insert(0, {"role": "system", "content": system_message})
    return len(tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


def _device(cfg: PipelineConfig) -> str | None:
    if cfg.training.device != "cuda":
        return None
    from sft_pipeline.models import resolve_device

    try:
        resolve_device(cfg.training.device)
    except ModelSourceError as e:
        return str(e)
    return None


def _model(cfg: PipelineConfig) -> str | None:
    from sft_pipeline.models import model_fingerprint

    try:
        model_fingerprint(cfg.model)
    except ModelSourceError as e:
        return str(e)
    return None


def _data(cfg: PipelineConfig) -> str | None:
    from sft_pipeline.chat_data import local_files, split_files

    data = cfg.data
    try:
        if data.source == "local":
            split_files(data, local_files(data))
    except ConfigError as e:
        return str(e)
    if data.source == "synthetic":
        from sft_pipeline import synthetic

        names = list(synthetic.splits(1, 1))
        for field in ("train_split", "test_split"):
            if getattr(data, field) not in names:
                return (f"data.{field}: split {getattr(data, field)!r} is not in the synthetic data set "
                        f"(allowed: {', '.join(names)})")
    return None


def _prompts(cfg: PipelineConfig) -> str | None:
    from sft_pipeline.chat_data import chat_problem

    for i, prompt in enumerate(cfg.generation.prompts):
        problem = chat_problem(prompt, prompt=True)
        if problem:
            return f"generation.prompts[{i}]: {problem}"
    return None


@functools.lru_cache(maxsize=8)
def _local_overhead(source: str, name: str, chat_template: str, system_message: str | None) -> int | None:
    """The template overhead with a build or local model's tokenizer (memoised: the CLI checks, then the flow)."""
    from sft_pipeline.config import ModelConfig
    from sft_pipeline.models import build_tokenizer, load_tokenizer

    try:
        tok = build_tokenizer() if source == "build" else \
            load_tokenizer(name, ModelConfig(source=source, name=name), chat_template)
    except Exception:  # noqa: BLE001 - no usable tokenizer there: the format stage reports it with the details
        return None
    return template_overhead(tok, system_message)


def _overhead(cfg: PipelineConfig) -> str | None:
    fmt, model = cfg.format, cfg.model
    if fmt.max_length >= OVERHEAD_CHECK_BELOW or model.source not in ("build", "local"):
        return None
    overhead = _local_overhead(model.source, model.name, fmt.chat_template, fmt.system_message)
    if overhead is not None and fmt.max_length <= overhead:
        return (f"format.max_length={fmt.max_length} is not longer than the chat template's own overhead "
                f"({overhead} tokens): allowed values are above {overhead}")
    return None


def check(cfg: PipelineConfig) -> None:
    """Raise ConfigError naming the field when the config cannot work on this machine with these inputs."""
    for probe in (_device, _model, _data, _prompts, _overhead):  # cheap first; the tokenizer last
        problem = probe(cfg)
        if problem:
            raise ConfigError(f"invalid config: {problem}")
