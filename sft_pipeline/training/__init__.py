"""The train stage's machinery, one job per module. Nothing here knows about the store or Prefect.

- ``job``: ``TrainJob``, everything one training needs (paths and config sections; JSON for the ranks, no secret)
- ``batch``: ``BatchPlan``, micro-batch x accumulation x checkpointing, from the recipe, an estimate or a measured step
- ``cuda``: the process's CUDA settings (growable allocator segments, Liger on its Triton kernels)
- ``lora``: LoRA's glue made cheaper (one dropout mask per input, the adapter added in its GEMM, q/k/v's A as one)
- ``loss``: the LM head and loss (trl's, trl's without its metrics, or Liger's fused cross-entropy)
- ``callbacks``: checkpoints by time and on a stop request, throughput and the estimate, the test fault point
- ``checkpoints``: sealed checkpoints, the newest intact one, resuming in the dtype the adapter trains in
- ``stop``: a process-wide stop request (SIGTERM): checkpoint at the current step, then ``TrainingInterrupted``
- ``fallback``: out of memory: half the micro-batch, twice the accumulation, from the last checkpoint
- ``build``: the SFTTrainer from a TrainJob, in named steps
- ``run``: one training (the local path and every rank call ``run.train``), its metrics, its files

Heavy libraries (torch, transformers, trl, peft) are imported by the modules that use them, never here.
"""
