//! The decoded CDP event. Fields borrow from the Kafka payload where the wire format allows,
//! so decoding allocates nothing on the hot path; the window copies only what it keeps.

use std::borrow::Cow;

/// `MembershipChange` in the Avro schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Change {
    Entered,
    Exited,
}

impl Change {
    pub fn symbol(self) -> &'static str {
        match self {
            Change::Entered => "ENTERED",
            Change::Exited => "EXITED",
        }
    }

    pub fn from_symbol(s: &str) -> Option<Change> {
        match s {
            "ENTERED" => Some(Change::Entered),
            "EXITED" => Some(Change::Exited),
            _ => None,
        }
    }
}

/// A value of the optional `attributes` map: null, string, long, double or boolean.
#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue<'a> {
    Null,
    String(Cow<'a, str>),
    Long(i64),
    Double(f64),
    Boolean(bool),
}

impl AttrValue<'_> {
    pub fn into_owned(self) -> AttrValue<'static> {
        match self {
            AttrValue::Null => AttrValue::Null,
            AttrValue::String(s) => AttrValue::String(Cow::Owned(s.into_owned())),
            AttrValue::Long(v) => AttrValue::Long(v),
            AttrValue::Double(v) => AttrValue::Double(v),
            AttrValue::Boolean(v) => AttrValue::Boolean(v),
        }
    }
}

/// `SegmentMembershipChange`, as docs/design.md defines it.
#[derive(Debug, Clone, PartialEq)]
pub struct Event<'a> {
    pub event_id: Cow<'a, str>,
    pub external_id: Option<Cow<'a, str>>,
    pub email: Option<Cow<'a, str>>,
    pub segment_id: Cow<'a, str>,
    pub segment_name: Option<Cow<'a, str>>,
    pub change: Change,
    /// Epoch milliseconds. Orders changes after `sequence`; one beyond the worker's clock by
    /// more than `window.max_future_ms` is invalid (see [`Rules`]).
    pub occurred_at: i64,
    /// Source order (a CDC LSN, a version), compared before `occurred_at` in last write
    /// wins. It is opaque, so no value can be refused as too large: a wrong huge one wins
    /// against every later correct change of its (user, segment), which are dropped as stale
    /// for as long as the window remembers what it sent (`window.delivered_memory`; across a
    /// rebalance or a restart too, within `window.restore_records`, since a partition's new
    /// owner restores it from the log); the next correct change after that is written again.
    pub sequence: Option<i64>,
    /// In the order the writer gave them; an absent map and an empty map are the same.
    pub attributes: Vec<(Cow<'a, str>, AttrValue<'a>)>,
}

/// The Braze identifier a user is addressed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Identity<'e> {
    ExternalId(&'e str),
    Email(&'e str),
}

impl<'e> Identity<'e> {
    pub fn value(&self) -> &'e str {
        match self {
            Identity::ExternalId(v) | Identity::Email(v) => v,
        }
    }
}

/// Why a well-formed record still cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidEvent {
    #[error("event has neither external_id nor email")]
    NoIdentifier,
    #[error("event has an empty segment_id")]
    EmptySegmentId,
    /// Exact repeats are dropped by event_id: a blank one would make unrelated events repeats.
    #[error("event has an empty event_id")]
    EmptyEventId,
    /// It would win last write wins against every correct change until the clock caught up.
    #[error(
        "occurred_at {occurred_at} is {ahead_ms} ms ahead of the worker's clock, more than \
         window.max_future_ms = {max_future_ms}: it would win last write wins against every \
         later change"
    )]
    InTheFuture {
        occurred_at: i64,
        ahead_ms: i64,
        max_future_ms: u64,
    },
    #[error(
        "segment_id {segment_id:?} would be written as attribute {attribute:?}, which the \
         worker writes itself in every attributes object: rename the segment or change \
         mapping.attribute_prefix"
    )]
    ReservedSegment {
        segment_id: String,
        attribute: String,
    },
    #[error(
        "extra attribute {name:?} collides with a key the worker writes itself in every \
         attributes object: rename or drop it upstream"
    )]
    ReservedAttribute { name: String },
    /// Braze refuses it, and holding it would cost the window memory meant for thousands
    /// of ordinary users.
    #[error("{field} is {len} {unit} long, over Braze's limit of {max}")]
    TooLong {
        field: String,
        len: usize,
        max: usize,
        unit: &'static str,
    },
    #[error("extra attribute has an empty name, which Braze refuses")]
    EmptyAttributeName,
}

/// Braze's limits (its SDKs' `changeUser`; custom attribute keys and string values), and
/// an email address's own (RFC 5321's path limit).
pub const MAX_EXTERNAL_ID_BYTES: usize = 997;
pub const MAX_EMAIL_CHARS: usize = 254;
pub const MAX_ATTRIBUTE_CHARS: usize = 255;

/// Whether `s` is over `max` characters; the byte length answers for nearly every string.
fn over(s: &str, max: usize) -> Option<usize> {
    if s.len() <= max {
        return None;
    }
    let n = s.chars().count();
    (n > max).then_some(n)
}

/// What an event must satisfy beyond its own shape, which depends on the deployment: how far
/// ahead of the worker's clock `occurred_at` may be, and the keys the mapping writes itself,
/// which an event must not overwrite. Built once; checking an event allocates nothing.
#[derive(Debug, Clone)]
pub struct Rules {
    /// 0: no bound.
    max_future_ms: u64,
    /// (segment_id, the attribute it would become) for every segment whose attribute would
    /// be one of the reserved keys.
    reserved_segments: Box<[(Box<str>, Box<str>)]>,
    /// Keys an extra attribute may not take.
    reserved_attributes: Box<[Box<str>]>,
    /// Characters a segment_id may have: the attribute it becomes (prefix and id) or the
    /// array value it is must fit Braze's limit.
    max_segment_chars: usize,
    /// The wall clock when these rules were built, for [`Rules::epoch_ms`].
    built_epoch_ms: i64,
}

impl Rules {
    /// `reserved`: every key the mapping writes itself in an attributes object.
    /// `segment_prefix`: when each segment is written as an attribute (boolean mode), the
    /// prefix its id takes; `None` when segments are values, not keys (array mode).
    pub fn new(max_future_ms: u64, reserved: &[&str], segment_prefix: Option<&str>) -> Rules {
        let reserved_segments = match segment_prefix {
            None => Box::default(),
            Some(prefix) => reserved
                .iter()
                .filter_map(|key| {
                    let id = key.strip_prefix(prefix).filter(|id| !id.is_empty())?;
                    Some((Box::from(id), Box::from(*key)))
                })
                .collect(),
        };
        Rules {
            max_future_ms,
            reserved_segments,
            reserved_attributes: reserved.iter().map(|k| Box::from(*k)).collect(),
            max_segment_chars: MAX_ATTRIBUTE_CHARS
                .saturating_sub(segment_prefix.map_or(0, |p| p.chars().count()))
                .max(1),
            built_epoch_ms: epoch_ms_now(),
        }
    }

    pub fn max_future_ms(&self) -> u64 {
        self.max_future_ms
    }

    /// The wall clock `since_ms` after these rules were built, without reading it: the
    /// pipeline reads a monotonic clock once per burst and must not read another per event.
    /// A clock started before the rules were built gives a time slightly ahead, which only
    /// widens the future bound by that gap; drift between the two clocks over a long run is
    /// far below a bound meant in hours.
    pub fn epoch_ms(&self, since_ms: u64) -> i64 {
        self.built_epoch_ms
            .saturating_add(i64::try_from(since_ms).unwrap_or(i64::MAX))
    }
}

fn epoch_ms_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl<'a> Event<'a> {
    /// external_id, else email; empty strings count as absent because Braze rejects them.
    pub fn identity(&self) -> Option<Identity<'_>> {
        match (&self.external_id, &self.email) {
            (Some(id), _) if !id.is_empty() => Some(Identity::ExternalId(id)),
            (_, Some(email)) if !email.is_empty() => Some(Identity::Email(email)),
            _ => None,
        }
    }

    /// The checks that need nothing but the event: an event_id, a segment_id, an identifier.
    pub fn validate(&self) -> Result<Identity<'_>, InvalidEvent> {
        if self.segment_id.is_empty() {
            return Err(InvalidEvent::EmptySegmentId);
        }
        if self.event_id.trim().is_empty() {
            return Err(InvalidEvent::EmptyEventId);
        }
        self.identity().ok_or(InvalidEvent::NoIdentifier)
    }

    /// [`Event::validate`], then the deployment's [`Rules`] against `now_epoch_ms`, the
    /// worker's wall clock (read once per burst, not per event).
    pub fn validate_with(
        &self,
        rules: &Rules,
        now_epoch_ms: i64,
    ) -> Result<Identity<'_>, InvalidEvent> {
        let identity = self.validate()?;
        if rules.max_future_ms > 0 {
            let ahead_ms = self.occurred_at.saturating_sub(now_epoch_ms);
            if ahead_ms > i64::try_from(rules.max_future_ms).unwrap_or(i64::MAX) {
                return Err(InvalidEvent::InTheFuture {
                    occurred_at: self.occurred_at,
                    ahead_ms,
                    max_future_ms: rules.max_future_ms,
                });
            }
        }
        if let Some((_, attribute)) = rules
            .reserved_segments
            .iter()
            .find(|(id, _)| **id == *self.segment_id)
        {
            return Err(InvalidEvent::ReservedSegment {
                segment_id: self.segment_id.to_string(),
                attribute: attribute.to_string(),
            });
        }
        let too_long = |field: &str, len, max, unit| InvalidEvent::TooLong {
            field: field.to_string(),
            len,
            max,
            unit,
        };
        if let Some(id) = &self.external_id {
            if id.len() > MAX_EXTERNAL_ID_BYTES {
                return Err(too_long(
                    "external_id",
                    id.len(),
                    MAX_EXTERNAL_ID_BYTES,
                    "bytes",
                ));
            }
        }
        if let Some(n) = self.email.as_deref().and_then(|e| over(e, MAX_EMAIL_CHARS)) {
            return Err(too_long("email", n, MAX_EMAIL_CHARS, "characters"));
        }
        if let Some(n) = over(&self.segment_id, rules.max_segment_chars) {
            return Err(too_long(
                "segment_id",
                n,
                rules.max_segment_chars,
                "characters",
            ));
        }
        for (name, value) in &self.attributes {
            if name.is_empty() {
                return Err(InvalidEvent::EmptyAttributeName);
            }
            if let Some(n) = over(name, MAX_ATTRIBUTE_CHARS) {
                return Err(too_long(
                    "an extra attribute's name",
                    n,
                    MAX_ATTRIBUTE_CHARS,
                    "characters",
                ));
            }
            if let AttrValue::String(v) = value {
                if let Some(n) = over(v, MAX_ATTRIBUTE_CHARS) {
                    return Err(too_long(
                        &format!("extra attribute {name:?}"),
                        n,
                        MAX_ATTRIBUTE_CHARS,
                        "characters",
                    ));
                }
            }
            if rules.reserved_attributes.iter().any(|r| **r == **name) {
                return Err(InvalidEvent::ReservedAttribute {
                    name: name.to_string(),
                });
            }
        }
        Ok(identity)
    }

    pub fn into_owned(self) -> Event<'static> {
        fn own(c: Cow<'_, str>) -> Cow<'static, str> {
            Cow::Owned(c.into_owned())
        }
        Event {
            event_id: own(self.event_id),
            external_id: self.external_id.map(own),
            email: self.email.map(own),
            segment_id: own(self.segment_id),
            segment_name: self.segment_name.map(own),
            change: self.change,
            occurred_at: self.occurred_at,
            sequence: self.sequence,
            attributes: self
                .attributes
                .into_iter()
                .map(|(k, v)| (own(k), v.into_owned()))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> Event<'static> {
        Event {
            event_id: "e1".into(),
            external_id: None,
            email: None,
            segment_id: "seg".into(),
            segment_name: None,
            change: Change::Entered,
            occurred_at: 0,
            sequence: None,
            attributes: vec![],
        }
    }

    #[test]
    fn identity_prefers_external_id_and_skips_empty_values() {
        let mut e = event();
        assert_eq!(e.validate(), Err(InvalidEvent::NoIdentifier));
        e.email = Some("a@x.io".into());
        assert_eq!(e.identity(), Some(Identity::Email("a@x.io")));
        e.external_id = Some("".into());
        assert_eq!(e.identity(), Some(Identity::Email("a@x.io")));
        e.external_id = Some("u1".into());
        assert_eq!(e.identity(), Some(Identity::ExternalId("u1")));
        e.segment_id = "".into();
        assert_eq!(e.validate(), Err(InvalidEvent::EmptySegmentId));
    }

    fn valid() -> Event<'static> {
        Event {
            external_id: Some("u1".into()),
            ..event()
        }
    }

    const NOW: i64 = 1_750_000_000_000;
    const DAY: u64 = 86_400_000;

    /// Boolean mode with prefix "cdp_": the worker writes these keys itself.
    fn rules(max_future_ms: u64) -> Rules {
        Rules::new(
            max_future_ms,
            &["external_id", "email", "_update_existing_only", "cdp_x"],
            Some("cdp_"),
        )
    }

    #[test]
    fn fields_over_brazes_limits_are_invalid_and_at_the_limit_valid() {
        let r = rules(0);
        let ok = |e: &Event<'_>| e.validate_with(&r, NOW).is_ok();
        let mut e = valid();
        e.external_id = Some("x".repeat(MAX_EXTERNAL_ID_BYTES).into());
        assert!(ok(&e));
        e.external_id = Some("x".repeat(MAX_EXTERNAL_ID_BYTES + 1).into());
        assert!(matches!(
            e.validate_with(&r, NOW),
            Err(InvalidEvent::TooLong { .. })
        ));
        let mut e = Event {
            external_id: None,
            email: Some(format!("{}@x.io", "é".repeat(MAX_EMAIL_CHARS - 5)).into()),
            ..valid()
        };
        assert!(ok(&e), "characters, not bytes");
        e.email = Some(format!("{}@x.io", "a".repeat(MAX_EMAIL_CHARS - 4)).into());
        assert!(!ok(&e));
        // Prefix "cdp_" and the id make the attribute name.
        let mut e = valid();
        e.segment_id = "s".repeat(MAX_ATTRIBUTE_CHARS - 4).into();
        assert!(ok(&e));
        e.segment_id = "s".repeat(MAX_ATTRIBUTE_CHARS - 3).into();
        assert!(!ok(&e));
        let with_attr = |name: &str, v: AttrValue<'static>| Event {
            attributes: vec![(name.to_string().into(), v)],
            ..valid()
        };
        assert!(ok(&with_attr(
            "a",
            AttrValue::String("v".repeat(255).into())
        )));
        assert!(!ok(&with_attr(
            "a",
            AttrValue::String("v".repeat(256).into())
        )));
        assert!(ok(&with_attr(&"n".repeat(255), AttrValue::Long(1))));
        assert!(!ok(&with_attr(&"n".repeat(256), AttrValue::Long(1))));
        assert_eq!(
            with_attr("", AttrValue::Null).validate_with(&r, NOW),
            Err(InvalidEvent::EmptyAttributeName)
        );
    }

    #[test]
    fn a_blank_event_id_is_invalid() {
        for id in ["", " ", "\t\n "] {
            let e = Event {
                event_id: id.into(),
                ..valid()
            };
            assert_eq!(e.validate(), Err(InvalidEvent::EmptyEventId), "{id:?}");
            assert_eq!(
                e.validate_with(&rules(DAY), NOW),
                Err(InvalidEvent::EmptyEventId)
            );
        }
        let e = Event {
            event_id: " e1 ".into(),
            ..valid()
        };
        assert!(e.validate().is_ok());
    }

    #[test]
    fn occurred_at_may_be_ahead_of_the_clock_by_max_future_ms_and_no_more() {
        let at = |occurred_at: i64| Event {
            occurred_at,
            ..valid()
        };
        let r = rules(DAY);
        let day = DAY as i64;
        for ok in [0, NOW - day * 365, NOW, NOW + day, i64::MIN] {
            assert!(at(ok).validate_with(&r, NOW).is_ok(), "{ok}");
        }
        for bad in [NOW + day + 1, NOW + day * 365 * 100, i64::MAX] {
            match at(bad).validate_with(&r, NOW) {
                Err(InvalidEvent::InTheFuture {
                    occurred_at,
                    ahead_ms,
                    max_future_ms,
                }) => {
                    assert_eq!(
                        (occurred_at, ahead_ms, max_future_ms),
                        (bad, bad - NOW, DAY)
                    );
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
        let e = at(i64::MAX).validate_with(&r, NOW).unwrap_err();
        assert!(e.to_string().contains("window.max_future_ms"), "{e}");
        assert!(
            at(i64::MAX).validate_with(&rules(0), NOW).is_ok(),
            "0 turns the bound off"
        );
    }

    #[test]
    fn a_segment_written_as_a_reserved_key_is_invalid() {
        let r = rules(DAY);
        let e = Event {
            segment_id: "x".into(),
            ..valid()
        };
        let err = e.validate_with(&r, NOW).unwrap_err();
        assert_eq!(
            err,
            InvalidEvent::ReservedSegment {
                segment_id: "x".into(),
                attribute: "cdp_x".into()
            }
        );
        assert!(err.to_string().contains("\"cdp_x\""), "{err}");
        // Without the prefix the id is just a segment: "cdp_email" is not "email".
        for fine in ["email", "external_id", "cdp_x", "X", "x "] {
            let e = Event {
                segment_id: fine.into(),
                ..valid()
            };
            assert!(e.validate_with(&r, NOW).is_ok(), "{fine}");
        }
        let no_prefix = Rules::new(DAY, &["external_id", "email"], Some(""));
        let e = Event {
            segment_id: "email".into(),
            ..valid()
        };
        assert!(matches!(
            e.validate_with(&no_prefix, NOW),
            Err(InvalidEvent::ReservedSegment { .. })
        ));
        let array = Rules::new(DAY, &["external_id", "email"], None);
        assert!(
            e.validate_with(&array, NOW).is_ok(),
            "segments are values in array mode"
        );
    }

    #[test]
    fn an_extra_attribute_named_like_a_reserved_key_is_invalid() {
        let r = rules(DAY);
        let with = |name: &'static str| Event {
            attributes: vec![
                ("tier".into(), AttrValue::String("gold".into())),
                (name.into(), AttrValue::String("x@y.z".into())),
            ],
            ..valid()
        };
        for name in ["email", "external_id", "_update_existing_only", "cdp_x"] {
            let err = with(name).validate_with(&r, NOW).unwrap_err();
            assert_eq!(err, InvalidEvent::ReservedAttribute { name: name.into() });
            assert!(err.to_string().contains(&format!("{name:?}")), "{err}");
        }
        for fine in ["Email", "email ", "plan", "cdp_y"] {
            assert!(with(fine).validate_with(&r, NOW).is_ok(), "{fine}");
        }
    }

    #[test]
    fn rules_read_the_wall_clock_once_and_add_the_monotonic_time() {
        let before = epoch_ms_now();
        let r = rules(DAY);
        let after = epoch_ms_now();
        assert!((before..=after).contains(&r.epoch_ms(0)));
        assert_eq!(r.epoch_ms(1500), r.epoch_ms(0) + 1500);
        assert_eq!(r.epoch_ms(u64::MAX), i64::MAX);
    }

    proptest::proptest! {
        /// The checks never panic on extreme values, and the future bound is exactly
        /// `occurred_at - now > max_future_ms`.
        #[test]
        fn the_future_bound_is_exact(
            occurred_at in proptest::num::i64::ANY,
            now in proptest::num::i64::ANY,
            max_future_ms in proptest::prop_oneof![proptest::strategy::Just(0u64), 1u64..=u64::MAX],
        ) {
            let e = Event { occurred_at, ..valid() };
            let got = e.validate_with(&Rules::new(max_future_ms, &[], None), now);
            let ahead = i128::from(occurred_at) - i128::from(now);
            let expect_bad = max_future_ms > 0 && ahead > i128::from(max_future_ms)
                // `ahead` saturates at i64::MAX, which no bound above it can exceed.
                && i128::from(max_future_ms) < i128::from(i64::MAX);
            proptest::prop_assert_eq!(got.is_err(), expect_bad, "{:?}", got);
        }
    }
}
