//! `Event` → payload, the inverse of `decode`: JSON, the Avro body written with our schema,
//! and the Confluent wire format. Used by `produce`, the demo and the tests.

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

use crate::event::{AttrValue, Change, Event};

pub use crate::decode::SCHEMA;

/// The JSON form: absent optional fields are left out, `occurred_at` is epoch milliseconds.
pub fn to_json(e: &Event) -> Vec<u8> {
    // Cannot fail: the writer is a Vec and every key is a string.
    serde_json::to_vec(&Json(e)).unwrap_or_default()
}

/// The Avro binary body, written with `SCHEMA` (no header, no schema id).
pub fn to_avro(e: &Event) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    write_avro(&mut out, e);
    out
}

/// The Confluent wire format: magic byte 0, the schema id big-endian, the Avro body.
pub fn to_confluent(schema_id: u32, e: &Event) -> Vec<u8> {
    let mut out = Vec::with_capacity(133);
    out.push(0);
    out.extend_from_slice(&schema_id.to_be_bytes());
    write_avro(&mut out, e);
    out
}

fn write_avro(out: &mut Vec<u8>, e: &Event) {
    write_str(out, &e.event_id);
    write_opt_str(out, e.external_id.as_deref());
    write_opt_str(out, e.email.as_deref());
    write_str(out, &e.segment_id);
    write_opt_str(out, e.segment_name.as_deref());
    // Symbol indexes of the MembershipChange enum in SCHEMA.
    write_long(
        out,
        match e.change {
            Change::Entered => 0,
            Change::Exited => 1,
        },
    );
    write_long(out, e.occurred_at);
    match e.sequence {
        None => write_long(out, 0),
        Some(s) => {
            write_long(out, 1);
            write_long(out, s);
        }
    }
    // An empty map and an absent one mean the same; null is the shorter.
    if e.attributes.is_empty() {
        write_long(out, 0);
        return;
    }
    write_long(out, 1);
    write_long(out, e.attributes.len() as i64);
    for (key, value) in &e.attributes {
        write_str(out, key);
        // Branch indexes of ["null","string","long","double","boolean"].
        match value {
            AttrValue::Null => write_long(out, 0),
            AttrValue::String(s) => {
                write_long(out, 1);
                write_str(out, s);
            }
            AttrValue::Long(v) => {
                write_long(out, 2);
                write_long(out, *v);
            }
            AttrValue::Double(v) => {
                write_long(out, 3);
                out.extend_from_slice(&v.to_le_bytes());
            }
            AttrValue::Boolean(v) => {
                write_long(out, 4);
                out.push(u8::from(*v));
            }
        }
    }
    write_long(out, 0);
}

fn write_long(out: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    write_long(out, s.len() as i64);
    out.extend_from_slice(s.as_bytes());
}

fn write_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => write_long(out, 0),
        Some(s) => {
            write_long(out, 1);
            write_str(out, s);
        }
    }
}

struct Json<'e, 'a>(&'e Event<'a>);

impl Serialize for Json<'_, '_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let e = self.0;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("event_id", &*e.event_id)?;
        if let Some(v) = &e.external_id {
            m.serialize_entry("external_id", &**v)?;
        }
        if let Some(v) = &e.email {
            m.serialize_entry("email", &**v)?;
        }
        m.serialize_entry("segment_id", &*e.segment_id)?;
        if let Some(v) = &e.segment_name {
            m.serialize_entry("segment_name", &**v)?;
        }
        m.serialize_entry("change", e.change.symbol())?;
        m.serialize_entry("occurred_at", &e.occurred_at)?;
        if let Some(v) = e.sequence {
            m.serialize_entry("sequence", &v)?;
        }
        if !e.attributes.is_empty() {
            m.serialize_entry("attributes", &Attrs(&e.attributes))?;
        }
        m.end()
    }
}

struct Attrs<'e, 'a>(&'e [(std::borrow::Cow<'a, str>, AttrValue<'a>)]);

impl Serialize for Attrs<'_, '_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0 {
            match v {
                AttrValue::Null => m.serialize_entry(&**k, &())?,
                AttrValue::String(v) => m.serialize_entry(&**k, &**v)?,
                AttrValue::Long(v) => m.serialize_entry(&**k, v)?,
                AttrValue::Double(v) => m.serialize_entry(&**k, v)?,
                AttrValue::Boolean(v) => m.serialize_entry(&**k, v)?,
            }
        }
        m.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Format;
    use crate::decode::{Decoder, MemoryRegistry};
    use apache_avro::types::Value;
    use std::sync::Arc;

    fn sample() -> Event<'static> {
        Event {
            event_id: "4b1c9a40-0000-4000-8000-000000000001".into(),
            external_id: Some("user-000001".into()),
            email: None,
            segment_id: "seg_vip_01".into(),
            segment_name: Some("VIP 01".into()),
            change: Change::Exited,
            occurred_at: 1_704_067_200_000,
            sequence: Some(-3),
            attributes: vec![
                ("tier".into(), AttrValue::String("gold \"β\"".into())),
                ("score".into(), AttrValue::Double(0.73)),
                ("orders".into(), AttrValue::Long(-12_345_678_901)),
                ("vip".into(), AttrValue::Boolean(false)),
                ("gone".into(), AttrValue::Null),
            ],
        }
    }

    #[test]
    fn every_format_round_trips() {
        let e = sample();
        let registry = Arc::new(MemoryRegistry::new());
        let id = registry.register(SCHEMA);
        let cases = [
            (Format::Json, to_json(&e)),
            (Format::Avro, to_avro(&e)),
            (Format::AvroConfluent, to_confluent(id, &e)),
        ];
        for (format, payload) in cases {
            let mut d = Decoder::new(format, Some(registry.clone())).expect("decoder");
            assert_eq!(d.decode(&payload).expect("decodes"), e, "{format:?}");
        }
    }

    #[test]
    fn avro_body_is_what_apache_avro_reads() {
        let schema = apache_avro::Schema::parse_str(SCHEMA).expect("schema parses");
        let e = sample();
        let value = apache_avro::from_avro_datum(&schema, &mut &to_avro(&e)[..], None)
            .expect("apache_avro reads it");
        let Value::Record(fields) = value else {
            panic!("not a record: {value:?}")
        };
        assert_eq!(fields[0].1, Value::String(e.event_id.to_string()));
        assert_eq!(fields[5].1, Value::Enum(1, "EXITED".into()));
        assert_eq!(fields[6].1, Value::TimestampMillis(e.occurred_at));
        assert_eq!(fields[7].1, Value::Union(1, Box::new(Value::Long(-3))));
        let Value::Union(1, map) = &fields[8].1 else {
            panic!("attributes: {:?}", fields[8].1)
        };
        let Value::Map(map) = &**map else {
            panic!("attributes: {map:?}")
        };
        assert_eq!(map.len(), 5);
        assert_eq!(map["score"], Value::Union(3, Box::new(Value::Double(0.73))));
    }

    #[test]
    fn json_leaves_absent_fields_out() {
        let mut e = sample();
        e.segment_name = None;
        e.sequence = None;
        e.attributes.clear();
        let text = String::from_utf8(to_json(&e)).expect("utf-8");
        assert!(!text.contains("segment_name") && !text.contains("sequence"));
        assert!(!text.contains("attributes") && !text.contains("email"));
        assert!(text.contains(r#""change":"EXITED""#), "{text}");
    }
}
