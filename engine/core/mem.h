/* The allocation seam of the engine and the queue (SQLite's fault-injecting malloc idea): every
 * heap allocation of the queue, the engine's loaders and its buffers goes through these, so a
 * test can make the Nth one fail and check that the failure is reported, nothing leaks and no
 * accepted job is lost. Unarmed, each is the C library call plus one relaxed atomic load.
 * Memory from these is released with free(). */
#ifndef DENOISED_MEM_H
#define DENOISED_MEM_H

#include <stddef.h>

void *mem_malloc(size_t n);
void *mem_calloc(size_t count, size_t size);
void *mem_realloc(void *p, size_t n);
/* align is a power of two; n is rounded up to a multiple of it (C11 aligned_alloc's rule) */
void *mem_aligned(size_t align, size_t n);
char *mem_strdup(const char *s);

/* Test hook, process-wide: the `nth` allocation from now on fails (nth >= 1), and with sticky
 * every one after it too (memory that stays exhausted). mem_fault_disarm() ends it. With
 * DENOISED_FAULT_TRACE set, each failure prints a backtrace to stderr. */
void mem_fault_arm(long nth, int sticky);
void mem_fault_disarm(void);
/* Allocations counted since the last arm (armed or not: arm with nth = 0 to only count). */
long mem_fault_calls(void);
/* Allocations made to fail since the last arm. */
long mem_fault_injected(void);

#endif
