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
    let mut pairs: Vec<(u64, u32)> = ids
        .par_iter()
        .enumerate()
        .map(|(index, &id)| (id, index as u32))
        .collect();
    pairs.par_sort_unstable_by_key(|&(id, _)| id);
    if let Some(pair) = pairs.par_windows(2).find_first(|w| w[0].0 == w[1].0) {
        return Err(pair[0].0);
    }
    Ok(pairs.into_par_iter().map(|(_, index)| index).collect())
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
