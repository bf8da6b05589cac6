/* A Redis connection for the queue's Redis backend and store (redisconn.h). */
#include "redisconn.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mem.h"
#include "queue.h"

struct redisconn {
  pthread_mutex_t mu;
  redisContext *c;
  char *password;
  int db;
  char url[512];  /* for messages: holds no password (refused in URLs) */
  char name[160]; /* CLIENT SETNAME after every (re)connect, or "" */
};

int redisconn_parse_url(const char *url, char *host, size_t hostn, int *port, int *db, err *e) {
  *port = 0;
  *db = 0;
  if (!url || !*url)
    return err_set(e, ERR_INVALID, "redis_url is empty");
  if (url[0] == '/') { /* a unix socket path */
    if (strlen(url) >= hostn)
      return err_set(e, ERR_INVALID, "redis_url: the socket path is too long");
    snprintf(host, hostn, "%s", url);
    return ERR_OK;
  }
  static const char scheme[] = "redis://";
  if (strncmp(url, scheme, sizeof scheme - 1) != 0)
    return err_set(e, ERR_INVALID,
                   "redis_url must be redis://HOST[:PORT][/DB] or a unix socket path");
  const char *h = url + sizeof scheme - 1;
  if (strchr(h, '@'))
    return err_set(e, ERR_INVALID,
                   "redis_url must not hold a password: set redis_password_file or "
                   "DENOISED_REDIS_PASSWORD");
  const char *colon = strrchr(h, ':'), *slash = strchr(h, '/');
  const char *hend = colon && (!slash || colon < slash) ? colon : slash ? slash : h + strlen(h);
  if (hend == h || (size_t)(hend - h) >= hostn)
    return err_set(e, ERR_INVALID, "redis_url '%s' has no host", url);
  memcpy(host, h, (size_t)(hend - h));
  host[hend - h] = 0;
  *port = 6379;
  if (hend == colon) {
    char *end;
    const long p = strtol(colon + 1, &end, 10);
    if (end == colon + 1 || (*end && *end != '/') || p < 1 || p > 65535)
      return err_set(e, ERR_INVALID, "redis_url '%s': the port must be in [1, 65535]", url);
    *port = (int)p;
  }
  if (slash && slash[1]) {
    char *end;
    const long d = strtol(slash + 1, &end, 10);
    if (*end || d < 0 || d > 1000000)
      return err_set(e, ERR_INVALID, "redis_url '%s': the database must be a number", url);
    *db = (int)d;
  }
  return ERR_OK;
}

/* AUTH and SELECT on a fresh connection; the password is never put into a message. */
static int setup(redisconn *c, err *e) {
  redisReply *r;
  if (c->password) {
    r = redisCommand(c->c, "AUTH %s", c->password);
    const int ok = r && r->type != REDIS_REPLY_ERROR;
    freeReplyObject(r);
    if (!ok)
      return err_set(e, ERR_IO, "redis %s: the server refused the password", c->url);
  }
  if (c->name[0]) /* best effort: a server whose ACL forbids it still works */
    freeReplyObject(redisCommand(c->c, "CLIENT SETNAME %s", c->name));
  if (c->db) {
    r = redisCommand(c->c, "SELECT %d", c->db);
    const int ok = r && r->type != REDIS_REPLY_ERROR;
    if (!ok)
      err_set(e, ERR_IO, "redis %s: SELECT %d: %s", c->url, c->db, r ? r->str : c->c->errstr);
    freeReplyObject(r);
    if (!ok)
      return ERR_IO;
  }
  return ERR_OK;
}

int redisconn_open(const char *url, const char *password, int timeout_ms, redisconn **out, err *e) {
  char host[512];
  int port, db;
  int rc = redisconn_parse_url(url, host, sizeof host, &port, &db, e);
  if (rc != ERR_OK)
    return rc;
  redisconn *c = mem_calloc(1, sizeof *c);
  if (!c)
    return err_set(e, ERR_NOMEM, "out of memory");
  pthread_mutex_init(&c->mu, NULL);
  c->db = db;
  snprintf(c->url, sizeof c->url, "%s", url);
  if (password && *password && !(c->password = mem_strdup(password))) {
    redisconn_free(c);
    return err_set(e, ERR_NOMEM, "out of memory");
  }
  const int ms = timeout_ms > 0 ? timeout_ms : 5000;
  const struct timeval tv = {.tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000};
  c->c = port ? redisConnectWithTimeout(host, port, tv) : redisConnectUnixWithTimeout(host, tv);
  if (!c->c || c->c->err) {
    rc = err_set(e, ERR_IO, "redis: cannot connect to %s: %s", url,
                 c->c ? c->c->errstr : "out of memory");
    redisconn_free(c);
    return rc;
  }
  redisSetTimeout(c->c, tv);
  if ((rc = setup(c, e)) != ERR_OK) {
    redisconn_free(c);
    return rc;
  }
  *out = c;
  return ERR_OK;
}

void redisconn_free(redisconn *c) {
  if (!c)
    return;
  if (c->c)
    redisFree(c->c);
  if (c->password) {
    memset(c->password, 0, strlen(c->password));
    free(c->password);
  }
  pthread_mutex_destroy(&c->mu);
  free(c);
}

redisReply *redisconn_argv(redisconn *c, int argc, const char **argv, const size_t *len, err *e) {
  pthread_mutex_lock(&c->mu);
  redisReply *r = NULL;
  int refused = 0;
  for (int attempt = 0; attempt < 2 && !r; attempt++) {
    /* a broken connection (server restarted, network cut) is re-made once per command */
    if (c->c->err) {
      if (redisReconnect(c->c) != REDIS_OK)
        break;
      if (setup(c, e) != ERR_OK) {
        refused = 1;
        break;
      }
    }
    r = redisCommandArgv(c->c, argc, argv, len);
  }
  if (r && r->type == REDIS_REPLY_ERROR && strncmp(r->str, "LOADING", 7) == 0) {
    /* a restarted server reads its append-only file: away for now, as above */
    err_set(e, QUEUE_UNAVAILABLE, "redis %s: %s", c->url, r->str);
    freeReplyObject(r);
    r = NULL;
    refused = 1;
  }
  if (!r && !refused) /* the server is away (restarting, network cut): worth retrying later */
    err_set(e, QUEUE_UNAVAILABLE, "redis %s: %s", c->url,
            c->c->errstr[0] ? c->c->errstr : "connection lost");
  pthread_mutex_unlock(&c->mu);
  return r;
}

int redisconn_pipeline(redisconn *c, int n, int argc, const char **argv, redisconn_reply_fn fn,
                       void *user, err *e) {
  pthread_mutex_lock(&c->mu);
  int rc = ERR_OK, sent = 0;
  if (c->c->err && (redisReconnect(c->c) != REDIS_OK || (rc = setup(c, e)) != ERR_OK)) {
    rc = rc ? rc : err_set(e, QUEUE_UNAVAILABLE, "redis %s: %s", c->url, c->c->errstr);
    pthread_mutex_unlock(&c->mu);
    return rc;
  }
  for (; sent < n; sent++)
    if (redisAppendCommandArgv(c->c, argc, argv + (size_t)sent * (size_t)argc, NULL) != REDIS_OK)
      break;
  for (int i = 0; i < sent; i++) {
    void *r = NULL;
    if (redisGetReply(c->c, &r) != REDIS_OK || !r) {
      rc = err_set(e, QUEUE_UNAVAILABLE, "redis %s: %s", c->url,
                   c->c->errstr[0] ? c->c->errstr : "connection lost");
      break; /* the connection is broken (err set): the next command re-makes it */
    }
    fn(user, i, r);
  }
  if (rc == ERR_OK && sent < n)
    rc = err_set(e, ERR_NOMEM, "redis %s: out of memory queueing commands", c->url);
  pthread_mutex_unlock(&c->mu);
  return rc;
}

int redisconn_set_name(redisconn *c, const char *name, err *e) {
  if (strlen(name) >= sizeof c->name || strpbrk(name, " \t\r\n"))
    return err_set(e, ERR_INVALID, "redis client name '%s' is too long or has blanks", name);
  pthread_mutex_lock(&c->mu);
  snprintf(c->name, sizeof c->name, "%s", name);
  pthread_mutex_unlock(&c->mu);
  const char *argv[] = {"CLIENT", "SETNAME", name};
  freeReplyObject(redisconn_argv(c, 3, argv, NULL, e)); /* best effort, as in setup */
  return ERR_OK;
}
