/* Error reporting shared by every engine module: a status code plus a message
 * buffer the caller owns. Library code never prints or exits; it fills this. */
#ifndef DENOISED_ERR_H
#define DENOISED_ERR_H

enum {
  ERR_OK = 0,
  ERR_INVALID = -1,     /* bad argument or bad input data */
  ERR_IO = -2,          /* file system failure */
  ERR_NOMEM = -3,       /* allocation failed */
  ERR_FORMAT = -4,      /* malformed file (safetensors, npy, png, json) */
  ERR_UNSUPPORTED = -5, /* valid but not implemented (config value, dtype) */
  ERR_CANCELLED = -6,   /* caller asked to stop */
  ERR_SHAPE = -7,       /* well-formed data of the wrong shape */
  ERR_NUMERIC = -8,     /* a computation produced NaN or infinity (the message says where) */
};

typedef struct err {
  int code;
  char msg[512];
} err;

/* Records code and a printf-style message in e (if non-NULL); returns code so
 * callers can write `return err_set(e, ERR_INVALID, "...")`. */
int err_set(err *e, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Prefixes the message already in e with more context ("loading x: ..."). */
int err_prefix(err *e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Appends context to the message already in e ("... at step 3 of 20"). */
int err_append(err *e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif
