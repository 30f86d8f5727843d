//! `alveolus bench segment`: a synthetic chest CT series segmented by `alveolus segment` in a
//! process of its own (wall time, planes per second, peak resident memory), and the model's
//! inference over the same scan's preprocessed planes against PyTorch's over the very same
//! planes, with the same batch and thread count.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use alveolus_imaging::dicom_write::{SeriesTags, write_series};
use alveolus_imaging::preprocess::{Window, windowed};
use alveolus_imaging::scan::read_scan;
use alveolus_imaging::slices::resize_bilinear;
use alveolus_imaging::synth::chest_ct;
use alveolus_models::bench::median;
use alveolus_models::network::{initial_weights, load_model};
use alveolus_models::{DeviceChoice, Inference, ModelSpec, NamedTensor, Weights, pytorch};
use anyhow::{Context, Result, bail};
use clap::Args;

#[derive(Args)]
pub struct SegmentBenchOptions {
    /// Pixels a side of each plane.
    #[arg(long, default_value_t = 512)]
    size: usize,
    /// Planes (1 mm apart).
    #[arg(long, default_value_t = 300)]
    slices: usize,
    /// Network preset: tiny, small or default.
    #[arg(long, default_value = "small")]
    model: String,
    #[arg(long, default_value_t = alveolus_models::infer::DEFAULT_BATCH)]
    batch_size: usize,
    /// CPU threads for every backend and for PyTorch.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Timed passes over the planes (medians are printed).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    #[arg(long, default_value = "cpu")]
    device: DeviceChoice,
    /// Time only our backend (PyTorch needs Python with torch).
    #[arg(long)]
    without_pytorch: bool,
}

pub fn run(options: SegmentBenchOptions) -> Result<()> {
    if options.size < 32 || options.slices == 0 || options.batch_size == 0 || options.threads == 0 {
        bail!("--size must be at least 32, and --slices, --batch-size and --threads at least 1");
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(options.threads)
        .build_global()
        .context("cannot size the CPU thread pool")?;
    alveolus_models::device::set_cpu_threads(options.threads);
    let device = options.device.resolve()?;
    let mut spec = ModelSpec::preset(&options.model)?;
    spec.classes = 3;
    let weights = initial_weights(&spec, 0)?;
    let scratch = tempfile::tempdir()?;
    let model_path = scratch.path().join("model.safetensors");
    std::fs::write(&model_path, weights.encode())?;

    let [n, planes] = [options.size, options.slices];
    let started = Instant::now();
    let spacing = [350.0 / n as f64, 350.0 / n as f64, 1.0];
    let case = chest_ct(7, [n, n, planes], spacing);
    let series = scratch.path().join("series");
    write_series(&series, &case.image, &SeriesTags::synthetic(7), "ct")?;
    drop(case);
    println!(
        "synthetic chest CT, {n}x{n}x{planes} voxels ({:.0} MB as HU floats), written as a DICOM series in {:.1} s",
        (n * n * planes * 4) as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );

    // The whole command, as a site runs it.
    let out = scratch.path().join("out");
    let started = Instant::now();
    let output = Command::new(std::env::current_exe()?)
        .args(["segment", "--model"])
        .arg(&model_path)
        .arg("--input")
        .arg(&series)
        .arg("--out")
        .arg(&out)
        .args(["--device", &options.device.to_string()])
        .args(["--batch-size", &options.batch_size.to_string()])
        .env("RAYON_NUM_THREADS", options.threads.to_string())
        .env("OMP_NUM_THREADS", options.threads.to_string())
        .output()
        .context("cannot run `alveolus segment`")?;
    let wall = started.elapsed().as_secs_f64();
    if !output.status.success() {
        bail!(
            "`alveolus segment` failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let peak_mb = children_peak_rss_kb() as f64 / 1024.0;
    println!(
        "alveolus segment on {}: {wall:.1} s wall, {:.1} planes/s, peak RSS {peak_mb:.0} MiB (volume as floats {:.0} MiB, labels and lungs {:.0} MiB)",
        device,
        planes as f64 / wall,
        (n * n * planes * 4) as f64 / 1048576.0,
        (n * n * planes * 2) as f64 / 1048576.0,
    );

    // Inference alone: the same preprocessed planes through our backend and through PyTorch.
    let scan = read_scan(&series)?;
    let size = spec.image_size;
    let mut planes_at_size = Vec::with_capacity(planes * size * size);
    for z in 0..planes {
        let plane = windowed(scan.image.plane(z), scan.intensity, &Window::LUNG);
        planes_at_size.extend(resize_bilinear(&plane, n, n, size));
    }
    drop(scan);
    let (spec, model) = load_model(&weights, &device.device)?;
    let inference = Inference::new(&model, spec, &device.device);
    let mut ours = Vec::new();
    for _ in 0..options.repeats.max(1) + 1 {
        let started = Instant::now();
        for batch in planes_at_size.chunks(options.batch_size * size * size) {
            std::hint::black_box(inference.probabilities(batch.to_vec()));
        }
        ours.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    // The first pass warms the kernels up; it is not counted.
    let ours = median(&ours[1..]);
    let peer = if options.without_pytorch {
        None
    } else {
        let planes_path = scratch.path().join("planes.safetensors");
        let mut tensors = Weights::default();
        tensors.tensors.insert(
            "x".into(),
            NamedTensor {
                shape: vec![planes, 1, size, size],
                values: planes_at_size,
            },
        );
        std::fs::write(&planes_path, tensors.encode())?;
        pytorch::write_scripts(scratch.path())?;
        Some(pytorch_inference(
            scratch.path(),
            &model_path,
            &planes_path,
            &device.name,
            &options,
        )?)
    };
    println!(
        "inference over {planes} planes at {size} px, batch {}, {} threads (median of {}):",
        options.batch_size,
        options.threads,
        options.repeats.max(1)
    );
    println!("{:<28} {:>10} {:>12}", "", "total ms", "planes/s");
    println!(
        "{:<28} {ours:>10.0} {:>12.1}",
        device.backend,
        planes as f64 / ours * 1000.0
    );
    if let Some(peer) = peer {
        println!(
            "{:<28} {peer:>10.0} {:>12.1}",
            "PyTorch",
            planes as f64 / peer * 1000.0
        );
        println!(
            "ratio {:.2}x (ours over PyTorch's; below 1: faster than PyTorch)",
            ours / peer
        );
    }
    Ok(())
}

/// Median milliseconds of PyTorch's pass over the planes, from `bench_segment.py`.
fn pytorch_inference(
    scripts: &Path,
    model: &Path,
    planes: &Path,
    device: &str,
    options: &SegmentBenchOptions,
) -> Result<f64> {
    crate::bench::pytorch_median_ms(
        &pytorch::python(Path::new(".")),
        &scripts.join("bench_segment.py"),
        &[
            model.display().to_string(),
            planes.display().to_string(),
            device.to_string(),
            options.threads.to_string(),
            options.batch_size.to_string(),
            options.repeats.max(1).to_string(),
        ],
    )
}

/// The largest peak resident set of the children waited for so far, in KiB.
fn children_peak_rss_kb() -> i64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a whole rusage into the pointer it is given.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_CHILDREN, usage.as_mut_ptr());
        usage.assume_init()
    };
    usage.ru_maxrss
}
