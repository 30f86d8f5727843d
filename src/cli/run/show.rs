//! How `run start`, `run status` and `run watch` print a run for a researcher: one place for
//! the wording, so that the three say a round, a validation and a strategy alike.

use std::collections::BTreeMap;

use alveolus_proto::domain::{
    Precision, RoundSummary, RunConfig, RunInfo, RunState, SiteReport, SiteValidation,
};

/// The whole of a run as `run status` prints it.
pub(crate) fn print_run(info: &RunInfo) {
    println!("run {}  {}", info.run_id, info.state.as_str());
    println!(
        "  {} of {} rounds finished; min {} sites; deadline {} s; {} local epochs; lr {}",
        info.rounds.len(),
        info.config.rounds,
        info.config.min_sites,
        info.config.deadline_seconds,
        info.config.training.local_epochs,
        info.config.training.learning_rate
    );
    if let Some(schedule) = &info.config.schedule {
        let next = (info.rounds.len() as u32 + 1).min(info.config.rounds);
        println!(
            "  learning rate: {schedule}; round {next} trains at {:.3e}",
            info.config.learning_rate(next)
        );
    }
    if let Some(optimizer) = &info.config.server_optimizer {
        println!("  server optimizer: {optimizer}");
    }
    print_site_strategy(&info.config);
    if let Some(p) = &info.config.privacy {
        println!(
            "  differential privacy: clip {}, noise multiplier {}, delta {}{}; epsilon spent {:.4}",
            p.clip_norm,
            p.noise_multiplier,
            p.delta,
            p.epsilon_budget
                .map(|b| format!(", budget {b}"))
                .unwrap_or_default(),
            info.rounds.last().and_then(|r| r.epsilon).unwrap_or(0.0)
        );
    }
    if let Some(secure) = &info.config.secure_aggregation {
        println!(
            "  secure aggregation: the coordinator sees only sums; threshold {} sites",
            secure.threshold
        );
    }
    for r in &info.rounds {
        println!("  round {:>3}  {}", r.round, round_line(r, "  "));
        for v in &r.validation {
            println!("             validated at {}", validation_line(v));
        }
    }
    print_sites(info);
    print_cross_site(info);
    if let Some(held_up) = &info.held_up {
        println!("  held up: {held_up}");
    }
    if let Some(reason) = &info.stop_reason {
        let how = if info.state == RunState::Failed {
            "failed"
        } else {
            "stopped early"
        };
        println!("  {how}: {reason}");
    }
    if !info.reported.is_empty() {
        println!("  reported this round: {}", info.reported.join(", "));
    }
    println!("  latest model {}", info.latest_version());
}

/// Each site's figures from the last round it contributed to: the slowest site stands out.
fn print_sites(info: &RunInfo) {
    let mut last: BTreeMap<&str, (u32, &SiteReport)> = Default::default();
    for r in &info.rounds {
        for s in &r.site_reports {
            last.insert(&s.site, (r.round, s));
        }
    }
    if last.is_empty() {
        return;
    }
    println!("  sites, as of the last round each contributed to:");
    for (site, (round, s)) in last {
        println!(
            "    {site:<16} round {round:>3}  loss {:.4}  train dice {:.3}  {:>6} samples  training {}",
            s.loss,
            s.dice,
            s.samples,
            s.train_seconds
                .map(|t| format!("{t:.1} s"))
                .unwrap_or_else(|| "not reported".into()),
        );
    }
}

/// A finished round's numbers, `separator` between them.
pub(super) fn round_line(r: &RoundSummary, separator: &str) -> String {
    let mut parts = vec![
        format!("{} sites", r.sites.len()),
        format!("{} samples", r.samples),
        format!("loss {:.4}", r.loss),
        format!("train dice {:.3}", r.dice),
        format!("model {}", &r.version[..12]),
    ];
    parts.extend(r.epsilon.map(|e| format!("epsilon {e:.4}")));
    parts.join(separator)
}

/// Cross-site evaluation: infection Dice of each site's local model (rows) at each site
/// (columns), and of the final global model.
fn print_cross_site(info: &RunInfo) {
    if info.local_models.is_empty() {
        return;
    }
    let mut at: Vec<&str> = info
        .cross_site
        .iter()
        .map(|c| c.validation.site.as_str())
        .collect();
    at.sort_unstable();
    at.dedup();
    let dice = |v: Option<&SiteValidation>| match v {
        Some(v) if v.validation.cases == 0 => "no cases".to_string(),
        Some(v) => v
            .validation
            .infection_dice
            .map_or_else(|| "-".into(), |d| format!("{d:.3}")),
        None => "".into(),
    };
    println!("  cross-site evaluation, infection Dice (model, then each site it was measured at):");
    println!(
        "    {:<24}{}",
        "",
        at.iter().map(|s| format!("{s:>12}")).collect::<String>()
    );
    let row = |name: &str, cells: Vec<Option<&SiteValidation>>| {
        let cells: String = cells
            .into_iter()
            .map(|c| format!("{:>12}", dice(c)))
            .collect();
        println!("    {name:<24}{cells}");
    };
    let final_round = info.rounds.last();
    row(
        "global (final)",
        at.iter()
            .map(|site| final_round.and_then(|r| r.validation.iter().find(|v| v.site == *site)))
            .collect(),
    );
    for local in &info.local_models {
        let cells = at
            .iter()
            .map(|site| {
                info.cross_site
                    .iter()
                    .find(|c| c.model_version == local.version && c.validation.site == *site)
                    .map(|c| &c.validation)
            })
            .collect();
        row(&format!("{}'s local model", local.site), cells);
    }
}

/// A site's validation of a round's model: the site, infection and per-class Dice, and how
/// many cases they rest on.
pub(super) fn validation_line(v: &SiteValidation) -> String {
    let dice = |d: Option<f64>| d.map_or_else(|| "-".to_string(), |d| format!("{d:.3}"));
    let figures = &v.validation;
    if figures.cases == 0 {
        return format!("{}: no validation cases", v.site);
    }
    let mut parts = vec![format!(
        "{}: infection {}",
        v.site,
        dice(figures.infection_dice)
    )];
    parts.extend(
        figures
            .classes
            .iter()
            .map(|c| format!("{} {}", c.class, dice(c.dice))),
    );
    parts.push(format!("({} cases)", figures.cases));
    parts.join("  ")
}

/// What the sites do beyond plain local training (FedProx, FedBN, validation), as `run
/// start` and `run status` say it.
pub(super) fn print_site_strategy(config: &RunConfig) {
    let training = &config.training;
    if config.validate_at_sites {
        println!("  sites measure each round's model on their validation cases");
    }
    if config.cross_site_evaluation {
        println!("  cross-site evaluation: every site measures every site's last local model");
    }
    if training.proximal_mu > 0.0 {
        println!("  FedProx at the sites, mu {}", training.proximal_mu);
    }
    if training.site_normalisation {
        println!("  FedBN: normalisation layers stay at the sites");
    }
    if training.precision != Precision::F32 {
        println!(
            "  mixed precision at the sites: {} convolutions",
            training.precision
        );
    }
}
