//! Acceptance of a draft block on the GPU. Greedy: one tiny kernel compares
//! the drafts with the target's own choices. Temperature sampling: one
//! kernel draws the drafts from the draft's distributions, another applies
//! the acceptance rule to the target's logits. Each writes the accepted
//! count and the committed tokens to a small buffer, which is the only thing
//! a speculative step copies back to the host.

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

/// Waits, reads the first `words` ints of an acceptance result buffer and
/// checks its count `out[0] ≤ n`; returns the count and the words.
fn read_result(
    gpu: &Gpu,
    out: &Buffer,
    n: usize,
    words: usize,
) -> Result<(usize, Vec<i32>), GpuError> {
    let b = gpu.download_range(out, 0, 4 * words)?;
    let w: Vec<i32> = b
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let a = usize::try_from(w[0])
        .ok()
        .filter(|&a| a <= n)
        .ok_or_else(|| {
            GpuError::Driver(format!(
                "the acceptance kernel wrote a count of {} for {n} drafts",
                w[0]
            ))
        })?;
    Ok((a, w))
}

/// Allocates an acceptance result buffer, poisoned (`-1` in every word), so
/// a result the kernel did not write reads as an error.
fn result_buffer(gpu: &Gpu, words: usize) -> Result<Buffer, GpuError> {
    let b = gpu.alloc(4 * words, "the acceptance result")?;
    gpu.memset(&b, 0xff)?;
    Ok(b)
}

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
        let out = result_buffer(gpu, max_block + 1)?;
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
        let (a, w) = read_result(&self.gpu, &self.out, n, n + 2)?;
        Ok((a, w[1..a + 2].to_vec()))
    }
}

/// Threads per block of the sampling kernels (`NT` in their source).
pub const SAMPLING_THREADS: u32 = 512;

/// The sampling kernels' names.
pub const SAMPLE_DRAFTS: &str = "tf_sample_drafts";
/// See [`SAMPLE_DRAFTS`].
pub const ACCEPT_SAMPLED: &str = "tf_accept_sampled";

/// Temperature sampling, computed as the host loop does (`speculative.rs`:
/// `probs`, `draw_index`, `accept`) in f64 with the same counter-based
/// uniforms in the same order, so a seed gives the host loop's tokens up to
/// the order of f64 additions and the last bit of `exp` (a different token
/// only when a uniform falls within rounding of a boundary).
///
/// `tf_sample_drafts`: block `j < n` draws draft `j` from
/// `softmax(draft[j] / t)` with uniform `counter + j` into `drafts[j]`, and
/// flags a NaN row in `drafts[n + j]` (its token reads 0).
/// `tf_accept_sampled` (one block): for `i < n`, rule 0 (rejection) accepts
/// `d_i` with uniform `u` when `q(d) > 0` and `u · q(d) < p(d)`, else draws
/// the bonus from `max(0, p − q)` (from `p` if that is empty) with the next
/// uniform; rule 1 (match the target) draws `y ~ p_i` and accepts while it
/// equals `d_i`; after `n` acceptances the bonus is drawn from `p_n`. Writes
/// `out[0] = a`, `out[1..=a + 1]` the committed tokens, `out[n + 2]` the
/// uniforms used; a token of `-1` marks a NaN row.
pub const SAMPLING_SOURCE: &str = r#"
#define NT 512
__device__ __forceinline__ float tf_uniform(unsigned int seed, unsigned int counter) {
  unsigned long long z = (((unsigned long long)seed) << 32) | counter;
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return (float)(z >> 40) * (1.0f / 16777216.0f);
}

struct Dist {  // softmax(row / t) = exp((l - m) / t) / s
  const float* row; float m; double s;
};

__device__ __forceinline__ double block_sum(double v, double* sh) {
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int o = NT / 2; o > 0; o >>= 1) {
    if (threadIdx.x < o) sh[threadIdx.x] += sh[threadIdx.x + o];
    __syncthreads();
  }
  double r = sh[0];
  __syncthreads();
  return r;
}

// The distribution of `row`; ok = false for a NaN or no finite value.
__device__ __forceinline__ Dist make_dist(const float* row, int V, double t, double* sh, bool* ok) {
  __shared__ float smax[NT];
  __shared__ int snan;
  if (threadIdx.x == 0) snan = 0;
  __syncthreads();
  float m = -__int_as_float(0x7f800000);
  for (int i = threadIdx.x; i < V; i += NT) {
    float x = row[i];
    if (x != x) snan = 1; else m = fmaxf(m, x);
  }
  smax[threadIdx.x] = m;
  __syncthreads();
  for (int o = NT / 2; o > 0; o >>= 1) {
    if (threadIdx.x < o) smax[threadIdx.x] = fmaxf(smax[threadIdx.x], smax[threadIdx.x + o]);
    __syncthreads();
  }
  m = smax[0];
  bool good = !snan && isfinite(m);
  __syncthreads();
  double e = 0.0;
  if (good)
    for (int i = threadIdx.x; i < V; i += NT) e += exp(((double)row[i] - (double)m) / t);
  double s = block_sum(e, sh);
  *ok = good;
  Dist d; d.row = row; d.m = m; d.s = s;
  return d;
}

__device__ __forceinline__ double prob(const Dist& d, int i, double t) {
  return exp(((double)d.row[i] - (double)d.m) / t) / d.s;
}

// Weights: p (q == 0) or max(0, p - q).
__device__ __forceinline__ double weight(const Dist& p, const Dist* q, int i, double t) {
  double w = prob(p, i, t);
  if (q) w = fmax(0.0, w - prob(*q, i, t));
  return w;
}

// Inverse-CDF draw as draw_index: the first index whose running sum exceeds
// u * total, else the last index with positive weight (0 if none).
__device__ __forceinline__ int draw(const Dist& p, const Dist* q, int V, double t, double u, double* sh, double* total_out) {
  __shared__ double chunk[NT];
  __shared__ int found;
  const int C = (V + NT - 1) / NT;
  const int lo = min(V, threadIdx.x * C), hi = min(V, lo + C);
  double cs = 0.0;
  int lastpos = -1;
  for (int i = lo; i < hi; ++i) {
    double w = weight(p, q, i, t);
    cs += w;
    if (w > 0.0) lastpos = i;
  }
  chunk[threadIdx.x] = cs;
  if (threadIdx.x == 0) found = 0x7fffffff;
  __syncthreads();
  if (threadIdx.x == 0) {  // exclusive prefix in index order
    double acc = 0.0;
    for (int k = 0; k < NT; ++k) { double c = chunk[k]; chunk[k] = acc; acc += c; }
    sh[0] = acc;
  }
  __syncthreads();
  const double total = sh[0];
  const double target = u * total;
  if (total_out) *total_out = total;
  if (chunk[threadIdx.x] + cs > target && hi > lo) atomicMin(&found, (int)threadIdx.x);
  __syncthreads();
  __shared__ int result;
  if (threadIdx.x == 0) result = -1;
  __syncthreads();
  if ((int)threadIdx.x == found) {
    double cum = chunk[threadIdx.x];
    int r = -1;
    for (int i = lo; i < V && r < 0; ++i) {
      cum += weight(p, q, i, t);
      if (cum > target) r = i;
    }
    result = r;
  }
  __syncthreads();
  // Fallback (rounding): the last index with positive weight.
  __shared__ int last;
  if (threadIdx.x == 0) last = -1;
  __syncthreads();
  if (result < 0 && lastpos >= 0) atomicMax(&last, lastpos);
  __syncthreads();
  int r = result >= 0 ? result : (last >= 0 ? last : 0);
  __syncthreads();
  return r;
}

extern "C" __global__ void __launch_bounds__(NT, 1) tf_sample_drafts(
    const float* __restrict__ draft, int V, float temperature, unsigned int seed,
    unsigned int counter, int* __restrict__ drafts) {
  __shared__ double sh[NT];
  const int j = blockIdx.x;
  const double t = (double)temperature;
  bool ok;
  Dist q = make_dist(draft + (size_t)j * V, V, t, sh, &ok);
  double u = (double)tf_uniform(seed, counter + j);
  int d = ok ? draw(q, nullptr, V, t, u, sh, nullptr) : -1;
  // drafts[0..n) feed the verify, so a NaN row gives token 0 there and a
  // flag in drafts[n + j] that the acceptance kernel reports.
  if (threadIdx.x == 0) { drafts[j] = d < 0 ? 0 : d; drafts[gridDim.x + j] = d < 0; }
}

extern "C" __global__ void __launch_bounds__(NT, 1) tf_accept_sampled(
    const float* __restrict__ draft, const float* __restrict__ target,
    const int* __restrict__ drafts, int n, int V, float temperature, unsigned int seed,
    unsigned int counter, int rule, int* __restrict__ out) {
  __shared__ double sh[NT];
  const double t = (double)temperature;
  // A NaN draft row is an error, as in the host loop, whichever row it is.
  for (int i = 0; i < n; ++i)
    if (drafts[n + i]) {
      if (threadIdx.x == 0) { out[0] = 0; out[1] = -1; out[n + 2] = 0; }
      return;
    }
  unsigned int c = counter;
  int a = n, bonus = -1;
  for (int i = 0; i < n; ++i) {
    bool okp, okq;
    Dist p = make_dist(target + (size_t)i * V, V, t, sh, &okp);
    if (!okp) { a = i; bonus = -1; break; }
    const int d = drafts[i];
    if (rule == 1) {
      double u = (double)tf_uniform(seed, c++);
      int y = draw(p, nullptr, V, t, u, sh, nullptr);
      if (y != d) { a = i; bonus = y; break; }
      continue;
    }
    Dist q = make_dist(draft + (size_t)i * V, V, t, sh, &okq);
    const double qd = (okq && d >= 0 && d < V) ? prob(q, d, t) : 0.0;
    const double pd = (d >= 0 && d < V) ? prob(p, d, t) : 0.0;
    double u = (double)tf_uniform(seed, c++);
    if (qd > 0.0 && u * qd < pd) continue;
    u = (double)tf_uniform(seed, c++);
    double total;
    int r = draw(p, okq ? &q : nullptr, V, t, u, sh, &total);
    if (!(total > 0.0)) r = draw(p, nullptr, V, t, u, sh, nullptr);
    a = i; bonus = r;
    break;
  }
  if (a == n) {
    bool okp;
    Dist p = make_dist(target + (size_t)n * V, V, t, sh, &okp);
    double u = (double)tf_uniform(seed, c++);
    bonus = okp ? draw(p, nullptr, V, t, u, sh, nullptr) : -1;
  }
  if (threadIdx.x == 0) {
    out[0] = a;
    for (int i = 0; i < a; ++i) out[1 + i] = drafts[i];
    out[1 + a] = bonus;
    out[n + 2] = (int)(c - counter);
  }
}
"#;

/// The sampling kernels and their buffers.
#[derive(Debug)]
pub struct SampledAccept {
    gpu: Gpu,
    _module: Module,
    sample: CudaFunction,
    accept: CudaFunction,
    drafts: Buffer,
    out: Buffer,
    max_block: usize,
}

/// Temperature, seed and the counter of the step's first uniform.
#[derive(Clone, Copy, Debug)]
pub struct Draws {
    /// Temperature (> 0).
    pub temperature: f32,
    /// Seed.
    pub seed: u32,
    /// Counter of the first uniform.
    pub counter: u32,
}

impl SampledAccept {
    /// Compiles the kernels for `gpu`, for blocks of up to `max_block` tokens.
    pub fn new(gpu: &Gpu, max_block: usize) -> Result<SampledAccept, GpuError> {
        let module = gpu.load("tf_sampled_accept", SAMPLING_SOURCE, &[])?;
        let sample = module.function(SAMPLE_DRAFTS)?;
        let accept = module.function(ACCEPT_SAMPLED)?;
        let drafts = gpu.alloc(4 * 2 * max_block.max(1), "the sampled drafts")?;
        let out = result_buffer(gpu, max_block + 3)?;
        Ok(SampledAccept {
            gpu: gpu.clone(),
            _module: module,
            sample,
            accept,
            drafts,
            out,
            max_block,
        })
    }

    fn check(&self, n: usize, rows: &[(DeviceRange, usize)], vocab: usize) -> Result<(), GpuError> {
        for &(r, want) in rows {
            if r.dtype() != tilefuse_ir::DType::F32 || r.bytes() < 4 * want * vocab {
                return Err(GpuError::Driver(format!(
                    "sampled acceptance needs {want} f32 logits rows of {vocab}, found {} bytes of {}",
                    r.bytes(),
                    r.dtype()
                )));
            }
        }
        if n + 1 > self.max_block {
            return Err(GpuError::Driver(format!(
                "a block of {} tokens is larger than the {} the kernels were set up for",
                n + 1,
                self.max_block
            )));
        }
        Ok(())
    }

    /// Issues the draws of `n` drafts from the draft logits rows `draft`
    /// (`f32[n, vocab]`); returns where the drafts will be (`i32[n]`).
    pub fn enqueue_drafts(
        &self,
        draft: DeviceRange,
        n: usize,
        vocab: usize,
        d: Draws,
    ) -> Result<DeviceRange, GpuError> {
        self.check(n, &[(draft, n)], vocab)?;
        let whole = DeviceRange::whole(
            &self.drafts,
            tilefuse_ir::DType::I32,
            2 * self.max_block.max(1),
        );
        if n == 0 {
            return whole
                .rows_range(0, 0)
                .map_err(|e| GpuError::Driver(e.to_string()));
        }
        self.gpu.launch(
            SAMPLE_DRAFTS,
            &self.sample,
            n as u32,
            SAMPLING_THREADS,
            0,
            &[
                Arg::Ptr(draft.ptr()),
                Arg::I32(vocab as i32),
                Arg::F32(d.temperature),
                Arg::I32(d.seed as i32),
                Arg::I32(d.counter as i32),
                Arg::Ptr(self.drafts.ptr()),
            ],
        )?;
        whole
            .rows_range(0, n)
            .map_err(|e| GpuError::Driver(e.to_string()))
    }

    /// Issues the acceptance of the `n` drafts of the last
    /// [`SampledAccept::enqueue_drafts`] against the target logits rows
    /// `target` (`f32[n + 1, vocab]`); `rule` 0 is the rejection rule, 1
    /// matching the target's own draws; `d.counter` is the first uniform
    /// after the drafts'.
    #[allow(clippy::too_many_arguments)]
    pub fn enqueue_accept(
        &self,
        draft: DeviceRange,
        target: DeviceRange,
        n: usize,
        vocab: usize,
        rule: i32,
        d: Draws,
    ) -> Result<(), GpuError> {
        self.check(n, &[(draft, n), (target, n + 1)], vocab)?;
        self.gpu.launch(
            ACCEPT_SAMPLED,
            &self.accept,
            1,
            SAMPLING_THREADS,
            0,
            &[
                Arg::Ptr(draft.ptr()),
                Arg::Ptr(target.ptr()),
                Arg::Ptr(self.drafts.ptr()),
                Arg::I32(n as i32),
                Arg::I32(vocab as i32),
                Arg::F32(d.temperature),
                Arg::I32(d.seed as i32),
                Arg::I32(d.counter as i32),
                Arg::I32(rule),
                Arg::Ptr(self.out.ptr()),
            ],
        )
    }

    /// Waits and reads the result for `n` drafts: the accepted count, the
    /// committed tokens and the uniforms the acceptance used. An error names
    /// a NaN row.
    pub fn read(&self, n: usize) -> Result<(usize, Vec<i32>, u32), GpuError> {
        let (a, w) = read_result(&self.gpu, &self.out, n, n + 3)?;
        let toks = w[1..a + 2].to_vec();
        if toks.iter().any(|&t| t < 0) {
            return Err(GpuError::Driver(
                "no token can be drawn: the draft or target logits are NaN or all -inf".into(),
            ));
        }
        Ok((a, toks, w[n + 2] as u32))
    }
}
