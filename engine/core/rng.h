/* Counter-based random numbers (Philox4x32-10): the noise for (seed, image,
 * stream) is the same whatever the batch size, thread count or call order.
 *
 * Reproducibility contract (changing any of this changes every image):
 *   key     = { seed & 0xffffffff, seed >> 32 }
 *   counter = { block & 0xffffffff, block >> 32, image & 0xffffffff, stream & 0xffffffff }
 * where block = i / 4 for element i; lane i % 4 of the block's output words
 * x[0..3] gives element i. image and stream are reduced modulo 2^32.
 *   uniform: (x[lane] >> 8) * 2^-24, exactly representable, in [0, 1).
 *   normal:  Box-Muller on the pairs (x[0], x[1]) and (x[2], x[3]) computed in
 *            double, u = (a + 1) * 2^-32 in (0, 1], t = b * 2^-32 in [0, 1),
 *            r = sqrt(-2 ln u); lane 0/2 = r cos(2 pi t), lane 1/3 = r sin(2 pi t);
 *            each rounded once to float.
 * rng_uniform and rng_normal at the same address share the same raw words, so
 * use different streams for them when both are needed. */
#ifndef DENOISED_RNG_H
#define DENOISED_RNG_H

#include <stddef.h>
#include <stdint.h>

/* Fills out[0..n) with standard normal floats for one image. `stream` tells
 * independent uses apart: 0 is the initial noise x_T, k >= 1 the noise of the
 * k-th stochastic step. Element i depends only on (seed, image, stream, i). */
void rng_normal(uint64_t seed, uint64_t image, uint64_t stream, float *out, size_t n);

/* Uniform floats in [0, 1), same addressing as rng_normal. */
void rng_uniform(uint64_t seed, uint64_t image, uint64_t stream, float *out, size_t n);

/* Elements [first, first + n) of the same sequences, so a buffer can be filled
 * in pieces (e.g. by several threads) with the same result as one call. */
void rng_normal_at(uint64_t seed, uint64_t image, uint64_t stream, uint64_t first, float *out,
                   size_t n);
void rng_uniform_at(uint64_t seed, uint64_t image, uint64_t stream, uint64_t first, float *out,
                    size_t n);

/* A class for one image when none was asked for: uniform in [0, n) from (seed, image) on a
 * stream no sampler uses (RNG_STREAM_CHOICE), so the choice is part of the seed and the same
 * wherever the image is made (CLI, daemon, A1111 route). n >= 1. */
#define RNG_STREAM_CHOICE 0xffffffffu
uint32_t rng_choice(uint64_t seed, uint64_t image, uint32_t n);
/* The class of such an image: rng_choice over [0, num_classes) with null_class (classifier-free
 * guidance's "no class", when in range) left out. num_classes >= 1. */
int64_t rng_class(uint64_t seed, uint64_t image, int num_classes, int64_t null_class);

/* The raw generator, exposed for tests against published test vectors. */
void rng_philox4x32_10(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4]);

#endif
