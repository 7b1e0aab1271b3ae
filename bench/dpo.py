"""DPO training throughput of the 7B QLoRA path: the dpo_train stage's trainer on the Mistral-7B architecture.

    python -m bench.dpo [--runs 2] [--out DIR]              # on a CUDA machine; prints a table, writes dpo.json
    python -m bench.dpo --device cpu --tiny --steps 4        # the same code on CPU with the tiny model (a check)

Every run is its own process (fresh allocator and kernels). The model is the random-weight Mistral-7B
(``MistralConfig()``, built once into /dev/shm as ``bench.throughput`` builds it), loaded as the
``zephyr-7b-dpo-qlora`` recipe loads its base (nf4 + double quant, bf16 compute); the SFT adapter is a fresh LoRA
of that recipe's shape (r16, alpha 16, all seven projections; its B matrices are zero, the same work as a trained
one) saved next to it; trl's DPOTrainer runs through ``sft_pipeline.dpo_trainer.build_dpo_trainer``, the stage's
code, with the recipe's DPO settings (batch 4 pairs x accumulation 1, max length 1024, gradient checkpointing,
paged AdamW 32-bit, beta 0.01). Pairs are random token ids with ultrafeedback-like lengths (prompt ~200 tokens,
replies ~300, lognormal, prompt + reply cut at 1024). tok/s counts the non-padding tokens of the chosen and the
rejected sequences once per step (the policy's forward and backward; the reference pass over the same tokens is
not counted again), from the end of the warm-up steps to the end of the timed ones.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL_DIR = Path("/dev/shm/sft-bench/mistral-7b")  # shared with bench.throughput (the same random 7B)
TOKENIZER = os.environ.get("SFT_BENCH_TOKENIZER")  # a saved tokenizer (the GPU machine lacks mistral-common)
RECIPE = "zephyr-7b-dpo-qlora"
PAIRS = 400


def _tokenizer():
    from transformers import AutoTokenizer

    from sft_pipeline.models import build_tokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER) if TOKENIZER else build_tokenizer()


def prepare(tiny: bool, root: Path) -> tuple[Path, Path]:
    """The base model and a fresh SFT-shaped adapter for it (made once); returns their directories."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM

    from sft_pipeline.config import load_dpo_config
    from sft_pipeline.models import ARCHITECTURES

    model_dir = root / "tiny-mistral" if tiny else MODEL_DIR
    if not (model_dir / "config.json").is_file():
        torch.manual_seed(0)
        device = "cpu" if tiny else "cuda"
        with torch.device(device):
            model = MistralForCausalLM(MistralConfig(**(ARCHITECTURES["tiny-mistral"] if tiny else {})))
        model.to(torch.float32 if tiny else torch.bfloat16).save_pretrained(model_dir, max_shard_size="20GB")
        _tokenizer().save_pretrained(model_dir)
        del model
    adapter_dir = model_dir.parent / f"{model_dir.name}-sft-adapter"
    if not (adapter_dir / "adapter_config.json").is_file():
        lora = load_dpo_config(RECIPE).sft.lora
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32 if tiny else torch.bfloat16)
        get_peft_model(base, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                        target_modules=lora.target_modules, task_type="CAUSAL_LM")
                       ).save_pretrained(adapter_dir)
    return model_dir, adapter_dir


def pairs(n: int, vocab: int, max_length: int, seed: int = 0):
    """Random token ids with ultrafeedback-like lengths, as the preference_format stage writes them."""
    import datasets

    rng = random.Random(seed)
    cols: dict[str, list] = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}

    def length(mean_log: float) -> int:
        return max(8, int(rng.lognormvariate(mean_log, 0.6)))

    for _ in range(n):
        prompt = min(length(5.1), max_length // 2)  # ~200 tokens
        cols["prompt_ids"].append([rng.randrange(3, vocab) for _ in range(prompt)])
        for side in ("chosen_ids", "rejected_ids"):
            cols[side].append([rng.randrange(3, vocab) for _ in range(min(length(5.6), max_length - prompt))])
    return datasets.Dataset.from_dict(cols)


def run_one(device: str, tiny: bool, steps: int, warm: int, root: Path) -> dict:
    import torch
    from transformers import TrainerCallback

    from sft_pipeline.config import load_dpo_config
    from sft_pipeline.dpo_trainer import build_dpo_trainer

    model_dir, adapter_dir = prepare(tiny, root)
    over = [f"dpo_training.max_steps={warm + steps}", "dpo_training.logging_steps=1",
            "dpo_training.save_steps=100000", "dpo_training.save_minutes=null"]
    if tiny:
        over += ["quantization.load_in_4bit=false", "preference_format.max_length=128",
                 "dpo_training.optim=adamw_torch", "dpo_training.gradient_checkpointing=false"]
    cfg = load_dpo_config(RECIPE, over + ["model.source=local", f"model.name={model_dir}"])
    result: dict = {"device": device, "model": "tiny-mistral" if tiny else "mistral-7b (random weights)"}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == warm:
                sync()
                self.t, self.n = time.perf_counter(), state.num_input_tokens_seen
            elif state.global_step == warm + steps:
                sync()
                dt = time.perf_counter() - self.t
                result.update(tokens=int(state.num_input_tokens_seen - self.n), seconds=round(dt, 2),
                              tok_s=round((state.num_input_tokens_seen - self.n) / dt))
                if device == "cuda":
                    result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                result.setdefault("losses", []).append(round(float(logs["loss"]), 4))

    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)  # saved with the model (only its pad and end tokens matter here)
    ds = pairs(PAIRS, AutoConfig.from_pretrained(model_dir).vocab_size, cfg.preference_format.max_length)
    with tempfile.TemporaryDirectory() as out:
        trainer, metrics = build_dpo_trainer(ds, tok, str(model_dir), adapter_dir, cfg.sft.model, cfg.sft.quantization,
                                             cfg.dpo_training, cfg.preference_format.max_length, out, device,
                                             extra_callbacks=[Timer()])
        result["settings"] = {**metrics["batch_plan"], "optim": metrics["optim"],
                              "attn_implementation": metrics["attn_implementation"],
                              "gradient_checkpointing": cfg.dpo_training.gradient_checkpointing,
                              "max_length": cfg.preference_format.max_length, "beta": cfg.dpo_training.beta,
                              "load_in_4bit": cfg.sft.quantization.load_in_4bit}
        trainer.train()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="the tiny random model (with --device cpu: a check here)")
    p.add_argument("--runs", type=int, default=2, help="fresh processes, each timed")
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps per run")
    p.add_argument("--warm", type=int, default=2, help="warm-up optimizer steps per run (not timed)")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--root", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.device == "cuda" and a.tiny:
        p.error("--tiny is the CPU check; the GPU number is the 7B's (leave out --tiny)")
    if a.one:
        print("RESULT " + json.dumps(run_one(a.device, a.tiny, a.steps, a.warm, Path(a.root))), flush=True)
        return
    Path(a.out).mkdir(parents=True, exist_ok=True)
    root = Path(a.root or tempfile.mkdtemp(prefix="bench-dpo-"))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")}
    results = []
    for i in range(a.runs):
        cmd = [sys.executable, "-m", "bench.dpo", "--one", "--device", a.device, "--steps", str(a.steps), "--warm",
               str(a.warm), "--root", str(root)] + (["--tiny"] if a.tiny else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        with open(Path(a.out, "bench-dpo-logs.txt"), "a") as f:
            f.write(f"===== run {i}\n{proc.stdout[-20000:]}{proc.stderr[-20000:]}\n")
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        r = json.loads(line[7:]) if line else {"error": proc.stderr.strip()[-600:]}
        print(json.dumps(r), flush=True)
        results.append(r)
    Path(a.out, "dpo.json").write_text(json.dumps(results, indent=1))
    ok = [r for r in results if "tok_s" in r]
    if not ok:
        sys.exit(f"every run failed; last error: {results[-1].get('error', '')[-300:]}")
    first = ok[0]
    print(f"\nDPO training, {first['model']} on {a.device}, {a.steps} timed steps after {a.warm} warm-up, settings "
          f"{json.dumps(first['settings'])}")
    median = statistics.median(r["tok_s"] for r in ok)
    print(f"tok/s (runs): {' / '.join(str(r['tok_s']) for r in ok)}; median {median:.0f}"
          + (f"; peak {max(r['peak_gib'] for r in ok):.1f} GiB" if "peak_gib" in first else ""))


if __name__ == "__main__":
    main()
