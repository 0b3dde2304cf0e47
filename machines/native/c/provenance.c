/* Provenance scan (machines/native/trees.py: tree_provenance), one query: fold a row of each copy's own log
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
int64_t provenance_tree(int64_t R, int64_t D, int64_t NC, const double *qs, const int16_t *patches, const double *sq_norms,
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

