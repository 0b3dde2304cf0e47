"""What this CPU's matrix units offer the exact sweep: its flags, and torch matmul throughput per dtype on one thread.

Prints whether the CPU has AMX tiles (``amx_bf16``, ``amx_int8``) or only AVX-512 BF16 / VNNI dot products, the
ISA oneDNN picks for a bf16 matmul, and GFLOP/s of float32 and bfloat16 ``torch.mm`` at large square sizes
(the units' peak) and at the sweep's shapes (a tile of queries × patches with a small inner dimension, where
writing the logits block to memory bounds torch). A split-precision sweep with ``L`` bf16 limbs of the query
does ``L`` products for each float32 one, so it can gain at most ``bf16 / (L · float32)`` over the float32
kernel; the last lines print that ceiling for L = 2 and 3.

    python benchmarks/bench_matrix_units.py
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch


def flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            line = next(line for line in f if line.startswith("flags"))
        return set(line.split(":", 1)[1].split())
    except (OSError, StopIteration):
        return set()


def gflops(dtype: torch.dtype, m: int, n: int, k: int, repeats: int) -> float:
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    torch.mm(a, b)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * m * n * k * repeats / (time.perf_counter() - start) / 1e9


def onednn_isa() -> str:
    code = "import torch; torch.set_num_threads(1); a = torch.randn(256, 256).bfloat16(); torch.mm(a, a)"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ONEDNN_VERBOSE": "1"}, capture_output=True, text=True)
    found = [part for line in out.stdout.splitlines() if ",matmul," in line for part in line.split(",") if "matmul:" in part]
    return found[0] if found else "not reported"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    have = flags()
    print("AMX tiles:", ", ".join(sorted(f for f in have if f.startswith("amx"))) or "none")
    print("AVX-512 dot products:", ", ".join(sorted(f for f in have if f in ("avx512_bf16", "avx512_vnni", "avx512_fp16"))) or "none")
    print("oneDNN bf16 matmul:", onednn_isa())
    shapes = [(1024, 1024, 1024), (2048, 2048, 2048), (256, 4096, 32), (256, 4096, 128)]
    peak = {}
    for m, n, k in shapes:
        rates = {str(d).removeprefix("torch."): gflops(d, m, n, k, args.repeats) for d in (torch.float32, torch.bfloat16)}
        print(f"{m}×{k} @ {k}×{n}: " + ", ".join(f"{d} {r:.1f} GFLOP/s" for d, r in rates.items())
              + f" (bf16/float32 {rates['bfloat16'] / rates['float32']:.2f}×)")
        if m == n == k:
            peak = {d: max(peak.get(d, 0.0), r) for d, r in rates.items()}
    ratio = peak["bfloat16"] / peak["float32"]
    for limbs in (2, 3):
        print(f"ceiling of a {limbs}-limb bf16 sweep over the float32 kernel at the units' peak: {ratio / limbs:.2f}×")


if __name__ == "__main__":
    main()
