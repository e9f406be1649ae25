//! JSON payload → `Event`, borrowing every string that has no escape in it.
//!
//! serde's own `Cow<str>` always copies, and so does `Option<Cow<str>>` even with
//! `#[serde(borrow)]`, hence the small `Str` wrapper whose visitor keeps borrowed strings.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use crate::event::{AttrValue, Change, Event};

pub(crate) fn decode(payload: &[u8]) -> Result<Event<'_>, serde_json::Error> {
    // The payload is checked for UTF-8 once, whole, and parsed as a `str`: from bytes,
    // serde_json checks each string apart, which costs several times more for the short
    // strings of an event (13% of the hot path's instructions).
    let text = std::str::from_utf8(payload).map_err(<serde_json::Error as de::Error>::custom)?;
    let raw: Raw<'_> = serde_json::from_str(text)?;
    Ok(Event {
        event_id: raw.event_id.0,
        external_id: raw.external_id.map(|s| s.0),
        email: raw.email.map(|s| s.0),
        segment_id: raw.segment_id.0,
        segment_name: raw.segment_name.map(|s| s.0),
        change: raw.change.0,
        occurred_at: raw.occurred_at.0,
        sequence: raw.sequence,
        attributes: raw.attributes.map(|a| a.0).unwrap_or_default(),
    })
}

#[derive(Deserialize)]
struct Raw<'a> {
    #[serde(borrow)]
    event_id: Str<'a>,
    #[serde(borrow, default)]
    external_id: Option<Str<'a>>,
    #[serde(borrow, default)]
    email: Option<Str<'a>>,
    #[serde(borrow)]
    segment_id: Str<'a>,
    #[serde(borrow, default)]
    segment_name: Option<Str<'a>>,
    change: ChangeSymbol,
    occurred_at: Millis,
    #[serde(default)]
    sequence: Option<i64>,
    #[serde(borrow, default)]
    attributes: Option<Attributes<'a>>,
}

struct Str<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Str<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Str<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Str(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Str(Cow::Owned(v.to_string())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Str(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V(PhantomData))
    }
}

struct ChangeSymbol(Change);

impl<'de> Deserialize<'de> for ChangeSymbol {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ChangeSymbol;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"ENTERED\" or \"EXITED\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Change::from_symbol(v)
                    .map(ChangeSymbol)
                    .ok_or_else(|| E::unknown_variant(v, &["ENTERED", "EXITED"]))
            }
        }
        d.deserialize_str(V)
    }
}

/// `occurred_at`: epoch milliseconds, or an RFC 3339 string.
struct Millis(i64);

impl<'de> Deserialize<'de> for Millis {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Millis;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("epoch milliseconds or an RFC 3339 timestamp")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(Millis(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                i64::try_from(v)
                    .map(Millis)
                    .map_err(|_| E::custom(format!("occurred_at {v} out of range")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                chrono::DateTime::parse_from_rfc3339(v)
                    .map(|t| Millis(t.timestamp_millis()))
                    .map_err(|e| E::custom(format!("occurred_at {v:?} is not RFC 3339: {e}")))
            }
        }
        d.deserialize_any(V)
    }
}

struct Attributes<'a>(Vec<(Cow<'a, str>, AttrValue<'a>)>);

impl<'de: 'a, 'a> Deserialize<'de> for Attributes<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Attributes<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of null, string, number or boolean values")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(4));
                while let Some(key) = map.next_key::<Str<'a>>()? {
                    let value = map.next_value::<Attr<'a>>()?;
                    out.push((key.0, value.0));
                }
                Ok(Attributes(out))
            }
        }
        d.deserialize_map(V(PhantomData))
    }
}

struct Attr<'a>(AttrValue<'a>);

impl<'de: 'a, 'a> Deserialize<'de> for Attr<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Attr<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("null, a string, a number or a boolean")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Attr(AttrValue::Null))
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Attr(AttrValue::Null))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
                Ok(Attr(AttrValue::Boolean(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(Attr(AttrValue::Long(v)))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                // Above i64::MAX the Avro schema has no integer for it; a double keeps its size.
                Ok(Attr(
                    i64::try_from(v).map_or(AttrValue::Double(v as f64), AttrValue::Long),
                ))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                Ok(Attr(AttrValue::Double(v)))
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Attr(AttrValue::String(Cow::Borrowed(v))))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Attr(AttrValue::String(Cow::Owned(v.to_string()))))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Attr(AttrValue::String(Cow::Owned(v))))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_event_borrows_its_strings() {
        let json = br#"{"event_id":"e-1","external_id":"u-1","email":"a@x.io","segment_id":"seg_vip",
            "segment_name":"VIP","change":"ENTERED","occurred_at":1700000000123,"sequence":7,
            "attributes":{"tier":"gold","score":0.5,"orders":3,"vip":true,"gone":null},"extra":[1,2]}"#;
        let e = decode(json).expect("decodes");
        assert!(matches!(e.event_id, Cow::Borrowed("e-1")));
        assert!(matches!(e.external_id, Some(Cow::Borrowed("u-1"))));
        assert_eq!(e.email.as_deref(), Some("a@x.io"));
        assert_eq!(e.segment_id, "seg_vip");
        assert_eq!(e.segment_name.as_deref(), Some("VIP"));
        assert_eq!(e.change, Change::Entered);
        assert_eq!(e.occurred_at, 1_700_000_000_123);
        assert_eq!(e.sequence, Some(7));
        assert_eq!(
            e.attributes,
            vec![
                ("tier".into(), AttrValue::String("gold".into())),
                ("score".into(), AttrValue::Double(0.5)),
                ("orders".into(), AttrValue::Long(3)),
                ("vip".into(), AttrValue::Boolean(true)),
                ("gone".into(), AttrValue::Null),
            ]
        );
        assert!(matches!(e.attributes[0].0, Cow::Borrowed(_)));
    }

    #[test]
    fn optional_fields_may_be_absent_or_null() {
        let json = br#"{"event_id":"e","email":null,"segment_id":"s","change":"EXITED",
            "occurred_at":5,"sequence":null,"attributes":null}"#;
        let e = decode(json).expect("decodes");
        assert_eq!(e.external_id, None);
        assert_eq!(e.email, None);
        assert_eq!(e.segment_name, None);
        assert_eq!(e.sequence, None);
        assert!(e.attributes.is_empty());
        assert_eq!(e.change, Change::Exited);
    }

    #[test]
    fn occurred_at_accepts_rfc3339_with_offset() {
        let json = br#"{"event_id":"e","segment_id":"s","change":"ENTERED","occurred_at":"2024-01-01T01:00:00.250+01:00"}"#;
        let e = decode(json).expect("decodes");
        assert_eq!(e.occurred_at, 1_704_067_200_250);
    }

    #[test]
    fn escaped_strings_are_unescaped() {
        let json =
            br#"{"event_id":"a\"b","segment_id":"s\u00e9","change":"ENTERED","occurred_at":1}"#;
        let e = decode(json).expect("decodes");
        assert_eq!(e.event_id, "a\"b");
        assert_eq!(e.segment_id, "s\u{e9}");
    }

    #[test]
    fn record_faults_are_errors() {
        let bad = [
            &br#"{"event_id":"e","segment_id":"s","change":"JOINED","occurred_at":1}"#[..],
            br#"{"event_id":"e","segment_id":"s","change":"ENTERED","occurred_at":"yesterday"}"#,
            br#"{"event_id":"e","segment_id":"s","change":"ENTERED","occurred_at":1.5}"#,
            br#"{"event_id":"e","change":"ENTERED","occurred_at":1}"#,
            br#"{"event_id":"e","segment_id":"s","change":"ENTERED","occurred_at":1,"attributes":{"a":[1]}}"#,
            br#"{"event_id":"e""#,
            b"\xff\x00",
        ];
        for payload in bad {
            assert!(
                decode(payload).is_err(),
                "{}",
                String::from_utf8_lossy(payload)
            );
        }
        let err = decode(bad[0])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("JOINED"), "{err}");
    }
}
