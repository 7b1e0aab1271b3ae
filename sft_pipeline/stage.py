"""What a stage is, and how one runs: its key, its lock, its artifact. The store is the only cache.

A stage is one row of the stage table (``flows/stages.py``): a name, a function ``run(ctx) -> metrics``, the
stages whose artifacts it reads, the config fields its output depends on, and the code its output depends on.
From those, and nothing else, comes its key::

    key = hash(stage name, code version, the keyed config values, the upstream artifacts' fingerprints)

``execute`` computes the key once, takes the key's lock, and either returns the finished artifact
``<store>/<stage>/<key>`` (reused) or calls the stage with a temp output dir that the store renames into place with
a manifest recording the exact key parts (which ``sft-pipeline plan`` diffs to say why a stage would re-run).

Three keyed entries are facts about the world, not config values, looked up once per run (``Facts``):
``model`` is the base model's content fingerprint (hub id + revision, a local directory's files, a build's
architecture), ``data`` is the data section plus its content fingerprint (the hub commit or the local files'
bytes), ``secrets`` is *where* each secret is found (never a value).

A stage can read only the config fields its row names (``ctx.cfg`` refuses others), so a field that changes the
output cannot be left out of the key by mistake. Fields a stage reads without changing its output (where logs go,
a price for the estimate) are named in ``reads`` and stay out of the key.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel

from sft_pipeline.store import ArtifactRef, Store, digest

FACTS = ("model", "data", "secrets")  # keyed entries that are looked up, not read from the config


@dataclass(frozen=True)
class Stage:
    """One row of the stage table."""

    name: str
    run: Callable[["StageContext"], dict | None]
    needs: tuple[str, ...] = ()  # upstream stages whose artifacts it reads
    keyed: tuple[str, ...] = ()  # config fields (or FACTS) its output depends on: its key
    reads: tuple[str, ...] = ()  # config fields it reads that do not change its output: not in its key
    code: tuple[str, ...] = ()  # its VERSION and the texts it applies (templates): editing one re-runs it
    retries: int = 2  # transient failures only (network, I/O, out of memory); see errors.is_transient

    @property
    def code_version(self) -> str:
        return hashlib.sha256("\0".join(self.code).encode()).hexdigest()[:16]


class Facts:
    """The keyed facts of one run, each looked up at most once (a local data set is hashed once per run)."""

    def __init__(self, cfg, blocks: bool = True, store: Store | None = None):
        self.cfg, self.blocks = cfg, blocks  # blocks=False: env variables only (no Prefect API to ask)
        self.store = store  # where a big file's hash is remembered (a GGUF base)

    @cached_property
    def model(self) -> str:
        from sft_pipeline.models import model_fingerprint

        return model_fingerprint(self.cfg.model, self.store)

    @cached_property
    def data(self) -> str:
        from sft_pipeline.chat_data import source_fingerprint

        return source_fingerprint(self.cfg.data)

    @cached_property
    def secrets(self) -> dict[str, str | None]:
        from sft_pipeline import secrets

        auth = self.cfg.auth

        def where(env: str, block: str) -> str | None:
            return secrets.resolve(env, block if self.blocks else None)[1]

        wandb = where(auth.wandb_key_env, auth.wandb_key_block) if self.cfg.tracking.backend == "wandb" else None
        return {"hf_token": where(auth.hf_token_env, auth.hf_token_block), "wandb_key": wandb}


def _lookup(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _jsonable(value: Any, drop: set[str], prefix: str) -> Any:
    if isinstance(value, BaseModel):
        return {k: _jsonable(getattr(value, k), drop, f"{prefix}.{k}") for k in type(value).model_fields
                if f"{prefix}.{k}" not in drop}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, drop, prefix) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v, drop, prefix) for k, v in value.items()}
    return value


def key_parts(stage: Stage, cfg, upstream: dict[str, ArtifactRef], facts: Facts) -> dict:
    """Exactly what the stage's output depends on (written into its manifest as ``inputs``)."""
    config: dict[str, Any] = {}
    for name in stage.keyed:
        if name == "model":
            config[name] = {"fingerprint": facts.model}
        elif name == "data":
            config[name] = {**_jsonable(cfg.data, set(stage.reads), "data"), "content": facts.data}
        elif name == "secrets":
            config[name] = facts.secrets
        else:
            config[name] = _jsonable(_lookup(cfg, name), set(stage.reads), name)
    return {"stage": stage.name, "code": stage.code_version, "config": config,
            "upstream": {name: upstream[name].fingerprint for name in stage.needs}}


def stage_key(parts: dict) -> str:
    return digest(parts, 24)


def memo_key(name: str, parts: dict, upstream: tuple[str, ...] = (), **extra) -> str | None:
    """The key of a memo a stage keeps beside its artifact (``Store.write_memo``) for a part of its output that does
    not depend on all of its upstream (the base model's numbers do not depend on training): the stage's key
    ``parts`` with only the ``upstream`` named, plus ``extra``. None without key parts (called outside the flow)."""
    if not parts:
        return None
    kept = {n: parts.get("upstream", {}).get(n) for n in upstream}
    return digest({"memo": name, "code": parts.get("code"), "config": parts.get("config"), "upstream": kept,
                   **extra}, 24)


class ConfigView:
    """The config as a stage may see it: only the fields its table row names (keyed or read)."""

    def __init__(self, obj: Any, allowed: frozenset[str], stage: str, prefix: str = ""):
        self._obj, self._allowed, self._stage, self._prefix = obj, allowed, stage, prefix

    def __getattr__(self, name: str) -> Any:
        path = f"{self._prefix}{name}"
        if any(path == a or path.startswith(a + ".") for a in self._allowed):
            return getattr(self._obj, name)
        if any(a.startswith(path + ".") for a in self._allowed):
            return ConfigView(getattr(self._obj, name), self._allowed, self._stage, path + ".")
        raise AttributeError(f"stage {self._stage!r} reads {path}, which its row in the stage table does not name "
                             "(add it to keyed if it changes the output, else to reads)")


@dataclass
class StageContext:
    """What a stage function gets: where to write, its config fields, its upstream artifacts, and helpers."""

    stage: str
    key: str
    cfg: Any  # a ConfigView
    upstream: dict[str, ArtifactRef]
    out: Path  # write the artifact's files here (a temp dir, renamed into place when the stage returns)
    store: Store
    log: logging.Logger | logging.LoggerAdapter
    run_label: str | None = None  # the Prefect flow run's name, for names shown elsewhere (W&B)
    key_parts: dict = field(default_factory=dict)  # what its key was made of (the manifest's inputs)
    _config: Any = field(repr=False, default=None)  # the whole config: for the device and the secrets only

    @property
    def work(self) -> Path:
        """Scratch space that survives a crash (training checkpoints): ``<store>/.work/<stage>/<key>``."""
        return self.store.work_dir(self.stage, self.key)

    def flush_work(self) -> bool:
        """Upload this stage's sealed checkpoints to the object store now (nothing for a local store); True when all
        are there. The end of a stage that raised does it anyway; for code that seals one on its way out."""
        return self.store.flush_work(self.stage, self.key)

    @cached_property
    def device(self) -> str:
        """Where models run (``training.device`` resolved): the same for every stage of a run."""
        from sft_pipeline.models import resolve_device

        return resolve_device(self._config.training.device)

    def secret(self, name: str) -> str | None:
        """``hf_token`` or ``wandb_key``, read now from where the config says (env variable, then Prefect block)."""
        from sft_pipeline import secrets

        auth = self._config.auth
        env, block = {"hf_token": (auth.hf_token_env, auth.hf_token_block),
                      "wandb_key": (auth.wandb_key_env, auth.wandb_key_block)}[name]
        return secrets.resolve(env, block)[0]

    @property
    def hf_token(self) -> str | None:
        """The HF token when the model or the data comes from the hub, else None."""
        cfg = self._config
        return self.secret("hf_token") if "hub" in (cfg.model.source, cfg.data.source) else None

    def base_model(self) -> str:
        """A path or hub id that ``from_pretrained`` accepts (a built or converted model is made once, in the store)."""
        from sft_pipeline.models import base_model_path

        return base_model_path(self.cfg.model, self.store)


class _Forward(logging.Handler):
    def __init__(self, target: logging.Logger | logging.LoggerAdapter):
        super().__init__(logging.INFO)
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        self.target.log(record.levelno, "%s", record.getMessage())


@contextlib.contextmanager
def _package_logs_to(target: logging.Logger | logging.LoggerAdapter):
    """While a stage runs, what the package logs (``sft_pipeline.*``: training settings, the estimate, progress) goes
    to the stage's logger, i.e. Prefect's run logger: the UI shows what the terminal shows. Undone afterwards."""
    pkg = logging.getLogger("sft_pipeline")
    handler, before = _Forward(target), (pkg.level, pkg.propagate)
    pkg.addHandler(handler)
    pkg.setLevel(logging.INFO)
    pkg.propagate = False
    try:
        yield
    finally:
        pkg.removeHandler(handler)
        pkg.setLevel(before[0])
        pkg.propagate = before[1]


def execute(stage: Stage, cfg, store: Store, upstream: dict[str, ArtifactRef], facts: Facts,
            log: logging.Logger | logging.LoggerAdapter, run_label: str | None = None) -> tuple[ArtifactRef, bool]:
    """Reuse the stage's finished artifact or compute it; returns (artifact, reused).

    Under the key's lock (``Store.lock``, released by the kernel even when its holder is SIGKILLed; with an object
    store also a lease there, which expires when its holder stops renewing it): a second run with the same key
    waits here, then finds the artifact and reuses it. With an object store, an artifact this machine lacks is
    downloaded (and the task still shows Cached), a stage's checkpoints are mirrored while it runs
    (``Store.mirror_work``), and its artifact is uploaded, manifest last, before the lock is let go.
    """
    from sft_pipeline import faults

    parts = key_parts(stage, cfg, upstream, facts)
    key = stage_key(parts)

    def waiting(holder: str) -> None:
        log.info("%s: waiting for %s, which is computing %s", stage.name, holder, key)

    if store.remote is not None:  # a finished artifact never changes: reused without taking the lease
        with _package_logs_to(log):
            ref = store.ref(stage.name, key)  # downloaded when only the object store has it
            if ref is not None and store.synced(stage.name, key):
                log.info("%s: reusing the finished artifact %s", stage.name, ref.path)
                return ref, True
    with store.lock(stage.name, key, on_wait=waiting):
        with _package_logs_to(log):
            ref = store.ref(stage.name, key)
            if ref is not None:
                if not store.synced(stage.name, key):  # an upload that failed in an earlier run
                    store.upload(stage.name, key)
                log.info("%s: reusing the finished artifact %s", stage.name, ref.path)
                return ref, True
        log.info("%s: computing %s", stage.name, key)  # the stage's start line (reuse says "reusing" above)
        faults.point(stage.name, "start")
        metrics: dict = {}
        allowed = frozenset(n for n in stage.keyed + stage.reads if n not in ("secrets",))
        with _package_logs_to(log), store.write(stage.name, key, inputs=parts, metrics=metrics) as tmp, \
                store.mirror_work(stage.name, key, log):
            ctx = StageContext(stage=stage.name, key=key, cfg=ConfigView(cfg, allowed, stage.name),
                               upstream={n: upstream[n] for n in stage.needs}, out=tmp, store=store, log=log,
                               run_label=run_label, key_parts=parts, _config=cfg)
            metrics.update(stage.run(ctx) or {})
        store.drop_work(stage.name, key)  # its checkpoints in the object store: the artifact is there now
    return store.ref(stage.name, key), False
