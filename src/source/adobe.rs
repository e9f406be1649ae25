//! Adobe Real-Time CDP streaming destination: one profile per record, its audiences in
//! `segmentMembership.<namespace>.<audience id>` = `{status, lastQualificationTime}`
//! (namespace `ups` for Segmentation Service audiences).

use super::sparse::Json;

use crate::config::Shape;
use crate::event::Change;

use super::common::{hashed_id, millis, Draft, Settings};
use super::{field_error, Found, SourceError};

const SHAPE: Shape = Shape::AdobeRtcdp;

pub(crate) fn read(settings: &Settings, doc: &Json<'_>) -> Result<Found, SourceError> {
    let Some(membership) = doc.get("segmentMembership") else {
        // A profile update without audiences, or not a profile at all.
        return Ok(Found::default());
    };
    let namespaces = match membership {
        Json::Obj(namespaces) => namespaces,
        Json::Null => return Ok(Found::default()),
        _ => return Err(field_error(SHAPE, "segmentMembership is not an object")),
    };
    // `ups` holds the audiences Segmentation Service evaluates; audiences of other origins
    // (custom upload, Audience Manager) sit under their own namespace beside it. An
    // audience id is unique across namespaces, so the namespace is not part of the id.
    let mut audiences = Vec::new();
    for (namespace, entries) in namespaces {
        let Json::Obj(entries) = entries else {
            return Err(field_error(
                SHAPE,
                format!("segmentMembership.{namespace} is not an object"),
            ));
        };
        audiences.extend(entries.iter().map(|(id, entry)| (namespace, id, entry)));
    }
    let (external_id, email) = settings.identity(doc);
    if external_id.is_none() && email.is_none() && !audiences.is_empty() {
        return Err(settings.no_identity(SHAPE));
    }
    let identity = external_id.as_deref().or(email.as_deref()).unwrap_or("");
    let mut found = Found::default();
    for (namespace, audience, entry) in audiences {
        let field = |name: &str| format!("segmentMembership.{namespace}.{audience}.{name}");
        let status = entry.get("status").and_then(Json::as_str).ok_or_else(|| {
            field_error(
                SHAPE,
                format!("{} is missing or not a string", field("status")),
            )
        })?;
        // `existing` re-states a membership the destination was activated with.
        let change = match status {
            "realized" | "existing" => Change::Entered,
            "exited" => Change::Exited,
            other => {
                return Err(field_error(
                    SHAPE,
                    format!(
                        "{} = {other:?} is none of \"realized\", \"existing\", \"exited\"",
                        field("status")
                    ),
                ))
            }
        };
        let time = entry.get("lastQualificationTime");
        let occurred_at = time.and_then(millis).ok_or_else(|| {
            field_error(
                SHAPE,
                format!(
                    "{} is missing or not an RFC 3339 time",
                    field("lastQualificationTime")
                ),
            )
        })?;
        let Some(segment_id) = settings.segment_for(audience) else {
            found.unmapped += 1;
            continue;
        };
        found.events.push(
            Draft {
                event_id: hashed_id(SHAPE, &[identity, audience, status], &[occurred_at]),
                external_id: &external_id,
                email: &email,
                segment_id,
                segment_name: entry.get("name").and_then(Json::as_str),
                change,
                occurred_at,
                sequence: None,
            }
            .into_event(),
        );
    }
    Ok(found)
}
