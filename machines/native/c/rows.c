/* One row of logits folded into running sums (row_T) or moments (mrow_T): shared by the block folds
 * (fold.c) and the register-tile sweeps (sweep.c). */

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

