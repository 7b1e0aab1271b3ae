"""QLoRA training throughput on the Mistral-7B architecture: this project's train stage vs the notebook's trl setup.

    python -m bench.throughput [--runs 2] [--out DIR]        # on a CUDA machine; prints a table

Every setting runs in its own process (Liger patches model classes process-wide, and the first setting timed in a
fresh process reads slow), alternating, ``--runs`` times each, on the same synthetic data (ultrachat-like lognormal
lengths, mean ~1,300 tokens, cap 2048) and the same random-weight Mistral-7B (``MistralConfig()``, built once into
/dev/shm). Warm-up optimizer steps are excluded. Settings:

- ``notebook``: the seed notebook: trl SFTTrainer, packing, batch 1, gradient checkpointing (non-reentrant)
- ``liger2``: the best plain trl setting measured before: packing, batch 2, no checkpointing, Liger kernels;
  ``liger4`` / ``liger8``: the same with batch 4 / 8 (accumulation 4 / 2): whether a card with more memory gives the
  plain setting a larger batch that pays
- ``project``: ``tasks.train.build_trainer`` with the ``mistral-7b-qlora`` recipe, as the flow runs it (attention:
  flash-attn if installed, else PyTorch's flash-attention varlen kernel for packed rows, else flex attention)
- ``project-flex``: the same with ``model.attn_implementation=flex_attention`` (per-sequence attention for packed
  rows through a block-sparse mask, instead of SDPA's dense masked attention; the default before varlen)
- ``old``: the project before issue 14 (batch plan from a per-token constant, trl's LM head with its metrics)
- ``lean`` / ``ligerhead``: ``old`` with one lever: the lean LM head, or Liger's fused linear cross-entropy
- ``measured``: ``old`` with the measured batch plan alone (cap 4, trl's head)
- ``mb8``: the default with the measured plan allowed up to micro-batch 8; ``compile``: the default with regional
  ``torch.compile`` of the decoder layers
- ``workers2``: the default with 2 data-loader processes collating the next micro-batches during the step
- ``nodrop``: the default with LoRA dropout 0: the most that any way of applying dropout could gain; not a recipe
  change (dropout regularizes)
- ``peftlora``: the default before the LoRA glue levers: peft's forward and one dropout mask per adapted module
  (``lora.shared_dropout=false``, speed ``lora_add=peft``); ``sharedrop``: that with one mask per input (q/k/v
  share one, ``training.lora.share_dropout``, now the default); ``addmm``: that with each adapter added inside its
  second GEMM (``training.lora.fuse_lora_add``, now the default)
- ``splita``: the default with one A GEMM per adapter, instead of the A matrices of the adapters that read one
  input as one GEMM (``training.lora.fuse_lora_a``, the default; measured as ``fuseda`` before it was)
- ``mb16``: the default with the measured plan allowed up to micro-batch 16 (cap 8 is the default)
- ``keep4bit``: the default with the 4-bit base dequantized in every forward and backward, as bitsandbytes does,
  even where the plan leaves room to keep the weights dequantized (``sft_pipeline/base_weights.py``, the default)
- ``torchvarlen``: the default with PyTorch's varlen attention kernel even where flash-attention 4 is installed
  (``sft_pipeline/varlen.py`` chooses flash-attention 4 there)
- ``eval``: not training: the evaluate stage's scoring of 300 rows as the stage does it here (padding-free rows with
  the varlen kernel), tuned and base, twice (``run_eval``); ``eval64``: batches padded to a multiple of 64, SDPA
- ``...@hold30``: the same while another process holds 30 GiB of the GPU (started before, kept to the end)
- ``...@cudafirst``: the same in a process that started CUDA (1 GiB allocated and freed) before the train stage's
  code, as the CLI's preflight and a GPU-built model do in the flow; ``...@fixedseg``: with
  ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False`` (the allocator the flow had before the train stage applied
  expandable segments to a running allocator). Every setting reports the allocator's reserved peak beside the peak
  allocated
- ``...@torchkernel``: the same with PyTorch's varlen attention kernel even where flash-attention 4 is installed
  (``eval@torchkernel``: the evaluate stage's scoring; ``torchvarlen`` is training's)
- ``...@prof``: the same, with the torch profiler on for the last warm-up optimizer step (not timed): GPU time by
  kind of kernel, the busy share of the step's wall time, host-device syncs; the 25 longest kernels in the log

All: nf4 + double quant, bf16 compute, LoRA r64 α16 dropout 0.1 on q/k/v/o, SDPA for the plain trl settings, max
length 2048, effective batch 16 sequences per optimizer step.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODEL_DIR = Path("/dev/shm/sft-bench/mistral-7b")
TOKENIZER = os.environ.get("SFT_BENCH_TOKENIZER")  # a saved tokenizer (the GPU machine lacks mistral-common)
SPEEDS = {"old": {"plan": "estimate", "head": "trl"}, "lean": {"plan": "estimate", "head": "lean"},
          "ligerhead": {"plan": "estimate", "head": "liger"}, "measured": {"head": "trl", "cap": 4},
          "project": {}, "mb8": {"cap": 8}, "mb4": {"cap": 4}, "compile": {"compile": True}, "nodrop": {},
          "workers2": {"workers": 2}, "peftlora": {"lora_add": "peft", "lora_a": "per-module"},
          "sharedrop": {"lora_add": "peft", "lora_a": "per-module"},
          "addmm": {"lora_a": "per-module"}, "splita": {"lora_a": "per-module"}, "mb16": {"cap": 16},
          "keep4bit": {"base": "4bit"}, "torchvarlen": {"attention": "torch"}}
OVERRIDES = {"project-flex": ["model.attn_implementation=flex_attention"], "nodrop": ["lora.dropout=0"],
             "peftlora": ["lora.shared_dropout=false"], "addmm": ["lora.shared_dropout=false"]}
PLAIN = {"notebook": (1, True, False), "liger2": (2, False, True), "liger4": (4, False, True),
         "liger8": (8, False, True)}  # plain trl: batch, gradient checkpointing, Liger
KNOWN = [*SPEEDS, "project-flex", *PLAIN, "eval", "eval64"]
DATA = Path("/dev/shm/sft-bench/data.parquet")
PEAK_TFLOPS = 790  # bf16 dense matmul measured on the H100 here (../shared/STACK.md)
EFFECTIVE_BATCH = 16
WARM_STEPS, TIMED_STEPS = 2, 4


def prepare() -> None:
    """Build the random-weight 7B and the tokenized data once (shared by every setting)."""
    import datasets
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from sft_pipeline import synthetic
    from sft_pipeline.models import build_tokenizer

    def tokenizer():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(TOKENIZER) if TOKENIZER else build_tokenizer()

    if not (MODEL_DIR / "config.json").is_file():
        with torch.device("cuda"):
            model = MistralForCausalLM(MistralConfig()).to(torch.bfloat16)
        model.save_pretrained(MODEL_DIR, max_shard_size="20GB")
        tokenizer().save_pretrained(MODEL_DIR)
        del model
    if not DATA.is_file():
        tok = tokenizer()
        rows = synthetic.long_conversations(700, seed=0)
        ids = tok.apply_chat_template([r["messages"] for r in rows], tokenize=True, return_dict=True)["input_ids"]
        datasets.Dataset.from_dict({"input_ids": [list(x)[:2048] for x in ids]}).to_parquet(str(DATA))


def _timer(result: dict):
    import torch
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        """From the end of the last warm-up step to the end of the last timed one: the same window for every
        setting. (Stopping at the end of training, as this bench did before 2026-11-28's last calls, also counted
        the checkpoint Trainer saves after the last step when saving by steps: the project's settings do, the plain
        trl ones do not. It cost the project ~10 % of its measured speed; BENCHMARKS.md.)"""

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == WARM_STEPS:
                torch.cuda.synchronize()
                self.t, self.n = time.perf_counter(), state.num_input_tokens_seen
            elif state.global_step == WARM_STEPS + TIMED_STEPS:
                self.stop(state)
            result.setdefault("losses", [])

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                result.setdefault("losses", []).append(round(float(logs["loss"]), 4))

        def stop(self, state):
            torch.cuda.synchronize()
            dt = time.perf_counter() - self.t
            result["tokens"] = int(state.num_input_tokens_seen - self.n)
            result["seconds"] = round(dt, 2)
            result["tok_s"] = round(result["tokens"] / dt)
            result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
            result["reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 1)
            from torch._dynamo.utils import counters

            result["dynamo"] = {k: sum(v.values()) for k, v in counters.items() if k in ("stats", "graph_break",
                                                                                           "recompiles")}

    return Timer()


KINDS = [  # kernel name patterns -> what they do (first match wins)
    ("dequant", ("dequant", "kdequantize")), ("attention", ("flex", "fmha", "flash", "attention", "triton_tem")),
    ("matmul", ("gemm", "gemv", "cutlass", "xmma", "nvjet", "cublas", "sm90_", "sm80_", "ampere_")),
    ("liger", ("liger", "_rms_norm", "_rope", "_swiglu", "cross_entropy", "_geglu")),
    ("dropout", ("dropout", "bernoulli")), ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("compiled", ("triton_",)), ("copy", ("copy", "memcpy", "memset", "cat")),
]


def summarize_trace(path: str, wall_s: float) -> dict:
    """GPU time by kind of kernel, busy share of the wall time, and host-device syncs, from a chrome trace."""
    events = json.loads(Path(path).read_text())["traceEvents"]
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    spans, busy, end = sorted((e["ts"], e["ts"] + e["dur"]) for e in kernels), 0.0, float("-inf")
    for a, b in spans:  # the union of kernel intervals (streams may overlap)
        if b > end:
            busy += b - max(a, end)
            end = b
    by_kind: dict[str, float] = {}
    by_name: dict[str, list] = {}
    for e in kernels:
        name = e["name"].lower()
        kind = next((k for k, pats in KINDS if any(p in name for p in pats)), "other elementwise")
        by_kind[kind] = by_kind.get(kind, 0.0) + e["dur"]
        slot = by_name.setdefault(e["name"][:90], [0, 0.0])
        slot[0] += 1
        slot[1] += e["dur"]
    total = sum(by_kind.values())
    syncs = sum(1 for e in events if e.get("name") in ("aten::_local_scalar_dense", "cudaStreamSynchronize",
                                                       "cudaDeviceSynchronize"))
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:25]
    for name, (n, us) in top:
        print(f"PROF {us / 1e3:9.1f} ms {n:6d}x  {name}", flush=True)
    return {"wall_ms": round(wall_s * 1e3, 1), "gpu_busy_ms": round(busy / 1e3, 1),
            "busy_share": round(busy / 1e3 / (wall_s * 1e3), 3), "syncs": syncs,
            "kernel_ms": {k: round(v / 1e3, 1) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "kernel_share": {k: round(v / total, 3) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])}}


def _profiler(result: dict):
    """Profile optimizer step WARM_STEPS (the last warm-up step: the timed steps start after it)."""
    import torch
    from transformers import TrainerCallback

    class Profile(TrainerCallback):
        prof = None

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == WARM_STEPS - 1:
                torch.cuda.synchronize()
                acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
                self.prof = torch.profiler.profile(activities=acts)
                self.prof.__enter__()
                self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if self.prof is not None and state.global_step == WARM_STEPS:
                torch.cuda.synchronize()
                wall = time.perf_counter() - self.t
                self.prof.__exit__(None, None, None)
                path = f"/tmp/trace-{os.getpid()}.json"
                self.prof.export_chrome_trace(path)
                result["profile"] = summarize_trace(path, wall)
                self.prof = None

    return Profile()


def run_eval(result: dict, rows: int = 300, pad_to_multiple_of: int | None = None) -> dict:
    """The evaluate stage's scoring (``tasks.evaluate.score`` as the stage calls it on this GPU, ``scoring_mode``:
    Trainer.evaluate, batches of the recipe's size, padding-free rows with a per-sequence kernel) on the 4-bit 7B
    with the recipe's LoRA adapter (freshly initialised: the same work as a tuned one). ``pad_to_multiple_of``:
    padded batches with SDPA instead (the stage up to its version 5)."""
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model

    from sft_pipeline.config import load_config
    from sft_pipeline.models import attn_label, load_model
    from tasks.evaluate import score, scoring_mode

    cfg = load_config("mistral-7b-qlora", ["model.source=local", f"model.name={MODEL_DIR}"])
    ds = datasets.Dataset.from_parquet(str(DATA)).select(range(rows))
    model = load_model(str(MODEL_DIR), cfg.model, cfg.quantization, "cuda")
    lora = cfg.lora
    model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                             target_modules=lora.target_modules, task_type="CAUSAL_LM")).eval()
    mode = scoring_mode(cfg.model, "cuda") if pad_to_multiple_of is None else \
        {"packed": False, "pad_to_multiple_of": pad_to_multiple_of}
    with torch.no_grad():  # twice: the first pass meets every batch shape for the first time
        out, again = (score(model, ds, 0, cfg.evaluation.batch_size, "cuda", f"/tmp/bench-eval-{os.getpid()}", **mode)
                      for _ in range(2))
    result["again"] = {"tuned_tok_s": again["tuned"]["tokens_per_second"],
                       "base_tok_s": again["base"]["tokens_per_second"],
                       "eval_loss": [out["tuned"]["eval_loss"], again["tuned"]["eval_loss"]]}
    result.update(tokens=out["tokens"], tok_s=out["tuned"]["tokens_per_second"], seconds=out["tuned"]["seconds"],
                  base_tok_s=out["base"]["tokens_per_second"],
                  peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1),
                  settings={"batch_size": cfg.evaluation.batch_size, "attn_implementation":
                            attn_label(mode.get("attn") or model.config._attn_implementation), "rows": rows, **mode})
    if mode.get("packed"):
        from sft_pipeline import varlen

        result["settings"]["attention_kernel"] = varlen.kernel_label()
    return result


def run_one(setting: str) -> dict:
    import datasets
    import torch
    from transformers import AutoTokenizer

    if "@fixedseg" in setting:  # a user's value: the train stage keeps it
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:False"
    if "@torchkernel" in setting:  # PyTorch's varlen kernel even where flash-attention 4 is installed
        from sft_pipeline import varlen

        varlen.use_kernel("torch")
    if "@cudafirst" in setting:  # CUDA started before training, as in the flow
        torch.empty(2**30, dtype=torch.uint8, device="cuda")  # freed at once, kept in the allocator's cache
    ds = datasets.Dataset.from_parquet(str(DATA))
    tok = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    result: dict = {"setting": setting}
    if setting.startswith("eval"):  # eval: padding-free rows; eval64: batches padded to a multiple of 64 (SDPA)
        pad = setting.split("@")[0][4:]
        return run_eval(result, pad_to_multiple_of=int(pad) if pad else None)
    steps = WARM_STEPS + TIMED_STEPS
    out = f"/tmp/bench-{setting}-{os.getpid()}"
    speed = SPEEDS.get(setting.split("@")[0])
    # the profiler's callback first: its summary (seconds) then ends before the timer starts
    callbacks = ([_profiler(result)] if "@prof" in setting else []) + [_timer(result)]
    if setting.startswith("project") or speed is not None:
        from sft_pipeline.config import load_config
        from sft_pipeline.training.build import build_trainer
        from sft_pipeline.training.job import TrainData, TrainJob

        cfg = load_config("mistral-7b-qlora", [
            "model.source=local", f"model.name={MODEL_DIR}", f"training.max_steps={steps}", "training.logging_steps=1",
            "training.per_device_batch_size=1", f"training.gradient_accumulation_steps={EFFECTIVE_BATCH}",
            "training.eval_strategy=no", "training.save_steps=100000", "training.save_minutes=null",
            *OVERRIDES.get(setting.split("@")[0], [])])
        job = TrainJob(train=str(DATA), eval=None, tokenizer=str(MODEL_DIR), model_path=str(MODEL_DIR), model=cfg.model,
                       quantization=cfg.quantization, lora=cfg.lora, training=cfg.training,
                       max_length=cfg.format.max_length, work=out, out=out, device="cuda", speed=speed)
        trainer, metrics = build_trainer(job, TrainData(ds, None, tok), callbacks=callbacks)
        result["settings"] = {k: metrics[k] for k in ("batch_plan", "liger", "optim", "attn_implementation", "head",
                                                       "compile")}
        for key in ("shared_dropout_modules", "addmm_lora_modules", "fused_lora_a_modules", "dequantized_modules",
                    "attention_kernel"):
            if key in metrics:
                result["settings"][key] = metrics[key]
    else:
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
        from trl import SFTConfig, SFTTrainer

        bs, ckpt, liger = PLAIN[setting.split("@")[0]]
        if liger:  # the Triton kernels the project runs too (Liger would pick CuTe DSL ones where CUTLASS imports)
            from sft_pipeline.training.cuda import pin_liger_triton

            pin_liger_triton()
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(str(MODEL_DIR), quantization_config=quant, device_map={"": 0},
                                                     attn_implementation="sdpa", dtype=torch.bfloat16, use_cache=False)
        args = SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=bs,
                         gradient_accumulation_steps=EFFECTIVE_BATCH // bs, learning_rate=2e-5,
                         lr_scheduler_type="cosine", bf16=True, max_length=2048, packing=True,
                         gradient_checkpointing=ckpt, gradient_checkpointing_kwargs={"use_reentrant": False},
                         report_to="none", save_strategy="no", logging_steps=1, include_num_input_tokens_seen=True,
                         use_liger_kernel=liger, disable_tqdm=True, seed=42, data_seed=42)
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=callbacks,
                             peft_config=LoraConfig(r=64, lora_alpha=16, lora_dropout=0.1, bias="none",
                                                    task_type="CAUSAL_LM",
                                                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        result["settings"] = {"per_device_batch_size": bs, "gradient_checkpointing": ckpt, "liger": liger}
    trainer.train()
    return result


def _versions() -> dict[str, str]:
    """The installed versions of what the timings depend on (read from the package metadata: nothing imported)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "trl", "peft", "bitsandbytes", "liger-kernel", "flash-attn", "flash-attn-4",
                 "nvidia-cutlass-dsl"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "absent"
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--settings", default="notebook,liger2,project,project-flex")
    p.add_argument("--order", help="settings in the order to run them, repeats allowed (replaces --runs/--settings)")
    p.add_argument("--budget-s", type=float, default=None, help="start no setting after this many seconds")
    p.add_argument("--hold-gib", type=float, help=argparse.SUPPRESS)
    p.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    a = p.parse_args()
    if a.one:
        print("RESULT " + json.dumps(run_one(a.one)), flush=True)
        return
    if a.hold_gib:  # another process holding GPU memory, until killed
        import torch

        held = torch.empty(int(a.hold_gib * 2**30), dtype=torch.uint8, device="cuda")  # noqa: F841
        print("HOLDING", flush=True)
        time.sleep(3600)
        return
    if a.prepare:
        prepare()
        return
    order = a.order.split(",") if a.order else [s for _ in range(a.runs) for s in a.settings.split(",")]
    unknown = [s for s in order if s.split("@")[0] not in KNOWN]
    if unknown:  # before the GPU work below: a typo must not cost a call's prepare time
        p.error(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(KNOWN)} "
                "(suffixes: @hold<GiB>, @prof, @cudafirst, @fixedseg, @torchkernel)")
    t0 = time.monotonic()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")}
    # built in a child process: the parent never holds GPU memory (its allocator's cache would shrink every plan)
    subprocess.run([sys.executable, "-m", "bench.throughput", "--prepare"], check=True, env=env)
    card = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                          text=True).stdout.strip()
    results: dict[str, list[dict]] = {}
    for i, setting in enumerate(order):
        if a.budget_s and time.monotonic() - t0 > a.budget_s:
            print(f"budget: skipping {order[i:]}", flush=True)
            break
        holder = None
        if "@hold" in setting:
            holder = subprocess.Popen([sys.executable, "-m", "bench.throughput", "--hold-gib",
                                       setting.split("@hold")[1].split("@")[0]], stdout=subprocess.PIPE, text=True,
                                      env=env)
            holder.stdout.readline()  # HOLDING: the memory is taken before the setting plans its batch
        try:
            proc = subprocess.run([sys.executable, "-m", "bench.throughput", "--one", setting], capture_output=True,
                                  text=True, env=env)
        finally:
            if holder:
                holder.kill()
                holder.wait()
        with open(Path(a.out, "bench-logs.txt"), "a") as f:  # one file: few files come back from the GPU machine
            f.write(f"===== {setting} (#{i})\n{proc.stdout[-20000:]}{proc.stderr[-20000:]}\n")
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        r = json.loads(line[7:]) if line else {"setting": setting, "error": proc.stderr.strip()[-400:]}
        print(json.dumps(r), flush=True)
        results.setdefault(setting, []).append(r)
    versions = _versions()
    Path(a.out, "bench.json").write_text(json.dumps({"card": card, "versions": versions, "results": results}, indent=1))
    n_params = 7.24e9
    med = {s: statistics.median(r["tok_s"] for r in rs if "tok_s" in r) for s, rs in results.items()
           if any("tok_s" in r for r in rs)}
    base, plain = med.get("notebook"), med.get("liger2")  # the notebook's settings; the best plain trl setting
    print(f"\n{card}, effective batch {EFFECTIVE_BATCH}, {TIMED_STEPS} timed optimizer steps after {WARM_STEPS} warm-up")
    print(", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"{'setting':<16}{'tok/s (runs)':<24}{'median':>8}{'peak GiB':>10}{'reserved':>10}{'x notebook':>12}"
          f"{'x liger2':>10}{'MFU':>7}")
    for s, rs in results.items():
        ok = [r for r in rs if "tok_s" in r]
        if not ok:
            print(f"{s:<10}failed: {rs[0].get('error', '')[-200:]}")
            continue
        runs = " / ".join(str(r["tok_s"]) for r in ok)
        ratio = f"{med[s] / base:.2f}" if base else "-"
        ratio2 = f"{med[s] / plain:.2f}" if plain and not s.startswith("eval") else "-"
        # FLOPs a token: training 4N (forward, and the backward's input gradients; the frozen base has no weight
        # gradients), scoring 2N (forward only)
        mfu = med[s] * (2 if s.startswith("eval") else 4) * n_params / (PEAK_TFLOPS * 1e12)
        plan = ok[0].get("settings", {}).get("batch_plan", {})
        mb = f"{plan.get('per_device_batch_size', ok[0].get('settings', {}).get('per_device_batch_size'))}"
        reserved = max(r.get("reserved_gib", 0) for r in ok)
        print(f"{s:<16}{runs:<24}{med[s]:>8.0f}{max(r['peak_gib'] for r in ok):>10.1f}{reserved:>10.1f}{ratio:>12}"
              f"{ratio2:>10}{mfu:>7.1%}"
              f"  mb {mb} {ok[0].get('dynamo', '')}")


if __name__ == "__main__":
    main()
