//! The researcher's and site's commands, run as a user would: the real binary against a real
//! coordinator and agent.

mod common;

use std::process::Command;

use alveolus_proto::sha256_hex;
use alveolus_proto::weights::Weights;
use common::*;

fn run_ok(args: &[&str]) -> String {
    let output = Command::new(BIN).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "alveolus {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread")]
async fn start_watch_status_list_pull_and_abort_from_the_command_line() {
    let project = project(&["alpha"]);
    let _coordinator = start_coordinator(&project).await;
    // Two training slices, and two validation cases on which the site measures each round's
    // model (the default).
    let data = site_dataset(&project, "alpha", 0, 2, 2);
    let site_models = project.path("alpha-models");
    let _agent = spawn_agent_with(
        &project,
        "alpha",
        &data,
        &["--site-models", site_models.to_str().unwrap()],
    );
    let admin = project.admin_kit();
    let admin = admin.to_str().unwrap();
    let site = project.site_kit("alpha");
    let init = project.path("init.safetensors");
    std::fs::write(&init, tiny_model(4).encode()).unwrap();

    let started = tokio::task::spawn_blocking({
        let (admin, init) = (admin.to_string(), init.clone());
        move || {
            run_ok(&[
                "run",
                "start",
                "--kit",
                &admin,
                "--rounds",
                "2",
                "--local-epochs",
                "1",
                "--lr-warmup-rounds",
                "1",
                "--lr-schedule",
                "cosine",
                "--lr-final-fraction",
                "0.1",
                "--server-optimizer",
                "fedadam",
                "--fedprox-mu",
                "0.01",
                "--fedbn",
                "--precision",
                "bf16",
                "--init",
                init.to_str().unwrap(),
            ])
        }
    })
    .await
    .unwrap();
    assert!(started.contains("started run-"), "{started}");
    assert!(started.contains("2 rounds, min 1 sites"), "{started}");
    assert!(
        started.contains(
            "learning rate: warm-up over 1 rounds, then a cosine down to 10 % of the peak"
        ),
        "{started}"
    );
    assert!(
        started.contains(
            "server optimizer: fedadam (server lr 0.01, beta1 0.9, beta2 0.99, tau 0.001)"
        ),
        "{started}"
    );

    assert!(
        started.contains("FedProx at the sites, mu 0.01"),
        "{started}"
    );
    assert!(
        started.contains("FedBN: normalisation layers stay at the sites"),
        "{started}"
    );
    assert!(
        started.contains("mixed precision at the sites: bf16 convolutions"),
        "{started}"
    );

    // `watch` follows the run live and returns when it ends.
    let admin_owned = admin.to_string();
    let watched =
        tokio::task::spawn_blocking(move || run_ok(&["run", "watch", "--kit", &admin_owned]))
            .await
            .unwrap();
    assert!(watched.contains("round 1 started"), "{watched}");
    assert!(watched.contains("round 1: update from alpha"), "{watched}");
    assert!(
        watched.contains("round 2 finished: 1 sites, 2 samples"),
        "{watched}"
    );
    assert!(watched.trim_end().ends_with("completed"), "{watched}");
    for round in [1, 2] {
        assert!(
            watched.contains(&format!(
                "round {round}'s model validated at alpha: infection "
            )),
            "{watched}"
        );
    }
    assert!(watched.contains("(2 cases)"), "{watched}");

    let status = run_ok(&["run", "status", "--kit", admin, "--json"]);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["state"], "completed");
    assert_eq!(status["config"]["schedule"]["warmup_rounds"], 1);
    assert_eq!(status["config"]["schedule"]["cosine"], true);
    assert_eq!(status["config"]["server_optimizer"]["kind"], "fedadam");
    assert_eq!(status["config"]["training"]["proximal_mu"], 0.01);
    assert_eq!(status["config"]["training"]["site_normalisation"], true);
    // The site trained both rounds in bf16 (the run's task carried it) and reported as usual.
    assert_eq!(status["config"]["training"]["precision"], "bf16");
    assert_eq!(status["config"]["validate_at_sites"], true);
    // Each round's model, the final one included, as measured at the site: Dice per class on
    // its own validation cases, and how many.
    for round in status["rounds"].as_array().unwrap() {
        let validation = round["validation"].as_array().unwrap();
        assert_eq!(validation.len(), 1, "{round}");
        let alpha = &validation[0];
        assert_eq!(alpha["site"], "alpha");
        assert_eq!(alpha["cases"], 2);
        let classes: Vec<&str> = alpha["classes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["class"].as_str().unwrap())
            .collect();
        assert_eq!(classes, ["ggo", "consolidation"], "{alpha}");
        for dice in alpha["classes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| &c["dice"])
            .chain([&alpha["infection_dice"]])
        {
            assert!(
                dice.is_null() || (0.0..=1.0).contains(&dice.as_f64().unwrap()),
                "{alpha}"
            );
        }
    }
    let text = run_ok(&["run", "status", "--kit", admin]);
    assert!(text.contains("sites measure each round's model"), "{text}");
    assert!(text.contains("validated at alpha: infection"), "{text}");
    // A schedule that cannot work is refused before anything starts.
    let refused = Command::new(BIN)
        .args([
            "run",
            "start",
            "--kit",
            admin,
            "--rounds",
            "2",
            "--lr-warmup-rounds",
            "3",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{text}");
    assert!(text.contains("3 warm-up rounds in a run of 2"), "{text}");
    for (args, expected) in [
        (
            &["--server-optimizer", "fedyogi", "--server-beta1", "1"][..],
            "server_optimizer.beta1",
        ),
        (
            &["--server-optimizer", "fedavgm", "--server-lr=-1"],
            "learning_rate",
        ),
        (&["--server-optimizer", "adamw"], "adamw"),
        (&["--server-tau", "0.1"], "--server-optimizer"),
        (
            &["--fedprox-mu=-0.1"],
            "`proximal_mu`: -0.1 is not in [0, 100]",
        ),
        (&["--fedprox-mu", "NaN"], "proximal_mu"),
        (
            &["--precision", "fp8"],
            "`fp8` is not a precision: use f32, bf16 or f16",
        ),
    ] {
        let refused = Command::new(BIN)
            .args(["run", "start", "--kit", admin])
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&refused.stderr);
        assert!(
            !refused.status.success() && text.contains(expected),
            "{args:?}: {text}"
        );
    }
    let rounds = status["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2);
    let run_id = status["run_id"].as_str().unwrap();
    assert!(run_ok(&["run", "list", "--kit", admin]).contains(run_id));
    let sites = run_ok(&["sites", "list", "--kit", admin]);
    assert!(
        sites.contains("alpha") && sites.contains(&format!("{run_id}: rounds 1-2")),
        "{sites}"
    );

    // A site pulls the latest model, an admin a given version; both are digest-checked.
    let latest = rounds[1]["version"].as_str().unwrap();
    let pulled = project.path("latest.safetensors");
    run_ok(&[
        "model",
        "pull",
        "--kit",
        site.to_str().unwrap(),
        "--out",
        pulled.to_str().unwrap(),
    ]);
    assert_eq!(sha256_hex(&std::fs::read(&pulled).unwrap()), latest);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(pulled.with_extension("json")).unwrap()).unwrap();
    assert_eq!(manifest["round"], 2);
    // Beside the sealed manifest, what the site has measured of the model since, as the run's
    // record has it.
    assert_eq!(
        manifest["validation"], rounds[1]["validation"],
        "{manifest}"
    );
    assert_eq!(manifest["validation"][0]["cases"], 2, "{manifest}");
    // The manifest says how the model was made.
    let strategy = &manifest["strategy"];
    assert_eq!(
        strategy["server_optimizer"]["kind"], "fedadam",
        "{manifest}"
    );
    assert_eq!(strategy["schedule"]["cosine"], true, "{manifest}");
    assert_eq!(strategy["proximal_mu"], 0.01, "{manifest}");
    assert_eq!(strategy["site_normalisation"], true, "{manifest}");

    // FedBN: the published model's normalisation layers are the initial ones, and it says so;
    // the rest trained (through FedAdam and FedProx too). The site sent zeros for its norms and
    // put its own back in for round 2.
    let initial = tiny_model(4);
    let global = Weights::decode(&std::fs::read(&pulled).unwrap()).unwrap();
    assert!(
        global.metadata["alveolus.site_specific"].contains("FedBN"),
        "{:?}",
        global.metadata
    );
    let is_norm = |name: &str| name.split('.').any(|p| p.starts_with("norm"));
    let mut trained = 0;
    for (name, tensor) in &global.tensors {
        if is_norm(name) {
            assert_eq!(tensor, &initial.tensors[name], "{name} was aggregated");
        } else if tensor != &initial.tensors[name] {
            trained += 1;
        }
    }
    assert!(trained > 0, "nothing but norms left the sites");
    for round in [1, 2] {
        let sent = project.path(&format!("audit-alpha/{run_id}-round{round:04}.safetensors"));
        let sent = Weights::decode(&std::fs::read(&sent).unwrap()).unwrap();
        for (name, tensor) in sent.tensors.iter().filter(|(n, _)| is_norm(n)) {
            assert!(
                tensor.values.iter().all(|v| *v == 0.0),
                "round {round} sent {name}"
            );
        }
    }
    // The site's own model of each round: the global model with the normalisation layers the
    // site trained, which `evaluate` reads like any model.
    for round in [1, 2] {
        let own = site_models.join(format!("{run_id}-round{round:04}.safetensors"));
        let own = std::fs::read(&own).unwrap_or_else(|e| panic!("{}: {e}", own.display()));
        let own = Weights::decode(&own).unwrap();
        assert!(
            own.metadata["alveolus.site_specific"].contains("of site alpha"),
            "{:?}",
            own.metadata
        );
        let published = rounds[round - 1]["version"].as_str().unwrap();
        let path = project.path(&format!("published{round}.safetensors"));
        run_ok(&[
            "model",
            "pull",
            "--kit",
            admin,
            "--version",
            published,
            "--out",
            path.to_str().unwrap(),
        ]);
        let published = Weights::decode(&std::fs::read(&path).unwrap()).unwrap();
        let mut own_norms = 0;
        for (name, tensor) in &own.tensors {
            if !is_norm(name) {
                assert_eq!(tensor, &published.tensors[name], "{name}");
            } else if tensor != &published.tensors[name] {
                own_norms += 1;
            }
        }
        assert!(
            own_norms > 0,
            "round {round}: the site's norms are not in its model"
        );
    }
    let own = site_models.join(format!("{run_id}-round0002.safetensors"));
    let measured = run_ok(&[
        "evaluate",
        "--model",
        own.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--json",
    ]);
    assert!(measured.contains("\"infection\""), "{measured}");
    assert!(
        std::fs::read_dir(&site_models).unwrap().count() == 2,
        "one file a round and nothing half-written"
    );
    let log = std::fs::read_to_string(project.path("alpha.log")).unwrap();
    assert!(
        log.lines().any(|l| l.contains("round=2")
            && l.contains("normalisation layers in place")
            && !l.contains("tensors=0")),
        "{log}"
    );
    let first = rounds[0]["version"].as_str().unwrap();
    let pulled = project.path("first.safetensors");
    run_ok(&[
        "model",
        "pull",
        "--kit",
        admin,
        "--version",
        first,
        "--out",
        pulled.to_str().unwrap(),
    ]);
    assert_eq!(sha256_hex(&std::fs::read(&pulled).unwrap()), first);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(pulled.with_extension("json")).unwrap()).unwrap();
    assert_eq!(
        manifest["validation"], rounds[0]["validation"],
        "{manifest}"
    );
    // On a terminal (util-linux `script` gives it one), the download draws a progress bar that
    // ends at the whole model.
    let on_terminal = project.path("terminal.safetensors");
    let typed = Command::new("script")
        .args([
            "-qec",
            &format!(
                "{BIN} model pull --kit {admin} --out {}",
                on_terminal.display()
            ),
            "/dev/null",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let screen = String::from_utf8_lossy(&typed.stdout);
    assert!(typed.status.success(), "{screen}");
    assert!(
        screen.contains("model [####################]") && screen.contains("100%"),
        "{screen}"
    );
    assert_eq!(sha256_hex(&std::fs::read(&on_terminal).unwrap()), latest);

    // A long run can be aborted.
    run_ok(&[
        "run", "start", "--kit", admin, "--rounds", "1000", "--model", "tiny",
    ]);
    let aborted = run_ok(&["run", "abort", "--kit", admin]);
    assert!(aborted.trim_end().ends_with("is aborted"), "{aborted}");
    let status = run_ok(&["run", "status", "--kit", admin]);
    assert!(status.contains("aborted"), "{status}");
}
