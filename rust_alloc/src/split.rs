//! The pro-rata split (rules 6 and 7), written straight into the output columns in
//! position_id order, and the checks of its result.
//!
//! Three passes. The first walks the input in its own order and writes each participant's
//! row (id, account, pnl, floor of its share) and the remainder's bucket (`remainder >>
//! shift`, 11 bits, kept as a u16 beside the rows), histogramming the buckets. The histogram
//! gives the bucket holding the last participant owed a leftover unit; the second pass ranks
//! only that bucket's rows and selects the last one owed. The third adds the units (every row
//! above that bucket, and the bucket's rows ranked at or above the selected one) and checks
//! and sums the amounts. Rows still at 0 are dropped after, if there are any.
//!
//! Where a row goes: with ascending ids, each input chunk's participants fill their own slice
//! of the output; otherwise a [`RowMap`] gives each participant its row and the threads
//! scatter the rows (no two participants share a row, because no two share an id).

use std::cmp::Reverse;
use std::ops::Range;

use rayon::prelude::*;

use crate::ids::{DenseRanks, RowMap, BLOCK_SLOTS_BITS};
use crate::{AllocError, Positions, CHUNK_LEN};

/// Bits of the remainder histogram.
const REMAINDER_BITS: u32 = 11;

/// How the participants' rows are laid out in position_id order.
pub(crate) enum Layout {
    /// The input ids ascend: the rows are the participants in input order.
    Ascending,
    /// The rows given by a map from input positions.
    Mapped(RowMap),
}

/// The output columns: the allocations in ascending position_id order.
#[derive(Default)]
pub(crate) struct Columns {
    pub position_id: Vec<u64>,
    pub account_id: Vec<u64>,
    pub pnl: Vec<i64>,
    pub amount: Vec<i64>,
}

/// floor(allocated × pnl / profit) for a fixed allocated < profit, by multiplication: with
/// m = floor(allocated × 2^64 / profit) < 2^64, the estimate (pnl × m) >> 64 is the quotient
/// or one below it (the error is pnl × frac / 2^64 < 1/2), and the exact remainder fixes it.
#[derive(Clone, Copy)]
struct Divider {
    allocated: u64,
    profit: u128,
    reciprocal: u64,
}

impl Divider {
    fn new(allocated: u64, profit: u128) -> Self {
        debug_assert!(u128::from(allocated) < profit);
        let reciprocal = ((u128::from(allocated) << 64) / profit) as u64;
        Self {
            allocated,
            profit,
            reciprocal,
        }
    }

    /// The floor of the share and its remainder (numerator units, < profit).
    #[inline]
    fn share(self, pnl: u64) -> (u64, u128) {
        let estimate = ((u128::from(pnl) * u128::from(self.reciprocal)) >> 64) as u64;
        let remainder = self.remainder(pnl, estimate);
        // Branch-free: the estimate is one short about as often as not.
        let short = remainder >= self.profit;
        let correction = self.profit & u128::from(short).wrapping_neg();
        (estimate + u64::from(short), remainder - correction)
    }

    /// allocated × pnl − floor × profit: the remainder of a known floor, without dividing.
    #[inline]
    fn remainder(self, pnl: u64, floor: u64) -> u128 {
        u128::from(self.allocated) * u128::from(pnl) - u128::from(floor) * self.profit
    }
}

/// The order of the leftover units: larger remainder, then larger pnl, then smaller
/// position_id. Unique per position because position ids are.
type Rank = (u128, i64, Reverse<u64>);

/// How each participant's share is taken.
#[derive(Clone, Copy)]
enum Shares {
    /// Everyone pays their whole pnl (allocated = profit): no division, no leftover.
    Whole,
    /// Floors by the divider; remainders bucketed by `>> shift`.
    Divided { divider: Divider, shift: u32 },
}

impl Shares {
    /// The floor of the share of `pnl` and its remainder's bucket.
    #[inline]
    fn of(self, pnl: u64) -> (u64, u16) {
        match self {
            Self::Whole => (pnl, 0),
            Self::Divided { divider, shift } => {
                let (floor, remainder) = divider.share(pnl);
                (floor, (remainder >> shift) as u16)
            }
        }
    }
}

/// Who gets a leftover unit: the rows whose remainder bucket is above `bucket`, and the
/// rows in it ranked at or above `kth`.
#[derive(Clone, Copy)]
struct Units {
    divider: Divider,
    bucket: u16,
    kth: Rank,
}

/// The pro-rata split among the participants (profitable positions with pnl >= `pnl_min`;
/// `chunk_counts` of them in each input chunk, `rows` in all).
pub(crate) struct Split<'a> {
    pub positions: Positions<'a>,
    pub layout: &'a Layout,
    pub chunk_counts: &'a [u32],
    pub pnl_min: i64,
    pub rows: usize,
    pub allocated: u64,
    pub profit: u128,
}

/// The output columns while they are written, with the remainder buckets.
struct Output {
    columns: Columns,
    bucket: Vec<u16>,
}

/// What the write pass adds up: the floors' total, the rows written, the remainder
/// histogram (empty stands for all zeros).
struct Written {
    floors: u128,
    rows: usize,
    histogram: Vec<u64>,
}

impl Written {
    fn zero() -> Self {
        Self {
            floors: 0,
            rows: 0,
            histogram: Vec::new(),
        }
    }

    fn plus(mut self, other: Self) -> Self {
        self.floors += other.floors;
        self.rows += other.rows;
        if self.histogram.is_empty() {
            self.histogram = other.histogram;
        } else {
            let counts = self.histogram.iter_mut().zip(other.histogram);
            counts.for_each(|(a, b)| *a += b);
        }
        self
    }
}

impl Split<'_> {
    /// Rules 6 and 7, with the result checks: the amounts sum to `allocated` and each is
    /// within [0, pnl] (rows at 0 are then dropped).
    pub(crate) fn run(&self) -> Result<Columns, AllocError> {
        if self.allocated == 0 {
            return Ok(Columns::default());
        }
        let (shares, buckets) = if u128::from(self.allocated) == self.profit {
            (Shares::Whole, 1)
        } else {
            let shift = (128 - (self.profit - 1).leading_zeros()).saturating_sub(REMAINDER_BITS);
            let divider = Divider::new(self.allocated, self.profit);
            let buckets = ((self.profit - 1) >> shift) as usize + 1;
            (Shares::Divided { divider, shift }, buckets)
        };
        // Zeroed, not uninitialised: fresh pages are zero anyway, and a row left unwritten
        // by a bug is then a wrong value the checks catch, never undefined behaviour.
        // The dense ranks also use the bucket column as scratch.
        let ranked = matches!(self.layout, Layout::Mapped(RowMap::Ranked(_)));
        let bucket_rows = if matches!(shares, Shares::Whole) && !ranked {
            0
        } else {
            self.rows
        };
        let mut out = Output {
            columns: Columns {
                position_id: zeroed(self.rows),
                account_id: zeroed(self.rows),
                pnl: zeroed(self.rows),
                amount: zeroed(self.rows),
            },
            bucket: zeroed(bucket_rows),
        };
        let written = match self.layout {
            Layout::Ascending => self.write_in_order(&mut out, shares, buckets),
            Layout::Mapped(RowMap::Ranked(ranks)) => {
                self.write_ranked(&mut out, shares, buckets, ranks)
            }
            Layout::Mapped(RowMap::Mapped(rows)) => {
                self.write_mapped(&mut out, shares, buckets, rows)
            }
        };
        if written.rows != self.rows {
            return Err(AllocError::InvariantBroken(
                "the rows written differ from the participant count",
            ));
        }
        let units = match shares {
            Shares::Whole => None,
            Shares::Divided { divider, .. } => {
                let leftover = u128::from(self.allocated) - written.floors;
                select_units(&out, divider, &written.histogram, leftover as u64)
            }
        };
        let (total, bounded, zeros) = add_units(&mut out, units);
        if total != u128::from(self.allocated) {
            return Err(AllocError::InvariantBroken(
                "the amounts do not sum to allocated_total",
            ));
        }
        if !bounded {
            return Err(AllocError::InvariantBroken("an amount is outside [0, pnl]"));
        }
        let mut columns = out.columns;
        if zeros > 0 {
            drop_zero_rows(&mut columns);
        }
        Ok(columns)
    }

    /// Calls `put(index, pnl, floor, bucket)` for each participant in `range` of the input,
    /// in input order, and adds them to `written`.
    #[inline]
    fn write_range(
        &self,
        range: Range<usize>,
        shares: Shares,
        written: &mut Written,
        mut put: impl FnMut(usize, i64, u64, u16),
    ) {
        self.for_each_participant(range, |index, value| {
            let (floor, bucket) = shares.of(value as u64);
            put(index, value, floor, bucket);
            written.histogram[usize::from(bucket)] += 1;
            written.floors += u128::from(floor);
            written.rows += 1;
        });
    }

    /// Ascending ids: input chunk k's participants fill the k-th slice of the rows.
    fn write_in_order(&self, out: &mut Output, shares: Shares, buckets: usize) -> Written {
        let Positions {
            position_id,
            account_id,
            ..
        } = self.positions;
        let counts = self.chunk_counts;
        let bucket_counts: &[u32] = if out.bucket.is_empty() { &[] } else { counts };
        let parts: Vec<_> = split_by_counts(&mut out.columns.position_id, counts)
            .into_iter()
            .zip(split_by_counts(&mut out.columns.account_id, counts))
            .zip(split_by_counts(&mut out.columns.pnl, counts))
            .zip(split_by_counts(&mut out.columns.amount, counts))
            .zip(pad(
                split_by_counts(&mut out.bucket, bucket_counts),
                counts.len(),
            ))
            .enumerate()
            .collect();
        let n = self.positions.pnl.len();
        parts
            .into_par_iter()
            .fold(
                || Written {
                    histogram: vec![0; buckets],
                    ..Written::zero()
                },
                |mut written, (chunk, ((((ids, accounts), pnl), amount), bucket))| {
                    let start = chunk * CHUNK_LEN;
                    let range = start..(start + CHUNK_LEN).min(n);
                    let mut row = 0;
                    let has_bucket = !bucket.is_empty();
                    self.write_range(range, shares, &mut written, |index, value, floor, b| {
                        ids[row] = position_id[index];
                        accounts[row] = account_id[index];
                        pnl[row] = value;
                        amount[row] = floor as i64;
                        if has_bucket {
                            bucket[row] = b;
                        }
                        row += 1;
                    });
                    written
                },
            )
            .reduce(Written::zero, Written::plus)
    }

    /// Dense unordered ids, in two passes that each stay in cache. First each half of the
    /// input buckets its participants by block of id slots (account, pnl and the slot's
    /// offset in its block), into the rows of that block, in the columns the block fills
    /// last (position_id, amount, bucket) and its own part of them. Then each block places
    /// its rows within its own window of rows, writes their ids from the ranks and takes
    /// their shares.
    fn write_ranked(
        &self,
        out: &mut Output,
        shares: Shares,
        buckets: usize,
        ranks: &DenseRanks,
    ) -> Written {
        let Positions {
            position_id,
            account_id,
            ..
        } = self.positions;
        let n = self.positions.pnl.len();
        let Output { columns, bucket } = out;
        let halves_counts: Vec<u32> = ranks
            .blocks
            .iter()
            .flat_map(|block| [block.first, block.count - block.first])
            .collect();
        type Scratch<'s> = (&'s mut [u64], &'s mut [i64], &'s mut [u16]);
        let mut halves: [Vec<Scratch<'_>>; 2] = [Vec::new(), Vec::new()];
        let parts = split_by_counts(&mut columns.position_id, &halves_counts)
            .into_iter()
            .zip(split_by_counts(&mut columns.amount, &halves_counts))
            .zip(split_by_counts(bucket, &halves_counts));
        for (part, ((accounts, pnl), offsets)) in parts.enumerate() {
            halves[part % 2].push((accounts, pnl, offsets));
        }
        let (min, half) = (ranks.min, ranks.half);
        let visited: usize = halves
            .into_par_iter()
            .enumerate()
            .map(|(which, mut blocks)| {
                let range = (which * half).min(n)..((which + 1) * half).min(n);
                let mut cursors = vec![0usize; blocks.len()];
                self.for_each_participant(range, |index, value| {
                    let slot = position_id[index] - min;
                    let block = (slot >> BLOCK_SLOTS_BITS) as usize;
                    let cursor = cursors[block];
                    cursors[block] += 1;
                    let (accounts, pnl, offsets) = &mut blocks[block];
                    accounts[cursor] = account_id[index];
                    pnl[cursor] = value;
                    offsets[cursor] = slot as u16;
                });
                // Every block's part filled: as many participants as the ranks counted.
                let filled = cursors.iter().zip(&blocks);
                if filled.clone().all(|(&cursor, part)| cursor == part.0.len()) {
                    cursors.iter().sum()
                } else {
                    usize::MAX
                }
            })
            .reduce(|| 0, usize::saturating_add);
        let counts: Vec<u32> = ranks.blocks.iter().map(|block| block.count).collect();
        let blocks: Vec<_> = split_by_counts(&mut columns.position_id, &counts)
            .into_iter()
            .zip(split_by_counts(&mut columns.account_id, &counts))
            .zip(split_by_counts(&mut columns.pnl, &counts))
            .zip(split_by_counts(&mut columns.amount, &counts))
            .zip(split_by_counts(bucket, &counts))
            .enumerate()
            .collect();
        let written = blocks
            .into_par_iter()
            .fold(
                || Written {
                    histogram: vec![0; buckets],
                    ..Written::zero()
                },
                |mut written, (block, ((((ids, accounts), pnl), amount), bucket))| {
                    let start = ranks.block_start(block);
                    let base = block << BLOCK_SLOTS_BITS;
                    for ((&account, &value), &offset) in ids.iter().zip(&*amount).zip(&*bucket) {
                        let row = ranks.rank(base + usize::from(offset)) - start;
                        accounts[row] = account;
                        pnl[row] = value;
                    }
                    ranks.write_block_ids(block, ids);
                    for ((amount, bucket), &value) in amount.iter_mut().zip(bucket).zip(&*pnl) {
                        let (floor, b) = shares.of(value as u64);
                        *amount = floor as i64;
                        *bucket = b;
                        written.histogram[usize::from(b)] += 1;
                        written.floors += u128::from(floor);
                    }
                    written
                },
            )
            .reduce(Written::zero, Written::plus);
        Written {
            rows: visited,
            ..written
        }
    }

    /// Unordered ids: each participant's row from the map. The threads scatter only what
    /// the input holds (account and pnl, and the id unless the map lists the ids), then
    /// take the shares over the rows in order.
    fn write_mapped(
        &self,
        out: &mut Output,
        shares: Shares,
        buckets: usize,
        map: &[u32],
    ) -> Written {
        let Positions {
            position_id,
            account_id,
            pnl,
        } = self.positions;
        let shared = SharedRows::new(&mut out.columns);
        let n = pnl.len();
        let rows = (0..n.div_ceil(CHUNK_LEN))
            .into_par_iter()
            .map(|chunk| {
                let (start, end) = (chunk * CHUNK_LEN, (chunk * CHUNK_LEN + CHUNK_LEN).min(n));
                let mut rows = 0;
                self.for_each_participant(start..end, |index, value| {
                    let id = position_id[index];
                    shared.put(map[index] as usize, id, account_id[index], value);
                    rows += 1;
                });
                rows
            })
            .sum();
        let Output { columns, bucket } = out;
        let written = columns
            .amount
            .par_chunks_mut(CHUNK_LEN)
            .zip(columns.pnl.par_chunks(CHUNK_LEN))
            .zip(pad(
                bucket.chunks_mut(CHUNK_LEN).collect(),
                rows_chunks(self.rows),
            ))
            .fold(
                || Written {
                    histogram: vec![0; buckets],
                    ..Written::zero()
                },
                |mut written, ((amount, pnl), bucket)| {
                    let has_bucket = !bucket.is_empty();
                    for (row, &value) in pnl.iter().enumerate() {
                        let (floor, b) = shares.of(value as u64);
                        amount[row] = floor as i64;
                        if has_bucket {
                            bucket[row] = b;
                        }
                        written.histogram[usize::from(b)] += 1;
                        written.floors += u128::from(floor);
                    }
                    written
                },
            )
            .reduce(Written::zero, Written::plus);
        Written { rows, ..written }
    }

    /// Calls `visit(index, pnl)` for each participant in `range` of the input, in order.
    /// Block by block: the participants' offsets are gathered first without branching
    /// (which participates is as good as random), then visited.
    #[inline]
    fn for_each_participant(&self, range: Range<usize>, mut visit: impl FnMut(usize, i64)) {
        const BLOCK: usize = 1024;
        let mut offsets = [0u16; BLOCK];
        for start in range.clone().step_by(BLOCK) {
            let pnl = &self.positions.pnl[start..(start + BLOCK).min(range.end)];
            let mut count = 0;
            for (offset, &value) in pnl.iter().enumerate() {
                offsets[count % BLOCK] = offset as u16;
                count += usize::from(value >= self.pnl_min);
            }
            for &offset in &offsets[..count] {
                visit(start + usize::from(offset), pnl[usize::from(offset)]);
            }
        }
    }
}

/// A zeroed column. Large ones are fresh pages, faulted in on their first write: asking for
/// huge pages where the kernel offers them (transparent huge pages on request) takes one
/// fault per 2 MiB instead of per 4 KiB, and fewer TLB misses while rows are scattered.
pub(crate) fn zeroed<T: Copy + Default>(len: usize) -> Vec<T> {
    let mut column = vec![T::default(); len];
    advise_huge_pages(&mut column);
    column
}

/// `len` default items whose pages are asked for as huge pages before they are first
/// written (for item types that `vec!` fills by writing, where `zeroed` would advise only
/// after every page had been faulted in).
pub(crate) fn filled<T: Copy + Default>(len: usize) -> Vec<T> {
    let mut items: Vec<T> = Vec::with_capacity(len);
    advise_huge_pages(items.spare_capacity_mut());
    items.resize(len, T::default());
    items
}

#[cfg(target_os = "linux")]
fn advise_huge_pages<T>(column: &mut [T]) {
    extern "C" {
        fn madvise(addr: *mut std::ffi::c_void, len: usize, advice: std::ffi::c_int) -> i32;
    }
    const MADV_HUGEPAGE: std::ffi::c_int = 14;
    const HUGE_PAGE: usize = 2 << 20;
    let start = column.as_mut_ptr() as usize;
    let end = start + std::mem::size_of_val(column);
    let (low, high) = (start.next_multiple_of(HUGE_PAGE), end & !(HUGE_PAGE - 1));
    if low < high {
        // SAFETY: the range lies within the column's allocation, which this function holds
        // borrowed; the advice changes how pages are backed, never their contents. A
        // refusal (no transparent huge pages) is harmless and ignored.
        unsafe {
            madvise(low as *mut std::ffi::c_void, high - low, MADV_HUGEPAGE);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages<T>(_column: &mut [T]) {}

fn rows_chunks(rows: usize) -> usize {
    rows.div_ceil(CHUNK_LEN)
}

/// The input's part of the output rows as raw parts, for threads that each write their
/// own rows.
struct SharedRows {
    position_id: *mut u64,
    account_id: *mut u64,
    pnl: *mut i64,
    len: usize,
}

// SAFETY: the pointers are only written through `put`, at rows that no two calls share.
unsafe impl Sync for SharedRows {}

impl SharedRows {
    fn new(columns: &mut Columns) -> Self {
        Self {
            position_id: columns.position_id.as_mut_ptr(),
            account_id: columns.account_id.as_mut_ptr(),
            pnl: columns.pnl.as_mut_ptr(),
            len: columns.pnl.len(),
        }
    }

    /// Writes row `row`. Callers write each row at most once: the rows come from a
    /// `RowMap`, which gives distinct participants (distinct ids) distinct rows.
    #[inline]
    fn put(&self, row: usize, id: u64, account: u64, pnl: i64) {
        assert!(row < self.len, "row {row} outside the {} rows", self.len);
        // SAFETY: `row` is in bounds of every column (checked above; all have `len` rows).
        // The columns are live and not otherwise accessed while the scatter runs (their
        // owner is borrowed mutably by `write_mapped` throughout). No other thread writes
        // this row, as the map's rows are distinct, so the writes never race.
        unsafe {
            self.position_id.add(row).write(id);
            self.account_id.add(row).write(account);
            self.pnl.add(row).write(pnl);
        }
    }
}

fn split_by_counts<'a, T>(mut rest: &'a mut [T], counts: &[u32]) -> Vec<&'a mut [T]> {
    counts
        .iter()
        .map(|&count| {
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(count as usize);
            rest = tail;
            head
        })
        .collect()
}

/// `parts` padded with empty slices to `len` (for the bucket column when none is kept).
fn pad<T>(mut parts: Vec<&mut [T]>, len: usize) -> Vec<&mut [T]> {
    parts.resize_with(len, Default::default);
    parts
}

/// The rank of row `row` of `columns`, whose amount is still the floor of its share.
fn rank(columns: &Columns, divider: Divider, row: usize) -> Rank {
    let (pnl, floor) = (columns.pnl[row], columns.amount[row]);
    let remainder = divider.remainder(pnl as u64, floor as u64);
    (remainder, pnl, Reverse(columns.position_id[row]))
}

/// The `leftover` largest ranks: the bucket holding the last of them (from the histogram),
/// and that one's rank, found among the bucket's rows only. `None` when nothing is left.
fn select_units(out: &Output, divider: Divider, histogram: &[u64], leftover: u64) -> Option<Units> {
    if leftover == 0 {
        return None;
    }
    let mut above = 0u64;
    let bucket = (0..histogram.len())
        .rev()
        .find(|&bucket| {
            above += histogram[bucket];
            above >= leftover
        })
        .expect("fewer units are left over than there are participants");
    let position = (leftover - (above - histogram[bucket]) - 1) as usize;
    let bucket = bucket as u16;
    let mut ranks: Vec<Rank> = out
        .bucket
        .par_chunks(CHUNK_LEN)
        .enumerate()
        .flat_map_iter(|(chunk, buckets)| {
            let rows = buckets.iter().enumerate();
            rows.filter(move |&(_, &b)| b == bucket)
                .map(move |(row, _)| rank(&out.columns, divider, chunk * CHUNK_LEN + row))
        })
        .collect();
    let (_, kth, _) = ranks.select_nth_unstable_by(position, |a, b| b.cmp(a));
    Some(Units {
        divider,
        bucket,
        kth: *kth,
    })
}

/// Adds the leftover units and checks the amounts: returns their total, whether each is
/// within [0, pnl], and how many are 0.
fn add_units(out: &mut Output, units: Option<Units>) -> (u128, bool, usize) {
    let Columns {
        position_id,
        pnl,
        amount,
        ..
    } = &mut out.columns;
    let bucket = &out.bucket;
    amount
        .par_chunks_mut(CHUNK_LEN)
        .zip(pnl.par_chunks(CHUNK_LEN))
        .enumerate()
        .map(|(chunk, (amount, pnl))| {
            let start = chunk * CHUNK_LEN;
            if let Some(units) = units {
                let buckets = &bucket[start..start + amount.len()];
                for (row, (amount, &b)) in amount.iter_mut().zip(buckets).enumerate() {
                    // Branch-free above or below the bucket (as good as random); its own
                    // rows, rare, are ranked.
                    let unit = if b == units.bucket {
                        let value = pnl[row];
                        let remainder = units.divider.remainder(value as u64, *amount as u64);
                        let rank = (remainder, value, Reverse(position_id[start + row]));
                        rank >= units.kth
                    } else {
                        b > units.bucket
                    };
                    *amount += i64::from(unit);
                }
            }
            let (mut total, mut bounded, mut zeros) = (0u128, true, 0usize);
            for (&amount, &pnl) in amount.iter().zip(pnl) {
                total += u128::from(amount as u64);
                bounded &= 0 <= amount && amount <= pnl;
                zeros += usize::from(amount == 0);
            }
            (total, bounded, zeros)
        })
        .reduce(|| (0, true, 0), |a, b| (a.0 + b.0, a.1 && b.1, a.2 + b.2))
}

/// Rule 7: only allocations with amount > 0 are returned. Rare rows; compacted in place.
fn drop_zero_rows(columns: &mut Columns) {
    let Columns {
        position_id: ids,
        account_id: accounts,
        pnl,
        amount,
    } = columns;
    let first = amount.iter().position(|&a| a == 0).unwrap_or(amount.len());
    let mut kept = first;
    for row in first..amount.len() {
        if amount[row] != 0 {
            ids[kept] = ids[row];
            accounts[kept] = accounts[row];
            pnl[kept] = pnl[row];
            amount[kept] = amount[row];
            kept += 1;
        }
    }
    ids.truncate(kept);
    accounts.truncate(kept);
    pnl.truncate(kept);
    amount.truncate(kept);
}
