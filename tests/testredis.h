/* A scratch Redis server for the tests of the Redis backend: Debian's redis-server on a unix
 * socket in a fresh directory (no TCP port), with the append-only file fsynced on every write
 * (the persistence the README asks of a production Redis), so a restart keeps what a 202
 * promised. Tests that need it call test_redis_start() and skip, saying so, when redis-server
 * is not installed. Header-only, like testutil.h. */
#ifndef DENOISED_TESTREDIS_H
#define DENOISED_TESTREDIS_H

#include <fcntl.h>
#include <hiredis/hiredis.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

typedef struct test_redis {
  char dir[64];  /* the server's directory: socket, AOF, log */
  char url[128]; /* the socket path, as redis_url takes it */
  pid_t starter; /* the process that made the directory (and removes it) */
} test_redis;

/* Whether redis-server is on PATH. */
static inline int test_redis_installed(void) {
  return system("command -v redis-server >/dev/null 2>&1") == 0;
}

/* Starts (or restarts, on the same directory and files) the server; 0 when it answers PING
 * within 10 s. */
static inline int test_redis_launch(const test_redis *r) {
  const pid_t pid = fork();
  if (pid < 0)
    return -1;
  if (pid == 0) {
    char log[128];
    snprintf(log, sizeof log, "%s/redis.log", r->dir);
    char pidfile[128];
    snprintf(pidfile, sizeof pidfile, "%s/redis.pid", r->dir);
    setsid(); /* not in the test's process group: a test's crash does not take it down */
    /* nor holding the test's output open: ctest waits for everyone who holds it */
    const int null = open("/dev/null", O_RDWR);
    if (null >= 0) {
      dup2(null, 0);
      dup2(null, 1);
      dup2(null, 2);
    }
    /* nor any other descriptor: a server outliving a failed test kept a caller's lock file
     * locked through one it had inherited */
    for (int fd = 3; fd < 4096; fd++)
      close(fd);
    execlp("redis-server", "redis-server", "--port", "0", "--unixsocket", r->url,
           "--unixsocketperm", "700", "--dir", r->dir, "--save", "", "--appendonly", "yes",
           "--appendfsync", "always", "--logfile", log, "--pidfile", pidfile, (char *)NULL);
    _exit(127);
  }
  for (int i = 0; i < 200; i++) {
    redisContext *c = redisConnectUnix(r->url);
    if (c && !c->err) {
      redisReply *p = redisCommand(c, "PING");
      const int ok = p && p->type == REDIS_REPLY_STATUS;
      freeReplyObject(p);
      redisFree(c);
      if (ok)
        return 0;
    } else if (c) {
      redisFree(c);
    }
    usleep(50000);
  }
  return -1;
}

/* Stops the server (SHUTDOWN NOSAVE: the AOF already holds every write); 0 once it is gone. */
static inline int test_redis_shutdown(const test_redis *r) {
  redisContext *c = redisConnectUnix(r->url);
  if (!c || c->err) {
    if (c)
      redisFree(c);
    return 0; /* not running */
  }
  freeReplyObject(redisCommand(c, "SHUTDOWN NOSAVE"));
  redisFree(c);
  for (int i = 0; i < 200; i++) {
    if (access(r->url, F_OK) != 0)
      return 0;
    if (i == 20) { /* refused (a test left a password set): by its pid file */
      char pidfile[128];
      snprintf(pidfile, sizeof pidfile, "%s/redis.pid", r->dir);
      FILE *f = fopen(pidfile, "r");
      long pid = 0;
      if (f && fscanf(f, "%ld", &pid) == 1 && pid > 1)
        kill((pid_t)pid, SIGKILL);
      if (f)
        fclose(f);
      unlink(r->url);
    }
    usleep(50000);
  }
  return -1;
}

/* A daemon's arguments for the group on r under key prefix `prefix`: --redis-url,
 * --redis-prefix, then extra (NULL-terminated, may be NULL), into out (max entries, the last
 * a NULL); returns out. */
static inline const char **test_redis_args(const test_redis *r, const char *prefix,
                                           const char *const *extra, const char **out, int max) {
  int n = 0;
  out[n++] = "--redis-url";
  out[n++] = r->url;
  out[n++] = "--redis-prefix";
  out[n++] = prefix;
  for (int i = 0; extra && extra[i] && n < max - 1; i++)
    out[n++] = extra[i];
  out[n] = NULL;
  return out;
}

/* A fresh directory and a running server in it; -1 (and a message) if it cannot start. */
static inline int test_redis_start(test_redis *r) {
  memset(r, 0, sizeof *r);
  snprintf(r->dir, sizeof r->dir, "/tmp/denoised-redis-XXXXXX");
  if (!mkdtemp(r->dir))
    return -1;
  snprintf(r->url, sizeof r->url, "%s/redis.sock", r->dir);
  r->starter = getpid();
  if (test_redis_launch(r) != 0) {
    fprintf(stderr, "testredis: redis-server did not start (see %s/redis.log)\n", r->dir);
    return -1;
  }
  return 0;
}

/* Stops the server and removes its directory; only the process that started it does (Check
 * runs each test in a fork, whose exit must not end a server the next test needs). */
static inline void test_redis_stop(test_redis *r) {
  if (!r->dir[0] || getpid() != r->starter)
    return;
  test_redis_shutdown(r);
  char cmd[128];
  snprintf(cmd, sizeof cmd, "rm -rf %s", r->dir);
  if (system(cmd) != 0)
    fprintf(stderr, "testredis: could not remove %s\n", r->dir);
  r->dir[0] = 0;
}

#endif
