/* Tests for the counter-based RNG: Philox known answers from Random123, the
 * documented counter/key layout, distribution moments, and independence of
 * every element from how the request was split. */
#include <math.h>
#include <stdint.h>

#include "rng.h"
#include "testutil.h"

START_TEST(test_philox_kat) {
  /* Random123 kat_vectors, philox4x32 10 rounds. */
  static const struct {
    uint32_t ctr[4], key[2], out[4];
  } kat[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
      {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff},
       {0xffffffff, 0xffffffff},
       {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
      {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344},
       {0xa4093822, 0x299f31d0},
       {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
  };
  for (size_t i = 0; i < sizeof kat / sizeof kat[0]; i++) {
    uint32_t out[4];
    rng_philox4x32_10(kat[i].ctr, kat[i].key, out);
    for (int k = 0; k < 4; k++)
      ck_assert_msg(out[k] == kat[i].out[k], "vector %zu word %d: %08x != %08x", i, k, out[k],
                    kat[i].out[k]);
  }
}
END_TEST

/* The layout promised in rng.h, recomputed from the raw generator. */
START_TEST(test_layout_contract) {
  const uint64_t seed = 0x0123456789abcdefull, image = 7, stream = 3;
  float u[12], z[12];
  rng_uniform(seed, image, stream, u, 12);
  rng_normal(seed, image, stream, z, 12);
  const uint32_t key[2] = {0x89abcdefu, 0x01234567u};
  for (uint32_t block = 0; block < 3; block++) {
    const uint32_t ctr[4] = {block, 0, (uint32_t)image, (uint32_t)stream};
    uint32_t x[4];
    rng_philox4x32_10(ctr, key, x);
    for (int lane = 0; lane < 4; lane++)
      ck_assert_float_eq(u[block * 4 + lane], (float)(x[lane] >> 8) * 0x1p-24f);
    for (int pair = 0; pair < 2; pair++) {
      double r = sqrt(-2.0 * log(((double)x[2 * pair] + 1.0) * 0x1p-32));
      double t = 6.283185307179586 * ((double)x[2 * pair + 1] * 0x1p-32);
      ck_assert_float_eq(z[block * 4 + 2 * pair], (float)(r * cos(t)));
      ck_assert_float_eq(z[block * 4 + 2 * pair + 1], (float)(r * sin(t)));
    }
  }
}
END_TEST

/* Pinned values: if this fails, every seed now produces different images. */
START_TEST(test_pinned_values) {
  float z[8];
  rng_normal(42, 0, 0, z, 8);
  static const float want[8] = {-0.9701898f, 0.1940190f, -1.2356207f, 1.9239267f,
                                -0.0731815f, 0.1391375f, -1.1066650f, 0.3266830f};
  for (int i = 0; i < 8; i++)
    ck_assert_msg(fabsf(z[i] - want[i]) < 1e-6f, "element %d: %.7f != %.7f", i, z[i], want[i]);
}
END_TEST

START_TEST(test_normal_moments) {
  const size_t n = 1000000;
  float *z = malloc(n * sizeof *z);
  ck_assert_ptr_nonnull(z);
  rng_normal(12345, 0, 0, z, n);
  double s1 = 0, s2 = 0, s4 = 0, maxabs = 0;
  size_t beyond3 = 0;
  for (size_t i = 0; i < n; i++) {
    double v = z[i];
    ck_assert(isfinite(v));
    s1 += v;
    s2 += v * v;
    s4 += v * v * v * v;
    if (fabs(v) > maxabs)
      maxabs = fabs(v);
    beyond3 += fabs(v) > 3;
  }
  double mean = s1 / n, var = s2 / n - mean * mean, kurt = s4 / n;
  /* Bounds are about 5 standard errors for n = 1e6. */
  ck_assert_msg(fabs(mean) < 0.005, "mean %g", mean);
  ck_assert_msg(fabs(var - 1) < 0.008, "variance %g", var);
  ck_assert_msg(fabs(kurt - 3) < 0.05, "fourth moment %g", kurt);
  /* P(|z| > 3) = 0.0027. */
  ck_assert_msg(fabs(beyond3 / (double)n - 0.0027) < 0.0003, "tail fraction %g",
                beyond3 / (double)n);
  ck_assert_msg(maxabs <= 6.67, "max |z| %g exceeds the Box-Muller bound", maxabs);
  free(z);
}
END_TEST

START_TEST(test_uniform_range) {
  const size_t n = 1000000;
  float *u = malloc(n * sizeof *u);
  ck_assert_ptr_nonnull(u);
  rng_uniform(99, 1, 2, u, n);
  double s1 = 0, s2 = 0;
  for (size_t i = 0; i < n; i++) {
    ck_assert(u[i] >= 0.0f && u[i] < 1.0f);
    s1 += u[i];
    s2 += (double)u[i] * u[i];
  }
  double mean = s1 / n, var = s2 / n - mean * mean;
  ck_assert_msg(fabs(mean - 0.5) < 0.0015, "mean %g", mean);
  ck_assert_msg(fabs(var - 1.0 / 12) < 0.0005, "variance %g", var);
  free(u);
}
END_TEST

START_TEST(test_split_independence) {
  enum { N = 1003 };
  static float whole[3][N], parts[3][N];
  for (int img = 0; img < 3; img++)
    rng_normal(7, (uint64_t)img, 5, whole[img], N);
  /* Other image order, ragged pieces that start mid-block. */
  static const size_t cuts[] = {0, 1, 2, 6, 7, 13, 400, 401, 1000, N};
  for (int img = 2; img >= 0; img--)
    for (size_t k = 0; k + 1 < sizeof cuts / sizeof cuts[0]; k++)
      rng_normal_at(7, (uint64_t)img, 5, cuts[k], parts[img] + cuts[k], cuts[k + 1] - cuts[k]);
  for (int img = 0; img < 3; img++)
    ck_assert_mem_eq(whole[img], parts[img], sizeof whole[img]);

  float prefix[5];
  rng_normal(7, 1, 5, prefix, 5);
  ck_assert_mem_eq(prefix, whole[1], sizeof prefix);

  /* Same for uniforms. */
  float u1[N], u2[N];
  rng_uniform(7, 0, 5, u1, N);
  for (size_t k = 0; k + 1 < sizeof cuts / sizeof cuts[0]; k++)
    rng_uniform_at(7, 0, 5, cuts[k], u2 + cuts[k], cuts[k + 1] - cuts[k]);
  ck_assert_mem_eq(u1, u2, sizeof u1);

  /* Zero-length requests touch nothing. */
  float sentinel = 123.0f;
  rng_normal(7, 0, 0, &sentinel, 0);
  rng_uniform_at(7, 0, 0, 12, &sentinel, 0);
  ck_assert_float_eq(sentinel, 123.0f);
}
END_TEST

static size_t count_equal(const float *a, const float *b, size_t n) {
  size_t same = 0;
  for (size_t i = 0; i < n; i++)
    same += a[i] == b[i];
  return same;
}

START_TEST(test_addresses_differ) {
  enum { N = 256 };
  float base[N], other[N];
  rng_normal(1, 0, 0, base, N);
  rng_normal(2, 0, 0, other, N);
  ck_assert_uint_eq(count_equal(base, other, N), 0);
  rng_normal(1, 1, 0, other, N);
  ck_assert_uint_eq(count_equal(base, other, N), 0);
  rng_normal(1, 0, 1, other, N);
  ck_assert_uint_eq(count_equal(base, other, N), 0);
  /* Seeds that differ only in the high word use the second key word. */
  rng_normal(1ull | 1ull << 32, 0, 0, other, N);
  ck_assert_uint_eq(count_equal(base, other, N), 0);
  /* image and stream are not interchangeable. */
  float a[N], b[N];
  rng_normal(1, 2, 3, a, N);
  rng_normal(1, 3, 2, b, N);
  ck_assert_uint_eq(count_equal(a, b, N), 0);
  /* Deterministic: the same address twice gives the same bits. */
  rng_normal(1, 0, 0, other, N);
  ck_assert_mem_eq(base, other, sizeof base);
}
END_TEST

/* Blocks past 2^32 use the high counter word instead of wrapping. */
START_TEST(test_large_offsets) {
  float lo[4], hi[4];
  rng_uniform_at(3, 0, 0, 0, lo, 4);
  rng_uniform_at(3, 0, 0, 4ull << 32, hi, 4);
  ck_assert_uint_eq(count_equal(lo, hi, 4), 0);
  const uint32_t key[2] = {3, 0}, ctr[4] = {0, 1, 0, 0};
  uint32_t x[4];
  rng_philox4x32_10(ctr, key, x);
  for (int i = 0; i < 4; i++)
    ck_assert_float_eq(hi[i], (float)(x[i] >> 8) * 0x1p-24f);

  /* As documented, image and stream only use their low 32 bits. */
  float wrap[4];
  rng_uniform(3, 5, 6, lo, 4);
  rng_uniform(3, 5ull | 1ull << 32, 6ull | 1ull << 40, wrap, 4);
  ck_assert_mem_eq(lo, wrap, sizeof lo);
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("rng");
  TCase *tc = tcase_create("core");
  tcase_add_test(tc, test_philox_kat);
  tcase_add_test(tc, test_layout_contract);
  tcase_add_test(tc, test_pinned_values);
  tcase_add_test(tc, test_normal_moments);
  tcase_add_test(tc, test_uniform_range);
  tcase_add_test(tc, test_split_independence);
  tcase_add_test(tc, test_addresses_differ);
  tcase_add_test(tc, test_large_offsets);
  suite_add_tcase(s, tc);
  return s;
}
