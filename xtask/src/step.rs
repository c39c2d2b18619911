//! A list of named steps run in order, each timed, with a summary at the end.
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::context::Ctx;

/// What happens to the remaining steps when a step fails.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    /// Later steps depend on this one: skip them.
    Stop,
    /// Later steps still say something useful: run them.
    Continue,
}

/// The work of a step.
pub type StepFn = Box<dyn FnOnce(&mut Ctx) -> Result<()>>;

/// One step of a command such as `cargo xtask test`.
pub struct Step {
    /// Short name shown in the summary.
    pub name: &'static str,
    /// What to do when it fails.
    pub on_failure: OnFailure,
    /// The work.
    pub run: StepFn,
}

impl Step {
    /// A step whose failure stops the run.
    pub fn required(
        name: &'static str,
        run: impl FnOnce(&mut Ctx) -> Result<()> + 'static,
    ) -> Self {
        Self {
            name,
            on_failure: OnFailure::Stop,
            run: Box::new(run),
        }
    }

    /// A step whose failure is reported but lets the next steps run.
    pub fn independent(
        name: &'static str,
        run: impl FnOnce(&mut Ctx) -> Result<()> + 'static,
    ) -> Self {
        Self {
            name,
            on_failure: OnFailure::Continue,
            run: Box::new(run),
        }
    }
}

enum Outcome {
    Passed,
    Failed(String),
    Skipped,
}

/// Runs `steps` in order and prints one summary line per step; fails if any step failed.
pub fn run_all(ctx: &mut Ctx, steps: Vec<Step>) -> Result<()> {
    let mut results: Vec<(&'static str, Outcome, Duration)> = Vec::new();
    let mut stopped = false;
    for step in steps {
        if stopped {
            results.push((step.name, Outcome::Skipped, Duration::ZERO));
            continue;
        }
        println!("\n==> {}", step.name);
        let started = Instant::now();
        let outcome = match (step.run)(ctx) {
            Ok(()) => Outcome::Passed,
            Err(e) => {
                eprintln!("step `{}` failed: {e:#}", step.name);
                stopped = step.on_failure == OnFailure::Stop;
                Outcome::Failed(format!("{e:#}"))
            }
        };
        results.push((step.name, outcome, started.elapsed()));
    }

    println!("\nsummary");
    let mut failed = 0;
    for (name, outcome, took) in &results {
        let (status, detail) = match outcome {
            Outcome::Passed => ("ok", String::new()),
            Outcome::Failed(e) => {
                failed += 1;
                ("FAILED", format!("  {}", first_line(e)))
            }
            Outcome::Skipped => ("skipped", "  (an earlier step failed)".to_owned()),
        };
        println!(
            "  {status:<8} {name:<28} {:>8}{detail}",
            format_duration(*took)
        );
    }
    if failed > 0 {
        bail!("{failed} step(s) failed");
    }
    Ok(())
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or_default()
}

fn format_duration(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs >= 60.0 {
        format!("{}m{:02}s", d.as_secs() / 60, d.as_secs() % 60)
    } else {
        format!("{secs:.1}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_switch_to_minutes_past_a_minute() {
        assert_eq!(format_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_duration(Duration::from_secs(125)), "2m05s");
    }
}
