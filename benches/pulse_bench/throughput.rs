//! Throughput: calls per second with many caller threads, pipelined calls from
//! one thread, and one-way sends, against the raw baseline of the same shape.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
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
/// Each row's measuring time, split into [`ROUNDS`] windows.
pub const WINDOW: Duration = Duration::from_secs(5);
/// Every row is measured this many times, one window each, the rounds
/// interleaved: round 1 of every row, then round 2 of every row, and so on.
/// A row's figure is the median of its rounds. Why: the machine's speed
/// drifts over the minutes the section takes (raw 16 threads
/// did 276 k calls/s in one run and 208 k in the next, minutes apart), and
/// measured one after the other, a pulse row and its raw baseline could
/// land on different sides of a drift. Interleaved, each round of a pulse
/// row sits between rounds of its baseline. Why five: a round's rate can
/// swing by a factor of two with where the scheduler puts the busy threads
/// (one 64-deep pool pipeline did 613 k, 1,174 k and 854 k calls/s in the
/// three rounds of run 56), and the median of three then rests on one
/// round; of five, on two of them either way.
pub const ROUNDS: usize = 5;
/// Each round's window is also read in this many slices, to show how steady
/// the rate was (a burst of load from another process shows as a low slice).
const SLICES_PER_ROUND: u32 = 2;

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
    /// Seconds measured, all rounds together.
    pub window_s: f64,
    /// Calls counted, all rounds together.
    pub ops: u64,
    /// Errors in the windows, all rounds together.
    pub errors: u64,
    /// Errors in the warm-ups before the windows, all rounds together.
    #[serde(default)]
    pub warmup_errors: u64,
    /// The first error of any round, labelled with where it happened (in
    /// the warm-up, in the window or after it).
    pub first_error: Option<String>,
    /// Calls completed (or one-way sends accepted) per second: the median
    /// of the [`ROUNDS`] rounds' rates, the figure compared and checked
    /// against targets.
    pub ops_per_s: f64,
    /// Each round's rate, in the order measured.
    #[serde(default)]
    pub round_ops_per_s: Vec<f64>,
    /// The rate per slice of the rounds' windows: lowest, median, highest.
    #[serde(default)]
    pub slice_ops_per_s: [f64; 3],
    /// One-way only: calls the provider handled per second, the median of
    /// the rounds' rates (each round: handled in its window ÷ the window),
    /// like `ops_per_s`.
    pub handled_per_s: Option<f64>,
    /// One-way only: each round's handled rate, in the order measured.
    #[serde(default)]
    pub round_handled_per_s: Vec<f64>,
    /// One-way only: sends accepted in all rounds, warm-ups and the ends
    /// after the windows included, and how many of them the provider never
    /// handled (counted once it had drained each round).
    #[serde(default)]
    pub sent_and_lost: Option<(u64, u64)>,
    /// Process CPU (client and server threads) per op.
    pub cpu_us_per_op: f64,
    /// The raw row this one is compared with.
    pub baseline: Option<String>,
    pub ratio: Option<f64>,
}

/// Where [`measure`] is when a caller thread meets an error, for the first
/// error's label.
const PHASE_WARMUP: u8 = 0;
const PHASE_WINDOW: u8 = 1;
const PHASE_AFTER: u8 = 2;

/// A per-thread counter on its own cache line.
#[repr(align(128))]
#[derive(Default)]
struct Counter(AtomicU64);

type Op = Box<dyn FnMut() -> Result<(), String> + Send>;

struct Measured {
    ops: u64,
    /// Errors in the window.
    errors: u64,
    /// Errors in the warm-up before the window.
    warmup_errors: u64,
    first_error: Option<String>,
    secs: f64,
    cpu: Duration,
    handled: Option<u64>,
    /// Calls per second in each slice of the window.
    slices: Vec<f64>,
    /// Ops completed from the threads' start to their stop (warm-up and
    /// window together) and the handled counter before they started: what
    /// a one-way row's losses are counted from.
    sent: u64,
    handled_before: Option<u64>,
    /// One-way rows, set after the receiver drained: sends never handled.
    lost: Option<u64>,
}

/// Runs each op in a loop on its own thread; counts completions in a window
/// that starts after a warm-up.
fn measure(ops: Vec<Op>, window: Duration, handled: Option<&AtomicU64>) -> Measured {
    let stop = Arc::new(AtomicBool::new(false));
    let counters: Arc<Vec<Counter>> =
        Arc::new((0..ops.len()).map(|_| Counter::default()).collect());
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(Mutex::new(None::<String>));
    let phase = Arc::new(AtomicU8::new(PHASE_WARMUP));
    let handled_before = handled.map(|h| h.load(Ordering::Relaxed));
    let threads: Vec<_> = ops
        .into_iter()
        .enumerate()
        .map(|(i, mut op)| {
            let (stop, counters, errors, first_error, phase) = (
                stop.clone(),
                counters.clone(),
                errors.clone(),
                first_error.clone(),
                phase.clone(),
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
                                first_error.lock().get_or_insert_with(|| {
                                    let when = match phase.load(Ordering::Relaxed) {
                                        PHASE_WARMUP => "in the warm-up",
                                        PHASE_WINDOW => "in the window",
                                        _ => "after the window",
                                    };
                                    format!("{e} ({when})")
                                });
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
    phase.store(PHASE_WINDOW, Ordering::Relaxed);
    // Exactly SLICES_PER_ROUND slices: the k-th reading at t0 + k × slice,
    // the last one at the window's end, which is also the window's reading.
    let mut slices = Vec::new();
    let (mut slice_ops, mut slice_t) = (ops0, t0);
    let slice = window / SLICES_PER_ROUND;
    for k in 1..=SLICES_PER_ROUND {
        let end = if k == SLICES_PER_ROUND {
            window
        } else {
            slice * k
        };
        std::thread::sleep((t0 + end).saturating_duration_since(Instant::now()));
        let (ops, now) = (total(&counters), Instant::now());
        slices.push((ops - slice_ops) as f64 / (now - slice_t).as_secs_f64());
        (slice_ops, slice_t) = (ops, now);
    }
    let (ops1, err1, secs, cpu1) = (
        slice_ops,
        errors.load(Ordering::Relaxed),
        (slice_t - t0).as_secs_f64(),
        common::process_cpu(),
    );
    let handled1 = handled.map(|h| h.load(Ordering::Relaxed));
    phase.store(PHASE_AFTER, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let sent = total(&counters);
    let first_error = first_error.lock().take();
    Measured {
        ops: ops1 - ops0,
        errors: err1 - err0,
        warmup_errors: err0,
        first_error,
        secs,
        cpu: cpu1.saturating_sub(cpu0),
        handled: handled0.zip(handled1).map(|(a, b)| b - a),
        slices,
        sent,
        handled_before,
        lost: None,
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

/// What a row measures: its labels, how to make its ops afresh for each
/// round, and the counter of what its provider handled (one-way rows).
struct Spec<'a> {
    /// See [`ThroughputRow`]'s fields of the same names.
    key: String,
    implementation: &'static str,
    pattern: String,
    threads: usize,
    connections: usize,
    depth: usize,
    /// Makes one op per caller thread (and connects raw clients) for a
    /// round: ops are consumed by [`measure`].
    make_ops: Box<dyn Fn() -> Result<Vec<Op>, String> + 'a>,
    /// One-way rows: what the receiver has handled so far.
    handled: Option<&'a AtomicU64>,
}

impl<'a> Spec<'a> {
    /// A spec with `(threads, connections, depth)` as the row shows them.
    fn new(
        key: &str,
        implementation: &'static str,
        pattern: &str,
        (threads, connections, depth): (usize, usize, usize),
        make_ops: impl Fn() -> Result<Vec<Op>, String> + 'a,
    ) -> Spec<'a> {
        Spec {
            key: key.into(),
            implementation,
            pattern: pattern.into(),
            threads,
            connections,
            depth,
            make_ops: Box::new(make_ops),
            handled: None,
        }
    }

    /// The same spec, reporting what `handled` counts per second.
    fn counting(mut self, handled: &'a AtomicU64) -> Spec<'a> {
        self.handled = Some(handled);
        self
    }

    /// The row of this spec's `rounds`: their median rate, and their ops,
    /// time, CPU and slices together.
    fn row(&self, rounds: Vec<Measured>) -> ThroughputRow {
        let secs: f64 = rounds.iter().map(|m| m.secs).sum();
        let ops: u64 = rounds.iter().map(|m| m.ops).sum();
        let cpu: Duration = rounds.iter().map(|m| m.cpu).sum();
        let round_rates: Vec<f64> = rounds.iter().map(|m| m.ops as f64 / m.secs).collect();
        let round_handled: Option<Vec<f64>> = rounds
            .iter()
            .map(|m| m.handled.map(|n| n as f64 / m.secs))
            .collect();
        let handled = round_handled.as_ref().map(|r| spread(r.clone())[1]);
        let sent_and_lost = rounds.iter().try_fold((0, 0), |(sent, lost), m| {
            m.lost.map(|l| (sent + m.sent, lost + l))
        });
        let [_, median, _] = spread(round_rates.clone());
        let (mut errors, mut warmup_errors) = (0, 0);
        let mut first_error = None;
        let mut slices = Vec::new();
        for m in rounds {
            errors += m.errors;
            warmup_errors += m.warmup_errors;
            first_error = first_error.or(m.first_error);
            slices.extend(m.slices);
        }
        ThroughputRow {
            key: self.key.clone(),
            implementation: self.implementation.into(),
            pattern: self.pattern.clone(),
            threads: self.threads,
            connections: self.connections,
            depth: self.depth,
            payload: PAYLOAD,
            window_s: secs,
            ops,
            errors,
            warmup_errors,
            first_error,
            ops_per_s: median,
            round_ops_per_s: round_rates,
            slice_ops_per_s: spread(slices),
            handled_per_s: handled,
            round_handled_per_s: round_handled.unwrap_or_default(),
            sent_and_lost,
            cpu_us_per_op: cpu.as_secs_f64() * 1e6 / ops.max(1) as f64,
            baseline: None,
            ratio: None,
        }
    }
}

/// Measures every row of the section, the rounds interleaved (see
/// [`ROUNDS`]), and reports each row once all its rounds are in.
pub fn run(
    settings: &Settings,
    log: &mut dyn FnMut(&ThroughputRow),
) -> Result<Vec<ThroughputRow>, String> {
    let round_window = settings.window(WINDOW) / ROUNDS as u32;
    let value = rpc::payload(PAYLOAD);
    let echo = RawServer::start(RawMode::Echo).map_err(|e| e.to_string())?;
    let sink = RawServer::start(RawMode::Sink).map_err(|e| e.to_string())?;
    let provider =
        rpc::start_provider(ServerConfig::default()).map_err(|e| format!("start provider: {e}"))?;
    let clients: Vec<Client> = (0..4)
        .map(|_| rpc::connect(&provider).map_err(|e| format!("connect: {e}")))
        .collect::<Result<_, _>>()?;
    let placed = Placed::start()?;

    let mut specs = raw_specs(echo.addr(), sink.addr(), &sink.received);
    for mode in [Mode::Pool, Mode::Inline] {
        for threads in [1, 16, 64] {
            let (client, value) = (&clients[0], &value);
            specs.push(Spec::new(
                &format!("seq-{threads}"),
                mode.label(),
                "sequential callers sharing one Client",
                (threads, 1, 1),
                move || {
                    Ok((0..threads)
                        .map(|_| call_op(client.clone(), mode, value.clone()))
                        .collect())
                },
            ));
        }
    }
    for mode in [Mode::Pool, Mode::Inline] {
        let (clients, value) = (&clients, &value);
        specs.push(Spec::new(
            "seq-64",
            mode.label(),
            "sequential callers over 4 Clients",
            (64, 4, 1),
            move || {
                Ok((0..64)
                    .map(|i| call_op(clients[i % 4].clone(), mode, value.clone()))
                    .collect())
            },
        ));
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
        specs.extend(shape.specs(&clients[0], &value));
    }
    if let Some(placed) = &placed {
        specs.extend(placed.specs(&value));
    }
    for mode in [Mode::Pool, Mode::Inline] {
        let (client, value) = (&clients[0], &value);
        let spec = Spec::new(
            "oneway",
            mode.label(),
            "one thread, one-way sends",
            (1, 1, 0),
            move || {
                let (client, value) = (client.clone(), value.clone());
                let op: Op = Box::new(move || {
                    client
                        .send_one_way(SERVICE, mode.sink(), &value)
                        .map_err(|e| e.to_string())
                });
                Ok(vec![op])
            },
        );
        specs.push(spec.counting(&provider.sunk));
    }
    specs.retain(|spec| settings.wants_row(&spec.key));

    let mut rounds: Vec<Vec<Measured>> = specs.iter().map(|_| Vec::new()).collect();
    for round in 1..=ROUNDS {
        eprintln!(
            "  throughput round {round} of {ROUNDS} ({} rows)",
            specs.len()
        );
        for (spec, measured) in specs.iter().zip(&mut rounds) {
            let mut m = measure((spec.make_ops)()?, round_window, spec.handled);
            if let (Some(counter), Some(before)) = (spec.handled, m.handled_before) {
                // Let the receiver drain before the next measurement; what
                // it has not handled by then was lost.
                wait_until_still(counter);
                let handled = counter.load(Ordering::Relaxed).saturating_sub(before);
                m.lost = Some(m.sent.saturating_sub(handled));
            }
            measured.push(m);
        }
    }
    let rows: Vec<ThroughputRow> = specs
        .iter()
        .zip(rounds)
        .map(|(spec, measured)| spec.row(measured))
        .collect();
    for r in &rows {
        log(r);
    }
    drop(specs);
    drop(clients);
    drop(placed);
    drop(provider);
    Ok(rows)
}

/// The raw baselines: thread-per-connection request/response with 1, 16
/// and 64 threads, one thread pipelining, and one-way sends to `sink`.
fn raw_specs<'a>(
    echo: std::net::SocketAddr,
    sink: std::net::SocketAddr,
    received: &'a AtomicU64,
) -> Vec<Spec<'a>> {
    let mut specs = Vec::new();
    for threads in [1, 16, 64] {
        specs.push(Spec::new(
            &format!("seq-{threads}"),
            "raw",
            "sequential callers, one connection each",
            (threads, threads, 1),
            move || {
                raw_ops(echo, threads, |mut c| {
                    Box::new(move || c.call().map_err(|e| e.to_string()))
                })
            },
        ));
    }
    specs.push(Spec::new(
        "pipelined",
        "raw",
        "one thread, 64 outstanding (window refilled in one write)",
        (1, 1, PIPELINE_DEPTH),
        move || {
            raw_ops(echo, 1, |mut c| {
                let mut outstanding = 0usize;
                Box::new(move || {
                    // Batched like pulse's writes: once every reply read so
                    // far is consumed, top the window up to 64 with one
                    // `write`, then wait for the oldest reply.
                    if outstanding < PIPELINE_DEPTH && !c.reply_buffered() {
                        c.send_many(PIPELINE_DEPTH - outstanding)
                            .map_err(|e| e.to_string())?;
                        outstanding = PIPELINE_DEPTH;
                    }
                    c.recv().map_err(|e| e.to_string())?;
                    outstanding -= 1;
                    Ok(())
                })
            })
        },
    ));
    let oneway = Spec::new(
        "oneway",
        "raw",
        "one thread, one-way sends (64 per write)",
        (1, 1, 0),
        move || {
            raw_ops(sink, 1, |mut c| {
                Box::new(move || c.send_buffered().map_err(|e| e.to_string()))
            })
        },
    );
    specs.push(oneway.counting(received));
    specs
}

/// Waits (up to 10 s) until `counter` stops moving: the receiver of one-way
/// sends has drained what was sent, so it does not load the next row.
fn wait_until_still(counter: &AtomicU64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = counter.load(Ordering::Relaxed);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        let now = counter.load(Ordering::Relaxed);
        if now == last {
            break;
        }
        last = now;
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

/// A provider and a client of their own for the 64-deep pipelines (`start`
/// and `start_deferred`) with the loops placed by
/// `ConnectionConfig::loop_cpus` (opt-in): the client's loop on CPU 0, the
/// provider's loops on the last CPU, the caller and the workers left to the
/// kernel. Why: with four busy threads on two cores, which of them share a
/// core sets the rate (see docs/BENCHMARKS.md, "where the time goes").
struct Placed {
    /// Declared before `_provider`: dropped (disconnected) first.
    client: Client,
    /// Kept running for `client`.
    _provider: rpc::Provider,
    /// The provider's CPU, for the rows' descriptions.
    provider_cpu: usize,
}

impl Placed {
    /// `None` on one CPU, where there is nothing to place.
    fn start() -> Result<Option<Placed>, String> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        if cpus < 2 {
            return Ok(None);
        }
        let mut server_config = ServerConfig::default();
        server_config.connection.loop_cpus = vec![cpus - 1];
        let provider =
            rpc::start_provider(server_config).map_err(|e| format!("start provider: {e}"))?;
        let mut client_config = pulse::ClientConfig::default();
        client_config.connection.loop_cpus = vec![0];
        let client =
            rpc::connect_with(&provider, client_config).map_err(|e| format!("connect: {e}"))?;
        Ok(Some(Placed {
            client,
            _provider: provider,
            provider_cpu: cpus - 1,
        }))
    }

    /// The pool and inline rows of both placed pipelines.
    fn specs<'a>(&'a self, value: &'a Value) -> Vec<Spec<'a>> {
        [
            ("pipelined-placed", "start", false),
            ("pipelined-deferred-placed", "start_deferred", true),
        ]
        .into_iter()
        .flat_map(|(key, how, deferred)| {
            let pattern = format!(
                "one thread, 64 outstanding ({how}), loops placed: client CPU 0, provider CPU {}",
                self.provider_cpu
            );
            let shape = Pipeline {
                key,
                pattern: &pattern,
                depth: PIPELINE_DEPTH,
                deferred,
            };
            shape.specs(&self.client, value)
        })
        .collect()
    }
}

/// One pipelined shape, measured with pool and with inline handlers.
struct Pipeline<'a> {
    key: &'a str,
    pattern: &'a str,
    /// Calls kept outstanding.
    depth: usize,
    /// `start_deferred` instead of `start`.
    deferred: bool,
}

impl Pipeline<'_> {
    /// One spec per handler mode, one caller thread on `client` each.
    fn specs<'a>(&self, client: &'a Client, value: &'a Value) -> Vec<Spec<'a>> {
        let (depth, deferred) = (self.depth, self.deferred);
        [Mode::Pool, Mode::Inline]
            .into_iter()
            .map(|mode| {
                Spec::new(
                    self.key,
                    mode.label(),
                    self.pattern,
                    (1, 1, depth),
                    move || {
                        let op = pipelined_op(client.clone(), mode, value.clone(), depth, deferred);
                        Ok(vec![op])
                    },
                )
            })
            .collect()
    }
}

/// Sets `baseline` and `ratio` of every pulse row: the raw row with the same
/// key (for `seq-64` over 4 Clients: raw with 64 connections). One-way
/// rows compare what the receivers handled per second, not what the
/// senders got accepted: a provider that drops calls must not look faster.
pub fn add_ratios(rows: &mut [ThroughputRow]) {
    let rate = |r: &ThroughputRow| r.handled_per_s.unwrap_or(r.ops_per_s);
    let raw: Vec<(String, f64)> = rows
        .iter()
        .filter(|r| r.implementation == "raw")
        .map(|r| (r.key.clone(), rate(r)))
        .collect();
    for r in rows.iter_mut().filter(|r| r.implementation != "raw") {
        if let Some((key, base)) = raw.iter().find(|(k, _)| *k == r.key) {
            let handled = if r.handled_per_s.is_some() {
                ", handled/s"
            } else {
                ""
            };
            r.baseline = Some(format!("raw {key}{handled}"));
            r.ratio = common::ratio(rate(r), *base);
        }
    }
}
