"""``sft-pipeline``: run the fine-tune flow from a recipe.

    sft-pipeline run [--recipe tiny|NAME|PATH.yaml] [--set section.key=value ...] [--store DIR]
                     [--summary-json PATH]

Exit codes: 0 done, 1 a stage failed (its message is printed), 2 bad config or arguments (before any stage runs).
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sft-pipeline", description="QLoRA fine-tuning as a Prefect flow of cached stages")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the seven stages (finished ones are reused)")
    run.add_argument("--recipe", default="tiny", help="recipe name or path to a recipe YAML (default: tiny)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override a config field; repeatable")
    run.add_argument("--store", default=None,
                     help="artifact store directory (default: $SFT_PIPELINE_STORE or ~/.cache/sft-pipeline)")
    run.add_argument("--summary-json", default=None, help="write the run summary (per-stage state, seconds, "
                                                          "artifacts, eval metrics, adapter path) here")
    sub.add_parser("recipes", help="list the built-in recipes")
    return p


def _quiet_env() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # the temporary server can take more than Prefect's default 20 s to start on a busy 2-core machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _print_summary(summary: dict) -> None:
    print(f"\n{'stage':<14}{'state':<11}{'seconds':>8}  artifact")
    for name, rec in summary["stages"].items():
        print(f"{name:<14}{rec['state']:<11}{rec['seconds']:>8.1f}  {rec.get('artifact', rec.get('error', ''))}")
    if "eval" in summary:
        ev = summary["eval"]
        print(f"\neval loss: base {ev['base']['eval_loss']:.4f} -> tuned {ev['tuned']['eval_loss']:.4f} "
              f"(perplexity {ev['base']['perplexity']:.1f} -> {ev['tuned']['perplexity']:.2f})")
    if "adapter" in summary:
        print(f"adapter: {summary['adapter']}")
    for split, st in summary["stages"].get("data", {}).get("splits", {}).items():
        if st["invalid"]:
            reasons = ", ".join(f"{n} {why}" for why, n in st["invalid_reasons"].items())
            print(f"data: dropped {st['invalid']} invalid rows of split {split} ({reasons})")


def _stop_prefect() -> None:
    """Flush Prefect's log/event workers and stop its temporary server now (else at exit, after our last line)."""
    try:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker
        from prefect.server.api.server import SubprocessASGIServer

        APILogWorker.drain_all(timeout=5)
        EventsWorker.drain_all()
        SubprocessASGIServer().stop()
    except Exception:  # noqa: BLE001 - only tidies the output; Prefect stops it at exit anyway
        pass


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from sft_pipeline.config import ConfigError, load_config, recipe_names

    if args.command == "recipes":
        print("\n".join(recipe_names()))
        return 0
    from sft_pipeline import preflight

    try:  # fail fast, before Prefect starts: the schema, then the machine and the inputs the config names
        preflight.check(load_config(args.recipe, args.overrides))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    _quiet_env()
    from flows.sft import sft
    from sft_pipeline.errors import failure_message

    try:
        summary = sft(recipe=args.recipe, overrides=args.overrides, store=args.store, summary_json=args.summary_json)
    except Exception as e:  # noqa: BLE001 - a stage failed (after its retries): say which, not a stack trace
        _stop_prefect()
        print(f"error: {failure_message(e)}", file=sys.stderr)
        sys.exit(2 if isinstance(e, ConfigError) and not hasattr(e, "sft_stage") else 1)  # 2: before any stage
    _stop_prefect()
    _print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
