//! `alveolus segment`: the global model drafts the lungs and the lesions of new scans, for a
//! radiologist to correct. The work is `alveolus_imaging::outputs`; this is arguments and the
//! terminal.

use std::path::PathBuf;

use alveolus_imaging::outputs::{ModelInfo, Summary, segment_input};
use alveolus_imaging::segment::{LungSource, SegmentOptions};
use alveolus_models::network::load_model;
use alveolus_models::{DeviceChoice, Inference, ModelSpec};
use anyhow::{Context, Result, bail};
use clap::Args;

#[derive(Args)]
pub struct SegmentArgs {
    /// The model (safetensors), e.g. from `alveolus model pull`; its manifest beside it (same
    /// name, .json) gives the round it came from.
    #[arg(long)]
    model: PathBuf,
    /// A DICOM series folder or file, a NIfTI file, a PNG slice folder, or a dataset.toml
    /// (every case, each into a folder named by its id).
    #[arg(long)]
    input: PathBuf,
    /// Folder for the outputs; refused if it already holds results, unless --force.
    #[arg(long)]
    out: PathBuf,
    /// cpu, cuda, cuda:N or flex.
    #[arg(long, default_value = "cpu")]
    device: DeviceChoice,
    /// Where the lung mask comes from: auto (the model's lung class if it has one, else HU),
    /// model, or hu.
    #[arg(long, default_value = "auto")]
    lung: LungSource,
    /// Planes per forward pass.
    #[arg(long, default_value_t = alveolus_models::infer::DEFAULT_BATCH)]
    batch_size: usize,
    /// Replace results already in --out (only once the new ones are complete).
    #[arg(long)]
    force: bool,
    /// Print the reports as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: SegmentArgs) -> Result<()> {
    tokio::task::spawn_blocking(move || segment(args)).await?
}

fn segment(args: SegmentArgs) -> Result<()> {
    let bytes = std::fs::read(&args.model)
        .with_context(|| format!("cannot read {}", args.model.display()))?;
    let weights = alveolus_models::Weights::decode(&bytes)
        .with_context(|| format!("{} is not a model file", args.model.display()))?;
    let spec = ModelSpec::from_weights(&weights)
        .with_context(|| format!("{}: no model description", args.model.display()))?;
    if spec.spatial_dims() != 2 {
        bail!(
            "{}: a {} network segments volume patches; segment applies 2D models (tiny, small or default)",
            args.model.display(),
            spec.kind
        );
    }
    let resolved = args.device.resolve()?;
    let (spec, model) = load_model(&weights, &resolved.device)?;
    let info = ModelInfo::of_file(&args.model, &bytes, spec.classes, spec.image_size);
    drop((weights, bytes));
    println!(
        "model {} ({}), {} classes, {} px, on {resolved}",
        info.version,
        match (info.round, &info.run) {
            (Some(round), Some(run)) => format!("round {round} of run {run}"),
            _ => "no federated round: no manifest beside the file".into(),
        },
        spec.classes,
        spec.image_size
    );
    let inference = Inference::new(&model, spec, &resolved.device);
    let options = SegmentOptions {
        batch_size: args.batch_size,
        lung: args.lung,
        ..SegmentOptions::default()
    };
    let mut shown = (String::new(), 0);
    let outcomes = segment_input(
        &inference,
        &info,
        &args.input,
        &args.out,
        &options,
        args.force,
        |case, done, total| {
            // A line at every tenth of a case, not at every batch.
            let tenth = 10 * done / total.max(1);
            if shown != (case.to_string(), tenth) {
                shown = (case.to_string(), tenth);
                let case = if case.is_empty() {
                    String::new()
                } else {
                    format!("{case}: ")
                };
                eprintln!("segmenting {case}{done} of {total}");
            }
        },
    )?;
    let mut failed = 0;
    let mut reports = Vec::new();
    for outcome in &outcomes {
        let name = outcome
            .id
            .as_deref()
            .map(|id| format!("{id}: "))
            .unwrap_or_default();
        match &outcome.result {
            Ok(Summary::Scan(report)) => {
                if args.json {
                    reports.push(serde_json::to_value(report)?);
                } else {
                    println!("{name}{}", outcome.folder.display());
                    print!("{}", report.quantities.render());
                    if let Some(why) = &report.seg_skipped {
                        println!("no seg.dcm: {why}");
                    }
                    println!("wrote {}", report.files.join(", "));
                }
            }
            Ok(Summary::Slices(slices)) => {
                let with_lesion = slices
                    .iter()
                    .filter(|s| s.lesion_percent_of_slice > 0.0)
                    .count();
                if args.json {
                    reports.push(serde_json::to_value(slices)?);
                } else {
                    println!(
                        "{}: {} slices, {with_lesion} with lesion; masks in masks/, preview.png, report.json",
                        outcome.folder.display(),
                        slices.len()
                    );
                }
            }
            Err(e) => {
                failed += 1;
                eprintln!("{name}not segmented: {e}");
            }
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    }
    if failed > 0 {
        bail!("{failed} of {} inputs were not segmented", outcomes.len());
    }
    Ok(())
}
