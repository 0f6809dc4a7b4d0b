//! Times allocations over synthetic columns:
//! `cargo run --release --example profile -- [N] [heavy|flat] [ordered|shuffled] [RUNS]
//! [ACCOUNTS] [position|account]`. ACCOUNTS (default: random 40-bit ids) draws the account ids
//! from 1..=ACCOUNTS, as bench_account_ranking.py does. Prints the minimum and median wall time
//! over the runs.
use rust_alloc::{allocate_ranked, Policy, Positions, Ranking};
use std::time::{Duration, Instant};

fn main() {
    let arg = |i: usize| std::env::args().nth(i);
    let n: usize = arg(1).map_or(10_000_000, |s| s.parse().unwrap());
    let flat = arg(2).is_some_and(|s| s == "flat");
    let shuffled = arg(3).is_some_and(|s| s == "shuffled");
    let runs: usize = arg(4).map_or(9, |s| s.parse().unwrap());
    let mut state = 0x9e3779b97f4a7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut ids: Vec<u64> = (1..=n as u64).collect();
    if shuffled {
        for i in (1..n).rev() {
            ids.swap(i, (next() % (i as u64 + 1)) as usize);
        }
    }
    let account_count: Option<u64> = arg(5).map(|s| s.parse().unwrap());
    let ranking = if arg(6).is_some_and(|s| s == "account") {
        Ranking::Account
    } else {
        Ranking::Position
    };
    let accounts: Vec<u64> = (0..n)
        .map(|_| match account_count {
            Some(count) => 1 + next() % count,
            None => next() >> 24,
        })
        .collect();
    let pnl: Vec<i64> = (0..n)
        .map(|_| {
            if flat {
                9000 + (next() % 2000) as i64
            } else {
                let u = (next() >> 11) as f64 / (1u64 << 53) as f64;
                let v = (100.0 * (1.0 - u).powf(-1.0 / 1.2)) as i64;
                if next() & 1 == 0 {
                    v
                } else {
                    -v
                }
            }
        })
        .collect();
    let loss = pnl
        .iter()
        .filter(|&&v| v > 0)
        .map(|&v| v as i128)
        .sum::<i128>()
        / 3;
    let policy = Policy::parse("0.2", "0.9").unwrap();
    let positions = Positions {
        position_id: &ids,
        account_id: &accounts,
        pnl: &pnl,
    };
    let mut times: Vec<Duration> = Vec::new();
    let mut participants = 0;
    for _ in 0..runs {
        let start = Instant::now();
        let a = allocate_ranked(loss as i64, loss as i64 / 10, policy, ranking, positions).unwrap();
        times.push(start.elapsed());
        participants = a.summary.participant_count;
    }
    times.sort();
    println!(
        "min {:.1} ms median {:.1} ms participants {participants}",
        times[0].as_secs_f64() * 1e3,
        times[runs / 2].as_secs_f64() * 1e3
    );
}
