//! The researcher's commands (admin kit): `run start|status|list|watch|abort|report`, over the
//! typed Admin client of `alveolus_proto`.

use std::path::{Path, PathBuf};

use alveolus_agent::site_norms::{SITE_SPECIFIC_METADATA_KEY, SITE_SPECIFIC_NORMALISATION};
use alveolus_models::ModelSpec;
use alveolus_proto::client::AdminClient;
use alveolus_proto::domain::{
    AggregationConfig, AggregationRule, LearningRateSchedule, Precision, PrivacyConfig, RunConfig,
    RunEvent, SecureAggregationConfig, ServerOptimizer, ServerOptimizerKind, TrainingConfig,
};
use alveolus_proto::weights::Weights;
use anyhow::Result;
use clap::{Args, Subcommand};
use futures::StreamExt;

use super::{NetworkArgs, read_model, slices_only};

mod show;

pub(crate) use show::print_run;
use show::{print_site_strategy, round_line, validation_line};

// Parsed once per process: the size of `StartArgs` costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum RunCommand {
    /// Start a run from a fresh model (or `--init FILE`).
    Start(StartArgs),
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
    /// Write a run's report into a folder: report.html (one file, opens without a network)
    /// and PNG plots of loss and Dice per round, overall and per site.
    Report {
        #[arg(long)]
        kit: PathBuf,
        /// Run id; the most recent run by default.
        #[arg(long, default_value = "")]
        run: String,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Args)]
pub struct StartArgs {
    #[arg(long)]
    kit: PathBuf,
    #[command(flatten)]
    run: RunArgs,
}

/// How a run goes: what `run start` sends the coordinator, and what `simulate` runs.
#[derive(Args)]
pub struct RunArgs {
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    #[arg(long, default_value_t = 1)]
    min_sites: u32,
    #[arg(long, default_value_t = 2)]
    local_epochs: u32,
    /// The sites' learning rate (the peak, with a schedule).
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    /// The learning rate over rounds: constant, or half a cosine from --lr down to
    /// --lr-final-fraction of it at the last round (after any warm-up).
    #[arg(long, value_enum, default_value_t = LrSchedule::Constant)]
    lr_schedule: LrSchedule,
    /// Rounds over which the learning rate climbs linearly to --lr first.
    #[arg(long, default_value_t = 0)]
    lr_warmup_rounds: u32,
    /// Where a cosine schedule ends, as a fraction of --lr, in [0, 1].
    #[arg(long, default_value_t = 0.0)]
    lr_final_fraction: f64,
    #[arg(long, default_value_t = 4)]
    batch_size: u32,
    /// Seconds after which a round closes with the sites that reported (at least min-sites).
    #[arg(long, default_value_t = 600)]
    deadline: u32,
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    #[command(flatten)]
    network: NetworkArgs,
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
    /// A server optimizer on each round's aggregate (Reddi et al. 2021): fedavgm (server
    /// momentum), fedadagrad, fedadam or fedyogi; without it the aggregate is the next model.
    #[arg(long, value_enum)]
    server_optimizer: Option<ServerOptimizerChoice>,
    /// The server optimizer's learning rate (default 1 for fedavgm, 0.01 for the others).
    #[arg(long, requires = "server_optimizer")]
    server_lr: Option<f64>,
    /// First-moment decay (fedavgm: the momentum) [default 0.9].
    #[arg(long, requires = "server_optimizer")]
    server_beta1: Option<f64>,
    /// Second-moment decay of fedadam and fedyogi [default 0.99].
    #[arg(long, requires = "server_optimizer")]
    server_beta2: Option<f64>,
    /// Adaptivity τ of the adaptive optimizers [default 0.001].
    #[arg(long, requires = "server_optimizer")]
    server_tau: Option<f64>,
    /// FedProx (Li et al. 2020): sites add μ/2 ||w - w_global||² to their loss, keeping a site
    /// whose patients or scanners differ near the global model; 0 trains as FedAvg. Li et al.
    /// tried 0.001 to 1.
    #[arg(long, default_value_t = 0.0)]
    fedprox_mu: f64,
    /// FedBN (Li et al. 2021): every normalisation layer stays at its site, which trains and
    /// keeps its own (the published model's are the initial ones, and say so).
    #[arg(long)]
    fedbn: bool,
    /// Mixed precision at the sites: f32, or bf16/f16 convolutions (loss, normalisation
    /// statistics, optimizer state and the weights stay f32; f16 scales the loss). A site's
    /// own `--precision` overrides it there.
    #[arg(long, default_value = "f32")]
    precision: Precision,
    /// Do not have the sites measure each round's model on their `validation` cases. By
    /// default they do (only Dice per class and the case count leave a site), and the run
    /// completes once the sites of its last round have reported on its final model.
    #[arg(long)]
    no_site_validation: bool,
    /// At the end, every site also measures each site's last local model (the last round's
    /// model plus that site's update): how one hospital's model does on another's patients.
    /// The local models are kept in the coordinator's registry. Not with secure aggregation,
    /// differential privacy or FedBN.
    #[arg(long, conflicts_with = "no_site_validation")]
    cross_site_evaluation: bool,
    /// Secure aggregation: sites mask their updates so that the coordinator learns only
    /// their sum (FedAvg only; with --dp-clip the sites add the noise).
    #[arg(long)]
    secure_aggregation: bool,
    /// Secure aggregation: sites that must survive each round to its end (and that would
    /// have to collude with the coordinator to unmask one site). Default: --min-sites,
    /// at least 2.
    #[arg(long, requires = "secure_aggregation")]
    threshold: Option<u32>,
}

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
pub enum ServerOptimizerChoice {
    Fedavgm,
    Fedadagrad,
    Fedadam,
    Fedyogi,
}

impl RunArgs {
    /// The run's configuration, checked, and its initial model (fresh, or `--init`; FedBN's
    /// note in its metadata).
    pub(crate) fn config_and_model(&self) -> Result<(RunConfig, Weights)> {
        let config = RunConfig::from(self);
        config.validate()?;
        let mut weights = match &self.init {
            Some(path) => read_model(path)?,
            None => alveolus_models::network::initial_weights(&self.network.spec()?, self.seed)?,
        };
        if config.training.site_normalisation {
            // Carried by every checkpoint of the run (aggregation keeps the base's metadata),
            // so whoever pulls the model reads that its normalisation is no site's.
            weights.metadata.insert(
                SITE_SPECIFIC_METADATA_KEY.to_owned(),
                SITE_SPECIFIC_NORMALISATION.to_owned(),
            );
        }
        slices_only(&ModelSpec::from_weights(&weights)?)?;
        Ok((config, weights))
    }

    fn server_optimizer(&self) -> Option<ServerOptimizer> {
        let kind = match self.server_optimizer? {
            ServerOptimizerChoice::Fedavgm => ServerOptimizerKind::FedAvgM,
            ServerOptimizerChoice::Fedadagrad => ServerOptimizerKind::FedAdagrad,
            ServerOptimizerChoice::Fedadam => ServerOptimizerKind::FedAdam,
            ServerOptimizerChoice::Fedyogi => ServerOptimizerKind::FedYogi,
        };
        let defaults = ServerOptimizer::with_defaults(kind);
        Some(ServerOptimizer {
            kind,
            learning_rate: self.server_lr.unwrap_or(defaults.learning_rate),
            beta1: self.server_beta1.unwrap_or(defaults.beta1),
            beta2: self.server_beta2.unwrap_or(defaults.beta2),
            tau: self.server_tau.unwrap_or(defaults.tau),
        })
    }
}

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
pub enum LrSchedule {
    Constant,
    Cosine,
}

impl From<&RunArgs> for RunConfig {
    fn from(a: &RunArgs) -> Self {
        RunConfig {
            rounds: a.rounds,
            min_sites: a.min_sites,
            deadline_seconds: a.deadline,
            training: TrainingConfig {
                local_epochs: a.local_epochs,
                learning_rate: a.lr,
                batch_size: a.batch_size,
                seed: a.seed,
                proximal_mu: a.fedprox_mu,
                site_normalisation: a.fedbn,
                precision: a.precision,
            },
            privacy: privacy_config(a.dp_clip, a.dp_noise, a.dp_delta, a.dp_epsilon_budget),
            aggregation: AggregationConfig {
                rule: a.aggregation.rule(a.trim_fraction),
                norm_bound: a.norm_bound,
            },
            secure_aggregation: a.secure_aggregation.then(|| SecureAggregationConfig {
                threshold: a.threshold.unwrap_or(a.min_sites.max(2)),
            }),
            schedule: (a.lr_schedule == LrSchedule::Cosine || a.lr_warmup_rounds > 0).then_some(
                LearningRateSchedule {
                    warmup_rounds: a.lr_warmup_rounds,
                    cosine: a.lr_schedule == LrSchedule::Cosine,
                    final_fraction: a.lr_final_fraction,
                },
            ),
            server_optimizer: a.server_optimizer(),
            validate_at_sites: !a.no_site_validation,
            cross_site_evaluation: a.cross_site_evaluation,
        }
    }
}

/// The DP settings of `--dp-clip` and `--dp-noise` (clap makes each require the other).
pub fn privacy_config(
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

#[derive(Clone, Copy, Debug)]
pub enum AggregationChoice {
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

pub async fn run_command(command: RunCommand) -> Result<()> {
    match command {
        RunCommand::Start(args) => start(args).await,
        RunCommand::Status { kit, run, json } => {
            let info = AdminClient::connect(&kit).await?.run(&run).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                print_run(&info);
            }
            Ok(())
        }
        RunCommand::List { kit } => {
            let runs = AdminClient::connect(&kit).await?.runs().await?;
            if runs.is_empty() {
                println!("no runs yet");
            }
            for run in runs {
                println!(
                    "{:<20} {:<10} {:>3}/{:<3} rounds  latest {}",
                    run.run_id,
                    run.state.as_str(),
                    run.rounds.len(),
                    run.config.rounds,
                    &run.latest_version()[..12]
                );
            }
            Ok(())
        }
        RunCommand::Watch { kit, run } => watch(&kit, &run).await,
        RunCommand::Report { kit, run, out } => {
            let (info, report) = alveolus_dashboard::write_report(&kit, &run, &out).await?;
            println!(
                "report on run {} ({} of {} rounds, {}) written to {}",
                info.run_id,
                info.rounds.len(),
                info.config.rounds,
                info.state.as_str(),
                report.html.display()
            );
            for plot in &report.plots {
                println!("  plot {}", plot.display());
            }
            Ok(())
        }
        RunCommand::Abort { kit, run } => {
            let info = AdminClient::connect(&kit).await?.abort(&run).await?;
            println!("{} is {}", info.run_id, info.state.as_str());
            Ok(())
        }
    }
}

async fn start(args: StartArgs) -> Result<()> {
    let (config, weights) = args.run.config_and_model()?;
    let spec = ModelSpec::from_weights(&weights)?;
    let (secure, privacy, schedule, optimizer, sites_config) = (
        config.secure_aggregation,
        config.privacy.clone(),
        config.schedule,
        config.server_optimizer,
        config.clone(),
    );
    let mut client = AdminClient::connect(&args.kit).await?;
    let info = client.start_run(config, weights.encode()).await?;
    println!("started {}", info.run_id);
    println!(
        "  model {} ({} px, base {} channels, depth {}), initial version {}",
        spec.kind, spec.image_size, spec.base_channels, spec.depth, info.initial_version
    );
    println!(
        "  {} rounds, min {} sites, deadline {} s, {} local epochs, lr {}, batch {}, seed {}",
        args.run.rounds,
        args.run.min_sites,
        args.run.deadline,
        args.run.local_epochs,
        args.run.lr,
        args.run.batch_size,
        args.run.seed
    );
    if let Some(schedule) = schedule {
        println!("  learning rate: {schedule}");
    }
    if let Some(optimizer) = optimizer {
        println!("  server optimizer: {optimizer}");
    }
    print_site_strategy(&sites_config);
    if let Some(secure) = secure {
        println!(
            "  secure aggregation: the coordinator sees only the sum; each round needs {} surviving sites",
            secure.threshold
        );
    }
    if let Some(p) = privacy {
        let rounds = args.run.rounds;
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

async fn watch(kit: &Path, run: &str) -> Result<()> {
    let mut client = AdminClient::connect(kit).await?;
    let mut events = std::pin::pin!(client.events(run).await?);
    while let Some(event) = events.next().await {
        match event? {
            RunEvent::RoundStarted {
                round,
                model_version,
            } => {
                println!("round {round} started from model {}", &model_version[..12]);
            }
            RunEvent::UpdateAccepted { round, site } => {
                println!("round {round}: update from {site}")
            }
            RunEvent::RoundFinished(r) => {
                println!("round {} finished: {}", r.round, round_line(&r, ", "))
            }
            RunEvent::SiteValidated {
                round,
                validation,
                model_of: None,
            } => {
                println!(
                    "round {round}'s model validated at {}",
                    validation_line(&validation)
                );
            }
            RunEvent::SiteValidated {
                validation,
                model_of: Some(owner),
                ..
            } => {
                println!(
                    "{owner}'s local model validated at {}",
                    validation_line(&validation)
                );
            }
            RunEvent::RunFinished(info) => {
                println!("run {} {}", info.run_id, info.state.as_str());
            }
        }
    }
    Ok(())
}
