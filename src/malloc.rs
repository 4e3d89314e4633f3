//! The C allocator's thresholds, set for a process that moves pieces.
//!
//! Every piece a node receives or sends passes through a buffer of its size (256 KiB to
//! 4 MiB), freed a moment later. With glibc's defaults, a heap gives memory back to the
//! kernel as soon as about 2 MiB is free at its top (and blocks past a dynamic threshold are
//! mapped and unmapped one by one), so the next piece's buffer is fresh pages again: each
//! faults in and is zeroed while the kernel copies the piece into it. In a 20-host fleet
//! (`integration/bench/fleet.sh`) that was about 130,000 page faults per 12 s over the
//! agents; with these thresholds it is about 40,000 (docs/benchmarks.md, session 20). A
//! heap keeps up to [`TRIM_THRESHOLD`] free for the next buffers instead, which is at most
//! what the process held at its peak anyway.

/// Blocks at least this large get their own mapping: above the largest frame (a 4 MiB
/// piece and its header), so piece buffers come from the heaps and are reused.
pub const MMAP_THRESHOLD_BYTES: i32 = 8 << 20;
/// Free memory at a heap's top past this goes back to the kernel.
pub const TRIM_THRESHOLD: i32 = 64 << 20;

/// Set the thresholds, unless the operator set glibc's own (`GLIBC_TUNABLES` with a malloc
/// tunable, or `MALLOC_TRIM_THRESHOLD_` / `MALLOC_MMAP_THRESHOLD_`): theirs win. Call it
/// first thing in `main`. Does nothing on other C libraries.
pub fn tune() {
    let operator_set = std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc."))
        || std::env::var_os("MALLOC_TRIM_THRESHOLD_").is_some()
        || std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_some();
    if !operator_set {
        set_thresholds();
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_thresholds() {
    // SAFETY: mallopt only stores the parameters, under the allocator's own lock; the values
    // are in range (positive, below the 32 MiB cap glibc puts on the mmap threshold).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_thresholds() {}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    /// Minor page faults of this thread so far.
    fn faults() -> i64 {
        let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: getrusage fills the struct it is given.
        let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, usage.as_mut_ptr()) };
        assert_eq!(rc, 0);
        // SAFETY: filled above.
        unsafe { usage.assume_init() }.ru_minflt
    }

    /// What a node does all day: a few piece-sized buffers filled and freed, again and again.
    fn churn(rounds: usize) {
        for _ in 0..rounds {
            let buffers: Vec<Vec<u8>> = (0..8).map(|i| vec![i as u8 + 1; 1 << 20]).collect();
            std::hint::black_box(&buffers);
        }
    }

    #[test]
    fn piece_buffers_reuse_memory_instead_of_faulting_in_new_pages() {
        set_thresholds();
        churn(2);
        let before = faults();
        churn(20);
        let per_round = (faults() - before) / 20;
        // Without the thresholds each round faults in its 8 MiB again: 2,048 pages.
        assert!(per_round < 100, "{per_round} page faults per round of eight 1 MiB buffers");
    }
}
