//! Position ids: the duplicate check and the position_id order of the output, in one pass.
//!
//! Three cases, cheapest first: ids already strictly ascending (the usual feed, ordered by a
//! database key) need nothing; ids dense in their range (span < 2n) are scattered into a
//! slot table (a counting sort, 4 bytes per slot); anything else is sorted as (id, index)
//! pairs in parallel. Each yields the input indices in ascending position_id order.

use rayon::prelude::*;

use crate::CHUNK_LEN;

/// Input indices in ascending position_id order.
pub(crate) enum IdOrder {
    /// The input is already in order: index k is position k.
    Ascending,
    /// `order[k]` is the input index of the k-th smallest position_id.
    Permutation(Vec<u32>),
}

impl IdOrder {
    /// The input index of the position with the given rank in position_id order.
    pub(crate) fn input_index(&self, rank: usize) -> usize {
        match self {
            IdOrder::Ascending => rank,
            IdOrder::Permutation(order) => order[rank] as usize,
        }
    }
}

/// Checks `ids` for duplicates; `Err(id)` names the smallest duplicated position_id.
/// Requires `ids.len() <= u32::MAX` (indices are stored as u32).
pub(crate) fn order_ids(ids: &[u64]) -> Result<IdOrder, u64> {
    debug_assert!(ids.len() <= u32::MAX as usize);
    if is_ascending(ids) {
        return Ok(IdOrder::Ascending);
    }
    let min = *ids.par_iter().min().expect("unordered ids are not empty");
    let max = *ids.par_iter().max().expect("unordered ids are not empty");
    let span = u128::from(max - min);
    if span < 2 * ids.len() as u128 {
        if let Some(order) = slot_order(ids, min, span as usize + 1) {
            return Ok(IdOrder::Permutation(order));
        }
    }
    sorted_order(ids).map(IdOrder::Permutation)
}

/// Strictly ascending, checked by chunks plus the pair across each chunk boundary.
fn is_ascending(ids: &[u64]) -> bool {
    let ascending = |part: &[u64]| part.windows(2).all(|pair| pair[0] < pair[1]);
    ids.par_chunks(CHUNK_LEN).enumerate().all(|(chunk, part)| {
        let start = chunk * CHUNK_LEN;
        ascending(part) && (start == 0 || ids[start - 1] < ids[start])
    })
}

/// Counting sort into a slot per id in `min..min + slots`; `None` on a duplicate (the sort
/// path then names the smallest one, so the error does not depend on input order).
fn slot_order(ids: &[u64], min: u64, slots: usize) -> Option<Vec<u32>> {
    const EMPTY: u32 = u32::MAX;
    let mut slot = vec![EMPTY; slots];
    for (index, &id) in ids.iter().enumerate() {
        let cell = &mut slot[(id - min) as usize];
        if *cell != EMPTY {
            return None;
        }
        *cell = index as u32;
    }
    slot.retain(|&index| index != EMPTY);
    Some(slot)
}

fn sorted_order(ids: &[u64]) -> Result<Vec<u32>, u64> {
    let pairs = sorted_pairs(ids)?;
    Ok(pairs.into_par_iter().map(|(_, index)| index).collect())
}

/// Where each participant's row goes when the ids do not ascend: the allocator's layout of
/// its output without ordering all positions, only the participants.
pub(crate) enum RowMap {
    /// Ids dense in their range: a bit per id slot, set for participants, with a running
    /// count per 64-bit word; a participant's row is the number of participant ids below it.
    Ranked(DenseRanks),
    /// Sparse ids: `rows[index]` is the row of the position at that input index (u32::MAX for
    /// non-participants), from a sort of all (id, index) pairs.
    Mapped(Vec<u32>),
}

impl RowMap {
    /// Checks `ids` for duplicates (`Err` names the smallest) and maps the participants,
    /// the positions with pnl >= `pnl_min`, to their rows in position_id order.
    /// Requires unordered ids in `min..=max`, as many as pnl values, at most `u32::MAX`.
    pub(crate) fn build(
        ids: &[u64],
        pnl: &[i64],
        pnl_min: i64,
        min: u64,
        max: u64,
    ) -> Result<Self, u64> {
        let slots = u128::from(max - min) + 1;
        if slots <= DENSE_SLOTS_PER_ID * ids.len() as u128 {
            if let Some(ranks) = DenseRanks::build(ids, pnl, pnl_min, min, slots as usize) {
                return Ok(Self::Ranked(ranks));
            }
        }
        let pairs = sorted_pairs(ids)?;
        let mut rows = vec![u32::MAX; ids.len()];
        let mut row = 0;
        for &(_, index) in &pairs {
            if pnl[index as usize] >= pnl_min {
                rows[index as usize] = row;
                row += 1;
            }
        }
        Ok(Self::Mapped(rows))
    }
}

/// Id slots per position up to which the bitmaps are used (2 bits a slot for each half of
/// the input while built, then 2 bits a slot for the ranks: at most 12 bytes a position).
const DENSE_SLOTS_PER_ID: u128 = 16;

/// Slots per block of the dense ranks: a block's rows are contiguous, and a slot's offset in
/// its block fits a u16, so the split can bucket the participants by block first, then
/// place each block's rows within a window that stays in cache.
pub(crate) const BLOCK_SLOTS_BITS: u32 = 16;
const BLOCK_WORDS: usize = 1 << (BLOCK_SLOTS_BITS - 6);

/// One 64-slot word of participant bits and the participants in the words before it.
#[derive(Clone, Copy, Default)]
struct RankWord {
    bits: u64,
    before: u64,
}

/// The participants of one block of slots: `first` of them from the first half of the
/// input, `count` in all.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct BlockCounts {
    pub first: u32,
    pub count: u32,
}

pub(crate) struct DenseRanks {
    pub min: u64,
    /// The input positions in the first half (the rest are the second).
    pub half: usize,
    words: Vec<RankWord>,
    pub blocks: Vec<BlockCounts>,
}

impl DenseRanks {
    /// `None` on a duplicate id (the sort then names the smallest, whatever the input order).
    /// Each half of the input marks its own bitmaps (2 bits a slot: seen, participant), in
    /// parallel; an id seen by both halves is a duplicate too.
    fn build(ids: &[u64], pnl: &[i64], pnl_min: i64, min: u64, slots: usize) -> Option<Self> {
        let words = slots.div_ceil(64);
        let half = ids.len().div_ceil(2).max(1);
        let mark = |(ids, pnl): (&[u64], &[i64])| {
            let mut marks = vec![[0u64; 2]; words];
            for (&id, &value) in ids.iter().zip(pnl) {
                let slot = (id - min) as usize;
                let word = &mut marks[slot / 64];
                let bit = 1u64 << (slot % 64);
                if word[0] & bit != 0 {
                    return None;
                }
                word[0] |= bit;
                word[1] |= bit & u64::from(value >= pnl_min).wrapping_neg();
            }
            Some(marks)
        };
        let halves: Vec<Option<Vec<[u64; 2]>>> = ids
            .par_chunks(half)
            .zip(pnl.par_chunks(half))
            .map(mark)
            .collect();
        let mut halves = halves.into_iter().collect::<Option<Vec<_>>>()?.into_iter();
        let mut marks = halves.next().unwrap_or_default();
        let other = halves.next().unwrap_or_default();
        // Per block: merge the second half's marks into the first's, counting the first's
        // participants and any id both halves saw.
        let count_ones = |words: &[[u64; 2]]| words.iter().map(|w| w[1].count_ones()).sum();
        let merged: Vec<(u32, bool)> = marks
            .par_chunks_mut(BLOCK_WORDS)
            .enumerate()
            .map(|(block, mark)| {
                let first = count_ones(mark);
                let start = block * BLOCK_WORDS;
                let end = (start + mark.len()).min(other.len());
                let mut both = 0;
                if start < end {
                    for (mark, [seen, participant]) in mark.iter_mut().zip(&other[start..end]) {
                        both |= mark[0] & seen;
                        mark[0] |= seen;
                        mark[1] |= participant;
                    }
                }
                (first, both != 0)
            })
            .collect();
        drop(other);
        if merged.iter().any(|&(_, both)| both) {
            return None;
        }
        let mut before = 0;
        let words: Vec<RankWord> = marks
            .iter()
            .map(|&[_, bits]| {
                let word = RankWord { bits, before };
                before += u64::from(bits.count_ones());
                word
            })
            .collect();
        let blocks = words
            .chunks(BLOCK_WORDS)
            .zip(&merged)
            .map(|(block, &(first, _))| {
                let last = block[block.len() - 1];
                let count = last.before + u64::from(last.bits.count_ones()) - block[0].before;
                BlockCounts {
                    first,
                    count: count as u32,
                }
            })
            .collect();
        Some(Self {
            min,
            half,
            words,
            blocks,
        })
    }

    /// The ids of block `block`'s participants in ascending order, into `out` (as many as
    /// there are).
    pub(crate) fn write_block_ids(&self, block: usize, out: &mut [u64]) {
        let start = block * BLOCK_WORDS;
        let end = (start + BLOCK_WORDS).min(self.words.len());
        let mut row = 0;
        for (index, word) in self.words[start..end].iter().enumerate() {
            // At most the largest id: a word only has bits for ids in range.
            let base = self.min + 64 * (start + index) as u64;
            let mut bits = word.bits;
            while bits != 0 {
                out[row] = base + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                row += 1;
            }
        }
    }

    /// The first row of block `block`.
    pub(crate) fn block_start(&self, block: usize) -> usize {
        self.words[block * BLOCK_WORDS].before as usize
    }

    /// The number of participant slots below `slot`.
    #[inline]
    pub(crate) fn rank(&self, slot: usize) -> usize {
        let word = self.words[slot / 64];
        let below = word.bits & ((1u64 << (slot % 64)) - 1);
        (word.before + u64::from(below.count_ones())) as usize
    }
}

/// All (id, index) pairs in id order; `Err` names the smallest duplicated id.
fn sorted_pairs(ids: &[u64]) -> Result<Vec<(u64, u32)>, u64> {
    let mut pairs: Vec<(u64, u32)> = ids
        .par_iter()
        .enumerate()
        .map(|(index, &id)| (id, index as u32))
        .collect();
    pairs.par_sort_unstable_by_key(|&(id, _)| id);
    if let Some(pair) = pairs.par_windows(2).find_first(|w| w[0].0 == w[1].0) {
        return Err(pair[0].0);
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranks(ids: &[u64]) -> Result<Vec<usize>, u64> {
        let order = order_ids(ids)?;
        Ok((0..ids.len()).map(|rank| order.input_index(rank)).collect())
    }

    #[test]
    fn orders_each_case() {
        assert_eq!(ranks(&[]), Ok(vec![]));
        assert_eq!(ranks(&[3, 9, 40]), Ok(vec![0, 1, 2]));
        assert_eq!(ranks(&[12, 10, 11, 14]), Ok(vec![1, 2, 0, 3])); // dense
        assert_eq!(ranks(&[u64::MAX, 0, 1 << 40]), Ok(vec![1, 2, 0])); // sparse
    }

    #[test]
    fn names_the_smallest_duplicate() {
        assert_eq!(ranks(&[5, 7, 5, 7]), Err(5)); // dense
        assert_eq!(ranks(&[u64::MAX, 9, u64::MAX, 0, 9]), Err(9)); // sparse
        assert_eq!(ranks(&[1, 1]), Err(1)); // not strictly ascending
    }
}
