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
//! Entries are stored as `u64` words in one zeroed vector, so the memory is taken from the
//! system lazily, page by page, as buckets are first written.

const WAYS: usize = 4;

/// A value stored in a fixed number of 64-bit words.
pub trait Packed: Sized {
    const WORDS: usize;
    fn pack(&self, out: &mut [u64]);
    fn unpack(words: &[u64]) -> Self;
}

impl Packed for () {
    const WORDS: usize = 0;
    fn pack(&self, _: &mut [u64]) {}
    fn unpack(_: &[u64]) -> Self {}
}

pub struct Recent<V> {
    /// Per bucket, `WAYS` entries of `1 + V::WORDS` words, most recent first; a tag of 0 is
    /// an empty entry.
    words: Vec<u64>,
    mask: usize,
    _value: std::marker::PhantomData<V>,
}

impl<V: Packed> Recent<V> {
    const ENTRY: usize = 1 + V::WORDS;
    const BUCKET: usize = WAYS * (1 + V::WORDS);

    /// Room for at least `capacity` entries (0 remembers nothing).
    pub fn new(capacity: usize) -> Recent<V> {
        let buckets = if capacity == 0 {
            0
        } else {
            capacity.div_ceil(WAYS).next_power_of_two()
        };
        Recent {
            words: vec![0; buckets * Self::BUCKET],
            mask: buckets.wrapping_sub(1),
            _value: std::marker::PhantomData,
        }
    }

    /// Entries it can hold.
    pub fn capacity(&self) -> usize {
        self.words.len() / Self::ENTRY
    }

    fn bucket(&self, hash: u64) -> Option<std::ops::Range<usize>> {
        if self.words.is_empty() {
            return None;
        }
        // The low bits pick the bucket; the tag is the whole hash, never 0.
        let start = (hash as usize & self.mask) * Self::BUCKET;
        Some(start..start + Self::BUCKET)
    }

    fn tag(hash: u64) -> u64 {
        hash.max(1)
    }

    pub fn get(&self, hash: u64) -> Option<V> {
        let bucket = &self.words[self.bucket(hash)?];
        let tag = Self::tag(hash);
        bucket
            .chunks_exact(Self::ENTRY)
            .find(|e| e[0] == tag)
            .map(|e| V::unpack(&e[1..]))
    }

    /// Remembers `value` under `hash` and returns what was remembered before.
    pub fn put(&mut self, hash: u64, value: V) -> Option<V> {
        let range = self.bucket(hash)?;
        let tag = Self::tag(hash);
        let bucket = &mut self.words[range];
        let found = bucket.chunks_exact(Self::ENTRY).position(|e| e[0] == tag);
        let (old, slot) = match found {
            Some(i) => (
                Some(V::unpack(
                    &bucket[i * Self::ENTRY + 1..(i + 1) * Self::ENTRY],
                )),
                i,
            ),
            // Not there: an empty entry, else the oldest (the last) makes room.
            None => (
                None,
                bucket
                    .chunks_exact(Self::ENTRY)
                    .position(|e| e[0] == 0)
                    .unwrap_or(WAYS - 1),
            ),
        };
        // Move the entries before `slot` one place down and put this one first, so the
        // bucket stays ordered from the most recently written.
        // A word at a time: the span is a few words, too short to be worth a memmove call.
        for i in (Self::ENTRY..(slot + 1) * Self::ENTRY).rev() {
            bucket[i] = bucket[i - Self::ENTRY];
        }
        bucket[0] = tag;
        value.pack(&mut bucket[1..Self::ENTRY]);
        old
    }

    pub fn forget(&mut self, hash: u64) {
        let Some(range) = self.bucket(hash) else {
            return;
        };
        let tag = Self::tag(hash);
        for e in self.words[range].chunks_exact_mut(Self::ENTRY) {
            if e[0] == tag {
                e[0] = 0;
            }
        }
    }

    pub fn clear(&mut self) {
        self.words.fill(0);
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

    #[test]
    fn zero_capacity_remembers_nothing() {
        let mut r: Recent<()> = Recent::new(0);
        assert_eq!(r.put(1, ()), None);
        assert_eq!(r.get(1), None);
    }
}
