"""This core's float32 multiply-add peak, measured (``c/peak.c``): the yardstick benchmarks report against."""

from __future__ import annotations

import ctypes
import time

from .build import declare, require

declare("peak_f32", ctypes.c_float, [ctypes.c_int64])
declare("peak_flops_per_round", ctypes.c_int64, [])


def peak_gflops(seconds: float = 0.3) -> float:
    """This machine's float32 multiply-add peak on one core, measured (GFLOP/s): 12 independent multiply-add
    chains of one vector register each (16 lanes with AVX-512, else 8) in C for about ``seconds``, the best of three
    runs. Benchmarks report the fraction of it the exact backend reaches (the arithmetic floor of an exact pass)."""
    lib = require()
    n, best, flops = 1 << 20, 0.0, lib.peak_flops_per_round()
    while True:  # grow the run until it takes a measurable time
        start = time.perf_counter()
        lib.peak_f32(n)
        took = time.perf_counter() - start
        if took > seconds / 10:
            break
        n *= 4
    n = max(1, int(n * seconds / took))
    for _ in range(3):
        start = time.perf_counter()
        lib.peak_f32(n)
        best = max(best, flops * n / (time.perf_counter() - start) / 1e9)
    return best

