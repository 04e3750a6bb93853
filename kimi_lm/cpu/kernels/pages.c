/* Weights onto transparent huge pages (Linux): huge_pages moves the 2 MiB-aligned interior of an anonymous memory
 * range onto huge pages in place, its virtual addresses unchanged, so every pointer into it stays valid.
 *
 * Why: a decode step streams every active weight once, and on 4 KiB pages that is one TLB miss per 4 KiB read (more
 * expensive still under a hypervisor's nested page tables). Where the kernel hands out transparent huge pages only
 * on request (transparent_hugepage/enabled = madvise, the common default), memory PyTorch and oneDNN allocated has
 * none. Measured on this project's 2-core VM: bench-preset fp32 decode 12-20 % faster (kimi_lm/cpu/pages.py).
 *
 * How: for each chunk of the interior, fresh anonymous memory aligned to 2 MiB is asked for huge pages
 * (MADV_HUGEPAGE) before it is touched, the chunk's bytes are copied into it, and mremap(MREMAP_FIXED) puts it in the
 * chunk's place (the old pages are freed by that call). The caller guarantees the range is private anonymous memory
 * nobody writes meanwhile (kimi_lm/cpu/pages.py checks /proc/self/maps).
 *
 * Reference: madvise(2) MADV_HUGEPAGE, mremap(2) MREMAP_FIXED, Documentation/admin-guide/mm/transhuge.rst.
 */
#define _GNU_SOURCE
#include "common.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

#define HUGE_PAGE (2L << 20)

/* Moves [addr, addr + nbytes) rounded inwards to 2 MiB onto huge pages, `chunk` bytes (a multiple of 2 MiB) at a
 * time (the extra memory held at once). Returns the bytes moved (0: nothing whole inside), or -1 when the system
 * refused (no mremap here, or out of memory): what was moved before stays moved, the rest as it was. */
long huge_pages(void *addr, long nbytes, long chunk) {
#if defined(__linux__) && defined(MREMAP_FIXED) && defined(MADV_HUGEPAGE)
    const uintptr_t lo = ((uintptr_t)addr + HUGE_PAGE - 1) & ~(uintptr_t)(HUGE_PAGE - 1);
    const uintptr_t hi = ((uintptr_t)addr + (uintptr_t)nbytes) & ~(uintptr_t)(HUGE_PAGE - 1);
    if (hi <= lo) return 0;
    if (chunk < HUGE_PAGE) chunk = HUGE_PAGE;
    chunk &= ~(HUGE_PAGE - 1);
    long moved = 0;
    for (uintptr_t at = lo; at < hi; at += (uintptr_t)chunk) {
        const size_t size = hi - at < (uintptr_t)chunk ? hi - at : (size_t)chunk;
        /* over-allocate by one huge page to find a 2 MiB-aligned start, then give the slack back */
        char *raw = mmap(NULL, size + HUGE_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (raw == MAP_FAILED) return -1;
        char *aligned = (char *)(((uintptr_t)raw + HUGE_PAGE - 1) & ~(uintptr_t)(HUGE_PAGE - 1));
        if (aligned > raw) munmap(raw, (size_t)(aligned - raw));
        if (aligned + size < raw + size + HUGE_PAGE) munmap(aligned + size, (size_t)(raw + size + HUGE_PAGE - (aligned + size)));
        madvise(aligned, size, MADV_HUGEPAGE);
        memcpy(aligned, (const void *)at, size);
        if (mremap(aligned, size, size, MREMAP_MAYMOVE | MREMAP_FIXED, (void *)at) == MAP_FAILED) {
            munmap(aligned, size);
            return -1;
        }
        moved += (long)size;
    }
    return moved;
#else
    (void)addr, (void)nbytes, (void)chunk;
    return -1;
#endif
}
