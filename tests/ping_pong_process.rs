//! Process-level tests of `examples/ping_pong.rs`: the example is run as real
//! processes, and a peer is frozen with `kill -STOP` — the closest thing to a
//! hung or paused service that a test can make.
//!
//! * `demo_mode_*`: no arguments, provider and consumer in one process.
//! * `a_frozen_server_*`: the consumer detects a frozen provider within
//!   `max_missed × heartbeat` plus a margin, and reconnects once it thaws.
//! * `a_frozen_client_*`: the provider drops a frozen consumer; the consumer,
//!   once thawed, does not blame the provider for its own pause, and
//!   reconnects.
//! * `the_client_starts_before_the_server_*`: client mode waits for a provider
//!   that is not up yet, then stops after `--count` calls with a summary.
//! * `the_example_server_serves_*`: the `demo` service's contract, called
//!   with a `pulse::Client` from this test.
//! * `bad_flags_*`: usage errors exit with code 2.
//! * `the_help_lists_*`, `max_connections_flag_*`,
//!   `frame_timeout_and_max_age_flags_*`: every bound is reachable from the
//!   command line, and a real provider process enforces the ones tried here
//!   against raw protocol peers (`support::raw_peer::RawPeer`).
//!
//! Every wait has a deadline; children are killed and reaped by a drop guard
//! (after a SIGCONT, in case they are frozen), so a failing test leaves no
//! process behind. Run with `--nocapture` to see the measured detection and
//! reconnect times.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use pulse::protocol::{CloseStatus, Kind, decode_text_body, encode_ping};
use serde_json::Value;
use support::raw_peer::RawPeer;

mod support;

/// Heartbeat settings of the two-process tests: a peer is dead after 300 ms.
const HEARTBEAT_MS: u64 = 100;
const MAX_MISSED: u64 = 3;
const BOUND: Duration = Duration::from_millis(HEARTBEAT_MS * MAX_MISSED);

/// Slack on top of `BOUND` for a loaded CI machine (one timer tick, thread
/// wake-ups, the pipe to this test). Generous: it only catches "never" and
/// "much too late"; the measured time is printed.
const MARGIN: Duration = Duration::from_secs(2);

/// How long a thawed side may take to be connected again and answering.
const RECOVERY: Duration = Duration::from_secs(10);

/// How long a freshly started process may take to say anything.
const STARTUP: Duration = Duration::from_secs(20);

// ----- helpers ------------------------------------------------------------------

/// These tests start processes and measure timings on machines that may have
/// two cores: run them one at a time.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The `ping_pong` example binary, built (or brought up to date) once per
/// test run: `cargo test` builds examples, but `cargo test --test
/// ping_pong_process` does not, and a stale binary would test old code.
fn example_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        // This test runs as .../target/<profile>/deps/ping_pong_process-<hash>;
        // examples are built into .../target/<profile>/examples/.
        let exe = std::env::current_exe().expect("the test binary's path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("the test binary lives in target/<profile>/deps");
        let binary = profile_dir
            .join("examples")
            .join(format!("ping_pong{}", std::env::consts::EXE_SUFFIX));

        let mut cargo = Command::new(env!("CARGO"));
        cargo
            .args(["build", "--quiet", "--example", "ping_pong"])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if let Some(target_dir) = profile_dir.parent() {
            cargo.arg("--target-dir").arg(target_dir);
        }
        if profile_dir
            .file_name()
            .is_some_and(|name| name == "release")
        {
            cargo.arg("--release");
        }
        let status = cargo
            .status()
            .expect("run `cargo build --example ping_pong`");
        assert!(
            status.success(),
            "`cargo build --example ping_pong` failed: {status}"
        );
        assert!(
            binary.exists(),
            "{} is missing after the build",
            binary.display()
        );
        binary
    })
}

/// One line of a child's standard output, with the time this test read it.
struct Line {
    at: Instant,
    text: String,
    /// The line as JSON (`Null` if it is not JSON).
    json: Value,
}

impl Line {
    fn event(&self) -> &str {
        self.json["event"].as_str().unwrap_or("")
    }

    fn str(&self, field: &str) -> &str {
        self.json[field].as_str().unwrap_or("")
    }

    fn u64(&self, field: &str) -> u64 {
        self.json[field]
            .as_u64()
            .unwrap_or_else(|| panic!("{field:?} is not an unsigned integer in {}", self.text))
    }
}

/// A running `ping_pong` process. Its stdout is read line by line on a thread
/// into a channel, its stderr (pulse's logs) into a buffer shown on failure.
/// Dropping it kills and reaps the process.
struct Proc {
    name: &'static str,
    child: Child,
    lines: Receiver<Line>,
    /// Every stdout line read so far, for failure messages.
    seen: Vec<String>,
    stderr: Arc<Mutex<String>>,
    stderr_reader: Option<thread::JoinHandle<()>>,
}

impl Proc {
    fn start(name: &'static str, args: &[&str]) -> Proc {
        let mut child = Command::new(example_binary())
            .args(args)
            .env("RUST_LOG", "pulse=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {name} ({args:?}): {e}"));

        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for text in BufReader::new(stdout).lines() {
                let Ok(text) = text else { break };
                let json = serde_json::from_str(&text).unwrap_or(Value::Null);
                let line = Line {
                    at: Instant::now(),
                    text,
                    json,
                };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });

        let mut stderr = child.stderr.take().expect("piped stderr");
        let buffer = Arc::new(Mutex::new(String::new()));
        let sink = buffer.clone();
        let stderr_reader = thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n @ 1..) = stderr.read(&mut chunk) {
                let mut all = sink.lock().unwrap_or_else(|p| p.into_inner());
                all.push_str(&String::from_utf8_lossy(&chunk[..n]));
            }
        });

        Proc {
            name,
            child,
            lines,
            seen: Vec::new(),
            stderr: buffer,
            stderr_reader: Some(stderr_reader),
        }
    }

    /// Sends `signal` (e.g. `"STOP"`) with the `kill` command.
    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(
            status.success(),
            "kill -{signal} {} failed: {status}",
            self.name
        );
    }

    /// Reads lines until one matches `wanted`; returns it with every line read
    /// before it. Panics, showing the output so far, if none comes by `deadline`.
    fn wait_for(
        &mut self,
        what: &str,
        deadline: Instant,
        wanted: impl Fn(&Line) -> bool,
    ) -> (Line, Vec<Line>) {
        let mut before = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.text.clone());
                    if wanted(&line) {
                        return (line, before);
                    }
                    before.push(line);
                }
                Err(RecvTimeoutError::Timeout) => self.fail(&format!("no {what} in time")),
                Err(RecvTimeoutError::Disconnected) => {
                    self.fail(&format!("stdout closed before {what}"))
                }
            }
        }
    }

    /// Waits for the process to exit by `deadline` (then kills it and panics).
    fn wait_exit(&mut self, deadline: Instant) -> ExitStatus {
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status,
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
                Ok(None) => self.fail("did not exit in time"),
                Err(e) => self.fail(&format!("cannot wait for the process: {e}")),
            }
        }
    }

    /// Every stdout line not read yet (waiting at most `grace` for the
    /// process to finish writing after it exited).
    fn rest(&mut self, grace: Duration) -> Vec<Line> {
        let deadline = Instant::now() + grace;
        let mut rest = Vec::new();
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.seen.push(line.text.clone());
            rest.push(line);
        }
        rest
    }

    /// Once the process has exited: waits (up to `grace`) until its stderr
    /// is read to the end, and returns it.
    fn final_stderr(&mut self, grace: Duration) -> String {
        let deadline = Instant::now() + grace;
        if let Some(reader) = self.stderr_reader.take() {
            while !reader.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(5));
            }
        }
        self.stderr()
    }

    fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn fail(&self, what: &str) -> ! {
        let stderr = self.stderr();
        let tail: Vec<&str> = stderr.lines().rev().take(60).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        panic!(
            "{}: {what}\n--- {} stdout so far:\n{}\n--- {} stderr (last lines):\n{}",
            self.name,
            self.name,
            self.seen.join("\n"),
            self.name,
            tail.join("\n")
        );
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // A frozen process cannot be reaped until it runs again.
        let _ = Command::new("kill")
            .arg("-CONT")
            .arg(self.child.id().to_string())
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `server --addr 127.0.0.1:0` and returns it with its address.
fn start_server() -> (Proc, String) {
    let hb = HEARTBEAT_MS.to_string();
    let missed = MAX_MISSED.to_string();
    start_server_with(&["--heartbeat-ms", &hb, "--max-missed", &missed])
}

/// Starts `server --addr 127.0.0.1:0` with more flags and returns it with its
/// address.
fn start_server_with(flags: &[&str]) -> (Proc, String) {
    let mut args = vec!["server", "--addr", "127.0.0.1:0"];
    args.extend_from_slice(flags);
    let mut server = Proc::start("server", &args);
    let (line, _) = server.wait_for("listening line", Instant::now() + STARTUP, |l| {
        l.event() == "listening"
    });
    let addr = line.str("addr").to_string();
    assert!(addr.starts_with("127.0.0.1:"), "listening on {addr}");
    (server, addr)
}

/// A raw ping answered by a pong of the same id: the connection is served.
fn assert_pings(raw: &mut RawPeer, seq: u64) {
    raw.send(&encode_ping(seq));
    let pong = raw.next_frame(STARTUP);
    assert_eq!((pong.header.kind, pong.header.id), (Kind::Pong, seq));
}

/// The Close frame's status and reason text.
fn close_of(frame: &pulse::protocol::Frame) -> (u8, String) {
    assert_eq!(frame.header.kind, Kind::Close, "{frame:?}");
    (frame.header.status, decode_text_body(&frame.body))
}

/// Starts a client of `addr` calling every 50 ms and waits until both sides
/// report the connection and a call went through. Returns the client and the
/// client's address as the server sees it.
fn start_client(server: &mut Proc, addr: &str) -> (Proc, String) {
    let hb = HEARTBEAT_MS.to_string();
    let missed = MAX_MISSED.to_string();
    let mut client = Proc::start(
        "client",
        &[
            "client",
            "--addr",
            addr,
            "--heartbeat-ms",
            &hb,
            "--max-missed",
            &missed,
            "--interval-ms",
            "50",
        ],
    );
    let (connected, _) = client.wait_for("client connected", Instant::now() + STARTUP, |l| {
        l.event() == "connected"
    });
    assert_eq!(connected.str("peer"), addr);
    client.wait_for("first pong", Instant::now() + STARTUP, |l| {
        l.event() == "pong"
    });
    let (line, _) = server.wait_for("server connected", Instant::now() + STARTUP, |l| {
        l.event() == "connected"
    });
    (client, line.str("peer").to_string())
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

/// When detection took much longer than the bound, shows why if the detecting
/// side knows: it logs when it ran late itself (a stall it forgave, e.g. on a
/// starved CI machine), which postpones the verdict by design.
fn explain_if_late(detector: &Proc, detection: Duration) {
    if detection > BOUND + Duration::from_millis(200) {
        let stderr = detector.stderr();
        let stalls: Vec<&str> = stderr.lines().filter(|l| l.contains("late")).collect();
        eprintln!(
            "  {} detected late; its own stalls: {}",
            detector.name,
            if stalls.is_empty() {
                "none logged".to_string()
            } else {
                stalls.join("\n  ")
            }
        );
    }
}

// ----- tests ----------------------------------------------------------------------

#[test]
fn demo_mode_makes_every_call_and_exits_0() {
    let _serial = serial();
    let started = Instant::now();
    let mut demo = Proc::start("demo", &[]);
    let (summary, _) = demo.wait_for("summary", started + Duration::from_secs(60), |l| {
        l.event() == "summary"
    });
    let status = demo.wait_exit(started + Duration::from_secs(60));
    assert!(
        status.success(),
        "exit status {status}; summary {}",
        summary.text
    );
    assert_eq!(summary.u64("count"), 1000, "{}", summary.text);
    assert_eq!(summary.u64("ok"), 1000, "{}", summary.text);
    assert_eq!(summary.u64("failed"), 0, "{}", summary.text);
    let (p50, p99, max) = (
        summary.u64("p50_us"),
        summary.u64("p99_us"),
        summary.u64("max_us"),
    );
    assert!(0 < p50 && p50 <= p99 && p99 <= max, "{}", summary.text);
    // Every line is JSON with an "event".
    for line in demo.rest(Duration::from_secs(1)) {
        assert!(!line.event().is_empty(), "not an event line: {}", line.text);
    }
    eprintln!(
        "demo mode: {} in {} ms",
        summary.text,
        ms(started.elapsed())
    );
}

#[test]
fn a_frozen_server_is_detected_within_the_bound_and_the_client_reconnects() {
    let _serial = serial();
    let (mut server, addr) = start_server();
    let (mut client, client_addr) = start_client(&mut server, &addr);

    // Freeze the provider: its kernel still ACKs, but it answers nothing.
    server.signal("STOP");
    let stopped = Instant::now();
    let (gone, before) = client.wait_for("client disconnected", stopped + BOUND + MARGIN, |l| {
        l.event() == "disconnected"
    });
    let detection = gone.at - stopped;
    eprintln!(
        "frozen server detected after {} ms (bound {} ms): {}",
        ms(detection),
        ms(BOUND),
        gone.text
    );
    explain_if_late(&client, detection);
    assert_eq!(gone.str("reason"), "heartbeat_timeout", "{}", gone.text);
    assert_eq!(gone.str("peer"), addr);
    assert!(
        before
            .iter()
            .any(|l| l.event() == "heartbeat_missed" && l.u64("missed") >= 1),
        "no heartbeat_missed before the disconnect"
    );
    // Never early: the last byte from the server was read at most one call
    // interval (50 ms) before the STOP, so nothing can fire before ~250 ms.
    assert!(
        detection >= BOUND / 2,
        "detected after only {} ms",
        ms(detection)
    );

    // The call sent after the STOP (calls go every 50 ms, the bound is far
    // longer) was in flight when the connection was declared dead: it fails,
    // and its line comes after the `disconnected`, never before.
    assert!(
        !before.iter().any(|l| l.event() == "call_failed"),
        "a call failed before the disconnect was reported: {:?}",
        before.iter().map(|l| &l.text).collect::<Vec<_>>()
    );
    let (reconnecting, mut after) = client.wait_for("reconnecting", gone.at + MARGIN, |l| {
        l.event() == "reconnecting"
    });
    assert!(reconnecting.u64("attempt") >= 1, "{}", reconnecting.text);
    // The example's consumer reconnects with the default backoff.
    let max_delay = pulse::liveness::BackoffConfig::default().max;
    assert!(
        reconnecting.u64("delay_ms") <= max_delay.as_millis() as u64,
        "{}",
        reconnecting.text
    );

    // Thaw the provider: the client must be connected and answered again.
    server.signal("CONT");
    let resumed = Instant::now();
    // The call that waited for the reconnect is answered at once, but its
    // pong comes out after the new connection's `connected`.
    let (first, until_connected) =
        client.wait_for("client connected again", resumed + RECOVERY, |l| {
            matches!(l.event(), "connected" | "pong")
        });
    after.extend(until_connected);
    assert!(
        after
            .iter()
            .any(|l| l.event() == "call_failed" && l.str("error").contains("heartbeat_timeout")),
        "no call failed with the lost connection: {:?}",
        after.iter().map(|l| &l.text).collect::<Vec<_>>()
    );
    assert_eq!(
        first.event(),
        "connected",
        "a pong came out before connected: {}",
        first.text
    );
    let (pong, _) = client.wait_for("pong after the reconnect", resumed + RECOVERY, |l| {
        l.event() == "pong"
    });
    eprintln!(
        "client answered again {} ms after SIGCONT",
        ms(pong.at - resumed)
    );

    // The provider was the one frozen: it must not blame the consumer for the
    // silence. It sees the old connection end the way the consumer ended it.
    let (old, _) = server.wait_for(
        "server sees the old connection end",
        resumed + RECOVERY,
        |l| l.event() == "disconnected" && l.str("peer") == client_addr,
    );
    assert_ne!(
        old.str("reason"),
        "heartbeat_timeout",
        "the frozen side blamed its peer: {}",
        old.text
    );
}

#[test]
fn a_frozen_client_is_dropped_by_the_server_and_does_not_blame_it() {
    let _serial = serial();
    let (mut server, addr) = start_server();
    let (mut client, client_addr) = start_client(&mut server, &addr);

    // Freeze the consumer for five times the bound.
    client.signal("STOP");
    let stopped = Instant::now();
    let (gone, before) =
        server.wait_for("server drops the client", stopped + BOUND + MARGIN, |l| {
            l.event() == "disconnected" && l.str("peer") == client_addr
        });
    let detection = gone.at - stopped;
    eprintln!(
        "frozen client dropped after {} ms (bound {} ms): {}",
        ms(detection),
        ms(BOUND),
        gone.text
    );
    explain_if_late(&server, detection);
    assert_eq!(gone.str("reason"), "heartbeat_timeout", "{}", gone.text);
    assert!(
        before
            .iter()
            .any(|l| l.event() == "heartbeat_missed" && l.str("peer") == client_addr),
        "no heartbeat_missed before the drop"
    );
    assert!(
        detection >= BOUND / 2,
        "dropped after only {} ms",
        ms(detection)
    );

    // The freeze length is the scenario, not a synchronisation: sleeping is right.
    thread::sleep((stopped + 5 * BOUND).saturating_duration_since(Instant::now()));
    client.signal("CONT");
    let resumed = Instant::now();

    // The consumer finds the provider's Close waiting: its own pause is not
    // the provider's silence.
    let (_, before) = client.wait_for("client connected again", resumed + RECOVERY, |l| {
        l.event() == "connected"
    });
    for line in &before {
        assert_ne!(
            line.str("reason"),
            "heartbeat_timeout",
            "the frozen side blamed its peer: {}",
            line.text
        );
    }
    assert!(
        before.iter().any(|l| l.event() == "disconnected"),
        "the client did not report losing its first connection"
    );
    let (pong, _) = client.wait_for("pong after the reconnect", resumed + RECOVERY, |l| {
        l.event() == "pong"
    });
    eprintln!(
        "client answered again {} ms after SIGCONT",
        ms(pong.at - resumed)
    );
    server.wait_for("server sees the new connection", resumed + RECOVERY, |l| {
        l.event() == "connected"
    });
}

#[test]
fn bad_flags_exit_with_code_2_and_help_exits_0() {
    let _serial = serial();
    for (args, complaint) in [
        (&["--bogus"][..], "--bogus"),
        (&["server"][..], "--addr"),
        (&["client", "--addr"][..], "--addr"),
        (&["server", "--addr", "127.0.0.1:notaport"][..], "--addr"),
        (&["client", "--addr", "localhost"][..], "--addr"),
        (&["--interval-ms", "99999999999999"][..], "--interval-ms"),
        (&["--count", "many"][..], "--count"),
        (
            &["server", "--addr", "127.0.0.1:0", "--count", "3"][..],
            "--count",
        ),
        (&["--max-missed", "0"][..], "--max-missed"),
        (&["frobnicate"][..], "frobnicate"),
        // The bounds: bad numbers, values pulse refuses, server flags on a client.
        (
            &["server", "--addr", "127.0.0.1:0", "--max-connections", "0"][..],
            "--max-connections",
        ),
        (&["--max-inflight", "-1"][..], "--max-inflight"),
        (
            &["--max-write-queue-bytes", "1"][..],
            "--max-write-queue-bytes",
        ),
        (
            &["--min-ping-interval-ms", "soon"][..],
            "--min-ping-interval-ms",
        ),
        (&["--frame-timeout-ms", "1"][..], "--frame-timeout-ms"),
        // Its own pings would be strikes to a peer with the same settings.
        (&["--heartbeat-ms", "10"][..], "--min-ping-interval-ms"),
        (&["--max-idle-ms", "99999999999999"][..], "--max-idle-ms"),
        (
            &["client", "--addr", "127.0.0.1:1", "--max-age-ms", "500"][..],
            "--max-age-ms",
        ),
        (&["--max-age-ms"][..], "--max-age-ms"),
        (&["--heartbeat-mode", "sometimes"][..], "--heartbeat-mode"),
        (&["--loop-cpus", "3-1"][..], "--loop-cpus"),
        (&["--loop-cpus", "0,x"][..], "--loop-cpus"),
        (&["--loop-cpus", "0-99999999999"][..], "--loop-cpus"),
        (&["--loop-cpus", "1024"][..], "--loop-cpus"),
    ] {
        let mut proc = Proc::start("ping_pong", args);
        let status = proc.wait_exit(Instant::now() + STARTUP);
        assert_eq!(status.code(), Some(2), "{args:?}: {status}");
        proc.rest(Duration::from_secs(1));
        let stderr = proc.final_stderr(Duration::from_secs(2));
        assert!(
            stderr.contains(complaint),
            "{args:?}: stderr does not mention {complaint}: {stderr}"
        );
        assert!(
            proc.seen.is_empty(),
            "{args:?} printed to stdout: {:?}",
            proc.seen
        );
    }

    let mut help = Proc::start("help", &["--help"]);
    let status = help.wait_exit(Instant::now() + STARTUP);
    assert!(status.success(), "--help: {status}");
    help.rest(Duration::from_secs(1));
    assert!(
        help.seen.iter().any(|l| l.contains("Usage")),
        "{:?}",
        help.seen
    );
}

/// `--loop-cpus` pins the server's event loops, `--heartbeat-mode idle`
/// makes it answer a pinging consumer without pinging it, and a CPU that
/// does not exist stops the server with an error naming it.
#[test]
fn loop_cpus_and_heartbeat_mode_flags_reach_the_server() {
    let _serial = serial();
    let cpu = support::process::allowed_cpus()
        .last()
        .copied()
        .expect("a CPU");
    let cpu_text = cpu.to_string();
    let flags = [
        "--heartbeat-ms",
        "100",
        "--heartbeat-mode",
        "idle",
        "--loop-cpus",
        &cpu_text,
    ];
    let (mut server, addr) = start_server_with(&flags);
    let pid = server.child.id().to_string();
    let loops = support::process::threads_allowed_cpus_of(&pid, "pulse-server-lo");
    assert!(
        !loops.is_empty() && loops.iter().all(|list| *list == cpu_text),
        "the server's loop threads may run on {loops:?}, not just CPU {cpu}"
    );

    // A consumer pinging every 50 ms for 1.5 s: an Idle provider answers
    // each and sends no Ping of its own (a Fixed one sends one every
    // 100 ms, about 15). A few are allowed, for a stalled test thread.
    let mut raw = RawPeer::connect(addr.parse().expect("addr"));
    let (mut pongs, mut pings) = (0, 0);
    for seq in 0..30u64 {
        raw.send(&encode_ping(seq));
        let next = Instant::now() + Duration::from_millis(50);
        while let Ok(Some(frame)) = raw.read(next) {
            match frame.header.kind {
                Kind::Pong => pongs += 1,
                Kind::Ping => pings += 1,
                other => panic!("unexpected {other:?} from the server"),
            }
        }
    }
    assert!(pongs >= 25, "{pongs} pongs for 30 pings");
    assert!(
        pings <= 3,
        "the Idle server sent {pings} pings to a consumer pinging every 50 ms"
    );
    server.signal("TERM");
    let status = server.wait_exit(Instant::now() + STARTUP);
    assert!(status.success(), "server: {status}");

    // CPU 1023 is within pulse's range but exists on no test machine: the
    // OS refuses it when the loops start. (A CPU that exists but is outside
    // this process's affinity mask would be accepted: a thread may widen
    // its own mask, only cpusets can forbid that.)
    let mut refused = Proc::start(
        "server",
        &["server", "--addr", "127.0.0.1:0", "--loop-cpus", "1023"],
    );
    let status = refused.wait_exit(Instant::now() + STARTUP);
    assert_eq!(status.code(), Some(1), "{status}");
    let stderr = refused.final_stderr(Duration::from_secs(2));
    assert!(
        stderr.contains("CPU 1023"),
        "stderr does not name CPU 1023: {stderr}"
    );
}

#[test]
fn the_help_lists_every_bound_flag_with_its_default() {
    let _serial = serial();
    let server = pulse::ServerConfig::default();
    let client = pulse::ClientConfig::default();
    let connection = &server.connection;
    let ms = |d: Duration| d.as_millis().to_string();
    let off_or_ms = |d: Option<Duration>| d.map_or_else(|| "off".to_string(), ms);
    let flags = [
        ("--max-connections", server.max_connections.to_string()),
        ("--max-inflight", server.max_inflight.to_string()),
        ("--max-inflight", client.max_inflight.to_string()),
        (
            "--max-write-queue-bytes",
            connection.max_write_queue_bytes.to_string(),
        ),
        ("--min-ping-interval-ms", ms(connection.min_ping_interval)),
        ("--frame-timeout-ms", off_or_ms(connection.frame_timeout)),
        ("--max-idle-ms", off_or_ms(server.max_idle)),
        ("--max-age-ms", off_or_ms(server.max_age)),
    ];

    let mut help = Proc::start("help", &["--help"]);
    let status = help.wait_exit(Instant::now() + STARTUP);
    assert!(status.success(), "--help: {status}");
    help.rest(Duration::from_secs(1));
    let text = help.seen.join("\n");
    for (flag, default) in flags {
        // The flag's entry: its line and the indented lines that continue it.
        let entry: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.trim_start().starts_with(&format!("{flag} N")))
            .enumerate()
            .take_while(|(i, l)| *i == 0 || l.starts_with("                "))
            .map(|(_, l)| l)
            .collect();
        assert!(!entry.is_empty(), "--help has no entry for {flag}:\n{text}");
        let entry = entry.join(" ");
        assert!(
            entry.contains(&format!("(default {default})")),
            "the entry of {flag} does not give the default {default}: {entry}"
        );
    }
}

#[test]
fn max_connections_flag_refuses_the_second_connection_with_close_overloaded() {
    let _serial = serial();
    // A slow heartbeat: the raw peers below answer no pings.
    let (mut server, addr) =
        start_server_with(&["--max-connections", "1", "--heartbeat-ms", "10000"]);
    let addr: std::net::SocketAddr = addr.parse().expect("a socket address");

    let mut admitted = RawPeer::connect(addr);
    assert_pings(&mut admitted, 1);
    let admitted_addr = admitted.local_addr().to_string();
    server.wait_for("the first connection", Instant::now() + STARTUP, |l| {
        l.event() == "connected" && l.str("peer") == admitted_addr
    });

    let mut refused = RawPeer::connect(addr);
    let refused_addr = refused.local_addr().to_string();
    let (status, reason) = close_of(&refused.expect_close_then_end(STARTUP));
    assert_eq!(status, CloseStatus::Overloaded as u8, "{reason}");
    assert!(reason.contains("max_connections 1"), "{reason}");

    let (line, before) = server.wait_for("the refusal", Instant::now() + STARTUP, |l| {
        l.event() == "refused"
    });
    assert_eq!(line.str("side"), "server", "{}", line.text);
    assert_eq!(line.str("peer"), refused_addr, "{}", line.text);
    assert_eq!(line.str("reason"), "overloaded", "{}", line.text);
    assert!(
        line.str("detail").contains("max_connections 1"),
        "{}",
        line.text
    );
    assert!(
        before.iter().all(|l| l.str("peer") != refused_addr),
        "the refused peer was reported before: {:?}",
        before.iter().map(|l| &l.text).collect::<Vec<_>>()
    );

    // The admitted connection is undisturbed.
    assert_pings(&mut admitted, 2);
}

#[test]
fn frame_timeout_and_max_age_flags_close_their_peers() {
    let _serial = serial();
    const FRAME_TIMEOUT: Duration = Duration::from_millis(300);
    const MAX_AGE: Duration = Duration::from_millis(1000);
    let (mut server, addr) = start_server_with(&[
        "--heartbeat-ms",
        "10000",
        "--frame-timeout-ms",
        &FRAME_TIMEOUT.as_millis().to_string(),
        "--max-age-ms",
        &MAX_AGE.as_millis().to_string(),
    ]);
    let addr: std::net::SocketAddr = addr.parse().expect("a socket address");

    // A slowloris: half a header, then nothing.
    let started = Instant::now();
    let mut slow = RawPeer::connect(addr);
    let slow_addr = slow.local_addr().to_string();
    slow.send(&encode_ping(1)[..10]);
    // A polite peer that is served, then aged out.
    let mut aged = RawPeer::connect(addr);
    let aged_addr = aged.local_addr().to_string();
    assert_pings(&mut aged, 1);

    let (status, reason) = close_of(&slow.expect_close_then_end(STARTUP));
    assert_eq!(status, CloseStatus::ProtocolError as u8, "{reason}");
    assert!(reason.contains("frame_timeout"), "{reason}");
    assert!(
        started.elapsed() >= FRAME_TIMEOUT,
        "closed before frame_timeout"
    );

    let (status, reason) = close_of(&aged.expect_close_then_end(STARTUP));
    assert_eq!(status, CloseStatus::Normal as u8, "{reason}");
    assert!(reason.contains("max_age"), "{reason}");
    assert!(started.elapsed() >= MAX_AGE, "closed before max_age");

    // The provider reports each with the bound it enforced.
    let mut reasons = std::collections::HashMap::new();
    while reasons.len() < 2 {
        let (line, _) = server.wait_for("the disconnects", Instant::now() + STARTUP, |l| {
            l.event() == "disconnected"
        });
        reasons.insert(line.str("peer").to_string(), line.str("reason").to_string());
    }
    assert_eq!(reasons[&slow_addr], "frame_timeout", "{reasons:?}");
    assert_eq!(reasons[&aged_addr], "max_age", "{reasons:?}");
}

/// SIGTERM on the client and Ctrl-C (SIGINT) on the server stop each half
/// gracefully: the one stopped closes with Close(Normal) and exits 0, the
/// other reports `peer_shutdown` (not an end without a Close frame).
#[test]
fn sigterm_and_sigint_stop_either_half_with_a_close_normal() {
    let _serial = serial();
    let (mut server, addr) = start_server();
    let (mut client, client_addr) = start_client(&mut server, &addr);

    client.signal("TERM");
    let (summary, _) = client.wait_for("summary", Instant::now() + RECOVERY, |l| {
        l.event() == "summary"
    });
    assert!(summary.u64("ok") >= 1, "{}", summary.text);
    let status = client.wait_exit(Instant::now() + RECOVERY);
    assert!(status.success(), "client exit status {status}");
    let (gone, _) = server.wait_for("the client's disconnect", Instant::now() + RECOVERY, |l| {
        l.event() == "disconnected" && l.str("peer") == client_addr
    });
    assert_eq!(gone.str("reason"), "peer_shutdown", "{}", gone.text);

    let (mut client, _) = start_client(&mut server, &addr);
    server.signal("INT");
    let (gone, _) = client.wait_for("the server's disconnect", Instant::now() + RECOVERY, |l| {
        l.event() == "disconnected"
    });
    assert_eq!(gone.str("reason"), "peer_shutdown", "{}", gone.text);
    let status = server.wait_exit(Instant::now() + RECOVERY);
    assert!(status.success(), "server exit status {status}");
}

/// Ctrl-C on a client whose call waits for a provider that is not there
/// ends that call at once (the client shuts down: `shut down`), not at its
/// 5 s call timeout (`not connected`), and the client exits 0.
#[test]
fn ctrl_c_ends_a_client_call_waiting_for_a_missing_provider_at_once() {
    let _serial = serial();
    let addr = support::unused_loopback_addr().to_string();
    let mut client = Proc::start("client", &["client", "--addr", &addr]);
    // Its first call waits for a connection that never comes.
    client.wait_for("reconnecting", Instant::now() + STARTUP, |l| {
        l.event() == "reconnecting"
    });
    client.signal("INT");
    let (failed, _) = client.wait_for("call_failed", Instant::now() + RECOVERY, |l| {
        l.event() == "call_failed"
    });
    assert_eq!(failed.str("error"), "shut down", "{}", failed.text);
    let (summary, _) = client.wait_for("summary", Instant::now() + RECOVERY, |l| {
        l.event() == "summary"
    });
    assert_eq!(
        (summary.u64("count"), summary.u64("failed")),
        (1, 1),
        "{}",
        summary.text
    );
    let status = client.wait_exit(Instant::now() + RECOVERY);
    assert!(status.success(), "client exit status {status}");
}

#[test]
fn the_client_starts_before_the_server_and_stops_after_count_calls() {
    let _serial = serial();
    let addr = support::unused_loopback_addr().to_string();
    let hb = HEARTBEAT_MS.to_string();
    let mut client = Proc::start(
        "client",
        &[
            "client",
            "--addr",
            &addr,
            "--heartbeat-ms",
            &hb,
            "--count",
            "3",
            "--interval-ms",
            "50",
        ],
    );
    // Nobody listens yet: the client keeps trying (and says so) instead of exiting.
    client.wait_for("reconnecting", Instant::now() + STARTUP, |l| {
        l.event() == "reconnecting"
    });
    let mut server = Proc::start(
        "server",
        &["server", "--addr", &addr, "--heartbeat-ms", &hb],
    );
    server.wait_for("listening line", Instant::now() + STARTUP, |l| {
        l.event() == "listening"
    });

    let (summary, before) = client.wait_for("summary", Instant::now() + RECOVERY, |l| {
        l.event() == "summary"
    });
    // `connected` comes out before the first answer on that connection.
    let position = |event: &str| before.iter().position(|l| l.event() == event);
    let (connected, first_pong) = (position("connected"), position("pong"));
    assert!(connected.is_some(), "no connected line");
    assert!(
        connected < first_pong,
        "a pong came out before connected: {:?}",
        before.iter().map(|l| &l.text).collect::<Vec<_>>()
    );
    let pongs: Vec<u64> = before
        .iter()
        .filter(|l| l.event() == "pong")
        .map(|l| l.u64("seq"))
        .collect();
    assert_eq!(pongs, [1, 2, 3], "{}", summary.text);
    assert_eq!(
        (
            summary.u64("count"),
            summary.u64("ok"),
            summary.u64("failed")
        ),
        (3, 3, 0),
        "{}",
        summary.text
    );
    let status = client.wait_exit(Instant::now() + RECOVERY);
    assert!(status.success(), "client exit status {status}");
}

#[test]
fn the_example_server_serves_ping_echo_and_sleep() {
    use pulse::{Client, ClientConfig, Error};
    use rmpv::Value;

    let _serial = serial();
    let (_server, addr) = start_server();
    let client = Client::connect(addr.as_str(), ClientConfig::default())
        .expect("connect to the example server");

    let n: u64 = client.call("demo", "ping", &u64::MAX).expect("ping");
    assert_eq!(n, u64::MAX);

    // Binary stays binary, f32 stays f32, extension types survive.
    let value = Value::Map(vec![
        (Value::from("bin"), Value::Binary(vec![0, 159, 255])),
        (Value::from("f32"), Value::F32(1.5)),
        (Value::from("f64"), Value::F64(-2.25)),
        (Value::from("ext"), Value::Ext(7, vec![1, 2, 3])),
        (
            Value::from("nested"),
            Value::Array(vec![Value::Nil, Value::from(true), Value::from(-3)]),
        ),
    ]);
    let echoed: Value = client.call("demo", "echo", &value).expect("echo");
    assert_eq!(echoed, value);

    let started = Instant::now();
    let slept: u64 = client.call("demo", "sleep", &150u64).expect("sleep");
    assert_eq!(slept, 150);
    assert!(
        started.elapsed() >= Duration::from_millis(150),
        "answered after {:?}",
        started.elapsed()
    );

    match client.call::<_, u64>("demo", "sleep", &3_600_000u64) {
        Err(Error::Remote { message, .. }) => assert!(message.contains("60000"), "{message}"),
        other => panic!("an hour-long sleep should be refused, got {other:?}"),
    }
    match client.call::<_, u64>("demo", "ping", &"seven") {
        Err(Error::Remote { status, .. }) => {
            assert_eq!(status, pulse::protocol::ResponseStatus::BadRequest)
        }
        other => panic!("a string is not a u64, got {other:?}"),
    }
}
