/* safetensors reader: maps the file, validates the JSON header against the
 * file size, and hands out tensors converted to float32 (F32/F16/BF16) or int64. */
#ifndef DENOISED_SAFETENSORS_H
#define DENOISED_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"

#define ST_MAX_DIMS 8

typedef struct st_file st_file;

typedef enum { ST_F32, ST_F16, ST_BF16, ST_F64, ST_I64, ST_I32, ST_OTHER } st_dtype;

typedef struct st_tensor_info {
  const char *name;
  st_dtype dtype;
  int ndim;
  int64_t shape[ST_MAX_DIMS];
  int64_t count;
} st_tensor_info;

int st_open(const char *path, st_file **out, err *e);
void st_close(st_file *f);

int st_count(const st_file *f);
const st_tensor_info *st_info_at(const st_file *f, int i);
/* NULL when the file has no tensor of that name. */
const st_tensor_info *st_find(const st_file *f, const char *name);
/* Position of tensor `name` for st_info_at, or -1. */
int st_index(const st_file *f, const char *name);

/* Copies tensor `name` into dst as float32 (count floats), checking that its
 * shape equals `shape` (ndim dims) when shape is non-NULL. Errors name it. */
int st_read_f32(const st_file *f, const char *name, int ndim, const int64_t *shape, float *dst,
                err *e);
/* Tensor `name` mapped from the file instead of copied, when it is float32 at a 4-byte aligned
 * offset of a file st_open opened (not a view) and has `shape` (if non-NULL): returns 1 and sets
 * *data to its values, in a private writable mapping (*map, *map_len for st_unmap) whose pages
 * are read from the page cache on first touch and copied only when written, so a model holds no
 * second copy of its weights and loading them costs no copy. The mapping outlives f; writers
 * replace weight files by rename (st_write_f32), which leaves the mapped file intact. Returns 0
 * when it cannot map (the caller copies with st_read_f32, which also names any error). */
int st_map_f32(const st_file *f, const char *name, int ndim, const int64_t *shape, float **data,
               void **map, size_t *map_len);
void st_unmap(void *map, size_t map_len);
int st_read_i64(const st_file *f, const char *name, int64_t *dst, int64_t count, err *e);

/* ---------- views ---------- */

/* One tensor of a view: tensor `from` of the base file, rows [row0, row0 + rows) of its first
 * dimension (rows 0: the whole tensor), seen under `name`. */
typedef struct st_alias {
  const char *name;
  const char *from;
  int64_t row0, rows;
} st_alias;

/* A file that shows `n` tensors of `base` under other names (a single-file Stable-Diffusion
 * checkpoint seen as diffusers' folders; a fused q/k/v matrix seen as three). Nothing is
 * copied: base must stay open while the view is used; st_close(view) frees the view only.
 * ERR_FORMAT naming a missing tensor or rows outside it, ERR_INVALID for a duplicate name. */
int st_view(const st_file *base, const st_alias *a, int n, st_file **out, err *e);

/* ---------- writing ---------- */

/* One float32 tensor to write. name: 1 to ST_MAX_NAME bytes of printable ASCII (no quotes,
 * backslashes or control bytes), not "__metadata__", unique in the file; ndim 0 to ST_MAX_DIMS,
 * every dimension >= 0; data holds the product of shape floats (may be NULL when it is 0). */
#define ST_MAX_NAME 512
typedef struct st_out_tensor {
  const char *name;
  int ndim;
  const int64_t *shape;
  const float *data;
} st_out_tensor;

/* Writes `count` tensors as an F32 safetensors file, in the given order, with the string pairs
 * meta[0..2*nmeta) as "__metadata__" (keys and values checked like names; NULL for none).
 * Everything is validated before the file is touched; the file is written to a temporary name
 * beside path, synced and renamed, so a reader never sees half a file. ERR_INVALID naming the
 * tensor and field, ERR_IO naming the path, ERR_NOMEM. */
int st_write_f32(const char *path, const st_out_tensor *t, int count, const char *const *meta,
                 int nmeta, err *e);

#endif
