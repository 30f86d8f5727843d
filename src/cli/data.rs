//! `data validate|synth|add-case`: a site's data checked, made up, or grown by a corrected case.

use std::path::PathBuf;

use alveolus_imaging::add_case::{NewCase, add_case};
use alveolus_imaging::dataset::Split;
use alveolus_imaging::synth::{SynthDataset, write_dataset};
use alveolus_imaging::validate::validate;
use anyhow::{Context, Result};
use clap::Subcommand;

use super::write_stdout;

#[derive(Subcommand)]
pub enum DataCommand {
    /// Read every case and report each problem with its file, then a summary. Exits non-zero
    /// when nothing usable remains.
    Validate {
        /// A dataset.toml, a folder holding one, a PNG slice folder, a DICOM series folder or
        /// a single NIfTI or DICOM file.
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Write synthetic chest CTs with exact lesion and lung masks, as DICOM series and NIfTI,
    /// with a dataset.toml for each form: a dataset for trying things where no real one may go.
    Synth {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 4)]
        cases: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Pixels a side of each axial slice (the field of view stays 350 mm).
        #[arg(long, default_value_t = 128)]
        size: usize,
        /// Axial slices per case (8 mm apart).
        #[arg(long, default_value_t = 32)]
        slices: usize,
    },
    /// Add a case (a corrected segmentation, say) to a dataset.toml after checking it as
    /// `validate` does; agents train on it from their next round.
    AddCase {
        /// The dataset description to add to.
        #[arg(long)]
        dataset: PathBuf,
        /// A new case id.
        #[arg(long)]
        id: String,
        /// The scan: a DICOM series folder or file, or a NIfTI file.
        #[arg(long)]
        image: PathBuf,
        /// Its labels: a NIfTI label map or a DICOM SEG (as 3D Slicer writes them).
        #[arg(long)]
        labels: PathBuf,
        /// train, validation or test.
        #[arg(long, default_value = "train")]
        split: Split,
    },
}

pub async fn data_command(command: DataCommand) -> Result<()> {
    match command {
        DataCommand::Validate { data, json } => {
            let report = tokio::task::spawn_blocking(move || validate(&data)).await??;
            let text = if json {
                serde_json::to_string_pretty(&report)? + "\n"
            } else {
                report.render()
            };
            write_stdout(&text)?;
            if !report.any_usable() {
                std::process::exit(1);
            }
            Ok(())
        }
        DataCommand::Synth {
            out,
            cases,
            seed,
            size,
            slices,
        } => {
            let dataset = SynthDataset {
                cases,
                seed,
                size: [size, size, slices],
                spacing: [350.0 / size as f64, 350.0 / size as f64, 8.0],
            };
            let target = out.clone();
            tokio::task::spawn_blocking(move || write_dataset(&target, &dataset))
                .await?
                .with_context(|| {
                    format!("cannot write the synthetic dataset to {}", out.display())
                })?;
            println!(
                "{cases} synthetic cases written to {}: dataset.toml (DICOM series) and dataset-nifti.toml (NIfTI)",
                out.display()
            );
            Ok(())
        }
        DataCommand::AddCase {
            dataset,
            id,
            image,
            labels,
            split,
        } => {
            let case = NewCase {
                id,
                image,
                labels,
                split,
            };
            let (report, dataset, case) = tokio::task::spawn_blocking(move || {
                add_case(&dataset, &case).map(|r| (r, dataset, case))
            })
            .await??;
            for problem in &report.problems {
                eprintln!("warning: {}", problem.message);
            }
            let summary = report.summary.as_ref();
            println!(
                "added case {} ({} split{}) to {}; agents train on it from their next round",
                case.id,
                case.split,
                summary
                    .map(|s| format!(", {} labelled slices", s.labelled_slices))
                    .unwrap_or_default(),
                dataset.display()
            );
            Ok(())
        }
    }
}
