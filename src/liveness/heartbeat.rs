//! One connection's heartbeat state machine, used by both the consumer and the
//! provider. The rules, with a timeline, are documented on [`Heartbeat`] (this
//! module is private; its items are re-exported from [`crate::liveness`]).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How many of the most recent pings [`Heartbeat::on_pong`] can match.
const PING_HISTORY: usize = 8;

/// The smallest accepted [`HeartbeatConfig::interval`] and
/// [`HeartbeatConfig::stall_threshold`].
const MIN_INTERVAL: Duration = Duration::from_millis(1);

/// When a side sends pings. See the [`Heartbeat` docs](Heartbeat#pings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HeartbeatMode {
    /// A ping every interval, whatever the traffic. The default.
    #[default]
    Fixed,
    /// A ping only when nothing was written or nothing was read for an
    /// interval (Netty's all-idle), at most once per interval.
    Idle,
}

/// Settings of a [`Heartbeat`].
///
/// All fields are public; check a hand-built value with
/// [`HeartbeatConfig::validate`].
#[derive(Debug, Clone)]
pub struct HeartbeatConfig {
    /// The ping period and the length of one "missed" interval. Default 1 s,
    /// at least 1 ms.
    pub interval: Duration,
    /// Consecutive intervals with nothing read before the peer is declared
    /// dead. Default 3, at least 1.
    pub max_missed: u32,
    /// When pings are sent. Default [`HeartbeatMode::Fixed`].
    pub mode: HeartbeatMode,
    /// Whether this side sends pings. Default `true`; with `false` the side
    /// relies on the peer's pings but still detects silence, so one side at
    /// least must ping: with both silent, an idle connection is closed
    /// every `max_missed` intervals (and the consumer reconnects). Even then it
    /// pings once right after its own stall, and once an interval while it
    /// leaves the peer's bytes unread on purpose (see
    /// [`Heartbeat::excuse_silence`]), since the peer's pings then go
    /// unanswered. A pulse side with `false` says so in the status of its
    /// Pings and Pongs ([`DOES_NOT_PING`](crate::protocol::DOES_NOT_PING)),
    /// so that its peer does not take its silence behind a long transfer to
    /// it for death (docs/PROTOCOL.md, section 11).
    pub send_pings: bool,
    /// How late a due deadline must be for the machine to conclude that this
    /// side stalled (see the [`Heartbeat` docs](Heartbeat#own-stalls)). `None`, the
    /// default, means [`interval`](Self::interval). Must exceed the timer tick
    /// (`ConnectionConfig::validate` refuses it otherwise).
    pub stall_threshold: Option<Duration>,
    /// Extra time after each interval before it counts as missed, so that the
    /// answer to a ping sent at the same instant (or a tick late) can arrive
    /// first; a `Missed` (not `Dead`) also waits half an interval plus this
    /// long after an unanswered ping of this side. The peer is declared dead
    /// `max_missed × interval + miss_grace` after its last byte. Default 0
    /// here; pulse's event loops raise it to at least one timer tick + 1 ms.
    pub miss_grace: Duration,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        HeartbeatConfig {
            interval: Duration::from_secs(1),
            max_missed: 3,
            mode: HeartbeatMode::Fixed,
            send_pings: true,
            stall_threshold: None,
            miss_grace: Duration::ZERO,
        }
    }
}

impl HeartbeatConfig {
    /// Checks that the settings make sense.
    ///
    /// # Errors
    ///
    /// Returns a message naming the offending field if `interval` is below
    /// 1 ms, `max_missed` is 0, or `stall_threshold` is `Some` and below 1 ms.
    pub fn validate(&self) -> Result<(), String> {
        if self.interval < MIN_INTERVAL {
            return Err(format!(
                "heartbeat interval must be at least 1ms, got {:?}",
                self.interval
            ));
        }
        if self.max_missed == 0 {
            return Err("heartbeat max_missed must be at least 1".into());
        }
        if let Some(threshold) = self.stall_threshold
            && threshold < MIN_INTERVAL
        {
            return Err(format!(
                "heartbeat stall_threshold must be at least 1ms, got {threshold:?}"
            ));
        }
        Ok(())
    }

    /// `interval × max_missed + miss_grace`: how long a peer may stay silent
    /// before it is declared dead (the shell adds up to one timer tick).
    pub fn bound(&self) -> Duration {
        self.interval
            .saturating_mul(self.max_missed)
            .saturating_add(self.miss_grace)
    }

    /// The effective stall threshold: `stall_threshold`, or `interval` if
    /// `None`.
    fn effective_stall_threshold(&self) -> Duration {
        self.stall_threshold.unwrap_or(self.interval)
    }
}

/// What the shell must do, drained with [`Heartbeat::poll_action`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeartbeatAction {
    /// Write a Ping frame with this id; the peer answers a Pong with the same
    /// id, to be passed to [`Heartbeat::on_pong`].
    SendPing {
        /// The ping id, 1 for the first ping and then increasing.
        seq: u64,
    },
    /// `count` consecutive intervals went by with nothing read from the peer
    /// (1 to `max_missed - 1`). Informational: report it as an event.
    Missed {
        /// Consecutive missed intervals so far.
        count: u32,
    },
    /// The peer missed `max_missed` intervals: close the connection with a
    /// heartbeat timeout. Emitted once, and nothing after it.
    Dead {
        /// The missed intervals counted (at least `max_missed`).
        missed: u32,
        /// Time since the last byte was read from the peer (it includes any
        /// stall of this side that was forgiven before).
        silent_for: Duration,
    },
    /// This side ran late by `late_by` (paused process, stalled machine,
    /// blocked loop); the unobserved intervals were not counted against the
    /// peer. For logging.
    Stalled {
        /// How late the earliest due deadline was handled.
        late_by: Duration,
    },
}

/// One connection's heartbeat: when to ping, when the peer has gone silent.
///
/// [`Heartbeat`] is a pure state machine, the same on the consumer and the
/// provider side. It never reads a clock: every input carries `now`, and the
/// shell asks [`Heartbeat::next_deadline`] when to call
/// [`Heartbeat::handle_timeout`] again, then drains what to do with
/// [`Heartbeat::poll_action`]. See the [`liveness` module](crate::liveness) for the driving
/// loop.
///
/// Below, `I` is [`HeartbeatConfig::interval`] and `M` is
/// [`HeartbeatConfig::max_missed`].
///
/// # Missed intervals
///
/// *Evidence* that the peer is alive is the last time any byte was read from
/// it ([`Heartbeat::on_read`]; bytes of a frame that is not complete yet count
/// too: progress is life), or the end of this side's last stall (below),
/// whichever is later. At [`handle_timeout`](Heartbeat::handle_timeout) the
/// number of missed intervals is `floor((now - evidence - G) / I)`, where `G`
/// is [`miss_grace`](HeartbeatConfig::miss_grace) (0 in the timeline below).
/// When it grows past the count reported last:
///
/// * below `M`, [`HeartbeatAction::Missed`] reports it (1, 2, …, `M - 1`);
/// * at `M` or more, one [`HeartbeatAction::Dead`] is emitted and the machine
///   stops: no more actions, [`next_deadline`](Heartbeat::next_deadline) is
///   `None`. The shell closes the connection (heartbeat timeout).
///
/// A read resets the count to 0. The miss deadline is
/// `evidence + (reported + 1) × I + G` (the first one held later while the
/// peer's pings are awaited, see [Pings](Heartbeat#pings)), so a silent
/// peer last heard at `t` is declared dead at exactly `t + M × I + G` if the
/// shell calls `handle_timeout` at the deadline it was given, and never
/// earlier: a call before a deadline does nothing at all.
///
/// A `Missed` (not `Dead`) also waits until `I / 2 + G` after this side's
/// last ping, while that ping is unanswered (sent after the evidence), and
/// never past the `Dead` deadline: a missed interval means the peer left a
/// ping unanswered for half an interval, not that its answer came a little
/// later than the one before. `Dead` keeps its bound.
///
/// # Pings
///
/// Sequence numbers start at 1 and increase by one per
/// [`HeartbeatAction::SendPing`]. The last 8 pings are
/// remembered so that [`on_pong`](Heartbeat::on_pong) can measure the round
/// trip.
///
/// * [`HeartbeatMode::Fixed`]: a ping every `I` on a fixed grid, the first at
///   creation + `I`: a ping sent late (by less than `I`) does not shift the
///   next one. A call later than that sends one ping, never a catch-up burst,
///   and restarts the grid from then.
///
///   A side that reads the peer's pings and tells the machine
///   ([`on_peer_ping`](Heartbeat::on_peer_ping); pulse does on the provider)
///   sends its ping *with the Pong* when it is due within half an interval
///   (and before the peer's next Ping is expected): `on_peer_ping` queues
///   the [`HeartbeatAction::SendPing`], and the grid restarts from there. It
///   holds its timer's ping like Idle mode below, so while the peer pings
///   every interval, so does this side, one write an interval instead of two.
/// * [`HeartbeatMode::Idle`] (Netty's `IdleStateHandler`, all-idle): a ping
///   when nothing was written *or* nothing was read for `I`, but never more
///   often than once per `I`:
///   `next_ping = max(last_ping + I, min(last_read, last_write) + I)`. Under
///   steady two-way traffic no ping is ever sent; a side that only writes
///   (one-way calls) still pings, because it reads nothing.
///
///   A side that reads the peer's pings and tells the machine
///   ([`on_peer_ping`](Heartbeat::on_peer_ping); pulse does on the provider)
///   holds its own ping, and the first miss, until half an interval after
///   the peer's next Ping is due (`last peer ping + 1.5 × I`), when `M` ≥ 2:
///   a Ping that comes a little late is not raced by a ping of this side.
///   A peer that stops pinging gets this side's ping then, and `Dead` comes
///   at the same time as without the hold.
/// * With [`send_pings`](HeartbeatConfig::send_pings) `false` no ping is sent
///   (except one right after a stall, and one an interval while silence is
///   excused, see [`excuse_silence`](Heartbeat::excuse_silence)); silence is
///   still detected, relying on the peer's pings to keep the connection
///   alive.
///
/// # Own stalls
///
/// If, at `handle_timeout`, the earliest deadline that was due (ping or miss)
/// is late by at least [`stall_threshold`](HeartbeatConfig::stall_threshold)
/// (default `I`), then *this* side did not run when it should have: the
/// process was paused, the machine stalled, the loop was blocked. The peer's
/// bytes may be sitting unread in the socket buffer, so the intervals that
/// went by unobserved are not counted against it. Instead the machine emits
/// [`HeartbeatAction::Stalled`] (for logging), resets the evidence to `now`
/// (miss count 0), emits a [`HeartbeatAction::SendPing`] at once to provoke an
/// answer, and judges the peer on fresh evidence from then on: a peer that
/// really died is declared dead `M × I` after the stall ended.
///
/// The threshold must be larger than the shell's timer tick, since every call
/// comes up to one tick late; with the default (`I`) that means `I` must be
/// longer than a tick.
///
/// When several things are due in one call they come out in this order:
/// `Stalled` then `SendPing`. Nothing comes after `Dead`, and a `Missed` due
/// with a ping waits for that ping's answer (above), so it comes in a later
/// call if at all.
///
/// # Timeline
///
/// `I` = 1 s, `M` = 3, Fixed mode, the peer's last byte is read at 0.4 s:
///
/// ```text
/// t (s)  input              actions                           next_deadline
/// 0.0    new                                                  1.0
/// 0.4    on_read                                              1.0
/// 1.0    handle_timeout     SendPing{seq: 1}                  1.5
/// 1.5    handle_timeout     Missed{count: 1}                  2.0
/// 2.0    handle_timeout     SendPing{seq: 2}                  2.5
/// 2.5    handle_timeout     Missed{count: 2}                  3.0
/// 3.0    handle_timeout     SendPing{seq: 3}                  3.4
/// 3.4    handle_timeout     Dead{missed: 3, silent_for: 3 s}  None
/// ```
///
/// Had this process been paused from 0.5 s to 10 s instead, the call at 10 s
/// would find the ping deadline of 1.0 s late by 9 s and emit
/// `Stalled{late_by: 9 s}` and `SendPing{seq: 1}`; a still silent peer would
/// then be missed at 11 s and 12 s and declared dead at 13 s.
///
/// The same timeline as code:
///
/// ```
/// use std::time::{Duration, Instant};
/// use pulse::liveness::{Heartbeat, HeartbeatAction, HeartbeatConfig};
///
/// let ms = Duration::from_millis;
/// let t0 = Instant::now();
/// let mut hb = Heartbeat::new(HeartbeatConfig::default(), t0);
/// hb.on_read(t0 + ms(400));
/// let mut log = Vec::new();
/// while let Some(deadline) = hb.next_deadline() {
///     hb.handle_timeout(deadline);
///     while let Some(action) = hb.poll_action() {
///         log.push((deadline - t0, action));
///     }
/// }
/// assert_eq!(log, [
///     (ms(1000), HeartbeatAction::SendPing { seq: 1 }),
///     (ms(1500), HeartbeatAction::Missed { count: 1 }),
///     (ms(2000), HeartbeatAction::SendPing { seq: 2 }),
///     (ms(2500), HeartbeatAction::Missed { count: 2 }),
///     (ms(3000), HeartbeatAction::SendPing { seq: 3 }),
///     (ms(3400), HeartbeatAction::Dead { missed: 3, silent_for: ms(3000) }),
/// ]);
/// ```
#[derive(Debug, Clone)]
pub struct Heartbeat {
    config: HeartbeatConfig,
    created: Instant,
    last_read: Instant,
    last_write: Instant,
    /// The end of this side's last stall; evidence of life is never older.
    stall_reset: Instant,
    /// When this side started excusing the peer's silence (leaving its
    /// bytes unread), until the next read; see
    /// [`excuse_silence`](Self::excuse_silence).
    excused_since: Option<Instant>,
    /// The missed count reported last (0 after a read or a stall).
    reported: u32,
    /// When the last ping was emitted, if any.
    last_ping: Option<Instant>,
    /// When the peer's last Ping was read, if [`on_peer_ping`](Self::on_peer_ping)
    /// is used (the provider side).
    peer_ping: Option<Instant>,
    /// Fixed mode: the grid point the last ping belonged to.
    ping_grid: Option<Instant>,
    /// The seq of the next ping.
    next_seq: u64,
    /// `(seq, sent at)` of the last pings, indexed by `seq % PING_HISTORY`.
    sent: [Option<(u64, Instant)>; PING_HISTORY],
    srtt: Option<Duration>,
    /// `(read at, sent at)` of the last Pong matched to a ping: Idle mode
    /// counts that read from when its ping left (see `idle_read_mark`).
    pong_read: Option<(Instant, Instant)>,
    actions: VecDeque<HeartbeatAction>,
    dead: bool,
}

impl Heartbeat {
    /// Starts the heartbeat of a connection established at `now`.
    ///
    /// `now` counts as the last read and the last write: a peer that never
    /// sends anything is declared dead `bound()` after creation.
    ///
    /// The config should have passed [`HeartbeatConfig::validate`]; an invalid
    /// one does not panic but is clamped (interval and stall threshold to at
    /// least 1 ms, `max_missed` to at least 1), as [`config`](Self::config)
    /// then shows.
    pub fn new(mut config: HeartbeatConfig, now: Instant) -> Heartbeat {
        config.interval = config.interval.max(MIN_INTERVAL);
        config.max_missed = config.max_missed.max(1);
        config.stall_threshold = config.stall_threshold.map(|t| t.max(MIN_INTERVAL));
        Heartbeat {
            config,
            created: now,
            last_read: now,
            last_write: now,
            stall_reset: now,
            excused_since: None,
            reported: 0,
            last_ping: None,
            peer_ping: None,
            ping_grid: None,
            next_seq: 1,
            sent: [None; PING_HISTORY],
            srtt: None,
            pong_read: None,
            actions: VecDeque::new(),
            dead: false,
        }
    }

    /// Records that bytes were read from the peer at `now`: any bytes, also
    /// part of a frame not complete yet. Resets the missed count to 0.
    /// Ignored once dead.
    pub fn on_read(&mut self, now: Instant) {
        if self.dead {
            return;
        }
        self.last_read = self.last_read.max(now);
        self.reported = 0;
        // Reading again ends an excused silence.
        self.excused_since = None;
    }

    /// Records that bytes were written to the peer at `now` (used by
    /// [`HeartbeatMode::Idle`]). Call it for the ping frames too. Ignored once
    /// dead.
    pub fn on_write(&mut self, now: Instant) {
        if self.dead {
            return;
        }
        self.last_write = self.last_write.max(now);
    }

    /// Records that this side leaves the peer's bytes unread on purpose at
    /// `now` (pulse: a provider holding back one-way calls while its
    /// handlers catch up), or that the peer cannot have answered yet (pulse:
    /// this side's Ping still behind a long frame to a peer that does not
    /// ping): the peer's silence is this side's doing, so
    /// evidence of life counts from `now`, as after a stall, but with no
    /// action. Pings are sent as before, so the peer keeps hearing from
    /// this side; with [`send_pings`](HeartbeatConfig::send_pings) `false`
    /// a ping is due at once and then every interval until the next
    /// [`on_read`](Self::on_read), because the peer, whose own pings wait
    /// unread, hears nothing else from this side. Ignored once dead.
    ///
    /// Call it when handling a timeout, just before
    /// [`handle_timeout`](Self::handle_timeout) with the same `now`: the ping
    /// it makes due goes out in that call.
    pub fn excuse_silence(&mut self, now: Instant) {
        if self.dead {
            return;
        }
        self.stall_reset = self.stall_reset.max(now);
        self.reported = 0;
        self.excused_since.get_or_insert(now);
    }

    /// Records that a Ping from the peer was read at `now`; it counts as a
    /// read too (see [`on_read`](Self::on_read)). Ignored once dead.
    ///
    /// With `max_missed` of 2 or more, while the peer's pings keep coming,
    /// this side holds its own ping (and its first missed interval) until
    /// half an interval after the peer's next Ping was due, instead of racing
    /// it. In [`HeartbeatMode::Fixed`] it may also queue a
    /// [`HeartbeatAction::SendPing`] to go out with the Pong: drain
    /// [`poll_action`](Self::poll_action) after it. See the
    /// [`Heartbeat` docs](Heartbeat#pings).
    ///
    /// Call it on **one side** of a connection only (pulse: the provider). If
    /// both sides held their pings for each other, neither would ping on
    /// time.
    pub fn on_peer_ping(&mut self, now: Instant) {
        if self.dead {
            return;
        }
        let previous = self.peer_ping;
        self.on_read(now);
        self.peer_ping = Some(previous.map_or(now, |at| at.max(now)));
        if self.ping_rides_with_pong(now, previous) {
            self.send_ping(now);
            self.ping_grid = Some(now);
        }
    }

    /// Records a Pong for ping `seq` received at `now`.
    ///
    /// Returns the round-trip time if `seq` is one of the last
    /// 8 pings sent and was not answered before, and folds it
    /// into the smoothed RTT (the first sample as is, then
    /// `7/8 × srtt + 1/8 × sample`). Unknown, stale or duplicate ids return
    /// `None` and change nothing. This does not count as a read: call
    /// [`on_read`](Self::on_read) for the bytes as usual.
    pub fn on_pong(&mut self, now: Instant, seq: u64) -> Option<Duration> {
        let slot = &mut self.sent[(seq % PING_HISTORY as u64) as usize];
        let sent_at = match *slot {
            Some((s, at)) if s == seq => at,
            _ => return None,
        };
        *slot = None;
        self.pong_read = Some((now, sent_at));
        let sample = now.saturating_duration_since(sent_at);
        // `× 7` cannot overflow: a sample is time that really elapsed since a
        // ping this side sent (a Pong's id only matches a recorded ping).
        self.srtt = Some(match self.srtt {
            None => sample,
            Some(old) => (old * 7 + sample) / 8,
        });
        Some(sample)
    }

    /// Advances the machine to `now`; queues actions for
    /// [`poll_action`](Self::poll_action).
    ///
    /// May be called at any time: a call before
    /// [`next_deadline`](Self::next_deadline) does nothing, a late one is
    /// handled as described in the [`Heartbeat` docs](Heartbeat#own-stalls).
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.dead {
            return;
        }
        let ping_due = self.ping_deadline().filter(|&d| d <= now);
        let miss_due = self.miss_deadline().filter(|&d| d <= now);
        let earliest = match (ping_due, miss_due) {
            (Some(p), Some(m)) => p.min(m),
            (Some(d), None) | (None, Some(d)) => d,
            (None, None) => return,
        };

        let late_by = now.saturating_duration_since(earliest);
        if late_by >= self.config.effective_stall_threshold() {
            self.actions.push_back(HeartbeatAction::Stalled { late_by });
            self.stall_reset = self.stall_reset.max(now);
            self.reported = 0;
            self.send_ping(now);
            self.ping_grid = Some(now);
            return;
        }

        // A ping due now goes out in this call: its answer gets the grace
        // before a (non-fatal) miss counts, as if it had left on time.
        let missed = self.missed_at(now, ping_due.is_some());
        if missed > self.reported {
            self.reported = missed;
            if missed >= self.config.max_missed {
                self.actions.push_back(HeartbeatAction::Dead {
                    missed,
                    silent_for: now.saturating_duration_since(self.last_read),
                });
                self.dead = true;
                return;
            }
            self.actions
                .push_back(HeartbeatAction::Missed { count: missed });
        }

        if let Some(due) = self.ping_deadline().filter(|&d| d <= now) {
            self.send_ping(now);
            // Stay on the grid unless a whole interval was skipped.
            let on_grid = due
                .checked_add(self.config.interval)
                .is_some_and(|next| next > now);
            self.ping_grid = Some(if on_grid { due } else { now });
        }
    }

    /// Takes the next queued action, oldest first, or `None` when there is
    /// nothing to do. Drain it after every `handle_timeout`.
    pub fn poll_action(&mut self) -> Option<HeartbeatAction> {
        self.actions.pop_front()
    }

    /// When to call [`handle_timeout`](Self::handle_timeout) next: the
    /// earlier of the next ping and the next miss deadline. `None` once dead.
    ///
    /// Inputs only ever move it later (with a non-decreasing `now`), so a
    /// shell may keep a timer armed for an earlier value: it will fire early,
    /// the call does nothing, and the shell re-arms with the new deadline.
    /// The exception, [`excuse_silence`](Self::excuse_silence) with
    /// `send_pings` off, makes a ping due at its own `now`: the
    /// `handle_timeout` that follows it sends that ping.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.dead {
            return None;
        }
        match (self.ping_deadline(), self.miss_deadline()) {
            (Some(p), Some(m)) => Some(p.min(m)),
            (p, m) => p.or(m),
        }
    }

    /// Consecutive missed intervals reported so far (0 after a read or a
    /// stall; the final count once dead).
    pub fn missed(&self) -> u32 {
        self.reported
    }

    /// Whether [`HeartbeatAction::Dead`] was emitted.
    pub fn is_dead(&self) -> bool {
        self.dead
    }

    /// When bytes were last read from the peer (creation time if never).
    pub fn last_read(&self) -> Instant {
        self.last_read
    }

    /// When bytes were last written to the peer, as far as
    /// [`on_write`](Self::on_write) was told (creation time if never).
    pub fn last_write(&self) -> Instant {
        self.last_write
    }

    /// The smoothed round-trip time, once a pong was matched.
    pub fn srtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// The settings in use (after clamping, see [`new`](Self::new)).
    pub fn config(&self) -> &HeartbeatConfig {
        &self.config
    }

    /// The latest time that counts as evidence of the peer's life.
    fn evidence(&self) -> Instant {
        self.last_read.max(self.stall_reset)
    }

    /// `floor((now - evidence - grace) / interval)`, saturating; 0 before
    /// the held first miss (see [`held_first_miss`](Self::held_first_miss)).
    /// A count below `max_missed` is not reported (the last reported count
    /// is returned instead) while this side's last ping, or the one
    /// `pinging_now`, is unanswered and still awaits its answer (see
    /// [`answer_awaited_until`](Self::answer_awaited_until)).
    fn missed_at(&self, now: Instant, pinging_now: bool) -> u32 {
        if self
            .held_first_miss()
            .is_some_and(|first_miss| now < first_miss)
        {
            // Only the first interval can be held: the hold is at most
            // 1.5 intervals after the evidence, the second miss 2 after it.
            return 0;
        }
        let silent = now
            .saturating_duration_since(self.evidence())
            .saturating_sub(self.config.miss_grace)
            .as_nanos();
        let intervals = silent / self.config.interval.as_nanos();
        let missed = u32::try_from(intervals).unwrap_or(u32::MAX);
        let last_ping = if pinging_now {
            Some(now)
        } else {
            self.last_ping
        };
        if missed < self.config.max_missed
            && self
                .answer_awaited_until(last_ping)
                .is_some_and(|answer_by| now < answer_by)
        {
            return missed.min(self.reported);
        }
        missed
    }

    /// Until when the answer to this side's ping sent at `last_ping` is
    /// awaited before a (non-fatal) miss counts: half an interval plus the
    /// grace after it, while it is unanswered (sent after the evidence);
    /// `None` otherwise.
    ///
    /// Why: a missed interval should mean the peer had time to answer a ping
    /// and did not. The miss deadline counts from the evidence, and the ping
    /// for that interval from the same evidence, `grace` apart, so:
    ///
    /// * a side that runs late by more than the grace (its loop or timer
    ///   thread not scheduled for a few milliseconds on a loaded machine,
    ///   well short of a stall) found both due in one call and counted the
    ///   interval before its ping even left;
    /// * a side whose only reads are the answers to its pings (a Fixed-mode
    ///   pulse consumer of an idle provider, whose Ping rides with its Pong)
    ///   counted an interval as missed whenever an answer took more than the
    ///   grace longer than the one before: jitter, not silence.
    ///
    /// Half an interval is the same allowance the peer-ping hold gives
    /// ([`peer_ping_hold`](Self::peer_ping_hold)). `Dead` does not wait (its
    /// bound is the brief's).
    fn answer_awaited_until(&self, last_ping: Option<Instant>) -> Option<Instant> {
        let sent = last_ping.filter(|&sent| sent > self.evidence())?;
        sent.checked_add(self.config.interval / 2)?
            .checked_add(self.config.miss_grace)
    }

    /// `evidence + (reported + 1) × interval + grace`, or for the first miss
    /// while the peer's pings are awaited, `hold + grace` if later; a
    /// non-fatal miss no earlier than the end of the wait for an unanswered
    /// ping's answer, but never after the fatal one's deadline. `None` only
    /// on overflow.
    fn miss_deadline(&self) -> Option<Instant> {
        let n = self.reported.saturating_add(1);
        let after_evidence = |n: u32| {
            self.evidence()
                .checked_add(self.config.interval.checked_mul(n)?)?
                .checked_add(self.config.miss_grace)
        };
        let mut deadline = after_evidence(n)?;
        if let Some(first_miss) = self.held_first_miss()
            && self.reported == 0
        {
            deadline = deadline.max(first_miss);
        }
        if n < self.config.max_missed
            && let Some(answer_by) = self.answer_awaited_until(self.last_ping)
        {
            let fatal = after_evidence(self.config.max_missed)?;
            deadline = deadline.max(answer_by).min(fatal);
        }
        Some(deadline)
    }

    /// While the peer's pings are awaited ([`peer_ping_hold`](Self::peer_ping_hold)),
    /// the first miss counts no earlier than the held ping plus the grace,
    /// so the answer to that ping has as long to arrive as any other.
    fn held_first_miss(&self) -> Option<Instant> {
        self.peer_ping_hold()?.checked_add(self.config.miss_grace)
    }

    /// On the side that reads the peer's pings
    /// ([`on_peer_ping`](Self::on_peer_ping)): the instant before which its
    /// timer sends no ping and counts no first miss, half an interval after
    /// the peer's next Ping is due. `None` when nothing is held: no pings
    /// sent, a single miss fatal (holding would delay death), or no Ping read
    /// yet.
    ///
    /// Why, in Fixed mode: that side's ping rides with its Pongs (see
    /// [`ping_rides_with_pong`](Self::ping_rides_with_pong)), so its grid
    /// deadline falls when the peer's next Ping is due, the race below.
    ///
    /// Why, in Idle mode: such a side writes a Pong whenever it reads a Ping, so its idle
    /// deadline falls exactly when the peer's next Ping is due, and a Ping a
    /// few milliseconds late (timer ticks, scheduling) lost the race: the
    /// side pinged a peer that was about to ping it (in the bench, 6,000 to
    /// 10,000 provider pings in 12 s to 5,000 consumers that all pinged
    /// every second; 17 to 2,079 with the hold, each a connection's first,
    /// before its consumer had pinged at all).
    /// Half an interval leaves room for any lateness short of trouble; a
    /// peer that stops pinging is pinged then, and its answer arrives before
    /// the second miss, so death still comes `max_missed × interval + grace`
    /// after the last byte.
    fn peer_ping_hold(&self) -> Option<Instant> {
        let config = &self.config;
        if !config.send_pings || config.max_missed < 2 {
            return None;
        }
        let next_due = self.peer_ping?.checked_add(config.interval)?;
        next_due.checked_add(config.interval / 2)
    }

    /// The last read as Idle mode counts it: when the last bytes read were
    /// the Pong to one of this side's pings, the instant that ping left.
    ///
    /// Why: Idle pings an interval after the last read, and its first miss
    /// comes an interval (plus the grace) after that read. When this side
    /// answers what it reads at once (a Pong for the peer's Ping that came
    /// with the peer's Pong: what a Fixed-mode pulse provider sends), its last
    /// write is that read too, so each ping would leave a round trip later
    /// than the last, and its answer would land a round trip after the first
    /// miss. Counted from the ping, the next one leaves an interval after the
    /// last and its answer lands where the read it replaces did.
    fn idle_read_mark(&self) -> Instant {
        match self.pong_read {
            Some((read_at, sent_at)) if read_at == self.last_read => sent_at,
            _ => self.last_read,
        }
    }

    /// Fixed mode, on reading the peer's Ping: whether this side's own ping
    /// goes now, in the same write as the Pong, instead of on its own later.
    /// Yes when it is due within half an interval and before the peer's next
    /// Ping is expected, and the last ping left at least half an interval
    /// ago. (`previous` is the peer's Ping before this one: a peer pinging
    /// faster than this side's interval is answered with a ping only in the
    /// last gap before this side's ping is due, so this side still pings
    /// about once an interval.)
    ///
    /// Why: both sides of a Fixed connection ping every interval, each on its
    /// own grid, so a provider wrote twice an interval (its Pong, later its
    /// Ping) and was woken by its timer for the second. Riding along, the
    /// Ping costs no write and no timer, and the grid follows the peer's.
    fn ping_rides_with_pong(&self, now: Instant, previous: Option<Instant>) -> bool {
        let config = &self.config;
        if config.mode != HeartbeatMode::Fixed || !config.send_pings {
            return false;
        }
        let Some(due) = self.grid_due() else {
            return false;
        };
        let gap = previous.map_or(config.interval, |at| now.saturating_duration_since(at));
        let half = config.interval / 2;
        // Measured from the last ping sent too: a timer's ping leaves up to a
        // tick after its grid point, and the grid stays on that point.
        let spaced = self
            .last_ping
            .is_none_or(|at| now.saturating_duration_since(at) >= half);
        spaced
            && now
                .checked_add(gap.min(half))
                .is_some_and(|window_end| due <= window_end)
    }

    /// Fixed mode: the next grid point, an interval after the last one (or
    /// after creation); `None` only on overflow.
    fn grid_due(&self) -> Option<Instant> {
        self.ping_grid
            .unwrap_or(self.created)
            .checked_add(self.config.interval)
    }

    /// When the next ping is due, if this side sends pings.
    fn ping_deadline(&self) -> Option<Instant> {
        if !self.config.send_pings {
            // Only while the silence is excused: at once, then an interval
            // after the last ping.
            let since = self.excused_since?;
            return match self.last_ping {
                Some(at) if at >= since => at.checked_add(self.config.interval),
                _ => Some(since),
            };
        }
        let interval = self.config.interval;
        match self.config.mode {
            HeartbeatMode::Fixed => {
                let due = self.grid_due()?;
                Some(self.peer_ping_hold().map_or(due, |hold| due.max(hold)))
            }
            HeartbeatMode::Idle => {
                let mut due = self
                    .idle_read_mark()
                    .min(self.last_write)
                    .checked_add(interval)?;
                if let Some(at) = self.last_ping {
                    due = due.max(at.checked_add(interval)?);
                }
                if let Some(hold) = self.peer_ping_hold() {
                    due = due.max(hold);
                }
                Some(due)
            }
        }
    }

    fn send_ping(&mut self, now: Instant) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.sent[(seq % PING_HISTORY as u64) as usize] = Some((seq, now));
        self.last_ping = Some(now);
        self.actions.push_back(HeartbeatAction::SendPing { seq });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use HeartbeatAction::{Dead, Missed, SendPing, Stalled};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn config(mode: HeartbeatMode) -> HeartbeatConfig {
        HeartbeatConfig {
            mode,
            ..HeartbeatConfig::default()
        }
    }

    fn drain(hb: &mut Heartbeat) -> Vec<HeartbeatAction> {
        std::iter::from_fn(|| hb.poll_action()).collect()
    }

    /// Calls `handle_timeout(at)` and drains.
    fn step(hb: &mut Heartbeat, at: Instant) -> Vec<HeartbeatAction> {
        hb.handle_timeout(at);
        drain(hb)
    }

    fn pings(actions: &[HeartbeatAction]) -> usize {
        actions
            .iter()
            .filter(|a| matches!(a, SendPing { .. }))
            .count()
    }

    /// A fake shell: drives `hb` from `from` to `until` (inclusive), calling
    /// `handle_timeout` at every deadline and `on_write` for every ping sent;
    /// `traffic(t)` is called for each millisecond step to inject reads and
    /// writes. Returns `(time, action)` pairs.
    fn run(
        hb: &mut Heartbeat,
        t0: Instant,
        from_ms: u64,
        until_ms: u64,
        mut traffic: impl FnMut(&mut Heartbeat, u64),
    ) -> Vec<(u64, HeartbeatAction)> {
        let mut out = Vec::new();
        for t in from_ms..=until_ms {
            let now = t0 + ms(t);
            traffic(hb, t);
            if hb.next_deadline().is_some_and(|d| d <= now) {
                hb.handle_timeout(now);
            }
            // Also what an input queued (a Fixed ping riding with a Pong).
            for a in drain(hb) {
                if matches!(a, SendPing { .. }) {
                    hb.on_write(now);
                }
                out.push((t, a));
            }
        }
        out
    }

    #[test]
    fn config_defaults_and_validate() {
        let c = HeartbeatConfig::default();
        assert_eq!(c.interval, ms(1000));
        assert_eq!(c.max_missed, 3);
        assert_eq!(c.mode, HeartbeatMode::Fixed);
        assert!(c.send_pings);
        assert_eq!(c.stall_threshold, None);
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.bound(), ms(3000));

        let bad = [
            HeartbeatConfig {
                interval: Duration::from_micros(999),
                ..c.clone()
            },
            HeartbeatConfig {
                max_missed: 0,
                ..c.clone()
            },
            HeartbeatConfig {
                stall_threshold: Some(Duration::ZERO),
                ..c.clone()
            },
        ];
        for b in bad {
            assert!(b.validate().is_err(), "{b:?} should be rejected");
        }
        let edge = HeartbeatConfig {
            interval: ms(1),
            max_missed: 1,
            stall_threshold: Some(ms(1)),
            ..c
        };
        assert_eq!(edge.validate(), Ok(()));
        assert_eq!(edge.bound(), ms(1));
    }

    #[test]
    fn invalid_config_is_clamped_not_panicking() {
        let t0 = Instant::now();
        let c = HeartbeatConfig {
            interval: Duration::ZERO,
            max_missed: 0,
            stall_threshold: Some(Duration::ZERO),
            ..HeartbeatConfig::default()
        };
        let mut hb = Heartbeat::new(c, t0);
        assert_eq!(hb.config().interval, ms(1));
        assert_eq!(hb.config().max_missed, 1);
        assert_eq!(hb.config().stall_threshold, Some(ms(1)));
        assert_eq!(hb.next_deadline(), Some(t0 + ms(1)));
        assert_eq!(
            step(&mut hb, t0 + ms(1)),
            [Dead {
                missed: 1,
                silent_for: ms(1)
            }]
        );
    }

    #[test]
    fn new_heartbeat_state() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(HeartbeatConfig::default(), t0);
        assert_eq!(hb.next_deadline(), Some(t0 + ms(1000)));
        assert_eq!(hb.missed(), 0);
        assert!(!hb.is_dead());
        assert_eq!(hb.last_read(), t0);
        assert_eq!(hb.srtt(), None);
        assert_eq!(hb.poll_action(), None);
    }

    #[test]
    fn fixed_pings_every_interval_with_increasing_seq() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(config(HeartbeatMode::Fixed), t0);
        // The peer is chatty (a read every 100 ms): only pings come out.
        let out = run(&mut hb, t0, 0, 10_000, |hb, t| {
            if t % 100 == 50 {
                hb.on_read(t0 + ms(t));
            }
        });
        let expected: Vec<_> = (1..=10).map(|k| (k * 1000, SendPing { seq: k })).collect();
        assert_eq!(out, expected);
    }

    #[test]
    fn fixed_pings_regardless_of_two_way_traffic() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(config(HeartbeatMode::Fixed), t0);
        let out = run(&mut hb, t0, 0, 5000, |hb, t| {
            hb.on_read(t0 + ms(t));
            hb.on_write(t0 + ms(t));
        });
        assert_eq!(
            pings(&out.into_iter().map(|(_, a)| a).collect::<Vec<_>>()),
            5
        );
    }

    #[test]
    fn fixed_late_call_sends_one_ping_and_keeps_the_grid() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(config(HeartbeatMode::Fixed), t0);
        hb.on_read(t0 + ms(900));
        // 600 ms late: below the stall threshold (1 s), one ping, no burst.
        assert_eq!(step(&mut hb, t0 + ms(1600)), [SendPing { seq: 1 }]);
        assert_eq!(step(&mut hb, t0 + ms(1600)), []);
        // The next ping stays on the grid (2000), it does not drift to 2600.
        hb.on_read(t0 + ms(1850));
        assert_eq!(step(&mut hb, t0 + ms(1999)), []);
        assert_eq!(step(&mut hb, t0 + ms(2000)), [SendPing { seq: 2 }]);
        hb.on_read(t0 + ms(2500));
        assert_eq!(step(&mut hb, t0 + ms(2999)), []);
        assert_eq!(step(&mut hb, t0 + ms(3000)), [SendPing { seq: 3 }]);
    }

    #[test]
    fn fixed_pings_a_tick_late_do_not_drift() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(config(HeartbeatMode::Fixed), t0);
        // Each ping handled 5 ms late (a timer tick): still one per second on
        // the grid, so the 10th is due at 10 s, not 10.05 s.
        for k in 1..=10u64 {
            hb.on_read(t0 + ms(k * 1000 - 500));
            assert_eq!(step(&mut hb, t0 + ms(k * 1000 + 5)), [SendPing { seq: k }]);
        }
        // Next: the miss, half an interval after the unanswered 10th ping
        // (sent at 10.005 s), before the 11th ping at 11 s.
        assert_eq!(hb.next_deadline(), Some(t0 + ms(10_505)));
    }

    #[test]
    fn a_pong_sent_at_the_miss_deadline_is_not_a_miss_with_grace() {
        // Idle mode: the ping and the miss deadline fall on the same instant;
        // with a grace the answer (1 ms later) arrives before the miss counts.
        let t0 = Instant::now();
        let mut cfg = config(HeartbeatMode::Idle);
        cfg.miss_grace = ms(6);
        let mut hb = Heartbeat::new(cfg, t0);
        for k in 1..=20u64 {
            let ping_at = hb.next_deadline().unwrap();
            let actions = step(&mut hb, ping_at);
            assert!(
                matches!(actions.as_slice(), [SendPing { .. }]),
                "round {k}: {actions:?}"
            );
            hb.on_read(ping_at + ms(1));
            hb.on_write(ping_at);
        }
        assert_eq!(hb.missed(), 0);
    }

    #[test]
    fn a_ping_sent_late_has_half_an_interval_to_be_answered_before_a_miss_counts() {
        // Idle mode, grace 6 ms, the shell 20 ms late (far from a stall):
        // the ping (due at 1000) and the first miss (1006) come due in one
        // call. The ping goes; the interval counts only if nothing answers
        // within half an interval and the grace after it.
        let t0 = Instant::now();
        let mut cfg = config(HeartbeatMode::Idle);
        cfg.miss_grace = ms(6);
        let mut hb = Heartbeat::new(cfg, t0);
        assert_eq!(step(&mut hb, t0 + ms(1020)), [SendPing { seq: 1 }]);
        hb.on_write(t0 + ms(1020));
        assert_eq!(hb.next_deadline(), Some(t0 + ms(1526)));
        hb.on_read(t0 + ms(1021));
        assert_eq!(step(&mut hb, t0 + ms(1526)), []);
        assert_eq!(hb.missed(), 0);

        // Late again (ping due at 2020, miss at 2027), and no answer.
        assert_eq!(step(&mut hb, t0 + ms(2040)), [SendPing { seq: 2 }]);
        hb.on_write(t0 + ms(2040));
        assert_eq!(hb.next_deadline(), Some(t0 + ms(2546)));
        assert_eq!(step(&mut hb, t0 + ms(2545)), []);
        assert_eq!(step(&mut hb, t0 + ms(2546)), [Missed { count: 1 }]);
    }

    #[test]
    fn a_late_shell_does_not_delay_death() {
        // Every call 20 ms after the deadline it was given: the misses wait
        // half an interval and the grace after each late ping, `Dead` does
        // not.
        let t0 = Instant::now();
        let mut cfg = config(HeartbeatMode::Idle);
        cfg.miss_grace = ms(6);
        let mut hb = Heartbeat::new(cfg, t0);
        let mut seen = Vec::new();
        while let Some(deadline) = hb.next_deadline() {
            let now = deadline + ms(20);
            for action in step(&mut hb, now) {
                if matches!(action, SendPing { .. }) {
                    hb.on_write(now);
                }
                seen.push(((now - t0).as_millis(), action));
            }
        }
        assert_eq!(
            seen,
            [
                (1020, SendPing { seq: 1 }),
                (1546, Missed { count: 1 }),
                (2026, SendPing { seq: 2 }),
                (2552, Missed { count: 2 }),
                (
                    3026,
                    Dead {
                        missed: 3,
                        silent_for: ms(3026)
                    }
                ),
            ]
        );

        // A single miss is fatal: no wait for the ping's answer either.
        let mut cfg = config(HeartbeatMode::Idle);
        cfg.miss_grace = ms(6);
        cfg.max_missed = 1;
        let mut hb = Heartbeat::new(cfg, t0);
        assert_eq!(
            step(&mut hb, t0 + ms(1020)),
            [Dead {
                missed: 1,
                silent_for: ms(1020)
            }]
        );
    }

    #[test]
    fn grace_delays_death_by_exactly_the_grace() {
        let t0 = Instant::now();
        let mut cfg = config(HeartbeatMode::Fixed);
        cfg.send_pings = false;
        cfg.miss_grace = ms(6);
        let mut hb = Heartbeat::new(cfg, t0);
        assert_eq!(step(&mut hb, t0 + ms(1005)), []);
        assert_eq!(step(&mut hb, t0 + ms(1006)), [Missed { count: 1 }]);
        assert_eq!(step(&mut hb, t0 + ms(2006)), [Missed { count: 2 }]);
        assert_eq!(step(&mut hb, t0 + ms(3005)), []);
        assert!(!hb.is_dead());
        let dead = step(&mut hb, t0 + ms(3006));
        assert!(
            matches!(dead.as_slice(), [Dead { missed: 3, .. }]),
            "{dead:?}"
        );
    }

    #[test]
    fn early_calls_do_nothing() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(config(HeartbeatMode::Fixed), t0);
        for n in 0..1000 {
            hb.handle_timeout(t0 + Duration::from_micros(n * 999));
        }
        assert_eq!(hb.poll_action(), None);
        assert_eq!(hb.next_deadline(), Some(t0 + ms(1000)));
        assert_eq!(hb.missed(), 0);
    }

    #[test]
    fn silent_peer_missed_then_dead_exactly_at_bound_never_earlier() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(config(HeartbeatMode::Fixed), t0);
        let last = t0 + ms(250);
        hb.on_read(last);
        let one_ns = Duration::from_nanos(1);
        let mut seen = Vec::new();
        // Hammer handle_timeout just before each deadline; only the deadline
        // itself may produce anything.
        while let Some(deadline) = hb.next_deadline() {
            for back in (1..=50).rev() {
                hb.handle_timeout(deadline - one_ns * back);
                assert_eq!(hb.poll_action(), None, "early call produced an action");
            }
            hb.handle_timeout(deadline - one_ns);
            assert!(!hb.is_dead());
            for a in step(&mut hb, deadline) {
                seen.push((deadline, a));
            }
        }
        assert_eq!(
            seen,
            [
                (t0 + ms(1000), SendPing { seq: 1 }),
                (t0 + ms(1500), Missed { count: 1 }),
                (t0 + ms(2000), SendPing { seq: 2 }),
                (t0 + ms(2500), Missed { count: 2 }),
                (t0 + ms(3000), SendPing { seq: 3 }),
                (
                    last + ms(3000),
                    Dead {
                        missed: 3,
                        silent_for: ms(3000)
                    }
                ),
            ]
        );
        assert!(hb.is_dead());
        assert_eq!(hb.missed(), 3);
    }

    #[test]
    fn dead_is_terminal() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(config(HeartbeatMode::Fixed), t0);
        while let Some(d) = hb.next_deadline() {
            hb.handle_timeout(d);
        }
        assert!(matches!(drain(&mut hb).last(), Some(Dead { .. })));
        assert_eq!(hb.next_deadline(), None);
        hb.on_read(t0 + ms(5000));
        hb.on_write(t0 + ms(5000));
        assert!(hb.is_dead());
        assert_eq!(hb.last_read(), t0);
        for s in 3..100 {
            hb.handle_timeout(t0 + Duration::from_secs(s));
        }
        assert_eq!(hb.poll_action(), None);
        assert_eq!(hb.next_deadline(), None);
    }

    #[test]
    fn read_resets_missed_count() {
        let t0 = Instant::now();
        let c = HeartbeatConfig {
            send_pings: false,
            ..HeartbeatConfig::default()
        };
        let mut hb = Heartbeat::new(c, t0);
        assert_eq!(step(&mut hb, t0 + ms(1000)), [Missed { count: 1 }]);
        assert_eq!(step(&mut hb, t0 + ms(2000)), [Missed { count: 2 }]);
        assert_eq!(hb.missed(), 2);
        hb.on_read(t0 + ms(2500));
        assert_eq!(hb.missed(), 0);
        assert_eq!(hb.last_read(), t0 + ms(2500));
        assert_eq!(hb.next_deadline(), Some(t0 + ms(3500)));
        // The old deadline at 3000 no longer counts.
        assert_eq!(step(&mut hb, t0 + ms(3000)), []);
        assert_eq!(step(&mut hb, t0 + ms(3500)), [Missed { count: 1 }]);
        assert_eq!(step(&mut hb, t0 + ms(4500)), [Missed { count: 2 }]);
        assert_eq!(
            step(&mut hb, t0 + ms(5500)),
            [Dead {
                missed: 3,
                silent_for: ms(3000)
            }]
        );
    }

    #[test]
    fn partial_progress_keeps_alive() {
        // A slow trickle of bytes (e.g. a huge frame arriving in pieces), read
        // every I/2 for a long time, never completes a frame yet never misses.
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(config(HeartbeatMode::Fixed), t0);
        let out = run(&mut hb, t0, 0, 600_000, |hb, t| {
            if t % 500 == 0 {
                hb.on_read(t0 + ms(t));
            }
        });
        assert!(
            out.iter().all(|(_, a)| matches!(a, SendPing { .. })),
            "{out:?}"
        );
        assert_eq!(out.len(), 600);
        assert!(!hb.is_dead());
    }

    #[test]
    fn max_missed_one_dies_at_first_silent_interval() {
        let t0 = Instant::now();
        let c = HeartbeatConfig {
            max_missed: 1,
            ..HeartbeatConfig::default()
        };
        let mut hb = Heartbeat::new(c, t0);
        hb.on_read(t0 + ms(10));
        assert_eq!(step(&mut hb, t0 + ms(1000)), [SendPing { seq: 1 }]);
        assert_eq!(step(&mut hb, t0 + ms(1009)), []);
        assert_eq!(
            step(&mut hb, t0 + ms(1010)),
            [Dead {
                missed: 1,
                silent_for: ms(1000)
            }]
        );
    }

    #[test]
    fn a_miss_due_with_a_ping_waits_for_its_answer() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(config(HeartbeatMode::Fixed), t0);
        assert_eq!(step(&mut hb, t0 + ms(1000)), [SendPing { seq: 1 }]);
        assert_eq!(step(&mut hb, t0 + ms(1499)), []);
        assert_eq!(step(&mut hb, t0 + ms(1500)), [Missed { count: 1 }]);
        assert_eq!(step(&mut hb, t0 + ms(2000)), [SendPing { seq: 2 }]);
        assert_eq!(step(&mut hb, t0 + ms(2500)), [Missed { count: 2 }]);
        assert_eq!(
            step(&mut hb, t0 + ms(3000)),
            [Dead {
                missed: 3,
                silent_for: ms(3000)
            }]
        );
    }

    #[test]
    fn idle_steady_two_way_traffic_sends_no_pings() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(config(HeartbeatMode::Idle), t0);
        let out = run(&mut hb, t0, 0, 60_000, |hb, t| {
            if t % 300 == 0 {
                hb.on_write(t0 + ms(t));
            }
            if t % 300 == 150 {
                hb.on_read(t0 + ms(t));
            }
        });
        assert_eq!(out, []);
        assert!(!hb.is_dead());
    }

    #[test]
    fn idle_writer_only_traffic_still_pings() {
        // One-way calls: we write all the time and read nothing but the
        // peer's pongs, 20 ms after each ping.
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(config(HeartbeatMode::Idle), t0);
        let mut pong_due: Option<(u64, u64)> = None;
        let mut ping_times = Vec::new();
        for t in 0..=20_000u64 {
            let now = t0 + ms(t);
            if t % 50 == 0 {
                hb.on_write(now);
            }
            if let Some((at, seq)) = pong_due
                && at == t
            {
                hb.on_read(now);
                assert_eq!(hb.on_pong(now, seq), Some(ms(20)));
                pong_due = None;
            }
            if hb.next_deadline().is_some_and(|d| d <= now) {
                for a in step(&mut hb, now) {
                    match a {
                        SendPing { seq } => {
                            hb.on_write(now);
                            ping_times.push(t);
                            pong_due = Some((t + 20, seq));
                        }
                        // The first interval, with nothing read since the
                        // start (no grace here), counts as missed as the
                        // first ping leaves. None after: each ping leaves an
                        // interval after the last, so its pong lands just as
                        // the interval after the previous pong ends.
                        Missed { count: 1 } if t == 1000 => {}
                        other => panic!("unexpected {other:?} at {t}"),
                    }
                }
            }
        }
        // First ping one interval after creation (nothing read since), then
        // one interval after each ping: the last read is its pong, counted
        // from when the ping left (`idle_read_mark`). Counted from the pong
        // itself, pings drifted a round trip a time (every 1020 ms here) and
        // each interval was reported missed just before its pong came.
        assert_eq!(ping_times[0], 1000);
        for w in ping_times.windows(2) {
            assert_eq!(w[1] - w[0], 1000, "{ping_times:?}");
        }
        assert_eq!(ping_times.len(), 20);
        assert_eq!(hb.srtt(), Some(ms(20)));
        assert!(!hb.is_dead());
    }

    #[test]
    fn idle_reader_only_traffic_pings_once_per_interval() {
        // The peer streams to us; we write nothing but our pings.
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(config(HeartbeatMode::Idle), t0);
        let out = run(&mut hb, t0, 0, 10_000, |hb, t| {
            if t % 100 == 0 {
                hb.on_read(t0 + ms(t));
            }
        });
        let expected: Vec<_> = (1..=10).map(|k| (k * 1000, SendPing { seq: k })).collect();
        assert_eq!(out, expected);
    }

    #[test]
    fn idle_ping_waits_a_full_interval_after_traffic_stops() {
        let t0 = Instant::now();
        let c = HeartbeatConfig {
            max_missed: 10,
            ..config(HeartbeatMode::Idle)
        };
        let mut hb = Heartbeat::new(c, t0);
        let out = run(&mut hb, t0, 0, 5000, |hb, t| {
            if t <= 2300 && t % 100 == 0 {
                hb.on_read(t0 + ms(t));
                hb.on_write(t0 + ms(t));
            }
        });
        assert_eq!(
            out,
            [
                (3300, SendPing { seq: 1 }),
                (3800, Missed { count: 1 }),
                (4300, SendPing { seq: 2 }),
                (4800, Missed { count: 2 }),
            ]
        );
    }

    /// `mode`, `max_missed`, and the grace pulse's loops use with their
    /// 5 ms tick (a tick + 1 ms).
    fn with_shell_grace(mode: HeartbeatMode, max_missed: u32) -> HeartbeatConfig {
        HeartbeatConfig {
            max_missed,
            miss_grace: ms(6),
            ..config(mode)
        }
    }

    fn idle_with_shell_grace(max_missed: u32) -> HeartbeatConfig {
        with_shell_grace(HeartbeatMode::Idle, max_missed)
    }

    /// When [`answering_late_pings`]' peer pings, in ms.
    const LATE_PINGS: [u64; 13] = [
        0, 1_005, 2_000, 3_004, 4_001, 5_005, 6_000, 7_300, 8_000, 9_005, 10_002, 11_005, 12_000,
    ];

    /// Idle mode with the shell's grace of a 5 ms tick + 1 ms, the side
    /// that answers a peer pinging every second, each Ping up to a tick late
    /// and one 300 ms late ([`LATE_PINGS`]). Returns what this side did.
    fn answering_late_pings(hold: bool, max_missed: u32) -> Vec<(u64, HeartbeatAction)> {
        answering_late_pings_in(idle_with_shell_grace(max_missed), hold)
    }

    /// [`answering_late_pings`] with any config.
    fn answering_late_pings_in(config: HeartbeatConfig, hold: bool) -> Vec<(u64, HeartbeatAction)> {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(config, t0);
        let late: Vec<u64> = LATE_PINGS.iter().map(|t| t % 1000).collect();
        run(&mut hb, t0, 0, 12_500, |hb, t| {
            let (second, past) = (t / 1000, t % 1000);
            if late.get(second as usize) == Some(&past) {
                let now = t0 + ms(t);
                if hold {
                    hb.on_peer_ping(now);
                } else {
                    hb.on_read(now);
                }
                hb.on_write(now); // the Pong
            }
        })
    }

    #[test]
    fn idle_side_hearing_pings_does_not_race_the_next_one() {
        // Without the hold this side pings whenever a Ping comes later than
        // the last one did: the race that made a provider ping consumers
        // that were about to ping it.
        let raced = answering_late_pings(false, 3);
        let raced_pings = raced
            .iter()
            .filter(|(_, a)| matches!(a, SendPing { .. }))
            .count();
        assert!(raced_pings >= 3, "{raced:?}");
        // With it: no ping of its own and no miss, even for the Ping that
        // came 300 ms late.
        assert_eq!(answering_late_pings(true, 3), []);
    }

    #[test]
    fn a_fixed_side_sends_its_ping_with_its_pong_to_a_peer_pinging_every_interval() {
        // From the peer's second Ping on, this side's ping is due within half
        // an interval, so it leaves with the Pong, even when the Ping came
        // 300 ms late (at 7.3 s, 700 ms before the next). The timer never
        // sends one (held, as in Idle mode) and nothing is missed.
        let out = answering_late_pings_in(with_shell_grace(HeartbeatMode::Fixed, 3), true);
        let expected: Vec<(u64, HeartbeatAction)> = LATE_PINGS[1..]
            .iter()
            .zip(1..)
            .map(|(&t, seq)| (t, SendPing { seq }))
            .collect();
        assert_eq!(out, expected);
        // A side not told of the peer's Pings keeps its own grid (and, its
        // pings unanswered here, misses the interval before the late Ping).
        let grid = answering_late_pings_in(with_shell_grace(HeartbeatMode::Fixed, 3), false);
        let times: Vec<u64> = grid
            .iter()
            .filter(|(_, a)| matches!(a, SendPing { .. }))
            .map(|(t, _)| *t)
            .collect();
        assert_eq!(times, (1..=12).map(|s| s * 1000).collect::<Vec<_>>());
    }

    #[test]
    fn a_fixed_side_pings_from_its_timer_once_for_a_ping_over_half_an_interval_late() {
        // The peer's Ping due at 4 s comes at 4.6 s, past the hold (3 s +
        // 1.5 s): this side's timer pings then, once. The late Ping and the
        // next come too soon after that ping to take one along; from 6 s on
        // the pings ride again. Nothing is missed. (Each such late Ping
        // costs one ping: 8 Pings, 7 pings.)
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(with_shell_grace(HeartbeatMode::Fixed, 3), t0);
        let peer = [0, 1_000, 2_000, 3_000, 4_600, 5_000, 6_000, 7_000, 8_000];
        let mut rode = Vec::new();
        let out = run(&mut hb, t0, 0, 8_200, |hb, t| {
            if peer.contains(&t) {
                hb.on_peer_ping(t0 + ms(t));
                hb.on_write(t0 + ms(t));
                if hb.actions.iter().any(|a| matches!(a, SendPing { .. })) {
                    rode.push(t);
                }
            }
        });
        let times: Vec<u64> = out.iter().map(|(t, _)| *t).collect();
        assert_eq!(
            pings(&out.iter().map(|(_, a)| a.clone()).collect::<Vec<_>>()),
            out.len()
        );
        assert_eq!(times, [1_000, 2_000, 3_000, 4_500, 6_000, 7_000, 8_000]);
        assert_eq!(rode, [1_000, 2_000, 3_000, 6_000, 7_000, 8_000]);
    }

    proptest! {
        /// A Fixed side that reads the peer's Pings (`on_peer_ping`, pulse's
        /// provider) from a peer pinging every interval, each Ping arriving
        /// up to just under half an interval late (the peer's timer, its
        /// scheduling, the network), sends one ping with each Pong from the
        /// second Ping on and never one from its timer, whenever (short of
        /// a stall) the shell calls `handle_timeout`; nothing is missed.
        /// What `tests/liveness.rs`' `a_fixed_provider_sends_its_pings_with_its_pongs`
        /// can only check loosely on a busy machine.
        #[test]
        fn a_fixed_side_rides_with_every_ping_of_a_peer_pinging_every_interval(
            interval_ms in 20u64..2_000,
            // Each Ping's lateness, and when between two Pings the shell
            // calls in, in thousandths of an interval.
            steps in proptest::collection::vec((0u64..500, 0u64..1_000), 5..60),
        ) {
            let t0 = Instant::now();
            let interval = ms(interval_ms);
            let per = |permille: u64| interval * permille as u32 / 1000;
            let config = HeartbeatConfig {
                interval,
                ..with_shell_grace(HeartbeatMode::Fixed, 3)
            };
            let mut hb = Heartbeat::new(config, t0);
            let arrivals: Vec<Instant> = steps
                .iter()
                .enumerate()
                .map(|(k, &(late, _))| t0 + interval * k as u32 + per(late))
                .collect();
            for (k, &at) in arrivals.iter().enumerate() {
                hb.on_peer_ping(at);
                hb.on_write(at);
                let rode = drain(&mut hb);
                let expected = if k == 0 { vec![] } else { vec![SendPing { seq: k as u64 }] };
                prop_assert_eq!(rode, expected, "Ping {} at {:?}", k, at - t0);
                // The shell's timer, armed for an earlier deadline, fires
                // before the next Ping: nothing is due.
                let next = arrivals.get(k + 1).copied().unwrap_or(at + interval);
                let call = at + (next - at) * steps[k].1 as u32 / 1000;
                prop_assert!(hb.next_deadline().is_some_and(|d| d > next));
                prop_assert_eq!(step(&mut hb, call), vec![], "call at {:?}", call - t0);
            }
        }
    }

    #[test]
    fn a_fixed_side_pings_about_once_an_interval_for_a_peer_pinging_faster() {
        // The peer pings every 100 ms (its interval, not ours): this side's
        // ping rides only with the last Pong before it is due.
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(with_shell_grace(HeartbeatMode::Fixed, 3), t0);
        let out = run(&mut hb, t0, 0, 10_000, |hb, t| {
            if t % 100 == 0 {
                hb.on_peer_ping(t0 + ms(t));
            }
        });
        let times: Vec<u64> = out.iter().map(|(t, _)| *t).collect();
        assert_eq!(
            pings(&out.iter().map(|(_, a)| a.clone()).collect::<Vec<_>>()),
            out.len()
        );
        assert!(times.len() >= 10, "{times:?}");
        for w in times.windows(2) {
            assert!((900..=1000).contains(&(w[1] - w[0])), "{times:?}");
        }
    }

    #[test]
    fn no_hold_when_a_single_miss_is_fatal() {
        // With max_missed 1 the hold would delay death past the bound, so
        // the side pings on its idle deadline as before, and its answer
        // (not modelled here) is what keeps the peer alive.
        let out = answering_late_pings(true, 1);
        assert!(
            out.iter().any(|(_, a)| matches!(a, SendPing { .. })),
            "{out:?}"
        );
    }

    #[test]
    fn a_peer_that_stops_pinging_is_pinged_half_an_interval_after_its_ping_was_due() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(idle_with_shell_grace(3), t0);
        // The peer pings at 1 s and 2 s, then only answers our pings, 1 ms
        // after each.
        let mut pongs = Vec::new();
        let out = run(&mut hb, t0, 0, 6_000, |hb, t| {
            let now = t0 + ms(t);
            if t == 1_000 || t == 2_000 {
                hb.on_peer_ping(now);
                hb.on_write(now);
            }
            if pongs.first() == Some(&t) {
                pongs.remove(0);
                hb.on_read(now);
            }
            // The peer answers each ping `run` is about to send.
            let mut ahead = hb.clone();
            if pings(&step(&mut ahead, now)) > 0 {
                pongs.push(t + 1);
            }
        });
        // Held until 2 s + 1.5 s, then a ping an interval after the last;
        // no miss.
        assert_eq!(
            out,
            [
                (3_500, SendPing { seq: 1 }),
                (4_500, SendPing { seq: 2 }),
                (5_500, SendPing { seq: 3 })
            ]
        );
    }

    #[test]
    fn a_pinging_peer_that_dies_is_dead_on_time_despite_the_hold() {
        // Last Ping read at 2 s: the first miss waits for the held ping
        // (3.5 s + grace), the rest of the timeline is unchanged, and Dead
        // comes at 2 s + 3 × 1 s + grace, as without the hold.
        // Fixed mode the same, but its pings at 1 s and 2 s rode with the
        // Pongs, so the held one is its third.
        for (mode, rode) in [(HeartbeatMode::Idle, 0), (HeartbeatMode::Fixed, 2)] {
            let t0 = Instant::now();
            let mut hb = Heartbeat::new(with_shell_grace(mode, 3), t0);
            let out = run(&mut hb, t0, 0, 8_000, |hb, t| {
                if t == 1_000 || t == 2_000 {
                    hb.on_peer_ping(t0 + ms(t));
                    hb.on_write(t0 + ms(t));
                }
            });
            let mut expected = vec![(1_000, SendPing { seq: 1 }), (2_000, SendPing { seq: 2 })];
            expected.truncate(rode);
            expected.extend([
                (
                    3_500,
                    SendPing {
                        seq: rode as u64 + 1,
                    },
                ),
                // The first miss waits for the answer to the held ping,
                // half an interval: by then a second interval went by too.
                (4_006, Missed { count: 2 }),
                (
                    4_500,
                    SendPing {
                        seq: rode as u64 + 2,
                    },
                ),
                (
                    5_006,
                    Dead {
                        missed: 3,
                        silent_for: ms(3_006),
                    },
                ),
            ]);
            assert_eq!(out, expected, "{mode:?}");
        }
    }

    #[test]
    fn idle_never_pings_more_often_than_once_per_interval() {
        // Bursty, irregular traffic in both directions, with gaps.
        let t0 = Instant::now();
        let c = HeartbeatConfig {
            max_missed: 1000,
            ..config(HeartbeatMode::Idle)
        };
        let mut hb = Heartbeat::new(c, t0);
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let out = run(&mut hb, t0, 0, 120_000, |hb, t| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            match x % 997 {
                0..=3 => hb.on_read(t0 + ms(t)),
                4..=7 => hb.on_write(t0 + ms(t)),
                _ => {}
            }
        });
        let times: Vec<u64> = out
            .iter()
            .filter(|(_, a)| matches!(a, SendPing { .. }))
            .map(|&(t, _)| t)
            .collect();
        assert!(times.len() > 10, "{times:?}");
        for w in times.windows(2) {
            assert!(w[1] - w[0] >= 1000, "pings too close: {w:?}");
        }
    }

    #[test]
    fn stall_is_not_counted_against_the_peer() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(config(HeartbeatMode::Fixed), t0);
        hb.on_read(t0 + ms(400));
        // This process is frozen for 3 × bound; the first call after it:
        let resumed = t0 + ms(400) + hb.config().bound() * 3;
        assert_eq!(
            step(&mut hb, resumed),
            [
                Stalled {
                    late_by: resumed - (t0 + ms(1000))
                },
                SendPing { seq: 1 }
            ]
        );
        assert!(!hb.is_dead());
        assert_eq!(hb.missed(), 0);
        // From now on, fresh evidence: dead only after a full M × I of silence.
        let mut out = Vec::new();
        while let Some(d) = hb.next_deadline() {
            out.extend(step(&mut hb, d).into_iter().map(|a| (d - resumed, a)));
        }
        assert_eq!(
            out,
            [
                (ms(1000), SendPing { seq: 2 }),
                (ms(1500), Missed { count: 1 }),
                (ms(2000), SendPing { seq: 3 }),
                (ms(2500), Missed { count: 2 }),
                (
                    ms(3000),
                    Dead {
                        missed: 3,
                        silent_for: resumed + ms(3000) - (t0 + ms(400))
                    }
                ),
            ]
        );
    }

    /// A side configured not to ping pings while it excuses the peer's
    /// silence (the peer's own pings wait unread, unanswered): at the first
    /// excuse, then every interval, until it reads again; after that it is
    /// silent again and judges the peer from the read.
    #[test]
    fn excused_silence_makes_a_side_that_does_not_ping_ping_until_it_reads() {
        let t0 = Instant::now();
        let config = HeartbeatConfig {
            send_pings: false,
            ..HeartbeatConfig::default()
        };
        let mut hb = Heartbeat::new(config, t0);
        // Without an excuse: no ping, the first miss at 1 s.
        assert_eq!(hb.next_deadline(), Some(t0 + ms(1000)));
        let mut out = Vec::new();
        while let Some(d) = hb.next_deadline().filter(|&d| d <= t0 + ms(4_000)) {
            hb.excuse_silence(d);
            out.extend(step(&mut hb, d).into_iter().map(|a| (d - t0, a)));
        }
        assert_eq!(
            out,
            [
                (ms(1000), SendPing { seq: 1 }),
                (ms(2000), SendPing { seq: 2 }),
                (ms(3000), SendPing { seq: 3 }),
                (ms(4000), SendPing { seq: 4 }),
            ]
        );
        // The read that ends the hold ends the pings.
        let read = t0 + ms(4_200);
        hb.on_read(read);
        let mut out = Vec::new();
        while let Some(d) = hb.next_deadline() {
            out.extend(step(&mut hb, d).into_iter().map(|a| (d - read, a)));
        }
        assert_eq!(
            out,
            [
                (ms(1000), Missed { count: 1 }),
                (ms(2000), Missed { count: 2 }),
                (
                    ms(3000),
                    Dead {
                        missed: 3,
                        silent_for: ms(3000)
                    }
                ),
            ]
        );
    }

    /// A side that holds its reads excuses the silence at each of its
    /// timer calls: no miss is counted while it does, its pings go on on
    /// their grid, and once it stops excusing, the peer is judged from the
    /// last excuse: dead a full `M × I` after it.
    #[test]
    fn excused_silence_is_judged_from_the_last_excuse() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(config(HeartbeatMode::Fixed), t0);
        let mut out = Vec::new();
        // Excused at every deadline for 10 s: the peer is never missed.
        while let Some(d) = hb.next_deadline().filter(|&d| d <= t0 + ms(10_000)) {
            hb.excuse_silence(d);
            out.extend(step(&mut hb, d));
        }
        assert_eq!(
            out,
            (1..=10).map(|seq| SendPing { seq }).collect::<Vec<_>>()
        );
        let excused = t0 + ms(10_000);
        // Then silence that is not excused.
        let mut out = Vec::new();
        while let Some(d) = hb.next_deadline() {
            out.extend(step(&mut hb, d).into_iter().map(|a| (d - excused, a)));
        }
        assert_eq!(
            out,
            [
                (ms(1000), SendPing { seq: 11 }),
                (ms(1500), Missed { count: 1 }),
                (ms(2000), SendPing { seq: 12 }),
                (ms(2500), Missed { count: 2 }),
                (
                    ms(3000),
                    Dead {
                        missed: 3,
                        silent_for: ms(13_000)
                    }
                ),
            ]
        );
    }

    #[test]
    fn stall_then_peer_answers_keeps_connection() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(config(HeartbeatMode::Fixed), t0);
        let resumed = t0 + ms(30_000);
        let actions = step(&mut hb, resumed);
        assert!(matches!(actions[..], [Stalled { .. }, SendPing { seq: 1 }]));
        hb.on_read(resumed + ms(5));
        assert_eq!(hb.on_pong(resumed + ms(5), 1), Some(ms(5)));
        assert_eq!(step(&mut hb, resumed + ms(1000)), [SendPing { seq: 2 }]);
        assert_eq!(hb.missed(), 0);
    }

    #[test]
    fn stall_detected_from_ping_deadline_when_bytes_were_read_on_resume() {
        // On resume the shell first drains the socket (buffered bytes), then
        // the timer fires: the ping deadline still reveals the stall.
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(config(HeartbeatMode::Fixed), t0);
        let resumed = t0 + ms(9000);
        hb.on_read(resumed);
        assert_eq!(
            step(&mut hb, resumed),
            [Stalled { late_by: ms(8000) }, SendPing { seq: 1 }]
        );
    }

    #[test]
    fn stall_with_send_pings_false_still_sends_one_ping() {
        let t0 = Instant::now();
        let c = HeartbeatConfig {
            send_pings: false,
            ..HeartbeatConfig::default()
        };
        let mut hb = Heartbeat::new(c, t0);
        assert_eq!(
            step(&mut hb, t0 + ms(20_000)),
            [
                Stalled {
                    late_by: ms(19_000)
                },
                SendPing { seq: 1 }
            ]
        );
        assert_eq!(hb.next_deadline(), Some(t0 + ms(21_000)));
        assert_eq!(step(&mut hb, t0 + ms(21_000)), [Missed { count: 1 }]);
    }

    #[test]
    fn lateness_below_threshold_counts_misses() {
        let t0 = Instant::now();
        let c = HeartbeatConfig {
            send_pings: false,
            stall_threshold: Some(ms(5000)),
            max_missed: 5,
            ..HeartbeatConfig::default()
        };
        let mut hb = Heartbeat::new(c, t0);
        // 2.5 s late, below the 5 s threshold: the count jumps to 3.
        assert_eq!(step(&mut hb, t0 + ms(3500)), [Missed { count: 3 }]);
        // Exactly the threshold late counts as a stall.
        assert_eq!(
            step(&mut hb, t0 + ms(9000)),
            [Stalled { late_by: ms(5000) }, SendPing { seq: 1 }]
        );
        assert_eq!(hb.missed(), 0);
    }

    #[test]
    fn stall_threshold_below_interval() {
        let t0 = Instant::now();
        let c = HeartbeatConfig {
            stall_threshold: Some(ms(100)),
            ..HeartbeatConfig::default()
        };
        let mut hb = Heartbeat::new(c, t0);
        hb.on_read(t0 + ms(500));
        assert_eq!(step(&mut hb, t0 + ms(1099)), [SendPing { seq: 1 }]);
        // The miss is due half an interval after that ping, at 1599.
        assert_eq!(
            step(&mut hb, t0 + ms(1699)),
            [Stalled { late_by: ms(100) }, SendPing { seq: 2 }]
        );
    }

    #[test]
    fn pong_gives_rtt_and_smoothed_srtt() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(config(HeartbeatMode::Fixed), t0);
        assert_eq!(step(&mut hb, t0 + ms(1000)), [SendPing { seq: 1 }]);
        assert_eq!(hb.on_pong(t0 + ms(1080), 1), Some(ms(80)));
        assert_eq!(hb.srtt(), Some(ms(80)));
        hb.on_read(t0 + ms(1080));
        assert_eq!(step(&mut hb, t0 + ms(2000)), [SendPing { seq: 2 }]);
        assert_eq!(hb.on_pong(t0 + ms(2160), 2), Some(ms(160)));
        // 7/8 × 80 + 1/8 × 160 = 90
        assert_eq!(hb.srtt(), Some(ms(90)));
        hb.on_read(t0 + ms(2160));
        assert_eq!(step(&mut hb, t0 + ms(3000)), [SendPing { seq: 3 }]);
        assert_eq!(hb.on_pong(t0 + ms(3010), 3), Some(ms(10)));
        // 7/8 × 90 + 1/8 × 10 = 80
        assert_eq!(hb.srtt(), Some(ms(80)));
    }

    #[test]
    fn pong_with_unknown_or_duplicate_seq_is_ignored() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(config(HeartbeatMode::Fixed), t0);
        assert_eq!(hb.on_pong(t0, 1), None);
        hb.handle_timeout(t0 + ms(1000));
        drain(&mut hb);
        assert_eq!(hb.on_pong(t0 + ms(1001), 0), None);
        assert_eq!(hb.on_pong(t0 + ms(1001), 2), None);
        assert_eq!(hb.on_pong(t0 + ms(1001), 1 + PING_HISTORY as u64), None);
        assert_eq!(hb.srtt(), None);
        assert_eq!(hb.on_pong(t0 + ms(1002), 1), Some(ms(2)));
        assert_eq!(hb.on_pong(t0 + ms(1003), 1), None, "duplicate pong");
        assert_eq!(hb.srtt(), Some(ms(2)));
    }

    #[test]
    fn pong_ring_remembers_only_the_last_pings() {
        let t0 = Instant::now();
        let c = HeartbeatConfig {
            max_missed: 100,
            ..HeartbeatConfig::default()
        };
        let mut hb = Heartbeat::new(c, t0);
        for s in 1..=10u64 {
            hb.handle_timeout(t0 + ms(1000 * s));
        }
        assert_eq!(pings(&drain(&mut hb)), 10);
        let now = t0 + ms(10_500);
        assert_eq!(hb.on_pong(now, 1), None);
        assert_eq!(hb.on_pong(now, 2), None);
        assert_eq!(hb.on_pong(now, 3), Some(ms(7500)));
        assert_eq!(hb.on_pong(now, 10), Some(ms(500)));
    }

    /// Two machines talking over a link that delays every frame by
    /// `one_way_ms`, each driven at its deadlines rounded up to a 5 ms tick
    /// (the shell's timer) with the shell's grace of a tick + 1 ms. The
    /// consumer side (`A`) opens with a handshake Ping at 0; the provider
    /// side (`B`) exists from `b_from_ms`, answers every Ping with a Pong at
    /// once and tells its machine (`on_peer_ping`). From `a_deaf_from_ms` on, nothing reaches `A` any more.
    /// Returns every action but `SendPing`, with its side and time.
    fn two_sides(
        modes: [HeartbeatMode; 2],
        one_way_ms: u64,
        b_from_ms: u64,
        a_deaf_from_ms: u64,
        until_ms: u64,
    ) -> Vec<(char, u64, HeartbeatAction)> {
        #[derive(Clone, Copy)]
        enum Frame {
            Ping(u64),
            Pong(u64),
        }
        let (t0, tick) = (Instant::now(), 5u64);
        let side = |mode, from: u64| {
            let config = HeartbeatConfig {
                mode,
                miss_grace: ms(tick + 1),
                ..config(mode)
            };
            Heartbeat::new(config, t0 + ms(from))
        };
        let mut hb = [side(modes[0], 0), side(modes[1], b_from_ms)];
        // (arrival ms, receiving side, frame), in sending order.
        let mut wire = vec![(one_way_ms, 1, Frame::Ping(0))];
        hb[0].on_write(t0);
        let mut out = Vec::new();
        for t in 0..=until_ms {
            let now = t0 + ms(t);
            let (arrived, later): (Vec<_>, Vec<_>) = wire.into_iter().partition(|w| w.0 == t);
            wire = later;
            for (_, to, frame) in arrived {
                if to == 0 && t >= a_deaf_from_ms {
                    continue;
                }
                hb[to].on_read(now);
                match frame {
                    Frame::Ping(seq) => {
                        if to == 1 {
                            hb[1].on_peer_ping(now); // as pulse's provider does
                        }
                        hb[to].on_write(now);
                        wire.push((t + one_way_ms, 1 - to, Frame::Pong(seq)));
                        // A Fixed provider's ping rides with the Pong.
                        for action in drain(&mut hb[to]) {
                            match action {
                                SendPing { seq } => {
                                    wire.push((t + one_way_ms, 1 - to, Frame::Ping(seq)));
                                }
                                other => out.push(('B', t, other)),
                            }
                        }
                    }
                    Frame::Pong(seq) => {
                        hb[to].on_pong(now, seq);
                    }
                }
            }
            for (i, name) in [(0, 'A'), (1, 'B')] {
                let due = hb[i].next_deadline().map(|d| (d - t0).as_millis() as u64);
                if t < b_from_ms && i == 1 || due.is_none_or(|d| d.div_ceil(tick) * tick > t) {
                    continue;
                }
                hb[i].handle_timeout(now);
                for action in drain(&mut hb[i]) {
                    match action {
                        SendPing { seq } => {
                            hb[i].on_write(now);
                            wire.push((t + one_way_ms, 1 - i, Frame::Ping(seq)));
                        }
                        other => out.push((name, t, other)),
                    }
                }
            }
        }
        out
    }

    #[test]
    fn a_live_peer_behind_a_slow_link_is_never_missed() {
        // Round trips from 2 ms to 600 ms (over half the 1 s interval), every
        // pairing of modes, the provider side created with the consumer or
        // half a trip later: 20 s of heartbeats and not one miss. The ping
        // schedule, not the grace, absorbs the round trip: Fixed expects the
        // answer one interval after the last one, Idle pings an interval
        // after its own last write, so the Pong is due a round trip after
        // the evidence it replaces.
        use HeartbeatMode::{Fixed, Idle};
        for modes in [[Fixed, Fixed], [Idle, Idle], [Fixed, Idle], [Idle, Fixed]] {
            for one_way_ms in [1, 25, 100, 300] {
                for b_from_ms in [0, one_way_ms / 2] {
                    let out = two_sides(modes, one_way_ms, b_from_ms, u64::MAX, 20_000);
                    assert_eq!(
                        out,
                        [],
                        "{modes:?}, one way {one_way_ms} ms, B from {b_from_ms} ms"
                    );
                }
            }
        }
        // The same harness does see a peer that falls silent: from 10 s on
        // nothing reaches A, which counts its misses and declares B dead
        // within a tick of `3 × 1 s + 6 ms` after the last frame it read.
        for modes in [[Fixed, Fixed], [Idle, Idle]] {
            let out = two_sides(modes, 100, 0, 10_000, 15_000);
            let a: Vec<_> = out.iter().filter(|(side, ..)| *side == 'A').collect();
            assert!(
                matches!(a.as_slice(), [
                    (_, _, Missed { count: 1 }),
                    (_, _, Missed { count: 2 }),
                    (_, dead_at, Dead { missed: 3, .. }),
                ] if (12_006..=13_011).contains(dead_at)),
                "{modes:?}: {out:?}"
            );
        }
    }

    #[test]
    fn send_pings_false_never_pings_but_detects_silence() {
        for mode in [HeartbeatMode::Fixed, HeartbeatMode::Idle] {
            let t0 = Instant::now();
            let c = HeartbeatConfig {
                send_pings: false,
                ..config(mode)
            };
            let mut hb = Heartbeat::new(c, t0);
            // Kept alive by the peer's pings, every 900 ms, for a minute.
            let out = run(&mut hb, t0, 0, 60_000, |hb, t| {
                if t % 900 == 0 {
                    hb.on_read(t0 + ms(t));
                }
            });
            assert_eq!(out, [], "{mode:?}");
            // Then the peer falls silent (last read at 59.4 s).
            let out = run(&mut hb, t0, 60_001, 70_000, |_, _| {});
            assert_eq!(
                out,
                [
                    (60_400, Missed { count: 1 }),
                    (61_400, Missed { count: 2 }),
                    (
                        62_400,
                        Dead {
                            missed: 3,
                            silent_for: ms(3000)
                        }
                    ),
                ],
                "{mode:?}"
            );
        }
    }

    proptest! {
        /// A peer that answers every ping within the grace is never counted
        /// as missing an interval, however late (short of a stall) the shell
        /// calls: each call comes up to half an interval after the deadline
        /// it was given.
        #[test]
        fn pings_answered_within_the_grace_are_never_missed(
            interval_ms in 21u64..2_000,
            max_missed in 2u32..6,
            idle in any::<bool>(),
            grace_ms in 1u64..30,
            rtt_fraction in 0u32..100,
            late_permille in proptest::collection::vec(0u64..500, 50..200),
        ) {
            let t0 = Instant::now();
            let interval = ms(interval_ms);
            let grace = ms(grace_ms);
            let config = HeartbeatConfig {
                interval,
                max_missed,
                mode: if idle { HeartbeatMode::Idle } else { HeartbeatMode::Fixed },
                miss_grace: grace,
                ..HeartbeatConfig::default()
            };
            let rtt = grace * rtt_fraction / 100;
            let mut hb = Heartbeat::new(config, t0);
            let mut pongs: VecDeque<(Instant, u64)> = VecDeque::new();
            let mut pings = 0;
            for permille in late_permille {
                let now = hb.next_deadline().unwrap() + interval * permille as u32 / 1000;
                while let Some(&(at, seq)) = pongs.front() && at <= now {
                    pongs.pop_front();
                    hb.on_read(at);
                    hb.on_pong(at, seq);
                }
                hb.handle_timeout(now);
                while let Some(action) = hb.poll_action() {
                    match action {
                        SendPing { seq } => {
                            hb.on_write(now);
                            pongs.push_back((now + rtt, seq));
                            pings += 1;
                        }
                        other => prop_assert!(false, "{:?} at {:?}", other, now - t0),
                    }
                }
            }
            prop_assert!(pings > 0);
        }

        /// A silent peer is declared dead within one timer tick after
        /// `t_silent + M × I`, and never before, when the shell rounds each
        /// deadline up to its tick (and sometimes fires early).
        #[test]
        fn silent_peer_dead_within_one_tick(
            interval_ms in 21u64..2_000,
            max_missed in 1u32..6,
            idle in any::<bool>(),
            send_pings in any::<bool>(),
            tick_ms in 1u64..=20,
            reads in proptest::collection::vec(0u64..10_000, 0..40),
            early_every in 0u64..5,
            grace_ms in 0u64..30,
            peer_pings in any::<bool>(),
        ) {
            let t0 = Instant::now();
            let config = HeartbeatConfig {
                interval: ms(interval_ms),
                max_missed,
                mode: if idle { HeartbeatMode::Idle } else { HeartbeatMode::Fixed },
                send_pings,
                stall_threshold: None,
                miss_grace: ms(grace_ms),
            };
            let bound = config.bound();
            let mut hb = Heartbeat::new(config, t0);
            let tick = ms(tick_ms);
            let round_up = |d: Instant| {
                let n = (d - t0).as_nanos().div_ceil(tick.as_nanos());
                t0 + tick * u32::try_from(n).unwrap()
            };

            // Reads from a live peer, in order, each before the miss deadline
            // so the peer stays alive; the last one is t_silent.
            let mut reads = reads;
            reads.sort_unstable();
            let mut reads = reads.into_iter().map(|r| t0 + ms(r)).peekable();
            let mut t_silent = t0;
            let mut timer = round_up(hb.next_deadline().unwrap());
            // Pings, from the timer or riding with a Pong, stay at least half
            // an interval apart (the timer never runs a whole interval late
            // here, so there is no stall ping).
            let mut last_ping: Option<Instant> = None;
            let mut ping_at = |at: Instant| -> Result<(), TestCaseError> {
                if let Some(prev) = last_ping {
                    prop_assert!(
                        at - prev >= ms(interval_ms) / 2,
                        "pings {:?} apart", at - prev
                    );
                }
                last_ping = Some(at);
                Ok(())
            };
            let mut calls = 0u64;
            let mut last_input = t0;
            let dead_at = loop {
                if let Some(&r) = reads.peek()
                    && r < timer
                {
                    reads.next();
                    // A read after the peer should already be dead is dropped.
                    if r < t_silent + bound {
                        // The peer's reads may be its Pings (the provider's
                        // hold in Idle mode must not delay death either).
                        if peer_pings {
                            hb.on_peer_ping(r);
                            // Fixed mode may answer with its own ping; nothing
                            // else comes out of a read.
                            while let Some(a) = hb.poll_action() {
                                prop_assert!(send_pings && !idle, "{:?} from a peer Ping", a);
                                ping_at(r)?;
                                hb.on_write(r);
                            }
                        } else {
                            hb.on_read(r);
                        }
                        t_silent = r;
                        last_input = r;
                    }
                    continue;
                }
                // Now and then an extra call 1 ns before the real deadline
                // (time never going backwards): it must do nothing.
                calls += 1;
                let deadline = hb.next_deadline().unwrap();
                let early = deadline - Duration::from_nanos(1);
                if early_every > 0 && calls.is_multiple_of(early_every) && early >= last_input {
                    hb.handle_timeout(early);
                    prop_assert_eq!(hb.poll_action(), None);
                }
                hb.handle_timeout(timer);
                last_input = timer;
                let mut died = false;
                while let Some(a) = hb.poll_action() {
                    match a {
                        Stalled { .. } => prop_assert!(false, "false stall at {:?}", timer - t0),
                        Dead { missed, silent_for } => {
                            prop_assert_eq!(missed, max_missed);
                            prop_assert_eq!(silent_for, timer - t_silent);
                            died = true;
                        }
                        Missed { count } => prop_assert!(count < max_missed),
                        SendPing { .. } => {
                            prop_assert!(send_pings);
                            ping_at(timer)?;
                            hb.on_write(timer);
                        }
                    }
                }
                if died {
                    break timer;
                }
                match hb.next_deadline() {
                    Some(d) => {
                        prop_assert!(d > timer);
                        timer = round_up(d);
                    }
                    None => prop_assert!(false, "no deadline while alive"),
                }
            };
            prop_assert!(hb.is_dead());
            prop_assert_eq!(hb.next_deadline(), None);
            prop_assert!(dead_at >= t_silent + bound, "dead early: {:?}", dead_at - t0);
            prop_assert!(dead_at <= t_silent + bound + tick, "dead late: {:?}", dead_at - t0);
        }
    }
}
