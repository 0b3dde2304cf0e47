/* Fused fold of one block of logits into online-softmax sums (machines/kernels.py loads this).
 *
 * For each row r of a logits block [R, M] (row stride ld), with running maximum m[r] and
 * sums acc[r, 0..V] (acc[r, V] = Σ w, acc[r, v] = Σ w·values[v]), in one pass over the row:
 *   block maximum; if it lies more than `skip` below m[r] the whole row is skipped (each of
 *   its weights is < e^-skip of the running maximum weight); else rescale the sums to the new
 *   maximum, w = e^(ℓ − m) with entries below −skip set to 0 without an exponential's worth of
 *   precision mattering, Σ w and Σ w·v.  The logits block may be overwritten with the weights.
 * The exponential is a Cody–Waite range reduction (x = n·ln2 + u, |u| ≤ ln2/2) and a Taylor
 * polynomial of e^u (degree 7 in float: error < 5e-9; degree 13 in double: error < 2e-16),
 * written so the compiler vectorises the row loop. Sums are kept in double across blocks.
 * Returns the number of (row, entry) pairs whose exponential was skipped.
 */
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

/* One row of logits row[0..width-1] (its maximum top given; vals: C rows of stride vld), folded into one
 * query's running maximum m and sums: row_T as FOLD describes (the first n entries count, the rest are
 * padding that weighs 0; may overwrite the row with the weights), mrow_T as MOMENTS describes. Shared by the
 * block kernels and the register-tile kernels; not inlined, so the compiler vectorises their loops. */
#define ROWS(T, EXP)                                                                                           \
    static inline T weight_##T(T d, T floor) /* e^d, or 0 at or below floor */                                 \
    {                                                                                                          \
        const int below = d <= floor;                                                                          \
        const T w = EXP(below ? floor : d);                                                                    \
        return below ? (T)0 : w;                                                                               \
    }                                                                                                          \
    __attribute__((noinline)) static int64_t row_##T(int64_t n, int64_t width, int64_t vld, int64_t C, T top, T *row, const T *vals,  \
                                                        double *m, double *sums, double skip)                  \
    {                                                                                                          \
        if ((double)top < *m - skip) return n;                                                                 \
        if ((double)top > *m) {                                                                                \
            double scale = *m - (double)top < -skip ? 0.0 : exp(*m - (double)top);                             \
            for (int64_t v = 0; v <= C; v++) sums[v] *= scale;                                                 \
            *m = (double)top;                                                                                  \
        }                                                                                                      \
        const T shift = (T)*m, floor = (T)(-skip);                                                             \
        T z = 0;                                                                                               \
        int64_t low = 0;                                                                                       \
        if (C == 1) {                                                                                          \
            T s = 0;                                                                                           \
            for (int64_t j = 0; j < width; j++) {                                                              \
                const T d = row[j] - shift, w = weight_##T(d, floor);                                          \
                low += d <= floor;                                                                             \
                z += w;                                                                                        \
                s += w * vals[j];                                                                              \
            }                                                                                                  \
            sums[0] += s;                                                                                      \
        } else {                                                                                               \
            for (int64_t j = 0; j < width; j++) {                                                              \
                const T d = row[j] - shift, w = weight_##T(d, floor);                                          \
                low += d <= floor;                                                                             \
                row[j] = w;                                                                                    \
                z += w;                                                                                        \
            }                                                                                                  \
            for (int64_t v = 0; v < C; v++) {                                                                  \
                const T *val = vals + v * vld;                                                                 \
                T s = 0;                                                                                       \
                for (int64_t j = 0; j < width; j++) s += row[j] * val[j];                                      \
                sums[v] += s;                                                                                  \
            }                                                                                                  \
        }                                                                                                      \
        sums[C] += z;                                                                                          \
        return low - (width - n);                                                                              \
    }                                                                                                          \
    /* The draws' moments of one row into a1, a2 (see MOMENTS); entries below floor (padding) weigh 0. */                 \
    __attribute__((noinline)) static void mrow_##T(int64_t width, int64_t vld, int64_t C, T top, T *row, const T *vals,  \
                                                      double *m, double *a1, double *a2, T floor)              \
    {                                                                                                          \
        if ((double)top > *m) {                                                                                \
            double d = *m - (double)top;                                                                       \
            double scale = d < -700.0 ? 0.0 : exp(d);                                                          \
            for (int64_t c = 0; c <= C; c++) a1[c] *= scale;                                                   \
            for (int64_t c = 0; c <= 2 * C; c++) a2[c] *= scale * scale;                                       \
            *m = (double)top;                                                                                  \
        }                                                                                                      \
        const T shift = (T)*m;                                                                                 \
        T z = 0, z2 = 0;                                                                                       \
        if (C == 1) {                                                                                          \
            T wv = 0, w2v = 0, w2vv = 0;                                                                       \
            for (int64_t j = 0; j < width; j++) {                                                              \
                const T w = weight_##T(row[j] - shift, floor);                                                 \
                z += w;                                                                                        \
                z2 += w * w;                                                                                   \
                T x = w * vals[j];                                                                             \
                wv += x;                                                                                       \
                w2v += x * w;                                                                                  \
                w2vv += x * x;                                                                                 \
            }                                                                                                  \
            a1[0] += wv;                                                                                       \
            a2[0] += w2v;                                                                                      \
            a2[1] += w2vv;                                                                                     \
        } else {                                                                                               \
            for (int64_t j = 0; j < width; j++) {                                                              \
                const T w = weight_##T(row[j] - shift, floor);                                                 \
                row[j] = w;                                                                                    \
                z += w;                                                                                        \
                z2 += w * w;                                                                                   \
            }                                                                                                  \
            for (int64_t c = 0; c < C; c++) {                                                                  \
                const T *val = vals + c * vld;                                                                 \
                T wv = 0, w2v = 0, w2vv = 0;                                                                   \
                for (int64_t j = 0; j < width; j++) {                                                          \
                    T x = row[j] * val[j];                                                                     \
                    wv += x;                                                                                   \
                    w2v += x * row[j];                                                                         \
                    w2vv += x * x;                                                                             \
                }                                                                                              \
                a1[c] += wv;                                                                                   \
                a2[c] += w2v;                                                                                  \
                a2[C + c] += w2vv;                                                                             \
            }                                                                                                  \
        }                                                                                                      \
        a1[C] += z;                                                                                            \
        a2[2 * C] += z2;                                                                                       \
    }

ROWS(float, exp_f32)
ROWS(double, exp_f64)

#define FOLD(NAME, T)                                                                                          \
    int64_t NAME(int64_t R, int64_t M, int64_t V, T *logits, int64_t ld, const T *values_t,                    \
                 double *m, double *acc, double skip)                                                          \
    {                                                                                                          \
        int64_t skipped = 0;                                                                                   \
        for (int64_t r = 0; r < R; r++) {                                                                      \
            T *row = logits + r * ld;                                                                          \
            T top = row[0];                                                                                    \
            for (int64_t j = 1; j < M; j++) top = row[j] > top ? row[j] : top;                                 \
            skipped += row_##T(M, M, M, V, top, row, values_t, m + r, acc + r * (V + 1), skip);                \
        }                                                                                                      \
        return skipped;                                                                                        \
    }

FOLD(fold_f32, float)
FOLD(fold_f64, double)

/* Importance-draw moments (the automatic policy's shared draws, machines/policy.py).
 *
 * For each row r of a logits block [R, M] (row stride ld) with running maximum m[r] (−1e300 at
 * the start) and sums s1[r, 0..C] = (Σ w·v_c, Σ w), s2[r, 0..2C] = (Σ w²·v_c, Σ w²·v_c², Σ w²),
 * w = e^(ℓ − m[r]): raise the maximum to the block's (rescaling s1 by e^(m_old − m) and s2 by its
 * square), then add the block's terms, all in one pass over the row for the weights and one per
 * channel for the values (values_t [C, M]). Weights below e^floor (floor = −80 in float, −700 in
 * double: no exponent underflow) are 0. The logits block may be overwritten with the weights.
 */
#define MOMENTS(NAME, T, FLOOR)                                                                                \
    void NAME(int64_t R, int64_t M, int64_t C, T *logits, int64_t ld, const T *values_t,                       \
              double *m, double *s1, double *s2)                                                               \
    {                                                                                                          \
        for (int64_t r = 0; r < R; r++) {                                                                      \
            T *row = logits + r * ld;                                                                          \
            T top = row[0];                                                                                    \
            for (int64_t j = 1; j < M; j++) top = row[j] > top ? row[j] : top;                                 \
            mrow_##T(M, M, C, top, row, values_t, m + r, s1 + r * (C + 1), s2 + r * (2 * C + 1), FLOOR);       \
        }                                                                                                      \
    }

MOMENTS(moments_f32, float, -80.0f)
MOMENTS(moments_f64, double, -700.0)

/* Provenance scan (pipelines/retrieval.py's cluster scan), one query: fold a row of each copy's own log
 * weights row[0..M-1] (entry j stands for log_c[j] identical copies, distinct patch ids[j]) into the
 * running maximum m (−1e300 at the start) of row + log_c and
 *   Z = Σ e^(row + log_c − m),  S = Σ e^(row + log_c − m)·row   (log Z and the entropy),
 * rescaled when the maximum rises; terms more than `skip` below the maximum add 0. And the K largest
 * row values, t[0..K-1] descending with their ids in ti (an equal value goes after those already
 * listed, so earlier entries win ties); −1e300 / −1 where fewer. Not inlined: on its own the compiler
 * vectorises its loops. */
__attribute__((noinline)) static void scan_row(int64_t M, int64_t K, const double *row, const double *log_c, const int64_t *ids,
                            double *m, double *Z, double *S, double *t, int64_t *ti, double skip)
{
    double hi = row[0] + log_c[0];
    for (int64_t j = 1; j < M; j++) {
        double w = row[j] + log_c[j];
        hi = w > hi ? w : hi;
    }
    if (hi > *m) {
        double d = *m - hi;
        double scale = d < -skip ? 0.0 : exp(d);
        *Z *= scale;
        *S *= scale;
        *m = hi;
    }
    if (hi >= *m - skip) {
        const double shift = *m, floor = -skip;
        double z = 0, s = 0;
        for (int64_t j = 0; j < M; j++) {
            double d = row[j] + log_c[j] - shift;
            int below = d <= floor;
            double w = exp_f64(below ? floor : d);
            w = below ? 0.0 : w;
            z += w;
            s += w * row[j];
        }
        *Z += z;
        *S += s;
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

/* The whole provenance sweep over a bucket's cluster tree in one call (no block per visit from the
 * caller): clusters are rows offsets[c]..offsets[c+1] of the int16 distinct patches [U, D]. Each of the
 * R queries qs [R, D] (already scaled by a/(s²·255)) first visits its cluster first[r]; then every
 * cluster c in turn is visited by the queries whose bound upper[c * ldu + r] (on any member's ell +
 * log_c) is at least m[r] − threshold, their running maximum less the pruning margin, checked when the
 * cluster comes up. A visit makes each member's ell = coef·sq_norms[j] + ⟨qs[r], patch j⟩ for four
 * queries at a time (the cluster's patches converted once per visit, transposed, so the products
 * vectorise over members) and folds it as scan_row does. Returns the (query, member) pairs computed,
 * or −1 if the work buffers could not be allocated. */
#define TILE 4
#define LANES 8
typedef double vlanes __attribute__((vector_size(LANES * sizeof(double))));
int64_t scan_tree(int64_t R, int64_t D, int64_t NC, const double *qs, const int16_t *patches, const double *sq_norms,
                  double coef, const double *log_c, const int64_t *ids, const int64_t *offsets, const double *upper,
                  int64_t ldu, const int64_t *first, double threshold, int64_t K, double *m, double *Z, double *S,
                  double *top, int64_t *top_id, double skip)
{
    int64_t leaf = 0;
    for (int64_t c = 0; c < NC; c++) {
        int64_t n = offsets[c + 1] - offsets[c];
        leaf = n > leaf ? n : leaf;
    }
    int64_t width = (leaf + LANES - 1) / LANES * LANES;
    double *keys = malloc(sizeof(double) * (size_t)(width * (D + 1 + TILE)));
    int64_t *open = malloc(sizeof(int64_t) * (size_t)(R > 0 ? R : 1));
    if (!keys || !open) {
        free(keys);
        free(open);
        return -1;
    }
    double *bias = keys + width * D, *ell = bias + width;
    int64_t pairs = 0;
    for (int pass = 0; pass < 2; pass++) {
        for (int64_t c = 0; c < NC; c++) {
            int64_t n_open = 0;
            const double *bound = upper + c * ldu;
            for (int64_t r = 0; r < R; r++)
                if (pass == 0 ? first[r] == c : first[r] != c && bound[r] >= m[r] - threshold)
                    open[n_open++] = r;
            if (!n_open)
                continue;
            const int64_t s = offsets[c], n = offsets[c + 1] - s;
            for (int64_t j = 0; j < width; j++) {
                const int in = j < n;
                bias[j] = in ? coef * sq_norms[s + j] : 0.0;
                for (int64_t d = 0; d < D; d++)
                    keys[d * width + j] = in ? (double)patches[(s + j) * D + d] : 0.0;
            }
            pairs += n_open * n;
            for (int64_t g = 0; g < n_open; g += TILE) {
                const int64_t T = n_open - g < TILE ? n_open - g : TILE;
                const double *q0 = qs + open[g] * D, *q1 = qs + open[g + (T > 1)] * D,
                             *q2 = qs + open[g + (T > 2) * 2] * D, *q3 = qs + open[g + (T > 3) * 3] * D;
                for (int64_t j0 = 0; j0 < width; j0 += LANES) {
                    vlanes b, k;
                    memcpy(&b, bias + j0, sizeof b);
                    vlanes a0 = b, a1 = b, a2 = b, a3 = b;
                    for (int64_t d = 0; d < D; d++) {
                        memcpy(&k, keys + d * width + j0, sizeof k);
                        a0 += q0[d] * k;
                        a1 += q1[d] * k;
                        a2 += q2[d] * k;
                        a3 += q3[d] * k;
                    }
                    memcpy(ell + j0, &a0, sizeof a0);
                    memcpy(ell + width + j0, &a1, sizeof a1);
                    memcpy(ell + 2 * width + j0, &a2, sizeof a2);
                    memcpy(ell + 3 * width + j0, &a3, sizeof a3);
                }
                for (int64_t i = 0; i < T; i++) {
                    const int64_t r = open[g + i];
                    scan_row(n, K, ell + i * width, log_c + s, ids + s, m + r, Z + r, S + r, top + r * K, top_id + r * K, skip);
                }
            }
        }
    }
    free(keys);
    free(open);
    return pairs;
}

/* The exact backend's whole pruned sweep over a bucket's cluster tree in one call (machines/posterior/exact.py):
 * clusters are rows offsets[c]..offsets[c+1] of the int16 distinct patches [U, D]. Each of the R queries qs
 * [R, D] (scaled by a/(s²·255), in T) first visits its cluster first[r]; then every cluster c in turn is visited
 * by the queries whose bound upper[c * ldu + r] is at least m[r] − threshold, checked when c comes up. A visit
 * converts the cluster's patches to T once (transposed [D, width], so products vectorise over members), makes
 * each member's logit ℓ = coef·sq_norms[j] + log_c[j] + ⟨qs[r], patch j⟩ in registers, SWEEP_TILE queries ×
 * SWEEP_NV vectors of VL members at a time (24 independent multiply-add chains, each key vector loaded once
 * for 6 queries: 6 × 4 measured fastest on this project's AVX-512 CPU, against 4 × 2 ... 12 × 2), with each
 * row's maximum taken on the way, and folds each row into the running maximum m[r] and the sums
 * acc[r, 0..C] = (Σ w·v, Σ w) as fold does, in one pass for grey data (values: the members' centre
 * coordinates patch[j, centre[i]]/255). Padding members (up to the vector width) have logit −1e30 and weigh 0.
 * Returns the (query, member) pairs computed (−1 if the work buffers could not be allocated) and adds to
 * *skipped the pairs whose exponential was skipped. */
#define SWEEP_TILE 6
#define SWEEP_NV 4
#ifndef SWEEP_CACHE
#define SWEEP_CACHE (256 * 1024)
#endif
#define SWEEP(NAME, T, EXP, VL)                                                                                \
    typedef T NAME##_vec __attribute__((vector_size(VL * sizeof(T))));                                         \
    /* Keys per sub-block: a multiple of the tile width whose D rows fit in SWEEP_CACHE bytes (kept in L2 while  \
     * every query tile passes over them), at most width. */                                                   \
    static int64_t NAME##_sub(int64_t D, int64_t width)                                                        \
    {                                                                                                          \
        const int64_t step = SWEEP_NV * VL;                                                                    \
        int64_t sub = SWEEP_CACHE / ((int64_t)sizeof(T) * (D > 0 ? D : 1)) / step * step;                      \
        sub = sub < step ? step : sub;                                                                         \
        return sub < width ? sub : width;                                                                      \
    }                                                                                                          \
    /* Logits of SWEEP_TILE queries qt[i] [D] against width keys (keys [D, ld], bias [width]) into ell         \
     * [SWEEP_TILE, width], each row's maximum into top[i]. */                                                 \
    static void NAME##_tile(int64_t D, int64_t ld, int64_t width, const T *const *qt, const T *keys, const T *bias, T *ell,  \
                            T *top)                                                                            \
    {                                                                                                          \
        NAME##_vec hs[SWEEP_TILE];                                                                             \
        for (int64_t i = 0; i < SWEEP_TILE; i++)                                                               \
            for (int64_t l = 0; l < VL; l++) hs[i][l] = (T)-1e30;                                              \
        for (int64_t j0 = 0; j0 < width; j0 += SWEEP_NV * VL) {                                                \
            NAME##_vec acc_[SWEEP_TILE][SWEEP_NV], k_[SWEEP_NV];                                               \
            _Pragma("GCC unroll 8") for (int64_t u = 0; u < SWEEP_NV; u++) {                                   \
                memcpy(&k_[u], bias + j0 + u * VL, sizeof k_[u]);                                              \
                _Pragma("GCC unroll 8") for (int64_t i = 0; i < SWEEP_TILE; i++) acc_[i][u] = k_[u];           \
            }                                                                                                  \
            for (int64_t d = 0; d < D; d++) {                                                                  \
                _Pragma("GCC unroll 8") for (int64_t u = 0; u < SWEEP_NV; u++)                                 \
                    memcpy(&k_[u], keys + d * ld + j0 + u * VL, sizeof k_[u]);                                 \
                _Pragma("GCC unroll 8") for (int64_t i = 0; i < SWEEP_TILE; i++) {                             \
                    const T qd = qt[i][d];                                                                     \
                    _Pragma("GCC unroll 8") for (int64_t u = 0; u < SWEEP_NV; u++) acc_[i][u] += qd * k_[u];   \
                }                                                                                              \
            }                                                                                                  \
            _Pragma("GCC unroll 8") for (int64_t i = 0; i < SWEEP_TILE; i++)                                   \
                _Pragma("GCC unroll 8") for (int64_t u = 0; u < SWEEP_NV; u++) {                               \
                    for (int64_t l = 0; l < VL; l++) hs[i][l] = acc_[i][u][l] > hs[i][l] ? acc_[i][u][l] : hs[i][l];  \
                    memcpy(ell + i * width + j0 + u * VL, &acc_[i][u], sizeof acc_[i][u]);                     \
                }                                                                                              \
        }                                                                                                      \
        for (int64_t i = 0; i < SWEEP_TILE; i++) {                                                             \
            top[i] = hs[i][0];                                                                                 \
            for (int64_t l = 1; l < VL; l++) top[i] = hs[i][l] > top[i] ? hs[i][l] : top[i];                   \
        }                                                                                                      \
    }                                                                                                          \
    /* A block of n keys (keys_t [D, width], transposed, zero beyond n; bias [width] with −1e30 on padding; vals \
     * [C, width]; width a multiple of SWEEP_NV·VL) against R queries qs [R, D], one sub-block of keys that stays \
     * in L2 at a time: mode 0 folds each row into m, sums [R, C+1] as fold does (returns the pairs whose      \
     * exponential was skipped); mode 1 folds the draws' moments into m, sums [R, C+1] and sums2 [R, 2C+1] as  \
     * moments does. */                                                                                        \
    static int64_t NAME##_block(int64_t R, int64_t D, int64_t n, int64_t width, int64_t C, const T *qs, const T *keys_t, \
                         const T *bias, const T *vals, double *m, double *sums, double *sums2, double skip, int mode) \
    {                                                                                                          \
        const int64_t sub = NAME##_sub(D, width);                                                              \
        T *ell = aligned_alloc(64, sizeof(T) * (size_t)(sub * SWEEP_TILE));                                    \
        if (!ell) return -1;                                                                                   \
        int64_t low = 0;                                                                                       \
        for (int64_t b0 = 0; b0 < width && b0 < n; b0 += sub) {                                                \
            const int64_t len = width - b0 < sub ? width - b0 : sub, valid = n - b0 < len ? n - b0 : len;      \
            for (int64_t g = 0; g < R; g += SWEEP_TILE) {                                                      \
                const int64_t nt = R - g < SWEEP_TILE ? R - g : SWEEP_TILE;                                    \
                const T *qt[SWEEP_TILE];                                                                       \
                T top[SWEEP_TILE];                                                                             \
                for (int64_t i = 0; i < SWEEP_TILE; i++) qt[i] = qs + (g + (i < nt ? i : nt - 1)) * D;         \
                NAME##_tile(D, width, len, qt, keys_t + b0, bias + b0, ell, top);                                     \
                for (int64_t i = 0; i < nt; i++) {                                                             \
                    const int64_t r = g + i;                                                                   \
                    if (mode == 0)                                                                             \
                        low += row_##T(valid, len, width, C, top[i], ell + i * len, vals + b0, m + r,       \
                                          sums + r * (C + 1), skip);                                           \
                    else                                                                                       \
                        mrow_##T(len, width, C, top[i], ell + i * len, vals + b0, m + r, sums + r * (C + 1),  \
                                    sums2 + r * (2 * C + 1), (T)(-skip));                                      \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
        free(ell);                                                                                             \
        return low;                                                                                            \
    }                                                                                                          \
    static int64_t NAME(int64_t R, int64_t D, int64_t NC, const T *qs, const int16_t *patches, const double *sq_norms, \
                 double coef, const double *log_c, const int64_t *centre, int64_t C, const int64_t *offsets,   \
                 const double *upper, int64_t ldu, const int64_t *first, double threshold, double *m,          \
                 double *acc, double skip, int64_t *skipped)                                                   \
    {                                                                                                          \
        int64_t leaf = 0;                                                                                      \
        for (int64_t c = 0; c < NC; c++) {                                                                     \
            int64_t n = offsets[c + 1] - offsets[c];                                                           \
            leaf = n > leaf ? n : leaf;                                                                        \
        }                                                                                                      \
        const int64_t step = SWEEP_NV * VL, width = (leaf + step - 1) / step * step, sub = NAME##_sub(D, width);  \
        T *keys = aligned_alloc(64, sizeof(T) * (size_t)(width * (D + 1 + C) + sub * SWEEP_TILE));             \
        int64_t *open = malloc(sizeof(int64_t) * (size_t)(R > 0 ? R : 1));                                     \
        if (!keys || !open) {                                                                                  \
            free(keys);                                                                                        \
            free(open);                                                                                        \
            return -1;                                                                                         \
        }                                                                                                      \
        T *bias = keys + width * D, *vals = bias + width, *ell = vals + width * C;                             \
        int64_t pairs = 0, low = 0;                                                                            \
        for (int pass = 0; pass < 2; pass++) {                                                                 \
            for (int64_t c = 0; c < NC; c++) {                                                                 \
                int64_t n_open = 0;                                                                            \
                const double *bound = upper + c * ldu;                                                         \
                for (int64_t r = 0; r < R; r++)                                                                \
                    if (pass == 0 ? first[r] == c : first[r] != c && bound[r] >= m[r] - threshold)             \
                        open[n_open++] = r;                                                                    \
                if (!n_open) continue;                                                                         \
                const int64_t s = offsets[c], n = offsets[c + 1] - s;                                          \
                for (int64_t j = 0; j < width; j++) {                                                          \
                    const int in = j < n;                                                                      \
                    bias[j] = in ? (T)(coef * sq_norms[s + j] + log_c[s + j]) : (T)-1e30;                      \
                    for (int64_t d = 0; d < D; d++)                                                            \
                        keys[d * width + j] = in ? (T)patches[(s + j) * D + d] : (T)0;                         \
                    for (int64_t v = 0; v < C; v++)                                                            \
                        vals[v * width + j] = in ? (T)patches[(s + j) * D + centre[v]] / (T)255 : (T)0;        \
                }                                                                                              \
                pairs += n_open * n;                                                                           \
                for (int64_t b0 = 0; b0 < n; b0 += sub) {                                                      \
                    const int64_t len = width - b0 < sub ? width - b0 : sub, valid = n - b0 < len ? n - b0 : len;  \
                    for (int64_t g = 0; g < n_open; g += SWEEP_TILE) {                                         \
                        const int64_t nt = n_open - g < SWEEP_TILE ? n_open - g : SWEEP_TILE;                  \
                        const T *qt[SWEEP_TILE];                                                               \
                        T top[SWEEP_TILE];                                                                     \
                        for (int64_t i = 0; i < SWEEP_TILE; i++) qt[i] = qs + open[g + (i < nt ? i : nt - 1)] * D;  \
                        NAME##_tile(D, width, len, qt, keys + b0, bias + b0, ell, top);                        \
                        for (int64_t i = 0; i < nt; i++) {                                                     \
                            const int64_t r = open[g + i];                                                     \
                            low += row_##T(valid, len, width, C, top[i], ell + i * len, vals + b0, m + r,   \
                                              acc + r * (C + 1), skip);                                        \
                        }                                                                                      \
                    }                                                                                          \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
        free(keys);                                                                                            \
        free(open);                                                                                            \
        *skipped += low;                                                                                       \
        return pairs;                                                                                          \
    }

SWEEP(sweep_f32, float, exp_f32, 16)
SWEEP(sweep_f64, double, exp_f64, 8)

/* Row lookup for provenance's source maps: which row of a table of distinct int16 rows [U, D] each
 * of N query rows [N, D] equals. An open-addressing hash table of T slots (a power of two ≥ 2U,
 * int64, filled with −1 by the caller) is built once (match_build: returns −1 if two table rows are
 * equal, else 0) and probed per query row (match_find: out[i] = the table row, or −1 where none is
 * equal; returns how many found none). Every hit is checked value by value, so a hash collision can
 * never give a wrong match. */
static inline uint64_t row_hash(const int16_t *row, int64_t D)
{
    uint64_t h = 0x9E3779B97F4A7C15ull;
    for (int64_t d = 0; d < D; d++) h = (h ^ (uint16_t)row[d]) * 0x100000001B3ull + (h >> 29);
    h ^= h >> 31;
    h *= 0xBF58476D1CE4E5B9ull;
    return h ^ (h >> 29);
}

int64_t match_build(int64_t U, int64_t D, const int16_t *rows, int64_t T, int64_t *table)
{
    const uint64_t mask = (uint64_t)T - 1;
    uint64_t slot[32];
    for (int64_t g = 0; g < U; g += 32) {  /* hash 32 rows and prefetch their slots, then insert them */
        const int64_t n = U - g < 32 ? U - g : 32;
        for (int64_t i = 0; i < n; i++) {
            slot[i] = row_hash(rows + (g + i) * D, D) & mask;
            __builtin_prefetch(table + slot[i], 1);
        }
        for (int64_t i = 0; i < n; i++) {
            const int16_t *row = rows + (g + i) * D;
            uint64_t s = slot[i];
            while (table[s] >= 0) {
                if (memcmp(rows + table[s] * D, row, (size_t)D * sizeof(int16_t)) == 0) return -1;
                s = (s + 1) & mask;
            }
            table[s] = g + i;
        }
    }
    return 0;
}

/* Look up 32 rows at a time (buf: n rows of D values): hash all and prefetch their slots, then prefetch
 * the table rows the slots name, then compare, so the random reads of a large table overlap. */
static int64_t match_group(int64_t D, const int16_t *rows, uint64_t mask, const int64_t *table, int64_t n,
                           const int16_t *buf, int64_t *out)
{
    uint64_t slot[32];
    int64_t missing = 0;
    for (int64_t i = 0; i < n; i++) {
        slot[i] = row_hash(buf + i * D, D) & mask;
        __builtin_prefetch(table + slot[i]);
    }
    for (int64_t i = 0; i < n; i++)
        if (table[slot[i]] >= 0) __builtin_prefetch(rows + table[slot[i]] * D);
    for (int64_t i = 0; i < n; i++) {
        const int16_t *row = buf + i * D;
        uint64_t s = slot[i];
        int64_t found = -1;
        while (table[s] >= 0) {
            if (memcmp(rows + table[s] * D, row, (size_t)D * sizeof(int16_t)) == 0) {
                found = table[s];
                break;
            }
            s = (s + 1) & mask;
        }
        out[i] = found;
        missing += found < 0;
    }
    return missing;
}

int64_t match_find(int64_t D, const int16_t *rows, int64_t T, const int64_t *table, int64_t N, const int16_t *queries,
                   int64_t *out)
{
    int64_t missing = 0;
    for (int64_t g = 0; g < N; g += 32)
        missing += match_group(D, rows, (uint64_t)T - 1, table, N - g < 32 ? N - g : 32, queries + g * D, out + g);
    return missing;
}

/* match_find for the P×P windows of padded images [B, C, Hp, Wp] whose top-left corners are locs [L, 2]
 * (row i, col j), each flattened channel-major (c, row, col) as patchbank.geometry.patches_at does;
 * out [B, L], image-major. buf: scratch for 32 windows (32·C·P·P values). */
int64_t match_windows(const int16_t *rows, int64_t T, const int64_t *table, int64_t B, int64_t C, int64_t Hp, int64_t Wp,
                      const int16_t *images, int64_t L, const int64_t *locs, int64_t P, int16_t *buf, int64_t *out)
{
    const int64_t D = C * P * P;
    int64_t missing = 0, n = 0, at = 0;
    for (int64_t b = 0; b < B; b++)
        for (int64_t l = 0; l < L; l++) {
            const int16_t *corner = images + b * C * Hp * Wp + locs[2 * l] * Wp + locs[2 * l + 1];
            int16_t *row = buf + n * D;
            for (int64_t c = 0; c < C; c++)
                for (int64_t i = 0; i < P; i++)
                    memcpy(row + (c * P + i) * P, corner + c * Hp * Wp + i * Wp, (size_t)P * sizeof(int16_t));
            if (++n == 32 || (b == B - 1 && l == L - 1)) {
                missing += match_group(D, rows, (uint64_t)T - 1, table, n, buf, out + at);
                at += n;
                n = 0;
            }
        }
    return missing;
}

/* A stable counting sort: order[cursor[key[i]]++] = i for i = 0..N−1, keys in [0, K); cursor [K] starts
 * at each key's first position (the exclusive cumulative sum of the key counts) and is advanced. */
void counting_order(int64_t N, const int64_t *key, int64_t *cursor, int64_t *order)
{
    for (int64_t i = 0; i < N; i++) order[cursor[key[i]]++] = i;
}

/* This core's float32 multiply-add peak, for benchmarks to report the fraction of it they reach: n rounds of 12
 * independent 16-lane multiply-add chains (enough to cover the latency of two pipes), 384·n flops. Returns a sum
 * of the chains so the work cannot be optimised away. */
float peak_f32(int64_t n)
{
    typedef float v16 __attribute__((vector_size(64)));
    v16 acc[12], x, y;
    for (int l = 0; l < 16; l++) {
        x[l] = 1.0000001f;
        y[l] = 1e-7f;
    }
    for (int i = 0; i < 12; i++) acc[i] = x * (float)i;
    for (int64_t r = 0; r < n; r++) {
        for (int i = 0; i < 12; i++) acc[i] = acc[i] * x + y;
        __asm__ volatile("" : "+v"(x));
    }
    float z = 0;
    for (int i = 0; i < 12; i++) z += acc[i][0];
    return z;
}

/* Threads for the register-tile kernels: each of `threads` threads takes a contiguous range of the queries
 * (rows) and runs the serial kernel on it with buffers of its own. The threads are OpenMP's: loaded into a
 * process where torch has loaded its libgomp.so.1, this library uses that same runtime and thread pool, whose
 * workers are then already awake after torch's own parallel operations, where threads of another pool would
 * compete with them for the cores. Compiled without OpenMP, the ranges run one after another, so the caller
 * splits the rows over threads itself and calls these with threads = 1 per range (see kernels_openmp). These two
 * wrappers are the library's entry points to the register-tile kernels. */
int kernels_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

#define PARALLEL(NAME, T)                                                                                  \
    int64_t NAME##_par(int threads, int64_t R, int64_t D, int64_t n, int64_t width, int64_t C, const T *qs,    \
                       const T *keys, const T *bias, const T *vals, double *m, double *sums, double *sums2,   \
                       double skip, int mode)                                                              \
    {                                                                                                      \
        int64_t total = 0, failed = 0;                                                                     \
        _Pragma("omp parallel for num_threads(threads) schedule(static, 1) reduction(+ : total, failed)")   \
        for (int t = 0; t < threads; t++) {                                                                \
            const int64_t s = R * t / threads, e = R * (t + 1) / threads;                                  \
            const int64_t done = NAME##_block(e - s, D, n, width, C, qs + s * D, keys, bias, vals, m + s,  \
                                              sums + s * (C + 1), sums2 ? sums2 + s * (2 * C + 1) : sums2, skip, mode); \
            failed += done < 0;                                                                            \
            total += done < 0 ? 0 : done;                                                                  \
        }                                                                                                  \
        return failed ? -1 : total;                                                                        \
    }                                                                                                      \
    int64_t NAME##_tree(int threads, int64_t R, int64_t D, int64_t NC, const T *qs, const int16_t *patches,   \
                        const double *sq_norms, double coef, const double *log_c, const int64_t *centre, int64_t C, \
                        const int64_t *offsets, const double *upper, int64_t ldu, const int64_t *first, double threshold, \
                        double *m, double *acc, double skip, int64_t *skipped)                             \
    {                                                                                                      \
        int64_t total = 0, failed = 0, low = 0;                                                            \
        _Pragma("omp parallel for num_threads(threads) schedule(static, 1) reduction(+ : total, failed, low)") \
        for (int t = 0; t < threads; t++) {                                                                \
            const int64_t s = R * t / threads, e = R * (t + 1) / threads;                                  \
            int64_t mine = 0;                                                                              \
            const int64_t done = NAME(e - s, D, NC, qs + s * D, patches, sq_norms, coef, log_c, centre, C,  \
                                      offsets, upper + s, ldu, first + s, threshold, m + s, acc + s * (C + 1), skip, &mine); \
            failed += done < 0;                                                                            \
            total += done < 0 ? 0 : done;                                                                  \
            low += mine;                                                                                   \
        }                                                                                                  \
        *skipped += low;                                                                                   \
        return failed ? -1 : total;                                                                        \
    }

PARALLEL(sweep_f32, float)
PARALLEL(sweep_f64, double)

/* Posterior means of a patch machine at several scales at once, by box sums (machines/multiscale.py).
 *
 * A pair (query pixel y,x of image b; training patch at y+dy,x+dx of image n) has, at radius r, the log weight
 * ℓ = c1·⟨q, p⟩_r + c2·‖p‖²_r (c1 = a/s², c2 = −a²/(2s²); ‖q‖² is the same for every entry of a pixel's
 * posterior and drops out). For one displacement (dy, dx), ⟨q, p⟩_r over every pixel is the box sum of radius r
 * of one product map M(y, x) = Σ_c q(c, y, x)·x_n(c, y+dy, x+dx): one integral image of M gives it at every
 * pixel and every radius, with four reads. So the products are made once for all scales, and each scale costs a
 * few additions, an exponential and the fold per pair, however large its patch. Zero padding: M is zero where
 * either pixel lies outside its image, so the integral covers the overlap of the two, its columns extended by
 * the largest radius (zeros left, the row total right) and its row indices clamped. Circular padding: M lives on
 * the torus, and the integral covers it extended by the largest radius on every side. Which pairs count is the
 * machine's rule: LS only dy = dx = 0; ELS every displacement; bbELS every displacement at pixels whose
 * zero-padding pattern the training patch shares (rows: dy = 0, or both rows at least r from the borders;
 * columns alike).
 *
 * Vector lanes are BOX_K adjacent pixels of a row, whose running state (maximum, Σw, Σw·v_c per query, scale and
 * pixel; a few hundred KB per query) stays in cache while BOX_G training images pass through it. Each row of an
 * integral image is a prefix sum made in registers (three shifted additions per vector). A pixel's maximum is
 * raised (rescaling its sums) only when a logit exceeds it, and a vector of pairs all more than `skip` below their
 * maxima adds nothing without an exponential. Everything is double. */
#define BOX_K 8
#define BOX_G 8
#define BOX_CMAX 4 /* channels at most */

/* GCC/Clang vector extensions: one AVX-512 register (two or four narrower ones where the CPU has no AVX-512). */
typedef double v8d __attribute__((vector_size(64)));
typedef int64_t v8i __attribute__((vector_size(64)));

static inline v8d ld8(const double *p) { v8d v; memcpy(&v, p, sizeof v); return v; }
static inline void st8(double *p, v8d v) { memcpy(p, &v, sizeof v); }
static inline v8d sel8(v8i mask, v8d a, v8d b) { return (v8d)(((v8i)a & mask) | ((v8i)b & ~mask)); }
static inline v8d max8(v8d a, v8d b) { return sel8(a > b, a, b); }
static inline v8d splat8(double v) { return (v8d){0} + v; }

#if defined(__clang__)
#define SHUF8(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUF8(a, b, ...) __builtin_shuffle(a, b, (v8i){__VA_ARGS__})
#endif

/* Inclusive prefix sum of the lanes plus carry (every lane of carry equal). */
static inline v8d scan8(v8d v, v8d carry)
{
    const v8d z = {0};
    v += SHUF8(v, z, 8, 0, 1, 2, 3, 4, 5, 6);
    v += SHUF8(v, z, 8, 9, 0, 1, 2, 3, 4, 5);
    v += SHUF8(v, z, 8, 9, 10, 11, 0, 1, 2, 3);
    return v + carry;
}
static inline v8d last8(v8d v) { return SHUF8(v, v, 7, 7, 7, 7, 7, 7, 7, 7); }

/* Whether any lane of a exceeds b's. */
#if defined(__AVX512F__)
#include <immintrin.h>
static inline int gt8(v8d a, v8d b) { return _mm512_cmp_pd_mask((__m512d)a, (__m512d)b, _CMP_GT_OQ) != 0; }
#else
static inline int gt8(v8d a, v8d b)
{
    int r = 0;
    for (int k = 0; k < BOX_K; k++) r |= a[k] > b[k];
    return r;
}
#endif

/* The Taylor coefficients of e^u that exp_f64 applies from the second-highest term down (1/12! … 1, 1). */
static const double EXP_TERMS[12] = {1.0 / 39916800, 1.0 / 3628800, 1.0 / 362880, 1.0 / 40320, 1.0 / 5040, 1.0 / 720,
                                     1.0 / 120, 1.0 / 24, 1.0 / 6, 0.5, 1.0, 1.0};

/* e^x for x in [−700, 0] per lane, as exp_f64 (error < 2e-16). */
static inline v8d exp8(v8d x)
{
    const v8i ni = __builtin_convertvector(x * -1.4426950408889634 + 0.5, v8i); /* −round(x/ln2): truncation of ≥ 0 */
    const v8d n = -__builtin_convertvector(ni, v8d);
    const v8d u = (x - n * 0.6931471803691238) - n * 1.9082149292705877e-10;
    v8d p = 1.0 / 479001600 + u * (1.0 / 6227020800.0);
    for (int i = 0; i < 12; i++) p = EXP_TERMS[i] + u * p;
    const v8i bits = (1023 - ni) << 52;
    v8d scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* e^d per lane where d > −700, else 0. */
static inline v8d weight8(v8d d)
{
    const v8i keep = d > splat8(-700.0);
    return sel8(keep, exp8(sel8(keep, d, (v8d){0})), (v8d){0});
}

/* weight8 of BOX_G vectors at once, each step of the polynomial applied to all of them before the next, so the
 * CPU sees BOX_G independent chains side by side rather than one long chain at a time. */
static inline void exp8s(const v8d *d, v8d *w)
{
    v8d u[BOX_G], p[BOX_G];
    v8i ni[BOX_G], keep[BOX_G];
    for (int g = 0; g < BOX_G; g++) {
        keep[g] = d[g] > splat8(-700.0);
        const v8d x = sel8(keep[g], d[g], (v8d){0});
        ni[g] = __builtin_convertvector(x * -1.4426950408889634 + 0.5, v8i);
        const v8d n = -__builtin_convertvector(ni[g], v8d);
        u[g] = (x - n * 0.6931471803691238) - n * 1.9082149292705877e-10;
        p[g] = 1.0 / 479001600 + u[g] * (1.0 / 6227020800.0);
    }
    for (int i = 0; i < 12; i++)
        for (int g = 0; g < BOX_G; g++) p[g] = EXP_TERMS[i] + u[g] * p[g];
    for (int g = 0; g < BOX_G; g++) {
        const v8i bits = (1023 - ni[g]) << 52;
        v8d scale;
        memcpy(&scale, &bits, sizeof scale);
        w[g] = sel8(keep[g], p[g] * scale, (v8d){0});
    }
}

typedef struct {
    int64_t B, N, C, H, W, NP, R, rule, circular;
    const int64_t *radii;
    double c1, c2, skip;
    int64_t XW, IW, IH, SW; /* row lengths: training images, integral images, states; integral rows */
} box_spec;

/* The integral image I (row stride s->IW) of a map M of h rows and w columns (row stride ldm; lanes up to the
 * next multiple of BOX_K past w must be readable and are ignored): zero padding: rows 0..h, column c sums the
 * map columns < c − R; circular: the map is periodic (period h, w) and row i, column c sum the map rows < i − R
 * and columns < c − R from −R on. row: scratch of w + 2R + BOX_K doubles. */
static void box_integral(const box_spec *s, double *I, const double *M, int64_t h, int64_t w, int64_t ldm, double *row)
{
    const int64_t R = s->R, ld = s->IW, rows = s->circular ? h + 2 * R : h, cols = w + 2 * R;
    const int64_t used = (cols + 1 + 2 * BOX_K - 1) / BOX_K * BOX_K; /* the columns box sums read, in whole vectors */
    const v8d zero = {0};
    v8i tail = {0}; /* the lanes of the last vector of a map row that lie in the map */
    for (int64_t k = 0; k < BOX_K; k++) tail[k] = k < w - (w - 1) / BOX_K * BOX_K ? -1 : 0;
    for (int64_t c = 0; c < used; c += BOX_K) st8(I + c, zero);
    for (int64_t i = 1; i <= rows; i++) {
        const int64_t u = s->circular ? (((i - 1 - R) % h) + h) % h : i - 1;
        const double *src = M + u * ldm, *above = I + (i - 1) * ld;
        double *out = I + i * ld;
        v8d carry = zero;
        /* each vector's prefix sums are added to the row above as they are made (the stores and loads of one
         * row then share their alignment, so none waits for a store to retire) */
        if (s->circular) { /* the row extended periodically by R each side, its prefix sums from column 1 */
            for (int64_t j = 0, v = (((-R) % w) + w) % w; j < cols; j++, v = v + 1 == w ? 0 : v + 1) row[j] = src[v];
            for (int64_t j = cols; j < cols + BOX_K; j++) row[j] = 0.0;
            out[0] = 0.0;
            for (int64_t j = 0; j < cols; j += BOX_K) {
                const v8d p = scan8(ld8(row + j), carry);
                st8(out + 1 + j, ld8(above + 1 + j) + p);
                carry = last8(p);
            }
        } else { /* zeros up to column R, the prefix sums of the w map columns, then the row total */
            for (int64_t j = 0; j <= R; j += BOX_K) st8(out + j, zero);
            for (int64_t j = 0; j < w; j += BOX_K) {
                const v8d v = j + BOX_K >= w ? sel8(tail, ld8(src + j), zero) : ld8(src + j);
                const v8d p = scan8(v, carry);
                st8(out + R + 1 + j, ld8(above + R + 1 + j) + p);
                carry = last8(p);
            }
            const int64_t done = R + 1 + (w + BOX_K - 1) / BOX_K * BOX_K;
            for (int64_t c = done; c < used; c++) out[c] = above[c] + carry[0];
        }
    }
}

/* The pixels [y0, y1) × [x0, x1) of a query image whose pairs at displacement (dy, dx) and radius r count. */
static int box_valid(const box_spec *s, int64_t dy, int64_t dx, int64_t r, int64_t *y0, int64_t *y1, int64_t *x0, int64_t *x1)
{
    const int64_t H = s->H, W = s->W;
    if (s->circular) { *y0 = 0; *y1 = H; *x0 = 0; *x1 = W; }
    else {
        *y0 = dy < 0 ? -dy : 0; *y1 = dy > 0 ? H - dy : H;
        *x0 = dx < 0 ? -dx : 0; *x1 = dx > 0 ? W - dx : W;
    }
    if (s->rule == 2) {
        if (dy != 0) {
            const int64_t a = dy < 0 ? r - dy : r, b = dy > 0 ? H - r - dy : H - r;
            *y0 = *y0 > a ? *y0 : a; *y1 = *y1 < b ? *y1 : b;
        }
        if (dx != 0) {
            const int64_t a = dx < 0 ? r - dx : r, b = dx > 0 ? W - r - dx : W - r;
            *x0 = *x0 > a ? *x0 : a; *x1 = *x1 < b ? *x1 : b;
        }
    }
    return *y0 < *y1 && *x0 < *x1;
}

static inline int64_t clamp64(int64_t v, int64_t hi) { return v < 0 ? 0 : v > hi ? hi : v; }

/* One row's pixels [x0, x1) at radius r against nk training images: for image g, hi[g], lo[g] point at its
 * integral image's bottom and top box rows (column 0 = pixel 0 at offset cb), norm[g] at its norm terms and
 * vals[g] at its values (channel stride cs) for the training pixel of pixel 0. State: m, S, T (channel stride
 * ts) at pixel 0. */
static inline void box_row(const box_spec *s, const double *const *hi, const double *const *lo, int64_t r, int64_t cb,
                           int64_t x0, int64_t x1, const double *const *norm, const double *const *vals, int64_t cs,
                           double *m, double *S, double *T, int64_t ts)
{
    const int64_t C = s->C;
    const double c1 = s->c1;
    const v8d low = splat8(-s->skip);
    for (int64_t x = x0; x < x1; x += BOX_K) {
        v8d l[BOX_G], top = splat8(-1e301), tx[BOX_CMAX];
        const int64_t a = x + r + 1 + cb, b = x - r + cb;
        for (int g = 0; g < BOX_G; g++)
            l[g] = c1 * (ld8(hi[g] + a) - ld8(lo[g] + a) - ld8(hi[g] + b) + ld8(lo[g] + b)) + ld8(norm[g] + x);
        if (x + BOX_K > x1) { /* lanes past the row's last pixel weigh nothing */
            v8i lanes = {0};
            for (int64_t k = 0; k < BOX_K; k++) lanes[k] = x + k < x1 ? -1 : 0;
            for (int g = 0; g < BOX_G; g++) l[g] = sel8(lanes, l[g], splat8(-1e301));
        }
        for (int g = 0; g < BOX_G; g++) top = max8(top, l[g]);
        v8d mx = ld8(m + x), sx = ld8(S + x);
        for (int64_t c = 0; c < C; c++) tx[c] = ld8(T + c * ts + x);
        if (gt8(top, mx)) {
            const v8d up = max8(mx, top), sc = weight8(mx - up);
            sx *= sc;
            for (int64_t c = 0; c < C; c++) tx[c] *= sc;
            mx = up;
            st8(m + x, mx);
        }
        /* the exponentials of all BOX_G images in lockstep (independent multiply-add chains side by side) */
        int live = 0;
        v8d d[BOX_G];
        for (int g = 0; g < BOX_G; g++) {
            d[g] = l[g] - mx;
            live |= gt8(d[g], low);
        }
        if (live) {
            v8d w[BOX_G];
            exp8s(d, w);
            for (int g = 0; g < BOX_G; g++) {
                sx += w[g];
                for (int64_t c = 0; c < C; c++) tx[c] += w[g] * ld8(vals[g] + c * cs + x);
            }
        }
        st8(S + x, sx);
        for (int64_t c = 0; c < C; c++) st8(T + c * ts + x, tx[c]);
    }
}

/* Training images n0 .. n0+nk−1 (nk ≤ BOX_G) folded into the running state m, S [B][NP][H][SW] and
 * T [B][NP][C][H][SW]. work: see box_work. Returns the pairs computed. */
static int64_t box_images(const box_spec *s, const double *q, const double *x, int64_t n0, int64_t nk, double *state, double *work)
{
    const int64_t B = s->B, C = s->C, H = s->H, W = s->W, NP = s->NP, R = s->R, XW = s->XW, IW = s->IW, SW = s->SW;
    const int64_t xs = C * H * XW, ns = NP * H * XW, is = s->IH * IW, plane = NP * H * SW;
    double *xk = work, *nt = xk + BOX_G * xs, *I = nt + BOX_G * ns, *map = I + BOX_G * is, *qp = map + H * (W + BOX_K), *row = qp + C * H * (W + BOX_K);
    double *m = state, *S = m + B * plane, *T = S + B * plane;
    const int64_t lq = W + BOX_K; /* padded query and map rows */
    double *dead = row + IW + W + 2 * R + 2 * BOX_K; /* W + BOX_K norm terms of the absent images past the last */
    for (int64_t j = 0; j < W + BOX_K; j++) dead[j] = -1e301;
    int64_t pairs = 0;
    /* the images, each row twice over (a circular row read from any column on is contiguous), then padding */
    for (int64_t g = 0; g < nk; g++)
        for (int64_t c = 0; c < C; c++)
            for (int64_t y = 0; y < H; y++) {
                double *dst = xk + g * xs + (c * H + y) * XW;
                const double *src = x + (((n0 + g) * C + c) * H + y) * W;
                for (int64_t j = 0; j < XW; j++) dst[j] = j < 2 * W ? src[j % W] : 0.0;
            }
    /* c2·‖p‖² of every training patch at every radius, from the integral image of Σ_c x² */
    for (int64_t g = 0; g < nk; g++) {
        for (int64_t y = 0; y < H; y++)
            for (int64_t j = 0; j < lq; j++) {
                double v = 0.0;
                for (int64_t c = 0; c < C && j < W; c++) v += xk[g * xs + (c * H + y) * XW + j] * xk[g * xs + (c * H + y) * XW + j];
                map[y * lq + j] = v;
            }
        box_integral(s, I, map, H, W, lq, row);
        const int64_t rb = s->circular ? R : 0, hmax = s->circular ? H + 2 * R : H;
        for (int64_t i = 0; i < NP; i++) {
            const int64_t r = s->radii[i];
            for (int64_t y = 0; y < H; y++) {
                const double *hi = I + clamp64(y + r + 1 + rb, hmax) * IW + R, *lo = I + clamp64(y - r + rb, hmax) * IW + R;
                double *dst = nt + g * ns + (i * H + y) * XW;
                for (int64_t j = 0; j < XW; j++) {
                    const int64_t xx = j % W;
                    dst[j] = j < 2 * W ? s->c2 * (hi[xx + r + 1] - lo[xx + r + 1] - hi[xx - r] + lo[xx - r]) : 0.0;
                }
            }
        }
    }
    const int64_t dy0 = s->rule == 0 ? 0 : s->circular ? 0 : -(H - 1), dy1 = s->rule == 0 ? 0 : H - 1;
    const int64_t dx0 = s->rule == 0 ? 0 : s->circular ? 0 : -(W - 1), dx1 = s->rule == 0 ? 0 : W - 1;
    for (int64_t b = 0; b < B; b++) {
        for (int64_t c = 0; c < C; c++) /* the query, rows padded with zeros */
            for (int64_t y = 0; y < H; y++)
                for (int64_t j = 0; j < lq; j++) qp[(c * H + y) * lq + j] = j < W ? q[((b * C + c) * H + y) * W + j] : 0.0;
        for (int64_t dy = dy0; dy <= dy1; dy++)
            for (int64_t dx = dx0; dx <= dx1; dx++) {
                int64_t y0, y1, x0, x1, any = 0;
                for (int64_t i = 0; i < NP && !any; i++) any = box_valid(s, dy, dx, s->radii[i], &y0, &y1, &x0, &x1);
                if (!any) continue;
                /* each image's product map over the overlap (zero padding) or the torus (circular), and its integral */
                int64_t oy0 = 0, oy1 = H, ox0 = 0, ox1 = W;
                if (!s->circular) {
                    oy0 = dy < 0 ? -dy : 0; oy1 = dy > 0 ? H - dy : H;
                    ox0 = dx < 0 ? -dx : 0; ox1 = dx > 0 ? W - dx : W;
                }
                const int64_t h = oy1 - oy0, w = ox1 - ox0;
                for (int64_t g = 0; g < nk; g++) {
                    for (int64_t y = 0; y < h; y++) {
                        const int64_t qy = oy0 + y, ty = s->circular ? (qy + dy) % H : qy + dy;
                        for (int64_t j = 0; j < w; j += BOX_K) {
                            v8d v = {0};
                            for (int64_t c = 0; c < C; c++)
                                v += ld8(qp + (c * H + qy) * lq + ox0 + j) * ld8(xk + g * xs + (c * H + ty) * XW + ox0 + dx + j);
                            st8(map + y * lq + j, v);
                        }
                    }
                    box_integral(s, I + g * is, map, h, w, lq, row);
                }
                const int64_t rb = s->circular ? R : -oy0, hmax = s->circular ? h + 2 * R : h, cb = s->circular ? R : R - ox0;
                for (int64_t i = 0; i < NP; i++) {
                    const int64_t r = s->radii[i];
                    if (!box_valid(s, dy, dx, r, &y0, &y1, &x0, &x1)) continue;
                    pairs += (y1 - y0) * (x1 - x0) * nk;
                    for (int64_t y = y0; y < y1; y++) {
                        const int64_t ty = s->circular ? (y + dy) % H : y + dy;
                        const double *hi[BOX_G], *lo[BOX_G], *norm[BOX_G], *vals[BOX_G];
                        const int64_t rh = clamp64(y + r + 1 + rb, hmax), rl = clamp64(y - r + rb, hmax);
                        for (int64_t g = 0; g < BOX_G; g++) {
                            if (g >= nk) { /* no image: a norm term nothing can outweigh (weight 0) on finite values */
                                hi[g] = lo[g] = I + rh * IW; /* image 0's, which is always there */
                                norm[g] = dead - x0;
                                vals[g] = vals[0];
                                continue;
                            }
                            hi[g] = I + g * is + rh * IW;
                            lo[g] = I + g * is + rl * IW;
                            norm[g] = nt + g * ns + (i * H + ty) * XW + dx; /* dx ≥ 0 for circular; x + dx ≥ 0 always */
                            vals[g] = xk + g * xs + ty * XW + dx;
                        }
                        const int64_t at = ((b * NP + i) * H + y) * SW;
                        box_row(s, hi, lo, r, cb, x0, x1, norm, vals, H * XW, m + at, S + at,
                                T + ((b * NP + i) * C * H + y) * SW, H * SW);
                    }
                }
            }
    }
    return pairs;
}

/* The posterior means out [NP][B][C][H][W] of queries q [B][C][H][W] against training images x [N][C][H][W]
 * (model units), at radii [NP], for rule 0 (LS), 1 (ELS) or 2 (bbELS) and zero (circular = 0) or circular
 * padding; a, s2: the noise level's √ᾱ and 1 − ᾱ. Images go BOX_G at a time to `threads` OpenMP threads, each
 * with state of its own, merged at the end. Returns the (pixel, patch, scale) pairs computed, or −1 when memory
 * ran out. */
int64_t box_scales(int threads, int64_t B, int64_t N, int64_t C, int64_t H, int64_t W, const double *q, const double *x,
                   int64_t NP, const int64_t *radii, int64_t rule, int64_t circular, double a, double s2, double skip, double *out)
{
    box_spec s = {B, N, C, H, W, NP, 0, rule, circular, radii, a / s2, -a * a / (2 * s2), skip, 0, 0, 0, 0};
    for (int64_t i = 0; i < NP; i++) s.R = radii[i] > s.R ? radii[i] : s.R;
    const int64_t R = s.R, K = BOX_K;
    s.XW = 2 * W + K;                                   /* twice the row, then a vector of padding */
    s.IW = ((W + 2 * R + 1 + 2 * K) / K + 1) * K;       /* w + 2R + 1 columns, a vector of padding, rounded up */
    s.IH = circular ? H + 2 * R + 1 : H + 1;
    s.SW = ((W + K - 1) / K + 1) * K;                   /* state rows: whole vectors, and one more */
    const int64_t plane = NP * H * s.SW, state = B * plane * (2 + C);
    const int64_t work = BOX_G * (C * H * s.XW + NP * H * s.XW + s.IH * s.IW) + (H + C * H) * (W + K) + 2 * s.IW + 2 * W + 2 * R + 3 * K;
    const int64_t chunks = (N + BOX_G - 1) / BOX_G;
    if (threads < 1) threads = 1;
    if (threads > chunks) threads = chunks > 0 ? (int)chunks : 1;
    double *acc = malloc(sizeof(double) * state * threads), *buf = malloc(sizeof(double) * work * threads);
    if (!acc || !buf) { free(acc); free(buf); return -1; }
    for (int t = 0; t < threads; t++) {
        double *st = acc + t * state;
        for (int64_t i = 0; i < B * plane; i++) st[i] = -1e300;
        for (int64_t i = B * plane; i < state; i++) st[i] = 0.0;
    }
    int64_t pairs = 0;
    _Pragma("omp parallel for num_threads(threads) schedule(dynamic, 1) reduction(+ : pairs)")
    for (int64_t c = 0; c < chunks; c++) {
        int t = 0;
#ifdef _OPENMP
        t = omp_get_thread_num();
#endif
        const int64_t n0 = c * BOX_G, nk = N - n0 < BOX_G ? N - n0 : BOX_G;
        pairs += box_images(&s, q, x, n0, nk, acc + t * state, buf + t * work);
    }
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < NP; i++)
            for (int64_t y = 0; y < H; y++)
                for (int64_t xx = 0; xx < W; xx++) {
                    const int64_t at = ((b * NP + i) * H + y) * s.SW + xx;
                    double top = -1e300, z = 0.0;
                    for (int t = 0; t < threads; t++) top = acc[t * state + at] > top ? acc[t * state + at] : top;
                    for (int64_t c = 0; c < C; c++) out[(((i * B + b) * C + c) * H + y) * W + xx] = 0.0;
                    for (int t = 0; t < threads; t++) {
                        const double *st = acc + t * state;
                        const double d = st[at] - top, sc = d < -700.0 ? 0.0 : exp(d);
                        z += sc * st[B * plane + at];
                        for (int64_t c = 0; c < C; c++)
                            out[(((i * B + b) * C + c) * H + y) * W + xx] += sc * st[2 * B * plane + ((b * NP + i) * C * H + c * H + y) * s.SW + xx];
                    }
                    for (int64_t c = 0; c < C; c++) out[(((i * B + b) * C + c) * H + y) * W + xx] /= z;
                }
    free(acc);
    free(buf);
    return pairs;
}
