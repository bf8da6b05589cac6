/* safetensors reader. The file is mmapped read-only; the JSON header is parsed
 * once and every tensor's dtype, shape and byte range is checked against the
 * file before anything reads it, so a truncated or hostile file cannot crash us. */
#include "safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "mem.h"

#define ST_MAX_HEADER (100u << 20) /* the format's own limit is 100 MB */

typedef struct st_entry {
  st_tensor_info info;
  uint64_t begin, end; /* byte range inside the data section */
} st_entry;

struct st_file {
  char *path;
  const uint8_t *map; /* NULL for a view, which borrows its base's data */
  size_t map_len;
  int fd;              /* kept open for st_map_f32; -1 for a view */
  const uint8_t *data; /* start of the data section */
  uint64_t data_len;
  st_entry *entries;
  int count;
};

static size_t dtype_size(st_dtype d) {
  switch (d) {
  case ST_F32:
  case ST_I32: return 4;
  case ST_F16:
  case ST_BF16: return 2;
  case ST_F64:
  case ST_I64: return 8;
  default: return 0;
  }
}

static st_dtype dtype_parse(const char *s) {
  static const struct {
    const char *name;
    st_dtype d;
  } table[] = {{"F32", ST_F32}, {"F16", ST_F16}, {"BF16", ST_BF16},
               {"F64", ST_F64}, {"I64", ST_I64}, {"I32", ST_I32}};
  for (size_t i = 0; i < sizeof table / sizeof table[0]; i++)
    if (strcmp(s, table[i].name) == 0)
      return table[i].d;
  return ST_OTHER;
}

static const char *dtype_name(st_dtype d) {
  static const char *names[] = {"F32", "F16", "BF16", "F64", "I64", "I32", "other"};
  return names[d];
}

static int parse_entry(st_file *f, const char *name, json_t *v, st_entry *out, err *e) {
  if (!json_is_object(v))
    return err_set(e, ERR_FORMAT, "tensor '%s': header entry is not an object", name);
  json_t *dt = json_object_get(v, "dtype"), *shape = json_object_get(v, "shape");
  json_t *offs = json_object_get(v, "data_offsets");
  if (!json_is_string(dt) || !json_is_array(shape) || !json_is_array(offs) ||
      json_array_size(offs) != 2)
    return err_set(e, ERR_FORMAT, "tensor '%s': needs dtype, shape and data_offsets[2]", name);
  out->info.name = mem_strdup(name);
  if (!out->info.name)
    return err_set(e, ERR_NOMEM, "out of memory");
  out->info.dtype = dtype_parse(json_string_value(dt));
  size_t nd = json_array_size(shape);
  if (nd > ST_MAX_DIMS)
    return err_set(e, ERR_FORMAT, "tensor '%s': %zu dimensions (at most %d)", name, nd,
                   ST_MAX_DIMS);
  out->info.ndim = (int)nd;
  int64_t count = 1;
  for (size_t i = 0; i < nd; i++) {
    json_t *d = json_array_get(shape, i);
    if (!json_is_integer(d) || json_integer_value(d) < 0)
      return err_set(e, ERR_FORMAT, "tensor '%s': shape[%zu] is not a non-negative integer", name,
                     i);
    int64_t n = json_integer_value(d);
    if (n > 0 && count > INT64_MAX / 16 / n)
      return err_set(e, ERR_FORMAT, "tensor '%s': shape too large", name);
    out->info.shape[i] = n;
    count *= n;
  }
  out->info.count = count;
  json_t *b = json_array_get(offs, 0), *en = json_array_get(offs, 1);
  if (!json_is_integer(b) || !json_is_integer(en) || json_integer_value(b) < 0 ||
      json_integer_value(en) < json_integer_value(b))
    return err_set(e, ERR_FORMAT, "tensor '%s': bad data_offsets", name);
  out->begin = (uint64_t)json_integer_value(b);
  out->end = (uint64_t)json_integer_value(en);
  if (out->end > f->data_len)
    return err_set(e, ERR_FORMAT,
                   "tensor '%s': data_offsets end %llu beyond the file's %llu data bytes "
                   "(truncated file?)",
                   name, (unsigned long long)out->end, (unsigned long long)f->data_len);
  size_t es = dtype_size(out->info.dtype);
  if (es && out->end - out->begin != (uint64_t)count * es)
    return err_set(e, ERR_FORMAT, "tensor '%s': %llu bytes for %lld %s values", name,
                   (unsigned long long)(out->end - out->begin), (long long)count,
                   json_string_value(dt));
  return ERR_OK;
}

static int parse_header(st_file *f, err *e) {
  if (f->map_len < 8)
    return err_set(e, ERR_FORMAT, "file is %zu bytes, too short for a header", f->map_len);
  uint64_t n = 0;
  for (int i = 7; i >= 0; i--)
    n = (n << 8) | f->map[i];
  if (n > ST_MAX_HEADER || n > f->map_len - 8)
    return err_set(e, ERR_FORMAT, "header length %llu overruns the %zu-byte file",
                   (unsigned long long)n, f->map_len);
  f->data = f->map + 8 + n;
  f->data_len = f->map_len - 8 - n;
  json_error_t je;
  json_t *root = json_loadb((const char *)f->map + 8, n, JSON_REJECT_DUPLICATES, &je);
  if (!root)
    return err_set(e, ERR_FORMAT, "header is not valid JSON: %s", je.text);
  int rc = ERR_OK;
  if (!json_is_object(root)) {
    rc = err_set(e, ERR_FORMAT, "header is not a JSON object");
    goto done;
  }
  f->entries = mem_calloc(json_object_size(root) + 1, sizeof *f->entries);
  if (!f->entries) {
    rc = err_set(e, ERR_NOMEM, "out of memory");
    goto done;
  }
  const char *key;
  json_t *v;
  json_object_foreach(root, key, v) {
    if (strcmp(key, "__metadata__") == 0)
      continue;
    rc = parse_entry(f, key, v, &f->entries[f->count], e);
    if (f->entries[f->count].info.name)
      f->count++;
    if (rc)
      goto done;
  }
done:
  json_decref(root);
  return rc;
}

int st_open(const char *path, st_file **out, err *e) {
  *out = NULL;
  st_file *f = mem_calloc(1, sizeof *f);
  if (!f)
    return err_set(e, ERR_NOMEM, "out of memory");
  f->fd = -1;
  if (!(f->path = mem_strdup(path))) {
    free(f);
    return err_set(e, ERR_NOMEM, "%s: out of memory", path);
  }
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  f->fd = fd;
  if (fd < 0) {
    int rc = err_set(e, ERR_IO, "%s: %s", path, strerror(errno));
    st_close(f);
    return rc;
  }
  struct stat sb;
  if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
    st_close(f);
    return err_set(e, ERR_IO, "%s: not a regular file", path);
  }
  f->map_len = (size_t)sb.st_size;
  if (f->map_len > 0) {
    void *m = mmap(NULL, f->map_len, PROT_READ, MAP_PRIVATE, fd, 0);
    if (m == MAP_FAILED) {
      int rc = err_set(e, ERR_IO, "%s: mmap: %s", path, strerror(errno));
      f->map_len = 0;
      st_close(f);
      return rc;
    }
    f->map = m;
  }
  int rc = parse_header(f, e);
  if (rc) {
    err_prefix(e, "%s", path);
    st_close(f);
    return rc;
  }
  *out = f;
  return ERR_OK;
}

void st_close(st_file *f) {
  if (!f)
    return;
  for (int i = 0; i < f->count; i++)
    free((char *)f->entries[i].info.name);
  free(f->entries);
  if (f->map)
    munmap((void *)f->map, f->map_len);
  if (f->fd >= 0)
    close(f->fd);
  free(f->path);
  free(f);
}

int st_count(const st_file *f) {
  return f->count;
}
const st_tensor_info *st_info_at(const st_file *f, int i) {
  return i >= 0 && i < f->count ? &f->entries[i].info : NULL;
}

static const st_entry *find_entry(const st_file *f, const char *name) {
  for (int i = 0; i < f->count; i++)
    if (strcmp(f->entries[i].info.name, name) == 0)
      return &f->entries[i];
  return NULL;
}

int st_index(const st_file *f, const char *name) {
  const st_entry *en = find_entry(f, name);
  return en ? (int)(en - f->entries) : -1;
}

const st_tensor_info *st_find(const st_file *f, const char *name) {
  const st_entry *en = find_entry(f, name);
  return en ? &en->info : NULL;
}

int st_view(const st_file *base, const st_alias *a, int n, st_file **out, err *e) {
  *out = NULL;
  st_file *v = mem_calloc(1, sizeof *v);
  if (v)
    v->fd = -1;
  if (!v || !(v->path = mem_strdup(base->path)) ||
      !(v->entries = mem_calloc((size_t)n + 1, sizeof *v->entries))) {
    st_close(v);
    return err_set(e, ERR_NOMEM, "out of memory");
  }
  v->data = base->data;
  v->data_len = base->data_len;
  for (int i = 0; i < n; i++) {
    const st_entry *src = find_entry(base, a[i].from);
    if (!src) {
      st_close(v);
      return err_set(e, ERR_FORMAT, "%s: missing tensor '%s'", base->path, a[i].from);
    }
    st_entry en = *src;
    if (a[i].rows) {
      const int64_t dim0 = en.info.ndim ? en.info.shape[0] : 0;
      if (a[i].row0 < 0 || a[i].rows < 0 || a[i].row0 + a[i].rows > dim0) {
        st_close(v);
        return err_set(e, ERR_FORMAT, "%s: tensor '%s' has %lld rows, not rows %lld to %lld",
                       base->path, a[i].from, (long long)dim0, (long long)a[i].row0,
                       (long long)(a[i].row0 + a[i].rows));
      }
      const uint64_t row_bytes = (en.end - en.begin) / (uint64_t)dim0;
      en.begin += (uint64_t)a[i].row0 * row_bytes;
      en.end = en.begin + (uint64_t)a[i].rows * row_bytes;
      en.info.count = en.info.count / dim0 * a[i].rows;
      en.info.shape[0] = a[i].rows;
    }
    if (find_entry(v, a[i].name)) {
      st_close(v);
      return err_set(e, ERR_INVALID, "%s: two tensors named '%s' in one view", base->path,
                     a[i].name);
    }
    if (!(en.info.name = mem_strdup(a[i].name))) {
      st_close(v);
      return err_set(e, ERR_NOMEM, "out of memory");
    }
    v->entries[v->count++] = en;
  }
  *out = v;
  return ERR_OK;
}

static float half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else { /* subnormal: renormalise */
      exp = 127 - 15 + 1;
      while (!(man & 0x400)) {
        man <<= 1;
        exp--;
      }
      bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float out;
  memcpy(&out, &bits, 4);
  return out;
}

static int shape_matches(const st_tensor_info *in, int ndim, const int64_t *shape) {
  if (in->ndim != ndim)
    return 0;
  for (int i = 0; i < ndim; i++)
    if (in->shape[i] != shape[i])
      return 0;
  return 1;
}

static void shape_str(char *buf, size_t n, int ndim, const int64_t *shape) {
  size_t off = (size_t)snprintf(buf, n, "[");
  for (int i = 0; i < ndim && off < n; i++)
    off += (size_t)snprintf(buf + off, n - off, "%s%lld", i ? "," : "", (long long)shape[i]);
  if (off < n)
    snprintf(buf + off, n - off, "]");
}

int st_read_f32(const st_file *f, const char *name, int ndim, const int64_t *shape, float *dst,
                err *e) {
  const st_entry *en = find_entry(f, name);
  if (!en)
    return err_set(e, ERR_FORMAT, "%s: missing tensor '%s'", f->path, name);
  if (shape && !shape_matches(&en->info, ndim, shape)) {
    char want[128], got[128];
    shape_str(want, sizeof want, ndim, shape);
    shape_str(got, sizeof got, en->info.ndim, en->info.shape);
    return err_set(e, ERR_FORMAT, "%s: tensor '%s' has shape %s, expected %s", f->path, name, got,
                   want);
  }
  const uint8_t *p = f->data + en->begin;
  int64_t n = en->info.count;
  switch (en->info.dtype) {
  case ST_F32: memcpy(dst, p, (size_t)n * 4); break;
  case ST_F64:
    for (int64_t i = 0; i < n; i++) {
      double d;
      memcpy(&d, p + 8 * i, 8);
      dst[i] = (float)d;
    }
    break;
  case ST_F16:
    for (int64_t i = 0; i < n; i++) {
      uint16_t h;
      memcpy(&h, p + 2 * i, 2);
      dst[i] = half_to_float(h);
    }
    break;
  case ST_BF16:
    for (int64_t i = 0; i < n; i++) {
      uint16_t h;
      memcpy(&h, p + 2 * i, 2);
      uint32_t bits = (uint32_t)h << 16;
      memcpy(&dst[i], &bits, 4);
    }
    break;
  default:
    return err_set(e, ERR_UNSUPPORTED, "%s: tensor '%s' has dtype %s, expected a float type",
                   f->path, name, dtype_name(en->info.dtype));
  }
  return ERR_OK;
}

int st_map_f32(const st_file *f, const char *name, int ndim, const int64_t *shape, float **data,
               void **map, size_t *map_len) {
  const st_entry *en = find_entry(f, name);
  if (f->fd < 0 || !f->map || !en || en->info.dtype != ST_F32 || en->info.count < 1 ||
      (shape && !shape_matches(&en->info, ndim, shape)))
    return 0;
  const uint64_t at = (uint64_t)(f->data - f->map) + en->begin;
  const long page = sysconf(_SC_PAGESIZE);
  if (at % sizeof(float) || page <= 0)
    return 0;
  const uint64_t start = at - at % (uint64_t)page;
  const size_t len = (size_t)(at - start) + (size_t)en->info.count * sizeof(float);
  void *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE, f->fd, (off_t)start);
  if (m == MAP_FAILED)
    return 0;
  *map = m;
  *map_len = len;
  *data = (float *)((uint8_t *)m + (at - start));
  return 1;
}

void st_unmap(void *map, size_t map_len) {
  if (map)
    munmap(map, map_len);
}

int st_read_i64(const st_file *f, const char *name, int64_t *dst, int64_t count, err *e) {
  const st_entry *en = find_entry(f, name);
  if (!en)
    return err_set(e, ERR_FORMAT, "%s: missing tensor '%s'", f->path, name);
  if (en->info.count != count)
    return err_set(e, ERR_FORMAT, "%s: tensor '%s' has %lld values, expected %lld", f->path, name,
                   (long long)en->info.count, (long long)count);
  const uint8_t *p = f->data + en->begin;
  if (en->info.dtype == ST_I64) {
    memcpy(dst, p, (size_t)count * 8);
  } else if (en->info.dtype == ST_I32) {
    for (int64_t i = 0; i < count; i++) {
      int32_t v;
      memcpy(&v, p + 4 * i, 4);
      dst[i] = v;
    }
  } else {
    return err_set(e, ERR_UNSUPPORTED, "%s: tensor '%s' has dtype %s, expected I64 or I32", f->path,
                   name, dtype_name(en->info.dtype));
  }
  return ERR_OK;
}
