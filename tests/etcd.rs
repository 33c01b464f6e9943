//! `EtcdRegistry` against a real etcd server on loopback.
//!
//! Each test starts its own `etcd` on free ports with a fresh data directory
//! under cargo's test temp dir, and kills it when done (a `Drop` guard, so a
//! failing test leaves nothing behind). The `etcd` binary must be installed:
//! `scripts/etcd.sh install` (Debian's `etcd-server`) does it; without it
//! these tests fail and say so.
//!
//! Providers whose death or freeze is tested run in a child process (this
//! test binary re-run as `child_provider`), so "killed" is a real SIGKILL and
//! "frozen" a real SIGSTOP: etcd only learns of either when the lease (TTL
//! 2 s) is no longer renewed.

mod cluster_support;
mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use cluster_support::*;
use pulse::Error;
use pulse::cluster::{
    ClusterClient, ClusterConfig, ClusterEvent, Endpoint, EtcdConfig, EtcdRegistry, Registry,
    RoundRobin, ServiceKey,
};
use support::{PROMPTLY, ms};

/// The lease TTL providers register with.
const TTL: Duration = Duration::from_secs(2);

/// Where etcd can be found.
fn etcd_binary() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("etcd"))
            .find(|p| p.is_file())
    });
    match on_path.or_else(|| Some(PathBuf::from("/usr/bin/etcd")).filter(|p| p.is_file())) {
        Some(path) => path,
        None => panic!(
            "etcd is not installed, and these tests need a real etcd server: run \
             `scripts/etcd.sh install` (installs Debian's etcd-server) and run them again"
        ),
    }
}

/// A free loopback port, held by a socket bound to it but not listening:
/// no other bind, and no outgoing connection's ephemeral port, takes it
/// until the socket is dropped, and a connect to it is refused, as to a
/// port nothing holds. An etcd started later (a test that starts its
/// clients first) binds it once the socket is dropped; before, another
/// process could take the port meanwhile and etcd exited at startup.
fn reserved_port() -> (u16, socket2::Socket) {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("a socket");
    let any: SocketAddr = "127.0.0.1:0".parse().expect("an address");
    socket.bind(&any.into()).expect("bind a free port");
    let port = socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .expect("the bound address")
        .port();
    (port, socket)
}

/// The advertised peer URL and cluster token that give a member the ID
/// 11120345140604716997, at or above 2^63.
///
/// etcd derives a first member's ID from these alone (`computeMemberId`:
/// the first 8 bytes, big-endian, of SHA-1 over the sorted advertised peer
/// URLs followed by `--initial-cluster-token`), so the ID is the same on
/// every run. The member listens for peers on a free port as usual; the
/// advertised URL is only a name here, as a single member never dials its
/// own peer URL.
const HIGH_ID_PEER_URL: &str = "http://127.0.0.1:1";
const HIGH_ID_TOKEN: &str = "pulse-high-id";

/// A private etcd process: started on free ports, killed on drop.
struct Etcd {
    child: Option<Child>,
    client_port: u16,
    peer_port: u16,
    /// The sockets holding the client and peer ports until the first
    /// [`spawn`](Self::spawn) (see [`reserved_port`]).
    reserved: Vec<socket2::Socket>,
    /// Advertise [`HIGH_ID_PEER_URL`] with [`HIGH_ID_TOKEN`] (a member ID
    /// at or above 2^63) instead of the listened peer URL with the default
    /// token (an ID that depends on the free port chosen).
    high_member_id: bool,
    dir: PathBuf,
}

impl Etcd {
    /// Starts etcd and waits until it answers.
    fn start() -> Etcd {
        Etcd::start_with(false)
    }

    /// Starts an etcd whose member ID, and so its leader's, is at or above
    /// 2^63 (see [`HIGH_ID_PEER_URL`]).
    fn start_with_high_member_id() -> Etcd {
        Etcd::start_with(true)
    }

    fn start_with(high_member_id: bool) -> Etcd {
        let mut etcd = Etcd::unstarted(high_member_id);
        etcd.spawn();
        etcd
    }

    /// Ports and a fresh data directory for an etcd that [`Etcd::spawn`]
    /// starts later (none runs yet).
    fn unstarted(high_member_id: bool) -> Etcd {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "etcd-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the etcd test directory");
        let (client_port, client_hold) = reserved_port();
        let (peer_port, peer_hold) = reserved_port();
        Etcd {
            child: None,
            client_port,
            peer_port,
            reserved: vec![client_hold, peer_hold],
            high_member_id,
            dir,
        }
    }

    /// `host:port` of the client endpoint.
    fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// A registry client with quick retries.
    fn registry(&self) -> EtcdRegistry {
        EtcdRegistry::new(EtcdConfig {
            retry_max: Duration::from_millis(500),
            idle_check: Duration::from_secs(1),
            ..EtcdConfig::new([self.endpoint()])
        })
        .expect("registry config")
    }

    /// (Re)starts the process on the same ports and data directory.
    fn spawn(&mut self) {
        assert!(self.child.is_none(), "etcd is already running");
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let (advertised_peer, token) = if self.high_member_id {
            (HIGH_ID_PEER_URL.to_string(), HIGH_ID_TOKEN)
        } else {
            (peer.clone(), "etcd-cluster") // etcd's default token
        };
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("etcd.log"))
            .expect("open the etcd log");
        // The ports go to etcd now.
        self.reserved.clear();
        let child = Command::new(etcd_binary())
            .arg("--name=pulse-test")
            .arg(format!("--data-dir={}", self.dir.join("data").display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={advertised_peer}"))
            .arg(format!("--initial-cluster=pulse-test={advertised_peer}"))
            .arg(format!("--initial-cluster-token={token}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("start etcd");
        self.child = Some(child);
        let registry = self.registry();
        let started = Instant::now();
        while !registry.is_reachable() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                // The log goes with the directory when the test ends: quote it.
                let log = std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                panic!(
                    "etcd exited with {status} during startup (client port {}, peer port {}); \
                     the end of its log, last line first:\n{}",
                    self.client_port,
                    self.peer_port,
                    tail.join("\n")
                );
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "etcd did not answer within 30 s; see {}",
                self.dir.join("etcd.log").display()
            );
            std::thread::sleep(ms(50));
        }
    }

    /// The `leader` of the member's status (a uint64, as etcd's gateway
    /// sends it: a string of decimal digits), asked over plain HTTP so
    /// that the test does not rely on the parsing it checks.
    fn leader_id(&self) -> u64 {
        let mut stream = TcpStream::connect(self.endpoint()).expect("connect to etcd");
        stream
            .set_read_timeout(Some(PROMPTLY))
            .expect("set a read timeout");
        write!(
            stream,
            "POST /v3/maintenance/status HTTP/1.0\r\nHost: 127.0.0.1\r\n\
             Content-Length: 2\r\n\r\n{{}}"
        )
        .expect("send the status request");
        let mut reply = String::new();
        stream
            .read_to_string(&mut reply)
            .expect("read the status answer");
        let digits = reply
            .split_once(r#""leader":""#)
            .and_then(|(_, rest)| rest.split_once('"'))
            .map(|(digits, _)| digits)
            .unwrap_or_else(|| panic!("no leader in etcd's status: {reply}"));
        digits
            .parse()
            .unwrap_or_else(|e| panic!("leader {digits:?} is not a uint64: {e}"))
    }

    /// SIGKILLs the process.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn service() -> ServiceKey {
    ServiceKey::from(SERVICE)
}

/// A consumer of [`service`] following `registry`: round robin, with the
/// tests' client config.
fn follower(registry: &EtcdRegistry) -> ClusterClient {
    follower_with(registry, true)
}

/// [`follower`] with [`ClusterConfig::empty_protection`] as given.
fn follower_with(registry: &EtcdRegistry, empty_protection: bool) -> ClusterClient {
    let config = ClusterConfig {
        client: client_config(),
        empty_protection,
        ..ClusterConfig::default()
    };
    ClusterClient::new(registry, service(), RoundRobin::new(), config).expect("a cluster client")
}

fn listed(registry: &EtcdRegistry, addr: SocketAddr) -> bool {
    registry
        .list(&service())
        .expect("list")
        .iter()
        .any(|e| e.addr == addr)
}

/// A provider in a child process: this test binary running `child_provider`.
struct ChildProvider {
    child: Child,
    addr: SocketAddr,
}

impl ChildProvider {
    fn start(etcd: &Etcd) -> ChildProvider {
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "child_provider",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("PULSE_ETCD_CHILD", etcd.endpoint())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the child provider");
        let stdout = child.stdout.take().expect("child stdout");
        let (tx, rx) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // libtest may print "test child_provider ... " first.
                if let Some((_, addr)) = line.split_once("READY ") {
                    let _ = tx.send(addr.trim().to_string());
                }
            }
        });
        // Guarded from here on: a failure below kills and reaps the child.
        let mut provider = ChildProvider {
            child,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        };
        let ready = rx
            .recv_timeout(PROMPTLY)
            .unwrap_or_else(|_| panic!("the child provider did not register within {PROMPTLY:?}"));
        provider.addr = ready.parse().expect("the child's address");
        provider
    }

    /// Sends `signal` (e.g. `-STOP`); returns when it was sent.
    fn signal(&self, signal: &str) -> Instant {
        // The shell's builtin `kill`: no dependency on procps.
        let status = Command::new("sh")
            .arg("-c")
            .arg(format!("kill {signal} {}", self.child.id()))
            .status()
            .expect("run sh -c kill");
        assert!(status.success(), "kill {signal} failed");
        Instant::now()
    }
}

impl Drop for ChildProvider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Not a test: the provider process of [`ChildProvider`]. Run only when the
/// parent sets `PULSE_ETCD_CHILD`; serves, registers, prints `READY addr`,
/// then lives until killed (60 s at most).
#[test]
#[ignore = "helper process for the other tests"]
fn child_provider() {
    let Ok(endpoint) = std::env::var("PULSE_ETCD_CHILD") else {
        return;
    };
    init_log();
    let provider = Provider::start(7, 0);
    let registry = EtcdRegistry::from_url(&endpoint).expect("registry");
    let _registration = registry
        .register(&service(), Endpoint::new(provider.addr()), TTL)
        .expect("register in etcd");
    println!("READY {}", provider.addr());
    std::thread::sleep(Duration::from_secs(60));
}

#[test]
fn a_killed_provider_disappears_when_its_lease_expires() {
    let _serial = serial();
    let etcd = Etcd::start();
    let registry = etcd.registry();
    let provider = ChildProvider::start(&etcd);
    assert!(listed(&registry, provider.addr));

    let addr = provider.addr;
    drop(provider); // SIGKILL: no deregistration
    assert!(listed(&registry, addr), "gone at once: not a lease expiry");
    let gone_after = wait_until(Duration::from_secs(6), "the key expires", || {
        !listed(&registry, addr)
    });
    // Between TTL − TTL/3 (renewed just before the kill) and TTL plus etcd's
    // 500 ms expiry scan, plus margin: the lease, not a deregistration.
    assert!(
        gone_after >= Duration::from_millis(900),
        "gone after {gone_after:?}: too early for a lease expiry"
    );
    println!("killed provider gone after {gone_after:?}");
}

#[test]
fn a_frozen_provider_expires_and_registers_again_when_thawed() {
    let _serial = serial();
    let etcd = Etcd::start();
    let registry = etcd.registry();
    let provider = ChildProvider::start(&etcd);
    assert!(listed(&registry, provider.addr));
    // A consumer following etcd calls the child. Empty protection off: the
    // expired key is the only one, and this test is about the consumer
    // forgetting it (with protection, an empty list keeps it).
    let cluster = follower_with(&registry, false);
    assert_eq!(cluster.call::<_, u32>("whoami", &()).unwrap(), 7);

    let frozen_at = provider.signal("-STOP");
    // The consumer stops using it within the heartbeat bound (100 ms × 3,
    // plus margin), long before etcd notices ...
    let left_after = wait_until(PROMPTLY, "the frozen provider leaves rotation", || {
        cluster.providers().iter().all(|p| !p.healthy)
    });
    assert!(
        left_after < Duration::from_millis(1_300),
        "left rotation after {left_after:?}"
    );
    // ... and etcd drops its key when its lease expires: the consumer
    // forgets it.
    wait_until(
        Duration::from_secs(6),
        "the frozen provider's key expires",
        || !listed(&registry, provider.addr),
    );
    let gone_after = frozen_at.elapsed();
    assert!(
        gone_after >= Duration::from_millis(900),
        "gone after {gone_after:?}: too early for a lease expiry"
    );
    // The heartbeats, not the registry, took it out of rotation.
    assert!(
        left_after < gone_after,
        "left rotation after {left_after:?}, its key gone after {gone_after:?}"
    );
    wait_until(
        PROMPTLY,
        "the consumer forgets the expired provider",
        || cluster.providers().is_empty(),
    );
    let forgotten_after = frozen_at.elapsed();

    // Thawed, its keep-alive finds the lease gone, grants a new one and
    // registers again; the consumer takes it back.
    provider.signal("-CONT");
    let back_after = wait_until(
        Duration::from_secs(6),
        "the thawed provider registers again",
        || listed(&registry, provider.addr),
    );
    assert!(cluster.wait_ready(1, PROMPTLY), "{:?}", cluster.providers());
    assert_eq!(cluster.call::<_, u32>("whoami", &()).unwrap(), 7);
    println!(
        "frozen provider out of rotation after {left_after:?}, key gone after {gone_after:?}, \
         forgotten by the consumer after {forgotten_after:?}, back {back_after:?} after the thaw"
    );
}

#[test]
fn a_consumer_sees_providers_join_within_a_second_and_leave() {
    let _serial = serial();
    let etcd = Etcd::start();
    let registry = etcd.registry();
    let first = Provider::start(0, 0);
    let _first_registration = registry
        .register(&service(), Endpoint::new(first.addr()), TTL)
        .unwrap();
    let cluster = follower(&registry);
    assert_eq!(cluster.call::<_, u32>("whoami", &()).unwrap(), 0);

    let second = Provider::start(1, 0);
    let registered_at = Instant::now();
    let registration = registry
        .register(&service(), Endpoint::weighted(second.addr(), 7), TTL)
        .unwrap();
    wait_until(PROMPTLY, "the consumer sees the new provider", || {
        cluster.providers().iter().any(|p| p.addr == second.addr())
    });
    let seen_after = registered_at.elapsed();
    assert!(
        seen_after < Duration::from_secs(1),
        "seen after {seen_after:?}"
    );
    assert_eq!(
        cluster
            .providers()
            .iter()
            .find(|p| p.addr == second.addr())
            .unwrap()
            .weight,
        7
    );
    assert!(cluster.wait_ready(2, PROMPTLY));
    let ids: Vec<u32> = (0..4)
        .map(|_| cluster.call("whoami", &()).unwrap())
        .collect();
    assert!(ids.contains(&1), "{ids:?}");

    let deregistered_at = Instant::now();
    registration.deregister().unwrap();
    wait_until(PROMPTLY, "the consumer drops the provider", || {
        cluster.providers().len() == 1
    });
    let dropped_after = deregistered_at.elapsed();
    assert!(
        dropped_after < Duration::from_secs(1),
        "dropped after {dropped_after:?}"
    );
    println!(
        "new provider seen after {seen_after:?}, deregistered one dropped after {dropped_after:?}"
    );
}

#[test]
fn consumers_keep_their_providers_while_etcd_is_down_and_resume_watching() {
    let _serial = serial();
    let mut etcd = Etcd::start();
    let registry = etcd.registry();
    let first = Provider::start(0, 0);
    let _first_registration = registry
        .register(&service(), Endpoint::new(first.addr()), TTL)
        .unwrap();
    let cluster = follower(&registry);
    let events = cluster.events();
    assert_eq!(cluster.call::<_, u32>("whoami", &()).unwrap(), 0);

    let mark = log_mark();
    etcd.kill();
    wait_cluster_event(&events, "RegistryLost event", |e| {
        matches!(e, ClusterEvent::RegistryLost { .. })
    });
    // And says so in the log (the consumer logs before it reports the event).
    assert!(
        logged_since(mark, log::Level::Warn, "registry unreachable")
            && logged_since(mark, log::Level::Warn, "keeping the 1 known provider(s)"),
        "no warning logged for the lost registry"
    );
    // Longer than the lease TTL: the consumer keeps calling the provider it
    // knows.
    let outage_started = Instant::now();
    let mut calls = 0;
    while outage_started.elapsed() < TTL + Duration::from_millis(500) {
        let id: u32 = cluster
            .call("whoami", &())
            .expect("calls go on while etcd is down");
        assert_eq!(id, 0);
        calls += 1;
        std::thread::sleep(ms(10));
    }
    assert_eq!(cluster.providers().len(), 1);

    let mark = log_mark();
    etcd.spawn();
    wait_cluster_event(&events, "RegistryResumed event after etcd's restart", |e| {
        matches!(e, ClusterEvent::RegistryResumed)
    });
    let resumed_after = outage_started.elapsed();
    assert!(
        logged_since(mark, log::Level::Info, "registry reachable again"),
        "the registry's return is not logged"
    );
    // The provider's lease survived the restart (etcd renews leases when it
    // comes back) or was granted again: it is still listed.
    assert!(listed(&registry, first.addr()));
    assert_eq!(cluster.providers().len(), 1);

    // The watch runs again: a provider added now is seen.
    let second = Provider::start(1, 0);
    let registered_at = Instant::now();
    let _second_registration = registry
        .register(&service(), Endpoint::new(second.addr()), TTL)
        .unwrap();
    wait_until(
        PROMPTLY,
        "the consumer sees the provider added after the restart",
        || cluster.providers().iter().any(|p| p.addr == second.addr()),
    );
    let seen_after = registered_at.elapsed();
    assert!(
        seen_after < Duration::from_secs(1),
        "seen after {seen_after:?}"
    );
    assert!(cluster.wait_ready(2, PROMPTLY));
    let ids: Vec<u32> = (0..4)
        .map(|_| cluster.call("whoami", &()).unwrap())
        .collect();
    assert!(ids.contains(&1), "{ids:?}");
    println!(
        "{calls} calls during the outage, all served; watch resumed {resumed_after:?} after the kill; \
         new provider seen after {seen_after:?}"
    );
}

/// A registration replaced by a newer one of the same address (a weight
/// change; a provider restarted on its port while the old one drained)
/// leaves the newer one listed when it is dropped. Before, the old one's
/// deregistration deleted the key, and the newer one stayed unlisted for
/// good while its keep-alive renewed a lease without a key.
#[test]
fn deregistering_a_replaced_registration_leaves_its_successor_listed() {
    let _serial = serial();
    let etcd = Etcd::start();
    let registry = etcd.registry();
    let addr: SocketAddr = "127.0.0.1:7700".parse().unwrap();
    let old = registry
        .register(&service(), Endpoint::weighted(addr, 100), TTL)
        .unwrap();
    let new = registry
        .register(&service(), Endpoint::weighted(addr, 50), TTL)
        .unwrap();
    old.deregister().unwrap();
    assert_eq!(
        registry.list(&service()).unwrap(),
        [Endpoint::weighted(addr, 50)]
    );
    // Still there after the old lease's TTL: the newer one's own lease
    // holds it.
    std::thread::sleep(TTL + Duration::from_millis(500));
    assert!(listed(&registry, addr), "the newer registration expired");
    new.deregister().unwrap();
    assert!(!listed(&registry, addr), "deregistered, still listed");
}

/// Empty protection against a real registry: the only provider's key
/// expires (its registration abandoned: nothing renews the lease, as when
/// etcd was cut off from it past the TTL) though the provider serves on.
/// The consumer, with the default config, keeps it and goes on calling it;
/// when the provider registers again, the set follows etcd as before.
#[test]
fn an_expired_last_key_leaves_the_consumer_its_provider() {
    let _serial = serial();
    let etcd = Etcd::start();
    let registry = etcd.registry();
    let provider = Provider::start(0, 0);
    let registration = registry
        .register(&service(), Endpoint::new(provider.addr()), TTL)
        .unwrap();
    let cluster = follower(&registry);
    let events = cluster.events();
    assert_eq!(cluster.call::<_, u32>("whoami", &()).unwrap(), 0);

    let mark = log_mark();
    registration.abandon();
    wait_until(Duration::from_secs(6), "the key expires", || {
        !listed(&registry, provider.addr())
    });
    wait_cluster_event(&events, "EmptyListIgnored", |e| {
        matches!(e, ClusterEvent::EmptyListIgnored { kept: 1 })
    });
    assert!(
        logged_since(mark, log::Level::Warn, "empty protection"),
        "no warning logged for the ignored empty list"
    );
    for _ in 0..5 {
        let id: u32 = cluster
            .call("whoami", &())
            .expect("calls go on with the key expired");
        assert_eq!(id, 0);
    }
    assert_eq!(cluster.providers().len(), 1);

    // Registered again (weight 7): followed as usual.
    let _again = registry
        .register(&service(), Endpoint::weighted(provider.addr(), 7), TTL)
        .unwrap();
    wait_until(
        PROMPTLY,
        "the consumer follows the new registration",
        || cluster.providers().iter().any(|p| p.weight == 7),
    );
    assert_eq!(cluster.call::<_, u32>("whoami", &()).unwrap(), 0);
}

/// A healthy etcd whose leader's member ID is at or above 2^63 (a uint64
/// past `i64::MAX`, as about half of all member IDs are) keeps a quiet
/// watch going: each idle check's status probe finds the leader. Before,
/// the probe read `leader` as an int64, took the member for leaderless,
/// and every consumer reported the registry lost and resumed (and
/// re-listed) once per `idle_check`.
#[test]
fn a_leader_id_above_2_pow_63_keeps_a_quiet_watch_going() {
    let _serial = serial();
    let etcd = Etcd::start_with_high_member_id();
    let leader = etcd.leader_id();
    assert!(leader >= 1 << 63, "leader {leader} is below 2^63");
    let registry = etcd.registry();
    let cluster = follower(&registry);
    let events = cluster.events();
    let mark = log_mark();
    // Nothing changes in the service: the stream stays silent, and the
    // member holding it is probed once per idle_check (1 s here).
    let until = Instant::now() + 3 * registry.config().idle_check + Duration::from_millis(500);
    while let Ok(event) = events.recv_deadline(until) {
        assert!(
            !matches!(event, ClusterEvent::RegistryLost { .. }),
            "a healthy etcd led by {leader} reported lost: {event:?}"
        );
    }
    assert!(
        !logged_since(mark, log::Level::Warn, "registry unreachable"),
        "a healthy etcd led by {leader} logged as unreachable"
    );
}

/// By default (`EtcdConfig::fail_fast`), with etcd down, `register` and
/// `ClusterClient::new` fail at once with etcd's error: the program learns
/// at startup that it is not registered or not following anything.
#[test]
fn by_default_register_and_a_cluster_client_fail_at_once_while_etcd_is_down() {
    let _serial = serial();
    let etcd = Etcd::unstarted(false); // never started
    let registry = etcd.registry();
    assert!(registry.config().fail_fast, "fail_fast is not the default");
    let provider = Provider::start(0, 0);
    let started = Instant::now();
    let err = registry
        .register(&service(), Endpoint::new(provider.addr()), TTL)
        .unwrap_err();
    assert!(err.to_string().contains("cannot connect"), "{err}");
    let config = ClusterConfig {
        client: client_config(),
        ..ClusterConfig::default()
    };
    let err = ClusterClient::new(&registry, service(), RoundRobin::new(), config).unwrap_err();
    assert!(err.to_string().contains("cannot connect"), "{err}");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "failed after {took:?}");
}

/// With `fail_fast` off, a provider and a consumer started while etcd is
/// down start anyway and do their work once etcd answers: the provider's
/// key is put by its keep-alive thread, which then keeps the lease alive;
/// the consumer reports `RegistryLost`, fails calls with a `NoProvider`
/// that says the registry is unreachable, then follows the registry
/// (`RegistryResumed`) and calls the provider. A registration deregistered
/// before etcd answered registers nothing.
#[test]
fn with_fail_fast_off_a_provider_and_consumer_started_before_etcd_work_once_it_answers() {
    let _serial = serial();
    let mut etcd = Etcd::unstarted(false);
    let registry = EtcdRegistry::new(EtcdConfig {
        fail_fast: false,
        ..etcd.registry().config().clone()
    })
    .expect("registry config");
    let provider = Provider::start(0, 0);
    let given_up = Provider::start(1, 0);

    let mark = log_mark();
    let registration = registry
        .register(&service(), Endpoint::new(provider.addr()), TTL)
        .expect("registration starts in the background");
    assert!(
        logged_since(mark, log::Level::Warn, "registering it in the background"),
        "no warning that the registration waits for etcd"
    );
    registry
        .register(&service(), Endpoint::new(given_up.addr()), TTL)
        .expect("registration starts in the background")
        .deregister()
        .expect("nothing to deregister");
    // Empty protection off: the deregistration below must be followed.
    let cluster = follower_with(&registry, false);
    let events = cluster.events();
    wait_cluster_event(&events, "RegistryLost at startup", |e| {
        matches!(e, ClusterEvent::RegistryLost { .. })
    });
    match cluster.call::<_, u32>("whoami", &()) {
        Err(Error::NoProvider { detail, .. }) => {
            assert!(detail.contains("unreachable"), "{detail}")
        }
        other => panic!("{other:?}"),
    }

    etcd.spawn();
    let registered_after = wait_until(
        Duration::from_secs(6),
        "the provider registers once etcd answers",
        || listed(&registry, provider.addr()),
    );
    wait_cluster_event(&events, "RegistryResumed", |e| {
        matches!(e, ClusterEvent::RegistryResumed)
    });
    assert!(cluster.wait_ready(1, PROMPTLY), "{:?}", cluster.providers());
    assert_eq!(cluster.call::<_, u32>("whoami", &()).unwrap(), 0);
    // Its lease is kept alive past its TTL, and the one deregistered
    // before etcd answered never appeared.
    std::thread::sleep(TTL + Duration::from_millis(500));
    assert!(listed(&registry, provider.addr()), "its lease expired");
    assert!(!listed(&registry, given_up.addr()), "deregistered, listed");
    assert_eq!(cluster.providers().len(), 1, "{:?}", cluster.providers());

    registration.deregister().expect("deregister");
    wait_until(PROMPTLY, "the consumer drops the provider", || {
        cluster.providers().is_empty()
    });
    println!("registered {registered_after:?} after etcd was started");
}
