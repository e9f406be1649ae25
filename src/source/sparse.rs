//! Parses only what a shape reads. A vendor's record is mostly what the worker does not need
//! (Debezium's schema, Segment's context, Adobe's profile attributes); building all of it
//! into a `serde_json::Value` costs an allocation per string and per object. Here the wanted
//! places are JSON Pointers, and everything off their paths is skipped as it is parsed
//! (still checked to be JSON), so the reader gets a `Value` holding just those places.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};

/// A tree of wanted places.
#[derive(Debug, Clone, Default)]
pub(crate) struct Paths {
    root: Node,
}

#[derive(Debug, Clone, Default)]
struct Node {
    children: Vec<(String, Node)>,
    /// Everything below is wanted.
    whole: bool,
    /// Only whether the key is there is wanted: kept as `null`.
    presence: bool,
}

impl Node {
    fn child(&self, key: &str) -> Option<&Node> {
        self.children.iter().find(|(k, _)| k == key).map(|(_, n)| n)
    }

    fn child_mut(&mut self, key: &str) -> &mut Node {
        let i = match self.children.iter().position(|(k, _)| k == key) {
            Some(i) => i,
            None => {
                self.children.push((key.to_string(), Node::default()));
                self.children.len() - 1
            }
        };
        &mut self.children[i].1
    }
}

impl Paths {
    fn at(&mut self, pointer: &str) -> &mut Node {
        let mut node = &mut self.root;
        // RFC 6901: "" is the whole document; each "/" starts a token, ~1 is "/", ~0 is "~".
        for token in pointer.split('/').skip(1) {
            let token = token.replace("~1", "/").replace("~0", "~");
            node = node.child_mut(&token);
        }
        node
    }

    /// The value at `pointer`, whole.
    pub(crate) fn want(&mut self, pointer: &str) -> &mut Self {
        self.at(pointer).whole = true;
        self
    }

    /// Whether `pointer` is there, not its value.
    pub(crate) fn want_presence(&mut self, pointer: &str) -> &mut Self {
        self.at(pointer).presence = true;
        self
    }

    pub(crate) fn parse(&self, text: &str) -> Result<Value, serde_json::Error> {
        let mut d = serde_json::Deserializer::from_str(text);
        let v = Seed(&self.root).deserialize(&mut d)?;
        d.end()?;
        Ok(v)
    }
}

struct Seed<'n>(&'n Node);

impl<'de> DeserializeSeed<'de> for Seed<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        if self.0.whole {
            return Value::deserialize(d);
        }
        if self.0.children.is_empty() {
            IgnoredAny::deserialize(d)?;
            return Ok(Value::Null);
        }
        d.deserialize_any(Sparse(self.0))
    }
}

struct Sparse<'n>(&'n Node);

impl<'de> Visitor<'de> for Sparse<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(Key(key)) = map.next_key()? {
            match self.0.child(&key) {
                Some(child) if child.presence && !child.whole && child.children.is_empty() => {
                    map.next_value::<IgnoredAny>()?;
                    out.insert(key.into_owned(), Value::Null);
                }
                Some(child) => {
                    let v = map.next_value_seed(Seed(child))?;
                    out.insert(key.into_owned(), v);
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Value::Object(out))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        loop {
            let index = out.len().to_string();
            let next = match self.0.child(&index) {
                Some(child) => seq.next_element_seed(Seed(child))?,
                None => seq.next_element::<IgnoredAny>()?.map(|_| Value::Null),
            };
            match next {
                Some(v) => out.push(v),
                None => return Ok(Value::Array(out)),
            }
        }
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
}

/// An object's key, borrowed from the text unless it holds an escape.
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_wanted_places_are_kept_and_the_rest_is_still_checked() {
        let mut p = Paths::default();
        p.want("/a/b")
            .want("/list/1/id")
            .want("/we~1ird")
            .want_presence("/schema");
        let doc = r#"{"a":{"b":{"deep":[1,2]},"c":"x"},"list":[{"id":"0"},{"id":"1","n":2}],
            "we/ird":true,"schema":{"huge":[1,2,3]},"skip":{"x":[{"y":"z"}]}}"#;
        let v = p.parse(doc).expect("parses");
        assert_eq!(
            v,
            serde_json::json!({"a":{"b":{"deep":[1,2]}},"list":[null,{"id":"1"}],
                "we/ird":true,"schema":null})
        );
        assert_eq!(v.pointer("/list/1/id"), Some(&Value::from("1")));
        assert!(
            p.parse(r#"{"skip":{"x":[}}"#).is_err(),
            "skipped parts are still JSON"
        );
        assert!(p.parse(r#"{"a":1} x"#).is_err(), "trailing bytes");
    }
}
