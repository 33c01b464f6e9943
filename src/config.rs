//! Configuration of clients and servers, with documented defaults.
//!
//! Every bound pulse enforces has a name, a default and a doc line here. Build a
//! config from `Default` and change the fields you care about; `validate` is
//! called by `Client::connect` and `ServerBuilder::bind`.

use std::time::Duration;

pub use crate::liveness::{BackoffConfig, HeartbeatConfig, HeartbeatMode};
use crate::protocol::DEFAULT_MAX_FRAME_LEN;

/// Default resolution of the timer wheel: deadlines are rounded up to a
/// multiple of it, so detection can be late by at most one tick, never early.
pub const DEFAULT_TIMER_TICK: Duration = Duration::from_millis(5);

/// Settings shared by both sides of a connection.
#[derive(Debug, Clone)]
pub struct ConnectionConfig {
    /// Heartbeat interval, miss limit and mode (defaults: 1 s, 3, fixed).
    pub heartbeat: HeartbeatConfig,
    /// Largest frame body this side accepts; larger frames close the
    /// connection with Close(ProtocolError). Default 16 MiB.
    ///
    /// It is also the largest body this side sends, since a peer with the
    /// same limit would close the connection (and fail every call on it):
    /// a larger request fails alone with `Error::Codec` before it is sent,
    /// and a provider answers a larger result with HandlerError. Give both
    /// sides the same value.
    pub max_frame_len: u32,
    /// Memory that frames queued for writing on one connection may hold
    /// before new requests or responses are refused as overloaded (a
    /// one-way call waits for room instead, up to its call timeout).
    /// Default 64 MiB (room for several maximum-size frames).
    ///
    /// A queued frame counts what it holds, not its length: its buffer's
    /// capacity (128 bytes or more for a small request or response) plus
    /// 40 bytes of bookkeeping (its queue slot and its heap block's
    /// header): a 21-byte response counts 168 bytes or more. An empty
    /// queue still takes one frame whose length is within this bound, so
    /// it must be at least `max_frame_len` plus a 20-byte header.
    pub max_write_queue_bytes: usize,
    /// Resolution of the timer wheel. Default 5 ms.
    pub timer_tick: Duration,
    /// Capacity of the event channel returned by `events()`; events past it
    /// are dropped (and logged at debug level) rather than blocking a loop.
    /// Default 1,024, at most [`MAX_EVENT_CAPACITY`].
    pub event_capacity: usize,
    /// A frame whose first byte arrived must be complete within this time, or
    /// the connection is closed (Close(ProtocolError), reason
    /// `frame_timeout`): the defence against slowloris peers. Bytes still
    /// arriving keep the heartbeat happy, so this is the bound on a frame that
    /// trickles. Default 30 s; `None` disables it.
    pub frame_timeout: Option<Duration>,
    /// Pings from the peer closer together than this are strikes; more than
    /// `max_ping_strikes` strikes in a row close the connection with
    /// Close(TooManyPings). Default 10 ms, far below any sane heartbeat
    /// interval (the default is 1 s), like gRPC's keepalive enforcement. A
    /// side that pings must have a heartbeat interval of at least twice
    /// this (`validate`), so that its own pings, a tick late or early, are
    /// never strikes to a peer with the same settings. `Duration::ZERO`
    /// turns the check off: no ping is then too early.
    pub min_ping_interval: Duration,
    /// Consecutive too-early pings tolerated (reads that bring one, pings in
    /// one read counting once). Default 3; 0 closes the connection at the
    /// first too-early ping.
    pub max_ping_strikes: u32,
    /// How long an event loop keeps polling without sleeping after a turn
    /// that moved calls (read a request or a response). A loop that sleeps
    /// costs the next call a wake-up (tens of microseconds across cores);
    /// one that polls on picks it up at once. Between polls the loop yields
    /// its core to any other thread that can run. On a single core (the
    /// process's CPU affinity or quota) loops never poll on: nothing else
    /// runs while they do, and a spinning caller saves the wake-up there
    /// instead (see `ClientConfig::spin_wait`). Turns that only carried
    /// heartbeats or timers never poll on, so idle connections cost nothing
    /// extra. Each busy loop may use up to this much CPU after its last call.
    /// `Duration::ZERO` always sleeps. Default 100 µs.
    pub busy_poll: Duration,
    /// CPUs to pin the event loops to (Linux only): loop `i` may run only on
    /// CPU `loop_cpus[i % len]`. Empty (the default) pins nothing and lets
    /// the kernel place the loops.
    ///
    /// Pinning pays where the same threads keep handing work to each other
    /// at a high rate, as when one thread pipelines calls: the kernel
    /// spreads busy threads over the cores without knowing which of them
    /// talk. With the client's loop on one core and the provider's on the
    /// other, 64 calls in flight from one thread with pool handlers did
    /// 1.07–1.24 M calls/s on two cores (`start`, five runs) against
    /// 0.81–1.12 M with the kernel's placement (no gain with many callers;
    /// the placed rows of docs/BENCHMARKS.md). A pinned loop cannot move
    /// away from a core that other work keeps busy, so it is not the
    /// default.
    ///
    /// A CPU that does not exist or is outside the process's cpuset
    /// (cgroup) makes `Client::connect` / `ServerBuilder::bind` fail; an
    /// affinity mask set with `taskset` does not, since a thread may set
    /// its own mask to any CPU of its cpuset.
    pub loop_cpus: Vec<usize>,
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        ConnectionConfig {
            heartbeat: HeartbeatConfig::default(),
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
            max_write_queue_bytes: 64 * 1024 * 1024,
            timer_tick: DEFAULT_TIMER_TICK,
            event_capacity: 1024,
            frame_timeout: Some(Duration::from_secs(30)),
            min_ping_interval: Duration::from_millis(10),
            max_ping_strikes: 3,
            busy_poll: Duration::from_micros(100),
            loop_cpus: Vec::new(),
        }
    }
}

impl ConnectionConfig {
    /// Checks every field; the error names the field and the allowed range.
    pub fn validate(&self) -> Result<(), String> {
        self.heartbeat
            .validate()
            .map_err(|e| format!("heartbeat: {e}"))?;
        if self.max_frame_len < 64 {
            return Err(format!(
                "max_frame_len must be at least 64 bytes, got {}",
                self.max_frame_len
            ));
        }
        // A whole frame is its header and a body of up to `max_frame_len`.
        let largest_frame = self.max_frame_len as usize + crate::protocol::HEADER_LEN;
        if self.max_write_queue_bytes < largest_frame {
            return Err(format!(
                "max_write_queue_bytes must be at least max_frame_len + {} (a header), {largest_frame}, got {}",
                crate::protocol::HEADER_LEN,
                self.max_write_queue_bytes
            ));
        }
        if self.timer_tick < Duration::from_millis(1) {
            return Err("timer_tick must be at least 1 ms".into());
        }
        if self.timer_tick.saturating_mul(2) > self.heartbeat.interval {
            return Err(format!(
                "timer_tick ({:?}) must be at most half the heartbeat interval ({:?})",
                self.timer_tick, self.heartbeat.interval
            ));
        }
        // A peer with these settings takes pings closer together than
        // `min_ping_interval` for abuse. Pings come closer than the interval
        // when one leaves a tick late and the next on time, and scheduling
        // adds jitter: at a 10 ms interval against the default 10 ms
        // minimum, a healthy connection was closed with TooManyPings about
        // every 2 s. Twice the minimum leaves room for both.
        if self.heartbeat.send_pings
            && self.heartbeat.interval < self.min_ping_interval.saturating_mul(2)
        {
            return Err(format!(
                "the heartbeat interval ({:?}) must be at least twice min_ping_interval ({:?}): \
                 a peer with these settings would take pings that come a little early for a ping flood",
                self.heartbeat.interval, self.min_ping_interval
            ));
        }
        if !(1..=MAX_EVENT_CAPACITY).contains(&self.event_capacity) {
            return Err(format!(
                "event_capacity must be 1 to {MAX_EVENT_CAPACITY} (the channel takes its memory up front), got {}",
                self.event_capacity
            ));
        }
        if self.busy_poll > Duration::from_secs(1) {
            return Err(format!(
                "busy_poll must be at most 1 s (it is CPU spent after each busy turn), got {:?}",
                self.busy_poll
            ));
        }
        if !self.loop_cpus.is_empty() && !cfg!(target_os = "linux") {
            return Err("loop_cpus is supported on Linux only; leave it empty".into());
        }
        if let Some(cpu) = self.loop_cpus.iter().find(|&&cpu| cpu >= MAX_CPU) {
            return Err(format!(
                "loop_cpus holds CPU {cpu}; CPUs are numbered below {MAX_CPU}"
            ));
        }
        if self.frame_timeout.is_some_and(|t| t < self.timer_tick) {
            return Err("frame_timeout must be at least one timer_tick".into());
        }
        // A deadline fires up to a tick late as a matter of course: at or
        // below the tick, every firing would look like this side's own
        // stall, and the heartbeat would excuse a silent peer's misses.
        if let Some(threshold) = self.heartbeat.stall_threshold
            && threshold <= self.timer_tick
        {
            return Err(format!(
                "heartbeat.stall_threshold ({threshold:?}) must exceed timer_tick ({:?}): \
                 a deadline fires up to a tick late without any stall",
                self.timer_tick
            ));
        }
        let heartbeat = &self.heartbeat;
        check_durations([
            ("timer_tick", Some(self.timer_tick)),
            ("frame_timeout", self.frame_timeout),
            ("min_ping_interval", Some(self.min_ping_interval)),
            ("heartbeat.interval", Some(heartbeat.interval)),
            ("heartbeat.stall_threshold", heartbeat.stall_threshold),
            ("heartbeat.miss_grace", Some(heartbeat.miss_grace)),
        ])
    }
}

/// The largest `ConnectionConfig::event_capacity`: the event channel
/// allocates every slot when it is made (80 bytes each on 64-bit Linux), so
/// this is 80 MiB, far more than a reader that keeps up needs.
pub const MAX_EVENT_CAPACITY: usize = 1 << 20;

/// The most `ServerConfig::worker_threads`: all are started by `bind`, each
/// with its own stack, and far more than a blocking service needs (Dubbo's
/// and Tomcat's pools default to 200). Without a bound, a mistyped count
/// ended the process (a thread failed to set up its stack guard and Rust
/// aborted) instead of failing `bind`.
pub const MAX_WORKER_THREADS: usize = 4096;

/// CPUs are numbered below this in `ConnectionConfig::loop_cpus` (the size
/// of Linux's `cpu_set_t`).
pub const MAX_CPU: usize = 1024;

/// The longest duration any setting accepts: ten years. Deadlines are
/// computed as `now + setting`; a larger value (say `Duration::MAX` for
/// "never") would overflow that sum. Use the `Option` fields' `None` for
/// "never".
pub const MAX_SETTING_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Fails unless `event_loops` (a server's or a client's) is in 1..=1024.
pub(crate) fn check_event_loops(event_loops: usize) -> Result<(), String> {
    if event_loops == 0 || event_loops > 1024 {
        return Err(format!(
            "event_loops must be in 1..=1024, got {event_loops}"
        ));
    }
    Ok(())
}

/// Fails with a message naming the first setting longer than
/// [`MAX_SETTING_DURATION`].
fn check_durations<'a>(
    settings: impl IntoIterator<Item = (&'a str, Option<Duration>)>,
) -> Result<(), String> {
    for (name, value) in settings {
        if let Some(value) = value
            && value > MAX_SETTING_DURATION
        {
            return Err(format!(
                "{name} must be at most {} days (10 years), got {value:?}; a setting that can be off takes None for that",
                MAX_SETTING_DURATION.as_secs() / 86_400
            ));
        }
    }
    Ok(())
}

/// Configuration of a consumer ([`crate::Client`]).
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Heartbeat, frame and queue settings.
    pub connection: ConnectionConfig,
    /// Delays between reconnect attempts. Defaults: 100 ms initial, ×2, 5 s
    /// max, ±20 % jitter, unlimited attempts, 2 s probation.
    pub backoff: BackoffConfig,
    /// Timeout of `call` when none is given. Default 5 s.
    pub call_timeout: Duration,
    /// How long one TCP connect attempt may take. Default 3 s.
    pub connect_attempt_timeout: Duration,
    /// How long `Client::connect` waits for the first connection before it
    /// fails with `NotConnected`. Default 5 s.
    pub connect_timeout: Duration,
    /// Calls waiting for a response on one connection; past it a new call
    /// fails at once with `Overloaded`. Default 4,096.
    pub max_inflight: usize,
    /// How long a caller waiting for its response busy-polls before it
    /// sleeps, reading the connection's socket for the responses itself
    /// while nobody else does. A response that comes back within it costs
    /// the caller no sleep and no wake-up: on a multi-core machine that
    /// halves a short call's latency, for up to this much CPU per call. A
    /// caller spins only while at most one caller fewer than the process's
    /// cores wait for responses (one caller on a single core, where it
    /// yields the core every few spins): with more, spinners would take the
    /// cores that concurrent calls need. `Duration::ZERO` never spins (and
    /// leaves every read to the event loop).
    /// Default 100 µs.
    pub spin_wait: Duration,
    /// Event loops that clients share: every client in the process (lone
    /// or a cluster's provider) whose settings give the same loops (this,
    /// `connection.timer_tick`, `connection.busy_poll` and
    /// `connection.loop_cpus`) runs on one set of this many loops and one
    /// timer thread, each client's connection on one loop, given out in
    /// turn. A loop's thread starts when the loop gets its first client
    /// (so one client runs one loop), and the threads stop when the last
    /// such client is dropped. Default: the number of cores. 1 to 1024.
    pub event_loops: usize,
    /// How long a graceful close (the last clone dropped, or
    /// `Client::shutdown`) lets what was queued on the connection (one-way
    /// calls `send_one_way` accepted, deferred requests) and then the
    /// Close(Normal) reach the provider, and waits for the provider to
    /// close its side after reading them; the drop or `shutdown` returns
    /// when that is done or this has passed. A provider that reads nothing
    /// holds the close this long, then the connection is closed anyway and
    /// what was still queued is lost. Default 1 s (as `ServerConfig::linger`).
    ///
    /// Zero closes at once: what is queued and the Close are written as far
    /// as the socket takes them, its sending side is shut down (the provider
    /// reads to the end of the stream, no reset) and it is closed, without
    /// waiting for the provider. What the socket did not take is lost, and
    /// so is what it took but had not yet sent (a provider that is behind
    /// leaves its receive window full) if the provider sends the closed
    /// socket anything meanwhile (a Ping, a response): the reset that answers
    /// it discards that. A provider that keeps up reads it all.
    pub linger: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            connection: ConnectionConfig::default(),
            backoff: BackoffConfig::default(),
            call_timeout: Duration::from_secs(5),
            connect_attempt_timeout: Duration::from_secs(3),
            connect_timeout: Duration::from_secs(5),
            max_inflight: 4096,
            spin_wait: Duration::from_micros(100),
            event_loops: crate::reactor::usable_cores(),
            linger: Duration::from_secs(1),
        }
    }
}

impl ClientConfig {
    /// Checks every field; the error names the field and the allowed range.
    pub fn validate(&self) -> Result<(), String> {
        self.connection.validate()?;
        self.backoff
            .validate()
            .map_err(|e| format!("backoff: {e}"))?;
        if self.call_timeout.is_zero()
            || self.connect_attempt_timeout.is_zero()
            || self.connect_timeout.is_zero()
        {
            // A zero connect_timeout made `Client::connect` fail every time,
            // a microsecond in, with "still connecting".
            return Err(
                "call_timeout, connect_attempt_timeout and connect_timeout must be positive".into(),
            );
        }
        if self.max_inflight == 0 {
            return Err("max_inflight must be at least 1".into());
        }
        check_event_loops(self.event_loops)?;
        let backoff = &self.backoff;
        check_durations([
            ("call_timeout", Some(self.call_timeout)),
            (
                "connect_attempt_timeout",
                Some(self.connect_attempt_timeout),
            ),
            ("connect_timeout", Some(self.connect_timeout)),
            ("spin_wait", Some(self.spin_wait)),
            ("linger", Some(self.linger)),
            ("backoff.initial", Some(backoff.initial)),
            ("backoff.max", Some(backoff.max)),
            ("backoff.probation", Some(backoff.probation)),
        ])
    }
}

/// Where a method's handler runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HandlerMode {
    /// On the worker pool (the default): a slow or blocking handler never
    /// delays heartbeats or other connections on the same event loop.
    #[default]
    Pool,
    /// On the event loop that read the request: the lowest latency, but the
    /// handler must be short and never block, since the loop serves every
    /// connection it owns (and answers their pings) only between handlers.
    Inline,
}

/// Configuration of a provider ([`crate::Server`]).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Heartbeat, frame and queue settings.
    pub connection: ConnectionConfig,
    /// Number of event loops. Default: the number of cores.
    pub event_loops: usize,
    /// Threads of the worker pool that runs [`HandlerMode::Pool`] handlers.
    /// Default 32, so a few blocking handlers never starve the others; at
    /// most [`MAX_WORKER_THREADS`].
    pub worker_threads: usize,
    /// Requests queued for the worker pool; past it a request is answered
    /// with status Overloaded, and a one-way call (which has no answer) is
    /// queued anyway while its connection's reads wait until the workers
    /// have taken the queue below half. While any connection waits so, the
    /// queue counts as full from half on, for every connection: other
    /// consumers cannot keep it over half and hold that one for as long as
    /// their load lasts. Default 65,536.
    pub worker_queue: usize,
    /// How long a worker that found the queue empty keeps looking for the
    /// next job before it sleeps. A job that arrives meanwhile is taken at
    /// once, with no futex wake-up and no switch to a sleeping worker: on
    /// two cores, 64 callers sharing a Client did about 25 % more pool
    /// calls and a sequential caller's p99 halved, while one thread
    /// pipelining pool calls with `Client::start` lost about 12 %
    /// (docs/BENCHMARKS-HISTORY.md, sessions 10 and 11). On a later
    /// two-core host pipelines need it most: `make bench`'s throughput
    /// section with `Duration::ZERO` did 296–375 k pool `start` calls/s
    /// against 897–910 k at the default, and 16 callers 0.79–0.92× raw
    /// against 1.11–1.12× (two runs each, session 27); 200 µs did no
    /// better than 50 (one run).
    /// At most one worker spins at a time, yielding its core between looks,
    /// and never on a single core (the process's CPU affinity or quota),
    /// where it would only take turns with the threads bringing it work.
    /// Each burst of jobs may cost up to this much CPU after its last job.
    /// `Duration::ZERO` always sleeps. Default 50 µs.
    pub worker_spin: Duration,
    /// How long a queued job waits for a busy worker to come back for it
    /// before sleeping workers are woken to take it. A worker running a job
    /// usually comes back within microseconds, and a burst of short jobs
    /// then runs on the workers already awake instead of waking one worker
    /// per job: one thread keeping 64 pool calls in flight did 740–868 k
    /// calls/s against 597–680 k on two cores (`make bench`,
    /// docs/BENCHMARKS-HISTORY.md, session 21). A job
    /// queued behind a handler that blocks starts this much later, or up to
    /// a millisecond more when the event loops sleep (they check the queue
    /// as they poll and before they sleep; their sleep is timed in whole
    /// milliseconds); then as many sleeping workers are woken as are busy,
    /// so a burst of blocking jobs spreads over the pool within a few such
    /// rounds. `Duration::ZERO` wakes a worker for every job at once (one
    /// wake-up in flight), as does a process confined to a single core.
    /// Default 100 µs; at most 1 s.
    pub worker_wake_delay: Duration,
    /// Requests of one connection being handled at once; past it a request is
    /// answered with status Overloaded, and a one-way call (which has no
    /// answer) waits: the provider leaves it and everything after it unread
    /// until half of the running ones have finished, so TCP's flow control
    /// slows the consumer down. Default 4,096.
    pub max_inflight: usize,
    /// Open consumer connections; a connection past it gets Close(Overloaded)
    /// and is closed. Default 10,000.
    pub max_connections: usize,
    /// How long a closing connection waits to write what it has queued
    /// (responses, its final Close) to its peer, at a shutdown too (once
    /// its running handlers are done, or `shutdown_timeout` has passed).
    /// Also bounds the `max_age` drain. Zero: what the socket takes at once, then the
    /// connection is closed. Default 1 s.
    pub linger: Duration,
    /// Close a connection that carried no call (request, response or
    /// one-way) for this long and has none running, with Close(IdleTimeout).
    /// Pings do not count. A pulse consumer reconnects at once (no backoff
    /// delay, and the closed connection does not count against its backoff's
    /// probation). Default `None` (never).
    pub max_idle: Option<Duration>,
    /// Close a connection this long after it was accepted, gracefully: new
    /// requests are answered ShuttingDown (a pulse `Client::call` sends them
    /// again on its next connection), new one-way calls are handled (nothing
    /// could tell their consumer to send them again), running ones finish (for up to
    /// `linger`), then Close(Normal), sent as soon as the last running
    /// call's response is queued (or, at `linger` with calls still running,
    /// Close(Abandoned): their answers will not come, and their consumer
    /// fails them with `ConnectionLost`) — the consumer reconnects at once (no
    /// backoff delay; however short, the connection does not count against its
    /// backoff's probation). Spreads load after providers are added. Default
    /// `None` (never).
    pub max_age: Option<Duration>,
    /// How long `Server::shutdown` (and dropping the server) waits for the
    /// handlers running when it was called. Every connection drains from
    /// the start of the shutdown (an idle one gets Close(Normal) at once, a
    /// busy one once its last running call is answered); at this bound the
    /// connections still open get Close(Abandoned) without the answers still
    /// due (their consumer fails those calls with `ConnectionLost`: they
    /// may have run), worker threads still in a handler are left to finish on their
    /// own (logged at error), and `shutdown` returns. `None`: wait however
    /// long the handlers take. Default 10 s (Dubbo's `shutdown.wait`):
    /// twice a pulse consumer's default `call_timeout` (5 s), so no call a
    /// consumer with the defaults still waits for is cut off, and well
    /// within the usual grace of a process supervisor (Kubernetes: 30 s)
    /// before it kills the process. An event loop blocked in an inline
    /// handler is waited for a little longer (`shutdown` returns within
    /// about this bound plus `linger` plus 1.35 s), then left to close its
    /// connections and exit once its handler returns (logged at error).
    pub shutdown_timeout: Option<Duration>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            connection: ConnectionConfig::default(),
            event_loops: crate::reactor::usable_cores(),
            worker_threads: 32,
            worker_queue: 65_536,
            worker_spin: Duration::from_micros(50),
            worker_wake_delay: Duration::from_micros(100),
            max_inflight: 4096,
            max_connections: 10_000,
            linger: Duration::from_secs(1),
            max_idle: None,
            max_age: None,
            shutdown_timeout: Some(Duration::from_secs(10)),
        }
    }
}

impl ServerConfig {
    /// Checks every field; the error names the field and the allowed range.
    pub fn validate(&self) -> Result<(), String> {
        self.connection.validate()?;
        check_event_loops(self.event_loops)?;
        if self.worker_threads == 0 || self.worker_queue == 0 {
            return Err("worker_threads and worker_queue must be at least 1".into());
        }
        if self.worker_threads > MAX_WORKER_THREADS {
            return Err(format!(
                "worker_threads must be at most {MAX_WORKER_THREADS}, got {}",
                self.worker_threads
            ));
        }
        if self.worker_spin > Duration::from_secs(1) {
            return Err(format!(
                "worker_spin must be at most 1 s (it is CPU spent after each burst of jobs), got {:?}",
                self.worker_spin
            ));
        }
        if self.worker_wake_delay > Duration::from_secs(1) {
            return Err(format!(
                "worker_wake_delay must be at most 1 s (a job behind a blocking handler waits that long), got {:?}",
                self.worker_wake_delay
            ));
        }
        if self.max_inflight == 0 || self.max_connections == 0 {
            return Err("max_inflight and max_connections must be at least 1".into());
        }
        check_durations([
            ("linger", Some(self.linger)),
            ("max_idle", self.max_idle),
            ("max_age", self.max_age),
            ("shutdown_timeout", self.shutdown_timeout),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_duration_that_would_overflow_a_deadline_is_refused_by_name() {
        let mut server = ServerConfig {
            max_age: Some(Duration::MAX),
            ..ServerConfig::default()
        };
        let err = server.validate().unwrap_err();
        assert!(err.starts_with("max_age must be at most"), "{err}");
        server.max_age = Some(MAX_SETTING_DURATION);
        server.validate().unwrap();
        let mut client = ClientConfig {
            call_timeout: Duration::MAX,
            ..ClientConfig::default()
        };
        assert!(client.validate().unwrap_err().starts_with("call_timeout"));
        client.call_timeout = Duration::from_secs(1);
        client.connection.frame_timeout = Some(Duration::MAX);
        assert!(client.validate().unwrap_err().starts_with("frame_timeout"));
    }

    #[test]
    fn defaults_are_valid() {
        ClientConfig::default().validate().unwrap();
        ServerConfig::default().validate().unwrap();
    }

    #[test]
    fn tick_must_be_finer_than_the_interval() {
        let mut c = ClientConfig::default();
        c.connection.heartbeat = HeartbeatConfig {
            interval: Duration::from_millis(8),
            ..HeartbeatConfig::default()
        };
        let err = c.validate().unwrap_err();
        assert!(err.contains("timer_tick"), "{err}");
    }

    /// Pings a little early (a tick late, then on time) are strikes to a
    /// peer whose `min_ping_interval` is close to the interval: a side that
    /// pings needs an interval of twice that minimum; one that does not
    /// ping is not held to it.
    #[test]
    fn the_heartbeat_interval_must_be_twice_min_ping_interval() {
        let with = |interval_ms: u64, min_ping_ms: u64, send_pings: bool| {
            let mut c = ClientConfig::default();
            c.connection.timer_tick = Duration::from_millis(1);
            c.connection.min_ping_interval = Duration::from_millis(min_ping_ms);
            c.connection.heartbeat = HeartbeatConfig {
                interval: Duration::from_millis(interval_ms),
                send_pings,
                ..HeartbeatConfig::default()
            };
            c.validate()
        };
        let err = with(10, 10, true).unwrap_err();
        assert!(err.contains("min_ping_interval"), "{err}");
        assert!(with(19, 10, true).is_err());
        with(20, 10, true).unwrap();
        with(10, 5, true).unwrap();
        with(10, 10, false).unwrap();
    }

    #[test]
    fn zero_bounds_are_rejected() {
        let s = ServerConfig {
            event_loops: 0,
            ..ServerConfig::default()
        };
        assert!(s.validate().unwrap_err().contains("event_loops"));
        let c = ClientConfig {
            max_inflight: 0,
            ..ClientConfig::default()
        };
        assert!(c.validate().unwrap_err().contains("max_inflight"));
        let c = ClientConfig {
            event_loops: 1025,
            ..ClientConfig::default()
        };
        assert!(c.validate().unwrap_err().contains("event_loops"));
        let s = ServerConfig {
            worker_threads: MAX_WORKER_THREADS + 1,
            ..ServerConfig::default()
        };
        assert!(s.validate().unwrap_err().contains("worker_threads"));
        let c = ClientConfig {
            connect_timeout: Duration::ZERO,
            ..ClientConfig::default()
        };
        assert!(c.validate().unwrap_err().contains("connect_timeout"));
    }

    #[test]
    fn loop_cpus_are_checked() {
        let mut c = ClientConfig::default();
        c.connection.loop_cpus = vec![0, MAX_CPU];
        let error = c.validate().unwrap_err();
        assert!(
            error.contains("loop_cpus") && error.contains("1024"),
            "{error}"
        );
        c.connection.loop_cpus = vec![0, MAX_CPU - 1];
        assert_eq!(c.validate().is_ok(), cfg!(target_os = "linux"));
    }

    #[test]
    fn worker_spin_is_bounded() {
        let mut c = ServerConfig {
            worker_spin: Duration::from_secs(2),
            ..ServerConfig::default()
        };
        assert!(c.validate().unwrap_err().contains("worker_spin"));
        c.worker_spin = Duration::ZERO;
        assert!(c.validate().is_ok());
    }

    #[test]
    fn worker_wake_delay_is_bounded() {
        let mut c = ServerConfig {
            worker_wake_delay: Duration::from_secs(2),
            ..ServerConfig::default()
        };
        assert!(c.validate().unwrap_err().contains("worker_wake_delay"));
        c.worker_wake_delay = Duration::ZERO;
        assert!(c.validate().is_ok());
    }

    #[test]
    fn a_stall_threshold_must_exceed_the_timer_tick() {
        let mut c = ConnectionConfig::default();
        c.heartbeat.stall_threshold = Some(c.timer_tick);
        assert!(c.validate().unwrap_err().contains("stall_threshold"));
        c.heartbeat.stall_threshold = Some(c.timer_tick + Duration::from_millis(1));
        c.validate().unwrap();
    }

    #[test]
    fn busy_poll_is_bounded() {
        let mut c = ClientConfig::default();
        c.connection.busy_poll = Duration::from_secs(2);
        assert!(c.validate().unwrap_err().contains("busy_poll"));
        c.connection.busy_poll = Duration::ZERO;
        c.validate().unwrap();
    }

    #[test]
    fn the_write_queue_holds_at_least_one_largest_frame() {
        let mut c = ConnectionConfig {
            max_frame_len: 1 << 20,
            max_write_queue_bytes: 1 << 20,
            ..ConnectionConfig::default()
        };
        assert!(c.validate().unwrap_err().contains("max_write_queue_bytes"));
        c.max_write_queue_bytes = (1 << 20) + crate::protocol::HEADER_LEN;
        c.validate().unwrap();
    }

    #[test]
    fn a_huge_timer_tick_is_refused_not_a_panic() {
        let mut c = ClientConfig::default();
        c.connection.timer_tick = Duration::MAX;
        assert!(c.validate().unwrap_err().contains("timer_tick"));
    }

    #[test]
    fn event_capacity_is_bounded_both_ways() {
        let mut c = ServerConfig::default();
        for bad in [0, MAX_EVENT_CAPACITY + 1, usize::MAX] {
            c.connection.event_capacity = bad;
            assert!(
                c.validate().unwrap_err().contains("event_capacity"),
                "{bad}"
            );
        }
        c.connection.event_capacity = MAX_EVENT_CAPACITY;
        c.validate().unwrap();
    }
}
