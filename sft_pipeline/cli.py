"""``sft-pipeline``: run the fine-tune flow from a recipe.

    sft-pipeline run [--recipe tiny|NAME|PATH.yaml] [--set section.key=value ...] [--store DIR]
                     [--summary-json PATH]
    sft-pipeline plan  (same options): which stages a run would reuse or compute, and why; runs nothing

Exit codes: 0 done, 1 a stage failed (its message is printed), 2 bad config or arguments (before any stage runs).
A killed or failed run resumes when the same command runs again (finished stages are reused, training continues
from its last checkpoint).
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sft-pipeline", description="QLoRA fine-tuning as a Prefect flow of cached stages")
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--recipe", default="tiny", help="recipe name or path to a recipe YAML (default: tiny)")
    common.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config field; repeatable")
    common.add_argument("--store", default=None,
                        help="artifact store directory (default: $SFT_PIPELINE_STORE or ~/.cache/sft-pipeline)")
    common.add_argument("--summary-json", default=None, help="write the run summary (per-stage state, seconds, "
                                                             "artifacts, eval metrics, adapter path) here; for "
                                                             "plan: the plan")
    sub.add_parser("run", parents=[common], help="run the seven stages (finished ones are reused)")
    sub.add_parser("plan", parents=[common], help="say which stages a run would reuse or compute, and why; "
                                                  "runs nothing")
    sub.add_parser("recipes", help="list the built-in recipes")
    return p


def _quiet_env() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # the temporary server's first start (database migrations) can take over the default 20 s on a busy machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")


def _print_summary(summary: dict) -> None:
    print(f"\n{'stage':<14}{'state':<11}{'seconds':>8}  artifact")
    for name, rec in summary["stages"].items():
        print(f"{name:<14}{rec['state']:<11}{rec['seconds']:>8.1f}  {rec.get('artifact', rec.get('error', ''))}")
    if "eval" in summary:
        ev = summary["eval"]
        print(f"\neval loss: base {ev['base']['eval_loss']:.4f} -> tuned {ev['tuned']['eval_loss']:.4f} "
              f"(perplexity {ev['base']['perplexity']:.1f} -> {ev['tuned']['perplexity']:.2f})")
    for fb in summary.get("train", {}).get("oom_fallbacks", []):
        print(f"training ran out of memory at step {fb['at_step']}: micro-batch {fb['from']['per_device_batch_size']}"
              f" x accumulation {fb['from']['gradient_accumulation_steps']} -> {fb['to']['per_device_batch_size']} x "
              f"{fb['to']['gradient_accumulation_steps']} (same effective batch)")
    if "adapter" in summary:
        print(f"adapter: {summary['adapter']}")


def _plan(args) -> int:
    from flows.sft import stages
    from sft_pipeline.config import load_config
    from sft_pipeline.plan import Planner, print_plan, write_plan
    from sft_pipeline.store import Store, default_store

    cfg = load_config(args.recipe, args.overrides)
    planner = Planner(Store(args.store or default_store()), cfg)
    stages(cfg, planner)
    print_plan(planner.steps)
    if args.summary_json:
        write_plan(planner.steps, args.summary_json)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from sft_pipeline.config import ConfigError, load_config, recipe_names

    if args.command == "recipes":
        print("\n".join(recipe_names()))
        return 0
    try:
        load_config(args.recipe, args.overrides)  # fail fast, before Prefect starts
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    _quiet_env()
    if args.command == "plan":
        return _plan(args)
    from flows.sft import sft
    from sft_pipeline.caching import StageFailure

    try:
        summary = sft(recipe=args.recipe, overrides=args.overrides, store=args.store, summary_json=args.summary_json)
    except (StageFailure, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, ConfigError) else 1)
    except Exception as e:  # noqa: BLE001 - a stage failed after its retries: say which, not a stack trace
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
    _print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
