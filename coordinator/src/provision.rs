//! Project CA, certificates and startup kits (`alveolus provision`), and revocation
//! (`alveolus revoke`).
//!
//! Layout of a project folder:
//! ```text
//! ca/            ca.pem, ca.key (keep offline), issued.json, revoked.json, revoked.crl.pem
//! coordinator/   kit.toml, ca.pem, cert.pem, key.pem, revoked.crl.pem
//! sites/NAME/    kit.toml, ca.pem, cert.pem, key.pem
//! admins/NAME/   kit.toml, ca.pem, cert.pem, key.pem
//! ```

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use alveolus_proto::identity::{Identity, IdentityError, Role, validate_name};
use alveolus_proto::kit::{ClientKitConfig, KIT_FILE, host_of};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason,
    RevokedCertParams, SanType, SerialNumber,
};
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use crate::config::{CRL_FILE, CoordinatorKitConfig, ROSTER_FILE, Roster};
use crate::durable::write_atomic;

pub const CA_DIR: &str = "ca";

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error(transparent)]
    Name(#[from] IdentityError),
    #[error("`{0}` is not HOST:PORT")]
    Address(String),
    #[error("{0} already exists and is not empty; provision into a new folder")]
    OutExists(PathBuf),
    #[error("the name `{0}` is given twice")]
    Duplicate(String),
    #[error("at least one site and one admin are needed")]
    Empty,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("certificate generation failed: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("no certificate was issued to {0} in this project")]
    UnknownIdentity(String),
    #[error("{0} already has a kit in this project; `alveolus renew` gives it a fresh certificate")]
    Exists(String),
    #[error(
        "{0} is revoked: a revoked identity is not renewed; add it again under a new name with `provision --add-site` or `--add-admin`"
    )]
    Revoked(String),
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ProvisionError + '_ {
    move |source| ProvisionError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What `provision` is asked to create.
#[derive(Debug, Clone)]
pub struct ProvisionRequest {
    pub project: String,
    /// `HOST:PORT` agents dial; HOST goes into the coordinator's certificate.
    pub coordinator: String,
    pub sites: Vec<String>,
    pub admins: Vec<String>,
    pub out: PathBuf,
    /// Lifetime of the issued certificates.
    pub validity_days: u32,
}

/// One certificate the CA issued, recorded so that it can be revoked by name later.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IssuedCert {
    pub identity: String,
    pub serial: String,
    pub not_after: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RevokedCert {
    pub identity: String,
    pub serial: String,
    pub revoked_at: String,
}

/// Folders written by `provision`.
#[derive(Debug, Clone)]
pub struct ProvisionSummary {
    pub coordinator_kit: PathBuf,
    pub site_kits: Vec<(String, PathBuf)>,
    pub admin_kits: Vec<(String, PathBuf)>,
    pub ca_dir: PathBuf,
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // A positive INTEGER without a leading zero byte.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

pub(crate) fn write_file(path: &Path, contents: &[u8], secret: bool) -> Result<(), ProvisionError> {
    write_atomic(path, contents, secret).map_err(io_err(path))
}

pub(crate) fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), ProvisionError> {
    let text = serde_json::to_vec_pretty(value).expect("plain records serialise");
    write_file(path, &text, false)
}

pub(crate) fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, ProvisionError> {
    let text = std::fs::read(path).map_err(io_err(path))?;
    serde_json::from_slice(&text).map_err(|e| ProvisionError::Corrupt {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

fn ca_params(project: &str, now: OffsetDateTime) -> CertificateParams {
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("Alveolus project CA {project}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(3650);
    params.serial_number = Some(random_serial());
    params
}

pub(crate) struct Leaf {
    pub(crate) cert_pem: String,
    pub(crate) key_pem: String,
    pub(crate) record: IssuedCert,
}

fn issue(
    issuer: &Issuer<'_, KeyPair>,
    identity: &Identity,
    server_host: Option<&str>,
    now: OffsetDateTime,
    validity_days: u32,
) -> Result<Leaf, ProvisionError> {
    issue_for_key(
        issuer,
        identity,
        server_host,
        now,
        validity_days,
        KeyPair::generate()?,
    )
}

/// A certificate for `identity` on `key`, valid from an hour before `now` for
/// `validity_days`; `server_host` makes it a server certificate for that name or address.
pub(crate) fn issue_for_key(
    issuer: &Issuer<'_, KeyPair>,
    identity: &Identity,
    server_host: Option<&str>,
    now: OffsetDateTime,
    validity_days: u32,
    key: KeyPair,
) -> Result<Leaf, ProvisionError> {
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, identity.to_string());
    params
        .distinguished_name
        .push(DnType::OrganizationName, identity.project.clone());
    let uri = identity.uri();
    params.subject_alt_names = vec![SanType::URI(uri.as_str().try_into()?)];
    if let Some(host) = server_host {
        params.subject_alt_names.push(match host.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(host.try_into()?),
        });
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    } else {
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(validity_days.into());
    let serial = random_serial();
    params.serial_number = Some(serial.clone());
    let cert = params.signed_by(&key, issuer)?;
    Ok(Leaf {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        record: IssuedCert {
            identity: identity.to_string(),
            serial: hex::encode(serial.to_bytes()),
            not_after: params.not_after.to_string(),
        },
    })
}

fn write_leaf(dir: &Path, leaf: &Leaf, ca_pem: &str) -> Result<(), ProvisionError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    write_file(&dir.join("ca.pem"), ca_pem.as_bytes(), false)?;
    write_file(&dir.join("cert.pem"), leaf.cert_pem.as_bytes(), false)?;
    write_file(&dir.join("key.pem"), leaf.key_pem.as_bytes(), true)
}

/// Creates the project CA and every kit.
pub fn provision(request: &ProvisionRequest) -> Result<ProvisionSummary, ProvisionError> {
    validate_name(&request.project)?;
    let host = host_of(&request.coordinator);
    let port_ok = request
        .coordinator
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok());
    if host.is_empty() || !port_ok {
        return Err(ProvisionError::Address(request.coordinator.clone()));
    }
    if request.sites.is_empty() || request.admins.is_empty() {
        return Err(ProvisionError::Empty);
    }
    let mut seen = std::collections::HashSet::new();
    for name in request.sites.iter().chain(&request.admins) {
        validate_name(name)?;
        if !seen.insert(name) {
            return Err(ProvisionError::Duplicate(name.clone()));
        }
    }
    if request.out.exists()
        && std::fs::read_dir(&request.out)
            .map_err(io_err(&request.out))?
            .next()
            .is_some()
    {
        return Err(ProvisionError::OutExists(request.out.clone()));
    }

    let now = OffsetDateTime::now_utc();
    let ca_key = KeyPair::generate()?;
    let params = ca_params(&request.project, now);
    let ca_cert = params.self_signed(&ca_key)?;
    let ca_pem = ca_cert.pem();
    let ca_dir = request.out.join(CA_DIR);
    std::fs::create_dir_all(&ca_dir).map_err(io_err(&ca_dir))?;
    write_file(&ca_dir.join("ca.pem"), ca_pem.as_bytes(), false)?;
    write_file(
        &ca_dir.join("ca.key"),
        ca_key.serialize_pem().as_bytes(),
        true,
    )?;
    let issuer = Issuer::new(params, ca_key);
    let mut issued = Vec::new();

    let coordinator_id = Identity::new(&request.project, Role::Coordinator, "coordinator")?;
    let leaf = issue(
        &issuer,
        &coordinator_id,
        Some(host),
        now,
        request.validity_days,
    )?;
    let coordinator_dir = request.out.join("coordinator");
    write_leaf(&coordinator_dir, &leaf, &ca_pem)?;
    let port = request
        .coordinator
        .rsplit_once(':')
        .map(|(_, p)| p)
        .unwrap_or("7443");
    let config = CoordinatorKitConfig::new(&request.project, format!("0.0.0.0:{port}"));
    write_file(
        &coordinator_dir.join(KIT_FILE),
        toml::to_string_pretty(&config)
            .expect("config serialises")
            .as_bytes(),
        false,
    )?;
    issued.push(leaf.record);

    let mut kits = |role: Role, names: &[String]| {
        let mut out = Vec::new();
        for name in names {
            let identity = Identity::new(&request.project, role, name)?;
            let (record, dir) = client_kit(
                &issuer,
                &ca_pem,
                &identity,
                &request.coordinator,
                &request.out,
                request.validity_days,
            )?;
            issued.push(record);
            out.push((name.clone(), dir));
        }
        Ok::<_, ProvisionError>(out)
    };
    let site_kits = kits(Role::Site, &request.sites)?;
    let admin_kits = kits(Role::Admin, &request.admins)?;
    let roster = Roster {
        sites: request.sites.iter().cloned().collect(),
        admins: request.admins.iter().cloned().collect(),
    };
    write_file(
        &coordinator_dir.join(ROSTER_FILE),
        roster.to_toml().as_bytes(),
        false,
    )?;
    write_json(&ca_dir.join("issued.json"), &issued)?;
    write_json(&ca_dir.join("revoked.json"), &Vec::<RevokedCert>::new())?;
    let crl = crl_pem(&issuer, &[], 1)?;
    write_file(&ca_dir.join(CRL_FILE), crl.as_bytes(), false)?;
    write_file(&coordinator_dir.join(CRL_FILE), crl.as_bytes(), false)?;
    Ok(ProvisionSummary {
        coordinator_kit: coordinator_dir,
        site_kits,
        admin_kits,
        ca_dir,
    })
}

/// The kit of a site or an admin, in `sites/NAME` or `admins/NAME` under `project_dir`: its
/// certificate and key, the CA, and a kit.toml dialling `coordinator`.
pub(crate) fn client_kit(
    issuer: &Issuer<'_, KeyPair>,
    ca_pem: &str,
    identity: &Identity,
    coordinator: &str,
    project_dir: &Path,
    validity_days: u32,
) -> Result<(IssuedCert, PathBuf), ProvisionError> {
    let folder = match identity.role {
        Role::Admin => "admins",
        _ => "sites",
    };
    let leaf = issue(
        issuer,
        identity,
        None,
        OffsetDateTime::now_utc(),
        validity_days,
    )?;
    let dir = project_dir.join(folder).join(&identity.name);
    write_leaf(&dir, &leaf, ca_pem)?;
    let kit = ClientKitConfig {
        project: identity.project.clone(),
        role: identity.role,
        name: identity.name.clone(),
        coordinator: coordinator.to_string(),
        server_name: None,
        ca_cert: "ca.pem".into(),
        cert: "cert.pem".into(),
        key: "key.pem".into(),
    };
    write_file(
        &dir.join(KIT_FILE),
        toml::to_string_pretty(&kit)
            .expect("config serialises")
            .as_bytes(),
        false,
    )?;
    Ok((leaf.record, dir))
}

/// The project CA as an issuer, from the CA folder of a provisioned project.
pub(crate) fn load_issuer(ca_dir: &Path) -> Result<Issuer<'static, KeyPair>, ProvisionError> {
    let ca_pem_path = ca_dir.join("ca.pem");
    let ca_key_path = ca_dir.join("ca.key");
    let ca_pem = std::fs::read_to_string(&ca_pem_path).map_err(io_err(&ca_pem_path))?;
    let key_pem = std::fs::read_to_string(&ca_key_path).map_err(io_err(&ca_key_path))?;
    let key = KeyPair::from_pem(&key_pem).map_err(|e| ProvisionError::Corrupt {
        path: ca_key_path.clone(),
        message: e.to_string(),
    })?;
    Issuer::from_ca_cert_pem(&ca_pem, key).map_err(|e| ProvisionError::Corrupt {
        path: ca_pem_path,
        message: e.to_string(),
    })
}

fn crl_pem(
    issuer: &Issuer<'_, KeyPair>,
    revoked: &[RevokedCert],
    number: u64,
) -> Result<String, ProvisionError> {
    let now = OffsetDateTime::now_utc();
    let revoked_certs = revoked
        .iter()
        .map(|r| {
            Ok(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&hex::decode(&r.serial).map_err(|e| {
                    ProvisionError::Corrupt {
                        path: PathBuf::from("revoked.json"),
                        message: format!("serial of {}: {e}", r.identity),
                    }
                })?),
                revocation_time: now,
                reason_code: Some(RevocationReason::CessationOfOperation),
                invalidity_date: None,
            })
        })
        .collect::<Result<Vec<_>, ProvisionError>>()?;
    let params = CertificateRevocationListParams {
        this_update: now - Duration::minutes(5),
        next_update: now + Duration::days(3650),
        crl_number: SerialNumber::from(number),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    Ok(params.signed_by(issuer)?.pem()?)
}

/// Revokes the certificate issued to `role/name` and rewrites the CRL in the CA folder and in
/// the coordinator kit of the same project folder. A running coordinator picks the new list
/// up at the next call it serves.
pub fn revoke(project_dir: &Path, role: Role, name: &str) -> Result<Vec<PathBuf>, ProvisionError> {
    let ca_dir = project_dir.join(CA_DIR);
    let issued: Vec<IssuedCert> = read_json(&ca_dir.join("issued.json"))?;
    let identity = format!("{role}/{name}");
    let records: Vec<&IssuedCert> = issued.iter().filter(|c| c.identity == identity).collect();
    if records.is_empty() {
        return Err(ProvisionError::UnknownIdentity(identity));
    }
    revoke_certificates(project_dir, &records)
}

/// Puts `records` on the project's revocation list (those not on it yet) and writes the list
/// where [`revoke`] does.
pub(crate) fn revoke_certificates(
    project_dir: &Path,
    records: &[&IssuedCert],
) -> Result<Vec<PathBuf>, ProvisionError> {
    let ca_dir = project_dir.join(CA_DIR);
    let revoked_path = ca_dir.join("revoked.json");
    let mut revoked: Vec<RevokedCert> = read_json(&revoked_path)?;
    for record in records {
        if !revoked.iter().any(|r| r.serial == record.serial) {
            revoked.push(RevokedCert {
                identity: record.identity.clone(),
                serial: record.serial.clone(),
                revoked_at: OffsetDateTime::now_utc().to_string(),
            });
        }
    }
    let issuer = load_issuer(&ca_dir)?;
    let crl = crl_pem(&issuer, &revoked, revoked.len() as u64 + 1)?;
    write_json(&revoked_path, &revoked)?;
    let mut written = vec![ca_dir.join(CRL_FILE)];
    let coordinator_dir = project_dir.join("coordinator");
    if coordinator_dir.is_dir() {
        written.push(coordinator_dir.join(CRL_FILE));
    }
    for path in &written {
        write_file(path, crl.as_bytes(), false)?;
    }
    Ok(written)
}
