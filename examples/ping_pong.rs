// Run it: `cargo run --release --example ping_pong` (provider and consumer in one process),
// or as two processes: `cargo run --release --example ping_pong -- server --addr 127.0.0.1:7000`
// and `cargo run --release --example ping_pong -- client --addr 127.0.0.1:7000` (`-- --help`: all flags).

//! `ping_pong`: pulse's liveness demo, and the smallest complete program that
//! uses it.
//!
//! Three modes:
//!
//! * **no mode** — a provider and a consumer in one process, on an ephemeral
//!   port of 127.0.0.1. The consumer sends `--count` (default 1,000)
//!   `demo.ping` calls back to back, prints a round-trip summary (p50, p99 and
//!   max in µs, from an HDR histogram) and exits 0 (1 if any call failed).
//! * **`server --addr ADDR`** — the provider alone. It serves until Ctrl-C
//!   (SIGINT) or SIGTERM, then shuts down gracefully: its consumers get a
//!   Close(Normal) and report `peer_shutdown`.
//! * **`client --addr ADDR`** — the consumer alone. It starts even when the
//!   provider is not up yet, calls `demo.ping` every `--interval-ms` (default
//!   1,000) and keeps calling through outages: a failed call is reported and
//!   the next one waits for the reconnect. It stops after `--count` calls
//!   (0, the default here, means never) or at Ctrl-C / SIGTERM: it prints its
//!   summary and closes with Close(Normal). A call still waiting then (on a
//!   provider that is down or frozen) ends at once: the signal shuts the
//!   client down (`Client::shutdown`), and that call fails with `shut down`.
//!
//! To watch the other endings, stop a half abruptly instead: `kill -9` is an
//! end without a Close frame (`peer_closed`), `kill -STOP` a frozen peer that
//! the other side declares dead after `N × heartbeat` (`heartbeat_timeout`).
//!
//! Both halves take `--heartbeat-ms N` (default 1,000) and `--max-missed N`
//! (default 3): a peer that stays silent for `N × heartbeat` is declared dead.
//! `--heartbeat-mode idle` pings only when a connection was idle for an
//! interval (Netty's all-idle) instead of every interval, and `--loop-cpus
//! LIST` pins the event loops to CPUs (`0,2` or `0-3`; loop `i` on the
//! `i % len`-th), as `ConnectionConfig::loop_cpus` does (Linux only).
//!
//! Every bound pulse enforces on a peer has a flag too (`--max-connections`,
//! `--max-inflight`, `--max-write-queue-bytes`, `--min-ping-interval-ms`,
//! `--frame-timeout-ms`, `--max-idle-ms`, `--max-age-ms`); `--help` lists
//! them with their defaults, which it reads from pulse's own `Default`
//! configs, and `docs/RELIABILITY.md` says what happens past each one.
//!
//! # Output
//!
//! Standard output carries one JSON object per line, so scripts and tests can
//! follow along (`jq` works too). Every line has an `"event"`:
//!
//! ```text
//! {"event":"listening","addr":"127.0.0.1:7000"}                  server, first line
//! {"event":"connected","side":"client","peer":"127.0.0.1:7000"}
//! {"event":"heartbeat_missed","side":"client","peer":"127.0.0.1:7000","missed":1}
//! {"event":"disconnected","side":"client","peer":"127.0.0.1:7000","reason":"heartbeat_timeout"}
//! {"event":"reconnecting","side":"client","peer":"127.0.0.1:7000","attempt":1,"delay_ms":104}
//! {"event":"refused","side":"server","peer":"127.0.0.1:53122","reason":"overloaded","detail":"too many connections (max_connections 1)"}
//! {"event":"pong","seq":12,"rtt_us":87}                           client mode only
//! {"event":"call_failed","seq":13,"error":"connection to ... lost ..."}
//! {"event":"summary","count":1000,"ok":1000,"failed":0,"p50_us":30,"p99_us":61,"max_us":230}
//! ```
//!
//! The liveness lines (`connected`, `heartbeat_missed`, `disconnected`,
//! `reconnecting`, `refused`; `gave_up` only with a reconnect attempt
//! limit, which this example leaves unlimited) come straight from `Server::events()` /
//! `Client::events()`; `"side"` says which half saw it. A `disconnected` line
//! has a `"reason"` (`heartbeat_timeout`, `peer_closed`, `peer_shutdown`,
//! `io_error`, `protocol_error`, `shutdown`, or the bound this side enforced:
//! `overloaded`, `too_many_pings`, `frame_timeout`, `idle_timeout`, `max_age`)
//! and, when there is one, a `"detail"` (for `peer_closed`: the reason text of
//! the peer's Close frame). A `refused` line is a connection the provider
//! turned away before serving it (past `--max-connections`), with the same
//! `"reason"` and `"detail"` fields.
//!
//! Lines come out in the order things happened: a `pong` never precedes its
//! connection's `connected`, and a call lost with a connection comes out
//! (`call_failed`) after that connection's `disconnected`. pulse emits
//! `connected` before a call can use the connection and `disconnected`
//! before the calls in flight on it fail, and a call's line is written after
//! the events already emitted. (One exception: a call whose own write meets
//! a broken socket fails at once, and may come out before the loop has
//! noticed and reported the connection's end.)
//!
//! Logs (`RUST_LOG=debug`, through `env_logger`) go to standard error only, so
//! they never mix with the JSON lines.
//!
//! # The `demo` service
//!
//! Service `demo` (empty version and group) has three methods:
//!
//! * `ping`: an unsigned integer in, the same integer out. It runs *inline*
//!   on the event loop: it is tiny and never blocks, so it takes the fastest
//!   path.
//! * `echo`: any MessagePack value in, the same value out. Binary strings stay
//!   binary and an `f32` stays an `f32`, because the handler takes and returns
//!   an [`rmpv::Value`] rather than a lossy type.
//! * `sleep`: a number of milliseconds in (at most 60,000); it sleeps that
//!   long and answers the same number. A stand-in for a slow handler: it runs
//!   on the worker pool (the default), so it delays neither heartbeats nor
//!   other calls.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Select, Sender, TryRecvError};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use pulse::liveness::HeartbeatMode;
use pulse::{Client, ClientConfig, ConnectionConfig, Event, Server, ServerConfig, ServiceBuilder};
use serde::Serialize;

/// What `--help` prints (and what a usage error points to). The defaults of
/// the bounds are read from pulse's own `Default` configs, so they cannot
/// drift from the library.
fn usage() -> String {
    let server = ServerConfig::default();
    let client = ClientConfig::default();
    let connection = &server.connection;
    let ms = |d: Duration| d.as_millis().to_string();
    let off_or_ms = |d: Option<Duration>| d.map_or_else(|| "off".to_string(), ms);
    format!(
        "\
pulse ping_pong: a provider and a consumer that watch each other's liveness.

Usage:
  ping_pong [--count N] [--heartbeat-ms N] [--max-missed N] [--interval-ms N] [BOUNDS]
            [--heartbeat-mode M] [--loop-cpus LIST]
      Provider and consumer in one process on 127.0.0.1 (ephemeral port). The
      consumer makes N calls (default 1000, back to back), prints a round-trip
      summary and exits 0 (1 if any call failed).
  ping_pong server --addr ADDR [--heartbeat-ms N] [--max-missed N] [BOUNDS]
                   [--heartbeat-mode M] [--loop-cpus LIST]
      The provider alone; serves service `demo` on ADDR until Ctrl-C or
      SIGTERM, then closes every connection with Close(Normal).
      ADDR may use port 0: the first output line says the real address.
  ping_pong client --addr ADDR [--count N] [--interval-ms N] [--heartbeat-ms N] [--max-missed N]
                   [--max-inflight N] [--max-write-queue-bytes N] [--min-ping-interval-ms N]
                   [--frame-timeout-ms N] [--heartbeat-mode M] [--loop-cpus LIST]
      The consumer alone; calls demo.ping on ADDR every --interval-ms
      (default 1000) until --count calls are made (default 0: forever) or
      Ctrl-C / SIGTERM, then prints its summary and closes with Close(Normal).
      Starts even if the provider is not up yet, and keeps going through outages;
      exits 0 even when calls failed (the summary counts them).

Options:
  --addr ADDR         host:port to listen on (server) or connect to (client)
  --heartbeat-ms N    heartbeat interval in milliseconds (default {heartbeat}; at least
                      twice --min-ping-interval-ms, so 20 with its default)
  --max-missed N      silent intervals before a peer is declared dead (default {max_missed})
  --heartbeat-mode M  fixed: ping every interval; idle: ping only after an
                      interval with nothing written or read (default fixed)
  --loop-cpus LIST    pin event loop i to the (i % len)-th CPU of LIST, e.g.
                      0,2 or 0-3 (Linux; default: not pinned)
  --count N           calls to make; 0 = forever (default 1000 without a mode, 0 for client)
  --interval-ms N     pause between calls (default 0 without a mode, 1000 for client)
  -h, --help          print this help

BOUNDS: what a side enforces on its peers (docs/RELIABILITY.md). Flags marked
`server` are refused in client mode; without a mode every flag applies to the
provider, and --max-inflight and the per-connection ones to the consumer too.
  --max-connections N        server: open consumer connections; the next one is
                             refused with Close(Overloaded) (default {max_connections})
  --max-inflight N           server: requests of one connection handled at once,
                             the excess answered Overloaded (default {server_inflight});
                             client: calls waiting for a response, the excess
                             fails at once (default {client_inflight})
  --max-write-queue-bytes N  memory queued frames may hold on one connection before
                             new frames are refused as overloaded; at least the
                             largest frame, {max_frame_len} + 20 (default {max_write_queue})
  --min-ping-interval-ms N   pings from the peer closer than this are strikes;
                             more than {strikes} in a row: Close(TooManyPings) (default {min_ping})
  --frame-timeout-ms N       a frame must be complete this long after its first
                             byte, else Close(ProtocolError); 0 = off (default {frame_timeout})
  --max-idle-ms N            server: close a connection that carried no call for
                             this long with Close(IdleTimeout); 0 = off (default {max_idle})
  --max-age-ms N             server: close a connection this long after accepting
                             it, gracefully, with Close(Normal); 0 = off (default {max_age})
  Milliseconds are at most {MAX_MS} (one year).

Output: one JSON object per line on stdout (events, pongs, a summary);
logs on stderr (set RUST_LOG=debug for more).
",
        heartbeat = ms(connection.heartbeat.interval),
        max_missed = connection.heartbeat.max_missed,
        max_connections = server.max_connections,
        server_inflight = server.max_inflight,
        client_inflight = client.max_inflight,
        max_frame_len = connection.max_frame_len,
        max_write_queue = connection.max_write_queue_bytes,
        strikes = connection.max_ping_strikes,
        min_ping = ms(connection.min_ping_interval),
        frame_timeout = off_or_ms(connection.frame_timeout),
        max_idle = off_or_ms(server.max_idle),
        max_age = off_or_ms(server.max_age),
    )
}

/// Largest value of a millisecond flag: one year. Far past any useful
/// setting, and far from the overflow of `Instant + Duration`.
const MAX_MS: u64 = 365 * 24 * 60 * 60 * 1000;

/// Largest delay `demo.sleep` accepts, so one call cannot park a worker
/// thread for hours.
const MAX_SLEEP_MS: u64 = 60_000;

/// Upper bound of the round-trip histogram (60 s in µs); longer samples are
/// clamped to it.
const HISTOGRAM_MAX_US: u64 = 60_000_000;

// ----- command line ---------------------------------------------------------

/// Which half (or both) to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Provider and consumer in one process.
    Both,
    Server,
    Client,
}

/// The parsed command line.
#[derive(Debug)]
struct Options {
    mode: Mode,
    /// Required for `server` and `client`; refused without a mode.
    addr: Option<String>,
    heartbeat_ms: u64,
    max_missed: u32,
    heartbeat_mode: HeartbeatMode,
    /// `ConnectionConfig::loop_cpus`; empty = not pinned.
    loop_cpus: Vec<usize>,
    /// 0 = forever.
    count: u64,
    interval_ms: u64,
    bounds: Bounds,
}

/// Bounds set on the command line; `None` keeps pulse's default.
#[derive(Debug, Default)]
struct Bounds {
    max_connections: Option<usize>,
    max_inflight: Option<usize>,
    max_write_queue_bytes: Option<usize>,
    min_ping_interval_ms: Option<u64>,
    /// 0 = off, for this one and the two below.
    frame_timeout_ms: Option<u64>,
    max_idle_ms: Option<u64>,
    max_age_ms: Option<u64>,
}

/// The flags that set a bound only the provider enforces.
const SERVER_ONLY: [&str; 3] = ["--max-connections", "--max-idle-ms", "--max-age-ms"];

/// What the command line asks for.
enum Command {
    Help,
    Run(Options),
}

/// Parses the arguments (without the program name). `Err` is a message for
/// standard error; the caller exits with code 2.
fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Command, String> {
    let mut args = args.into_iter().peekable();
    // An optional mode comes first; anything else is a flag.
    let mode = match args.peek().map(String::as_str) {
        Some("server") => Mode::Server,
        Some("client") => Mode::Client,
        Some(other) if !other.starts_with('-') => {
            return Err(format!(
                "unknown mode {other:?} (expected `server`, `client` or none)"
            ));
        }
        _ => Mode::Both,
    };
    if mode != Mode::Both {
        args.next();
    }

    let mut addr = None;
    let mut heartbeat_ms = 1000;
    let mut max_missed = 3;
    let mut heartbeat_mode = HeartbeatMode::Fixed;
    let mut loop_cpus = Vec::new();
    let mut count = None;
    let mut interval_ms = None;
    let mut bounds = Bounds::default();
    let mut server_only = None;
    while let Some(arg) = args.next() {
        if arg == "-h" || arg == "--help" {
            return Ok(Command::Help);
        }
        // Both `--flag value` and `--flag=value` are accepted.
        let (flag, inline_value) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                (flag.to_string(), Some(value.to_string()))
            }
            _ => (arg.clone(), None),
        };
        let known = [
            "--addr",
            "--heartbeat-ms",
            "--max-missed",
            "--heartbeat-mode",
            "--loop-cpus",
            "--count",
            "--interval-ms",
            "--max-connections",
            "--max-inflight",
            "--max-write-queue-bytes",
            "--min-ping-interval-ms",
            "--frame-timeout-ms",
            "--max-idle-ms",
            "--max-age-ms",
        ];
        if !known.contains(&flag.as_str()) {
            return Err(format!("unknown argument {arg:?}"));
        }
        let value = match inline_value.or_else(|| args.next()) {
            Some(value) => value,
            None => return Err(format!("{flag} needs a value")),
        };
        match flag.as_str() {
            "--addr" => addr = Some(parse_addr(&flag, &value)?),
            "--heartbeat-ms" => heartbeat_ms = parse_ms(&flag, &value)?,
            "--max-missed" => max_missed = parse_number(&flag, &value)?,
            "--heartbeat-mode" => heartbeat_mode = parse_heartbeat_mode(&flag, &value)?,
            "--loop-cpus" => loop_cpus = parse_cpu_list(&flag, &value)?,
            "--count" => count = Some(parse_number(&flag, &value)?),
            "--interval-ms" => interval_ms = Some(parse_ms(&flag, &value)?),
            "--max-connections" => bounds.max_connections = Some(parse_count(&flag, &value)?),
            "--max-inflight" => bounds.max_inflight = Some(parse_count(&flag, &value)?),
            "--max-write-queue-bytes" => {
                bounds.max_write_queue_bytes = Some(parse_number(&flag, &value)?)
            }
            "--min-ping-interval-ms" => {
                bounds.min_ping_interval_ms = Some(parse_ms(&flag, &value)?)
            }
            "--frame-timeout-ms" => bounds.frame_timeout_ms = Some(parse_ms(&flag, &value)?),
            "--max-idle-ms" => bounds.max_idle_ms = Some(parse_ms(&flag, &value)?),
            "--max-age-ms" => bounds.max_age_ms = Some(parse_ms(&flag, &value)?),
            // Every flag of `known` has an arm above; an error, not a panic,
            // if one is ever added there and forgotten here.
            other => return Err(format!("{other} is not handled (a bug in ping_pong)")),
        }
        if SERVER_ONLY.contains(&flag.as_str()) {
            server_only = Some(flag);
        }
    }

    // Flags that do not apply to the chosen mode are errors, not silently
    // ignored: `server --count 5` is almost certainly a mistake.
    match mode {
        Mode::Both if addr.is_some() => {
            return Err("--addr needs a mode: `server --addr ADDR` or `client --addr ADDR`".into());
        }
        Mode::Server | Mode::Client if addr.is_none() => {
            return Err(format!("{} needs --addr ADDR", mode_name(mode)));
        }
        Mode::Server if count.is_some() || interval_ms.is_some() => {
            return Err(
                "--count and --interval-ms are client flags; the server only answers".into(),
            );
        }
        _ => {}
    }
    if let (Mode::Client, Some(flag)) = (mode, server_only) {
        return Err(format!(
            "{flag} is a server flag: only the provider enforces it"
        ));
    }
    if max_missed == 0 {
        return Err("--max-missed must be at least 1".into());
    }
    let (default_count, default_interval) = match mode {
        Mode::Both => (1000, 0),
        _ => (0, 1000),
    };
    let options = Options {
        mode,
        addr,
        heartbeat_ms,
        max_missed,
        heartbeat_mode,
        loop_cpus,
        count: count.unwrap_or(default_count),
        interval_ms: interval_ms.unwrap_or(default_interval),
        bounds,
    };
    // Let pulse itself judge the settings (e.g. the heartbeat interval must
    // be at least two timer ticks, the write queue must hold a whole frame),
    // so the error names the real limit, prefixed with the flag to change.
    let invalid = |e: String| format!("{}: {e}", flags_of(&e));
    client_config(&options).validate().map_err(invalid)?;
    server_config(&options).validate().map_err(invalid)?;
    Ok(Command::Run(options))
}

/// The flag(s) that set the config field a validation error names.
fn flags_of(error: &str) -> &'static str {
    // Most specific first: "frame_timeout must be at least one timer_tick".
    [
        ("frame_timeout", "--frame-timeout-ms"),
        ("max_write_queue_bytes", "--max-write-queue-bytes"),
        ("max_inflight", "--max-inflight"),
        ("max_connections", "--max-connections"),
        ("timer_tick", "--heartbeat-ms"),
        (
            "min_ping_interval",
            "--heartbeat-ms / --min-ping-interval-ms",
        ),
        ("loop_cpus", "--loop-cpus"),
        ("heartbeat", "--heartbeat-ms / --max-missed"),
    ]
    .into_iter()
    .find(|(field, _)| error.contains(field))
    .map_or("invalid settings", |(_, flag)| flag)
}

fn parse_number<T: std::str::FromStr>(flag: &str, value: &str) -> Result<T, String> {
    value
        .parse()
        .map_err(|_| format!("{flag} expects a non-negative integer, got {value:?}"))
}

/// `host:port` (an IPv6 address in brackets), checked for its form here so
/// that a typo is a usage error; whether the host resolves, and whether the
/// port is free, are found out when the address is used.
fn parse_addr(flag: &str, value: &str) -> Result<String, String> {
    let bad =
        || format!("{flag} expects host:port, e.g. 127.0.0.1:7000 or [::1]:7000, got {value:?}");
    match value.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
            Ok(value.to_string())
        }
        _ => Err(bad()),
    }
}

/// `fixed` or `idle`.
fn parse_heartbeat_mode(flag: &str, value: &str) -> Result<HeartbeatMode, String> {
    match value {
        "fixed" => Ok(HeartbeatMode::Fixed),
        "idle" => Ok(HeartbeatMode::Idle),
        _ => Err(format!("{flag} expects `fixed` or `idle`, got {value:?}")),
    }
}

/// CPU numbers separated by commas, each a number or an inclusive range
/// `a-b` (as `taskset -c` takes them), in the order given. pulse checks the
/// numbers themselves (`ConnectionConfig::validate`), and the OS whether they
/// exist and are in this process's cpuset when the loops start.
fn parse_cpu_list(flag: &str, value: &str) -> Result<Vec<usize>, String> {
    let bad = || format!("{flag} expects CPU numbers like 0,2 or 0-3, got {value:?}");
    let mut cpus = Vec::new();
    let cpu = |text: &str| text.parse::<usize>().map_err(|_| bad());
    for part in value.split(',') {
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (cpu(a)?, cpu(b)?),
            None => (cpu(part)?, cpu(part)?),
        };
        if first > last {
            return Err(bad());
        }
        // Counted before collecting, so `0-99999999999` costs no memory.
        if last - first >= MAX_CPUS_LISTED - cpus.len() {
            return Err(format!("{flag} lists more than {MAX_CPUS_LISTED} CPUs"));
        }
        cpus.extend(first..=last);
    }
    Ok(cpus)
}

/// The most CPUs `--loop-cpus` may list: as many as pulse numbers.
const MAX_CPUS_LISTED: usize = pulse::config::MAX_CPU;

/// A count that must be at least 1.
fn parse_count(flag: &str, value: &str) -> Result<usize, String> {
    match parse_number(flag, value)? {
        0 => Err(format!("{flag} must be at least 1")),
        n => Ok(n),
    }
}

/// Milliseconds, at most [`MAX_MS`].
fn parse_ms(flag: &str, value: &str) -> Result<u64, String> {
    let ms = parse_number(flag, value)?;
    if ms > MAX_MS {
        return Err(format!(
            "{flag} must be at most {MAX_MS} (one year), got {ms}"
        ));
    }
    Ok(ms)
}

/// `None` for 0 ("off"), else the duration.
fn optional_ms(ms: u64) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms))
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Both => "ping_pong",
        Mode::Server => "server",
        Mode::Client => "client",
    }
}

// ----- configuration ----------------------------------------------------------

/// The provider's configuration: defaults, plus the heartbeat and the bounds
/// from the flags.
fn server_config(options: &Options) -> ServerConfig {
    let mut config = ServerConfig::default();
    connection_config(&mut config.connection, options);
    let bounds = &options.bounds;
    if let Some(n) = bounds.max_connections {
        config.max_connections = n;
    }
    if let Some(n) = bounds.max_inflight {
        config.max_inflight = n;
    }
    if let Some(ms) = bounds.max_idle_ms {
        config.max_idle = optional_ms(ms);
    }
    if let Some(ms) = bounds.max_age_ms {
        config.max_age = optional_ms(ms);
    }
    config
}

/// The consumer's configuration: defaults (5 s call timeout, reconnect backoff
/// 100 ms ×2 up to 5 s), plus the heartbeat and the bounds from the flags.
fn client_config(options: &Options) -> ClientConfig {
    let mut config = ClientConfig::default();
    connection_config(&mut config.connection, options);
    if let Some(n) = options.bounds.max_inflight {
        config.max_inflight = n;
    }
    config
}

/// What both sides share: the heartbeat and the per-connection bounds.
fn connection_config(config: &mut ConnectionConfig, options: &Options) {
    config.heartbeat.interval = Duration::from_millis(options.heartbeat_ms);
    config.heartbeat.max_missed = options.max_missed;
    config.heartbeat.mode = options.heartbeat_mode;
    config.loop_cpus = options.loop_cpus.clone();
    let bounds = &options.bounds;
    if let Some(bytes) = bounds.max_write_queue_bytes {
        config.max_write_queue_bytes = bytes;
    }
    if let Some(ms) = bounds.min_ping_interval_ms {
        config.min_ping_interval = Duration::from_millis(ms);
    }
    if let Some(ms) = bounds.frame_timeout_ms {
        config.frame_timeout = optional_ms(ms);
    }
}

// ----- the provider -----------------------------------------------------------

/// Service `demo`: `ping`, `echo` and `sleep` (see the module docs).
fn demo_service() -> ServiceBuilder {
    ServiceBuilder::new("demo")
        // Inline: runs on the event loop that read the request. Only for
        // handlers that are short and never block.
        .method_inline("ping", |n: u64| Ok::<_, String>(n))
        // `rmpv::Value` keeps the exact MessagePack types: bin vs str, f32 vs f64.
        .method("echo", |value: rmpv::Value| Ok::<_, String>(value))
        // On the worker pool (what `method` does): blocking here is fine.
        .method("sleep", |ms: u64| {
            if ms > MAX_SLEEP_MS {
                return Err(format!("sleep is limited to {MAX_SLEEP_MS} ms, got {ms}"));
            }
            thread::sleep(Duration::from_millis(ms));
            Ok(ms)
        })
}

fn start_server(options: &Options, addr: &str) -> pulse::Result<Server> {
    Server::builder()
        .config(server_config(options))
        .service(demo_service())
        .bind(addr)
}

// ----- output -------------------------------------------------------------------

/// A liveness event as one JSON line. Fields that do not apply to the event
/// are left out rather than printed as `null`.
#[derive(Serialize)]
struct EventLine<'a> {
    event: &'static str,
    side: &'static str,
    peer: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    missed: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    attempt: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    delay_ms: Option<u64>,
    /// `gave_up`: how many attempts failed in a row (as `cluster` prints it).
    #[serde(skip_serializing_if = "Option::is_none")]
    attempts: Option<u32>,
}

impl<'a> EventLine<'a> {
    fn new(side: &'static str, event: &'a Event) -> EventLine<'a> {
        let mut line = EventLine {
            event: event.name(),
            side,
            peer: event.peer().to_string(),
            missed: None,
            reason: None,
            detail: None,
            attempt: None,
            delay_ms: None,
            attempts: None,
        };
        match event {
            Event::HeartbeatMissed { missed, .. } => line.missed = Some(*missed),
            Event::Disconnected { reason, .. } | Event::Refused { reason, .. } => {
                line.reason = Some(reason.as_str());
                line.detail = reason.detail();
            }
            Event::Reconnecting { attempt, delay, .. } => {
                line.attempt = Some(*attempt);
                line.delay_ms = Some(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX));
            }
            Event::GaveUp { attempts, .. } => line.attempts = Some(*attempts),
            // `Connected` has nothing more to say; `Event` is non-exhaustive,
            // so a future kind still prints its name and peer.
            _ => {}
        }
        line
    }
}

/// Every other line the example prints. `tag = "event"` puts the variant name
/// (snake case) in the `"event"` field, first.
#[derive(Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum Line {
    Listening {
        addr: String,
    },
    Pong {
        seq: u64,
        rtt_us: u64,
    },
    CallFailed {
        seq: u64,
        error: String,
    },
    Summary {
        count: u64,
        ok: u64,
        failed: u64,
        p50_us: u64,
        p99_us: u64,
        max_us: u64,
    },
}

/// Where every output line goes, so that lines come out in the order things
/// happened. Events are taken off their channels only under the output's
/// lock, and a call's line first writes the events already emitted: pulse
/// emits `connected` before a call can use the connection, so a `pong` never
/// comes out ahead of its connection's `connected` (as it could when a
/// printer thread and the calling thread each wrote as soon as they had a
/// line). A closed stdout (`| head`) is ignored rather than a panic.
#[derive(Clone)]
struct Output {
    inner: Arc<Mutex<OutputInner>>,
}

struct OutputInner {
    out: Box<dyn Write + Send>,
    /// Each watched side's name and events, until its channel closes.
    sources: Vec<(&'static str, Receiver<Event>)>,
}

impl Output {
    fn stdout() -> Output {
        Output::to(Box::new(std::io::stdout()))
    }

    fn to(out: Box<dyn Write + Send>) -> Output {
        let sources = Vec::new();
        Output {
            inner: Arc::new(Mutex::new(OutputInner { out, sources })),
        }
    }

    /// Writes one JSON line, after the events already emitted.
    fn line(&self, value: &impl Serialize) {
        let mut inner = self.inner.lock();
        inner.write_events();
        inner.write(value);
    }

    /// Adds a side's events to what the output writes.
    fn add_source(&self, side: &'static str, events: Receiver<Event>) {
        self.inner.lock().sources.push((side, events));
    }

    /// Adds a side's events and starts a thread that writes them as they
    /// come, until the side is gone (its channel closes when the `Client` or
    /// `Server` and its threads have been dropped).
    fn watch(&self, side: &'static str, events: Receiver<Event>) -> JoinHandle<()> {
        self.add_source(side, events.clone());
        let output = self.clone();
        thread::Builder::new()
            .name(format!("{side}-events"))
            .spawn(move || {
                loop {
                    // Wait for an event without taking it: it is taken, and
                    // written, under the lock.
                    let mut ready = Select::new();
                    ready.recv(&events);
                    ready.ready();
                    let mut inner = output.inner.lock();
                    inner.write_events();
                    if !inner.sources.iter().any(|(_, s)| s.same_channel(&events)) {
                        return; // closed and drained
                    }
                }
            })
            .expect("spawn an event printer thread")
    }
}

impl OutputInner {
    /// Writes every event waiting in the sources; forgets a source whose
    /// channel is closed and empty.
    fn write_events(&mut self) {
        let mut sources = std::mem::take(&mut self.sources);
        sources.retain(|(side, events)| {
            loop {
                match events.try_recv() {
                    Ok(event) => self.write(&EventLine::new(side, &event)),
                    Err(TryRecvError::Empty) => return true,
                    Err(TryRecvError::Disconnected) => return false,
                }
            }
        });
        self.sources = sources;
    }

    fn write(&mut self, value: &impl Serialize) {
        let Ok(mut line) = serde_json::to_string(value) else {
            return;
        };
        line.push('\n');
        let _ = self.out.write_all(line.as_bytes());
        let _ = self.out.flush();
    }
}

/// Waits up to `limit` for an event printer to drain and exit. It exits once
/// every sender is gone; if something still holds one, give up rather than
/// hang (the process is about to exit anyway).
fn join_within(printer: JoinHandle<()>, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !printer.is_finished() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    if printer.is_finished() {
        let _ = printer.join();
    } else {
        log::warn!("event printer still running after {limit:?}; some events may be missing");
    }
}

// ----- the consumer -------------------------------------------------------------

/// Round-trip statistics of the calls made.
struct Stats {
    ok: u64,
    failed: u64,
    rtt_us: Histogram<u64>,
}

impl Stats {
    fn new() -> Stats {
        Stats {
            ok: 0,
            failed: 0,
            // 3 significant digits: p99 of 61 µs is reported as 61, not 64.
            rtt_us: Histogram::new_with_bounds(1, HISTOGRAM_MAX_US, 3)
                .expect("valid histogram bounds"),
        }
    }

    fn summary(&self) -> Line {
        let quantile = |q: f64| {
            if self.rtt_us.is_empty() {
                0
            } else {
                self.rtt_us.value_at_quantile(q)
            }
        };
        Line::Summary {
            count: self.ok + self.failed,
            ok: self.ok,
            failed: self.failed,
            p50_us: quantile(0.50),
            p99_us: quantile(0.99),
            max_us: if self.rtt_us.is_empty() {
                0
            } else {
                self.rtt_us.max()
            },
        }
    }
}

/// Calls `demo.ping` `count` times (0 = until `stop` fires), `interval`
/// apart. With `print_pongs` each answer gets a `pong` line; failures always
/// get a `call_failed` line, and the loop carries on: the client reconnects
/// by itself, and the next call waits for it (up to the call timeout).
fn ping_loop(
    output: &Output,
    client: &Client,
    count: u64,
    interval: Duration,
    print_pongs: bool,
    stop: &Receiver<()>,
) -> Stats {
    let mut stats = Stats::new();
    let mut seq = 0u64;
    while (count == 0 || seq < count) && !fired(stop) {
        seq += 1;
        let started = Instant::now();
        let result: pulse::Result<u64> = client.call("demo", "ping", &seq);
        let rtt_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        match result {
            Ok(answer) if answer == seq => {
                stats.ok += 1;
                stats
                    .rtt_us
                    .saturating_record(rtt_us.clamp(1, HISTOGRAM_MAX_US));
                if print_pongs {
                    output.line(&Line::Pong { seq, rtt_us });
                }
            }
            Ok(answer) => {
                stats.failed += 1;
                let error = format!("ping {seq} was answered with {answer}");
                output.line(&Line::CallFailed { seq, error });
            }
            Err(e) => {
                stats.failed += 1;
                output.line(&Line::CallFailed {
                    seq,
                    error: e.to_string(),
                });
            }
        }
        // No pause after the last call: the summary comes at once. A stop
        // signal ends the pause too.
        if !interval.is_zero()
            && (count == 0 || seq < count)
            && stop.recv_timeout(interval) != Err(RecvTimeoutError::Timeout)
        {
            break;
        }
    }
    stats
}

/// Fires at Ctrl-C (SIGINT) or SIGTERM by disconnecting: every clone of the
/// receiver sees it (`recv` returns `Err`), so several threads can wait for
/// it. If the handler cannot be installed, it never fires (the process then
/// ends at the signal, as any process would, without a graceful close) and a
/// warning says so.
fn stop_signal() -> Receiver<()> {
    let (fire, stop) = crossbeam_channel::bounded::<()>(0);
    let mut fire = Some(fire);
    if let Err(e) = ctrlc::set_handler(move || drop(fire.take())) {
        eprintln!("ping_pong: Ctrl-C will not close gracefully: {e}");
    }
    stop
}

/// Whether [`stop_signal`] fired.
fn fired(stop: &Receiver<()>) -> bool {
    matches!(stop.try_recv(), Err(TryRecvError::Disconnected))
}

/// A thread that shuts `client` down when `stop` fires, so that a call
/// waiting on a provider that is down or frozen ends at once (with
/// `Error::Shutdown`) instead of at its call timeout.
struct ShutdownOnStop {
    /// Dropped to end the thread when the calls ended on their own.
    done: Sender<()>,
    thread: JoinHandle<()>,
}

impl ShutdownOnStop {
    fn start(client: &Client, stop: &Receiver<()>) -> ShutdownOnStop {
        let (done, finished) = crossbeam_channel::bounded::<()>(0);
        let (client, stop) = (client.clone(), stop.clone());
        let thread = thread::spawn(move || {
            crossbeam_channel::select! {
                recv(stop) -> _ => client.shutdown(),
                recv(finished) -> _ => {}
            }
        });
        ShutdownOnStop { done, thread }
    }

    /// Ends the thread and with it its clone of the client, so that
    /// dropping the caller's clone closes the connection.
    fn finish(self) {
        drop(self.done);
        let _ = self.thread.join();
    }
}

// ----- the three modes ----------------------------------------------------------

/// Provider and consumer in one process; exits 0 when every call succeeded.
fn run_both(options: &Options) -> Result<ExitCode, pulse::Error> {
    let output = Output::stdout();
    let server = start_server(options, "127.0.0.1:0")?;
    let server_events = output.watch("server", server.events());
    let client = Client::connect(server.local_addr(), client_config(options))?;
    let client_events = output.watch("client", client.events());

    // Pongs are not printed here: 1,000 lines would bury the summary.
    let interval = Duration::from_millis(options.interval_ms);
    let stats = ping_loop(
        &output,
        &client,
        options.count,
        interval,
        false,
        &stop_signal(),
    );
    output.line(&stats.summary());

    // Shut down in order: the client closes with Close(Normal) ("shutdown"
    // on its side), the provider sees it ("peer_shutdown"), then the
    // provider stops. Those two lines are printed by the two sides' event
    // threads, so either may come first; nothing is printed after them.
    drop(client);
    join_within(client_events, Duration::from_secs(2));
    let deadline = Instant::now() + Duration::from_secs(1);
    while server.connection_count() > 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(1));
    }
    drop(server);
    join_within(server_events, Duration::from_secs(2));

    Ok(if stats.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The provider alone, until Ctrl-C or SIGTERM.
fn run_server(options: &Options, addr: &str) -> Result<ExitCode, pulse::Error> {
    let stop = stop_signal();
    let output = Output::stdout();
    let server = start_server(options, addr)?;
    // First line: the real address (useful with port 0).
    output.line(&Line::Listening {
        addr: server.local_addr().to_string(),
    });
    let printer = output.watch("server", server.events());
    // Serving happens on pulse's own threads; this one waits for the signal.
    let _ = stop.recv();
    // Dropping the server shuts it down: Close(Normal) to every consumer
    // (they report `peer_shutdown`), idle ones at once, busy ones once
    // their running calls finish (for up to `shutdown_timeout`); the printer
    // ends when the events channel closes.
    drop(server);
    join_within(printer, Duration::from_secs(2));
    Ok(ExitCode::SUCCESS)
}

/// The consumer alone.
fn run_client(options: &Options, addr: &str) -> Result<ExitCode, pulse::Error> {
    // `connect_lazy` returns at once and connects in the background, so the
    // client starts even when the provider is not up yet; the first call waits
    // for the connection (up to the call timeout, then `call_failed`).
    let output = Output::stdout();
    let client = Client::connect_lazy(addr, client_config(options))?;
    let printer = output.watch("client", client.events());

    let interval = Duration::from_millis(options.interval_ms);
    let stop = stop_signal();
    let shutdown_on_stop = ShutdownOnStop::start(&client, &stop);
    let stats = ping_loop(&output, &client, options.count, interval, true, &stop);
    shutdown_on_stop.finish();
    output.line(&stats.summary());

    // Close(Normal) to the provider, which reports `peer_shutdown`.
    drop(client);
    join_within(printer, Duration::from_secs(2));
    // Failed calls are expected in client mode (outages are the point).
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    // Logs to stderr; RUST_LOG picks the level (errors only by default).
    env_logger::init();

    let options = match parse_args(std::env::args().skip(1)) {
        Ok(Command::Help) => {
            print!("{}", usage());
            return ExitCode::SUCCESS;
        }
        Ok(Command::Run(options)) => options,
        Err(message) => {
            eprintln!("ping_pong: {message}\n(run `ping_pong --help` for usage)");
            return ExitCode::from(2);
        }
    };
    let addr = options.addr.clone().unwrap_or_default();
    let outcome = match options.mode {
        Mode::Both => run_both(&options),
        Mode::Server => run_server(&options, &addr),
        Mode::Client => run_client(&options, &addr),
    };
    outcome.unwrap_or_else(|e| {
        eprintln!("ping_pong: {e}");
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer whose lines the test reads back.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Buffer {
        /// The `"event"` field of each line written, in order.
        fn events(&self) -> Vec<String> {
            let text = String::from_utf8(self.0.lock().clone()).expect("UTF-8 output");
            text.lines()
                .map(|line| {
                    let value: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
                    value["event"].as_str().expect("an event field").to_string()
                })
                .collect()
        }
    }

    fn peer() -> std::net::SocketAddr {
        "127.0.0.1:7000".parse().unwrap()
    }

    /// An event already emitted when a call's line is written comes out
    /// first, even with no printer thread to write it (none here).
    #[test]
    fn a_call_line_comes_after_the_events_emitted_before_it() {
        let buffer = Buffer::default();
        let output = Output::to(Box::new(buffer.clone()));
        let (emit, events) = crossbeam_channel::unbounded();
        output.add_source("client", events);
        emit.send(Event::Connected { peer: peer() }).unwrap();
        output.line(&Line::Pong { seq: 1, rtt_us: 5 });
        output.line(&Line::Pong { seq: 2, rtt_us: 5 });
        assert_eq!(buffer.events(), ["connected", "pong", "pong"]);
    }

    /// A watched side's events are written as they come, and its printer
    /// thread ends once the channel is closed and drained.
    #[test]
    fn a_watched_side_is_written_until_its_channel_closes() {
        let buffer = Buffer::default();
        let output = Output::to(Box::new(buffer.clone()));
        let (emit, events) = crossbeam_channel::unbounded();
        let printer = output.watch("server", events);
        emit.send(Event::Connected { peer: peer() }).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while buffer.events().is_empty() {
            assert!(Instant::now() < deadline, "the event was not written");
            thread::sleep(Duration::from_millis(1));
        }
        let reason = pulse::DisconnectReason::PeerShutdown;
        emit.send(Event::Disconnected {
            peer: peer(),
            reason,
        })
        .unwrap();
        drop(emit);
        while !printer.is_finished() {
            assert!(Instant::now() < deadline, "the printer did not end");
            thread::sleep(Duration::from_millis(1));
        }
        printer.join().expect("the printer thread");
        assert_eq!(buffer.events(), ["connected", "disconnected"]);
        assert!(output.inner.lock().sources.is_empty());
    }
}
