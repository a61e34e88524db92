// tilefuse attention templates: RoPE + KV-cache append, grouped-query attention
// (flash-decoding split over keys, bf16 tensor cores), its split combine, a
// standalone row RMSNorm and the embedding gather. Header-only, namespace tf.
//
// Every `*_tile` function is a CTA-wide tile: called by all THREADS threads of
// a CTA with the same arguments, from a `__global__` wrapper (one tile per
// CTA) or from a persistent kernel that calls it in a loop; each begins with
// `__syncthreads()` before it touches shared memory, keeps nothing between
// calls and uses no global state. `smem` is the kernel's dynamic shared memory
// (16-byte aligned, at least the tile's `*_SMEM_BYTES`).
//
// The oracle is the CPU interpreter (ir/src/interp.rs). Rounding points are
// reproduced where the interpreter rounds: RoPE cos/sin (f64 cos/sin of the
// f32 angle, then f32, then Act), every RoPE output, RMSNorm's `n` and its
// output, probabilities (see attention_tile for the split-key deviation) and
// every stored activation. f32 arithmetic that the interpreter does without
// fused multiply-adds uses the `__f*_rn` intrinsics so that NVRTC cannot
// contract it.
//
// Memory contract shared by all tiles: pointers are 16-byte aligned and row
// strides (in elements) are multiples of 16 bytes; head dims are multiples of
// 8 elements (16 bytes of bf16). KV caches are `[cap, heads, d]` row-major;
// position `j` lives in slot `j % cap` (a ring for sliding layers, where
// `cap = window + max_tokens - 1`; a full cache otherwise, `cap = context`).
#pragma once
#include "prelude.cuh"

namespace tf {

// Attention mask kinds (ir::Mask). A window of 0 means "no window".
enum : int { MASK_CAUSAL = 0, MASK_BLOCK = 1 };

namespace attn_detail {

__host__ __device__ constexpr int cmax(int a, int b) { return a > b ? a : b; }
__host__ __device__ constexpr int align16(int b) { return (b + 15) / 16 * 16; }
template <typename A, typename B> struct same_type { static constexpr bool value = false; };
template <typename A> struct same_type<A, A> { static constexpr bool value = true; };

__device__ __forceinline__ double warp_sum_f64(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over the CTA in f64; every thread gets the result. `scratch` holds
// THREADS/32 doubles. Two barriers; call from all threads.
template <int THREADS> __device__ __forceinline__ double block_sum_f64(double v, double* scratch) {
    constexpr int W = THREADS / 32;
    v = warp_sum_f64(v);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    double r = 0.0;
#pragma unroll
    for (int i = 0; i < W; ++i) r += scratch[i];
    return r;
}

// Coherent 16-byte load that does not allocate in L1: KV rows, each byte of
// which one instruction consumes. Not `.nc`: in a persistent kernel the rows
// of this forward were written by rope_append_tile in the same launch.
__device__ __forceinline__ uint4 ld_kv_v4(const void* p) {
    uint4 r;
    asm volatile("ld.global.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
}

__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

// Word `w` (compile-time after unrolling) of a uint4.
__device__ __forceinline__ uint32_t word(const uint4& v, int w) {
    return w == 0 ? v.x : w == 1 ? v.y : w == 2 ? v.z : v.w;
}

// bf16x2 made of the low (resp. high) halves of a and b; a lands in the low half.
__device__ __forceinline__ uint32_t pair_lo(uint32_t a, uint32_t b) { return __byte_perm(a, b, 0x5410); }
__device__ __forceinline__ uint32_t pair_hi(uint32_t a, uint32_t b) { return __byte_perm(a, b, 0x7632); }

// Slot of the key `d` positions after a key whose slot is `base` (< cap).
// One subtraction when d < cap (always, for a consistent graph); never out of range.
__device__ __forceinline__ int ring_slot(int base, int d, int cap) {
    const int s = base + d;
    if (s < cap) return s;
    const int s2 = s - cap;
    return s2 < cap ? s2 : s2 % cap;
}

// 16 bytes of Act <-> floats.
template <typename Act> struct Vec;
template <> struct Vec<bf16> {
    static constexpr int N = 8;
    __device__ __forceinline__ static void load(const bf16* p, float (&o)[8]) { bf16x8_to_float(ld_v4(p), o); }
    __device__ __forceinline__ static void store(bf16* p, const float (&x)[8]) {
        uint4 v;
        v.x = pack_bf16x2(x[0], x[1]);
        v.y = pack_bf16x2(x[2], x[3]);
        v.z = pack_bf16x2(x[4], x[5]);
        v.w = pack_bf16x2(x[6], x[7]);
        *reinterpret_cast<uint4*>(p) = v;
    }
};
template <> struct Vec<float> {
    static constexpr int N = 4;
    __device__ __forceinline__ static void load(const float* p, float (&o)[4]) {
        const float4 v = *reinterpret_cast<const float4*>(p);
        o[0] = v.x;
        o[1] = v.y;
        o[2] = v.z;
        o[3] = v.w;
    }
    __device__ __forceinline__ static void store(float* p, const float (&x)[4]) {
        *reinterpret_cast<float4*>(p) = make_float4(x[0], x[1], x[2], x[3]);
    }
};

// sin and cos of x (|x| < 2^20 * pi/2) in f64, within 1 f64 ulp of the correctly
// rounded values: Cody-Waite reduction by pi/2 in three f64 parts (exact for
// these |x| with fma), fdlibm's __kernel_sin/__kernel_cos polynomials on
// [-pi/4, pi/4]. Used instead of CUDA's sincos(double), whose Payne-Hanek slow
// path costs a 40-byte stack frame. Checked on the host against glibc for every
// RoPE angle of positions < 70000 (theta 1e4, 1e6, 5e6; 4..64 frequencies) and 2e7
// random f32 angles in +-3e5: rounded to f32, identical in every case.
__device__ __forceinline__ void sincos_f64(double x, double* s, double* c) {
    const double k = rint(x * 0.63661977236758138);  // 2/pi
    double r = fma(-k, 1.5707963267948966, x);
    r = fma(-k, 6.123233995736766e-17, r);
    r = fma(-k, -1.4973849048591698e-33, r);
    const double z = r * r;
    const double ps =
        r + r * z *
                (-1.66666666666666324348e-01 +
                 z * (8.33333333332248946124e-03 +
                      z * (-1.98412698298579493134e-04 +
                           z * (2.75573137070700676789e-06 +
                                z * (-2.50507602534068634195e-08 + z * 1.58969099521155010221e-10)))));
    const double cr =
        z * z *
        (4.16666666666666019037e-02 +
         z * (-1.38888888888741095749e-03 +
              z * (2.48015872894767294178e-05 +
                   z * (-2.75573143513906633035e-07 +
                        z * (2.08757232129817482790e-09 + z * -1.13596475577881948265e-11)))));
    const double hz = 0.5 * z, w = 1.0 - hz;
    const double pc = w + (((1.0 - w) - hz) + cr);
    const int q = (int)((long long)k & 3);
    *s = q == 0 ? ps : q == 1 ? pc : q == 2 ? -ps : -pc;
    *c = q == 0 ? pc : q == 1 ? -ps : q == 2 ? -pc : ps;
}

// RoPE (cos, sin) of frequency `i` at position `pos`, exactly as interp nn.rope:
// inv_freq = 1 / theta^((2i)/rot) in f32, angle = pos * inv_freq in f32, cos/sin
// of the f32 angle in f64, rounded to f32, then to Act. theta^e is pow in f64
// rounded to f32, i.e. the correctly rounded powf; the interpreter's powf
// (glibc through Rust) equals it for every frequency of theta 1e4, 1e6, 5e6, 1e7
// with rot 8, 16, 64, 128 (checked exhaustively on the host) but misrounds ~0.1%
// of other (theta, exponent) pairs by one f32 ulp. Should a model hit one, the
// generator can pass a host-computed inv_freq table instead.
// Positions up to ~1.6M (|angle| < 2^20 pi/2).
template <typename Act> __device__ __forceinline__ float2 rope_cos_sin(int pos, int i, int rot, float theta) {
    const float e = __fdiv_rn((float)(2 * i), (float)rot);
    const float pw = (float)pow((double)theta, (double)e);
    const float inv = __fdiv_rn(1.0f, pw);
    const float ang = __fmul_rn((float)pos, inv);
    double s, c;
    sincos_f64((double)ang, &s, &c);
    return make_float2(round_to<Act>((float)c), round_to<Act>((float)s));
}

// One warp: the head row `src` (D elements, global) -> optional per-head
// RMSNorm (interp nn.rms_norm: f64 mean square, n = round(x * rsqrt), out =
// round(gamma * n)) -> rotate-half RoPE on the first ROT dims with the table
// `cs` (ROT/2 (cos, sin) pairs) -> `dst` (D elements of Act in shared memory,
// 16-byte aligned). Every value stored is rounded to Act, as the interpreter
// rounds each op's output. Ends with __syncwarp(): dst is complete for the warp.
template <typename Act, int D, int ROT, bool NORM>
__device__ __forceinline__ void head_prep_warp(const Act* __restrict__ src, const Act* __restrict__ gamma, float eps,
                                               const float2* cs, Act* dst) {
    using V = Vec<Act>;
    constexpr int VN = V::N, NV = D / VN, PER = (NV + 31) / 32, HALF = ROT / 2;
    static_assert(D % VN == 0, "head dim must be a multiple of 16 bytes");
    static_assert(ROT % 2 == 0 && ROT <= D, "rot dims must be even and <= head dim");
    const int lane = threadIdx.x & 31;
    float x[PER][VN], gm[NORM ? PER : 1][VN];
    double ss = 0.0;
    // The weights gamma are loaded with x (one round trip for both).
#pragma unroll
    for (int i = 0; i < PER; ++i) {
        const int c = lane + 32 * i;
        if (c < NV) {
            V::load(src + c * VN, x[i]);
            if (NORM) V::load(gamma + c * VN, gm[i]);
        }
    }
#pragma unroll
    for (int i = 0; i < PER; ++i) {
        const int c = lane + 32 * i;
        if (NORM && c < NV) {
#pragma unroll
            for (int e = 0; e < VN; ++e) ss += (double)x[i][e] * (double)x[i][e];
        }
    }
    if (NORM) {
        ss = warp_sum_f64(ss);
        const float ms = (float)(ss / (double)D);
        const float rs = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(ms, eps)));
#pragma unroll
        for (int i = 0; i < PER; ++i) {
            const int c = lane + 32 * i;
            if (c < NV) {
#pragma unroll
                for (int e = 0; e < VN; ++e) {
                    const float n = round_to<Act>(__fmul_rn(x[i][e], rs));
                    x[i][e] = __fmul_rn(gm[i][e], n);  // rounded by the store below
                }
            }
        }
    }
#pragma unroll
    for (int i = 0; i < PER; ++i) {
        const int c = lane + 32 * i;
        if (c < NV) V::store(dst + c * VN, x[i]);
    }
    __syncwarp();
    if (HALF > 0) {
        // Pairs (f, f + HALF) are disjoint: each lane reads and writes only its own.
        for (int f = lane; f < HALF; f += 32) {
            const float x1 = to_float(dst[f]), x2 = to_float(dst[f + HALF]);
            const float c = cs[f].x, s = cs[f].y;
            dst[f] = from_float<Act>(__fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s)));
            dst[f + HALF] = from_float<Act>(__fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s)));
        }
        __syncwarp();
    }
}

}  // namespace attn_detail

// =====================================================================================
// rope_append_tile
// =====================================================================================
//
// Computes, for the T new rows S..S+T-1 of one attention layer's caches:
//   k_rot = RoPE(KNORM ? rms_norm_head(k, k_norm_w, eps) : k)   (interp nn.rms_norm
//           on the [T, HKV, DK] view, then nn.rope with `theta`, ROT dims, row t
//           rotated at position pos[t])
//   k_cache[(S+t) % cap][h][:] = k_rot[t][h][:],  v_cache[(S+t) % cap][h][:] = v[t][h][:]
// (interp attn.kv_append for both caches; v is stored as given.)
// Inputs: k [T, HKV*DK] with row stride k_stride, v [T, HKV*DV] with row stride
// v_stride (elements; e.g. column slices of one fused QKV output).
// Tiles: one per token, `tiles = T`; a tile handles all kv heads of its token
// (one warp per head for k, all threads for v).
// Rounding: cos/sin to Act; n = round(x*rsqrt) and gamma*n rounded; every RoPE
// output rounded to Act; v copied bit for bit.
// Shared memory: rope_append_smem_bytes<Act, HKV, DK, ROT>().
template <typename Act, int HKV, int DK, int ROT>
__host__ __device__ constexpr int rope_append_smem_bytes() {
    return attn_detail::align16((ROT / 2) * 8) + HKV * DK * (int)sizeof(Act);
}

template <typename Act, int HKV, int DK, int DV, int ROT, bool KNORM, int THREADS>
__device__ void rope_append_tile(int tile, int T, int S, int cap, const int* __restrict__ pos,
                                 const Act* __restrict__ k, int k_stride,
                                 const Act* __restrict__ v, int v_stride, const Act* __restrict__ k_norm_w, float eps,
                                 float theta, Act* __restrict__ k_cache, Act* __restrict__ v_cache, char* smem) {
    using namespace attn_detail;
    using V = Vec<Act>;
    constexpr int NW = THREADS / 32, HALF = ROT / 2, VN = V::N;
    static_assert(THREADS % 32 == 0, "THREADS must be a multiple of 32");
    static_assert(DK % VN == 0 && DV % VN == 0, "head dims must be multiples of 16 bytes");
    float2* cs = reinterpret_cast<float2*>(smem);
    Act* krow = reinterpret_cast<Act*>(smem + align16(HALF * 8));
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int t = tile;
    const size_t slot = (size_t)((S + t) % cap);
    const int p = pos[t];
    __syncthreads();  // the previous tile of a persistent loop may still read smem
    for (int f = tid; f < HALF; f += THREADS) cs[f] = rope_cos_sin<Act>(p, f, ROT, theta);
    __syncthreads();
    for (int h = warp; h < HKV; h += NW) {
        Act* row = krow + h * DK;
        head_prep_warp<Act, DK, ROT, KNORM>(k + (size_t)t * k_stride + h * DK, k_norm_w, eps, cs, row);
        Act* dst = k_cache + (slot * HKV + h) * DK;
        for (int c = lane; c < DK / VN; c += 32)
            *reinterpret_cast<uint4*>(dst + c * VN) = *reinterpret_cast<const uint4*>(row + c * VN);
    }
    constexpr int NVV = HKV * (DV / VN);
    for (int i = tid; i < NVV; i += THREADS) {
        const int h = i / (DV / VN), c = i % (DV / VN);
        *reinterpret_cast<uint4*>(v_cache + (slot * HKV + h) * DV + c * VN) =
            ld_v4(v + (size_t)t * v_stride + h * DV + c * VN);
    }
}

// =====================================================================================
// attention_tile, attention_combine_tile
// =====================================================================================
//
// Shape and schedule constants of one attention layer. Instantiate as
//   using A = tf::AttnConfig<tf::bf16, HQ, HKV, DK, DV, ROT, MASK, WINDOW, SINKS, QNORM,
//                            TQ, NSPLIT, CH, THREADS>;
// - MASK: MASK_CAUSAL or MASK_BLOCK; WINDOW: sliding window (0 = none).
// - SINKS: one sink logit per query head (an extra softmax column, dropped).
// - QNORM: per-head RMSNorm of q (Qwen3 q_norm) before RoPE; ROT = 0: no RoPE.
// - TQ: query tokens per tile; the tile's rows are its TQ tokens x G = HQ/HKV
//   query heads of one kv head (token-major), padded to MT m16 tiles.
// - NSPLIT: key splits per (query block, kv head) (flash-decoding). With
//   NSPLIT = 1 attention_tile writes `out`; with NSPLIT > 1 it writes partials
//   to `ws` and attention_combine_tile writes `out`.
// - CH: keys per sub-chunk, a multiple of 32 (smem holds CH scores per row).
//   A split's range is ceil(R / NSPLIT) rounded up to 16 keys, R <= the tile's
//   key range (<= cap for a full cache, <= WINDOW + TQ - 1 causal on a ring);
//   choose CH >= that bound so each split is one sub-chunk (one pass, exact
//   rounding for NSPLIT = 1). Longer ranges are still correct: they are walked in
//   sub-chunks merged online (with the split-key rounding deviation).
// - THREADS: CTA size; THREADS/32 must be a multiple of MT.
// Grid: tiles(T) = ceil(T/TQ) * HKV * NSPLIT attention tiles, then (NSPLIT > 1)
// combine_tiles(T) = T * HQ combine tiles. Workspace (NSPLIT > 1):
// ws_floats(T) = T * HQ * NSPLIT * (DV + 2) floats.
template <typename Act_, int HQ_, int HKV_, int DK_, int DV_, int ROT_, int MASK_, int WINDOW_, bool SINKS_,
          bool QNORM_, int TQ_, int NSPLIT_, int CH_, int THREADS_>
struct AttnConfig {
    using Act = Act_;
    static constexpr int HQ = HQ_, HKV = HKV_, DK = DK_, DV = DV_, ROT = ROT_, MASK = MASK_, WINDOW = WINDOW_;
    static constexpr bool SINKS = SINKS_, QNORM = QNORM_;
    static constexpr int TQ = TQ_, NSPLIT = NSPLIT_, CH = CH_, THREADS = THREADS_;
    static constexpr int G = HQ / HKV;          // query heads per kv head
    static constexpr int ROWS = TQ * G;         // query rows of a tile
    static constexpr int MT = (ROWS + 15) / 16; // m16 tiles
    static constexpr int MR = MT * 16;          // rows including padding
    static constexpr int NW = THREADS / 32;     // warps
    static constexpr int WPM = NW / (MT > 0 ? MT : 1);  // warps per m-tile
    static constexpr int KB32 = (DK + 31) / 32; // 32-dim blocks of q/k (2 mma k-steps each)
    static constexpr int VG = (DV + 63) / 64;   // 64-dim groups of v (8 mma n-tiles each)
    static constexpr int NREG = VG * 32;        // output accumulator floats per lane
    static constexpr int HALF = ROT / 2;
    static constexpr int QS = KB32 * 32 + 8;    // bf16 per smem Q row (padded)
    static constexpr int SS = CH + 8;           // floats per smem score row
    static constexpr int PS = CH + 8;           // bf16 per smem probability row
    // Shared memory layout (bytes): Q | cos,sin | row stats (m, l, c_run, c_sub) | O
    // | union{ scores S + probabilities P, cross-warp reduction }.
    static constexpr int Q_BYTES = MR * QS * 2;
    static constexpr int CS_BYTES = attn_detail::align16(TQ * HALF * 8);
    static constexpr int ST_BYTES = MR * 4 * 4;
    static constexpr int O_BYTES = MR * DV * 4;
    static constexpr int SP_BYTES = MR * SS * 4 + MR * PS * 2;
    static constexpr int RED_BYTES = NW * NREG * 32 * 4;
    static constexpr int OFF_CS = Q_BYTES;
    static constexpr int OFF_ST = OFF_CS + CS_BYTES;
    static constexpr int OFF_O = OFF_ST + ST_BYTES;
    static constexpr int OFF_U = OFF_O + O_BYTES;
    // Dynamic shared memory of attention_tile:
    //   MR*QS*2 + align16(TQ*ROT/2*8) + MR*16 + MR*DV*4 + max(MR*(CH+8)*6, (THREADS/32)*VG*32*128)
    static constexpr int SMEM_BYTES = OFF_U + attn_detail::cmax(SP_BYTES, RED_BYTES);
    // Dynamic shared memory of attention_combine_tile: NSPLIT floats.
    static constexpr int COMBINE_SMEM_BYTES = NSPLIT * 4;
    __host__ __device__ static constexpr int tiles(int T) { return (T + TQ - 1) / TQ * HKV * NSPLIT; }
    __host__ __device__ static constexpr int combine_tiles(int T) { return T * HQ; }
    __host__ __device__ static constexpr long long ws_floats(int T) {
        return NSPLIT > 1 ? (long long)T * HQ * NSPLIT * (DV + 2) : 0;
    }

    static_assert(attn_detail::same_type<Act, bf16>::value, "attention_tile runs on bf16 tensor cores: Act must be tf::bf16");
    static_assert(HKV > 0 && HQ % HKV == 0, "HQ must be a multiple of HKV");
    static_assert(DK % 8 == 0 && DV % 8 == 0, "head dims must be multiples of 8");
    static_assert(DV <= 256, "DV <= 256 (one L2 prefetch per 128-byte line per lane group)");
    static_assert(ROT % 2 == 0 && ROT >= 0 && ROT <= DK, "ROT must be even and <= DK");
    static_assert(MASK == MASK_CAUSAL || MASK == MASK_BLOCK, "unknown mask kind");
    static_assert(WINDOW >= 0, "WINDOW >= 0 (0 = none)");
    static_assert(TQ >= 1 && NSPLIT >= 1, "TQ, NSPLIT >= 1");
    static_assert(CH >= 32 && CH % 32 == 0, "CH must be a positive multiple of 32");
    static_assert(THREADS % 32 == 0 && NW % MT == 0, "THREADS/32 must be a multiple of the m-tiles MT");
};

namespace attn_detail {
// The first query token of attention tile `tile`: tile = (qb * HKV + kvh) *
// NSPLIT + split, query block qb holding tokens [qb * TQ, qb * TQ + TQ).
template <class C> __device__ __forceinline__ int first_token(int tile) { return tile / (C::NSPLIT * C::HKV) * C::TQ; }

// The keys [my_lo, my_hi) that attention tile `tile` reads: the union of its
// queries' visible keys, cut into NSPLIT equal parts (rounded up to 16 keys),
// part `split`.
template <class C> __device__ __forceinline__ void split_range(int tile, int T, int S, int& my_lo, int& my_hi) {
    const int split = tile % C::NSPLIT;
    const int t0 = first_token<C>(tile);
    const int t1 = min(T, t0 + C::TQ);
    int lo, hi;
    if (C::MASK == MASK_CAUSAL) {
        hi = S + t1;  // p_max + 1
        lo = C::WINDOW > 0 ? max(0, S + t0 - C::WINDOW + 1) : 0;
    } else {
        hi = S + T;
        lo = C::WINDOW > 0 ? max(0, min(S, S + t0 - C::WINDOW + 1)) : 0;
    }
    if (t0 >= T) hi = lo;  // (never for a grid of tiles(T) tiles)
    const int per = ((hi - lo + C::NSPLIT - 1) / C::NSPLIT + 15) / 16 * 16;
    my_lo = min(hi, lo + split * per);
    my_hi = min(hi, my_lo + per);
}

// The RoPE (cos, sin) table of the query tokens [t0, t0 + TQ): TQ * ROT/2
// entries (positions past T take position 0, unused), by all threads.
template <class C> __device__ __forceinline__ void rope_table(int t0, int T, const int* __restrict__ qpos, float theta,
                                                              float2* sCS) {
    constexpr int HALF = C::HALF > 0 ? C::HALF : 1;
    for (int i = threadIdx.x; i < C::TQ * C::HALF; i += C::THREADS)
        sCS[i] = rope_cos_sin<bf16>(t0 + i / HALF < T ? qpos[t0 + i / HALF] : 0, i % HALF, C::ROT, theta);
}
}  // namespace attn_detail

// attention_prologue<C>: what an attention tile can do before the kernel
// before it has finished, when the query positions `qpos` are an input of
// the forward (written before its first kernel, like T): the RoPE table of
// its query tokens into the shared memory attention_tile<C, ..., CS_READY =
// true> then reads. Its f64 pow and sincos are a long chain on two warps while
// six wait: moved here, the longest Qwen3 tile at a 1k context went from 9.0
// to 7.7 us (H100).
// Run by every thread of the CTA in the kernel's wrapper, before
// griddepcontrol.wait. The persistent dispatcher runs no prologue: its
// attention tiles (CS_READY = false) make the table themselves.
template <class C> __device__ void attention_prologue(int tile, int T, const int* __restrict__ qpos, float theta,
                                                      char* smem) {
    // At the start of its CTA: no earlier tile uses this shared memory.
    const int t0 = attn_detail::first_token<C>(tile);
    attn_detail::rope_table<C>(t0, T, qpos, theta, reinterpret_cast<float2*>(smem + C::OFF_CS));
}

// attention_early<C>: run by an attention tile before it waits for q and the
// new keys: asks L2 for its share (1/HKV, by kv head) of the cache rows of its
// split, all kv heads of a row being contiguous, so the key and value stream
// starts while the kernel before still runs. A hint: rows the kernel before
// is appending are asked for too, which L2 serves coherently. Nothing is
// asked for past EARLY_L2_BUDGET (long contexts).
template <class C>
__device__ void attention_early(int tile, int T, int S, int cap, const bf16* __restrict__ k_cache,
                                const bf16* __restrict__ v_cache) {
    if (threadIdx.x != 0) return;
    int my_lo, my_hi;
    attn_detail::split_range<C>(tile, T, S, my_lo, my_hi);
    const int kvh = (tile / C::NSPLIT) % C::HKV;
    const int n = my_hi - my_lo, share = (n + C::HKV - 1) / C::HKV;
    const int a = min(n, kvh * share), b = min(n, a + share);
    constexpr unsigned long long KROW = 2ull * C::HKV * C::DK, VROW = 2ull * C::HKV * C::DV;
    // All splits together ask for about NSPLIT times this one's rows.
    if ((unsigned long long)n * C::NSPLIT * (KROW + VROW) > EARLY_L2_BUDGET) return;
    // Positions [my_lo + a, my_lo + b) in slots j % cap: at most two runs.
    int j = my_lo + a;
    while (j < my_lo + b) {
        const int slot = j % cap, run = min(my_lo + b - j, cap - slot);
        prefetch_l2_range(k_cache + (size_t)slot * C::HKV * C::DK, KROW * run);
        prefetch_l2_range(v_cache + (size_t)slot * C::HKV * C::DV, VROW * run);
        j += run;
    }
}

// The new rows an attention tile appends itself (attention_tile<C, true, KNORM>),
// when they are the queries' own tokens at the queries' positions: raw keys
// k [T, HKV*DK] (row stride k_stride, elements), values v [T, HKV*DV]
// (v_stride), the per-head key norm's weight and eps (KNORM), and the caches
// they go to (the ones attention_tile reads).
struct AttnAppend {
    const bf16* k;
    int k_stride;
    const bf16* v;
    int v_stride;
    const bf16* k_norm_w;
    float k_eps;
    bf16* k_cache;
    bf16* v_cache;
};

// attention_tile<C>: softmax attention of TQ query tokens x G query heads against
// one kv head's keys in one split of the key range, exactly interp attn.attention
// (with the q-side of the model fused in):
//   q_t,h = RoPE(QNORM ? rms_norm_head(q[t][h], q_norm_w, eps) : q[t][h]) at position
//           qpos[t] (rounded to Act as the interpreter rounds its rope/norm outputs);
//   keys/values j in 0..L, L = S + T, read from slot j % cap of the caches (S counts
//   the keys before the first query: the cached length, plus any rows appended in
//   the same forward ahead of the queries, e.g. a draft's new context rows);
//   query t sits at p = S + t and sees j per the mask (ir::Mask):
//     causal: j <= p && (!WINDOW || j > p - WINDOW);
//     block:  j >= S || !WINDOW || j > p - WINDOW   (the T queries are the last T keys);
//   kv head of query head h = h / G;  s_j = scale * (q . k_j) in f32;
//   sink (SINKS): an extra softmax column sinks[h], its probability dropped;
//   p_j = round_Act(e_j / sum e), e_j = exp(s_j - max);  out = round_Act(sum_j p_j v_j).
// A query with no visible key and no sink outputs 0 (as the interpreter).
//
// Tile decomposition: tile = (qb * HKV + kvh) * NSPLIT + split; query block qb
// holds tokens [qb*TQ, min(T, qb*TQ+TQ)). The tile's key range [lo, hi) is the
// union of its queries' visible keys; it is cut into NSPLIT equal parts
// (rounded up to 16 keys), each part walked in sub-chunks of at most CH keys.
// Per sub-chunk:
//   sweep 1: S = scale * Q K^T with mma.m16n8k16 (Q from smem, K fragments
//     loaded straight from global: lane (g, t) reads 16 bytes of key g of an
//     8-key n-tile at dims 32c + 8t; q and k use the same permutation of the
//     reduction dim, so the dot products are unchanged); masked scores = -inf;
//     the V rows of the sub-chunk are prefetched into L2 meanwhile;
//   stats (a warp per row): m = max (with the sink when NSPLIT = 1, first
//     sub-chunk), l = sum exp(s - m) (+ sink), P = round_Act(e / l) -> smem;
//   sweep 2: O += P V with mma (P from smem; V fragments from global: lane (g,t)
//     reads 16 bytes of keys 2t, 2t+1, 2t+8, 2t+9 of a 16-key step at dims
//     64q + 8g and packs key pairs with byte permutes; n-tile j's column g is
//     dim 64q + 8g + j); warps split the key steps and are summed in a fixed
//     order through smem (deterministic);
//   merge into the tile's running (m, l, O) (exact copy for the first sub-chunk).
//
// Rounding and the split-key deviation. With NSPLIT = 1 and a key range of at
// most CH keys (sliding layers, short contexts) every probability is
// round_Act(e_j / sum e) with the global max and denominator, exactly the
// interpreter's rounding (up to f32 summation order in q.k and sum e). With
// NSPLIT > 1 (or several sub-chunks) each part rounds its probabilities
// normalised by its own max and denominator: p'_j = round(exp(s_j - m_s) / l_s);
// the combine multiplies the part's output by w_s = l_s exp(m_s - m) / sum. Both
// p'_j * w_s and the interpreter's round(e_j / sum) are within a relative 2^-9
// (bf16 half ulp) of the exact probability, so an output differs from the
// oracle's by at most 2^-8 * sum_j p_j |v_j| (<= 2^-8 max|v|); the errors have
// random signs, and measured on 3000-key contexts with 8 splits (host emulation
// of these tiles against a transcription of the interpreter) the largest
// difference was 2 units of rowmax/256 (rowmax = the largest |output| of the
// head), relative L2 3e-3 (flat attention over many keys cancels, so the
// output itself is small). Exact rounding across
// splits would need the global max and denominator before any value is read:
// a second dependent pass over the scores (written to and re-read from global
// memory, +20% traffic at 16k keys) and one more dependency phase per layer;
// the bounded deviation is the cheaper choice. Everything else: scores and
// softmax in f32 (the interpreter sums q.k and sum e in f64), output
// accumulated in f32 by the tensor cores and rounded once to Act.
//
// Arguments: q [T, HQ, DK] with row stride q_stride (elements per token row);
// q_norm_w [DK] (QNORM only); eps (QNORM); theta (RoPE); scale (usually DK^-0.5);
// caches [cap, HKV, DK] and [cap, HKV, DV]; sinks [HQ] (SINKS only);
// out [T, HQ, DV] with row stride out_stride (NSPLIT = 1); ws (NSPLIT > 1):
// partial outputs O [T][HQ][NSPLIT][DV] then stats (m, l) [T][HQ][NSPLIT][2].
// Shared memory: C::SMEM_BYTES.
template <class C, bool APPEND = false, bool KNORM = false, bool CS_READY = false>
__device__ void attention_tile(int tile, int T, int S, int cap, const int* __restrict__ qpos,
                               const bf16* __restrict__ q, int q_stride,
                               const bf16* __restrict__ q_norm_w, float eps, float theta, float scale,
                               const bf16* k_cache, const bf16* v_cache,
                               const bf16* __restrict__ sinks, bf16* __restrict__ out, int out_stride,
                               float* __restrict__ ws, char* smem, const AttnAppend app = AttnAppend{}) {
    using namespace attn_detail;
    constexpr int HQ = C::HQ, HKV = C::HKV, DK = C::DK, DV = C::DV, ROT = C::ROT, HALF = C::HALF;
    constexpr int G = C::G, ROWS = C::ROWS, MR = C::MR, NW = C::NW, WPM = C::WPM;
    constexpr int KB32 = C::KB32, VG = C::VG, NREG = C::NREG, QS = C::QS, SS = C::SS, PS = C::PS;
    constexpr int TQ = C::TQ, NSPLIT = C::NSPLIT, CH = C::CH, THREADS = C::THREADS;
    constexpr int WINDOW = C::WINDOW;
    constexpr bool CAUSAL = C::MASK == MASK_CAUSAL;
    const float NEG_INF = __int_as_float(0xff800000);

    bf16* sQ = reinterpret_cast<bf16*>(smem);
    float2* sCS = reinterpret_cast<float2*>(smem + C::OFF_CS);
    float* sM = reinterpret_cast<float*>(smem + C::OFF_ST);  // running max per row
    float* sL = sM + MR;                                     // running denominator
    float* sCR = sL + MR;                                    // merge weight of the running O
    float* sCB = sCR + MR;                                   // merge weight of the sub-chunk's O
    float* sO = reinterpret_cast<float*>(smem + C::OFF_O);   // [MR][DV] running normalised output
    float* sS = reinterpret_cast<float*>(smem + C::OFF_U);   // [MR][SS] scores
    bf16* sP = reinterpret_cast<bf16*>(smem + C::OFF_U + MR * SS * 4);  // [MR][PS] probabilities
    float* sR = reinterpret_cast<float*>(smem + C::OFF_U);   // [NW][NREG][32] (aliases S, P)

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t4 = lane & 3;
    const int split = tile % NSPLIT;
    const int kvh = (tile / NSPLIT) % HKV;
    const int t0 = attn_detail::first_token<C>(tile);
    const int t1 = min(T, t0 + TQ);  // tokens [t0, t1)
    int my_lo, my_hi;
    attn_detail::split_range<C>(tile, T, S, my_lo, my_hi);

    __syncthreads();  // the previous tile of a persistent loop may still read smem
    if constexpr (!CS_READY) attn_detail::rope_table<C>(t0, T, qpos, theta, sCS);
    for (int i = tid; i < MR; i += THREADS) {
        sM[i] = NEG_INF;
        sL[i] = 0.f;
    }
    for (int i = tid; i < MR * DV; i += THREADS) sO[i] = 0.f;
    __syncthreads();

    const int mt = warp / WPM, wi = warp % WPM;  // this warp's m-tile and rank in it
    const bf16* kbase = k_cache + kvh * DK;
    const bf16* vbase = v_cache + kvh * DV;
    constexpr int KROW = HKV * DK, VROW = HKV * DV;

    // Lane (g, t4)'s key fragments of n-tile nt (dims 32c + 8 t4 of key 8 nt + g
    // of the sub-chunk at sub_lo, n keys, first slot base_slot); zeros past n
    // or where `skip`.
    auto load_k = [&](uint4 (&kf)[KB32], int nt, int n, int base_slot, bool skip) {
        const int d = nt * 8 + g;
        const bool ok = d < n && !skip;
        const size_t slot = ok ? (size_t)ring_slot(base_slot, d, cap) : 0;
        const bf16* kr = kbase + slot * KROW;
#pragma unroll
        for (int c = 0; c < KB32; ++c)
            kf[c] = (ok && 32 * c + 8 * t4 < DK) ? ld_kv_v4(kr + 32 * c + 8 * t4) : make_uint4(0, 0, 0, 0);
        if (ok && t4 * 64 < DV) prefetch_l2(vbase + slot * VROW + t4 * 64);
    };
    // Where a warp prepares several query rows (ROWS > NW: verification,
    // T > 1), its first key fragments (the first n-tiles of sweep 1 on the
    // first sub-chunk) are loaded before the queries are prepared, their round
    // trip beside the query rows' own: keys already in the cache (with APPEND,
    // the keys before S; the rows this tile appends are loaded after the
    // barrier that follows their writes). With one row a warp (decode) the
    // preparation is short and the 37 registers they hold did not pay.
    constexpr bool KPRE = ROWS > NW;
    uint4 kf0[2][KB32];
    bool kpre[2] = {false, false};
    if constexpr (KPRE) {
        const int n = min(CH, my_hi - my_lo);
#pragma unroll
        for (int u = 0; u < 2; ++u) {
            const int d = (wi + u * WPM) * 8 + g;
            kpre[u] = !APPEND || my_lo + d < S;
            load_k(kf0[u], wi + u * WPM, n, my_lo % cap, !kpre[u]);
        }
    }

    // Q rows (token-major: row r = token t0 + r / G, head kvh * G + r % G), normed
    // and rotated, bf16 in smem; padding rows and dims [DK, 32*KB32) are zero.
    for (int r = warp; r < MR; r += NW) {
        bf16* dst = sQ + r * QS;
        const int t = t0 + r / G;
        if (r < ROWS && t < T) {
            head_prep_warp<bf16, DK, ROT, C::QNORM>(q + (size_t)t * q_stride + (kvh * G + r % G) * DK, q_norm_w, eps,
                                                    sCS + (r / G) * HALF, dst);
            for (int d = DK + lane; d < KB32 * 32; d += 32) dst[d] = from_float<bf16>(0.f);
        } else {
            for (int d = lane; d < KB32 * 32; d += 32) dst[d] = from_float<bf16>(0.f);
        }
    }
    if constexpr (APPEND) {
        // The new rows j of this tile's key range (token t = j - S): the key
        // normed and rotated as rope_append_tile does it, and the value, into
        // cache slot j % cap before any key is read (the barrier below), one
        // row per warp from the last warp down (the first warps hold the
        // query rows). Tiles of other query blocks whose ranges hold the same
        // rows write the same bytes. Scratch: the score area, free until the
        // key loop.
        constexpr int CSB = align16(HALF * 8), SCR = CSB + DK * 2;
        static_assert(NW * SCR <= C::SMEM_BYTES - C::OFF_U, "append scratch exceeds the score area");
        float2* cs = reinterpret_cast<float2*>(smem + C::OFF_U + warp * SCR);
        bf16* krow = reinterpret_cast<bf16*>(smem + C::OFF_U + warp * SCR + CSB);
        for (int j = max(my_lo, S) + (NW - 1 - warp); j < my_hi; j += NW) {
            const int t = j - S;
            const size_t slot = (size_t)(j % cap);
            // A row of one of this tile's own query tokens rotates by the
            // table the queries use (same position, same values); any other
            // row computes its own.
            const float2* rcs = cs;
            if (t >= t0 && t < t1) {
                rcs = sCS + (t - t0) * HALF;
            } else {
                for (int f = lane; f < HALF; f += 32) cs[f] = rope_cos_sin<bf16>(qpos[t], f, ROT, theta);
                __syncwarp();
            }
            head_prep_warp<bf16, DK, ROT, KNORM>(app.k + (size_t)t * app.k_stride + kvh * DK, app.k_norm_w,
                                                 app.k_eps, rcs, krow);
            for (int c = lane; c < DK / 8; c += 32)
                *reinterpret_cast<uint4*>(app.k_cache + (slot * HKV + kvh) * DK + c * 8) =
                    *reinterpret_cast<const uint4*>(krow + c * 8);
            for (int c = lane; c < DV / 8; c += 32)
                *reinterpret_cast<uint4*>(app.v_cache + (slot * HKV + kvh) * DV + c * 8) =
                    ld_v4(app.v + (size_t)t * app.v_stride + kvh * DV + c * 8);
            __syncwarp();  // the scratch is reused by the next row
        }
    }
    __syncthreads();

    // Visibility of key j (absolute position) for tile row r.
    auto visible = [&](int r, int j) -> bool {
        const int t = t0 + r / G;
        if (r >= ROWS || t >= T) return false;
        const int p = S + t;
        if (CAUSAL) return j <= p && (WINDOW == 0 || j > p - WINDOW);
        return j >= S || WINDOW == 0 || j > p - WINDOW;
    };

    for (int sub_lo = my_lo; sub_lo < my_hi; sub_lo += CH) {
        const int n = min(CH, my_hi - sub_lo);
        const int base_slot = sub_lo % cap;
        const bool first = sub_lo == my_lo;

        // ---- sweep 1: scores ----
        {
            uint32_t qa[KB32][2][4];
#pragma unroll
            for (int c = 0; c < KB32; ++c) {
#pragma unroll
                for (int rh = 0; rh < 2; ++rh) {
                    const uint4 v = *reinterpret_cast<const uint4*>(sQ + (mt * 16 + g + 8 * rh) * QS + 32 * c + 8 * t4);
                    qa[c][0][rh] = v.x;
                    qa[c][0][2 + rh] = v.y;
                    qa[c][1][rh] = v.z;
                    qa[c][1][2 + rh] = v.w;
                }
            }
            const int nnt = (n + 7) >> 3;
            for (int nt = wi; nt < nnt; nt += 2 * WPM) {
                uint4 kf[2][KB32];
                const bool pre = KPRE && first && nt == wi;
#pragma unroll
                for (int u = 0; u < 2; ++u) {
                    if (pre && kpre[u]) {
#pragma unroll
                        for (int c = 0; c < KB32; ++c) kf[u][c] = kf0[u][c];
                    } else {
                        load_k(kf[u], nt + u * WPM, n, base_slot, false);
                    }
                }
#pragma unroll
                for (int u = 0; u < 2; ++u) {
                    const int ntu = nt + u * WPM;
                    if (ntu < nnt) {
                        float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
                        for (int c = 0; c < KB32; ++c) {
                            const uint32_t b0[2] = {kf[u][c].x, kf[u][c].y};
                            const uint32_t b1[2] = {kf[u][c].z, kf[u][c].w};
                            mma_bf16_16816(acc, qa[c][0], b0);
                            mma_bf16_16816(acc, qa[c][1], b1);
                        }
#pragma unroll
                        for (int rh = 0; rh < 2; ++rh) {
                            const int r = mt * 16 + g + 8 * rh;
                            const int col = ntu * 8 + 2 * t4;
                            float2 sv;
                            sv.x = (col < n && visible(r, sub_lo + col)) ? __fmul_rn(acc[2 * rh], scale) : NEG_INF;
                            sv.y = (col + 1 < n && visible(r, sub_lo + col + 1)) ? __fmul_rn(acc[2 * rh + 1], scale)
                                                                                : NEG_INF;
                            *reinterpret_cast<float2*>(sS + r * SS + col) = sv;
                        }
                    }
                }
            }
        }
        __syncthreads();

        // ---- stats and probabilities: a warp per row ----
        {
            constexpr int CPL = CH / 32;
            const int np = (n + 15) & ~15;  // P columns the value sweep reads
            // Column groups of 32 that hold keys: CH bounds the longest
            // sub-chunk, a short one (a short context) stops early. Past
            // them a column would be hidden (-inf, then exp 0, a sum
            // unchanged) and is not stored, so the loops skip them.
            const int ncg = (n + 31) >> 5;
            for (int r = warp; r < MR; r += NW) {
                float e[CPL];
                float mx = NEG_INF;
#pragma unroll
                for (int i = 0; i < CPL; ++i) {
                    if (i >= ncg) break;
                    const int col = lane + 32 * i;
                    e[i] = col < n ? sS[r * SS + col] : NEG_INF;
                    mx = fmaxf(mx, e[i]);
                }
                mx = warp_max(mx);
                // The sink joins the (only) split's first sub-chunk: exact rounding for NSPLIT = 1.
                const bool sink_here = C::SINKS && NSPLIT == 1 && first && r < ROWS;
                float sk = NEG_INF;
                if (sink_here) {
                    sk = to_float(sinks[kvh * G + r % G]);
                    mx = fmaxf(mx, sk);
                }
                float sum = 0.f;
                if (mx != NEG_INF) {
#pragma unroll
                    for (int i = 0; i < CPL; ++i) {
                        if (i >= ncg) break;
                        e[i] = expf(e[i] - mx);  // exp(-inf) = 0 for hidden keys
                        sum += e[i];
                    }
                    sum = warp_sum(sum);
                    if (sink_here) sum = __fadd_rn(sum, expf(sk - mx));
                }
#pragma unroll
                for (int i = 0; i < CPL; ++i) {
                    if (i >= ncg) break;
                    const int col = lane + 32 * i;
                    if (col < np)
                        sP[r * PS + col] = from_float<bf16>((col < n && sum > 0.f) ? __fdiv_rn(e[i], sum) : 0.f);
                }
                if (lane == 0) {
                    const float m_old = sM[r], l_old = sL[r];
                    const float m_new = fmaxf(m_old, mx);
                    const float a = l_old > 0.f ? l_old * expf(m_old - m_new) : 0.f;
                    const float b = sum > 0.f ? sum * expf(mx - m_new) : 0.f;
                    const float l_new = a + b;
                    sCR[r] = l_new > 0.f ? a / l_new : 0.f;
                    sCB[r] = l_new > 0.f ? b / l_new : 0.f;  // exactly 1 for the first sub-chunk
                    sM[r] = m_new;
                    sL[r] = l_new;
                }
            }
        }
        __syncthreads();

        // ---- sweep 2: O_sub = P V ----
        float o[VG][8][4];
#pragma unroll
        for (int qg = 0; qg < VG; ++qg)
#pragma unroll
            for (int j = 0; j < 8; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) o[qg][j][e] = 0.f;
        // Key steps of 16; a warp of an m-tile with wi >= nks runs none and
        // its o stays zero: it neither stores nor joins the sum below (adding
        // +0 to the running sum, which starts at +0, changes nothing).
        const int nks = (n + 15) >> 4;
        const int wact = min(WPM, nks);
        {
            for (int ks = wi; ks < nks; ks += 2 * WPM) {
                uint4 vf[2][VG][4];
#pragma unroll
                for (int u = 0; u < 2; ++u) {
                    const int ksu = ks + u * WPM;
#pragma unroll
                    for (int kk = 0; kk < 4; ++kk) {
                        const int d = ksu * 16 + 2 * t4 + (kk & 1) + 8 * (kk >> 1);
                        const bool ok = d < n;
                        const size_t slot = ok ? (size_t)ring_slot(base_slot, d, cap) : 0;
                        const bf16* vr = vbase + slot * VROW;
#pragma unroll
                        for (int qg = 0; qg < VG; ++qg)
                            vf[u][qg][kk] =
                                (ok && 64 * qg + 8 * g < DV) ? ld_kv_v4(vr + 64 * qg + 8 * g) : make_uint4(0, 0, 0, 0);
                    }
                }
#pragma unroll
                for (int u = 0; u < 2; ++u) {
                    const int ksu = ks + u * WPM;
                    if (ksu < nks) {
                        const bf16* p0 = sP + (mt * 16 + g) * PS + ksu * 16 + 2 * t4;
                        const bf16* p1 = p0 + 8 * PS;
                        uint32_t a[4];
                        a[0] = *reinterpret_cast<const uint32_t*>(p0);
                        a[1] = *reinterpret_cast<const uint32_t*>(p1);
                        a[2] = *reinterpret_cast<const uint32_t*>(p0 + 8);
                        a[3] = *reinterpret_cast<const uint32_t*>(p1 + 8);
#pragma unroll
                        for (int qg = 0; qg < VG; ++qg) {
#pragma unroll
                            for (int j = 0; j < 8; ++j) {
                                const uint32_t va = word(vf[u][qg][0], j >> 1), vb = word(vf[u][qg][1], j >> 1);
                                const uint32_t vc = word(vf[u][qg][2], j >> 1), vd = word(vf[u][qg][3], j >> 1);
                                uint32_t b[2];
                                b[0] = (j & 1) ? pair_hi(va, vb) : pair_lo(va, vb);
                                b[1] = (j & 1) ? pair_hi(vc, vd) : pair_lo(vc, vd);
                                mma_bf16_16816(o[qg][j], a, b);
                            }
                        }
                    }
                }
            }
        }
        __syncthreads();  // P is read by all warps before the reduction overwrites it
        if (wi < wact) {
#pragma unroll
            for (int qg = 0; qg < VG; ++qg)
#pragma unroll
                for (int j = 0; j < 8; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e) sR[(warp * NREG + (qg * 8 + j) * 4 + e) * 32 + lane] = o[qg][j][e];
        }
        __syncthreads();
        // Sum the WPM warps of each m-tile in a fixed order and merge into sO.
        for (int el = tid; el < C::MT * NREG * 32; el += THREADS) {
            const int ln = el & 31, reg = (el >> 5) % NREG, m = (el >> 5) / NREG;
            const int qg = reg >> 5, j = (reg >> 2) & 7, e = reg & 3;
            const int row = m * 16 + (ln >> 2) + 8 * (e >> 1);
            const int dim = 64 * qg + 8 * (2 * (ln & 3) + (e & 1)) + j;
            if (dim < DV) {
                float s = 0.f;
                for (int w = 0; w < wact; ++w) s += sR[((m * WPM + w) * NREG + reg) * 32 + ln];
                const float cr = sCR[row], cb = sCB[row];
                float* dst = sO + row * DV + dim;
                *dst = cr == 0.f ? cb * s : cr * *dst + cb * s;
            }
        }
        __syncthreads();  // sO complete; S/P may be overwritten by the next sub-chunk
    }

    // ---- write-out ----
    if (NSPLIT == 1) {
        for (int el = tid; el < ROWS * DV; el += THREADS) {
            const int r = el / DV, dim = el % DV, t = t0 + r / G;
            if (t < T) out[(size_t)t * out_stride + (kvh * G + r % G) * DV + dim] = from_float<bf16>(sO[el]);
        }
    } else {
        float* ws_o = ws;
        float* ws_ml = ws + (size_t)T * HQ * NSPLIT * DV;
        for (int el = tid; el < ROWS * DV; el += THREADS) {
            const int r = el / DV, dim = el % DV, t = t0 + r / G;
            if (t < T) ws_o[(((size_t)t * HQ + kvh * G + r % G) * NSPLIT + split) * DV + dim] = sO[el];
        }
        for (int r = tid; r < ROWS; r += THREADS) {
            const int t = t0 + r / G;
            if (t < T) {
                const size_t i = ((size_t)t * HQ + kvh * G + r % G) * NSPLIT + split;
                ws_ml[2 * i] = sM[r];
                ws_ml[2 * i + 1] = sL[r];
            }
        }
    }
}

// attention_combine_tile<C> (NSPLIT > 1): merges the NSPLIT partials of one
// (token, query head) and its sink column:
//   m = max(m_s, sink), w_s = l_s exp(m_s - m) (0 for empty parts),
//   sum = sum_s w_s + exp(sink - m),  out = round_Act(sum_s (w_s / sum) O_s),
// summed in split order (deterministic); no visible key and no sink -> 0.
// Tiles: one per (token, query head): tile = t * HQ + h, combine_tiles(T) = T * HQ;
// tile (t, h) depends on the NSPLIT attention tiles of (t / TQ, h / G).
// Shared memory: C::COMBINE_SMEM_BYTES.
template <class C>
__device__ void attention_combine_tile(int tile, int T, const float* __restrict__ ws, const bf16* __restrict__ sinks,
                                       bf16* __restrict__ out, int out_stride, char* smem) {
    constexpr int HQ = C::HQ, DV = C::DV, NSPLIT = C::NSPLIT, THREADS = C::THREADS;
    float* coef = reinterpret_cast<float*>(smem);  // [NSPLIT]
    const int tid = threadIdx.x, lane = tid & 31;
    const int t = tile / HQ, h = tile % HQ;
    const size_t base = ((size_t)t * HQ + h) * NSPLIT;
    const float* ws_o = ws + base * DV;
    const float* ws_ml = ws + (size_t)T * HQ * NSPLIT * DV + 2 * base;
    __syncthreads();  // the previous tile of a persistent loop may still read smem
    // The partial outputs this thread sums are loaded before the weights are
    // known (they do not depend on them), HB splits a round: one round for up
    // to 32 splits instead of one per eight, and no more registers than 32
    // (the persistent dispatcher holds this tile beside the heaviest ones).
    // Same sum, same order, as the loop below.
    constexpr bool HOIST = DV <= THREADS;
    // The last round is partial when NSPLIT is not a multiple of HB.
    constexpr int HB = NSPLIT < 32 ? NSPLIT : 32;
    constexpr bool WHOLE = NSPLIT % HB == 0;
    float part[HOIST ? HB : 1];
    if constexpr (HOIST) {
        if (tid < DV) {
#pragma unroll
            for (int s = 0; s < HB; ++s) part[s] = ws_o[(size_t)s * DV + tid];
        }
    }
    if (tid < 32) {
        float mx = __int_as_float(0xff800000);
        for (int s = lane; s < NSPLIT; s += 32) mx = fmaxf(mx, ws_ml[2 * s]);
        mx = warp_max(mx);
        float sk = __int_as_float(0xff800000);
        if (C::SINKS) {
            sk = to_float(sinks[h]);
            mx = fmaxf(mx, sk);
        }
        float sum = 0.f;
        for (int s = lane; s < NSPLIT; s += 32) {
            const float l = ws_ml[2 * s + 1];
            const float w = l > 0.f ? l * expf(ws_ml[2 * s] - mx) : 0.f;
            coef[s] = w;
            sum += w;
        }
        sum = warp_sum(sum);
        if (C::SINKS) sum += expf(sk - mx);
        // Each lane rescales only the entries it wrote.
        for (int s = lane; s < NSPLIT; s += 32) coef[s] = sum > 0.f ? coef[s] / sum : 0.f;
    }
    __syncthreads();
    if constexpr (HOIST) {
        if (tid < DV) {
            float acc = 0.f;
#pragma unroll 1
            for (int s0 = 0; s0 < NSPLIT; s0 += HB) {
                if (s0 > 0) {
#pragma unroll
                    for (int s = 0; s < HB; ++s)
                        if (WHOLE || s0 + s < NSPLIT) part[s] = ws_o[(size_t)(s0 + s) * DV + tid];
                }
#pragma unroll
                for (int s = 0; s < HB; ++s)
                    if (WHOLE || s0 + s < NSPLIT) acc = fmaf(coef[s0 + s], part[s], acc);
            }
            out[(size_t)t * out_stride + h * DV + tid] = from_float<bf16>(acc);
        }
    } else {
        for (int d = tid; d < DV; d += THREADS) {
            float acc = 0.f;
#pragma unroll 8
            for (int s = 0; s < NSPLIT; ++s) acc = fmaf(coef[s], ws_o[(size_t)s * DV + d], acc);
            out[(size_t)t * out_stride + h * DV + d] = from_float<bf16>(acc);
        }
    }
}

// =====================================================================================
// rms_norm_rows_tile
// =====================================================================================
//
// Computes y[r] = rms_norm(x[r], w, eps) for rows r of x [R, D], exactly interp
// nn.rms_norm: ms = (sum x^2 in f64) / D as f32, rs = 1 / sqrt(ms + eps) in f32,
// n = round_Act(x * rs), y = round_Act(w * n). (With bf16 x the f64 sum is exact,
// so results are bit-identical to the interpreter.)
// Tiles: one per row, tiles = R. x, y rows at strides x_stride, y_stride (elements).
// Shared memory: rms_norm_rows_smem_bytes<THREADS>() (the f64 block reduction).
template <int THREADS> __host__ __device__ constexpr int rms_norm_rows_smem_bytes() { return THREADS / 32 * 8; }

template <typename Act, typename W, int D, int THREADS>
__device__ void rms_norm_rows_tile(int tile, int R, const Act* __restrict__ x, int x_stride, const W* __restrict__ w,
                                   float eps, Act* __restrict__ y, int y_stride, char* smem) {
    using namespace attn_detail;
    using V = Vec<Act>;
    using VW = Vec<W>;
    constexpr int VN = V::N, NV = D / VN, PER = (NV + THREADS - 1) / THREADS;
    static_assert(D % VN == 0 && D % VW::N == 0, "D must be a multiple of 16 bytes of x and of w");
    static_assert(THREADS % 32 == 0, "THREADS must be a multiple of 32");
    const int tid = threadIdx.x;
    if (tile >= R) return;  // uniform over the CTA
    const Act* xr = x + (size_t)tile * x_stride;
    float v[PER][VN];
    double ss = 0.0;
#pragma unroll
    for (int i = 0; i < PER; ++i) {
        const int c = tid + THREADS * i;
        if (c < NV) {
            V::load(xr + c * VN, v[i]);
#pragma unroll
            for (int e = 0; e < VN; ++e) ss += (double)v[i][e] * (double)v[i][e];
        }
    }
    // block_sum_f64 begins with a barrier before it writes smem (persistent-loop safe).
    ss = block_sum_f64<THREADS>(ss, reinterpret_cast<double*>(smem));
    const float ms = (float)(ss / (double)D);
    const float rs = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(ms, eps)));
    Act* yr = y + (size_t)tile * y_stride;
#pragma unroll
    for (int i = 0; i < PER; ++i) {
        const int c = tid + THREADS * i;
        if (c < NV) {
            float o[VN];
#pragma unroll
            for (int e = 0; e < VN; ++e)
                o[e] = __fmul_rn(to_float(w[c * VN + e]), round_to<Act>(__fmul_rn(v[i][e], rs)));
            V::store(yr + c * VN, o);
        }
    }
}

// =====================================================================================
// embedding_tile
// =====================================================================================
//
// Computes y[i] = table[ids[i]] for i in 0..n (interp nn.embedding; the row is
// copied bit for bit, table and y share the dtype T: bf16 or float).
// Out-of-range ids (id < 0 or id >= vocab): the table is never read; the row of y
// is filled with NaN and *err is set to 1 (never cleared here: the host clears
// it before the forward and reads it after).
// Tiles: one per id, tiles = n. Shared memory: none (smem unused).
template <typename T, int H, int THREADS>
__device__ void embedding_tile(int tile, int n, const int* __restrict__ ids, const T* __restrict__ table, int vocab,
                               T* __restrict__ y, int y_stride, int* __restrict__ err, char* smem) {
    constexpr int VN = 16 / (int)sizeof(T), NV = H / VN;
    static_assert(H % VN == 0, "row width must be a multiple of 16 bytes");
    (void)smem;
    if (tile >= n) return;
    const int id = ids[tile];
    T* yr = y + (size_t)tile * y_stride;
    if (id < 0 || id >= vocab) {
        const uint32_t nan2 = sizeof(T) == 2 ? 0x7fc07fc0u : 0x7fc00000u;
        for (int c = threadIdx.x; c < NV; c += THREADS)
            *reinterpret_cast<uint4*>(yr + c * VN) = make_uint4(nan2, nan2, nan2, nan2);
        if (threadIdx.x == 0) atomicExch(err, 1);
        return;
    }
    const T* row = table + (size_t)id * H;
    for (int c = threadIdx.x; c < NV; c += THREADS)
        *reinterpret_cast<uint4*>(yr + c * VN) = ld_stream_v4(row + c * VN);
}

}  // namespace tf
