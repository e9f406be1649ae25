//! Realistic CDP segment changes, deterministic from a seed: users entering and leaving
//! segments, plus the upstream faults the worker must survive — exact repeats, changes
//! delivered after a newer one, undecodable bytes and invalid events.
//!
//! Every valid record carries its `sequence` (per user, strictly increasing in generation
//! order) and `occurred_at`, so a test can compute the last-write-wins state from the
//! records alone.

use std::borrow::Cow;
use std::collections::VecDeque;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rustc_hash::FxHashSet;

use crate::event::{AttrValue, Change, Event};

/// What to generate. Rates are per record, in `[0, 1]`.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratorConfig {
    pub users: usize,
    pub segments: usize,
    /// Re-emit an earlier valid record exactly (same event_id and fields).
    pub repeat_rate: f64,
    /// Emit a change only after a newer change of the same user and segment.
    pub out_of_order_rate: f64,
    /// Undecodable bytes or an invalid event, half and half.
    pub bad_rate: f64,
    /// Share of users known by email only.
    pub email_only_rate: f64,
    pub seed: u64,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        GeneratorConfig {
            users: 1000,
            segments: 20,
            repeat_rate: 0.05,
            out_of_order_rate: 0.02,
            bad_rate: 0.0,
            email_only_rate: 0.1,
            seed: 42,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Valid(Event<'static>),
    /// Bytes no decoder accepts, in any format.
    Undecodable(Vec<u8>),
    /// Decodes, but has no identifier or an empty segment_id.
    Invalid(Event<'static>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// The user's identifier: external_id, else email.
    pub key: Vec<u8>,
    pub record: Record,
}

/// 2024-01-01T00:00:00Z: changes start here and move forward a few milliseconds each.
pub const BASE_TIME_MS: i64 = 1_704_067_200_000;

const THEMES: [(&str, &str); 10] = [
    ("high_value", "High value"),
    ("churn_risk", "Churn risk"),
    ("new_customer", "New customer"),
    ("loyalty_gold", "Loyalty gold"),
    ("cart_abandoner", "Cart abandoner"),
    ("newsletter", "Newsletter"),
    ("vip", "VIP"),
    ("inactive_90d", "Inactive 90d"),
    ("app_user", "App user"),
    ("discount_seeker", "Discount seeker"),
];

const TIERS: [&str; 4] = ["bronze", "silver", "gold", "platinum"];

/// Bytes every decoder refuses: not JSON, not magic byte 0, and as plain Avro a string
/// length far beyond the payload.
const GARBAGE_PREFIX: [u8; 10] = [0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];

/// How many earlier valid records are kept for repeats.
const REPEAT_MEMORY: usize = 1024;

/// A held-back change waiting for the newer one that overtakes it.
struct Held {
    release_at: u64,
    generated: Generated,
}

pub struct Generator {
    cfg: GeneratorConfig,
    rng: StdRng,
    email_only: Vec<bool>,
    next_sequence: Vec<i64>,
    /// (user, segment) pairs currently in the segment.
    members: FxHashSet<(u32, u32)>,
    recent: VecDeque<Generated>,
    held: VecDeque<Held>,
    emitted: u64,
    clock: i64,
}

impl Generator {
    pub fn new(cfg: GeneratorConfig) -> Self {
        let mut cfg = cfg;
        cfg.users = cfg.users.max(1);
        cfg.segments = cfg.segments.max(1);
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let email_only = (0..cfg.users)
            .map(|_| rng.random_bool(cfg.email_only_rate.clamp(0.0, 1.0)))
            .collect();
        Generator {
            next_sequence: vec![1; cfg.users],
            cfg,
            rng,
            email_only,
            members: FxHashSet::default(),
            recent: VecDeque::with_capacity(REPEAT_MEMORY),
            held: VecDeque::new(),
            emitted: 0,
            clock: BASE_TIME_MS,
        }
    }

    fn chance(&mut self, rate: f64) -> bool {
        rate > 0.0 && self.rng.random_bool(rate.min(1.0))
    }

    fn external_id(user: usize) -> String {
        format!("user-{user:06}")
    }

    fn email(user: usize) -> String {
        format!("user-{user:06}@example.com")
    }

    fn key(&self, user: usize) -> Vec<u8> {
        if self.email_only[user] {
            Self::email(user).into_bytes()
        } else {
            Self::external_id(user).into_bytes()
        }
    }

    fn tick(&mut self) -> i64 {
        self.clock += self.rng.random_range(1..=20);
        self.clock
    }

    fn event_id(&mut self) -> String {
        uuid::Builder::from_random_bytes(self.rng.random())
            .into_uuid()
            .to_string()
    }

    /// The next change of `user` in `segment`, updating membership and the user's sequence.
    fn change(&mut self, user: usize, segment: usize) -> Event<'static> {
        let member = (user as u32, segment as u32);
        let was_in = self.members.contains(&member);
        // CDPs mostly emit real transitions, and now and then re-assert the current state.
        let entered = if self.chance(0.05) { was_in } else { !was_in };
        if entered {
            self.members.insert(member);
        } else {
            self.members.remove(&member);
        }
        let sequence = self.next_sequence[user];
        self.next_sequence[user] += 1;
        let (theme, title) = THEMES[segment % THEMES.len()];
        let attributes = if self.chance(0.1) {
            let score = f64::from(self.rng.random_range(0..=100u32)) / 100.0;
            let tier = TIERS[self.rng.random_range(0..TIERS.len())];
            vec![
                (Cow::Borrowed("cdp_score"), AttrValue::Double(score)),
                (
                    Cow::Borrowed("tier"),
                    AttrValue::String(Cow::Borrowed(tier)),
                ),
            ]
        } else {
            Vec::new()
        };
        let email_only = self.email_only[user];
        Event {
            event_id: self.event_id().into(),
            external_id: (!email_only).then(|| Self::external_id(user).into()),
            email: (email_only || user % 2 == 0).then(|| Self::email(user).into()),
            segment_id: format!("seg_{theme}_{segment:02}").into(),
            segment_name: Some(format!("{title} {segment:02}").into()),
            change: if entered {
                Change::Entered
            } else {
                Change::Exited
            },
            occurred_at: self.tick(),
            sequence: Some(sequence),
            attributes,
        }
    }

    fn remember(&mut self, g: &Generated) {
        if self.recent.len() == REPEAT_MEMORY {
            self.recent.pop_front();
        }
        self.recent.push_back(g.clone());
    }

    fn bad(&mut self, user: usize, segment: usize) -> Generated {
        let key = self.key(user);
        if self.rng.random_bool(0.5) {
            let mut bytes = GARBAGE_PREFIX.to_vec();
            let n = self.rng.random_range(0..32);
            bytes.extend((0..n).map(|_| self.rng.random_range(b' '..=b'~')));
            return Generated {
                key,
                record: Record::Undecodable(bytes),
            };
        }
        // An invalid event does not take a sequence number: it never reaches the window.
        let (theme, _) = THEMES[segment % THEMES.len()];
        let no_identifier = self.rng.random_bool(0.5);
        let event = Event {
            event_id: self.event_id().into(),
            external_id: (!no_identifier).then(|| Self::external_id(user).into()),
            email: None,
            segment_id: if no_identifier {
                format!("seg_{theme}_{segment:02}").into()
            } else {
                Cow::Borrowed("")
            },
            segment_name: None,
            change: Change::Entered,
            occurred_at: self.tick(),
            sequence: None,
            attributes: Vec::new(),
        };
        Generated {
            key,
            record: Record::Invalid(event),
        }
    }
}

impl Iterator for Generator {
    type Item = Generated;

    fn next(&mut self) -> Option<Generated> {
        self.emitted += 1;
        if self
            .held
            .front()
            .is_some_and(|h| h.release_at <= self.emitted)
        {
            let released = self.held.pop_front().map(|h| h.generated);
            if let Some(g) = &released {
                self.remember(g);
            }
            return released;
        }
        let user = self.rng.random_range(0..self.cfg.users);
        let segment = self.rng.random_range(0..self.cfg.segments);
        if self.chance(self.cfg.bad_rate) {
            return Some(self.bad(user, segment));
        }
        if !self.recent.is_empty() && self.chance(self.cfg.repeat_rate) {
            let i = self.rng.random_range(0..self.recent.len());
            return self.recent.get(i).cloned();
        }
        let key = self.key(user);
        if self.chance(self.cfg.out_of_order_rate) {
            // The older change is held back and released a few records after the newer
            // one, as a CDC replay or a retrying producer would deliver it.
            let older = Generated {
                key: key.clone(),
                record: Record::Valid(self.change(user, segment)),
            };
            let release_at = self.emitted + self.rng.random_range(1..=5);
            let at = self
                .held
                .iter()
                .position(|h| h.release_at > release_at)
                .unwrap_or(self.held.len());
            self.held.insert(
                at,
                Held {
                    release_at,
                    generated: older,
                },
            );
        }
        let g = Generated {
            key,
            record: Record::Valid(self.change(user, segment)),
        };
        self.remember(&g);
        Some(g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    fn cfg() -> GeneratorConfig {
        GeneratorConfig {
            users: 500,
            segments: 10,
            repeat_rate: 0.05,
            out_of_order_rate: 0.02,
            bad_rate: 0.04,
            email_only_rate: 0.1,
            seed: 7,
        }
    }

    #[test]
    fn same_seed_same_records_other_seed_other_records() {
        let a: Vec<_> = Generator::new(cfg()).take(2000).collect();
        let b: Vec<_> = Generator::new(cfg()).take(2000).collect();
        let c: Vec<_> = Generator::new(GeneratorConfig { seed: 8, ..cfg() })
            .take(2000)
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn rates_are_roughly_respected() {
        let n = 100_000;
        let records: Vec<_> = Generator::new(cfg()).take(n).collect();
        let mut seen_ids = HashSet::new();
        let (mut repeats, mut undecodable, mut invalid) = (0, 0, 0);
        let mut last_seq: HashMap<Vec<u8>, i64> = HashMap::new();
        let mut older = 0;
        for g in &records {
            match &g.record {
                Record::Valid(e) => {
                    if !seen_ids.insert(e.event_id.clone()) {
                        repeats += 1;
                        continue;
                    }
                    let seq = e.sequence.expect("valid events carry a sequence");
                    let last = last_seq.entry(g.key.clone()).or_insert(0);
                    if seq < *last {
                        older += 1;
                    }
                    *last = (*last).max(seq);
                    assert!(e.validate().is_ok());
                    assert_eq!(e.identity().map(|i| i.value().as_bytes()), Some(&g.key[..]));
                }
                Record::Undecodable(_) => undecodable += 1,
                Record::Invalid(e) => {
                    invalid += 1;
                    assert!(e.validate().is_err());
                }
            }
        }
        let share = |k: usize| k as f64 / n as f64;
        assert!(
            (0.035..0.065).contains(&share(repeats)),
            "repeats {repeats}"
        );
        assert!(
            (0.015..0.025).contains(&share(undecodable)),
            "undecodable {undecodable}"
        );
        assert!(
            (0.015..0.025).contains(&share(invalid)),
            "invalid {invalid}"
        );
        assert!((0.01..0.03).contains(&share(older)), "out of order {older}");
        let email_only = records
            .iter()
            .filter(|g| !g.key.is_empty() && g.key.ends_with(b"@example.com"))
            .map(|g| g.key.clone())
            .collect::<HashSet<_>>()
            .len();
        assert!(
            (25..=80).contains(&email_only),
            "email-only users {email_only}"
        );
    }

    #[test]
    fn a_repeat_is_an_exact_copy_and_membership_toggles() {
        let records: Vec<_> = Generator::new(cfg()).take(20_000).collect();
        let mut by_id: HashMap<String, &Generated> = HashMap::new();
        let mut toggles = 0;
        let mut state: HashMap<(Vec<u8>, String), (i64, Change)> = HashMap::new();
        let mut valid = 0;
        for g in &records {
            let Record::Valid(e) = &g.record else {
                continue;
            };
            if let Some(first) = by_id.insert(e.event_id.to_string(), g) {
                assert_eq!(first, g);
                continue;
            }
            valid += 1;
            let key = (g.key.clone(), e.segment_id.to_string());
            let seq = e.sequence.unwrap_or_default();
            match state.get(&key) {
                Some((s, _)) if *s > seq => {}
                Some((_, c)) => {
                    toggles += usize::from(*c != e.change);
                    state.insert(key, (seq, e.change));
                }
                None => {
                    state.insert(key, (seq, e.change));
                }
            }
        }
        assert!(
            toggles * 100 > valid * 60,
            "{toggles} toggles in {valid} events"
        );
    }
}
