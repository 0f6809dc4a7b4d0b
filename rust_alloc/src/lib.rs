//! The allocation core of the insurance-fund ledger: plain Rust over column slices.
//!
//! Given a cycle's loss, the fund's balance, the policy and every position's pnl, [`allocate`]
//! decides how much the fund pays and how much each participating profitable position pays,
//! exactly (integers and i128/u128 intermediates, no floats). The rules are issue 3's:
//! fund share, cut at the coverage ratio with ties in, widening, pro-rata split with the
//! leftover units to the largest remainders.
//!
//! The Python bindings live in `py.rs` behind the `python` feature, so this crate builds and
//! is tested without Python.

use std::cmp::Reverse;
use std::fmt;

use rayon::prelude::*;

pub mod decode;
mod ids;
pub mod ratio;
mod select;

#[cfg(feature = "python")]
mod py;

use ids::IdOrder;
pub use ratio::{Ratio, RatioProblem};

/// The most positions one allocation accepts: indices are stored as u32 to save memory.
pub const POSITIONS_MAX: usize = u32::MAX as usize;
/// Positions per unit of parallel work: large enough to amortise scheduling, small enough
/// to split 1M positions across both cores.
pub(crate) const CHUNK_LEN: usize = 1 << 15;
/// Bits of the remainder histogram in the split.
const REMAINDER_BITS: u32 = 11;

/// The policy ratios: q, the fund's share of a loss, in [0, 1]; c, the coverage ratio, in (0, 1].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    pub insurance_share: Ratio,
    pub coverage_ratio: Ratio,
}

impl Policy {
    /// Parses both ratios from decimal text, naming the offending one on error.
    pub fn parse(insurance_share: &str, coverage_ratio: &str) -> Result<Self, AllocError> {
        let parse = |name: &'static str, text: &str| {
            let problem = |problem| AllocError::Ratio {
                name,
                text: text.to_owned(),
                problem,
            };
            Ratio::parse(text).map_err(problem)
        };
        let insurance_share = parse("insurance_share", insurance_share)?;
        let coverage_ratio_value = parse("coverage_ratio", coverage_ratio)?;
        Self::new(insurance_share, coverage_ratio_value).ok_or_else(|| AllocError::Ratio {
            name: "coverage_ratio",
            text: coverage_ratio.to_owned(),
            problem: RatioProblem::Zero,
        })
    }

    /// Both ratios; `None` when the coverage ratio is zero (the cut would select nobody).
    pub fn new(insurance_share: Ratio, coverage_ratio: Ratio) -> Option<Self> {
        (!coverage_ratio.is_zero()).then_some(Self {
            insurance_share,
            coverage_ratio,
        })
    }
}

/// The three input columns, of equal length; position ids unique.
#[derive(Clone, Copy, Debug)]
pub struct Positions<'a> {
    pub position_id: &'a [u64],
    pub account_id: &'a [u64],
    pub pnl: &'a [i64],
}

/// The cycle's totals. Amounts are minor units; the two profit totals are u128 because a sum
/// of many i64 profits can exceed i64 (the allocated amounts never do).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Summary {
    pub fund_share: i64,
    pub fund_paid: i64,
    pub user_due: i64,
    pub positions_total: u64,
    pub profitable_count: u64,
    pub profit_total: u128,
    /// The pnl at which the cut reached c × profit_total (0 when nothing is profitable).
    /// Kept as the cut found it when the participants are widened.
    pub cutoff_pnl: i64,
    pub participant_count: u64,
    pub participant_profit: u128,
    pub widened: bool,
    pub allocated_total: i64,
    pub uncovered: i64,
}

/// The summary and the allocations (participants with amount > 0) as columns in ascending
/// position_id order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocation {
    pub summary: Summary,
    pub position_id: Vec<u64>,
    pub account_id: Vec<u64>,
    pub pnl: Vec<i64>,
    pub amount: Vec<i64>,
}

/// Why an allocation was refused. Every variant but `InvariantBroken` is the caller's input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AllocError {
    ColumnLengths {
        position_id: usize,
        account_id: usize,
        pnl: usize,
    },
    DuplicatePositionId(u64),
    NegativeLoss(i64),
    NegativeFundBalance(i64),
    Ratio {
        name: &'static str,
        text: String,
        problem: RatioProblem,
    },
    TooManyPositions {
        count: usize,
        max: usize,
    },
    /// A result check failed: a bug, never the input's fault.
    InvariantBroken(&'static str),
}

impl fmt::Display for AllocError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ColumnLengths {
                position_id,
                account_id,
                pnl,
            } => write!(
                f,
                "columns have unequal lengths: position_id {position_id}, \
                 account_id {account_id}, pnl {pnl}"
            ),
            Self::DuplicatePositionId(id) => write!(f, "duplicate position_id {id}"),
            Self::NegativeLoss(loss) => write!(f, "loss must be >= 0, got {loss}"),
            Self::NegativeFundBalance(balance) => {
                write!(f, "fund_balance must be >= 0, got {balance}")
            }
            Self::Ratio {
                name,
                text,
                problem,
            } => match problem {
                RatioProblem::Malformed => write!(
                    f,
                    "{name} {text:?} is not a decimal of the form digits[.digits] with at \
                     most {} decimal places",
                    ratio::RATIO_DECIMALS_MAX
                ),
                RatioProblem::AboveOne | RatioProblem::Zero => {
                    let range = if *name == "coverage_ratio" {
                        "(0, 1]"
                    } else {
                        "[0, 1]"
                    };
                    write!(f, "{name} {text} is out of range {range}")
                }
            },
            Self::TooManyPositions { count, max } => {
                write!(f, "{count} positions exceed the limit of {max}")
            }
            Self::InvariantBroken(what) => write!(f, "allocation invariant broken: {what}"),
        }
    }
}

impl std::error::Error for AllocError {}

/// Allocates a cycle's loss: the fund's part, then the participants' pro-rata parts.
pub fn allocate(
    loss: i64,
    fund_balance: i64,
    policy: Policy,
    positions: Positions<'_>,
) -> Result<Allocation, AllocError> {
    let Positions {
        position_id,
        account_id,
        pnl,
    } = positions;
    let n = position_id.len();
    if account_id.len() != n || pnl.len() != n {
        return Err(AllocError::ColumnLengths {
            position_id: n,
            account_id: account_id.len(),
            pnl: pnl.len(),
        });
    }
    if loss < 0 {
        return Err(AllocError::NegativeLoss(loss));
    }
    if fund_balance < 0 {
        return Err(AllocError::NegativeFundBalance(fund_balance));
    }
    if n > POSITIONS_MAX {
        return Err(AllocError::TooManyPositions {
            count: n,
            max: POSITIONS_MAX,
        });
    }
    let order = ids::order_ids(position_id).map_err(AllocError::DuplicatePositionId)?;

    // Rule 1: the fund's part. Fits i64: fund_share <= loss because q <= 1.
    let fund_share = policy.insurance_share.mul_round_half_up(loss as u64) as i64;
    let fund_paid = fund_share.min(fund_balance);
    let user_due = loss - fund_paid;

    // Rule 2: the profitable positions. Rule 3: the cut, ties in.
    let profits = select::Profits::of(pnl);
    let (profitable_count, profit_total) = (profits.count(), profits.total());
    let cut = profits.cut(pnl, policy.coverage_ratio.mul_ceil(profit_total));
    // Rule 4: widening.
    let widened = u128::from(user_due as u64) > cut.profit && cut.count < profitable_count;
    let (pnl_min, participant_count, participant_profit) = if widened {
        (1, profitable_count, profit_total)
    } else {
        (cut.cutoff_pnl.max(1), cut.count, cut.profit)
    };

    // Rule 5: what the participants pay and what nobody can.
    let allocated_total = u128::from(user_due as u64).min(participant_profit) as i64;
    let uncovered = user_due - allocated_total;

    let summary = Summary {
        fund_share,
        fund_paid,
        user_due,
        positions_total: n as u64,
        profitable_count,
        profit_total,
        cutoff_pnl: cut.cutoff_pnl,
        participant_count,
        participant_profit,
        widened,
        allocated_total,
        uncovered,
    };
    // Rules 6 and 7: the split, as the allocations with amount > 0 in position_id order.
    let split = Split {
        order: &order,
        positions,
        pnl_min,
        allocated: allocated_total as u64,
        profit: participant_profit,
    };
    let (position_id, account_id, pnl, amount) = split.run();
    let allocation = Allocation {
        summary,
        position_id,
        account_id,
        pnl,
        amount,
    };
    check(&allocation, loss)?;
    Ok(allocation)
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
    fn share(self, pnl: u64) -> (u64, u128) {
        let estimate = ((u128::from(pnl) * u128::from(self.reciprocal)) >> 64) as u64;
        let remainder = self.remainder(pnl, estimate);
        if remainder >= self.profit {
            (estimate + 1, remainder - self.profit)
        } else {
            (estimate, remainder)
        }
    }

    /// allocated × pnl − floor × profit: the remainder of a known floor, without dividing.
    fn remainder(self, pnl: u64, floor: u64) -> u128 {
        u128::from(self.allocated) * u128::from(pnl) - u128::from(floor) * self.profit
    }
}

/// The output columns: position_id, account_id, pnl, amount.
type Columns = (Vec<u64>, Vec<u64>, Vec<i64>, Vec<i64>);

/// The pro-rata split among the participants (profitable positions with pnl >= `pnl_min`).
///
/// Works on the output columns directly, in position_id order: one pass writes each
/// participant's row with the floor of its share (and histograms the remainders), a
/// selection finds the rank of the last participant owed a leftover unit, a pass adds the
/// units, and rows left at 0 are dropped. No per-position scratch beyond the output.
struct Split<'a> {
    order: &'a IdOrder,
    positions: Positions<'a>,
    pnl_min: i64,
    allocated: u64,
    profit: u128,
}

impl Split<'_> {
    fn is_participant(&self, pnl: i64) -> bool {
        pnl >= self.pnl_min
    }

    fn run(&self) -> Columns {
        if self.allocated == 0 {
            return (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        }
        let n = self.positions.pnl.len();
        let chunks: Vec<(usize, usize)> = (0..n)
            .step_by(CHUNK_LEN)
            .map(|start| (start, (start + CHUNK_LEN).min(n)))
            .collect();
        let counts: Vec<usize> = chunks
            .par_iter()
            .map(|&(start, end)| {
                let pnl = |rank| self.positions.pnl[self.order.input_index(rank)];
                (start..end)
                    .filter(|&rank| self.is_participant(pnl(rank)))
                    .count()
            })
            .collect();
        let rows: usize = counts.iter().sum();
        let mut columns: Columns = (vec![0; rows], vec![0; rows], vec![0; rows], vec![0; rows]);
        if u128::from(self.allocated) == self.profit {
            // Everyone pays their whole pnl: no division, no leftover.
            self.write_rows(&mut columns, &chunks, &counts, |pnl| pnl, |_| ());
            return columns;
        }
        let divider = Divider::new(self.allocated, self.profit);
        let shift = (128 - (self.profit - 1).leading_zeros()).saturating_sub(REMAINDER_BITS);
        let buckets = ((self.profit - 1) >> shift) as usize + 1;
        let (floor_total, histogram) = self.write_rows(
            &mut columns,
            &chunks,
            &counts,
            |pnl| divider.share(pnl).0,
            |rows: &mut RowsWritten| {
                let mut histogram = vec![0u64; buckets];
                for (&pnl, &floor) in rows.pnl.iter().zip(rows.amount.iter()) {
                    let remainder = divider.remainder(pnl as u64, floor as u64);
                    histogram[(remainder >> shift) as usize] += 1;
                }
                histogram
            },
        );
        let leftover = (u128::from(self.allocated) - floor_total) as u64;
        let (ids, _, pnl, amount) = &mut columns;
        let rank = |id: u64, pnl: i64, floor: i64| {
            (
                divider.remainder(pnl as u64, floor as u64),
                pnl,
                Reverse(id),
            )
        };
        let ranks = ids
            .par_iter()
            .zip(pnl.par_iter())
            .zip(amount.par_iter())
            .with_min_len(CHUNK_LEN)
            .map(|((&id, &pnl), &floor)| rank(id, pnl, floor));
        if let Some(kth) = select::kth_largest_rank(ranks, &histogram, leftover, shift) {
            amount
                .par_iter_mut()
                .zip(ids.par_iter().zip(pnl.par_iter()))
                .with_min_len(CHUNK_LEN)
                .for_each(|(amount, (&id, &pnl))| {
                    *amount += i64::from(rank(id, pnl, *amount) >= kth)
                });
        }
        drop_zero_rows(&mut columns);
        columns
    }

    /// Writes every participant's row in position_id order, with `amount(pnl)` as its
    /// amount, in parallel by chunks of ranks; `summarize` sees each chunk's rows after.
    /// Returns the amount total and the element-wise sum of the summaries.
    fn write_rows<S, A>(
        &self,
        columns: &mut Columns,
        chunks: &[(usize, usize)],
        counts: &[usize],
        amount: A,
        summarize: impl Fn(&mut RowsWritten<'_>) -> S + Sync,
    ) -> (u128, S)
    where
        S: Summable + Send,
        A: Fn(u64) -> u64 + Sync,
    {
        let (ids, accounts, pnls, amounts) = columns;
        let parts: Vec<_> = split_by_counts(ids, counts)
            .into_iter()
            .zip(split_by_counts(accounts, counts))
            .zip(split_by_counts(pnls, counts))
            .zip(split_by_counts(amounts, counts))
            .zip(chunks)
            .collect();
        parts
            .into_par_iter()
            .map(|((((ids, accounts), pnl), amounts), &(start, end))| {
                let mut row = 0;
                let mut total = 0u128;
                for rank in start..end {
                    let index = self.order.input_index(rank);
                    let value = self.positions.pnl[index];
                    if self.is_participant(value) {
                        let share = amount(value as u64);
                        ids[row] = self.positions.position_id[index];
                        accounts[row] = self.positions.account_id[index];
                        pnl[row] = value;
                        amounts[row] = share as i64;
                        total += u128::from(share);
                        row += 1;
                    }
                }
                let summary = summarize(&mut RowsWritten {
                    pnl,
                    amount: amounts,
                });
                (total, summary)
            })
            .reduce(|| (0, S::zero()), |a, b| (a.0 + b.0, a.1.plus(b.1)))
    }
}

/// One chunk's rows as written, for a summary pass while they are in cache.
struct RowsWritten<'a> {
    pnl: &'a [i64],
    amount: &'a [i64],
}

/// What the chunk summaries of `write_rows` add up to.
trait Summable {
    fn zero() -> Self;
    fn plus(self, other: Self) -> Self;
}

impl Summable for () {
    fn zero() -> Self {}
    fn plus(self, _: Self) -> Self {}
}

/// A histogram; `zero` is empty and stands for all zeros.
impl Summable for Vec<u64> {
    fn zero() -> Self {
        Vec::new()
    }

    fn plus(mut self, other: Self) -> Self {
        if self.is_empty() {
            return other;
        }
        self.iter_mut().zip(other).for_each(|(a, b)| *a += b);
        self
    }
}

fn split_by_counts<'a, T>(mut rest: &'a mut [T], counts: &[usize]) -> Vec<&'a mut [T]> {
    counts
        .iter()
        .map(|&count| {
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(count);
            rest = tail;
            head
        })
        .collect()
}

/// Rule 7: only allocations with amount > 0 are returned. Rare rows; skipped if none.
fn drop_zero_rows(columns: &mut Columns) {
    let (ids, accounts, pnl, amount) = columns;
    let chunk = amount
        .par_chunks(CHUNK_LEN)
        .position_first(|chunk| chunk.contains(&0));
    let Some(chunk) = chunk else {
        return;
    };
    let first = chunk * CHUNK_LEN;
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

/// The result checks (TigerBeetle style: assert outputs, not only inputs).
fn check(allocation: &Allocation, loss: i64) -> Result<(), AllocError> {
    let s = &allocation.summary;
    let broken = AllocError::InvariantBroken;
    if i128::from(s.fund_paid) + i128::from(s.allocated_total) + i128::from(s.uncovered)
        != i128::from(loss)
    {
        return Err(broken("fund_paid + allocated_total + uncovered != loss"));
    }
    let (total, bounded) = allocation
        .amount
        .par_iter()
        .zip(allocation.pnl.par_iter())
        .with_min_len(CHUNK_LEN)
        .map(|(&amount, &pnl)| (i128::from(amount), 0 < amount && amount <= pnl))
        .reduce(|| (0, true), |a, b| (a.0 + b.0, a.1 && b.1));
    if total != i128::from(s.allocated_total) {
        return Err(broken("the amounts do not sum to allocated_total"));
    }
    if !bounded {
        return Err(broken("an amount is outside (0, pnl]"));
    }
    Ok(())
}
