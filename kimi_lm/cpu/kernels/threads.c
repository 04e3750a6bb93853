/* Threads for the multi-threaded kernels: parallel_for, on PyTorch's own OpenMP team where kimi_lm/cpu/native.py
 * hands its entry points over (use_openmp), else on pthreads, else on the calling thread.
 *
 * Reference: the GCC OpenMP ABI (GOMP_parallel, omp_get_thread_num, omp_get_num_threads); POSIX threads.
 */
#include <pthread.h>
#include <stdatomic.h>

#include "common.h"

/* PyTorch's CPU ops run on an OpenMP team whose idle threads keep spinning for a while after each op; new threads of
 * our own would compete with them for the cores (measured: a 2-thread scan right after a PyTorch op ran slower than
 * one thread). So where PyTorch's OpenMP runtime is loaded, kimi_lm/cpu/native.py hands over its entry points (the
 * GCC OpenMP ABI that `#pragma omp parallel` compiles to) and the work runs on PyTorch's own team; elsewhere on
 * pthreads. */
typedef void (*omp_parallel_fn)(void (*)(void *), void *, unsigned, unsigned);
typedef int (*omp_int_fn)(void);
static omp_parallel_fn omp_parallel;
static omp_int_fn omp_thread_num, omp_num_threads;

void use_openmp(void *parallel, void *thread_num, void *num_threads) {
    omp_parallel = (omp_parallel_fn)parallel;
    omp_thread_num = (omp_int_fn)thread_num;
    omp_num_threads = (omp_int_fn)num_threads;
}

/* Each of the `members` shares of the items is a contiguous range (a thread streams one stretch of a weight); a
 * member that has finished its own takes the remaining items of the others' (an atomic counter per range, on its own
 * cache line), so a thread that joins the region late, or not at all (the team may be smaller than asked for), delays
 * nothing: with a fixed split the first thread waited for the other's wake-up in every region of a decode step. */
typedef struct {
    _Alignas(64) _Atomic long next; /* the range's next item to run */
} range_counter;

typedef struct {
    item_fn fn;
    const void *ctx;
    long items, members;
    range_counter *next; /* [members] */
} team_share;

static void run_range(const team_share *share, long member) {
    const long end = share->items * (member + 1) / share->members;
    for (;;) {
        const long item = atomic_fetch_add_explicit(&share->next[member].next, 1, memory_order_relaxed);
        if (item >= end) return;
        share->fn(share->ctx, item);
    }
}

/* member `me`'s own range, then what is left of the others' */
static void run_share(const team_share *share, long me) {
    for (long k = 0; k < share->members; k++) run_range(share, (me + k) % share->members);
}

static void omp_member(void *arg) {
    const team_share *share = (const team_share *)arg;
    const long me = omp_thread_num();
    if (me < share->members) run_share(share, me);
}

typedef struct {
    const team_share *share;
    long member;
} pthread_share;

static void *pthread_member(void *arg) {
    const pthread_share *p = (const pthread_share *)arg;
    run_share(p->share, p->member);
    return NULL;
}

/* fn(ctx, item) for every item in [0, items), on up to `threads` threads, each taking one contiguous range first */
void parallel_for(item_fn fn, const void *ctx, long items, int threads) {
    if (threads > items) threads = (int)items;
    if (threads > 64) threads = 64;
    if (threads <= 1) {
        for (long item = 0; item < items; item++) fn(ctx, item);
        return;
    }
    range_counter next[64];
    for (int i = 0; i < threads; i++) atomic_init(&next[i].next, items * i / threads);
    team_share share = {fn, ctx, items, threads, next};
    if (omp_parallel) {
        omp_parallel(omp_member, &share, (unsigned)threads, 0);
        return;
    }
    pthread_share shares[64];
    pthread_t ids[64];
    int started[64] = {0};
    for (int i = 1; i < threads; i++) {
        shares[i] = (pthread_share){&share, i};
        started[i] = pthread_create(&ids[i], NULL, pthread_member, &shares[i]) == 0;
    }
    run_share(&share, 0); /* a thread that could not start: its range is taken here */
    for (int i = 1; i < threads; i++)
        if (started[i]) pthread_join(ids[i], NULL);
}
