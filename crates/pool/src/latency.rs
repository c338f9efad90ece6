//! Response-time distributions: real histograms (hdrhistogram), bounded in size.
//!
//! - [`Latency`]: one upstream's distribution since it was first measured (kept across
//!   restarts with its stats), for p50/p95/p99 per upstream: hdrhistogram's buckets (1 ms to
//!   2 min, values exact to within ~6 %), only those with a count held (a few dozen, ~4 bytes
//!   each, allocated from the first measured attempt); 16-bit counts, halved when one would
//!   overflow.
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
/// hdrhistogram's layout at one significant digit (what the store keeps, [`Latency::encode`]):
/// every millisecond below 32, then sixteen buckets per power of two, each 1/16 of it wide, up
/// to [`MAX_MS`]: 222 buckets, values exact to within ~6 %. Only the buckets with a count are
/// held, sorted, three bytes each (four with padding): an upstream's response times cluster
/// in a few dozen of them, so a pool of 10,000 holds ~100-200 bytes per upstream rather than
/// the 448 of every count (the dense 16-bit histogram before) or 896 (32-bit). Quantiles are
/// hdrhistogram's, bucket for bucket (a test holds them equal).
///
/// Counts are 16-bit. When a bucket's count would pass 65,535, every count is halved first,
/// rounding up so that no value seen is forgotten: the shape, and so every quantile, stays as
/// it was, and older samples weigh half as much as the ones after. [`Latency::len`] is the
/// histogram's weight, not every sample ever recorded (the stats count those).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Latency {
    /// The buckets with a count, by bucket index, ascending.
    cells: Vec<Cell>,
}

/// One bucket with a count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cell {
    bucket: u8,
    count: u16,
}

/// Every millisecond below this is a bucket of its own (hdrhistogram's sub-bucket count at
/// one significant digit: 2^ceil(log2(2 * 10))).
const EXACT_BELOW: u64 = 32;
/// Buckets per power of two past [`EXACT_BELOW`] (half the sub-bucket count).
const PER_OCTAVE: u64 = 16;

/// The bucket of `ms` (1..=[`MAX_MS`]): its index in hdrhistogram's counts.
fn bucket_of(ms: u64) -> u8 {
    let index = if ms < EXACT_BELOW {
        ms
    } else {
        // The power of two at or below `ms` (5 for 32..63), and `ms`'s top five bits
        // (16..31: which sixteenth of that octave).
        let octave = u64::from(63 - ms.leading_zeros());
        let top = ms >> (octave - 4);
        EXACT_BELOW + (octave - 5) * PER_OCTAVE + (top - PER_OCTAVE)
    };
    // 221 for MAX_MS (120,000 < 2^17: at most 223).
    u8::try_from(index).unwrap_or(u8::MAX)
}

/// The lowest and highest value of `bucket`.
fn bucket_range(bucket: u8) -> (u64, u64) {
    let index = u64::from(bucket);
    if index < EXACT_BELOW {
        return (index, index);
    }
    let octave = 5 + (index - EXACT_BELOW) / PER_OCTAVE;
    let top = PER_OCTAVE + (index - EXACT_BELOW) % PER_OCTAVE;
    let width = 1 << (octave - 4);
    let low = top << (octave - 4);
    (low, low + width - 1)
}

impl Latency {
    /// An empty distribution (no allocation until the first sample).
    pub fn new() -> Latency {
        Latency { cells: Vec::new() }
    }

    /// Records one response time (ms); clamped to 1..=[`MAX_MS`].
    pub fn record(&mut self, ms: u64) {
        self.record_n(bucket_of(ms.clamp(1, MAX_MS)), 1);
    }

    /// Adds `n` to `bucket`, halving everything first where the count would pass 16 bits.
    fn record_n(&mut self, bucket: u8, n: u16) {
        match self.cells.binary_search_by_key(&bucket, |c| c.bucket) {
            Ok(i) => {
                if self.cells[i].count.checked_add(n).is_none() {
                    self.halve();
                }
                let c = &mut self.cells[i].count;
                *c = c.saturating_add(n);
            }
            Err(i) => self.cells.insert(i, Cell { bucket, count: n }),
        }
    }

    /// Every count halved, rounded up.
    fn halve(&mut self) {
        for c in &mut self.cells {
            c.count = c.count.div_ceil(2);
        }
    }

    /// Measured samples (the histogram's weight: halving halves it).
    pub fn len(&self) -> u64 {
        self.cells.iter().map(|c| u64::from(c.count)).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.cells.is_empty()
    }

    /// The `q` quantile (0.0-1.0) in ms, `None` when nothing was measured: the highest value
    /// of the bucket that holds it (its lowest for `q` = 0), as hdrhistogram answers.
    pub fn quantile_ms(&self, q: f64) -> Option<u64> {
        let q = q.min(1.0);
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss,
            reason = "hdrhistogram's own rank arithmetic: a weight of at most 222 * 65,535 \
                      is exact in f64, and a rank past it is no rank"
        )]
        let rank = ((q * self.len() as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for c in &self.cells {
            seen += u64::from(c.count);
            if seen >= rank {
                let (low, high) = bucket_range(c.bucket);
                return Some(if q == 0.0 { low } else { high });
            }
        }
        None
    }

    /// The compact V2 encoding of hdrhistogram (1 ms to [`MAX_MS`], one significant digit),
    /// base64: what the store keeps, as before the buckets were held sparse.
    pub fn encode(&self) -> String {
        let mut h: Histogram<u16> = new_histogram(1);
        for c in &self.cells {
            // The bucket's lowest value is within the bounds, and a u16 count fits.
            let _ = h.record_n(bucket_range(c.bucket).0.max(1), c.count);
        }
        let mut bytes = Vec::new();
        match V2Serializer::new().serialize(&h, &mut bytes) {
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
        let mut out = Latency::new();
        for v in h.iter_recorded() {
            let n = v.count_at_value().div_ceil(divisor);
            let at = v.value_iterated_to().clamp(1, MAX_MS);
            // At most u16::MAX after the division.
            out.record_n(bucket_of(at), u16::try_from(n).unwrap_or(u16::MAX));
        }
        out.cells.shrink_to_fit();
        Some(out)
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

    /// The sparse buckets are hdrhistogram's at one significant digit, value for value, and
    /// so are the quantiles read from them, over spread and clustered samples alike.
    #[test]
    fn buckets_and_quantiles_are_hdrhistograms() {
        let dense: Histogram<u64> = new_histogram(1);
        for ms in 1..=MAX_MS {
            let (low, high) = bucket_range(bucket_of(ms));
            assert_eq!(
                (low, high),
                (dense.lowest_equivalent(ms), dense.highest_equivalent(ms)),
                "{ms} ms"
            );
        }
        assert_eq!(bucket_of(MAX_MS), 221);
        let mut seed = 0x9E37_79B9_7F4A_7C15_u64;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            seed >> 33
        };
        let spread = |r: u64| 1 + (r % 17).pow(4) + r % 1_000;
        let clustered = |r: u64| 40 + r % 25;
        for (name, draw) in [
            ("spread", &spread as &dyn Fn(u64) -> u64),
            ("clustered", &clustered),
        ] {
            for n in [1, 2, 7, 100, 5_000] {
                let mut sparse = Latency::new();
                let mut dense: Histogram<u64> = new_histogram(1);
                for _ in 0..n {
                    let ms = draw(next()).min(MAX_MS);
                    sparse.record(ms);
                    dense.record(ms).unwrap();
                }
                assert_eq!(sparse.len(), dense.len(), "{name} {n}");
                for q in [
                    0.0, 0.001, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 1.0, 1.5,
                ] {
                    assert_eq!(
                        sparse.quantile_ms(q),
                        Some(dense.value_at_quantile(q)),
                        "{name}, {n} samples, q {q}"
                    );
                }
                assert_eq!(Latency::decode(&sparse.encode()).unwrap(), sparse);
            }
        }
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
