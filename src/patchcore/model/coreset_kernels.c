/* Compiled kernels of the greedy coreset (see patchcore/model/samplers.py and native.py).

   The exact distance between two projected features is, by definition, the float32 sum over
   dimensions, in dimension order, of the squared differences, each product and sum rounded
   separately (the file is compiled with -ffp-contract=off: no fused multiply-add). The plain
   sweep and the lazy selection compare only such values, so they make identical selections,
   ties included (ties go to the lowest row index). `samplers.exact_squared_distances` is the
   same arithmetic in torch.

   Everything else here only bounds distances, with margins for its own rounding: `shrink`
   (< 1) is the factor by which a computed squared distance may exceed the true one and the
   true one may exceed the exact float value, (2 d + 64) unit roundoffs below 1.

   Features are row-major float32 [n, d]. A tile is a list of rows with a centre and a
   radius. Low-precision copies are bfloat16 bit patterns (uint16) or float32.

   Product paths (how a batch of products of copies is computed; samplers.py picks one per
   CPU at run time, `product_paths` says which this build and CPU can run):
     AMX         bfloat16 copies, AMX-BF16 tile products (x86-64, Linux grants the tiles)
     AVX512BF16  bfloat16 copies, AVX512-BF16 dot products for small batches, torch.mm else
     AVX2        float32 copies, AVX2/FMA products
     PORTABLE    float32 copies, plain C products (any CPU: ARM64, x86 without AVX2)
     caller      torch.mm in Python (samplers._LargeBatches), either precision
   The instruction-set kernels are compiled for their own target (function attributes), not
   for the compiler's command line, so the file builds for any x86-64 (with or without
   AVX-512) and, without them, for ARM64; a run-time CPU check (CPUID, XGETBV) decides which
   may run. */

#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define X86_KERNELS 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define TARGET(features) __attribute__((target(features)))
/* compilers that know the AVX512-BF16 and AMX targets (older ones build without them) */
#if defined(__clang__) ? __clang_major__ >= 9 : __GNUC__ >= 10
#define X86_BF16 1
#endif
#if defined(__clang__) ? __clang_major__ >= 12 : __GNUC__ >= 11
#define X86_AMX 1
#endif
#endif

#define LANES 16

static inline float exact_squared_distance(const float* x, const float* c, int64_t d) {
    float sum = 0.0f;
    for (int64_t j = 0; j < d; j++) {
        float t = x[j] - c[j];
        sum += t * t;
    }
    return sum;
}

/* Squared distance summed in LANES partial sums (vectorised; not the exact value, but within
   the same relative rounding bound). */
static inline float fast_squared_distance(const float* x, const float* c, int64_t d) {
    float acc[LANES] = {0.0f};
    int64_t j = 0;
    for (; j + LANES <= d; j += LANES)
        for (int l = 0; l < LANES; l++) {
            float t = x[j + l] - c[j + l];
            acc[l] += t * t;
        }
    for (int l = 0; j + l < d; l++) {
        float t = x[j + l] - c[j + l];
        acc[l] += t * t;
    }
    float sum = 0.0f;
    for (int l = 0; l < LANES; l++) sum += acc[l];
    return sum;
}

/* Exact squared distances from rows[0..count) of x to the point c. */
void exact_distances(const float* x, int64_t d, const int64_t* rows, int64_t count,
                     const float* c, float* out) {
    for (int64_t r = 0; r < count; r++) out[r] = exact_squared_distance(x + rows[r] * d, c, d);
}

/* ------------------------------------------------------------------ plain sweep */

/* Blocks [first, first + count) of LANES rows of x, transposed: out[b][j][l]; rows past n
   are zero. */
void transpose_blocks(const float* x, int64_t n, int64_t d, int64_t first, int64_t count,
                      float* out) {
    for (int64_t b = 0; b < count; b++) {
        float* block = out + b * d * LANES;
        for (int l = 0; l < LANES; l++) {
            int64_t row = (first + b) * LANES + l;
            for (int64_t j = 0; j < d; j++) block[j * LANES + l] = row < n ? x[row * d + j] : 0.0f;
        }
    }
}

/* One step of the plain sweep over transposed blocks [block_lo, block_hi): the minimum
   distances m of rows < n are lowered to the exact distance to c where smaller (each lane
   sums its row in dimension order: the exact value). Writes the largest minimum distance
   and its lowest row index (-inf and -1 for an empty range). */
void sweep_blocks(const float* xt, int64_t d, int64_t block_lo, int64_t block_hi,
                  const float* c, float* m, int64_t n, float* best_value, int64_t* best_row) {
    float best = -INFINITY;
    int64_t best_index = -1;
    for (int64_t b0 = block_lo; b0 < block_hi; b0 += 4) {
        int blocks = block_hi - b0 < 4 ? (int)(block_hi - b0) : 4;
        float acc[4][LANES];
        for (int q = 0; q < 4; q++)
            for (int l = 0; l < LANES; l++) acc[q][l] = 0.0f;
        const float* k0 = xt + b0 * d * LANES;
        if (blocks == 4) {
            /* four independent blocks per pass hide the additions' latency */
            const float* k1 = k0 + d * LANES;
            const float* k2 = k1 + d * LANES;
            const float* k3 = k2 + d * LANES;
            for (int64_t j = 0; j < d; j++) {
                const float cj = c[j];
                for (int l = 0; l < LANES; l++) {
                    float t0 = k0[j * LANES + l] - cj;
                    float t1 = k1[j * LANES + l] - cj;
                    float t2 = k2[j * LANES + l] - cj;
                    float t3 = k3[j * LANES + l] - cj;
                    acc[0][l] += t0 * t0;
                    acc[1][l] += t1 * t1;
                    acc[2][l] += t2 * t2;
                    acc[3][l] += t3 * t3;
                }
            }
        } else {
            for (int q = 0; q < blocks; q++) {
                const float* block = k0 + q * d * LANES;
                for (int64_t j = 0; j < d; j++) {
                    const float cj = c[j];
                    for (int l = 0; l < LANES; l++) {
                        float t = block[j * LANES + l] - cj;
                        acc[q][l] += t * t;
                    }
                }
            }
        }
        for (int q = 0; q < blocks; q++) {
            int64_t base = (b0 + q) * LANES;
            int64_t lanes = n - base < LANES ? n - base : LANES;
            for (int64_t l = 0; l < lanes; l++) {
                float value = m[base + l];
                if (acc[q][l] < value) {
                    value = acc[q][l];
                    m[base + l] = value;
                }
                if (value > best) {
                    best = value;
                    best_index = base + l;
                }
            }
        }
    }
    *best_value = best;
    *best_row = best_index;
}

/* ----------------------------------------------------------------- lazy selection */

/* Round to nearest even (finite values; features are finite). */
static inline uint16_t to_bfloat16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, 4);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

static inline float from_bfloat16(uint16_t half) {
    uint32_t bits = ((uint32_t)half) << 16;
    float value;
    memcpy(&value, &bits, 4);
    return value;
}

/* Low-precision copy (bfloat16 when `half`, else float32) of the row x centred on `centre`,
   into out; writes a lower bound of the copy's squared norm and an upper bound of the norm
   of its error against the exactly centred row. */
static inline void centred_copy(const float* x, const float* centre, int64_t d, void* out,
                                int half, float* squared_norm, float* error) {
    float slack = 1.0f + (float)(d + 8) * 0x1p-24f;
    if (!half) { /* the copy is the centred row itself: nothing lost (same sums, vectorised) */
        float norm[LANES] = {0.0f}, sum = 0.0f;
        float* copy = (float*)out;
        int64_t j0 = 0;
        for (; j0 + LANES <= d; j0 += LANES)
            for (int l = 0; l < LANES; l++) {
                float centred = x[j0 + l] - centre[j0 + l];
                copy[j0 + l] = centred;
                norm[l] += centred * centred;
            }
        for (int l = 0; j0 + l < d; l++) {
            float centred = x[j0 + l] - centre[j0 + l];
            copy[j0 + l] = centred;
            norm[l] += centred * centred;
        }
        for (int l = 0; l < LANES; l++) sum += norm[l];
        *squared_norm = sum / slack;
        *error = sqrtf(sum) * 0x1p-23f * slack + 1e-30f;
        return;
    }
    float norm[LANES] = {0.0f}, lost[LANES] = {0.0f}, size[LANES] = {0.0f};
    for (int64_t j0 = 0; j0 < d; j0 += LANES) {
        int lanes = d - j0 < LANES ? (int)(d - j0) : LANES;
        for (int l = 0; l < lanes; l++) {
            float centred = x[j0 + l] - centre[j0 + l];
            float kept;
            if (half) {
                uint16_t low = to_bfloat16(centred);
                ((uint16_t*)out)[j0 + l] = low;
                kept = from_bfloat16(low);
            } else {
                ((float*)out)[j0 + l] = centred;
                kept = centred;
            }
            float difference = centred - kept; /* exact: kept is centred rounded */
            norm[l] += kept * kept;
            lost[l] += difference * difference;
            size[l] += centred * centred;
        }
    }
    float norm_sum = 0.0f, lost_sum = 0.0f, size_sum = 0.0f;
    for (int l = 0; l < LANES; l++) {
        norm_sum += norm[l];
        lost_sum += lost[l];
        size_sum += size[l];
    }
    /* the centred value itself is within one unit roundoff of the exact difference */
    *squared_norm = norm_sum / slack;
    *error = (sqrtf(lost_sum) * slack + sqrtf(size_sum) * 0x1p-23f) * slack + 1e-30f;
}

/* Tiles [first, last): rows order[edges[t]..edges[t+1]). Computes each tile's centre (mean,
   in double precision) and radius (largest distance of a row to the centre, rounded up),
   the rows' centred low-precision copies (copies[k] for row order[k]) with their norms and
   error bounds, and each tile's largest minimum distance m with its lowest row index. */
void prepare_tiles(const float* x, int64_t d, const int64_t* order, const int64_t* edges,
                   int64_t first, int64_t last, float shrink, const float* m, int half,
                   void* copies, float* row_norms, float* row_errors, float* centres,
                   float* radii, float* bounds, int64_t* argmax, double* scratch) {
    for (int64_t t = first; t < last; t++) {
        int64_t low = edges[t], high = edges[t + 1];
        float* centre = centres + t * d;
        for (int64_t j = 0; j < d; j++) scratch[j] = 0.0;
        for (int64_t k = low; k < high; k++) {
            const float* row = x + order[k] * d;
            for (int64_t j = 0; j < d; j++) scratch[j] += row[j];
        }
        for (int64_t j = 0; j < d; j++) centre[j] = (float)(scratch[j] / (double)(high - low));
        float largest = 0.0f, best = -INFINITY;
        int64_t best_index = -1;
        for (int64_t k = low; k < high; k++) {
            int64_t i = order[k];
            float squared = fast_squared_distance(x + i * d, centre, d);
            if (squared > largest) largest = squared;
            void* copy = half ? (void*)((uint16_t*)copies + k * d) : (void*)((float*)copies + k * d);
            centred_copy(x + i * d, centre, d, copy, half, row_norms + k, row_errors + k);
            if (m[i] > best || (m[i] == best && i < best_index)) {
                best = m[i];
                best_index = i;
            }
        }
        radii[t] = sqrtf(largest / (shrink * shrink)) * (1.0f + 0x1p-20f) + 1e-30f;
        bounds[t] = best;
        argmax[t] = best_index;
    }
}

/* True when the point c may lower a minimum distance of the tile (centre, radius, largest
   minimum squared distance `bound`); false guarantees by the triangle inequality that every
   row of the tile is farther than sqrt(bound) from c, so no exact distance to c is below the
   row's minimum. */
static inline int may_lower(const float* c, const float* centre, int64_t d, float radius,
                            float bound, float shrink) {
    float lower = sqrtf(fast_squared_distance(c, centre, d) * shrink) - radius;
    return !(lower > 0.0f && lower * lower * shrink * shrink >= bound);
}

/* After a new coreset point c: marks stale every tile that it may change. */
static void mark_stale(const float* c, const float* centres, const float* radii,
                       const float* bounds, int64_t tiles, int64_t d, float shrink,
                       uint8_t* stale) {
    for (int64_t t = 0; t < tiles; t++)
        if (!stale[t] && may_lower(c, centres + t * d, d, radii[t], bounds[t], shrink))
            stale[t] = 1;
}

/* The coreset points ids[0..count) that may change the tile, their rows `points` [count, d]
   (consecutive: read as a stream), as centred low-precision copies (out [*, d]) with their
   norms, error bounds and ids; returns how many. */
static int64_t pending_points(const float* points, int64_t d, const int64_t* ids,
                              int64_t count, const float* centre, float radius, float bound,
                              float shrink, void* out, int half, float* squared_norms,
                              float* errors, int64_t* kept_ids) {
    int64_t kept = 0;
    for (int64_t q = 0; q < count; q++) {
        const float* c = points + q * d;
        if (!may_lower(c, centre, d, radius, bound, shrink)) continue;
        void* copy = half ? (void*)((uint16_t*)out + kept * d) : (void*)((float*)out + kept * d);
        centred_copy(c, centre, d, copy, half, squared_norms + kept, errors + kept);
        kept_ids[kept++] = ids[q];
    }
    return kept;
}

/* Exact squared distances (exact_squared_distance) of EXACT_WAYS pairs at once: each pair
   its own sum in dimension order, so the values are the same; the independent sums overlap
   where one alone would wait on each addition. */
#define EXACT_WAYS 8
static void exact_squared_distances_of_pairs(const float* const* a, const float* const* b,
                                             int64_t d, float* out) {
    float sum[EXACT_WAYS] = {0.0f};
    for (int64_t j = 0; j < d; j++)
        for (int k = 0; k < EXACT_WAYS; k++) {
            float t = a[k][j] - b[k][j];
            sum[k] += t * t;
        }
    for (int k = 0; k < EXACT_WAYS; k++) out[k] = sum[k];
}

/* Pairs (row, point) of apply_points waiting for their exact distance. */
#define WAITING_PAIRS 64
typedef struct {
    const float* row[WAITING_PAIRS];
    const float* point[WAITING_PAIRS];
    int64_t index[WAITING_PAIRS]; /* the row's index in m */
    int64_t count;
} WaitingPairs;

/* Computes the waiting pairs' exact distances, EXACT_WAYS at a time (the last group padded
   with its last pair), and lowers each row's minimum distance m where one is smaller. */
static void settle_pairs(WaitingPairs* waiting, int64_t d, float* m) {
    for (int64_t k0 = 0; k0 < waiting->count; k0 += EXACT_WAYS) {
        const float* a[EXACT_WAYS];
        const float* b[EXACT_WAYS];
        float exact[EXACT_WAYS];
        for (int k = 0; k < EXACT_WAYS; k++) {
            int64_t pair = k0 + k < waiting->count ? k0 + k : waiting->count - 1;
            a[k] = waiting->row[pair];
            b[k] = waiting->point[pair];
        }
        exact_squared_distances_of_pairs(a, b, d, exact);
        for (int k = 0; k < EXACT_WAYS && k0 + k < waiting->count; k++) {
            int64_t i = waiting->index[k0 + k];
            if (exact[k] < m[i]) m[i] = exact[k];
        }
    }
    waiting->count = 0;
}

/* The product at `offset` of a tile's products, bfloat16 bits (`half`) or float32. */
static inline float product_value(const void* products, int half, int64_t offset) {
    return half ? from_bfloat16(((const uint16_t*)products)[offset])
                : ((const float*)products)[offset];
}

/* Applies p coreset points to a tile's rows[0..count). products[r * stride + q] is the
   low-precision product of the centred copies of row r and point q. A pair is computed
   exactly unless the product's rounding bound proves that the point cannot lower the row's
   minimum distance m:
       skip  <=>  (1 - eta) (|x~|^2 + |c~|^2) - 2 x~.c~  >=  (sqrt(m / shrink) + e_x + e_c)^2
   x~, c~ are the copies, e_x, e_c bound their errors (e_c: the largest point error), eta
   bounds the product's rounding relative to (|x~|^2 + |c~|^2) / 2. A row with one pair not
   skipped (the usual case) leaves it to wait with other rows' pairs (settle_pairs), which
   lowers m to its exact distance where smaller; a row with several computes them one by
   one, each tested with the minimum lowered so far. Writes the tile's largest
   minimum distance and its lowest row index; returns the number of exact computations. */
int64_t apply_points(const float* x, int64_t d, const int64_t* rows, int64_t count,
                     const void* products, int half, int64_t p, int64_t stride,
                     const int64_t* ids, const float* point_norms, const float* point_errors,
                     const float* row_norms, const float* row_errors, float eta, float shrink,
                     float* scratch, float* m, float* best_value, int64_t* best_row) {
    int64_t checks = 0;
    float* offsets = scratch; /* (1 - eta) |c~|^2 */
    float point_error = 0.0f;
    for (int64_t q = 0; q < p; q++) {
        offsets[q] = (1.0f - eta) * point_norms[q];
        if (point_errors[q] > point_error) point_error = point_errors[q];
    }
    const uint16_t* half_products = (const uint16_t*)products;
    const float* full_products = (const float*)products;
    WaitingPairs waiting;
    waiting.count = 0;
    for (int64_t r = 0; r < count; r++) {
        int64_t i = rows[r];
        float reach = sqrtf(m[i] / shrink) + row_errors[r] + point_error + 1e-18f;
        float threshold = (1.0f - eta) * row_norms[r] - reach * reach;
        int any = 0;
        if (half) {
            const uint16_t* row_products = half_products + r * stride;
            for (int64_t q = 0; q < p; q++)
                any |= 2.0f * from_bfloat16(row_products[q]) - offsets[q] > threshold;
        } else {
            const float* row_products = full_products + r * stride;
            for (int64_t q = 0; q < p; q++)
                any |= 2.0f * row_products[q] - offsets[q] > threshold;
        }
        /* blocks of LANES points: a vector test counts the flagged pairs */
        int64_t flagged = 0, first = -1;
        for (int64_t q0 = 0; any && q0 < p; q0 += LANES) {
            int lanes = p - q0 < LANES ? (int)(p - q0) : LANES;
            unsigned flags = 0;
            for (int l = 0; l < lanes; l++)
                flags |= (unsigned)(2.0f * product_value(products, half, r * stride + q0 + l) -
                                        offsets[q0 + l] >
                                    threshold)
                         << l;
            if (flags && first < 0) first = q0 + __builtin_ctz(flags);
            flagged += __builtin_popcount(flags);
        }
        const float* row = x + i * d;
        if (flagged == 1) { /* the usual case: the pair waits, with others, for settle_pairs */
            for (int64_t j = 0; j < d; j += 16) __builtin_prefetch(row + j);
            waiting.row[waiting.count] = row;
            waiting.point[waiting.count] = x + ids[first] * d;
            waiting.index[waiting.count++] = i;
            checks++;
            if (waiting.count == WAITING_PAIRS) settle_pairs(&waiting, d, m);
        } else if (flagged > 1) {
            /* several: one by one, each tested with the minimum lowered so far */
            float minimum = m[i];
            for (int64_t q = first; q < p; q++) {
                if (2.0f * product_value(products, half, r * stride + q) - offsets[q] <=
                    threshold)
                    continue;
                checks++;
                float exact = exact_squared_distance(row, x + ids[q] * d, d);
                if (exact < minimum) {
                    minimum = exact;
                    reach = sqrtf(minimum / shrink) + row_errors[r] + point_error + 1e-18f;
                    threshold = (1.0f - eta) * row_norms[r] - reach * reach;
                }
            }
            m[i] = minimum;
        }
    }
    settle_pairs(&waiting, d, m);
    float best = -INFINITY;
    int64_t best_index = -1;
    for (int64_t r = 0; r < count; r++) {
        int64_t i = rows[r];
        if (m[i] > best || (m[i] == best && i < best_index)) {
            best = m[i];
            best_index = i;
        }
    }
    *best_value = best;
    *best_row = best_index;
    return checks;
}

/* ------------------------------------------------------------------ products

   The float32 products (AVX2, PORTABLE, and torch.mm for the caller) are float32 sums of
   rounded or fused products: each term x_j c_j passes through at most d + 8 roundings (its
   multiplication, fused with an addition or not, the additions of its partial sum and those
   joining the partial sums: below ceil(d / 8) + 4 here, at most d in any order a matrix
   product may choose), so, whatever the order,
       |computed - x.c| <= gamma_{d+8} sum_j |x_j c_j| <= gamma_{d+8} (|x|^2 + |c|^2) / 2,
   gamma_n = n u / (1 - n u), u = 2^-24: the float32 `eta` of samplers._LazyTiles. The
   bfloat16 products add one rounding of the float32 sum to bfloat16 (2^-8 relative). */

/* out[r * p + q]: the float32 product of float32 rows[r] and points[q], eight partial sums
   joined pairwise (see above), in plain C: any CPU. */
static void float32_products(const float* rows, int64_t count, int64_t d, const float* points,
                             int64_t p, float* out) {
    for (int64_t r = 0; r < count; r++) {
        const float* row = rows + r * d;
        int64_t q = 0;
        for (; q + 4 <= p; q += 4) { /* four points at once: four independent sums */
            const float* point = points + q * d;
            float acc[4][8] = {{0.0f}};
            int64_t j = 0;
            for (; j + 8 <= d; j += 8)
                for (int k = 0; k < 4; k++)
                    for (int l = 0; l < 8; l++) acc[k][l] += row[j + l] * point[k * d + j + l];
            for (int k = 0; k < 4; k++)
                for (int l = 0; j + l < d; l++) acc[k][l] += row[j + l] * point[k * d + j + l];
            for (int k = 0; k < 4; k++)
                out[r * p + q + k] = ((acc[k][0] + acc[k][1]) + (acc[k][2] + acc[k][3])) +
                                     ((acc[k][4] + acc[k][5]) + (acc[k][6] + acc[k][7]));
        }
        for (; q < p; q++) {
            const float* point = points + q * d;
            float acc[8] = {0.0f};
            int64_t j = 0;
            for (; j + 8 <= d; j += 8)
                for (int l = 0; l < 8; l++) acc[l] += row[j + l] * point[j + l];
            for (int l = 0; j + l < d; l++) acc[l] += row[j + l] * point[j + l];
            out[r * p + q] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) +
                             ((acc[4] + acc[5]) + (acc[6] + acc[7]));
        }
    }
}

#if defined(X86_KERNELS)
/* Points [0, p) in groups of eight, transposed for avx2_products:
   packed[(g * d + j) * 8 + l] = points[(8 g + l) * d + j] for the p / 8 whole groups (the
   last p % 8 points are not packed); blocks of 8 x 8 values are transposed in registers. */
TARGET("avx2,fma")
static void pack_point_groups(const float* points, int64_t p, int64_t d, float* packed) {
    for (int64_t g = 0; g < p / 8; g++) {
        const float* group = points + 8 * g * d;
        float* out = packed + g * d * 8;
        int64_t j = 0;
        for (; j + 8 <= d; j += 8) {
            __m256 r[8], t[8], u[8];
            for (int l = 0; l < 8; l++) r[l] = _mm256_loadu_ps(group + l * d + j);
            for (int l = 0; l < 8; l += 2) {
                t[l] = _mm256_unpacklo_ps(r[l], r[l + 1]);
                t[l + 1] = _mm256_unpackhi_ps(r[l], r[l + 1]);
            }
            for (int h = 0; h < 8; h += 4) {
                u[h] = _mm256_shuffle_ps(t[h], t[h + 2], 0x44);
                u[h + 1] = _mm256_shuffle_ps(t[h], t[h + 2], 0xee);
                u[h + 2] = _mm256_shuffle_ps(t[h + 1], t[h + 3], 0x44);
                u[h + 3] = _mm256_shuffle_ps(t[h + 1], t[h + 3], 0xee);
            }
            for (int k = 0; k < 4; k++) {
                _mm256_storeu_ps(out + (j + k) * 8, _mm256_permute2f128_ps(u[k], u[k + 4], 0x20));
                _mm256_storeu_ps(out + (j + k + 4) * 8,
                                 _mm256_permute2f128_ps(u[k], u[k + 4], 0x31));
            }
        }
        for (; j < d; j++)
            for (int l = 0; l < 8; l++) out[j * 8 + l] = group[l * d + j];
    }
}

/* Sums of four vectors' lanes, [sum a, sum b, sum c, sum d]: three additions per lane. */
TARGET("avx2,fma") static inline __m128 lane_sums(__m256 a, __m256 b, __m256 c, __m256 d) {
    __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);
    __m256 abcd = _mm256_hadd_ps(ab, cd);
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

/* Dot-product form, for the last 1 to 7 points: a block of NR rows x NP points (2 x 4, 2 x 3,
   4 x 2 or 8 x 1: at most 8 accumulators, so the block fits the 16 vector registers of AVX2
   with the points' vectors): NR x NP accumulators of eight lanes (fused multiply-adds), the
   last partial vector of dimensions loaded under `tail`; each sum's lanes joined in three
   additions (lane_sums). */
#define AVX2_STEP(NR, NP, LOAD)                                                               \
    do {                                                                                      \
        __m256 c[NP];                                                                         \
        for (int k = 0; k < NP; k++) c[k] = LOAD(point + k * d + j);                          \
        for (int i = 0; i < NR; i++) {                                                        \
            __m256 x = LOAD(row + i * d + j);                                                 \
            for (int k = 0; k < NP; k++) acc[i][k] = _mm256_fmadd_ps(x, c[k], acc[i][k]);     \
        }                                                                                     \
    } while (0)
#define AVX2_WHOLE(address) _mm256_loadu_ps(address)
#define AVX2_TAIL(address) _mm256_maskload_ps(address, tail)

#define AVX2_BLOCK(NR, NP)                                                                    \
    do {                                                                                      \
        __m256 acc[NR][NP];                                                                   \
        for (int i = 0; i < NR; i++)                                                          \
            for (int k = 0; k < NP; k++) acc[i][k] = _mm256_setzero_ps();                     \
        int64_t j = 0;                                                                        \
        for (; j + 8 <= d; j += 8) AVX2_STEP(NR, NP, AVX2_WHOLE);                             \
        if (j < d) AVX2_STEP(NR, NP, AVX2_TAIL);                                              \
        for (int i = 0; i < NR && r + i < count; i++) {                                       \
            if (NP == 4) {                                                                    \
                _mm_storeu_ps(out + (r + i) * p + q,                                          \
                              lane_sums(acc[i][0], acc[i][NP > 1 ? 1 : 0],                    \
                                        acc[i][NP > 2 ? 2 : 0], acc[i][NP > 3 ? 3 : 0]));     \
            } else {                                                                          \
                for (int k = 0; k < NP; k++) {                                                \
                    float sums[4];                                                            \
                    _mm_storeu_ps(sums, lane_sums(acc[i][k], acc[i][k], acc[i][k], acc[i][k])); \
                    out[(r + i) * p + q + k] = sums[0];                                       \
                }                                                                             \
            }                                                                                 \
        }                                                                                     \
    } while (0)

/* Outer-product form, for whole groups of eight points: a block of NR rows x NG groups
   (6 x 2 or 8 x 1: 12 or 8 accumulators, the groups' vectors and one broadcast row value fit
   the 16 vector registers of AVX2). Accumulator (i, g) holds row i's products with the eight
   points of group g in its lanes, each summed over dimensions in order with fused
   multiply-adds (d roundings per term), so nothing is joined across lanes. */
#define AVX2_OUTER_BLOCK(NR, NG)                                                              \
    do {                                                                                      \
        __m256 acc[NR][NG];                                                                   \
        for (int i = 0; i < NR; i++)                                                          \
            for (int g = 0; g < NG; g++) acc[i][g] = _mm256_setzero_ps();                     \
        for (int64_t j = 0; j < d; j++) {                                                     \
            __m256 c[NG];                                                                     \
            for (int g = 0; g < NG; g++) c[g] = _mm256_loadu_ps(group + g * d * 8 + j * 8);   \
            for (int i = 0; i < NR; i++) {                                                    \
                __m256 x = _mm256_broadcast_ss(row + i * d + j);                              \
                for (int g = 0; g < NG; g++) acc[i][g] = _mm256_fmadd_ps(x, c[g], acc[i][g]); \
            }                                                                                 \
        }                                                                                     \
        for (int i = 0; i < NR && r + i < count; i++)                                         \
            for (int g = 0; g < NG; g++)                                                      \
                _mm256_storeu_ps(out + (r + i) * p + q + 8 * g, acc[i][g]);                   \
    } while (0)

/* out[r * p + q]: the float32 product of float32 rows[r] and points[q] with AVX2 fused
   multiply-adds. The whole groups of eight points, transposed in `packed`
   (pack_point_groups), in outer-product blocks of 6 rows x 16 points (an odd last group: 8
   rows x 8 points), each sum in dimension order (d roundings per term); the last p % 8
   points in dot-product blocks of 2 rows x 4 points (the last 1 to 3 in blocks of 2 x 3,
   4 x 2 or 8 x 1; ceil(d / 8) + 3 roundings per term; every point, where `packed` is NULL).
   Both are within the float32 bound above. Reads up to 7 rows past rows[count - 1] (the
   caller's copies are padded) and ignores them. */
TARGET("avx2,fma")
static void avx2_products(const float* rows, int64_t count, int64_t d, const float* points,
                          const float* packed, int64_t p, float* out) {
    int64_t groups = packed ? p / 8 : 0, q = 0;
    for (; q + 16 <= 8 * groups; q += 16) {
        const float* group = packed + q * d;
        for (int64_t r = 0; r < count; r += 6) {
            const float* row = rows + r * d;
            AVX2_OUTER_BLOCK(6, 2);
        }
    }
    if (q < 8 * groups) {
        const float* group = packed + q * d;
        for (int64_t r = 0; r < count; r += 8) {
            const float* row = rows + r * d;
            AVX2_OUTER_BLOCK(8, 1);
        }
        q += 8;
    }
    __m256i tail = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(d % 8)),
                                      _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    for (; q + 4 <= p; q += 4) {
        const float* point = points + q * d;
        for (int64_t r = 0; r < count; r += 2) {
            const float* row = rows + r * d;
            AVX2_BLOCK(2, 4);
        }
    }
    const float* point = points + q * d;
    if (p - q == 3)
        for (int64_t r = 0; r < count; r += 2) {
            const float* row = rows + r * d;
            AVX2_BLOCK(2, 3);
        }
    else if (p - q == 2)
        for (int64_t r = 0; r < count; r += 4) {
            const float* row = rows + r * d;
            AVX2_BLOCK(4, 2);
        }
    else if (p - q == 1)
        for (int64_t r = 0; r < count; r += 8) {
            const float* row = rows + r * d;
            AVX2_BLOCK(8, 1);
        }
}

#if defined(X86_BF16)
/* out[r * p + q]: the product of bfloat16 rows[r] and points[q] (d a multiple of 32),
   accumulated in float32 in any order and rounded to bfloat16, as torch.mm's bfloat16 output
   is: the same rounding bound (`eta`) holds. Products of bfloat16 values are exact in
   float32; flushed denormals (below 2^-126 per operation) are far inside the 1e-18 slack of
   `reach` in apply_points. */
TARGET("avx512f,avx512bf16")
static void bfloat16_products(const uint16_t* rows, int64_t count, int64_t d,
                              const uint16_t* points, int64_t p, uint16_t* out) {
    for (int64_t r = 0; r < count; r++) {
        const uint16_t* row = rows + r * d;
        for (int64_t q = 0; q < p; q++) {
            const uint16_t* point = points + q * d;
            __m512 sum = _mm512_setzero_ps();
            for (int64_t j = 0; j < d; j += 32)
                sum = _mm512_dpbf16_ps(sum, (__m512bh)_mm512_loadu_si512(row + j),
                                       (__m512bh)_mm512_loadu_si512(point + j));
            out[r * p + q] = to_bfloat16(_mm512_reduce_add_ps(sum));
        }
    }
}

#endif

#if defined(X86_AMX)
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} TileConfig;

/* out[r * p + q]: the product of bfloat16 rows[r] and points[q] (d a multiple of 32) on AMX
   tiles, blocks of 16 rows x 16 points accumulated in float32 and rounded to bfloat16 as
   torch.mm's bfloat16 output is: the same rounding bound (`eta`) holds (flushed denormals as
   in bfloat16_products). Reads up to 15 rows past rows[count - 1] (the caller's copies are
   padded) and ignores them. `pairs` is scratch of d x 16 bfloat16 values: a block of points
   in the tiles' pair-interleaved layout. */
TARGET("amx-tile,amx-bf16")
static void amx_products(const uint16_t* rows, int64_t count, int64_t d,
                         const uint16_t* points, int64_t p, uint32_t* pairs, uint16_t* out) {
    TileConfig config = {0};
    config.palette = 1;
    for (int t = 0; t < 3; t++) { /* 0: 16 x 16 sums, 1: 16 rows x 32 values, 2: 16 x 16 pairs */
        config.rows[t] = 16;
        config.bytes_per_row[t] = 64;
    }
    _tile_loadconfig(&config);
    float sums[16][16];
    for (int64_t q0 = 0; q0 < p; q0 += 16) {
        int64_t n = p - q0 < 16 ? p - q0 : 16;
        /* pairs[k * 16 + q]: dimensions 2k and 2k + 1 of point q0 + q (zero past p) */
        for (int64_t k = 0; k < d / 2; k++)
            for (int64_t q = 0; q < 16; q++) {
                uint32_t pair = 0;
                if (q < n) memcpy(&pair, points + (q0 + q) * d + 2 * k, 4);
                pairs[k * 16 + q] = pair;
            }
        for (int64_t r0 = 0; r0 < count; r0 += 16) {
            _tile_zero(0);
            for (int64_t j = 0; j < d; j += 32) {
                _tile_loadd(1, rows + r0 * d + j, d * 2);
                _tile_loadd(2, pairs + (j / 2) * 16, 64);
                _tile_dpbf16ps(0, 1, 2);
            }
            _tile_stored(0, sums, 64);
            int64_t m = count - r0 < 16 ? count - r0 : 16;
            for (int64_t r = 0; r < m; r++)
                for (int64_t q = 0; q < n; q++)
                    out[(r0 + r) * p + q0 + q] = to_bfloat16(sums[r][q]);
        }
    }
    _tile_release();
}
#endif

/* XCR0: the register state the operating system saves (0 without XSAVE). */
static uint64_t saved_state(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return 0;
    uint32_t low, high;
    __asm__ volatile("xgetbv" : "=a"(low), "=d"(high) : "c"(0));
    return ((uint64_t)high << 32) | low;
}
#endif

/* Product paths (bits of product_paths; samplers.PRODUCT_PATHS, same numbers). */
enum { PATH_TORCH = 0, PATH_AMX = 1, PATH_AVX512BF16 = 2, PATH_AVX2 = 3, PATH_PORTABLE = 4 };

/* Bit k set when path k can run here: this build has its kernel and the CPU (CPUID) and the
   operating system (saved register state; for AMX, Linux's per-process permission, asked
   for here: arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA) allow it. */
int64_t product_paths(void) {
    int64_t paths = (1 << PATH_TORCH) | (1 << PATH_PORTABLE);
#if defined(X86_KERNELS)
    unsigned a = 0, b = 0, c = 0, d = 0, b7 = 0, d7 = 0, a71 = 0, unused;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return paths;
    if (__get_cpuid_max(0, NULL) >= 7) {
        unsigned leaves;
        __cpuid_count(7, 0, leaves, b7, unused, d7);
        if (leaves >= 1) __cpuid_count(7, 1, a71, unused, unused, unused);
    }
    uint64_t state = saved_state();
    int ymm = (state & 0x6) == 0x6, zmm = (state & 0xe6) == 0xe6;
    int tiles = (state & 0x60000) == 0x60000;
    if (ymm && (c & (1u << 12)) && (c & (1u << 28)) && (b7 & (1u << 5)))
        paths |= 1 << PATH_AVX2;
#if defined(X86_BF16)
    if (zmm && (b7 & (1u << 16)) && (a71 & (1u << 5))) paths |= 1 << PATH_AVX512BF16;
#endif
#if defined(X86_AMX)
    if (tiles && (d7 & (1u << 22)) && (d7 & (1u << 24)) &&
        syscall(SYS_arch_prctl, 0x1023, 18) == 0)
        paths |= 1 << PATH_AMX;
#endif
    (void)unused, (void)zmm, (void)tiles, (void)d7, (void)a71;
#endif
    return paths;
}

/* out[r * p + q]: the products of rows[r] and points[q] (bfloat16 bits for PATH_AMX and
   PATH_AVX512BF16, d a multiple of 32; float32 otherwise) on `path`, as the lazy selection
   computes them (for tests and benchmarks; the caller checks product_paths). Rows are read
   in blocks of up to 16 (pad them); `pairs` is AMX scratch of d x 16 bfloat16 values. Returns
   0, or -1 for a path without a compiled kernel here. */
int64_t tile_products(int64_t path, const void* rows, int64_t count, int64_t d,
                      const void* points, int64_t p, void* pairs, void* out) {
    switch (path) {
#if defined(X86_KERNELS)
#if defined(X86_AMX)
    case PATH_AMX:
        amx_products(rows, count, d, points, p, (uint32_t*)pairs, out);
        return 0;
#endif
#if defined(X86_BF16)
    case PATH_AVX512BF16:
        bfloat16_products(rows, count, d, points, p, out);
        return 0;
#endif
    case PATH_AVX2: {
        /* without memory for the packed groups, the dot-product form does every point */
        float* packed = p >= 8 ? malloc((size_t)(p / 8 * 8 * d) * sizeof(float)) : NULL;
        if (packed) pack_point_groups(points, p, d, packed);
        avx2_products(rows, count, d, points, packed, p, out);
        free(packed);
        return 0;
    }
#endif
    case PATH_PORTABLE:
        float32_products(rows, count, d, points, p, out);
        return 0;
    default:
        (void)pairs;
        return -1;
    }
}

/* The next step of the lazy selection, from each tile's bound (largest minimum distance; an
   upper bound when the tile is stale) and argmax (lowest row index holding it). When no stale
   tile's bound reaches the largest up-to-date bound, the selection is that tile's row (the
   lowest among tiles tying): writes it to *row and returns 0. Otherwise writes the stale tile
   with the largest bound, which needs an update before any selection, to *tile and returns 1. */
static int next_tile(const float* bounds, const uint8_t* stale, const int64_t* argmax,
                     int64_t tiles_count, int64_t* tile, int64_t* row) {
    float exact = -INFINITY;
    int64_t exact_row = -1;
    int64_t top = -1;
    for (int64_t t = 0; t < tiles_count; t++) {
        if (stale[t]) {
            if (top < 0 || bounds[t] > bounds[top]) top = t;
        } else if (exact_row < 0 || bounds[t] > exact ||
                   (bounds[t] == exact && argmax[t] < exact_row)) {
            exact = bounds[t];
            exact_row = argmax[t];
        }
    }
    if (top < 0 || (exact_row >= 0 && bounds[top] < exact)) {
        *row = exact_row;
        return 0;
    }
    *tile = top;
    return 1;
}

/* The lazy selection's state, shared with samplers._LazyTiles (a ctypes.Structure of the
   same fields). Tile t holds rows order[edges[t]..edges[t+1]); applied[t] coreset points
   (selected[0..applied[t])) have been applied to it. */
typedef struct {
    const float* x;
    int64_t d, num_tiles;
    const int64_t *order, *edges;
    const void* copies;
    const float *row_norms, *row_errors, *centres, *radii;
    float* bounds;
    uint8_t* stale;
    int64_t *argmax, *applied;
    float* m;
    int64_t* selected;
    float* selected_rows; /* [step, d]: the selected rows of x, in selection order */
    int64_t half, small, path, pending_batch, has_stop, helper;
    double eta, shrink, stop_at;
    void* point_copies;
    float *point_norms, *point_errors;
    int64_t* point_ids;
    float* scratch;
    void* products;
    void* point_pairs; /* AMX scratch: d x 16 bfloat16 */
    /* progress: steps done; the batch left to the caller; counters (shared: updates in which
       the helper thread applied rows) */
    int64_t step, tile, start, kept, updates, pairs, checks, shared;
} LazySelection;

enum { LAZY_DONE = 0, LAZY_STOPPED = 1, LAZY_NEEDS_PRODUCT = 2 };

/* Who computes a batch's products (a PATH_*; PATH_TORCH: the caller, with torch.mm), from
   the selection's path (s->path, which product_paths allows; PATH_TORCH for every batch by
   the caller): AMX tiles for every batch of bfloat16 rows of a multiple of 32 values,
   AVX512-BF16 dot products for such batches of at most s->small points, AVX2 or plain C
   products for every batch of float32 rows. */
static int product_kind(const LazySelection* s, int64_t kept) {
    int bfloat16_rows = s->half && s->d % 32 == 0;
    switch (s->path) {
#if defined(X86_AMX)
    case PATH_AMX:
        return bfloat16_rows ? PATH_AMX : PATH_TORCH;
#endif
#if defined(X86_BF16)
    case PATH_AVX512BF16:
        return bfloat16_rows && kept <= s->small ? PATH_AVX512BF16 : PATH_TORCH;
#endif
#if defined(X86_KERNELS)
    case PATH_AVX2:
        return s->half ? PATH_TORCH : PATH_AVX2;
#endif
    case PATH_PORTABLE:
        return s->half ? PATH_TORCH : PATH_PORTABLE;
    default:
        (void)bfloat16_rows;
        (void)kept;
        return PATH_TORCH;
    }
}

typedef struct {
    float best_value; /* the rows' largest minimum distance */
    int64_t best_row; /* the lowest row index holding it */
    int64_t checks;   /* exact distances computed */
} RowsUpdate;

/* Joins the update of other rows into `into`: the larger minimum distance, the lower row
   index on a tie (so the joined result does not depend on which thread did which rows). */
static inline void join_update(RowsUpdate* into, RowsUpdate other) {
    into->checks += other.checks;
    if (other.best_value > into->best_value ||
        (other.best_value == into->best_value && other.best_row < into->best_row)) {
        into->best_value = other.best_value;
        into->best_row = other.best_row;
    }
}

/* Applies the pending batch (s->point_copies, point_norms, point_errors, point_ids: `kept`
   points; on the AVX2 path their whole groups of eight also in `packed`, see
   pack_point_groups, or NULL) to rows [begin, end) of tile t: their products (`kind`, not
   PATH_TORCH) into their own part of s->products, then apply_points. `pairs` and `scratch`
   are the calling thread's scratch (AMX pair layout: d x 16 bfloat16; kept floats). */
static RowsUpdate update_rows(const LazySelection* s, int64_t t, int64_t begin, int64_t end,
                              int64_t kept, int kind, const float* packed, void* pairs,
                              float* scratch) {
    int64_t d = s->d, low = s->edges[t] + begin, count = end - begin;
    size_t size = s->half ? sizeof(uint16_t) : sizeof(float);
    void* products = (char*)s->products + (size_t)(begin * kept) * size;
    const void* rows = (const char*)s->copies + (size_t)(d * low) * size;
    const void* points = s->point_copies;
    switch (kind) {
#if defined(X86_KERNELS)
#if defined(X86_AMX)
    case PATH_AMX:
        amx_products(rows, count, d, points, kept, (uint32_t*)pairs, products);
        break;
#endif
#if defined(X86_BF16)
    case PATH_AVX512BF16:
        bfloat16_products(rows, count, d, points, kept, products);
        break;
#endif
    case PATH_AVX2:
        avx2_products(rows, count, d, points, packed, kept, products);
        break;
#endif
    default: /* PATH_PORTABLE */
        float32_products(rows, count, d, points, kept, products);
    }
    (void)pairs;
    (void)packed;
    RowsUpdate update;
    update.checks = apply_points(s->x, d, s->order + low, count, products, (int)s->half, kept,
                                 kept, s->point_ids, s->point_norms, s->point_errors,
                                 s->row_norms + low, s->row_errors + low, (float)s->eta,
                                 (float)s->shrink, scratch, s->m, &update.best_value,
                                 &update.best_row);
    return update;
}

/* An update's rows are applied in chunks of CHUNK_ROWS (a multiple of 16, the AMX blocks,
   and of 6 and 8, the AVX2 blocks), each claimed by whichever thread asks first. */
#define CHUNK_ROWS 48

/* The posted update of a tile (rows [0, rows) of tile t, `kept` points) as one thread takes
   part in it: claims chunks from `next` (shared by the threads) until none is left and
   applies them; returns their joined result and adds the number claimed to *claimed. */
static RowsUpdate update_chunks(const LazySelection* s, int64_t t, int64_t rows, int64_t kept,
                                int kind, const float* packed, _Atomic int64_t* next,
                                void* pairs, float* scratch, int64_t* claimed) {
    RowsUpdate joined = {-INFINITY, -1, 0};
    for (;;) {
        int64_t begin = atomic_fetch_add_explicit(next, 1, memory_order_relaxed) * CHUNK_ROWS;
        if (begin >= rows) break;
        int64_t end = rows - begin < CHUNK_ROWS ? rows : begin + CHUNK_ROWS;
        join_update(&joined, update_rows(s, t, begin, end, kept, kind, packed, pairs, scratch));
        (*claimed)++;
    }
    return joined;
}

/* A second thread for one lazy_steps call (s->helper): while the calling thread applies a
   tile update, it claims chunks of the same update's rows (dynamically: the thread that
   runs faster takes more). Chunks touch disjoint rows of m and s->products and only read
   the rest, and their results are joined independently of who applied them, so the
   selection is the same as with one thread. The helper waits for work by spinning (a tile
   update takes tens of microseconds, less than a sleeping thread takes to wake), yielding
   the core at each turn after SPIN_TURNS turns. A posted update is joined by the helper
   only if it comes before the calling thread has finished it, so a helper that a busy
   machine has not scheduled never holds the selection up. */
enum { HELPER_WAITING, HELPER_POSTED, HELPER_RUNNING, HELPER_DONE, HELPER_QUIT };

typedef struct {
    const LazySelection* s;
    pthread_t thread;
    atomic_int state;
    _Atomic int64_t next;       /* the posted update's next unclaimed chunk */
    int64_t t, rows, kept;      /* the posted update */
    int kind;
    const float* packed;
    RowsUpdate result;          /* the helper's chunks, joined */
    int64_t claimed;            /* how many chunks it applied */
    void* pairs;
    float* scratch;
} Helper;

#define SPIN_TURNS 4096

static inline void relax(int64_t turn) {
    if (turn >= SPIN_TURNS) {
        sched_yield();
        return;
    }
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void* helper_loop(void* argument) {
    Helper* h = (Helper*)argument;
    for (int64_t turn = 0;; turn++) {
        int state = atomic_load_explicit(&h->state, memory_order_acquire);
        if (state == HELPER_QUIT) return NULL;
        if (state != HELPER_POSTED ||
            !atomic_compare_exchange_strong_explicit(&h->state, &state, HELPER_RUNNING,
                                                     memory_order_acquire,
                                                     memory_order_relaxed)) {
            relax(turn);
            continue;
        }
        turn = 0;
        h->claimed = 0;
        h->result = update_chunks(h->s, h->t, h->rows, h->kept, h->kind, h->packed, &h->next,
                                  h->pairs, h->scratch, &h->claimed);
        atomic_store_explicit(&h->state, HELPER_DONE, memory_order_release);
    }
}

/* Starts the helper; 0 (and nothing to stop) where memory or a thread is not available. */
static int start_helper(Helper* h, const LazySelection* s) {
    h->s = s;
    atomic_init(&h->state, HELPER_WAITING);
    atomic_init(&h->next, 0);
    h->pairs = malloc((size_t)s->d * 16 * sizeof(uint16_t));
    h->scratch = (float*)malloc((size_t)s->pending_batch * sizeof(float));
    if (h->pairs && h->scratch && pthread_create(&h->thread, NULL, helper_loop, h) == 0)
        return 1;
    free(h->pairs);
    free(h->scratch);
    return 0;
}

static void stop_helper(Helper* h) {
    atomic_store_explicit(&h->state, HELPER_QUIT, memory_order_release);
    pthread_join(h->thread, NULL);
    free(h->pairs);
    free(h->scratch);
}

/* Brings tile t up to date (every selected point applied), in batches of pending points.
   Batches whose products are computed here (see product_kind) are applied here, in chunks
   shared with the helper when there is one; any other batch is left to the caller: returns
   1, with applied[t] at the batch's start and the batch in s->tile, s->start, s->kept (its
   copies in point_copies). `packed`: room for the AVX2 path's packed point groups (or
   NULL). */
static int bring_up_to_date(LazySelection* s, int64_t t, Helper* helper, float* packed) {
    int64_t d = s->d, low = s->edges[t], rows = s->edges[t + 1] - low;
    for (int64_t start = s->applied[t]; start < s->step; start += s->pending_batch) {
        int64_t count = s->step - start < s->pending_batch ? s->step - start : s->pending_batch;
        int64_t kept = pending_points(s->selected_rows + start * d, d, s->selected + start,
                                      count, s->centres + t * d,
                                      s->radii[t], s->bounds[t], (float)s->shrink,
                                      s->point_copies, (int)s->half, s->point_norms,
                                      s->point_errors, s->point_ids);
        if (kept == 0) continue;
        int kind = product_kind(s, kept);
        if (kind == PATH_TORCH) {
            s->applied[t] = start;
            s->tile = t;
            s->start = start;
            s->kept = kept;
            return 1;
        }
        const float* groups = NULL;
#if defined(X86_KERNELS)
        if (kind == PATH_AVX2 && packed && kept >= 8) {
            pack_point_groups(s->point_copies, kept, d, packed);
            groups = packed;
        }
#endif
        int shared = helper && rows > CHUNK_ROWS;
        _Atomic int64_t alone;
        _Atomic int64_t* next = shared ? &helper->next : &alone;
        atomic_store_explicit(next, 0, memory_order_relaxed);
        if (shared) {
            helper->t = t;
            helper->rows = rows;
            helper->kept = kept;
            helper->kind = kind;
            helper->packed = groups;
            atomic_store_explicit(&helper->state, HELPER_POSTED, memory_order_release);
        }
        int64_t claimed = 0;
        RowsUpdate update = update_chunks(s, t, rows, kept, kind, groups, next, s->point_pairs,
                                          s->scratch, &claimed);
        int posted = HELPER_POSTED;
        if (shared && !atomic_compare_exchange_strong_explicit(&helper->state, &posted,
                                                               HELPER_WAITING,
                                                               memory_order_acquire,
                                                               memory_order_relaxed)) {
            /* the helper joined: wait for its last chunk */
            for (int64_t turn = 0;
                 atomic_load_explicit(&helper->state, memory_order_acquire) != HELPER_DONE;
                 turn++)
                relax(turn);
            join_update(&update, helper->result);
            s->shared += helper->claimed > 0;
        }
        s->checks += update.checks;
        s->bounds[t] = update.best_value;
        s->argmax[t] = update.best_row;
        s->updates++;
        s->pairs += rows * kept;
    }
    s->applied[t] = s->step;
    s->stale[t] = 0;
    return 0;
}

/* Selection steps until s->step reaches `until`: LAZY_DONE; or LAZY_STOPPED when the next
   point's minimum distance is at most stop_at (s->has_stop); or LAZY_NEEDS_PRODUCT (see
   bring_up_to_date), after which the caller applies that batch and calls again. With
   s->helper, a helper thread (see Helper) lives for the call. */
int64_t lazy_steps(LazySelection* s, int64_t until) {
    Helper helper;
    /* a helper only where this build computes products itself (see product_kind) */
    int shared = s->helper && product_kind(s, 1) != PATH_TORCH;
    Helper* h = shared && start_helper(&helper, s) ? &helper : NULL;
    /* the AVX2 path's packed point groups (without memory: its dot-product form only) */
    float* packed = NULL;
#if defined(X86_KERNELS)
    if (product_kind(s, 1) == PATH_AVX2)
        packed = malloc((size_t)(s->pending_batch * s->d) * sizeof(float));
#endif
    int64_t outcome = LAZY_DONE;
    while (outcome == LAZY_DONE && s->step < until) {
        int64_t tile = -1, row = -1;
        int handed_back = 0;
        while (!handed_back && next_tile(s->bounds, s->stale, s->argmax, s->num_tiles, &tile,
                                         &row))
            handed_back = bring_up_to_date(s, tile, h, packed);
        if (handed_back) {
            outcome = LAZY_NEEDS_PRODUCT;
        } else if (s->has_stop && (double)s->m[row] <= s->stop_at) {
            /* the chosen row's tile is up to date: its minimum distance is the exact one */
            outcome = LAZY_STOPPED;
        } else {
            s->selected[s->step] = row;
            memcpy(s->selected_rows + s->step * s->d, s->x + row * s->d,
                   (size_t)s->d * sizeof(float));
            mark_stale(s->x + row * s->d, s->centres, s->radii, s->bounds, s->num_tiles, s->d,
                       (float)s->shrink, s->stale);
            s->step++;
        }
    }
    if (h) stop_helper(h);
    free(packed);
    return outcome;
}

/* ------------------------------------------------------------ nearest neighbours */

/* Squared distance, LANES partial sums (vectorised), for the re-ranking of candidates. */
static inline float squared_distance(const float* x, const float* c, int64_t d) {
    return fast_squared_distance(x, c, d);
}

/* Extended centred copies for the product pass of the search, bfloat16 (`half`) or float32:
   with x~ the copy of x - centre and s = |x~|^2 (double precision) split as s_hi + s_lo in
   the copies' precision, bank rows become (-2 x~, 1, 1, s_hi, s_lo) and queries
   (x~, s_hi, s_lo, 1, 1), zero padded to `width`, so that a query-bank product is
   |q~ - b~|^2. Writes |x~| (rounded up) and an upper bound of |x - centre - x~|. */
void extended_copies(const float* x, int64_t n, int64_t d, const float* centre, int bank_side,
                     int half, void* out, int64_t width, float* norms, float* errors) {
    for (int64_t i = 0; i < n; i++) {
        const float* row = x + i * d;
        uint16_t* low_copy = (uint16_t*)out + i * width;
        float* full_copy = (float*)out + i * width;
        double norm[8] = {0.0}, lost[8] = {0.0}, size[8] = {0.0};
        for (int64_t j0 = 0; j0 < d; j0 += 8) {
            int lanes = d - j0 < 8 ? (int)(d - j0) : 8;
            for (int l = 0; l < lanes; l++) {
                float centred = row[j0 + l] - centre[j0 + l];
                double kept;
                if (half) {
                    uint16_t low = to_bfloat16(centred);
                    kept = (double)from_bfloat16(low);
                    low_copy[j0 + l] = bank_side ? to_bfloat16(-2.0f * from_bfloat16(low)) : low;
                } else {
                    kept = (double)centred;
                    full_copy[j0 + l] = bank_side ? -2.0f * centred : centred;
                }
                double difference = (double)centred - kept;
                norm[l] += kept * kept;
                lost[l] += difference * difference;
                size[l] += (double)centred * (double)centred;
            }
        }
        double norm_sum = 0.0, lost_sum = 0.0, size_sum = 0.0;
        for (int l = 0; l < 8; l++) {
            norm_sum += norm[l];
            lost_sum += lost[l];
            size_sum += size[l];
        }
        float extension[4];
        if (half) {
            uint16_t high = to_bfloat16((float)norm_sum);
            uint16_t rest = to_bfloat16((float)(norm_sum - (double)from_bfloat16(high)));
            uint16_t one = to_bfloat16(1.0f);
            for (int64_t j = d; j < width; j++) low_copy[j] = 0;
            low_copy[d] = bank_side ? one : high;
            low_copy[d + 1] = bank_side ? one : rest;
            low_copy[d + 2] = bank_side ? high : one;
            low_copy[d + 3] = bank_side ? rest : one;
        } else {
            float high = (float)norm_sum, rest = (float)(norm_sum - (double)high);
            for (int64_t j = d; j < width; j++) full_copy[j] = 0.0f;
            extension[0] = bank_side ? 1.0f : high;
            extension[1] = bank_side ? 1.0f : rest;
            extension[2] = bank_side ? high : 1.0f;
            extension[3] = bank_side ? rest : 1.0f;
            memcpy(full_copy + d, extension, sizeof(extension));
        }
        norms[i] = (float)(sqrt(norm_sum) * (1.0 + 1e-6));
        errors[i] = (float)((sqrt(lost_sum) + sqrt(size_sum) * 0x1p-23) * (1.0 + 1e-6)) + 1e-30f;
    }
}

/* Values [j0, j0 + lanes) of a row of the product pass, as floats. */
static inline void approximate_values(const void* row, int half, int64_t j0, int lanes,
                                      float* out) {
    if (half)
        for (int l = 0; l < lanes; l++) out[l] = from_bfloat16(((const uint16_t*)row)[j0 + l]);
    else
        memcpy(out, (const float*)row + j0, (size_t)lanes * sizeof(float));
}

/* Exact k-nearest-neighbour search from a low-precision pass. For queries [0, n): row i of
   `approx` (bfloat16 bits when `half`, else float32; stride ld, bank size m) holds, for every
   bank row j, the product giving |q~ - b~_j|^2 (see extended_copies). Its error is at most
       eps_ij = gamma (|q~_i| + |b~_j|)^2 + rho |approx_ij| + tiny,
   (gamma: the float32 accumulation of `width` terms of total size at most (|q~| + |b~|)^2
   and the split of the squared norms; rho: the output's rounding, 2^-8 for bfloat16, 0 for
   float32), and the true distance differs from |q~ - b~| by at most the copies' error norms
   query_errors[i] + bank_error. From these bounds, every bank row that could be among the
   k nearest is a candidate; candidates are ranked by float32 squared distances of the
   original vectors (queries [n, d], bank [m, d]), ties to the lower index. Writes
   distances [n, k] and indices [n, k] nearest first; returns the number of candidates. */
int64_t rerank_neighbours(const float* queries, const float* bank, int64_t d, int64_t n,
                          int64_t m, const void* approx, int half, int64_t ld,
                          const float* query_norms, const float* query_errors,
                          float bank_norm, float bank_error, float gamma, int64_t k,
                          float* scratch, int64_t* candidates, float* out_distances,
                          int64_t* out_indices) {
    int64_t total = 0;
    const float output_rounding = half ? 0x1p-8f : 0.0f;
    size_t size = half ? sizeof(uint16_t) : sizeof(float);
    for (int64_t i = 0; i < n; i++) {
        const void* row = (const char*)approx + (size_t)(i * ld) * size;
        float reach = query_norms[i] + bank_norm;
        float fixed = gamma * reach * reach + 1e-30f;
        float error = query_errors[i] + bank_error;
        /* the k smallest approximate values (small sorted buffer); blocks of LANES values
           whose minimum cannot enter the buffer are skipped whole */
        float* smallest = scratch;
        int64_t filled = 0;
        for (int64_t j0 = 0; j0 < m; j0 += LANES) {
            int lanes = m - j0 < LANES ? (int)(m - j0) : LANES;
            float block[LANES];
            float block_min = INFINITY;
            approximate_values(row, half, j0, lanes, block);
            for (int l = 0; l < lanes; l++) block_min = block[l] < block_min ? block[l] : block_min;
            if (filled == k && block_min >= smallest[k - 1]) continue;
            for (int l = 0; l < lanes; l++) {
                float value = block[l];
                if (filled == k && value >= smallest[k - 1]) continue;
                int64_t position = filled < k ? filled++ : k - 1;
                while (position > 0 && smallest[position - 1] > value) {
                    smallest[position] = smallest[position - 1];
                    position--;
                }
                smallest[position] = value;
            }
        }
        /* upper bound of the k-th nearest true distance, then the largest approximate value
           whose lower bound can still reach it */
        float kth = smallest[filled - 1];
        float upper = sqrtf(kth + fixed + output_rounding * fabsf(kth)) + error;
        float limit = ((upper + error) * (upper + error) * (1.0f + 0x1p-20f) + fixed) /
                      (1.0f - output_rounding);
        int64_t count = 0;
        for (int64_t j0 = 0; j0 < m; j0 += LANES) {
            int lanes = m - j0 < LANES ? (int)(m - j0) : LANES;
            float block[LANES];
            approximate_values(row, half, j0, lanes, block);
            int any = 0;
            for (int l = 0; l < lanes; l++) any |= block[l] <= limit;
            if (!any) continue;
            for (int l = 0; l < lanes; l++)
                if (block[l] <= limit) candidates[count++] = j0 + l;
        }
        total += count;
        /* exact ranking of the candidates */
        float* best = out_distances + i * k;
        int64_t* index = out_indices + i * k;
        int64_t kept = 0;
        const float* query = queries + i * d;
        for (int64_t c = 0; c < count; c++) {
            int64_t j = candidates[c];
            float distance = fast_squared_distance(query, bank + j * d, d);
            if (kept == k && (distance > best[k - 1] ||
                              (distance == best[k - 1] && j > index[k - 1])))
                continue;
            int64_t position = kept < k ? kept++ : k - 1;
            while (position > 0 && (best[position - 1] > distance ||
                                    (best[position - 1] == distance && index[position - 1] > j))) {
                best[position] = best[position - 1];
                index[position] = index[position - 1];
                position--;
            }
            best[position] = distance;
            index[position] = j;
        }
    }
    return total;
}
