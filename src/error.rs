//! The one error type of pulse.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use crate::protocol::ResponseStatus;

/// Shorthand for `Result<T, pulse::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in a call, a connection or a configuration.
///
/// Each message says what happened and, where it helps, what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The call got no response within its timeout. The request may or may not
    /// have run on the provider.
    #[error("call timed out after {0:?} without a response")]
    Timeout(Duration),
    /// The connection the call was sent on died before the response came
    /// (lost, or closed by the provider with any Close but Normal, such as
    /// Close(Abandoned) at the end of its `shutdown_timeout`). The request
    /// may or may not have run on the provider; the client is already
    /// reconnecting.
    #[error("connection to {peer} lost before the response arrived: {reason}")]
    ConnectionLost {
        /// The provider the call was sent to.
        peer: SocketAddr,
        /// Why the connection ended: the reason's name and its detail, if
        /// any (e.g. `heartbeat_timeout`, `peer_closed (connection closed
        /// by the peer without a Close frame)`), as the `Disconnected`
        /// event gives it.
        reason: String,
    },
    /// No connection became ready within the call's timeout; or (from
    /// [`PendingCall::wait`](crate::PendingCall::wait), with `waited` zero)
    /// the connection died while the request still waited in its write
    /// queue, so not one byte of it was sent. Either way the request did
    /// not run.
    #[error("not connected to {peer} (waited {waited:?} for a connection; {detail})")]
    NotConnected {
        /// The provider the client is trying to reach.
        peer: SocketAddr,
        /// How long the call waited for a connection.
        waited: Duration,
        /// What the last connect attempt saw, e.g. `io_error (Connection refused)`.
        detail: String,
    },
    /// A [`ClusterClient`](crate::cluster::ClusterClient) call that no
    /// provider took: it found no healthy provider of its service (none
    /// connected and answering its heartbeats, or the registry lists none),
    /// and fails at once instead of waiting; or every provider it tried
    /// refused the request before running it (not connected by then,
    /// `ShuttingDown`, `Overloaded`) until it ran out of healthy providers,
    /// retries or time, and the detail ends with the last refusal. Either
    /// way the request ran nowhere. Retry later, or check that the
    /// providers run, are registered and are not overloaded.
    #[error("no provider took the call to service {service}: {detail}")]
    NoProvider {
        /// The service called: its name, then `:version` and `@group` when
        /// not empty.
        service: String,
        /// What the client knows of the providers, e.g. `3 known, 2
        /// connecting, 0 gave up, 1 tried already or shut down`.
        detail: String,
    },
    /// The provider answered with a non-Ok status.
    ///
    /// Also `ShuttingDown` for a call still waiting when its provider
    /// closed the connection with Close(Normal) (it shuts down, or retires
    /// the connection at `max_age`): a provider sends that Close only once
    /// every request it read has its answer ahead of it, so this one was
    /// never read and did not run, exactly as if it had been refused with
    /// `ShuttingDown` (docs/PROTOCOL.md, section 7). The message then says
    /// so.
    #[error("remote error {status:?}: {message}")]
    Remote {
        /// The status byte of the response.
        status: ResponseStatus,
        /// The provider's human-readable message.
        message: String,
    },
    /// A local bound was reached (in-flight calls or queued bytes); retry later
    /// or raise the bound in the config.
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// The peer broke the wire protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A system call failed.
    #[error("{op} failed: {source}")]
    Io {
        /// What pulse was doing, e.g. `bind 127.0.0.1:7000`.
        op: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A value could not be encoded or a response could not be decoded into the
    /// requested type.
    #[error("codec error: {0}")]
    Codec(String),
    /// The client or server was shut down.
    #[error("shut down")]
    Shutdown,
    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
}

impl Error {
    /// Whether the call was refused before it ran anywhere, for a reason
    /// that can pass: no connection (`NotConnected`, `NoProvider`), a local
    /// bound (`Overloaded`), or the provider's `Overloaded` or
    /// `ShuttingDown` answer (a provider shutting down or closing that
    /// connection, e.g. at `max_age`; also its Close(Normal) arriving
    /// before it read the request). Sending the call again, later or to
    /// another provider, is then safe even if it is not idempotent.
    ///
    /// False after a request may have run (`Timeout`, `ConnectionLost`,
    /// `Shutdown`, a result that did not decode) and for refusals a retry
    /// would meet again (an unknown service or method, bad arguments).
    /// The same rule picks the calls a `ClusterClient` sends elsewhere
    /// whatever their idempotency.
    pub fn refused_before_running(&self) -> bool {
        matches!(
            self,
            Error::NotConnected { .. }
                | Error::NoProvider { .. }
                | Error::Overloaded(_)
                | Error::Remote {
                    status: ResponseStatus::Overloaded | ResponseStatus::ShuttingDown,
                    ..
                }
        )
    }

    /// Wraps an `io::Error` with the operation that failed.
    pub fn io(op: impl Into<String>, source: io::Error) -> Error {
        Error::Io {
            op: op.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_before_running_names_only_calls_that_never_ran() {
        let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let remote = |status| Error::Remote {
            status,
            message: String::new(),
        };
        let refused = [
            Error::NotConnected {
                peer,
                waited: Duration::ZERO,
                detail: String::new(),
            },
            Error::NoProvider {
                service: "demo".into(),
                detail: String::new(),
            },
            Error::Overloaded("max_inflight".into()),
            remote(ResponseStatus::Overloaded),
            remote(ResponseStatus::ShuttingDown),
        ];
        for e in &refused {
            assert!(e.refused_before_running(), "{e:?}");
        }
        let may_have_run_or_would_fail_again = [
            Error::Timeout(Duration::from_secs(1)),
            Error::ConnectionLost {
                peer,
                reason: "io_error".into(),
            },
            Error::Shutdown,
            Error::Codec("the result does not decode".into()),
            remote(ResponseStatus::HandlerError),
            remote(ResponseStatus::MethodNotFound),
            remote(ResponseStatus::BadRequest),
        ];
        for e in &may_have_run_or_would_fail_again {
            assert!(!e.refused_before_running(), "{e:?}");
        }
    }

    #[test]
    fn messages_name_what_happened() {
        let e = Error::ConnectionLost {
            peer: "127.0.0.1:9".parse().unwrap(),
            reason: "heartbeat_timeout".into(),
        };
        assert_eq!(
            e.to_string(),
            "connection to 127.0.0.1:9 lost before the response arrived: heartbeat_timeout"
        );
        let e = Error::io(
            "bind 127.0.0.1:1",
            io::Error::from(io::ErrorKind::PermissionDenied),
        );
        assert!(e.to_string().starts_with("bind 127.0.0.1:1 failed"));
        let e = Error::Remote {
            status: ResponseStatus::MethodNotFound,
            message: "no method x".into(),
        };
        assert_eq!(e.to_string(), "remote error MethodNotFound: no method x");
        let e = Error::NoProvider {
            service: "echo:1.0".into(),
            detail: "the registry lists none".into(),
        };
        assert_eq!(
            e.to_string(),
            "no provider took the call to service echo:1.0: the registry lists none"
        );
    }
}
