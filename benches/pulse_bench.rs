//! `make bench` (`cargo bench --bench pulse_bench`): pulse against a raw
//! blocking TCP baseline measured in the same run.
//!
//! Sections, in order (select some with `PULSE_BENCH_ONLY=latency,pinned,...`):
//! `latency`, `pinned`, `throughput`, `heartbeat`, `timer`, `liveness`.
//! `PULSE_BENCH_ROWS=pipelined,pipelined-deferred,...` keeps only those
//! throughput rows (by key, raw and pulse).
//! `PULSE_BENCH_QUICK=1` divides every count by about 10 for a smoke run.
//!
//! Outputs: a table on stdout, `target/bench/report.md`,
//! `target/bench/report.json` and `target/bench/latency.svg`. A bad number
//! never fails the run; a section that cannot run is reported as an error and
//! the others still run.
//!
//! The binary re-executes itself for the parts that need their own process
//! (`PULSE_BENCH_ROLE`): `pinned` (under `taskset -c 0`), `provider` and
//! `consumers` (heartbeat cost), `probe` (a bare call loop for `strace -c` or
//! `perf stat`, see docs/BENCHMARKS.md).

#[path = "pulse_bench/common.rs"]
mod common;
#[path = "pulse_bench/heartbeat.rs"]
mod heartbeat;
#[path = "pulse_bench/latency.rs"]
mod latency;
#[path = "pulse_bench/liveness.rs"]
mod liveness;
#[path = "pulse_bench/raw.rs"]
mod raw;
#[path = "pulse_bench/report.rs"]
mod report;
#[path = "pulse_bench/rpc.rs"]
mod rpc;
#[path = "pulse_bench/throughput.rs"]
mod throughput;
#[path = "pulse_bench/timer.rs"]
mod timer;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::time::Instant;

use common::Settings;
use report::Report;

fn main() {
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("error"))
        .try_init();
    match std::env::var(common::ROLE_ENV).unwrap_or_default().as_str() {
        "pinned" => latency::pinned_child_main(),
        "provider" => heartbeat::provider_main(),
        "consumers" => heartbeat::consumers_main(),
        "probe" => latency::probe_main(),
        _ => run_all(),
    }
}

/// Runs one section, turning a panic into a reported error.
fn section<T>(report: &mut Report, name: &str, f: impl FnOnce() -> Result<T, String>) -> Option<T> {
    let started = Instant::now();
    println!("\n--- {name} ---");
    let outcome = catch_unwind(AssertUnwindSafe(f));
    let result = match outcome {
        Ok(Ok(v)) => Some(v),
        Ok(Err(e)) => {
            report.errors.push(format!("{name}: {e}"));
            None
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".into());
            report.errors.push(format!("{name}: panicked: {what}"));
            None
        }
    };
    println!("({name}: {:.1} s)", started.elapsed().as_secs_f64());
    result
}

fn run_all() {
    let started = Instant::now();
    let settings = Settings::from_env();
    let mut report = Report {
        machine: common::Machine::describe(),
        settings: Some(settings.clone()),
        method: method_notes(&settings),
        ..Report::default()
    };
    let m = &report.machine;
    println!(
        "pulse bench{}: {} × {}, {}, {}, load {}",
        if settings.quick { " (QUICK)" } else { "" },
        m.cores,
        m.cpu_model,
        m.kernel,
        m.rustc,
        m.loadavg_start
    );

    if settings.wants("latency")
        && let Some(run) = section(&mut report, "latency (unpinned)", || {
            latency::run(&settings, "unpinned", None)
        })
    {
        report.add_latency(run);
        print_latency(&report, "unpinned");
    }
    if settings.wants("pinned")
        && let Some(run) = section(&mut report, "latency (pinned to CPU 0)", || {
            latency::run_pinned(&settings)
        })
    {
        report.add_latency(run);
        print_latency(&report, "pinned-1core");
    }
    if settings.wants("throughput")
        && let Some(mut rows) = section(&mut report, "throughput", || {
            throughput::run(&settings, &mut report::print_tp)
        })
    {
        throughput::add_ratios(&mut rows);
        report.throughput = rows;
        println!("ratios:");
        for r in report.throughput.iter().filter(|r| r.ratio.is_some()) {
            report::print_tp(r);
        }
    }
    if settings.wants("heartbeat")
        && let Some(rows) = section(&mut report, "heartbeat cost", || {
            Ok(heartbeat::run(&settings))
        })
    {
        for h in &rows {
            if let Some(e) = &h.error {
                report
                    .errors
                    .push(format!("heartbeat {}: {e}", h.heartbeats));
            }
        }
        report.heartbeat = rows;
    }
    if settings.wants("timer") {
        report.timer = section(&mut report, "timer wheel", || Ok(timer::run(&settings)));
    }
    if settings.wants("liveness") {
        report.liveness = section(&mut report, "liveness", || liveness::run(&settings));
    }

    report.machine.loadavg_end = common::loadavg();
    report.duration_s = started.elapsed().as_secs_f64();
    report.check_targets();
    report.print_summary();
    write_outputs(&report);
}

fn print_latency(report: &Report, pinning: &str) {
    for r in report.latency.iter().filter(|r| r.pinning == pinning) {
        println!(
            "  {:>6} {:<12} p50 {:>8.1} µs  p99 {:>8.1}  p99.9 {:>8.1}  ({} calls, {} errors)  p50 {}",
            report::size_label(r.payload),
            r.implementation,
            r.latency.p50_us,
            r.latency.p99_us,
            r.latency.p999_us,
            r.calls,
            r.errors,
            common::fmt_ratio(r.ratio_p50)
        );
    }
}

fn write_outputs(report: &Report) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join("bench");
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("cannot create {}: {e}", dir.display());
        return;
    }
    let json =
        serde_json::to_string_pretty(report).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    for (name, text) in [
        ("report.json", json),
        ("report.md", report.markdown()),
        ("latency.svg", report.svg()),
    ] {
        let path = dir.join(name);
        match std::fs::write(&path, text) {
            Ok(()) => println!("wrote {}", path.display()),
            Err(e) => eprintln!("cannot write {}: {e}", path.display()),
        }
    }
}

fn method_notes(settings: &Settings) -> Vec<(String, String)> {
    let q = |n: u64| settings.count(n);
    let sizes = latency::SIZES
        .iter()
        .map(|(s, n)| format!("{} × {}", report::size_label(*s), q(*n)))
        .collect::<Vec<_>>()
        .join(", ");
    vec![
        (
            "raw baseline".into(),
            "blocking std::net over 127.0.0.1, 4-byte big-endian length prefix, TCP_NODELAY, one server thread per connection that echoes each frame; reads through a 256 KiB BufReader; the server buffers its echoes and flushes them with one write whenever its BufReader holds no complete next frame (with one call in flight: one write per echo); the pipelined caller refills its window of 64 with one write once it has consumed every reply it has read; the one-way sender writes 64 frames per write".into(),
        ),
        (
            "pulse".into(),
            "service `bench`, method `echo` (rmpv::Value in, same value out; the payload is a MessagePack binary), registered with `method` (worker pool, the default) and `method_inline` (on the event loop); ServerConfig and ClientConfig defaults unless stated (unpinned: event loops = cores, 32 workers, 1 s fixed heartbeats)".into(),
        ),
        (
            "latency".into(),
            format!(
                "one caller thread, sequential calls, {sizes} calls per implementation after a warm-up of 5 % (50–2,000 calls); each split in {} rounds interleaved between raw / raw-spin / pool / inline in rotating order; percentiles from hdrhistogram (ns, 3 significant digits) over all rounds; CPU per call is the whole process (client + server threads) from CLOCK_PROCESS_CPUTIME_ID; raw-spin: the raw echo with both ends on non-blocking sockets retrying reads for up to 100 µs (spin_loop between attempts; yield_now with one CPU) before one blocking read; ratios /raw compare with the blocking raw loop (issue 4's baseline, the targets), ratios /raw-spin with raw-spin",
                latency::ROUNDS
            ),
        ),
        (
            "pinned".into(),
            "the same latency measurement in a child process started with `taskset -c 0` (every thread on CPU 0), with ServerConfig.event_loops = 1".into(),
        ),
        (
            "throughput".into(),
            format!(
                "32 B payload; each thread loops on its op; every row is measured in {} rounds, interleaved (round 1 of every row, then round 2 of every row, …), each counting calls over a {:?} window after a warm-up of a fifth of it (at least 200 ms), read in 2 equal slices, the last ending with the window; errors are counted in the windows, those in the warm-ups shown apart, the first error labelled with where it happened; a row's calls/s is the median of its rounds' rates, its ratio to raw the ratio of the two medians; raw: one connection per thread; pulse: threads share one Client (or 4 Clients round-robin); pipelined: one thread keeps {} calls outstanding (Client::start, then PendingCall::wait of the oldest); one-way: one thread sending, with the provider's handled count over the same windows (handled/s is the median of the rounds' handled rates, and the ratio to raw compares those medians) and the sends it never handled once drained, warm-ups included (lost)",
                throughput::ROUNDS,
                settings.window(throughput::WINDOW) / throughput::ROUNDS as u32,
                throughput::PIPELINE_DEPTH
            ),
        ),
        (
            "heartbeat cost".into(),
            format!(
                "a provider process (default ServerConfig) holds {} connections from a consumers process (raw sockets on one mio thread that answer Pings and, heartbeats on, ping each connection as it opens and every 1 s after that: the connections open within tens of ms, so their Pings go out in a burst each second; at the stop the consumers send no more Pings and read the Pongs still in flight for up to 1 s, outside the window); on: provider Fixed mode 1 s × 3 (the default: it pings every connection every interval, here with the Pong to that consumer's Ping, in one write); idle: provider Idle mode 1 s × 3 (it pings a connection only when idle for an interval, and not while that consumer keeps pinging it, so here it answers); off: send_pings false and a 1 h interval, consumers silent; after all are connected plus 2 s, provider CPU (sum of its threads' se.sum_exec_runtime) over {:?}; RSS per connection = (VmRSS at the end − VmRSS before the consumers connected) / connections",
                settings.idle_conns,
                settings.window(std::time::Duration::from_secs(10))
            ),
        ),
        (
            "timer wheel".into(),
            "pulse::timer::Wheel<u64> used directly (no thread, no clock), 1,000,000 live timers; schedule+cancel = cancel a random live timer and insert one with a random deadline within 65,536 ticks; busy tick = 1 M timers each firing once per 200 ticks (1 s heartbeat at the 5 ms tick) and re-armed; empty tick = 1 M timers all ≥ 2^24 ticks ahead".into(),
        ),
        (
            "liveness".into(),
            "client and server at 100 ms × 3 (Fixed mode, 5 ms tick). Detection: the client connects through an in-process proxy that, at a random phase, starts dropping every byte both ways while keeping the sockets open; time from the freeze and from the last byte delivered to the client's Disconnected event, ≥ 5 trials quick / 25 full. Reconnect: graceful provider shutdown, a random 0–400 ms pause, a new provider bound on the same port; time from the start of the successful bind call (before the listening socket exists) to the client's Connected event; due attempt → connected leaves out, and counts, trials whose successful attempt was due before the bind started; the detection target is checked against the p99 from the last byte delivered (default backoff 100 ms × 2 ± 20 %, probation shortened to 500 ms and waited out before each trial)".into(),
        ),
    ]
}
