//! Which burn backend and device the work runs on, chosen at run time.
//!
//! Every build has burn-flex, the pure-Rust CPU backend. A build with the `tch` feature also
//! has LibTorch (burn-tch) for CPU and CUDA; there `cpu` means LibTorch's CPU kernels, which are
//! faster than burn-flex's, and `flex` still picks burn-flex.

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;

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
}
