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

/// `SegmentMembershipChange`, as DESIGN.md defines it.
#[derive(Debug, Clone, PartialEq)]
pub struct Event<'a> {
    pub event_id: Cow<'a, str>,
    pub external_id: Option<Cow<'a, str>>,
    pub email: Option<Cow<'a, str>>,
    pub segment_id: Cow<'a, str>,
    pub segment_name: Option<Cow<'a, str>>,
    pub change: Change,
    /// Epoch milliseconds.
    pub occurred_at: i64,
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

    pub fn validate(&self) -> Result<Identity<'_>, InvalidEvent> {
        if self.segment_id.is_empty() {
            return Err(InvalidEvent::EmptySegmentId);
        }
        self.identity().ok_or(InvalidEvent::NoIdentifier)
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
}
