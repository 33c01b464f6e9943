//! The pulse side: one benchmark service and its calls.
//!
//! Service `bench` (empty version and group):
//! - `echo` (worker pool, the default mode) and `echo_inline` (on the event
//!   loop) return their argument, an `rmpv::Value::Binary` payload;
//! - `sink` and `sink_inline` count one-way calls.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pulse::{Client, ClientConfig, Server, ServerConfig, ServiceBuilder};
use rmpv::Value;
use serde::{Deserialize, Serialize};

pub const SERVICE: &str = "bench";

/// Where the provider runs the handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    Pool,
    Inline,
}

impl Mode {
    pub fn echo(self) -> &'static str {
        match self {
            Mode::Pool => "echo",
            Mode::Inline => "echo_inline",
        }
    }

    pub fn sink(self) -> &'static str {
        match self {
            Mode::Pool => "sink",
            Mode::Inline => "sink_inline",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Mode::Pool => "pulse-pool",
            Mode::Inline => "pulse-inline",
        }
    }
}

pub struct Provider {
    pub server: Server,
    /// One-way calls handled.
    pub sunk: Arc<AtomicU64>,
}

pub fn start_provider(config: ServerConfig) -> pulse::Result<Provider> {
    start_provider_at("127.0.0.1:0", config)
}

/// A provider on `addr`; `PULSE_BENCH_BUSY_POLL_US`,
/// `PULSE_BENCH_WORKER_SPIN_US` and `PULSE_BENCH_WORKER_WAKE_DELAY_US`,
/// when set, override `config.connection.busy_poll`, `config.worker_spin`
/// and `config.worker_wake_delay` (for profiling).
pub fn start_provider_at(addr: &str, mut config: ServerConfig) -> pulse::Result<Provider> {
    if let Some(busy_poll) = env_micros("PULSE_BENCH_BUSY_POLL_US") {
        config.connection.busy_poll = busy_poll;
    }
    if let Some(worker_spin) = env_micros("PULSE_BENCH_WORKER_SPIN_US") {
        config.worker_spin = worker_spin;
    }
    if let Some(wake_delay) = env_micros("PULSE_BENCH_WORKER_WAKE_DELAY_US") {
        config.worker_wake_delay = wake_delay;
    }
    let sunk = Arc::new(AtomicU64::new(0));
    let (a, b) = (sunk.clone(), sunk.clone());
    let service = ServiceBuilder::new(SERVICE)
        .method("echo", |v: Value| Ok::<_, String>(v))
        .method_inline("echo_inline", |v: Value| Ok::<_, String>(v))
        .method("sink", move |_: Value| {
            a.fetch_add(1, Ordering::Relaxed);
            Ok::<_, String>(())
        })
        .method_inline("sink_inline", move |_: Value| {
            b.fetch_add(1, Ordering::Relaxed);
            Ok::<_, String>(())
        });
    let server = Server::builder()
        .config(config)
        .service(service)
        .bind(addr)?;
    Ok(Provider { server, sunk })
}

/// Microseconds from the environment variable `name`, if set (the
/// profiling knobs `PULSE_BENCH_SPIN_US` and `PULSE_BENCH_BUSY_POLL_US`).
fn env_micros(name: &str) -> Option<Duration> {
    crate::common::env_opt(name).map(Duration::from_micros)
}

/// A client of `provider` with the default config, except `spin_wait` and
/// `busy_poll` when `PULSE_BENCH_SPIN_US` / `PULSE_BENCH_BUSY_POLL_US` are
/// set (for profiling).
pub fn connect(provider: &Provider) -> pulse::Result<Client> {
    connect_with(provider, ClientConfig::default())
}

/// [`connect`] with `config` (the same environment overrides apply).
pub fn connect_with(provider: &Provider, mut config: ClientConfig) -> pulse::Result<Client> {
    if let Some(spin) = env_micros("PULSE_BENCH_SPIN_US") {
        config.spin_wait = spin;
    }
    if let Some(busy_poll) = env_micros("PULSE_BENCH_BUSY_POLL_US") {
        config.connection.busy_poll = busy_poll;
    }
    Client::connect(provider.server.local_addr(), config)
}

/// A binary payload of `len` bytes.
pub fn payload(len: usize) -> Value {
    Value::Binary(vec![0x5A; len])
}

/// One sequential echo call, checked.
pub fn echo(client: &Client, mode: Mode, payload: &Value) -> Result<(), String> {
    let reply: Value = client
        .call(SERVICE, mode.echo(), payload)
        .map_err(|e| e.to_string())?;
    check(&reply, payload)
}

pub fn check(reply: &Value, payload: &Value) -> Result<(), String> {
    match (reply, payload) {
        (Value::Binary(a), Value::Binary(b)) if a.len() == b.len() => Ok(()),
        _ => Err("the echo differs from the payload".into()),
    }
}
