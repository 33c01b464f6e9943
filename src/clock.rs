//! A process-wide monotonic origin so instants can be stored in atomics.
//!
//! Threads other than a connection's event loop (callers, workers) record when
//! they last wrote to it; an `AtomicU64` of nanoseconds since [`origin`] is the
//! cheapest way to share that, and the loop turns it back into an `Instant`.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::config::MAX_SETTING_DURATION;

static ORIGIN: OnceLock<Instant> = OnceLock::new();

/// The first instant pulse looked at in this process.
pub(crate) fn origin() -> Instant {
    *ORIGIN.get_or_init(Instant::now)
}

/// Nanoseconds from [`origin`] to `at` (0 for instants before it).
pub(crate) fn to_nanos(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(origin()).as_nanos()).unwrap_or(u64::MAX)
}

/// The instant `nanos` after [`origin`].
pub(crate) fn from_nanos(nanos: u64) -> Instant {
    origin() + Duration::from_nanos(nanos)
}

/// `at` for an `AtomicU64` in which 0 means "never": [`to_nanos`], at
/// least 1. Read back with [`from_stamp`].
pub(crate) fn to_stamp(at: Instant) -> u64 {
    to_nanos(at).max(1)
}

/// The instant a [`to_stamp`] value stands for; `None` for 0 ("never").
pub(crate) fn from_stamp(stamp: u64) -> Option<Instant> {
    (stamp != 0).then(|| from_nanos(stamp))
}

/// The instant `wait` after `start`, with `wait` capped at
/// [`MAX_SETTING_DURATION`]: a caller's own timeout may be any `Duration`
/// (`Duration::MAX` for "as long as it takes"), and `start + wait` past what
/// an `Instant` holds would panic.
pub(crate) fn deadline_after(start: Instant, wait: Duration) -> Instant {
    start + wait.min(MAX_SETTING_DURATION)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_before_the_origin_clamp_to_it() {
        let early = Instant::now();
        let origin = origin();
        assert!(from_nanos(to_nanos(early)) >= origin.min(early));
        assert_eq!(to_nanos(origin), 0);
    }

    #[test]
    fn round_trips_to_the_nanosecond() {
        origin();
        let now = Instant::now();
        assert_eq!(from_nanos(to_nanos(now)), now);
    }

    /// A stamp is never 0, which stands for "never"; later ones round-trip.
    #[test]
    fn a_stamp_is_never_the_never_value() {
        let origin = origin();
        assert_eq!(to_stamp(origin), 1);
        assert_eq!(from_stamp(0), None);
        let later = origin + std::time::Duration::from_millis(5);
        assert_eq!(from_stamp(to_stamp(later)), Some(later));
    }
}
