// Run it: `cargo run --example cluster` (three providers + one consumer, static registry),
// or against etcd: `scripts/etcd.sh start` then `cargo run --example cluster -- --registry etcd://127.0.0.1:23790`
// (`-- --help`: providers and consumers as separate processes, balancers, timings).

//! `cluster`: one consumer calling many providers of one service, through a
//! registry, with load balancing and failover, and what happens to the
//! rotation when a provider freezes.
//!
//! Modes:
//!
//! * **no mode** — three providers (`p0`, `p1`, `p2`, weights 1, 2, 3 for the
//!   weighted balancers) and one consumer in one process. Each provider sits
//!   behind a small in-process TCP proxy, and what the registry lists is the
//!   proxy's address. The consumer calls `whoami` every `--interval-ms` and
//!   prints who answered. After a third of the calls, `p1`'s proxy starts
//!   dropping every byte both ways (a frozen provider, as the network sees
//!   it); after two thirds it passes bytes again. The output shows `p1`'s
//!   missed heartbeats (from the second one the cluster client gives it no
//!   new call), its connection declared dead after `--max-missed` intervals,
//!   no call lost (`whoami` is idempotent, so a call caught on `p1` waits for
//!   that and is retried on another provider), `p1` out of the rotation
//!   (the `rotation` line is printed between calls, so it comes after the
//!   call caught on `p1`), and `p1` back after the thaw.
//! * **`provider --registry URL`** — one provider alone: serves `whoami` on
//!   `--addr` (default `127.0.0.1:0`), registers in the registry with a lease
//!   of `--ttl-s` seconds that it keeps alive, and serves until Ctrl-C or
//!   SIGTERM. Then it stops gracefully: it deregisters first (its consumers'
//!   watches drop it at once, instead of calling it until its lease
//!   expires), then `Server::shutdown` finishes the calls under way, answers
//!   late ones `ShuttingDown` (a cluster client sends them to another
//!   provider) and closes each connection with Close(Normal).
//! * **`consumer --registry URL`** — the consumer alone: follows the
//!   registry, calls `whoami` every `--interval-ms` (`--calls 0`: forever).
//!
//! `--registry` is `static` (the default; only without a mode) or
//! `etcd://host:port`. With etcd, try `kill -STOP` on a provider process: the
//! consumer stops using it within the heartbeat bound, and etcd drops its key
//! when the lease expires; `kill -CONT` and it registers again.
//!
//! # Output
//!
//! One JSON object per line on stdout:
//!
//! ```text
//! {"event":"provider","name":"p0","addr":"127.0.0.1:41000","weight":1}   one per provider at start
//! {"event":"call","seq":7,"provider":"p1","addr":"127.0.0.1:41001","attempts":1,"rtt_us":180}
//! {"event":"not_ready","wanted":3,"listed":0,"healthy":0,"note":"calling anyway"}  fewer healthy after 5 s
//! {"event":"freeze","provider":"p1"}                                      no mode only
//! {"event":"heartbeat_missed","peer":"127.0.0.1:41001","missed":1}
//! {"event":"rotation","healthy":["p0","p2"]}                              whenever it changes
//! {"event":"disconnected","peer":"127.0.0.1:41001","reason":"heartbeat_timeout"}
//! {"event":"call_failed","seq":9,"error":"..."}
//! {"event":"provider_added","addr":"..."} / {"event":"provider_removed","addr":"..."}
//! {"event":"registry_lost","error":"..."} / {"event":"registry_resumed"}
//! {"event":"empty_list_ignored","kept":2}                                  the registry listed none (empty protection)
//! {"event":"provider_rejected","entry":"127.0.0.1:0","reason":"..."}       a listed entry that cannot be used
//! {"event":"stopping"} / {"event":"deregistered"} / {"event":"stopped"}      provider, on Ctrl-C or SIGTERM
//! {"event":"stopping"}, then the summary                                     consumer, on Ctrl-C or SIGTERM
//! {"event":"summary","calls":90,"ok":90,"failed":0,"retried":1,"by_provider":{"p0":35,"p1":21,"p2":34}}
//! ```
//!
//! The consumer's lines come out in the order things happened: a call's line
//! follows every cluster event already emitted, so a call retried after a
//! provider died comes after that provider's `disconnected`.
//!
//! Logs (`RUST_LOG=info`) go to standard error.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Select, select};
use parking_lot::Mutex;
use pulse::cluster::{
    CallOptions, ClusterClient, ClusterConfig, ClusterEvent, ConsistentHash, Endpoint, EtcdConfig,
    EtcdRegistry, LeastInflight, LoadBalancer, LowestRtt, Random, Registration, Registry,
    RoundRobin, ServiceKey, SmoothWeightedRoundRobin, StaticRegistry, WeightedRandom,
};
use pulse::config::HeartbeatConfig;
use pulse::{ClientConfig, Event, Server, ServerConfig, ServiceBuilder};
use serde_json::json;

const USAGE: &str = "\
pulse cluster: one consumer, many providers, a registry, load balancing, failover.

Usage:
  cluster [--registry static|etcd://HOST:PORT] [--balancer NAME] [--calls N] [--interval-ms N]
          [--heartbeat-ms N] [--max-missed N] [--no-fail-fast]
      Three providers (p0, p1, p2; weights 1, 2, 3) and a consumer in one process.
      p1 freezes after a third of the calls and thaws after two thirds.
  cluster provider --registry etcd://HOST:PORT [--addr ADDR] [--name NAME] [--weight N] [--ttl-s N]
          [--heartbeat-ms N] [--max-missed N] [--no-fail-fast]
      One provider: serves `whoami`, registers with a lease it keeps alive, runs until Ctrl-C or
      SIGTERM, then deregisters and shuts down gracefully.
  cluster consumer --registry etcd://HOST:PORT [--balancer NAME] [--calls N] [--interval-ms N]
          [--heartbeat-ms N] [--max-missed N] [--no-fail-fast]
      The consumer alone (--calls 0: forever).

Options:
  --registry R      `static` (default, no mode only) or etcd://HOST:PORT[,HOST:PORT...]
  --balancer NAME   round_robin (default), random, weighted_random, smooth_weighted_round_robin,
                    consistent_hash (keyed by the call number modulo 10), least_inflight, lowest_rtt
  --calls N         calls to make (default 90; consumer: 0 = forever)
  --interval-ms N   pause between calls (default 50)
  --heartbeat-ms N  heartbeat interval (default 200)
  --max-missed N    silent intervals before a peer is declared dead (default 3)
  --addr ADDR       provider: where to listen (default 127.0.0.1:0)
  --name NAME       provider: what `whoami` answers (default provider-PORT)
  --weight N        provider: its weight (default 100)
  --ttl-s N         provider: lease TTL in seconds (default 3)
  --no-fail-fast    with etcd: start even when etcd does not answer; providers register,
                    and the consumer lists them, once it does (EtcdConfig::fail_fast false;
                    by default an etcd that is down stops the program at startup)
  -h, --help        this help
";

const SERVICE: &str = "whoami";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Both,
    Provider,
    Consumer,
}

#[derive(Debug)]
struct Options {
    mode: Mode,
    registry: String,
    balancer: String,
    calls: u64,
    interval_ms: u64,
    heartbeat_ms: u64,
    max_missed: u32,
    addr: String,
    name: Option<String>,
    weight: u32,
    ttl_s: u64,
    /// `EtcdConfig::fail_fast`: `--no-fail-fast` clears it.
    fail_fast: bool,
}

fn parse_args(args: &[String]) -> Result<Option<Options>, String> {
    let mut o = Options {
        mode: Mode::Both,
        registry: "static".into(),
        balancer: "round_robin".into(),
        calls: 90,
        interval_ms: 50,
        heartbeat_ms: 200,
        max_missed: 3,
        addr: "127.0.0.1:0".into(),
        name: None,
        weight: 100,
        ttl_s: 3,
        fail_fast: true,
    };
    let mut calls_given = false;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        let number = |name: &str, v: String| {
            v.parse::<u64>()
                .map_err(|_| format!("{name} wants a whole number, got {v:?}"))
        };
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "provider" if o.mode == Mode::Both => o.mode = Mode::Provider,
            "consumer" if o.mode == Mode::Both => o.mode = Mode::Consumer,
            "--registry" => o.registry = value(arg)?,
            "--balancer" => o.balancer = value(arg)?,
            "--calls" => {
                o.calls = number(arg, value(arg)?)?;
                calls_given = true;
            }
            "--interval-ms" => o.interval_ms = number(arg, value(arg)?)?,
            "--heartbeat-ms" => o.heartbeat_ms = number(arg, value(arg)?)?.max(10),
            "--max-missed" => o.max_missed = number(arg, value(arg)?)?.clamp(1, 1000) as u32,
            "--addr" => o.addr = value(arg)?,
            "--name" => o.name = Some(value(arg)?),
            "--weight" => o.weight = number(arg, value(arg)?)?.min(u64::from(u32::MAX)) as u32,
            "--ttl-s" => o.ttl_s = number(arg, value(arg)?)?.max(1),
            "--no-fail-fast" => o.fail_fast = false,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if o.mode != Mode::Both && !o.registry.starts_with("etcd://") {
        return Err("provider and consumer modes need --registry etcd://HOST:PORT".into());
    }
    if o.mode == Mode::Consumer && !calls_given {
        o.calls = 0;
    }
    balancer(&o.balancer)?;
    Ok(Some(o))
}

fn balancer(name: &str) -> Result<Box<dyn LoadBalancer>, String> {
    Ok(match name {
        "round_robin" => Box::new(RoundRobin::new()),
        "random" => Box::new(Random::new()),
        "weighted_random" => Box::new(WeightedRandom::new()),
        "smooth_weighted_round_robin" | "swrr" => Box::new(SmoothWeightedRoundRobin::new()),
        "consistent_hash" => Box::new(ConsistentHash::new()),
        "least_inflight" => Box::new(LeastInflight::new()),
        "lowest_rtt" => Box::new(LowestRtt::new()),
        other => return Err(format!("unknown balancer {other:?}")),
    })
}

fn print(value: serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}

/// The consumer's output, in the order things happened: the cluster's
/// events are taken off their channel only under `order`, and a call's line
/// first prints the events already emitted. pulse puts a provider's event
/// in the channel before a call can see its effect (a `disconnected`
/// before the calls lost with it fail), so no call line comes out ahead
/// of the event that explains it, as it could when a printer thread and
/// the calling thread each printed as soon as they had a line.
struct Output {
    events: Receiver<ClusterEvent>,
    order: Mutex<()>,
}

impl Output {
    /// Prints `value` after the events already emitted.
    fn line(&self, value: serde_json::Value) {
        let _order = self.order.lock();
        self.print_events();
        print(value);
    }

    /// Prints the events that come until `done` is set, as they come.
    fn follow(&self, done: &AtomicBool) {
        while !done.load(Ordering::Relaxed) {
            // Wait for an event without taking it: it is taken, and
            // printed, under the lock.
            let mut ready = Select::new();
            ready.recv(&self.events);
            if ready.ready_timeout(Duration::from_millis(50)).is_ok() {
                let _order = self.order.lock();
                self.print_events();
            }
        }
    }

    fn print_events(&self) {
        for event in self.events.try_iter() {
            print(cluster_event_json(&event));
        }
    }
}

fn heartbeat(o: &Options) -> HeartbeatConfig {
    HeartbeatConfig {
        interval: Duration::from_millis(o.heartbeat_ms),
        max_missed: o.max_missed,
        ..HeartbeatConfig::default()
    }
}

/// A provider of `whoami` answering `name`.
fn start_provider(o: &Options, addr: &str, name: String) -> pulse::Result<Server> {
    let mut config = ServerConfig {
        event_loops: 1,
        ..ServerConfig::default()
    };
    config.connection.heartbeat = heartbeat(o);
    Server::builder()
        .config(config)
        .service(
            ServiceBuilder::new(SERVICE)
                .method_inline("whoami", move |_: ()| Ok::<_, String>(name.clone())),
        )
        .bind(addr)
}

/// The registry `url` names; an etcd one fails fast (at startup, when
/// etcd does not answer) as `fail_fast` says.
fn registry(url: &str, fail_fast: bool) -> pulse::Result<Box<dyn Registry>> {
    if url == "static" {
        Ok(Box::new(StaticRegistry::new()))
    } else {
        let mut config = EtcdConfig::from_url(url)?;
        config.fail_fast = fail_fast;
        Ok(Box::new(EtcdRegistry::new(config)?))
    }
}

fn main() -> ExitCode {
    env_logger::init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let options = match parse_args(&args) {
        Ok(Some(o)) => o,
        Ok(None) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("error: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let result = match options.mode {
        Mode::Both => run_both(&options),
        Mode::Provider => run_provider(&options),
        Mode::Consumer => registry(&options.registry, options.fail_fast)
            .and_then(|r| run_consumer(&options, r.as_ref(), &BTreeMap::new(), None)),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            print(json!({"event": "error", "error": e.to_string()}));
            ExitCode::FAILURE
        }
    }
}

fn run_provider(o: &Options) -> pulse::Result<bool> {
    let registry = registry(&o.registry, o.fail_fast)?;
    let probe =
        TcpListener::bind(&o.addr).map_err(|e| pulse::Error::io(format!("bind {}", o.addr), e))?;
    let addr = probe
        .local_addr()
        .map_err(|e| pulse::Error::io("local_addr", e))?;
    drop(probe);
    let name = o
        .name
        .clone()
        .unwrap_or_else(|| format!("provider-{}", addr.port()));
    let server = start_provider(o, &addr.to_string(), name.clone())?;
    let registration = registry.register(
        &ServiceKey::from(SERVICE),
        Endpoint::weighted(server.local_addr(), o.weight),
        Duration::from_secs(o.ttl_s),
    )?;
    print(json!({
        "event": "provider", "name": name, "addr": server.local_addr().to_string(),
        "weight": o.weight, "registry": o.registry, "ttl_s": o.ttl_s,
    }));
    let events = server.events();
    let stop = stop_signal();
    // Serve until Ctrl-C or SIGTERM, printing who connects.
    loop {
        select! {
            recv(events) -> event => match event {
                Ok(event) => print(event_json(&event)),
                Err(_) => break,
            },
            recv(stop) -> _ => break,
        }
    }
    print(json!({"event": "stopping"}));
    // Out of the registry first: consumers drop this provider as soon as
    // their watch sees the key go, and stop sending it calls. Killed
    // without this, they would go on trying it (reconnecting with backoff)
    // until its lease expired.
    match registration.deregister() {
        Ok(()) => print(json!({"event": "deregistered"})),
        Err(e) => print(json!({
            "event": "deregister_failed", "error": e.to_string(),
            "note": "the entry expires with its lease",
        })),
    }
    // Then the calls under way finish, late ones are answered ShuttingDown
    // (never run here, so a cluster client sends them elsewhere), and each
    // connection gets Close(Normal).
    server.shutdown();
    for event in events.try_iter() {
        print(event_json(&event));
    }
    print(json!({"event": "stopped"}));
    Ok(true)
}

/// A channel that disconnects on the first Ctrl-C or SIGTERM (the `ctrlc`
/// crate's "termination" feature), for a graceful stop instead of dying
/// mid-call. If the handler cannot be installed it never fires (the signal
/// then ends the process as usual) and a warning says so.
fn stop_signal() -> Receiver<()> {
    let (fire, stop) = crossbeam_channel::bounded::<()>(0);
    let mut fire = Some(fire);
    if let Err(e) = ctrlc::set_handler(move || drop(fire.take())) {
        eprintln!("cluster: Ctrl-C will not stop gracefully: {e}");
    }
    stop
}

/// Runs three providers behind proxies and the consumer; freezes p1 midway.
fn run_both(o: &Options) -> pulse::Result<bool> {
    let registry = registry(&o.registry, o.fail_fast)?;
    let service = ServiceKey::from(SERVICE);
    let mut servers = Vec::new();
    let mut proxies = Vec::new();
    let mut registrations: Vec<Registration> = Vec::new();
    let mut names = BTreeMap::new();
    for (i, weight) in [1u32, 2, 3].into_iter().enumerate() {
        let name = format!("p{i}");
        let server = start_provider(o, "127.0.0.1:0", name.clone())?;
        let proxy =
            Proxy::start(server.local_addr()).map_err(|e| pulse::Error::io("start a proxy", e))?;
        registrations.push(registry.register(
            &service,
            Endpoint::weighted(proxy.addr, weight),
            Duration::from_secs(o.ttl_s),
        )?);
        print(
            json!({"event": "provider", "name": name, "addr": proxy.addr.to_string(), "weight": weight}),
        );
        names.insert(proxy.addr, name);
        servers.push(server);
        proxies.push(proxy);
    }
    let frozen = &proxies[1];
    let ok = run_consumer(o, registry.as_ref(), &names, Some(frozen))?;
    drop(registrations);
    Ok(ok)
}

/// The consumer: calls `whoami` and prints who answered; freezes `freeze`
/// (a proxy) for the middle third of the calls.
fn run_consumer(
    o: &Options,
    registry: &dyn Registry,
    names: &BTreeMap<SocketAddr, String>,
    freeze: Option<&Proxy>,
) -> pulse::Result<bool> {
    let mut client = ClientConfig::default();
    client.connection.heartbeat = heartbeat(o);
    client.backoff.initial = Duration::from_millis(50);
    client.backoff.max = Duration::from_millis(500);
    let config = ClusterConfig {
        client,
        ..ClusterConfig::default()
    }
    .idempotent(["whoami"]);
    let balancer = balancer(&o.balancer).map_err(pulse::Error::InvalidConfig)?;
    let cluster = ClusterClient::new(registry, SERVICE, balancer, config)?;
    let wanted = names.len().max(1);
    if !cluster.wait_ready(wanted, Duration::from_secs(5)) {
        // Said, not silent: with `--no-fail-fast` and etcd down, the 5 s
        // wait above printed nothing, and the calls then failed NoProvider.
        let providers = cluster.providers();
        print(json!({
            "event": "not_ready", "wanted": wanted, "listed": providers.len(),
            "healthy": providers.iter().filter(|p| p.healthy).count(),
            "note": "calling anyway",
        }));
    }

    let name_of = |addr: SocketAddr| {
        names
            .get(&addr)
            .cloned()
            .unwrap_or_else(|| addr.to_string())
    };
    let done = Arc::new(AtomicBool::new(false));
    let output = Arc::new(Output {
        events: cluster.events(),
        order: Mutex::new(()),
    });
    let printer = {
        let (output, done) = (output.clone(), done.clone());
        std::thread::spawn(move || output.follow(&done))
    };

    let mut rotation: Vec<String> = Vec::new();
    let mut by_provider: BTreeMap<String, u64> = BTreeMap::new();
    let (mut ok, mut failed, mut retried) = (0u64, 0u64, 0u64);
    let mut seq = 0u64;
    // Ctrl-C or SIGTERM ends the calls, between two of them, with the
    // summary and a graceful close of every connection (the cluster
    // client's drop), as `--calls` running out does.
    let stop = stop_signal();
    while o.calls == 0 || seq < o.calls {
        if let Some(proxy) = freeze {
            if seq == o.calls / 3 {
                proxy.set_blackhole(true);
                output.line(json!({"event": "freeze", "provider": name_of(proxy.addr)}));
            } else if seq == 2 * o.calls / 3 {
                proxy.set_blackhole(false);
                output.line(json!({"event": "thaw", "provider": name_of(proxy.addr)}));
            }
        }
        let healthy: Vec<String> = cluster
            .providers()
            .iter()
            .filter(|p| p.healthy)
            .map(|p| name_of(p.addr))
            .collect();
        if healthy != rotation {
            output.line(json!({"event": "rotation", "healthy": healthy}));
            rotation = healthy;
        }
        let key = (seq % 10).to_be_bytes();
        let started = Instant::now();
        match cluster.call_traced::<_, String>("whoami", &(), &CallOptions::new().key(&key)) {
            Ok(traced) => {
                ok += 1;
                if traced.attempts > 1 {
                    retried += 1;
                }
                *by_provider.entry(traced.value.clone()).or_default() += 1;
                output.line(json!({
                    "event": "call", "seq": seq, "provider": traced.value,
                    "addr": traced.provider.to_string(), "attempts": traced.attempts,
                    "rtt_us": started.elapsed().as_micros() as u64,
                }));
            }
            Err(e) => {
                failed += 1;
                output.line(json!({"event": "call_failed", "seq": seq, "error": e.to_string()}));
            }
        }
        seq += 1;
        if stop
            .recv_timeout(Duration::from_millis(o.interval_ms))
            .is_err_and(|e| e.is_disconnected())
        {
            output.line(json!({"event": "stopping"}));
            break;
        }
    }
    done.store(true, Ordering::Relaxed);
    let _ = printer.join();
    output.line(json!({
        "event": "summary", "calls": seq, "ok": ok, "failed": failed, "retried": retried,
        "by_provider": by_provider, "balancer": o.balancer,
    }));
    Ok(failed == 0)
}

fn event_json(event: &Event) -> serde_json::Value {
    let mut v = json!({"event": event.name(), "peer": event.peer().to_string()});
    match event {
        Event::HeartbeatMissed { missed, .. } => v["missed"] = json!(missed),
        Event::Disconnected { reason, .. } | Event::Refused { reason, .. } => {
            v["reason"] = json!(reason.as_str());
            if let Some(detail) = reason.detail() {
                v["detail"] = json!(detail);
            }
        }
        Event::Reconnecting { attempt, delay, .. } => {
            v["attempt"] = json!(attempt);
            v["delay_ms"] = json!(delay.as_millis() as u64);
        }
        Event::GaveUp { attempts, .. } => v["attempts"] = json!(attempts),
        _ => {}
    }
    v
}

fn cluster_event_json(event: &ClusterEvent) -> serde_json::Value {
    match event {
        ClusterEvent::ProviderAdded { addr, weight } => {
            json!({"event": "provider_added", "addr": addr.to_string(), "weight": weight})
        }
        ClusterEvent::ProviderRemoved { addr } => {
            json!({"event": "provider_removed", "addr": addr.to_string()})
        }
        ClusterEvent::Provider(event) => event_json(event),
        ClusterEvent::RegistryLost { error } => json!({"event": "registry_lost", "error": error}),
        ClusterEvent::RegistryResumed => json!({"event": "registry_resumed"}),
        ClusterEvent::EmptyListIgnored { kept } => {
            json!({"event": "empty_list_ignored", "kept": kept})
        }
        ClusterEvent::ProviderRejected { entry, reason } => {
            json!({"event": "provider_rejected", "entry": entry, "reason": reason})
        }
        other => json!({"event": "other", "detail": other.to_string()}),
    }
}

// ----- a proxy that can play dead ---------------------------------------------

/// A loopback TCP proxy in front of a provider. Blackholed, it reads and
/// discards every byte both ways and keeps the sockets open: to the consumer,
/// a provider that froze (or a network that silently drops packets).
struct Proxy {
    addr: SocketAddr,
    blackhole: Arc<AtomicBool>,
}

impl Proxy {
    fn start(target: SocketAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let blackhole = Arc::new(AtomicBool::new(false));
        let flag = blackhole.clone();
        // The threads end with the process (this is an example).
        std::thread::spawn(move || {
            for down in listener.incoming().flatten() {
                let Ok(up) = TcpStream::connect(target) else {
                    continue;
                };
                let _ = down.set_nodelay(true);
                let _ = up.set_nodelay(true);
                for (from, to) in [(&down, &up), (&up, &down)] {
                    let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else {
                        continue;
                    };
                    let flag = flag.clone();
                    std::thread::spawn(move || pump(from, to, &flag));
                }
            }
        });
        Ok(Proxy { addr, blackhole })
    }

    fn set_blackhole(&self, on: bool) {
        self.blackhole.store(on, Ordering::SeqCst);
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, blackhole: &AtomicBool) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if !blackhole.load(Ordering::SeqCst) && to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    // A closed end is passed on, unless blackholed: a network that drops
    // packets does not carry FINs either.
    if !blackhole.load(Ordering::SeqCst) {
        let _ = from.shutdown(Shutdown::Both);
        let _ = to.shutdown(Shutdown::Both);
    }
}
