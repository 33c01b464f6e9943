//! [`EtcdRegistry`]: service discovery on etcd v3, through its JSON gateway.
//!
//! Here: the configuration, the registry and the requests and answers they
//! share. In submodules: a provider's lease and its keep-alive thread
//! (`lease`), and a consumer's watch thread (`watch`).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};

use super::http::{self, Read1};
use super::json::{self, Json, Splitter, base64_decode, base64_encode, quote};
use super::registry::{
    DEFAULT_WEIGHT, Endpoint, Lease, Registration, Registry, ServiceKey, Watch, WatchEvent,
};
use crate::error::{Error, Result};

mod lease;
mod watch;

use lease::{EtcdLease, KeepAlive, NO_LEASE};
use watch::Watcher;

/// How often the watch thread wakes from a silent stream to check whether it
/// should stop; also the bound on how late it notices.
const WATCH_POLL: Duration = Duration::from_millis(200);

/// Longest reason kept per endpoint in the error of a request no endpoint
/// answered, in characters: each endpoint's reason is shown, so one long
/// answer (an error page, a long etcd message) must not bury the others.
const MAX_REASON: usize = 200;

/// Sent with every request: etcd's gateway hands `Grpc-Metadata-*` headers
/// to etcd as gRPC metadata, and `hasleader: true` (what etcd's own client
/// sets with `WithRequireLeader`, and etcdctl for its watches) makes a
/// member without a leader refuse a request at once (503 "etcdserver: no
/// leader") instead of serving stale data or timing out, and cancel a watch
/// stream when it loses its leader.
const REQUIRE_LEADER: http::Headers<'static> = &[("Grpc-Metadata-Hasleader", "true")];

/// Settings of an [`EtcdRegistry`].
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// Client endpoints as `host:port` (e.g. `127.0.0.1:2379`), tried in
    /// turn. At least one. A host name is resolved for each request within
    /// the request's deadline, keeping its last good answer for when DNS
    /// fails or hangs (`docs/CLUSTER.md`, "Endpoint names").
    pub endpoints: Vec<String>,
    /// The key prefix under which services are stored. Default
    /// `/pulse/services`.
    pub prefix: String,
    /// Bound on one request to one member (connect, send, whole answer);
    /// a request that fails over gets it anew for each endpoint it tries.
    /// Default 2 s.
    pub request_timeout: Duration,
    /// A watch stream silent for this long has the member holding it
    /// probed with a status request; if that member does not answer or has
    /// no leader, etcd counts as lost (and the watch moves on). Default 3 s.
    pub idle_check: Duration,
    /// First delay between attempts to reach a lost etcd (then doubling).
    /// Default 200 ms.
    pub retry_initial: Duration,
    /// Longest delay between attempts to reach a lost etcd. Default 2 s.
    pub retry_max: Duration,
    /// What [`Registry::register`] and [`Registry::watch`] (and so
    /// [`ClusterClient::new`](super::ClusterClient::new)) do when etcd does
    /// not answer them (Dubbo's registry `check`):
    ///
    /// * `true` (the default): they fail at once with etcd's error, so that
    ///   a wrong URL or an etcd that is down stops the program at startup,
    ///   where someone looks; the caller retries if it wants to wait (see
    ///   `docs/CLUSTER.md`, "When etcd is down at startup").
    /// * `false`: they succeed, and do their work in the background once
    ///   etcd answers. `register` logs a warning and returns a
    ///   [`Registration`] whose keep-alive thread registers the key as soon
    ///   as it can (retrying every `min(TTL/3, 500 ms)`), then keeps its
    ///   lease alive as usual; deregistering it before then registers
    ///   nothing. `watch` sends an empty set, then
    ///   [`WatchEvent::RegistryLost`], and retries with backoff like a watch
    ///   that lost etcd: on success it sends the set, then
    ///   [`WatchEvent::RegistryResumed`].
    pub fail_fast: bool,
}

impl EtcdConfig {
    /// Defaults with these endpoints (`host:port`).
    pub fn new<I, S>(endpoints: I) -> EtcdConfig
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        EtcdConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            prefix: "/pulse/services".into(),
            request_timeout: Duration::from_secs(2),
            idle_check: Duration::from_secs(3),
            retry_initial: Duration::from_millis(200),
            retry_max: Duration::from_secs(2),
            fail_fast: true,
        }
    }

    /// Defaults with the endpoints of a URL: `etcd://host:port[,host:port…]`
    /// (`http://` and a bare `host:port` work too). To change a setting:
    /// `EtcdConfig { fail_fast: false, ..EtcdConfig::from_url(url)? }`.
    ///
    /// # Errors
    /// `InvalidConfig` for another scheme, or a URL that names no
    /// `host:port` or one that cannot be connected to (an empty host, a
    /// port outside 1..=65535): the message names the endpoint and why.
    pub fn from_url(url: &str) -> Result<EtcdConfig> {
        let rest = match url.split_once("://") {
            Some(("etcd" | "http", rest)) => rest,
            Some((scheme, _)) => {
                return Err(Error::InvalidConfig(format!(
                    "etcd URL {url:?}: the scheme {scheme:?} is neither etcd:// nor http://"
                )));
            }
            None => url,
        }
        .trim_end_matches('/');
        let config = EtcdConfig::new(rest.split(',').map(str::trim).filter(|s| !s.is_empty()));
        config.validate().map_err(Error::InvalidConfig)?;
        Ok(config)
    }

    /// Checks every field; the error names the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.endpoints.is_empty() {
            return Err("etcd endpoints: at least one host:port is needed".into());
        }
        for endpoint in &self.endpoints {
            check_endpoint(endpoint)
                .map_err(|why| format!("etcd endpoint {endpoint:?} is not host:port: {why}"))?;
        }
        if !self.prefix.starts_with('/') || self.prefix.ends_with('/') {
            return Err(format!(
                "etcd prefix {:?} must start with '/' and not end with one",
                self.prefix
            ));
        }
        if self.request_timeout.is_zero() || self.idle_check.is_zero() {
            return Err("request_timeout and idle_check must be positive".into());
        }
        if self.retry_initial.is_zero() || self.retry_max < self.retry_initial {
            return Err("retry_initial must be positive and at most retry_max".into());
        }
        Ok(())
    }
}

/// Checks that `endpoint` is `host:port` as a request could use it: a
/// non-empty host (an IPv6 address in brackets) and a port in 1..=65535.
/// Caught here, a typo fails when the registry is made rather than at its
/// first request ("cannot resolve", much later, in another thread).
fn check_endpoint(endpoint: &str) -> std::result::Result<(), String> {
    let (host, port) = endpoint.rsplit_once(':').ok_or("no ':' before a port")?;
    match port.parse::<u16>() {
        Ok(0) => return Err("port 0 cannot be connected to".into()),
        Ok(_) => {}
        Err(_) => return Err(format!("port {port:?} is not a number in 1..=65535")),
    }
    let bracketed = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
    let name = bracketed.unwrap_or(host);
    if name.is_empty() {
        return Err("the host is empty".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| c.is_whitespace() || "/?#@[]".contains(*c))
    {
        return Err(format!("the host has a {c:?}"));
    }
    if bracketed.is_none() && name.contains(':') {
        return Err("an IPv6 host needs brackets ([::1]:2379)".into());
    }
    Ok(())
}

/// The etcd v3 registry, through etcd's JSON gateway (plain HTTP/1.1 from
/// blocking threads; no async runtime). Clones share the configuration.
///
/// # Layout in etcd
///
/// A provider of service `(name, version, group)` at `addr` is the key
/// `{prefix}/{name}/{version}/{group}/{addr}` (default prefix
/// `/pulse/services`; empty version or group leave an empty segment) whose
/// value is `{"addr":"127.0.0.1:7000","weight":100}`, attached to a lease.
///
/// # Provider side: the lease is the registry's heartbeat
///
/// [`Registry::register`] grants a lease of the given TTL (whole seconds,
/// rounded up), puts the key with it, and starts a keep-alive thread that
/// renews the lease every TTL/3. A provider that dies or freezes stops
/// renewing, and etcd deletes the key when the lease expires. If etcd is
/// unreachable the thread logs it once and keeps trying every
/// `min(TTL/3, 500 ms)`; if the lease was lost meanwhile (etcd answers TTL 0)
/// it grants a new one and puts the key again. Deregistering (or abandoning)
/// stops that thread and waits for it, at most for the request attempt under
/// way (`request_timeout`), so that it cannot register the key again
/// afterwards.
///
/// # When etcd does not answer at startup
///
/// By default ([`EtcdConfig::fail_fast`]) `register` and `watch` then fail
/// at once with etcd's error. With `fail_fast` off they succeed: the
/// keep-alive thread registers the key once etcd answers, and the watch
/// starts as one that lost etcd (an empty set, `RegistryLost`, retries).
///
/// # Consumer side: list, then watch from the listed revision
///
/// [`Registry::watch`] lists the service's prefix, then a thread streams
/// `/v3/watch` from the listed revision + 1, so no change between the two is
/// missed, and sends the whole provider set after each change. When the
/// stream breaks (etcd killed, network cut) or stays silent past
/// [`EtcdConfig::idle_check`] while a probe of the member holding it fails
/// (that member frozen, or without a leader), it reports
/// [`WatchEvent::RegistryLost`], keeps the last set (consumers go on calling
/// the providers they know), retries with backoff, and on success re-lists,
/// sends the current set and [`WatchEvent::RegistryResumed`], and watches
/// again.
///
/// Requests go to the configured endpoints in turn, starting with the last
/// one that answered, until a member answers: one that is unreachable,
/// answers a 5xx (such as 503 "etcdserver: no leader" from a member cut off
/// from the majority), 408 or 429, or something that is not JSON is passed
/// over; any other 4xx is the request's own fault and final. When no
/// member answers, the error gives each one's failure.
///
/// ```no_run
/// use std::time::Duration;
/// use pulse::cluster::{EtcdRegistry, Endpoint, Registry, ServiceKey};
/// let registry = EtcdRegistry::from_url("etcd://127.0.0.1:2379")?;
/// let service = ServiceKey::from("demo");
/// let registration = registry.register(&service, Endpoint::new("127.0.0.1:7000".parse().unwrap()), Duration::from_secs(10))?;
/// println!("{:?}", registry.list(&service)?);
/// registration.deregister()?;
/// # Ok::<(), pulse::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct EtcdRegistry {
    inner: Arc<EtcdInner>,
    /// The stop signal of the background thread owning this handle (see
    /// [`EtcdRegistry::with_stop`]); `None` on the handles users hold.
    stop: Option<Receiver<()>>,
}

#[derive(Debug)]
struct EtcdInner {
    config: EtcdConfig,
    /// The endpoint that answered last.
    preferred: AtomicUsize,
}

type Kvs = Vec<(String, Vec<u8>)>;

impl EtcdRegistry {
    /// A registry client; nothing is sent until it is used.
    ///
    /// # Errors
    /// `InvalidConfig` when the configuration does not validate.
    pub fn new(config: EtcdConfig) -> Result<EtcdRegistry> {
        config.validate().map_err(Error::InvalidConfig)?;
        Ok(EtcdRegistry {
            inner: Arc::new(EtcdInner {
                config,
                preferred: AtomicUsize::new(0),
            }),
            stop: None,
        })
    }

    /// A registry client from a URL: `etcd://host:port[,host:port…]`
    /// (`http://` and a bare `host:port` work too), with default settings.
    ///
    /// # Errors
    /// As [`EtcdConfig::from_url`].
    pub fn from_url(url: &str) -> Result<EtcdRegistry> {
        EtcdRegistry::new(EtcdConfig::from_url(url)?)
    }

    /// The configuration.
    pub fn config(&self) -> &EtcdConfig {
        &self.inner.config
    }

    /// A handle for a background thread that is stopped by dropping the
    /// sender of `stop`. Once stopped, its requests give up before their
    /// next endpoint, so the thread ends after the attempt under way (at
    /// most `request_timeout`) instead of trying every endpoint left.
    fn with_stop(&self, stop: Receiver<()>) -> EtcdRegistry {
        EtcdRegistry {
            inner: self.inner.clone(),
            stop: Some(stop),
        }
    }

    /// Whether the thread owning this handle was asked to stop (never for a
    /// handle without a stop signal).
    fn stopping(&self) -> bool {
        self.stop
            .as_ref()
            .is_some_and(|stop| matches!(stop.try_recv(), Err(TryRecvError::Disconnected)))
    }

    /// Whether etcd answers a status request now.
    pub fn is_reachable(&self) -> bool {
        self.status().is_ok()
    }

    /// `{prefix}/{name}/{version}/{group}/`.
    fn service_prefix(&self, service: &ServiceKey) -> Result<String> {
        for part in [&service.name, &service.version, &service.group] {
            if part.contains('/') {
                return Err(Error::InvalidConfig(format!(
                    "service {service}: names, versions and groups stored in etcd cannot \
                     contain '/'"
                )));
            }
        }
        if service.name.is_empty() {
            return Err(Error::InvalidConfig("the service name is empty".into()));
        }
        Ok(format!(
            "{}/{}/{}/{}/",
            self.inner.config.prefix, service.name, service.version, service.group
        ))
    }

    /// POSTs `body` to `path` on the first endpoint whose member answers
    /// it (see [`judge`] for what counts as an answer): a member that is
    /// down, cut off from the majority or overloaded is passed over for the
    /// next one, a request refused for its own fault is not.
    fn request(&self, path: &str, body: &str) -> std::result::Result<Json, String> {
        let (host, answer) = self.on_first_answering(|host| self.ask(host, path, body))?;
        answer.map_err(|e| format!("etcd {host}: {e}"))
    }

    /// POSTs `body` to `path` on the member at `host` and [`judge`]s its
    /// answer: `Err` when that member could not serve it, else the final
    /// outcome.
    fn ask(
        &self,
        host: &str,
        path: &str,
        body: &str,
    ) -> std::result::Result<std::result::Result<Json, String>, String> {
        let timeout = self.inner.config.request_timeout;
        let (status, reply) = http::post(host, path, REQUIRE_LEADER, body, timeout)?;
        judge(path, status, &reply)
    }

    /// Whether the member at `host` itself (not any member) answers a
    /// status request and has a leader: the watch's check of the member
    /// that holds its stream. (A member without a leader refuses the
    /// request because of [`REQUIRE_LEADER`]; the status's `leader` field,
    /// omitted when it is 0, catches a gateway that ignores the header.)
    ///
    /// `leader` is a member ID, a uint64 that is at or above 2^63 for about
    /// half of all members: read as an int64, a healthy member led by such
    /// a leader looked leaderless, and every quiet watch was reported lost
    /// each `idle_check`.
    fn probe(&self, host: &str) -> std::result::Result<(), String> {
        let value = self
            .ask(host, "/v3/maintenance/status", "{}")
            .and_then(|answer| answer)
            .map_err(|e| format!("etcd {host}: {e}"))?;
        match value.get("leader").and_then(Json::as_u64) {
            Some(leader) if leader != 0 => Ok(()),
            _ => Err(format!("etcd {host} has no leader")),
        }
    }

    /// Opens a watch stream on the first member that accepts it; returns
    /// that member's host with the stream.
    fn open_watch(&self, body: &str) -> std::result::Result<(String, http::Stream), String> {
        let timeout = self.inner.config.request_timeout;
        self.on_first_answering(|host| {
            http::Stream::open(host, "/v3/watch", REQUIRE_LEADER, body, timeout, WATCH_POLL)
        })
        .map(|(host, stream)| (host.to_string(), stream))
    }

    /// Runs `attempt` against each endpoint in turn, starting from the one
    /// that answered last, until one answers (`Ok`); remembers that one and
    /// returns its host with the answer. Otherwise the error gives each
    /// endpoint's failure (each cut to [`MAX_REASON`] characters): the last
    /// one alone would hide why the others refused.
    ///
    /// On a handle [`with_stop`](EtcdRegistry::with_stop), no attempt starts
    /// once the thread was asked to stop.
    fn on_first_answering<T>(
        &self,
        mut attempt: impl FnMut(&str) -> std::result::Result<T, String>,
    ) -> std::result::Result<(&str, T), String> {
        let endpoints = &self.inner.config.endpoints;
        // `n > 0`: `EtcdConfig::validate` (run by `new`) requires an endpoint,
        // and the config cannot change afterwards.
        let n = endpoints.len();
        let first = self.inner.preferred.load(Ordering::Relaxed) % n;
        let mut failures = Vec::with_capacity(n);
        for k in 0..n {
            let i = (first + k) % n;
            let host = &endpoints[i];
            if self.stopping() {
                failures.push(format!("stopped before asking etcd {host}"));
                break;
            }
            match attempt(host) {
                Ok(answer) => {
                    self.inner.preferred.store(i, Ordering::Relaxed);
                    return Ok((host, answer));
                }
                Err(e) => failures.push(format!("etcd {host}: {}", cut(&e, MAX_REASON))),
            }
        }
        Err(failures.join("; "))
    }

    fn status(&self) -> std::result::Result<(), String> {
        self.request("/v3/maintenance/status", "{}").map(|_| ())
    }

    fn grant(&self, ttl_secs: i64) -> std::result::Result<i64, String> {
        let reply = self.request("/v3/lease/grant", &format!(r#"{{"TTL":{ttl_secs}}}"#))?;
        reply
            .get("ID")
            .and_then(Json::as_i64)
            .filter(|id| *id != 0)
            .ok_or_else(|| "etcd granted no lease ID".to_string())
    }

    fn put(&self, key: &str, value: &[u8], lease: i64) -> std::result::Result<(), String> {
        let body = format!(
            r#"{{"key":{},"value":{},"lease":"{lease}"}}"#,
            quote(&base64_encode(key.as_bytes())),
            quote(&base64_encode(value))
        );
        self.request("/v3/kv/put", &body).map(|_| ())
    }

    /// The lease's remaining TTL; 0 when etcd no longer knows it.
    fn keepalive(&self, lease: i64) -> std::result::Result<i64, String> {
        let reply = self.request("/v3/lease/keepalive", &format!(r#"{{"ID":"{lease}"}}"#))?;
        let result = reply
            .get("result")
            .ok_or_else(|| "etcd answered a keep-alive without a result".to_string())?;
        Ok(result.get("TTL").and_then(Json::as_i64).unwrap_or(0))
    }

    fn revoke(&self, lease: i64) -> std::result::Result<(), String> {
        self.request("/v3/lease/revoke", &format!(r#"{{"ID":"{lease}"}}"#))
            .map(|_| ())
    }

    /// Every key under `prefix` with its value, and the store's revision.
    fn range(&self, prefix: &str) -> std::result::Result<(Kvs, i64), String> {
        let body = format!(
            r#"{{"key":{},"range_end":{}}}"#,
            quote(&base64_encode(prefix.as_bytes())),
            quote(&base64_encode(&prefix_end(prefix.as_bytes())))
        );
        let reply = self.request("/v3/kv/range", &body)?;
        let revision = reply
            .get("header")
            .and_then(|h| h.get("revision"))
            .and_then(Json::as_i64)
            .ok_or_else(|| "etcd answered a range without a revision".to_string())?;
        let mut kvs = Vec::new();
        if let Some(items) = reply.get("kvs") {
            for kv in items.as_array() {
                if let Some((key, value)) = decode_kv(kv) {
                    kvs.push((key, value));
                }
            }
        }
        Ok((kvs, revision))
    }
}

/// `text` cut to `max` characters, marked with "…" when cut.
fn cut(text: &str, max: usize) -> Cow<'_, str> {
    match text.char_indices().nth(max) {
        None => Cow::Borrowed(text),
        // `at` comes from `char_indices`: a char boundary, so the slice
        // cannot panic.
        Some((at, _)) => Cow::Owned(format!("{}…", &text[..at])),
    }
}

/// The key range end that covers every key starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // every key
}

/// Whether an HTTP status means that this member could not serve the
/// request, so that another member may: a 5xx (etcd's gateway answers 503
/// "etcdserver: no leader" on a member cut off from the majority, 503 or 504
/// when a request timed out inside etcd, 500 on an internal error), 408 (a
/// timeout) and 429 (too many requests).
fn member_trouble(status: u16) -> bool {
    status >= 500 || status == 408 || status == 429
}

/// The HTTP status etcd's gateway gives a gRPC code (the subset that
/// matters to [`member_trouble`]; any other code is the request's fault).
fn http_status_of_grpc(code: i64) -> u16 {
    match code {
        4 => 504,  // DeadlineExceeded: "etcdserver: request timed out"
        8 => 429,  // ResourceExhausted: "etcdserver: too many requests"
        13 => 500, // Internal
        14 => 503, // Unavailable: "etcdserver: no leader", a stopping member
        _ => 400,
    }
}

/// Judges one member's HTTP answer to `path`.
///
/// `Err`: the member could not serve the request, try another one. That is
/// [`member_trouble`] in the status, or in a 2xx whose body is a gRPC
/// stream's error (a keep-alive is a stream: its error comes in a 200), and
/// a body that is not JSON at all (not etcd's gateway: a proxy's error page,
/// a wrong port).
///
/// `Ok`: the final outcome, the same on any member: the JSON of a 2xx, or
/// the message of any other status (400 for a malformed request, 404 for a
/// lease etcd does not know, 401/403 for auth; every member of the cluster
/// would refuse it the same way, so asking another would only hide it).
fn judge(
    path: &str,
    status: u16,
    body: &[u8],
) -> std::result::Result<std::result::Result<Json, String>, String> {
    let value = json::parse(body).map_err(|e| {
        format!("answered {path} with HTTP {status} and a body that is not JSON ({e})")
    })?;
    let error = value.get("error");
    // A unary call's error is `{"error":"...","message":"...","code":14}`
    // with its HTTP status; a stream's error is `{"error":{"grpc_code":14,
    // "http_code":503,"message":"..."}}`, in a 200 once the stream started.
    let stream_error = error.filter(|e| matches!(e, Json::Object(_)));
    let status = match stream_error {
        Some(e) if (200..300).contains(&status) => e
            .get("http_code")
            .and_then(Json::as_i64)
            .and_then(|c| u16::try_from(c).ok())
            .or_else(|| {
                e.get("grpc_code")
                    .or_else(|| e.get("code"))
                    .and_then(Json::as_i64)
                    .map(http_status_of_grpc)
            })
            .unwrap_or(500),
        None if (200..300).contains(&status) => return Ok(Ok(value)),
        _ => status,
    };
    let message = value
        .get("message")
        .or(error)
        .and_then(Json::as_str)
        .or_else(|| stream_error.and_then(|e| e.get("message")?.as_str()));
    let text = format!(
        "answered {path} with HTTP {status}: {}",
        message.unwrap_or("no message")
    );
    if member_trouble(status) {
        Err(text)
    } else {
        Ok(Err(text))
    }
}

fn decode_kv(kv: &Json) -> Option<(String, Vec<u8>)> {
    let key = base64_decode(kv.get("key")?.as_str()?).ok()?;
    let value = match kv.get("value").and_then(Json::as_str) {
        Some(v) => base64_decode(v).ok()?,
        None => Vec::new(),
    };
    Some((String::from_utf8(key).ok()?, value))
}

fn encode_endpoint(endpoint: Endpoint) -> Vec<u8> {
    format!(
        r#"{{"addr":{},"weight":{}}}"#,
        quote(&endpoint.addr.to_string()),
        endpoint.weight
    )
    .into_bytes()
}

fn decode_endpoint(value: &[u8]) -> std::result::Result<Endpoint, String> {
    let v = json::parse(value)?;
    let addr: SocketAddr = v
        .get("addr")
        .and_then(Json::as_str)
        .ok_or("no \"addr\"")?
        .parse()
        .map_err(|e| format!("bad \"addr\": {e}"))?;
    let weight = match v.get("weight") {
        None => DEFAULT_WEIGHT,
        Some(w) => w
            .as_i64()
            .and_then(|w| u32::try_from(w).ok())
            .ok_or("bad \"weight\"")?,
    };
    Ok(Endpoint { addr, weight })
}

fn to_set(known: &BTreeMap<String, Endpoint>) -> Vec<Endpoint> {
    known.values().copied().collect()
}

/// Keys whose value is no endpoint: each key's value and why it does not
/// parse.
type Bad = BTreeMap<String, (Vec<u8>, String)>;

/// The providers among listed keys, and the keys whose value is no
/// endpoint (left out; the caller says so).
fn known_from(kvs: Kvs) -> (BTreeMap<String, Endpoint>, Bad) {
    let mut known = BTreeMap::new();
    let mut bad = BTreeMap::new();
    for (key, value) in kvs {
        match decode_endpoint(&value) {
            Ok(endpoint) => {
                known.insert(key, endpoint);
            }
            Err(e) => {
                bad.insert(key, (value, e));
            }
        }
    }
    (known, bad)
}

/// The warning for a key whose value is no endpoint.
fn warn_not_an_endpoint(key: &str, why: &str) {
    log::warn!("etcd: ignoring {key}: its value is not an endpoint ({why})");
}

impl Registry for EtcdRegistry {
    fn register(
        &self,
        service: &ServiceKey,
        endpoint: Endpoint,
        ttl: Duration,
    ) -> Result<Registration> {
        let key = format!("{}{}", self.service_prefix(service)?, endpoint.addr);
        let ttl_secs = i64::try_from(ttl.as_millis().div_ceil(1000))
            .unwrap_or(i64::MAX)
            .max(1);
        let lease = Arc::new(AtomicI64::new(NO_LEASE));
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let keeper = KeepAlive {
            // Stopped with the thread: `stop_keepalive` waits for the
            // attempt under way, not for every endpoint left.
            registry: self.with_stop(stop_rx.clone()),
            key: key.clone(),
            value: encode_endpoint(endpoint),
            ttl_secs,
            lease: lease.clone(),
        };
        // Grants a lease and puts the key (revoking the lease if the put
        // fails), as the keep-alive thread does when the lease is lost.
        match keeper.reregister() {
            Ok(id) => log::info!("etcd: registered {key} (lease {id:x}, TTL {ttl_secs} s)"),
            Err(e) if self.inner.config.fail_fast => {
                return Err(Error::io(
                    format!("register {key} in etcd"),
                    std::io::Error::other(e),
                ));
            }
            Err(e) => log::warn!(
                "etcd: cannot register {key} now ({e}); registering it in the background \
                 as soon as etcd answers (fail_fast is off)"
            ),
        }
        let thread = std::thread::Builder::new()
            .name("pulse-etcd-keepalive".into())
            .spawn(move || keeper.run(&stop_rx))
            .map_err(|e| Error::io("spawn the etcd keep-alive thread", e))?;
        Ok(Registration::new(
            service.clone(),
            endpoint,
            Box::new(EtcdLease {
                registry: self.clone(),
                key,
                lease,
                stop: Some(stop_tx),
                thread: Some(thread),
            }),
        ))
    }

    fn list(&self, service: &ServiceKey) -> Result<Vec<Endpoint>> {
        let prefix = self.service_prefix(service)?;
        let (kvs, _) = self
            .range(&prefix)
            .map_err(|e| Error::io(format!("list {prefix} in etcd"), std::io::Error::other(e)))?;
        let (known, bad) = known_from(kvs);
        for (key, (_, why)) in &bad {
            warn_not_an_endpoint(key, why);
        }
        Ok(to_set(&known))
    }

    fn watch(&self, service: &ServiceKey) -> Result<Watch> {
        let prefix = self.service_prefix(service)?;
        // Unanswered, with `fail_fast` off: an empty set, then the watch
        // starts as one that lost etcd (retrying the listing with backoff).
        let (listed, unanswered) = match self.range(&prefix) {
            Ok(listed) => (listed, None),
            Err(e) if self.inner.config.fail_fast => {
                return Err(Error::io(
                    format!("list {prefix} in etcd"),
                    std::io::Error::other(e),
                ));
            }
            Err(e) => ((Vec::new(), 0), Some(e)),
        };
        let (kvs, revision) = listed;
        let (known, bad) = known_from(kvs);
        let (tx, rx) = crossbeam_channel::unbounded();
        let sent = to_set(&known);
        let _ = tx.send(WatchEvent::Providers(sent.clone()));
        if let Some(error) = &unanswered {
            log::warn!(
                "etcd unreachable ({error}); watching {prefix} once it answers, retrying \
                 (fail_fast is off)"
            );
            let _ = tx.send(WatchEvent::RegistryLost {
                error: error.clone(),
            });
        }
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let mut watcher = Watcher {
            // Stopped with the thread: a request under way gives up before
            // its next endpoint once the Watch is dropped.
            registry: self.with_stop(stop_rx.clone()),
            prefix,
            known,
            sent,
            rejected: BTreeMap::new(),
            revision,
            tx,
            stop: stop_rx,
        };
        // After the first set, as the watch's first event must be.
        watcher.note_relisted(bad);
        std::thread::Builder::new()
            .name("pulse-etcd-watch".into())
            .spawn(move || watcher.run(unanswered.is_some()))
            .map_err(|e| Error::io("spawn the etcd watch thread", e))?;
        // Dropping the Watch drops `stop_tx`: the thread sees it within
        // WATCH_POLL, or once the request attempt under way is done (at most
        // request_timeout), and ends.
        Ok(Watch::new(rx, stop_tx))
    }
}

#[cfg(test)]
mod tests {
    use super::watch::Ended;
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::Mutex;
    use std::sync::atomic::AtomicBool;

    /// An HTTP/1.1 response with a JSON body, the connection closed after it.
    fn http_reply(status: &str, body: &str) -> String {
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        )
    }

    /// Reads one request (head and `Content-Length` body) from `s`.
    fn read_request(s: &mut TcpStream) -> String {
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let mut req = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let text = String::from_utf8_lossy(&req);
            if let Some(end) = text.find("\r\n\r\n") {
                let length = text[..end]
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .and_then(|n| n.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                if req.len() >= end + 4 + length {
                    return text.into_owned();
                }
            }
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return String::from_utf8_lossy(&req).into_owned(),
                Ok(n) => req.extend_from_slice(&buf[..n]),
            }
        }
    }

    /// A fake etcd member on loopback: answers every request with `reply`
    /// and keeps the requests it got. Dropping it stops its thread (a flag,
    /// then a connection of its own to wake the `accept`).
    struct FakeMember {
        host: String,
        requests: Arc<Mutex<Vec<String>>>,
        /// Each request left unanswered, when it came.
        held: Receiver<String>,
        stop: Arc<AtomicBool>,
        thread: Option<JoinHandle<()>>,
    }

    impl FakeMember {
        fn new(reply: String) -> FakeMember {
            FakeMember::scripted(move |_| Some(reply.clone()))
        }

        /// A member that answers each request with what `script` returns
        /// for it; `None` leaves it unanswered, its connection open until
        /// the member is dropped, as a member stuck on it would (and
        /// reports it on `held`).
        fn scripted(mut script: impl FnMut(&str) -> Option<String> + Send + 'static) -> FakeMember {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let host = listener.local_addr().unwrap().to_string();
            let requests = Arc::new(Mutex::new(Vec::new()));
            let (held_tx, held) = crossbeam_channel::unbounded();
            let stop = Arc::new(AtomicBool::new(false));
            let thread = {
                let (requests, stop) = (requests.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut unanswered = Vec::new();
                    for s in listener.incoming() {
                        if stop.load(Ordering::SeqCst) {
                            return;
                        }
                        let Ok(mut s) = s else { continue };
                        let request = read_request(&mut s);
                        let reply = script(&request);
                        requests.lock().unwrap().push(request.clone());
                        match reply {
                            Some(reply) => {
                                let _ = s.write_all(reply.as_bytes());
                            }
                            None => {
                                unanswered.push(s);
                                let _ = held_tx.send(request);
                            }
                        }
                    }
                })
            };
            FakeMember {
                host,
                requests,
                held,
                stop,
                thread: Some(thread),
            }
        }

        /// How many requests it got.
        fn asked(&self) -> usize {
            self.requests.lock().unwrap().len()
        }
    }

    impl Drop for FakeMember {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
            let _ = TcpStream::connect(&self.host);
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }

    fn registry_of(members: &[&FakeMember]) -> EtcdRegistry {
        let mut config = EtcdConfig::new(members.iter().map(|m| m.host.clone()));
        config.request_timeout = Duration::from_millis(500);
        EtcdRegistry::new(config).unwrap()
    }

    /// A member cut off from the majority answers 503 "no leader": the
    /// request goes on to the next member, which is then asked first.
    #[test]
    fn a_member_answering_503_is_passed_over_for_the_next() {
        let sick = FakeMember::new(http_reply(
            "503 Service Unavailable",
            r#"{"error":"etcdserver: no leader","code":14,"message":"etcdserver: no leader"}"#,
        ));
        let healthy = FakeMember::new(http_reply("200 OK", r#"{"header":{"revision":"7"}}"#));
        let registry = registry_of(&[&sick, &healthy]);
        let listed = registry.list(&ServiceKey::from("demo"));
        assert_eq!(
            listed.ok(),
            Some(Vec::new()),
            "the healthy member was not asked"
        );
        assert_eq!((sick.asked(), healthy.asked()), (1, 1));
        // The member that answered is asked first next time.
        registry.list(&ServiceKey::from("demo")).unwrap();
        assert_eq!((sick.asked(), healthy.asked()), (1, 2));
    }

    /// A request refused for its own fault (here: a lease etcd does not
    /// know) gets the same answer from every member: it is final.
    #[test]
    fn a_refusal_that_is_the_requests_fault_is_final() {
        let first = FakeMember::new(http_reply(
            "404 Not Found",
            r#"{"error":"etcdserver: requested lease not found","code":5}"#,
        ));
        let second = FakeMember::new(http_reply("200 OK", "{}"));
        let registry = registry_of(&[&first, &second]);
        let err = registry.revoke(0x1234).unwrap_err();
        assert!(
            err.contains("HTTP 404") && err.contains("lease not found"),
            "{err}"
        );
        assert_eq!((first.asked(), second.asked()), (1, 0));
    }

    /// A short request timeout, for tests that wait for one: the stop
    /// tests' bound (5 × SHORT, generous for a loaded machine) is then
    /// short next to the old wait (one timeout per endpoint and request:
    /// 16 × SHORT with their 16 members).
    const SHORT: Duration = Duration::from_millis(200);

    /// The path a request was sent to (`POST {path} HTTP/1.1`).
    fn path_of(request: &str) -> &str {
        request.split(' ').nth(1).unwrap_or_default()
    }

    /// A 200 with `body`.
    fn ok(body: &str) -> Option<String> {
        Some(http_reply("200 OK", body))
    }

    /// `n` frozen members: listeners whose kernel takes connections into
    /// the backlog and which never read or answer them. Dropping them closes
    /// everything (no thread).
    fn silent_members(n: usize) -> Vec<TcpListener> {
        (0..n)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect()
    }

    /// A registry on `member` first, then the `silent` ones, with requests
    /// bounded by [`SHORT`].
    fn registry_on(member: &FakeMember, silent: &[TcpListener]) -> EtcdRegistry {
        let silent = silent.iter().map(|l| l.local_addr().unwrap().to_string());
        let mut config = EtcdConfig::new(std::iter::once(member.host.clone()).chain(silent));
        config.request_timeout = SHORT;
        EtcdRegistry::new(config).unwrap()
    }

    /// Registers `demo` at 127.0.0.1:7000 with a 1 s TTL: the keep-alive
    /// thread renews every 333 ms.
    fn register_demo(registry: &EtcdRegistry) -> Registration {
        let endpoint = Endpoint::new("127.0.0.1:7000".parse().unwrap());
        registry
            .register(&ServiceKey::from("demo"), endpoint, Duration::from_secs(1))
            .unwrap()
    }

    /// Deregisters, which must take less than 5 × [`SHORT`] (a request
    /// under way, not one per member), and returns every request `member`
    /// got.
    fn deregister_promptly(registration: Registration, member: &FakeMember) -> Vec<String> {
        let started = Instant::now();
        let deregistered = registration.deregister();
        let took = started.elapsed();
        assert!(
            took < 5 * SHORT,
            "deregistering took {took:?}; the bound is {:?}",
            5 * SHORT
        );
        deregistered.unwrap();
        println!("deregistered in {took:?}");
        member.requests.lock().unwrap().clone()
    }

    /// etcd stops answering (here: the member asked hangs on the renewal,
    /// the 15 others never answer anything): deregistering waits for the
    /// renewal under way, not for one attempt on each of the 16 members.
    #[test]
    fn deregistering_waits_for_the_renewal_under_way_not_for_every_member() {
        let member = FakeMember::scripted(|request| match path_of(request) {
            "/v3/lease/keepalive" => None,
            "/v3/lease/grant" => ok(r#"{"ID":"4097","TTL":"1"}"#),
            _ => ok(r#"{"header":{"revision":"2"}}"#), // put, revoke
        });
        let silent = silent_members(15);
        let registration = register_demo(&registry_on(&member, &silent));
        let held = member
            .held
            .recv_timeout(Duration::from_secs(10))
            .expect("no renewal within 10 s");
        assert_eq!(path_of(&held), "/v3/lease/keepalive");

        let requests = deregister_promptly(registration, &member);
        let revoke = requests.last().expect("requests");
        assert_eq!(path_of(revoke), "/v3/lease/revoke");
        assert!(revoke.contains(r#""ID":"4097""#), "{revoke}");
    }

    /// Deregistering a registration whose lease etcd no longer knows (it
    /// expired, and took the key with it) succeeds: nothing is left to
    /// remove, and nothing else is touched.
    #[test]
    fn deregistering_after_the_lease_expired_succeeds() {
        let member = FakeMember::scripted(|request| match path_of(request) {
            "/v3/lease/grant" => ok(r#"{"ID":"4097","TTL":"1"}"#),
            "/v3/lease/revoke" => Some(http_reply(
                "404 Not Found",
                r#"{"error":"etcdserver: requested lease not found","message":"etcdserver: requested lease not found","code":5}"#,
            )),
            "/v3/lease/keepalive" => ok(r#"{"result":{"TTL":"1"}}"#),
            _ => ok(r#"{"header":{"revision":"2"}}"#), // put
        });
        let registration = register_demo(&registry_on(&member, &[]));
        registration.deregister().unwrap();
        let requests = member.requests.lock().unwrap().clone();
        let revoke = requests.last().expect("requests");
        assert_eq!(path_of(revoke), "/v3/lease/revoke", "{requests:?}");
    }

    /// The keep-alive finds the lease lost and registers again, and etcd
    /// stops answering at the put: deregistering waits for that put only,
    /// and revokes the lease it was sent with (a put given up on here may
    /// still be applied), so the key cannot outlive the deregistration.
    #[test]
    fn a_stop_during_a_reregistration_revokes_the_lease_the_put_was_sent_with() {
        let (mut grants, mut puts) = (0, 0);
        let member = FakeMember::scripted(move |request| match path_of(request) {
            "/v3/lease/grant" => {
                grants += 1;
                ok(&format!(r#"{{"ID":"{}","TTL":"1"}}"#, 4096 + grants))
            }
            // The registration's put is answered, the re-registration's not.
            "/v3/kv/put" => {
                puts += 1;
                if puts == 1 {
                    ok(r#"{"header":{"revision":"2"}}"#)
                } else {
                    None
                }
            }
            // No TTL: etcd no longer knows the lease.
            "/v3/lease/keepalive" => ok(r#"{"result":{"header":{"revision":"2"}}}"#),
            _ => ok(r#"{"header":{"revision":"3"}}"#), // revoke
        });
        let silent = silent_members(15);
        let registration = register_demo(&registry_on(&member, &silent));
        let held = member
            .held
            .recv_timeout(Duration::from_secs(10))
            .expect("no re-registration within 10 s");
        assert_eq!(path_of(&held), "/v3/kv/put");
        assert!(held.contains(r#""lease":"4098""#), "{held}");

        let requests = deregister_promptly(registration, &member);
        let after_put = requests
            .iter()
            .skip_while(|r| **r != held)
            .skip(1)
            .collect::<Vec<_>>();
        assert!(
            after_put
                .iter()
                .any(|r| path_of(r) == "/v3/lease/revoke" && r.contains(r#""ID":"4098""#)),
            "the lease of the put was not revoked: {after_put:?}"
        );
        assert_eq!(
            after_put.last().map(|r| path_of(r)),
            Some("/v3/lease/revoke"),
            "{after_put:?}"
        );
    }

    /// When no member answers, the error says why for each of them, each
    /// reason cut to a bounded length.
    #[test]
    fn when_no_member_answers_the_error_names_each_failure() {
        let refused = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let sick = FakeMember::new(http_reply(
            "503 Service Unavailable",
            &format!(
                r#"{{"error":"etcdserver: no leader{}","code":14}}"#,
                " and on".repeat(2000)
            ),
        ));
        let silent = silent_members(1);
        let silent_host = silent[0].local_addr().unwrap().to_string();
        let mut config = EtcdConfig::new([refused.clone(), sick.host.clone(), silent_host.clone()]);
        config.request_timeout = SHORT;
        let err = EtcdRegistry::new(config).unwrap().status().unwrap_err();
        for (host, why) in [
            (&refused, "cannot connect"),
            (&sick.host, "no leader"),
            (&silent_host, "in time"),
        ] {
            assert!(
                err.contains(&format!("etcd {host}: ")),
                "{host} not named: {err}"
            );
            assert!(err.contains(why), "{why:?} not said: {err}");
        }
        assert!(err.len() < 1000, "{} bytes: {err}", err.len());
    }

    /// Dropping a Watch while its thread fails over between members stops
    /// the thread before it asks the next one: here the member that lists
    /// refuses the watch (closes without an answer) and the 15 others never
    /// answer; once the thread is waiting on the first of those, the Watch
    /// is dropped, and no other member may be asked after that. Before, the
    /// thread went on through every member, one `request_timeout` each,
    /// with nobody left to tell.
    #[test]
    fn a_dropped_watch_asks_no_further_member() {
        let member = FakeMember::scripted(|request| match path_of(request) {
            "/v3/kv/range" => ok(r#"{"header":{"revision":"5"}}"#),
            _ => Some(String::new()),
        });
        let silent = silent_members(15);
        for listener in &silent {
            listener.set_nonblocking(true).unwrap();
        }
        // A connection the member's kernel took, if one comes within
        // `within` (looked for at least once).
        let accept_within = |listener: &TcpListener, within: Duration| {
            let until = Instant::now() + within;
            loop {
                if let Ok((stream, _)) = listener.accept() {
                    return Some(stream);
                }
                if Instant::now() >= until {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        };
        let watch = registry_on(&member, &silent)
            .watch(&ServiceKey::from("demo"))
            .unwrap();
        // Held open, never answered, while the thread waits on it.
        let _asked = accept_within(&silent[0], Duration::from_secs(10))
            .expect("the watch did not go on to the second member within 10 s");
        drop(watch);
        let quiet_until = Instant::now() + 5 * SHORT;
        while Instant::now() < quiet_until {
            for (n, listener) in silent.iter().enumerate().skip(1) {
                let asked = accept_within(listener, Duration::ZERO);
                assert!(
                    asked.is_none(),
                    "member {} was asked after the watch was dropped",
                    n + 2
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A member that accepts one watch, confirms it, then goes silent as a
    /// frozen process does: its sockets stay open, later connections are
    /// never answered. Dropping it ends its thread, also when no watch came
    /// (a test failing early): the stop channel closes, then a connection of
    /// its own wakes the `accept`, which it takes for the watch (read to its
    /// end at once, answered into the void).
    struct FrozenMember {
        host: String,
        stop: Option<crossbeam_channel::Sender<()>>,
        thread: Option<JoinHandle<()>>,
    }

    impl FrozenMember {
        fn new() -> FrozenMember {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let host = listener.local_addr().unwrap().to_string();
            let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
            let thread = std::thread::spawn(move || {
                let (mut s, _) = listener.accept().unwrap();
                read_request(&mut s);
                let created = "{\"result\":{\"header\":{\"revision\":\"1\"},\"created\":true}}\n";
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{created}\r\n",
                    created.len()
                );
                // Frozen until the test ends; the listener keeps taking
                // connections into its backlog and never answers them.
                let _ = stopped.recv();
                drop((s, listener));
            });
            FrozenMember {
                host,
                stop: Some(stop),
                thread: Some(thread),
            }
        }
    }

    impl Drop for FrozenMember {
        fn drop(&mut self) {
            drop(self.stop.take());
            let _ = TcpStream::connect(&self.host);
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }

    /// The member holding the watch freezes while another stays up: the
    /// idle check must probe the frozen one, not whichever member answers.
    #[test]
    fn a_watch_on_a_frozen_member_ends_though_another_member_answers() {
        let frozen = FrozenMember::new();
        let other = FakeMember::new(http_reply(
            "200 OK",
            r#"{"header":{"revision":"1"},"leader":"7"}"#,
        ));
        let mut config = EtcdConfig::new([frozen.host.clone(), other.host.clone()]);
        config.request_timeout = Duration::from_millis(300);
        config.idle_check = Duration::from_millis(300);
        let (mut w, _rx, stop_tx) = watcher_on(EtcdRegistry::new(config).unwrap());
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        let watching = std::thread::spawn(move || {
            let ended = match w.watch_once() {
                Ended::Failed(why) => Some(why),
                Ended::Resync(_) | Ended::Stopped => None,
            };
            let _ = done_tx.send(ended);
        });
        let ended = done_rx.recv_timeout(Duration::from_secs(5));
        // Ends the watch if it is still on the frozen member (it then sees
        // the stop within WATCH_POLL).
        drop(stop_tx);
        watching.join().unwrap();
        let why = ended
            .expect("the watch stayed on the frozen member")
            .expect("the watch did not fail");
        assert!(why.contains(&frozen.host), "{why}");
    }

    /// The probe asks the member with the require-leader header, and a
    /// status without a leader (etcd omits a 0 `leader`) fails it.
    #[test]
    fn the_probe_wants_a_member_with_a_leader() {
        let led = FakeMember::new(http_reply(
            "200 OK",
            r#"{"header":{"revision":"1"},"leader":"38712720341031407"}"#,
        ));
        let leaderless = FakeMember::new(http_reply(
            "200 OK",
            r#"{"header":{"revision":"1"},"errors":["etcdserver: no leader"]}"#,
        ));
        // Member IDs are uint64: one at or above 2^63 is a leader too.
        let led_high = FakeMember::new(http_reply(
            "200 OK",
            r#"{"header":{"revision":"1","member_id":"11046527456118344142"},
                "leader":"11046527456118344142"}"#,
        ));
        let registry = registry_of(&[&led, &leaderless, &led_high]);
        assert_eq!(registry.probe(&led.host), Ok(()));
        assert_eq!(registry.probe(&led_high.host), Ok(()));
        let err = registry.probe(&leaderless.host).unwrap_err();
        assert!(err.contains("no leader"), "{err}");
        let request = led.requests.lock().unwrap()[0].clone();
        assert!(
            request.contains("\r\nGrpc-Metadata-Hasleader: true\r\n"),
            "{request}"
        );
    }

    #[test]
    fn answers_are_judged_final_or_worth_another_member() {
        let judged = |status, body: &str| judge("/v3/x", status, body.as_bytes());
        assert!(matches!(judged(200, r#"{"header":{}}"#), Ok(Ok(_))));
        // The member is in trouble: ask another.
        for (status, body) in [
            (503, r#"{"error":"etcdserver: no leader","code":14}"#),
            (504, r#"{"error":"etcdserver: request timed out","code":4}"#),
            (429, r#"{"error":"etcdserver: too many requests","code":8}"#),
            (502, "<html>Bad Gateway</html>"),
            (200, "not json"),
            (
                200,
                r#"{"error":{"grpc_code":14,"http_code":503,"message":"etcdserver: no leader"}}"#,
            ),
            (
                200,
                r#"{"error":{"code":14,"message":"etcdserver: no leader"}}"#,
            ),
        ] {
            let got = judged(status, body);
            assert!(got.is_err(), "{status} {body}: {got:?}");
        }
        let no_leader = judged(503, r#"{"error":"etcdserver: no leader","code":14}"#);
        assert_eq!(
            no_leader.unwrap_err(),
            "answered /v3/x with HTTP 503: etcdserver: no leader"
        );
        // The request's own fault: final.
        for (status, body) in [
            (400, r#"{"error":"illegal base64 data","code":3}"#),
            (
                404,
                r#"{"error":"etcdserver: requested lease not found","code":5}"#,
            ),
            (200, r#"{"error":{"grpc_code":3,"message":"bad"}}"#),
        ] {
            let got = judged(status, body);
            assert!(matches!(got, Ok(Err(_))), "{status} {body}: {got:?}");
        }
    }

    #[test]
    fn prefix_end_covers_the_prefix() {
        assert_eq!(prefix_end(b"/a/"), b"/a0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), b"\0");
    }

    #[test]
    fn endpoints_round_trip_through_values() {
        let e = Endpoint::weighted("[::1]:7000".parse().unwrap(), 7);
        assert_eq!(decode_endpoint(&encode_endpoint(e)).unwrap(), e);
        let e = decode_endpoint(br#"{"addr":"127.0.0.1:1"}"#).unwrap();
        assert_eq!(e.weight, DEFAULT_WEIGHT);
        assert!(decode_endpoint(br#"{"addr":"nowhere"}"#).is_err());
        assert!(decode_endpoint(br#"{"addr":"127.0.0.1:1","weight":-1}"#).is_err());
    }

    #[test]
    fn urls_and_keys() {
        let r = EtcdRegistry::from_url("etcd://127.0.0.1:2379,10.0.0.2:2379/").unwrap();
        assert_eq!(r.config().endpoints, ["127.0.0.1:2379", "10.0.0.2:2379"]);
        assert!(EtcdRegistry::from_url("etcd://").is_err());
        assert!(EtcdRegistry::from_url("etcd://nohostport").is_err());
        let r6 = EtcdRegistry::from_url("etcd://[::1]:2379,localhost:1").unwrap();
        assert_eq!(r6.config().endpoints, ["[::1]:2379", "localhost:1"]);
        let key = ServiceKey::new("demo", "1.0", "");
        assert_eq!(
            r.service_prefix(&key).unwrap(),
            "/pulse/services/demo/1.0//"
        );
        assert!(r.service_prefix(&ServiceKey::from("a/b")).is_err());
    }

    /// A URL that cannot work is refused when the registry is made, with
    /// an error naming the endpoint and what is wrong with it, not at its
    /// first request.
    #[test]
    fn bad_urls_are_refused_up_front_with_the_reason() {
        for (url, why) in [
            ("etcd://127.0.0.1:99999", "not a number in 1..=65535"),
            ("etcd://127.0.0.1:0", "port 0"),
            ("etcd://127.0.0.1:", "not a number"),
            ("etcd://127.0.0.1:x", "not a number"),
            ("etcd://:2379", "the host is empty"),
            ("etcd://[]:2379", "the host is empty"),
            ("etcd://::1:2379", "needs brackets"),
            ("etcd://a b:2379", "has a ' '"),
            ("etcd://user@host:2379", "has a '@'"),
            ("etcd://127.0.0.1:2379,10.0.0.2:70000", "10.0.0.2:70000"),
            ("ftp://x:1", "the scheme \"ftp\""),
            ("etcd://host:2379/v3", "not a number"),
        ] {
            match EtcdRegistry::from_url(url) {
                Err(Error::InvalidConfig(e)) => {
                    assert!(e.contains(why), "{url}: {e:?} does not say {why:?}")
                }
                other => panic!("{url}: {other:?}"),
            }
        }
        // The same check guards a config built by hand.
        let err = EtcdRegistry::new(EtcdConfig::new(["127.0.0.1:99999"])).unwrap_err();
        assert!(err.to_string().contains("127.0.0.1:99999"), "{err}");
    }

    fn watcher() -> (Watcher, Receiver<WatchEvent>, Sender<()>) {
        watcher_on(EtcdRegistry::from_url("127.0.0.1:1").unwrap())
    }

    /// A watcher of service `demo` on `registry`, at revision 1, knowing
    /// nothing yet; with its events' receiver and its stop sender.
    fn watcher_on(registry: EtcdRegistry) -> (Watcher, Receiver<WatchEvent>, Sender<()>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        let (stop_tx, stop) = crossbeam_channel::bounded(0);
        let w = Watcher {
            registry,
            prefix: "/pulse/services/demo///".into(),
            known: BTreeMap::new(),
            sent: Vec::new(),
            rejected: BTreeMap::new(),
            revision: 1,
            tx,
            stop,
        };
        (w, rx, stop_tx)
    }

    fn event(kind: &str, addr: &str) -> String {
        let key = base64_encode(format!("/pulse/services/demo///{addr}").as_bytes());
        let value = base64_encode(&encode_endpoint(Endpoint::new(addr.parse().unwrap())));
        format!(r#"{{{kind}"kv":{{"key":"{key}","value":"{value}","mod_revision":"5"}}}}"#)
    }

    /// A provider's key overwritten with a value that is not an endpoint
    /// leaves the set, as it would from a re-list.
    #[test]
    fn a_key_overwritten_with_a_bad_value_leaves_the_set_as_on_a_relist() {
        let (mut w, rx, _stop) = watcher();
        let key = "/pulse/services/demo///127.0.0.1:1".to_string();
        w.known
            .insert(key.clone(), Endpoint::new("127.0.0.1:1".parse().unwrap()));
        w.sent = to_set(&w.known);
        let put = format!(
            r#"{{"result":{{"events":[{{"kv":{{"key":"{}","value":"{}","mod_revision":"5"}}}}]}}}}"#,
            base64_encode(key.as_bytes()),
            base64_encode(b"disabled")
        );
        assert!(w.on_message(put.as_bytes()).is_none());
        let (relisted, _) = known_from(vec![(key, b"disabled".to_vec())]);
        assert_eq!(
            to_set(&w.known),
            to_set(&relisted),
            "watch and list disagree"
        );
        assert_eq!(rx.try_recv().ok(), Some(WatchEvent::Providers(Vec::new())));
    }

    /// A key whose value is no endpoint is reported (a warning and a
    /// `Rejected`, after the set it is left out of) once per value, not at
    /// every change of the service or re-list: again when its value
    /// changes, or when it breaks again after being fixed or gone.
    #[test]
    fn a_bad_value_is_reported_once_per_key_and_value() {
        let (mut w, rx, _stop) = watcher();
        let key = "/pulse/services/demo///x";
        let put = |value: &[u8]| {
            format!(
                r#"{{"result":{{"events":[{{"kv":{{"key":"{}","value":"{}","mod_revision":"5"}}}}]}}}}"#,
                base64_encode(key.as_bytes()),
                base64_encode(value)
            )
        };
        let bad1: &[u8] = br#"{"addr":"nowhere"}"#;
        let bad2: &[u8] = br#"{"addr":"127.0.0.1:1","weight":-1}"#;
        let relist = |w: &mut Watcher, kvs: Vec<(&str, &[u8])>| {
            let kvs = kvs
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_vec()))
                .collect();
            assert!(w.note_relisted(known_from(kvs).1));
        };
        // The reasons of the Rejected events sent since the last look.
        let rejected = || -> Vec<String> {
            rx.try_iter()
                .filter_map(|e| match e {
                    WatchEvent::Rejected { entry, reason } => {
                        assert_eq!(entry, key);
                        Some(reason)
                    }
                    _ => None,
                })
                .collect()
        };
        assert!(w.on_message(put(bad1).as_bytes()).is_none());
        let first = rejected();
        assert_eq!(first.len(), 1, "{first:?}");
        assert!(first[0].contains(r#"bad "addr""#), "{first:?}");
        // The same value again, another key's change, a re-list: quiet.
        assert!(w.on_message(put(bad1).as_bytes()).is_none());
        assert!(w.on_message(event("", "127.0.0.1:1").as_bytes()).is_none());
        relist(&mut w, vec![(key, bad1)]);
        assert_eq!(rejected(), Vec::<String>::new());
        // A new bad value: reported.
        assert!(w.on_message(put(bad2).as_bytes()).is_none());
        assert_eq!(rejected().len(), 1);
        // Fixed, then broken again: reported again.
        let good = encode_endpoint(Endpoint::new("127.0.0.1:2".parse().unwrap()));
        assert!(w.on_message(put(&good).as_bytes()).is_none());
        assert!(w.on_message(put(bad2).as_bytes()).is_none());
        assert_eq!(rejected().len(), 1);
        // Gone from a listing, then back: reported again.
        relist(&mut w, vec![]);
        relist(&mut w, vec![(key, bad2)]);
        assert_eq!(rejected().len(), 1);
    }

    #[test]
    fn watch_messages_update_the_set() {
        let (mut w, rx, _stop) = watcher();
        assert!(
            w.on_message(br#"{"result":{"header":{"revision":"4"},"created":true}}"#)
                .is_none()
        );
        assert!(rx.try_recv().is_err(), "nothing changed, nothing sent");
        let put = format!(
            r#"{{"result":{{"events":[{},{}]}}}}"#,
            event("", "127.0.0.1:1"),
            event("", "127.0.0.1:2")
        );
        assert!(w.on_message(put.as_bytes()).is_none());
        match rx.try_recv().unwrap() {
            WatchEvent::Providers(set) => assert_eq!(set.len(), 2),
            other => panic!("{other:?}"),
        }
        let delete = format!(
            r#"{{"result":{{"events":[{}]}}}}"#,
            event(r#""type":"DELETE","#, "127.0.0.1:1")
        );
        assert!(w.on_message(delete.as_bytes()).is_none());
        match rx.try_recv().unwrap() {
            WatchEvent::Providers(set) => assert_eq!(set[0].addr.port(), 2),
            other => panic!("{other:?}"),
        }
        let compacted = br#"{"result":{"canceled":true,"compact_revision":"9"}}"#;
        assert!(matches!(w.on_message(compacted), Some(Ended::Resync(_))));
        let error = br#"{"error":{"grpc_code":14,"message":"unavailable"}}"#;
        assert!(matches!(w.on_message(error), Some(Ended::Failed(m)) if m.contains("unavailable")));
    }
}
