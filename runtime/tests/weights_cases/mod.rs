//! The weight-streaming tiles' cases, data formats and interpreter
//! references that their two checks share: `kernels_weights` runs them on a
//! GPU, `host_weights` on the CPU under the host emulation
//! (`host_emulation`).

#![allow(dead_code)] // each test crate uses its own part

use std::collections::BTreeMap;

use tilefuse_ir::interp::{self, Caches, Data, Tensor};
use tilefuse_ir::{shape, Bindings, Builder, DType, Graph};
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
