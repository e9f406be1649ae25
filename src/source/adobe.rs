//! Adobe Real-Time CDP streaming destination: one profile per record, its audiences in
//! `segmentMembership.ups.<audience id>` = `{status, lastQualificationTime}`.

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
    let Some(ups) = membership.get("ups") else {
        return Ok(Found::default());
    };
    let Json::Obj(audiences) = ups else {
        return Err(field_error(SHAPE, "segmentMembership.ups is not an object"));
    };
    let (external_id, email) = settings.identity(doc);
    if external_id.is_none() && email.is_none() && !audiences.is_empty() {
        return Err(settings.no_identity(SHAPE));
    }
    let identity = external_id.as_deref().or(email.as_deref()).unwrap_or("");
    let mut found = Found::default();
    for (audience, entry) in audiences {
        let field = |name: &str| format!("segmentMembership.ups.{audience}.{name}");
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
