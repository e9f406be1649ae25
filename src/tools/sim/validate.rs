//! Pure: Braze's per-object checks of an attributes object. A failure becomes one entry of the
//! answer's `errors` (a non-fatal error: the rest of the request is still applied).
//!
//! Identifiers: `external_id`, `braze_id` or `user_alias` name the user; with one of those
//! present, `email` and `phone` are ordinary attributes (as in Braze). Without them, exactly one
//! of `email` or `phone` names the user.

use serde_json::{Map, Value};

use super::profile::{update_of, UPDATE_EXISTING_ONLY};

/// Braze's limit on custom attribute keys.
pub const MAX_NAME_CHARS: usize = 255;

const PRIMARY: [&str; 3] = ["external_id", "braze_id", "user_alias"];
const SECONDARY: [&str; 2] = ["email", "phone"];

/// The user an object is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The profile key: `external_id:<id>`, `email:<address>`, `user_alias:<label>:<name>`, ...
    pub key: String,
    /// The field that named the user: not an attribute of the update.
    pub id_field: &'static str,
    pub update_existing_only: bool,
}

/// Checks one element of `attributes`; `Err` is the error `type` Braze would list.
pub fn validate(element: &Value) -> Result<Target, String> {
    let Value::Object(object) = element else {
        return Err("attributes object must be a JSON object".into());
    };
    let present = |fields: &[&'static str]| -> Vec<&'static str> {
        fields
            .iter()
            .copied()
            .filter(|f| object.get(*f).is_some_and(|v| !v.is_null()))
            .collect()
    };
    let primary = present(&PRIMARY);
    let named_by = match primary.as_slice() {
        [one] => *one,
        [] => match present(&SECONDARY).as_slice() {
            [one] => *one,
            [] => {
                return Err(
                    "'external_id', 'braze_id', 'user_alias', 'email' or 'phone' is required"
                        .into(),
                )
            }
            _ => return Err("only one of 'email' or 'phone' may identify the user".into()),
        },
        _ => {
            return Err(
                "only one of 'external_id', 'braze_id' or 'user_alias' may identify the user"
                    .into(),
            )
        }
    };
    let key = identity(named_by, &object[named_by])?;
    let update_existing_only = match object.get(UPDATE_EXISTING_ONLY) {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(format!("'{UPDATE_EXISTING_ONLY}' must be a boolean")),
    };
    check_attributes(object, named_by)?;
    Ok(Target {
        key,
        id_field: named_by,
        update_existing_only,
    })
}

fn identity(field: &'static str, value: &Value) -> Result<String, String> {
    if field == "user_alias" {
        let alias = value.as_object();
        let part = |k: &str| {
            alias
                .and_then(|a| a.get(k))
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
        };
        return match (part("alias_label"), part("alias_name")) {
            (Some(label), Some(name)) => Ok(format!("user_alias:{label}:{name}")),
            _ => Err("'user_alias' needs a non-empty 'alias_name' and 'alias_label'".into()),
        };
    }
    match value.as_str() {
        Some(id) if !id.is_empty() => Ok(format!("{field}:{id}")),
        _ => Err(format!("'{field}' must be a non-empty string")),
    }
}

fn check_attributes(object: &Map<String, Value>, id_field: &str) -> Result<(), String> {
    for (name, value) in object {
        if name == id_field || name == UPDATE_EXISTING_ONLY {
            continue;
        }
        if let Some(why) = attribute_name_error(name) {
            return Err(why);
        }
        update_of(value).map_err(|e| format!("'{name}': {e}"))?;
    }
    Ok(())
}

/// Braze's custom attribute key rules: not empty, not starting with `$` (reserved for Braze's
/// own), at most 255 characters.
pub fn attribute_name_error(name: &str) -> Option<String> {
    let shown = || name.chars().take(40).collect::<String>();
    if name.trim().is_empty() {
        Some("custom attribute name must not be empty".into())
    } else if name.starts_with('$') {
        Some(format!(
            "'{}' is not a valid custom attribute name: '$' is reserved",
            shown()
        ))
    } else if name.chars().count() > MAX_NAME_CHARS {
        Some(format!(
            "'{}...' is not a valid custom attribute name: longer than {MAX_NAME_CHARS} characters",
            shown()
        ))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key(v: Value) -> Result<String, String> {
        validate(&v).map(|t| t.key)
    }

    #[test]
    fn each_identifier_names_a_profile() {
        assert_eq!(
            key(json!({"external_id": "u1", "s": true})),
            Ok("external_id:u1".into())
        );
        assert_eq!(key(json!({"email": "a@b.c"})), Ok("email:a@b.c".into()));
        assert_eq!(key(json!({"braze_id": "b1"})), Ok("braze_id:b1".into()));
        assert_eq!(
            key(json!({"phone": "+4712345678"})),
            Ok("phone:+4712345678".into())
        );
        assert_eq!(
            key(json!({"user_alias": {"alias_name": "n", "alias_label": "l"}})),
            Ok("user_alias:l:n".into())
        );
    }

    #[test]
    fn email_beside_external_id_is_an_attribute() {
        let t = validate(&json!({"external_id": "u1", "email": "a@b.c"})).unwrap();
        assert_eq!(t.key, "external_id:u1");
        assert_eq!(t.id_field, "external_id");
    }

    #[test]
    fn no_identifier_or_two_identifiers_are_errors() {
        assert!(key(json!({"s": true})).unwrap_err().contains("is required"));
        assert!(key(json!({"external_id": null, "s": true})).is_err());
        assert!(key(json!({"external_id": "u", "braze_id": "b"}))
            .unwrap_err()
            .contains("only one"));
        assert!(key(json!({"email": "a@b.c", "phone": "+1"})).is_err());
        assert!(key(json!({"external_id": 42})).is_err());
        assert!(key(json!({"external_id": ""})).is_err());
        assert!(key(json!({"user_alias": {"alias_name": "n"}})).is_err());
    }

    #[test]
    fn non_objects_are_errors() {
        for v in [json!("u1"), json!(null), json!([1]), json!(3)] {
            assert!(validate(&v).is_err(), "{v}");
        }
    }

    #[test]
    fn invalid_attribute_names_are_errors() {
        let long = "a".repeat(256);
        for name in ["", " ", "$seg", long.as_str()] {
            let mut o = Map::new();
            o.insert("external_id".into(), json!("u1"));
            o.insert(name.into(), json!(true));
            assert!(validate(&Value::Object(o)).is_err(), "{name:?}");
        }
        assert_eq!(attribute_name_error(&"a".repeat(255)), None);
        assert_eq!(attribute_name_error("seg$1"), None);
    }

    #[test]
    fn update_existing_only_is_read_and_must_be_boolean() {
        assert!(
            validate(&json!({"external_id": "u", "_update_existing_only": true}))
                .unwrap()
                .update_existing_only
        );
        assert!(
            !validate(&json!({"external_id": "u"}))
                .unwrap()
                .update_existing_only
        );
        assert!(validate(&json!({"external_id": "u", "_update_existing_only": "yes"})).is_err());
    }

    #[test]
    fn malformed_array_edits_are_errors() {
        assert!(validate(&json!({"external_id": "u", "segs": {"add": "a"}})).is_err());
        assert!(validate(&json!({"external_id": "u", "segs": {"add": ["a"]}})).is_ok());
    }
}
