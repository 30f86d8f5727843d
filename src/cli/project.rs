//! `provision` and `revoke`: the project's CA, its kits, and taking a certificate back.

use std::path::PathBuf;

use alveolus_coordinator::provision::{ProvisionRequest, provision, revoke};
use alveolus_proto::identity::Role;
use anyhow::{Result, bail};
use clap::Args;

#[derive(Args)]
pub struct ProvisionArgs {
    #[arg(long)]
    project: String,
    /// HOST:PORT the agents will dial.
    #[arg(long)]
    coordinator: String,
    /// Site names (one kit each).
    #[arg(long = "site", num_args = 1.., required = true)]
    sites: Vec<String>,
    /// Admin (researcher) names.
    #[arg(long = "admin", num_args = 1.., required = true)]
    admins: Vec<String>,
    /// New folder to write the CA and the kits into.
    #[arg(long)]
    out: PathBuf,
    /// Lifetime of the issued certificates.
    #[arg(long, default_value_t = 825)]
    validity_days: u32,
}

impl From<ProvisionArgs> for ProvisionRequest {
    fn from(a: ProvisionArgs) -> Self {
        Self {
            project: a.project,
            coordinator: a.coordinator,
            sites: a.sites,
            admins: a.admins,
            out: a.out,
            validity_days: a.validity_days,
        }
    }
}

pub fn provision_project(args: ProvisionArgs) -> Result<()> {
    let summary = provision(&args.into())?;
    println!(
        "project CA:       {} (keep ca.key offline)",
        summary.ca_dir.display()
    );
    println!("coordinator kit:  {}", summary.coordinator_kit.display());
    for (name, dir) in &summary.site_kits {
        println!("site kit {name:<9} {}", dir.display());
    }
    for (name, dir) in &summary.admin_kits {
        println!("admin kit {name:<8} {}", dir.display());
    }
    Ok(())
}

#[derive(Args)]
pub struct RevokeArgs {
    /// The folder `provision --out` created.
    #[arg(long)]
    project_dir: PathBuf,
    #[arg(long, conflicts_with = "admin", required_unless_present = "admin")]
    site: Option<String>,
    #[arg(long)]
    admin: Option<String>,
}

pub fn revoke_identity(args: RevokeArgs) -> Result<()> {
    let (role, name) = match (args.site, args.admin) {
        (Some(s), _) => (Role::Site, s),
        (None, Some(a)) => (Role::Admin, a),
        (None, None) => bail!("give --site NAME or --admin NAME"),
    };
    for path in revoke(&args.project_dir, role, &name)? {
        println!("revocation list written: {}", path.display());
    }
    println!("{role}/{name} is revoked; the coordinator refuses it from its next connection on");
    Ok(())
}
