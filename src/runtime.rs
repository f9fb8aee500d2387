//! Process-level tuning for running libtorch on the CPU.
//!
//! libtorch allocates and frees its activation buffers (tens of MB) on every operator. With
//! glibc's defaults those go through `mmap`/`munmap` and the kernel zero-fills fresh pages on each
//! use: measured on the LiteMedSAM encoder (2 cores, 23 slices), 33.7 s of which about half was
//! system time, against 12.9 s once freed memory is kept for reuse. [`keep_freed_memory`] raises
//! glibc's mmap and trim thresholds so freed blocks stay in the heap; [`release_free_memory`]
//! hands the idle heap back to the system (the Orthanc plugin calls it after each series so the
//! host's resident memory returns to its idle level).

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod glibc {
    use std::os::raw::c_int;
    extern "C" {
        pub fn mallopt(param: c_int, value: c_int) -> c_int;
        pub fn malloc_trim(pad: usize) -> c_int;
    }
    pub const M_TRIM_THRESHOLD: c_int = -1;
    pub const M_MMAP_THRESHOLD: c_int = -3;
}

/// Keeps freed memory in the heap for reuse (blocks below 1 GiB never go through `mmap`; the heap
/// is not trimmed on free). Returns whether the allocator accepted the settings (false on non-glibc
/// systems, where it does nothing). Idempotent; call it before the first model runs.
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        // SAFETY: mallopt only changes allocator parameters; both values are in glibc's range.
        let a = glibc::mallopt(glibc::M_MMAP_THRESHOLD, 1 << 30);
        let b = glibc::mallopt(glibc::M_TRIM_THRESHOLD, i32::MAX);
        a == 1 && b == 1
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}

/// glibc's own thresholds (128 KiB), restored after a burst of inference in a host process
/// (Orthanc), so that the host's traffic afterwards returns its memory as it did before.
pub fn restore_default_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        // SAFETY: mallopt only changes allocator parameters; 128 KiB is glibc's default for both.
        glibc::mallopt(glibc::M_MMAP_THRESHOLD, 128 * 1024);
        glibc::mallopt(glibc::M_TRIM_THRESHOLD, 128 * 1024);
        glibc::malloc_trim(0);
    }
}

/// Keeps freed memory for reuse while it lives (one series in a host process); restores the
/// allocator's defaults and trims the heap when dropped.
pub struct InferenceMemory(());

impl InferenceMemory {
    pub fn begin() -> InferenceMemory {
        keep_freed_memory();
        InferenceMemory(())
    }
}

impl Drop for InferenceMemory {
    fn drop(&mut self) {
        restore_default_memory();
    }
}

/// Returns the free part of the heap to the system (after a burst of inference).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        // SAFETY: malloc_trim is thread-safe and only releases memory no allocation uses.
        glibc::malloc_trim(0);
    }
}

/// Whether this CPU has native bfloat16 dot products (AVX512-BF16), where bf16
/// inference is faster than f32. Elsewhere libtorch emulates bf16 and it is slower.
pub fn cpu_has_native_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // CPUs with AMX-BF16 also have AVX512-BF16 (and AMX detection is not stable Rust).
        if std::arch::is_x86_feature_detected!("avx512bf16") {
            return true;
        }
    }
    false
}

/// What start-up found of libtorch's CUDA part (libtorch_cuda.so and the CUDA runtime it needs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CudaPart {
    /// Linked at build time (feature `cuda`) or already in the process.
    Linked,
    /// Loaded at run time from this file.
    Loaded(std::path::PathBuf),
    /// Not available; why, in words.
    Absent(String),
}

/// Loads libtorch's CUDA part once, from the folder the process's libtorch_cpu.so came from, before
/// anything asks libtorch about CUDA (libtorch caches its CUDA hooks on the first query). A CPU-only
/// install has no libtorch_cuda.so there and never touches a CUDA library; the `desam-cuda` package
/// adds it, so the same binaries use a GPU without a rebuild.
pub fn cuda_part() -> &'static CudaPart {
    static PART: once_cell::sync::OnceCell<CudaPart> = once_cell::sync::OnceCell::new();
    PART.get_or_init(|| {
        let part = load_cuda_part();
        log::debug!("libtorch CUDA part: {part:?}");
        part
    })
}

#[cfg(target_os = "linux")]
mod dl {
    use std::os::raw::{c_char, c_int, c_void};
    extern "C" {
        pub fn dlopen(filename: *const c_char, flags: c_int) -> *mut c_void;
        pub fn dlerror() -> *mut c_char;
    }
    pub const RTLD_LAZY: c_int = 0x1;
    pub const RTLD_NOW: c_int = 0x2;
    pub const RTLD_NOLOAD: c_int = 0x4;
    pub const RTLD_GLOBAL: c_int = 0x100;

    /// dlopen; Err carries dlerror's text.
    pub fn open(name: &str, flags: c_int) -> Result<(), String> {
        let c = std::ffi::CString::new(name).map_err(|e| e.to_string())?;
        // SAFETY: `c` is a NUL-terminated string that outlives the call; a handle is never closed
        // (the library stays for the process's life, as libtorch requires).
        let handle = unsafe { dlopen(c.as_ptr(), flags) };
        if !handle.is_null() {
            return Ok(());
        }
        // SAFETY: dlerror returns NULL or a NUL-terminated string owned by libc, read at once.
        let err = unsafe { dlerror() };
        Err(if err.is_null() {
            format!("dlopen({name}) failed")
        } else {
            unsafe { std::ffi::CStr::from_ptr(err) }.to_string_lossy().into_owned()
        })
    }
}

#[cfg(target_os = "linux")]
fn load_cuda_part() -> CudaPart {
    if cfg!(feature = "cuda") || dl::open("libtorch_cuda.so", dl::RTLD_LAZY | dl::RTLD_NOLOAD).is_ok() {
        return CudaPart::Linked;
    }
    // The absolute path beside libtorch_cpu.so, never a bare name: LD_LIBRARY_PATH (a host such as
    // 3D Slicer may set one) would otherwise win over our RUNPATH and bring another libtorch.
    let Some(dir) = libtorch_cpu_dir() else {
        return CudaPart::Absent("libtorch_cpu.so is not mapped in this process".into());
    };
    let path = dir.join("libtorch_cuda.so");
    if !path.is_file() {
        return CudaPart::Absent(format!("no {} (the desam-cuda package adds it)", path.display()));
    }
    match dl::open(&path.to_string_lossy(), dl::RTLD_NOW | dl::RTLD_GLOBAL) {
        Ok(()) => CudaPart::Loaded(path),
        Err(e) => CudaPart::Absent(format!("could not load {}: {e}", path.display())),
    }
}

#[cfg(not(target_os = "linux"))]
fn load_cuda_part() -> CudaPart {
    CudaPart::Absent("run-time loading of the CUDA part is Linux-only".into())
}

/// The folder of the libtorch_cpu.so this process mapped (read from /proc/self/maps).
#[cfg(target_os = "linux")]
fn libtorch_cpu_dir() -> Option<std::path::PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| path.ends_with("/libtorch_cpu.so"))
        .and_then(|path| std::path::Path::new(path).parent().map(|p| p.to_path_buf()))
}

/// Why no CUDA device is usable although the CUDA part is there, in words (for one log line).
pub fn why_no_cuda_device() -> String {
    #[cfg(target_os = "linux")]
    if dl::open("libcuda.so.1", dl::RTLD_LAZY | dl::RTLD_NOLOAD).is_err()
        && dl::open("libcuda.so.1", dl::RTLD_LAZY).is_err()
    {
        return "no NVIDIA driver (libcuda.so.1 not found)".into();
    }
    "the NVIDIA driver reports no usable device".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocator_tuning_is_accepted_and_idempotent() {
        if cfg!(all(target_os = "linux", target_env = "gnu")) {
            assert!(keep_freed_memory());
            assert!(keep_freed_memory());
        }
        release_free_memory();
        let v: Vec<u8> = vec![1; 64 << 20];
        assert_eq!(v.iter().map(|&x| x as usize).sum::<usize>(), 64 << 20);
    }

    #[test]
    fn cuda_part_is_decided_once_and_names_a_reason_when_absent() {
        let first = cuda_part();
        assert!(std::ptr::eq(first, cuda_part()));
        if let CudaPart::Absent(why) = first {
            assert!(!why.is_empty());
        }
        assert!(!why_no_cuda_device().is_empty());
    }

    #[test]
    fn bf16_detection_matches_proc_cpuinfo() {
        let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else { return };
        let flags = info.lines().find(|l| l.starts_with("flags")).unwrap_or("");
        let listed = flags.split_whitespace().any(|f| f == "avx512_bf16");
        assert_eq!(cpu_has_native_bf16(), listed);
    }
}
