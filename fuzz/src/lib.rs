//! # tilefuse-fuzz
//!
//! Fuzz harnesses that run on stable Rust (`cargo fuzz` needs a nightly
//! toolchain and libFuzzer): proptest draws inputs, most of them mutations
//! of valid ones, and each target checks that the code under test never
//! panics, never hangs and keeps its memory bounded, whatever the input.
//!
//! - **No panic**: proptest catches a panic, shrinks the input and reports it.
//! - **No hang**: a watchdog thread aborts the process, printing the target
//!   and the input, when one case runs longer than [`HANG_LIMIT`].
//! - **Bounded memory**: the global allocator of any binary linking this
//!   crate ([`Guard`]) refuses any single allocation above [`MAX_ALLOC`] (the
//!   process aborts, naming the size), and a case whose peak of live bytes
//!   grows by more than [`CASE_MEMORY_LIMIT`] fails.
//!
//! Targets ([`targets::ALL`]): `config` (config.json parsing, then the
//! graph it describes), `safetensors` (headers with their offsets, then
//! every tensor's values), `ir_text` (the IR parser and printer),
//! `tokenizer` (arbitrary input bytes through the byte and the shipped
//! tokenizers) and `prompt_ids` (`--prompt-ids`). `cargo test -p
//! tilefuse-fuzz` runs each for a few thousand cases (`TILEFUSE_FUZZ_CASES`
//! sets how many); `cargo run --release -p tilefuse-fuzz -- --cases 1000000`
//! runs long campaigns and prints cases and wall time per target.

use std::alloc::{GlobalAlloc, Layout, System};
use std::fmt::Debug;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner};

pub mod targets;

/// The largest single allocation any input may cause.
pub const MAX_ALLOC: usize = 1 << 30;

/// The most one case may grow the live heap by.
pub const CASE_MEMORY_LIMIT: usize = 256 << 20;

/// The longest one case may run.
pub const HANG_LIMIT: Duration = Duration::from_secs(20);

static LIVE: AtomicUsize = AtomicUsize::new(0);
/// Cases of the running campaign whose input got past the first parse (so
/// the deeper code ran); reported as a measure of coverage.
static DEEP: AtomicUsize = AtomicUsize::new(0);

/// Counts the current case as one that got past the first parse.
pub fn deep() {
    DEEP.fetch_add(1, Ordering::Relaxed);
}
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// The system allocator, counting live bytes and refusing allocations above
/// [`MAX_ALLOC`] (a refused allocation aborts the process with its size).
pub struct Guard;

fn grew(by: usize) {
    let live = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

// SAFETY: every call forwards to `System` with the caller's layout; the
// counters are plain atomics and never allocate.
unsafe impl GlobalAlloc for Guard {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MAX_ALLOC {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MAX_ALLOC {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > MAX_ALLOC {
            return std::ptr::null_mut();
        }
        // SAFETY: `ptr` was allocated by `System` with `layout`.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static GUARD: Guard = Guard;

/// The case being run: when it started, its target, its input.
static CURRENT: Mutex<Option<(Instant, &'static str, String)>> = Mutex::new(None);

/// Starts the watchdog once: it aborts the process when a case outlives
/// [`HANG_LIMIT`], printing the case.
fn watchdog() {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        std::thread::spawn(|| loop {
            std::thread::sleep(Duration::from_millis(200));
            let cur = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((t, target, input)) = cur.as_ref() {
                if t.elapsed() > HANG_LIMIT {
                    eprintln!(
                        "fuzz target `{target}` hangs: one case ran past {HANG_LIMIT:?}; input:\n{input}"
                    );
                    std::process::abort();
                }
            }
        });
    });
}

/// What one campaign did.
#[derive(Clone, Debug)]
pub struct Report {
    /// The target.
    pub target: &'static str,
    /// Cases run.
    pub cases: u32,
    /// Wall time.
    pub seconds: f64,
    /// The largest growth of the live heap in one case, in bytes.
    pub peak_case_bytes: usize,
    /// Cases whose input got past the first parse.
    pub deep: usize,
}

/// Runs `cases` inputs of `strategy` through `check` (which returns `Err`
/// when an invariant of the code under test breaks; the code's own errors
/// are fine). A failure is reported with the shrunk input.
pub fn run<T: Debug + Clone>(
    target: &'static str,
    strategy: impl Strategy<Value = T>,
    cases: u32,
    seed: u64,
    check: impl Fn(&T) -> Result<(), String>,
) -> Result<Report, String> {
    watchdog();
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &bytes);
    let config = Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 20_000,
        ..Config::default()
    };
    let mut runner = TestRunner::new_with_rng(config, rng);
    let peak_case = AtomicUsize::new(0);
    DEEP.store(0, Ordering::Relaxed);
    let t = Instant::now();
    let result = runner.run(&strategy, |input| {
        *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((Instant::now(), target, format!("{input:?}")));
        let base = LIVE.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        let r = check(&input);
        let used = PEAK.load(Ordering::Relaxed).saturating_sub(base);
        *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) = None;
        peak_case.fetch_max(used, Ordering::Relaxed);
        if used > CASE_MEMORY_LIMIT {
            return Err(TestCaseError::fail(format!(
                "one case grew the heap by {} MiB (limit {} MiB)",
                used >> 20,
                CASE_MEMORY_LIMIT >> 20
            )));
        }
        r.map_err(TestCaseError::fail)
    });
    let seconds = t.elapsed().as_secs_f64();
    match result {
        Ok(()) => Ok(Report {
            target,
            cases,
            seconds,
            peak_case_bytes: peak_case.load(Ordering::Relaxed),
            deep: DEEP.load(Ordering::Relaxed),
        }),
        Err(TestError::Fail(why, input)) => Err(format!(
            "fuzz target `{target}` (seed {seed}): {why}\nminimal input: {input:?}"
        )),
        Err(TestError::Abort(why)) => Err(format!("fuzz target `{target}` aborted: {why}")),
    }
}
