//! Twilio Segment Engage (Personas) audiences, as Segment's Kafka destination writes the
//! call: an `identify` whose `traits.<audience_key>` is `true` on entry and `false` on exit,
//! or a `track` `Audience Entered` / `Audience Exited` with `properties.audience_key`; both
//! with `context.personas.computation_class = "audience"`.

use super::sparse::Json;

use crate::config::Shape;
use crate::event::Change;

use super::common::{hashed_id, millis, Draft, Settings};
use super::{field_error, Found, SourceError};

const SHAPE: Shape = Shape::Segment;

pub(crate) fn read(settings: &Settings, doc: &Json<'_>) -> Result<Found, SourceError> {
    let personas = doc.get("context").and_then(|c| c.get("personas"));
    let is_audience = personas
        .and_then(|p| p.get("computation_class"))
        .and_then(Json::as_str)
        == Some("audience");
    let key = personas
        .and_then(|p| p.get("computation_key"))
        .and_then(Json::as_str)
        .filter(|k| !k.is_empty());
    // (audience key, change) of every audience the call speaks of.
    let mut changes: Vec<(&str, Change)> = Vec::new();
    match doc.get("type").and_then(Json::as_str) {
        Some("identify") if is_audience => {
            // Engage writes the audience trait in `traits`; a call relayed by a source
            // library may carry it in `context.traits` only.
            let context_traits = doc
                .get("context")
                .and_then(|c| c.get("traits"))
                .filter(|t| matches!(t, Json::Obj(_)));
            let traits = doc
                .get("traits")
                .filter(|t| matches!(t, Json::Obj(_)))
                .or(context_traits);
            let Some(traits @ Json::Obj(members)) = traits else {
                return Err(field_error(
                    SHAPE,
                    "an audience identify has no traits object (neither traits nor context.traits)",
                ));
            };
            match key {
                Some(key) => {
                    let member = traits
                        .get(key)
                        .or_else(|| context_traits.and_then(|t| t.get(key)))
                        .and_then(Json::as_bool)
                        .ok_or_else(|| {
                            field_error(
                                SHAPE,
                                format!(
                                    "traits.{key} (the computation_key) is missing or not a boolean, in traits and in context.traits"
                                ),
                            )
                        })?;
                    changes.push((key, entered(member)));
                }
                // Without the key every boolean trait is an audience: Engage writes only
                // audiences (and identifiers) in its identify calls.
                None => changes.extend(
                    members
                        .iter()
                        .filter_map(|(k, v)| Some((k.as_ref(), entered(v.as_bool()?)))),
                ),
            }
            if changes.is_empty() {
                return Err(field_error(SHAPE, "an audience identify has no boolean trait and no context.personas.computation_key"));
            }
        }
        Some("track") => {
            let change = match doc.get("event").and_then(Json::as_str) {
                Some("Audience Entered") => Change::Entered,
                Some("Audience Exited") => Change::Exited,
                _ => return Ok(Found::default()),
            };
            let audience = doc
                .get("properties")
                .and_then(|p| p.get("audience_key"))
                .and_then(Json::as_str)
                .filter(|k| !k.is_empty())
                .or(key)
                .ok_or_else(|| {
                    field_error(SHAPE, "properties.audience_key is missing or empty (and so is context.personas.computation_key)")
                })?;
            changes.push((audience, change));
        }
        // page, screen, group, alias, ordinary identify calls: not audience changes.
        _ => return Ok(Found::default()),
    }
    let (external_id, email) = settings.identity(doc);
    if external_id.is_none() && email.is_none() {
        return Err(settings.no_identity(SHAPE));
    }
    let occurred_at = ["timestamp", "originalTimestamp", "receivedAt", "sentAt"]
        .iter()
        .find_map(|k| doc.get(k).and_then(millis))
        .ok_or_else(|| field_error(SHAPE, "timestamp is missing or not an RFC 3339 time"))?;
    let message_id = doc
        .get("messageId")
        .and_then(Json::as_str)
        .filter(|m| !m.is_empty());
    let identity = external_id.as_deref().or(email.as_deref()).unwrap_or("");
    let mut found = Found::default();
    for (audience, change) in changes {
        let Some(segment_id) = settings.segment_for(audience) else {
            found.unmapped += 1;
            continue;
        };
        let event_id = match message_id {
            Some(m) => format!("{m}:{audience}"),
            None => hashed_id(
                SHAPE,
                &[identity, audience, change.symbol()],
                &[occurred_at],
            ),
        };
        found.events.push(
            Draft {
                event_id,
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

fn entered(member: bool) -> Change {
    if member {
        Change::Entered
    } else {
        Change::Exited
    }
}
