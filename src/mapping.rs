//! Flushed users → Braze attributes objects, following docs/design.md's mapping.
//!
//! Pure. Each object is serialised once, here, into its own `Bytes`: the Braze client joins
//! them into a request body and, when it has to split a request, re-joins halves without
//! encoding anything again.

use bytes::Bytes;

use crate::config::{Config, ExitedValue, MappingConfig, MappingMode, WindowConfig};
use crate::event::{AttrValue, Change, Rules};
use crate::window::{Flush, Segments};

/// How users become attributes objects.
#[derive(Debug, Clone)]
pub struct Mapping {
    pub mode: MappingMode,
    pub attribute_prefix: String,
    pub array_attribute: String,
    pub exited_value: ExitedValue,
    pub update_existing_only: bool,
    /// What an event must satisfy for this mapping to write it faithfully, derived from the
    /// fields above when the mapping is built: rebuild it (`Mapping::rules_for`) after
    /// changing the prefix, the mode or the array attribute.
    pub rules: Rules,
}

impl Mapping {
    /// With the default `window.max_future_ms`; [`Mapping::from_config`] takes the configured one.
    pub fn new(mapping: &MappingConfig, update_existing_only: bool) -> Mapping {
        let max_future_ms = WindowConfig::default().max_future_ms;
        Mapping::with_max_future(mapping, update_existing_only, max_future_ms)
    }

    /// The mapping of a loaded configuration, its rules bounded by `window.max_future_ms`.
    pub fn from_config(cfg: &Config) -> Mapping {
        Mapping::with_max_future(
            &cfg.mapping,
            cfg.braze.update_existing_only,
            cfg.window.max_future_ms,
        )
    }

    fn with_max_future(
        mapping: &MappingConfig,
        update_existing_only: bool,
        max_future_ms: u64,
    ) -> Mapping {
        let mut m = Mapping {
            mode: mapping.mode,
            attribute_prefix: mapping.attribute_prefix.clone(),
            array_attribute: mapping.array_attribute.clone(),
            exited_value: mapping.exited_value,
            update_existing_only,
            rules: Rules::new(0, &[], None),
        };
        m.rules = m.rules_for(max_future_ms);
        m
    }

    /// The rules for events this mapping writes: no segment or extra attribute may take a
    /// key the worker writes itself (Braze would see two values for one key, and an
    /// identifier among them could address another user).
    pub fn rules_for(&self, max_future_ms: u64) -> Rules {
        match self.mode {
            MappingMode::Boolean => {
                Rules::new(max_future_ms, WORKER_KEYS, Some(&self.attribute_prefix))
            }
            MappingMode::Array => {
                let mut reserved = WORKER_KEYS.to_vec();
                reserved.push(&self.array_attribute);
                Rules::new(max_future_ms, &reserved, None)
            }
        }
    }
}

/// One Braze request's worth of objects, in the order of `Flush::users`.
#[derive(Debug, Clone, Default)]
pub struct Encoded {
    pub objects: Vec<Bytes>,
    /// Data points each object writes (Braze bills each attribute written).
    pub data_points: Vec<u32>,
}

/// Keys the worker writes itself, or that would address a user: `external_id` or `email`
/// and `_update_existing_only` in every object, and Braze's other identifiers. Validation
/// ([`Mapping::rules_for`]) keeps events from using them; the encoder still never writes an
/// extra attribute by these names, for callers that did not validate.
pub const WORKER_KEYS: &[&str] = &[
    "external_id",
    "email",
    "_update_existing_only",
    "braze_id",
    "user_alias",
    "phone",
];

fn push_str(buf: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(&mut *buf, s).expect("writing to a Vec cannot fail");
}

/// A segment's attribute name: `prefix` and `name` already JSON-escaped, without quotes.
/// Escaping is per character, so the two escaped parts joined are the escaped whole.
fn push_segment_key(buf: &mut Vec<u8>, prefix: &str, name: &str) {
    buf.extend_from_slice(b",\"");
    buf.extend_from_slice(prefix.as_bytes());
    buf.extend_from_slice(name.as_bytes());
    buf.extend_from_slice(b"\":");
}

fn push_key(buf: &mut Vec<u8>, prefix: &str, name: &str) {
    buf.push(b',');
    if prefix.is_empty() {
        push_str(buf, name);
    } else {
        let mut key = String::with_capacity(prefix.len() + name.len());
        key.push_str(prefix);
        key.push_str(name);
        push_str(buf, &key);
    }
    buf.push(b':');
}

fn push_value(buf: &mut Vec<u8>, v: &AttrValue<'_>) {
    match v {
        AttrValue::Null => buf.extend_from_slice(b"null"),
        AttrValue::Boolean(true) => buf.extend_from_slice(b"true"),
        AttrValue::Boolean(false) => buf.extend_from_slice(b"false"),
        AttrValue::Long(n) => {
            serde_json::to_writer(&mut *buf, n).expect("writing to a Vec cannot fail")
        }
        // JSON has no NaN or infinity; Braze could not store them either.
        AttrValue::Double(d) if !d.is_finite() => buf.extend_from_slice(b"null"),
        AttrValue::Double(d) => {
            serde_json::to_writer(&mut *buf, d).expect("writing to a Vec cannot fail")
        }
        AttrValue::String(s) => push_str(buf, s),
    }
}

/// Encodes every user of the flush, in order.
pub fn encode<P>(mapping: &Mapping, segments: &Segments, flush: &Flush<P>) -> Encoded {
    let mut out = Encoded {
        objects: Vec::with_capacity(flush.users.len()),
        data_points: Vec::with_capacity(flush.users.len()),
    };
    // One allocation for the whole request: each object is a shared slice of it.
    let mut all = bytes::BytesMut::with_capacity(flush.users.len() * 160);
    let mut buf = Vec::with_capacity(256);
    let prefix = serde_json::to_string(&mapping.attribute_prefix).expect("a str serialises");
    let prefix = &prefix[1..prefix.len() - 1];
    for user in &flush.users {
        buf.clear();
        buf.extend_from_slice(b"{\"");
        buf.extend_from_slice(user.kind.field().as_bytes());
        buf.extend_from_slice(b"\":");
        push_str(&mut buf, &user.id);
        buf.extend_from_slice(b",\"_update_existing_only\":");
        buf.extend_from_slice(if mapping.update_existing_only {
            b"true"
        } else {
            b"false"
        });
        let changes = flush.user_changes(user);
        let mut points = 0u32;
        match mapping.mode {
            MappingMode::Boolean => {
                for (segment, change) in changes {
                    let name = segments.json(*segment);
                    push_segment_key(&mut buf, prefix, &name[1..name.len() - 1]);
                    buf.extend_from_slice(match (change, mapping.exited_value) {
                        (Change::Entered, _) => b"true",
                        (Change::Exited, ExitedValue::False) => b"false",
                        (Change::Exited, ExitedValue::Null) => b"null",
                    });
                    points += 1;
                }
            }
            // Attributes alone (every change redundant or stale): an empty `{}` carries no
            // change, so the key is left out rather than left to Braze to interpret.
            MappingMode::Array if changes.is_empty() => {}
            MappingMode::Array => {
                push_key(&mut buf, "", &mapping.array_attribute);
                buf.push(b'{');
                let mut first_list = true;
                for (want, list) in [(Change::Entered, "add"), (Change::Exited, "remove")] {
                    let mut items = changes.iter().filter(|(_, c)| *c == want).peekable();
                    if items.peek().is_none() {
                        continue;
                    }
                    if !first_list {
                        buf.push(b',');
                    }
                    first_list = false;
                    push_str(&mut buf, list);
                    buf.extend_from_slice(b":[");
                    for (i, (segment, _)) in items.enumerate() {
                        if i > 0 {
                            buf.push(b',');
                        }
                        buf.extend_from_slice(segments.json(*segment).as_bytes());
                        points += 1;
                    }
                    buf.push(b']');
                }
                buf.push(b'}');
            }
        }
        for (name, value) in flush.user_attributes(user) {
            if WORKER_KEYS.contains(&&**name) || collides(mapping, segments, changes, name) {
                continue;
            }
            push_key(&mut buf, "", name);
            push_value(&mut buf, value);
            points += 1;
        }
        buf.push(b'}');
        all.extend_from_slice(&buf);
        out.objects.push(all.split().freeze());
        out.data_points.push(points);
    }
    out
}

/// An extra attribute named like one the mapping writes loses to the mapping: two writes of
/// one key in an object leave Braze's choice undefined.
fn collides(mapping: &Mapping, segments: &Segments, changes: &[(u32, Change)], name: &str) -> bool {
    match mapping.mode {
        MappingMode::Array => name == mapping.array_attribute,
        MappingMode::Boolean => name
            .strip_prefix(mapping.attribute_prefix.as_str())
            .is_some_and(|rest| changes.iter().any(|(s, _)| segments.name(*s) == rest)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, InvalidEvent};
    use crate::window::{Window, WindowConfig};
    use serde_json::{json, Value};

    fn mapping(mode: MappingMode, exited: ExitedValue) -> Mapping {
        let cfg = MappingConfig {
            mode,
            attribute_prefix: "cdp_".into(),
            array_attribute: "cdp_segments".into(),
            exited_value: exited,
        };
        Mapping::new(&cfg, false)
    }

    /// (event_id, external_id, email, segment_id, change)
    type Spec<'a> = (&'a str, Option<&'a str>, Option<&'a str>, &'a str, Change);

    fn flush_of(events: &[Spec<'_>]) -> (Window<i64>, Flush<i64>) {
        let mut w = Window::new(WindowConfig {
            linger_ms: 0,
            batch_size: 75,
            max_pending_users: 100,
            max_pending_bytes: usize::MAX,
            dedup_memory: 100,
            delivered_memory: 100,
        });
        for (i, (id, ext, email, seg, change)) in events.iter().enumerate() {
            let e = Event {
                event_id: (*id).into(),
                external_id: ext.map(Into::into),
                email: email.map(Into::into),
                segment_id: (*seg).into(),
                segment_name: None,
                change: *change,
                occurred_at: 0,
                sequence: Some(i as i64),
                attributes: if *id == "with-attrs" {
                    vec![
                        ("tier".into(), AttrValue::String("gold \"vip\"".into())),
                        ("score".into(), AttrValue::Double(0.5)),
                        ("email".into(), AttrValue::String("x@y.z".into())),
                        ("cdp_a".into(), AttrValue::Boolean(false)),
                    ]
                } else {
                    vec![]
                },
            };
            let identity = e.validate().unwrap();
            w.admit(&e, identity, 0, i as i64, i as i64, 0);
        }
        let f = w.pop_batch(0, true).unwrap();
        (w, f)
    }

    fn objects(e: &Encoded) -> Vec<Value> {
        e.objects
            .iter()
            .map(|b| serde_json::from_slice(b).unwrap())
            .collect()
    }

    #[test]
    fn boolean_mode_one_object_per_user_with_every_segment() {
        let (w, f) = flush_of(&[
            ("1", Some("u1"), None, "a", Change::Entered),
            ("2", Some("u1"), None, "b", Change::Entered),
            ("3", Some("u1"), None, "b", Change::Exited),
            ("4", None, Some("e@x.io"), "a", Change::Exited),
        ]);
        let enc = encode(
            &mapping(MappingMode::Boolean, ExitedValue::False),
            w.segments(),
            &f,
        );
        assert_eq!(
            objects(&enc),
            vec![
                json!({"external_id": "u1", "_update_existing_only": false, "cdp_a": true, "cdp_b": false}),
                json!({"email": "e@x.io", "_update_existing_only": false, "cdp_a": false}),
            ]
        );
        assert_eq!(enc.data_points, vec![2, 1]);
        let enc = encode(
            &mapping(MappingMode::Boolean, ExitedValue::Null),
            w.segments(),
            &f,
        );
        assert_eq!(objects(&enc)[1]["cdp_a"], Value::Null);
        assert!(objects(&enc)[1].as_object().unwrap().contains_key("cdp_a"));
    }

    #[test]
    fn segment_names_and_the_prefix_are_escaped() {
        let (w, f) = flush_of(&[
            ("1", Some("u1"), None, "a\"b\\c", Change::Entered),
            ("2", Some("u1"), None, "tab\there", Change::Exited),
        ]);
        let mut m = mapping(MappingMode::Boolean, ExitedValue::False);
        m.attribute_prefix = "p\"".into();
        assert_eq!(
            objects(&encode(&m, w.segments(), &f)),
            vec![json!({"external_id": "u1", "_update_existing_only": false,
                        "p\"a\"b\\c": true, "p\"tab\there": false})]
        );
        let m = mapping(MappingMode::Array, ExitedValue::False);
        assert_eq!(
            objects(&encode(&m, w.segments(), &f)),
            vec![json!({"external_id": "u1", "_update_existing_only": false,
                        "cdp_segments": {"add": ["a\"b\\c"], "remove": ["tab\there"]}})]
        );
    }

    #[test]
    fn array_mode_adds_and_removes() {
        let (w, f) = flush_of(&[
            ("1", Some("u1"), None, "a", Change::Entered),
            ("2", Some("u1"), None, "b", Change::Exited),
            ("3", Some("u1"), None, "c", Change::Entered),
            ("4", Some("u2"), None, "c", Change::Exited),
        ]);
        let enc = encode(
            &mapping(MappingMode::Array, ExitedValue::False),
            w.segments(),
            &f,
        );
        assert_eq!(
            objects(&enc),
            vec![
                json!({"external_id": "u1", "_update_existing_only": false,
                       "cdp_segments": {"add": ["a", "c"], "remove": ["b"]}}),
                json!({"external_id": "u2", "_update_existing_only": false,
                       "cdp_segments": {"remove": ["c"]}}),
            ]
        );
        assert_eq!(enc.data_points, vec![3, 1]);
    }

    #[test]
    fn array_mode_writes_no_empty_array_attribute_for_attributes_alone() {
        let mut w = Window::new(WindowConfig {
            linger_ms: 0,
            batch_size: 75,
            max_pending_users: 100,
            max_pending_bytes: usize::MAX,
            dedup_memory: 100,
            delivered_memory: 100,
        });
        let event = |id: &'static str, seq: i64, attr: Option<&'static str>| Event {
            event_id: id.into(),
            external_id: Some("u1".into()),
            email: None,
            segment_id: "a".into(),
            segment_name: None,
            change: Change::Entered,
            occurred_at: 0,
            sequence: Some(seq),
            attributes: attr
                .map(|name| (name.into(), AttrValue::String("gold".into())))
                .into_iter()
                .collect(),
        };
        let m = mapping(MappingMode::Array, ExitedValue::False);
        let first = event("1", 1, None);
        w.admit(&first, first.validate().unwrap(), 0, 0, 0, 0);
        let f = w.pop_batch(0, true).unwrap();
        w.complete(&f, &f.users[0], false);
        // A repeat of the delivered membership (redundant) and an older one (stale), each with
        // a new attribute: the flushed user has attributes and no segment change.
        for (e, offset, name) in [
            (event("2", 2, Some("tier")), 1, "tier"),
            (event("3", 0, Some("plan")), 2, "plan"),
        ] {
            w.admit(&e, e.validate().unwrap(), 0, offset, offset, 0);
            let f = w.pop_batch(0, true).unwrap();
            assert!(f.user_changes(&f.users[0]).is_empty());
            let enc = encode(&m, w.segments(), &f);
            assert_eq!(
                objects(&enc),
                vec![json!({"external_id": "u1", "_update_existing_only": false, name: "gold"})]
            );
            assert_eq!(enc.data_points, vec![1]);
            w.complete(&f, &f.users[0], false);
        }
    }

    #[test]
    fn extra_attributes_merge_but_never_shadow_identifiers_or_segments() {
        let (w, f) = flush_of(&[("with-attrs", Some("u\"1"), None, "a", Change::Entered)]);
        let mut m = mapping(MappingMode::Boolean, ExitedValue::False);
        m.update_existing_only = true;
        let enc = encode(&m, w.segments(), &f);
        assert_eq!(
            objects(&enc),
            vec![
                json!({"external_id": "u\"1", "_update_existing_only": true, "cdp_a": true,
                        "tier": "gold \"vip\"", "score": 0.5})
            ]
        );
        assert_eq!(enc.data_points, vec![3]);
    }

    fn ev(segment: &str, attrs: &[&str]) -> Event<'static> {
        Event {
            event_id: "e".into(),
            external_id: Some("u1".into()),
            email: None,
            segment_id: segment.to_string().into(),
            segment_name: None,
            change: Change::Entered,
            occurred_at: 0,
            sequence: None,
            attributes: attrs
                .iter()
                .map(|a| (a.to_string().into(), AttrValue::Boolean(true)))
                .collect(),
        }
    }

    #[test]
    fn boolean_mode_rejects_segments_and_attributes_named_like_the_workers_keys() {
        let mut cfg = MappingConfig::default();
        for prefix in ["", "cdp_", "e"] {
            cfg.attribute_prefix = prefix.into();
            let rules = Mapping::new(&cfg, false).rules;
            for key in WORKER_KEYS {
                if let Some(segment) = key.strip_prefix(prefix) {
                    let e = ev(segment, &[]);
                    assert_eq!(
                        e.validate_with(&rules, 0),
                        Err(InvalidEvent::ReservedSegment {
                            segment_id: segment.into(),
                            attribute: (*key).into()
                        }),
                        "prefix {prefix:?}"
                    );
                }
                let e = ev("a", &[key]);
                assert_eq!(
                    e.validate_with(&rules, 0),
                    Err(InvalidEvent::ReservedAttribute {
                        name: (*key).into()
                    })
                );
            }
            // The array attribute is nobody's key in boolean mode.
            assert!(ev("cdp_segments", &["cdp_segments"])
                .validate_with(&rules, 0)
                .is_ok());
        }
        cfg.attribute_prefix = "cdp_".into();
        let rules = Mapping::new(&cfg, false).rules;
        assert!(ev("email", &["tier"]).validate_with(&rules, 0).is_ok());
    }

    #[test]
    fn array_mode_rejects_attributes_named_like_the_array_or_the_workers_keys() {
        let cfg = MappingConfig {
            mode: MappingMode::Array,
            array_attribute: "segs".into(),
            ..MappingConfig::default()
        };
        let rules = Mapping::new(&cfg, false).rules;
        for name in WORKER_KEYS.iter().chain(&["segs"]) {
            assert_eq!(
                ev("a", &["tier", name]).validate_with(&rules, 0),
                Err(InvalidEvent::ReservedAttribute {
                    name: (*name).into()
                })
            );
        }
        // Segment ids are values of the array, never keys.
        for segment in WORKER_KEYS.iter().chain(&["segs"]) {
            assert!(ev(segment, &[]).validate_with(&rules, 0).is_ok());
        }
    }

    #[test]
    fn rules_take_the_configured_max_future() {
        let mut cfg = crate::config::Config::default();
        assert_eq!(Mapping::from_config(&cfg).rules.max_future_ms(), 86_400_000);
        cfg.window.max_future_ms = 0;
        assert_eq!(Mapping::from_config(&cfg).rules.max_future_ms(), 0);
    }

    /// An attributes object's keys in order, duplicates kept (a JSON map would hide them).
    struct Keys(Vec<String>);

    impl<'de> serde::Deserialize<'de> for Keys {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Keys, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Keys;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("an object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> Result<Keys, A::Error> {
                    let mut keys = Vec::new();
                    while let Some((k, _)) = map.next_entry::<String, serde::de::IgnoredAny>()? {
                        keys.push(k);
                    }
                    Ok(Keys(keys))
                }
            }
            d.deserialize_map(V)
        }
    }

    proptest::proptest! {
        /// Whatever names the events use, every event the rules accept is encoded into
        /// objects that hold each key once and address the event's own user.
        #[test]
        fn accepted_events_never_write_a_key_twice(
            array in proptest::bool::ANY,
            prefix in proptest::sample::select(vec!["", "cdp_", "e"]),
            events in proptest::collection::vec(
                (
                    0u8..3,
                    proptest::sample::select(vec![
                        "a", "b", "email", "mail", "external_id", "_update_existing_only",
                        "cdp_segments", "phone", "user_alias",
                    ]),
                    proptest::collection::vec(
                        proptest::sample::select(vec![
                            "tier", "a", "cdp_a", "ea", "email", "braze_id",
                            "cdp_segments", "_update_existing_only",
                        ]),
                        0..3,
                    ),
                ),
                1..30,
            ),
        ) {
            let cfg = MappingConfig {
                mode: if array { MappingMode::Array } else { MappingMode::Boolean },
                attribute_prefix: prefix.into(),
                ..MappingConfig::default()
            };
            let m = Mapping::new(&cfg, false);
            let mut w = Window::new(WindowConfig {
                linger_ms: 0,
                batch_size: 75,
                max_pending_users: 100,
                max_pending_bytes: usize::MAX,
                dedup_memory: 100,
                delivered_memory: 100,
            });
            for (i, (user, segment, attrs)) in events.iter().enumerate() {
                let mut e = ev(segment, attrs);
                e.event_id = format!("e{i}").into();
                e.external_id = Some(format!("u{user}").into());
                e.sequence = Some(i as i64);
                if let Ok(identity) = e.validate_with(&m.rules, 0) {
                    w.admit(&e, identity, 0, i as i64, i as i64, 0);
                }
            }
            while let Some(f) = w.pop_batch(0, true) {
                let enc = encode(&m, w.segments(), &f);
                for (user, object) in f.users.iter().zip(&enc.objects) {
                    let Keys(keys) = serde_json::from_slice(object).unwrap();
                    let mut unique = keys.clone();
                    unique.sort();
                    unique.dedup();
                    proptest::prop_assert_eq!(unique.len(), keys.len(), "{:?}", keys);
                    let v: Value = serde_json::from_slice(object).unwrap();
                    proptest::prop_assert_eq!(&v["external_id"], &json!(&*user.id));
                    proptest::prop_assert_eq!(&v["_update_existing_only"], &json!(false));
                    w.complete(&f, user, false);
                }
            }
        }
    }
}
