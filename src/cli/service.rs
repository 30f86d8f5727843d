//! `coordinator` and `agent`: the two services that run until stopped.

use std::path::PathBuf;

use alveolus_agent::{AgentOptions, SiteData};
use alveolus_coordinator::CoordinatorSettings;
use alveolus_models::{DeviceChoice, Precision};
use alveolus_proto::identity::Role;
use alveolus_proto::kit::ClientKit;
use anyhow::{Context, Result, bail};
use clap::Args;

use super::{print_notes, shutdown_signal};

#[derive(Args)]
pub struct CoordinatorArgs {
    #[arg(long)]
    kit: PathBuf,
    /// State folder (checkpoints, run log); defaults to the kit's `state_dir`.
    #[arg(long)]
    state: Option<PathBuf>,
    /// Listen address; defaults to the kit's `listen`.
    #[arg(long)]
    listen: Option<String>,
    /// Serve Prometheus metrics in plain HTTP at http://ADDR/metrics (e.g. 127.0.0.1:9464).
    /// Off unless given; choose loopback or a monitoring network, not the sites' address.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
}

/// Sets glibc's allocator for the coordinator's process, before any thread starts.
///
/// Left alone, glibc raises its mmap threshold each time a large buffer is freed, so the
/// model-sized buffers of later uploads come from per-thread arenas that keep what they free;
/// the coordinator's peak memory then followed how many threads happened to touch an update
/// rather than what it holds (tests/memory.rs: 80 to 120 MB at one load). A fixed 1 MiB threshold
/// hands every model-sized buffer back to the system when it is dropped, and two arenas keep the
/// small allocations of many connections together: 58 to 76 MB at the same load. The coordinator
/// waits on the network, not on the allocator.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

pub async fn run_coordinator(args: CoordinatorArgs) -> Result<()> {
    let settings = CoordinatorSettings::load(&args.kit, args.state.as_deref())?;
    let address = args.listen.unwrap_or_else(|| settings.listen.clone());
    let listener = tokio::net::TcpListener::bind(&address)
        .await
        .with_context(|| format!("cannot listen on {address}"))?;
    let metrics = bind_metrics(args.metrics.as_deref()).await?;
    tracing::info!(
        project = %settings.project,
        address = %listener.local_addr()?,
        state = %settings.state_dir.display(),
        "coordinator listening"
    );
    alveolus_coordinator::run_with_metrics(listener, metrics, settings, shutdown_signal()).await?;
    Ok(())
}

/// The metrics listener, bound before the service starts so that a port in use stops it with
/// the address named.
async fn bind_metrics(address: Option<&str>) -> Result<Option<tokio::net::TcpListener>> {
    match address {
        None => Ok(None),
        Some(address) => Ok(Some(alveolus_telemetry::bind(address).await?)),
    }
}

#[derive(Args)]
pub struct AgentArgs {
    #[arg(long)]
    kit: PathBuf,
    /// The site's data: a dataset.toml (or a folder holding one) or a PNG slice folder
    /// (images/, masks/). `alveolus data validate` checks it first.
    #[arg(long)]
    data: PathBuf,
    /// Train without the cases that have errors (they are listed) instead of refusing.
    #[arg(long)]
    skip_bad_cases: bool,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceChoice,
    /// Train at this precision whatever the run asks (f32, bf16, f16): for a GPU without
    /// bf16 (before NVIDIA's Ampere), or to keep a CPU at f32, where half precision is slower.
    /// The run's own precision otherwise.
    #[arg(long)]
    precision: Option<Precision>,
    /// Keep a copy of every update sent here.
    #[arg(long)]
    audit_dir: Option<PathBuf>,
    /// Under FedBN, write this site's own model of each round here (RUN-roundNNNN.safetensors:
    /// the round's global model with this site's normalisation layers), when the site measures
    /// it; the published global model keeps the run's initial ones. This is the model to
    /// segment this site's scans with.
    #[arg(long, value_name = "DIR")]
    site_models: Option<PathBuf>,
    /// Serve Prometheus metrics in plain HTTP at http://ADDR/metrics (e.g. 127.0.0.1:9465).
    /// Off unless given. The agent still only dials out to the coordinator; this port is for
    /// the site's own monitoring.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
}

pub async fn run_agent(args: AgentArgs) -> Result<()> {
    let kit = ClientKit::load(&args.kit)?;
    if kit.identity.role != Role::Site {
        bail!(
            "{} is an {} kit; agents need a site kit",
            kit.dir.display(),
            kit.identity.role
        );
    }
    let expires = kit.certificate_expires()?;
    let now = alveolus_coordinator::clock::unix_ms() / 1000;
    if expires <= now {
        bail!(
            "the site's certificate in {} expired on {}: the coordinator would refuse it; ask the project's operator for a renewed kit",
            kit.dir.display(),
            alveolus_proto::kit::utc(expires)
        );
    }
    if let Some(warning) = alveolus_proto::kit::expiry_warning("this site's", expires, now) {
        tracing::warn!("{warning}");
    }
    let (data, notes) = SiteData::load(&args.data, args.skip_bad_cases)?;
    print_notes(&notes.skipped, &notes.warned);
    match alveolus_proto::proxy::for_address(&kit.config.coordinator)? {
        Some(proxy) => tracing::info!(
            coordinator = %kit.config.coordinator,
            %proxy,
            "reaching the coordinator through the proxy"
        ),
        None => {
            tracing::info!(coordinator = %kit.config.coordinator, "reaching the coordinator directly")
        }
    }
    let options = AgentOptions {
        device: args.device,
        precision: args.precision,
        audit_dir: args.audit_dir,
        site_models: args.site_models,
        ..AgentOptions::default()
    };
    if let Some(listener) = bind_metrics(args.metrics.as_deref()).await? {
        let mut registry = alveolus_telemetry::prometheus_client::registry::Registry::default();
        options.metrics.register(&mut registry);
        alveolus_telemetry::spawn(listener, registry, std::future::pending());
    }
    alveolus_agent::run_agent(kit, data, options, shutdown_signal()).await?;
    Ok(())
}

#[derive(Args)]
pub struct HealthArgs {
    /// Any kit of the project (site or admin): the coordinator answers only over mutual TLS.
    #[arg(long)]
    kit: PathBuf,
    /// The gRPC service to ask about (`alveolus.v1.Federation`, `alveolus.v1.Admin`); the
    /// coordinator as a whole when not given.
    #[arg(long, default_value = "")]
    service: String,
}

/// `alveolus health`: the `grpc.health.v1` check a probe makes; succeeds only when the
/// coordinator answers SERVING, so that shell scripts and monitoring can use its exit status.
pub async fn check_health(args: HealthArgs) -> Result<()> {
    let kit = ClientKit::load(&args.kit)?;
    let started = std::time::Instant::now();
    let status = alveolus_proto::client::health(&kit, &args.service).await?;
    let what = if args.service.is_empty() {
        "the coordinator".to_string()
    } else {
        args.service.clone()
    };
    let line = format!(
        "{what} at {}: {status} ({} ms)",
        kit.config.coordinator,
        started.elapsed().as_millis()
    );
    if status != alveolus_proto::client::HealthStatus::Serving {
        bail!(line);
    }
    println!("{line}");
    Ok(())
}
