/* Fused fold of one block of logits into online-softmax sums (machines/native/folds.py: fold_logits).
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

/* Importance-draw moments (the automatic policy's shared draws; machines/native/folds.py: fold_moments).
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

