/* What every kernel of the native layer shares: the headers, the OpenMP switch and the scalar exponentials.
 *
 * The exponential is a Cody–Waite range reduction (x = n·ln2 + u, |u| ≤ ln2/2) and a Taylor
 * polynomial of e^u (degree 7 in float: error < 5e-9; degree 13 in double: error < 2e-16),
 * written so the compiler vectorises the loops that call it. machines/native/build.py compiles
 * this file first, then the kernel files it lists, as one translation unit. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

static inline float exp_f32(float x)
{
    float n = rintf(x * 1.4426950408889634f);
    float u = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
    float p = 1.0f / 5040 + u * (1.0f / 40320);
    p = 1.0f / 720 + u * p; p = 1.0f / 120 + u * p; p = 1.0f / 24 + u * p;
    p = 1.0f / 6 + u * p; p = 0.5f + u * p; p = 1.0f + u * p; p = 1.0f + u * p;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static inline double exp_f64(double x)
{
    double n = rint(x * 1.4426950408889634);
    double u = (x - n * 0.6931471803691238) - n * 1.9082149292705877e-10;
    double p = 1.0 / 479001600 + u * (1.0 / 6227020800.0);
    p = 1.0 / 39916800 + u * p; p = 1.0 / 3628800 + u * p; p = 1.0 / 362880 + u * p;
    p = 1.0 / 40320 + u * p; p = 1.0 / 5040 + u * p; p = 1.0 / 720 + u * p; p = 1.0 / 120 + u * p;
    p = 1.0 / 24 + u * p; p = 1.0 / 6 + u * p; p = 0.5 + u * p; p = 1.0 + u * p; p = 1.0 + u * p;
    int64_t bits = ((int64_t)n + 1023) << 52;
    double scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* Threads for the register-tile kernels: each of `threads` threads takes a contiguous range of the queries
 * (rows) and runs the serial kernel on it with buffers of its own. The threads are OpenMP's: loaded into a
 * process where torch has loaded its libgomp.so.1, this library uses that same runtime and thread pool, whose
 * workers are then already awake after torch's own parallel operations, where threads of another pool would
 * compete with them for the cores. Compiled without OpenMP, the ranges run one after another, so the caller
 * splits the rows over threads itself and calls these with threads = 1 per range (see kernels_openmp). The two
 * wrappers in sweep.c (NAME_par, NAME_tree) are the library's entry points to the register-tile kernels. */
int kernels_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
