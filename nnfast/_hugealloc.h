/* Buffers the hand loops stream every sample, on 2 MiB pages where the OS has them.
 * A block of 4 KiB pages lands on scattered physical pages, and the L2 cache is
 * indexed by physical address: some of its sets then get more of the block's lines
 * than they have ways, and the block no longer stays in L2 from one sample to the next
 * (A/1's first-layer pass on a 400 KB block: 5.5 us per sample or 11 us, by process).
 * A 2 MiB page is contiguous, so a block of up to 2 MiB spreads evenly over the sets. */
#ifndef NNFAST_HUGEALLOC_H
#define NNFAST_HUGEALLOC_H
#include <stdlib.h>
#include <stdint.h>
#if defined(__linux__)
#include <sys/mman.h>
#define NNF_HUGE_PAGE ((size_t)2 << 20)
/* the mapping's length is stored in the first 64 bytes; the buffer starts after them */
static void *nnf_alloc_huge(size_t nbytes) {
    size_t len = (nbytes + 64 + NNF_HUGE_PAGE - 1) / NNF_HUGE_PAGE * NNF_HUGE_PAGE;
    /* over-map by one huge page so the buffer can start on a 2 MiB boundary */
    char *raw = mmap(NULL, len + NNF_HUGE_PAGE, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) return NULL;
    char *base = (char *)(((uintptr_t)raw + NNF_HUGE_PAGE - 1) & ~(uintptr_t)(NNF_HUGE_PAGE - 1));
    if (base > raw) munmap(raw, (size_t)(base - raw));
    size_t tail = (size_t)(raw + len + NNF_HUGE_PAGE - (base + len));
    if (tail) munmap(base + len, tail);
#ifdef MADV_HUGEPAGE
    madvise(base, len, MADV_HUGEPAGE);  /* a hint: without THP the pages stay 4 KiB */
#endif
    *(size_t *)base = len;
    return base + 64;
}
static void nnf_free_huge(void *p) {
    if (p == NULL) return;
    char *base = (char *)p - 64;
    munmap(base, *(size_t *)base);
}
#else
static void *nnf_alloc_huge(size_t nbytes) {
    char *raw = malloc(nbytes + 128);
    if (raw == NULL) return NULL;
    char *p = (char *)(((uintptr_t)raw + 64 + 63) & ~(uintptr_t)63);
    ((void **)p)[-1] = raw;
    return p;
}
static void nnf_free_huge(void *p) {
    if (p != NULL) free(((void **)p)[-1]);
}
#endif
#endif
