//! Progress of long loops, drawn as a text bar in the log (so it reads the same in a
//! terminal, a CI log and a run directory's log file):
//! `train [#######.............] 12/40  30%  9.8 s/it  ETA 4m35s`.
//! Lines are rate-limited (at most one every `interval`, and always the last).

use std::time::{Duration, Instant};

/// A progress bar over `total` units of work.
#[derive(Debug)]
pub struct Progress {
    label: String,
    total: usize,
    done: usize,
    started: Instant,
    last: Option<Instant>,
    interval: Duration,
    base: usize,
}

const WIDTH: usize = 20;

fn duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

impl Progress {
    /// A bar at `done` of `total` (a resumed loop starts where it stopped).
    pub fn new(label: impl Into<String>, done: usize, total: usize) -> Self {
        Self {
            label: label.into(),
            total,
            done,
            started: Instant::now(),
            last: None,
            interval: Duration::from_secs(2),
            base: done,
        }
    }

    /// The bar's text at the current position.
    pub fn line(&self) -> String {
        let frac = if self.total == 0 {
            1.0
        } else {
            self.done as f64 / self.total as f64
        };
        let filled = ((frac * WIDTH as f64).round() as usize).min(WIDTH);
        let bar: String = "#".repeat(filled) + &".".repeat(WIDTH - filled);
        let since = self.done.saturating_sub(self.base);
        let elapsed = self.started.elapsed().as_secs_f64();
        let timing = if since > 0 {
            let per = elapsed / since as f64;
            format!(
                "  {per:.2} s/it  ETA {}",
                duration(per * self.total.saturating_sub(self.done) as f64)
            )
        } else {
            String::new()
        };
        format!(
            "{} [{bar}] {}/{} {:>3.0}%{timing}",
            self.label,
            self.done,
            self.total,
            frac * 100.0
        )
    }

    /// Advances by `n` and logs the bar when due; `note` is appended.
    pub fn inc(&mut self, n: usize, note: &str) {
        self.done = (self.done + n).min(self.total.max(self.done + n));
        let due = self.last.is_none_or(|t| t.elapsed() >= self.interval) || self.done >= self.total;
        if due {
            self.last = Some(Instant::now());
            if note.is_empty() {
                tracing::info!("{}", self.line());
            } else {
                tracing::info!("{}  {note}", self.line());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_shows_position_and_share() {
        let mut p = Progress::new("train", 0, 40);
        assert!(
            p.line()
                .starts_with("train [....................] 0/40   0%")
        );
        p.inc(12, "");
        assert!(
            p.line().contains("[######..............] 12/40  30%"),
            "{}",
            p.line()
        );
        assert!(p.line().contains("ETA"));
        assert_eq!(duration(275.0), "4m35s");
        assert_eq!(duration(7300.0), "2h01m");
    }
}
