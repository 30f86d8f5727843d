//! The binary's own checks: bad flags and bad files give clear errors and a non-zero exit.

mod common;

use std::process::Command;

use alveolus_models::Weights;
use common::*;

fn alveolus(args: &[&str]) -> (bool, String) {
    let (ok, stdout, stderr) = alveolus_split(args);
    (ok, format!("{stdout}{stderr}"))
}

fn alveolus_split(args: &[&str]) -> (bool, String, String) {
    let output = Command::new(BIN).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status.success(), stdout, stderr)
}

#[test]
fn provision_refuses_bad_names_addresses_and_existing_projects() {
    let project = project(&["alpha"]);
    let out = project.path("again");
    let out = out.to_str().unwrap();
    let (ok, text) = alveolus(&[
        "provision",
        "--project",
        "p",
        "--coordinator",
        "host:7443",
        "--site",
        "a/b",
        "--admin",
        "x",
        "--out",
        out,
    ]);
    assert!(!ok && text.contains("`a/b` is not a valid name"), "{text}");
    let (ok, text) = alveolus(&[
        "provision",
        "--project",
        "p",
        "--coordinator",
        "no-port",
        "--site",
        "a",
        "--admin",
        "x",
        "--out",
        out,
    ]);
    assert!(!ok && text.contains("not HOST:PORT"), "{text}");
    let (ok, text) = alveolus(&[
        "provision",
        "--project",
        "p",
        "--coordinator",
        "h:1",
        "--site",
        "a",
        "a",
        "--admin",
        "x",
        "--out",
        out,
    ]);
    assert!(!ok && text.contains("given twice"), "{text}");
    let existing = project.root.to_str().unwrap();
    let (ok, text) = alveolus(&[
        "provision",
        "--project",
        "p",
        "--coordinator",
        "h:1",
        "--site",
        "a",
        "--admin",
        "x",
        "--out",
        existing,
    ]);
    assert!(!ok && text.contains("already exists"), "{text}");
    let (ok, text) = alveolus(&["revoke", "--project-dir", existing, "--site", "nobody"]);
    assert!(
        !ok && text.contains("no certificate was issued to site/nobody"),
        "{text}"
    );
    // A site added later: its kit, and its name in the roster; not twice, not with a bad name.
    let (ok, text) = alveolus(&["provision", "--add-site", "beta", "--project-dir", existing]);
    assert!(ok && text.contains("roster.toml"), "{text}");
    let roster = std::fs::read_to_string(project.coordinator_kit().join("roster.toml")).unwrap();
    assert!(roster.contains("\"beta\""), "{roster}");
    let (ok, text) = alveolus(&["provision", "--add-site", "beta", "--project-dir", existing]);
    assert!(
        !ok && text.contains("site/beta already has a kit"),
        "{text}"
    );
    let (ok, text) = alveolus(&["provision", "--add-site", "a/b", "--project-dir", existing]);
    assert!(!ok && text.contains("not a valid name"), "{text}");
    let (ok, text) = alveolus(&["provision", "--add-site", "gamma"]);
    assert!(!ok && text.contains("--project-dir"), "{text}");
}

#[test]
fn kits_are_checked_before_anything_runs() {
    let project = project(&["alpha"]);
    let site = project.site_kit("alpha");
    // A site kit cannot start a coordinator, an admin kit cannot run an agent.
    let (ok, text) = alveolus(&["coordinator", "--kit", site.to_str().unwrap()]);
    assert!(!ok && text.contains("site kit"), "{text}");
    let data = site_data(&project, "alpha", 0, 1);
    let admin = project.admin_kit();
    let (ok, text) = alveolus(&[
        "agent",
        "--kit",
        admin.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    assert!(!ok && text.contains("agents need a site kit"), "{text}");
    // An unknown key in kit.toml is refused with the file named.
    let kit_file = site.join("kit.toml");
    let mut text = std::fs::read_to_string(&kit_file).unwrap();
    text.push_str("colour = \"blue\"\n");
    std::fs::write(&kit_file, text).unwrap();
    let (ok, text) = alveolus(&[
        "agent",
        "--kit",
        site.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    assert!(
        !ok && text.contains("kit.toml") && text.contains("colour"),
        "{text}"
    );
}

#[test]
fn evaluate_reports_dice_and_refuses_broken_inputs() {
    let project = project(&["alpha"]);
    let data = site_data(&project, "alpha", 0, 2);
    let model_path = project.path("model.safetensors");
    std::fs::write(&model_path, tiny_model(9).encode()).unwrap();
    let (ok, stdout, stderr) = alveolus_split(&[
        "evaluate",
        "--model",
        model_path.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let dice = report["infection"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&dice));
    assert_eq!(report["per_class"][0]["class"], "ggo");
    assert_eq!(report["per_class"][1]["class"], "consolidation");
    assert!(report["infection_iou"].as_f64().unwrap() <= dice);

    // A truncated model file.
    let bytes = std::fs::read(&model_path).unwrap();
    std::fs::write(&model_path, &bytes[..bytes.len() / 2]).unwrap();
    let (ok, text) = alveolus(&[
        "evaluate",
        "--model",
        model_path.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    assert!(!ok && text.contains("is not a model file"), "{text}");

    // A mask with a label the model does not know.
    std::fs::write(&model_path, &bytes).unwrap();
    let mask = std::fs::read_dir(data.join("masks"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let (w, h) = (4u32, 4u32);
    let file = std::fs::File::create(&mask).unwrap();
    let mut encoder = png::Encoder::new(file, w, h);
    encoder.set_color(png::ColorType::Grayscale);
    encoder
        .write_header()
        .unwrap()
        .write_image_data(&[7u8; 16])
        .unwrap();
    let (ok, text) = alveolus(&[
        "evaluate",
        "--model",
        model_path.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    assert!(
        !ok && text.contains("labels are on another grid") && text.contains("cases have errors"),
        "{text}"
    );
}

#[test]
fn an_initial_model_that_is_endless_or_too_large_is_refused_before_it_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let kit = dir.path().join("no-kit");
    let start = |init: &str| {
        let started = std::time::Instant::now();
        let out = alveolus(&[
            "run",
            "start",
            "--kit",
            kit.to_str().unwrap(),
            "--init",
            init,
        ]);
        (out, started.elapsed())
    };
    let ((ok, text), took) = start("/dev/zero");
    assert!(!ok && text.contains("not a regular file"), "{text}");
    assert!(took.as_secs() < 10, "{took:?}");
    // A sparse file one byte over the limit: refused by its size, not by reading it.
    let huge = dir.path().join("huge.safetensors");
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(alveolus_proto::transfer::MAX_MODEL_BYTES + 1)
        .unwrap();
    let ((ok, text), took) = start(huge.to_str().unwrap());
    assert!(!ok && text.contains("larger than a model can be"), "{text}");
    assert!(took.as_secs() < 10, "{took:?}");
}

#[test]
fn training_flags_are_checked_before_training() {
    let project = project(&["alpha"]);
    let data = site_data(&project, "alpha", 0, 2);
    let out = project.path("m.safetensors");
    let base = [
        "train",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    let with = |extra: &[&str]| alveolus(&[&base[..], extra].concat());
    let (ok, text) = with(&["--classes", "5"]);
    assert!(!ok && text.contains("5 classes"), "{text}");
    let (ok, text) = with(&["--schedule", "sawtooth"]);
    assert!(!ok && text.contains("not a schedule"), "{text}");
    let (ok, text) = with(&["--norm", "layer"]);
    assert!(!ok && text.contains("not batch or instance"), "{text}");
    let (ok, text) = with(&["--model", "3d"]);
    assert!(!ok && text.contains("volume patches"), "{text}");
    let (ok, text) = with(&["--device", "gpu"]);
    assert!(!ok && text.contains("not a device"), "{text}");
    if !cfg!(feature = "tch") {
        let (ok, text) = with(&["--device", "cuda:1"]);
        assert!(!ok && text.contains("`tch` feature"), "{text}");
    }
    assert!(!out.exists(), "nothing is written when the flags are wrong");

    // A binary (infection) model trains and reports the merged class.
    let (ok, text) = with(&[
        "--model",
        "tiny",
        "--classes",
        "2",
        "--norm",
        "instance",
        "--epochs",
        "1",
        "--validate",
        data.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    assert!(text.contains("validation infection"), "{text}");
    assert!(!text.contains("validation ggo"), "{text}");
    let model = Weights::decode(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(model.tensors["head.bias"].shape, vec![2]);
    assert!(model.tensors.contains_key("encoders.0.norm1.weight"));
    assert!(!model.tensors.keys().any(|n| n.contains("running_mean")));

    // Fine-tuning starts from that model, keeps its network, and reports Dice before and after.
    let tuned = project.path("tuned.safetensors");
    let fine_tune = |extra: &[&str]| {
        let base = [
            "train",
            "--data",
            data.to_str().unwrap(),
            "--out",
            tuned.to_str().unwrap(),
            "--epochs",
            "1",
        ];
        alveolus(&[&base[..], extra].concat())
    };
    let init = out.to_str().unwrap();
    let (ok, text) = fine_tune(&[
        "--init",
        init,
        "--trainable",
        "decoder",
        "--validate",
        data.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    assert!(text.contains("(decoder of it)"), "{text}");
    assert!(
        text.contains("validation, before fine-tuning infection")
            && text.contains("validation, after fine-tuning  infection")
            && text.contains("fine-tuning changed validation infection dice by"),
        "{text}"
    );
    let tuned_model = Weights::decode(&std::fs::read(&tuned).unwrap()).unwrap();
    assert_eq!(tuned_model.tensors["head.bias"].shape, vec![2]);
    assert_eq!(
        tuned_model.tensors["encoders.0.conv1.weight"], model.tensors["encoders.0.conv1.weight"],
        "the encoder stays as it was"
    );
    assert_ne!(
        tuned_model.tensors["head.weight"],
        model.tensors["head.weight"]
    );
    std::fs::remove_file(&tuned).unwrap();

    // What cannot be fine-tuned is refused before training.
    let volume_model = project.path("3d.safetensors");
    let spec = alveolus_models::ModelSpec::tiny_3d();
    let weights = alveolus_models::network::initial_weights(&spec, 1).unwrap();
    std::fs::write(&volume_model, weights.encode()).unwrap();
    let not_a_model = project.path("notes.txt");
    std::fs::write(&not_a_model, "not a model").unwrap();
    for (extra, expected) in [
        (
            &["--init", init, "--model", "small"][..],
            "cannot be used with",
        ),
        (&["--init", init, "--classes", "3"], "cannot be used with"),
        (&["--trainable", "decoder"], "--init"),
        (
            &["--init", init, "--trainable", "encoder"],
            "all, decoder or norm",
        ),
        (
            &["--init", volume_model.to_str().unwrap()],
            "volume patches",
        ),
        (&["--init", not_a_model.to_str().unwrap()], "notes.txt"),
    ] {
        let (ok, text) = fine_tune(extra);
        assert!(!ok && text.contains(expected), "{extra:?}: {text}");
    }
    assert!(
        !tuned.exists(),
        "nothing is written when fine-tuning is refused"
    );
}

#[test]
fn bench_prints_medians_and_the_pytorch_ratio() {
    let slow = std::env::var("ALVEOLUS_SLOW_TESTS").is_ok_and(|v| v == "1");
    let mut args = vec![
        "bench", "train", "--model", "tiny", "--steps", "3", "--warmup", "1", "--device", "flex",
    ];
    if !slow {
        args.push("--without-pytorch");
    }
    let (ok, stdout, stderr) = alveolus_split(&args);
    assert!(ok, "{stderr}");
    let row = stdout
        .lines()
        .find(|l| l.starts_with("burn-flex"))
        .unwrap_or_else(|| panic!("no burn-flex row in:\n{stdout}"));
    let columns: Vec<&str> = row.split_whitespace().collect();
    let median: f64 = columns[columns.len() - 3].parse().unwrap();
    assert!(median > 0.0, "{row}");
    if slow {
        let ratio = columns.last().unwrap().trim_end_matches('x');
        let ratio: f64 = ratio
            .parse()
            .unwrap_or_else(|_| panic!("no ratio in {row}"));
        assert!(ratio > 0.0, "{row}");
    }
    let (ok, text) = alveolus(&["bench", "train", "--steps", "0"]);
    assert!(!ok && text.contains("at least 1"), "{text}");
}

/// The site's view of its data: a synthetic dataset validates and trains; a broken case is
/// named, refused, and left out only when asked, and then listed.
#[test]
fn data_synth_validate_and_bad_cases() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("synth");
    let data_arg = data.to_str().unwrap();
    let (ok, text) = alveolus(&[
        "data", "synth", "--out", data_arg, "--cases", "2", "--size", "32", "--slices", "6",
    ]);
    assert!(ok, "{text}");
    let (ok, text) = alveolus(&["data", "validate", "--data", data_arg]);
    assert!(
        ok && text.contains("2 cases, 2 usable, 0 with errors"),
        "{text}"
    );
    let (ok, text) = alveolus(&["data", "validate", "--data", data_arg, "--json"]);
    assert!(ok, "{text}");
    let report: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(report["summary"]["labelled_slices"], 12);
    // Writing over a dataset is refused.
    let (ok, text) = alveolus(&["data", "synth", "--out", data_arg]);
    assert!(!ok && text.contains("exists"), "{text}");

    // Case 1's labels swapped for a grid of another size.
    let bad = dir.path().join("bad");
    let (ok, text) = alveolus(&[
        "data",
        "synth",
        "--out",
        bad.to_str().unwrap(),
        "--cases",
        "1",
        "--size",
        "16",
        "--slices",
        "6",
    ]);
    assert!(ok, "{text}");
    let description = data.join("dataset.toml");
    let text = std::fs::read_to_string(&description)
        .unwrap()
        .replace("case-001/labels.nii.gz", "../bad/case-000/labels.nii.gz")
        .replace("\"validation\"", "\"train\"");
    std::fs::write(&description, text).unwrap();
    let (ok, text) = alveolus(&["data", "validate", "--data", data_arg]);
    assert!(ok && text.contains("1 usable, 1 with errors"), "{text}");
    assert!(
        text.contains("case-001") && text.contains("labels are on another grid"),
        "{text}"
    );
    let out = dir.path().join("m.safetensors");
    let train = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "--data",
            data_arg,
            "--model",
            "tiny",
            "--epochs",
            "1",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        alveolus(&args)
    };
    let (ok, text) = train(&[]);
    assert!(
        !ok && text.contains("1 of 2 cases have errors") && text.contains("case-001"),
        "{text}"
    );
    assert!(!out.exists());
    let (ok, text) = train(&["--skip-bad-cases"]);
    assert!(ok && text.contains("skipped case case-001"), "{text}");
    assert!(text.contains("on 6 slices"), "{text}");

    // Nothing usable: validate fails.
    std::fs::write(&description, "[[case]]\nid = \"x\"\nimage = \"missing\"\n").unwrap();
    let (ok, text) = alveolus(&["data", "validate", "--data", data_arg]);
    assert!(
        !ok && text.contains("nothing usable remains") && text.contains("no such file"),
        "{text}"
    );
}

#[test]
fn privacy_plan_prints_the_accountants_epsilon() {
    let (ok, text) = alveolus(&[
        "privacy",
        "plan",
        "--noise",
        "1.1",
        "--rounds",
        "100",
        "--sample-rate",
        "0.01",
        "--json",
    ]);
    assert!(ok, "{text}");
    let report: serde_json::Value = serde_json::from_str(&text).unwrap();
    let expected = alveolus_privacy::epsilon_after(0.01, 1.1, 100, 1e-5).unwrap();
    assert_eq!(report["epsilon"].as_f64().unwrap(), expected.epsilon);
    assert_eq!(report["rdp_order"].as_f64().unwrap(), expected.order);
    let (ok, text) = alveolus(&["privacy", "plan", "--noise", "1.1", "--rounds", "40"]);
    assert!(
        ok && text.contains("after 40 rounds") && text.contains("after 10 rounds"),
        "{text}"
    );
    let (ok, text) = alveolus(&["privacy", "plan", "--noise=-1", "--rounds", "10"]);
    assert!(!ok && text.contains("noise multiplier"), "{text}");
    let (ok, text) = alveolus(&[
        "privacy", "plan", "--noise", "1", "--rounds", "10", "--delta", "0",
    ]);
    assert!(!ok && text.contains("delta"), "{text}");
}

#[test]
fn secure_aggregation_settings_are_checked_before_connecting() {
    let start = |extra: &[&str]| {
        let mut args = vec!["run", "start", "--kit", "/nonexistent/kit"];
        args.extend_from_slice(extra);
        alveolus(&args)
    };
    let (ok, text) = start(&["--secure-aggregation", "--aggregation", "median"]);
    assert!(
        !ok && text.contains("secure aggregation needs FedAvg"),
        "{text}"
    );
    let (ok, text) = start(&["--secure-aggregation", "--norm-bound", "3"]);
    assert!(
        !ok && text.contains("cannot check a masked update's norm"),
        "{text}"
    );
    let (ok, text) = start(&["--secure-aggregation", "--threshold", "1"]);
    assert!(
        !ok && text.contains("threshold") && text.contains("between 2 and 255"),
        "{text}"
    );
    let (ok, text) = start(&["--threshold", "3"]);
    assert!(!ok && text.contains("--secure-aggregation"), "{text}");
}
