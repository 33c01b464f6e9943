//! A hierarchical hashed timer wheel over plain `u64` ticks.
//!
//! The wheel knows nothing about [`Instant`](std::time::Instant), threads or
//! sleeping: time is a `u64` tick count that only moves when the owner calls
//! [`Wheel::advance`]. The timer thread (`thread.rs`) is the only code that
//! converts between ticks and real time.

use std::fmt;

/// Number of levels in the hierarchy.
const LEVELS: usize = 6;
/// log2 of the number of slots per level.
const SLOT_BITS: u32 = 6;
/// Number of slots per level.
const SLOTS: usize = 1 << SLOT_BITS;
/// Ticks covered by one rotation of the top level (64^6 = 2^36). A deadline in
/// a later top-level rotation than `elapsed` goes to the overflow list.
const SPAN: u64 = 1 << (SLOT_BITS as usize * LEVELS);
/// The "no entry" index of the intrusive lists and of the free list.
const NIL: u32 = u32::MAX;
/// List id of the due list: timers whose deadline was `<= elapsed` at insert.
const DUE: usize = LEVELS * SLOTS;
/// List id of the overflow list: timers beyond the current top-level rotation.
const OVERFLOW: usize = DUE + 1;
/// Number of lists: one per slot, plus the due and overflow lists.
const LISTS: usize = OVERFLOW + 1;

/// Identifies one timer in a [`Wheel`].
///
/// A key is returned by [`Wheel::insert`] and handed back when the timer fires.
/// It carries the generation of its slab slot, so once the timer has fired or
/// been cancelled the key is *stale*: it never matches a timer that later
/// reuses the same slot, and [`Wheel::cancel`] / [`Wheel::deadline`] return
/// `None` for it.
///
/// (A slot's generation is a wrapping `u32`: a stale key could only alias a
/// live timer after 2^32 reuses of the very same slot.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TimerKey {
    index: u32,
    generation: u32,
}

/// One slab slot. Occupied when `value` is `Some`.
struct Node<T> {
    /// Bumped every time the slot is freed, so stale keys miss.
    generation: u32,
    /// The list (slot, due or overflow) the timer is linked into.
    list: u16,
    /// Previous timer in the same list, or `NIL`.
    prev: u32,
    /// Next timer in the same list, or `NIL`; for a vacant slot, the next
    /// vacant slot of the free list.
    next: u32,
    /// The timer's deadline, as given to `insert`.
    deadline: u64,
    /// The timer's value; `None` for a vacant slot.
    value: Option<T>,
}

/// A hierarchical hashed timer wheel: O(1) insert and cancel, expiry work
/// proportional to the timers that fire, and empty ticks skipped entirely.
///
/// Time is a plain `u64` tick count, starting at 0, that moves only through
/// [`advance`](Wheel::advance). Each timer has a deadline tick and a value of
/// type `T`; advancing to `now` hands back every timer whose deadline is
/// `<= now`, earliest first. A timer never fires before its deadline.
///
/// # Example
///
/// ```
/// use pulse::timer::Wheel;
///
/// let mut wheel = Wheel::new();
/// let ping = wheel.insert(10, "ping");
/// let stale = wheel.insert(20, "stale peer scan");
/// assert_eq!(wheel.cancel(stale), Some("stale peer scan"));
///
/// let mut expired = Vec::new();
/// wheel.advance(9, &mut expired);
/// assert!(expired.is_empty());
/// wheel.advance(10, &mut expired);
/// assert_eq!(expired, vec![(ping, "ping")]);
/// assert!(wheel.is_empty());
/// ```
///
/// # Implementation notes
///
/// The design follows tokio's `runtime/time/wheel`. There are 6 levels of 64
/// slots; a slot of level `l` spans 64^`l` ticks, so level 0 holds timers due
/// in the next 64 ticks one tick per slot, and the whole wheel spans 2^36 ticks
/// (about 795 days at 1 ms per tick). A timer is placed at the level of the
/// most significant 6-bit group in which its deadline differs from `elapsed`,
/// in the slot given by that group of the deadline. Each slot is an intrusive
/// doubly-linked list threaded through a slab (a `Vec` plus a free list), so
/// insert and cancel are O(1) and allocation-free once the slab has grown.
///
/// Each level keeps a `u64` bitmap of its occupied slots. Every occupied slot
/// lies strictly after the level's current slot, so the next slot to process
/// is the lowest set bit of the lowest non-empty level: finding it costs six
/// `trailing_zeros`, however many empty ticks lie in between.
///
/// When time reaches a slot of a level above 0 (at the start of the span it
/// covers), its timers *cascade*: those due fire and the others are
/// re-inserted relative to the new time, necessarily at a lower level. A timer
/// is therefore touched at most once per level on its way down.
///
/// Two lists sit outside the levels:
/// - the **due** list holds timers inserted with a deadline `<= elapsed`; they
///   fire at the next [`advance`](Wheel::advance), whatever `now` it is given;
/// - the **overflow** list is the wheel's furthest slot: deadlines beyond the
///   current top-level rotation are clamped into it. It is reached at the start
///   of the top-level rotation that holds its earliest deadline, and its
///   timers are then re-inserted (or fired), so they fire at their real
///   deadline, never early. A jump of any size costs one pass over it.
pub struct Wheel<T> {
    /// The tick time has advanced to.
    elapsed: u64,
    /// The slab.
    nodes: Vec<Node<T>>,
    /// Head of the free list of vacant slab slots, or `NIL`.
    free_head: u32,
    /// Number of live timers.
    len: usize,
    /// Head of each list: `level * SLOTS + slot`, then `DUE`, then `OVERFLOW`.
    heads: [u32; LISTS],
    /// Per level, bit `s` is set iff slot `s` of that level is non-empty.
    occupied: [u64; LEVELS],
    /// A lower bound of the deadlines in the due list (exact unless its
    /// earliest timer was cancelled). Meaningful only if the list is non-empty.
    due_min: u64,
    /// Same for the overflow list.
    overflow_min: u64,
    /// Reused buffer of `(deadline, index)` of the timers firing from one list.
    scratch: Vec<(u64, u32)>,
}

impl<T> Wheel<T> {
    /// Creates an empty wheel at tick 0 (`elapsed() == 0`).
    pub fn new() -> Self {
        Wheel {
            elapsed: 0,
            nodes: Vec::new(),
            free_head: NIL,
            len: 0,
            heads: [NIL; LISTS],
            occupied: [0; LEVELS],
            due_min: 0,
            overflow_min: 0,
            scratch: Vec::new(),
        }
    }

    /// The tick time has advanced to: the largest `now` ever passed to
    /// [`advance`](Wheel::advance), or 0.
    pub fn elapsed(&self) -> u64 {
        self.elapsed
    }

    /// Number of live timers (inserted, neither fired nor cancelled).
    pub fn len(&self) -> usize {
        self.len
    }

    /// `true` if no timer is live.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Schedules `value` to fire at tick `deadline`, in O(1).
    ///
    /// A deadline `<= elapsed()` is already due: the timer fires at the next
    /// [`advance`](Wheel::advance), whatever `now` that call is given. Any
    /// deadline up to `u64::MAX` is accepted; one beyond the wheel's span is
    /// clamped to its furthest slot and still fires exactly at `deadline`.
    ///
    /// # Panics
    ///
    /// If `u32::MAX - 1` timers are already live (the slab index is a `u32`).
    pub fn insert(&mut self, deadline: u64, value: T) -> TimerKey {
        let index = if self.free_head != NIL {
            let index = self.free_head;
            let node = &mut self.nodes[index as usize];
            self.free_head = node.next;
            node.deadline = deadline;
            node.value = Some(value);
            index
        } else {
            // `NIL` is reserved as the end-of-list marker, so the last usable
            // index is `NIL - 1`.
            let index = match u32::try_from(self.nodes.len()) {
                Ok(index) if index != NIL => index,
                _ => panic!("timer wheel: more than u32::MAX - 1 live timers"),
            };
            self.nodes.push(Node {
                generation: 0,
                list: 0,
                prev: NIL,
                next: NIL,
                deadline,
                value: Some(value),
            });
            index
        };
        self.len += 1;
        let list = list_for(self.elapsed, deadline);
        self.link(index, list);
        TimerKey {
            index,
            generation: self.nodes[index as usize].generation,
        }
    }

    /// Cancels a timer in O(1) and returns its value, or `None` if `key` is
    /// stale (the timer already fired or was cancelled).
    pub fn cancel(&mut self, key: TimerKey) -> Option<T> {
        if !self.is_live(key) {
            return None;
        }
        self.unlink(key.index);
        self.release(key.index).map(|(_, value)| value)
    }

    /// The deadline of a live timer, as given to [`insert`](Wheel::insert), or
    /// `None` if `key` is stale.
    pub fn deadline(&self, key: TimerKey) -> Option<u64> {
        if self.is_live(key) {
            Some(self.nodes[key.index as usize].deadline)
        } else {
            None
        }
    }

    /// Moves time to `max(elapsed(), now)` and pushes every timer whose
    /// deadline is `<= ` that time onto `expired`, in non-decreasing deadline
    /// order (ties in no particular order). Timers inserted already due fire
    /// too. A timer never fires before its deadline.
    ///
    /// `expired` is only appended to; reuse one buffer to avoid allocations.
    /// The work done is proportional to the number of timers fired or
    /// cascaded, not to the number of ticks crossed: `advance(u64::MAX)` is
    /// as cheap as `advance(elapsed() + 1)`.
    pub fn advance(&mut self, now: u64, expired: &mut Vec<(TimerKey, T)>) {
        let now = now.max(self.elapsed);
        if self.heads[DUE] != NIL {
            self.process(DUE, self.elapsed, expired);
        }
        loop {
            if let Some((list, start)) = self.next_slot() {
                if start > now {
                    break;
                }
                self.elapsed = start;
                self.process(list, start, expired);
            } else if self.heads[OVERFLOW] != NIL {
                if self.overflow_expiration() > now {
                    break;
                }
                // Every level is empty, so only overflow timers lie between
                // here and `now`: jump straight to `now`, fire those due (in
                // order) and redistribute the rest, in one pass.
                self.elapsed = now;
                self.process(OVERFLOW, now, expired);
            } else {
                break;
            }
        }
        self.elapsed = now;
    }

    /// When to call [`advance`](Wheel::advance) next, or `None` if the wheel
    /// is empty.
    ///
    /// # Contract: a lower bound that guarantees progress
    ///
    /// The returned tick `L` is **never later than the earliest live
    /// deadline**, and `advance(L)` always makes progress:
    /// - if some timer is already due (inserted with a deadline `<=
    ///   elapsed()`), `L <= elapsed()` and the next `advance`, with any `now`,
    ///   fires it;
    /// - otherwise `L > elapsed()` is the first tick at which the wheel has
    ///   work: either the earliest timer fires, or the slot holding it
    ///   cascades to a lower level (or the overflow list is redistributed).
    ///
    /// `L` is exact (equal to the earliest deadline) when the earliest timer
    /// is less than 64 ticks ahead, and for due timers unless the earliest of
    /// them was cancelled. For a timer further ahead, a thread that sleeps
    /// until `L` wakes at most once per level (at most 7 times) before it fires.
    /// The cost is O(1): six bitmap scans.
    pub fn next_expiration(&self) -> Option<u64> {
        if self.heads[DUE] != NIL {
            Some(self.due_min)
        } else if let Some((_, start)) = self.next_slot() {
            Some(start)
        } else if self.heads[OVERFLOW] != NIL {
            Some(self.overflow_expiration())
        } else {
            None
        }
    }

    /// `true` if `key` names a live timer.
    fn is_live(&self, key: TimerKey) -> bool {
        self.nodes
            .get(key.index as usize)
            .is_some_and(|node| node.generation == key.generation && node.value.is_some())
    }

    /// The lowest occupied slot of the lowest non-empty level, as its list id
    /// and the tick at which it starts (always `> elapsed`).
    fn next_slot(&self) -> Option<(usize, u64)> {
        self.occupied
            .iter()
            .enumerate()
            .find(|&(_, &bits)| bits != 0)
            .map(|(level, &bits)| {
                let slot = bits.trailing_zeros() as usize;
                let start = level_start(self.elapsed, level) + slot as u64 * slot_span(level);
                debug_assert!(start > self.elapsed, "occupied slot not ahead of time");
                (level * SLOTS + slot, start)
            })
    }

    /// When the overflow list must be redistributed: the start of the
    /// top-level rotation holding its earliest deadline (at least the next
    /// rotation). Only meaningful if the overflow list is non-empty.
    fn overflow_expiration(&self) -> u64 {
        // Overflow timers lie in a later rotation than `elapsed`, so the next
        // rotation start exists; saturate rather than trust that blindly.
        let next_rotation = (self.elapsed | (SPAN - 1)).saturating_add(1);
        next_rotation.max(self.overflow_min & !(SPAN - 1))
    }

    /// Detaches list `list` and, with time at `now`, fires its timers due by
    /// `now` (in deadline order) and re-inserts the others relative to `now`.
    fn process(&mut self, list: usize, now: u64, expired: &mut Vec<(TimerKey, T)>) {
        let mut index = std::mem::replace(&mut self.heads[list], NIL);
        self.clear_occupied(list);
        let mut firing = std::mem::take(&mut self.scratch);
        while index != NIL {
            let node = &self.nodes[index as usize];
            let (next, deadline) = (node.next, node.deadline);
            if deadline <= now {
                firing.push((deadline, index));
            } else {
                // Strictly later than `now`: lands in a lower level than a
                // slot starting at `now`, or back in overflow, never in the
                // list being walked (which `next` no longer depends on anyway).
                self.link(index, list_for(now, deadline));
            }
            index = next;
        }
        // Level slots hold a single firing deadline; the due and overflow lists
        // may hold many. A stable sort of sorted input is a linear scan.
        firing.sort_by_key(|&(deadline, _)| deadline);
        expired.reserve(firing.len());
        for &(_, index) in &firing {
            if let Some(fired) = self.release(index) {
                expired.push(fired);
            }
        }
        firing.clear();
        self.scratch = firing;
    }

    /// Pushes slab slot `index` at the front of list `list`.
    fn link(&mut self, index: u32, list: usize) {
        let head = self.heads[list];
        let node = &mut self.nodes[index as usize];
        node.prev = NIL;
        node.next = head;
        // `LISTS` is 386: fits.
        node.list = list as u16;
        let deadline = node.deadline;
        if head != NIL {
            self.nodes[head as usize].prev = index;
        }
        self.heads[list] = index;
        match list {
            DUE => {
                self.due_min = if head == NIL {
                    deadline
                } else {
                    self.due_min.min(deadline)
                }
            }
            OVERFLOW => {
                self.overflow_min = if head == NIL {
                    deadline
                } else {
                    self.overflow_min.min(deadline)
                }
            }
            _ => self.occupied[list / SLOTS] |= 1 << (list % SLOTS),
        }
    }

    /// Removes slab slot `index` from the list it is linked into.
    fn unlink(&mut self, index: u32) {
        let node = &self.nodes[index as usize];
        let (prev, next, list) = (node.prev, node.next, node.list as usize);
        if prev != NIL {
            self.nodes[prev as usize].next = next;
        } else {
            self.heads[list] = next;
        }
        if next != NIL {
            self.nodes[next as usize].prev = prev;
        }
        if self.heads[list] == NIL {
            self.clear_occupied(list);
        }
    }

    /// Clears the occupancy bit of `list` if it is a level slot.
    fn clear_occupied(&mut self, list: usize) {
        if list < DUE {
            self.occupied[list / SLOTS] &= !(1 << (list % SLOTS));
        }
    }

    /// Frees an (already unlinked) slab slot, making its key stale, and returns
    /// the key and value it held (`None` if it was vacant).
    fn release(&mut self, index: u32) -> Option<(TimerKey, T)> {
        let node = &mut self.nodes[index as usize];
        let value = node.value.take()?;
        let key = TimerKey {
            index,
            generation: node.generation,
        };
        node.generation = node.generation.wrapping_add(1);
        node.next = self.free_head;
        self.free_head = index;
        self.len -= 1;
        Some((key, value))
    }
}

impl<T> Default for Wheel<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> fmt::Debug for Wheel<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Wheel")
            .field("elapsed", &self.elapsed)
            .field("len", &self.len)
            .field("next_expiration", &self.next_expiration())
            .finish_non_exhaustive()
    }
}

/// Ticks spanned by one slot of `level`: 64^level.
fn slot_span(level: usize) -> u64 {
    1 << (SLOT_BITS as usize * level)
}

/// The tick at which the current rotation of `level` started.
fn level_start(elapsed: u64, level: usize) -> u64 {
    elapsed & !(slot_span(level + 1) - 1)
}

/// The list a timer with `deadline` belongs in when time is `elapsed`.
fn list_for(elapsed: u64, deadline: u64) -> usize {
    if deadline <= elapsed {
        return DUE;
    }
    let differing = elapsed ^ deadline;
    if differing >= SPAN {
        return OVERFLOW;
    }
    // The most significant differing bit picks the level: `deadline` shares
    // `elapsed`'s slots above it and is in a later slot at it, so the slot
    // lies strictly ahead within the level's current rotation.
    let level = ((63 - differing.leading_zeros()) / SLOT_BITS) as usize;
    let slot = ((deadline >> (SLOT_BITS as usize * level)) as usize) & (SLOTS - 1);
    level * SLOTS + slot
}

#[cfg(test)]
mod tests {
    use super::*;

    fn advance<T>(wheel: &mut Wheel<T>, now: u64) -> Vec<T> {
        let mut expired = Vec::new();
        wheel.advance(now, &mut expired);
        expired.into_iter().map(|(_, value)| value).collect()
    }

    #[test]
    fn new_wheel_is_empty() {
        let mut wheel: Wheel<()> = Wheel::default();
        assert_eq!(wheel.elapsed(), 0);
        assert!(wheel.is_empty());
        assert_eq!(wheel.next_expiration(), None);
        assert!(advance(&mut wheel, 1000).is_empty());
        assert_eq!(wheel.elapsed(), 1000);
    }

    #[test]
    fn fires_at_deadline_not_before() {
        let mut wheel = Wheel::new();
        wheel.insert(5, "a");
        assert_eq!(wheel.next_expiration(), Some(5));
        assert!(advance(&mut wheel, 4).is_empty());
        assert_eq!(advance(&mut wheel, 5), vec!["a"]);
        assert!(wheel.is_empty());
    }

    #[test]
    fn each_level_fires_exactly_at_deadline() {
        for level in 0..LEVELS {
            for deadline in [
                slot_span(level),
                slot_span(level) * 3 + 7,
                slot_span(level + 1) - 1,
            ] {
                let mut wheel = Wheel::new();
                wheel.insert(deadline, deadline);
                // Walk with next_expiration: never past the deadline, always progressing.
                let mut wakes = 0;
                let mut fired = Vec::new();
                while let Some(next) = wheel.next_expiration() {
                    assert!(next <= deadline && next > wheel.elapsed());
                    fired = advance(&mut wheel, next);
                    wakes += 1;
                }
                assert_eq!(fired, vec![deadline]);
                assert_eq!(wheel.elapsed(), deadline);
                assert!(wakes <= LEVELS, "{wakes} wakes for level {level}");
            }
        }
    }

    #[test]
    fn one_tick_before_never_fires() {
        let deadlines = [
            1,
            63,
            64,
            65,
            4095,
            4096,
            4097,
            SPAN - 1,
            SPAN,
            SPAN + 1,
            3 * SPAN + 5,
        ];
        for &deadline in &deadlines {
            let mut wheel = Wheel::new();
            wheel.insert(deadline, ());
            assert!(advance(&mut wheel, deadline - 1).is_empty(), "{deadline}");
            assert_eq!(advance(&mut wheel, deadline).len(), 1, "{deadline}");
        }
    }

    #[test]
    fn fires_in_deadline_order() {
        let mut wheel = Wheel::new();
        let deadlines = [
            900_000,
            3,
            64,
            4096,
            70,
            3,
            SPAN * 2,
            1,
            262_144,
            63,
            SPAN + 1,
        ];
        for &deadline in &deadlines {
            wheel.insert(deadline, deadline);
        }
        let fired = advance(&mut wheel, u64::MAX);
        let mut sorted = deadlines.to_vec();
        sorted.sort_unstable();
        assert_eq!(fired, sorted);
        assert_eq!(wheel.elapsed(), u64::MAX);
    }

    #[test]
    fn past_deadlines_fire_at_next_advance_in_order() {
        let mut wheel = Wheel::new();
        advance(&mut wheel, 100);
        wheel.insert(90, 90);
        wheel.insert(100, 100);
        wheel.insert(10, 10);
        wheel.insert(101, 101);
        assert_eq!(wheel.next_expiration(), Some(10));
        // Even an advance that does not move time fires due timers.
        assert_eq!(advance(&mut wheel, 50), vec![10, 90, 100]);
        assert_eq!(wheel.elapsed(), 100);
        assert_eq!(wheel.next_expiration(), Some(101));
        assert_eq!(advance(&mut wheel, 101), vec![101]);
    }

    #[test]
    fn cancel_and_stale_keys() {
        let mut wheel = Wheel::new();
        let a = wheel.insert(10, "a");
        let b = wheel.insert(10_000, "b");
        assert_eq!(wheel.deadline(a), Some(10));
        assert_eq!(wheel.len(), 2);
        assert_eq!(wheel.cancel(a), Some("a"));
        assert_eq!(wheel.cancel(a), None);
        assert_eq!(wheel.deadline(a), None);
        // The freed slot is reused, under a new generation.
        let c = wheel.insert(20, "c");
        assert_ne!(a, c);
        assert_eq!(wheel.cancel(a), None);
        assert_eq!(wheel.deadline(c), Some(20));
        let mut expired = Vec::new();
        wheel.advance(20, &mut expired);
        assert_eq!(expired, vec![(c, "c")]);
        assert_eq!(wheel.cancel(c), None);
        assert_eq!(wheel.cancel(b), Some("b"));
        assert!(wheel.is_empty());
        assert_eq!(wheel.next_expiration(), None);
    }

    #[test]
    fn cancel_clears_occupancy() {
        let mut wheel = Wheel::new();
        let a = wheel.insert(5, ());
        let b = wheel.insert(5, ());
        wheel.insert(200, ());
        wheel.cancel(a);
        assert_eq!(wheel.next_expiration(), Some(5));
        wheel.cancel(b);
        // Slot 5 is empty now; the next work is the level-1 slot holding 200.
        assert_eq!(wheel.next_expiration(), Some(192));
    }

    #[test]
    fn cancel_middle_of_slot_list() {
        let mut wheel = Wheel::new();
        let keys: Vec<_> = (0..5).map(|i| wheel.insert(7, i)).collect();
        assert_eq!(wheel.cancel(keys[2]), Some(2));
        assert_eq!(wheel.cancel(keys[0]), Some(0));
        assert_eq!(wheel.cancel(keys[4]), Some(4));
        let mut fired = advance(&mut wheel, 7);
        fired.sort_unstable();
        assert_eq!(fired, vec![1, 3]);
    }

    #[test]
    fn far_deadlines_fire_exactly() {
        let mut wheel = Wheel::new();
        advance(&mut wheel, 12_345);
        let far = [SPAN * 5 + 17, u64::MAX, u64::MAX - 1, 1 << 63];
        for &deadline in &far {
            wheel.insert(deadline, deadline);
        }
        assert!(wheel.next_expiration().is_some_and(|l| l <= SPAN * 5 + 17));
        assert!(advance(&mut wheel, SPAN * 5 + 16).is_empty());
        assert_eq!(advance(&mut wheel, SPAN * 5 + 17), vec![SPAN * 5 + 17]);
        assert!(advance(&mut wheel, (1 << 63) - 1).is_empty());
        assert_eq!(advance(&mut wheel, 1 << 63), vec![1 << 63]);
        assert!(advance(&mut wheel, u64::MAX - 2).is_empty());
        assert_eq!(advance(&mut wheel, u64::MAX), vec![u64::MAX - 1, u64::MAX]);
    }

    #[test]
    fn far_deadline_reached_by_next_expiration_in_few_wakes() {
        let mut wheel = Wheel::new();
        wheel.insert(u64::MAX, ());
        let mut wakes = 0;
        while let Some(next) = wheel.next_expiration() {
            assert!(next > wheel.elapsed());
            advance(&mut wheel, next);
            wakes += 1;
        }
        assert_eq!(wheel.elapsed(), u64::MAX);
        assert!(wakes <= LEVELS + 1, "{wakes} wakes");
    }

    #[test]
    fn at_end_of_time() {
        let mut wheel = Wheel::new();
        advance(&mut wheel, u64::MAX);
        let key = wheel.insert(u64::MAX, 1);
        wheel.insert(0, 0);
        assert_eq!(wheel.next_expiration(), Some(0));
        assert_eq!(advance(&mut wheel, u64::MAX), vec![0, 1]);
        assert_eq!(wheel.cancel(key), None);
    }

    #[test]
    fn insert_during_rotation_boundaries() {
        // Start just before a top-level rotation ends: a short timer crosses it.
        let mut wheel = Wheel::new();
        advance(&mut wheel, SPAN - 2);
        wheel.insert(SPAN + 3, "across");
        wheel.insert(SPAN - 1, "before");
        assert_eq!(advance(&mut wheel, SPAN + 2), vec!["before"]);
        assert_eq!(advance(&mut wheel, SPAN + 3), vec!["across"]);
    }

    #[test]
    fn list_for_places_ahead_of_time() {
        assert_eq!(list_for(0, 0), DUE);
        assert_eq!(list_for(10, 3), DUE);
        assert_eq!(list_for(0, 1), 1);
        assert_eq!(list_for(0, 64), SLOTS + 1);
        assert_eq!(list_for(63, 64), SLOTS + 1);
        assert_eq!(list_for(0, SPAN - 1), 5 * SLOTS + 63);
        assert_eq!(list_for(0, SPAN), OVERFLOW);
        assert_eq!(list_for(SPAN - 1, SPAN), OVERFLOW);
    }
}
