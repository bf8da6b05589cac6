/* The in-memory queue backend (backend.h): one process's runnable jobs and event logs. Arrays
 * rather than lists: a queue holds at most queue_max jobs and a log a few dozen events, and
 * ids sort by creation time, so new logs land at the end of the sorted index. */
#include "backend.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "mem.h"

/* A queued or claimed job. */
typedef struct mem_slot {
  qbackend_id id;
  uint64_t order;  /* first push: a job put back regains this place */
  uint64_t token;  /* the claim's fencing token (claimed slots) */
  double deadline; /* when the lease runs out (claimed slots) */
  int cancel;      /* a stop was asked for (claimed slots) */
} mem_slot;

typedef struct mem_log {
  qbackend_id id;
  qbackend_event *ev; /* by seq */
  int n, cap, ntransient;
} mem_log;

typedef struct mem_backend {
  qbackend base;
  pthread_mutex_t mu;
  qbackend_mem_opts o;
  mem_slot *queued; /* by order */
  int nqueued, capqueued;
  mem_slot *claimed; /* unordered */
  int nclaimed, capclaimed;
  uint64_t next_order, next_token;
  mem_log **logs; /* by id */
  int nlogs, caplogs;
} mem_backend;

static double mono_now(void *user) {
  (void)user;
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Room for one more element in an array of n of *cap. */
static int grow(void **arr, int n, int *cap, size_t size) {
  if (n < *cap)
    return ERR_OK;
  const int c = *cap ? 2 * *cap : 16;
  void *p = mem_realloc(*arr, (size_t)c * size);
  if (!p)
    return ERR_NOMEM;
  *arr = p;
  *cap = c;
  return ERR_OK;
}

static int find_slot(const mem_slot *s, int n, const char *id) {
  for (int i = 0; i < n; i++)
    if (strcmp(s[i].id, id) == 0)
      return i;
  return -1;
}

/* Inserts s into the queue at its order (lock held; room reserved). */
static void insert_queued(mem_backend *m, const mem_slot *s) {
  int lo = 0, hi = m->nqueued;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (m->queued[mid].order < s->order)
      lo = mid + 1;
    else
      hi = mid;
  }
  memmove(m->queued + lo + 1, m->queued + lo, (size_t)(m->nqueued - lo) * sizeof *m->queued);
  m->queued[lo] = *s;
  m->nqueued++;
}

static void remove_at(mem_slot *s, int *n, int i) {
  memmove(s + i, s + i + 1, (size_t)(*n - i - 1) * sizeof *s);
  (*n)--;
}

/* ---- runnable jobs ---- */

static int mem_push(qbackend *b, const char *id, err *e) {
  mem_backend *m = (mem_backend *)b;
  if (strlen(id) >= QUEUE_ID_SIZE)
    return err_set(e, ERR_INVALID, "job id '%.40s...' is too long", id);
  pthread_mutex_lock(&m->mu);
  int rc = ERR_OK;
  if (find_slot(m->queued, m->nqueued, id) >= 0 || find_slot(m->claimed, m->nclaimed, id) >= 0)
    rc = err_set(e, QBACKEND_EXISTS, "job '%s' is queued or claimed already", id);
  else if (grow((void **)&m->queued, m->nqueued, &m->capqueued, sizeof *m->queued))
    rc = err_set(e, ERR_NOMEM, "out of memory");
  if (!rc) {
    mem_slot s = {.order = m->next_order++};
    memcpy(s.id, id, strlen(id) + 1);
    m->queued[m->nqueued++] = s;
  }
  pthread_mutex_unlock(&m->mu);
  return rc;
}

static int mem_remove(qbackend *b, const char *id) {
  mem_backend *m = (mem_backend *)b;
  pthread_mutex_lock(&m->mu);
  const int i = find_slot(m->queued, m->nqueued, id);
  if (i >= 0)
    remove_at(m->queued, &m->nqueued, i);
  pthread_mutex_unlock(&m->mu);
  return i >= 0;
}

static int mem_count(qbackend *b) {
  mem_backend *m = (mem_backend *)b;
  pthread_mutex_lock(&m->mu);
  const int n = m->nqueued;
  pthread_mutex_unlock(&m->mu);
  return n;
}

static int mem_position(qbackend *b, const char *id) {
  mem_backend *m = (mem_backend *)b;
  pthread_mutex_lock(&m->mu);
  const int i = find_slot(m->queued, m->nqueued, id);
  pthread_mutex_unlock(&m->mu);
  return i + 1;
}

static int mem_peek(qbackend *b, int from, int max, qbackend_id *ids) {
  mem_backend *m = (mem_backend *)b;
  int n = 0;
  pthread_mutex_lock(&m->mu);
  for (int i = from < 0 ? 0 : from; i < m->nqueued && n < max; i++)
    memcpy(ids[n++], m->queued[i].id, QUEUE_ID_SIZE);
  pthread_mutex_unlock(&m->mu);
  return n;
}

static int mem_claim(qbackend *b, const char *id, int lease_ms, uint64_t *token, err *e) {
  mem_backend *m = (mem_backend *)b;
  if (lease_ms <= 0)
    return err_set(e, ERR_INVALID, "a lease must be positive (%d ms)", lease_ms);
  pthread_mutex_lock(&m->mu);
  int rc = ERR_OK;
  const int i = find_slot(m->queued, m->nqueued, id);
  if (i < 0)
    rc = err_set(e, QBACKEND_GONE, "job '%s' is not queued", id);
  else if (grow((void **)&m->claimed, m->nclaimed, &m->capclaimed, sizeof *m->claimed))
    rc = err_set(e, ERR_NOMEM, "out of memory");
  if (!rc) {
    mem_slot s = m->queued[i];
    remove_at(m->queued, &m->nqueued, i);
    s.token = ++m->next_token;
    s.deadline = m->o.clock(m->o.clock_user) + lease_ms / 1000.0;
    m->claimed[m->nclaimed++] = s;
    *token = s.token;
  }
  pthread_mutex_unlock(&m->mu);
  return rc;
}

/* The claim token holds on id, if its lease has not run out (lock held); -1 otherwise. */
static int held_claim(mem_backend *m, const char *id, uint64_t token, double now) {
  for (int i = 0; i < m->nclaimed; i++)
    if (m->claimed[i].token == token && strcmp(m->claimed[i].id, id) == 0)
      return m->claimed[i].deadline > now ? i : -1;
  return -1;
}

/* The common part of renew, complete and release: what to do with a held claim. */
enum { LEASE_RENEW, LEASE_COMPLETE, LEASE_RELEASE };

static int end_or_renew(qbackend *b, const char *id, uint64_t token, int lease_ms, int what,
                        err *e) {
  mem_backend *m = (mem_backend *)b;
  pthread_mutex_lock(&m->mu);
  const double now = m->o.clock(m->o.clock_user);
  const int i = held_claim(m, id, token, now);
  int rc = ERR_OK;
  if (i < 0)
    rc = err_set(e, QBACKEND_GONE, "the claim on job '%s' is lost (its lease ran out)", id);
  else if (what == LEASE_RELEASE &&
           grow((void **)&m->queued, m->nqueued, &m->capqueued, sizeof *m->queued))
    rc = err_set(e, ERR_NOMEM, "out of memory");
  if (!rc && what == LEASE_RENEW)
    m->claimed[i].deadline = now + lease_ms / 1000.0;
  if (!rc && what == LEASE_RELEASE)
    insert_queued(m, &m->claimed[i]);
  if (!rc && what != LEASE_RENEW)
    remove_at(m->claimed, &m->nclaimed, i);
  pthread_mutex_unlock(&m->mu);
  return rc;
}

static int mem_renew(qbackend *b, const char *id, uint64_t token, int lease_ms, err *e) {
  if (lease_ms <= 0)
    return err_set(e, ERR_INVALID, "a lease must be positive (%d ms)", lease_ms);
  return end_or_renew(b, id, token, lease_ms, LEASE_RENEW, e);
}

static int mem_complete(qbackend *b, const char *id, uint64_t token, err *e) {
  return end_or_renew(b, id, token, 0, LEASE_COMPLETE, e);
}

static int mem_release(qbackend *b, const char *id, uint64_t token, err *e) {
  return end_or_renew(b, id, token, 0, LEASE_RELEASE, e);
}

static int mem_reclaim(qbackend *b, int max, qbackend_id *ids) {
  mem_backend *m = (mem_backend *)b;
  int n = 0;
  pthread_mutex_lock(&m->mu);
  const double now = m->o.clock(m->o.clock_user);
  for (int i = 0; i < m->nclaimed;) {
    if (m->claimed[i].deadline > now ||
        grow((void **)&m->queued, m->nqueued, &m->capqueued, sizeof *m->queued)) {
      i++;
      continue;
    }
    if (n < max)
      memcpy(ids[n], m->claimed[i].id, QUEUE_ID_SIZE);
    n++;
    insert_queued(m, &m->claimed[i]);
    remove_at(m->claimed, &m->nclaimed, i);
  }
  pthread_mutex_unlock(&m->mu);
  return n;
}

/* ---- event logs ---- */

/* Where id's log is or would go in the index (lock held); 1 if found. */
static int log_index(const mem_backend *m, const char *id, int *pos) {
  int lo = 0, hi = m->nlogs;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    const int c = strcmp(m->logs[mid]->id, id);
    if (c == 0) {
      *pos = mid;
      return 1;
    }
    if (c < 0)
      lo = mid + 1;
    else
      hi = mid;
  }
  *pos = lo;
  return 0;
}

static mem_log *find_log(const mem_backend *m, const char *id) {
  int pos;
  return log_index(m, id, &pos) ? m->logs[pos] : NULL;
}

/* id's log, created if missing (lock held); NULL out of memory. */
static mem_log *open_log(mem_backend *m, const char *id) {
  int pos;
  if (log_index(m, id, &pos))
    return m->logs[pos];
  mem_log *l = mem_calloc(1, sizeof *l);
  if (!l || grow((void **)&m->logs, m->nlogs, &m->caplogs, sizeof *m->logs)) {
    free(l);
    return NULL;
  }
  memcpy(l->id, id, strlen(id) + 1);
  memmove(m->logs + pos + 1, m->logs + pos, (size_t)(m->nlogs - pos) * sizeof *m->logs);
  m->logs[pos] = l;
  m->nlogs++;
  return l;
}

/* Drops transient events of l, oldest first, until keep remain. */
static void drop_transient(mem_log *l, int keep) {
  for (int i = 0; i < l->n && l->ntransient > keep;) {
    if (l->ev[i].lasting) {
      i++;
      continue;
    }
    free(l->ev[i].data);
    memmove(l->ev + i, l->ev + i + 1, (size_t)(l->n - i - 1) * sizeof *l->ev);
    l->n--;
    l->ntransient--;
  }
}

static int mem_append(qbackend *b, const char *id, uint64_t seq, const char *type, const char *data,
                      int lasting, err *e) {
  mem_backend *m = (mem_backend *)b;
  if (strlen(id) >= QUEUE_ID_SIZE || strlen(type) >= QBACKEND_TYPE_SIZE)
    return err_set(e, ERR_INVALID, "event '%.20s' of job '%.40s': name too long", type, id);
  char *copy = mem_strdup(data ? data : "");
  if (!copy)
    return err_set(e, ERR_NOMEM, "out of memory");
  pthread_mutex_lock(&m->mu);
  mem_log *l = open_log(m, id);
  int rc = ERR_OK;
  if (!l || grow((void **)&l->ev, l->n, &l->cap, sizeof *l->ev))
    rc = err_set(e, ERR_NOMEM, "out of memory");
  else if (l->n && seq <= l->ev[l->n - 1].seq)
    rc = err_set(e, QBACKEND_ORDER, "event %llu of job '%s' does not follow event %llu",
                 (unsigned long long)seq, id, (unsigned long long)l->ev[l->n - 1].seq);
  else if (!seq)
    rc = err_set(e, QBACKEND_ORDER, "event numbers of job '%s' start at 1", id);
  if (!rc) {
    qbackend_event *ev = &l->ev[l->n++];
    ev->seq = seq;
    memcpy(ev->type, type, strlen(type) + 1);
    ev->data = copy;
    ev->lasting = lasting != 0;
    copy = NULL;
    l->ntransient += !lasting;
    drop_transient(l, m->o.transient_max);
  }
  pthread_mutex_unlock(&m->mu);
  free(copy);
  return rc;
}

/* Copies of l's events from index i on (lock held); the count, -1 out of memory. */
static int copy_events(const mem_log *l, int i, int lasting_only, qbackend_event *out) {
  int n = 0;
  for (; i < l->n; i++) {
    if (lasting_only && !l->ev[i].lasting)
      continue;
    out[n] = l->ev[i];
    if (!(out[n].data = mem_strdup(l->ev[i].data))) {
      while (n-- > 0) /* the array itself is the caller's */
        free(out[n].data);
      return -1;
    }
    n++;
  }
  return n;
}

static int mem_read(qbackend *b, const char *id, uint64_t after, int lasting_only,
                    qbackend_event **evs, int *n, err *e) {
  mem_backend *m = (mem_backend *)b;
  *evs = NULL;
  *n = 0;
  pthread_mutex_lock(&m->mu);
  const mem_log *l = find_log(m, id);
  int lo = 0, hi = l ? l->n : 0; /* the first event after `after` */
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (l->ev[mid].seq <= after)
      lo = mid + 1;
    else
      hi = mid;
  }
  int rc = ERR_OK;
  if (l && lo < l->n) {
    qbackend_event *out = mem_malloc((size_t)(l->n - lo) * sizeof *out);
    const int got = out ? copy_events(l, lo, lasting_only, out) : -1;
    if (got < 0) {
      free(out);
      rc = err_set(e, ERR_NOMEM, "out of memory");
    } else if (got == 0) {
      free(out);
    } else {
      *evs = out;
      *n = got;
    }
  }
  pthread_mutex_unlock(&m->mu);
  return rc;
}

static void mem_trim(qbackend *b, const char *id, int keep_transient) {
  mem_backend *m = (mem_backend *)b;
  pthread_mutex_lock(&m->mu);
  mem_log *l = find_log(m, id);
  if (l)
    drop_transient(l, keep_transient < 0 ? 0 : keep_transient);
  pthread_mutex_unlock(&m->mu);
}

static void log_free(mem_log *l) {
  for (int i = 0; i < l->n; i++)
    free(l->ev[i].data);
  free(l->ev);
  free(l);
}

/* The claimed slot of id (lock held), or NULL. */
static mem_slot *claimed_slot(mem_backend *m, const char *id) {
  const int i = find_slot(m->claimed, m->nclaimed, id);
  return i < 0 ? NULL : &m->claimed[i];
}

static int mem_cancel_request(qbackend *b, const char *id) {
  mem_backend *m = (mem_backend *)b;
  pthread_mutex_lock(&m->mu);
  mem_slot *s = claimed_slot(m, id);
  if (s)
    s->cancel = 1;
  pthread_mutex_unlock(&m->mu);
  return s != NULL;
}

static int mem_cancel_requested(qbackend *b, const char *id) {
  mem_backend *m = (mem_backend *)b;
  pthread_mutex_lock(&m->mu);
  const mem_slot *s = claimed_slot(m, id);
  const int asked = s && s->cancel;
  pthread_mutex_unlock(&m->mu);
  return asked;
}

static void mem_drop(qbackend *b, const char *id) {
  mem_backend *m = (mem_backend *)b;
  pthread_mutex_lock(&m->mu);
  int pos;
  mem_log *l = log_index(m, id, &pos) ? m->logs[pos] : NULL;
  if (l) {
    memmove(m->logs + pos, m->logs + pos + 1, (size_t)(m->nlogs - pos - 1) * sizeof *m->logs);
    m->nlogs--;
  }
  pthread_mutex_unlock(&m->mu);
  if (l)
    log_free(l);
}

static void mem_free(qbackend *b) {
  mem_backend *m = (mem_backend *)b;
  if (!m)
    return;
  for (int i = 0; i < m->nlogs; i++)
    log_free(m->logs[i]);
  free(m->logs);
  free(m->queued);
  free(m->claimed);
  pthread_mutex_destroy(&m->mu);
  free(m);
}

void qbackend_events_free(qbackend_event *evs, int n) {
  for (int i = 0; i < n; i++)
    free(evs[i].data);
  free(evs);
}

static const qbackend_ops mem_ops = {
    .push = mem_push,
    .remove = mem_remove,
    .count = mem_count,
    .position = mem_position,
    .peek = mem_peek,
    .claim = mem_claim,
    .renew = mem_renew,
    .complete = mem_complete,
    .release = mem_release,
    .reclaim = mem_reclaim,
    .cancel_request = mem_cancel_request,
    .cancel_requested = mem_cancel_requested,
    .append = mem_append,
    .read = mem_read,
    .trim = mem_trim,
    .drop = mem_drop,
    .free = mem_free,
};

int qbackend_mem_open(const qbackend_mem_opts *o, qbackend **out, err *e) {
  mem_backend *m = mem_calloc(1, sizeof *m);
  if (!m)
    return err_set(e, ERR_NOMEM, "out of memory");
  m->base.ops = &mem_ops;
  if (o)
    m->o = *o;
  if (m->o.transient_max <= 0)
    m->o.transient_max = 64;
  if (!m->o.clock)
    m->o.clock = mono_now;
  m->next_order = 1;
  pthread_mutex_init(&m->mu, NULL);
  *out = &m->base;
  return ERR_OK;
}
