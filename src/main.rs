//! `alveolus`: the one binary. Argument parsing, wiring and human output only; the work is done
//! by the coordinator, agent and models crates.

mod admin;
mod bench;
mod demo;
mod progress;
mod secagg_bench;
mod segment;
mod segment_bench;

use std::path::{Path, PathBuf};

use alveolus_agent::AgentOptions;
use alveolus_coordinator::CoordinatorSettings;
use alveolus_coordinator::provision::{ProvisionRequest, provision, revoke};
use alveolus_imaging::SliceDataset;
use alveolus_imaging::add_case::{NewCase, add_case};
use alveolus_imaging::dataset::{CaseReport, Purpose, Split};
use alveolus_imaging::evaluate::{add_hausdorff, evaluate};
use alveolus_imaging::synth::{SynthDataset, write_dataset};
use alveolus_imaging::validate::validate;
use alveolus_models::augment::AugmentConfig;
use alveolus_models::metrics::DiceReport;
use alveolus_models::spec::Norm;
use alveolus_models::{DeviceChoice, ModelSpec, Schedule, TrainOptions, Weights};
use alveolus_proto::domain::{
    AggregationConfig, AggregationRule, PrivacyConfig, RunConfig, SecureAggregationConfig,
    TrainingConfig,
};
use alveolus_proto::identity::Role;
use alveolus_proto::kit::ClientKit;
use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use progress::TrainingProgress;

#[derive(Parser)]
#[command(
    name = "alveolus",
    version,
    about = "Federated training of chest-CT segmentation models across hospitals"
)]
struct Cli {
    /// Log filter (error, warn, info, debug, or a tracing filter); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a project CA and a startup kit for the coordinator, each site and each admin.
    Provision {
        #[arg(long)]
        project: String,
        /// HOST:PORT the agents will dial.
        #[arg(long)]
        coordinator: String,
        /// Site names (one kit each).
        #[arg(long = "site", num_args = 1.., required = true)]
        sites: Vec<String>,
        /// Admin (researcher) names.
        #[arg(long = "admin", num_args = 1.., required = true)]
        admins: Vec<String>,
        /// New folder to write the CA and the kits into.
        #[arg(long)]
        out: PathBuf,
        /// Lifetime of the issued certificates.
        #[arg(long, default_value_t = 825)]
        validity_days: u32,
    },
    /// Revoke a site's or admin's certificate; the coordinator refuses it from its next connection on.
    Revoke {
        /// The folder `provision --out` created.
        #[arg(long)]
        project_dir: PathBuf,
        #[arg(long, conflicts_with = "admin", required_unless_present = "admin")]
        site: Option<String>,
        #[arg(long)]
        admin: Option<String>,
    },
    /// Run the coordinator from its kit.
    Coordinator {
        #[arg(long)]
        kit: PathBuf,
        /// State folder (checkpoints, run log); defaults to the kit's `state_dir`.
        #[arg(long)]
        state: Option<PathBuf>,
        /// Listen address; defaults to the kit's `listen`.
        #[arg(long)]
        listen: Option<String>,
    },
    /// Run a site agent: trains on local data, sends only weight updates.
    Agent {
        #[arg(long)]
        kit: PathBuf,
        /// The site's data: a dataset.toml (or a folder holding one) or a PNG slice folder
        /// (images/, masks/). `alveolus data validate` checks it first.
        #[arg(long)]
        data: PathBuf,
        /// Train without the cases that have errors (they are listed) instead of refusing.
        #[arg(long)]
        skip_bad_cases: bool,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: DeviceChoice,
        /// Keep a copy of every update sent here.
        #[arg(long)]
        audit_dir: Option<PathBuf>,
    },
    /// Start, follow and stop federated runs (admin kit).
    Run {
        #[command(subcommand)]
        command: RunCommand,
    },
    /// Sites the coordinator knows (admin kit).
    Sites {
        #[command(subcommand)]
        command: SitesCommand,
    },
    /// Download global models.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// Train on one folder of labelled slices, without federation: the central or
    /// single-site baseline a federated run has to beat.
    Train {
        /// Training data: a dataset.toml (its `train` cases) or a PNG slice folder.
        #[arg(long)]
        data: PathBuf,
        /// Train without the cases that have errors (they are listed) instead of refusing.
        #[arg(long)]
        skip_bad_cases: bool,
        /// Where to write the trained model (safetensors).
        #[arg(long)]
        out: PathBuf,
        /// Network preset: tiny, small (128 px) or default (256 px).
        #[arg(long, default_value = "small")]
        model: String,
        /// Output classes: 2 (infection), 3 (GGO, consolidation) or 4 (and lung).
        #[arg(long, default_value_t = 3)]
        classes: usize,
        /// Normalisation: batch or instance.
        #[arg(long, default_value = "batch")]
        norm: Norm,
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
        /// Labelled data (every case, whatever its split) to report Dice on after training.
        #[arg(long)]
        validate: Option<PathBuf>,
    },
    /// Dice of a model on labelled data (a dataset.toml or a PNG slice folder).
    Evaluate {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = "cpu")]
        device: DeviceChoice,
    },
    /// Draft the lungs and the COVID-19 lesions of new scans with a model: labels on the scan's
    /// own grid (NIfTI, and a DICOM SEG for DICOM series), volumes and involvement, a preview.
    Segment(segment::SegmentArgs),
    /// Differential-privacy planning.
    Privacy {
        #[command(subcommand)]
        command: PrivacyCommand,
    },
    /// Check and describe a site's data, or write a synthetic chest-CT dataset.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
    /// Measure training speed against PyTorch.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// Everything on one machine: a coordinator and three hospital agents over real mTLS.
    Demo {
        #[arg(long, default_value = "demo-out")]
        out: PathBuf,
        #[arg(long, default_value_t = 6)]
        rounds: u32,
        /// MedSeg slice folder; defaults to the copy shipped with the project.
        #[arg(long, conflicts_with = "synthetic")]
        data: Option<PathBuf>,
        /// Give each hospital synthetic chest CTs (DICOM series and NIfTI labels, made by
        /// `data synth`) instead of MedSeg slices.
        #[arg(long)]
        synthetic: bool,
        /// Run with differential privacy (DP-FedAvg): the clip norm of each site's update.
        #[arg(long, requires = "dp_noise")]
        dp_clip: Option<f64>,
        /// DP noise multiplier (noise std over the clip norm).
        #[arg(long, requires = "dp_clip")]
        dp_noise: Option<f64>,
        /// Aggregate securely: the coordinator sees only the sum of the hospitals' updates.
        #[arg(long)]
        secure_aggregation: bool,
    },
}

#[derive(Subcommand)]
enum PrivacyCommand {
    /// The epsilon a planned DP-FedAvg run would spend (Rényi-DP accountant of the sampled
    /// Gaussian mechanism), to choose settings before starting it.
    Plan {
        /// Noise multiplier: noise standard deviation over the clip norm.
        #[arg(long)]
        noise: f64,
        #[arg(long)]
        rounds: u64,
        /// Fraction of sites taking part in each round (1: every site, as runs do now).
        #[arg(long, default_value_t = 1.0)]
        sample_rate: f64,
        #[arg(long, default_value_t = 1e-5)]
        delta: f64,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, Debug)]
enum AggregationChoice {
    FedAvg,
    Median,
    TrimmedMean,
}

impl std::str::FromStr for AggregationChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fedavg" => Ok(Self::FedAvg),
            "median" => Ok(Self::Median),
            "trimmed-mean" => Ok(Self::TrimmedMean),
            other => Err(format!(
                "`{other}` is not an aggregation: fedavg, median or trimmed-mean"
            )),
        }
    }
}

impl AggregationChoice {
    fn rule(self, trim_fraction: f64) -> AggregationRule {
        match self {
            Self::FedAvg => AggregationRule::FedAvg,
            Self::Median => AggregationRule::Median,
            Self::TrimmedMean => AggregationRule::TrimmedMean { trim_fraction },
        }
    }
}

#[derive(Subcommand)]
enum DataCommand {
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

#[derive(Subcommand)]
enum BenchCommand {
    /// Segment a synthetic chest CT series (wall time, planes per second, peak memory), and time
    /// the model's inference over its planes against PyTorch's over the same planes.
    Segment(segment_bench::SegmentBenchOptions),
    /// What secure aggregation costs against aggregation in the clear: bytes per site and
    /// round wall time with N simulated sites over mTLS; with --dice, the demo's final Dice
    /// with DP at the given noise multipliers against no DP.
    Secagg {
        /// Numbers of simulated sites, comma separated.
        #[arg(long, value_delimiter = ',', default_value = "3,10,50")]
        sites: Vec<usize>,
        /// Rounds measured per setting (medians are printed).
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// DP noise multipliers to run the demo at (comma separated); the demo also runs
        /// without DP as the peer.
        #[arg(long, value_delimiter = ',')]
        dice: Option<Vec<f64>>,
        /// Demo rounds for --dice.
        #[arg(long, default_value_t = 6)]
        dice_rounds: u32,
        /// DP clip norm for --dice.
        #[arg(long, default_value_t = 1.0)]
        dp_clip: f64,
    },
    /// Time a training step (forward, loss, backward, AdamW) on each backend of this build and
    /// in PyTorch on the same batch, and print the medians and ratios.
    Train {
        /// Network preset: tiny, small or default.
        #[arg(long, default_value = "default")]
        model: String,
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        /// CPU threads for every backend and for PyTorch.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        #[arg(long, default_value_t = 6)]
        steps: usize,
        /// Devices to time (flex, cpu, cuda[:N]; repeatable); all this build has by default.
        #[arg(long)]
        device: Vec<DeviceChoice>,
        /// Time only our backends (PyTorch needs Python with torch).
        #[arg(long)]
        without_pytorch: bool,
    },
}

#[derive(Subcommand)]
enum RunCommand {
    /// Start a run from a fresh model (or `--init FILE`).
    Start {
        #[arg(long)]
        kit: PathBuf,
        #[arg(long, default_value_t = 5)]
        rounds: u32,
        #[arg(long, default_value_t = 1)]
        min_sites: u32,
        #[arg(long, default_value_t = 2)]
        local_epochs: u32,
        #[arg(long, default_value_t = 2e-3)]
        lr: f64,
        #[arg(long, default_value_t = 4)]
        batch_size: u32,
        /// Seconds after which a round closes with the sites that reported (at least min-sites).
        #[arg(long, default_value_t = 600)]
        deadline: u32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Network preset: small (128 px) or default (256 px).
        #[arg(long, default_value = "small")]
        model: String,
        /// Output classes: 2 (infection), 3 (GGO, consolidation) or 4 (and lung).
        #[arg(long, default_value_t = 3)]
        classes: usize,
        /// Normalisation: batch or instance (no running statistics shared between sites).
        #[arg(long, default_value = "batch")]
        norm: Norm,
        /// Start from this model file instead of a fresh network.
        #[arg(long)]
        init: Option<PathBuf>,
        /// Differential privacy (DP-FedAvg): the L2 norm each site clips its update to.
        /// Needs --dp-noise; sites are weighted equally.
        #[arg(long, requires = "dp_noise")]
        dp_clip: Option<f64>,
        /// Noise standard deviation over the clip norm, added by the coordinator to the sum.
        #[arg(long, requires = "dp_clip")]
        dp_noise: Option<f64>,
        /// The delta epsilon is reported at.
        #[arg(long, default_value_t = 1e-5, requires = "dp_clip")]
        dp_delta: f64,
        /// Stop the run before a round would take epsilon above this.
        #[arg(long, requires = "dp_clip")]
        dp_epsilon_budget: Option<f64>,
        /// How updates are combined: fedavg, median or trimmed-mean (the last two keep every
        /// update of a round in memory, and resist a faulty or hostile site).
        #[arg(long, default_value = "fedavg")]
        aggregation: AggregationChoice,
        /// Trimmed mean: fraction of sites dropped at each end of every coordinate.
        #[arg(long, default_value_t = 0.2)]
        trim_fraction: f64,
        /// Refuse updates whose L2 norm is above this.
        #[arg(long)]
        norm_bound: Option<f64>,
        /// Secure aggregation: sites mask their updates so that the coordinator learns only
        /// their sum (FedAvg only; with --dp-clip the sites add the noise).
        #[arg(long)]
        secure_aggregation: bool,
        /// Secure aggregation: sites that must survive each round to its end (and that would
        /// have to collude with the coordinator to unmask one site). Default: --min-sites,
        /// at least 2.
        #[arg(long, requires = "secure_aggregation")]
        threshold: Option<u32>,
    },
    Status {
        #[arg(long)]
        kit: PathBuf,
        /// Run id; the most recent run by default.
        #[arg(long, default_value = "")]
        run: String,
        #[arg(long)]
        json: bool,
    },
    List {
        #[arg(long)]
        kit: PathBuf,
    },
    /// Follow a run live, round by round, until it ends.
    Watch {
        #[arg(long)]
        kit: PathBuf,
        #[arg(long, default_value = "")]
        run: String,
    },
    Abort {
        #[arg(long)]
        kit: PathBuf,
        #[arg(long, default_value = "")]
        run: String,
    },
}

#[derive(Subcommand)]
enum SitesCommand {
    List {
        #[arg(long)]
        kit: PathBuf,
    },
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Download a model (the latest by default); its digest is verified. The manifest goes
    /// beside it as FILE with the extension .json.
    Pull {
        #[arg(long)]
        kit: PathBuf,
        #[arg(long, default_value = "")]
        version: String,
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&cli.log))
        .context("invalid --log filter")?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    alveolus_proto::install_crypto_provider();
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(dispatch(cli.command))
}

async fn dispatch(command: Command) -> Result<()> {
    match command {
        Command::Provision {
            project,
            coordinator,
            sites,
            admins,
            out,
            validity_days,
        } => {
            let summary = provision(&ProvisionRequest {
                project,
                coordinator,
                sites,
                admins,
                out,
                validity_days,
            })?;
            println!(
                "project CA:       {} (keep ca.key offline)",
                summary.ca_dir.display()
            );
            println!("coordinator kit:  {}", summary.coordinator_kit.display());
            for (name, dir) in &summary.site_kits {
                println!("site kit {name:<9} {}", dir.display());
            }
            for (name, dir) in &summary.admin_kits {
                println!("admin kit {name:<8} {}", dir.display());
            }
            Ok(())
        }
        Command::Revoke {
            project_dir,
            site,
            admin,
        } => {
            let (role, name) = match (site, admin) {
                (Some(s), _) => (Role::Site, s),
                (None, Some(a)) => (Role::Admin, a),
                (None, None) => bail!("give --site NAME or --admin NAME"),
            };
            for path in revoke(&project_dir, role, &name)? {
                println!("revocation list written: {}", path.display());
            }
            println!(
                "{role}/{name} is revoked; the coordinator refuses it from its next connection on"
            );
            Ok(())
        }
        Command::Coordinator { kit, state, listen } => {
            run_coordinator(&kit, state.as_deref(), listen).await
        }
        Command::Agent {
            kit,
            data,
            skip_bad_cases,
            device,
            audit_dir,
        } => {
            let kit = ClientKit::load(&kit)?;
            if kit.identity.role != Role::Site {
                bail!(
                    "{} is an {} kit; agents need a site kit",
                    kit.dir.display(),
                    kit.identity.role
                );
            }
            let (data, notes) = alveolus_agent::SiteData::load(&data, skip_bad_cases)?;
            print_notes(&notes.skipped, &notes.warned);
            let options = AgentOptions {
                device,
                audit_dir,
                ..AgentOptions::default()
            };
            alveolus_agent::run_agent(kit, data, options, shutdown_signal()).await?;
            Ok(())
        }
        Command::Run { command } => run_command(command).await,
        Command::Sites {
            command: SitesCommand::List { kit },
        } => admin::list_sites(&kit).await,
        Command::Model {
            command: ModelCommand::Pull { kit, version, out },
        } => admin::pull_model_to_file(&kit, &version, &out).await,
        Command::Train {
            data,
            skip_bad_cases,
            out,
            model,
            classes,
            norm,
            epochs,
            schedule,
            no_augment,
            lr,
            batch_size,
            seed,
            device,
            validate,
        } => {
            let config = TrainingConfig {
                local_epochs: epochs,
                learning_rate: lr,
                batch_size,
                seed,
            };
            config.validate()?;
            let spec = slice_model(&model, classes, norm)?;
            let options = TrainOptions {
                schedule: schedule.0,
                augment: if no_augment {
                    AugmentConfig::NONE
                } else {
                    AugmentConfig::default()
                },
                ..TrainOptions::central()
            };
            let dataset = load_data(&data, Purpose::Training, skip_bad_cases)?;
            let validation = validate
                .as_deref()
                .map(|v| load_data(v, Purpose::Evaluation, false))
                .transpose()?;
            let resolved = device.resolve()?;
            println!(
                "training a {} px U-Net (base {}, depth {}) on {} slices for {epochs} epochs on {resolved}",
                spec.image_size,
                spec.base_channels,
                spec.depth,
                dataset.len()
            );
            let initial = alveolus_models::train::initial_weights(&spec, seed)?;
            let slices = dataset.at_size(spec.image_size);
            let outcome = tokio::task::spawn_blocking(move || {
                let mut progress = TrainingProgress::new(epochs);
                let outcome = alveolus_models::train::train(
                    &initial,
                    &slices,
                    &config,
                    &options,
                    &resolved.device,
                    |p| progress.update(p),
                )?;
                let report = validation
                    .map(|v| evaluate(&outcome.weights, &v, &resolved.device))
                    .transpose()?;
                anyhow::Ok((outcome, report))
            })
            .await??;
            let (outcome, report) = outcome;
            std::fs::write(&out, outcome.weights.encode())
                .with_context(|| format!("cannot write {}", out.display()))?;
            println!(
                "training-set infection dice (last epoch) {:.4}",
                outcome.dice
            );
            if let Some(report) = report {
                print_report("validation ", &report);
            }
            println!("model written to {}", out.display());
            Ok(())
        }
        Command::Segment(args) => segment::run(args).await,
        Command::Evaluate {
            model,
            data,
            json,
            device,
        } => {
            let weights = read_model(&model)?;
            let dataset = load_data(&data, Purpose::Evaluation, false)?;
            let resolved = device.resolve()?;
            eprintln!("evaluating {} slices on {resolved}", dataset.len());
            let report = tokio::task::spawn_blocking(move || {
                let mut report = evaluate(&weights, &dataset, &resolved.device)?;
                let volumes = add_hausdorff(&mut report, &weights, &data, &resolved.device)?;
                if volumes > 0 {
                    eprintln!("HD95 over {volumes} labelled volumes");
                }
                anyhow::Ok(report)
            })
            .await??;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_report("", &report);
            }
            Ok(())
        }
        Command::Demo {
            out,
            rounds,
            data,
            synthetic,
            dp_clip,
            dp_noise,
            secure_aggregation,
        } => {
            let data = if synthetic {
                demo::DemoData::Synthetic
            } else {
                demo::DemoData::MedSeg(data)
            };
            let privacy = privacy_config(dp_clip, dp_noise, 1e-5, None);
            demo::run(&out, rounds, data, privacy, secure_aggregation).await
        }
        Command::Privacy {
            command:
                PrivacyCommand::Plan {
                    noise,
                    rounds,
                    sample_rate,
                    delta,
                    json,
                },
        } => {
            let spent = alveolus_privacy::epsilon_after(sample_rate, noise, rounds, delta)?;
            if json {
                let report = serde_json::json!({
                    "noise_multiplier": noise,
                    "rounds": rounds,
                    "sample_rate": sample_rate,
                    "delta": delta,
                    "epsilon": spent.epsilon,
                    "rdp_order": spent.order,
                });
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "epsilon {:.4} at delta {delta} after {rounds} rounds (noise multiplier {noise}, sample rate {sample_rate}; RDP order {})",
                    spent.epsilon, spent.order
                );
                for fraction in [4, 2] {
                    let r = rounds / fraction;
                    if r > 0 {
                        let e = alveolus_privacy::epsilon_after(sample_rate, noise, r, delta)?;
                        println!("  after {r} rounds: epsilon {:.4}", e.epsilon);
                    }
                }
            }
            Ok(())
        }
        Command::Data {
            command: DataCommand::Validate { data, json },
        } => {
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
        Command::Data {
            command:
                DataCommand::Synth {
                    out,
                    cases,
                    seed,
                    size,
                    slices,
                },
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
        Command::Data {
            command:
                DataCommand::AddCase {
                    dataset,
                    id,
                    image,
                    labels,
                    split,
                },
        } => {
            let case = NewCase {
                id,
                image,
                labels,
                split,
            };
            let report = tokio::task::spawn_blocking(move || {
                add_case(&dataset, &case).map(|r| (r, dataset, case))
            })
            .await?;
            let (report, dataset, case) = report?;
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
        Command::Bench {
            command:
                BenchCommand::Secagg {
                    sites,
                    repeats,
                    dice,
                    dice_rounds,
                    dp_clip,
                },
        } => {
            secagg_bench::run(secagg_bench::SecAggBenchOptions {
                sites,
                repeats,
                dice_noise: dice,
                dice_rounds,
                dp_clip,
            })
            .await
        }
        Command::Bench {
            command:
                BenchCommand::Train {
                    model,
                    batch_size,
                    threads,
                    warmup,
                    steps,
                    device,
                    without_pytorch,
                },
        } => {
            tokio::task::spawn_blocking(move || {
                bench::run(bench::BenchOptions {
                    model,
                    batch_size,
                    threads,
                    warmup,
                    steps,
                    devices: device,
                    without_pytorch,
                })
            })
            .await?
        }
        Command::Bench {
            command: BenchCommand::Segment(options),
        } => tokio::task::spawn_blocking(move || segment_bench::run(options)).await?,
    }
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a (class absent)".to_string(), |v| format!("{v:.4}"))
}

/// A preset with the chosen classes and normalisation, checked for slice training.
fn slice_model(preset: &str, classes: usize, norm: Norm) -> Result<ModelSpec> {
    let spec = ModelSpec {
        classes,
        norm,
        ..ModelSpec::preset(preset)?
    };
    spec.validate()?;
    slices_only(&spec)?;
    Ok(spec)
}

/// Writes a (possibly long) report to stdout; a reader that stops early (`| head`) is not an
/// error.
fn write_stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// A dataset's usable slices; what was skipped or looks odd is printed here, on the site's
/// own terminal.
fn load_data(path: &Path, purpose: Purpose, skip_bad_cases: bool) -> anyhow::Result<SliceDataset> {
    let loaded = alveolus_imaging::dataset::load(path, purpose, skip_bad_cases)?;
    print_notes(&loaded.skipped, &loaded.warned);
    Ok(loaded.slices)
}

/// Cases a load left out, and warnings about those it used.
fn print_notes(skipped: &[CaseReport], warned: &[CaseReport]) {
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

/// Agents and `train` learn from slice folders, which only a 2D network can use.
fn slices_only(spec: &ModelSpec) -> Result<()> {
    if spec.spatial_dims() != 2 {
        bail!(
            "the {} network learns from volume patches; training on slice folders needs a 2D model (tiny, small or default)",
            spec.kind
        );
    }
    Ok(())
}

fn print_report(prefix: &str, report: &DiceReport) {
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

/// `--schedule` values.
#[derive(Debug, Clone, Copy)]
struct ScheduleChoice(Schedule);

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

pub fn read_model(path: &Path) -> Result<Weights> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Weights::decode(&bytes).with_context(|| format!("{} is not a model file", path.display()))
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

async fn run_coordinator(kit: &Path, state: Option<&Path>, listen: Option<String>) -> Result<()> {
    let settings = CoordinatorSettings::load(kit, state)?;
    let address = listen.unwrap_or_else(|| settings.listen.clone());
    let listener = tokio::net::TcpListener::bind(&address)
        .await
        .with_context(|| format!("cannot listen on {address}"))?;
    tracing::info!(
        project = %settings.project,
        address = %listener.local_addr()?,
        state = %settings.state_dir.display(),
        "coordinator listening"
    );
    alveolus_coordinator::run(listener, settings, shutdown_signal()).await?;
    Ok(())
}

async fn run_command(command: RunCommand) -> Result<()> {
    match command {
        RunCommand::Start {
            kit,
            rounds,
            min_sites,
            local_epochs,
            lr,
            batch_size,
            deadline,
            seed,
            model,
            classes,
            norm,
            init,
            dp_clip,
            dp_noise,
            dp_delta,
            dp_epsilon_budget,
            aggregation,
            trim_fraction,
            norm_bound,
            secure_aggregation,
            threshold,
        } => {
            let privacy = privacy_config(dp_clip, dp_noise, dp_delta, dp_epsilon_budget);
            let config = RunConfig {
                rounds,
                min_sites,
                deadline_seconds: deadline,
                training: TrainingConfig {
                    local_epochs,
                    learning_rate: lr,
                    batch_size,
                    seed,
                },
                privacy: privacy.clone(),
                aggregation: AggregationConfig {
                    rule: aggregation.rule(trim_fraction),
                    norm_bound,
                },
                secure_aggregation: secure_aggregation.then(|| SecureAggregationConfig {
                    threshold: threshold.unwrap_or(min_sites.max(2)),
                }),
            };
            config.validate()?;
            let weights = match init {
                Some(path) => read_model(&path)?,
                None => alveolus_models::train::initial_weights(
                    &slice_model(&model, classes, norm)?,
                    seed,
                )?,
            };
            let spec = ModelSpec::from_weights(&weights)?;
            slices_only(&spec)?;
            let secure = config.secure_aggregation;
            let info = admin::start_run(&kit, config, &weights).await?;
            println!("started {}", info.run_id);
            println!(
                "  model {} ({} px, base {} channels, depth {}), initial version {}",
                spec.kind, spec.image_size, spec.base_channels, spec.depth, info.initial_version
            );
            println!(
                "  {} rounds, min {} sites, deadline {} s, {} local epochs, lr {}, batch {}, seed {}",
                rounds, min_sites, deadline, local_epochs, lr, batch_size, seed
            );
            if let Some(secure) = secure {
                println!(
                    "  secure aggregation: the coordinator sees only the sum; each round needs {} surviving sites",
                    secure.threshold
                );
            }
            if let Some(p) = privacy {
                let planned = alveolus_privacy::run_epsilon(&p, rounds);
                println!(
                    "  differential privacy: clip {}, noise {}; all {rounds} rounds would spend epsilon {:.4} at delta {}{}",
                    p.clip_norm,
                    p.noise_multiplier,
                    planned,
                    p.delta,
                    p.epsilon_budget
                        .map(|b| format!(" (budget {b})"))
                        .unwrap_or_default()
                );
            }
            Ok(())
        }
        RunCommand::Status { kit, run, json } => admin::run_status(&kit, &run, json).await,
        RunCommand::List { kit } => admin::list_runs(&kit).await,
        RunCommand::Watch { kit, run } => admin::watch(&kit, &run).await,
        RunCommand::Abort { kit, run } => {
            let info = admin::abort(&kit, &run).await?;
            println!("{} is {}", info.run_id, info.state.as_str());
            Ok(())
        }
    }
}

/// The DP settings of `--dp-clip` and `--dp-noise` (clap makes each require the other).
fn privacy_config(
    clip: Option<f64>,
    noise: Option<f64>,
    delta: f64,
    epsilon_budget: Option<f64>,
) -> Option<PrivacyConfig> {
    clip.zip(noise)
        .map(|(clip_norm, noise_multiplier)| PrivacyConfig {
            clip_norm,
            noise_multiplier,
            delta,
            epsilon_budget,
        })
}
