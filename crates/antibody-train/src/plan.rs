//! The run as a list of events, fixed by the configuration before training starts: a
//! checkpoint's cursor is an index into it, so a resumed run continues exactly where the
//! interrupted one stopped.

use serde::{Deserialize, Serialize};

use crate::config::{LrScope, ScheduleKind, TrainConfig};

/// One unit of work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Measure `A_pre` on the harmful prompt sample.
    Baseline {
        /// Cycle (mixed: refresh window).
        cycle: usize,
    },
    /// One optimizer step on harmful batch `k` of the run.
    Harmful {
        /// Cycle (mixed: refresh window).
        cycle: usize,
        /// Index among the run's harmful steps.
        k: usize,
    },
    /// Measure `A_post`, select canaries by drift, measure `A_target`; report.
    Canaries {
        /// Cycle (mixed: refresh window).
        cycle: usize,
    },
    /// One optimizer step on harmless batch `k` of the run.
    Harmless {
        /// Cycle (mixed: refresh window).
        cycle: usize,
        /// Index among the run's harmless steps.
        k: usize,
    },
}

impl Event {
    /// Whether the event is an optimizer step.
    pub fn is_step(self) -> bool {
        matches!(self, Self::Harmful { .. } | Self::Harmless { .. })
    }

    /// The phase name used in metrics.
    pub fn phase(self) -> &'static str {
        match self {
            Self::Baseline { .. } => "baseline",
            Self::Harmful { .. } => "harmful",
            Self::Canaries { .. } => "canaries",
            Self::Harmless { .. } => "harmless",
        }
    }
}

/// The events of a run.
pub fn plan(c: &TrainConfig) -> Vec<Event> {
    let canaries = c.canary.enabled;
    let (mut h, mut l) = (0usize, 0usize);
    let mut out = Vec::new();
    let harmful = |cycle, h: &mut usize, out: &mut Vec<Event>| {
        out.push(Event::Harmful { cycle, k: *h });
        *h += 1;
    };
    match c.schedule {
        ScheduleKind::Cyclic | ScheduleKind::Sequential => {
            let (rounds, per_h, per_l) = if c.schedule == ScheduleKind::Cyclic {
                (c.cycles, c.harmful_steps, c.harmless_steps)
            } else {
                (1, c.cycles * c.harmful_steps, c.cycles * c.harmless_steps)
            };
            for cycle in 0..rounds {
                let measure = canaries && per_h > 0;
                if measure {
                    out.push(Event::Baseline { cycle });
                }
                for _ in 0..per_h {
                    harmful(cycle, &mut h, &mut out);
                }
                if measure {
                    out.push(Event::Canaries { cycle });
                }
                for _ in 0..per_l {
                    out.push(Event::Harmless { cycle, k: l });
                    l += 1;
                }
            }
        }
        ScheduleKind::Mixed => {
            let total_h = c.cycles * c.harmful_steps;
            let total_l = c.cycles * c.harmless_steps;
            let total = total_h + total_l;
            let mut window = 0;
            if canaries && total_h > 0 {
                out.push(Event::Baseline { cycle: 0 });
            }
            for s in 0..total {
                // Interleave evenly: a harmful step whenever harmful steps lag their share.
                let take_h = h < total_h && (l >= total_l || h * total_l <= l * total_h);
                if take_h {
                    harmful(window, &mut h, &mut out);
                } else {
                    out.push(Event::Harmless {
                        cycle: window,
                        k: l,
                    });
                    l += 1;
                }
                if canaries && total_h > 0 && (s + 1) % c.mixed_refresh_every == 0 && s + 1 < total
                {
                    // A_post of this window is the next window's A_pre.
                    out.push(Event::Canaries { cycle: window });
                    window += 1;
                }
            }
        }
    }
    out
}

/// Where the step at `cursor` stands in the span its learning-rate schedule runs over:
/// `(index within the span, steps in the span)`.
pub fn schedule_position(plan: &[Event], cursor: usize, scope: LrScope) -> (usize, usize) {
    let key = |e: &Event| match (*e, scope) {
        (_, LrScope::Run) => Some((0, 0)),
        (Event::Harmful { cycle, .. } | Event::Harmless { cycle, .. }, LrScope::Cycle) => {
            Some((cycle, 0))
        }
        (Event::Harmful { cycle, .. }, LrScope::Phase) => Some((cycle, 1)),
        (Event::Harmless { cycle, .. }, LrScope::Phase) => Some((cycle, 2)),
        _ => None,
    };
    let Some(mine) = plan.get(cursor).and_then(key) else {
        return (0, 1);
    };
    let same = |e: &Event| e.is_step() && key(e) == Some(mine);
    let index = plan[..cursor].iter().filter(|e| same(e)).count();
    let span = plan.iter().filter(|e| same(e)).count();
    (index, span)
}

/// Whether the step at `cursor` opens a phase block: no step before it, or the step before
/// it belongs to the other phase.
pub fn opens_phase(plan: &[Event], cursor: usize) -> bool {
    let Some(mine) = plan.get(cursor).filter(|e| e.is_step()) else {
        return false;
    };
    plan[..cursor]
        .iter()
        .rev()
        .find(|e| e.is_step())
        .is_none_or(|prev| prev.phase() != mine.phase())
}

/// Optimizer steps in a plan.
pub fn steps(plan: &[Event]) -> usize {
    plan.iter().filter(|e| e.is_step()).count()
}

/// Harmful and harmless steps in a plan.
pub fn counts(plan: &[Event]) -> (usize, usize) {
    plan.iter().fold((0, 0), |(h, l), e| match e {
        Event::Harmful { .. } => (h + 1, l),
        Event::Harmless { .. } => (h, l + 1),
        _ => (h, l),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(schedule: ScheduleKind) -> TrainConfig {
        let text = r#"
            run_dir = "r"
            student = "tiny"
            harmful_teacher = "tiny:1"
            benign_teacher = "tiny"
            cycles = 2
            harmful_steps = 2
            harmless_steps = 3
            batch_size = 1
            mixed_refresh_every = 4
            [optim]
            lr = 1e-3
            [lat]
            epsilon = 1.0
        "#;
        let mut c: TrainConfig = toml::from_str(text).expect("config");
        c.schedule = schedule;
        c
    }

    fn names(p: &[Event]) -> String {
        p.iter()
            .map(|e| match e {
                Event::Baseline { .. } => 'B',
                Event::Harmful { .. } => 'H',
                Event::Canaries { .. } => 'C',
                Event::Harmless { .. } => 'L',
            })
            .collect()
    }

    #[test]
    fn schedules_arrange_the_phases() {
        assert_eq!(
            names(&plan(&config(ScheduleKind::Cyclic))),
            "BHHCLLLBHHCLLL"
        );
        assert_eq!(
            names(&plan(&config(ScheduleKind::Sequential))),
            "BHHHHCLLLLLL"
        );
        // 4 harmful and 6 harmless steps interleaved 2:3, canaries every 4 steps.
        assert_eq!(names(&plan(&config(ScheduleKind::Mixed))), "BHLLHCLHLLCHL");
        let mut off = config(ScheduleKind::Cyclic);
        off.canary.enabled = false;
        assert_eq!(names(&plan(&off)), "HHLLLHHLLL");
        let p = plan(&config(ScheduleKind::Cyclic));
        assert_eq!(steps(&p), 10);
        assert_eq!(counts(&p), (4, 6));
        // Harmful batches are numbered through the run.
        let ks: Vec<usize> = p
            .iter()
            .filter_map(|e| match e {
                Event::Harmful { k, .. } => Some(*k),
                _ => None,
            })
            .collect();
        assert_eq!(ks, vec![0, 1, 2, 3]);
    }

    #[test]
    fn the_schedule_restarts_where_its_scope_says_and_phase_blocks_open_where_the_phase_changes() {
        // BHHCLLLBHHCLLL: steps at cursors 1 2 | 4 5 6 | 8 9 | 11 12 13.
        let p = plan(&config(ScheduleKind::Cyclic));
        let at = |scope| -> Vec<(usize, usize)> {
            (0..p.len())
                .filter(|&c| p[c].is_step())
                .map(|c| schedule_position(&p, c, scope))
                .collect()
        };
        let run: Vec<(usize, usize)> = (0..10).map(|i| (i, 10)).collect();
        assert_eq!(at(LrScope::Run), run);
        let cycle: Vec<(usize, usize)> = (0..2).flat_map(|_| (0..5).map(|i| (i, 5))).collect();
        assert_eq!(at(LrScope::Cycle), cycle);
        let block = [(0, 2), (1, 2), (0, 3), (1, 3), (2, 3)];
        let phase: Vec<(usize, usize)> = block.iter().chain(block.iter()).copied().collect();
        assert_eq!(at(LrScope::Phase), phase);
        let opens: Vec<usize> = (0..p.len()).filter(|&c| opens_phase(&p, c)).collect();
        assert_eq!(opens, [1, 4, 8, 11]);
        // Mixed (BHLLHCLHLLCHL): every change of phase opens a block.
        let m = plan(&config(ScheduleKind::Mixed));
        let opens: Vec<usize> = (0..m.len()).filter(|&c| opens_phase(&m, c)).collect();
        assert_eq!(opens, [1, 2, 4, 6, 7, 8, 11, 12]);
    }
}
