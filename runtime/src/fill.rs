//! Seeded random weights made on the GPU, for benchmarks at real widths.
//!
//! Each weight slot is filled by one launch of a small kernel with values of
//! the right scale for its role (the same classes as the model presets use
//! on the host): norm weights `1 + U(±0.17)`, sinks and the correction bias
//! of standard deviation 0.5 and 0.1, embeddings 1, matrices `1/sqrt(in)`.
//! Values are uniform with that standard deviation (not normal): benchmarks
//! need the magnitudes, not the distribution. FP4 slots get uniform random
//! codes and a power-of-two (MX) or E4M3 (NV) block scale of the same
//! magnitude; FP8 values are encoded from the same uniform.

use tilefuse_codegen::plan::Plan;
use tilefuse_ir::DType;

use crate::gpu::{Arg, Buffer, Gpu, GpuError};

const SOURCE: &str = r#"
#include "prelude.cuh"
// Counter-based uniform in [0, 1): the IR's splitmix64 draw.
__device__ __forceinline__ float u01(uint32_t seed, uint32_t i) { return tf::uniform01(seed, i); }

// kind 0: f32, 1: bf16, 2: f16, 3: e4m3 (via float), 4: bytes (FP4 codes), 5: e8m0 scales, 6: e4m3 scales
extern "C" __global__ void tf_fill(char* p, long long n, int kind, unsigned seed, float mean, float stdev, int scale_byte) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float u = u01(seed, (uint32_t)i) - 0.5f;
        const float v = mean + u * 3.4641016f * stdev;  // sqrt(12): unit variance
        switch (kind) {
            case 0: reinterpret_cast<float*>(p)[i] = v; break;
            case 1: reinterpret_cast<tf::bf16*>(p)[i] = __float2bfloat16_rn(v); break;
            case 2: reinterpret_cast<__half*>(p)[i] = __float2half_rn(v); break;
            case 3: {
                // Nearest of a few E4M3 magnitudes is enough for timing: exponent from |v|.
                const float a = fminf(fabsf(v), 448.0f);
                int e = a > 0.f ? (int)floorf(log2f(a)) : -7;
                e = max(-6, min(8, e));
                const uint32_t m = (uint32_t)fminf(7.f, floorf((a / exp2f((float)e) - 1.f) * 8.f));
                p[i] = (char)(((v < 0.f) ? 0x80u : 0u) | ((uint32_t)(e + 7) << 3) | m);
                break;
            }
            case 4: p[i] = (char)(uint32_t)(u01(seed ^ 0x9e3779b9u, (uint32_t)i) * 256.0f); break;
            case 5: case 6: p[i] = (char)scale_byte; break;
        }
    }
}
"#;

fn class(name: &str, shape: &[usize]) -> (f32, f32) {
    let last = *shape.last().unwrap_or(&1) as f32;
    if name.ends_with("norm.weight") {
        (1.0, 0.1)
    } else if name.ends_with(".sinks") {
        (0.0, 0.5)
    } else if name.ends_with("e_score_correction_bias") {
        (0.0, 0.1)
    } else if name.ends_with("embed_tokens.weight") {
        (0.0, 1.0)
    } else {
        (0.0, last.powf(-0.5))
    }
}

/// Fills the weight buffer of `plan` with seeded random values on the GPU.
pub fn random_weights(gpu: &Gpu, plan: &Plan, buf: &mut Buffer, seed: u64) -> Result<(), GpuError> {
    let module = gpu.load("tf_fill", SOURCE, tilefuse_codegen::cuda::HEADERS)?;
    let f = module.function("tf_fill")?;
    let base = buf.ptr();
    for (i, w) in plan.weights.iter().enumerate() {
        let n: usize = w.shape.iter().product();
        let (mean, std) = class(&w.name, &w.shape);
        let s = (seed as u32) ^ (i as u32).wrapping_mul(0x9E37_79B9);
        let launch = |ptr: u64, count: usize, kind: i32, sb: i32, s: u32| {
            let grid = (count as u64).div_ceil(256).clamp(1, 4096) as u32;
            gpu.launch(
                "tf_fill",
                &f,
                grid,
                256,
                0,
                &[
                    Arg::Ptr(ptr),
                    Arg::I64(count as i64),
                    Arg::I32(kind),
                    Arg::I32(s as i32),
                    Arg::F32(mean),
                    Arg::F32(std),
                    Arg::I32(sb),
                ],
            )
        };
        let ptr = base + w.offset as u64;
        match w.dtype {
            DType::F32 => launch(ptr, n, 0, 0, s)?,
            DType::BF16 => launch(ptr, n, 1, 0, s)?,
            DType::F16 => launch(ptr, n, 2, 0, s)?,
            DType::F8E4M3 => launch(ptr, n, 3, 0, s)?,
            DType::MXFP4 | DType::NVFP4 => {
                launch(ptr, n / 2, 4, 0, s)?;
                // Uniform codes have a mean magnitude near 2.4: a block scale of
                // std/2 gives values of about the wanted standard deviation.
                let target = (std / 2.0).max(1e-30);
                let (block, kind, sb) = if w.dtype == DType::MXFP4 {
                    (32, 5, (target.log2().round() as i32 + 127).clamp(1, 254))
                } else {
                    (16, 6, i32::from(tilefuse_ir::fp4::e4m3_encode(target)))
                };
                if let Some(so) = w.scales_offset {
                    launch(base + so as u64, n / block, kind, sb, s)?;
                }
                if let Some(ts) = w.tensor_scale_offset {
                    let mut b = Vec::new();
                    b.extend(1.0f32.to_le_bytes());
                    gpu.write(buf, ts, &b)?;
                }
            }
            DType::I32 => {
                return Err(GpuError::Driver(format!(
                    "weight \"{}\" has dtype i32; no random fill for it",
                    w.name
                )))
            }
        }
    }
    gpu.sync("filling random weights")
}

/// Fills every KV cache of `plan` with seeded random values of standard deviation 1.
pub fn random_caches(gpu: &Gpu, plan: &Plan, buf: &mut Buffer, seed: u64) -> Result<(), GpuError> {
    let module = gpu.load("tf_fill", SOURCE, tilefuse_codegen::cuda::HEADERS)?;
    let f = module.function("tf_fill")?;
    for (i, c) in plan.caches.iter().enumerate() {
        let n: usize = c.shape.iter().product();
        let kind = match c.dtype {
            DType::F32 => 0,
            DType::BF16 => 1,
            DType::F16 => 2,
            d => {
                return Err(GpuError::Driver(format!(
                    "cache \"{}\" has dtype {d}; no random fill for it",
                    c.name
                )))
            }
        };
        gpu.launch(
            "tf_fill",
            &f,
            (n as u64).div_ceil(256).clamp(1, 4096) as u32,
            256,
            0,
            &[
                Arg::Ptr(buf.ptr() + c.offset as u64),
                Arg::I64(n as i64),
                Arg::I32(kind),
                Arg::I32((seed as u32 ^ (i as u32).wrapping_mul(0x85EB_CA6B)) as i32),
                Arg::F32(0.0),
                Arg::F32(1.0),
                Arg::I32(0),
            ],
        )?;
    }
    gpu.sync("filling random caches")
}
