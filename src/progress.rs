//! Progress on the terminal: of long local training (a bar per epoch when stderr is a terminal,
//! one line per epoch always) and of long downloads (a bar when stderr is a terminal).

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

/// Progress of a long download on the terminal: a bar redrawn in place, only when stderr is a
/// terminal (a log or a pipe gets the final line alone).
pub struct TransferProgress {
    what: &'static str,
    started: Instant,
    terminal: bool,
    /// Percent last drawn: the bar is redrawn when it moves, not for every chunk.
    drawn: Option<u64>,
}

impl TransferProgress {
    pub fn new(what: &'static str) -> Self {
        Self {
            what,
            started: Instant::now(),
            terminal: std::io::stderr().is_terminal(),
            drawn: None,
        }
    }

    pub fn update(&mut self, received: u64, total: u64) {
        if !self.terminal {
            return;
        }
        let percent = received * 100 / total.max(1);
        if self.drawn == Some(percent) {
            return;
        }
        self.drawn = Some(percent);
        eprint!(
            "\r\x1b[K{}",
            transfer_line(self.what, received, total, self.started.elapsed())
        );
        let _ = std::io::stderr().flush();
    }

    /// Clears the bar before the command prints its result.
    pub fn finish(&self) {
        if self.terminal && self.drawn.is_some() {
            eprint!("\r\x1b[K");
        }
    }
}

/// `model [########............]  3.1 / 7.4 MB  42%  5.2 MB/s`.
fn transfer_line(what: &str, received: u64, total: u64, elapsed: std::time::Duration) -> String {
    let width = 20u64;
    let done = (received.min(total) * width / total.max(1)) as usize;
    let seconds = elapsed.as_secs_f64().max(1e-3);
    format!(
        "{what} [{}{}] {:>5.1} / {:.1} MB  {:>3}%  {:.1} MB/s",
        "#".repeat(done),
        ".".repeat(width as usize - done),
        received as f64 / 1e6,
        total as f64 / 1e6,
        received * 100 / total.max(1),
        received as f64 / 1e6 / seconds
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_transfer_line_shows_the_share_received_and_the_rate() {
        let line = transfer_line("model", 3_700_000, 7_400_000, Duration::from_secs(2));
        assert_eq!(
            line,
            "model [##########..........]   3.7 / 7.4 MB   50%  1.9 MB/s"
        );
        let done = transfer_line("model", 10, 10, Duration::ZERO);
        assert!(done.contains("[####################]") && done.contains("100%"));
        // An empty model is done, not a division by zero.
        assert!(transfer_line("model", 0, 0, Duration::ZERO).contains("0%"));
    }
}
