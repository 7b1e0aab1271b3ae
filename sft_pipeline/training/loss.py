"""The LM head and loss of a training step: trl's, trl's without its per-token metrics (``lean``), or Liger's fused
linear cross-entropy (``liger``); the same loss either way."""
from __future__ import annotations


def fast_loss(trainer_cls, head: str):
    """The trainer, with the LM head and loss ``head`` asks for.

    trl 1.16 scores every micro-batch with a chunked LM head that also computes each token's entropy and whether
    it is the top-1 guess, and reads both back to the host (two device syncs per micro-batch) for its metrics.
    ``trl``: as trl does. ``lean``: trl's chunked head computing the log-probabilities alone, no syncs.
    ``liger``: Liger's fused linear cross-entropy (never forms the logits; its gradient is computed in the forward).
    The loss is the same sum over labelled tokens divided by the tokens of the whole effective batch.
    """
    if head == "trl":
        return trainer_cls

    class FastLoss(trainer_cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            import torch

            if not model.training:  # evaluation wants trl's outputs (and metrics); it is not the hot path
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            labels = inputs["labels"]
            n = (labels[:, 1:] != -100).sum() if num_items_in_batch is None else num_items_in_batch
            n = torch.as_tensor(n, device=labels.device).clamp(min=1)
            loss = _liger_sum(self, model, inputs) / n if head == "liger" else _lean_sum(model, inputs) / n
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            if self.model.training and "position_ids" in inputs:  # trl's num_tokens metric, no device sync
                self._total_train_tokens += inputs["position_ids"].size(1)
                self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            return (loss, None) if return_outputs else loss

    if head == "lean":
        FastLoss.__init__ = _lean_init(trainer_cls)
    return FastLoss


def _liger_sum(trainer, model, inputs):
    """The summed cross-entropy of the labelled tokens, by Liger's fused kernel on the final hidden states."""
    import torch
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    labels = inputs["labels"]
    rest = {k: v for k, v in inputs.items() if k != "labels"}
    # the forward goes through ``model`` as given (under DDP its wrapper, which syncs the gradients; calling the
    # inner model would skip that), with the LM head out of it for this call: the "logits" it returns are the final
    # hidden states, and the fused loss applies the head's weight
    base = trainer.accelerator.unwrap_model(model).get_base_model()
    head_layer = base.lm_head
    base.lm_head = torch.nn.Identity()
    try:
        # (accelerate's mixed precision returns a wrapped model's outputs in float32)
        hidden = model(**rest, use_cache=False).logits[:, :-1].to(head_layer.weight.dtype)
    finally:
        base.lm_head = head_layer
    flce = LigerFusedLinearCrossEntropyLoss(reduction="sum")
    return flce(head_layer.weight, hidden.reshape(-1, hidden.size(-1)), labels[:, 1:].reshape(-1))


def _lean_sum(model, inputs):
    """The summed negative log-probabilities of the labelled tokens, by trl's chunked head (``_lean_init``)."""
    out = model(**inputs, use_cache=False, fused_lm_head=True)
    # summed in float32: under FSDP's bf16 mixed precision the log-probs come in bf16, and a bf16 sum over a packed
    # micro-batch rounds the logged loss to coarse steps (BENCHMARKS.md, "Issue 15")
    return -out.log_probs.float().sum()


def _lean_init(trainer_cls):
    def __init__(self, *args, **kwargs):
        from trl.trainer.utils import add_fused_lm_head

        trainer_cls.__init__(self, *args, **kwargs)
        # trl patched the base model's forward to compute entropy and top-1 too; patch it again for log-probs alone
        # (the fused path never calls the forward it wraps, so the two patches do not stack)
        add_fused_lm_head(self.model.get_base_model(), outputs=("log_probs",))

    return __init__
