// tilefuse mixture-of-experts templates: the router (top-k choice, weights and
// the routing table) and the two weight-streaming expert tiles.
//
// Semantics are those of the interpreter (ir/src/interp.rs): `moe.router_select`,
// `moe.router_weights` and `moe.experts`:
//   g = round(gate_e . x_t), u = round(up_e . x_t), h = round(silu(g) * u),
//   out[t] = round(sum_j w[t,j] * (down_e . h))          (round = to bf16)
// The expert tiles read each distinct expert's weights once per tile for all
// the (token, slot) pairs that chose it (verification of B tokens reads the
// union of their experts, not B times 8 experts). The sum over a token's
// slots runs in an order of the experts fixed by the routing table (see
// experts_down_tile) rather than slot order (f32 rounding differences only).
//
// Routing table (device layout, int32, written by router_tile, read by the
// expert tiles; TK = MAX_T * TOPK with the MAX_T of the bucket, so that every
// field's place is a constant and a tile reads the count, its expert and its
// offsets in one round):
//   [0]                      n_distinct: experts chosen by at least one token
//   [1 .. 1 + TK)            expert[d], d < n_distinct: those experts, ascending
//   [1 + TK .. 2 + 2 TK)     offset[d], d <= n_distinct: offset[d]..offset[d+1] index pair[]
//                            (offset[n_distinct] = T * TOPK)
//   [2 + 2 TK .. 2 + 3 TK)   pair[i] = t * TOPK + j for every (t, j) with idx[t, j] = expert[d],
//                            grouped by d, ascending (t, j) within a group
// route_table_ints(MAX_T, TOPK) = 2 + 3 * MAX_T * TOPK is its size.
//
// Persistent kernels: the table, idx, w and the h workspace are read with
// ordinary loads (never the non-coherent path), so producer tiles of the same
// launch may write them before the consumer's acquire + barrier.
#pragma once
#include "matvec.cuh"

namespace tf {

__host__ __device__ constexpr int route_table_ints(int max_t, int topk) { return 2 + 3 * max_t * topk; }

// Read access to a routing table.
struct RouteView {
    const int* base;
    int tk;  // MAX_T * TOPK
    __device__ __forceinline__ int n_distinct() const { return base[0]; }
    __device__ __forceinline__ int expert(int d) const { return base[1 + d]; }
    __device__ __forceinline__ int offset(int d) const { return base[1 + tk + d]; }
    __device__ __forceinline__ int pair(int i) const { return base[2 + 2 * tk + i]; }
    // The count and slot d's expert and pair range (d < tk), in one round of
    // loads through L2: the four places are inside the table whatever the
    // count, and `ld_l2_i32` is not reordered, so the compiler issues all four
    // before a branch on the count instead of one after another.
    struct Slot {
        int n_distinct, expert, p0, np;
    };
    __device__ __forceinline__ Slot slot(int d) const {
        const int nd = ld_l2_i32(base), e = ld_l2_i32(base + 1 + d);
        const int p0 = ld_l2_i32(base + 1 + tk + d), p1 = ld_l2_i32(base + 2 + tk + d);
        return Slot{nd, e, p0, p1 - p0};
    }
    // The same from a table this CTA wrote itself (before a barrier), in its
    // shared memory or in global memory: ordinary loads.
    __device__ __forceinline__ Slot own_slot(int d) const {
        return Slot{base[0], base[1 + d], base[1 + tk + d], base[2 + tk + d] - base[1 + tk + d]};
    }
};

namespace moe_detail {
// sigmoid and silu exactly as the interpreter writes them (f32, IEEE division,
// expf within 2 ulp of the exact exponential), not the fast prelude versions.
__device__ __forceinline__ float sigmoid_ref(float x) { return 1.0f / (1.0f + expf(-x)); }

// The router's total order on (value, index): NaN above every number, then
// larger values, ties to the lower index (interp cmp_desc + stable sort).
__device__ __forceinline__ bool before(float a, int ia, float b, int ib) {
    const bool na = a != a, nb = b != b;
    if (na || nb) return na && (!nb || ia < ib);
    return a > b || (a == b && ia < ib);
}
// A key whose unsigned order is the router's order on values: NaN above
// every number, larger values above, -0 equal to +0.
__device__ __forceinline__ uint32_t order_key(float x) {
    if (x != x) return 0xffffffffu;
    const uint32_t b = __float_as_uint(x == 0.f ? 0.f : x);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
// Warp-wide best (value, index) under `before`; index -1 = none. All lanes get it.
__device__ __forceinline__ void warp_best(float& v, int& i) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const int oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (oi >= 0 && (i < 0 || before(ov, oi, v, i))) v = ov, i = oi;
    }
}
}  // namespace moe_detail

// ---------------------------------------------------------------------------
// Router.

// MAX_T: tokens per forward (<= 64); E experts (<= 512); TOPK per token;
// N_GROUP groups (1: none) of which TOPK_GROUP are kept; SOFTMAX scores
// (else sigmoid); NORM renormalises the chosen weights.
template <int MAX_T, int E, int TOPK, int N_GROUP = 1, int TOPK_GROUP = 1, bool SOFTMAX = false, bool NORM = true,
          int THREADS = 256>
struct RouterCfg {
    enum : int { max_t = MAX_T, e = E, topk = TOPK, n_group = N_GROUP, topk_group = TOPK_GROUP, threads = THREADS };
    enum : bool { softmax = SOFTMAX, norm = NORM };
    static_assert(MAX_T >= 1 && MAX_T <= 64, "router: at most 64 tokens");
    static_assert(E >= 1 && E <= 512 && TOPK >= 1 && TOPK <= E, "router: E <= 512, 1 <= TOPK <= E");
    static_assert(N_GROUP >= 1 && E % N_GROUP == 0 && (N_GROUP == 1 || E / N_GROUP >= 2), "router: groups");
    static_assert(TOPK_GROUP >= 1 && TOPK_GROUP <= N_GROUP, "router: topk_group");
    static_assert(THREADS % 32 == 0 && THREADS >= 32, "router: THREADS");
};

namespace moe_detail {
template <class C> struct RouterPlan {
    enum : int {
        NW = C::threads / 32,
        EJ = cdiv(C::e, 32),  // experts per lane
        NG = C::n_group,
        // f32 sc[NW][E], ch[NW][E], gs[NW][NG]; int kept[NW][NG], sel[MAX_T*TOPK], cnt[E], start[E], run[E]
        SC = 0,
        CH = SC + NW * C::e,
        GS = CH + NW * C::e,
        KEPT = GS + NW * NG,
        SEL = KEPT + NW * NG,
        CNT = SEL + C::max_t * C::topk,
        START = CNT + C::e,
        RUN = START + C::e,
        WORDS = RUN + C::e,
    };
};
}  // namespace moe_detail

// Shared memory of router_tile: 4 * (2*W*E + 2*W*N_GROUP + MAX_T*TOPK + 3*E) bytes, W = THREADS/32.
template <class C> __host__ __device__ constexpr int router_smem_bytes() { return 4 * moe_detail::RouterPlan<C>::WORDS; }

// router_tile
//
// One CTA for all T tokens (1 <= T <= MAX_T) of a forward: tiles = 1 (tile is
// ignored). From f32 logits [T, E] and an optional f32 correction bias [E]
// (nullptr: none), per token (one warp per token, experts spread over lanes):
//   s = sigmoid(l) = 1/(1+expf(-l))  or  softmax: exp(l - max) / (f64 sum as f32)
//   choice = s + bias; with N_GROUP > 1 a group's score is the sum of its two
//   largest choice values (NaN largest), the TOPK_GROUP best groups (ties to the
//   lower group) stay and the other experts' choices become -inf;
//   idx[t, :] = the TOPK best choices, descending, ties to the lower index, NaN first;
//   w[t, j] = s[idx[t, j]], if NORM divided by (f64 sum over j as f32) + norm_eps, times scale
//   (not computed when wts is null: a caller that needs the choice only).
// Then builds the routing table (layout at the top of this file) in `route`:
// counts per expert (shared atomics), a prefix over experts (one warp) and a
// stable placement of the pairs (one warp, 32 pairs per step, __match_any_sync);
// for one token, warp 0 alone ranks its TOPK distinct experts.
// Exactness: choices equal the interpreter's up to expf (<= 2 ulp), so a top-k
// can differ only between experts whose scores are within a few ulp; the
// weights then agree to f32 rounding. Shared memory: router_smem_bytes<C>().
template <class C>
__device__ void router_tile(int /*tile*/, const float* __restrict__ logits, const float* __restrict__ bias, int T,
                            float norm_eps, float scale, int* __restrict__ idx, float* __restrict__ wts,
                            int* __restrict__ route, char* smem) {
    using RP = moe_detail::RouterPlan<C>;
    constexpr int E = C::e, TOPK = C::topk, EJ = RP::EJ;
    __syncthreads();
    float* fs = reinterpret_cast<float*>(smem);
    int* is = reinterpret_cast<int*>(smem);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float* sc = fs + RP::SC + warp * E;
    float* ch = fs + RP::CH + warp * E;
    float* gsc = fs + RP::GS + warp * RP::NG;
    int* kept = is + RP::KEPT + warp * RP::NG;
    int* sel = is + RP::SEL;
    int* cnt = is + RP::CNT;
    int* start = is + RP::START;
    int* run = is + RP::RUN;

    for (int t = warp; t < T; t += RP::NW) {
        float v[EJ];
        // Scores.
        if constexpr (C::softmax) {
            float m = -f32_inf();
#pragma unroll
            for (int j = 0; j < EJ; ++j) {
                const int e = lane + 32 * j;
                v[j] = e < E ? logits[(size_t)t * E + e] : -f32_inf();
                m = fmaxf(m, v[j]);  // NaN-ignoring, as f32::max
            }
            m = warp_max(m);
            double tot = 0.0;
#pragma unroll
            for (int j = 0; j < EJ; ++j) {
                const int e = lane + 32 * j;
                v[j] = expf(v[j] - m);
                if (e < E) tot += (double)v[j];
            }
            const float total = (float)warp_sum(tot);
#pragma unroll
            for (int j = 0; j < EJ; ++j) v[j] = v[j] / total;
        } else {
#pragma unroll
            for (int j = 0; j < EJ; ++j) {
                const int e = lane + 32 * j;
                v[j] = e < E ? moe_detail::sigmoid_ref(logits[(size_t)t * E + e]) : 0.f;
            }
        }
#pragma unroll
        for (int j = 0; j < EJ; ++j) {
            const int e = lane + 32 * j;
            if (e < E) {
                sc[e] = v[j];
                v[j] = bias != nullptr ? v[j] + bias[e] : v[j];
                ch[e] = v[j];
            }
        }
        __syncwarp();
        // Group masking.
        if constexpr (C::n_group > 1) {
            constexpr int GSZ = E / C::n_group;
            for (int gi = lane; gi < C::n_group; gi += 32) {
                const float* g = ch + gi * GSZ;
                float a = g[0], b = g[1];
                if (moe_detail::before(b, 1, a, 0)) {
                    const float x = a;
                    a = b, b = x;
                }
                for (int i = 2; i < GSZ; ++i) {
                    const float x = g[i];
                    if (moe_detail::before(x, 0, a, 1)) b = a, a = x;  // strictly above a
                    else if (moe_detail::before(x, 0, b, 1)) b = x;
                }
                gsc[gi] = a + b;
                kept[gi] = 0;
            }
            __syncwarp();
            for (int r = 0; r < C::topk_group; ++r) {
                float bv = 0.f;
                int bi = -1;
                for (int gi = lane; gi < C::n_group; gi += 32)
                    if (!kept[gi] && (bi < 0 || moe_detail::before(gsc[gi], gi, bv, bi))) bv = gsc[gi], bi = gi;
                moe_detail::warp_best(bv, bi);
                if (lane == 0) kept[bi] = 1;
                __syncwarp();
            }
#pragma unroll
            for (int j = 0; j < EJ; ++j) {
                const int e = lane + 32 * j;
                if (e < E && !kept[e / GSZ]) v[j] = -f32_inf();
            }
        }
        // Top-k: TOPK rounds of a warp arg-best over the not yet taken
        // experts, two warp reductions a round: the largest order key (NaN
        // above every number, -0 equal to +0), then the lowest index holding
        // it (moe_detail::before); every lane reads the winner's score.
        uint32_t key[EJ];
#pragma unroll
        for (int j = 0; j < EJ; ++j) key[j] = moe_detail::order_key(v[j]);
        uint32_t taken = 0;
        float wsel[TOPK];
#pragma unroll
        for (int r = 0; r < TOPK; ++r) {
            uint32_t bk = 0;
            int bj = -1;
#pragma unroll
            for (int j = 0; j < EJ; ++j) {
                const int e = lane + 32 * j;
                if (e < E && !((taken >> j) & 1u) && (bj < 0 || key[j] > bk)) bk = key[j], bj = j;
            }
            const uint32_t mk = __reduce_max_sync(0xffffffffu, bj >= 0 ? bk : 0u);
            const int bi = (int)__reduce_min_sync(0xffffffffu, bj >= 0 && bk == mk ? (uint32_t)(lane + 32 * bj) : 0xffffffffu);
            if (wts != nullptr) wsel[r] = sc[bi];
            if (lane == (bi & 31)) taken |= 1u << (bi >> 5);
            if (lane == 0) {
                sel[t * TOPK + r] = bi;
                idx[t * TOPK + r] = bi;
            }
        }
        // Weights, in slot order on one lane (the oracle's f64 sum order);
        // none where wts is null (a routed gate/up tile other than tile 0).
        if (lane == 0 && wts != nullptr) {
            double s = 0.0;
#pragma unroll
            for (int r = 0; r < TOPK; ++r) s += (double)wsel[r];
            const float denom = (float)s + norm_eps;
#pragma unroll
            for (int r = 0; r < TOPK; ++r) wts[t * TOPK + r] = (C::norm ? wsel[r] / denom : wsel[r]) * scale;
        }
        __syncwarp();
    }
    if (T == 1) {
        // One token (decode): its TOPK experts are distinct, so the table
        // lists them ascending with one pair each (pair j = slot j). Warp 0,
        // which chose them, writes it alone: no counting, no CTA barrier.
        if (warp == 0) {
            int* r_expert = route + 1;
            int* r_offset = route + 1 + C::max_t * TOPK;
            int* r_pair = route + 2 + 2 * C::max_t * TOPK;
            for (int j = lane; j < TOPK; j += 32) {
                const int e = sel[j];
                int rank = 0;
#pragma unroll 8
                for (int i = 0; i < TOPK; ++i) rank += sel[i] < e;
                r_expert[rank] = e;
                r_offset[rank] = rank;
                r_pair[rank] = j;
            }
            if (lane == 0) {
                route[0] = TOPK;
                r_offset[TOPK] = TOPK;
            }
        }
        return;
    }
    // The counters of several tokens' table, ordered before their first use
    // by the barrier below.
    for (int e = threadIdx.x; e < E; e += C::threads) cnt[e] = 0, run[e] = 0;
    __syncthreads();

    // Routing table.
    const int TK = T * TOPK;
    constexpr int MTK = C::max_t * TOPK;
    for (int p = threadIdx.x; p < TK; p += C::threads) atomicAdd(&cnt[sel[p]], 1);
    __syncthreads();
    if (warp == 0) {
        int* r_expert = route + 1;
        int* r_offset = route + 1 + MTK;
        int* r_pair = route + 2 + 2 * MTK;
        // Exclusive prefix over experts of the pair counts and of "chosen" flags;
        // lane l owns experts [l*EJ, (l+1)*EJ).
        int c_sum = 0, f_sum = 0;
#pragma unroll
        for (int j = 0; j < EJ; ++j) {
            const int e = lane * EJ + j;
            const int c = e < E ? cnt[e] : 0;
            c_sum += c;
            f_sum += c > 0;
        }
        int c_inc = c_sum, f_inc = f_sum;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int a = __shfl_up_sync(0xffffffffu, c_inc, o), b = __shfl_up_sync(0xffffffffu, f_inc, o);
            if (lane >= o) c_inc += a, f_inc += b;
        }
        int c_ex = c_inc - c_sum, f_ex = f_inc - f_sum;
#pragma unroll
        for (int j = 0; j < EJ; ++j) {
            const int e = lane * EJ + j;
            if (e < E) {
                const int c = cnt[e];
                start[e] = c_ex;
                if (c > 0) {
                    r_expert[f_ex] = e;
                    r_offset[f_ex] = c_ex;
                }
                c_ex += c;
                f_ex += c > 0;
            }
        }
        if (lane == 31) {
            route[0] = f_inc;
            r_offset[f_inc] = TK;
        }
        __syncwarp();
        // Stable placement: pairs in ascending order, 32 at a time.
        for (int p0 = 0; p0 < TK; p0 += 32) {
            const int p = p0 + lane;
            const bool valid = p < TK;
            const int e = valid ? sel[p] : -1 - lane;
            const uint32_t m = __match_any_sync(0xffffffffu, e);
            const int rank = __popc(m & ((1u << lane) - 1u));
            if (valid) r_pair[start[e] + run[e] + rank] = p;
            __syncwarp();
            if (valid && rank == __popc(m) - 1) run[e] += __popc(m);
            __syncwarp();
        }
    }
}

// ---------------------------------------------------------------------------
// Expert tiles.

// MAX_T: tokens per forward (<= 64; also bounds the pairs of one expert);
// TOPK slots per token; ROWS rows of I (up) or H (down) per tile; H hidden
// size, I expert intermediate size (gate_up [E, 2I, H], down [E, H, I]);
// XA: the most x vectors a gate/up warp loads ahead of a batch's products
// (-1: moe_detail::X_AHEAD; 0: each where it is used).
template <int MAX_T, int TOPK, int ROWS, int THREADS, int H, int I, MvPath PATH = MvPath::Auto, int U = 0,
          int XA = -1>
struct MoeCfg {
    enum : int { max_t = MAX_T, topk = TOPK, rows = ROWS, threads = THREADS, h = H, i = I, u = U, xa = XA };
    __host__ __device__ static constexpr MvPath path() { return PATH; }
    static_assert(MAX_T >= 1 && MAX_T <= 64, "experts: at most 64 tokens");
};

namespace moe_detail {
// The most x vectors a warp of an expert tile loads ahead of a batch's
// products (Plan::XH; two k-blocks' or more where one k-block's x is at most
// 4 vectors, e.g. MXFP4 at MAX_T <= 8), in both tiles. Otherwise each
// k-block's x is a load behind the branches of the products before it.
// Where that applies, the gate/up wrapper asks for 2 CTAs an SM
// (lower::moe::up_min_blocks, which mirrors this value), holding it at 128
// registers.
constexpr int X_AHEAD = 8;
// The gate/up tile's bound on the x vectors loaded ahead (MoeCfg's XA).
template <class C> __host__ __device__ constexpr int up_x_ahead() { return C::xa < 0 ? X_AHEAD : C::xa; }
template <class C, class W, int NROWS, int K, int XH = 0> struct ExpertPlan {
    enum : bool { MMA = mv_detail::use_mma<W, bf16, C::path()>() };
    // Columns per weight pass: all pairs of an expert (<= MAX_T) on the MMA
    // path; at most 8 on SIMT (more pairs: the weights are read again).
    enum : int { MAXCOL = MMA ? (int)C::max_t : cmin(C::max_t, 8) };
    using P = mv_detail::Plan<NROWS, C::threads, K, MAXCOL, MMA, W, C::u, XH>;
    using Warp = mv_detail::WarpOf<P, W, K, bf16>;
};
}  // namespace moe_detail

// Shared memory of experts_up_tile: 4 * KW * (2*ROWS) * NCOLP bytes, where (as
// matvec with 2*ROWS rows and MAX_T columns) MMA: G = 16, NCOLP = 8*ceil(MAX_T/8);
// SIMT: G = max(2, 2*ROWS/(THREADS/32)), NCOLP = min(MAX_T, 8); KW = (THREADS/32) / (2*ROWS/G).
template <class C, class W> __host__ __device__ constexpr int experts_up_smem_bytes() {
    using P = typename moe_detail::ExpertPlan<C, W, 2 * C::rows, C::h, moe_detail::up_x_ahead<C>()>::P;
    return 4 * P::KW * 2 * C::rows * P::NCOLP;
}
// Tiles of experts_up: min(E, T*TOPK) * ceil(I / ROWS) (T: this forward's or the maximum).
__host__ __device__ constexpr int experts_up_tiles(int T, int topk, int E, int I, int rows) {
    return cmin(E, T * topk) * cdiv(I, rows);
}

// experts_up_tile
//
// Tile = (distinct-expert slot d = tile / ceil(I/ROWS), chunk c = tile % ceil(I/ROWS)).
// Tiles with d >= n_distinct return at once (before touching smem). Otherwise,
// with e = expert[d], reads gate rows e*2I + r and up rows e*2I + I + r,
// r in [c*ROWS, min(I, (c+1)*ROWS)), once, and for every pair p = t*TOPK + j of e:
//   g = round_bf16(gate_r . x_t), u = round_bf16(up_r . x_t),
//   h[p, r] = round_bf16(silu(g) * u)       (silu(g) = g * (1/(1+expf(-g))), f32)
// into the workspace h [T*TOPK, I] (bf16; rows of pairs not of e untouched).
// x: [T, H] bf16 (already normalised). Row groups: gate rows are local rows
// 0..ROWS-1, up rows ROWS..2*ROWS-1; the KW K-slices meet in smem. Grid:
// experts_up_tiles(T, TOPK, E, I, ROWS). Smem: experts_up_smem_bytes<C, W>().
// OWN_ROUTE: the table was written by this CTA (routed_up_tile), not by an
// earlier kernel.
template <class C, class W, bool OWN_ROUTE = false>
__device__ void experts_up_tile(int tile, const bf16* __restrict__ x, int T, const int* __restrict__ route, W gate_up,
                                bf16* __restrict__ h, char* smem) {
    using EP = moe_detail::ExpertPlan<C, W, 2 * C::rows, C::h, moe_detail::up_x_ahead<C>()>;
    using P = typename EP::P;
    constexpr int ROWS = C::rows, H = C::h, I = C::i, TOPK = C::topk, CH = cdiv(I, ROWS);
    const RouteView rt{route, C::max_t * TOPK};
    const int d = tile / CH, c = tile - d * CH;
    const RouteView::Slot sl = OWN_ROUTE ? rt.own_slot(d) : rt.slot(d);
    if (d >= sl.n_distinct) return;  // uniform over the CTA
    __syncthreads();
    const int warp = threadIdx.x >> 5;
    const int rg = warp % P::RG, kw = warp / P::RG;
    const int e = sl.expert, p0 = sl.p0, np = sl.np;
    float* red = reinterpret_cast<float*>(smem);
    auto rowmap = [&](int lr) {
        const int l = rg * P::G + lr, half = l >= ROWS ? 1 : 0;
        const int r = min(c * ROWS + (l - half * ROWS), I - 1);
        return e * 2 * I + half * I + r;
    };
    const float sc = EP::Warp::scale(gate_up);
    for (int pc = 0; pc < np; pc += P::NCOLP) {
        const int ncols = min((int)P::NCOLP, np - pc);
        if (pc > 0) __syncthreads();
        typename EP::Warp st;
        // One token: every pair's row of x is row 0 (no read of the pairs).
        st.init(
            rowmap,
            [&](int col) { return C::max_t == 1 ? x : x + (size_t)(rt.pair(p0 + pc + col) / TOPK) * H; }, ncols);
        st.run(gate_up, kw, P::NKB, P::KW, 0);
        st.emit([&](int lr, int col, float v) { red[(kw * 2 * ROWS + rg * P::G + lr) * P::NCOLP + col] = v; }, ncols);
        __syncthreads();
        for (int i = threadIdx.x; i < ROWS * ncols; i += C::threads) {
            const int col = i / ROWS, r = i - col * ROWS, rr = c * ROWS + r;
            if (rr < I) {
                float gs = 0.f, us = 0.f;
#pragma unroll
                for (int j = 0; j < P::KW; ++j) {
                    gs += red[(j * 2 * ROWS + r) * P::NCOLP + col];
                    us += red[(j * 2 * ROWS + ROWS + r) * P::NCOLP + col];
                }
                const float g = round_to<bf16>(gs * sc), u = round_to<bf16>(us * sc);
                const float hv = g * moe_detail::sigmoid_ref(g) * u;
                h[(size_t)rt.pair(p0 + pc + col) * I + rr] = from_float<bf16>(hv);
            }
        }
    }
}

namespace moe_detail {
// router_tile as a call of its own: inlined into the gate/up tile, its
// registers would add to the weight pass's and spill at two CTAs an SM.
template <class RC>
__device__ __noinline__ void router_call(const float* logits, const float* bias, int T, float norm_eps, float scale,
                                         int* idx, float* wts, int* route, char* smem) {
    router_tile<RC>(0, logits, bias, T, norm_eps, scale, idx, wts, route, smem);
}
}  // namespace moe_detail

// Bytes of a routed gate/up tile's own routing table and choice
// (16-byte units), at the start of its shared memory.
template <class C> __host__ __device__ constexpr int routed_up_table_bytes() {
    return (4 * (route_table_ints(C::max_t, C::topk) + C::max_t * C::topk) + 15) / 16 * 16;
}
// Shared memory of routed_up_tile: its own table, then the router's scratch
// or the gate/up pass's buffer (one after the other in time).
template <class RC, class C, class W> __host__ __device__ constexpr int routed_up_smem_bytes() {
    return routed_up_table_bytes<C>() + cmax(router_smem_bytes<RC>(), experts_up_smem_bytes<C, W>());
}

// routed_up_tile
//
// The router and one expert gate/up tile in one (the one-token bucket, where
// a router is one warp's program): the tile runs router_tile<RC> on the
// logits [T, E] itself, then experts_up_tile<C, W> from the table it made.
// Tile 0 writes the choice idx, the weights wts and the routing table
// `route` to global memory, for the down kernel; every other tile writes its
// own choice and table into its shared memory and computes no weights,
// which only the down kernel reads. Every tile computes the same choice
// from the same logits with the same program, so the tables agree. Smem:
// routed_up_smem_bytes<RC, C, W>(). Grid: experts_up_tiles.
template <class RC, class C, class W>
__device__ void routed_up_tile(int tile, const float* __restrict__ logits, const float* __restrict__ bias, int T,
                               float norm_eps, float scale, int* __restrict__ idx, float* __restrict__ wts,
                               int* __restrict__ route, const bf16* __restrict__ x, W gate_up, bf16* __restrict__ h,
                               char* smem) {
    static_assert(RC::max_t == C::max_t && RC::topk == C::topk, "routed_up_tile: router and experts disagree");
    constexpr int TABLE = route_table_ints(C::max_t, C::topk);
    int* own = reinterpret_cast<int*>(smem);
    char* scratch = smem + routed_up_table_bytes<C>();
    const bool first = tile == 0;
    int* r = first ? route : own;
    // Only tile 0's weights are ever read (by the down step): the others
    // choose the experts without computing them.
    moe_detail::router_call<RC>(logits, bias, T, norm_eps, scale, first ? idx : own + TABLE, first ? wts : nullptr, r,
                                scratch);
    // The table (at one token written by warp 0 alone) before any warp reads
    // it, and the router's last use of the scratch before the gate/up pass
    // writes its buffer there.
    __syncthreads();
    experts_up_tile<C, W, true>(tile, x, T, r, gate_up, h, scratch);
}

namespace moe_detail {
// The expert down tile's decomposition. Where the plan splits K over KW warps
// (the MMA path), the warps split the experts instead: slot kw runs experts
// kw, kw + KW, ... over all of K, so the loads of every expert are in flight
// at once rather than one expert after another (an expert's rows are only a
// few k-blocks long). Each warp then reads its own expert's h rows, so it
// loads their x vectors ahead of each batch's products (Plan::XH).
template <class C, class W> struct DownPlan {
    using EP = ExpertPlan<C, W, C::rows, C::i>;
    using P = typename EP::P;
    enum : bool { BY_EXPERT = EP::MMA && P::KW > 1 };
    using PW = typename mv_detail::cond<BY_EXPERT, mv_detail::Plan<C::rows, 32 * P::RG, C::i, EP::MAXCOL, true, W, C::u, X_AHEAD>,
                                        P>::type;
    enum : int { SMEM = 4 * P::KW * C::max_t * C::rows };
};
}  // namespace moe_detail

// Shared memory of experts_down_tile: 4 * KW * MAX_T * ROWS bytes (per K-slice
// per-token accumulators), KW = (THREADS/32) / (ROWS/G), G as matvec with
// ROWS rows (MMA 16, SIMT max(2, ROWS/(THREADS/32))).
template <class C, class W> __host__ __device__ constexpr int experts_down_smem_bytes() {
    return moe_detail::DownPlan<C, W>::SMEM;
}
// Tiles of experts_down: ceil(H / ROWS).
__host__ __device__ constexpr int experts_down_tiles(int H, int rows) { return cdiv(H, rows); }

// experts_down_tile
//
// Tile = ROWS rows n in [tile*ROWS, min(H, (tile+1)*ROWS)) of every expert's
// down [E, H, I]. Loops over the distinct experts d < n_distinct; reads
// down[e][n, :] once per expert and, for each pair p = t*TOPK + j of e, adds
//   w[p] * (down_e[n, :] . h[p, :])
// into per-token f32 accumulators (one set per warp slot, no barrier between
// experts), then calls epi(t, n, acc) once per t < T and row n. On the MMA
// path slot kw holds experts kw, kw + KW, ... over all of K, and acc = the
// sum over the slots in order of each slot's sum in ascending expert order
// (for T = 1 and TOPK <= KW: ascending expert order); otherwise slot kw holds
// the K-slice kw of every expert, summed over the slots (NVFP4 tensor scale
// applied). epi rounds (and may add the
// residual). h: [T*TOPK, I] bf16 from experts_up_tile; w: f32 [T, TOPK].
// Grid: experts_down_tiles(H, ROWS). Smem: experts_down_smem_bytes<C, W>().
// Requires 1 <= T <= MAX_T.
template <class C, class W, class Epi>
__device__ void experts_down_tile(int tile, const bf16* __restrict__ h, const float* __restrict__ w, int T,
                                  const int* __restrict__ route, W down, Epi epi, char* smem) {
    using DP = moe_detail::DownPlan<C, W>;
    using P = typename DP::P;
    using PW = typename DP::PW;
    constexpr int ROWS = C::rows, H = C::h, I = C::i, TOPK = C::topk, MT = C::max_t;
    // With BY_EXPERT (DownPlan) a slot's experts still accumulate in ascending
    // order, one warp each, and the slots are summed in order: deterministic.
    constexpr bool BY_EXPERT = DP::BY_EXPERT;
    using WarpT = mv_detail::WarpOf<PW, W, I, bf16>;
    static_assert(PW::G == P::G && PW::NCOLP == P::NCOLP, "expert split: same warp tile");
    const RouteView rt{route, C::max_t * TOPK};
    __syncthreads();
    const int warp = threadIdx.x >> 5;
    const int rg = warp % P::RG, kw = warp / P::RG;
    const int n0 = tile * ROWS;
    float* acc = reinterpret_cast<float*>(smem);  // [KW][MAX_T][ROWS]
    for (int i = threadIdx.x; i < P::KW * MT * ROWS; i += C::threads) acc[i] = 0.f;
    __syncthreads();
    const int nd = rt.n_distinct();
    for (int d = BY_EXPERT ? kw : 0; d < nd; d += BY_EXPERT ? P::KW : 1) {
        const int e = rt.expert(d), p0 = rt.offset(d), np = rt.offset(d + 1) - p0;
        auto rowmap = [&](int lr) { return e * H + min(n0 + rg * P::G + lr, H - 1); };
        for (int pc = 0; pc < np; pc += P::NCOLP) {
            const int ncols = min((int)P::NCOLP, np - pc);
            WarpT st;
            st.init(rowmap, [&](int col) { return h + (size_t)rt.pair(p0 + pc + col) * I; }, ncols);
            if constexpr (BY_EXPERT) st.run(down, 0, PW::NKB, 1, 0);
            else st.run(down, kw, P::NKB, P::KW, 0);
            // A router's top-k never repeats an expert within a token, so one
            // emit hits every (token, row) at most once and the result does
            // not depend on timing; the shared atomic keeps a repeated expert
            // (an idx not made by router_tile) correct. __syncwarp orders the
            // warp's updates between passes.
            st.emit(
                [&](int lr, int col, float v) {
                    const int p = rt.pair(p0 + pc + col);
                    atomicAdd(acc + (kw * MT + p / TOPK) * ROWS + rg * P::G + lr, w[p] * v);
                },
                ncols);
            __syncwarp();
        }
    }
    __syncthreads();
    const float sc = WarpT::scale(down);
    for (int i = threadIdx.x; i < ROWS * T; i += C::threads) {
        const int t = i / ROWS, r = i - t * ROWS, n = n0 + r;
        if (n < H) {
            float a = 0.f;
#pragma unroll
            for (int j = 0; j < P::KW; ++j) a += acc[(j * MT + t) * ROWS + r];
            epi(t, n, a * sc);
        }
    }
}

}  // namespace tf
