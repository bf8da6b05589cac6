/* Fork-join parallelism for the ops: a pool of worker threads that the
 * caller sizes and owns, running `ntasks` independent tasks per call with the
 * calling thread taking part. One pool serves one caller at a time. */
#ifndef DENOISED_POOL_H
#define DENOISED_POOL_H

typedef struct pool pool;

/* worker is in [0, pool_threads()): an index for per-thread scratch space. */
typedef void (*pool_task_fn)(void *ctx, int task, int worker);

/* A pool of `threads` threads in all (threads - 1 workers plus the caller).
 * Returns NULL when out of resources; a NULL pool runs everything inline. */
pool *pool_new(int threads);
void pool_free(pool *p);
int pool_threads(const pool *p);

/* Runs fn(ctx, task, worker) for task in [0, ntasks) and returns when all
 * are done. Not reentrant: tasks must not call pool_run on the same pool. */
void pool_run(pool *p, int ntasks, pool_task_fn fn, void *ctx);

#endif
