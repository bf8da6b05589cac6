/* One connection to a Redis server, shared by the queue's Redis backend and store (internal to
 * queue/): the URL, the password, the timeouts, and re-making the connection after it broke.
 * hiredis contexts are not thread-safe, so every command holds the connection's lock. */
#ifndef DENOISED_QUEUE_REDISCONN_H
#define DENOISED_QUEUE_REDISCONN_H

#include <hiredis/hiredis.h>
#include <stddef.h>

#include "err.h"

typedef struct redisconn redisconn;

/* Splits a redis_url: host (or the socket path, with *port 0), port and database. URLs are
 * redis://HOST[:PORT][/DB] or an absolute unix socket path; a password in the URL is refused
 * (it would end up in logs and process listings). */
int redisconn_parse_url(const char *url, char *host, size_t hostn, int *port, int *db, err *e);

/* Connects, authenticates (password NULL: none) and selects the URL's database; a clear
 * ERR_IO naming the URL (never the password) when the server cannot be reached or refuses.
 * timeout_ms bounds connecting and every command (0: 5000). */
int redisconn_open(const char *url, const char *password, int timeout_ms, redisconn **out, err *e);
void redisconn_free(redisconn *c);

/* A command's reply (free with freeReplyObject), the connection re-made once if it had broken;
 * NULL with e set (QUEUE_UNAVAILABLE) when the server cannot be reached. An error reply is returned
 * as such. len NULL: the arguments are C strings. */
redisReply *redisconn_argv(redisconn *c, int argc, const char **argv, const size_t *len, err *e);

/* Called with the i-th reply of a pipeline; the callee frees it (freeReplyObject). */
typedef void (*redisconn_reply_fn)(void *user, int i, redisReply *r);

/* n commands of argc arguments each (C strings; the i-th's at argv + i * argc) sent together
 * and their replies read in order, each handed to fn as it comes: one round trip instead of n,
 * one reply in memory at a time. ERR_OK once every reply came (error replies included); else
 * e is set (QUEUE_UNAVAILABLE when the server is away) and the rest are not handed over. */
int redisconn_pipeline(redisconn *c, int n, int argc, const char **argv, redisconn_reply_fn fn,
                       void *user, err *e);

/* Names this connection (CLIENT SETNAME, again after every reconnect), so an operator's
 * CLIENT LIST shows which daemons group is which. */
int redisconn_set_name(redisconn *c, const char *name, err *e);

#endif
