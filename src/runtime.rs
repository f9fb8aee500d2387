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
    fn bf16_detection_matches_proc_cpuinfo() {
        let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else { return };
        let flags = info.lines().find(|l| l.starts_with("flags")).unwrap_or("");
        let listed = flags.split_whitespace().any(|f| f == "avx512_bf16");
        assert_eq!(cpu_has_native_bf16(), listed);
    }
}
