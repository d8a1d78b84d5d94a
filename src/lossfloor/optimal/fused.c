/* The gram estimator's per-σ passes fused into one pass over each block of columns
 * (optimal/fused.py compiles and calls it; the formulas are optimal/gram.py's).
 *
 * For each draw b (a row of the products a = x0·Xᵀ − ‖X‖²/2 and e = ε·Xᵀ) and each σ of the
 * grid, the weights relative to the source s are
 *
 *     w_j = 2^clamp(k·t_j, lo, hi),   t_j = (a_j − a_s) + σ·((e_j − e_s) + c·(p_j − p_s)),
 *
 * k = log₂e/σ², c = 1/2σ and p the row of the tilted draws' products (x_c − x_s)·Xᵀ (0 where
 * the draw is plain). Pass 1 reads each block of BLOCK columns of a and e once for every σ and
 * keeps only the block totals (the source's weight apart, w_s = own, then 0); pass 2 draws L
 * columns of the rest in proportion to w: the block where the cumulative totals first reach
 * u·rest, then the column within it, recomputing that block's weights (the same per-column
 * values; their total may differ from pass 1's in the last bits, so the target within the block
 * is clamped to it). No B×N weights are written.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef M_LOG2E
#define M_LOG2E 1.4426950408889634
#endif
#define BLOCK 256
#define VBYTES 64
#define LN(T) ((int)(VBYTES / sizeof(T))) /* lanes of a vector of T */

/* GCC/clang vector extensions: 64-byte vectors (one AVX-512 register, two AVX2 ones, …). */
typedef float vf32 __attribute__((vector_size(VBYTES)));
typedef int32_t vi32 __attribute__((vector_size(VBYTES)));
typedef double vf64 __attribute__((vector_size(VBYTES)));
typedef int64_t vi64 __attribute__((vector_size(VBYTES)));

/* 2^x for x ∈ [lo, hi] (the caller's clamp: 2^r below is a normal number): x = r + f with
 * r = rint(x) (adding and subtracting 1.5·2^mantissa rounds to the nearest integer, and the
 * sum's low bits hold r), |f| ≤ ½, 2^f from its Taylor series in f·ln 2 (float: degree 7,
 * truncation < 6e-9; double: degree 12, < 2e-16), times 2^r written into the exponent bits. */
static inline vf32 exp2_f32(vf32 x)
{
    vf32 t = x + 12582912.0f;
    vf32 f = x - (t - 12582912.0f);
    vf32 p = f * 1.5252733804059838e-05f + 0.00015403530393381606f;
    p = p * f + 0.0013333558146428441f;
    p = p * f + 0.009618129107628477f;
    p = p * f + 0.055504108664821576f;
    p = p * f + 0.2402265069591007f;
    p = p * f + 0.6931471805599453f;
    p = p * f + 1.0f;
    vi32 bits = (((vi32)t - 0x4B400000) + 127) << 23;
    return p * (vf32)bits;
}

static inline vf64 exp2_f64(vf64 x)
{
    vf64 t = x + 6755399441055744.0;
    vf64 f = x - (t - 6755399441055744.0);
    vf64 p = f * 2.5678435993488196e-11 + 4.44553827187081e-10;
    p = p * f + 7.054911620801121e-09;
    p = p * f + 1.0178086009239696e-07;
    p = p * f + 1.3215486790144305e-06;
    p = p * f + 1.5252733804059838e-05;
    p = p * f + 0.00015403530393381606;
    p = p * f + 0.0013333558146428441;
    p = p * f + 0.009618129107628477;
    p = p * f + 0.055504108664821576;
    p = p * f + 0.2402265069591007;
    p = p * f + 0.6931471805599453;
    p = p * f + 1.0;
    vi64 bits = (((vi64)t - 0x4338000000000000LL) + 1023) << 52;
    return p * (vf64)bits;
}

/* The weights of one vector of columns (the formula above): loads from unaligned pointers. */
#define DEFINE_WEIGHTS(T, SUF, VI)                                                             \
    typedef struct {                                                                           \
        T ps, sigma, c, k, lo, hi, least; /* least: the weight at lo */                        \
        const T *p; /* NULL: a plain draw */                                                   \
    } args_##SUF;                                                                              \
                                                                                               \
    static inline v##SUF load_##SUF(const T *x)                                                \
    {                                                                                          \
        v##SUF v;                                                                              \
        memcpy(&v, x, VBYTES);                                                                 \
        return v;                                                                              \
    }                                                                                          \
                                                                                               \
    /* The exponents k·t before the clamp, from a − a_s and e − e_s: nondecreasing in them     \
     * and in p (σ, c, k > 0, each rounding monotone), so the maxima of a block's bound every  \
     * column's. */                                                                            \
    static inline v##SUF exponent_##SUF(v##SUF a, v##SUF e, const v##SUF *p,                   \
                                        const args_##SUF *g)                                   \
    {                                                                                          \
        v##SUF d = e;                                                                          \
        if (p)                                                                                 \
            d += g->c * (*p - g->ps);                                                          \
        return (a + g->sigma * d) * g->k;                                                      \
    }                                                                                          \
                                                                                               \
    static inline v##SUF weight_##SUF(const T *a, const T *e, const T *p, const args_##SUF *g) \
    {                                                                                          \
        v##SUF pv = p ? load_##SUF(p) : (v##SUF){0};                                           \
        v##SUF x = exponent_##SUF(load_##SUF(a), load_##SUF(e), p ? &pv : NULL, g);            \
        v##SUF lo = (v##SUF){0} + g->lo, hi = (v##SUF){0} + g->hi;                             \
        VI low = x < lo, high = x > hi;                                                        \
        x = (v##SUF)((low & (VI)lo) | (~low & (VI)x));                                         \
        x = (v##SUF)((high & (VI)hi) | (~high & (VI)x));                                       \
        return exp2_##SUF(x);                                                                  \
    }                                                                                          \
                                                                                               \
    /* The largest of x[0..BLOCK). */                                                          \
    static T block_max_##SUF(const T *x)                                                       \
    {                                                                                          \
        v##SUF top = load_##SUF(x);                                                            \
        for (int j = LN(T); j < BLOCK; j += LN(T)) {                                           \
            v##SUF v = load_##SUF(x + j);                                                      \
            top = (v##SUF)(((VI)(v > top) & (VI)v) | (~(VI)(v > top) & (VI)top));              \
        }                                                                                      \
        T lanes[LN(T)];                                                                        \
        memcpy(lanes, &top, VBYTES);                                                           \
        T best = lanes[0];                                                                     \
        for (int i = 1; i < LN(T); i++)                                                        \
            best = lanes[i] > best ? lanes[i] : best;                                          \
        return best;                                                                           \
    }                                                                                          \
                                                                                               \
    /* Whether every column of a whole block weighs exactly 2^lo (all exponents ≤ lo): the     \
     * exponent of the maxima of a (amax), e (emax) and p (its block), by the same vector code. \
     */                                                                                        \
    static int at_floor_##SUF(T amax, T emax, const T *p, const args_##SUF *g)                 \
    {                                                                                          \
        v##SUF pv = (v##SUF){0} + (p ? block_max_##SUF(p) : 0);                                \
        v##SUF x = exponent_##SUF((v##SUF){0} + amax, (v##SUF){0} + emax, p ? &pv : NULL, g);  \
        return x[0] <= g->lo;                                                                  \
    }                                                                                          \
                                                                                               \
    /* Σ of the lanes, in a fixed order (halves added pairwise). */                            \
    static inline T lanes_##SUF(v##SUF v)                                                      \
    {                                                                                          \
        T x[LN(T)];                                                                            \
        memcpy(x, &v, VBYTES);                                                                 \
        for (int h = LN(T) / 2; h >= 1; h /= 2)                                                \
            for (int i = 0; i < h; i++)                                                        \
                x[i] += x[i + h];                                                              \
        return x[0];                                                                           \
    }                                                                                          \
                                                                                               \
    /* A whole block's total: the weights summed lane-wise as they are made (nothing written). \
     */                                                                                        \
    static T block_total_##SUF(const T *a, const T *e, const T *p, const args_##SUF *g)        \
    {                                                                                          \
        v##SUF acc = {0};                                                                      \
        for (int j = 0; j < BLOCK; j += LN(T))                                                 \
            acc += weight_##SUF(a + j, e + j, p ? p + j : NULL, g);                            \
        return lanes_##SUF(acc);                                                               \
    }                                                                                          \
                                                                                               \
    /* The first m columns' weights into w (0 from m on; a, e, p padded to BLOCK by the caller \
     * where m < BLOCK), the column `skip` (−1: none) set to 0 after its weight went to *own;  \
     * returns their total, summed lane-wise. */                                               \
    static T block_weights_##SUF(const T *a, const T *e, const T *p, const args_##SUF *g,      \
                                 int m, int skip, double *own, T *w)                           \
    {                                                                                          \
        v##SUF acc = {0};                                                                      \
        for (int j = 0; j < BLOCK; j += LN(T)) {                                               \
            v##SUF v = weight_##SUF(a + j, e + j, p ? p + j : NULL, g);                        \
            memcpy(w + j, &v, VBYTES);                                                         \
        }                                                                                      \
        for (int j = m; j < BLOCK; j++)                                                        \
            w[j] = 0;                                                                          \
        if (skip >= 0) {                                                                       \
            *own = w[skip];                                                                    \
            w[skip] = 0;                                                                       \
        }                                                                                      \
        for (int j = 0; j < BLOCK; j += LN(T))                                                 \
            acc += load_##SUF(w + j);                                                          \
        return lanes_##SUF(acc);                                                               \
    }

typedef struct {
    double target;
    int64_t at;
} draw_t;

static int by_target(const void *x, const void *y)
{
    double a = ((const draw_t *)x)->target, b = ((const draw_t *)y)->target;
    return (a > b) - (a < b);
}

/* The first index i < m with cum[i] ≥ t (m − 1 where none: rounding at the top). */
static int64_t first_reaching(const double *cum, int64_t m, double t)
{
    int64_t lo = 0, hi = m - 1;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        if (cum[mid] >= t)
            hi = mid;
        else
            lo = mid + 1;
    }
    return lo;
}

/* lossfloor_gram_<SUF>: rows [r0, r1) of B draws. a, e: B×ld (row-major; columns 0..n the
 * points); src: B source columns; sigma: S; u: S×B×L uniforms in (0, 1]; P: the tilted draws'
 * products (U×ldp) and prow: S×B rows of P (−1: plain), or P = NULL; lo, hi: the exponent's
 * clamp; negligible: no draws where the rest's share rest/(own + rest) is at most this. Out:
 * own, rest (S×B: the source's weight, the rest's total) and pick (S×B×L columns; −1 where no
 * draw was made). Returns 0, or −1 where memory ran out. */
#define DEFINE_KERNEL(T, SUF)                                                                  \
    /* Block blk's weights into w (its total returned): through padded copies where it is the  \
     * last, partial block; the source's column (if here) to *own, then 0. */                  \
    static T weights_at_##SUF(const T *a, const T *e, const T *p, const args_##SUF *g,         \
                              int64_t n, int64_t blk, int64_t s0, double *own, T *w, T *pad)   \
    {                                                                                          \
        int64_t j0 = blk * BLOCK;                                                              \
        int m = (int)(n - j0 < BLOCK ? n - j0 : BLOCK);                                        \
        int skip = s0 >= j0 && s0 < j0 + m ? (int)(s0 - j0) : -1;                              \
        a += j0, e += j0, p = p ? p + j0 : NULL;                                               \
        if (m < BLOCK) {                                                                       \
            memset(pad, 0, sizeof(T) * 3 * BLOCK);                                             \
            memcpy(pad, a, sizeof(T) * m);                                                     \
            memcpy(pad + BLOCK, e, sizeof(T) * m);                                             \
            if (p)                                                                             \
                memcpy(pad + 2 * BLOCK, p, sizeof(T) * m);                                     \
            a = pad, e = pad + BLOCK, p = p ? pad + 2 * BLOCK : NULL;                          \
        }                                                                                      \
        return block_weights_##SUF(a, e, p, g, m, skip, own, w);                               \
    }                                                                                          \
                                                                                               \
    int lossfloor_gram_##SUF(const T *a, const T *e, int64_t ld, int64_t n, int64_t B,         \
                             int64_t r0, int64_t r1, const int64_t *src, int64_t S,            \
                             const double *sigma, const T *u, int64_t L, const T *P,           \
                             int64_t ldp, const int64_t *prow, double lo, double hi,           \
                             double negligible, double *own, double *rest, int64_t *pick)      \
    {                                                                                          \
        int64_t nblk = (n + BLOCK - 1) / BLOCK;                                                \
        double *tot = malloc(sizeof(double) * (size_t)(S * nblk + BLOCK));                     \
        draw_t *order = malloc(sizeof(draw_t) * (size_t)L);                                    \
        args_##SUF *g = malloc(sizeof(args_##SUF) * (size_t)S);                                \
        T *w = malloc(sizeof(T) * (size_t)(4 * BLOCK + 2 * nblk + 2 * n));                     \
        if (!tot || !order || !g || !w) {                                                      \
            free(tot), free(order), free(g), free(w);                                          \
            return -1;                                                                         \
        }                                                                                      \
        double *inner = tot + S * nblk;                                                        \
        for (int64_t b = r0; b < r1; b++) {                                                    \
            T *ab = w + 4 * BLOCK + 2 * nblk, *eb = ab + n; /* a − a_s, e − e_s */             \
            int64_t s0 = src[b], sb = s0 / BLOCK;                                              \
            for (int64_t j = 0; j < n; j++)                                                    \
                ab[j] = a[b * ld + j] - a[b * ld + s0], eb[j] = e[b * ld + j] - e[b * ld + s0]; \
            for (int64_t s = 0; s < S; s++) {                                                  \
                int64_t pr = P ? prow[s * B + b] : -1;                                         \
                g[s].p = pr >= 0 ? P + pr * ldp : NULL;                                        \
                g[s].ps = g[s].p ? g[s].p[s0] : 0;                                             \
                g[s].sigma = (T)sigma[s], g[s].c = (T)(0.5 / sigma[s]);                        \
                g[s].k = (T)(M_LOG2E / (sigma[s] * sigma[s]));                                 \
                g[s].lo = (T)lo, g[s].hi = (T)hi;                                              \
                g[s].least = exp2_##SUF((v##SUF){0} + g[s].lo)[0];                             \
                own[s * B + b] = 0;                                                            \
            }                                                                                  \
            T *amax = w + 4 * BLOCK, *emax = amax + nblk;                                      \
            for (int64_t blk = 0; (blk + 1) * BLOCK <= n; blk++) {                             \
                amax[blk] = block_max_##SUF(ab + blk * BLOCK);                                 \
                emax[blk] = block_max_##SUF(eb + blk * BLOCK);                                 \
            }                                                                                  \
            for (int64_t blk = 0; blk < nblk; blk++) {                                         \
                int whole = blk != sb && (blk + 1) * BLOCK <= n;                               \
                int64_t j0 = blk * BLOCK;                                                      \
                for (int64_t s = 0; s < S; s++) {                                              \
                    const T *p = g[s].p ? g[s].p + j0 : NULL;                                  \
                    double *t = tot + s * nblk + blk;                                          \
                    if (!whole)                                                                \
                        *t = weights_at_##SUF(ab, eb, g[s].p, g + s, n, blk, s0,               \
                                              own + s * B + b, w, w + BLOCK);                  \
                    else if (at_floor_##SUF(amax[blk], emax[blk], p, g + s))                   \
                        *t = (T)BLOCK * g[s].least; /* the lanes' sum, exactly */              \
                    else                                                                       \
                        *t = block_total_##SUF(ab + j0, eb + j0, p, g + s);                    \
                }                                                                              \
            }                                                                                  \
            for (int64_t s = 0; s < S; s++) {                                                  \
                double *cum = tot + s * nblk;                                                  \
                for (int64_t blk = 1; blk < nblk; blk++)                                       \
                    cum[blk] += cum[blk - 1];                                                  \
                double all = cum[nblk - 1], ignored;                                           \
                rest[s * B + b] = all;                                                         \
                if (all <= negligible * (own[s * B + b] + all)) { /* no draw needed: −1 */     \
                    for (int64_t l = 0; l < L; l++)                                            \
                        pick[(s * B + b) * L + l] = -1;                                        \
                    continue;                                                                  \
                }                                                                              \
                const T *ub = u + (s * B + b) * L;                                             \
                for (int64_t l = 0; l < L; l++) {                                              \
                    order[l].target = (double)ub[l] * all;                                     \
                    order[l].at = l;                                                           \
                }                                                                              \
                qsort(order, (size_t)L, sizeof(draw_t), by_target);                            \
                int64_t cur = -1;                                                              \
                for (int64_t l = 0; l < L; l++) {                                              \
                    double t = order[l].target;                                                \
                    int64_t blk = first_reaching(cum, nblk, t);                                \
                    if (blk != cur) {                                                          \
                        cur = blk;                                                             \
                        weights_at_##SUF(ab, eb, g[s].p, g + s, n, blk, s0, &ignored, w,       \
                                         w + BLOCK);                                           \
                        double run = 0; /* the cumulative totals of its vectors of columns */  \
                        for (int c = 0; c < BLOCK / LN(T); c++)                                \
                            inner[c] = run += lanes_##SUF(load_##SUF(w + c * LN(T)));          \
                    }                                                                          \
                    double left = t - (blk > 0 ? cum[blk - 1] : 0.0);                          \
                    left = left < inner[BLOCK / LN(T) - 1] ? left : inner[BLOCK / LN(T) - 1];  \
                    left = left > 0 ? left : 0;                                                \
                    int c = (int)first_reaching(inner, BLOCK / LN(T), left);                   \
                    double run = c > 0 ? inner[c - 1] : 0.0;                                   \
                    int j = c * LN(T), last = j + LN(T) - 1;                                   \
                    while (j < last && (run += w[j]) < left)                                   \
                        j++;                                                                   \
                    while (j > c * LN(T) && w[j] == 0) /* rounding ran past the vector's mass */ \
                        j--;                                                                   \
                    pick[(s * B + b) * L + order[l].at] = blk * BLOCK + j;                     \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
        free(tot), free(order), free(g), free(w);                                              \
        return 0;                                                                              \
    }

DEFINE_WEIGHTS(float, f32, vi32)
DEFINE_WEIGHTS(double, f64, vi64)
DEFINE_KERNEL(float, f32)
DEFINE_KERNEL(double, f64)

/* lossfloor_bags_<SUF>: rows [r0, r1) of R bags of L pool rows each (idx: R×L indices into X,
 * N×D row-major; sq: their ‖x‖²), each with its centre row c (centre: R indices).
 * out (R×5, float64): Σ‖x_j‖², x_c·Σx_j, ‖Σx_j‖², Σ‖x_j − x_c‖², ‖Σ(x_j − x_c)‖² — gram's
 * U-statistics: Σx_j summed in T (as torch's embedding_bag sums), the rest in float64
 * (8 running sums per term), Σ‖x_j − x_c‖² = Σ‖x_j‖² − 2x_c·Σx_j + L‖x_c‖² as gram's torch
 * forms. Returns 0, or −1 where memory ran out. */
typedef float v8f32 __attribute__((vector_size(32)));

static inline vf64 eight_f32(const float *x)
{
    v8f32 v;
    memcpy(&v, x, sizeof v);
    return __builtin_convertvector(v, vf64);
}

static inline vf64 eight_f64(const double *x)
{
    vf64 v;
    memcpy(&v, x, sizeof v);
    return v;
}

#define DEFINE_BAGS(T, SUF)                                                                    \
    int lossfloor_bags_##SUF(const T *X, const T *sq, int64_t D, const int64_t *idx,           \
                             const int64_t *centre, int64_t r0, int64_t r1, int64_t L,         \
                             double *out)                                                      \
    {                                                                                          \
        int64_t DV = D / LN(T) * LN(T), D8 = D / 8 * 8;                                        \
        T *acc = malloc(sizeof(T) * (size_t)D);                                                \
        if (!acc)                                                                              \
            return -1;                                                                         \
        for (int64_t r = r0; r < r1; r++) {                                                    \
            const T *xc = X + centre[r] * D;                                                   \
            double norms = 0;                                                                  \
            memset(acc, 0, sizeof(T) * (size_t)D);                                             \
            for (int64_t j = 0; j < L; j++) {                                                  \
                const T *x = X + idx[r * L + j] * D;                                           \
                norms += sq[idx[r * L + j]];                                                   \
                for (int64_t d = 0; d < DV; d += LN(T)) {                                      \
                    v##SUF v = load_##SUF(acc + d) + load_##SUF(x + d);                        \
                    memcpy(acc + d, &v, VBYTES);                                               \
                }                                                                              \
                for (int64_t d = DV; d < D; d++)                                               \
                    acc[d] += x[d];                                                            \
            }                                                                                  \
            vf64 dot = {0}, sum_sq = {0}, usum_sq = {0};                                       \
            for (int64_t d = 0; d < D8; d += 8) {                                              \
                vf64 c = eight_##SUF(xc + d), a = eight_##SUF(acc + d), u = a - (double)L * c; \
                dot += c * a;                                                                  \
                sum_sq += a * a;                                                               \
                usum_sq += u * u;                                                              \
            }                                                                                  \
            for (int64_t d = D8; d < D; d++) {                                                 \
                double c = xc[d], a = acc[d], u = a - (double)L * c;                           \
                dot[0] += c * a;                                                               \
                sum_sq[0] += a * a;                                                            \
                usum_sq[0] += u * u;                                                           \
            }                                                                                  \
            double *o = out + 5 * r, x_c = lanes_f64(dot);                                     \
            o[0] = norms, o[1] = x_c, o[2] = lanes_f64(sum_sq);                                \
            o[3] = norms - 2.0 * x_c + (double)L * (double)sq[centre[r]];                      \
            o[4] = lanes_f64(usum_sq);                                                         \
        }                                                                                      \
        free(acc);                                                                             \
        return 0;                                                                              \
    }

DEFINE_BAGS(float, f32)
DEFINE_BAGS(double, f64)
