/* Pixel conversion matching diffusers' numpy post-processing bit for bit, and
 * PNG I/O through libpng. Every libpng call runs inside a helper whose state
 * lives in a caller-owned job struct, so nothing is clobbered by its longjmp. */
#include "image.h"

#include <errno.h>
#include <math.h>
#include <png.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include "mem.h"

/* libpng's own default IHDR limit; beyond it encoding fails with a vague message. */
#define PNG_DIM_MAX 1000000

void image_to_u8(const float *chw, int c, int h, int w, uint8_t *out) {
  size_t plane = (size_t)h * (size_t)w;
  for (int ch = 0; ch < c; ch++) {
    const float *src = chw + (size_t)ch * plane;
    for (size_t i = 0; i < plane; i++) {
      /* float32 throughout, like torch (x / 2 + 0.5).clamp(0, 1) then numpy
       * (x * 255).round(): nearbyintf rounds half to even in the default mode.
       * !(v > 0) also catches NaN, whose uint8 cast numpy leaves undefined. */
      float v = src[i] / 2.0f + 0.5f;
      if (!(v > 0.0f))
        v = 0.0f;
      else if (v > 1.0f)
        v = 1.0f;
      out[i * (size_t)c + (size_t)ch] = (uint8_t)nearbyintf(v * 255.0f);
    }
  }
}

void image_from_u8(const uint8_t *px, int c, int h, int w, float *chw) {
  size_t plane = (size_t)h * (size_t)w;
  for (int ch = 0; ch < c; ch++) {
    float *dst = chw + (size_t)ch * plane;
    /* diffusers: np.float32(px) / 255.0, then 2.0 * x - 1.0, all in float32. */
    for (size_t i = 0; i < plane; i++)
      dst[i] = 2.0f * ((float)px[i * (size_t)c + (size_t)ch] / 255.0f) - 1.0f;
  }
}

/* ---- text helpers ---- */

/* Strict UTF-8 check (no overlongs, surrogates or code points past U+10FFFF);
 * reports the largest code point so tEXt vs iTXt can be chosen. */
static int utf8_scan(const char *s, uint32_t *max_cp) {
  const unsigned char *p = (const unsigned char *)s;
  uint32_t top = 0;
  while (*p) {
    uint32_t cp;
    int extra;
    if (*p < 0x80) {
      cp = *p;
      extra = 0;
    } else if (*p >= 0xc2 && *p <= 0xdf) {
      cp = *p & 0x1fu;
      extra = 1;
    } else if (*p >= 0xe0 && *p <= 0xef) {
      cp = *p & 0x0fu;
      extra = 2;
    } else if (*p >= 0xf0 && *p <= 0xf4) {
      cp = *p & 0x07u;
      extra = 3;
    } else {
      return -1;
    }
    p++;
    for (int k = 0; k < extra; k++, p++) {
      if ((*p & 0xc0) != 0x80)
        return -1;
      cp = cp << 6 | (*p & 0x3fu);
    }
    if ((extra == 2 && cp < 0x800) || (extra == 3 && cp < 0x10000) || cp > 0x10ffff ||
        (cp >= 0xd800 && cp <= 0xdfff))
      return -1;
    if (cp > top)
      top = cp;
  }
  *max_cp = top;
  return 0;
}

/* Valid UTF-8 with every code point <= U+00FF, to Latin-1 (never longer). */
static char *utf8_to_latin1(const char *s) {
  char *out = mem_malloc(strlen(s) + 1), *o = out;
  if (!out)
    return NULL;
  for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
    if (*p < 0x80) {
      *o++ = (char)*p;
    } else {
      *o++ = (char)((*p & 0x03u) << 6 | (p[1] & 0x3fu));
      p++;
    }
  }
  *o = '\0';
  return out;
}

static char *latin1_to_utf8(const char *s) {
  size_t n = 0;
  for (const unsigned char *p = (const unsigned char *)s; *p; p++)
    n += *p < 0x80 ? 1 : 2;
  char *out = mem_malloc(n + 1), *o = out;
  if (!out)
    return NULL;
  for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
    if (*p < 0x80) {
      *o++ = (char)*p;
    } else {
      *o++ = (char)(0xc0 | *p >> 6);
      *o++ = (char)(0x80 | (*p & 0x3f));
    }
  }
  *o = '\0';
  return out;
}

/* PNG keywords: 1-79 printable characters, no leading, trailing or double
 * spaces. Restricted to ASCII here since keys are plain identifiers. */
static int check_key(const char *key, err *e) {
  size_t n = key ? strlen(key) : 0;
  if (n < 1 || n > 79)
    return err_set(e, ERR_INVALID, "PNG text key must be 1-79 characters (got %zu)", n);
  for (size_t i = 0; i < n; i++) {
    unsigned char ch = (unsigned char)key[i];
    if (ch < 0x20 || ch > 0x7e || (ch == ' ' && (i == 0 || i == n - 1 || key[i + 1] == ' ')))
      return err_set(e, ERR_INVALID, "PNG text key '%s' has a bad character or spacing", key);
  }
  return ERR_OK;
}

/* ---- libpng plumbing ---- */

typedef struct png_errctx {
  char msg[256];
} png_errctx;

static void on_png_error(png_structp png, png_const_charp msg) {
  png_errctx *ctx = png_get_error_ptr(png);
  snprintf(ctx->msg, sizeof ctx->msg, "%s", msg ? msg : "unknown libpng error");
  png_longjmp(png, 1);
}

/* Library code never prints; libpng warnings are about recoverable oddities. */
static void on_png_warning(png_structp png, png_const_charp msg) {
  (void)png;
  (void)msg;
}

/* ---- encoding ---- */

typedef struct membuf {
  uint8_t *data;
  size_t len, cap;
} membuf;

static void mem_write(png_structp png, png_bytep data, size_t n) {
  membuf *b = png_get_io_ptr(png);
  if (n > SIZE_MAX / 2 - b->len)
    png_error(png, "encoded PNG too large");
  if (b->len + n > b->cap) {
    size_t cap = b->cap ? b->cap : 16384;
    while (cap < b->len + n)
      cap *= 2;
    uint8_t *p = mem_realloc(b->data, cap);
    if (!p)
      png_error(png, "out of memory");
    b->data = p;
    b->cap = cap;
  }
  memcpy(b->data + b->len, data, n);
  b->len += n;
}

static void mem_flush(png_structp png) {
  (void)png;
}

typedef struct enc_job {
  const uint8_t *px;
  int c, h, w;
  png_text *texts;
  int ntexts;
  membuf out;
  png_errctx ectx;
} enc_job;

/* 0 on success, -1 on a libpng error (message in j->ectx). */
static int encode_run(enc_job *j) {
  png_structp png =
      png_create_write_struct(PNG_LIBPNG_VER_STRING, &j->ectx, on_png_error, on_png_warning);
  if (!png) {
    snprintf(j->ectx.msg, sizeof j->ectx.msg, "cannot create libpng write struct");
    return -1;
  }
  png_infop info = png_create_info_struct(png);
  if (!info) {
    png_destroy_write_struct(&png, NULL);
    snprintf(j->ectx.msg, sizeof j->ectx.msg, "cannot create libpng info struct");
    return -1;
  }
  if (setjmp(png_jmpbuf(png))) {
    png_destroy_write_struct(&png, &info);
    return -1;
  }
  png_set_write_fn(png, &j->out, mem_write, mem_flush);
  png_set_IHDR(png, info, (png_uint_32)j->w, (png_uint_32)j->h, 8,
               j->c == 1 ? PNG_COLOR_TYPE_GRAY : PNG_COLOR_TYPE_RGB, PNG_INTERLACE_NONE,
               PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
  if (j->ntexts > 0)
    png_set_text(png, info, j->texts, j->ntexts);
  png_write_info(png, info);
  size_t stride = (size_t)j->w * (size_t)j->c;
  for (int y = 0; y < j->h; y++)
    png_write_row(png, j->px + (size_t)y * stride);
  png_write_end(png, info);
  png_destroy_write_struct(&png, &info);
  return 0;
}

int image_png_encode(const uint8_t *px, int c, int h, int w, const image_text *texts, int ntexts,
                     uint8_t **png, size_t *png_len, err *e) {
  if (!png || !png_len)
    return err_set(e, ERR_INVALID, "PNG encode: no output pointers");
  *png = NULL;
  *png_len = 0;
  if (!px)
    return err_set(e, ERR_INVALID, "PNG encode: no pixels");
  if (c != 1 && c != 3)
    return err_set(e, ERR_INVALID, "PNG encode: %d channels (want 1 or 3)", c);
  if (h < 1 || w < 1 || h > PNG_DIM_MAX || w > PNG_DIM_MAX)
    return err_set(e, ERR_INVALID, "PNG encode: bad size %dx%d (each side 1..%d)", w, h,
                   PNG_DIM_MAX);
  if (ntexts < 0 || (ntexts > 0 && !texts))
    return err_set(e, ERR_INVALID, "PNG encode: bad text list");

  int rc = ERR_OK;
  png_text *pt = mem_calloc((size_t)(ntexts ? ntexts : 1), sizeof *pt);
  /* Latin-1 copies of tEXt values that held non-ASCII UTF-8. */
  char **owned = mem_calloc((size_t)(ntexts ? ntexts : 1), sizeof *owned);
  enc_job j = {.px = px, .c = c, .h = h, .w = w, .texts = pt, .ntexts = ntexts};
  if (!pt || !owned) {
    rc = err_set(e, ERR_NOMEM, "PNG encode: out of memory");
    goto done;
  }
  for (int i = 0; i < ntexts; i++) {
    const image_text *t = &texts[i];
    uint32_t max_cp;
    if ((rc = check_key(t->key, e)))
      goto done;
    if (!t->value || utf8_scan(t->value, &max_cp) != 0) {
      rc =
          err_set(e, ERR_INVALID, "PNG encode: value of text '%s' is missing or not UTF-8", t->key);
      goto done;
    }
    pt[i].key = (png_charp)t->key;
    /* Like PIL: tEXt is Latin-1, so a value that cannot be written in it goes to iTXt. */
    if (t->international || max_cp > 0xff) {
      pt[i].compression = PNG_ITXT_COMPRESSION_NONE;
      pt[i].text = (png_charp)t->value;
      pt[i].itxt_length = strlen(t->value);
    } else {
      if (max_cp >= 0x80) {
        if (!(owned[i] = utf8_to_latin1(t->value))) {
          rc = err_set(e, ERR_NOMEM, "PNG encode: out of memory");
          goto done;
        }
      }
      pt[i].compression = PNG_TEXT_COMPRESSION_NONE;
      pt[i].text = owned[i] ? owned[i] : (png_charp)t->value;
      pt[i].text_length = strlen(pt[i].text);
    }
  }
  if (encode_run(&j) != 0) {
    rc = err_set(e, ERR_FORMAT, "PNG encode: %s", j.ectx.msg);
    free(j.out.data);
    goto done;
  }
  *png = j.out.data;
  *png_len = j.out.len;
done:
  if (owned)
    for (int i = 0; i < ntexts; i++)
      free(owned[i]);
  free(owned);
  free(pt);
  return rc;
}

int image_file_write(const char *path, const uint8_t *data, size_t len, err *e) {
  size_t plen = strlen(path);
  char *tmp = mem_malloc(plen + 16);
  if (!tmp)
    return err_set(e, ERR_NOMEM, "%s: out of memory", path);
  memcpy(tmp, path, plen);
  memcpy(tmp + plen, ".tmp.XXXXXX", 12);
  int fd = mkstemp(tmp);
  if (fd < 0) {
    int rc = err_set(e, ERR_IO, "%s: cannot create temporary file: %s", path, strerror(errno));
    free(tmp);
    return rc;
  }
  (void)fchmod(fd, 0644);
  int saved = 0;
  for (size_t off = 0; off < len && !saved;) {
    ssize_t n = write(fd, data + off, len - off);
    if (n < 0 && errno != EINTR)
      saved = errno;
    else if (n > 0)
      off += (size_t)n;
  }
  /* fsync before rename: otherwise a crash can leave an empty file under the final name. */
  if (!saved && fsync(fd) != 0)
    saved = errno;
  if (close(fd) != 0 && !saved)
    saved = errno;
  if (!saved && rename(tmp, path) != 0)
    saved = errno;
  if (saved) {
    unlink(tmp);
    free(tmp);
    return err_set(e, ERR_IO, "%s: write failed: %s", path, strerror(saved));
  }
  free(tmp);
  return ERR_OK;
}

int image_png_write(const char *path, const uint8_t *px, int c, int h, int w,
                    const image_text *texts, int ntexts, err *e) {
  if (!path)
    return err_set(e, ERR_INVALID, "PNG write: no path given");
  uint8_t *buf;
  size_t len;
  int rc = image_png_encode(px, c, h, w, texts, ntexts, &buf, &len, e);
  if (rc)
    return err_prefix(e, "%s", path);
  rc = image_file_write(path, buf, len, e);
  free(buf);
  return rc;
}

/* ---- decoding ---- */

static uint32_t be32_at(const uint8_t *p) {
  return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

typedef struct memsrc {
  const uint8_t *data;
  size_t len, pos;
} memsrc;

static void mem_read(png_structp png, png_bytep out, size_t n) {
  memsrc *s = png_get_io_ptr(png);
  if (n > s->len - s->pos)
    png_error(png, "truncated PNG data");
  memcpy(out, s->data + s->pos, n);
  s->pos += n;
}

/* libpng allocates (and clears) a chunk's declared length before it reads the chunk, so a few
 * bytes claiming a 1.6 GB iTXt cost that much memory and tens of seconds: every chunk up to IEND
 * must lie inside the size bytes of data, read from mem or else from fd. Returns 0, or -1 with
 * the offending chunk described in why. */
static int chunks_inside(const uint8_t *mem, int fd, uint64_t size, char *why, size_t whylen) {
  uint8_t hdr[8];
  for (uint64_t at = 8; at + 8 <= size;) {
    if (mem)
      memcpy(hdr, mem + at, 8);
    else if (pread(fd, hdr, 8, (off_t)at) != 8)
      return 0; /* a read error: libpng reports it */
    uint64_t n = (uint64_t)hdr[0] << 24 | (uint64_t)hdr[1] << 16 | (uint64_t)hdr[2] << 8 | hdr[3];
    if (n + 12 > size - at) {
      char type[5];
      for (int k = 0; k < 4; k++)
        type[k] = (hdr[4 + k] >= 'A' && hdr[4 + k] <= 'z') ? (char)hdr[4 + k] : '?';
      type[4] = 0;
      snprintf(why, whylen,
               "chunk '%s' at byte %llu claims %llu bytes, past the end of the data "
               "(%llu bytes)",
               type, (unsigned long long)at, (unsigned long long)n, (unsigned long long)size);
      return -1;
    }
    if (memcmp(hdr + 4, "IEND", 4) == 0)
      return 0;
    at += 12 + n;
  }
  return 0; /* truncated inside a chunk header: libpng reports it */
}

/* Bytes the filtered scanlines of a w x h image take (a filter byte per row), Adam7 passes
 * summed; 0 for a colour type or depth libpng will refuse anyway. */
static uint64_t raw_size(uint32_t w, uint32_t h, int depth, int color, int interlace) {
  static const int channels[7] = {1, 0, 3, 1, 2, 0, 4};
  if (color < 0 || color > 6 || !channels[color] || depth < 1 || depth > 16)
    return 0;
  const uint64_t bits = (uint64_t)depth * (uint64_t)channels[color];
  if (!interlace)
    return (uint64_t)h * (1 + ((uint64_t)w * bits + 7) / 8);
  static const int x0[7] = {0, 4, 0, 2, 0, 1, 0}, y0[7] = {0, 0, 4, 0, 2, 0, 1};
  static const int dx[7] = {8, 8, 4, 4, 2, 2, 1}, dy[7] = {8, 8, 8, 4, 4, 2, 2};
  uint64_t total = 0;
  for (int p = 0; p < 7; p++) {
    const uint64_t pw =
        w > (uint32_t)x0[p] ? (w - (uint32_t)x0[p] + (uint32_t)dx[p] - 1) / (uint32_t)dx[p] : 0;
    const uint64_t ph =
        h > (uint32_t)y0[p] ? (h - (uint32_t)y0[p] + (uint32_t)dy[p] - 1) / (uint32_t)dy[p] : 0;
    if (pw && ph)
      total += ph * (1 + (pw * bits + 7) / 8);
  }
  return total;
}

/* libpng inflates everything left in the image's zlib stream once the last row is read (6.6 s
 * of CPU for 2.8 MB of compressed zeros behind a 32x32 header), so the stream is measured first
 * against what the header declares: its compressed bytes against a generous bound (twice the
 * scanlines plus 64 KiB; deflate at its worst adds 5 bytes per 64 KiB), its inflated bytes
 * against the scanlines exactly, inflating no further than one buffer past them. Returns 0, or
 * -1 with the reason in why. Anything else wrong is libpng's to report. */
static int idat_bounded(const uint8_t *png, size_t len, int max_w, int max_h, char *why,
                        size_t whylen) {
  if (len < 33 || be32_at(png + 8) != 13 || memcmp(png + 12, "IHDR", 4) != 0)
    return 0;
  const uint32_t w = be32_at(png + 16), h = be32_at(png + 20);
  if (w < 1 || h < 1 || w > (uint32_t)max_w || h > (uint32_t)max_h)
    return 0;
  const uint64_t raw = raw_size(w, h, png[24], png[25], png[28]);
  if (!raw)
    return 0;
  const uint64_t zmax = 2 * raw + 65536;
  uint64_t zbytes = 0;
  for (size_t at = 8; at + 12 <= len;) {
    const uint64_t n = be32_at(png + at);
    if (memcmp(png + at + 4, "IDAT", 4) == 0)
      zbytes += n;
    if (memcmp(png + at + 4, "IEND", 4) == 0 || n + 12 > len - at)
      break;
    at += 12 + (size_t)n;
  }
  if (zbytes > zmax) {
    snprintf(why, whylen, "%llu bytes of compressed image data for a %ux%u image (at most %llu)",
             (unsigned long long)zbytes, (unsigned)w, (unsigned)h, (unsigned long long)zmax);
    return -1;
  }
  z_stream z = {0};
  if (inflateInit(&z) != Z_OK)
    return 0;
  uint8_t out[16384];
  uint64_t inflated = 0;
  int zrc = Z_OK;
  for (size_t at = 8; at + 12 <= len && zrc == Z_OK && inflated <= raw;) {
    const uint64_t n = be32_at(png + at);
    if (memcmp(png + at + 4, "IEND", 4) == 0 || n + 12 > len - at)
      break;
    if (memcmp(png + at + 4, "IDAT", 4) == 0) {
      z.next_in = (Bytef *)(png + at + 8);
      z.avail_in = (uInt)n;
      while (zrc == Z_OK && inflated <= raw && (z.avail_in > 0 || z.avail_out == 0)) {
        z.next_out = out;
        z.avail_out = sizeof out;
        zrc = inflate(&z, Z_NO_FLUSH);
        inflated += sizeof out - z.avail_out;
        if (zrc == Z_BUF_ERROR && z.avail_in == 0)
          zrc = Z_OK; /* wants the next IDAT */
        if (z.avail_out != 0 && z.avail_in == 0)
          break;
      }
    }
    at += 12 + (size_t)n;
  }
  const char *zmsg = z.msg;
  inflateEnd(&z);
  if (zrc != Z_OK && zrc != Z_STREAM_END) {
    /* refused here rather than left to libpng, which might inflate on past this point */
    snprintf(why, whylen, "corrupt compressed image data (%s)", zmsg ? zmsg : "zlib error");
    return -1;
  }
  if (inflated > raw) {
    snprintf(why, whylen,
             "the image data inflates past the %llu bytes a %ux%u image declares "
             "(trailing data)",
             (unsigned long long)raw, (unsigned)w, (unsigned)h);
    return -1;
  }
  return 0;
}

typedef struct dec_job {
  memsrc src;
  int max_w, max_h;
  png_uint_32 w, h; /* from IHDR, valid once read */
  int too_big;      /* IHDR exceeded the caller's limits; nothing allocated */
  int nomem;
  uint8_t *px;
  png_bytep *rows;
  png_errctx ectx;
} dec_job;

/* Conversions to 8-bit RGB follow what PIL's convert("RGB") (used by
 * diffusers' load_image) produces: palette expanded, gray replicated, 16-bit
 * reduced to its high byte, alpha and tRNS dropped without compositing. */
static int decode_run(dec_job *j) {
  png_structp png =
      png_create_read_struct(PNG_LIBPNG_VER_STRING, &j->ectx, on_png_error, on_png_warning);
  if (!png) {
    j->nomem = 1;
    return -1;
  }
  png_infop info = png_create_info_struct(png);
  if (!info) {
    png_destroy_read_struct(&png, NULL, NULL);
    j->nomem = 1;
    return -1;
  }
  if (setjmp(png_jmpbuf(png))) {
    png_destroy_read_struct(&png, &info, NULL);
    return -1;
  }
  png_set_read_fn(png, &j->src, mem_read);
  /* Our own limit check below gives the clearer message; lift libpng's. */
  png_set_user_limits(png, 0x7fffffffu, 0x7fffffffu);
  png_read_info(png, info);
  j->w = png_get_image_width(png, info);
  j->h = png_get_image_height(png, info);
  if (j->w > (png_uint_32)j->max_w || j->h > (png_uint_32)j->max_h) {
    j->too_big = 1;
    png_destroy_read_struct(&png, &info, NULL);
    return -1;
  }
  int color = png_get_color_type(png, info);
  int depth = png_get_bit_depth(png, info);
  if (color == PNG_COLOR_TYPE_PALETTE)
    png_set_palette_to_rgb(png);
  if (color == PNG_COLOR_TYPE_GRAY && depth < 8)
    png_set_expand_gray_1_2_4_to_8(png);
  if (depth == 16)
    png_set_strip_16(png);
  /* Palette expansion would otherwise turn tRNS into an alpha channel. */
  if ((color & PNG_COLOR_MASK_ALPHA) || png_get_valid(png, info, PNG_INFO_tRNS))
    png_set_strip_alpha(png);
  if (color == PNG_COLOR_TYPE_GRAY || color == PNG_COLOR_TYPE_GRAY_ALPHA)
    png_set_gray_to_rgb(png);
  png_set_interlace_handling(png);
  png_read_update_info(png, info);
  size_t stride = (size_t)j->w * 3;
  if (png_get_channels(png, info) != 3 || png_get_bit_depth(png, info) != 8 ||
      png_get_rowbytes(png, info) != stride)
    png_error(png, "unexpected pixel layout after conversion to RGB");
  j->px = mem_malloc(stride * j->h);
  j->rows = mem_malloc(sizeof *j->rows * j->h);
  if (!j->px || !j->rows) {
    j->nomem = 1;
    png_error(png, "out of memory");
  }
  for (png_uint_32 y = 0; y < j->h; y++)
    j->rows[y] = j->px + (size_t)y * stride;
  png_read_image(png, j->rows);
  png_read_end(png, NULL);
  png_destroy_read_struct(&png, &info, NULL);
  return 0;
}

int image_png_decode(const uint8_t *png, size_t png_len, int max_w, int max_h, uint8_t **px, int *h,
                     int *w, err *e) {
  if (!px || !h || !w)
    return err_set(e, ERR_INVALID, "PNG decode: no output pointers");
  *px = NULL;
  *h = *w = 0;
  if (!png)
    return err_set(e, ERR_INVALID, "PNG decode: no input");
  if (max_w < 1 || max_h < 1)
    return err_set(e, ERR_INVALID, "PNG decode: bad size limit %dx%d", max_w, max_h);
  if (png_len < 8 || png_sig_cmp(png, 0, 8) != 0)
    return err_set(e, ERR_FORMAT, "PNG decode: not a PNG (bad signature)");
  char why[200];
  if (chunks_inside(png, -1, png_len, why, sizeof why) != 0 ||
      idat_bounded(png, png_len, max_w, max_h, why, sizeof why) != 0)
    return err_set(e, ERR_FORMAT, "PNG decode: %s", why);
  dec_job j = {.src = {png, png_len, 0}, .max_w = max_w, .max_h = max_h};
  int rc = ERR_OK;
  if (decode_run(&j) != 0) {
    if (j.too_big)
      rc = err_set(e, ERR_INVALID, "PNG decode: image is %ux%u, larger than the %dx%d limit",
                   (unsigned)j.w, (unsigned)j.h, max_w, max_h);
    else if (j.nomem)
      rc = err_set(e, ERR_NOMEM, "PNG decode: out of memory");
    else
      rc = err_set(e, ERR_FORMAT, "PNG decode: %s", j.ectx.msg);
    free(j.px);
  } else {
    *px = j.px;
    *h = (int)j.h;
    *w = (int)j.w;
  }
  free(j.rows);
  return rc;
}

/* ---- text lookup ---- */

typedef struct text_job {
  FILE *f;
  const char *key;
  char *value;   /* UTF-8, malloc'ed, once found */
  png_bytep row; /* scratch for skipping pixel rows; freed by the caller */
  int nomem;
  png_errctx ectx;
} text_job;

/* Returns 1 if key was found in info (j->value set, or j->nomem). */
static int find_text(png_structp png, png_infop info, text_job *j) {
  png_textp texts;
  int n = 0;
  png_get_text(png, info, &texts, &n);
  for (int i = 0; i < n; i++) {
    if (!texts[i].key || strcmp(texts[i].key, j->key) != 0)
      continue;
    const char *v = texts[i].text ? texts[i].text : "";
    /* tEXt and zTXt are Latin-1; iTXt is already UTF-8. */
    if (texts[i].compression == PNG_ITXT_COMPRESSION_NONE ||
        texts[i].compression == PNG_ITXT_COMPRESSION_zTXt)
      j->value = mem_strdup(v);
    else
      j->value = latin1_to_utf8(v);
    if (!j->value)
      j->nomem = 1;
    return 1;
  }
  return 0;
}

static int text_run(text_job *j) {
  png_structp png =
      png_create_read_struct(PNG_LIBPNG_VER_STRING, &j->ectx, on_png_error, on_png_warning);
  if (!png) {
    j->nomem = 1;
    return -1;
  }
  png_infop info = png_create_info_struct(png), end = png_create_info_struct(png);
  if (!info || !end) {
    png_destroy_read_struct(&png, info ? &info : NULL, end ? &end : NULL);
    j->nomem = 1;
    return -1;
  }
  if (setjmp(png_jmpbuf(png))) {
    png_destroy_read_struct(&png, &info, &end);
    return -1;
  }
  png_init_io(png, j->f);
  png_read_info(png, info);
  if (!find_text(png, info, j)) {
    /* Text after the image data: decode (and discard) rows to reach it. */
    int passes = png_set_interlace_handling(png);
    png_read_update_info(png, info);
    if (!(j->row = mem_malloc(png_get_rowbytes(png, info)))) {
      j->nomem = 1;
      png_error(png, "out of memory");
    }
    png_uint_32 h = png_get_image_height(png, info);
    for (int p = 0; p < passes; p++)
      for (png_uint_32 y = 0; y < h; y++)
        png_read_row(png, j->row, NULL);
    png_read_end(png, end);
    find_text(png, end, j);
  }
  png_destroy_read_struct(&png, &info, &end);
  return 0;
}

int image_png_read_text(const char *path, const char *key, char **value, err *e) {
  if (!value)
    return err_set(e, ERR_INVALID, "PNG read text: no output pointer");
  *value = NULL;
  if (!path || !key)
    return err_set(e, ERR_INVALID, "PNG read text: no path or key");
  FILE *f = fopen(path, "rb");
  if (!f)
    return err_set(e, ERR_IO, "%s: cannot open: %s", path, strerror(errno));
  struct stat st;
  unsigned char sig[8];
  char why[200];
  int rc = ERR_OK;
  if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode)) {
    rc = err_set(e, ERR_IO, "%s: not a regular file", path);
  } else if (fread(sig, 1, 8, f) != 8 || png_sig_cmp(sig, 0, 8) != 0) {
    rc = err_set(e, ERR_FORMAT, "%s: not a PNG (bad signature)", path);
  } else if (chunks_inside(NULL, fileno(f), (uint64_t)st.st_size, why, sizeof why) != 0) {
    rc = err_set(e, ERR_FORMAT, "%s: %s", path, why);
  } else {
    rewind(f);
    text_job j = {.f = f, .key = key};
    int failed = text_run(&j);
    free(j.row);
    if (failed) {
      if (j.nomem)
        rc = err_set(e, ERR_NOMEM, "%s: out of memory", path);
      else
        rc = err_set(e, ERR_FORMAT, "%s: %s", path, j.ectx.msg);
      free(j.value);
    } else if (j.nomem) {
      rc = err_set(e, ERR_NOMEM, "%s: out of memory", path);
    } else if (!j.value) {
      rc = err_set(e, ERR_INVALID, "%s: no PNG text chunk '%s'", path, key);
    } else {
      *value = j.value;
    }
  }
  fclose(f);
  return rc;
}

/* ---- input images of requests ---- */

static int decode_exact(const uint8_t *png, size_t len, const char *field, int h, int w,
                        uint8_t **px, err *e) {
  int ph = 0, pw = 0;
  int rc = image_png_decode(png, len, w, h, px, &ph, &pw, e);
  if (rc == ERR_INVALID && strstr(e->msg, "larger than"))
    return err_prefix(e, "%s: the model samples %dx%d", field, w, h);
  if (rc != ERR_OK)
    return err_prefix(e, "%s", field);
  if (ph != h || pw != w) {
    free(*px);
    *px = NULL;
    return err_set(e, ERR_INVALID, "%s: image is %dx%d, the model samples %dx%d", field, pw, ph, w,
                   h);
  }
  return ERR_OK;
}

/* PIL's convert("L"): L = R * 299/1000 + G * 587/1000 + B * 114/1000, rounded */
static uint8_t luma(const uint8_t *p) {
  return (uint8_t)((p[0] * 299u + p[1] * 587u + p[2] * 114u + 500u) / 1000u);
}

int image_from_png(const uint8_t *png, size_t len, const char *field, int c, int h, int w,
                   float *out, err *e) {
  if (c != 1 && c != 3)
    return err_set(e, ERR_UNSUPPORTED, "%s: images for a %d-channel model are not supported", field,
                   c);
  uint8_t *px = NULL;
  int rc = decode_exact(png, len, field, h, w, &px, e);
  if (rc != ERR_OK)
    return rc;
  if (c == 1) {
    const size_t plane = (size_t)h * w;
    for (size_t i = 0; i < plane; i++)
      px[i] = luma(px + 3 * i); /* in place: i <= 3 i */
  }
  image_from_u8(px, c, h, w, out);
  free(px);
  return ERR_OK;
}

int image_mask_from_png(const uint8_t *png, size_t len, const char *field, int h, int w, float *out,
                        err *e) {
  uint8_t *px = NULL;
  int rc = decode_exact(png, len, field, h, w, &px, e);
  if (rc != ERR_OK)
    return rc;
  for (size_t i = 0; i < (size_t)h * w; i++)
    out[i] = luma(px + 3 * i) >= 128 ? 1.0f : 0.0f;
  free(px);
  return ERR_OK;
}

int image_png_text_mem(const uint8_t *png, size_t len, const char *key, int max_side, char **value,
                       err *e) {
  if (!value || !png || !key)
    return err_set(e, ERR_INVALID, "PNG read text: no input, key or output pointer");
  *value = NULL;
  char why[200];
  if (len < 8 || png_sig_cmp(png, 0, 8) != 0)
    return err_set(e, ERR_FORMAT, "not a PNG (bad signature)");
  if (len >= 24 &&
      (be32_at(png + 16) > (uint32_t)max_side || be32_at(png + 20) > (uint32_t)max_side))
    return err_set(e, ERR_FORMAT, "the picture is %ux%u, larger than the %dx%d limit",
                   (unsigned)be32_at(png + 16), (unsigned)be32_at(png + 20), max_side, max_side);
  if (chunks_inside(png, -1, len, why, sizeof why) != 0 ||
      idat_bounded(png, len, max_side, max_side, why, sizeof why) != 0)
    return err_set(e, ERR_FORMAT, "%s", why);
  /* the file reader's libpng run, on the bytes: text after the image data is found too */
  FILE *f = fmemopen((void *)png, len, "rb");
  if (!f)
    return err_set(e, ERR_NOMEM, "out of memory");
  text_job j = {.f = f, .key = key};
  const int failed = text_run(&j);
  free(j.row);
  fclose(f);
  if (j.nomem) {
    free(j.value);
    return err_set(e, ERR_NOMEM, "out of memory");
  }
  if (failed) {
    free(j.value);
    return err_set(e, ERR_FORMAT, "%s", j.ectx.msg);
  }
  if (!j.value)
    return err_set(e, ERR_INVALID, "no PNG text chunk '%s'", key);
  *value = j.value;
  return ERR_OK;
}

/* Colour types 0 and 4 are grey (with alpha), 2, 3 and 6 colour. */
int image_png_header(const uint8_t *p, size_t len, const char *what, int *c, int *h, int *w,
                     err *e) {
  static const uint8_t sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  if (len < 33 || memcmp(p, sig, 8) != 0 || memcmp(p + 12, "IHDR", 4) != 0)
    return err_set(e, ERR_FORMAT, "%s: not a PNG file", what);
  *w = (int)((uint32_t)p[16] << 24 | (uint32_t)p[17] << 16 | (uint32_t)p[18] << 8 | p[19]);
  *h = (int)((uint32_t)p[20] << 24 | (uint32_t)p[21] << 16 | (uint32_t)p[22] << 8 | p[23]);
  *c = p[25] == 0 || p[25] == 4 ? 1 : 3;
  return ERR_OK;
}
