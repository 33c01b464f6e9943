//! Bounded name resolution for the etcd client's requests.
//!
//! `getaddrinfo` cannot be bounded or cancelled: with a slow or hung DNS
//! server glibc waits 5 s per attempt and name. Resolved on the thread of a
//! request, a name could hold the request far past its deadline (a lease
//! keep-alive then misses its TTL although etcd is reachable), and a failing
//! resolver failed every request although the address it gave a second ago
//! still works. So:
//!
//! * an endpoint that is an IP `SocketAddr` is used as it is (no thread);
//! * a name is looked up on a helper thread, and the request waits for it
//!   only until its deadline (with a kept answer, half of the time it has
//!   left, so the connection keeps the other half);
//! * at most one lookup per name is in flight: a request that finds one
//!   running waits for that one, so a hung resolver holds one thread per
//!   name, not one per request;
//! * the last good answer per name is kept and used when a lookup fails or
//!   is still running at the request's wait bound; the lookup's error is the
//!   request's only when there is no good answer yet.

use parking_lot::{Condvar, Mutex};
use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

/// A lookup of `host:port`: the addresses it names, in resolver order.
pub(crate) type Lookup = Arc<dyn Fn(&str) -> io::Result<Vec<SocketAddr>> + Send + Sync>;

/// The process's resolver, with the system's lookup (`ToSocketAddrs`).
/// One for the process, so that all registries share the one-lookup-per-name
/// bound and the kept answers.
static SYSTEM: LazyLock<Resolver> = LazyLock::new(|| {
    Resolver::new(Arc::new(|host: &str| {
        host.to_socket_addrs().map(|addrs| addrs.collect())
    }))
});

/// Resolves `host` ("host:port") by `deadline` with the process's resolver:
/// see [`Resolver::resolve`].
pub(crate) fn resolve(host: &str, deadline: Instant) -> Result<Vec<SocketAddr>, String> {
    SYSTEM.resolve(host, deadline)
}

/// Looks names up on helper threads, one lookup per name at a time, and
/// keeps each name's last good answer.
pub(crate) struct Resolver {
    /// The lookup itself: `ToSocketAddrs` in [`SYSTEM`], a fake in tests.
    lookup: Lookup,
    /// Each name asked for, never removed. Bounded by the endpoints
    /// configured: requests resolve only the `host:port` strings of the
    /// `EtcdConfig`s the process made (IP literals are never added).
    names: Mutex<HashMap<String, Arc<Name>>>,
    /// Tests: make every thread spawn fail, as when the process is out of
    /// threads.
    #[cfg(test)]
    fail_spawn: std::sync::atomic::AtomicBool,
    /// Tests: how many warnings were logged.
    #[cfg(test)]
    warnings: std::sync::atomic::AtomicUsize,
}

/// One name's lookups and answers.
struct Name {
    state: Mutex<NameState>,
    /// Signalled when a lookup of the name ends.
    done: Condvar,
}

/// What is known of one name, under [`Name::state`].
#[derive(Default)]
struct NameState {
    /// A lookup is in flight: the next request waits for it rather than
    /// starting another.
    running: bool,
    /// How many lookups ended: a request waits until this passes the count
    /// it saw when it found (or started) the lookup in flight.
    ended: u64,
    /// The outcome of the lookup that ended last.
    last: Option<Result<Vec<SocketAddr>, String>>,
    /// The last good (successful, non-empty) answer.
    good: Option<Vec<SocketAddr>>,
    /// Why the kept answer was last used instead of a fresh one, if it was
    /// and no lookup succeeded since: a warning is logged when this
    /// changes, not at each request.
    degraded: Option<Degraded>,
}

/// Why a request used the kept answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Degraded {
    /// The lookup was still running at the request's wait bound.
    Slow,
    /// The lookup failed.
    Failed,
}

impl Resolver {
    /// A resolver that looks names up with `lookup`.
    pub(crate) fn new(lookup: Lookup) -> Resolver {
        Resolver {
            lookup,
            names: Mutex::new(HashMap::new()),
            #[cfg(test)]
            fail_spawn: std::sync::atomic::AtomicBool::new(false),
            #[cfg(test)]
            warnings: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// The addresses of `host` ("host:port"), within `deadline`.
    ///
    /// An IP `SocketAddr` is its own answer, at once. A name is looked up on
    /// a helper thread (started unless a lookup of the name is in flight
    /// already; on the calling thread, unbounded, if no thread can be
    /// started). The request waits for that lookup until `deadline`, or,
    /// when the name has a kept answer, until half of the time left: the
    /// kept answer is only useful with time left to connect to it.
    ///
    /// A lookup that succeeds gives its answer and replaces the kept one.
    /// One that fails, or is still running when the wait ends, gives the
    /// kept answer (and logs a warning when the reason changes); with no
    /// kept answer, the error: `cannot resolve {host}: {error}` or
    /// `resolving {host} took longer than {wait}`.
    pub(crate) fn resolve(&self, host: &str, deadline: Instant) -> Result<Vec<SocketAddr>, String> {
        if let Ok(addr) = host.parse::<SocketAddr>() {
            return Ok(vec![addr]);
        }
        let start = Instant::now();
        let name = self.name(host);
        let mut state = name.state.lock();
        let target = state.ended + 1;
        if !state.running {
            state.running = true;
            drop(state);
            self.start_lookup(host, &name);
            state = name.state.lock();
        }
        // With a kept answer, waiting to the deadline would leave no time
        // to connect to it: wait half of what is left.
        let wait_until = if state.good.is_some() {
            start + deadline.saturating_duration_since(start) / 2
        } else {
            deadline
        };
        while state.ended < target {
            if name.done.wait_until(&mut state, wait_until).timed_out() {
                break;
            }
        }
        let outcome = if state.ended >= target {
            state.last.clone()
        } else {
            None
        };
        match outcome {
            Some(Ok(addrs)) => Ok(addrs),
            Some(Err(e)) => match state.good.clone() {
                Some(good) => {
                    self.degrade(host, &mut state, Degraded::Failed, &e);
                    Ok(good)
                }
                None => Err(format!("cannot resolve {host}: {e}")),
            },
            None => {
                let waited = round_ms(wait_until.saturating_duration_since(start));
                match state.good.clone() {
                    Some(good) => {
                        let why = format!("the lookup took longer than {waited:?}");
                        self.degrade(host, &mut state, Degraded::Slow, &why);
                        Ok(good)
                    }
                    None => Err(format!("resolving {host} took longer than {waited:?}")),
                }
            }
        }
    }

    /// The entry of `host`, made on first use.
    fn name(&self, host: &str) -> Arc<Name> {
        let mut names = self.names.lock();
        Arc::clone(names.entry(host.to_string()).or_insert_with(|| {
            Arc::new(Name {
                state: Mutex::new(NameState::default()),
                done: Condvar::new(),
            })
        }))
    }

    /// Runs a lookup of `host` (marked running by the caller) on a helper
    /// thread, or on this thread if none can be started: a request slower
    /// than its deadline is better than a request that fails for want of a
    /// thread while the resolver may be fine.
    fn start_lookup(&self, host: &str, name: &Arc<Name>) {
        let lookup = Arc::clone(&self.lookup);
        let entry = Arc::clone(name);
        let owned = host.to_string();
        let spawned = if self.spawn_fails() {
            Err(io::Error::other("spawning is turned off by the test"))
        } else {
            std::thread::Builder::new()
                .name("pulse-resolve".into())
                .spawn(move || run_lookup(&lookup, &owned, &entry))
                .map(drop)
        };
        if let Err(e) = spawned {
            log::warn!("etcd: cannot start a thread to resolve {host} ({e}); resolving it inline");
            run_lookup(&self.lookup, host, name);
        }
    }

    /// Whether thread spawns are to fail (tests only).
    fn spawn_fails(&self) -> bool {
        #[cfg(test)]
        {
            self.fail_spawn.load(std::sync::atomic::Ordering::Relaxed)
        }
        #[cfg(not(test))]
        {
            false
        }
    }

    /// Notes that a request used the kept answer of `host` because of
    /// `why`, logging a warning if that is news: the first time, or after
    /// the other reason or a success.
    fn degrade(&self, host: &str, state: &mut NameState, why: Degraded, detail: &str) {
        if state.degraded == Some(why) {
            return;
        }
        state.degraded = Some(why);
        #[cfg(test)]
        self.warnings
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let kept = state.good.as_deref().unwrap_or_default();
        log::warn!("etcd: resolving {host}: {detail}; using its last good answer {kept:?}");
    }
}

/// Looks `host` up and records the outcome in `name`, waking the requests
/// that wait for it. A lookup that panics counts as failed, so that the
/// name is not left `running` forever.
fn run_lookup(lookup: &Lookup, host: &str, name: &Name) {
    let outcome = match catch_unwind(AssertUnwindSafe(|| lookup(host))) {
        Ok(Ok(addrs)) if addrs.is_empty() => Err("it resolved to no address".to_string()),
        Ok(Ok(addrs)) => Ok(addrs),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the lookup panicked".to_string()),
    };
    let mut state = name.state.lock();
    if let Ok(addrs) = &outcome {
        state.good = Some(addrs.clone());
        if state.degraded.take().is_some() {
            log::info!("etcd: resolving {host} works again: {addrs:?}");
        }
    }
    state.last = Some(outcome);
    state.ended += 1;
    state.running = false;
    drop(state);
    name.done.notify_all();
}

/// `d` rounded to the nearest millisecond, for messages ("1.5s", not
/// "1.499987s": the wait is measured from a little after the caller set its
/// deadline).
fn round_ms(d: Duration) -> Duration {
    let ms = (d + Duration::from_micros(500)).as_millis();
    Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossbeam_channel::{Receiver, Sender, unbounded};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::thread::JoinHandle;

    /// A name no test resolves through real DNS: every lookup is the fake's.
    const NAME: &str = "etcd.test:2379";

    /// The most any wait here may overrun its bound before the test calls
    /// it a failure: generous, for a loaded machine.
    const SLACK: Duration = Duration::from_secs(5);

    /// What a blocked fake lookup is told to return.
    enum Answer {
        /// Succeed with these addresses.
        Addrs(Vec<SocketAddr>),
        /// Fail with this error.
        Fail(&'static str),
    }

    /// A fake DNS: each lookup counts itself, says it started, and blocks
    /// until the test sends it an [`Answer`] (one queued beforehand is taken
    /// at once). Dropped (also when a test fails), it releases every
    /// blocked lookup, joins the requests the test started, and waits
    /// (bounded) until each lookup returned, so no test leaves a thread
    /// behind.
    struct FakeDns {
        resolver: Arc<Resolver>,
        answers: Option<Sender<Answer>>,
        /// Each lookup's name and the thread it ran on, as it starts.
        started: Receiver<(String, std::thread::ThreadId)>,
        calls: Arc<AtomicUsize>,
        returned: Receiver<()>,
        requests: Vec<JoinHandle<()>>,
    }

    impl FakeDns {
        fn new() -> FakeDns {
            let (answer_tx, answer_rx) = unbounded::<Answer>();
            let (started_tx, started) = unbounded();
            let (returned_tx, returned) = unbounded();
            let calls = Arc::new(AtomicUsize::new(0));
            let counted = Arc::clone(&calls);
            let lookup: Lookup = Arc::new(move |host: &str| {
                counted.fetch_add(1, Ordering::SeqCst);
                let _ = started_tx.send((host.to_string(), std::thread::current().id()));
                let answer = answer_rx.recv();
                let _ = returned_tx.send(());
                match answer {
                    Ok(Answer::Addrs(addrs)) => Ok(addrs),
                    Ok(Answer::Fail(why)) => Err(io::Error::other(why)),
                    Err(_) => Err(io::Error::other("released at the end of the test")),
                }
            });
            FakeDns {
                resolver: Arc::new(Resolver::new(lookup)),
                answers: Some(answer_tx),
                started,
                calls,
                returned,
                requests: Vec::new(),
            }
        }

        /// Lets the next (or the blocked) lookup return `answer`.
        fn answer(&self, answer: Answer) {
            // `answers` is `Some` until `drop`.
            self.answers
                .as_ref()
                .expect("answers live until drop")
                .send(answer)
                .expect("the lookup's receiver lives in the resolver");
        }

        /// Waits until a lookup started (bounded): the name it was given.
        fn started(&self) -> String {
            self.started
                .recv_timeout(SLACK)
                .expect("no lookup started")
                .0
        }

        /// How many lookups were started.
        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }

        /// Resolves `host` with `budget` on a thread of its own; the
        /// receiver gets the outcome and when it came.
        fn request(
            &mut self,
            host: &'static str,
            budget: Duration,
        ) -> Receiver<(Result<Vec<SocketAddr>, String>, Instant)> {
            let (tx, rx) = unbounded();
            let resolver = Arc::clone(&self.resolver);
            let deadline = Instant::now() + budget;
            self.requests.push(std::thread::spawn(move || {
                let outcome = resolver.resolve(host, deadline);
                let _ = tx.send((outcome, Instant::now()));
            }));
            rx
        }

        /// Resolves on this thread: for lookups whose answer is queued.
        fn resolve_now(&self, host: &str) -> Result<Vec<SocketAddr>, String> {
            self.resolver.resolve(host, Instant::now() + SLACK)
        }

        /// How many warnings the resolver logged.
        fn warnings(&self) -> usize {
            self.resolver.warnings.load(Ordering::Relaxed)
        }
    }

    impl Drop for FakeDns {
        fn drop(&mut self) {
            drop(self.answers.take());
            for request in self.requests.drain(..) {
                // A request's panic is the test's failure, reported by its
                // receiver or the assertions already.
                let _ = request.join();
            }
            let mut returned = 0;
            while returned < self.calls() {
                if self.returned.recv_timeout(SLACK).is_err() {
                    break;
                }
                returned += 1;
            }
        }
    }

    /// Waits (bounded) for a request's outcome; fails the test if it does
    /// not come within `within`.
    fn outcome(
        rx: &Receiver<(Result<Vec<SocketAddr>, String>, Instant)>,
        within: Duration,
    ) -> (Result<Vec<SocketAddr>, String>, Instant) {
        rx.recv_timeout(within)
            .expect("the request did not return within its bound")
    }

    /// Asserts that `result` is the timeout error of [`NAME`], naming a
    /// wait of at most `budget` (the wait is measured from the request's
    /// start in `resolve`, a little after its deadline was set).
    fn assert_timed_out(result: Result<Vec<SocketAddr>, String>, budget: Duration) {
        let err = result.expect_err("a hung lookup without a kept answer");
        let shown = err
            .strip_prefix("resolving etcd.test:2379 took longer than ")
            .and_then(|rest| rest.strip_suffix("ms"))
            .and_then(|ms| ms.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("not a timeout in ms: {err}"));
        assert!(Duration::from_millis(shown) <= budget, "{err}");
    }

    /// The socket address `s` (a literal of the test's).
    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test addresses are literals")
    }

    #[test]
    fn an_ip_literal_never_calls_the_lookup() {
        let dns = FakeDns::new();
        assert_eq!(
            dns.resolve_now("10.0.0.1:2379"),
            Ok(vec![addr("10.0.0.1:2379")])
        );
        assert_eq!(dns.resolve_now("[::1]:2379"), Ok(vec![addr("[::1]:2379")]));
        assert_eq!(dns.calls(), 0);
        assert!(dns.resolver.names.lock().is_empty());
    }

    #[test]
    fn a_hung_lookup_without_a_kept_answer_fails_at_the_deadline() {
        let mut dns = FakeDns::new();
        let budget = Duration::from_millis(200);
        let sent = Instant::now();
        let rx = dns.request(NAME, budget);
        let (result, at) = outcome(&rx, budget + SLACK);
        assert_timed_out(result, budget);
        assert!(at >= sent + budget, "gave up before its deadline");
        assert_eq!(dns.calls(), 1);
    }

    #[test]
    fn a_hung_lookup_with_a_kept_answer_gives_it_with_half_the_time_left() {
        let mut dns = FakeDns::new();
        let kept = vec![addr("10.0.0.1:2379")];
        dns.answer(Answer::Addrs(kept.clone()));
        assert_eq!(dns.resolve_now(NAME), Ok(kept.clone()));

        let budget = Duration::from_secs(1);
        let sent = Instant::now();
        let rx = dns.request(NAME, budget);
        let (result, at) = outcome(&rx, budget + SLACK);
        assert_eq!(result, Ok(kept));
        assert!(at >= sent + budget / 2, "gave up before half its time");
        assert!(at < sent + budget, "left no time to connect");
        assert_eq!(dns.calls(), 2);
        assert_eq!(dns.warnings(), 1);
    }

    #[test]
    fn concurrent_requests_during_a_hung_lookup_start_only_one() {
        let mut dns = FakeDns::new();
        let first = dns.request(NAME, SLACK);
        assert_eq!(dns.started(), NAME);
        // The lookup is blocked until `answer` below: each of these finds
        // it running.
        let budget = Duration::from_millis(100);
        let others: Vec<_> = (0..4).map(|_| dns.request(NAME, budget)).collect();
        for rx in &others {
            let (result, _) = outcome(rx, SLACK);
            assert_timed_out(result, budget);
        }
        assert_eq!(dns.calls(), 1);
        // The one lookup's answer reaches the request that started it.
        let answer = vec![addr("10.0.0.2:2379")];
        dns.answer(Answer::Addrs(answer.clone()));
        assert_eq!(outcome(&first, SLACK).0, Ok(answer));
        assert_eq!(dns.calls(), 1);
    }

    #[test]
    fn a_failing_lookup_gives_the_kept_answer_or_else_its_error() {
        let dns = FakeDns::new();
        dns.answer(Answer::Fail("no such host"));
        assert_eq!(
            dns.resolve_now(NAME),
            Err("cannot resolve etcd.test:2379: no such host".to_string())
        );
        let kept = vec![addr("10.0.0.1:2379")];
        dns.answer(Answer::Addrs(kept.clone()));
        assert_eq!(dns.resolve_now(NAME), Ok(kept.clone()));
        dns.answer(Answer::Fail("no such host"));
        dns.answer(Answer::Fail("no such host"));
        assert_eq!(dns.resolve_now(NAME), Ok(kept.clone()));
        assert_eq!(dns.resolve_now(NAME), Ok(kept));
        assert_eq!(dns.calls(), 4);
        // Two failures in a row are one change of state: one warning.
        assert_eq!(dns.warnings(), 1);
    }

    #[test]
    fn a_successful_lookup_replaces_the_kept_answer() {
        let mut dns = FakeDns::new();
        let old = vec![addr("10.0.0.1:2379")];
        let new = vec![addr("10.0.0.2:2379"), addr("10.0.0.3:2379")];
        dns.answer(Answer::Addrs(old));
        dns.resolve_now(NAME).expect("the first answer");
        dns.answer(Answer::Addrs(new.clone()));
        assert_eq!(dns.resolve_now(NAME), Ok(new.clone()));
        // A failure and a hung lookup now fall back on the new answer.
        dns.answer(Answer::Fail("SERVFAIL"));
        assert_eq!(dns.resolve_now(NAME), Ok(new.clone()));
        let rx = dns.request(NAME, Duration::from_millis(200));
        assert_eq!(outcome(&rx, SLACK).0, Ok(new));
    }

    #[test]
    fn an_empty_answer_is_a_failure() {
        let dns = FakeDns::new();
        dns.answer(Answer::Addrs(Vec::new()));
        assert_eq!(
            dns.resolve_now(NAME),
            Err("cannot resolve etcd.test:2379: it resolved to no address".to_string())
        );
    }

    #[test]
    fn without_threads_the_lookup_runs_on_the_calling_thread() {
        let dns = FakeDns::new();
        dns.resolver.fail_spawn.store(true, Ordering::Relaxed);
        let answer = vec![addr("10.0.0.1:2379")];
        dns.answer(Answer::Addrs(answer.clone()));
        assert_eq!(dns.resolve_now(NAME), Ok(answer));
        let (name, thread) = dns.started.try_recv().expect("the lookup ran");
        assert_eq!(name, NAME);
        assert_eq!(thread, std::thread::current().id());
        assert_eq!(dns.calls(), 1);
    }
}
