//! The worker pool's spin (`ServerConfig::worker_spin`): after a job, one
//! idle worker keeps looking for the next one for `worker_spin`, then
//! sleeps; with `Duration::ZERO` it sleeps at once. Measured as the CPU time
//! of the provider's worker threads; this binary holds one test so that no
//! other pool runs meanwhile. Confined to one core
//! (`taskset -c 0 cargo test --test worker_spin`) workers never spin, and
//! the test checks that instead.

mod support;

use std::time::Duration;

use pulse::{Client, ClientConfig, ServerConfig};
use support::process::threads_cpu_ticks;
use support::{heartbeat, ms, server_with};

/// The provider's worker threads (`pulse-worker-N`).
const WORKERS: &str = "pulse-worker-";

/// CPU ticks the provider's workers use in the second after one pool call,
/// with this `worker_spin` (heartbeats a minute apart, loops never polling).
fn worker_ticks_after_a_call(worker_spin: Duration) -> u64 {
    let mut server_config = ServerConfig {
        event_loops: 1,
        worker_spin,
        ..ServerConfig::default()
    };
    server_config.connection.busy_poll = Duration::ZERO;
    server_config.connection.heartbeat = heartbeat(60_000, 3);
    let server = server_with(server_config, Vec::new());
    let mut client_config = ClientConfig::default();
    client_config.connection.busy_poll = Duration::ZERO;
    client_config.connection.heartbeat = heartbeat(60_000, 3);
    let client = Client::connect(server.local_addr(), client_config).unwrap();
    // Workers starting up find the queue empty too: let that spin end.
    std::thread::sleep(worker_spin + ms(200));
    let before = threads_cpu_ticks(WORKERS);
    let value = rmpv::Value::from(7);
    assert_eq!(
        client
            .call::<_, rmpv::Value>("demo", "echo", &value)
            .unwrap(),
        value
    );
    std::thread::sleep(ms(1000));
    let ticks = threads_cpu_ticks(WORKERS) - before;
    drop(client);
    server.shutdown();
    ticks
}

#[test]
fn a_worker_spins_after_a_job_for_worker_spin_then_sleeps() {
    let one_core = std::thread::available_parallelism().map_or(1, |n| n.get()) == 1;
    // A 500 ms spin is about 50 ticks at the usual 100 Hz; a spin that never
    // ended would be the whole second, about 100.
    let spinning = worker_ticks_after_a_call(ms(500));
    if one_core {
        assert!(
            spinning < 10,
            "on one core the workers used {spinning} ticks after a call: one spun"
        );
    } else {
        assert!(
            (15..=75).contains(&spinning),
            "with worker_spin 500 ms the workers used {spinning} ticks in the second after a call"
        );
    }
    let sleeping = worker_ticks_after_a_call(Duration::ZERO);
    assert!(
        sleeping < 10,
        "with worker_spin zero the workers used {sleeping} ticks after a call"
    );
}
