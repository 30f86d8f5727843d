//! The dashboard's HTML: the page around the live part, and the live part itself (runs, the
//! selected run with its charts, sites and models, and every site), rendered from what the
//! Admin API returned. Everything that came from the coordinator is escaped.

use std::fmt::Write;

use alveolus_proto::domain::{
    AggregationRule, RoundSummary, RunInfo, RunState, SiteInfo, SiteReport,
};
use alveolus_proto::kit::EXPIRY_WARNING_DAYS;

use crate::chart;

/// What the page header shows of the dashboard's own side.
pub struct Header {
    pub project: String,
    pub coordinator: String,
    pub admin: String,
    /// The admin kit's certificate expiry, Unix seconds.
    pub kit_expires: i64,
}

/// What the Admin API returned for one rendering.
pub struct Snapshot {
    pub runs: Vec<RunInfo>,
    pub sites: Vec<SiteInfo>,
    /// Unix milliseconds when it was read, for "ago".
    pub now_ms: i64,
}

impl Snapshot {
    /// The run asked for, or the newest; None with no runs. `Err` names a run that is not there.
    pub fn selected<'a>(&'a self, run: Option<&'a str>) -> Result<Option<&'a RunInfo>, &'a str> {
        match run.filter(|r| !r.is_empty()) {
            None => Ok(self.runs.last()),
            Some(id) => self
                .runs
                .iter()
                .find(|r| r.run_id == id)
                .map(Some)
                .ok_or(id),
        }
    }

    /// Changes whenever what the live part shows of a run's progress changes; the browser sends
    /// it back so that the server can hold the answer until there is something new.
    pub fn key(&self, selected: Option<&RunInfo>) -> String {
        match selected {
            None => format!("runs={}", self.runs.len()),
            Some(run) => format!(
                "runs={};{};{};{};{};{};{}",
                self.runs.len(),
                run.run_id,
                run.state.as_str(),
                run.rounds.len(),
                run.reported.len(),
                run.held_up.is_some(),
                run.rounds.iter().map(|r| r.validation.len()).sum::<usize>()
            ),
        }
    }
}

pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

pub use alveolus_proto::kit::utc;

fn ago(now_ms: i64, then_ms: i64) -> String {
    if then_ms <= 0 {
        return "never".into();
    }
    let s = (now_ms - then_ms).max(0) / 1000;
    match s {
        0..60 => format!("{s} s ago"),
        60..3600 => format!("{} min ago", s / 60),
        3600..86400 => format!("{} h ago", s / 3600),
        _ => format!("{} days ago", s / 86400),
    }
}

fn short(version: &str) -> &str {
    version.get(..12).unwrap_or(version)
}

/// The whole page: header, the live part as it is now (`live`), and the script that keeps it
/// live. `initial_rounds` is the number of finished rounds at load, kept on `<body>`.
pub fn page(header: &Header, live: &str, initial_rounds: usize, now_ms: i64) -> String {
    let (expiry_class, expiry) = validity(header.kit_expires, now_ms);
    format!(
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Alveolus · {project}</title>
<style>{STYLE}</style></head>
<body data-initial-rounds="{initial_rounds}" data-updates="0">
<header><h1>Alveolus <span class="project">{project}</span></h1>
<p>coordinator <code>{coordinator}</code> · admin <code>{admin}</code> · <span class="{expiry_class}">admin kit {expiry}</span> · <span id="status">live</span></p></header>
<main id="live">{live}</main>
<script>{SCRIPT}</script>
</body></html>
"#,
        project = escape(&header.project),
        coordinator = escape(&header.coordinator),
        admin = escape(&header.admin),
    )
}

/// A certificate's expiry as a class (`warn` within [`EXPIRY_WARNING_DAYS`], `error` once expired) and text
/// (`valid until 2027-01-05 10:00:00 UTC (32 days)`).
pub fn validity(expires_unix: i64, now_ms: i64) -> (&'static str, String) {
    let days_left = (expires_unix * 1000 - now_ms).div_euclid(86_400_000);
    if expires_unix * 1000 <= now_ms {
        ("error", format!("expired on {}", utc(expires_unix)))
    } else {
        (
            if days_left < EXPIRY_WARNING_DAYS {
                "warn"
            } else {
                ""
            },
            format!("valid until {} ({days_left} days)", utc(expires_unix)),
        )
    }
}

/// The live part when the coordinator could not be asked.
pub fn unreachable(message: &str) -> String {
    format!(
        r#"<div id="view" data-key="unreachable" data-state="unreachable"><p class="error">The coordinator cannot be reached: {}. Retrying.</p></div>"#,
        escape(message)
    )
}

/// The live part when the asked-for run does not exist.
pub fn no_such_run(snapshot: &Snapshot, run: &str) -> String {
    let mut out = format!(
        r#"<div id="view" data-key="missing" data-state="missing"><p class="error">No run <code>{}</code> on this coordinator.</p>"#,
        escape(run)
    );
    runs_table(&mut out, snapshot, None);
    out.push_str("</div>");
    out
}

/// The live part: the runs, the selected run, and the sites.
pub fn live(snapshot: &Snapshot, selected: Option<&RunInfo>) -> String {
    let state = selected.map(|r| r.state.as_str()).unwrap_or("none");
    let mut out = format!(
        r#"<div id="view" data-key="{}" data-state="{state}" data-run="{}" data-rounds="{}">"#,
        escape(&snapshot.key(selected)),
        escape(selected.map(|r| r.run_id.as_str()).unwrap_or("")),
        selected.map(|r| r.rounds.len()).unwrap_or(0)
    );
    runs_table(&mut out, snapshot, selected);
    match selected {
        Some(run) => run_section(&mut out, snapshot, run, Links::Download),
        None => out.push_str(r#"<p class="empty">No run has been started yet.</p>"#),
    }
    sites_table(&mut out, snapshot);
    out.push_str("</div>");
    out
}

fn strategy(run: &RunInfo) -> String {
    let mut parts = vec![match run.config.aggregation.rule {
        AggregationRule::FedAvg => "FedAvg".to_string(),
        AggregationRule::Median => "coordinate-wise median".to_string(),
        AggregationRule::TrimmedMean { trim_fraction } => {
            format!("trimmed mean ({trim_fraction})")
        }
    }];
    if run.config.privacy.is_some() {
        parts.push("DP".into());
    }
    if run.config.secure_aggregation.is_some() {
        parts.push("secure aggregation".into());
    }
    parts.join(" + ")
}

fn runs_table(out: &mut String, snapshot: &Snapshot, selected: Option<&RunInfo>) {
    out.push_str(r#"<section id="runs"><h2>Runs</h2><table><thead><tr><th>run</th><th>state</th><th>rounds</th><th>strategy</th><th>started</th></tr></thead><tbody>"#);
    for run in snapshot.runs.iter().rev() {
        let current = selected.is_some_and(|s| s.run_id == run.run_id);
        let _ = write!(
            out,
            r#"<tr class="{}"><td><a href="?run={id}">{id}</a></td><td class="state {state}">{state}</td><td>{} / {}</td><td>{}</td><td>{}</td></tr>"#,
            if current { "selected" } else { "" },
            run.rounds.len(),
            run.config.rounds,
            escape(&strategy(run)),
            utc(run.started_unix_ms / 1000),
            id = escape(&run.run_id),
            state = run.state.as_str(),
        );
    }
    out.push_str("</tbody></table></section>");
}

/// Whether model versions link to their download (the live page) or stand as text (a report
/// file, which has no server behind it).
#[derive(Clone, Copy, PartialEq)]
pub enum Links {
    Download,
    None,
}

fn version_cell(version: &str, links: Links) -> String {
    let v = escape(version);
    match links {
        Links::Download => format!(
            r#"<a href="model/{v}" download="{v}.safetensors"><code>{}</code></a>"#,
            escape(short(version))
        ),
        Links::None => format!(r#"<code title="{v}">{}</code>"#, escape(short(version))),
    }
}

/// The selected run: its settings, charts, sites and models.
pub fn run_section(out: &mut String, snapshot: &Snapshot, run: &RunInfo, links: Links) {
    let c = &run.config;
    let _ = write!(
        out,
        r#"<section id="run"><h2>Run <code>{}</code> <span class="state {state}">{state}</span></h2>"#,
        escape(&run.run_id),
        state = run.state.as_str()
    );
    if let Some(held_up) = &run.held_up {
        let _ = write!(out, r#"<p class="warn">Held up: {}</p>"#, escape(held_up));
    }
    if let Some(reason) = &run.stop_reason {
        let how = if run.state == RunState::Failed {
            "Failed"
        } else {
            "Stopped early"
        };
        let _ = write!(out, r#"<p class="error">{how}: {}</p>"#, escape(reason));
    }
    out.push_str(r#"<div class="columns"><dl class="config">"#);
    let mut item = |name: &str, value: String| {
        let _ = write!(out, "<dt>{name}</dt><dd>{}</dd>", escape(&value));
    };
    item("strategy", strategy(run));
    item(
        "rounds",
        format!("{} of {} finished", run.rounds.len(), c.rounds),
    );
    item("sites per round", format!("at least {}", c.min_sites));
    item("round deadline", format!("{} s", c.deadline_seconds));
    item(
        "local training",
        format!(
            "{} epochs, learning rate {}, batch {}, seed {}, {}",
            c.training.local_epochs,
            c.training.learning_rate,
            c.training.batch_size,
            c.training.seed,
            c.training.precision
        ),
    );
    if let Some(bound) = c.aggregation.norm_bound {
        item("update norm bound", format!("{bound}"));
    }
    match &c.privacy {
        Some(p) => {
            let spent = run.rounds.last().and_then(|r| r.epsilon).unwrap_or(0.0);
            item(
                "differential privacy",
                format!(
                    "clip {}, noise multiplier {}, δ {}",
                    p.clip_norm, p.noise_multiplier, p.delta
                ),
            );
            item(
                "ε spent",
                match p.epsilon_budget {
                    Some(budget) => format!("{spent:.4} of a budget of {budget}"),
                    None => format!("{spent:.4}"),
                },
            );
        }
        None => item("differential privacy", "off".into()),
    }
    item(
        "secure aggregation",
        match &c.secure_aggregation {
            Some(s) => format!(
                "on: the coordinator sees only sums; threshold {} sites",
                s.threshold
            ),
            None => "off".into(),
        },
    );
    item("started", utc(run.started_unix_ms / 1000));
    if !run.reported.is_empty() {
        item("reported this round", run.reported.join(", "));
    }
    out.push_str("</dl><div class=\"charts\">");
    let (loss, dice) = chart::loss_and_dice(run);
    out.push_str(&chart::svg(&loss));
    out.push_str(&chart::svg(&dice));
    if let Some(validation) = chart::validation(run) {
        out.push_str(&chart::svg(&validation));
    }
    out.push_str("</div></div>");

    // The sites as this run saw them.
    out.push_str(r#"<h3>Sites in this run</h3><table id="run-sites"><thead><tr><th>site</th><th>last contact</th><th>rounds contributed</th><th>in the last round</th><th>this round</th><th>last loss</th><th>last Dice</th><th>last training</th><th>sent</th><th>last validation</th></tr></thead><tbody>"#);
    let last_round_sites = run.rounds.last().map(|r| r.sites.as_slice()).unwrap_or(&[]);
    for site in &snapshot.sites {
        let rounds: Vec<u32> = site
            .contributions
            .iter()
            .filter(|(id, _)| *id == run.run_id)
            .flat_map(|(_, rounds)| rounds.iter().copied())
            .collect();
        let this_round = if run.reported.contains(&site.name) {
            "reported"
        } else if run.state == RunState::Running {
            "waiting"
        } else {
            ""
        };
        let own = site_figures(run, &site.name);
        let _ = write!(
            out,
            r#"<tr data-site="{name}"><td>{name}</td><td title="{}">{}</td><td>{}</td><td>{}</td><td>{this_round}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>"#,
            utc(site.last_contact_unix_ms / 1000),
            ago(snapshot.now_ms, site.last_contact_unix_ms),
            rounds.len(),
            if last_round_sites.contains(&site.name) {
                "yes"
            } else {
                "no"
            },
            own.last
                .map(|s| format!("{:.4}", s.loss))
                .unwrap_or_default(),
            own.last
                .map(|s| format!("{:.3}", s.dice))
                .unwrap_or_default(),
            own.last
                .and_then(|s| s.train_seconds)
                .map(seconds)
                .unwrap_or_default(),
            if own.bytes > 0 {
                bytes(own.bytes)
            } else {
                String::new()
            },
            last_validation(run, &site.name),
            name = escape(&site.name),
        );
    }
    out.push_str("</tbody></table>");

    // Lineage: every version this run made, each from the one before.
    out.push_str(r#"<h3>Models</h3><table id="models"><thead><tr><th>round</th><th>version</th><th>from</th><th>sites</th><th>samples</th><th>loss</th><th>Dice</th><th>validation</th><th>ε</th><th>finished</th></tr></thead><tbody>"#);
    let _ = write!(
        out,
        r#"<tr><td>0 (initial)</td><td>{}</td><td></td><td></td><td></td><td></td><td></td><td></td><td></td><td></td></tr>"#,
        version_cell(&run.initial_version, links),
    );
    let mut parent = run.initial_version.as_str();
    for r in &run.rounds {
        let _ = write!(
            out,
            r#"<tr><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{:.4}</td><td>{:.3}</td>{}<td>{}</td><td>{}</td></tr>"#,
            r.round,
            version_cell(&r.version, links),
            escape(short(parent)),
            escape(&r.sites.join(", ")),
            r.samples,
            r.loss,
            r.dice,
            validation_cell(r),
            r.epsilon.map(|e| format!("{e:.4}")).unwrap_or_default(),
            utc(r.finished_unix_ms / 1000),
        );
        parent = &r.version;
    }
    out.push_str("</tbody></table></section>");
}

/// The infection Dice the sites measured of a round's model, over all their cases, with each
/// site's figures in the cell's title.
fn validation_cell(round: &RoundSummary) -> String {
    let Some(dice) = round.validated_infection_dice() else {
        return "<td></td>".into();
    };
    let cases: u32 = round.validation.iter().map(|v| v.validation.cases).sum();
    let each: Vec<String> = round
        .validation
        .iter()
        .filter(|v| v.validation.cases > 0)
        .map(|v| {
            format!(
                "{}: {} ({} cases)",
                v.site,
                v.validation
                    .infection_dice
                    .map_or_else(|| "-".into(), |d| format!("{d:.3}")),
                v.validation.cases
            )
        })
        .collect();
    format!(
        r#"<td class="validation" title="{}">{dice:.3} <small>({cases} cases)</small></td>"#,
        escape(&each.join("; "))
    )
}

/// A site's infection Dice of the latest model it measured on cases of its own.
fn last_validation(run: &RunInfo, site: &str) -> String {
    run.rounds
        .iter()
        .rev()
        .flat_map(|r| r.validation.iter().map(move |v| (r.round, v)))
        .find(|(_, v)| v.site == site && v.validation.cases > 0)
        .map(|(round, v)| {
            let dice = v
                .validation
                .infection_dice
                .map_or_else(|| "-".into(), |d| format!("{d:.3}"));
            format!("{dice} (round {round})")
        })
        .unwrap_or_default()
}

/// What a site's own reports in a run add up to.
pub struct SiteFigures<'a> {
    /// Its report in the last round it contributed to.
    pub last: Option<&'a SiteReport>,
    /// The update bytes it sent over the run.
    pub bytes: u64,
}

pub fn site_figures<'a>(run: &'a RunInfo, site: &str) -> SiteFigures<'a> {
    let own = || {
        run.rounds
            .iter()
            .flat_map(|r| r.site_reports.iter().filter(|s| s.site == site))
    };
    SiteFigures {
        last: own().last(),
        bytes: own().map(|s| s.bytes).sum(),
    }
}

/// `12.3 s`, `4 min 5 s`.
pub fn seconds(s: f64) -> String {
    if s < 60.0 {
        format!("{s:.1} s")
    } else {
        format!("{} min {} s", (s / 60.0).floor(), (s % 60.0).round())
    }
}

/// `7.4 MB`, `310 kB`.
pub fn bytes(b: u64) -> String {
    if b >= 1_000_000 {
        format!("{:.1} MB", b as f64 / 1e6)
    } else {
        format!("{} kB", b.div_ceil(1000))
    }
}

fn sites_table(out: &mut String, snapshot: &Snapshot) {
    out.push_str(r#"<section id="sites"><h2>Sites</h2><table><thead><tr><th>site</th><th>last contact</th><th>runs contributed to</th><th>rounds contributed</th><th>certificate</th></tr></thead><tbody>"#);
    if snapshot.sites.is_empty() {
        out.push_str(r#"<tr><td colspan="5">No site has connected yet.</td></tr>"#);
    }
    for site in &snapshot.sites {
        let rounds: usize = site.contributions.iter().map(|(_, r)| r.len()).sum();
        let certificate = match site.certificate_expires_unix {
            Some(expires) => {
                let (class, text) = validity(expires, snapshot.now_ms);
                format!(r#"<td class="{class}" data-expires="{expires}">{text}</td>"#)
            }
            None => "<td>not seen since it was recorded</td>".into(),
        };
        let _ = write!(
            out,
            r#"<tr><td>{}</td><td title="{}">{}</td><td>{}</td><td>{rounds}</td>{certificate}</tr>"#,
            escape(&site.name),
            utc(site.last_contact_unix_ms / 1000),
            ago(snapshot.now_ms, site.last_contact_unix_ms),
            site.contributions.len(),
        );
    }
    out.push_str("</tbody></table></section>");
}

pub const STYLE: &str = r#"
body { font: 14px/1.4 system-ui, sans-serif; margin: 0 1.5em 2em; color: #1d2430; background: #fbfcfd; }
header { border-bottom: 1px solid #d5dbe3; margin-bottom: 1em; }
h1 { font-size: 1.4em; margin: .6em 0 .2em; } h1 .project { color: #4a6fa5; }
h2 { font-size: 1.15em; margin: 1.2em 0 .4em; } h3 { font-size: 1em; margin: 1em 0 .3em; }
table { border-collapse: collapse; } th, td { padding: .25em .7em; border-bottom: 1px solid #e3e7ed; text-align: left; }
tr.selected { background: #eef3fa; } code { font-size: .92em; }
.state.running { color: #2a7a2a; } .state.failed, .error { color: #b02a2a; } .warn { color: #a0620a; }
.columns { display: flex; flex-wrap: wrap; gap: 2em; } dl.config { display: grid; grid-template-columns: auto auto; align-content: start; gap: .2em 1em; margin: 0; }
dt { color: #5a6675; } dd { margin: 0; }
svg.chart { display: block; margin-bottom: .8em; background: #fff; border: 1px solid #e3e7ed; }
svg .grid { stroke: #edf0f4; } svg .frame { stroke: #c9d0da; } svg .tick, svg .axis-label, svg .legend text { font-size: 11px; fill: #5a6675; }
svg .chart-title { font-size: 12px; fill: #1d2430; }
svg .line { stroke-width: 2.2; } svg .line.site { stroke-width: 1.3; stroke-dasharray: 5 3; }
"#;

/// Asks for the live part again and again: the server holds each request until the run moves
/// on (or 20 s pass), so a finished round shows at once; with no run in progress it asks every
/// 5 s, and after an error every 3 s.
const SCRIPT: &str = r#"
(function () {
  const live = document.getElementById('live');
  const status = document.getElementById('status');
  const params = new URLSearchParams(location.search);
  async function follow() {
    for (;;) {
      const view = document.getElementById('view');
      const key = view ? view.dataset.key : '';
      const running = view && view.dataset.state === 'running';
      let pause = running ? 0 : 5000;
      params.set('after', key);
      try {
        const response = await fetch('live?' + params.toString(), { cache: 'no-store' });
        live.innerHTML = await response.text();
        document.body.dataset.updates = String(Number(document.body.dataset.updates) + 1);
        status.textContent = response.ok ? 'live' : 'coordinator unreachable, retrying';
        if (!response.ok) pause = 3000;
      } catch (e) {
        status.textContent = 'dashboard unreachable, retrying';
        pause = 3000;
      }
      await new Promise(resolve => setTimeout(resolve, pause));
    }
  }
  follow();
})();
"#;
