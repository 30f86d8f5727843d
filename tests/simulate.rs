//! `alveolus simulate` against a real run: the same sites, seed and strategy through the real
//! binary, a real coordinator and real agent processes give the model the simulation gives.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use alveolus_proto::domain::{RunInfo, RunState};
use alveolus_proto::weights::Weights;
use common::*;

fn alveolus(args: &[&str]) -> (bool, String) {
    let output = Command::new(BIN).args(args).output().unwrap();
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

/// The flags both runs share: two rounds of FedProx from the same initial model, then every
/// site measuring every site's local model.
fn strategy(init: &Path) -> Vec<String> {
    [
        "--rounds",
        "2",
        "--local-epochs",
        "1",
        "--batch-size",
        "2",
        "--seed",
        "5",
        "--fedprox-mu",
        "0.01",
        "--cross-site-evaluation",
        "--init",
        init.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec()
}

fn simulate(sites: &[(&str, &Path)], init: &Path, out: &Path) -> RunInfo {
    let mut args: Vec<String> = vec!["simulate".into(), "--out".into(), out.display().to_string()];
    for (name, data) in sites {
        args.extend(["--site".into(), format!("{name}={}", data.display())]);
    }
    args.extend(strategy(init));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, text) = alveolus(&args);
    assert!(ok, "{text}");
    assert!(text.contains("validated at alpha: infection"), "{text}");
    assert!(text.contains("beta's local model"), "{text}");
    serde_json::from_slice(&std::fs::read(out.join("run.json")).unwrap()).unwrap()
}

/// Largest difference between two models' values, the layouts being the same.
fn largest_difference(a: &Weights, b: &Weights) -> f32 {
    a.check_same_layout(b).unwrap();
    a.tensors
        .iter()
        .flat_map(|(name, t)| {
            t.values
                .iter()
                .zip(&b.tensors[name].values)
                .map(|(x, y)| (x - y).abs())
        })
        .fold(0.0, f32::max)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_simulation_gives_the_model_a_real_run_gives_and_repeats_itself() {
    let project = project(&["alpha", "beta"]);
    let alpha = site_dataset(&project, "alpha", 0, 3, 2);
    let beta = site_data(&project, "beta", 1, 3);
    let init = project.path("init.safetensors");
    std::fs::write(&init, tiny_model(8).encode()).unwrap();

    // The real run: two agent processes over mTLS.
    let _coordinator = start_coordinator(&project).await;
    let _agents = [("alpha", &alpha), ("beta", &beta)].map(|(s, d)| spawn_agent(&project, s, d));
    let mut admin_client = admin(&project).await;
    wait_for_sites(&mut admin_client, &["alpha", "beta"]).await;
    let admin_kit = project.admin_kit();
    let mut start = vec![
        "run".to_string(),
        "start".into(),
        "--kit".into(),
        admin_kit.display().to_string(),
        "--min-sites".into(),
        "2".into(),
    ];
    start.extend(strategy(&init));
    let (ok, text) = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = start.iter().map(String::as_str).collect();
        alveolus(&args)
    })
    .await
    .unwrap();
    assert!(ok, "{text}");
    let run_id = text
        .lines()
        .find_map(|l| l.strip_prefix("started "))
        .unwrap()
        .to_string();
    let real = wait_for(&mut admin_client, &run_id, Duration::from_secs(300), |r| {
        r.state != RunState::Running
    })
    .await;
    assert_eq!(real.state, RunState::Completed);
    let pulled = project.path("real.safetensors");
    let (ok, text) = alveolus(&[
        "model",
        "pull",
        "--kit",
        admin_kit.to_str().unwrap(),
        "--version",
        real.latest_version(),
        "--out",
        pulled.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    let real_model = Weights::decode(&std::fs::read(&pulled).unwrap()).unwrap();

    // The simulation: the same sites in one process, twice.
    let sites = [("alpha", alpha.as_path()), ("beta", beta.as_path())];
    let first = simulate(&sites, &init, &project.path("sim-1"));
    let second = simulate(&sites, &init, &project.path("sim-2"));
    assert_eq!(first.state, RunState::Completed);
    assert_eq!(first.rounds.len(), 2);
    let model = |dir: &str| {
        let path = project.path(dir).join("final-model.safetensors");
        Weights::decode(&std::fs::read(path).unwrap()).unwrap()
    };
    let simulated = model("sim-1");
    assert_eq!(
        simulated.encode(),
        model("sim-2").encode(),
        "the same seed gives the same model"
    );
    assert_eq!(
        first.rounds.last().unwrap().version,
        second.rounds.last().unwrap().version
    );
    let difference = largest_difference(&simulated, &real_model);
    assert!(
        difference < 1e-4,
        "the simulated model is {difference} from the real run's"
    );
    // The same figures in the same record: samples and losses per round, and alpha's
    // validation of each round's model.
    for (sim, real) in first.rounds.iter().zip(&real.rounds) {
        assert_eq!(sim.samples, real.samples);
        assert!((sim.loss - real.loss).abs() < 1e-3, "{sim:?} {real:?}");
        let infection = |r: &alveolus_proto::domain::RoundSummary| {
            r.validation
                .iter()
                .find(|v| v.site == "alpha")
                .map(|v| (v.validation.cases, v.validation.infection_dice))
                .unwrap()
        };
        let (sim_cases, sim_dice) = infection(sim);
        let (real_cases, real_dice) = infection(real);
        assert_eq!((sim_cases, real_cases), (2, 2));
        assert!(
            (sim_dice.unwrap_or(0.0) - real_dice.unwrap_or(0.0)).abs() < 0.01,
            "{sim_dice:?} {real_dice:?}"
        );
    }
    // Cross-site evaluation, through the real agents and in the simulation alike: alpha
    // measured both sites' local models on its two cases; beta, without validation cases,
    // said so for each.
    for record in [&first, &real] {
        let matrix: Vec<(&str, &str, u32)> = record
            .cross_site
            .iter()
            .map(|c| {
                (
                    c.model_of.as_str(),
                    c.validation.site.as_str(),
                    c.validation.validation.cases,
                )
            })
            .collect();
        for expected in [
            ("alpha", "alpha", 2),
            ("beta", "alpha", 2),
            ("alpha", "beta", 0),
            ("beta", "beta", 0),
        ] {
            assert!(matrix.contains(&expected), "{matrix:?}");
        }
        assert_eq!(matrix.len(), 4, "{matrix:?}");
    }
    let dice_of = |record: &RunInfo, owner: &str| {
        record
            .cross_site
            .iter()
            .find(|c| c.model_of == owner && c.validation.site == "alpha")
            .and_then(|c| c.validation.validation.infection_dice)
            .unwrap_or(0.0)
    };
    for owner in ["alpha", "beta"] {
        assert!(
            (dice_of(&first, owner) - dice_of(&real, owner)).abs() < 0.01,
            "{owner}'s local model"
        );
    }
}

#[test]
fn what_cannot_be_simulated_is_refused_before_anything_runs() {
    let project = project(&["alpha"]);
    let data = site_data(&project, "alpha", 0, 2);
    let empty = project.path("empty");
    std::fs::create_dir_all(empty.join("images")).unwrap();
    std::fs::create_dir_all(empty.join("masks")).unwrap();
    let used = project.path("used");
    std::fs::create_dir_all(&used).unwrap();
    std::fs::write(used.join("keep.txt"), "earlier results").unwrap();
    let site = format!("a={}", data.display());
    let out = project.path("out");
    let out = out.to_str().unwrap();
    for (args, expected) in [
        (
            vec![
                "--site",
                site.as_str(),
                "--site",
                site.as_str(),
                "--out",
                out,
            ],
            "two sites are named `a`",
        ),
        (
            vec!["--site", site.as_str(), "--out", used.to_str().unwrap()],
            "is not empty",
        ),
        (
            vec![
                "--site",
                site.as_str(),
                "--out",
                out,
                "--min-sites",
                "2",
                "--secure-aggregation",
            ],
            "leave out --secure-aggregation",
        ),
        (
            vec!["--site", &format!("b={}", empty.display()), "--out", out],
            "site b",
        ),
        (
            vec!["--site", site.as_str(), "--out", out, "--fedprox-mu=-1"],
            "proximal_mu",
        ),
        (vec!["--site", "a b=/x", "--out", out], "must be letters"),
        (
            vec![
                "--data",
                data.to_str().unwrap(),
                "--split-sites",
                "3",
                "--out",
                out,
            ],
            "2 slices cannot be split between 3 sites",
        ),
        (
            vec![
                "--data",
                data.to_str().unwrap(),
                "--split-sites",
                "2",
                "--split",
                "dirichlet",
                "--alpha",
                "0",
                "--out",
                out,
            ],
            "--alpha 0 is not a positive number",
        ),
    ] {
        let mut all = vec!["simulate"];
        all.extend(args.iter().copied());
        let (ok, text) = alveolus(&all);
        assert!(!ok && text.contains(expected), "{all:?}: {text}");
        assert!(!Path::new(out).exists(), "{all:?} wrote {out}");
    }
    assert_eq!(
        std::fs::read_to_string(used.join("keep.txt")).unwrap(),
        "earlier results"
    );
}

/// One dataset split between sites: every training slice trains at exactly one site.
#[test]
fn one_dataset_split_between_sites_trains_each_slice_at_one_site() {
    let project = project(&["alpha"]);
    let data = site_data(&project, "all", 0, 6);
    let init = project.path("init.safetensors");
    std::fs::write(&init, tiny_model(2).encode()).unwrap();
    let out = project.path("split");
    let (ok, text) = alveolus(&[
        "simulate",
        "--data",
        data.to_str().unwrap(),
        "--split-sites",
        "3",
        "--split",
        "blocks",
        "--out",
        out.to_str().unwrap(),
        "--rounds",
        "1",
        "--local-epochs",
        "1",
        "--init",
        init.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    let record: RunInfo =
        serde_json::from_slice(&std::fs::read(out.join("run.json")).unwrap()).unwrap();
    let round = &record.rounds[0];
    assert_eq!(round.sites, ["site-1", "site-2", "site-3"]);
    let samples: Vec<u64> = round.site_reports.iter().map(|r| r.samples).collect();
    assert_eq!(samples, [2, 2, 2], "{round:?}");
}
