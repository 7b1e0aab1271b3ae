"""DPO stage 4 — dpo_evaluate: held-out reward accuracy and margins of the DPO model, preference accuracy of both.

Every held-out pair is scored by the SFT model and the DPO model (one base model, the two adapters switched): the
log-probability of each reply given its prompt, summed over the reply's tokens (the preference_format stage's
``chosen_ids`` / ``rejected_ids``, end-of-turn included), with trl's fused LM head as in training. From those:

- **reward accuracy** and **margin** (the DPO model): DPO's implicit reward of a reply is
  ``beta * (log pi_dpo(reply) - log pi_sft(reply))`` (the SFT model is DPO's reference); reward accuracy is the share
  of pairs whose chosen reply gets the higher reward, the margin the mean of chosen minus rejected reward. This is
  trl's ``rewards/accuracies`` and ``rewards/margins``, on held-out pairs. For the SFT model both are 0 by definition
  (its reward against itself is 0 for every reply), so they cannot compare the two models;
- **preference accuracy** (both models, what promotion compares): the share of pairs where the model itself gives the
  chosen reply a higher log-probability than the rejected one (``log pi(chosen) > log pi(rejected)``): for the SFT
  model, how often it already prefers the chosen reply; for the DPO model, how often it does after DPO. Summed over
  the reply's tokens, so a longer reply starts behind: on sets whose chosen replies are much longer (ultrafeedback's
  often are) both models score low, and the comparison between them is what counts.
"""
from __future__ import annotations

import json

from sft_pipeline.stage import StageContext

VERSION = "1"


def reply_logps(model, ds, batch_size: int, pad_id: int, device: str) -> dict[str, list[float]]:
    """Per pair, the summed log-probability of the chosen and of the rejected reply given the prompt, under ``model``
    as it is (its active adapter); the same fused LM head trl trains with (no logits over the vocabulary kept)."""
    import torch

    out: dict[str, list[float]] = {"chosen": [], "rejected": []}
    model.eval()
    for start in range(0, len(ds), batch_size):
        rows = ds[start:start + batch_size]
        for side in ("chosen", "rejected"):
            seqs = [list(p) + list(r) for p, r in zip(rows["prompt_ids"], rows[f"{side}_ids"])]
            width = max(map(len, seqs))
            ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            labels = torch.full((len(seqs), width), -100, dtype=torch.long)
            for i, (s, p) in enumerate(zip(seqs, rows["prompt_ids"])):
                ids[i, :len(s)] = torch.tensor(s)
                mask[i, :len(s)] = 1
                labels[i, len(p):len(s)] = torch.tensor(s[len(p):])  # the reply's tokens only
            with torch.no_grad():
                res = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device),
                            use_cache=False, fused_lm_head=True)
            out[side] += res.log_probs.float().sum(dim=1).cpu().tolist()
    return out


def pair_metrics(sft: dict[str, list[float]], dpo: dict[str, list[float]], beta: float) -> dict:
    """The stage's numbers from the two models' reply log-probabilities (see the module docstring)."""
    n = len(sft["chosen"]) or 1

    def mean(xs) -> float:
        return sum(xs) / n

    rc = [beta * (d - s) for d, s in zip(dpo["chosen"], sft["chosen"])]
    rr = [beta * (d - s) for d, s in zip(dpo["rejected"], sft["rejected"])]

    def prefers(m):
        return mean([float(c > r) for c, r in zip(m["chosen"], m["rejected"])])

    return {
        "dpo": {"reward_accuracy": mean([float(c > r) for c, r in zip(rc, rr)]),
                "reward_margin": mean([c - r for c, r in zip(rc, rr)]),
                "rewards_chosen": mean(rc), "rewards_rejected": mean(rr), "preference_accuracy": prefers(dpo),
                "logps_chosen": mean(dpo["chosen"]), "logps_rejected": mean(dpo["rejected"])},
        "sft": {"reward_accuracy": 0.0, "reward_margin": 0.0, "preference_accuracy": prefers(sft),
                "logps_chosen": mean(sft["chosen"]), "logps_rejected": mean(sft["rejected"])},
    }


def run(ctx: StageContext) -> dict:
    import datasets
    from peft import PeftModel
    from transformers import AutoTokenizer
    from trl.trainer.utils import add_fused_lm_head

    from sft_pipeline.models import load_model

    cfg, pairs = ctx.cfg, ctx.upstream["preference_format"]
    split, evaluation = cfg.preference_data.test_split, cfg.dpo_evaluation
    ds = datasets.Dataset.from_parquet(str(pairs.file(f"{split}.parquet")))
    if evaluation.max_samples:
        ds = ds.select(range(min(evaluation.max_samples, len(ds))))
    sft_dir = ctx.upstream["save_adapter"].path
    tok = AutoTokenizer.from_pretrained(sft_dir)
    base = load_model(ctx.base_model(), cfg.model, cfg.quantization, ctx.device, ctx.hf_token)
    add_fused_lm_head(base)  # before peft wraps it, as trl does
    model = PeftModel.from_pretrained(base, sft_dir, adapter_name="sft")
    model.load_adapter(str(ctx.upstream["dpo_train"].file("adapter")), adapter_name="dpo")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    scores = {}
    for name in ("sft", "dpo"):
        model.set_adapter(name)
        scores[name] = reply_logps(model, ds, evaluation.batch_size, pad, ctx.device)
    metrics = {"split": split, "pairs": len(ds), "beta": cfg.dpo_training.beta,
               **pair_metrics(scores["sft"], scores["dpo"], cfg.dpo_training.beta)}
    (ctx.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (ctx.out / "pairs.json").write_text(json.dumps(
        [{"sft": {"chosen": sc, "rejected": sr}, "dpo": {"chosen": dc, "rejected": dr}} for sc, sr, dc, dr in
         zip(scores["sft"]["chosen"], scores["sft"]["rejected"], scores["dpo"]["chosen"], scores["dpo"]["rejected"])]))
    return metrics
