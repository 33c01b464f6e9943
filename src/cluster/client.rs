//! The consumer of many providers: one kept-alive connection each, a load
//! balancer, failover for idempotent calls.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Select, Sender, TrySendError};
use parking_lot::{Condvar, Mutex, RwLock};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::balance::{Candidate, LoadBalancer};
use super::registry::{Endpoint, Registry, ServiceKey, Watch, WatchEvent};
use crate::client::{Client, ClientRuntime, Closing, ConnectionState};
use crate::clock;
use crate::config::ClientConfig;
use crate::error::{Error, Result};
use crate::event::{Event, EventHook};

/// Configuration of a [`ClusterClient`].
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// The configuration of each provider's [`Client`]: heartbeat,
    /// reconnect backoff, default call timeout (for the whole call, retries
    /// included).
    pub client: ClientConfig,
    /// How many other providers a call may be sent to after the first
    /// failed it: any call whose request was never sent (the provider was
    /// not connected by then) or was refused before it ran (`ShuttingDown`,
    /// `Overloaded`), and an idempotent call whose connection died under it
    /// (`ConnectionLost`). See the failover rules on [`ClusterClient`].
    /// Default 2.
    pub retries: u32,
    /// Methods that are safe to run twice (reads, puts of the same value):
    /// calls to them are retried on failover unless
    /// [`CallOptions::idempotent`] says otherwise. Default empty: nothing is
    /// retried unless a call asks for it.
    pub idempotent_methods: HashSet<String>,
    /// How long [`ClusterClient::new`] waits for a first healthy provider
    /// when the registry lists some. It stops waiting earlier once every
    /// listed provider has given up reconnecting (a finite
    /// `BackoffConfig::max_attempts`): none can become healthy then. It
    /// never fails for want of one; calls do, fast. Default 3 s.
    pub ready_timeout: Duration,
    /// A connected provider leaves rotation once its connection reports
    /// this many missed heartbeat intervals (`HeartbeatMissed { missed }`),
    /// and returns after an interval and a half without another miss (or
    /// when its connection is declared dead and re-established). Skipped
    /// providers are still used when no other is healthy. 0 turns it off
    /// (only connections declared dead are skipped).
    ///
    /// Default 2. Not 1: on an idle connection the only bytes are heartbeats,
    /// which arrive once per interval, so a pong a few milliseconds later
    /// than the one before already counts as one missed interval (a busy
    /// machine does that). Two mean a whole interval passed in which a ping
    /// round trip should have completed and did not; with the default
    /// `max_missed` of 3 that is an interval before the connection is
    /// declared dead.
    pub suspect_after_missed: u32,
    /// Empty protection (Dubbo's `enable-empty-protection`): when the
    /// registry suddenly lists no provider at all while some are known,
    /// keep the known ones (logged as a warning, and
    /// [`ClusterEvent::EmptyListIgnored`]) until it lists at least one
    /// again, then follow it as usual. An empty list is more often the
    /// registry's trouble than every provider leaving at once: etcd paused
    /// or cut off for longer than the lease TTL expires every key together,
    /// though the providers are serving. Without it, every call would fail
    /// with `NoProvider` until they registered again, over connections
    /// that were healthy. Kept providers are still watched by their
    /// heartbeats: one that is really gone leaves rotation as any other.
    ///
    /// Default true. Turn it off when an empty list must be obeyed (a
    /// service deliberately emptied to stop its consumers' calls).
    pub empty_protection: bool,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            client: ClientConfig::default(),
            retries: 2,
            idempotent_methods: HashSet::new(),
            ready_timeout: Duration::from_secs(3),
            suspect_after_missed: 2,
            empty_protection: true,
        }
    }
}

impl ClusterConfig {
    /// Checks every field (the client's too); the error names the field
    /// and the allowed range.
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.client.validate()
    }

    /// Marks `methods` as idempotent (builder style).
    pub fn idempotent<I, S>(mut self, methods: I) -> ClusterConfig
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.idempotent_methods
            .extend(methods.into_iter().map(Into::into));
        self
    }
}

/// Per-call settings for [`ClusterClient::call_with`] and
/// [`ClusterClient::send_one_way_with`].
#[derive(Debug, Clone, Copy, Default)]
pub struct CallOptions<'a> {
    /// The key a [`ConsistentHash`](super::ConsistentHash) balancer hashes
    /// (other balancers ignore it).
    pub key: Option<&'a [u8]>,
    /// Overrides [`ClusterConfig::idempotent_methods`] for this call.
    pub idempotent: Option<bool>,
    /// Overrides the call timeout (the budget of every attempt together).
    pub timeout: Option<Duration>,
}

impl<'a> CallOptions<'a> {
    /// No key, the configured idempotency and timeout.
    pub fn new() -> CallOptions<'a> {
        CallOptions::default()
    }

    /// Sets the consistent-hash key.
    pub fn key(mut self, key: &'a [u8]) -> CallOptions<'a> {
        self.key = Some(key);
        self
    }

    /// Says whether this call may be retried on another provider.
    pub fn idempotent(mut self, idempotent: bool) -> CallOptions<'a> {
        self.idempotent = Some(idempotent);
        self
    }

    /// Sets the timeout of the whole call.
    pub fn timeout(mut self, timeout: Duration) -> CallOptions<'a> {
        self.timeout = Some(timeout);
        self
    }
}

/// A result with where it came from ([`ClusterClient::call_traced`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Traced<R> {
    /// The result.
    pub value: R,
    /// The provider that answered.
    pub provider: SocketAddr,
    /// Providers tried, this one included (1 when no failover happened).
    pub attempts: u32,
}

/// One provider as the cluster client sees it ([`ClusterClient::providers`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderInfo {
    /// Its address.
    pub addr: SocketAddr,
    /// Its weight from the registry.
    pub weight: u32,
    /// Its connection's state.
    pub state: ConnectionState,
    /// In rotation: connected and no heartbeat missed lately.
    pub healthy: bool,
    /// Smoothed heartbeat RTT, once measured.
    pub rtt: Option<Duration>,
    /// Calls waiting for its response.
    pub inflight: usize,
}

/// What changed in a cluster client's view ([`ClusterClient::events`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClusterEvent {
    /// The registry listed a new provider; its connection is being opened.
    ProviderAdded {
        /// Its address.
        addr: SocketAddr,
        /// Its weight.
        weight: u32,
    },
    /// The registry no longer lists this provider; its connection is closed.
    ProviderRemoved {
        /// Its address.
        addr: SocketAddr,
    },
    /// A liveness event of one provider's connection (connected, heartbeat
    /// missed, disconnected, reconnecting).
    Provider(Event),
    /// The registry cannot be reached; the last known providers stay in use.
    RegistryLost {
        /// What failed.
        error: String,
    },
    /// The registry is reachable again and the provider set is current.
    RegistryResumed,
    /// The registry listed no provider of the service, and
    /// [`ClusterConfig::empty_protection`] kept the known ones instead of
    /// dropping them all; they stay until the registry lists one again.
    EmptyListIgnored {
        /// How many providers were kept.
        kept: usize,
    },
    /// The registry lists an entry this client cannot use, and leaves it
    /// out: an address no connection can be opened to (port 0), or an
    /// entry that is no endpoint at all (an etcd value that does not
    /// parse). Reported (and logged as a warning) once per entry, when it
    /// appears or changes, not at each refresh of the provider set.
    ProviderRejected {
        /// The entry: the address, or the registry's key for it.
        entry: String,
        /// Why it cannot be used.
        reason: String,
    },
}

impl fmt::Display for ClusterEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClusterEvent::ProviderAdded { addr, weight } => {
                write!(f, "provider {addr} added (weight {weight})")
            }
            ClusterEvent::ProviderRemoved { addr } => write!(f, "provider {addr} removed"),
            ClusterEvent::Provider(event) => event.fmt(f),
            ClusterEvent::RegistryLost { error } => write!(f, "registry lost: {error}"),
            ClusterEvent::RegistryResumed => f.write_str("registry resumed"),
            ClusterEvent::EmptyListIgnored { kept } => write!(
                f,
                "the registry lists no provider: {kept} known provider(s) kept \
                 (empty protection)"
            ),
            ClusterEvent::ProviderRejected { entry, reason } => {
                write!(f, "registry entry {entry} rejected: {reason}")
            }
        }
    }
}

struct Provider {
    addr: SocketAddr,
    weight: AtomicU32,
    client: Client,
    /// While `now_nanos()` is below this, a heartbeat was missed and the
    /// provider is out of rotation (unless no other is healthy). Shared
    /// with the hook that takes the client's events.
    suspect_until: Arc<AtomicU64>,
}

/// Nanoseconds since a process-wide origin (for atomics).
fn now_nanos() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

struct Shared {
    service: ServiceKey,
    config: ClusterConfig,
    balancer: Box<dyn LoadBalancer>,
    providers: RwLock<Arc<Vec<Arc<Provider>>>>,
    /// The listed endpoints that got no `Client` in the last set applied,
    /// with why: each is reported once, when it appears in the set, and
    /// named in the `NoProvider` of a call that finds no provider.
    rejected: Mutex<BTreeMap<SocketAddr, String>>,
    /// Why the registry cannot be reached, from its last `RegistryLost`
    /// until its `RegistryResumed`: named in the `NoProvider` of a call
    /// that finds no provider (a consumer started while etcd was down
    /// knows none, and "the registry lists none" would be untrue).
    registry_lost: Mutex<Option<String>>,
    /// The loops and timer every provider's client runs on (the runtime
    /// shared by clients with `config.client`'s loop settings, which each
    /// provider's client finds itself): held so that they keep running
    /// while the cluster has no provider.
    _runtime: Arc<ClientRuntime>,
    events_tx: Sender<ClusterEvent>,
    events_rx: Receiver<ClusterEvent>,
    /// A provider connected: the updater thread then notifies `ready`
    /// (the providers' hooks cannot take `ready_lock` themselves: they may
    /// run under a client's state lock, which `wait_ready` takes under
    /// `ready_lock`).
    connected_tx: Sender<()>,
    /// Notified when a provider connects (for `wait_ready`).
    ready_lock: Mutex<()>,
    ready: Condvar,
    /// Set by [`ClusterClient::shutdown`], under the `providers` write lock,
    /// so that `apply` never publishes a provider it would miss.
    shut_down: AtomicBool,
}

impl Shared {
    /// A cluster's shared part with no providers yet, its providers' loops
    /// started; and the receiving end of its connect wake-ups (for the
    /// updater).
    fn new(
        service: ServiceKey,
        config: ClusterConfig,
        balancer: Box<dyn LoadBalancer>,
    ) -> Result<(Shared, Receiver<()>)> {
        let (events_tx, events_rx) =
            crossbeam_channel::bounded(config.client.connection.event_capacity);
        let (connected_tx, connected_rx) = crossbeam_channel::bounded(1);
        let runtime = ClientRuntime::shared(&config.client)?;
        let shared = Shared {
            _runtime: runtime,
            service,
            config,
            balancer,
            providers: RwLock::new(Arc::new(Vec::new())),
            rejected: Mutex::new(BTreeMap::new()),
            registry_lost: Mutex::new(None),
            events_tx,
            events_rx,
            connected_tx,
            ready_lock: Mutex::new(()),
            ready: Condvar::new(),
            shut_down: AtomicBool::new(false),
        };
        Ok((shared, connected_rx))
    }

    fn snapshot(&self) -> Arc<Vec<Arc<Provider>>> {
        self.providers.read().clone()
    }

    fn emit(&self, event: ClusterEvent) {
        emit_to(&self.events_tx, &self.service, event);
    }

    /// What a provider's client does with each of its events, on the thread
    /// that emits it (its loop, at times under the client's state lock; see
    /// `EventHook`): puts the provider out of rotation on missed heartbeats
    /// or back in, has the updater wake `wait_ready` on a connect, and
    /// publishes the event in the cluster's channel at once, so it keeps its
    /// place relative to the calls as a lone client's events do.
    fn provider_hook(&self, suspect_until: Arc<AtomicU64>) -> EventHook {
        let events_tx = self.events_tx.clone();
        let connected_tx = self.connected_tx.clone();
        let service = self.service.clone();
        let suspect_after = self.config.suspect_after_missed;
        let interval = self.config.client.connection.heartbeat.interval;
        Arc::new(move |event: Event| {
            match &event {
                Event::HeartbeatMissed { missed, .. }
                    if suspect_after > 0 && *missed >= suspect_after =>
                {
                    // Out of rotation until an interval and a half passes
                    // without another miss (or the connection is declared
                    // dead).
                    let until = now_nanos() + (interval + interval / 2).as_nanos() as u64;
                    suspect_until.store(until, Ordering::Relaxed);
                }
                Event::Connected { .. } => {
                    suspect_until.store(0, Ordering::Relaxed);
                    // Full: a wake-up is pending already.
                    let _ = connected_tx.try_send(());
                }
                Event::Disconnected { .. } => suspect_until.store(0, Ordering::Relaxed),
                _ => {}
            }
            emit_to(&events_tx, &service, ClusterEvent::Provider(event));
        })
    }

    fn healthy(p: &Provider, now: u64) -> bool {
        p.client.state() == ConnectionState::Ready && p.suspect_until.load(Ordering::Relaxed) <= now
    }

    /// Chooses among the healthy providers not in `exclude`; when none is
    /// healthy but some connected ones only missed a heartbeat, among those.
    fn choose(
        &self,
        providers: &[Arc<Provider>],
        exclude: &[SocketAddr],
        key: Option<&[u8]>,
    ) -> Option<Arc<Provider>> {
        let now = now_nanos();
        let mut healthy = Vec::with_capacity(providers.len());
        let mut suspects = Vec::new();
        for p in providers {
            if exclude.contains(&p.addr) || p.client.state() != ConnectionState::Ready {
                continue;
            }
            if p.suspect_until.load(Ordering::Relaxed) > now {
                suspects.push(p);
            } else {
                healthy.push(p);
            }
        }
        if healthy.is_empty() {
            healthy = suspects;
        }
        if healthy.is_empty() {
            return None;
        }
        let candidates: Vec<Candidate> = healthy
            .iter()
            .map(|p| Candidate {
                addr: p.addr,
                weight: p.weight.load(Ordering::Relaxed),
                inflight: p.client.inflight(),
                rtt: p.client.rtt(),
            })
            .collect();
        let i = self
            .balancer
            .pick(&candidates, key)
            .min(candidates.len() - 1);
        Some(healthy[i].clone())
    }

    /// What the client knows of its providers, for [`Error::NoProvider`].
    fn providers_detail(&self, providers: &[Arc<Provider>]) -> String {
        if providers.is_empty() {
            let rejected = self.rejected.lock();
            let mut detail = if rejected.is_empty() {
                "the registry lists none".to_string()
            } else {
                let why: Vec<String> = rejected
                    .iter()
                    .map(|(addr, reason)| format!("{addr}: {reason}"))
                    .collect();
                format!(
                    "the registry lists none that can be used ({} rejected: {})",
                    rejected.len(),
                    why.join("; ")
                )
            };
            if let Some(error) = &*self.registry_lost.lock() {
                detail = format!("{detail}, as far as known: it is unreachable ({error})");
            }
            return detail;
        }
        let (mut connecting, mut failed, mut other) = (0, 0, 0);
        for p in providers {
            match p.client.state() {
                ConnectionState::Connecting { .. } => connecting += 1,
                ConnectionState::Failed => failed += 1,
                _ => other += 1,
            }
        }
        format!(
            "{} known, {connecting} connecting, {failed} gave up reconnecting, \
             {other} tried already or shut down",
            providers.len()
        )
    }

    /// The error of a call that stops (`why`) with no provider having taken
    /// its request: the `ConnectionLost` of an attempt that may have run,
    /// if there was one (the caller must learn that it may have run);
    /// otherwise [`Error::NoProvider`], whose detail ends with the last
    /// refusal when there was one.
    fn untaken(
        &self,
        providers: &[Arc<Provider>],
        why: &str,
        refused: Option<(SocketAddr, Error)>,
        lost: Option<Error>,
    ) -> Error {
        if let Some(lost) = lost {
            return lost;
        }
        let mut detail = self.providers_detail(providers);
        if let Some((addr, e)) = refused {
            detail.push_str(&format!(
                "; {why}, and none took the request (last: {addr} {e})"
            ));
        }
        Error::NoProvider {
            service: self.service.to_string(),
            detail,
        }
    }

    /// Replaces the provider set: opens connections to new providers, drops
    /// those of removed ones. An empty set leaves the providers as they are
    /// under [`ClusterConfig::empty_protection`].
    fn apply(&self, set: Vec<Endpoint>) {
        let old = self.snapshot();
        if set.is_empty() && !old.is_empty() && self.config.empty_protection {
            // More likely the registry's trouble (every lease expired
            // together while it was unreachable) than every provider
            // leaving at once: the connections say which, so keep them.
            log::warn!(
                "cluster {}: the registry lists no provider; keeping the {} known \
                 provider(s) until it lists one again (empty protection)",
                self.service,
                old.len()
            );
            self.emit(ClusterEvent::EmptyListIgnored { kept: old.len() });
            return;
        }
        let mut next: Vec<Arc<Provider>> = Vec::with_capacity(set.len());
        let mut added = Vec::new();
        let mut rejected = BTreeMap::new();
        for e in set {
            if next.iter().any(|p| p.addr == e.addr) {
                continue;
            }
            if let Some(p) = old.iter().find(|p| p.addr == e.addr) {
                p.weight.store(e.weight, Ordering::Relaxed);
                next.push(p.clone());
                continue;
            }
            let suspect_until = Arc::new(AtomicU64::new(0));
            let hook = self.provider_hook(suspect_until.clone());
            let config = self.config.client.clone();
            match Client::unstarted_with_hook(e.addr, config, hook) {
                Ok(client) => {
                    let provider = Arc::new(Provider {
                        addr: e.addr,
                        weight: AtomicU32::new(e.weight),
                        client,
                        suspect_until,
                    });
                    next.push(provider.clone());
                    added.push((e, provider));
                }
                Err(err) => {
                    rejected.insert(e.addr, err.to_string());
                }
            }
        }
        let removed: Vec<Arc<Provider>> = old
            .iter()
            .filter(|p| !next.iter().any(|n| n.addr == p.addr))
            .cloned()
            .collect();
        {
            let mut providers = self.providers.write();
            if self.shut_down.load(Ordering::SeqCst) {
                // `ClusterClient::shutdown` came first: the clients opened
                // here close as `next` drops; nothing changed to announce.
                return;
            }
            *providers = Arc::new(next);
            // Announced before their clients start connecting, so a
            // provider's own events come after its `ProviderAdded`. Started
            // under the lock: a `shutdown` that comes next finds these
            // providers and its `RemoveLink` follows their `AddLink` on the
            // same loop; started after it, a link could be added behind its
            // `RemoveLink` and stay connected until the last clone drops.
            for (e, provider) in added {
                log::info!(
                    "cluster {}: provider {} added (weight {})",
                    self.service,
                    e.addr,
                    e.weight
                );
                self.emit(ClusterEvent::ProviderAdded {
                    addr: e.addr,
                    weight: e.weight,
                });
                provider.client.start_connecting();
            }
        }
        self.note_rejected(rejected);
        for p in removed {
            log::info!("cluster {}: provider {} removed", self.service, p.addr);
            self.emit(ClusterEvent::ProviderRemoved { addr: p.addr });
            // The connection closes when the last call using it returns,
            // on its event loop: whoever drops it last (this thread or a
            // caller's) does not wait for the close, which lingers up to
            // `linger` for a provider that does not close its side (a
            // wait here held the updater, and the next registry update,
            // for a linger per removed provider).
        }
    }

    /// Records the endpoints of the set just applied that got no `Client`,
    /// and reports each new one (or one whose reason changed): a warning
    /// and [`ClusterEvent::ProviderRejected`]. Once per entry, not per
    /// refresh: a registry re-sends its whole set at every change, and one
    /// bad entry must not repeat itself in the log for each of them. One
    /// that leaves the set and comes back is reported again.
    fn note_rejected(&self, now: BTreeMap<SocketAddr, String>) {
        let mut rejected = self.rejected.lock();
        for (addr, reason) in &now {
            if rejected.get(addr) == Some(reason) {
                continue;
            }
            log::warn!(
                "cluster {}: the registry lists {addr}, which cannot be used: {reason}",
                self.service
            );
            self.emit(ClusterEvent::ProviderRejected {
                entry: addr.to_string(),
                reason: reason.clone(),
            });
        }
        *rejected = now;
    }
}

struct Inner {
    shared: Arc<Shared>,
    /// Dropped to stop the updater thread (at `shutdown` or drop).
    stop: Mutex<Option<Sender<()>>>,
    updater: Option<JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        drop(self.stop.lock().take());
        if let Some(updater) = self.updater.take()
            && updater.join().is_err()
        {
            log::error!(
                "cluster {}: the updater thread panicked",
                self.shared.service
            );
        }
        // No clone is left, so no call is using a provider: close them all
        // now, at once, and wait (as a lone client's drop does) so that a
        // program that exits next does not lose the Closes. Their clients'
        // own drops then find nothing left to wait for.
        shut_down_all(&self.shared.snapshot());
    }
}

/// Shuts down every provider's [`Client`] and waits until their connections
/// are closed. Each close lingers up to `linger` for its provider's end, so
/// all are begun before any is waited for: about one linger in all, where
/// shutting them down one after another took a linger per provider.
fn shut_down_all(providers: &[Arc<Provider>]) {
    let closing: Vec<Closing> = providers
        .iter()
        .map(|p| p.client.begin_shutdown())
        .collect();
    for close in closing {
        close.wait();
    }
}

/// A consumer of every provider of one service.
///
/// It follows the registry's provider set without restarting, keeps one
/// multiplexed, heartbeated [`Client`] per provider, and sends each call to a
/// healthy one (connected, no heartbeat missed lately) chosen by its
/// [`LoadBalancer`]. A provider that freezes leaves rotation after
/// [`ClusterConfig::suspect_after_missed`] missed heartbeat intervals and is
/// declared dead within `max_missed × interval`; it comes back once its
/// connection is re-established.
///
/// # Failover
///
/// A call is sent to one provider at a time, never waiting for a provider's
/// connection: a provider that went to reconnecting between the balancer's
/// choice and the call is passed over at once. Up to
/// [`ClusterConfig::retries`] other providers are tried after the first,
/// all within the call's one timeout:
///
/// * **never sent** — the chosen provider's connection was not ready, or
///   died before the request was written to it: the request reached no
///   provider, so it goes to another one whatever the method;
/// * **refused** — the provider answered status `ShuttingDown` or
///   `Overloaded`, or this side refused it before writing it
///   ([`Error::Overloaded`]: too many calls in flight on that connection, or
///   its write queue full): the request did not run, so it goes to another
///   one whatever the method;
/// * **lost** — `ConnectionLost`: the connection died after the request was
///   written, so the provider may have run it. Only an idempotent call (its
///   method is in [`ClusterConfig::idempotent_methods`], or
///   [`CallOptions::idempotent`] says so) is sent to another provider;
///   any other returns the error.
///
/// Any other error (timeout, remote error, codec) is returned as it is.
/// One-way calls ([`send_one_way`](Self::send_one_way)) follow the same
/// rules, never retried once queued on a connection (nothing says whether
/// a lost one ran).
/// When no provider is healthy, a call fails at once with
/// [`Error::NoProvider`]; so does a call that every provider it tried
/// refused before running it, once no other healthy provider is left, the
/// retry budget is spent or its timeout ran out (the detail ends with the
/// last refusal). `NoProvider` thus always means that the request ran
/// nowhere; after a `ConnectionLost` of an idempotent call that no later
/// attempt made good, that `ConnectionLost` is returned instead.
///
/// Clones share everything. Dropping the last clone stops following the
/// registry and closes every connection (all at once, as
/// [`shutdown`](Self::shutdown) does).
///
/// ```
/// use pulse::cluster::{ClusterClient, ClusterConfig, Endpoint, RoundRobin, ServiceKey, StaticRegistry};
/// use pulse::{Server, ServiceBuilder};
///
/// let servers: Vec<Server> = (0..3u32)
///     .map(|id| {
///         Server::builder()
///             .service(ServiceBuilder::new("whoami").method_inline("id", move |_: ()| Ok::<_, String>(id)))
///             .bind("127.0.0.1:0")
///     })
///     .collect::<Result<_, _>>()?;
/// let service = ServiceKey::from("whoami");
/// let registry = StaticRegistry::new()
///     .with(service.clone(), servers.iter().map(|s| Endpoint::new(s.local_addr())));
/// let cluster = ClusterClient::new(&registry, service, RoundRobin::new(), ClusterConfig::default())?;
/// assert!(cluster.wait_ready(3, std::time::Duration::from_secs(5)));
/// let ids: Vec<u32> = (0..3).map(|_| cluster.call("id", &())).collect::<Result<_, _>>()?;
/// assert_eq!(ids.iter().copied().collect::<std::collections::BTreeSet<_>>().len(), 3);
/// # Ok::<(), pulse::Error>(())
/// ```
#[derive(Clone)]
pub struct ClusterClient {
    inner: Arc<Inner>,
}

impl ClusterClient {
    /// Follows `service` in `registry` and connects to its providers
    /// (lazily: a provider that is down is retried in the background). Waits
    /// up to [`ClusterConfig::ready_timeout`] for a first healthy provider
    /// when the registry lists any, and no longer once all of them have
    /// given up reconnecting (see [`wait_ready`](Self::wait_ready)).
    ///
    /// # Errors
    /// `InvalidConfig` for a bad configuration (see
    /// [`ClusterConfig::validate`]); the registry's error when it cannot be
    /// watched (an [`EtcdRegistry`](super::EtcdRegistry) that etcd does
    /// not answer, unless its `EtcdConfig::fail_fast` is off: the client
    /// then starts with no provider, reports
    /// [`ClusterEvent::RegistryLost`], and follows the registry once it
    /// answers); `Io` when the updater thread cannot start.
    pub fn new(
        registry: &dyn Registry,
        service: impl Into<ServiceKey>,
        balancer: impl LoadBalancer,
        config: ClusterConfig,
    ) -> Result<ClusterClient> {
        config.validate().map_err(Error::InvalidConfig)?;
        let service = service.into();
        let watch = registry.watch(&service)?;
        let ready_timeout = config.ready_timeout;
        let (shared, connected_rx) = Shared::new(service.clone(), config, Box::new(balancer))?;
        let shared = Arc::new(shared);
        // The first event of a watch is the current set.
        if let Some(WatchEvent::Providers(set)) = watch.recv_timeout(Duration::from_secs(10)) {
            shared.apply(set);
        }
        log::info!(
            "cluster {service}: following {} provider(s), balancer {}",
            shared.snapshot().len(),
            shared.balancer.name()
        );
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let updater = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("pulse-cluster-{}", service.name))
                .spawn(move || run_updater(&shared, watch, connected_rx, stop_rx))
                .map_err(|e| Error::io("spawn the cluster updater thread", e))?
        };
        let client = ClusterClient {
            inner: Arc::new(Inner {
                shared,
                stop: Mutex::new(Some(stop_tx)),
                updater: Some(updater),
            }),
        };
        if !client.inner.shared.snapshot().is_empty() {
            client.wait_ready(1, ready_timeout);
        }
        Ok(client)
    }

    /// Shuts the cluster client down for every clone: it stops following
    /// the registry, shuts down the [`Client`] of every provider
    /// ([`Client::shutdown`]: Close(Normal) to each, and the calls waiting
    /// on them fail at once with [`Error::Shutdown`]), and every later call
    /// fails with `Shutdown` too; [`wait_ready`](Self::wait_ready) returns
    /// false. Idempotent; the threads end when the last clone is dropped.
    ///
    /// Each provider's close lingers up to `ClientConfig::linger` for the
    /// provider to close its side; they are all begun before any is waited
    /// for, so this returns after about one linger (plus up to a second
    /// for a busy event loop to take the command), however many providers.
    pub fn shutdown(&self) {
        let shared = &self.inner.shared;
        let providers = {
            let providers = shared.providers.write();
            shared.shut_down.store(true, Ordering::SeqCst);
            providers.clone()
        };
        drop(self.inner.stop.lock().take());
        shut_down_all(&providers);
        let _guard = shared.ready_lock.lock();
        shared.ready.notify_all();
    }

    /// The service this client calls.
    pub fn service(&self) -> &ServiceKey {
        &self.inner.shared.service
    }

    /// Waits until at least `n` providers are healthy, up to `timeout`;
    /// returns whether they are.
    ///
    /// Returns false before `timeout` when the registry lists providers
    /// but fewer than `n` of them can still become healthy: the others
    /// gave up reconnecting ([`ConnectionState::Failed`], after
    /// `BackoffConfig::max_attempts` failed attempts), which they never
    /// undo by themselves. (A provider the registry lists later is not
    /// waited for then. With fewer than `n` listed and none given up, or
    /// none listed at all, it waits: the registry may list more, and a
    /// provider just listed may not be applied yet.)
    pub fn wait_ready(&self, n: usize, timeout: Duration) -> bool {
        let shared = &self.inner.shared;
        let deadline = clock::deadline_after(Instant::now(), timeout);
        let mut guard = shared.ready_lock.lock();
        loop {
            if shared.shut_down.load(Ordering::SeqCst) {
                return false;
            }
            let now = now_nanos();
            let providers = shared.snapshot();
            let healthy = providers.iter().filter(|p| Shared::healthy(p, now)).count();
            if healthy >= n {
                return true;
            }
            let can_recover = providers
                .iter()
                .filter(|p| {
                    !matches!(
                        p.client.state(),
                        ConnectionState::Failed | ConnectionState::Shutdown
                    )
                })
                .count();
            // Only when some gave up: a provider the registry listed a
            // moment ago may not be applied yet (right after a
            // `StaticRegistry::set`, say), and the set may still grow.
            // Counting the listed ones alone returned false at once there
            // (an outside audit: 20 times in 20).
            let gave_up = providers.len() - can_recover;
            if gave_up > 0 && can_recover < n {
                log::debug!(
                    "cluster {}: {} of {} provider(s) gave up reconnecting; not waiting \
                     for {n} to be healthy",
                    shared.service,
                    gave_up,
                    providers.len()
                );
                return false;
            }
            // Re-check at least every 10 ms: suspicion lapses without an event.
            let wake = deadline.min(Instant::now() + Duration::from_millis(10));
            shared.ready.wait_until(&mut guard, wake);
            if Instant::now() >= deadline {
                let now = now_nanos();
                return shared
                    .snapshot()
                    .iter()
                    .filter(|p| Shared::healthy(p, now))
                    .count()
                    >= n;
            }
        }
    }

    /// The providers known now, in the registry's order.
    pub fn providers(&self) -> Vec<ProviderInfo> {
        let now = now_nanos();
        self.inner
            .shared
            .snapshot()
            .iter()
            .map(|p| ProviderInfo {
                addr: p.addr,
                weight: p.weight.load(Ordering::Relaxed),
                state: p.client.state(),
                healthy: Shared::healthy(p, now),
                rtt: p.client.rtt(),
                inflight: p.client.inflight(),
            })
            .collect()
    }

    /// Provider changes, their liveness events and the registry's state.
    /// Clones of the receiver share one stream; events past the channel's
    /// capacity (the client config's `event_capacity`) are dropped. A
    /// provider's events are published as its [`Client`] emits them, with
    /// the same order guarantees as [`Client::events`]: its `Connected`
    /// before a call can go to it, its `Disconnected` before the calls lost
    /// with it fail, all after its `ProviderAdded`.
    pub fn events(&self) -> Receiver<ClusterEvent> {
        self.inner.shared.events_rx.clone()
    }

    /// Calls `method` on a healthy provider, with failover if the method is
    /// in [`ClusterConfig::idempotent_methods`].
    ///
    /// # Errors
    /// [`Error::NoProvider`] at once when no provider is healthy, or when
    /// none took the request (each tried one refused it before it ran);
    /// otherwise as [`Client::call`] on the provider that took the last
    /// attempt (`ConnectionLost` for a call that is not
    /// idempotent, `Timeout`, `Remote`, ...). See the failover rules on
    /// [`ClusterClient`].
    pub fn call<A, R>(&self, method: &str, args: &A) -> Result<R>
    where
        A: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        self.call_with(method, args, &CallOptions::new())
    }

    /// [`ClusterClient::call`] with an explicit timeout for the whole call.
    ///
    /// # Errors
    /// As [`ClusterClient::call`].
    pub fn call_timeout<A, R>(&self, method: &str, args: &A, timeout: Duration) -> Result<R>
    where
        A: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        self.call_with(method, args, &CallOptions::new().timeout(timeout))
    }

    /// [`ClusterClient::call`] with a hash key, an idempotency override or a
    /// timeout.
    ///
    /// # Errors
    /// As [`ClusterClient::call`].
    pub fn call_with<A, R>(&self, method: &str, args: &A, options: &CallOptions<'_>) -> Result<R>
    where
        A: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        self.call_traced(method, args, options).map(|t| t.value)
    }

    /// [`ClusterClient::call_with`], also saying which provider answered and
    /// after how many attempts.
    ///
    /// # Errors
    /// As [`ClusterClient::call`].
    pub fn call_traced<A, R>(
        &self,
        method: &str,
        args: &A,
        options: &CallOptions<'_>,
    ) -> Result<Traced<R>>
    where
        A: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let shared = &self.inner.shared;
        let idempotent = options
            .idempotent
            .unwrap_or_else(|| shared.config.idempotent_methods.contains(method));
        self.failover(method, options, idempotent, |client, left| {
            client.call_if_ready(shared.service.as_ref(), method, args, left)
        })
    }

    /// Sends a one-way call (no response, no result) to a healthy provider
    /// chosen by the balancer, passing over, as a call does, any that does
    /// not take it. Returns once it is queued on a provider's connection:
    /// delivery is at most once, as with [`Client::send_one_way`] (a call
    /// queued on a connection that then dies is lost, and never sent
    /// again).
    ///
    /// It never waits for a provider's connection: one that is not ready
    /// is passed over at once for the next, within
    /// [`ClusterConfig::retries`] and the call timeout. While the chosen
    /// provider's write queue is full (it takes calls slower than they
    /// come), it waits there for room up to the rest of the timeout, as
    /// [`Client::send_one_way`] does: a sender faster than its providers
    /// is slowed to their pace, and the balancer's choice holds (the
    /// one-way calls of one [`ConsistentHash`](super::ConsistentHash) key
    /// stay on their provider, in order).
    ///
    /// # Errors
    /// [`Error::NoProvider`] at once when no provider is healthy, or when
    /// none took the call (not connected by then, or its write queue stayed
    /// full for the rest of the timeout; the detail ends with the last
    /// refusal); `Codec` when `args` do not encode; `Shutdown` after
    /// [`shutdown`](Self::shutdown).
    pub fn send_one_way<A>(&self, method: &str, args: &A) -> Result<()>
    where
        A: Serialize + ?Sized,
    {
        self.send_one_way_with(method, args, &CallOptions::new())
    }

    /// [`ClusterClient::send_one_way`] with a hash key or a timeout
    /// ([`CallOptions::idempotent`] is ignored: a one-way call that was
    /// queued is never sent again).
    ///
    /// # Errors
    /// As [`ClusterClient::send_one_way`].
    pub fn send_one_way_with<A>(
        &self,
        method: &str,
        args: &A,
        options: &CallOptions<'_>,
    ) -> Result<()>
    where
        A: Serialize + ?Sized,
    {
        let service = self.inner.shared.service.as_ref();
        self.failover(method, options, false, |client, left| {
            client.send_one_way_if_ready(service, method, args, left)
        })
        .map(|_| ())
    }

    /// Sends `method` with `send` (given a provider's client and the time
    /// left) to one healthy provider after another, by the failover rules
    /// (see [`ClusterClient`]): on to the next one after a refusal before
    /// it ran, or after a `ConnectionLost` when `idempotent`.
    fn failover<T>(
        &self,
        method: &str,
        options: &CallOptions<'_>,
        idempotent: bool,
        mut send: impl FnMut(&Client, Duration) -> Result<T>,
    ) -> Result<Traced<T>> {
        let shared = &self.inner.shared;
        let started = Instant::now();
        let timeout = options.timeout.unwrap_or(shared.config.client.call_timeout);
        let deadline = clock::deadline_after(started, timeout);
        let retries = shared.config.retries as usize;
        let mut tried: Vec<SocketAddr> = Vec::new();
        // The last refusal of a request that did not run (not sent, or
        // refused before it ran), and the last `ConnectionLost` of an
        // idempotent call (it may have run): what the call ends with when
        // no provider takes it.
        let mut refused: Option<(SocketAddr, Error)> = None;
        let mut lost: Option<Error> = None;
        loop {
            if shared.shut_down.load(Ordering::SeqCst) {
                return Err(Error::Shutdown);
            }
            let providers = shared.snapshot();
            let Some(p) = shared.choose(&providers, &tried, options.key) else {
                return Err(shared.untaken(
                    &providers,
                    "no other provider is healthy",
                    refused,
                    lost,
                ));
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                if refused.is_none() && lost.is_none() {
                    return Err(Error::Timeout(timeout));
                }
                let why = format!("the call's timeout ({timeout:?}) ran out");
                return Err(shared.untaken(&providers, &why, refused, lost));
            }
            tried.push(p.addr);
            // Never waits for a connection: NotConnected means not sent.
            match send(&p.client, left) {
                Ok(value) => {
                    return Ok(Traced {
                        value,
                        provider: p.addr,
                        attempts: tried.len() as u32,
                    });
                }
                // Never written to any socket (`NotConnected`), refused
                // before it ran (the provider is shutting down or
                // overloaded), or refused here before it was written (too
                // many calls in flight on that connection, or its write
                // queue full): safe to send elsewhere, idempotent or not.
                Err(e) if e.refused_before_running() => {
                    log::info!(
                        "cluster {}: {} did not take {method} ({e}); it did not run",
                        shared.service,
                        p.addr
                    );
                    refused = Some((p.addr, e));
                }
                // Written, then the connection died: the provider may have
                // run it, so only idempotent calls go elsewhere.
                Err(e @ Error::ConnectionLost { .. }) if idempotent => {
                    log::warn!(
                        "cluster {}: {method} on {} failed ({e}); it may have run there",
                        shared.service,
                        p.addr,
                    );
                    lost = Some(e);
                }
                Err(e) => return Err(e),
            }
            if tried.len() > retries {
                let why = format!("{} provider(s) tried, the retry budget", tried.len());
                return Err(shared.untaken(&providers, &why, refused, lost));
            }
        }
    }
}

impl fmt::Debug for ClusterClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shared = &self.inner.shared;
        f.debug_struct("ClusterClient")
            .field("service", &shared.service)
            .field("balancer", &shared.balancer.name())
            .field("providers", &self.providers())
            .finish()
    }
}

/// Follows the watch, and wakes `wait_ready` when a provider connects,
/// until `stop` closes. (The providers' events reach the cluster's channel
/// through their hooks, not through this thread.)
fn run_updater(shared: &Shared, watch: Watch, connected: Receiver<()>, stop: Receiver<()>) {
    let mut watching = true;
    loop {
        let mut select = Select::new();
        let stop_index = select.recv(&stop);
        let connected_index = select.recv(&connected);
        let watch_index = if watching {
            select.recv(watch.receiver())
        } else {
            usize::MAX
        };
        let op = select.select();
        let index = op.index();
        if index == stop_index {
            let _ = op.recv(&stop);
            return;
        }
        if index == connected_index {
            if op.recv(&connected).is_ok() {
                let _guard = shared.ready_lock.lock();
                shared.ready.notify_all();
            }
            continue;
        }
        debug_assert_eq!(index, watch_index);
        match op.recv(watch.receiver()) {
            Ok(WatchEvent::Providers(set)) => shared.apply(set),
            Ok(WatchEvent::RegistryLost { error }) => {
                log::warn!(
                    "cluster {}: registry unreachable ({error}); keeping the {} known \
                     provider(s) until it returns",
                    shared.service,
                    shared.snapshot().len()
                );
                *shared.registry_lost.lock() = Some(error.clone());
                shared.emit(ClusterEvent::RegistryLost { error });
            }
            Ok(WatchEvent::RegistryResumed) => {
                *shared.registry_lost.lock() = None;
                log::info!("cluster {}: registry reachable again", shared.service);
                shared.emit(ClusterEvent::RegistryResumed);
            }
            // The registry logged it (once); the consumer's view says so.
            Ok(WatchEvent::Rejected { entry, reason }) => {
                shared.emit(ClusterEvent::ProviderRejected { entry, reason });
            }
            Err(_) => {
                log::warn!(
                    "cluster {}: the registry watch ended; keeping the current providers",
                    shared.service
                );
                watching = false;
            }
        }
    }
}

/// Offers `event` to a cluster's channel without blocking (a full channel
/// drops it, as a client's does).
fn emit_to(events: &Sender<ClusterEvent>, service: &ServiceKey, event: ClusterEvent) {
    if let Err(TrySendError::Full(event)) = events.try_send(event) {
        log::debug!("cluster {service}: event channel full, dropped: {event}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::balance::RoundRobin;
    use crate::event::DisconnectReason;

    /// A cluster's shared part with no providers and no updater, suspecting
    /// a provider from its second missed heartbeat; and the receiving end
    /// of its connect wake-ups.
    fn shared() -> (Shared, Receiver<()>) {
        let mut config = ClusterConfig {
            suspect_after_missed: 2,
            ..ClusterConfig::default()
        };
        config.client.event_loops = 1;
        Shared::new(ServiceKey::from("t"), config, Box::new(RoundRobin::new())).unwrap()
    }

    /// A cluster's configuration is checked with its providers' clients'
    /// (their shared `event_loops` included).
    #[test]
    fn a_cluster_config_is_checked_whole() {
        let mut config = ClusterConfig::default();
        assert_eq!(config.validate(), Ok(()));
        config.client.event_loops = 0;
        let err = config.validate().unwrap_err();
        assert!(err.contains("event_loops"), "{err}");
        config.client.event_loops = 1;
        config.client.call_timeout = Duration::ZERO;
        let err = config.validate().unwrap_err();
        assert!(err.contains("call_timeout"), "{err}");
    }

    /// The hook on a provider's client does everything on the emitting
    /// thread, before it returns: the event is in the cluster's channel,
    /// the provider's suspicion is set or cleared, a connect has queued a
    /// wake-up for `wait_ready`. (That is what keeps a cluster's events in
    /// order with its calls: the client emits under its state lock.)
    #[test]
    fn a_providers_events_are_published_and_acted_on_as_they_are_emitted() {
        let (shared, connected) = shared();
        let suspect_until = Arc::new(AtomicU64::new(0));
        let hook = shared.provider_hook(suspect_until.clone());
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let published = || shared.events_rx.try_recv().ok();

        hook(Event::HeartbeatMissed { peer, missed: 1 });
        assert_eq!(
            published(),
            Some(ClusterEvent::Provider(Event::HeartbeatMissed {
                peer,
                missed: 1
            }))
        );
        assert_eq!(
            suspect_until.load(Ordering::Relaxed),
            0,
            "suspected too early"
        );
        hook(Event::HeartbeatMissed { peer, missed: 2 });
        assert!(published().is_some());
        assert!(
            suspect_until.load(Ordering::Relaxed) > now_nanos(),
            "not suspected"
        );

        // Connects clear the suspicion; wake-ups do not pile up (the
        // channel holds one) and never block the emitting thread.
        for _ in 0..3 {
            hook(Event::Connected { peer });
            assert_eq!(
                published(),
                Some(ClusterEvent::Provider(Event::Connected { peer }))
            );
        }
        assert_eq!(suspect_until.load(Ordering::Relaxed), 0);
        assert!(connected.try_recv().is_ok(), "no wake-up for wait_ready");
        assert!(connected.try_recv().is_err());

        hook(Event::HeartbeatMissed { peer, missed: 2 });
        assert!(published().is_some());
        let reason = DisconnectReason::HeartbeatTimeout;
        hook(Event::Disconnected {
            peer,
            reason: reason.clone(),
        });
        assert_eq!(
            published(),
            Some(ClusterEvent::Provider(Event::Disconnected { peer, reason }))
        );
        assert_eq!(suspect_until.load(Ordering::Relaxed), 0);
        assert!(published().is_none());
    }
}
