//! The attention layers, step cases and interpreter references that the
//! attention tiles' two checks share: `kernels_attention` runs them on a GPU,
//! `host_attention` on the CPU under the host emulation (`host_emulation`).

#![allow(dead_code)] // each test crate uses its own part

use std::collections::BTreeMap;
use std::fmt::Write as _;

use tilefuse_ir::interp::{self, round_to, Caches, Tensor};
use tilefuse_ir::{shape, Bindings, Builder, DType, Graph, Mask};

// ---------------------------------------------------------------------------
// Layers and schedules.

/// One attention layer and the schedule of its tiles (the template arguments).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Layer {
    pub hq: usize,
    pub hkv: usize,
    pub dk: usize,
    pub dv: usize,
    /// Rotated dims (0 = no RoPE).
    pub rot: usize,
    pub theta: f32,
    pub mask: Mask,
    pub sinks: bool,
    /// Per-head q and k RMSNorm (Qwen3).
    pub qk_norm: bool,
    pub eps: f32,
    /// Cache capacity (slots).
    pub cap: usize,
    pub ring: bool,
    /// Query tokens per tile.
    pub tq: usize,
    /// Key splits.
    pub nsplit: usize,
    /// Keys per sub-chunk.
    pub ch: usize,
    pub threads: usize,
}

pub fn align16(b: usize) -> usize {
    b.div_ceil(16) * 16
}

impl Layer {
    pub fn g(&self) -> usize {
        self.hq / self.hkv
    }

    pub fn window(&self) -> u32 {
        match self.mask {
            Mask::Causal { window } | Mask::Block { window } => window.unwrap_or(0),
        }
    }

    pub fn scale(&self) -> f32 {
        (self.dk as f32).powf(-0.5)
    }

    /// Replica of `AttnConfig::SMEM_BYTES` (checked by a static_assert in every source).
    pub fn smem(&self) -> usize {
        let mr = (self.tq * self.g()).div_ceil(16) * 16;
        let nw = self.threads / 32;
        let kb32 = self.dk.div_ceil(32);
        let nreg = self.dv.div_ceil(64) * 32;
        let q = mr * (kb32 * 32 + 8) * 2;
        let cs = align16(self.tq * (self.rot / 2) * 8);
        let st = mr * 16;
        let o = mr * self.dv * 4;
        let sp = mr * (self.ch + 8) * 6;
        let red = nw * nreg * 32 * 4;
        q + cs + st + o + sp.max(red)
    }

    /// Replica of `rope_append_smem_bytes`.
    pub fn rope_smem(&self) -> usize {
        align16(self.rot / 2 * 8) + self.hkv * self.dk * 2
    }

    pub fn combine_smem(&self) -> usize {
        self.nsplit * 4
    }

    pub fn tiles(&self, t: usize) -> usize {
        t.div_ceil(self.tq) * self.hkv * self.nsplit
    }

    pub fn ws_floats(&self, t: usize) -> usize {
        if self.nsplit > 1 {
            t * self.hq * self.nsplit * (self.dv + 2)
        } else {
            0
        }
    }

    /// The `tf::AttnConfig<...>` type.
    pub fn config(&self) -> String {
        let mask = match self.mask {
            Mask::Causal { .. } => "tf::MASK_CAUSAL",
            Mask::Block { .. } => "tf::MASK_BLOCK",
        };
        format!(
            "tf::AttnConfig<tf::bf16, {}, {}, {}, {}, {}, {mask}, {}, {}, {}, {}, {}, {}, {}>",
            self.hq,
            self.hkv,
            self.dk,
            self.dv,
            self.rot,
            self.window(),
            self.sinks,
            self.qk_norm,
            self.tq,
            self.nsplit,
            self.ch,
            self.threads
        )
    }
}

/// MiMo-V2 tiny full layer (head dims 24/16, 8 rotated dims) over a 512-slot cache.
pub fn mimo_tiny_full() -> Layer {
    Layer {
        hq: 4,
        hkv: 1,
        dk: 24,
        dv: 16,
        rot: 8,
        theta: 5_000_000.0,
        mask: Mask::Causal { window: None },
        sinks: false,
        qk_norm: false,
        eps: 1e-5,
        cap: 512,
        ring: false,
        tq: 1,
        nsplit: 1,
        ch: 64,
        threads: 128,
    }
}

/// MiMo-V2 tiny sliding layer: window 8, sinks, twice the KV heads, a ring of
/// window + 16 - 1 slots.
pub fn mimo_tiny_sliding() -> Layer {
    Layer {
        hkv: 2,
        theta: 10_000.0,
        mask: Mask::Causal { window: Some(8) },
        sinks: true,
        cap: 8 + 16 - 1,
        ring: true,
        ..mimo_tiny_full()
    }
}

/// Qwen3-MoE tiny: head dim 16, full RoPE, q/k norms.
pub fn qwen_tiny() -> Layer {
    Layer {
        hq: 4,
        hkv: 2,
        dk: 16,
        dv: 16,
        rot: 16,
        theta: 1_000_000.0,
        mask: Mask::Causal { window: None },
        sinks: false,
        qk_norm: true,
        eps: 1e-6,
        cap: 512,
        ring: false,
        tq: 1,
        nsplit: 1,
        ch: 64,
        threads: 128,
    }
}

/// MiMo-V2 full-width full layer (64 q heads, 4 kv heads, 192/128, 64 rotated
/// dims), decode schedule: 32 key splits, each one sub-chunk of at most 544
/// keys (>= ceil(cap / 32) rounded up to 16, so probabilities round exactly
/// within a split).
pub fn mimo_full() -> Layer {
    Layer {
        hq: 64,
        hkv: 4,
        dk: 192,
        dv: 128,
        rot: 64,
        theta: 5_000_000.0,
        mask: Mask::Causal { window: None },
        sinks: false,
        qk_norm: false,
        eps: 1e-5,
        cap: 16384 + 64,
        ring: false,
        tq: 1,
        nsplit: 32,
        ch: 544,
        threads: 256,
    }
}

/// MiMo-V2 full-width sliding layer: 8 kv heads, window 128, sinks, one split.
pub fn mimo_sliding() -> Layer {
    Layer {
        hkv: 8,
        theta: 10_000.0,
        mask: Mask::Causal { window: Some(128) },
        sinks: true,
        cap: 128 + 64 - 1,
        ring: true,
        nsplit: 1,
        ch: 128,
        ..mimo_full()
    }
}

/// Qwen3-30B-A3B: 32 q heads, 4 kv heads, head dim 128, q/k norms.
pub fn qwen_30b() -> Layer {
    Layer {
        hq: 32,
        hkv: 4,
        dk: 128,
        dv: 128,
        rot: 128,
        theta: 1_000_000.0,
        mask: Mask::Causal { window: None },
        sinks: false,
        qk_norm: true,
        eps: 1e-6,
        cap: 4096,
        ring: false,
        tq: 1,
        nsplit: 32,
        ch: 512,
        threads: 256,
    }
}

/// The cases of `gpu_attention_gqa16_and_split_keys`: (layer, cached keys,
/// query tokens).
pub fn gqa16_cases() -> Vec<(Layer, usize, usize)> {
    let base = Layer {
        hq: 32,
        hkv: 2,
        cap: 5000,
        nsplit: 1,
        ch: 512,
        ..mimo_full()
    };
    let split = Layer { nsplit: 8, ..base };
    let sub = Layer {
        nsplit: 4,
        ch: 128,
        ..base
    };
    let tq4 = Layer {
        tq: 4,
        nsplit: 8,
        ch: 128,
        ..base
    };
    vec![
        (base, 300, 1),
        (base, 300, 4),
        (split, 0, 1),
        (split, 4000, 1),
        (split, 4000, 4),
        (sub, 3000, 1),
        (tq4, 3000, 5),
        (
            Layer {
                nsplit: 40,
                ch: 128,
                ..base
            },
            4000,
            2,
        ),
        (
            Layer {
                nsplit: 4,
                ..mimo_tiny_full()
            },
            450,
            16,
        ),
    ]
}

// ---------------------------------------------------------------------------
// Helpers for the GPU tests: random data, bf16 bytes, comparisons.

/// SplitMix64: a small seeded generator (the runtime crate has no `rand`).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * ((self.next() >> 11) as f64 / (1u64 << 53) as f64)
    }
    /// `n` bf16 values of magnitude in [0.05, 1) * amp, random sign: never zero.
    pub fn vals(&mut self, n: usize, amp: f64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let m = self.range(0.05, 1.0) * amp;
                let s = if self.next() & 1 == 1 { -m } else { m };
                round_to(DType::BF16, s as f32)
            })
            .collect()
    }
    pub fn pos(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f32> {
        (0..n)
            .map(|_| round_to(DType::BF16, self.range(lo, hi) as f32))
            .collect()
    }
}

pub fn bf16_bits(x: f32) -> u16 {
    if x.is_nan() {
        0x7fc0
    } else {
        half::bf16::from_f32(x).to_bits()
    }
}

pub fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|&x| bf16_bits(x).to_le_bytes()).collect()
}

pub fn bf16_from_bytes(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(2)
        .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
        .collect()
}

pub fn tf(shape: &[usize], v: Vec<f32>) -> Tensor {
    Tensor::f32(DType::BF16, shape, v).unwrap()
}

pub fn f32s(t: &Tensor) -> Vec<f32> {
    t.to_f32()
}

/// Relative L2 error (NaN anywhere: infinite).
pub fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    if got.iter().chain(want).any(|x| x.is_nan()) || got.len() != want.len() {
        return f64::INFINITY;
    }
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2))
        .sum();
    let den: f64 = want
        .iter()
        .map(|b| f64::from(*b).powi(2))
        .sum::<f64>()
        .max(1e-30);
    (num / den).sqrt()
}

/// Compares attention rows (`row` values each): rel L2 <= 1e-2 and every element
/// within |w|/128 + rowmax/64. Returns (rel L2, max error in units of rowmax/256).
#[track_caller]
pub fn check_rows(got: &[f32], want: &[f32], row: usize, what: &str) -> (f64, f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let mut worst = 0f64;
    for (r, (g, w)) in got.chunks(row).zip(want.chunks(row)).enumerate() {
        let rowmax = w.iter().fold(0f32, |m, x| m.max(x.abs()));
        for (i, (&a, &b)) in g.iter().zip(w).enumerate() {
            assert!(
                a.is_finite(),
                "{what}: row {r} [{i}] not written or not finite: {a} (want {b})"
            );
            let d = (a - b).abs();
            let tol = b.abs() / 128.0 + rowmax / 64.0;
            assert!(
                d <= tol,
                "{what}: row {r} [{i}]: got {a}, want {b} (|diff| {d} > {tol})"
            );
            worst = worst.max(f64::from(d) / (f64::from(rowmax.max(1e-6)) / 256.0));
        }
    }
    let e = rel_l2(got, want);
    assert!(e <= 1e-2, "{what}: rel L2 {e}");
    (e, worst)
}

/// Bitwise equality of bf16 values (NaN equal to NaN).
#[track_caller]
pub fn same_bits(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let bad: Vec<usize> = (0..got.len())
        .filter(|&i| {
            !(got[i].to_bits() == want[i].to_bits() || (got[i].is_nan() && want[i].is_nan()))
        })
        .collect();
    assert!(
        bad.is_empty(),
        "{what}: {} of {} values differ, first at {}: got {} want {}",
        bad.len(),
        got.len(),
        bad[0],
        got[bad[0]],
        want[bad[0]]
    );
}

pub fn bind(t: usize, s: usize) -> Bindings {
    Bindings::new().with("T", t).with("S", s)
}

// ---------------------------------------------------------------------------
// Reference graphs.

/// `x -> [per-head rms_norm] -> rope`, as the models build q and k.
pub fn prep(
    b: &mut Builder,
    l: &Layer,
    x: tilefuse_ir::NodeId,
    norm: Option<tilefuse_ir::NodeId>,
    pos: tilefuse_ir::NodeId,
) -> tilefuse_ir::NodeId {
    let x = match norm {
        Some(w) => b.rms_norm(x, w, l.eps).unwrap(),
        None => x,
    };
    if l.rot > 0 {
        b.rope(x, pos, l.theta, l.rot).unwrap()
    } else {
        x
    }
}

/// One attention step: q/k/v of T tokens at positions S.. -> rope (+ norms) ->
/// append to both caches -> attention; output `o` [T, HQ, DV]. With
/// `append_only`, the attention is left out (used to prefill the caches).
pub fn step_graph(l: &Layer, append_only: bool) -> Graph {
    let mut b = Builder::new(
        if append_only { "append" } else { "attn_step" },
        &["T", "S"],
    );
    let (hq, hkv, dk, dv, cap) = (l.hq, l.hkv, l.dk, l.dv, l.cap);
    let kc = b
        .cache("k_cache", DType::BF16, shape![(cap), (hkv), (dk)])
        .unwrap();
    let vc = b
        .cache("v_cache", DType::BF16, shape![(cap), (hkv), (dv)])
        .unwrap();
    let k = b.input("k", DType::BF16, shape![T, (hkv), (dk)]).unwrap();
    let v = b.input("v", DType::BF16, shape![T, (hkv), (dv)]).unwrap();
    let pos = b.input("pos", DType::I32, shape![T]).unwrap();
    let kn = l
        .qk_norm
        .then(|| b.weight("k_norm", DType::BF16, shape![(dk)]).unwrap());
    let k = prep(&mut b, l, k, kn, pos);
    let keys = b.kv_append(kc, k, "S", l.ring).unwrap();
    let values = b.kv_append(vc, v, "S", l.ring).unwrap();
    if append_only {
        b.output("keys", keys).unwrap();
        b.output("values", values).unwrap();
    } else {
        let q = b.input("q", DType::BF16, shape![T, (hq), (dk)]).unwrap();
        let qn = l
            .qk_norm
            .then(|| b.weight("q_norm", DType::BF16, shape![(dk)]).unwrap());
        let q = prep(&mut b, l, q, qn, pos);
        let sinks = l
            .sinks
            .then(|| b.weight("sinks", DType::BF16, shape![(hq)]).unwrap());
        let o = b
            .attention(q, keys, values, sinks, l.mask, l.scale())
            .unwrap();
        b.output("o", o).unwrap();
    }
    b.finish().unwrap()
}

/// The data of one test step.
pub struct Step {
    /// Cache contents before the step (NaN where never written).
    pub kc0: Vec<f32>,
    pub vc0: Vec<f32>,
    /// After the step, per the interpreter.
    pub kc1: Vec<f32>,
    pub vc1: Vec<f32>,
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub qn: Vec<f32>,
    pub kn: Vec<f32>,
    pub sinks: Vec<f32>,
    /// The interpreter's attention output [T, HQ, DV].
    pub o: Vec<f32>,
}

/// Prefills the interpreter's caches with `s` earlier positions (one append
/// step), then runs the attention step of `t` tokens at `s`.
pub fn reference(l: &Layer, s: usize, t: usize, seed: u64) -> Step {
    let mut r = Rng(seed);
    let g = step_graph(l, false);
    let mut caches = Caches::for_graph(&g, &bind(t, s)).unwrap();
    let kn = r.pos(l.dk, 0.5, 1.5);
    let qn = r.pos(l.dk, 0.5, 1.5);
    let sinks = r.pos(l.hq, -1.0, 3.0);
    let mut weights: BTreeMap<String, Tensor> = BTreeMap::new();
    if l.qk_norm {
        weights.insert("k_norm".into(), tf(&[l.dk], kn.clone()));
        weights.insert("q_norm".into(), tf(&[l.dk], qn.clone()));
    }
    if l.sinks {
        weights.insert("sinks".into(), tf(&[l.hq], sinks.clone()));
    }
    if s > 0 {
        let ga = step_graph(l, true);
        let mut vals = weights.clone();
        vals.insert(
            "k".into(),
            tf(&[s, l.hkv, l.dk], r.vals(s * l.hkv * l.dk, 1.0)),
        );
        vals.insert(
            "v".into(),
            tf(&[s, l.hkv, l.dv], r.vals(s * l.hkv * l.dv, 1.0)),
        );
        vals.insert(
            "pos".into(),
            Tensor::i32(&[s], (0..s as i32).collect()).unwrap(),
        );
        interp::run(&ga, &bind(s, 0), &vals, &mut caches).unwrap_or_else(|e| panic!("{e}"));
    }
    let kc0 = f32s(caches.get("k_cache").unwrap());
    let vc0 = f32s(caches.get("v_cache").unwrap());
    // q amplitude 3: scores of O(1), so the softmax is not flat.
    let q = r.vals(t * l.hq * l.dk, 3.0);
    let k = r.vals(t * l.hkv * l.dk, 1.0);
    let v = r.vals(t * l.hkv * l.dv, 1.0);
    let mut vals = weights;
    vals.insert("q".into(), tf(&[t, l.hq, l.dk], q.clone()));
    vals.insert("k".into(), tf(&[t, l.hkv, l.dk], k.clone()));
    vals.insert("v".into(), tf(&[t, l.hkv, l.dv], v.clone()));
    vals.insert(
        "pos".into(),
        Tensor::i32(&[t], (s as i32..(s + t) as i32).collect()).unwrap(),
    );
    let out = interp::run(&g, &bind(t, s), &vals, &mut caches).unwrap_or_else(|e| panic!("{e}"));
    Step {
        kc0,
        vc0,
        kc1: f32s(caches.get("k_cache").unwrap()),
        vc1: f32s(caches.get("v_cache").unwrap()),
        q,
        k,
        v,
        qn,
        kn,
        sinks,
        o: f32s(&out["o"]),
    }
}

// ---------------------------------------------------------------------------
// The cases of the correctness tests: (layer, cached keys S, query tokens T).

/// S = 0, 5, 300 and T = 1, 4, 16 over a full cache (MiMo tiny, DK 24 != DV
/// 16, GQA 4); one query per tile with 64-key sub-chunks (S = 300 merges
/// several), and 4 queries per tile with one 512-key sub-chunk (exact rounding).
pub fn causal_cases() -> Vec<(Layer, usize, usize)> {
    let mut cases = Vec::new();
    for &s in &[0, 5, 300] {
        for &t in &[1, 4, 16] {
            cases.push((mimo_tiny_full(), s, t));
            cases.push((
                Layer {
                    tq: 4,
                    ch: 512,
                    ..mimo_tiny_full()
                },
                s,
                t,
            ));
        }
    }
    cases
}

/// Window 8 over a ring of 23 slots: S beyond the capacity wraps; sinks on;
/// GQA ratio 2; also with 2 queries per tile and 2 key splits (combine with
/// sinks).
pub fn sliding_cases() -> Vec<(Layer, usize, usize)> {
    let l = mimo_tiny_sliding();
    let split = Layer {
        tq: 2,
        nsplit: 2,
        ch: 32,
        threads: 64,
        ..l
    };
    let mut cases = Vec::new();
    for &(s, t) in &[(0, 1), (3, 4), (30, 1), (30, 4), (100, 16), (1000, 16)] {
        cases.push((l, s, t));
        cases.push((split, s, t));
    }
    cases
}

/// A draft block of T = 8 queries after S context keys: bidirectional inside
/// the block; without a window on a full cache (Qwen3 tiny, q/k norms), and
/// with window 8 on a ring with sinks (MiMo tiny sliding), S wrapping the ring.
pub fn block_cases() -> Vec<(Layer, usize, usize)> {
    let plain = Layer {
        mask: Mask::Block { window: None },
        tq: 2,
        ..qwen_tiny()
    };
    let windowed = Layer {
        mask: Mask::Block { window: Some(8) },
        ..mimo_tiny_sliding()
    };
    vec![
        (plain, 0, 8),
        (plain, 20, 8),
        (plain, 300, 8),
        (windowed, 3, 8),
        (windowed, 37, 8),
        (windowed, 200, 8),
    ]
}

/// Qwen3 tiny (GQA 2, head dim 16, full RoPE) and Qwen3 full head dims (GQA
/// 8, 128).
pub fn qk_norm_cases() -> Vec<(Layer, usize, usize)> {
    let wide = Layer {
        hq: 16,
        hkv: 2,
        cap: 1024,
        tq: 2,
        nsplit: 1,
        ch: 256,
        ..qwen_30b()
    };
    vec![
        (qwen_tiny(), 0, 1),
        (qwen_tiny(), 5, 4),
        (qwen_tiny(), 300, 16),
        (wide, 0, 3),
        (wide, 200, 1),
        (wide, 200, 16),
    ]
}

/// The production shapes at decode: Qwen3-30B-A3B (32 key splits of a
/// 4096-slot cache, q/k norms) and MiMo-V2-Flash's full layer (GQA 16,
/// 192/128) at a 1000-key context, and MiMo's sliding layer (window 128,
/// sinks, a ring) past its wrap.
pub fn full_width_cases() -> Vec<(Layer, usize, usize)> {
    vec![
        (qwen_30b(), 1000, 1),
        (
            Layer {
                cap: 2048,
                ..mimo_full()
            },
            1000,
            1,
        ),
        (mimo_sliding(), 1000, 1),
    ]
}

/// A step's q, k and v as column slices of one fused projection output
/// `[T, W]` (as the models' q/k/v step writes them), and `W`.
pub fn fused_qkv(l: &Layer, st: &Step, t: usize) -> (Vec<f32>, usize) {
    let (hq, hkv, dk, dv) = (l.hq, l.hkv, l.dk, l.dv);
    let w = hq * dk + hkv * dk + hkv * dv;
    let mut fused = vec![0f32; t * w];
    for i in 0..t {
        fused[i * w..i * w + hq * dk].copy_from_slice(&st.q[i * hq * dk..(i + 1) * hq * dk]);
        fused[i * w + hq * dk..i * w + (hq + hkv) * dk]
            .copy_from_slice(&st.k[i * hkv * dk..(i + 1) * hkv * dk]);
        fused[i * w + (hq + hkv) * dk..(i + 1) * w]
            .copy_from_slice(&st.v[i * hkv * dv..(i + 1) * hkv * dv]);
    }
    (fused, w)
}

/// The row RMSNorm and embedding kernels of the rows case: `rms` (hidden
/// 4096, 256 threads) and `emb` (hidden 64, 128 threads).
pub const ROWS_SRC: &str = "#include \"attention.cuh\"\n\
    extern \"C\" __global__ void __launch_bounds__(256, 1) rms(int R, const tf::bf16* x, int xs, const tf::bf16* w, float eps, tf::bf16* y, int ys) {\n\
    \x20 extern __shared__ __align__(16) char smem[];\n\
    \x20 tf::rms_norm_rows_tile<tf::bf16, tf::bf16, 4096, 256>(blockIdx.x, R, x, xs, w, eps, y, ys, smem);\n}\n\
    extern \"C\" __global__ void __launch_bounds__(128, 1) emb(int n, const int* ids, const tf::bf16* t, int vocab, tf::bf16* y, int ys, int* err) {\n\
    \x20 extern __shared__ __align__(16) char smem[];\n\
    \x20 tf::embedding_tile<tf::bf16, 64, 128>(blockIdx.x, n, ids, t, vocab, y, ys, err, smem);\n}\n";

/// Row RMSNorm of R strided rows and an embedding gather with out-of-range
/// ids, with the interpreter's RMSNorm.
pub struct RowsCase {
    pub r: usize,
    pub d: usize,
    /// Row stride of x and y (elements): padding that must stay poisoned.
    pub xs: usize,
    pub x: Vec<f32>,
    pub w: Vec<f32>,
    pub want: Vec<f32>,
    pub vocab: usize,
    pub h: usize,
    pub table: Vec<f32>,
    pub ids: Vec<i32>,
}

pub fn rows_case() -> RowsCase {
    let (r, d, xs) = (5usize, 4096usize, 4096 + 64);
    let mut rng = Rng(7);
    let x = rng.vals(r * d, 4.0);
    let w = rng.pos(d, 0.5, 1.5);
    let mut b = Builder::new("rms", &["R"]);
    let xi = b.input("x", DType::BF16, shape![R, (d)]).unwrap();
    let wi = b.weight("w", DType::BF16, shape![(d)]).unwrap();
    let y = b.rms_norm(xi, wi, 1e-5).unwrap();
    b.output("y", y).unwrap();
    let g = b.finish().unwrap();
    let vals: BTreeMap<String, Tensor> = [
        ("x".to_string(), tf(&[r, d], x.clone())),
        ("w".to_string(), tf(&[d], w.clone())),
    ]
    .into_iter()
    .collect();
    let bn = Bindings::new().with("R", r);
    let want =
        f32s(&interp::run(&g, &bn, &vals, &mut Caches::for_graph(&g, &bn).unwrap()).unwrap()["y"]);
    // Embedding: rows of the table (ids valid) or NaN.
    let (vocab, h) = (300usize, 64usize);
    let table = rng.vals(vocab * h, 1.0);
    let ids: Vec<i32> = vec![3, 0, 299, -1, 300, 17, 299, i32::MAX];
    RowsCase {
        r,
        d,
        xs,
        x,
        w,
        want,
        vocab,
        h,
        table,
        ids,
    }
}

impl RowsCase {
    /// x with rows `xs` apart.
    pub fn x_padded(&self) -> Vec<f32> {
        let mut xpad = vec![0f32; self.r * self.xs];
        for i in 0..self.r {
            xpad[i * self.xs..i * self.xs + self.d]
                .copy_from_slice(&self.x[i * self.d..(i + 1) * self.d]);
        }
        xpad
    }

    pub fn ids_bytes(&self) -> Vec<u8> {
        self.ids.iter().flat_map(|i| i.to_le_bytes()).collect()
    }

    /// The RMSNorm output bytes (poisoned first): every row bit for bit, its
    /// padding untouched.
    #[track_caller]
    pub fn check_rms(&self, raw: &[u8]) {
        let (d, xs) = (self.d, self.xs);
        let mut got = Vec::new();
        for i in 0..self.r {
            got.extend(bf16_from_bytes(&raw[i * xs * 2..(i * xs + d) * 2]));
            assert!(
                raw[(i * xs + d) * 2..(i + 1) * xs * 2]
                    .iter()
                    .all(|&b| b == 0xff),
                "rms: write past row {i}"
            );
        }
        same_bits(&got, &self.want, "rms_norm_rows");
    }

    /// The gathered rows' bytes and the error flag's: valid ids copy their
    /// row, out-of-range ids give NaN rows and set the flag.
    #[track_caller]
    pub fn check_embedding(&self, out: &[u8], err: &[u8]) {
        let h = self.h;
        let got = bf16_from_bytes(out);
        for (i, &id) in self.ids.iter().enumerate() {
            let row = &got[i * h..(i + 1) * h];
            if (0..self.vocab as i32).contains(&id) {
                same_bits(
                    row,
                    &self.table[id as usize * h..(id as usize + 1) * h],
                    &format!("embedding id {id}"),
                );
            } else {
                assert!(
                    row.iter().all(|x| x.is_nan()),
                    "embedding: out-of-range id {id} must give a NaN row"
                );
            }
        }
        let err = i32::from_le_bytes(err[..4].try_into().unwrap());
        assert_eq!(
            err, 1,
            "embedding: the error flag must be set by out-of-range ids"
        );
    }
}

impl Layer {
    /// `extern "C"` wrappers `{p}_rope`, `{p}_attn`, `{p}_attn_pre` (after
    /// the prologue), `{p}_attn_app` (appending the new rows itself) and
    /// `{p}_comb`: one tile per CTA.
    pub fn wrappers(&self, p: &str) -> String {
        let th = self.threads;
        let (hkv, dk, dv, rot) = (self.hkv, self.dk, self.dv, self.rot);
        let mut s = String::new();
        writeln!(s, "using {p}_cfg = {};", self.config()).unwrap();
        writeln!(
            s,
            "static_assert({p}_cfg::SMEM_BYTES == {}, \"Rust smem replica\");",
            self.smem()
        )
        .unwrap();
        writeln!(
            s,
            "static_assert(tf::rope_append_smem_bytes<tf::bf16, {hkv}, {dk}, {rot}>() == {}, \"Rust rope smem replica\");",
            self.rope_smem()
        )
        .unwrap();
        writeln!(
            s,
            "static_assert({p}_cfg::COMBINE_SMEM_BYTES == {}, \"Rust combine smem replica\");",
            self.combine_smem()
        )
        .unwrap();
        writeln!(
            s,
            "extern \"C\" __global__ void __launch_bounds__({th}, 1) {p}_rope(int T, int S, int cap, const int* pos, const tf::bf16* k, int ks, \
             const tf::bf16* v, int vs, const tf::bf16* kn, float eps, float theta, tf::bf16* kc, tf::bf16* vc) {{\n\
             \x20 extern __shared__ __align__(16) char smem[];\n\
             \x20 tf::rope_append_tile<tf::bf16, {hkv}, {dk}, {dv}, {rot}, {}, {th}>(blockIdx.x, T, S, cap, pos, k, ks, v, vs, kn, eps, theta, kc, vc, smem);\n}}",
            self.qk_norm
        )
        .unwrap();
        writeln!(
            s,
            "extern \"C\" __global__ void __launch_bounds__({th}, 1) {p}_attn(int T, int S, int cap, const int* pos, const tf::bf16* q, int qs, \
             const tf::bf16* qn, float eps, float theta, float scale, const tf::bf16* kc, const tf::bf16* vc, \
             const tf::bf16* sinks, tf::bf16* out, int os, float* ws) {{\n\
             \x20 extern __shared__ __align__(16) char smem[];\n\
             \x20 tf::attention_tile<{p}_cfg>(blockIdx.x, T, S, cap, pos, q, qs, qn, eps, theta, scale, kc, vc, sinks, out, os, ws, smem);\n}}"
        )
        .unwrap();
        // The same tile after the prologue that generated wrappers run
        // before their wait (the RoPE table made there, not in the tile).
        writeln!(
            s,
            "extern \"C\" __global__ void __launch_bounds__({th}, 1) {p}_attn_pre(int T, int S, int cap, const int* pos, const tf::bf16* q, int qs, \
             const tf::bf16* qn, float eps, float theta, float scale, const tf::bf16* kc, const tf::bf16* vc, \
             const tf::bf16* sinks, tf::bf16* out, int os, float* ws) {{\n\
             \x20 extern __shared__ __align__(16) char smem[];\n\
             \x20 tf::attention_prologue<{p}_cfg>(blockIdx.x, T, pos, theta, smem);\n\
             \x20 tf::attention_tile<{p}_cfg, false, false, true>(blockIdx.x, T, S, cap, pos, q, qs, qn, eps, theta, scale, kc, vc, sinks, out, os, ws, smem);\n}}"
        )
        .unwrap();
        // The tile that appends the new rows itself (the rope kernel not run).
        writeln!(
            s,
            "extern \"C\" __global__ void __launch_bounds__({th}, 1) {p}_attn_app(int T, int S, int cap, const int* pos, const tf::bf16* q, int qs, \
             const tf::bf16* qn, float eps, float theta, float scale, tf::bf16* kc, tf::bf16* vc, \
             const tf::bf16* sinks, tf::bf16* out, int os, float* ws, const tf::bf16* k, int ks, const tf::bf16* v, int vs, \
             const tf::bf16* kn) {{\n\
             \x20 extern __shared__ __align__(16) char smem[];\n\
             \x20 tf::attention_tile<{p}_cfg, true, {}, false>(blockIdx.x, T, S, cap, pos, q, qs, qn, eps, theta, scale, kc, vc, sinks, out, os, ws, smem, \
             tf::AttnAppend{{k, ks, v, vs, kn, eps, kc, vc}});\n}}",
            self.qk_norm
        )
        .unwrap();
        writeln!(
            s,
            "extern \"C\" __global__ void __launch_bounds__({th}, 1) {p}_comb(int T, const float* ws, const tf::bf16* sinks, \
             tf::bf16* out, int os) {{\n\
             \x20 extern __shared__ __align__(16) char smem[];\n\
             \x20 tf::attention_combine_tile<{p}_cfg>(blockIdx.x, T, ws, sinks, out, os, smem);\n}}"
        )
        .unwrap();
        s
    }
}
