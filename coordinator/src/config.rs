//! The coordinator's `kit.toml`, validated into a [`CoordinatorSettings`].

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use alveolus_proto::identity::{Identity, Role, validate_name};
use alveolus_proto::kit::{KIT_FILE, kit_role};
use serde::{Deserialize, Serialize};

/// The revocation list's file name, in the CA folder and in the coordinator's kit.
pub const CRL_FILE: &str = "revoked.crl.pem";

/// The roster's file name in the coordinator's kit.
pub const ROSTER_FILE: &str = "roster.toml";

/// Who was provisioned: the only site and admin names the coordinator takes, whatever else the
/// project CA may have signed. `provision` writes it, `provision --add-site` extends it, and a
/// running coordinator re-reads it when it changes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Roster {
    pub sites: BTreeSet<String>,
    pub admins: BTreeSet<String>,
}

impl Roster {
    /// Whether `identity` was provisioned (the coordinator's own is not a caller).
    pub fn admits(&self, identity: &Identity) -> bool {
        match identity.role {
            Role::Site => self.sites.contains(&identity.name),
            Role::Admin => self.admins.contains(&identity.name),
            Role::Coordinator => false,
        }
    }

    /// The roster at `path`; `None` if there is none (a kit provisioned before rosters).
    pub fn read(path: &Path) -> Result<Option<Self>, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        toml::from_str(&text)
            .map(Some)
            .map_err(|e| ConfigError::Invalid {
                path: path.to_path_buf(),
                message: e.to_string(),
            })
    }

    pub fn to_toml(&self) -> String {
        format!(
            "# The names provisioned for this project: the coordinator refuses any other, even with a\n\
             # certificate of the project CA. `alveolus provision --add-site` extends it.\n{}",
            toml::to_string_pretty(self).expect("names serialise")
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorKitConfig {
    pub project: String,
    /// Always `coordinator`; guards against starting a coordinator from a site kit.
    pub role: Role,
    /// Address to listen on; agents reach it as the `coordinator` of their kits.
    pub listen: String,
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CRL signed by the project CA (`alveolus revoke` rewrites it); re-read when it changes.
    pub revocation_list: PathBuf,
    /// Where checkpoints and run logs live, relative to the kit; `--state` overrides it.
    pub state_dir: PathBuf,
    /// Largest model or update accepted, in bytes.
    #[serde(default = "default_max_model_bytes")]
    pub max_model_bytes: u64,
    /// How many updates may be received at once; each holds one model-sized buffer until its
    /// digest is checked, so this bounds memory at `upload_slots x model size`.
    #[serde(default = "default_upload_slots")]
    pub upload_slots: usize,
    /// The names provisioned ([`Roster`]); re-read when it changes. Without the file (a kit
    /// provisioned before rosters) any certificate of the project CA is taken, with a warning.
    #[serde(default = "default_roster")]
    pub roster: PathBuf,
}

fn default_roster() -> PathBuf {
    ROSTER_FILE.into()
}

fn default_max_model_bytes() -> u64 {
    1 << 30
}

fn default_upload_slots() -> usize {
    2
}

impl CoordinatorKitConfig {
    pub fn new(project: &str, listen: String) -> Self {
        Self {
            project: project.to_string(),
            role: Role::Coordinator,
            listen,
            ca_cert: "ca.pem".into(),
            cert: "cert.pem".into(),
            key: "key.pem".into(),
            revocation_list: CRL_FILE.into(),
            state_dir: "state".into(),
            max_model_bytes: default_max_model_bytes(),
            upload_slots: default_upload_slots(),
            roster: default_roster(),
        }
    }
}

/// Everything the coordinator needs, resolved and read.
#[derive(Debug, Clone)]
pub struct CoordinatorSettings {
    pub project: String,
    pub listen: String,
    pub ca_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// Where `cert_pem` and `key_pem` were read: a renewed certificate is picked up from there
    /// without a restart.
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub revocation_list: PathBuf,
    pub roster: PathBuf,
    pub state_dir: PathBuf,
    pub max_model_bytes: u64,
    pub upload_slots: usize,
    /// Longest a NextTask call is held open.
    pub max_long_poll: Duration,
    /// Longest a TLS handshake may take before the connection is dropped.
    pub handshake_timeout: Duration,
}

impl CoordinatorSettings {
    pub fn load(kit_dir: &Path, state_override: Option<&Path>) -> Result<Self, ConfigError> {
        let path = kit_dir.join(KIT_FILE);
        let read = |p: &Path| {
            std::fs::read(p).map_err(|source| ConfigError::Read {
                path: p.to_path_buf(),
                source,
            })
        };
        let invalid = |message: String| ConfigError::Invalid {
            path: path.clone(),
            message,
        };
        let text = String::from_utf8(read(&path)?).map_err(|_| invalid("not UTF-8".into()))?;
        let role = kit_role(&text).map_err(|e| invalid(e.to_string()))?;
        if role != Role::Coordinator {
            return Err(invalid(format!(
                "this is a {role} kit; the coordinator needs the kit in the project's coordinator/ folder"
            )));
        }
        let config: CoordinatorKitConfig =
            toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        validate_name(&config.project).map_err(|e| invalid(e.to_string()))?;
        if config.upload_slots == 0 {
            return Err(invalid("upload_slots must be at least 1".into()));
        }
        Ok(Self {
            ca_pem: read(&kit_dir.join(&config.ca_cert))?,
            cert_pem: read(&kit_dir.join(&config.cert))?,
            key_pem: read(&kit_dir.join(&config.key))?,
            cert_path: kit_dir.join(&config.cert),
            key_path: kit_dir.join(&config.key),
            revocation_list: kit_dir.join(&config.revocation_list),
            roster: kit_dir.join(&config.roster),
            state_dir: state_override
                .map(Path::to_path_buf)
                .unwrap_or_else(|| kit_dir.join(&config.state_dir)),
            project: config.project,
            listen: config.listen,
            max_model_bytes: config.max_model_bytes,
            upload_slots: config.upload_slots,
            max_long_poll: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
        })
    }
}
