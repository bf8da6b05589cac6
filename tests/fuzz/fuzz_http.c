/* libFuzzer harness: the request target (path and query) as the daemon parses it, through the
 * real front end: libmicrohttpd's request line parsing, server/http.c's unescaping, routing,
 * job ids, image indices and query values (limit, cursor, state), over loopback to an
 * in-process `denoised serve` (the default model, no workers, nothing ever computed). The first
 * byte picks the method, the rest is the target (CR and LF replaced, so every request is
 * complete). Every request gets an answer, and never a 500. */
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

#include "../../server/internal.h"
#include "fuzz_api.h"

static srv s;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  err e = {0};
  if (log_open("/dev/null", "error", &e))
    fuzz_api_fail("log", &e);
  fuzz_api_open(&s.api);
  s.q = s.api.q;
  config_defaults(&s.cfg);
  if (config_set_flag(&s.cfg, "listen", "127.0.0.1:0", &e) || config_finalize(&s.cfg, &e))
    fuzz_api_fail("config", &e);
  s.listen_fd = -1;
  pthread_rwlock_init(&s.auth_lock, NULL);
  if (http_start(&s, &e))
    fuzz_api_fail("listen", &e);
  return 0;
}

/* A connected socket with the request sent. At over 1000 connections a second the client side
 * can run out of local ports (each closed connection holds its tuple for a minute), which says
 * nothing about the daemon: the harness waits for ports to free, up to 20 s, before it gives up. */
static int send_request(const char *req, size_t len) {
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)s.port)};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  for (int attempt = 0; attempt < 100; attempt++) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof a) == 0 &&
        send(fd, req, len, MSG_NOSIGNAL) == (ssize_t)len)
      return fd;
    int why = errno;
    if (fd >= 0)
      close(fd);
    if (attempt == 99) {
      fprintf(stderr, "fuzz_http: cannot reach the daemon: %s\n", strerror(why));
      abort();
    }
    usleep(200000);
  }
  return -1;
}

/* Reads the whole answer (the server closes after it); 0 if none came within 10 s. */
static size_t exchange(const char *req, size_t len, char *resp, size_t cap) {
  int fd = send_request(req, len);
  size_t n = 0;
  for (;;) {
    struct pollfd p = {.fd = fd, .events = POLLIN};
    if (poll(&p, 1, 10000) != 1)
      break;
    ssize_t got = recv(fd, resp + n, cap - 1 - n, 0);
    if (got <= 0)
      break;
    n += (size_t)got;
    if (n == cap - 1)
      break; /* the status line is all that is checked */
  }
  /* close with a reset: the client keeps no TIME_WAIT entry for the port */
  struct linger now = {.l_onoff = 1, .l_linger = 0};
  setsockopt(fd, SOL_SOCKET, SO_LINGER, &now, sizeof now);
  close(fd);
  resp[n] = 0;
  return n;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static const char *const methods[] = {"GET", "HEAD", "DELETE", "OPTIONS", "POST", "PUT"};
  if (size < 1 || size > 2000)
    return 0;
  char req[2200], resp[4096];
  const char *m = methods[data[0] % 6];
  int n = snprintf(req, sizeof req, "%s ", m);
  for (size_t i = 1; i < size; i++) /* no line breaks: the request must stay one request */
    req[n++] = data[i] == '\r' || data[i] == '\n' ? '_' : (char)data[i];
  /* a body of one byte that is never valid JSON: no job is ever accepted */
  const int body = strcmp(m, "POST") == 0 || strcmp(m, "PUT") == 0;
  n += snprintf(req + n, sizeof req - (size_t)n,
                " HTTP/1.1\r\nHost: fuzz\r\nConnection: close\r\n%s\r\n%s",
                body ? "Content-Length: 1\r\n" : "", body ? "x" : "");
  size_t got = exchange(req, (size_t)n, resp, sizeof resp);
  if (got == 0) {
    /* libmicrohttpd drops a connection over the per-address limit without an answer; after
     * ~1e5 connections a few may still be winding down: one retry tells that from a hang */
    usleep(200000);
    got = exchange(req, (size_t)n, resp, sizeof resp);
  }
  int printable = size > 1 && data[1] == '/';
  for (size_t i = 1; i < size && printable; i++)
    printable = data[i] > ' ' && data[i] < 0x7f;
  if (got == 0 && printable)
    abort(); /* a well-formed request line went unanswered */
  if (strncmp(resp, "HTTP/1.1 500", 12) == 0)
    abort();
  return 0;
}
