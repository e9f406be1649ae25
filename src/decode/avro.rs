//! Avro binary body → `Event`, through a decode plan compiled once per writer schema.
//!
//! Going through `apache_avro::Value` would allocate a tree per event; instead the writer
//! schema is resolved against ours (Avro's schema-resolution rules) once, into a list of
//! steps — read this writer field into that `Event` field with a converter, or skip it —
//! and the body is then decoded directly, borrowing strings from the payload.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::OnceLock;

use apache_avro::schema::{Name, ResolvedSchema};
use apache_avro::Schema;

use crate::event::{AttrValue, Change, Event};

/// Why a body could not be decoded with its plan: always a fault of the record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AvroError {
    #[error("body ends early")]
    Truncated,
    #[error("malformed variable-length integer")]
    BadVarint,
    #[error("int value {0} out of range")]
    IntOutOfRange(i64),
    #[error("negative length {0}")]
    NegativeLength(i64),
    #[error("string is not UTF-8")]
    BadUtf8,
    #[error("boolean byte {0} is neither 0 nor 1")]
    BadBoolean(u8),
    #[error("union branch {0} does not exist")]
    BadUnionBranch(i64),
    #[error("enum index {0} does not exist")]
    BadEnumIndex(i64),
    #[error("unknown MembershipChange symbol {0:?}")]
    UnknownSymbol(String),
    #[error("nesting deeper than {MAX_DEPTH}")]
    TooDeep,
    /// A writer union branch that has no counterpart in our schema was taken.
    #[error("{0}")]
    Unresolvable(String),
}

const MAX_DEPTH: u32 = 64;

/// The `Event` field a writer field lands in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    EventId,
    ExternalId,
    Email,
    SegmentId,
    SegmentName,
    Change,
    OccurredAt,
    Sequence,
    Attributes,
}

/// The reader's type of a field, as far as resolution needs to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReaderType {
    Str,
    OptStr,
    Change,
    Long,
    OptLong,
    OptAttributes,
    /// `["null","string","long","double","boolean"]`, the attribute values.
    AttrValue,
}

struct ReaderField {
    name: String,
    aliases: Vec<String>,
    field: Field,
    ty: ReaderType,
    has_default: bool,
}

struct ReaderSchema {
    record_names: Vec<String>,
    enum_names: Vec<String>,
    fields: Vec<ReaderField>,
}

/// Our schema's fields, from the `.avsc` itself so that aliases or defaults added there
/// take effect; the mapping to `Event` fields is fixed by the `Event` type.
fn reader_schema() -> Result<&'static ReaderSchema, String> {
    static READER: OnceLock<Result<ReaderSchema, String>> = OnceLock::new();
    READER
        .get_or_init(|| {
            let schema = Schema::parse_str(super::SCHEMA).map_err(|e| e.to_string())?;
            let Schema::Record(record) = &schema else {
                return Err("the reader schema is not a record".into());
            };
            let mut record_names = vec![record.name.name.clone()];
            record_names.extend(record.aliases.iter().flatten().map(|a| a.name()));
            let mut enum_names = vec!["MembershipChange".to_string()];
            let mut fields = Vec::new();
            for f in &record.fields {
                let (field, ty) = match f.name.as_str() {
                    "event_id" => (Field::EventId, ReaderType::Str),
                    "external_id" => (Field::ExternalId, ReaderType::OptStr),
                    "email" => (Field::Email, ReaderType::OptStr),
                    "segment_id" => (Field::SegmentId, ReaderType::Str),
                    "segment_name" => (Field::SegmentName, ReaderType::OptStr),
                    "change" => (Field::Change, ReaderType::Change),
                    "occurred_at" => (Field::OccurredAt, ReaderType::Long),
                    "sequence" => (Field::Sequence, ReaderType::OptLong),
                    "attributes" => (Field::Attributes, ReaderType::OptAttributes),
                    other => return Err(format!("reader field {other} has no Event field")),
                };
                if let Schema::Enum(e) = &f.schema {
                    enum_names.extend(e.aliases.iter().flatten().map(|a| a.name()));
                }
                fields.push(ReaderField {
                    name: f.name.clone(),
                    aliases: f.aliases.clone().unwrap_or_default(),
                    field,
                    ty,
                    has_default: f.default.is_some(),
                });
            }
            Ok(ReaderSchema {
                record_names,
                enum_names,
                fields,
            })
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// How to read one writer value into a reader value.
#[derive(Debug, Clone)]
enum Conv {
    Null,
    Str,
    Int,
    Long,
    Float,
    Double,
    Bool,
    Enum(Box<[(Box<str>, Option<Change>)]>),
    Map(Box<Conv>),
    Union(Box<[Conv]>),
    /// A writer union branch with no reader counterpart: an error only if a record takes it.
    Fail(Box<str>),
}

/// How to step over a writer value the reader does not want.
#[derive(Debug, Clone)]
enum Skip {
    Zero,
    Bool,
    Varint,
    Fixed(usize),
    Bytes,
    /// Items, and whether an item takes no bytes (then a block count alone is skipped).
    Array(Box<Skip>, bool),
    Map(Box<Skip>),
    Union(Box<[Skip]>),
    Record(Box<[Skip]>),
    /// A named record, by index in `Plan::records`, so recursive types stay finite.
    Named(usize),
}

#[derive(Debug, Clone)]
enum Step {
    Read(Field, Conv),
    Skip(Skip),
}

/// A writer schema resolved against ours.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    steps: Vec<Step>,
    records: Vec<Skip>,
}

struct Compiler<'s> {
    names: &'s HashMap<Name, &'s Schema>,
    record_index: HashMap<Name, usize>,
    records: Vec<Skip>,
    /// Whether each of `records` has its fields compiled: an empty placeholder and a record
    /// with no fields look alike, and only the second takes no bytes.
    compiled: Vec<bool>,
}

fn unqualified(name: &Name) -> &str {
    &name.name
}

fn describe(schema: &Schema) -> String {
    match schema {
        Schema::Record(r) => format!("record {}", r.name.name),
        Schema::Enum(e) => format!("enum {}", e.name.name),
        Schema::Fixed(f) => format!("fixed {}", f.name.name),
        Schema::Ref { name } => name.name.clone(),
        other => format!("{:?}", apache_avro::schema::SchemaKind::from(other)).to_lowercase(),
    }
}

/// A writer schema from the registry's text. apache-avro 0.21 panics on some invalid
/// names (an `unwrap` in `Name::parse`, found by fuzzing) rather than returning an error: a
/// schema the registry serves must cost the records written with it, not the worker.
pub(crate) fn parse_writer(text: &str) -> Result<Schema, String> {
    match std::panic::catch_unwind(|| Schema::parse_str(text)) {
        Ok(parsed) => parsed.map_err(|e| format!("writer schema does not parse: {e}")),
        Err(_) => Err("writer schema does not parse (apache-avro panicked on it)".into()),
    }
}

impl Plan {
    /// The plan for bodies written with our own schema (the plain `avro` format).
    pub(crate) fn own() -> Result<Plan, String> {
        let schema = Schema::parse_str(super::SCHEMA).map_err(|e| e.to_string())?;
        Plan::compile(&schema)
    }

    /// Resolves `writer` against our schema; an error names what cannot be resolved.
    pub(crate) fn compile(writer: &Schema) -> Result<Plan, String> {
        let reader = reader_schema()?;
        let resolved = ResolvedSchema::try_from(writer).map_err(|e| e.to_string())?;
        let mut c = Compiler {
            names: resolved.get_names(),
            record_index: HashMap::new(),
            records: Vec::new(),
            compiled: Vec::new(),
        };
        let record = match c.deref(writer)? {
            Schema::Record(r) => r,
            other => {
                return Err(format!(
                    "writer schema is {}, not a record",
                    describe(other)
                ))
            }
        };
        if !reader
            .record_names
            .iter()
            .any(|n| n == unqualified(&record.name))
        {
            return Err(format!(
                "writer record {} does not match SegmentMembershipChange",
                record.name.name
            ));
        }
        let mut seen = Vec::new();
        let mut steps = Vec::with_capacity(record.fields.len());
        for wf in &record.fields {
            let rf = reader.fields.iter().find(|rf| {
                !seen.contains(&rf.field) && (rf.name == wf.name || rf.aliases.contains(&wf.name))
            });
            match rf {
                Some(rf) => {
                    seen.push(rf.field);
                    let conv = c
                        .conv(&wf.schema, rf.ty, &rf.name)
                        .map_err(|e| format!("field {}: {e}", rf.name))?;
                    steps.push(Step::Read(rf.field, conv));
                }
                None => steps.push(Step::Skip(c.skip(&wf.schema)?)),
            }
        }
        for rf in &reader.fields {
            if !seen.contains(&rf.field) && !rf.has_default {
                return Err(format!(
                    "writer has no field {} and the reader has no default for it",
                    rf.name
                ));
            }
        }
        Ok(Plan {
            steps,
            records: c.records,
        })
    }

    pub(crate) fn decode<'a>(&self, body: &'a [u8]) -> Result<Event<'a>, AvroError> {
        let mut cur = Cursor { buf: body, pos: 0 };
        let mut out = Partial::default();
        for step in &self.steps {
            match step {
                Step::Read(field, conv) => {
                    let v = read(conv, &mut cur)?;
                    out.set(*field, v)?;
                }
                Step::Skip(s) => skip(s, &self.records, &mut cur, 0)?,
            }
        }
        out.finish()
    }
}

impl<'s> Compiler<'s> {
    fn deref<'x>(&self, schema: &'x Schema) -> Result<&'x Schema, String>
    where
        's: 'x,
    {
        match schema {
            Schema::Ref { name } => self
                .names
                .get(name)
                .copied()
                .ok_or_else(|| format!("writer schema refers to unknown type {}", name.name)),
            other => Ok(other),
        }
    }

    fn conv(&mut self, writer: &Schema, reader: ReaderType, field: &str) -> Result<Conv, String> {
        let writer = self.deref(writer)?;
        if let Schema::Union(u) = writer {
            // Branches are resolved one by one; a branch with no reader counterpart only
            // fails the records that take it.
            let branches = u
                .variants()
                .iter()
                .map(|b| {
                    self.conv(b, reader, field)
                        .unwrap_or_else(|e| Conv::Fail(format!("field {field}: {e}").into()))
                })
                .collect();
            return Ok(Conv::Union(branches));
        }
        use ReaderType as R;
        let conv = match (reader, writer) {
            (R::OptStr | R::OptLong | R::OptAttributes | R::AttrValue, Schema::Null) => Conv::Null,
            (R::Str | R::OptStr | R::AttrValue, Schema::String | Schema::Bytes | Schema::Uuid) => {
                Conv::Str
            }
            (R::Long | R::OptLong | R::AttrValue, Schema::Int) => Conv::Int,
            (
                R::Long | R::OptLong,
                Schema::Long | Schema::TimestampMillis | Schema::LocalTimestampMillis,
            ) => Conv::Long,
            (R::AttrValue, Schema::Long) => Conv::Long,
            (R::AttrValue, Schema::Float) => Conv::Float,
            (R::AttrValue, Schema::Double) => Conv::Double,
            (R::AttrValue, Schema::Boolean) => Conv::Bool,
            (R::Change, Schema::Enum(e)) => {
                let names = &reader_schema()?.enum_names;
                if !names.contains(&e.name.name) {
                    return Err(format!(
                        "enum {} does not match MembershipChange",
                        e.name.name
                    ));
                }
                Conv::Enum(
                    e.symbols
                        .iter()
                        .map(|s| (s.as_str().into(), Change::from_symbol(s)))
                        .collect(),
                )
            }
            (R::OptAttributes, Schema::Map(m)) => {
                Conv::Map(Box::new(self.conv(&m.types, R::AttrValue, field)?))
            }
            (_, other) => {
                return Err(format!(
                    "writer type {} cannot be read as {}",
                    describe(other),
                    match reader {
                        R::Str => "string",
                        R::OptStr => "[null, string]",
                        R::Change => "enum MembershipChange",
                        R::Long => "long",
                        R::OptLong => "[null, long]",
                        R::OptAttributes => "[null, map]",
                        R::AttrValue => "[null, string, long, double, boolean]",
                    }
                ))
            }
        };
        Ok(conv)
    }

    fn skip(&mut self, writer: &Schema) -> Result<Skip, String> {
        Ok(match writer {
            Schema::Null => Skip::Zero,
            Schema::Boolean => Skip::Bool,
            Schema::Int
            | Schema::Long
            | Schema::Date
            | Schema::TimeMillis
            | Schema::TimeMicros
            | Schema::TimestampMillis
            | Schema::TimestampMicros
            | Schema::TimestampNanos
            | Schema::LocalTimestampMillis
            | Schema::LocalTimestampMicros
            | Schema::LocalTimestampNanos
            | Schema::Enum(_) => Skip::Varint,
            Schema::Float => Skip::Fixed(4),
            Schema::Double => Skip::Fixed(8),
            Schema::Bytes | Schema::String | Schema::Uuid | Schema::BigDecimal => Skip::Bytes,
            Schema::Fixed(f) => Skip::Fixed(f.size),
            Schema::Duration => Skip::Fixed(12),
            Schema::Decimal(d) => self.skip(&d.inner)?,
            Schema::Array(a) => {
                let item = self.skip(&a.items)?;
                let zero = self.is_zero(&item);
                Skip::Array(Box::new(item), zero)
            }
            Schema::Map(m) => Skip::Map(Box::new(self.skip(&m.types)?)),
            Schema::Union(u) => Skip::Union(
                u.variants()
                    .iter()
                    .map(|b| self.skip(b))
                    .collect::<Result<_, _>>()?,
            ),
            Schema::Record(r) => {
                if let Some(&i) = self.record_index.get(&r.name) {
                    return Ok(Skip::Named(i));
                }
                let i = self.records.len();
                // Registered before its fields so a field of its own type finds it.
                self.records.push(Skip::Record(Box::new([])));
                self.compiled.push(false);
                self.record_index.insert(r.name.clone(), i);
                let fields = r
                    .fields
                    .iter()
                    .map(|f| self.skip(&f.schema))
                    .collect::<Result<_, _>>()?;
                self.records[i] = Skip::Record(fields);
                self.compiled[i] = true;
                Skip::Named(i)
            }
            Schema::Ref { name } => match self.record_index.get(name) {
                Some(&i) => Skip::Named(i),
                None => {
                    let target = self.deref(writer)?;
                    self.skip(target)?
                }
            },
        })
    }

    /// Whether a value of this type takes no bytes; a record still being compiled counts as
    /// taking some, which is true of every finite recursive type. Getting this wrong for a
    /// record of no fields let a block count of 2^62 loop for ever.
    fn is_zero(&self, s: &Skip) -> bool {
        match s {
            Skip::Zero => true,
            Skip::Fixed(n) => *n == 0,
            Skip::Record(fields) => fields.iter().all(|f| self.is_zero(f)),
            Skip::Named(i) => match self.records.get(*i) {
                Some(Skip::Record(fields)) if self.compiled.get(*i) == Some(&true) => {
                    fields.iter().all(|f| self.is_zero(f))
                }
                _ => false,
            },
            _ => false,
        }
    }
}

/// A decoded reader value, before it is put in its field.
enum Val<'a> {
    Null,
    Str(&'a str),
    Long(i64),
    Double(f64),
    Bool(bool),
    Change(Change),
    Attrs(Vec<(Cow<'a, str>, AttrValue<'a>)>),
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    #[inline]
    fn long(&mut self) -> Result<i64, AvroError> {
        let mut value: u64 = 0;
        let mut shift = 0u32;
        loop {
            let byte = *self.buf.get(self.pos).ok_or(AvroError::Truncated)?;
            self.pos += 1;
            if shift == 63 && byte > 1 {
                return Err(AvroError::BadVarint);
            }
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                break;
            }
            shift += 7;
            if shift > 63 {
                return Err(AvroError::BadVarint);
            }
        }
        Ok((value >> 1) as i64 ^ -((value & 1) as i64))
    }

    #[inline]
    fn int(&mut self) -> Result<i32, AvroError> {
        let v = self.long()?;
        i32::try_from(v).map_err(|_| AvroError::IntOutOfRange(v))
    }

    #[inline]
    fn take(&mut self, n: usize) -> Result<&'a [u8], AvroError> {
        let end = self.pos.checked_add(n).ok_or(AvroError::Truncated)?;
        let out = self.buf.get(self.pos..end).ok_or(AvroError::Truncated)?;
        self.pos = end;
        Ok(out)
    }

    #[inline]
    fn len(&mut self) -> Result<usize, AvroError> {
        let n = self.long()?;
        if n < 0 {
            return Err(AvroError::NegativeLength(n));
        }
        usize::try_from(n).map_err(|_| AvroError::Truncated)
    }

    #[inline]
    fn bytes(&mut self) -> Result<&'a [u8], AvroError> {
        let n = self.len()?;
        self.take(n)
    }

    #[inline]
    fn str(&mut self) -> Result<&'a str, AvroError> {
        std::str::from_utf8(self.bytes()?).map_err(|_| AvroError::BadUtf8)
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The item count of the next array or map block (0 ends the value). A negative count
    /// is followed by the block's size in bytes, returned so skipping can jump over it.
    fn block(&mut self) -> Result<(usize, Option<usize>), AvroError> {
        let count = self.long()?;
        if count >= 0 {
            let n = usize::try_from(count).map_err(|_| AvroError::Truncated)?;
            return Ok((n, None));
        }
        let n = count.checked_neg().ok_or(AvroError::BadVarint)?;
        let n = usize::try_from(n).map_err(|_| AvroError::Truncated)?;
        let size = self.len()?;
        Ok((n, Some(size)))
    }
}

fn read<'a>(conv: &Conv, cur: &mut Cursor<'a>) -> Result<Val<'a>, AvroError> {
    Ok(match conv {
        Conv::Str => Val::Str(cur.str()?),
        Conv::Long => Val::Long(cur.long()?),
        Conv::Union(branches) => {
            let i = cur.long()?;
            let branch = usize::try_from(i)
                .ok()
                .and_then(|i| branches.get(i))
                .ok_or(AvroError::BadUnionBranch(i))?;
            // Avro forbids a union directly inside a union, so this recursion is one level.
            return read(branch, cur);
        }
        Conv::Null => Val::Null,
        Conv::Int => Val::Long(i64::from(cur.int()?)),
        Conv::Float => {
            let b = cur.take(4)?;
            Val::Double(f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
        }
        Conv::Double => {
            let b = cur.take(8)?;
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            Val::Double(f64::from_le_bytes(a))
        }
        Conv::Bool => match cur.take(1)?[0] {
            0 => Val::Bool(false),
            1 => Val::Bool(true),
            b => return Err(AvroError::BadBoolean(b)),
        },
        Conv::Enum(symbols) => {
            let i = cur.long()?;
            let (symbol, change) = usize::try_from(i)
                .ok()
                .and_then(|i| symbols.get(i))
                .ok_or(AvroError::BadEnumIndex(i))?;
            match change {
                Some(c) => Val::Change(*c),
                None => return Err(AvroError::UnknownSymbol(symbol.to_string())),
            }
        }
        Conv::Map(values) => {
            let mut out = Vec::new();
            loop {
                let (n, _) = cur.block()?;
                if n == 0 {
                    break;
                }
                // Every entry takes at least a byte, which bounds what a lying count can reserve.
                out.reserve(n.min(cur.remaining()));
                for _ in 0..n {
                    let key = cur.str()?;
                    let value = match read(values, cur)? {
                        Val::Null => AttrValue::Null,
                        Val::Str(s) => AttrValue::String(Cow::Borrowed(s)),
                        Val::Long(v) => AttrValue::Long(v),
                        Val::Double(v) => AttrValue::Double(v),
                        Val::Bool(v) => AttrValue::Boolean(v),
                        Val::Change(_) | Val::Attrs(_) => {
                            return Err(AvroError::Unresolvable(
                                "attribute value of an unexpected type".into(),
                            ))
                        }
                    };
                    out.push((Cow::Borrowed(key), value));
                }
            }
            Val::Attrs(out)
        }
        Conv::Fail(reason) => return Err(AvroError::Unresolvable(reason.to_string())),
    })
}

fn skip(s: &Skip, records: &[Skip], cur: &mut Cursor<'_>, depth: u32) -> Result<(), AvroError> {
    if depth > MAX_DEPTH {
        return Err(AvroError::TooDeep);
    }
    match s {
        Skip::Zero => {}
        Skip::Bool => {
            cur.take(1)?;
        }
        Skip::Varint => {
            cur.long()?;
        }
        Skip::Fixed(n) => {
            cur.take(*n)?;
        }
        Skip::Bytes => {
            cur.bytes()?;
        }
        Skip::Array(item, zero) => loop {
            let (n, size) = cur.block()?;
            if n == 0 {
                break;
            }
            match size {
                Some(size) => {
                    cur.take(size)?;
                }
                // Items of no bytes: looping over a huge count would only burn time.
                None if *zero => {}
                None => {
                    for _ in 0..n {
                        skip(item, records, cur, depth + 1)?;
                    }
                }
            }
        },
        Skip::Map(value) => loop {
            let (n, size) = cur.block()?;
            if n == 0 {
                break;
            }
            match size {
                Some(size) => {
                    cur.take(size)?;
                }
                None => {
                    for _ in 0..n {
                        cur.bytes()?;
                        skip(value, records, cur, depth + 1)?;
                    }
                }
            }
        },
        Skip::Union(branches) => {
            let i = cur.long()?;
            let branch = usize::try_from(i)
                .ok()
                .and_then(|i| branches.get(i))
                .ok_or(AvroError::BadUnionBranch(i))?;
            skip(branch, records, cur, depth + 1)?;
        }
        Skip::Record(fields) => {
            for f in fields.iter() {
                skip(f, records, cur, depth + 1)?;
            }
        }
        Skip::Named(i) => {
            let record = records
                .get(*i)
                .ok_or_else(|| AvroError::Unresolvable("dangling type reference".into()))?;
            skip(record, records, cur, depth + 1)?;
        }
    }
    Ok(())
}

/// The fields read so far; required ones are checked once the body is done.
#[derive(Default)]
struct Partial<'a> {
    event_id: Option<Cow<'a, str>>,
    external_id: Option<Cow<'a, str>>,
    email: Option<Cow<'a, str>>,
    segment_id: Option<Cow<'a, str>>,
    segment_name: Option<Cow<'a, str>>,
    change: Option<Change>,
    occurred_at: Option<i64>,
    sequence: Option<i64>,
    attributes: Vec<(Cow<'a, str>, AttrValue<'a>)>,
}

impl<'a> Partial<'a> {
    #[inline]
    fn set(&mut self, field: Field, v: Val<'a>) -> Result<(), AvroError> {
        fn opt<'a>(v: Val<'a>) -> Result<Option<Cow<'a, str>>, AvroError> {
            match v {
                Val::Null => Ok(None),
                Val::Str(s) => Ok(Some(Cow::Borrowed(s))),
                _ => Err(mismatch()),
            }
        }
        fn req<'a>(v: Val<'a>) -> Result<Option<Cow<'a, str>>, AvroError> {
            match v {
                Val::Str(s) => Ok(Some(Cow::Borrowed(s))),
                _ => Err(mismatch()),
            }
        }
        fn mismatch() -> AvroError {
            AvroError::Unresolvable("value of an unexpected type".into())
        }
        match field {
            Field::EventId => self.event_id = req(v)?,
            Field::SegmentId => self.segment_id = req(v)?,
            Field::ExternalId => self.external_id = opt(v)?,
            Field::Email => self.email = opt(v)?,
            Field::SegmentName => self.segment_name = opt(v)?,
            Field::Change => match v {
                Val::Change(c) => self.change = Some(c),
                _ => return Err(mismatch()),
            },
            Field::OccurredAt => match v {
                Val::Long(t) => self.occurred_at = Some(t),
                _ => return Err(mismatch()),
            },
            Field::Sequence => match v {
                Val::Null => self.sequence = None,
                Val::Long(s) => self.sequence = Some(s),
                _ => return Err(mismatch()),
            },
            Field::Attributes => match v {
                Val::Null => self.attributes = Vec::new(),
                Val::Attrs(a) => self.attributes = a,
                _ => return Err(mismatch()),
            },
        }
        Ok(())
    }

    fn finish(self) -> Result<Event<'a>, AvroError> {
        fn missing(name: &str) -> AvroError {
            AvroError::Unresolvable(format!("field {name} missing"))
        }
        Ok(Event {
            event_id: self.event_id.ok_or_else(|| missing("event_id"))?,
            external_id: self.external_id,
            email: self.email,
            segment_id: self.segment_id.ok_or_else(|| missing("segment_id"))?,
            segment_name: self.segment_name,
            change: self.change.ok_or_else(|| missing("change"))?,
            occurred_at: self.occurred_at.ok_or_else(|| missing("occurred_at"))?,
            sequence: self.sequence,
            attributes: self.attributes,
        })
    }
}
