/* This core's float32 multiply-add peak, for benchmarks to report the fraction of it they reach: n rounds of 12
 * independent multiply-add chains of one vector register each (enough to cover the latency of two pipes),
 * peak_flops_per_round()·n flops: 16 lanes where the CPU has AVX-512, else 8 (AVX2). Returns a sum of the chains
 * so the work cannot be optimised away. */
#if defined(__AVX512F__)
#define PEAK_LANES 16
#else
#define PEAK_LANES 8
#endif

int64_t peak_flops_per_round(void) { return 2 * 12 * PEAK_LANES; }

float peak_f32(int64_t n)
{
    typedef float vpeak __attribute__((vector_size(PEAK_LANES * sizeof(float))));
    vpeak acc[12], x, y;
    for (int l = 0; l < PEAK_LANES; l++) {
        x[l] = 1.0000001f;
        y[l] = 1e-7f;
    }
    for (int i = 0; i < 12; i++) acc[i] = x * (float)i;
    for (int64_t r = 0; r < n; r++) {
        for (int i = 0; i < 12; i++) acc[i] = acc[i] * x + y;
        __asm__ volatile("" : "+x"(x));
    }
    float z = 0;
    for (int i = 0; i < 12; i++) z += acc[i][0];
    return z;
}
