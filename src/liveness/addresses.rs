//! Which of a provider's addresses a consumer tries next.
//!
//! A provider's name can resolve to several addresses (`localhost` to `::1`
//! and `127.0.0.1`, a host to its IPv6 and IPv4 addresses), of which the
//! provider may listen on only one. Like `std::net::TcpStream::connect`, a
//! consumer tries them in turn; unlike it, it remembers which one answered:
//! each round of attempts starts at the address that last connected, so a
//! reconnect goes straight back to the provider's address instead of first
//! waiting out a refusal (or a connect timeout) from another one.
//!
//! A round is one attempt for the reconnect backoff: the next address is
//! tried at once, and only a round in which every address failed waits for
//! the backoff's delay and counts toward its `max_attempts`.

/// A link's place in its round of addresses (indices into the link's
/// address list, which never changes). Pure: the event loop asks it and
/// acts.
#[derive(Debug, Clone)]
pub(crate) struct AddressRound {
    /// How many addresses there are; at least 1.
    count: usize,
    /// Where each round starts: the address that last connected (the
    /// first one until one has).
    preferred: usize,
    /// Addresses of the current round whose attempt failed so far.
    failed: usize,
}

impl AddressRound {
    /// A round over `count` addresses (taken as 1 if 0), starting at the
    /// first.
    pub(crate) fn new(count: usize) -> AddressRound {
        AddressRound {
            count: count.max(1),
            preferred: 0,
            failed: 0,
        }
    }

    /// The address the current attempt uses.
    pub(crate) fn current(&self) -> usize {
        (self.preferred + self.failed) % self.count
    }

    /// The current attempt failed: the address to try at once, or `None`
    /// when every address of the round failed. The round then starts over
    /// at the preferred address, after the backoff's delay.
    pub(crate) fn attempt_failed(&mut self) -> Option<usize> {
        self.failed += 1;
        if self.failed < self.count {
            Some(self.current())
        } else {
            self.failed = 0;
            None
        }
    }

    /// The current attempt connected: later rounds start at its address.
    pub(crate) fn connected(&mut self) {
        self.preferred = self.current();
        self.failed = 0;
    }

    /// A connection that was up ended: the next round starts at the
    /// preferred address.
    pub(crate) fn start_over(&mut self) {
        self.failed = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::AddressRound;

    #[test]
    fn one_address_is_a_round_of_one() {
        let mut round = AddressRound::new(1);
        assert_eq!(round.current(), 0);
        assert_eq!(round.attempt_failed(), None);
        assert_eq!(round.current(), 0);
        round.connected();
        round.start_over();
        assert_eq!(round.current(), 0);
    }

    #[test]
    fn a_round_tries_each_address_once_then_starts_over() {
        let mut round = AddressRound::new(3);
        assert_eq!(round.current(), 0);
        assert_eq!(round.attempt_failed(), Some(1));
        assert_eq!(round.attempt_failed(), Some(2));
        assert_eq!(round.attempt_failed(), None);
        assert_eq!(round.current(), 0, "the next round starts at the first");
        assert_eq!(round.attempt_failed(), Some(1));
    }

    #[test]
    fn rounds_start_at_the_address_that_last_connected() {
        let mut round = AddressRound::new(3);
        assert_eq!(round.attempt_failed(), Some(1));
        round.connected();
        round.start_over();
        assert_eq!(round.current(), 1);
        assert_eq!(round.attempt_failed(), Some(2));
        assert_eq!(round.attempt_failed(), Some(0), "wraps around");
        assert_eq!(round.attempt_failed(), None);
        assert_eq!(round.current(), 1);
    }

    #[test]
    fn a_connection_lost_mid_round_starts_the_next_round_over() {
        let mut round = AddressRound::new(2);
        round.connected();
        // The connection dies; the reconnect round begins at the same address.
        round.start_over();
        assert_eq!(round.current(), 0);
        assert_eq!(round.attempt_failed(), Some(1));
        assert_eq!(round.attempt_failed(), None);
    }

    #[test]
    fn zero_addresses_count_as_one() {
        let mut round = AddressRound::new(0);
        assert_eq!(round.current(), 0);
        assert_eq!(round.attempt_failed(), None);
    }
}
