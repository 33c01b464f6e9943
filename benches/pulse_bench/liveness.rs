//! Liveness at 100 ms × 3: how long a consumer takes to notice a frozen
//! provider, and to reconnect after the provider restarts on the same port.
//!
//! Freezing: the consumer connects through a tiny in-process TCP proxy. To
//! freeze, the proxy keeps both sockets open but silently drops every byte in
//! both directions (like a SIGSTOPped peer or a half-open path). Detection
//! time runs from that instant to the client's `Disconnected` event; it is
//! also given from the last byte the proxy delivered to the client, which is
//! what the `max_missed × interval` bound counts from.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use parking_lot::Mutex;
use pulse::config::BackoffConfig;
use pulse::{Client, ClientConfig, Event, ServerConfig};
use serde::{Deserialize, Serialize};

use crate::common::{Distribution, Rng, Settings};
use crate::rpc;

pub const INTERVAL: Duration = Duration::from_millis(100);
pub const MAX_MISSED: u32 = 3;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LivenessResult {
    pub interval_ms: u64,
    pub max_missed: u32,
    pub timer_tick_ms: u64,
    /// `max_missed × interval + one tick + 10 ms`: the target.
    pub target_ms: f64,
    /// From the freeze to `Disconnected`.
    pub detection_from_freeze: Distribution,
    /// From the last byte delivered to the client to `Disconnected`.
    pub detection_from_last_byte: Distribution,
    /// Disconnect reasons seen (should all be `heartbeat_timeout`).
    pub detection_reasons: Vec<String>,
    pub detection_errors: Vec<String>,
    /// Provider down for a random 0–400 ms (after a graceful shutdown), then
    /// bound again on the same port: from the start of the successful
    /// `Server::bind` call (before its listening socket exists; the call
    /// also starts the loops and workers) to `Connected`.
    pub reconnect_from_bind: Distribution,
    /// From the start of the shutdown to `Connected` (the whole outage).
    pub reconnect_outage: Distribution,
    /// From the moment the successful attempt was due (its `Reconnecting`
    /// event plus the announced delay) to `Connected`: connect + first
    /// ping/pong, without the backoff wait.
    pub reconnect_attempt_to_connected: Distribution,
    /// Trials left out of `reconnect_attempt_to_connected` because the
    /// successful attempt was due before the bind started (its time would
    /// include waiting for the provider), or no `Reconnecting` event was
    /// seen.
    #[serde(default)]
    pub reconnect_attempt_excluded: usize,
    /// How long the graceful `Server::shutdown` (drop) took.
    pub provider_shutdown: Distribution,
    pub backoff: String,
    pub reconnect_errors: Vec<String>,
}

fn liveness_conn_config() -> pulse::ConnectionConfig {
    let mut c = pulse::ConnectionConfig::default();
    c.heartbeat.interval = INTERVAL;
    c.heartbeat.max_missed = MAX_MISSED;
    c
}

fn client_config() -> ClientConfig {
    ClientConfig {
        connection: liveness_conn_config(),
        backoff: BackoffConfig {
            // Default delays; a short probation so each trial starts from a
            // reset backoff without waiting 2 s.
            probation: Duration::from_millis(500),
            ..BackoffConfig::default()
        },
        ..ClientConfig::default()
    }
}

fn server_config() -> ServerConfig {
    ServerConfig {
        connection: liveness_conn_config(),
        ..ServerConfig::default()
    }
}

/// Client events, timestamped as they arrive by a dedicated thread.
fn timestamped(events: Receiver<Event>) -> Receiver<(Instant, Event)> {
    let (tx, rx) = crossbeam_channel::unbounded();
    std::thread::spawn(move || {
        while let Ok(e) = events.recv() {
            if tx.send((Instant::now(), e)).is_err() {
                break;
            }
        }
    });
    rx
}

fn wait_connected(
    events: &Receiver<(Instant, Event)>,
    client: &Client,
    timeout: Duration,
) -> Result<Instant, String> {
    let deadline = Instant::now() + timeout;
    loop {
        match events.recv_deadline(deadline) {
            Ok((t, Event::Connected { .. })) => return Ok(t),
            Ok(_) => {}
            Err(_) => {
                return if client.state() == pulse::ConnectionState::Ready {
                    Ok(Instant::now())
                } else {
                    Err(format!(
                        "no Connected event within {timeout:?} (state {:?})",
                        client.state()
                    ))
                };
            }
        }
    }
}

// ----- the freezing proxy ----------------------------------------------------

struct Pair {
    frozen: AtomicBool,
    last_to_client: Mutex<Instant>,
}

struct Proxy {
    addr: SocketAddr,
    current: Arc<Mutex<Option<Arc<Pair>>>>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    fn start(upstream: SocketAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let current = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let (cur, stop2) = (current.clone(), stop.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let pair = Arc::new(Pair {
                    frozen: AtomicBool::new(false),
                    last_to_client: Mutex::new(Instant::now()),
                });
                *cur.lock() = Some(pair.clone());
                let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
                    continue;
                };
                let p2 = pair.clone();
                std::thread::spawn(move || pump(client, server, &pair, false));
                std::thread::spawn(move || pump(s2, c2, &p2, true));
            }
        });
        Ok(Proxy {
            addr,
            current,
            stop,
        })
    }

    fn freeze_current(&self) -> Option<Arc<Pair>> {
        let pair = self.current.lock().clone()?;
        pair.frozen.store(true, Ordering::SeqCst);
        Some(pair)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

/// Copies `from` to `to` until EOF, dropping bytes once the pair is frozen.
/// An end seen while frozen is not passed on: a frozen peer closes nothing.
fn pump(mut from: TcpStream, mut to: TcpStream, pair: &Pair, to_client: bool) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if pair.frozen.load(Ordering::SeqCst) {
            continue;
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        if to_client {
            *pair.last_to_client.lock() = Instant::now();
        }
    }
    if !(to_client && pair.frozen.load(Ordering::SeqCst)) {
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    }
}

// ----- the trials ------------------------------------------------------------

pub fn run(settings: &Settings) -> Result<LivenessResult, String> {
    let trials = settings.count(25).max(5) as usize;
    let mut rng = Rng::new(42);
    let mut r = LivenessResult {
        interval_ms: INTERVAL.as_millis() as u64,
        max_missed: MAX_MISSED,
        timer_tick_ms: pulse::config::DEFAULT_TIMER_TICK.as_millis() as u64,
        target_ms: (INTERVAL * MAX_MISSED + pulse::config::DEFAULT_TIMER_TICK).as_secs_f64()
            * 1000.0
            + 10.0,
        backoff: format!("{:?}", client_config().backoff),
        ..LivenessResult::default()
    };

    // Detection of a frozen provider.
    {
        let provider =
            rpc::start_provider(server_config()).map_err(|e| format!("start provider: {e}"))?;
        let proxy =
            Proxy::start(provider.server.local_addr()).map_err(|e| format!("start proxy: {e}"))?;
        let client =
            Client::connect(proxy.addr, client_config()).map_err(|e| format!("connect: {e}"))?;
        let events = timestamped(client.events());
        let (mut from_freeze, mut from_last) = (Vec::new(), Vec::new());
        for trial in 0..trials {
            if let Err(e) = wait_connected(&events, &client, Duration::from_secs(10)) {
                r.detection_errors.push(format!("trial {trial}: {e}"));
                continue;
            }
            // A random phase against the heartbeat schedule.
            std::thread::sleep(Duration::from_millis(150 + rng.below(100)));
            let Some(pair) = proxy.freeze_current() else {
                r.detection_errors
                    .push(format!("trial {trial}: no proxied connection"));
                continue;
            };
            let t0 = Instant::now();
            let deadline = t0 + Duration::from_secs(5);
            loop {
                match events.recv_deadline(deadline) {
                    Ok((t, Event::Disconnected { reason, .. })) => {
                        from_freeze.push(t - t0);
                        from_last.push(t - *pair.last_to_client.lock());
                        r.detection_reasons.push(reason.as_str().to_string());
                        break;
                    }
                    Ok(_) => {}
                    Err(_) => {
                        r.detection_errors
                            .push(format!("trial {trial}: not detected within 5 s"));
                        break;
                    }
                }
            }
        }
        r.detection_from_freeze = Distribution::of(&from_freeze);
        r.detection_from_last_byte = Distribution::of(&from_last);
        r.detection_reasons.sort();
        r.detection_reasons.dedup();
        drop(client);
        drop(proxy);
        drop(provider);
    }

    // Reconnect after a provider restart on the same port.
    {
        let mut provider =
            Some(rpc::start_provider(server_config()).map_err(|e| format!("start provider: {e}"))?);
        let addr = provider
            .as_ref()
            .map(|p| p.server.local_addr())
            .expect("just started");
        let client = Client::connect(addr, client_config()).map_err(|e| format!("connect: {e}"))?;
        let events = timestamped(client.events());
        let (mut from_bind, mut outage, mut attempt, mut shutdown) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for trial in 0..trials {
            if client.state() != pulse::ConnectionState::Ready
                && let Err(e) = wait_connected(&events, &client, Duration::from_secs(10))
            {
                r.reconnect_errors.push(format!("trial {trial}: {e}"));
                continue;
            }
            // Past the probation: the backoff starts from its first delay.
            std::thread::sleep(Duration::from_millis(600));
            while events.try_recv().is_ok() {}
            let t_shutdown = Instant::now();
            drop(provider.take());
            shutdown.push(t_shutdown.elapsed());
            std::thread::sleep(Duration::from_millis(rng.below(400)));
            let bind_deadline = Instant::now() + Duration::from_secs(3);
            // Taken before each bind attempt: the successful one's start is
            // before its listening socket exists, so a client that connects
            // while the server is still starting its loops is not credited
            // with that time.
            let (restarted, t_bind) = loop {
                let t = Instant::now();
                match rpc::start_provider_at(&addr.to_string(), server_config()) {
                    Ok(p) => break (Ok(p), t),
                    Err(e) if Instant::now() > bind_deadline => break (Err(e), t),
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            };
            match restarted {
                Ok(p) => provider = Some(p),
                Err(e) => {
                    r.reconnect_errors
                        .push(format!("trial {trial}: rebind {addr}: {e}"));
                    break;
                }
            }
            let deadline = t_bind + Duration::from_secs(10);
            let mut due: Option<Instant> = None;
            loop {
                match events.recv_deadline(deadline) {
                    Ok((t, Event::Reconnecting { delay, .. })) => due = Some(t + delay),
                    Ok((t, Event::Connected { .. })) => {
                        from_bind.push(t.saturating_duration_since(t_bind));
                        outage.push(t - t_shutdown);
                        match due.filter(|d| *d >= t_bind) {
                            Some(due) => attempt.push(t.saturating_duration_since(due)),
                            None => r.reconnect_attempt_excluded += 1,
                        }
                        break;
                    }
                    Ok(_) => {}
                    Err(_) => {
                        r.reconnect_errors.push(format!(
                            "trial {trial}: no reconnect within 10 s of the bind"
                        ));
                        break;
                    }
                }
            }
        }
        r.reconnect_from_bind = Distribution::of(&from_bind);
        r.reconnect_outage = Distribution::of(&outage);
        r.reconnect_attempt_to_connected = Distribution::of(&attempt);
        r.provider_shutdown = Distribution::of(&shutdown);
        drop(client);
        drop(provider);
    }
    Ok(r)
}
