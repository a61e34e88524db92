// One attention step of the attention header's tiles on the host emulation
// (shim.h), for host_attention.rs: the step's inputs from a file, its
// outputs to another, in the order the Rust side writes and reads them.
//
// Input (little-endian): i32 T, S, cap, W (row width of the fused q/k/v
// rows), OS (row stride of the output); f32 eps, theta, scale; i32 pos[T];
// bf16 qkv[T][W] (q, then k, then v columns); bf16 q_norm[DK],
// k_norm[DK], sinks[HQ]; bf16 k_cache[cap][HKV][DK], v_cache[cap][HKV][DV].
// Output: three runs, each bf16 out[T][OS] (poisoned first: 0xff bytes),
// k_cache, v_cache:
//   1. rope_append_tile, then attention_tile (+ combine);
//   2. the same with the RoPE table made by attention_prologue;
//   3. attention_tile appending the new rows itself, on the caches as read.
#pragma once
#include <cstdio>
#include <vector>

template <class T> static void get(FILE* f, T* p, size_t n) {
    if (fread(p, sizeof(T), n, f) != n) {
        fprintf(stderr, "host runner: short input\n");
        exit(2);
    }
}

template <class C, bool KNORM> int run_attention(const char* in_path, const char* out_path) {
    using tf::bf16;
    FILE* f = fopen(in_path, "rb");
    if (!f) return 2;
    int hdr[5];
    get(f, hdr, 5);
    const int T = hdr[0], S = hdr[1], cap = hdr[2], W = hdr[3], OS = hdr[4];
    float fl[3];
    get(f, fl, 3);
    const float eps = fl[0], theta = fl[1], scale = fl[2];
    std::vector<int> pos(T);
    get(f, pos.data(), T);
    std::vector<bf16> qkv((size_t)T * W), qn(C::DK), kn(C::DK), sinks(C::HQ);
    std::vector<bf16> kc0((size_t)cap * C::HKV * C::DK), vc0((size_t)cap * C::HKV * C::DV);
    get(f, qkv.data(), qkv.size());
    get(f, qn.data(), qn.size());
    get(f, kn.data(), kn.size());
    get(f, sinks.data(), sinks.size());
    get(f, kc0.data(), kc0.size());
    get(f, vc0.data(), vc0.size());
    fclose(f);

    const bf16* q = qkv.data();
    const bf16* k = q + C::HQ * C::DK;
    const bf16* v = k + C::HKV * C::DK;
    const bf16* qn_p = C::QNORM ? qn.data() : nullptr;
    const bf16* kn_p = KNORM ? kn.data() : nullptr;
    const bf16* sinks_p = C::SINKS ? sinks.data() : nullptr;
    const int smem_bytes = tf::attn_detail::cmax(
        C::SMEM_BYTES, tf::attn_detail::cmax(tf::rope_append_smem_bytes<bf16, C::HKV, C::DK, C::ROT>(),
                                              C::COMBINE_SMEM_BYTES));
    std::vector<uint4> smem_buf(smem_bytes / 16 + 1);
    char* smem = reinterpret_cast<char*>(smem_buf.data());
    FILE* o = fopen(out_path, "wb");
    if (!o) return 2;
    for (int mode = 0; mode < 3; ++mode) {
        std::vector<bf16> out((size_t)T * OS), kc = kc0, vc = vc0;
        memset(out.data(), 0xff, out.size() * sizeof(bf16));
        std::vector<float> ws(C::ws_floats(T) > 0 ? C::ws_floats(T) : 1);
        memset(ws.data(), 0xff, ws.size() * sizeof(float));
        if (mode < 2)
            for (int t = 0; t < T; ++t)
                emu::run_cta(t, C::THREADS, [&] {
                    tf::rope_append_tile<bf16, C::HKV, C::DK, C::DV, C::ROT, KNORM, C::THREADS>(
                        t, T, S, cap, pos.data(), k, W, v, W, kn_p, eps, theta, kc.data(), vc.data(), smem);
                });
        for (int tile = 0; tile < C::tiles(T); ++tile) {
            if (tile / (C::HKV * C::NSPLIT) * C::TQ >= T) continue;  // past the tokens: no work
            emu::run_cta(tile, C::THREADS, [&] {
                if (mode == 0) {
                    tf::attention_tile<C>(tile, T, S, cap, pos.data(), q, W, qn_p, eps, theta, scale, kc.data(),
                                          vc.data(), sinks_p, out.data(), OS, ws.data(), smem);
                } else if (mode == 1) {
                    tf::attention_prologue<C>(tile, T, pos.data(), theta, smem);
                    tf::attention_tile<C, false, false, true>(tile, T, S, cap, pos.data(), q, W, qn_p, eps, theta,
                                                              scale, kc.data(), vc.data(), sinks_p, out.data(), OS,
                                                              ws.data(), smem);
                } else {
                    const tf::AttnAppend app{k, W, v, W, kn_p, eps, kc.data(), vc.data()};
                    tf::attention_tile<C, true, KNORM, false>(tile, T, S, cap, pos.data(), q, W, qn_p, eps, theta,
                                                              scale, kc.data(), vc.data(), sinks_p, out.data(), OS,
                                                              ws.data(), smem, app);
                }
            });
        }
        if (C::NSPLIT > 1)
            for (int tile = 0; tile < C::combine_tiles(T); ++tile)
                emu::run_cta(tile, C::THREADS, [&] {
                    tf::attention_combine_tile<C>(tile, T, ws.data(), sinks_p, out.data(), OS, smem);
                });
        fwrite(out.data(), sizeof(bf16), out.size(), o);
        fwrite(kc.data(), sizeof(bf16), kc.size(), o);
        fwrite(vc.data(), sizeof(bf16), vc.size(), o);
    }
    fclose(o);
    return 0;
}
