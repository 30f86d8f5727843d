//! Progress of long local training on the terminal: a bar per epoch when stderr is a terminal,
//! one line per epoch always.

use std::io::{IsTerminal, Write};
use std::time::Instant;

use alveolus_models::Progress;

pub struct TrainingProgress {
    epochs: u32,
    epoch_started: Instant,
    /// Draw the step bar only where it can be redrawn in place.
    terminal: bool,
}

impl TrainingProgress {
    pub fn new(epochs: u32) -> Self {
        Self {
            epochs,
            epoch_started: Instant::now(),
            terminal: std::io::stderr().is_terminal(),
        }
    }

    pub fn update(&mut self, progress: Progress) {
        match progress {
            Progress::Step {
                epoch,
                step,
                steps,
                loss,
            } if self.terminal => {
                let width = 24;
                let done = step * width / steps.max(1);
                eprint!(
                    "\r\x1b[Kepoch {epoch}/{} [{}{}] {step}/{steps} batches  loss {loss:.4}",
                    self.epochs,
                    "#".repeat(done),
                    ".".repeat(width - done)
                );
                let _ = std::io::stderr().flush();
            }
            Progress::Step { .. } => {}
            Progress::Epoch { epoch, loss } => {
                if self.terminal {
                    eprint!("\r\x1b[K");
                }
                println!(
                    "epoch {epoch:>3}/{}  loss {loss:.4}  {:.1} s",
                    self.epochs,
                    self.epoch_started.elapsed().as_secs_f64()
                );
                self.epoch_started = Instant::now();
            }
        }
    }
}
