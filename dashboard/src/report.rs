//! A run's report: `report.html`, one file that opens anywhere without a network (inline style
//! and SVG charts, no script, no links out), and `loss.png` and `dice.png` (and `validation.png`
//! when the sites validated) beside it. It shows what the live page shows of the run, and adds
//! every site's figures for every round.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use alveolus_proto::domain::{RunInfo, SiteInfo};

use crate::chart;
use crate::view::{self, Header, Links, Snapshot, escape, utc};

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot write the report to {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot draw {}: {reason}", path.display())]
    Plot { path: PathBuf, reason: String },
}

/// The files a report is made of.
#[derive(Debug)]
pub struct Report {
    pub html: PathBuf,
    pub plots: Vec<PathBuf>,
}

/// Writes the report of `run` into `dir` (made if missing); `sites` and `now_ms` as the
/// coordinator gave them.
pub fn write(
    dir: &Path,
    header: &Header,
    run: &RunInfo,
    sites: Vec<SiteInfo>,
    now_ms: i64,
) -> Result<Report, ReportError> {
    let failed = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ReportError::Write { path, source }
    };
    std::fs::create_dir_all(dir).map_err(failed(dir))?;
    let (loss, dice) = chart::loss_and_dice(run);
    let mut charts = vec![(loss, "loss.png"), (dice, "dice.png")];
    charts.extend(chart::validation(run).map(|v| (v, "validation.png")));
    let mut plots = Vec::new();
    for (chart, name) in &charts {
        let path = dir.join(name);
        crate::png::draw(chart, &path).map_err(|reason| ReportError::Plot {
            path: path.clone(),
            reason,
        })?;
        plots.push(path);
    }
    let html = dir.join("report.html");
    // The run is shown from `run`; the snapshot gives the sites and the time.
    let snapshot = Snapshot {
        runs: Vec::new(),
        sites,
        now_ms,
    };
    std::fs::write(&html, page(header, &snapshot, run)).map_err(failed(&html))?;
    Ok(Report { html, plots })
}

/// The report's HTML.
pub fn page(header: &Header, snapshot: &Snapshot, run: &RunInfo) -> String {
    let mut body = String::new();
    view::run_section(&mut body, snapshot, run, Links::None);
    site_rounds(&mut body, run);
    site_validations(&mut body, run);
    format!(
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Alveolus · {project} · run {run_id}</title>
<style>{style}</style></head>
<body>
<header><h1>Alveolus <span class="project">{project}</span></h1>
<p>Report on run <code>{run_id}</code>, written {written} by <code>{admin}</code> from coordinator <code>{coordinator}</code>. Model versions are SHA-256 digests: <code>alveolus model pull --version</code> fetches one.</p></header>
<main>{body}</main>
</body></html>
"#,
        project = escape(&header.project),
        run_id = escape(&run.run_id),
        written = utc(snapshot.now_ms / 1000),
        admin = escape(&header.admin),
        coordinator = escape(&header.coordinator),
        style = view::STYLE,
    )
}

/// Every site's own figures in every round, as its update said them.
fn site_rounds(out: &mut String, run: &RunInfo) {
    out.push_str(r#"<section id="site-rounds"><h2>Each site, round by round</h2>"#);
    if run.config.secure_aggregation.is_some() {
        out.push_str(r#"<p>This run was securely aggregated: the coordinator saw only the sum of the sites' updates and metrics, so there are no figures per site.</p></section>"#);
        return;
    }
    out.push_str(r#"<table><thead><tr><th>round</th><th>site</th><th>samples</th><th>loss</th><th>Dice</th><th>training</th><th>update</th></tr></thead><tbody>"#);
    for round in &run.rounds {
        for s in &round.site_reports {
            let _ = write!(
                out,
                r#"<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.4}</td><td>{:.3}</td><td>{}</td><td>{}</td></tr>"#,
                round.round,
                escape(&s.site),
                s.samples,
                s.loss,
                s.dice,
                s.train_seconds.map(view::seconds).unwrap_or_default(),
                view::bytes(s.bytes),
            );
        }
    }
    out.push_str("</tbody></table></section>");
}

/// Every site's validation of every round's model, class by class. Sites send these apart from
/// their updates, so secure aggregation leaves them.
fn site_validations(out: &mut String, run: &RunInfo) {
    let reports: Vec<_> = run
        .rounds
        .iter()
        .flat_map(|r| r.validation.iter().map(move |v| (r.round, v)))
        .collect();
    if reports.is_empty() {
        return;
    }
    let mut classes: Vec<&str> = Vec::new();
    for (_, v) in &reports {
        for c in &v.validation.classes {
            if !classes.contains(&c.class.as_str()) {
                classes.push(&c.class);
            }
        }
    }
    out.push_str(r#"<section id="site-validation"><h2>Each site's validation, round by round</h2><p>Dice of each round's model on the site's own validation cases, which never train and never leave the site.</p><table><thead><tr><th>round</th><th>site</th><th>cases</th><th>infection</th>"#);
    for class in &classes {
        let _ = write!(out, "<th>{}</th>", escape(class));
    }
    out.push_str("</tr></thead><tbody>");
    let dice = |d: Option<f64>| d.map_or_else(String::new, |d| format!("{d:.3}"));
    for (round, v) in reports {
        let _ = write!(
            out,
            r#"<tr><td>{round}</td><td>{}</td><td>{}</td><td>{}</td>"#,
            escape(&v.site),
            v.validation.cases,
            dice(v.validation.infection_dice),
        );
        for class in &classes {
            let _ = write!(out, "<td>{}</td>", dice(v.validation.dice_of(class)));
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table></section>");
}
