//! Growing a provisioned project: a kit for a new site, and its name in the coordinator's
//! roster, without re-issuing anyone else's certificate.

use std::path::{Path, PathBuf};

use alveolus_proto::identity::{Identity, Role};
use alveolus_proto::kit::{ClientKitConfig, KIT_FILE};

use crate::config::{CoordinatorKitConfig, Roster};
use crate::provision::{
    CA_DIR, IssuedCert, ProvisionError, client_kit, io_err, load_issuer, read_json, write_file,
    write_json,
};

pub(crate) fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ProvisionError> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    toml::from_str(&text).map_err(|e| ProvisionError::Corrupt {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Issues a kit for `role` (a site or an admin) `name` in the project folder `provision --out`
/// made, records it, and adds the name to the roster in the project's coordinator kit. Returns
/// the new kit's folder. The coordinator takes the newcomer once it has the new roster.toml (it
/// re-reads the file when it changes). Nothing is written for a name the project has already
/// issued a certificate to, or that has a kit folder.
pub fn add_identity(
    project_dir: &Path,
    role: Role,
    name: &str,
    validity_days: u32,
) -> Result<PathBuf, ProvisionError> {
    let ca_dir = project_dir.join(CA_DIR);
    let coordinator_dir = project_dir.join("coordinator");
    let kit: CoordinatorKitConfig = read_toml(&coordinator_dir.join(KIT_FILE))?;
    let identity = Identity::new(&kit.project, role, name)?;
    if role == Role::Coordinator {
        return Err(ProvisionError::Exists(identity.to_string()));
    }
    let issued_path = ca_dir.join("issued.json");
    let mut issued: Vec<IssuedCert> = read_json(&issued_path)?;
    let key = identity.to_string();
    if issued.iter().any(|c| c.identity == key) || kit_dir(project_dir, role, name).exists() {
        return Err(ProvisionError::Exists(key));
    }
    let coordinator = dialled_address(project_dir)?;
    let issuer = load_issuer(&ca_dir)?;
    let ca_pem_path = ca_dir.join("ca.pem");
    let ca_pem = std::fs::read_to_string(&ca_pem_path).map_err(io_err(&ca_pem_path))?;
    let roster_path = coordinator_dir.join(&kit.roster);
    let mut roster = Roster::read(&roster_path)
        .map_err(|e| ProvisionError::Corrupt {
            path: roster_path.clone(),
            message: e.to_string(),
        })?
        .unwrap_or_else(|| roster_of(&issued));
    let (record, dir) = client_kit(
        &issuer,
        &ca_pem,
        &identity,
        &coordinator,
        project_dir,
        validity_days,
    )?;
    issued.push(record);
    write_json(&issued_path, &issued)?;
    match role {
        Role::Admin => roster.admins.insert(name.to_string()),
        _ => roster.sites.insert(name.to_string()),
    };
    write_file(&roster_path, roster.to_toml().as_bytes(), false)?;
    Ok(dir)
}

/// Where `provision` puts the kit of `role/name` in a project folder.
pub fn kit_dir(project_dir: &Path, role: Role, name: &str) -> PathBuf {
    match role {
        Role::Coordinator => project_dir.join("coordinator"),
        Role::Admin => project_dir.join("admins").join(name),
        Role::Site => project_dir.join("sites").join(name),
    }
}

/// The `HOST:PORT` the project's kits dial, read from one of them.
pub(crate) fn dialled_address(project_dir: &Path) -> Result<String, ProvisionError> {
    for folder in ["sites", "admins"] {
        let dir = project_dir.join(folder);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path().join(KIT_FILE);
            if path.is_file() {
                return Ok(read_toml::<ClientKitConfig>(&path)?.coordinator);
            }
        }
    }
    Err(ProvisionError::Corrupt {
        path: project_dir.to_path_buf(),
        message: "no site or admin kit to read the coordinator's address from".into(),
    })
}

/// A roster for a project provisioned before rosters: everyone the CA issued a kit to.
fn roster_of(issued: &[IssuedCert]) -> Roster {
    let mut roster = Roster::default();
    for cert in issued {
        match cert.identity.split_once('/') {
            Some(("site", name)) => roster.sites.insert(name.to_string()),
            Some(("admin", name)) => roster.admins.insert(name.to_string()),
            _ => false,
        };
    }
    roster
}
