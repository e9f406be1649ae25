//! Lytics audience export: `{"data": {"user_id", "email", "segment_events": [{"event":
//! "enter" | "exit", "slug", "enter", "exit"}]}, "meta": {...}}`.

use super::sparse::Json;

use crate::config::Shape;
use crate::event::Change;

use super::common::{hashed_id, millis, Draft, Settings};
use super::{field_error, Found, SourceError};

const SHAPE: Shape = Shape::Lytics;

/// Lytics writes an exit time in 2099 for a member who has not left: any exit from this
/// instant on (2099-01-01T00:00:00Z) means "still a member".
const STILL_MEMBER_FROM_MS: i64 = 4_070_908_800_000;

pub(crate) fn read(settings: &Settings, doc: &Json<'_>) -> Result<Found, SourceError> {
    let Some(data) = doc.get("data") else {
        return Ok(Found::default());
    };
    let Some(events) = data.get("segment_events") else {
        return Ok(Found::default());
    };
    let Json::Arr(events) = events else {
        return Err(field_error(SHAPE, "data.segment_events is not an array"));
    };
    let (external_id, email) = settings.identity(doc);
    if external_id.is_none() && email.is_none() && !events.is_empty() {
        return Err(settings.no_identity(SHAPE));
    }
    let identity = external_id.as_deref().or(email.as_deref()).unwrap_or("");
    let fallback_time = doc
        .get("meta")
        .and_then(|m| m.get("timestamp"))
        .and_then(millis);
    let mut found = Found::default();
    for (i, e) in events.iter().enumerate() {
        let field = |name: &str| format!("data.segment_events[{i}].{name}");
        let slug = e
            .get("slug")
            .and_then(Json::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| field_error(SHAPE, format!("{} is missing or empty", field("slug"))))?;
        let enter = e.get("enter").and_then(millis);
        let exit = e.get("exit").and_then(millis);
        let still_member = exit.is_some_and(|t| t >= STILL_MEMBER_FROM_MS);
        let event = match e.get("event") {
            None | Some(Json::Null) => None,
            Some(v) => Some(v.as_str().ok_or_else(|| {
                field_error(SHAPE, format!("{} is not a string", field("event")))
            })?),
        };
        let (change, at) = match event {
            Some("enter") => (Change::Entered, enter),
            Some("exit") if still_member => (Change::Entered, enter),
            Some("exit") => (Change::Exited, exit),
            // No event: the times alone say whether the user is in; a user who came back
            // after leaving has an exit before the latest enter.
            None if exit.is_some() && !still_member && (enter.is_none() || exit >= enter) => {
                (Change::Exited, exit)
            }
            None if enter.is_some() => (Change::Entered, enter),
            None => {
                return Err(field_error(
                    SHAPE,
                    format!("{} is missing and so are enter and exit", field("event")),
                ))
            }
            Some(other) => {
                return Err(field_error(
                    SHAPE,
                    format!(
                        "{} = {other:?} is neither \"enter\" nor \"exit\"",
                        field("event")
                    ),
                ))
            }
        };
        let occurred_at = at.or(fallback_time).ok_or_else(|| {
            field_error(
                SHAPE,
                format!(
                    "{} has no time: neither its {} nor meta.timestamp is a time",
                    field("event"),
                    if change == Change::Entered {
                        "enter"
                    } else {
                        "exit"
                    }
                ),
            )
        })?;
        let Some(segment_id) = settings.segment_for(slug) else {
            found.unmapped += 1;
            continue;
        };
        found.events.push(
            Draft {
                event_id: hashed_id(SHAPE, &[identity, slug, change.symbol()], &[occurred_at]),
                external_id: &external_id,
                email: &email,
                segment_id,
                segment_name: None,
                change,
                occurred_at,
                sequence: None,
            }
            .into_event(),
        );
    }
    Ok(found)
}
