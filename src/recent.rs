//! Pure: a bounded memory of recent facts keyed by a 64-bit hash (event ids seen, what was
//! sent per user and segment), for the window's hot path.
//!
//! A set-associative table: a key lives in one bucket of `WAYS` entries chosen by its hash,
//! and a full bucket forgets its oldest entry. One lookup touches one bucket (a cache line or
//! two) and nothing else: no eviction queue, no rehashing, a fixed size decided up front.
//! Forgetting early is always safe here (the worst case is a write the window could have
//! saved); a false match would not be (a real change dropped), so entries keep the whole
//! 64-bit hash: two keys are confused only if their hashes are equal.
//!
//! An entry may be marked as one that gives way (`Packed::gives_way`): versions restored from
//! a partition's history rather than delivered by this worker. A full bucket forgets the
//! oldest of those first, and an entry that gives way never pushes out one that does not,
//! so filling the memory with restored versions never costs what this worker delivered.
//!
//! Tags and values are `u64` words in zeroed vectors, so the memory is taken from the system
//! lazily, page by page, as buckets are first written.

const WAYS: usize = 4;

/// A value stored in a fixed number of 64-bit words.
pub trait Packed: Sized {
    const WORDS: usize;
    fn pack(&self, out: &mut [u64]);
    fn unpack(words: &[u64]) -> Self;
    /// Whether the value gives way to others when its bucket is full.
    fn gives_way(&self) -> bool {
        false
    }
}

impl Packed for () {
    const WORDS: usize = 0;
    fn pack(&self, _: &mut [u64]) {}
    fn unpack(_: &[u64]) -> Self {}
}

pub struct Recent<V> {
    /// Per bucket, `WAYS` tags, most recently written first; 0 marks an empty entry. A
    /// bucket's tags share one cache line, so a miss costs one line, a hit two.
    tags: Vec<u64>,
    /// `V::WORDS` words per entry, in the same order as the tags.
    values: Vec<u64>,
    mask: usize,
    _value: std::marker::PhantomData<V>,
}

impl<V: Packed> Recent<V> {
    /// Room for at least `capacity` entries (0 remembers nothing).
    pub fn new(capacity: usize) -> Recent<V> {
        let buckets = if capacity == 0 {
            0
        } else {
            capacity.div_ceil(WAYS).next_power_of_two()
        };
        Recent {
            tags: vec![0; buckets * WAYS],
            values: vec![0; buckets * WAYS * V::WORDS],
            mask: buckets.wrapping_sub(1),
            _value: std::marker::PhantomData,
        }
    }

    /// Entries it can hold.
    pub fn capacity(&self) -> usize {
        self.tags.len()
    }

    /// The first entry of the hash's bucket: the low bits pick the bucket.
    fn bucket(&self, hash: u64) -> Option<usize> {
        (!self.tags.is_empty()).then(|| (hash as usize & self.mask) * WAYS)
    }

    /// The tag is the whole hash, never 0.
    fn tag(hash: u64) -> u64 {
        hash.max(1)
    }

    fn value(&self, entry: usize) -> V {
        V::unpack(&self.values[entry * V::WORDS..(entry + 1) * V::WORDS])
    }

    /// A bucket's tags and values, bounds-checked once here rather than at every access.
    fn ways(&mut self, first: usize) -> (&mut [u64; WAYS], &mut [u64]) {
        let tags = (&mut self.tags[first..first + WAYS])
            .try_into()
            .expect("a bucket is WAYS entries");
        (
            tags,
            &mut self.values[first * V::WORDS..(first + WAYS) * V::WORDS],
        )
    }

    /// Starts loading the bucket a `get` or `put` of `hash` will read (see `prefetch`).
    #[inline]
    pub fn prefetch(&self, hash: u64) {
        if let Some(first) = self.bucket(hash) {
            crate::prefetch::read(self.tags.as_ptr().wrapping_add(first), 1);
            if V::WORDS > 0 {
                let values = self.values.as_ptr().wrapping_add(first * V::WORDS);
                crate::prefetch::read(values, (WAYS * V::WORDS * 8).div_ceil(64));
            }
        }
    }

    pub fn get(&self, hash: u64) -> Option<V> {
        let first = self.bucket(hash)?;
        let tag = Self::tag(hash);
        let tags: &[u64; WAYS] = self.tags[first..first + WAYS]
            .try_into()
            .expect("a bucket is WAYS entries");
        let way = tags.iter().position(|&t| t == tag)?;
        Some(self.value(first + way))
    }

    /// Remembers `value` under `hash` and returns what was remembered before. A value that
    /// gives way is not remembered when its bucket is full of values that do not.
    pub fn put(&mut self, hash: u64, value: V) -> Option<V> {
        let first = self.bucket(hash)?;
        let tag = Self::tag(hash);
        let (tags, values) = self.ways(first);
        let (old, slot) = match tags.iter().position(|&t| t == tag) {
            Some(w) => (
                Some(V::unpack(&values[w * V::WORDS..(w + 1) * V::WORDS])),
                w,
            ),
            // Not there: an empty entry, else the oldest that gives way, else the oldest (the
            // last) makes room, unless this one would give way to it.
            None => match tags.iter().position(|&t| t == 0) {
                Some(w) => (None, w),
                None => {
                    // Rare: only a full bucket is searched, and only missing keys land here.
                    let yielding = (0..WAYS).rev().find(|&w| {
                        V::unpack(&values[w * V::WORDS..(w + 1) * V::WORDS]).gives_way()
                    });
                    match yielding {
                        Some(w) => (None, w),
                        None if value.gives_way() => return None,
                        None => (None, WAYS - 1),
                    }
                }
            },
        };
        // Move the entries before `slot` one place down and put this one first, so the
        // bucket stays ordered from the most recently written. An entry at a time, each a
        // copy of known length: the spans are too short to be worth a memmove call.
        for e in (1..=slot.min(WAYS - 1)).rev() {
            tags[e] = tags[e - 1];
            let (before, after) = values.split_at_mut(e * V::WORDS);
            after[..V::WORDS].copy_from_slice(&before[(e - 1) * V::WORDS..]);
        }
        tags[0] = tag;
        value.pack(&mut values[..V::WORDS]);
        old
    }

    pub fn forget(&mut self, hash: u64) {
        let Some(first) = self.bucket(hash) else {
            return;
        };
        let tag = Self::tag(hash);
        for e in first..first + WAYS {
            if self.tags[e] == tag {
                self.tags[e] = 0;
            }
        }
    }

    /// Forgets every entry whose value `gone` picks. A scan of the whole table: for rare
    /// events such as a rebalance, not the hot path.
    pub fn forget_where(&mut self, gone: impl Fn(&V) -> bool) {
        for e in 0..self.tags.len() {
            if self.tags[e] != 0 && gone(&self.value(e)) {
                self.tags[e] = 0;
            }
        }
    }

    pub fn clear(&mut self) {
        self.tags.fill(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Packed for (i64, i64) {
        const WORDS: usize = 2;
        fn pack(&self, out: &mut [u64]) {
            out[0] = self.0 as u64;
            out[1] = self.1 as u64;
        }
        fn unpack(w: &[u64]) -> Self {
            (w[0] as i64, w[1] as i64)
        }
    }

    #[test]
    fn remembers_replaces_and_forgets() {
        let mut r: Recent<(i64, i64)> = Recent::new(100);
        assert!(r.capacity() >= 100);
        assert_eq!(r.put(7, (1, 2)), None);
        assert_eq!(r.get(7), Some((1, 2)));
        assert_eq!(r.put(7, (3, -4)), Some((1, 2)));
        assert_eq!(r.get(7), Some((3, -4)));
        assert_eq!(r.get(8), None);
        r.forget(7);
        assert_eq!(r.get(7), None);
        r.put(9, (0, 0));
        r.clear();
        assert_eq!(r.get(9), None);
    }

    #[test]
    fn a_full_bucket_forgets_its_oldest_entry() {
        // One bucket: every key lands in it.
        let mut r: Recent<()> = Recent::new(WAYS);
        for k in 1..=WAYS as u64 {
            r.put(k << 8, ());
        }
        r.put(1 << 8, ()); // refreshed: now the most recent
        r.put(99 << 8, ());
        assert!(r.get(1 << 8).is_some());
        assert!(r.get(2 << 8).is_none(), "the oldest went");
        assert!(r.get(99 << 8).is_some());
    }

    /// A value whose odd numbers give way, as restored versions do.
    #[derive(Debug, Clone, Copy, PartialEq)]
    struct Tagged(u64);

    impl Packed for Tagged {
        const WORDS: usize = 1;
        fn pack(&self, out: &mut [u64]) {
            out[0] = self.0;
        }
        fn unpack(w: &[u64]) -> Self {
            Tagged(w[0])
        }
        fn gives_way(&self) -> bool {
            self.0 % 2 == 1
        }
    }

    #[test]
    fn entries_that_give_way_are_forgotten_first_and_never_push_out_others() {
        let mut r: Recent<Tagged> = Recent::new(WAYS);
        // Oldest first: a delivered entry, then one that gives way, then delivered ones.
        r.put(1 << 8, Tagged(2));
        r.put(2 << 8, Tagged(3));
        r.put(3 << 8, Tagged(4));
        r.put(4 << 8, Tagged(6));
        // The bucket is full: the one that gives way goes, not the oldest.
        r.put(5 << 8, Tagged(8));
        assert_eq!(r.get(2 << 8), None);
        assert_eq!(r.get(1 << 8), Some(Tagged(2)));
        // Full of entries that do not give way: one that does is not taken in.
        assert_eq!(r.put(6 << 8, Tagged(9)), None);
        assert_eq!(r.get(6 << 8), None);
        for k in [1, 3, 4, 5] {
            assert!(r.get(k << 8).is_some(), "{k} kept");
        }
        // Its own key is still replaced in place, whatever it holds.
        assert_eq!(r.put(1 << 8, Tagged(11)), Some(Tagged(2)));
        assert_eq!(r.get(1 << 8), Some(Tagged(11)));
        // Among several that give way, the oldest goes.
        r.put(3 << 8, Tagged(13));
        r.put(7 << 8, Tagged(10));
        assert_eq!(r.get(1 << 8), None, "the older of the two that give way");
        assert_eq!(r.get(3 << 8), Some(Tagged(13)));
    }

    #[test]
    fn zero_capacity_remembers_nothing() {
        let mut r: Recent<()> = Recent::new(0);
        assert_eq!(r.put(1, ()), None);
        assert_eq!(r.get(1), None);
    }
}
