//! Property tests of `pulse::timer::Wheel` against a `BTreeMap` model, and a
//! stress test with a million live timers.
//!
//! Run with `cargo test --test timer_props`.

use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;
use pulse::timer::{TimerKey, Wheel};

/// Ticks covered by one rotation of the wheel's top level (64^6).
const SPAN: u64 = 1 << 36;

/// A distance in ticks, biased towards the interesting sizes: within one slot,
/// around level boundaries, beyond the wheel's span, and the extremes.
fn distance() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => 0u64..4,
        4 => 0u64..70,
        3 => 0u64..5_000,
        2 => 0u64..300_000,
        2 => prop_oneof![Just(64u64), Just(4096), Just(262_144), Just(SPAN - 1), Just(SPAN), Just(SPAN + 1)],
        2 => 0u64..4 * SPAN,
        1 => any::<u64>(),
        1 => Just(u64::MAX),
    ]
}

#[derive(Debug, Clone)]
enum Op {
    /// Insert at `elapsed + distance` (or `elapsed - distance` if `past`).
    Insert { distance: u64, past: bool },
    /// Cancel a key ever issued (live or stale), picked by index.
    Cancel { pick: prop::sample::Index },
    /// Advance to `elapsed + distance` (or `elapsed - distance` if `past`).
    Advance { distance: u64, past: bool },
    /// Advance exactly to `next_expiration()`, checking progress.
    AdvanceToNext,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (distance(), prop::bool::weighted(0.15))
            .prop_map(|(distance, past)| Op::Insert { distance, past }),
        3 => any::<prop::sample::Index>().prop_map(|pick| Op::Cancel { pick }),
        3 => (distance(), prop::bool::weighted(0.1))
            .prop_map(|(distance, past)| Op::Advance { distance, past }),
        2 => Just(Op::AdvanceToNext),
    ]
}

/// The wheel and a model of it: live timers by `(deadline, id)`.
struct Harness {
    wheel: Wheel<u64>,
    /// Live timers, ordered by deadline: `(deadline, id) -> key`.
    model: BTreeMap<(u64, u64), TimerKey>,
    /// Every key ever issued, with its id.
    issued: Vec<(TimerKey, u64)>,
    /// Live ids: `id -> deadline`.
    live: HashMap<u64, u64>,
    /// The model's clock.
    elapsed: u64,
    next_id: u64,
}

impl Harness {
    fn new() -> Self {
        Harness {
            wheel: Wheel::new(),
            model: BTreeMap::new(),
            issued: Vec::new(),
            live: HashMap::new(),
            elapsed: 0,
            next_id: 0,
        }
    }

    fn target(&self, distance: u64, past: bool) -> u64 {
        if past {
            self.elapsed.saturating_sub(distance)
        } else {
            self.elapsed.saturating_add(distance)
        }
    }

    fn insert(&mut self, deadline: u64) -> Result<(), TestCaseError> {
        let id = self.next_id;
        self.next_id += 1;
        let key = self.wheel.insert(deadline, id);
        prop_assert_eq!(self.wheel.deadline(key), Some(deadline));
        self.model.insert((deadline, id), key);
        self.issued.push((key, id));
        self.live.insert(id, deadline);
        Ok(())
    }

    fn cancel(&mut self, pick: prop::sample::Index) -> Result<(), TestCaseError> {
        if self.issued.is_empty() {
            return Ok(());
        }
        let (key, id) = self.issued[pick.index(self.issued.len())];
        let expected = self.live.remove(&id).map(|d| {
            self.model.remove(&(d, id));
            id
        });
        prop_assert_eq!(self.wheel.cancel(key), expected, "cancel of {:?}", key);
        prop_assert_eq!(self.wheel.deadline(key), None);
        if expected.is_some() {
            prop_assert_eq!(self.wheel.cancel(key), None, "second cancel hit");
        }
        Ok(())
    }

    /// Advances both, returning how many timers fired.
    fn advance(&mut self, now: u64) -> Result<usize, TestCaseError> {
        let mut expired = Vec::new();
        self.wheel.advance(now, &mut expired);
        self.elapsed = self.elapsed.max(now);
        prop_assert_eq!(self.wheel.elapsed(), self.elapsed);

        // The model fires everything with deadline <= elapsed.
        let rest = match self.elapsed.checked_add(1) {
            Some(bound) => self.model.split_off(&(bound, 0)),
            None => BTreeMap::new(),
        };
        let due = std::mem::replace(&mut self.model, rest);

        // Non-decreasing deadline order, each fired key fresh and correct.
        let mut last = 0;
        let mut fired = Vec::with_capacity(expired.len());
        for &(key, id) in &expired {
            let deadline = self.live.remove(&id);
            prop_assert!(
                deadline.is_some(),
                "timer {} fired twice or after cancel",
                id
            );
            let deadline = deadline.unwrap_or_default();
            prop_assert!(deadline <= self.elapsed, "timer {} fired early", id);
            prop_assert!(
                deadline >= last,
                "fired out of order: {} after {}",
                deadline,
                last
            );
            prop_assert_eq!(self.wheel.deadline(key), None, "fired key still live");
            last = deadline;
            fired.push(((deadline, id), key));
        }
        fired.sort_unstable_by_key(|&(k, _)| k);
        let due: Vec<_> = due.into_iter().collect();
        prop_assert_eq!(&fired, &due, "fired set differs from the model");
        Ok(fired.len())
    }

    fn check(&self) -> Result<(), TestCaseError> {
        prop_assert_eq!(self.wheel.len(), self.model.len());
        prop_assert_eq!(self.wheel.is_empty(), self.model.is_empty());
        let next = self.wheel.next_expiration();
        match self.model.keys().next() {
            None => prop_assert_eq!(next, None),
            Some(&(earliest, _)) => {
                prop_assert!(next.is_some(), "next_expiration None with live timers");
                let next = next.unwrap_or_default();
                prop_assert!(
                    next <= earliest,
                    "next_expiration {} > earliest {}",
                    next,
                    earliest
                );
                if earliest > self.elapsed {
                    prop_assert!(next > self.elapsed, "no progress: {} <= elapsed", next);
                }
            }
        }
        Ok(())
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Insert { distance, past } => self.insert(self.target(distance, past))?,
            Op::Cancel { pick } => self.cancel(pick)?,
            Op::Advance { distance, past } => {
                self.advance(self.target(distance, past))?;
            }
            Op::AdvanceToNext => {
                if let Some(next) = self.wheel.next_expiration() {
                    let fired = self.advance(next)?;
                    let after = self.wheel.next_expiration();
                    prop_assert!(
                        fired > 0 || after.is_some_and(|after| after > next),
                        "advance to next_expiration {} made no progress",
                        next
                    );
                }
            }
        }
        self.check()
    }

    /// Drains the wheel by advancing to `next_expiration` only, bounding the
    /// number of wake-ups: at most one per level plus the overflow per timer.
    fn drain(&mut self) -> Result<(), TestCaseError> {
        let budget = 8 * (self.model.len() + 1);
        let mut wakes = 0;
        while let Some(next) = self.wheel.next_expiration() {
            wakes += 1;
            prop_assert!(wakes <= budget, "more than {} wake-ups to drain", budget);
            self.advance(next)?;
            self.check()?;
        }
        prop_assert!(self.model.is_empty());
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn wheel_matches_btreemap_model(
        start in prop_oneof![Just(0u64), 0u64..10_000, Just(SPAN - 3), any::<u64>()],
        ops in prop::collection::vec(op(), 1..200),
    ) {
        let mut h = Harness::new();
        h.advance(start)?;
        for op in &ops {
            h.apply(op)?;
        }
        h.drain()?;
    }

    #[test]
    fn stale_keys_never_hit_reused_slots(deadlines in prop::collection::vec(0u64..200, 1..50)) {
        let mut wheel = Wheel::new();
        let mut stale = Vec::new();
        for (i, &deadline) in deadlines.iter().enumerate() {
            let key = wheel.insert(deadline, i);
            prop_assert_eq!(wheel.cancel(key), Some(i));
            stale.push(key);
            // The slot just freed is reused right away.
            let fresh = wheel.insert(deadline, usize::MAX);
            for &old in &stale {
                prop_assert_ne!(old, fresh);
                prop_assert_eq!(wheel.cancel(old), None);
                prop_assert_eq!(wheel.deadline(old), None);
            }
            prop_assert_eq!(wheel.cancel(fresh), Some(usize::MAX));
        }
        prop_assert!(wheel.is_empty());
    }
}

/// A tiny deterministic generator (xorshift64*), so the stress test needs no
/// extra dependency and is reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

#[test]
fn a_million_live_timers() {
    const N: usize = 1_000_000;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut wheel = Wheel::new();
    let mut keys = Vec::with_capacity(N);
    let mut expected_fired = 0usize;
    let mut last_deadline = 0u64;

    // A million live timers, spread over every level and beyond the span.
    for i in 0..N {
        let deadline = match i % 4 {
            0 => rng.next() % 64,
            1 => rng.next() % 300_000,
            2 => rng.next() % (4 * SPAN),
            _ => rng.next() % 1_000_000_000,
        };
        keys.push((wheel.insert(deadline, i as u64), deadline));
    }
    assert_eq!(wheel.len(), N);

    // Cancel every other one (O(1) each), then re-insert a quarter of them.
    for (i, (key, _)) in keys.iter().enumerate() {
        if i % 2 == 0 {
            assert_eq!(wheel.cancel(*key), Some(i as u64));
        }
    }
    assert_eq!(wheel.len(), N / 2);
    for (i, (key, deadline)) in keys.iter_mut().enumerate() {
        if i % 4 == 0 {
            *deadline = rng.next() % 2_000_000;
            *key = wheel.insert(*deadline, i as u64);
        }
    }
    let live = N / 2 + N / 4;
    assert_eq!(wheel.len(), live);

    // Advance in a few big jumps and a few small ones; check order and count.
    let mut expired = Vec::new();
    for now in [0, 1, 63, 64, 100_000, 1_000_000, 2_000_000, SPAN, u64::MAX] {
        expired.clear();
        wheel.advance(now, &mut expired);
        for &(key, id) in &expired {
            let deadline = keys[id as usize].1;
            assert_eq!(keys[id as usize].0, key);
            assert!(deadline <= now && deadline >= last_deadline);
            last_deadline = deadline;
        }
        expected_fired += expired.len();
    }
    assert_eq!(expected_fired, live);
    assert!(wheel.is_empty());
    assert_eq!(wheel.next_expiration(), None);
}
