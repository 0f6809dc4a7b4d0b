//! The allocation rows in the order the ledger's table keeps them: by account, and within an
//! account by position (the allocator's output order), so that writing them only appends.
//!
//! A stable LSD radix sort of (account id, row) pairs, 11 bits a pass (2,048 buckets, which
//! stay in cache while a pass scatters), the pairs moving together so that every pass reads
//! them in sequence; the histograms of every pass come from one read of the ids, and a pass in
//! which every id has the same digit is skipped (ids below 2^22 take two passes).

const DIGIT_BITS: u32 = 11;
const BUCKETS: usize = 1 << DIGIT_BITS;
const PASSES: usize = 64usize.div_ceil(DIGIT_BITS as usize);

fn digit(key: u64, pass: usize) -> usize {
    ((key >> (pass as u32 * DIGIT_BITS)) as usize) & (BUCKETS - 1)
}

/// Each row's position in the allocator's output (its rank by position id), listed in table
/// order: `account_id[rank[0]] <= account_id[rank[1]] <= …`, ties in rank order.
pub fn table_order(account_id: &[u64]) -> Vec<u32> {
    assert!(
        u32::try_from(account_id.len()).is_ok(),
        "table_order takes at most u32::MAX rows"
    );
    let rows = account_id.len();
    // Passes above the highest bit any id has would not move anything.
    let bits = account_id.iter().fold(0u64, |all, &key| all | key);
    let passes = (64 - bits.leading_zeros() as usize).div_ceil(DIGIT_BITS as usize);
    let mut counts = vec![[0usize; BUCKETS]; passes.min(PASSES)];
    for &key in account_id {
        for (pass, histogram) in counts.iter_mut().enumerate() {
            histogram[digit(key, pass)] += 1;
        }
    }
    let mut pairs: Vec<(u64, u32)> = account_id.iter().copied().zip(0u32..).collect();
    let mut scratch = vec![(0u64, 0u32); rows];
    for (pass, histogram) in counts.iter_mut().enumerate() {
        if histogram.contains(&rows) {
            continue; // one digit for every row: this pass would not move anything
        }
        let mut next = 0;
        for count in histogram.iter_mut() {
            let here = *count;
            *count = next;
            next += here;
        }
        for &pair in &pairs {
            let slot = &mut histogram[digit(pair.0, pass)];
            scratch[*slot] = pair;
            *slot += 1;
        }
        std::mem::swap(&mut pairs, &mut scratch);
    }
    pairs.into_iter().map(|(_, row)| row).collect()
}

/// `values` taken in `order`, on every core (each read is a cache miss at scale).
pub fn gather<T: Copy + Send + Sync>(values: &[T], order: &[u32]) -> Vec<T> {
    use rayon::prelude::*;
    order
        .par_iter()
        .with_min_len(crate::CHUNK_LEN)
        .map(|&row| values[row as usize])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(account_id: &[u64]) -> Vec<u32> {
        let mut order: Vec<u32> = (0..account_id.len() as u32).collect();
        order.sort_by_key(|&row| account_id[row as usize]); // stable
        order
    }

    #[test]
    fn small_ids_and_ties_keep_position_order() {
        let accounts = [5, 3, 5, 0, 3, 3, 9, 0];
        assert_eq!(table_order(&accounts), vec![3, 7, 1, 4, 5, 0, 2, 6]);
    }

    #[test]
    fn every_digit_of_a_u64_sorts() {
        let accounts = [
            u64::MAX,
            1 << 63,
            0,
            1 << 48,
            (1 << 48) + 1,
            1 << 32,
            1 << 16,
            7,
        ];
        assert_eq!(table_order(&accounts), reference(&accounts));
    }

    #[test]
    fn empty_and_single() {
        assert!(table_order(&[]).is_empty());
        assert_eq!(table_order(&[42]), vec![0]);
    }

    proptest::proptest! {
        #[test]
        fn matches_a_stable_comparison_sort(
            accounts in proptest::collection::vec(
                proptest::prop_oneof![0u64..50, proptest::num::u64::ANY], 0..2000
            )
        ) {
            proptest::prop_assert_eq!(table_order(&accounts), reference(&accounts));
        }
    }

    #[test]
    fn gather_takes_values_in_order() {
        assert_eq!(gather(&[10, 20, 30], &[2, 0, 1]), vec![30, 10, 20]);
    }
}
