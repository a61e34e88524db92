// tilefuse weight-streaming matrix-vector templates:
//
//     y[t, n] = sum_k X[t, k] * W[n, k]     for the rows n of one tile, tokens t0 <= t < t0 + nt
//
// with W in any weight format of the IR (bf16, f32, FP8 E4M3, MXFP4, NVFP4),
// an optional RMSNorm prologue, and an epilogue functor supplied by the
// generated code. Batch-1 decoding streams every weight byte once, so the
// design goal is HBM bandwidth: 16-byte loads through `tf::ld_stream_v4`,
// several in flight per lane, FP4 dequantised in registers.
//
// Two inner paths share the tile decomposition:
// - MMA (tensor cores, `tf::mma_bf16_16816`): weights are the A operand (16
//   rows x 16 K), tokens the B operand (16 K x 8 tokens). Used when X is bf16
//   and the weights are exactly representable in bf16 (bf16, E4M3, MXFP4,
//   NVFP4): products are then exact and only the f32 accumulation order
//   differs from the oracle. Good for every T (the B columns of missing
//   tokens cost issue slots, not bytes).
// - SIMT (CUDA cores, f32 FMA): any format with X bf16 or f32; the only
//   path for f32 weights or f32 activations (bf16 rounding would change them).
// `MvPath::Auto` picks MMA where exact, else SIMT; tests force either.
//
// The K-permutation trick (MMA). A warp owns 16 rows; lane (g = lane/4,
// q = lane%4) loads 16 contiguous bytes = EPV elements of rows g and g+8 at
// k = kb*4*EPV + q*EPV (one "k-block" = 4*EPV elements per row). A dot
// product does not care in which order K is summed, as long as A and B agree:
// mma step s (of EPV/4) gives the A slots (2q, 2q+1) and (2q+8, 2q+9) of this
// lane two bf16x2 words of its own chunk, and the B fragment of lane (g', q)
// takes the same two words of token g''s x chunk at the same k. So weights
// never move between lanes, and bf16 weights feed the tensor cores straight
// from the load registers. Formats whose cheap dequantisation pairs elements
// other than (2i, 2i+1) apply the same pairing to x (`pair_x`, one prmt per
// word).
//
// Rounding points (as the interpreter, ir/src/interp.rs): the dot product is
// accumulated in f32 (the oracle uses f64; only the summation differs, products
// are exact in f32 for bf16 x bf16 and for the FP4/FP8 values times bf16), the
// result goes to the epilogue unrounded: `epi` rounds to the output dtype.
// RMSNorm prologue: `inv = 1/sqrt(mean(x^2) + eps)` with the sum of squares in
// f64 (as the oracle), `n = round_to<Act>(x * inv)`, `xn = round_to<Act>(gamma * n)`.
//
// Memory contract: all pointers 16-byte aligned, K a multiple of 8 (and of the
// format's block), activation rows contiguous with stride K. Weights are read
// with the non-coherent path (`ld.global.nc`): they must not be written during
// the launch. Activations (x, gamma) are read with ordinary loads, so a
// persistent kernel may produce them earlier in the same launch (after its
// acquire + barrier); they must not be written by the kernel that reads them
// (every tile reads all of x: an epilogue must never store into x).
//
// Tuning (what the code generator should pick; the tests use these):
// - Launch bounds: compile the calling kernel with __launch_bounds__(THREADS, 1)
//   (or 2). Without a minimum-blocks hint ptxas trades the batched loads for
//   occupancy and keeps only one k-block (2 loads) per lane in flight, which a
//   persistent kernel (one CTA per SM) cannot hide.
// - THREADS 256; ROWS 16 (N = 4096 gives 256 tiles for 132 SMs). Each lane
//   issues U k-blocks x 2 rows of 16-byte loads before using any (U = 4 by
//   default, capped at the k-blocks a warp owns, ceil(K / KB) / KW): 32 KiB in
//   flight per CTA at bf16 K >= 4096. With FP4 and K = 2048 (expert down
//   projections) a 16-row tile is only 16 KiB: prefer ROWS 32 there.
// - FP4 dequantisation costs about 2.5 instructions per weight (4 integer ops
//   and one bf16x2 multiply per pair), so at T = 1 an SM must issue ~2.5 warp
//   instructions per clock to keep up with HBM: close to, but under, its 4.
// - MAX_T: 8 or 16 for verification blocks (one or two mma n-tiles); MAX_T = 1
//   costs the same bytes, and the same instructions bar the mma count.
#pragma once
#include "prelude.cuh"

namespace tf {

// ---------------------------------------------------------------------------
// Small generic helpers.

template <typename T> struct nodeduce { using type = T; };
// Keeps a parameter out of template argument deduction (so `nullptr` can be passed).
template <typename T> using nodeduce_t = typename nodeduce<T>::type;

template <typename A, typename B> struct is_same_t { enum : bool { value = false }; };
template <typename A> struct is_same_t<A, A> { enum : bool { value = true }; };

__host__ __device__ constexpr int pow2_ceil(int v) {
    int p = 1;
    while (p < v) p *= 2;
    return p;
}

// Word i (0..3) of a 16-byte vector; i must be a compile-time constant after unrolling.
__device__ __forceinline__ uint32_t u4_word(const uint4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Eight activations (bf16 or f32, 16/32 aligned bytes) -> floats. Ordinary loads.
__device__ __forceinline__ void load8(const bf16* p, float (&o)[8]) { bf16x8_to_float(ld_v4(p), o); }
__device__ __forceinline__ void load8(const float* p, float (&o)[8]) {
    const uint4 a = ld_v4(p), b = ld_v4(p + 4);
    o[0] = __uint_as_float(a.x), o[1] = __uint_as_float(a.y), o[2] = __uint_as_float(a.z), o[3] = __uint_as_float(a.w);
    o[4] = __uint_as_float(b.x), o[5] = __uint_as_float(b.y), o[6] = __uint_as_float(b.z), o[7] = __uint_as_float(b.w);
}
// Four activations (8 or 16 aligned bytes) -> floats.
__device__ __forceinline__ void load4(const bf16* p, float (&o)[4]) {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    o[0] = __uint_as_float(v.x << 16), o[1] = __uint_as_float(v.x & 0xffff0000u);
    o[2] = __uint_as_float(v.y << 16), o[3] = __uint_as_float(v.y & 0xffff0000u);
}
__device__ __forceinline__ void load4(const float* p, float (&o)[4]) {
    const uint4 v = ld_v4(p);
    o[0] = __uint_as_float(v.x), o[1] = __uint_as_float(v.y), o[2] = __uint_as_float(v.z), o[3] = __uint_as_float(v.w);
}
// Eight floats, each already representable in the destination type, stored as 16/32 bytes.
__device__ __forceinline__ void store8(bf16* p, const float (&v)[8]) {
    *reinterpret_cast<uint4*>(p) = make_uint4(pack_bf16x2(v[0], v[1]), pack_bf16x2(v[2], v[3]),
                                              pack_bf16x2(v[4], v[5]), pack_bf16x2(v[6], v[7]));
}
__device__ __forceinline__ void store8(float* p, const float (&v)[8]) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
    *reinterpret_cast<float4*>(p + 4) = make_float4(v[4], v[5], v[6], v[7]);
}

// ---------------------------------------------------------------------------
// Weight formats. Each is a small struct holding device pointers; all format
// logic (addressing, dequantisation, pairing) lives here so that a repacking
// pass only has to change these. Common interface, for a row-major [rows, K]
// matrix (experts: row e*R + r of the stacked [E*R, K] tensor):
//   EPV          elements per 16-byte code vector
//   GS           elements per SIMT dequant group (EPV / GS groups per vector)
//   MMA          values exactly representable in bf16 (MMA path allowed)
//   Aux          per-vector side data (block scales)
//   load(row, k, K)      16 code bytes of elements [k, k + EPV), ld_stream_v4
//   aux(row, k, K)       the block scale(s) of that vector
//   group(v, a, j, o)    SIMT: elements [j*GS, (j+1)*GS) as exact f32 values
//   mma_words(v, a, o)   MMA: EPV/2 bf16x2 words, pair order of `pair_x`,
//                        equal to value * mma_scale()^-1 exactly
//   pair_x(x)            permutes EPV/2 natural bf16x2 words of x the same way
//   mma_scale()          factor applied to MMA accumulators (1 except NVFP4)

struct NoAux {};

// bf16 [N, K].
struct WBf16 {
    const bf16* p;
    enum : int { EPV = 8, GS = 8 };
    enum : bool { MMA = true };
    using Aux = NoAux;
    __device__ __forceinline__ uint4 load(int row, int k, int K) const { return ld_stream_v4(p + (size_t)row * K + k); }
    __device__ __forceinline__ Aux aux(int, int, int) const { return {}; }
    __device__ __forceinline__ void group(const uint4& v, Aux, int, float (&o)[GS]) const { bf16x8_to_float(v, o); }
    __device__ __forceinline__ void mma_words(const uint4& v, Aux, uint32_t (&o)[EPV / 2]) const {
        o[0] = v.x, o[1] = v.y, o[2] = v.z, o[3] = v.w;
    }
    __device__ static __forceinline__ void pair_x(uint32_t (&)[EPV / 2]) {}
    __device__ __forceinline__ float mma_scale() const { return 1.f; }
};

// f32 [N, K]: SIMT only (bf16 operands would round the weights).
struct WF32 {
    const float* p;
    enum : int { EPV = 4, GS = 4 };
    enum : bool { MMA = false };
    using Aux = NoAux;
    __device__ __forceinline__ uint4 load(int row, int k, int K) const { return ld_stream_v4(p + (size_t)row * K + k); }
    __device__ __forceinline__ Aux aux(int, int, int) const { return {}; }
    __device__ __forceinline__ void group(const uint4& v, Aux, int, float (&o)[GS]) const {
        o[0] = __uint_as_float(v.x), o[1] = __uint_as_float(v.y), o[2] = __uint_as_float(v.z), o[3] = __uint_as_float(v.w);
    }
    __device__ __forceinline__ void mma_words(const uint4&, Aux, uint32_t (&o)[EPV / 2]) const { o[0] = o[1] = 0; }
    __device__ static __forceinline__ void pair_x(uint32_t (&)[EPV / 2]) {}
    __device__ __forceinline__ float mma_scale() const { return 1.f; }
};

// FP8 E4M3 (OCP "fn") [N, K], one byte per element, no scale (the IR's f8e4m3
// weights are plain values). Bit trick: the 7 exponent/mantissa bits placed
// at bits 4..10 of a bf16 (sign at 15) are the value times 2^-120 exactly,
// subnormals included; one bf16x2 multiply by 2^120 restores it. Pairs are
// (byte 0, byte 2) and (byte 1, byte 3) of each word. NaN bytes (0x7f, 0xff)
// decode to 480 on the MMA path (the IR never holds NaN weights).
struct WE4M3 {
    const uint8_t* p;
    enum : int { EPV = 16, GS = 8 };
    enum : bool { MMA = true };
    using Aux = NoAux;
    __device__ __forceinline__ uint4 load(int row, int k, int K) const { return ld_stream_v4(p + (size_t)row * K + k); }
    __device__ __forceinline__ Aux aux(int, int, int) const { return {}; }
    __device__ __forceinline__ void group(const uint4& v, Aux, int j, float (&o)[GS]) const {
#pragma unroll
        for (int i = 0; i < 8; ++i) o[i] = e4m3_to_float((u4_word(v, 2 * j + i / 4) >> (8 * (i % 4))) & 0xffu);
    }
    __device__ __forceinline__ void mma_words(const uint4& v, Aux, uint32_t (&o)[EPV / 2]) const {
        constexpr uint32_t two120 = 0x7b807b80u;  // bf16x2 {2^120, 2^120}
#pragma unroll
        for (int m = 0; m < 4; ++m) {
            const uint32_t w = u4_word(v, m);
            const uint32_t even = ((w << 4) & 0x07f007f0u) | ((w << 8) & 0x80008000u);  // bytes 0, 2
            const uint32_t odd = ((w >> 4) & 0x07f007f0u) | (w & 0x80008000u);          // bytes 1, 3
            o[2 * m] = hmul2_bf16(even, two120);
            o[2 * m + 1] = hmul2_bf16(odd, two120);
        }
    }
    // Natural words (x0,x1),(x2,x3) -> (x0,x2),(x1,x3), per 4 elements.
    __device__ static __forceinline__ void pair_x(uint32_t (&x)[EPV / 2]) {
#pragma unroll
        for (int m = 0; m < EPV / 4; ++m) {
            const uint32_t a = x[2 * m], b = x[2 * m + 1];
            x[2 * m] = prmt(a, b, 0x5410u);
            x[2 * m + 1] = prmt(a, b, 0x7632u);
        }
    }
    __device__ __forceinline__ float mma_scale() const { return 1.f; }
};

namespace fp4_detail {
// bf16x2 word holding E2M1 nibbles i and i+4 of `w` (i = 0..3) as values
// times 2^-126 exactly: magnitude bits e,m at bf16 bits 8..6 (exponent field
// e, mantissa bit m: (1 + m/2) 2^(e-127), or m/2 * 2^-126 for e = 0), sign at 15.
__device__ __forceinline__ uint32_t e2m1_pair_pattern(uint32_t w, int i) {
    const int sh = 6 - 4 * i;
    const uint32_t em = (sh >= 0 ? (w << sh) : (w >> -sh)) & 0x01c001c0u;
    const uint32_t s = (w << (12 - 4 * i)) & 0x80008000u;
    return em | s;
}
// Natural x words (x0,x1),(x2,x3),(x4,x5),(x6,x7) -> (x0,x4),(x1,x5),(x2,x6),(x3,x7),
// the pairing of e2m1_pair_pattern, per 8 elements.
__device__ __forceinline__ void pair_x8(uint32_t (&x)[16]) {
#pragma unroll
    for (int m = 0; m < 4; ++m) {
        const uint32_t x0 = x[4 * m], x1 = x[4 * m + 1], x2 = x[4 * m + 2], x3 = x[4 * m + 3];
        x[4 * m] = prmt(x0, x2, 0x5410u);
        x[4 * m + 1] = prmt(x0, x2, 0x7632u);
        x[4 * m + 2] = prmt(x1, x3, 0x5410u);
        x[4 * m + 3] = prmt(x1, x3, 0x7632u);
    }
}
}  // namespace fp4_detail

// MXFP4 (ir/src/fp4.rs Fp4Format::Mx): codes [N][K/2] (element 2i in the low
// nibble of byte i), E8M0 scales [N][K/32]. One 16-byte code vector is
// exactly one block (32 elements, one scale byte).
// MMA: value = pattern * 2^126 * 2^(b-127) = pattern * 2^(b-1); the factor is
// applied as one bf16x2 multiply by 2^(min(b,128)-1) and, only for b > 128
// (block scales above 2, rare in weights), a second by 2^(b-128). Exact
// (values E2M1 * 2^(b-127) have 2 significant bits; bf16 keeps subnormals).
struct WMx {
    const uint8_t* codes;
    const uint8_t* scales;
    enum : int { EPV = 32, GS = 8 };
    enum : bool { MMA = true };
    using Aux = uint32_t;
    __device__ __forceinline__ uint4 load(int row, int k, int K) const {
        return ld_stream_v4(codes + (size_t)row * (K / 2) + k / 2);
    }
    __device__ __forceinline__ Aux aux(int row, int k, int K) const {
        return ld_stream_u8(scales + (size_t)row * (K / 32) + k / 32);
    }
    __device__ __forceinline__ void group(const uint4& v, Aux b, int j, float (&o)[GS]) const {
        e2m1x8_to_float(u4_word(v, j), e8m0_to_float(b), o);
    }
    __device__ __forceinline__ void mma_words(const uint4& v, Aux b, uint32_t (&o)[EPV / 2]) const {
        const uint32_t f1 = (cmin((int)b, 128) + 126) << 7;
        const uint32_t f1x2 = f1 | (f1 << 16);
#pragma unroll
        for (int m = 0; m < 4; ++m) {
#pragma unroll
            for (int i = 0; i < 4; ++i) o[4 * m + i] = hmul2_bf16(fp4_detail::e2m1_pair_pattern(u4_word(v, m), i), f1x2);
        }
        if (b > 128) {
            const uint32_t f2 = b == 255 ? 0x7fc0u : (b - 1) << 7;
            const uint32_t f2x2 = f2 | (f2 << 16);
#pragma unroll
            for (int i = 0; i < EPV / 2; ++i) o[i] = hmul2_bf16(o[i], f2x2);
        }
    }
    __device__ static __forceinline__ void pair_x(uint32_t (&x)[EPV / 2]) { fp4_detail::pair_x8(x); }
    __device__ __forceinline__ float mma_scale() const { return 1.f; }
};

// NVFP4 (Fp4Format::Nv): codes [N][K/2], E4M3 block scales [N][K/16], one
// f32 tensor scale. A 16-byte code vector holds two blocks: Aux = the two
// scale bytes (low byte: elements 0..15). SIMT: (e2m1 * s) * tensor_scale,
// the oracle's single rounding. MMA: the bf16 factor s * 2^116 (exact, 4
// significant bits, no overflow for |s| <= 448) makes the words value * 2^-10
// / tensor_scale; mma_scale() = tensor_scale * 2^10 restores it on the sums.
struct WNv {
    const uint8_t* codes;
    const uint8_t* scales;
    float tensor_scale;
    enum : int { EPV = 32, GS = 8 };
    enum : bool { MMA = true };
    using Aux = uint32_t;
    __device__ __forceinline__ uint4 load(int row, int k, int K) const {
        return ld_stream_v4(codes + (size_t)row * (K / 2) + k / 2);
    }
    __device__ __forceinline__ Aux aux(int row, int k, int K) const {
        return ld_stream_u16(scales + (size_t)row * (K / 16) + k / 16);
    }
    __device__ __forceinline__ void group(const uint4& v, Aux b, int j, float (&o)[GS]) const {
        e2m1x8_to_float(u4_word(v, j), e4m3_to_float(j < 2 ? (b & 0xffu) : (b >> 8)), o);
#pragma unroll
        for (int i = 0; i < GS; ++i) o[i] *= tensor_scale;
    }
    __device__ __forceinline__ void mma_words(const uint4& v, Aux b, uint32_t (&o)[EPV / 2]) const {
        const uint32_t fa = __bfloat16_as_ushort(__float2bfloat16_rn(e4m3_to_float(b & 0xffu) * 0x1p116f));
        const uint32_t fb = __bfloat16_as_ushort(__float2bfloat16_rn(e4m3_to_float(b >> 8) * 0x1p116f));
        const uint32_t fax2 = fa | (fa << 16), fbx2 = fb | (fb << 16);
#pragma unroll
        for (int m = 0; m < 4; ++m) {
#pragma unroll
            for (int i = 0; i < 4; ++i)
                o[4 * m + i] = hmul2_bf16(fp4_detail::e2m1_pair_pattern(u4_word(v, m), i), m < 2 ? fax2 : fbx2);
        }
    }
    __device__ static __forceinline__ void pair_x(uint32_t (&x)[EPV / 2]) { fp4_detail::pair_x8(x); }
    __device__ __forceinline__ float mma_scale() const { return tensor_scale * 1024.f; }
};

// ---------------------------------------------------------------------------
// Paths and configuration.

enum class MvPath : int { Auto = 0, Simt = 1, Mma = 2 };

// Compile-time configuration of matvec_tile.
//   MAX_T   tokens per call (nt <= MAX_T; call again per chunk of tokens)
//   ROWS    weight rows per tile (MMA: a multiple of 16 with (THREADS/32) % (ROWS/16) == 0)
//   THREADS threads per CTA (a multiple of 32)
//   K       reduction length (a multiple of 8 and of the format's k-block on the MMA path:
//           32 bf16, 64 E4M3, 128 FP4; the SIMT path needs K % EPV == 0 only)
//   NORM    RMSNorm prologue over x (gamma, eps)
//   PATH    MMA / SIMT / Auto
//   U       k-blocks in flight per lane and row (0: default, 4 on the MMA path, 2 on SIMT)
template <int MAX_T, int ROWS, int THREADS, int K, bool NORM = false, MvPath PATH = MvPath::Auto, int U = 0>
struct MvCfg {
    enum : int { max_t = MAX_T, rows = ROWS, threads = THREADS, k = K, u = U };
    enum : bool { norm = NORM };
    __host__ __device__ static constexpr MvPath path() { return PATH; }
};

namespace mv_detail {

template <class W, typename Act, MvPath P> __host__ __device__ constexpr bool use_mma() {
    return P == MvPath::Mma || (P == MvPath::Auto && W::MMA && is_same_t<Act, bf16>::value);
}

// The tile decomposition shared by matvec and the expert tiles.
//   NROWS  weight rows a tile reads (experts_up: 2 * ROWS, gate and up)
//   MAXCOL columns (tokens or (token, slot) pairs) per weight pass
// A warp owns one row group of G rows (MMA: 16; SIMT: RPW rows) and one of
// KW K-slices: warp w -> row group w % RG, K-slice w / RG; slice kw takes the
// k-blocks kw, kw + KW, ... (a k-block: MMA 4*EPV elements of each row, SIMT
// 32*EPV). Partial sums of the KW slices meet in shared memory.
template <int NROWS, int THREADS, int K, int MAXCOL, bool MMA_, class W, int U_, int XH_ = 0>
struct Plan {
    enum : bool { MMA = MMA_ };
    enum : int {
        NW = THREADS / 32,
        EPV = W::EPV,
        G = MMA_ ? 16 : cmax(2, NROWS / NW),
        RG = NROWS / G,
        KW = NW / RG,
        KB = MMA_ ? 4 * EPV : 32 * EPV,
        NKB = cdiv(K, KB),
        NT = cdiv(MAXCOL, 8),               // MMA n-tiles
        NCOLP = MMA_ ? 8 * NT : MAXCOL,     // columns of the reduction buffer
        // Batch depth, never more than the k-blocks one warp owns (no wasted
        // reloads when a warp has fewer than the default).
        U = cmin(U_ > 0 ? U_ : (MMA_ ? 4 : 2), cmax(1, cdiv(NKB, KW))),
        // MMA path: the most x vectors a warp loads together ahead of a
        // batch's products (MmaWarp::XG); 0: each k-block's x where it is used.
        XH = XH_,
    };
    static_assert(THREADS % 32 == 0, "THREADS must be a multiple of 32");
    static_assert(NROWS % G == 0, "rows per tile must be a multiple of the row group (16 on the MMA path)");
    static_assert(RG >= 1 && NW % RG == 0, "the warps must split evenly into row groups (THREADS/32 % (ROWS/G) == 0)");
    static_assert(K % EPV == 0 && K % 8 == 0, "K must be a multiple of 8 and of the format's vector");
    static_assert(!MMA || K % KB == 0, "MMA path: K must be a multiple of 4 * EPV (32 bf16, 64 E4M3, 128 FP4)");
    static_assert(!MMA || W::MMA, "MMA path: this weight format is not exact in bf16 (use SIMT)");
    static_assert(MMA || G * MAXCOL <= 64, "SIMT path: rows per warp x columns > 64 accumulators; lower ROWS or MAX_T");
};

// The batch loop of both warp kinds (D: MmaWarp or SimtWarp, which provide
// issue(w, kb, kb1, kbs): load the batch of U k-blocks kb, kb + kbs, ... into
// registers, and consume(w, kb, kb1, kbs, xk): multiply it).
template <class D, class P, class W> struct Batches {
    // Puts the first batch of run(w, kb0, kb1, kbs, ...) in flight.
    __device__ __forceinline__ void start(const W& w, int kb0, int kb1, int kbs) {
        if (kb0 < kb1) static_cast<D*>(this)->issue(w, kb0, kb1, kbs);
    }

    // Accumulates k-blocks kb0, kb0 + kbs, ... < kb1, U per batch; x is
    // addressed at the column pointer + (k - xk). With `started` the first
    // batch is already in flight (start() ran with the same arguments).
    __device__ __forceinline__ void run(const W& w, int kb0, int kb1, int kbs, int xk, bool started = false) {
        D& d = *static_cast<D*>(this);
        for (int kb = kb0; kb < kb1; kb += kbs * P::U) {
            if (kb != kb0 || !started) d.issue(w, kb, kb1, kbs);
            d.consume(w, kb, kb1, kbs, xk);
        }
    }
};

// MMA warp state: partial sums d[nt][i] of rows (g, g+8) x columns
// (nt*8 + 2q, nt*8 + 2q + 1) over the k-blocks this warp has run.
template <class P, class W, int K> struct MmaWarp : Batches<MmaWarp<P, W, K>, P, W> {
    enum : int { NT = P::NT, EPV = W::EPV, NWD = EPV / 2, XV = EPV / 8 };
    float d[NT][4];
    int ra, rb, ntiles;
    const bf16* xp[NT];

    // rowmap(lr): global weight row of local row lr (0..15), clamped in range;
    // colptr(c): x row of column c < ncols (ncols >= 1).
    template <class RowMap, class ColPtr> __device__ __forceinline__ void init(RowMap rowmap, ColPtr colptr, int ncols) {
        const int g = (threadIdx.x & 31) >> 2;
        ra = rowmap(g);
        rb = rowmap(g + 8);
        ntiles = cdiv(ncols, 8);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            xp[nt] = colptr(cmin(nt * 8 + g, ncols - 1));
#pragma unroll
            for (int i = 0; i < 4; ++i) d[nt][i] = 0.f;
        }
    }

    // The batch in flight: U k-blocks x rows (ra, rb) of 16-byte weight
    // vectors and their block scales.
    uint4 va[P::U], vb[P::U];
    typename W::Aux sa[P::U], sb[P::U];

    // Issues the weight loads of the batch that starts at k-block kb (k-blocks
    // kb, kb + kbs, ... of which those past kb1 load the last one again: no
    // branch around the loads; consume() skips their products). Requires kb < kb1.
    __device__ __forceinline__ void issue(const W& w, int kb, int kb1, int kbs) {
        const int q = threadIdx.x & 3;
#pragma unroll
        for (int u = 0; u < P::U; ++u) {
            const int k = min(kb + u * kbs, kb1 - 1) * P::KB + q * EPV;
            va[u] = w.load(ra, k, K);
            vb[u] = w.load(rb, k, K);
            sa[u] = w.aux(ra, k, K);
            sb[u] = w.aux(rb, k, K);
        }
    }

    // The x vectors of XG k-blocks (every column tile) are loaded together,
    // before any of them is used: each k-block's x is otherwise a load behind
    // the branches on the k-block and the column tile, one round trip to L2
    // after another where a warp is the only one to read its x (an expert's
    // own h rows in the down tile). At most P::XH vectors (4 registers each),
    // and only where that holds two k-blocks' x or more; otherwise (P::XH = 0,
    // many column tiles) each k-block's x is loaded where it is used.
    enum : int { XB = NT * XV, XG = 2 * XB <= P::XH ? cmin((int)P::U, P::XH / XB) : 0 };

    // Multiplies the batch issue(w, kb, ...) loaded into the accumulators.
    __device__ __forceinline__ void consume(const W& w, int kb, int kb1, int kbs, int xk) {
        const int q = threadIdx.x & 3;
        if constexpr (XG > 0) {
#pragma unroll
            for (int u0 = 0; u0 < P::U; u0 += XG) {
                // Loaded at clamped places without a branch (a k-block past kb1
                // reads the last one again, a column tile past ntiles its last
                // column, as init() clamps): only the products below are skipped.
                uint4 xv[XG][NT][XV];
#pragma unroll
                for (int v = 0; v < XG; ++v) {
                    if (u0 + v < P::U) {
                        const int k = min(kb + (u0 + v) * kbs, kb1 - 1) * P::KB + q * EPV;
#pragma unroll
                        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                            for (int j = 0; j < XV; ++j) xv[v][nt][j] = ld_v4(xp[nt] + (k - xk) + 8 * j);
                    }
                }
#pragma unroll
                for (int v = 0; v < XG; ++v) {
                    const int u = u0 + v;
                    if (u < P::U && kb + u * kbs < kb1)  // warp-uniform
                        multiply(w, u, [&](int nt, int j) { return xv[v][nt][j]; });
                }
            }
        } else {
#pragma unroll
            for (int u = 0; u < P::U; ++u) {
                const int kbu = kb + u * kbs;
                if (kbu < kb1) {  // warp-uniform
                    const int k = kbu * P::KB + q * EPV;
                    multiply(w, u, [&](int nt, int j) { return ld_v4(xp[nt] + (k - xk) + 8 * j); });
                }
            }
        }
    }

    // The products of the batch's k-block u with every column tile:
    // xvec(nt, j) gives column tile nt's j-th x vector of that k-block (its
    // natural words, paired here as the format pairs the weights).
    template <class XVec> __device__ __forceinline__ void multiply(const W& w, int u, XVec xvec) {
        uint32_t A0[NWD], A1[NWD];
        w.mma_words(va[u], sa[u], A0);
        w.mma_words(vb[u], sb[u], A1);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            if (nt < ntiles) {  // warp-uniform
                uint32_t X[NWD];
#pragma unroll
                for (int j = 0; j < XV; ++j) {
                    const uint4 xj = xvec(nt, j);
                    X[4 * j] = xj.x, X[4 * j + 1] = xj.y, X[4 * j + 2] = xj.z, X[4 * j + 3] = xj.w;
                }
                W::pair_x(X);
#pragma unroll
                for (int s = 0; s < EPV / 4; ++s) {
                    const uint32_t a[4] = {A0[2 * s], A1[2 * s], A0[2 * s + 1], A1[2 * s + 1]};
                    const uint32_t b[2] = {X[2 * s], X[2 * s + 1]};
                    mma_bf16_16816(d[nt], a, b);
                }
            }
        }
    }

    // sink(lr, col, value) once per (local row, column < ncols) of this warp.
    template <class Sink> __device__ __forceinline__ void emit(Sink sink, int ncols) const {
        const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            if (nt < ntiles) {
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int col = nt * 8 + 2 * q + (i & 1);
                    if (col < ncols) sink(g + 8 * (i >> 1), col, d[nt][i]);
                }
            }
        }
    }

    __device__ __forceinline__ static float scale(const W& w) { return w.mma_scale(); }
};

// SIMT warp state: per-lane partial sums acc[r][c] over the vectors this lane
// has read; emit() reduces them over the warp.
template <class P, class W, int K, typename Act> struct SimtWarp : Batches<SimtWarp<P, W, K, Act>, P, W> {
    enum : int { G = P::G, NC = P::NCOLP, EPV = W::EPV, GS = W::GS, NV = pow2_ceil(G * NC) };
    float acc[G][NC];
    int rows[G], ncols;
    const Act* xp[NC];

    template <class RowMap, class ColPtr> __device__ __forceinline__ void init(RowMap rowmap, ColPtr colptr, int nc) {
        ncols = nc;
#pragma unroll
        for (int r = 0; r < G; ++r) rows[r] = rowmap(r);
#pragma unroll
        for (int c = 0; c < NC; ++c) {
            xp[c] = colptr(cmin(c, nc - 1));
#pragma unroll
            for (int r = 0; r < G; ++r) acc[r][c] = 0.f;
        }
    }

    __device__ __forceinline__ static void load_x(const Act* p, float (&o)[GS]) {
        if constexpr (GS == 8) load8(p, o);
        else load4(p, o);
    }

    // The batch in flight: U k-blocks x G rows of 16-byte weight vectors.
    uint4 v[P::U][G];
    typename W::Aux a[P::U][G];

    // Issues the weight loads of the batch at k-block kb (out-of-range
    // vectors load the row's last vector instead: no branch; consume() skips
    // them). Requires kb < kb1.
    __device__ __forceinline__ void issue(const W& w, int kb, int kb1, int kbs) {
        const int lane = threadIdx.x & 31;
#pragma unroll
        for (int u = 0; u < P::U; ++u) {
            const int k = min(min(kb + u * kbs, kb1 - 1) * P::KB + lane * EPV, K - EPV);
#pragma unroll
            for (int r = 0; r < G; ++r) {
                v[u][r] = w.load(rows[r], k, K);
                a[u][r] = w.aux(rows[r], k, K);
            }
        }
    }

    // Multiplies the batch issue(w, kb, ...) loaded (elements below K only).
    __device__ __forceinline__ void consume(const W& w, int kb, int kb1, int kbs, int xk) {
        const int lane = threadIdx.x & 31;
#pragma unroll
        for (int u = 0; u < P::U; ++u) {
            const int k = (kb + u * kbs) * P::KB + lane * EPV;
            if (kb + u * kbs < kb1 && k < K) {
#pragma unroll
                for (int j = 0; j < EPV / GS; ++j) {
                    float wf[G][GS];
#pragma unroll
                    for (int r = 0; r < G; ++r) w.group(v[u][r], a[u][r], j, wf[r]);
#pragma unroll
                    for (int c = 0; c < NC; ++c) {
                        if (c < ncols) {
                            float xf[GS];
                            load_x(xp[c] + (k - xk) + j * GS, xf);
#pragma unroll
                            for (int r = 0; r < G; ++r)
#pragma unroll
                                for (int i = 0; i < GS; ++i) acc[r][c] = fmaf(wf[r][i], xf[i], acc[r][c]);
                        }
                    }
                }
            }
        }
    }

    // Transposing butterfly: at stage S (lane offset 16 >> S) a lane keeps the
    // lower or upper half of its C values and adds its partner's copy of that
    // half, so NV values x 32 lanes reduce in sum(NV/2^S) shuffles; once one
    // value is left the remaining stages are plain butterflies.
    template <int S> __device__ __forceinline__ static void xreduce(float (&v)[NV], int lane) {
        if constexpr (S < 5) {
            constexpr int O = 16 >> S, C = NV >> S;
            if constexpr (C >= 2) {
                constexpr int H = C / 2;
                const bool hi = (lane & O) != 0;
#pragma unroll
                for (int i = 0; i < H; ++i) {
                    const float keep = hi ? v[i + H] : v[i];
                    const float send = hi ? v[i] : v[i + H];
                    v[i] = keep + __shfl_xor_sync(0xffffffffu, send, O);
                }
            } else {
                v[0] += __shfl_xor_sync(0xffffffffu, v[0], O);
            }
            xreduce<S + 1>(v, lane);
        }
    }

    template <class Sink> __device__ __forceinline__ void emit(Sink sink, int nc) const {
        const int lane = threadIdx.x & 31;
        float v[NV];
#pragma unroll
        for (int i = 0; i < NV; ++i) v[i] = i < G * NC ? acc[i / NC][i % NC] : 0.f;
        xreduce<0>(v, lane);
        // Lane L holds FC values; value i is original index i + sum over halving
        // stages S of (bit (4-S) of L) * (NV >> S) / 2. Lanes that differ only in
        // bits of the plain-butterfly stages hold copies: only the one with those
        // bits zero emits.
        constexpr int FC = NV >= 32 ? NV / 32 : 1;
        int base = 0;
        bool owner = true;
#pragma unroll
        for (int s = 0; s < 5; ++s) {
            const int o = 16 >> s, c = NV >> s;
            if (c >= 2) base += (lane & o) ? c / 2 : 0;
            else owner = owner && (lane & o) == 0;
        }
        if (owner) {
#pragma unroll
            for (int i = 0; i < FC; ++i) {
                const int idx = base + i;
                const int r = idx / NC, c = idx % NC;
                if (idx < G * NC && c < nc) sink(r, c, v[i]);
            }
        }
    }

    __device__ __forceinline__ static float scale(const W&) { return 1.f; }
};

template <bool B, class T, class F> struct cond { using type = T; };
template <class T, class F> struct cond<false, T, F> { using type = F; };

template <class P, class W, int K, typename Act>
using WarpOf = typename cond<P::MMA, MmaWarp<P, W, K>, SimtWarp<P, W, K, Act>>::type;

// Everything matvec_tile derives from its configuration.
template <class C, typename Act, class W> struct MatvecPlan {
    enum : bool { MMA = use_mma<W, Act, C::path()>() };
    static_assert(is_same_t<Act, bf16>::value || is_same_t<Act, float>::value, "activations must be bf16 or f32");
    static_assert(!MMA || is_same_t<Act, bf16>::value, "MMA path: activations must be bf16");
    static_assert(C::max_t >= 1 && (MMA ? C::max_t <= 64 : C::max_t <= 32), "MAX_T out of range");
    using P = Plan<C::rows, C::threads, C::k, C::max_t, MMA, W, C::u>;
    using Warp = WarpOf<P, W, C::k, Act>;
    // Reduction buffer: [KW][ROWS][NCOLP] f32, padded to 16 bytes.
    enum : int { RED_FLOATS = ((int)P::KW * (int)C::rows * (int)P::NCOLP + 3) / 4 * 4 };
    // RMSNorm: inv[MAX_T] (padded to 4 floats) and the normalised x chunk
    // xs[MAX_T][KC] (Act), KC a multiple of the k-block with
    // MAX_T * KC * sizeof(Act) <= 32 KiB (at least one k-block), at most K.
    enum : int {
        INV_FLOATS = C::norm ? ((int)C::max_t + 3) / 4 * 4 : 0,
        KC_BUDGET = (32768 / ((int)C::max_t * (int)sizeof(Act))) / (int)P::KB * (int)P::KB,
        KC = cmin(cdiv(C::k, P::KB) * (int)P::KB, cmax(P::KB, KC_BUDGET)),
        XS_BYTES = C::norm ? (int)C::max_t * KC * (int)sizeof(Act) : 0,
        SMEM = 4 * (RED_FLOATS + INV_FLOATS) + XS_BYTES,
    };
};

}  // namespace mv_detail

// Dynamic shared memory bytes of matvec_tile<C> (16-byte aligned base):
//   4 * round_up(KW * ROWS * NCOLP, 4)                      (cross-warp reduction)
// + NORM ? 4 * round_up(MAX_T, 4) + MAX_T * KC * sizeof(Act) : 0
// where, on the MMA path G = 16, NCOLP = 8 * ceil(MAX_T / 8), KB = 4 * EPV;
// on the SIMT path G = max(2, ROWS / (THREADS/32)), NCOLP = MAX_T, KB = 32 * EPV;
// KW = (THREADS/32) / (ROWS / G), and
// KC = min(ceil(K / KB) * KB, max(KB, floor(32768 / (MAX_T * sizeof(Act)) / KB) * KB)).
template <class C, typename Act, class W> __host__ __device__ constexpr int matvec_smem_bytes() {
    return mv_detail::MatvecPlan<C, Act, W>::SMEM;
}

// Number of tiles of one matvec: ceil(N / ROWS).
__host__ __device__ constexpr int matvec_tiles(int N, int rows) { return cdiv(N, rows); }

// ---------------------------------------------------------------------------
// matvec_tile
//
// Computes, for the ROWS weight rows n in [tile*ROWS, min(N, (tile+1)*ROWS))
// and the tokens t in [t0, t0 + nt) (1 <= nt <= MAX_T):
//     acc = sum_k X[t, k] * W[n, k]          (f32; NVFP4 tensor scale included)
// where X = x (rows of stride K) or, with NORM, RMSNorm(x; gamma, eps) as the
// interpreter rounds it, and calls epi(t, n, acc) exactly once per (t, n).
// x points at token 0 of the whole activation (row t at x + t*K); for more
// than MAX_T tokens call again with t0 += MAX_T (one __syncthreads per call).
//
// Tiles: ceil(N / ROWS) (matvec_tiles). Shared memory: matvec_smem_bytes<C, Act, W>().
// Decomposition: warp w takes row group w % RG (16 rows MMA, G rows SIMT) and
// the k-blocks kw = w / RG, kw + KW, ... of every row; rows past N read row
// N-1 (discarded). Per lane: U k-blocks x 2 rows (MMA) or U x G (SIMT) 16-byte
// weight loads are issued before any is used. The KW partial sums are written
// to shared memory and added in kw order by the thread that calls epi.
// NORM: the first batch of weight loads is issued, then inv of each token
// (f64 sum of squares, one warp per token), then x is normalised into shared
// memory KC elements at a time (two barriers per chunk), so the weights'
// latency covers the normalisation's; the cost is O(MAX_T * K) per tile, so with many tokens prefer a
// bigger ROWS (or normalising once, elsewhere).
// xn_out (NORM only; nullptr: none): also stores the normalised rows t0 ..
// t0 + nt there ([T, K], row stride K), for kernels that read the norm itself;
// pass it to one tile of the grid.
// Rounding: none here besides the RMSNorm points; epi rounds.
// Call from all THREADS threads; reuses smem from the previous call safely.
template <class C, typename Act, class W, class Epi>
__device__ void matvec_tile(int tile, const Act* __restrict__ x, int t0, int nt, const nodeduce_t<Act>* __restrict__ gamma,
                            float eps, W w, int N, Epi epi, char* smem, nodeduce_t<Act>* __restrict__ xn_out = nullptr) {
    using MP = mv_detail::MatvecPlan<C, Act, W>;
    using P = typename MP::P;
    constexpr int K = C::k, ROWS = C::rows;
    __syncthreads();  // the previous tile may still read smem
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int rg = warp % P::RG, kw = warp / P::RG;
    const int row0 = tile * ROWS;
    float* red = reinterpret_cast<float*>(smem);
    typename MP::Warp st;
    auto rowmap = [&](int lr) { return min(row0 + rg * P::G + lr, N - 1); };
    if constexpr (!C::norm) {
        st.init(rowmap, [&](int c) { return x + (size_t)(t0 + c) * K; }, nt);
        st.run(w, kw, P::NKB, P::KW, 0);
    } else {
        float* inv = red + MP::RED_FLOATS;
        Act* xs = reinterpret_cast<Act*>(inv + MP::INV_FLOATS);
        st.init(rowmap, [&](int c) { return static_cast<const Act*>(xs + c * MP::KC); }, nt);
        // The first batch of weights is in flight while x is normalised.
        st.start(w, kw, cdiv(cmin(K, MP::KC), P::KB), P::KW);
        for (int t = warp; t < nt; t += P::NW) {
            const Act* xr = x + (size_t)(t0 + t) * K;
            double s = 0.0;
            for (int k = lane * 8; k < K; k += 256) {
                float v[8];
                load8(xr + k, v);
#pragma unroll
                for (int i = 0; i < 8; ++i) s += (double)v[i] * (double)v[i];
            }
            s = warp_sum(s);
            if (lane == 0) inv[t] = 1.0f / sqrtf((float)(s / (double)K) + eps);
        }
        for (int kc0 = 0; kc0 < K; kc0 += MP::KC) {
            const int kc1 = min(K, kc0 + MP::KC);
            const int n8 = (kc1 - kc0) / 8;
            __syncthreads();  // inv written / previous chunk consumed
            for (int i = threadIdx.x; i < nt * n8; i += C::threads) {
                const int t = i / n8, kk = kc0 + (i - t * n8) * 8;
                float v[8], g[8], o[8];
                load8(x + (size_t)(t0 + t) * K + kk, v);
                load8(gamma + kk, g);
                const float r = inv[t];
#pragma unroll
                for (int j = 0; j < 8; ++j) o[j] = round_to<Act>(g[j] * round_to<Act>(v[j] * r));
                store8(xs + t * MP::KC + (kk - kc0), o);
                if (xn_out != nullptr) store8(xn_out + (size_t)(t0 + t) * K + kk, o);
            }
            __syncthreads();
            st.run(w, kc0 / P::KB + kw, cdiv(kc1, P::KB), P::KW, kc0, kc0 == 0);
        }
    }
    st.emit([&](int lr, int c, float v) { red[(kw * ROWS + rg * P::G + lr) * P::NCOLP + c] = v; }, nt);
    __syncthreads();
    const float sc = MP::Warp::scale(w);
    for (int i = threadIdx.x; i < ROWS * nt; i += C::threads) {
        const int c = i / ROWS, r = i - c * ROWS, n = row0 + r;
        if (n < N) {
            float a = 0.f;
#pragma unroll
            for (int j = 0; j < P::KW; ++j) a += red[(j * ROWS + r) * P::NCOLP + c];
            epi(t0 + c, n, a * sc);
        }
    }
}

}  // namespace tf
