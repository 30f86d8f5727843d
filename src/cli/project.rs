//! `provision` and `revoke`: the project's CA, its kits, and taking a certificate back.

use std::path::PathBuf;

use alveolus_coordinator::config::ROSTER_FILE;
use alveolus_coordinator::provision::{ProvisionRequest, provision, revoke};
use alveolus_coordinator::renew::{RenewRequest, renew};
use alveolus_coordinator::roster::add_identity;
use alveolus_proto::identity::Role;
use anyhow::{Result, bail};
use clap::Args;

#[derive(Args)]
pub struct ProvisionArgs {
    #[arg(
        long,
        required_unless_present_any = ["add_site", "add_admin"],
        conflicts_with_all = ["add_site", "add_admin"]
    )]
    project: Option<String>,
    /// HOST:PORT the agents will dial.
    #[arg(
        long,
        required_unless_present_any = ["add_site", "add_admin"],
        conflicts_with_all = ["add_site", "add_admin"]
    )]
    coordinator: Option<String>,
    /// Site names (one kit each).
    #[arg(long = "site", num_args = 1.., required_unless_present_any = ["add_site", "add_admin"], conflicts_with_all = ["add_site", "add_admin"])]
    sites: Vec<String>,
    /// Admin (researcher) names.
    #[arg(long = "admin", num_args = 1.., required_unless_present_any = ["add_site", "add_admin"], conflicts_with_all = ["add_site", "add_admin"])]
    admins: Vec<String>,
    /// New folder to write the CA and the kits into.
    #[arg(
        long,
        required_unless_present_any = ["add_site", "add_admin"],
        conflicts_with_all = ["add_site", "add_admin"]
    )]
    out: Option<PathBuf>,
    /// Add a site to the project in --project-dir: a kit for it, and its name in the
    /// coordinator's roster (copy the coordinator kit's roster.toml to the coordinator).
    #[arg(long, requires = "project_dir", conflicts_with = "add_admin")]
    add_site: Option<String>,
    /// Add an admin (researcher) to the project in --project-dir, as --add-site does a site.
    #[arg(long, requires = "project_dir")]
    add_admin: Option<String>,
    /// The folder `provision --out` created (with --add-site).
    #[arg(long)]
    project_dir: Option<PathBuf>,
    /// Lifetime of the issued certificates.
    #[arg(long, default_value_t = 825, value_parser = clap::value_parser!(u32).range(1..=36500))]
    validity_days: u32,
}

pub fn provision_project(args: ProvisionArgs) -> Result<()> {
    let adding = match (&args.add_site, &args.add_admin) {
        (Some(name), _) => Some((Role::Site, name)),
        (None, Some(name)) => Some((Role::Admin, name)),
        (None, None) => None,
    };
    if let (Some((role, name)), Some(project_dir)) = (adding, &args.project_dir) {
        let kit = add_identity(project_dir, role, name, args.validity_days)?;
        println!("{role} kit {name:<9} {}", kit.display());
        println!(
            "roster:           {} (copy it beside the coordinator's kit.toml; it is re-read when it changes)",
            project_dir.join("coordinator").join(ROSTER_FILE).display()
        );
        return Ok(());
    }
    let (Some(project), Some(coordinator), Some(out)) = (args.project, args.coordinator, args.out)
    else {
        bail!(
            "give --project, --coordinator, --site, --admin and --out, or --add-site or --add-admin with --project-dir"
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

#[derive(Args)]
pub struct RenewArgs {
    /// The folder `provision --out` created.
    #[arg(long)]
    project_dir: PathBuf,
    #[arg(long, required_unless_present_any = ["admin", "coordinator"], conflicts_with_all = ["admin", "coordinator"])]
    site: Option<String>,
    #[arg(long, conflicts_with = "coordinator")]
    admin: Option<String>,
    /// The coordinator's own certificate; a running coordinator serves it from its next
    /// connection on, without a restart, once the kit's files are replaced.
    #[arg(long)]
    coordinator: bool,
    /// A new key pair too, for a key that may have been seen; the kit's key otherwise.
    #[arg(long)]
    new_key: bool,
    /// Revoke the identity's earlier certificates: copies of the old kit stop working.
    #[arg(long)]
    revoke_previous: bool,
    /// Lifetime of the new certificate.
    #[arg(long, default_value_t = 825, value_parser = clap::value_parser!(u32).range(1..=36500))]
    validity_days: u32,
}

pub fn renew_identity(args: RenewArgs) -> Result<()> {
    let (role, name) = match (args.site, args.admin, args.coordinator) {
        (Some(s), _, _) => (Role::Site, s),
        (None, Some(a), _) => (Role::Admin, a),
        (None, None, true) => (Role::Coordinator, "coordinator".to_string()),
        (None, None, false) => bail!("give --site NAME, --admin NAME or --coordinator"),
    };
    let renewal = renew(&RenewRequest {
        project_dir: args.project_dir,
        role,
        name: name.clone(),
        new_key: args.new_key,
        revoke_previous: args.revoke_previous,
        validity_days: args.validity_days,
    })?;
    println!(
        "{role}/{name}: new certificate {} valid until {}, in {}",
        renewal.record.serial,
        renewal.record.not_after,
        renewal.kit.display()
    );
    for path in &renewal.revocation_lists {
        println!("revocation list written: {}", path.display());
    }
    match role {
        Role::Coordinator => println!(
            "copy cert.pem{} to the coordinator's kit; it serves the new certificate from its next connection on",
            if args.new_key { " and key.pem" } else { "" }
        ),
        _ => println!(
            "copy cert.pem{} to the {role}'s kit; it is used from the next connection on",
            if args.new_key { " and key.pem" } else { "" }
        ),
    }
    Ok(())
}
