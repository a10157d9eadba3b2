/* Softmax of blocks of attention logits, fused with the statistics the analysis reduces them to.

   unip_analysis.kernels builds this file with the system's C compiler on first use and calls it
   through ctypes; without a compiler the analysis computes the same quantities with PyTorch ops
   (unip_analysis.kernels.softmax_rows_torch, the reference the tests compare this with).

   Why a kernel: at 4,097 tokens timm's fused attention never writes its probabilities, while the
   analysis must visit every one; in PyTorch ops the softmax, the log of the entropy terms and each
   sum is a pass of its own over a block of several MiB. Here each row (16 KiB at 4,097 tokens)
   is read from memory once and stays in the L1 cache for its four passes: maximum, exponentials,
   normalisation with the row statistics, column sums.

   exp and log are computed to about one unit in the last place (a 7th-degree polynomial after
   Cody-Waite reduction, and the atanh series of the mantissa), not with the libm calls, which
   do not vectorise. */
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define CHUNK 256 /* elements summed in fp32 lanes before the partial sum goes into a double */

enum { PARK = 1, UNIP = 2 };

#ifdef __AVX2__
static inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.0f);
  __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ); /* below FLT_MIN: 0 */
  x = _mm256_max_ps(x, lo);
  __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x); /* ln 2 in two parts */
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

static inline __m256 log8(__m256 y) { /* y: positive normal floats */
  __m256i b = _mm256_castps_si256(y);
  __m256i e = _mm256_sub_epi32(_mm256_srli_epi32(b, 23), _mm256_set1_epi32(127));
  __m256 m = _mm256_castsi256_ps(
      _mm256_or_si256(_mm256_and_si256(b, _mm256_set1_epi32(0x7FFFFF)), _mm256_set1_epi32(0x3F800000)));
  __m256 big = _mm256_cmp_ps(m, _mm256_set1_ps(1.41421356f), _CMP_GT_OQ); /* m in [1/sqrt2, sqrt2] */
  m = _mm256_blendv_ps(m, _mm256_mul_ps(m, _mm256_set1_ps(0.5f)), big);
  __m256 ef = _mm256_add_ps(_mm256_cvtepi32_ps(e), _mm256_and_ps(big, _mm256_set1_ps(1.0f)));
  __m256 z = _mm256_div_ps(_mm256_sub_ps(m, _mm256_set1_ps(1.0f)), _mm256_add_ps(m, _mm256_set1_ps(1.0f)));
  __m256 z2 = _mm256_mul_ps(z, z); /* log m = 2 atanh z = 2 (z + z^3/3 + ...), |z| <= 0.172 */
  __m256 p = _mm256_set1_ps(2.0f / 9);
  p = _mm256_fmadd_ps(p, z2, _mm256_set1_ps(2.0f / 7));
  p = _mm256_fmadd_ps(p, z2, _mm256_set1_ps(2.0f / 5));
  p = _mm256_fmadd_ps(p, z2, _mm256_set1_ps(2.0f / 3));
  p = _mm256_fmadd_ps(p, z2, _mm256_set1_ps(2.0f));
  p = _mm256_mul_ps(p, z);
  p = _mm256_fmadd_ps(ef, _mm256_set1_ps(-2.12194440e-4f), p);
  return _mm256_fmadd_ps(ef, _mm256_set1_ps(0.693359375f), p);
}

static inline double hsum8(__m256 v) {
  __m256d a = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)), _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  __m128d s = _mm_add_pd(_mm256_castpd256_pd128(a), _mm256_extractf128_pd(a, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}
#endif

static inline float log_clamped(float p) { return logf(p > FLT_MIN ? p : FLT_MIN); }

/* One row of n logits: softmax in place; o = (sum of the row, sum over the patch keys k >= npt,
   sum_k A d, entropy term); the entropy term is sum_{k >= npt} (A + eps) log(A + eps) under PARK
   and sum_k A log A (A clamped to FLT_MIN inside the log) under UNIP. */
static void one_row(float* x, long n, long npt, const float* d, double* o, float eps, int definition) {
  const int park = definition == PARK, unip = definition == UNIP;
  long j = 0;
  float m = -INFINITY;
#ifdef __AVX2__
  __m256 vmax = _mm256_set1_ps(-INFINITY);
  for (; j + 8 <= n; j += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(x + j));
  float lanes[8];
  _mm256_storeu_ps(lanes, vmax);
  for (int i = 0; i < 8; ++i) m = lanes[i] > m ? lanes[i] : m;
#endif
  for (; j < n; ++j) m = x[j] > m ? x[j] : m;

  double s = 0;
  for (long c0 = 0; c0 < n; c0 += CHUNK) {
    const long c1 = c0 + CHUNK < n ? c0 + CHUNK : n;
    double t = 0;
    j = c0;
#ifdef __AVX2__
    __m256 acc = _mm256_setzero_ps(), vm = _mm256_set1_ps(m);
    for (; j + 8 <= c1; j += 8) {
      __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + j), vm));
      _mm256_storeu_ps(x + j, e);
      acc = _mm256_add_ps(acc, e);
    }
    t = hsum8(acc);
#endif
    for (; j < c1; ++j) {
      const float e = expf(x[j] - m);
      x[j] = e;
      t += e;
    }
    s += t;
  }
  const float inv = (float)(1.0 / s);

  /* the prefix keys on their own: a sink's mass never cancels out of the patch sums */
  double prefix = 0, plogp = 0;
  for (j = 0; j < npt && j < n; ++j) {
    const float p = x[j] * inv;
    x[j] = p;
    prefix += p;
    if (unip) plogp += p * log_clamped(p);
  }
  double mass = 0, dist = 0;
  for (long c0 = npt; c0 < n; c0 += CHUNK) {
    const long c1 = c0 + CHUNK < n ? c0 + CHUNK : n;
    double ta = 0, td = 0, tp = 0;
    j = c0;
#ifdef __AVX2__
    __m256 aa = _mm256_setzero_ps(), ad = aa, ap = aa;
    const __m256 vi = _mm256_set1_ps(inv), ve = _mm256_set1_ps(eps), vt = _mm256_set1_ps(FLT_MIN);
    for (; j + 8 <= c1; j += 8) {
      const __m256 p = _mm256_mul_ps(_mm256_loadu_ps(x + j), vi);
      _mm256_storeu_ps(x + j, p);
      aa = _mm256_add_ps(aa, p);
      if (d) ad = _mm256_fmadd_ps(p, _mm256_loadu_ps(d + j), ad);
      if (park) {
        const __m256 a = _mm256_add_ps(p, ve);
        ap = _mm256_fmadd_ps(a, log8(a), ap);
      } else if (unip) {
        ap = _mm256_fmadd_ps(p, log8(_mm256_max_ps(p, vt)), ap);
      }
    }
    ta = hsum8(aa);
    td = hsum8(ad);
    tp = hsum8(ap);
#endif
    for (; j < c1; ++j) {
      const float p = x[j] * inv;
      x[j] = p;
      ta += p;
      if (d) td += p * d[j];
      if (park) {
        const float a = p + eps;
        tp += a * logf(a);
      } else if (unip) {
        tp += p * log_clamped(p);
      }
    }
    mass += ta;
    dist += td;
    plogp += tp;
  }
  o[0] = prefix + mass;
  o[1] = mass;
  o[2] = dist;
  o[3] = plogp;
}

/* x: [bh, rows, n] fp32 logits (bh = images x heads, row-major), replaced by their softmax.
   d: [rows, n] distances from each row's query to every key (0 for prefix keys), or NULL.
   stats: [bh, rows, 4] (see one_row). cols: the column sums are added to
   cols + b * stride_b + (h0 + h) * stride_h + c * stride_c + k for image b, head h of the block:
   c = 0 the plain sum over the rows, c = 1 each row weighted by 1 / (mass + (n - npt) eps)
   under PARK, by its sum under UNIP. Returns 0, or 1 where scratch memory could not be had. */
int unip_attention_rows(float* x, long bh, long rows, long n, long npt, const float* d, double* stats,
                        double* cols, long heads, long h0, long stride_b, long stride_h, long stride_c,
                        double eps, int definition, int nthreads) {
  int failed = 0;
  const double patches = (double)(n - npt);
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
  {
    float* acc = (float*)calloc(2 * (size_t)n, sizeof(float));
    if (!acc) failed = 1;
    for (long i = 0; i < bh; ++i) {
      int touched = 0;
#pragma omp for schedule(static)
      for (long r = 0; r < rows; ++r) {
        if (!acc) continue;
        float* row = x + (i * rows + r) * n;
        double* o = stats + (i * rows + r) * 4;
        one_row(row, n, npt, d ? d + r * n : NULL, o, (float)eps, definition);
        const float w = definition == PARK ? (float)(1.0 / (o[1] + patches * eps)) : (float)o[0];
        for (long k = 0; k < n; ++k) {
          acc[k] += row[k];
          acc[n + k] += w * row[k];
        }
        touched = 1;
      }
      if (touched) {
        double* target = cols + (i / heads) * stride_b + (h0 + i % heads) * stride_h;
#pragma omp critical
        for (long k = 0; k < n; ++k) {
          target[k] += acc[k];
          target[stride_c + k] += acc[n + k];
        }
        memset(acc, 0, 2 * (size_t)n * sizeof(float));
      }
    }
    free(acc);
  }
  return failed;
}
