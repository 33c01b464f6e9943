//! The timer wheel on its own (`pulse::timer::Wheel`, no thread, no clock):
//! schedule + cancel with 1 M live timers, and the cost of a tick.

use std::hint::black_box;
use std::time::Instant;

use pulse::timer::{TimerKey, Wheel};
use serde::{Deserialize, Serialize};

use crate::common::{Rng, Settings};

pub const LIVE: usize = 1_000_000;
/// Ticks per heartbeat interval in the busy-tick scenario: 1 s at the
/// default 5 ms tick.
pub const PERIOD: u64 = 200;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TimerResult {
    pub live_timers: usize,
    /// Filling an empty wheel with `live_timers` random deadlines.
    pub fill_ns_per_insert: f64,
    /// Cancel a random live timer and schedule a new one (random deadline
    /// within 65,536 ticks), `pairs` times, with `live_timers` live.
    pub pairs: u64,
    pub schedule_cancel_ns_per_pair: f64,
    /// 1 M timers re-armed every `PERIOD` ticks (1 M connections with a 1 s
    /// heartbeat at a 5 ms tick): mean cost of `advance(now + 1)` alone and
    /// with re-arming what fired.
    pub busy_ticks: u64,
    pub busy_fired_per_tick: f64,
    pub busy_advance_ns_per_tick: f64,
    pub busy_advance_ns_per_fired: f64,
    pub busy_tick_with_rearm_ns: f64,
    /// 1 M timers all far in the future: cost of an `advance(now + 1)` that
    /// fires nothing.
    pub empty_ticks: u64,
    pub empty_advance_ns_per_tick: f64,
}

pub fn run(settings: &Settings) -> TimerResult {
    let mut rng = Rng::new(0x9E37_79B9_7F4A_7C15);
    let mut r = TimerResult {
        live_timers: LIVE,
        ..TimerResult::default()
    };

    // Fill, then schedule + cancel pairs.
    let mut wheel: Wheel<u64> = Wheel::new();
    let deadlines: Vec<u64> = (0..LIVE).map(|_| 1 + rng.below(1 << 16)).collect();
    let t = Instant::now();
    let mut keys: Vec<TimerKey> = deadlines
        .iter()
        .enumerate()
        .map(|(i, &d)| wheel.insert(d, i as u64))
        .collect();
    r.fill_ns_per_insert = t.elapsed().as_nanos() as f64 / LIVE as f64;
    let pairs = settings.count(2_000_000);
    let picks: Vec<(usize, u64)> = (0..pairs)
        .map(|_| (rng.below(LIVE as u64) as usize, 1 + rng.below(1 << 16)))
        .collect();
    let t = Instant::now();
    for (i, &(slot, deadline)) in picks.iter().enumerate() {
        black_box(wheel.cancel(keys[slot]));
        keys[slot] = wheel.insert(deadline, i as u64);
    }
    r.pairs = pairs;
    r.schedule_cancel_ns_per_pair = t.elapsed().as_nanos() as f64 / pairs as f64;
    assert_eq!(wheel.len(), LIVE);
    drop(wheel);
    drop(keys);

    // Busy ticks: every timer fires once per PERIOD and is re-armed.
    let mut wheel: Wheel<u64> = Wheel::new();
    for i in 0..LIVE {
        wheel.insert(1 + rng.below(PERIOD), i as u64);
    }
    let ticks = settings.count(4_000).max(PERIOD);
    let mut expired = Vec::with_capacity(LIVE / PERIOD as usize * 2);
    let (mut advance_ns, mut total_ns, mut fired) = (0u128, 0u128, 0u64);
    for now in 1..=ticks {
        expired.clear();
        let t0 = Instant::now();
        wheel.advance(now, &mut expired);
        let t1 = Instant::now();
        for (_, v) in expired.drain(..) {
            wheel.insert(now + PERIOD, v);
            fired += 1;
        }
        let t2 = Instant::now();
        advance_ns += (t1 - t0).as_nanos();
        total_ns += (t2 - t0).as_nanos();
    }
    r.busy_ticks = ticks;
    r.busy_fired_per_tick = fired as f64 / ticks as f64;
    r.busy_advance_ns_per_tick = advance_ns as f64 / ticks as f64;
    r.busy_advance_ns_per_fired = advance_ns as f64 / fired.max(1) as f64;
    r.busy_tick_with_rearm_ns = total_ns as f64 / ticks as f64;
    drop(wheel);

    // Empty ticks: everything is far away.
    let mut wheel: Wheel<u64> = Wheel::new();
    for i in 0..LIVE {
        wheel.insert((1 << 24) + rng.below(1 << 20), i as u64);
    }
    let ticks = settings.count(1_000_000);
    let t = Instant::now();
    for now in 1..=ticks {
        wheel.advance(now, &mut expired);
    }
    r.empty_ticks = ticks;
    r.empty_advance_ns_per_tick = t.elapsed().as_nanos() as f64 / ticks as f64;
    black_box(expired.len());
    r
}
