//! An in-process federation for the benchmarks: a provisioned project, a coordinator over real
//! mTLS on a loopback port, on a runtime of its own (so that its tasks can be counted apart
//! from the simulated sites'), and sites that push a fixed update instead of training, so that
//! the figures are the federation's own.

use std::path::PathBuf;

use alveolus_agent::transport::{Traffic, push_update};
use alveolus_coordinator::CoordinatorSettings;
use alveolus_coordinator::provision::{ProvisionRequest, provision};
use alveolus_models::Weights;
use alveolus_proto::PROTOCOL_VERSION;
use alveolus_proto::client::AdminClient;
use alveolus_proto::domain::{Metrics, Task, TrainTask, UpdateHeader};
use alveolus_proto::kit::ClientKit;
use alveolus_proto::pb::{self, federation_client::FederationClient};
use anyhow::{Context, Result};
use rand::{Rng, SeedableRng};
use tonic::transport::Channel;

pub struct SimulatedFederation {
    /// Holds the project and the state folder until the benchmark ends.
    pub dir: tempfile::TempDir,
    pub project: PathBuf,
    /// The coordinator's runtime: its metrics count the coordinator's tasks only.
    pub coordinator: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<std::thread::JoinHandle<Result<(), alveolus_coordinator::CoordinatorError>>>,
    /// Site names, `site-001` on.
    pub sites: Vec<String>,
}

impl SimulatedFederation {
    /// A project of `sites` sites and one admin, `bench`, and its coordinator serving.
    pub fn start(sites: usize) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = std_listener.local_addr()?.port();
        let names: Vec<String> = (1..=sites).map(|i| format!("site-{i:03}")).collect();
        let project = dir.path().join("project");
        provision(&ProvisionRequest {
            project: "bench".into(),
            coordinator: format!("127.0.0.1:{port}"),
            sites: names.clone(),
            admins: vec!["bench".into()],
            out: project.clone(),
            validity_days: 1,
        })?;
        let settings = CoordinatorSettings::load(
            &project.join("coordinator"),
            Some(&dir.path().join("state")),
        )?;
        std_listener.set_nonblocking(true)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("coordinator")
            .enable_all()
            .build()?;
        let coordinator = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = std::thread::spawn(move || {
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener)
                    .map_err(|e| alveolus_coordinator::CoordinatorError::Tls(e.to_string()))?;
                alveolus_coordinator::run(listener, settings, async {
                    let _ = stopped.await;
                })
                .await
            })
        });
        Ok(Self {
            dir,
            project,
            coordinator,
            stop: Some(stop),
            server: Some(server),
            sites: names,
        })
    }

    pub async fn admin(&self) -> Result<AdminClient> {
        Ok(AdminClient::connect(&self.project.join("admins").join("bench")).await?)
    }

    /// Site `name`, connected and joined.
    pub async fn join(&self, name: &str) -> Result<FederationClient<Channel>> {
        let kit = ClientKit::load(&self.project.join("sites").join(name))?;
        let mut client = FederationClient::new(kit.connect().await?);
        client
            .join(pb::JoinRequest {
                protocol_version: PROTOCOL_VERSION,
                agent_version: env!("CARGO_PKG_VERSION").into(),
            })
            .await?;
        Ok(client)
    }

    /// Stops the coordinator and waits for it.
    pub fn stop(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let server = self
            .server
            .take()
            .context("the coordinator was stopped twice")?;
        server
            .join()
            .map_err(|_| anyhow::anyhow!("the coordinator panicked"))??;
        Ok(())
    }
}

/// A fixed update of plausible size (a few local epochs' change), the same for every site.
pub fn fixed_update(model: &Weights) -> Weights {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut update = model.clone();
    for t in update.tensors.values_mut() {
        for v in &mut t.values {
            *v = rng.random_range(-0.01..0.01);
        }
    }
    update
}

/// Answers `task` with `update` in the clear, as an agent would, claiming 10 samples.
pub async fn push_plain(
    client: &mut FederationClient<Channel>,
    task: &TrainTask,
    update: &Weights,
    metrics: Metrics,
    traffic: &mut Traffic,
) -> Result<()> {
    let bytes = update.encode();
    let header = UpdateHeader {
        run_id: task.run_id.clone(),
        round: task.round,
        base_version: task.model_version.clone(),
        num_samples: 10,
        metrics,
        total_bytes: bytes.len() as u64,
        masked: false,
        train_seconds: None,
    };
    push_update(client, header, &bytes, traffic).await?;
    Ok(())
}

/// The next training task, long-polled as an agent does.
pub async fn take_task(client: &mut FederationClient<Channel>) -> Result<TrainTask> {
    loop {
        let task = client
            .next_task(pb::NextTaskRequest { wait_seconds: 10 })
            .await?
            .into_inner();
        if let Task::Train(task) = Task::try_from(task)? {
            return Ok(task);
        }
    }
}
