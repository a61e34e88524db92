//! Greedy acceptance of a draft block on the GPU: one tiny kernel compares
//! the drafts with the target's own choices and writes the accepted count
//! and the committed tokens to a small buffer, which is the only thing a
//! speculative step copies back to the host.

use cudarc::driver::CudaFunction;

use crate::cuda_exec::DeviceRange;
use crate::gpu::{Arg, Buffer, Gpu, GpuError, Module};

/// The kernel's name.
pub const KERNEL: &str = "tf_accept_greedy";

/// The kernel. `drafts[i]` is the draft for block position `i + 1`
/// (`i < n`), `target[i]` the target's choice after block position `i`
/// (`i ≤ n`). Writes `out[0] = a`, the longest prefix with
/// `drafts[i] == target[i]`, and `out[1..=a + 1] = target[0..=a]`: the
/// accepted drafts (equal to the target's choices) and the target's own
/// token after them. One thread: a block holds at most a few dozen tokens.
pub const SOURCE: &str = r#"
extern "C" __global__ void __launch_bounds__(32) tf_accept_greedy(
    const int* __restrict__ drafts, const int* __restrict__ target, int n,
    int* __restrict__ out) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  int a = 0;
  while (a < n && drafts[a] == target[a]) ++a;
  out[0] = a;
  for (int i = 0; i <= a; ++i) out[1 + i] = target[i];
}
"#;

/// The compiled kernel and its output buffer.
#[derive(Debug)]
pub struct GreedyAccept {
    gpu: Gpu,
    _module: Module,
    func: CudaFunction,
    out: Buffer,
    max_block: usize,
}

impl GreedyAccept {
    /// Compiles the kernel for `gpu` and allocates room for blocks of up to
    /// `max_block` tokens.
    pub fn new(gpu: &Gpu, max_block: usize) -> Result<GreedyAccept, GpuError> {
        let module = gpu.load(KERNEL, SOURCE, &[])?;
        let func = module.function(KERNEL)?;
        let out = gpu.alloc(4 * (max_block + 1), "the acceptance result")?;
        Ok(GreedyAccept {
            gpu: gpu.clone(),
            _module: module,
            func,
            out,
            max_block,
        })
    }

    /// Issues the comparison of the `n` drafts in `drafts` (`i32[n]`) with
    /// the target's choices in `target` (`i32[≥ n + 1]`) on the stream.
    pub fn enqueue(
        &self,
        drafts: DeviceRange,
        target: DeviceRange,
        n: usize,
    ) -> Result<(), GpuError> {
        if n + 1 > self.max_block || drafts.bytes() < 4 * n || target.bytes() < 4 * (n + 1) {
            return Err(GpuError::Driver(format!(
                "acceptance of {n} drafts: needs {n} draft ids and {} target ids, found {} and {} \
                 bytes, and blocks of at most {} tokens",
                n + 1,
                drafts.bytes(),
                target.bytes(),
                self.max_block
            )));
        }
        let n = i32::try_from(n).map_err(|_| GpuError::Driver("block too large".into()))?;
        self.gpu.launch(
            KERNEL,
            &self.func,
            1,
            32,
            0,
            &[
                Arg::Ptr(drafts.ptr()),
                Arg::Ptr(target.ptr()),
                Arg::I32(n),
                Arg::Ptr(self.out.ptr()),
            ],
        )
    }

    /// Waits for the stream and reads the result of the last
    /// [`GreedyAccept::enqueue`] of `n` drafts: the accepted count `a` and
    /// the `a + 1` committed tokens.
    pub fn read(&self, n: usize) -> Result<(usize, Vec<i32>), GpuError> {
        let b = self.gpu.download_range(&self.out, 0, 4 * (n + 2))?;
        let w: Vec<i32> = b
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let a = usize::try_from(w[0])
            .ok()
            .filter(|&a| a <= n)
            .ok_or_else(|| {
                GpuError::Driver(format!("the acceptance kernel wrote a count of {}", w[0]))
            })?;
        Ok((a, w[1..a + 2].to_vec()))
    }
}
