//! The profiles Braze should end with, computed from the produced records alone, without
//! any of the worker's code: last write wins per (user, segment) and per extra attribute,
//! ordered by (sequence, occurred_at, partition, offset).

use std::collections::{BTreeMap, HashMap};

use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};
use segment_sync::event::{AttrValue, Change, Event};
use segment_sync::tools::shapes::ShapedRecord;
use serde_json::{Map, Value};

/// A produced record and where it landed.
#[derive(Debug, Clone)]
pub struct Landed {
    pub event: Option<Event<'static>>,
    pub partition: i32,
    pub offset: i64,
}

type Order = (i64, i64, i32, i64);

fn order(e: &Event<'_>, partition: i32, offset: i64) -> Order {
    (
        e.sequence.unwrap_or(i64::MIN),
        e.occurred_at,
        partition,
        offset,
    )
}

/// `external_id:<id>` or `email:<address>`, as the simulator keys its profiles.
pub fn profile_key(e: &Event<'_>) -> Option<String> {
    match (&e.external_id, &e.email) {
        (Some(id), _) if !id.is_empty() => Some(format!("external_id:{id}")),
        (_, Some(m)) if !m.is_empty() => Some(format!("email:{m}")),
        _ => None,
    }
}

fn json_of(v: &AttrValue<'_>) -> Value {
    match v {
        AttrValue::Null => Value::Null,
        AttrValue::String(s) => Value::String(s.to_string()),
        AttrValue::Long(n) => Value::from(*n),
        AttrValue::Double(d) => Value::from(*d),
        AttrValue::Boolean(b) => Value::Bool(*b),
    }
}

/// Keys the worker writes itself or that address a user: an event that would write one as a
/// segment or an extra attribute is invalid and changes nothing.
const RESERVED: &[&str] = &[
    "external_id",
    "email",
    "_update_existing_only",
    "braze_id",
    "user_alias",
    "phone",
];

/// Boolean mapping with `exited_value = "false"`: the attributes each user ends with.
pub fn boolean_profiles(records: &[Landed], prefix: &str) -> BTreeMap<String, Map<String, Value>> {
    let mut latest: HashMap<(String, String), (Order, Value)> = HashMap::new();
    for r in records {
        let Some(e) = &r.event else { continue };
        let Some(user) = profile_key(e) else { continue };
        if e.segment_id.is_empty() || e.event_id.trim().is_empty() {
            continue;
        }
        let segment_attribute = format!("{prefix}{}", e.segment_id);
        if RESERVED.contains(&segment_attribute.as_str())
            || e.attributes
                .iter()
                .any(|(name, _)| RESERVED.contains(&&**name))
        {
            continue;
        }
        let o = order(e, r.partition, r.offset);
        let mut put = |name: String, value: Value| {
            let k = (user.clone(), name);
            if latest.get(&k).is_none_or(|(old, _)| o > *old) {
                latest.insert(k, (o, value));
            }
        };
        put(segment_attribute, Value::Bool(e.change == Change::Entered));
        for (name, value) in &e.attributes {
            put(format!("\u{0}{name}"), json_of(value));
        }
    }
    let mut out: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    // Segment attributes win over an extra attribute of the same name, as in the worker.
    let mut entries: Vec<_> = latest.into_iter().collect();
    entries.sort_by(|a, b| {
        a.0 .1
            .starts_with('\u{0}')
            .cmp(&b.0 .1.starts_with('\u{0}'))
            .reverse()
    });
    for ((user, name), (_, value)) in entries {
        let profile = out.entry(user).or_default();
        match name.strip_prefix('\u{0}') {
            Some(extra) => {
                if !profile.contains_key(extra) && !value.is_null() {
                    profile.insert(extra.to_string(), value);
                }
            }
            None => {
                profile.insert(name, value);
            }
        }
    }
    out
}

/// The simulator's profiles without the identifier fields, for comparison.
pub fn strip_identifiers(
    profiles: BTreeMap<String, Map<String, Value>>,
) -> BTreeMap<String, Map<String, Value>> {
    profiles
        .into_iter()
        .map(|(k, mut p)| {
            p.remove("external_id");
            p.remove("email");
            (k, p)
        })
        .collect()
}

/// Describes the first few differences, for an assertion message that shows what went wrong.
pub fn diff(
    expected: &BTreeMap<String, Map<String, Value>>,
    actual: &BTreeMap<String, Map<String, Value>>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (user, want) in expected {
        match actual.get(user) {
            None => out.push(format!("{user}: missing, expected {want:?}")),
            Some(got) => {
                for (k, v) in want {
                    if got.get(k) != Some(v) {
                        out.push(format!("{user}.{k}: expected {v}, got {:?}", got.get(k)));
                    }
                }
                for k in got.keys() {
                    if !want.contains_key(k) {
                        out.push(format!("{user}.{k}: unexpected {:?}", got.get(k)));
                    }
                }
            }
        }
    }
    for user in actual.keys() {
        if !expected.contains_key(user) {
            out.push(format!("{user}: unexpected profile"));
        }
    }
    out.truncate(20);
    out
}

/// Produces vendor-shaped records, keyed, and returns one `Landed` per change they hold
/// (event ids left out: the shapes derive their own).
pub fn produce_shaped(
    rt: &tokio::runtime::Runtime,
    producer: &FutureProducer,
    topic: &str,
    records: &[ShapedRecord],
) -> Vec<Landed> {
    rt.block_on(async {
        let sends = records.iter().map(|r| async move {
            let mut record = FutureRecord::to(topic).key(&r.key);
            if let Some(v) = &r.value {
                record = record.payload(v);
            }
            producer
                .send(record, Duration::from_secs(30))
                .await
                .map_err(|(e, _)| e)
                .expect("produce")
        });
        let delivered = futures::future::join_all(sends).await;
        records
            .iter()
            .zip(delivered)
            .flat_map(|(r, d)| {
                r.changes.iter().map(move |e| {
                    let mut e = e.clone();
                    e.event_id = "read".into();
                    Landed {
                        event: Some(e),
                        partition: d.partition,
                        offset: d.offset,
                    }
                })
            })
            .collect()
    })
}
