//! Timers: a hierarchical hashed timer wheel (pure) and the thread that drives it.
//!
//! - [`Wheel`] is the pure core: tokio-style, 6 levels × 64 slots over plain
//!   `u64` ticks, O(1) insert and cancel through [`TimerKey`]s, empty ticks
//!   skipped through per-level occupancy bitmaps. It has no clock of its own:
//!   time moves only when [`Wheel::advance`] is called, so it is tested with
//!   plain numbers.
//! - [`TimerThread`] is the thin shell: the one place that converts
//!   [`Instant`](std::time::Instant)s to ticks. It sleeps on its command
//!   channel until the next expiry or command, and hands each wake-up's
//!   expired values to a callback in one batch. [`TimerHandle`]s arm and
//!   disarm timers by id from any thread.
//!
//! Deadlines are rounded up to the next tick, never down: a timer never fires
//! before its instant.

mod thread;
mod wheel;

pub use thread::{TimerHandle, TimerThread};
pub use wheel::{TimerKey, Wheel};
