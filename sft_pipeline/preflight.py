"""Checks that need more than the config schema, run before any stage: a failure is a ConfigError (exit code 2).

The schema (``sft_pipeline/config.py``) catches unknown keys, wrong types and out-of-range values. These look at
the machine and the inputs the config names:

- ``training.device=cuda`` on a machine without CUDA;
- ``model.source=local``: the model directory exists;
- ``data.source=local``: the path exists and has a file for each split name; ``synthetic``: the split names exist;
- ``generation.prompts``: each prompt is a chat ending with a user turn;
- ``format.max_length`` longer than the chat template's own overhead (measured with the real tokenizer for
  ``build`` and ``local`` models when max_length < 512; the format stage checks it again for every model);
- a gated hub model (``model.requires_token``) with no HF token in the environment (or, inside the flow, in the
  Prefect Secret block);
- on a GPU: bf16 asked for on a card without bf16, and the model plus one sequence of ``format.max_length`` tokens
  (with activation checkpointing, the leanest setting) not fitting the card's free memory;
- the store's disk having less free space than the base model, the data and the checkpoints need (an estimate).

Sizes come from the model's config (``config.json`` of a local, built or converted model; for a hub model only when
the local hub cache has it: no hub is contacted here). Hub data sets are not contacted: their problems surface in the data stage.

What needs a library to measure (the template overhead: a tokenizer; the model's sizes: transformers' config) is
remembered in the store (``<store>/preflight/<key>/``, keyed by the model's fingerprint, the template and the library
versions), so a later ``run`` or ``plan`` imports neither transformers nor torch (BENCHMARKS.md, *Issue 32*). Only a
check that passed is remembered, and ``plan`` only reads.
"""
from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

from sft_pipeline.config import PipelineConfig
from sft_pipeline.errors import ConfigError, ModelSourceError
from sft_pipeline.store import Store, digest
from sft_pipeline.tokens import template_overhead

OVERHEAD_CHECK_BELOW = 512  # a chat template adds a few dozen tokens; only a shorter max_length can be too short
MEMO = "preflight"  # <store>/preflight/<key>/memo.json: a measured fact of these checks (see the module docstring)
# the fields of a model's config that parameter_count and the memory and disk estimates read
SHAPE_FIELDS = ("hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads", "num_key_value_heads",
                "head_dim", "intermediate_size", "tie_word_embeddings")


@functools.lru_cache(maxsize=None)
def _versions(*dists: str) -> dict[str, str | None]:
    import importlib.metadata

    out: dict[str, str | None] = {}
    for name in dists:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _remembered(store: str | Path | None, what: dict, compute, pending: list | None):
    """``compute()``, or what an earlier check remembered for ``what`` in the store (verified like an artifact).
    A value computed here is appended to ``pending`` (key, data) for ``check`` to write once every check passed."""
    if store is None:
        return compute()
    key = digest({MEMO: what}, 24)
    found = Store(store).read_memo(MEMO, key)
    if found is not None:
        return found[0]["value"]
    value = compute()
    if pending is not None and value is not None:
        pending.append((key, {"what": what, "value": value}))
    return value


def _device(cfg: PipelineConfig) -> str | None:
    if cfg.training.device != "cuda":
        return None
    from sft_pipeline.models import resolve_device

    try:
        resolve_device(cfg.training.device)
    except ModelSourceError as e:
        return str(e)
    return None


def _fingerprint(cfg: PipelineConfig, store: str | Path | None) -> str:
    """The base model's fingerprint; with a store, a GGUF file's hash is remembered there (not hashed every time)."""
    from sft_pipeline.models import model_fingerprint

    return model_fingerprint(cfg.model, Store(store) if store is not None else None)


def _model(cfg: PipelineConfig, store: str | Path | None = None) -> str | None:
    try:
        _fingerprint(cfg, store)
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


def _overhead(cfg: PipelineConfig, store: str | Path | None = None, pending: list | None = None) -> str | None:
    fmt, model = cfg.format, cfg.model
    if fmt.max_length >= OVERHEAD_CHECK_BELOW or model.source not in ("build", "local"):
        return None
    from sft_pipeline.models import CHATML_TEMPLATE, ZEPHYR_TEMPLATE

    what = {"overhead": {"model": _fingerprint(cfg, store), "chat_template": fmt.chat_template,
                         "system_message": fmt.system_message, "templates": digest([ZEPHYR_TEMPLATE, CHATML_TEMPLATE]),
                         "libraries": _versions("transformers", "tokenizers", "sentencepiece", "mistral-common")}}
    overhead = _remembered(store, what, lambda: _local_overhead(model.source, model.name, fmt.chat_template,
                                                                fmt.system_message), pending)
    if overhead is not None and fmt.max_length <= overhead:
        return (f"format.max_length={fmt.max_length} is not longer than the chat template's own overhead "
                f"({overhead} tokens): allowed values are above {overhead}")
    return None


GIB = 2**30


def _gated(cfg: PipelineConfig, blocks: bool) -> str | None:
    model, auth = cfg.model, cfg.auth
    if model.source != "hub" or not model.requires_token:
        return None
    from sft_pipeline import secrets

    if secrets.resolve(auth.hf_token_env, auth.hf_token_block if blocks else None)[0]:
        return None
    if not blocks:  # a Prefect Secret block may still hold it: the flow checks again with blocks
        return None
    return (f"model {model.name!r} is gated and needs a Hugging Face token: set the {auth.hf_token_env} environment "
            f"variable or create a Prefect Secret block named {auth.hf_token_block!r} (auth.hf_token_block)")


def model_config(cfg: PipelineConfig):
    """The base model's transformers config without loading weights, or None when it cannot be had cheaply."""
    model = cfg.model
    try:
        if model.source == "build":
            from transformers import MistralConfig

            from sft_pipeline.models import ARCHITECTURES

            return MistralConfig(**{**ARCHITECTURES[model.name], **model.build})
        from transformers import AutoConfig

        if model.source == "local":
            return AutoConfig.from_pretrained(model.name)
        if model.source == "hub":  # from the local hub cache only: preflight contacts no hub
            return AutoConfig.from_pretrained(model.name, revision=model.revision, local_files_only=True)
    except Exception:  # noqa: BLE001 - no config at hand (offline, gated, other source): the sizes are unknown
        return None
    return None


def model_shape(cfg: PipelineConfig, store: str | Path | None = None, pending: list | None = None):
    """The sizes of the base model's config that ``parameter_count`` and the estimates read (``SHAPE_FIELDS``, as
    attributes), or None when its config cannot be had cheaply; remembered in the store (see ``_remembered``)."""

    def read() -> dict | None:
        mc = model_config(cfg)
        return None if mc is None else {f: getattr(mc, f, None) for f in SHAPE_FIELDS}

    try:
        what = {"shape": {"model": _fingerprint(cfg, store), "libraries": _versions("transformers")}}
    except ModelSourceError:
        return None  # _model reports it
    shape = _remembered(store, what, read, pending)
    return None if shape is None else SimpleNamespace(**shape)


def parameter_count(mc) -> int:
    """Parameters of a decoder-only transformer from its config (Llama/Mistral layout; norms left out)."""
    h, layers, vocab = mc.hidden_size, mc.num_hidden_layers, mc.vocab_size
    heads = mc.num_attention_heads
    kv = getattr(mc, "num_key_value_heads", None) or heads
    head_dim = getattr(mc, "head_dim", None) or h // heads
    inter = getattr(mc, "intermediate_size", 4 * h)
    attn = h * heads * head_dim * 2 + h * kv * head_dim * 2
    per_layer = attn + 3 * h * inter
    embed = vocab * h * (1 if getattr(mc, "tie_word_embeddings", False) else 2)
    return layers * per_layer + embed


def _cuda_free_bytes() -> int:
    import torch

    return torch.cuda.mem_get_info()[0]


def _bf16_supported() -> bool:
    import torch

    return torch.cuda.is_bf16_supported()


def gpu_need_bytes(cfg: PipelineConfig, mc) -> int:
    """The least a training step needs: the weights (4-bit: ~0.56 bytes a parameter with its scales, else 2) and
    one sequence of format.max_length tokens with activation checkpointing, plus its fp32 logits."""
    from sft_pipeline.training.batch import ACT_BYTES_CKPT  # activation bytes per token x hidden unit x layer

    params = parameter_count(mc)
    weights = params * (0.56 if cfg.quantization.load_in_4bit else 2)
    seq = cfg.format.max_length
    acts = ACT_BYTES_CKPT * mc.hidden_size * mc.num_hidden_layers * seq + 4 * mc.vocab_size * seq * 2
    return int(weights + acts)


def _gpu(cfg: PipelineConfig, store: str | Path | None = None, pending: list | None = None) -> str | None:
    from sft_pipeline.models import resolve_device

    try:
        if resolve_device(cfg.training.device) != "cuda":
            return None
    except ModelSourceError:
        return None  # _device reports it
    if cfg.quantization.compute_dtype == "bfloat16" and not _bf16_supported():
        return ("quantization.compute_dtype=bfloat16 but this GPU has no bf16 support; allowed here: auto, float16, "
                "float32")
    mc = model_shape(cfg, store, pending)
    if mc is None:
        return None
    need, free = gpu_need_bytes(cfg, mc), _cuda_free_bytes()
    if need > free:
        return (f"the model and one sequence of format.max_length={cfg.format.max_length} tokens need about "
                f"{need / GIB:.1f} GiB of GPU memory even with activation checkpointing; the GPU has "
                f"{free / GIB:.1f} GiB free (lower format.max_length, keep quantization.load_in_4bit, or free the GPU)")
    return None


def disk_need_bytes(cfg: PipelineConfig, mc) -> dict[str, int]:
    """What a run writes, roughly: the base model once (bf16), the data (local files' size; 0 when unknown), the
    tokenized data, and the checkpoints kept (LoRA weights + Adam states)."""
    from sft_pipeline.chat_data import local_files

    model = parameter_count(mc) * 2 if mc is not None and cfg.model.source in ("hub", "build") else 0
    data = 0
    if cfg.data.source == "local":
        try:
            data = sum(os.path.getsize(p) for p in local_files(cfg.data)) * 2
        except ConfigError:
            data = 0
    lora = 0
    if mc is not None:  # r x (in + out) per adapted matrix; all linear layers as the upper bound
        lora = cfg.lora.r * 2 * mc.hidden_size * 7 * mc.num_hidden_layers
    checkpoints = lora * (2 + 8 + 4) * (cfg.training.save_total_limit + 3)  # weights, Adam, fp32 grads; artifacts
    return {"model": model, "data": data, "checkpoints": checkpoints}


def _disk_free(path: Path) -> int:
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _disk(cfg: PipelineConfig, store: str | Path | None, pending: list | None = None) -> str | None:
    if store is None:
        return None
    parts = disk_need_bytes(cfg, model_shape(cfg, store, pending))
    need, free = sum(parts.values()), _disk_free(Path(store).expanduser())
    if need > free:
        detail = ", ".join(f"{k} {v / GIB:.1f} GiB" for k, v in parts.items() if v)
        return (f"the store's disk ({store}) has {free / GIB:.1f} GiB free; this run needs about {need / GIB:.1f} GiB "
                f"({detail}): free some space or pass --store on a bigger disk")
    return None


def check(cfg: PipelineConfig, store: str | Path | None = None, blocks: bool = False, remember: bool = True) -> None:
    """Raise ConfigError naming the field when the config cannot work on this machine with these inputs.

    ``blocks``: also look for secrets in Prefect Secret blocks (inside the flow, where a Prefect API is at hand).
    ``remember``: keep what was measured in the store (``store``, its root) once every check passed; ``plan``,
    which writes nothing, passes False.
    """
    pending: list = []
    probes = (_device, lambda c: _model(c, store), _data, _prompts, lambda c: _gated(c, blocks),
              lambda c: _overhead(c, store, pending), lambda c: _gpu(c, store, pending),
              lambda c: _disk(c, store, pending))
    for probe in probes:  # cheap first; the tokenizer and the model config last
        problem = probe(cfg)
        if problem:
            raise ConfigError(f"invalid config: {problem}")
    if remember and store is not None:
        st = Store(store)
        for key, data in pending:
            st.write_memo(MEMO, key, data)
