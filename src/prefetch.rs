//! A hint to the CPU to start loading a cache line the hot path will read soon.
//!
//! The window and its memories are tens of megabytes touched at random (one user, one
//! bucket per event), so nearly every event waits on main memory several times in a row.
//! Asking for the lines of the events a few places ahead lets those waits overlap: see
//! `Window::prefetch` and the burst loop in `pipeline::worker`. A prefetch never faults and
//! changes nothing a program can observe but time, so a wrong or stale address only wastes
//! a little bandwidth.

/// Starts loading the cache line holding `p` (and, with `lines`, the ones after it).
#[inline(always)]
pub fn read<T: ?Sized>(p: *const T, lines: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let p = p as *const u8;
        for i in 0..lines {
            // SAFETY: PREFETCHT0 has no architectural effect and never faults, whatever the
            // address; `wrapping_add` computes it without asserting it is in bounds. SSE is
            // part of the x86_64 baseline.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    p.wrapping_add(i * 64) as *const i8,
                )
            };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (p, lines);
    }
}
