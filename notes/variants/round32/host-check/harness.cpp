// Host check of attention_decode_tile (decode-attention.patch), run by
// run.sh: each case runs rope_append_tile, then the general tile, the decode
// tile, the decode tile appending the new rows itself (on the caches before
// the append) and the general tile appending, on fresh random inputs with
// outputs and workspaces poisoned (NaN bytes). It asks:
// - the decode tile's output within |w|/128 + rowmax/64 of the general
//   tile's w (kernels_attention's tolerance against the interpreter), every
//   element written;
// - the appending decode tile: the caches bit for bit as rope_append_tile
//   writes them, and the same output bytes as the decode tile after it;
// - the same of the general tile's append path.
// Cases: Qwen3 decode at 1k and at 3000 keys (two chunks a split), four
// splits of 20 chunks, three tokens a forward (one a tile), a MiMo sliding
// ring with sinks (one chunk: the same bits as the general tile), one
// buffer with several chunks, head dims 48/32 under a block mask, 32 query
// heads a kv head (two m-tiles), a window over a full cache.
#include "shim.h"
#include "gen/attention.cuh"
#include <cstdio>
#include <random>
#include <algorithm>
using namespace tf;
typedef __nv_bfloat16 b16;
static std::vector<b16> rnd(size_t n, float s, std::mt19937& g) {
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    std::vector<b16> v(n);
    for (auto& x : v) x = __float2bfloat16_rn(u(g) * s);
    return v;
}
static bool same(const std::vector<b16>& a, const std::vector<b16>& b) {
    return a.size() == b.size() && memcmp(a.data(), b.data(), a.size() * 2) == 0;
}
template <class C> struct Run {
    int T, S, cap;
    std::vector<int> pos;
    std::vector<b16> q, k, v, qn, kn, sinks, kc0, vc0;
    float eps = 1e-6f, theta = 10000.f, scale;
    std::vector<char> smem;
    Run(int T_, int S_, int cap_, unsigned seed) : T(T_), S(S_), cap(cap_) {
        std::mt19937 g(seed);
        for (int t = 0; t < T; ++t) pos.push_back(S + t);
        q = rnd((size_t)T * C::HQ * C::DK, 2.f, g);
        k = rnd((size_t)T * C::HKV * C::DK, 2.f, g);
        v = rnd((size_t)T * C::HKV * C::DV, 1.f, g);
        qn = rnd(C::DK, 1.5f, g);
        kn = rnd(C::DK, 1.5f, g);
        sinks = rnd(C::HQ, 2.f, g);
        kc0 = rnd((size_t)cap * C::HKV * C::DK, 2.f, g);
        vc0 = rnd((size_t)cap * C::HKV * C::DV, 1.f, g);
        scale = 1.f / sqrtf((float)C::DK);
        smem.resize(std::max(C::SMEM_BYTES, C::GENERAL_SMEM_BYTES) + 64);
    }
    char* sm() { return (char*)(((uintptr_t)smem.data() + 15) & ~(uintptr_t)15); }
    void rope(std::vector<b16>& kc, std::vector<b16>& vc) {
        for (int t = 0; t < T; ++t)
            emu::run_cta(t, C::THREADS, [&] {
                rope_append_tile<bf16, C::HKV, C::DK, C::DV, C::ROT, C::QNORM, C::THREADS>(
                    t, T, S, cap, pos.data(), k.data(), C::HKV * C::DK, v.data(), C::HKV * C::DV, kn.data(), eps, theta,
                    kc.data(), vc.data(), sm());
            });
    }
    // kind 0: general tile, 1: decode tile, 2: decode tile appending, 3: general appending
    std::vector<b16> attn(int kind, std::vector<b16>& kc, std::vector<b16>& vc) {
        const int os = C::HQ * C::DV;
        std::vector<b16> out((size_t)T * os);
        memset(out.data(), 0xff, out.size() * 2);
        std::vector<float> ws(std::max<long long>(1, C::ws_floats(T)));
        memset(ws.data(), 0xff, ws.size() * 4);
        AttnAppend app{k.data(), C::HKV * C::DK, v.data(), C::HKV * C::DV, kn.data(), eps, kc.data(), vc.data()};
        for (int tile = 0; tile < C::tiles(T); ++tile) {
            if (tile / (C::HKV * C::NSPLIT) * C::TQ >= T) continue;
            emu::run_cta(tile, C::THREADS, [&] {
                if (kind == 0)
                    attention_general_tile<C, false, false, false>(tile, T, S, cap, pos.data(), q.data(), C::HQ * C::DK,
                        qn.data(), eps, theta, scale, kc.data(), vc.data(), sinks.data(), out.data(), os, ws.data(), sm(), AttnAppend{});
                else if (kind == 1)
                    attention_decode_tile<C, false, false, false>(tile, T, S, cap, pos.data(), q.data(), C::HQ * C::DK,
                        qn.data(), eps, theta, scale, kc.data(), vc.data(), sinks.data(), out.data(), os, ws.data(), sm(), AttnAppend{});
                else if (kind == 2)
                    attention_decode_tile<C, true, C::QNORM, false>(tile, T, S, cap, pos.data(), q.data(), C::HQ * C::DK,
                        qn.data(), eps, theta, scale, kc.data(), vc.data(), sinks.data(), out.data(), os, ws.data(), sm(), app);
                else
                    attention_general_tile<C, true, C::QNORM, false>(tile, T, S, cap, pos.data(), q.data(), C::HQ * C::DK,
                        qn.data(), eps, theta, scale, kc.data(), vc.data(), sinks.data(), out.data(), os, ws.data(), sm(), app);
            });
        }
        if (C::NSPLIT > 1)
            for (int tile = 0; tile < T * C::HQ; ++tile)
                emu::run_cta(tile, C::THREADS, [&] {
                    attention_combine_tile<C>(tile, T, ws.data(), sinks.data(), out.data(), os, sm());
                });
        return out;
    }
};
static int failures = 0;
template <class C> void check(const char* name, int T, int S, int cap, unsigned seed) {
    Run<C> r(T, S, cap, seed);
    auto kc = r.kc0, vc = r.vc0;
    r.rope(kc, vc);
    auto og = r.attn(0, kc, vc);
    auto od = r.attn(1, kc, vc);
    auto kc2 = r.kc0, vc2 = r.vc0;
    auto oa = r.attn(2, kc2, vc2);
    auto kc3 = r.kc0, vc3 = r.vc0;
    auto ogA = r.attn(3, kc3, vc3);
    // compare od vs og: |d| <= |w|/128 + rowmax/64 per head row
    double worst = 0, num = 0, den = 0;
    bool nan = false;
    for (int t = 0; t < T; ++t)
        for (int h = 0; h < C::HQ; ++h) {
            float rowmax = 0;
            for (int d = 0; d < C::DV; ++d) rowmax = std::max(rowmax, fabsf(__bfloat162float(og[((size_t)t * C::HQ + h) * C::DV + d])));
            for (int d = 0; d < C::DV; ++d) {
                const size_t i = ((size_t)t * C::HQ + h) * C::DV + d;
                const float w = __bfloat162float(og[i]), x = __bfloat162float(od[i]);
                if (std::isnan(x) || std::isnan(w)) nan = true;
                const double e = fabs(x - w) / (fabs(w) / 128 + rowmax / 64 + 1e-30);
                worst = std::max(worst, e);
                num += (x - w) * (x - w);
                den += (double)w * w;
            }
        }
    const bool ok_out = !nan && worst <= 1.0;
    const bool ok_cache = same(kc2, kc) && same(vc2, vc);
    const bool ok_app = same(oa, od);
    const bool ok_gapp = same(kc3, kc) && same(vc3, vc) && same(ogA, og);
    size_t bitsame = 0;
    for (size_t i = 0; i < og.size(); ++i) bitsame += og[i].raw == od[i].raw;
    printf("%-28s T=%d S=%5d: decode vs general worst %.3f (<=1), relL2 %.2e, %zu/%zu same bits; append cache %s out %s; general append %s\n",
           name, T, S, worst, sqrt(num / std::max(den, 1e-30)), bitsame, og.size(), ok_cache ? "ok" : "DIFF",
           ok_app ? "ok" : "DIFF", ok_gapp ? "ok" : "DIFF");
    if (!(ok_out && ok_cache && ok_app && ok_gapp)) ++failures;
}
int main(int argc, char** argv) {
    // HQ, HKV, DK, DV, ROT, MASK, WINDOW, SINKS, QNORM, TQ, NSPLIT, CH, THREADS
    using Q3 = AttnConfig<bf16, 32, 4, 128, 128, 128, MASK_CAUSAL, 0, false, true, 1, 32, 544, 256>;
    check<Q3>("qwen3 decode 1k", 1, 1000, 4096, 1);
    check<Q3>("qwen3 decode 3000 (2 chunks)", 1, 3000, 4096, 2);
    using Q3b = AttnConfig<bf16, 32, 4, 128, 128, 128, MASK_CAUSAL, 0, false, true, 1, 4, 544, 256>;
    check<Q3b>("qwen3 4 splits, 20 chunks", 1, 2500, 4096, 3);
    check<Q3b>("qwen3 4 splits T=3", 3, 700, 4096, 4);
    using MS = AttnConfig<bf16, 16, 2, 192, 128, 64, MASK_CAUSAL, 128, true, false, 1, 1, 128, 256>;
    check<MS>("mimo swa ring", 1, 1000, 128, 5);
    check<MS>("mimo swa ring early", 1, 50, 128, 6);
    using MF = AttnConfig<bf16, 32, 2, 192, 128, 64, MASK_CAUSAL, 0, false, false, 1, 8, 128, 256>;
    check<MF>("mimo full nbuf1 multi-chunk", 1, 1500, 2048, 7);
    using TB = AttnConfig<bf16, 6, 2, 48, 32, 16, MASK_BLOCK, 0, false, true, 1, 2, 64, 128>;
    check<TB>("tiny block dk48", 4, 90, 512, 8);
    using G32 = AttnConfig<bf16, 32, 1, 64, 64, 64, MASK_CAUSAL, 0, true, false, 1, 1, 96, 128>;
    check<G32>("g32 mt2 sinks 1 split", 2, 60, 256, 9);
    using W = AttnConfig<bf16, 8, 2, 64, 64, 32, MASK_CAUSAL, 40, false, false, 1, 4, 64, 128>;
    check<W>("window 40 full cache", 3, 300, 512, 10);
    printf("%s (%d failures)\n", failures ? "FAILED" : "all ok", failures);
    return failures != 0;
}
