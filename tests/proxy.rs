//! Sites behind the outbound HTTP proxy of a hospital network: Debian's tinyproxy (installed by
//! `scripts/build-deps`) on loopback, between real agents and CLI commands and a real
//! coordinator, with mutual TLS end to end through its CONNECT tunnel.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use alveolus_proto::domain::RunState;
use common::*;

/// A tinyproxy process on a free loopback port; killed when dropped.
struct Tinyproxy {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Tinyproxy {
    /// `connect_ports`: the only ports it opens tunnels to (every port when empty);
    /// `user`: the Basic authentication it asks for.
    fn start(dir: &Path, name: &str, connect_ports: &[u16], user: Option<(&str, &str)>) -> Self {
        let program = which("tinyproxy").expect(
            "the `tinyproxy` binary is not on PATH: scripts/build-deps installs Debian's tinyproxy-bin",
        );
        let port = free_port();
        let mut config = format!(
            "Port {port}\nListen 127.0.0.1\nTimeout 600\nLogLevel Info\nMaxClients 64\nAllow 127.0.0.1\n"
        );
        for p in connect_ports {
            config.push_str(&format!("ConnectPort {p}\n"));
        }
        if let Some((user, password)) = user {
            config.push_str(&format!("BasicAuth {user} {password}\n"));
        }
        let conf = dir.join(format!("{name}.conf"));
        std::fs::write(&conf, config).unwrap();
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(program)
            .args(["-d", "-c"])
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "tinyproxy did not listen: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Tinyproxy { child, port, log }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The tunnels it opened to `port`, as its log tells.
    fn tunnels_to(&self, port: u16) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .matches(&format!("CONNECT 127.0.0.1:{port} "))
            .count()
    }
}

/// Two agents and the researcher's CLI reach the coordinator only through the proxy, and a
/// federated round completes: the proxy opened their tunnels, and saw only TLS.
#[tokio::test(flavor = "multi_thread")]
async fn a_round_completes_with_every_site_behind_the_proxy() {
    let project = project(&["alpha", "beta"]);
    let proxy = Tinyproxy::start(project.tmp.path(), "proxy", &[project.port], None);
    let _coordinator = start_coordinator(&project).await;
    let data_a = site_data(&project, "alpha", 0, 3);
    let data_b = site_data(&project, "beta", 1, 3);
    let url = proxy.url();
    let _a = spawn_agent_with(&project, "alpha", &data_a, &["--proxy", &url]);
    let _b = spawn_agent_with(&project, "beta", &data_b, &["--proxy", &url]);
    let mut admin = admin(&project).await;
    wait_for_sites(&mut admin, &["alpha", "beta"]).await;
    let run = start_run(&mut admin, run_config(1, 2, 120), &tiny_model(3)).await;
    let run = wait_for(&mut admin, &run.run_id, Duration::from_secs(240), |r| {
        r.state != RunState::Running
    })
    .await;
    assert_eq!(run.state, RunState::Completed, "{:?}", run.stop_reason);
    assert_eq!(run.rounds[0].sites.len(), 2);
    let agent_tunnels = proxy.tunnels_to(project.port);
    assert!(agent_tunnels >= 2, "tunnels opened: {agent_tunnels}");
    let log = std::fs::read_to_string(project.path("alpha.log")).unwrap();
    assert!(
        log.contains("reaching the coordinator through the proxy") && log.contains(&url),
        "{log}"
    );

    // The researcher's CLI through the same proxy, by --proxy and by HTTPS_PROXY.
    let kit = project.admin_kit();
    let kit = kit.to_str().unwrap();
    let (ok, text) = cli(&["--proxy", &url, "run", "status", "--kit", kit], &[]).await;
    assert!(ok && text.contains(&run.run_id), "{text}");
    assert_eq!(proxy.tunnels_to(project.port), agent_tunnels + 1);
    // HTTPS_PROXY is not used for loopback, as Go's and Python's clients do; the coordinator
    // here is on loopback, so the command goes direct and the proxy sees nothing new.
    let (ok, text) = cli(&["run", "status", "--kit", kit], &[("HTTPS_PROXY", &url)]).await;
    assert!(ok && text.contains(&run.run_id), "{text}");
    assert_eq!(proxy.tunnels_to(project.port), agent_tunnels + 1);
}

/// A proxy that allows CONNECT only to port 443 refuses the coordinator's port; the command
/// says so, naming the proxy and the target.
#[tokio::test(flavor = "multi_thread")]
async fn a_proxy_that_refuses_the_tunnel_is_named_with_its_answer() {
    let project = project(&["alpha"]);
    let proxy = Tinyproxy::start(project.tmp.path(), "strict", &[443], None);
    let _coordinator = start_coordinator(&project).await;
    let kit = project.admin_kit();
    let (ok, text) = cli(
        &[
            "--proxy",
            &proxy.url(),
            "sites",
            "list",
            "--kit",
            kit.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    assert!(!ok, "{text}");
    let expected = format!(
        "the proxy at {} refused to open a tunnel to 127.0.0.1:{} (HTTP/1.",
        proxy.url(),
        project.port
    );
    assert!(text.contains(&expected) && text.contains(" 403 "), "{text}");
}

/// A proxy that asks for Basic authentication: without credentials and with a wrong password
/// the command says which, never printing the password; with them, the health check passes.
#[tokio::test(flavor = "multi_thread")]
async fn a_proxy_with_basic_authentication_takes_the_user_from_the_url() {
    let project = project(&["alpha"]);
    let proxy = Tinyproxy::start(project.tmp.path(), "auth", &[], Some(("alice", "s3cret")));
    let _coordinator = start_coordinator(&project).await;
    let kit = project.site_kit("alpha");
    let kit = kit.to_str().unwrap();
    let with = |credentials: &str| format!("http://{credentials}127.0.0.1:{}", proxy.port);

    let (ok, text) = cli(&["--proxy", &with(""), "health", "--kit", kit], &[]).await;
    assert!(!ok && text.contains("requires authentication"), "{text}");
    assert!(
        text.contains("407") && text.contains("http://USER:PASSWORD@HOST:PORT"),
        "{text}"
    );

    let wrong = with("alice:wrong-secret@");
    let (ok, text) = cli(&["--proxy", &wrong, "health", "--kit", kit], &[]).await;
    assert!(
        !ok && text.contains("refused the user and password"),
        "{text}"
    );
    assert!(
        !text.contains("wrong-secret") && text.contains("alice:***@"),
        "{text}"
    );

    let before = proxy.tunnels_to(project.port);
    let right = with("alice:s3cret@");
    let (ok, text) = cli(&["--proxy", &right, "health", "--kit", kit], &[]).await;
    assert!(ok && text.contains("SERVING"), "{text}");
    assert!(proxy.tunnels_to(project.port) > before);
}

/// Proxy settings that cannot work stop the command before it connects, naming where they came
/// from; an unreachable proxy is named as such.
#[tokio::test(flavor = "multi_thread")]
async fn bad_proxy_settings_are_named_with_their_origin() {
    let project = project(&["alpha"]);
    let kit = project.site_kit("alpha");
    let kit = kit.to_str().unwrap();
    let (ok, text) = cli(
        &["--proxy", "socks5://127.0.0.1:1080", "health", "--kit", kit],
        &[],
    )
    .await;
    assert!(
        !ok && text.contains("--proxy") && text.contains("not an HTTP proxy"),
        "{text}"
    );
    let (ok, text) = cli(
        &["health", "--kit", kit],
        &[("HTTPS_PROXY", "http://proxy.example:port")],
    )
    .await;
    assert!(!ok, "{text}");
    assert!(
        text.contains("environment variable HTTPS_PROXY") && text.contains("not a port number"),
        "{text}"
    );
    let closed = free_port();
    let (ok, text) = cli(
        &[
            "--proxy",
            &format!("http://127.0.0.1:{closed}"),
            "health",
            "--kit",
            kit,
        ],
        &[],
    )
    .await;
    assert!(!ok, "{text}");
    assert!(
        text.contains(&format!(
            "cannot reach the proxy at http://127.0.0.1:{closed}"
        )),
        "{text}"
    );
}
