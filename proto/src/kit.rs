//! Startup kits of sites and admins: a folder with `kit.toml`, the identity's certificate and
//! key, and the project CA, written by `alveolus provision`. Loading a kit gives a mutual-TLS
//! channel to the coordinator.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity as TlsIdentity};

use crate::identity::{Identity, Role};

/// Name of the config file inside every kit folder.
pub const KIT_FILE: &str = "kit.toml";

#[derive(Debug, thiserror::Error)]
pub enum KitError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid kit config: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("cannot connect to the coordinator at {address}: {message}")]
    Connect { address: String, message: String },
}

/// `kit.toml` of a site or admin kit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientKitConfig {
    /// The project this identity belongs to; must match the certificate.
    pub project: String,
    /// What the certificate allows: `site` or `admin`.
    pub role: Role,
    /// The identity's name, as in the certificate (the coordinator reads it from there).
    pub name: String,
    /// `HOST:PORT` the agent or CLI dials; connections are always outbound from here.
    pub coordinator: String,
    /// Name the coordinator's certificate must carry; the host of `coordinator` by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// Project CA, the only authority trusted for the coordinator's certificate.
    pub ca_cert: PathBuf,
    /// This identity's certificate and key, presented to the coordinator.
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A loaded kit: its config and the PEM material it points to.
#[derive(Debug, Clone)]
pub struct ClientKit {
    pub config: ClientKitConfig,
    pub identity: Identity,
    /// Folder the kit was read from; relative paths in the config are resolved against it.
    pub dir: PathBuf,
    ca_pem: Vec<u8>,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

fn read(path: &Path) -> Result<Vec<u8>, KitError> {
    std::fs::read(path).map_err(|source| KitError::Read {
        path: path.to_path_buf(),
        source,
    })
}

impl ClientKit {
    pub fn load(dir: &Path) -> Result<Self, KitError> {
        let path = dir.join(KIT_FILE);
        let text = String::from_utf8(read(&path)?).map_err(|_| KitError::Parse {
            path: path.clone(),
            message: "not UTF-8".into(),
        })?;
        let parse_error = |message: String| KitError::Parse {
            path: path.clone(),
            message,
        };
        if kit_role(&text).map_err(|e| parse_error(e.to_string()))? == Role::Coordinator {
            return Err(KitError::Invalid {
                path,
                message: "this is the coordinator's kit; use it with `alveolus coordinator`".into(),
            });
        }
        let config: ClientKitConfig =
            toml::from_str(&text).map_err(|e| parse_error(e.to_string()))?;
        let identity = Identity::new(&config.project, config.role, &config.name).map_err(|e| {
            KitError::Invalid {
                path: path.clone(),
                message: e.to_string(),
            }
        })?;
        Ok(Self {
            ca_pem: read(&dir.join(&config.ca_cert))?,
            cert_pem: read(&dir.join(&config.cert))?,
            key_pem: read(&dir.join(&config.key))?,
            identity,
            config,
            dir: dir.to_path_buf(),
        })
    }

    /// When this kit's certificate stops being valid, in Unix seconds.
    pub fn certificate_expires(&self) -> Result<i64, KitError> {
        let invalid = |message: &str| KitError::Invalid {
            path: self.dir.join(&self.config.cert),
            message: message.into(),
        };
        let (_, pem) = x509_parser::pem::parse_x509_pem(&self.cert_pem)
            .map_err(|_| invalid("no PEM certificate in the file"))?;
        let cert = pem
            .parse_x509()
            .map_err(|_| invalid("the certificate does not parse"))?;
        Ok(cert.validity().not_after.timestamp())
    }

    pub fn server_name(&self) -> String {
        self.config
            .server_name
            .clone()
            .unwrap_or_else(|| host_of(&self.config.coordinator).to_string())
    }

    /// Dials the coordinator over mutual TLS (TLS 1.3, HTTP/2).
    pub async fn connect(&self) -> Result<Channel, KitError> {
        crate::install_crypto_provider();
        let address = self.config.coordinator.clone();
        let err = |message: String| KitError::Connect {
            address: address.clone(),
            message,
        };
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(TlsIdentity::from_pem(&self.cert_pem, &self.key_pem))
            .domain_name(self.server_name());
        let endpoint = Endpoint::from_shared(format!("https://{address}"))
            .map_err(|e| err(e.to_string()))?
            .tls_config(tls)
            .map_err(|e| err(e.to_string()))?
            .connect_timeout(Duration::from_secs(10))
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_while_idle(true);
        endpoint.connect().await.map_err(|e| err(error_chain(&e)))
    }
}

/// The `role` a kit.toml declares, read before the role's own strict schema is applied so that a
/// kit used in the wrong place gets a clear message instead of "unknown field".
pub fn kit_role(text: &str) -> Result<Role, toml::de::Error> {
    #[derive(Deserialize)]
    struct RoleOnly {
        role: Role,
    }
    toml::from_str::<RoleOnly>(text).map(|r| r.role)
}

/// The host part of `HOST:PORT`, `[V6]:PORT` included.
pub fn host_of(address: &str) -> &str {
    let host = match address.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host,
        _ => address,
    };
    host.trim_start_matches('[').trim_end_matches(']')
}

/// An error and its causes on one line: transport errors hide the useful part in `source()`.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_handles_names_ips_and_v6() {
        assert_eq!(host_of("coord.example.org:7443"), "coord.example.org");
        assert_eq!(host_of("127.0.0.1:1"), "127.0.0.1");
        assert_eq!(host_of("[::1]:7443"), "::1");
        assert_eq!(host_of("plainhost"), "plainhost");
    }
}
