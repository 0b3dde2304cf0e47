/* Posterior means of a patch machine at several scales at once, by box sums (machines/native/boxes.py: box_scales).
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
