/* Base64 (RFC 4648, with padding) for images carried inside JSON: previews in progress events
 * and the AUTOMATIC1111-compatible responses. */
#ifndef DENOISED_BASE64_H
#define DENOISED_BASE64_H

#include <stddef.h>
#include <stdint.h>

/* A malloc'ed NUL-terminated string, or NULL when out of memory. */
char *base64_encode(const uint8_t *data, size_t len);

/* Decodes into a malloc'ed buffer; -1 on a character outside the alphabet or bad padding. */
int base64_decode(const char *text, size_t len, uint8_t **out, size_t *outlen);

#endif
