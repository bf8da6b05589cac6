/* Error helpers: format messages into the caller's err value. */
#include "err.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

int err_set(err *e, int code, const char *fmt, ...) {
  if (e) {
    va_list ap;
    va_start(ap, fmt);
    e->code = code;
    vsnprintf(e->msg, sizeof e->msg, fmt, ap);
    va_end(ap);
  }
  return code;
}

int err_prefix(err *e, const char *fmt, ...) {
  if (!e)
    return ERR_INVALID;
  char head[256], old[sizeof e->msg];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(head, sizeof head, fmt, ap);
  va_end(ap);
  memcpy(old, e->msg, sizeof old);
  snprintf(e->msg, sizeof e->msg, "%s: %s", head, old);
  return e->code;
}

int err_append(err *e, const char *fmt, ...) {
  if (!e)
    return ERR_INVALID;
  size_t len = strlen(e->msg);
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(e->msg + len, sizeof e->msg - len, fmt, ap);
  va_end(ap);
  return e->code;
}
