//! Pacing shared by every request of one client, so Braze rarely has to say 429:
//! - a fixed requests-per-second spacing from `braze.requests_per_second`;
//! - the `X-RateLimit-Remaining`/`-Reset` of each answer: when what is left of the window would
//!   run out before its reset at our own pace, the rest is spread evenly over the time left
//!   (the limit is shared by every worker of the group, so only Braze knows what is left);
//! - a hold until the reset after a 429 or when nothing is left, which every caller waits on.
//!
//! `PaceState` is the pure core (it takes the time as an argument); `Pacer` wraps it in a lock
//! that is never held across an await.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::classify::RateLimitHeaders;

/// Sending right at the reset risks landing in the old window on a slightly skewed clock.
const RESET_MARGIN: Duration = Duration::from_millis(20);
/// A 429 without a usable reset header.
const DEFAULT_429_WAIT: Duration = Duration::from_secs(1);
/// A reset further away than this is taken for clock skew rather than believed.
const MAX_WAIT: Duration = Duration::from_secs(120);

#[derive(Debug)]
pub struct PaceState {
    /// 1 / requests_per_second; zero when unlimited.
    base: Duration,
    /// GCRA-style: the earliest start of the next request.
    next_free: Option<Instant>,
    hold_until: Option<Instant>,
    /// A slower spacing derived from the headers, valid until the window's reset.
    spread: Option<(Duration, Instant)>,
    /// Requests started so far; an answer's `Remaining` cannot count those started after it.
    started: u64,
}

impl PaceState {
    pub fn new(requests_per_second: u32) -> PaceState {
        let base = if requests_per_second == 0 {
            Duration::ZERO
        } else {
            Duration::from_secs(1) / requests_per_second
        };
        PaceState::every(base)
    }

    /// One request per `base` (zero: unlimited), for limits slower than one a second, such
    /// as Braze's export endpoints' requests per minute.
    pub fn every(base: Duration) -> PaceState {
        PaceState {
            base,
            next_free: None,
            hold_until: None,
            spread: None,
            started: 0,
        }
    }

    fn interval(&self, now: Instant) -> Duration {
        match self.spread {
            Some((spread, until)) if now < until => spread.max(self.base),
            _ => self.base,
        }
    }

    /// Reserves the next slot and returns when it starts.
    pub fn reserve(&mut self, now: Instant) -> Instant {
        let mut at = now;
        if let Some(next) = self.next_free {
            at = at.max(next);
        }
        if let Some(hold) = self.hold_until {
            at = at.max(hold);
        }
        self.next_free = Some(at + self.interval(at));
        at
    }

    /// A hold that is still in force at `now`.
    pub fn held_until(&self, now: Instant) -> Option<Instant> {
        self.hold_until.filter(|h| *h > now)
    }

    /// A request starts now; its sequence number is given back with its answer to `observe`.
    pub fn start(&mut self) -> u64 {
        let seq = self.started;
        self.started += 1;
        seq
    }

    /// Nobody sends before `until`.
    pub fn hold(&mut self, until: Instant) {
        self.hold_until = Some(self.hold_until.map_or(until, |h| h.max(until)));
    }

    /// The answer to request `seq` said `remaining` requests are left for `time_left`.
    pub fn observe(&mut self, now: Instant, seq: u64, remaining: u64, time_left: Duration) {
        if time_left.is_zero() {
            return;
        }
        let reset = now + time_left;
        // Requests started after `seq` may have reached Braze after this answer was counted.
        let unseen = self.started.saturating_sub(seq + 1);
        let budget = remaining.saturating_sub(unseen);
        if budget == 0 {
            self.hold(reset + RESET_MARGIN);
            self.spread = None;
            return;
        }
        let budget = u32::try_from(budget).unwrap_or(u32::MAX);
        let spread = time_left / budget;
        self.spread = (spread > self.base).then_some((spread, reset));
    }
}

/// The shared, thread-safe pacer of one client.
#[derive(Debug)]
pub struct Pacer {
    state: Mutex<PaceState>,
}

impl Pacer {
    pub fn new(requests_per_second: u32) -> Pacer {
        Pacer {
            state: Mutex::new(PaceState::new(requests_per_second)),
        }
    }

    /// One request per `interval` (see [`PaceState::every`]).
    pub fn every(interval: Duration) -> Pacer {
        Pacer {
            state: Mutex::new(PaceState::every(interval)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PaceState> {
        // The state stays consistent even if a holder panicked: every update is one assignment.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for this request's turn; returns its sequence number for `observe`.
    pub async fn acquire(&self) -> u64 {
        loop {
            let at = self.lock().reserve(Instant::now());
            if at > Instant::now() {
                tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
            }
            let mut state = self.lock();
            // A 429 may have arrived while we slept on a slot reserved before it.
            if state.held_until(Instant::now()).is_none() {
                return state.start();
            }
        }
    }

    /// Takes the rate-limit headers of the answer to request `seq` into account.
    pub fn observe(&self, seq: u64, headers: RateLimitHeaders) {
        let (Some(remaining), Some(reset)) = (headers.remaining, headers.reset) else {
            return;
        };
        if let Some(time_left) = until_epoch(reset) {
            self.lock()
                .observe(Instant::now(), seq, remaining, time_left.min(MAX_WAIT));
        }
    }

    /// A 429: every request of this client waits until the reset; returns the wait.
    pub fn rate_limited(&self, reset_at: Option<u64>) -> Duration {
        let wait = reset_at
            .and_then(until_epoch)
            .map_or(DEFAULT_429_WAIT, |left| left.min(MAX_WAIT) + RESET_MARGIN);
        self.lock().hold(Instant::now() + wait);
        wait
    }
}

/// Time from now until `epoch_secs`; `None` when it has passed.
fn until_epoch(epoch_secs: u64) -> Option<Duration> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?;
    Duration::from_secs(epoch_secs)
        .checked_sub(now)
        .filter(|d| !d.is_zero())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Reserves and starts `n` requests from `now`; returns the offsets of their slots.
    fn slots(p: &mut PaceState, now: Instant, n: usize) -> Vec<Duration> {
        (0..n)
            .map(|_| {
                let at = p.reserve(now);
                p.start();
                at - now
            })
            .collect()
    }

    #[test]
    fn requests_per_second_spaces_requests() {
        let mut p = PaceState::new(10);
        let now = Instant::now();
        assert_eq!(
            slots(&mut p, now, 3),
            vec![Duration::ZERO, MS * 100, MS * 200]
        );
    }

    #[test]
    fn a_per_minute_limit_spaces_requests_over_a_second_apart() {
        // Braze's export limit: 250 a minute.
        let mut p = PaceState::every(Duration::from_secs(60) / 250);
        let now = Instant::now();
        assert_eq!(
            slots(&mut p, now, 3),
            vec![Duration::ZERO, MS * 240, MS * 480]
        );
    }

    #[test]
    fn zero_means_unlimited() {
        let mut p = PaceState::new(0);
        let now = Instant::now();
        assert_eq!(slots(&mut p, now, 3), vec![Duration::ZERO; 3]);
    }

    #[test]
    fn idle_time_is_not_saved_up_as_a_burst() {
        let mut p = PaceState::new(10);
        let now = Instant::now();
        slots(&mut p, now, 1);
        let later = now + Duration::from_secs(5);
        assert_eq!(slots(&mut p, later, 2), vec![Duration::ZERO, MS * 100]);
    }

    #[test]
    fn hold_delays_everyone_until_it_ends() {
        let mut p = PaceState::new(1000);
        let now = Instant::now();
        p.hold(now + MS * 500);
        assert_eq!(p.held_until(now), Some(now + MS * 500));
        assert_eq!(slots(&mut p, now, 2), vec![MS * 500, MS * 501]);
        assert_eq!(p.held_until(now + MS * 500), None);
        // A shorter hold does not shorten a longer one.
        p.hold(now + MS * 10);
        assert_eq!(p.held_until(now), Some(now + MS * 500));
    }

    #[test]
    fn low_remaining_is_spread_over_the_time_left() {
        let mut p = PaceState::new(1000);
        let now = Instant::now();
        let seq = p.start();
        // 4 left for 2 s: at our 1 ms pace they would be gone at once.
        p.observe(now, seq, 4, Duration::from_secs(2));
        assert_eq!(
            slots(&mut p, now, 3),
            vec![Duration::ZERO, MS * 500, MS * 1000]
        );
        // After the reset the configured pace applies again.
        let after = now + Duration::from_secs(3);
        assert_eq!(slots(&mut p, after, 2), vec![Duration::ZERO, MS * 1]);
    }

    #[test]
    fn plenty_remaining_keeps_the_configured_pace() {
        let mut p = PaceState::new(100);
        let now = Instant::now();
        let seq = p.start();
        p.observe(now, seq, 2999, Duration::from_secs(3));
        assert_eq!(slots(&mut p, now, 2), vec![Duration::ZERO, MS * 10]);
    }

    #[test]
    fn requests_started_after_the_answer_are_counted_against_remaining() {
        let mut p = PaceState::new(1000);
        let now = Instant::now();
        let seq = p.start();
        for _ in 0..3 {
            p.start();
        }
        // 3 left, but 3 requests started after `seq` may already have used them.
        p.observe(now, seq, 3, Duration::from_secs(1));
        assert_eq!(
            p.held_until(now),
            Some(now + Duration::from_secs(1) + RESET_MARGIN)
        );
        let mut q = PaceState::new(1000);
        let seq = q.start();
        q.start();
        // 3 left, one may be used: the other 2 are spread over the second.
        q.observe(now, seq, 3, Duration::from_secs(1));
        assert_eq!(slots(&mut q, now, 2), vec![Duration::ZERO, MS * 500]);
    }

    #[test]
    fn nothing_remaining_holds_until_the_reset() {
        let mut p = PaceState::new(1000);
        let now = Instant::now();
        let seq = p.start();
        p.observe(now, seq, 0, MS * 300);
        assert_eq!(slots(&mut p, now, 1), vec![MS * 300 + RESET_MARGIN]);
    }

    #[tokio::test]
    async fn a_hold_makes_every_caller_wait() {
        let pacer = Pacer::new(0);
        let t0 = Instant::now();
        pacer.lock().hold(t0 + MS * 200);
        let (a, b) = tokio::join!(pacer.acquire(), pacer.acquire());
        assert_ne!(a, b);
        assert!(t0.elapsed() >= MS * 200, "{:?}", t0.elapsed());
    }

    #[test]
    fn a_429_without_reset_waits_a_second() {
        let pacer = Pacer::new(0);
        assert_eq!(pacer.rate_limited(None), DEFAULT_429_WAIT);
        assert!(pacer.lock().held_until(Instant::now()).is_some());
    }
}
