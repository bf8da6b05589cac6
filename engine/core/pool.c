/* Persistent fork-join pool. Workers spin briefly after a job (ops come in
 * quick succession during a forward pass), then sleep on a condition
 * variable so an idle daemon burns no CPU. */
#include "pool.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>

#define POOL_MAX_THREADS 64
#define POOL_SPIN 20000 /* polls before sleeping: roughly 50-100 us */

typedef struct worker_arg {
  pool *p;
  int index;
} worker_arg;

struct pool {
  int threads;
  pthread_t tid[POOL_MAX_THREADS];
  worker_arg args[POOL_MAX_THREADS];
  pthread_mutex_t lock;
  pthread_cond_t wake;
  /* The current job; `generation` changes when a new one is published. */
  pool_task_fn fn;
  void *ctx;
  int ntasks;
  atomic_int next;    /* next task index to claim */
  atomic_int pending; /* workers still inside the current job */
  atomic_uint generation;
  atomic_int stop;
};

static void drain(pool *p, pool_task_fn fn, void *ctx, int ntasks, int worker) {
  for (;;) {
    int t = atomic_fetch_add(&p->next, 1);
    if (t >= ntasks)
      return;
    fn(ctx, t, worker);
  }
}

static void *worker_main(void *arg) {
  worker_arg *a = arg;
  pool *p = a->p;
  unsigned seen = 0;
  for (;;) {
    unsigned gen = atomic_load(&p->generation);
    for (int spin = 0; gen == seen && spin < POOL_SPIN && !atomic_load(&p->stop); spin++) {
      sched_yield();
      gen = atomic_load(&p->generation);
    }
    if (gen == seen) {
      pthread_mutex_lock(&p->lock);
      while ((gen = atomic_load(&p->generation)) == seen && !atomic_load(&p->stop))
        pthread_cond_wait(&p->wake, &p->lock);
      pthread_mutex_unlock(&p->lock);
    }
    if (atomic_load(&p->stop))
      return NULL;
    seen = gen;
    drain(p, p->fn, p->ctx, p->ntasks, a->index);
    atomic_fetch_sub(&p->pending, 1);
  }
}

pool *pool_new(int threads) {
  if (threads < 1)
    threads = 1;
  if (threads > POOL_MAX_THREADS)
    threads = POOL_MAX_THREADS;
  pool *p = calloc(1, sizeof *p);
  if (!p)
    return NULL;
  pthread_mutex_init(&p->lock, NULL);
  pthread_cond_init(&p->wake, NULL);
  p->threads = 1;
  for (int i = 1; i < threads; i++) {
    p->args[i] = (worker_arg){p, i};
    if (pthread_create(&p->tid[i], NULL, worker_main, &p->args[i]) != 0)
      break; /* fewer workers is still correct */
    p->threads = i + 1;
  }
  return p;
}

void pool_free(pool *p) {
  if (!p)
    return;
  pthread_mutex_lock(&p->lock);
  atomic_store(&p->stop, 1);
  pthread_cond_broadcast(&p->wake);
  pthread_mutex_unlock(&p->lock);
  for (int i = 1; i < p->threads; i++)
    pthread_join(p->tid[i], NULL);
  pthread_cond_destroy(&p->wake);
  pthread_mutex_destroy(&p->lock);
  free(p);
}

int pool_threads(const pool *p) {
  return p ? p->threads : 1;
}

void pool_run(pool *p, int ntasks, pool_task_fn fn, void *ctx) {
  if (ntasks <= 0)
    return;
  if (!p || p->threads == 1 || ntasks == 1) {
    for (int t = 0; t < ntasks; t++)
      fn(ctx, t, 0);
    return;
  }
  p->fn = fn;
  p->ctx = ctx;
  p->ntasks = ntasks;
  atomic_store(&p->next, 0);
  atomic_store(&p->pending, p->threads - 1);
  pthread_mutex_lock(&p->lock);
  atomic_fetch_add(&p->generation, 1);
  pthread_cond_broadcast(&p->wake);
  pthread_mutex_unlock(&p->lock);
  drain(p, fn, ctx, ntasks, 0);
  /* Workers may still be finishing their last task: wait for all of them so
   * the job's stack-allocated context stays valid. */
  while (atomic_load(&p->pending) > 0)
    sched_yield();
}
