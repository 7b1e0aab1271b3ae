"""The DPO stage table: the stages a DPO run adds after the SFT stages of ``flows/stages.py``. One row a stage.

The rows mean what they mean there (``needs``, ``keyed``, ``reads``, ``code``; see that module's docstring). A DPO
stage may need an SFT stage's artifact (``format``: the tokenizer and template; ``save_adapter``: the SFT adapter,
where DPO starts and its reference). The DPO flow (``flows/dpo.py``), ``sft-pipeline plan`` and the run summary walk
``flows/stages.py``'s table with the SFT recipe's config, then this one with ``DPOStageConfig``.

Changing a field re-runs the first stage that keys on it and every stage after it that reads its artifact: e.g.
``dpo_training.beta`` -> dpo_train, dpo_evaluate, dpo_save_adapter, dpo_generate; an SFT field that re-trains the SFT
adapter -> its SFT stages and every DPO stage from dpo_train on.
"""
from __future__ import annotations

from functools import cached_property

from sft_pipeline import preference
from sft_pipeline.config import DPOPipelineConfig, PipelineConfig
from sft_pipeline.source_hash import source_hash
from sft_pipeline.stage import Stage
from tasks import dpo_evaluate, dpo_generate, dpo_save_adapter, dpo_train, preference_data, preference_format


class DPOStageConfig:
    """The config as the DPO stages read it: the DPO recipe's own fields (``recipe``, ``sft_recipe``, the DPO
    sections), the SFT recipe's sections under their own names (``model``, ``quantization``, ``format``,
    ``training``, ``auth``, ...: the base model, its loading and the device are the SFT run's), and one fact:
    ``preference_content``, the preference data's content fingerprint (the hub commit, the local files' bytes, the
    synthetic set's version), looked up once per run as ``stage.Facts`` looks up the chat data's. The
    preference_data stage keys on it, so new data re-runs it."""

    def __init__(self, cfg: DPOPipelineConfig):
        self.dpo = cfg

    def __getattr__(self, name: str):
        if name == "dpo":  # not set yet (copying or unpickling): no recursion
            raise AttributeError(name)
        if name in PipelineConfig.model_fields and name != "recipe":
            return getattr(self.dpo.sft, name)
        return getattr(self.dpo, name)

    @cached_property
    def preference_content(self) -> str:
        return preference.source_fingerprint(self.dpo.preference_data)


DPO_STAGES: tuple[Stage, ...] = (
    Stage("preference_data", preference_data.run,
          keyed=("preference_data", "preference_content"),
          code=(preference_data.VERSION, preference.SCHEMA_VERSION, str(preference.SYNTHETIC_VERSION))),
    Stage("preference_format", preference_format.run, needs=("format", "preference_data"),
          keyed=("preference_format", "format.system_message", "preference_data.train_split",
                 "preference_data.test_split"),
          code=(preference_format.VERSION,)),
    Stage("dpo_train", dpo_train.run, needs=("save_adapter", "preference_format"),
          keyed=("model", "model.attn_implementation", "quantization", "training.device", "dpo_training",
                 "preference_format.max_length", "preference_data.train_split"),
          reads=("dpo_training.price_per_hour",),  # the cost estimate's price only
          code=(dpo_train.VERSION, source_hash(dpo_train.CODE)), retries=1),
    Stage("dpo_evaluate", dpo_evaluate.run, needs=("save_adapter", "preference_format", "dpo_train"),
          keyed=("model", "quantization", "dpo_training.beta", "dpo_evaluation", "preference_data.test_split"),
          reads=("dpo_evaluation.promotion_margin",),  # the flow's promotion decision, not this stage's output
          code=(dpo_evaluate.VERSION,)),
    Stage("dpo_save_adapter", dpo_save_adapter.run, needs=("save_adapter", "dpo_train", "dpo_evaluate"),
          keyed=("model", "quantization", "preference_data.dataset", "recipe", "sft_recipe"),
          code=(dpo_save_adapter.VERSION,)),
    Stage("dpo_generate", dpo_generate.run, needs=("save_adapter", "dpo_save_adapter"),
          keyed=("model", "quantization", "dpo_generation"),
          code=(dpo_generate.VERSION,)),
)
BY_NAME = {s.name: s for s in DPO_STAGES}
