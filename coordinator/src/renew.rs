//! Certificates over time: a fresh certificate for an identity the project already has, so that
//! a kit is renewed before it expires instead of the project being provisioned again.

use std::path::{Path, PathBuf};

use alveolus_proto::identity::{Identity, Role};
use alveolus_proto::kit::{ClientKitConfig, KIT_FILE, host_of};
use rcgen::KeyPair;
use time::OffsetDateTime;

use crate::config::CoordinatorKitConfig;
use crate::provision::{
    CA_DIR, IssuedCert, ProvisionError, RevokedCert, io_err, issue_for_key, load_issuer, read_json,
    revoke_certificates, write_file, write_json,
};
use crate::roster::{dialled_address, kit_dir, read_toml};

/// What `renew` is asked to do.
#[derive(Debug, Clone)]
pub struct RenewRequest {
    /// The folder `provision --out` created.
    pub project_dir: PathBuf,
    pub role: Role,
    /// The identity's name; `coordinator` for the coordinator.
    pub name: String,
    /// A new key pair instead of the kit's current one: for a key that may have been seen.
    pub new_key: bool,
    /// Revoke the identity's earlier certificates once the new one is written: the copy of
    /// the kit on the old machine stops working.
    pub revoke_previous: bool,
    pub validity_days: u32,
}

/// What `renew` wrote.
#[derive(Debug, Clone)]
pub struct Renewal {
    /// The kit folder whose certificate (and key) were replaced.
    pub kit: PathBuf,
    pub record: IssuedCert,
    /// Revocation lists rewritten, when earlier certificates were revoked.
    pub revocation_lists: Vec<PathBuf>,
}

/// Issues a fresh certificate for an existing, unrevoked identity and writes it into its kit
/// in the project folder. The issue record is written first, then the key (when new) and the
/// certificate, each file replaced atomically (written aside, synced, renamed): the kit is never
/// half a file, and a coordinator or agent reading it sees the old pair or the new one.
pub fn renew(request: &RenewRequest) -> Result<Renewal, ProvisionError> {
    let project_dir = &request.project_dir;
    let ca_dir = project_dir.join(CA_DIR);
    let coordinator_kit = project_dir.join("coordinator").join(KIT_FILE);
    let project = read_toml::<CoordinatorKitConfig>(&coordinator_kit)?.project;
    let identity = Identity::new(&project, request.role, &request.name)?;
    let key = identity.to_string();

    let issued_path = ca_dir.join("issued.json");
    let mut issued: Vec<IssuedCert> = read_json(&issued_path)?;
    let previous: Vec<IssuedCert> = issued
        .iter()
        .filter(|c| c.identity == key)
        .cloned()
        .collect();
    if previous.is_empty() {
        return Err(ProvisionError::UnknownIdentity(key));
    }
    let revoked: Vec<RevokedCert> = read_json(&ca_dir.join("revoked.json"))?;
    let live = |c: &&IssuedCert| !revoked.iter().any(|r| r.serial == c.serial);
    if !previous.iter().any(|c| live(&c)) {
        return Err(ProvisionError::Revoked(key));
    }

    let dir = kit_dir(project_dir, request.role, &request.name);
    let (cert_file, key_file) = kit_files(&dir, request.role)?;
    let key_pair = if request.new_key {
        KeyPair::generate()?
    } else {
        let text = std::fs::read_to_string(&key_file).map_err(io_err(&key_file))?;
        KeyPair::from_pem(&text).map_err(|e| ProvisionError::Corrupt {
            path: key_file.clone(),
            message: e.to_string(),
        })?
    };
    let server_host = match request.role {
        Role::Coordinator => Some(host_of(&dialled_address(project_dir)?).to_string()),
        _ => None,
    };
    let issuer = load_issuer(&ca_dir)?;
    let leaf = issue_for_key(
        &issuer,
        &identity,
        server_host.as_deref(),
        OffsetDateTime::now_utc(),
        request.validity_days,
        key_pair,
    )?;
    issued.push(leaf.record.clone());
    write_json(&issued_path, &issued)?;
    if request.new_key {
        write_file(&key_file, leaf.key_pem.as_bytes(), true)?;
    }
    write_file(&cert_file, leaf.cert_pem.as_bytes(), false)?;

    let revocation_lists = if request.revoke_previous {
        let earlier: Vec<&IssuedCert> = previous.iter().collect();
        revoke_certificates(project_dir, &earlier)?
    } else {
        Vec::new()
    };
    Ok(Renewal {
        kit: dir,
        record: leaf.record,
        revocation_lists,
    })
}

/// The certificate and key files a kit's config names.
fn kit_files(dir: &Path, role: Role) -> Result<(PathBuf, PathBuf), ProvisionError> {
    let config = dir.join(KIT_FILE);
    if !config.is_file() {
        return Err(ProvisionError::Corrupt {
            path: dir.to_path_buf(),
            message: "no kit here to renew (kit.toml is missing)".into(),
        });
    }
    Ok(match role {
        Role::Coordinator => {
            let kit: CoordinatorKitConfig = read_toml(&config)?;
            (dir.join(kit.cert), dir.join(kit.key))
        }
        _ => {
            let kit: ClientKitConfig = read_toml(&config)?;
            (dir.join(kit.cert), dir.join(kit.key))
        }
    })
}
