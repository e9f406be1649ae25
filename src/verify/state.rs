//! Pure: the log's last write per (user, segment) for the users a run checks, folded from
//! the records in any order, by the worker's own order (`window::Order`), so that it names
//! what Braze must hold once the live group has delivered every record read.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use serde::Serialize;

use crate::event::{Change, Event, Identity};
use crate::window::Order;

use super::sample::{user_hash, Sample};

/// Segment and attribute names remembered beyond this many are not kept: a log that names
/// so many is not a CDP's, and memory stays bounded. Extra attributes are then not judged.
pub const MAX_NAMES: usize = 100_000;

/// Where a record is in the log.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Coord {
    #[serde(serialize_with = "as_str")]
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
}

fn as_str<S: serde::Serializer>(topic: &Arc<str>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(topic)
}

/// The last write of one (user, segment) and the record that decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Last {
    pub change: Change,
    pub order: Order,
    pub at: Coord,
    /// A hash of the deciding event's id: a later exact repeat of it is one the worker drops
    /// as a repeat, so the first copy stays the deciding record.
    pub event: u64,
}

/// One user's segments as the log leaves them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserState {
    pub segments: BTreeMap<Box<str>, Last>,
}

/// The names the whole log uses (every user, sampled or not): with an empty attribute
/// prefix they are all that tells a segment's attribute from any other.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Names {
    pub segments: HashSet<Box<str>>,
    /// Names of the events' extra attributes.
    pub attributes: HashSet<Box<str>>,
    /// More than [`MAX_NAMES`] of either were seen: the sets are not the whole story.
    pub overflowed: bool,
}

impl Names {
    fn note(&mut self, segment: &str, attributes: impl Iterator<Item = impl AsRef<str>>) {
        if self.overflowed {
            return;
        }
        if !self.segments.contains(segment) {
            self.segments.insert(segment.into());
        }
        for a in attributes {
            if !self.attributes.contains(a.as_ref()) {
                self.attributes.insert(a.as_ref().into());
            }
        }
        if self.segments.len() > MAX_NAMES || self.attributes.len() > MAX_NAMES {
            self.overflowed = true;
            self.segments.clear();
            self.attributes.clear();
        }
    }
}

/// The fold. Promises: the state after a set of records does not depend on the order they
/// are taken in; a user outside the sample costs nothing but a hash.
#[derive(Debug)]
pub struct LogState {
    sample: Sample,
    users: HashMap<Box<str>, UserState>,
    email_only: HashSet<Box<str>>,
    names: Names,
    /// Later rounds read on for these users only.
    only: Option<HashSet<Box<str>>>,
    /// Users of `only` that a record changed since `take_touched`.
    touched: HashSet<Box<str>>,
}

impl LogState {
    pub fn new(sample: Sample) -> LogState {
        let mut users = HashMap::new();
        // A listed user the log never names is still checked: Braze should hold nothing
        // the log did not write.
        for id in sample.listed() {
            users.insert(Box::from(id), UserState::default());
        }
        LogState {
            sample,
            users,
            email_only: HashSet::new(),
            names: Names::default(),
            only: None,
            touched: HashSet::new(),
        }
    }

    /// Takes one valid event (`identity` is its `validate_with` answer) read at `at`.
    pub fn fold(&mut self, event: &Event<'_>, identity: Identity<'_>, at: &Coord) {
        self.names.note(
            &event.segment_id,
            event.attributes.iter().map(|(name, _)| name),
        );
        let id = match identity {
            Identity::ExternalId(id) => id,
            Identity::Email(email) => {
                if self.only.is_none()
                    && self.sample.includes(email)
                    && !self.email_only.contains(email)
                {
                    self.email_only.insert(email.into());
                }
                return;
            }
        };
        match &self.only {
            Some(only) if !only.contains(id) => return,
            None if !self.sample.includes(id) => return,
            _ => {}
        }
        let order = Order::of(event, at.partition, at.offset);
        let event_hash = user_hash(&event.event_id);
        let user = match self.users.get_mut(id) {
            Some(u) => u,
            None => self.users.entry(id.into()).or_default(),
        };
        let wins = match user.segments.get(&*event.segment_id) {
            None => true,
            // An exact repeat: the worker drops whichever copy comes second, so the first
            // one in the log decides, whatever order the copies are read in here.
            Some(last)
                if last.event == event_hash
                    && (last.order.sequence, last.order.occurred_at)
                        == (order.sequence, order.occurred_at) =>
            {
                (&at.topic, at.partition, at.offset)
                    < (&last.at.topic, last.at.partition, last.at.offset)
            }
            Some(last) => (order, &at.topic) > (last.order, &last.at.topic),
        };
        if wins {
            user.segments.insert(
                (*event.segment_id).into(),
                Last {
                    change: event.change,
                    order,
                    at: at.clone(),
                    event: event_hash,
                },
            );
        }
        if self.only.is_some() && !self.touched.contains(id) {
            self.touched.insert(id.into());
        }
    }

    /// From now on only these users are folded (reading on past a snapshot for the users
    /// found to differ); [`LogState::take_touched`] says which of them a record changed.
    pub fn restrict(&mut self, users: impl IntoIterator<Item = Box<str>>) {
        self.only = Some(users.into_iter().collect());
        self.touched.clear();
    }

    /// The restricted users a record was read for since the last call.
    pub fn take_touched(&mut self) -> HashSet<Box<str>> {
        std::mem::take(&mut self.touched)
    }

    pub fn user(&self, id: &str) -> Option<&UserState> {
        self.users.get(id)
    }

    /// The checked users (external ids), in no particular order.
    pub fn users(&self) -> impl Iterator<Item = (&str, &UserState)> {
        self.users.iter().map(|(k, v)| (&**k, v))
    }

    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    /// Sampled users the log knows by email only: not exported, counted.
    pub fn email_only(&self) -> usize {
        self.email_only.len()
    }

    pub fn names(&self) -> &Names {
        &self.names
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn event(
        user: u8,
        email: bool,
        segment: u8,
        entered: bool,
        seq: Option<i64>,
        at: i64,
    ) -> Event<'static> {
        let id = format!("u{user}");
        Event {
            event_id: format!("e{at}-{user}-{segment}-{entered}-{seq:?}").into(),
            external_id: (!email).then(|| id.clone().into()),
            email: email.then(|| format!("{id}@x.io").into()),
            segment_id: format!("s{segment}").into(),
            segment_name: None,
            change: if entered {
                Change::Entered
            } else {
                Change::Exited
            },
            occurred_at: at,
            sequence: seq,
            attributes: vec![("tier".into(), crate::event::AttrValue::Boolean(true))],
        }
    }

    fn coord(partition: i32, offset: i64) -> Coord {
        Coord {
            topic: Arc::from("t"),
            partition,
            offset,
        }
    }

    fn fold_all(state: &mut LogState, records: &[(Event<'static>, Coord)]) {
        for (e, at) in records {
            let identity = e.validate().unwrap();
            state.fold(e, identity, at);
        }
    }

    #[test]
    fn the_last_write_wins_by_sequence_then_time_then_position() {
        let mut s = LogState::new(Sample::All);
        fold_all(
            &mut s,
            &[
                (event(1, false, 1, true, Some(5), 100), coord(0, 10)),
                // Older sequence, later in the log: loses.
                (event(1, false, 1, false, Some(4), 900), coord(0, 11)),
                // No sequence sorts before any.
                (event(1, false, 2, true, None, 100), coord(1, 3)),
                (event(1, false, 2, false, Some(1), 50), coord(1, 2)),
            ],
        );
        let u = s.user("u1").unwrap();
        assert_eq!(u.segments["s1"].change, Change::Entered);
        assert_eq!(u.segments["s1"].at, coord(0, 10));
        assert_eq!(u.segments["s2"].change, Change::Exited);
        assert_eq!(u.segments["s2"].at, coord(1, 2));
        assert!(s.names().segments.contains("s1") && s.names().attributes.contains("tier"));
    }

    #[test]
    fn the_first_copy_of_an_exact_repeat_decides_in_either_reading_order() {
        let e = event(1, false, 1, true, Some(3), 10);
        let records = [(e.clone(), coord(0, 4)), (e, coord(0, 9))];
        for order in [[0, 1], [1, 0]] {
            let mut s = LogState::new(Sample::All);
            fold_all(
                &mut s,
                &[records[order[0]].clone(), records[order[1]].clone()],
            );
            assert_eq!(s.user("u1").unwrap().segments["s1"].at, coord(0, 4));
        }
    }

    #[test]
    fn email_only_users_are_counted_not_kept_and_the_sample_holds() {
        let mut s = LogState::new(Sample::OneIn(2));
        let records: Vec<_> = (0..200u8)
            .map(|u| {
                (
                    event(u, u % 3 == 0, 1, true, Some(1), 1),
                    coord(0, i64::from(u)),
                )
            })
            .collect();
        fold_all(&mut s, &records);
        assert!(s.users().all(|(id, _)| Sample::OneIn(2).includes(id)));
        assert!(s.email_only() > 0);
        assert!(s.user_count() + s.email_only() < 200);
        // Every segment name is kept, sampled or not.
        assert_eq!(s.names().segments.len(), 1);
    }

    #[test]
    fn restricted_reading_takes_only_those_users_and_says_who_changed() {
        let mut s = LogState::new(Sample::All);
        fold_all(
            &mut s,
            &[(event(1, false, 1, true, Some(1), 1), coord(0, 0))],
        );
        s.restrict([Box::from("u1"), Box::from("u9")]);
        fold_all(
            &mut s,
            &[
                (event(1, false, 1, false, Some(2), 2), coord(0, 1)),
                (event(2, false, 1, true, Some(2), 2), coord(0, 2)),
            ],
        );
        assert_eq!(s.user("u1").unwrap().segments["s1"].change, Change::Exited);
        assert!(s.user("u2").is_none());
        let touched = s.take_touched();
        assert_eq!(touched.len(), 1);
        assert!(touched.contains("u1"));
        assert!(s.take_touched().is_empty());
    }

    #[test]
    fn listed_users_are_checked_even_when_the_log_never_names_them() {
        let s = LogState::new(Sample::parse_list("a\nb\n"));
        assert_eq!(s.user_count(), 2);
        assert!(s.user("a").unwrap().segments.is_empty());
    }

    proptest! {
        /// Whatever order the records come in (partitions are read interleaved, rounds read
        /// on later), the state is the brute-force maximum by the worker's order.
        #[test]
        fn the_fold_is_the_maximum_whatever_the_reading_order(
            specs in proptest::collection::vec(
                (0u8..4, 0u8..3, any::<bool>(), proptest::option::of(0i64..4), 0i64..4, 0i32..2),
                1..60,
            ),
            seed in any::<u64>(),
        ) {
            let records: Vec<(Event<'static>, Coord)> = specs
                .iter()
                .enumerate()
                .map(|(i, (u, seg, entered, seq, at, p))| {
                    let mut e = event(*u, false, *seg, *entered, *seq, *at);
                    // Distinct events: exact repeats have a test of their own.
                    e.event_id = format!("p{i}").into();
                    (e, coord(*p, i as i64))
                })
                .collect();
            let mut shuffled = records.clone();
            // A deterministic shuffle from the seed.
            let mut x = seed | 1;
            for i in (1..shuffled.len()).rev() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                shuffled.swap(i, (x % (i as u64 + 1)) as usize);
            }
            let mut a = LogState::new(Sample::All);
            fold_all(&mut a, &records);
            let mut b = LogState::new(Sample::All);
            fold_all(&mut b, &shuffled);
            for (id, state) in a.users() {
                prop_assert_eq!(Some(state), b.user(id));
            }
            prop_assert_eq!(a.user_count(), b.user_count());
            // Brute force: the maximum order per (user, segment).
            let mut best: BTreeMap<(String, String), (Order, Change)> = BTreeMap::new();
            for (e, at) in &records {
                let key = (e.external_id.as_deref().unwrap().to_string(), e.segment_id.to_string());
                let o = Order::of(e, at.partition, at.offset);
                if best.get(&key).is_none_or(|(old, _)| o > *old) {
                    best.insert(key, (o, e.change));
                }
            }
            for ((user, segment), (order, change)) in best {
                let last = &a.user(&user).unwrap().segments[segment.as_str()];
                prop_assert_eq!(last.order, order);
                prop_assert_eq!(last.change, change);
            }
        }
    }
}
