/* Scratch arena: chunked bump allocator with stack-like release. Chunks are
 * kept after release so that repeated forward passes reuse the same memory. */
#include "arena.h"

#include <stdint.h>
#include <stdlib.h>

#include "mem.h"

#define ARENA_ALIGN 64
#define ARENA_MAX_CHUNKS 64

typedef struct chunk {
  unsigned char *base;
  size_t size;
} chunk;

struct arena {
  size_t chunk_bytes;
  chunk chunks[ARENA_MAX_CHUNKS];
  int nchunks;
  int cur;     /* chunk being carved */
  size_t used; /* bytes used in chunks[cur] */
  size_t base; /* bytes of chunks[0..cur) */
  size_t peak; /* most bytes ever in use at once */
};

arena *arena_new(size_t chunk_bytes) {
  arena *a = mem_calloc(1, sizeof *a);
  if (a)
    a->chunk_bytes = chunk_bytes < (1u << 20) ? (1u << 20) : chunk_bytes;
  return a;
}

void arena_free(arena *a) {
  if (!a)
    return;
  for (int i = 0; i < a->nchunks; i++)
    free(a->chunks[i].base);
  free(a);
}

void *arena_alloc(arena *a, size_t bytes) {
  bytes = (bytes + ARENA_ALIGN - 1) & ~(size_t)(ARENA_ALIGN - 1);
  if (bytes == 0)
    bytes = ARENA_ALIGN;
  for (;;) {
    if (a->cur < a->nchunks) {
      chunk *c = &a->chunks[a->cur];
      if (c->size - a->used >= bytes) {
        void *p = c->base + a->used;
        a->used += bytes;
        if (a->base + a->used > a->peak)
          a->peak = a->base + a->used;
        return p;
      }
      /* A later chunk that is already big enough is reused; otherwise a new
       * chunk is inserted here so release order stays a simple index. */
      if (a->cur + 1 < a->nchunks && a->chunks[a->cur + 1].size >= bytes) {
        a->base += c->size;
        a->cur++;
        a->used = 0;
        continue;
      }
    }
    if (a->nchunks == ARENA_MAX_CHUNKS)
      return NULL;
    size_t size = bytes > a->chunk_bytes ? bytes : a->chunk_bytes;
    void *base = mem_aligned(ARENA_ALIGN, size);
    if (!base)
      return NULL;
    int at = a->cur < a->nchunks ? a->cur + 1 : a->nchunks;
    if (a->cur < a->nchunks)
      a->base += a->chunks[a->cur].size;
    for (int i = a->nchunks; i > at; i--)
      a->chunks[i] = a->chunks[i - 1];
    a->chunks[at] = (chunk){base, size};
    a->nchunks++;
    a->cur = at;
    a->used = 0;
  }
}

float *arena_floats(arena *a, size_t count) {
  return (float *)arena_alloc(a, count * sizeof(float));
}

arena_mark arena_get_mark(const arena *a) {
  return (arena_mark){a->cur, a->used, a->base};
}

void arena_release(arena *a, arena_mark m) {
  a->cur = m.chunk;
  a->used = m.used;
  a->base = m.base;
}

void arena_reset(arena *a) {
  a->cur = 0;
  a->used = 0;
  a->base = 0;
  if (a->nchunks <= 1)
    return;
  /* Several chunks means the sizes did not fit: one chunk of the peak serves
   * every later pass of the same shape without new allocations. */
  size_t want = (a->peak + 4095) & ~(size_t)4095;
  void *big = mem_aligned(ARENA_ALIGN, want);
  if (!big)
    return;
  for (int i = 0; i < a->nchunks; i++)
    free(a->chunks[i].base);
  a->chunks[0] = (chunk){big, want};
  a->nchunks = 1;
}

size_t arena_capacity(const arena *a) {
  size_t total = 0;
  for (int i = 0; i < a->nchunks; i++)
    total += a->chunks[i].size;
  return total;
}
