//! Account ranking (issue 13, item 5): the cut ranks accounts, not positions.
//!
//! Why: under the seed's rule a user who splits one large profitable position into many small
//! ones can fall below the coverage cut and pay nothing. Ranked by account, an account's profit
//! is the sum of its profitable positions' pnl (its losing positions do not offset it), so how
//! it is split into positions no longer moves it in the ranking.
//!
//! How, over the columns, in five steps:
//! 1. A survey pass: whether the position ids ascend and their range, and the range of the
//!    profitable positions' account ids.
//! 2. The profitable positions grouped by account: a parallel partition into buckets by the top
//!    bits of the account id (so the buckets follow account order), then each bucket, small
//!    enough to stay in cache, sorted by account (by counting over its span of account ids
//!    when they are dense, as they usually are). Its runs are the accounts and their profits.
//!    Each entry carries its position's key in position_id order (its input index when the
//!    ids ascend, its id otherwise), read in input order, so no later step looks an id up at
//!    random.
//! 3. The accounts go through [`crate::allocate`] as if each were a position whose pnl is its
//!    profit and whose id is its account id: the same cut, widening and largest-remainder
//!    split, by the same code, so by the same rules. They come out in account order, as the
//!    buckets are, and each bucket finds its own accounts' charges by a merge.
//! 4. Each charged account's charge split over its profitable positions pro rata by pnl, bucket
//!    by bucket (the leftover units by larger remainder, then larger pnl, then smaller
//!    position_id), each position's share computed without a division.
//! 5. The positions charged something, in position_id order. When the ids ascend, input order
//!    is theirs: each amount is put at its input index, and one pass in input order takes the
//!    charged positions. Otherwise a second partition by id, each bucket sorted.
//!
//! An account's profit is refused above i64 (`AllocError::AccountProfitTooLarge`, naming the
//! smallest such account): the cut and the split take i64 profits, and a clearing system whose
//! one account made more than 2^63 - 1 minor units in a cycle has a bug to look at first.

use std::cmp::Reverse;
use std::marker::PhantomData;
use std::ops::Range;

use rayon::prelude::*;

use crate::ids::RowMap;
use crate::split::{filled, zeroed};
use crate::{allocate as allocate_positions, AllocError, Allocation, Policy, Positions};
use crate::{Summary, CHUNK_LEN};

/// Items per bucket a partition aims at: a bucket's items then fit in L1/L2 while it is sorted.
const BUCKET_ITEMS: usize = 1 << 11;
/// The most buckets of a partition: each pass scatters to one cursor per bucket.
const BUCKETS_MAX: usize = 1 << 12;
/// Source positions per part of a partition (a part histograms and scatters its own range).
const PART_LEN_MIN: usize = CHUNK_LEN;
/// Parts per thread, so that a slow part does not hold the others up.
const PARTS_PER_THREAD: usize = 4;

/// A profitable position, as grouped by account: `key` orders positions as their ids do (see
/// [`Tie`]), read once in input order so that no later step looks the id up at random.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Entry {
    account: u64,
    pnl: i64,
    key: u64,
}

/// A position charged something, as put in position_id order by its `key`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Row {
    key: u64,
    account: u64,
    pnl: i64,
    amount: i64,
}

/// One account: its id, its profit (a u128 sum, checked against i64 after) and where its
/// entries lie within its bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Account {
    id: u64,
    profit: u128,
    start: u32,
    len: u32,
}

/// Allocates a cycle's loss with the cut over accounts (see the module docs). The output is
/// per position, in position_id order, with the summary's counts and profits at the cut
/// speaking of accounts; requires `positions` checked by `crate::check_input`.
pub(crate) fn allocate(
    loss: i64,
    fund_balance: i64,
    policy: Policy,
    positions: Positions<'_>,
) -> Result<Allocation, AllocError> {
    let Positions {
        position_id, pnl, ..
    } = positions;
    let survey = survey(positions);
    // The duplicate check, as the position ranking makes it: nothing to do when the ids
    // ascend, otherwise the row map (its rows are not needed: nobody has pnl above i64::MAX).
    if !survey.ascending {
        RowMap::build(position_id, pnl, i64::MAX, survey.id_min, survey.id_max)
            .map_err(AllocError::DuplicatePositionId)?;
    }
    let groups = Groups::build(positions, &survey);
    if let Some(too_large) = groups.too_large() {
        return Err(AllocError::AccountProfitTooLarge {
            account_id: too_large.id,
            profit: too_large.profit,
        });
    }
    let (account_id, profit) = groups.columns();
    let by_account = allocate_positions(
        loss,
        fund_balance,
        policy,
        Positions {
            position_id: &account_id,
            account_id: &account_id,
            pnl: &profit,
        },
    )?;
    let amounts = groups.split(&by_account)?;
    let total: u128 = amounts.iter().map(|&amount| amount as u128).sum();
    if total != u128::from(by_account.summary.allocated_total as u64) {
        return Err(AllocError::InvariantBroken(
            "the positions' amounts do not sum to allocated_total",
        ));
    }
    let columns = Output::new(positions, &survey).write(&groups.entries, &amounts);
    Ok(Allocation {
        summary: Summary {
            positions_total: position_id.len() as u64,
            ..by_account.summary
        },
        position_id: columns.position_id,
        account_id: columns.account_id,
        pnl: columns.pnl,
        amount: columns.amount,
    })
}

/// What the first pass learns: the ids' order and range, and the profitable positions' count
/// and account range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Survey {
    /// The ids are strictly ascending (vacuously so when there are none).
    ascending: bool,
    id_min: u64,
    id_max: u64,
    profitable: usize,
    account_min: u64,
    account_max: u64,
}

impl Survey {
    const EMPTY: Self = Self {
        ascending: true,
        id_min: u64::MAX,
        id_max: 0,
        profitable: 0,
        account_min: u64::MAX,
        account_max: 0,
    };

    /// The ranges and counts of two surveys together (the order of the ids across them is
    /// the caller's to judge).
    fn join(self, other: Self) -> Self {
        Self {
            ascending: self.ascending && other.ascending,
            id_min: self.id_min.min(other.id_min),
            id_max: self.id_max.max(other.id_max),
            profitable: self.profitable + other.profitable,
            account_min: self.account_min.min(other.account_min),
            account_max: self.account_max.max(other.account_max),
        }
    }
}

/// The first pass, by chunks in parallel.
fn survey(positions: Positions<'_>) -> Survey {
    let Positions {
        position_id,
        account_id,
        pnl,
    } = positions;
    let chunks: Vec<Survey> = position_id
        .par_chunks(CHUNK_LEN)
        .zip(account_id.par_chunks(CHUNK_LEN))
        .zip(pnl.par_chunks(CHUNK_LEN))
        .map(|((ids, accounts), pnl)| survey_chunk(ids, accounts, pnl))
        .collect();
    // Ascending across chunks: each chunk's ids ascend and its first id follows the last one.
    let ascending = chunks.iter().all(|chunk| chunk.ascending)
        && chunks
            .windows(2)
            .all(|pair| pair[0].id_max < pair[1].id_min);
    let all = chunks.into_iter().fold(Survey::EMPTY, Survey::join);
    Survey { ascending, ..all }
}

/// One chunk: branch-free over independent lanes for the ranges (a running min or max waits
/// on each compare before the next).
fn survey_chunk(ids: &[u64], accounts: &[u64], pnl: &[i64]) -> Survey {
    const LANES: usize = 8;
    let ascending = ids.windows(2).all(|pair| pair[0] < pair[1]);
    let (mut id_low, mut id_high) = ([u64::MAX; LANES], [0u64; LANES]);
    let (mut low, mut high) = ([u64::MAX; LANES], [0u64; LANES]);
    let mut profitable = 0usize;
    for start in (0..ids.len()).step_by(LANES) {
        let end = (start + LANES).min(ids.len());
        for lane in 0..end - start {
            let (id, account, value) =
                (ids[start + lane], accounts[start + lane], pnl[start + lane]);
            id_low[lane] = id_low[lane].min(id);
            id_high[lane] = id_high[lane].max(id);
            let profit = value > 0;
            low[lane] = low[lane].min(if profit { account } else { u64::MAX });
            high[lane] = high[lane].max(if profit { account } else { 0 });
            profitable += usize::from(profit);
        }
    }
    let min = |lanes: [u64; LANES]| lanes.into_iter().min().unwrap_or(u64::MAX);
    let max = |lanes: [u64; LANES]| lanes.into_iter().max().unwrap_or(0);
    Survey {
        ascending,
        id_min: min(id_low),
        id_max: max(id_high),
        profitable,
        account_min: if profitable > 0 { min(low) } else { u64::MAX },
        account_max: max(high),
    }
}

/// Calls `visit(index, pnl)` for each profitable position in `range`, in order. Block by
/// block: the offsets of the profitable ones are gathered first without branching (which is
/// profitable is as good as random), then visited.
#[inline]
fn for_each_profitable(pnl: &[i64], range: Range<usize>, mut visit: impl FnMut(usize, i64)) {
    const BLOCK: usize = 1024;
    let mut offsets = [0u16; BLOCK];
    for start in range.clone().step_by(BLOCK) {
        let block = &pnl[start..(start + BLOCK).min(range.end)];
        let mut count = 0;
        for (offset, &value) in block.iter().enumerate() {
            offsets[count % BLOCK] = offset as u16;
            count += usize::from(value > 0);
        }
        for &offset in &offsets[..count] {
            visit(start + usize::from(offset), block[usize::from(offset)]);
        }
    }
}

/// Buckets over the keys `min..=max`, each a range of 2^shift keys: a bucket's keys are all
/// below the next bucket's.
#[derive(Clone, Copy, Debug)]
struct KeyRange {
    min: u64,
    shift: u32,
    buckets: usize,
}

impl KeyRange {
    /// About `items / BUCKET_ITEMS` buckets (at most `BUCKETS_MAX`) over `min..=max`.
    fn new(min: u64, max: u64, items: usize) -> Self {
        debug_assert!(min <= max);
        let wanted = (items / BUCKET_ITEMS)
            .clamp(1, BUCKETS_MAX)
            .next_power_of_two();
        let bits = 64 - (max - min).leading_zeros();
        let shift = bits.saturating_sub(wanted.trailing_zeros()).min(63);
        Self {
            min,
            shift,
            buckets: ((max - min) >> shift) as usize + 1,
        }
    }

    #[inline]
    fn bucket(self, key: u64) -> usize {
        ((key - self.min) >> self.shift) as usize
    }

    /// Sorts one bucket's items by key. A bucket spans 2^shift keys: when its items are not
    /// far fewer (dense ids, the usual case), by counting over its span, in two linear passes;
    /// otherwise by comparison.
    fn sort_bucket<T: Copy + Default>(
        self,
        items: &mut [T],
        bucket: usize,
        scratch: &mut Scratch<T>,
        key: impl Fn(&T) -> u64,
    ) {
        let span = 1usize.checked_shl(self.shift).unwrap_or(usize::MAX);
        if items.len() < 2 || span > COUNTING_SPAN_PER_ITEM * items.len().max(64) {
            items.sort_unstable_by_key(key);
            return;
        }
        let base = self.min + ((bucket as u64) << self.shift);
        let offset = |item: &T| (key(item) - base) as usize;
        let Scratch {
            items: sorted,
            counts,
        } = scratch;
        counts.clear();
        counts.resize(span + 1, 0);
        for item in items.iter() {
            counts[offset(item) + 1] += 1;
        }
        for at in 1..counts.len() {
            counts[at] += counts[at - 1];
        }
        sorted.clear();
        sorted.resize(items.len(), T::default());
        for item in items.iter() {
            let slot = &mut counts[offset(item)];
            sorted[*slot as usize] = *item;
            *slot += 1;
        }
        items.copy_from_slice(sorted);
    }
}

/// The most keys a bucket's span may hold per item for it to be sorted by counting.
const COUNTING_SPAN_PER_ITEM: usize = 8;

/// Reused buffers of a thread's bucket sorts.
struct Scratch<T> {
    items: Vec<T>,
    counts: Vec<u32>,
}

impl<T> Default for Scratch<T> {
    fn default() -> Self {
        Self {
            items: Vec::new(),
            counts: Vec::new(),
        }
    }
}

/// What a partition reads: source positions `0..len`, each giving at most one item and its
/// bucket, the same ones each time it is asked.
trait Source: Sync {
    type Item: Copy + Default + Send + Sync;

    fn len(&self) -> usize;

    fn buckets(&self) -> usize;

    /// Calls `put(bucket, item)` for each item of the source positions in `range`, in order.
    fn for_each(&self, range: Range<usize>, put: impl FnMut(usize, Self::Item));
}

/// Items by bucket: bucket-major, and within a bucket in source order (so the result does not
/// depend on how the work was parted).
struct Partition<T> {
    items: Vec<T>,
    counts: Vec<u32>,
}

impl<T> Partition<T> {
    /// Each bucket's items, mutably, with the bucket's index.
    fn buckets_mut(&mut self) -> Vec<&mut [T]> {
        split_by_counts(&mut self.items, &self.counts)
    }
}

/// A counting sort into buckets in two parallel passes over the source: each part (a
/// contiguous range of it) counts its items per bucket, then scatters them into its own
/// slice of each bucket.
fn partition<S: Source>(source: &S) -> Partition<S::Item> {
    let (len, buckets) = (source.len(), source.buckets());
    let parts = (len / PART_LEN_MIN).clamp(1, PARTS_PER_THREAD * rayon::current_num_threads());
    let part_len = len.div_ceil(parts).max(1);
    let ranges: Vec<Range<usize>> = (0..len)
        .step_by(part_len)
        .map(|start| start..(start + part_len).min(len))
        .collect();
    let histograms: Vec<Vec<u32>> = ranges
        .par_iter()
        .map(|range| {
            let mut histogram = vec![0u32; buckets];
            source.for_each(range.clone(), |bucket, _| histogram[bucket] += 1);
            histogram
        })
        .collect();
    let counts: Vec<u32> = (0..buckets)
        .map(|bucket| histograms.iter().map(|part| part[bucket]).sum())
        .collect();
    let total = counts.iter().map(|&count| count as usize).sum();
    let mut items = filled::<S::Item>(total);
    // Bucket-major, part-minor: part p's slice of bucket b is the p-th piece of b's items.
    let mut slices: Vec<Vec<&mut [S::Item]>> =
        ranges.iter().map(|_| Vec::with_capacity(buckets)).collect();
    let mut rest = items.as_mut_slice();
    for bucket in 0..buckets {
        for (part, histogram) in histograms.iter().enumerate() {
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(histogram[bucket] as usize);
            slices[part].push(head);
            rest = tail;
        }
    }
    ranges
        .into_par_iter()
        .zip(slices)
        .for_each(|(range, mut slices)| {
            let mut cursors = vec![0usize; buckets];
            source.for_each(range, |bucket, item| {
                slices[bucket][cursors[bucket]] = item;
                cursors[bucket] += 1;
            });
        });
    Partition { items, counts }
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

/// The profitable positions, bucketed by account id.
struct Profitable<'a> {
    account_id: &'a [u64],
    pnl: &'a [i64],
    tie: Tie<'a>,
    range: KeyRange,
}

impl Source for Profitable<'_> {
    type Item = Entry;

    fn len(&self) -> usize {
        self.pnl.len()
    }

    fn buckets(&self) -> usize {
        self.range.buckets
    }

    #[inline]
    fn for_each(&self, range: Range<usize>, mut put: impl FnMut(usize, Entry)) {
        for_each_profitable(self.pnl, range, |index, pnl| {
            let account = self.account_id[index];
            let entry = Entry {
                account,
                pnl,
                key: self.tie.key(index),
            };
            put(self.range.bucket(account), entry);
        });
    }
}

/// The profitable positions grouped by account: the entries bucket by bucket, each bucket
/// sorted by account, and each bucket's accounts in account order.
struct Groups {
    entries: Vec<Entry>,
    counts: Vec<u32>,
    accounts: Vec<Vec<Account>>,
}

impl Groups {
    fn build(positions: Positions<'_>, survey: &Survey) -> Self {
        if survey.profitable == 0 {
            return Self {
                entries: Vec::new(),
                counts: Vec::new(),
                accounts: Vec::new(),
            };
        }
        let range = KeyRange::new(survey.account_min, survey.account_max, survey.profitable);
        let source = Profitable {
            account_id: positions.account_id,
            pnl: positions.pnl,
            tie: Tie {
                ascending: survey.ascending,
                position_id: positions.position_id,
            },
            range,
        };
        let mut partition = partition(&source);
        let accounts = partition
            .buckets_mut()
            .into_par_iter()
            .enumerate()
            .map_init(Scratch::default, |scratch, (bucket, entries)| {
                group_bucket(entries, range, bucket, scratch)
            })
            .collect();
        Self {
            entries: partition.items,
            counts: partition.counts,
            accounts,
        }
    }

    /// The smallest account whose profit exceeds i64, if any.
    fn too_large(&self) -> Option<Account> {
        let accounts = self.accounts.par_iter().flatten();
        accounts
            .filter(|account| account.profit > i64::MAX as u128)
            .min_by_key(|account| account.id)
            .copied()
    }

    /// The accounts as the position columns of the account-level allocation: ids ascending,
    /// profits (each checked to fit i64 before).
    fn columns(&self) -> (Vec<u64>, Vec<i64>) {
        // Appended bucket by bucket: a parallel collect of a flattened iterator gathers
        // pieces in lists and copies them again, slower than one pass at these sizes.
        let count = self.accounts.iter().map(Vec::len).sum();
        let (mut ids, mut profits) = (Vec::with_capacity(count), Vec::with_capacity(count));
        for accounts in &self.accounts {
            ids.extend(accounts.iter().map(|account| account.id));
            profits.extend(accounts.iter().map(|account| account.profit as i64));
        }
        (ids, profits)
    }

    /// Each entry's amount: each charged account's charge split over its entries, bucket by
    /// bucket. `by_account` is the account-level allocation over `columns()`.
    fn split(&self, by_account: &Allocation) -> Result<Vec<i64>, AllocError> {
        let mut amounts = zeroed::<i64>(self.entries.len());
        if by_account.amount.is_empty() {
            return Ok(amounts);
        }
        let entries = split_by_counts_ref(&self.entries, &self.counts);
        let buckets = split_by_counts(&mut amounts, &self.counts);
        let charged = (&by_account.position_id, &by_account.amount);
        entries
            .into_par_iter()
            .zip(buckets)
            .zip(&self.accounts)
            .try_for_each_init(Vec::new, |scratch, ((entries, amounts), accounts)| {
                let (Some(first), Some(last)) = (accounts.first(), accounts.last()) else {
                    return Ok(());
                };
                let from = charged.0.partition_point(|&id| id < first.id);
                let to = charged.0.partition_point(|&id| id <= last.id);
                let bucket = Bucket { entries, accounts };
                let charges = (&charged.0[from..to], &charged.1[from..to]);
                bucket.split(charges, amounts, scratch)
            })?;
        Ok(amounts)
    }
}

fn split_by_counts_ref<'a, T>(mut rest: &'a [T], counts: &[u32]) -> Vec<&'a [T]> {
    counts
        .iter()
        .map(|&count| {
            let (head, tail) = rest.split_at(count as usize);
            rest = tail;
            head
        })
        .collect()
}

/// Sorts a bucket's entries by account and lists its accounts.
fn group_bucket(
    entries: &mut [Entry],
    range: KeyRange,
    bucket: usize,
    scratch: &mut Scratch<Entry>,
) -> Vec<Account> {
    range.sort_bucket(entries, bucket, scratch, |entry| entry.account);
    let mut accounts: Vec<Account> = Vec::new();
    for (offset, entry) in entries.iter().enumerate() {
        match accounts.last_mut() {
            Some(account) if account.id == entry.account => {
                account.profit += entry.pnl as u128;
                account.len += 1;
            }
            _ => accounts.push(Account {
                id: entry.account,
                profit: entry.pnl as u128,
                start: offset as u32,
                len: 1,
            }),
        }
    }
    accounts
}

/// A position's key in position_id order (how leftover units break a tie of remainder and
/// pnl, and how the output is ordered): its input index when the ids ascend, its id
/// otherwise.
#[derive(Clone, Copy)]
struct Tie<'a> {
    ascending: bool,
    position_id: &'a [u64],
}

impl Tie<'_> {
    #[inline]
    fn key(self, index: usize) -> u64 {
        if self.ascending {
            index as u64
        } else {
            self.position_id[index]
        }
    }

    /// The position_id of a key.
    #[inline]
    fn id(self, key: u64) -> u64 {
        if self.ascending {
            self.position_id[key as usize]
        } else {
            key
        }
    }
}

/// floor(charge × pnl / profit) and its remainder for one account (charge < profit < 2^63), by
/// multiplication, as the position split does it: with m = floor(charge × 2^64 / profit), the
/// estimate (pnl × m) >> 64 is the quotient or one below it (its error, pnl × frac / 2^64, is
/// below 1/2 as pnl < 2^63), and the exact remainder corrects it.
#[derive(Clone, Copy)]
struct Share {
    charge: u64,
    profit: u64,
    reciprocal: u64,
}

impl Share {
    fn new(charge: u64, profit: u64) -> Self {
        debug_assert!(charge < profit);
        let reciprocal = ((u128::from(charge) << 64) / u128::from(profit)) as u64;
        Self {
            charge,
            profit,
            reciprocal,
        }
    }

    /// The floor and the remainder (< profit, so it fits u64).
    #[inline]
    fn of(self, pnl: u64) -> (u64, u64) {
        let estimate = ((u128::from(pnl) * u128::from(self.reciprocal)) >> 64) as u64;
        let remainder = u128::from(self.charge) * u128::from(pnl)
            - u128::from(estimate) * u128::from(self.profit);
        if remainder >= u128::from(self.profit) {
            (estimate + 1, (remainder - u128::from(self.profit)) as u64)
        } else {
            (estimate, remainder as u64)
        }
    }
}

/// The order of the leftover units within an account: larger remainder, then larger pnl, then
/// smaller position_id (unique, so the order is total); the last field is the entry's offset.
type Rank = (u64, i64, Reverse<u64>, u32);

/// One bucket of the grouped entries, with its accounts.
struct Bucket<'a> {
    entries: &'a [Entry],
    accounts: &'a [Account],
}

impl Bucket<'_> {
    /// Splits each charged account's charge (`charges`: ids ascending, amounts) into
    /// `amounts`, aligned with the entries, checking that each account's amounts sum to its
    /// charge and each lies within [0, pnl].
    fn split(
        &self,
        charges: (&[u64], &[i64]),
        amounts: &mut [i64],
        scratch: &mut Vec<Rank>,
    ) -> Result<(), AllocError> {
        let mut accounts = self.accounts.iter();
        for (&id, &charge) in charges.0.iter().zip(charges.1) {
            let Some(account) = accounts.find(|account| account.id == id) else {
                return Err(AllocError::InvariantBroken(
                    "a charged account is not among the grouped accounts",
                ));
            };
            let range = account.start as usize..(account.start + account.len) as usize;
            let (entries, amounts) = (&self.entries[range.clone()], &mut amounts[range]);
            let profit = account.profit as u64;
            if charge < 0 || charge as u64 > profit {
                return Err(AllocError::InvariantBroken(
                    "an account's charge is outside [0, its profit]",
                ));
            }
            let total = split_account(charge as u64, profit, entries, amounts, scratch);
            let bounded = amounts
                .iter()
                .zip(entries)
                .all(|(&amount, entry)| 0 <= amount && amount <= entry.pnl);
            if total != u128::from(charge as u64) || !bounded {
                return Err(AllocError::InvariantBroken(
                    "an account's amounts do not sum to its charge within [0, pnl]",
                ));
            }
        }
        Ok(())
    }
}

/// One account's charge split over its entries pro rata by pnl (`profit` is their pnl total):
/// the floors, then the leftover units (fewer than the entries) to the largest ranks. Returns
/// the amounts' total.
fn split_account(
    charge: u64,
    profit: u64,
    entries: &[Entry],
    amounts: &mut [i64],
    scratch: &mut Vec<Rank>,
) -> u128 {
    if charge == profit {
        for (amount, entry) in amounts.iter_mut().zip(entries) {
            *amount = entry.pnl;
        }
        return u128::from(charge);
    }
    let share = Share::new(charge, profit);
    let mut floors = 0u64;
    scratch.clear();
    for (offset, (amount, entry)) in amounts.iter_mut().zip(entries).enumerate() {
        let (floor, remainder) = share.of(entry.pnl as u64);
        *amount = floor as i64;
        floors += floor;
        scratch.push((remainder, entry.pnl, Reverse(entry.key), offset as u32));
    }
    // Fewer than the entries, as each share's fraction is below one; the checks after
    // catch it should that ever fail.
    let leftover = ((charge - floors) as usize).min(scratch.len());
    if leftover > 0 {
        scratch.select_nth_unstable_by(leftover - 1, |a, b| b.cmp(a));
        for rank in &scratch[..leftover] {
            amounts[rank.3 as usize] += 1;
        }
    }
    amounts.iter().map(|&amount| amount as u128).sum()
}

/// The positions charged something, bucketed by their key in position_id order.
struct Charged<'a> {
    entries: &'a [Entry],
    amounts: &'a [i64],
    range: KeyRange,
}

impl Source for Charged<'_> {
    type Item = Row;

    fn len(&self) -> usize {
        self.entries.len()
    }

    fn buckets(&self) -> usize {
        self.range.buckets
    }

    #[inline]
    fn for_each(&self, range: Range<usize>, mut put: impl FnMut(usize, Row)) {
        let rows = self.entries[range.clone()].iter().zip(&self.amounts[range]);
        for (entry, &amount) in rows {
            if amount > 0 {
                let row = Row {
                    key: entry.key,
                    account: entry.account,
                    pnl: entry.pnl,
                    amount,
                };
                put(self.range.bucket(entry.key), row);
            }
        }
    }
}

/// The output columns: the allocations in ascending position_id order.
#[derive(Default)]
struct Columns {
    position_id: Vec<u64>,
    account_id: Vec<u64>,
    pnl: Vec<i64>,
    amount: Vec<i64>,
}

/// Writes the positions charged something in position_id order.
struct Output<'a> {
    positions: Positions<'a>,
    tie: Tie<'a>,
    keys: (u64, u64),
}

impl<'a> Output<'a> {
    fn new(positions: Positions<'a>, survey: &Survey) -> Self {
        let tie = Tie {
            ascending: survey.ascending,
            position_id: positions.position_id,
        };
        let keys = if survey.ascending {
            (0, positions.pnl.len().saturating_sub(1) as u64)
        } else {
            (survey.id_min, survey.id_max)
        };
        Self {
            positions,
            tie,
            keys,
        }
    }

    fn write(&self, entries: &[Entry], amounts: &[i64]) -> Columns {
        let rows = amounts.par_iter().filter(|&&amount| amount > 0).count();
        if rows == 0 {
            return Columns::default();
        }
        if self.tie.ascending {
            return self.write_ascending(entries, amounts, rows);
        }
        let range = KeyRange::new(self.keys.0, self.keys.1, rows);
        let source = Charged {
            entries,
            amounts,
            range,
        };
        let mut partition = partition(&source);
        let counts = partition.counts.clone();
        let mut columns = Columns {
            position_id: zeroed(rows),
            account_id: zeroed(rows),
            pnl: zeroed(rows),
            amount: zeroed(rows),
        };
        let tie = self.tie;
        partition
            .buckets_mut()
            .into_par_iter()
            .enumerate()
            .zip(split_by_counts(&mut columns.position_id, &counts))
            .zip(split_by_counts(&mut columns.account_id, &counts))
            .zip(split_by_counts(&mut columns.pnl, &counts))
            .zip(split_by_counts(&mut columns.amount, &counts))
            .for_each_init(
                Scratch::default,
                |scratch, (((((index, bucket), ids), accounts), pnl), amount)| {
                    range.sort_bucket(bucket, index, scratch, |row| row.key);
                    for (out, row) in bucket.iter().enumerate() {
                        ids[out] = tie.id(row.key);
                        accounts[out] = row.account;
                        pnl[out] = row.pnl;
                        amount[out] = row.amount;
                    }
                },
            );
        columns
    }
}

impl Output<'_> {
    /// When the ids ascend, input order is position_id order: each amount is put at its
    /// position's input index (a key no two entries share), then one pass in input order
    /// takes the charged positions, with their ids, accounts and pnl read in order. No
    /// partition and no sort.
    fn write_ascending(&self, entries: &[Entry], amounts: &[i64], rows: usize) -> Columns {
        let Positions {
            position_id,
            account_id,
            pnl,
        } = self.positions;
        let mut by_index = zeroed::<i64>(pnl.len());
        let shared = SharedAmounts::new(&mut by_index);
        entries
            .par_chunks(CHUNK_LEN)
            .zip(amounts.par_chunks(CHUNK_LEN))
            .for_each(|(entries, amounts)| {
                for (entry, &amount) in entries.iter().zip(amounts) {
                    if amount > 0 {
                        // SAFETY: each entry is a distinct position, its key its input
                        // index (the ids ascend), so no two puts share an index.
                        unsafe { shared.put(entry.key as usize, amount) };
                    }
                }
            });
        let counts: Vec<u32> = by_index
            .par_chunks(CHUNK_LEN)
            .map(|chunk| chunk.iter().filter(|&&amount| amount > 0).count() as u32)
            .collect();
        let mut columns = Columns {
            position_id: zeroed(rows),
            account_id: zeroed(rows),
            pnl: zeroed(rows),
            amount: zeroed(rows),
        };
        by_index
            .par_chunks(CHUNK_LEN)
            .enumerate()
            .zip(split_by_counts(&mut columns.position_id, &counts))
            .zip(split_by_counts(&mut columns.account_id, &counts))
            .zip(split_by_counts(&mut columns.pnl, &counts))
            .zip(split_by_counts(&mut columns.amount, &counts))
            .for_each(
                |(((((chunk, by_index), ids), accounts), pnls), out_amounts)| {
                    let start = chunk * CHUNK_LEN;
                    let mut out = 0;
                    for (offset, &amount) in by_index.iter().enumerate() {
                        if amount > 0 {
                            let index = start + offset;
                            ids[out] = position_id[index];
                            accounts[out] = account_id[index];
                            pnls[out] = pnl[index];
                            out_amounts[out] = amount;
                            out += 1;
                        }
                    }
                },
            );
        columns
    }
}

/// The amounts by input index, as a raw part for threads that each write their own indexes;
/// it borrows the column, so the column outlives it and nothing else touches it meanwhile.
struct SharedAmounts<'a> {
    amounts: *mut i64,
    len: usize,
    column: PhantomData<&'a mut [i64]>,
}

// SAFETY: only written through `put`, whose callers write distinct indexes.
unsafe impl Sync for SharedAmounts<'_> {}

impl<'a> SharedAmounts<'a> {
    fn new(column: &'a mut [i64]) -> Self {
        Self {
            amounts: column.as_mut_ptr(),
            len: column.len(),
            column: PhantomData,
        }
    }

    /// Writes the amount at `index` (bounds checked).
    ///
    /// # Safety
    /// No two calls, on any threads, may write the same index. Here they do not: the entries
    /// are the profitable positions, each once, and an entry's key is its input index.
    #[inline]
    unsafe fn put(&self, index: usize, amount: i64) {
        assert!(
            index < self.len,
            "index {index} outside the {} positions",
            self.len
        );
        // SAFETY: `index` is in bounds (checked above); the column is borrowed mutably by
        // `self` for its whole life, so nothing else reads or writes it meanwhile; and the
        // caller guarantees that no other call writes this index, so the writes never race.
        unsafe { self.amounts.add(index).write(amount) }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::{allocate_ranked, Ranking};

    /// (position_id, account_id, pnl)
    type Row = (u64, u64, i64);

    fn policy(q: &str, c: &str) -> Policy {
        Policy::parse(q, c).expect("valid test policy")
    }

    fn run(loss: i64, fund: i64, policy: Policy, rows: &[Row]) -> Result<Allocation, AllocError> {
        let ids: Vec<u64> = rows.iter().map(|r| r.0).collect();
        let accounts: Vec<u64> = rows.iter().map(|r| r.1).collect();
        let pnl: Vec<i64> = rows.iter().map(|r| r.2).collect();
        let positions = Positions {
            position_id: &ids,
            account_id: &accounts,
            pnl: &pnl,
        };
        allocate_ranked(loss, fund, policy, Ranking::Account, positions)
    }

    fn amounts(allocation: &Allocation) -> Vec<(u64, i64)> {
        let rows = allocation.position_id.iter().zip(&allocation.amount);
        rows.map(|(&id, &amount)| (id, amount)).collect()
    }

    /// a × b as (high, low) 128-bit halves, to compare products without overflow.
    fn wide_mul(a: u128, b: u128) -> (u128, u128) {
        let (a1, a0) = (a >> 64, a & u128::from(u64::MAX));
        let (b1, b0) = (b >> 64, b & u128::from(u64::MAX));
        let (low, middle1, middle2, high) = (a0 * b0, a1 * b0, a0 * b1, a1 * b1);
        let carry =
            ((low >> 64) + (middle1 & u128::from(u64::MAX)) + (middle2 & u128::from(u64::MAX)))
                >> 64;
        let low = low.wrapping_add(middle1 << 64).wrapping_add(middle2 << 64);
        (high + (middle1 >> 64) + (middle2 >> 64) + carry, low)
    }

    /// `total` split over `weights` (id, weight) by largest remainder: larger remainder,
    /// then larger weight, then smaller id. Full sorts, u128 division.
    fn largest_remainder(total: u128, weights: &[(u64, u128)]) -> BTreeMap<u64, u128> {
        let sum: u128 = weights.iter().map(|w| w.1).sum();
        let mut shares: Vec<(u64, u128, u128, u128)> = weights
            .iter()
            .map(|&(id, weight)| (id, weight, total * weight / sum, total * weight % sum))
            .collect();
        let floors: u128 = shares.iter().map(|s| s.2).sum();
        shares.sort_by_key(|&(id, weight, _, remainder)| (Reverse(remainder), Reverse(weight), id));
        for share in shares.iter_mut().take((total - floors) as usize) {
            share.2 += 1;
        }
        shares.into_iter().map(|s| (s.0, s.2)).collect()
    }

    /// Issue 13's account ranking the obvious way, from the rules' text.
    fn reference(
        loss: i64,
        fund: i64,
        q: (u128, u128),
        c: (u128, u128),
        rows: &[Row],
    ) -> Result<Allocation, AllocError> {
        let fund_share = ((2 * q.0 * loss as u128 + q.1) / (2 * q.1)) as i64;
        let fund_paid = fund_share.min(fund);
        let user_due = loss - fund_paid;
        let mut profits: BTreeMap<u64, u128> = BTreeMap::new();
        for &(_, account, pnl) in rows.iter().filter(|r| r.2 > 0) {
            *profits.entry(account).or_default() += pnl as u128;
        }
        if let Some((&account_id, &profit)) = profits.iter().find(|a| *a.1 > i64::MAX as u128) {
            return Err(AllocError::AccountProfitTooLarge { account_id, profit });
        }
        let profit_total: u128 = profits.values().sum();
        let mut ranked: Vec<u128> = profits.values().copied().collect();
        ranked.sort_by_key(|&p| Reverse(p));
        let (mut cutoff, mut running) = (0u128, 0u128);
        for &profit in &ranked {
            running += profit;
            if wide_mul(running, c.1) >= wide_mul(c.0, profit_total) {
                cutoff = profit;
                break;
            }
        }
        let mut participants: Vec<(u64, u128)> = profits
            .iter()
            .filter(|a| *a.1 >= cutoff)
            .map(|(&id, &profit)| (id, profit))
            .collect();
        let mut participant_profit: u128 = participants.iter().map(|a| a.1).sum();
        let widened = user_due as u128 > participant_profit && participants.len() < profits.len();
        if widened {
            participants = profits.iter().map(|(&id, &profit)| (id, profit)).collect();
            participant_profit = profit_total;
        }
        let allocated_total = (user_due as u128).min(participant_profit);
        let charges = if allocated_total == 0 {
            BTreeMap::new()
        } else {
            largest_remainder(allocated_total, &participants)
        };
        let mut out: Vec<(u64, u64, i64, i64)> = Vec::new();
        for (&account, &charge) in charges.iter().filter(|c| *c.1 > 0) {
            let own: Vec<&Row> = rows.iter().filter(|r| r.1 == account && r.2 > 0).collect();
            let weights: Vec<(u64, u128)> = own.iter().map(|r| (r.0, r.2 as u128)).collect();
            let amounts = largest_remainder(charge, &weights);
            for row in own {
                let amount = amounts[&row.0] as i64;
                assert!(amount <= row.2);
                if amount > 0 {
                    out.push((row.0, row.1, row.2, amount));
                }
            }
        }
        out.sort_unstable();
        Ok(Allocation {
            summary: Summary {
                fund_share,
                fund_paid,
                user_due,
                positions_total: rows.len() as u64,
                profitable_count: profits.len() as u64,
                profit_total,
                cutoff_pnl: cutoff as i64,
                participant_count: participants.len() as u64,
                participant_profit,
                widened,
                allocated_total: allocated_total as i64,
                uncovered: user_due - allocated_total as i64,
            },
            position_id: out.iter().map(|r| r.0).collect(),
            account_id: out.iter().map(|r| r.1).collect(),
            pnl: out.iter().map(|r| r.2).collect(),
            amount: out.iter().map(|r| r.3).collect(),
        })
    }

    /// The brief's example: A, B, C (one position of 150 and three of 40), D; a = 1, ... d = 4.
    const EXAMPLE: [Row; 7] = [
        (1, 1, 500),
        (2, 2, 300),
        (3, 3, 150),
        (4, 3, 40),
        (5, 3, 40),
        (6, 3, 40),
        (7, 4, 10),
    ];

    #[test]
    fn worked_example_ranks_c_second() {
        let a = run(1000, 200, policy("0.2", "0.9"), &EXAMPLE).unwrap();
        let s = a.summary;
        // Accounts 500, 300, 270, 10: 500 + 300 + 270 >= 0.9 × 1080 = 972 at C, so A, B, C.
        assert_eq!((s.fund_share, s.fund_paid, s.user_due), (200, 200, 800));
        assert_eq!(
            (s.positions_total, s.profitable_count, s.profit_total),
            (7, 4, 1080)
        );
        assert_eq!(
            (s.cutoff_pnl, s.participant_count, s.participant_profit),
            (270, 3, 1070)
        );
        assert_eq!((s.widened, s.allocated_total, s.uncovered), (false, 800, 0));
        // A 374, B 224, C 202 (800 × 270 / 1070 = 201.87 plus a unit); C's 202 over
        // 150, 40, 40, 40: 112.2 and 29.9 each, the three units to the 40s.
        let want = [(1, 374), (2, 224), (3, 112), (4, 30), (5, 30), (6, 30)];
        assert_eq!(amounts(&a), want);
        assert_eq!(a.account_id, [1, 2, 3, 3, 3, 3]);
        assert_eq!(a, reference(1000, 200, (2, 10), (9, 10), &EXAMPLE).unwrap());
    }

    /// Splitting one profitable position into many small ones: out of the position cut, not
    /// out of the account cut.
    #[test]
    fn splitting_a_position_does_not_leave_the_account_cut() {
        let mut whole: Vec<Row> = vec![(1, 1, 500), (2, 2, 300), (3, 3, 270), (4, 4, 10)];
        let mut split: Vec<Row> = vec![(1, 1, 500), (2, 2, 300), (4, 4, 10)];
        split.extend((0..27).map(|k| (100 + k, 3, 10)));
        for e in 0..9 {
            whole.push((10 + e, 10 + e, 200));
            split.push((10 + e, 10 + e, 200));
        }
        let p = policy("0.2", "0.9");
        let paid_by_c = |a: &Allocation| -> i64 {
            let rows = a.account_id.iter().zip(&a.amount);
            rows.filter(|r| *r.0 == 3).map(|r| *r.1).sum()
        };
        let positions = |rows: &[Row]| {
            let ids: Vec<u64> = rows.iter().map(|r| r.0).collect();
            let accounts: Vec<u64> = rows.iter().map(|r| r.1).collect();
            let pnl: Vec<i64> = rows.iter().map(|r| r.2).collect();
            (ids, accounts, pnl)
        };
        let (ids, accounts, pnl) = positions(&split);
        let by_position = crate::allocate(
            1000,
            200,
            p,
            Positions {
                position_id: &ids,
                account_id: &accounts,
                pnl: &pnl,
            },
        )
        .unwrap();
        assert_eq!(paid_by_c(&by_position), 0);
        let whole = run(1000, 200, p, &whole).unwrap();
        let split = run(1000, 200, p, &split).unwrap();
        assert!(paid_by_c(&split) > 0);
        assert_eq!(paid_by_c(&split), paid_by_c(&whole));
        assert_eq!(
            split.summary.participant_count,
            whole.summary.participant_count
        );
    }

    #[test]
    fn losing_positions_do_not_offset_an_account() {
        // Account 1: +100 and -1000 (profit 100); account 2: only losses (not profitable).
        let rows = [
            (1, 1, 100),
            (2, 1, -1000),
            (3, 2, -5),
            (4, 2, -7),
            (5, 3, 50),
        ];
        let a = run(60, 0, policy("0", "1"), &rows).unwrap();
        assert_eq!(a.summary.profitable_count, 2);
        assert_eq!(a.summary.profit_total, 150);
        assert_eq!(amounts(&a), [(1, 40), (5, 20)]);
    }

    #[test]
    fn leftover_units_within_an_account_go_by_remainder_then_pnl_then_id() {
        // One account, charge 2 over pnl 5, 5, 5 (ids 30, 10, 20): the two smaller ids.
        let rows = [(30, 7, 5), (10, 7, 5), (20, 7, 5)];
        let a = run(2, 0, policy("0", "1"), &rows).unwrap();
        assert_eq!(amounts(&a), [(10, 1), (20, 1)]);
        // Charge 1 over pnl 1 and 2: the larger remainder (2/3) wins.
        let a = run(1, 0, policy("0", "1"), &[(1, 7, 1), (2, 7, 2)]).unwrap();
        assert_eq!(amounts(&a), [(2, 1)]);
        // Charge 3 over pnl 3, 3, 2, 1 (profit 9): shares 1, 1, 2/3, 1/3 floors 1, 1, 0, 0;
        // one unit left, to the 2/3.
        let rows = [(1, 7, 3), (2, 7, 3), (3, 7, 2), (4, 7, 1)];
        let a = run(3, 0, policy("0", "1"), &rows).unwrap();
        assert_eq!(amounts(&a), [(1, 1), (2, 1), (3, 1)]);
    }

    #[test]
    fn ties_between_accounts_at_the_cut_are_all_in() {
        let rows = [(1, 9, 10), (2, 3, 6), (3, 3, 4), (4, 4, 10), (5, 5, 10)];
        let a = run(100, 0, policy("0", "0.5"), &rows).unwrap();
        assert_eq!(a.summary.cutoff_pnl, 10);
        assert_eq!(a.summary.participant_count, 4);
        assert_eq!(a.summary.uncovered, 60);
        assert_eq!(amounts(&a), [(1, 10), (2, 6), (3, 4), (4, 10), (5, 10)]);
    }

    #[test]
    fn nothing_profitable_and_zero_loss() {
        let a = run(1000, 0, policy("0.2", "0.9"), &[(1, 1, -5), (2, 1, 0)]).unwrap();
        let s = a.summary;
        assert_eq!(
            (s.positions_total, s.profitable_count, s.cutoff_pnl),
            (2, 0, 0)
        );
        assert_eq!((s.allocated_total, s.uncovered), (0, 1000));
        assert!(a.position_id.is_empty());
        let a = run(0, 10, policy("0.2", "0.9"), &[(1, 1, 5)]).unwrap();
        assert_eq!(
            (a.summary.participant_count, a.summary.allocated_total),
            (1, 0)
        );
        assert!(a.position_id.is_empty());
        let a = run(0, 0, policy("0.2", "0.9"), &[]).unwrap();
        assert_eq!(a.summary.positions_total, 0);
    }

    #[test]
    fn an_account_profit_beyond_i64_is_refused_naming_the_smallest_account() {
        let p = policy("0.2", "0.9");
        let rows = [
            (1, 8, i64::MAX),
            (2, 8, 1),
            (3, 5, i64::MAX),
            (4, 5, 2),
            (5, 1, 9),
        ];
        let profit = i64::MAX as u128 + 2;
        let want = AllocError::AccountProfitTooLarge {
            account_id: 5,
            profit,
        };
        assert_eq!(run(10, 0, p, &rows), Err(want.clone()));
        assert!(want
            .to_string()
            .contains("account 5's profit 9223372036854775809"));
        // Exactly i64::MAX is accepted, and so are many such accounts.
        let rows: Vec<Row> = (0..4).map(|i| (u64::MAX - i, i, i64::MAX)).collect();
        let a = run(
            i64::MAX,
            i64::MAX,
            policy("0.000000000000000001", "1"),
            &rows,
        )
        .unwrap();
        assert_eq!(a.summary.profit_total, 4 * i64::MAX as u128);
        // A duplicate id is named first, as under position ranking.
        let rows = [(7, 1, i64::MAX), (3, 1, 1), (7, 2, 1)];
        assert_eq!(
            run(10, 0, p, &rows),
            Err(AllocError::DuplicatePositionId(7))
        );
    }

    #[test]
    fn input_errors_as_under_position_ranking() {
        let p = policy("0.2", "0.9");
        let ranked = |loss, fund, ids: &[u64], accounts: &[u64], pnl: &[i64]| {
            let positions = Positions {
                position_id: ids,
                account_id: accounts,
                pnl,
            };
            allocate_ranked(loss, fund, p, Ranking::Account, positions).unwrap_err()
        };
        let lengths = AllocError::ColumnLengths {
            position_id: 2,
            account_id: 1,
            pnl: 2,
        };
        assert_eq!(ranked(0, 0, &[1, 2], &[1], &[1, 2]), lengths);
        assert_eq!(ranked(-1, 0, &[], &[], &[]), AllocError::NegativeLoss(-1));
        assert_eq!(
            ranked(0, -2, &[], &[], &[]),
            AllocError::NegativeFundBalance(-2)
        );
        let dup = AllocError::DuplicatePositionId(5);
        assert_eq!(ranked(9, 0, &[5, 9, 5], &[1, 2, 3], &[-1, 2, 3]), dup);
        assert_eq!(ranked(9, 0, &[5, 5], &[1, 1], &[1, 1]), dup);
        assert_eq!(Ranking::from_number(1), Some(Ranking::Position));
        assert_eq!(Ranking::from_number(2), Some(Ranking::Account));
        assert_eq!(Ranking::from_number(0), None);
        assert_eq!(Ranking::default(), Ranking::Position);
    }

    #[test]
    fn position_ranking_is_allocate_itself() {
        let (ids, accounts, pnl) = ([1u64, 2, 3], [4u64, 4, 5], [30i64, 20, 10]);
        let positions = Positions {
            position_id: &ids,
            account_id: &accounts,
            pnl: &pnl,
        };
        let p = policy("0.2", "0.5");
        assert_eq!(
            allocate_ranked(50, 0, p, Ranking::Position, positions),
            crate::allocate(50, 0, p, positions)
        );
    }

    #[test]
    fn shares_by_reciprocal_are_exact() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..200_000 {
            let profit = match round % 3 {
                0 => next() >> 1,
                1 => next() % 1000 + 2,
                _ => i64::MAX as u64 - next() % 3,
            }
            .max(2);
            let charge = next() % profit;
            let pnl = next() % profit + 1;
            let exact = u128::from(charge) * u128::from(pnl);
            let want = (
                (exact / u128::from(profit)) as u64,
                (exact % u128::from(profit)) as u64,
            );
            assert_eq!(
                Share::new(charge, profit).of(pnl),
                want,
                "{charge} {pnl} {profit}"
            );
        }
    }

    #[test]
    fn key_ranges_are_monotone_and_cover() {
        for (min, max, items) in [
            (0, 0, 1),
            (5, 5, 1 << 20),
            (0, u64::MAX, 1 << 30),
            (0, u64::MAX, 1),
            (1, 1 << 40, 5_000_000),
            (7, 100, 1 << 25),
        ] {
            let range = KeyRange::new(min, max, items);
            assert!(range.buckets <= 2 * BUCKETS_MAX, "{min} {max} {items}");
            assert_eq!(range.bucket(min), 0);
            assert_eq!(range.bucket(max), range.buckets - 1);
            let keys = [min, min + (max - min) / 2, max - (max - min) / 3, max];
            assert!(keys
                .windows(2)
                .all(|w| range.bucket(w[0]) <= range.bucket(w[1])));
        }
    }

    /// A source over plain (bucket, value) pairs, value 0 standing for no item.
    struct Pairs(Vec<(usize, u64)>, usize);

    impl Source for Pairs {
        type Item = u64;

        fn len(&self) -> usize {
            self.0.len()
        }

        fn buckets(&self) -> usize {
            self.1
        }

        fn for_each(&self, range: Range<usize>, mut put: impl FnMut(usize, u64)) {
            for &(bucket, value) in &self.0[range] {
                if value != 0 {
                    put(bucket, value);
                }
            }
        }
    }

    #[test]
    fn partitions_keep_source_order_within_buckets() {
        for len in [0usize, 1, 1000, 3 * PART_LEN_MIN + 17] {
            let pairs: Vec<(usize, u64)> = (0..len)
                .map(|i| ((i * 7919) % 37, (i as u64 * 31) % 5))
                .collect();
            let source = Pairs(pairs.clone(), 37);
            let partition = partition(&source);
            let mut want: Vec<(usize, u64)> = pairs.into_iter().filter(|p| p.1 != 0).collect();
            want.sort_by_key(|p| p.0); // stable
            let values: Vec<u64> = want.iter().map(|p| p.1).collect();
            assert_eq!(partition.items, values);
            let counts: Vec<u32> = (0..37)
                .map(|b| want.iter().filter(|p| p.0 == b).count() as u32)
                .collect();
            assert_eq!(partition.counts, counts);
        }
    }

    #[test]
    fn many_accounts_at_scale_match_the_reference() {
        // Past several parts and buckets of both partitions, ids ascending and shuffled;
        // account ids spread (buckets sorted by comparison) and dense (by counting).
        for spread in [0x1_0000_0001u64, 1] {
            many_accounts_at_scale(spread);
        }
    }

    fn many_accounts_at_scale(spread: u64) {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let n = 300_000u64;
        let rows: Vec<Row> = (0..n)
            .map(|i| {
                let account = (next() % 20_000) * spread;
                let pnl = (next() % 2000) as i64 - 700;
                (i + 1, account, pnl)
            })
            .collect();
        let profit: i64 = rows.iter().filter(|r| r.2 > 0).map(|r| r.2).sum();
        let mut shuffled = rows.clone();
        shuffled.sort_by_key(|r| r.0.wrapping_mul(0x2545_f491_4f6c_dd1d));
        for loss in [profit / 3, profit - 1, profit + 5] {
            let want = reference(loss, 1000, (2, 10), (9, 10), &rows).unwrap();
            assert_eq!(run(loss, 1000, policy("0.2", "0.9"), &rows).unwrap(), want);
            assert_eq!(
                run(loss, 1000, policy("0.2", "0.9"), &shuffled).unwrap(),
                want
            );
        }
    }

    fn decimal(units: u64, places: u32) -> String {
        let den = 10u64.pow(places);
        if places == 0 {
            return units.to_string();
        }
        format!(
            "{}.{:0width$}",
            units / den,
            units % den,
            width = places as usize
        )
    }

    fn pnl_strategy() -> impl Strategy<Value = i64> {
        prop_oneof![
            3 => -50i64..200,
            2 => prop::sample::select(vec![0i64, 1, 7, 100, 100, 100, -100]),
            1 => any::<i64>(),
            1 => (i64::MAX / 4)..=(i64::MAX / 2),
            1 => 1i64..1_000_000_000_000,
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn matches_the_reference(
            rows in prop::collection::vec((pnl_strategy(), 0u64..12), 0..120),
            loss in prop_oneof![0i64..5000, any::<i64>().prop_map(|x| x.saturating_abs()), Just(0)],
            fund in prop_oneof![0i64..5000, Just(i64::MAX)],
            q_places in 0u32..=18,
            c_places in 0u32..=18,
            q_seed in any::<u64>(),
            c_seed in any::<u64>(),
            id_base in prop_oneof![Just(0u64), Just(u64::MAX - 100_000), any::<u32>().prop_map(u64::from)],
            id_stride in prop_oneof![Just(1u64), Just(3), Just(1 << 40)],
            account_spread in prop_oneof![Just(1u64), Just(1 << 20), Just(0x9e37_79b9_7f4a_7c15)],
            shuffle_seed in any::<u64>(),
            ordered in any::<bool>(),
        ) {
            let q_den = 10u64.pow(q_places);
            let q_num = q_seed % (q_den + 1);
            let c_den = 10u64.pow(c_places);
            let c_num = c_seed % c_den + 1;
            let p = policy(&decimal(q_num, q_places), &decimal(c_num, c_places));
            let rows: Vec<Row> = rows
                .iter()
                .enumerate()
                .map(|(i, &(pnl, account))| {
                    let id = id_base.wrapping_add(i as u64 * id_stride.min(1 << 20));
                    (id, account.wrapping_mul(account_spread), pnl)
                })
                .collect();
            let mut shuffled = rows.clone();
            if !ordered {
                shuffled.sort_by_key(|r| r.0.wrapping_mul(shuffle_seed | 1));
            }
            let want = reference(
                loss, fund, (q_num as u128, q_den as u128), (c_num as u128, c_den as u128), &rows,
            );
            prop_assert_eq!(run(loss, fund, p, &shuffled), want);
        }
    }
}
