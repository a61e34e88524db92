//! Element types, including the block-quantized FP4 formats.

use std::fmt;
use std::str::FromStr;

/// The element type of a tensor.
///
/// Float and integer types hold one value per element. The block-quantized
/// formats hold E2M1 codes (two per byte) plus one scale per block of
/// consecutive elements along the last axis (see [`crate::fp4`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16: the top half of an f32.
    BF16,
    /// FP8 E4M3 (the OCP "fn" variant: no infinities, max 448).
    F8E4M3,
    /// 32-bit signed integer (token ids, expert indices, positions).
    I32,
    /// OCP MX FP4: E2M1 codes, one E8M0 (power of two) scale per 32 elements.
    MXFP4,
    /// NVIDIA FP4: E2M1 codes, one E4M3 scale per 16 elements, one f32 scale per tensor.
    NVFP4,
}

impl DType {
    /// Every dtype, in a stable order.
    pub const ALL: [DType; 7] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::F8E4M3,
        DType::I32,
        DType::MXFP4,
        DType::NVFP4,
    ];

    /// The name used by the printer and the parser.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F8E4M3 => "f8e4m3",
            DType::I32 => "i32",
            DType::MXFP4 => "mxfp4",
            DType::NVFP4 => "nvfp4",
        }
    }

    /// Floating-point values stored one per element (f32, f16, bf16, fp8).
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16 | DType::F8E4M3)
    }

    /// Block-quantized (MXFP4 or NVFP4).
    pub fn is_block_quantized(self) -> bool {
        matches!(self, DType::MXFP4 | DType::NVFP4)
    }

    /// Types an activation (the output of a compute op) may have.
    pub fn is_activation(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }

    /// Elements per scale block along the last axis, for block-quantized types.
    pub fn block_size(self) -> Option<usize> {
        match self {
            DType::MXFP4 => Some(32),
            DType::NVFP4 => Some(16),
            _ => None,
        }
    }

    /// Storage bits per element, scales included (4.25 for MXFP4, 4.5 for NVFP4,
    /// not counting NVFP4's single per-tensor f32).
    pub fn bits_per_element(self) -> f64 {
        match self {
            DType::F32 | DType::I32 => 32.0,
            DType::F16 | DType::BF16 => 16.0,
            DType::F8E4M3 => 8.0,
            DType::MXFP4 => 4.0 + 8.0 / 32.0,
            DType::NVFP4 => 4.0 + 8.0 / 16.0,
        }
    }

    /// Bytes needed to store `numel` elements whose last axis has `last_dim`
    /// elements. For block-quantized types `last_dim` must be a multiple of the
    /// block size; `None` otherwise.
    pub fn storage_bytes(self, numel: usize, last_dim: usize) -> Option<usize> {
        match self {
            DType::F32 | DType::I32 => Some(numel * 4),
            DType::F16 | DType::BF16 => Some(numel * 2),
            DType::F8E4M3 => Some(numel),
            DType::MXFP4 | DType::NVFP4 => {
                let block = self.block_size()?;
                if !last_dim.is_multiple_of(block) || !numel.is_multiple_of(2) {
                    return None;
                }
                let tensor_scale = if self == DType::NVFP4 { 4 } else { 0 };
                Some(numel / 2 + numel / block + tensor_scale)
            }
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DType::ALL
            .into_iter()
            .find(|d| d.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = DType::ALL.iter().map(|d| d.name()).collect();
                format!("unknown dtype `{s}`; expected one of {}", names.join(", "))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_sizes() {
        // One MiMo-V2 expert matrix 2048 x 4096 in MXFP4: 4 MiB of codes + 256 KiB of scales.
        let n = 2048 * 4096;
        assert_eq!(DType::MXFP4.storage_bytes(n, 4096), Some(n / 2 + n / 32));
        assert_eq!(
            DType::NVFP4.storage_bytes(n, 4096),
            Some(n / 2 + n / 16 + 4)
        );
        assert_eq!(DType::BF16.storage_bytes(n, 4096), Some(2 * n));
        assert_eq!(DType::MXFP4.storage_bytes(48, 48), None);
        assert_eq!(DType::MXFP4.bits_per_element(), 4.25);
        assert_eq!(DType::NVFP4.bits_per_element(), 4.5);
    }

    #[test]
    fn names_round_trip() {
        for d in DType::ALL {
            assert_eq!(d.name().parse::<DType>(), Ok(d));
        }
        assert!("fp4".parse::<DType>().unwrap_err().contains("mxfp4"));
    }
}
