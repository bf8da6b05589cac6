/* Fork-join task runner on pthreads. Threads are started per call: cheap
 * next to a convolution, and it keeps the engine free of global state. */
#include "pool.h"

#include <pthread.h>
#include <stdatomic.h>

#define POOL_MAX_THREADS 64

typedef struct pool_job {
  pool_task_fn fn;
  void *ctx;
  int ntasks;
  atomic_int next;
} pool_job;

typedef struct pool_arg {
  pool_job *job;
  int worker;
} pool_arg;

static void drain(pool_job *job, int worker) {
  for (;;) {
    int t = atomic_fetch_add(&job->next, 1);
    if (t >= job->ntasks)
      return;
    job->fn(job->ctx, t, worker);
  }
}

static void *thread_main(void *p) {
  pool_arg *a = p;
  drain(a->job, a->worker);
  return NULL;
}

void pool_run(int threads, int ntasks, pool_task_fn fn, void *ctx) {
  if (threads > ntasks)
    threads = ntasks;
  if (threads > POOL_MAX_THREADS)
    threads = POOL_MAX_THREADS;
  pool_job job = {fn, ctx, ntasks, 0};
  if (threads <= 1) {
    drain(&job, 0);
    return;
  }
  pthread_t tid[POOL_MAX_THREADS];
  pool_arg args[POOL_MAX_THREADS];
  int started = 0;
  for (int i = 1; i < threads; i++) {
    args[i] = (pool_arg){&job, i};
    if (pthread_create(&tid[i], NULL, thread_main, &args[i]) != 0)
      break; /* fewer threads is still correct: the caller drains the rest */
    started = i;
  }
  drain(&job, 0);
  for (int i = 1; i <= started; i++)
    pthread_join(tid[i], NULL);
}
