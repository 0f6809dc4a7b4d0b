//! Selections without sorting: the cut over the profits and the remainder threshold of the
//! split. Both are radix selections: a histogram pass finds the bucket holding the answer,
//! and only that bucket's members are looked at again, so the expected cost is O(n).

use std::cmp::Reverse;

use rayon::prelude::*;

use crate::CHUNK_LEN;

/// Mantissa bits of the first, logarithmic histogram over the profits: buckets are ~1.6%
/// wide relative to their values, so heavy-tailed and flat distributions both spread out.
const MANTISSA_BITS: u32 = 6;
const LOG_BUCKETS: usize = ((64 - MANTISSA_BITS) << MANTISSA_BITS) as usize;
/// Bits of the later, linear histograms (over one bucket's range, or over remainders).
const LINEAR_BITS: u32 = 11;
/// Below this many candidates, sorting them is cheaper than another histogram round.
const SORT_LEN_MAX: usize = 4096;

/// The result of the cut: the participants are the profitable positions with
/// pnl >= `cutoff_pnl`; `count` and `profit` are their number and pnl total.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Cut {
    pub cutoff_pnl: i64,
    pub count: u64,
    pub profit: u128,
}

/// A monotone bucket of a positive value: exact below 2^M, then 2^M buckets per octave.
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
fn log_bucket_range(bucket: usize) -> (i64, i64) {
    let bucket = bucket as u64;
    if bucket < 1 << MANTISSA_BITS {
        return (bucket as i64, bucket as i64);
    }
    let (exponent, mantissa) = (bucket >> MANTISSA_BITS, bucket & ((1 << MANTISSA_BITS) - 1));
    let low = ((1 << MANTISSA_BITS) + mantissa) << (exponent - 1);
    (low as i64, (low + (1 << (exponent - 1)) - 1) as i64)
}

/// Count and value total per bucket.
struct Histogram {
    count: Vec<u64>,
    sum: Vec<u128>,
}

impl Histogram {
    fn new(buckets: usize) -> Self {
        Self {
            count: vec![0; buckets],
            sum: vec![0; buckets],
        }
    }

    fn add(&mut self, bucket: usize, value: u64) {
        self.count[bucket] += 1;
        self.sum[bucket] += u128::from(value);
    }

    fn merge(mut self, other: Self) -> Self {
        for (bucket, (count, sum)) in other.count.into_iter().zip(other.sum).enumerate() {
            self.count[bucket] += count;
            self.sum[bucket] += sum;
        }
        self
    }

    /// Walking down from the top bucket, the bucket where the running sum first reaches
    /// `target`, with the count and sum of the buckets above it. Requires total >= target.
    fn crossing(&self, target: u128) -> (usize, u64, u128) {
        let (mut count_above, mut sum_above) = (0u64, 0u128);
        for bucket in (0..self.sum.len()).rev() {
            if sum_above + self.sum[bucket] >= target {
                return (bucket, count_above, sum_above);
            }
            count_above += self.count[bucket];
            sum_above += self.sum[bucket];
        }
        unreachable!("the histogram total is below the target")
    }
}

/// The positive pnl values: their count, total and logarithmic histogram, from one pass.
pub(crate) struct Profits {
    histogram: Histogram,
}

impl Profits {
    pub(crate) fn of(pnl: &[i64]) -> Self {
        let histogram = pnl
            .par_chunks(CHUNK_LEN)
            .fold(
                || Histogram::new(LOG_BUCKETS),
                |mut histogram, chunk| {
                    for &value in chunk.iter().filter(|&&value| value > 0) {
                        histogram.add(log_bucket(value as u64), value as u64);
                    }
                    histogram
                },
            )
            .reduce(|| Histogram::new(LOG_BUCKETS), Histogram::merge);
        Self { histogram }
    }

    pub(crate) fn count(&self) -> u64 {
        self.histogram.count.iter().sum()
    }

    pub(crate) fn total(&self) -> u128 {
        self.histogram.sum.iter().sum()
    }

    /// The cut over `pnl` (the values these profits were taken from): ranking the positive
    /// values largest first, the value at which the running total first reaches `threshold`,
    /// with every value tied to it included. Nobody when nothing is profitable.
    /// Requires 1 <= threshold <= total when total > 0.
    pub(crate) fn cut(self, pnl: &[i64], threshold: u128) -> Cut {
        if self.total() == 0 {
            return Cut {
                cutoff_pnl: 0,
                count: 0,
                profit: 0,
            };
        }
        cut_from(self.histogram, pnl, threshold)
    }
}

fn cut_from(histogram: Histogram, pnl: &[i64], threshold: u128) -> Cut {
    let (bucket, mut count_above, mut sum_above) = histogram.crossing(threshold);
    let (low, high) = log_bucket_range(bucket);
    let parts: Vec<Vec<u64>> = pnl
        .par_chunks(CHUNK_LEN)
        .map(|chunk| {
            let in_bucket = |&&value: &&i64| low <= value && value <= high;
            chunk
                .iter()
                .filter(in_bucket)
                .map(|&value| value as u64)
                .collect()
        })
        .collect();
    let mut candidates = Vec::with_capacity(histogram.count[bucket] as usize);
    parts.into_iter().for_each(|part| candidates.extend(part));
    drop(histogram);

    loop {
        let target = threshold - sum_above;
        if candidates.len() <= SORT_LEN_MAX {
            return cut_sorted(candidates, target, count_above, sum_above);
        }
        let low = *candidates.iter().min().expect("candidates are non-empty");
        let high = *candidates.iter().max().expect("candidates are non-empty");
        if low == high {
            let count = candidates.len() as u64;
            let profit = sum_above + u128::from(low) * u128::from(count);
            return Cut {
                cutoff_pnl: low as i64,
                count: count_above + count,
                profit,
            };
        }
        let shift = (64 - (high - low).leading_zeros()).saturating_sub(LINEAR_BITS);
        let mut histogram = Histogram::new(((high - low) >> shift) as usize + 1);
        for &value in &candidates {
            histogram.add(((value - low) >> shift) as usize, value);
        }
        let (bucket, count, sum) = histogram.crossing(target);
        count_above += count;
        sum_above += sum;
        candidates.retain(|&value| ((value - low) >> shift) as usize == bucket);
    }
}

fn cut_sorted(mut candidates: Vec<u64>, target: u128, count_above: u64, sum_above: u128) -> Cut {
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
    Cut {
        cutoff_pnl: cutoff as i64,
        count: count_above + count as u64,
        profit: sum_above + profit,
    }
}

/// The order of the split's leftover units: larger remainder, then larger pnl, then smaller
/// position_id. Unique per position because position ids are.
pub(crate) type Rank = (u128, i64, Reverse<u64>);

/// The k-th largest of `ranks` (1-based `k`; `None` when `k` is 0), given the count of
/// ranks per remainder bucket (`remainder >> shift`). Looks again only at the ranks in the
/// bucket holding the k-th. Requires k <= the number of ranks.
pub(crate) fn kth_largest_rank<I>(ranks: I, counts: &[u64], k: u64, shift: u32) -> Option<Rank>
where
    I: ParallelIterator<Item = Rank>,
{
    if k == 0 {
        return None;
    }
    let mut above = 0u64;
    let bucket = (0..counts.len())
        .rev()
        .find(|&bucket| {
            above += counts[bucket];
            above >= k
        })
        .expect("k is at most the number of ranks");
    let position = (k - (above - counts[bucket]) - 1) as usize;
    let mut candidates: Vec<Rank> = ranks
        .filter(|&(remainder, _, _)| (remainder >> shift) as usize == bucket)
        .collect();
    let (_, kth, _) = candidates.select_nth_unstable_by(position, |a, b| b.cmp(a));
    Some(*kth)
}

#[cfg(test)]
mod tests {
    use super::*;

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
            assert!(low as u64 <= value && value <= high as u64, "{value}");
            assert_eq!(log_bucket(low as u64), log_bucket(value));
            assert_eq!(log_bucket(high as u64), log_bucket(value));
        }
    }

    #[test]
    fn cut_includes_ties_and_refines_large_buckets() {
        let cut = |pnl: &[i64], threshold| Profits::of(pnl).cut(pnl, threshold);
        let expected = Cut {
            cutoff_pnl: 150,
            count: 3,
            profit: 950,
        };
        assert_eq!(cut(&[500, 300, 150, 50, -80], 900), expected);
        assert_eq!(
            cut(&[5, 5, 5, 1], 6),
            Cut {
                cutoff_pnl: 5,
                count: 3,
                profit: 15
            }
        );
        assert_eq!(
            cut(&[-5, 0], 1),
            Cut {
                cutoff_pnl: 0,
                count: 0,
                profit: 0
            }
        );
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
        let expected = Cut {
            cutoff_pnl: cutoff,
            count: members.clone().count() as u64,
            profit: members.map(|&v| v as u128).sum(),
        };
        assert_eq!(cut(&pnl, threshold), expected);
    }
}
