//! Throughput: calls per second with many caller threads, pipelined calls from
//! one thread, and one-way sends, against the raw baseline of the same shape.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use pulse::{Client, PendingCall, ServerConfig};
use rmpv::Value;
use serde::{Deserialize, Serialize};

use crate::common::{self, Settings};
use crate::raw::{RawClient, RawMode, RawServer};
use crate::rpc::{self, Mode, SERVICE};

pub const PAYLOAD: usize = 32;
pub const PIPELINE_DEPTH: usize = 64;
const WINDOW: Duration = Duration::from_secs(3);
/// The window is also read in slices this long, to show how steady the
/// rate was (a burst of load from another process shows as a low slice).
const SLICE: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ThroughputRow {
    /// Unique key, e.g. `seq-16x1`, `pipelined-64`, `oneway`.
    pub key: String,
    /// `raw`, `pulse-pool` or `pulse-inline`.
    pub implementation: String,
    /// What the threads do.
    pub pattern: String,
    pub threads: usize,
    /// TCP connections (raw) or `Client`s (pulse).
    pub connections: usize,
    /// Calls outstanding per thread.
    pub depth: usize,
    pub payload: usize,
    pub window_s: f64,
    pub ops: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Calls completed (or one-way sends accepted) per second, over the
    /// whole window: the figure compared and checked against targets.
    pub ops_per_s: f64,
    /// The same, per [`SLICE`] of the window: lowest, median and highest.
    #[serde(default)]
    pub slice_ops_per_s: [f64; 3],
    /// One-way only: calls the provider handled per second, same window.
    pub handled_per_s: Option<f64>,
    /// Process CPU (client and server threads) per op.
    pub cpu_us_per_op: f64,
    /// The raw row this one is compared with.
    pub baseline: Option<String>,
    pub ratio: Option<f64>,
}

/// A per-thread counter on its own cache line.
#[repr(align(128))]
#[derive(Default)]
struct Counter(AtomicU64);

type Op = Box<dyn FnMut() -> Result<(), String> + Send>;

struct Measured {
    ops: u64,
    errors: u64,
    first_error: Option<String>,
    secs: f64,
    cpu: Duration,
    handled: Option<u64>,
    /// Calls per second in each slice of the window.
    slices: Vec<f64>,
}

/// Runs each op in a loop on its own thread; counts completions in a window
/// that starts after a warm-up.
fn measure(ops: Vec<Op>, window: Duration, handled: Option<&AtomicU64>) -> Measured {
    let stop = Arc::new(AtomicBool::new(false));
    let counters: Arc<Vec<Counter>> =
        Arc::new((0..ops.len()).map(|_| Counter::default()).collect());
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(Mutex::new(None::<String>));
    let threads: Vec<_> = ops
        .into_iter()
        .enumerate()
        .map(|(i, mut op)| {
            let (stop, counters, errors, first_error) = (
                stop.clone(),
                counters.clone(),
                errors.clone(),
                first_error.clone(),
            );
            std::thread::Builder::new()
                .name(format!("bench-caller-{i}"))
                .spawn(move || {
                    let mut consecutive = 0u32;
                    while !stop.load(Ordering::Relaxed) {
                        match op() {
                            Ok(()) => {
                                counters[i].0.fetch_add(1, Ordering::Relaxed);
                                consecutive = 0;
                            }
                            Err(e) => {
                                errors.fetch_add(1, Ordering::Relaxed);
                                first_error.lock().get_or_insert(e);
                                consecutive += 1;
                                if consecutive > 5 {
                                    std::thread::sleep(Duration::from_millis(10));
                                }
                            }
                        }
                    }
                })
                .expect("spawn a caller thread")
        })
        .collect();
    let total = |c: &[Counter]| c.iter().map(|c| c.0.load(Ordering::Relaxed)).sum::<u64>();
    std::thread::sleep((window / 5).max(Duration::from_millis(200)));
    let (ops0, err0, t0, cpu0) = (
        total(&counters),
        errors.load(Ordering::Relaxed),
        Instant::now(),
        common::process_cpu(),
    );
    let handled0 = handled.map(|h| h.load(Ordering::Relaxed));
    let mut slices = Vec::new();
    let (mut slice_ops, mut slice_t) = (ops0, t0);
    while t0.elapsed() + SLICE <= window {
        std::thread::sleep(SLICE);
        let (ops, now) = (total(&counters), Instant::now());
        slices.push((ops - slice_ops) as f64 / (now - slice_t).as_secs_f64());
        (slice_ops, slice_t) = (ops, now);
    }
    std::thread::sleep(window.saturating_sub(t0.elapsed()));
    let (ops1, err1, secs, cpu1) = (
        total(&counters),
        errors.load(Ordering::Relaxed),
        t0.elapsed().as_secs_f64(),
        common::process_cpu(),
    );
    let handled1 = handled.map(|h| h.load(Ordering::Relaxed));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let first_error = first_error.lock().take();
    Measured {
        ops: ops1 - ops0,
        errors: err1 - err0,
        first_error,
        secs,
        cpu: cpu1.saturating_sub(cpu0),
        handled: handled0.zip(handled1).map(|(a, b)| b - a),
        slices,
    }
}

/// Lowest, median and highest of `rates` (zeros when there are none).
fn spread(mut rates: Vec<f64>) -> [f64; 3] {
    rates.sort_by(f64::total_cmp);
    match (rates.first(), rates.get(rates.len() / 2), rates.last()) {
        (Some(&low), Some(&mid), Some(&high)) => [low, mid, high],
        _ => [0.0; 3],
    }
}

#[allow(clippy::too_many_arguments)]
fn row(
    key: &str,
    implementation: &str,
    pattern: &str,
    threads: usize,
    connections: usize,
    depth: usize,
    m: Measured,
) -> ThroughputRow {
    let per_s = |n: u64| n as f64 / m.secs;
    ThroughputRow {
        key: key.into(),
        implementation: implementation.into(),
        pattern: pattern.into(),
        threads,
        connections,
        depth,
        payload: PAYLOAD,
        window_s: m.secs,
        ops: m.ops,
        errors: m.errors,
        first_error: m.first_error,
        ops_per_s: per_s(m.ops),
        slice_ops_per_s: spread(m.slices),
        handled_per_s: m.handled.map(per_s),
        cpu_us_per_op: m.cpu.as_secs_f64() * 1e6 / m.ops.max(1) as f64,
        baseline: None,
        ratio: None,
    }
}

fn raw_ops(
    addr: std::net::SocketAddr,
    n: usize,
    make: impl Fn(RawClient) -> Op,
) -> Result<Vec<Op>, String> {
    (0..n)
        .map(|_| {
            RawClient::connect(addr, &[0x5A; PAYLOAD])
                .map(&make)
                .map_err(|e| format!("raw connect: {e}"))
        })
        .collect()
}

fn call_op(client: Client, mode: Mode, value: Value) -> Op {
    Box::new(move || rpc::echo(&client, mode, &value))
}

/// Keeps `depth` calls outstanding: starts calls (with `start_deferred`
/// when `deferred`) until `depth` are, then waits for the oldest.
fn pipelined_op(client: Client, mode: Mode, value: Value, depth: usize, deferred: bool) -> Op {
    let mut queue: VecDeque<PendingCall<Value>> = VecDeque::with_capacity(depth);
    Box::new(move || {
        while queue.len() < depth {
            let pending = if deferred {
                client.start_deferred(SERVICE, mode.echo(), &value)
            } else {
                client.start(SERVICE, mode.echo(), &value)
            }
            .map_err(|e| e.to_string())?;
            queue.push_back(pending);
        }
        let reply = queue.pop_front().map(|p| p.wait());
        match reply {
            Some(Ok(reply)) => rpc::check(&reply, &value),
            Some(Err(e)) => Err(e.to_string()),
            None => Ok(()),
        }
    })
}

pub fn run(
    settings: &Settings,
    log: &mut dyn FnMut(&ThroughputRow),
) -> Result<Vec<ThroughputRow>, String> {
    let window = settings.window(WINDOW);
    let mut rows = Vec::new();
    let mut push = |r: ThroughputRow, rows: &mut Vec<ThroughputRow>| {
        log(&r);
        rows.push(r);
    };
    let value = rpc::payload(PAYLOAD);

    // Raw baselines: thread-per-connection request/response, pipelined, one-way.
    {
        let echo = RawServer::start(RawMode::Echo).map_err(|e| e.to_string())?;
        for threads in [1, 16, 64] {
            let ops = raw_ops(echo.addr(), threads, |mut c| {
                Box::new(move || c.call().map_err(|e| e.to_string()))
            })?;
            let m = measure(ops, window, None);
            push(
                row(
                    &format!("seq-{threads}"),
                    "raw",
                    "sequential callers, one connection each",
                    threads,
                    threads,
                    1,
                    m,
                ),
                &mut rows,
            );
        }
        let ops = raw_ops(echo.addr(), 1, |mut c| {
            let mut outstanding = 0usize;
            Box::new(move || {
                while outstanding < PIPELINE_DEPTH {
                    c.send().map_err(|e| e.to_string())?;
                    outstanding += 1;
                }
                c.recv().map_err(|e| e.to_string())?;
                outstanding -= 1;
                Ok(())
            })
        })?;
        let m = measure(ops, window, None);
        push(
            row(
                "pipelined",
                "raw",
                "one thread, 64 outstanding",
                1,
                1,
                PIPELINE_DEPTH,
                m,
            ),
            &mut rows,
        );
        drop(echo);
        let sink = RawServer::start(RawMode::Sink).map_err(|e| e.to_string())?;
        let ops = raw_ops(sink.addr(), 1, |mut c| {
            Box::new(move || c.send().map_err(|e| e.to_string()))
        })?;
        let m = measure(ops, window, Some(&sink.received));
        push(
            row("oneway", "raw", "one thread, one-way sends", 1, 1, 0, m),
            &mut rows,
        );
    }

    // pulse: one provider (default config), four clients.
    let provider =
        rpc::start_provider(ServerConfig::default()).map_err(|e| format!("start provider: {e}"))?;
    let clients: Vec<Client> = (0..4)
        .map(|_| rpc::connect(&provider).map_err(|e| format!("connect: {e}")))
        .collect::<Result<_, _>>()?;
    for mode in [Mode::Pool, Mode::Inline] {
        for threads in [1, 16, 64] {
            let ops = (0..threads)
                .map(|_| call_op(clients[0].clone(), mode, value.clone()))
                .collect();
            let m = measure(ops, window, None);
            push(
                row(
                    &format!("seq-{threads}"),
                    mode.label(),
                    "sequential callers sharing one Client",
                    threads,
                    1,
                    1,
                    m,
                ),
                &mut rows,
            );
        }
    }
    for mode in [Mode::Pool, Mode::Inline] {
        let ops = (0..64)
            .map(|i| call_op(clients[i % 4].clone(), mode, value.clone()))
            .collect();
        let m = measure(ops, window, None);
        push(
            row(
                "seq-64",
                mode.label(),
                "sequential callers over 4 Clients",
                64,
                4,
                1,
                m,
            ),
            &mut rows,
        );
    }
    let pipelines = [
        Pipeline {
            key: "pipelined",
            pattern: "one thread, 64 outstanding (start, wait later)",
            depth: PIPELINE_DEPTH,
            deferred: false,
        },
        Pipeline {
            key: "pipelined-deferred",
            pattern: "one thread, 64 outstanding (start_deferred, wait later)",
            depth: PIPELINE_DEPTH,
            deferred: true,
        },
        Pipeline {
            key: "pipelined-deferred-256",
            pattern: "one thread, 256 outstanding (start_deferred, wait later)",
            depth: 256,
            deferred: true,
        },
    ];
    for shape in pipelines {
        for r in shape.rows(&clients[0], &value, window) {
            push(r, &mut rows);
        }
    }
    for r in placed_pipelines(&value, window)? {
        push(r, &mut rows);
    }
    for mode in [Mode::Pool, Mode::Inline] {
        let client = clients[0].clone();
        let v = value.clone();
        let ops: Vec<Op> = vec![Box::new(move || {
            client
                .send_one_way(SERVICE, mode.sink(), &v)
                .map_err(|e| e.to_string())
        })];
        let m = measure(ops, window, Some(&provider.sunk));
        push(
            row(
                "oneway",
                mode.label(),
                "one thread, one-way sends",
                1,
                1,
                0,
                m,
            ),
            &mut rows,
        );
        // Let the provider drain before the next measurement.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = provider.sunk.load(Ordering::Relaxed);
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            let now = provider.sunk.load(Ordering::Relaxed);
            if now == last {
                break;
            }
            last = now;
        }
    }
    drop(clients);
    drop(provider);
    Ok(rows)
}

/// The `start_deferred` pipeline again with the loops placed by
/// `ConnectionConfig::loop_cpus` (opt-in): the client's loop on CPU 0, the
/// provider's loops on the last CPU, the caller left to the kernel. Skipped
/// on one CPU.
fn placed_pipelines(value: &Value, window: Duration) -> Result<Vec<ThroughputRow>, String> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        return Ok(Vec::new());
    }
    let mut server_config = ServerConfig::default();
    server_config.connection.loop_cpus = vec![cpus - 1];
    let provider =
        rpc::start_provider(server_config).map_err(|e| format!("start provider: {e}"))?;
    let mut client_config = pulse::ClientConfig::default();
    client_config.connection.loop_cpus = vec![0];
    let client =
        rpc::connect_with(&provider, client_config).map_err(|e| format!("connect: {e}"))?;
    let pattern = format!(
        "one thread, 64 outstanding (start_deferred), loops placed: client CPU 0, provider CPU {}",
        cpus - 1
    );
    let shape = Pipeline {
        key: "pipelined-deferred-placed",
        pattern: &pattern,
        depth: PIPELINE_DEPTH,
        deferred: true,
    };
    Ok(shape.rows(&client, value, window))
}

/// One pipelined shape, measured once with pool and once with inline handlers.
struct Pipeline<'a> {
    key: &'a str,
    pattern: &'a str,
    /// Calls kept outstanding.
    depth: usize,
    /// `start_deferred` instead of `start`.
    deferred: bool,
}

impl Pipeline<'_> {
    /// One row per handler mode, one caller thread on `client` each.
    fn rows(&self, client: &Client, value: &Value, window: Duration) -> Vec<ThroughputRow> {
        [Mode::Pool, Mode::Inline]
            .into_iter()
            .map(|mode| {
                let op = pipelined_op(
                    client.clone(),
                    mode,
                    value.clone(),
                    self.depth,
                    self.deferred,
                );
                let m = measure(vec![op], window, None);
                row(self.key, mode.label(), self.pattern, 1, 1, self.depth, m)
            })
            .collect()
    }
}

/// Sets `baseline` and `ratio` of every pulse row: the raw row with the same
/// key (for `seq-64` over 4 Clients: raw with 64 connections).
pub fn add_ratios(rows: &mut [ThroughputRow]) {
    let raw: Vec<(String, f64)> = rows
        .iter()
        .filter(|r| r.implementation == "raw")
        .map(|r| (r.key.clone(), r.ops_per_s))
        .collect();
    for r in rows.iter_mut().filter(|r| r.implementation != "raw") {
        if let Some((key, base)) = raw.iter().find(|(k, _)| *k == r.key) {
            r.baseline = Some(format!("raw {key}"));
            r.ratio = common::ratio(r.ops_per_s, *base);
        }
    }
}
