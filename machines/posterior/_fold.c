/* Fused fold of one block of logits into online-softmax sums (machines/kernels.py loads this).
 *
 * For each row r of a logits block [R, M] (row stride ld), with running maximum m[r] and
 * sums acc[r, 0..V] (acc[r, V] = Σ w, acc[r, v] = Σ w·values[v]), in one pass over the row:
 *   block maximum; if it lies more than `skip` below m[r] the whole row is skipped (each of
 *   its weights is < e^-skip of the running maximum weight); else rescale the sums to the new
 *   maximum, w = e^(ℓ − m) with entries below −skip set to 0 without an exponential's worth of
 *   precision mattering, Σ w and Σ w·v.  The logits block is overwritten with the weights.
 * The exponential is a Cody–Waite range reduction (x = n·ln2 + u, |u| ≤ ln2/2) and a Taylor
 * polynomial of e^u (degree 7 in float: error < 5e-9; degree 13 in double: error < 2e-16),
 * written so the compiler vectorises the row loop. Sums are kept in double across blocks.
 * Returns the number of (row, entry) pairs whose exponential was skipped.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

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

#define FOLD(NAME, T, EXP)                                                                         \
    int64_t NAME(int64_t R, int64_t M, int64_t V, T *logits, int64_t ld, const T *values_t,       \
                 double *m, double *acc, double skip)                                              \
    {                                                                                              \
        int64_t skipped = 0;                                                                       \
        for (int64_t r = 0; r < R; r++) {                                                          \
            T *row = logits + r * ld;                                                              \
            T top = row[0];                                                                        \
            for (int64_t j = 1; j < M; j++) top = row[j] > top ? row[j] : top;                     \
            double m_old = m[r], *sums = acc + r * (V + 1);                                        \
            if ((double)top < m_old - skip) {                                                      \
                skipped += M;                                                                      \
                continue;                                                                          \
            }                                                                                      \
            if ((double)top > m_old) {                                                             \
                double scale = m_old - (double)top < -skip ? 0.0 : exp(m_old - (double)top);       \
                for (int64_t v = 0; v <= V; v++) sums[v] *= scale;                                 \
                m[r] = (double)top;                                                                \
            }                                                                                      \
            const T shift = (T)m[r], floor = (T)(-skip);                                           \
            T z = 0;                                                                               \
            int64_t low = 0;                                                                       \
            for (int64_t j = 0; j < M; j++) {                                                      \
                T d = row[j] - shift;                                                              \
                int below = d <= floor;                                                            \
                T w = EXP(below ? floor : d);                                                      \
                w = below ? (T)0 : w;                                                              \
                low += below;                                                                      \
                row[j] = w;                                                                        \
                z += w;                                                                            \
            }                                                                                      \
            skipped += low;                                                                        \
            sums[V] += z;                                                                          \
            for (int64_t v = 0; v < V; v++) {                                                      \
                const T *val = values_t + v * M;                                                   \
                T s = 0;                                                                           \
                for (int64_t j = 0; j < M; j++) s += row[j] * val[j];                              \
                sums[v] += s;                                                                      \
            }                                                                                      \
        }                                                                                          \
        return skipped;                                                                            \
    }

FOLD(fold_f32, float, exp_f32)
FOLD(fold_f64, double, exp_f64)

/* Importance-draw moments (the automatic policy's shared draws, machines/policy.py).
 *
 * For each row r of a logits block [R, M] (row stride ld) with running maximum m[r] (−1e300 at
 * the start) and sums s1[r, 0..C] = (Σ w·v_c, Σ w), s2[r, 0..2C] = (Σ w²·v_c, Σ w²·v_c², Σ w²),
 * w = e^(ℓ − m[r]): raise the maximum to the block's (rescaling s1 by e^(m_old − m) and s2 by its
 * square), then add the block's terms, all in one pass over the row for the weights and one per
 * channel for the values (values_t [C, M]). Weights below e^floor (floor = −80 in float, −700 in
 * double: no exponent underflow) are 0. The logits block is overwritten with the weights.
 */
#define MOMENTS(NAME, T, EXP, FLOOR)                                                               \
    void NAME(int64_t R, int64_t M, int64_t C, T *logits, int64_t ld, const T *values_t,          \
              double *m, double *s1, double *s2)                                                   \
    {                                                                                              \
        for (int64_t r = 0; r < R; r++) {                                                          \
            T *row = logits + r * ld;                                                              \
            double *a1 = s1 + r * (C + 1), *a2 = s2 + r * (2 * C + 1);                             \
            T top = row[0];                                                                        \
            for (int64_t j = 1; j < M; j++) top = row[j] > top ? row[j] : top;                     \
            if ((double)top > m[r]) {                                                              \
                double d = m[r] - (double)top;                                                     \
                double scale = d < -700.0 ? 0.0 : exp(d);                                          \
                for (int64_t c = 0; c <= C; c++) a1[c] *= scale;                                   \
                for (int64_t c = 0; c <= 2 * C; c++) a2[c] *= scale * scale;                       \
                m[r] = (double)top;                                                                \
            }                                                                                      \
            const T shift = (T)m[r], floor = (T)(FLOOR);                                           \
            T z = 0, z2 = 0;                                                                       \
            for (int64_t j = 0; j < M; j++) {                                                      \
                T d = row[j] - shift;                                                              \
                int below = d <= floor;                                                            \
                T w = EXP(below ? floor : d);                                                      \
                w = below ? (T)0 : w;                                                              \
                row[j] = w;                                                                        \
                z += w;                                                                            \
                z2 += w * w;                                                                       \
            }                                                                                      \
            a1[C] += z;                                                                            \
            a2[2 * C] += z2;                                                                       \
            for (int64_t c = 0; c < C; c++) {                                                      \
                const T *val = values_t + c * M;                                                   \
                T wv = 0, w2v = 0, w2vv = 0;                                                       \
                for (int64_t j = 0; j < M; j++) {                                                  \
                    T x = row[j] * val[j];                                                         \
                    wv += x;                                                                       \
                    w2v += x * row[j];                                                             \
                    w2vv += x * x;                                                                 \
                }                                                                                  \
                a1[c] += wv;                                                                       \
                a2[c] += w2v;                                                                      \
                a2[C + c] += w2vv;                                                                 \
            }                                                                                      \
        }                                                                                          \
    }

MOMENTS(moments_f32, float, exp_f32, -80.0f)
MOMENTS(moments_f64, double, exp_f64, -700.0)

/* Provenance scan (pipelines/retrieval.py's cluster scan): for each row r of a block of each
 * copy's own log weights ell [R, M] (row stride ld; entry j stands for log_c[j] identical copies,
 * distinct patch ids[j]), with running maximum m[r] (−1e300 at the start) of ell + log_c:
 *   Z[r] = Σ e^(ell + log_c − m),  S[r] = Σ e^(ell + log_c − m)·ell   (log Z and the entropy),
 * rescaled when the maximum rises; terms more than `skip` below the maximum add 0. And the K
 * largest ell per row, top[r, 0..K-1] descending with their ids in top_id (an equal value goes
 * after those already listed, so earlier entries win ties); −inf / −1 where fewer. One pass.
 */
void scan_f64(int64_t R, int64_t M, int64_t K, const double *ell, int64_t ld, const double *log_c, const int64_t *ids,
              double *m, double *Z, double *S, double *top, int64_t *top_id, double skip)
{
    for (int64_t r = 0; r < R; r++) {
        const double *row = ell + r * ld;
        double *t = top + r * K;
        int64_t *ti = top_id + r * K;
        double hi = row[0] + log_c[0];
        for (int64_t j = 1; j < M; j++) {
            double w = row[j] + log_c[j];
            hi = w > hi ? w : hi;
        }
        if (hi > m[r]) {
            double d = m[r] - hi;
            double scale = d < -skip ? 0.0 : exp(d);
            Z[r] *= scale;
            S[r] *= scale;
            m[r] = hi;
        }
        if (hi >= m[r] - skip) {
            const double shift = m[r], floor = -skip;
            double z = 0, s = 0;
            for (int64_t j = 0; j < M; j++) {
                double d = row[j] + log_c[j] - shift;
                int below = d <= floor;
                double w = exp_f64(below ? floor : d);
                w = below ? 0.0 : w;
                z += w;
                s += w * row[j];
            }
            Z[r] += z;
            S[r] += s;
        }
        double least = t[K - 1];
        for (int64_t j = 0; j < M; j++) {
            double v = row[j];
            if (!(v > least)) continue;
            int64_t i = K - 1;
            while (i > 0 && v > t[i - 1]) {
                t[i] = t[i - 1];
                ti[i] = ti[i - 1];
                i--;
            }
            t[i] = v;
            ti[i] = ids[j];
            least = t[K - 1];
        }
    }
}
