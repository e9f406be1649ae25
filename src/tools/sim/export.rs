//! Pure: `POST /users/export/ids` as Braze documents it: up to 50 `external_ids`,
//! `fields_to_export` required, an answer with one object per user found (only the fields
//! asked for, and none that would be empty), the others listed in `invalid_user_ids`.

use serde_json::{json, Map, Value};

/// Braze's limit of `external_ids` in one export request.
pub const MAX_EXPORT_IDS: usize = 50;

/// Braze's default limit for the endpoint: 250 requests a minute.
pub const EXPORT_RATE_LIMIT: u32 = 250;
pub const EXPORT_RATE_WINDOW_SECS: u64 = 60;

/// The fields Braze documents for `fields_to_export`.
const FIELDS: &[&str] = &[
    "apps",
    "attributed_campaign",
    "attributed_source",
    "attributed_adgroup",
    "attributed_ad",
    "braze_id",
    "campaigns_received",
    "canvases_received",
    "cards_clicked",
    "country",
    "created_at",
    "custom_attributes",
    "custom_events",
    "devices",
    "dob",
    "email",
    "email_subscribe",
    "external_id",
    "first_name",
    "gender",
    "home_city",
    "language",
    "last_coordinates",
    "last_name",
    "phone",
    "purchases",
    "push_subscribe",
    "push_tokens",
    "random_bucket",
    "time_zone",
    "total_revenue",
    "uninstalled_at",
    "user_aliases",
];

/// Profile fields Braze keeps as standard attributes, not custom ones: `/users/track` sets
/// them like any attribute, the export lists them apart from `custom_attributes`.
const STANDARD: &[&str] = &[
    "country",
    "dob",
    "email",
    "email_subscribe",
    "first_name",
    "gender",
    "home_city",
    "language",
    "last_name",
    "phone",
    "push_subscribe",
    "time_zone",
];

/// Identifier fields Braze also accepts; the simulator answers them as unsupported.
const OTHER_IDENTIFIERS: &[&str] = &[
    "user_aliases",
    "device_id",
    "braze_id",
    "email_address",
    "phone",
];

/// A request the simulator will answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportRequest {
    pub external_ids: Vec<String>,
    pub fields: Vec<String>,
}

/// Reads a request body; `Err` is the message of a 400.
pub fn parse_request(body: &[u8]) -> Result<ExportRequest, String> {
    let Ok(Value::Object(request)) = serde_json::from_slice::<Value>(body) else {
        return Err("Invalid JSON in request body".into());
    };
    let strings = |key: &str| -> Result<Option<Vec<String>>, String> {
        match request.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .map(Some)
                .ok_or_else(|| format!("'{key}' must be an array of strings")),
            Some(_) => Err(format!("'{key}' must be an array of strings")),
        }
    };
    let fields = strings("fields_to_export")?
        .filter(|f| !f.is_empty())
        .ok_or("'fields_to_export' is required: list the fields to export")?;
    let unknown: Vec<&str> = fields
        .iter()
        .map(String::as_str)
        .filter(|f| !FIELDS.contains(f))
        .collect();
    if !unknown.is_empty() {
        return Err(format!(
            "'fields_to_export' has fields that do not exist: {}",
            unknown.join(", ")
        ));
    }
    if let Some(other) = OTHER_IDENTIFIERS
        .iter()
        .find(|k| request.get(**k).is_some_and(|v| !v.is_null()))
    {
        return Err(format!(
            "'{other}': the simulator exports by 'external_ids' only"
        ));
    }
    let external_ids = strings("external_ids")?.unwrap_or_default();
    if external_ids.is_empty() {
        return Err("no user identifier: give 'external_ids'".into());
    }
    if external_ids.len() > MAX_EXPORT_IDS {
        return Err(format!(
            "Too many external_ids: {} (at most {MAX_EXPORT_IDS} per request)",
            external_ids.len()
        ));
    }
    Ok(ExportRequest {
        external_ids,
        fields,
    })
}

/// The exported object of one user: the fields asked for that the profile has. Braze leaves
/// out what would be null, false or empty.
pub fn user_object(external_id: &str, profile: &Map<String, Value>, fields: &[String]) -> Value {
    let mut out = Map::new();
    for field in fields {
        match field.as_str() {
            "external_id" => {
                out.insert(field.clone(), json!(external_id));
            }
            "custom_attributes" => {
                let custom: Map<String, Value> = profile
                    .iter()
                    .filter(|(k, _)| !STANDARD.contains(&k.as_str()))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                if !custom.is_empty() {
                    out.insert(field.clone(), Value::Object(custom));
                }
            }
            standard => {
                if let Some(v) = profile.get(standard).filter(|v| !v.is_null()) {
                    out.insert(field.clone(), v.clone());
                }
            }
        }
    }
    Value::Object(out)
}

/// The answer: the users found, in the order asked, and the identifiers not found.
pub fn answer(users: Vec<Value>, not_found: Vec<String>) -> Value {
    let mut body = json!({ "message": "success", "users": users });
    if !not_found.is_empty() {
        body["invalid_user_ids"] = json!(not_found);
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<ExportRequest, String> {
        parse_request(&serde_json::to_vec(&v).unwrap())
    }

    #[test]
    fn fields_to_export_is_required_and_checked() {
        assert!(parse(json!({"external_ids": ["a"]}))
            .unwrap_err()
            .contains("fields_to_export"));
        assert!(parse(json!({"external_ids": ["a"], "fields_to_export": []})).is_err());
        let e = parse(
            json!({"external_ids": ["a"], "fields_to_export": ["custom_attributes", "shoe_size"]}),
        )
        .unwrap_err();
        assert!(e.contains("shoe_size"), "{e}");
        let ok = parse(json!({"external_ids": ["a", "b"], "fields_to_export": ["external_id"]}))
            .unwrap();
        assert_eq!(ok.external_ids, vec!["a", "b"]);
    }

    #[test]
    fn at_most_fifty_external_ids_and_at_least_one() {
        let ids: Vec<String> = (0..51).map(|i| format!("u{i}")).collect();
        let e =
            parse(json!({"external_ids": ids, "fields_to_export": ["external_id"]})).unwrap_err();
        assert!(e.contains("at most 50"), "{e}");
        assert!(
            parse(json!({"external_ids": ids[..50], "fields_to_export": ["external_id"]})).is_ok()
        );
        assert!(parse(json!({"fields_to_export": ["external_id"]})).is_err());
        assert!(parse(json!({"external_ids": [1], "fields_to_export": ["external_id"]})).is_err());
        assert!(parse(json!({"email_address": "a@b.c", "external_ids": ["a"], "fields_to_export": ["external_id"]})).is_err());
    }

    #[test]
    fn a_user_object_has_the_fields_asked_for_and_nothing_empty() {
        let profile = json!({"cdp_a": true, "email": "a@b.c", "tier": "gold"});
        let profile = profile.as_object().unwrap();
        let fields = |f: &[&str]| f.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            user_object(
                "u1",
                profile,
                &fields(&["external_id", "custom_attributes"])
            ),
            json!({"external_id": "u1", "custom_attributes": {"cdp_a": true, "tier": "gold"}})
        );
        assert_eq!(
            user_object("u1", profile, &fields(&["email", "first_name"])),
            json!({"email": "a@b.c"})
        );
        assert_eq!(
            user_object(
                "u1",
                &Map::new(),
                &fields(&["external_id", "custom_attributes"])
            ),
            json!({"external_id": "u1"})
        );
    }

    #[test]
    fn the_answer_lists_users_not_found_apart() {
        assert_eq!(
            answer(vec![json!({"external_id": "a"})], vec!["b".into()]),
            json!({"message": "success", "users": [{"external_id": "a"}], "invalid_user_ids": ["b"]})
        );
        assert_eq!(
            answer(vec![], vec![]),
            json!({"message": "success", "users": []})
        );
    }
}
