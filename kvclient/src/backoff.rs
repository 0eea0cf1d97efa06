//! Retry delays: capped exponential backoff with jitter.
//!
//! Exponential so that a cluster in trouble (failover, paused mode switch) is
//! not hammered; capped so a client comes back soon after the cluster does;
//! jittered so that many clients that failed together do not retry together.

use std::time::Duration;

/// Backoff policy. The delay before retry `n` (0-based) is drawn uniformly
/// from `[c/2, c]` where `c = min(max, initial * 2^n)`.
///
/// "Equal jitter" rather than "full jitter" (`[0, c]`): keeping half the
/// ceiling guarantees the delay actually grows, so a client whose every node
/// refuses connections instantly still spaces its attempts out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Ceiling of the first retry's delay.
    pub initial: Duration,
    /// Ceiling of every delay.
    pub max: Duration,
}

impl Default for Backoff {
    /// 50 ms doubling to 1 s: a failover on loopback takes a few hundred
    /// milliseconds, and eight retries then span roughly 2.5-5 s.
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(1),
        }
    }
}

impl Backoff {
    /// The upper bound of the delay before retry `retry`.
    pub fn ceiling(&self, retry: u32) -> Duration {
        let factor = 1u32.checked_shl(retry).unwrap_or(u32::MAX);
        self.initial
            .checked_mul(factor)
            .map_or(self.max, |d| d.min(self.max))
    }

    /// A jittered delay before retry `retry`.
    pub fn delay(&self, retry: u32) -> Duration {
        self.delay_with(retry, rand::random::<f64>())
    }

    /// The delay for a given point `unit` in `[0, 1]` of the jitter range;
    /// split out so tests can check the bounds without randomness.
    pub fn delay_with(&self, retry: u32, unit: f64) -> Duration {
        let ceiling = self.ceiling(retry);
        let half = ceiling / 2;
        half + (ceiling - half).mul_f64(unit.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_then_caps() {
        let b = Backoff {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(100),
        };
        let ceilings: Vec<u128> = (0..6).map(|n| b.ceiling(n).as_millis()).collect();
        assert_eq!(ceilings, [10, 20, 40, 80, 100, 100]);
        // Large retry counts must not overflow.
        assert_eq!(b.ceiling(31), Duration::from_millis(100));
        assert_eq!(b.ceiling(32), Duration::from_millis(100));
        assert_eq!(b.ceiling(u32::MAX), Duration::from_millis(100));
    }

    #[test]
    fn delay_stays_within_half_ceiling_and_ceiling() {
        let b = Backoff::default();
        for retry in 0..40 {
            let ceiling = b.ceiling(retry);
            assert_eq!(b.delay_with(retry, 0.0), ceiling / 2);
            assert_eq!(b.delay_with(retry, 1.0), ceiling);
            // Out-of-range inputs are clamped, never exceed the cap.
            assert_eq!(b.delay_with(retry, 7.0), ceiling);
            for _ in 0..50 {
                let d = b.delay(retry);
                assert!(d >= ceiling / 2 && d <= ceiling, "{retry}: {d:?}");
                assert!(d <= b.max);
            }
        }
    }

    #[test]
    fn zero_initial_never_sleeps() {
        let b = Backoff {
            initial: Duration::ZERO,
            max: Duration::from_secs(1),
        };
        assert_eq!(b.delay(5), Duration::ZERO);
    }
}
