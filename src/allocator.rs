//! Memory allocator settings: one glibc arena, trimmed every few seconds.
//!
//! glibc's malloc gives each thread that allocates its own arena (up to 8
//! per core) and hands memory back to the kernel only from the top of an
//! arena. The outbox's database churns through pages of every size on the
//! runtime's threads and its own, and with the defaults the freed memory
//! stayed resident: delivering a 1,000,000-event backlog at 300
//! requests/min, RSS went from 120 MiB to 241 MiB in four minutes while the
//! live heap stayed near 110 MiB (heaptrack). One arena, and a
//! `malloc_trim` every [`TRIM_EVERY`] (which gives back free pages anywhere
//! in the heap, not just at its top) hold it near the live heap
//! (BENCHMARKS.md, footprint).
//!
//! Not `M_TRIM_THRESHOLD`/`M_TOP_PAD`: setting either turns off glibc's
//! adaptive mmap threshold, every large buffer is then mapped and unmapped
//! anew, and the database's recovery after a crash took three times as long
//! (ready 2.8 s instead of 0.9 s with a million waiting events).
//!
//! An operator's `MALLOC_ARENA_MAX` wins over ours. Other platforms and
//! allocators: no-op.

use std::time::Duration;

/// How often free heap memory is handed back to the kernel.
pub const TRIM_EVERY: Duration = Duration::from_secs(5);

/// Apply the settings and start the trimming thread. Call first thing in
/// `main`, before any other thread.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            // SAFETY: mallopt only changes malloc's tunables; called before
            // any other thread exists.
            unsafe {
                libc::mallopt(libc::M_ARENA_MAX, 1);
            }
        }
        let _ = std::thread::Builder::new()
            .name("malloc-trim".into())
            .spawn(|| {
                loop {
                    std::thread::sleep(TRIM_EVERY);
                    // SAFETY: malloc_trim is thread-safe (it locks each
                    // arena); 0 keeps no pad.
                    unsafe {
                        libc::malloc_trim(0);
                    }
                }
            });
    }
}
