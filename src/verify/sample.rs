//! Pure: which users a run checks. A sample is chosen by a hash of the user's identifier, the
//! same in every run and on every machine, so that memory stays bounded on a large log and
//! two runs of one sample check the same users.

use std::collections::HashSet;

/// The users a run checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sample {
    All,
    /// One user in `n`, by hash.
    OneIn(u64),
    /// The external_ids of a list.
    Listed(HashSet<Box<str>>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SampleError {
    #[error("--sample {given:?}: expected 1/N with N a whole number of at least 1, such as 1/100")]
    Fraction { given: String },
    #[error("--users {path}: {message}")]
    File { path: String, message: String },
}

impl Sample {
    /// `--sample 1/N`.
    pub fn parse_fraction(given: &str) -> Result<Sample, SampleError> {
        let err = || SampleError::Fraction {
            given: given.to_string(),
        };
        let (one, n) = given.trim().split_once('/').ok_or_else(err)?;
        if one.trim() != "1" {
            return Err(err());
        }
        match n.trim().parse::<u64>() {
            Ok(1) => Ok(Sample::All),
            Ok(n) if n > 1 => Ok(Sample::OneIn(n)),
            _ => Err(err()),
        }
    }

    /// `--users FILE`: one external_id a line; blank lines and `#` comments are skipped.
    pub fn parse_list(text: &str) -> Sample {
        Sample::Listed(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(Box::from)
                .collect(),
        )
    }

    /// Whether the user known by this identifier is checked.
    pub fn includes(&self, id: &str) -> bool {
        match self {
            Sample::All => true,
            Sample::OneIn(n) => user_hash(id) % n == 0,
            Sample::Listed(ids) => ids.contains(id),
        }
    }

    /// The users a list names, whether the log has them or not.
    pub fn listed(&self) -> impl Iterator<Item = &str> {
        let ids = match self {
            Sample::Listed(ids) => Some(ids),
            _ => None,
        };
        ids.into_iter().flatten().map(|s| &**s)
    }
}

impl std::fmt::Display for Sample {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sample::All => write!(f, "every user"),
            Sample::OneIn(n) => write!(f, "1 user in {n}"),
            Sample::Listed(ids) => write!(f, "{} listed users", ids.len()),
        }
    }
}

/// FNV-1a, then a SplitMix64 finish so that `% n` sees well-mixed low bits. Written out
/// rather than taken from a hasher whose algorithm may change between releases: a sample
/// must choose the same users next year.
pub fn user_hash(id: &str) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in id.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractions_parse_and_mistakes_say_what_is_expected() {
        assert_eq!(Sample::parse_fraction("1/100"), Ok(Sample::OneIn(100)));
        assert_eq!(Sample::parse_fraction(" 1 / 7 "), Ok(Sample::OneIn(7)));
        assert_eq!(Sample::parse_fraction("1/1"), Ok(Sample::All));
        for bad in ["2/100", "1/0", "1/", "100", "1/x", "1/-3"] {
            let e = Sample::parse_fraction(bad).unwrap_err().to_string();
            assert!(e.contains("1/N"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_list_skips_blanks_and_comments() {
        let s = Sample::parse_list("u1\n\n  u2  \n# a comment\nu3\n");
        assert!(s.includes("u1") && s.includes("u2") && s.includes("u3"));
        assert!(!s.includes("u4") && !s.includes("# a comment"));
        let mut listed: Vec<&str> = s.listed().collect();
        listed.sort();
        assert_eq!(listed, vec!["u1", "u2", "u3"]);
    }

    #[test]
    fn the_hash_is_fixed_for_good() {
        // Pinned: a change would silently change which users every sample checks.
        assert_eq!(user_hash(""), 0xf52a_15e9_a9b5_e89b);
        assert_eq!(user_hash("user-000042"), 0x6c67_ee6f_cf83_9870);
    }

    #[test]
    fn one_in_n_takes_about_one_in_n_and_always_the_same_ones() {
        let s = Sample::OneIn(100);
        let taken: Vec<usize> = (0..100_000)
            .filter(|i| s.includes(&format!("user-{i:06}")))
            .collect();
        assert!((850..1150).contains(&taken.len()), "{}", taken.len());
        let again: Vec<usize> = (0..100_000)
            .filter(|i| s.includes(&format!("user-{i:06}")))
            .collect();
        assert_eq!(taken, again);
        assert!((0..1000).all(|i| Sample::All.includes(&format!("u{i}"))));
    }
}
