//! The `refiner` field of a job message: hand the last part of the schedule to the model's SDXL
//! refiner (the "quality boost"; see [`crate::engine::refiner`] for what runs).
//!
//! - `"refiner": {}` uses diffusers' defaults; every key is optional:
//!   `handoff` (the share of the steps the base runs, diffusers' `denoising_end` /
//!   `denoising_start`, strictly between 0 and 1, default 0.8), `aesthetic_score` (default 6)
//!   and `negative_aesthetic_score` (default 2.5), both within 0..=10. Absent or `null`: no
//!   refiner. The normalized message records all three values.
//! - The job's model must have a refiner in the configuration (`refiner` of its
//!   `[models.available]` entry), else the job is rejected with `no_refiner`.
//! - A refiner cannot be combined with ControlNets (`invalid_value`).
//! - A hand-off that leaves the base or the refiner no step for the job's scheduler and step
//!   count fails the job when it runs, with code `invalid_request`.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{codes, FieldError};
use crate::config::ModelEntry;
use crate::engine::refiner::{
    AestheticScores, Refine, DEFAULT_AESTHETIC_SCORE, DEFAULT_HANDOFF,
    DEFAULT_NEGATIVE_AESTHETIC_SCORE,
};

/// Fields of `refiner`.
pub const FIELDS: [&str; 3] = ["handoff", "aesthetic_score", "negative_aesthetic_score"];

/// Largest aesthetic score (the refiner was trained on a 0 to 10 scale).
pub const MAX_AESTHETIC_SCORE: f64 = 10.0;

/// The refiner stage a job asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefinerSpec {
    /// Share of the steps the base runs, in (0, 1); absent means 0.8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handoff: Option<f64>,
    /// Absent means 6.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aesthetic_score: Option<f64>,
    /// Absent means 2.5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_aesthetic_score: Option<f64>,
}

impl RefinerSpec {
    /// The spec with every default filled in.
    pub fn normalized(&self) -> Self {
        Self {
            handoff: Some(self.handoff.unwrap_or(DEFAULT_HANDOFF)),
            aesthetic_score: Some(
                self.aesthetic_score
                    .unwrap_or(f64::from(DEFAULT_AESTHETIC_SCORE)),
            ),
            negative_aesthetic_score: Some(
                self.negative_aesthetic_score
                    .unwrap_or(f64::from(DEFAULT_NEGATIVE_AESTHETIC_SCORE)),
            ),
        }
    }

    /// The engine's hand-off settings.
    pub fn refine(&self) -> Refine {
        let n = self.normalized();
        Refine {
            handoff: n.handoff.unwrap_or(DEFAULT_HANDOFF),
            aesthetic: AestheticScores {
                positive: n.aesthetic_score.unwrap_or_default() as f32,
                negative: n.negative_aesthetic_score.unwrap_or_default() as f32,
            },
        }
    }
}

/// Check a non-null `refiner` value for the job's model (`None` when the model is unknown:
/// that is reported on `model`), recording errors; `None` when it is invalid.
pub(super) fn check(
    value: &Value,
    model: Option<&ModelEntry>,
    with_controlnets: bool,
    errors: &mut Vec<FieldError>,
) -> Option<RefinerSpec> {
    let before = errors.len();
    let Value::Object(fields) = value else {
        errors.push(FieldError::new(
            "refiner",
            codes::WRONG_TYPE,
            format!("expected an object, found {}", super::checker::kind(value)),
        ));
        return None;
    };
    for key in fields.keys().filter(|k| !FIELDS.contains(&k.as_str())) {
        errors.push(FieldError::new(
            format!("refiner.{key}"),
            codes::UNKNOWN_FIELD,
            format!("{key:?} is not a field of refiner ({})", FIELDS.join(", ")),
        ));
    }
    let handoff = number(fields, "handoff", errors).filter(|&h| {
        let ok = h > 0.0 && h < 1.0;
        if !ok {
            errors.push(FieldError::new(
                "refiner.handoff",
                codes::OUT_OF_RANGE,
                format!("{h} is not strictly between 0 and 1 (the share of steps the base runs)"),
            ));
        }
        ok
    });
    let score = |name: &str, errors: &mut Vec<FieldError>| {
        number(fields, name, errors).filter(|&s| {
            let ok = (0.0..=MAX_AESTHETIC_SCORE).contains(&s);
            if !ok {
                errors.push(FieldError::new(
                    format!("refiner.{name}"),
                    codes::OUT_OF_RANGE,
                    format!("{s} is outside 0..={MAX_AESTHETIC_SCORE}"),
                ));
            }
            ok
        })
    };
    let aesthetic_score = score("aesthetic_score", errors);
    let negative_aesthetic_score = score("negative_aesthetic_score", errors);
    if let Some(entry) = model {
        if entry.refiner.is_none() {
            errors.push(FieldError::new(
                "refiner",
                codes::NO_REFINER,
                format!(
                    "model {:?} has no refiner configured on this deployment",
                    entry.name
                ),
            ));
        }
    }
    if with_controlnets {
        errors.push(FieldError::new(
            "refiner",
            codes::INVALID_VALUE,
            "a refiner cannot be combined with controlnets",
        ));
    }
    (errors.len() == before).then_some(RefinerSpec {
        handoff,
        aesthetic_score,
        negative_aesthetic_score,
    })
}

/// A number field of `refiner` (`null` counts as absent).
fn number(fields: &Map<String, Value>, name: &str, errors: &mut Vec<FieldError>) -> Option<f64> {
    let value = fields.get(name).filter(|v| !v.is_null())?;
    let number = value.as_f64();
    if number.is_none() {
        errors.push(FieldError::new(
            format!("refiner.{name}"),
            codes::WRONG_TYPE,
            format!("expected a number, found {}", super::checker::kind(value)),
        ));
    }
    number
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entry(refiner: bool) -> ModelEntry {
        ModelEntry {
            name: "m".to_owned(),
            path: "/m".into(),
            default_width: None,
            default_height: None,
            refiner: refiner.then(|| "/r".into()),
        }
    }

    fn codes_of(value: Value, refiner: bool, controlnets: bool) -> Vec<(String, String)> {
        let mut errors = Vec::new();
        check(&value, Some(&entry(refiner)), controlnets, &mut errors);
        errors.into_iter().map(|e| (e.field, e.code)).collect()
    }

    #[test]
    fn defaults_fill_an_empty_object() {
        let mut errors = Vec::new();
        let spec = check(&json!({}), Some(&entry(true)), false, &mut errors).unwrap();
        assert!(errors.is_empty());
        let refine = spec.refine();
        assert_eq!(refine, Refine::default());
        let n = spec.normalized();
        assert_eq!(
            (n.handoff, n.aesthetic_score, n.negative_aesthetic_score),
            (Some(0.8), Some(6.0), Some(2.5))
        );
    }

    #[test]
    fn every_problem_gets_its_code() {
        let pair = |f: &str, c: &str| (f.to_owned(), c.to_owned());
        assert_eq!(
            codes_of(json!({}), false, false),
            [pair("refiner", "no_refiner")]
        );
        assert_eq!(
            codes_of(json!(true), true, false),
            [pair("refiner", "wrong_type")]
        );
        assert_eq!(
            codes_of(
                json!({"handoff": 1.0, "aesthetic_score": 11, "x": 1}),
                true,
                false
            ),
            [
                pair("refiner.x", "unknown_field"),
                pair("refiner.handoff", "out_of_range"),
                pair("refiner.aesthetic_score", "out_of_range"),
            ]
        );
        assert_eq!(
            codes_of(json!({"handoff": 0}), true, false),
            [pair("refiner.handoff", "out_of_range")]
        );
        assert_eq!(
            codes_of(json!({"negative_aesthetic_score": "low"}), true, false),
            [pair("refiner.negative_aesthetic_score", "wrong_type")]
        );
        assert_eq!(
            codes_of(json!({"handoff": 0.7}), true, true),
            [pair("refiner", "invalid_value")]
        );
        let mut errors = Vec::new();
        let spec = check(
            &json!({"handoff": 0.65, "aesthetic_score": null, "negative_aesthetic_score": 1}),
            Some(&entry(true)),
            false,
            &mut errors,
        )
        .unwrap();
        assert_eq!(spec.handoff, Some(0.65));
        assert_eq!(spec.refine().aesthetic.positive, 6.0);
        assert_eq!(spec.refine().aesthetic.negative, 1.0);
    }
}
