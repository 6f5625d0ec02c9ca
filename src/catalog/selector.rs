//! Kubernetes label selectors as KLM uses them to pick credential Secrets.
//!
//! Two inputs: the `oci-registry-cred` label value on a component descriptor (a JSON object of
//! label → value, or a JSON string holding one; matchLabels only, `{}` selects everything),
//! and a Manifest's `credSecretSelector` (a `metav1.LabelSelector` with `matchLabels` and
//! `matchExpressions`). Matching follows Kubernetes semantics: every requirement must hold.

use std::collections::BTreeMap;
use std::fmt;

use serde_json::Value;

/// Why a selector could not be built. The message names no Secret content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum SelectorError {
    #[error("selector must be a JSON object of label to string value, got {0}")]
    NotAnObject(&'static str),
    #[error("selector value for {key:?} must be a string")]
    NonStringValue { key: String },
    #[error("invalid label key {0:?}")]
    InvalidKey(String),
    #[error("invalid label value {value:?} for key {key:?}")]
    InvalidValue { key: String, value: String },
    #[error("invalid matchExpressions entry: {0}")]
    InvalidExpression(String),
}

/// A set-based requirement from `matchExpressions`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Requirement {
    pub key: String,
    pub operator: Operator,
    pub values: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// A label selector: all `match_labels` pairs and all `match_expressions` must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Selector {
    pub match_labels: BTreeMap<String, String>,
    pub match_expressions: Vec<Requirement>,
}

impl Selector {
    /// From an `oci-registry-cred` label value: a JSON object, or a JSON string holding one.
    pub(super) fn from_label_value(value: &Value) -> Result<Selector, SelectorError> {
        let parsed;
        let obj = match value {
            Value::Object(m) => m,
            Value::String(s) => {
                parsed = serde_json::from_str::<Value>(s)
                    .map_err(|_| SelectorError::NotAnObject("a non-JSON string"))?;
                parsed
                    .as_object()
                    .ok_or(SelectorError::NotAnObject("a string not holding an object"))?
            }
            other => return Err(SelectorError::NotAnObject(json_kind(other))),
        };
        Ok(Selector {
            match_labels: string_map(obj)?,
            match_expressions: Vec::new(),
        })
    }

    /// From a `metav1.LabelSelector` object (`matchLabels`, `matchExpressions`).
    pub(super) fn from_label_selector(value: &Value) -> Result<Selector, SelectorError> {
        let obj = value
            .as_object()
            .ok_or(SelectorError::NotAnObject(json_kind(value)))?;
        let match_labels = match obj.get("matchLabels") {
            None | Some(Value::Null) => BTreeMap::new(),
            Some(Value::Object(m)) => string_map(m)?,
            Some(other) => return Err(SelectorError::NotAnObject(json_kind(other))),
        };
        let mut match_expressions = Vec::new();
        for e in obj
            .get("matchExpressions")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            match_expressions.push(parse_requirement(e)?);
        }
        Ok(Selector {
            match_labels,
            match_expressions,
        })
    }

    /// True when the selector has no requirement, i.e. selects every Secret.
    pub(super) fn is_everything(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }

    pub(super) fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| {
                let got = labels.get(&r.key);
                match r.operator {
                    Operator::In => got.is_some_and(|g| r.values.contains(g)),
                    Operator::NotIn => got.is_none_or(|g| !r.values.contains(g)),
                    Operator::Exists => got.is_some(),
                    Operator::DoesNotExist => got.is_none(),
                }
            })
    }
}

/// Kubernetes selector syntax (`k=v,k2 in (a,b)`); `{}` for the empty selector.
impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_everything() {
            return f.write_str("{} (every Secret)");
        }
        let mut parts: Vec<String> = self
            .match_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        for r in &self.match_expressions {
            parts.push(match r.operator {
                Operator::In => format!("{} in ({})", r.key, r.values.join(",")),
                Operator::NotIn => format!("{} notin ({})", r.key, r.values.join(",")),
                Operator::Exists => r.key.clone(),
                Operator::DoesNotExist => format!("!{}", r.key),
            });
        }
        f.write_str(&parts.join(","))
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn string_map(
    obj: &serde_json::Map<String, Value>,
) -> Result<BTreeMap<String, String>, SelectorError> {
    let mut out = BTreeMap::new();
    for (k, v) in obj {
        let v = v
            .as_str()
            .ok_or_else(|| SelectorError::NonStringValue { key: k.clone() })?;
        check_key(k)?;
        check_value(k, v)?;
        out.insert(k.clone(), v.to_owned());
    }
    Ok(out)
}

fn parse_requirement(e: &Value) -> Result<Requirement, SelectorError> {
    let bad = |m: &str| SelectorError::InvalidExpression(m.to_owned());
    let key = e
        .get("key")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("missing key"))?;
    check_key(key)?;
    let operator = match e.get("operator").and_then(Value::as_str) {
        Some("In") => Operator::In,
        Some("NotIn") => Operator::NotIn,
        Some("Exists") => Operator::Exists,
        Some("DoesNotExist") => Operator::DoesNotExist,
        _ => return Err(bad("operator must be In, NotIn, Exists or DoesNotExist")),
    };
    let mut values = Vec::new();
    for v in e
        .get("values")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let v = v.as_str().ok_or_else(|| bad("values must be strings"))?;
        check_value(key, v)?;
        values.push(v.to_owned());
    }
    match operator {
        Operator::In | Operator::NotIn if values.is_empty() => Err(bad("In and NotIn need values")),
        Operator::Exists | Operator::DoesNotExist if !values.is_empty() => {
            Err(bad("Exists and DoesNotExist take no values"))
        }
        _ => Ok(Requirement {
            key: key.to_owned(),
            operator,
            values,
        }),
    }
}

/// A qualified name: up to 63 alphanumerics, `-`, `_`, `.`, starting and ending alphanumeric.
fn is_qualified_name_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && s.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
}

fn check_key(key: &str) -> Result<(), SelectorError> {
    let ok = match key.split_once('/') {
        Some((prefix, name)) => {
            !prefix.is_empty()
                && prefix.len() <= 253
                && prefix.split('.').all(|l| {
                    !l.is_empty()
                        && l.bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                        && !l.starts_with('-')
                        && !l.ends_with('-')
                })
                && is_qualified_name_part(name)
        }
        None => is_qualified_name_part(key),
    };
    if ok {
        Ok(())
    } else {
        Err(SelectorError::InvalidKey(key.to_owned()))
    }
}

fn check_value(key: &str, value: &str) -> Result<(), SelectorError> {
    if value.is_empty() || is_qualified_name_part(value) {
        Ok(())
    } else {
        Err(SelectorError::InvalidValue {
            key: key.to_owned(),
            value: value.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn match_labels_all_must_match() {
        let s = Selector::from_label_value(&json!({"a": "1", "b": "2"})).unwrap();
        assert!(s.matches(&labels(&[("a", "1"), ("b", "2"), ("c", "3")])));
        assert!(!s.matches(&labels(&[("a", "1")])));
        assert!(!s.matches(&labels(&[("a", "1"), ("b", "3")])));
        assert_eq!(s.to_string(), "a=1,b=2");
    }

    #[test]
    fn empty_object_selects_everything() {
        let s = Selector::from_label_value(&json!({})).unwrap();
        assert!(s.is_everything());
        assert!(s.matches(&labels(&[])));
        assert!(s.matches(&labels(&[("x", "y")])));
        let s = Selector::from_label_value(&json!("{}")).unwrap();
        assert!(s.is_everything());
    }

    #[test]
    fn json_string_value_is_accepted() {
        let s = Selector::from_label_value(&json!(
            "{\"operator.kyma-project.io/oci-registry-cred\":\"x\"}"
        ))
        .unwrap();
        assert!(s.matches(&labels(&[(
            "operator.kyma-project.io/oci-registry-cred",
            "x"
        )])));
        assert!(!s.matches(&labels(&[(
            "operator.kyma-project.io/oci-registry-cred",
            "y"
        )])));
    }

    #[test]
    fn rejects_what_klm_rejects() {
        assert!(Selector::from_label_value(&json!("operator-regcred")).is_err());
        assert!(Selector::from_label_value(&json!(["a"])).is_err());
        assert_eq!(
            Selector::from_label_value(&json!({"a": 1})).unwrap_err(),
            SelectorError::NonStringValue { key: "a".into() }
        );
        assert!(Selector::from_label_value(&json!({"bad key": "v"})).is_err());
        assert!(Selector::from_label_value(&json!({"k": "bad value!"})).is_err());
    }

    #[test]
    fn label_selector_with_expressions() {
        let s = Selector::from_label_selector(&json!({
            "matchLabels": {"a": "1"},
            "matchExpressions": [
                {"key": "env", "operator": "In", "values": ["dev", "prod"]},
                {"key": "tier", "operator": "NotIn", "values": ["x"]},
                {"key": "owner", "operator": "Exists"},
                {"key": "legacy", "operator": "DoesNotExist"}
            ]
        }))
        .unwrap();
        let ok = labels(&[("a", "1"), ("env", "dev"), ("owner", "me")]);
        assert!(s.matches(&ok));
        let mut l = ok.clone();
        l.insert("tier".into(), "x".into());
        assert!(!s.matches(&l));
        let mut l = ok.clone();
        l.insert("legacy".into(), "".into());
        assert!(!s.matches(&l));
        let mut l = ok.clone();
        l.remove("owner");
        assert!(!s.matches(&l));
        let mut l = ok;
        l.insert("env".into(), "qa".into());
        assert!(!s.matches(&l));
        assert!(Selector::from_label_selector(
            &json!({"matchExpressions": [{"key": "a", "operator": "In"}]})
        )
        .is_err());
    }
}
