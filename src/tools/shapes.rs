//! Sample records in each CDP shape, as the vendors document them, with the changes the
//! worker should read from each: for `produce --shape`, the demo and the tests.

use std::borrow::Cow;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};

use crate::config::{Shape, SourceConfig};
use crate::event::{Change, Event};
use crate::tools::generate::BASE_TIME_MS;

/// One record to write: its key, its value (`None`: a tombstone) and the changes it holds.
#[derive(Debug, Clone)]
pub struct ShapedRecord {
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
    /// What the worker should apply, in the record's order; empty for a record it ignores.
    /// Event ids are left empty: the reader derives them.
    pub changes: Vec<Event<'static>>,
}

/// The `[source]` block that reads what [`Samples`] writes in `shape`.
pub fn source_config(shape: Shape) -> SourceConfig {
    let mut c = SourceConfig {
        shape,
        ..SourceConfig::default()
    };
    match shape {
        Shape::AdobeRtcdp => {
            c.external_id = Some("/identityMap/crmId/0/id".into());
            c.email = Some("/personalEmail/address".into());
        }
        Shape::Debezium => {
            c.user_column = Some("user_id".into());
            c.segment_column = Some("segment_id".into());
            c.email_column = Some("email".into());
            c.member_column = Some("is_member".into());
        }
        _ => {}
    }
    c
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A user's identifiers in the samples: one in ten known by email only.
fn identity(user: usize) -> (Option<String>, String) {
    let email = format!("user-{user:05}@example.com");
    if user % 10 == 9 {
        (None, email)
    } else {
        (Some(format!("user-{user:05}")), email)
    }
}

/// Changes of one user in a shape's own record: (segment, change, occurred_at).
struct Draft {
    user: usize,
    changes: Vec<(String, Change, i64)>,
    sequence: i64,
    message_id: String,
}

fn render(shape: Shape, d: &Draft) -> Value {
    let (external_id, email) = identity(d.user);
    let (segment, change, at) = &d.changes[0];
    match shape {
        Shape::Change => json!({
            "event_id": d.message_id,
            "external_id": external_id,
            "email": email,
            "segment_id": segment,
            "change": change.symbol(),
            "occurred_at": at,
            "sequence": d.sequence,
        }),
        Shape::AdobeRtcdp => {
            let ups: Map<String, Value> = d
                .changes
                .iter()
                .map(|(s, c, at)| {
                    let status = match c {
                        Change::Entered => "realized",
                        Change::Exited => "exited",
                    };
                    (
                        s.clone(),
                        json!({"status": status, "lastQualificationTime": rfc3339(*at)}),
                    )
                })
                .collect();
            let mut identities = Map::new();
            if let Some(id) = &external_id {
                identities.insert("crmId".into(), json!([{ "id": id }]));
            }
            identities.insert("email".into(), json!([{ "id": email }]));
            json!({
                "identityMap": identities,
                "personalEmail": {"address": email},
                "segmentMembership": {"ups": ups},
            })
        }
        Shape::Segment if d.changes.len() == 1 && d.sequence % 2 == 0 => {
            let event = match change {
                Change::Entered => "Audience Entered",
                Change::Exited => "Audience Exited",
            };
            json!({
                "type": "track",
                "event": event,
                "userId": external_id,
                "anonymousId": format!("anon-{}", d.user),
                "messageId": d.message_id,
                "timestamp": rfc3339(*at),
                "properties": {"audience_key": segment, segment.as_str(): *change == Change::Entered},
                "context": {
                    "traits": {"email": email},
                    "personas": {
                        "computation_class": "audience",
                        "computation_id": format!("aud_{segment}"),
                        "computation_key": segment,
                    },
                },
            })
        }
        Shape::Segment => {
            let mut traits = Map::new();
            traits.insert("email".into(), json!(email));
            for (s, c, _) in &d.changes {
                traits.insert(s.clone(), json!(*c == Change::Entered));
            }
            let mut personas = json!({"computation_class": "audience"});
            if d.changes.len() == 1 {
                personas["computation_key"] = json!(segment);
                personas["computation_id"] = json!(format!("aud_{segment}"));
            }
            json!({
                "type": "identify",
                "userId": external_id,
                "anonymousId": format!("anon-{}", d.user),
                "messageId": d.message_id,
                "timestamp": rfc3339(*at),
                "traits": traits,
                "context": {"personas": personas},
            })
        }
        Shape::Lytics => {
            let events: Vec<Value> = d
                .changes
                .iter()
                .map(|(s, c, at)| match c {
                    Change::Entered => json!({"event": "enter", "slug": s, "id": format!("id-{s}"),
                        "enter": rfc3339(*at), "exit": "2099-01-01T00:00:00Z"}),
                    Change::Exited => json!({"event": "exit", "slug": s, "id": format!("id-{s}"),
                        "enter": rfc3339(BASE_TIME_MS), "exit": rfc3339(*at)}),
                })
                .collect();
            json!({
                "data": {"user_id": external_id, "email": email, "segment_events": events},
                "meta": {"object": "user", "subscription_id": "sub-1", "timestamp": rfc3339(*at)},
            })
        }
        Shape::Debezium => {
            let row = json!({
                "user_id": external_id,
                "segment_id": segment,
                "email": email,
                "is_member": *change == Change::Entered,
            });
            let (op, before, after) = match change {
                Change::Entered => ("u", Value::Null, row),
                Change::Exited => ("d", row, Value::Null),
            };
            let payload = json!({
                "before": before,
                "after": after,
                "source": {"version": "2.7.3.Final", "connector": "postgresql", "name": "cdp",
                    "ts_ms": at, "db": "cdp", "schema": "public", "table": "segment_members",
                    "lsn": d.sequence},
                "op": op,
                "ts_ms": at + 5,
            });
            // The JSON converter's schema wrapper, its schema cut short: the reader skips it.
            json!({"schema": {"type": "struct", "name": "cdp.public.segment_members.Envelope", "optional": false}, "payload": payload})
        }
    }
}

/// An endless, seeded stream of records of one shape: users entering and leaving segments,
/// several at once where the shape allows, with exact redeliveries, changes that arrive
/// after a newer one, and what the CDP writes beside audience changes (a Segment `page`
/// call, Debezium's tombstone after a delete).
pub struct Samples {
    shape: Shape,
    rng: StdRng,
    users: usize,
    segments: usize,
    member: Vec<Vec<bool>>,
    clock: i64,
    sequence: i64,
    written: Vec<ShapedRecord>,
    pending: std::collections::VecDeque<ShapedRecord>,
}

impl Samples {
    pub fn new(shape: Shape, users: usize, segments: usize, seed: u64) -> Samples {
        let users = users.max(1);
        let segments = segments.max(1);
        Samples {
            shape,
            rng: StdRng::seed_from_u64(seed),
            users,
            segments,
            member: vec![vec![false; segments]; users],
            clock: BASE_TIME_MS,
            sequence: 0,
            written: Vec::new(),
            pending: Default::default(),
        }
    }

    fn several(&self) -> bool {
        matches!(
            self.shape,
            Shape::AdobeRtcdp | Shape::Lytics | Shape::Segment
        )
    }

    fn fresh(&mut self) -> ShapedRecord {
        let user = self.rng.random_range(0..self.users);
        let n = if self.several() {
            self.rng.random_range(1..=3.min(self.segments))
        } else {
            1
        };
        let mut segments: Vec<usize> = Vec::new();
        while segments.len() < n {
            let s = self.rng.random_range(0..self.segments);
            if !segments.contains(&s) {
                segments.push(s);
            }
        }
        self.clock += self.rng.random_range(1..50);
        self.sequence += 1;
        // Now and then a change that happened before the last one written for it.
        let late = self.rng.random_bool(0.03);
        let at = if late {
            self.clock - 10_000
        } else {
            self.clock
        };
        let mut changes = Vec::new();
        for s in segments {
            let change = if late {
                // An old change: whatever it says, it loses to what was written.
                if self.rng.random_bool(0.5) {
                    Change::Entered
                } else {
                    Change::Exited
                }
            } else {
                self.member[user][s] = !self.member[user][s];
                if self.member[user][s] {
                    Change::Entered
                } else {
                    Change::Exited
                }
            };
            changes.push((format!("seg_{s:02}"), change, at));
        }
        let sequence = if late {
            self.sequence - 1_000_000
        } else {
            self.sequence
        };
        let draft = Draft {
            user,
            changes,
            sequence,
            message_id: format!("msg-{}", self.sequence),
        };
        let (external_id, email) = identity(user);
        let key = external_id
            .clone()
            .unwrap_or_else(|| email.clone())
            .into_bytes();
        let value = serde_json::to_vec(&render(self.shape, &draft)).expect("json");
        let events = draft
            .changes
            .iter()
            .map(|(s, c, at)| Event {
                event_id: Cow::Borrowed(""),
                external_id: external_id.clone().map(Cow::Owned),
                email: Some(Cow::Owned(email.clone())),
                segment_id: Cow::Owned(s.clone()),
                segment_name: None,
                change: *c,
                occurred_at: *at,
                sequence: matches!(self.shape, Shape::Debezium | Shape::Change)
                    .then_some(draft.sequence),
                attributes: Vec::new(),
            })
            .collect::<Vec<_>>();
        if self.shape == Shape::Debezium && events[0].change == Change::Exited {
            self.pending.push_back(ShapedRecord {
                key: key.clone(),
                value: None,
                changes: Vec::new(),
            });
        }
        if self.shape == Shape::Segment && self.rng.random_bool(0.05) {
            let page = json!({"type": "page", "name": "Pricing", "userId": external_id,
                "messageId": format!("page-{}", self.sequence), "timestamp": rfc3339(self.clock),
                "properties": {"path": "/pricing"}});
            self.pending.push_back(ShapedRecord {
                key: key.clone(),
                value: Some(serde_json::to_vec(&page).expect("json")),
                changes: Vec::new(),
            });
        }
        ShapedRecord {
            key,
            value: Some(value),
            changes: events,
        }
    }
}

impl Iterator for Samples {
    type Item = ShapedRecord;

    fn next(&mut self) -> Option<ShapedRecord> {
        if let Some(r) = self.pending.pop_front() {
            return Some(r);
        }
        // An exact redelivery of an earlier record.
        if !self.written.is_empty() && self.rng.random_bool(0.05) {
            let i = self.rng.random_range(0..self.written.len());
            return Some(self.written[i].clone());
        }
        let r = self.fresh();
        if self.written.len() < 256 {
            self.written.push(r.clone());
        } else {
            let i = self.rng.random_range(0..self.written.len());
            self.written[i] = r.clone();
        }
        Some(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Format;
    use crate::source::{Ignored, Read, Source};

    #[test]
    fn every_sample_reads_back_as_the_changes_it_was_made_of() {
        for shape in Shape::ALL {
            let mut source =
                Source::new(&source_config(shape), Format::Json, None).expect("source");
            let mut several = 0;
            for r in Samples::new(shape, 30, 4, 7).take(500) {
                let read = source.read(r.value.as_deref()).expect("reads");
                if let Read::Ignored(why) = &read {
                    assert!(r.changes.is_empty(), "{shape:?}");
                    assert!(matches!(why, Ignored::Tombstone | Ignored::OtherKind));
                    continue;
                }
                let got: Vec<_> = read
                    .into_events()
                    .into_iter()
                    .map(|e| {
                        (
                            e.external_id.map(|s| s.to_string()),
                            e.segment_id.to_string(),
                            e.change,
                            e.occurred_at,
                            e.sequence,
                        )
                    })
                    .collect();
                let want: Vec<_> = r
                    .changes
                    .iter()
                    .map(|e| {
                        (
                            e.external_id.as_ref().map(|s| s.to_string()),
                            e.segment_id.to_string(),
                            e.change,
                            e.occurred_at,
                            e.sequence,
                        )
                    })
                    .collect();
                let (mut got, mut want) = (got, want);
                got.sort_by(|a, b| a.1.cmp(&b.1));
                want.sort_by(|a, b| a.1.cmp(&b.1));
                assert_eq!(got, want, "{shape:?}");
                several += usize::from(want.len() > 1);
            }
            if matches!(shape, Shape::AdobeRtcdp | Shape::Lytics | Shape::Segment) {
                assert!(
                    several > 50,
                    "{shape:?}: {several} records with several changes"
                );
            }
        }
    }
}
