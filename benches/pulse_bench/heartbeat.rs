//! Heartbeat cost: a provider holding N idle consumer connections.
//!
//! Three processes, so that each number is the provider's alone and the fd
//! limit (20,000 per process here) is not shared:
//! - the bench (parent) starts a **provider** child per setting (heartbeats on
//!   and off) and reads its result;
//! - the provider child binds a pulse `Server` and starts a **consumers**
//!   grandchild, which opens N raw TCP connections and speaks the protocol
//!   minimally on one thread with one `mio::Poll`: it answers every Ping with
//!   a Pong, and (heartbeats on) sends each connection a Ping as it opens
//!   and then every interval;
//! - once all N are connected and settled, the provider measures its own CPU
//!   time over the window (all threads) and its resident memory.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use pulse::ServerConfig;
use pulse::protocol::{DEFAULT_MAX_FRAME_LEN, HEADER_LEN, Header, Kind, encode_ping, encode_pong};
use serde::{Deserialize, Serialize};

use crate::common::{self, Settings};
use crate::rpc;

pub const INTERVAL: Duration = Duration::from_secs(1);
const WINDOW: Duration = Duration::from_secs(10);
const SETTLE: Duration = Duration::from_secs(2);
/// How long the consumers read Pongs still in flight after the stop.
const DRAIN_AFTER_STOP: Duration = Duration::from_secs(1);
/// CPU time below which the user/kernel split is not reported: 20 ticks of
/// `/proc/self/stat` (a quick run's provider uses about 3).
const MIN_CPU_FOR_SPLIT: Duration = Duration::from_millis(200);

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConsumerStats {
    pub requested: usize,
    pub connected: usize,
    pub connect_errors: usize,
    pub first_connect_error: Option<String>,
    pub pings_sent: u64,
    pub pongs_received: u64,
    pub pings_answered: u64,
    pub closed_by_provider: u64,
    pub protocol_errors: u64,
    pub write_errors: u64,
    pub window_s: f64,
    pub cpu_pct: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HeartbeatRow {
    /// `on`: both sides ping every interval (Fixed mode, the default), 3 misses.
    /// `idle`: the consumers ping every interval; the provider in Idle mode
    /// pings only a connection it has not heard from for an interval (so,
    /// here, never) and answers the consumers' pings.
    /// `off`: nobody pings (`send_pings: false`, 1 h interval).
    pub heartbeats: String,
    pub interval_ms: u64,
    pub idle_conns: usize,
    /// Connections the provider counted at the start and end of the window.
    pub open_at_start: usize,
    pub open_at_end: usize,
    pub window_s: f64,
    /// Provider CPU (all threads) over the window, % of one core.
    pub cpu_pct_one_core: f64,
    pub cpu_source: String,
    /// Share of the provider's CPU over the window spent in the kernel:
    /// `stime` / (`utime` + `stime`). The kernel splits a thread's run time
    /// by which side its timer ticks fell on, so the share means something
    /// only over many ticks: `None` when the window had less than
    /// [`MIN_CPU_FOR_SPLIT`] of CPU.
    #[serde(default)]
    pub kernel_share_pct: Option<f64>,
    pub provider_threads: u64,
    pub rss_before_kib: u64,
    pub rss_connected_kib: u64,
    pub rss_end_kib: u64,
    /// (VmRSS at the end − VmRSS before the consumers connected) / N.
    pub rss_per_conn_bytes: f64,
    pub consumers: ConsumerStats,
    pub error: Option<String>,
}

/// Runs the provider child with heartbeats off, on (Fixed) and idle.
pub fn run(settings: &Settings) -> Vec<HeartbeatRow> {
    let window = settings.window(WINDOW);
    ["off", "on", "idle"]
        .iter()
        .map(|hb| {
            let mut cmd = common::self_command("provider", false);
            cmd.env("PULSE_BENCH_HB", hb)
                .env("PULSE_BENCH_IDLE_CONNS", settings.idle_conns.to_string())
                .env("PULSE_BENCH_WINDOW_MS", window.as_millis().to_string());
            let limit = window + Duration::from_secs(120);
            match common::run_child_for_result(cmd, limit).and_then(|json| {
                serde_json::from_str::<HeartbeatRow>(&json).map_err(|e| e.to_string())
            }) {
                Ok(row) => row,
                Err(e) => HeartbeatRow {
                    heartbeats: hb.to_string(),
                    idle_conns: settings.idle_conns,
                    error: Some(e),
                    ..HeartbeatRow::default()
                },
            }
        })
        .collect()
}

/// Role `provider`. `PULSE_BENCH_HB` is `on`, `idle` or `off` (the rows of
/// [`run`]), or `answer`, for profiling only: the consumers ping every
/// interval as for `on`, and the provider runs no heartbeat of its own (no
/// pings, a 1 h interval, so no timer fires) but answers them, as any side
/// does: what answering costs without any liveness work.
pub fn provider_main() {
    let hb = std::env::var("PULSE_BENCH_HB").unwrap_or_default();
    let answer_only = hb == "answer";
    let hb_on = hb == "on" || hb == "idle" || answer_only;
    let n: usize = common::env_parse("PULSE_BENCH_IDLE_CONNS", 5_000);
    let window = Duration::from_millis(common::env_parse("PULSE_BENCH_WINDOW_MS", 10_000));
    let mut row = HeartbeatRow {
        heartbeats: if hb_on { hb.as_str() } else { "off" }.into(),
        interval_ms: if hb_on && !answer_only {
            INTERVAL.as_millis() as u64
        } else {
            3_600_000
        },
        idle_conns: n,
        ..HeartbeatRow::default()
    };
    let idle_mode = hb == "idle";
    if let Err(e) = provider(hb_on, idle_mode, answer_only, n, window, &mut row) {
        row.error = Some(e);
    }
    common::print_result(&row);
}

fn provider(
    hb_on: bool,
    idle_mode: bool,
    answer_only: bool,
    n: usize,
    window: Duration,
    row: &mut HeartbeatRow,
) -> Result<(), String> {
    let mut config = ServerConfig::default();
    config.max_connections = config.max_connections.max(n + 100);
    if hb_on && !answer_only {
        config.connection.heartbeat.interval = INTERVAL;
        config.connection.heartbeat.send_pings = true;
        if idle_mode {
            config.connection.heartbeat.mode = pulse::liveness::HeartbeatMode::Idle;
        }
    } else {
        config.connection.heartbeat.interval = Duration::from_secs(3600);
        config.connection.heartbeat.send_pings = false;
    }
    let provider = rpc::start_provider(config).map_err(|e| format!("start provider: {e}"))?;
    let addr = provider.server.local_addr();
    std::thread::sleep(Duration::from_millis(300));
    row.rss_before_kib = common::rss_kib();

    let mut cmd = common::self_command("consumers", false);
    cmd.env("PULSE_BENCH_ADDR", addr.to_string())
        .env("PULSE_BENCH_IDLE_CONNS", n.to_string())
        .env(
            "PULSE_BENCH_PING_MS",
            if hb_on {
                INTERVAL.as_millis().to_string()
            } else {
                "0".into()
            },
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd.spawn().map_err(|e| format!("start consumers: {e}"))?;
    let stdin = child.stdin.take();
    let lines = common::child_lines(&mut child);
    let result = (|| {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            match lines.recv_timeout(Duration::from_millis(200)) {
                Ok(line) if line.starts_with("READY") => break,
                Ok(_) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err("consumers exited early".to_string());
                }
                Err(_) if Instant::now() > deadline => {
                    return Err("consumers never became ready".to_string());
                }
                Err(_) => {}
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while provider.server.connection_count() < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(SETTLE);
        row.rss_connected_kib = common::rss_kib();
        row.open_at_start = provider.server.connection_count();
        row.provider_threads = common::thread_count();
        let (cpu0, source) = common::threads_cpu_precise();
        let (user0, system0) = common::process_cpu_split();
        let t0 = Instant::now();
        std::thread::sleep(window);
        let (cpu1, _) = common::threads_cpu_precise();
        let (user1, system1) = common::process_cpu_split();
        let (user, system) = (user1.saturating_sub(user0), system1.saturating_sub(system0));
        row.kernel_share_pct = (user + system >= MIN_CPU_FOR_SPLIT)
            .then(|| system.as_secs_f64() / (user + system).as_secs_f64() * 100.0);
        let secs = t0.elapsed().as_secs_f64();
        row.window_s = secs;
        row.cpu_pct_one_core = cpu1.saturating_sub(cpu0).as_secs_f64() / secs * 100.0;
        row.cpu_source = source.to_string();
        row.open_at_end = provider.server.connection_count();
        row.rss_end_kib = common::rss_kib();
        row.rss_per_conn_bytes = (row.rss_end_kib as f64 - row.rss_before_kib as f64) * 1024.0
            / row.open_at_end.max(1) as f64;
        Ok(())
    })();
    drop(stdin); // EOF: the consumers report and exit
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        match lines.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                if let Some(json) = line.strip_prefix(common::RESULT_PREFIX) {
                    if let Ok(stats) = serde_json::from_str(json) {
                        row.consumers = stats;
                    }
                    break;
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(_) => {}
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    drop(provider);
    result
}

struct Peer {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// Writes a Ping with the next sequence number on `stream` and counts it.
fn send_ping(stream: &mut TcpStream, next_seq: &mut u64, stats: &mut ConsumerStats) {
    if stream
        .write(&encode_ping(*next_seq))
        .map_or(true, |k| k != HEADER_LEN)
    {
        stats.write_errors += 1;
    }
    *next_seq += 1;
    stats.pings_sent += 1;
}

/// Role `consumers`: N raw protocol-speaking connections on one thread.
pub fn consumers_main() {
    let addr: SocketAddr = match common::env_opt("PULSE_BENCH_ADDR") {
        Some(a) => a,
        None => {
            eprintln!("consumers: PULSE_BENCH_ADDR is not set");
            return;
        }
    };
    let n: usize = common::env_parse("PULSE_BENCH_IDLE_CONNS", 5_000);
    let ping_ms: u64 = common::env_parse("PULSE_BENCH_PING_MS", 1_000);
    let stop = common::stop_on_stdin_eof();
    let mut stats = ConsumerStats {
        requested: n,
        ..ConsumerStats::default()
    };
    let Ok(mut poll) = Poll::new() else {
        eprintln!("consumers: cannot create a poll");
        return;
    };
    let mut peers: Vec<Option<Peer>> = Vec::with_capacity(n);
    let interval = Duration::from_millis(ping_ms);
    // When each connection pings next, earliest first: every connection
    // pings as it opens and then every interval after that, so none is
    // silent for an interval. (Spread over the interval from when all were
    // open, the ones opened first were silent longer than that, and a
    // provider in Idle mode rightly pinged them: about 2,050 of 5,000 in
    // some runs, depending on how long the connecting took.)
    let mut schedule: VecDeque<(Instant, usize)> = VecDeque::with_capacity(n);
    let mut next_seq = 1u64;
    for i in 0..n {
        let connected = TcpStream::connect(addr).and_then(|s| {
            s.set_nodelay(true)?;
            s.set_nonblocking(true)?;
            poll.registry().register(
                &mut SourceFd(&s.as_raw_fd()),
                Token(i),
                Interest::READABLE,
            )?;
            Ok(s)
        });
        match connected {
            Ok(mut stream) => {
                stats.connected += 1;
                if ping_ms > 0 {
                    send_ping(&mut stream, &mut next_seq, &mut stats);
                    schedule.push_back((Instant::now() + interval, i));
                }
                peers.push(Some(Peer {
                    stream,
                    buf: Vec::new(),
                }));
            }
            Err(e) => {
                stats.connect_errors += 1;
                stats.first_connect_error.get_or_insert(e.to_string());
                peers.push(None);
            }
        }
    }
    println!("READY {}", stats.connected);
    let _ = std::io::stdout().flush();

    let mut events = Events::with_capacity(1024);
    let t0 = Instant::now();
    let cpu0 = common::process_cpu();
    let mut scratch = vec![0u8; 16 * 1024];
    // At the stop the window ends (its time and CPU are taken then), and
    // no more Pings are sent; the Pongs of those already sent are read for
    // up to DRAIN_AFTER_STOP, so that "pongs back" counts every answer.
    // The connections opened in a burst, so their Pings go out in a burst
    // each interval too, and a stop in the middle of one used to leave up
    // to ~2,300 Pongs unread (in flight, sent the last ~15 ms), which
    // looked like Pings the provider had not answered.
    let mut window_end: Option<(Instant, Duration)> = None;
    loop {
        if window_end.is_none() && stop.load(Ordering::SeqCst) {
            window_end = Some((Instant::now(), common::process_cpu()));
        }
        if let Some((ended, _)) = window_end
            && (stats.pongs_received >= stats.pings_sent || ended.elapsed() > DRAIN_AFTER_STOP)
        {
            break;
        }
        if poll
            .poll(&mut events, Some(Duration::from_millis(5)))
            .is_err()
        {
            continue;
        }
        for event in events.iter() {
            let i = event.token().0;
            let Some(peer) = peers.get_mut(i).and_then(|p| p.as_mut()) else {
                continue;
            };
            let mut gone = false;
            loop {
                match peer.stream.read(&mut scratch) {
                    Ok(0) => {
                        gone = true;
                        break;
                    }
                    Ok(k) => peer.buf.extend_from_slice(&scratch[..k]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        gone = true;
                        break;
                    }
                }
            }
            let mut at = 0;
            while peer.buf.len() - at >= HEADER_LEN {
                let raw: &[u8; HEADER_LEN] =
                    peer.buf[at..at + HEADER_LEN].try_into().expect("20 bytes");
                let header = match Header::decode(raw, DEFAULT_MAX_FRAME_LEN) {
                    Ok(h) => h,
                    Err(_) => {
                        stats.protocol_errors += 1;
                        gone = true;
                        break;
                    }
                };
                let end = at + HEADER_LEN + header.body_len as usize;
                if peer.buf.len() < end {
                    break;
                }
                match header.kind {
                    Kind::Ping => {
                        stats.pings_answered += 1;
                        if peer
                            .stream
                            .write(&encode_pong(header.id))
                            .map_or(true, |k| k != HEADER_LEN)
                        {
                            stats.write_errors += 1;
                        }
                    }
                    Kind::Pong => stats.pongs_received += 1,
                    Kind::Close => gone = true,
                    _ => {}
                }
                at = end;
            }
            peer.buf.drain(..at);
            if gone {
                stats.closed_by_provider += 1;
                peers[i] = None;
            }
        }
        if window_end.is_some() {
            continue; // draining: Pongs only, no new Pings
        }
        // Each ping is due an interval after the last one of its
        // connection, so the queue stays in order of due time.
        let now = Instant::now();
        while let Some(&(due, i)) = schedule.front() {
            if due > now {
                break;
            }
            schedule.pop_front();
            if let Some(peer) = peers[i].as_mut() {
                send_ping(&mut peer.stream, &mut next_seq, &mut stats);
                schedule.push_back((due + interval, i));
            }
        }
    }
    let (ended, cpu1) = window_end.unwrap_or_else(|| (Instant::now(), common::process_cpu()));
    let secs = ended.duration_since(t0).as_secs_f64();
    stats.window_s = secs;
    stats.cpu_pct = cpu1.saturating_sub(cpu0).as_secs_f64() / secs * 100.0;
    common::print_result(&stats);
}
