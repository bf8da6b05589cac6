/* The allocation seam: the C library's allocators behind a counter that tests can arm. The
 * state is process-wide atomics because allocations happen on the loop, the HTTP threads and
 * the workers alike; a sweep over N is repeatable as far as their interleaving is. */
#include "mem.h"

#include <execinfo.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

static atomic_int mem_armed;
static atomic_long mem_calls, mem_fail_at, mem_injected;
static atomic_int mem_sticky, mem_trace;

/* Counts one allocation; says whether it is to fail. */
static int mem_should_fail(void) {
  if (!atomic_load_explicit(&mem_armed, memory_order_relaxed))
    return 0;
  long n = atomic_fetch_add(&mem_calls, 1) + 1;
  long at = atomic_load(&mem_fail_at);
  if (at <= 0 || n < at || (n > at && !atomic_load(&mem_sticky)))
    return 0;
  atomic_fetch_add(&mem_injected, 1);
  if (atomic_load(&mem_trace)) { /* where a sweep's failure came from, for addr2line */
    void *frames[16];
    backtrace_symbols_fd(frames, backtrace(frames, 16), 2);
  }
  return 1;
}

void *mem_malloc(size_t n) {
  return mem_should_fail() ? NULL : malloc(n);
}

void *mem_calloc(size_t count, size_t size) {
  return mem_should_fail() ? NULL : calloc(count, size);
}

void *mem_realloc(void *p, size_t n) {
  return mem_should_fail() ? NULL : realloc(p, n);
}

void *mem_aligned(size_t align, size_t n) {
  if (mem_should_fail())
    return NULL;
  return aligned_alloc(align, (n + align - 1) & ~(align - 1));
}

char *mem_strdup(const char *s) {
  size_t n = strlen(s) + 1;
  char *out = mem_malloc(n);
  return out ? memcpy(out, s, n) : NULL;
}

void mem_fault_arm(long nth, int sticky) {
  atomic_store(&mem_armed, 0);
  atomic_store(&mem_calls, 0);
  atomic_store(&mem_injected, 0);
  atomic_store(&mem_fail_at, nth);
  atomic_store(&mem_sticky, sticky);
  atomic_store(&mem_trace, getenv("DENOISED_FAULT_TRACE") != NULL);
  atomic_store(&mem_armed, 1);
}

void mem_fault_disarm(void) {
  atomic_store(&mem_armed, 0);
}

long mem_fault_calls(void) {
  return atomic_load(&mem_calls);
}

long mem_fault_injected(void) {
  return atomic_load(&mem_injected);
}
