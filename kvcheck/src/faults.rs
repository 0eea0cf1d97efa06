//! The fault schedule of a chaos run: which fault comes next, whether it
//! is aimed at the primary, the pause before it, and when the run is over.
//! What a fault does (a signal, a cut link) is the caller's.
//!
//! Faults come in cycles: every (fault, aimed at the primary?) pair once,
//! in a random order, so that a run of one cycle or more has hit the
//! primary and a secondary with each fault. A run ends at the first pause
//! that would take it past its duration, but never before one whole cycle.

use std::ops::RangeInclusive;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// Each fault twice: aimed at the primary, and at a secondary.
pub fn at_both<F: Copy>(faults: &[F]) -> Vec<(F, bool)> {
    faults
        .iter()
        .flat_map(|&f| [(f, true), (f, false)])
        .collect()
}

/// A seeded fault schedule over the pairs of one cycle.
pub struct Schedule<F> {
    cycle: Vec<(F, bool)>,
    pending: Vec<(F, bool)>,
    /// Pause before each fault, in milliseconds: the fault rate.
    pause_ms: RangeInclusive<u64>,
    duration: Duration,
    rounds: usize,
    rng: StdRng,
}

impl<F: Copy> Schedule<F> {
    /// A run of `duration` over `cycle`'s pairs, `pause_ms` apart, repeatable
    /// from `seed` (the same seed draws the same faults, pauses and every
    /// other draw made through [`Schedule::rng`]).
    pub fn new(
        cycle: Vec<(F, bool)>,
        pause_ms: RangeInclusive<u64>,
        duration: Duration,
        seed: u64,
    ) -> Self {
        Schedule {
            cycle,
            pending: Vec::new(),
            pause_ms,
            duration,
            rounds: 0,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// The pause to wait, then the fault and whether it is aimed at the
    /// primary; `None` once the run is over, `elapsed` into it.
    pub fn next(&mut self, elapsed: Duration) -> Option<(Duration, F, bool)> {
        if self.cycle.is_empty() {
            return None;
        }
        let pause = Duration::from_millis(self.rng.gen_range(self.pause_ms.clone()));
        if self.rounds >= self.cycle.len() && elapsed + pause >= self.duration {
            return None;
        }
        if self.pending.is_empty() {
            self.pending = self.cycle.clone();
            self.pending.shuffle(&mut self.rng);
        }
        let (fault, at_primary) = self.pending.pop()?;
        self.rounds += 1;
        Some((pause, fault, at_primary))
    }

    /// Faults handed out so far.
    pub fn rounds(&self) -> usize {
        self.rounds
    }

    /// The schedule's generator, for the faults' own draws (how long a
    /// node stays stopped, which secondary is hit).
    pub fn rng(&mut self) -> &mut StdRng {
        &mut self.rng
    }
}

/// The node a fault aimed at the primary (when there is one) or at a
/// secondary hits: the primary, or any other node at random; `None` when
/// there is no other node.
pub fn aim<'a>(
    nodes: &'a [String],
    primary: Option<&str>,
    at_primary: bool,
    rng: &mut impl Rng,
) -> Option<&'a str> {
    if let (Some(p), true) = (primary, at_primary) {
        if let Some(n) = nodes.iter().find(|n| *n == p) {
            return Some(n);
        }
    }
    let others: Vec<&String> = nodes
        .iter()
        .filter(|n| Some(n.as_str()) != primary)
        .collect();
    others.choose(rng).map(|n| n.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pair_comes_once_a_cycle_and_a_run_takes_at_least_one_cycle() {
        let cycle = at_both(&['k', 's', 'p']);
        assert_eq!(cycle.len(), 6);
        let mut s = Schedule::new(cycle.clone(), 10..=20, Duration::ZERO, 7);
        let mut seen = Vec::new();
        while let Some((pause, f, at)) = s.next(Duration::from_secs(3600)) {
            assert!((10..=20).contains(&(pause.as_millis() as u64)));
            seen.push((f, at));
        }
        seen.sort();
        let mut want = cycle;
        want.sort();
        assert_eq!(seen, want, "one whole cycle, though the time was up");
        assert_eq!(s.rounds(), 6);
    }

    #[test]
    fn a_run_ends_at_the_first_pause_past_its_duration() {
        let mut s = Schedule::new(at_both(&[1]), 100..=100, Duration::from_secs(1), 1);
        assert!(s.next(Duration::ZERO).is_some());
        assert!(s.next(Duration::ZERO).is_some());
        assert!(s.next(Duration::from_millis(800)).is_some(), "ends at 900");
        assert!(
            s.next(Duration::from_millis(900)).is_none(),
            "would end at 1 s"
        );
        let mut empty = Schedule::<u8>::new(Vec::new(), 1..=1, Duration::from_secs(9), 1);
        assert!(empty.next(Duration::ZERO).is_none());
    }

    #[test]
    fn the_same_seed_gives_the_same_schedule() {
        let run = |seed| {
            let mut s = Schedule::new(at_both(&[1, 2, 3]), 1..=1000, Duration::from_secs(60), seed);
            let mut out = Vec::new();
            let mut t = Duration::ZERO;
            while let Some((pause, f, at)) = s.next(t) {
                t += pause;
                out.push((pause, f, at, s.rng().gen_range(0..100)));
            }
            out
        };
        assert_eq!(run(5), run(5));
        assert_ne!(run(5), run(6));
    }

    #[test]
    fn a_fault_at_the_primary_hits_it_and_one_at_a_secondary_never_does() {
        let nodes: Vec<String> = ["n0", "n1", "n2"].map(String::from).to_vec();
        let mut rng = StdRng::seed_from_u64(3);
        assert_eq!(aim(&nodes, Some("n1"), true, &mut rng), Some("n1"));
        for _ in 0..50 {
            let n = aim(&nodes, Some("n1"), false, &mut rng).unwrap();
            assert_ne!(n, "n1");
        }
        assert!(
            aim(&nodes, None, true, &mut rng).is_some(),
            "no primary: any node"
        );
        let one = vec!["n0".to_string()];
        assert_eq!(aim(&one, Some("n0"), false, &mut rng), None);
    }
}
