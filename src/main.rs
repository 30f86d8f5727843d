//! `alveolus`: the one binary. Argument parsing, wiring and human output only; each command
//! group lives in `cli/` as a thin layer over the coordinator, agent, imaging and models crates.

mod bench;
mod cli;
mod demo;
mod progress;
mod secagg_bench;
mod segment_bench;
mod simulate;
mod simulated;
mod soak_bench;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use cli::bench::BenchCommand;
use cli::dashboard::DashboardArgs;
use cli::data::DataCommand;
use cli::local::{EvaluateArgs, TrainArgs};
use cli::model::ModelCommand;
use cli::privacy::PrivacyCommand;
use cli::project::{ProvisionArgs, RenewArgs, RevokeArgs};
use cli::run::RunCommand;
use cli::segment::SegmentArgs;
use cli::service::{AgentArgs, CoordinatorArgs, HealthArgs};
use cli::sites::SitesCommand;

#[derive(Parser)]
#[command(
    name = "alveolus",
    version,
    about = "Federated training of chest-CT segmentation models across hospitals"
)]
struct Cli {
    /// Log filter (error, warn, info, debug, or a tracing filter); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    log: String,
    /// How log lines are written to standard error: `text` for people, `json` (one object per
    /// line) for log shippers such as journald exporters, Fluent Bit or Vector.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Reach the coordinator through this HTTP proxy (`http://[USER:PASSWORD@]HOST:PORT`), with
    /// mutual TLS end to end through its CONNECT tunnel. Without it, HTTPS_PROXY is used unless
    /// NO_PROXY names the coordinator's host (loopback is always reached directly).
    #[arg(long, global = true, value_name = "URL")]
    proxy: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Create a project CA and a startup kit for the coordinator, each site and each admin.
    Provision(ProvisionArgs),
    /// Revoke a site's or admin's certificate; the coordinator refuses it from its next call on.
    Revoke(RevokeArgs),
    /// A fresh certificate for a site, an admin or the coordinator of a project, before the
    /// old one expires (the same identity, optionally a new key).
    Renew(RenewArgs),
    /// Run the coordinator from its kit.
    Coordinator(CoordinatorArgs),
    /// Run a site agent: trains on local data, sends only weight updates.
    Agent(AgentArgs),
    /// Ask the coordinator whether it is serving (the gRPC health check probes make); exits
    /// non-zero when it is not or cannot be reached.
    Health(HealthArgs),
    /// Start, follow and stop federated runs (admin kit).
    Run {
        #[command(subcommand)]
        command: RunCommand,
    },
    /// Sites the coordinator knows (admin kit).
    Sites {
        #[command(subcommand)]
        command: SitesCommand,
    },
    /// The coordinator's runs and sites, live in a browser (admin kit).
    Dashboard(DashboardArgs),
    /// Download global models.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// Train on one folder of labelled slices, without federation: the central or
    /// single-site baseline a federated run has to beat.
    Train(TrainArgs),
    /// Dice of a model on labelled data (a dataset.toml or a PNG slice folder), and HD95 in mm
    /// where the data are volumes.
    Evaluate(EvaluateArgs),
    /// Draft the lungs and the COVID-19 lesions of new scans with a model: labels on the scan's
    /// own grid (NIfTI, and a DICOM SEG for DICOM series), volumes and involvement, a preview.
    Segment(SegmentArgs),
    /// Differential-privacy planning.
    Privacy {
        #[command(subcommand)]
        command: PrivacyCommand,
    },
    /// Check and describe a site's data, write a synthetic chest-CT dataset, or add a case.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
    /// Measure against named peers: training and segmentation against PyTorch, secure
    /// aggregation against aggregation in the clear.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// Everything on one machine: a coordinator and three hospital agents over real mTLS.
    Demo(demo::DemoArgs),
    /// Federated rounds over local site folders in one process, for research: the
    /// coordinator's engine and the sites' training without certificates or network.
    Simulate(simulate::SimulateArgs),
}

impl Command {
    /// Whether the command dials the coordinator, and so reads the proxy settings.
    fn connects(&self) -> bool {
        matches!(
            self,
            Command::Agent(_)
                | Command::Health(_)
                | Command::Run { .. }
                | Command::Sites { .. }
                | Command::Dashboard(_)
                | Command::Model { .. }
        )
    }

    /// Whether the command trains or runs a network, and so wants freed activation buffers kept
    /// for the next step (`models::device::hold_freed_memory`).
    fn runs_networks(&self) -> bool {
        matches!(
            self,
            Command::Agent(_)
                | Command::Train(_)
                | Command::Evaluate(_)
                | Command::Segment(_)
                | Command::Demo(_)
                | Command::Simulate(_)
                | Command::Bench {
                    command: cli::bench::BenchCommand::Train(_)
                        | cli::bench::BenchCommand::Segment(_)
                }
        )
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&cli.log))
        .context("invalid --log filter")?;
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        // Fields at the top level, the span list left out: what shippers index directly.
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
    let proxy = cli
        .proxy
        .as_deref()
        .map(|url| alveolus_proto::proxy::Proxy::parse(url, "--proxy"))
        .transpose()?;
    if proxy.is_none() && cli.command.connects() {
        alveolus_proto::proxy::from_environment()?;
    }
    alveolus_proto::proxy::set_explicit(proxy);
    alveolus_proto::install_crypto_provider();
    if matches!(cli.command, Command::Coordinator(_)) {
        cli::service::tune_allocator();
    }
    if cli.command.runs_networks() {
        alveolus_models::device::hold_freed_memory();
    }
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(dispatch(cli.command))
}

async fn dispatch(command: Command) -> Result<()> {
    match command {
        Command::Provision(args) => cli::project::provision_project(args),
        Command::Revoke(args) => cli::project::revoke_identity(args),
        Command::Renew(args) => cli::project::renew_identity(args),
        Command::Coordinator(args) => cli::service::run_coordinator(args).await,
        Command::Agent(args) => cli::service::run_agent(args).await,
        Command::Health(args) => cli::service::check_health(args).await,
        Command::Run { command } => cli::run::run_command(command).await,
        Command::Sites { command } => cli::sites::sites_command(command).await,
        Command::Dashboard(args) => cli::dashboard::run_dashboard(args).await,
        Command::Model { command } => cli::model::model_command(command).await,
        Command::Train(args) => cli::local::train(args).await,
        Command::Evaluate(args) => cli::local::evaluate_model(args).await,
        Command::Segment(args) => cli::segment::run(args).await,
        Command::Privacy { command } => cli::privacy::privacy_command(command),
        Command::Data { command } => cli::data::data_command(command).await,
        Command::Bench { command } => cli::bench::bench_command(command).await,
        Command::Demo(args) => demo::run_demo(args).await,
        Command::Simulate(args) => simulate::simulate(args).await,
    }
}
