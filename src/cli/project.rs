//! `provision` and `revoke`: the project's CA, its kits, and taking a certificate back.

use std::path::PathBuf;

use alveolus_coordinator::config::ROSTER_FILE;
use alveolus_coordinator::provision::{ProvisionRequest, provision, revoke};
use alveolus_coordinator::roster::add_site;
use alveolus_proto::identity::Role;
use anyhow::{Result, bail};
use clap::Args;

#[derive(Args)]
pub struct ProvisionArgs {
    #[arg(
        long,
        required_unless_present = "add_site",
        conflicts_with = "add_site"
    )]
    project: Option<String>,
    /// HOST:PORT the agents will dial.
    #[arg(
        long,
        required_unless_present = "add_site",
        conflicts_with = "add_site"
    )]
    coordinator: Option<String>,
    /// Site names (one kit each).
    #[arg(long = "site", num_args = 1.., required_unless_present = "add_site", conflicts_with = "add_site")]
    sites: Vec<String>,
    /// Admin (researcher) names.
    #[arg(long = "admin", num_args = 1.., required_unless_present = "add_site", conflicts_with = "add_site")]
    admins: Vec<String>,
    /// New folder to write the CA and the kits into.
    #[arg(
        long,
        required_unless_present = "add_site",
        conflicts_with = "add_site"
    )]
    out: Option<PathBuf>,
    /// Add a site to the project in --project-dir: a kit for it, and its name in the
    /// coordinator's roster (copy the coordinator kit's roster.toml to the coordinator).
    #[arg(long, requires = "project_dir")]
    add_site: Option<String>,
    /// The folder `provision --out` created (with --add-site).
    #[arg(long)]
    project_dir: Option<PathBuf>,
    /// Lifetime of the issued certificates.
    #[arg(long, default_value_t = 825)]
    validity_days: u32,
}

pub fn provision_project(args: ProvisionArgs) -> Result<()> {
    if let (Some(name), Some(project_dir)) = (&args.add_site, &args.project_dir) {
        let kit = add_site(project_dir, name, args.validity_days)?;
        println!("site kit {name:<9} {}", kit.display());
        println!(
            "roster:           {} (copy it beside the coordinator's kit.toml; it is re-read when it changes)",
            project_dir.join("coordinator").join(ROSTER_FILE).display()
        );
        return Ok(());
    }
    let (Some(project), Some(coordinator), Some(out)) = (args.project, args.coordinator, args.out)
    else {
        bail!(
            "give --project, --coordinator, --site, --admin and --out, or --add-site with --project-dir"
        );
    };
    let summary = provision(&ProvisionRequest {
        project,
        coordinator,
        sites: args.sites,
        admins: args.admins,
        out,
        validity_days: args.validity_days,
    })?;
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
    println!("{role}/{name} is revoked; the coordinator refuses it from its next call on");
    Ok(())
}
