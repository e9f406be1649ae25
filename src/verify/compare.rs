//! Pure: one user's profile as Braze exports it, judged against the log's last writes under
//! the configured mapping (docs/design.md: boolean or array mode, the attribute prefix, the
//! exited value).
//!
//! Only what the mapping writes is judged. A segment attribute the log does not name for the
//! user is judged only when the whole log was read (from its first record, nothing deleted by
//! retention): otherwise the change that wrote it may simply not have been read. With an
//! empty prefix, an attribute that no segment of the log names cannot be told from the
//! user's other attributes: it is counted as not judged rather than guessed at.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::config::{ExitedValue, MappingMode};
use crate::event::Change;
use crate::mapping::Mapping;

use super::state::{Coord, Names, UserState};

/// How profiles are judged: the mapping, and what the read part of the log can vouch for.
#[derive(Debug, Clone)]
pub struct Judge {
    pub mode: MappingMode,
    pub prefix: String,
    pub array_attribute: String,
    pub exited_value: ExitedValue,
    /// The worker never creates users: a user Braze does not have is not drift.
    pub update_existing_only: bool,
    /// The log was read from its first record on every partition, so a membership it does
    /// not name for a user was never written by it.
    pub whole_log: bool,
}

/// One attribute (boolean mode) or one segment of the array (array mode) that differs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Difference {
    /// The segment id; empty when the array attribute is not an array at all.
    pub segment: String,
    pub attribute: String,
    /// What Braze should hold. Boolean mode: the attribute's value (`null`: absent). Array
    /// mode: whether the segment is in the array.
    pub expected: Value,
    pub found: Value,
    /// The record that decided `expected`; `None` for a membership the log never wrote.
    pub deciding: Option<Coord>,
    /// The deciding record is in the dead-letter topic: Braze refused it, so the
    /// difference is known and reported apart, not as drift.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub dead_lettered: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    InSync,
    /// The profile exists and differs.
    Differs(Vec<Difference>),
    /// Braze has no such user although the log wrote it (and the worker creates users).
    Missing(Vec<Difference>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Judgement {
    pub outcome: Outcome,
    /// Attributes of the profile that could not be judged (see the module's notes).
    pub unjudged: usize,
}

impl Judge {
    pub fn new(mapping: &Mapping, whole_log: bool) -> Judge {
        Judge {
            mode: mapping.mode,
            prefix: mapping.attribute_prefix.clone(),
            array_attribute: mapping.array_attribute.clone(),
            exited_value: mapping.exited_value,
            update_existing_only: mapping.update_existing_only,
            whole_log,
        }
    }

    /// The value the boolean mapping leaves for a change (`null`: the attribute is absent).
    fn boolean_value(&self, change: Change) -> Value {
        match (change, self.exited_value) {
            (Change::Entered, _) => Value::Bool(true),
            (Change::Exited, ExitedValue::False) => Value::Bool(false),
            (Change::Exited, ExitedValue::Null) => Value::Null,
        }
    }

    pub fn judge(
        &self,
        user: &UserState,
        braze: Option<&Map<String, Value>>,
        names: &Names,
    ) -> Judgement {
        let Some(profile) = braze else {
            return self.missing(user);
        };
        let mut differences = Vec::new();
        let unjudged = match self.mode {
            MappingMode::Boolean => self.boolean(user, profile, names, &mut differences),
            MappingMode::Array => self.array(user, profile, names, &mut differences),
        };
        Judgement {
            outcome: if differences.is_empty() {
                Outcome::InSync
            } else {
                Outcome::Differs(differences)
            },
            unjudged,
        }
    }

    fn missing(&self, user: &UserState) -> Judgement {
        // The worker's objects create the user unless `update_existing_only`; a user the
        // log wrote nothing for was never created by it.
        let outcome = if self.update_existing_only || user.segments.is_empty() {
            Outcome::InSync
        } else {
            let empty = Map::new();
            let mut differences = Vec::new();
            match self.mode {
                MappingMode::Boolean => {
                    self.boolean(user, &empty, &Names::default(), &mut differences);
                }
                MappingMode::Array => {
                    self.array(user, &empty, &Names::default(), &mut differences);
                }
            }
            Outcome::Missing(differences)
        };
        Judgement {
            outcome,
            unjudged: 0,
        }
    }

    fn boolean(
        &self,
        user: &UserState,
        profile: &Map<String, Value>,
        names: &Names,
        out: &mut Vec<Difference>,
    ) -> usize {
        for (segment, last) in &user.segments {
            let attribute = format!("{}{segment}", self.prefix);
            let expected = self.boolean_value(last.change);
            let found = profile.get(&attribute).cloned().unwrap_or(Value::Null);
            if expected != found {
                out.push(Difference {
                    segment: segment.to_string(),
                    attribute,
                    expected,
                    found,
                    deciding: Some(last.at.clone()),
                    dead_lettered: false,
                });
            }
        }
        let not_member = self.boolean_value(Change::Exited);
        let mut unjudged = 0;
        for (name, value) in profile {
            let Some(segment) = name.strip_prefix(self.prefix.as_str()) else {
                // Not the mapping's: another system's attribute.
                continue;
            };
            if user.segments.contains_key(segment) || names.attributes.contains(name.as_str()) {
                continue;
            }
            let ours = !self.prefix.is_empty() || names.segments.contains(segment);
            if !ours || !self.whole_log || names.overflowed {
                unjudged += 1;
                continue;
            }
            // What the mapping leaves for a non-member is no claim of membership.
            if value.is_null() || *value == not_member {
                continue;
            }
            out.push(Difference {
                segment: segment.to_string(),
                attribute: name.clone(),
                expected: not_member.clone(),
                found: value.clone(),
                deciding: None,
                dead_lettered: false,
            });
        }
        unjudged
    }

    fn array(
        &self,
        user: &UserState,
        profile: &Map<String, Value>,
        names: &Names,
        out: &mut Vec<Difference>,
    ) -> usize {
        let attribute = &self.array_attribute;
        let items: &[Value] = match profile.get(attribute) {
            None | Some(Value::Null) => &[],
            Some(Value::Array(items)) => items,
            Some(other) => {
                out.push(Difference {
                    segment: String::new(),
                    attribute: attribute.clone(),
                    expected: Value::String("an array of segment ids".into()),
                    found: other.clone(),
                    deciding: None,
                    dead_lettered: false,
                });
                return 0;
            }
        };
        let has = |segment: &str| items.iter().any(|v| v.as_str() == Some(segment));
        for (segment, last) in &user.segments {
            let expected = last.change == Change::Entered;
            let found = has(segment);
            if expected != found {
                out.push(Difference {
                    segment: segment.to_string(),
                    attribute: attribute.clone(),
                    expected: Value::Bool(expected),
                    found: Value::Bool(found),
                    deciding: Some(last.at.clone()),
                    dead_lettered: false,
                });
            }
        }
        let mut unjudged = 0;
        for item in items {
            let Some(segment) = item.as_str() else {
                unjudged += 1;
                continue;
            };
            if user.segments.contains_key(segment) {
                continue;
            }
            if !self.whole_log || names.overflowed {
                unjudged += 1;
                continue;
            }
            out.push(Difference {
                segment: segment.to_string(),
                attribute: attribute.clone(),
                expected: Value::Bool(false),
                found: Value::Bool(true),
                deciding: None,
                dead_lettered: false,
            });
        }
        unjudged
    }

    /// The attributes of a profile the mapping writes, for a report: the prefixed ones (with
    /// an empty prefix, those the log names as segments) or the array attribute.
    pub fn relevant(
        &self,
        user: &UserState,
        profile: &Map<String, Value>,
        names: &Names,
    ) -> Map<String, Value> {
        profile
            .iter()
            .filter(|(name, _)| match self.mode {
                MappingMode::Array => **name == self.array_attribute,
                MappingMode::Boolean => name.strip_prefix(self.prefix.as_str()).is_some_and(|s| {
                    user.segments.contains_key(s)
                        || (!names.attributes.contains(name.as_str())
                            && (!self.prefix.is_empty() || names.segments.contains(s)))
                }),
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The (segment, change) pairs that make Braze hold the log's state again: the log's
    /// change for a segment it names, leaving for one it does not.
    pub fn repair_changes(
        &self,
        user: &UserState,
        differences: &[Difference],
    ) -> Vec<(String, Change)> {
        let mut out: Vec<(String, Change)> = Vec::new();
        for d in differences.iter().filter(|d| !d.dead_lettered) {
            if d.segment.is_empty() {
                // Not an array at all: write every membership the log names.
                for (segment, last) in &user.segments {
                    out.push((segment.to_string(), last.change));
                }
                continue;
            }
            let change = user
                .segments
                .get(d.segment.as_str())
                .map_or(Change::Exited, |last| last.change);
            out.push((d.segment.clone(), change));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out.dedup_by(|a, b| a.0 == b.0);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::state::Last;
    use crate::window::Order;
    use serde_json::json;
    use std::sync::Arc;

    fn judge(mode: MappingMode, prefix: &str, exited: ExitedValue) -> Judge {
        Judge {
            mode,
            prefix: prefix.into(),
            array_attribute: "cdp_segments".into(),
            exited_value: exited,
            update_existing_only: false,
            whole_log: true,
        }
    }

    fn at(offset: i64) -> Coord {
        Coord {
            topic: Arc::from("t"),
            partition: 0,
            offset,
        }
    }

    fn user(segments: &[(&str, Change)]) -> UserState {
        let mut u = UserState::default();
        for (i, (s, c)) in segments.iter().enumerate() {
            u.segments.insert(
                (*s).into(),
                Last {
                    change: *c,
                    order: Order {
                        sequence: i as i64,
                        occurred_at: 0,
                        partition: 0,
                        offset: i as i64,
                    },
                    at: at(i as i64),
                    event: 0,
                },
            );
        }
        u
    }

    fn names(segments: &[&str], attributes: &[&str]) -> Names {
        Names {
            segments: segments.iter().map(|s| Box::from(*s)).collect(),
            attributes: attributes.iter().map(|s| Box::from(*s)).collect(),
            overflowed: false,
        }
    }

    fn profile(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn differences(j: &Judgement) -> Vec<(String, Value, Value, Option<i64>)> {
        match &j.outcome {
            Outcome::InSync => vec![],
            Outcome::Differs(d) | Outcome::Missing(d) => d
                .iter()
                .map(|d| {
                    (
                        d.attribute.clone(),
                        d.expected.clone(),
                        d.found.clone(),
                        d.deciding.as_ref().map(|c| c.offset),
                    )
                })
                .collect(),
        }
    }

    use Change::{Entered, Exited};

    #[test]
    fn boolean_mode_in_sync_with_both_exited_values() {
        let u = user(&[("a", Entered), ("b", Exited)]);
        let n = names(&["a", "b"], &["tier"]);
        let j = judge(MappingMode::Boolean, "cdp_", ExitedValue::False);
        let p = profile(json!({"cdp_a": true, "cdp_b": false, "tier": "gold", "city": "Oslo"}));
        assert_eq!(j.judge(&u, Some(&p), &n).outcome, Outcome::InSync);
        let j = judge(MappingMode::Boolean, "cdp_", ExitedValue::Null);
        let p = profile(json!({"cdp_a": true, "tier": "gold"}));
        assert_eq!(j.judge(&u, Some(&p), &n).outcome, Outcome::InSync);
    }

    #[test]
    fn boolean_mode_finds_a_flip_a_loss_and_an_extra_membership() {
        let u = user(&[("a", Entered), ("b", Exited), ("c", Entered)]);
        let n = names(&["a", "b", "c", "x", "y"], &[]);
        let j = judge(MappingMode::Boolean, "cdp_", ExitedValue::False);
        let p = profile(json!({"cdp_a": false, "cdp_b": false, "cdp_x": true, "cdp_y": false}));
        let got = j.judge(&u, Some(&p), &n);
        assert!(matches!(got.outcome, Outcome::Differs(_)));
        assert_eq!(
            differences(&got),
            vec![
                ("cdp_a".into(), json!(true), json!(false), Some(0)),
                ("cdp_c".into(), json!(true), Value::Null, Some(2)),
                // cdp_y = false is what a non-member holds: no claim, no drift.
                ("cdp_x".into(), json!(false), json!(true), None),
            ]
        );
        // With exited_value = "null", an exited segment's attribute must be absent.
        let j = judge(MappingMode::Boolean, "cdp_", ExitedValue::Null);
        let p = profile(json!({"cdp_a": true, "cdp_b": false, "cdp_c": true}));
        assert_eq!(
            differences(&j.judge(&u, Some(&p), &n)),
            vec![("cdp_b".into(), Value::Null, json!(false), Some(1))]
        );
    }

    #[test]
    fn an_extra_membership_is_not_judged_unless_the_whole_log_was_read() {
        let u = user(&[("a", Entered)]);
        let n = names(&["a", "x"], &[]);
        let mut j = judge(MappingMode::Boolean, "cdp_", ExitedValue::False);
        j.whole_log = false;
        let p = profile(json!({"cdp_a": true, "cdp_x": true}));
        let got = j.judge(&u, Some(&p), &n);
        assert_eq!((got.outcome, got.unjudged), (Outcome::InSync, 1));
    }

    #[test]
    fn with_an_empty_prefix_only_attributes_the_log_names_as_segments_are_judged() {
        let u = user(&[("a", Entered)]);
        // "tier" is an extra attribute of the events; "x" a segment of another user;
        // "score" is named by nothing in the log.
        let n = names(&["a", "x"], &["tier"]);
        let j = judge(MappingMode::Boolean, "", ExitedValue::False);
        let p = profile(json!({"a": true, "x": true, "tier": "gold", "score": 3}));
        let got = j.judge(&u, Some(&p), &n);
        assert_eq!(
            differences(&got),
            vec![("x".into(), json!(false), json!(true), None)]
        );
        assert_eq!(got.unjudged, 1, "score cannot be told from a segment");
        assert_eq!(
            j.relevant(&u, &p, &n),
            profile(json!({"a": true, "x": true}))
        );
    }

    #[test]
    fn array_mode_compares_membership_of_the_array() {
        let u = user(&[("a", Entered), ("b", Exited), ("c", Entered)]);
        let n = names(&["a", "b", "c"], &[]);
        let j = judge(MappingMode::Array, "", ExitedValue::False);
        let p = profile(json!({"cdp_segments": ["c", "a"], "a": false}));
        assert_eq!(j.judge(&u, Some(&p), &n).outcome, Outcome::InSync);
        let p = profile(json!({"cdp_segments": ["b", "a", "z", 7]}));
        let got = j.judge(&u, Some(&p), &n);
        assert_eq!(
            differences(&got),
            vec![
                ("cdp_segments".into(), json!(false), json!(true), Some(1)),
                ("cdp_segments".into(), json!(true), json!(false), Some(2)),
                ("cdp_segments".into(), json!(false), json!(true), None),
            ]
        );
        assert_eq!(got.unjudged, 1, "7 is no segment id");
        let p = profile(json!({"cdp_segments": "a"}));
        let got = j.judge(&u, Some(&p), &n);
        let Outcome::Differs(d) = got.outcome else {
            panic!("{got:?}")
        };
        assert_eq!(d[0].segment, "");
        assert_eq!(
            j.repair_changes(&u, &d),
            vec![
                ("a".into(), Entered),
                ("b".into(), Exited),
                ("c".into(), Entered)
            ]
        );
    }

    #[test]
    fn a_missing_user_is_drift_unless_the_worker_never_creates_users() {
        let u = user(&[("a", Entered), ("b", Exited)]);
        let n = names(&["a", "b"], &[]);
        let mut j = judge(MappingMode::Boolean, "cdp_", ExitedValue::False);
        let got = j.judge(&u, None, &n);
        assert!(matches!(got.outcome, Outcome::Missing(_)));
        assert_eq!(
            differences(&got),
            vec![
                ("cdp_a".into(), json!(true), Value::Null, Some(0)),
                ("cdp_b".into(), json!(false), Value::Null, Some(1)),
            ]
        );
        assert_eq!(
            j.judge(&UserState::default(), None, &n).outcome,
            Outcome::InSync
        );
        j.update_existing_only = true;
        assert_eq!(j.judge(&u, None, &n).outcome, Outcome::InSync);
    }

    #[test]
    fn repair_writes_the_logs_change_and_leaves_segments_it_never_wrote() {
        let u = user(&[("a", Entered), ("b", Exited)]);
        let n = names(&["a", "b", "x"], &[]);
        let j = judge(MappingMode::Boolean, "cdp_", ExitedValue::False);
        let p = profile(json!({"cdp_a": false, "cdp_b": true, "cdp_x": true}));
        let Outcome::Differs(mut d) = j.judge(&u, Some(&p), &n).outcome else {
            panic!()
        };
        d[1].dead_lettered = true;
        assert_eq!(
            j.repair_changes(&u, &d),
            vec![("a".into(), Entered), ("x".into(), Exited)]
        );
    }
}
