//! `dashboard` (admin kit): the live web page of the coordinator's runs and sites, served on the
//! researcher's machine.

use std::path::PathBuf;

use alveolus_dashboard::Dashboard;
use anyhow::Result;
use clap::Args;

use super::shutdown_signal;

#[derive(Args)]
pub struct DashboardArgs {
    /// An admin kit: the dashboard reads the coordinator with it over mTLS.
    #[arg(long)]
    kit: PathBuf,
    /// Where the page is served (plain HTTP): keep it on loopback unless the network is trusted.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
}

pub async fn run_dashboard(args: DashboardArgs) -> Result<()> {
    let dashboard = Dashboard::open(&args.kit)?;
    let listener = alveolus_dashboard::bind(&args.listen).await?;
    let address = listener.local_addr()?;
    println!("dashboard on http://{address}/ (Ctrl-C to stop)");
    alveolus_dashboard::serve(listener, dashboard, shutdown_signal()).await?;
    Ok(())
}
