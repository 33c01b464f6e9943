//! Service discovery: where providers announce themselves and consumers look.
//!
//! A [`Registry`] maps a service `(name, version, group)` to the set of its
//! providers' [`Endpoint`]s. Providers [`register`](Registry::register) with a
//! lease they keep alive (a registry-side heartbeat: a provider that dies or
//! freezes stops renewing and disappears when the lease expires); consumers
//! [`watch`](Registry::watch) and receive the whole provider set each time it
//! changes.
//!
//! Two implementations ship: [`StaticRegistry`] (in memory: a fixed list, or
//! whatever this process registers) and
//! [`EtcdRegistry`](super::EtcdRegistry) (etcd v3).

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;

use crate::client::ServiceRef;
use crate::error::{Error, Result};

/// The weight a provider gets when none is given (Dubbo's convention).
pub const DEFAULT_WEIGHT: u32 = 100;

/// A service's identity: `name`, `version`, `group` (the last two may be
/// empty), owned.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// The service name.
    pub name: String,
    /// The version ("" when unversioned).
    pub version: String,
    /// The group ("" when ungrouped).
    pub group: String,
}

impl ServiceKey {
    /// A key with all three parts.
    pub fn new(
        name: impl Into<String>,
        version: impl Into<String>,
        group: impl Into<String>,
    ) -> ServiceKey {
        ServiceKey {
            name: name.into(),
            version: version.into(),
            group: group.into(),
        }
    }

    /// The borrowed form [`crate::Client::call`] takes.
    pub fn as_ref(&self) -> ServiceRef<'_> {
        ServiceRef::new(&self.name, &self.version, &self.group)
    }
}

impl From<&str> for ServiceKey {
    fn from(name: &str) -> ServiceKey {
        ServiceKey::new(name, "", "")
    }
}

impl From<ServiceRef<'_>> for ServiceKey {
    fn from(s: ServiceRef<'_>) -> ServiceKey {
        ServiceKey::new(s.name, s.version, s.group)
    }
}

impl fmt::Display for ServiceKey {
    /// `name`, then `:version` and `@group` when not empty.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        if !self.version.is_empty() {
            write!(f, ":{}", self.version)?;
        }
        if !self.group.is_empty() {
            write!(f, "@{}", self.group)?;
        }
        Ok(())
    }
}

/// One provider of a service: where it listens and its share of the load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// The provider's address (its [`crate::Server::local_addr`]).
    pub addr: SocketAddr,
    /// Relative weight for the weighted balancers; 0 takes no load from
    /// them. Default [`DEFAULT_WEIGHT`].
    pub weight: u32,
}

impl Endpoint {
    /// An endpoint with the default weight.
    pub fn new(addr: SocketAddr) -> Endpoint {
        Endpoint {
            addr,
            weight: DEFAULT_WEIGHT,
        }
    }

    /// An endpoint with `weight`.
    pub fn weighted(addr: SocketAddr, weight: u32) -> Endpoint {
        Endpoint { addr, weight }
    }
}

/// What a watch reports.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum WatchEvent {
    /// The whole provider set, sent first and then after every change.
    Providers(Vec<Endpoint>),
    /// The registry cannot be reached; consumers keep the last set they
    /// have. The watch keeps retrying.
    RegistryLost {
        /// What failed.
        error: String,
    },
    /// The registry is back; a [`WatchEvent::Providers`] with the current
    /// set precedes this event.
    RegistryResumed,
    /// The registry holds an entry for the service that is no endpoint (in
    /// etcd, a key whose value does not parse), left out of every
    /// [`WatchEvent::Providers`]. Sent once per entry and value, after the
    /// set it was left out of, not with each set.
    Rejected {
        /// The entry (in etcd, its key).
        entry: String,
        /// Why it is no endpoint.
        reason: String,
    },
}

/// A registry of service providers.
///
/// Implementations are shared between threads (`Send + Sync`) and used
/// through `&dyn Registry`.
pub trait Registry: Send + Sync {
    /// Announces `endpoint` as a provider of `service` under a lease of
    /// `ttl`, kept alive in the background until the returned
    /// [`Registration`] is deregistered or dropped.
    ///
    /// # Errors
    /// When the registry cannot be reached or refuses the registration
    /// (`Io`), or the service name cannot be stored (`InvalidConfig`). (A
    /// registry may instead register in the background once it can be
    /// reached: an [`EtcdRegistry`](super::EtcdRegistry) whose
    /// `EtcdConfig::fail_fast` is off does.)
    fn register(
        &self,
        service: &ServiceKey,
        endpoint: Endpoint,
        ttl: Duration,
    ) -> Result<Registration>;

    /// The current providers of `service`.
    ///
    /// # Errors
    /// When the registry cannot be reached (`Io`).
    fn list(&self, service: &ServiceKey) -> Result<Vec<Endpoint>>;

    /// Follows the providers of `service`: the returned [`Watch`] delivers
    /// the current set first, then the new set after each change, and says
    /// when the registry is lost and found again. Dropping the `Watch` stops
    /// it.
    ///
    /// # Errors
    /// When the registry cannot be reached for the first listing (`Io`).
    /// (A registry may instead start the watch with an empty set and
    /// [`WatchEvent::RegistryLost`], and retry: an
    /// [`EtcdRegistry`](super::EtcdRegistry) whose `EtcdConfig::fail_fast`
    /// is off does.)
    fn watch(&self, service: &ServiceKey) -> Result<Watch>;
}

/// What keeps a registration alive; implemented by each registry.
pub trait Lease: Send {
    /// Stops keeping the registration alive and removes it from the
    /// registry now.
    ///
    /// # Errors
    /// When the registry cannot be reached; the registration then still
    /// disappears when its lease expires.
    fn revoke(self: Box<Self>) -> Result<()>;

    /// Stops keeping the registration alive without removing it: the
    /// registry drops it when the lease expires, as if this process had
    /// crashed.
    fn abandon(self: Box<Self>);
}

/// A provider's registration. Dropping it deregisters (like
/// [`Registration::deregister`], logging a failure).
pub struct Registration {
    service: ServiceKey,
    endpoint: Endpoint,
    lease: Option<Box<dyn Lease>>,
}

impl Registration {
    /// Wraps a registry's lease (for implementors of [`Registry`]).
    pub fn new(service: ServiceKey, endpoint: Endpoint, lease: Box<dyn Lease>) -> Registration {
        Registration {
            service,
            endpoint,
            lease: Some(lease),
        }
    }

    /// The registered service.
    pub fn service(&self) -> &ServiceKey {
        &self.service
    }

    /// The registered endpoint.
    pub fn endpoint(&self) -> Endpoint {
        self.endpoint
    }

    /// Removes the registration now (a graceful shutdown).
    ///
    /// # Errors
    /// When the registry cannot be reached; the entry then disappears when
    /// its lease expires.
    pub fn deregister(mut self) -> Result<()> {
        match self.lease.take() {
            Some(lease) => lease.revoke(),
            None => Ok(()),
        }
    }

    /// Stops renewing the lease but leaves the entry in place until it
    /// expires: what the registry sees when the provider crashes.
    pub fn abandon(mut self) {
        if let Some(lease) = self.lease.take() {
            lease.abandon();
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take()
            && let Err(e) = lease.revoke()
        {
            log::warn!(
                "deregistering {} from {}: {e}; it expires with its lease",
                self.endpoint.addr,
                self.service
            );
        }
    }
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration")
            .field("service", &self.service)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// A stream of [`WatchEvent`]s for one service. Dropping it stops the watch.
pub struct Watch {
    rx: Receiver<WatchEvent>,
    _stop: Box<dyn Send>,
}

impl Watch {
    /// A watch reading `rx`; `stop` is dropped when the watch is (for
    /// implementors of [`Registry`]: drop a `Sender` there to tell the
    /// watcher thread to end).
    pub fn new(rx: Receiver<WatchEvent>, stop: impl Send + 'static) -> Watch {
        Watch {
            rx,
            _stop: Box::new(stop),
        }
    }

    /// The channel of events, for `select!` or iteration.
    pub fn receiver(&self) -> &Receiver<WatchEvent> {
        &self.rx
    }

    /// The next event, waiting up to `timeout`; `None` on timeout or when
    /// the watch ended.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<WatchEvent> {
        self.rx.recv_timeout(timeout).ok()
    }
}

impl fmt::Debug for Watch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watch").finish_non_exhaustive()
    }
}

/// The in-memory registry: fixed lists of providers per service, plus
/// whatever this process registers. No server, no lease expiry (a
/// registration lasts until it is deregistered, dropped or abandoned).
///
/// ```
/// use pulse::cluster::{Endpoint, Registry, ServiceKey, StaticRegistry};
/// let service = ServiceKey::from("demo");
/// let registry = StaticRegistry::new().with(
///     service.clone(),
///     [Endpoint::new("127.0.0.1:7001".parse().unwrap()), Endpoint::weighted("127.0.0.1:7002".parse().unwrap(), 50)],
/// );
/// assert_eq!(registry.list(&service)?.len(), 2);
/// # Ok::<(), pulse::Error>(())
/// ```
#[derive(Clone, Default)]
pub struct StaticRegistry {
    shared: Arc<Mutex<StaticState>>,
}

#[derive(Default)]
struct StaticState {
    services: HashMap<ServiceKey, Vec<Endpoint>>,
    /// For each service, the registration (its id) that listed each address
    /// last: only that registration's end removes the address, so dropping
    /// a registration that a newer one of the same address replaced (a
    /// weight change, a provider restarted on its port) leaves the newer one.
    owners: HashMap<ServiceKey, HashMap<SocketAddr, u64>>,
    /// Open watches: id, service, sender. A `Watch` removes its own when
    /// dropped (`WatchEntry`).
    watchers: Vec<(u64, ServiceKey, Sender<WatchEvent>)>,
}

impl StaticState {
    fn publish(&mut self, service: &ServiceKey) {
        let set = self.services.get(service).cloned().unwrap_or_default();
        self.watchers.retain(|(_, key, tx)| {
            key != service || tx.send(WatchEvent::Providers(set.clone())).is_ok()
        });
    }
}

/// Held by a [`StaticRegistry`] watch: its end removes the watch's sender,
/// which otherwise stayed listed until the service next changed (a million
/// watches opened and dropped grew the process by 700 MB).
struct WatchEntry {
    state: std::sync::Weak<Mutex<StaticState>>,
    id: u64,
}

impl Drop for WatchEntry {
    fn drop(&mut self) {
        if let Some(state) = self.state.upgrade() {
            state.lock().watchers.retain(|(id, _, _)| *id != self.id);
        }
    }
}

impl StaticRegistry {
    /// An empty registry.
    pub fn new() -> StaticRegistry {
        StaticRegistry::default()
    }

    /// Adds `endpoints` as providers of `service` (builder style).
    pub fn with(
        self,
        service: ServiceKey,
        endpoints: impl IntoIterator<Item = Endpoint>,
    ) -> StaticRegistry {
        self.update(&service, |list, owners| {
            for e in endpoints {
                // Listed by hand now: no registration's end removes it.
                owners.remove(&e.addr);
                list.push(e);
            }
        });
        self
    }

    /// Replaces the providers of `service`; watchers get the new set.
    /// Endpoints keep the order given (balancers see them in that order).
    /// Registrations of the service no longer own their addresses: their
    /// end removes nothing this set lists.
    pub fn set(&self, service: &ServiceKey, endpoints: impl IntoIterator<Item = Endpoint>) {
        self.update(service, |list, owners| {
            *list = endpoints.into_iter().collect();
            owners.clear();
        });
    }

    /// Removes `addr` if registration `id` is the one that listed it last.
    fn remove(&self, service: &ServiceKey, addr: SocketAddr, id: u64) {
        self.update(service, |list, owners| {
            if owners.get(&addr) == Some(&id) {
                owners.remove(&addr);
                list.retain(|e| e.addr != addr);
            }
        });
    }

    /// Changes the providers of `service` with `change` and publishes the
    /// result, all under one lock: updates made at the same time (two
    /// registrations, a registration and a removal) each see the other's
    /// result instead of overwriting it. An address listed twice keeps its
    /// first place and its last endpoint.
    fn update(
        &self,
        service: &ServiceKey,
        change: impl FnOnce(&mut Vec<Endpoint>, &mut HashMap<SocketAddr, u64>),
    ) {
        let mut state = self.shared.lock();
        let state = &mut *state;
        let list = state.services.entry(service.clone()).or_default();
        let owners = state.owners.entry(service.clone()).or_default();
        change(list, owners);
        let mut unique: Vec<Endpoint> = Vec::with_capacity(list.len());
        for e in list.drain(..) {
            match unique.iter_mut().find(|u| u.addr == e.addr) {
                Some(u) => *u = e,
                None => unique.push(e),
            }
        }
        *list = unique;
        state.publish(service);
    }
}

struct StaticLease {
    registry: StaticRegistry,
    service: ServiceKey,
    addr: SocketAddr,
    /// This registration, in `StaticState::owners`.
    id: u64,
}

impl Lease for StaticLease {
    fn revoke(self: Box<Self>) -> Result<()> {
        self.registry.remove(&self.service, self.addr, self.id);
        Ok(())
    }

    /// Without lease expiry, a crash looks like a deregistration.
    fn abandon(self: Box<Self>) {
        self.registry.remove(&self.service, self.addr, self.id);
    }
}

impl Registry for StaticRegistry {
    fn register(
        &self,
        service: &ServiceKey,
        endpoint: Endpoint,
        _ttl: Duration,
    ) -> Result<Registration> {
        // A registration of a listed address replaces it, at the end, and
        // owns it from now on.
        let id = crate::next_id();
        self.update(service, |list, owners| {
            list.retain(|e| e.addr != endpoint.addr);
            list.push(endpoint);
            owners.insert(endpoint.addr, id);
        });
        Ok(Registration::new(
            service.clone(),
            endpoint,
            Box::new(StaticLease {
                registry: self.clone(),
                service: service.clone(),
                addr: endpoint.addr,
                id,
            }),
        ))
    }

    fn list(&self, service: &ServiceKey) -> Result<Vec<Endpoint>> {
        Ok(self
            .shared
            .lock()
            .services
            .get(service)
            .cloned()
            .unwrap_or_default())
    }

    fn watch(&self, service: &ServiceKey) -> Result<Watch> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut state = self.shared.lock();
        let set = state.services.get(service).cloned().unwrap_or_default();
        tx.send(WatchEvent::Providers(set))
            .map_err(|_| Error::Shutdown)?;
        let id = crate::next_id();
        state.watchers.push((id, service.clone(), tx));
        let entry = WatchEntry {
            state: Arc::downgrade(&self.shared),
            id,
        };
        Ok(Watch::new(rx, entry))
    }
}

impl fmt::Debug for StaticRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.shared.lock();
        f.debug_struct("StaticRegistry")
            .field("services", &state.services)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(port: u16) -> Endpoint {
        Endpoint::new(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    #[test]
    fn watchers_see_every_change() {
        let demo = ServiceKey::from("demo");
        let registry = StaticRegistry::new().with(demo.clone(), [ep(1)]);
        let watch = registry.watch(&demo).unwrap();
        let next = || watch.recv_timeout(Duration::from_secs(1)).unwrap();
        assert_eq!(next(), WatchEvent::Providers(vec![ep(1)]));
        let reg = registry
            .register(&demo, ep(2), Duration::from_secs(1))
            .unwrap();
        assert_eq!(next(), WatchEvent::Providers(vec![ep(1), ep(2)]));
        drop(reg);
        assert_eq!(next(), WatchEvent::Providers(vec![ep(1)]));
        let other = ServiceKey::new("demo", "2", "");
        registry.set(&other, [ep(3)]);
        assert!(watch.recv_timeout(Duration::from_millis(20)).is_none());
        registry.set(&demo, [ep(4), ep(4)]);
        assert_eq!(next(), WatchEvent::Providers(vec![ep(4)]));
    }

    /// A dropped watch leaves the registry at once, not at the service's
    /// next change (before, watches opened and dropped on a service that
    /// never changed piled up: 700 MB for a million).
    #[test]
    fn dropped_watches_are_pruned() {
        let demo = ServiceKey::from("demo");
        let registry = StaticRegistry::new();
        let kept = registry.watch(&demo).unwrap();
        for _ in 0..100 {
            drop(registry.watch(&demo).unwrap());
        }
        assert_eq!(registry.shared.lock().watchers.len(), 1);
        drop(kept);
        assert!(registry.shared.lock().watchers.is_empty());
        // A watch that outlives its registry drops quietly.
        let orphan = StaticRegistry::new().watch(&demo).unwrap();
        drop(orphan);
    }

    /// Dropping a registration removes its address only if no newer
    /// registration of that address replaced it (a weight change, a
    /// provider restarted on its port while the old one drained): before,
    /// the old one's end removed the newer one's entry for good.
    #[test]
    fn a_replaced_registration_leaves_its_successor_listed() {
        let demo = ServiceKey::from("demo");
        let registry = StaticRegistry::new();
        let addr = ep(7000).addr;
        let old = registry
            .register(&demo, Endpoint::weighted(addr, 100), Duration::from_secs(1))
            .unwrap();
        let new = registry
            .register(&demo, Endpoint::weighted(addr, 50), Duration::from_secs(1))
            .unwrap();
        drop(old);
        assert_eq!(
            registry.list(&demo).unwrap(),
            [Endpoint::weighted(addr, 50)]
        );
        new.deregister().unwrap();
        assert!(registry.list(&demo).unwrap().is_empty());
        // An address `set` lists is no registration's to remove.
        let registered = registry
            .register(&demo, ep(7001), Duration::from_secs(1))
            .unwrap();
        registry.set(&demo, [ep(7001)]);
        drop(registered);
        assert_eq!(registry.list(&demo).unwrap(), [ep(7001)]);
    }

    /// Registrations made at the same time are all kept (each update is
    /// one critical section, so none overwrites another's).
    #[test]
    fn concurrent_registrations_are_all_kept() {
        let demo = ServiceKey::from("demo");
        for round in 0..300 {
            let registry = StaticRegistry::new();
            let barrier = Arc::new(std::sync::Barrier::new(4));
            let threads: Vec<_> = (0..4u16)
                .map(|i| {
                    let (registry, demo, barrier) =
                        (registry.clone(), demo.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        registry.register(&demo, ep(7000 + i), Duration::from_secs(1))
                    })
                })
                .collect();
            let regs: Vec<Registration> = threads
                .into_iter()
                .map(|t| t.join().unwrap().unwrap())
                .collect();
            let listed = registry.list(&demo).unwrap().len();
            assert_eq!(listed, 4, "round {round}: 4 registered, {listed} listed");
            for r in regs {
                r.abandon();
            }
            assert!(registry.list(&demo).unwrap().is_empty());
        }
    }

    /// A removal racing a registration never brings the removed endpoint
    /// back.
    #[test]
    fn a_concurrent_removal_stays_removed() {
        let demo = ServiceKey::from("demo");
        for round in 0..300 {
            let registry = StaticRegistry::new();
            let leaving = registry
                .register(&demo, ep(7000), Duration::from_secs(1))
                .unwrap();
            let barrier = Arc::new(std::sync::Barrier::new(2));
            let joining = {
                let (registry, demo, barrier) = (registry.clone(), demo.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    registry.register(&demo, ep(7001), Duration::from_secs(1))
                })
            };
            barrier.wait();
            leaving.deregister().unwrap();
            let joined = joining.join().unwrap().unwrap();
            assert_eq!(registry.list(&demo).unwrap(), [ep(7001)], "round {round}");
            joined.abandon();
        }
    }

    #[test]
    fn keys_display_compactly() {
        assert_eq!(ServiceKey::from("demo").to_string(), "demo");
        assert_eq!(
            ServiceKey::new("demo", "1.0", "blue").to_string(),
            "demo:1.0@blue"
        );
    }
}
