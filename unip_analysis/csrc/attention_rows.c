/* Softmax of blocks of attention logits, fused with the statistics the analysis reduces them to.

   unip_analysis.kernels builds this file with the system's C compiler on first use and calls it
   through ctypes; without a compiler the analysis computes the same quantities with PyTorch ops
   (unip_analysis.kernels.softmax_rows_torch, the reference the tests compare this with).

   Why a kernel: at 4,097 tokens timm's fused attention never writes its probabilities, while the
   analysis must visit every one; in PyTorch ops the softmax, the log of the entropy terms and each
   sum is a pass of its own over a block of several MiB. Here each row (16 KiB at 4,097 tokens)
   is read from memory once and stays in the L1 cache for its three passes: maximum, exponentials,
   normalisation with the row statistics and the column sums.

   exp and log are computed to about one unit in the last place (exp: Cody-Waite reduction and
   the Cephes library's polynomial; log: a table of eight points and a short series), not with
   the libm calls, which do not vectorise. */
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define CHUNK 256 /* elements summed in fp32 lanes before the partial sum goes into a double */
/* PARK's entropy term without a log where a probability is at least TAU (see one_row) */
#define TAU 1e-7

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
  /* exp(r) = 1 + r + r^2 P(r) on |r| <= ln(2) / 2, P the Cephes library's expf polynomial */
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

static inline __m256 log8(__m256 y) { /* y: positive normal floats */
  /* y = 2^e m, m in [1, 2); m's top three bits pick c near m from a table of 8, and
     log y = e log 2 - log(1 / c) + log(1 + r), r = m / c - 1 in [-1/17, 1/17] */
  const __m256 inv_c = _mm256_setr_ps(0.941176474f, 0.842105269f, 0.761904776f, 0.695652187f, 0.639999986f, 0.592592597f, 0.551724136f, 0.516129017f);
  const __m256 log_c_hi = _mm256_setr_ps(0.0606246181f, 0.171850249f, 0.271933705f, 0.362905473f, 0.446287125f, 0.523248136f, 0.594707131f, 0.66139853f);
  const __m256 log_c_lo = _mm256_setr_ps(7.90594673e-12f, 3.0482164e-10f, -7.75744885e-09f, 2.5459036e-09f, -3.68883257e-10f, 2.70418687e-10f, -1.99138201e-08f, -1.79587208e-08f);
  __m256i b = _mm256_castps_si256(y);
  __m256i idx = _mm256_srli_epi32(b, 20); /* the permutes read the low three bits */
  __m256 ef = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(b, 23), _mm256_set1_epi32(127)));
  __m256 m = _mm256_castsi256_ps(
      _mm256_or_si256(_mm256_and_si256(b, _mm256_set1_epi32(0x7FFFFF)), _mm256_set1_epi32(0x3F800000)));
  __m256 r = _mm256_fmsub_ps(m, _mm256_permutevar8x32_ps(inv_c, idx), _mm256_set1_ps(1.0f));
  __m256 p = _mm256_set1_ps(-1.0f / 6); /* log(1 + r) = r - r^2/2 + ... - r^6/6, |error| < 4e-10 */
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 5));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(-1.0f / 4));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 3));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(-0.5f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r);
  p = _mm256_add_ps(p, _mm256_permutevar8x32_ps(log_c_lo, idx));
  p = _mm256_fmadd_ps(ef, _mm256_set1_ps(-2.12194440e-4f), p);
  p = _mm256_add_ps(p, _mm256_permutevar8x32_ps(log_c_hi, idx));
  return _mm256_fmadd_ps(ef, _mm256_set1_ps(0.693359375f), p);
}

/* lanes 0 .. count - 1 of a vector (count < 8): the row's last elements */
static inline __m256i tail_mask(long count) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)count), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
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
   and sum_k A log A (A clamped to FLT_MIN inside the log) under UNIP. The row is added to col[k]
   and, weighted by 1 / (mass + (n - npt) eps) (PARK) or by the row's sum (UNIP), to wcol[k].
   tb: n floats of scratch (the AVX2 path keeps there t, each logit minus the row's maximum).

   The logs come from the logits where they can: with t = x - max and s the sum of exp(t),
   log A = t - log s. Under UNIP that is the whole term (for A below FLT_MIN both A log A and
   A (t - log s) are below 1e-36). Under PARK, in a row whose smallest A is at least TAU,
   (A + eps) log(A + eps) = (A + eps) log A + eps + eps^2 / (2 A) - eps^3 / (6 A^2) + ...,
   the dropped terms below 1e-12 a key; other rows take log8 (the choice is made once a row, so
   that the branch is never mispredicted within one). */
static void one_row(float* x, long n, long npt, const float* d, const float* table, long gw, long yq,
                    long xq, double* o, float eps, int definition, float* col, float* wcol, float* tb) {
  const int park = definition == PARK, unip = definition == UNIP;
  long j = 0;
  float m = -INFINITY, mn = INFINITY;
#ifdef __AVX2__
  __m256 vmax = _mm256_set1_ps(-INFINITY), vmin = _mm256_set1_ps(INFINITY);
  for (; j + 8 <= n; j += 8) {
    const __m256 v = _mm256_loadu_ps(x + j);
    vmax = _mm256_max_ps(vmax, v);
    vmin = _mm256_min_ps(vmin, v);
  }
  if (j < n) {
    const __m256i mask = tail_mask(n - j);
    const __m256 v = _mm256_maskload_ps(x + j, mask);
    vmax = _mm256_max_ps(vmax, _mm256_blendv_ps(vmax, v, _mm256_castsi256_ps(mask)));
    vmin = _mm256_min_ps(vmin, _mm256_blendv_ps(vmin, v, _mm256_castsi256_ps(mask)));
    j = n;
  }
  float lanes[8], lanes_min[8];
  _mm256_storeu_ps(lanes, vmax);
  _mm256_storeu_ps(lanes_min, vmin);
  for (int i = 0; i < 8; ++i) {
    m = lanes[i] > m ? lanes[i] : m;
    mn = lanes_min[i] < mn ? lanes_min[i] : mn;
  }
#endif
  for (; j < n; ++j) {
    m = x[j] > m ? x[j] : m;
    mn = x[j] < mn ? x[j] : mn;
  }

  /* exponentials; the prefix keys summed on their own, so that a sink's mass never cancels
     out of the patch sums */
  double s_prefix = 0, s_patch = 0;
  for (j = 0; j < npt && j < n; ++j) {
    x[j] = expf(x[j] - m);
    s_prefix += x[j];
  }
  for (long c0 = npt; c0 < n; c0 += CHUNK) {
    const long c1 = c0 + CHUNK < n ? c0 + CHUNK : n;
    double t = 0;
    j = c0;
#ifdef __AVX2__
    __m256 acc = _mm256_setzero_ps(), vm = _mm256_set1_ps(m);
    for (; j + 8 <= c1; j += 8) {
      const __m256 tj = _mm256_sub_ps(_mm256_loadu_ps(x + j), vm);
      _mm256_storeu_ps(tb + j, tj);
      __m256 e = exp8(tj);
      _mm256_storeu_ps(x + j, e);
      acc = _mm256_add_ps(acc, e);
    }
    if (j < c1) {
      const __m256i mask = tail_mask(c1 - j);
      const __m256 tj = _mm256_sub_ps(_mm256_maskload_ps(x + j, mask), vm);
      _mm256_maskstore_ps(tb + j, mask, tj);
      __m256 e = exp8(tj);
      e = _mm256_and_ps(e, _mm256_castsi256_ps(mask));
      _mm256_maskstore_ps(x + j, mask, e);
      acc = _mm256_add_ps(acc, e);
      j = c1;
    }
    t = hsum8(acc);
#endif
    for (; j < c1; ++j) {
      const float e = expf(x[j] - m);
      x[j] = e;
      t += e;
    }
    s_patch += t;
  }
  const double s = s_prefix + s_patch;
  const float inv = (float)(1.0 / s);
  /* the column weight from these sums: the same as from the normalised row up to fp32 rounding */
  const float w = park ? (float)(1.0 / (s_patch / s + (double)(n - npt) * eps)) : (float)(s * inv);
  const float log_s = (float)log(s);
  const int series = park && exp((double)mn - m) / s >= TAU; /* every A of the row >= TAU */
  (void)log_s; /* the AVX2 path's, as tb and series */
  (void)tb;
  (void)table; /* the AVX2 path's too */
  (void)gw;
  (void)yq;
  (void)xq;
  (void)series;

  double prefix = 0, plogp = 0;
  for (j = 0; j < npt && j < n; ++j) {
    const float p = x[j] * inv;
    x[j] = p;
    prefix += p;
    col[j] += p;
    wcol[j] += w * p;
    if (unip) plogp += p * log_clamped(p);
  }
  double mass = 0, dist = 0;
  /* with the table, chunks of whole key rows (each a run of the table) */
  const long chunk = table ? gw * (CHUNK / gw > 0 ? CHUNK / gw : 1) : CHUNK;
  for (long c0 = npt; c0 < n; c0 += chunk) {
    const long c1 = c0 + chunk < n ? c0 + chunk : n;
    double ta = 0, td = 0, tp = 0;
    j = c0;
#ifdef __AVX2__
    __m256 aa = _mm256_setzero_ps(), ad = aa, ap = aa;
    const __m256 vi = _mm256_set1_ps(inv), ve = _mm256_set1_ps(eps);
    const __m256 vw = _mm256_set1_ps(w), vls = _mm256_set1_ps(log_s);
    const __m256 ve2 = _mm256_set1_ps(0.5f * eps * eps), ve3 = _mm256_set1_ps(eps * eps * eps / 6);
    for (long s0 = c0; s0 < c1 && j == s0;) { /* segments: key rows (table) or the whole chunk */
      const long s1 = table ? s0 + gw : c1;
      const float* ds = d ? d + s0 : NULL; /* ds[j - s0]: the distance to key j */
      if (table) {
        const long yk = (s0 - npt) / gw;
        ds = table + (yq > yk ? yq - yk : yk - yq) * (2 * gw - 1) + (gw - 1 - xq);
      }
      for (; j + 8 <= s1; j += 8) {
        const __m256 p = _mm256_mul_ps(_mm256_loadu_ps(x + j), vi);
        _mm256_storeu_ps(x + j, p);
        _mm256_storeu_ps(col + j, _mm256_add_ps(_mm256_loadu_ps(col + j), p));
        _mm256_storeu_ps(wcol + j, _mm256_fmadd_ps(vw, p, _mm256_loadu_ps(wcol + j)));
        aa = _mm256_add_ps(aa, p);
        if (ds) ad = _mm256_fmadd_ps(p, _mm256_loadu_ps(ds + (j - s0)), ad);
        if (park) {
          const __m256 a = _mm256_add_ps(p, ve);
          if (series) { /* (A + eps) log A + eps + r (eps^2 / 2 - r eps^3 / 6), r = 1 / A to 12 bits */
            const __m256 log_p = _mm256_sub_ps(_mm256_loadu_ps(tb + j), vls);
            const __m256 r = _mm256_rcp_ps(p);
            const __m256 tail = _mm256_fmadd_ps(r, _mm256_fnmadd_ps(r, ve3, ve2), ve);
            ap = _mm256_add_ps(ap, _mm256_fmadd_ps(a, log_p, tail));
          } else {
            ap = _mm256_fmadd_ps(a, log8(a), ap);
          }
        } else if (unip) {
          ap = _mm256_fmadd_ps(p, _mm256_sub_ps(_mm256_loadu_ps(tb + j), vls), ap);
        }
      }
      s0 = s1;
    }
    if (j < c1) { /* the same on the last elements (never with the table: its chunks are whole key
                     rows, multiples of 8); lanes past the row read and add 0 */
      const __m256i mask = tail_mask(c1 - j);
      const __m256 p = _mm256_mul_ps(_mm256_maskload_ps(x + j, mask), vi);
      _mm256_maskstore_ps(x + j, mask, p);
      _mm256_maskstore_ps(col + j, mask, _mm256_add_ps(_mm256_maskload_ps(col + j, mask), p));
      _mm256_maskstore_ps(wcol + j, mask, _mm256_fmadd_ps(vw, p, _mm256_maskload_ps(wcol + j, mask)));
      aa = _mm256_add_ps(aa, p);
      if (d) ad = _mm256_fmadd_ps(p, _mm256_maskload_ps(d + j, mask), ad);
      if (park) {
        const __m256 a = _mm256_add_ps(p, ve);
        ap = _mm256_add_ps(ap, _mm256_and_ps(_mm256_mul_ps(a, log8(a)), _mm256_castsi256_ps(mask)));
      } else if (unip) { /* p and t read 0 past the row */
        ap = _mm256_fmadd_ps(p, _mm256_sub_ps(_mm256_maskload_ps(tb + j, mask), vls), ap);
      }
      j = c1;
    }
    ta = hsum8(aa);
    td = hsum8(ad);
    tp = hsum8(ap);
#endif
    for (; j < c1; ++j) {
      const float p = x[j] * inv;
      x[j] = p;
      col[j] += p;
      wcol[j] += w * p;
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

/* The distances of query patch p to every patch key into d[0 .. P - 1] (P = gh x gw, row-major
   grid): d(q, k) = table[|yq - yk|][gw - 1 - xq + xk], so that each key row's distances are one
   contiguous run of the table (rows of 2 gw - 1 floats). The copies go 8 floats at a time and may
   run up to 7 floats past a key row, into the next row's place (written next) or the padding: d
   and table must have 8 floats to spare after their last element. The table is a few KiB (32 KiB
   at 4,097 tokens): a row's distances come from the L1 cache instead of a [rows, tokens] block of
   them computed per block of rows and read from memory per head. */
static void distance_row(float* d, const float* table, long gh, long gw, long p) {
  const long yq = p / gw, xq = p % gw, w2 = 2 * gw - 1;
  for (long yk = 0; yk < gh; ++yk) {
    const float* src = table + (yq > yk ? yq - yk : yk - yq) * w2 + (gw - 1 - xq);
    float* dst = d + yk * gw;
#ifdef __AVX2__
    for (long c = 0; c < gw; c += 8) _mm256_storeu_ps(dst + c, _mm256_loadu_ps(src + c));
#else
    memcpy(dst, src, (size_t)gw * sizeof(float));
#endif
  }
}

/* acc's two rows of column sums added to image x head i's columns (see unip_attention_rows), then
   zeroed; one thread at a time */
static void add_columns(double* cols, float* acc, long n, long i, long heads, long h0, long stride_b,
                        long stride_h, long stride_c) {
  double* target = cols + (i / heads) * stride_b + (h0 + i % heads) * stride_h;
#pragma omp critical
  for (long k = 0; k < n; ++k) {
    target[k] += acc[k];
    target[stride_c + k] += acc[n + k];
  }
  memset(acc, 0, 2 * (size_t)n * sizeof(float));
}

/* x: [bh, rows, n] fp32 logits (bh = images x heads, row-major), replaced by their softmax.
   table: the patch grid's distances (see distance_row; grid_w patches a row, (n - npt) / grid_w
   rows), row r of the block being query patch p0 + r; or NULL (no distances: sum_k A d = 0).
   stats: row r of image b, head h of the block at stats + b * stats_b + h * stats_h + r * 4 (see
   one_row). cols: the column sums are added to
   cols + b * stride_b + (h0 + h) * stride_h + c * stride_c + k for image b, head h of the block:
   c = 0 the plain sum over the rows, c = 1 each row weighted by 1 / (mass + (n - npt) eps)
   under PARK, by its sum under UNIP. Returns 0, or 1 where scratch memory could not be had. */
int unip_attention_rows(float* x, long bh, long rows, long n, long npt, const float* table, long grid_w,
                        long p0, double* stats,
                        long stats_b, long stats_h, double* cols, long heads, long h0, long stride_b,
                        long stride_h, long stride_c, double eps, int definition, int nthreads) {
  int failed = 0;
  const long total = bh * rows;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
  {
    /* col, wcol, t, the row's distances (prefix keys 0, 8 floats to spare) */
    float* acc = (float*)calloc(4 * (size_t)n + 8, sizeof(float));
    if (!acc) failed = 1;
    long held = -1; /* the image x head whose column sums acc holds */
    /* each thread takes a contiguous range of (image x head, row): one or two images x heads
       each, no barrier between them; a thread's column sums go out when its image x head changes */
#pragma omp for schedule(static)
    for (long ir = 0; ir < total; ++ir) {
      if (!acc) continue;
      const long i = ir / rows, r = ir % rows;
      if (i != held) {
        if (held >= 0) add_columns(cols, acc, n, held, heads, h0, stride_b, stride_h, stride_c);
        held = i;
      }
      double* o = stats + (i / heads) * stats_b + (i % heads) * stats_h + r * 4;
      float* d = NULL;
      const float* direct = NULL; /* rows of 8 keys or more: straight from the table */
      const long p = p0 + r;
#ifdef __AVX2__
      if (table && grid_w % 8 == 0) direct = table;
#endif
      if (table && !direct) {
        d = acc + 3 * n;
        distance_row(d + npt, table, (n - npt) / grid_w, grid_w, p);
      }
      one_row(x + ir * n, n, npt, d, direct, grid_w, p / grid_w, p % grid_w, o, (float)eps, definition, acc,
              acc + n, acc + 2 * n);
    }
    if (acc && held >= 0) add_columns(cols, acc, n, held, heads, h0, stride_b, stride_h, stride_c);
    free(acc);
  }
  return failed;
}
