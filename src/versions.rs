//! Pure: a partition's history folded into the greatest version of each (user, segment) and of
//! each user's extra attribute, by the last-write-wins order, for the window to load when the
//! partition is assigned (DESIGN.md, "Versions restored on assignment").
//!
//! The greatest by the order, not the last by offset: the history being read back may come
//! from a misordered upstream, which is the case the restore exists for. Identifiers, segment
//! ids and attribute names are kept once each, however many records repeat them.

use std::hash::{BuildHasher, Hash, Hasher};

use hashbrown::HashTable;
use rustc_hash::{FxBuildHasher, FxHashMap, FxHasher};

use crate::event::{Change, Event, Identity};
use crate::window::{IdKind, Order};

/// Strings kept once, referred to by index.
#[derive(Default)]
struct Names {
    names: Vec<Box<str>>,
    index: HashTable<u32>,
}

impl Names {
    fn intern(&mut self, name: &str) -> u32 {
        let hash = FxBuildHasher.hash_one(name);
        let names = &self.names;
        if let Some(&i) = self.index.find(hash, |&i| &*names[i as usize] == name) {
            return i;
        }
        let i = self.names.len() as u32;
        self.names.push(name.into());
        let names = &self.names;
        self.index
            .insert_unique(hash, i, |&j| FxBuildHasher.hash_one(&*names[j as usize]));
        i
    }

    fn get(&self, i: u32) -> &str {
        &self.names[i as usize]
    }
}

/// Users by (identifier kind, identifier).
#[derive(Default)]
struct Users {
    keys: Vec<(IdKind, Box<str>)>,
    index: HashTable<u32>,
}

fn user_hash(kind: IdKind, id: &str) -> u64 {
    let mut h = FxHasher::default();
    kind.hash(&mut h);
    id.hash(&mut h);
    h.finish()
}

impl Users {
    fn intern(&mut self, kind: IdKind, id: &str) -> u32 {
        let hash = user_hash(kind, id);
        let keys = &self.keys;
        if let Some(&i) = self.index.find(hash, |&i| {
            let (k, v) = &keys[i as usize];
            *k == kind && &**v == id
        }) {
            return i;
        }
        let i = self.keys.len() as u32;
        self.keys.push((kind, id.into()));
        let keys = &self.keys;
        self.index.insert_unique(hash, i, |&j| {
            let (k, v) = &keys[j as usize];
            user_hash(*k, v)
        });
        i
    }
}

/// The greatest versions read so far. Promises: after any sequence of `add`s, whatever their
/// offsets, each (user, segment) holds the change of greatest `Order` added for it, and each
/// (user, attribute) the greatest `Order` of an event that set it.
#[derive(Default)]
pub struct Versions {
    users: Users,
    segments: Names,
    attributes: Names,
    changes: FxHashMap<(u32, u32), (Order, Change)>,
    attribute_orders: FxHashMap<(u32, u32), Order>,
    added: u64,
}

/// One (user, segment)'s greatest version.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeVersion<'a> {
    pub kind: IdKind,
    pub id: &'a str,
    pub segment_id: &'a str,
    pub change: Change,
    pub order: Order,
}

/// One (user, attribute)'s greatest version.
#[derive(Debug, Clone, PartialEq)]
pub struct AttributeVersion<'a> {
    pub kind: IdKind,
    pub id: &'a str,
    pub name: &'a str,
    pub order: Order,
}

impl Versions {
    pub fn new() -> Versions {
        Versions::default()
    }

    /// Room for about `records` records' versions up front: a restore knows its range, and
    /// growing the tables record by record rehashed them a dozen times.
    pub fn with_capacity(records: usize) -> Versions {
        let mut v = Versions::default();
        v.changes.reserve(records);
        v.users.index.reserve(records / 4, |_| 0);
        v.users.keys.reserve(records / 4);
        v
    }

    /// A valid event read at (partition, offset); `identity` is its validation's answer.
    pub fn add(&mut self, event: &Event<'_>, identity: Identity<'_>, partition: i32, offset: i64) {
        self.added += 1;
        let order = Order::of(event, partition, offset);
        let (kind, id) = match identity {
            Identity::ExternalId(v) => (IdKind::ExternalId, v),
            Identity::Email(v) => (IdKind::Email, v),
        };
        let user = self.users.intern(kind, id);
        let segment = self.segments.intern(&event.segment_id);
        self.changes
            .entry((user, segment))
            .and_modify(|had| {
                if order > had.0 {
                    *had = (order, event.change);
                }
            })
            .or_insert((order, event.change));
        for (name, _) in &event.attributes {
            let name = self.attributes.intern(name);
            self.attribute_orders
                .entry((user, name))
                .and_modify(|had| *had = (*had).max(order))
                .or_insert(order);
        }
    }

    /// Changes added (a record of a CDP shape may hold several: the restore counts its
    /// records itself).
    pub fn changes_added(&self) -> u64 {
        self.added
    }

    /// Distinct users among them.
    pub fn users(&self) -> usize {
        self.users.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    pub fn changes(&self) -> impl Iterator<Item = ChangeVersion<'_>> {
        self.changes
            .iter()
            .map(|(&(user, segment), &(order, change))| {
                let (kind, id) = &self.users.keys[user as usize];
                ChangeVersion {
                    kind: *kind,
                    id,
                    segment_id: self.segments.get(segment),
                    change,
                    order,
                }
            })
    }

    pub fn attributes(&self) -> impl Iterator<Item = AttributeVersion<'_>> {
        self.attribute_orders.iter().map(|(&(user, name), &order)| {
            let (kind, id) = &self.users.keys[user as usize];
            AttributeVersion {
                kind: *kind,
                id,
                name: self.attributes.get(name),
                order,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::AttrValue;

    fn ev(user: &str, seg: &str, change: Change, seq: Option<i64>, at: i64) -> Event<'static> {
        Event {
            event_id: format!("{user}-{seg}-{seq:?}-{at}").into(),
            external_id: Some(user.to_string().into()),
            email: None,
            segment_id: seg.to_string().into(),
            segment_name: None,
            change,
            occurred_at: at,
            sequence: seq,
            attributes: vec![],
        }
    }

    fn add(v: &mut Versions, e: &Event<'_>, offset: i64) {
        v.add(e, e.validate().unwrap(), 3, offset);
    }

    fn changes(v: &Versions) -> Vec<(String, String, Change, i64)> {
        let mut out: Vec<_> = v
            .changes()
            .map(|c| {
                (
                    c.id.to_string(),
                    c.segment_id.to_string(),
                    c.change,
                    c.order.offset,
                )
            })
            .collect();
        out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        out
    }

    #[test]
    fn the_greatest_version_wins_whatever_the_offset_order() {
        let mut v = Versions::new();
        // Newer first by offset, then an older one: the older one must not win.
        add(&mut v, &ev("u1", "s", Change::Entered, Some(10), 0), 0);
        add(&mut v, &ev("u1", "s", Change::Exited, Some(5), 0), 1);
        // Without a sequence, occurred_at orders; a present sequence beats an absent one.
        add(&mut v, &ev("u2", "s", Change::Exited, None, 2_000), 2);
        add(&mut v, &ev("u2", "s", Change::Entered, None, 1_000), 3);
        add(&mut v, &ev("u3", "s", Change::Exited, None, 9_000), 4);
        add(&mut v, &ev("u3", "s", Change::Entered, Some(1), 0), 5);
        // Equal sequence and time: the later offset.
        add(&mut v, &ev("u1", "t", Change::Exited, Some(1), 1), 6);
        add(&mut v, &ev("u1", "t", Change::Entered, Some(1), 1), 7);
        assert_eq!(
            changes(&v),
            vec![
                ("u1".into(), "s".into(), Change::Entered, 0),
                ("u1".into(), "t".into(), Change::Entered, 7),
                ("u2".into(), "s".into(), Change::Exited, 2),
                ("u3".into(), "s".into(), Change::Entered, 5),
            ]
        );
        assert_eq!(v.changes_added(), 8);
        assert_eq!(v.users(), 3);
        assert!(v.changes().all(|c| c.order.partition == 3));
    }

    #[test]
    fn each_attribute_keeps_its_greatest_setter() {
        let mut v = Versions::new();
        let mut a = ev("u1", "s", Change::Entered, Some(10), 0);
        a.attributes = vec![("tier".into(), AttrValue::Long(1))];
        let mut b = ev("u1", "s", Change::Entered, Some(4), 0);
        b.attributes = vec![
            ("tier".into(), AttrValue::Long(2)),
            ("city".into(), AttrValue::Null),
        ];
        add(&mut v, &a, 0);
        add(&mut v, &b, 1);
        let mut attrs: Vec<_> = v
            .attributes()
            .map(|a| (a.name.to_string(), a.order.sequence))
            .collect();
        attrs.sort();
        assert_eq!(attrs, vec![("city".into(), 4), ("tier".into(), 10)]);
    }

    #[test]
    fn email_and_external_id_are_different_users() {
        let mut v = Versions::new();
        let mut e = ev("x@y", "s", Change::Entered, Some(1), 0);
        add(&mut v, &e, 0);
        e.email = e.external_id.take();
        e.change = Change::Exited;
        add(&mut v, &e, 1);
        assert_eq!(v.users(), 2);
        assert_eq!(v.changes().count(), 2);
    }
}
