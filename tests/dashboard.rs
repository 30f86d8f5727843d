//! The dashboard in a real browser: Debian's headless Chromium (installed by
//! `scripts/build-deps`) opens it during a live run over mTLS and follows the run to its end.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use alveolus_proto::domain::RunState;
use common::*;

const ROUNDS: u32 = 5;

/// Loaded while the run is in progress, the page lists the run and its sites, has one chart
/// point per finished round, and gains the later rounds' points without a reload; a screenshot
/// of the finished run is saved as `target/tmp/dashboard.png`.
#[tokio::test(flavor = "multi_thread")]
async fn chromium_follows_a_live_run_one_point_per_finished_round() {
    let chromium = which("chromium").expect(
        "the `chromium` binary is not on PATH: scripts/build-deps installs Debian's package",
    );
    let project = project(&["north", "south"]);
    let coordinator = start_coordinator(&project).await;
    // Enough slices and epochs that a round takes a second or more.
    let north = site_data(&project, "north", 0, 20);
    let south = site_data(&project, "south", 1, 20);
    let _north = spawn_agent(&project, "north", &north);
    let _south = spawn_agent(&project, "south", &south);
    let address = start_dashboard(&project.admin_kit()).await;
    let url = format!("http://{address}/");

    let mut admin = admin(&project).await;
    wait_for_sites(&mut admin, &["north", "south"]).await;
    let mut config = run_config(ROUNDS, 2, 120);
    config.training.local_epochs = 8;
    let run = start_run(&mut admin, config, &tiny_model(9)).await;
    wait_for(&mut admin, &run.run_id, Duration::from_secs(120), |r| {
        !r.rounds.is_empty()
    })
    .await;

    // The browser loads the page now, mid-run, and keeps it open while the run goes on; the
    // virtual time budget runs only while no request is pending, so it ends after the run.
    let dom = chromium_output(
        &chromium,
        &project.path("chromium-dom"),
        &["--virtual-time-budget=10000", "--dump-dom", &url],
    );
    let info = get_run(&mut admin, &run.run_id).await;
    assert_eq!(info.state, RunState::Completed);
    let initial: usize = attribute(&dom, "data-initial-rounds").parse().unwrap();
    assert!(
        (1..ROUNDS as usize).contains(&initial),
        "the page must have loaded mid-run, with {initial} rounds finished"
    );
    let updates: usize = attribute(&dom, "data-updates").parse().unwrap();
    assert!(updates >= 1, "the live part was never replaced");
    assert_eq!(
        dom.matches(r#"class="point dice""#).count(),
        ROUNDS as usize,
        "one Dice point per finished round, gained live from {initial}"
    );
    assert_eq!(
        dom.matches(r#"class="point loss""#).count(),
        ROUNDS as usize
    );
    assert!(
        dom.contains(&format!("?run={}", run.run_id)),
        "the run is listed"
    );
    for site in ["north", "south"] {
        assert!(
            dom.contains(&format!(r#"<tr data-site="{site}">"#)),
            "{site} is listed among the run's sites"
        );
    }
    // Every version of the lineage links to its download.
    for round in &info.rounds {
        assert!(dom.contains(&format!(r#"href="model/{}""#, round.version)));
    }

    let screenshot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&screenshot);
    chromium_output(
        &chromium,
        &project.path("chromium-shot"),
        &[
            "--virtual-time-budget=2000",
            "--hide-scrollbars",
            "--window-size=1280,1400",
            &format!("--screenshot={}", screenshot.display()),
            &url,
        ],
    );
    assert_not_blank(&screenshot);

    // A download link gives the checkpoint's bytes.
    let version = &info.rounds[0].version;
    let download = http(&address, "GET", &format!("/model/{version}")).unwrap();
    assert!(download.starts_with("HTTP/1.1 200"), "{}", &download[..100]);
    let stored = std::fs::read(
        project
            .state()
            .join("models")
            .join(format!("{version}.safetensors")),
    )
    .unwrap();
    let head = download.split("\r\n\r\n").next().unwrap().to_lowercase();
    assert!(
        head.contains(&format!("content-length: {}", stored.len())),
        "the whole checkpoint is sent: {head}"
    );
    assert!(
        head.contains(&format!("filename=\"{version}.safetensors\"")),
        "{head}"
    );

    // A run that does not exist, then a coordinator that is gone: said on the page.
    let missing = http(&address, "GET", "/?run=no-such-run").unwrap();
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    assert!(
        missing.contains("No run <code>no-such-run</code>"),
        "{missing}"
    );
    coordinator.stop().await;
    let gone = http(&address, "GET", "/").unwrap();
    assert!(gone.starts_with("HTTP/1.1 502"), "{gone}");
    assert!(gone.contains("The coordinator cannot be reached"), "{gone}");
}

/// A site kit, and an address in use, stop `alveolus dashboard` before it serves, each with a
/// message that names what is wrong.
#[test]
fn the_wrong_kit_and_a_busy_port_are_refused_with_a_reason() {
    let project = project(&["north"]);
    let site = run_cli(&[
        "dashboard",
        "--kit",
        project.site_kit("north").to_str().unwrap(),
    ]);
    assert!(!site.status.success());
    let said = String::from_utf8_lossy(&site.stderr);
    assert!(said.contains("the dashboard needs an admin kit"), "{said}");

    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = busy.local_addr().unwrap().to_string();
    let admin = project.admin_kit();
    let taken = run_cli(&[
        "dashboard",
        "--kit",
        admin.to_str().unwrap(),
        "--listen",
        &address,
    ]);
    assert!(!taken.status.success());
    let said = String::from_utf8_lossy(&taken.stderr);
    assert!(
        said.contains(&format!("cannot listen on {address}")),
        "{said}"
    );
}

fn run_cli(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// The dashboard on a loopback port of this process; its address.
async fn start_dashboard(kit: &Path) -> String {
    let dashboard = alveolus_dashboard::Dashboard::open(kit).unwrap();
    let listener = alveolus_dashboard::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    tokio::spawn(alveolus_dashboard::serve(
        listener,
        dashboard,
        std::future::pending(),
    ));
    address
}

/// Headless Chromium with `args`, its own profile folder, no network beyond loopback; what it
/// printed on stdout.
fn chromium_output(chromium: &Path, profile: &Path, args: &[&str]) -> String {
    let output = Command::new("timeout")
        .arg("240")
        .arg(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            &format!("--user-data-dir={}", profile.display()),
        ])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn attribute(dom: &str, name: &str) -> String {
    let start = dom
        .find(&format!("{name}=\""))
        .unwrap_or_else(|| panic!("no {name} in {dom}"))
        + name.len()
        + 2;
    dom[start..start + dom[start..].find('"').unwrap()].to_string()
}

/// The PNG decodes and shows more than one colour: the page rendered.
fn assert_not_blank(path: &Path) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut pixels).unwrap();
    let pixels = &pixels[..frame.buffer_size()];
    let first = &pixels[..4];
    let differing = pixels
        .chunks(frame.color_type.samples())
        .filter(|p| *p != &first[..p.len()])
        .count();
    assert!(
        differing > pixels.len() / 100,
        "{}: only {differing} pixels differ from the first",
        path.display()
    );
}
