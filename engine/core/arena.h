/* Scratch arena: a stack of 64-byte aligned blocks carved from a few large
 * chunks, so a forward pass allocates nothing per layer once it has run once.
 * Not thread-safe: one arena per concurrent forward pass. */
#ifndef DENOISED_ARENA_H
#define DENOISED_ARENA_H

#include <stddef.h>

typedef struct arena arena;

typedef struct arena_mark {
  int chunk;
  size_t used, base;
} arena_mark;

/* chunk_bytes is the size of each chunk (a larger request gets its own). */
arena *arena_new(size_t chunk_bytes);
void arena_free(arena *a);

/* Returns 64-byte aligned memory, or NULL when the system is out of memory. */
void *arena_alloc(arena *a, size_t bytes);
float *arena_floats(arena *a, size_t count);

arena_mark arena_get_mark(const arena *a);
/* Frees everything allocated after the mark (memory stays with the arena). */
void arena_release(arena *a, arena_mark m);

/* Frees everything; if the last uses needed several chunks, they are merged
 * into one of the peak size so later passes of that shape allocate nothing. */
void arena_reset(arena *a);

/* Bytes of chunks held: the high-water mark of all uses so far. */
size_t arena_capacity(const arena *a);

#endif
