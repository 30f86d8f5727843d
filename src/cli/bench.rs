//! `bench train|segment|secagg|soak`: our costs against a named peer measured in the same run, and
//! a long run's resources.

use anyhow::Result;
use clap::Subcommand;

use crate::{bench, secagg_bench, segment_bench, soak_bench};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// What secure aggregation costs against aggregation in the clear.
    Secagg(secagg_bench::SecAggBenchOptions),
    /// A training step on each backend against PyTorch's.
    Train(bench::BenchOptions),
    /// Segment a synthetic chest CT series (wall time, planes per second, peak memory), and time
    /// the model's inference over its planes against PyTorch's over the same planes.
    Segment(segment_bench::SegmentBenchOptions),
    /// One long run through a coordinator: memory, descriptors and tasks sampled every few
    /// rounds must stay flat.
    Soak(soak_bench::SoakOptions),
}

pub async fn bench_command(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Secagg(options) => secagg_bench::run(options).await,
        BenchCommand::Soak(options) => soak_bench::run(options).await,
        BenchCommand::Train(options) => {
            tokio::task::spawn_blocking(move || bench::run(options)).await?
        }
        BenchCommand::Segment(options) => {
            tokio::task::spawn_blocking(move || segment_bench::run(options)).await?
        }
    }
}
