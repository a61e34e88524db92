//! The weight-streaming tiles' cases, data formats and interpreter
//! references that their two checks share: `kernels_weights` runs them on a
//! GPU, `host_weights` on the CPU under the host emulation
//! (`host_emulation`).

#![allow(dead_code)] // each test crate uses its own part

use std::collections::BTreeMap;

use tilefuse_ir::interp::{self, Caches, Data, Tensor};
use tilefuse_ir::{shape, Bindings, Builder, DType, Graph, RouterConfig, ScoreFn};
use tilefuse_runtime::nvrtc::Compiled;

/// Shared helpers: random data, weight formats, smem replicas, checks.
pub mod kit {
    use super::*;
    use tilefuse_ir::fp4::{self, Fp4Format};

    /// SplitMix64: a small seeded generator (the runtime crate has no `rand`).
    pub struct Rng(u64);

    impl Rng {
        pub fn new(seed: u64) -> Rng {
            Rng(seed)
        }
        pub fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        /// Uniform in [lo, hi).
        pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
            lo + (hi - lo) * ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64)
        }
        /// Uniform in 0..n.
        pub fn below(&mut self, n: usize) -> usize {
            (self.next_u64() % n as u64) as usize
        }
        pub fn coin(&mut self) -> bool {
            self.next_u64() & 1 == 1
        }
    }

    /// `n` values, never zero: magnitude in [0.05, 1) times `scale`, random
    /// sign, rounded to `dt`.
    pub fn rand_vals(r: &mut Rng, n: usize, dt: DType, scale: f64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let m = r.uniform(0.05, 1.0) * scale;
                let v = if r.coin() { -m } else { m };
                interp::round_to(dt, v as f32)
            })
            .collect()
    }

    /// bf16 bits of a value that is exactly representable in bf16.
    pub fn bf16_bits(x: f32) -> u16 {
        assert!(
            x.is_nan() || interp::round_to(DType::BF16, x) == x,
            "{x} is not a bf16 value"
        );
        (x.to_bits() >> 16) as u16
    }

    /// Device bytes of float values in `dt` (bf16 or f32).
    pub fn act_bytes(v: &[f32], dt: DType) -> Vec<u8> {
        match dt {
            DType::BF16 => v.iter().flat_map(|&x| bf16_bits(x).to_le_bytes()).collect(),
            DType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            _ => panic!("activations are bf16 or f32, not {dt}"),
        }
    }

    pub fn i32_bytes(v: &[i32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// Floats back from device bytes of `dt` (bf16 or f32).
    pub fn floats(b: &[u8], dt: DType) -> Vec<f32> {
        match dt {
            DType::BF16 => b
                .chunks_exact(2)
                .map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16))
                .collect(),
            DType::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            _ => panic!("floats: {dt}"),
        }
    }

    pub fn ints(b: &[u8]) -> Vec<i32> {
        b.chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    pub fn f32s(t: &Tensor) -> Vec<f32> {
        match &t.data {
            Data::F32(v) => v.clone(),
            _ => panic!("not f32 storage"),
        }
    }

    /// The C++ name of an activation dtype.
    pub fn cpp(dt: DType) -> &'static str {
        match dt {
            DType::BF16 => "tf::bf16",
            DType::F32 => "float",
            _ => panic!("cpp: {dt}"),
        }
    }

    pub fn size_of(dt: DType) -> usize {
        match dt {
            DType::BF16 => 2,
            DType::F32 => 4,
            _ => panic!("size_of: {dt}"),
        }
    }

    /// A weight format of the headers.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Fmt {
        Bf16,
        F32,
        E4m3,
        Mx,
        Nv,
    }

    impl Fmt {
        pub const ALL: [Fmt; 5] = [Fmt::Bf16, Fmt::F32, Fmt::E4m3, Fmt::Mx, Fmt::Nv];

        pub fn dtype(self) -> DType {
            match self {
                Fmt::Bf16 => DType::BF16,
                Fmt::F32 => DType::F32,
                Fmt::E4m3 => DType::F8E4M3,
                Fmt::Mx => DType::MXFP4,
                Fmt::Nv => DType::NVFP4,
            }
        }
        pub fn name(self) -> &'static str {
            match self {
                Fmt::Bf16 => "bf16",
                Fmt::F32 => "f32",
                Fmt::E4m3 => "e4m3",
                Fmt::Mx => "mx",
                Fmt::Nv => "nv",
            }
        }
        /// The header's struct.
        pub fn cpp(self) -> &'static str {
            match self {
                Fmt::Bf16 => "tf::WBf16",
                Fmt::F32 => "tf::WF32",
                Fmt::E4m3 => "tf::WE4M3",
                Fmt::Mx => "tf::WMx",
                Fmt::Nv => "tf::WNv",
            }
        }
        /// Kernel parameters holding the weights, named `{p}0`, `{p}1`, `{p}2`.
        pub fn params(self, p: &str) -> String {
            match self {
                Fmt::Bf16 => format!("const tf::bf16* {p}0"),
                Fmt::F32 => format!("const float* {p}0"),
                Fmt::E4m3 => format!("const uint8_t* {p}0"),
                Fmt::Mx => format!("const uint8_t* {p}0, const uint8_t* {p}1"),
                Fmt::Nv => format!("const uint8_t* {p}0, const uint8_t* {p}1, float {p}2"),
            }
        }
        /// The struct built from those parameters.
        pub fn ctor(self, p: &str) -> String {
            match self {
                Fmt::Bf16 | Fmt::F32 | Fmt::E4m3 => format!("{}{{{p}0}}", self.cpp()),
                Fmt::Mx => format!("{}{{{p}0, {p}1}}", self.cpp()),
                Fmt::Nv => format!("{}{{{p}0, {p}1, {p}2}}", self.cpp()),
            }
        }
        /// Elements per 16-byte vector (the header's EPV).
        pub fn epv(self) -> usize {
            match self {
                Fmt::Bf16 => 8,
                Fmt::F32 => 4,
                Fmt::E4m3 => 16,
                Fmt::Mx | Fmt::Nv => 32,
            }
        }
        /// Exactly representable in bf16 (the tensor-core path is allowed).
        pub fn mma_exact(self) -> bool {
            self != Fmt::F32
        }
        /// Bytes of a [rows, k] matrix on the device.
        pub fn bytes(self, rows: usize, k: usize) -> usize {
            rows * match self {
                Fmt::Bf16 => 2 * k,
                Fmt::F32 => 4 * k,
                Fmt::E4m3 => k,
                Fmt::Mx => k / 2 + k / 32,
                Fmt::Nv => k / 2 + k / 16,
            }
        }
    }

    /// A weight tensor: the interpreter's value and the device arrays.
    pub struct Weights {
        pub tensor: Tensor,
        pub arrays: Vec<Vec<u8>>,
        pub tensor_scale: f32,
    }

    impl Weights {
        /// Random weights of `shape` (row-major, last axis k) in `fmt`.
        pub fn random(r: &mut Rng, fmt: Fmt, shape: &[usize]) -> Weights {
            let n: usize = shape.iter().product();
            let k = *shape.last().unwrap();
            match fmt {
                Fmt::Bf16 | Fmt::F32 => {
                    let v = rand_vals(r, n, fmt.dtype(), 1.0);
                    let b = act_bytes(&v, fmt.dtype());
                    Weights {
                        tensor: Tensor::f32(fmt.dtype(), shape, v).unwrap(),
                        arrays: vec![b],
                        tensor_scale: 1.0,
                    }
                }
                Fmt::E4m3 => {
                    // Exponent fields 3..=8: magnitudes 2^-4 .. 2^2, never zero or NaN.
                    let bytes: Vec<u8> = (0..n)
                        .map(|_| {
                            let s = if r.coin() { 0x80u8 } else { 0 };
                            s | ((3 + r.below(6) as u8) << 3) | r.below(8) as u8
                        })
                        .collect();
                    let v: Vec<f32> = bytes.iter().map(|&b| fp4::e4m3_decode(b)).collect();
                    Weights {
                        tensor: Tensor::f32(DType::F8E4M3, shape, v).unwrap(),
                        arrays: vec![bytes],
                        tensor_scale: 1.0,
                    }
                }
                Fmt::Mx | Fmt::Nv => {
                    let format = if fmt == Fmt::Mx {
                        Fp4Format::Mx
                    } else {
                        Fp4Format::Nv
                    };
                    // Blocks of varied magnitude, so that block scales differ.
                    let mut v = rand_vals(r, n, DType::F32, 1.0);
                    let b = format.block_size();
                    for blk in v.chunks_mut(b) {
                        let s = [0.02f32, 0.3, 1.0, 3.0, 9.0][r.below(5)];
                        blk.iter_mut().for_each(|x| *x *= s);
                    }
                    let q = fp4::quantize(&v, k, format).unwrap();
                    let arrays = vec![q.codes.clone(), q.scales.clone()];
                    let ts = q.tensor_scale;
                    Weights {
                        tensor: Tensor::fp4(shape, q).unwrap(),
                        arrays,
                        tensor_scale: ts,
                    }
                }
            }
        }
    }

    /// Which inner path a matvec / expert tile takes (the header's use_mma).
    pub fn uses_mma(path: &str, fmt: Fmt, act: DType) -> bool {
        path == "Mma" || (path == "Auto" && fmt.mma_exact() && act == DType::BF16)
    }

    /// Replica of the header's `mv_detail::Plan`: (G, KW, KB, NCOLP).
    pub fn plan(
        mma: bool,
        fmt: Fmt,
        nrows: usize,
        threads: usize,
        maxcol: usize,
    ) -> (usize, usize, usize, usize) {
        let nw = threads / 32;
        let g = if mma { 16 } else { (nrows / nw).max(2) };
        let rg = nrows / g;
        let kw = nw / rg;
        let kb = if mma { 4 * fmt.epv() } else { 32 * fmt.epv() };
        let ncolp = if mma { 8 * maxcol.div_ceil(8) } else { maxcol };
        (g, kw, kb, ncolp)
    }

    /// Replica of `matvec_smem_bytes`.
    #[allow(clippy::too_many_arguments)]
    pub fn matvec_smem(
        path: &str,
        fmt: Fmt,
        act: DType,
        max_t: usize,
        rows: usize,
        threads: usize,
        k: usize,
        norm: bool,
    ) -> usize {
        let (_, kw, kb, ncolp) = plan(uses_mma(path, fmt, act), fmt, rows, threads, max_t);
        let mut s = 4 * (kw * rows * ncolp).div_ceil(4) * 4;
        if norm {
            let budget = (32768 / (max_t * size_of(act))) / kb * kb;
            let kc = (k.div_ceil(kb) * kb).min(kb.max(budget));
            s += 4 * max_t.div_ceil(4) * 4 + max_t * kc * size_of(act);
        }
        s
    }

    /// Replica of `experts_up_smem_bytes` / `experts_down_smem_bytes`.
    pub fn experts_smem(
        up: bool,
        path: &str,
        fmt: Fmt,
        max_t: usize,
        rows: usize,
        threads: usize,
    ) -> usize {
        let mma = uses_mma(path, fmt, DType::BF16);
        let maxcol = if mma { max_t } else { max_t.min(8) };
        let nrows = if up { 2 * rows } else { rows };
        let (_, kw, _, ncolp) = plan(mma, fmt, nrows, threads, maxcol);
        if up {
            4 * kw * 2 * rows * ncolp
        } else {
            4 * kw * max_t * rows
        }
    }

    /// Replica of `router_smem_bytes`.
    pub fn router_smem(max_t: usize, e: usize, k: usize, n_group: usize, threads: usize) -> usize {
        let w = threads / 32;
        4 * (2 * w * e + 2 * w * n_group + max_t * k + 3 * e)
    }

    /// Runs a graph with `T` bound and returns its outputs.
    pub fn run_graph(
        g: &Graph,
        t: usize,
        values: &BTreeMap<String, Tensor>,
    ) -> BTreeMap<String, Tensor> {
        let b = Bindings::new().with("T", t);
        let mut c = Caches::for_graph(g, &b).unwrap();
        interp::run(g, &b, values, &mut c).unwrap()
    }

    /// One bf16 ulp at the magnitude of `x`.
    pub fn ulp_bf16(x: f64) -> f64 {
        let a = (x.abs() as f32).max(f32::MIN_POSITIVE);
        let e = ((a.to_bits() >> 23) & 0xff) as i32 - 127;
        2f64.powi(e - 7)
    }

    fn rms(v: &[f32]) -> f64 {
        (v.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>() / v.len().max(1) as f64).sqrt()
    }

    /// Every element written (no NaN: all expected values are finite) and close.
    #[track_caller]
    pub fn check_bf16(got: &[f32], want: &[f32], ulps: f64, rms_frac: f64, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        let r = rms(want);
        let (mut num, mut den) = (0f64, 0f64);
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!(w.is_finite(), "{what}[{i}]: the interpreter gave {w}");
            assert!(!g.is_nan(), "{what}[{i}]: not written (NaN poison left)");
            let d = (f64::from(g) - f64::from(w)).abs();
            assert!(
                d <= ulps * ulp_bf16(f64::from(w)) + rms_frac * r,
                "{what}[{i}]: got {g}, want {w} (diff {d}, rms {r})"
            );
            num += d * d;
            den += f64::from(w) * f64::from(w);
        }
        let rel = (num / den.max(1e-300)).sqrt();
        assert!(rel <= 1e-2, "{what}: relative L2 error {rel}");
    }

    #[track_caller]
    pub fn check_f32(got: &[f32], want: &[f32], rel: f64, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        let r = rms(want);
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!(!g.is_nan(), "{what}[{i}]: not written (NaN poison left)");
            let d = (f64::from(g) - f64::from(w)).abs();
            assert!(
                d <= rel * (f64::from(w).abs() + r),
                "{what}[{i}]: got {g}, want {w} (diff {d})"
            );
        }
    }

    /// Kernels named `prefix*` (at least one) must not spill or use a stack frame.
    #[track_caller]
    pub fn assert_no_spills(cs: &[Compiled], prefix: &str) {
        let mut seen = 0;
        for (c, r) in cs
            .iter()
            .flat_map(|c| c.resources.iter().map(move |r| (c, r)))
            .filter(|(_, r)| r.name.starts_with(prefix))
        {
            seen += 1;
            assert!(
                r.spill_stores == 0 && r.spill_loads == 0 && r.stack_frame == 0,
                "{}: {} registers, {} B spill stores, {} B spill loads, {} B stack\n{}",
                r.name,
                r.registers,
                r.spill_stores,
                r.spill_loads,
                r.stack_frame,
                c.log
            );
        }
        assert!(seen > 0, "no ptxas report for kernels named {prefix}*");
    }
}

pub use kit::{Fmt, Rng, Weights};

// ---------------------------------------------------------------------------
// Kernel sources.

/// One matvec configuration.
#[derive(Clone, Debug)]
pub struct Mv {
    pub fmt: Fmt,
    /// "Auto", "Mma" or "Simt".
    pub path: &'static str,
    pub act: DType,
    pub out: DType,
    pub max_t: usize,
    pub rows: usize,
    pub threads: usize,
    pub k: usize,
    pub norm: bool,
    /// CTAs per SM promised to ptxas (the second `__launch_bounds__` argument).
    pub min_blocks: usize,
}

impl Mv {
    pub fn name(&self, tag: &str) -> String {
        format!(
            "mv_{tag}_{}_{}_{}_t{}_r{}_k{}{}",
            self.fmt.name(),
            self.path.to_lowercase(),
            if self.act == DType::BF16 { "xb" } else { "xf" },
            self.max_t,
            self.rows,
            self.k,
            if self.norm { "_norm" } else { "" }
        )
    }

    pub fn smem(&self) -> usize {
        kit::matvec_smem(
            self.path,
            self.fmt,
            self.act,
            self.max_t,
            self.rows,
            self.threads,
            self.k,
            self.norm,
        )
    }

    /// `extern "C"` wrapper: `(x, gamma, eps, weights.., y, T, N)`, grid ceil(N / ROWS),
    /// looping over chunks of MAX_T tokens.
    pub fn source(&self, name: &str) -> String {
        let (act, out) = (kit::cpp(self.act), kit::cpp(self.out));
        format!(
            r#"
extern "C" __global__ void __launch_bounds__({th}, {mb}) {name}(const {act}* x, const {act}* gamma, float eps, {wp}, {out}* y, int T, int N) {{
    extern __shared__ __align__(16) char smem[];
    using C = tf::MvCfg<{mt}, {rows}, {th}, {k}, {norm}, tf::MvPath::{path}>;
    static_assert(tf::matvec_smem_bytes<C, {act}, {wt}>() == {smem}, "matvec smem formula (Rust replica) disagrees");
    const {wt} w = {ctor};
    for (int t0 = 0; t0 < T; t0 += {mt})
        tf::matvec_tile<C>(blockIdx.x, x, t0, min({mt}, T - t0), gamma, eps, w, N,
            [&](int t, int n, float acc) {{ y[(size_t)t * N + n] = tf::from_float<{out}>(acc); }}, smem);
}}
"#,
            th = self.threads,
            mb = self.min_blocks,
            wp = self.fmt.params("w"),
            mt = self.max_t,
            rows = self.rows,
            k = self.k,
            norm = self.norm,
            path = self.path,
            wt = self.fmt.cpp(),
            smem = self.smem(),
            ctor = self.fmt.ctor("w"),
        )
    }
}

// ---------------------------------------------------------------------------
// GPU: matvec.

pub struct MvCase {
    pub mv: Mv,
    pub n: usize,
    pub t: usize,
}

pub fn matvec_graph(m: &Mv, n: usize) -> Graph {
    let mut b = Builder::new("matvec", &["T"]);
    let x = b.input("x", m.act, shape![T, (m.k)]).unwrap();
    let xin = if m.norm {
        let g = b.weight("gamma", m.act, shape![(m.k)]).unwrap();
        b.rms_norm(x, g, 1e-5).unwrap()
    } else {
        x
    };
    let w = b.weight("w", m.fmt.dtype(), shape![(n), (m.k)]).unwrap();
    let y = b.matmul_to(xin, w, m.out).unwrap();
    b.output("y", y).unwrap();
    b.finish().unwrap()
}

/// The matvec cases of the correctness tests.
pub fn matvec_cases() -> Vec<MvCase> {
    let mk =
        |fmt: Fmt, path: &'static str, max_t: usize, rows: usize, k: usize, n: usize, t: usize| {
            MvCase {
                mv: Mv {
                    fmt,
                    path,
                    act: DType::BF16,
                    out: DType::BF16,
                    max_t,
                    rows,
                    threads: 256,
                    k,
                    norm: false,
                    min_blocks: 1,
                },
                n,
                t,
            }
        };
    let mut cases = vec![
        // bf16 on tensor cores: T = 1, 3, 8, 16, 40 (three chunks of 16), ragged N.
        mk(Fmt::Bf16, "Auto", 16, 16, 512, 200, 1),
        mk(Fmt::Bf16, "Auto", 16, 16, 512, 200, 3),
        mk(Fmt::Bf16, "Auto", 8, 16, 512, 200, 8),
        mk(Fmt::Bf16, "Auto", 16, 32, 512, 200, 16),
        mk(Fmt::Bf16, "Auto", 16, 16, 512, 77, 40),
        // FP4 and FP8.
        mk(Fmt::Mx, "Auto", 1, 16, 1024, 300, 1),
        mk(Fmt::Mx, "Auto", 8, 32, 1024, 300, 3),
        mk(Fmt::Mx, "Auto", 16, 16, 1024, 300, 16),
        mk(Fmt::Nv, "Auto", 1, 16, 1024, 130, 1),
        mk(Fmt::Nv, "Auto", 16, 16, 1024, 130, 16),
        mk(Fmt::E4m3, "Auto", 4, 16, 512, 90, 4),
        // CUDA cores: f32 weights (router), and forced for the others.
        mk(Fmt::F32, "Auto", 16, 2, 512, 37, 3),
        mk(Fmt::Mx, "Simt", 8, 16, 1024, 50, 5),
        mk(Fmt::Nv, "Simt", 8, 16, 1024, 50, 8),
        mk(Fmt::Bf16, "Simt", 8, 16, 512, 50, 8),
        mk(Fmt::E4m3, "Simt", 2, 16, 512, 50, 2),
    ];
    cases[11].mv.out = DType::F32;
    // RMSNorm prologue: bf16 with one chunk, MXFP4 at K = 4096 with T = 16 (chunked x).
    let mut c = mk(Fmt::Bf16, "Auto", 16, 16, 512, 60, 5);
    c.mv.norm = true;
    cases.push(c);
    let mut c = mk(Fmt::Mx, "Auto", 16, 16, 4096, 40, 16);
    c.mv.norm = true;
    cases.push(c);
    // MiMo-V2-Flash's q/k/v tile at one token (64 rows of K = 4096 with the
    // norm, lower::matvec::rows_for's one-wave shape), with a ragged last tile.
    let mut c = mk(Fmt::Bf16, "Auto", 1, 64, 4096, 200, 1);
    c.mv.norm = true;
    cases.push(c);
    // f32 activations (CUDA cores), norm, f32 out; and the router projection.
    let mut c = mk(Fmt::F32, "Auto", 4, 4, 1024, 21, 3);
    c.mv.act = DType::F32;
    c.mv.out = DType::F32;
    c.mv.threads = 128;
    c.mv.norm = true;
    cases.push(c);
    let mut c = mk(Fmt::Bf16, "Auto", 4, 4, 1024, 21, 3);
    c.mv.act = DType::F32;
    c.mv.out = DType::F32;
    c.mv.threads = 128;
    cases.push(c);
    cases
}

/// One matvec case's inputs and the interpreter's output.
pub struct MvData {
    pub x: Vec<f32>,
    pub gamma: Vec<f32>,
    pub w: Weights,
    pub want: Vec<f32>,
}

/// The inputs and references of `cases`, from one seeded generator.
pub fn matvec_references(cases: &[MvCase]) -> Vec<MvData> {
    let mut r = Rng::new(0x5eed_0001);
    let mut prepared = Vec::new();
    for c in cases {
        let m = &c.mv;
        let x = kit::rand_vals(&mut r, c.t * m.k, m.act, 2.0);
        let gamma = kit::rand_vals(&mut r, m.k, m.act, 1.0)
            .iter()
            .map(|v| v.abs() + 0.5)
            .map(|v| interp::round_to(m.act, v))
            .collect::<Vec<_>>();
        let w = Weights::random(&mut r, m.fmt, &[c.n, m.k]);
        let g = matvec_graph(m, c.n);
        let mut vals = BTreeMap::new();
        vals.insert(
            "x".to_string(),
            Tensor::f32(m.act, &[c.t, m.k], x.clone()).unwrap(),
        );
        vals.insert(
            "gamma".to_string(),
            Tensor::f32(m.act, &[m.k], gamma.clone()).unwrap(),
        );
        vals.insert("w".to_string(), w.tensor.clone());
        let want = kit::f32s(&kit::run_graph(&g, c.t, &vals)["y"]);
        prepared.push(MvData { x, gamma, w, want });
    }
    prepared
}

pub fn program(kernels: &[String]) -> String {
    let mut s = String::from("#include \"prelude.cuh\"\n#include \"matvec.cuh\"\n#include \"moe.cuh\"\n#include \"sample.cuh\"\n");
    for k in kernels {
        s.push_str(k);
    }
    s
}

/// One router configuration.
#[derive(Clone, Copy, Debug)]
pub struct Router {
    pub max_t: usize,
    pub e: usize,
    pub k: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub softmax: bool,
    pub norm: bool,
    pub threads: usize,
    pub norm_eps: f32,
    pub scale: f32,
}

impl Router {
    pub fn name(&self, tag: &str) -> String {
        format!(
            "router_{tag}_e{}_k{}_g{}_{}_t{}",
            self.e, self.k, self.n_group, self.topk_group, self.max_t
        )
    }
    pub fn smem(&self) -> usize {
        kit::router_smem(self.max_t, self.e, self.k, self.n_group, self.threads)
    }
    pub fn cfg(&self) -> RouterConfig {
        RouterConfig {
            score: if self.softmax {
                ScoreFn::Softmax
            } else {
                ScoreFn::Sigmoid
            },
            top_k: self.k,
            n_group: self.n_group,
            topk_group: self.topk_group,
            norm_topk: self.norm,
            norm_eps: self.norm_eps,
            scale: self.scale,
        }
    }
    pub fn table_ints(&self) -> usize {
        2 + 3 * self.max_t * self.k
    }
    /// `(logits, bias, T, norm_eps, scale, idx, w, route)`, one CTA.
    pub fn source(&self, name: &str) -> String {
        format!(
            r#"
extern "C" __global__ void __launch_bounds__({th}, 1) {name}(const float* logits, const float* bias, int T, float norm_eps, float scale, int* idx, float* w, int* route) {{
    extern __shared__ __align__(16) char smem[];
    using C = tf::RouterCfg<{mt}, {e}, {k}, {ng}, {tg}, {sm}, {nm}, {th}>;
    static_assert(tf::router_smem_bytes<C>() == {smem}, "router smem formula (Rust replica) disagrees");
    static_assert(tf::route_table_ints({mt}, {k}) == {ti}, "route table size");
    tf::router_tile<C>(0, logits, bias, T, norm_eps, scale, idx, w, route, smem);
}}
"#,
            th = self.threads,
            mt = self.max_t,
            e = self.e,
            k = self.k,
            ng = self.n_group,
            tg = self.topk_group,
            sm = self.softmax,
            nm = self.norm,
            smem = self.smem(),
            ti = self.table_ints(),
        )
    }
}

/// One expert-FFN configuration (both tiles).
#[derive(Clone, Copy, Debug)]
pub struct Ex {
    pub fmt: Fmt,
    pub path: &'static str,
    pub max_t: usize,
    pub k: usize,
    pub h: usize,
    pub i: usize,
    pub rows_up: usize,
    pub rows_down: usize,
    pub threads: usize,
}

impl Ex {
    pub fn name(&self, tag: &str, up: bool) -> String {
        format!(
            "ex_{}_{tag}_{}_{}_t{}_h{}_i{}",
            if up { "up" } else { "down" },
            self.fmt.name(),
            self.path.to_lowercase(),
            self.max_t,
            self.h,
            self.i
        )
    }
    pub fn smem(&self, up: bool) -> usize {
        let rows = if up { self.rows_up } else { self.rows_down };
        kit::experts_smem(up, self.path, self.fmt, self.max_t, rows, self.threads)
    }
    pub fn up_tiles(&self, t: usize, e: usize) -> usize {
        e.min(t * self.k) * self.i.div_ceil(self.rows_up)
    }
    pub fn down_tiles(&self) -> usize {
        self.h.div_ceil(self.rows_down)
    }
    /// up: `(x, T, route, weights.., h)`; down: `(h, w, T, route, weights.., y)`.
    pub fn source(&self, tag: &str) -> String {
        let cfg = |rows: usize| {
            format!(
                "tf::MoeCfg<{}, {}, {}, {}, {}, {}, tf::MvPath::{}>",
                self.max_t, self.k, rows, self.threads, self.h, self.i, self.path
            )
        };
        format!(
            r#"
extern "C" __global__ void __launch_bounds__({th}, 1) {up}(const tf::bf16* x, int T, const int* route, {wp}, tf::bf16* h) {{
    extern __shared__ __align__(16) char smem[];
    using C = {cu};
    static_assert(tf::experts_up_smem_bytes<C, {wt}>() == {su}, "experts_up smem formula (Rust replica) disagrees");
    tf::experts_up_tile<C>(blockIdx.x, x, T, route, {ctor}, h, smem);
}}
extern "C" __global__ void __launch_bounds__({th}, 1) {down}(const tf::bf16* h, const float* w, int T, const int* route, {wp}, tf::bf16* y) {{
    extern __shared__ __align__(16) char smem[];
    using C = {cd};
    static_assert(tf::experts_down_smem_bytes<C, {wt}>() == {sd}, "experts_down smem formula (Rust replica) disagrees");
    tf::experts_down_tile<C>(blockIdx.x, h, w, T, route, {ctor},
        [&](int t, int n, float acc) {{ y[(size_t)t * {hd} + n] = tf::from_float<tf::bf16>(acc); }}, smem);
}}
"#,
            th = self.threads,
            up = self.name(tag, true),
            down = self.name(tag, false),
            wp = self.fmt.params("w"),
            wt = self.fmt.cpp(),
            ctor = self.fmt.ctor("w"),
            cu = cfg(self.rows_up),
            cd = cfg(self.rows_down),
            su = self.smem(true),
            sd = self.smem(false),
            hd = self.h,
        )
    }
}

pub fn router_graph(r: &Router, bias: bool) -> Graph {
    let mut b = Builder::new("router", &["T"]);
    let l = b.input("logits", DType::F32, shape![T, (r.e)]).unwrap();
    let bi = if bias {
        Some(b.weight("bias", DType::F32, shape![(r.e)]).unwrap())
    } else {
        None
    };
    let idx = b.router_select(l, bi, &r.cfg()).unwrap();
    let w = b.router_weights(l, idx, &r.cfg()).unwrap();
    b.output("idx", idx).unwrap();
    b.output("w", w).unwrap();
    b.finish().unwrap()
}

/// The routing table must list the distinct experts ascending and, for each,
/// its (t, j) pairs ascending, its fields placed for the bucket's `max_t`.
#[track_caller]
pub fn check_route_table(route: &[i32], idx: &[i32], t: usize, max_t: usize, k: usize, what: &str) {
    let tk = t * k;
    let mtk = max_t * k;
    let mut distinct: Vec<i32> = idx.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    let nd = route[0] as usize;
    assert_eq!(nd, distinct.len(), "{what}: n_distinct");
    let (expert, offset, pair) = (
        &route[1..1 + mtk],
        &route[1 + mtk..2 + 2 * mtk],
        &route[2 + 2 * mtk..2 + 3 * mtk],
    );
    assert_eq!(&expert[..nd], &distinct[..], "{what}: experts");
    assert_eq!(offset[nd] as usize, tk, "{what}: last offset");
    for (d, &e) in distinct.iter().enumerate() {
        let want: Vec<i32> = (0..tk as i32).filter(|&p| idx[p as usize] == e).collect();
        assert_eq!(
            &pair[offset[d] as usize..offset[d + 1] as usize],
            &want[..],
            "{what}: pairs of expert {e}"
        );
    }
}

/// Logits with some experts shared between neighbouring tokens (so experts
/// repeat across tokens) and a few exact ties.
pub fn router_logits(r: &mut Rng, t: usize, e: usize) -> Vec<f32> {
    let mut l: Vec<f32> = (0..t * e).map(|_| r.uniform(-3.0, 3.0) as f32).collect();
    for tt in (1..t).step_by(2) {
        for j in 0..e / 2 {
            l[tt * e + j] = l[(tt - 1) * e + j];
        }
    }
    for tt in 0..t {
        l[tt * e + 5] = l[tt * e + 3];
    }
    l
}

/// The router's cases: (configuration, bias, T).
pub fn router_cases() -> Vec<(Router, bool, usize)> {
    let base = Router {
        max_t: 64,
        e: 64,
        k: 6,
        n_group: 4,
        topk_group: 2,
        softmax: false,
        norm: true,
        threads: 256,
        norm_eps: 1e-20,
        scale: 2.5,
    };
    let cases: Vec<(Router, bool, usize)> = vec![
        (base, true, 1),
        (base, true, 7),
        (base, true, 64),
        (
            Router {
                e: 256,
                k: 8,
                n_group: 8,
                topk_group: 4,
                ..base
            },
            true,
            16,
        ),
        (
            Router {
                e: 128,
                k: 8,
                n_group: 1,
                topk_group: 1,
                softmax: true,
                norm_eps: 0.0,
                scale: 1.0,
                ..base
            },
            false,
            16,
        ),
        (
            Router {
                e: 100,
                k: 3,
                n_group: 1,
                topk_group: 1,
                softmax: true,
                norm: false,
                scale: 1.0,
                max_t: 4,
                threads: 64,
                ..base
            },
            false,
            3,
        ),
        (
            Router {
                e: 512,
                k: 8,
                n_group: 1,
                topk_group: 1,
                max_t: 8,
                ..base
            },
            true,
            5,
        ),
        // One token (warp 0 writes the table alone): more slots than lanes,
        // grouped, in a bucket of two tokens, on two warps.
        (
            Router {
                e: 64,
                k: 40,
                n_group: 4,
                topk_group: 3,
                max_t: 2,
                threads: 64,
                ..base
            },
            true,
            1,
        ),
        // One token, an odd TOPK, a one-token bucket, one warp, no bias.
        (
            Router {
                e: 100,
                k: 7,
                n_group: 1,
                topk_group: 1,
                softmax: true,
                norm: false,
                scale: 1.0,
                max_t: 1,
                threads: 32,
                ..base
            },
            false,
            1,
        ),
    ];
    cases
}

/// A router case's logits and bias, and the interpreter's indices and weights.
pub type RouterData = (Vec<f32>, Vec<f32>, Vec<i32>, Vec<f32>);

/// The inputs and references of the router cases, from one seeded generator.
pub fn router_references(cases: &[(Router, bool, usize)]) -> Vec<RouterData> {
    let mut rng = Rng::new(0x5eed_0002);
    let mut prepared = Vec::new();
    for (r, bias, t) in cases {
        let logits = router_logits(&mut rng, *t, r.e);
        let bv: Vec<f32> = (0..r.e).map(|_| rng.uniform(-0.3, 0.3) as f32).collect();
        let mut vals = BTreeMap::new();
        vals.insert(
            "logits".to_string(),
            Tensor::f32(DType::F32, &[*t, r.e], logits.clone()).unwrap(),
        );
        vals.insert(
            "bias".to_string(),
            Tensor::f32(DType::F32, &[r.e], bv.clone()).unwrap(),
        );
        let out = kit::run_graph(&router_graph(r, *bias), *t, &vals);
        prepared.push((
            logits,
            bv,
            out["idx"].as_i32().unwrap().to_vec(),
            kit::f32s(&out["w"]),
        ));
    }
    prepared
}

pub fn experts_graph(r: &Router, fmt: Fmt, h: usize, i: usize) -> Graph {
    let mut b = Builder::new("moe", &["T"]);
    let x = b.input("x", DType::BF16, shape![T, (h)]).unwrap();
    let l = b.input("logits", DType::F32, shape![T, (r.e)]).unwrap();
    let bi = b.weight("bias", DType::F32, shape![(r.e)]).unwrap();
    let idx = b.router_select(l, Some(bi), &r.cfg()).unwrap();
    let w = b.router_weights(l, idx, &r.cfg()).unwrap();
    let gu = b
        .weight("gate_up", fmt.dtype(), shape![(r.e), (2 * i), (h)])
        .unwrap();
    let dn = b
        .weight("down", fmt.dtype(), shape![(r.e), (h), (i)])
        .unwrap();
    let y = b.experts(x, idx, w, gu, dn).unwrap();
    b.output("idx", idx).unwrap();
    b.output("w", w).unwrap();
    b.output("y", y).unwrap();
    b.finish().unwrap()
}

/// The router in front of the expert cases (its MAX_T set per case).
pub fn experts_router() -> Router {
    Router {
        max_t: 16,
        e: 16,
        k: 4,
        n_group: 4,
        topk_group: 2,
        softmax: false,
        norm: true,
        threads: 256,
        norm_eps: 1e-20,
        scale: 2.0,
    }
}

/// The expert-FFN cases: (configuration, T).
pub fn experts_cases(router: &Router) -> Vec<(Ex, usize)> {
    let ex =
        |fmt: Fmt, path: &'static str, h: usize, i: usize, rows_up: usize, rows_down: usize| Ex {
            fmt,
            path,
            max_t: 16,
            k: router.k,
            h,
            i,
            rows_up,
            rows_down,
            threads: 256,
        };
    let cases: Vec<(Ex, usize)> = vec![
        // bf16 on tensor cores with ragged tiles: I = 160 in chunks of 64, H = 288 in rows of 64.
        (ex(Fmt::Bf16, "Auto", 288, 160, 64, 64), 1),
        (ex(Fmt::Bf16, "Auto", 288, 160, 64, 64), 16),
        (ex(Fmt::Mx, "Auto", 256, 256, 16, 32), 1),
        (ex(Fmt::Mx, "Auto", 256, 256, 16, 32), 5),
        (ex(Fmt::Mx, "Auto", 256, 256, 16, 32), 16),
        // At most 8 tokens (one column tile) the down tile's warps load h
        // ahead of the products, two FP4 k-blocks at a time: 6 k-blocks an
        // expert (a batch of 4, then one of 2 and two clamped), and 3 (one
        // batch of 3: a group of 2, then 1).
        (
            Ex {
                max_t: 1,
                ..ex(Fmt::Mx, "Auto", 256, 768, 16, 16)
            },
            1,
        ),
        (
            Ex {
                max_t: 8,
                ..ex(Fmt::Mx, "Auto", 256, 384, 16, 16)
            },
            8,
        ),
        (ex(Fmt::Nv, "Auto", 256, 256, 16, 16), 3),
        (ex(Fmt::Nv, "Auto", 256, 256, 16, 16), 16),
        (ex(Fmt::E4m3, "Auto", 256, 128, 16, 16), 8),
        (ex(Fmt::F32, "Auto", 128, 96, 16, 16), 12),
        (ex(Fmt::Mx, "Simt", 256, 256, 16, 16), 6),
    ];
    cases
}

/// An expert case's x, logits, bias, gate/up and down weights, and the
/// interpreter's indices, weights and output y.
pub type ExData = (
    Vec<f32>,
    Vec<f32>,
    Vec<f32>,
    Weights,
    Weights,
    Vec<i32>,
    Vec<f32>,
    Vec<f32>,
);

/// The inputs and references of the expert cases, from one seeded generator.
pub fn experts_references(router: &Router, cases: &[(Ex, usize)]) -> Vec<ExData> {
    let mut rng = Rng::new(0x5eed_0003);
    let mut prepared = Vec::new();
    for (c, t) in cases {
        let x = kit::rand_vals(&mut rng, t * c.h, DType::BF16, 1.0);
        let logits = router_logits(&mut rng, *t, router.e);
        let bias: Vec<f32> = (0..router.e)
            .map(|_| rng.uniform(-0.3, 0.3) as f32)
            .collect();
        let gu = Weights::random(&mut rng, c.fmt, &[router.e, 2 * c.i, c.h]);
        let dn = Weights::random(&mut rng, c.fmt, &[router.e, c.h, c.i]);
        let mut vals = BTreeMap::new();
        vals.insert(
            "x".to_string(),
            Tensor::f32(DType::BF16, &[*t, c.h], x.clone()).unwrap(),
        );
        vals.insert(
            "logits".to_string(),
            Tensor::f32(DType::F32, &[*t, router.e], logits.clone()).unwrap(),
        );
        vals.insert(
            "bias".to_string(),
            Tensor::f32(DType::F32, &[router.e], bias.clone()).unwrap(),
        );
        vals.insert("gate_up".to_string(), gu.tensor.clone());
        vals.insert("down".to_string(), dn.tensor.clone());
        let out = kit::run_graph(&experts_graph(router, c.fmt, c.h, c.i), *t, &vals);
        let want_idx = out["idx"].as_i32().unwrap().to_vec();
        let mut counts = vec![0; router.e];
        want_idx.iter().for_each(|&e| counts[e as usize] += 1);
        if *t >= 5 {
            assert!(
                counts.iter().any(|&n| n > 1),
                "the case should repeat an expert across tokens"
            );
        }
        prepared.push((
            x,
            logits,
            bias,
            gu,
            dn,
            want_idx,
            kit::f32s(&out["w"]),
            kit::f32s(&out["y"]),
        ));
    }
    prepared
}

/// The kernel sources of the expert cases: one router per MAX_T (the routing
/// table's layout is the expert tiles' MAX_T), then each case's two tiles.
pub fn experts_kernels(router: &Router, cases: &[(Ex, usize)]) -> Vec<String> {
    // One router per MAX_T of the cases: the routing table's layout is the
    // expert tiles' MAX_T.
    let router_for = |max_t: usize| Router { max_t, ..*router };
    let mut max_ts: Vec<usize> = cases.iter().map(|(c, _)| c.max_t).collect();
    max_ts.sort_unstable();
    max_ts.dedup();
    let mut kernels: Vec<String> = max_ts
        .iter()
        .map(|&m| {
            let r = router_for(m);
            r.source(&r.name("ex"))
        })
        .collect();
    kernels.extend(
        cases
            .iter()
            .enumerate()
            .map(|(i, (c, _))| c.source(&format!("g{i}"))),
    );
    kernels
}

/// `argmax_{tag}(logits, V, out)` and `sample_{tag}(logits, V, temperature, seed, out)`.
pub fn sample_source(tag: &str, logit: DType, threads: usize) -> String {
    let l = kit::cpp(logit);
    format!(
        r#"
extern "C" __global__ void __launch_bounds__({threads}, 1) argmax_{tag}(const {l}* logits, int V, int* out) {{
    extern __shared__ __align__(16) char smem[];
    static_assert(tf::argmax_smem_bytes<{threads}>() == {sa}, "argmax smem");
    tf::argmax_tile<{threads}>(blockIdx.x, logits, V, out, smem);
}}
extern "C" __global__ void __launch_bounds__({threads}, 1) sample_{tag}(const {l}* logits, int V, float temperature, const int* seed, int* out) {{
    extern __shared__ __align__(16) char smem[];
    static_assert(tf::sample_smem_bytes<{threads}>() == {ss}, "sample smem");
    tf::sample_tile<{threads}>(blockIdx.x, logits, V, temperature, seed, out, smem);
}}
"#,
        sa = argmax_smem(threads),
        ss = sample_smem(threads),
    )
}

pub fn argmax_smem(threads: usize) -> usize {
    8 * (threads / 32)
}

pub fn sample_smem(threads: usize) -> usize {
    4 * (3 * (threads / 32) + 4)
}

pub fn sample_graph(v: usize, dt: DType, temperature: f32) -> Graph {
    let mut b = Builder::new("choose", &["T"]);
    let l = b.input("logits", dt, shape![T, (v)]).unwrap();
    let seed = b.input("seed", DType::I32, shape![2]).unwrap();
    let a = b.argmax(l).unwrap();
    let s = b.sample(l, seed, temperature).unwrap();
    b.output("argmax", a).unwrap();
    b.output("sample", s).unwrap();
    b.finish().unwrap()
}

/// Threads of the argmax and sample tiles in the tests.
pub const SAMPLE_THREADS: usize = 1024;
/// The seed input of the sample cases.
pub const SAMPLE_SEED: [i32; 2] = [1234, 99];

/// The argmax and sample cases: (V, logits dtype, temperature, peaked, rows).
pub fn sample_cases() -> [(usize, DType, f32, bool, usize); 4] {
    // (V, logits dtype, temperature, peaked, rows)
    [
        (1000usize, DType::F32, 1.0f32, false, 3usize),
        (5003, DType::BF16, 0.7, true, 4),
        (152_576, DType::F32, 1.0, true, 3),
        (152_576, DType::BF16, 0.8, false, 2),
    ]
}

/// A sample case's logits and the interpreter's argmax and sampled tokens.
pub type SampleData = (Vec<f32>, Vec<i32>, Vec<i32>);

/// The logits and references of the sample cases, from one seeded generator.
pub fn sample_references(cases: &[(usize, DType, f32, bool, usize)]) -> Vec<SampleData> {
    let mut rng = Rng::new(0x5eed_0004);
    let seed = SAMPLE_SEED;
    let mut prepared = Vec::new();
    for &(v, dt, temp, peaked, t) in cases {
        let mut l = kit::rand_vals(&mut rng, t * v, dt, 3.0);
        if peaked {
            for tt in 0..t {
                for j in 0..5 {
                    l[tt * v + rng.below(v)] = interp::round_to(dt, 6.0 + j as f32);
                }
            }
        }
        // A tie for the maximum in row 1 (first index wins), a NaN in row 0 (argmax picks it).
        let m = l[v..2 * v].iter().cloned().fold(f32::MIN, f32::max);
        l[v + 17] = m;
        l[v + 9] = m;
        l[3] = f32::NAN;
        let mut vals = BTreeMap::new();
        vals.insert(
            "logits".to_string(),
            Tensor::f32(dt, &[t, v], l.clone()).unwrap(),
        );
        vals.insert(
            "seed".to_string(),
            Tensor::i32(&[2], seed.to_vec()).unwrap(),
        );
        let out = kit::run_graph(&sample_graph(v, dt, temp), t, &vals);
        prepared.push((
            l,
            out["argmax"].as_i32().unwrap().to_vec(),
            out["sample"].as_i32().unwrap().to_vec(),
        ));
    }
    prepared
}

/// Sampled tokens against the interpreter's: equal, or (only where the
/// target lies within 1e-5 of the total from a cumulative boundary, the
/// documented association difference) a token whose interval the target
/// touches.
#[track_caller]
pub fn check_samples(
    got: &[i32],
    want_s: &[i32],
    l: &[f32],
    v: usize,
    temp: f32,
    t: usize,
    what: &str,
) {
    let seed = SAMPLE_SEED;
    for row in 0..t {
        if got[row] == want_s[row] {
            continue;
        }
        // Only a target within 1e-5 of the total from a boundary may differ.
        let lr = &l[row * v..(row + 1) * v];
        let m = lr.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f64> = lr
            .iter()
            .map(|&x| f64::from(((x - m) / temp).exp()))
            .collect();
        let total: f64 = e.iter().sum();
        let u = f64::from(interp::uniform(
            seed[0] as u32,
            (seed[1] as u32).wrapping_add(row as u32),
        ));
        let target = u * total;
        let g = usize::try_from(got[row]).unwrap_or_else(|_| panic!("{what}: row {row}: no token"));
        let before: f64 = e[..g].iter().sum();
        let tol = 1e-5 * total;
        assert!(
            before <= target + tol && before + e[g] >= target - tol,
            "{what}: row {row}: sampled {g}, the interpreter {}; the target {target} is not within {tol} of token {g}'s interval [{before}, {}]",
            want_s[row],
            before + e[g]
        );
        println!(
            "note: {what}: row {row} sampled {g}, the interpreter {} (target at a boundary)",
            want_s[row]
        );
    }
}

/// The matvec cases' kernel names and program source (one wrapper each).
pub fn matvec_program(cases: &[MvCase]) -> (Vec<String>, String) {
    let names: Vec<String> = cases
        .iter()
        .enumerate()
        .map(|(i, c)| c.mv.name(&format!("g{i}")))
        .collect();
    let sources: Vec<String> = cases
        .iter()
        .zip(&names)
        .map(|(c, n)| c.mv.source(n))
        .collect();
    (names, program(&sources))
}

/// A matvec output against the interpreter's, by the output's dtype.
#[track_caller]
pub fn check_matvec(got: &[f32], want: &[f32], m: &Mv, what: &str) {
    if m.out == DType::F32 {
        kit::check_f32(got, want, 1e-4, what);
    } else {
        kit::check_bf16(got, want, 2.0, 1e-3, what);
    }
}

/// The router cases' kernel names and program source.
pub fn router_program(cases: &[(Router, bool, usize)]) -> (Vec<String>, String) {
    let names: Vec<String> = cases
        .iter()
        .enumerate()
        .map(|(i, c)| c.0.name(&format!("g{i}")))
        .collect();
    let sources: Vec<String> = cases
        .iter()
        .zip(&names)
        .map(|(c, n)| c.0.source(n))
        .collect();
    (names, program(&sources))
}

/// A router's outputs against the interpreter's `want` (indices, weights):
/// the indices and the routing table exactly, the weights within 1e-5
/// relative.
#[track_caller]
pub fn check_router(
    idx: &[i32],
    w: &[f32],
    route: &[i32],
    want: (&[i32], &[f32]),
    r: &Router,
    t: usize,
    what: &str,
) {
    assert_eq!(idx, want.0, "{what}: expert indices");
    for (i, (&g, &x)) in w.iter().zip(want.1).enumerate() {
        assert!(
            (g - x).abs() <= 1e-5 * x.abs(),
            "{what}: w[{i}] = {g}, want {x}"
        );
    }
    check_route_table(route, idx, t, r.max_t, r.k, what);
}

/// The expert FFN's outputs: every (t, j) row of h written by its expert's
/// tiles, y within 2 ulps plus rms/64 of the interpreter's.
#[track_caller]
pub fn check_experts(h: &[f32], y: &[f32], want_y: &[f32], what: &str) {
    assert!(h.iter().all(|v| !v.is_nan()), "{what}: h not fully written");
    kit::check_bf16(y, want_y, 2.0, 1.0 / 64.0, what);
}
