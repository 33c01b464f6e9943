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
//! ```no_run
//! use pulse::{Client, ClientConfig};
//! let client = Client::connect("127.0.0.1:7000", ClientConfig::default())?;
//! let n: u64 = client.call("demo", "ping", &7u64)?;
//! assert_eq!(n, 7);
//! # Ok::<(), pulse::Error>(())
//! ```

use std::marker::PhantomData;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use parking_lot::{Condvar, Mutex};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::clock;
use crate::config::ClientConfig;
use crate::error::{Error, Result};
use crate::event::{DisconnectReason, Event, EventHook, EventSink};
use crate::protocol::{
    Frame, HEADER_LEN, Kind, ResponseStatus, decode_text_body, encode_request, frame_pool,
};
use crate::reactor::{CallSlot, Class, Command, ConnShared, LoopHandle, Room, Runtime, SendError};

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

/// A link's state as its event loop publishes it to callers.
pub(crate) enum LinkState {
    Connecting {
        attempt: u32,
        last_error: Option<String>,
    },
    Ready(Arc<ConnShared>),
    Failed(String),
    Shutdown,
}

/// One provider a consumer keeps connected. Its event loop owns the
/// connection and its backoff; callers only read the published state.
pub(crate) struct Link {
    id: u64,
    /// Every address the provider's name resolved to, in the resolver's
    /// order, without repeats. Never empty: `Client::open` refuses a name
    /// that resolves to nothing.
    addrs: Box<[SocketAddr]>,
    /// Index in `addrs` of the address the connection, or the attempt in
    /// progress, uses; always below `addrs.len()`
    /// ([`use_address`](Self::use_address) keeps it so). Only the link's
    /// loop changes it.
    current: AtomicUsize,
    config: ClientConfig,
    events: EventSink,
    state: Mutex<LinkState>,
    changed: Condvar,
    srtt_nanos: AtomicU64,
}

impl Link {
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// The address the connection, or the attempt in progress, uses.
    pub(crate) fn addr(&self) -> SocketAddr {
        // In bounds: `current` is below `addrs.len()` (see the field).
        self.addrs[self.current.load(Ordering::Relaxed)]
    }

    /// How many addresses the provider's name resolved to.
    pub(crate) fn address_count(&self) -> usize {
        self.addrs.len()
    }

    /// Makes the `index`th address (modulo their count) the one the next
    /// attempt uses.
    pub(crate) fn use_address(&self, index: usize) {
        self.current
            .store(index % self.addrs.len(), Ordering::Relaxed);
    }

    pub(crate) fn config(&self) -> &ClientConfig {
        &self.config
    }

    pub(crate) fn events(&self) -> &EventSink {
        &self.events
    }

    /// Publishes a new state and wakes callers waiting for a connection;
    /// false, changing nothing, once the link is shut down. `Shutdown` is
    /// final: [`Client::shutdown`] sets it before its loop has closed the
    /// link, and a connect that completes in between must not make the link
    /// usable again.
    pub(crate) fn set_state(&self, state: LinkState) -> bool {
        self.set_state_then(state, || {})
    }

    /// Makes `conn` the link's ready connection and emits `Connected`, unless
    /// the link is shut down (false). The event goes out before the lock is
    /// released, so it is in the events channel before any caller can use
    /// the connection: whoever reads the events alongside calls' results
    /// never sees an answer from a connection before its `connected`.
    pub(crate) fn set_ready(&self, conn: Arc<ConnShared>) -> bool {
        let peer = conn.peer;
        self.set_state_then(LinkState::Ready(conn), || {
            self.events.emit(Event::Connected { peer })
        })
    }

    /// Takes the link out of `Ready` as its connection is closed, so that no
    /// new call picks that connection, and emits `Disconnected` before any
    /// caller can see the change: the event is in the channel before the
    /// calls in flight fail with `ConnectionLost`. False, changing nothing,
    /// once the link is shut down (the end is then reported once the
    /// connection is gone, as for a connection that never became ready).
    pub(crate) fn set_lost(&self, reason: &DisconnectReason) -> bool {
        let state = LinkState::Connecting {
            attempt: 0,
            last_error: Some(reason.to_string()),
        };
        self.set_state_then(state, || {
            self.events.emit(Event::Disconnected {
                peer: self.addr(),
                reason: reason.clone(),
            })
        })
    }

    /// [`set_state`](Self::set_state), running `announce` after the change
    /// but while callers still cannot see it (the state's lock is held).
    /// `announce` must not block or touch the link's state.
    fn set_state_then(&self, state: LinkState, announce: impl FnOnce()) -> bool {
        let changed = {
            let mut current = self.state.lock();
            let open = !matches!(*current, LinkState::Shutdown);
            if open {
                *current = state;
                announce();
            }
            open
        };
        self.changed.notify_all();
        changed
    }

    /// Whether [`Client::shutdown`] (or the loop, on `RemoveLink`) shut the
    /// link down.
    pub(crate) fn is_shut_down(&self) -> bool {
        matches!(*self.state.lock(), LinkState::Shutdown)
    }

    pub(crate) fn set_srtt(&self, srtt: Duration) {
        let nanos = u64::try_from(srtt.as_nanos()).unwrap_or(u64::MAX).max(1);
        self.srtt_nanos.store(nanos, Ordering::Relaxed);
    }

    /// The ready connection, waiting for one until `deadline`. A connection
    /// with id `dead` (found dead by the caller) is waited past, not returned.
    fn ready_conn(
        &self,
        deadline: Instant,
        started: Instant,
        dead: Option<u64>,
    ) -> Result<Arc<ConnShared>> {
        let mut state = self.state.lock();
        loop {
            match &*state {
                LinkState::Ready(conn) if Some(conn.id) != dead => return Ok(conn.clone()),
                LinkState::Ready(_) => {
                    if self.changed.wait_until(&mut state, deadline).timed_out() {
                        return Err(Error::NotConnected {
                            peer: self.addr(),
                            waited: started.elapsed(),
                            detail: "the connection died and no new one was ready in time".into(),
                        });
                    }
                }
                LinkState::Shutdown => return Err(Error::Shutdown),
                LinkState::Failed(why) => {
                    return Err(Error::NotConnected {
                        peer: self.addr(),
                        waited: started.elapsed(),
                        detail: why.clone(),
                    });
                }
                LinkState::Connecting { .. } => {
                    if self.changed.wait_until(&mut state, deadline).timed_out() {
                        let detail = match &*state {
                            LinkState::Connecting {
                                last_error: Some(e),
                                ..
                            } => format!("last attempt: {e}"),
                            _ => "still connecting".to_string(),
                        };
                        return Err(Error::NotConnected {
                            peer: self.addr(),
                            waited: started.elapsed(),
                            detail,
                        });
                    }
                }
            }
        }
    }
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
            link_id: self.link.id,
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

/// The event-loop and timer threads that run clients' connections, shared
/// by every client in the process whose settings give the same loops
/// ([`LoopSettings`]): the first such client starts them (a loop's thread
/// when the loop gets its first client), later ones take their loops in
/// turn, and the threads stop (the loops closing what they still hold)
/// when the last client using them and the last other handle are dropped. Sharing them keeps a consumer process at a loop per core
/// however many providers it calls, as a provider is; Netty's clients
/// share one event-loop group the same way.
pub(crate) struct ClientRuntime {
    runtime: Runtime,
    /// Counts the clients given a loop, to hand the loops out in turn.
    handed_out: AtomicUsize,
}

/// What a client runtime is started with: clients whose settings agree on
/// these share one.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LoopSettings {
    event_loops: usize,
    timer_tick: Duration,
    busy_poll: Duration,
    loop_cpus: Vec<usize>,
}

impl LoopSettings {
    fn of(config: &ClientConfig) -> LoopSettings {
        LoopSettings {
            event_loops: config.event_loops,
            timer_tick: config.connection.timer_tick,
            busy_poll: config.connection.busy_poll,
            loop_cpus: config.connection.loop_cpus.clone(),
        }
    }
}

/// The runtimes clients run on, by their settings. Weak: a runtime's
/// clients own it, and the entry only lets the next client find it while
/// one does. Entries whose runtime is gone are dropped as new ones are
/// added, so the list is as long as the kinds of settings in use.
static RUNTIMES: Mutex<Vec<(LoopSettings, Weak<ClientRuntime>)>> = Mutex::new(Vec::new());

impl ClientRuntime {
    /// The runtime for clients with `config`'s loop settings: the one that
    /// runs already, or a new one (threads `pulse-client-loop-{i}` and the
    /// timer thread).
    pub(crate) fn shared(config: &ClientConfig) -> Result<Arc<ClientRuntime>> {
        let settings = LoopSettings::of(config);
        // Held while a runtime starts, so that two clients connecting at
        // once do not start two. Dropping a runtime (joining its threads)
        // never happens under it: only the upgraded `Arc`s can drop it,
        // and they leave this function.
        let mut runtimes = RUNTIMES.lock();
        if let Some(running) = runtimes
            .iter()
            .filter(|(s, _)| *s == settings)
            .find_map(|(_, runtime)| runtime.upgrade())
        {
            return Ok(running);
        }
        let runtime = Arc::new(ClientRuntime {
            runtime: Runtime::start_lazily("pulse-client", config.event_loops, &config.connection)?,
            handed_out: AtomicUsize::new(0),
        });
        runtimes.retain(|(_, runtime)| runtime.strong_count() > 0);
        runtimes.push((settings, Arc::downgrade(&runtime)));
        Ok(runtime)
    }

    /// The loop for the next client, its thread started if this is the
    /// loop's first client: loops are handed out in turn, so a process
    /// with fewer clients than loops runs only as many loops as clients.
    fn next_loop(&self) -> Result<LoopHandle> {
        let loops = self.runtime.loops();
        let turn = self.handed_out.fetch_add(1, Ordering::Relaxed);
        let index = turn % loops.len(); // `Runtime::start_lazily` made at least one
        self.runtime.start_loop(index)?;
        Ok(loops[index].clone())
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
        if addrs.is_empty() {
            return Err(Error::InvalidConfig(
                "the provider address resolved to nothing".into(),
            ));
        }
        // Port 0 means "any port" to bind; as a destination it can only be
        // refused, attempt after attempt.
        if let Some(addr) = addrs.iter().find(|a| a.port() == 0) {
            return Err(Error::InvalidConfig(format!(
                "the provider address {addr} has port 0: give the port the provider listens on"
            )));
        }
        let runtime = ClientRuntime::shared(&config)?;
        let owner = runtime.next_loop()?;
        let link = Arc::new(Link {
            id: crate::next_id(),
            addrs: addrs.into_boxed_slice(),
            current: AtomicUsize::new(0),
            events,
            config,
            state: Mutex::new(LinkState::Connecting {
                attempt: 0,
                last_error: None,
            }),
            changed: Condvar::new(),
            srtt_nanos: AtomicU64::new(0),
        });
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
        let timeout = self.inner.link.config.call_timeout;
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
        let timeout = self.inner.link.config.call_timeout;
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
    /// with `ConnectionLost` like any other call in flight (not retried on
    /// the next connection).
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
        let timeout = self.inner.link.config.call_timeout;
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
        let max_body = self.inner.link.config.connection.max_frame_len;
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
        let config = &self.inner.link.config;
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
        let deadline = clock::deadline_after(started, link.config.call_timeout);
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
            crate::reactor::poll_time_here(self.inner.link.config.connection.busy_poll);
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
        match self.inner.link.srtt_nanos.load(Ordering::Relaxed) {
            0 => None,
            nanos => Some(Duration::from_nanos(nanos)),
        }
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
        self.inner.link.events.receiver()
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

/// A call whose request is sent; [`PendingCall::wait`] returns its result.
///
/// Dropping it without waiting abandons the call (its slot is freed; a late
/// response is discarded).
pub struct PendingCall<R> {
    conn: Arc<ConnShared>,
    slot: Arc<CallSlot>,
    id: u64,
    deadline: Instant,
    timeout: Duration,
    /// `ClientConfig::spin_wait`.
    spin: Duration,
    waited: bool,
    /// Started by `start_deferred`: counted in `ConnShared::deferred_open`
    /// until dropped.
    deferred: bool,
    /// Its request was left to the loop to write (see `Client::send_on`).
    by_loop: bool,
    _result: PhantomData<fn() -> R>,
}

impl<R: DeserializeOwned> PendingCall<R> {
    /// Blocks until the response arrives, the connection dies, or the call's
    /// timeout passes. If the response is not there yet, it first writes the
    /// requests that [`Client::start_deferred`] holds on the connection.
    ///
    /// # Errors
    /// `Timeout`, `ConnectionLost`, `Remote`, `Codec`, `Protocol`; and
    /// `Shutdown` when the client was shut down meanwhile, by
    /// [`Client::shutdown`] or by dropping its last clone (a `PendingCall`
    /// does not keep the client alive).
    pub fn wait(mut self) -> Result<R> {
        self.waited = true;
        if !self.by_loop && !self.slot.is_done() {
            // This request may be among those deferred (`start_deferred`):
            // they go out now rather than wait for a write that may never
            // come. A failed write closes the connection, which fails this
            // call (ConnectionLost) through the loop.
            let _ = self.conn.flush_held();
        }
        let outcome = match self.slot.wait_reading(self.deadline, self.spin, &self.conn) {
            Some(outcome) => outcome,
            None => {
                self.conn.calls.remove(self.id);
                // The response may have been delivered between the timeout and
                // the removal: take it rather than lose it.
                match self.slot.wait(Instant::now()) {
                    Some(outcome) => outcome,
                    None => return Err(Error::Timeout(self.timeout)),
                }
            }
        };
        decode_response(outcome?)
    }
}

impl<R> Drop for PendingCall<R> {
    fn drop(&mut self) {
        if !self.waited {
            self.conn.calls.remove(self.id);
        }
        if self.deferred {
            self.conn.deferred_done();
        }
        CallSlot::recycle(&mut self.slot);
    }
}

/// Decodes a response, then keeps its body's buffer for this thread's next
/// request (see `frame_pool`): it came from the loop, and freeing it here
/// would wait for the loop's allocator lock.
fn decode_response<R: DeserializeOwned>(frame: Frame) -> Result<R> {
    let result = decode_response_body(&frame);
    frame_pool::recycle(frame.body);
    result
}

fn decode_response_body<R: DeserializeOwned>(frame: &Frame) -> Result<R> {
    match ResponseStatus::from_u8(frame.header.status) {
        Some(ResponseStatus::Ok) => rmp_serde::from_slice(&frame.body).map_err(|e| {
            Error::Codec(format!(
                "the result does not decode as {}: {e}",
                std::any::type_name::<R>()
            ))
        }),
        Some(status) => Err(Error::Remote {
            status,
            message: decode_text_body(&frame.body),
        }),
        None => Err(Error::Protocol(format!(
            "response with unknown status {}: {}",
            frame.header.status,
            decode_text_body(&frame.body)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, AtomicUsize};
    use std::time::{Duration, Instant};

    use parking_lot::{Condvar, Mutex};

    use super::{Link, LinkState};
    use crate::event::EventSink;
    use crate::{Client, ClientConfig, Server, ServerConfig, ServiceBuilder};

    /// Clients whose loop settings agree run on one runtime, whose loops
    /// start as clients are handed them; other settings get another
    /// runtime; the runtime ends with the last of its clients, and the
    /// next client with those settings starts a new one. (Settings no other
    /// test uses, so that no other test's clients hold the runtime.)
    #[test]
    fn clients_share_the_runtime_of_their_loop_settings() {
        let mut config = ClientConfig {
            event_loops: 3,
            ..ClientConfig::default()
        };
        config.connection.timer_tick = Duration::from_millis(7);
        // Nothing listens there: the clients keep trying, which is enough.
        let nowhere = "127.0.0.1:9";
        let open = |config: &ClientConfig| Client::connect_lazy(nowhere, config.clone()).unwrap();
        let runtime = |client: &Client| Arc::clone(&client.inner._runtime);

        let a = open(&config);
        assert_eq!(runtime(&a).runtime.loops().len(), 3);
        // A loop's thread starts with its first client.
        assert_eq!(runtime(&a).runtime.running_loops(), 1);
        let b = open(&config);
        assert!(Arc::ptr_eq(&runtime(&a), &runtime(&b)));
        assert_eq!(runtime(&a).runtime.running_loops(), 2);
        let mut other = config.clone();
        other.connection.busy_poll = Duration::from_micros(77);
        let c = open(&other);
        assert!(!Arc::ptr_eq(&runtime(&a), &runtime(&c)));

        let first = Arc::downgrade(&runtime(&a));
        drop((a, b));
        assert!(
            first.upgrade().is_none(),
            "the runtime outlived its clients"
        );
        let d = open(&config);
        assert!(!std::ptr::eq(first.as_ptr(), Arc::as_ptr(&runtime(&d))));
        drop((c, d));
    }

    /// `Shutdown` is final: what the loop publishes after a
    /// `Client::shutdown` (a reconnect scheduled, a connect completing)
    /// cannot replace it.
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

    #[test]
    fn a_shut_down_link_stays_shut_down() {
        let link = connecting_link();
        let connecting = |attempt| LinkState::Connecting {
            attempt,
            last_error: None,
        };
        assert!(link.set_state(connecting(1)));
        assert!(!link.is_shut_down());
        assert!(link.set_state(LinkState::Shutdown));
        assert!(!link.set_state(connecting(2)));
        assert!(!link.set_state(LinkState::Failed("gave up".into())));
        assert!(link.is_shut_down());
    }

    /// A link still connecting, whose events go to a 16-slot channel.
    fn connecting_link() -> Link {
        Link {
            id: 1,
            addrs: Box::new(["127.0.0.1:1".parse().unwrap()]),
            current: AtomicUsize::new(0),
            events: EventSink::new(16, "client"),
            config: ClientConfig::default(),
            state: Mutex::new(LinkState::Connecting {
                attempt: 0,
                last_error: None,
            }),
            changed: Condvar::new(),
            srtt_nanos: AtomicU64::new(0),
        }
    }

    /// A connection's shared part over one end of a Unix socket pair, owned
    /// by a loop that never runs (nothing here sends it a command).
    fn idle_conn() -> Arc<crate::reactor::ConnShared> {
        use socket2::{Domain, Socket, Type};
        let (near, _far) = Socket::pair(Domain::UNIX, Type::STREAM, None).unwrap();
        let poll = mio::Poll::new().unwrap();
        let (tx, _rx) = crossbeam_channel::unbounded();
        let waker = mio::Waker::new(poll.registry(), mio::Token(0)).unwrap();
        let owner = crate::reactor::LoopHandle::new(0, tx, waker);
        let peer = "127.0.0.1:1".parse().unwrap();
        Arc::new(crate::reactor::ConnShared::new(
            0,
            peer,
            near,
            1 << 20,
            1 << 20,
            owner,
        ))
    }

    /// What `set_state_then` announces is announced while callers cannot
    /// see the new state yet (the state's lock is still held), and nothing
    /// is announced once the link is shut down.
    #[test]
    fn a_state_change_is_announced_before_callers_can_see_it() {
        let link = connecting_link();
        let mut announced = 0;
        let ready = link.set_state_then(LinkState::Failed("test".into()), || {
            announced += 1;
            assert!(link.state.try_lock().is_none(), "announced after unlocking");
        });
        assert!(ready);
        assert_eq!(announced, 1);
        assert!(link.set_state(LinkState::Shutdown));
        let changed = link.set_state_then(LinkState::Failed("late".into()), || announced += 1);
        assert!(!changed);
        assert_eq!(announced, 1, "a shut-down link announced a change");
    }

    /// A caller that finds the link ready finds its `Connected` already in
    /// the events channel: a watcher spinning on the state's lock takes it
    /// the moment `set_ready` lets go. Repeated, since the watcher need not
    /// win that race every time (emitting after unlocking, when tried,
    /// failed in the first round in three runs of three).
    #[test]
    fn connected_is_emitted_before_a_caller_can_see_the_link_ready() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let link = connecting_link();
        let events = link.events.receiver();
        let conn = idle_conn();
        let peer = conn.peer;
        for round in 0..200 {
            assert!(link.set_state(LinkState::Connecting {
                attempt: round,
                last_error: None,
            }));
            while events.try_recv().is_ok() {}
            let watching = AtomicBool::new(false);
            let seen = std::thread::scope(|scope| {
                let watcher = scope.spawn(|| {
                    watching.store(true, Ordering::Release);
                    loop {
                        let state = link.state.lock();
                        if matches!(*state, LinkState::Ready(_)) {
                            return events.try_recv().ok();
                        }
                        drop(state);
                        std::hint::spin_loop();
                    }
                });
                while !watching.load(Ordering::Acquire) {
                    std::hint::spin_loop();
                }
                assert!(link.set_ready(conn.clone()));
                watcher.join().expect("the watcher thread")
            });
            assert_eq!(
                seen,
                Some(crate::Event::Connected { peer }),
                "round {round}: the link was ready before its Connected was emitted"
            );
        }
    }

    /// `set_lost` takes a ready link out of `Ready` (no attempt made yet
    /// since the healthy connection) and emits `Disconnected` with the
    /// reason; on a shut-down link it changes and emits nothing, leaving
    /// the report to the end of the connection.
    #[test]
    fn a_lost_connection_is_reported_as_the_link_leaves_ready() {
        use crate::DisconnectReason;
        let link = connecting_link();
        let events = link.events.receiver();
        let conn = idle_conn();
        let peer = conn.peer;
        assert!(link.set_ready(conn));
        assert_eq!(
            events.try_recv().ok(),
            Some(crate::Event::Connected { peer })
        );

        assert!(link.set_lost(&DisconnectReason::HeartbeatTimeout));
        assert_eq!(
            events.try_recv().ok(),
            Some(crate::Event::Disconnected {
                peer,
                reason: DisconnectReason::HeartbeatTimeout
            })
        );
        match &*link.state.lock() {
            LinkState::Connecting {
                attempt: 0,
                last_error: Some(e),
            } => assert_eq!(*e, DisconnectReason::HeartbeatTimeout.to_string()),
            _ => panic!("a lost link should be Connecting, no attempt made yet"),
        }

        assert!(link.set_state(LinkState::Shutdown));
        assert!(!link.set_lost(&DisconnectReason::Shutdown));
        assert!(
            events.try_recv().is_err(),
            "a shut-down link reported a loss"
        );
        assert!(link.is_shut_down());
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
        for round in 0..2 {
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
            assert!(
                quick.by_loop,
                "round {round}: the polling loop was not asked to write"
            );
            assert_eq!(quick.wait().unwrap(), 0);
            let took = started.elapsed();
            assert!(
                took < Duration::from_millis(500),
                "round {round}: the request left to the loop took {took:?}"
            );
            assert_eq!(slow.wait().unwrap(), 1_500);
        }
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
