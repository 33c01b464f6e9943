//! `ConnectionConfig::loop_cpus`: event loops pinned to the CPUs asked for,
//! and a clear error (with nothing left running) for a CPU that cannot be
//! used. One test in its own binary, so no other test's loops are counted.

mod support;

use pulse::{Client, ClientConfig, Error, Server, ServerConfig};
use support::process::{allowed_cpus, thread_count, threads_allowed_cpus, threads_named};
use support::{PROMPTLY, demo_service, server_with, wait_until};

#[test]
#[cfg(target_os = "linux")]
fn loops_run_on_the_cpus_asked_for_and_a_missing_cpu_is_refused() {
    // The provider's loops go to the last CPU this process may use, the
    // client's to the first: on two or more CPUs both differ from the
    // unpinned default (all of them).
    let allowed = allowed_cpus();
    let (first, last) = (allowed[0], allowed[allowed.len() - 1]);

    let mut config = ServerConfig {
        event_loops: 2,
        ..ServerConfig::default()
    };
    config.connection.loop_cpus = vec![last];
    let server = server_with(config, Vec::new());
    let mut client_config = ClientConfig::default();
    client_config.connection.loop_cpus = vec![first];
    let client = Client::connect(server.local_addr(), client_config).expect("connect");
    assert_eq!(client.call::<_, u64>("demo", "ping", &7).unwrap(), 7);

    // Thread names are cut to 15 bytes: pulse-server-loop-N, pulse-client-loop-0.
    let (first, last) = (first.to_string(), last.to_string());
    assert_eq!(
        threads_allowed_cpus("pulse-server-lo"),
        vec![last.clone(), last]
    );
    assert_eq!(threads_allowed_cpus("pulse-client-lo"), vec![first]);
    drop(client);
    server.shutdown();

    // CPU 1023 is within range but exists on no test machine: refused by the
    // OS, reported by bind with the loop and CPU named, and the threads that
    // had started are stopped again.
    // The count to come back to, taken once the first pair's threads have
    // left /proc/self/task: one still listed would raise it for good.
    wait_until(
        PROMPTLY,
        "the first server's and client's threads to go",
        || threads_named("pulse-") == 0,
    );
    let threads_before = thread_count();
    let mut config = ServerConfig::default();
    config.connection.loop_cpus = vec![1023];
    let refused = Server::builder()
        .config(config)
        .service(demo_service())
        .bind("127.0.0.1:0");
    match refused {
        Err(Error::Io { op, .. }) => {
            assert!(op.contains("CPU 1023") && op.contains("loop_cpus"), "{op}");
        }
        Err(other) => panic!("expected an I/O error naming the CPU, got {other}"),
        Ok(_) => panic!("a server pinned to CPU 1023 started"),
    }
    // A thread that was joined can still be listed in /proc/self/task for
    // a moment (the kernel reaps it after the join returns): wait for the
    // count to come back, within PROMPTLY. A thread really left behind
    // never goes, and fails this after 10 s.
    wait_until(PROMPTLY, "the refused server's threads to go", || {
        thread_count() == threads_before
    });

    // The same for a client: its loop starts, and fails to pin itself, as
    // the client is handed it; the error names the loop and the CPU, and
    // nothing is left running.
    let mut client_config = ClientConfig::default();
    client_config.connection.loop_cpus = vec![1023];
    for attempt in 1..=2 {
        match Client::connect_lazy("127.0.0.1:9", client_config.clone()) {
            Err(Error::Io { op, .. }) => {
                assert!(
                    op.contains("CPU 1023") && op.contains("loop_cpus"),
                    "attempt {attempt}: {op}"
                );
            }
            Err(other) => panic!("expected an I/O error naming the CPU, got {other}"),
            Ok(_) => panic!("a client pinned to CPU 1023 started"),
        }
    }
    wait_until(PROMPTLY, "the refused clients' threads to go", || {
        thread_count() == threads_before
    });
}
