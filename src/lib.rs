//! # pulse
//!
//! A blocking, thread-per-core RPC runtime whose core promise is **connection
//! liveness**: consumer and provider ping each other, a silent peer is found
//! within `max_missed × heartbeat_interval` (plus one timer tick and the
//! miss grace, a tick + 1 ms by default), the consumer
//! reconnects after releasing everything the dead connection owned, and the
//! provider drops consumers that stopped answering.
//!
//! No async runtime: a `mio` event loop per core owns the sockets, a timer-wheel
//! thread drives heartbeats and deadlines, and callers block in [`Client::call`].
//!
//! ```
//! use pulse::{Client, ClientConfig, Server, ServiceBuilder};
//!
//! let server = Server::builder()
//!     .service(ServiceBuilder::new("demo").method("ping", |n: u64| Ok::<_, String>(n)))
//!     .bind("127.0.0.1:0")?;
//! let client = Client::connect(server.local_addr(), ClientConfig::default())?;
//! let answer: u64 = client.call("demo", "ping", &7u64)?;
//! assert_eq!(answer, 7);
//! # Ok::<(), pulse::Error>(())
//! ```
//!
//! `docs/PROTOCOL.md` is the wire format, `docs/DESIGN.md` how the pieces fit.
#![deny(missing_docs)]

mod client;
mod clock;
pub mod cluster;
pub mod config;
pub mod error;
mod event;
mod job_queue;
pub mod liveness;
pub mod protocol;
mod reactor;
mod server;
mod service;
pub mod timer;

pub use client::{Client, ConnectionState, PendingCall, ServiceRef};
pub use config::{ClientConfig, ConnectionConfig, HandlerMode, ServerConfig};
pub use error::{Error, Result};
pub use event::{DisconnectReason, Event};
pub use reactor::PeerInfo;
pub use server::{Server, ServerBuilder};
pub use service::ServiceBuilder;

/// The README's code examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// A process-wide unique id for connections and links; also their timer ids.
pub(crate) fn next_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}
