//! Real network partitions, made by the kernel in a network namespace of
//! the test's own: packets are dropped by routing, so what a partition does
//! to TCP happens for real — data stays unacknowledged and is retransmitted,
//! send buffers fill and writes return `EAGAIN`, SYNs go unanswered (a host
//! that is down) — which the userspace proxy of `support::proxy` cannot do
//! (its blackhole reads and discards, so the kernel ACKs every byte).
//!
//! # The namespace
//!
//! Each test re-executes this test binary for itself alone
//! (`current_exe() <name> --exact --test-threads=1`, with
//! [`CHILD_ENV`] set), and the forked child calls
//! `unshare(CLONE_NEWNET)` before `exec`: the whole child process, every
//! thread pulse starts in it included, lives in a new, empty network
//! namespace, and the test harness (which runs tests on several threads)
//! and the host are never touched. Where that is refused (not root), the
//! child makes a user namespace of its own as well, in which it is root
//! with its uid and gid mapped (what `unshare -rn` does), so the tests also
//! run unprivileged where the kernel allows user namespaces. The
//! namespaces, routes and device vanish with the child; the child also
//! dies with the thread that started it (`PR_SET_PDEATHSIG`), and is
//! killed on the parent's deadline. In the child, `ip` (iproute2) sets up:
//!
//! * `lo` up, the provider's address [`PROVIDER_IP`] on it;
//! * a device `pt0` that drops everything routed to it silently (no RST,
//!   no ICMP, no error to the sender): an `ifb` device, which discards
//!   what was not redirected to it by a traffic-control action, with
//!   [`SINK_IP`] on it, and routing table 100 whose default route is `pt0`;
//! * the `local` table's rule moved from priority 0 to 10, so that rules
//!   before it can take local traffic.
//!
//! A partition adds rules 5 and 6, `to PROVIDER_IP lookup 100` and
//! `from PROVIDER_IP lookup 100` (in one `ip -batch`): every packet to or
//! from the provider's address goes to `pt0` and is lost. Healing deletes
//! them; TCP's retransmissions then deliver what waited. A SYN sent during
//! a partition leaves from [`SINK_IP`] (the source `pt0`'s route gives)
//! and is lost too, so a connect attempt hangs in SYN-SENT like one to a
//! host that is down. A partition of one direction matches the provider's
//! port instead (`dport`/`sport`), since a local connection may have the
//! provider's address at both ends. (Blackhole rules, the obvious tool, do
//! not do all that: a new connect fails at once with `EINVAL`. Loopback
//! addresses do not work either: the kernel refuses to route `127.0.0.0/8`
//! sources out of a device that is not a loopback, and a SYN sent
//! meanwhile keeps the source 0.0.0.0 and never connects after healing.
//! This kernel has no netem, veth, dummy or tc classifiers.)
//!
//! # Without namespaces
//!
//! Where no network namespace can be made (neither root nor unprivileged
//! user namespaces) or `ip` is missing, the tests *fail*, saying so,
//! rather than pass without checking anything: the machines `make test`
//! runs on (CI included) run as root, `make test` installs iproute2 where
//! `ip` is missing, and a silent skip would hide that the partition
//! guarantees went unchecked. `PULSE_SKIP_NETNS=1` skips them explicitly
//! (each prints a loud line).
//!
//! # The scenarios
//!
//! a. an idle connection partitioned and healed three times: both sides
//!    find it within the bound, reconnect attempts time out at
//!    `connect_attempt_timeout` with the backoff's delays between them,
//!    calls meanwhile fail with `NotConnected` at their timeout, the client
//!    reconnects after healing, and no fd or thread is left over;
//! b. a connection partitioned under load (calls, pipelined calls with
//!    32 KiB bodies, one-way calls flooding): every operation ends within
//!    its timeout with an error the partition explains, the full write
//!    queue refuses calls at once with `Overloaded`, memory stays bounded,
//!    everything works again after healing;
//! c. a provider whose host is down from the start: `Client::connect`
//!    fails at `connect_timeout` saying the attempts timed out and leaves
//!    nothing behind; a lazily connected client retries with backoff, can
//!    be shut down meanwhile at once, and connects after healing;
//! d. one direction lost: the side that hears nothing finds it within the
//!    bound and its Close still reaches the other side at once;
//! e. a client dropped and a server shut down while the partition keeps
//!    their queued bytes from being written: each returns after its
//!    `linger`, not before, not much later.
//!
//! Each child runs one scenario; the parent runs them one at a time (their
//! timing bounds assume a machine not shared with another scenario). Every
//! server, client and thread of a scenario is stopped by a `Drop`, and a
//! child that fails or hangs is killed; its output is shown by the parent.
//! Run with `cargo test --test partition -- --nocapture` to see the
//! measured times.

mod liveness_support;
mod support;

use std::collections::BTreeMap;
use std::io::Read;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use liveness_support::{
    EventLog, Stamped, is_connected, is_disconnected, is_reconnecting, reason_of,
};
use pulse::config::BackoffConfig;
use pulse::{
    Client, ClientConfig, ConnectionConfig, DisconnectReason, Error, Event, Server, ServerConfig,
    ServiceBuilder,
};
use support::process::{fd_count, rss_kib, threads_named};
use support::{PROMPTLY, demo_service, heartbeat, ms, wait_until};

/// Set (to the test's name) in the child that runs a scenario.
const CHILD_ENV: &str = "PULSE_PARTITION_CHILD";
/// Set to 1 to skip these tests where namespaces are not available.
const SKIP_ENV: &str = "PULSE_SKIP_NETNS";
/// The provider's address inside the namespace (on `lo`).
const PROVIDER_IP: &str = "10.77.0.2";
/// The address on the dropping device, the source of connects made during
/// a partition.
const SINK_IP: &str = "10.77.0.1";

/// A direction of a connection's traffic.
#[derive(Debug, Clone, Copy)]
enum Dir {
    /// Consumer to provider.
    Upstream,
    /// Provider to consumer.
    Downstream,
}

/// How long one scenario's child may run before the parent kills it.
const CHILD_DEADLINE: Duration = Duration::from_secs(60);

/// The timer tick (the default).
const TICK: Duration = Duration::from_millis(5);
/// Slack on every upper bound: scheduling on a loaded 2-core machine.
const MARGIN: Duration = Duration::from_secs(1);
const INTERVAL: Duration = Duration::from_millis(100);
const MAX_MISSED: u32 = 3;
/// `MAX_MISSED × INTERVAL`.
const BOUND: Duration = Duration::from_millis(300);
/// Each connect attempt's timeout in these tests.
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(300);
/// How much later than its emission an event may be stamped, for lower
/// bounds measured between two stamps (a loaded machine: the collecting
/// thread can be preempted; at 50 ms one attempt of the host-down scenario
/// once measured short without anything being wrong).
const STAMP_SLACK: Duration = Duration::from_millis(150);

// ----- running a scenario in its own namespace -------------------------------------

/// The scenarios run one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A test that runs its scenario in a network namespace of its own (see
/// [`in_netns`]), named once: the child process is told the test's name.
macro_rules! netns_test {
    ($(#[$doc:meta])* $name:ident => $scenario:expr) => {
        $(#[$doc])*
        #[test]
        fn $name() {
            in_netns(stringify!($name), $scenario);
        }
    };
}

/// Heals the partition and waits for the client's `Connected` logged after
/// entry `from` of `client_log` (within a longest backoff delay, an attempt
/// and a margin); returns when it healed and that event.
fn heal_and_reconnect(net: &Net, client_log: &EventLog, from: usize) -> (Instant, Stamped) {
    let healed = net.heal();
    let (_, up) = client_log.wait_for(
        from,
        backoff().max + ATTEMPT_TIMEOUT + MARGIN,
        "client Connected after healing",
        is_connected,
    );
    (healed, up)
}

/// What a scenario's process holds before it starts: open fds and pulse
/// client threads, which must come back to these once its clients are
/// gone (nothing of a dead connection or a failed attempt is left).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Baseline {
    fds: usize,
    client_threads: usize,
}

impl Baseline {
    fn now() -> Baseline {
        Baseline {
            fds: fd_count(),
            client_threads: threads_named("pulse-client"),
        }
    }

    /// Waits (up to `PROMPTLY`) until the process is back to this.
    fn wait_back(&self, what: &str) {
        wait_until(PROMPTLY, what, || *self == Baseline::now());
    }
}

/// Runs `scenario` in a new network namespace: in the child this test
/// binary was re-executed as (see the module docs), or, in the test
/// harness, starts that child and checks that it ran the test and passed.
fn in_netns(test: &str, scenario: fn(&Net)) {
    match std::env::var(CHILD_ENV) {
        Ok(name) if name == test => {
            // pulse's log lines, with RUST_LOG (e.g. `RUST_LOG=pulse=warn`).
            liveness_support::init_logging();
            let net = Net::setup();
            scenario(&net);
        }
        Ok(name) => panic!("{CHILD_ENV}={name} in a child asked to run {test}"),
        Err(_) => {
            let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
            run_child(test);
        }
    }
}

/// Kills and reaps the child on drop (a failing or timed-out parent too).
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

fn run_child(test: &str) {
    if std::env::var_os(SKIP_ENV).is_some_and(|v| v == "1") {
        eprintln!(
            "!!! {test}: SKIPPED ({SKIP_ENV}=1): the network partition scenario was NOT checked"
        );
        return;
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut command = Command::new(exe);
    command
        // `--include-ignored`: the parent was asked to run this test.
        .args([
            test,
            "--exact",
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, test)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // Not root: a user namespace of our own as well, in which the child is
    // root (uid and gid mapped to ours) and so may configure the network
    // namespace it owns. Prepared here: nothing may allocate after fork.
    // SAFETY: getuid and getgid cannot fail and touch no memory.
    let (uid, gid) = unsafe { (nix::libc::getuid(), nix::libc::getgid()) };
    let uid_map = std::ffi::CString::new(format!("0 {uid} 1")).expect("no NUL");
    let gid_map = std::ffi::CString::new(format!("0 {gid} 1")).expect("no NUL");
    // SAFETY: between fork and exec the closure only makes system calls on
    // memory prepared before the fork (no allocation, no lock).
    unsafe {
        command.pre_exec(move || {
            use nix::libc;
            // Die with the thread that started us, whatever happens to it.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::unshare(libc::CLONE_NEWNET) == 0 {
                return Ok(());
            }
            if libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            for (file, text) in [
                (c"/proc/self/setgroups", c"deny"),
                (c"/proc/self/uid_map", uid_map.as_c_str()),
                (c"/proc/self/gid_map", gid_map.as_c_str()),
            ] {
                let fd = libc::open(file.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let bytes = text.to_bytes();
                let written = libc::write(fd, bytes.as_ptr().cast(), bytes.len());
                libc::close(fd);
                if written != bytes.len() as isize {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = command.spawn().unwrap_or_else(|e| {
        panic!(
            "\n!!! {test}: cannot run a scenario in a new network namespace: {e}\n\
             !!! (unshare(CLONE_NEWNET) was refused, and so was a user namespace of our own:\n\
             !!! these tests need root, or unprivileged user namespaces; see tests/partition.rs).\n\
             !!! Run as root, or set {SKIP_ENV}=1 to skip the partition tests knowingly.\n"
        )
    });
    let mut child = ChildGuard(child);
    let out = drain_pipe(child.0.stdout.take());
    let err = drain_pipe(child.0.stderr.take());
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("wait for the child") {
            break Some(status);
        }
        if started.elapsed() > CHILD_DEADLINE {
            break None;
        }
        thread::sleep(ms(20));
    };
    drop(child); // kills it if it is still running, so the pipes end
    let (out, err) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    // The child's output, shown by the harness when this test fails (or
    // with --nocapture).
    eprintln!("----- {test} in its namespace: stdout -----\n{out}");
    eprintln!("----- {test} in its namespace: stderr -----\n{err}");
    let Some(status) = status else {
        panic!("{test}: the child did not finish within {CHILD_DEADLINE:?} (killed)");
    };
    assert!(
        status.success(),
        "{test}: the scenario failed in its namespace ({status}); its output is above"
    );
    assert!(
        out.contains("running 1 test") && out.contains("1 passed"),
        "{test}: the child did not run exactly this test (a wrong name?); its output is above"
    );
}

fn drain_pipe(pipe: Option<impl Read + Send + 'static>) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut pipe) = pipe {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
        text
    })
}

/// The namespace's network, set up as the module docs say. Lives only in
/// the child; everything goes with the namespace when the child exits.
struct Net {
    partitioned: AtomicBool,
}

/// Runs `ip` once with these commands (`ip -batch -`: one process, so
/// the rules of a partition go in microseconds apart); panics, with what
/// `ip` said, if any fails.
fn ip(commands: &[&str]) {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run `ip`: {e} (these tests need iproute2's `ip`)"));
    let script = commands.join("\n") + "\n";
    child
        .stdin
        .take()
        .expect("ip's stdin")
        .write_all(script.as_bytes())
        .expect("write ip's commands");
    let output = child.wait_with_output().expect("wait for ip");
    assert!(
        output.status.success(),
        "`ip -batch` of {commands:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

impl Net {
    fn setup() -> Net {
        ip(&[
            "link set lo up",
            &format!("addr add {PROVIDER_IP}/32 dev lo"),
            "link add pt0 type ifb",
            &format!("addr add {SINK_IP}/32 dev pt0"),
            "link set pt0 up",
            "route add default dev pt0 table 100",
            "rule add pref 10 lookup local",
            "rule del pref 0",
        ]);
        Net {
            partitioned: AtomicBool::new(false),
        }
    }

    /// Drops every packet to or from the provider from now on. Returns when
    /// it started (before the first rule went in: a lower bound on the last
    /// packet that passed) and when it was complete (after the last rule).
    fn partition(&self) -> (Instant, Instant) {
        self.cut(&format!("to {PROVIDER_IP}"), &format!("from {PROVIDER_IP}"))
    }

    /// Drops the packets of one direction only of the provider at `port`:
    /// consumer to provider (`Upstream`) or provider to consumer
    /// (`Downstream`). The consumer's own address may be the provider's
    /// (a local connection takes its destination as its source), so the
    /// rules tell the directions apart by the provider's port.
    fn partition_one_way(&self, dir: Dir, port: u16) -> (Instant, Instant) {
        // A rule that matches nothing stands in for the other direction.
        let nothing = "to 10.77.255.255/32";
        match dir {
            Dir::Upstream => self.cut(
                &format!("to {PROVIDER_IP} ipproto tcp dport {port}"),
                nothing,
            ),
            Dir::Downstream => self.cut(
                nothing,
                &format!("from {PROVIDER_IP} ipproto tcp sport {port}"),
            ),
        }
    }

    /// Adds rules 5 and 6, sending what `first` and `second` select to the
    /// dropping device.
    fn cut(&self, first: &str, second: &str) -> (Instant, Instant) {
        let started = Instant::now();
        self.partitioned.store(true, Ordering::SeqCst);
        ip(&[
            &format!("rule add pref 5 {first} lookup 100"),
            &format!("rule add pref 6 {second} lookup 100"),
        ]);
        let done = Instant::now();
        eprintln!(
            "(partition rules in, {:?} after `ip` started)",
            done - started
        );
        (started, done)
    }

    /// Lets packets through again; returns when the rules are gone.
    fn heal(&self) -> Instant {
        ip(&["rule del pref 5", "rule del pref 6"]);
        self.partitioned.store(false, Ordering::SeqCst);
        Instant::now()
    }

    /// A provider address (port 0: any free port).
    fn provider_bind_addr(&self) -> SocketAddr {
        format!("{PROVIDER_IP}:0").parse().expect("an address")
    }
}

impl Drop for Net {
    /// Heals a partition a failing scenario left, so that the clients and
    /// servers dropped after it close without waiting out their lingers.
    fn drop(&mut self) {
        if self.partitioned.load(Ordering::SeqCst) {
            let _ = Command::new("ip")
                .args(["rule", "del", "pref", "5"])
                .status();
            let _ = Command::new("ip")
                .args(["rule", "del", "pref", "6"])
                .status();
        }
    }
}

// ----- fixtures --------------------------------------------------------------------

fn connection() -> ConnectionConfig {
    ConnectionConfig {
        heartbeat: heartbeat(INTERVAL.as_millis() as u64, MAX_MISSED),
        timer_tick: TICK,
        ..ConnectionConfig::default()
    }
}

fn server(net: &Net, extra: Option<ServiceBuilder>) -> Server {
    let mut builder = Server::builder()
        .config(ServerConfig {
            connection: connection(),
            ..ServerConfig::default()
        })
        .service(demo_service());
    if let Some(extra) = extra {
        builder = builder.service(extra);
    }
    builder
        .bind(net.provider_bind_addr())
        .expect("bind the provider's address")
}

/// Backoff 100 ms × 2 up to 400 ms, no jitter (so the delays can be
/// checked exactly), probation 100 ms.
fn backoff() -> BackoffConfig {
    BackoffConfig {
        initial: ms(100),
        multiplier: 2.0,
        max: ms(400),
        jitter: 0.0,
        max_attempts: None,
        probation: ms(100),
    }
}

fn client_config() -> ClientConfig {
    ClientConfig {
        connection: connection(),
        backoff: backoff(),
        call_timeout: Duration::from_secs(1),
        connect_attempt_timeout: ATTEMPT_TIMEOUT,
        connect_timeout: Duration::from_secs(1),
        ..ClientConfig::default()
    }
}

fn delay_of(e: &Event) -> Duration {
    match e {
        Event::Reconnecting { delay, .. } => *delay,
        other => panic!("not a Reconnecting: {other:?}"),
    }
}

/// Checks the `Reconnecting` events of attempts that timed out during a
/// partition: the delays follow the backoff (100, 200, 400, 400, ... ms;
/// no jitter), and each attempt took `ATTEMPT_TIMEOUT` (at most the margin
/// more): the next `Reconnecting` comes `delay + ATTEMPT_TIMEOUT` after
/// the one before. An event is stamped when the collector thread gets it,
/// a little late, and the earlier one's lateness shortens a difference:
/// the lower bound allows [`STAMP_SLACK`] (the strict one, from an instant
/// taken before the first attempt, is checked by the host-down scenario).
/// The attempts together are checked too: a stamp's lateness cancels out
/// of the sum but for the first one's, so attempts that each fail a little
/// early (within the slack) still fail the sum.
/// Returns the attempts' measured durations. `first_free`: the connection
/// ended with the provider's Close(HeartbeatTimeout), after which the first
/// attempt waits no delay (the consumer's silence, not the provider's
/// failure) and the delays go on from `initial`.
fn check_attempts(reconnecting: &[Stamped], what: &str, first_free: bool) -> Vec<Duration> {
    let delays: Vec<Duration> = reconnecting.iter().map(|s| delay_of(&s.event)).collect();
    for (i, delay) in delays.iter().enumerate() {
        let expected = match (first_free, i) {
            (true, 0) => Duration::ZERO,
            (true, i) => (backoff().initial * 2u32.pow(i as u32 - 1)).min(backoff().max),
            (false, i) => (backoff().initial * 2u32.pow(i as u32)).min(backoff().max),
        };
        assert_eq!(
            *delay,
            expected,
            "{what}: attempt {} had delay {delay:?}, the backoff gives {expected:?}; delays {delays:?}",
            i + 1
        );
    }
    let mut took = Vec::new();
    for pair in reconnecting.windows(2) {
        let attempt = pair[1].at - pair[0].at - delay_of(&pair[0].event);
        assert!(
            attempt + STAMP_SLACK >= ATTEMPT_TIMEOUT,
            "{what}: an attempt failed after {attempt:?}, before connect_attempt_timeout {ATTEMPT_TIMEOUT:?}"
        );
        assert!(
            attempt <= ATTEMPT_TIMEOUT + TICK + MARGIN,
            "{what}: an attempt took {attempt:?} (connect_attempt_timeout {ATTEMPT_TIMEOUT:?})"
        );
        took.push(attempt);
    }
    if let (Some(first), Some(last)) = (reconnecting.first(), reconnecting.last()) {
        let attempts = reconnecting.len() - 1;
        let delays: Duration = reconnecting[..attempts]
            .iter()
            .map(|s| delay_of(&s.event))
            .sum();
        let all = last.at - first.at - delays;
        assert!(
            all + STAMP_SLACK >= ATTEMPT_TIMEOUT * attempts as u32,
            "{what}: {attempts} attempts failed after {all:?} in all, before \
             {attempts} × connect_attempt_timeout {ATTEMPT_TIMEOUT:?}: {took:?}"
        );
    }
    took
}

/// A side declared its peer dead at `at`, in a partition that began at
/// `cut` and was complete at `t0`: within the bound (plus a tick and the
/// margin) of `t0`, and not before the bound counted from its last read,
/// which came at most an interval and a tick before `cut` (each side's
/// peer pings it every interval).
fn check_detection(side: &str, cut: Instant, t0: Instant, at: Instant) {
    let took = at.saturating_duration_since(t0);
    assert!(
        took <= BOUND + TICK + MARGIN,
        "{side} found the partition only after {took:?} (bound {BOUND:?})"
    );
    let since_cut = at.saturating_duration_since(cut);
    assert!(
        since_cut >= BOUND - INTERVAL - TICK,
        "{side} declared its peer dead {since_cut:?} into the partition (bound {BOUND:?})"
    );
}

fn events_since(log: &EventLog, from: usize) -> Vec<Stamped> {
    log.snapshot().into_iter().skip(from).collect()
}

// ----- a. an idle connection partitioned, healed, several times ---------------------

netns_test! {
    a_partitioned_idle_connection_is_detected_by_both_sides_and_recovers_without_leaks => partition_idle
}

fn partition_idle(net: &Net) {
    const CYCLES: usize = 3;
    let server = server(net, None);
    let server_log = EventLog::start("server", server.events());
    let client = Client::connect(server.local_addr(), client_config()).expect("connect");
    let client_log = EventLog::start("client", client.events());
    assert_eq!(client.call::<_, u64>("demo", "ping", &1u64).unwrap(), 1);
    wait_until(PROMPTLY, "a first answered heartbeat", || {
        client.rtt().is_some()
    });
    let baseline = Baseline::now();
    eprintln!("baseline: {baseline:?}");

    for cycle in 1..=CYCLES {
        // Past the backoff's probation, so that the attempts count from 1
        // again, and with heartbeats flowing both ways.
        thread::sleep(backoff().probation + INTERVAL * 2);
        let (c_from, s_from) = (client_log.len(), server_log.len());
        let (cut, t0) = net.partition();

        // Both sides find the silence within the bound, never much before.
        let (dead_i, dead) = client_log.wait_for(
            c_from,
            BOUND + TICK + MARGIN,
            "client Disconnected",
            is_disconnected,
        );
        assert_eq!(
            reason_of(&dead.event),
            DisconnectReason::HeartbeatTimeout,
            "{}",
            client_log.dump(c_from, t0)
        );
        let (_, s_dead) = server_log.wait_for(
            s_from,
            BOUND + TICK + MARGIN,
            "server Disconnected",
            is_disconnected,
        );
        assert_eq!(
            reason_of(&s_dead.event),
            DisconnectReason::HeartbeatTimeout,
            "{}",
            server_log.dump(s_from, t0)
        );
        let (c_took, s_took) = (dead.at - t0, s_dead.at - t0);
        check_detection("client", cut, t0, dead.at);
        check_detection("server", cut, t0, s_dead.at);
        wait_until(PROMPTLY, "the provider to release the consumer", || {
            server.connection_count() == 0
        });

        // Reconnect attempts meet SYNs nobody answers: each ends at
        // connect_attempt_timeout, the delays between them follow the
        // backoff. Let four attempts fail (about 2.3 s).
        let (_, fourth) = client_log.wait_for(
            dead_i,
            (ATTEMPT_TIMEOUT + backoff().max) * 4 + MARGIN,
            "the fourth Reconnecting",
            |e| matches!(e, Event::Reconnecting { attempt: 4, .. }),
        );
        let during = events_since(&client_log, c_from);
        let reconnecting: Vec<Stamped> = during
            .iter()
            .filter(|s| is_reconnecting(&s.event))
            .cloned()
            .collect();
        assert!(
            !during.iter().any(|s| is_connected(&s.event)),
            "connected during the partition:\n{}",
            client_log.dump(c_from, t0)
        );
        let attempts = check_attempts(&reconnecting, "partition", false);
        assert!(matches!(
            client.state(),
            pulse::ConnectionState::Connecting { .. }
        ));
        // A call meanwhile waits for a connection and fails at its timeout.
        let started = Instant::now();
        let failed = client.call_timeout::<_, u64>("demo", "ping", &2u64, ms(200));
        let waited = started.elapsed();
        match &failed {
            Err(Error::NotConnected { detail, .. }) => assert!(
                detail.contains("connect timed out") || detail.contains("heartbeat"),
                "NotConnected should say why: {failed:?}"
            ),
            other => panic!("a call during the partition: expected NotConnected, got {other:?}"),
        }
        assert!(
            waited >= ms(200) && waited <= ms(200) + MARGIN,
            "waited {waited:?}"
        );

        let (healed, up) = heal_and_reconnect(net, &client_log, client_log.len());
        let reconnect_took = up.at.saturating_duration_since(healed);
        assert_eq!(client.call::<_, u64>("demo", "ping", &3u64).unwrap(), 3);
        eprintln!(
            "cycle {cycle}: detected by the client after {c_took:?}, by the provider after {s_took:?} \
             (bound {BOUND:?}); {} attempts timed out meanwhile (each {attempts:?}), delays {:?}; \
             fourth Reconnecting {:?} in; failed call: {failed:?} after {waited:?}; \
             reconnected {reconnect_took:?} after healing",
            reconnecting.len(),
            reconnecting
                .iter()
                .map(|s| delay_of(&s.event))
                .collect::<Vec<_>>(),
            fourth.at - t0,
        );

        // Nothing of the dead connection, nor of the failed attempts, is left.
        baseline.wait_back("fds and threads back to the baseline");
        assert_eq!(server.connection_count(), 1);
    }
    drop(client);
    drop(client_log);
    wait_until(PROMPTLY, "the client's threads to stop", || {
        threads_named("pulse-client") == 0
    });
}

// ----- b. a connection partitioned under load --------------------------------------

/// What one call or one-way send did: when it started, how long it took,
/// and its outcome's name (`ok`, or the error's kind).
#[derive(Debug, Clone)]
struct Outcome {
    started: Instant,
    took: Duration,
    what: &'static str,
    error: Option<String>,
}

fn kind(result: &pulse::Result<impl Sized>) -> &'static str {
    result.as_ref().err().map_or("ok", error_kind)
}

fn error_kind(error: &Error) -> &'static str {
    match error {
        Error::Timeout(_) => "Timeout",
        Error::ConnectionLost { .. } => "ConnectionLost",
        Error::NotConnected { .. } => "NotConnected",
        Error::Overloaded(_) => "Overloaded",
        Error::Remote { .. } => "Remote",
        Error::Shutdown => "Shutdown",
        _ => "other",
    }
}

/// Threads making calls or one-way sends until stopped (or a count is
/// reached); stopped and joined on drop.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
}

/// What [`Load::spawn_timed`]'s operation returns: when it started, how
/// long it took, its kind of outcome and its error.
type Timed = (Instant, Duration, &'static str, Option<String>);

impl Load {
    fn new() -> Load {
        Load {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            outcomes: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// A thread doing `op` in a loop, at most `max` times, each timed
    /// whole.
    fn spawn(
        &mut self,
        what: &'static str,
        max: usize,
        mut op: impl FnMut(usize) -> (&'static str, Option<String>) + Send + 'static,
    ) {
        self.spawn_timed(what, max, move |i| {
            let started = Instant::now();
            let (kind, error) = op(i);
            (started, started.elapsed(), kind, error)
        });
    }

    /// [`spawn`](Self::spawn) where `op` times the operation itself
    /// (returning when it started and how long it took), so that what it
    /// does around it (waiting for its turn, backing off) is not counted.
    fn spawn_timed(
        &mut self,
        what: &'static str,
        max: usize,
        mut op: impl FnMut(usize) -> Timed + Send + 'static,
    ) {
        let (stop, outcomes) = (self.stop.clone(), self.outcomes.clone());
        self.threads.push(
            thread::Builder::new()
                .name(format!("load-{what}"))
                .spawn(move || {
                    for i in 0..max {
                        if stop.load(Ordering::SeqCst) {
                            return;
                        }
                        let (started, took, kind, error) = op(i);
                        outcomes.lock().unwrap().push(Outcome {
                            started,
                            took,
                            what,
                            error: error.map(|e| format!("{kind}: {e}")),
                        });
                    }
                })
                .expect("spawn a load thread"),
        );
    }

    fn outcomes(&self) -> Vec<Outcome> {
        self.outcomes.lock().unwrap().clone()
    }

    /// Stops the threads and returns everything they did.
    fn finish(mut self) -> Vec<Outcome> {
        self.stop_and_join();
        self.outcomes()
    }

    fn stop_and_join(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Counts of each outcome's name, per operation.
fn tally(outcomes: &[Outcome], what: &str) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for o in outcomes.iter().filter(|o| o.what == what) {
        let name = match &o.error {
            None => "ok".to_string(),
            Some(e) => e.split(':').next().unwrap_or("?").to_string(),
        };
        *counts.entry(name).or_insert(0) += 1;
    }
    counts
}

netns_test! {
    a_connection_partitioned_under_load_fails_calls_in_time_and_recovers => partition_under_load
}

fn partition_under_load(net: &Net) {
    const CALL_TIMEOUT: Duration = Duration::from_secs(1);
    const BODY: usize = 32 * 1024;
    const QUEUE: usize = 1 << 20;
    let taken = Arc::new(AtomicUsize::new(0));
    let sink = {
        let taken = taken.clone();
        ServiceBuilder::new("sink").method_inline("take", move |v: rmpv::Value| {
            taken.fetch_add(1, Ordering::Relaxed);
            Ok::<_, String>(v.as_slice().map_or(0, <[u8]>::len) as u64)
        })
    };
    let server = server(net, Some(sink));
    let server_log = EventLog::start("server", server.events());
    let mut config = client_config();
    config.call_timeout = CALL_TIMEOUT;
    // A small write queue: 1 MiB (32 one-way calls of 32 KiB).
    config.connection.max_write_queue_bytes = QUEUE;
    config.connection.max_frame_len = 256 * 1024;
    let client = Client::connect(server.local_addr(), config).expect("connect");
    let client_log = EventLog::start("client", client.events());
    assert_eq!(client.call::<_, u64>("demo", "ping", &1u64).unwrap(), 1);
    wait_until(PROMPTLY, "a first answered heartbeat", || {
        client.rtt().is_some()
    });
    thread::sleep(backoff().probation + INTERVAL);
    let rss_before = rss_kib();
    let fds = fd_count();

    let mut load = Load::new();
    for caller in 0..2 {
        let client = client.clone();
        load.spawn("call", 100_000, move |i| {
            let n = (caller * 1_000_000 + i) as u64;
            let result = client.call::<_, u64>("demo", "ping", &n);
            if let Ok(got) = &result {
                assert_eq!(*got, n, "a wrong answer");
            }
            (kind(&result), result.err().map(|e| e.to_string()))
        });
    }
    // One-way calls at 16 MB/s, a pace the healthy connection takes, and
    // as fast as they are accepted while `flood` is set (during the
    // partition): then the socket's send buffer fills, and the write queue
    // behind it.
    let flood = Arc::new(AtomicBool::new(false));
    {
        let client = client.clone();
        let body = rmpv::Value::Binary(vec![7; BODY]);
        let flood = flood.clone();
        load.spawn("one_way", 100_000, move |_| {
            if !flood.load(Ordering::SeqCst) {
                thread::sleep(ms(2));
            }
            let result = client.send_one_way("sink", "take", &body);
            (kind(&result), result.err().map(|e| e.to_string()))
        });
    }
    // Calls with a body as large as the one-way ones, started without
    // waiting (outcomes "big_start"; "big_call" once a second thread has
    // waited for them): up to 8 in flight while the connection is healthy,
    // without limit while `flood` is set. They meet the full write queue,
    // where a one-way send waits for room instead.
    let outstanding = Arc::new(AtomicUsize::new(0));
    let (to_waiter, waiter_rx) =
        crossbeam_channel::unbounded::<(Instant, pulse::PendingCall<u64>)>();
    {
        let client = client.clone();
        let body = rmpv::Value::Binary(vec![9; BODY]);
        let (flood, outstanding) = (flood.clone(), outstanding.clone());
        // Timed: `start` alone, not the wait for fewer calls in flight nor
        // the back-off after a refusal.
        load.spawn_timed("big_start", 100_000, move |_| {
            while !flood.load(Ordering::SeqCst) && outstanding.load(Ordering::SeqCst) >= 8 {
                thread::sleep(ms(1));
            }
            let started = Instant::now();
            let result = client.start::<_, u64>("sink", "take", &body);
            let took = started.elapsed();
            match result {
                Ok(pending) => {
                    outstanding.fetch_add(1, Ordering::SeqCst);
                    let _ = to_waiter.send((started, pending));
                    (started, took, "ok", None)
                }
                Err(e) => {
                    thread::sleep(ms(1)); // backs off a little (and keeps the records few)
                    (started, took, error_kind(&e), Some(e.to_string()))
                }
            }
        });
    }
    {
        // Waits for the calls in the order they started: their deadlines
        // come in that order too, so each is measured within its own.
        let (outcomes, outstanding) = (load.outcomes.clone(), outstanding.clone());
        load.threads.push(thread::spawn(move || {
            for (started, pending) in waiter_rx {
                let result = pending.wait();
                outstanding.fetch_sub(1, Ordering::SeqCst);
                outcomes.lock().unwrap().push(Outcome {
                    started,
                    took: started.elapsed(),
                    what: "big_call",
                    error: result.err().map(|e| format!("{}: {e}", error_kind(&e))),
                });
            }
        }));
    }
    thread::sleep(ms(300)); // healthy load first
    let before = load.outcomes().len();
    assert!(
        load.outcomes().iter().all(|o| o.error.is_none()),
        "failures before the partition: {:?}",
        load.outcomes().iter().find(|o| o.error.is_some())
    );
    let (c_from, s_from) = (client_log.len(), server_log.len());
    let taken_before = taken.load(Ordering::Relaxed);
    let (cut, t0) = net.partition();
    flood.store(true, Ordering::SeqCst);
    let mut rss_peak = rss_before;
    while t0.elapsed() < ms(1500) {
        rss_peak = rss_peak.max(rss_kib());
        thread::sleep(ms(20)); // paces the sampling
    }
    let (dead_i, dead) =
        client_log.wait_for(c_from, MARGIN, "client Disconnected", is_disconnected);
    assert_eq!(
        reason_of(&dead.event),
        DisconnectReason::HeartbeatTimeout,
        "{}",
        client_log.dump(c_from, t0)
    );
    let (_, s_dead) = server_log.wait_for(s_from, MARGIN, "server Disconnected", is_disconnected);
    assert_eq!(
        reason_of(&s_dead.event),
        DisconnectReason::HeartbeatTimeout,
        "{}",
        server_log.dump(s_from, t0)
    );
    check_detection("client", cut, t0, dead.at);
    check_detection("server", cut, t0, s_dead.at);
    let (_, released) = client_log.wait_for(dead_i, MARGIN, "client Reconnecting", is_reconnecting);

    flood.store(false, Ordering::SeqCst);
    let taken_in_partition = taken.load(Ordering::Relaxed) - taken_before;
    let (healed, up) = heal_and_reconnect(net, &client_log, dead_i);
    // Every kind of operation works again.
    wait_until(PROMPTLY, "calls and one-way sends to succeed again", || {
        let outcomes = load.outcomes();
        ["call", "one_way", "big_call", "big_start"]
            .iter()
            .all(|what| {
                outcomes
                    .iter()
                    .any(|o| o.what == *what && o.started > up.at && o.error.is_none())
            })
    });
    let outcomes = load.finish();
    wait_until(PROMPTLY, "fds back to the baseline", || fd_count() == fds);
    let first_ok_after_heal = outcomes
        .iter()
        .filter(|o| o.what == "call" && o.error.is_none() && o.started >= healed)
        .map(|o| o.started + o.took - healed)
        .min()
        .expect("a call succeeded after healing");

    // Nothing hung: every operation ended within its timeout and a margin.
    let slowest = outcomes.iter().max_by_key(|o| o.took).expect("outcomes");
    assert!(
        slowest.took <= CALL_TIMEOUT + MARGIN / 2,
        "an operation took {:?} (call timeout {CALL_TIMEOUT:?}): {slowest:?}",
        slowest.took
    );
    // Only the errors a partition explains.
    for o in &outcomes {
        if let Some(e) = &o.error {
            assert!(
                ["Timeout", "ConnectionLost", "NotConnected", "Overloaded"]
                    .iter()
                    .any(|k| e.starts_with(k)),
                "unexpected error: {o:?}"
            );
        }
    }
    // A call started after the consumer gave the connection up waits for
    // the next one and fails at its timeout, unless healing came first.
    for o in outcomes
        .iter()
        .filter(|o| o.started > dead.at && o.started + CALL_TIMEOUT < healed)
    {
        assert!(
            o.error
                .as_deref()
                .is_some_and(|e| e.starts_with("NotConnected")),
            "{} started while reconnecting: {o:?}",
            o.what
        );
        assert!(o.took >= CALL_TIMEOUT, "failed early: {o:?}");
    }
    // Memory stayed bounded: the write queue is 1 MiB.
    let grew = rss_peak.saturating_sub(rss_before);
    assert!(
        grew < 32 * 1024,
        "RSS grew by {grew} KiB during the partition ({rss_before} KiB before)"
    );
    let in_partition: Vec<Outcome> = outcomes
        .iter()
        .filter(|o| o.started + o.took >= cut && o.started <= healed)
        .cloned()
        .collect();
    // The write queue's bound was reached and answered: a call with a body
    // found it full and was refused at once.
    let refused: Vec<&Outcome> = in_partition
        .iter()
        .filter(|o| {
            o.error
                .as_deref()
                .is_some_and(|e| e.starts_with("Overloaded"))
        })
        .collect();
    let lost = outcomes
        .iter()
        .filter(|o| {
            o.what == "one_way" && o.error.is_none() && o.started >= cut && o.started < dead.at
        })
        .count();
    let examples: BTreeMap<String, String> = in_partition
        .iter()
        .filter_map(|o| o.error.clone())
        .map(|e| (e.split(':').next().unwrap_or("?").to_string(), e))
        .collect();
    let mut refused_took: Vec<Duration> = refused
        .iter()
        .filter(|o| o.what == "big_start")
        .map(|o| o.took)
        .collect();
    refused_took.sort();
    // Zero if none was refused, which the assertion below reports.
    let refused_median = refused_took
        .get(refused_took.len() / 2)
        .copied()
        .unwrap_or_default();
    let refused_slowest = refused_took.last().copied().unwrap_or_default();
    eprintln!(
        "under load: {} operations before the partition, {} in all; detected by the client after {:?}, \
         by the provider after {:?}; released (Reconnecting) {:?} after the detection; \
         reconnected {:?} after healing, first call answered {first_ok_after_heal:?} after healing; \
         slowest operation {:?} ({}); RSS {rss_before} KiB -> peak {rss_peak} KiB; \
         one-way calls taken by the provider during the partition: {taken_in_partition}; \
         one-way calls accepted between the cut and the detection (lost with the connection): {lost}; \
         big calls refused with Overloaded in {refused_median:?} (median), {refused_slowest:?} at most\n  \
         during the partition: calls {:?}, big calls started {:?} and waited for {:?}, one-way {:?}\n  \
         in all: calls {:?}, big calls started {:?} and waited for {:?}, one-way {:?}\n  errors seen: {examples:#?}",
        before,
        outcomes.len(),
        dead.at - t0,
        s_dead.at - t0,
        released.at - dead.at,
        up.at.saturating_duration_since(healed),
        slowest.took,
        slowest.what,
        tally(&in_partition, "call"),
        tally(&in_partition, "big_start"),
        tally(&in_partition, "big_call"),
        tally(&in_partition, "one_way"),
        tally(&outcomes, "call"),
        tally(&outcomes, "big_start"),
        tally(&outcomes, "big_call"),
        tally(&outcomes, "one_way"),
    );
    assert!(
        refused.iter().any(|o| o.what == "big_start"),
        "no call was refused with Overloaded: the write queue never filled"
    );
    // Refused at once, not after waiting for room (as a one-way send does)
    // until the call's timeout (1 s). One `start` takes well under a
    // millisecond, but there are hundreds of them beside the flooding,
    // calling and sampling threads, and one may be preempted for a few
    // hundred ms on a loaded machine: the median must be at once (100 ms,
    // where waiting would make most of them slow), and none may come near
    // the timeout (half of it, 500 ms).
    assert!(
        refused_median < ms(100),
        "refused only after {refused_median:?} (the median of {} refusals)",
        refused_took.len()
    );
    for o in refused.iter().filter(|o| o.what == "big_start") {
        assert!(
            o.took < CALL_TIMEOUT / 2,
            "refused only after {:?} (call timeout {CALL_TIMEOUT:?}): {o:?}",
            o.took
        );
    }
}

// ----- c. a provider that is down as a host ----------------------------------------

netns_test! {
    a_provider_host_that_is_down_fails_connect_in_time_and_is_reached_after_healing => provider_down
}

fn provider_down(net: &Net) {
    let server = server(net, None);
    let addr = server.local_addr();
    let baseline = Baseline::now();
    net.partition();

    // Client::connect gives up at connect_timeout, saying why.
    let config = client_config();
    let started = Instant::now();
    let result = Client::connect(addr, config.clone());
    let took = started.elapsed();
    match &result {
        Err(e @ Error::NotConnected { detail, .. }) => assert!(
            detail.contains("connect timed out"),
            "NotConnected should say the attempts timed out: {e:?}",
        ),
        Err(other) => {
            panic!("connect to a host that is down: expected NotConnected, got {other:?}")
        }
        Ok(_) => panic!("connected to a host that is down"),
    }
    assert!(
        took >= config.connect_timeout && took <= config.connect_timeout + MARGIN,
        "Client::connect returned after {took:?} (connect_timeout {:?})",
        config.connect_timeout
    );
    let connect_error = result.err().map(|e| e.to_string()).unwrap_or_default();
    // Nothing of the failed client is left: its half-open sockets, its loop.
    baseline.wait_back("fds and threads back after the failed connect");

    // In the background: attempts time out one after another, with backoff.
    let lazy_started = Instant::now();
    let client = Client::connect_lazy(addr, config).expect("connect_lazy");
    let client_log = EventLog::start("client", client.events());
    let (_, fourth) = client_log.wait_for(
        0,
        (ATTEMPT_TIMEOUT + backoff().max) * 4 + MARGIN,
        "the fourth Reconnecting",
        |e| matches!(e, Event::Reconnecting { attempt: 4, .. }),
    );
    let events = client_log.snapshot();
    assert!(
        !events
            .iter()
            .any(|s| is_connected(&s.event) || is_disconnected(&s.event)),
        "connected (or disconnected) while the host was down:\n{}",
        client_log.dump(0, lazy_started)
    );
    let reconnecting: Vec<Stamped> = events
        .iter()
        .filter(|s| is_reconnecting(&s.event))
        .cloned()
        .collect();
    let first_attempt = reconnecting[0].at - lazy_started;
    assert!(
        first_attempt >= ATTEMPT_TIMEOUT && first_attempt <= ATTEMPT_TIMEOUT + MARGIN / 2,
        "the first attempt failed after {first_attempt:?}"
    );
    let attempts = check_attempts(&reconnecting, "host down", false);
    // Strictly, from before the first attempt: the last `Reconnecting`
    // comes after every attempt's timeout and every delay before it.
    let last = reconnecting.last().expect("Reconnecting events");
    let least = ATTEMPT_TIMEOUT * reconnecting.len() as u32
        + reconnecting[..reconnecting.len() - 1]
            .iter()
            .map(|s| delay_of(&s.event))
            .sum::<Duration>();
    assert!(
        last.at - lazy_started >= least,
        "{} attempts ended after {:?}, less than their timeouts and delays ({least:?})",
        reconnecting.len(),
        last.at - lazy_started
    );
    let started = Instant::now();
    let failed = client.call_timeout::<_, u64>("demo", "ping", &1u64, ms(200));
    let waited = started.elapsed();
    assert!(
        matches!(&failed, Err(Error::NotConnected { detail, .. }) if detail.contains("connect timed out")),
        "a call while the host is down: {failed:?}"
    );
    assert!(waited >= ms(200) && waited <= ms(200) + MARGIN);
    assert_eq!(server.connection_count(), 0, "a SYN got through");

    // Another client shut down while its attempt hangs in SYN-SENT: the
    // call waiting for a connection ends at once with `Shutdown`, and so
    // does `shutdown` (no connection: nothing to linger for). Its attempt
    // may hang for 10 s, far longer than the pacing sleep below could
    // overrun, so `shutdown` comes while the SYN is unanswered however late
    // this thread wakes, and a `shutdown` or a call that waited for the
    // attempt to end would take seconds, not a moment.
    let other = Client::connect_lazy(
        addr,
        ClientConfig {
            connect_attempt_timeout: Duration::from_secs(10),
            ..client_config()
        },
    )
    .expect("connect_lazy");
    let (calling, call_began) = crossbeam_channel::bounded::<()>(1);
    let waiting = {
        let other = other.clone();
        thread::spawn(move || {
            let _ = calling.send(());
            let started = Instant::now();
            let result =
                other.call_timeout::<_, u64>("demo", "ping", &3u64, Duration::from_secs(5));
            let ended = Instant::now();
            (result.map_err(|e| error_kind(&e)), ended - started, ended)
        })
    };
    // The pacing counts from the caller's start, not its spawn (a thread
    // can start late on a loaded machine): a call made after the shutdown
    // would fail with `Shutdown` at once too, and prove nothing.
    call_began.recv().expect("the waiting caller starts");
    thread::sleep(ms(150)); // paces: the call waits, the attempt hangs
    let started = Instant::now();
    other.shutdown();
    let other_shutdown = started.elapsed();
    let (other_call, other_call_took, other_call_ended) =
        waiting.join().expect("the waiting caller");
    // When the waiting call ended, counted from when `shutdown` began (not
    // from the call's start, which would add the pacing sleep's overrun).
    let other_call_end = other_call_ended.saturating_duration_since(started);
    assert_eq!(other_call, Err("Shutdown"));
    // "At once", with room for scheduling stalls of a few hundred ms on a
    // loaded machine. What these bounds guard against takes much longer: a
    // `shutdown` lingering (the client's `linger`, 1 s, up to 2 s with the
    // wait for the loop) or waiting for the hanging attempt (10 s, so it
    // would be cut at those 2 s); a call waiting out its timeout (5 s) or the
    // attempt (10 s, so its timeout again: `Timeout`, not `Shutdown`).
    assert!(
        other_shutdown < MARGIN / 2 && other_call_end < MARGIN,
        "shutdown took {other_shutdown:?}, the waiting call ended {other_call_end:?} after the shutdown began \
         ({other_call_took:?} after the call started)"
    );
    drop(other);

    let (healed, up) = heal_and_reconnect(net, &client_log, client_log.len());
    assert_eq!(client.call::<_, u64>("demo", "ping", &2u64).unwrap(), 2);
    eprintln!(
        "host down: Client::connect failed after {took:?}: {connect_error}; in the background the \
         first attempt failed after {first_attempt:?}, then {} more each {attempts:?}, delays {:?}, \
         fourth Reconnecting {:?} in; a call meanwhile: {failed:?} after {waited:?}; \
         another client shut down meanwhile in {other_shutdown:?}, its waiting call ended \
         {other_call_end:?} after the shutdown began ({other_call_took:?} after it started); connected {:?} after healing",
        attempts.len(),
        reconnecting
            .iter()
            .map(|s| delay_of(&s.event))
            .collect::<Vec<_>>(),
        fourth.at - lazy_started,
        up.at.saturating_duration_since(healed),
    );
    drop(client);
    drop(client_log);
    baseline.wait_back("fds and threads back after the client");
}

// ----- d. one direction lost --------------------------------------------------------

netns_test! {
    a_partition_of_one_direction_ends_the_connection_on_both_sides_within_the_bound => partition_one_direction
}

fn partition_one_direction(net: &Net) {
    let server = server(net, None);
    let port = server.local_addr().port();
    let server_log = EventLog::start("server", server.events());
    let client = Client::connect(server.local_addr(), client_config()).expect("connect");
    let client_log = EventLog::start("client", client.events());
    let baseline = Baseline::now();
    for dir in [Dir::Upstream, Dir::Downstream] {
        wait_until(PROMPTLY, "connected", || {
            client.call::<_, u64>("demo", "ping", &1u64).is_ok() && server.connection_count() == 1
        });
        thread::sleep(backoff().probation + INTERVAL * 2);
        let (c_from, s_from) = (client_log.len(), server_log.len());
        let (cut, t0) = net.partition_one_way(dir, port);
        let (dead_i, dead) = client_log.wait_for(
            c_from,
            BOUND + TICK + MARGIN,
            "client Disconnected",
            is_disconnected,
        );
        let (_, s_dead) = server_log.wait_for(
            s_from,
            BOUND + TICK + MARGIN,
            "server Disconnected",
            is_disconnected,
        );
        let (c_reason, s_reason) = (reason_of(&dead.event), reason_of(&s_dead.event));
        let dump = || {
            format!(
                "{}{}",
                client_log.dump(c_from, t0),
                server_log.dump(s_from, t0)
            )
        };
        // The side that hears nothing finds it within the bound and closes
        // with Close(HeartbeatTimeout). The other side hears that Close at
        // once, unless its peer's TCP has stopped sending new data by then
        // (no ACK came back for its last segments: after a retransmission
        // timeout, at least 200 ms, only the oldest is sent again); then it
        // finds the silence itself, within the bound too.
        let (deaf, deaf_at, told, told_at) = match dir {
            Dir::Upstream => ("server", s_dead.at, "client", dead.at),
            Dir::Downstream => ("client", dead.at, "server", s_dead.at),
        };
        let (deaf_reason, told_reason) = match dir {
            Dir::Upstream => (&s_reason, &c_reason),
            Dir::Downstream => (&c_reason, &s_reason),
        };
        assert_eq!(
            *deaf_reason,
            DisconnectReason::HeartbeatTimeout,
            "{dir:?}: the {deaf}:\n{}",
            dump()
        );
        check_detection(deaf, cut, t0, deaf_at);
        let told_after = told_at.saturating_duration_since(deaf_at);
        match told_reason {
            DisconnectReason::PeerClosed {
                status: Some(pulse::protocol::CloseStatus::HeartbeatTimeout),
                ..
            } => assert!(
                told_after < ms(100),
                "{dir:?}: the {told} got the Close {told_after:?} after the {deaf} sent it\n{}",
                dump()
            ),
            DisconnectReason::HeartbeatTimeout => {
                check_detection(told, cut, t0, told_at);
            }
            other => panic!(
                "{dir:?}: the {told} should get the Close(HeartbeatTimeout) or find the \
                 silence itself, got {other:?}\n{}",
                dump()
            ),
        }
        // Reconnect attempts fail while the direction is cut (a SYN, or
        // the SYN-ACK, is lost): they time out.
        client_log.wait_for(
            dead_i,
            (ATTEMPT_TIMEOUT + backoff().max) * 2 + MARGIN,
            "the second Reconnecting",
            |e| matches!(e, Event::Reconnecting { attempt: 2, .. }),
        );
        let reconnecting: Vec<Stamped> = events_since(&client_log, dead_i)
            .into_iter()
            .filter(|s| is_reconnecting(&s.event))
            .collect();
        let told_by_close = matches!(
            c_reason,
            DisconnectReason::PeerClosed {
                status: Some(pulse::protocol::CloseStatus::HeartbeatTimeout),
                ..
            }
        );
        let attempts = check_attempts(&reconnecting, &format!("{dir:?} cut"), told_by_close);
        assert!(
            !events_since(&client_log, c_from)
                .iter()
                .any(|s| is_connected(&s.event)),
            "{dir:?}: connected while cut:\n{}",
            dump()
        );
        let (healed, up) = heal_and_reconnect(net, &client_log, client_log.len());
        assert_eq!(client.call::<_, u64>("demo", "ping", &2u64).unwrap(), 2);
        eprintln!(
            "{dir:?} cut: the {deaf} found it after {:?} ({deaf_reason}), the {told} ended {told_after:?} later ({told_reason}); \
             attempts meanwhile took {attempts:?}; reconnected {:?} after healing",
            deaf_at - t0,
            up.at.saturating_duration_since(healed),
        );
        baseline.wait_back("fds and threads back to the baseline");
    }
}

// ----- e. closing while partitioned -------------------------------------------------

netns_test! {
    a_client_dropped_and_a_server_shut_down_during_a_partition_return_within_their_linger => close_while_partitioned
}

fn close_while_partitioned(net: &Net) {
    const LINGER: Duration = Duration::from_millis(500);
    let baseline = Baseline::now();
    // A heartbeat bound far past the test's steps: the connections are
    // still up, their send buffers full, when they are closed.
    let long = |queue: usize| ConnectionConfig {
        heartbeat: heartbeat(INTERVAL.as_millis() as u64, 100),
        timer_tick: TICK,
        max_write_queue_bytes: queue,
        max_frame_len: 2 << 20,
        ..ConnectionConfig::default()
    };
    let server = Server::builder()
        .config(ServerConfig {
            connection: long(16 << 20),
            linger: LINGER,
            ..ServerConfig::default()
        })
        .service(demo_service())
        .service(
            ServiceBuilder::new("sink").method_inline("take", |_: rmpv::Value| Ok::<_, String>(())),
        )
        .bind(net.provider_bind_addr())
        .expect("bind");
    let config = ClientConfig {
        connection: long(4 << 20),
        linger: LINGER,
        call_timeout: ms(200),
        ..client_config()
    };
    // `sender` sends one-way calls, `reader` asks for 200 KiB results.
    let sender = Client::connect(server.local_addr(), config.clone()).expect("connect");
    let reader = Client::connect(server.local_addr(), config).expect("connect");
    assert_eq!(reader.call::<_, u64>("demo", "ping", &1u64).unwrap(), 1);
    // Only what the provider sends is lost: requests arrive, their answers
    // and the provider's ACKs do not. Both sides' send buffers fill: the
    // sender's one-way calls (never acknowledged) until its write queue is
    // full, the provider's answers to `reader` likewise.
    net.partition_one_way(Dir::Downstream, server.local_addr().port());
    // The reader asks for 8 answers of 1 MiB: more than the provider's
    // socket takes (at most 4 MiB, `tcp_wmem`), less than its write
    // queue's bound (past which it would drop a consumer that does not
    // read its answers).
    let pending: Vec<_> = (0..8)
        .map(|_| {
            reader
                .start_timeout::<_, rmpv::Value>("demo", "blob", &(1u64 << 20), ms(300))
                .expect("start a call")
        })
        .collect();
    // The sender sends until a one-way call finds no room for its whole
    // (short) call timeout.
    let body = rmpv::Value::Binary(vec![1; 64 * 1024]);
    let mut sent = 0;
    let refused = loop {
        match sender.send_one_way("sink", "take", &body) {
            Ok(()) => sent += 1,
            Err(e) => break e,
        }
        assert!(sent < 10_000, "the sender's write queue never filled");
    };
    assert!(
        matches!(refused, Error::Overloaded(_)),
        "a one-way call finding no room: {refused:?}"
    );
    // The answers never arrive: the calls time out.
    let mut answers = BTreeMap::new();
    for call in pending {
        let result = call.wait();
        let name = match &result {
            Err(Error::Remote { status, .. }) => format!("{status:?}"),
            other => kind(other).to_string(),
        };
        *answers.entry(name).or_insert(0) += 1;
    }
    assert!(
        answers.keys().all(|k| k == "Timeout"),
        "the reader's calls: {answers:?}"
    );

    let started = Instant::now();
    drop(sender);
    let drop_took = started.elapsed();
    let started = Instant::now();
    server.shutdown();
    let shutdown_took = started.elapsed();
    eprintln!(
        "closing while partitioned: the reader's calls {answers:?}; {sent} one-way calls of 64 KiB accepted, \
         then {refused}; dropping the client took \
         {drop_took:?}, the server's shutdown {shutdown_took:?} (linger {LINGER:?})"
    );
    // Both had queued bytes the partition kept from being written: they
    // waited the whole linger for them, and no longer.
    assert!(
        drop_took >= LINGER && drop_took <= LINGER + MARGIN,
        "dropping the client took {drop_took:?} (linger {LINGER:?})"
    );
    assert!(
        shutdown_took >= LINGER && shutdown_took <= LINGER + MARGIN,
        "the server's shutdown took {shutdown_took:?} (linger {LINGER:?})"
    );
    net.heal();
    drop(reader);
    drop(server);
    baseline.wait_back("fds and threads back");
}

// ----- a call never written did not run, and says so -------------------------------

netns_test! {
    /// A call whose request was still in the client's write queue, behind a
    /// socket send buffer the partition had filled, when the partition was
    /// detected, did not run (its bytes never left the process), and its error
    /// says so: `NotConnected`, `refused_before_running`. Before, it failed
    /// with `ConnectionLost` ("may or may not have run"), like a call that was
    /// written, and a cluster would not send it elsewhere.
    a_call_still_in_the_write_queue_when_the_partition_is_detected_did_not_run_and_says_so => call_still_queued
}

netns_test! {
    /// The same call made with `Client::call`: it is sent again on the next
    /// connection, within its timeout, and runs once.
    a_call_still_in_the_write_queue_when_the_partition_is_detected_is_sent_again_by_call => call_still_queued_is_sent_again
}

/// The body of the marked call: the provider counts the calls whose body
/// starts with 0xEE.
fn marked_body() -> rmpv::Value {
    rmpv::Value::Binary(vec![0xEE; QUEUED_FRAME])
}

const QUEUED_FRAME: usize = 64 * 1024;

/// A provider counting its marked calls, and a client connected to it that
/// has, during a partition, queued more one-way calls than the socket's
/// send buffer can ever hold (the namespace's `tcp_wmem` maximum) plus 512
/// KiB: a call made next waits in the write queue behind them.
fn queue_behind_a_partition(net: &Net) -> (Server, Client, Arc<AtomicUsize>) {
    let marked = Arc::new(AtomicUsize::new(0));
    let sink = {
        let marked = marked.clone();
        ServiceBuilder::new("sink").method_inline("take", move |v: rmpv::Value| {
            if v.as_slice().is_some_and(|b| b.first() == Some(&0xEE)) {
                marked.fetch_add(1, Ordering::SeqCst);
            }
            Ok::<_, String>(0u64)
        })
    };
    let server = server(net, Some(sink));
    let mut config = client_config();
    config.connection.max_frame_len = 256 * 1024;
    config.connection.max_write_queue_bytes = 4 << 20;
    config.call_timeout = ms(200);
    let client = Client::connect(server.local_addr(), config).expect("connect");
    let small = rmpv::Value::Binary(vec![0x11; 10]);
    assert_eq!(client.call::<_, u64>("sink", "take", &small).unwrap(), 0);
    let wmem_max: usize = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .expect("read tcp_wmem")
        .split_whitespace()
        .nth(2)
        .and_then(|max| max.parse().ok())
        .expect("tcp_wmem's maximum");
    let fillers = (wmem_max + (512 << 10)).div_ceil(QUEUED_FRAME);
    net.partition();
    let filler = rmpv::Value::Binary(vec![0x11; QUEUED_FRAME]);
    for i in 0..fillers {
        if let Err(e) = client.send_one_way("sink", "take", &filler) {
            panic!("filler {i} of {fillers} refused: {e}");
        }
    }
    eprintln!("{fillers} fillers of 64 KiB queued (tcp_wmem max {wmem_max})");
    (server, client, marked)
}

fn call_still_queued(net: &Net) {
    let (_server, client, marked) = queue_behind_a_partition(net);
    let marked_call = client
        .start_timeout::<_, u64>("sink", "take", &marked_body(), Duration::from_secs(3))
        .expect("the marked call is queued");
    let result = marked_call.wait();
    net.heal();
    // Give a call sent again by mistake time to arrive and run.
    thread::sleep(ms(1500));
    let ran = marked.load(Ordering::SeqCst);
    eprintln!("the marked call: {result:?}; the provider ran it {ran} times");
    match result {
        Ok(_) => assert_eq!(ran, 1, "the call succeeded but ran {ran} times"),
        Err(e) => {
            assert_eq!(ran, 0, "the call failed ({e}) but ran");
            assert!(
                e.refused_before_running(),
                "the call never left the process, but its error says it may have run: {e:?}"
            );
        }
    }
}

fn call_still_queued_is_sent_again(net: &Net) {
    let (_server, client, marked) = queue_behind_a_partition(net);
    let events = client.events();
    let caller = {
        let client = client.clone();
        thread::spawn(move || {
            client.call_timeout::<_, u64>("sink", "take", &marked_body(), Duration::from_secs(5))
        })
    };
    // The partition is found (heartbeat timeout), the call waits for the
    // next connection; heal then.
    let deadline = Instant::now() + PROMPTLY;
    let lost = std::iter::from_fn(|| events.recv_deadline(deadline).ok())
        .find(|e| matches!(e, Event::Disconnected { .. }))
        .expect("the client reports the partition within PROMPTLY");
    eprintln!("the client saw {lost:?}");
    net.heal();
    let result = caller.join().expect("the caller thread");
    let ran = marked.load(Ordering::SeqCst);
    eprintln!("the marked call: {result:?}; the provider ran it {ran} times");
    assert_eq!(
        result.expect("the call, sent again on the next connection"),
        0
    );
    assert_eq!(ran, 1, "the provider ran the call {ran} times");
}
