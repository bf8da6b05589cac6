/* The safetensors writer (checkpoints, gradients): validates every name and shape first, builds
 * the JSON header with jansson (8-byte aligned, as the format recommends), then writes header
 * and little-endian float32 data to a temporary file that is synced and renamed into place. */
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "mem.h"
#include "safetensors.h"

/* Printable ASCII without the bytes a JSON string would have to escape: a name written here is
 * read back byte for byte by any reader. */
static int bad_string(const char *s) {
  size_t n = s ? strlen(s) : 0;
  if (n == 0 || n > ST_MAX_NAME)
    return 1;
  for (size_t i = 0; i < n; i++)
    if (s[i] < 0x20 || s[i] > 0x7e || s[i] == '"' || s[i] == '\\')
      return 1;
  return 0;
}

static int check_tensors(const st_out_tensor *t, int count, size_t *bytes, err *e) {
  *bytes = 0;
  for (int i = 0; i < count; i++) {
    if (bad_string(t[i].name) || strcmp(t[i].name, "__metadata__") == 0)
      return err_set(e, ERR_INVALID,
                     "tensor %d: name must be 1 to %d printable ASCII bytes without quotes or "
                     "backslashes, and not __metadata__",
                     i, ST_MAX_NAME);
    for (int j = 0; j < i; j++)
      if (strcmp(t[j].name, t[i].name) == 0)
        return err_set(e, ERR_INVALID, "tensor '%s' is named twice", t[i].name);
    if (t[i].ndim < 0 || t[i].ndim > ST_MAX_DIMS || (t[i].ndim > 0 && !t[i].shape))
      return err_set(e, ERR_INVALID, "tensor '%s': ndim must be 0 to %d with a shape", t[i].name,
                     ST_MAX_DIMS);
    uint64_t n = 1;
    for (int d = 0; d < t[i].ndim; d++) {
      int64_t v = t[i].shape[d];
      if (v < 0 || (v > 0 && n > (uint64_t)(INT64_MAX / 16 / v))) /* the reader's limit */
        return err_set(e, ERR_INVALID, "tensor '%s': shape[%d] = %lld is negative or too large",
                       t[i].name, d, (long long)v);
      n *= (uint64_t)v;
    }
    if (n > 0 && !t[i].data)
      return err_set(e, ERR_INVALID, "tensor '%s': no data", t[i].name);
    if (*bytes > SIZE_MAX / 2 - n * 4)
      return err_set(e, ERR_INVALID, "tensor '%s': the file would be too large", t[i].name);
    *bytes += (size_t)n * 4;
  }
  return ERR_OK;
}

static json_t *make_header(const st_out_tensor *t, int count, const char *const *meta, int nmeta,
                           err *e) {
  json_t *h = json_object();
  if (!h) {
    err_set(e, ERR_NOMEM, "out of memory");
    return NULL;
  }
  uint64_t off = 0;
  int rc = 0;
  if (nmeta > 0) {
    json_t *m = json_object();
    rc |= json_object_set_new(h, "__metadata__", m);
    for (int i = 0; m && i < nmeta; i++)
      rc |= json_object_set_new(m, meta[2 * i], json_string(meta[2 * i + 1]));
  }
  for (int i = 0; i < count && !rc; i++) {
    json_t *shape = json_array(), *v = json_object();
    uint64_t n = 1;
    for (int d = 0; d < t[i].ndim; d++) {
      rc |= json_array_append_new(shape, json_integer(t[i].shape[d]));
      n *= (uint64_t)t[i].shape[d];
    }
    rc |= json_object_set_new(v, "dtype", json_string("F32"));
    rc |= json_object_set_new(v, "shape", shape);
    json_t *offs = json_array();
    rc |= json_array_append_new(offs, json_integer((json_int_t)off));
    rc |= json_array_append_new(offs, json_integer((json_int_t)(off + 4 * n)));
    rc |= json_object_set_new(v, "data_offsets", offs);
    rc |= json_object_set_new(h, t[i].name, v);
    off += 4 * n;
  }
  if (rc) {
    json_decref(h);
    err_set(e, ERR_NOMEM, "out of memory");
    return NULL;
  }
  return h;
}

static int write_all(int fd, const void *buf, size_t n) {
  const char *p = buf;
  while (n > 0) {
    ssize_t w = write(fd, p, n);
    if (w < 0 && errno == EINTR)
      continue;
    if (w <= 0)
      return -1;
    p += w;
    n -= (size_t)w;
  }
  return 0;
}

static int write_file(const char *path, const char *text, size_t hlen, const st_out_tensor *t,
                      int count, err *e) {
  char tmp[4200];
  if (snprintf(tmp, sizeof tmp, "%s.tmp%ld", path, (long)getpid()) >= (int)sizeof tmp)
    return err_set(e, ERR_INVALID, "path too long: %s", path);
  int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0)
    return err_set(e, ERR_IO, "%s: %s", tmp, strerror(errno));
  unsigned char len8[8];
  for (int i = 0; i < 8; i++) /* little-endian u64 */
    len8[i] = (unsigned char)((uint64_t)hlen >> (8 * i));
  int bad = write_all(fd, len8, 8) || write_all(fd, text, hlen);
  for (int i = 0; i < count && !bad; i++) { /* float32 is little-endian on every target built */
    size_t n = 1;
    for (int d = 0; d < t[i].ndim; d++)
      n *= (size_t)t[i].shape[d];
    bad = n > 0 && write_all(fd, t[i].data, n * sizeof(float));
  }
  bad = bad || fsync(fd) != 0;
  int err_no = errno;
  if (close(fd) != 0 && !bad) {
    bad = 1;
    err_no = errno;
  }
  if (bad || rename(tmp, path) != 0) {
    if (!bad)
      err_no = errno;
    unlink(tmp);
    return err_set(e, ERR_IO, "%s: %s", path, strerror(err_no));
  }
  return ERR_OK;
}

int st_write_f32(const char *path, const st_out_tensor *t, int count, const char *const *meta,
                 int nmeta, err *e) {
  size_t bytes;
  if (!path || count < 0 || (count > 0 && !t) || nmeta < 0 || (nmeta > 0 && !meta))
    return err_set(e, ERR_INVALID, "st_write_f32: missing path, tensors or metadata");
  int rc = check_tensors(t, count, &bytes, e);
  for (int i = 0; !rc && i < 2 * nmeta; i++)
    if (bad_string(meta[i]))
      rc = err_set(e, ERR_INVALID, "metadata %s %d must be 1 to %d printable ASCII bytes",
                   i % 2 ? "value" : "key", i / 2, ST_MAX_NAME);
  for (int i = 0; !rc && i < nmeta; i++)
    for (int j = 0; j < i; j++)
      if (strcmp(meta[2 * i], meta[2 * j]) == 0)
        rc = err_set(e, ERR_INVALID, "metadata key '%s' is given twice", meta[2 * i]);
  if (rc)
    return rc;
  json_t *h = make_header(t, count, meta, nmeta, e);
  if (!h)
    return e ? e->code : ERR_NOMEM;
  char *text = json_dumps(h, JSON_COMPACT | JSON_PRESERVE_ORDER);
  json_decref(h);
  if (!text)
    return err_set(e, ERR_NOMEM, "out of memory");
  size_t len = strlen(text), padded = (len + 7) & ~(size_t)7;
  char *buf = mem_malloc(padded);
  if (!buf) {
    free(text);
    return err_set(e, ERR_NOMEM, "out of memory");
  }
  memcpy(buf, text, len);
  memset(buf + len, ' ', padded - len); /* the format pads the header with spaces */
  free(text);
  rc = write_file(path, buf, padded, t, count, e);
  free(buf);
  return rc;
}
