//! Timing of recorded work: GPU time from timestamp queries written around the commands when the
//! device has them, otherwise wall time from submit until the device reports completion.

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

/// Times `iters` submissions of the commands that `encode` records; returns each duration.
pub fn time_encoded(
    ctx: &Context,
    iters: usize,
    mut encode: impl FnMut(&mut wgpu::CommandEncoder) -> Result<()>,
) -> Result<(Clock, Vec<Duration>)> {
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
        encode(&mut enc)?;
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
        match &resolve {
            Some(buf) => {
                let bytes = ctx.read_buffer(buf, 16)?;
                let t: &[u64] = bytemuck::cast_slice(&bytes);
                let ns = t[1].saturating_sub(t[0]) as f64 * period;
                out.push(Duration::from_nanos(ns as u64));
            }
            None => out.push(wall),
        }
    }
    let clock = if timestamps {
        Clock::GpuTimestamps
    } else {
        Clock::Wall
    };
    Ok((clock, out))
}

/// The median of some durations.
pub fn median(d: &[Duration]) -> Duration {
    let mut v = d.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or_default()
}
