//! The C allocator's thresholds and arena count, set for a process that moves pieces.
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
//!
//! glibc also gives each thread that allocates while the others hold theirs an arena of its
//! own, up to 8 per core: an agent's two tokio workers and its blocking-pool threads (file
//! reads and writes, hashing) each grew one, and a piece buffer freed in one arena is of no
//! use to an allocation in another, so every arena faulted in its own working set. With
//! [`ARENAS`] the fleet's agents faulted in 27-31 thousand pages per 12 s instead of 66-92
//! thousand, and used about a fifth less CPU per GiB (docs/benchmarks.md, session 21). It
//! also bounds what the heaps may keep to [`ARENAS`] × [`TRIM_THRESHOLD`]. A piece costs one
//! allocation, so two arenas are not a point of contention.

/// Blocks at least this large get their own mapping: above the largest frame (a 4 MiB
/// piece and its header), so piece buffers come from the heaps and are reused.
pub const MMAP_THRESHOLD_BYTES: i32 = 8 << 20;
/// Free memory at a heap's top past this goes back to the kernel.
pub const TRIM_THRESHOLD: i32 = 64 << 20;
/// Arenas the threads share (glibc's default: 8 per core).
pub const ARENAS: i32 = 2;

/// Set the thresholds and the arena count, unless the operator set glibc's own
/// (`GLIBC_TUNABLES` with a malloc tunable, or `MALLOC_TRIM_THRESHOLD_` /
/// `MALLOC_MMAP_THRESHOLD_` / `MALLOC_ARENA_MAX`): theirs win. Call it first thing in
/// `main`, before any thread starts (glibc fixes its arena limit once threads have made
/// eight). Does nothing on other C libraries.
pub fn tune() {
    let operator_set = std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc."))
        || ["MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_ARENA_MAX"]
            .iter()
            .any(|v| std::env::var_os(v).is_some());
    if !operator_set {
        set_parameters();
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_parameters() {
    // SAFETY: mallopt only stores the parameters, under the allocator's own lock; the values
    // are in range (positive, below the 32 MiB cap glibc puts on the mmap threshold).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        libc::mallopt(libc::M_ARENA_MAX, ARENAS);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_parameters() {}

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

    const CHURN_PROBE: &str = "SHOAL_MALLOC_CHURN_PROBE";

    /// Not a test by itself: [`piece_buffers_reuse_memory_instead_of_faulting_in_new_pages`]
    /// runs it in a child process with [`CHURN_PROBE`] set. Measured in the test process, the
    /// other tests' threads sharing its arena took the freed buffers between rounds now and
    /// then (1,537 faults per round in one run of the suite).
    #[test]
    fn churn_probe() {
        if std::env::var_os(CHURN_PROBE).is_none() {
            return;
        }
        set_parameters();
        churn(2);
        let before = faults();
        churn(20);
        println!("faults={}", (faults() - before) / 20);
    }

    #[test]
    fn piece_buffers_reuse_memory_instead_of_faulting_in_new_pages() {
        let per_round = run_probe("malloc::tests::churn_probe", CHURN_PROBE, "on");
        // Without the thresholds each round faults in its 8 MiB again: 2,048 pages.
        assert!(per_round < 100, "{per_round} page faults per round of eight 1 MiB buffers");
    }

    /// A runtime's threads, all alive, taking turns at filling and freeing piece buffers;
    /// the page faults of all their turns. Run in a process of its own ([`turns_probe`]):
    /// glibc fixes its arena limit for good once a process has made eight arenas, as a test
    /// process running other tests may have.
    fn turns(threads: usize) -> i64 {
        let turn = std::sync::Arc::new((std::sync::Mutex::new(0usize), std::sync::Condvar::new()));
        let handles: Vec<_> = (0..threads)
            .map(|me| {
                let turn = turn.clone();
                std::thread::spawn(move || {
                    // A thread's arena is chosen at its first allocation, while all are alive.
                    std::hint::black_box(vec![1u8; 64]);
                    let (lock, cv) = &*turn;
                    let mut now = cv.wait_while(lock.lock().unwrap(), |t| *t != me).unwrap();
                    let before = faults();
                    churn(2);
                    let mine = faults() - before;
                    *now += 1;
                    cv.notify_all();
                    mine
                })
            })
            .collect();
        handles.into_iter().map(|t| t.join().unwrap()).sum()
    }

    const PROBE: &str = "SHOAL_MALLOC_PROBE";

    /// Not a test by itself: [`threads_that_take_turns_at_piece_buffers_share_the_memory`]
    /// runs it in a child process, with [`PROBE`] set to `tuned` or `default`.
    #[test]
    fn turns_probe() {
        let Ok(mode) = std::env::var(PROBE) else { return };
        if mode == "tuned" {
            set_parameters();
        }
        println!("faults={}", turns(16));
    }

    fn probe(mode: &str) -> i64 {
        run_probe("malloc::tests::turns_probe", PROBE, mode)
    }

    /// Run the probe test `name` alone in a child process with `var` set to `value`; the
    /// number it prints after `faults=`.
    fn run_probe(name: &str, var: &str, value: &str) -> i64 {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", name, "--nocapture", "--test-threads=1"])
            .env(var, value)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}");
        // libtest prints the test's name on the same line.
        let (_, count) = stdout.split_once("faults=").expect("probe ran");
        count.split_whitespace().next().unwrap().parse().unwrap()
    }

    #[test]
    fn threads_that_take_turns_at_piece_buffers_share_the_memory() {
        let (tuned, default) = (probe("tuned"), probe("default"));
        // An arena per thread faults in at least 8 MiB (2,048 pages) in each: 65,000 in all
        // here, against about 4,000 with two.
        assert!(tuned * 3 < default, "{tuned} page faults with {ARENAS} arenas, {default} with glibc's");
    }
}
