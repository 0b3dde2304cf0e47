/* The exact backend's whole pruned sweep over a bucket's cluster tree in one call (machines/native/trees.py: tree_sums):
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

