// Host emulation of the CUDA features that tilefuse's tile templates use,
// so that a host C++20 compiler builds the headers (after
// host_emulation::rewrite has replaced each inline PTX statement by a call
// into `emu`) and runs their tiles on the CPU:
// - one OS thread per CUDA thread (threadIdx, blockIdx thread-local), a CTA
//   at a time (emu::run_cta);
// - __syncthreads and __syncwarp as barriers;
// - warp collectives (shuffles, ldmatrix, mma.sync) through per-warp
//   exchange slots, from the fragment layouts of the PTX ISA;
// - cp.async as a synchronous copy (zero fill when its source size is 0);
// - bf16 with round-to-nearest-even, f32 arithmetic without contraction
//   (build with -ffp-contract=off).
// It checks a tile's indices, fragments, masks and control flow against the
// interpreter; it cannot see races, the memory model or timing, which stay
// for the GPU tests and compute-sanitizer. An instruction it has no model
// of aborts when it runs (emu::unsupported).
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <thread>
#include <type_traits>
#include <vector>

#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __global__
#define __launch_bounds__(...)
#define __restrict__ __restrict

struct alignas(16) uint4 { uint32_t x, y, z, w; };
inline uint4 make_uint4(uint32_t a, uint32_t b, uint32_t c, uint32_t d) { return {a, b, c, d}; }
struct alignas(8) uint2 { uint32_t x, y; };
inline uint2 make_uint2(uint32_t a, uint32_t b) { return {a, b}; }
struct alignas(8) float2 { float x, y; };
inline float2 make_float2(float a, float b) { return {a, b}; }
struct alignas(16) float4 { float x, y, z, w; };
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
struct Dim { unsigned x = 0, y = 0, z = 0; };
inline thread_local Dim threadIdx, blockIdx;

struct __nv_bfloat16 { uint16_t raw; };
struct __nv_bfloat162 { __nv_bfloat16 x, y; };
inline float __bfloat162float(__nv_bfloat16 b) { uint32_t u = (uint32_t)b.raw << 16; float f; memcpy(&f, &u, 4); return f; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {(uint16_t)((u >> 16) | 0x40)};
    u += 0x7fffu + ((u >> 16) & 1);
    return {(uint16_t)(u >> 16)};
}
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)}; }
struct __half { _Float16 h; };
inline float __half2float(__half h) { return (float)h.h; }
inline __half __float2half_rn(float f) { return {(_Float16)f}; }

inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline float __expf(float a) { return expf(a); }
inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; memcpy(&i, &f, 4); return i; }
inline unsigned __float_as_uint(float f) { unsigned i; memcpy(&i, &f, 4); return i; }
inline float __uint_as_float(unsigned i) { float f; memcpy(&f, &i, 4); return f; }
inline uint32_t __byte_perm(uint32_t x, uint32_t y, uint32_t s) {
    uint64_t v = ((uint64_t)y << 32) | x;
    uint32_t r = 0;
    for (int i = 0; i < 4; ++i) r |= (uint32_t)((v >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
    return r;
}
inline size_t __cvta_generic_to_shared(const void* p) { return (size_t)p; }
template <class T> T atomicAdd(T* p, T v) {
    if constexpr (std::is_floating_point_v<T>) {
        T o = *p, n = o + v;
        while (!__atomic_compare_exchange(p, &o, &n, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) n = o + v;
        return o;
    } else {
        return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
    }
}
template <class T> T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
template <class T> T atomicMax(T* p, T v) { T o = *p; while (o < v && !__atomic_compare_exchange_n(p, &o, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {} return o; }
template <class T> T atomicMin(T* p, T v) { T o = *p; while (o > v && !__atomic_compare_exchange_n(p, &o, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {} return o; }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

namespace emu {
struct alignas(16) Slot { unsigned char b[64]; const void* ptr; };
struct Cta {
    int n;
    std::barrier<>* all;
    std::vector<std::barrier<>*> warps;
    std::vector<Slot> slots;
    char* smem = nullptr;  // the CTA's dynamic shared memory (run_cta's smem_bytes)
};
inline thread_local Cta* cta;
inline thread_local int tid;
// A kernel's `extern __shared__` array: the running CTA's buffer.
inline char* cta_smem() { return cta->smem; }
inline void warp_sync() { cta->warps[tid >> 5]->arrive_and_wait(); }
inline Slot& slot(int lane) { return cta->slots[(tid & ~31) + lane]; }
inline void run_cta(int block, int nthreads, const std::function<void()>& body, int smem_bytes = 0) {
    Cta c;
    std::vector<uint4> smem((smem_bytes + 15) / 16 + 1);
    c.smem = reinterpret_cast<char*>(smem.data());
    c.n = nthreads;
    c.all = new std::barrier<>(nthreads);
    for (int w = 0; w < nthreads / 32; ++w) c.warps.push_back(new std::barrier<>(32));
    c.slots.resize(nthreads);
    std::vector<std::thread> ts;
    for (int t = 0; t < nthreads; ++t)
        ts.emplace_back([&, t] {
            cta = &c;
            tid = t;
            threadIdx.x = t;
            blockIdx.x = block;
            body();
        });
    for (auto& t : ts) t.join();
    delete c.all;
    for (auto* b : c.warps) delete b;
}
inline void mma16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    Slot& me = slot(tid & 31);
    memcpy(me.b, a, 16);
    memcpy(me.b + 16, b, 8);
    warp_sync();
    float A[16][16], B[16][8];
    auto bf = [](uint32_t w, int hi) { return __bfloat162float({(uint16_t)(hi ? w >> 16 : w & 0xffff)}); };
    for (int L = 0; L < 32; ++L) {
        const Slot& s = slot(L);
        uint32_t la[4], lb[2];
        memcpy(la, s.b, 16);
        memcpy(lb, s.b + 16, 8);
        const int g = L >> 2, t = L & 3;
        for (int h = 0; h < 2; ++h) {
            A[g][2 * t + h] = bf(la[0], h);
            A[g + 8][2 * t + h] = bf(la[1], h);
            A[g][2 * t + 8 + h] = bf(la[2], h);
            A[g + 8][2 * t + 8 + h] = bf(la[3], h);
            B[2 * t + h][g] = bf(lb[0], h);
            B[2 * t + 8 + h][g] = bf(lb[1], h);
        }
    }
    warp_sync();
    const int l = tid & 31, g = l >> 2, t = l & 3;
    const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
    for (int e = 0; e < 4; ++e) {
        float acc = d[e];
        for (int k = 0; k < 16; ++k) acc += A[rows[e]][k] * B[k][cols[e]];
        d[e] = acc;
    }
}
template <int N> inline void ldsm(uint32_t (&r)[N], int n, bool trans, const void* p) {
    slot(tid & 31).ptr = p;
    warp_sync();
    const int l = tid & 31;
    for (int i = 0; i < n; ++i) {
        if (!trans) {
            r[i] = reinterpret_cast<const uint32_t*>(slot(8 * i + (l >> 2)).ptr)[l & 3];
        } else {
            const uint16_t lo = reinterpret_cast<const uint16_t*>(slot(8 * i + 2 * (l & 3)).ptr)[l >> 2];
            const uint16_t hi = reinterpret_cast<const uint16_t*>(slot(8 * i + 2 * (l & 3) + 1).ptr)[l >> 2];
            r[i] = lo | ((uint32_t)hi << 16);
        }
    }
    warp_sync();
}
inline void cp_async16(void* dst, const void* src, bool ok) {
    if (ok) memcpy(dst, src, 16); else memset(dst, 0, 16);
}
// PTX prmt.b32 (default mode): byte i of the result is byte sel[4i+2:4i]
// of {b, a}, or that byte's sign replicated where sel bit 4i+3 is set.
inline uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
    const uint64_t v = ((uint64_t)b << 32) | a;
    uint32_t r = 0;
    for (int i = 0; i < 4; ++i) {
        const uint32_t n = (sel >> (4 * i)) & 15;
        uint32_t byte = (uint32_t)(v >> (8 * (n & 7))) & 0xff;
        if (n & 8) byte = (byte & 0x80) ? 0xff : 0;
        r |= byte << (8 * i);
    }
    return r;
}
// PTX mul.rn.bf16x2: each half the product of the halves, rounded to nearest
// even (the f32 product of two bf16 values is exact).
inline uint32_t hmul2_bf16(uint32_t a, uint32_t b) {
    uint32_t r = 0;
    for (int h = 0; h < 2; ++h) {
        const float x = __bfloat162float({(uint16_t)(a >> (16 * h))}), y = __bfloat162float({(uint16_t)(b >> (16 * h))});
        r |= (uint32_t)__float2bfloat16_rn(x * y).raw << (16 * h);
    }
    return r;
}
[[noreturn]] inline void unsupported(const char* ptx) {
    fprintf(stderr, "host emulation: no model of the PTX instruction `%s`\n", ptx);
    abort();
}
}  // namespace emu

template <class T> T __shfl_xor_sync(unsigned, T v, int m) {
    memcpy(emu::slot(emu::tid & 31).b, &v, sizeof(T));
    emu::warp_sync();
    T r;
    memcpy(&r, emu::slot((emu::tid & 31) ^ m).b, sizeof(T));
    emu::warp_sync();
    return r;
}
template <class T> T __shfl_sync(unsigned, T v, int src) {
    memcpy(emu::slot(emu::tid & 31).b, &v, sizeof(T));
    emu::warp_sync();
    T r;
    memcpy(&r, emu::slot(src & 31).b, sizeof(T));
    emu::warp_sync();
    return r;
}
template <class T> T __shfl_up_sync(unsigned, T v, int d) {
    memcpy(emu::slot(emu::tid & 31).b, &v, sizeof(T));
    emu::warp_sync();
    const int l = emu::tid & 31;
    T r;
    memcpy(&r, emu::slot(l >= d ? l - d : l).b, sizeof(T));
    emu::warp_sync();
    return r;
}
namespace emu {
// Every lane's 32-bit value, for the warp-wide intrinsics below.
inline void gather(uint32_t v, uint32_t (&all)[32]) {
    memcpy(slot(tid & 31).b, &v, 4);
    warp_sync();
    for (int l = 0; l < 32; ++l) memcpy(&all[l], slot(l).b, 4);
    warp_sync();
}
}  // namespace emu
inline unsigned __ballot_sync(unsigned, int p) {
    uint32_t all[32];
    emu::gather(p != 0, all);
    unsigned r = 0;
    for (int l = 0; l < 32; ++l) r |= (all[l] ? 1u : 0u) << l;
    return r;
}
inline unsigned __match_any_sync(unsigned, unsigned v) {
    uint32_t all[32];
    emu::gather(v, all);
    unsigned r = 0;
    for (int l = 0; l < 32; ++l) r |= (all[l] == v ? 1u : 0u) << l;
    return r;
}
inline unsigned __reduce_max_sync(unsigned, unsigned v) {
    uint32_t all[32];
    emu::gather(v, all);
    unsigned r = 0;
    for (int l = 0; l < 32; ++l) r = all[l] > r ? all[l] : r;
    return r;
}
inline unsigned __reduce_min_sync(unsigned, unsigned v) {
    uint32_t all[32];
    emu::gather(v, all);
    unsigned r = 0xffffffffu;
    for (int l = 0; l < 32; ++l) r = all[l] < r ? all[l] : r;
    return r;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.raw; }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_sync(); }
inline void __syncthreads() { emu::cta->all->arrive_and_wait(); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
