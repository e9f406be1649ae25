//! The coalescing window: pending segment changes per user, last write wins.
//!
//! Pure logic, driven by the pipeline with explicit times so it can be tested without a clock.
//! It knows nothing of Kafka or HTTP: a record's position is an opaque `P` that comes back out
//! of the window when the record is settled (delivered, superseded, dropped).
//!
//! Memory is what the hot path is designed around (docs/design.md: ≤ 300 bytes a pending user):
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

/// Last-write-wins order of docs/design.md: (sequence, occurred_at, partition, offset).
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
    /// Each name as a JSON string, quotes included, escaped once here rather than in every
    /// object that writes it.
    json: Vec<Box<str>>,
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

    /// `hash` is `segment_hash(id)`, computed once an event (`Window::lookup`).
    fn find(&self, id: &str, hash: u64) -> Option<u32> {
        let names = &self.names;
        self.index
            .find(hash, |&i| &*names[i as usize] == id)
            .copied()
    }

    fn intern(&mut self, id: &str, hash: u64) -> u32 {
        if let Some(i) = self.find(id, hash) {
            return i;
        }
        let i = self.names.len() as u32;
        let json = serde_json::to_string(id).expect("a str serialises");
        self.bytes += id.len() + json.len() + 2 * std::mem::size_of::<Box<str>>() + 4;
        self.names.push(id.into());
        self.json.push(json.into());
        let names = &self.names;
        self.index
            .insert_unique(hash, i, |&j| segment_hash(&names[j as usize]));
        i
    }

    pub fn name(&self, index: u32) -> &str {
        &self.names[index as usize]
    }

    /// Interns a name outside the window (a replay's fold), hashing it here.
    pub fn intern_name(&mut self, id: &str) -> u32 {
        self.intern(id, segment_hash(id))
    }

    /// The name as a JSON string, quotes included.
    pub fn json(&self, index: u32) -> &str {
        &self.json[index as usize]
    }
}

/// What was last sent for a (user, segment) or a user's extra attribute, or, `restored`,
/// the greatest version read back from a partition's history when it was assigned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sent {
    order: Order,
    change: Change,
    /// Read back, not delivered by this worker: it orders (an older change is stale) but
    /// never proves a change redundant (the record may have been rejected and dead-lettered),
    /// and it gives way first when the memory is full.
    restored: bool,
}

impl Packed for Sent {
    const WORDS: usize = 4;

    fn pack(&self, out: &mut [u64]) {
        out[0] = self.order.sequence as u64;
        out[1] = self.order.occurred_at as u64;
        let entered = u64::from(self.change == Change::Entered);
        let restored = u64::from(self.restored) << 1;
        out[2] = (self.order.partition as u32 as u64) << 2 | restored | entered;
        out[3] = self.order.offset as u64;
    }

    fn unpack(w: &[u64]) -> Sent {
        Sent {
            order: Order {
                sequence: w[0] as i64,
                occurred_at: w[1] as i64,
                partition: (w[2] >> 2) as u32 as i32,
                offset: w[3] as i64,
            },
            change: if w[2] & 1 == 1 {
                Change::Entered
            } else {
                Change::Exited
            },
            restored: w[2] & 2 != 0,
        }
    }

    fn gives_way(&self) -> bool {
        self.restored
    }
}

/// One (user, segment) change waiting to be flushed, in 48 bytes with a `Position` so that
/// three fit in the slot itself (docs/design.md: ≤ 300 bytes a pending user with three changes).
/// The order is kept field by field, not as an `Order` (whose padding would not be shared),
/// and the change rides in the segment index's low bit.
#[derive(Clone, Copy)]
struct PendingChange<P> {
    sequence: i64,
    occurred_at: i64,
    offset: i64,
    partition: i32,
    /// Segment index << 1 | 1 when ENTERED (segment indexes stay below `MAX_SEGMENTS`).
    segment_change: u32,
    /// The first record this change settles. Those it superseded, or that superseded it,
    /// are the slot's `More::extra`, so the common change with one record holds no list.
    first: P,
}

impl<P> PendingChange<P> {
    fn new(segment: u32, change: Change, order: Order, first: P) -> PendingChange<P> {
        let mut c = PendingChange {
            sequence: 0,
            occurred_at: 0,
            offset: 0,
            partition: 0,
            segment_change: 0,
            first,
        };
        c.set(segment, change, order);
        c
    }

    fn set(&mut self, segment: u32, change: Change, order: Order) {
        self.sequence = order.sequence;
        self.occurred_at = order.occurred_at;
        self.offset = order.offset;
        self.partition = order.partition;
        self.segment_change = segment << 1 | u32::from(change == Change::Entered);
    }

    fn segment(&self) -> u32 {
        self.segment_change >> 1
    }

    fn change(&self) -> Change {
        if self.segment_change & 1 == 1 {
            Change::Entered
        } else {
            Change::Exited
        }
    }

    fn order(&self) -> Order {
        Order {
            sequence: self.sequence,
            occurred_at: self.occurred_at,
            partition: self.partition,
            offset: self.offset,
        }
    }
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

/// What few pending users have, out of the slot so that the many without it stay small.
struct More<P> {
    attrs: Vec<PendingAttr<P>>,
    /// Records settled by a change beyond its `first`, tagged with the change's segment.
    extra: Vec<(u32, P)>,
}

impl<P> Default for More<P> {
    fn default() -> Self {
        More {
            attrs: Vec::new(),
            extra: Vec::new(),
        }
    }
}

fn more<P>(more: &mut Option<Box<More<P>>>) -> &mut More<P> {
    more.get_or_insert_with(Box::default)
}

fn attrs<P>(more: &Option<Box<More<P>>>) -> &[PendingAttr<P>] {
    more.as_deref().map_or(&[], |m| &m.attrs)
}

/// Changes a slot holds without a heap allocation: docs/design.md's pending user has up to three.
const INLINE_CHANGES: usize = 3;

/// How many events ahead of the one being admitted a caller calls `Window::prefetch` (and
/// `prefetch_key` half as far): far enough for main memory to answer (a few hundred
/// nanoseconds, a few events' work), near enough that the lines are still there when their
/// event comes.
pub const PREFETCH_AHEAD: usize = 8;

/// How many users ahead a flush starts loading their slots (see `Window::prefetch_flush`).
const FLUSH_AHEAD: usize = 8;

/// Cache lines a slot spans, for `Window::prefetch`.
const SLOT_LINES: usize = std::mem::size_of::<Slot<[u64; 2]>>().div_ceil(64);

struct Slot<P> {
    key: Arc<str>,
    /// `user_hash(kind, key)`: a flush and a release find the slot's table entry and its
    /// memories' keys without reading the key, which lives in another cache line.
    hash: u64,
    kind: IdKind,
    live: bool,
    queued: bool,
    in_flight: bool,
    /// Its entries came back from a request given up: each carries every kept record, so
    /// the next flush lists each record once.
    requeued: bool,
    first_pending_ms: u64,
    changes: SmallVec<[PendingChange<P>; INLINE_CHANGES]>,
    more: Option<Box<More<P>>>,
}

impl<P> Slot<P> {
    fn is_pending(&self) -> bool {
        !self.changes.is_empty() || !attrs(&self.more).is_empty()
    }
}

/// Slots in chunks of fixed capacity rather than one vector: a vector doubling its capacity
/// holds up to twice the slots in use (1.3 times at 100,000 users), and copies them all
/// each time it grows. The first chunk grows from small, so a small window stays small.
struct Slab<T> {
    chunks: Vec<Vec<T>>,
}

const CHUNK_BITS: u32 = 10;
const CHUNK: usize = 1 << CHUNK_BITS;

impl<T> Slab<T> {
    fn new() -> Slab<T> {
        Slab { chunks: Vec::new() }
    }

    fn len(&self) -> usize {
        self.chunks
            .last()
            .map_or(0, |c| (self.chunks.len() - 1) * CHUNK + c.len())
    }

    fn push(&mut self, value: T) -> u32 {
        let index = self.len() as u32;
        match self.chunks.last_mut() {
            Some(c) if c.len() < CHUNK => c.push(value),
            _ => {
                let mut c = Vec::with_capacity(if self.chunks.is_empty() { 4 } else { CHUNK });
                c.push(value);
                self.chunks.push(c);
            }
        }
        index
    }

    /// Where element `i` would be, without reading it (or checking it exists).
    fn address(&self, i: u32) -> *const T {
        match self.chunks.get((i >> CHUNK_BITS) as usize) {
            Some(c) => c.as_ptr().wrapping_add(i as usize & (CHUNK - 1)),
            None => std::ptr::null(),
        }
    }
}

impl<T> std::ops::Index<u32> for Slab<T> {
    type Output = T;
    fn index(&self, i: u32) -> &T {
        &self.chunks[(i >> CHUNK_BITS) as usize][i as usize & (CHUNK - 1)]
    }
}

impl<T> std::ops::IndexMut<u32> for Slab<T> {
    fn index_mut(&mut self, i: u32) -> &mut T {
        &mut self.chunks[(i >> CHUNK_BITS) as usize][i as usize & (CHUNK - 1)]
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

/// A user the window never held (a replay's fold sends final states itself): see
/// `Flush::push_user`.
pub const NO_SLOT: u32 = u32::MAX;

impl<P> Flush<P> {
    /// Appends one attributes object built outside the window (a replay's fold): its
    /// changes and attributes with their orders, and the records it settles.
    pub fn push_user(
        &mut self,
        kind: IdKind,
        id: Arc<str>,
        changes: impl IntoIterator<Item = (u32, Change, Order)>,
        attributes: impl IntoIterator<Item = (Box<str>, AttrValue<'static>, Order)>,
        positions: impl IntoIterator<Item = P>,
    ) {
        let c0 = self.changes.len() as u32;
        let a0 = self.attributes.len() as u32;
        let p0 = self.positions.len() as u32;
        for (segment, change, order) in changes {
            self.changes.push((segment, change));
            self.orders.push(order);
        }
        for (name, value, order) in attributes {
            self.attributes.push((name, value));
            self.attribute_orders.push(order);
        }
        self.positions.extend(positions);
        self.users.push(FlushedUser {
            slot: NO_SLOT,
            kind,
            id,
            changes: c0..self.changes.len() as u32,
            attributes: a0..self.attributes.len() as u32,
            positions: p0..self.positions.len() as u32,
        });
    }

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
    slots: Slab<Slot<P>>,
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

/// See `Window::crowded`; also what one attributes object carries at most.
pub const MAX_ENTRIES_PER_USER: usize = 256;

/// What a pending change or attribute costs beyond its slot, as `max_pending_bytes` counts.
const CHANGE_BYTES: usize = std::mem::size_of::<PendingChange<[u64; 2]>>();

// Three changes inline are what keeps a pending user under docs/design.md's 300 bytes.
const _: () = assert!(CHANGE_BYTES == 48);

fn attr_bytes(name: &str, value: &AttrValue<'_>) -> usize {
    let value = match value {
        AttrValue::String(s) => s.len(),
        _ => 0,
    };
    std::mem::size_of::<PendingAttr<[u64; 2]>>() + name.len() + value
}

/// See `Window::lookup`.
#[derive(Debug, Clone, Copy)]
pub struct Lookup {
    user: u64,
    event: u64,
    segment: u64,
}

fn identity_key(identity: Identity<'_>) -> (IdKind, &str) {
    match identity {
        Identity::ExternalId(v) => (IdKind::ExternalId, v),
        Identity::Email(v) => (IdKind::Email, v),
    }
}

fn user_hash(kind: IdKind, id: &str) -> u64 {
    let mut h = FxHasher::default();
    kind.hash(&mut h);
    id.hash(&mut h);
    h.finish()
}

fn segment_hash(id: &str) -> u64 {
    FxBuildHasher.hash_one(id)
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
            slots: Slab::new(),
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
            .map(|&s| self.slots[s].first_pending_ms + self.cfg.linger_ms)
    }

    fn find(&self, kind: IdKind, id: &str, hash: u64) -> Option<u32> {
        let slots = &self.slots;
        self.table
            .find(hash, |&i| {
                let s = &slots[i];
                s.hash == hash && s.kind == kind && &*s.key == id
            })
            .copied()
    }

    /// The hashes an event's admission looks up, computed once for `prefetch` and `admit_as`.
    pub fn lookup(&self, event: &Event<'_>, identity: Identity<'_>) -> Lookup {
        let (kind, id) = identity_key(identity);
        Lookup {
            user: user_hash(kind, id),
            event: event_id_hash(&event.event_id),
            segment: segment_hash(&event.segment_id),
        }
    }

    /// Starts loading what admitting this event will read first: its bucket of the event ids
    /// seen, its (user, segment) bucket of what was sent, its user's slot. Call it some
    /// events ahead of `admit_as`, then `prefetch_key` a few events later, once the slot has
    /// arrived. Changes nothing.
    pub fn prefetch(&self, lookup: &Lookup, event: &Event<'_>) {
        self.seen.prefetch(lookup.event);
        if let Some(segment) = self.segments.find(&event.segment_id, lookup.segment) {
            self.delivered.prefetch(segment_key(lookup.user, segment));
        }
        let slots = &self.slots;
        // The first slot whose table tag matches, nearly always the user's, without reading
        // it: the probe only computes its address. Stopping there spares the probe the
        // groups after it, which a search for a match that never comes would walk.
        self.table.find(lookup.user, |&i| {
            crate::prefetch::read(slots.address(i), SLOT_LINES);
            true
        });
    }

    /// The second step of `prefetch`: the user's key, through the slot loaded since.
    pub fn prefetch_key(&self, lookup: &Lookup) {
        let slots = &self.slots;
        self.table.find(lookup.user, |&i| {
            let s = &slots[i];
            let mine = s.hash == lookup.user;
            if mine {
                crate::prefetch::read(s.key.as_ptr(), 1);
            }
            mine
        });
    }

    fn create(&mut self, kind: IdKind, id: &str, hash: u64) -> u32 {
        let slot = Slot {
            key: Arc::from(id),
            hash,
            kind,
            live: true,
            queued: false,
            in_flight: false,
            requeued: false,
            first_pending_ms: 0,
            changes: SmallVec::new(),
            more: None,
        };
        let idx = match self.free.pop() {
            Some(i) => {
                self.slots[i] = slot;
                i
            }
            None => self.slots.push(slot),
        };
        let slots = &self.slots;
        self.table.insert_unique(hash, idx, |&j| slots[j].hash);
        self.users += 1;
        self.pending_bytes += id.len();
        idx
    }

    fn release(&mut self, idx: u32) {
        let hash = self.slots[idx].hash;
        if let Ok(entry) = self.table.find_entry(hash, |&i| i == idx) {
            entry.remove();
        }
        let s = &mut self.slots[idx];
        let held = s.key.len()
            + s.changes.len() * CHANGE_BYTES
            + attrs(&s.more)
                .iter()
                .map(|a| attr_bytes(&a.name, &a.value))
                .sum::<usize>();
        self.pending_bytes = self.pending_bytes.saturating_sub(held);
        s.live = false;
        s.key = self.empty_key.clone();
        s.changes = SmallVec::new();
        s.more = None;
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
        let lookup = self.lookup(event, identity);
        self.admit_as(&lookup, event, identity, partition, offset, pos, now_ms)
    }

    /// `admit`, with the hashes `lookup` computed for the event (and `identity`) before.
    #[allow(clippy::too_many_arguments)]
    pub fn admit_as(
        &mut self,
        lookup: &Lookup,
        event: &Event<'_>,
        identity: Identity<'_>,
        partition: i32,
        offset: i64,
        pos: P,
        now_ms: u64,
    ) -> Admit {
        let (kind, id) = identity_key(identity);
        // A lookup of another event would file this one under another user's hash.
        debug_assert_eq!(lookup.user, user_hash(kind, id), "lookup of another user");
        debug_assert_eq!(lookup.event, event_id_hash(&event.event_id));
        debug_assert_eq!(lookup.segment, segment_hash(&event.segment_id));
        if self.seen.put(lookup.event, ()).is_some() {
            return Admit::Duplicate;
        }
        let order = Order::of(event, partition, offset);
        let hash = lookup.user;
        let segment = self.segments.intern(&event.segment_id, lookup.segment);
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
        let slot = &mut self.slots[idx];
        let was_pending = slot.is_pending();
        let mut result = Admit::Pending;
        // A stale change is not applied; only its newer attributes are, and the record
        // settles with them.
        let mut carried = Some(pos).filter(|_| stale);
        if !stale {
            match slot.changes.iter_mut().find(|c| c.segment() == segment) {
                Some(c) => {
                    if order > c.order() {
                        c.set(segment, event.change, order);
                    } else {
                        result = Admit::Superseded;
                    }
                    more(&mut slot.more).extra.push((segment, pos));
                }
                None => {
                    slot.changes
                        .push(PendingChange::new(segment, event.change, order, pos));
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
            let attrs = &mut more(&mut slot.more).attrs;
            match attrs.iter_mut().find(|a| *a.name == **name) {
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
                    attrs.push(PendingAttr {
                        name: (**name).into(),
                        value: value.clone().into_owned(),
                        order,
                        positions: carried.take().into_iter().collect(),
                    })
                }
            }
        }
        if slot.changes.len().max(attrs(&slot.more).len()) >= MAX_ENTRIES_PER_USER {
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
        self.slots[idx].first_pending_ms + self.cfg.linger_ms <= now_ms
    }

    /// Takes up to `batch_size` users, oldest first, when a flush is due. Their slots stay
    /// in flight until `complete`, so no user is in two requests at once. Changes equal to what
    /// was last delivered for the (user, segment) are left out and their records settle now.
    pub fn pop_batch(&mut self, now_ms: u64, force: bool) -> Option<Flush<P>> {
        if !self.flush_due(now_ms, force) {
            return None;
        }
        // Sized for a full request of users with a change or two each: grown one push at a
        // time, these vectors were 3% of the hot path's instructions.
        let users = self.cfg.batch_size.min(self.pending_users);
        let mut flush = Flush {
            users: Vec::with_capacity(users),
            changes: Vec::with_capacity(users * 2),
            orders: Vec::with_capacity(users * 2),
            positions: Vec::with_capacity(users * 2),
            ..Flush::default()
        };
        // Judged once, so that a request under pressure is a full one.
        let early = force || self.crowded || self.under_pressure();
        self.crowded = false;
        for &idx in self.queue.iter().take(FLUSH_AHEAD) {
            crate::prefetch::read(self.slots.address(idx), SLOT_LINES);
        }
        while flush.users.len() < self.cfg.batch_size {
            let Some(&idx) = self.queue.front() else {
                break;
            };
            self.prefetch_flush(FLUSH_AHEAD);
            if !(early || self.is_ready(idx, now_ms)) {
                break;
            }
            self.queue.pop_front();
            self.take_user(idx, &mut flush);
        }
        if flush.users.is_empty() && flush.settled_now.is_empty() {
            return None;
        }
        Some(flush)
    }

    /// Takes up to `batch_size` waiting users that hold a record `pick` accepts, whatever
    /// their linger, oldest first, and leaves every other user waiting: the drain of a revoke
    /// sends what the revoked partitions need, and the users of the partitions kept keep
    /// coalescing. `None` when no such user waits.
    pub fn pop_batch_holding(&mut self, pick: impl Fn(&P) -> bool) -> Option<Flush<P>> {
        let mut chosen = Vec::new();
        for &idx in &self.queue {
            if chosen.len() >= self.cfg.batch_size {
                break;
            }
            let s = &self.slots[idx];
            let holds = s.changes.iter().any(|c| pick(&c.first))
                || s.more.as_deref().is_some_and(|m| {
                    m.extra.iter().any(|(_, p)| pick(p))
                        || m.attrs.iter().any(|a| a.positions.iter().any(&pick))
                });
            if holds {
                chosen.push(idx);
            }
        }
        if chosen.is_empty() {
            return None;
        }
        // Rare (a revoke) and bounded by the queue: a scan rather than an index.
        self.queue.retain(|i| !chosen.contains(i));
        let mut flush = Flush::default();
        for idx in chosen {
            self.take_user(idx, &mut flush);
        }
        if flush.users.is_empty() && flush.settled_now.is_empty() {
            return None;
        }
        Some(flush)
    }

    /// Takes a user just taken off the queue into `flush`: its changes (less those equal to
    /// what was last delivered), attributes and records. The slot is in flight from now on,
    /// or released when nothing was left to write.
    #[inline]
    fn take_user(&mut self, idx: u32, flush: &mut Flush<P>) {
        let slot = &mut self.slots[idx];
        slot.queued = false;
        if !slot.is_pending() {
            // Emptied by a revoke while queued.
            if !slot.in_flight {
                self.release(idx);
            }
            return;
        }
        let changes = std::mem::take(&mut slot.changes);
        let More { attrs, extra } = slot.more.take().map_or_else(More::default, |m| *m);
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
        let (kind, key, hash) = (slot.kind, slot.key.clone(), slot.hash);
        let c0 = flush.changes.len() as u32;
        let a0 = flush.attributes.len() as u32;
        let p0 = flush.positions.len() as u32;
        for c in &changes {
            let dk = segment_key(hash, c.segment());
            let sent = Sent {
                order: c.order(),
                change: c.change(),
                restored: false,
            };
            let redundant = self
                .delivered
                .put(dk, sent)
                .is_some_and(|last| !last.restored && last.change == c.change());
            if redundant {
                flush.redundant += 1;
            } else {
                flush.changes.push((c.segment(), c.change()));
                flush.orders.push(c.order());
            }
        }
        // Extra attributes cannot be shown redundant (their last values are not kept), so
        // they are written even when every segment change was. The object settles every
        // record of the user, those of its redundant changes too; a user with nothing to
        // write settles them all now.
        let written = flush.changes.len() as u32 > c0 || !attrs.is_empty();
        let settle = if written {
            &mut flush.positions
        } else {
            &mut flush.settled_now
        };
        settle.extend(changes.iter().map(|c| c.first));
        settle.extend(extra.iter().map(|&(_, p)| p));
        if written {
            for a in attrs {
                let dk = delivered_key(kind, &key, &a.name);
                let sent = Sent {
                    order: a.order,
                    change: Change::Entered,
                    restored: false,
                };
                self.delivered.put(dk, sent);
                flush.positions.extend(a.positions);
                flush.attributes.push((a.name, a.value));
                flush.attribute_orders.push(a.order);
            }
            if std::mem::take(&mut self.slots[idx].requeued) {
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
            self.slots[idx].in_flight = true;
        } else {
            self.release(idx);
        }
    }

    /// Starts loading what flushing the user `ahead` places down the queue will read: its
    /// slot, and for the one half as far, whose slot has arrived, its key and its changes'
    /// buckets of what was sent.
    fn prefetch_flush(&self, ahead: usize) {
        if let Some(&far) = self.queue.get(ahead) {
            crate::prefetch::read(self.slots.address(far), SLOT_LINES);
        }
        if let Some(&near) = self.queue.get(ahead / 2) {
            let s = &self.slots[near];
            crate::prefetch::read(s.key.as_ptr(), 1);
            for c in &s.changes {
                self.delivered.prefetch(segment_key(s.hash, c.segment()));
            }
        }
    }

    /// Starts loading the slot `complete` will read for this user: call it a few users
    /// ahead when completing a request's users in turn.
    pub fn prefetch_user(&self, user: &FlushedUser) {
        crate::prefetch::read(self.slots.address(user.slot), SLOT_LINES);
    }

    /// A request holding this user has finished. `rejected` forgets what the window believed
    /// was delivered, so a later change is neither stale nor redundant against it.
    pub fn complete(&mut self, flush: &Flush<P>, user: &FlushedUser, rejected: bool) {
        if rejected {
            self.forget_sent(flush, user);
        }
        let slot = &mut self.slots[user.slot];
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
        // Not the slot's hash: the slot may hold another user by now. Rare (a rejection, a
        // request given up), so the key is hashed again.
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
            let slot = &self.slots[user.slot];
            slot.live && slot.in_flight && Arc::ptr_eq(&slot.key, &user.id)
        };
        if !live {
            return;
        }
        if kept.is_empty() {
            self.complete(flush, user, false);
            return;
        }
        let slot = &mut self.slots[user.slot];
        let was_pending = slot.is_pending();
        // The user's object is written whole, so its records settle with whichever entry
        // is delivered. Each requeued entry carries them all: an entry without a position
        // would be taken for one whose records were revoked, and dropped.
        let changes = user.changes.start as usize..user.changes.end as usize;
        for ((segment, change), order) in flush.changes[changes.clone()]
            .iter()
            .zip(&flush.orders[changes])
        {
            // A change pending for the segment got past the window while this one was in
            // flight, so it is newer.
            if slot.changes.iter().any(|c| c.segment() == *segment) {
                continue;
            }
            slot.changes
                .push(PendingChange::new(*segment, *change, *order, kept[0]));
            if kept.len() > 1 {
                more(&mut slot.more)
                    .extra
                    .extend(kept[1..].iter().map(|&p| (*segment, p)));
            }
            self.pending_changes += 1;
            self.pending_bytes += CHANGE_BYTES;
        }
        let attributes = user.attributes.start as usize..user.attributes.end as usize;
        if !attributes.is_empty() {
            let attrs = &mut more(&mut slot.more).attrs;
            for ((name, value), order) in flush.attributes[attributes.clone()]
                .iter()
                .zip(&flush.attribute_orders[attributes])
            {
                if attrs.iter().any(|a| a.name == *name) {
                    continue;
                }
                self.pending_bytes += attr_bytes(name, value);
                attrs.push(PendingAttr {
                    name: name.clone(),
                    value: value.clone(),
                    order: *order,
                    positions: Vec::new(),
                });
            }
        }
        if let Some(m) = slot.more.as_deref_mut() {
            for a in m.attrs.iter_mut().filter(|a| a.positions.is_empty()) {
                a.positions.extend(kept.iter().copied());
            }
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

    /// Loads a version read back from a newly assigned partition's history (below its
    /// committed offset, so settled): kept when it is greater, by the last-write-wins order,
    /// than what is remembered of the (user, segment). From then on an older change is stale;
    /// a change equal to it is still written, since the record may have been rejected. It
    /// gives way first when the memory is full and never pushes out a delivered version.
    /// Returns whether it was kept.
    pub fn restore_change(
        &mut self,
        kind: IdKind,
        id: &str,
        segment_id: &str,
        change: Change,
        order: Order,
    ) -> bool {
        if self.segments.is_full() {
            return false;
        }
        let segment = self.segments.intern(segment_id, segment_hash(segment_id));
        let key = segment_key(user_hash(kind, id), segment);
        self.restore_at(key, change, order)
    }

    /// `restore_change` for a user's extra attribute.
    pub fn restore_attribute(&mut self, kind: IdKind, id: &str, name: &str, order: Order) -> bool {
        self.restore_at(delivered_key(kind, id, name), Change::Entered, order)
    }

    fn restore_at(&mut self, key: u64, change: Change, order: Order) -> bool {
        if self
            .delivered
            .get(key)
            .is_some_and(|had| had.order >= order)
        {
            return false;
        }
        let sent = Sent {
            order,
            change,
            restored: true,
        };
        self.delivered.put(key, sent);
        self.delivered.get(key) == Some(sent)
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
        for idx in 0..self.slots.len() as u32 {
            let slot = &mut self.slots[idx];
            if !slot.live || !slot.is_pending() {
                continue;
            }
            let before = slot.changes.len();
            let mut none = More::default();
            let m = slot.more.as_deref_mut().unwrap_or(&mut none);
            m.extra.retain(|(_, p)| !gone(p));
            for c in slot.changes.iter_mut().filter(|c| gone(&c.first)) {
                // Its next record, if one is left, becomes its first.
                if let Some(i) = m.extra.iter().position(|&(s, _)| s == c.segment()) {
                    c.first = m.extra.remove(i).1;
                }
            }
            slot.changes.retain(|c| !gone(&c.first));
            for a in m.attrs.iter_mut() {
                a.positions.retain(|p| !gone(p));
            }
            if slot.changes.is_empty() {
                let freed: usize = m
                    .attrs
                    .iter()
                    .filter(|a| a.positions.is_empty())
                    .map(|a| attr_bytes(&a.name, &a.value))
                    .sum();
                self.pending_bytes = self.pending_bytes.saturating_sub(freed);
                m.attrs.retain(|a| !a.positions.is_empty());
            }
            let removed = before - slot.changes.len();
            self.pending_bytes = self.pending_bytes.saturating_sub(removed * CHANGE_BYTES);
            dropped += removed;
            self.pending_changes -= removed;
            if !slot.is_pending() {
                self.pending_users -= 1;
                // A queued slot is released when the queue reaches it.
                if !slot.queued && !slot.in_flight {
                    self.release(idx);
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
    fn a_revoke_keeps_a_change_whose_later_records_stay() {
        let mut w = Window::new(cfg());
        for (i, seg) in ["s", "t", "u", "v"].iter().enumerate() {
            admit(
                &mut w,
                &ev(&format!("{seg}1"), "u1", seg, Change::Entered, 1),
                i as i64,
                0,
            );
        }
        admit(&mut w, &ev("s2", "u1", "s", Change::Exited, 2), 10, 0);
        admit(&mut w, &ev("t0", "u1", "t", Change::Exited, 0), 11, 0);
        // s's first record and t's later one go; u and v lose their only ones.
        assert_eq!(w.drop_positions(|p| [0, 11, 2, 3].contains(p)), 2);
        let f = w.pop_batch(0, true).unwrap();
        assert_eq!(
            written(&w, &f),
            vec![
                ("u1".into(), "s".into(), Change::Exited),
                ("u1".into(), "t".into(), Change::Entered),
            ]
        );
        let mut positions = f.positions.clone();
        positions.sort();
        assert_eq!(positions, vec![1, 10]);
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

    fn order(seq: i64, offset: i64) -> Order {
        Order {
            sequence: seq,
            occurred_at: 1_000,
            partition: 0,
            offset,
        }
    }

    fn deliver(w: &mut Window<i64>) -> Flush<i64> {
        let f = w.pop_batch(u64::MAX / 2, true).unwrap();
        for u in &f.users {
            w.complete(&f, u, false);
        }
        f
    }

    #[test]
    fn a_restored_version_makes_older_changes_stale_and_never_redundant() {
        let mut w = Window::new(cfg());
        let ext = IdKind::ExternalId;
        assert!(w.restore_change(ext, "u1", "s", Change::Entered, order(10, 3)));
        assert!(w.restore_change(ext, "u2", "s", Change::Entered, order(10, 4)));
        // Older, read after the restore: stale.
        assert_eq!(
            admit(&mut w, &ev("a", "u1", "s", Change::Exited, 5), 10, 0),
            Admit::Stale
        );
        assert_eq!(w.pending_users(), 0);
        // Newer and equal in value to what was restored: written all the same, as the
        // restored record may have been rejected.
        assert_eq!(
            admit(&mut w, &ev("b", "u2", "s", Change::Entered, 11), 11, 0),
            Admit::Pending
        );
        let f = deliver(&mut w);
        assert_eq!(f.redundant, 0);
        assert!(f.settled_now.is_empty());
        assert_eq!(
            written(&w, &f),
            vec![("u2".into(), "s".into(), Change::Entered)]
        );
        // Once delivered by this worker, an equal change is redundant as usual.
        admit(&mut w, &ev("c", "u2", "s", Change::Entered, 12), 12, 0);
        let f = w.pop_batch(u64::MAX / 2, true).unwrap();
        assert_eq!(f.redundant, 1);
    }

    #[test]
    fn the_greatest_restored_version_wins_whatever_the_offset_order() {
        let mut w = Window::new(cfg());
        let ext = IdKind::ExternalId;
        // A misordered history: the newer change (sequence 10) at the lower offset.
        assert!(w.restore_change(ext, "u1", "s", Change::Entered, order(10, 1)));
        assert!(!w.restore_change(ext, "u1", "s", Change::Exited, order(7, 5)));
        // Without a sequence, occurred_at orders, then the offset.
        let late = Order {
            sequence: i64::MIN,
            occurred_at: 2_000,
            partition: 0,
            offset: 2,
        };
        assert!(w.restore_change(ext, "u3", "s", Change::Exited, late));
        assert!(!w.restore_change(
            ext,
            "u3",
            "s",
            Change::Entered,
            Order {
                occurred_at: 1_500,
                offset: 9,
                ..late
            }
        ));
        for (id, seq) in [("a", 8), ("b", 9)] {
            assert_eq!(
                admit(&mut w, &ev(id, "u1", "s", Change::Exited, seq), 20, 0),
                Admit::Stale,
                "sequence {seq}"
            );
        }
        assert_eq!(
            admit(&mut w, &ev("d", "u1", "s", Change::Exited, 11), 21, 0),
            Admit::Pending
        );
        // A restored version never lowers what this worker delivered.
        let f = deliver(&mut w);
        assert_eq!(f.users.len(), 1);
        assert!(!w.restore_change(ext, "u1", "s", Change::Entered, order(10, 30)));
        assert_eq!(
            admit(&mut w, &ev("e", "u1", "s", Change::Entered, 10), 22, 0),
            Admit::Stale
        );
    }

    #[test]
    fn a_restored_attribute_makes_an_older_one_unwritten() {
        let mut w = Window::new(cfg());
        assert!(w.restore_attribute(IdKind::ExternalId, "u1", "tier", order(10, 1)));
        let mut old = ev("a", "u1", "s", Change::Entered, 5);
        old.attributes = vec![("tier".into(), AttrValue::String("bronze".into()))];
        assert_eq!(admit(&mut w, &old, 2, 0), Admit::Pending);
        let f = deliver(&mut w);
        assert!(
            f.attributes.is_empty(),
            "the older attribute is not written"
        );
        assert_eq!(
            f.changes.len(),
            1,
            "its segment change, with no restored version, is"
        );
    }

    #[test]
    fn restored_versions_give_way_first_and_never_push_out_a_delivery() {
        // One bucket of four entries: every key meets every other.
        let mut w = Window::new(WindowConfig {
            delivered_memory: 4,
            ..cfg()
        });
        admit(&mut w, &ev("a", "mine", "s", Change::Entered, 10), 0, 0);
        deliver(&mut w);
        let ext = IdKind::ExternalId;
        let kept = (0..10)
            .filter(|i| {
                w.restore_change(ext, &format!("r{i}"), "s", Change::Entered, order(10, *i))
            })
            .count();
        assert!(kept <= 10);
        // What this worker delivered is still remembered.
        assert_eq!(
            admit(&mut w, &ev("b", "mine", "s", Change::Exited, 5), 1, 0),
            Admit::Stale
        );
        // Three deliveries fill the bucket: every restored version has given way to them.
        for i in 0..3 {
            admit(
                &mut w,
                &ev(
                    &format!("d{i}"),
                    &format!("new{i}"),
                    "s",
                    Change::Entered,
                    10,
                ),
                2,
                0,
            );
        }
        deliver(&mut w);
        for i in 0..10 {
            assert_eq!(
                admit(
                    &mut w,
                    &ev(&format!("o{i}"), &format!("r{i}"), "s", Change::Exited, 5),
                    3,
                    0
                ),
                Admit::Pending,
                "r{i} forgotten"
            );
        }
        assert_eq!(
            admit(&mut w, &ev("c", "mine", "s", Change::Exited, 6), 4, 0),
            Admit::Stale
        );
    }

    #[test]
    fn no_delivered_memory_restores_nothing() {
        let mut w = Window::new(WindowConfig {
            delivered_memory: 0,
            ..cfg()
        });
        assert!(!w.restore_change(IdKind::ExternalId, "u1", "s", Change::Entered, order(10, 1)));
        assert_eq!(
            admit(&mut w, &ev("a", "u1", "s", Change::Exited, 5), 1, 0),
            Admit::Pending
        );
    }

    #[test]
    fn a_revoke_flushes_the_users_of_the_revoked_records_only() {
        let mut w = Window::new(WindowConfig {
            batch_size: 2,
            ..cfg()
        });
        // Offsets stand for positions: below 100 on the revoked partition.
        admit(&mut w, &ev("a", "kept1", "s", Change::Entered, 1), 500, 0);
        admit(&mut w, &ev("b", "gone1", "s", Change::Entered, 1), 10, 0);
        admit(&mut w, &ev("c", "kept2", "s", Change::Entered, 1), 501, 0);
        admit(&mut w, &ev("d", "gone2", "s", Change::Entered, 1), 11, 0);
        admit(&mut w, &ev("e", "gone3", "s", Change::Entered, 1), 12, 0);
        // A user with records on both sides goes with the revoked ones.
        admit(&mut w, &ev("f", "kept1", "t", Change::Entered, 1), 13, 0);
        let revoked = |p: &i64| *p < 100;
        let mut sent = Vec::new();
        while let Some(f) = w.pop_batch_holding(revoked) {
            assert!(f.users.len() <= 2);
            sent.extend(written(&w, &f).into_iter().map(|(u, _, _)| u));
        }
        sent.sort();
        sent.dedup();
        assert_eq!(sent, vec!["gone1", "gone2", "gone3", "kept1"]);
        // kept2 still lingers: not due at time 0, due after its linger.
        assert!(w.pop_batch(0, false).is_none());
        let f = w.pop_batch(cfg().linger_ms, false).unwrap();
        assert_eq!(
            written(&w, &f),
            vec![("kept2".into(), "s".into(), Change::Entered)]
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
