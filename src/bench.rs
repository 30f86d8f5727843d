//! `alveolus bench train`: a training step of one network on every backend this build has, and
//! the same step in PyTorch on the same batch with the same thread count.

use std::path::Path;
use std::process::Command;

use alveolus_models::bench::{median, synthetic_batch, time_training_steps};
use alveolus_models::{DeviceChoice, ModelSpec, Precision, pytorch};
use anyhow::{Context, Result, bail};
use clap::Args;

/// Time a training step (forward, loss, backward, AdamW) on each backend of this build and in
/// PyTorch on the same batch, and print the medians and ratios.
#[derive(Args)]
pub struct BenchOptions {
    /// Network preset: tiny, small or default.
    #[arg(long, default_value = "default")]
    pub model: String,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// CPU threads for every backend and for PyTorch.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    #[arg(long, default_value_t = 6)]
    pub steps: usize,
    /// Devices to time (flex, cpu, cuda[:N]; repeatable); all this build has by default.
    #[arg(long = "device")]
    pub devices: Vec<DeviceChoice>,
    /// Time only our backends (PyTorch needs Python with torch).
    #[arg(long)]
    pub without_pytorch: bool,
    /// The convolutions' number format: f32, or bf16/f16 mixed precision. PyTorch runs the
    /// same under autocast (and GradScaler for f16), and at f32 too for the comparison that
    /// matters to a site: mixed precision against plain f32.
    #[arg(long, default_value = "f32")]
    pub precision: Precision,
}

struct Row {
    backend: String,
    device: String,
    median_ms: f64,
    /// The PyTorch median on the same device at the same precision, when measured.
    pytorch_ms: Option<f64>,
    /// PyTorch's f32 median, when the precision is another.
    pytorch_f32_ms: Option<f64>,
}

pub fn run(options: BenchOptions) -> Result<()> {
    if options.steps == 0 || options.batch_size == 0 || options.threads == 0 {
        bail!("--steps, --batch-size and --threads must be at least 1");
    }
    // burn-flex runs on rayon's global pool, which must be sized before any tensor work.
    rayon::ThreadPoolBuilder::new()
        .num_threads(options.threads)
        .build_global()
        .context("cannot size the CPU thread pool")?;
    alveolus_models::device::set_cpu_threads(options.threads);

    let spec = ModelSpec::preset(&options.model)?;
    let weights = alveolus_models::network::initial_weights(&spec, 0)?;
    let dims = spec.spatial_dims();
    let batch = synthetic_batch(options.batch_size, spec.image_size, dims, spec.classes, 1);
    let parameters: usize = weights
        .tensors
        .iter()
        .filter(|(name, _)| !alveolus_models::weights::is_buffer(name))
        .map(|(_, t)| t.values.len())
        .sum();
    println!(
        "training step of the {} U-Net ({parameters} parameters) at {}, batch {}x1{}, {} CPU threads, median of {} steps after {} warm-up",
        options.model,
        options.precision,
        options.batch_size,
        format!("x{}", spec.image_size).repeat(dims),
        options.threads,
        options.steps,
        options.warmup
    );

    let scratch = tempfile::tempdir()?;
    let model_path = scratch.path().join("model.safetensors");
    let batch_path = scratch.path().join("batch.safetensors");
    std::fs::write(&model_path, weights.encode())?;
    std::fs::write(&batch_path, batch.encode())?;
    pytorch::write_scripts(scratch.path())?;
    let python = pytorch::python(Path::new("."));

    let devices = if options.devices.is_empty() {
        DeviceChoice::available()
    } else {
        options.devices.clone()
    };
    let mut rows = Vec::new();
    // LibTorch's and burn-flex's CPU rows share one PyTorch CPU measurement.
    let mut pytorch_cpu: Option<(f64, Option<f64>)> = None;
    for choice in devices {
        let device = choice.resolve()?;
        let times = time_training_steps(
            &weights,
            &batch,
            &device,
            options.precision,
            options.warmup,
            options.steps,
        )?;
        let (pytorch_ms, pytorch_f32_ms) = if options.without_pytorch {
            (None, None)
        } else if let (true, Some(cpu)) = (device.name == "cpu", pytorch_cpu) {
            (Some(cpu.0), cpu.1)
        } else {
            let peer = |precision| {
                pytorch_step(
                    &python,
                    scratch.path(),
                    (&model_path, &batch_path),
                    &device.name,
                    precision,
                    &options,
                )
            };
            let ms = peer(options.precision)?;
            let f32_ms = match options.precision {
                Precision::F32 => None,
                _ => Some(peer(Precision::F32)?),
            };
            if device.name == "cpu" {
                pytorch_cpu = Some((ms, f32_ms));
            }
            (Some(ms), f32_ms)
        };
        rows.push(Row {
            backend: device.backend.clone(),
            device: device.name.clone(),
            median_ms: median(&times),
            pytorch_ms,
            pytorch_f32_ms,
        });
    }

    let with_f32 = options.precision != Precision::F32;
    let peer_column = format!("PyTorch {} ms", options.precision);
    print!(
        "{:<24} {:<8} {:>12} {:>16} {:>10}",
        "backend", "device", "median ms", peer_column, "ratio"
    );
    if with_f32 {
        print!(" {:>16} {:>12}", "PyTorch f32 ms", "ratio f32");
    }
    println!();
    let peer = |ms: Option<f64>, ours: f64| match ms {
        Some(p) => (format!("{p:.1}"), format!("{:.2}x", ours / p)),
        None => ("-".into(), "-".into()),
    };
    for row in &rows {
        let (ms, ratio) = peer(row.pytorch_ms, row.median_ms);
        print!(
            "{:<24} {:<8} {:>12.1} {:>16} {:>10}",
            row.backend, row.device, row.median_ms, ms, ratio
        );
        if with_f32 {
            let (ms, ratio) = peer(row.pytorch_f32_ms, row.median_ms);
            print!(" {ms:>16} {ratio:>12}");
        }
        println!();
    }
    println!(
        "ratio = our median / PyTorch's median on the same device (below 1: faster than PyTorch)"
    );
    Ok(())
}

/// Median milliseconds of PyTorch's step, from `bench_train.py`.
fn pytorch_step(
    python: &Path,
    scripts: &Path,
    (model, batch): (&Path, &Path),
    device: &str,
    precision: Precision,
    options: &BenchOptions,
) -> Result<f64> {
    pytorch_median_ms(
        python,
        &scripts.join("bench_train.py"),
        &[
            model.display().to_string(),
            batch.display().to_string(),
            device.to_string(),
            options.threads.to_string(),
            options.steps.to_string(),
            options.warmup.to_string(),
            precision.to_string(),
        ],
    )
}

/// Runs a PyTorch peer script with `args` and returns the median milliseconds it reports (one
/// JSON line with `median_ms`).
pub fn pytorch_median_ms(python: &Path, script: &Path, args: &[String]) -> Result<f64> {
    let output = Command::new(python)
        .arg(script)
        .args(args)
        .output()
        .with_context(|| {
            format!(
                "cannot run {} for the PyTorch peer (--without-pytorch skips it)",
                python.display()
            )
        })?;
    if !output.status.success() {
        bail!(
            "the PyTorch peer failed ({}; set ALVEOLUS_PYTHON to a Python with torch, or pass --without-pytorch):\n{}",
            python.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let line = String::from_utf8_lossy(&output.stdout);
    let report: serde_json::Value = serde_json::from_str(line.trim())
        .with_context(|| format!("unexpected PyTorch peer output: {line}"))?;
    report["median_ms"]
        .as_f64()
        .context("the PyTorch peer reported no median")
}
