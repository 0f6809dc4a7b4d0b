//! The cycle's wire format, straight from bytes: `insurance.v1.CycleInput` messages into
//! growing position columns, and allocation columns into `AllocationChunk` messages.
//!
//! Only the few messages on the hot path are handled, by hand, so millions of positions never
//! become Python objects. Both packed (the proto3 default) and unpacked repeated encodings
//! are read, unknown fields are skipped, and a message is applied whole or not at all.

use sha2::{Digest, Sha256};

use crate::ids;
use crate::Positions;

pub(crate) const WIRE_VARINT: u64 = 0;
const WIRE_FIXED64: u64 = 1;
pub(crate) const WIRE_LEN: u64 = 2;
const WIRE_FIXED32: u64 = 5;
const FIELD_NUMBER_MAX: u64 = (1 << 29) - 1; // protobuf's largest field number
const LENGTH_MAX: u64 = (1 << 31) - 1; // protobuf's largest length-delimited field

/// Why a message was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Not a valid encoding of the message (the text says where).
    Malformed(&'static str),
    /// A position chunk whose three columns differ in length.
    ColumnLengths {
        position_id: usize,
        account_id: usize,
        pnl: usize,
    },
    /// Appending the chunk would exceed the caller's limit.
    TooManyPositions { count: usize, max: usize },
    /// Two positions share an id (found when the digest orders them).
    DuplicatePositionId(u64),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Malformed(what) => write!(f, "malformed CycleInput: {what}"),
            Self::ColumnLengths {
                position_id,
                account_id,
                pnl,
            } => write!(
                f,
                "position chunk columns have unequal lengths: position_id {position_id}, \
                 account_id {account_id}, pnl {pnl}"
            ),
            Self::TooManyPositions { count, max } => {
                write!(f, "{count} positions exceed the limit of {max}")
            }
            Self::DuplicatePositionId(id) => write!(f, "duplicate position_id {id}"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// What one `CycleInput` message held.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    Header {
        cycle_id: String,
        currency: String,
    },
    /// A position chunk, appended to the columns.
    Positions {
        rows: usize,
    },
    /// No item set (an empty message).
    Empty,
}

/// The positions of a cycle, accumulated chunk by chunk.
#[derive(Clone, Debug, Default)]
pub struct PositionColumns {
    pub position_id: Vec<u64>,
    pub account_id: Vec<u64>,
    pub pnl: Vec<i64>,
}

/// Protobuf's wire format, read field by field (also the liquidation path's, `liquidation.rs`).
pub(crate) struct Reader<'a> {
    pub(crate) bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut value = 0u64;
        for (index, &byte) in self.bytes.iter().enumerate().take(10) {
            value |= u64::from(byte & 0x7f) << (7 * index);
            if byte < 0x80 {
                self.bytes = &self.bytes[index + 1..];
                return Ok(value);
            }
        }
        Err(DecodeError::Malformed("truncated or overlong varint"))
    }

    /// A varint of at most `max_bytes` bytes (protobuf reads keys and lengths as 32-bit
    /// varints: at most 5 bytes, where a 64-bit value may take 10).
    fn short_varint(&mut self, max_bytes: usize, what: &'static str) -> Result<u64, DecodeError> {
        let before = self.bytes.len();
        let value = self.varint()?;
        if before - self.bytes.len() > max_bytes {
            return Err(DecodeError::Malformed(what));
        }
        Ok(value)
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], DecodeError> {
        if len > self.bytes.len() {
            return Err(DecodeError::Malformed(
                "field runs past the end of the message",
            ));
        }
        let (head, tail) = self.bytes.split_at(len);
        self.bytes = tail;
        Ok(head)
    }

    /// The next (field number, wire type), or `None` at the end.
    pub(crate) fn key(&mut self) -> Result<Option<(u64, u64)>, DecodeError> {
        if self.bytes.is_empty() {
            return Ok(None);
        }
        let key = self.short_varint(5, "field key longer than 5 bytes")?;
        if key >> 3 == 0 {
            return Err(DecodeError::Malformed("field number 0"));
        }
        if key >> 3 > FIELD_NUMBER_MAX {
            return Err(DecodeError::Malformed("field number above 2^29 - 1"));
        }
        Ok(Some((key >> 3, key & 7)))
    }

    pub(crate) fn length_delimited(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.short_varint(5, "length longer than 5 bytes")?;
        if len > LENGTH_MAX {
            return Err(DecodeError::Malformed("length above 2^31 - 1"));
        }
        self.take(usize::try_from(len).map_err(|_| DecodeError::Malformed("length"))?)
    }

    fn skip(&mut self, wire: u64) -> Result<(), DecodeError> {
        match wire {
            WIRE_VARINT => self.varint().map(drop),
            WIRE_FIXED64 => self.take(8).map(drop),
            WIRE_LEN => self.length_delimited().map(drop),
            WIRE_FIXED32 => self.take(4).map(drop),
            _ => Err(DecodeError::Malformed("unsupported wire type")),
        }
    }
}

/// Appends a repeated 64-bit fixed field, packed or not, to `out`.
fn fixed64s(reader: &mut Reader<'_>, wire: u64, out: &mut Vec<u64>) -> Result<(), DecodeError> {
    match wire {
        WIRE_FIXED64 => {
            let bytes = reader.take(8)?;
            out.push(u64::from_le_bytes(bytes.try_into().expect("8 bytes")));
        }
        WIRE_LEN => {
            let bytes = reader.length_delimited()?;
            if bytes.len() % 8 != 0 {
                return Err(DecodeError::Malformed(
                    "packed fixed64 length not a multiple of 8",
                ));
            }
            out.extend(
                bytes
                    .chunks_exact(8)
                    .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes"))),
            );
        }
        _ => {
            return Err(DecodeError::Malformed(
                "wrong wire type for a fixed64 column",
            ))
        }
    }
    Ok(())
}

/// A header's fields merged into `cycle_id` and `currency`: a header that occurs twice in one
/// message is one header with the later fields winning, as protobuf merges a message field.
fn header_into(
    bytes: &[u8],
    cycle_id: &mut String,
    currency: &mut String,
) -> Result<(), DecodeError> {
    let mut reader = Reader { bytes };
    while let Some((field, wire)) = reader.key()? {
        let target = match (field, wire) {
            (1, WIRE_LEN) => &mut *cycle_id,
            (2, WIRE_LEN) => &mut *currency,
            (1 | 2, _) => return Err(DecodeError::Malformed("wrong wire type for a string")),
            _ => {
                reader.skip(wire)?;
                continue;
            }
        };
        let text = std::str::from_utf8(reader.length_delimited()?)
            .map_err(|_| DecodeError::Malformed("header string is not UTF-8"))?;
        *target = text.to_owned();
    }
    Ok(())
}

/// One chunk's columns (pnl kept as u64 bits until the lengths are checked).
#[derive(Default)]
struct Chunk {
    position_id: Vec<u64>,
    account_id: Vec<u64>,
    pnl: Vec<u64>,
}

fn chunk_into(bytes: &[u8], chunk: &mut Chunk) -> Result<(), DecodeError> {
    let mut reader = Reader { bytes };
    while let Some((field, wire)) = reader.key()? {
        match field {
            1 => fixed64s(&mut reader, wire, &mut chunk.position_id)?,
            2 => fixed64s(&mut reader, wire, &mut chunk.account_id)?,
            3 => fixed64s(&mut reader, wire, &mut chunk.pnl)?,
            _ => reader.skip(wire)?,
        }
    }
    Ok(())
}

impl PositionColumns {
    pub fn len(&self) -> usize {
        self.position_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.position_id.is_empty()
    }

    pub fn positions(&self) -> Positions<'_> {
        Positions {
            position_id: &self.position_id,
            account_id: &self.account_id,
            pnl: &self.pnl,
        }
    }

    /// Decodes one serialized `CycleInput`; a position chunk is appended to the columns if
    /// it is valid and keeps the total within `positions_max`. Later fields win, as in
    /// protobuf: a header after a chunk in the same message replaces it.
    pub fn feed(&mut self, message: &[u8], positions_max: usize) -> Result<Item, DecodeError> {
        let mut reader = Reader { bytes: message };
        let mut item = Item::Empty;
        let mut chunk: Option<Chunk> = None;
        while let Some((field, wire)) = reader.key()? {
            match (field, wire) {
                (1, WIRE_LEN) => {
                    let (mut cycle_id, mut currency) = match item {
                        Item::Header { cycle_id, currency } => (cycle_id, currency),
                        _ => (String::new(), String::new()),
                    };
                    header_into(reader.length_delimited()?, &mut cycle_id, &mut currency)?;
                    item = Item::Header { cycle_id, currency };
                    chunk = None;
                }
                (2, WIRE_LEN) => {
                    chunk_into(
                        reader.length_delimited()?,
                        chunk.get_or_insert_with(Chunk::default),
                    )?;
                    item = Item::Empty; // the oneof is now `positions`
                }
                (1 | 2, _) => return Err(DecodeError::Malformed("wrong wire type for an item")),
                _ => reader.skip(wire)?,
            }
        }
        let Some(chunk) = chunk else {
            return Ok(item);
        };
        let rows = chunk.position_id.len();
        if chunk.account_id.len() != rows || chunk.pnl.len() != rows {
            return Err(DecodeError::ColumnLengths {
                position_id: rows,
                account_id: chunk.account_id.len(),
                pnl: chunk.pnl.len(),
            });
        }
        let count = self.len() + rows;
        if count > positions_max {
            return Err(DecodeError::TooManyPositions {
                count,
                max: positions_max,
            });
        }
        self.position_id.extend_from_slice(&chunk.position_id);
        self.account_id.extend_from_slice(&chunk.account_id);
        self.pnl.extend(chunk.pnl.iter().map(|&bits| bits as i64));
        Ok(Item::Positions { rows })
    }

    /// Lowercase hex SHA-256 over the positions in position_id order, 24 bytes each:
    /// position_id, account_id, pnl, little-endian.
    pub fn input_digest(&self) -> Result<String, DecodeError> {
        let order = ids::order_ids(&self.position_id).map_err(DecodeError::DuplicatePositionId)?;
        let mut hasher = Sha256::new();
        let mut record = [0u8; 24];
        for rank in 0..self.len() {
            let index = order.input_index(rank);
            record[..8].copy_from_slice(&self.position_id[index].to_le_bytes());
            record[8..16].copy_from_slice(&self.account_id[index].to_le_bytes());
            record[16..].copy_from_slice(&self.pnl[index].to_le_bytes());
            hasher.update(record);
        }
        Ok(hex(&hasher.finalize()))
    }
}

/// The digest of a closed cycle's allocation rows that its chain link carries: lowercase hex
/// SHA-256 over the rows in position order, each as 32 bytes: position_id (u64), account_id
/// (u64), pnl (i64), amount (i64), little-endian. (A row's entry id is the cycle's first
/// allocation id + its rank, which the link carries.) The columns must be of equal length.
pub fn allocations_digest(
    position_id: &[u64],
    account_id: &[u64],
    pnl: &[i64],
    amount: &[i64],
) -> String {
    assert!(
        [account_id.len(), pnl.len(), amount.len()]
            .iter()
            .all(|&len| len == position_id.len()),
        "allocation columns of unequal length"
    );
    let mut hasher = Sha256::new();
    let mut record = [0u8; 32];
    for row in 0..position_id.len() {
        record[..8].copy_from_slice(&position_id[row].to_le_bytes());
        record[8..16].copy_from_slice(&account_id[row].to_le_bytes());
        record[16..24].copy_from_slice(&pnl[row].to_le_bytes());
        record[24..].copy_from_slice(&amount[row].to_le_bytes());
        hasher.update(record);
    }
    hex(&hasher.finalize())
}

/// Lowercase hex, as the digests are shown and stored.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    bytes
        .iter()
        .flat_map(|byte| {
            [
                DIGITS[usize::from(byte >> 4)],
                DIGITS[usize::from(byte & 0xf)],
            ]
        })
        .map(char::from)
        .collect()
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_packed(out: &mut Vec<u8>, field: u64, values: impl ExactSizeIterator<Item = [u8; 8]>) {
    if values.len() == 0 {
        return;
    }
    put_varint(out, (field << 3) | WIRE_LEN);
    put_varint(out, 8 * values.len() as u64);
    values.for_each(|bytes| out.extend_from_slice(&bytes));
}

/// Serialized `AllocationChunk` messages of at most `rows_per_chunk` rows each (packed
/// fields 1 to 4). Requires equal column lengths and `rows_per_chunk` > 0.
pub fn encode_allocation_chunks(
    position_id: &[u64],
    account_id: &[u64],
    pnl: &[i64],
    amount: &[i64],
    rows_per_chunk: usize,
) -> Vec<Vec<u8>> {
    assert!(rows_per_chunk > 0, "rows_per_chunk must be positive");
    let rows = position_id.len();
    assert!(account_id.len() == rows && pnl.len() == rows && amount.len() == rows);
    (0..rows)
        .step_by(rows_per_chunk)
        .map(|start| {
            let range = start..(start + rows_per_chunk).min(rows);
            let mut out = Vec::with_capacity(32 * range.len() + 24);
            put_packed(
                &mut out,
                1,
                position_id[range.clone()].iter().map(|v| v.to_le_bytes()),
            );
            put_packed(
                &mut out,
                2,
                account_id[range.clone()].iter().map(|v| v.to_le_bytes()),
            );
            put_packed(
                &mut out,
                3,
                pnl[range.clone()].iter().map(|v| v.to_le_bytes()),
            );
            put_packed(&mut out, 4, amount[range].iter().map(|v| v.to_le_bytes()));
            out
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packed_chunk(ids: &[u64], accounts: &[u64], pnl: &[i64]) -> Vec<u8> {
        let mut chunk = Vec::new();
        put_packed(&mut chunk, 1, ids.iter().map(|v| v.to_le_bytes()));
        put_packed(&mut chunk, 2, accounts.iter().map(|v| v.to_le_bytes()));
        put_packed(&mut chunk, 3, pnl.iter().map(|v| v.to_le_bytes()));
        let mut message = vec![(2 << 3) | 2];
        put_varint(&mut message, chunk.len() as u64);
        message.extend(chunk);
        message
    }

    #[test]
    fn decodes_header_and_packed_and_unpacked_chunks() {
        let mut columns = PositionColumns::default();
        // header { cycle_id: "c1", currency: "USDT" } plus an unknown varint field 9.
        let header = [
            10, 10, 10, 2, b'c', b'1', 18, 4, b'U', b'S', b'D', b'T', 72, 1,
        ];
        let item = columns.feed(&header, 10).unwrap();
        assert_eq!(
            item,
            Item::Header {
                cycle_id: "c1".into(),
                currency: "USDT".into()
            }
        );
        assert_eq!(
            columns
                .feed(&packed_chunk(&[5, 6], &[1, 2], &[-7, 8]), 10)
                .unwrap(),
            Item::Positions { rows: 2 }
        );
        // Unpacked: positions { position_id: 9 (fixed64), account_id: 3, pnl: -1 }.
        let mut chunk = vec![9];
        chunk.extend(9u64.to_le_bytes());
        chunk.push(17);
        chunk.extend(3u64.to_le_bytes());
        chunk.push(25);
        chunk.extend((-1i64).to_le_bytes());
        let mut message = vec![18, chunk.len() as u8];
        message.extend(chunk);
        assert_eq!(
            columns.feed(&message, 10).unwrap(),
            Item::Positions { rows: 1 }
        );
        assert_eq!(columns.position_id, [5, 6, 9]);
        assert_eq!(columns.account_id, [1, 2, 3]);
        assert_eq!(columns.pnl, [-7, 8, -1]);
        assert_eq!(columns.feed(&[], 10).unwrap(), Item::Empty);
    }

    #[test]
    fn refuses_bad_messages_whole() {
        let mut columns = PositionColumns::default();
        assert!(matches!(
            columns.feed(&packed_chunk(&[1, 2], &[1], &[1, 2]), 10),
            Err(DecodeError::ColumnLengths {
                position_id: 2,
                account_id: 1,
                pnl: 2
            })
        ));
        assert!(matches!(
            columns.feed(&[18, 5, 1], 10),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            columns.feed(&[0x80], 10),
            Err(DecodeError::Malformed(_))
        ));
        assert_eq!(
            columns.feed(&packed_chunk(&[1, 2, 3], &[0; 3], &[0; 3]), 2),
            Err(DecodeError::TooManyPositions { count: 3, max: 2 })
        );
        assert!(columns.is_empty());
    }

    fn header_message(field: u8, text: &str) -> Vec<u8> {
        let inner = [&[field << 3 | 2, text.len() as u8][..], text.as_bytes()].concat();
        [&[1 << 3 | 2, inner.len() as u8][..], &inner].concat()
    }

    #[test]
    fn a_header_twice_in_one_message_merges_as_protobuf_does() {
        let message = [header_message(1, "a"), header_message(2, "B")].concat();
        let mut columns = PositionColumns::default();
        assert_eq!(
            columns.feed(&message, 10),
            Ok(Item::Header {
                cycle_id: "a".into(),
                currency: "B".into()
            })
        );
        let again = [header_message(1, "a"), header_message(1, "b")].concat();
        assert_eq!(
            columns.feed(&again, 10),
            Ok(Item::Header {
                cycle_id: "b".into(),
                currency: String::new()
            })
        );
    }

    #[test]
    fn a_field_number_above_the_maximum_is_malformed() {
        let mut columns = PositionColumns::default();
        let message = [0x80, 0x80, 0x80, 0x80, 0x10, 0x00]; // field 2^29, varint 0
        assert!(matches!(
            columns.feed(&message, 10),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn keys_and_lengths_longer_than_five_bytes_are_malformed() {
        // Found by the fuzz target: an unknown field's key padded to 6 bytes (its value fits
        // in 32 bits), which protobuf refuses. A length padded likewise, and one above 2^31-1.
        let padded_key = [0x82, 0x82, 0x82, 0x82, 0x82, 0x00, 0x00];
        let padded_length = [0x0a, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00];
        let huge_length = [0x0a, 0x80, 0x80, 0x80, 0x80, 0x08];
        for message in [&padded_key[..], &padded_length[..], &huge_length[..]] {
            let mut columns = PositionColumns::default();
            assert!(
                matches!(columns.feed(message, 10), Err(DecodeError::Malformed(_))),
                "{message:02x?}"
            );
        }
        // Five bytes are still a key: field 2^29 - 1 at the most, an unknown field skipped.
        let mut columns = PositionColumns::default();
        let widest = [0xf8, 0xff, 0xff, 0xff, 0x0f, 0x00];
        assert!(columns.feed(&widest, 10).is_ok());
    }

    #[test]
    fn digest_is_order_independent() {
        let mut a = PositionColumns::default();
        a.feed(&packed_chunk(&[2, 1], &[20, 10], &[-2, 1]), 10)
            .unwrap();
        let mut b = PositionColumns::default();
        b.feed(&packed_chunk(&[1], &[10], &[1]), 10).unwrap();
        b.feed(&packed_chunk(&[2], &[20], &[-2]), 10).unwrap();
        assert_eq!(a.input_digest(), b.input_digest());
        let mut records = Vec::new();
        for (id, account, pnl) in [(1u64, 10u64, 1i64), (2, 20, -2)] {
            records.extend(id.to_le_bytes());
            records.extend(account.to_le_bytes());
            records.extend(pnl.to_le_bytes());
        }
        let expected: String = Sha256::digest(&records)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(a.input_digest().unwrap(), expected);
    }

    #[test]
    fn encodes_chunks_of_bounded_rows() {
        let chunks = encode_allocation_chunks(&[1, 2, 3], &[4, 5, 6], &[7, 8, 9], &[1, 1, 1], 2);
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[1].len(), 4 * (2 + 8));
        assert_eq!(&chunks[1][..2], &[10, 8]);
        assert!(encode_allocation_chunks(&[], &[], &[], &[], 5).is_empty());
    }
}
