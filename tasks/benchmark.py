"""Stage 6 — benchmark: the base model and the tuned one on real benchmarks, with the same settings.

``benchmark.tasks`` names them: ``ifbench`` (instruction following, offline: ``sft_pipeline/benchmarks/ifbench.py``)
and lm-evaluation-harness tasks (``sft_pipeline/benchmarks/harness.py``). The model is loaded as the other stages load
it (4-bit where the recipe says so); the base is the same model with the adapter disabled. Replies are greedy,
generated ``benchmark.batch_size`` prompts at a time (left-padded, shortest prompts together), each at most
``benchmark.max_new_tokens`` tokens. Every score comes with its item count and a 95 % interval.

Written: ``metrics.json`` (per benchmark its scores base and tuned; ``rows``: one per benchmark and score, what the
report, the summary, W&B and promotion read), ``benchmark.png`` (base vs tuned as bars) and, for IFBench,
``ifbench.jsonl`` (each prompt's base and tuned reply and which instructions they followed). With
``tracking.backend: wandb`` the same numbers go to a W&B run of their own (job type ``benchmark``).

The base model's scores do not depend on training: a run that only retrains takes them from the store
(``<store>/benchmark_base/<key>``, one per benchmark: base model, quantization, the benchmark and its settings, the
tokenizer with its chat template, this stage's code and the device), so scheduled retraining scores the base once.
With ``benchmark.tasks: []`` the stage stays in the flow, loads nothing and writes an empty ``metrics.json``.
"""
from __future__ import annotations

import json
import time

from sft_pipeline.stage import StageContext, memo_key

VERSION = "1"
BASE_MEMO = "benchmark_base"  # the store's directory of the base model's scores, shared by runs that only retrain


def base_memo_key(key_parts: dict, name: str, tokenizer: dict, device: str) -> str | None:
    """What the base model's scores on benchmark ``name`` depend on: this stage's key parts without the adapter and
    without the other benchmarks listed (base model, quantization, the benchmark settings, ``name`` and its package
    version or local files), the tokenizer's files (chat template included) and the device. None without key parts
    (called outside the flow)."""
    if not key_parts:
        return None
    from sft_pipeline.benchmarks import harness, ifbench

    config = key_parts["config"]
    sources = config["benchmark.sources"]
    package = ifbench.PACKAGE if name == ifbench.NAME else "lm_eval"
    own = {"model": config["model"], "quantization": config["quantization"],
           "benchmark": {k: v for k, v in config["benchmark"].items() if k != "tasks"},
           "version": sources["versions"].get(package), "files": sources["files"].get(name)}
    return memo_key(BASE_MEMO, {**key_parts, "config": own}, benchmark=name, tokenizer=tokenizer, device=device,
                    local=harness.is_local(name))


def _tokenizer_fingerprint(ctx: StageContext) -> dict:
    chats = ctx.upstream["format"]
    files = ctx.store.manifest(chats)["files"]
    return {name: meta["sha256"] for name, meta in files.items() if name.startswith("tokenizer/")}


def _generate(model, tok, prompts: list[list[int]], bench, device: str) -> list[tuple[str, bool]]:
    """Greedy replies, in the prompts' order; generated shortest prompts first (less padding in each batch)."""
    from sft_pipeline.answers import generate_replies

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = generate_replies(model, tok, [prompts[i] for i in order], device=device, end_token_id=tok.eos_token_id,
                           batch_size=bench.batch_size, max_new_tokens=bench.max_new_tokens, do_sample=False)
    replies: list = [None] * len(prompts)
    for i, reply in zip(order, out):
        replies[i] = reply
    return replies


def _ifbench(ctx: StageContext, model, tok, base: dict | None) -> tuple[dict, dict, list[dict]]:
    """IFBench's scores for tuned and base (``base``: kept from an earlier run); returns (result, the base's part to
    keep, one record per prompt for ifbench.jsonl)."""
    from sft_pipeline.benchmarks import ifbench

    bench = ctx.cfg.benchmark
    chosen = ifbench.prompts(bench.limit)
    rows = chosen["rows"]
    ids = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                   tokenize=True, return_dict=True)["input_ids"] for r in rows]

    def scored(label: str) -> dict:
        t0 = time.perf_counter()
        replies = _generate(model, tok, ids, bench, ctx.device)
        seconds = time.perf_counter() - t0
        result = ifbench.score(rows, [text for text, _ in replies])
        ctx.log.info("benchmark: ifbench %s: %d prompts in %.0f s, prompt-level strict %.1f %%", label, len(rows),
                     seconds, 100 * result["metrics"][ifbench.PRIMARY]["value"])
        return {**result, "replies": [text for text, _ in replies],
                "cut_short": sum(not ended for _, ended in replies) / max(len(rows), 1), "seconds": round(seconds, 1)}

    tuned = scored("tuned")
    if base is None:
        with model.disable_adapter():
            base = scored("base")
    records = [{"key": r["key"], "prompt": r["prompt"], "instructions": r["instruction_id_list"],
                "base": {"reply": b, **{m: pb[m] for m in ("strict", "loose")}},
                "tuned": {"reply": t, **{m: pt[m] for m in ("strict", "loose")}}}
               for r, b, t, pb, pt in zip(rows, base["replies"], tuned["replies"], base["per_prompt"],
                                          tuned["per_prompt"])]
    summary = {k: v for k, v in chosen.items() if k != "rows"}
    result = {"items": len(rows), "unit": "prompts", **summary, "primary": ifbench.PRIMARY,
              "labels": ifbench.METRICS, "units": ifbench.UNITS, "max_new_tokens": bench.max_new_tokens,
              "base": _public(base), "tuned": _public(tuned)}
    return result, base, records


def _public(scored: dict) -> dict:
    """A model's part of a benchmark's result in metrics.json: its scores and counts, not every reply."""
    return {k: v for k, v in scored.items() if k not in ("replies", "per_prompt")}


def _harness(ctx: StageContext, model, tok, name: str, base: dict | None) -> tuple[dict, dict]:
    """One lm-eval task (or group): tuned and base scores; returns (result, the base's part to keep)."""
    from sft_pipeline.benchmarks import harness

    bench = ctx.cfg.benchmark

    def scored(label: str) -> dict:
        t0 = time.perf_counter()
        scores = harness.evaluate(model, tok, [name], limit=bench.limit, batch_size=bench.batch_size,
                                  max_new_tokens=bench.max_new_tokens)
        seconds = time.perf_counter() - t0
        ctx.log.info("benchmark: %s %s: %s in %.0f s", name, label,
                     ", ".join(f"{t} {s['items']} items" for t, s in scores.items()), seconds)
        return {"tasks": scores, "seconds": round(seconds, 1)}

    tuned = scored("tuned")
    if base is None:
        with model.disable_adapter():
            base = scored("base")
    tasks = {}
    for task, result in tuned["tasks"].items():
        metrics = list(result["metrics"])
        primary = next((m for m in ("acc_norm", "acc", "exact_match") if m in metrics), metrics[0])
        tasks[task] = {"items": result["items"], "unit": "items", "primary": primary,
                       "base": {"metrics": base["tasks"].get(task, {}).get("metrics", {})},
                       "tuned": {"metrics": result["metrics"]}}
    return {"tasks": tasks, "base_seconds": base["seconds"], "tuned_seconds": tuned["seconds"]}, base


def rows(benchmarks: dict) -> list[dict]:
    """One row per benchmark and score, base vs tuned: what the report, the summary, W&B and promotion read."""
    out = []
    for name, result in benchmarks.items():
        for label, part in (result.get("tasks") or {name: result}).items():
            names, units = part.get("labels", {}), part.get("units", {})
            for metric, tuned in part["tuned"]["metrics"].items():
                base = part["base"]["metrics"].get(metric)
                if base is None:
                    continue
                out.append({"benchmark": label, "metric": metric, "label": names.get(metric, metric),
                            "primary": metric == part["primary"], "items": tuned["n"],
                            "unit": units.get(metric, part["unit"]),
                            "base": base["value"], "tuned": tuned["value"], "delta": tuned["value"] - base["value"],
                            "base_ci": base["ci"], "tuned_ci": tuned["ci"], "interval": tuned["interval"]})
    return out


def run(ctx: StageContext) -> dict:
    bench = ctx.cfg.benchmark
    if not bench.tasks:
        # said in the report and metrics.json; the terminal keeps its promised lines (a start and an end line)
        ctx.log.debug("benchmark: no benchmark listed (benchmark.tasks is empty): nothing scored")
        (ctx.out / "metrics.json").write_text(json.dumps({"benchmarks": {}, "rows": []}, indent=2))
        return {"benchmarks": 0}
    from transformers import AutoTokenizer

    from sft_pipeline import report
    from sft_pipeline.benchmarks import ifbench
    from sft_pipeline.models import is_random, load_tuned

    cfg, chats = ctx.cfg, ctx.upstream["format"]
    tok = AutoTokenizer.from_pretrained(str(chats.file("tokenizer")))
    model = load_tuned(ctx.base_model(), ctx.upstream["train"].file("adapter"), cfg.model, cfg.quantization,
                       ctx.device, ctx.hf_token)
    tokenizer = _tokenizer_fingerprint(ctx)
    results, kept_from = {}, {}
    for name in bench.tasks:
        memo = base_memo_key(ctx.key_parts, name, tokenizer, ctx.device)
        kept, when = ctx.store.read_memo(BASE_MEMO, memo) or (None, None)
        if when:
            ctx.log.info("benchmark: %s: the base model's scores kept from %s (same base, settings and tokenizer)",
                         name, when)
            kept_from[name] = when
        if name == ifbench.NAME:
            results[name], base, records = _ifbench(ctx, model, tok, kept)
            with open(ctx.out / "ifbench.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        else:
            results[name], base = _harness(ctx, model, tok, name, kept)
        if when:
            results[name]["base_kept_from"] = when
        else:
            ctx.store.write_memo(BASE_MEMO, memo, base)
    table = rows(results)
    metrics = {"benchmarks": results, "rows": table, "random_weights": is_random(cfg.model),
               "settings": {"limit": bench.limit, "max_new_tokens": bench.max_new_tokens,
                            "batch_size": bench.batch_size, "decoding": "greedy"}}
    png = report.benchmark_png(table)
    (ctx.out / "benchmark.png").write_bytes(png)
    if cfg.tracking.backend == "wandb":
        metrics["wandb"] = _to_wandb(ctx, table, png)
    (ctx.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return {"benchmarks": len(results), **({"base_kept_from": kept_from} if kept_from else {})}


def _to_wandb(ctx: StageContext, table: list[dict], png: bytes) -> dict:
    """The benchmark rows as a W&B run of their own (job type ``benchmark``, named after the flow run like the
    training run): a summary value per benchmark, score and model, a table and the chart. Returns where to see it
    (online) or how to upload it (offline)."""
    import io

    import wandb
    from PIL import Image

    from sft_pipeline.secrets import wandb_mode

    tracking, key = ctx.cfg.tracking, ctx.secret("wandb_key")
    mode = wandb_mode(tracking.mode, "key" if key else None)
    name = f"{tracking.run_name or ctx.run_label or 'sft'}-benchmark-{ctx.key[:8]}"
    run = wandb.init(project=tracking.project, name=name, job_type="benchmark", mode=mode,
                     dir=str(ctx.store.work_dir("wandb", ctx.key)), reinit="finish_previous",
                     config={"prefect_flow_run": ctx.run_label, "stage_key": ctx.key,
                             "train_artifact": ctx.upstream["train"].key},
                     settings=wandb.Settings(api_key=key) if key and mode == "online" else None)
    try:
        for r in table:
            prefix = f"benchmark/{r['benchmark']}/{r['metric']}"
            run.summary.update({f"{prefix}/base": r["base"], f"{prefix}/tuned": r["tuned"],
                                f"{prefix}/delta": r["delta"], f"{prefix}/items": r["items"]})
        columns = ["benchmark", "metric", "items", "base", "tuned", "delta", "base_ci", "tuned_ci"]
        run.log({"benchmarks": wandb.Table(columns=columns, data=[[r[c] if "ci" not in c else str(r[c])
                                                                     for c in columns] for r in table]),
                 "benchmark_chart": wandb.Image(Image.open(io.BytesIO(png)))})
        if run.settings.mode == "online" and run.url:
            return {"url": run.url}
        return {"sync_command": f"wandb sync {run.dir.removesuffix('/files')}"}
    finally:
        run.finish()
