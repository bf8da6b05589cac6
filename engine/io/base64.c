/* Base64 encoding and strict decoding; small enough that a dependency is not worth it. */
#include "base64.h"

#include <stdlib.h>

#include "mem.h"

static const char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

char *base64_encode(const uint8_t *data, size_t len) {
  size_t n = (len + 2) / 3 * 4;
  char *out = mem_malloc(n + 1), *p = out;
  if (!out)
    return NULL;
  size_t i = 0;
  for (; i + 2 < len; i += 3) {
    uint32_t v = (uint32_t)data[i] << 16 | (uint32_t)data[i + 1] << 8 | data[i + 2];
    *p++ = alphabet[v >> 18];
    *p++ = alphabet[(v >> 12) & 63];
    *p++ = alphabet[(v >> 6) & 63];
    *p++ = alphabet[v & 63];
  }
  if (i < len) {
    uint32_t v = (uint32_t)data[i] << 16 | (i + 1 < len ? (uint32_t)data[i + 1] << 8 : 0);
    *p++ = alphabet[v >> 18];
    *p++ = alphabet[(v >> 12) & 63];
    *p++ = i + 1 < len ? alphabet[(v >> 6) & 63] : '=';
    *p++ = '=';
  }
  *p = 0;
  return out;
}

static int value_of(char c) {
  if (c >= 'A' && c <= 'Z')
    return c - 'A';
  if (c >= 'a' && c <= 'z')
    return c - 'a' + 26;
  if (c >= '0' && c <= '9')
    return c - '0' + 52;
  if (c == '+')
    return 62;
  if (c == '/')
    return 63;
  return -1;
}

int base64_decode(const char *text, size_t len, uint8_t **out, size_t *outlen) {
  if (len % 4)
    return -1;
  uint8_t *buf = mem_malloc(len / 4 * 3 + 1);
  if (!buf)
    return -1;
  size_t o = 0;
  for (size_t i = 0; i < len; i += 4) {
    int v[4], pad = 0;
    for (int k = 0; k < 4; k++) {
      char c = text[i + k];
      if (c == '=' && i + 4 == len && k >= 2) {
        v[k] = 0;
        pad++;
      } else if (pad || (v[k] = value_of(c)) < 0) {
        free(buf);
        return -1;
      }
    }
    uint32_t x = (uint32_t)v[0] << 18 | (uint32_t)v[1] << 12 | (uint32_t)v[2] << 6 | (uint32_t)v[3];
    buf[o++] = (uint8_t)(x >> 16);
    if (pad < 2)
      buf[o++] = (uint8_t)(x >> 8);
    if (pad < 1)
      buf[o++] = (uint8_t)x;
  }
  *out = buf;
  *outlen = o;
  return 0;
}
