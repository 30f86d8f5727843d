//! Which burn backend and device the work runs on, chosen at run time.
//!
//! Every build has burn-flex, the pure-Rust CPU backend. A build with the `tch` feature also
//! has LibTorch (burn-tch) for CPU and CUDA; there `cpu` means LibTorch's CPU kernels, which are
//! faster than burn-flex's, and `flex` still picks burn-flex.

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;

use crate::precision::Precision;

/// A `--device` choice: `cpu`, `cuda[:N]`, or `flex` to insist on burn-flex.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    #[default]
    Cpu,
    Flex,
    Cuda(usize),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceError {
    #[error("`{0}` is not a device: use cpu, cuda, cuda:N or flex")]
    Parse(String),
    #[error(
        "device {0} needs a build with the `tch` feature (LibTorch); this build has only the CPU backend burn-flex"
    )]
    Unavailable(DeviceChoice),
    #[error("device {choice} not found: LibTorch sees {count} CUDA device(s)")]
    NoSuchGpu { choice: DeviceChoice, count: usize },
}

impl FromStr for DeviceChoice {
    type Err = DeviceError;
    fn from_str(s: &str) -> Result<Self, DeviceError> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "flex" => Ok(Self::Flex),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| DeviceError::Parse(s.to_string())),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Flex => f.write_str("flex"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// A resolved device with the words that name it in logs and reports.
#[derive(Debug, Clone)]
pub struct ResolvedDevice {
    pub device: Device,
    /// `burn-flex`, `burn-tch (LibTorch 2.11.0)`.
    pub backend: String,
    /// `cpu`, `cuda:0`.
    pub name: String,
}

impl fmt::Display for ResolvedDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} on {}", self.backend, self.name)
    }
}

impl ResolvedDevice {
    /// What a user should know before training at `precision` here, if anything: burn-flex
    /// rounds to half precision as a GPU would but multiplies in f32, so there mixed precision
    /// costs casts and buys nothing.
    pub fn precision_caution(&self, precision: Precision) -> Option<String> {
        (precision != Precision::F32 && self.device == Device::flex()).then(|| {
            format!(
                "{precision} on burn-flex rounds the convolutions as a GPU would but computes them in f32: slower than f32 here, useful only to see its effect on the model; it pays on a GPU"
            )
        })
    }
}

/// The CPU backend every build has.
pub fn flex() -> ResolvedDevice {
    ResolvedDevice {
        device: Device::flex(),
        backend: "burn-flex (pure Rust)".into(),
        name: "cpu".into(),
    }
}

impl DeviceChoice {
    /// The burn device for this choice, or why this build or machine can't provide it.
    pub fn resolve(self) -> Result<ResolvedDevice, DeviceError> {
        match self {
            Self::Flex => Ok(flex()),
            #[cfg(not(feature = "tch"))]
            Self::Cpu => Ok(flex()),
            #[cfg(not(feature = "tch"))]
            Self::Cuda(_) => Err(DeviceError::Unavailable(self)),
            #[cfg(feature = "tch")]
            Self::Cpu => Ok(libtorch::cpu()),
            #[cfg(feature = "tch")]
            Self::Cuda(index) => libtorch::cuda(self, index),
        }
    }

    /// Every device this build and machine can train on, for benchmarks: burn-flex, and with
    /// `tch` LibTorch's CPU and the first CUDA device when there is one.
    pub fn available() -> Vec<DeviceChoice> {
        let mut choices = vec![Self::Flex];
        if cfg!(feature = "tch") {
            choices.push(Self::Cpu);
            if Self::Cuda(0).resolve().is_ok() {
                choices.push(Self::Cuda(0));
            }
        }
        choices
    }
}

/// Limits the CPU threads the backends use, where they allow it at run time. burn-flex's pool
/// is sized once per process from `RAYON_NUM_THREADS`, so callers set that before any tensor
/// work.
pub fn set_cpu_threads(threads: usize) {
    #[cfg(feature = "tch")]
    libtorch::set_threads(threads);
    #[cfg(not(feature = "tch"))]
    let _ = threads;
}

/// Has glibc keep the memory a training or inference process frees, for the next step to reuse.
/// Call before any thread starts (mallopt is not thread-safe); [`release_held_memory`] hands it
/// back when the work pauses.
///
/// By default glibc serves large buffers (a `default` activation is 32 MiB at batch 8) with
/// mmaps of their own or from per-thread heaps, and hands them back to the system as soon as
/// they are freed; each step then faults its activations in afresh, page by page. Serving them
/// from one heap and trimming it only on request took a burn-flex `default` step from 1.85 to
/// 2.09 s to 1.66 s on 2 threads (2026-12-04; README, Benchmark), for 5% more peak memory.
pub fn hold_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; the caller runs it before other
    // threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        // One arena: glibc hands back the free top of its main heap on request, never that of
        // a thread's (`malloc_trim` leaves those), and a step's few large allocations do not
        // contend.
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Hands back to the system what [`hold_freed_memory`] kept: an agent calls it after each
/// round, so that it waits for the next one at its resting size, not its training peak.
pub fn release_held_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim is thread-safe and frees only memory no allocation holds.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(feature = "tch")]
#[allow(deprecated)] // burn marks burn-tch deprecated in favour of CubeCL, which can't be built offline.
mod libtorch {
    use super::*;

    fn backend() -> String {
        "burn-tch (LibTorch)".into()
    }

    pub fn cpu() -> ResolvedDevice {
        ResolvedDevice {
            device: Device::libtorch(),
            backend: backend(),
            name: "cpu".into(),
        }
    }

    pub fn cuda(choice: DeviceChoice, index: usize) -> Result<ResolvedDevice, DeviceError> {
        // Asked before burn-tch touches the device: it panics on a missing GPU.
        let count = usize::try_from(tch::Cuda::device_count()).unwrap_or(0);
        if index >= count {
            return Err(DeviceError::NoSuchGpu { choice, count });
        }
        Ok(ResolvedDevice {
            device: Device::libtorch_cuda(index),
            backend: backend(),
            name: format!("cuda:{index}"),
        })
    }

    pub fn set_threads(threads: usize) {
        tch::set_num_threads(i32::try_from(threads).unwrap_or(i32::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_flags() {
        assert_eq!("cpu".parse(), Ok(DeviceChoice::Cpu));
        assert_eq!("flex".parse(), Ok(DeviceChoice::Flex));
        assert_eq!("cuda".parse(), Ok(DeviceChoice::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceChoice::Cuda(3)));
        assert!("gpu".parse::<DeviceChoice>().is_err());
        assert!("cuda:x".parse::<DeviceChoice>().is_err());
    }

    #[test]
    fn a_missing_gpu_is_an_error_not_a_panic() {
        let err = DeviceChoice::Cuda(7).resolve().unwrap_err();
        if cfg!(feature = "tch") {
            assert!(matches!(err, DeviceError::NoSuchGpu { .. }), "{err}");
        } else {
            assert_eq!(err, DeviceError::Unavailable(DeviceChoice::Cuda(7)));
        }
        assert!(DeviceChoice::Cpu.resolve().is_ok());
    }

    /// This process's resident memory, in MiB.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn resident_mib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
            / 1024
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn freed_buffers_stay_until_released() {
        hold_freed_memory();
        // The test harness's thread took an arena of its own before the settings existed; a
        // thread started now shares the main one, as every thread of the binary does (it
        // calls `hold_freed_memory` before starting any).
        std::thread::spawn(hold_and_release).join().unwrap();
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn hold_and_release() {
        let before = resident_mib();
        // Activation-sized buffers (a `default` layer at batch 8 is 32 MiB), written so that
        // their pages are resident.
        let buffers: Vec<Vec<u8>> = (0..2)
            .map(|_| std::hint::black_box(vec![1u8; 30 << 20]))
            .collect();
        drop(buffers);
        let held = resident_mib();
        assert!(
            held >= before + 50,
            "the freed 60 MiB went back to the system: {before} -> {held} MiB"
        );
        release_held_memory();
        let released = resident_mib();
        assert!(
            released + 50 <= held,
            "release kept them: {held} -> {released} MiB"
        );
    }

    #[test]
    fn half_precision_on_burn_flex_comes_with_a_caution() {
        let flex = DeviceChoice::Flex.resolve().unwrap();
        assert_eq!(flex.precision_caution(Precision::F32), None);
        let caution = flex.precision_caution(Precision::Bf16).unwrap();
        assert!(caution.contains("slower than f32 here"), "{caution}");
    }
}
