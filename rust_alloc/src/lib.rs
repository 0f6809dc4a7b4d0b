//! The allocation core of the insurance-fund ledger: plain Rust over column slices.
//!
//! Given a cycle's loss, the fund's balance, the policy and every position's pnl, [`allocate`]
//! decides how much the fund pays and how much each participating profitable position pays,
//! exactly (integers and i128/u128 intermediates, no floats). The rules are issue 3's:
//! fund share, cut at the coverage ratio with ties in, widening, pro-rata split with the
//! leftover units to the largest remainders.
//!
//! [`allocate_ranked`] also offers issue 13's account ranking (`account.rs`): the cut over
//! accounts, each account's charge then split over its positions.
//!
//! The Python bindings live in `py.rs` behind the `python` feature, so this crate builds and
//! is tested without Python.

use std::fmt;

mod account;
pub mod chain;
pub mod decode;
mod ids;
pub mod liquidation;
pub mod order;
pub mod ratio;
mod select;
mod split;

#[cfg(feature = "python")]
mod py;

use ids::RowMap;
pub use ratio::{Ratio, RatioProblem};
use split::{Columns, Layout, Split};

/// The most positions one allocation accepts: indices are stored as u32 to save memory.
pub const POSITIONS_MAX: usize = u32::MAX as usize;
/// Positions per unit of parallel work: large enough to amortise scheduling, small enough
/// to split 1M positions across both cores.
pub(crate) const CHUNK_LEN: usize = 1 << 15;

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

/// What the cut ranks (issue 13, item 5): the numbers are the contract's `Ranking` values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Ranking {
    /// Each profitable position by its pnl: the seed's rule, and the default.
    #[default]
    Position,
    /// Each account by its profit (the sum of its profitable positions' pnl); each account's
    /// charge is then split over its profitable positions pro rata by pnl.
    Account,
}

impl Ranking {
    /// `RANKING_POSITION = 1` or `RANKING_ACCOUNT = 2`; `None` for anything else (0, the
    /// contract's "unspecified", is resolved by the policy before an allocation, never here).
    pub fn from_number(number: i64) -> Option<Self> {
        match number {
            1 => Some(Self::Position),
            2 => Some(Self::Account),
            _ => None,
        }
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
    /// Under account ranking, an account whose profitable positions sum beyond i64 (the
    /// smallest such account id).
    AccountProfitTooLarge {
        account_id: u64,
        profit: u128,
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
            Self::AccountProfitTooLarge { account_id, profit } => write!(
                f,
                "account {account_id}'s profit {profit} exceeds the int64 maximum {} \
                 (account ranking sums its profitable positions)",
                i64::MAX
            ),
            Self::InvariantBroken(what) => write!(f, "allocation invariant broken: {what}"),
        }
    }
}

impl std::error::Error for AllocError {}

/// Allocates a cycle's loss under the given ranking: [`allocate`] for positions, the account
/// ranking of issue 13 otherwise (the same input checks, the same output columns per position;
/// the summary's profitable_count, participant_count, participant_profit and cutoff_pnl then
/// speak of accounts).
pub fn allocate_ranked(
    loss: i64,
    fund_balance: i64,
    policy: Policy,
    ranking: Ranking,
    positions: Positions<'_>,
) -> Result<Allocation, AllocError> {
    match ranking {
        Ranking::Position => allocate(loss, fund_balance, policy, positions),
        Ranking::Account => {
            check_input(loss, fund_balance, positions)?;
            account::allocate(loss, fund_balance, policy, positions)
        }
    }
}

/// The checks every allocation makes before reading a pnl: column lengths, the signs of the
/// loss and the balance, the position limit. (Duplicate ids are found while ordering them.)
fn check_input(loss: i64, fund_balance: i64, positions: Positions<'_>) -> Result<(), AllocError> {
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
    Ok(())
}

/// Allocates a cycle's loss: the fund's part, then the participants' pro-rata parts.
///
/// Passes over the input: one scan (ids ascending? their range; the profits' histogram),
/// one for the cut (exact sums above a narrow candidate range, the candidates), and one
/// writing the participants' rows; unordered ids add one building their row map. Then two
/// light passes over the rows: the leftover units and the checks.
pub fn allocate(
    loss: i64,
    fund_balance: i64,
    policy: Policy,
    positions: Positions<'_>,
) -> Result<Allocation, AllocError> {
    check_input(loss, fund_balance, positions)?;
    let Positions {
        position_id, pnl, ..
    } = positions;
    let n = position_id.len();
    let scan = select::scan(position_id, pnl);

    // Rule 1: the fund's part. Fits i64: fund_share <= loss because q <= 1.
    let fund_share = policy.insurance_share.mul_round_half_up(loss as u64) as i64;
    let fund_paid = fund_share.min(fund_balance);
    let user_due = loss - fund_paid;

    // Rule 2: the profitable positions. Rule 3: the cut, ties in.
    let (profitable_count, profit_total) = (scan.profits.count(), scan.profits.total());
    let cut = scan
        .profits
        .cut(pnl, policy.coverage_ratio.mul_ceil(profit_total));
    // Rule 4: widening.
    let widened = u128::from(user_due as u64) > cut.profit && cut.count < profitable_count;
    let (pnl_min, participant_count, participant_profit, chunk_counts) = if widened {
        (1, profitable_count, profit_total, &scan.positives)
    } else {
        (
            cut.cutoff_pnl.max(1),
            cut.count,
            cut.profit,
            &cut.chunk_counts,
        )
    };

    // The ids: nothing to do when they ascend; otherwise the duplicate check, and the rows
    // of the participants in position_id order.
    let layout = if scan.ascending {
        Layout::Ascending
    } else {
        let map = RowMap::build(position_id, pnl, pnl_min, scan.id_min, scan.id_max)
            .map_err(AllocError::DuplicatePositionId)?;
        Layout::Mapped(map)
    };

    // Rule 5: what the participants pay and what nobody can.
    let allocated_total = u128::from(user_due as u64).min(participant_profit) as i64;
    let uncovered = user_due - allocated_total;
    if i128::from(fund_paid) + i128::from(allocated_total) + i128::from(uncovered)
        != i128::from(loss)
    {
        return Err(AllocError::InvariantBroken(
            "fund_paid + allocated_total + uncovered != loss",
        ));
    }

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
    // Rules 6 and 7: the split, as the allocations with amount > 0 in position_id order,
    // with its checks (the amounts sum to allocated_total, each within (0, pnl]).
    let split = Split {
        positions,
        layout: &layout,
        chunk_counts,
        pnl_min,
        rows: participant_count as usize,
        allocated: allocated_total as u64,
        profit: participant_profit,
    };
    let Columns {
        position_id,
        account_id,
        pnl,
        amount,
    } = split.run()?;
    Ok(Allocation {
        summary,
        position_id,
        account_id,
        pnl,
        amount,
    })
}
