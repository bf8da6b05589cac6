/* Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3")
 * and the uniform/normal streams built on it. The counter/key layout is the
 * reproducibility contract documented in rng.h. */
#include "rng.h"

#include <math.h>

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u

/* 2 pi rounded to double; written out so the value does not depend on M_PI. */
#define TWO_PI 6.283185307179586476925286766559

void rng_philox4x32_10(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4]) {
  uint32_t c0 = ctr[0], c1 = ctr[1], c2 = ctr[2], c3 = ctr[3];
  uint32_t k0 = key[0], k1 = key[1];
  for (int r = 0; r < 10; r++) {
    if (r > 0) {
      k0 += PHILOX_W0;
      k1 += PHILOX_W1;
    }
    uint64_t p0 = (uint64_t)PHILOX_M0 * c0;
    uint64_t p1 = (uint64_t)PHILOX_M1 * c2;
    uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0;
    uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
    c0 = n0;
    c1 = (uint32_t)p1;
    c2 = n2;
    c3 = (uint32_t)p0;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

static void block_words(uint64_t seed, uint64_t image, uint64_t stream, uint64_t block,
                        uint32_t x[4]) {
  const uint32_t key[2] = {(uint32_t)seed, (uint32_t)(seed >> 32)};
  const uint32_t ctr[4] = {(uint32_t)block, (uint32_t)(block >> 32), (uint32_t)image,
                           (uint32_t)stream};
  rng_philox4x32_10(ctr, key, x);
}

/* Both values of one Box-Muller pair. a + 1 keeps u in (0, 1], so log never
 * sees 0 and the largest radius is sqrt(64 ln 2) ~ 6.66. */
static void box_muller(uint32_t a, uint32_t b, float *z0, float *z1) {
  double u = ((double)a + 1.0) * 0x1p-32;
  double t = (double)b * 0x1p-32;
  double r = sqrt(-2.0 * log(u));
  *z0 = (float)(r * cos(TWO_PI * t));
  *z1 = (float)(r * sin(TWO_PI * t));
}

void rng_normal_at(uint64_t seed, uint64_t image, uint64_t stream, uint64_t first, float *out,
                   size_t n) {
  size_t i = 0;
  while (i < n) {
    uint64_t idx = first + i;
    uint64_t block = idx / 4;
    unsigned lane = (unsigned)(idx % 4);
    uint32_t x[4];
    float z[4];
    block_words(seed, image, stream, block, x);
    /* Computing the pair a lane does not need is cheap and keeps the value of
     * every element independent of where a request starts. */
    box_muller(x[0], x[1], &z[0], &z[1]);
    box_muller(x[2], x[3], &z[2], &z[3]);
    for (; lane < 4 && i < n; lane++, i++)
      out[i] = z[lane];
  }
}

void rng_uniform_at(uint64_t seed, uint64_t image, uint64_t stream, uint64_t first, float *out,
                    size_t n) {
  size_t i = 0;
  while (i < n) {
    uint64_t idx = first + i;
    unsigned lane = (unsigned)(idx % 4);
    uint32_t x[4];
    block_words(seed, image, stream, idx / 4, x);
    /* 24 bits fit a float mantissa exactly, so the result can never round up to 1. */
    for (; lane < 4 && i < n; lane++, i++)
      out[i] = (float)(x[lane] >> 8) * 0x1p-24f;
  }
}

void rng_normal(uint64_t seed, uint64_t image, uint64_t stream, float *out, size_t n) {
  rng_normal_at(seed, image, stream, 0, out, n);
}

void rng_uniform(uint64_t seed, uint64_t image, uint64_t stream, float *out, size_t n) {
  rng_uniform_at(seed, image, stream, 0, out, n);
}

uint32_t rng_choice(uint64_t seed, uint64_t image, uint32_t n) {
  float u;
  rng_uniform(seed, image, RNG_STREAM_CHOICE, &u, 1);
  const uint32_t k = (uint32_t)((double)u * n); /* u < 1 exactly, so k < n */
  return k < n ? k : n - 1;
}

int64_t rng_class(uint64_t seed, uint64_t image, int num_classes, int64_t null_class) {
  const int has_null = null_class >= 0 && null_class < num_classes && num_classes > 1;
  int64_t k = rng_choice(seed, image, (uint32_t)(num_classes - has_null));
  return has_null && k >= null_class ? k + 1 : k;
}
