//! Selections without sorting: the cut over the profits and the remainder threshold of the
//! split. Both are radix selections: a histogram pass finds the range holding the answer,
//! and only that range's members are looked at again, so the expected cost is O(n).
//!
//! The first pass over the input ([`scan`]) is shared with the ids: it checks whether they
//! ascend, takes their range, and histograms the profits by counts only (a u32 per bucket).
//! Bucket sums are then bounded by count x bucket bounds, which narrows the cut to a few
//! adjacent buckets; the second pass ([`Profits::cut`]) sums exactly above them and collects
//! the candidates inside them, per chunk, so each chunk's participant count falls out too.

use rayon::prelude::*;

use crate::CHUNK_LEN;

/// Mantissa bits of the logarithmic histogram over the profits: buckets are ~0.4% wide
/// relative to their values, so heavy-tailed and flat distributions both spread out.
const MANTISSA_BITS: u32 = 8;
const LOG_BUCKETS: usize = ((64 - MANTISSA_BITS) << MANTISSA_BITS) as usize;
/// Bits of the later, linear histograms (over the candidates, or over remainders).
const LINEAR_BITS: u32 = 11;
/// Below this many candidates, sorting them is cheaper than another histogram round.
const SORT_LEN_MAX: usize = 4096;

/// The result of the cut: the participants are the profitable positions with
/// pnl >= `cutoff_pnl`; `count` and `profit` are their number and pnl total, and
/// `chunk_counts` their number in each input chunk of `CHUNK_LEN` positions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Cut {
    pub cutoff_pnl: i64,
    pub count: u64,
    pub profit: u128,
    pub chunk_counts: Vec<u32>,
}

/// A monotone bucket of a value: exact below 2^M, then 2^M buckets per octave. Bucket 0 is
/// the value 0, where the scan puts every non-positive pnl.
fn log_bucket(value: u64) -> usize {
    let bits = 64 - value.leading_zeros();
    if bits <= MANTISSA_BITS {
        return value as usize;
    }
    let exponent = bits - MANTISSA_BITS;
    ((u64::from(exponent) << MANTISSA_BITS) + (value >> (exponent - 1)) - (1 << MANTISSA_BITS))
        as usize
}

/// The values of a bucket, as an inclusive range (a plain compare is cheaper than the key).
fn log_bucket_range(bucket: usize) -> (u64, u64) {
    let bucket = bucket as u64;
    if bucket < 1 << MANTISSA_BITS {
        return (bucket, bucket);
    }
    let (exponent, mantissa) = (bucket >> MANTISSA_BITS, bucket & ((1 << MANTISSA_BITS) - 1));
    let low = ((1 << MANTISSA_BITS) + mantissa) << (exponent - 1);
    (low, low + (1 << (exponent - 1)) - 1)
}

/// What the first pass learns: the ids' order and range, and the profits.
pub(crate) struct Scan {
    /// The ids are strictly ascending (vacuously so when there are none).
    pub ascending: bool,
    pub id_min: u64,
    pub id_max: u64,
    pub profits: Profits,
    /// The profitable positions in each input chunk.
    pub positives: Vec<u32>,
}

/// The positive pnl values: their count, total and a count per logarithmic bucket.
pub(crate) struct Profits {
    histogram: Vec<u32>,
    count: u64,
    total: u128,
}

/// One chunk's part of the scan.
#[derive(Clone, Copy, Default)]
struct ChunkScan {
    ascending: bool,
    id_min: u64,
    id_max: u64,
    positives: u32,
}

/// One thread's part of the scan: its histogram and total, and its chunks by index.
struct ScanPart {
    histogram: Vec<u32>,
    total: u128,
    chunks: Vec<(usize, ChunkScan)>,
}

impl ScanPart {
    fn new() -> Self {
        Self {
            histogram: vec![0; LOG_BUCKETS],
            total: 0,
            chunks: Vec::new(),
        }
    }

    fn add_chunk(mut self, chunk: usize, ids: &[u64], pnl: &[i64]) -> Self {
        let ascending = ids.windows(2).all(|pair| pair[0] < pair[1]);
        let (id_min, id_max) = if ascending {
            (ids[0], ids[ids.len() - 1])
        } else {
            id_range(ids)
        };
        // Branch-free: a non-positive pnl counts in bucket 0 and adds 0. The total is kept
        // as two u64 halves (a chunk is far below 2^32 values), joined once per chunk.
        let (mut low, mut high, mut positives) = (0u64, 0u64, 0u32);
        for &value in pnl {
            let profit = value.max(0) as u64;
            self.histogram[log_bucket(profit)] += 1;
            low += profit & 0xffff_ffff;
            high += profit >> 32;
            positives += u32::from(value > 0);
        }
        self.total += (u128::from(high) << 32) + u128::from(low);
        let scan = ChunkScan {
            ascending,
            id_min,
            id_max,
            positives,
        };
        self.chunks.push((chunk, scan));
        self
    }

    fn merge(mut self, other: Self) -> Self {
        let counts = self.histogram.iter_mut().zip(&other.histogram);
        counts.for_each(|(a, &b)| *a += b);
        self.total += other.total;
        self.chunks.extend(other.chunks);
        self
    }
}

/// The least and greatest of `ids` (u64::MAX and 0 when there are none), in one pass over
/// independent lanes: a single running min or max waits on each compare before the next.
fn id_range(ids: &[u64]) -> (u64, u64) {
    const LANES: usize = 8;
    let (mut low, mut high) = ([u64::MAX; LANES], [0u64; LANES]);
    let mut blocks = ids.chunks_exact(LANES);
    for block in &mut blocks {
        for lane in 0..LANES {
            low[lane] = low[lane].min(block[lane]);
            high[lane] = high[lane].max(block[lane]);
        }
    }
    let rest = blocks.remainder();
    let low = low.iter().chain(rest).copied().min();
    let high = high.iter().chain(rest).copied().max();
    (low.unwrap_or(u64::MAX), high.unwrap_or(0))
}

/// The first pass: ids ascending and their range, and the profits, by chunks in parallel.
/// Requires equal lengths of at most `u32::MAX`.
pub(crate) fn scan(ids: &[u64], pnl: &[i64]) -> Scan {
    debug_assert_eq!(ids.len(), pnl.len());
    let part = ids
        .par_chunks(CHUNK_LEN)
        .zip(pnl.par_chunks(CHUNK_LEN))
        .enumerate()
        .fold(ScanPart::new, |part, (chunk, (ids, pnl))| {
            part.add_chunk(chunk, ids, pnl)
        })
        .reduce(ScanPart::new, ScanPart::merge);
    let mut chunks = vec![ChunkScan::default(); ids.len().div_ceil(CHUNK_LEN)];
    for (index, chunk) in part.chunks {
        chunks[index] = chunk;
    }
    let ascending = chunks.iter().all(|chunk| chunk.ascending)
        && chunks
            .windows(2)
            .all(|pair| pair[0].id_max < pair[1].id_min);
    let profit_count = ids.len() as u64 - u64::from(part.histogram[0]);
    Scan {
        ascending,
        id_min: chunks.iter().map(|c| c.id_min).min().unwrap_or(0),
        id_max: chunks.iter().map(|c| c.id_max).max().unwrap_or(0),
        positives: chunks.iter().map(|c| c.positives).collect(),
        profits: Profits {
            histogram: part.histogram,
            count: profit_count,
            total: part.total,
        },
    }
}

impl Profits {
    pub(crate) fn count(&self) -> u64 {
        self.count
    }

    pub(crate) fn total(&self) -> u128 {
        self.total
    }

    /// The values that can hold the cut, as an inclusive range: walking down from the top
    /// bucket, bucket sums lie between count x low and count x high, so the crossing of
    /// `threshold` is at or below the first bucket whose upper running sum reaches it, and
    /// at or above the first whose lower running sum does.
    fn candidate_range(&self, threshold: u128) -> (u64, u64) {
        let (mut lower, mut upper) = (0u128, 0u128);
        let mut top = None;
        for bucket in (1..LOG_BUCKETS).rev() {
            let count = u128::from(self.histogram[bucket]);
            if count == 0 {
                continue;
            }
            let (low, high) = log_bucket_range(bucket);
            lower += count * u128::from(low);
            upper += count * u128::from(high);
            if top.is_none() && upper >= threshold {
                top = Some(high);
            }
            if lower >= threshold {
                return (low, top.expect("upper sums bound lower sums"));
            }
        }
        (1, top.expect("the total reaches the threshold"))
    }

    /// The cut over `pnl` (the values these profits were taken from): ranking the positive
    /// values largest first, the value at which the running total first reaches `threshold`,
    /// with every value tied to it included. Nobody when nothing is profitable.
    /// Requires 1 <= threshold <= total when total > 0.
    pub(crate) fn cut(&self, pnl: &[i64], threshold: u128) -> Cut {
        let chunks = pnl.len().div_ceil(CHUNK_LEN);
        if self.total == 0 {
            return Cut {
                cutoff_pnl: 0,
                count: 0,
                profit: 0,
                chunk_counts: vec![0; chunks],
            };
        }
        let (low, high) = self.candidate_range(threshold);
        let (low, high) = (low as i64, high as i64);
        let parts: Vec<(u32, u128, Vec<u64>)> = pnl
            .par_chunks(CHUNK_LEN)
            .map(|chunk| above_and_candidates(chunk, low, high))
            .collect();
        let count_above: u64 = parts.iter().map(|part| u64::from(part.0)).sum();
        let sum_above: u128 = parts.iter().map(|part| part.1).sum();
        let mut candidates = Vec::with_capacity(parts.iter().map(|part| part.2.len()).sum());
        parts.iter().for_each(|part| candidates.extend(&part.2));
        let (cutoff_pnl, count, profit) = refine(candidates, threshold, count_above, sum_above);
        let chunk_counts = parts
            .par_iter()
            .map(|(above, _, candidates)| {
                let tied_or_above = candidates.iter().filter(|&&v| v >= cutoff_pnl as u64);
                above + tied_or_above.count() as u32
            })
            .collect();
        Cut {
            cutoff_pnl,
            count,
            profit,
            chunk_counts,
        }
    }
}

/// Over one chunk: the count and sum of the values above `high`, and the values in
/// `low..=high` (the candidates). With AVX2 when the CPU has it (the loop over 64-bit
/// compares vectorises; without it, it is several times slower).
fn above_and_candidates(chunk: &[i64], low: i64, high: i64) -> (u32, u128, Vec<u64>) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { above_and_candidates_avx2(chunk, low, high) };
    }
    above_and_candidates_portable(chunk, low, high)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn above_and_candidates_avx2(chunk: &[i64], low: i64, high: i64) -> (u32, u128, Vec<u64>) {
    above_and_candidates_portable(chunk, low, high)
}

/// Block by block: a branch-free pass for the sums (as two u64 halves, far from overflow
/// within a chunk) and the number of candidates, then the candidates if there are any.
#[inline(always)]
fn above_and_candidates_portable(chunk: &[i64], low: i64, high: i64) -> (u32, u128, Vec<u64>) {
    const BLOCK: usize = 1024;
    let (mut count, mut sum_low, mut sum_high) = (0u64, 0u64, 0u64);
    let mut candidates = Vec::new();
    for block in chunk.chunks(BLOCK) {
        let mut inside = 0u64;
        for &value in block {
            let above = value > high;
            let profit = (value as u64) & u64::from(above).wrapping_neg();
            count += u64::from(above);
            sum_low += profit & 0xffff_ffff;
            sum_high += profit >> 32;
            inside += u64::from((low <= value) & !above);
        }
        if inside > 0 {
            let values = block.iter().filter(|&&value| low <= value && value <= high);
            candidates.extend(values.map(|&value| value as u64));
        }
    }
    let sum = (u128::from(sum_high) << 32) + u128::from(sum_low);
    (count as u32, sum, candidates)
}

/// The cut among `candidates`, given the count and sum of the values above them all
/// (`sum_above` < `threshold` <= `sum_above` + the candidates' sum): linear histogram rounds
/// narrow the candidates to the bucket holding the crossing, until few enough to sort.
/// Returns the cutoff value and the count and sum of the values at or above it.
fn refine(
    mut candidates: Vec<u64>,
    threshold: u128,
    mut count_above: u64,
    mut sum_above: u128,
) -> (i64, u64, u128) {
    loop {
        let target = threshold - sum_above;
        if candidates.len() <= SORT_LEN_MAX {
            return refine_sorted(candidates, target, count_above, sum_above);
        }
        let low = *candidates.iter().min().expect("candidates are non-empty");
        let high = *candidates.iter().max().expect("candidates are non-empty");
        if low == high {
            let count = candidates.len() as u64;
            let profit = sum_above + u128::from(low) * u128::from(count);
            return (low as i64, count_above + count, profit);
        }
        let shift = (64 - (high - low).leading_zeros()).saturating_sub(LINEAR_BITS);
        let buckets = ((high - low) >> shift) as usize + 1;
        let (mut counts, mut sums) = (vec![0u64; buckets], vec![0u128; buckets]);
        for &value in &candidates {
            let bucket = ((value - low) >> shift) as usize;
            counts[bucket] += 1;
            sums[bucket] += u128::from(value);
        }
        let (mut running_count, mut running_sum) = (0u64, 0u128);
        let bucket = (0..buckets)
            .rev()
            .find(|&bucket| {
                if running_sum + sums[bucket] >= target {
                    return true;
                }
                running_count += counts[bucket];
                running_sum += sums[bucket];
                false
            })
            .expect("the candidates reach the target");
        count_above += running_count;
        sum_above += running_sum;
        candidates.retain(|&value| ((value - low) >> shift) as usize == bucket);
    }
}

fn refine_sorted(
    mut candidates: Vec<u64>,
    target: u128,
    count_above: u64,
    sum_above: u128,
) -> (i64, u64, u128) {
    candidates.sort_unstable_by(|a, b| b.cmp(a));
    let mut running = 0u128;
    let crossing = candidates
        .iter()
        .position(|&value| {
            running += u128::from(value);
            running >= target
        })
        .expect("the candidates reach the target");
    let cutoff = candidates[crossing];
    let count = candidates.partition_point(|&value| value >= cutoff);
    let profit: u128 = candidates[..count]
        .iter()
        .map(|&value| u128::from(value))
        .sum();
    (
        cutoff as i64,
        count_above + count as u64,
        sum_above + profit,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_range_over_lanes_and_rest() {
        assert_eq!(id_range(&[]), (u64::MAX, 0));
        let ids: Vec<u64> = (0..37u64).map(|i| (i * 7919) % 101 + 5).collect();
        let expected = (*ids.iter().min().unwrap(), *ids.iter().max().unwrap());
        for len in 1..=ids.len() {
            let part = &ids[..len];
            let expected_part = (*part.iter().min().unwrap(), *part.iter().max().unwrap());
            assert_eq!(id_range(part), expected_part);
        }
        assert_eq!(id_range(&ids), expected);
    }

    #[test]
    fn log_bucket_is_monotone() {
        let mut values: Vec<u64> = (1..5000).collect();
        values.extend((0..63).flat_map(|s| [1u64 << s, (1 << s) + 1, (1 << s) - 1]));
        values.push(i64::MAX as u64);
        values.sort_unstable();
        values.dedup();
        assert!(values
            .windows(2)
            .all(|w| log_bucket(w[0]) <= log_bucket(w[1])));
        assert!(values.iter().all(|&value| log_bucket(value) < LOG_BUCKETS));
        for &value in values.iter().filter(|&&value| value > 0) {
            let (low, high) = log_bucket_range(log_bucket(value));
            assert!(low <= value && value <= high, "{value}");
            assert_eq!(log_bucket(low), log_bucket(value));
            assert_eq!(log_bucket(high), log_bucket(value));
        }
    }

    #[test]
    fn cut_includes_ties_and_refines_large_buckets() {
        let cut = |pnl: &[i64], threshold| {
            let ids: Vec<u64> = (0..pnl.len() as u64).collect();
            let cut = scan(&ids, pnl).profits.cut(pnl, threshold);
            assert_eq!(
                cut.chunk_counts.iter().map(|&c| u64::from(c)).sum::<u64>(),
                cut.count
            );
            (cut.cutoff_pnl, cut.count, cut.profit)
        };
        let expected = (150, 3, 950);
        assert_eq!(cut(&[500, 300, 150, 50, -80], 900), expected);
        assert_eq!(cut(&[5, 5, 5, 1], 6), (5, 3, 15));
        assert_eq!(cut(&[-5, 0], 1), (0, 0, 0));
        // 100k values in one log bucket force linear refinement rounds.
        let pnl: Vec<i64> = (0..100_000)
            .map(|i| 1_000_000 + (i * 7919) % 10_000)
            .collect();
        let total: u128 = pnl.iter().map(|&v| v as u128).sum();
        let mut sorted = pnl.clone();
        sorted.sort_unstable_by(|a, b| b.cmp(a));
        let threshold = total / 2;
        let mut running = 0u128;
        let crossing = sorted.iter().position(|&v| {
            running += v as u128;
            running >= threshold
        });
        let cutoff = sorted[crossing.unwrap()];
        let members = sorted.iter().filter(|&&v| v >= cutoff);
        let expected = (
            cutoff,
            members.clone().count() as u64,
            members.map(|&v| v as u128).sum(),
        );
        assert_eq!(cut(&pnl, threshold), expected);
    }
}
