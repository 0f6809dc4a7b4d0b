//! Times one allocation over synthetic columns: `cargo run --release --example profile -- N`.
use rust_alloc::{allocate, Policy, Positions};
use std::time::Instant;

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map_or(10_000_000, |s| s.parse().unwrap());
    let flat = std::env::args().nth(2).is_some_and(|s| s == "flat");
    let mut state = 0x9e3779b97f4a7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let ids: Vec<u64> = (1..=n as u64).collect();
    let accounts: Vec<u64> = (0..n).map(|_| next() >> 24).collect();
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
    for _ in 0..5 {
        let start = Instant::now();
        let positions = Positions {
            position_id: &ids,
            account_id: &accounts,
            pnl: &pnl,
        };
        let a = allocate(loss as i64, 0, policy, positions).unwrap();
        println!(
            "{:?} participants {}",
            start.elapsed(),
            a.summary.participant_count
        );
    }
}
