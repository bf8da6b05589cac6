/* Short-lived URL tokens for browsers: an <img> or an EventSource cannot send an Authorization
 * header, and an API key in a URL ends up in histories and proxy logs. A token is
 * "EXPIRY.MAC": MAC = HMAC-SHA256 keyed with one API key over the job id and the expiry, cut to
 * 128 bits. It grants what the key may read of that one job (its images and event stream) until
 * the expiry, verifies on every daemon that has the same keys (no server-side state), and dies
 * with its key when the keys are reloaded without it. */
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "internal.h"

/* ---- SHA-256 (FIPS 180-4) and HMAC (RFC 2104); test_web checks RFC 4231's vectors ---- */

typedef struct sha256 {
  uint32_t h[8];
  uint8_t buf[64];
  size_t nbuf;
  uint64_t bytes;
} sha256;

static const uint32_t K256[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

static uint32_t ror(uint32_t x, int n) {
  return (x >> n) | (x << (32 - n));
}

static void sha256_block(sha256 *s, const uint8_t *p) {
  uint32_t w[64], v[8];
  for (int i = 0; i < 16; i++)
    w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 | (uint32_t)p[4 * i + 2] << 8 |
           p[4 * i + 3];
  for (int i = 16; i < 64; i++) {
    const uint32_t s0 = ror(w[i - 15], 7) ^ ror(w[i - 15], 18) ^ (w[i - 15] >> 3);
    const uint32_t s1 = ror(w[i - 2], 17) ^ ror(w[i - 2], 19) ^ (w[i - 2] >> 10);
    w[i] = w[i - 16] + s0 + w[i - 7] + s1;
  }
  memcpy(v, s->h, sizeof v);
  for (int i = 0; i < 64; i++) {
    const uint32_t t1 = v[7] + (ror(v[4], 6) ^ ror(v[4], 11) ^ ror(v[4], 25)) +
                        ((v[4] & v[5]) ^ (~v[4] & v[6])) + K256[i] + w[i];
    const uint32_t t2 = (ror(v[0], 2) ^ ror(v[0], 13) ^ ror(v[0], 22)) +
                        ((v[0] & v[1]) ^ (v[0] & v[2]) ^ (v[1] & v[2]));
    memmove(v + 1, v, 7 * sizeof *v);
    v[4] += t1;
    v[0] = t1 + t2;
  }
  for (int i = 0; i < 8; i++)
    s->h[i] += v[i];
}

static void sha256_init(sha256 *s) {
  static const uint32_t h0[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  memcpy(s->h, h0, sizeof h0);
  s->nbuf = 0;
  s->bytes = 0;
}

static void sha256_update(sha256 *s, const void *data, size_t n) {
  const uint8_t *p = data;
  s->bytes += n;
  while (n) {
    size_t k = 64 - s->nbuf < n ? 64 - s->nbuf : n;
    memcpy(s->buf + s->nbuf, p, k);
    s->nbuf += k;
    p += k;
    n -= k;
    if (s->nbuf == 64) {
      sha256_block(s, s->buf);
      s->nbuf = 0;
    }
  }
}

static void sha256_final(sha256 *s, uint8_t out[32]) {
  const uint64_t bits = s->bytes * 8;
  const uint8_t one = 0x80, zero = 0;
  sha256_update(s, &one, 1);
  while (s->nbuf != 56)
    sha256_update(s, &zero, 1);
  uint8_t len[8];
  for (int i = 0; i < 8; i++)
    len[i] = (uint8_t)(bits >> (56 - 8 * i));
  sha256_update(s, len, 8);
  for (int i = 0; i < 8; i++)
    for (int b = 0; b < 4; b++)
      out[4 * i + b] = (uint8_t)(s->h[i] >> (24 - 8 * b));
}

void token_hmac_sha256(const void *key, size_t klen, const void *msg, size_t mlen,
                       uint8_t out[32]) {
  uint8_t k[64] = {0}, pad[64], inner[32];
  sha256 s;
  if (klen > 64) { /* longer keys are hashed first (RFC 2104) */
    sha256_init(&s);
    sha256_update(&s, key, klen);
    sha256_final(&s, k);
  } else {
    memcpy(k, key, klen);
  }
  for (int i = 0; i < 64; i++)
    pad[i] = k[i] ^ 0x36;
  sha256_init(&s);
  sha256_update(&s, pad, 64);
  sha256_update(&s, msg, mlen);
  sha256_final(&s, inner);
  for (int i = 0; i < 64; i++)
    pad[i] = k[i] ^ 0x5c;
  sha256_init(&s);
  sha256_update(&s, pad, 64);
  sha256_update(&s, inner, 32);
  sha256_final(&s, out);
}

/* ---- URL tokens ---- */

#define MAC_HEX 32 /* 128 bits of the HMAC, as hex */

static void token_mac(const auth_key *k, const char *job, unsigned long long expires,
                      char hex[MAC_HEX + 1]) {
  char msg[128];
  const int n = snprintf(msg, sizeof msg, "denoised-url-token-v1|%s|%llu", job, expires);
  uint8_t mac[32];
  token_hmac_sha256(k->key, k->len, msg, (size_t)n, mac);
  for (int i = 0; i < MAC_HEX / 2; i++)
    snprintf(hex + 2 * i, 3, "%02x", mac[i]);
}

void token_make(const auth_key *k, const char *job, long long expires, char *out, size_t n) {
  char hex[MAC_HEX + 1];
  token_mac(k, job, (unsigned long long)expires, hex);
  snprintf(out, n, "%lld.%s", expires, hex);
}

const auth_key *token_check(const auth *a, const char *job, const char *token, const char **why) {
  const char *dot = token ? strchr(token, '.') : NULL;
  char num[24];
  unsigned long long expires = 0;
  *why = "the URL token is malformed (expected EXPIRY.MAC from POST /v1/jobs/{id}/token)";
  if (!dot || dot - token >= (long)sizeof num || strlen(dot + 1) != MAC_HEX)
    return NULL;
  snprintf(num, sizeof num, "%.*s", (int)(dot - token), token);
  if (api_parse_uint(num, UINT64_MAX, &expires))
    return NULL;
  const long long now = (long long)time(NULL);
  if ((long long)expires < now) {
    *why = "the URL token has expired: ask POST /v1/jobs/{id}/token for a new one";
    return NULL;
  }
  /* every key is tried, whichever matches, so the time says nothing about which one did */
  const auth_key *hit = NULL;
  for (int i = 0; i < a->n; i++) {
    char hex[MAC_HEX + 1];
    token_mac(&a->keys[i], job, expires, hex);
    unsigned diff = 0;
    for (int b = 0; b < MAC_HEX; b++)
      diff |= (unsigned)(hex[b] ^ dot[1 + b]);
    if (!diff && !hit)
      hit = &a->keys[i];
  }
  if (!hit)
    *why = "the URL token is not valid for this job (or its key is no longer configured)";
  return hit;
}
