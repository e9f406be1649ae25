//! docs/design.md: A pending user costs ≤ 300 bytes in the window with up to three changes.
//! A counting global allocator measures the heap a `Window` holds after admitting N
//! distinct users (one change each, then three), with the dedup memory at 1 entry so that
//! only the pending user is weighed. The dedup and delivered memories, bounded by `window.dedup_memory` and
//! `window.delivered_memory`, are reported per entry beside it.
//! `cargo bench --bench window_memory`

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::borrow::Cow;
use std::sync::atomic::{AtomicIsize, Ordering};

use segment_sync::event::{Change, Event};
use segment_sync::offsets::{OffsetTracker, Position};
use segment_sync::window::{Window, WindowConfig};

use common::Verdicts;

/// Live heap bytes: every allocation adds its size, every free subtracts it.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is forwarded to `System` unchanged; the counter is bookkeeping only.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

const USERS: usize = 100_000;
const TARGET_BYTES: f64 = 300.0;

/// A Braze external_id as CDPs usually make them: a UUID, 36 characters.
fn external_id(user: usize) -> String {
    format!(
        "{user:08x}-5eed-4c0d-9a1e-{:012x}",
        user.wrapping_mul(0x9e37_79b9)
    )
}

fn config(dedup_memory: usize, delivered_memory: usize) -> WindowConfig {
    WindowConfig {
        linger_ms: 1000,
        batch_size: 75,
        max_pending_users: USERS * 2,
        max_pending_bytes: usize::MAX,
        dedup_memory,
        delivered_memory,
    }
}

/// Admits `segments` changes for each of `USERS` users; returns the window and how many
/// bytes it grew by. The events themselves are built and dropped outside the count.
fn fill(cfg: WindowConfig, segments: usize) -> (Window<Position>, isize) {
    let ids: Vec<String> = (0..USERS).map(external_id).collect();
    let event_ids: Vec<String> = (0..USERS * segments)
        .map(|i| format!("{i:08x}-0000-4000-8000-000000000000"))
        .collect();
    let segment_ids: Vec<String> = (0..segments)
        .map(|s| format!("seg_high_value_{s:02}"))
        .collect();
    let mut tracker = OffsetTracker::new();
    let pid = tracker.assign("t", 0);
    let positions: Vec<Position> = (0..(USERS * segments) as i64)
        .filter_map(|o| tracker.track(pid, o))
        .collect();

    let before = live();
    let mut window = Window::new(cfg);
    let mut offset = 0usize;
    for (u, id) in ids.iter().enumerate() {
        for seg in &segment_ids {
            let event = Event {
                event_id: Cow::Borrowed(&event_ids[offset]),
                external_id: Some(Cow::Borrowed(id)),
                email: None,
                segment_id: Cow::Borrowed(seg),
                segment_name: None,
                change: Change::Entered,
                occurred_at: 1_704_067_200_000 + u as i64,
                sequence: Some(1),
                attributes: Vec::new(),
            };
            let identity = event.validate().expect("valid");
            window.admit(&event, identity, 0, offset as i64, positions[offset], 0);
            offset += 1;
        }
    }
    let grown = live() - before;
    assert_eq!(window.pending_users(), USERS);
    (window, grown)
}

/// Flushes every user and acknowledges them, so the delivered memory holds every
/// (user, segment); returns the window's size after that, over its size before `fill`.
fn fill_and_deliver(cfg: WindowConfig) -> isize {
    let before = live();
    let (mut window, _) = fill(cfg, 1);
    while let Some(flush) = window.pop_batch(u64::MAX / 2, true) {
        for user in &flush.users {
            window.complete(&flush, user, false);
        }
    }
    assert!(window.is_empty());
    let held = live() - before;
    drop(window);
    held
}

fn main() {
    let mut verdicts = Verdicts::default();
    println!(
        "{USERS} users, external_id of {} characters",
        external_id(0).len()
    );

    let (w, one) = fill(config(1, 1), 1);
    drop(w);
    let per_user = one as f64 / USERS as f64;
    println!("pending user, 1 segment change: {per_user:.1} bytes");

    let (w, three) = fill(config(1, 1), 3);
    drop(w);
    let per_user3 = three as f64 / USERS as f64;
    println!("pending user, 3 segment changes: {per_user3:.1} bytes");

    let (w, with_dedup) = fill(config(USERS, 1), 1);
    drop(w);
    let per_dedup = (with_dedup - one) as f64 / USERS as f64;
    println!("dedup memory: {per_dedup:.1} bytes an event id remembered");

    let base = fill_and_deliver(config(1, 0));
    let with_delivered = fill_and_deliver(config(1, USERS));
    let per_delivered = (with_delivered - base) as f64 / USERS as f64;
    println!(
        "delivered memory: {per_delivered:.1} bytes a (user, segment) remembered \
         (a window emptied by flushes keeps {:.1} bytes a user of slab and table capacity)",
        base as f64 / USERS as f64
    );

    verdicts.at_most("pending user, 1 change", per_user, TARGET_BYTES, "bytes");
    verdicts.at_most("pending user, 3 changes", per_user3, TARGET_BYTES, "bytes");
    verdicts.finish();
}
