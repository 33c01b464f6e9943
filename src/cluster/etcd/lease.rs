//! The provider's side: a registration's lease, kept alive by a thread of
//! its own that grants, renews and, after losing it, registers again.

use super::*;

/// The lease ID of a registration with no lease: not registered yet (etcd
/// did not answer `register`), or its lease expired and no new one was
/// granted yet. etcd never grants it (it is etcd's own `NoLease`).
pub(super) const NO_LEASE: i64 = 0;

/// The provider side's keep-alive loop.
pub(super) struct KeepAlive {
    pub(super) registry: EtcdRegistry,
    pub(super) key: String,
    pub(super) value: Vec<u8>,
    pub(super) ttl_secs: i64,
    pub(super) lease: Arc<AtomicI64>,
}

impl KeepAlive {
    /// Renews the lease every TTL/3 until stopped. Without a lease (etcd
    /// did not answer `register`, or the lease expired) it registers the
    /// key with a new one, retrying every `min(TTL/3, 500 ms)` until etcd
    /// answers. A failure is logged as a warning when it starts, and its
    /// end at info: an outage of minutes must not log twice a second.
    pub(super) fn run(self, stop: &Receiver<()>) {
        let interval = Duration::from_millis((self.ttl_secs as u64).saturating_mul(1000) / 3)
            .max(Duration::from_millis(100));
        let retry = interval.min(Duration::from_millis(500));
        // Without a lease from the start, `register` just failed (and said
        // so): the next attempt is a retry.
        let mut failing = self.lease.load(Ordering::Relaxed) == NO_LEASE;
        let mut next = if failing { retry } else { interval };
        loop {
            match stop.recv_timeout(next) {
                Err(RecvTimeoutError::Timeout) => {}
                _ => return,
            }
            let lease = self.lease.load(Ordering::Relaxed);
            let renewed = if lease == NO_LEASE {
                Ok(0)
            } else {
                self.registry.keepalive(lease)
            };
            // A stop wins over the answer (a renewal cut short by it failed
            // for that reason alone): nothing more is sent, and the owner
            // revokes or abandons `lease`.
            if self.registry.stopping() {
                return;
            }
            match renewed {
                Ok(ttl) if ttl > 0 => {
                    if failing {
                        log::info!(
                            "etcd: reachable again; lease {lease:x} of {} kept",
                            self.key
                        );
                        failing = false;
                    }
                    next = interval;
                }
                Ok(_) => {
                    if lease != NO_LEASE {
                        log::warn!(
                            "etcd: lease {lease:x} of {} expired; registering again",
                            self.key
                        );
                        // Gone from etcd, key and all: nothing to revoke
                        // or renew. Until a new one is granted, the next
                        // rounds register again without asking about it.
                        self.lease.store(NO_LEASE, Ordering::Relaxed);
                    }
                    match self.reregister() {
                        Ok(new) => {
                            log::info!("etcd: registered {} (lease {new:x})", self.key);
                            failing = false;
                            next = interval;
                        }
                        // Stopped: `reregister` stored the lease the key
                        // may hold, for the owner to revoke or abandon.
                        Err(_) if self.registry.stopping() => return,
                        Err(e) => {
                            if failing {
                                log::debug!("etcd: registering {} failed again: {e}", self.key);
                            } else {
                                log::warn!(
                                    "etcd: registering {} failed ({e}); retrying every \
                                     {retry:?}",
                                    self.key
                                );
                            }
                            failing = true;
                            next = retry;
                        }
                    }
                }
                Err(e) => {
                    if !failing {
                        log::warn!(
                            "etcd unreachable ({e}); {} stays registered until its lease \
                             expires, retrying every {retry:?}",
                            self.key
                        );
                    }
                    failing = true;
                    next = retry;
                }
            }
        }
    }

    /// Grants a new lease, puts the key with it, and stores it in
    /// `self.lease` for the renewals; returns it.
    ///
    /// Once stopped, it sends nothing more (the requests give up), but it
    /// stores the new lease whatever became of the put: a put given up on
    /// here may still be applied by etcd, and the owner's revoke, which
    /// reads `self.lease` after joining this thread, must revoke the lease
    /// the key may be attached to. Revoking it deletes that key, or makes
    /// the put fail if it comes later.
    pub(super) fn reregister(&self) -> std::result::Result<i64, String> {
        let lease = self.registry.grant(self.ttl_secs)?;
        let put = self.registry.put(&self.key, &self.value, lease);
        if put.is_err() {
            // Not kept: revoked, so that it cannot hold the key should the
            // put be applied after all. (Not sent after a stop.)
            let _ = self.registry.revoke(lease);
        }
        if put.is_ok() || self.registry.stopping() {
            self.lease.store(lease, Ordering::Relaxed);
        }
        put.map(|()| lease)
    }
}

pub(super) struct EtcdLease {
    pub(super) registry: EtcdRegistry,
    pub(super) key: String,
    pub(super) lease: Arc<AtomicI64>,
    pub(super) stop: Option<Sender<()>>,
    pub(super) thread: Option<JoinHandle<()>>,
}

impl EtcdLease {
    /// Stops the keep-alive thread and waits for it, so it cannot register
    /// again behind a revoke. The thread looks for the stop before each
    /// request and before each endpoint a request tries, so the wait is at
    /// most the one attempt under way: `request_timeout`, resolving the
    /// endpoint's name included (`resolve` waits for a lookup only until the
    /// request's deadline). Usually it is nothing: the
    /// thread is asleep between renewals.
    ///
    /// A re-registration stopped after its put was sent leaves its new lease
    /// in `self.lease` (see [`KeepAlive::reregister`]): [`Lease::revoke`]
    /// then revokes the lease the key may be attached to, and
    /// [`Lease::abandon`] leaves it to expire like any other.
    fn stop_keepalive(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            log::error!("etcd: the keep-alive thread of {} panicked", self.key);
        }
    }
}

impl Lease for EtcdLease {
    fn revoke(mut self: Box<Self>) -> Result<()> {
        self.stop_keepalive();
        let lease = self.lease.load(Ordering::Relaxed);
        if lease == NO_LEASE {
            // Never registered (etcd did not answer in time), or its lease
            // expired and took the key: nothing in etcd to remove.
            log::info!(
                "etcd: {} was not registered; nothing to deregister",
                self.key
            );
            return Ok(());
        }
        // Revoking the lease deletes the key if it is still attached to it.
        // The key is not deleted by itself: a newer registration of the same
        // address (a weight change, a provider restarted on its port while
        // the old one drained) put it under its own lease, and deleting it
        // removed that registration for good while its keep-alive went on
        // renewing a lease without a key. A lease etcd no longer knows has
        // expired, and took the key with it if the key was still its own.
        match self.registry.revoke(lease) {
            Ok(()) => {
                log::info!("etcd: deregistered {}", self.key);
                Ok(())
            }
            Err(e) if e.contains("lease not found") => {
                log::info!("etcd: the lease of {} had expired already", self.key);
                Ok(())
            }
            Err(e) => Err(Error::io(
                format!("deregister {} from etcd", self.key),
                std::io::Error::other(e),
            )),
        }
    }

    fn abandon(mut self: Box<Self>) {
        self.stop_keepalive();
        log::info!(
            "etcd: stopped renewing the lease of {}; it expires on its own",
            self.key
        );
    }
}

impl Drop for EtcdLease {
    fn drop(&mut self) {
        self.stop_keepalive();
    }
}
