/* /metrics in the Prometheus text format (0.0.4): queue depth, jobs by state, images generated
 * and HTTP counters for the metrics scope; latency histograms and worker utilisation, which
 * time the model, for admins only. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api.h"

typedef struct buf {
  char *p;
  size_t n, cap;
  int oom;
} buf;

static void put(buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void put(buf *b, const char *fmt, ...) {
  if (b->oom)
    return;
  for (;;) {
    va_list ap;
    va_start(ap, fmt);
    int w = vsnprintf(b->p + b->n, b->cap - b->n, fmt, ap);
    va_end(ap);
    if (w < 0) {
      b->oom = 1;
      return;
    }
    if ((size_t)w < b->cap - b->n) {
      b->n += (size_t)w;
      return;
    }
    size_t cap = b->cap * 2 + (size_t)w;
    char *np = realloc(b->p, cap);
    if (!np) {
      b->oom = 1;
      return;
    }
    b->p = np;
    b->cap = cap;
  }
}

static void metric(buf *b, const char *name, const char *type, const char *help) {
  put(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void hist(buf *b, const char *name, const char *help, const queue_hist *h) {
  metric(b, name, "histogram", help);
  uint64_t cum = 0;
  for (int i = 0; i < QUEUE_HIST_BUCKETS; i++) {
    cum += h->counts[i];
    put(b, "%s_bucket{le=\"%g\"} %llu\n", name, h->bounds ? h->bounds[i] : 0.0,
        (unsigned long long)cum);
  }
  cum += h->counts[QUEUE_HIST_BUCKETS];
  put(b, "%s_bucket{le=\"+Inf\"} %llu\n%s_sum %.6f\n%s_count %llu\n", name, (unsigned long long)cum,
      name, h->sum, name, (unsigned long long)h->count);
}

/* What times the model or its runs: per-step and per-job durations, busy time (DeepPeep). */
static void timing_metrics(buf *b, const queue_stats *s) {
  metric(b, "denoised_worker_busy_seconds_total", "counter",
         "Worker time spent computing, summed over workers.");
  put(b, "denoised_worker_busy_seconds_total %.3f\n", s->busy_seconds);
  metric(b, "denoised_worker_utilisation", "gauge",
         "Busy worker time over available worker time since start (0..1).");
  put(b, "denoised_worker_utilisation %.4f\n",
      s->uptime > 0 && s->workers ? s->busy_seconds / (s->uptime * s->workers) : 0.0);
  hist(b, "denoised_step_seconds", "Wall time of one sampler step of a batch.", &s->step_seconds);
  hist(b, "denoised_job_seconds", "Submission to completion of succeeded jobs.", &s->job_seconds);
  hist(b, "denoised_queue_wait_seconds", "Submission to start.", &s->wait_seconds);
  metric(b, "denoised_constant_time_overruns_total", "counter",
         "Constant-time mode: step boundaries reached after their budget (evaluations slower "
         "than constant_time_eval_ms).");
  put(b, "denoised_constant_time_overruns_total %llu\n", (unsigned long long)s->pace_overruns);
}

char *api_metrics_text(const queue_stats *s, const api_http_stats *h, int internals) {
  buf b = {malloc(8192), 0, 8192, 0};
  if (!b.p)
    return NULL;
  b.p[0] = 0;
  metric(&b, "denoised_queue_depth", "gauge", "Jobs waiting for a worker.");
  put(&b, "denoised_queue_depth %d\n", s->queued);
  metric(&b, "denoised_jobs", "gauge", "Unfinished jobs by state.");
  put(&b, "denoised_jobs{state=\"queued\"} %d\ndenoised_jobs{state=\"running\"} %d\n", s->queued,
      s->running);
  metric(&b, "denoised_jobs_total", "counter", "Jobs by outcome since start.");
  put(&b,
      "denoised_jobs_total{state=\"submitted\"} %llu\ndenoised_jobs_total{state=\"succeeded\"} "
      "%llu\ndenoised_jobs_total{state=\"failed\"} %llu\ndenoised_jobs_total{state=\"cancelled\"} "
      "%llu\n",
      (unsigned long long)s->submitted, (unsigned long long)s->succeeded,
      (unsigned long long)s->failed, (unsigned long long)s->cancelled);
  metric(&b, "denoised_jobs_rejected_total", "counter", "Submissions refused with 429.");
  put(&b,
      "denoised_jobs_rejected_total{reason=\"queue_full\"} %llu\n"
      "denoised_jobs_rejected_total{reason=\"per_key_limit\"} %llu\n",
      (unsigned long long)s->rejected_full, (unsigned long long)s->rejected_limit);
  metric(&b, "denoised_images_generated_total", "counter", "Images written.");
  put(&b, "denoised_images_generated_total %llu\n", (unsigned long long)s->images_generated);
  metric(&b, "denoised_batches_total", "counter", "Forward batches run (one or more jobs).");
  put(&b, "denoised_batches_total %llu\n", (unsigned long long)s->batches);
  metric(&b, "denoised_batched_jobs_total", "counter", "Jobs that shared a batch with others.");
  put(&b, "denoised_batched_jobs_total %llu\n", (unsigned long long)s->batched_jobs);
  metric(&b, "denoised_retained_bytes", "gauge",
         "Estimated memory of the finished jobs kept (retained_budget_mb).");
  put(&b, "denoised_retained_bytes %llu\n", (unsigned long long)s->retained_bytes);
  metric(&b, "denoised_expired_early_total", "counter",
         "Finished jobs expired before result_ttl to stay within retained_budget_mb.");
  put(&b, "denoised_expired_early_total %llu\n", (unsigned long long)s->expired_early);
  metric(&b, "denoised_workers", "gauge", "Worker slots (jobs or batches computed at once).");
  put(&b, "denoised_workers %d\n", s->workers);
  metric(&b, "denoised_workers_busy", "gauge", "Worker slots computing now.");
  put(&b, "denoised_workers_busy %d\n", s->busy_workers);
  metric(&b, "denoised_threads_per_job", "gauge", "Compute threads per worker.");
  put(&b, "denoised_threads_per_job %d\n", s->threads_per_job);
  metric(&b, "denoised_uptime_seconds", "gauge", "Seconds since start.");
  put(&b, "denoised_uptime_seconds %.3f\n", s->uptime);
  metric(&b, "denoised_models", "gauge", "Models loaded.");
  put(&b, "denoised_models %d\n", s->models);
  if (internals)
    timing_metrics(&b, s);
  metric(&b, "denoised_http_requests_total", "counter", "HTTP responses by status class.");
  for (int i = 1; i <= 5; i++)
    put(&b, "denoised_http_requests_total{code=\"%dxx\"} %llu\n", i,
        (unsigned long long)h->requests[i]);
  metric(&b, "denoised_http_connections_total", "counter", "Connections accepted.");
  put(&b, "denoised_http_connections_total %llu\n", (unsigned long long)h->connections);
  metric(&b, "denoised_http_open_connections", "gauge", "Connections open now.");
  put(&b, "denoised_http_open_connections %llu\n", (unsigned long long)h->open_connections);
  metric(&b, "denoised_sse_streams", "gauge", "Event streams open now.");
  put(&b, "denoised_sse_streams %llu\n", (unsigned long long)h->sse_streams);
  metric(&b, "denoised_auth_failures_total", "counter", "Requests refused with 401 or 403.");
  put(&b, "denoised_auth_failures_total %llu\n", (unsigned long long)h->auth_failures);
  if (b.oom) {
    free(b.p);
    return NULL;
  }
  return b.p;
}
