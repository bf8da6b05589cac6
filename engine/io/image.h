/* Images in and out: float tensors in [-1, 1] <-> 8-bit pixels, PNG encoding
 * and decoding with libpng, and the text chunks that carry reproducibility
 * metadata (AUTOMATIC1111 "parameters" tEXt, full request JSON in iTXt). */
#ifndef DENOISED_IMAGE_H
#define DENOISED_IMAGE_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"

/* CHW float image (c = 1 or 3, values nominally in [-1, 1]) to interleaved
 * 8-bit pixels, the way diffusers does it: round(clamp(x/2+0.5, 0, 1) * 255). */
void image_to_u8(const float *chw, int c, int h, int w, uint8_t *out);

/* Interleaved 8-bit pixels (c = 1 or 3) to CHW floats in [-1, 1]. */
void image_from_u8(const uint8_t *px, int c, int h, int w, float *chw);

typedef struct image_text {
  const char *key;   /* e.g. "parameters" (tEXt) or "denoised" (iTXt) */
  const char *value; /* UTF-8 */
  int international; /* 1: iTXt, 0: tEXt (Latin-1) */
} image_text;

/* Encodes pixels (c = 1 gray or 3 RGB) as PNG into a malloc'ed buffer. Keys
 * must be 1-79 printable ASCII characters, values valid UTF-8; like PIL, a tEXt
 * value that cannot be written in Latin-1 is stored as iTXt instead.
 * image_png_write goes through a temporary file and rename(). */
int image_png_encode(const uint8_t *px, int c, int h, int w, const image_text *texts, int ntexts,
                     uint8_t **png, size_t *png_len, err *e);
/* Bytes to path through a temporary file beside it and rename(), so readers never see a partial
 * file (PNGs, .npy bytes). */
int image_file_write(const char *path, const uint8_t *data, size_t len, err *e);
int image_png_write(const char *path, const uint8_t *px, int c, int h, int w,
                    const image_text *texts, int ntexts, err *e);

/* Decodes a PNG (any colour type/bit depth, converted to 8-bit RGB) from memory,
 * refusing images larger than max_w x max_h (ERR_INVALID) before allocating.
 * *px is malloc'ed, h*w*3 bytes. Matches PIL's convert("RGB"): alpha and tRNS
 * are dropped (not composited), 16-bit samples keep their high byte. */
int image_png_decode(const uint8_t *png, size_t png_len, int max_w, int max_h, uint8_t **px, int *h,
                     int *w, err *e);
/* Reads the value of text chunk `key` (tEXt, zTXt or iTXt, before or after
 * the image data) from a PNG file into a malloc'ed UTF-8 string; ERR_INVALID
 * if the file has no such chunk. */
int image_png_read_text(const char *path, const char *key, char **value, err *e);
/* The same from PNG bytes (an upload), refusing pictures over max_side on a side and image
 * data larger than such a picture needs before libpng reads any of it. */
int image_png_text_mem(const uint8_t *png, size_t len, const char *key, int max_side, char **value,
                       err *e);

/* Channels (1 grey, 3 colour) and size from a PNG's IHDR, before decoding, so that a picture of
 * other channels than a model takes can be refused by name (image_from_png converts them).
 * ERR_FORMAT naming what when it is not a PNG. */
int image_png_header(const uint8_t *png, size_t len, const char *what, int *c, int *h, int *w,
                     err *e);
/* Input images of edit requests (CLI files, base64 in API jobs): a PNG decoded under the size
 * limit h x w (a different size is an error naming `field`), to c = 1 (luma, as PIL's "L") or 3
 * channels in [-1, 1], CHW. */
int image_from_png(const uint8_t *png, size_t len, const char *field, int c, int h, int w,
                   float *out, err *e);
/* An inpainting mask: white (luma >= 128, diffusers' >= 0.5) is generated, black kept; out gets
 * h * w values 0 or 1. */
int image_mask_from_png(const uint8_t *png, size_t len, const char *field, int h, int w, float *out,
                        err *e);

#endif
