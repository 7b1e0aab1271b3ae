"""Data-parallel scaling of the train stage: 1 GPU vs N GPUs of the same machine, same effective batch, same data.

    python -m bench.scaling --gpus 2 --out DIR                  # on a CUDA machine with >= 2 GPUs
    python -m bench.scaling --gpus 2 --strategies ddp,fsdp      # FSDP-QLoRA too (on N GPUs)
    python -m bench.scaling --device cpu --tiny --gpus 2        # dry run of the whole path on CPU (gloo, tiny model)

Every setting is a fresh torchrun process group started by ``sft_pipeline.launch.run_ranks`` (what the train stage
runs for ``training.num_processes`` > 1; one GPU runs through torchrun too, so both sides pay the same), alternating
1, N, 1, N for ``--runs`` rounds; the model (random-weight Mistral-7B, ``MistralConfig()``) and the data (ultrachat-
like lengths, mean ~1,300 tokens) are the ones ``bench/throughput.py`` builds, made once in a separate process (a
process that built the 7B keeps GPU memory cached, and the batch plan reads free memory). The recipe is
``mistral-7b-qlora`` with an effective batch of 16 sequences, split by ``launch.split_batch`` over the ranks.
tokens/s is all ranks' tokens (gathered by Trainer) over the steps after the first 3. Scaling efficiency =
tok/s(N) / (N x tok/s(1)). Prints a table and the loss curves side by side; writes ``scaling.json`` and one log per
setting into ``--out`` (the JSON is rewritten after every setting, so a cut-short run keeps what it measured).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

EFFECTIVE_BATCH = 16


def _prepare_cuda() -> dict:
    """In its own process: the 7B and the data (bench.throughput.prepare), the card and versions."""
    code = ("import json, torch, transformers, trl, peft, bitsandbytes; from bench.throughput import prepare; "
            "prepare(); print('PREPARED ' + json.dumps({'card': torch.cuda.get_device_name(0), "
            "'gpus': torch.cuda.device_count(), 'torch': torch.__version__, 'transformers': transformers.__version__, "
            "'trl': trl.__version__, 'peft': peft.__version__, 'bitsandbytes': bitsandbytes.__version__}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("PREPARED ")), None)
    if not line:
        raise SystemExit(f"preparing the model and data failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    from bench.throughput import DATA, MODEL_DIR

    return {**json.loads(line[9:]), "model": str(MODEL_DIR), "train": str(DATA), "tokenizer": str(MODEL_DIR)}


def _prepare_tiny(root: Path) -> dict:
    """CPU dry run: the tiny recipe's model (random weights) and a few hundred tokenized synthetic chats."""
    import datasets
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from sft_pipeline import synthetic
    from sft_pipeline.models import ARCHITECTURES, build_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    if not (root / "model" / "config.json").is_file():
        torch.manual_seed(0)
        MistralForCausalLM(MistralConfig(**ARCHITECTURES["tiny-mistral"])).save_pretrained(root / "model")
        build_tokenizer().save_pretrained(root / "model")
    if not (root / "train.parquet").is_file():
        tok = build_tokenizer()
        rows = synthetic.conversations(256, seed=0)
        ids = tok.apply_chat_template([r["messages"] for r in rows], tokenize=True, return_dict=True)["input_ids"]
        datasets.Dataset.from_dict({"input_ids": [list(x)[:256] for x in ids]}).to_parquet(str(root / "train.parquet"))
    return {"card": "cpu", "gpus": 0, "torch": torch.__version__, "model": str(root / "model"),
            "train": str(root / "train.parquet"), "tokenizer": str(root / "model")}


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (the first n go to an n-GPU setting)."""
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given:
        return [g.strip() for g in given.split(",") if g.strip()]
    proc = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True)
    return [ln.strip() for ln in proc.stdout.splitlines() if ln.strip()] or ["0"]


def make_job(prep: dict, n: int, strategy: str, steps: int, device: str, tiny: bool, run_dir: Path,
             extra: list[str] = (), speed: dict | None = None):
    """The job every rank reads: the recipe with the bench's overrides (no checkpoints, loss every step), then
    ``extra`` (``--set``) overrides, and ``speed`` (``--speed``: entries of ``training.build.SPEED``)."""
    from sft_pipeline.config import load_config
    from sft_pipeline.training.job import TrainJob

    overrides = ["model.source=local", f"model.name={prep['model']}", f"training.max_steps={steps}",
                 "training.logging_steps=1", "training.eval_strategy=no", "training.save_steps=100000",
                 "training.save_minutes=null", f"training.device={device}", f"training.num_processes={n}",
                 f"training.strategy={strategy}"]
    if tiny:
        cfg = load_config("tiny", overrides + ["training.per_device_batch_size=4", "training.gradient_accumulation_steps=2",
                                               *extra])
    else:
        cfg = load_config("mistral-7b-qlora", overrides + [
            "training.per_device_batch_size=1", f"training.gradient_accumulation_steps={EFFECTIVE_BATCH}", *extra])
    return TrainJob(train=prep["train"], eval=None, tokenizer=prep["tokenizer"], model_path=prep["model"],
                    model=cfg.model, quantization=cfg.quantization, lora=cfg.lora, training=cfg.training,
                    max_length=cfg.format.max_length, work=run_dir / "work", out=run_dir / "out", device=device,
                    speed=speed or None)


def run_setting(prep: dict, n: int, strategy: str, steps: int, device: str, tiny: bool, out: Path, tag: str,
                timeout_s: float, extra: list[str] = (), speed: dict | None = None) -> dict:
    """One setting in a fresh process group; its log into ``out/scaling-<tag>.log``."""
    from sft_pipeline.launch import run_ranks

    run_dir = Path(f"/tmp/sft-scaling-{os.getpid()}-{tag}")
    shutil.rmtree(run_dir, ignore_errors=True)  # fresh: no checkpoint to resume from
    logger = logging.getLogger(f"bench.scaling.{tag}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = logging.FileHandler(out / f"scaling-{tag}.log", mode="w")
    logger.addHandler(handler)
    env = {"CUDA_VISIBLE_DEVICES": ",".join(visible_gpus()[:n])} if device == "cuda" else {}
    result: dict = {"setting": tag, "gpus": n, "strategy": strategy}
    t0 = time.time()
    try:
        m = run_ranks(make_job(prep, n, strategy, steps, device, tiny, run_dir, extra, speed), n, logger, nnodes=1,
                      timeout_s=timeout_s, env=env)
        history = json.loads((run_dir / "out" / "log_history.json").read_text())
        result.update({"tok_s": m.get("tokens_per_second_warm") or m.get("tokens_per_second"),
                       "tok_s_all_steps": m.get("tokens_per_second"), "tokens": m.get("tokens"),
                       "steps": m.get("steps"), "per_device_batch_size": m.get("per_device_batch_size"),
                       "gradient_accumulation_steps": m.get("gradient_accumulation_steps"),
                       "effective_batch": m.get("effective_batch"), "peak_gpu_gib_rank0": m.get("peak_gpu_gib"),
                       "gradient_checkpointing": m.get("batch_plan", {}).get("gradient_checkpointing"),
                       "liger": m.get("liger"), "attn_implementation": m.get("attn_implementation"),
                       "rank_plans": m.get("batch_plan", {}).get("rank_plans"),
                       "losses": [round(h["loss"], 4) for h in history if "loss" in h]})
    except Exception as e:  # noqa: BLE001 - a failed setting is reported in the table, the others still run
        result["error"] = f"{type(e).__name__}: {e}"[:500]
        # every rank's own stdout/stderr files (torchrun-logs/<run>/attempt_0/<rank>/), flat, for the post-mortem
        for f in (run_dir / "work" / "torchrun-logs").glob("*/attempt_*/*/std*.log"):
            shutil.copyfile(f, out / f"scaling-{tag}-rank{f.parent.name}-{f.name}")
    finally:
        logger.removeHandler(handler)
        handler.close()
        shutil.rmtree(run_dir, ignore_errors=True)
    result["wall_s"] = round(time.time() - t0, 1)
    return result


def summarize(results: list[dict], n: int) -> dict:
    """Median tok/s per setting and the scaling efficiency of each N-GPU setting against the 1-GPU one."""
    by: dict[str, list[dict]] = {}
    for r in results:
        by.setdefault(r["setting"].rsplit("-run", 1)[0], []).append(r)
    rows = {}
    for name, rs in by.items():
        ok = [r for r in rs if r.get("tok_s")]
        rows[name] = {"gpus": rs[0]["gpus"], "strategy": rs[0]["strategy"], "runs": [r.get("tok_s") for r in rs],
                      "median": statistics.median(r["tok_s"] for r in ok) if ok else None,
                      "batch": f"{ok[0]['per_device_batch_size']}x{ok[0]['gradient_accumulation_steps']}" if ok else "-",
                      "peak": max((r.get("peak_gpu_gib_rank0") or 0) for r in ok) if ok else None,
                      "losses": ok[0]["losses"] if ok else [], "error": next((r["error"] for r in rs if "error" in r), None)}
    base = next((r["median"] for r in rows.values() if r["gpus"] == 1 and r["median"]), None)
    for r in rows.values():
        r["efficiency"] = round(r["median"] / (r["gpus"] * base), 3) if base and r["median"] else None
    return rows


def table(rows: dict, title: str) -> str:
    lines = [title, f"{'setting':<12}{'GPUs':>5}{'micro x acc':>13}{'tok/s (runs)':>24}{'median':>9}{'per GPU':>9}"
                    f"{'efficiency':>12}{'peak GiB':>10}"]
    for name, r in rows.items():
        if r["median"] is None:
            lines.append(f"{name:<12}{r['gpus']:>5}  failed: {(r['error'] or '')[:200]}")
            continue
        runs = " / ".join(str(round(x)) if x else "-" for x in r["runs"])
        eff = f"{r['efficiency']:.2f}" if r["efficiency"] is not None else "-"
        lines.append(f"{name:<12}{r['gpus']:>5}{r['batch']:>13}{runs:>24}{r['median']:>9.0f}"
                     f"{r['median'] / r['gpus']:>9.0f}{eff:>12}{(r['peak'] or 0):>10.1f}")
    curves = {name: r["losses"] for name, r in rows.items() if r["losses"]}
    if curves:
        lines.append("\nloss per optimizer step (first run of each setting)")
        lines.append(f"{'step':>4}" + "".join(f"{name:>12}" for name in curves))
        for i in range(max(map(len, curves.values()))):
            lines.append(f"{i + 1:>4}" + "".join(f"{c[i]:>12.4f}" if i < len(c) else f"{'':>12}"
                                                  for c in curves.values()))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=2, help="N: compared with 1 (must divide the effective batch 16)")
    p.add_argument("--strategies", default="ddp", help="comma-separated, for the N-GPU settings: ddp, fsdp")
    p.add_argument("--runs", type=int, default=2, help="rounds of 1, N alternating")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per setting (the first 3 are warm-up)")
    p.add_argument("--timeout", type=float, default=420, help="seconds one setting may take")
    p.add_argument("--no-baseline", action="store_true", help="only the N-GPU settings (when debugging them)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every setting, e.g. model.attn_implementation=sdpa (repeatable)")
    p.add_argument("--speed", default="", metavar="K=V,...",
                   help="training.build.SPEED entries for every setting, e.g. plan=estimate,warm=false")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="the tiny recipe's model and data (a CPU dry run)")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    a = p.parse_args(argv)
    strategies = [s for s in a.strategies.split(",") if s]
    if a.gpus < 2 or EFFECTIVE_BATCH % a.gpus:
        p.error(f"--gpus must be 2 or more and divide the effective batch {EFFECTIVE_BATCH} (2, 4, 8, 16)")
    if bad := [s for s in strategies if s not in ("ddp", "fsdp")]:
        p.error(f"--strategies: unknown {bad} (allowed: ddp, fsdp)")
    if a.device == "cpu" and not a.tiny:
        p.error("--device cpu needs --tiny (the 7B does not train on a CPU)")
    if a.device == "cpu" and "fsdp" in strategies:
        p.error("--strategies fsdp needs CUDA (bitsandbytes 4-bit weights under FSDP)")
    a.strategies = strategies
    from sft_pipeline.config import load_config
    from sft_pipeline.errors import ConfigError
    from sft_pipeline.training.build import SPEED

    try:
        load_config("tiny" if a.tiny else "mistral-7b-qlora", a.set)
    except ConfigError as e:
        p.error(f"--set: {e}")

    a.speed_dict = {}
    for item in filter(None, a.speed.split(",")):
        key, _, value = item.partition("=")
        if key not in SPEED:
            p.error(f"--speed: unknown {key!r} (known: {', '.join(SPEED)})")
        a.speed_dict[key] = {"true": True, "false": False}.get(value.lower(), int(value) if value.isdigit() else value)
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    prep = _prepare_tiny(Path("/tmp/sft-scaling-tiny")) if a.tiny else _prepare_cuda()
    if a.device == "cuda" and prep["gpus"] < a.gpus:
        raise SystemExit(f"--gpus {a.gpus}, but this machine shows {prep['gpus']} GPU(s)")
    plan = [(1, "ddp")] * (not a.no_baseline) + [(a.gpus, s) for s in a.strategies]
    results: list[dict] = []
    for i in range(a.runs):
        for n, strategy in plan:
            tag = f"{n}gpu" + (f"-{strategy}" if n > 1 else "") + f"-run{i}"
            r = run_setting(prep, n, strategy, a.steps, a.device, a.tiny, out, tag, a.timeout, a.set, a.speed_dict)
            print(json.dumps({k: v for k, v in r.items() if k != "losses"}), flush=True)
            results.append(r)
            (out / "scaling.json").write_text(json.dumps({"machine": prep, "args": vars(a), "results": results,
                                                          "summary": summarize(results, a.gpus)}, indent=1))
    rows = summarize(results, a.gpus)
    title = (f"\n{prep['card']} ({prep['gpus']} visible), torch {prep['torch']}, effective batch "
             f"{8 if a.tiny else EFFECTIVE_BATCH}, {a.steps} optimizer steps per setting (tok/s after the first 3)"
             + "".join(f"; {o}" for o in a.set) + (f"; speed {a.speed}" if a.speed else ""))
    text = table(rows, title)
    print(text)
    (out / "scaling.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
