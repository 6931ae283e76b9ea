/* quantdeck's CPU kernels in C: the row bodies of engine/formats/nvfp4/kernels_cpu.py and
 * engine/formats/fp8_block/kernels_cpu.py (numba), the same float32 operations in the same order, so the same
 * bytes as the torch reference (modelopt's NVFP4QTensor rules).
 *
 * Built once per machine by engine/formats/native/build.py with -ffp-contract=off (no fused multiply-adds:
 * every product is rounded to float32 before it is used, as in the reference) and without -ffast-math.
 * Every function works on rows [r0, r1) (tile rows for qd_fp8_tile_max), so that Python can split one big
 * weight over threads (engine/formats/native/calls.py); each call is single-threaded and reentrant.
 *
 * Arrays are C-contiguous. wb: FP8 E4M3 bytes [o, i]; sc: float32 tile scales [ceil(o/bo), ceil(i/bi)];
 * lut: the float32 value of each E4M3 byte (NaN at 0x7F / 0xFF).
 *
 * One I/O helper sits beside them, qd_pread_rows: a tensor's sampled rows read in one call, so that Python makes one
 * call (the GIL released once) where it would make a system call per row.
 *
 * And validate's decoders (engine/convert/validate_read.py, whose numpy versions they replace where the library
 * builds): qd_fp8_rows_f32 and qd_nvfp4_rows_f32 give the float32 values of sampled rows with the numpy path's
 * products in its order (one float32 multiply per value: the same values; where both factors are NaN, which NaN
 * comes out may differ, as it does between numpy's own loops), qd_e4m3_scan counts a block-scale array's bad
 * bytes, and qd_bf16_nonfinite finds a BF16 tensor's first NaN or Inf.
 */
#define _POSIX_C_SOURCE 200809L /* pread, posix_fadvise */
#define _FILE_OFFSET_BITS 64    /* 64-bit off_t on 32-bit platforms too */
#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#if !defined(FLT_EVAL_METHOD) || FLT_EVAL_METHOD != 0
#error "float math must be done in float (x87 excess precision would change the bytes): build with SSE"
#endif

#define F_SMIN 0.001953125f /* 2^-9: the smallest block scale (e4m3's smallest subnormal) */
#define F_SMAX 448.0f       /* e4m3's largest value */

int qd_abi_version(void) { return 3; }

static inline float fmaxf_(float a, float b) { return a > b ? a : b; }
static inline float fminf_(float a, float b) { return a < b ? a : b; }

/* E2M1 code of a float32: ties to even, saturating at 6, sign = x < 0. Each bound is counted as "not at or
 * below it" (for a number the same as "above it"), so that NaN (0/0: a block divisor that underflowed to zero,
 * weights of subnormal size) counts all seven and is code 7, where torch.searchsorted places it in the reference;
 * no branch, so the loop stays vectorized. */
static inline uint8_t e2m1(float x) {
    float a = fabsf(x);
    uint8_t m = (uint8_t)(!(a <= 0.25f) + !(a < 0.75f) + !(a <= 1.25f) + !(a < 1.75f) + !(a <= 2.5f) +
                          !(a < 3.5f) + !(a <= 5.0f));
    return (uint8_t)(m | ((x < 0.0f) << 3));
}

/* e4m3 code of a block scale s in [2^-9, 448]: round to nearest even to 3 mantissa bits above 2^-6, rint(s·512)
 * subnormal steps below. */
static inline uint8_t e4m3_code(float s) {
    uint32_t u;
    memcpy(&u, &s, 4);
    if (u < 0x3C800000u) return (uint8_t)rintf(s * 512.0f);
    return (uint8_t)(((u + 0x7FFFFu + ((u >> 20) & 1u)) >> 20) - 960u);
}

/* The block scale of a 16-block whose amax is given: amax / (6·s2), 1 for a zero block, clamped to e4m3. */
static inline float block_scale(float amax, float six_s2) {
    float s = amax / six_s2;
    if (s == 0.0f) s = 1.0f;
    s = fmaxf_(s, F_SMIN);
    return fminf_(s, F_SMAX);
}

/* A row's scratch: xf (its float32 values, padded to whole 16-blocks), den (a divisor per block), cd (codes). */
typedef struct {
    float *xf, *den;
    uint8_t *cd;
} scratch_t;

static int scratch_get(scratch_t *t, int64_t nb) {
    t->xf = malloc(sizeof(float) * (size_t)(nb * 16 + nb));
    t->cd = malloc((size_t)(nb * 16));
    if (!t->xf || !t->cd) {
        free(t->xf);
        free(t->cd);
        return -1;
    }
    t->den = t->xf + nb * 16;
    return 0;
}

static void scratch_put(scratch_t *t) {
    free(t->xf);
    free(t->cd);
}

/* Scale bytes, E2M1 codes and packed nibbles of a row of i values held in t->xf (padded here with zeros to
 * nb = ceil(i/16) blocks). */
static void quant_row(scratch_t *t, int64_t i, float s2, float six_s2, const float *lut, uint8_t *packed_row,
                      uint8_t *bs_row) {
    int64_t nb = (i + 15) / 16;
    float *xf = t->xf, *den = t->den;
    uint8_t *cd = t->cd;
    for (int64_t c = i; c < nb * 16; c++) xf[c] = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        /* max |x| of the block on the bits: |x| of a non-NaN float orders as its bits do, and an integer max
         * vectorizes where a float one may not without -ffast-math. No NaN gets here: callers refuse NaN codes,
         * non-finite weights and scales, and a scale_2 whose 6·448·scale_2 overflows (nvfp4/host.py). */
        uint32_t m = 0;
        for (int j = 0; j < 16; j++) {
            uint32_t v;
            memcpy(&v, xf + b * 16 + j, 4); /* the bits, without breaking strict aliasing */
            v &= 0x7FFFFFFFu;
            m = v > m ? v : m;
        }
        float amax;
        memcpy(&amax, &m, 4);
        uint8_t code = e4m3_code(block_scale(amax, six_s2));
        bs_row[b] = code;
        den[b] = lut[code] * s2;
    }
    for (int64_t b = 0; b < nb; b++) {
        float d = den[b];
        for (int j = 0; j < 16; j++) cd[b * 16 + j] = e2m1(xf[b * 16 + j] / d);
    }
    for (int64_t k = 0; k < nb * 8; k++) packed_row[k] = (uint8_t)(cd[2 * k] | (cd[2 * k + 1] << 4));
}

/* FP8-block dequant → NVFP4 in one pass, rows [r0, r1). bad[r] = 1 where row r holds a NaN code.
 * Returns 0, or -1 when scratch memory could not be had. */
int qd_fp8_block_to_nvfp4(const uint8_t *wb, const float *sc, int64_t o, int64_t i, int64_t bo, int64_t bi, float s2,
                          const float *lut, uint8_t *packed, uint8_t *bs, uint8_t *bad, int64_t r0, int64_t r1) {
    (void)o;
    int64_t nb = (i + 15) / 16, gi = (i + bi - 1) / bi;
    float six_s2 = 6.0f * s2;
    scratch_t t;
    if (scratch_get(&t, nb)) return -1;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = wb + r * i;
        const float *srow = sc + (r / bo) * gi;
        uint8_t mb = 0;
        for (int64_t c = 0; c < i; c++) {
            uint8_t v = row[c] & 0x7F;
            mb = v > mb ? v : mb;
        }
        if (mb == 0x7F) bad[r] = 1;
        for (int64_t g = 0; g < gi; g++) {
            float sv = srow[g];
            int64_t end = (g + 1) * bi < i ? (g + 1) * bi : i;
            for (int64_t c = g * bi; c < end; c++) t.xf[c] = lut[row[c]] * sv;
        }
        quant_row(&t, i, s2, six_s2, lut, packed + r * nb * 8, bs + r * nb);
    }
    scratch_put(&t);
    return 0;
}

/* float32 [o, i] (finite) → NVFP4, rows [r0, r1). Returns 0, or -1 without scratch memory. */
int qd_fp32_to_nvfp4(const float *w, int64_t o, int64_t i, float s2, const float *lut, uint8_t *packed, uint8_t *bs,
                     int64_t r0, int64_t r1) {
    (void)o;
    int64_t nb = (i + 15) / 16;
    scratch_t t;
    if (scratch_get(&t, nb)) return -1;
    for (int64_t r = r0; r < r1; r++) {
        memcpy(t.xf, w + r * i, sizeof(float) * (size_t)i);
        quant_row(&t, i, s2, 6.0f * s2, lut, packed + r * nb * 8, bs + r * nb);
    }
    scratch_put(&t);
    return 0;
}

/* out[tr, t] = the largest magnitude byte (b & 0x7F) of the bo×bi tile (tr, t), tile rows [t0, t1). */
int qd_fp8_tile_max(const uint8_t *wb, int64_t o, int64_t i, int64_t bo, int64_t bi, uint8_t *out, int64_t t0,
                    int64_t t1) {
    int64_t gi = (i + bi - 1) / bi;
    uint8_t *acc = malloc((size_t)i);
    if (!acc) return -1;
    for (int64_t tr = t0; tr < t1; tr++) {
        memset(acc, 0, (size_t)i);
        int64_t rend = (tr + 1) * bo < o ? (tr + 1) * bo : o;
        for (int64_t r = tr * bo; r < rend; r++) {
            const uint8_t *row = wb + r * i;
            for (int64_t c = 0; c < i; c++) {
                uint8_t v = row[c] & 0x7F;
                acc[c] = v > acc[c] ? v : acc[c];
            }
        }
        for (int64_t t = 0; t < gi; t++) {
            uint8_t m = 0;
            int64_t end = (t + 1) * bi < i ? (t + 1) * bi : i;
            for (int64_t c = t * bi; c < end; c++) m = acc[c] > m ? acc[c] : m;
            out[tr * gi + t] = m;
        }
    }
    free(acc);
    return 0;
}

/* out[r, c] = BF16 bits of fp32(lut[wb[r, c]] × tile scale), rounded to nearest even, rows [r0, r1)
 * (no NaN codes: the caller checks). */
int qd_fp8_dequant_bf16(const uint8_t *wb, const float *sc, int64_t o, int64_t i, int64_t bo, int64_t bi,
                        const float *lut, uint16_t *out, int64_t r0, int64_t r1) {
    (void)o;
    int64_t gi = (i + bi - 1) / bi;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = wb + r * i;
        const float *srow = sc + (r / bo) * gi;
        uint16_t *orow = out + r * i;
        for (int64_t t = 0; t < gi; t++) {
            float sv = srow[t];
            int64_t end = (t + 1) * bi < i ? (t + 1) * bi : i;
            for (int64_t c = t * bi; c < end; c++) {
                float v = lut[row[c]] * sv;
                uint32_t u;
                memcpy(&u, &v, 4);
                orow[c] = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
            }
        }
    }
    return 0;
}

/* Rows of `len` bytes at offsets[0..n) of file `fd` into out[n, len]. With `advise`, every row's range is first
 * advised POSIX_FADV_WILLNEED (its read queued without waiting: the disk works on all of them at once; refused
 * advice is ignored). Returns 0; -errno of a failed read; k > 0 when the file ended inside row k - 1. */
int64_t qd_pread_rows(int fd, const int64_t *offsets, int64_t n, int64_t len, uint8_t *out, int advise) {
#ifdef POSIX_FADV_WILLNEED
    if (advise)
        for (int64_t r = 0; r < n; r++) (void)posix_fadvise(fd, (off_t)offsets[r], (off_t)len, POSIX_FADV_WILLNEED);
#else
    (void)advise;
#endif
    for (int64_t r = 0; r < n; r++) {
        int64_t got = 0;
        while (got < len) {
            ssize_t k = pread(fd, out + r * len + got, (size_t)(len - got), (off_t)(offsets[r] + got));
            if (k < 0) {
                if (errno == EINTR) continue;
                return -(int64_t)errno;
            }
            if (k == 0) return r + 1;
            got += k;
        }
    }
    return 0;
}

/* out[j, c] = lut[codes[j, c]] × sc[rows[j] / bo, min(c / bi, gi - 1)] for the k sampled rows `codes` [k, cols] of an
 * FP8 weight whose row j is the weight's row rows[j]; sc: float32 tile scales [., gi] (gi = ceil(cols / bi)). */
int qd_fp8_rows_f32(const uint8_t *codes, int64_t k, int64_t cols, const int64_t *rows, const float *sc, int64_t gi,
                    int64_t bo, int64_t bi, const float *lut, float *out) {
    for (int64_t j = 0; j < k; j++) {
        const uint8_t *row = codes + j * cols;
        const float *srow = sc + (rows[j] / bo) * gi;
        float *orow = out + j * cols;
        for (int64_t t = 0; t < gi; t++) {
            float sv = srow[t];
            int64_t end = (t + 1) * bi < cols ? (t + 1) * bi : cols;
            for (int64_t c = t * bi; c < end; c++) orow[c] = lut[row[c]] * sv;
        }
    }
    return 0;
}

/* out[j, 2q + h] = pair[packed[r, q]][h] × (lut[bs[r, q / 8]] × s2), r = rows[j] (or j without rows), for the k rows
 * of an NVFP4 weight: packed [., p] bytes (two E2M1 values each, the low nibble first), bs [., p / 8] E4M3 block
 * scales (one per 16 values); pair: the two float32 values of each byte; out [k, 2p]. */
int qd_nvfp4_rows_f32(const uint8_t *packed, const uint8_t *bs, int64_t p, const int64_t *rows, int64_t k, float s2,
                      const float *lut, const float *pair, float *out) {
    int64_t nb = p / 8;
    for (int64_t j = 0; j < k; j++) {
        int64_t r = rows ? rows[j] : j;
        const uint8_t *prow = packed + r * p;
        const uint8_t *brow = bs + r * nb;
        float *orow = out + j * 2 * p;
        for (int64_t b = 0; b < nb; b++) {
            float pb = lut[brow[b]] * s2;
            for (int64_t q = b * 8; q < b * 8 + 8; q++) {
                const float *v = pair + 2 * prow[q];
                orow[2 * q] = v[0] * pb;
                orow[2 * q + 1] = v[1] * pb;
            }
        }
    }
    return 0;
}

/* E4M3 block-scale bytes bs[0..n): out[0] = NaN bytes (magnitude 0x7F), out[1] = bytes that are not a finite
 * scale > 0 (NaN, zero magnitude, or the sign bit set), out[2] = the largest magnitude byte (b & 0x7F). */
int qd_e4m3_scan(const uint8_t *bs, int64_t n, int64_t *out) {
    int64_t nan = 0, bad = 0;
    uint8_t top = 0;
    for (int64_t x = 0; x < n; x++) {
        uint8_t b = bs[x], m = b & 0x7F;
        nan += m == 0x7F;
        bad += (m == 0x7F) | (m == 0) | (b >> 7);
        top = m > top ? m : top;
    }
    out[0] = nan;
    out[1] = bad;
    out[2] = top;
    return 0;
}

/* The index of the first BF16 value of x[0..n) that is NaN or Inf (exponent bits all ones), n when there is none. */
int64_t qd_bf16_nonfinite(const uint16_t *x, int64_t n) {
    const int64_t step = 4096;
    for (int64_t a = 0; a < n; a += step) {
        int64_t end = a + step < n ? a + step : n;
        int bad = 0;
        for (int64_t k = a; k < end; k++) bad |= (x[k] & 0x7F80) == 0x7F80;
        if (bad)
            for (int64_t k = a; k < end; k++)
                if ((x[k] & 0x7F80) == 0x7F80) return k;
    }
    return n;
}
