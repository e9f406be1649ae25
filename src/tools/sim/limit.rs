//! Pure: Braze's rate limit as fixed windows aligned to epoch seconds, with the values of the
//! `X-RateLimit-*` headers.

/// What the limiter says about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub limit: u32,
    /// Requests left in the window after this one.
    pub remaining: u32,
    /// Epoch seconds at which the window ends.
    pub reset: u64,
}

#[derive(Debug)]
pub struct FixedWindow {
    limit: u32,
    window_secs: u64,
    window: u64,
    used: u32,
}

impl FixedWindow {
    /// `limit` requests per `window_secs` (0 is taken as 1 s).
    pub fn new(limit: u32, window_secs: u64) -> FixedWindow {
        FixedWindow {
            limit,
            window_secs: window_secs.max(1),
            window: 0,
            used: 0,
        }
    }

    /// Counts a request arriving at `now_ms` (epoch milliseconds); refused ones do not count.
    pub fn hit(&mut self, now_ms: u64) -> Decision {
        let window = now_ms / 1000 / self.window_secs;
        if window != self.window {
            self.window = window;
            self.used = 0;
        }
        let allowed = self.used < self.limit;
        if allowed {
            self.used += 1;
        }
        Decision {
            allowed,
            limit: self.limit,
            remaining: self.limit - self.used,
            reset: (window + 1) * self.window_secs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_down_then_refuses_until_the_next_window() {
        let mut w = FixedWindow::new(2, 3);
        let t = 1_700_000_001_000; // window [1_699_999_998, 1_700_000_001) has just ended
        let a = w.hit(t);
        assert_eq!(
            a,
            Decision {
                allowed: true,
                limit: 2,
                remaining: 1,
                reset: 1_700_000_004
            }
        );
        assert_eq!(w.hit(t + 500).remaining, 0);
        let refused = w.hit(t + 2_999);
        assert!(!refused.allowed);
        assert_eq!((refused.remaining, refused.reset), (0, 1_700_000_004));
        let next = w.hit(t + 3_000);
        assert!(next.allowed);
        assert_eq!((next.remaining, next.reset), (1, 1_700_000_007));
    }
}
