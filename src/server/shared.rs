//! What a server's event loops share ([`ServerShared`]): the registry, the
//! worker queue, the connection count, and the dispatch of each request
//! read, inline or to the pool.

use super::worker::{finish, respond};
use super::*;

/// The route of the last request a connection made, kept by its event loop
/// so that the next request with the same service, version, group and
/// method (the usual case) skips decoding the four strings and looking them
/// up.
///
/// Why comparing bytes is enough: MessagePack values delimit themselves, so
/// a body that starts with `prefix` holds the same array header and the same
/// four strings, names the same method, and has its arguments right after.
pub(crate) struct Route {
    /// A request body up to its arguments, as it came on the wire.
    prefix: Vec<u8>,
    /// What those bytes name in the registry (which never changes while the
    /// server runs).
    method: Method,
}

/// What a server's event loops share.
pub(crate) struct ServerShared {
    pub(super) registry: Registry,
    pub(super) jobs: Arc<JobQueue<Job>>,
    /// See [`QueueHolds`].
    pub(super) queue_holds: Arc<QueueHolds>,
    pub(super) shutting_down: AtomicBool,
    pub(super) connections: AtomicUsize,
    pub(super) config: ServerConfig,
    pub(super) events: EventSink,
}

impl ServerShared {
    pub(crate) fn config(&self) -> &ServerConfig {
        &self.config
    }

    pub(crate) fn events(&self) -> &EventSink {
        &self.events
    }

    /// Counts a new connection; false when `max_connections` are open.
    pub(crate) fn admit_connection(&self) -> bool {
        let max = self.config.max_connections;
        self.connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    pub(crate) fn release_connection(&self) {
        self.connections.fetch_sub(1, Ordering::AcqRel);
    }

    /// Wakes workers for pool jobs left waiting too long for a busy worker
    /// (see `JobQueue::watch`); when to call again, `None` while no job
    /// waits so. The event loops call it as they poll and before they sleep.
    pub(crate) fn watch_jobs(&self, now: Instant) -> Option<Instant> {
        self.jobs.watch(now)
    }

    /// Whether a pool job waits for a busy worker (see
    /// [`watch_jobs`](Self::watch_jobs)); one atomic load.
    pub(crate) fn jobs_waiting(&self) -> bool {
        self.jobs.has_left_jobs()
    }

    /// Handles a Request or OneWay read by an event loop; `last_route` is the
    /// connection's [`Route`] cache. `Err` is a protocol violation (the body
    /// is not a request); every other failure is answered with a Response
    /// status and the connection stays open.
    pub(crate) fn dispatch(
        &self,
        conn: &Arc<ConnShared>,
        frame: FrameRef<'_>,
        last_route: &mut Option<Box<Route>>,
    ) -> std::result::Result<(), String> {
        let id = frame.header.id;
        let one_way = frame.header.kind == Kind::OneWay;
        // A one-way call has no answer to carry a refusal. Overload never
        // refuses one: past `max_inflight` the loop holds the connection's
        // reads before it gets here (`holds_one_way`), and a full worker
        // queue takes it anyway (below). Nor does a shutdown: the
        // connection drains, and as in a `max_age` drain a one-way call is
        // still handled (nothing could tell its consumer to send it again;
        // only once the worker queue is closed, at the end, is it dropped).
        // What is left is an unknown service or method: dropped, as the
        // protocol says (docs/PROTOCOL.md, section 2).
        let refuse = |status: ResponseStatus, message: &str| {
            if one_way {
                log::debug!("{}: one-way call {id} dropped: {message}", conn.peer);
            } else {
                respond(conn, encode_error_response(id, status, message));
            }
        };
        // A request that reaches here while the server shuts down (its
        // connection not yet draining: the loop is told just after).
        let shutting_down = || {
            let down = !one_way && self.shutting_down.load(Ordering::Relaxed);
            if down {
                refuse(ResponseStatus::ShuttingDown, "the server is shutting down");
            }
            down
        };
        let route: &Route = match last_route {
            Some(route) if frame.body.starts_with(&route.prefix) => {
                // Cannot panic: the body starts with `prefix`.
                request_args(&frame.body[route.prefix.len()..]).map_err(|e| e.to_string())?;
                if shutting_down() {
                    return Ok(());
                }
                route
            }
            _ => {
                let request = decode_request_body(&frame.body).map_err(|e| e.to_string())?;
                if shutting_down() {
                    return Ok(());
                }
                let method = self.registry.find(
                    request.service,
                    request.version,
                    request.group,
                    request.method,
                );
                // No underflow: the arguments end the body (no trailing bytes).
                let args_at = frame.body.len() - request.args.len();
                match method {
                    Lookup::Found(method) => last_route.insert(Box::new(Route {
                        // Cannot panic: `args_at <= frame.body.len()`.
                        prefix: frame.body[..args_at].to_vec(),
                        method: method.clone(),
                    })),
                    Lookup::NoService => {
                        let message = format!(
                            "no service {:?} with version {:?} and group {:?}",
                            request.service, request.version, request.group
                        );
                        refuse(ResponseStatus::ServiceNotFound, &message);
                        return Ok(());
                    }
                    Lookup::NoMethod => {
                        let message = format!(
                            "service {:?} has no method {:?}",
                            request.service, request.method
                        );
                        refuse(ResponseStatus::MethodNotFound, &message);
                        return Ok(());
                    }
                }
            }
        };
        let method = &route.method;
        let args_at = route.prefix.len();
        // Cannot fail: `prefix` is a prefix of the body.
        let args = frame.body.get(args_at..).unwrap_or_default();
        if conn.handling.fetch_add(1, Ordering::Relaxed) >= self.config.max_inflight {
            conn.handling.fetch_sub(1, Ordering::Relaxed);
            let message = format!(
                "{} requests of this connection are being handled (max_inflight)",
                self.config.max_inflight
            );
            refuse(ResponseStatus::Overloaded, &message);
            return Ok(());
        }
        match method.mode {
            HandlerMode::Inline => {
                let max_body = self.config.connection.max_frame_len;
                let response = method.handler.invoke(id, args, max_body);
                finish(conn, response, one_way);
                if let Cow::Owned(body) = frame.body {
                    // A large body's own buffer: kept for the next one.
                    frame_pool::recycle(body);
                }
            }
            HandlerMode::Pool => {
                let job = Job::Run {
                    conn: conn.clone(),
                    id,
                    handler: method.handler.clone(),
                    // Out of the read buffer: the job outlives this read.
                    body: frame.body.into_owned(),
                    args_at,
                    one_way,
                };
                let pushed = match self.jobs.try_push(job) {
                    Err(PushError::Full(job))
                        if one_way && self.queue_holds.len() >= self.config.max_connections =>
                    {
                        // A one-way call finding the queue full (see the next
                        // arm), with as many jobs past the bound as
                        // connections may be open: some are of connections
                        // gone since (a consumer that resets and connects
                        // again), and taking one more per connection would
                        // grow the queue without end. This call is dropped,
                        // and its connection closed, so its consumer knows.
                        conn.request_close(CloseStatus::Overloaded, || {
                            let detail = "the worker queue is full, past its bound by max_connections one-way calls";
                            log::warn!("{}: closing: {detail}", conn.peer);
                            DisconnectReason::Overloaded(detail.to_string())
                        });
                        Err(PushError::Full(job))
                    }
                    // A one-way call has no answer to refuse it with: it is
                    // queued anyway, and the connection reads nothing more
                    // until the workers have taken the queue below half (a
                    // queue over its bound by at most one job per provider
                    // connection). Meanwhile the queue is full from half on,
                    // so that the others' calls cannot keep it there: theirs
                    // are refused (or held too) until it is below half.
                    // Marked and listed before the push, so that the worker
                    // told of room finds it.
                    Err(PushError::Full(job)) if one_way => {
                        conn.hold_reads_for_queue();
                        self.queue_holds.add(conn);
                        let pushed = self.jobs.push_past_bound(job);
                        if pushed.is_err() {
                            conn.resume_reads_held_for_queue();
                        }
                        pushed
                    }
                    pushed => pushed,
                };
                if let Err(e) = pushed {
                    conn.handling.fetch_sub(1, Ordering::Relaxed);
                    let (status, message) = match e {
                        PushError::Full(_) => {
                            (ResponseStatus::Overloaded, "the worker queue is full")
                        }
                        PushError::Closed(_) => {
                            (ResponseStatus::ShuttingDown, "the server is shutting down")
                        }
                    };
                    refuse(status, message);
                }
            }
        }
        Ok(())
    }
}
