//! Timing of recorded work: GPU time from timestamp queries written around the commands when the
//! device has them, otherwise wall time from submit until the device reports completion.
//!
//! On a GPU (any adapter that is not a CPU) the clocks idle low and rise only under sustained
//! work: on an H200, work timed right after the device sat idle ran up to 5× slower than the same
//! work timed under load. So there each measurement first keeps the device busy with the same
//! commands for a while (200 ms when it was idle, 20 ms when timed work ended moments ago), and
//! each timed run records the commands back to back as many times as fill about a millisecond,
//! reporting the time per repetition; a decode step of a few microseconds is then timed under
//! load rather than against an idle gap. CPU adapters have no clocks to raise: there each run is
//! one recording, as before.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::context::Context;
use crate::error::Result;

/// How a duration was measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Clock {
    /// Timestamp queries on the GPU.
    GpuTimestamps,
    /// Host wall time around submit and wait.
    Wall,
}

impl std::fmt::Display for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Clock::GpuTimestamps => "gpu timestamps",
            Clock::Wall => "wall time",
        })
    }
}

/// How a GPU is brought to its working clocks before timing: see the module's documentation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Settle {
    /// Busy time before timing when the device was idle.
    pub idle: Duration,
    /// Busy time before timing when timed work ended less than `recent` ago.
    pub warm: Duration,
    /// How recent counts as still warm.
    pub recent: Duration,
    /// Least GPU time of one timed run; the commands are repeated to fill it.
    pub run: Duration,
    /// Most repetitions in one run or one warm-up submission.
    pub max_reps: u32,
}

impl Settle {
    /// The setting for GPUs.
    pub const GPU: Settle = Settle {
        idle: Duration::from_millis(200),
        warm: Duration::from_millis(20),
        recent: Duration::from_millis(100),
        run: Duration::from_millis(1),
        max_reps: 256,
    };
}

/// When timed work last ended (any context in this process).
static LAST_BUSY: Mutex<Option<Instant>> = Mutex::new(None);

/// Times `iters` runs of the commands that `encode` records; returns each run's duration per
/// repetition of the commands. On a GPU the device is first brought to its working clocks and
/// each run repeats the commands to fill about a millisecond ([`Settle::GPU`]); on a CPU adapter
/// each run records them once.
pub fn time_encoded(
    ctx: &Context,
    iters: usize,
    encode: impl FnMut(&mut wgpu::CommandEncoder) -> Result<()>,
) -> Result<(Clock, Vec<Duration>)> {
    let settle = (ctx.adapter_info().device_type != wgpu::DeviceType::Cpu).then_some(Settle::GPU);
    time_encoded_with(ctx, iters, settle, encode)
}

/// [`time_encoded`] with the clock settling chosen by the caller (`None`: none, one recording
/// per run).
pub fn time_encoded_with(
    ctx: &Context,
    iters: usize,
    settle: Option<Settle>,
    mut encode: impl FnMut(&mut wgpu::CommandEncoder) -> Result<()>,
) -> Result<(Clock, Vec<Duration>)> {
    // Settling: submissions of n back-to-back recordings, n doubling while one submission takes
    // under a tenth of the busy time asked for, until that time has passed; the last
    // submission's time per recording sets the repetitions per timed run.
    let mut reps = 1u32;
    if let Some(st) = settle {
        let recent = LAST_BUSY
            .lock()
            .ok()
            .and_then(|l| *l)
            .is_some_and(|t| t.elapsed() < st.recent);
        let busy = if recent { st.warm } else { st.idle };
        let start = Instant::now();
        let mut n = 1u32;
        loop {
            let mut enc = ctx
                .device()
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("posattn settle"),
                });
            for _ in 0..n {
                encode(&mut enc)?;
            }
            let t0 = Instant::now();
            let sub = ctx.scoped("submitting timed work", || {
                ctx.queue().submit([enc.finish()])
            })?;
            ctx.wait(sub)?;
            let each = t0.elapsed() / n;
            reps = (st.run.as_secs_f64() / each.as_secs_f64().max(1e-9))
                .ceil()
                .clamp(1.0, st.max_reps as f64) as u32;
            if start.elapsed() >= busy {
                break;
            }
            if t0.elapsed() < busy / 10 {
                n = (n * 2).min(st.max_reps);
            }
        }
    }
    let timestamps = ctx.has_timestamps();
    let (query_set, resolve) = if timestamps {
        let qs = ctx.device().create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("posattn timer"),
            ty: wgpu::QueryType::Timestamp,
            count: 2,
        });
        let buf = ctx.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some("posattn timer resolve"),
            size: 16,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        (Some(qs), Some(buf))
    } else {
        (None, None)
    };
    let period = ctx.queue().get_timestamp_period() as f64;
    let mut out = Vec::with_capacity(iters);
    for _ in 0..iters {
        let mut enc = ctx
            .device()
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("posattn timed"),
            });
        if let Some(qs) = &query_set {
            enc.write_timestamp(qs, 0);
        }
        for _ in 0..reps {
            encode(&mut enc)?;
        }
        if let (Some(qs), Some(buf)) = (&query_set, &resolve) {
            enc.write_timestamp(qs, 1);
            enc.resolve_query_set(qs, 0..2, buf, 0);
        }
        let start = Instant::now();
        let sub = ctx.scoped("submitting timed work", || {
            ctx.queue().submit([enc.finish()])
        })?;
        ctx.wait(sub)?;
        let wall = start.elapsed();
        let total = match &resolve {
            Some(buf) => {
                let bytes = ctx.read_buffer(buf, 16)?;
                let t: &[u64] = bytemuck::cast_slice(&bytes);
                let ns = t[1].saturating_sub(t[0]) as f64 * period;
                Duration::from_nanos(ns as u64)
            }
            None => wall,
        };
        out.push(total / reps);
    }
    if settle.is_some()
        && let Ok(mut l) = LAST_BUSY.lock()
    {
        *l = Some(Instant::now());
    }
    let clock = if timestamps {
        Clock::GpuTimestamps
    } else {
        Clock::Wall
    };
    Ok((clock, out))
}

/// Which of a measurement's runs is reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Statistic {
    /// The median run.
    #[default]
    Median,
    /// The fastest run: steadier where other work shares the machine, whose bursts only ever
    /// slow a run down (the software adapters' figures in BENCHMARKS.md).
    Fastest,
}

impl Statistic {
    /// The reported duration of `d` (zero when empty).
    pub fn of(self, d: &[Duration]) -> Duration {
        match self {
            Statistic::Median => median(d),
            Statistic::Fastest => d.iter().min().copied().unwrap_or_default(),
        }
    }
}

impl std::fmt::Display for Statistic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Statistic::Median => "median",
            Statistic::Fastest => "fastest",
        })
    }
}

/// The median of some durations.
pub fn median(d: &[Duration]) -> Duration {
    let mut v = d.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_pick_the_run_they_name() {
        let ms = Duration::from_millis;
        let runs = [ms(9), ms(3), ms(40), ms(5), ms(7)];
        assert_eq!(Statistic::Median.of(&runs), ms(7));
        assert_eq!(Statistic::Fastest.of(&runs), ms(3));
        assert_eq!(Statistic::default(), Statistic::Median);
        for s in [Statistic::Median, Statistic::Fastest] {
            assert_eq!(s.of(&[]), Duration::ZERO);
        }
        assert_eq!(Statistic::Fastest.to_string(), "fastest");
    }
}
