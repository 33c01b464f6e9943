//! Many providers of one service: discovery, load balancing and failover.
//!
//! Real services call many providers of the same service. This module is the
//! consumer side of that, built on the liveness of each connection:
//!
//! * a [`Registry`] says who provides a service: [`StaticRegistry`] (a fixed
//!   list in memory, the default) or [`EtcdRegistry`] (etcd v3, where each
//!   provider's key lives as long as the lease it keeps alive, so a dead or
//!   frozen provider disappears on its own);
//! * a [`ClusterClient`] follows the registry, keeps one heartbeated
//!   [`Client`](crate::Client) per provider, sends each call to a healthy one
//!   chosen by a [`LoadBalancer`], and fails calls over to another provider
//!   when that is safe: any call that was never sent (its provider was no
//!   longer connected), idempotent calls whose connection died under them.
//!   With no healthy provider a call fails at once with
//!   [`Error::NoProvider`](crate::Error::NoProvider).
//!
//! `docs/CLUSTER.md` has the etcd layout, each balancer's promise and the
//! failover rules in full.
//!
//! A provider in heartbeat trouble (two missed intervals by default) or
//! reconnecting is skipped, so one that freezes leaves rotation within
//! `max_missed × heartbeat_interval` (with the defaults, an interval before
//! its connection is declared dead) and comes back when its connection is up
//! again.
//!
//! ```
//! use pulse::cluster::{ClusterClient, ClusterConfig, Endpoint, Registry, SmoothWeightedRoundRobin, ServiceKey, StaticRegistry};
//! use pulse::{Server, ServiceBuilder};
//! use std::time::Duration;
//!
//! // Two providers of `echo`, registered in the in-memory registry.
//! let registry = StaticRegistry::new();
//! let service = ServiceKey::from("echo");
//! let mut providers = Vec::new();
//! for weight in [3, 1] {
//!     let server = Server::builder()
//!         .service(ServiceBuilder::new("echo").method_inline("say", |s: String| Ok::<_, String>(s)))
//!         .bind("127.0.0.1:0")?;
//!     let registration =
//!         registry.register(&service, Endpoint::weighted(server.local_addr(), weight), Duration::from_secs(10))?;
//!     providers.push((server, registration));
//! }
//!
//! // A consumer: `say` is safe to retry on another provider.
//! let config = ClusterConfig::default().idempotent(["say"]);
//! let cluster = ClusterClient::new(&registry, service, SmoothWeightedRoundRobin::new(), config)?;
//! assert!(cluster.wait_ready(2, Duration::from_secs(5)));
//! let reply: String = cluster.call("say", "hello")?;
//! assert_eq!(reply, "hello");
//! # Ok::<(), pulse::Error>(())
//! ```

mod balance;
mod client;
mod etcd;
mod http;
mod json;
mod registry;
mod resolve;

pub use balance::{
    Candidate, ConsistentHash, LeastInflight, LoadBalancer, LowestRtt, Random, RoundRobin,
    SmoothWeightedRoundRobin, SplitMix64, WeightedRandom, hash64,
};
pub use client::{CallOptions, ClusterClient, ClusterConfig, ClusterEvent, ProviderInfo, Traced};
pub use etcd::{EtcdConfig, EtcdRegistry};
pub use registry::{
    DEFAULT_WEIGHT, Endpoint, Lease, Registration, Registry, ServiceKey, StaticRegistry, Watch,
    WatchEvent,
};
