//! Low resources simulation, after Driver Verifier's option of that name: allocations fail
//! on purpose, as on a machine short of memory, so that a driver's failure paths run.
//!
//! Driver Verifier fails a random fraction (6% by default) of a verified driver's
//! allocations (`ExAllocatePoolWithXXX`, `MmAllocateContiguousMemory`, ... ), optionally only
//! those with given pool tags, after a delay; docs/wdf-behaviour-sources.md ("Low resources
//! simulation") has the source and what the model does differently. Here the simulation is
//! set per thread, like the verifier's [mode](super::VerifierMode), with a seed, so a run
//! is reproducible:
//!
//! - [`Plan::Random`]: each eligible allocation fails with a probability, drawn from a
//!   generator seeded by the caller;
//! - [`Plan::Sequence`]: exactly the listed eligible allocations fail (1 = the first after
//!   the simulation was set).
//!
//! Eligible: pool allocations (`ExAllocatePoolWithTag`, `WdfMemoryCreate`: the pool
//! tracker), lookaside allocations (`WdfMemoryCreateFromLookaside` and every other
//! `Lookaside::allocate`, whether or not the list holds a free buffer) and common buffers
//! (`AllocateDomainCommonBuffer` and every other `Adapter::allocate_common_buffer`), each
//! kind on or off, and for pool and lookaside optionally only some tags. A failed
//! allocation fails as an exhausted pool or device would: NULL, or
//! `STATUS_INSUFFICIENT_RESOURCES`.
//!
//! With no simulation set on any thread, an allocation pays one relaxed atomic load.

use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::pool::PoolTag;

/// Which allocations fail.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Each eligible allocation fails with `probability` (0.0 to 1.0; Driver Verifier's
    /// default is 0.06), from a generator seeded with `seed`.
    Random {
        /// Chance that an eligible allocation fails.
        probability: f64,
        /// Seed of the draws: the same seed and the same allocations give the same
        /// failures.
        seed: u64,
    },
    /// Exactly these eligible allocations fail, counted from 1 when the simulation was set.
    Sequence(Vec<u64>),
}

/// A low resources simulation.
#[derive(Debug, Clone, PartialEq)]
pub struct LowResources {
    /// Which eligible allocations fail.
    pub plan: Plan,
    /// Pool allocations are eligible.
    pub pool: bool,
    /// Lookaside allocations are eligible.
    pub lookaside: bool,
    /// Common-buffer allocations are eligible.
    pub common_buffer: bool,
    /// Only pool and lookaside allocations with these tags are eligible (empty: all), as
    /// Driver Verifier's "pool tags affected" setting.
    pub tags: Vec<PoolTag>,
}

impl LowResources {
    /// Every kind eligible, failing with `probability`, seeded with `seed`.
    pub fn random(probability: f64, seed: u64) -> Self {
        Self {
            plan: Plan::Random { probability, seed },
            pool: true,
            lookaside: true,
            common_buffer: true,
            tags: Vec::new(),
        }
    }

    /// Every kind eligible, failing the listed allocations.
    pub fn sequence(failing: impl Into<Vec<u64>>) -> Self {
        Self {
            plan: Plan::Sequence(failing.into()),
            pool: true,
            lookaside: true,
            common_buffer: true,
            tags: Vec::new(),
        }
    }
}

/// An allocation the simulation may fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocation {
    /// From the pool, with this tag.
    Pool(PoolTag),
    /// From a lookaside list whose buffers have this tag.
    Lookaside(PoolTag),
    /// A common buffer.
    CommonBuffer,
}

/// What the simulation did on this thread since it was set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    /// Eligible allocations (pool, lookaside, common buffer).
    pub eligible: [u64; 3],
    /// Of those, the ones failed.
    pub failed: [u64; 3],
}

impl Counts {
    /// Index of `a`'s kind in the arrays: pool 0, lookaside 1, common buffer 2.
    pub fn index(a: Allocation) -> usize {
        match a {
            Allocation::Pool(_) => 0,
            Allocation::Lookaside(_) => 1,
            Allocation::CommonBuffer => 2,
        }
    }

    /// Failed allocations of every kind.
    pub fn total_failed(&self) -> u64 {
        self.failed.iter().sum()
    }
}

struct State {
    sim: LowResources,
    rng: u64,
    seen: u64,
    counts: Counts,
}

/// Threads with a simulation set.
static ACTIVE: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
}

/// Sets (or, with None, clears) the calling thread's simulation; returns the counts of the
/// one it replaces.
pub fn set(sim: Option<LowResources>) -> Counts {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        let old = s.take();
        let new = sim.map(|sim| State {
            rng: match sim.plan {
                Plan::Random { seed, .. } => seed,
                Plan::Sequence(_) => 0,
            },
            sim,
            seen: 0,
            counts: Counts::default(),
        });
        match (old.is_some(), new.is_some()) {
            (false, true) => {
                ACTIVE.fetch_add(1, Ordering::Relaxed);
            }
            (true, false) => {
                ACTIVE.fetch_sub(1, Ordering::Relaxed);
            }
            _ => {}
        }
        *s = new;
        old.map(|o| o.counts).unwrap_or_default()
    })
}

/// The calling thread's counts so far.
pub fn counts() -> Counts {
    STATE.with(|s| s.borrow().as_ref().map(|s| s.counts).unwrap_or_default())
}

/// Runs `f` with `sim` set on this thread; returns its result and the counts.
pub fn with<R>(sim: LowResources, f: impl FnOnce() -> R) -> (R, Counts) {
    let before = STATE.with(|s| s.borrow_mut().take());
    if before.is_some() {
        ACTIVE.fetch_sub(1, Ordering::Relaxed);
    }
    set(Some(sim));
    struct Restore(Option<State>);
    impl Drop for Restore {
        fn drop(&mut self) {
            set(None);
            if let Some(s) = self.0.take() {
                ACTIVE.fetch_add(1, Ordering::Relaxed);
                STATE.with(|cur| *cur.borrow_mut() = Some(s));
            }
        }
    }
    let restore = Restore(before);
    let r = f();
    let c = counts();
    drop(restore);
    (r, c)
}

/// splitmix64: a small, well-mixed generator (the draws need no more).
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Whether the simulation fails allocation `a` (counted). False, at the cost of one
/// relaxed load, when no thread has a simulation set.
#[inline]
pub fn fails(a: Allocation) -> bool {
    if ACTIVE.load(Ordering::Relaxed) == 0 {
        return false;
    }
    fails_slow(a)
}

#[cold]
fn fails_slow(a: Allocation) -> bool {
    STATE.with(|s| {
        let Ok(mut s) = s.try_borrow_mut() else {
            return false;
        };
        let Some(st) = s.as_mut() else {
            return false;
        };
        let sim = &st.sim;
        let (kind_on, tag) = match a {
            Allocation::Pool(t) => (sim.pool, Some(t)),
            Allocation::Lookaside(t) => (sim.lookaside, Some(t)),
            Allocation::CommonBuffer => (sim.common_buffer, None),
        };
        let tag_ok = match tag {
            Some(t) => sim.tags.is_empty() || sim.tags.contains(&t),
            None => true,
        };
        if !kind_on || !tag_ok {
            return false;
        }
        st.seen += 1;
        let fail = match &sim.plan {
            Plan::Random { probability, .. } => {
                let draw = next(&mut st.rng);
                (draw as f64 / u64::MAX as f64) < *probability
            }
            Plan::Sequence(list) => list.contains(&st.seen),
        };
        let i = Counts::index(a);
        st.counts.eligible[i] += 1;
        if fail {
            st.counts.failed[i] += 1;
            tracing::debug!(target: "verifier", ?a, n = st.seen, "low resources simulation: allocation failed");
        }
        fail
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: PoolTag = PoolTag(u32::from_le_bytes(*b"Test"));

    #[test]
    fn nothing_fails_without_a_simulation() {
        set(None);
        assert!((0..1000).all(|_| !fails(Allocation::Pool(T))));
    }

    #[test]
    fn a_sequence_fails_exactly_the_listed_allocations() {
        let (got, counts) = with(LowResources::sequence([2, 3, 7]), || {
            (1..=8)
                .map(|_| fails(Allocation::Lookaside(T)))
                .collect::<Vec<_>>()
        });
        let want = [false, true, true, false, false, false, true, false];
        assert_eq!(got, want);
        assert_eq!(counts.eligible[1], 8);
        assert_eq!(counts.failed[1], 3);
        assert!(!fails(Allocation::Lookaside(T)), "cleared after `with`");
    }

    #[test]
    fn random_failures_follow_the_seed_and_the_probability() {
        let run = |seed| {
            with(LowResources::random(0.25, seed), || {
                (0..4000)
                    .map(|_| fails(Allocation::CommonBuffer))
                    .collect::<Vec<_>>()
            })
        };
        let (a, ca) = run(7);
        let (b, _) = run(7);
        let (c, _) = run(8);
        assert_eq!(a, b, "same seed, same failures");
        assert_ne!(a, c, "another seed, other failures");
        let rate = ca.failed[2] as f64 / 4000.0;
        assert!((0.2..0.3).contains(&rate), "rate {rate}");
    }

    #[test]
    fn kinds_and_tags_that_are_off_never_fail_nor_count() {
        let other = PoolTag(u32::from_le_bytes(*b"Othr"));
        let sim = LowResources {
            tags: vec![T],
            common_buffer: false,
            ..LowResources::random(1.0, 1)
        };
        let ((), c) = with(sim, || {
            assert!(fails(Allocation::Pool(T)));
            assert!(!fails(Allocation::Pool(other)), "tag not listed");
            assert!(!fails(Allocation::CommonBuffer), "kind off");
        });
        assert_eq!(c.eligible, [1, 0, 0]);
        assert_eq!(c.failed, [1, 0, 0]);
    }

    #[test]
    fn other_threads_are_not_affected() {
        let ((), _) = with(LowResources::random(1.0, 1), || {
            assert!(fails(Allocation::Pool(T)));
            let other = std::thread::spawn(|| fails(Allocation::Pool(T)))
                .join()
                .unwrap();
            assert!(!other);
        });
    }
}
