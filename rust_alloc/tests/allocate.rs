//! The allocator against the worked example, one test per rule and error, and a
//! proptest against a naive reference (full sorts, plain u128 arithmetic) over random cases.

use std::cmp::Reverse;

use proptest::prelude::*;
use rust_alloc::{allocate, AllocError, Allocation, Policy, Positions, RatioProblem, Summary};

fn policy(q: &str, c: &str) -> Policy {
    Policy::parse(q, c).expect("valid test policy")
}

fn run(loss: i64, fund: i64, q: &str, c: &str, rows: &[(u64, i64)]) -> Allocation {
    let ids: Vec<u64> = rows.iter().map(|r| r.0).collect();
    let accounts: Vec<u64> = rows.iter().map(|r| r.0.wrapping_add(1000)).collect();
    let pnl: Vec<i64> = rows.iter().map(|r| r.1).collect();
    let positions = Positions {
        position_id: &ids,
        account_id: &accounts,
        pnl: &pnl,
    };
    allocate(loss, fund, policy(q, c), positions).expect("valid test input")
}

#[test]
fn worked_example() {
    let rows = [(1, 500), (2, 300), (3, 150), (4, 50), (5, -80)];
    let allocation = run(1000, 10_000, "0.2", "0.9", &rows);
    assert_eq!(
        allocation.summary,
        Summary {
            fund_share: 200,
            fund_paid: 200,
            user_due: 800,
            positions_total: 5,
            profitable_count: 4,
            profit_total: 1000,
            cutoff_pnl: 150,
            participant_count: 3,
            participant_profit: 950,
            widened: false,
            allocated_total: 800,
            uncovered: 0,
        }
    );
    assert_eq!(allocation.position_id, [1, 2, 3]);
    assert_eq!(allocation.account_id, [1001, 1002, 1003]);
    assert_eq!(allocation.pnl, [500, 300, 150]);
    assert_eq!(allocation.amount, [421, 253, 126]);
}

#[test]
fn fund_share_rounds_half_up_and_is_capped_by_the_balance() {
    let s = run(5, 100, "0.5", "1", &[]).summary;
    assert_eq!(
        (s.fund_share, s.fund_paid, s.user_due, s.uncovered),
        (3, 3, 2, 2)
    );
    let s = run(1000, 50, "0.2", "1", &[(1, 10_000)]).summary;
    assert_eq!(
        (s.fund_share, s.fund_paid, s.user_due, s.allocated_total),
        (200, 50, 950, 950)
    );
}

#[test]
fn ties_at_the_cutoff_are_all_in() {
    let a = run(100, 0, "0", "0.5", &[(9, 10), (3, 10), (4, 10), (5, 10)]);
    assert_eq!(a.summary.cutoff_pnl, 10);
    assert_eq!(a.summary.participant_count, 4);
    // 100 over four equal profits of 10 would exceed them: capped at 40, 60 uncovered.
    assert_eq!(a.amount, [10, 10, 10, 10]);
    assert_eq!(a.summary.uncovered, 60);
}

#[test]
fn widens_when_participants_cannot_cover() {
    let a = run(1000, 0, "0", "0.5", &[(1, 600), (2, 300), (3, 100)]);
    assert!(a.summary.widened);
    assert_eq!(a.summary.cutoff_pnl, 600);
    assert_eq!(
        (a.summary.participant_count, a.summary.participant_profit),
        (3, 1000)
    );
    assert_eq!(a.amount, [600, 300, 100]);
    let a = run(500, 0, "0", "0.5", &[(1, 600), (2, 300), (3, 100)]);
    assert!(!a.summary.widened);
    assert_eq!(a.position_id, [1]);
}

#[test]
fn leftover_units_go_to_largest_remainders_then_pnl_then_smaller_id() {
    // 2 over three equal profits: remainders tie, pnl ties, smaller ids win.
    let a = run(2, 0, "0", "1", &[(30, 5), (10, 5), (20, 5)]);
    assert_eq!((a.position_id, a.amount), (vec![10, 20], vec![1, 1]));
    // 1 over pnl 2 and 1: shares 2/3 and 1/3; the larger remainder wins.
    let a = run(1, 0, "0", "1", &[(1, 1), (2, 2)]);
    assert_eq!((a.position_id, a.amount), (vec![2], vec![1]));
}

#[test]
fn nothing_profitable_leaves_it_uncovered() {
    let s = run(1000, 0, "0.2", "0.9", &[(1, -5), (2, 0)]).summary;
    assert_eq!(
        (s.profitable_count, s.cutoff_pnl, s.participant_count),
        (0, 0, 0)
    );
    assert_eq!(
        (s.allocated_total, s.uncovered, s.widened),
        (0, 1000, false)
    );
}

#[test]
fn extreme_values_do_not_overflow() {
    let rows: Vec<(u64, i64)> = (0..4).map(|i| (u64::MAX - i, i64::MAX)).collect();
    let a = run(i64::MAX, i64::MAX, "0.000000000000000001", "1", &rows);
    assert_eq!(a.summary.profit_total, 4 * i64::MAX as u128);
    assert_eq!(a.summary.fund_share, 9); // 9.223372036854775807 rounds to 9
    assert_eq!(
        a.amount.iter().map(|&x| x as i128).sum::<i128>(),
        (i64::MAX - 9) as i128
    );
}

#[test]
fn errors_name_the_problem() {
    let p = policy("0.2", "0.9");
    let err = |loss, fund, ids: &[u64], accounts: &[u64], pnl: &[i64]| {
        let positions = Positions {
            position_id: ids,
            account_id: accounts,
            pnl,
        };
        allocate(loss, fund, p, positions).unwrap_err()
    };
    let e = err(0, 0, &[1, 2], &[1], &[1, 2]);
    assert_eq!(
        e,
        AllocError::ColumnLengths {
            position_id: 2,
            account_id: 1,
            pnl: 2
        }
    );
    assert!(e.to_string().contains("unequal lengths"));
    let e = err(0, 0, &[7, 3, 7], &[0; 3], &[0; 3]);
    assert_eq!(e.to_string(), "duplicate position_id 7");
    assert_eq!(
        err(-1, 0, &[], &[], &[]).to_string(),
        "loss must be >= 0, got -1"
    );
    assert!(err(0, -2, &[], &[], &[])
        .to_string()
        .contains("fund_balance must be >= 0"));
    let ratio = |q, c| Policy::parse(q, c).unwrap_err();
    let problem = |e: AllocError| match e {
        AllocError::Ratio { name, problem, .. } => (name, problem),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        problem(ratio("1.5", "0.9")),
        ("insurance_share", RatioProblem::AboveOne)
    );
    assert_eq!(
        problem(ratio("0.2", "0")),
        ("coverage_ratio", RatioProblem::Zero)
    );
    assert_eq!(
        problem(ratio("0.2", "9e-1")),
        ("coverage_ratio", RatioProblem::Malformed)
    );
    assert_eq!(
        ratio("0.2", "0.000").to_string(),
        "coverage_ratio 0.000 is out of range (0, 1]"
    );
}

#[test]
fn duplicates_are_named_whatever_the_layout() {
    let p = policy("0.2", "0.9");
    let check = |ids: &[u64], want: u64| {
        let pnl: Vec<i64> = (0..ids.len() as i64).map(|i| i % 7 - 2).collect();
        let positions = Positions {
            position_id: ids,
            account_id: ids,
            pnl: &pnl,
        };
        let got = allocate(1000, 0, p, positions).unwrap_err();
        assert_eq!(got, AllocError::DuplicatePositionId(want));
    };
    let n = 100_000u64;
    // Dense and shuffled: the repeats in one half, then across the halves.
    let mut ids: Vec<u64> = (0..n).map(|i| (i * 7919) % n).collect();
    ids[10] = ids[20];
    ids[30] = ids[40];
    check(&ids, ids[20].min(ids[40]));
    let mut ids: Vec<u64> = (0..n).map(|i| (i * 7919) % n).collect();
    ids[(n - 1) as usize] = ids[1];
    check(&ids, ids[1]);
    // Sparse.
    let mut ids: Vec<u64> = (0..n)
        .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .collect();
    ids[5] = ids[99_999];
    check(&ids, ids[5]);
    // Ascending but for one repeat at a chunk boundary.
    let mut ids: Vec<u64> = (0..n).collect();
    ids[1 << 15] = ids[(1 << 15) - 1];
    check(&ids, (1 << 15) - 1);
}

/// The rules written the obvious way: full sorts, u128 shares, a sort of the remainders.
fn reference(
    loss: i64,
    fund: i64,
    q: (u128, u128),
    c: (u128, u128),
    rows: &[(u64, i64)],
) -> Allocation {
    let fund_share = ((2 * q.0 * loss as u128 + q.1) / (2 * q.1)) as i64;
    let fund_paid = fund_share.min(fund);
    let user_due = loss - fund_paid;
    let mut profitable: Vec<(u64, i64)> = rows.iter().copied().filter(|r| r.1 > 0).collect();
    profitable.sort_by_key(|r| Reverse(r.1));
    let profit_total: u128 = profitable.iter().map(|r| r.1 as u128).sum();
    let mut cutoff_pnl = 0;
    let mut running = 0u128;
    for r in &profitable {
        running += r.1 as u128;
        if wide_mul(running, c.1) >= wide_mul(c.0, profit_total) {
            cutoff_pnl = r.1;
            break;
        }
    }
    let mut participants: Vec<(u64, i64)> = profitable
        .iter()
        .copied()
        .filter(|r| r.1 >= cutoff_pnl)
        .collect();
    let mut participant_profit: u128 = participants.iter().map(|r| r.1 as u128).sum();
    let widened = user_due as u128 > participant_profit && participants.len() < profitable.len();
    if widened {
        participants = profitable.clone();
        participant_profit = profit_total;
    }
    let allocated_total = (user_due as u128).min(participant_profit) as i64;
    let mut shares: Vec<(u64, i64, u128, u128)> = participants
        .iter()
        .map(|&(id, pnl)| {
            let product = allocated_total as u128 * pnl as u128;
            (
                id,
                pnl,
                product / participant_profit,
                product % participant_profit,
            )
        })
        .collect();
    let floors: u128 = shares.iter().map(|s| s.2).sum();
    shares.sort_by_key(|&(id, pnl, _, remainder)| (Reverse(remainder), Reverse(pnl), id));
    for share in shares
        .iter_mut()
        .take((allocated_total as u128 - floors) as usize)
    {
        share.2 += 1;
    }
    shares.retain(|s| s.2 > 0);
    shares.sort_by_key(|s| s.0);
    Allocation {
        summary: Summary {
            fund_share,
            fund_paid,
            user_due,
            positions_total: rows.len() as u64,
            profitable_count: profitable.len() as u64,
            profit_total,
            cutoff_pnl,
            participant_count: participants.len() as u64,
            participant_profit,
            widened,
            allocated_total,
            uncovered: user_due - allocated_total,
        },
        position_id: shares.iter().map(|s| s.0).collect(),
        account_id: shares.iter().map(|s| s.0 ^ 0xabc).collect(),
        pnl: shares.iter().map(|s| s.1).collect(),
        amount: shares.iter().map(|s| s.2 as i64).collect(),
    }
}

/// a × b as (high, low) 128-bit halves: the reference compares products without overflow.
fn wide_mul(a: u128, b: u128) -> (u128, u128) {
    let (a1, a0) = (a >> 64, a & u128::from(u64::MAX));
    let (b1, b0) = (b >> 64, b & u128::from(u64::MAX));
    let (low, middle1, middle2, high) = (a0 * b0, a1 * b0, a0 * b1, a1 * b1);
    let carry =
        ((low >> 64) + (middle1 & u128::from(u64::MAX)) + (middle2 & u128::from(u64::MAX))) >> 64;
    let low = low.wrapping_add(middle1 << 64).wrapping_add(middle2 << 64);
    (high + (middle1 >> 64) + (middle2 >> 64) + carry, low)
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
        2 => prop::sample::select(vec![0i64, 1, 7, 100, 100, 100]),
        1 => any::<i64>(),
        1 => (i64::MAX - 10)..=i64::MAX,
        1 => 1i64..1_000_000_000_000,
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn matches_the_reference(
        pnls in prop::collection::vec(pnl_strategy(), 0..300),
        loss in prop_oneof![0i64..5000, any::<i64>().prop_map(|x| x.saturating_abs()), Just(0)],
        fund in prop_oneof![0i64..5000, Just(i64::MAX)],
        q_places in 0u32..=18,
        c_places in 0u32..=18,
        q_seed in any::<u64>(),
        c_seed in any::<u64>(),
        id_base in prop_oneof![Just(0u64), Just(u64::MAX - 100_000), any::<u32>().prop_map(u64::from)],
        id_stride in prop_oneof![Just(1u64), Just(3), Just(1 << 40)],
        shuffle_seed in any::<u64>(),
        ordered in any::<bool>(),
    ) {
        let q_den = 10u64.pow(q_places);
        let q_num = q_seed % (q_den + 1);
        let c_den = 10u64.pow(c_places);
        let c_num = c_seed % c_den + 1;
        let (q_text, c_text) = (decimal(q_num, q_places), decimal(c_num, c_places));
        let rows: Vec<(u64, i64)> = pnls
            .iter()
            .enumerate()
            .map(|(i, &pnl)| (id_base.wrapping_add(i as u64 * id_stride.min(1 << 20)), pnl))
            .collect();
        // Shuffle deterministically: multiplying by an odd number permutes u64.
        let mut shuffled = rows.clone();
        if ordered {
            shuffled.sort_by_key(|r| r.0);
        } else {
            shuffled.sort_by_key(|r| r.0.wrapping_mul(shuffle_seed | 1));
        }
        let ids: Vec<u64> = shuffled.iter().map(|r| r.0).collect();
        let accounts: Vec<u64> = shuffled.iter().map(|r| r.0 ^ 0xabc).collect();
        let pnl: Vec<i64> = shuffled.iter().map(|r| r.1).collect();
        let positions = Positions { position_id: &ids, account_id: &accounts, pnl: &pnl };
        let got = allocate(loss, fund, policy(&q_text, &c_text), positions).unwrap();
        let want = reference(
            loss, fund,
            (q_num as u128, q_den as u128), (c_num as u128, c_den as u128), &rows,
        );
        prop_assert_eq!(got, want);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Sizes past one parallel chunk and the sort threshold: the refinement rounds of the
    /// cut, the remainder selection and the slot and sort orders of the ids all run.
    #[test]
    fn matches_the_reference_at_scale(
        len in 30_000usize..80_000,
        spread in prop_oneof![Just(3i64), Just(1000), Just(1 << 40)],
        loss_divisor in 0i64..5,
        // Ids: dense (one block of slots or two), dense with gaps (several blocks), sparse.
        id_stride in prop_oneof![Just(1u64), Just(7), Just(0x9e37_79b9_7f4a_7c15)],
        ordered in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let mut state = seed | 1;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let rows: Vec<(u64, i64)> = (0..len as u64)
            .map(|i| {
                let id = i.wrapping_mul(id_stride);
                (id, (next() % (2 * spread as u64)) as i64 - spread / 4)
            })
            .collect();
        let mut shuffled = rows.clone();
        if ordered {
            shuffled.sort_by_key(|r| r.0);
        } else {
            shuffled.sort_by_key(|r| r.0.wrapping_mul(seed | 1));
        }
        let ids: Vec<u64> = shuffled.iter().map(|r| r.0).collect();
        let accounts: Vec<u64> = shuffled.iter().map(|r| r.0 ^ 0xabc).collect();
        let pnl: Vec<i64> = shuffled.iter().map(|r| r.1).collect();
        let profit: i64 = pnl.iter().filter(|&&v| v > 0).map(|&v| v / 4).sum();
        // Divisor 0: a loss beyond all profit, so everyone pays their whole pnl.
        let loss = if loss_divisor == 0 { profit.saturating_mul(8) } else { profit / loss_divisor };
        let positions = Positions { position_id: &ids, account_id: &accounts, pnl: &pnl };
        let got = allocate(loss, 1000, policy("0.2", "0.9"), positions).unwrap();
        prop_assert_eq!(got, reference(loss, 1000, (2, 10), (9, 10), &rows));
    }
}
