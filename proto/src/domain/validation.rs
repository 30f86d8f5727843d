//! Evaluation at the sites: the task to measure a finished round's global model on a site's
//! validation cases, what the site reports back (Dice per class and the case count, nothing
//! else), and the record the coordinator keeps of it with the round.

use serde::{Deserialize, Serialize};

use super::{DomainError, MAX_SAMPLES, invalid, validate_version};
use crate::pb;

/// Measure the model round `round` made on the site's validation cases.
#[derive(Debug, Clone, PartialEq)]
pub struct EvaluateTask {
    pub run_id: String,
    pub round: u32,
    pub model_version: String,
    /// FedBN: the model is measured with the site's own normalisation layers, as it is used
    /// there; the global model's are the initial ones.
    pub site_normalisation: bool,
    /// Cross-site evaluation: the model is this site's last local model; None: the global one.
    pub model_of: Option<String>,
}

/// Cross-site evaluation: a site's last local model, kept in the registry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LocalModel {
    pub site: String,
    pub version: String,
}

/// Cross-site evaluation: the local model of `model_of` as measured at `validation.site`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CrossSiteValidation {
    pub model_of: String,
    pub model_version: String,
    pub validation: SiteValidation,
}

/// Dice of one class on a site's validation cases; None where neither the model nor the
/// labels have the class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassDice {
    pub class: String,
    pub dice: Option<f64>,
}

/// What a site measured of a global model: all that leaves it of its validation cases.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Validation {
    /// Validation cases measured; 0: the site has none, and there is no Dice.
    pub cases: u32,
    /// Dice of the lesion classes merged, the figure researchers compare first.
    pub infection_dice: Option<f64>,
    /// Every class but background, in the model's order.
    pub classes: Vec<ClassDice>,
}

/// A site's report on an evaluate task.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidationReport {
    pub run_id: String,
    pub round: u32,
    pub model_version: String,
    pub validation: Validation,
}

/// One site's validation of a round's model, as the run log keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteValidation {
    /// From the site's certificate, never from the report.
    pub site: String,
    #[serde(flatten)]
    pub validation: Validation,
}

/// More classes than any class scheme has; keeps a report small.
pub const MAX_CLASSES: usize = 16;
/// Class names are the model's own (`ggo`, `consolidation`); they are printed, so short and
/// printable.
pub const MAX_CLASS_NAME: usize = 32;

impl Validation {
    /// The class's Dice, by name.
    pub fn dice_of(&self, class: &str) -> Option<f64> {
        self.classes
            .iter()
            .find(|c| c.class == class)
            .and_then(|c| c.dice)
    }
}

fn check_dice(field: &'static str, dice: Option<f64>) -> Result<Option<f64>, DomainError> {
    match dice {
        Some(d) if !(0.0..=1.0).contains(&d) => {
            Err(invalid(field, format!("{d} is not in [0, 1]")))
        }
        d => Ok(d),
    }
}

fn validation_from_pb(
    cases: u32,
    infection_dice: Option<f64>,
    classes: Vec<pb::ClassDice>,
) -> Result<Validation, DomainError> {
    if u64::from(cases) > MAX_SAMPLES {
        return Err(invalid("cases", format!("{cases} is above {MAX_SAMPLES}")));
    }
    if classes.len() > MAX_CLASSES {
        return Err(invalid(
            "classes",
            format!("{} classes, more than {MAX_CLASSES}", classes.len()),
        ));
    }
    let infection_dice = check_dice("infection_dice", infection_dice)?;
    let classes = classes
        .into_iter()
        .map(|c| {
            if c.class_name.is_empty()
                || c.class_name.len() > MAX_CLASS_NAME
                || !c.class_name.chars().all(|ch| ch.is_ascii_graphic())
            {
                return Err(invalid(
                    "classes.class_name",
                    format!(
                        "{:?} is not a class name (1 to {MAX_CLASS_NAME} printable ASCII characters)",
                        c.class_name.chars().take(MAX_CLASS_NAME).collect::<String>()
                    ),
                ));
            }
            Ok(ClassDice {
                dice: check_dice("classes.dice", c.dice)?,
                class: c.class_name,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if cases == 0 && (infection_dice.is_some() || classes.iter().any(|c| c.dice.is_some())) {
        return Err(invalid("cases", "Dice without a validation case"));
    }
    Ok(Validation {
        cases,
        infection_dice,
        classes,
    })
}

impl From<ClassDice> for pb::ClassDice {
    fn from(c: ClassDice) -> Self {
        Self {
            class_name: c.class,
            dice: c.dice,
        }
    }
}

/// Unchecked: for records the coordinator checked when they arrived
/// (`validation_from_pb` checks a site's).
impl From<pb::ClassDice> for ClassDice {
    fn from(c: pb::ClassDice) -> Self {
        Self {
            class: c.class_name,
            dice: c.dice,
        }
    }
}

impl From<EvaluateTask> for pb::EvaluateTask {
    fn from(t: EvaluateTask) -> Self {
        Self {
            run_id: t.run_id,
            round: t.round,
            model_version: t.model_version,
            site_normalisation: t.site_normalisation,
            model_of: t.model_of.unwrap_or_default(),
        }
    }
}

impl TryFrom<pb::EvaluateTask> for EvaluateTask {
    type Error = DomainError;
    fn try_from(t: pb::EvaluateTask) -> Result<Self, DomainError> {
        validate_version(&t.model_version)?;
        Ok(Self {
            run_id: t.run_id,
            round: t.round,
            model_version: t.model_version,
            site_normalisation: t.site_normalisation,
            model_of: (!t.model_of.is_empty()).then_some(t.model_of),
        })
    }
}

impl From<ValidationReport> for pb::ValidationReport {
    fn from(r: ValidationReport) -> Self {
        Self {
            run_id: r.run_id,
            round: r.round,
            model_version: r.model_version,
            cases: r.validation.cases,
            infection_dice: r.validation.infection_dice,
            classes: r.validation.classes.into_iter().map(Into::into).collect(),
        }
    }
}

impl TryFrom<pb::ValidationReport> for ValidationReport {
    type Error = DomainError;
    fn try_from(r: pb::ValidationReport) -> Result<Self, DomainError> {
        validate_version(&r.model_version)?;
        Ok(Self {
            run_id: r.run_id,
            round: r.round,
            model_version: r.model_version,
            validation: validation_from_pb(r.cases, r.infection_dice, r.classes)?,
        })
    }
}

impl From<SiteValidation> for pb::SiteValidation {
    fn from(v: SiteValidation) -> Self {
        Self {
            site: v.site,
            cases: v.validation.cases,
            infection_dice: v.validation.infection_dice,
            classes: v.validation.classes.into_iter().map(Into::into).collect(),
        }
    }
}

/// The coordinator's record, as its admin clients read it (checked when it arrived).
impl From<pb::SiteValidation> for SiteValidation {
    fn from(v: pb::SiteValidation) -> Self {
        Self {
            site: v.site,
            validation: Validation {
                cases: v.cases,
                infection_dice: v.infection_dice,
                classes: v.classes.into_iter().map(Into::into).collect(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(
        cases: u32,
        infection: Option<f64>,
        classes: &[(&str, Option<f64>)],
    ) -> pb::ValidationReport {
        pb::ValidationReport {
            run_id: "run-1".into(),
            round: 3,
            model_version: "b".repeat(64),
            cases,
            infection_dice: infection,
            classes: classes
                .iter()
                .map(|(name, dice)| pb::ClassDice {
                    class_name: name.to_string(),
                    dice: *dice,
                })
                .collect(),
        }
    }

    #[test]
    fn a_report_is_dice_in_range_under_short_printable_class_names() {
        let good = ValidationReport::try_from(report(
            4,
            Some(0.7),
            &[("ggo", Some(0.65)), ("consolidation", None)],
        ))
        .unwrap();
        assert_eq!(good.validation.dice_of("ggo"), Some(0.65));
        assert_eq!(good.validation.dice_of("consolidation"), None);
        let back = ValidationReport::try_from(pb::ValidationReport::from(good.clone())).unwrap();
        assert_eq!(back, good, "the wire form keeps everything");
        assert!(ValidationReport::try_from(report(0, None, &[("ggo", None)])).is_ok());
        let long = "g".repeat(MAX_CLASS_NAME + 1);
        let many: Vec<(&str, Option<f64>)> = vec![("ggo", None); MAX_CLASSES + 1];
        for (what, bad) in [
            ("Dice above 1", report(4, Some(1.5), &[])),
            ("negative Dice", report(4, None, &[("ggo", Some(-0.1))])),
            ("NaN", report(4, Some(f64::NAN), &[])),
            (
                "a newline in a name",
                report(4, None, &[("ggo\nERROR", None)]),
            ),
            ("an empty name", report(4, None, &[("", None)])),
            ("a long name", report(4, None, &[(long.as_str(), None)])),
            ("too many classes", report(4, None, &many)),
            ("Dice without cases", report(0, Some(0.5), &[])),
        ] {
            assert!(ValidationReport::try_from(bad).is_err(), "{what}");
        }
        let mut bad = report(1, None, &[]);
        bad.model_version = "latest".into();
        assert!(ValidationReport::try_from(bad).is_err(), "a version");
    }
}
