//! The command line by command group, each a file: its `clap` arguments and a thin `run` over
//! the libraries. What several groups share (reading a model, loading a dataset, printing its
//! notes and a Dice report, the shutdown signal) is here.

pub mod bench;
pub mod dashboard;
pub mod data;
pub mod local;
pub mod model;
pub mod privacy;
pub mod project;
pub mod run;
pub mod segment;
pub mod service;
pub mod sites;

use std::path::Path;

use alveolus_imaging::SliceDataset;
use alveolus_imaging::dataset::{CaseReport, Purpose};
use alveolus_models::metrics::DiceReport;
use alveolus_models::spec::Norm;
use alveolus_models::{ModelSpec, Weights};
use anyhow::{Context, Result, bail};

/// Reads a model file, refusing anything larger than a model can be, and anything that is not
/// a file (`/dev/zero`, a pipe), before it fills memory.
pub fn read_model(path: &Path) -> Result<Weights> {
    use std::io::Read;
    let limit = alveolus_proto::transfer::MAX_MODEL_BYTES;
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let metadata = file
        .metadata()
        .with_context(|| format!("cannot read {}", path.display()))?;
    if !metadata.is_file() {
        bail!(
            "{} is not a regular file; a model is read from a file whose size is known",
            path.display()
        );
    }
    let too_large = || {
        anyhow::anyhow!(
            "{} is larger than a model can be ({} GiB)",
            path.display(),
            limit >> 30
        )
    };
    if metadata.len() > limit {
        return Err(too_large());
    }
    let mut bytes = Vec::new();
    // The file may grow while it is read: the limit holds for what is read, too.
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.len() as u64 > limit {
        return Err(too_large());
    }
    Weights::decode(&bytes).with_context(|| format!("{} is not a model file", path.display()))
}

/// A dataset's usable slices; what was skipped or looks odd is printed here, on the site's
/// own terminal.
pub fn load_data(path: &Path, purpose: Purpose, skip_bad_cases: bool) -> Result<SliceDataset> {
    let loaded = alveolus_imaging::dataset::load(path, purpose, skip_bad_cases)?;
    print_notes(&loaded.skipped, &loaded.warned);
    Ok(loaded.slices)
}

/// Cases a load left out, and warnings about those it used.
pub fn print_notes(skipped: &[CaseReport], warned: &[CaseReport]) {
    for case in skipped {
        eprintln!("skipped case {} (errors):", case.id);
        for problem in &case.problems {
            eprintln!("  {}", problem.message);
        }
    }
    for case in warned {
        for problem in &case.problems {
            eprintln!("warning: case {}: {}", case.id, problem.message);
        }
    }
}

/// Writes a (possibly long) report to stdout; a reader that stops early (`| head`) is not an
/// error.
pub fn write_stdout(text: &str) -> Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// The network a command makes from scratch (`train`, `run start`).
#[derive(clap::Args)]
pub struct NetworkArgs {
    /// Network preset: tiny, small (128 px) or default (256 px).
    #[arg(long, default_value = "small")]
    pub model: String,
    /// Output classes: 2 (infection), 3 (GGO, consolidation) or 4 (and lung).
    #[arg(long, default_value_t = 3)]
    pub classes: usize,
    /// Normalisation: batch or instance (no running statistics shared between sites).
    #[arg(long, default_value = "batch")]
    pub norm: Norm,
}

impl NetworkArgs {
    /// The preset with the chosen classes and normalisation, checked for slice training.
    pub fn spec(&self) -> Result<ModelSpec> {
        let spec = ModelSpec {
            classes: self.classes,
            norm: self.norm,
            ..ModelSpec::preset(&self.model)?
        };
        spec.validate()?;
        slices_only(&spec)?;
        Ok(spec)
    }
}

/// Agents and `train` learn from slice folders, which only a 2D network can use.
pub fn slices_only(spec: &ModelSpec) -> Result<()> {
    if spec.spatial_dims() != 2 {
        bail!(
            "the {} network learns from volume patches; training on slice folders needs a 2D model (tiny, small or default)",
            spec.kind
        );
    }
    Ok(())
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a (class absent)".to_string(), |v| format!("{v:.4}"))
}

pub fn print_report(prefix: &str, report: &DiceReport) {
    let hd95 = |d: Option<f64>| d.map(|d| format!("  hd95 {d:.1} mm")).unwrap_or_default();
    for class in &report.per_class {
        println!(
            "{prefix}{:<14} dice {}  iou {}{}",
            class.class,
            fmt_opt(class.dice),
            fmt_opt(class.iou),
            hd95(class.hd95_mm)
        );
    }
    println!(
        "{prefix}{:<14} dice {}  iou {}{}",
        "infection",
        fmt_opt(report.infection),
        fmt_opt(report.infection_iou),
        hd95(report.infection_hd95_mm)
    );
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler installs");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
