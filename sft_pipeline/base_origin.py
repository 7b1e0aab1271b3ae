"""Where an adapter's base model came from, so that the adapter loads on another machine or after its store moved.

PEFT records ``base_model_name_or_path`` in ``adapter_config.json``: a hub id for a hub model (portable), but an
absolute path for a model built or converted into the store (``<store>/models/<fingerprint>``), which exists only on
the machine that trained it, at that path. The save_adapter stage therefore also writes ``base_model.json``:

- ``source: hub``: ``hub_id`` and ``revision``;
- a base in the store (built with random weights, or converted): ``path`` relative to the adapter directory
  (``../../models/<fingerprint>``: it still resolves when the whole store is copied or moved), the architecture and
  its overrides, ``random_weights``, the sha256 of its weights, and the absolute path it had when trained;
- ``source: local``: the directory's absolute ``path`` (it loads where that directory exists).

``where(adapter_dir)`` answers what ``from_pretrained`` should load; ``snippet(...)`` is the loading code written
into the model card and the README. ``python -m sft_pipeline.base_origin ADAPTER_DIR [STORE]`` prints where the base
is, rebuilding a built base into STORE when it is not next to the adapter any more.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

FILE = "base_model.json"


def origin(model_cfg, base_path: str, adapter_dir: Path, store_root: Path) -> dict:
    """What ``base_model.json`` records. ``adapter_dir``: where the adapter will live (``<store>/save_adapter/<key>``),
    not the temp directory it is written in; ``base_path``: what the stages loaded the base from."""
    if model_cfg.source == "hub":
        return {"source": "hub", "hub_id": model_cfg.name, "revision": model_cfg.revision, "random_weights": False}
    base = Path(base_path).resolve()
    rec: dict = {"source": model_cfg.source, "name": model_cfg.name, "random_weights": model_cfg.source == "build"}
    if store_root.resolve() in base.parents:  # built or converted into the store: move with the store
        rec["path"] = os.path.relpath(base, adapter_dir)
        rec["path_when_trained"] = str(base)
        manifest = base / "manifest.json"
        if manifest.is_file():
            files = json.loads(manifest.read_text()).get("files", {})
            rec["weights_sha256"] = {n: f["sha256"] for n, f in files.items() if n.endswith(".safetensors")}
    else:
        rec["path"] = str(base)
    if model_cfg.source == "build":
        rec["build"] = {"architecture": model_cfg.name, "overrides": dict(model_cfg.build)}
    return rec


def where(adapter_dir: str | Path) -> tuple[str, str | None]:
    """(what ``from_pretrained`` loads: a hub id or a directory, the hub revision or None)."""
    adapter = Path(adapter_dir)
    rec = json.loads((adapter / FILE).read_text())
    if rec["source"] == "hub":
        return rec["hub_id"], rec.get("revision")
    return str((adapter / rec["path"]).resolve()), None  # a relative path resolves against the adapter, not the cwd


def rebuild(adapter_dir: str | Path, store: str | Path) -> str:
    """A built base that is not next to the adapter any more: built again into ``store`` (same seed), and its
    weights checked against the sha256 recorded at training time. Returns its directory."""
    from sft_pipeline.config import ModelConfig
    from sft_pipeline.errors import StageFailure
    from sft_pipeline.models import base_model_path
    from sft_pipeline.store import Store

    rec = json.loads((Path(adapter_dir) / FILE).read_text())
    if rec["source"] != "build":
        raise StageFailure(f"{FILE}: the base came from source={rec['source']!r}; only a built base can be rebuilt")
    cfg = ModelConfig(source="build", name=rec["build"]["architecture"], build=rec["build"]["overrides"])
    path = Path(base_model_path(cfg, Store(store)))
    files = json.loads((path / "manifest.json").read_text())["files"]
    for name, sha in rec.get("weights_sha256", {}).items():
        if files.get(name, {}).get("sha256") != sha:
            raise StageFailure(f"rebuilt {rec['build']['architecture']} into {path}, but its {name} differs from the "
                               "base the adapter was trained on (built on another device or torch version)")
    return str(path)


def snippet(adapter: str = "<this directory>", prompt: str = "What colour is the sky?") -> str:
    """Python that loads the adapter on its base from any working directory and generates one reply."""
    return f'''import json
from pathlib import Path

from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

adapter = Path("{adapter}")
base = json.loads((adapter / "base_model.json").read_text())  # where the base came from
if base["source"] == "hub":
    model = AutoModelForCausalLM.from_pretrained(base["hub_id"], revision=base["revision"], dtype="auto")
else:  # a path relative to the adapter (a base built into the same store) or absolute (a local directory)
    model = AutoModelForCausalLM.from_pretrained(adapter / base["path"], dtype="auto")
model = PeftModel.from_pretrained(model, adapter).eval()
tokenizer = AutoTokenizer.from_pretrained(adapter)  # saved with the adapter, chat template included

messages = [{{"role": "user", "content": "{prompt}"}}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
out = model.generate(**inputs.to(model.device), max_new_tokens=64, do_sample=False,
                     pad_token_id=tokenizer.pad_token_id)
print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
'''


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m sft_pipeline.base_origin ADAPTER_DIR [STORE]\n"
              "prints what to load the adapter's base from; a built base no longer next to the adapter is rebuilt "
              "into STORE (default: $SFT_PIPELINE_STORE or ~/.cache/sft-pipeline)")
        return 0
    from sft_pipeline.store import default_store

    name, revision = where(argv[0])
    rec = json.loads((Path(argv[0]) / FILE).read_text())
    if rec["source"] != "hub" and not Path(name).is_dir():
        if rec["source"] != "build":
            print(f"error: the base directory {name} does not exist here", file=sys.stderr)
            return 1
        name = rebuild(argv[0], argv[1] if len(argv) > 1 else default_store())
    print(name + (f" (revision {revision})" if revision else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
