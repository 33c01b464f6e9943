//! Reconnect delays. The rules, with an example, are documented on
//! [`Backoff`] (this module is private; its items are re-exported from
//! [`crate::liveness`]).

use std::time::{Duration, Instant};

/// Settings of a [`Backoff`].
///
/// All fields are public; check a hand-built value with
/// [`BackoffConfig::validate`].
#[derive(Debug, Clone)]
pub struct BackoffConfig {
    /// The delay before the first attempt after a reset. Default 100 ms.
    pub initial: Duration,
    /// Each attempt's delay is the previous one times this factor (before
    /// jitter). Default 2.0.
    pub multiplier: f64,
    /// No delay is ever longer than this, jitter included. Default 5 s.
    pub max: Duration,
    /// Each delay is multiplied by a uniform factor in
    /// `[1 - jitter, 1 + jitter]`, then capped at [`max`](Self::max).
    /// `0.0` disables jitter. Default 0.2.
    pub jitter: f64,
    /// How many attempts in a row (since the last reset) before
    /// [`Backoff::next_delay`] gives up and returns `None`. Default `None`:
    /// retry forever. `Some(0)`: never reconnect (a client fails for good
    /// at its first failed connect or lost connection).
    pub max_attempts: Option<u32>,
    /// How long a connection must stay up before the attempt count resets.
    /// Default 2 s. See the [`Backoff` docs](Backoff#probation).
    pub probation: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            initial: Duration::from_millis(100),
            multiplier: 2.0,
            max: Duration::from_secs(5),
            jitter: 0.2,
            max_attempts: None,
            probation: Duration::from_secs(2),
        }
    }
}

impl BackoffConfig {
    /// Checks that the settings make sense.
    ///
    /// # Errors
    ///
    /// Returns a message naming the offending field if `initial` is zero,
    /// `multiplier` is below 1 (or not finite), `max` is below `initial`, or
    /// `jitter` is outside `[0, 1)`.
    pub fn validate(&self) -> Result<(), String> {
        if self.initial.is_zero() {
            return Err("backoff initial delay must be greater than zero".into());
        }
        if !(self.multiplier.is_finite() && self.multiplier >= 1.0) {
            return Err(format!(
                "backoff multiplier must be a finite number >= 1, got {}",
                self.multiplier
            ));
        }
        if self.max < self.initial {
            return Err(format!(
                "backoff max ({:?}) must be >= initial ({:?})",
                self.max, self.initial
            ));
        }
        if !(0.0..1.0).contains(&self.jitter) {
            return Err(format!(
                "backoff jitter must be in [0, 1), got {}",
                self.jitter
            ));
        }
        Ok(())
    }
}

/// Reconnect delays: exponential backoff with jitter, an attempt limit and a
/// probation period.
///
/// [`Backoff`] is pure: it never sleeps and never reads a clock. The consumer's
/// shell asks it for the delay before each reconnect attempt
/// ([`Backoff::next_delay`]) and tells it when a connection became healthy
/// ([`Backoff::on_connected`]) and when it went away
/// ([`Backoff::on_disconnected`]), passing `now` in.
///
/// # The delay sequence
///
/// Attempt `n` (counting from 0 since the last reset) waits
///
/// ```text
/// min(max, min(max, initial × multiplierⁿ) × uniform(1 − jitter, 1 + jitter))
/// ```
///
/// With the defaults (100 ms, ×2, capped at 5 s, ±20 %) that is about 100 ms,
/// 200 ms, 400 ms, 800 ms, 1.6 s, 3.2 s, 5 s, 5 s, … The jitter spreads the
/// reconnects of many consumers that lost the same provider at the same moment
/// so they do not all come back in lock-step.
///
/// # Probation
///
/// A proxy or a load balancer in front of a dead provider often *accepts* a
/// TCP connection and closes it right away. If every successful connect reset
/// the backoff, such a peer would be hammered at the initial delay forever.
/// So a connection only resets the attempt count if it stayed up for at least
/// [`BackoffConfig::probation`]: [`Backoff::on_disconnected`] compares the time
/// since [`Backoff::on_connected`] with it. A shorter connection leaves the
/// count as it was, and the next delay keeps growing.
///
/// # A graceful close by the peer
///
/// A provider that retires a healthy connection on purpose (`max_age`,
/// `max_idle`, its own shutdown) says so with its Close frame, and the
/// shell reports that with [`Backoff::on_peer_closed_gracefully`] instead of
/// [`Backoff::on_disconnected`]. That connection served no probation and
/// failed none: the attempt count starts over whatever its length, and the
/// next attempt waits no delay at all, so a consumer whose connection is
/// rotated every few hundred milliseconds is back at once every time instead
/// of waiting out a delay that grows with each rotation. Only that one
/// attempt is free: if it fails (the provider is really gone, e.g.
/// restarting), the delays go on from `initial` as after any healthy
/// connection. Many consumers of a provider that shuts down thus all try
/// once at the same moment, which against a closed port costs a refused
/// connect each, and then spread out with the jitter.
///
/// A peer that closes gracefully within `initial` of the connect gets no free
/// attempt (the count still starts over): the consumer never reconnects to
/// one peer more often than once per `initial`, whatever the peer does.
///
/// # Example
///
/// ```
/// use std::time::{Duration, Instant};
/// use pulse::liveness::{Backoff, BackoffConfig};
///
/// let config = BackoffConfig { jitter: 0.0, ..BackoffConfig::default() };
/// let mut backoff = Backoff::new(config, 42);
/// assert_eq!(backoff.next_delay(), Some(Duration::from_millis(100)));
/// assert_eq!(backoff.next_delay(), Some(Duration::from_millis(200)));
///
/// // Connected, but closed again after 10 ms: still on probation, keep growing.
/// let t0 = Instant::now();
/// backoff.on_connected(t0);
/// backoff.on_disconnected(t0 + Duration::from_millis(10));
/// assert_eq!(backoff.next_delay(), Some(Duration::from_millis(400)));
///
/// // Healthy for longer than the probation: start over.
/// backoff.on_connected(t0 + Duration::from_secs(1));
/// backoff.on_disconnected(t0 + Duration::from_secs(10));
/// assert_eq!(backoff.next_delay(), Some(Duration::from_millis(100)));
///
/// // The peer closed a 300 ms connection gracefully (max_age): try again at
/// // once, and if that fails, go on from the initial delay.
/// backoff.on_connected(t0 + Duration::from_secs(11));
/// backoff.on_peer_closed_gracefully(t0 + Duration::from_millis(11_300));
/// assert_eq!(backoff.next_delay(), Some(Duration::ZERO));
/// assert_eq!(backoff.attempt(), 1);
/// assert_eq!(backoff.next_delay(), Some(Duration::from_millis(100)));
/// assert_eq!(backoff.next_delay(), Some(Duration::from_millis(200)));
/// ```
///
/// Deterministic: the jitter comes from a SplitMix64 generator seeded in
/// [`Backoff::new`], so the same seed gives the same delays.
#[derive(Debug, Clone)]
pub struct Backoff {
    config: BackoffConfig,
    rng: SplitMix64,
    attempt: u32,
    connected_at: Option<Instant>,
    /// The next attempt waits no delay (the peer closed gracefully).
    retry_now: bool,
    /// Attempts since the last reset that waited no delay: they do not grow
    /// the delays of the attempts after them (0 or 1).
    free_attempts: u32,
}

impl Backoff {
    /// Creates a backoff with no attempts made yet.
    ///
    /// `seed` drives the jitter; give each client a different one (for example
    /// derived from the time and the peer address) so that their reconnects
    /// spread out. The config is used as given; check it first with
    /// [`BackoffConfig::validate`]. Out-of-range values do not panic: delays
    /// are always kept within `(0, max]` as far as the config allows.
    pub fn new(config: BackoffConfig, seed: u64) -> Backoff {
        Backoff {
            config,
            rng: SplitMix64(seed),
            attempt: 0,
            connected_at: None,
            retry_now: false,
            free_attempts: 0,
        }
    }

    /// Returns the delay to wait before the next connection attempt and counts
    /// that attempt, or `None` if [`BackoffConfig::max_attempts`] attempts were
    /// already made since the last reset (give up).
    ///
    /// After [`on_peer_closed_gracefully`](Self::on_peer_closed_gracefully)
    /// the delay is zero once; that attempt counts towards `max_attempts`
    /// like any other but does not grow the delays after it.
    pub fn next_delay(&mut self) -> Option<Duration> {
        if let Some(limit) = self.config.max_attempts
            && self.attempt >= limit
        {
            return None;
        }
        if std::mem::take(&mut self.retry_now) {
            self.attempt = self.attempt.saturating_add(1);
            self.free_attempts = self.free_attempts.saturating_add(1);
            return Some(Duration::ZERO);
        }
        let max = self.config.max.as_secs_f64();
        // Past ~1000 doublings every f64 is capped anyway; keep powi's
        // exponent small and finite. A free attempt does not count: the
        // first delayed one waits `initial`.
        let exponent = self.attempt.saturating_sub(self.free_attempts).min(1024) as i32;
        let base =
            (self.config.initial.as_secs_f64() * self.config.multiplier.powi(exponent)).min(max);
        let jitter = self.config.jitter;
        let factor = if jitter > 0.0 {
            1.0 - jitter + 2.0 * jitter * self.rng.next_unit()
        } else {
            1.0
        };
        let secs = (base * factor).min(max);
        let delay = Duration::try_from_secs_f64(secs).unwrap_or(self.config.max);
        self.attempt = self.attempt.saturating_add(1);
        Some(delay.min(self.config.max))
    }

    /// Attempts made since the last reset: 0 at first, 1 after the first
    /// [`next_delay`](Self::next_delay).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Records that a connection became healthy at `now`; its probation
    /// starts. Calling it again while connected restarts the probation.
    pub fn on_connected(&mut self, now: Instant) {
        self.connected_at = Some(now);
    }

    /// Records that the connection went away at `now`.
    ///
    /// If it had been connected for at least [`BackoffConfig::probation`], the
    /// attempt count resets to 0 and the next delay is `initial` again;
    /// otherwise the count is kept and the delays keep growing. Without a
    /// preceding [`on_connected`](Self::on_connected) this does nothing.
    pub fn on_disconnected(&mut self, now: Instant) {
        if let Some(since) = self.connected_at.take()
            && now.saturating_duration_since(since) >= self.config.probation
        {
            self.reset();
        }
    }

    /// Records that the peer closed the connection gracefully at `now` (a
    /// Close saying it retires a healthy connection: `max_age`, `max_idle`,
    /// its shutdown).
    ///
    /// The attempt count resets to 0 however short the connection was (it
    /// did not fail its probation), and the next
    /// [`next_delay`](Self::next_delay) is zero, unless the connection lasted
    /// less than [`BackoffConfig::initial`]: a peer that keeps closing at
    /// once is then reconnected to after `initial`, never in a tight loop.
    /// Without a preceding [`on_connected`](Self::on_connected) this does
    /// nothing. See [the type's docs](Backoff#a-graceful-close-by-the-peer).
    pub fn on_peer_closed_gracefully(&mut self, now: Instant) {
        if let Some(since) = self.connected_at.take() {
            self.reset();
            self.retry_now = now.saturating_duration_since(since) >= self.config.initial;
        }
    }

    /// Starts the delays over from `initial`.
    fn reset(&mut self) {
        self.attempt = 0;
        self.free_attempts = 0;
        self.retry_now = false;
    }

    /// The settings this backoff was created with.
    pub fn config(&self) -> &BackoffConfig {
        &self.config
    }
}

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, good enough for jitter.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform number in `[0, 1)` with 53 random bits.
    fn next_unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn no_jitter() -> BackoffConfig {
        BackoffConfig {
            jitter: 0.0,
            ..BackoffConfig::default()
        }
    }

    #[test]
    fn defaults_are_documented_values_and_valid() {
        let c = BackoffConfig::default();
        assert_eq!(c.initial, ms(100));
        assert_eq!(c.multiplier, 2.0);
        assert_eq!(c.max, ms(5000));
        assert_eq!(c.jitter, 0.2);
        assert_eq!(c.max_attempts, None);
        assert_eq!(c.probation, ms(2000));
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn validate_rejects_bad_values() {
        let ok = BackoffConfig::default();
        let bad = [
            BackoffConfig {
                initial: Duration::ZERO,
                ..ok.clone()
            },
            BackoffConfig {
                multiplier: 0.5,
                ..ok.clone()
            },
            BackoffConfig {
                multiplier: f64::NAN,
                ..ok.clone()
            },
            BackoffConfig {
                multiplier: f64::INFINITY,
                ..ok.clone()
            },
            BackoffConfig {
                max: ms(50),
                ..ok.clone()
            },
            BackoffConfig {
                jitter: 1.0,
                ..ok.clone()
            },
            BackoffConfig {
                jitter: -0.1,
                ..ok.clone()
            },
            BackoffConfig {
                jitter: f64::NAN,
                ..ok.clone()
            },
        ];
        for c in bad {
            assert!(c.validate().is_err(), "{c:?} should be rejected");
        }
        let edge = BackoffConfig {
            multiplier: 1.0,
            max: ok.initial,
            jitter: 0.0,
            ..ok
        };
        assert_eq!(edge.validate(), Ok(()));
    }

    #[test]
    fn sequence_without_jitter_doubles_then_caps() {
        let mut b = Backoff::new(no_jitter(), 1);
        assert_eq!(b.attempt(), 0);
        let delays: Vec<_> = (0..10).map(|_| b.next_delay().unwrap()).collect();
        let expected: Vec<_> = [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000, 5000]
            .into_iter()
            .map(ms)
            .collect();
        assert_eq!(delays, expected);
        assert_eq!(b.attempt(), 10);
    }

    #[test]
    fn many_attempts_stay_capped_without_overflow() {
        let mut b = Backoff::new(no_jitter(), 1);
        for _ in 0..5000 {
            assert!(b.next_delay().unwrap() <= ms(5000));
        }
        assert_eq!(b.next_delay(), Some(ms(5000)));
    }

    #[test]
    fn jitter_stays_within_bounds_over_many_seeds() {
        let config = BackoffConfig {
            max: Duration::from_secs(3600),
            ..BackoffConfig::default()
        };
        let (mut lowest, mut highest) = (f64::MAX, f64::MIN);
        for seed in 0..2000 {
            let mut b = Backoff::new(config.clone(), seed);
            for n in 0..6 {
                let nominal = 0.1 * 2f64.powi(n);
                let got = b.next_delay().unwrap().as_secs_f64() / nominal;
                assert!(
                    (0.8 - 1e-9..=1.2 + 1e-9).contains(&got),
                    "seed {seed} attempt {n}: factor {got}"
                );
                lowest = lowest.min(got);
                highest = highest.max(got);
            }
        }
        // The jitter really spreads: both ends of the range are reached.
        assert!(lowest < 0.81, "lowest factor {lowest}");
        assert!(highest > 1.19, "highest factor {highest}");
    }

    #[test]
    fn cap_holds_with_jitter() {
        let config = BackoffConfig {
            jitter: 0.9,
            ..BackoffConfig::default()
        };
        for seed in 0..500 {
            let mut b = Backoff::new(config.clone(), seed);
            for _ in 0..20 {
                let d = b.next_delay().unwrap();
                assert!(d <= config.max, "seed {seed}: {d:?} > max");
                assert!(!d.is_zero());
            }
        }
    }

    #[test]
    fn max_attempts_gives_up() {
        let config = BackoffConfig {
            max_attempts: Some(3),
            ..no_jitter()
        };
        let mut b = Backoff::new(config, 7);
        assert_eq!(b.next_delay(), Some(ms(100)));
        assert_eq!(b.next_delay(), Some(ms(200)));
        assert_eq!(b.next_delay(), Some(ms(400)));
        assert_eq!(b.attempt(), 3);
        assert_eq!(b.next_delay(), None);
        assert_eq!(b.next_delay(), None);
        assert_eq!(b.attempt(), 3);
    }

    #[test]
    fn max_attempts_zero_never_retries() {
        let config = BackoffConfig {
            max_attempts: Some(0),
            ..no_jitter()
        };
        assert_eq!(Backoff::new(config, 7).next_delay(), None);
    }

    #[test]
    fn max_attempts_counts_again_after_a_probation_reset() {
        let config = BackoffConfig {
            max_attempts: Some(2),
            ..no_jitter()
        };
        let t0 = Instant::now();
        let mut b = Backoff::new(config, 7);
        b.next_delay().unwrap();
        b.next_delay().unwrap();
        assert_eq!(b.next_delay(), None);
        b.on_connected(t0);
        b.on_disconnected(t0 + Duration::from_secs(2));
        assert_eq!(b.next_delay(), Some(ms(100)));
    }

    #[test]
    fn probation_served_resets_attempts() {
        let t0 = Instant::now();
        let mut b = Backoff::new(no_jitter(), 7);
        for _ in 0..4 {
            b.next_delay();
        }
        b.on_connected(t0);
        // Exactly the probation counts as healthy.
        b.on_disconnected(t0 + Duration::from_secs(2));
        assert_eq!(b.attempt(), 0);
        assert_eq!(b.next_delay(), Some(ms(100)));
        assert_eq!(b.attempt(), 1);
    }

    #[test]
    fn short_connection_does_not_reset_attempts() {
        let t0 = Instant::now();
        let mut b = Backoff::new(no_jitter(), 7);
        assert_eq!(b.next_delay(), Some(ms(100)));
        assert_eq!(b.next_delay(), Some(ms(200)));
        // A proxy that accepts then closes: connected for 1 ns short of 2 s.
        b.on_connected(t0);
        b.on_disconnected(t0 + Duration::from_secs(2) - Duration::from_nanos(1));
        assert_eq!(b.attempt(), 2);
        assert_eq!(b.next_delay(), Some(ms(400)));
        // Several quick accept-then-close cycles keep growing the delay.
        for (i, want) in [800, 1600, 3200, 5000].into_iter().enumerate() {
            let at = t0 + Duration::from_secs(10 + i as u64);
            b.on_connected(at);
            b.on_disconnected(at + ms(5));
            assert_eq!(b.next_delay(), Some(ms(want)));
        }
    }

    #[test]
    fn graceful_close_retries_at_once_then_backs_off_from_initial() {
        let t0 = Instant::now();
        let mut b = Backoff::new(no_jitter(), 7);
        // Rotated every 300 ms (max_age), far within the 2 s probation:
        // every rotation is followed by one attempt at once, never a delay,
        // and the count never grows.
        for rotation in 0..8u64 {
            let at = t0 + ms(1000 * rotation);
            b.on_connected(at);
            b.on_peer_closed_gracefully(at + ms(300));
            assert_eq!(b.attempt(), 0, "rotation {rotation}");
            assert_eq!(b.next_delay(), Some(Duration::ZERO), "rotation {rotation}");
            assert_eq!(b.attempt(), 1, "rotation {rotation}");
        }
        // The provider is really gone (the free attempt was refused): the
        // delays start at `initial`, as after any healthy connection.
        let delays: Vec<_> = (0..4).map(|_| b.next_delay().unwrap()).collect();
        assert_eq!(delays, [ms(100), ms(200), ms(400), ms(800)]);
        assert_eq!(b.attempt(), 5);
    }

    #[test]
    fn graceful_close_after_a_failed_free_attempt_keeps_initial_first() {
        let t0 = Instant::now();
        let mut b = Backoff::new(no_jitter(), 7);
        b.on_connected(t0);
        b.on_peer_closed_gracefully(t0 + ms(300));
        assert_eq!(b.next_delay(), Some(Duration::ZERO));
        // The free attempt connected, then the connection failed at once:
        // no probation served, the next delay is still the first one.
        b.on_connected(t0 + ms(301));
        b.on_disconnected(t0 + ms(310));
        assert_eq!(b.next_delay(), Some(ms(100)));
        assert_eq!(b.attempt(), 2);
    }

    #[test]
    fn graceful_close_sooner_than_initial_gets_no_free_attempt() {
        let t0 = Instant::now();
        let mut b = Backoff::new(no_jitter(), 7);
        for _ in 0..3 {
            b.next_delay();
        }
        // A peer that closes gracefully right after the connect: the count
        // starts over, but the consumer still waits `initial` first.
        b.on_connected(t0);
        b.on_peer_closed_gracefully(t0 + ms(99));
        assert_eq!(b.next_delay(), Some(ms(100)));
        // Exactly `initial` is long enough.
        b.on_connected(t0 + ms(1000));
        b.on_peer_closed_gracefully(t0 + ms(1100));
        assert_eq!(b.next_delay(), Some(Duration::ZERO));
        // Without a connection, nothing changes.
        b.on_peer_closed_gracefully(t0 + ms(5000));
        assert_eq!(b.next_delay(), Some(ms(100)));
    }

    #[test]
    fn graceful_close_free_attempt_counts_towards_max_attempts() {
        let t0 = Instant::now();
        let config = BackoffConfig {
            max_attempts: Some(2),
            ..no_jitter()
        };
        let mut b = Backoff::new(config.clone(), 7);
        b.on_connected(t0);
        b.on_peer_closed_gracefully(t0 + ms(300));
        assert_eq!(b.next_delay(), Some(Duration::ZERO));
        assert_eq!(b.next_delay(), Some(ms(100)));
        assert_eq!(b.next_delay(), None);
        // `max_attempts: Some(0)` still means never reconnect.
        let mut never = Backoff::new(
            BackoffConfig {
                max_attempts: Some(0),
                ..config
            },
            7,
        );
        never.on_connected(t0);
        never.on_peer_closed_gracefully(t0 + ms(300));
        assert_eq!(never.next_delay(), None);
    }

    #[test]
    fn disconnect_without_connect_changes_nothing() {
        let t0 = Instant::now();
        let mut b = Backoff::new(no_jitter(), 7);
        b.next_delay();
        b.on_disconnected(t0 + Duration::from_secs(100));
        assert_eq!(b.attempt(), 1);
        // on_disconnected consumes the connection: a second one does not reset.
        b.on_connected(t0);
        b.on_disconnected(t0 + ms(1));
        b.on_disconnected(t0 + Duration::from_secs(100));
        assert_eq!(b.attempt(), 1);
    }

    #[test]
    fn same_seed_same_delays_different_seed_different_delays() {
        let run = |seed| {
            let mut b = Backoff::new(BackoffConfig::default(), seed);
            (0..16).map(|_| b.next_delay().unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(run(12345), run(12345));
        assert_ne!(run(12345), run(12346));
    }

    #[test]
    fn splitmix64_matches_reference_output() {
        // First outputs for seed 1234567 from the reference C implementation.
        let mut rng = SplitMix64(1234567);
        assert_eq!(rng.next_u64(), 6457827717110365317);
        assert_eq!(rng.next_u64(), 3203168211198807973);
        for _ in 0..1000 {
            let u = rng.next_unit();
            assert!((0.0..1.0).contains(&u));
        }
    }
}
