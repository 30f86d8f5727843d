//! The coordinator's state folder: a content-addressed model registry and the run log.
//!
//! ```text
//! models/<sha256>.safetensors   checkpoint bytes; the digest is the version
//! models/<sha256>.json          manifest: round, parent, contributing sites, metrics (sealed;
//!                               the sites' validation is served beside it from the run log)
//! runs/<run_id>.json            run config and every finished round
//! sites.json                    known sites, their last contact and contributions
//! ```
//! Every file is written atomically and fsynced before anything refers to it, in the versioned
//! format of [`format`] (files of the previous, untagged format still read).

pub mod format;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use alveolus_proto::domain::{
    AggregationConfig, Metrics, PrivacyConfig, RunInfo, SecureAggregationConfig, SiteInfo,
    SiteValidation, Strategy, validate_version,
};
use alveolus_proto::sha256_hex;
use bytes::Bytes;

use format::{FormatError, ManifestV1, RunV1, ServedManifestV1, SiteV1, SitesFile, decode, encode};

use crate::durable::write_atomic;
use crate::error::CoordinatorError;

/// What a checkpoint's manifest records about it.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    /// sha256 of the safetensors file: the model version.
    pub sha256: String,
    pub bytes: u64,
    pub run_id: String,
    /// 0 for a run's initial model.
    pub round: u32,
    /// The version this one was aggregated from; `None` for an initial model.
    pub parent: Option<String>,
    pub sites: Vec<String>,
    pub samples: u64,
    pub metrics: Option<Metrics>,
    pub created_unix_ms: i64,
    /// How the round's updates were combined, so whoever receives the model knows.
    pub aggregation: Option<AggregationConfig>,
    /// The run's differential-privacy settings; None: no DP guarantee.
    pub privacy: Option<PrivacyConfig>,
    /// Secure aggregation's settings; None: the coordinator saw each site's update.
    pub secure_aggregation: Option<SecureAggregationConfig>,
    /// ε the run had spent when this model was made, at `privacy.delta`.
    pub epsilon: Option<f64>,
    /// The run's schedule, server optimizer, FedProx and FedBN; None: FedAvg at a constant rate.
    pub strategy: Option<Strategy>,
    /// Cross-site evaluation: the model is this site's last local model (the last round's
    /// model plus its update), not a global checkpoint.
    pub local_of: Option<String>,
}

impl Manifest {
    /// The manifest as its file says it.
    pub fn to_json(&self) -> String {
        String::from_utf8(encode(&ManifestV1::sealed(self))).expect("JSON is UTF-8")
    }

    /// The manifest as a client receives it with the model: its file's fields and, outside
    /// its check, `validation`: what the sites have measured of the model so far.
    pub fn served_json(&self, validation: &[SiteValidation]) -> String {
        String::from_utf8(encode(&ServedManifestV1::new(self, validation))).expect("JSON is UTF-8")
    }
}

#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    /// The model read last, with its manifest: every site pulls the same version in a round,
    /// and each pull then shares these bytes instead of reading and hashing its own copy.
    last_read: Arc<Mutex<Option<(Bytes, Manifest)>>>,
}

fn store_err(path: &Path, e: impl std::fmt::Display) -> CoordinatorError {
    CoordinatorError::Store(format!("{}: {e}", path.display()))
}

impl Store {
    pub fn open(root: &Path) -> Result<Self, CoordinatorError> {
        for sub in ["models", "runs"] {
            let dir = root.join(sub);
            std::fs::create_dir_all(&dir).map_err(|e| store_err(&dir, e))?;
        }
        Ok(Self {
            root: root.to_path_buf(),
            last_read: Arc::default(),
        })
    }

    pub fn model_path(&self, version: &str) -> PathBuf {
        self.root
            .join("models")
            .join(format!("{version}.safetensors"))
    }

    pub fn manifest_path(&self, version: &str) -> PathBuf {
        self.root.join("models").join(format!("{version}.json"))
    }

    /// Writes a checkpoint and its manifest durably; returns the version.
    pub fn put_model(
        &self,
        bytes: &[u8],
        mut manifest: Manifest,
    ) -> Result<Manifest, CoordinatorError> {
        let version = sha256_hex(bytes);
        manifest.sha256 = version.clone();
        manifest.bytes = bytes.len() as u64;
        // Content-addressed: the same bytes made again (a round that changed nothing, two runs
        // that agree) keep the manifest written first, so that no version's lineage is ever
        // rewritten. Each run's own account of the round is in its run log.
        if self.manifest_path(&version).exists() && self.read_model(&version).is_ok() {
            return Ok(manifest);
        }
        let path = self.model_path(&version);
        write_atomic(&path, bytes, false).map_err(|e| store_err(&path, e))?;
        let path = self.manifest_path(&version);
        write_atomic(&path, manifest.to_json().as_bytes(), false)
            .map_err(|e| store_err(&path, e))?;
        Ok(manifest)
    }

    /// A checkpoint's bytes, checked against its version, and its manifest.
    pub fn get_model(&self, version: &str) -> Result<(Bytes, Manifest), CoordinatorError> {
        validate_version(version)
            .map_err(|_| CoordinatorError::UnknownVersion(version.to_string()))?;
        if let Some(last) = self.last_read.lock().expect("model cache lock").as_ref()
            && last.1.sha256 == version
        {
            return Ok(last.clone());
        }
        let read = self.read_model(version)?;
        *self.last_read.lock().expect("model cache lock") = Some(read.clone());
        Ok(read)
    }

    fn read_model(&self, version: &str) -> Result<(Bytes, Manifest), CoordinatorError> {
        let path = self.model_path(version);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CoordinatorError::UnknownVersion(version.to_string()));
            }
            Err(e) => return Err(store_err(&path, e)),
        };
        if sha256_hex(&bytes) != version {
            return Err(store_err(
                &path,
                "content does not match its digest (disk corruption?)",
            ));
        }
        let path = self.manifest_path(version);
        let manifest = std::fs::read(&path).map_err(|e| store_err(&path, e))?;
        let manifest = decode::<ManifestV1>(&manifest).map_err(|e| store_err(&path, e))?;
        manifest
            .verify(version, bytes.len() as u64)
            .map_err(|e| store_err(&path, e))?;
        Ok((Bytes::from(bytes), manifest.into()))
    }

    /// Where the server optimizer's moments after `round` of `run_id` are kept.
    fn optimizer_path(&self, run_id: &str, round: u32) -> PathBuf {
        self.root
            .join("optimizer")
            .join(format!("{run_id}-round{round:05}.safetensors"))
    }

    /// Writes the server optimizer's moments after `round`, durably (before the round's run log
    /// entry), and removes those of two rounds before: the round before stays, for a round that
    /// is written again after a failed write.
    pub fn put_optimizer_state(
        &self,
        run_id: &str,
        round: u32,
        bytes: &[u8],
    ) -> Result<(), CoordinatorError> {
        let path = self.optimizer_path(run_id, round);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| store_err(dir, e))?;
        }
        write_atomic(&path, bytes, false).map_err(|e| store_err(&path, e))?;
        if round > 2 {
            let _ = std::fs::remove_file(self.optimizer_path(run_id, round - 2));
        }
        Ok(())
    }

    /// The server optimizer's moments after `round`, as [`Store::put_optimizer_state`] wrote
    /// them.
    pub fn optimizer_state(&self, run_id: &str, round: u32) -> Result<Vec<u8>, CoordinatorError> {
        let path = self.optimizer_path(run_id, round);
        std::fs::read(&path).map_err(|e| store_err(&path, e))
    }

    pub fn put_run(&self, run: &RunInfo) -> Result<(), CoordinatorError> {
        let path = self.root.join("runs").join(format!("{}.json", run.run_id));
        write_atomic(&path, &encode(&RunV1::from(run)), false).map_err(|e| store_err(&path, e))
    }

    /// Every run in the log, oldest first. A file that is not a run log (damaged, empty, or
    /// not ours) is moved to `quarantine/` and said so; one of a newer format stops the start.
    pub fn load_runs(&self) -> Result<Vec<RunInfo>, CoordinatorError> {
        let dir = self.root.join("runs");
        let mut runs = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(|e| store_err(&dir, e))? {
            let path = entry.map_err(|e| store_err(&dir, e))?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let read = std::fs::read(&path)
                .map_err(|e| FormatError::Unreadable(e.to_string()))
                .and_then(|bytes| decode::<RunV1>(&bytes));
            match read {
                Ok(run) => runs.push(RunInfo::from(run)),
                Err(e @ FormatError::Newer(_)) => return Err(store_err(&path, e)),
                Err(FormatError::Unreadable(reason)) => self.quarantine(&path, &reason)?,
            }
        }
        runs.sort_by(|a, b| (a.started_unix_ms, &a.run_id).cmp(&(b.started_unix_ms, &b.run_id)));
        Ok(runs)
    }

    /// Where a run can go on from: its log with the rounds whose checkpoints still read (a
    /// damaged newest checkpoint gives the round before it, down to the initial model), and that
    /// checkpoint's bytes. `None` when not even the initial model reads.
    pub fn resume_point(&self, info: &RunInfo) -> Option<(RunInfo, Bytes)> {
        let mut info = info.clone();
        loop {
            let version = info.latest_version().to_string();
            match self.get_model(&version) {
                Ok((bytes, _)) => return Some((info, bytes)),
                Err(e) => {
                    tracing::warn!(run = %info.run_id, %version, "checkpoint does not read: {e}");
                    info.rounds.pop()?;
                }
            }
        }
    }

    /// Moves a state file that does not read out of the way, into `quarantine/` under a name
    /// that keeps every earlier one, so that nothing is lost and nothing reuses its name.
    pub fn quarantine(&self, path: &Path, reason: &str) -> Result<(), CoordinatorError> {
        let dir = self.root.join("quarantine");
        std::fs::create_dir_all(&dir).map_err(|e| store_err(&dir, e))?;
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let target = dir.join(format!("{}.{name}", crate::clock::unix_ms()));
        std::fs::rename(path, &target).map_err(|e| store_err(path, e))?;
        tracing::warn!(
            file = %path.display(),
            moved_to = %target.display(),
            "state file quarantined: {reason}"
        );
        Ok(())
    }

    pub fn put_sites(&self, sites: &[SiteInfo]) -> Result<(), CoordinatorError> {
        let path = self.root.join("sites.json");
        let file = SitesFile::Tagged {
            sites: sites.iter().map(SiteV1::from).collect(),
        };
        write_atomic(&path, &encode(&file), false).map_err(|e| store_err(&path, e))
    }

    /// The known sites. The list is only a record of contacts, rebuilt as sites call: one that
    /// does not read is quarantined and the coordinator starts with none.
    pub fn load_sites(&self) -> Result<Vec<SiteInfo>, CoordinatorError> {
        let path = self.root.join("sites.json");
        let read = match std::fs::read(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            read => read
                .map_err(|e| FormatError::Unreadable(e.to_string()))
                .and_then(|bytes| decode::<SitesFile>(&bytes)),
        };
        match read {
            Ok(file) => Ok(file.into_sites()),
            Err(e @ FormatError::Newer(_)) => Err(store_err(&path, e)),
            Err(FormatError::Unreadable(reason)) => {
                self.quarantine(&path, &reason)?;
                Ok(Vec::new())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(run_id: &str, round: u32, parent: Option<&str>) -> Manifest {
        Manifest {
            sha256: String::new(),
            bytes: 0,
            run_id: run_id.into(),
            round,
            parent: parent.map(str::to_string),
            sites: vec![],
            samples: 0,
            metrics: None,
            created_unix_ms: 0,
            aggregation: None,
            privacy: None,
            secure_aggregation: None,
            epsilon: None,
            strategy: None,
            local_of: None,
        }
    }

    #[test]
    fn the_same_bytes_again_keep_their_first_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let first = store
            .put_model(b"model", manifest("run-1", 0, None))
            .unwrap();
        // A round that changed nothing makes its base's bytes again, and a later run the same.
        let again = store
            .put_model(b"model", manifest("run-1", 1, Some(&first.sha256)))
            .unwrap();
        assert_eq!(again.sha256, first.sha256);
        store
            .put_model(b"model", manifest("run-2", 3, None))
            .unwrap();
        let reopened = Store::open(dir.path()).unwrap();
        let (_, stored) = reopened.get_model(&first.sha256).unwrap();
        assert_eq!((stored.run_id.as_str(), stored.round), ("run-1", 0));
        assert_eq!(stored.parent, None);
    }

    #[test]
    fn an_edited_manifest_is_refused_and_an_unchecked_one_still_reads() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut written = manifest("run-1", 4, Some(&"a".repeat(64)));
        // Floats that print long: the check must survive their trip through the file.
        written.metrics = Some(Metrics {
            loss: 0.1 + 0.2,
            dice: 1.0 / 3.0,
        });
        written.epsilon = Some(f64::MIN_POSITIVE * 3.7);
        let version = store.put_model(b"weights", written).unwrap().sha256;
        let (_, read) = Store::open(dir.path())
            .unwrap()
            .get_model(&version)
            .unwrap();
        assert_eq!(read.metrics.unwrap().loss, 0.1 + 0.2);

        let path = store.manifest_path(&version);
        let file = std::fs::read_to_string(&path).unwrap();
        let edited = file.replace("\"round\": 4", "\"round\": 5");
        assert_ne!(edited, file);
        std::fs::write(&path, &edited).unwrap();
        let err = Store::open(dir.path())
            .unwrap()
            .get_model(&version)
            .unwrap_err()
            .to_string();
        assert!(err.contains("changed since it was written"), "{err}");

        // One written before manifests had a check reads, as long as it names its model.
        let mut unchecked: serde_json::Value = serde_json::from_str(&file).unwrap();
        unchecked.as_object_mut().unwrap().remove("check").unwrap();
        std::fs::write(&path, unchecked.to_string()).unwrap();
        assert!(Store::open(dir.path()).unwrap().get_model(&version).is_ok());
        unchecked["bytes"] = 3.into();
        std::fs::write(&path, unchecked.to_string()).unwrap();
        let err = Store::open(dir.path())
            .unwrap()
            .get_model(&version)
            .unwrap_err()
            .to_string();
        assert!(err.contains("describes another checkpoint"), "{err}");
    }
}
