//! A backfill's fold: the range a replay reads, reduced to each user's final state.
//!
//! Pure logic apart from the spill files: no Kafka, no HTTP, no clock. A record's position is
//! an opaque `P` that comes back once, through `settle`, when the record decides nothing any
//! more (superseded by a later write of everything it wrote), or inside the request that
//! writes what it decided.
//!
//! Per user it keeps the last write of each (user, segment) and of each extra attribute, by the
//! window's order (`window::Order`: sequence, occurred_at, partition, offset), whatever order
//! the records come in. It holds at most `memory` bytes: past that, every user it holds is
//! written to one of `BUCKETS` files by user hash and forgotten, during the one read of the
//! range; sending then folds and sends the files one at a time, so a bucket is all it holds.

use std::borrow::Cow;
use std::fs::File;
use std::hash::BuildHasher;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hashbrown::{Equivalent, HashMap};
use rustc_hash::FxBuildHasher;

use crate::event::{AttrValue, Change, Event, Identity};
use crate::recent::{Packed, Recent};
use crate::window::{Flush, IdKind, Order, Segments, MAX_ENTRIES_PER_USER};

/// How many files a spilling fold writes users to: each file then holds about 1/64 of the
/// state, so a fold of 64 times its budget is sent bucket by bucket within it.
pub const BUCKETS: usize = 64;

/// A position a fold can write to its spill files and read back.
pub trait Spill: Copy + PartialEq {
    fn pack(&self) -> [u64; 2];
    fn unpack(words: [u64; 2]) -> Self;
}

impl Spill for i64 {
    fn pack(&self) -> [u64; 2] {
        [*self as u64, 0]
    }
    fn unpack(words: [u64; 2]) -> i64 {
        words[0] as i64
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FoldError {
    #[error("replay.spill_dir {dir}: {source}")]
    Spill {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("spill file {file} is damaged")]
    Damaged { file: PathBuf },
}

#[derive(Debug, Clone)]
pub struct FoldConfig {
    /// Bytes the fold's state may hold before it spills (`replay.fold_memory`).
    pub memory: usize,
    /// Where spill files go (`replay.spill_dir`).
    pub spill_dir: PathBuf,
    /// Objects a request carries (`braze.batch_size`).
    pub batch_size: usize,
    /// How many (user, segment) and (user, attribute) writes sent are remembered
    /// (`window.delivered_memory`), so that a change read in a later stage (the tail read
    /// after sending) that is older than what an earlier stage sent is not sent over it.
    pub sent_memory: usize,
}

/// What the fold read and sent, for the replay's summary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FoldStats {
    /// Valid changes folded.
    pub changes_read: u64,
    /// What sending every change as it was read would have written: one attribute per
    /// change and one per extra attribute it carries.
    pub writes_read: u64,
    /// Users sent (a user sent again after a re-read of the tail counts again).
    pub users: u64,
    pub objects: u64,
    pub requests: u64,
    /// Segment changes and extra attributes in the objects sent.
    pub writes: u64,
    /// Changes of a later stage older than what an earlier stage sent: settled, not sent.
    pub stale: u64,
    /// Changes of a later stage newer than, but equal to, what an earlier stage sent for
    /// their (user, segment): settled, not sent.
    pub redundant: u64,
    pub bytes_spilled: u64,
}

#[derive(Clone, Copy)]
struct Entry<P> {
    sequence: i64,
    occurred_at: i64,
    offset: i64,
    partition: i32,
    /// Segment index << 1 | 1 when ENTERED.
    segment_change: u32,
    pos: P,
}

impl<P> Entry<P> {
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

struct Attr<P> {
    name: Box<str>,
    value: AttrValue<'static>,
    order: Order,
    pos: P,
}

#[derive(PartialEq, Eq, Hash)]
struct UserKey {
    kind: IdKind,
    id: Box<str>,
}

/// A user key borrowed from an event: hashes as `UserKey` does.
#[derive(Hash)]
struct UserRef<'a> {
    kind: IdKind,
    id: &'a str,
}

impl Equivalent<UserKey> for UserRef<'_> {
    fn equivalent(&self, key: &UserKey) -> bool {
        self.kind == key.kind && *self.id == *key.id
    }
}

struct User<P> {
    entries: Vec<Entry<P>>,
    attrs: Vec<Attr<P>>,
}

impl<P: Spill> User<P> {
    fn references(&self, pos: P) -> bool {
        self.entries.iter().any(|e| e.pos == pos) || self.attrs.iter().any(|a| a.pos == pos)
    }

    /// The last write of the segment wins; the loser's position is returned (the caller
    /// settles it when nothing else of the user still refers to it).
    fn put_change(&mut self, e: Entry<P>) -> Option<P> {
        let seg = e.segment();
        match self.entries.iter_mut().find(|x| x.segment() == seg) {
            Some(x) if e.order() > x.order() => Some(std::mem::replace(x, e).pos),
            Some(_) => Some(e.pos),
            None => {
                self.entries.push(e);
                None
            }
        }
    }

    fn put_attr(&mut self, a: Attr<P>) -> (Option<P>, isize) {
        match self.attrs.iter_mut().find(|x| x.name == a.name) {
            Some(x) if a.order > x.order => {
                let delta = attr_bytes(&a) as isize - attr_bytes(x) as isize;
                (Some(std::mem::replace(x, a).pos), delta)
            }
            Some(_) => (Some(a.pos), 0),
            None => {
                let bytes = attr_bytes(&a) as isize;
                self.attrs.push(a);
                (None, bytes)
            }
        }
    }

    fn bytes(&self) -> usize {
        self.entries.capacity() * ENTRY_BYTES
            + self.attrs.capacity() * std::mem::size_of::<Attr<P>>()
            + self.attrs.iter().map(attr_heap).sum::<usize>()
    }
}

const ENTRY_BYTES: usize = std::mem::size_of::<Entry<[u64; 2]>>();
/// A user's table entry, its key's box and the table's slack (hashbrown keeps it at most
/// 7/8 full).
const USER_BYTES: usize = (std::mem::size_of::<(UserKey, User<[u64; 2]>)>() + 1) * 8 / 7 + 16;

fn attr_heap<P>(a: &Attr<P>) -> usize {
    a.name.len()
        + match &a.value {
            AttrValue::String(s) => s.len(),
            _ => 0,
        }
}

fn attr_bytes<P>(a: &Attr<P>) -> usize {
    std::mem::size_of::<Attr<P>>() + attr_heap(a)
}

fn user_hash(kind: IdKind, id: &str) -> u64 {
    FxBuildHasher.hash_one(UserRef { kind, id })
}

/// The sent memory's key for a user's segment: the fold's segment indexes last the run.
fn segment_key(user: u64, segment: u32) -> u64 {
    let mixed = (user ^ u64::from(segment).wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_mul(0xBF58_476D_1CE4_E5B9);
    mixed ^ (mixed >> 31)
}

/// The sent memory's key for a user's extra attribute, apart from its segments' keys.
fn attribute_key(user: u64, name: &str) -> u64 {
    FxBuildHasher.hash_one((0xA7u8, user, name))
}

/// An order sent, as the sent memory keeps it, and for a segment whether it was ENTERED.
#[derive(Clone, Copy)]
struct SentOrder(Order, bool);

impl Packed for SentOrder {
    const WORDS: usize = 4;
    fn pack(&self, out: &mut [u64]) {
        out[0] = self.0.sequence as u64;
        out[1] = self.0.occurred_at as u64;
        out[2] = self.0.partition as u32 as u64 | u64::from(self.1) << 32;
        out[3] = self.0.offset as u64;
    }
    fn unpack(w: &[u64]) -> SentOrder {
        SentOrder(
            Order {
                sequence: w[0] as i64,
                occurred_at: w[1] as i64,
                partition: w[2] as u32 as i32,
                offset: w[3] as i64,
            },
            w[2] >> 32 & 1 == 1,
        )
    }
}

type Users<P> = HashMap<UserKey, User<P>, FxBuildHasher>;

/// The users of one read of the range, in memory and in spill files.
struct Stage<P> {
    users: Users<P>,
    bytes: usize,
    spill: Option<SpillFiles>,
}

impl<P> Stage<P> {
    fn new() -> Stage<P> {
        Stage {
            users: Users::default(),
            bytes: 0,
            spill: None,
        }
    }
}

/// The spill files of one stage: a directory of its own under `replay.spill_dir`, removed
/// with it.
struct SpillFiles {
    dir: PathBuf,
    writers: Vec<Option<BufWriter<File>>>,
}

impl SpillFiles {
    fn create(root: &Path) -> Result<SpillFiles, FoldError> {
        let dir = root.join(format!(
            "segment-sync-fold-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).map_err(|source| FoldError::Spill {
            dir: root.to_path_buf(),
            source,
        })?;
        Ok(SpillFiles {
            dir,
            writers: (0..BUCKETS).map(|_| None).collect(),
        })
    }

    fn path(&self, bucket: usize) -> PathBuf {
        self.dir.join(format!("bucket-{bucket:02}"))
    }

    fn io(&self) -> impl FnOnce(std::io::Error) -> FoldError + '_ {
        move |source| FoldError::Spill {
            dir: self.dir.clone(),
            source,
        }
    }

    fn write(&mut self, bucket: usize, bytes: &[u8]) -> Result<(), FoldError> {
        if self.writers[bucket].is_none() {
            let file = File::options()
                .create(true)
                .append(true)
                .open(self.path(bucket))
                .map_err(self.io())?;
            self.writers[bucket] = Some(BufWriter::with_capacity(16 << 10, file));
        }
        let w = self.writers[bucket].as_mut().expect("opened above");
        if let Err(source) = w.write_all(bytes) {
            return Err(FoldError::Spill {
                dir: self.dir.clone(),
                source,
            });
        }
        Ok(())
    }

    fn finish_writing(&mut self) -> Result<(), FoldError> {
        for w in self.writers.iter_mut() {
            if let Some(mut w) = w.take() {
                if let Err(source) = w.flush() {
                    return Err(FoldError::Spill {
                        dir: self.dir.clone(),
                        source,
                    });
                }
            }
        }
        Ok(())
    }
}

impl Drop for SpillFiles {
    fn drop(&mut self) {
        self.writers.iter_mut().for_each(|w| drop(w.take()));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A user being cut into objects: its identifier and the writes not yet in an object.
type Carried<P> = (IdKind, Arc<str>, Vec<Entry<P>>, Vec<Attr<P>>);

/// A stage being sent: its in-memory users, or its spill files bucket by bucket.
struct Sending<P> {
    current: hashbrown::hash_map::IntoIter<UserKey, User<P>>,
    spill: Option<SpillFiles>,
    next_bucket: usize,
    /// The user being cut into objects, when it did not fit the last request.
    carry: Option<Carried<P>>,
}

/// Folds what a replay reads and hands it back as requests. Promises: one read of the range
/// (spilled state is written once and read back once); each user it sends is sent once per
/// stage, in objects of at most `MAX_ENTRIES_PER_USER` writes, holding the last write of each
/// of its segments and attributes; every position it takes comes back exactly once, through
/// `settle` or in a request; memory held beyond a bucket stays under `memory`.
pub struct Fold<P> {
    cfg: FoldConfig,
    segments: Segments,
    /// The order last sent for a (user, segment) or (user, attribute), across stages.
    sent: Recent<SentOrder>,
    stage: Stage<P>,
    sending: Option<Sending<P>>,
    stats: FoldStats,
    scratch: Vec<u8>,
}

impl<P: Spill> Fold<P> {
    pub fn new(cfg: FoldConfig) -> Fold<P> {
        Fold {
            sent: Recent::new(cfg.sent_memory),
            cfg,
            segments: Segments::default(),
            stage: Stage::new(),
            sending: None,
            stats: FoldStats::default(),
            scratch: Vec::new(),
        }
    }

    /// The segment names the requests speak of by index.
    pub fn segments(&self) -> &Segments {
        &self.segments
    }

    pub fn stats(&self) -> FoldStats {
        self.stats
    }

    /// Bytes the in-memory state holds, as the budget counts them.
    pub fn bytes(&self) -> usize {
        self.stage.bytes
    }

    /// Users held in memory by the stage being read.
    pub fn users(&self) -> usize {
        self.stage.users.len()
    }

    /// Spill files of the stage being sent not yet read back: how far a spilled stage's
    /// sending has come (0 when nothing spilled is being sent).
    pub fn spill_buckets_left(&self) -> usize {
        self.sending
            .as_ref()
            .filter(|s| s.spill.is_some())
            .map_or(0, |s| BUCKETS - s.next_bucket)
    }

    /// Nothing read waits to be sent, and nothing is being sent.
    pub fn is_empty(&self) -> bool {
        self.sending.is_none() && self.stage.users.is_empty() && self.stage.spill.is_none()
    }

    /// A stage is being sent: `next_request` has more.
    pub fn is_sending(&self) -> bool {
        self.sending.is_some()
    }

    /// Something was read since the last `start_sending`.
    pub fn has_unsent(&self) -> bool {
        !self.stage.users.is_empty() || self.stage.spill.is_some()
    }

    /// Braze rejected an object of this user: what it wrote is not what Braze holds, so a
    /// later stage must not take a change equal to it as redundant.
    pub fn forget_sent(
        &mut self,
        kind: IdKind,
        id: &str,
        segments: &[u32],
        attributes: &[Box<str>],
    ) {
        let h = user_hash(kind, id);
        for s in segments {
            self.sent.forget(segment_key(h, *s));
        }
        for a in attributes {
            self.sent.forget(attribute_key(h, a));
        }
    }

    /// Folds a valid event read at (partition, offset). Positions that decide nothing any
    /// more, this one included, come back through `settle`.
    pub fn absorb(
        &mut self,
        event: &Event<'_>,
        identity: Identity<'_>,
        partition: i32,
        offset: i64,
        pos: P,
        mut settle: impl FnMut(P),
    ) -> Result<(), FoldError> {
        self.stats.changes_read += 1;
        self.stats.writes_read += 1 + event.attributes.len() as u64;
        let order = Order::of(event, partition, offset);
        let segment = self.segments.intern_name(&event.segment_id);
        let (kind, id) = match identity {
            Identity::ExternalId(v) => (IdKind::ExternalId, v),
            Identity::Email(v) => (IdKind::Email, v),
        };
        let key = UserRef { kind, id };
        let user = match self.stage.users.get_mut(&key) {
            Some(u) => u,
            None => {
                self.stage.bytes += USER_BYTES + id.len();
                self.stage
                    .users
                    .entry(UserKey {
                        kind,
                        id: id.into(),
                    })
                    .or_insert(User {
                        entries: Vec::new(),
                        attrs: Vec::new(),
                    })
            }
        };
        let before = user.bytes() as isize;
        let mut losers: [Option<P>; 2] = [None, None];
        losers[0] = user.put_change(Entry {
            sequence: order.sequence,
            occurred_at: order.occurred_at,
            offset: order.offset,
            partition: order.partition,
            segment_change: segment << 1 | u32::from(event.change == Change::Entered),
            pos,
        });
        let mut more = Vec::new();
        for (name, value) in &event.attributes {
            let (loser, _) = user.put_attr(Attr {
                name: name.as_ref().into(),
                value: value.clone().into_owned(),
                order,
                pos,
            });
            if let Some(l) = loser {
                if losers[1].is_none() {
                    losers[1] = Some(l);
                } else {
                    more.push(l);
                }
            }
        }
        let after = user.bytes() as isize;
        let mut done: smallvec::SmallVec<[P; 4]> = smallvec::SmallVec::new();
        for l in losers.into_iter().flatten().chain(more) {
            // A record can lose its change and its attributes at once: settled once.
            if done.contains(&l) || user.references(l) {
                continue;
            }
            settle(l);
            done.push(l);
        }
        self.stage.bytes = (self.stage.bytes as isize + after - before).max(0) as usize;
        if self.stage.bytes > self.cfg.memory {
            self.spill_stage()?;
        }
        Ok(())
    }

    /// Writes every user held to its bucket's file and forgets them.
    fn spill_stage(&mut self) -> Result<(), FoldError> {
        if self.stage.spill.is_none() {
            self.stage.spill = Some(SpillFiles::create(&self.cfg.spill_dir)?);
        }
        let spill = self.stage.spill.as_mut().expect("created above");
        for (key, user) in self.stage.users.drain() {
            self.scratch.clear();
            encode_user(&mut self.scratch, &key, &user);
            let bucket = (user_hash(key.kind, &key.id) >> 40) as usize % BUCKETS;
            spill.write(bucket, &self.scratch)?;
            self.stats.bytes_spilled += self.scratch.len() as u64;
        }
        // The table's memory goes too: kept, it alone could hold the budget.
        self.stage.users = Users::default();
        self.stage.bytes = 0;
        Ok(())
    }

    /// Everything read so far becomes what `next_request` sends; reading goes on into a new
    /// stage. Call when nothing is being sent.
    pub fn start_sending(&mut self) -> Result<(), FoldError> {
        debug_assert!(self.sending.is_none());
        if self.stage.spill.is_some() && !self.stage.users.is_empty() {
            self.spill_stage()?;
        }
        let mut stage = std::mem::replace(&mut self.stage, Stage::new());
        if let Some(spill) = stage.spill.as_mut() {
            spill.finish_writing()?;
        }
        self.sending = Some(Sending {
            current: stage.users.into_iter(),
            spill: stage.spill,
            next_bucket: 0,
            carry: None,
        });
        Ok(())
    }

    /// The next request of the stage being sent: at most `batch_size` objects. `alive`
    /// says whether a position still counts (its partition still ours); those that do not
    /// are left out and not settled. Positions a bucket's merge supersedes settle through
    /// `settle`. `None` when the stage is sent; the fold then reads into the next one.
    pub fn next_request(
        &mut self,
        alive: impl Fn(&P) -> bool,
        mut settle: impl FnMut(P),
    ) -> Result<Option<Flush<P>>, FoldError> {
        let batch = self.cfg.batch_size.max(1);
        let mut flush = Flush::default();
        let mut users = 0u64;
        while flush.users.len() < batch {
            let Some(sending) = self.sending.as_mut() else {
                break;
            };
            if sending.carry.is_none() {
                match next_user(sending, &mut settle)? {
                    Some((key, mut user)) => {
                        user.entries.retain(|e| alive(&e.pos));
                        user.attrs.retain(|a| alive(&a.pos));
                        // Not newer than what an earlier stage sent: left out, as the
                        // window drops a stale change; newer but the same membership as
                        // sent: left out as redundant (the user's state did not change).
                        let h = user_hash(key.kind, &key.id);
                        let sent = &mut self.sent;
                        let mut stale: smallvec::SmallVec<[P; 4]> = smallvec::SmallVec::new();
                        let mut redundant = 0u64;
                        user.entries.retain(|e| {
                            let k = segment_key(h, e.segment());
                            let entered = e.change() == Change::Entered;
                            match sent.get(k) {
                                Some(SentOrder(o, _)) if o >= e.order() => {
                                    stale.push(e.pos);
                                    false
                                }
                                Some(SentOrder(_, was)) if was == entered => {
                                    sent.put(k, SentOrder(e.order(), entered));
                                    stale.push(e.pos);
                                    redundant += 1;
                                    false
                                }
                                _ => {
                                    sent.put(k, SentOrder(e.order(), entered));
                                    true
                                }
                            }
                        });
                        user.attrs.retain(|a| {
                            let k = attribute_key(h, &a.name);
                            match sent.get(k) {
                                Some(SentOrder(o, _)) if o >= a.order => {
                                    stale.push(a.pos);
                                    false
                                }
                                _ => {
                                    sent.put(k, SentOrder(a.order, false));
                                    true
                                }
                            }
                        });
                        self.stats.stale += stale.len() as u64 - redundant;
                        self.stats.redundant += redundant;
                        let mut done: smallvec::SmallVec<[P; 4]> = smallvec::SmallVec::new();
                        for p in stale {
                            if !done.contains(&p) && !user.references(p) {
                                settle(p);
                                done.push(p);
                            }
                        }
                        if user.entries.is_empty() && user.attrs.is_empty() {
                            continue;
                        }
                        // A stable order of segments in the object, as the window writes them.
                        user.entries.sort_unstable_by_key(|e| e.segment());
                        users += 1;
                        sending.carry =
                            Some((key.kind, Arc::from(key.id), user.entries, user.attrs));
                    }
                    None => {
                        self.sending = None;
                        break;
                    }
                }
            }
            let (kind, id, entries, attrs) = sending.carry.as_mut().expect("set above");
            let n_entries = entries.len().min(MAX_ENTRIES_PER_USER);
            let n_attrs = attrs.len().min(MAX_ENTRIES_PER_USER - n_entries);
            let taken: Vec<Entry<P>> = entries.drain(..n_entries).collect();
            let taken_attrs: Vec<Attr<P>> = attrs.drain(..n_attrs).collect();
            let mut positions: Vec<P> = taken.iter().map(|e| e.pos).collect();
            for a in &taken_attrs {
                // An attribute's record is usually its change's too: listed once.
                if !positions.contains(&a.pos) {
                    positions.push(a.pos);
                }
            }
            // A record with writes left for a later object settles with the last of them.
            positions.retain(|p| {
                !entries.iter().any(|e| e.pos == *p) && !attrs.iter().any(|a| a.pos == *p)
            });
            self.stats.writes += (taken.len() + taken_attrs.len()) as u64;
            self.stats.objects += 1;
            flush.push_user(
                *kind,
                id.clone(),
                taken.iter().map(|e| (e.segment(), e.change(), e.order())),
                taken_attrs.into_iter().map(|a| (a.name, a.value, a.order)),
                positions,
            );
            if entries.is_empty() && attrs.is_empty() {
                sending.carry = None;
            }
        }
        self.stats.users += users;
        if flush.users.is_empty() {
            return Ok(None);
        }
        self.stats.requests += 1;
        Ok(Some(flush))
    }
}

/// The next user of the stage being sent: from memory, else from the next bucket file,
/// whose users are merged first (one read of the file).
fn next_user<P: Spill>(
    sending: &mut Sending<P>,
    settle: &mut impl FnMut(P),
) -> Result<Option<(UserKey, User<P>)>, FoldError> {
    loop {
        if let Some(u) = sending.current.next() {
            return Ok(Some(u));
        }
        let Some(spill) = sending.spill.as_ref() else {
            return Ok(None);
        };
        if sending.next_bucket >= BUCKETS {
            sending.spill = None;
            return Ok(None);
        }
        let path = spill.path(sending.next_bucket);
        sending.next_bucket += 1;
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(FoldError::Spill {
                    dir: spill.dir.clone(),
                    source,
                })
            }
        };
        let mut merged: Users<P> = Users::default();
        let mut reader = BufReader::with_capacity(64 << 10, file);
        while let Some((key, user)) = decode_user(&mut reader, &path)? {
            match merged.get_mut(&UserRef {
                kind: key.kind,
                id: &key.id,
            }) {
                None => {
                    merged.insert(key, user);
                }
                Some(into) => {
                    let mut losers = Vec::new();
                    for e in user.entries {
                        losers.extend(into.put_change(e));
                    }
                    for a in user.attrs {
                        losers.extend(into.put_attr(a).0);
                    }
                    let mut done: Vec<P> = Vec::new();
                    for l in losers {
                        if !into.references(l) && !done.contains(&l) {
                            settle(l);
                            done.push(l);
                        }
                    }
                }
            }
        }
        let _ = std::fs::remove_file(&path);
        sending.current = merged.into_iter();
    }
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u32(out, s.len() as u32);
    out.extend_from_slice(s.as_bytes());
}

fn put_order_pos<P: Spill>(out: &mut Vec<u8>, order: Order, pos: P) {
    put_u64(out, order.sequence as u64);
    put_u64(out, order.occurred_at as u64);
    put_u64(out, order.offset as u64);
    put_u32(out, order.partition as u32);
    let [a, b] = pos.pack();
    put_u64(out, a);
    put_u64(out, b);
}

fn encode_user<P: Spill>(out: &mut Vec<u8>, key: &UserKey, user: &User<P>) {
    out.push(match key.kind {
        IdKind::ExternalId => 0,
        IdKind::Email => 1,
    });
    put_str(out, &key.id);
    put_u32(out, user.entries.len() as u32);
    for e in &user.entries {
        put_u32(out, e.segment_change);
        put_order_pos(out, e.order(), e.pos);
    }
    put_u32(out, user.attrs.len() as u32);
    for a in &user.attrs {
        put_str(out, &a.name);
        match &a.value {
            AttrValue::Null => out.push(0),
            AttrValue::String(s) => {
                out.push(1);
                put_str(out, s);
            }
            AttrValue::Long(v) => {
                out.push(2);
                put_u64(out, *v as u64);
            }
            AttrValue::Double(v) => {
                out.push(3);
                put_u64(out, v.to_bits());
            }
            AttrValue::Boolean(v) => out.push(if *v { 5 } else { 4 }),
        }
        put_order_pos(out, a.order, a.pos);
    }
}

struct Reading<'r, R> {
    r: &'r mut R,
    path: &'r Path,
}

impl<R: Read> Reading<'_, R> {
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], FoldError> {
        let mut b = [0u8; N];
        self.r.read_exact(&mut b).map_err(|_| FoldError::Damaged {
            file: self.path.to_path_buf(),
        })?;
        Ok(b)
    }
    fn u8(&mut self) -> Result<u8, FoldError> {
        Ok(self.bytes::<1>()?[0])
    }
    fn u32(&mut self) -> Result<u32, FoldError> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }
    fn u64(&mut self) -> Result<u64, FoldError> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }
    fn string(&mut self) -> Result<String, FoldError> {
        let n = self.u32()? as usize;
        let mut v = vec![0u8; n];
        self.r.read_exact(&mut v).map_err(|_| self.damaged())?;
        String::from_utf8(v).map_err(|_| self.damaged())
    }
    fn order_pos<P: Spill>(&mut self) -> Result<(Order, P), FoldError> {
        let sequence = self.u64()? as i64;
        let occurred_at = self.u64()? as i64;
        let offset = self.u64()? as i64;
        let partition = self.u32()? as i32;
        let pos = P::unpack([self.u64()?, self.u64()?]);
        Ok((
            Order {
                sequence,
                occurred_at,
                partition,
                offset,
            },
            pos,
        ))
    }
    fn damaged(&self) -> FoldError {
        FoldError::Damaged {
            file: self.path.to_path_buf(),
        }
    }
}

fn decode_user<P: Spill, R: Read>(
    r: &mut R,
    path: &Path,
) -> Result<Option<(UserKey, User<P>)>, FoldError> {
    let mut first = [0u8; 1];
    match r.read(&mut first) {
        Ok(0) => return Ok(None),
        Ok(_) => {}
        Err(_) => {
            return Err(FoldError::Damaged {
                file: path.to_path_buf(),
            })
        }
    }
    let mut rd = Reading { r, path };
    let kind = match first[0] {
        0 => IdKind::ExternalId,
        1 => IdKind::Email,
        _ => return Err(rd.damaged()),
    };
    let id = rd.string()?.into_boxed_str();
    let n = rd.u32()? as usize;
    let mut entries = Vec::with_capacity(n.min(1 << 16));
    for _ in 0..n {
        let segment_change = rd.u32()?;
        let (order, pos) = rd.order_pos()?;
        entries.push(Entry {
            sequence: order.sequence,
            occurred_at: order.occurred_at,
            offset: order.offset,
            partition: order.partition,
            segment_change,
            pos,
        });
    }
    let n = rd.u32()? as usize;
    let mut attrs = Vec::with_capacity(n.min(1 << 16));
    for _ in 0..n {
        let name = rd.string()?.into_boxed_str();
        let value = match rd.u8()? {
            0 => AttrValue::Null,
            1 => AttrValue::String(Cow::Owned(rd.string()?)),
            2 => AttrValue::Long(rd.u64()? as i64),
            3 => AttrValue::Double(f64::from_bits(rd.u64()?)),
            4 => AttrValue::Boolean(false),
            5 => AttrValue::Boolean(true),
            _ => return Err(rd.damaged()),
        };
        let (order, pos) = rd.order_pos()?;
        attrs.push(Attr {
            name,
            value,
            order,
            pos,
        });
    }
    Ok(Some((UserKey { kind, id }, User { entries, attrs })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    /// One change of a history: user, segment, entered, sequence, occurred_at, attribute.
    #[derive(Debug, Clone)]
    struct Change_ {
        user: u8,
        segment: u8,
        entered: bool,
        sequence: Option<i64>,
        occurred_at: i64,
        attr: Option<(u8, i64)>,
    }

    fn event(c: &Change_) -> Event<'static> {
        Event {
            event_id: "e".into(),
            external_id: Some(format!("u{}", c.user).into()),
            email: None,
            segment_id: format!("s{}", c.segment).into(),
            segment_name: None,
            change: if c.entered {
                Change::Entered
            } else {
                Change::Exited
            },
            occurred_at: c.occurred_at,
            sequence: c.sequence,
            attributes: c
                .attr
                .iter()
                .map(|(n, v)| (format!("a{n}").into(), AttrValue::Long(*v)))
                .collect(),
        }
    }

    type State = BTreeMap<String, (BTreeMap<String, bool>, BTreeMap<String, i64>)>;

    /// What the fold sent: each user's final segments and attributes, how many objects and
    /// writes, and every position it gave back (settled or in a request), in order.
    struct Outcome {
        state: State,
        objects: usize,
        writes: usize,
        returned: Vec<i64>,
    }

    fn run(history: &[(Change_, i32, i64)], memory: usize, dir: &Path) -> Outcome {
        let mut fold: Fold<i64> = Fold::new(FoldConfig {
            memory,
            spill_dir: dir.to_path_buf(),
            batch_size: 75,
            sent_memory: 1 << 16,
        });
        let mut returned = Vec::new();
        for (c, partition, offset) in history {
            let e = event(c);
            let id = e.identity().unwrap();
            // Positions are offsets made unique across partitions.
            let pos = i64::from(*partition) * 1_000_000 + offset;
            fold.absorb(&e, id, *partition, *offset, pos, |p| returned.push(p))
                .unwrap();
        }
        fold.start_sending().unwrap();
        let mut state = State::new();
        let (mut objects, mut writes) = (0, 0);
        let mut seen_users = BTreeSet::new();
        loop {
            let flush = fold.next_request(|_| true, |p| returned.push(p)).unwrap();
            let Some(flush) = flush else { break };
            assert!(flush.users.len() <= 75);
            for u in &flush.users {
                objects += 1;
                let entry = state.entry(u.id.to_string()).or_default();
                let changes = flush.user_changes(u);
                let attrs = flush.user_attributes(u);
                assert!(changes.len() + attrs.len() <= MAX_ENTRIES_PER_USER);
                writes += changes.len() + attrs.len();
                for (s, c) in changes {
                    let name = fold.segments().name(*s).to_string();
                    assert!(entry.0.insert(name, *c == Change::Entered).is_none());
                }
                for (n, v) in attrs {
                    let AttrValue::Long(v) = v else { panic!() };
                    assert!(entry.1.insert(n.to_string(), *v).is_none());
                }
                returned.extend_from_slice(flush.user_positions(u));
                seen_users.insert(u.id.to_string());
            }
        }
        assert!(fold.is_empty());
        Outcome {
            state,
            objects,
            writes,
            returned,
        }
    }

    /// The last write of each (user, segment) and (user, attribute) by the window's order.
    fn expected(history: &[(Change_, i32, i64)]) -> State {
        let mut best: BTreeMap<(String, String), (Order, bool)> = BTreeMap::new();
        let mut best_attr: BTreeMap<(String, String), (Order, i64)> = BTreeMap::new();
        for (c, p, o) in history {
            let e = event(c);
            let order = Order::of(&e, *p, *o);
            let user = format!("u{}", c.user);
            let k = (user.clone(), format!("s{}", c.segment));
            if best.get(&k).is_none_or(|(b, _)| order > *b) {
                best.insert(k, (order, c.entered));
            }
            if let Some((n, v)) = c.attr {
                let k = (user, format!("a{n}"));
                if best_attr.get(&k).is_none_or(|(b, _)| order > *b) {
                    best_attr.insert(k, (order, v));
                }
            }
        }
        let mut state = State::new();
        for ((u, s), (_, entered)) in best {
            state.entry(u).or_default().0.insert(s, entered);
        }
        for ((u, a), (_, v)) in best_attr {
            state.entry(u).or_default().1.insert(a, v);
        }
        state
    }

    fn change() -> impl Strategy<Value = Change_> {
        (
            0u8..12,
            0u8..6,
            any::<bool>(),
            prop::option::of(0i64..4),
            0i64..5,
            prop::option::weighted(0.3, (0u8..2, 0i64..100)),
        )
            .prop_map(
                |(user, segment, entered, sequence, occurred_at, attr)| Change_ {
                    user,
                    segment,
                    entered,
                    sequence,
                    occurred_at,
                    attr,
                },
            )
    }

    /// A history spread over 3 partitions, offsets in the order read.
    fn history() -> impl Strategy<Value = Vec<(Change_, i32, i64)>> {
        prop::collection::vec((change(), 0i32..3), 1..120).prop_map(|v| {
            let mut next = [0i64; 3];
            v.into_iter()
                .map(|(c, p)| {
                    let o = next[p as usize];
                    next[p as usize] += 1;
                    (c, p, o)
                })
                .collect()
        })
    }

    fn all_positions(history: &[(Change_, i32, i64)]) -> Vec<i64> {
        let mut v: Vec<i64> = history
            .iter()
            .map(|(_, p, o)| i64::from(*p) * 1_000_000 + o)
            .collect();
        v.sort_unstable();
        v
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn the_last_write_wins_whatever_order_the_records_come_in(
            history in history(),
            seed in any::<u64>(),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut shuffled = history.clone();
            // The same records read in another order (another partition first, a misordered
            // upstream): the order of the window decides, not the order of reading.
            let mut s = seed | 1;
            for i in (1..shuffled.len()).rev() {
                s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                shuffled.swap(i, (s % (i as u64 + 1)) as usize);
            }
            let want = expected(&history);
            for h in [&history, &shuffled] {
                let out = run(h, 64 << 20, dir.path());
                prop_assert_eq!(&out.state, &want);
                // One object per user, one write per (user, segment) and attribute.
                prop_assert_eq!(out.objects, want.len());
                let floor: usize = want.values().map(|(s, a)| s.len() + a.len()).sum();
                prop_assert_eq!(out.writes, floor);
                // Every record comes back exactly once.
                let mut returned = out.returned.clone();
                returned.sort_unstable();
                prop_assert_eq!(returned, all_positions(h));
            }
        }

        #[test]
        fn a_spilling_fold_sends_what_one_in_memory_sends(history in history()) {
            let dir = tempfile::tempdir().unwrap();
            let whole = run(&history, 64 << 20, dir.path());
            // A budget a single user exceeds: it spills at every record.
            let spilled = run(&history, 1, dir.path());
            prop_assert_eq!(&spilled.state, &whole.state);
            prop_assert_eq!(spilled.objects, whole.objects);
            prop_assert_eq!(spilled.writes, whole.writes);
            let mut returned = spilled.returned.clone();
            returned.sort_unstable();
            prop_assert_eq!(returned, all_positions(&history));
            // The spill directory is gone once sent.
            prop_assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        }
    }

    #[test]
    fn spilling_keeps_memory_under_the_budget_and_counts_the_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let mut fold: Fold<i64> = Fold::new(FoldConfig {
            memory: 64 << 10,
            spill_dir: dir.path().to_path_buf(),
            batch_size: 75,
            sent_memory: 1 << 16,
        });
        for i in 0..20_000i64 {
            let c = Change_ {
                user: 0,
                segment: 0,
                entered: i % 2 == 0,
                sequence: None,
                occurred_at: i,
                attr: None,
            };
            let mut e = event(&c);
            e.external_id = Some(format!("user-{}", i % 5_000).into());
            let id = e.identity().unwrap();
            fold.absorb(&e, id, 0, i, i, |_| {}).unwrap();
            assert!(fold.bytes() <= 64 << 10);
        }
        assert!(fold.stats().bytes_spilled > 0);
        fold.start_sending().unwrap();
        let mut users = 0;
        while let Some(f) = fold.next_request(|_| true, |_| {}).unwrap() {
            users += f.users.len();
            for u in &f.users {
                // user-k's last change is at offset 15,000 + k: odd k exited.
                let k: i64 = u.id.strip_prefix("user-").unwrap().parse().unwrap();
                let want = if k % 2 == 0 {
                    Change::Entered
                } else {
                    Change::Exited
                };
                assert_eq!(f.user_changes(u), &[(0, want)]);
            }
        }
        assert_eq!(users, 5_000);
    }

    #[test]
    fn a_user_with_more_changes_than_an_object_carries_takes_several() {
        let dir = tempfile::tempdir().unwrap();
        let mut fold: Fold<i64> = Fold::new(FoldConfig {
            memory: 64 << 20,
            spill_dir: dir.path().to_path_buf(),
            batch_size: 2,
            sent_memory: 1 << 16,
        });
        for s in 0..600i64 {
            let mut e = event(&Change_ {
                user: 1,
                segment: 0,
                entered: true,
                sequence: None,
                occurred_at: 1,
                attr: None,
            });
            e.segment_id = format!("seg-{s}").into();
            let id = e.identity().unwrap();
            fold.absorb(&e, id, 0, s, s, |_| panic!("nothing superseded"))
                .unwrap();
        }
        fold.start_sending().unwrap();
        let mut sizes = Vec::new();
        let mut positions = 0;
        while let Some(f) = fold.next_request(|_| true, |_| {}).unwrap() {
            assert!(f.users.len() <= 2);
            for u in &f.users {
                sizes.push(f.user_changes(u).len());
                positions += f.user_positions(u).len();
            }
        }
        assert_eq!(sizes, vec![256, 256, 88]);
        assert_eq!(positions, 600);
        assert_eq!(fold.stats().objects, 3);
        assert_eq!(fold.stats().users, 1);
    }

    #[test]
    fn positions_no_longer_alive_are_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let mut fold: Fold<i64> = Fold::new(FoldConfig {
            memory: 64 << 20,
            spill_dir: dir.path().to_path_buf(),
            batch_size: 75,
            sent_memory: 1 << 16,
        });
        for (user, p) in [(1u8, 0i32), (2, 1)] {
            let e = event(&Change_ {
                user,
                segment: 0,
                entered: true,
                sequence: None,
                occurred_at: 1,
                attr: None,
            });
            let id = e.identity().unwrap();
            fold.absorb(&e, id, p, 0, i64::from(p), |_| {}).unwrap();
        }
        fold.start_sending().unwrap();
        let f = fold.next_request(|p| *p == 0, |_| {}).unwrap().unwrap();
        assert_eq!(f.users.len(), 1);
        assert_eq!(&*f.users[0].id, "u1");
        assert!(fold.next_request(|_| true, |_| {}).unwrap().is_none());
    }

    /// The tail read after sending is a stage of its own: a change there that is older than
    /// what the first stage sent for its (user, segment) (a misordered upstream) is settled
    /// without being sent, as the window drops a stale change; a newer one is sent.
    #[test]
    fn a_later_stage_never_sends_what_is_older_than_an_earlier_one_sent() {
        let dir = tempfile::tempdir().unwrap();
        let mut fold: Fold<i64> = Fold::new(FoldConfig {
            memory: 64 << 20,
            spill_dir: dir.path().to_path_buf(),
            batch_size: 75,
            sent_memory: 1 << 16,
        });
        let put = |fold: &mut Fold<i64>, segment: u8, sequence: i64, offset: i64| {
            let e = event(&Change_ {
                user: 1,
                segment,
                entered: sequence % 2 == 0,
                sequence: Some(sequence),
                occurred_at: 1,
                attr: None,
            });
            let id = e.identity().unwrap();
            let mut settled = Vec::new();
            fold.absorb(&e, id, 0, offset, offset, |p| settled.push(p))
                .unwrap();
            settled
        };
        let drain = |fold: &mut Fold<i64>| {
            fold.start_sending().unwrap();
            let mut sent = Vec::new();
            let mut settled = Vec::new();
            while let Some(f) = fold.next_request(|_| true, |p| settled.push(p)).unwrap() {
                for u in &f.users {
                    sent.extend(f.user_changes(u).iter().map(|(s, c)| (*s, *c)));
                    settled.extend_from_slice(f.user_positions(u));
                }
            }
            (sent, settled)
        };
        put(&mut fold, 0, 10, 0);
        put(&mut fold, 1, 11, 1);
        put(&mut fold, 2, 10, 2);
        let (sent, settled) = drain(&mut fold);
        assert_eq!(sent.len(), 3);
        assert_eq!(settled, vec![0, 1, 2]);
        // Segment 0: sequence 5 arrives after 10 was sent (stale); segment 1: 12, newer and
        // ENTERED after EXITED; segment 2: 12, newer but ENTERED as sent (redundant).
        put(&mut fold, 0, 5, 3);
        put(&mut fold, 1, 12, 4);
        put(&mut fold, 2, 12, 5);
        let (sent, settled) = drain(&mut fold);
        assert_eq!(sent, vec![(1, Change::Entered)]);
        let mut settled = settled;
        settled.sort_unstable();
        assert_eq!(
            settled,
            vec![3, 4, 5],
            "stale and redundant records settle unsent"
        );
        assert_eq!(fold.stats().stale, 1);
        assert_eq!(fold.stats().redundant, 1);
        // Braze rejected the object that wrote segment 2: the fold forgets it sent it, so the
        // same membership read again is sent.
        fold.forget_sent(IdKind::ExternalId, "u1", &[2], &[]);
        put(&mut fold, 2, 14, 6);
        let (sent, _) = drain(&mut fold);
        assert_eq!(sent, vec![(2, Change::Entered)]);
        assert!(fold.is_empty());
    }

    /// In array mode a user's final memberships become one object with one add and one
    /// remove list, whatever its history.
    #[test]
    fn array_mode_writes_the_final_memberships_as_one_add_remove_object() {
        use crate::config::{MappingConfig, MappingMode};
        use crate::mapping::{encode, Mapping};
        let dir = tempfile::tempdir().unwrap();
        let mut fold: Fold<i64> = Fold::new(FoldConfig {
            memory: 64 << 20,
            spill_dir: dir.path().to_path_buf(),
            batch_size: 75,
            sent_memory: 1 << 16,
        });
        // s0: in, out, in; s1: in, out; s2: out, in, out, in.
        let history = [
            (0, true),
            (1, true),
            (2, false),
            (0, false),
            (1, false),
            (2, true),
        ];
        let history = history
            .iter()
            .chain([(2, false), (0, true), (2, true)].iter());
        for (offset, (segment, entered)) in history.enumerate() {
            let e = event(&Change_ {
                user: 7,
                segment: *segment,
                entered: *entered,
                sequence: None,
                occurred_at: offset as i64,
                attr: None,
            });
            let id = e.identity().unwrap();
            fold.absorb(&e, id, 0, offset as i64, offset as i64, |_| {})
                .unwrap();
        }
        fold.start_sending().unwrap();
        let flush = fold.next_request(|_| true, |_| {}).unwrap().unwrap();
        let mapping = Mapping::new(
            &MappingConfig {
                mode: MappingMode::Array,
                ..MappingConfig::default()
            },
            false,
        );
        let encoded = encode(&mapping, fold.segments(), &flush);
        assert_eq!(encoded.objects.len(), 1);
        let o: serde_json::Value = serde_json::from_slice(&encoded.objects[0]).unwrap();
        assert_eq!(
            o["cdp_segments"],
            serde_json::json!({"add": ["s0", "s2"], "remove": ["s1"]})
        );
        assert_eq!(encoded.data_points, vec![3]);
        assert!(fold.next_request(|_| true, |_| {}).unwrap().is_none());
    }
}
