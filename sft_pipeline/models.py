"""Where the base model and tokenizer come from: the hub, a local directory, or an architecture built here.

``source=build`` makes a model with **random weights** from a named architecture (``tiny-mistral`` for the
offline default, ``mistral-7b`` = ``MistralConfig()`` for speed work on a GPU with no hub). Such a model is saved
once into the store (``models/<fingerprint>/``) with a README that says it is untrained, and every stage that uses
it records ``random_weights: true``.

Heavy imports (torch, transformers) happen inside functions so that a fully cached run never pays for them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sft_pipeline.errors import ModelSourceError
from sft_pipeline.store import Store, digest

BUILDER_VERSION = 1
ARCHITECTURES: dict[str, dict[str, Any]] = {
    # small enough for a 2-core CPU, big enough to learn the synthetic chat set; 4-bit needs dims divisible by 64
    "tiny-mistral": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=4096, sliding_window=None,
                         tie_word_embeddings=False, vocab_size=32000),
    "mistral-7b": {},  # MistralConfig() defaults are Mistral-7B-v0.1
}

# Zephyr's chat format (alignment-handbook), with BOS and {% generation %} marks so that assistant-only loss works.
ZEPHYR_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
# ChatML (SmolLM2, Qwen, ...) with {% generation %} marks: the assistant's content and its <|im_end|> are the trained
# tokens (the model must learn to end its turn); the newline after <|im_end|> and every header are not.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def model_fingerprint(model_cfg, store: Store | None = None) -> str:
    """Identify the base model without loading it (cheap: used in cache keys)."""
    if model_cfg.source == "gguf":  # the file's sha256, remembered in the store when one is given
        from sft_pipeline import gguf

        return gguf.fingerprint(model_cfg, store)
    if model_cfg.source == "hub":
        return digest({"hub": model_cfg.name, "revision": model_cfg.revision})
    if model_cfg.source == "local":
        root = Path(model_cfg.name).expanduser()
        if not root.is_dir():
            raise ModelSourceError(f"model.name: local model directory not found: {root}")
        files = {p.name: p.stat().st_size for p in sorted(root.iterdir()) if p.is_file()}
        cfg = (root / "config.json").read_text() if (root / "config.json").is_file() else ""
        return digest({"local": str(root.resolve()), "files": files, "config": cfg})
    return digest({"build": model_cfg.name, "over": model_cfg.build, "v": BUILDER_VERSION})


def base_model_path(model_cfg, store: Store) -> str:
    """A path or hub id that ``from_pretrained`` accepts. Builds the model once for ``source=build``."""
    if model_cfg.source == "hub":
        return model_cfg.name
    if model_cfg.source == "local":
        return str(Path(model_cfg.name).expanduser().resolve())
    if model_cfg.source == "gguf":  # dequantized once into <store>/models/<fingerprint>/
        from sft_pipeline import gguf

        return gguf.model_dir(model_cfg, store)
    key = model_fingerprint(model_cfg)
    ref = store.ref("models", key)
    if ref is None:
        with store.lock("models", key):  # two runs at once: one builds, the other waits and reuses
            if store.ref("models", key) is None:
                _build(model_cfg, store, key)
        ref = store.ref("models", key)
    return ref.path


def is_random(model_cfg) -> bool:
    return model_cfg.source == "build"


def _build(model_cfg, store: Store, key: str) -> None:
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    arch = {**ARCHITECTURES[model_cfg.name], **model_cfg.build}
    config = MistralConfig(**arch)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() and model_cfg.name != "tiny-mistral" else "cpu"
    with torch.device(device):
        model = MistralForCausalLM(config)
    if device == "cuda":
        model = model.to(torch.bfloat16)
    tok = build_tokenizer()
    with store.write("models", key, inputs={"architecture": model_cfg.name, "overrides": model_cfg.build,
                                            "random_weights": True}) as tmp:
        model.save_pretrained(tmp, max_shard_size="20GB")
        tok.save_pretrained(tmp)
        (tmp / "README.md").write_text(
            f"# {model_cfg.name} (random weights)\n\nBuilt by sft-pipeline from `MistralConfig({json.dumps(arch)})`"
            " with **random weights**: not a pretrained model. For offline tests and speed work only.\n")
    del model
    if device == "cuda":  # give the memory back: the train stage sizes its batches by free GPU memory
        import gc

        gc.collect()
        torch.cuda.empty_cache()


def build_tokenizer():
    """The Mistral v1 tokenizer (32,000 SentencePiece tokens) shipped inside the mistral-common package."""
    import mistral_common
    from transformers import LlamaTokenizer

    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.is_file():
        raise ModelSourceError(f"mistral-common does not ship {path.name}; reinstall mistral-common")
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        shutil.copy(path, Path(d) / "tokenizer.model")
        tok = LlamaTokenizer.from_pretrained(d, legacy=False)
    tok.pad_token = tok.unk_token
    tok.chat_template = ZEPHYR_TEMPLATE
    return tok


def load_tokenizer(path: str, model_cfg, chat_template: str = "auto", token: str | None = None):
    """The tokenizer with a chat template (its own with chat_template=auto, else Zephyr's) and a pad token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, **hub_kwargs(model_cfg, token))
    if chat_template == "chatml":
        if tok.convert_tokens_to_ids("<|im_end|>") in (None, tok.unk_token_id):
            raise ModelSourceError("format.chat_template=chatml needs a tokenizer with the <|im_end|> token")
        tok.chat_template = CHATML_TEMPLATE
    elif chat_template == "zephyr" or not getattr(tok, "chat_template", None):
        tok.chat_template = ZEPHYR_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


def hub_kwargs(model_cfg, token: str | None) -> dict:
    return {"revision": model_cfg.revision, "token": token} if model_cfg.source == "hub" else {}


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


# --------------------------------------------------------------------------------------------- loading for stages
def no_gpu_here() -> bool:
    """True when this Linux machine has no GPU device node (NVIDIA's ``/dev/nvidia<N>``, ROCm's ``/dev/kfd``, WSL's
    ``/dev/dxg``): then CUDA cannot be available, and the CLI's checks need not import torch (1-2 s) to learn it.
    False where it cannot tell (elsewhere, or torch already imported: then torch answers)."""
    import sys

    if not sys.platform.startswith("linux") or "torch" in sys.modules:
        return False
    import glob

    return not (glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd") or os.path.exists("/dev/dxg"))


def resolve_device(device: str) -> str:
    """``training.device`` resolved: auto is CUDA when there is one. Raises ModelSourceError for cuda without CUDA."""
    if device == "cpu":
        return device
    cuda = not no_gpu_here() and _cuda_available()
    if device == "auto":
        return "cuda" if cuda else "cpu"
    if device == "cuda" and not cuda:
        raise ModelSourceError("training.device=cuda but this machine has no usable CUDA device; allowed here: auto, "
                               "cpu")
    return device


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def compute_dtype(quant_cfg, device: str):
    import torch

    if quant_cfg.compute_dtype != "auto":
        return getattr(torch, quant_cfg.compute_dtype)
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def attn_implementation(model_cfg, device: str, training: bool = False, packed: bool = False) -> str:
    """auto: flash-attn 2 when installed; else, on CUDA, for packed rows (padding-free: training with packing, and the
    evaluate stage's scoring) the varlen attention when this torch has its kernel (on flash-attention 4's where
    installed: ``sft_pipeline/varlen.py``; +3.8% over flex on an H200); else, for training, flex attention (a
    block-sparse mask instead of SDPA's dense masked attention: 1.7x faster than SDPA on an H100); else SDPA. ``varlen`` asked for
    explicitly is used for packed rows on CUDA only (generation pads its batches: SDPA)."""
    if model_cfg.attn_implementation == "varlen":
        if not (packed and device == "cuda"):
            return "sdpa"
        from sft_pipeline import varlen

        return varlen.register()
    if model_cfg.attn_implementation != "auto":
        return model_cfg.attn_implementation
    if device == "cuda":
        if flash_attn_2_installed():
            return "flash_attention_2"
        from sft_pipeline import varlen

        if packed and varlen.available():
            return varlen.register()
        if training:
            return "flex_attention"
    return "sdpa"


def flash_attn_2_installed() -> bool:
    """The flash-attn 2 package, by its own module: flash-attention 4 installs only ``flash_attn.cute``, and a bare
    ``import flash_attn`` then succeeds (a namespace package) without flash-attn 2's kernels."""
    import importlib.util

    try:
        return importlib.util.find_spec("flash_attn.flash_attn_interface") is not None
    except (ImportError, ValueError):
        return False


def attn_label(implementation: str) -> str:
    """An attention implementation as the config names it: the varlen kernel is registered with transformers under
    ``varlen.VARLEN`` (a name of our own, not to clash with one of theirs) and shown as ``varlen``."""
    from sft_pipeline import varlen

    return "varlen" if implementation == varlen.VARLEN else implementation


def bnb_config(quant_cfg, dtype, quant_storage: bool = False):
    """bitsandbytes 4-bit settings (nf4 + double quant by default), or None when the base is not quantized.
    ``quant_storage``: store the 4-bit weights in the compute dtype, so FSDP can shard them (FSDP-QLoRA)."""
    if not quant_cfg.load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_cfg.quant_type,
                              bnb_4bit_use_double_quant=quant_cfg.double_quant, bnb_4bit_compute_dtype=dtype,
                              **({"bnb_4bit_quant_storage": dtype} if quant_storage else {}))


def load_model(path: str, model_cfg, quant_cfg, device: str, token: str | None = None, training: bool = False,
               device_index: int = 0, quant_storage: bool = False, packed: bool = False):
    """The base model, 4-bit when configured (bitsandbytes nf4 works on CPU too), on one device.

    ``device_index``: the GPU of this process (its local rank under torchrun); ``packed``: training on packed rows.
    """
    from transformers import AutoModelForCausalLM

    dtype = compute_dtype(quant_cfg, device)
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, quantization_config=bnb_config(quant_cfg, dtype, quant_storage), dtype=dtype,
            device_map={"": device_index if device == "cuda" else "cpu"},
            attn_implementation=attn_implementation(model_cfg, device, training, packed),
            **hub_kwargs(model_cfg, token))
    except (OSError, EnvironmentError) as e:
        if model_cfg.source == "hub":
            from sft_pipeline.errors import explain_hub_error

            raise explain_hub_error(e, f"model {model_cfg.name!r}") from e
        raise


def describe(model_cfg) -> str:
    return f"{model_cfg.name} (random weights, built from a config)" if is_random(model_cfg) else model_cfg.name


def load_tuned(base_path: str, adapter_dir: str | Path, model_cfg, quant_cfg, device: str, token: str | None = None):
    """The base model with the trained LoRA adapter on top, in eval mode."""
    from peft import PeftModel

    base = load_model(base_path, model_cfg, quant_cfg, device, token)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()
