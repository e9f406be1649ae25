//! Pure: the records of the compacted state topic. A member of a segment is the key
//! `<segment>` NUL `<user>` with a versioned JSON value naming the run that made it one (a
//! tombstone once it leaves); the segment itself is the key `<segment>` with the run applied
//! last and completely, written in the run's last transaction.

use serde::{Deserialize, Serialize};

use super::diff::{Applied, By, Member};
use super::SnapshotError;

/// The value layout written by this version; a reader refuses a newer one instead of guessing.
pub const VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberValue {
    pub v: u32,
    pub run: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegmentValue {
    pub v: u32,
    pub run: String,
    pub run_time_ms: i64,
    pub members: u64,
    pub digest: String,
}

/// One record of the state topic that concerns the segment being read.
#[derive(Debug, Clone, PartialEq)]
pub enum StateRecord {
    /// A member now (`Some`) or no longer (`None`, a tombstone).
    Member(String, Option<Member>),
    /// The run applied last (`None`: the segment was retired).
    Segment(Option<Applied>),
}

pub fn member_key(segment: &str, user: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(segment.len() + 1 + user.len());
    k.extend_from_slice(segment.as_bytes());
    k.push(0);
    k.extend_from_slice(user.as_bytes());
    k
}

pub fn segment_key(segment: &str) -> Vec<u8> {
    segment.as_bytes().to_vec()
}

pub fn member_value(run: &str, m: &Member) -> Vec<u8> {
    let v = MemberValue {
        v: VERSION,
        run: run.to_string(),
        external_id: (m.by == By::ExternalId).then(|| m.user.clone()),
        email: m.email.clone(),
    };
    serde_json::to_vec(&v).unwrap_or_default()
}

pub fn segment_value(a: &Applied) -> Vec<u8> {
    let v = SegmentValue {
        v: VERSION,
        run: a.run.clone(),
        run_time_ms: a.time_ms,
        members: a.members,
        digest: a.digest.clone(),
    };
    serde_json::to_vec(&v).unwrap_or_default()
}

fn bad(what: &str, e: impl std::fmt::Display) -> SnapshotError {
    SnapshotError::State(format!("{what}: {e}"))
}

/// The record's meaning for `segment`; `None` for another segment's records.
pub fn parse(
    segment: &str,
    key: &[u8],
    value: Option<&[u8]>,
) -> Result<Option<StateRecord>, SnapshotError> {
    let Some(rest) = key.strip_prefix(segment.as_bytes()) else {
        return Ok(None);
    };
    if rest.is_empty() {
        let Some(value) = value else {
            return Ok(Some(StateRecord::Segment(None)));
        };
        let v: SegmentValue = serde_json::from_slice(value).map_err(|e| bad(segment, e))?;
        if v.v > VERSION {
            return Err(bad(
                segment,
                format!("state version {} is newer than this build's {VERSION}", v.v),
            ));
        }
        return Ok(Some(StateRecord::Segment(Some(Applied {
            run: v.run,
            time_ms: v.run_time_ms,
            members: v.members,
            digest: v.digest,
        }))));
    }
    let Some(user) = rest.strip_prefix(&[0]) else {
        // Another segment whose id starts with this one's.
        return Ok(None);
    };
    let user = String::from_utf8_lossy(user).into_owned();
    let Some(value) = value else {
        return Ok(Some(StateRecord::Member(user, None)));
    };
    let v: MemberValue = serde_json::from_slice(value).map_err(|e| bad(&user, e))?;
    if v.v > VERSION {
        return Err(bad(
            &user,
            format!("state version {} is newer than this build's {VERSION}", v.v),
        ));
    }
    let by = if v.external_id.is_some() {
        By::ExternalId
    } else {
        By::Email
    };
    let member = Member {
        user: user.clone(),
        by,
        email: v.email,
    };
    Ok(Some(StateRecord::Member(user, Some(member))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_and_segment_records_round_trip_and_other_segments_are_ignored() {
        let m = Member {
            user: "u1".into(),
            by: By::ExternalId,
            email: Some("a@x.io".into()),
        };
        let key = member_key("seg", "u1");
        assert_eq!(key, b"seg\0u1");
        let value = member_value("r1", &m);
        assert_eq!(
            parse("seg", &key, Some(&value)).unwrap(),
            Some(StateRecord::Member("u1".into(), Some(m)))
        );
        assert_eq!(
            parse("seg", &key, None).unwrap(),
            Some(StateRecord::Member("u1".into(), None))
        );
        assert_eq!(parse("se", &key, Some(&value)).unwrap(), None);
        assert_eq!(parse("other", &key, Some(&value)).unwrap(), None);
        let applied = Applied {
            run: "r1".into(),
            time_ms: 5,
            members: 1,
            digest: "00ff".into(),
        };
        assert_eq!(
            parse("seg", b"seg", Some(&segment_value(&applied))).unwrap(),
            Some(StateRecord::Segment(Some(applied)))
        );
        assert_eq!(parse("seg2", b"seg", None).unwrap(), None);
    }

    #[test]
    fn an_email_only_member_keeps_its_address_and_a_newer_version_is_refused() {
        let m = Member {
            user: "a@x.io".into(),
            by: By::Email,
            email: Some("a@x.io".into()),
        };
        let value = member_value("r", &m);
        assert_eq!(
            parse("s", &member_key("s", "a@x.io"), Some(&value)).unwrap(),
            Some(StateRecord::Member("a@x.io".into(), Some(m)))
        );
        let newer = br#"{"v":2,"run":"r"}"#;
        assert!(parse("s", b"s\0u", Some(newer)).is_err());
    }
}
