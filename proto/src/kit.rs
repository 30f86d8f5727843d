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
    #[error(transparent)]
    Proxy(#[from] crate::proxy::ProxyUrlError),
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

    /// Whether `other` holds another CA, certificate or key than this kit: a renewal.
    pub fn material_differs(&self, other: &ClientKit) -> bool {
        (&self.ca_pem, &self.cert_pem, &self.key_pem)
            != (&other.ca_pem, &other.cert_pem, &other.key_pem)
    }

    /// When this kit's certificate stops being valid, in Unix seconds.
    pub fn certificate_expires(&self) -> Result<i64, KitError> {
        pem_not_after(&self.cert_pem).map_err(|message| KitError::Invalid {
            path: self.dir.join(&self.config.cert),
            message: message.into(),
        })
    }

    pub fn server_name(&self) -> String {
        self.config
            .server_name
            .clone()
            .unwrap_or_else(|| host_of(&self.config.coordinator).to_string())
    }

    /// Dials the coordinator over mutual TLS (TLS 1.3, HTTP/2), through the outbound proxy
    /// when one is set ([`crate::proxy::for_address`]).
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
        let connected = match crate::proxy::for_address(&address)? {
            Some(proxy) => {
                let connector = crate::proxy::TunnelConnector {
                    proxy,
                    target: address.clone(),
                };
                endpoint.connect_with_connector(connector).await
            }
            None => endpoint.connect().await,
        };
        connected.map_err(|e| err(error_chain(&e)))
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

/// Services warn of a certificate's expiry from this many days before it: time to renew a kit
/// before a site drops out of the federation.
pub const EXPIRY_WARNING_DAYS: i64 = 30;

/// When the first certificate of a PEM file stops being valid, in Unix seconds.
pub fn pem_not_after(pem: &[u8]) -> Result<i64, &'static str> {
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(pem).map_err(|_| "no PEM certificate in the file")?;
    let cert = pem
        .parse_x509()
        .map_err(|_| "the certificate does not parse")?;
    Ok(cert.validity().not_after.timestamp())
}

/// What to log of `whose` certificate (`"site north's"`), which expires at `expires`, at `now`
/// (both Unix seconds): nothing while more than [`EXPIRY_WARNING_DAYS`] remain.
pub fn expiry_warning(whose: &str, expires: i64, now: i64) -> Option<String> {
    if expires <= now {
        return Some(format!(
            "{whose} certificate expired on {}; ask the project's operator for a renewed kit",
            utc(expires)
        ));
    }
    let days = (expires - now) / 86_400;
    (days < EXPIRY_WARNING_DAYS).then(|| {
        format!(
            "{whose} certificate expires on {} (in {days} day{}); ask the project's operator for a renewed kit before then",
            utc(expires),
            if days == 1 { "" } else { "s" }
        )
    })
}

/// `2026-12-03 14:05:09 UTC`.
pub fn utc(unix_seconds: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(unix_seconds) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => "(no date)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_is_warned_about_in_its_last_thirty_days_and_once_expired() {
        let day = 86_400;
        let now = 1_800_000_000;
        assert_eq!(expiry_warning("site a's", now + 31 * day, now), None);
        let soon = expiry_warning("site a's", now + 29 * day + 5, now).unwrap();
        assert!(
            soon.starts_with("site a's certificate expires on 2027-"),
            "{soon}"
        );
        assert!(soon.contains("(in 29 days)"), "{soon}");
        let gone = expiry_warning("site a's", now - 1, now).unwrap();
        assert!(
            gone.contains("expired on 2027-01-15 07:59:59 UTC"),
            "{gone}"
        );
    }

    #[test]
    fn host_of_handles_names_ips_and_v6() {
        assert_eq!(host_of("coord.example.org:7443"), "coord.example.org");
        assert_eq!(host_of("127.0.0.1:1"), "127.0.0.1");
        assert_eq!(host_of("[::1]:7443"), "::1");
        assert_eq!(host_of("plainhost"), "plainhost");
    }
}
