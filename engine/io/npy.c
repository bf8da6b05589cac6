/* NumPy .npy reader and writer. The header is a Python dict literal, parsed
 * here by a small strict tokenizer (no eval); every size is checked against
 * the file length before anything large is allocated. */
#include "npy.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "mem.h"

/* numpy itself refuses headers above 10000 bytes by default; allow more but
 * keep a garbage length field from turning into a huge allocation. */
#define NPY_MAX_HEADER (1 << 20)
#define NPY_CHUNK 65536

typedef enum { DT_F4, DT_F8, DT_I4, DT_I8, DT_U1, DT_I1 } npy_dtype;

typedef struct npy_header {
  npy_dtype dtype;
  int itemsize;
  int ndim;
  int64_t shape[NPY_MAX_DIMS];
  int64_t count;
  long data_offset;
} npy_header;

/* ---- header dict parsing ---- */

typedef struct parser {
  const char *start, *p, *end;
  const char *path;
  err *e;
} parser;

/* A header string as messages quote it: bytes outside printable ASCII as \xNN, so an error
 * about '<f\xf5' says which byte is wrong and is valid text wherever it goes (JSON, logs). */
static const char *quoted(const char *in, char *out, size_t n) {
  size_t k = 0;
  for (const unsigned char *p = (const unsigned char *)in; *p && k + 5 < n; p++) {
    if (*p >= 0x20 && *p < 0x7f && *p != '\\')
      out[k++] = (char)*p;
    else
      k += (size_t)snprintf(out + k, n - k, "\\x%02x", *p);
  }
  out[k] = 0;
  return out;
}

static void skip_ws(parser *ps) {
  while (ps->p < ps->end && (*ps->p == ' ' || *ps->p == '\t' || *ps->p == '\n' || *ps->p == '\r'))
    ps->p++;
}

static int syntax(parser *ps, const char *what) {
  return err_set(ps->e, ERR_FORMAT, "%s: malformed .npy header: %s at header offset %ld", ps->path,
                 what, (long)(ps->p - ps->start));
}

static int expect(parser *ps, char c) {
  skip_ws(ps);
  if (ps->p >= ps->end || *ps->p != c) {
    char what[32];
    snprintf(what, sizeof what, "expected '%c'", c);
    return syntax(ps, what);
  }
  ps->p++;
  return ERR_OK;
}

/* A quoted string without escapes, copied into buf (truncation is an error). */
static int parse_string(parser *ps, char *buf, size_t n) {
  skip_ws(ps);
  if (ps->p >= ps->end || (*ps->p != '\'' && *ps->p != '"'))
    return syntax(ps, "expected a quoted string");
  char q = *ps->p++;
  size_t len = 0;
  while (ps->p < ps->end && *ps->p != q) {
    if (*ps->p == '\\')
      return syntax(ps, "escape sequences are not supported");
    if (len + 1 >= n)
      return syntax(ps, "string too long");
    buf[len++] = *ps->p++;
  }
  if (ps->p >= ps->end)
    return syntax(ps, "unterminated string");
  ps->p++;
  buf[len] = '\0';
  return ERR_OK;
}

static int parse_bool(parser *ps, int *out) {
  skip_ws(ps);
  size_t left = (size_t)(ps->end - ps->p);
  if (left >= 4 && memcmp(ps->p, "True", 4) == 0) {
    ps->p += 4;
    *out = 1;
    return ERR_OK;
  }
  if (left >= 5 && memcmp(ps->p, "False", 5) == 0) {
    ps->p += 5;
    *out = 0;
    return ERR_OK;
  }
  return syntax(ps, "expected True or False");
}

static int parse_int(parser *ps, int64_t *out) {
  skip_ws(ps);
  int neg = 0;
  if (ps->p < ps->end && *ps->p == '-') {
    neg = 1;
    ps->p++;
  }
  if (ps->p >= ps->end || *ps->p < '0' || *ps->p > '9')
    return syntax(ps, "expected an integer");
  uint64_t v = 0;
  while (ps->p < ps->end && *ps->p >= '0' && *ps->p <= '9') {
    unsigned d = (unsigned)(*ps->p++ - '0');
    if (v > ((uint64_t)INT64_MAX - d) / 10)
      return err_set(ps->e, ERR_FORMAT, "%s: .npy shape dimension overflows 64 bits", ps->path);
    v = v * 10 + d;
  }
  /* Python 2 era numpy wrote long integers as 3L. */
  if (ps->p < ps->end && *ps->p == 'L')
    ps->p++;
  if (neg && v != 0)
    return err_set(ps->e, ERR_FORMAT, "%s: .npy shape has a negative dimension -%llu", ps->path,
                   (unsigned long long)v);
  *out = (int64_t)v;
  return ERR_OK;
}

/* A Python tuple of ints: (), (n,), (a, b), (a, b,). "(n)" is not a tuple. */
static int parse_shape(parser *ps, npy_header *h) {
  int rc;
  if ((rc = expect(ps, '(')))
    return rc;
  h->ndim = 0;
  int trailing_comma = 0;
  for (;;) {
    skip_ws(ps);
    if (ps->p < ps->end && *ps->p == ')') {
      ps->p++;
      break;
    }
    if (h->ndim == NPY_MAX_DIMS)
      return err_set(ps->e, ERR_UNSUPPORTED, "%s: .npy array has more than %d dimensions", ps->path,
                     NPY_MAX_DIMS);
    if ((rc = parse_int(ps, &h->shape[h->ndim])))
      return rc;
    h->ndim++;
    skip_ws(ps);
    trailing_comma = 0;
    if (ps->p < ps->end && *ps->p == ',') {
      ps->p++;
      trailing_comma = 1;
    } else if (ps->p >= ps->end || *ps->p != ')') {
      return syntax(ps, "expected ',' or ')' in shape");
    }
  }
  if (h->ndim == 1 && !trailing_comma)
    return err_set(ps->e, ERR_FORMAT,
                   "%s: .npy shape is not a tuple (missing ',' after the "
                   "single dimension)",
                   ps->path);
  return ERR_OK;
}

static int parse_descr(parser *ps, npy_header *h) {
  skip_ws(ps);
  if (ps->p < ps->end && *ps->p == '[')
    return err_set(ps->e, ERR_UNSUPPORTED, "%s: structured .npy dtypes are not supported",
                   ps->path);
  char d[32], q[130];
  int rc = parse_string(ps, d, sizeof d);
  if (rc)
    return rc;
  static const struct {
    const char *name;
    npy_dtype dt;
    int size;
  } known[] = {
      {"<f4", DT_F4, 4}, {"<f8", DT_F8, 8}, {"<i4", DT_I4, 4}, {"<i8", DT_I8, 8},
      {"|u1", DT_U1, 1}, {"|i1", DT_I1, 1}, {"<u1", DT_U1, 1}, {"<i1", DT_I1, 1},
  };
  for (size_t i = 0; i < sizeof known / sizeof known[0]; i++) {
    if (strcmp(d, known[i].name) == 0) {
      h->dtype = known[i].dt;
      h->itemsize = known[i].size;
      return ERR_OK;
    }
  }
  if (d[0] == '>')
    return err_set(ps->e, ERR_UNSUPPORTED,
                   "%s: big-endian .npy dtype '%s' is not supported (save it little-endian)",
                   ps->path, quoted(d, q, sizeof q));
  if (strcmp(d, "|O") == 0 || strcmp(d, "<O") == 0)
    return err_set(ps->e, ERR_UNSUPPORTED, "%s: object .npy arrays (pickles) are not supported",
                   ps->path);
  return err_set(ps->e, ERR_UNSUPPORTED,
                 "%s: .npy dtype '%s' is not supported (want <f4, <f8, <i4, <i8, |u1 or |i1)",
                 ps->path, quoted(d, q, sizeof q));
}

static int parse_dict(const char *path, const char *text, size_t len, npy_header *h, err *e) {
  parser ps = {text, text, text + len, path, e};
  int have_descr = 0, have_order = 0, have_shape = 0, fortran = 0, rc;
  if ((rc = expect(&ps, '{')))
    return rc;
  for (;;) {
    skip_ws(&ps);
    if (ps.p < ps.end && *ps.p == '}') {
      ps.p++;
      break;
    }
    char key[32], q[130];
    if ((rc = parse_string(&ps, key, sizeof key)))
      return rc;
    if ((rc = expect(&ps, ':')))
      return rc;
    int *seen;
    if (strcmp(key, "descr") == 0) {
      seen = &have_descr;
      rc = parse_descr(&ps, h);
    } else if (strcmp(key, "fortran_order") == 0) {
      seen = &have_order;
      rc = parse_bool(&ps, &fortran);
    } else if (strcmp(key, "shape") == 0) {
      seen = &have_shape;
      rc = parse_shape(&ps, h);
    } else {
      return err_set(e, ERR_FORMAT, "%s: unexpected key '%s' in .npy header", path,
                     quoted(key, q, sizeof q));
    }
    if (rc)
      return rc;
    if (*seen)
      return err_set(e, ERR_FORMAT, "%s: duplicate key '%s' in .npy header", path,
                     quoted(key, q, sizeof q));
    *seen = 1;
    skip_ws(&ps);
    if (ps.p < ps.end && *ps.p == ',')
      ps.p++;
    else if (ps.p >= ps.end || *ps.p != '}')
      return syntax(&ps, "expected ',' or '}'");
  }
  skip_ws(&ps);
  if (ps.p != ps.end)
    return syntax(&ps, "trailing characters after the dict");
  if (!have_descr || !have_order || !have_shape)
    return err_set(e, ERR_FORMAT, "%s: .npy header lacks '%s'", path,
                   !have_descr   ? "descr"
                   : !have_order ? "fortran_order"
                                 : "shape");
  if (fortran)
    return err_set(e, ERR_UNSUPPORTED,
                   "%s: Fortran-order .npy arrays are not supported (save with C order)", path);
  return ERR_OK;
}

/* ---- file level ---- */

static uint32_t le32(const unsigned char *b) {
  return (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
}

static uint64_t le64(const unsigned char *b) {
  return (uint64_t)le32(b) | (uint64_t)le32(b + 4) << 32;
}

/* Validates everything up to the data of a stream of `size` bytes: on success f is positioned at
 * the first data byte and h describes exactly the rest of it. */
static int read_header(FILE *f, const char *path, uint64_t size, npy_header *h, err *e) {
  int rc = ERR_OK;
  char *text = NULL;
  unsigned char pre[12];
  size_t got = fread(pre, 1, 10, f);
  if (got < 6 || memcmp(pre, "\x93NUMPY", 6) != 0) {
    rc = err_set(e, ERR_FORMAT, "%s: not a .npy file (bad magic)", path);
    goto done;
  }
  if (got < 10) {
    rc = err_set(e, ERR_FORMAT, "%s: .npy file truncated inside the preamble", path);
    goto done;
  }
  int major = pre[6], minor = pre[7];
  uint64_t hlen;
  long prefix;
  if (major == 1) {
    hlen = (uint64_t)pre[8] | (uint64_t)pre[9] << 8;
    prefix = 10;
  } else if (major == 2 || major == 3) {
    if (fread(pre + 10, 1, 2, f) != 2) {
      rc = err_set(e, ERR_FORMAT, "%s: .npy file truncated inside the preamble", path);
      goto done;
    }
    hlen = le32(pre + 8);
    prefix = 12;
  } else {
    rc = err_set(e, ERR_UNSUPPORTED, "%s: .npy format version %d.%d is not supported", path, major,
                 minor);
    goto done;
  }
  if (hlen > NPY_MAX_HEADER) {
    rc = err_set(e, ERR_FORMAT, "%s: .npy header length %llu is implausibly large", path,
                 (unsigned long long)hlen);
    goto done;
  }
  if ((uint64_t)prefix + hlen > size) {
    rc = err_set(e, ERR_FORMAT,
                 "%s: .npy header (%llu bytes) runs past the end of the file "
                 "(%lld bytes)",
                 path, (unsigned long long)hlen, (long long)size);
    goto done;
  }
  text = mem_malloc(hlen + 1);
  if (!text) {
    rc = err_set(e, ERR_NOMEM, "%s: out of memory for the .npy header", path);
    goto done;
  }
  if (fread(text, 1, hlen, f) != hlen) {
    rc = err_set(e, ERR_IO, "%s: short read in the .npy header", path);
    goto done;
  }
  text[hlen] = '\0';
  if (memchr(text, '\0', hlen)) {
    rc = err_set(e, ERR_FORMAT, "%s: .npy header contains a NUL byte", path);
    goto done;
  }
  memset(h, 0, sizeof *h);
  if ((rc = parse_dict(path, text, hlen, h, e)))
    goto done;

  int64_t count = 1;
  for (int i = 0; i < h->ndim; i++) {
    if (h->shape[i] != 0 && count > INT64_MAX / h->shape[i]) {
      rc = err_set(e, ERR_FORMAT, "%s: .npy shape overflows 64 bits", path);
      goto done;
    }
    count *= h->shape[i];
  }
  /* Guards both the byte count below and the float/int64 allocation. */
  if (count > INT64_MAX / 8 || (uint64_t)count > SIZE_MAX / 8) {
    rc = err_set(e, ERR_FORMAT, "%s: .npy shape is too large (%lld elements)", path,
                 (long long)count);
    goto done;
  }
  h->count = count;
  h->data_offset = prefix + (long)hlen;
  uint64_t need = (uint64_t)count * (uint64_t)h->itemsize;
  uint64_t have = size - (uint64_t)h->data_offset;
  if (need != have) {
    rc = err_set(e, ERR_FORMAT, "%s: .npy data is %llu bytes but the shape needs %llu (%s)", path,
                 (unsigned long long)have, (unsigned long long)need,
                 have < need ? "truncated file" : "trailing bytes");
    goto done;
  }
done:
  free(text);
  return rc;
}

static int open_npy(const char *path, FILE **fp, npy_header *h, err *e) {
  if (!path)
    return err_set(e, ERR_INVALID, "npy: no path given");
  FILE *f = fopen(path, "rb");
  if (!f)
    return err_set(e, ERR_IO, "%s: cannot open: %s", path, strerror(errno));
  struct stat st;
  int rc = ERR_OK;
  if (fstat(fileno(f), &st) != 0)
    rc = err_set(e, ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
  else if (!S_ISREG(st.st_mode))
    rc = err_set(e, ERR_IO, "%s: not a regular file", path);
  else
    rc = read_header(f, path, (uint64_t)st.st_size, h, e);
  if (rc)
    fclose(f);
  else
    *fp = f;
  return rc;
}

/* An in-memory .npy (an upload): the same checks through a memory stream. */
static int open_npy_mem(const void *buf, size_t len, const char *name, FILE **fp, npy_header *h,
                        err *e) {
  if (!buf || !len)
    return err_set(e, ERR_FORMAT, "%s: empty .npy data", name);
  FILE *f = fmemopen((void *)buf, len, "rb");
  if (!f)
    return err_set(e, ERR_NOMEM, "%s: cannot open a memory stream", name);
  int rc = read_header(f, name, (uint64_t)len, h, e);
  if (rc)
    fclose(f);
  else
    *fp = f;
  return rc;
}

/* Reads the data in chunks and hands each element's bytes to conv, which
 * stores element i into dst. */
typedef int (*conv_fn)(const npy_header *h, const unsigned char *b, int64_t i, void *dst,
                       const char *path, err *e);

static int read_data(FILE *f, const char *path, const npy_header *h, conv_fn conv, void *dst,
                     err *e) {
  unsigned char *buf = mem_malloc(NPY_CHUNK);
  if (!buf)
    return err_set(e, ERR_NOMEM, "%s: out of memory", path);
  int64_t per = NPY_CHUNK / h->itemsize, i = 0;
  int rc = ERR_OK;
  while (i < h->count) {
    int64_t n = h->count - i < per ? h->count - i : per;
    size_t bytes = (size_t)n * (size_t)h->itemsize;
    if (fread(buf, 1, bytes, f) != bytes) {
      rc = err_set(e, ERR_IO, "%s: short read in .npy data (file changed while reading?)", path);
      break;
    }
    for (int64_t k = 0; k < n && !rc; k++)
      rc = conv(h, buf + k * h->itemsize, i + k, dst, path, e);
    if (rc)
      break;
    i += n;
  }
  free(buf);
  return rc;
}

static double elem_f64(npy_dtype dt, const unsigned char *b) {
  switch (dt) {
  case DT_F4: {
    uint32_t u = le32(b);
    float v;
    memcpy(&v, &u, 4);
    return v;
  }
  case DT_F8: {
    uint64_t u = le64(b);
    double v;
    memcpy(&v, &u, 8);
    return v;
  }
  default: return 0;
  }
}

static int64_t elem_i64(npy_dtype dt, const unsigned char *b) {
  switch (dt) {
  case DT_I4: return (int32_t)le32(b);
  case DT_I8: return (int64_t)le64(b);
  case DT_U1: return b[0];
  case DT_I1: return (int8_t)b[0];
  default: return 0;
  }
}

static int conv_f32(const npy_header *h, const unsigned char *b, int64_t i, void *dst,
                    const char *path, err *e) {
  (void)path;
  (void)e;
  float *out = dst;
  if (h->dtype == DT_F4 || h->dtype == DT_F8)
    out[i] = (float)elem_f64(h->dtype, b);
  else
    out[i] = (float)elem_i64(h->dtype, b); /* exact below 2^24, nearest above */
  return ERR_OK;
}

static int conv_i64(const npy_header *h, const unsigned char *b, int64_t i, void *dst,
                    const char *path, err *e) {
  int64_t *out = dst;
  if (h->dtype != DT_F4 && h->dtype != DT_F8) {
    out[i] = elem_i64(h->dtype, b);
    return ERR_OK;
  }
  double v = elem_f64(h->dtype, b);
  /* -2^63 is exactly representable; 2^63 is the first value out of range. */
  const double two63 = 9223372036854775808.0;
  if (!(v >= -two63 && v < two63) || v != trunc(v))
    return err_set(e, ERR_FORMAT, "%s: element %lld (%.17g) is not an integer that fits int64",
                   path, (long long)i, v);
  out[i] = (int64_t)v;
  return ERR_OK;
}

/* Reads the data of an opened stream and closes it. */
static int read_f32(FILE *f, const char *path, const npy_header *hp, npy_array *out, err *e) {
  const npy_header h = *hp;
  int rc;
  /* Never NULL, even for an empty array, so callers can treat NULL as failure. */
  float *data = mem_malloc((size_t)(h.count ? h.count : 1) * sizeof *data);
  if (!data) {
    fclose(f);
    return err_set(e, ERR_NOMEM, "%s: out of memory for %lld floats", path, (long long)h.count);
  }
  rc = read_data(f, path, &h, conv_f32, data, e);
  fclose(f);
  if (rc) {
    free(data);
    return rc;
  }
  out->ndim = h.ndim;
  memcpy(out->shape, h.shape, sizeof h.shape);
  out->count = h.count;
  out->data = data;
  return ERR_OK;
}

int npy_read_f32(const char *path, npy_array *out, err *e) {
  if (!out)
    return err_set(e, ERR_INVALID, "npy_read_f32: no output array");
  memset(out, 0, sizeof *out);
  FILE *f = NULL;
  npy_header h;
  int rc = open_npy(path, &f, &h, e);
  return rc ? rc : read_f32(f, path, &h, out, e);
}

int npy_parse_f32(const void *buf, size_t len, const char *name, npy_array *out, err *e) {
  if (!out)
    return err_set(e, ERR_INVALID, "npy_parse_f32: no output array");
  memset(out, 0, sizeof *out);
  FILE *f = NULL;
  npy_header h;
  int rc = open_npy_mem(buf, len, name, &f, &h, e);
  return rc ? rc : read_f32(f, name, &h, out, e);
}

int npy_read_i64(const char *path, int64_t **data, int64_t *count, int *ndim,
                 int64_t shape[NPY_MAX_DIMS], err *e) {
  if (!data || !count)
    return err_set(e, ERR_INVALID, "npy_read_i64: no output pointers");
  *data = NULL;
  *count = 0;
  FILE *f = NULL;
  npy_header h;
  int rc = open_npy(path, &f, &h, e);
  if (rc)
    return rc;
  int64_t *buf = mem_malloc((size_t)(h.count ? h.count : 1) * sizeof *buf);
  if (!buf) {
    fclose(f);
    return err_set(e, ERR_NOMEM, "%s: out of memory for %lld integers", path, (long long)h.count);
  }
  rc = read_data(f, path, &h, conv_i64, buf, e);
  fclose(f);
  if (rc) {
    free(buf);
    return rc;
  }
  *data = buf;
  *count = h.count;
  if (ndim)
    *ndim = h.ndim;
  if (shape)
    memcpy(shape, h.shape, sizeof h.shape);
  return ERR_OK;
}

int npy_check_finite(const npy_array *a, const char *what, err *e) {
  for (int64_t i = 0; i < a->count; i++)
    if (!isfinite(a->data[i]))
      return err_set(e, ERR_INVALID, "%s: value %lld is not finite", what, (long long)i);
  return ERR_OK;
}

static void format_shape(char *buf, size_t n, const int64_t *shape, int ndim) {
  buf[0] = 0;
  for (int i = 0; i < ndim; i++)
    snprintf(buf + strlen(buf), n - strlen(buf), "%s%lld", i ? ", " : "", (long long)shape[i]);
}

int npy_parse_f32_shaped(const void *buf, size_t len, const char *name, const int64_t *shape,
                         int ndim, npy_array *out, err *e) {
  int rc = npy_parse_f32(buf, len, name, out, e);
  if (rc != ERR_OK)
    return rc;
  if (out->ndim != ndim || memcmp(out->shape, shape, sizeof *shape * (size_t)ndim) != 0) {
    char want[160], got[160];
    format_shape(want, sizeof want, shape, ndim);
    format_shape(got, sizeof got, out->shape, out->ndim);
    rc = err_set(e, ERR_SHAPE, "%s: shape [%s] where [%s] is needed", name, got, want);
  } else {
    rc = npy_check_finite(out, name, e);
  }
  if (rc != ERR_OK)
    npy_array_free(out);
  return rc;
}

void npy_array_free(npy_array *a) {
  if (!a)
    return;
  free(a->data);
  a->data = NULL;
  a->count = 0;
  a->ndim = 0;
}

/* ---- writing ---- */

static int write_all(FILE *f, const void *p, size_t n) {
  return fwrite(p, 1, n, f) == n ? 0 : -1;
}

/* The element type of an array to write: float32 or int64. */
typedef struct npy_out_type {
  const char *descr;
  int size;
} npy_out_type;
static const npy_out_type out_f32 = {"<f4", 4}, out_i64 = {"<i8", 8};

static int write_body(FILE *f, const void *data, npy_out_type ty, int ndim, const int64_t *shape,
                      int64_t count) {
  char dict[256];
  int len =
      snprintf(dict, sizeof dict, "{'descr': '%s', 'fortran_order': False, 'shape': (", ty.descr);
  for (int i = 0; i < ndim; i++)
    len += snprintf(dict + len, sizeof dict - (size_t)len, "%s%lld", i ? ", " : "",
                    (long long)shape[i]);
  len += snprintf(dict + len, sizeof dict - (size_t)len, "%s), }", ndim == 1 ? "," : "");
  /* Pad with spaces and a final newline so the data starts 64-byte aligned, as numpy does. */
  int total = 10 + len + 1;
  int pad = (64 - total % 64) % 64;
  int hlen = len + pad + 1;
  unsigned char pre[10];
  memcpy(pre, "\x93NUMPY\x01\x00", 8);
  pre[8] = (unsigned char)(hlen & 0xff);
  pre[9] = (unsigned char)(hlen >> 8);
  if (write_all(f, pre, sizeof pre) || write_all(f, dict, (size_t)len))
    return -1;
  for (int i = 0; i < pad; i++)
    if (fputc(' ', f) == EOF)
      return -1;
  if (fputc('\n', f) == EOF)
    return -1;
  /* little-endian whatever the host's order */
  const unsigned char *src = data;
  unsigned char buf[4096] = {0};
  for (int64_t i = 0; i < count;) {
    size_t n = 0;
    for (; n + (size_t)ty.size <= sizeof buf && i < count; i++) {
      uint64_t u;
      if (ty.size == 4) {
        uint32_t v;
        memcpy(&v, src + 4 * i, 4);
        u = v;
      } else {
        memcpy(&u, src + 8 * i, 8);
      }
      for (int b = 0; b < ty.size; b++)
        buf[n++] = (unsigned char)(u >> (8 * b));
    }
    if (write_all(f, buf, n))
      return -1;
  }
  return 0;
}

/* The element count of an array to write, checked. */
static int write_count(const char *path, const void *data, int ndim, const int64_t *shape,
                       int64_t *out, err *e) {
  if (ndim < 0 || ndim > NPY_MAX_DIMS)
    return err_set(e, ERR_INVALID, "%s: cannot write %d dimensions (max %d)", path, ndim,
                   NPY_MAX_DIMS);
  if (ndim > 0 && !shape)
    return err_set(e, ERR_INVALID, "%s: no shape given", path);
  int64_t count = 1;
  for (int i = 0; i < ndim; i++) {
    if (shape[i] < 0)
      return err_set(e, ERR_INVALID, "%s: negative dimension %lld", path, (long long)shape[i]);
    if (shape[i] != 0 && count > INT64_MAX / 8 / shape[i])
      return err_set(e, ERR_INVALID, "%s: shape too large", path);
    count *= shape[i];
  }
  if (count > 0 && !data)
    return err_set(e, ERR_INVALID, "%s: no data given", path);
  *out = count;
  return ERR_OK;
}

int npy_encode_f32(const float *data, int ndim, const int64_t *shape, uint8_t **out, size_t *len,
                   err *e) {
  int64_t count;
  int rc = write_count("npy", data, ndim, shape, &count, e);
  if (rc)
    return rc;
  char *buf = NULL;
  size_t n = 0;
  FILE *f = open_memstream(&buf, &n);
  if (!f)
    return err_set(e, ERR_NOMEM, "npy: out of memory");
  int bad = write_body(f, data, out_f32, ndim, shape, count);
  if (fclose(f) != 0 || bad) {
    free(buf);
    return err_set(e, ERR_NOMEM, "npy: out of memory for %lld floats", (long long)count);
  }
  *out = (uint8_t *)buf;
  *len = n;
  return ERR_OK;
}

/* Written beside the target and renamed, so readers never see a partial file. */
static int write_file(const char *path, const void *data, npy_out_type ty, int ndim,
                      const int64_t *shape, err *e) {
  if (!path)
    return err_set(e, ERR_INVALID, "npy: no path given");
  int64_t count;
  int rc0 = write_count(path, data, ndim, shape, &count, e);
  if (rc0)
    return rc0;

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
  FILE *f = fdopen(fd, "wb");
  if (!f) {
    int rc = err_set(e, ERR_IO, "%s: fdopen: %s", path, strerror(errno));
    close(fd);
    unlink(tmp);
    free(tmp);
    return rc;
  }
  int bad = write_body(f, data, ty, ndim, shape, count);
  if (!bad && fflush(f) != 0)
    bad = -1;
  int saved = errno;
  if (fclose(f) != 0 && !bad) {
    bad = -1;
    saved = errno;
  }
  if (!bad && rename(tmp, path) != 0) {
    bad = -1;
    saved = errno;
  }
  if (bad) {
    unlink(tmp);
    free(tmp);
    return err_set(e, ERR_IO, "%s: write failed: %s", path, strerror(saved));
  }
  free(tmp);
  return ERR_OK;
}

int npy_write_f32(const char *path, const float *data, int ndim, const int64_t *shape, err *e) {
  return write_file(path, data, out_f32, ndim, shape, e);
}

int npy_write_i64(const char *path, const int64_t *data, int ndim, const int64_t *shape, err *e) {
  return write_file(path, data, out_i64, ndim, shape, e);
}
