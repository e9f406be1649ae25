//! The coalescing window: pending segment changes per user, last write wins.
//!
//! Pure logic, driven by the pipeline with explicit times so it can be tested without a clock.
//! It knows nothing of Kafka or HTTP: a record's position is an opaque `P` that comes back out
//! of the window when the record is settled (delivered, superseded, dropped).
//!
//! Memory is what the hot path is designed around (DESIGN.md: ≤ 300 bytes a pending user):
//! users live in a slab indexed by `u32`, found through a `HashTable<u32>` that hashes the
//! slab's own key (no second copy of the identifier), segment ids are interned to `u32`, and
//! the usual user with one pending change holds it inline.

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::Arc;

use hashbrown::HashTable;

use crate::recent::{Packed, Recent};
use rustc_hash::{FxBuildHasher, FxHasher};
use smallvec::SmallVec;

use crate::event::{AttrValue, Change, Event, Identity};

/// Last-write-wins order of DESIGN.md: (sequence, occurred_at, partition, offset).
/// A missing sequence is `i64::MIN`, so it sorts before every present one, as `None` would.
/// Nothing bounds a sequence (it is the source's own order), so a wrong huge one wins until
/// `delivered` forgets it; see `Event::sequence`. A far-future `occurred_at` is refused
/// before it gets here (`event::Rules`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Order {
    pub sequence: i64,
    pub occurred_at: i64,
    pub partition: i32,
    pub offset: i64,
}

impl Order {
    pub fn of(event: &Event<'_>, partition: i32, offset: i64) -> Order {
        Order {
            sequence: event.sequence.unwrap_or(i64::MIN),
            occurred_at: event.occurred_at,
            partition,
            offset,
        }
    }
}

/// Which Braze identifier a user key is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdKind {
    ExternalId,
    Email,
}

impl IdKind {
    pub fn field(self) -> &'static str {
        match self {
            IdKind::ExternalId => "external_id",
            IdKind::Email => "email",
        }
    }
}

/// What the window did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Waiting to be flushed; its position comes back in a `Flush`.
    Pending,
    /// Older than a change already pending for the same (user, segment): it rides along with
    /// the newer one and settles with it.
    Superseded,
    /// The event_id was seen before: settle it now.
    Duplicate,
    /// Not newer than what was already sent for the (user, segment): settle it now.
    Stale,
}

#[derive(Debug, Clone)]
pub struct WindowConfig {
    pub linger_ms: u64,
    pub batch_size: usize,
    pub max_pending_users: usize,
    /// Back-pressure in bytes: what users' identifiers and pending changes and attributes
    /// hold, so a flood of large users cannot outgrow memory while under the user count.
    pub max_pending_bytes: usize,
    pub dedup_memory: usize,
    pub delivered_memory: usize,
}

/// Interned segment ids: the window and the batch encoder speak of segments by index.
#[derive(Default)]
pub struct Segments {
    names: Vec<Box<str>>,
    index: HashTable<u32>,
    bytes: usize,
}

/// Past either, the window stops taking events until it is empty, then forgets every name
/// (and what it remembers of deliveries, which is keyed by name index): a stream of distinct
/// segment ids must not grow memory without end or wrap the `u32` index.
const MAX_SEGMENTS: usize = 1 << 20;
const MAX_SEGMENT_BYTES: usize = 64 << 20;

impl Segments {
    fn is_full(&self) -> bool {
        self.names.len() >= MAX_SEGMENTS || self.bytes >= MAX_SEGMENT_BYTES
    }

    fn clear(&mut self) {
        *self = Segments::default();
    }

    /// Names held.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    fn intern(&mut self, id: &str) -> u32 {
        let hash = FxBuildHasher.hash_one(id);
        let names = &self.names;
        if let Some(&i) = self.index.find(hash, |&i| &*names[i as usize] == id) {
            return i;
        }
        let i = self.names.len() as u32;
        self.bytes += id.len() + std::mem::size_of::<Box<str>>() + std::mem::size_of::<u32>();
        self.names.push(id.into());
        let names = &self.names;
        self.index
            .insert_unique(hash, i, |&j| FxBuildHasher.hash_one(&*names[j as usize]));
        i
    }

    pub fn name(&self, index: u32) -> &str {
        &self.names[index as usize]
    }
}

/// What was last sent for a (user, segment) or a user's extra attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sent {
    order: Order,
    change: Change,
}

impl Packed for Sent {
    const WORDS: usize = 4;

    fn pack(&self, out: &mut [u64]) {
        out[0] = self.order.sequence as u64;
        out[1] = self.order.occurred_at as u64;
        let entered = u64::from(self.change == Change::Entered);
        out[2] = (self.order.partition as u32 as u64) << 1 | entered;
        out[3] = self.order.offset as u64;
    }

    fn unpack(w: &[u64]) -> Sent {
        Sent {
            order: Order {
                sequence: w[0] as i64,
                occurred_at: w[1] as i64,
                partition: (w[2] >> 1) as u32 as i32,
                offset: w[3] as i64,
            },
            change: if w[2] & 1 == 1 {
                Change::Entered
            } else {
                Change::Exited
            },
        }
    }
}

struct PendingChange<P> {
    segment: u32,
    change: Change,
    order: Order,
    /// Every record this change settles: its own and those it superseded.
    positions: SmallVec<[P; 1]>,
}

struct PendingAttr<P> {
    name: Box<str>,
    value: AttrValue<'static>,
    order: Order,
    /// Records whose segment change was stale but whose attribute is still the newest:
    /// they settle with the object that writes it. Empty (no allocation) otherwise, since a
    /// record with a live change settles with that change.
    positions: Vec<P>,
}

struct Slot<P> {
    key: Arc<str>,
    kind: IdKind,
    live: bool,
    queued: bool,
    in_flight: bool,
    /// Its entries came back from a request given up: each carries every kept record, so
    /// the next flush lists each record once.
    requeued: bool,
    first_pending_ms: u64,
    changes: SmallVec<[PendingChange<P>; 1]>,
    attrs: Vec<PendingAttr<P>>,
}

impl<P> Slot<P> {
    fn is_pending(&self) -> bool {
        !self.changes.is_empty() || !self.attrs.is_empty()
    }
}

/// One user as flushed: ranges index into the `Flush`'s shared vectors, so a batch of 75 users
/// costs a handful of allocations, not a few per user.
#[derive(Debug, Clone)]
pub struct FlushedUser {
    pub slot: u32,
    pub kind: IdKind,
    pub id: Arc<str>,
    pub changes: std::ops::Range<u32>,
    pub attributes: std::ops::Range<u32>,
    pub positions: std::ops::Range<u32>,
}

/// Users leaving the window together, for one Braze request.
#[derive(Debug, Clone)]
pub struct Flush<P> {
    pub users: Vec<FlushedUser>,
    pub changes: Vec<(u32, Change)>,
    /// The order of each of `changes`, then of each of `attributes`: what a request that is
    /// given up needs to take its place in the window again.
    orders: Vec<Order>,
    attribute_orders: Vec<Order>,
    pub attributes: Vec<(Box<str>, AttrValue<'static>)>,
    pub positions: Vec<P>,
    /// Records whose change proved redundant (equal to what was last delivered): settle now.
    pub settled_now: Vec<P>,
    pub redundant: usize,
}

impl<P> Default for Flush<P> {
    fn default() -> Self {
        Flush {
            users: Vec::new(),
            changes: Vec::new(),
            orders: Vec::new(),
            attribute_orders: Vec::new(),
            attributes: Vec::new(),
            positions: Vec::new(),
            settled_now: Vec::new(),
            redundant: 0,
        }
    }
}

impl<P> Flush<P> {
    pub fn user_changes(&self, u: &FlushedUser) -> &[(u32, Change)] {
        &self.changes[u.changes.start as usize..u.changes.end as usize]
    }
    pub fn user_attributes(&self, u: &FlushedUser) -> &[(Box<str>, AttrValue<'static>)] {
        &self.attributes[u.attributes.start as usize..u.attributes.end as usize]
    }
    pub fn user_positions(&self, u: &FlushedUser) -> &[P] {
        &self.positions[u.positions.start as usize..u.positions.end as usize]
    }
}

pub struct Window<P> {
    cfg: WindowConfig,
    slots: Vec<Slot<P>>,
    free: Vec<u32>,
    table: HashTable<u32>,
    queue: VecDeque<u32>,
    segments: Segments,
    seen: Recent<()>,
    delivered: Recent<Sent>,
    /// Slots in use: users pending or in flight.
    users: usize,
    /// Users with pending changes (queued or waiting for their in-flight request).
    pending_users: usize,
    pending_changes: usize,
    /// Bytes held for users beyond their slots, as `max_pending_bytes` counts them.
    pending_bytes: usize,
    /// A user reached `MAX_ENTRIES_PER_USER` pending changes or attributes: flush now and
    /// take no more events until then. A user's entries are found by a linear scan, cheap
    /// for the few an ordinary user has, quadratic for a hostile stream without this bound.
    crowded: bool,
    empty_key: Arc<str>,
}

/// See `Window::crowded`.
const MAX_ENTRIES_PER_USER: usize = 256;

/// What a pending change or attribute costs beyond its slot, as `max_pending_bytes` counts.
const CHANGE_BYTES: usize = std::mem::size_of::<PendingChange<[u64; 2]>>();

fn attr_bytes(name: &str, value: &AttrValue<'_>) -> usize {
    let value = match value {
        AttrValue::String(s) => s.len(),
        _ => 0,
    };
    std::mem::size_of::<PendingAttr<[u64; 2]>>() + name.len() + value
}

fn user_hash(kind: IdKind, id: &str) -> u64 {
    let mut h = FxHasher::default();
    kind.hash(&mut h);
    id.hash(&mut h);
    h.finish()
}

fn event_id_hash(id: &str) -> u64 {
    FxBuildHasher.hash_one(id)
}

/// The memory's key for a user's membership of a segment, from the user's hash and the
/// segment's interned index: no string is hashed again on the hot path. The multiply and
/// shifts spread the index over every bit, as the bucket choice takes the low ones.
fn segment_key(user_hash: u64, segment: u32) -> u64 {
    let mixed = (user_hash ^ u64::from(segment).wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_mul(0xBF58_476D_1CE4_E5B9);
    mixed ^ (mixed >> 31)
}

/// The memory's key for an extra attribute sent to a user. The leading word keeps these
/// keys apart from a user's own hash, which hashes the same fields without it.
fn delivered_key(kind: IdKind, id: &str, name: &str) -> u64 {
    let mut h = FxHasher::default();
    h.write_u8(0xA7);
    kind.hash(&mut h);
    id.hash(&mut h);
    name.hash(&mut h);
    h.finish()
}

impl<P: Copy + PartialEq> Window<P> {
    pub fn new(cfg: WindowConfig) -> Window<P> {
        Window {
            seen: Recent::new(cfg.dedup_memory),
            delivered: Recent::new(cfg.delivered_memory),
            cfg,
            slots: Vec::new(),
            free: Vec::new(),
            table: HashTable::new(),
            queue: VecDeque::new(),
            segments: Segments::default(),
            users: 0,
            pending_users: 0,
            pending_changes: 0,
            pending_bytes: 0,
            crowded: false,
            empty_key: Arc::from(""),
        }
    }

    pub fn segments(&self) -> &Segments {
        &self.segments
    }

    /// Users held: waiting to be flushed or in a request in flight.
    pub fn users(&self) -> usize {
        self.users
    }

    pub fn pending_users(&self) -> usize {
        self.pending_users
    }

    pub fn pending_changes(&self) -> usize {
        self.pending_changes
    }

    /// Bytes held for users beyond their slots: identifiers, pending changes, attributes.
    pub fn pending_bytes(&self) -> usize {
        self.pending_bytes
    }

    /// Back-pressure: the caller stops consuming while this holds.
    pub fn is_full(&self) -> bool {
        self.users >= self.cfg.max_pending_users
            || self.pending_bytes >= self.cfg.max_pending_bytes
            || self.segments.is_full()
            || self.crowded
    }

    pub fn is_empty(&self) -> bool {
        self.users == 0
    }

    /// When the oldest waiting user's linger runs out (ms), if anyone is waiting.
    pub fn next_deadline(&self) -> Option<u64> {
        self.queue
            .front()
            .map(|&s| self.slots[s as usize].first_pending_ms + self.cfg.linger_ms)
    }

    fn find(&self, kind: IdKind, id: &str, hash: u64) -> Option<u32> {
        let slots = &self.slots;
        self.table
            .find(hash, |&i| {
                let s = &slots[i as usize];
                s.kind == kind && &*s.key == id
            })
            .copied()
    }

    fn create(&mut self, kind: IdKind, id: &str, hash: u64) -> u32 {
        let slot = Slot {
            key: Arc::from(id),
            kind,
            live: true,
            queued: false,
            in_flight: false,
            requeued: false,
            first_pending_ms: 0,
            changes: SmallVec::new(),
            attrs: Vec::new(),
        };
        let idx = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = slot;
                i
            }
            None => {
                self.slots.push(slot);
                (self.slots.len() - 1) as u32
            }
        };
        let slots = &self.slots;
        self.table.insert_unique(hash, idx, |&j| {
            let s = &slots[j as usize];
            user_hash(s.kind, &s.key)
        });
        self.users += 1;
        self.pending_bytes += id.len();
        idx
    }

    fn release(&mut self, idx: u32) {
        let s = &self.slots[idx as usize];
        let hash = user_hash(s.kind, &s.key);
        if let Ok(entry) = self.table.find_entry(hash, |&i| i == idx) {
            entry.remove();
        }
        let s = &mut self.slots[idx as usize];
        let held = s.key.len()
            + s.changes.len() * CHANGE_BYTES
            + s.attrs
                .iter()
                .map(|a| attr_bytes(&a.name, &a.value))
                .sum::<usize>();
        self.pending_bytes = self.pending_bytes.saturating_sub(held);
        s.live = false;
        s.key = self.empty_key.clone();
        s.changes = SmallVec::new();
        s.attrs = Vec::new();
        self.free.push(idx);
        self.users -= 1;
        if self.users == 0 && self.segments.is_full() {
            // Nothing refers to a name index now but the delivery memory, keyed by them.
            self.segments.clear();
            self.delivered.clear();
        }
    }

    /// Takes an event the caller has validated (`identity` is `Event::validate_with`'s answer).
    pub fn admit(
        &mut self,
        event: &Event<'_>,
        identity: Identity<'_>,
        partition: i32,
        offset: i64,
        pos: P,
        now_ms: u64,
    ) -> Admit {
        if self.seen.put(event_id_hash(&event.event_id), ()).is_some() {
            return Admit::Duplicate;
        }
        let (kind, id) = match identity {
            Identity::ExternalId(v) => (IdKind::ExternalId, v),
            Identity::Email(v) => (IdKind::Email, v),
        };
        let order = Order::of(event, partition, offset);
        let hash = user_hash(kind, id);
        let segment = self.segments.intern(&event.segment_id);
        let stale = self
            .delivered
            .get(segment_key(hash, segment))
            .is_some_and(|sent| order <= sent.order);
        if stale && !self.has_newer_attribute(kind, id, event, order) {
            return Admit::Stale;
        }
        let idx = match self.find(kind, id, hash) {
            Some(i) => i,
            None => self.create(kind, id, hash),
        };
        let slot = &mut self.slots[idx as usize];
        let was_pending = slot.is_pending();
        let mut result = Admit::Pending;
        // A stale change is not applied; only its newer attributes are, and the record
        // settles with them.
        let mut carried = Some(pos).filter(|_| stale);
        if !stale {
            match slot.changes.iter_mut().find(|c| c.segment == segment) {
                Some(c) if order > c.order => {
                    c.order = order;
                    c.change = event.change;
                    c.positions.push(pos);
                }
                Some(c) => {
                    c.positions.push(pos);
                    result = Admit::Superseded;
                }
                None => {
                    slot.changes.push(PendingChange {
                        segment,
                        change: event.change,
                        order,
                        positions: SmallVec::from_buf([pos]),
                    });
                    self.pending_changes += 1;
                    self.pending_bytes += CHANGE_BYTES;
                }
            }
        }
        for (name, value) in &event.attributes {
            // An attribute older than the one already sent would overwrite a newer value.
            let dk = delivered_key(kind, id, name);
            if self
                .delivered
                .get(dk)
                .is_some_and(|sent| order <= sent.order)
            {
                continue;
            }
            match slot.attrs.iter_mut().find(|a| *a.name == **name) {
                Some(a) if order > a.order => {
                    self.pending_bytes = (self.pending_bytes + attr_bytes(name, value))
                        .saturating_sub(attr_bytes(name, &a.value));
                    a.value = value.clone().into_owned();
                    a.order = order;
                    a.positions.extend(carried.take());
                }
                Some(a) => a.positions.extend(carried.take()),
                None => {
                    self.pending_bytes += attr_bytes(name, value);
                    slot.attrs.push(PendingAttr {
                        name: (**name).into(),
                        value: value.clone().into_owned(),
                        order,
                        positions: carried.take().into_iter().collect(),
                    })
                }
            }
        }
        if slot.changes.len().max(slot.attrs.len()) >= MAX_ENTRIES_PER_USER {
            self.crowded = true;
        }
        if !was_pending {
            self.pending_users += 1;
            slot.first_pending_ms = now_ms;
        }
        if !slot.queued && !slot.in_flight {
            slot.queued = true;
            self.queue.push_back(idx);
        }
        result
    }

    /// Whether the event sets an attribute more recently than what was sent of it.
    fn has_newer_attribute(&self, kind: IdKind, id: &str, event: &Event<'_>, order: Order) -> bool {
        event.attributes.iter().any(|(name, _)| {
            let dk = delivered_key(kind, id, name);
            self.delivered.get(dk).is_none_or(|sent| order > sent.order)
        })
    }

    /// Whether a flush is due: the oldest waiting user is ready, the window is under
    /// pressure, or `force` (revoke, shutdown, a backfill's end).
    ///
    /// A user is ready once its first pending change has waited `linger_ms`: every change
    /// that arrives meanwhile is coalesced into the same object, and each one saved is a
    /// data point Braze does not bill. A request takes up to `batch_size` ready users, oldest
    /// first. Only when three quarters of `max_pending_users` are waiting do users leave before
    /// their linger, so that the window drains before back-pressure has to stop consumption.
    pub fn flush_due(&self, now_ms: u64, force: bool) -> bool {
        let Some(&front) = self.queue.front() else {
            return false;
        };
        force || self.crowded || self.under_pressure() || self.is_ready(front, now_ms)
    }

    fn under_pressure(&self) -> bool {
        self.pending_users.saturating_mul(4) >= self.cfg.max_pending_users.saturating_mul(3)
    }

    fn is_ready(&self, idx: u32, now_ms: u64) -> bool {
        self.slots[idx as usize].first_pending_ms + self.cfg.linger_ms <= now_ms
    }

    /// Takes up to `batch_size` users, oldest first, when a flush is due. Their slots stay
    /// in flight until `complete`, so no user is in two requests at once. Changes equal to what
    /// was last delivered for the (user, segment) are left out and their records settle now.
    pub fn pop_batch(&mut self, now_ms: u64, force: bool) -> Option<Flush<P>> {
        if !self.flush_due(now_ms, force) {
            return None;
        }
        let mut flush = Flush::default();
        // Judged once, so that a request under pressure is a full one.
        let early = force || self.crowded || self.under_pressure();
        self.crowded = false;
        while flush.users.len() < self.cfg.batch_size {
            let Some(&idx) = self.queue.front() else {
                break;
            };
            if !(early || self.is_ready(idx, now_ms)) {
                break;
            }
            self.queue.pop_front();
            let slot = &mut self.slots[idx as usize];
            slot.queued = false;
            if !slot.is_pending() {
                // Emptied by a revoke while queued.
                if !slot.in_flight {
                    self.release(idx);
                }
                continue;
            }
            let changes = std::mem::take(&mut slot.changes);
            let attrs = std::mem::take(&mut slot.attrs);
            // In flight now: bounded by the requests in flight, not by the window.
            self.pending_bytes = self.pending_bytes.saturating_sub(
                changes.len() * CHANGE_BYTES
                    + attrs
                        .iter()
                        .map(|a| attr_bytes(&a.name, &a.value))
                        .sum::<usize>(),
            );
            self.pending_users -= 1;
            self.pending_changes -= changes.len();
            let (kind, key) = (slot.kind, slot.key.clone());
            let hash = user_hash(kind, &key);
            let c0 = flush.changes.len() as u32;
            let a0 = flush.attributes.len() as u32;
            let p0 = flush.positions.len() as u32;
            let s0 = flush.settled_now.len();
            for c in changes {
                let dk = segment_key(hash, c.segment);
                let sent = Sent {
                    order: c.order,
                    change: c.change,
                };
                let redundant = self
                    .delivered
                    .put(dk, sent)
                    .is_some_and(|last| last.change == c.change);
                if redundant {
                    flush.redundant += 1;
                    flush.settled_now.extend_from_slice(&c.positions);
                } else {
                    flush.changes.push((c.segment, c.change));
                    flush.orders.push(c.order);
                    flush.positions.extend_from_slice(&c.positions);
                }
            }
            // Extra attributes cannot be shown redundant (their last values are not kept), so
            // they are written even when every segment change was; the records that carried
            // them then settle with the object, not before it.
            if flush.changes.len() as u32 > c0 || !attrs.is_empty() {
                let carried: Vec<P> = flush.settled_now.drain(s0..).collect();
                flush.positions.extend(carried);
                for a in attrs {
                    let dk = delivered_key(kind, &key, &a.name);
                    let sent = Sent {
                        order: a.order,
                        change: Change::Entered,
                    };
                    self.delivered.put(dk, sent);
                    flush.positions.extend(a.positions);
                    flush.attributes.push((a.name, a.value));
                    flush.attribute_orders.push(a.order);
                }
                if std::mem::take(&mut self.slots[idx as usize].requeued) {
                    let mut mine = flush.positions.split_off(p0 as usize);
                    let mut unique: Vec<P> = Vec::with_capacity(mine.len());
                    for p in mine.drain(..) {
                        if !unique.contains(&p) {
                            unique.push(p);
                        }
                    }
                    flush.positions.extend(unique);
                }
                flush.users.push(FlushedUser {
                    slot: idx,
                    kind,
                    id: key,
                    changes: c0..flush.changes.len() as u32,
                    attributes: a0..flush.attributes.len() as u32,
                    positions: p0..flush.positions.len() as u32,
                });
                self.slots[idx as usize].in_flight = true;
            } else {
                self.release(idx);
            }
        }
        if flush.users.is_empty() && flush.settled_now.is_empty() {
            return None;
        }
        Some(flush)
    }

    /// A request holding this user has finished. `rejected` forgets what the window believed
    /// was delivered, so a later change is neither stale nor redundant against it.
    pub fn complete(&mut self, flush: &Flush<P>, user: &FlushedUser, rejected: bool) {
        if rejected {
            self.forget_sent(flush, user);
        }
        let slot = &mut self.slots[user.slot as usize];
        if !slot.live || !slot.in_flight || !Arc::ptr_eq(&slot.key, &user.id) {
            return;
        }
        slot.in_flight = false;
        if !slot.is_pending() {
            self.release(user.slot);
        } else if !slot.queued {
            slot.queued = true;
            self.queue.push_back(user.slot);
        }
    }

    fn forget_sent(&mut self, flush: &Flush<P>, user: &FlushedUser) {
        let hash = user_hash(user.kind, &user.id);
        for (segment, _) in flush.user_changes(user) {
            self.delivered.forget(segment_key(hash, *segment));
        }
        for (name, _) in flush.user_attributes(user) {
            self.delivered
                .forget(delivered_key(user.kind, &user.id, name));
        }
    }

    /// A request holding this user was given up before Braze answered (aborted when its
    /// partitions were revoked). The user's changes and attributes are pending again, with
    /// the records `keep` accepts, unless a newer one arrived meanwhile; what the window
    /// believed was sent is forgotten, since nobody knows whether it was. A user with no
    /// record left to keep is simply completed: its records are its partitions' next
    /// owner's.
    pub fn requeue(
        &mut self,
        flush: &Flush<P>,
        user: &FlushedUser,
        keep: impl Fn(&P) -> bool,
        now_ms: u64,
    ) {
        self.forget_sent(flush, user);
        let kept: SmallVec<[P; 1]> = flush
            .user_positions(user)
            .iter()
            .filter(|p| keep(p))
            .copied()
            .collect();
        let live = {
            let slot = &self.slots[user.slot as usize];
            slot.live && slot.in_flight && Arc::ptr_eq(&slot.key, &user.id)
        };
        if !live {
            return;
        }
        if kept.is_empty() {
            self.complete(flush, user, false);
            return;
        }
        let slot = &mut self.slots[user.slot as usize];
        let was_pending = slot.is_pending();
        let changes = user.changes.start as usize..user.changes.end as usize;
        for ((segment, change), order) in flush.changes[changes.clone()]
            .iter()
            .zip(&flush.orders[changes])
        {
            // A change pending for the segment got past the window while this one was in
            // flight, so it is newer.
            if slot.changes.iter().any(|c| c.segment == *segment) {
                continue;
            }
            slot.changes.push(PendingChange {
                segment: *segment,
                change: *change,
                order: *order,
                positions: SmallVec::new(),
            });
            self.pending_changes += 1;
            self.pending_bytes += CHANGE_BYTES;
        }
        let attributes = user.attributes.start as usize..user.attributes.end as usize;
        for ((name, value), order) in flush.attributes[attributes.clone()]
            .iter()
            .zip(&flush.attribute_orders[attributes])
        {
            if slot.attrs.iter().any(|a| a.name == *name) {
                continue;
            }
            self.pending_bytes += attr_bytes(name, value);
            slot.attrs.push(PendingAttr {
                name: name.clone(),
                value: value.clone(),
                order: *order,
                positions: Vec::new(),
            });
        }
        // The user's object is written whole, so its records settle with whichever entry
        // is delivered. Each requeued entry carries them all: an entry without a position
        // would be taken for one whose records were revoked, and dropped.
        for c in slot.changes.iter_mut().filter(|c| c.positions.is_empty()) {
            c.positions.extend(kept.iter().copied());
        }
        for a in slot.attrs.iter_mut().filter(|a| a.positions.is_empty()) {
            a.positions.extend(kept.iter().copied());
        }
        slot.requeued = true;
        slot.in_flight = false;
        if !was_pending && slot.is_pending() {
            self.pending_users += 1;
            slot.first_pending_ms = now_ms;
        }
        if !slot.is_pending() {
            self.release(user.slot);
        } else if !slot.queued {
            slot.queued = true;
            self.queue.push_back(user.slot);
        }
    }

    /// After a revoke: forgets the event ids seen and what was sent from the revoked
    /// partitions, keeping what is remembered of the others, so an older change read late
    /// on a kept partition is still stale. The partitions' next owner may write newer values
    /// for their users, and their records will be read again (by this worker, if they come
    /// back), so neither memory can be trusted for them. A partition number is forgotten
    /// in every topic: forgetting more than needed only costs a write the window could have
    /// saved. Event ids are forgotten whole (they do not say their partition): a repeat
    /// then passes as a change equal to what was sent, which is stale, or rides along with
    /// its pending first copy.
    pub fn forget_partitions(&mut self, revoked: impl Fn(i32) -> bool) {
        self.seen.clear();
        self.delivered
            .forget_where(|sent| revoked(sent.order.partition));
    }

    /// After a revoke: positions for which `gone` holds are dropped (the partition's new owner
    /// reads those records again); a change left with none is dropped, and so are extra
    /// attributes once no change of the user is left to carry them. Returns how many changes
    /// were dropped.
    pub fn drop_positions(&mut self, gone: impl Fn(&P) -> bool) -> usize {
        let mut dropped = 0;
        for idx in 0..self.slots.len() {
            let slot = &mut self.slots[idx];
            if !slot.live || !slot.is_pending() {
                continue;
            }
            let before = slot.changes.len();
            for c in slot.changes.iter_mut() {
                c.positions.retain(|p| !gone(p));
            }
            slot.changes.retain(|c| !c.positions.is_empty());
            for a in slot.attrs.iter_mut() {
                a.positions.retain(|p| !gone(p));
            }
            if slot.changes.is_empty() {
                let freed: usize = slot
                    .attrs
                    .iter()
                    .filter(|a| a.positions.is_empty())
                    .map(|a| attr_bytes(&a.name, &a.value))
                    .sum();
                self.pending_bytes = self.pending_bytes.saturating_sub(freed);
                slot.attrs.retain(|a| !a.positions.is_empty());
            }
            let removed = before - slot.changes.len();
            self.pending_bytes = self.pending_bytes.saturating_sub(removed * CHANGE_BYTES);
            dropped += removed;
            self.pending_changes -= removed;
            if !slot.is_pending() {
                self.pending_users -= 1;
                // A queued slot is released when the queue reaches it.
                if !slot.queued && !slot.in_flight {
                    self.release(idx as u32);
                }
            }
        }
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn cfg() -> WindowConfig {
        WindowConfig {
            linger_ms: 100,
            batch_size: 3,
            max_pending_users: 10,
            max_pending_bytes: usize::MAX,
            dedup_memory: 1000,
            delivered_memory: 1000,
        }
    }

    fn ev(id: &str, user: &str, seg: &str, change: Change, seq: i64) -> Event<'static> {
        Event {
            event_id: id.to_string().into(),
            external_id: Some(user.to_string().into()),
            email: None,
            segment_id: seg.to_string().into(),
            segment_name: None,
            change,
            occurred_at: 1_000,
            sequence: Some(seq),
            attributes: vec![],
        }
    }

    fn admit(w: &mut Window<i64>, e: &Event<'_>, offset: i64, now: u64) -> Admit {
        let identity = e.validate().unwrap();
        w.admit(e, identity, 0, offset, offset, now)
    }

    fn written(w: &Window<i64>, f: &Flush<i64>) -> Vec<(String, String, Change)> {
        let mut out = vec![];
        for u in &f.users {
            for (s, c) in f.user_changes(u) {
                out.push((u.id.to_string(), w.segments().name(*s).to_string(), *c));
            }
        }
        out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        out
    }

    #[test]
    fn large_users_fill_the_window_by_bytes_and_leave_none_counted() {
        let mut w = Window::new(WindowConfig {
            max_pending_users: 1000,
            max_pending_bytes: 100_000,
            batch_size: 75,
            ..cfg()
        });
        let big = "x".repeat(990);
        let mut n = 0;
        while !w.is_full() {
            let user = format!("{n}{big}");
            let mut e = ev(&format!("e{n}"), &user, "s", Change::Entered, 1);
            e.attributes = vec![("a".into(), AttrValue::String("v".repeat(255).into()))];
            admit(&mut w, &e, n, 0);
            n += 1;
            assert!(n < 1000, "never full by bytes");
        }
        assert!(n < 100, "full after {n} users of 1 KB and more");
        while let Some(f) = w.pop_batch(1_000, true) {
            for u in &f.users {
                w.complete(&f, u, false);
            }
        }
        assert_eq!((w.users(), w.pending_bytes()), (0, 0));
        assert!(!w.is_full());
    }

    #[test]
    fn a_user_with_thousands_of_segments_is_flushed_in_parts() {
        let mut w = Window::new(WindowConfig {
            max_pending_users: 1000,
            batch_size: 75,
            ..cfg()
        });
        let mut written = 0;
        for i in 0..10_000 {
            let e = ev(&format!("e{i}"), "u", &format!("s{i}"), Change::Entered, i);
            admit(&mut w, &e, i, 0);
            if w.is_full() {
                let f = w
                    .pop_batch(0, false)
                    .expect("a crowded user is flushed early");
                for u in &f.users {
                    written += f.user_changes(u).len();
                    w.complete(&f, u, false);
                }
            }
            assert!(w.pending_changes() <= MAX_ENTRIES_PER_USER);
        }
        while let Some(f) = w.pop_batch(1_000, true) {
            for u in &f.users {
                written += f.user_changes(u).len();
                w.complete(&f, u, false);
            }
        }
        assert_eq!(written, 10_000);
    }

    #[test]
    fn a_million_segment_ids_are_forgotten_once_the_window_is_empty() {
        let mut w = Window::new(WindowConfig {
            max_pending_users: 100_000,
            batch_size: 75,
            ..cfg()
        });
        for i in 0..MAX_SEGMENTS as i64 + 10 {
            let e = ev(
                &format!("e{i}"),
                &format!("u{}", i % 50),
                &format!("s{i}"),
                Change::Entered,
                i,
            );
            admit(&mut w, &e, i, 0);
            while w.is_full() {
                let f = w.pop_batch(0, true).expect("a flush");
                for u in &f.users {
                    w.complete(&f, u, false);
                }
            }
            assert!(w.segments().len() <= MAX_SEGMENTS);
        }
        assert!(w.segments().len() < 1000, "{}", w.segments().len());
    }

    #[test]
    fn last_write_wins_by_sequence_and_older_rides_along() {
        let mut w = Window::new(cfg());
        assert_eq!(
            admit(&mut w, &ev("a", "u1", "s", Change::Entered, 2), 0, 0),
            Admit::Pending
        );
        assert_eq!(
            admit(&mut w, &ev("b", "u1", "s", Change::Exited, 1), 1, 0),
            Admit::Superseded
        );
        assert_eq!(
            admit(&mut w, &ev("a", "u1", "s", Change::Exited, 9), 2, 0),
            Admit::Duplicate
        );
        assert_eq!(w.pending_users(), 1);
        assert!(w.pop_batch(99, false).is_none(), "linger not over");
        let f = w.pop_batch(100, false).expect("linger over");
        assert_eq!(
            written(&w, &f),
            vec![("u1".into(), "s".into(), Change::Entered)]
        );
        assert_eq!(f.positions, vec![0, 1]);
        w.complete(&f, &f.users[0], false);
        assert!(w.is_empty());
        // Older than what was sent: stale. Newer but equal to what was sent: redundant.
        assert_eq!(
            admit(&mut w, &ev("c", "u1", "s", Change::Exited, 1), 3, 200),
            Admit::Stale
        );
        assert_eq!(
            admit(&mut w, &ev("d", "u1", "s", Change::Entered, 3), 4, 200),
            Admit::Pending
        );
        let f = w.pop_batch(300, false).unwrap();
        assert!(f.users.is_empty());
        assert_eq!(f.settled_now, vec![4]);
        assert_eq!(f.redundant, 1);
        assert!(w.is_empty());
    }

    #[test]
    fn a_user_in_flight_is_not_flushed_again_until_complete() {
        let mut w = Window::new(cfg());
        admit(&mut w, &ev("a", "u1", "s", Change::Entered, 1), 0, 0);
        let f1 = w.pop_batch(0, true).unwrap();
        admit(&mut w, &ev("b", "u1", "s", Change::Exited, 2), 1, 0);
        assert!(w.pop_batch(1000, true).is_none(), "u1 is in flight");
        w.complete(&f1, &f1.users[0], false);
        let f2 = w.pop_batch(1000, false).unwrap();
        assert_eq!(
            written(&w, &f2),
            vec![("u1".into(), "s".into(), Change::Exited)]
        );
    }

    #[test]
    fn users_wait_their_linger_unless_the_window_is_under_pressure() {
        let mut w = Window::new(cfg());
        let mut n = 0;
        let mut add = |w: &mut Window<i64>, users: std::ops::Range<i64>, now: u64| {
            for i in users {
                n += 1;
                let e = ev(&format!("e{n}"), &format!("u{i}"), "s", Change::Entered, 1);
                admit(w, &e, n, now);
            }
        };
        add(&mut w, 0..4, 0);
        assert!(w.pop_batch(99, false).is_none(), "nobody has lingered yet");
        assert_eq!(
            w.pop_batch(100, false).unwrap().users.len(),
            3,
            "batch_size"
        );
        assert_eq!(w.pop_batch(100, false).unwrap().users.len(), 1);
        // Three quarters of max_pending_users (10) waiting: users leave before their
        // linger, until the pressure is off.
        add(&mut w, 10..18, 200);
        assert_eq!(w.pop_batch(200, false).unwrap().users.len(), 3);
        assert!(w.pop_batch(200, false).is_none(), "5 waiting: no pressure");
        assert_eq!(w.pop_batch(300, false).unwrap().users.len(), 3);
        assert_eq!(w.pop_batch(300, false).unwrap().users.len(), 2);
        add(&mut w, 20..22, 400);
        assert_eq!(w.pop_batch(400, true).unwrap().users.len(), 2, "forced");
    }

    #[test]
    fn rejection_forgets_the_delivery() {
        let mut w = Window::new(cfg());
        admit(&mut w, &ev("a", "u1", "s", Change::Entered, 5), 0, 0);
        let f = w.pop_batch(0, true).unwrap();
        w.complete(&f, &f.users[0], true);
        assert_eq!(
            admit(&mut w, &ev("b", "u1", "s", Change::Entered, 1), 1, 0),
            Admit::Pending
        );
    }

    #[test]
    fn revoked_positions_drop_their_changes_only() {
        let mut w = Window::new(cfg());
        admit(&mut w, &ev("a", "u1", "s", Change::Entered, 1), 10, 0);
        admit(&mut w, &ev("b", "u2", "s", Change::Entered, 1), 20, 0);
        assert_eq!(w.drop_positions(|p| *p == 10), 1);
        let f = w.pop_batch(0, true).unwrap();
        assert_eq!(
            written(&w, &f),
            vec![("u2".into(), "s".into(), Change::Entered)]
        );
        assert_eq!(w.pending_users(), 0);
    }

    #[test]
    fn a_rebalance_forgets_what_was_sent_from_revoked_partitions_only() {
        let mut w: Window<i64> = Window::new(cfg());
        let on = |w: &mut Window<i64>, e: &Event<'_>, partition: i32, offset: i64| {
            let identity = e.validate().unwrap();
            w.admit(e, identity, partition, offset, offset, 0)
        };
        on(&mut w, &ev("a", "kept", "s", Change::Entered, 10), 0, 1);
        on(&mut w, &ev("b", "moved", "s", Change::Entered, 10), 1, 1);
        let f = w.pop_batch(0, true).unwrap();
        for u in &f.users {
            w.complete(&f, u, false);
        }
        w.forget_partitions(|p| p == 1);
        // An older change read late: stale where the memory was kept, not where it moved.
        assert_eq!(
            on(&mut w, &ev("c", "kept", "s", Change::Exited, 5), 0, 2),
            Admit::Stale
        );
        assert_eq!(
            on(&mut w, &ev("d", "moved", "s", Change::Exited, 5), 1, 2),
            Admit::Pending
        );
    }

    #[test]
    fn a_request_given_up_puts_its_kept_changes_back_unless_newer_ones_came() {
        let mut w: Window<i64> = Window::new(cfg());
        let mut e = ev("a", "u1", "s", Change::Entered, 5);
        e.attributes = vec![("tier".into(), AttrValue::String("gold".into()))];
        admit(&mut w, &e, 1, 0);
        admit(&mut w, &ev("b", "u1", "t", Change::Entered, 5), 2, 0);
        admit(&mut w, &ev("c", "u2", "s", Change::Entered, 5), 3, 0);
        let f = w.pop_batch(0, true).unwrap();
        assert_eq!(f.users.len(), 2);
        // While in flight, a newer change of u1's segment t arrives.
        assert_eq!(
            admit(&mut w, &ev("d", "u1", "t", Change::Exited, 6), 4, 0),
            Admit::Pending
        );
        // Records 1 and 2 stay ours; 3 (u2's) moved to another worker.
        for u in &f.users {
            w.requeue(&f, u, |p| *p != 3, 50);
        }
        assert_eq!(w.pending_users(), 1, "u2 had nothing left to keep");
        // The revoke that stopped the request then drops its partition's records: the
        // requeued entries carry kept ones, so they stay.
        assert_eq!(w.drop_positions(|p| *p == 3), 0);
        let g = w.pop_batch(1_000, false).unwrap();
        assert_eq!(
            written(&w, &g),
            vec![
                ("u1".into(), "s".into(), Change::Entered),
                ("u1".into(), "t".into(), Change::Exited),
            ]
        );
        assert_eq!(g.user_attributes(&g.users[0]).len(), 1);
        let mut positions = g.user_positions(&g.users[0]).to_vec();
        positions.sort();
        assert_eq!(positions, vec![1, 2, 4]);
        w.complete(&g, &g.users[0], false);
        assert!(w.is_empty());
        // What the given-up request said was forgotten; what was delivered since is known.
        assert_eq!(
            admit(&mut w, &ev("e", "u2", "s", Change::Entered, 5), 5, 0),
            Admit::Pending
        );
    }

    #[test]
    fn a_stale_change_still_carries_a_newer_attribute_and_settles_with_it() {
        let mut w = Window::new(cfg());
        admit(&mut w, &ev("a", "u1", "s", Change::Entered, 5), 0, 0);
        let f = w.pop_batch(0, true).unwrap();
        w.complete(&f, &f.users[0], false);
        let mut old = ev("b", "u1", "s", Change::Exited, 3);
        old.attributes = vec![("tier".into(), AttrValue::String("gold".into()))];
        assert_eq!(admit(&mut w, &old, 1, 0), Admit::Pending);
        let f = w.pop_batch(0, true).unwrap();
        assert!(
            f.user_changes(&f.users[0]).is_empty(),
            "the stale change is not written"
        );
        assert_eq!(f.user_attributes(&f.users[0]).len(), 1);
        assert_eq!(f.user_positions(&f.users[0]), &[1]);
        w.complete(&f, &f.users[0], false);
        // Once sent, an even older value of it is stale too.
        let mut older = ev("c", "u1", "s", Change::Exited, 2);
        older.attributes = vec![("tier".into(), AttrValue::String("silver".into()))];
        assert_eq!(admit(&mut w, &older, 2, 0), Admit::Stale);
        assert!(w.is_empty());
    }

    #[test]
    fn email_and_external_id_are_different_users() {
        let mut w = Window::new(cfg());
        let mut e = ev("a", "x", "s", Change::Entered, 1);
        admit(&mut w, &e, 0, 0);
        e.event_id = "b".into();
        e.external_id = None;
        e.email = Some("x".into());
        admit(&mut w, &e, 1, 0);
        assert_eq!(w.pending_users(), 2);
    }

    proptest! {
        /// Whatever the arrival order, flushing and delivering everything leaves each
        /// (user, segment) at the change of its greatest order, and every record settles once.
        #[test]
        fn delivered_state_is_last_write_wins(
            events in proptest::collection::vec((0u8..5, 0u8..3, any::<bool>(), 0i64..6), 1..80),
            flush_every in 1usize..20,
        ) {
            let mut w: Window<i64> = Window::new(WindowConfig { batch_size: 4, ..cfg() });
            let mut state: HashMap<(String, String), Change> = HashMap::new();
            let mut expected: HashMap<(String, String), (Order, Change)> = HashMap::new();
            let mut settled = vec![0u32; events.len()];
            let deliver = |w: &mut Window<i64>, f: Flush<i64>, settled: &mut Vec<u32>,
                               state: &mut HashMap<(String, String), Change>| {
                for p in &f.settled_now { settled[*p as usize] += 1; }
                for u in &f.users {
                    for (s, c) in f.user_changes(u) {
                        state.insert((u.id.to_string(), w.segments().name(*s).to_string()), *c);
                    }
                    for p in f.user_positions(u) { settled[*p as usize] += 1; }
                    w.complete(&f, u, false);
                }
            };
            for (i, (user, seg, entered, seq)) in events.iter().enumerate() {
                let change = if *entered { Change::Entered } else { Change::Exited };
                let e = ev(&format!("e{i}"), &format!("u{user}"), &format!("s{seg}"), change, *seq);
                let order = Order::of(&e, 0, i as i64);
                let k = (format!("u{user}"), format!("s{seg}"));
                if expected.get(&k).is_none_or(|(o, _)| order > *o) {
                    expected.insert(k, (order, change));
                }
                match admit(&mut w, &e, i as i64, 0) {
                    Admit::Duplicate | Admit::Stale => settled[i] += 1,
                    Admit::Pending | Admit::Superseded => {}
                }
                if i % flush_every == 0 {
                    while let Some(f) = w.pop_batch(0, true) {
                        deliver(&mut w, f, &mut settled, &mut state);
                    }
                }
            }
            while let Some(f) = w.pop_batch(0, true) {
                deliver(&mut w, f, &mut settled, &mut state);
            }
            prop_assert!(w.is_empty());
            prop_assert!(settled.iter().all(|&n| n == 1), "settled {:?}", settled);
            for (k, (_, change)) in expected {
                prop_assert_eq!(state.get(&k), Some(&change), "{:?}", k);
            }
        }
    }
}
