//! Parses only what a shape reads. A vendor's record is mostly what the worker does not need
//! (Debezium's schema, Segment's context, Adobe's profile attributes); building all of it
//! into a `serde_json::Value` costs an allocation per string and per object. Here the wanted
//! places are JSON Pointers, and everything off their paths is skipped as it is parsed
//! (still checked to be JSON), so the reader gets a `Value` holding just those places.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

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

/// A parsed JSON value that borrows every string without an escape from the record's
/// text, and keeps an object's members in a small vector: what a shape reads of a record
/// costs an allocation per object, not per string and per member.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Json<'a> {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Cow<'a, str>),
    Obj(Vec<(Cow<'a, str>, Json<'a>)>),
    Arr(Vec<Json<'a>>),
}

impl<'a> Json<'a> {
    /// An object's member.
    pub(crate) fn get(&self, key: &str) -> Option<&Json<'a>> {
        match self {
            Json::Obj(members) => members.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The value at a JSON Pointer given as its (unescaped) tokens.
    pub(crate) fn at(&self, tokens: &[String]) -> Option<&Json<'a>> {
        tokens.iter().try_fold(self, |v, t| match v {
            Json::Obj(_) => v.get(t),
            Json::Arr(items) => items.get(t.parse::<usize>().ok()?),
            _ => None,
        })
    }

    pub(crate) fn as_str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }

    pub(crate) fn as_bool(&self) -> Option<bool> {
        match self {
            Json::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub(crate) fn as_i64(&self) -> Option<i64> {
        match self {
            Json::Int(n) => Some(*n),
            _ => None,
        }
    }

    pub(crate) fn is_null(&self) -> bool {
        matches!(self, Json::Null)
    }
}

/// A JSON Pointer's tokens, unescaped (RFC 6901: ~1 is "/", ~0 is "~"); "" is the root.
pub(crate) fn tokens(pointer: &str) -> Vec<String> {
    pointer
        .split('/')
        .skip(1)
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect()
}

impl Paths {
    fn at(&mut self, pointer: &str) -> &mut Node {
        let mut node = &mut self.root;
        for token in tokens(pointer) {
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

    pub(crate) fn parse<'a>(&self, text: &'a str) -> Result<Json<'a>, serde_json::Error> {
        let mut d = serde_json::Deserializer::from_str(text);
        let v = Seed(Some(&self.root)).deserialize(&mut d)?;
        d.end()?;
        Ok(v)
    }
}

/// `None`: everything below is wanted.
struct Seed<'n>(Option<&'n Node>);

impl<'de> DeserializeSeed<'de> for Seed<'_> {
    type Value = Json<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Json<'de>, D::Error> {
        match self.0 {
            Some(node) if node.whole => d.deserialize_any(Sparse(None)),
            Some(node) if node.children.is_empty() => {
                IgnoredAny::deserialize(d)?;
                Ok(Json::Null)
            }
            node => d.deserialize_any(Sparse(node)),
        }
    }
}

struct Sparse<'n>(Option<&'n Node>);

impl<'de> Visitor<'de> for Sparse<'_> {
    type Value = Json<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json<'de>, A::Error> {
        // Room for what is wanted here, so a record's members cost one allocation.
        let mut out = Vec::with_capacity(self.0.map_or(4, |n| n.children.len().min(16)));
        while let Some(Key(key)) = map.next_key()? {
            let child = match self.0 {
                None => Seed(None),
                Some(node) => match node.child(&key) {
                    Some(c) if c.presence && !c.whole && c.children.is_empty() => {
                        map.next_value::<IgnoredAny>()?;
                        out.push((key, Json::Null));
                        continue;
                    }
                    Some(c) => Seed(Some(c)),
                    None => {
                        map.next_value::<IgnoredAny>()?;
                        continue;
                    }
                },
            };
            let v = map.next_value_seed(child)?;
            out.push((key, v));
        }
        Ok(Json::Obj(out))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json<'de>, A::Error> {
        let mut out = Vec::new();
        loop {
            let next = match self.0 {
                None => seq.next_element_seed(Seed(None))?,
                Some(node) => match node.child(&out.len().to_string()) {
                    Some(c) => seq.next_element_seed(Seed(Some(c)))?,
                    None => seq.next_element::<IgnoredAny>()?.map(|_| Json::Null),
                },
            };
            match next {
                Some(v) => out.push(v),
                None => return Ok(Json::Arr(out)),
            }
        }
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Json<'de>, E> {
        Ok(Json::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Json<'de>, E> {
        Ok(Json::Int(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Json<'de>, E> {
        Ok(i64::try_from(v).map_or(Json::Float(v as f64), Json::Int))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Json<'de>, E> {
        Ok(Json::Float(v))
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Json<'de>, E> {
        Ok(Json::Str(Cow::Borrowed(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Json<'de>, E> {
        Ok(Json::Str(Cow::Owned(v.to_string())))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Json<'de>, E> {
        Ok(Json::Null)
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
        let doc = r#"{"a":{"b":{"deep":[1,"x\"y"]},"c":"x"},"list":[{"id":"0"},{"id":"1","n":2}],
            "we/ird":true,"schema":{"huge":[1,2,3]},"skip":{"x":[{"y":"z"}]}}"#;
        let v = p.parse(doc).expect("parses");
        let s = |t: &'static str| Cow::Borrowed(t);
        assert_eq!(
            v,
            Json::Obj(vec![
                (
                    s("a"),
                    Json::Obj(vec![(
                        s("b"),
                        Json::Obj(vec![(
                            s("deep"),
                            Json::Arr(vec![Json::Int(1), Json::Str(Cow::Owned("x\"y".into()))])
                        )])
                    )])
                ),
                (
                    s("list"),
                    Json::Arr(vec![
                        Json::Null,
                        Json::Obj(vec![(s("id"), Json::Str(s("1")))])
                    ])
                ),
                (s("we/ird"), Json::Bool(true)),
                (s("schema"), Json::Null),
            ])
        );
        assert_eq!(
            v.at(&tokens("/list/1/id")).and_then(Json::as_str),
            Some("1")
        );
        assert_eq!(
            v.at(&tokens("/we~1ird")).and_then(Json::as_bool),
            Some(true)
        );
        assert!(
            p.parse(r#"{"skip":{"x":[}}"#).is_err(),
            "skipped parts are still JSON"
        );
        assert!(p.parse(r#"{"a":1} x"#).is_err(), "trailing bytes");
    }
}
