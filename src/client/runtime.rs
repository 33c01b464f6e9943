//! The event-loop and timer threads that clients share, one set per loop
//! settings.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;

use crate::config::ClientConfig;
use crate::error::Result;
use crate::reactor::{LoopHandle, Runtime};

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
    pub(super) fn next_loop(&self) -> Result<LoopHandle> {
        let loops = self.runtime.loops();
        let turn = self.handed_out.fetch_add(1, Ordering::Relaxed);
        let index = turn % loops.len(); // `Runtime::start_lazily` made at least one
        self.runtime.start_loop(index)?;
        Ok(loops[index].clone())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use crate::{Client, ClientConfig};

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
}
