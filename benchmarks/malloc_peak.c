// LD_PRELOAD library for benchmarks/heap_peak.py: counts the bytes held
// through malloc, calloc, realloc and the aligned allocators (as
// malloc_usable_size reports them), and their peak since the last reset.
// Exact where the resident set is not: it sees blocks below glibc's mmap
// threshold and is not rounded to pages. Memory a library maps itself (JIT
// code) is not counted.
#define _GNU_SOURCE
#include <errno.h>
#include <malloc.h>
#include <stdatomic.h>
#include <stddef.h>

extern void* __libc_malloc(size_t);
extern void __libc_free(void*);
extern void* __libc_calloc(size_t, size_t);
extern void* __libc_realloc(void*, size_t);
extern void* __libc_memalign(size_t, size_t);

static _Atomic long held, peak;

static void count_in(void* p) {
  if (!p) return;
  long now = atomic_fetch_add(&held, (long)malloc_usable_size(p)) + (long)malloc_usable_size(p);
  long old = atomic_load(&peak);
  while (now > old && !atomic_compare_exchange_weak(&peak, &old, now)) {
  }
}

static void count_out(void* p) {
  if (p) atomic_fetch_sub(&held, (long)malloc_usable_size(p));
}

void* malloc(size_t n) {
  void* p = __libc_malloc(n);
  count_in(p);
  return p;
}

void free(void* p) {
  count_out(p);
  __libc_free(p);
}

void* calloc(size_t count, size_t n) {
  void* p = __libc_calloc(count, n);
  count_in(p);
  return p;
}

void* realloc(void* old, size_t n) {
  count_out(old);
  void* p = __libc_realloc(old, n);
  count_in(p ? p : (n ? old : NULL));  // on failure the old block stays
  return p;
}

void* memalign(size_t align, size_t n) {
  void* p = __libc_memalign(align, n);
  count_in(p);
  return p;
}

void* aligned_alloc(size_t align, size_t n) { return memalign(align, n); }

int posix_memalign(void** out, size_t align, size_t n) {
  void* p = memalign(align, n);
  if (!p) return ENOMEM;
  *out = p;
  return 0;
}

void* valloc(size_t n) { return memalign(4096, n); }

// Bytes held now; the peak restarts from here.
long malloc_peak_reset(void) {
  long now = atomic_load(&held);
  atomic_store(&peak, now);
  return now;
}

long malloc_peak_get(void) { return atomic_load(&peak); }

long malloc_held_get(void) { return atomic_load(&held); }
