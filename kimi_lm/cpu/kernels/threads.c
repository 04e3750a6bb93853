/* Threads for the multi-threaded kernels: parallel_for, on PyTorch's own OpenMP team where kimi_lm/cpu/native.py
 * hands its entry points over (use_openmp), else on pthreads, else on the calling thread.
 *
 * Reference: the GCC OpenMP ABI (GOMP_parallel, omp_get_thread_num, omp_get_num_threads); POSIX threads.
 */
#include <pthread.h>

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

typedef struct {
    item_fn fn;
    const void *ctx;
    long items, member, members; /* this member runs items [member items / members, (member + 1) items / members) */
} team_share;

static void run_share(const team_share *share) {
    const long begin = share->items * share->member / share->members;
    const long end = share->items * (share->member + 1) / share->members;
    for (long item = begin; item < end; item++) share->fn(share->ctx, item);
}

static void omp_member(void *arg) {
    team_share share = *(const team_share *)arg;
    share.member = omp_thread_num(); /* the team may be smaller than asked for: share by its real size */
    share.members = omp_num_threads();
    run_share(&share);
}

static void *pthread_member(void *arg) {
    run_share((const team_share *)arg);
    return NULL;
}

/* fn(ctx, item) for every item in [0, items), on up to `threads` threads, each taking one contiguous range */
void parallel_for(item_fn fn, const void *ctx, long items, int threads) {
    if (threads > items) threads = (int)items;
    if (threads > 64) threads = 64;
    if (threads <= 1) {
        for (long item = 0; item < items; item++) fn(ctx, item);
        return;
    }
    if (omp_parallel) {
        team_share share = {fn, ctx, items, 0, 1};
        omp_parallel(omp_member, &share, (unsigned)threads, 0);
        return;
    }
    team_share shares[64];
    pthread_t ids[64];
    int started[64] = {0};
    for (int i = 0; i < threads; i++) shares[i] = (team_share){fn, ctx, items, i, threads};
    for (int i = 1; i < threads; i++) started[i] = pthread_create(&ids[i], NULL, pthread_member, &shares[i]) == 0;
    run_share(&shares[0]);
    for (int i = 1; i < threads; i++) { /* a thread that could not start: its share runs here */
        if (started[i])
            pthread_join(ids[i], NULL);
        else
            run_share(&shares[i]);
    }
}
