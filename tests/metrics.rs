//! Metrics seen by a real Prometheus: Debian's `prometheus` (installed by `scripts/build-deps`)
//! scrapes a coordinator process and two agent processes during a real run over mTLS, and its
//! HTTP API is asked what it stored.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use alveolus_proto::domain::RunState;
use alveolus_proto::pb::federation_client::FederationClient;
use common::*;

/// The endpoint answers GET on /metrics in Prometheus's text format and nothing else; a real
/// Prometheus scraping it during a 4-round run stores `rounds finished` rising round by round,
/// a series per site, each agent's rounds and the process gauges.
#[tokio::test(flavor = "multi_thread")]
async fn prometheus_scrapes_a_live_run_from_the_coordinator_and_its_agents() {
    let prometheus = which("prometheus").expect(
        "the `prometheus` binary is not on PATH: scripts/build-deps installs Debian's package",
    );
    let project = project(&["north", "south"]);
    let [
        coordinator_metrics,
        north_metrics,
        south_metrics,
        prometheus_port,
    ] = [(); 4].map(|_| format!("127.0.0.1:{}", free_port()));
    let _coordinator = spawn_coordinator_with(
        &project,
        project.port,
        "coordinator.log",
        &["--metrics", &coordinator_metrics],
    );
    // Enough slices and epochs that a round outlasts a scrape, so that the rise is seen.
    let north = site_data(&project, "north", 0, 20);
    let south = site_data(&project, "south", 1, 20);
    let _north = spawn_agent_with(&project, "north", &north, &["--metrics", &north_metrics]);
    let _south = spawn_agent_with(&project, "south", &south, &["--metrics", &south_metrics]);

    // The endpoint itself, before Prometheus: its path, its method, its format.
    let scrape = wait_http(&coordinator_metrics, "GET", "/metrics").await;
    assert!(scrape.starts_with("HTTP/1.1 200"), "{scrape}");
    assert!(
        scrape.contains("content-type: text/plain; version=0.0.4"),
        "{scrape}"
    );
    assert!(
        scrape.contains("alveolus_round_phase{phase=\"idle\"} 1"),
        "{scrape}"
    );
    assert!(scrape.contains("process_open_fds "), "{scrape}");
    let post = http(&coordinator_metrics, "POST", "/metrics").unwrap();
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    let elsewhere = http(&coordinator_metrics, "GET", "/").unwrap();
    assert!(elsewhere.starts_with("HTTP/1.1 404"), "{elsewhere}");

    let config = project.path("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 500ms\n  scrape_timeout: 500ms\n\
             scrape_configs:\n\
             \x20 - job_name: coordinator\n    static_configs:\n      - targets: ['{coordinator_metrics}']\n\
             \x20 - job_name: agent\n    static_configs:\n      - targets: ['{north_metrics}', '{south_metrics}']\n"
        ),
    )
    .unwrap();
    let _prometheus = spawn_program(
        &prometheus,
        &[
            &format!("--config.file={}", config.display()),
            &format!("--storage.tsdb.path={}", project.path("tsdb").display()),
            &format!("--web.listen-address={prometheus_port}"),
        ],
        &project.path("prometheus.log"),
    );
    let up = query_until(&prometheus_port, "sum(up)", Duration::from_secs(60), |v| {
        v.first().is_some_and(|s| value(s) == 3.0)
    })
    .await;
    assert_eq!(up.len(), 1);

    let mut admin = admin(&project).await;
    wait_for_sites(&mut admin, &["north", "south"]).await;
    let mut config = run_config(4, 2, 120);
    config.training.local_epochs = 8;
    let run = start_run(&mut admin, config, &tiny_model(5)).await;
    let finished = format!("alveolus_rounds_finished_total{{run=\"{}\"}}", run.run_id);
    // What Prometheus stored, sampled while the run goes: it must rise, not jump to the end.
    let mut seen = Vec::new();
    let started = Instant::now();
    loop {
        let now = query(&prometheus_port, &finished).unwrap();
        if let Some(v) = now.first().map(value)
            && seen.last() != Some(&v)
        {
            seen.push(v);
        }
        if seen.last() == Some(&4.0) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "rounds finished as Prometheus saw them: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]) && seen.len() >= 3,
        "rounds finished must rise round by round in Prometheus, saw {seen:?}"
    );
    let info = get_run(&mut admin, &run.run_id).await;
    assert_eq!(info.state, RunState::Completed);
    let finished_ms: Vec<i64> = info.rounds.iter().map(|r| r.finished_unix_ms).collect();
    eprintln!("rounds finished at {finished_ms:?}; Prometheus saw {seen:?}");

    // The per-site series: one each, named by the site.
    let contact = query(
        &prometheus_port,
        "alveolus_site_last_contact_timestamp_seconds",
    )
    .unwrap();
    let mut sites: Vec<&str> = contact
        .iter()
        .map(|s| s["metric"]["site"].as_str().unwrap())
        .collect();
    sites.sort();
    assert_eq!(sites, ["north", "south"]);
    for series in &contact {
        let age = unix_now() - value(series);
        assert!(
            (0.0..120.0).contains(&age),
            "last contact {age} s ago: {series}"
        );
    }
    let accepted = query_until(
        &prometheus_port,
        "alveolus_updates_accepted_total",
        Duration::from_secs(10),
        |v| v.len() == 2 && v.iter().all(|s| value(s) == 4.0),
    )
    .await;
    assert_eq!(accepted.len(), 2);
    let rounds = query_until(
        &prometheus_port,
        "alveolus_round_duration_seconds_count",
        Duration::from_secs(10),
        |v| v.first().is_some_and(|s| value(s) == 4.0),
    )
    .await;
    assert_eq!(rounds.len(), 1);
    // Each agent: four rounds accepted, samples trained on, bytes both ways.
    let agent_rounds = query_until(
        &prometheus_port,
        "alveolus_agent_rounds_total",
        Duration::from_secs(10),
        |v| v.len() == 2 && v.iter().all(|s| value(s) == 4.0),
    )
    .await;
    assert_eq!(agent_rounds.len(), 2);
    for metric in [
        "alveolus_agent_samples_total",
        "alveolus_agent_sent_bytes_total",
        "alveolus_agent_received_bytes_total",
        "alveolus_agent_training_duration_seconds_count",
        "alveolus_received_bytes_total{transfer=\"update\"}",
        "alveolus_sent_bytes_total{transfer=\"model\"}",
        "process_resident_memory_bytes{job=\"coordinator\"}",
    ] {
        let series = query(&prometheus_port, metric).unwrap();
        assert!(
            !series.is_empty() && series.iter().all(|s| value(s) > 0.0),
            "{metric}: {series:?}"
        );
    }

    // The test's kits are valid for two days: well inside the 30 days from which the services
    // warn, each of its own certificate and the coordinator of each site's.
    let log = |name: &str| std::fs::read_to_string(project.path(name)).unwrap();
    let coordinator = log("coordinator.log");
    for site in ["north", "south"] {
        assert!(
            coordinator.contains(&format!("site {site}'s certificate expires on ")),
            "{coordinator}"
        );
        let agent = log(&format!("{site}.log"));
        assert!(
            agent.contains("this site's certificate expires on "),
            "{agent}"
        );
    }
    assert!(
        coordinator.contains("the coordinator's certificate expires on "),
        "{coordinator}"
    );
}

/// Refusals are counted per site by a fixed reason, acceptances per site, and the engine's
/// present (phase, round in progress, bytes of the initial model) is what `run status` says.
#[tokio::test(flavor = "multi_thread")]
async fn updates_are_counted_by_site_and_refusals_by_reason() {
    let project = project(&["a", "b"]);
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = metrics.local_addr().unwrap().to_string();
    let _coordinator = start_coordinator_observed(&project, |_| {}, Some(metrics)).await;
    let mut admin = admin(&project).await;
    let model = tiny_model(2);
    let run = start_run(&mut admin, run_config(2, 2, 300), &model).await;
    let mut a = FederationClient::new(connect(&project.site_kit("a")).await);
    let mut b = FederationClient::new(connect(&project.site_kit("b")).await);
    let task_a = join_and_take_task(&mut a, "test", 5).await;
    let task_b = join_and_take_task(&mut b, "test", 5).await;
    let update = constant_update(&model, 0.01);
    push_update(&mut a, &task_a, &update, 3).await.unwrap();
    push_update(&mut a, &task_a, &update, 3).await.unwrap_err();
    let broken = constant_update(&model, f32::NAN);
    push_update(&mut b, &task_b, &broken, 3).await.unwrap_err();

    let scrape = http(&address, "GET", "/metrics").unwrap();
    let run_id = &run.run_id;
    for line in [
        "alveolus_updates_accepted_total{site=\"a\"} 1".to_string(),
        "alveolus_updates_refused_total{site=\"a\",reason=\"already_reported\"} 1".into(),
        "alveolus_updates_refused_total{site=\"b\",reason=\"weights\"} 1".into(),
        "alveolus_upload_duration_seconds_count 3".into(),
        format!(
            "alveolus_received_bytes_total{{transfer=\"initial_model\"}} {}",
            model.encode().len()
        ),
        format!("alveolus_current_round{{run=\"{run_id}\"}} 1"),
        format!("alveolus_rounds_started_total{{run=\"{run_id}\"}} 1"),
        format!("alveolus_rounds_finished_total{{run=\"{run_id}\"}} 0"),
        format!("alveolus_run_state{{run=\"{run_id}\",state=\"running\"}} 1"),
        "alveolus_round_phase{phase=\"open\"} 1".into(),
        "alveolus_sites_connected 2".into(),
    ] {
        assert!(
            scrape.lines().any(|l| l == line),
            "no line `{line}` in:\n{scrape}"
        );
    }
}

fn spawn_program(program: &Path, args: &[&str], log: &Path) -> Process {
    let log = std::fs::File::create(log).unwrap();
    Process(
        std::process::Command::new(program)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

async fn wait_http(address: &str, method: &str, target: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match http(address, method, target) {
            Ok(response) => return response,
            Err(e) => assert!(Instant::now() < deadline, "{address}{target}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The result vector of an instant query to Prometheus's HTTP API.
fn query(prometheus: &str, promql: &str) -> Result<Vec<serde_json::Value>, String> {
    let encoded: String = promql
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let response = http(prometheus, "GET", &format!("/api/v1/query?query={encoded}"))
        .map_err(|e| e.to_string())?;
    let body = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no body: {response}"))?
        .1;
    let json: serde_json::Value = serde_json::from_str(body).map_err(|e| format!("{e}: {body}"))?;
    if json["status"] != "success" {
        return Err(body.to_string());
    }
    Ok(json["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}

async fn query_until(
    prometheus: &str,
    promql: &str,
    timeout: Duration,
    done: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let result = query(prometheus, promql);
        if let Ok(series) = &result
            && done(series)
        {
            return series.clone();
        }
        assert!(Instant::now() < deadline, "{promql}: {result:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A sample's value: Prometheus sends `[timestamp, "value"]`.
fn value(series: &serde_json::Value) -> f64 {
    series["value"][1].as_str().unwrap().parse().unwrap()
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}
