//! The consumer: one multiplexed connection to a provider, kept alive.
//!
//! A [`Client`] is `Clone + Send + Sync`; every clone shares one connection.
//! Requests are encoded and responses decoded on the caller's thread; the
//! caller usually writes its request to the socket itself, and the event loop
//! hands it the response. When the connection dies (heartbeat timeout, EOF,
//! reset, a Close of any status) calls in flight fail at once with
//! `ConnectionLost`, and the client reconnects with backoff until it is
//! dropped (after a graceful close by the provider — its `max_age`,
//! `max_idle` or shutdown — the first attempt is made at once); calls made
//! meanwhile wait for the new connection up to their timeout.
//!
//! Here: the [`Client`] API and its calls' paths. In submodules: the link
//! its event loop publishes to callers (`link`), the event loops clients
//! share (`runtime`), and a call started without waiting
//! ([`PendingCall`], `pending`).
//!
//! ```no_run
//! use pulse::{Client, ClientConfig};
//! let client = Client::connect("127.0.0.1:7000", ClientConfig::default())?;
//! let n: u64 = client.call("demo", "ping", &7u64)?;
//! assert_eq!(n, 7);
//! # Ok::<(), pulse::Error>(())
//! ```

use std::marker::PhantomData;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use serde::Serialize;
use serde::de::DeserializeOwned;

mod link;
mod pending;
mod runtime;

pub(crate) use link::{Link, LinkState};
pub use pending::PendingCall;
pub(crate) use runtime::ClientRuntime;

use crate::clock;
use crate::config::ClientConfig;
use crate::error::{Error, Result};
use crate::event::{Event, EventHook, EventSink};
use crate::protocol::{HEADER_LEN, Kind, ResponseStatus, encode_request};
use crate::reactor::{CallSlot, Class, Command, ConnShared, LoopHandle, Room, SendError};

/// Names a service: `name` plus `version` and `group` (both may be empty).
///
/// A plain `&str` converts to a service with empty version and group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceRef<'a> {
    /// The service name.
    pub name: &'a str,
    /// The service version ("" when unversioned).
    pub version: &'a str,
    /// The service group ("" when ungrouped).
    pub group: &'a str,
}

impl<'a> ServiceRef<'a> {
    /// A service with all three parts.
    pub fn new(name: &'a str, version: &'a str, group: &'a str) -> ServiceRef<'a> {
        ServiceRef {
            name,
            version,
            group,
        }
    }
}

impl<'a> From<&'a str> for ServiceRef<'a> {
    fn from(name: &'a str) -> ServiceRef<'a> {
        ServiceRef::new(name, "", "")
    }
}

/// Where a client's connection is.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionState {
    /// Connecting or waiting to reconnect; `attempt` counts since the last
    /// healthy connection.
    Connecting {
        /// Attempts made so far.
        attempt: u32,
    },
    /// Connected and answering.
    Ready,
    /// Gave up after `BackoffConfig::max_attempts`.
    Failed,
    /// The client was shut down.
    Shutdown,
}

struct ClientInner {
    link: Arc<Link>,
    owner: LoopHandle,
    /// Held only to be dropped, after the link's removal is sent: the last
    /// client of a runtime stops its threads.
    _runtime: Arc<ClientRuntime>,
    next_id: AtomicU64,
    /// Whether the drop of the last clone waits for the close (see
    /// [`ClientInner::remove_link`]). A cluster's provider clients do not:
    /// the cluster waits for its providers' closes itself, all at once (a
    /// wait per client, one after another, took a linger per provider).
    wait_on_drop: bool,
}

impl ClientInner {
    /// Has the loop close the connection with Close(Normal) and stop
    /// reconnecting, and waits until it has: until what was queued and the
    /// Close are written and the provider closed its side, or
    /// [`ClientConfig::linger`] has passed (plus [`REMOVE_WAIT`] for the
    /// loop to take the command). The loop may go on serving other
    /// clients, and a program that drops or shuts down a client and then
    /// exits must not lose its queued one-way calls or the Close with the
    /// process. An event loop's thread does not wait: the loop it would
    /// wait for could be its own.
    fn remove_link(&self) {
        self.begin_remove().wait();
    }

    /// Sends the loop the command that closes the connection (as
    /// [`remove_link`](Self::remove_link)) without waiting for it: the
    /// returned [`Closing`] waits.
    fn begin_remove(&self) -> Closing {
        let (done, closed) = crossbeam_channel::bounded::<()>(0);
        self.owner.send(Command::RemoveLink {
            link_id: self.link.id(),
            done,
        });
        let wait = self.link.config().linger.saturating_add(REMOVE_WAIT);
        Closing {
            // Nothing is ever sent: the loop drops `done` when the
            // connection is released.
            closed: (!crate::reactor::on_event_loop()).then_some(closed),
            deadline: clock::deadline_after(Instant::now(), wait),
        }
    }
}

/// A client's close under way ([`Client::begin_shutdown`]): the loop is
/// writing what is queued and the Close, then lingers for the provider's
/// end. Waiting for several at once takes about one linger, not one each.
#[must_use = "the close goes on without it; `wait` waits for it to end"]
pub(crate) struct Closing {
    /// Disconnects when the loop has released the connection; `None` on an
    /// event loop's own thread, which must not wait for a loop.
    closed: Option<crossbeam_channel::Receiver<()>>,
    /// The latest the close takes: [`ClientConfig::linger`] plus
    /// [`REMOVE_WAIT`] from when it began.
    deadline: Instant,
}

impl Closing {
    /// Waits until the connection is released, or until the deadline set
    /// when the close began.
    pub(crate) fn wait(self) {
        if let Some(closed) = self.closed {
            let _ = closed.recv_deadline(self.deadline);
        }
    }
}

/// How much longer than [`ClientConfig::linger`] a client's drop or
/// `shutdown` waits for its loop to close the connection. A loop takes its
/// commands between turns, so this is reached only behind an inline
/// handler that runs that long.
const REMOVE_WAIT: Duration = Duration::from_secs(1);

impl Drop for ClientInner {
    fn drop(&mut self) {
        if self.wait_on_drop {
            self.remove_link();
        } else {
            // The loop closes it all the same (the Close, then the linger),
            // in the background.
            drop(self.begin_remove());
        }
    }
}

/// A consumer of one provider; clones share one multiplexed connection.
///
/// Dropping the last clone closes the connection gracefully before the drop
/// returns: what is still queued on it (one-way calls `send_one_way`
/// accepted) is written, then Close(Normal), and the drop returns once the
/// provider has closed its side in turn, or after [`ClientConfig::linger`]
/// (default 1 s) if it has not; only then is anything still queued lost.
/// The connection runs on an event loop the process's clients share
/// ([`ClientConfig::event_loops`] loops, each started with its first
/// client, and one timer thread; all stopped with the last client).
/// [`Client::shutdown`] closes it earlier, for every clone, and ends the
/// calls they are waiting in.
#[derive(Clone)]
pub struct Client {
    inner: Arc<ClientInner>,
}

impl Client {
    /// Connects to `addr` and waits until the provider answers (up to
    /// `config.connect_timeout`, retrying with backoff meanwhile).
    ///
    /// `addr` is resolved once, here. When it resolves to several addresses
    /// (`localhost` to `::1` and `127.0.0.1`, say, of which the provider
    /// may listen on one), each connect attempt tries them in turn, like
    /// `std::net::TcpStream::connect`, and each reconnect starts at the
    /// address that last connected. A round through all of them is one
    /// attempt for the backoff (`ClientConfig::backoff`); each address
    /// gets its own `connect_attempt_timeout`.
    ///
    /// # Errors
    /// `InvalidConfig`, `Io` when the address does not resolve, or
    /// `NotConnected` (with the last attempt's error) when no connection was
    /// ready in time.
    pub fn connect(addr: impl ToSocketAddrs, config: ClientConfig) -> Result<Client> {
        let wait = config.connect_timeout;
        let client = Client::connect_lazy(addr, config)?;
        let started = Instant::now();
        client
            .inner
            .link
            .ready_conn(clock::deadline_after(started, wait), started, None)?;
        Ok(client)
    }

    /// Starts connecting to `addr` in the background and returns at once.
    /// Calls wait for the connection up to their own timeout.
    ///
    /// # Errors
    /// `InvalidConfig`, or `Io` when the address does not resolve or the
    /// client's threads cannot start.
    pub fn connect_lazy(addr: impl ToSocketAddrs, config: ClientConfig) -> Result<Client> {
        let client = Client::open(addr, config, true, |config| {
            EventSink::new(config.connection.event_capacity, "client")
        })?;
        client.start_connecting();
        Ok(client)
    }

    /// A client whose events go to `hook` as they are emitted
    /// ([`events`](Self::events) stays empty), not connecting until
    /// [`start_connecting`](Self::start_connecting): a cluster announces
    /// the provider first. Dropping its last clone closes the connection
    /// without waiting for the close (a cluster waits for all its
    /// providers' closes at once, through [`begin_shutdown`](Self::begin_shutdown)).
    pub(crate) fn unstarted_with_hook(
        addr: impl ToSocketAddrs,
        config: ClientConfig,
        hook: EventHook,
    ) -> Result<Client> {
        Client::open(addr, config, false, |_| {
            EventSink::with_hook("client", hook)
        })
    }

    /// Hands the link to its loop, which starts connecting. Once per client.
    pub(crate) fn start_connecting(&self) {
        self.inner
            .owner
            .send(Command::AddLink(self.inner.link.clone()));
    }

    /// The client's link, not yet connecting, on a loop of the runtime
    /// shared by clients with its loop settings, its events going to the
    /// sink `events` makes; `wait_on_drop` says whether the drop of its
    /// last clone waits for the close ([`ClientInner::wait_on_drop`]). The
    /// config is checked first: the sink of `EventSink::new` takes its
    /// capacity's memory when it is made.
    fn open(
        addr: impl ToSocketAddrs,
        config: ClientConfig,
        wait_on_drop: bool,
        events: impl FnOnce(&ClientConfig) -> EventSink,
    ) -> Result<Client> {
        config.validate().map_err(Error::InvalidConfig)?;
        let events = events(&config);
        let mut addrs: Vec<SocketAddr> = Vec::new();
        for addr in addr
            .to_socket_addrs()
            .map_err(|e| Error::io("resolve the provider address", e))?
        {
            // A resolver may list an address twice (once per socket type).
            if !addrs.contains(&addr) {
                addrs.push(addr);
            }
        }
        let link = Link::new(addrs, config, events)?;
        let runtime = ClientRuntime::shared(link.config())?;
        let owner = runtime.next_loop()?;
        let link = Arc::new(link);
        Ok(Client {
            inner: Arc::new(ClientInner {
                link,
                owner,
                _runtime: runtime,
                next_id: AtomicU64::new(1),
                wait_on_drop,
            }),
        })
    }

    /// Calls `method` of `service` with `args` and waits for the result, up
    /// to `ClientConfig::call_timeout`.
    ///
    /// A call answered `ShuttingDown` by a connection that is closing (the
    /// provider's `max_age` or `max_idle` rotating it, or its shutdown) did
    /// not run; like a call made while the connection closes, it is sent
    /// once more on the next connection, within the same timeout. So is a
    /// call still waiting when the provider closes the connection with
    /// Close(Normal), which it sends only once every request it read is
    /// answered (the call fails with that same `ShuttingDown`). So is a
    /// call whose connection died while its request still waited in the
    /// connection's write queue (behind a socket the network stopped
    /// taking bytes from): not one byte of it was written. When no
    /// new connection comes in time (the provider is really gone), it fails
    /// with `NotConnected` at the timeout. ([`Client::start`] and
    /// [`PendingCall::wait`] leave that to the caller: see
    /// [`Error::refused_before_running`].)
    ///
    /// # Errors
    /// `Timeout`, `ConnectionLost`, `NotConnected`, `Remote` (the provider's
    /// status and message), `Overloaded`, `Codec`, `Shutdown`.
    pub fn call<'s, A, R>(
        &self,
        service: impl Into<ServiceRef<'s>>,
        method: &str,
        args: &A,
    ) -> Result<R>
    where
        A: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let timeout = self.inner.link.config().call_timeout;
        self.call_timeout(service, method, args, timeout)
    }

    /// [`Client::call`] with an explicit timeout.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub fn call_timeout<'s, A, R>(
        &self,
        service: impl Into<ServiceRef<'s>>,
        method: &str,
        args: &A,
        timeout: Duration,
    ) -> Result<R>
    where
        A: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let service = service.into();
        let until = Until::from_now(timeout);
        let first = self.start_until(service, method, args, until, Write::Now)?;
        let closing = first.conn.id;
        match first.wait() {
            // Refused by a closing connection (an answer, or its
            // Close(Normal) before the request was read), or never written
            // to one that died (`NotConnected` comes from `wait` only
            // then): it did not run.
            Err(
                Error::Remote {
                    status: ResponseStatus::ShuttingDown,
                    ..
                }
                | Error::NotConnected { .. },
            ) if Instant::now() < until.deadline => {
                let again = Until {
                    avoid: Some(closing),
                    ..until
                };
                self.start_until(service, method, args, again, Write::Now)?
                    .wait()
            }
            outcome => outcome,
        }
    }

    /// Sends the request now and returns a handle to wait on later, with the
    /// default call timeout counted from now. Many calls can be outstanding
    /// at once on one connection (up to `max_inflight`).
    ///
    /// The calling thread usually writes the request itself before this
    /// returns. While other calls are in flight on the connection and its
    /// event loop is busy-polling for their answers
    /// ([`ConnectionConfig::busy_poll`](crate::ConnectionConfig::busy_poll)),
    /// the loop writes it instead, microseconds later, together with the
    /// requests queued by then: a pipelining caller then costs one write per
    /// batch, not one per call.
    ///
    /// # Errors
    /// As [`Client::call`], for what fails before the request is sent.
    pub fn start<'s, A, R>(
        &self,
        service: impl Into<ServiceRef<'s>>,
        method: &str,
        args: &A,
    ) -> Result<PendingCall<R>>
    where
        A: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let timeout = self.inner.link.config().call_timeout;
        self.start_timeout(service, method, args, timeout)
    }

    /// [`Client::start`] with an explicit timeout.
    ///
    /// # Errors
    /// As [`Client::call`], for what fails before the request is sent.
    pub fn start_timeout<'s, A, R>(
        &self,
        service: impl Into<ServiceRef<'s>>,
        method: &str,
        args: &A,
        timeout: Duration,
    ) -> Result<PendingCall<R>>
    where
        A: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        self.start_until(
            service.into(),
            method,
            args,
            Until::from_now(timeout),
            Write::Now,
        )
    }

    /// [`Client::start`] for pipelining: the request is queued on the
    /// connection but not written yet, so that the requests a thread starts
    /// in a row go out together in one system call (and reach the provider in
    /// one read) instead of one each.
    ///
    /// A deferred request is written, together with every other one queued,
    /// by the first of:
    /// - a [`PendingCall::wait`] on this client that finds its own response
    ///   not there yet (a caller never waits on a request it is holding back);
    /// - [`Client::flush`];
    /// - any other write on the connection: a [`Client::start`], a
    ///   [`Client::call`] or a heartbeat ping;
    /// - enough requests being queued: half of the deferred calls started
    ///   on the connection and not yet waited for, but at least 32 and at
    ///   most 64 (so a window of 64 calls keeps two batches on the way, and
    ///   the provider works on one while this thread prepares the next), or
    ///   64 KiB.
    ///
    /// So the pattern "keep N calls outstanding: start_deferred, wait for
    /// the oldest" needs nothing else. A thread that starts deferred calls
    /// and then waits for something other than them should call
    /// [`Client::flush`] first. The call's timeout counts from now.
    ///
    /// If the connection dies before the request is written, the call fails
    /// with `NotConnected`: not one byte of it was sent, so sending it again
    /// is safe ([`Error::refused_before_running`]), but it is not resent by
    /// itself. Once written, it fails with `ConnectionLost` like any other
    /// call in flight.
    ///
    /// # Errors
    /// As [`Client::call`], for what fails before the request is queued.
    pub fn start_deferred<'s, A, R>(
        &self,
        service: impl Into<ServiceRef<'s>>,
        method: &str,
        args: &A,
    ) -> Result<PendingCall<R>>
    where
        A: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let timeout = self.inner.link.config().call_timeout;
        self.start_deferred_timeout(service, method, args, timeout)
    }

    /// [`Client::start_deferred`] with an explicit timeout, counted from now
    /// (the time the request stays held counts too).
    ///
    /// # Errors
    /// As [`Client::call`], for what fails before the request is queued.
    pub fn start_deferred_timeout<'s, A, R>(
        &self,
        service: impl Into<ServiceRef<'s>>,
        method: &str,
        args: &A,
        timeout: Duration,
    ) -> Result<PendingCall<R>>
    where
        A: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        self.start_until(
            service.into(),
            method,
            args,
            Until::from_now(timeout),
            Write::Deferred,
        )
    }

    /// Writes the requests of [`Client::start_deferred`] that are still
    /// queued. Does nothing when none are, or when there is no connection
    /// (requests queued on a connection that died fail with it).
    ///
    /// # Errors
    /// `ConnectionLost` when the write fails.
    pub fn flush(&self) -> Result<()> {
        let conn = match &*self.inner.link.state.lock() {
            LinkState::Ready(conn) => conn.clone(),
            _ => return Ok(()),
        };
        conn.flush_held()
            .map(|_| ())
            .map_err(|e| send_error(&conn, e))
    }

    /// Encodes a request and sends it (now or deferred) on a ready
    /// connection but `until.avoid`, waiting for one until `until.deadline`.
    fn start_until<A, R>(
        &self,
        service: ServiceRef<'_>,
        method: &str,
        args: &A,
        until: Until,
        write: Write,
    ) -> Result<PendingCall<R>>
    where
        A: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let Until {
            started,
            deadline,
            timeout,
            avoid,
        } = until;
        let (id, mut frame) = self.encode_call(Kind::Request, service, method, args)?;
        let link = &self.inner.link;
        let mut dead = avoid;
        // A connection can die between being handed out and taking the
        // request; as long as nothing was written, wait for the next one.
        loop {
            let conn = link.ready_conn(deadline, started, dead)?;
            let conn_id = conn.id;
            match self.send_on(conn, id, frame, deadline, timeout, write) {
                Ok(call) => return Ok(call),
                Err(SendOnError::Dead(unsent)) => {
                    frame = unsent;
                    dead = Some(conn_id);
                }
                Err(SendOnError::Failed(e)) => return Err(e),
            }
        }
    }

    /// Encodes a request or one-way call under a fresh request id.
    fn encode_call<A: Serialize + ?Sized>(
        &self,
        kind: Kind,
        service: ServiceRef<'_>,
        method: &str,
        args: &A,
    ) -> Result<(u64, Vec<u8>)> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = encode_request(
            kind,
            id,
            service.name,
            service.version,
            service.group,
            method,
            args,
        )
        .map_err(|e| Error::Codec(format!("arguments could not be encoded: {e}")))?;
        // A provider with the same limit would close the connection on a
        // larger frame, failing every call on it: this call fails alone.
        let max_body = self.inner.link.config().connection.max_frame_len;
        let body_len = frame.len().saturating_sub(HEADER_LEN);
        if body_len > max_body as usize {
            return Err(Error::Codec(format!(
                "the request is {body_len} bytes, over max_frame_len ({max_body} bytes): \
                 the provider would close the connection on it"
            )));
        }
        Ok((id, frame))
    }

    /// Registers call `id` on `conn` and sends its request `frame`.
    fn send_on<R>(
        &self,
        conn: Arc<ConnShared>,
        id: u64,
        frame: Vec<u8>,
        deadline: Instant,
        timeout: Duration,
        write: Write,
    ) -> std::result::Result<PendingCall<R>, SendOnError> {
        let config = self.inner.link.config();
        let slot = CallSlot::new();
        let waiting = match conn
            .calls
            .register(id, slot.clone(), config.max_inflight, conn.peer)
        {
            Ok(waiting) => waiting,
            // The connection ended (for this side's shutdown too, or the
            // provider's graceful Close) before the request was queued:
            // never written.
            Err(
                Error::ConnectionLost { .. }
                | Error::Shutdown
                | Error::Remote {
                    status: ResponseStatus::ShuttingDown,
                    ..
                },
            ) => {
                return Err(SendOnError::Dead(frame));
            }
            Err(e) => return Err(SendOnError::Failed(e)),
        };
        // While the connection's loop busy-polls for the answers of other
        // calls, it writes this request with whatever else is queued by then
        // (see `ConnShared::hold_for_loop`): the caller skips its own
        // `sendmsg`, and a pipelining caller's requests leave in batches.
        let by_loop = matches!(write, Write::Now) && waiting > 1 && conn.owner.is_polling();
        let sent = match write {
            Write::Now if by_loop => conn.hold_for_loop(frame),
            Write::Now => conn.send(frame, Class::Data),
            Write::Deferred => conn.hold(frame),
        };
        match sent {
            Ok(_) => Ok(PendingCall {
                conn,
                slot,
                id,
                deadline,
                timeout,
                spin: config.spin_wait,
                waited: false,
                deferred: matches!(write, Write::Deferred),
                by_loop,
                _result: PhantomData,
            }),
            Err(SendError::Closed(Some(unsent))) => {
                conn.calls.remove(id);
                Err(SendOnError::Dead(unsent))
            }
            Err(e) => {
                conn.calls.remove(id);
                Err(SendOnError::Failed(send_error(&conn, e)))
            }
        }
    }

    /// [`Client::call_timeout`] that never waits for a connection (for the
    /// cluster client, which would rather send the call to another provider).
    ///
    /// When the link is not ready right now (connecting, reconnecting, given
    /// up, shut down), or its connection is found dead before the request is
    /// queued on it, this fails at once with `NotConnected`. So a
    /// `NotConnected` from here always means the request was never written
    /// to a socket and may be sent elsewhere whatever the method; every other
    /// error is as [`Client::call_timeout`]'s (`ConnectionLost`: the request
    /// may have run).
    pub(crate) fn call_if_ready<'s, A, R>(
        &self,
        service: impl Into<ServiceRef<'s>>,
        method: &str,
        args: &A,
        timeout: Duration,
    ) -> Result<R>
    where
        A: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let started = Instant::now();
        let conn = self.ready_now(started)?;
        let (id, frame) = self.encode_call(Kind::Request, service.into(), method, args)?;
        let deadline = clock::deadline_after(started, timeout);
        match self.send_on(conn, id, frame, deadline, timeout, Write::Now) {
            Ok(call) => call.wait(),
            Err(SendOnError::Dead(_)) => Err(self.unsent(started, "the connection just died")),
            Err(SendOnError::Failed(e)) => Err(e),
        }
    }

    /// The connection if the link is ready right now; otherwise
    /// `NotConnected` at once (for the `*_if_ready` sends).
    fn ready_now(&self, started: Instant) -> Result<Arc<ConnShared>> {
        match &*self.inner.link.state.lock() {
            LinkState::Ready(conn) => Ok(conn.clone()),
            LinkState::Connecting { .. } => Err(self.unsent(started, "reconnecting")),
            LinkState::Failed(why) => Err(self.unsent(started, why)),
            LinkState::Shutdown => Err(self.unsent(started, "the client is shut down")),
        }
    }

    /// The `NotConnected` of a request that a `*_if_ready` send did not
    /// send, started at `started`.
    fn unsent(&self, started: Instant, detail: &str) -> Error {
        Error::NotConnected {
            peer: self.inner.link.addr(),
            waited: started.elapsed(),
            detail: format!("{detail}; the request was not sent"),
        }
    }

    /// Sends a one-way call: no response, no result. Returns once the request
    /// is queued on a ready connection (waiting for one up to the call timeout).
    ///
    /// A lone one-way call is written at once by the calling thread. One
    /// that follows the connection's last one within
    /// [`busy_poll`](crate::ConnectionConfig::busy_poll) (a caller sending
    /// in a loop) is left to the connection's event loop, which writes it
    /// together with the ones sent meanwhile, microseconds later; calls and
    /// one-way calls still leave in the order they were made.
    ///
    /// While the connection's write queue holds
    /// [`max_write_queue_bytes`](crate::ConnectionConfig::max_write_queue_bytes)
    /// (the provider takes calls slower than they are sent), this waits for
    /// room, up to the call timeout: a caller sending in a loop is slowed to
    /// the provider's pace instead of failing. A call still waiting when
    /// its connection dies was never queued, so it waits for the next
    /// connection instead (within the same timeout).
    ///
    /// # Errors
    /// `NotConnected`, `ConnectionLost`, `Codec`, `Shutdown`; `Overloaded`
    /// when the write queue stayed full for the whole call timeout, or the
    /// call alone is larger than the queue's bound.
    pub fn send_one_way<'s, A>(
        &self,
        service: impl Into<ServiceRef<'s>>,
        method: &str,
        args: &A,
    ) -> Result<()>
    where
        A: Serialize + ?Sized,
    {
        self.send_one_way_by(service.into(), method, args)
            .map(|_by_loop| ())
    }

    /// [`send_one_way`](Self::send_one_way); `Ok(true)`: the call was left
    /// to the connection's loop to write.
    fn send_one_way_by<A>(&self, service: ServiceRef<'_>, method: &str, args: &A) -> Result<bool>
    where
        A: Serialize + ?Sized,
    {
        let started = Instant::now();
        let link = &self.inner.link;
        let (_, mut frame) = self.encode_call(Kind::OneWay, service, method, args)?;
        let deadline = clock::deadline_after(started, link.config().call_timeout);
        let mut dead = None;
        loop {
            let conn = link.ready_conn(deadline, started, dead)?;
            match self.queue_one_way(&conn, frame, started, deadline) {
                Ok(by_loop) => return Ok(by_loop),
                // Never queued: it goes on the next connection.
                Err(SendOnError::Dead(unsent)) => {
                    frame = unsent;
                    dead = Some(conn.id);
                }
                Err(SendOnError::Failed(e)) => return Err(e),
            }
        }
    }

    /// [`Client::send_one_way`] that never waits for a connection (for the
    /// cluster client, which would rather send the call to another
    /// provider), with its own `timeout` for room in the write queue.
    ///
    /// When the link is not ready right now, or its connection dies before
    /// the call is queued on it (while waiting for room too), this fails
    /// with `NotConnected`: the call was never written and may be sent
    /// elsewhere. While the write queue is full it waits for room up to
    /// `timeout`, as `send_one_way` does, then fails with `Overloaded`
    /// (not queued either). `Ok` once queued: it is never sent again.
    pub(crate) fn send_one_way_if_ready<'s, A>(
        &self,
        service: impl Into<ServiceRef<'s>>,
        method: &str,
        args: &A,
        timeout: Duration,
    ) -> Result<()>
    where
        A: Serialize + ?Sized,
    {
        let started = Instant::now();
        let conn = self.ready_now(started)?;
        let (_, frame) = self.encode_call(Kind::OneWay, service.into(), method, args)?;
        let deadline = clock::deadline_after(started, timeout);
        match self.queue_one_way(&conn, frame, started, deadline) {
            Ok(_by_loop) => Ok(()),
            Err(SendOnError::Dead(_)) => Err(self.unsent(started, "the connection just died")),
            Err(SendOnError::Failed(e)) => Err(e),
        }
    }

    /// Queues one-way call `frame` on `conn`, waiting for room in its write
    /// queue up to `deadline`; `Ok(true)`: left to the connection's loop to
    /// write. `Dead` gives the frame back: the connection died before it
    /// was queued.
    fn queue_one_way(
        &self,
        conn: &Arc<ConnShared>,
        mut frame: Vec<u8>,
        started: Instant,
        deadline: Instant,
    ) -> std::result::Result<bool, SendOnError> {
        // Zero on one core, where the loop never polls on (see `OneWayPace`).
        let pace_window =
            crate::reactor::poll_time_here(self.inner.link.config().connection.busy_poll);
        loop {
            let by_loop = conn.one_way_pace.follows_within(started, pace_window);
            let sent = if by_loop {
                conn.hold_for_loop(frame)
            } else {
                conn.send(frame, Class::Data)
            };
            match sent {
                Ok(_) => return Ok(by_loop),
                Err(SendError::Closed(Some(unsent))) => return Err(SendOnError::Dead(unsent)),
                // A full write queue: the provider (or the network) takes
                // calls slower than they come. Wait for room, up to the
                // deadline, rather than fail: the caller is slowed down to
                // the provider's pace (a provider holding back one-way calls
                // past its `max_inflight` passes its pace back this way).
                Err(SendError::Overloaded(unsent)) => {
                    match conn.out.wait_for_room(&unsent, deadline) {
                        Room::Free => frame = unsent,
                        Room::Closed => return Err(SendOnError::Dead(unsent)),
                        Room::Full => {
                            let e = send_error(conn, SendError::Overloaded(unsent));
                            return Err(SendOnError::Failed(e));
                        }
                    }
                }
                Err(e) => return Err(SendOnError::Failed(send_error(conn, e))),
            }
        }
    }

    /// Shuts the client down for every clone: the connection is closed with
    /// Close(Normal) (the provider reports `peer_shutdown`) and not
    /// reconnected, calls waiting for a connection or for their response
    /// fail at once with [`Error::Shutdown`] (a request already sent may
    /// have run), and so does every later call. For a thread blocked in a
    /// call that another thread wants to end, e.g. at Ctrl-C while the
    /// provider is unreachable. What is still queued on the connection
    /// (one-way calls `send_one_way` accepted) is written before the Close,
    /// and the connection is closed when this returns: it waits until the
    /// provider has closed its side in turn, or [`ClientConfig::linger`]
    /// has passed (plus up to a second for the event loop to take the
    /// command; it does not wait on an event loop's own thread).
    /// Idempotent.
    pub fn shutdown(&self) {
        self.begin_shutdown().wait();
    }

    /// [`shutdown`](Self::shutdown) without the wait: the client is shut
    /// down when this returns (calls fail with `Shutdown`), and its loop is
    /// closing the connection; [`Closing::wait`] waits for that. A cluster
    /// begins every provider's close first, then waits for them all.
    pub(crate) fn begin_shutdown(&self) -> Closing {
        self.inner.link.set_state(LinkState::Shutdown);
        self.inner.begin_remove()
    }

    /// The provider's address: the one connected to, or being tried. When
    /// its name resolved to several addresses, the one that last connected
    /// between attempts (see [`connect`](Self::connect)).
    pub fn peer_addr(&self) -> SocketAddr {
        self.inner.link.addr()
    }

    /// Where the connection is right now.
    pub fn state(&self) -> ConnectionState {
        match &*self.inner.link.state.lock() {
            LinkState::Connecting { attempt, .. } => {
                ConnectionState::Connecting { attempt: *attempt }
            }
            LinkState::Ready(_) => ConnectionState::Ready,
            LinkState::Failed(_) => ConnectionState::Failed,
            LinkState::Shutdown => ConnectionState::Shutdown,
        }
    }

    /// Smoothed round-trip time of heartbeat pings, once one was answered.
    pub fn rtt(&self) -> Option<Duration> {
        self.inner.link.srtt()
    }

    /// Calls waiting for a response on the current connection.
    pub fn inflight(&self) -> usize {
        match &*self.inner.link.state.lock() {
            LinkState::Ready(conn) => conn.calls.len(),
            _ => 0,
        }
    }

    /// Liveness events: connected, heartbeat missed, disconnected, reconnecting.
    ///
    /// Every call returns a handle to the same bounded queue (capacity
    /// `ConnectionConfig::event_capacity`; when full, new events are dropped
    /// and logged): each event is received once, by one of the handles.
    pub fn events(&self) -> Receiver<Event> {
        self.inner.link.events().receiver()
    }
}

/// The time a call has: since when it waits (`started`, for the
/// `NotConnected` it may end with), until when (`deadline`), the timeout
/// it was given (for its `Timeout` error), and a connection it must not be
/// sent on (`avoid`: one that refused it while closing).
#[derive(Debug, Clone, Copy)]
struct Until {
    started: Instant,
    deadline: Instant,
    timeout: Duration,
    avoid: Option<u64>,
}

impl Until {
    /// `timeout` from now, on any connection.
    fn from_now(timeout: Duration) -> Until {
        let started = Instant::now();
        Until {
            started,
            deadline: clock::deadline_after(started, timeout),
            timeout,
            avoid: None,
        }
    }
}

/// When a request is written.
#[derive(Debug, Clone, Copy)]
enum Write {
    /// Before `start` returns, unless another thread is writing already or
    /// the connection's busy-polling loop is asked to (see `Client::send_on`).
    Now,
    /// With a later write (see [`Client::start_deferred`]).
    Deferred,
}

/// Why [`Client::send_on`] did not send.
enum SendOnError {
    /// The connection is dead and the request was never written: here it is
    /// back, to send on the next connection (or elsewhere).
    Dead(Vec<u8>),
    /// Anything else: the call fails with this.
    Failed(Error),
}

fn send_error(conn: &ConnShared, error: SendError) -> Error {
    match error {
        SendError::Closed(_) => Error::ConnectionLost {
            peer: conn.peer,
            reason: "connection closed while sending".into(),
        },
        SendError::Overloaded(_) => Error::Overloaded(format!(
            "more than max_write_queue_bytes are queued for {}",
            conn.peer
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::LinkState;
    use crate::{Client, ClientConfig, Server, ServerConfig, ServiceBuilder};

    /// Port 0 is no destination: refused at once rather than tried forever.
    #[test]
    fn a_provider_address_with_port_0_is_refused() {
        for open in [Client::connect, Client::connect_lazy] {
            let refused = open("127.0.0.1:0", ClientConfig::default());
            assert!(
                matches!(&refused, Err(crate::Error::InvalidConfig(why)) if why.contains("port 0")),
                "{:?}",
                refused.err()
            );
        }
    }

    /// A provider whose `t.sleep(ms)` runs on a worker and returns `ms`,
    /// with heartbeats too rare to send anything during a test: its Ping
    /// would end the client loop's polling (any event does).
    fn provider() -> Server {
        let service = ServiceBuilder::new("t").method("sleep", |ms: u64| {
            std::thread::sleep(Duration::from_millis(ms.min(10_000)));
            Ok::<_, String>(ms)
        });
        let mut config = ServerConfig::default();
        config.connection.heartbeat.interval = Duration::from_secs(60);
        Server::builder()
            .config(config)
            .service(service)
            .bind("127.0.0.1:0")
            .expect("bind a provider on loopback")
    }

    /// A client whose loop polls on for `busy_poll` after a call's turn,
    /// with heartbeats too rare to start a turn during a test. Its callers
    /// do not spin, so its loop reads every response: a spinning caller
    /// reads them itself, and a sleeping loop is not woken to poll on.
    fn client(server: &Server, busy_poll: Duration) -> Client {
        let mut config = ClientConfig::default();
        config.connection.busy_poll = busy_poll;
        config.spin_wait = Duration::ZERO;
        config.connection.heartbeat.interval = Duration::from_secs(60);
        Client::connect(server.local_addr(), config).expect("connect")
    }

    /// While a slow call is in flight and the client loop polls on (for
    /// 1 s after the warm-up call's answer), a second `start` is left to
    /// that loop, which must write it at once: the loop's poll ends on the
    /// command (no wake-up is sent to a polling loop). Were the command only
    /// seen at the next event, the quick call would wait for the end of the
    /// polling or for the slow answer, 1 to 1.5 s later.
    ///
    /// The poll began after the warm-up call was asked for, so it ends no
    /// earlier than 1 s after that (`asked`): with the bug the quick answer
    /// comes no sooner. A round whose quick call starts within 300 ms of
    /// `asked` must see its answer within 700 ms, so the bug always fails
    /// it, and a stall of up to 700 ms after that start does not. A round
    /// that a stall made meaningless (the quick call started later, or the
    /// loop had stopped polling, so that it was not left to the loop: with
    /// the slow call in flight, `by_loop` depends on the polling alone) is
    /// tried again: two rounds must count, out of 6 at most.
    #[test]
    fn a_request_left_to_the_polling_loop_goes_out_at_once() {
        let server = provider();
        let client = client(&server, Duration::from_secs(1));
        if crate::reactor::poll_time_here(Duration::from_secs(1)).is_zero() {
            // One core: the loops never poll on, so nothing is left to
            // them: a call started while another is in flight is written
            // by its caller.
            let slow = client.start::<_, u64>("t", "sleep", &300).unwrap();
            let quick = client.start::<_, u64>("t", "sleep", &0).unwrap();
            assert!(
                !slow.by_loop && !quick.by_loop,
                "left to a loop on one core"
            );
            assert_eq!(quick.wait().unwrap(), 0);
            assert_eq!(slow.wait().unwrap(), 300);
            return;
        }
        let polling = || match &*client.inner.link.state.lock() {
            super::LinkState::Ready(conn) => conn.owner.is_polling(),
            _ => false,
        };
        let (mut counted, mut stalled) = (0, Vec::new());
        for round in 0..6 {
            let asked = Instant::now();
            assert_eq!(client.call::<_, u64>("t", "sleep", &0).unwrap(), 0);
            // The answer is handed over before the loop's turn ends.
            let deadline = Instant::now() + Duration::from_secs(5);
            while !polling() {
                assert!(Instant::now() < deadline, "the client loop never polled on");
                std::thread::sleep(Duration::from_millis(1));
            }
            let slow = client.start::<_, u64>("t", "sleep", &1_500).unwrap();
            assert!(!slow.by_loop, "a lone call is written by its caller");
            let started = Instant::now();
            let quick = client.start::<_, u64>("t", "sleep", &0).unwrap();
            let (late, by_loop) = (started - asked, quick.by_loop);
            assert_eq!(quick.wait().unwrap(), 0);
            let took = started.elapsed();
            assert_eq!(slow.wait().unwrap(), 1_500);
            if !by_loop || late >= Duration::from_millis(300) {
                // The polling had ended, or might have been about to.
                stalled.push((round, by_loop, late, took));
                continue;
            }
            assert!(
                took < Duration::from_millis(700),
                "round {round}: the request left to the loop took {took:?}"
            );
            counted += 1;
            if counted == 2 {
                return;
            }
        }
        panic!(
            "{counted} of 6 rounds had the quick call left to a polling loop within 300 ms \
             of the warm-up (round, left to the loop, started after, took): {stalled:?}"
        );
    }

    /// A one-way call that follows another within `busy_poll` is left to
    /// the loop, which must write it by itself (no later write carries it
    /// here); the first one, and every one with busy polling off (or on one
    /// core), is written by its caller.
    #[test]
    fn a_one_way_call_right_after_another_is_written_by_the_loop() {
        // On one core the loops never poll on: nothing is left to them.
        let polls_on = !crate::reactor::poll_time_here(Duration::from_secs(1)).is_zero();
        let total = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let added = Arc::clone(&total);
        let service = ServiceBuilder::new("t").method("add", move |n: u64| {
            added.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            Ok::<_, String>(())
        });
        // Heartbeats too rare to write anything during the test: a Pong
        // would carry the held call out too.
        let mut config = ServerConfig::default();
        config.connection.heartbeat.interval = Duration::from_secs(60);
        let server = Server::builder()
            .config(config)
            .service(service)
            .bind("127.0.0.1:0")
            .expect("bind a provider on loopback");
        let reaches = |want: u64| {
            let deadline = Instant::now() + Duration::from_secs(5);
            while total.load(std::sync::atomic::Ordering::Relaxed) != want {
                assert!(
                    Instant::now() < deadline,
                    "the one-way calls never all arrived"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        // A window of 1 s: the second send follows the first in any case.
        let pacing = client(&server, Duration::from_secs(1));
        assert!(!pacing.send_one_way_by("t".into(), "add", &1u64).unwrap());
        assert_eq!(
            pacing.send_one_way_by("t".into(), "add", &10u64).unwrap(),
            polls_on
        );
        reaches(11);
        let not_polling = client(&server, Duration::ZERO);
        assert!(
            !not_polling
                .send_one_way_by("t".into(), "add", &100u64)
                .unwrap()
        );
        assert!(
            !not_polling
                .send_one_way_by("t".into(), "add", &1_000u64)
                .unwrap()
        );
        reaches(1_111);
    }

    /// A connection whose callers read their answers keeps their read
    /// buffer while they do, and gives it back once they have not for a
    /// heartbeat interval (checked at each of the consumer's pings).
    #[test]
    fn an_idle_connection_gives_back_its_callers_read_buffer() {
        let server = provider();
        let mut config = ClientConfig::default();
        config.connection.heartbeat.interval = Duration::from_millis(50);
        let client = Client::connect(server.local_addr(), config).expect("connect");
        let has_buf = || match &*client.inner.link.state.lock() {
            LinkState::Ready(conn) => conn.reader.lock().caller_buf.is_some(),
            _ => false,
        };
        // A caller reads its answer itself only when it may spin (few
        // callers wait in the whole process, other tests' included) and
        // gets to the socket before the loop: call until one has.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !has_buf() {
            assert!(Instant::now() < deadline, "no caller read its own answer");
            assert_eq!(client.call::<_, u64>("t", "sleep", &0).unwrap(), 0);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while has_buf() {
            assert!(
                Instant::now() < deadline,
                "the idle connection kept its callers' read buffer"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Without busy polling a caller always writes its own request.
    #[test]
    fn without_busy_polling_callers_write_their_requests() {
        let server = provider();
        let client = client(&server, Duration::ZERO);
        assert_eq!(client.call::<_, u64>("t", "sleep", &0).unwrap(), 0);
        let slow = client.start::<_, u64>("t", "sleep", &300).unwrap();
        let quick = client.start::<_, u64>("t", "sleep", &0).unwrap();
        assert!(!quick.by_loop);
        assert_eq!(quick.wait().unwrap(), 0);
        assert_eq!(slow.wait().unwrap(), 300);
    }
}
