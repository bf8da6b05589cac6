/* NumPy .npy files: read any little-endian float32/float64/int32/int64 array
 * (C order) into float32 or int64, write float32 or int64. Sizes checked against the file. */
#ifndef DENOISED_NPY_H
#define DENOISED_NPY_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"

#define NPY_MAX_DIMS 8

typedef struct npy_array {
  int ndim;
  int64_t shape[NPY_MAX_DIMS];
  int64_t count; /* product of shape */
  float *data;   /* malloc'ed, count floats; free with npy_array_free */
} npy_array;

/* Reads and converts to float32 (integers converted exactly where they fit). */
int npy_read_f32(const char *path, npy_array *out, err *e);
/* Reads integer (or integral float) data into int64; non-integral floats are an error. */
int npy_read_i64(const char *path, int64_t **data, int64_t *count, int *ndim,
                 int64_t shape[NPY_MAX_DIMS], err *e);
/* The same from memory (an upload); name labels the errors. */
int npy_parse_f32(const void *buf, size_t len, const char *name, npy_array *out, err *e);
void npy_array_free(npy_array *a);
/* ERR_INVALID "<what>: value I is not finite" for the first NaN or infinity of a. */
int npy_check_finite(const npy_array *a, const char *what, err *e);
/* An upload that must be finite float data of exactly this shape: npy_parse_f32, then
 * ERR_SHAPE "<name>: shape [..] where [..] is needed", then npy_check_finite. */
int npy_parse_f32_shaped(const void *buf, size_t len, const char *name, const int64_t *shape,
                         int ndim, npy_array *out, err *e);

int npy_write_f32(const char *path, const float *data, int ndim, const int64_t *shape, err *e);
/* The same for int64 data (token ids). */
int npy_write_i64(const char *path, const int64_t *data, int ndim, const int64_t *shape, err *e);
/* The bytes of the same file, malloc'ed. */
int npy_encode_f32(const float *data, int ndim, const int64_t *shape, uint8_t **out, size_t *len,
                   err *e);

#endif
