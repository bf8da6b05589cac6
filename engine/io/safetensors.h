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
int st_read_i64(const st_file *f, const char *name, int64_t *dst, int64_t count, err *e);

#endif
