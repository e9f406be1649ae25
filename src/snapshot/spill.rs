//! Hash-partitioned spill files: a run's members, or the state's records, split by the hash of
//! the identity into buckets on disk, so that the diff holds one bucket of both at a time and
//! a run of ten million members needs a few tens of megabytes rather than gigabytes.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::PathBuf;

use super::diff::{By, Digest, Member, Members};
use super::SnapshotError;

/// Buckets per spill: ten million members make about 80,000 a bucket.
pub const BUCKETS: usize = 128;

/// Lines `<op><by>\t<user>\t<email>` in `BUCKETS` files of a temporary folder removed on drop;
/// `op` is `+` (a member) or `-` (no longer one), `by` is `x` (external id) or `e` (email).
pub struct Spill {
    dir: tempfile::TempDir,
    writers: Vec<BufWriter<File>>,
}

/// What loading a bucket of a run found.
#[derive(Debug, Default)]
pub struct Loaded {
    pub members: Members,
    pub duplicates: u64,
    /// The first few identities seen more than once, for the report.
    pub duplicated: Vec<String>,
}

fn io(e: std::io::Error) -> SnapshotError {
    SnapshotError::Spill(e.to_string())
}

pub fn bucket_of(user: &str) -> usize {
    (super::diff::fnv1a(user.as_bytes()) % BUCKETS as u64) as usize
}

impl Spill {
    pub fn new(prefix: &str) -> Result<Spill, SnapshotError> {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .map_err(io)?;
        let writers = (0..BUCKETS)
            .map(|i| {
                File::create(dir.path().join(i.to_string()))
                    .map(|f| BufWriter::with_capacity(32 << 10, f))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(io)?;
        Ok(Spill { dir, writers })
    }

    fn path(&self, bucket: usize) -> PathBuf {
        self.dir.path().join(bucket.to_string())
    }

    pub fn put(&mut self, m: &Member) -> Result<(), SnapshotError> {
        let by = match m.by {
            By::ExternalId => 'x',
            By::Email => 'e',
        };
        let w = &mut self.writers[bucket_of(&m.user)];
        writeln!(w, "+{by}\t{}\t{}", m.user, m.email.as_deref().unwrap_or("")).map_err(io)
    }

    pub fn remove(&mut self, user: &str) -> Result<(), SnapshotError> {
        let w = &mut self.writers[bucket_of(user)];
        writeln!(w, "-x\t{user}\t").map_err(io)
    }

    pub fn flush(&mut self) -> Result<(), SnapshotError> {
        for w in &mut self.writers {
            w.flush().map_err(io)?;
        }
        Ok(())
    }

    /// A bucket's members, each line applied in the order written (the last write wins).
    /// Call [`Spill::flush`] first.
    pub fn load(&self, bucket: usize) -> Result<Loaded, SnapshotError> {
        let file = File::open(self.path(bucket)).map_err(io)?;
        let mut out = Loaded::default();
        for line in BufReader::with_capacity(64 << 10, file).lines() {
            let line = line.map_err(io)?;
            let mut fields = line.splitn(3, '\t');
            let (Some(head), Some(user)) = (fields.next(), fields.next()) else {
                continue;
            };
            let email = fields.next().filter(|e| !e.is_empty()).map(str::to_string);
            match head {
                "-x" => {
                    out.members.remove(user);
                }
                _ => {
                    let by = if head == "+e" {
                        By::Email
                    } else {
                        By::ExternalId
                    };
                    let m = Member {
                        user: user.to_string(),
                        by,
                        email,
                    };
                    if out.members.insert(m.user.clone(), m).is_some() {
                        out.duplicates += 1;
                        if out.duplicated.len() < 10 {
                            out.duplicated.push(user.to_string());
                        }
                    }
                }
            }
        }
        Ok(out)
    }
}

/// The digest of a bucket's distinct members.
pub fn digest(members: &Members) -> Digest {
    let mut d = Digest::default();
    for user in members.keys() {
        d.add(user);
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(user: &str) -> Member {
        Member {
            user: user.into(),
            by: By::ExternalId,
            email: None,
        }
    }

    #[test]
    fn every_member_lands_in_its_bucket_once_and_the_last_write_wins() {
        let mut spill = Spill::new("spill-test").unwrap();
        for u in ["a", "b", "a", "c"] {
            spill.put(&m(u)).unwrap();
        }
        spill.remove("c").unwrap();
        spill
            .put(&Member {
                user: "e@x.io".into(),
                by: By::Email,
                email: Some("e@x.io".into()),
            })
            .unwrap();
        spill.flush().unwrap();
        let mut all = Members::new();
        let mut dups = 0;
        for b in 0..BUCKETS {
            let loaded = spill.load(b).unwrap();
            for user in loaded.members.keys() {
                assert_eq!(bucket_of(user), b);
            }
            dups += loaded.duplicates;
            all.extend(loaded.members);
        }
        let mut users: Vec<&str> = all.keys().map(String::as_str).collect();
        users.sort();
        assert_eq!(users, ["a", "b", "e@x.io"]);
        assert_eq!(dups, 1);
        assert_eq!(all["e@x.io"].by, By::Email);
    }
}
