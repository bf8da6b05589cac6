/* Fault injection (SQLite's test VFS and malloc ideas): the queue runs jobs over a store whose
 * Nth write, fsync, rename or read fails, once or from then on (a disk that fills up), or with
 * its Nth allocation failing (queue, JSON, engine loaders and buffers: engine/core/mem.h), for
 * every N a fault-free run reaches. After each run the directory is opened again without
 * faults and checked: every accepted job is there, every state that was reported terminal is
 * still that state, every finished image is readable, every failure was reported with a
 * message. ASan checks that nothing leaks on any of these paths. The engine's loaders get the
 * same allocation sweep on their own. */
#include <errno.h>
#include <time.h>

#include "image.h"
#include "mem.h"
#include "model.h"
#include "npy.h"
#include "queue.h"
#include "safetensors.h"
#include "store.h"
#include "testutil.h"

#define NJOBS 3

typedef struct run_log {
  char id[NJOBS][QUEUE_ID_SIZE];
  int accepted[NJOBS];
  queue_state seen[NJOBS]; /* terminal state reported, or -1 */
  int images[NJOBS];
  int reported_errors, unreported_errors, refused;
  int stuck; /* an accepted job neither terminal nor waiting on the store when watching ended */
} run_log;

static queue *open_queue(const char *dir, store_fault *f, err *e) {
  queue_opts o = {.state_dir = dir,
                  .workers = 1,
                  .threads_per_job = 1,
                  .queue_max = 16,
                  .batch_max_images = 1,
                  .max_jobs_per_key = 16,
                  .result_ttl = 3600,
                  .url_prefix = "/v1/jobs/",
                  .store_fault = f,
                  .probe_every_ms = -1, /* probes only while failing: counts stay repeatable */
                  .retry_ms = 10};
  queue *q = NULL;
  if (queue_new(&o, &q, e) != ERR_OK)
    return NULL;
  char model[1024];
  queue_model_conf m = {"default", test_src_path(model, sizeof model, "tests/fixtures/gmm/mix3"),
                        NULL};
  if (queue_set_models(q, &m, 1, e) != ERR_OK || queue_start(q, e) != ERR_OK) {
    queue_free(q);
    return NULL;
  }
  return q;
}

static void make_spec(queue_spec *s, int k) {
  memset(s, 0, sizeof *s);
  snprintf(s->model, sizeof s->model, "default");
  snprintf(s->solver, sizeof s->solver, "ddim");
  s->steps = 4;
  s->options = json_object();
  s->batch = 2;
  s->seed = 100 + (uint64_t)k;
  s->height = s->width = 8;
}

/* Polls until every accepted job is terminal or waits on a refused write; records what a
 * client would have seen. */
static int watch(queue *q, run_log *r, int ms) {
  for (int t = 0; t < ms; t += 5) {
    int open = 0;
    for (int k = 0; k < NJOBS; k++) {
      if (!r->accepted[k])
        continue;
      queue_job_view v;
      err e = {0};
      if (queue_get(q, r->id[k], NULL, &v, &e) != ERR_OK) { /* out of memory: said, try again */
        ck_assert_msg(e.msg[0], "a failed job read without a message");
        open++;
        continue;
      }
      if (v.state == QUEUE_SUCCEEDED || v.state == QUEUE_FAILED || v.state == QUEUE_CANCELLED) {
        if ((int)r->seen[k] >= 0)
          ck_assert_int_eq(v.state, r->seen[k]); /* a terminal state never changes */
        r->seen[k] = v.state;
        r->images[k] = v.images;
        if (v.state == QUEUE_FAILED)
          v.error[0] ? r->reported_errors++ : r->unreported_errors++;
      } else {
        open += !v.store_error[0];
      }
      queue_view_clear(&v);
    }
    if (!open)
      return 0;
    struct timespec ts = {0, 5000000};
    nanosleep(&ts, NULL);
  }
  return 1;
}

/* Reads every finished image as a client would: a failed read is an error with a message. */
static void fetch_images(queue *q, const run_log *r) {
  for (int k = 0; k < NJOBS; k++)
    for (int i = 0; r->seen[k] == QUEUE_SUCCEEDED && i < r->images[k]; i++) {
      uint8_t *png = NULL;
      size_t len = 0;
      err e = {0};
      if (queue_image(q, r->id[k], NULL, i, &png, &len, &e) != ERR_OK)
        ck_assert_msg(e.msg[0], "a failed image read without a message");
      free(png);
    }
}

/* Submits, cancels one, and watches, then restarts with the faults still armed. */
static void run_faulty(const char *dir, store_fault *f, run_log *r) {
  memset(r, 0, sizeof *r);
  for (int k = 0; k < NJOBS; k++)
    r->seen[k] = (queue_state)-1;
  err e = {0};
  queue *q = open_queue(dir, f, &e);
  if (!q) { /* the store failed while opening: a clear refusal, nothing accepted */
    ck_assert_msg(e.msg[0], "queue_new failed without a message");
    r->refused = 1;
    return;
  }
  for (int k = 0; k < NJOBS; k++) {
    queue_spec s;
    make_spec(&s, k);
    queue_job_view v;
    err se = {0};
    if (queue_submit(q, &s, &v, &se) == ERR_OK) {
      r->accepted[k] = 1;
      snprintf(r->id[k], sizeof r->id[k], "%s", v.id);
      queue_view_clear(&v);
    } else {
      ck_assert_msg(se.msg[0], "a refused submission without a message");
      queue_spec_clear(&s);
    }
  }
  if (r->accepted[NJOBS - 1]) {
    err ce = {0};
    queue_job_view v;
    memset(&v, 0, sizeof v);
    int rc = queue_cancel(q, r->id[NJOBS - 1], NULL, &v, &ce);
    ck_assert(rc == ERR_OK || rc == QUEUE_CONFLICT || (rc == ERR_NOMEM && ce.msg[0]));
    queue_view_clear(&v);
  }
  r->stuck = watch(q, r, 5000);
  if (f && atomic_load(&f->sticky) && atomic_load(&f->injected)) {
    /* a disk that stays full: readiness says so; once space is back everything settles */
    char why[256] = "";
    for (int t = 0; t < 200 && queue_ready(q, why, sizeof why); t++) {
      struct timespec ts = {0, 5000000};
      nanosleep(&ts, NULL);
    }
    ck_assert_msg(strstr(why, "storage failing"), "readyz while the store fails: '%s'", why);
    for (int k = 0; k < STORE_FAULT_KINDS; k++)
      atomic_store(&f->fail_at[k], 0);
    watch(q, r, 5000);
    int ready = 0;
    for (int t = 0; t < 400 && !(ready = queue_ready(q, why, sizeof why)); t++) {
      struct timespec ts = {0, 5000000};
      nanosleep(&ts, NULL);
    }
    ck_assert_msg(ready, "not ready after the store recovered: %s", why);
  }
  fetch_images(q, r);
  queue_free(q);
  /* a restart with the fault still armed: recovery reads every record */
  q = open_queue(dir, f, &e);
  if (!q) {
    ck_assert_msg(e.msg[0], "queue_new failed without a message");
    return;
  }
  for (int k = 0; k < NJOBS; k++) {
    queue_job_view v;
    err ge = {0};
    if (!r->accepted[k] || queue_get(q, r->id[k], NULL, &v, &ge) != ERR_OK)
      continue; /* an unreadable record is skipped (and logged); the healthy reopen finds it */
    if ((int)r->seen[k] >= 0)
      ck_assert_int_eq(v.state, r->seen[k]);
    queue_view_clear(&v);
  }
  fetch_images(q, r);
  queue_free(q);
}

/* One run with faults armed throughout: f for the store, and with alloc_nth >= 0 the
 * allocation counter (0 only counts). */
static void run_jobs(const char *dir, store_fault *f, long alloc_nth, run_log *r) {
  if (alloc_nth >= 0)
    mem_fault_arm(alloc_nth, 0);
  run_faulty(dir, f, r);
  mem_fault_disarm();
}

/* Opens the directory again, healthy, and checks what the run reported. */
static void check_recovered(const char *dir, const run_log *r, const char *what) {
  err e = {0};
  queue *q = open_queue(dir, NULL, &e);
  ck_assert_msg(q, "%s: reopening: %s", what, e.msg);
  for (int k = 0; k < NJOBS; k++) {
    if (!r->accepted[k])
      continue;
    queue_job_view v;
    ck_assert_msg(queue_get(q, r->id[k], NULL, &v, &e) == ERR_OK, "%s: accepted job %d lost", what,
                  k);
    if ((int)r->seen[k] >= 0)
      ck_assert_msg(v.state == r->seen[k], "%s: job %d was reported %s, came back %s", what, k,
                    queue_state_name(r->seen[k]), queue_state_name(v.state));
    if (r->seen[k] == QUEUE_SUCCEEDED)
      for (int i = 0; i < r->images[k]; i++) {
        uint8_t *png = NULL;
        size_t len = 0;
        ck_assert_msg(queue_image(q, r->id[k], NULL, i, &png, &len, &e) == ERR_OK,
                      "%s: image %d of job %d lost: %s", what, i, k, e.msg);
        ck_assert(len > 8 && memcmp(png, "\x89PNG", 4) == 0);
        free(png);
      }
    queue_view_clear(&v);
  }
  queue_free(q);
}

/* One run with its faults in a fresh directory, then checked as a client would and after a
 * healthy reopen. */
static void run_checked(store_fault *f, long alloc_nth, const char *what, run_log *r) {
  char tmp[256], dir[300];
  test_tmpdir(tmp, sizeof tmp);
  snprintf(dir, sizeof dir, "%s/state", tmp);
  run_jobs(dir, f, alloc_nth, r);
  ck_assert_msg(r->unreported_errors == 0, "%s: a failed job without a message", what);
  check_recovered(dir, r, what);
  char cmd[400];
  snprintf(cmd, sizeof cmd, "rm -rf %s", tmp);
  ck_assert_int_eq(system(cmd), 0);
}

/* A fault-free run: the jobs succeed (the last is cancelled) and the counters count. */
static void run_clean(store_fault *counter, run_log *r) {
  run_checked(counter, counter ? -1 : 0, "no fault", r);
  for (int k = 0; k < NJOBS - 1; k++)
    ck_assert_int_eq(r->seen[k], QUEUE_SUCCEEDED);
}

static void sweep(store_fault_kind kind, int sticky, int errnum) {
  static const char *const names[] = {"write", "fsync", "rename", "read"};
  store_fault base;
  memset(&base, 0, sizeof base);
  run_log r;
  run_clean(&base, &r);
  const long calls = atomic_load(&base.calls[kind]);
  ck_assert_int_gt(calls, 0);
  int injected = 0;
  for (long n = 1; n <= calls + 1; n++) {
    store_fault f;
    memset(&f, 0, sizeof f);
    atomic_store(&f.fail_at[kind], n);
    atomic_store(&f.sticky, sticky);
    atomic_store(&f.errnum, errnum);
    char what[96];
    snprintf(what, sizeof what, "%s fault at call %ld%s", names[kind], n, sticky ? " on" : "");
    run_checked(&f, -1, what, &r);
    injected += atomic_load(&f.injected) > 0;
  }
  fprintf(stderr, "test_faults: %s%s: %ld calls in a clean run, %d runs with a fault\n",
          names[kind], sticky ? " (sticky)" : "", calls, injected);
  ck_assert_int_ge(injected, (int)calls - 1); /* the sweep reached (nearly) every call */
}

/* Which allocations a sweep fails: every one with DENOISED_ALLOC_STRIDE=1, else at most `runs`
 * spread evenly over the `calls` of a clean run; DENOISED_ALLOC_OFFSET moves the sample. */
static long alloc_stride(long calls, long runs) {
  const char *env = getenv("DENOISED_ALLOC_STRIDE");
  long stride = env ? atol(env) : calls / runs;
  return stride < 1 ? 1 : stride;
}

static long alloc_offset(long stride) {
  const char *off = getenv("DENOISED_ALLOC_OFFSET");
  return off ? labs(atol(off)) % stride : 0;
}

/* The queue's life with its Nth allocation failing, for N over a clean run's allocations. */
static void sweep_alloc(void) {
  run_log r;
  run_clean(NULL, &r);
  const long calls = mem_fault_calls();
  ck_assert_int_gt(calls, 100);
  const long stride = alloc_stride(calls, 150);
  int injected = 0, runs = 0;
  for (long n = 1 + alloc_offset(stride); n <= calls; n += stride, runs++) {
    char what[96];
    snprintf(what, sizeof what, "allocation %ld of %ld failing", n, calls);
    if (getenv("DENOISED_FAULT_TRACE"))
      fprintf(stderr, "--- %s\n", what);
    run_checked(NULL, n, what, &r);
    ck_assert_msg(!r.stuck, "%s: an accepted job never finished", what);
    injected += mem_fault_injected() > 0;
  }
  fprintf(stderr, "test_faults: allocations: %ld in a clean run, %d runs, %d with a fault\n", calls,
          runs, injected);
  ck_assert_int_ge(injected, runs * 9 / 10); /* the runs reached the allocation they aimed at */
}

/* A loader under test: loads, uses and frees, returning the error and a digest of what it
 * loaded. */
typedef int (*loader_fn)(const char *path, uint64_t *digest, err *e);

/* FNV-1a: a digest that tells whether a loader read the same values on every run */
#define DIGEST_START 14695981039346656037u

static uint64_t digest_bytes(uint64_t h, const void *p, size_t n) {
  const unsigned char *b = p;
  for (size_t i = 0; i < n; i++)
    h = (h ^ b[i]) * 1099511628211u;
  return h;
}

static int load_unet(const char *dir, uint64_t *digest, err *e) {
  model *m = NULL;
  if (model_load(dir, &m, e) != ERR_OK)
    return e->code;
  const model_info *mi = model_get_info(m);
  const int n = 1, h = 8, w = 8;
  size_t d = (size_t)mi->in_channels * h * w;
  float *x = calloc(d, sizeof *x), *out = calloc((size_t)mi->out_channels * h * w, sizeof *out);
  float t = 10.0f;
  int64_t label = 0;
  int rc = model_eval(m, x, n, h, w, &t, mi->num_classes ? &label : NULL, out, 1, e);
  *digest = digest_bytes(DIGEST_START, out, (size_t)mi->out_channels * h * w * 4);
  free(x);
  free(out);
  model_free(m);
  return rc;
}

static int load_npy(const char *path, uint64_t *digest, err *e) {
  npy_array a;
  int rc = npy_read_f32(path, &a, e);
  if (rc != ERR_OK)
    return rc;
  *digest = digest_bytes(DIGEST_START, a.data, (size_t)a.count * sizeof *a.data);
  npy_array_free(&a);
  return rc;
}

static int load_safetensors(const char *path, uint64_t *digest, err *e) {
  st_file *f = NULL;
  int rc = st_open(path, &f, e);
  if (rc != ERR_OK)
    return rc;
  *digest = DIGEST_START;
  for (int i = 0; i < st_count(f); i++) {
    const char *name = st_info_at(f, i)->name;
    *digest = digest_bytes(*digest, name, strlen(name));
  }
  st_close(f);
  return ERR_OK;
}

/* Every allocation of one load failing in turn: each is an error with a message or (where a
 * library copes with it) the same result, never a crash or a leak (ASan). */
static void sweep_loader(const char *what, loader_fn fn, const char *rel) {
  char path[1024];
  test_src_path(path, sizeof path, rel);
  err e = {0};
  uint64_t want = 0;
  mem_fault_arm(0, 0);
  int rc = fn(path, &want, &e);
  const long calls = mem_fault_calls();
  mem_fault_disarm();
  ck_assert_msg(rc == ERR_OK, "%s: %s", what, e.msg);
  ck_assert_int_gt(calls, 0);
  int coped = 0, runs = 0;
  const long stride = alloc_stride(calls, 400);
  for (long n = 1 + alloc_offset(stride); n <= calls; n += stride, runs++) {
    err fe = {0};
    if (getenv("DENOISED_FAULT_TRACE"))
      fprintf(stderr, "--- %s: allocation %ld\n", what, n);
    mem_fault_arm(n, 0);
    uint64_t got = 0;
    rc = fn(path, &got, &fe);
    long injected = mem_fault_injected();
    mem_fault_disarm();
    ck_assert_int_eq(injected, 1);
    if (rc == ERR_OK)
      ck_assert_msg(got == want, "%s: allocation %ld of %ld failed unnoticed", what, n, calls);
    else
      ck_assert_msg(fe.msg[0], "%s: allocation %ld failed without a message (code %d)", what, n,
                    rc);
    coped += rc == ERR_OK;
  }
  fprintf(stderr, "test_faults: %s: %ld allocations, %d runs with one failing (%d coped with)\n",
          what, calls, runs, coped);
}

START_TEST(write_faults_once) {
  sweep(STORE_FAULT_WRITE, 0, EIO);
}
END_TEST

START_TEST(disk_fills_up) {
  sweep(STORE_FAULT_WRITE, 1, ENOSPC);
}
END_TEST

START_TEST(fsync_faults) {
  sweep(STORE_FAULT_FSYNC, 0, EIO);
  sweep(STORE_FAULT_FSYNC, 1, EIO);
}
END_TEST

START_TEST(rename_faults) {
  sweep(STORE_FAULT_RENAME, 0, EIO);
  sweep(STORE_FAULT_RENAME, 1, EROFS);
}
END_TEST

START_TEST(read_faults) {
  sweep(STORE_FAULT_READ, 0, EIO);
}
END_TEST

START_TEST(queue_allocation_faults) {
  sweep_alloc();
}
END_TEST

START_TEST(loader_allocation_faults) {
  sweep_loader("unet model", load_unet, "tests/fixtures/unet/cifar_small");
  sweep_loader("class-conditional unet", load_unet, "tests/fixtures/unet/classcond_small");
  sweep_loader("gmm model", load_unet, "tests/fixtures/gmm/mix3");
  sweep_loader("npy", load_npy, "tests/fixtures/unet/cifar_small/input.npy");
  sweep_loader("safetensors", load_safetensors,
               "tests/fixtures/unet/cifar_small/diffusion_pytorch_model.safetensors");
}
END_TEST

START_TEST(fault_spec_parsing) {
  store_fault f;
  err e = {0};
  ck_assert_int_eq(store_fault_parse("write:40:sticky:ENOSPC", &f, &e), ERR_OK);
  ck_assert_int_eq(atomic_load(&f.fail_at[STORE_FAULT_WRITE]), 40);
  ck_assert_int_eq(atomic_load(&f.sticky), 1);
  ck_assert_int_eq(atomic_load(&f.errnum), ENOSPC);
  ck_assert_int_eq(store_fault_parse("fsync:3", &f, &e), ERR_OK);
  ck_assert_int_eq(atomic_load(&f.sticky), 0);
  ck_assert_int_ne(store_fault_parse("disk:3", &f, &e), ERR_OK);
  ck_assert_ptr_nonnull(strstr(e.msg, "KIND:N"));
  ck_assert_int_ne(store_fault_parse("write:0", &f, &e), ERR_OK);
  ck_assert_int_ne(store_fault_parse("write:2:often", &f, &e), ERR_OK);
  ck_assert_ptr_nonnull(strstr(e.msg, "often"));
}
END_TEST

Suite *test_suite(void) {
  Suite *s = suite_create("faults");
  TCase *tc = tcase_create("store");
  tcase_set_timeout(tc, 600);
  tcase_add_test(tc, fault_spec_parsing);
  tcase_add_test(tc, write_faults_once);
  tcase_add_test(tc, disk_fills_up);
  tcase_add_test(tc, fsync_faults);
  tcase_add_test(tc, rename_faults);
  tcase_add_test(tc, read_faults);
  suite_add_tcase(s, tc);
  /* jansson's own allocations are not swept: 2.14 asserts in its lexer (lex_scan_string) when
   * one fails mid-string, so such a sweep would test jansson rather than us */
  TCase *alloc = tcase_create("alloc");
  tcase_set_timeout(alloc, 600);
  tcase_add_test(alloc, loader_allocation_faults);
  tcase_add_test(alloc, queue_allocation_faults);
  suite_add_tcase(s, alloc);
  return s;
}
