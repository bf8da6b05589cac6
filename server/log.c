/* Structured logs: one logfmt line per event (time, level, msg, then key=value pairs such as
 * req= and job=) to stderr or a file that SIGHUP reopens for log rotation. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

#include "internal.h"

static pthread_mutex_t log_mu = PTHREAD_MUTEX_INITIALIZER;
static FILE *log_file;
static char log_path[CONFIG_PATH_MAX];
static int log_min = LOG_INFO;

static const char *const level_names[] = {"debug", "info", "warn", "error"};

int log_open(const char *path, const char *level, err *e) {
  for (int i = 0; i < 4; i++)
    if (level && strcmp(level, level_names[i]) == 0)
      log_min = i;
  snprintf(log_path, sizeof log_path, "%s", path ? path : "");
  return log_reopen(e);
}

int log_reopen(err *e) {
  pthread_mutex_lock(&log_mu);
  int rc = ERR_OK;
  if (log_path[0]) {
    FILE *f = fopen(log_path, "a");
    if (!f) {
      rc = err_set(e, ERR_IO, "log_file %s: cannot open for appending", log_path);
    } else {
      setvbuf(f, NULL, _IOLBF, 0);
      if (log_file && log_file != stderr)
        fclose(log_file);
      log_file = f;
    }
  } else {
    log_file = stderr;
  }
  pthread_mutex_unlock(&log_mu);
  return rc;
}

void log_close(void) {
  pthread_mutex_lock(&log_mu);
  if (log_file && log_file != stderr)
    fclose(log_file);
  log_file = NULL;
  pthread_mutex_unlock(&log_mu);
}

int log_enabled(log_level l) {
  return (int)l >= log_min;
}

/* logfmt value: bare when it can be, else quoted with \" \\ \n escaped */
static void put_value(char *buf, size_t n, size_t *off, const char *v) {
  int bare = *v != 0;
  for (const char *p = v; *p && bare; p++)
    bare = *p > ' ' && *p != '"' && *p != '=' && *p != '\\' && (unsigned char)*p < 127;
  if (bare) {
    *off += (size_t)snprintf(buf + *off, *off < n ? n - *off : 0, "%s", v);
    return;
  }
  if (*off < n)
    buf[(*off)++] = '"';
  for (const char *p = v; *p && *off + 4 < n; p++) {
    if (*p == '"' || *p == '\\') {
      buf[(*off)++] = '\\';
      buf[(*off)++] = *p;
    } else if (*p == '\n') {
      buf[(*off)++] = '\\';
      buf[(*off)++] = 'n';
    } else if ((unsigned char)*p < ' ') {
      buf[(*off)++] = ' ';
    } else {
      buf[(*off)++] = *p;
    }
  }
  if (*off < n)
    buf[(*off)++] = '"';
}

void log_event(log_level l, const char *msg, ...) {
  if (!log_enabled(l))
    return;
  char line[4096];
  struct timeval tv;
  gettimeofday(&tv, NULL);
  struct tm tm;
  gmtime_r(&tv.tv_sec, &tm);
  size_t off = (size_t)snprintf(
      line, sizeof line,
      "time=%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ level=%s msg=", tm.tm_year + 1900, tm.tm_mon + 1,
      tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, (long)tv.tv_usec / 1000, level_names[l]);
  put_value(line, sizeof line - 2, &off, msg);
  va_list ap;
  va_start(ap, msg);
  for (;;) {
    const char *k = va_arg(ap, const char *);
    if (!k)
      break;
    const char *v = va_arg(ap, const char *);
    if (!v || !*v)
      continue;
    if (off + 2 < sizeof line - 2)
      off += (size_t)snprintf(line + off, sizeof line - 2 - off, " %s=", k);
    put_value(line, sizeof line - 2, &off, v);
  }
  va_end(ap);
  if (off > sizeof line - 2)
    off = sizeof line - 2;
  line[off++] = '\n';
  line[off] = 0;
  pthread_mutex_lock(&log_mu);
  FILE *f = log_file ? log_file : stderr;
  fputs(line, f);
  fflush(f);
  pthread_mutex_unlock(&log_mu);
}

void log_queue_cb(void *user, queue_log_level level, const char *job_id, const char *msg) {
  (void)user;
  log_event((log_level)level, msg, "job", job_id ? job_id : "", LOG_END);
}
