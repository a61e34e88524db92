// tilefuse persistent-kernel support: dependency counters in global memory.
//
// Protocol. Each kernel k of a plan has a counter of completed tiles that
// only grows: after forward number e (1-based) it equals e * tiles(k). A task
// (k, tile) of forward e waits until every kernel d it depends on has
// counter(d) >= e * tiles(d), runs the tile, then adds one to counter(k).
// Counters are never reset, so consecutive forwards need no host work
// besides writing e; they wrap after 2^32 / tiles(k) forwards, far beyond a
// session (the runtime re-zeroes them before that).
//
// Memory order. The tile's writes by all threads happen before the
// CTA barrier; thread 0 then publishes with a release add at GPU scope. The
// waiting CTA's thread 0 spins with acquire loads at GPU scope, then a CTA
// barrier orders every thread's later loads after the acquire.
#pragma once
#include "prelude.cuh"

namespace tf {

__device__ __forceinline__ uint32_t ld_acquire_gpu(const uint32_t* p) {
    uint32_t v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ void red_release_gpu_add(uint32_t* p, uint32_t v) {
    asm volatile("red.release.gpu.global.add.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

// Called by all threads: returns once counters[d] >= target for every
// (d, target) of the task's dependency list.
__device__ __forceinline__ void wait_deps(const uint32_t* counters, const int* deps, int ndeps, const uint32_t* targets_per_kernel,
                                          uint32_t epoch) {
    if (threadIdx.x == 0) {
        for (int i = 0; i < ndeps; ++i) {
            const int d = deps[i];
            const uint32_t target = epoch * targets_per_kernel[d];
            while (ld_acquire_gpu(counters + d) < target) {
                __nanosleep(64);
            }
        }
    }
    __syncthreads();
}

// Called by all threads after a tile: publishes its completion.
__device__ __forceinline__ void signal_done(uint32_t* counters, int kernel) {
    __syncthreads();
    if (threadIdx.x == 0) red_release_gpu_add(counters + kernel, 1u);
}

// The trace record of one task: [start, past its wait, end, smid << 32 | task].
// One thread.
__device__ __forceinline__ void trace_task(unsigned long long* rec, unsigned long long start, unsigned long long waited,
                                           int task) {
    unsigned smid;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
    rec[0] = start;
    rec[1] = waited;
    rec[2] = global_timer();
    rec[3] = ((unsigned long long)smid << 32) | (unsigned)task;
}

}  // namespace tf
