"""Stage 4 — train: QLoRA with trl's SFTTrainer on the token ids of the format stage.

The base model is loaded 4-bit (bitsandbytes nf4, double quant; it works on CPU too), LoRA is added by peft,
attention is flash-attn when importable, else SDPA (flex attention for training on CUDA). Trainer checkpoints go to
the stage's work dir (``<store>/.work/train/<key>``) every ``training.save_steps`` steps and every
``training.save_minutes`` minutes, keeping the last ``training.save_total_limit``; a rerun after a crash resumes from
the last complete one (optimizer, scheduler, RNG and data order restored; a checkpoint cut short by a kill is
skipped). CUDA out of memory: training restarts from the last checkpoint at half the micro-batch with twice the
gradient accumulation (same effective batch), down to a micro-batch of 1; the fallback is kept in the work dir for
reruns and reported in ``train_metrics.json``. W&B logs when ``tracking.backend: wandb`` (offline without a key).

Speed on CUDA, by default (``training.auto_batch``): the micro-batch is made as large as free GPU memory allows
without gradient checkpointing, and gradient accumulation shrinks to keep the recipe's effective batch; Liger
kernels when installed; fused AdamW; no fp32 upcast of the frozen bf16 weights. ``build_trainer`` is what
``bench/`` times.
"""
from __future__ import annotations

import json
import os

from sft_pipeline.caching import current_key, stage_task
from sft_pipeline.config import LoraSection, ModelConfig, QuantizationConfig, TrackingConfig, TrainingConfig
from sft_pipeline.store import ArtifactRef, Store
from sft_pipeline.trainer import save_trained, train_until_done

@stage_task("train", retries=1, ignore=("model", "auth", "tracking"))
def train(store: str, chats: ArtifactRef, train_split: str, test_split: str, model: ModelConfig, base: str,
          model_settings: dict, quantization: QuantizationConfig, lora: LoraSection, training: TrainingConfig,
          max_length: int, auth: ArtifactRef, tracking: TrackingConfig) -> ArtifactRef:
    """Fine-tune LoRA adapters; resume from the last checkpoint in the work dir when there is one.

    ``base`` is the base model's fingerprint and ``model_settings`` the model fields that change training
    (attention implementation): the key does not depend on where secrets or logs go.
    """
    import datasets
    from prefect import get_run_logger
    from transformers import AutoTokenizer

    from sft_pipeline.models import base_model_path, resolve_device
    from sft_pipeline.secrets import hf_token_for, wandb_key

    st = Store(store)
    key = current_key()
    work = st.work_dir("train", key)
    device = resolve_device(training.device)
    token = hf_token_for(auth, model)
    tok = AutoTokenizer.from_pretrained(str(chats.file("tokenizer")))
    train_ds = datasets.Dataset.from_parquet(str(chats.file(f"{train_split}.parquet")))
    eval_ds = datasets.Dataset.from_parquet(str(chats.file(f"{test_split}.parquet")))

    report_to = "none"
    if tracking.backend == "wandb":
        from sft_pipeline.config import AuthConfig

        auth_record = auth.read_json("auth.json")
        key_value = wandb_key(AuthConfig.model_validate(auth_record["config"]))
        if key_value:
            os.environ["WANDB_API_KEY"] = key_value
        os.environ["WANDB_MODE"] = auth_record.get("wandb_mode") or "offline"
        os.environ["WANDB_DIR"] = str(st.work_dir("wandb", key))
        os.environ["WANDB_PROJECT"] = tracking.project
        report_to = "wandb"

    from sft_pipeline.launch import TOKEN_ENV, multinode_from_env, rank_job, resolve_num_processes, run_ranks

    nproc = resolve_num_processes(training.num_processes, device)
    if nproc > 1 or multinode_from_env()["nnodes"] > 1:  # torchrun; rank 0 writes the files into the temp dir
        metrics: dict = {}
        with st.write("train", key, inputs={"lora": lora.model_dump(), "training": training.model_dump()},
                      metrics=metrics) as tmp:
            metrics.update(run_ranks(rank_job(
                train=chats.file(f"{train_split}.parquet"), eval=chats.file(f"{test_split}.parquet")
                if training.eval_strategy != "no" else None, tokenizer=chats.file("tokenizer"),
                model_path=base_model_path(model, st, token), model=model, quantization=quantization, lora=lora,
                training=training, max_length=max_length, work=work, out=tmp, device=device, report_to=report_to,
                run_name=tracking.run_name or f"sft-{key[:8]}"), nproc, get_run_logger(),
                env={TOKEN_ENV: token} if token else None))
        return st.ref("train", key)
    trainer, metrics = train_until_done(
        train_ds, eval_ds if training.eval_strategy != "no" else None, tok, base_model_path(model, st, token),
        model, quantization, lora, training, max_length, work, device, token, report_to,
        tracking.run_name or f"sft-{key[:8]}", logger=get_run_logger())
    with st.write("train", key, inputs={"lora": lora.model_dump(), "training": training.model_dump()},
                  metrics=metrics) as tmp:
        save_trained(trainer, metrics, tmp)
    return st.ref("train", key)
