//! A thin layer over the CUDA driver (through cudarc): the device, modules
//! compiled by [`crate::nvrtc`], raw buffers and launches.
//!
//! Everything runs on one stream in issue order, so buffers are plain device
//! pointers and cudarc's per-buffer event tracking is switched off.

use std::fmt;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute_enum};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr};
use cudarc::nvrtc::Ptx;

use crate::nvrtc::{self, CompileError, CompileOptions, Compiled};

/// A GPU failure, with what was being done.
#[derive(Clone, Debug)]
pub enum GpuError {
    /// A driver call failed.
    Driver(String),
    /// A kernel failed to compile.
    Compile(CompileError),
    /// Not enough device memory.
    OutOfMemory {
        /// What the allocation was for.
        what: String,
        /// Bytes asked.
        asked: usize,
        /// Bytes free on the device when asked.
        free: usize,
    },
}

impl fmt::Display for GpuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GpuError::Driver(m) => f.write_str(m),
            GpuError::Compile(e) => write!(f, "{e}"),
            GpuError::OutOfMemory { what, asked, free } => write!(
                f,
                "out of GPU memory allocating {what}: asked {:.1} MiB, {:.1} MiB free; \
                 use a smaller model, fewer layers or a shorter context",
                *asked as f64 / 1048576.0,
                *free as f64 / 1048576.0
            ),
        }
    }
}

impl std::error::Error for GpuError {}

impl From<CompileError> for GpuError {
    fn from(e: CompileError) -> GpuError {
        GpuError::Compile(e)
    }
}

fn drv<T>(r: Result<T, cudarc::driver::DriverError>, what: &str) -> Result<T, GpuError> {
    r.map_err(|e| GpuError::Driver(format!("{what}: {e:?}")))
}

/// Page-locked host memory that small writes are staged in, so that their
/// copies are asynchronous: the host can issue a whole forward, or a whole
/// speculative step, without waiting for the GPU (a copy from pageable
/// memory may wait for the stream). A region is handed out again only after
/// the host has waited for the stream, when every copy from it is done.
struct Staging {
    stream: Arc<CudaStream>,
    ptr: *mut u8,
    cap: usize,
    head: usize,
}

// SAFETY: the pointer is a page-locked allocation owned by this value and
// only touched under the mutex that holds it.
unsafe impl Send for Staging {}

impl Staging {
    /// Bytes of page-locked memory per stream.
    const BYTES: usize = 1 << 20;

    fn new(stream: &Arc<CudaStream>) -> Staging {
        // SAFETY: a plain allocation; on failure the staging is empty and
        // every write takes the pageable path.
        let ptr = unsafe { cudarc::driver::result::malloc_host(Staging::BYTES, 0) };
        let (ptr, cap) = match ptr {
            Ok(p) => (p.cast::<u8>(), Staging::BYTES),
            Err(_) => (std::ptr::null_mut(), 0),
        };
        Staging {
            stream: stream.clone(),
            ptr,
            cap,
            head: 0,
        }
    }

    /// Copies `data` into a free region and returns it, or `None` when it
    /// does not fit until the next wait.
    fn stage(&mut self, data: &[u8]) -> Option<&[u8]> {
        let start = self.head.next_multiple_of(64);
        if self.ptr.is_null() || data.len() > self.cap / 4 || start + data.len() > self.cap {
            return None;
        }
        // SAFETY: start + len lies inside the allocation; no copy in flight
        // reads this region (regions are reused only after a stream wait).
        let region = unsafe {
            let dst = self.ptr.add(start);
            std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len());
            std::slice::from_raw_parts(dst, data.len())
        };
        self.head = start + data.len();
        Some(region)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.ptr.is_null() {
            // Copies from the staging memory must finish before it is freed.
            let _ = self.stream.synchronize();
            // SAFETY: allocated by malloc_host, freed once.
            let _ = unsafe { cudarc::driver::result::free_host(self.ptr.cast()) };
        }
    }
}

impl fmt::Debug for Staging {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Staging")
            .field("cap", &self.cap)
            .field("head", &self.head)
            .finish()
    }
}

/// The GPU: a context and its stream.
#[derive(Clone, Debug)]
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    staging: Arc<Mutex<Staging>>,
    /// NVRTC target, e.g. `sm_90a`.
    pub arch: String,
    /// Streaming multiprocessors.
    pub sms: u32,
    /// Device name.
    pub name: String,
}

/// A device buffer of bytes.
#[derive(Debug)]
pub struct Buffer {
    slice: CudaSlice<u8>,
    ptr: u64,
}

impl Buffer {
    /// The device address.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.slice.len()
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.slice.len() == 0
    }
}

/// The offset table a generated kernel takes by value (`tf::Offsets`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offsets(pub [i64; 32]);

impl Offsets {
    /// A table from the first offsets (the rest zero).
    pub fn new(v: &[i64]) -> Offsets {
        let mut o = [0i64; 32];
        for (d, s) in o.iter_mut().zip(v) {
            *d = *s;
        }
        Offsets(o)
    }
}

// SAFETY: a plain array of i64, laid out as the C struct `tf::Offsets { long long v[32]; }`.
unsafe impl cudarc::driver::DeviceRepr for Offsets {}

/// A kernel argument. (An offset table is 256 bytes; arguments live on the
/// stack for the duration of one launch, so the size difference is harmless.)
#[derive(Clone, Copy, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Arg {
    /// An offset table, by value.
    Offsets(Offsets),
    /// A device pointer.
    Ptr(u64),
    /// An `int`.
    I32(i32),
    /// A `long long`.
    I64(i64),
    /// A `float`.
    F32(f32),
}

/// A loaded module with its compile report.
#[derive(Debug)]
pub struct Module {
    module: Arc<CudaModule>,
    /// The compile result (log, resources).
    pub compiled: Compiled,
}

impl Module {
    /// A kernel of the module by its `extern "C"` name.
    pub fn function(&self, name: &str) -> Result<CudaFunction, GpuError> {
        drv(
            self.module.load_function(name),
            &format!("loading kernel `{name}`"),
        )
    }
}

impl Gpu {
    /// Opens device 0. `Ok(None)` when this machine has no CUDA driver or no GPU.
    pub fn open() -> Result<Option<Gpu>, GpuError> {
        if !Gpu::available() {
            return Ok(None);
        }
        let ctx = drv(CudaContext::new(0), "creating a CUDA context on device 0")?;
        // SAFETY: called before any buffer exists; every launch goes to the one stream.
        unsafe { ctx.disable_event_tracking() };
        let stream = drv(ctx.new_stream(), "creating a stream")?;
        let major = drv(
            ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
            "reading the compute capability",
        )?;
        let minor = drv(
            ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
            "reading the compute capability",
        )?;
        let sms = drv(
            ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT),
            "reading the SM count",
        )?;
        let name = drv(ctx.name(), "reading the device name")?;
        let arch = if major == 9 && minor == 0 {
            "sm_90a".to_string()
        } else {
            format!("sm_{major}{minor}")
        };
        let staging = Arc::new(Mutex::new(Staging::new(&stream)));
        Ok(Some(Gpu {
            ctx,
            stream,
            staging,
            arch,
            sms: sms as u32,
            name,
        }))
    }

    /// True when a CUDA driver and at least one device are present (no
    /// context is created: choosing a backend costs nothing).
    pub fn available() -> bool {
        // SAFETY: probing for the driver library has no preconditions.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return false;
        }
        matches!(
            cudarc::driver::result::init().and_then(|_| cudarc::driver::result::device::get_count()),
            Ok(n) if n > 0
        )
    }

    /// The one-line message a GPU test prints when it skips.
    pub const SKIP: &'static str = "skipped: no CUDA GPU on this machine";

    /// True when `TILEFUSE_REQUIRE_GPU` is set (to anything but empty or
    /// `0`): a run on a GPU machine sets it so that a missing GPU fails every
    /// GPU test instead of letting it skip.
    pub fn required() -> bool {
        std::env::var_os("TILEFUSE_REQUIRE_GPU").is_some_and(|v| !v.is_empty() && v != "0")
    }

    /// The one place a GPU test skips: prints [`Gpu::SKIP`] followed by
    /// `note`, or panics when [`Gpu::required`] (the GPU was required and is
    /// missing, so the run must fail).
    pub fn skip(note: &str) {
        if Gpu::required() {
            panic!(
                "TILEFUSE_REQUIRE_GPU is set but this machine has no CUDA GPU (no driver or no \
                 device), so this GPU test cannot run; run it on a machine with a GPU, or unset \
                 TILEFUSE_REQUIRE_GPU to let GPU tests skip"
            );
        }
        println!("{}{note}", Gpu::SKIP);
    }

    /// Opens the GPU for a test: `None` after [`Gpu::skip`] when there is
    /// none (a panic when the GPU is required); a GPU that is present but
    /// fails to open is always a panic.
    pub fn open_or_skip() -> Option<Gpu> {
        match Gpu::open() {
            Ok(Some(g)) => Some(g),
            Ok(None) => {
                Gpu::skip("");
                None
            }
            Err(e) => panic!("a CUDA GPU is present but cannot be opened: {e}"),
        }
    }

    /// [`Gpu::available`] for a test: `false` after [`Gpu::skip`] when there
    /// is no GPU (a panic when the GPU is required).
    pub fn available_or_skip() -> bool {
        if Gpu::available() {
            return true;
        }
        Gpu::skip("");
        false
    }

    /// Compiles `source` for this device and loads it.
    pub fn load(
        &self,
        name: &str,
        source: &str,
        headers: &[(&str, &str)],
    ) -> Result<Module, GpuError> {
        let opts = CompileOptions {
            arch: self.arch.clone(),
            ..CompileOptions::default()
        };
        let compiled = nvrtc::compile(name, source, headers, &opts)?;
        let module = drv(
            self.ctx
                .load_module(Ptx::from_binary(compiled.cubin.clone())),
            &format!("loading the module of `{name}`"),
        )?;
        Ok(Module { module, compiled })
    }

    /// Free and total device memory in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize), GpuError> {
        drv(self.ctx.mem_get_info(), "reading free memory")
    }

    /// Allocates `bytes` (content undefined); the error names `what`.
    pub fn alloc(&self, bytes: usize, what: &str) -> Result<Buffer, GpuError> {
        let (free, _) = self.mem_info()?;
        if bytes > free {
            return Err(GpuError::OutOfMemory {
                what: what.to_string(),
                asked: bytes,
                free,
            });
        }
        // SAFETY: the buffer is written before it is read by every user of this API
        // (uploads, or poison fills in tests).
        let slice = unsafe { self.stream.alloc::<u8>(bytes.max(1)) }.map_err(|e| {
            GpuError::OutOfMemory {
                what: format!("{what} ({e:?})"),
                asked: bytes,
                free,
            }
        })?;
        let ptr = slice.device_ptr(&self.stream).0;
        Ok(Buffer { slice, ptr })
    }

    /// Copies host bytes into a new buffer.
    pub fn upload(&self, data: &[u8], what: &str) -> Result<Buffer, GpuError> {
        let mut b = self.alloc(data.len(), what)?;
        drv(
            self.stream.memcpy_htod(data, &mut b.slice),
            &format!("uploading {what}"),
        )?;
        Ok(b)
    }

    /// Copies host bytes into an existing buffer at `offset`.
    pub fn write(&self, buf: &mut Buffer, offset: usize, data: &[u8]) -> Result<(), GpuError> {
        let end = offset + data.len();
        if end > buf.len() {
            return Err(GpuError::Driver(format!(
                "write of {} bytes at {offset} past the end of a {}-byte buffer",
                data.len(),
                buf.len()
            )));
        }
        // The lock is held while the copy is issued, so a wait (which holds
        // it too) either covers this copy or comes after it.
        if let Ok(mut st) = self.staging.lock() {
            if let Some(src) = st.stage(data) {
                drv(self.ctx.bind_to_thread(), "binding the CUDA context")?;
                // SAFETY: the destination lies inside the buffer (checked above);
                // the source is page-locked staging memory that stays untouched
                // until the host next waits for the stream.
                return drv(
                    unsafe {
                        cudarc::driver::result::memcpy_htod_async(
                            buf.ptr + offset as u64,
                            src,
                            self.stream.cu_stream(),
                        )
                    },
                    "copying to the GPU",
                );
            }
        }
        let mut view = buf.slice.slice_mut(offset..end);
        drv(
            self.stream.memcpy_htod(data, &mut view),
            "copying to the GPU",
        )
    }

    /// Runs `wait`, which waits for the stream when `covers` (a copy to
    /// pageable host memory returns only once it and all earlier work on
    /// the stream are done); then every staged copy is done and the staging
    /// memory is free again. The staging lock is held throughout, so no
    /// copy is staged between the wait and the release.
    fn waiting<T>(
        &self,
        covers: bool,
        wait: impl FnOnce() -> Result<T, GpuError>,
    ) -> Result<T, GpuError> {
        let guard = self.staging.lock();
        let r = wait()?;
        if let (true, Ok(mut st)) = (covers, guard) {
            st.head = 0;
        }
        Ok(r)
    }

    /// Copies a whole buffer back to the host (waits for the stream).
    pub fn download(&self, buf: &Buffer) -> Result<Vec<u8>, GpuError> {
        self.waiting(true, || {
            drv(self.stream.clone_dtoh(&buf.slice), "copying from the GPU")
        })
    }

    /// Copies `len` bytes from `offset` of a buffer back to the host.
    pub fn download_range(
        &self,
        buf: &Buffer,
        offset: usize,
        len: usize,
    ) -> Result<Vec<u8>, GpuError> {
        let view = buf.slice.slice(offset..offset + len);
        self.waiting(len > 0, || {
            drv(self.stream.clone_dtoh(&view), "copying from the GPU")
        })
    }

    /// Launches `func` on `grid` CTAs of `block` threads with `smem` bytes of
    /// dynamic shared memory. `name` is used in errors.
    pub fn launch(
        &self,
        name: &str,
        func: &CudaFunction,
        grid: u32,
        block: u32,
        smem: u32,
        args: &[Arg],
    ) -> Result<(), GpuError> {
        self.launch_ex(name, func, grid, block, smem, args, false)
    }

    /// [`Gpu::launch`], with programmatic dependent launch when
    /// `programmatic`: the kernel may be scheduled before the kernel issued
    /// before it has finished, and must itself wait for it (`griddepcontrol.wait`,
    /// `tf::grid_dependency_wait` in the prelude) before touching anything
    /// that kernel reads or writes. Only for kernels written to that contract,
    /// issued right after another kernel.
    #[allow(clippy::too_many_arguments)]
    pub fn launch_ex(
        &self,
        name: &str,
        func: &CudaFunction,
        grid: u32,
        block: u32,
        smem: u32,
        args: &[Arg],
        programmatic: bool,
    ) -> Result<(), GpuError> {
        use cudarc::driver::sys;
        if smem > 48 * 1024 {
            drv(
                func.set_attribute(
                    CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    smem as i32,
                ),
                &format!("raising the shared memory limit of `{name}` to {smem} bytes"),
            )?;
        }
        drv(self.ctx.bind_to_thread(), "binding the CUDA context")?;
        // The driver reads each argument through a pointer to its value;
        // `args` outlives the call, and the driver copies the values at launch.
        let mut params: Vec<*mut std::ffi::c_void> = args
            .iter()
            .map(|a| match a {
                Arg::Ptr(p) => p as *const u64 as *mut std::ffi::c_void,
                Arg::I32(v) => v as *const i32 as *mut std::ffi::c_void,
                Arg::I64(v) => v as *const i64 as *mut std::ffi::c_void,
                Arg::Offsets(v) => v as *const Offsets as *mut std::ffi::c_void,
                Arg::F32(v) => v as *const f32 as *mut std::ffi::c_void,
            })
            .collect();
        // SAFETY: an all-zero launch attribute is a valid value of the C struct.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = sys::CUlaunchConfig {
            gridDimX: grid.max(1),
            gridDimY: 1,
            gridDimZ: 1,
            blockDimX: block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: smem,
            hStream: self.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: u32::from(programmatic),
        };
        // SAFETY: the argument list matches the generated kernel's signature, which the
        // caller built from the same plan (one pointer per parameter, each to a value of
        // the parameter's C type); buffers outlive the launch (one stream, waited on
        // before any buffer is dropped); `config` and `attr` live across the call.
        let r = unsafe {
            sys::cuLaunchKernelEx(
                &config,
                func.cu_function(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        };
        drv(r.result(), &format!("launching kernel `{name}`"))
    }

    /// Waits for all work; a kernel fault surfaces here, named by `what`.
    pub fn sync(&self, what: &str) -> Result<(), GpuError> {
        self.waiting(true, || drv(self.stream.synchronize(), what))
    }

    /// Copies `bytes` from `src` to `dst` on the stream (device to device).
    pub fn copy(&self, dst: &Buffer, src: &Buffer, bytes: usize) -> Result<(), GpuError> {
        if bytes > dst.len() || bytes > src.len() {
            return Err(GpuError::Driver(format!(
                "copy of {bytes} bytes past the end of a buffer"
            )));
        }
        // SAFETY: both ranges lie inside live allocations (checked above); the stream
        // orders the copy with every other use of the buffers.
        drv(
            unsafe {
                cudarc::driver::result::memcpy_dtod_async(
                    dst.ptr,
                    src.ptr,
                    bytes,
                    self.stream.cu_stream(),
                )
            },
            "copying on the GPU",
        )
    }

    /// Copies `bytes` between two device ranges on the stream. The ranges come
    /// from [`crate::cuda_exec::DeviceRange`]s, which lie inside live
    /// allocations of this context by construction.
    pub(crate) fn copy_range(&self, dst: u64, src: u64, bytes: usize) -> Result<(), GpuError> {
        if bytes == 0 {
            return Ok(());
        }
        drv(self.ctx.bind_to_thread(), "binding the CUDA context")?;
        // SAFETY: both ranges lie inside live arena allocations (the callers
        // check them against the buffers' sizes); the stream orders the copy.
        drv(
            unsafe {
                cudarc::driver::result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream())
            },
            "copying on the GPU",
        )
    }

    /// True when `other` issues its work to the same stream (so work of both
    /// is ordered without synchronisation).
    pub fn same_stream(&self, other: &Gpu) -> bool {
        Arc::ptr_eq(&self.stream, &other.stream)
    }

    /// Fills a buffer with one byte value on the stream.
    pub fn memset(&self, buf: &Buffer, value: u8) -> Result<(), GpuError> {
        // SAFETY: the range is the whole live allocation; ordered on the stream.
        drv(
            unsafe {
                cudarc::driver::result::memset_d8_async(
                    buf.ptr,
                    value,
                    buf.len(),
                    self.stream.cu_stream(),
                )
            },
            "filling a buffer",
        )
    }

    /// The stream (for CUDA-graph capture and events).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
}
