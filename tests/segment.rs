//! `alveolus segment` and `data add-case` through the real binary, as a site runs them: outputs
//! that overlay their scan (checked against dcm2niix and nibabel), a DICOM SEG that validates
//! (dciodvfy), reads (highdicom) and reads back equal to the labels (our reader), volumes that
//! are the label files' voxel counts, and clear refusals of bad input.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use alveolus_imaging::dicom::read_series;
use alveolus_imaging::dicom_write::{SeriesTags, write_series};
use alveolus_imaging::{nifti, seg, synth};
use alveolus_models::ModelSpec;
use alveolus_models::network::initial_weights;
use common::*;

/// Identifiers in the synthetic series that nothing `segment` prints may carry.
const PATIENT_NAME: &str = "NOWAK^HALINA";
const PATIENT_ID: &str = "PID-31415926";

fn alveolus(args: &[&str]) -> (bool, String, String) {
    let output = Command::new(BIN)
        .args(args)
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `alveolus segment --model M --input I --out O` and `extra`.
fn segment(model: &Path, input: &Path, out: &Path, extra: &[&str]) -> (bool, String, String) {
    let mut args = vec![
        "segment",
        "--model",
        model.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    alveolus(&args)
}

fn slow_tests_enabled(what: &str) -> bool {
    let enabled = std::env::var_os("ALVEOLUS_SLOW_TESTS").is_some();
    if !enabled {
        eprintln!(
            "skipped {what}: set ALVEOLUS_SLOW_TESTS=1 to check with dcm2niix, dciodvfy, nibabel and highdicom"
        );
    }
    enabled
}

/// A synthetic chest CT written as a DICOM series (with identifiers) and as NIfTI, with its
/// exact labels as NIfTI.
struct Case {
    series: PathBuf,
    nifti: PathBuf,
    labels: PathBuf,
}

fn synthetic_case(dir: &Path, seed: u64) -> Case {
    oriented_case(
        dir,
        seed,
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
    )
}

/// A synthetic case whose stored axes point along `direction` (rows, columns, slices in LPS).
fn oriented_case(dir: &Path, seed: u64, direction: [[f64; 3]; 3]) -> Case {
    let mut case = synth::chest_ct(seed, [64, 64, 16], [5.5, 5.5, 9.0]);
    case.image.geometry.direction = direction;
    case.labels.geometry.direction = direction;
    let mut tags = SeriesTags::synthetic(seed);
    tags.patient_name = PATIENT_NAME.into();
    tags.patient_id = PATIENT_ID.into();
    let series = dir.join(format!("series-{seed}"));
    write_series(&series, &case.image, &tags, "ct").unwrap();
    let nifti_path = dir.join(format!("ct-{seed}.nii.gz"));
    nifti::write(&nifti_path, &case.image).unwrap();
    let labels = dir.join(format!("labels-{seed}.nii.gz"));
    nifti::write(&labels, &case.labels).unwrap();
    Case {
        series,
        nifti: nifti_path,
        labels,
    }
}

/// `alveolus data synth` with `cases` small cases into `dir/synth`.
fn synth_dataset(dir: &Path, cases: usize) -> PathBuf {
    let synth = dir.join("synth");
    let (ok, stdout, stderr) = alveolus(&[
        "data",
        "synth",
        "--out",
        synth.to_str().unwrap(),
        "--cases",
        &cases.to_string(),
        "--size",
        "48",
        "--slices",
        "8",
    ]);
    assert!(ok, "{stdout}{stderr}");
    synth
}

fn model(dir: &Path, spec: ModelSpec) -> PathBuf {
    let path = dir.join(format!("model-{}-{}.safetensors", spec.kind, spec.classes));
    std::fs::write(&path, initial_weights(&spec, 5).unwrap().encode()).unwrap();
    path
}

fn tiny(classes: usize) -> ModelSpec {
    ModelSpec {
        classes,
        ..ModelSpec::tiny()
    }
}

fn sha256_of(path: &Path) -> String {
    alveolus_proto::sha256_hex(&std::fs::read(path).unwrap())
}

/// Our SEG reader puts `out/seg.dcm` back on the series' grid equal to `out/labels.nii.gz`,
/// which lies on that grid; returns the labels.
fn seg_equals_labels(out: &Path, series: &Path) -> alveolus_imaging::Volume<u16> {
    let image = read_series(series).unwrap();
    let from_seg = seg::read_seg(
        &out.join("seg.dcm"),
        &image.volume.geometry,
        &image.series_uid,
    )
    .unwrap();
    let labels = nifti::read_labels(&out.join("labels.nii.gz")).unwrap();
    assert!(labels.geometry.same_grid(&image.volume.geometry));
    assert_eq!(from_seg.voxels, labels.voxels);
    labels
}

fn check_with_reference_tools(out: &Path, input: &Path) {
    let python = alveolus_models::pytorch::python(Path::new(env!("CARGO_MANIFEST_DIR")));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("imaging/python/check_segment.py");
    let output = Command::new(&python)
        .arg(script)
        .arg(out)
        .arg(input)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("{}", String::from_utf8_lossy(&output.stdout));
}

#[test]
fn a_dicom_series_gets_labels_a_seg_a_report_and_a_preview_that_overlay_it() {
    let dir = tempfile::tempdir().unwrap();
    let case = synthetic_case(dir.path(), 1);
    let model = model(dir.path(), tiny(3));
    let out = dir.path().join("out");
    let (ok, stdout, stderr) = segment(&model, &case.series, &out, &[]);
    assert!(ok, "{stdout}{stderr}");
    let version = sha256_of(&model);
    assert!(
        stdout.contains(&version),
        "the model version is printed: {stdout}"
    );
    assert!(
        stdout.contains("right lung") && stdout.contains("involvement"),
        "{stdout}"
    );
    for identifier in [PATIENT_NAME, PATIENT_ID, "NOWAK", "HALINA"] {
        assert!(
            !stdout.contains(identifier) && !stderr.contains(identifier),
            "{identifier} printed"
        );
    }
    for file in [
        "labels.nii.gz",
        "lungs.nii.gz",
        "seg.dcm",
        "report.json",
        "preview.png",
    ] {
        assert!(out.join(file).is_file(), "{file} written");
    }
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["model"]["version"], version.as_str());
    assert_eq!(report["lung_mask"], "hu");

    let labels = seg_equals_labels(&out, &case.series);
    assert!(
        labels.voxels.iter().any(|&l| l != 0),
        "the lungs are labelled"
    );

    if slow_tests_enabled("the reference-tool checks") {
        check_with_reference_tools(&out, &case.series);
    }

    // A second run into the same folder is refused; with --force it replaces it.
    let (ok, stdout, stderr) = segment(&model, &case.series, &out, &[]);
    assert!(
        !ok && stderr.contains("already holds results") && stderr.contains("--force"),
        "{stdout}{stderr}"
    );
    let (ok, stdout, stderr) = segment(&model, &case.series, &out, &["--force"]);
    assert!(ok, "{stdout}{stderr}");
    assert!(out.join("seg.dcm").is_file());
}

#[test]
fn outputs_overlay_series_stored_in_any_orientation() {
    let dir = tempfile::tempdir().unwrap();
    let model = model(dir.path(), tiny(3));
    // Coronal slices with reversed rows, and axial slices stored feet first with mirrored columns.
    let orientations = [
        [[-1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]],
        [[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, -1.0]],
    ];
    for (k, direction) in orientations.into_iter().enumerate() {
        let case = oriented_case(dir.path(), 30 + k as u64, direction);
        let out = dir.path().join(format!("out-{k}"));
        let (ok, stdout, stderr) = segment(&model, &case.series, &out, &[]);
        assert!(ok, "{stdout}{stderr}");
        seg_equals_labels(&out, &case.series);
        if slow_tests_enabled("the reference-tool checks") {
            check_with_reference_tools(&out, &case.series);
        }
    }
}

#[test]
fn a_nifti_scan_gets_labels_with_its_own_affine_and_no_seg() {
    let dir = tempfile::tempdir().unwrap();
    let case = synthetic_case(dir.path(), 2);
    let model = model(dir.path(), tiny(3));
    let out = dir.path().join("out");
    let (ok, stdout, stderr) = segment(&model, &case.nifti, &out, &["--json"]);
    assert!(ok, "{stdout}{stderr}");
    let json_start = stdout.find('[').expect("a JSON array of reports");
    let reports: serde_json::Value = serde_json::from_str(&stdout[json_start..]).unwrap();
    assert_eq!(reports[0]["input_format"], "NIfTI");
    assert!(!out.join("seg.dcm").exists());
    let labels = nifti::read_labels(&out.join("labels.nii.gz")).unwrap();
    let image = nifti::read_image(&case.nifti).unwrap();
    assert!(labels.geometry.same_grid(&image.geometry));
    if slow_tests_enabled("the reference-tool checks") {
        check_with_reference_tools(&out, &case.nifti);
    }
}

#[test]
fn a_png_slice_folder_gets_a_mask_per_slice() {
    let dir = tempfile::tempdir().unwrap();
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/medseg");
    let slices = dir.path().join("slices");
    for sub in ["images", "masks"] {
        std::fs::create_dir_all(slices.join(sub)).unwrap();
        for name in ["000.png", "001.png", "002.png"] {
            std::fs::copy(data.join(sub).join(name), slices.join(sub).join(name)).unwrap();
        }
    }
    let model = model(dir.path(), tiny(3));
    let out = dir.path().join("out");
    let (ok, stdout, stderr) = segment(&model, &slices, &out, &[]);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("3 slices"), "{stdout}");
    for name in ["000.png", "001.png", "002.png"] {
        let (w, h, mask) =
            alveolus_imaging::png_slices::read_gray_png(&out.join("masks").join(name)).unwrap();
        let (iw, ih, _) =
            alveolus_imaging::png_slices::read_gray_png(&slices.join("images").join(name)).unwrap();
        assert_eq!((w, h), (iw, ih), "{name}: the mask has its slice's size");
        assert!(mask.iter().all(|&l| l <= 3));
    }
    assert!(out.join("preview.png").is_file() && out.join("report.json").is_file());
}

#[test]
fn a_dataset_gets_a_folder_per_case() {
    let dir = tempfile::tempdir().unwrap();
    let synth = synth_dataset(dir.path(), 2);
    let model = model(dir.path(), tiny(4));
    let out = dir.path().join("out");
    let (ok, stdout, stderr) = segment(&model, &synth.join("dataset.toml"), &out, &[]);
    assert!(ok, "{stdout}{stderr}");
    for case in ["case-000", "case-001"] {
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join(case).join("report.json")).unwrap())
                .unwrap();
        // A four-class model gives the lung itself.
        assert_eq!(report["lung_mask"], "model", "{case}");
        assert!(out.join(case).join("seg.dcm").is_file());
    }
}

#[test]
fn evaluate_reports_hd95_in_mm_on_volumes() {
    let dir = tempfile::tempdir().unwrap();
    let synth = synth_dataset(dir.path(), 1);
    let model = model(dir.path(), tiny(4));
    let data = synth.join("dataset-nifti.toml");
    let (ok, stdout, stderr) = alveolus(&[
        "evaluate",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--json",
    ]);
    assert!(ok, "{stdout}{stderr}");
    assert!(stderr.contains("HD95 over 1 labelled volumes"), "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let lung = report["per_class"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["class"] == "lung")
        .expect("a four-class model reports the lung");
    let hd95 = lung["hd95_mm"].as_f64().expect("HD95 of the lung, in mm");
    // The volume is 350 mm across: any distance between two masks in it is below its diagonal.
    assert!(hd95 > 0.0 && hd95 < 350.0 * 3f64.sqrt(), "{hd95}");
    // PNG slices are no volumes: no HD95.
    let slices = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/medseg");
    let (ok, stdout, stderr) = alveolus(&[
        "evaluate",
        "--model",
        model.to_str().unwrap(),
        "--data",
        slices.to_str().unwrap(),
    ]);
    assert!(ok, "{stdout}{stderr}");
    assert!(!stdout.contains("hd95"), "{stdout}");
}

#[test]
fn segment_refuses_what_it_cannot_do_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let case = synthetic_case(dir.path(), 3);
    let out = dir.path().join("out");
    let run = |model: &Path, input: &Path, extra: &[&str]| {
        let (ok, stdout, stderr) = segment(model, input, &out, extra);
        assert!(!ok, "refused: {stdout}{stderr}");
        assert!(!out.exists(), "nothing written half-way");
        stderr
    };
    let two_class = model(dir.path(), tiny(2));
    let message = run(&two_class, &case.series, &[]);
    assert!(message.contains("infection only"), "{message}");
    let three_class = model(dir.path(), tiny(3));
    let message = run(&three_class, &case.series, &["--lung", "model"]);
    assert!(message.contains("--classes 4"), "{message}");
    let volumetric = model(dir.path(), ModelSpec::tiny_3d());
    let message = run(&volumetric, &case.series, &[]);
    assert!(message.contains("segment applies 2D models"), "{message}");

    // A series with a slice missing.
    let gappy = dir.path().join("gappy");
    std::fs::create_dir_all(&gappy).unwrap();
    let mut files: Vec<_> = std::fs::read_dir(&case.series)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let image = read_series(&case.series).unwrap();
    let middle = image.stack.instances[8].path.clone();
    for file in files.iter().filter(|f| **f != middle) {
        std::fs::copy(file, gappy.join(file.file_name().unwrap())).unwrap();
    }
    let message = run(&three_class, &gappy, &[]);
    assert!(message.contains("a missing slice"), "{message}");

    // Not CT: the same series relabelled MR.
    let mr = dir.path().join("mr");
    let mut tags = SeriesTags::synthetic(4);
    tags.modality = "MR".into();
    let synthetic = synth::chest_ct(4, [32, 32, 4], [10.0, 10.0, 10.0]);
    write_series(&mr, &synthetic.image, &tags, "mr").unwrap();
    let message = run(&three_class, &mr, &[]);
    assert!(message.contains("modality is MR, not CT"), "{message}");

    // A NIfTI that is no CT: values of an MR image, not Hounsfield units.
    let mut mr_like = synth::chest_ct(5, [32, 32, 4], [10.0, 10.0, 10.0]).image;
    for v in mr_like.voxels.iter_mut() {
        *v = (*v + 1024).clamp(0, 4000);
    }
    let mr_path = dir.path().join("mr.nii.gz");
    nifti::write(&mr_path, &mr_like).unwrap();
    let message = run(&three_class, &mr_path, &[]);
    assert!(
        message.contains("do not look like HU") && message.contains("mr.nii.gz"),
        "{message}"
    );

    // A dataset description that does not parse.
    let broken = dir.path().join("dataset.toml");
    std::fs::write(&broken, "[[case]\nid = ").unwrap();
    let message = run(&three_class, &broken, &[]);
    assert!(message.contains("dataset.toml"), "{message}");
}

#[test]
fn add_case_checks_the_pair_keeps_the_file_and_refuses_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let first = synthetic_case(dir.path(), 5);
    let second = synthetic_case(dir.path(), 6);
    let dataset = dir.path().join("dataset.toml");
    let original = format!(
        "# Our site's cases: keep this comment.\n[window]\ncenter = -600\nwidth = 1500\n\n[[case]]\nid = \"first\"  # the first patient\nimage = {:?}\nlabels = {:?}\n",
        first.series.file_name().unwrap(),
        first.labels.file_name().unwrap()
    );
    std::fs::write(&dataset, &original).unwrap();
    let add = |id: &str, image: &Path, labels: &Path| {
        alveolus(&[
            "data",
            "add-case",
            "--dataset",
            dataset.to_str().unwrap(),
            "--id",
            id,
            "--image",
            image.to_str().unwrap(),
            "--labels",
            labels.to_str().unwrap(),
        ])
    };
    // Labels of another case's grid.
    let other_grid = synth::chest_ct(7, [48, 48, 16], [5.5, 5.5, 9.0]);
    let wrong = dir.path().join("wrong-grid.nii.gz");
    nifti::write(&wrong, &other_grid.labels).unwrap();
    let (ok, stdout, stderr) = add("second", &second.series, &wrong);
    assert!(!ok && stderr.contains("another grid"), "{stdout}{stderr}");
    // Label values the dataset does not name.
    let mut strange = nifti::read_labels(&second.labels).unwrap();
    strange.voxels[0] = 9;
    let strange_path = dir.path().join("strange.nii.gz");
    let strange_u8 = alveolus_imaging::Volume {
        geometry: strange.geometry.clone(),
        voxels: strange.voxels.iter().map(|&v| v as u8).collect(),
    };
    nifti::write(&strange_path, &strange_u8).unwrap();
    let (ok, stdout, stderr) = add("second", &second.series, &strange_path);
    assert!(!ok && stderr.contains("9 (1 voxels)"), "{stdout}{stderr}");
    // A taken id.
    let (ok, stdout, stderr) = add("first", &second.series, &second.labels);
    assert!(!ok && stderr.contains("already listed"), "{stdout}{stderr}");
    assert_eq!(
        std::fs::read_to_string(&dataset).unwrap(),
        original,
        "untouched by refusals"
    );

    let (ok, stdout, stderr) = add("second", &second.series, &second.labels);
    assert!(ok, "{stdout}{stderr}");
    let text = std::fs::read_to_string(&dataset).unwrap();
    assert!(
        text.starts_with(&original),
        "the file's content and comments are kept:\n{text}"
    );
    assert!(text.contains("id = \"second\""), "{text}");
    // Inside the dataset's folder, paths are written relative to it.
    assert!(text.contains("image = \"series-6\""), "{text}");
    let (ok, stdout, stderr) = alveolus(&["data", "validate", "--data", dataset.to_str().unwrap()]);
    assert!(
        ok && stdout.contains("2 cases, 2 usable"),
        "{stdout}{stderr}"
    );
}
