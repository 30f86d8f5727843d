//! The state folder's files as they are on disk: a compatibility promise of their own, apart
//! from the domain types, so that renaming a domain field cannot make a coordinator refuse its
//! own state after an upgrade.
//!
//! Every file carries `"format": "1"`. Files without a `format` are format 0, written before
//! formats were tagged: the same fields, so they read as format 1's body. A file of a format
//! this coordinator does not know is refused with a message naming it, never misread.
//!
//! Every stored domain type has its mirror here, field for field, with both conversions, and
//! the tests that pin each file's shape; a run's configuration, the largest, is in `config`.

use alveolus_proto::domain::{
    ClassDice, CrossSiteValidation, LocalModel, Metrics, RoundSummary, RunInfo, RunState, SiteInfo,
    SiteReport, SiteValidation, Validation,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::Manifest;

mod config;

use self::config::{AggregationV1, ConfigV1, PrivacyV1, SecureV1, StrategyV1};

/// The format this coordinator writes.
pub const FORMAT: &str = "1";

/// A file's JSON: format 1's body tagged with its format.
pub fn encode<T: Serialize>(body: &T) -> Vec<u8> {
    #[derive(Serialize)]
    struct Tagged<'a, T> {
        format: &'static str,
        #[serde(flatten)]
        body: &'a T,
    }
    serde_json::to_vec_pretty(&Tagged {
        format: FORMAT,
        body,
    })
    .expect("state files serialise")
}

/// A file's body, whatever format (0 or 1) it was written in.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FormatError> {
    let unreadable = |e: serde_json::Error| FormatError::Unreadable(e.to_string());
    let mut value: serde_json::Value = serde_json::from_slice(bytes).map_err(unreadable)?;
    if let Some(object) = value.as_object_mut()
        && let Some(format) = object.remove("format")
    {
        match format.as_str() {
            Some(FORMAT) => {}
            _ => return Err(FormatError::Newer(format.to_string())),
        }
    }
    serde_json::from_value(value).map_err(unreadable)
}

/// Why a state file does not read.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// Written by a newer release: kept as it is and never misread; the coordinator refuses
    /// to start on it rather than lose it.
    #[error(
        "written in state format {0} by a newer Alveolus; this one reads formats 0 and {FORMAT}"
    )]
    Newer(String),
    /// Not a state file of any format (damaged, empty, or not ours).
    #[error("{0}")]
    Unreadable(String),
}

/// `sites.json`: format 0 was a bare array.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
pub enum SitesFile {
    Tagged { sites: Vec<SiteV1> },
    Bare(Vec<SiteV1>),
}

impl SitesFile {
    pub fn into_sites(self) -> Vec<SiteInfo> {
        let (SitesFile::Tagged { sites } | SitesFile::Bare(sites)) = self;
        sites.into_iter().map(Into::into).collect()
    }
}

#[derive(Serialize, Deserialize)]
pub struct RunV1 {
    run_id: String,
    state: StateV1,
    config: ConfigV1,
    initial_version: String,
    rounds: Vec<RoundV1>,
    reported: Vec<String>,
    started_unix_ms: i64,
    #[serde(default)]
    stop_reason: Option<String>,
    /// Added within format 1: cross-site evaluation's local models, by site, and their
    /// validation at each site.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    local_models: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    cross_site: Vec<CrossSiteV1>,
}

/// A site's local model as measured at a site (`validation.site`).
#[derive(Serialize, Deserialize)]
struct CrossSiteV1 {
    model_of: String,
    model_version: String,
    validation: SiteValidationV1,
}

#[derive(Serialize, Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum StateV1 {
    Running,
    Completed,
    Aborted,
    Failed,
}

#[derive(Serialize, Deserialize)]
struct RoundV1 {
    round: u32,
    version: String,
    sites: Vec<String>,
    samples: u64,
    loss: f64,
    dice: f64,
    finished_unix_ms: i64,
    #[serde(default)]
    epsilon: Option<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    site_reports: Vec<SiteReportV1>,
    /// Added within format 1, as `site_reports`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    validation: Vec<SiteValidationV1>,
}

/// A site's validation of a round's model.
#[derive(Serialize, Deserialize)]
struct SiteValidationV1 {
    site: String,
    cases: u32,
    #[serde(default)]
    infection_dice: Option<f64>,
    /// Class name and Dice, in the model's order.
    #[serde(default)]
    classes: Vec<(String, Option<f64>)>,
}

impl From<&SiteValidation> for SiteValidationV1 {
    fn from(v: &SiteValidation) -> Self {
        Self {
            site: v.site.clone(),
            cases: v.validation.cases,
            infection_dice: v.validation.infection_dice,
            classes: v
                .validation
                .classes
                .iter()
                .map(|c| (c.class.clone(), c.dice))
                .collect(),
        }
    }
}

impl From<SiteValidationV1> for SiteValidation {
    fn from(v: SiteValidationV1) -> Self {
        Self {
            site: v.site,
            validation: Validation {
                cases: v.cases,
                infection_dice: v.infection_dice,
                classes: v
                    .classes
                    .into_iter()
                    .map(|(class, dice)| ClassDice { class, dice })
                    .collect(),
            },
        }
    }
}

#[derive(Serialize, Deserialize)]
struct SiteReportV1 {
    site: String,
    samples: u64,
    loss: f64,
    dice: f64,
    #[serde(default)]
    train_seconds: Option<f64>,
    bytes: u64,
}

#[derive(Serialize, Deserialize)]
pub struct SiteV1 {
    name: String,
    last_contact_unix_ms: i64,
    contributions: Vec<(String, Vec<u32>)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    certificate_expires_unix: Option<i64>,
}

#[derive(Serialize, Deserialize)]
pub struct ManifestV1 {
    sha256: String,
    bytes: u64,
    run_id: String,
    round: u32,
    parent: Option<String>,
    sites: Vec<String>,
    samples: u64,
    metrics: Option<MetricsV1>,
    created_unix_ms: i64,
    #[serde(default)]
    aggregation: Option<AggregationV1>,
    #[serde(default)]
    privacy: Option<PrivacyV1>,
    #[serde(default)]
    secure_aggregation: Option<SecureV1>,
    #[serde(default)]
    epsilon: Option<f64>,
    /// Added within format 1: absent (and left out of the check) when the run is FedAvg at a
    /// constant rate, so earlier manifests verify as they did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    strategy: Option<StrategyV1>,
    /// Added within format 1, as `strategy`: the model is this site's last local model
    /// (cross-site evaluation), not a global checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    local_of: Option<String>,
    /// sha256 of the other fields: an edited or damaged manifest is refused, not served.
    /// Manifests written before it existed have none and are checked against their model only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    check: Option<String>,
}

/// A manifest as a client receives it with its model: the sealed file's fields and, beside
/// them and outside the check, what the sites have measured of the model since it was made
/// (a model is sealed before any site has seen it).
#[derive(Serialize)]
pub struct ServedManifestV1<'a> {
    #[serde(flatten)]
    manifest: ManifestV1,
    /// Each site's Dice on its own validation cases, as `run status --json` has them.
    validation: &'a [SiteValidation],
}

impl<'a> ServedManifestV1<'a> {
    pub fn new(m: &Manifest, validation: &'a [SiteValidation]) -> Self {
        Self {
            manifest: ManifestV1::sealed(m),
            validation,
        }
    }
}

impl ManifestV1 {
    /// The manifest of `m` as it is written, with its check.
    pub fn sealed(m: &Manifest) -> Self {
        let mut file = Self::from(m);
        file.check = Some(file.digest());
        file
    }

    /// The digest of every field but the check, over the compact JSON of the fields as read
    /// (floats read back exactly: serde_json's `float_roundtrip`).
    fn digest(&self) -> String {
        let mut value = serde_json::to_value(self).expect("manifests serialise");
        if let Some(object) = value.as_object_mut() {
            object.remove("check");
        }
        alveolus_proto::sha256_hex(&serde_json::to_vec(&value).expect("manifests serialise"))
    }

    /// Whether this is, unaltered, the manifest of the checkpoint `version` of `bytes` bytes.
    pub fn verify(&self, version: &str, bytes: u64) -> Result<(), String> {
        if self.sha256 != version || self.bytes != bytes {
            return Err(format!(
                "describes another checkpoint ({}, {} bytes), not this one",
                self.sha256, self.bytes
            ));
        }
        match &self.check {
            Some(check) if *check != self.digest() => Err(
                "has been changed since it was written (its check does not match its fields)"
                    .into(),
            ),
            _ => Ok(()),
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy)]
struct MetricsV1 {
    loss: f64,
    dice: f64,
}

// ---- between the files and the domain ----

impl From<&RunInfo> for RunV1 {
    fn from(r: &RunInfo) -> Self {
        Self {
            run_id: r.run_id.clone(),
            state: r.state.into(),
            config: (&r.config).into(),
            initial_version: r.initial_version.clone(),
            rounds: r.rounds.iter().map(Into::into).collect(),
            reported: r.reported.clone(),
            started_unix_ms: r.started_unix_ms,
            stop_reason: r.stop_reason.clone(),
            local_models: r
                .local_models
                .iter()
                .map(|m| (m.site.clone(), m.version.clone()))
                .collect(),
            cross_site: r
                .cross_site
                .iter()
                .map(|c| CrossSiteV1 {
                    model_of: c.model_of.clone(),
                    model_version: c.model_version.clone(),
                    validation: (&c.validation).into(),
                })
                .collect(),
        }
    }
}

impl From<RunV1> for RunInfo {
    fn from(r: RunV1) -> Self {
        Self {
            run_id: r.run_id,
            state: r.state.into(),
            config: r.config.into(),
            initial_version: r.initial_version,
            rounds: r.rounds.into_iter().map(Into::into).collect(),
            reported: r.reported,
            started_unix_ms: r.started_unix_ms,
            stop_reason: r.stop_reason,
            held_up: None,
            local_models: r
                .local_models
                .into_iter()
                .map(|(site, version)| LocalModel { site, version })
                .collect(),
            cross_site: r
                .cross_site
                .into_iter()
                .map(|c| CrossSiteValidation {
                    model_of: c.model_of,
                    model_version: c.model_version,
                    validation: c.validation.into(),
                })
                .collect(),
        }
    }
}

impl From<RunState> for StateV1 {
    fn from(s: RunState) -> Self {
        match s {
            RunState::Running => Self::Running,
            RunState::Completed => Self::Completed,
            RunState::Aborted => Self::Aborted,
            RunState::Failed => Self::Failed,
        }
    }
}

impl From<StateV1> for RunState {
    fn from(s: StateV1) -> Self {
        match s {
            StateV1::Running => Self::Running,
            StateV1::Completed => Self::Completed,
            StateV1::Aborted => Self::Aborted,
            StateV1::Failed => Self::Failed,
        }
    }
}

impl From<&RoundSummary> for RoundV1 {
    fn from(r: &RoundSummary) -> Self {
        Self {
            round: r.round,
            version: r.version.clone(),
            sites: r.sites.clone(),
            samples: r.samples,
            loss: r.loss,
            dice: r.dice,
            finished_unix_ms: r.finished_unix_ms,
            epsilon: r.epsilon,
            site_reports: r.site_reports.iter().map(Into::into).collect(),
            validation: r.validation.iter().map(Into::into).collect(),
        }
    }
}

impl From<&SiteReport> for SiteReportV1 {
    fn from(s: &SiteReport) -> Self {
        Self {
            site: s.site.clone(),
            samples: s.samples,
            loss: s.loss,
            dice: s.dice,
            train_seconds: s.train_seconds,
            bytes: s.bytes,
        }
    }
}

impl From<SiteReportV1> for SiteReport {
    fn from(s: SiteReportV1) -> Self {
        Self {
            site: s.site,
            samples: s.samples,
            loss: s.loss,
            dice: s.dice,
            train_seconds: s.train_seconds,
            bytes: s.bytes,
        }
    }
}

impl From<RoundV1> for RoundSummary {
    fn from(r: RoundV1) -> Self {
        Self {
            round: r.round,
            version: r.version,
            sites: r.sites,
            samples: r.samples,
            loss: r.loss,
            dice: r.dice,
            finished_unix_ms: r.finished_unix_ms,
            epsilon: r.epsilon,
            site_reports: r.site_reports.into_iter().map(Into::into).collect(),
            validation: r.validation.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<&SiteInfo> for SiteV1 {
    fn from(s: &SiteInfo) -> Self {
        Self {
            name: s.name.clone(),
            last_contact_unix_ms: s.last_contact_unix_ms,
            contributions: s.contributions.clone(),
            certificate_expires_unix: s.certificate_expires_unix,
        }
    }
}

impl From<SiteV1> for SiteInfo {
    fn from(s: SiteV1) -> Self {
        Self {
            name: s.name,
            last_contact_unix_ms: s.last_contact_unix_ms,
            contributions: s.contributions,
            certificate_expires_unix: s.certificate_expires_unix,
        }
    }
}

impl From<&Manifest> for ManifestV1 {
    fn from(m: &Manifest) -> Self {
        Self {
            sha256: m.sha256.clone(),
            bytes: m.bytes,
            run_id: m.run_id.clone(),
            round: m.round,
            parent: m.parent.clone(),
            sites: m.sites.clone(),
            samples: m.samples,
            metrics: m.metrics.map(|x| MetricsV1 {
                loss: x.loss,
                dice: x.dice,
            }),
            created_unix_ms: m.created_unix_ms,
            aggregation: m.aggregation.map(Into::into),
            privacy: m.privacy.as_ref().map(Into::into),
            secure_aggregation: m.secure_aggregation.map(Into::into),
            epsilon: m.epsilon,
            strategy: m.strategy.map(Into::into),
            local_of: m.local_of.clone(),
            check: None,
        }
    }
}

impl From<ManifestV1> for Manifest {
    fn from(m: ManifestV1) -> Self {
        Self {
            sha256: m.sha256,
            bytes: m.bytes,
            run_id: m.run_id,
            round: m.round,
            parent: m.parent,
            sites: m.sites,
            samples: m.samples,
            metrics: m.metrics.map(|x| Metrics {
                loss: x.loss,
                dice: x.dice,
            }),
            created_unix_ms: m.created_unix_ms,
            aggregation: m.aggregation.map(Into::into),
            privacy: m.privacy.map(Into::into),
            secure_aggregation: m.secure_aggregation.map(Into::into),
            epsilon: m.epsilon,
            strategy: m.strategy.map(Into::into),
            local_of: m.local_of,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_0_reads_and_unknown_formats_are_refused_by_name() {
        let body =
            br#"{"name": "a", "last_contact_unix_ms": 5, "contributions": [["run-1", [1, 2]]]}"#;
        let site: SiteInfo = decode::<SiteV1>(body).unwrap().into();
        assert_eq!(site.contributions, vec![("run-1".to_string(), vec![1, 2])]);
        let tagged = encode(&SiteV1::from(&site));
        assert!(String::from_utf8_lossy(&tagged).contains(r#""format": "1""#));
        let back: SiteInfo = decode::<SiteV1>(&tagged).unwrap().into();
        assert_eq!(back, site);
        let newer = br#"{"format": "2", "name": "a"}"#;
        let error = decode::<SiteV1>(newer).err().unwrap();
        assert!(
            error
                .to_string()
                .contains("state format \"2\" by a newer Alveolus"),
            "{error}"
        );
    }
}
