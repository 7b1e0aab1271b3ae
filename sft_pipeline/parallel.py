"""Data-parallel settings, no process started here: how many ranks, each rank's batch, the DDP/FSDP arguments.

Shared by ``trainer.build_trainer`` (the per-rank batch, the arguments) and ``launch`` (which starts the ranks).
"""
from __future__ import annotations

import logging
from pathlib import Path

from sft_pipeline.errors import StageFailure

log = logging.getLogger("sft_pipeline.train")


def resolve_num_processes(num_processes: int | str, device: str, effective_batch: int | None = None,
                          logger=None) -> int:
    """``auto``: one process per visible GPU (``CUDA_VISIBLE_DEVICES`` counts), one on CPU.

    With ``effective_batch`` given, ``auto`` takes the most GPUs that divide it (3 GPUs, effective batch 16: 2), and
    says so through ``logger``; an explicit N is checked by the config already.
    """
    if num_processes != "auto":
        return int(num_processes)
    if device != "cuda":
        return 1
    import torch

    gpus = max(torch.cuda.device_count(), 1)
    n = max(d for d in range(1, gpus + 1) if not effective_batch or effective_batch % d == 0)
    if n < gpus and logger is not None:
        logger.warning("train: training.num_processes=auto uses %d of the %d visible GPUs (%d does not divide the "
                       "effective batch %d; set training.gradient_accumulation_steps so that it does)", n, gpus, gpus,
                       effective_batch)
    return n


def split_batch(plan: dict, world_size: int) -> dict:
    """The per-rank micro-batch and accumulation: micro x accumulation x world = the recipe's effective batch.

    The micro-batch stays at most the planned one (what fits one device) and divides the rank's share.
    """
    effective = plan["effective_batch"]
    if effective % world_size:
        raise StageFailure(f"training.num_processes={world_size} must divide the effective batch ({effective} = "
                           "per_device_batch_size x gradient_accumulation_steps)")
    share = effective // world_size
    micro = max(d for d in range(1, share + 1) if share % d == 0 and d <= max(plan["per_device_batch_size"], 1))
    return {**plan, "per_device_batch_size": micro, "gradient_accumulation_steps": share // micro,
            "world_size": world_size}


def most_cautious(plans: list[dict]) -> dict:
    """The plan that needs the least memory: the smallest micro-batch, then the most layers checkpointed."""
    def need(p: dict):
        layers = p.get("checkpointed_layers") or (10**6 if p.get("gradient_checkpointing") else 0)
        return p["per_device_batch_size"], -layers

    return min(plans, key=need)


def agree_plan(plan: dict) -> dict:
    """Every rank's batch plan gathered; all return the most cautious one (the same on every rank).

    Each rank plans from its own GPU's memory; on unevenly loaded GPUs ranks could choose different micro-batches
    and so different accumulation counts, and then wait for each other at a collective for ever. A no-op without
    an initialized process group.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return plan
    plans: list = [None] * dist.get_world_size()
    dist.all_gather_object(plans, plan)
    chosen = most_cautious(plans)
    if any(p["per_device_batch_size"] != chosen["per_device_batch_size"] for p in plans):
        log.warning(
            "ranks planned different micro-batches (%s): every rank takes %d x accumulation %d",
            ", ".join(f"rank {k}: {p['per_device_batch_size']}" for k, p in enumerate(plans)),
            chosen["per_device_batch_size"], chosen["gradient_accumulation_steps"])
    return {**chosen, "rank_plans": [p["per_device_batch_size"] for p in plans]}


def parallel_args(strategy: str, collective_timeout_minutes: float, world_size: int, device: str) -> dict:
    """SFTConfig arguments for data parallelism (empty for one process)."""
    if world_size <= 1:
        return {}
    args = {"ddp_timeout": int(collective_timeout_minutes * 60), "ddp_backend": "nccl" if device == "cuda" else "gloo",
            # LoRA uses every trainable weight in every step: skip DDP's search for unused ones (a full graph walk)
            "ddp_find_unused_parameters": False}
    if strategy == "fsdp":
        # peft's FSDP-QLoRA recipe (examples/sft/configs/fsdp_config_qlora.yaml), without CPU offload (speed), and
        # with every rank loading its own copy (device_map {"": local_rank}), so no sync of module states is needed.
        # The 4-bit weights are stored in the compute dtype (load_model(quant_storage=True)) so FSDP can shard them.
        args.update(fsdp="full_shard auto_wrap", fsdp_config={
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "backward_prefetch": "backward_pre",
            "forward_prefetch": False, "use_orig_params": False, "offload_params": False,
            "cpu_ram_efficient_loading": False, "sync_module_states": False, "state_dict_type": "SHARDED_STATE_DICT"})
    return args


def checkpoint_world_size(ckpt: str | Path | None) -> int | None:
    """How many processes wrote a Trainer checkpoint: one RNG state file per rank (``rng_state_<k>.pth``)."""
    if not ckpt:
        return None
    per_rank = list(Path(ckpt).glob("rng_state_*.pth"))
    return len(per_rank) if per_rank else 1
