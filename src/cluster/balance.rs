//! Load balancing: which healthy provider takes the next call.
//!
//! A [`LoadBalancer`] is pure: it sees the healthy providers as
//! [`Candidate`]s (address, weight, calls in flight, smoothed RTT) and
//! returns an index, with no socket and no clock, so every strategy is
//! unit-tested on made-up candidates. State a strategy keeps (a counter, the
//! smooth weighted round robin's current weights, a hash ring) lives inside
//! it behind a lock or an atomic.
//!
//! | strategy | promise |
//! |---|---|
//! | [`Random`] | uniform |
//! | [`WeightedRandom`] | proportional to weight |
//! | [`RoundRobin`] | each in turn |
//! | [`SmoothWeightedRoundRobin`] | proportional to weight, interleaved (nginx) |
//! | [`ConsistentHash`] | the same key goes to the same provider while it is healthy |
//! | [`LeastInflight`] | the fewest calls waiting, ties at random |
//! | [`LowestRtt`] | the lowest heartbeat RTT, near-ties at random |

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

use super::registry::DEFAULT_WEIGHT;

/// One healthy provider, as a balancer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// The provider's address.
    pub addr: SocketAddr,
    /// Its weight from the registry.
    pub weight: u32,
    /// Calls waiting for a response on its connection.
    pub inflight: usize,
    /// Smoothed heartbeat round-trip time, once measured.
    pub rtt: Option<Duration>,
}

/// Chooses a provider for each call.
///
/// `pick` gets the healthy providers (never an empty slice), in the
/// registry's order, and the caller's hash key if the call has one. An index
/// out of range is clamped to the last candidate.
pub trait LoadBalancer: Send + Sync + 'static {
    /// The index of the chosen candidate.
    fn pick(&self, candidates: &[Candidate], key: Option<&[u8]>) -> usize;

    /// A short name for logs, e.g. `round_robin`.
    fn name(&self) -> &'static str;
}

/// A boxed balancer (e.g. one chosen at run time) is a balancer.
impl LoadBalancer for Box<dyn LoadBalancer> {
    fn pick(&self, candidates: &[Candidate], key: Option<&[u8]>) -> usize {
        (**self).pick(candidates, key)
    }

    fn name(&self) -> &'static str {
        (**self).name()
    }
}

/// SplitMix64: a tiny, fast, well-mixed PRNG (Steele, Lea and Flood, 2014),
/// lock-free here (its state is a counter advanced atomically). Good for
/// spreading load; not for secrets.
pub struct SplitMix64 {
    state: AtomicU64,
}

impl SplitMix64 {
    const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

    /// A generator with a fixed seed (reproducible sequences).
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64 {
            state: AtomicU64::new(seed),
        }
    }

    /// A generator seeded from the clock and a process-wide counter.
    pub fn from_entropy() -> SplitMix64 {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        SplitMix64::new(mix64(
            nanos ^ n.wrapping_mul(Self::GAMMA) ^ u64::from(std::process::id()),
        ))
    }

    /// The next 64 random bits.
    pub fn next_u64(&self) -> u64 {
        let z = self
            .state
            .fetch_add(Self::GAMMA, Ordering::Relaxed)
            .wrapping_add(Self::GAMMA);
        mix64(z)
    }

    /// A uniform number in `0..n` (`n > 0`), by Lemire's multiply-shift.
    pub fn below(&self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

impl fmt::Debug for SplitMix64 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SplitMix64")
    }
}

/// SplitMix64's output function: a strong 64-bit finaliser.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A stable 64-bit hash (FNV-1a, then mixed): the same in every process and
/// release, so consumers agree on a consistent-hash ring.
pub fn hash64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    mix64(h)
}

fn pick_weighted(rng: &SplitMix64, candidates: &[Candidate]) -> usize {
    let total: u64 = candidates.iter().map(|c| u64::from(c.weight)).sum();
    if total == 0 {
        return rng.below(candidates.len() as u64) as usize;
    }
    let mut r = rng.below(total);
    for (i, c) in candidates.iter().enumerate() {
        let w = u64::from(c.weight);
        if r < w {
            return i;
        }
        r -= w;
    }
    candidates.len() - 1
}

/// Uniformly at random.
#[derive(Debug)]
pub struct Random {
    rng: SplitMix64,
}

impl Random {
    /// Seeded from the clock.
    pub fn new() -> Random {
        Random {
            rng: SplitMix64::from_entropy(),
        }
    }

    /// With a fixed seed.
    pub fn with_seed(seed: u64) -> Random {
        Random {
            rng: SplitMix64::new(seed),
        }
    }
}

impl Default for Random {
    fn default() -> Random {
        Random::new()
    }
}

impl LoadBalancer for Random {
    fn pick(&self, candidates: &[Candidate], _key: Option<&[u8]>) -> usize {
        self.rng.below(candidates.len() as u64) as usize
    }

    fn name(&self) -> &'static str {
        "random"
    }
}

/// At random, in proportion to weight (all weights 0: uniform).
#[derive(Debug)]
pub struct WeightedRandom {
    rng: SplitMix64,
}

impl WeightedRandom {
    /// Seeded from the clock.
    pub fn new() -> WeightedRandom {
        WeightedRandom {
            rng: SplitMix64::from_entropy(),
        }
    }

    /// With a fixed seed.
    pub fn with_seed(seed: u64) -> WeightedRandom {
        WeightedRandom {
            rng: SplitMix64::new(seed),
        }
    }
}

impl Default for WeightedRandom {
    fn default() -> WeightedRandom {
        WeightedRandom::new()
    }
}

impl LoadBalancer for WeightedRandom {
    fn pick(&self, candidates: &[Candidate], _key: Option<&[u8]>) -> usize {
        pick_weighted(&self.rng, candidates)
    }

    fn name(&self) -> &'static str {
        "weighted_random"
    }
}

/// Each healthy provider in turn (a shared counter modulo their number).
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl RoundRobin {
    /// Starting with the first provider.
    pub fn new() -> RoundRobin {
        RoundRobin::default()
    }
}

impl LoadBalancer for RoundRobin {
    fn pick(&self, candidates: &[Candidate], _key: Option<&[u8]>) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % candidates.len()
    }

    fn name(&self) -> &'static str {
        "round_robin"
    }
}

/// nginx's smooth weighted round robin: over any window of
/// `sum(weights)` picks each provider is chosen exactly `weight` times, and
/// picks of a heavy provider are spread out rather than bunched (weights
/// 5, 1, 1 give `a a b a c a a`).
///
/// Each pick adds every candidate's weight to its current weight, chooses
/// the largest current weight (the first on ties) and subtracts the total
/// from it, so the current weights always sum to zero. When the candidates
/// change (one leaves or joins the healthy set, a weight changes) every
/// current weight starts again from zero: kept, the stayers' weights would
/// no longer sum to zero and the shares would drift until they did.
///
/// A weight-0 provider is never picked while one with a positive weight is
/// a candidate; when all weights are 0 each counts as 1 (plain turns), as
/// [`WeightedRandom`] is uniform then.
#[derive(Debug, Default)]
pub struct SmoothWeightedRoundRobin {
    state: Mutex<Smooth>,
}

#[derive(Debug, Default)]
struct Smooth {
    /// The candidates the current weights belong to, with their weights.
    members: Vec<(SocketAddr, u32)>,
    /// Current weights, one per member.
    current: Vec<i64>,
}

impl SmoothWeightedRoundRobin {
    /// With every current weight at zero.
    pub fn new() -> SmoothWeightedRoundRobin {
        SmoothWeightedRoundRobin::default()
    }
}

/// Whether `members` (address, weight) are `candidates`, in the same order:
/// a balancer with state per member rebuilds it when they are not.
fn same_members(members: &[(SocketAddr, u32)], candidates: &[Candidate]) -> bool {
    members.len() == candidates.len()
        && members
            .iter()
            .zip(candidates)
            .all(|((a, w), c)| *a == c.addr && *w == c.weight)
}

impl LoadBalancer for SmoothWeightedRoundRobin {
    fn pick(&self, candidates: &[Candidate], _key: Option<&[u8]>) -> usize {
        let mut state = self.state.lock();
        if !same_members(&state.members, candidates) {
            state.members = candidates.iter().map(|c| (c.addr, c.weight)).collect();
            state.current = vec![0; candidates.len()];
        }
        let all_zero = candidates.iter().all(|c| c.weight == 0);
        let weight = |c: &Candidate| if all_zero { 1 } else { i64::from(c.weight) };
        let total: i64 = candidates.iter().map(weight).sum();
        let mut best = None;
        for (i, c) in candidates.iter().enumerate() {
            let w = weight(c);
            // A weight-0 candidate is skipped: its current weight never
            // grows, but it could tie or lead with the others' negative.
            if w == 0 {
                continue;
            }
            state.current[i] += w;
            if best.is_none_or(|b: usize| state.current[i] > state.current[b]) {
                best = Some(i);
            }
        }
        // Some: `candidates` is not empty (the trait's contract), and with
        // all weights 0 each counts as 1.
        let best = best.unwrap_or(0);
        state.current[best] -= total;
        best
    }

    fn name(&self) -> &'static str {
        "smooth_weighted_round_robin"
    }
}

/// Consistent hashing on the caller's key (ketama style): each provider
/// owns points on a 64-bit ring, and a key goes to the owner of the first
/// point at or after its hash. The same key reaches the same provider while
/// the healthy set is unchanged; when a provider leaves, only its keys move
/// (to the next point's owners), and when one joins, only keys it takes.
///
/// That holds because a provider's points depend on nothing but its address
/// and its own weight: `replicas × weight / 100` of them (rounded up), on
/// Dubbo's weight scale where [`DEFAULT_WEIGHT`] 100
/// is one provider's share. Weights above [`Self::MAX_WEIGHT`] count as that
/// (the ring stays bounded: at most `replicas × 10` points per provider);
/// weight 0 gets no point while another provider has some (all 0: each gets
/// `replicas`). Small weights give few points and so coarse shares: weights
/// 1 and 3 get 2 and 5 points with the default replicas. Use weights around
/// 100 (or raise `replicas`) for this balancer.
///
/// A call without a key goes to a random provider.
#[derive(Debug)]
pub struct ConsistentHash {
    replicas: u32,
    ring: Mutex<Ring>,
    rng: SplitMix64,
}

#[derive(Debug, Default)]
struct Ring {
    /// The candidates the ring was built for.
    members: Vec<(SocketAddr, u32)>,
    /// Sorted points and the address owning each.
    points: Vec<(u64, SocketAddr)>,
}

impl ConsistentHash {
    /// Virtual nodes per provider of weight 100, as in ketama.
    pub const DEFAULT_REPLICAS: u32 = 160;

    /// Weights above this count as this: 10 × the default weight, so a
    /// provider has at most `10 × replicas` points.
    pub const MAX_WEIGHT: u32 = 10 * DEFAULT_WEIGHT;

    /// With [`Self::DEFAULT_REPLICAS`] virtual nodes.
    pub fn new() -> ConsistentHash {
        ConsistentHash::with_replicas(Self::DEFAULT_REPLICAS)
    }

    /// With `replicas` virtual nodes per provider of weight 100 (at least
    /// 1).
    pub fn with_replicas(replicas: u32) -> ConsistentHash {
        ConsistentHash {
            replicas: replicas.max(1),
            ring: Mutex::new(Ring::default()),
            rng: SplitMix64::from_entropy(),
        }
    }

    /// The points of a provider of `weight` (see the type's doc): a
    /// function of its own weight only, so that no other provider's arrival
    /// or departure moves its points.
    fn points_of(&self, weight: u32) -> u64 {
        let weight = u64::from(weight.min(Self::MAX_WEIGHT));
        (u64::from(self.replicas) * weight).div_ceil(u64::from(DEFAULT_WEIGHT))
    }

    fn build(&self, members: Vec<(SocketAddr, u32)>) -> Ring {
        let all_zero = members.iter().all(|(_, w)| *w == 0);
        let mut points = Vec::new();
        for (addr, weight) in &members {
            let count = if all_zero {
                u64::from(self.replicas)
            } else {
                self.points_of(*weight)
            };
            for i in 0..count {
                points.push((hash64(format!("{addr}-{i}").as_bytes()), *addr));
            }
        }
        points.sort_unstable();
        Ring { members, points }
    }
}

impl Default for ConsistentHash {
    fn default() -> ConsistentHash {
        ConsistentHash::new()
    }
}

impl LoadBalancer for ConsistentHash {
    fn pick(&self, candidates: &[Candidate], key: Option<&[u8]>) -> usize {
        let Some(key) = key else {
            return self.rng.below(candidates.len() as u64) as usize;
        };
        let mut ring = self.ring.lock();
        if !same_members(&ring.members, candidates) {
            *ring = self.build(candidates.iter().map(|c| (c.addr, c.weight)).collect());
        }
        if ring.points.is_empty() {
            return 0;
        }
        let h = hash64(key);
        let at = ring.points.partition_point(|(p, _)| *p < h);
        let owner = ring.points[at % ring.points.len()].1;
        candidates.iter().position(|c| c.addr == owner).unwrap_or(0)
    }

    fn name(&self) -> &'static str {
        "consistent_hash"
    }
}

/// The provider with the fewest calls waiting for a response (ties at
/// random), so a slow provider takes less.
#[derive(Debug)]
pub struct LeastInflight {
    rng: SplitMix64,
}

impl LeastInflight {
    /// Seeded from the clock.
    pub fn new() -> LeastInflight {
        LeastInflight {
            rng: SplitMix64::from_entropy(),
        }
    }
}

impl Default for LeastInflight {
    fn default() -> LeastInflight {
        LeastInflight::new()
    }
}

/// A random index among those where `keep` holds (one exists).
fn random_among(
    rng: &SplitMix64,
    candidates: &[Candidate],
    keep: impl Fn(&Candidate) -> bool,
) -> usize {
    let count = candidates.iter().filter(|c| keep(c)).count().max(1);
    let nth = rng.below(count as u64) as usize;
    candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| keep(c))
        .nth(nth)
        .map_or(0, |(i, _)| i)
}

impl LoadBalancer for LeastInflight {
    fn pick(&self, candidates: &[Candidate], _key: Option<&[u8]>) -> usize {
        let least = candidates.iter().map(|c| c.inflight).min().unwrap_or(0);
        random_among(&self.rng, candidates, |c| c.inflight == least)
    }

    fn name(&self) -> &'static str {
        "least_inflight"
    }
}

/// The provider with the lowest smoothed heartbeat RTT — something the
/// Java systems pulse learns from do not measure. Providers within `slack`
/// of the lowest count as tied and share the load at random; one not
/// measured yet counts as tied, so it gets probed.
#[derive(Debug)]
pub struct LowestRtt {
    slack: Duration,
    rng: SplitMix64,
}

impl LowestRtt {
    /// Default slack: 1 ms, far above loopback noise, far below a real hop.
    pub const DEFAULT_SLACK: Duration = Duration::from_millis(1);

    /// With [`Self::DEFAULT_SLACK`].
    pub fn new() -> LowestRtt {
        LowestRtt::with_slack(Self::DEFAULT_SLACK)
    }

    /// Providers within `slack` of the lowest RTT share the load.
    pub fn with_slack(slack: Duration) -> LowestRtt {
        LowestRtt {
            slack,
            rng: SplitMix64::from_entropy(),
        }
    }
}

impl Default for LowestRtt {
    fn default() -> LowestRtt {
        LowestRtt::new()
    }
}

impl LoadBalancer for LowestRtt {
    fn pick(&self, candidates: &[Candidate], _key: Option<&[u8]>) -> usize {
        let lowest = candidates.iter().filter_map(|c| c.rtt).min();
        let Some(lowest) = lowest else {
            return self.rng.below(candidates.len() as u64) as usize;
        };
        // Saturating: any slack is accepted, `Duration::MAX` (share among
        // all) included, and `+` panics past the largest `Duration`.
        let bound = lowest.saturating_add(self.slack);
        random_among(&self.rng, candidates, |c| c.rtt.is_none_or(|r| r <= bound))
    }

    fn name(&self) -> &'static str {
        "lowest_rtt"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands(weights: &[u32]) -> Vec<Candidate> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| Candidate {
                addr: SocketAddr::from(([127, 0, 0, 1], 7000 + i as u16)),
                weight,
                inflight: 0,
                rtt: None,
            })
            .collect()
    }

    fn counts(lb: &dyn LoadBalancer, c: &[Candidate], n: usize) -> Vec<usize> {
        let mut out = vec![0; c.len()];
        for _ in 0..n {
            out[lb.pick(c, None)] += 1;
        }
        out
    }

    #[test]
    fn splitmix_is_uniform_enough() {
        let rng = SplitMix64::new(42);
        let mut buckets = [0u32; 10];
        for _ in 0..100_000 {
            buckets[rng.below(10) as usize] += 1;
        }
        for b in buckets {
            assert!((9_000..11_000).contains(&b), "{buckets:?}");
        }
        // The reference sequence for seed 0 (from the paper's C code).
        assert_eq!(SplitMix64::new(0).next_u64(), 0xE220_A839_7B1D_CDAF);
    }

    #[test]
    fn random_and_weighted_random_follow_their_weights() {
        let c = cands(&[1, 1, 1]);
        for n in counts(&Random::with_seed(1), &c, 30_000) {
            assert!((9_000..11_000).contains(&n));
        }
        let c = cands(&[1, 2, 7]);
        let got = counts(&WeightedRandom::with_seed(2), &c, 100_000);
        for (n, want) in got.iter().zip([10_000, 20_000, 70_000]) {
            assert!(n.abs_diff(want) < 1_500, "{got:?}");
        }
        let got = counts(&WeightedRandom::with_seed(3), &cands(&[0, 5]), 1000);
        assert_eq!(got, [0, 1000]);
        let got = counts(&WeightedRandom::with_seed(3), &cands(&[0, 0]), 1000);
        assert!(got[0] > 400 && got[1] > 400);
    }

    #[test]
    fn round_robin_takes_turns() {
        let lb = RoundRobin::new();
        let c = cands(&[1, 1, 1]);
        let picks: Vec<usize> = (0..6).map(|_| lb.pick(&c, None)).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn smooth_wrr_matches_nginx() {
        let lb = SmoothWeightedRoundRobin::new();
        let c = cands(&[5, 1, 1]);
        let picks: String = (0..14)
            .map(|_| (b'a' + lb.pick(&c, None) as u8) as char)
            .collect();
        assert_eq!(picks, "aabacaaaabacaa");
        // Weights 3, 2: interleaved, 3 to 2 over each window of 5.
        let lb = SmoothWeightedRoundRobin::new();
        let c = cands(&[3, 2]);
        let picks: Vec<usize> = (0..5).map(|_| lb.pick(&c, None)).collect();
        assert_eq!(picks, [0, 1, 0, 1, 0]);
        // A change of the candidates starts every current weight from zero.
        let lb = SmoothWeightedRoundRobin::new();
        let all = cands(&[1, 1]);
        lb.pick(&all, None);
        lb.pick(&all[1..], None);
        assert_eq!(lb.state.lock().current, [0]);
    }

    /// After churn, a weight-0 provider still gets nothing, and the others
    /// get exactly their weights over the next `sum(weights)` picks.
    #[test]
    fn smooth_wrr_never_picks_a_weight_zero_provider_after_churn() {
        let lb = SmoothWeightedRoundRobin::new();
        let c = cands(&[0, 1, 1]);
        assert_eq!(lb.pick(&c, None), 1);
        let without_last = [c[0], c[1]];
        let picks: Vec<usize> = (0..10).map(|_| lb.pick(&without_last, None)).collect();
        assert!(!picks.contains(&0), "weight 0 got calls: {picks:?}");

        // Weights 5, 0, 2, 3: one leaves mid-cycle, the rest share exactly.
        let c = cands(&[5, 0, 2, 3]);
        for _ in 0..4 {
            lb.pick(&c, None);
        }
        let stay = [c[0], c[1], c[3]];
        let got = counts(&lb, &stay, 8);
        assert_eq!(got, [5, 0, 3]);

        // A provider whose weight drops to 0 in place gets nothing more.
        let mut c = cands(&[1, 1, 1]);
        lb.pick(&c, None);
        c[0].weight = 0;
        assert_eq!(counts(&lb, &c, 10)[0], 0);

        // All weights 0: plain turns.
        let picks: Vec<usize> = (0..6).map(|_| lb.pick(&cands(&[0, 0, 0]), None)).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn consistent_hash_is_sticky_and_moves_only_the_lost_keys() {
        let lb = ConsistentHash::new();
        let c = cands(&[100, 100, 100, 100]);
        let owner = |c: &[Candidate], k: u32| c[lb.pick(c, Some(&k.to_be_bytes()))].addr;
        let before: Vec<SocketAddr> = (0..2000).map(|k| owner(&c, k)).collect();
        for (k, a) in before.iter().enumerate().take(100) {
            assert_eq!(owner(&c, k as u32), *a);
        }
        for m in &c {
            let share = before.iter().filter(|a| **a == m.addr).count();
            assert!((300..700).contains(&share), "{share} of 2000 keys");
        }
        let without_2: Vec<Candidate> = c.iter().copied().filter(|m| m.addr != c[2].addr).collect();
        for (k, a) in before.iter().enumerate() {
            let now = owner(&without_2, k as u32);
            if *a != c[2].addr {
                assert_eq!(now, *a, "key {k} moved though its owner stayed");
            }
        }
        // Weights shape the shares.
        let c = cands(&[100, 300]);
        let heavy = (0..4000u32)
            .filter(|k| lb.pick(&c, Some(&k.to_be_bytes())) == 1)
            .count();
        assert!((2600..3400).contains(&heavy), "{heavy}");
    }

    /// With unequal weights too, a provider that leaves takes only its own
    /// keys along, and one that joins takes keys only for itself.
    #[test]
    fn consistent_hash_moves_only_the_lost_keys_with_unequal_weights() {
        let lb = ConsistentHash::new();
        let c = cands(&[100, 300, 100]);
        let owner = |c: &[Candidate], k: u32| c[lb.pick(c, Some(&k.to_be_bytes()))].addr;
        let before: Vec<SocketAddr> = (0..4000).map(|k| owner(&c, k)).collect();
        let without_2 = [c[0], c[1]];
        let moved = before
            .iter()
            .enumerate()
            .filter(|(k, a)| **a != c[2].addr && owner(&without_2, *k as u32) != **a)
            .count();
        assert_eq!(moved, 0, "{moved} keys moved though their owner stayed");
        // Back: every key returns to where it was.
        let after: Vec<SocketAddr> = (0..4000).map(|k| owner(&c, k)).collect();
        assert_eq!(after, before);
    }

    /// A provider's points follow its own weight, up to the cap; weight 0
    /// has none while another provider has some.
    #[test]
    fn consistent_hash_points_follow_each_weight_up_to_the_cap() {
        let lb = ConsistentHash::new();
        let ring_size = |weights: &[u32]| {
            lb.pick(&cands(weights), Some(b"k"));
            lb.ring.lock().points.len()
        };
        assert_eq!(ring_size(&[100]), 160);
        assert_eq!(ring_size(&[100, 50, 1, 0]), 160 + 80 + 2);
        assert_eq!(ring_size(&[u32::MAX, 1000]), 2 * 1600);
        assert_eq!(ring_size(&[0, 0]), 2 * 160);
        let c = cands(&[0, 100]);
        assert!((0..200u32).all(|k| lb.pick(&c, Some(&k.to_be_bytes())) == 1));
    }

    #[test]
    fn least_inflight_and_lowest_rtt_prefer_the_quick() {
        let mut c = cands(&[1, 1, 1]);
        c[0].inflight = 4;
        c[1].inflight = 1;
        c[2].inflight = 1;
        let got = counts(&LeastInflight::new(), &c, 1000);
        assert_eq!(got[0], 0);
        assert!(got[1] > 350 && got[2] > 350, "{got:?}");

        c[0].rtt = Some(Duration::from_millis(20));
        c[1].rtt = Some(Duration::from_micros(80));
        c[2].rtt = Some(Duration::from_micros(95));
        let got = counts(&LowestRtt::new(), &c, 1000);
        assert_eq!(got[0], 0);
        assert!(got[1] > 350 && got[2] > 350, "{got:?}");
        c[2].rtt = Some(Duration::from_millis(5));
        assert_eq!(counts(&LowestRtt::new(), &c, 100), [0, 100, 0]);
        c[2].rtt = None;
        let got = counts(&LowestRtt::new(), &c, 1000);
        assert!(
            got[0] == 0 && got[2] > 350,
            "an unmeasured provider is probed: {got:?}"
        );
    }

    /// A slack of `Duration::MAX` shares the load among every measured
    /// provider. It used to overflow and panic the calling thread (an
    /// outside audit: a `ClusterClient` call panicked once RTTs were
    /// measured).
    #[test]
    fn lowest_rtt_takes_any_slack() {
        let mut c = cands(&[1, 1]);
        c[0].rtt = Some(Duration::from_micros(50));
        c[1].rtt = Some(Duration::from_millis(80));
        let got = counts(&LowestRtt::with_slack(Duration::MAX), &c, 1000);
        assert!(got[0] > 350 && got[1] > 350, "{got:?}");
    }
}
