/* Tests for pixel conversion (diffusers' rounding, half to even) and PNG I/O:
 * round trips with text chunks, every colour type libpng can hand us, limits,
 * and corrupt or truncated input failing cleanly. */
#include <math.h>
#include <png.h>
#include <stdint.h>
#include <unistd.h>

#include "image.h"
#include "testutil.h"

/* ---- helpers ---- */

static uint32_t crc32_png(const uint8_t *p, size_t n) {
  uint32_t c = 0xffffffffu;
  for (size_t i = 0; i < n; i++) {
    c ^= p[i];
    for (int k = 0; k < 8; k++)
      c = (c >> 1) ^ (0xedb88320u & (0u - (c & 1)));
  }
  return c ^ 0xffffffffu;
}

static uint32_t be32(const uint8_t *p) {
  return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void put_be32(uint8_t *p, uint32_t v) {
  p[0] = (uint8_t)(v >> 24);
  p[1] = (uint8_t)(v >> 16);
  p[2] = (uint8_t)(v >> 8);
  p[3] = (uint8_t)v;
}

/* Offset of the length field of the first chunk of `type`, or 0. */
static size_t find_chunk(const uint8_t *png, size_t len, const char *type) {
  for (size_t off = 8; off + 12 <= len;) {
    uint32_t n = be32(png + off);
    if (memcmp(png + off + 4, type, 4) == 0)
      return off;
    off += 12 + (size_t)n;
  }
  return 0;
}

static void fix_crc(uint8_t *png, size_t chunk) {
  uint32_t n = be32(png + chunk);
  put_be32(png + chunk + 8 + n, crc32_png(png + chunk + 4, 4 + (size_t)n));
}

static int contains(const uint8_t *hay, size_t n, const void *needle, size_t m) {
  for (size_t i = 0; i + m <= n; i++)
    if (memcmp(hay + i, needle, m) == 0)
      return 1;
  return 0;
}

/* Test pixels: a deterministic pattern. */
static uint8_t *pattern(int c, int h, int w) {
  uint8_t *px = malloc((size_t)c * h * w);
  ck_assert_ptr_nonnull(px);
  for (int i = 0; i < c * h * w; i++)
    px[i] = (uint8_t)(i * 37 + 11);
  return px;
}

static uint8_t *encode_ok(const uint8_t *px, int c, int h, int w, const image_text *t, int nt,
                          size_t *len) {
  uint8_t *png;
  err e = {0};
  int rc = image_png_encode(px, c, h, w, t, nt, &png, len, &e);
  ck_assert_msg(rc == ERR_OK, "encode: %s", e.msg);
  return png;
}

/* A PNG written directly with libpng, for colour types our encoder never produces. */
typedef struct png_spec {
  int w, h, color, depth, interlace;
  const uint8_t *data; /* rows, packed as libpng expects */
  const png_color *palette;
  int npalette;
  const png_byte *trans;
  int ntrans;
  const png_color_16 *trans_color;
  const png_text *end_text; /* written after IDAT */
} png_spec;

static uint8_t *make_png(const png_spec *s, size_t *len) {
  char *buf = NULL;
  size_t n = 0;
  FILE *f = open_memstream(&buf, &n);
  ck_assert_ptr_nonnull(f);
  png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, NULL, NULL, NULL);
  png_infop info = png_create_info_struct(png), end = png_create_info_struct(png);
  ck_assert_ptr_nonnull(end);
  png_init_io(png, f);
  png_set_IHDR(png, info, (png_uint_32)s->w, (png_uint_32)s->h, s->depth, s->color, s->interlace,
               PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
  if (s->palette)
    png_set_PLTE(png, info, s->palette, s->npalette);
  if (s->trans || s->trans_color)
    png_set_tRNS(png, info, s->trans, s->ntrans, s->trans_color);
  size_t stride = png_get_rowbytes(png, info);
  png_bytep *rows = malloc(sizeof *rows * (size_t)s->h);
  for (int y = 0; y < s->h; y++)
    rows[y] = (png_bytep)s->data + (size_t)y * stride;
  png_write_info(png, info);
  png_write_image(png, rows);
  if (s->end_text)
    png_set_text(png, end, s->end_text, 1);
  png_write_end(png, end);
  png_destroy_info_struct(png, &end);
  png_destroy_write_struct(&png, &info);
  free(rows);
  fclose(f);
  *len = n;
  return (uint8_t *)buf;
}

static uint8_t *decode_ok(const uint8_t *png, size_t len, int *h, int *w) {
  uint8_t *px;
  err e = {0};
  int rc = image_png_decode(png, len, 4096, 4096, &px, h, w, &e);
  ck_assert_msg(rc == ERR_OK, "decode: %s", e.msg);
  return px;
}

static char dir[64];
static char path[256];

static void setup(void) {
  ck_assert_ptr_nonnull(test_tmpdir(dir, sizeof dir));
}

static void teardown(void) {
  char cmd[128];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
  ck_assert_int_eq(system(cmd), 0);
}

static const char *file_path(const char *name) {
  snprintf(path, sizeof path, "%s/%s", dir, name);
  return path;
}

/* ---- pixel conversion ---- */

static uint8_t to_u8_one(float x) {
  uint8_t v;
  image_to_u8(&x, 1, 1, 1, &v);
  return v;
}

START_TEST(test_to_u8_values) {
  ck_assert_uint_eq(to_u8_one(-1.0f), 0);
  ck_assert_uint_eq(to_u8_one(1.0f), 255);
  ck_assert_uint_eq(to_u8_one(0.0f), 128); /* 127.5 -> 128 (even) */
  ck_assert_uint_eq(to_u8_one(-5.0f), 0);
  ck_assert_uint_eq(to_u8_one(5.0f), 255);
  ck_assert_uint_eq(to_u8_one(INFINITY), 255);
  ck_assert_uint_eq(to_u8_one(-INFINITY), 0);
  ck_assert_uint_eq(to_u8_one(NAN), 0);
  ck_assert_uint_eq(to_u8_one(-0.0f), 128);
  ck_assert_uint_eq(to_u8_one(1e-45f), 128);
  ck_assert_uint_eq(to_u8_one(-0.999f), 0);  /* 0.1275 */
  ck_assert_uint_eq(to_u8_one(-0.995f), 1);  /* 0.6375 */
  ck_assert_uint_eq(to_u8_one(0.999f), 255); /* 254.87 */
  ck_assert_uint_eq(to_u8_one(0.995f), 254); /* 254.36 */
}
END_TEST

/* Find every float32 v = x/2 + 0.5 whose float32 product v * 255 is exactly
 * k + 0.5 and check it rounds to the even neighbour, as numpy does (rounding
 * half away from zero would give k + 1 for even k). */
START_TEST(test_to_u8_half_even) {
  int hits_even = 0, hits_odd = 0;
  /* On [0.25, 1) x = 2 (v - 0.5) is exact and maps back to v exactly. */
  for (float v = 0.25f; v < 1.0f; v = nextafterf(v, 2.0f)) {
    float p = v * 255.0f;
    float fl = floorf(p);
    if (p - fl != 0.5f)
      continue;
    int k = (int)fl;
    float x = (v - 0.5f) * 2.0f;
    ck_assert_float_eq(x / 2.0f + 0.5f, v);
    int want = k % 2 == 0 ? k : k + 1;
    ck_assert_msg(to_u8_one(x) == want, "x=%a (v*255=%.1f) -> %u, want %d", (double)x, (double)p,
                  to_u8_one(x), want);
    if (k % 2 == 0)
      hits_even++;
    else
      hits_odd++;
  }
  /* Both kinds must occur or the test proves nothing about the tie rule. */
  ck_assert_int_gt(hits_even, 0);
  ck_assert_int_gt(hits_odd, 0);
}
END_TEST

START_TEST(test_to_u8_layout) {
  /* 3 channels, 1x2: CHW in, HWC out. */
  const float chw[6] = {-1.0f, 1.0f, 0.0f, -1.0f, 1.0f, 0.0f};
  uint8_t out[6];
  image_to_u8(chw, 3, 1, 2, out);
  const uint8_t want[6] = {0, 128, 255, 255, 0, 128};
  ck_assert_mem_eq(out, want, 6);
}
END_TEST

START_TEST(test_from_u8) {
  uint8_t px[256];
  float f[256];
  uint8_t back[256];
  for (int i = 0; i < 256; i++)
    px[i] = (uint8_t)i;
  image_from_u8(px, 1, 16, 16, f);
  ck_assert_float_eq(f[0], -1.0f);
  ck_assert_float_eq(f[255], 1.0f);
  ck_assert_float_eq(f[51], 2.0f * (51.0f / 255.0f) - 1.0f);
  image_to_u8(f, 1, 16, 16, back);
  ck_assert_mem_eq(back, px, 256);
  /* Interleaved RGB in, planes out. */
  const uint8_t rgb[6] = {0, 255, 51, 255, 0, 51};
  float chw[6];
  image_from_u8(rgb, 3, 1, 2, chw);
  ck_assert_float_eq(chw[0], -1.0f);
  ck_assert_float_eq(chw[1], 1.0f);
  ck_assert_float_eq(chw[2], 1.0f);
  ck_assert_float_eq(chw[3], -1.0f);
  ck_assert_float_eq(chw[4], chw[5]);
}
END_TEST

/* ---- PNG round trips ---- */

START_TEST(test_png_roundtrip_rgb_texts) {
  const int c = 3, h = 5, w = 7;
  uint8_t *px = pattern(c, h, w);
  const char *json = "{\"prompt\": \"caf\xc3\xa9 \xe2\x98\x95\", \"seed\": 42}";
  const image_text texts[] = {
      {"parameters", "a cat, Steps: 20, Seed: 42", 0},
      {"denoised", json, 1},
      {"latin", "caf\xc3\xa9", 0},  /* fits Latin-1: stays tEXt */
      {"emoji", "\xe2\x98\x95", 0}, /* does not: promoted to iTXt */
      {"empty", "", 0},
  };
  size_t len;
  uint8_t *png = encode_ok(px, c, h, w, texts, 5, &len);
  ck_assert(contains(png, len, "tEXtparameters\0a cat", 20));
  ck_assert(contains(png, len, "tEXtlatin\0caf\xe9", 14));
  ck_assert(contains(png, len, "iTXtemoji", 9));
  ck_assert(contains(png, len, "iTXtdenoised", 12));

  int dh, dw;
  uint8_t *back = decode_ok(png, len, &dh, &dw);
  ck_assert_int_eq(dh, h);
  ck_assert_int_eq(dw, w);
  ck_assert_mem_eq(back, px, (size_t)c * h * w);
  free(back);

  err e = {0};
  const char *p = file_path("out.png");
  ck_assert_int_eq(image_png_write(p, px, c, h, w, texts, 5, &e), ERR_OK);
  for (int i = 0; i < 5; i++) {
    char *v;
    int rc = image_png_read_text(p, texts[i].key, &v, &e);
    ck_assert_msg(rc == ERR_OK, "%s: %s", texts[i].key, e.msg);
    ck_assert_str_eq(v, texts[i].value);
    free(v);
  }
  char *v = (char *)p;
  ck_assert_int_eq(image_png_read_text(p, "absent", &v, &e), ERR_INVALID);
  ck_assert_ptr_null(v);
  ck_assert_ptr_nonnull(strstr(e.msg, "absent"));

  /* The file holds exactly the encoded bytes; no temporary left behind. */
  FILE *f = fopen(p, "rb");
  uint8_t *disk = malloc(len + 1);
  ck_assert_uint_eq(fread(disk, 1, len + 1, f), len);
  fclose(f);
  ck_assert_mem_eq(disk, png, len);
  free(disk);
  char cmd[300];
  snprintf(cmd, sizeof cmd, "ls '%s' | grep -q tmp", dir);
  ck_assert_int_ne(system(cmd), 0);

  /* Large value. */
  size_t big = 200000;
  char *huge = malloc(big + 1);
  memset(huge, 'x', big);
  huge[big] = '\0';
  const image_text ht = {"denoised", huge, 1};
  ck_assert_int_eq(image_png_write(p, px, c, h, w, &ht, 1, &e), ERR_OK);
  ck_assert_int_eq(image_png_read_text(p, "denoised", &v, &e), ERR_OK);
  ck_assert_str_eq(v, huge);
  free(v);
  free(huge);
  free(png);
  free(px);
}
END_TEST

START_TEST(test_png_gray) {
  const int h = 4, w = 3;
  uint8_t *px = pattern(1, h, w);
  size_t len;
  uint8_t *png = encode_ok(px, 1, h, w, NULL, 0, &len);
  ck_assert_int_eq(png[25], PNG_COLOR_TYPE_GRAY); /* IHDR colour type byte */
  int dh, dw;
  uint8_t *rgb = decode_ok(png, len, &dh, &dw);
  for (int i = 0; i < h * w; i++)
    for (int k = 0; k < 3; k++)
      ck_assert_uint_eq(rgb[3 * i + k], px[i]);
  free(rgb);
  free(png);
  free(px);
}
END_TEST

START_TEST(test_png_other_formats) {
  int dh, dw;
  size_t len;
  uint8_t *png, *rgb;

  /* 4-bit palette with a transparent entry: colours kept, transparency dropped. */
  const png_color pal[4] = {{255, 0, 0}, {0, 255, 0}, {0, 0, 255}, {9, 8, 7}};
  const png_byte trans[1] = {0};
  const uint8_t idx[2] = {0x01, 0x23}; /* 4x1: indices 0 1 2 3 */
  png_spec sp = {.w = 4,
                 .h = 1,
                 .color = PNG_COLOR_TYPE_PALETTE,
                 .depth = 4,
                 .data = idx,
                 .palette = pal,
                 .npalette = 4,
                 .trans = trans,
                 .ntrans = 1};
  png = make_png(&sp, &len);
  rgb = decode_ok(png, len, &dh, &dw);
  ck_assert_int_eq(dw, 4);
  const uint8_t want_pal[12] = {255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 8, 7};
  ck_assert_mem_eq(rgb, want_pal, 12);
  free(rgb);
  free(png);

  /* 16-bit gray: high byte. */
  const uint8_t g16[8] = {0x12, 0x34, 0xff, 0x00, 0x00, 0xff, 0xff, 0xff};
  sp = (png_spec){.w = 2, .h = 2, .color = PNG_COLOR_TYPE_GRAY, .depth = 16, .data = g16};
  png = make_png(&sp, &len);
  rgb = decode_ok(png, len, &dh, &dw);
  const uint8_t want_g16[12] = {0x12, 0x12, 0x12, 0xff, 0xff, 0xff, 0, 0, 0, 0xff, 0xff, 0xff};
  ck_assert_mem_eq(rgb, want_g16, 12);
  free(rgb);
  free(png);

  /* 1-bit gray. */
  const uint8_t g1[1] = {0xa0}; /* 1 0 1 0 */
  sp = (png_spec){.w = 4, .h = 1, .color = PNG_COLOR_TYPE_GRAY, .depth = 1, .data = g1};
  png = make_png(&sp, &len);
  rgb = decode_ok(png, len, &dh, &dw);
  const uint8_t want_g1[12] = {255, 255, 255, 0, 0, 0, 255, 255, 255, 0, 0, 0};
  ck_assert_mem_eq(rgb, want_g1, 12);
  free(rgb);
  free(png);

  /* Gray + alpha, and gray with a tRNS colour: alpha ignored, not composited. */
  const uint8_t ga[4] = {200, 0, 100, 255};
  sp = (png_spec){.w = 2, .h = 1, .color = PNG_COLOR_TYPE_GRAY_ALPHA, .depth = 8, .data = ga};
  png = make_png(&sp, &len);
  rgb = decode_ok(png, len, &dh, &dw);
  const uint8_t want_ga[6] = {200, 200, 200, 100, 100, 100};
  ck_assert_mem_eq(rgb, want_ga, 6);
  free(rgb);
  free(png);
  const png_color_16 tc = {.gray = 200};
  const uint8_t g8[2] = {200, 100};
  sp = (png_spec){
      .w = 2, .h = 1, .color = PNG_COLOR_TYPE_GRAY, .depth = 8, .data = g8, .trans_color = &tc};
  png = make_png(&sp, &len);
  rgb = decode_ok(png, len, &dh, &dw);
  ck_assert_mem_eq(rgb, want_ga, 6);
  free(rgb);
  free(png);

  /* Interlaced 16-bit RGBA, 9x9 so every Adam7 pass has pixels. */
  enum { W = 9, H = 9 };
  uint8_t *rgba = malloc(W * H * 8), want[W * H * 3];
  for (int i = 0; i < W * H; i++)
    for (int k = 0; k < 4; k++) {
      rgba[8 * i + 2 * k] = (uint8_t)(i * 7 + k * 50);
      rgba[8 * i + 2 * k + 1] = (uint8_t)(i * 13 + k);
      if (k < 3)
        want[3 * i + k] = (uint8_t)(i * 7 + k * 50);
    }
  sp = (png_spec){.w = W,
                  .h = H,
                  .color = PNG_COLOR_TYPE_RGBA,
                  .depth = 16,
                  .interlace = PNG_INTERLACE_ADAM7,
                  .data = rgba};
  png = make_png(&sp, &len);
  rgb = decode_ok(png, len, &dh, &dw);
  ck_assert_int_eq(dh, H);
  ck_assert_int_eq(dw, W);
  ck_assert_mem_eq(rgb, want, sizeof want);
  free(rgb);
  free(png);
  free(rgba);
}
END_TEST

/* Text chunks after IDAT (zTXt, compressed iTXt) are found too; zTXt is Latin-1. */
START_TEST(test_png_text_after_idat) {
  const uint8_t g8[2] = {1, 2};
  png_text t = {
      .compression = PNG_TEXT_COMPRESSION_zTXt, .key = "parameters", .text = "caf\xe9 at the end"};
  png_spec sp = {.w = 2,
                 .h = 1,
                 .color = PNG_COLOR_TYPE_GRAY,
                 .depth = 8,
                 .data = g8,
                 .end_text = &t,
                 .interlace = PNG_INTERLACE_ADAM7};
  size_t len;
  uint8_t *png = make_png(&sp, &len);
  ck_assert(contains(png, len, "zTXtparameters", 14));
  size_t idat = find_chunk(png, len, "IDAT"), ztxt = find_chunk(png, len, "zTXt");
  ck_assert(idat > 0 && ztxt > idat);
  const char *p = file_path("end.png");
  FILE *f = fopen(p, "wb");
  fwrite(png, 1, len, f);
  fclose(f);
  char *v;
  err e = {0};
  ck_assert_int_eq(image_png_read_text(p, "parameters", &v, &e), ERR_OK);
  ck_assert_str_eq(v, "caf\xc3\xa9 at the end");
  free(v);
  free(png);

  png_text it = {.compression = PNG_ITXT_COMPRESSION_zTXt,
                 .key = "denoised",
                 .text = "{\"x\": \"\xe2\x98\x95\"}"};
  sp.end_text = &it;
  png = make_png(&sp, &len);
  f = fopen(p, "wb");
  fwrite(png, 1, len, f);
  fclose(f);
  ck_assert_int_eq(image_png_read_text(p, "denoised", &v, &e), ERR_OK);
  ck_assert_str_eq(v, it.text);
  free(v);
  ck_assert_int_eq(image_png_read_text(p, "parameters", &v, &e), ERR_INVALID);
  free(png);
}
END_TEST

/* ---- limits and bad input ---- */

START_TEST(test_png_limits) {
  uint8_t *px = pattern(3, 50, 100);
  size_t len;
  uint8_t *png = encode_ok(px, 3, 50, 100, NULL, 0, &len);
  uint8_t *out = (uint8_t *)&len;
  int h = -1, w = -1;
  err e = {0};
  ck_assert_int_eq(image_png_decode(png, len, 99, 50, &out, &h, &w, &e), ERR_INVALID);
  ck_assert_ptr_null(out);
  ck_assert_int_eq(h, 0);
  ck_assert_ptr_nonnull(strstr(e.msg, "100x50"));
  ck_assert_int_eq(image_png_decode(png, len, 100, 49, &out, &h, &w, &e), ERR_INVALID);
  ck_assert_int_eq(image_png_decode(png, len, 0, 49, &out, &h, &w, &e), ERR_INVALID);
  ck_assert_int_eq(image_png_decode(png, len, 100, 50, &out, &h, &w, &e), ERR_OK);
  ck_assert_mem_eq(out, px, 3 * 50 * 100);
  free(out);

  /* An IHDR claiming 1000000 x 1000000 is refused before any allocation. */
  size_t ihdr = find_chunk(png, len, "IHDR");
  ck_assert_uint_eq(ihdr, 8);
  put_be32(png + ihdr + 8, 1000000);
  put_be32(png + ihdr + 12, 1000000);
  fix_crc(png, ihdr);
  ck_assert_int_eq(image_png_decode(png, len, 4096, 4096, &out, &h, &w, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "1000000x1000000"));
  /* Beyond what PNG allows at all. */
  put_be32(png + ihdr + 8, 0x80000000u);
  fix_crc(png, ihdr);
  ck_assert_int_eq(image_png_decode(png, len, 4096, 4096, &out, &h, &w, &e), ERR_FORMAT);
  put_be32(png + ihdr + 8, 0);
  fix_crc(png, ihdr);
  ck_assert_int_eq(image_png_decode(png, len, 4096, 4096, &out, &h, &w, &e), ERR_FORMAT);
  free(png);
  free(px);
}
END_TEST

START_TEST(test_png_corrupt) {
  const int c = 3, h = 6, w = 5;
  uint8_t *px = pattern(c, h, w);
  const image_text t = {"parameters", "x", 0};
  size_t len;
  uint8_t *png = encode_ok(px, c, h, w, &t, 1, &len);
  uint8_t *out;
  int dh, dw;
  err e = {0};

  /* Every truncation fails, with a message, without leaking (see ASan build). */
  for (size_t n = 0; n < len; n++) {
    uint8_t *copy = malloc(n ? n : 1);
    memcpy(copy, png, n);
    int rc = image_png_decode(copy, n, 64, 64, &out, &dh, &dw, &e);
    ck_assert_msg(rc == ERR_FORMAT, "length %zu: rc %d", n, rc);
    ck_assert_ptr_null(out);
    ck_assert(e.msg[0] != '\0');
    free(copy);
  }
  ck_assert_int_eq(image_png_decode(png, 7, 64, 64, &out, &dh, &dw, &e), ERR_FORMAT);
  ck_assert_ptr_nonnull(strstr(e.msg, "signature"));

  /* Every single-bit flip either decodes or fails cleanly. */
  uint8_t *copy = malloc(len);
  int failures = 0;
  for (size_t i = 0; i < len; i++) {
    memcpy(copy, png, len);
    copy[i] ^= (uint8_t)(1u << (i % 8));
    int rc = image_png_decode(copy, len, 64, 64, &out, &dh, &dw, &e);
    if (rc == ERR_OK) {
      ck_assert_ptr_nonnull(out);
      free(out);
    } else {
      ck_assert_ptr_null(out);
      failures++;
    }
  }
  ck_assert_int_gt(failures, (int)len / 2);

  /* Garbage zlib data behind a valid CRC. */
  memcpy(copy, png, len);
  size_t idat = find_chunk(copy, len, "IDAT");
  ck_assert_uint_gt(idat, 0);
  for (uint32_t k = 0; k < be32(copy + idat); k++)
    copy[idat + 8 + k] ^= 0x5a;
  fix_crc(copy, idat);
  ck_assert_int_eq(image_png_decode(copy, len, 64, 64, &out, &dh, &dw, &e), ERR_FORMAT);
  ck_assert_ptr_null(out);

  /* A truncated file and a non-PNG file for the text reader. */
  const char *p = file_path("cut.png");
  FILE *f = fopen(p, "wb");
  fwrite(png, 1, len - 20, f);
  fclose(f);
  char *v;
  ck_assert_int_eq(image_png_read_text(p, "missing", &v, &e), ERR_FORMAT);
  ck_assert_ptr_null(v);
  ck_assert_ptr_nonnull(strstr(e.msg, p));
  f = fopen(p, "wb");
  fputs("definitely not a png", f);
  fclose(f);
  ck_assert_int_eq(image_png_read_text(p, "parameters", &v, &e), ERR_FORMAT);
  ck_assert_int_eq(image_png_read_text(file_path("nope.png"), "parameters", &v, &e), ERR_IO);
  ck_assert_int_eq(image_png_read_text(dir, "parameters", &v, &e), ERR_IO);
  free(copy);
  free(png);
  free(px);
}
END_TEST

/* libpng allocates (and clears) a chunk's declared length before reading it: 129 bytes whose
 * iTXt claims 1.6 GB took 1.8 GB and 40 s under ASan (tests/fuzz/fuzz_png.c found it,
 * tests/fuzz/regressions/png). Such a chunk is refused before libpng sees it, in memory and in a
 * file. */
START_TEST(test_png_chunk_past_the_end) {
  char src[512];
  test_src_path(src, sizeof src, "tests/fuzz/regressions/png/itxt-claims-1.6GB");
  FILE *f = fopen(src, "rb");
  ck_assert_ptr_nonnull(f);
  uint8_t png[512];
  size_t len = fread(png, 1, sizeof png, f);
  fclose(f);
  ck_assert_uint_eq(len, 129);
  uint8_t *out;
  int h, w;
  err e = {0};
  ck_assert_int_eq(image_png_decode(png, len, 64, 64, &out, &h, &w, &e), ERR_FORMAT);
  ck_assert_ptr_null(out);
  ck_assert_msg(strstr(e.msg, "'iTXt'") && strstr(e.msg, "1634598938"), "%s", e.msg);
  char *value = NULL;
  ck_assert_int_eq(image_png_read_text(src, "parameters", &value, &e), ERR_FORMAT);
  ck_assert_ptr_null(value);
  ck_assert_msg(strstr(e.msg, "'iTXt'"), "%s", e.msg);
  /* the same chunk with its true length decodes */
  png[76] = 0, png[77] = 0, png[78] = 0, png[79] = 26;
  len = 76 + 12 + 26;
  memcpy(png + len, "\0\0\0\0IEND\xae\x42\x60\x82", 12);
  e.msg[0] = 0;
  if (image_png_decode(png, len + 12, 64, 64, &out, &h, &w, &e) == ERR_OK)
    free(out);
  ck_assert_ptr_null(strstr(e.msg, "claims"));
}
END_TEST

/* issue 22: a 32x32 header with megabytes of compressed zeros behind its scanlines cost 6.6 s
 * of CPU (libpng inflated everything); now it is refused before inflating more than the header
 * declares, by its compressed size and, under that bound, by what it inflates to. */
START_TEST(test_png_trailing_data) {
  uint8_t *out = NULL;
  int h, w;
  err e = {0};
  size_t len;
  uint8_t *png = test_trailing_png(32, 32, 160, &len); /* 2.5 GiB of zeros in ~2.6 MB */
  ck_assert_uint_gt(len, 2000000);
  double t0 = test_cpu_seconds();
  ck_assert_int_eq(image_png_decode(png, len, 64, 64, &out, &h, &w, &e), ERR_FORMAT);
  double cpu = test_cpu_seconds() - t0;
  ck_assert_ptr_null(out);
  ck_assert_msg(strstr(e.msg, "compressed image data"), "%s", e.msg);
  ck_assert_msg(cpu < 1.0, "%.3f s of CPU", cpu);
  printf("trailing data PNG (%zu bytes) refused in %.2f ms of CPU\n", len, cpu * 1e3);
  free(png);
  /* 48 MiB of zeros in ~50 KB: under the compressed bound, refused by the inflated one */
  png = test_trailing_png(32, 32, 3, &len);
  t0 = test_cpu_seconds();
  ck_assert_int_eq(image_png_decode(png, len, 64, 64, &out, &h, &w, &e), ERR_FORMAT);
  cpu = test_cpu_seconds() - t0;
  ck_assert_msg(strstr(e.msg, "trailing data"), "%s", e.msg);
  ck_assert_msg(cpu < 1.0, "%.3f s of CPU", cpu);
  free(png);
  /* the same stream without the trailing zeros is a black picture */
  png = test_trailing_png(32, 32, 0, &len);
  ck_assert_int_eq(image_png_decode(png, len, 64, 64, &out, &h, &w, &e), ERR_OK);
  ck_assert_int_eq(h, 32);
  ck_assert_int_eq(w, 32);
  for (int i = 0; i < 32 * 32 * 3; i++)
    ck_assert_int_eq(out[i], 0);
  free(out);
  free(png);
}
END_TEST

START_TEST(test_png_encode_errors) {
  uint8_t px[12] = {0};
  uint8_t *png = px;
  size_t len = 1;
  err e = {0};
  ck_assert_int_eq(image_png_encode(px, 2, 2, 2, NULL, 0, &png, &len, &e), ERR_INVALID);
  ck_assert_ptr_null(png);
  ck_assert_uint_eq(len, 0);
  ck_assert_int_eq(image_png_encode(px, 4, 1, 1, NULL, 0, &png, &len, &e), ERR_INVALID);
  ck_assert_int_eq(image_png_encode(px, 3, 0, 1, NULL, 0, &png, &len, &e), ERR_INVALID);
  ck_assert_int_eq(image_png_encode(px, 3, 1, -1, NULL, 0, &png, &len, &e), ERR_INVALID);
  ck_assert_int_eq(image_png_encode(px, 3, 1, 1000001, NULL, 0, &png, &len, &e), ERR_INVALID);
  ck_assert_int_eq(image_png_encode(NULL, 3, 1, 1, NULL, 0, &png, &len, &e), ERR_INVALID);
  ck_assert_int_eq(image_png_encode(px, 3, 1, 1, NULL, 1, &png, &len, &e), ERR_INVALID);
  ck_assert_int_eq(image_png_encode(px, 3, 1, 1, NULL, 0, NULL, &len, &e), ERR_INVALID);

  char long_key[81];
  memset(long_key, 'k', 80);
  long_key[80] = '\0';
  const image_text bad[] = {
      {"", "v", 0},
      {long_key, "v", 0},
      {" lead", "v", 0},
      {"trail ", "v", 0},
      {"two  spaces", "v", 0},
      {"tab\there", "v", 0},
      {NULL, "v", 0},
      {"k", NULL, 0},
      {"k", "\xff", 0},
      {"k", "\xc0\x80", 1},
      {"k", "\xed\xa0\x80", 1},
      {"k", "\xe2\x98", 0},
      {"k", "\xf4\x90\x80\x80", 1},
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    int rc = image_png_encode(px, 3, 2, 2, &bad[i], 1, &png, &len, &e);
    ck_assert_msg(rc == ERR_INVALID, "case %zu: rc %d", i, rc);
    ck_assert_ptr_null(png);
  }
  const image_text ok = {"a key with spaces", "v", 0};
  png = encode_ok(px, 3, 2, 2, &ok, 1, &len);
  free(png);

  ck_assert_int_eq(image_png_write(file_path("no/such/dir.png"), px, 3, 2, 2, NULL, 0, &e), ERR_IO);
  ck_assert_ptr_nonnull(strstr(e.msg, "no/such/dir.png"));
  ck_assert_int_eq(image_png_write(file_path("bad.png"), px, 5, 2, 2, NULL, 0, &e), ERR_INVALID);
  ck_assert_ptr_nonnull(strstr(e.msg, "bad.png"));
  ck_assert_int_eq(access(file_path("bad.png"), F_OK), -1);
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("image");
  TCase *tc = tcase_create("core");
  tcase_add_checked_fixture(tc, setup, teardown);
  tcase_add_test(tc, test_to_u8_values);
  tcase_add_test(tc, test_to_u8_half_even);
  tcase_add_test(tc, test_to_u8_layout);
  tcase_add_test(tc, test_from_u8);
  tcase_add_test(tc, test_png_roundtrip_rgb_texts);
  tcase_add_test(tc, test_png_gray);
  tcase_add_test(tc, test_png_other_formats);
  tcase_add_test(tc, test_png_text_after_idat);
  tcase_add_test(tc, test_png_limits);
  tcase_add_test(tc, test_png_corrupt);
  tcase_add_test(tc, test_png_encode_errors);
  tcase_add_test(tc, test_png_chunk_past_the_end);
  tcase_add_test(tc, test_png_trailing_data);
  suite_add_tcase(s, tc);
  return s;
}
