//! `train` and `evaluate`: a model and data on this machine, without federation (the central
//! or single-site baseline a federated run has to beat, and its measurement).

use std::path::PathBuf;

use alveolus_imaging::dataset::Purpose;
use alveolus_imaging::evaluate::{add_hausdorff, evaluate};
use alveolus_models::augment::AugmentConfig;
use alveolus_models::trainable::Trainable;
use alveolus_models::{DeviceChoice, ModelSpec, Precision, Schedule, TrainOptions};
use alveolus_proto::domain::TrainingConfig;
use anyhow::{Context, Result};
use clap::Args;

use super::{NetworkArgs, load_data, print_report, read_model, slices_only};
use crate::progress::TrainingProgress;

#[derive(Args)]
pub struct TrainArgs {
    /// Training data: a dataset.toml (its `train` cases) or a PNG slice folder.
    #[arg(long)]
    data: PathBuf,
    /// Train without the cases that have errors (they are listed) instead of refusing.
    #[arg(long)]
    skip_bad_cases: bool,
    /// Where to write the trained model (safetensors).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    network: NetworkArgs,
    /// Fine-tune this model (a federation's global model, from `model pull`) instead of
    /// training a fresh network: its architecture and classes are the model's own. With
    /// --validate, Dice is reported before and after.
    #[arg(long, conflicts_with_all = ["model", "classes", "norm"])]
    init: Option<PathBuf>,
    /// What fine-tuning trains: all, decoder (the encoder stays as it is) or norm (only the
    /// normalisation layers, which needs the fewest slices).
    #[arg(long, default_value = "all", requires = "init")]
    trainable: Trainable,
    #[arg(long, default_value_t = 10)]
    epochs: u32,
    /// Learning-rate schedule: cosine (5% warm-up, then cosine decay) or constant.
    #[arg(long, default_value = "cosine")]
    schedule: ScheduleChoice,
    /// Train on the slices as they are: no flips, rotations, zooms or intensity jitter.
    #[arg(long)]
    no_augment: bool,
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    #[arg(long, default_value_t = 4)]
    batch_size: u32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value = "cpu")]
    device: DeviceChoice,
    /// f32, or bf16/f16 mixed precision: the convolutions in half precision (fast on a GPU's
    /// tensor cores), the loss, normalisation statistics, optimizer state and the model written
    /// in f32; f16 scales the loss so small gradients survive.
    #[arg(long, default_value = "f32")]
    precision: Precision,
    /// Labelled data (every case, whatever its split) to report Dice on after training.
    #[arg(long)]
    validate: Option<PathBuf>,
}

impl From<&TrainArgs> for TrainingConfig {
    fn from(a: &TrainArgs) -> Self {
        Self {
            local_epochs: a.epochs,
            learning_rate: a.lr,
            batch_size: a.batch_size,
            seed: a.seed,
            precision: a.precision,
            ..Self::default()
        }
    }
}

impl From<&TrainArgs> for TrainOptions {
    fn from(a: &TrainArgs) -> Self {
        TrainOptions {
            schedule: a.schedule.0,
            augment: if a.no_augment {
                AugmentConfig::NONE
            } else {
                AugmentConfig::default()
            },
            trainable: a.trainable,
            ..TrainOptions::central()
        }
    }
}

/// `--schedule` values.
#[derive(Debug, Clone, Copy)]
pub struct ScheduleChoice(Schedule);

impl std::str::FromStr for ScheduleChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cosine" => Ok(Self(Schedule::COSINE)),
            "constant" => Ok(Self(Schedule::Constant)),
            other => Err(format!(
                "`{other}` is not a schedule: use cosine or constant"
            )),
        }
    }
}

pub async fn train(args: TrainArgs) -> Result<()> {
    let config = TrainingConfig::from(&args);
    config.validate()?;
    let options = TrainOptions::from(&args);
    let initial = match &args.init {
        Some(path) => {
            let weights = read_model(path)?;
            let spec = ModelSpec::from_weights(&weights)
                .with_context(|| format!("{} is not a model to fine-tune", path.display()))?;
            slices_only(&spec)?;
            weights
        }
        None => alveolus_models::network::initial_weights(&args.network.spec()?, args.seed)?,
    };
    let spec = ModelSpec::from_weights(&initial)?;
    let dataset = load_data(&args.data, Purpose::Training, args.skip_bad_cases)?;
    let validation = args
        .validate
        .as_deref()
        .map(|v| load_data(v, Purpose::Evaluation, false))
        .transpose()?;
    let resolved = args.device.resolve()?;
    let epochs = args.epochs;
    let what = match &args.init {
        Some(path) => format!("fine-tuning {} ({} of it)", path.display(), args.trainable),
        None => "training".to_owned(),
    };
    println!(
        "{what}: a {} px U-Net (base {}, depth {}) on {} slices for {epochs} epochs on {resolved}{}",
        spec.image_size,
        spec.base_channels,
        spec.depth,
        dataset.len(),
        match config.precision {
            Precision::F32 => String::new(),
            p => format!(", {p} mixed precision"),
        }
    );
    if let Some(caution) = resolved.precision_caution(config.precision) {
        println!("note: {caution}");
    }
    let fine_tuning = args.init.is_some();
    let slices = dataset.at_size(spec.image_size);
    let (outcome, before, after) = tokio::task::spawn_blocking(move || {
        // The model a site starts from is what fine-tuning has to beat.
        let before = match (&validation, fine_tuning) {
            (Some(v), true) => Some(evaluate(&initial, v, &resolved.device)?),
            _ => None,
        };
        let mut progress = TrainingProgress::new(epochs);
        let outcome = alveolus_models::train::train(
            &initial,
            &slices,
            &config,
            &options,
            &resolved.device,
            |p| progress.update(p),
        )?;
        let after = validation
            .map(|v| evaluate(&outcome.weights, &v, &resolved.device))
            .transpose()?;
        anyhow::Ok((outcome, before, after))
    })
    .await??;
    std::fs::write(&args.out, outcome.weights.encode())
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    println!(
        "training-set infection dice (last epoch) {:.4}",
        outcome.dice
    );
    if let Some(before) = &before {
        print_report("validation, before fine-tuning ", before);
    }
    if let Some(after) = &after {
        let prefix = match before {
            Some(_) => "validation, after fine-tuning  ",
            None => "validation ",
        };
        print_report(prefix, after);
    }
    if let (Some(before), Some(after)) = (&before, &after)
        && let (Some(b), Some(a)) = (before.infection, after.infection)
    {
        println!(
            "fine-tuning changed validation infection dice by {:+.4} ({b:.4} -> {a:.4})",
            a - b
        );
    }
    println!("model written to {}", args.out.display());
    Ok(())
}

/// Dice of a model on labelled data (and HD95 where the data are volumes).
#[derive(Args)]
pub struct EvaluateArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    data: PathBuf,
    #[arg(long)]
    json: bool,
    #[arg(long, default_value = "cpu")]
    device: DeviceChoice,
}

pub async fn evaluate_model(args: EvaluateArgs) -> Result<()> {
    let weights = read_model(&args.model)?;
    let dataset = load_data(&args.data, Purpose::Evaluation, false)?;
    let resolved = args.device.resolve()?;
    eprintln!("evaluating {} slices on {resolved}", dataset.len());
    let data = args.data.clone();
    let report = tokio::task::spawn_blocking(move || {
        let mut report = evaluate(&weights, &dataset, &resolved.device)?;
        let volumes = add_hausdorff(&mut report, &weights, &data, &resolved.device)?;
        if volumes > 0 {
            eprintln!("HD95 over {volumes} labelled volumes");
        }
        anyhow::Ok(report)
    })
    .await??;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report("", &report);
    }
    Ok(())
}
