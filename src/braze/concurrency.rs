//! How many requests may be on their way to Braze at once: an adaptive limit, so that a
//! far or slow endpoint gets enough requests in flight to use the rate limit, and a
//! struggling one gets fewer.
//!
//! `AdaptiveLimit` is the pure rule (additive increase, multiplicative decrease, the way TCP
//! paces itself); `Gate` hands out permits under it, never holding its lock across an await.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;

/// Answers remembered for the fastest recent latency.
const LATENCY_WINDOW: usize = 64;
/// An answer slower than this many times the fastest recent one means Braze is queueing.
const SLOW_FACTOR: u32 = 2;
/// Latencies under this are all "fast": below it, jitter is not a signal.
const LATENCY_FLOOR: Duration = Duration::from_millis(20);

/// Promises: the limit stays within `1..=cap`; until the first sign of overload it grows by
/// one with every timely answer (doubling each round trip, so a far endpoint is used fully
/// within a few round trips), then by one after a full limit's worth of timely answers; it
/// halves on a 429, a server error, a timeout, or an answer slower than twice the fastest of
/// the recent ones.
#[derive(Debug)]
pub struct AdaptiveLimit {
    cap: usize,
    limit: f64,
    recent: VecDeque<Duration>,
    /// Timely answers since the limit last changed.
    timely: usize,
    /// No overload seen yet: grow fast.
    probing: bool,
}

impl AdaptiveLimit {
    /// Starts at the cap's smaller of 4 and itself: enough for a near endpoint, and a far
    /// one grows to what it needs within seconds.
    pub fn new(cap: usize) -> AdaptiveLimit {
        let cap = cap.max(1);
        AdaptiveLimit {
            cap,
            limit: cap.min(4) as f64,
            recent: VecDeque::with_capacity(LATENCY_WINDOW),
            timely: 0,
            probing: true,
        }
    }

    pub fn limit(&self) -> usize {
        (self.limit as usize).clamp(1, self.cap)
    }

    /// A request was answered after `latency` (the round trip, not the time it waited for
    /// its turn).
    pub fn on_answer(&mut self, latency: Duration) {
        let fastest = self.recent.iter().min().copied();
        if self.recent.len() == LATENCY_WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back(latency);
        let slow = fastest.is_some_and(|f| latency > f.max(LATENCY_FLOOR) * SLOW_FACTOR);
        if slow {
            self.decrease();
            return;
        }
        self.timely += 1;
        if self.probing || self.timely >= self.limit() {
            self.timely = 0;
            self.limit = (self.limit + 1.0).min(self.cap as f64);
        }
    }

    /// Braze said too much (429), or failed (5xx, timeout).
    pub fn on_overload(&mut self) {
        self.decrease();
    }

    fn decrease(&mut self) {
        self.probing = false;
        self.timely = 0;
        self.limit = (self.limit / 2.0).max(1.0);
    }
}

/// Permits to send under an [`AdaptiveLimit`].
pub struct Gate {
    state: Mutex<(usize, AdaptiveLimit)>,
    freed: Notify,
}

/// Held while a request is on its way; dropping it frees the place.
pub struct Permit<'g> {
    gate: &'g Gate,
}

impl Gate {
    pub fn new(cap: usize) -> Gate {
        Gate {
            state: Mutex::new((0, AdaptiveLimit::new(cap))),
            freed: Notify::new(),
        }
    }

    pub async fn acquire(&self) -> Permit<'_> {
        loop {
            // Registered before the check, so a permit freed in between is not missed.
            let freed = self.freed.notified();
            {
                let mut s = self.lock();
                if s.0 < s.1.limit() {
                    s.0 += 1;
                    return Permit { gate: self };
                }
            }
            freed.await;
        }
    }

    pub fn on_answer(&self, latency: Duration) {
        let grew = {
            let mut s = self.lock();
            let before = s.1.limit();
            s.1.on_answer(latency);
            s.1.limit() > before
        };
        if grew {
            self.freed.notify_one();
        }
    }

    pub fn on_overload(&self) {
        self.lock().1.on_overload();
    }

    pub fn limit(&self) -> usize {
        self.lock().1.limit()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, AdaptiveLimit)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.gate.lock().0 -= 1;
        self.gate.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_far_endpoint_that_answers_steadily_grows_the_limit_to_the_cap_at_once() {
        let mut l = AdaptiveLimit::new(64);
        assert_eq!(l.limit(), 4);
        // Four round trips: 4 answers, then 8, 16, 32.
        for i in 0..60u32 {
            l.on_answer(MS * (300 + i % 50));
        }
        assert_eq!(l.limit(), 64);
    }

    #[test]
    fn after_an_overload_it_grows_one_a_round_trip() {
        let mut l = AdaptiveLimit::new(64);
        for _ in 0..100 {
            l.on_answer(MS * 300);
        }
        l.on_overload();
        assert_eq!(l.limit(), 32);
        for _ in 0..32 {
            l.on_answer(MS * 300);
        }
        assert_eq!(l.limit(), 33);
    }

    #[test]
    fn a_429_halves_it_and_slow_answers_bring_it_down() {
        let mut l = AdaptiveLimit::new(64);
        for _ in 0..5_000 {
            l.on_answer(MS * 300);
        }
        l.on_overload();
        assert_eq!(l.limit(), 32);
        // Braze starts queueing: answers take four times as long.
        for _ in 0..10 {
            l.on_answer(MS * 1_200);
        }
        assert_eq!(l.limit(), 1);
    }

    #[test]
    fn jitter_below_the_floor_is_not_a_signal() {
        let mut l = AdaptiveLimit::new(8);
        for i in 0..1_000u32 {
            l.on_answer(MS * (1 + i % 15));
        }
        assert_eq!(l.limit(), 8);
    }

    proptest! {
        #[test]
        fn the_limit_stays_within_one_and_the_cap(
            cap in 1usize..100,
            events in proptest::collection::vec((any::<bool>(), 1u64..2_000), 0..500),
        ) {
            let mut l = AdaptiveLimit::new(cap);
            for (overload, ms) in events {
                if overload { l.on_overload() } else { l.on_answer(MS * ms as u32) }
                prop_assert!((1..=cap).contains(&l.limit()));
            }
        }
    }

    #[tokio::test]
    async fn the_gate_lets_no_more_than_the_limit_through() {
        let gate = Gate::new(2);
        let a = gate.acquire().await;
        let _b = gate.acquire().await;
        let third = tokio::time::timeout(Duration::from_millis(50), gate.acquire()).await;
        assert!(third.is_err(), "a third request waits");
        drop(a);
        let third = tokio::time::timeout(Duration::from_millis(50), gate.acquire()).await;
        assert!(third.is_ok(), "and goes once a place is free");
    }
}
