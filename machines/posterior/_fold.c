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
