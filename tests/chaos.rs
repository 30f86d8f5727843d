//! Faults the federation must outlive, with real agents and a coordinator process: a network
//! that delays, throttles, resets and goes silent mid-transfer; the coordinator SIGKILLed at 20
//! random moments (plain and secure rounds; half of them just as an update is accepted, while
//! other uploads stream and the checkpoint is about to be written); and its disk filling up
//! while it writes a checkpoint. Every finished round stays intact and every run completes.
//!
//! Slow (minutes), so it runs only with ALVEOLUS_SLOW_TESTS=1, as CI does. The disk test mounts
//! a small tmpfs in a private mount namespace (`unshare`), so it needs user namespaces or root.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use alveolus_proto::client::pull_model_with_kit;
use alveolus_proto::domain::{RoundSummary, RunConfig, RunInfo, RunState, SecureAggregationConfig};
use alveolus_proto::pb::federation_client::FederationClient;
use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn slow_tests_enabled() -> bool {
    let enabled = std::env::var_os("ALVEOLUS_SLOW_TESTS").is_some();
    if !enabled {
        eprintln!("skipped: set ALVEOLUS_SLOW_TESTS=1 to run the chaos tests");
    }
    enabled
}

const SITES: [&str; 3] = ["alpha", "beta", "gamma"];

fn agents(project: &Project) -> Vec<Process> {
    SITES
        .iter()
        .enumerate()
        .map(|(i, site)| spawn_agent(project, site, &site_data(project, site, i, 3)))
        .collect()
}

/// The run as the coordinator says it, asked again while it restarts.
async fn run_info(project: &Project, run_id: &str) -> RunInfo {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut admin = typed(&admin(project).await);
        match admin.run(run_id).await {
            Ok(info) => return info,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("run {run_id} not readable: {e}"),
        }
    }
}

/// Every finished round's checkpoint pulls, digest-checked, from the coordinator.
async fn every_checkpoint_reads(project: &Project, info: &RunInfo) {
    let versions =
        std::iter::once(&info.initial_version).chain(info.rounds.iter().map(|r| &r.version));
    for version in versions {
        let (header, bytes) = pull_model_with_kit(&project.admin_kit(), version)
            .await
            .unwrap_or_else(|e| panic!("checkpoint {version} does not read: {e}"));
        assert_eq!(
            (header.version.as_str(), bytes.len() as u64),
            (version.as_str(), header.total_bytes)
        );
    }
}

fn assert_kept(before: &[RoundSummary], after: &RunInfo, what: &str) {
    assert!(
        after.rounds.starts_with(before),
        "{what}: finished rounds changed or were lost\nbefore: {before:?}\nafter: {:?}",
        after.rounds
    );
}

// ---------------------------------------------------------------------------------------------
// A faulty network

/// What the proxy does to one connection, besides its latency and bandwidth.
#[derive(Clone, Copy, Debug)]
enum Fault {
    None,
    /// Reset (RST) once this many bytes went from the coordinator to the agent.
    ResetDown(u64),
    /// Reset once this many bytes went from the agent to the coordinator.
    ResetUp(u64),
    /// Once this many bytes went to the agent, forward nothing more either way and keep both
    /// sockets open: a half-open connection, as a dead NAT or firewall leaves it.
    SilentDown(u64),
}

#[derive(Default)]
struct Fired {
    resets_down: AtomicU32,
    resets_up: AtomicU32,
    silences: AtomicU32,
    connections: AtomicUsize,
}

/// A TCP proxy from `listener` to `upstream`: every chunk delayed by `latency` and paced to
/// `bytes_per_second`; connection `i` (in accept order) suffers `faults[i]`.
fn fault_proxy(
    listener: std::net::TcpListener,
    upstream: u16,
    faults: Vec<Fault>,
    latency: Duration,
    bytes_per_second: u64,
) -> Arc<Fired> {
    let fired = Arc::new(Fired::default());
    let counts = fired.clone();
    listener.set_nonblocking(true).unwrap();
    let listener = TcpListener::from_std(listener).unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                continue;
            };
            let index = counts.connections.fetch_add(1, Ordering::SeqCst);
            let fault = faults.get(index).copied().unwrap_or(Fault::None);
            let counts = counts.clone();
            tokio::spawn(async move {
                relay(client, upstream, fault, latency, bytes_per_second, &counts).await
            });
        }
    });
    fired
}

async fn relay(
    mut client: TcpStream,
    upstream: u16,
    fault: Fault,
    latency: Duration,
    bytes_per_second: u64,
    fired: &Fired,
) {
    let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
        return;
    };
    let pace = |n: usize| latency + Duration::from_secs_f64(n as f64 / bytes_per_second as f64);
    let (mut up, mut down) = (0u64, 0u64);
    let (mut a, mut b) = (vec![0u8; 16 << 10], vec![0u8; 16 << 10]);
    enum End {
        Closed,
        Reset,
        Silent,
    }
    let end = loop {
        tokio::select! {
            read = client.read(&mut a) => {
                let n = match read { Ok(0) | Err(_) => break End::Closed, Ok(n) => n };
                up += n as u64;
                if matches!(fault, Fault::ResetUp(at) if up >= at) {
                    fired.resets_up.fetch_add(1, Ordering::SeqCst);
                    break End::Reset;
                }
                tokio::time::sleep(pace(n)).await;
                if server.write_all(&a[..n]).await.is_err() { break End::Closed }
            }
            read = server.read(&mut b) => {
                let n = match read { Ok(0) | Err(_) => break End::Closed, Ok(n) => n };
                down += n as u64;
                match fault {
                    Fault::ResetDown(at) if down >= at => {
                        fired.resets_down.fetch_add(1, Ordering::SeqCst);
                        break End::Reset;
                    }
                    Fault::SilentDown(at) if down >= at => {
                        fired.silences.fetch_add(1, Ordering::SeqCst);
                        break End::Silent;
                    }
                    _ => {}
                }
                tokio::time::sleep(pace(n)).await;
                if client.write_all(&b[..n]).await.is_err() { break End::Closed }
            }
        }
    };
    match end {
        End::Closed => {}
        End::Reset => {
            // SO_LINGER 0: closing sends RST, not FIN, to both ends.
            // (Deprecated for blocking on drop; a zero linger does not block.)
            for stream in [&client, &server] {
                #[allow(deprecated)]
                let _ = stream.set_linger(Some(Duration::ZERO));
            }
        }
        End::Silent => {
            // Both sockets stay open and unread until the test ends.
            std::future::pending::<()>().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn agents_behind_a_faulty_network_finish_every_round() {
    if !slow_tests_enabled() {
        return;
    }
    let proxy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let project = project_on(proxy.local_addr().unwrap().port(), "lungs", &SITES);
    let coordinator_port = free_port();
    let _coordinator = spawn_coordinator_on(&project, coordinator_port, "coordinator.log");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", coordinator_port)).is_err() {
        assert!(Instant::now() < deadline, "the coordinator did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Connection 0 is the test's own; 1-3 are the agents' first: two break half-way through
    // their first download, one half-way through its second upload.
    let model = tiny_model(2);
    let size = model.encode().len() as u64;
    let faults = vec![
        Fault::None,
        Fault::ResetDown(size / 2),
        Fault::SilentDown(size / 2),
        Fault::ResetUp(size + size / 2),
    ];
    let fired = fault_proxy(
        proxy,
        coordinator_port,
        faults,
        Duration::from_millis(2),
        4 << 20,
    );
    let mut admin = admin(&project).await;
    let _agents = agents(&project);
    wait_for_sites(&mut admin, &SITES).await;
    let rounds = 3;
    let run = start_run(&mut admin, run_config(rounds, 3, 240), &model).await;
    let done = wait_for(&mut admin, &run.run_id, Duration::from_secs(400), |r| {
        r.state != RunState::Running
    })
    .await;
    assert_eq!(done.state, RunState::Completed, "{done:?}");
    assert_eq!(done.rounds.len(), rounds as usize);
    for round in &done.rounds {
        assert_eq!(
            round.sites.len(),
            SITES.len(),
            "round {} lost a site",
            round.round
        );
    }
    let fired = (
        fired.resets_down.load(Ordering::SeqCst),
        fired.silences.load(Ordering::SeqCst),
        fired.resets_up.load(Ordering::SeqCst),
    );
    assert_eq!(fired, (1, 1, 1), "(resets down, silences, resets up)");
    println!(
        "faulty network: {rounds} rounds completed, every site in each, through a reset \
         mid-download, a silent half-open connection and a reset mid-upload"
    );
}

// ---------------------------------------------------------------------------------------------
// SIGKILL at random moments

fn secure(config: RunConfig) -> RunConfig {
    RunConfig {
        secure_aggregation: Some(SecureAggregationConfig { threshold: 2 }),
        ..config
    }
}

/// The last thing the coordinator logged, for the record of where a kill landed.
fn last_line(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let line = text.lines().last().unwrap_or("").to_string();
    line.chars().skip_while(|c| *c != ' ').take(110).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_coordinator_killed_at_twenty_random_moments_loses_no_finished_round() {
    if !slow_tests_enabled() {
        return;
    }
    const KILLS: u32 = 20;
    // The first 12 kills hit plain runs, the rest secure-aggregation runs.
    const PLAIN_KILLS: u32 = 12;
    // Long enough that most runs see several kills; a run that ends first is followed by
    // another until all 20 have been made.
    const ROUNDS: u32 = 10;
    let seed = std::env::var("ALVEOLUS_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs()
        });
    println!("kill moments from seed {seed} (ALVEOLUS_CHAOS_SEED repeats them)");
    let mut rng = StdRng::seed_from_u64(seed);
    let project = project(&SITES);
    let log = |n: u32| format!("coordinator-{n}.log");
    let mut coordinator = spawn_coordinator_on(&project, project.port, &log(0));
    let _agents = agents(&project);
    wait_for_sites(&mut admin(&project).await, &SITES).await;

    let mut kills = 0;
    let mut runs = Vec::new();
    while kills < KILLS {
        let config = run_config(ROUNDS, 3, 120);
        let config = if kills < PLAIN_KILLS {
            config
        } else {
            secure(config)
        };
        let run = start_run(
            &mut admin(&project).await,
            config,
            &tiny_model(kills.into()),
        )
        .await;
        let mut seen = Vec::new();
        loop {
            let wait = Duration::from_millis(rng.random_range(200..2500));
            tokio::time::sleep(wait).await;
            let before = run_info(&project, &run.run_id).await;
            assert_kept(&seen, &before, "before a kill");
            // Every other kill waits, after its random delay, for the next accepted update:
            // the other sites' uploads are then streaming and the checkpoint is about to be
            // written.
            if kills % 2 == 1 {
                let current = project.path(&log(kills));
                let accepted = || {
                    let text = std::fs::read_to_string(&current).unwrap_or_default();
                    text.matches("update accepted").count()
                };
                let seen_before = accepted();
                let until = Instant::now() + Duration::from_secs(5);
                while Instant::now() < until && accepted() == seen_before {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            seen = before.rounds.clone();
            if before.state != RunState::Running || kills == KILLS {
                break;
            }
            coordinator.0.kill().unwrap();
            coordinator.0.wait().unwrap();
            kills += 1;
            println!(
                "kill {kills:2}: run {} ({}), {} rounds finished, last log: {}",
                run.run_id,
                if before.config.secure_aggregation.is_some() {
                    "secure"
                } else {
                    "plain"
                },
                seen.len(),
                last_line(&project.path(&log(kills - 1)))
            );
            coordinator = spawn_coordinator_on(&project, project.port, &log(kills));
            let after = run_info(&project, &run.run_id).await;
            assert_kept(&seen, &after, "after a restart");
            seen = after.rounds;
        }
        runs.push(run.run_id);
    }
    for run_id in &runs {
        let mut admin = admin(&project).await;
        let done = wait_for(&mut admin, run_id, Duration::from_secs(300), |r| {
            r.state != RunState::Running
        })
        .await;
        assert_eq!(done.state, RunState::Completed, "{done:?}");
        assert_eq!(done.rounds.len(), ROUNDS as usize);
        every_checkpoint_reads(&project, &done).await;
    }
    println!(
        "{kills} kills over {} runs: every run completed, no finished round lost",
        runs.len()
    );
}

// ---------------------------------------------------------------------------------------------
// A full disk

/// A coordinator process whose state folder is a `megabytes` tmpfs of its own (a private mount
/// namespace: nothing is mounted for anyone else, and it goes when the process does).
fn coordinator_on_small_disk(project: &Project, megabytes: u32) -> Process {
    let state = project.state();
    std::fs::create_dir_all(&state).unwrap();
    let script = format!(
        "mount -t tmpfs -o size={megabytes}m tmpfs '{state}' && exec '{BIN}' coordinator \
         --kit '{kit}' --state '{state}' --listen 127.0.0.1:{port}",
        state = state.display(),
        kit = project.coordinator_kit().display(),
        port = project.port,
    );
    let log = std::fs::File::create(project.path("coordinator.log")).unwrap();
    Process(
        std::process::Command::new("unshare")
            .args(["--mount", "--map-root-user", "sh", "-c", &script])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("unshare (util-linux) runs"),
    )
}

/// `path` as the process `pid` sees it, through its mount namespace.
fn inside(pid: u32, path: &Path) -> PathBuf {
    Path::new(&format!("/proc/{pid}/root")).join(path.strip_prefix("/").unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_holds_the_round_with_a_clear_reason_and_announces_no_broken_checkpoint() {
    if !slow_tests_enabled() {
        return;
    }
    let project = project(&["alpha"]);
    let coordinator = coordinator_on_small_disk(&project, 8);
    let state = project.state();
    let mut site = FederationClient::new(connect(&project.site_kit("alpha")).await);
    let pid = coordinator.0.id();
    let models = inside(pid, &state.join("models"));
    let mut admin = admin(&project).await;
    let model = tiny_model(3);
    let run = start_run(&mut admin, run_config(3, 1, 600), &model).await;
    let task = join_and_take_task(&mut site, "test", 5).await;
    push_update(&mut site, &task, &constant_update(&model, 0.01), 4)
        .await
        .unwrap();
    wait_for(&mut admin, &run.run_id, Duration::from_secs(30), |r| {
        r.rounds.len() == 1
    })
    .await;

    // The disk fills up (someone else's file): round 2's checkpoint cannot be written.
    let filler = inside(pid, &state.join("filler"));
    {
        let mut file = std::fs::File::create(&filler).unwrap();
        let block = vec![7u8; 64 << 10];
        while std::io::Write::write_all(&mut file, &block).is_ok() {}
    }
    let task = join_and_take_task(&mut site, "test", 5).await;
    assert_eq!(task.round, 2);
    push_update(&mut site, &task, &constant_update(&model, 0.02), 4)
        .await
        .unwrap();
    let held = wait_for(&mut admin, &run.run_id, Duration::from_secs(30), |r| {
        r.held_up.is_some()
    })
    .await;
    let reason = held.held_up.clone().unwrap();
    assert!(
        reason.contains("round 2") && reason.contains("No space left on device"),
        "{reason}"
    );
    assert_eq!(held.state, RunState::Running);
    assert_eq!(held.rounds.len(), 1, "nothing announced for round 2");
    every_checkpoint_reads(&project, &held).await;
    // No half-written checkpoint is left to fill the disk further.
    let stray: Vec<_> = std::fs::read_dir(&models)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains(".tmp"))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
    // The operator sees why in `run status`.
    let status = std::process::Command::new(BIN)
        .args([
            "run",
            "status",
            "--kit",
            project.admin_kit().to_str().unwrap(),
            "--run",
            &run.run_id,
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("held up") && text.contains("No space left"),
        "{text}"
    );

    // Space again: the round is written on the next try and the run completes.
    std::fs::remove_file(&filler).unwrap();
    let after = wait_for(&mut admin, &run.run_id, Duration::from_secs(60), |r| {
        r.rounds.len() == 2
    })
    .await;
    assert_eq!(after.held_up, None);
    assert_eq!(after.rounds[0], held.rounds[0]);
    let task = join_and_take_task(&mut site, "test", 5).await;
    push_update(&mut site, &task, &constant_update(&model, 0.03), 4)
        .await
        .unwrap();
    let done = wait_for(&mut admin, &run.run_id, Duration::from_secs(30), |r| {
        r.state == RunState::Completed
    })
    .await;
    every_checkpoint_reads(&project, &done).await;
    let log = std::fs::read_to_string(project.path("coordinator.log")).unwrap();
    assert!(
        log.contains("cannot be saved") && log.contains("No space left"),
        "{log}"
    );
}
