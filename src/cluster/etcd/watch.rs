//! The consumer's side: a watch thread that lists a service's providers,
//! follows etcd's watch stream, and re-lists after losing etcd.

use super::*;

/// How one watch stream ended.
pub(super) enum Ended {
    /// The consumer dropped its `Watch`.
    Stopped,
    /// etcd is gone (or answers nonsense): report it lost, retry with backoff.
    Failed(String),
    /// etcd asked us to start over (compaction, cancel): re-list at once.
    Resync(String),
}

/// The consumer side's watch loop.
pub(super) struct Watcher {
    pub(super) registry: EtcdRegistry,
    pub(super) prefix: String,
    pub(super) known: BTreeMap<String, Endpoint>,
    /// The set last sent.
    pub(super) sent: Vec<Endpoint>,
    /// The keys whose value is no endpoint, with the value reported: each
    /// is warned about and sent once, not at every re-list or change.
    pub(super) rejected: BTreeMap<String, Vec<u8>>,
    pub(super) revision: i64,
    pub(super) tx: Sender<WatchEvent>,
    /// Disconnected when the `Watch` is dropped; `registry` holds a clone
    /// (`EtcdRegistry::stopping`), this one is for sleeping on.
    pub(super) stop: Receiver<()>,
}

impl Watcher {
    /// Sends the set if it changed; false when the consumer is gone.
    fn publish(&mut self) -> bool {
        let set = to_set(&self.known);
        if set == self.sent {
            return true;
        }
        self.sent = set.clone();
        self.tx.send(WatchEvent::Providers(set)).is_ok()
    }

    /// Reports the keys of a whole listing whose value is no endpoint,
    /// forgetting those no longer listed so; false when the consumer is
    /// gone.
    pub(super) fn note_relisted(&mut self, bad: Bad) -> bool {
        self.rejected.retain(|key, _| bad.contains_key(key));
        self.note_rejected(bad)
    }

    /// Warns about and sends [`WatchEvent::Rejected`] for each key of `bad`
    /// not reported yet with that value: once per key and value, not at
    /// every re-list or change of the service. False when the consumer is
    /// gone.
    fn note_rejected(&mut self, bad: Bad) -> bool {
        for (key, (value, why)) in bad {
            if self.rejected.get(&key) == Some(&value) {
                continue;
            }
            warn_not_an_endpoint(&key, &why);
            self.rejected.insert(key.clone(), value);
            let event = WatchEvent::Rejected {
                entry: key,
                reason: format!("its value is not an endpoint ({why})"),
            };
            if self.tx.send(event).is_err() {
                return false;
            }
        }
        true
    }

    /// Watches, and re-lists then watches again each time the stream
    /// ends, until the `Watch` is dropped. `lost`: etcd did not answer the
    /// first listing (and that was reported): start by retrying it, as
    /// after losing etcd.
    pub(super) fn run(mut self, mut lost: bool) {
        let config = self.registry.config().clone();
        loop {
            // `lost` is only ever true here at the start: the re-list loop
            // below ends once etcd answers.
            let failure = if lost {
                None
            } else {
                match self.watch_once() {
                    Ended::Stopped => return,
                    // Given up because of the stop: not etcd's failure.
                    Ended::Failed(_) if self.registry.stopping() => return,
                    Ended::Resync(why) => {
                        log::info!("etcd: watch of {} restarts: {why}", self.prefix);
                        None
                    }
                    Ended::Failed(why) => Some(why),
                }
            };
            if let Some(why) = failure
                && !lost
            {
                log::warn!(
                    "etcd unreachable while watching {} ({why}); keeping the last {} \
                     provider(s), retrying",
                    self.prefix,
                    self.known.len()
                );
                lost = true;
                if self
                    .tx
                    .send(WatchEvent::RegistryLost { error: why })
                    .is_err()
                {
                    return;
                }
            }
            // Re-list (after a delay when etcd is lost), then watch again.
            let mut delay = config.retry_initial;
            loop {
                if lost {
                    match self.stop.recv_timeout(delay) {
                        Err(RecvTimeoutError::Timeout) => {}
                        _ => return,
                    }
                } else if self.registry.stopping() {
                    return;
                }
                match self.registry.range(&self.prefix) {
                    Ok((kvs, revision)) => {
                        let (known, bad) = known_from(kvs);
                        self.known = known;
                        self.revision = revision;
                        if !self.publish() || !self.note_relisted(bad) {
                            return;
                        }
                        if lost {
                            log::info!(
                                "etcd reachable again; watching {} with {} provider(s)",
                                self.prefix,
                                self.known.len()
                            );
                            lost = false;
                            if self.tx.send(WatchEvent::RegistryResumed).is_err() {
                                return;
                            }
                        }
                        break;
                    }
                    Err(_) if self.registry.stopping() => return,
                    Err(e) => {
                        if !lost {
                            lost = true;
                            log::warn!("etcd unreachable ({e}); keeping the last providers");
                            if self
                                .tx
                                .send(WatchEvent::RegistryLost { error: e.clone() })
                                .is_err()
                            {
                                return;
                            }
                        }
                        log::debug!("etcd still unreachable: {e}");
                        delay = delay.saturating_mul(2).min(config.retry_max);
                    }
                }
            }
        }
    }

    /// Streams changes from `revision + 1` until the stream ends.
    pub(super) fn watch_once(&mut self) -> Ended {
        let body = format!(
            r#"{{"create_request":{{"key":{},"range_end":{},"start_revision":"{}"}}}}"#,
            quote(&base64_encode(self.prefix.as_bytes())),
            quote(&base64_encode(&prefix_end(self.prefix.as_bytes()))),
            // Saturating: the revision is whatever etcd answered.
            self.revision.saturating_add(1)
        );
        let (host, mut stream) = match self.registry.open_watch(&body) {
            Ok(opened) => opened,
            Err(e) => return Ended::Failed(e),
        };
        let idle_check = self.registry.config().idle_check;
        let mut splitter = Splitter::default();
        let mut buf = Vec::new();
        let mut last_heard = Instant::now();
        loop {
            if self.registry.stopping() {
                return Ended::Stopped;
            }
            buf.clear();
            match stream.read(&mut buf) {
                Ok(Read1::Data) => {
                    last_heard = Instant::now();
                    splitter.push(&buf);
                    loop {
                        match splitter.next_value() {
                            Ok(Some(message)) => {
                                if let Some(ended) = self.on_message(&message) {
                                    return ended;
                                }
                            }
                            Ok(None) => break,
                            Err(e) => return Ended::Failed(format!("bad watch stream: {e}")),
                        }
                    }
                }
                Ok(Read1::Idle) => {
                    if last_heard.elapsed() >= idle_check {
                        // Silence is normal when nothing changes; make sure
                        // the member holding the stream is still there and
                        // in the majority. (Another member answering says
                        // nothing about this stream.)
                        match self.registry.probe(&host) {
                            Ok(()) => last_heard = Instant::now(),
                            Err(e) => return Ended::Failed(format!("etcd stopped answering: {e}")),
                        }
                    }
                }
                Ok(Read1::End) => return Ended::Failed("etcd ended the watch stream".into()),
                Err(e) => return Ended::Failed(e),
            }
        }
    }

    /// Applies one watch message; `Some` ends the stream.
    pub(super) fn on_message(&mut self, message: &[u8]) -> Option<Ended> {
        let value = match json::parse(message) {
            Ok(value) => value,
            Err(e) => return Some(Ended::Failed(format!("bad watch message: {e}"))),
        };
        if let Some(error) = value.get("error") {
            let text = error
                .get("message")
                .and_then(Json::as_str)
                .unwrap_or("unknown error");
            return Some(Ended::Failed(format!("watch error: {text}")));
        }
        let result = value.get("result")?;
        if result
            .get("compact_revision")
            .and_then(Json::as_i64)
            .unwrap_or(0)
            > 0
        {
            return Some(Ended::Resync("the watched revision was compacted".into()));
        }
        if result.get("canceled").and_then(Json::as_bool) == Some(true) {
            let reason = result
                .get("cancel_reason")
                .and_then(Json::as_str)
                .unwrap_or("no reason given");
            return Some(Ended::Resync(format!("etcd canceled the watch: {reason}")));
        }
        let events = result.get("events")?;
        let mut bad = BTreeMap::new();
        for event in events.as_array() {
            let Some(kv) = event.get("kv") else { continue };
            let Some((key, value)) = decode_kv(kv) else {
                continue;
            };
            if event.get("type").and_then(Json::as_str) == Some("DELETE") {
                self.known.remove(&key);
                self.rejected.remove(&key);
                bad.remove(&key);
            } else {
                match decode_endpoint(&value) {
                    Ok(endpoint) => {
                        self.rejected.remove(&key);
                        bad.remove(&key);
                        self.known.insert(key, endpoint);
                    }
                    // The same rule as a re-list (`known_from`): a key
                    // whose value is not an endpoint is no provider, even
                    // if its previous value was one.
                    Err(e) => {
                        self.known.remove(&key);
                        bad.insert(key, (value, e));
                    }
                }
            }
        }
        if self.publish() && self.note_rejected(bad) {
            None
        } else {
            Some(Ended::Stopped)
        }
    }
}
