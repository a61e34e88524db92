// tilefuse token choice: argmax and temperature sampling over logits rows,
// as the interpreter's `sample.argmax` and `sample.sample` (ir/src/interp.rs).
//
// One CTA per row (tile = row t of [T, V]); logits f32 or bf16, read with
// ordinary loads (they are usually produced earlier in the same launch).
#pragma once
#include "prelude.cuh"

namespace tf {

namespace sample_detail {
// Total order of sample.argmax: NaN above every number (first NaN wins), then
// larger values, ties to the lower index.
__device__ __forceinline__ bool before(float a, int ia, float b, int ib) {
    const bool na = a != a, nb = b != b;
    if (na || nb) return na && (!nb || ia < ib);
    return a > b || (a == b && ia < ib);
}
__device__ __forceinline__ void warp_best(float& v, int& i) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const int oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (oi >= 0 && (i < 0 || before(ov, oi, v, i))) v = ov, i = oi;
    }
}
template <typename L> __device__ __forceinline__ float ld_logit(const L* row, int i) { return to_float(row[i]); }
}  // namespace sample_detail

// Shared memory of argmax_tile: 8 * THREADS/32 bytes.
template <int THREADS> __host__ __device__ constexpr int argmax_smem_bytes() { return 8 * (THREADS / 32); }

// argmax_tile
//
// out[tile] = the first index of the maximum of logits[tile, 0..V) (NaN counts
// as the maximum). Tiles: T, one per row. Each thread scans i = tid, tid +
// THREADS, ...; warps and then warp 0 combine under the total order above, so
// the result does not depend on the scan order. No rounding (comparisons only).
// Shared memory: argmax_smem_bytes<THREADS>().
template <int THREADS, typename L>
__device__ void argmax_tile(int tile, const L* __restrict__ logits, int V, int* __restrict__ out, char* smem) {
    static_assert(THREADS % 32 == 0 && THREADS <= 1024, "THREADS");
    constexpr int NW = THREADS / 32;
    __syncthreads();
    const L* row = logits + (size_t)tile * V;
    float bv = 0.f;
    int bi = -1;
#pragma unroll 4
    for (int i = threadIdx.x; i < V; i += THREADS) {
        const float v = sample_detail::ld_logit(row, i);
        if (bi < 0 || sample_detail::before(v, i, bv, bi)) bv = v, bi = i;
    }
    sample_detail::warp_best(bv, bi);
    float* sv = reinterpret_cast<float*>(smem);
    int* si = reinterpret_cast<int*>(smem) + NW;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) sv[warp] = bv, si[warp] = bi;
    __syncthreads();
    if (warp == 0) {
        bv = lane < NW ? sv[lane] : 0.f;
        bi = lane < NW ? si[lane] : -1;
        sample_detail::warp_best(bv, bi);
        if (lane == 0) out[tile] = bi;
    }
}

// Shared memory of sample_tile: 4 * (3 * THREADS/32 + 4) bytes.
template <int THREADS> __host__ __device__ constexpr int sample_smem_bytes() { return 4 * (3 * (THREADS / 32) + 4); }

// sample_tile
//
// out[tile] = the token of row t = tile drawn by the interpreter's rule:
//   m = max of the row (NaN ignored, f32::max), e_i = expf((l_i - m) / temperature),
//   total = sum of e_i, target = u * total with u = uniform01(seed[0], seed[1] + t),
//   the first i whose running sum exceeds target; if none (rounding, or a NaN
//   total), the last i with e_i > 0; -1 if no e_i > 0 (the interpreter errors).
// Tiles: T. Shared memory: sample_smem_bytes<THREADS>().
//
// How the running sum is made parallel. The oracle adds e_0, e_1, ... in f32
// one after the other, which no parallel order reproduces bit for bit. Here
// the row is cut into segments of 128 elements (lane l of a warp owns the 4
// consecutive elements 4l..4l+3); warp w owns the consecutive segments
// [w*R, (w+1)*R), R = ceil(ceil(V/128) / W). Pass 1: each lane adds its 4
// values in index order, a warp inclusive scan (Hillis-Steele, f32) gives the
// lane prefixes, the warp adds its segment totals in order, and thread 0 adds
// the W warp totals in order: total and each warp's starting prefix. Pass 2:
// the first warp w* whose prefix + total exceeds target rescans its segments
// from that prefix: element i's running sum is ((prefix + segment sums) +
// lane exclusive prefix) + e of the lane's elements up to i, in that order;
// the first element (a ballot picks the lowest lane) above target wins. If
// rounding leaves none in w*'s range, the scan goes on into the next ranges.
// Everything is in index order and deterministic (the same every run and in
// every launch mode); it differs from the sequential f32 sum only in how the
// roundings associate. expf is within 2 ulp of the exact exponential, and the
// two sums differ by a few ulp of the total (about sqrt(V) * 2^-24 * total in
// the worst realistic case), so a different token can only come out when
// target falls within that distance of a running-sum boundary: with
// probability about that distance divided by the chosen token's e_i, i.e.
// never for peaked distributions, and rarely (between neighbouring indices)
// for a near-flat distribution over a large vocabulary.
template <int THREADS, typename L>
__device__ void sample_tile(int tile, const L* __restrict__ logits, int V, float temperature, const int* __restrict__ seed,
                            int* __restrict__ out, char* smem) {
    static_assert(THREADS % 32 == 0 && THREADS <= 1024, "THREADS");
    constexpr int NW = THREADS / 32, SEG = 128;
    __syncthreads();
    float* scratch = reinterpret_cast<float*>(smem);        // [NW]: warp maxima
    float* wtot = scratch + NW;                             // [NW]: warp totals, then prefixes
    int* wlast = reinterpret_cast<int*>(wtot + NW);         // [NW]: last positive index per warp
    float* misc = reinterpret_cast<float*>(wlast + NW);     // [0] target, [1] (int) w*
    const L* row = logits + (size_t)tile * V;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

    float lm = -f32_inf();
    for (int i = threadIdx.x; i < V; i += THREADS) lm = fmaxf(lm, sample_detail::ld_logit(row, i));
    lm = warp_max(lm);
    if (lane == 0) scratch[warp] = lm;
    __syncthreads();
    float m = -f32_inf();
#pragma unroll
    for (int w = 0; w < NW; ++w) m = fmaxf(m, scratch[w]);

    auto ev = [&](int i) { return i < V ? expf((sample_detail::ld_logit(row, i) - m) / temperature) : 0.f; };
    const int nseg = cdiv(V, SEG), R = cdiv(nseg, NW);
    // Lane sums and the warp scan of one segment; returns the segment total.
    auto segment = [&](int s, float (&e)[4], float& excl) {
        const int base = s * SEG + 4 * lane;
#pragma unroll
        for (int j = 0; j < 4; ++j) e[j] = ev(base + j);
        const float ls = ((e[0] + e[1]) + e[2]) + e[3];
        float inc = ls;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const float y = __shfl_up_sync(0xffffffffu, inc, o);
            if (lane >= o) inc = y + inc;
        }
        excl = __shfl_up_sync(0xffffffffu, inc, 1);
        if (lane == 0) excl = 0.f;
        return __shfl_sync(0xffffffffu, inc, 31);
    };

    // Pass 1.
    float run = 0.f;
    int last = -1;
    const int s_end = min(nseg, (warp + 1) * R);
    for (int s = warp * R; s < s_end; ++s) {
        float e[4], excl;
        run = run + segment(s, e, excl);
#pragma unroll
        for (int j = 0; j < 4; ++j)
            if (e[j] > 0.f) last = s * SEG + 4 * lane + j;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) last = max(last, __shfl_xor_sync(0xffffffffu, last, o));
    if (lane == 0) wtot[warp] = run, wlast[warp] = last;
    __syncthreads();
    if (threadIdx.x == 0) {
        float pre = 0.f;
        int ws = NW;
        const float u = uniform01((uint32_t)seed[0], (uint32_t)seed[1] + (uint32_t)tile);
        float total = 0.f;
        for (int w = 0; w < NW; ++w) total = total + wtot[w];
        const float target = u * total;
        for (int w = 0; w < NW; ++w) {
            const float t = wtot[w];
            wtot[w] = pre;  // now the warp's starting prefix
            if (ws == NW && pre + t > target) ws = w;
            pre = pre + t;
        }
        int lastall = -1;
        for (int w = 0; w < NW; ++w) lastall = max(lastall, wlast[w]);
        misc[0] = target;
        reinterpret_cast<int*>(misc)[1] = ws;
        reinterpret_cast<int*>(misc)[2] = lastall;
    }
    __syncthreads();
    const int ws = reinterpret_cast<int*>(misc)[1];
    if (warp == (ws < NW ? ws : 0)) {
        int found = -1;
        if (ws < NW) {
            const float target = misc[0];
            float runp = wtot[ws];
            for (int s = ws * R; s < nseg && found < 0; ++s) {
                float e[4], excl;
                const float tot = segment(s, e, excl);
                float c = runp + excl;
                int jf = 4;
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    c = c + e[j];
                    if (jf == 4 && c > target) jf = j;
                }
                const uint32_t b = __ballot_sync(0xffffffffu, jf < 4);
                if (b != 0) {
                    const int fl = __ffs(b) - 1;
                    found = s * SEG + 4 * fl + __shfl_sync(0xffffffffu, jf, fl);
                }
                runp = runp + tot;
            }
        }
        if (lane == 0) out[tile] = found >= 0 ? found : reinterpret_cast<int*>(misc)[2];
    }
}

}  // namespace tf
