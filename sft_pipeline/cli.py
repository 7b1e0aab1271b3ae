"""``sft-pipeline``: run the fine-tune flow from a recipe.

    sft-pipeline run [--recipe tiny|NAME|PATH.yaml] [--set section.key=value ...] [--store DIR|URL]
                     [--cache-dir DIR] [--store-block TYPE/NAME] [--summary-json PATH] [--verbose]
    sft-pipeline serve [--name served] [--cron '0 3 * * *'] [--recipe ...] [--set ...] [--store DIR]
    sft-pipeline plan  (same options): which stages a run would reuse or compute, and why; runs nothing

A DPO recipe (one naming an ``sft_recipe``: ``smollm2-135m-dpo``, ``zephyr-7b-dpo-qlora``) runs the DPO flow
(``flows/dpo.py``): its SFT recipe's stages, reused when that recipe ran before, then the DPO stages.

Exit codes: 0 done, 1 a stage failed (its message is printed), 2 bad config or arguments (before any stage runs).
A killed or failed run resumes when the same command runs again (finished stages are reused, training continues
from its last checkpoint).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sft-pipeline", description="QLoRA fine-tuning as a Prefect flow of cached stages")
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--recipe", default="tiny", help="recipe name or path to a recipe YAML (default: tiny)")
    common.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config field; repeatable")
    common.add_argument("--store", default=None,
                        help="artifact store: a directory, or an object-store URL such as s3://bucket/prefix (any "
                             "fsspec URL) that machines share (default: $SFT_PIPELINE_STORE or ~/.cache/sft-pipeline)")
    common.add_argument("--cache-dir", default=None,
                        help="with an object store: this machine's copy of it (default: $SFT_PIPELINE_CACHE or "
                             "~/.cache/sft-pipeline/remote/<hash of the URL>)")
    common.add_argument("--store-block", default=os.environ.get("SFT_PIPELINE_STORE_BLOCK") or None,
                        metavar="TYPE/NAME",
                        help="with an object store: a Prefect block holding its credentials (aws-credentials/NAME, "
                             "minio-credentials/NAME, or s3-bucket/NAME, whose bucket and folder are then the store; "
                             "default: $SFT_PIPELINE_STORE_BLOCK); without it the usual places are read (AWS_* "
                             "variables, ~/.aws)")
    common.add_argument("-v", "--verbose", action="store_true",
                        help="show every library's output (progress bars, Prefect's own lines, library warnings); "
                             "by default a run shows a start and end line per stage, training progress, retries, "
                             "warnings and the summary")
    summary = argparse.ArgumentParser(add_help=False)
    summary.add_argument("--summary-json", default=None, help="write the run summary (per-stage state, seconds, "
                                                              "artifacts, eval metrics, adapter path) here; for "
                                                              "plan: the plan")
    sub.add_parser("run", parents=[common, summary], help="run the stages (finished ones are reused); a DPO "
                                                          "recipe: its SFT recipe's stages, then the DPO stages")
    sub.add_parser("plan", parents=[common, summary], help="say which stages a run would reuse or compute, and "
                                                           "why; runs nothing")
    serve = sub.add_parser("serve", parents=[common], help="serve the flow as a Prefect deployment (runs from the "
                                                           "UI, CLI, schedule); --recipe/--set/--store: defaults")
    serve.add_argument("--name", default="served", help="deployment name (default: served): sft-pipeline/NAME")
    serve.add_argument("--cron", default=None, help="also run on this cron schedule, e.g. '0 3 * * *'")
    sub.add_parser("recipes", help="list the built-in recipes")
    return p


def _flow_parameters(args) -> dict:
    """The flow's parameters from --recipe (a name or a YAML path), --set and --store."""
    from sft_pipeline.config import parse_overrides

    from sft_pipeline.store import is_url

    store = args.store if is_url(args.store) else os.path.abspath(os.path.expanduser(args.store)) if args.store \
        else None
    params: dict = {"overrides": parse_overrides(args.overrides), "store": store}
    if args.cache_dir:
        params["cache_dir"] = os.path.abspath(os.path.expanduser(args.cache_dir))
    if args.store_block:
        params["store_block"] = args.store_block
    if args.recipe.endswith((".yaml", ".yml")) or "/" in args.recipe:
        params["recipe_file"] = str(os.path.abspath(os.path.expanduser(args.recipe)))
    else:
        params["recipe"] = args.recipe
    return params


def _quiet_env() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # the temporary server can take more than Prefect's default 20 s to start on a busy 2-core machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # before anything starts CUDA (the preflight reads the free GPU memory): the train stage's allocator setting
    from sft_pipeline.training.cuda import ALLOC_CONF

    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", ALLOC_CONF)


def _print_summary(summary: dict) -> None:
    w = max([14] + [len(n) + 2 for n in summary["stages"]])  # the DPO stages' names are longer
    print(f"\n{'stage':<{w}}{'state':<11}{'seconds':>8}  artifact")
    for name, rec in summary["stages"].items():
        print(f"{name:<{w}}{rec['state']:<11}{rec['seconds']:>8.1f}  {rec.get('artifact', rec.get('error', ''))}")
    if "eval" in summary:
        ev = summary["eval"]
        print(f"\neval loss: base {ev['base']['eval_loss']:.4f} -> tuned {ev['tuned']['eval_loss']:.4f} "
              f"(perplexity {ev['base']['perplexity']:.1f} -> {ev['tuned']['perplexity']:.2f})")
        if gen := ev.get("generation"):
            print(f"held-out answers correct: base {gen['base']['match']:.0%} -> tuned {gen['tuned']['match']:.0%} "
                  f"({gen['samples']} prompts); replies ending their turn: {gen['tuned']['ends_turn']:.0%}")
    for r in summary.get("benchmark", {}).get("rows", []):  # one line per benchmark: its main score
        if r.get("primary"):
            print(f"benchmark {r['benchmark']} ({r['items']:,} {r.get('unit', 'items')}, {r['label']}): base "
                  f"{100 * r['base']:.1f} % -> tuned {100 * r['tuned']:.1f} % ({100 * r['delta']:+.1f} points; 95 % "
                  f"intervals {100 * r['base_ci'][0]:.0f}-{100 * r['base_ci'][1]:.0f} % and "
                  f"{100 * r['tuned_ci'][0]:.0f}-{100 * r['tuned_ci'][1]:.0f} %)")
    for fb in summary.get("train", {}).get("oom_fallbacks", []):
        print(f"training ran out of memory at step {fb['at_step']}: micro-batch {fb['from']['per_device_batch_size']}"
              f" x accumulation {fb['from']['gradient_accumulation_steps']} -> {fb['to']['per_device_batch_size']} x "
              f"{fb['to']['gradient_accumulation_steps']} (same effective batch)")
    if "adapter" in summary:
        print(f"adapter: {summary['adapter']}")
    if "promotion" in summary:
        p = summary["promotion"]
        print(f"promoted: {'yes' if p['promoted'] else 'no'} ({p['reason']}); pointer: {p['pointer']}")
    for split, st in summary["stages"].get("data", {}).get("splits", {}).items():
        if st["invalid"]:
            reasons = ", ".join(f"{n} {why}" for why, n in st["invalid_reasons"].items())
            print(f"data: dropped {st['invalid']} invalid rows of split {split} ({reasons})")
    if summary.get("promotion", {}).get("diverged"):  # the last line: exit 0, but this adapter is not to be used
        print(f"warning: training diverged ({summary['promotion']['diverged']}); the adapter was not promoted")


def _server_in_own_group() -> None:
    """Start Prefect's temporary server (when no PREFECT_API_URL is set) in its own process group: the fallback
    where ``prefect_server`` could not point this Prefect at the server it started early.

    Ctrl-C signals the terminal's whole process group. In ours, the server got SIGINT too and stopped first; the
    flow then spent ~74 s retrying to report the interrupt to a dead API and ended in ConnectError. In its own
    group only this process sees Ctrl-C; ``_stop_prefect`` (or Prefect's atexit hook) still stops the server, and
    PR_SET_PDEATHSIG stops it when this process is killed outright (it is started from the main thread, which
    lives as long as the process).
    """
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return
    import ctypes
    import signal
    import subprocess
    from unittest import mock

    from prefect.server.api.server import SubprocessASGIServer

    def detach():  # runs in the child between fork and exec
        os.setpgrp()
        try:
            ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: Linux only
        except Exception:  # noqa: BLE001 - elsewhere the atexit hook stops it; a SIGKILLed parent leaves it running
            pass

    popen = subprocess.Popen
    with mock.patch.object(subprocess, "Popen", lambda *a, **kw: popen(*a, preexec_fn=detach, **kw)):
        SubprocessASGIServer().start()


def _this_runs_summary(args) -> dict | None:
    """The summary this process wrote (``--summary-json``, else ``<store>/runs/*-<pid>.json``), or None."""
    from pathlib import Path

    paths = [Path(args.summary_json)] if args.summary_json else sorted(
        (_store(args).root / "runs").glob(f"*-{os.getpid()}.json"))
    try:
        return json.loads(paths[-1].read_text()) if paths and paths[-1].is_file() else None
    except (OSError, ValueError):
        return None


def outcome(exc: BaseException, summary: dict | None) -> tuple[int, str]:
    """Exit code and last line for a run that raised ``exc``; the run summary, when it says Completed, wins.

    A run whose stages all finished and whose summary was written Completed, but whose Prefect server went away
    before the final state was recorded, exits 0 with a warning: the summary and the exit code agree.
    """
    from sft_pipeline.config import ConfigError
    from sft_pipeline.errors import _CONNECTION, failure_message

    lost_server = type(exc).__name__ in _CONNECTION or (
        "prefect" in type(exc).__module__.lower() and "connect" in str(exc).lower())
    if summary and summary.get("status") == "Completed" and lost_server:
        return 0, (f"warning: the run completed (summary: Completed) but Prefect's server could not be reached "
                   f"to record it ({type(exc).__name__}); its Prefect run may show as unfinished")
    code = 2 if isinstance(exc, ConfigError) else 1  # 2: before any stage (a stage's failure is a StageError)
    return code, f"error: {failure_message(exc)}"


class Terminated(BaseException):
    """SIGTERM reached the CLI's own handler: the run stopped (its summary says where; training checkpointed first)."""


def _terminated(signum, frame):
    raise Terminated()


def _stopped_line(summary: dict | None) -> str:
    """The last line of a run stopped by SIGTERM: where, and what the same command resumes from."""
    stopped = (summary or {}).get("stopped") or {}
    where = f" during {stopped['stage']}" if stopped.get("stage") else ""
    resume = stopped.get("resume") or ("run the same command again to resume (finished stages are reused, training "
                                       "continues from its last checkpoint)")
    return f"error: stopped by SIGTERM{where}; {resume}"


def _stop_prefect() -> None:
    """Flush Prefect's log/event workers and stop its temporary server now (else at exit, after our last line)."""
    try:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        from sft_pipeline import prefect_server

        APILogWorker.drain_all(timeout=5)
        EventsWorker.drain_all()
        prefect_server.stop()
        if "prefect.server.api.server" in sys.modules:  # Prefect started its own (prefect_server.connect: False)
            sys.modules["prefect.server.api.server"].SubprocessASGIServer().stop()
    except Exception:  # noqa: BLE001 - only tidies the output; Prefect stops it at exit anyway
        pass


def _store(args):
    """The store the arguments name (a directory, or an object store and this machine's cache of it)."""
    from sft_pipeline.store import Store, default_store

    return Store(args.store or ("" if args.store_block else default_store()), cache_dir=args.cache_dir,
                 block=args.store_block)


def _plan(args, dpo: bool = False) -> int:
    """Predict the run from the stage table and the store alone: no Prefect server is started (unless
    ``--store-block`` names a block to read the object store's credentials from). A DPO recipe: the SFT recipe's
    stages with its config, then the DPO stage table (``flows/dpo_stages.py``)."""
    from flows.stages import STAGES
    from sft_pipeline.config import load_config, load_dpo_config
    from sft_pipeline.plan import estimate, plan, print_plan, write_plan

    store = _store(args)
    if dpo:
        from flows.dpo_stages import DPO_STAGES, DPOStageConfig

        dpo_cfg = load_dpo_config(args.recipe, args.overrides)
        cfg = dpo_cfg.sft
        steps = plan(cfg, store, STAGES, then=[(DPOStageConfig(dpo_cfg), DPO_STAGES)])
    else:
        cfg = load_config(args.recipe, args.overrides)
        steps = plan(cfg, store, STAGES)
    est = estimate(cfg, store, steps)
    print_plan(steps, est=est)
    if args.summary_json:
        write_plan(steps, args.summary_json, est)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from sft_pipeline.config import (ConfigError, dpo_recipe_names, is_dpo_recipe, load_config, read_recipe,
                                     recipe_names, recipe_path)

    if args.command == "recipes":
        dpo = {n: read_recipe(recipe_path(n))['sft_recipe'] for n in dpo_recipe_names()}
        print("\n".join(n + (f"  (DPO after {dpo[n]})" if n in dpo else "") for n in recipe_names()))
        return 0
    from sft_pipeline import prefect_server
    from sft_pipeline.quiet import quiet, quiet_prefect

    if args.command == "run":  # up while this process starts (connected, or stopped, below)
        prefect_server.start()
    _quiet_env()
    quiet(args.verbose)  # before the libraries are imported: progress bars, warnings, library loggers
    from sft_pipeline import preflight
    from sft_pipeline.store import check_paths

    try:  # fail fast, before Prefect starts: the schema, then the machine and the inputs the config names
        # a file, read-only, someone else's dir; an object store's scheme, bucket and credentials (a block's in the
        # flow, where Prefect's API is up to read it from; plan reads it here)
        check_paths(args.store, getattr(args, "summary_json", None), cache_dir=args.cache_dir,
                    block=args.store_block, connect=not args.store_block or args.command == "plan")
        dpo = is_dpo_recipe(args.recipe)  # a DPO recipe runs the DPO flow (flows/dpo.py)
        remember = args.command != "plan"  # plan only reads what the checks measured (preflight/<key>)
        if dpo:
            from sft_pipeline import preference
            from sft_pipeline.config import load_dpo_config

            dpo_cfg = load_dpo_config(args.recipe, args.overrides)
            preflight.check(dpo_cfg.sft, _store(args).root, remember=remember)
            preference.check(dpo_cfg)
        else:
            preflight.check(load_config(args.recipe, args.overrides), _store(args).root, remember=remember)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if args.command == "plan":
        return _plan(args, dpo)
    if dpo:
        from flows.dpo import dpo as flow
    else:
        from flows.sft import sft as flow

    quiet_prefect(args.verbose, cli_prints_errors=args.command == "run")

    if args.command == "serve":
        flow.serve(name=args.name, cron=args.cron, parameters=_flow_parameters(args))
        return 0
    if not prefect_server.connect():
        _server_in_own_group()
    from prefect.exceptions import TerminationSignal

    signal.signal(signal.SIGTERM, _terminated)  # in training the flow asks for a checkpoint first (training.stop)
    try:
        summary = flow(**_flow_parameters(args), summary_json=args.summary_json)
    except (Terminated, TerminationSignal):  # SIGTERM (kill, a pod eviction, a spot preemption)
        _stop_prefect()
        print(_stopped_line(_this_runs_summary(args)), file=sys.stderr)
        sys.exit(143)
    except KeyboardInterrupt:  # Ctrl-C: the server, in its own group, is still up, so Prefect records it at once
        _stop_prefect()
        print("error: interrupted; run the same command again to resume (finished stages are reused, training "
              "continues from its last checkpoint)", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - a stage failed (after its retries): say which, not a stack trace
        _stop_prefect()
        code, line = outcome(e, _this_runs_summary(args))
        print(line, file=sys.stderr)
        sys.exit(code)
    _stop_prefect()
    _print_summary(summary)
    if dpo:
        from sft_pipeline.report import dpo_lines

        print("\n".join(dpo_lines(summary)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
