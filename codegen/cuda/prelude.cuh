// tilefuse prelude: the device helpers every generated kernel and every
// kernel template builds on. Header-only, namespace tf, no global state.
//
// Conventions shared by all tilefuse CUDA code:
// - activations are `bf16` or `float`, row-major; accumulation is in f32;
// - a value is rounded to its tensor's dtype exactly where the CPU
//   interpreter (the oracle) rounds it: `tf::round_to<T>(float)`;
// - FP4 weights are dequantised in registers, never written to memory.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// NVRTC ships no C library headers: the fixed-width integers, by hand.
typedef unsigned char uint8_t;
typedef unsigned int uint32_t;
typedef unsigned long long uint64_t;
typedef int int32_t;
typedef long long int64_t;

namespace tf {

using bf16 = __nv_bfloat16;

// ---- conversions and rounding ------------------------------------------------

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

// Converts an f32 to the storage type T (round to nearest even).
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_float<bf16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// Rounds an f32 to the nearest value representable in T, kept as f32.
template <typename T> __device__ __forceinline__ float round_to(float x) {
    return to_float(from_float<T>(x));
}

// Eight bf16 packed in 16 bytes -> eight floats.
__device__ __forceinline__ void bf16x8_to_float(uint4 v, float (&out)[8]) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        out[2 * i] = __uint_as_float(w[i] << 16);
        out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

// ---- memory --------------------------------------------------------------------

// 16-byte load through the read-only path that does not allocate in L1:
// for weights, each byte of which a kernel reads once.
__device__ __forceinline__ uint4 ld_stream_v4(const void* p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
}

// 16-byte load of data other CTAs share (activations).
__device__ __forceinline__ uint4 ld_v4(const void* p) { return *reinterpret_cast<const uint4*>(p); }

// ---- reductions ------------------------------------------------------------------

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the CTA; every thread gets the result. `scratch` holds THREADS/32 floats.
// Contains two barriers; call from all threads.
template <int THREADS> __device__ __forceinline__ float block_sum(float v, float* scratch) {
    static_assert(THREADS % 32 == 0, "THREADS must be a multiple of 32");
    constexpr int W = THREADS / 32;
    v = warp_sum(v);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float r = 0.f;
#pragma unroll
    for (int i = 0; i < W; ++i) r += scratch[i];
    return r;
}

template <int THREADS> __device__ __forceinline__ float block_max(float v, float* scratch) {
    constexpr int W = THREADS / 32;
    v = warp_max(v);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float r = __int_as_float(0xff800000);  // -inf (NVRTC has no INFINITY)
#pragma unroll
    for (int i = 0; i < W; ++i) r = fmaxf(r, scratch[i]);
    return r;
}

// ---- FP8 and FP4 -----------------------------------------------------------------

// FP8 E4M3 (OCP "fn": no infinities, 0x7f/0xff NaN) -> f32, exact.
__device__ __forceinline__ float e4m3_to_float(uint32_t b) {
    const uint32_t e = (b >> 3) & 0xf, m = b & 7;
    float mag;
    if (e == 0xf && m == 7) return __int_as_float(0x7fc00000);
    if (e == 0) mag = (float)m * 0.001953125f;  // m * 2^-9
    else mag = __uint_as_float(((e + 120u) << 23) | (m << 20));  // (1 + m/8) * 2^(e-7)
    return (b & 0x80) ? -mag : mag;
}

// E8M0 scale byte -> 2^(b-127) (b = 255 is NaN).
__device__ __forceinline__ float e8m0_to_float(uint32_t b) {
    if (b == 0xff) return __int_as_float(0x7fc00000);
    if (b == 0) return __uint_as_float(0x00400000u);  // 2^-127, a subnormal
    return __uint_as_float(b << 23);
}

// E2M1 code (low 4 bits) -> f32: ±{0, .5, 1, 1.5, 2, 3, 4, 6}.
// Bit trick: the 3 magnitude bits placed as exponent/mantissa of an f32
// scaled by 2^-126... kept as a table here for clarity; the compiler turns
// the constant array into a register select.
__device__ __forceinline__ float e2m1_to_float(uint32_t c) {
    // (e, m) = (c>>1 & 3, c & 1): value = e ? (1 + m/2) * 2^(e-1) : m/2.
    const uint32_t e = (c >> 1) & 3, m = c & 1;
    const float mag = e ? __uint_as_float(((e + 126u) << 23) | (m << 22)) : 0.5f * (float)m;
    return (c & 8) ? -mag : mag;
}

// Eight E2M1 codes packed in a u32 (element 2i in the low nibble of byte i)
// times `scale` -> eight floats. Exact: an E2M1 value times a power of two (MX)
// or an E4M3 value (NV) needs at most 6 significant bits.
__device__ __forceinline__ void e2m1x8_to_float(uint32_t codes, float scale, float (&out)[8]) {
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = e2m1_to_float(codes >> (4 * i)) * scale;
}

// ---- tensor cores ------------------------------------------------------------------

// D = A * B + D with A 16x16 bf16 (row), B 16x8 bf16 (col), f32 accumulators,
// in the register layout of PTX `mma.sync.aligned.m16n8k16.row.col`.
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Two floats -> packed bf16x2 (low half = first).
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
}

// ---- math matching the interpreter ---------------------------------------------------

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + __expf(-x)); }
__device__ __forceinline__ float silu(float x) { return x * sigmoid(x); }

// The counter-based uniform of the IR's sampling op (interp::uniform), bit for
// bit: splitmix64 of (seed << 32 | counter), top 24 bits times 2^-24.
__device__ __forceinline__ float uniform01(uint32_t seed, uint32_t counter) {
    uint64_t z = ((uint64_t)seed << 32) | (uint64_t)counter;
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (float)(uint32_t)(z >> 40) * (1.0f / 16777216.0f);
}

// ---- launch order: programmatic dependent launch, weight prefetch, trace ----------
//
// Every generated `__global__` wrapper runs, in this order:
//   1. `prefetch_l2_share` of the dense weights its tile reads. Weights never
//      depend on activations, so this may overlap the kernel before it. Then
//      the kernel's early hints, if any (`<kernel>_early`): L2 prefetches of
//      cache rows, which read nothing an earlier kernel wrote; a hint never
//      changes a result. Then the kernel's prologue, if any
//      (`<kernel>_prologue`, lower::LoweredKernel::prologue): work into its
//      own shared memory that reads only the forward's inputs, written
//      before its first kernel like T and S (the attention tile's RoPE table
//      of its query positions);
//   2. `grid_dependency_wait()`: returns once every earlier kernel of the
//      stream has finished and its writes are visible. Apart from the
//      forward's symbols T and S and the inputs a prologue reads (written
//      before its first kernel), nothing an earlier kernel writes is read,
//      and nothing it reads is written, before this;
//   3. `launch_dependents()`: the next kernel's CTAs may now be scheduled and
//      start their own step 1 while this one works. Placed after step 2, so
//      at most two kernels are in flight and the prefetches of one kernel at
//      a time compete with the running one.
// A kernel launched without the programmatic-serialization attribute (the
// first of a forward, any kernel in persistent mode) finds 2 and 3 no-ops.
// No deadlock: the next kernel's CTAs are scheduled only once every CTA of
// this one has passed step 3 or exited, so none of this kernel's CTAs ever
// waits for room that a waiting dependent holds; and the prefetch of step 1
// is a hint that never blocks.

__device__ __forceinline__ void grid_dependency_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void launch_dependents() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Bytes of weights one tile asks L2 to prefetch at most: enough to cover the
// few microseconds between two kernels (about 15 MB over 132 SMs at two
// tiles each) without evicting what the running kernel still reads.
constexpr unsigned long long PREFETCH_CAP = 64 * 1024;

// Asks L2 for the bytes [p, p + bytes): the start rounded down and the end
// rounded down to 16 bytes, so nothing past the range is asked for (an
// allocation starts 16-byte aligned). A hint: no result, never blocks.
__device__ __forceinline__ void prefetch_l2_range(const void* p, unsigned long long bytes) {
#if __CUDA_ARCH__ >= 900
    const unsigned long long a = reinterpret_cast<unsigned long long>(p);
    const unsigned long long lo = a & ~15ull, hi = (a + bytes) & ~15ull;
    for (unsigned long long s = lo; s < hi; s += 1ull << 30) {
        const unsigned long long n = hi - s < (1ull << 30) ? hi - s : (1ull << 30);
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(s), "r"((unsigned)n) : "memory");
    }
#endif
}

// The most bytes the early hints of one kernel may ask L2 for, all its tiles
// together: half of an H100's 50 MB L2. A kernel whose hints would ask for
// more (the keys of a long context) asks for none: lines that evict each
// other before they are read cost a second read from memory.
constexpr unsigned long long EARLY_L2_BUDGET = 24ull << 20;

// Asks L2 to fetch the `tile`-th of `tiles` equal slices (16-byte multiples)
// of the `bytes` bytes at `base` (16-byte aligned), at most PREFETCH_CAP of
// it. A hint: no result, no fault past its range. Call from any thread; the
// first one issues it.
__device__ __forceinline__ void prefetch_l2_share(const char* base, unsigned long long bytes, int tile, int tiles) {
#if __CUDA_ARCH__ >= 900
    if (threadIdx.x != 0 || tiles <= 0) return;
    const unsigned long long share = ((bytes + tiles - 1) / tiles + 15) & ~15ull;
    const unsigned long long lo = share * (unsigned long long)tile;
    if (lo >= bytes) return;
    const unsigned long long n = bytes - lo < share ? bytes - lo : share;
    prefetch_l2_range(base + lo, n < PREFETCH_CAP ? n : PREFETCH_CAP);
#endif
}

// An int that an earlier kernel wrote, read through L2 (never an older copy
// of its line that this SM's L1 may hold).
__device__ __forceinline__ int ld_l2_i32(const int* p) {
    int r;
    asm volatile("ld.global.cg.s32 %0, [%1];" : "=r"(r) : "l"(p));
    return r;
}

// Nanoseconds of the GPU's global timer (one clock for all SMs).
__device__ __forceinline__ unsigned long long global_timer() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// Where the trace of one forward goes (stream and graph modes): per kernel
// eight words (lower::TRACE_KERNEL_WORDS), [first CTA start, first CTA past
// its wait, last CTA end, CTAs, last CTA start, last CTA past its wait, the
// longest CTA's work (end minus its own wait, ns), the CTAs' work summed
// (ns)], the runtime having set the first two to all ones and the rest to
// zero. The spread of starts and waits shows CTAs that became resident late;
// the longest CTA against the kernel's span shows whether a kernel's time is
// one tile's program or its CTAs arriving one after another. Call from one
// thread per CTA.
__device__ __forceinline__ void trace_cta(unsigned long long* rec, unsigned long long start,
                                          unsigned long long waited, unsigned long long end) {
    atomicMin(rec + 0, start);
    atomicMin(rec + 1, waited);
    atomicMax(rec + 2, end);
    atomicAdd(rec + 3, 1ull);
    atomicMax(rec + 4, start);
    atomicMax(rec + 5, waited);
    const unsigned long long work = end > waited ? end - waited : 0ull;
    atomicMax(rec + 6, work);
    atomicAdd(rec + 7, work);
}

// Word of an offset table that holds the trace buffer's address (0: no
// trace), and the word that holds the kernel's index in its plan.
constexpr int OFFSET_TRACE = 30;
constexpr int OFFSET_KERNEL = 31;

// The buffer offsets of one kernel instance, passed by value to its wrapper
// (kernels shared by several layers differ only in these).
struct Offsets {
    long long v[32];
};

}  // namespace tf

// ---- helpers shared by the weight-streaming templates (matvec.cuh, moe.cuh) ----------

namespace tf {

// Ceiling division and min/max usable in constant expressions on both sides.
__host__ __device__ constexpr int cdiv(int a, int b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int cmin(int a, int b) { return a < b ? a : b; }
__host__ __device__ constexpr int cmax(int a, int b) { return a > b ? a : b; }

// 1- and 2-byte loads of read-only weight data (block scales), same path as
// ld_stream_v4: only for bytes no kernel of the launch writes.
__device__ __forceinline__ uint32_t ld_stream_u8(const void* p) {
    uint32_t r;
    asm volatile("ld.global.nc.L1::no_allocate.u8 %0, [%1];" : "=r"(r) : "l"(p));
    return r;
}
__device__ __forceinline__ uint32_t ld_stream_u16(const void* p) {
    uint32_t r;
    asm volatile("ld.global.nc.L1::no_allocate.u16 %0, [%1];" : "=r"(r) : "l"(p));
    return r;
}

// +infinity as an f32 (NVRTC has no INFINITY macro without math.h).
__device__ __forceinline__ float f32_inf() { return __int_as_float(0x7f800000); }

// Sum over the warp in f64 (every lane gets the result).
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// PTX prmt (byte permute): byte i of the result is byte sel[4i+3:4i] of {b, a}.
__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
    uint32_t r;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
    return r;
}

// Packed bf16x2 multiply, round to nearest even; subnormals are kept (no ftz).
__device__ __forceinline__ uint32_t hmul2_bf16(uint32_t a, uint32_t b) {
    uint32_t r;
    asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
}

}  // namespace tf
