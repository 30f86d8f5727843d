//! The server optimizer's step (Reddi et al. 2021, Algorithm 2; FedAvgM after Hsu et al. 2019):
//! the round's aggregate minus its model is a pseudo-gradient Δ, and the next model is the
//! round's model plus a step along Δ shaped by moments kept from round to round.
//!
//! Only learned parameters take the step. A batch norm's running mean and variance are no
//! parameters: the sites estimate them from their data, and the round's aggregate (their
//! average) is the next model's, as under FedAvg. Stepped, they would crawl from their initial
//! 0 and 1 by at most the server learning rate a round, and every evaluation would normalise
//! with statistics that are not the data's.
//!
//! The moments are kept in f32, as the model is, and every step uses them as stored, so that a
//! coordinator that restarts and reads them back takes exactly the steps it would have taken.

use alveolus_proto::domain::{ServerOptimizer, ServerOptimizerKind};
use alveolus_proto::weights::{Tensor, Weights, is_buffer};

/// First and second moments, one value per model value, named like the model's tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct Moments {
    pub m: Weights,
    pub v: Weights,
}

const M: &str = "m/";
const V: &str = "v/";

impl Moments {
    /// m = 0 and v = τ² (the paper's v₋₁ ≥ τ²), shaped like `model`.
    pub fn initial(model: &Weights, optimizer: &ServerOptimizer) -> Self {
        let filled = |value: f32| Weights {
            tensors: model
                .tensors
                .iter()
                .map(|(name, t)| {
                    (
                        name.clone(),
                        Tensor {
                            shape: t.shape.clone(),
                            values: vec![value; t.values.len()],
                        },
                    )
                })
                .collect(),
            metadata: Default::default(),
        };
        Self {
            m: filled(0.0),
            v: filled((optimizer.tau * optimizer.tau) as f32),
        }
    }

    /// One safetensors file: `m/NAME` and `v/NAME` for each tensor.
    pub fn encode(&self) -> bytes::Bytes {
        let mut all = Weights::default();
        for (prefix, moment) in [(M, &self.m), (V, &self.v)] {
            for (name, tensor) in &moment.tensors {
                all.tensors
                    .insert(format!("{prefix}{name}"), tensor.clone());
            }
        }
        all.encode()
    }

    /// Reads what [`Moments::encode`] wrote, checked against `model`'s tensors and shapes.
    pub fn decode(bytes: &[u8], model: &Weights) -> Result<Self, String> {
        let mut all = Weights::decode(bytes).map_err(|e| e.to_string())?;
        let mut take = |prefix: &str| -> Result<Weights, String> {
            let mut moment = Weights::default();
            for (name, tensor) in &model.tensors {
                let stored = all
                    .tensors
                    .remove(&format!("{prefix}{name}"))
                    .ok_or_else(|| format!("no {prefix}{name}"))?;
                if stored.shape != tensor.shape {
                    return Err(format!(
                        "{prefix}{name} has shape {:?}, the model {:?}",
                        stored.shape, tensor.shape
                    ));
                }
                moment.tensors.insert(name.clone(), stored);
            }
            Ok(moment)
        };
        let (m, v) = (take(M)?, take(V)?);
        if let Some(extra) = all.tensors.keys().next() {
            return Err(format!("{extra} is no tensor of the model"));
        }
        Ok(Self { m, v })
    }
}

/// The next model from the round's `base` and its `aggregate` (same tensors), and the moments
/// after this round.
pub fn step(
    optimizer: &ServerOptimizer,
    base: &Weights,
    aggregate: &Weights,
    moments: Moments,
) -> (Weights, Moments) {
    let ServerOptimizer {
        kind,
        learning_rate: eta,
        beta1: b1,
        beta2: b2,
        tau,
    } = *optimizer;
    let Moments { mut m, mut v } = moments;
    let mut next = base.clone();
    for (name, tensor) in next.tensors.iter_mut() {
        let after = &aggregate.tensors[name].values;
        if is_buffer(name) {
            tensor.values.clone_from(after);
            continue;
        }
        let (ms, vs) = (
            &mut m
                .tensors
                .get_mut(name)
                .expect("moments match the model")
                .values,
            &mut v
                .tensors
                .get_mut(name)
                .expect("moments match the model")
                .values,
        );
        for (i, x) in tensor.values.iter_mut().enumerate() {
            let delta = f64::from(after[i]) - f64::from(*x);
            let squared = delta * delta;
            let (m_old, v_old) = (f64::from(ms[i]), f64::from(vs[i]));
            // Stored as f32 first, and the step taken with the stored values.
            ms[i] = match kind {
                ServerOptimizerKind::FedAvgM => b1 * m_old + delta,
                _ => b1 * m_old + (1.0 - b1) * delta,
            } as f32;
            vs[i] = match kind {
                ServerOptimizerKind::FedAvgM => v_old,
                ServerOptimizerKind::FedAdagrad => v_old + squared,
                ServerOptimizerKind::FedAdam => b2 * v_old + (1.0 - b2) * squared,
                ServerOptimizerKind::FedYogi => {
                    v_old - (1.0 - b2) * squared * sign(v_old - squared)
                }
            } as f32;
            let (m_new, v_new) = (f64::from(ms[i]), f64::from(vs[i]));
            let update = if kind.adaptive() {
                eta * m_new / (v_new.max(0.0).sqrt() + tau)
            } else {
                eta * m_new
            };
            *x = (f64::from(*x) + update) as f32;
        }
    }
    (next, Moments { m, v })
}

/// sign(x) with sign(0) = 0, as Yogi uses it.
fn sign(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(values: &[f32]) -> Weights {
        let mut w = Weights::default();
        w.tensors.insert(
            "w".into(),
            Tensor {
                shape: vec![values.len()],
                values: values.to_vec(),
            },
        );
        w
    }

    /// Two rounds of each optimizer worked out by hand from the paper's formulas, with Δ = 1
    /// then Δ = −2 on one coordinate.
    #[test]
    fn two_steps_of_each_optimizer_follow_the_formulas() {
        let (eta, b1, b2, tau) = (0.5, 0.9, 0.99, 0.1);
        let rounds = [(0.0f32, 1.0f32), (0.0, -2.0)];
        let expect = |kind: ServerOptimizerKind| -> Vec<f64> {
            let (mut x, mut m, mut v) = (0.0f64, 0.0f64, tau * tau);
            let mut out = Vec::new();
            for (_, d) in rounds {
                let d = f64::from(d);
                m = if kind == ServerOptimizerKind::FedAvgM {
                    b1 * m + d
                } else {
                    b1 * m + (1.0 - b1) * d
                };
                v = match kind {
                    ServerOptimizerKind::FedAvgM => v,
                    ServerOptimizerKind::FedAdagrad => v + d * d,
                    ServerOptimizerKind::FedAdam => b2 * v + (1.0 - b2) * d * d,
                    ServerOptimizerKind::FedYogi => v - (1.0 - b2) * d * d * (v - d * d).signum(),
                };
                x += if kind.adaptive() {
                    eta * m / (v.sqrt() + tau)
                } else {
                    eta * m
                };
                out.push(x);
            }
            out
        };
        for kind in [
            ServerOptimizerKind::FedAvgM,
            ServerOptimizerKind::FedAdagrad,
            ServerOptimizerKind::FedAdam,
            ServerOptimizerKind::FedYogi,
        ] {
            let optimizer = ServerOptimizer {
                kind,
                learning_rate: eta,
                beta1: b1,
                beta2: b2,
                tau,
            };
            let mut model = one(&[0.0]);
            let mut moments = Moments::initial(&model, &optimizer);
            for (round, want) in expect(kind).into_iter().enumerate() {
                let delta = rounds[round].1;
                let aggregate = one(&[model.tensors["w"].values[0] + delta]);
                // Through the file, as a restarted coordinator reads them.
                let bytes = moments.encode();
                moments = Moments::decode(&bytes, &model).unwrap();
                (model, moments) = step(&optimizer, &model, &aggregate, moments);
                let got = f64::from(model.tensors["w"].values[0]);
                assert!(
                    (got - want).abs() < 1e-6 * want.abs().max(1.0),
                    "{kind:?} round {}: {got} != {want}",
                    round + 1
                );
            }
        }
    }

    /// A batch norm's statistics take the aggregate whatever the optimizer, and keep their
    /// moments at the start; the layer's scale beside them takes the step.
    #[test]
    fn normalisation_statistics_take_the_aggregate() {
        let optimizer = ServerOptimizer::with_defaults(ServerOptimizerKind::FedAdam);
        let tensor = |value: f32| Tensor {
            shape: vec![1],
            values: vec![value],
        };
        let model = |mean: f32, var: f32, scale: f32| {
            let mut w = Weights::default();
            w.tensors
                .insert("enc.norm1.running_mean".into(), tensor(mean));
            w.tensors
                .insert("enc.norm1.running_var".into(), tensor(var));
            w.tensors.insert("enc.norm1.weight".into(), tensor(scale));
            w
        };
        let base = model(0.0, 1.0, 1.0);
        let moments = Moments::initial(&base, &optimizer);
        let (next, after) = step(&optimizer, &base, &model(-0.4, 30.0, 1.5), moments.clone());
        assert_eq!(next.tensors["enc.norm1.running_mean"].values, [-0.4]);
        assert_eq!(next.tensors["enc.norm1.running_var"].values, [30.0]);
        for name in ["enc.norm1.running_mean", "enc.norm1.running_var"] {
            assert_eq!(after.m.tensors[name], moments.m.tensors[name], "{name}");
            assert_eq!(after.v.tensors[name], moments.v.tensors[name], "{name}");
        }
        // Adam's first step moves a parameter by about the learning rate, not to the aggregate.
        let scale = next.tensors["enc.norm1.weight"].values[0];
        assert!((scale - 1.01).abs() < 1e-3, "{scale}");
    }

    #[test]
    fn moments_that_do_not_fit_the_model_are_refused() {
        let optimizer =
            ServerOptimizer::with_defaults(alveolus_proto::domain::ServerOptimizerKind::FedAdam);
        let bytes = Moments::initial(&one(&[0.0, 1.0]), &optimizer).encode();
        assert!(Moments::decode(&bytes, &one(&[0.0, 1.0])).is_ok());
        let e = Moments::decode(&bytes, &one(&[0.0])).unwrap_err();
        assert!(e.contains("shape"), "{e}");
        let mut other = one(&[0.0, 1.0]);
        other.tensors.insert("b".into(), other.tensors["w"].clone());
        assert!(
            Moments::decode(&bytes, &other)
                .unwrap_err()
                .contains("no m/b")
        );
        assert!(Moments::decode(b"not safetensors", &other).is_err());
    }
}
