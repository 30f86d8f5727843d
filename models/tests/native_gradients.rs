//! Convolution and batch-norm outputs and gradients equal PyTorch autograd's on the same inputs,
//! for the layers the U-Nets use (3x3 and 1x1 convolutions, 2D and 3D, transposed with stride 2,
//! batch norm) and a few they could (stride 2, asymmetric padding, dilation, groups, one batch
//! item, non-square inputs): burn-flex's (the vendored crate's GEMM convolutions and fused batch
//! norm, `vendor/burn-flex/PATCH.md`) and, with `tch`, LibTorch's (its own
//! `convolution_backward` and `native_batch_norm_backward`, `vendor/burn-tch/PATCH.md`), which
//! must also equal burn-flex's.
//!
//! The PyTorch half needs Python with torch (`scripts/python-env`); it runs when
//! `ALVEOLUS_SLOW_TESTS=1` (as in CI), where a missing PyTorch is a failure, and otherwise
//! says it skipped.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use alveolus_models::bench::tensor;
use alveolus_models::{Device, DeviceChoice, NamedTensor, Weights, pytorch};
use burn::tensor::Tensor;
use burn::tensor::module::{batch_norm_train, conv_transpose2d, conv_transpose3d, conv2d, conv3d};
use burn::tensor::ops::{ConvOptions, ConvTransposeOptions};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Clone, Copy, PartialEq)]
enum Op {
    Conv,
    ConvTranspose,
    /// Training mode: the batch's own statistics.
    BatchNorm,
}

/// One layer: its geometry, as both burn and PyTorch are told it.
#[derive(Clone, Copy)]
struct Case {
    name: &'static str,
    dims: usize,
    op: Op,
    channels_in: usize,
    channels_out: usize,
    kernel: usize,
    stride: usize,
    /// Per spatial dimension, before and after; PyTorch gets an explicit pad when they differ.
    padding: (usize, usize),
    dilation: usize,
    groups: usize,
    size: usize,
    /// Added to the last spatial dimension's size, so that rows and columns differ.
    wider: usize,
    /// Batch items; fewer than the threads splits the products instead of the batch.
    batch: usize,
}

const CASES: &[Case] = &[
    // A U-Net block's convolution.
    Case {
        name: "conv2d_3x3",
        ..Case::CONV2D
    },
    // The output head.
    Case {
        name: "conv2d_1x1",
        channels_in: 8,
        channels_out: 3,
        kernel: 1,
        padding: (0, 0),
        ..Case::CONV2D
    },
    Case {
        name: "conv2d_stride2",
        channels_in: 3,
        channels_out: 5,
        stride: 2,
        size: 17,
        ..Case::CONV2D
    },
    Case {
        name: "conv2d_asymmetric",
        channels_in: 2,
        channels_out: 4,
        padding: (0, 1),
        size: 12,
        ..Case::CONV2D
    },
    Case {
        name: "conv2d_dilated_grouped",
        channels_out: 6,
        padding: (2, 2),
        dilation: 2,
        groups: 2,
        size: 14,
        ..Case::CONV2D
    },
    Case {
        name: "conv2d_dilated",
        channels_in: 3,
        channels_out: 4,
        padding: (2, 2),
        dilation: 2,
        size: 11,
        wider: 3,
        ..Case::CONV2D
    },
    // One batch item: the products, not the batch, are split between threads.
    Case {
        name: "conv2d_one_item_wide",
        size: 9,
        wider: 5,
        batch: 1,
        ..Case::CONV2D
    },
    Case {
        // burn's conv3d takes symmetric padding only.
        name: "conv3d_stride2",
        dims: 3,
        channels_in: 3,
        channels_out: 2,
        stride: 2,
        padding: (1, 1),
        size: 7,
        wider: 2,
        ..Case::CONV2D
    },
    Case {
        name: "conv3d_3x3x3",
        dims: 3,
        channels_in: 2,
        size: 8,
        ..Case::CONV2D
    },
    // A decoder's upsampling.
    Case {
        name: "conv_transpose2d_2x2",
        ..Case::UP2D
    },
    Case {
        name: "conv_transpose2d_3x3_padded",
        channels_in: 3,
        channels_out: 5,
        kernel: 3,
        padding: (1, 1),
        size: 7,
        ..Case::UP2D
    },
    Case {
        name: "conv_transpose2d_stride1",
        channels_in: 3,
        channels_out: 2,
        kernel: 3,
        stride: 1,
        padding: (1, 1),
        size: 6,
        wider: 2,
        ..Case::UP2D
    },
    Case {
        name: "conv_transpose3d_2x2x2",
        dims: 3,
        channels_in: 4,
        channels_out: 2,
        size: 4,
        ..Case::UP2D
    },
    Case {
        name: "batch_norm_2d",
        op: Op::BatchNorm,
        channels_in: 6,
        channels_out: 6,
        kernel: 1,
        padding: (0, 0),
        size: 9,
        ..Case::CONV2D
    },
    Case {
        name: "batch_norm_3d",
        op: Op::BatchNorm,
        dims: 3,
        channels_in: 4,
        channels_out: 4,
        kernel: 1,
        padding: (0, 0),
        size: 5,
        ..Case::CONV2D
    },
];

impl Case {
    /// A 3x3 convolution, as in a U-Net block.
    const CONV2D: Case = Case {
        name: "",
        dims: 2,
        op: Op::Conv,
        channels_in: 4,
        channels_out: 8,
        kernel: 3,
        stride: 1,
        padding: (1, 1),
        dilation: 1,
        groups: 1,
        size: 16,
        wider: 0,
        batch: 2,
    };

    /// A 2x2 transposed convolution of stride 2, as in a U-Net's decoder.
    const UP2D: Case = Case {
        name: "",
        dims: 2,
        op: Op::ConvTranspose,
        channels_in: 8,
        channels_out: 4,
        kernel: 2,
        stride: 2,
        padding: (0, 0),
        dilation: 1,
        groups: 1,
        size: 8,
        wider: 0,
        batch: 2,
    };

    fn weight_shape(&self) -> Vec<usize> {
        if self.op == Op::BatchNorm {
            return vec![self.channels_in];
        }
        let (first, second) = if self.op == Op::ConvTranspose {
            (self.channels_in, self.channels_out / self.groups)
        } else {
            (self.channels_out, self.channels_in / self.groups)
        };
        [vec![first, second], vec![self.kernel; self.dims]].concat()
    }

    /// Spatial sizes of the input.
    fn input_sizes(&self) -> Vec<usize> {
        let mut sizes = vec![self.size; self.dims];
        sizes[self.dims - 1] += self.wider;
        sizes
    }

    fn output_sizes(&self) -> Vec<usize> {
        let reach = self.dilation * (self.kernel - 1);
        let output = |size: usize| {
            if self.op == Op::ConvTranspose {
                (size - 1) * self.stride - 2 * self.padding.0 + reach + 1
            } else {
                (size + self.padding.0 + self.padding.1 - reach - 1) / self.stride + 1
            }
        };
        self.input_sizes().into_iter().map(output).collect()
    }

    /// Input, weight, bias and the output's cotangent, drawn from `seed`.
    fn inputs(&self, seed: u64) -> Weights {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut random = |shape: Vec<usize>| NamedTensor {
            values: (0..shape.iter().product())
                .map(|_| rng.random_range(-1.0..1.0))
                .collect(),
            shape,
        };
        let batch = self.batch;
        let mut weights = Weights::default();
        let tensors = &mut weights.tensors;
        tensors.insert(
            "x".into(),
            random([vec![batch, self.channels_in], self.input_sizes()].concat()),
        );
        tensors.insert("w".into(), random(self.weight_shape()));
        tensors.insert("b".into(), random(vec![self.channels_out]));
        tensors.insert(
            "g".into(),
            random([vec![batch, self.channels_out], self.output_sizes()].concat()),
        );
        weights
    }

    /// The gradients of sum(layer(x, w, b) * g) with respect to x, w and b, on `device`, and
    /// what the layer computed (`y`, and a batch norm's `mean` and `variance`).
    fn gradients(&self, inputs: &Weights, device: &Device) -> BTreeMap<String, Vec<f32>> {
        let device = device.clone().autodiff();
        match self.dims {
            2 => self.gradients_of::<4>(inputs, &device),
            3 => self.gradients_of::<5>(inputs, &device),
            dims => panic!("{}: {dims} spatial dimensions", self.name),
        }
    }

    fn gradients_of<const D: usize>(
        &self,
        inputs: &Weights,
        device: &Device,
    ) -> BTreeMap<String, Vec<f32>> {
        let x = tensor::<D>(&inputs.tensors["x"], device).require_grad();
        let b = tensor::<1>(&inputs.tensors["b"], device).require_grad();
        let g = tensor::<D>(&inputs.tensors["g"], device);
        let values = |t: Option<Vec<f32>>, what: &str| {
            t.unwrap_or_else(|| panic!("{}: no gradient for {what}", self.name))
        };
        let mut out = BTreeMap::new();
        let (y, w_grad, grads) = if self.op == Op::BatchNorm {
            let w = tensor::<1>(&inputs.tensors["w"], device).require_grad();
            let result = batch_norm_train(x.clone(), w.clone(), b.clone(), 1e-5);
            out.insert("mean".to_owned(), read(result.mean));
            out.insert("variance".to_owned(), read(result.variance));
            let grads = (result.output.clone() * g).sum().backward();
            (result.output, w.grad(&grads).map(read), grads)
        } else {
            let w = tensor::<D>(&inputs.tensors["w"], device).require_grad();
            let y = self.forward(x.clone(), w.clone(), b.clone());
            let grads = (y.clone() * g).sum().backward();
            (y, w.grad(&grads).map(read), grads)
        };
        out.insert("y".to_owned(), read(y));
        out.insert("x".to_owned(), values(x.grad(&grads).map(read), "x"));
        out.insert("w".to_owned(), values(w_grad, "w"));
        out.insert("b".to_owned(), values(b.grad(&grads).map(read), "b"));
        out
    }

    fn forward<const D: usize>(&self, x: Tensor<D>, w: Tensor<D>, b: Tensor<1>) -> Tensor<D> {
        // `Tensor<D>` is one type for every rank: the rank-specific op takes its own.
        let n = self.dims;
        let stride = self.stride;
        let dilation = self.dilation;
        if self.op == Op::ConvTranspose {
            let p = self.padding.0;
            match n {
                2 => reshape(conv_transpose2d(
                    reshape(x),
                    reshape(w),
                    Some(b),
                    ConvTransposeOptions::new([stride; 2], [p; 2], [0; 2], [dilation; 2], 1),
                )),
                _ => reshape(conv_transpose3d(
                    reshape(x),
                    reshape(w),
                    Some(b),
                    ConvTransposeOptions::new([stride; 3], [p; 3], [0; 3], [dilation; 3], 1),
                )),
            }
        } else {
            let p = self.padding;
            match n {
                2 => reshape(conv2d(
                    reshape(x),
                    reshape(w),
                    Some(b),
                    ConvOptions::new_with_padding([stride; 2], [p; 2], [dilation; 2], self.groups),
                )),
                _ => reshape(conv3d(
                    reshape(x),
                    reshape(w),
                    Some(b),
                    ConvOptions::new_with_padding([stride; 3], [p; 3], [dilation; 3], self.groups),
                )),
            }
        }
    }

    fn python_spec(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "dims": self.dims,
            "op": match self.op {
                Op::Conv => "conv",
                Op::ConvTranspose => "conv_transpose",
                Op::BatchNorm => "batch_norm",
            },
            "stride": self.stride,
            "padding": [self.padding.0, self.padding.1],
            "dilation": self.dilation,
            "groups": self.groups,
        })
    }
}

fn read<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap()
}

/// The same tensor as another rank (the ranks always agree at run time).
fn reshape<const A: usize, const B: usize>(t: Tensor<A>) -> Tensor<B> {
    let dims: [usize; B] = t.dims().to_vec().try_into().expect("same rank");
    t.reshape(dims)
}

/// Within `tolerance` of the largest reference value.
fn assert_within(
    case: &str,
    what: &str,
    ours: &[f32],
    theirs: &[f32],
    against: &str,
    tolerance: f32,
) {
    assert_eq!(ours.len(), theirs.len(), "{case} {what}: lengths");
    let scale = theirs.iter().fold(1f32, |m, v| m.max(v.abs()));
    let worst = ours
        .iter()
        .zip(theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        worst <= tolerance * scale,
        "{case}: {what} differs from {against}'s by {worst} (largest value {scale})"
    );
}

#[cfg(feature = "tch")]
fn libtorch() -> Device {
    let resolved = DeviceChoice::Cpu.resolve().unwrap();
    assert!(resolved.backend.contains("LibTorch"), "{resolved}");
    resolved.device
}

#[cfg(feature = "tch")]
#[test]
fn libtorch_gradients_equal_burn_flex_gradients() {
    let flex = DeviceChoice::Flex.resolve().unwrap().device;
    let libtorch = libtorch();
    for (seed, case) in CASES.iter().enumerate() {
        let inputs = case.inputs(seed as u64);
        let ours = case.gradients(&inputs, &libtorch);
        let reference = case.gradients(&inputs, &flex);
        for (what, values) in &ours {
            assert_within(case.name, what, values, &reference[what], "burn-flex", 1e-4);
        }
    }
}

/// Inference batch norm (running statistics, no autodiff), which both vendored backends run as
/// one pass: burn-flex against the formula, and LibTorch against burn-flex.
#[test]
fn inference_batch_norm_follows_the_formula_on_every_backend() {
    let flex = DeviceChoice::Flex.resolve().unwrap().device;
    let mut rng = StdRng::seed_from_u64(11);
    let channels = 5;
    let mut random = |shape: Vec<usize>, low: f32, high: f32| NamedTensor {
        values: (0..shape.iter().product())
            .map(|_| rng.random_range(low..high))
            .collect(),
        shape,
    };
    let x = random(vec![3, channels, 7, 6], -2.0, 2.0);
    let gamma = random(vec![channels], 0.5, 1.5);
    let beta = random(vec![channels], -0.5, 0.5);
    let mean = random(vec![channels], -0.3, 0.3);
    let variance = random(vec![channels], 0.2, 2.0);
    let on = |device: &Device| {
        read(burn::tensor::module::batch_norm(
            tensor::<4>(&x, device),
            tensor::<1>(&gamma, device),
            tensor::<1>(&beta, device),
            tensor::<1>(&mean, device),
            tensor::<1>(&variance, device),
            1e-5,
        ))
    };
    let run: usize = x.shape[2..].iter().product();
    let formula: Vec<f32> = (0..x.values.len())
        .map(|i| {
            let c = (i / run) % channels;
            let std = (f64::from(variance.values[c]) + 1e-5).sqrt();
            let normalised = (f64::from(x.values[i]) - f64::from(mean.values[c])) / std;
            (normalised * f64::from(gamma.values[c]) + f64::from(beta.values[c])) as f32
        })
        .collect();
    let ours = on(&flex);
    assert_within(
        "batch_norm_inference",
        "y",
        &ours,
        &formula,
        "the formula",
        1e-5,
    );
    #[cfg(feature = "tch")]
    assert_within(
        "batch_norm_inference",
        "y",
        &on(&libtorch()),
        &ours,
        "burn-flex",
        1e-4,
    );
}

const PYTORCH_GRADIENTS: &str = r#"
import json, sys
import torch
import torch.nn.functional as F
from alveolus_unet import read_safetensors, write_safetensors

case = json.loads(sys.argv[1])
tensors, _ = read_safetensors(sys.argv[2])
x, w, b = (tensors[k].clone().requires_grad_(True) for k in ("x", "w", "b"))
dims, stride, dilation, groups = case["dims"], case["stride"], case["dilation"], case["groups"]
before, after = case["padding"]
out = {}
if case["op"] == "batch_norm":
    y = F.batch_norm(x, None, None, w, b, training=True, eps=1e-5)
    reduced = [d for d in range(x.dim()) if d != 1]
    out["variance"], out["mean"] = torch.var_mean(x.detach(), dim=reduced, correction=0)
elif case["op"] == "conv_transpose":
    op = F.conv_transpose2d if dims == 2 else F.conv_transpose3d
    y = op(x, w, b, stride=stride, padding=before, groups=groups, dilation=dilation)
else:
    op = F.conv2d if dims == 2 else F.conv3d
    if before == after:
        y = op(x, w, b, stride=stride, padding=before, dilation=dilation, groups=groups)
    else:
        y = op(F.pad(x, [before, after] * dims), w, b, stride=stride, dilation=dilation, groups=groups)
(y * tensors["g"]).sum().backward()
write_safetensors(sys.argv[3], {"y": y, "x": x.grad, "w": w.grad, "b": b.grad, **out})
"#;

fn slow_tests() -> bool {
    std::env::var("ALVEOLUS_SLOW_TESTS").is_ok_and(|v| v == "1")
}

#[test]
fn burn_flex_gradients_equal_pytorch_autograd() {
    let flex = DeviceChoice::Flex.resolve().unwrap().device;
    compare_with_pytorch(&flex, "burn-flex", 1e-4);
}

#[cfg(feature = "tch")]
#[test]
fn libtorch_gradients_equal_pytorch_autograd() {
    compare_with_pytorch(&libtorch(), "LibTorch CPU", 1e-4);
}

/// On a CUDA machine (`scripts/gpu-check` runs this binary there), cuDNN's kernels against
/// PyTorch's on the CPU. cuDNN convolutions run in TF32 by default, in LibTorch as in
/// PyTorch (10-bit mantissas), hence the looser tolerance.
#[cfg(feature = "tch")]
#[test]
fn libtorch_cuda_gradients_equal_pytorch_autograd() {
    match DeviceChoice::Cuda(0).resolve() {
        Ok(cuda) => compare_with_pytorch(&cuda.device, "LibTorch CUDA", 5e-3),
        Err(err) => eprintln!("skipped: no CUDA device ({err})"),
    }
}

fn compare_with_pytorch(device: &Device, ours_name: &str, tolerance: f32) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let python = pytorch::python(root);
    let has_torch = Command::new(&python)
        .args(["-c", "import torch"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_torch {
        assert!(
            !slow_tests(),
            "{} cannot import torch: run scripts/python-env or set ALVEOLUS_PYTHON",
            python.display()
        );
        eprintln!("skipped: {} cannot import torch", python.display());
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    pytorch::write_scripts(dir.path()).unwrap();
    let script = dir.path().join("gradients.py");
    std::fs::write(&script, PYTORCH_GRADIENTS).unwrap();
    for (seed, case) in CASES.iter().enumerate() {
        let inputs = case.inputs(seed as u64);
        let input_path = dir.path().join(format!("{}.safetensors", case.name));
        std::fs::write(&input_path, inputs.encode()).unwrap();
        let output_path = dir.path().join(format!("{}-grads.safetensors", case.name));
        let run = Command::new(&python)
            .arg(&script)
            .arg(case.python_spec().to_string())
            .args([&input_path, &output_path])
            .output()
            .unwrap();
        assert!(
            run.status.success(),
            "{}: PyTorch failed:\n{}",
            case.name,
            String::from_utf8_lossy(&run.stderr)
        );
        let theirs = Weights::decode(&std::fs::read(&output_path).unwrap()).unwrap();
        let ours = case.gradients(&inputs, device);
        for (what, values) in &ours {
            let reference = &theirs.tensors[what.as_str()];
            let case = format!("{} on {ours_name}", case.name);
            assert_within(&case, what, values, &reference.values, "PyTorch", tolerance);
        }
    }
}
