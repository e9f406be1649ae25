//! Debezium change events of a membership table (a row per user and segment): the envelope
//! with or without its `schema`/`payload` wrapper, or the flattened form of the
//! `ExtractNewRecordState` transform (`__deleted`, `__op`, `__lsn`, `__source_ts_ms`).

use super::sparse::Json;

use crate::config::Shape;
use crate::event::Change;

use std::borrow::Cow;

use crate::event::Event;

use super::common::{hashed_id, millis, scalar_text, Settings};
use super::{field_error, Found, SourceError};

const SHAPE: Shape = Shape::Debezium;

/// `None`: a tombstone (the wrapper's null payload after a delete).
pub(crate) fn read(settings: &Settings, doc: &Json<'_>) -> Result<Option<Found>, SourceError> {
    let doc = match (doc.get("schema"), doc.get("payload")) {
        (Some(_), Some(payload)) => payload,
        _ => doc,
    };
    let event @ Json::Obj(_) = doc else {
        if doc.is_null() {
            return Ok(None);
        }
        return Err(field_error(SHAPE, "the record is not a JSON object"));
    };
    let row = match event.get("op") {
        Some(op) => envelope(settings, event, op)?,
        None => flattened(settings, event)?,
    };
    let Some(row) = row else {
        return Ok(Some(Found::default()));
    };
    let mut found = Found::default();
    // An update that moved the row to another user or segment (a table keyed by a
    // surrogate id) leaves the pair it had: read first, both share the record's position.
    if let Some(left) = left_pair(settings, event, &row) {
        add(settings, &left, &mut found)?;
    }
    add(settings, &row, &mut found)?;
    Ok(Some(found))
}

/// One row's change into `found` (or counted as unmapped).
fn add(settings: &Settings, row: &Row<'_, '_>, found: &mut Found) -> Result<(), SourceError> {
    let column = |name: &str| {
        row.row
            .get(name)
            .and_then(scalar_text)
            .filter(|s| !s.is_empty())
    };
    let external_id = column(&settings.user_column);
    let email = settings.email_column.as_deref().and_then(column);
    if external_id.is_none() && email.is_none() {
        return Err(field_error(
            SHAPE,
            format!(
                "no identity: column {:?} (source.user_column){} is missing or empty in {}",
                settings.user_column,
                settings
                    .email_column
                    .as_deref()
                    .map(|c| format!(" and column {c:?} (source.email_column)"))
                    .unwrap_or_default(),
                row.name
            ),
        ));
    }
    let audience = column(&settings.segment_column).ok_or_else(|| {
        field_error(
            SHAPE,
            format!(
                "column {:?} (source.segment_column) is missing or empty in {}",
                settings.segment_column, row.name
            ),
        )
    })?;
    let Some(segment_id) = settings.segment_for(&audience) else {
        found.unmapped += 1;
        return Ok(());
    };
    let event_id = hashed_id(
        SHAPE,
        &[
            external_id.as_deref().or(email.as_deref()).unwrap_or(""),
            &audience,
            row.change.symbol(),
        ],
        &[row.occurred_at, row.sequence.unwrap_or(i64::MIN)],
    );
    // Its strings are moved into the event, not copied again.
    let segment_id = if segment_id == audience {
        audience
    } else {
        segment_id.to_string()
    };
    found.events.push(Event {
        event_id: event_id.into(),
        external_id: external_id.map(Cow::Owned),
        email: email.map(Cow::Owned),
        segment_id: Cow::Owned(segment_id),
        segment_name: None,
        change: row.change,
        occurred_at: row.occurred_at,
        sequence: row.sequence,
        attributes: Vec::new(),
    });
    Ok(())
}

/// For an envelope's update whose `before` names another user or segment than `after`
/// (and was a member, when `source.member_column` says): that pair, exited. `before`
/// without those columns (PostgreSQL's default replica identity) tells nothing.
fn left_pair<'v, 'a>(
    settings: &Settings,
    event: &'v Json<'a>,
    row: &Row<'v, 'a>,
) -> Option<Row<'v, 'a>> {
    if row.op != Some("u") {
        return None;
    }
    let before @ Json::Obj(_) = event.get("before")? else {
        return None;
    };
    let key = |r: &Json<'_>, column: &str| {
        r.get(column)
            .and_then(scalar_text)
            .filter(|s| !s.is_empty())
    };
    // Who, as `add` finds them: the user column, else the email column.
    let who = |r: &Json<'_>| {
        key(r, &settings.user_column)
            .or_else(|| settings.email_column.as_deref().and_then(|c| key(r, c)))
    };
    let pair = |r: &Json<'_>| Some((who(r)?, key(r, &settings.segment_column)?));
    let old = pair(before)?;
    if Some(&old) == pair(row.row).as_ref() {
        return None;
    }
    let was_member = settings
        .member_column
        .as_ref()
        .and_then(|c| before.get(c))
        .is_none_or(|v| {
            !matches!(v, Json::Bool(false) | Json::Int(0)) && v.as_str() != Some("false")
        });
    was_member.then_some(Row {
        row: before,
        name: "before",
        op: row.op,
        change: Change::Exited,
        occurred_at: row.occurred_at,
        sequence: row.sequence,
    })
}

/// The row a change speaks of and what it says.
struct Row<'v, 'a> {
    row: &'v Json<'a>,
    /// Where the row was, for messages.
    name: &'static str,
    /// The envelope's `op`; `None` for a flattened row.
    op: Option<&'v str>,
    change: Change,
    occurred_at: i64,
    sequence: Option<i64>,
}

fn envelope<'v, 'a>(
    settings: &Settings,
    event: &'v Json<'a>,
    op: &'v Json<'a>,
) -> Result<Option<Row<'v, 'a>>, SourceError> {
    let op = op
        .as_str()
        .ok_or_else(|| field_error(SHAPE, "op is not a string"))?;
    let (name, deleted) = match op {
        "c" | "r" | "u" => ("after", false),
        "d" => ("before", true),
        // Truncates and logical-decoding messages hold no row of the table.
        "t" | "m" => return Ok(None),
        other => {
            return Err(field_error(
                SHAPE,
                format!("op = {other:?} is none of \"c\", \"r\", \"u\", \"d\""),
            ))
        }
    };
    let Some(row @ Json::Obj(_)) = event.get(name) else {
        return Err(field_error(
            SHAPE,
            format!("op = {op:?} but {name} is not an object (for a delete, set the table's REPLICA IDENTITY so that Debezium writes the row)"),
        ));
    };
    let source = event.get("source");
    let occurred_at = source
        .and_then(commit_time)
        .or_else(|| commit_time(event))
        .ok_or_else(|| field_error(SHAPE, "source.ts_ms is missing or not a number"))?;
    // PostgreSQL's LSN orders a key's changes; other connectors' positions do not fit in
    // a sequence, and their order is source.ts_ms, then the offset.
    let sequence = source
        .and_then(|s| s.get("lsn"))
        .and_then(Json::as_i64)
        .filter(|_| {
            source
                .and_then(|s| s.get("connector"))
                .and_then(Json::as_str)
                .is_none_or(|c| c == "postgresql")
        });
    Ok(Some(Row {
        row,
        name,
        op: Some(op),
        change: change_of(settings, row, deleted, op == "u")?,
        occurred_at,
        sequence,
    }))
}

fn flattened<'v, 'a>(
    settings: &Settings,
    row: &'v Json<'a>,
) -> Result<Option<Row<'v, 'a>>, SourceError> {
    let op = row.get("__op").and_then(Json::as_str);
    if op.is_none() && row.get(&settings.user_column).is_none() {
        // Neither an envelope nor a row of the table: a heartbeat, a schema change.
        return Ok(None);
    }
    let deleted = match row.get("__deleted") {
        Some(Json::Bool(b)) => *b,
        Some(Json::Str(s)) => s == "true",
        _ => false,
    } || op == Some("d");
    let occurred_at = flattened_time(row).ok_or_else(|| {
            field_error(
                SHAPE,
                "__source_ts_ms (or __source_ts_us, __source_ts_ns) is missing or not a number (add source.ts_ms to the transform's add.fields)",
            )
        })?;
    Ok(Some(Row {
        row,
        name: "the row",
        op: None,
        // Without `__op` an insert cannot be told from an update.
        change: change_of(settings, row, deleted, op.is_none_or(|op| op == "u"))?,
        occurred_at,
        sequence: row.get("__lsn").and_then(Json::as_i64),
    }))
}

/// `ts_ms`, else Debezium 2's `ts_us` or `ts_ns` scaled to milliseconds.
fn commit_time(block: &Json<'_>) -> Option<i64> {
    block
        .get("ts_ms")
        .and_then(millis)
        .or_else(|| block.get("ts_us").and_then(Json::as_i64).map(|t| t / 1_000))
        .or_else(|| {
            block
                .get("ts_ns")
                .and_then(Json::as_i64)
                .map(|t| t / 1_000_000)
        })
}

/// The flattened form of [`commit_time`]: `__source_ts_ms` (`_us`, `_ns`), else the
/// `__ts_` ones. Keys spelt out: this runs once a record.
fn flattened_time(row: &Json<'_>) -> Option<i64> {
    const KEYS: [[&str; 3]; 2] = [
        ["__source_ts_ms", "__source_ts_us", "__source_ts_ns"],
        ["__ts_ms", "__ts_us", "__ts_ns"],
    ];
    KEYS.iter().find_map(|[ms, us, ns]| {
        row.get(ms)
            .and_then(millis)
            .or_else(|| row.get(us).and_then(Json::as_i64).map(|t| t / 1_000))
            .or_else(|| row.get(ns).and_then(Json::as_i64).map(|t| t / 1_000_000))
    })
}

/// A deleted row exits; an inserted or snapshot row enters; an updated one (`update`)
/// enters unless `source.member_column` says otherwise.
fn change_of(
    settings: &Settings,
    row: &Json<'_>,
    deleted: bool,
    update: bool,
) -> Result<Change, SourceError> {
    if deleted {
        return Ok(Change::Exited);
    }
    let Some(column) = settings.member_column.as_ref().filter(|_| update) else {
        return Ok(Change::Entered);
    };
    let member = match row.get(column) {
        Some(Json::Bool(b)) => *b,
        Some(Json::Int(0)) => false,
        Some(Json::Int(1)) => true,
        Some(Json::Str(s)) if s == "true" || s == "false" => s == "true",
        _ => {
            return Err(field_error(
                SHAPE,
                format!("column {column:?} (source.member_column) is missing or not a boolean"),
            ))
        }
    };
    Ok(if member {
        Change::Entered
    } else {
        Change::Exited
    })
}
