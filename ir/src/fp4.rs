//! FP4 block quantization: E2M1 element codes with one scale per block.
//!
//! Two formats, both storing elements as 4-bit E2M1 codes in blocks of
//! consecutive elements along the last axis (row-major; the last axis is a
//! whole number of blocks, so blocks never straddle rows):
//!
//! | format | block | block scale | tensor scale | value |
//! |---|---|---|---|---|
//! | [`Fp4Format::Mx`] (OCP MXFP4) | 32 | E8M0 byte: `2^(b-127)`, 255 = NaN | none (1.0) | `e2m1 * 2^(b-127)` |
//! | [`Fp4Format::Nv`] (NVFP4) | 16 | FP8 E4M3 byte | one f32 | `e2m1 * e4m3(b) * tensor_scale` |
//!
//! # Codes and packing
//!
//! An E2M1 code is `sign << 3 | index`, where `index` selects the magnitude
//! from `[0, 0.5, 1, 1.5, 2, 3, 4, 6]`. Two codes share a byte: element `2i`
//! in the LOW nibble of byte `i`, element `2i + 1` in the high nibble.
//!
//! # Scale choice and error bounds
//!
//! Write `X` for the effective divisor of a block (the decoded block scale
//! times the tensor scale), `amax` for the block's largest magnitude and
//! `s = amax / X` for that magnitude in scaled units. Elements are encoded
//! as `x / X` rounded to the nearest E2M1 value (ties to the even code),
//! saturating at ±6. The error of one element is then at most `X * g(s)`,
//! where `g(s)` is the largest distance from any `q` in `[0, s]` to the E2M1
//! grid (clipping included: `q - 6` for `q > 6`). For `s` in `(3, 6]`,
//! `g(s) = max(0.5, min(1, s - 4))`; `g(s) / s` peaks at `1/5` for `s = 5`
//! (the value `5 X` ties between `4 X` and `6 X`). [`max_abs_error_bound`]
//! recomputes exactly the scales [`quantize`] picks and returns
//! `X * (g(s) + 2^-20)` (plus `2^-150` for NVFP4); the `2^-20` covers the
//! final rounding of the NVFP4 product to f32 (at most `6 X * 2^-24`) and the
//! f64 rounding of `s`. The closed forms below are the envelopes of that
//! function.
//!
//! ## MXFP4: the "no clipping" scale
//!
//! `X = 2^e` with `e` the smallest integer such that `6 * 2^e >= amax`,
//! i.e. `e = ceil(log2(amax / 6))`, computed exactly from the bits of `amax`.
//! Hence `3 < s <= 6`: nothing clips, and the error is at most `amax / 5`.
//!
//! This differs from the OCP MX reference rule (`e = floor(log2(amax)) - 2`)
//! only in blocks whose `amax` has a mantissa above 1.5, where the OCP rule
//! puts `s` in `(6, 8)` and clips, with a worst case of `amax / 4` (an
//! element just below `8 X` saturating to `6 X`); where the OCP rule does not
//! clip both rules pick the same scale. Decoding is the same for both, so
//! these tensors are ordinary MXFP4 for any consumer. We take the rule with
//! the smaller worst case.
//!
//! Range edges: `e` is clamped into `[-127, 125]`. Below (`amax < 3 * 2^-127`,
//! subnormal f32 inputs), `X = 2^-127` and the error is at most
//! `max(2^-129, amax / 5)`. Above (`amax > 1.5 * 2^127`), the no-clipping
//! scale `2^126` would decode a rounded-up element as `4 * 2^126`, which
//! overflows f32, so `e` stays at 125 (the OCP rule there): error at most
//! `amax / 4`. An all-zero block gets scale byte 127 (`2^0`, a neutral
//! value) and zero codes (keeping the sign of `-0.0`). Byte 255 (NaN) is
//! never produced. MXFP4 dequantization is exact: `e2m1 * 2^e` with
//! `e >= -127` is a representable f32 (at least `2^-128`, at most
//! `1.5 * 2^127`).
//!
//! ## NVFP4
//!
//! `tensor_scale T = tensor_amax / (6 * 448)`, so the largest block's scale
//! is the E4M3 maximum 448. Guards (both only at the ends of the f32 range):
//! `T` is at least `f32::MIN_POSITIVE` (else it would be subnormal or zero
//! for tiny tensors), and is lowered by an ulp while `2688 * T` exceeds
//! `f32::MAX` (so no dequantized value overflows). An all-zero tensor gets
//! `T = 1.0`.
//!
//! Block scale byte `b = e4m3_encode(amax / (6 T))` (rounded to nearest,
//! the division done in f64), `X = e4m3(b) * T`. An all-zero block stores
//! `b = 0` (scale 0) and zero codes. A nonzero block whose ratio rounds to
//! zero (below `2^-10`) gets `b = 1` (the smallest scale, `2^-9`) instead of
//! decoding to all zeros.
//!
//! Rounding the scale moves `s` away from 6, so elements may clip:
//! - normal scales (`e4m3(b) >= 2^-6`): the E4M3 rounding is within a
//!   relative `1/16`, so `5.625 <= s <= 6.4`, `g(s) <= 1`, and the error is
//!   at most `amax / 5.625` (about `0.178 amax`);
//! - subnormal scales `j * 2^-9` (`j` in 1..=7, tiny blocks next to a large
//!   tensor maximum): the absolute rounding of the ratio is `2^-10`, so
//!   `6 (j - 1/2) / j <= s <= 6 (j + 1/2) / j`; the worst is `j = 1` with
//!   `s` up to 9, where the clip costs `3 X = amax / 3`;
//! - the bumped smallest scale (ratio below `2^-10`): `s < 3`, no clip, error
//!   at most `max(X / 4, amax / 5)` with `X / 4 = 2^-11 T`.
//!
//! Envelope: error `<= max(amax / 3, 2^-11 T)`, and `<= amax / 5.625` when
//! the block scale is normal; plus the f32 rounding of the dequantized value.
//!
//! The encode decision is that of the exact quotient `x / X`: for MXFP4 the
//! division by a power of two is exact in f64; for NVFP4 `X` has at most 28
//! significant bits and `x` 24, so `x / X` cannot come within an f64 half-ulp
//! of an E2M1 rounding threshold without being equal to it.

use crate::dtype::DType;

/// Which FP4 format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fp4Format {
    /// OCP MXFP4: blocks of 32, one E8M0 (power of two) scale per block.
    Mx,
    /// NVFP4: blocks of 16, one FP8 E4M3 scale per block, one f32 scale per tensor.
    Nv,
}

impl Fp4Format {
    /// Elements per scale block along the last axis: 32 for MXFP4, 16 for NVFP4.
    pub fn block_size(self) -> usize {
        match self {
            Fp4Format::Mx => 32,
            Fp4Format::Nv => 16,
        }
    }

    /// The IR dtype of tensors in this format.
    pub fn dtype(self) -> DType {
        match self {
            Fp4Format::Mx => DType::MXFP4,
            Fp4Format::Nv => DType::NVFP4,
        }
    }
}

/// A block-quantized tensor, row-major, blocks along the last axis.
///
/// Invariants (upheld by [`quantize`]): `codes.len() * 2` is the number of
/// elements, a multiple of the block size; `scales.len()` is that number
/// divided by the block size; `tensor_scale` is 1.0 for MXFP4 and positive
/// and finite for NVFP4. The shape is not stored: blocks are consecutive
/// runs of [`Fp4Format::block_size`] elements in row-major order, which is
/// all dequantization needs.
#[derive(Clone, Debug, PartialEq)]
pub struct Fp4Tensor {
    /// The format of `codes` and `scales`.
    pub format: Fp4Format,
    /// E2M1 codes, two per byte: the even-indexed element in the low nibble.
    pub codes: Vec<u8>,
    /// One scale byte per block: E8M0 for MXFP4, E4M3 for NVFP4.
    pub scales: Vec<u8>,
    /// The per-tensor scale: 1.0 for MXFP4.
    pub tensor_scale: f32,
}

impl Fp4Tensor {
    /// The dequantized values, `e2m1 * block_scale * tensor_scale` each,
    /// rounded once to f32 (exact for MXFP4).
    ///
    /// A block whose scale byte is missing (`scales` shorter than the
    /// invariant requires) decodes as NaN rather than panicking.
    pub fn dequantize(&self) -> Vec<f32> {
        let pairs_per_block = self.format.block_size() / 2;
        let mut out = Vec::with_capacity(self.numel());
        for (block, pairs) in self.codes.chunks(pairs_per_block).enumerate() {
            let factor = self.block_factor(block);
            for &byte in pairs {
                out.push(scaled(byte & 0xF, factor));
                out.push(scaled(byte >> 4, factor));
            }
        }
        out
    }

    /// Number of elements (two per code byte).
    pub fn numel(&self) -> usize {
        self.codes.len() * 2
    }

    /// Element `i` (row-major), dequantized exactly as [`Self::dequantize`] does.
    ///
    /// # Panics
    ///
    /// If `i >= self.numel()`, like slice indexing.
    pub fn get(&self, i: usize) -> f32 {
        let numel = self.numel();
        assert!(
            i < numel,
            "Fp4Tensor::get: index {i} out of range for {numel} elements"
        );
        let byte = self.codes[i / 2];
        // Even index: low nibble.
        let code = if i & 1 == 0 { byte & 0xF } else { byte >> 4 };
        scaled(code, self.block_factor(i / self.format.block_size()))
    }

    /// Bytes of storage: codes, block scales, and the f32 tensor scale for NVFP4.
    pub fn storage_bytes(&self) -> usize {
        let tensor_scale = match self.format {
            Fp4Format::Mx => 0,
            Fp4Format::Nv => 4,
        };
        self.codes.len() + self.scales.len() + tensor_scale
    }

    /// The decoded block scale times the tensor scale, in f64 (exact: the
    /// block scale has at most 4 significant bits and the tensor scale 24);
    /// NaN when the block has no scale byte.
    fn block_factor(&self, block: usize) -> f64 {
        match self.scales.get(block) {
            Some(&b) => decode_block_scale(self.format, b) * f64::from(self.tensor_scale),
            None => f64::NAN,
        }
    }
}

/// `e2m1_decode(code) * factor`, computed exactly in f64 (at most 2 + 28
/// significant bits) and rounded once to f32.
fn scaled(code: u8, factor: f64) -> f32 {
    (f64::from(e2m1_decode(code)) * factor) as f32
}

/// The decoded block scale byte of `format`.
fn decode_block_scale(format: Fp4Format, b: u8) -> f64 {
    match format {
        Fp4Format::Mx => f64::from(e8m0_decode(b)),
        Fp4Format::Nv => f64::from(e4m3_decode(b)),
    }
}

/// The E2M1 magnitudes, indexed by the low 3 bits of a code.
const E2M1_MAGNITUDES: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];

/// The value of an E2M1 code; only the low 4 bits are used. Code 8 is -0.0.
pub fn e2m1_decode(code: u8) -> f32 {
    let magnitude = E2M1_MAGNITUDES[usize::from(code & 0x7)];
    if code & 0x8 != 0 {
        -magnitude
    } else {
        magnitude
    }
}

/// The E2M1 code nearest to `x`: ties go to the even code (even mantissa
/// bit), magnitudes above 6 (infinities included) saturate to ±6, and the
/// sign is kept, so `-0.0` and small negatives encode as code 8 (-0).
///
/// E2M1 has no NaN; NaN encodes as +6 (code 7), the most conspicuous value.
/// [`quantize`] rejects NaN before it gets here.
pub fn e2m1_encode(x: f32) -> u8 {
    e2m1_encode_f64(f64::from(x))
}

/// [`e2m1_encode`] on an f64, so that quantization rounds the f64 quotient
/// without first rounding it to f32.
fn e2m1_encode_f64(x: f64) -> u8 {
    if x.is_nan() {
        return 0x7;
    }
    let sign = if x.is_sign_negative() { 0x8 } else { 0x0 };
    let a = x.abs();
    // Thresholds are the midpoints of the grid; at a midpoint `<=` keeps the
    // lower neighbour (even index 0, 2, 4, 6) and `<` gives the upper one
    // (the lower is odd). All thresholds are exact binary fractions.
    let index = if a <= 0.25 {
        0
    } else if a < 0.75 {
        1
    } else if a <= 1.25 {
        2
    } else if a < 1.75 {
        3
    } else if a <= 2.5 {
        4
    } else if a < 3.5 {
        5
    } else if a <= 5.0 {
        6
    } else {
        7
    };
    sign | index
}

/// The value of an E8M0 scale byte: `2^(b - 127)`, exact (byte 0 is the
/// subnormal f32 `2^-127`); byte 255 is NaN.
pub fn e8m0_decode(b: u8) -> f32 {
    if b == 0xFF {
        return f32::NAN;
    }
    pow2(i32::from(b) - 127) as f32
}

/// The value of an FP8 E4M3 byte (OCP "fn" variant: bias 7, subnormals, no
/// infinities, max 448); `0x7F` and `0xFF` are NaN.
pub fn e4m3_decode(b: u8) -> f32 {
    let exponent = i32::from((b >> 3) & 0xF);
    let mantissa = f64::from(b & 0x7);
    if exponent == 0xF && b & 0x7 == 0x7 {
        return f32::NAN;
    }
    let magnitude = if exponent == 0 {
        mantissa * pow2(-9)
    } else {
        (8.0 + mantissa) * pow2(exponent - 10)
    };
    // Exact: at most 4 significant bits, between 2^-9 and 448.
    let magnitude = magnitude as f32;
    if b & 0x80 != 0 {
        -magnitude
    } else {
        magnitude
    }
}

/// The E4M3 byte nearest to `x`: ties to even mantissa, magnitudes of 448 or
/// more (infinities included) saturate to ±448, the sign is kept (so `-0.0`
/// encodes as `0x80`), and NaN encodes as `0x7F`.
pub fn e4m3_encode(x: f32) -> u8 {
    e4m3_encode_f64(f64::from(x))
}

/// [`e4m3_encode`] on an f64 (the NVFP4 scale ratio is computed in f64).
fn e4m3_encode_f64(x: f64) -> u8 {
    if x.is_nan() {
        return 0x7F;
    }
    let sign = if x.is_sign_negative() { 0x80 } else { 0x00 };
    let a = x.abs();
    if a >= 448.0 {
        // 448 is the largest finite value; anything at or beyond the
        // midpoint 464 would round to 480, which is not finite in E4M3.
        return sign | 0x7E;
    }
    let magnitude = if a < pow2(-6) {
        // Subnormal range: value m * 2^-9 is byte m; m = 8 is 2^-6 = byte 8.
        // Scaling by a power of two is exact, so one rounding happens here.
        (a * pow2(9)).round_ties_even() as u8
    } else {
        // Normal: a = 1.m * 2^e, -6 <= e <= 8, byte = (e + 7) << 3 | m.
        // A mantissa rounding up to 16 carries into the exponent field.
        let e = floor_log2(a);
        let m = (a * pow2(3 - e)).round_ties_even() as i32; // in 8..=16
        ((e + 7) * 8 + (m - 8)) as u8
    };
    // a < 448 rounds to at most 448 = 0x7E (rounding is monotone).
    sign | magnitude
}

/// `2^k` as an f64, exact. Invariant: `-1022 <= k <= 1023` (every caller
/// stays within `[-256, 256]`).
fn pow2(k: i32) -> f64 {
    debug_assert!((-1022..=1023).contains(&k), "pow2({k}) out of range");
    f64::from_bits(((k + 1023) as u64) << 52)
}

/// `floor(log2(a))` for a positive finite `a` that is normal as an f64
/// (every f32, subnormals included, widens to a normal f64).
fn floor_log2(a: f64) -> i32 {
    ((a.to_bits() >> 52) & 0x7FF) as i32 - 1023
}

/// Smallest MXFP4 scale exponent (E8M0 byte 0).
const MX_MIN_EXP: i32 = -127;
/// Largest MXFP4 scale exponent we produce: `4 * 2^126` would overflow f32
/// on decode, so the top binade falls back to the OCP rule (see module docs).
const MX_MAX_EXP: i32 = 125;

/// The MXFP4 scale byte and divisor `2^e` for a block with largest
/// magnitude `amax` (finite, non-negative). See the module docs.
fn mx_block_scale(amax: f32) -> (u8, f64) {
    if amax == 0.0 {
        return (127, 1.0);
    }
    let a = f64::from(amax);
    let k = floor_log2(a);
    // amax = m * 2^k with 1 <= m < 2. The smallest e with 6 * 2^e >= amax:
    // 6 * 2^(k-2) = 1.5 * 2^k covers m <= 1.5, else 6 * 2^(k-1) = 3 * 2^k does.
    let e = if a <= 1.5 * pow2(k) { k - 2 } else { k - 1 };
    let e = e.clamp(MX_MIN_EXP, MX_MAX_EXP);
    ((e + 127) as u8, pow2(e))
}

/// 6 * 448: the largest NVFP4 element magnitude in units of the tensor scale.
const NV_RANGE: f32 = 6.0 * 448.0;

/// The NVFP4 tensor scale for a tensor with largest magnitude `tensor_amax`
/// (finite, non-negative). See the module docs.
fn nv_tensor_scale(tensor_amax: f32) -> f32 {
    if tensor_amax == 0.0 {
        return 1.0;
    }
    let mut t = (tensor_amax / NV_RANGE).max(f32::MIN_POSITIVE);
    // Invariant after the loop: 2688 * t <= f32::MAX, so no decoded value
    // e2m1 * e4m3 * t (at most 6 * 448 * t) overflows. Runs at most a few
    // times, and only for tensor_amax within an ulp or so of f32::MAX.
    while f64::from(t) * f64::from(NV_RANGE) > f64::from(f32::MAX) {
        t = f32::from_bits(t.to_bits() - 1);
    }
    t
}

/// The NVFP4 scale byte and divisor `e4m3(byte) * t` (0 for an all-zero
/// block) for a block with largest magnitude `amax` (finite, non-negative)
/// in a tensor with tensor scale `t` (positive, normal).
fn nv_block_scale(amax: f32, t: f32) -> (u8, f64) {
    if amax == 0.0 {
        return (0, 0.0);
    }
    // Finite: amax <= f32::MAX and t >= f32::MIN_POSITIVE.
    let ratio = f64::from(amax) / (6.0 * f64::from(t));
    let mut byte = e4m3_encode_f64(ratio);
    if byte == 0 {
        // The block is too small for any E4M3 scale at this tensor scale;
        // the smallest positive scale keeps what it can instead of zeroing.
        byte = 1;
    }
    (byte, f64::from(e4m3_decode(byte)) * f64::from(t))
}

/// Quantizes `values`, a row-major tensor whose last axis has `last_dim`
/// elements, to `format` (scale rules in the module docs).
///
/// Errors: `last_dim` zero or not a multiple of the block size, a length that
/// is not a whole number of rows, or a non-finite value (its index is named).
pub fn quantize(values: &[f32], last_dim: usize, format: Fp4Format) -> Result<Fp4Tensor, String> {
    let block = format.block_size();
    let name = format.dtype().name();
    // `checked_rem` rather than `is_multiple_of` (Rust 1.87; the workspace
    // declares 1.85).
    if last_dim == 0 || last_dim.checked_rem(block) != Some(0) {
        return Err(format!(
            "{name} quantize: last_dim {last_dim} is not a positive multiple of the block size {block}"
        ));
    }
    if values.len().checked_rem(last_dim) != Some(0) {
        return Err(format!(
            "{name} quantize: {} values are not whole rows of last_dim {last_dim}; expected a multiple of {last_dim}",
            values.len()
        ));
    }
    if let Some(i) = values.iter().position(|x| !x.is_finite()) {
        return Err(format!(
            "{name} quantize: value at index {i} (row {}, column {}) is {}; expected a finite number",
            i / last_dim,
            i % last_dim,
            values[i]
        ));
    }

    let tensor_scale = match format {
        Fp4Format::Mx => 1.0,
        Fp4Format::Nv => nv_tensor_scale(amax(values)),
    };
    let mut codes = Vec::with_capacity(values.len() / 2);
    let mut scales = Vec::with_capacity(values.len() / block);
    // The block size is even, so pairs never straddle blocks.
    for chunk in values.chunks_exact(block) {
        let block_amax = amax(chunk);
        let (scale_byte, divisor) = match format {
            Fp4Format::Mx => mx_block_scale(block_amax),
            Fp4Format::Nv => nv_block_scale(block_amax, tensor_scale),
        };
        scales.push(scale_byte);
        // A zero divisor only comes with an all-zero block, whose elements
        // (±0) encode the same divided by 1.
        let divisor = if divisor > 0.0 { divisor } else { 1.0 };
        for pair in chunk.chunks_exact(2) {
            let low = e2m1_encode_f64(f64::from(pair[0]) / divisor);
            let high = e2m1_encode_f64(f64::from(pair[1]) / divisor);
            codes.push(low | (high << 4));
        }
    }
    Ok(Fp4Tensor {
        format,
        codes,
        scales,
        tensor_scale,
    })
}

/// The largest magnitude among `values` (0 for none). Inputs are finite.
fn amax(values: &[f32]) -> f32 {
    values.iter().fold(0.0f32, |m, x| m.max(x.abs()))
}

/// The largest distance from any `q` in `[0, s]` to its E2M1 rounding, in
/// scaled units: per grid gap `[lo, hi]` reached by `s`, `min(half gap,
/// s - lo)`; past 6, the clip `s - 6`.
fn grid_error(s: f64) -> f64 {
    let mut worst = 0.0f64;
    for gap in E2M1_MAGNITUDES.windows(2) {
        let (lo, hi) = (f64::from(gap[0]), f64::from(gap[1]));
        if s <= lo {
            break;
        }
        worst = worst.max(((hi - lo) / 2.0).min(s - lo));
    }
    worst.max(s - 6.0)
}

/// Relative slack on the bound: covers the f32 rounding of an NVFP4 decoded
/// value (at most `6 X 2^-24`) and the f64 rounding of `amax / X`.
const REL_SLACK: f64 = 1.0 / (1u64 << 20) as f64;

/// Half of the smallest subnormal f32: the rounding of a decoded NVFP4 value
/// that lands in the subnormal range.
const SUBNORMAL_HALF_ULP: f64 = 1.0 / (1u128 << 100) as f64 / (1u64 << 50) as f64;

/// The documented bound on `|x - dequantized x|` for every element of a
/// block whose largest magnitude is `block_amax`, in a tensor whose largest
/// magnitude is `tensor_amax` (used by NVFP4 only; taken as at least
/// `block_amax`).
///
/// It recomputes the scale [`quantize`] picks and returns
/// `X * (g(amax / X) + 2^-20)` (plus `2^-150` for NVFP4), see the module docs
/// for `g` and the closed forms: at most `amax / 5` for MXFP4 away from the
/// ends of the f32 range, at most `max(amax / 3, 2^-11 T)` for NVFP4. Zero
/// for an all-zero block (which round-trips exactly); `+inf` for non-finite
/// arguments. Signs of the arguments are ignored.
pub fn max_abs_error_bound(format: Fp4Format, block_amax: f32, tensor_amax: f32) -> f32 {
    let block_amax = block_amax.abs();
    let tensor_amax = tensor_amax.abs().max(block_amax);
    if !block_amax.is_finite() || !tensor_amax.is_finite() {
        return f32::INFINITY;
    }
    if block_amax == 0.0 {
        return 0.0;
    }
    let (divisor, absolute_slack) = match format {
        Fp4Format::Mx => (mx_block_scale(block_amax).1, 0.0),
        Fp4Format::Nv => {
            let t = nv_tensor_scale(tensor_amax);
            (nv_block_scale(block_amax, t).1, SUBNORMAL_HALF_ULP)
        }
    };
    let s = f64::from(block_amax) / divisor;
    round_up_to_f32(divisor * (grid_error(s) + REL_SLACK) + absolute_slack)
}

/// The smallest f32 at or above the non-negative `x`.
fn round_up_to_f32(x: f64) -> f32 {
    let f = x as f32;
    if f64::from(f) < x {
        f32::from_bits(f.to_bits() + 1)
    } else {
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::TestCaseError;

    // ---- references, written independently of the encoders ----

    /// Nearest E2M1 code by brute force over the 8 magnitudes; ties to the
    /// even index; the sign copied from `x`.
    fn e2m1_reference(x: f32) -> u8 {
        let a = f64::from(x.abs());
        // Past the top value the nearest is the top value (computing the
        // distances in f64 would tie them for huge `a`).
        let a = a.min(6.0);
        let mut best = 0u8;
        for c in 1..8u8 {
            let d = (f64::from(E2M1_MAGNITUDES[usize::from(c)]) - a).abs();
            let db = (f64::from(E2M1_MAGNITUDES[usize::from(best)]) - a).abs();
            if d < db || (d == db && c % 2 == 0) {
                best = c;
            }
        }
        if x.is_sign_negative() {
            best | 0x8
        } else {
            best
        }
    }

    /// Nearest E4M3 byte by brute force over the 127 finite magnitudes
    /// (0x00..=0x7E, in increasing order); ties to the even byte (even
    /// mantissa); the sign copied from `x`.
    fn e4m3_reference(x: f32) -> u8 {
        let a = f64::from(x.abs()).min(448.0); // as in e2m1_reference
        let mut best = 0u8;
        for b in 1..=0x7Eu8 {
            let d = (f64::from(e4m3_decode(b)) - a).abs();
            let db = (f64::from(e4m3_decode(best)) - a).abs();
            if d < db || (d == db && b % 2 == 0) {
                best = b;
            }
        }
        if x.is_sign_negative() {
            best | 0x80
        } else {
            best
        }
    }

    // ---- element formats ----

    #[test]
    fn e2m1_all_codes_round_trip() {
        for code in 0..16u8 {
            let v = e2m1_decode(code);
            assert_eq!(e2m1_encode(v), code, "code {code:#x} decodes to {v}");
            assert_eq!(e2m1_decode(code | 0xF0).to_bits(), v.to_bits());
            assert_eq!(v.is_sign_negative(), code & 0x8 != 0, "code {code:#x}");
        }
        assert_eq!(e2m1_decode(0x8).to_bits(), (-0.0f32).to_bits());
        assert_eq!(e2m1_decode(0x7), 6.0);
        assert_eq!(e2m1_decode(0xD), -3.0);
    }

    #[test]
    fn e2m1_rounding_ties_and_saturation() {
        let cases: [(f32, u8); 20] = [
            (0.25, 0x0),
            (0.2501, 0x1),
            (0.75, 0x2),
            (0.7499, 0x1),
            (1.25, 0x2),
            (1.75, 0x4),
            (2.5, 0x4),
            (2.5001, 0x5),
            (3.5, 0x6),
            (5.0, 0x6),
            (5.0001, 0x7),
            (7.9, 0x7),
            (1e30, 0x7),
            (f32::INFINITY, 0x7),
            (f32::NEG_INFINITY, 0xF),
            (-0.1, 0x8),
            (-0.0, 0x8),
            (-5.0, 0xE),
            (f32::NAN, 0x7),
            (-f32::NAN, 0x7),
        ];
        for (x, code) in cases {
            assert_eq!(e2m1_encode(x), code, "e2m1_encode({x})");
        }
    }

    #[test]
    fn e4m3_all_bytes_round_trip() {
        for b in 0..=255u8 {
            let v = e4m3_decode(b);
            if b & 0x7F == 0x7F {
                assert!(v.is_nan(), "byte {b:#x} must be NaN");
                continue;
            }
            assert!(v.is_finite(), "byte {b:#x}");
            assert_eq!(e4m3_encode(v), b, "byte {b:#x} decodes to {v}");
        }
        assert_eq!(e4m3_decode(0x7E), 448.0);
        assert_eq!(e4m3_decode(0x38), 1.0);
        assert_eq!(e4m3_decode(0x08), 1.0 / 64.0);
        assert_eq!(e4m3_decode(0x01), 1.0 / 512.0);
        assert_eq!(e4m3_decode(0x07), 7.0 / 512.0);
        assert_eq!(e4m3_decode(0xBC), -1.5);
        assert_eq!(e4m3_encode(f32::NAN), 0x7F);
        assert_eq!(e4m3_encode(f32::INFINITY), 0x7E);
        assert_eq!(e4m3_encode(-1e9), 0xFE);
        assert_eq!(e4m3_encode(464.0), 0x7E);
        assert_eq!(e4m3_encode(-0.0), 0x80);
    }

    #[test]
    fn e4m3_midpoints_round_to_even() {
        for b in 0..0x7Eu8 {
            let (lo, hi) = (e4m3_decode(b), e4m3_decode(b + 1));
            let mid = (lo + hi) / 2.0; // exact: both have few significant bits
            let even = if b % 2 == 0 { b } else { b + 1 };
            assert_eq!(
                e4m3_encode(mid),
                even,
                "midpoint of {b:#x} and {:#x}",
                b + 1
            );
            assert_eq!(e4m3_encode(-mid), even | 0x80);
            assert_eq!(e4m3_reference(mid), even);
        }
    }

    #[test]
    fn e8m0_values() {
        assert_eq!(e8m0_decode(127), 1.0);
        assert_eq!(e8m0_decode(128), 2.0);
        assert_eq!(e8m0_decode(126), 0.5);
        assert_eq!(e8m0_decode(254), 2.0f32.powi(127));
        assert_eq!(e8m0_decode(0).to_bits(), 1 << 22); // subnormal 2^-127
        assert!(e8m0_decode(255).is_nan());
        for b in 0..255u8 {
            let v = e8m0_decode(b);
            assert!(v > 0.0 && v.is_finite(), "byte {b}");
        }
    }

    /// Finite f32s of every magnitude: random bits, non-finite mapped to 0.
    fn any_finite_f32() -> impl Strategy<Value = f32> {
        any::<u32>().prop_map(|bits| {
            let x = f32::from_bits(bits);
            if x.is_finite() {
                x
            } else {
                0.0
            }
        })
    }

    proptest! {
        #[test]
        fn e2m1_encode_matches_reference(x in prop_oneof![-8.0f32..8.0, any_finite_f32()]) {
            prop_assert_eq!(e2m1_encode(x), e2m1_reference(x), "x = {}", x);
        }

        #[test]
        fn e4m3_encode_matches_reference(
            x in prop_oneof![
                -500.0f32..500.0,
                -0.02f32..0.02,
                -1e-4f32..1e-4,
                any_finite_f32(),
            ]
        ) {
            prop_assert_eq!(e4m3_encode(x), e4m3_reference(x), "x = {:e}", x);
        }
    }

    // ---- layout, errors, sizes ----

    #[test]
    fn mx_layout_even_element_in_low_nibble() {
        let mut values = vec![0.0f32; 32];
        values[0] = 1.0;
        values[1] = 2.0;
        values[2] = -6.0;
        values[3] = 0.5;
        let q = quantize(&values, 32, Fp4Format::Mx).expect("valid input");
        assert_eq!(q.scales, vec![127]); // amax 6 -> scale 2^0
        assert_eq!(q.tensor_scale, 1.0);
        assert_eq!(q.codes.len(), 16);
        assert_eq!(q.codes[0], 0x42); // 1.0 = code 2 (low), 2.0 = code 4 (high)
        assert_eq!(q.codes[1], 0x1F); // -6 = code 0xF (low), 0.5 = code 1 (high)
        assert_eq!(q.get(2), -6.0);
        assert_eq!(q.dequantize(), values);
    }

    #[test]
    fn nv_layout_and_scales() {
        let mut values = vec![0.0f32; 32];
        values[0] = 2688.0; // tensor amax: T = 1, block scale 448, code 6
        values[1] = -1.0; // -1/448 rounds to -0
        values[16] = 3.0; // second block: 3 / 6 = 0.5 -> scale 0.5, code 6
        values[17] = 1.0; // 1 / 0.5 = 2 -> code 4
        let q = quantize(&values, 16, Fp4Format::Nv).expect("valid input");
        assert_eq!(q.tensor_scale, 1.0);
        assert_eq!(q.scales, vec![0x7E, e4m3_encode(0.5)]);
        assert_eq!(q.codes[0], 0x87);
        assert_eq!(q.codes[8], 0x47);
        assert_eq!(q.get(1).to_bits(), (-0.0f32).to_bits());
        assert_eq!(q.get(17), 1.0);
        assert_eq!(q.storage_bytes(), 16 + 2 + 4);
    }

    #[test]
    fn zero_tensors() {
        let zeros = [0.0f32, -0.0].repeat(16);
        let mx = quantize(&zeros, 32, Fp4Format::Mx).expect("valid input");
        assert_eq!(mx.scales, vec![127]);
        assert!(mx.codes.iter().all(|&c| c == 0x80));
        let nv = quantize(&zeros, 16, Fp4Format::Nv).expect("valid input");
        assert_eq!(nv.tensor_scale, 1.0);
        assert_eq!(nv.scales, vec![0, 0]);
        for q in [mx, nv] {
            let d = q.dequantize();
            let bits: Vec<u32> = d.iter().map(|x| x.to_bits()).collect();
            let want: Vec<u32> = zeros.iter().map(|x| x.to_bits()).collect();
            assert_eq!(bits, want);
        }
        for format in [Fp4Format::Mx, Fp4Format::Nv] {
            let q = quantize(&[], format.block_size(), format).expect("empty is valid");
            assert_eq!(q.numel(), 0);
            assert!(q.dequantize().is_empty());
            assert_eq!(max_abs_error_bound(format, 0.0, 0.0), 0.0);
        }
    }

    #[test]
    fn bad_inputs_are_rejected() {
        let v = vec![1.0f32; 96];
        let e = quantize(&v, 48, Fp4Format::Mx).expect_err("48 is not a multiple of 32");
        assert!(
            e.contains("last_dim 48") && e.contains("block size 32"),
            "{e}"
        );
        let e = quantize(&v, 24, Fp4Format::Nv).expect_err("24 is not a multiple of 16");
        assert!(
            e.contains("last_dim 24") && e.contains("block size 16"),
            "{e}"
        );
        let e = quantize(&v, 0, Fp4Format::Nv).expect_err("last_dim 0");
        assert!(e.contains("last_dim 0"), "{e}");
        let e = quantize(&v[..40], 32, Fp4Format::Mx).expect_err("40 values, rows of 32");
        assert!(e.contains("40 values") && e.contains("last_dim 32"), "{e}");
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut w = v.clone();
            w[37] = bad;
            for format in [Fp4Format::Mx, Fp4Format::Nv] {
                let e = quantize(&w, 32, format).expect_err("non-finite value");
                assert!(
                    e.contains("index 37") && e.contains("row 1, column 5"),
                    "{e}"
                );
                assert!(e.contains("finite"), "{e}");
            }
        }
    }

    #[test]
    fn storage_bytes_match_dtype() {
        for format in [Fp4Format::Mx, Fp4Format::Nv] {
            assert_eq!(Some(format.block_size()), format.dtype().block_size());
            for (rows, last_dim) in [(1, 32), (3, 64), (7, 96), (2, 4096)] {
                let n = rows * last_dim;
                let q = quantize(&vec![0.5; n], last_dim, format).expect("valid input");
                assert_eq!(q.numel(), n);
                assert_eq!(
                    Some(q.storage_bytes()),
                    format.dtype().storage_bytes(n, last_dim)
                );
            }
        }
        assert_eq!(Fp4Format::Mx.dtype(), DType::MXFP4);
        assert_eq!(Fp4Format::Nv.dtype(), DType::NVFP4);
    }

    // ---- exactness on representable values ----

    /// MX blocks of E2M1 values times 2^e (e per block), each block holding
    /// a ±6 somewhere, and the codes and exponents used to build them.
    fn mx_representable() -> impl Strategy<Value = (Vec<f32>, Vec<u8>, Vec<u8>)> {
        (1usize..=4).prop_flat_map(|blocks| {
            (
                prop::collection::vec(0u8..16, blocks * 32),
                prop::collection::vec((-127i32..=124, 0usize..32, any::<bool>()), blocks),
            )
                .prop_map(|(mut codes, per_block)| {
                    let mut values = Vec::with_capacity(codes.len());
                    let mut scales = Vec::new();
                    for (b, &(e, at, negative)) in per_block.iter().enumerate() {
                        codes[b * 32 + at] = if negative { 0xF } else { 0x7 };
                        for &c in &codes[b * 32..(b + 1) * 32] {
                            values.push((f64::from(e2m1_decode(c)) * pow2(e)) as f32);
                        }
                        scales.push((e + 127) as u8);
                    }
                    let packed = codes.chunks(2).map(|p| p[0] | (p[1] << 4)).collect();
                    (values, packed, scales)
                })
        })
    }

    /// NV tensors of e2m1 * e4m3 * T with T of 16 significant bits, every
    /// block holding a ±6 and one block the scale 448, so that quantize must
    /// choose exactly this T and these scales.
    #[allow(clippy::type_complexity)]
    fn nv_representable() -> impl Strategy<Value = (Vec<f32>, Vec<u8>, Vec<u8>, f32)> {
        (1usize..=4).prop_flat_map(|blocks| {
            (
                prop::collection::vec(0u8..16, blocks * 16),
                prop::collection::vec((1u8..=0x7E, 0usize..16, any::<bool>()), blocks),
                0..blocks,
                (-40i32..=40, 0u32..(1 << 15)),
            )
                .prop_map(move |(mut codes, mut per_block, big, (p, k))| {
                    per_block[big].0 = 0x7E;
                    let t = ((1.0 + f64::from(k) / f64::from(1u32 << 15)) * pow2(p)) as f32;
                    let mut values = Vec::with_capacity(codes.len());
                    let mut scales = Vec::new();
                    for (b, &(s, at, negative)) in per_block.iter().enumerate() {
                        codes[b * 16 + at] = if negative { 0xF } else { 0x7 };
                        let factor = f64::from(e4m3_decode(s)) * f64::from(t);
                        for &c in &codes[b * 16..(b + 1) * 16] {
                            values.push((f64::from(e2m1_decode(c)) * factor) as f32);
                        }
                        scales.push(s);
                    }
                    let packed = codes.chunks(2).map(|p| p[0] | (p[1] << 4)).collect();
                    (values, packed, scales, t)
                })
        })
    }

    fn bits(values: &[f32]) -> Vec<u32> {
        values.iter().map(|x| x.to_bits()).collect()
    }

    proptest! {
        #[test]
        fn mx_representable_values_are_exact((values, codes, scales) in mx_representable()) {
            let q = quantize(&values, 32, Fp4Format::Mx).map_err(TestCaseError::fail)?;
            prop_assert_eq!(&q.codes, &codes);
            prop_assert_eq!(&q.scales, &scales);
            prop_assert_eq!(bits(&q.dequantize()), bits(&values));
        }

        #[test]
        fn nv_representable_values_are_exact((values, codes, scales, t) in nv_representable()) {
            let q = quantize(&values, 16, Fp4Format::Nv).map_err(TestCaseError::fail)?;
            prop_assert_eq!(q.tensor_scale.to_bits(), t.to_bits());
            prop_assert_eq!(&q.scales, &scales);
            prop_assert_eq!(&q.codes, &codes);
            prop_assert_eq!(bits(&q.dequantize()), bits(&values));
        }

        /// MXFP4 dequantize ∘ quantize is a projection: its outputs are fixed.
        #[test]
        fn mx_quantization_is_idempotent((last_dim, values) in random_tensor(32)) {
            let once = quantize(&values, last_dim, Fp4Format::Mx)
                .map_err(TestCaseError::fail)?
                .dequantize();
            let twice = quantize(&once, last_dim, Fp4Format::Mx)
                .map_err(TestCaseError::fail)?
                .dequantize();
            prop_assert_eq!(bits(&once), bits(&twice));
        }
    }

    // ---- error bounds on arbitrary values ----

    /// Rows of blocks of uniform values in [-1, 1] times a random power of
    /// ten (1e-46 ..= 1e38), each block further scaled down by up to 12
    /// decades, with an optional outlier (up to 9 more decades) and an
    /// optional all-zero block. Magnitudes beyond f32 saturate to f32::MAX.
    fn random_tensor(block: usize) -> impl Strategy<Value = (usize, Vec<f32>)> {
        (1usize..=3, 1usize..=3).prop_flat_map(move |(rows, per_row)| {
            let last_dim = per_row * block;
            let n = rows * last_dim;
            (
                Just(last_dim),
                prop::collection::vec(-1.0f64..=1.0, n),
                -46i32..=38,
                prop::collection::vec(prop_oneof![Just(0i32), -12i32..=0], n / block),
                prop::option::of((0..n, 0i32..=9)),
                prop::option::of(0..n / block),
            )
                .prop_map(
                    move |(last_dim, unit, decade, block_decades, outlier, zero)| {
                        let mut values: Vec<f64> = unit
                            .iter()
                            .enumerate()
                            .map(|(i, u)| u * 10f64.powi(decade + block_decades[i / block]))
                            .collect();
                        if let Some((i, extra)) = outlier {
                            values[i] = values[i].signum().max(0.5) * 10f64.powi(decade + extra);
                        }
                        if let Some(b) = zero {
                            values[b * block..(b + 1) * block].fill(0.0);
                        }
                        let max = f64::from(f32::MAX);
                        let values = values.iter().map(|v| v.clamp(-max, max) as f32).collect();
                        (last_dim, values)
                    },
                )
        })
    }

    /// Small tensors of arbitrary finite f32 bit patterns.
    fn wild_tensor(block: usize) -> impl Strategy<Value = (usize, Vec<f32>)> {
        (1usize..=2, 1usize..=2).prop_flat_map(move |(rows, per_row)| {
            let last_dim = per_row * block;
            (
                Just(last_dim),
                prop::collection::vec(any_finite_f32(), rows * last_dim),
            )
        })
    }

    /// Every element is within the bound, `get` agrees with `dequantize`,
    /// and the bound is not vacuous (the closed forms of the module docs).
    fn check_bound(
        values: &[f32],
        last_dim: usize,
        format: Fp4Format,
    ) -> Result<(), TestCaseError> {
        let q = quantize(values, last_dim, format).map_err(TestCaseError::fail)?;
        let deq = q.dequantize();
        prop_assert_eq!(deq.len(), values.len());
        prop_assert_eq!(q.numel(), values.len());
        for (i, y) in deq.iter().enumerate() {
            prop_assert_eq!(q.get(i).to_bits(), y.to_bits());
        }
        let block = format.block_size();
        let tensor_amax = amax(values);
        // The bound carries X * 2^-20 (up to 2^-18 relative to the envelope
        // terms) and an f32 round-up (an ulp, 2^-149 when subnormal).
        let slack = 1.0 + 1.0 / f64::from(1u32 << 16);
        for (b, (xs, ys)) in values.chunks(block).zip(deq.chunks(block)).enumerate() {
            let block_amax = amax(xs);
            let bound = max_abs_error_bound(format, block_amax, tensor_amax);
            for (j, (&x, &y)) in xs.iter().zip(ys).enumerate() {
                prop_assert!(y.is_finite());
                let err = (f64::from(x) - f64::from(y)).abs();
                prop_assert!(
                    err <= f64::from(bound),
                    "{:?} block {} element {}: x = {:e}, dequantized {:e}, error {:e} > bound {:e}",
                    format,
                    b,
                    j,
                    x,
                    y,
                    err,
                    bound
                );
            }
            let (a, bound) = (f64::from(block_amax), f64::from(bound));
            match format {
                Fp4Format::Mx => {
                    prop_assert!(
                        bound <= (a / 4.0 + pow2(-129)) * slack,
                        "bound {:e}, amax {:e}",
                        bound,
                        a
                    );
                    if (pow2(-124)..=pow2(127)).contains(&a) {
                        prop_assert!(bound <= a / 5.0 * slack, "bound {:e}, amax {:e}", bound, a);
                    }
                }
                Fp4Format::Nv => {
                    let t = f64::from(q.tensor_scale);
                    prop_assert!(
                        bound <= (a / 3.0).max(pow2(-11) * t) * slack + 4.0 * SUBNORMAL_HALF_ULP,
                        "bound {:e}, amax {:e}, tensor scale {:e}",
                        bound,
                        a,
                        t
                    );
                    if f64::from(e4m3_decode(q.scales[b])) >= pow2(-6) {
                        prop_assert!(
                            bound <= a / 5.625 * slack + 4.0 * SUBNORMAL_HALF_ULP,
                            "bound {:e}, amax {:e}, scale byte {:#x}",
                            bound,
                            a,
                            q.scales[b]
                        );
                    }
                }
            }
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn mx_error_within_bound((last_dim, values) in random_tensor(32)) {
            check_bound(&values, last_dim, Fp4Format::Mx)?;
        }

        #[test]
        fn nv_error_within_bound((last_dim, values) in random_tensor(16)) {
            check_bound(&values, last_dim, Fp4Format::Nv)?;
        }

        #[test]
        fn mx_error_within_bound_wild((last_dim, values) in wild_tensor(32)) {
            check_bound(&values, last_dim, Fp4Format::Mx)?;
        }

        #[test]
        fn nv_error_within_bound_wild((last_dim, values) in wild_tensor(16)) {
            check_bound(&values, last_dim, Fp4Format::Nv)?;
        }
    }

    #[test]
    fn extreme_magnitudes() {
        for format in [Fp4Format::Mx, Fp4Format::Nv] {
            let block = format.block_size();
            let mut cases = vec![
                vec![f32::MAX; block],
                vec![-f32::MAX; block],
                vec![f32::from_bits(1); block],
                vec![f32::MIN_POSITIVE; block],
                vec![1.9 * 2.0f32.powi(127); block],
            ];
            let mut mixed = vec![f32::from_bits(1); 2 * block];
            mixed[0] = f32::MAX;
            cases.push(mixed);
            for values in cases {
                check_bound(&values, values.len(), format)
                    .map_err(|e| format!("{e}"))
                    .expect("bound holds");
            }
        }
    }

    /// The bounds are attained (not just loose envelopes): the MXFP4 tie at
    /// `s = 5`, and the NVFP4 clip under a subnormal block scale.
    #[test]
    fn bounds_are_tight() {
        let mut mx = vec![0.0f32; 32];
        mx[0] = 5.0; // scale 1: 5 ties to 4
        let q = quantize(&mx, 32, Fp4Format::Mx).expect("valid input");
        let err = (mx[0] - q.get(0)).abs();
        assert_eq!(err, 1.0);
        let bound = max_abs_error_bound(Fp4Format::Mx, 5.0, 5.0);
        assert!(
            err <= bound && bound <= err * 1.001,
            "error {err}, bound {bound}"
        );

        let mut nv = vec![0.0f32; 32];
        nv[0] = 2688.0; // T = 1
        let x = 8.9 / 512.0; // ratio 1.483 * 2^-9 rounds to scale 2^-9: s = 8.9
        nv[16] = x;
        let q = quantize(&nv, 16, Fp4Format::Nv).expect("valid input");
        assert_eq!(q.scales[1], 0x01);
        assert_eq!(q.get(16), 6.0 / 512.0);
        let err = x - q.get(16);
        let bound = max_abs_error_bound(Fp4Format::Nv, x, 2688.0);
        assert!(
            err <= bound && bound <= err * 1.001,
            "error {err}, bound {bound}"
        );
        assert!(
            err > x / 3.1,
            "the subnormal-scale clip costs about a third"
        );
    }

    /// A block far below the tensor maximum still keeps its shape with the
    /// smallest scale instead of flushing to zero.
    #[test]
    fn nv_tiny_block_gets_smallest_scale() {
        let mut v = vec![0.0f32; 32];
        v[0] = 2688.0; // T = 1
        v[16] = 1e-3 * 6.0 / 512.0; // ratio 1e-3 * 2^-9 rounds to 0
        v[17] = 0.4 * 6.0 / 512.0; // scaled 2.4 -> 2
        let q = quantize(&v, 16, Fp4Format::Nv).expect("valid input");
        assert_eq!(q.scales[1], 0x01);
        assert_eq!(q.get(17), 2.0 / 512.0);
    }
}
