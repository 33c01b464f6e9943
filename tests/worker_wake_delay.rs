//! Pool jobs queued behind a busy worker (`ServerConfig::worker_wake_delay`):
//! a job is left for a while to the worker running the one before it, and
//! the event loops wake sleeping workers for it once it waited too long. A
//! burst of calls whose handlers block until all of them run at once must
//! therefore still spread over the pool, whether the loops busy-poll or
//! sleep between events, and with the delay off too.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use pulse::{Client, ClientConfig, ServerConfig, ServiceBuilder};
use support::{heartbeat, ms, server_with};

/// Calls made at once, each blocking its worker until all are running.
const CALLS: usize = 8;

/// Handlers running `meet` right now, and the condition they wait on.
#[derive(Default)]
struct Meeting {
    inside: Mutex<usize>,
    all_in: Condvar,
}

impl Meeting {
    /// Waits until `CALLS` handlers are inside at once (true), or 5 s.
    fn meet(&self) -> bool {
        let mut inside = self.inside.lock();
        *inside += 1;
        self.all_in.notify_all();
        let deadline = Instant::now() + Duration::from_secs(5);
        while *inside < CALLS {
            if self.all_in.wait_until(&mut inside, deadline).timed_out() {
                return *inside >= CALLS;
            }
        }
        true
    }
}

/// Makes `CALLS` concurrent calls to a pool handler that blocks until all
/// of them are inside; returns how many met and how long the burst took.
fn burst_of_blocking_calls(wake_delay: Duration, busy_poll: Duration) -> (usize, Duration) {
    let meeting = Arc::new(Meeting::default());
    let service = {
        let meeting = Arc::clone(&meeting);
        ServiceBuilder::new("meet").method("all", move |_: ()| Ok::<_, String>(meeting.meet()))
    };
    let mut server_config = ServerConfig {
        worker_wake_delay: wake_delay,
        ..ServerConfig::default()
    };
    server_config.connection.busy_poll = busy_poll;
    // No heartbeat timers to wake a sleeping loop meanwhile.
    server_config.connection.heartbeat = heartbeat(60_000, 3);
    let server = server_with(server_config, vec![service]);
    let mut client_config = ClientConfig::default();
    client_config.connection.busy_poll = busy_poll;
    client_config.connection.heartbeat = heartbeat(60_000, 3);
    let client = Client::connect(server.local_addr(), client_config).unwrap();
    let started = Instant::now();
    let met = std::thread::scope(|scope| {
        let calls: Vec<_> = (0..CALLS)
            .map(|_| scope.spawn(|| client.call::<_, bool>("meet", "all", &())))
            .collect();
        calls
            .into_iter()
            .map(|call| call.join())
            .filter(|outcome| matches!(outcome, Ok(Ok(true))))
            .count()
    });
    let took = started.elapsed();
    drop(client);
    server.shutdown();
    (met, took)
}

#[test]
fn blocking_jobs_behind_a_busy_worker_still_spread_over_the_pool() {
    for (wake_delay, busy_poll) in [
        (Duration::from_micros(100), Duration::ZERO), // the loops sleep between events
        (Duration::from_micros(100), Duration::from_micros(100)), // they poll on after calls
        (ms(20), Duration::ZERO),                     // a long delay, still bounded
        (Duration::ZERO, Duration::ZERO),             // every job wakes a worker
    ] {
        let (met, took) = burst_of_blocking_calls(wake_delay, busy_poll);
        eprintln!(
            "worker_wake_delay {wake_delay:?}, busy_poll {busy_poll:?}: {met} of {CALLS} met in {took:?}"
        );
        assert_eq!(
            met, CALLS,
            "worker_wake_delay {wake_delay:?}, busy_poll {busy_poll:?}: only {met} of {CALLS} blocking calls ran at once (took {took:?})"
        );
    }
}
