//! The ledger's hash chain for a batch of new entries: `ledger.journal.entry_hash`, byte for
//! byte, each link hashing the one before it. The liquidation path links a thousand entries a
//! batch, where the Python text and hash of each cost a tenth of the writer's time.

use std::fmt::Write;

use sha2::{Digest, Sha256};

use crate::decode::hex;

/// A new entry of the liquidation path (no memo, reversing nothing).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewEntry<'a> {
    pub entry_id: u64,
    pub kind: u8,
    pub reference: &'a str,
    pub debit: &'a str,
    pub credit: &'a str,
    pub amount: i64,
}

/// The hashes of `entries`, linked in order after `previous`, their sequence numbers
/// `first_seq`, `first_seq + 1`, …: each is the SHA-256 (lowercase hex) of the JSON text of
/// ["entry", previous, currency, seq, entry_id, kind, reference, [[debit, -amount],
/// [credit, amount]], memo, created_at_us, reverses].
pub fn entry_chain(
    previous: &str,
    first_seq: u64,
    currency: &str,
    created_at_us: i64,
    entries: &[NewEntry<'_>],
) -> Vec<String> {
    let mut quoted_currency = String::new();
    json_ascii(&mut quoted_currency, currency);
    let mut previous = previous.to_owned();
    let mut text = String::with_capacity(512);
    let mut hashes = Vec::with_capacity(entries.len());
    for (seq, e) in (first_seq..).zip(entries) {
        text.clear();
        text.push_str("[\"entry\",");
        json_ascii(&mut text, &previous);
        text.push(',');
        text.push_str(&quoted_currency);
        // Writing to a String cannot fail.
        let _ = write!(text, ",{seq},{},{},", e.entry_id, e.kind);
        json_ascii(&mut text, e.reference);
        text.push_str(",[[");
        json_ascii(&mut text, e.debit);
        let _ = write!(text, ",{}],[", -i128::from(e.amount));
        json_ascii(&mut text, e.credit);
        let _ = write!(text, ",{}]],\"\",{created_at_us},0]", e.amount);
        previous = hex_sha256(text.as_bytes());
        hashes.push(previous.clone());
    }
    hashes
}

/// Lowercase hex SHA-256.
pub(crate) fn hex_sha256(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// A string as Python's `json.dumps(..., ensure_ascii=True)` writes it: quoted; `"`, `\` and
/// the control characters escaped, every character beyond printable ASCII as `\uXXXX`
/// (lowercase, in UTF-16 units).
pub(crate) fn json_ascii(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                for unit in c.encode_utf16(&mut [0; 2]) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped_as_python_json_escapes_them() {
        let mut out = String::new();
        json_ascii(&mut out, "a\"b\\c\n\t\u{1}\u{7f}é😀");
        assert_eq!(out, r#""a\"b\\c\n\t\u0001\u007f\u00e9\ud83d\ude00""#);
    }

    #[test]
    fn each_link_hashes_the_one_before() {
        let entry = |entry_id| NewEntry {
            entry_id,
            kind: 3,
            reference: "liq-1",
            debit: "liquidation_engine",
            credit: "insurance_fund",
            amount: 5,
        };
        let entries = [entry(10), entry(11)];
        let both = entry_chain("", 1, "USDT", 7, &entries);
        let first = entry_chain("", 1, "USDT", 7, &entries[..1]);
        let second = entry_chain(&first[0], 2, "USDT", 7, &entries[1..]);
        assert_eq!(both, [first[0].clone(), second[0].clone()]);
        let text = r#"["entry","","USDT",1,10,3,"liq-1",[["liquidation_engine",-5],["insurance_fund",5]],"",7,0]"#;
        assert_eq!(first[0], hex_sha256(text.as_bytes()));
    }
}
