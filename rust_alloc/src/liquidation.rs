//! The liquidation path's fast validation: `RecordLiquidationRequest` messages straight from
//! their bytes into checked fields and the request hash, for the writer of a group commit.
//!
//! It takes only what is plainly valid: each field at most once, no unknown field, the ids
//! printable ASCII, the decimals at most 38 digits (a u128 numerator). Anything else gives
//! `None`, and the caller validates the message in Python (`ledger.liquidation.validate`),
//! the one source of the service's errors, which accepts or refuses it with the field named.
//! So this path may decline what is valid, never accept what is not, and yields exactly the
//! values (and hash bytes) the Python validation would.

use crate::chain::{hex_sha256, json_ascii};
use crate::decode::{Reader, WIRE_LEN, WIRE_VARINT};

/// `ledger.limits.ID_LENGTH_MAX`, in characters (here ASCII, so bytes).
pub const ID_LENGTH_MAX: usize = 128;
/// `ledger.limits.DECIMAL_PLACES_MAX`.
pub const DECIMAL_PLACES_MAX: usize = 18;
/// Python allows 40 digits; a u128 holds any 38. The longer ones take the Python path.
const DECIMAL_DIGITS_MAX: usize = 38;

const LONG: u64 = 1;
const SHORT: u64 = 2;

/// An exact positive decimal: `numerator / 10^places`, and its canonical text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exact {
    pub numerator: u128,
    pub places: u32,
    pub canonical: String,
}

/// A validated liquidation report; the strings borrow from the message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Liquidation<'a> {
    pub liquidation_id: &'a str,
    pub cycle_id: &'a str,
    pub symbol: &'a str,
    pub account_id: u64,
    pub position_id: u64,
    pub side: u8,
    pub quantity: Exact,
    pub takeover_price: Exact,
    pub close_price: Exact,
    pub remaining_margin: i64,
    /// `ledger.idempotency.liquidation_hash` of the fields: lowercase hex SHA-256.
    pub digest: String,
}

/// The items of a `RecordLiquidationsRequest`, or `None` unless every one is plainly valid.
pub fn batch(message: &[u8]) -> Option<Vec<Liquidation<'_>>> {
    let mut reader = Reader { bytes: message };
    let mut items = Vec::new();
    while let Some((field, wire)) = reader.key().ok()? {
        if field != 1 || wire != WIRE_LEN {
            return None;
        }
        items.push(one(reader.length_delimited().ok()?)?);
    }
    Some(items)
}

/// A `RecordLiquidationRequest`, or `None` unless it is plainly valid.
pub fn one(message: &[u8]) -> Option<Liquidation<'_>> {
    let mut seen = 0u16;
    let mut text = [""; 10]; // by field number - 1; only the string fields are set
    let mut number = [0u64; 10]; // likewise, the varint fields
    let mut reader = Reader { bytes: message };
    while let Some((field, wire)) = reader.key().ok()? {
        if !(1..=10).contains(&field) || seen & (1 << field) != 0 {
            return None; // unknown or repeated: protobuf's rules for those are Python's
        }
        seen |= 1 << field;
        let slot = (field - 1) as usize;
        match (field, wire) {
            (1..=3 | 7..=9, WIRE_LEN) => {
                text[slot] = printable(reader.length_delimited().ok()?)?;
            }
            (4..=6 | 10, WIRE_VARINT) => number[slot] = reader.varint().ok()?,
            _ => return None,
        }
    }
    let [liquidation_id, cycle_id, symbol] = [text[0], text[1], text[2]];
    if [liquidation_id, cycle_id, symbol]
        .iter()
        .any(|id| id.is_empty() || id.len() > ID_LENGTH_MAX)
    {
        return None;
    }
    let side = number[5];
    if side != LONG && side != SHORT {
        return None;
    }
    let zigzag = number[9];
    let remaining_margin = ((zigzag >> 1) as i64) ^ -((zigzag & 1) as i64);
    if remaining_margin < 0 {
        return None;
    }
    let mut liquidation = Liquidation {
        liquidation_id,
        cycle_id,
        symbol,
        account_id: number[3],
        position_id: number[4],
        side: side as u8,
        quantity: exact(text[6])?,
        takeover_price: exact(text[7])?,
        close_price: exact(text[8])?,
        remaining_margin,
        digest: String::new(),
    };
    liquidation.digest = digest(&liquidation);
    Some(liquidation)
}

/// Text of printable ASCII only (so valid UTF-8, without control characters, and escaped
/// by JSON as `"` and `\` alone).
fn printable(bytes: &[u8]) -> Option<&str> {
    if bytes.iter().all(|byte| (0x20..0x7f).contains(byte)) {
        std::str::from_utf8(bytes).ok()
    } else {
        None
    }
}

/// `ledger.money.exact_positive`: a plain decimal > 0, its digits ASCII, at most 18 places.
pub fn exact(text: &str) -> Option<Exact> {
    let (whole, fraction) = match text.split_once('.') {
        Some((_, "")) => return None,
        Some((whole, fraction)) => (whole, fraction),
        None => (text, ""),
    };
    let digits = |part: &str| part.bytes().all(|byte| byte.is_ascii_digit());
    if whole.is_empty()
        || !digits(whole)
        || !digits(fraction)
        || fraction.len() > DECIMAL_PLACES_MAX
        || whole.len() + fraction.len() > DECIMAL_DIGITS_MAX
    {
        return None;
    }
    let numerator = whole
        .bytes()
        .chain(fraction.bytes())
        .fold(0u128, |n, byte| n * 10 + u128::from(byte - b'0'));
    if numerator == 0 {
        return None;
    }
    let whole = match whole.trim_start_matches('0') {
        "" => "0",
        trimmed => trimmed,
    };
    let canonical = match fraction.trim_end_matches('0') {
        "" => whole.to_owned(),
        kept => format!("{whole}.{kept}"),
    };
    Some(Exact {
        numerator,
        places: fraction.len() as u32,
        canonical,
    })
}

/// `ledger.idempotency.liquidation_hash`: SHA-256 of the request's canonical JSON (keys
/// sorted, no spaces), byte for byte.
fn digest(l: &Liquidation<'_>) -> String {
    let mut json = String::with_capacity(256);
    json.push_str("{\"account_id\":");
    json.push_str(&l.account_id.to_string());
    json.push_str(",\"close_price\":\"");
    json.push_str(&l.close_price.canonical);
    json.push_str("\",\"cycle_id\":");
    json_ascii(&mut json, l.cycle_id);
    json.push_str(",\"liquidation_id\":");
    json_ascii(&mut json, l.liquidation_id);
    json.push_str(",\"position_id\":");
    json.push_str(&l.position_id.to_string());
    json.push_str(",\"quantity\":\"");
    json.push_str(&l.quantity.canonical);
    json.push_str("\",\"remaining_margin\":");
    json.push_str(&l.remaining_margin.to_string());
    json.push_str(",\"side\":");
    json.push_str(&l.side.to_string());
    json.push_str(",\"symbol\":");
    json_ascii(&mut json, l.symbol);
    json.push_str(",\"takeover_price\":\"");
    json.push_str(&l.takeover_price.canonical);
    json.push_str("\"}");
    hex_sha256(json.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put_varint(out: &mut Vec<u8>, mut value: u64) {
        while value >= 0x80 {
            out.push((value as u8) | 0x80);
            value >>= 7;
        }
        out.push(value as u8);
    }

    fn put_text(out: &mut Vec<u8>, field: u64, text: &str) {
        put_varint(out, (field << 3) | WIRE_LEN);
        put_varint(out, text.len() as u64);
        out.extend_from_slice(text.as_bytes());
    }

    fn put_number(out: &mut Vec<u8>, field: u64, value: u64) {
        put_varint(out, field << 3);
        put_varint(out, value);
    }

    fn request(id: &str, quantity: &str, margin: i64) -> Vec<u8> {
        let mut out = Vec::new();
        put_text(&mut out, 1, id);
        put_text(&mut out, 2, "c1");
        put_text(&mut out, 3, "BTCUSDT");
        put_number(&mut out, 4, 7);
        put_number(&mut out, 5, u64::MAX);
        put_number(&mut out, 6, SHORT);
        put_text(&mut out, 7, quantity);
        put_text(&mut out, 8, "64123.5");
        put_text(&mut out, 9, "064000.250");
        put_number(&mut out, 10, ((margin << 1) ^ (margin >> 63)) as u64);
        out
    }

    #[test]
    fn a_plain_request_is_taken_with_canonical_decimals() {
        let message = request("liq-1", "0.500", 1000);
        let l = one(&message).expect("plainly valid");
        assert_eq!(
            (l.liquidation_id, l.cycle_id, l.symbol),
            ("liq-1", "c1", "BTCUSDT")
        );
        assert_eq!((l.account_id, l.position_id, l.side), (7, u64::MAX, 2));
        assert_eq!(l.remaining_margin, 1000);
        assert_eq!((l.quantity.numerator, l.quantity.places), (500, 3));
        assert_eq!(l.quantity.canonical, "0.5");
        assert_eq!(l.close_price.canonical, "64000.25");
        assert_eq!(l.digest.len(), 64);
    }

    #[test]
    fn what_is_not_plainly_valid_is_declined() {
        for quantity in [
            "", "0", "0.000", ".5", "5.", "1.2.3", "-1", "1e3", " 1", "٣",
        ] {
            assert_eq!(one(&request("liq", quantity, 0)), None, "{quantity:?}");
        }
        assert!(exact(&format!("1.{}", "1".repeat(18))).is_some());
        assert_eq!(exact(&format!("1.{}", "1".repeat(19))), None);
        assert_eq!(exact(&"9".repeat(39)), None);
        assert_eq!(one(&request("", "1", 0)), None);
        assert_eq!(one(&request(&"x".repeat(129), "1", 0)), None);
        assert!(one(&request(&"x".repeat(128), "1", 0)).is_some());
        assert_eq!(one(&request("tab\there", "1", 0)), None);
        assert_eq!(one(&request("é", "1", 0)), None);
        assert_eq!(one(&request("liq", "1", -1)), None);
        let mut repeated = request("liq", "1", 0);
        put_number(&mut repeated, 4, 8);
        assert_eq!(one(&repeated), None);
        let mut unknown = request("liq", "1", 0);
        put_number(&mut unknown, 11, 1);
        assert_eq!(one(&unknown), None);
    }

    #[test]
    fn a_batch_is_taken_whole_or_not_at_all() {
        let mut message = Vec::new();
        for quantity in ["1", "2"] {
            let item = request("liq", quantity, 5);
            put_varint(&mut message, (1 << 3) | WIRE_LEN);
            put_varint(&mut message, item.len() as u64);
            message.extend(item);
        }
        assert_eq!(batch(&message).map(|items| items.len()), Some(2));
        assert_eq!(batch(&message[..message.len() - 1]), None);
        assert_eq!(batch(&[]), Some(vec![]));
    }
}
