//! Which burn backend and device the work runs on, chosen at run time.

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;

/// A `--device` choice: `cpu` or `cuda[:N]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    #[default]
    Cpu,
    Cuda(usize),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceError {
    #[error("`{0}` is not a device: use cpu, cuda or cuda:N")]
    Parse(String),
    #[error(
        "device {0} needs a build with the `tch` feature (LibTorch); this build has only the CPU backend"
    )]
    Unavailable(DeviceChoice),
}

impl FromStr for DeviceChoice {
    type Err = DeviceError;
    fn from_str(s: &str) -> Result<Self, DeviceError> {
        match s {
            "cpu" => Ok(Self::Cpu),
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
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceChoice {
    /// The burn device, and a line naming backend and device for logs.
    pub fn resolve(self) -> Result<(Device, String), DeviceError> {
        match self {
            Self::Cpu => Ok((
                Device::flex(),
                "burn-flex (pure-Rust CPU backend) on cpu".into(),
            )),
            Self::Cuda(_) => Err(DeviceError::Unavailable(self)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_flags() {
        assert_eq!("cpu".parse(), Ok(DeviceChoice::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceChoice::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceChoice::Cuda(3)));
        assert!("gpu".parse::<DeviceChoice>().is_err());
        assert!("cuda:x".parse::<DeviceChoice>().is_err());
    }
}
