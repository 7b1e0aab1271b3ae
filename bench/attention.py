"""The varlen attention kernels alone: PyTorch's flash-attention varlen kernel vs flash-attention 4 (CuTe DSL).

    python -m bench.attention [--tokens 16384] [--iters 20] [--out DIR]     # on a CUDA machine

One packed micro-batch as training sees it: ``--tokens`` tokens of conversations with the training data's lengths
(lognormal, mean ~1,300, cap 2048), Mistral-7B's heads (32 query, 8 key/value, 128 dims), bf16, causal within each
conversation. For each kernel: the first call's seconds (flash-attention 4 compiles its kernels then, or loads
them from its compile cache, ``varlen.fa4_cache_dir``, where an earlier process compiled them), then the median
milliseconds of forward and of forward + backward over ``--iters`` calls, the TFLOP/s that makes, and the largest
difference of the output and the gradients from PyTorch's kernel. Also the check ``sft_pipeline/varlen.py`` runs
before it uses flash-attention 4. Each kernel once, in this process (nothing here changes a process-wide
setting). Writes ``attention.json`` under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import traceback
from pathlib import Path


def lengths(tokens: int, seed: int = 0) -> list[int]:
    import random

    rng, out = random.Random(seed), []
    while sum(out) < tokens:
        out.append(max(16, min(2048, int(rng.lognormvariate(6.9, 0.7)))))
    out[-1] -= sum(out) - tokens
    return [n for n in out if n > 0]


def main() -> None:
    import torch

    from sft_pipeline import varlen

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    a = p.parse_args()
    lens = lengths(a.tokens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    longest = max(lens)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(a.tokens, h, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for h in (32, 8, 8))
    dout = torch.randn(a.tokens, 32, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    # causal attention FLOPs: 4 * dim * heads * sum(n^2 / 2) forward; the backward 2.5x that
    fwd_flops = 4 * 128 * 32 * sum(n * n / 2 for n in lens)
    result: dict = {"tokens": a.tokens, "sequences": len(lens), "longest": longest,
                    "card": torch.cuda.get_device_name(), "torch": torch.__version__}
    torch_kernel = varlen._torch_kernel()

    params = varlen._accepts(torch_kernel)  # torch 2.11: causal as window (-1, 0), grouped heads as they are
    extra = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    if "enable_gqa" in params:
        extra["enable_gqa"] = True

    def torch_call(q, k, v):
        return torch_kernel(q, k, v, cu, cu, longest, longest, **extra)

    def fa4_call(q, k, v):
        return varlen.fa4_kernel(q, k, v, cu, cu, longest, longest, is_causal=True, enable_gqa=True)

    def timed(fn, backward: bool) -> float:
        times = []
        for _ in range(a.iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            if backward:
                out = fn(q, k, v)
                torch.autograd.grad(out, (q, k, v), dout)
            else:
                with torch.no_grad():
                    fn(q, k, v)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    ref = None
    for name, fn in (("torch", torch_call), ("fa4", fa4_call)):
        row: dict = {}
        try:
            t0 = time.perf_counter()
            out = fn(q, k, v)
            grads = torch.autograd.grad(out, (q, k, v), dout)
            torch.cuda.synchronize()
            row["first_call_s"] = round(time.perf_counter() - t0, 2)
            if ref is None:
                ref = (out.detach(), grads)
            else:
                row["max_diff_out"] = float((out.detach() - ref[0]).abs().max())
                row["max_diff_grads"] = [float((x - y).abs().max()) for x, y in zip(grads, ref[1])]
            fwd, both = timed(fn, False), timed(fn, True)
            row.update(fwd_ms=round(fwd, 3), fwd_bwd_ms=round(both, 3), fwd_tflops=round(fwd_flops / fwd / 1e9, 1),
                       fwd_bwd_tflops=round(3.5 * fwd_flops / both / 1e9, 1))
        except Exception as e:  # noqa: BLE001 - a kernel that fails is a result to report
            row["error"] = f"{type(e).__name__}: {e}"
            row["traceback"] = traceback.format_exc()[-3000:]
        result[name] = row
        print(name, json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
        if "traceback" in row:
            print(row["traceback"], flush=True)
    if "error" not in result.get("fa4", {"error": 1}):
        result["check_passes"] = varlen.agrees(varlen.fa4_kernel, "cuda", torch.bfloat16)
        print("varlen.agrees(fa4_kernel):", result["check_passes"], flush=True)
    result["fa4_compile_cache"] = os.environ.get(varlen.FA4_CACHE_ENV[1])  # set on flash-attention 4's import
    print("flash-attention 4's compile cache:", result["fa4_compile_cache"], flush=True)
    Path(a.out, "attention.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
