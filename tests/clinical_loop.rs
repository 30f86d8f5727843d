//! The clinical loop through the real binaries: a site trains in a federated run, segments a new
//! scan with a model, a radiologist's correction of the draft is added to the site's dataset with
//! `data add-case`, and the agent, still running, trains its next round on the larger dataset.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use alveolus_imaging::dicom_write::{SeriesTags, write_series};
use alveolus_imaging::{Volume, nifti, synth};
use alveolus_proto::domain::RunState;
use common::*;

fn alveolus(args: &[&str]) -> String {
    let output = Command::new(BIN)
        .args(args)
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "alveolus {args:?}: {text}");
    text
}

/// The sample count the site reported for round 1 of `run`, from its audit copy.
fn samples(project: &Project, run: &str) -> u64 {
    let record = project
        .path("audit-hospital")
        .join(format!("{run}-round0001.json"));
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(record).unwrap()).unwrap();
    record["num_samples"].as_u64().unwrap()
}

fn write_case(dir: &Path, seed: u64) -> (std::path::PathBuf, synth::SynthCase) {
    let case = synth::chest_ct(seed, [48, 48, 10], [7.0, 7.0, 12.0]);
    let series = dir.join(format!("ct-{seed}"));
    write_series(&series, &case.image, &SeriesTags::synthetic(seed), "ct").unwrap();
    (series, case)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrected_segmentation_is_trained_on_in_the_next_round() {
    let project = project(&["hospital"]);
    let data = project.path("site");
    std::fs::create_dir_all(&data).unwrap();
    let (first_series, first) = write_case(&data, 21);
    nifti::write(&data.join("labels-21.nii.gz"), &first.labels).unwrap();
    let dataset = data.join("dataset.toml");
    std::fs::write(
        &dataset,
        "# The hospital's annotated cases.\n[[case]]\nid = \"first\"\nimage = \"ct-21\"\nlabels = \"labels-21.nii.gz\"\n",
    )
    .unwrap();
    let _ = first_series;

    let _coordinator = start_coordinator(&project).await;
    let _agent = spawn_agent(&project, "hospital", &dataset);
    let mut admin = admin(&project).await;
    let model = tiny_model(9);
    let before = start_run(&mut admin, run_config(1, 1, 300), &model).await;
    let before = wait_for(&mut admin, &before.run_id, Duration::from_secs(300), |r| {
        r.state != RunState::Running
    })
    .await;
    let log = || std::fs::read_to_string(project.path("hospital.log")).unwrap_or_default();
    assert_eq!(before.state, RunState::Completed, "{}", log());

    // A new scan arrives; the model drafts it.
    let (new_series, truth) = write_case(&data, 22);
    let model_path = project.path("model.safetensors");
    std::fs::write(&model_path, model.encode()).unwrap();
    let draft = project.path("draft");
    let printed = alveolus(&[
        "segment",
        "--model",
        model_path.to_str().unwrap(),
        "--input",
        new_series.to_str().unwrap(),
        "--out",
        draft.to_str().unwrap(),
    ]);
    assert!(printed.contains("both lungs"), "{printed}");

    // The radiologist corrects the draft: the lesions are redrawn where they really are.
    let drafted = nifti::read_labels(&draft.join("labels.nii.gz")).unwrap();
    let corrected = Volume {
        geometry: drafted.geometry.clone(),
        voxels: drafted
            .voxels
            .iter()
            .zip(&truth.labels.voxels)
            .map(|(&d, &t)| match t {
                synth::GROUND_GLASS | synth::CONSOLIDATION => t,
                _ if d == 3 || t == synth::LUNG => 3,
                _ => 0,
            })
            .collect::<Vec<u8>>(),
    };
    let corrected_path = data.join("corrected-22.nii.gz");
    nifti::write(&corrected_path, &corrected).unwrap();
    let added = alveolus(&[
        "data",
        "add-case",
        "--dataset",
        dataset.to_str().unwrap(),
        "--id",
        "second",
        "--image",
        new_series.to_str().unwrap(),
        "--labels",
        corrected_path.to_str().unwrap(),
    ]);
    assert!(added.contains("added case second"), "{added}");

    // The agent, never restarted, trains on both cases in its next round.
    let after = start_run(&mut admin, run_config(1, 1, 300), &model).await;
    let after = wait_for(&mut admin, &after.run_id, Duration::from_secs(300), |r| {
        r.state != RunState::Running
    })
    .await;
    assert_eq!(after.state, RunState::Completed, "{}", log());
    let (old, new) = (
        samples(&project, &before.run_id),
        samples(&project, &after.run_id),
    );
    assert!(
        new > old,
        "round after the correction trained on {new} slices, before on {old}"
    );
    assert!(log().contains("the dataset changed"), "{}", log());
}
