//! Shared harness for the end-to-end tests: real certificates, a real coordinator on port 0 (or
//! as a process), real agent processes, real MedSeg slices.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use alveolus_coordinator::CoordinatorSettings;
use alveolus_coordinator::provision::{ProvisionRequest, provision};
use alveolus_models::{ModelSpec, Weights};
use alveolus_proto::PROTOCOL_VERSION;
use alveolus_proto::domain::{RunConfig, RunInfo, Task, TrainTask, TrainingConfig};
use alveolus_proto::kit::ClientKit;
use alveolus_proto::pb::{self, admin_client::AdminClient, federation_client::FederationClient};
use alveolus_proto::transfer::framed;
use tempfile::TempDir;
use tokio::sync::oneshot;
use tonic::transport::Channel;

pub const BIN: &str = env!("CARGO_BIN_EXE_alveolus");

pub struct Project {
    /// Keeps the temporary folder alive for the test's duration.
    pub tmp: TempDir,
    pub root: PathBuf,
    pub port: u16,
}

impl Project {
    pub fn site_kit(&self, site: &str) -> PathBuf {
        self.root.join("sites").join(site)
    }
    pub fn admin_kit(&self) -> PathBuf {
        self.root.join("admins").join("researcher")
    }
    pub fn coordinator_kit(&self) -> PathBuf {
        self.root.join("coordinator")
    }
    pub fn state(&self) -> PathBuf {
        self.tmp.path().join("state")
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A project with the given sites and one admin, `researcher`, whose coordinator is
/// 127.0.0.1 on `port`.
pub fn project_on(port: u16, name: &str, sites: &[&str]) -> Project {
    alveolus_proto::install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("project");
    provision(&ProvisionRequest {
        project: name.into(),
        coordinator: format!("127.0.0.1:{port}"),
        sites: sites.iter().map(|s| s.to_string()).collect(),
        admins: vec!["researcher".into()],
        out: root.clone(),
        validity_days: 2,
    })
    .unwrap();
    Project { tmp, root, port }
}

pub fn project(sites: &[&str]) -> Project {
    project_on(free_port(), "lungs", sites)
}

/// A coordinator served in this process; stops when dropped.
pub struct InProcessCoordinator {
    stop: Option<oneshot::Sender<()>>,
    pub task: tokio::task::JoinHandle<()>,
}

impl Drop for InProcessCoordinator {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl InProcessCoordinator {
    /// Stops the coordinator and waits until it has let go of its port and state.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.unwrap();
    }
}

pub async fn start_coordinator(project: &Project) -> InProcessCoordinator {
    start_coordinator_with(project, |_| {}).await
}

/// A coordinator with some of its kit's settings changed.
pub async fn start_coordinator_with(
    project: &Project,
    change: impl FnOnce(&mut CoordinatorSettings),
) -> InProcessCoordinator {
    start_coordinator_observed(project, change, None).await
}

/// A coordinator with changed settings, serving Prometheus metrics on `metrics` if given.
pub async fn start_coordinator_observed(
    project: &Project,
    change: impl FnOnce(&mut CoordinatorSettings),
    metrics: Option<tokio::net::TcpListener>,
) -> InProcessCoordinator {
    let mut settings =
        CoordinatorSettings::load(&project.coordinator_kit(), Some(&project.state())).unwrap();
    change(&mut settings);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", project.port))
        .await
        .unwrap();
    let (stop, stopped) = oneshot::channel();
    let task = tokio::spawn(async move {
        alveolus_coordinator::run_with_metrics(listener, metrics, settings, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    InProcessCoordinator {
        stop: Some(stop),
        task,
    }
}

/// A child process that is killed when dropped.
pub struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn spawn(args: &[&str], log: &Path) -> Process {
    let log = std::fs::File::create(log).unwrap();
    Process(
        Command::new(BIN)
            .args(args)
            .env("RAYON_NUM_THREADS", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

pub fn spawn_agent(project: &Project, site: &str, data: &Path) -> Process {
    spawn_agent_with(project, site, data, &[])
}

/// An agent process with `extra` arguments after the usual ones.
pub fn spawn_agent_with(project: &Project, site: &str, data: &Path, extra: &[&str]) -> Process {
    let audit = project.path(&format!("audit-{site}"));
    let kit = project.site_kit(site);
    let mut args = vec![
        "agent",
        "--kit",
        kit.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--audit-dir",
        audit.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    spawn(&args, &project.path(&format!("{site}.log")))
}

pub fn spawn_coordinator(project: &Project) -> Process {
    spawn_coordinator_on(project, project.port, "coordinator.log")
}

/// A coordinator process on `port` (the kits may name a proxy in front of it), logging to `log`
/// in the project's folder.
pub fn spawn_coordinator_on(project: &Project, port: u16, log: &str) -> Process {
    spawn_coordinator_with(project, port, log, &[])
}

/// [`spawn_coordinator_on`] with `extra` arguments after the usual ones.
pub fn spawn_coordinator_with(project: &Project, port: u16, log: &str, extra: &[&str]) -> Process {
    let kit = project.coordinator_kit();
    let state = project.state();
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec![
        "coordinator",
        "--kit",
        kit.to_str().unwrap(),
        "--state",
        state.to_str().unwrap(),
        "--listen",
        &listen,
    ];
    args.extend_from_slice(extra);
    spawn(&args, &project.path(log))
}

/// `count` MedSeg slices of `block`, copied into a fresh site folder.
pub fn site_data(project: &Project, name: &str, block: usize, count: usize) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/medseg");
    let dest = project.path(&format!("data-{name}"));
    let first = block * 25;
    let mut copied = 0;
    for index in first..first + 25 {
        let file = format!("{index:03}.png");
        if !source.join("images").join(&file).exists() {
            continue;
        }
        for sub in ["images", "masks"] {
            std::fs::create_dir_all(dest.join(sub)).unwrap();
            std::fs::copy(source.join(sub).join(&file), dest.join(sub).join(&file)).unwrap();
        }
        copied += 1;
        if copied == count {
            break;
        }
    }
    dest
}

/// A site folder with a `dataset.toml`: the first `train` MedSeg slices of `block` as `train`
/// cases, the next `validation` as `validation` cases.
pub fn site_dataset(
    project: &Project,
    name: &str,
    block: usize,
    train: usize,
    validation: usize,
) -> PathBuf {
    let dest = site_data(project, name, block, train + validation);
    let mut names: Vec<String> = std::fs::read_dir(dest.join("images"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut toml = String::new();
    for (i, file) in names.iter().enumerate() {
        let split = if i < train { "train" } else { "validation" };
        toml.push_str(&format!(
            "[[case]]\nid = \"case-{i}\"\nimage = \"images/{file}\"\nlabels = \"masks/{file}\"\nsplit = \"{split}\"\n\n"
        ));
    }
    std::fs::write(dest.join("dataset.toml"), toml).unwrap();
    dest
}

pub fn tiny_model(seed: u64) -> Weights {
    alveolus_models::network::initial_weights(&ModelSpec::tiny(), seed).unwrap()
}

pub fn run_config(rounds: u32, min_sites: u32, deadline_seconds: u32) -> RunConfig {
    RunConfig {
        rounds,
        min_sites,
        deadline_seconds,
        training: TrainingConfig {
            local_epochs: 1,
            learning_rate: 1e-3,
            batch_size: 4,
            seed: 3,
            ..TrainingConfig::default()
        },
        ..RunConfig::default()
    }
}

pub async fn connect(kit: &Path) -> Channel {
    let kit = ClientKit::load(kit).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match kit.connect().await {
            Ok(channel) => return channel,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("cannot connect: {e}"),
        }
    }
}

pub async fn admin(project: &Project) -> AdminClient<Channel> {
    AdminClient::new(connect(&project.admin_kit()).await)
}

/// The researcher's typed client over this raw one (what the CLI and the demo use).
pub fn typed(admin: &AdminClient<Channel>) -> alveolus_proto::client::AdminClient {
    admin.clone().into()
}

pub async fn start_run(
    admin: &mut AdminClient<Channel>,
    config: RunConfig,
    weights: &Weights,
) -> RunInfo {
    typed(admin)
        .start_run(config, weights.encode())
        .await
        .unwrap()
}

/// The StartRun messages for `config` and `weights`.
pub fn start_run_stream(
    config: RunConfig,
    weights: &Weights,
) -> impl futures::Stream<Item = pb::StartRunChunk> + use<> {
    let bytes = weights.encode();
    let mut config = pb::RunConfig::from(config);
    config.initial_model_bytes = bytes.len() as u64;
    futures::stream::iter(framed::<pb::StartRunChunk>(config, &bytes))
}

pub async fn get_run(admin: &mut AdminClient<Channel>, run_id: &str) -> RunInfo {
    typed(admin).run(run_id).await.unwrap()
}

/// Polls until `done(run)` holds, failing after `timeout`.
pub async fn wait_for(
    admin: &mut AdminClient<Channel>,
    run_id: &str,
    timeout: Duration,
    done: impl Fn(&RunInfo) -> bool,
) -> RunInfo {
    let deadline = Instant::now() + timeout;
    loop {
        let info = get_run(admin, run_id).await;
        if done(&info) {
            return info;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting; run is {info:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the coordinator has heard from every named site.
pub async fn wait_for_sites(admin: &mut AdminClient<Channel>, sites: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let known = admin
            .list_sites(pb::ListSitesRequest {})
            .await
            .unwrap()
            .into_inner()
            .sites;
        if sites.iter().all(|s| known.iter().any(|k| k.name == *s)) {
            return;
        }
        assert!(Instant::now() < deadline, "sites did not join: {known:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub fn read_weights(path: &Path) -> Weights {
    Weights::decode(&std::fs::read(path).unwrap()).unwrap()
}

/// An update with every value set to `value`, in the layout of `model`.
pub fn constant_update(model: &Weights, value: f32) -> Weights {
    Weights {
        tensors: model
            .tensors
            .iter()
            .map(|(n, t)| {
                let values = vec![value; t.values.len()];
                (
                    n.clone(),
                    alveolus_models::NamedTensor {
                        shape: t.shape.clone(),
                        values,
                    },
                )
            })
            .collect(),
        metadata: Default::default(),
    }
}

/// Joins as the site named by `client`'s certificate and waits up to `wait_seconds` for a
/// training task, as an agent would.
pub async fn join_and_take_task(
    client: &mut FederationClient<Channel>,
    agent_version: &str,
    wait_seconds: u32,
) -> TrainTask {
    client
        .join(pb::JoinRequest {
            protocol_version: PROTOCOL_VERSION,
            agent_version: agent_version.into(),
        })
        .await
        .unwrap();
    let task = client
        .next_task(pb::NextTaskRequest { wait_seconds })
        .await
        .unwrap()
        .into_inner();
    let Task::Train(task) = Task::try_from(task).unwrap() else {
        panic!("expected a training task")
    };
    task
}

/// Pushes `update` as the answer to `task`, as an agent would.
pub async fn push_update(
    client: &mut FederationClient<Channel>,
    task: &TrainTask,
    update: &Weights,
    samples: u64,
) -> Result<u32, tonic::Status> {
    let metrics = pb::Metrics {
        loss: 1.0,
        dice: 0.5,
    };
    push_update_reporting(client, task, update, samples, metrics).await
}

/// Pushes `update` as the answer to `task` with the given sample count and metrics.
pub async fn push_update_reporting(
    client: &mut FederationClient<Channel>,
    task: &TrainTask,
    update: &Weights,
    samples: u64,
    metrics: pb::Metrics,
) -> Result<u32, tonic::Status> {
    let bytes = update.encode();
    let header = pb::UpdateHeader {
        run_id: task.run_id.clone(),
        round: task.round,
        base_version: task.model_version.clone(),
        num_samples: samples,
        metrics: Some(metrics),
        total_bytes: bytes.len() as u64,
        masked: false,
        train_seconds: 0.0,
    };
    let messages: Vec<pb::UpdateChunk> = framed(header, &bytes);
    client
        .push_update(futures::stream::iter(messages))
        .await
        .map(|r| r.into_inner().reports_this_round)
}

/// `program` on PATH, as Debian installs it.
pub fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|path| path.is_file())
    })
}

/// One HTTP/1.0 exchange with `address` (the server closes when done, so there is no chunked
/// body to undo); the whole response, head and body, its status line read as HTTP/1.1.
pub fn http(address: &str, method: &str, target: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "{method} {target} HTTP/1.0\r\nHost: {address}\r\nContent-Length: 0\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    Ok(String::from_utf8_lossy(&response).replacen("HTTP/1.0", "HTTP/1.1", 1))
}

/// What a finished process printed: its standard output, then its standard error.
pub fn printed(output: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The binary with `args` and `env`, its exit status and what it printed. The machine's own
/// proxy variables are cleared first, so that only `env` decides the route.
pub async fn cli(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let mut command = tokio::process::Command::new(BIN);
    command.args(args).stdin(Stdio::null());
    for var in ["HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"] {
        command.env_remove(var);
    }
    command.envs(env.iter().copied());
    let output = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .expect("the command ran for two minutes")
        .unwrap();
    (output.status.success(), printed(&output))
}

/// A script of the repository's `scripts/` run with `args`, which must succeed; what it printed.
pub fn run_script(name: &str, args: &[&str]) -> String {
    let output = Command::new(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("scripts")
            .join(name),
    )
    .args(args)
    .current_dir(env!("CARGO_MANIFEST_DIR"))
    .output()
    .unwrap();
    let text = printed(&output);
    assert!(output.status.success(), "scripts/{name} {args:?}: {text}");
    text
}
