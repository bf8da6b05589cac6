/* Fork-join parallelism for the ops: run `ntasks` independent tasks on up to
 * `threads` threads (the caller included) and return when all are done. */
#ifndef DENOISED_POOL_H
#define DENOISED_POOL_H

typedef void (*pool_task_fn)(void *ctx, int task, int worker);

/* worker is in [0, threads): an index for per-thread scratch space. */
void pool_run(int threads, int ntasks, pool_task_fn fn, void *ctx);

#endif
