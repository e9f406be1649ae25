//! Pure: how one attributes object changes a stored profile, the way Braze applies it:
//! a value sets the attribute, `null` removes it, `{"add": [...], "remove": [...]}` edits an
//! array attribute as a set.

use serde_json::{Map, Value};

/// The request-only key that is never stored.
pub const UPDATE_EXISTING_ONLY: &str = "_update_existing_only";

/// What one attribute value asks for.
#[derive(Debug, PartialEq)]
pub enum Update<'a> {
    Remove,
    Set(&'a Value),
    Array {
        add: &'a [Value],
        remove: &'a [Value],
    },
}

/// Reads one attribute value. An object whose keys are only `add`/`remove` is an array edit,
/// and then both must be arrays; any other object is a nested attribute, stored as it is.
pub fn update_of(value: &Value) -> Result<Update<'_>, String> {
    let Value::Object(map) = value else {
        return Ok(if value.is_null() {
            Update::Remove
        } else {
            Update::Set(value)
        });
    };
    let is_edit = !map.is_empty() && map.keys().all(|k| k == "add" || k == "remove");
    if !is_edit {
        return Ok(Update::Set(value));
    }
    let list = |k: &str| match map.get(k) {
        None => Ok(&[][..]),
        Some(Value::Array(items)) => Ok(items.as_slice()),
        Some(_) => Err(format!("'{k}' of an array attribute must be an array")),
    };
    Ok(Update::Array {
        add: list("add")?,
        remove: list("remove")?,
    })
}

/// Applies `object` to `profile`, skipping the identifier field `id_field`; returns the data
/// points written (every attribute key, as Braze bills them, even when nothing changes).
/// The object is assumed validated: a malformed array edit is skipped.
pub fn apply(profile: &mut Map<String, Value>, object: &Map<String, Value>, id_field: &str) -> u64 {
    let mut written = 0;
    for (name, value) in object {
        if name == id_field || name == UPDATE_EXISTING_ONLY {
            continue;
        }
        let Ok(update) = update_of(value) else {
            continue;
        };
        written += 1;
        match update {
            Update::Remove => {
                profile.remove(name);
            }
            Update::Set(v) => {
                profile.insert(name.clone(), v.clone());
            }
            Update::Array { add, remove } => {
                let mut items = match profile.remove(name) {
                    Some(Value::Array(items)) => items,
                    _ => Vec::new(),
                };
                for v in add {
                    if !items.contains(v) {
                        items.push(v.clone());
                    }
                }
                items.retain(|v| !remove.contains(v));
                profile.insert(name.clone(), Value::Array(items));
            }
        }
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn values_are_set_and_null_removes() {
        let mut p = obj(json!({"seg_a": true, "seg_b": true}));
        let n = apply(
            &mut p,
            &obj(json!({"external_id": "u1", "seg_a": false, "seg_b": null, "city": "Oslo"})),
            "external_id",
        );
        assert_eq!(n, 3);
        assert_eq!(Value::Object(p), json!({"seg_a": false, "city": "Oslo"}));
    }

    #[test]
    fn array_edits_behave_like_a_set() {
        let mut p = obj(json!({"cdp_segments": ["a", "b"]}));
        apply(
            &mut p,
            &obj(
                json!({"email": "x@y.z", "cdp_segments": {"add": ["b", "c", "c"], "remove": ["a"]}}),
            ),
            "email",
        );
        assert_eq!(
            Value::Object(p.clone()),
            json!({"cdp_segments": ["b", "c"]})
        );
        // Removing from a missing attribute leaves an empty array, adding creates it.
        apply(
            &mut p,
            &obj(json!({"email": "x@y.z", "other": {"remove": ["z"]}, "more": {"add": [1]}})),
            "email",
        );
        assert_eq!(p["other"], json!([]));
        assert_eq!(p["more"], json!([1]));
    }

    #[test]
    fn the_flag_and_the_identifier_are_not_stored_nor_billed() {
        let mut p = Map::new();
        let n = apply(
            &mut p,
            &obj(json!({"external_id": "u1", "_update_existing_only": false, "s": true})),
            "external_id",
        );
        assert_eq!(n, 1);
        assert_eq!(Value::Object(p), json!({"s": true}));
    }

    #[test]
    fn nested_objects_are_values_not_edits() {
        let v = json!({"add": [1], "city": "x"});
        assert_eq!(update_of(&v), Ok(Update::Set(&v)));
        assert!(update_of(&json!({"add": "x"})).is_err());
        assert_eq!(update_of(&json!({})), Ok(Update::Set(&json!({}))));
    }
}
