//! The worker pool: the jobs the event loops queue for it, the workers
//! that run them, and the connections whose reads wait for room in the
//! queue.

use super::*;

/// A request for the worker pool.
pub(super) enum Job {
    Run {
        conn: Arc<ConnShared>,
        id: u64,
        handler: Arc<dyn Handler>,
        /// The whole request body; the arguments start at `args_at`.
        body: Vec<u8>,
        args_at: usize,
        one_way: bool,
    },
    Stop,
}

/// Provider connections whose reads are held because a one-way call found
/// the worker queue full (see `ServerShared::dispatch`), until a worker
/// takes the queue below half: then all of them read on together. While
/// any is held the queue counts as full from half on (`JobQueue::try_push`),
/// so other connections cannot keep it over half and hold these for good.
#[derive(Default)]
pub(crate) struct QueueHolds {
    conns: Mutex<Vec<Arc<ConnShared>>>,
}

impl QueueHolds {
    pub(super) fn add(&self, conn: &Arc<ConnShared>) {
        self.conns.lock().push(Arc::clone(conn));
    }

    /// Connections held since the workers last made room: one per job
    /// queued past the bound meanwhile, whether its connection is still
    /// open or not.
    pub(super) fn len(&self) -> usize {
        self.conns.lock().len()
    }

    /// Lets go of every held connection without resuming it (a shut-down
    /// server's: their sockets close with their last reference).
    pub(super) fn forget_all(&self) {
        self.conns.lock().clear();
    }

    /// Lets every held connection read on (one that closed meanwhile, or was
    /// let go already, is skipped).
    pub(super) fn resume_all(&self) {
        let conns = std::mem::take(&mut *self.conns.lock());
        for conn in conns {
            conn.resume_reads_held_for_queue();
        }
    }
}

/// A worker's life: runs jobs until `Job::Stop`, answering each with a body
/// of at most `max_body` bytes (this provider's `max_frame_len`).
pub(super) fn run_worker(jobs: &JobQueue<Job>, queue_holds: &QueueHolds, max_body: u32) {
    // A worker frees most of what it allocates itself (see `frame_pool::opt_out`).
    frame_pool::opt_out();
    let mut finished = false;
    loop {
        let (job, room) = jobs.pop_noting_room(finished);
        if room {
            queue_holds.resume_all();
        }
        match job {
            Job::Stop => return,
            Job::Run {
                conn,
                id,
                handler,
                body,
                args_at,
                one_way,
            } => {
                if !one_way && conn.out.refuses_frames() {
                    skip_request(&conn, id, body);
                    finished = true;
                    continue;
                }
                let response =
                    handler.invoke(id, body.get(args_at..).unwrap_or_default(), max_body);
                // A large body's buffer goes back for the loop's next one
                // (see `frame_pool`); a small one is freed.
                frame_pool::recycle(body);
                if one_way || jobs.is_empty() {
                    finish(&conn, response, one_way);
                } else {
                    // More jobs wait, so more responses follow: they go out
                    // together, written by the connection's loop, instead of
                    // one write each from whichever worker ran them. The loop
                    // writes them on its next turn, however long the next
                    // jobs take; a lone response is written at once, above.
                    let _replying = conn.call_finished();
                    respond_with(&conn, conn.hold_for_loop(response));
                }
                finished = true;
            }
        }
    }
}

/// Drops a queued request instead of running it: its connection takes
/// no more frames (it was closed, or its Close is queued: a reset, a
/// heartbeat timeout), so its response would be thrown away. Its consumer
/// has lost the connection, and its call with it (`ConnectionLost`, which
/// says the request may or may not have run). A one-way call is never
/// dropped so: read whole, it was accepted, and runs like any other.
///
/// Why: a consumer that queued many slow requests and then died kept the
/// workers busy with them for nothing, ahead of every other connection's
/// jobs. The check is one relaxed load per pool job
/// (`Outbound::refuses_frames`).
fn skip_request(conn: &ConnShared, id: u64, body: Vec<u8>) {
    log::debug!(
        "{}: request {id} not run: its connection is closed",
        conn.peer
    );
    frame_pool::recycle(body);
    // Counted as finished (in-flight count, a drain waiting for it), with
    // no response.
    drop(conn.call_finished());
}

/// Ends a request's in-flight count and sends its response (unless
/// one-way); a graceful close waits for both (see `ConnShared::call_finished`).
pub(super) fn finish(conn: &ConnShared, response: Vec<u8>, one_way: bool) {
    let _replying = conn.call_finished();
    if !one_way {
        respond(conn, response);
    }
}

pub(super) fn respond(conn: &ConnShared, response: Vec<u8>) {
    respond_with(conn, conn.send(response, Class::Data));
}

/// Closes the connection if its consumer stopped reading its responses.
fn respond_with(conn: &ConnShared, queued: std::result::Result<Flush, SendError>) {
    match queued {
        Ok(_) | Err(SendError::Closed(_)) => {}
        Err(SendError::Overloaded(_)) => {
            // Asked once: the responses refused after this one are dropped.
            conn.request_close(CloseStatus::Overloaded, || {
                // `queued_bytes` counts memory held (buffers' capacities and
                // slots), which is what `max_write_queue_bytes` bounds.
                let detail = format!(
                    "write queue full ({} bytes held, max_write_queue_bytes): \
                     the consumer does not read its responses",
                    conn.out.queued_bytes()
                );
                log::warn!("{}: closing: {detail}", conn.peer);
                DisconnectReason::Overloaded(detail)
            });
        }
    }
}
