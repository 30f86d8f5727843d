//! Mixed precision as a run configures it: the number format of the sites' convolutions.

use serde::{Deserialize, Serialize};

use super::{DomainError, invalid};
use crate::pb;

/// What local training computes its convolutions in (mixed precision, as PyTorch's autocast):
/// the loss, normalisation statistics, optimizer state and the weights stay f32.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    /// bfloat16: f32's range with 8 bits of mantissa; needs no loss scaling.
    Bf16,
    /// IEEE half: 11 bits of mantissa but a range that small gradients fall out of, so the
    /// loss is scaled up before the backward pass and the gradients down after it.
    F16,
}

impl Precision {
    pub const ALL: [Self; 3] = [Self::F32, Self::Bf16, Self::F16];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("`{s}` is not a precision: use f32, bf16 or f16"))
    }
}

impl From<Precision> for pb::Precision {
    fn from(p: Precision) -> Self {
        match p {
            Precision::F32 => Self::F32,
            Precision::Bf16 => Self::Bf16,
            Precision::F16 => Self::F16,
        }
    }
}

impl TryFrom<i32> for Precision {
    type Error = DomainError;
    /// From the wire's enum number; one this build does not know is refused, not read as f32.
    fn try_from(value: i32) -> Result<Self, DomainError> {
        match pb::Precision::try_from(value) {
            Ok(pb::Precision::F32) => Ok(Self::F32),
            Ok(pb::Precision::Bf16) => Ok(Self::Bf16),
            Ok(pb::Precision::F16) => Ok(Self::F16),
            Err(_) => Err(invalid(
                "training.precision",
                format!("unknown precision {value}"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::TrainingConfig;

    #[test]
    fn precision_travels_reads_from_json_and_refuses_what_it_does_not_know() {
        for precision in Precision::ALL {
            let c = TrainingConfig {
                precision,
                ..TrainingConfig::default()
            };
            let back = TrainingConfig::try_from(pb::TrainingConfig::from(c.clone())).unwrap();
            assert_eq!(back, c);
            assert_eq!(precision.as_str().parse::<Precision>(), Ok(precision));
        }
        let json = r#"{"local_epochs":1,"learning_rate":0.001,"batch_size":2,"seed":0,"precision":"bf16"}"#;
        let read: TrainingConfig = serde_json::from_str(json).unwrap();
        assert_eq!(read.precision, Precision::Bf16);
        let older = r#"{"local_epochs":1,"learning_rate":0.001,"batch_size":2,"seed":0}"#;
        let read: TrainingConfig = serde_json::from_str(older).unwrap();
        assert_eq!(
            read.precision,
            Precision::F32,
            "configs from before precision train at f32"
        );
        let err = "fp8".parse::<Precision>().unwrap_err();
        assert!(err.contains("f32, bf16 or f16"), "{err}");
        // A newer peer's precision is refused by name, not trained at f32 without a word.
        let mut newer = pb::TrainingConfig::from(TrainingConfig::default());
        newer.precision = 7;
        assert!(matches!(
            TrainingConfig::try_from(newer),
            Err(DomainError::Invalid {
                field: "training.precision",
                ..
            })
        ));
    }
}
