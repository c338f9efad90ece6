//! Response-time distributions: real histograms (hdrhistogram), bounded in size.
//!
//! - [`Latency`]: one upstream's distribution since it was first measured (kept across
//!   restarts with its stats), for p50/p95/p99 per upstream. Allocated on the upstream's first
//!   measured attempt; about 560 bytes (1 ms to 2 min, two significant bits short of two
//!   digits: values are exact to within ~6 %; 16-bit counts, halved when one would overflow).
//! - [`Recent`]: what every attempt of the pool did since the last [`Recent::take`]: counts
//!   and a finer histogram (two significant digits), per lease shard so reporting threads do
//!   not share a lock. The control plane takes it once a minute to build its 5 min / 1 h /
//!   24 h windows.
//!
//! A response time is what reputation measures: connect plus upstream handshake (tunnels), or
//! connect plus time to the response head (absolute-form requests through an HTTP upstream).

use std::sync::{Mutex, PoisonError};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};

/// The largest response time recorded; longer ones count as this (every timeout is shorter).
pub const MAX_MS: u64 = 120_000;

/// One upstream's response-time distribution.
///
/// Counts are 16-bit, which halves the histogram (448 bytes of counts rather than 896, for
/// every upstream ever measured: a pool of 10,000 holds 10,000 of them). When a value's count
/// would pass 65,535, every count is halved first, rounding up so that no value seen is
/// forgotten: the shape, and so every quantile, stays as it was, and older samples weigh half
/// as much as the ones after. [`Latency::len`] is the histogram's weight, not every sample
/// ever recorded (the stats count those).
#[derive(Debug, Clone, PartialEq)]
pub struct Latency(Histogram<u16>);

impl Latency {
    pub fn new() -> Latency {
        Latency(new_histogram(1))
    }

    /// Records one response time (ms); clamped to 1..=[`MAX_MS`].
    pub fn record(&mut self, ms: u64) {
        let ms = ms.clamp(1, MAX_MS);
        if self.0.count_at(ms) == u16::MAX {
            self.halve();
        }
        self.0.saturating_record(ms);
    }

    /// Every count halved, rounded up.
    fn halve(&mut self) {
        self.0 = scaled(&self.0, 2);
    }

    /// Measured samples (the histogram's weight: halving halves it).
    pub fn len(&self) -> u64 {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The `q` quantile (0.0-1.0) in ms, `None` when nothing was measured.
    pub fn quantile_ms(&self, q: f64) -> Option<u64> {
        (!self.0.is_empty()).then(|| self.0.value_at_quantile(q))
    }

    /// The compact V2 encoding, base64: what the store keeps.
    pub fn encode(&self) -> String {
        let mut bytes = Vec::new();
        match V2Serializer::new().serialize(&self.0, &mut bytes) {
            Ok(_) => BASE64.encode(bytes),
            Err(_) => String::new(),
        }
    }

    /// Reads back [`Latency::encode`]; `None` for anything else (a corrupt value is dropped,
    /// not fatal: the distribution starts afresh). Counts past 16 bits (written by an earlier
    /// release, whose counts were 32-bit) are scaled down together, as halving would have.
    pub fn decode(text: &str) -> Option<Latency> {
        let bytes = BASE64.decode(text).ok()?;
        let h: Histogram<u64> = Deserializer::new()
            .deserialize(&mut bytes.as_slice())
            .ok()?;
        let most = h
            .iter_recorded()
            .map(|v| v.count_at_value())
            .max()
            .unwrap_or(0);
        let divisor = most.div_ceil(u64::from(u16::MAX)).max(1);
        Some(Latency(scaled(&h, divisor)))
    }
}

/// `h`'s counts divided by `divisor`, rounded up, in a fresh per-upstream histogram (values
/// outside its bounds clamped to them).
fn scaled<T: hdrhistogram::Counter>(h: &Histogram<T>, divisor: u64) -> Histogram<u16> {
    let mut out = new_histogram(1);
    for v in h.iter_recorded() {
        let n = v.count_at_value().as_u64().div_ceil(divisor);
        let at = v.value_iterated_to().clamp(1, MAX_MS);
        // Within bounds, and `n` fits: at most u16::MAX after the division.
        let _ = out.record_n(at, u16::try_from(n).unwrap_or(u16::MAX));
    }
    out
}

impl Default for Latency {
    fn default() -> Self {
        Latency::new()
    }
}

fn new_histogram<T: hdrhistogram::Counter>(sigfig: u8) -> Histogram<T> {
    match Histogram::new_with_bounds(1, MAX_MS, sigfig) {
        Ok(h) => h,
        // The bounds are constants that hdrhistogram accepts.
        Err(e) => unreachable!("static histogram bounds: {e}"),
    }
}

/// What the pool's attempts did over an interval.
#[derive(Debug, Clone)]
pub struct Window {
    pub successes: u64,
    /// Failures that were the upstream's fault.
    pub failures: u64,
    /// Response times of the successful attempts, ms (two significant digits).
    pub response_ms: Histogram<u32>,
}

impl Default for Window {
    fn default() -> Self {
        Window {
            successes: 0,
            failures: 0,
            response_ms: new_histogram(2),
        }
    }
}

impl Window {
    /// Adds `other` into this window.
    pub fn merge(&mut self, other: &Window) {
        self.successes += other.successes;
        self.failures += other.failures;
        // Same bounds and precision: adding cannot fail.
        let _ = self.response_ms.add(&other.response_ms);
    }

    pub fn requests(&self) -> u64 {
        self.successes + self.failures
    }

    /// The `q` quantile of response times in ms, `None` with no success measured.
    pub fn quantile_ms(&self, q: f64) -> Option<u64> {
        (!self.response_ms.is_empty()).then(|| self.response_ms.value_at_quantile(q))
    }
}

/// The pool's attempts since the last take, per lease shard.
#[derive(Debug)]
pub struct Recent {
    shards: Box<[Mutex<Window>]>,
}

impl Recent {
    pub(crate) fn new(shards: usize) -> Recent {
        Recent {
            shards: (0..shards).map(|_| Mutex::default()).collect(),
        }
    }

    /// Records one attempt on the calling thread's shard.
    pub(crate) fn record(&self, shard: usize, response_ms: Option<u64>, success: bool) {
        let Some(slot) = self.shards.get(shard) else {
            return;
        };
        // A window is plain counters: a panic while one was held leaves nothing torn.
        let mut w = slot.lock().unwrap_or_else(PoisonError::into_inner);
        if success {
            w.successes += 1;
            if let Some(ms) = response_ms {
                w.response_ms.saturating_record(ms.clamp(1, MAX_MS));
            }
        } else {
            w.failures += 1;
        }
    }

    /// Everything recorded since the last take (and starts afresh).
    pub fn take(&self) -> Window {
        let mut total = Window::default();
        for shard in &self.shards {
            let w = std::mem::take(&mut *shard.lock().unwrap_or_else(PoisonError::into_inner));
            total.merge(&w);
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_close_and_survive_encoding() {
        let mut l = Latency::new();
        assert_eq!(l.quantile_ms(0.5), None);
        for ms in 1..=1000 {
            l.record(ms);
        }
        l.record(10 * MAX_MS);
        let p50 = l.quantile_ms(0.5).unwrap();
        assert!((470..=530).contains(&p50), "{p50}");
        let p99 = l.quantile_ms(0.99).unwrap();
        assert!((950..=1050).contains(&p99), "{p99}");
        assert!(l.quantile_ms(1.0).unwrap() >= MAX_MS * 9 / 10);
        let back = Latency::decode(&l.encode()).unwrap();
        assert_eq!(back, l);
        assert_eq!(Latency::decode("not base64!"), None);
        assert_eq!(Latency::decode("AAAA"), None);
    }

    /// A count that would pass 16 bits halves every count (rounded up): the quantiles stay,
    /// nothing seen is forgotten, and recording goes on.
    #[test]
    fn a_full_count_halves_the_histogram_and_keeps_its_shape() {
        let mut l = Latency::new();
        l.record(30);
        for _ in 0..1_000 {
            l.record(1_000);
        }
        for _ in 0..70_000 {
            l.record(100);
        }
        // 65,535 at 100 ms, then halved to 32,768 (1,000 ms: 500; 30 ms: 1), then 4,465 more.
        assert_eq!(l.len(), 1 + 500 + 32_768 + 4_465);
        assert!((97..=103).contains(&l.quantile_ms(0.5).unwrap()));
        assert!((960..=1_040).contains(&l.quantile_ms(0.999).unwrap()));
        assert!(l.quantile_ms(0.0).unwrap() <= 31);
        assert_eq!(Latency::decode(&l.encode()).unwrap(), l);
    }

    /// What an earlier release stored (32-bit counts, past 16 bits) reads back scaled, with
    /// its quantiles.
    #[test]
    fn counts_past_16_bits_are_scaled_down_on_decode() {
        let mut h: Histogram<u32> = new_histogram(1);
        h.record_n(100, 200_000).unwrap();
        h.record_n(500, 1_000).unwrap();
        h.record_n(7, 1).unwrap();
        let mut bytes = Vec::new();
        V2Serializer::new().serialize(&h, &mut bytes).unwrap();
        let l = Latency::decode(&BASE64.encode(bytes)).unwrap();
        // Divided by 4 (200,000 / 65,535 rounded up), rounded up.
        assert_eq!(l.len(), 50_000 + 250 + 1);
        assert!((97..=103).contains(&l.quantile_ms(0.5).unwrap()));
        assert!((480..=520).contains(&l.quantile_ms(0.999).unwrap()));
        assert_eq!(l.quantile_ms(0.0), Some(7));
    }

    #[test]
    fn recent_is_taken_once() {
        let r = Recent::new(4);
        r.record(0, Some(20), true);
        r.record(3, Some(40), true);
        r.record(1, None, false);
        r.record(99, Some(1), true);
        let w = r.take();
        assert_eq!((w.successes, w.failures, w.requests()), (2, 1, 3));
        assert_eq!(w.quantile_ms(1.0), Some(40));
        assert_eq!(r.take().requests(), 0);
    }
}
