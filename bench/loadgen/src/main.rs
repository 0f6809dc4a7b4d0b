//! RecordLiquidation load: `--clients` concurrent clients, each on its own connection, each
//! sending one call at a time and waiting for its reply, for `--warmup` then `--seconds`.
//! With `--batch-size N`, each call is a RecordLiquidations of N items instead, and every
//! outcome is checked. Prints `calls=… errors=… p50_us=… p99_us=…` for the measured window
//! (calls, not items).
//!
//! The benchmark's clients run on the server's machine; a client written in Rust leaves the
//! CPU to the server (the Python client's own cost per call is as large as the server's).

use std::time::{Duration, Instant};

use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};
use tonic_prost::ProstCodec;

/// insurance.v1.RecordLiquidationRequest, field numbers as in proto/ledger/api/v1.
#[derive(Clone, PartialEq, prost::Message)]
struct RecordLiquidationRequest {
    #[prost(string, tag = "1")]
    liquidation_id: String,
    #[prost(string, tag = "2")]
    cycle_id: String,
    #[prost(string, tag = "3")]
    symbol: String,
    #[prost(uint64, tag = "4")]
    account_id: u64,
    #[prost(uint64, tag = "5")]
    position_id: u64,
    #[prost(int32, tag = "6")]
    side: i32,
    #[prost(string, tag = "7")]
    quantity: String,
    #[prost(string, tag = "8")]
    takeover_price: String,
    #[prost(string, tag = "9")]
    close_price: String,
    #[prost(sint64, tag = "10")]
    remaining_margin: i64,
}

/// insurance.v1.LiquidationResult: only what the load checks.
#[derive(Clone, PartialEq, prost::Message)]
struct LiquidationResult {
    #[prost(string, tag = "1")]
    liquidation_id: String,
}

/// insurance.v1.RecordLiquidationsRequest.
#[derive(Clone, PartialEq, prost::Message)]
struct RecordLiquidationsRequest {
    #[prost(message, repeated, tag = "1")]
    liquidations: Vec<RecordLiquidationRequest>,
}

/// insurance.v1.LiquidationOutcome.
#[derive(Clone, PartialEq, prost::Message)]
struct LiquidationOutcome {
    #[prost(uint32, tag = "1")]
    code: u32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, optional, tag = "3")]
    result: Option<LiquidationResult>,
}

/// insurance.v1.RecordLiquidationsResponse.
#[derive(Clone, PartialEq, prost::Message)]
struct RecordLiquidationsResponse {
    #[prost(message, repeated, tag = "1")]
    outcomes: Vec<LiquidationOutcome>,
}

const METHOD: &str = "/insurance.v1.Clearing/RecordLiquidation";
const BATCH_METHOD: &str = "/insurance.v1.Clearing/RecordLiquidations";

struct Args {
    target: String,
    clients: usize,
    seconds: f64,
    warmup: f64,
    prefix: String,
    batch_size: u64,
}

fn parse_args() -> Args {
    let mut args = Args {
        target: String::new(),
        clients: 16,
        seconds: 10.0,
        warmup: 1.0,
        prefix: "r".into(),
        batch_size: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--target" => args.target = value,
            "--clients" => args.clients = value.parse().expect("--clients"),
            "--seconds" => args.seconds = value.parse().expect("--seconds"),
            "--warmup" => args.warmup = value.parse().expect("--warmup"),
            "--prefix" => args.prefix = value,
            "--batch-size" => args.batch_size = value.parse().expect("--batch-size"),
            _ => panic!("unknown flag {flag}"),
        }
    }
    assert!(!args.target.is_empty(), "--target host:port is required");
    args
}

fn request(prefix: &str, client: usize, n: u64) -> RecordLiquidationRequest {
    // Alternate profits and losses, as the Python client does, so both flows are exercised.
    let close = if n % 2 == 1 { "60010.5" } else { "59990.25" };
    RecordLiquidationRequest {
        liquidation_id: format!("{prefix}{client}-{n}"),
        cycle_id: "bench".into(),
        symbol: "BTCUSDT".into(),
        account_id: n,
        position_id: n,
        side: 1,
        quantity: "1.5".into(),
        takeover_price: "60000".into(),
        close_price: close.into(),
        remaining_margin: 1000,
    }
}

/// One client's measured calls: the latency of each call that succeeded within the measured
/// window, and the count of failed calls (the first one's reason printed).
struct Tally {
    client: usize,
    measure_from: Instant,
    latencies: Vec<u64>,
    errors: u64,
}

impl Tally {
    fn new(client: usize, measure_from: Instant) -> Self {
        Self {
            client,
            measure_from,
            latencies: Vec::new(),
            errors: 0,
        }
    }

    /// A call started at `started` has ended, well or with the reason it failed.
    fn record(&mut self, started: Instant, outcome: Result<(), String>) {
        match outcome {
            Ok(()) if started >= self.measure_from => {
                self.latencies.push(started.elapsed().as_micros() as u64);
            }
            Ok(()) => {}
            Err(why) => {
                self.errors += 1;
                if self.errors == 1 {
                    eprintln!("client {}: {why}", self.client);
                }
            }
        }
    }

    fn into_parts(self) -> (Vec<u64>, u64) {
        (self.latencies, self.errors)
    }
}

async fn client(
    channel: Channel,
    prefix: String,
    client: usize,
    measure_from: Instant,
    stop_at: Instant,
) -> (Vec<u64>, u64) {
    let mut grpc = tonic::client::Grpc::new(channel);
    let path = PathAndQuery::from_static(METHOD);
    let mut tally = Tally::new(client, measure_from);
    for n in 0.. {
        let started = Instant::now();
        if started >= stop_at {
            break;
        }
        grpc.ready().await.expect("channel ready");
        let codec: ProstCodec<RecordLiquidationRequest, LiquidationResult> = ProstCodec::default();
        let sent = request(&prefix, client, n);
        let id = sent.liquidation_id.clone();
        let reply = grpc
            .unary(tonic::Request::new(sent), path.clone(), codec)
            .await;
        let outcome = match reply {
            Ok(reply) if reply.get_ref().liquidation_id != id => Err(format!(
                "reply for {:?}, sent {id:?}",
                reply.get_ref().liquidation_id
            )),
            Ok(_) => Ok(()),
            Err(status) => Err(status.to_string()),
        };
        tally.record(started, outcome);
    }
    tally.into_parts()
}

/// Like `client`, each call a RecordLiquidations of `batch_size` items; a call fails unless
/// every item is OK and answered in request order.
async fn batch_client(
    channel: Channel,
    prefix: String,
    client: usize,
    batch_size: u64,
    measure_from: Instant,
    stop_at: Instant,
) -> (Vec<u64>, u64) {
    let mut grpc = tonic::client::Grpc::new(channel);
    let path = PathAndQuery::from_static(BATCH_METHOD);
    let mut tally = Tally::new(client, measure_from);
    let mut n = 0;
    loop {
        let started = Instant::now();
        if started >= stop_at {
            break;
        }
        grpc.ready().await.expect("channel ready");
        let codec: ProstCodec<RecordLiquidationsRequest, RecordLiquidationsResponse> =
            ProstCodec::default();
        let sent = RecordLiquidationsRequest {
            liquidations: (n..n + batch_size)
                .map(|k| request(&prefix, client, k))
                .collect(),
        };
        let ids: Vec<String> = sent
            .liquidations
            .iter()
            .map(|item| item.liquidation_id.clone())
            .collect();
        n += batch_size;
        let reply = grpc
            .unary(tonic::Request::new(sent), path.clone(), codec)
            .await;
        let outcome = match reply {
            Ok(reply) => check_outcomes(&reply.get_ref().outcomes, &ids),
            Err(status) => Err(status.to_string()),
        };
        tally.record(started, outcome);
    }
    tally.into_parts()
}

/// One OK outcome per item, in request order.
fn check_outcomes(outcomes: &[LiquidationOutcome], ids: &[String]) -> Result<(), String> {
    if outcomes.len() != ids.len() {
        return Err(format!(
            "{} outcomes for {} items",
            outcomes.len(),
            ids.len()
        ));
    }
    for (outcome, id) in outcomes.iter().zip(ids) {
        let answered = outcome.result.as_ref().map(|result| &result.liquidation_id);
        if outcome.code != 0 || answered != Some(id) {
            return Err(format!("item {id:?} came back as {outcome:?}"));
        }
    }
    Ok(())
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let k = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[k.min(sorted.len() - 1)]
}

fn main() {
    let args = parse_args();
    // Two threads: the load should not take more of the machine than a client needs.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async move {
        let mut channels = Vec::new();
        for _ in 0..args.clients {
            let endpoint = Endpoint::from_shared(format!("http://{}", args.target))
                .expect("target")
                .tcp_nodelay(true);
            channels.push(endpoint.connect().await.expect("connect"));
        }
        let now = Instant::now();
        let measure_from = now + Duration::from_secs_f64(args.warmup);
        let stop_at = measure_from + Duration::from_secs_f64(args.seconds);
        let tasks: Vec<_> = channels
            .into_iter()
            .enumerate()
            .map(|(k, channel)| {
                let prefix = args.prefix.clone();
                if args.batch_size > 0 {
                    tokio::spawn(batch_client(
                        channel,
                        prefix,
                        k,
                        args.batch_size,
                        measure_from,
                        stop_at,
                    ))
                } else {
                    tokio::spawn(client(channel, prefix, k, measure_from, stop_at))
                }
            })
            .collect();
        let mut latencies = Vec::new();
        let mut errors = 0;
        for task in tasks {
            let (mut l, e) = task.await.expect("client task");
            latencies.append(&mut l);
            errors += e;
        }
        latencies.sort_unstable();
        println!(
            "calls={} errors={} p50_us={} p99_us={}",
            latencies.len(),
            errors,
            percentile(&latencies, 50.0),
            percentile(&latencies, 99.0)
        );
    });
}
