// How long a thread is held by an L2 prefetch, and what it saves a read that
// follows. 128 CTAs of 256 threads (one an SM, as the o projection's tiles)
// each own 64 KiB of a buffer that L2 does not hold (a 256 MiB write before
// every launch evicts it). Per mode, a CTA's thread 0 records: the time to
// issue its prefetch, then, after a 1.5 us pause standing in for the kernel
// before, the time all 256 threads take to read the 64 KiB (16 loads each).
// Modes: none; one 64 KiB `cp.async.bulk.prefetch.L2` by thread 0; 512
// `prefetch.global.L2` lines, two a thread; eight 8 KiB bulk prefetches by
// threads 0..7 (as the down tile's hints).
//
// Second table: whether a kernel's prefetches in flight hold back its
// `griddepcontrol.wait`. A producer (32 CTAs) spins 3 us and ends; a
// consumer launched beside it (programmatic dependent launch, 128 CTAs of
// 256 threads) asks L2 for 256 KiB a CTA (32 MiB, about 11 us of the card's
// bandwidth) as it starts, then waits for the producer. Printed: from the
// producer's last CTA end to the consumer's first and last CTA past its wait,
// seen by the thread that issues a bulk prefetch and by one in another warp.
// Without the prefetch, or if a prefetch never holds the wait back, both are
// well under a microsecond.
//
// Third table: the same, but the producer ends as a real kernel does, with
// writes (1 MiB: its 32 CTAs store 32 KiB each after the spin), and the
// consumer asks for 64 KiB a CTA (8 MiB, as the o projection's wrappers).
// Whether a grid's completion (its writes made visible to the dependent)
// waits behind the dependent's prefetch traffic: if so, the bulk and line
// rows are microseconds behind the row without a prefetch.
//   nvcc -O3 -arch=sm_90a -o l2_prefetch_micro tools/l2_prefetch_micro.cu && ./l2_prefetch_micro
#include <cstdio>
#include <cuda_runtime.h>

__device__ __forceinline__ unsigned long long now() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

__global__ void evict(int4* p, size_t n) {
    for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) p[i] = make_int4(i, 1, 2, 3);
}

__global__ void __launch_bounds__(256, 1) probe(const char* w, int mode, unsigned long long* rec, int* sink) {
    const char* base = w + (size_t)blockIdx.x * 65536;
    const unsigned long long t0 = now();
    if (mode == 1 && threadIdx.x == 0)
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(base), "r"(65536u) : "memory");
    if (mode == 2)
        for (int i = threadIdx.x; i < 512; i += 256) asm volatile("prefetch.global.L2 [%0];" ::"l"(base + i * 128));
    if (mode == 3 && threadIdx.x < 8)
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(base + threadIdx.x * 8192), "r"(8192u) : "memory");
    const unsigned long long t1 = now();
    while (now() - t0 < 1500) {
    }
    const unsigned long long t2 = now();
    int s = 0;
    const int4* q = reinterpret_cast<const int4*>(base);
#pragma unroll
    for (int i = 0; i < 16; ++i) {
        int4 v;
        asm volatile("ld.global.nc.v4.s32 {%0, %1, %2, %3}, [%4];"
                     : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                     : "l"(q + threadIdx.x + 256 * i));
        s += v.x ^ v.w;
    }
    __syncthreads();
    const unsigned long long t3 = now();
    if (s == 12345) sink[0] = s;
    if (threadIdx.x == 0) rec[2 * blockIdx.x] = t1 - t0, rec[2 * blockIdx.x + 1] = t3 - t2;
}

__device__ __forceinline__ void atomic_max_u64(unsigned long long* p, unsigned long long v) { atomicMax(p, v); }
__device__ __forceinline__ void atomic_min_u64(unsigned long long* p, unsigned long long v) { atomicMin(p, v); }

// rec: [0] producer's last end, [1] / [2] the first / last CTA whose thread 0
// (the one that issues the bulk prefetch) is past its wait, [3] / [4] the same
// for thread 32 (a warp that issues none).
// out: nullptr (second table) or 32 KiB a CTA written after the spin (third).
__global__ void producer(unsigned long long* rec, int4* out) {
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    const unsigned long long t0 = now();
    while (now() - t0 < 3000) {
    }
    if (out != nullptr)
        for (int i = 0; i < 8; ++i) out[(size_t)blockIdx.x * 2048 + i * 256 + threadIdx.x] = make_int4(i, 1, 2, 3);
    __syncthreads();
    if (threadIdx.x == 0) atomic_max_u64(rec, now());
}

// kib: KiB a CTA asks L2 for before its wait (a multiple of 64).
__global__ void __launch_bounds__(256, 1) consumer(const char* w, int mode, int kib, unsigned long long* rec) {
    const char* base = w + (size_t)blockIdx.x * (256 << 10);
    if (mode == 1 && threadIdx.x == 0)
        for (int i = 0; i < kib / 64; ++i)
            asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(base + i * 65536), "r"(65536u) : "memory");
    if (mode == 2)
        for (int i = threadIdx.x; i < kib * 8; i += 256) asm volatile("prefetch.global.L2 [%0];" ::"l"(base + i * 128));
    asm volatile("griddepcontrol.wait;" ::: "memory");
    const unsigned long long t = now();
    if (threadIdx.x == 0) atomic_min_u64(rec + 1, t), atomic_max_u64(rec + 2, t);
    if (threadIdx.x == 32) atomic_min_u64(rec + 3, t), atomic_max_u64(rec + 4, t);
}

int main() {
    char* w;
    int4* ev;
    unsigned long long* rec;
    int* sink;
    const size_t nev = (256u << 20) / 16;
    cudaMalloc(&w, 128 * 65536);
    cudaMalloc(&ev, nev * 16);
    cudaMalloc(&rec, 128 * 2 * 8);  // also holds the second table's five words
    cudaMalloc(&sink, 4);
    cudaMemset(w, 1, 128 * 65536);
    const char* names[] = {"none", "bulk 64 KiB", "512 lines", "8 x bulk 8 KiB"};
    printf("%-16s %12s %12s %16s %12s\n", "prefetch", "issue ns", "(max)", "read 64 KiB ns", "(max)");
    for (int mode = 0; mode < 4; ++mode) {
        double mean[2] = {0, 0}, mx[2] = {0, 0};
        const int reps = 20;
        for (int r = 0; r < reps + 2; ++r) {
            evict<<<528, 256>>>(ev, nev);
            probe<<<128, 256>>>(w, mode, rec, sink);
            cudaDeviceSynchronize();
            unsigned long long h[256];
            cudaMemcpy(h, rec, sizeof h, cudaMemcpyDeviceToHost);
            if (r < 2) continue;
            for (int b = 0; b < 128; ++b)
                for (int j = 0; j < 2; ++j) {
                    mean[j] += h[2 * b + j] / (128.0 * reps);
                    if (h[2 * b + j] > mx[j]) mx[j] = h[2 * b + j];
                }
        }
        printf("%-16s %12.0f %12.0f %16.0f %12.0f\n", names[mode], mean[0], mx[0], mean[1], mx[1]);
    }
    // Second and third tables.
    char* w2;
    int4* out;
    cudaMalloc(&w2, 128ull * (256 << 10));
    cudaMemset(w2, 1, 128ull * (256 << 10));
    cudaMalloc(&out, 32ull * 32768);
    for (int table = 2; table <= 3; ++table) {
        const int kib = table == 2 ? 256 : 64;
        const char* names2[] = {"none", table == 2 ? "bulk 256 KiB" : "bulk 64 KiB", table == 2 ? "2048 lines" : "512 lines"};
        printf("\n%s\n", table == 2 ? "producer writes nothing, 256 KiB a consumer CTA"
                                      : "producer writes 1 MiB at its end, 64 KiB a consumer CTA");
        printf("%-16s %26s %26s\n", "prefetch", "thread 0 past wait - end", "thread 32 past wait - end");
        printf("%-16s %13s %12s %13s %12s\n", "", "first ns", "last ns", "first ns", "last ns");
        for (int mode = 0; mode < 3; ++mode) {
            double first[2] = {0, 0}, last[2] = {0, 0};
            const int reps = 20;
            for (int r = 0; r < reps + 2; ++r) {
                const unsigned long long init[5] = {0ull, ~0ull, 0ull, ~0ull, 0ull};
                cudaMemcpy(rec, init, sizeof init, cudaMemcpyHostToDevice);
                evict<<<528, 256>>>(ev, nev);
                producer<<<32, 256>>>(rec, table == 3 ? out : nullptr);
                cudaLaunchConfig_t cfg = {};
                cfg.gridDim = dim3(128);
                cfg.blockDim = dim3(256);
                cudaLaunchAttribute attr[1];
                attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
                attr[0].val.programmaticStreamSerializationAllowed = 1;
                cfg.attrs = attr;
                cfg.numAttrs = 1;
                cudaLaunchKernelEx(&cfg, consumer, (const char*)w2, mode, kib, rec);
                cudaDeviceSynchronize();
                unsigned long long h[5];
                cudaMemcpy(h, rec, sizeof h, cudaMemcpyDeviceToHost);
                if (r < 2) continue;
                for (int j = 0; j < 2; ++j) {
                    first[j] += ((double)h[1 + 2 * j] - (double)h[0]) / reps;
                    last[j] += ((double)h[2 + 2 * j] - (double)h[0]) / reps;
                }
            }
            printf("%-16s %13.0f %12.0f %13.0f %12.0f\n", names2[mode], first[0], last[0], first[1], last[1]);
        }
    }
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) {
        printf("CUDA error: %s\n", cudaGetErrorString(e));
        return 1;
    }
    return 0;
}
