//! Reading typed fields out of a job message's JSON object: each reader checks one field's
//! type and range and, when it is wrong, records a [`FieldError`] with a stable code instead
//! of stopping, so that every invalid field of a message is reported at once. `null` counts
//! as absent everywhere.

use serde_json::{Map, Value};

use super::{codes, FieldError};
use crate::config::{ControlNetConfig, Limits};
use crate::engine::{PredictionType, TimestepSpacing};

/// How a JSON value is named in error messages ("a string", "an integer", ...).
pub(super) fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a number",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// An integer value of any size: JSON integers and numbers with no fractional part (as JSON
/// Schema counts them). `None` when the value is not integral.
pub(super) fn as_integer(value: &Value) -> Option<i128> {
    let Value::Number(n) = value else { return None };
    if let Some(u) = n.as_u64() {
        return Some(i128::from(u));
    }
    if let Some(i) = n.as_i64() {
        return Some(i128::from(i));
    }
    let x = n.as_f64()?;
    if x.fract() != 0.0 || !x.is_finite() {
        return None;
    }
    // Saturate: anything this large is out of every range anyway.
    Some(x.clamp(i128::MIN as f64, i128::MAX as f64) as i128)
}

/// The message being checked and the errors found so far.
pub(super) struct Checker<'a> {
    pub(super) obj: &'a Map<String, Value>,
    pub(super) errors: Vec<FieldError>,
    pub(super) controlnet: &'a ControlNetConfig,
}

impl<'a> Checker<'a> {
    pub(super) fn push(&mut self, field: &str, code: &str, message: impl Into<String>) {
        self.errors.push(FieldError::new(field, code, message));
    }

    /// The field's value; `null` counts as absent.
    pub(super) fn get(&self, field: &str) -> Option<&'a Value> {
        self.obj.get(field).filter(|v| !v.is_null())
    }

    pub(super) fn wrong_type(&mut self, field: &str, expected: &str, found: &Value) {
        let message = format!("expected {expected}, found {}", kind(found));
        self.push(field, codes::WRONG_TYPE, message);
    }

    pub(super) fn string(&mut self, field: &str, max_chars: usize) -> Option<String> {
        let value = self.get(field)?;
        let Value::String(text) = value else {
            self.wrong_type(field, "a string", value);
            return None;
        };
        if text.contains('\0') {
            self.push(
                field,
                codes::INVALID_VALUE,
                "text must not contain NUL characters",
            );
            return None;
        }
        let chars = text.chars().count();
        if chars > max_chars {
            let message = format!("{chars} characters; at most {max_chars} are accepted");
            self.push(field, codes::TOO_LONG, message);
            return None;
        }
        Some(text.clone())
    }

    pub(super) fn boolean(&mut self, field: &str) -> Option<bool> {
        let value = self.get(field)?;
        match value {
            Value::Bool(b) => Some(*b),
            other => {
                self.wrong_type(field, "true or false", other);
                None
            }
        }
    }

    pub(super) fn integer(&mut self, field: &str, min: u64, max: u64) -> Option<u64> {
        let value = self.get(field)?;
        let Some(n) = as_integer(value) else {
            self.wrong_type(field, "an integer", value);
            return None;
        };
        if n < i128::from(min) || n > i128::from(max) {
            let message = format!("{n} is outside {min}..={max}");
            self.push(field, codes::OUT_OF_RANGE, message);
            return None;
        }
        u64::try_from(n).ok()
    }

    pub(super) fn number(&mut self, field: &str, min: f64, max: f64) -> Option<f64> {
        let value = self.get(field)?;
        let Some(x) = value.as_f64() else {
            self.wrong_type(field, "a number", value);
            return None;
        };
        if !(min..=max).contains(&x) {
            let message = format!("{x} is outside {min}..={max}");
            self.push(field, codes::OUT_OF_RANGE, message);
            return None;
        }
        Some(x)
    }

    pub(super) fn side(&mut self, field: &str, limits: &Limits) -> Option<u32> {
        let min = u64::from(limits.min_side);
        let max = u64::from(limits.max_side);
        let n = self.integer(field, min, max)? as u32;
        if !n.is_multiple_of(8) {
            self.push(
                field,
                codes::NOT_MULTIPLE_OF_8,
                format!("{n} is not a multiple of 8"),
            );
            return None;
        }
        Some(n)
    }

    /// A two-item array of integers within `min..=max` (`what` names the items).
    pub(super) fn pair(&mut self, field: &str, min: u32, what: &str) -> Option<[u32; 2]> {
        let value = self.get(field)?;
        let Value::Array(items) = value else {
            self.wrong_type(field, &format!("an array {what}"), value);
            return None;
        };
        if items.len() != 2 {
            let message = format!("expected 2 items {what}, found {}", items.len());
            self.push(field, codes::WRONG_LENGTH, message);
            return None;
        }
        let max = super::MAX_CONDITIONING_SIDE;
        let mut out = [0u32; 2];
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let path = format!("{field}[{i}]");
            match as_integer(item) {
                Some(n) if n >= i128::from(min) && n <= i128::from(max) => out[i] = n as u32,
                Some(n) => {
                    self.push(
                        &path,
                        codes::OUT_OF_RANGE,
                        format!("{n} is outside {min}..={max}"),
                    );
                    ok = false;
                }
                None => {
                    self.wrong_type(&path, "an integer", item);
                    ok = false;
                }
            }
        }
        ok.then_some(out)
    }

    /// A string naming one variant of a snake_case serde enum.
    pub(super) fn choice<T: serde::de::DeserializeOwned + Choices>(
        &mut self,
        path: &str,
        item: &Value,
    ) -> Option<T> {
        let Value::String(text) = item else {
            self.wrong_type(path, "a string", item);
            return None;
        };
        match serde_json::from_value::<T>(item.clone()) {
            Ok(v) => Some(v),
            Err(_) => {
                let message = format!("{text:?} is not one of: {}", T::CHOICES.join(", "));
                self.push(path, codes::INVALID_VALUE, message);
                None
            }
        }
    }
}

/// The allowed strings of an enum field.
pub(crate) trait Choices {
    const CHOICES: &'static [&'static str];
}

impl Choices for TimestepSpacing {
    const CHOICES: &'static [&'static str] = &["leading", "trailing", "linspace"];
}

impl Choices for PredictionType {
    const CHOICES: &'static [&'static str] = &["epsilon", "v_prediction"];
}
