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
    // Enough slices and epochs that a round takes a second or more; two slices of each site
    // for its validation.
    let north = site_dataset(&project, "north", 0, 18, 2);
    let south = site_dataset(&project, "south", 1, 18, 2);
    let _north = spawn_agent(&project, "north", &north);
    let _south = spawn_agent(&project, "south", &south);
    let address = start_dashboard(&project.admin_kit()).await;
    let url = format!("http://{address}/");

    let mut admin = admin(&project).await;
    wait_for_sites(&mut admin, &["north", "south"]).await;
    let mut config = run_config(ROUNDS, 2, 120);
    config.training.local_epochs = 8;
    config.validate_at_sites = true;
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
    // Each site's own line beside the mean: a point per round per site in all three charts.
    assert_eq!(
        dom.matches(r#"class="point site""#).count(),
        2 * 3 * ROUNDS as usize
    );
    // The sites' validation of every round's model, the last one's included: on the chart, in
    // the lineage and beside each site.
    assert_eq!(
        dom.matches(r#"class="point validation""#).count(),
        ROUNDS as usize
    );
    let cells: Vec<&str> = dom
        .split(r#"<td class="validation" title=""#)
        .skip(1)
        .collect();
    assert_eq!(cells.len(), ROUNDS as usize);
    for cell in cells {
        let title = &cell[..cell.find('"').unwrap()];
        assert!(
            title.contains("north: ") && title.contains("south: ") && title.contains("(2 cases)"),
            "{title}"
        );
    }
    let last = info.rounds.last().unwrap();
    for site in ["north", "south"] {
        let row = &dom[dom.find(&format!(r#"<tr data-site="{site}">"#)).unwrap()..];
        let row = &row[..row.find("</tr>").unwrap()];
        let measured = last
            .validation
            .iter()
            .find(|v| v.site == site)
            .and_then(|v| v.validation.infection_dice)
            .unwrap();
        assert!(
            row.contains(&format!("{measured:.3} (round {ROUNDS})")),
            "{row}"
        );
    }

    // `run status` names each site's last training time.
    let admin_kit = project.admin_kit();
    let kit = admin_kit.to_str().unwrap();
    let status = run_cli(&["run", "status", "--kit", kit, "--run", &run.run_id]);
    let said = String::from_utf8_lossy(&status.stdout);
    for site in ["north", "south"] {
        let line = said
            .lines()
            .find(|l| l.trim_start().starts_with(site))
            .unwrap_or_else(|| panic!("no line for {site} in {said}"));
        assert!(
            line.contains(&format!("round {:>3}", ROUNDS)) && line.contains(" s"),
            "{line}"
        );
    }

    // Each site's certificate expiry, as the coordinator saw it when the site joined: on the
    // page (the test's kits are valid for days, so it warns) and in `sites list`.
    let sites = run_cli(&["sites", "list", "--kit", kit]);
    let listed = String::from_utf8_lossy(&sites.stdout);
    for site in ["north", "south"] {
        let kit = alveolus_proto::kit::ClientKit::load(&project.site_kit(site)).unwrap();
        let expires = kit.certificate_expires().unwrap();
        assert!(
            dom.contains(&format!(
                r#"<td class="warn" data-expires="{expires}">valid until"#
            )),
            "{site}'s certificate expiry is not on the page"
        );
        let until = alveolus_dashboard::view::utc(expires);
        assert!(
            listed.contains(&format!("certificate valid until {until}")),
            "{listed}"
        );
    }
    assert!(listed.contains("renew it soon"), "{listed}");

    report_opens_without_a_network(&chromium, &project, kit, &run.run_id);

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
    assert!(said.contains("needs an admin kit"), "{said}");
    let site_report = run_cli(&[
        "run",
        "report",
        "--kit",
        project.site_kit("north").to_str().unwrap(),
        "--out",
        project.path("report").to_str().unwrap(),
    ]);
    assert!(!site_report.status.success());
    let said = String::from_utf8_lossy(&site_report.stderr);
    assert!(said.contains("needs an admin kit"), "{said}");

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

/// `alveolus run report` writes report.html and its plots for the finished run; Chromium, with
/// every network request failing, renders the report's charts from the file alone; the PNGs
/// decode and show the mean's and the sites' lines.
fn report_opens_without_a_network(chromium: &Path, project: &Project, kit: &str, run: &str) {
    let out = project.path("report");
    let written = run_cli(&[
        "run",
        "report",
        "--kit",
        kit,
        "--run",
        run,
        "--out",
        out.to_str().unwrap(),
    ]);
    let said = String::from_utf8_lossy(&written.stdout);
    assert!(
        written.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&written.stderr)
    );
    let html_path = out.join("report.html");
    assert!(said.contains(&html_path.display().to_string()), "{said}");
    let html = std::fs::read_to_string(&html_path).unwrap();
    for outside in ["<script", "src=", "href=", "@import", "url("] {
        assert!(
            !html.contains(outside),
            "the report must stand alone: {outside}"
        );
    }

    let dom = chromium_output(
        chromium,
        &project.path("chromium-report"),
        &[
            NO_NETWORK[0],
            NO_NETWORK[1],
            NO_NETWORK[2],
            "--virtual-time-budget=2000",
            "--dump-dom",
            &format!("file://{}", html_path.display()),
        ],
    );
    assert_eq!(dom.matches(r#"<svg class="chart""#).count(), 3);
    assert_eq!(
        dom.matches(r#"class="point dice""#).count(),
        ROUNDS as usize
    );
    assert_eq!(
        dom.matches(r#"class="point site""#).count(),
        2 * 3 * ROUNDS as usize
    );
    // Each site's figures for each round, and its validation of each round's model.
    let table = section(&dom, "site-rounds");
    assert_eq!(
        table.matches("<tr><td>").count(),
        2 * ROUNDS as usize,
        "{table}"
    );
    let table = section(&dom, "site-validation");
    assert_eq!(
        table.matches("<tr><td>").count(),
        2 * ROUNDS as usize,
        "{table}"
    );
    assert!(table.contains("<th>consolidation</th>"), "{table}");
    let screenshot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("report.png");
    let _ = std::fs::remove_file(&screenshot);
    chromium_output(
        chromium,
        &project.path("chromium-report-shot"),
        &[
            NO_NETWORK[0],
            NO_NETWORK[1],
            NO_NETWORK[2],
            "--virtual-time-budget=2000",
            "--hide-scrollbars",
            "--window-size=1280,1400",
            &format!("--screenshot={}", screenshot.display()),
            &format!("file://{}", html_path.display()),
        ],
    );
    assert_not_blank(&screenshot);

    for (plot, mean) in [
        ("loss.png", LOSS),
        ("dice.png", DICE),
        ("validation.png", VALIDATION),
    ] {
        let path = out.join(plot);
        // Title, ticks and legend are drawn with the font shipped in the binary.
        let text = pixels_where(&path, |p| p.iter().all(|&c| c < 90));
        assert!(text > 3_000, "{plot}: only {text} dark pixels: no text");
        assert!(
            pixels_of(&path, mean) > 100,
            "{plot}: the mean's line is not drawn"
        );
        assert!(
            pixels_of(&path, FIRST_SITE) > 50,
            "{plot}: the first site's line is not drawn"
        );
    }

    let missing = run_cli(&[
        "run",
        "report",
        "--kit",
        kit,
        "--run",
        "no-such-run",
        "--out",
        project.path("report-missing").to_str().unwrap(),
    ]);
    assert!(!missing.status.success());
    let said = String::from_utf8_lossy(&missing.stderr);
    assert!(said.contains("no-such-run"), "{said}");
    assert!(!project.path("report-missing").join("report.html").exists());
}

/// Chromium flags under which every network request fails: through a proxy on a dead port,
/// loopback included, and no host name resolves.
const NO_NETWORK: [&str; 3] = [
    "--proxy-server=http://127.0.0.1:9",
    "--proxy-bypass-list=<-loopback>",
    "--host-resolver-rules=MAP * ~NOTFOUND",
];

/// The colours of the mean's lines and of the first site's (`chart.rs`).
const LOSS: [u8; 3] = [0xc0, 0x50, 0x4d];
const DICE: [u8; 3] = [0x4a, 0x6f, 0xa5];
const VALIDATION: [u8; 3] = [0x2e, 0x7d, 0x4f];
const FIRST_SITE: [u8; 3] = [0x8c, 0xb3, 0x69];

/// The report's section of that id.
fn section<'a>(dom: &'a str, id: &str) -> &'a str {
    let start = &dom[dom
        .find(&format!(r#"id="{id}""#))
        .unwrap_or_else(|| panic!("no section {id}"))..];
    &start[..start.find("</section>").unwrap()]
}

/// How many pixels of the PNG at `path` are exactly `colour`.
fn pixels_of(path: &Path, colour: [u8; 3]) -> usize {
    pixels_where(path, |p| p == colour)
}

/// How many pixels of the PNG at `path` (RGB or RGBA) pass `test` on their RGB.
fn pixels_where(path: &Path, test: impl Fn([u8; 3]) -> bool) -> usize {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut pixels).unwrap();
    pixels[..frame.buffer_size()]
        .chunks(frame.color_type.samples())
        .filter(|p| test([p[0], p[1], p[2]]))
        .count()
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
