//! The CA journal in the datastore and the disk KeyManager's `keys.json`:
//! which KeyManager key IDs each names, and the warnings when they disagree.
//!
//! At start a SPIRE server uses the `ca_journals` row whose active X.509
//! authority has its key in the KeyManager; entries whose key is missing are
//! dropped, and without a usable one the server mints a new CA
//! (spire-reference §11). A restore that brings back a journal without its
//! keys (or keys without their journal) therefore changes the trust domain's
//! root. This module compares the two by KeyManager key ID: a journal entry
//! in slot `A` of the X.509 CA uses key `x509-CA-A`, a JWT key in slot `B`
//! uses `JWT-Signer-B`, a WIT key `WIT-Signer-A` (SPIRE 1.15).
//!
//! Only key IDs are read: the journal's certificates and public keys are
//! skipped, and `keys.json`'s private keys are never decoded (nor printed).
//! Matching public keys would also catch a key that was replaced under the
//! same ID; that is not done.

use std::collections::BTreeSet;

use serde::Deserialize;

use crate::datastore::{Table, Value};

/// The status of a journal entry (SPIRE's `journal.Status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum EntryStatus {
    Unknown,
    Prepared,
    Active,
    Old,
}

impl EntryStatus {
    fn from_proto(v: u64) -> Self {
        match v {
            2 => Self::Prepared,
            3 => Self::Active,
            4 => Self::Old,
            _ => Self::Unknown,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Prepared => "prepared",
            Self::Active => "active",
            Self::Old => "old",
        }
    }

    /// Whether the server needs this entry's key (a prepared or active authority).
    fn in_use(self) -> bool {
        matches!(self, Self::Prepared | Self::Active)
    }
}

/// One authority a CA journal names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct JournalKey {
    /// The KeyManager key ID (`x509-CA-A`, `JWT-Signer-B`, ...).
    pub key_id: String,
    pub status: EntryStatus,
    /// The authority ID (subject key ID or JWT key ID), for messages.
    pub authority_id: String,
}

/// The key IDs a disk KeyManager's `keys.json` holds: the names under
/// `"keys"` (`{"keys": {"x509-CA-A": "<base64 PKCS#8>", ...}}`). Other fields
/// are ignored and the key material is never decoded.
///
/// # Errors
/// Text that is not a JSON object (the message never quotes the file).
pub fn key_ids_from_keys_json(bytes: &[u8]) -> Result<BTreeSet<String>, String> {
    #[derive(Deserialize)]
    struct KeysFile {
        #[serde(default)]
        keys: Option<std::collections::BTreeMap<String, serde::de::IgnoredAny>>,
    }
    let parsed: KeysFile = serde_json::from_slice(bytes).map_err(|e| {
        // serde_json's message names a line and column, never the content.
        format!(
            "it is not the disk KeyManager's JSON (line {}, column {})",
            e.line(),
            e.column()
        )
    })?;
    Ok(parsed.keys.unwrap_or_default().into_keys().collect())
}

/// The authorities a `ca_journals.data` value names (a protobuf
/// `journal.Entries`: X.509 CAs, JWT keys, WIT keys).
///
/// # Errors
/// Bytes that are not a well-formed protobuf message.
pub fn journal_keys(data: &[u8]) -> Result<Vec<JournalKey>, String> {
    // Entries: 1 = X509CAEntry, 2 = JWTKeyEntry, 3 = WITKeyEntry (repeated).
    // X509CAEntry: slot_id 1, status 5, authority_id 6.
    // JWTKeyEntry / WITKeyEntry: slot_id 1, status 6, authority_id 7.
    let mut out = Vec::new();
    for field in fields(data)? {
        let (prefix, status_field, authority_field) = match field.number {
            1 => ("x509-CA-", 5, 6),
            2 => ("JWT-Signer-", 6, 7),
            3 => ("WIT-Signer-", 6, 7),
            _ => continue,
        };
        let Wire::Bytes(entry) = field.value else {
            return Err(format!("field {} is not a message", field.number));
        };
        let (mut slot, mut status, mut authority) = (String::new(), 0u64, String::new());
        for f in fields(entry)? {
            match (f.number, f.value) {
                (1, Wire::Bytes(b)) => slot = String::from_utf8_lossy(b).into_owned(),
                (n, Wire::Varint(v)) if n == status_field => status = v,
                (n, Wire::Bytes(b)) if n == authority_field => {
                    authority = String::from_utf8_lossy(b).into_owned();
                }
                _ => {}
            }
        }
        out.push(JournalKey {
            key_id: format!("{prefix}{slot}"),
            status: EntryStatus::from_proto(status),
            authority_id: authority,
        });
    }
    Ok(out)
}

/// One CA journal of the datastore, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Journal {
    /// The row's `id`.
    pub id: i64,
    pub keys: Vec<JournalKey>,
}

/// Decodes the rows of the `ca_journals` table (`table` is its catalogue
/// entry, `rows` its rows in that column order). Rows that cannot be decoded
/// are returned as messages.
#[must_use]
pub fn journals_from_rows(table: &Table, rows: &[Vec<Value>]) -> (Vec<Journal>, Vec<String>) {
    let at = |name: &str| table.columns.iter().position(|c| c.name == name);
    let (Some(id_at), Some(data_at)) = (at("id"), at("data")) else {
        return (
            Vec::new(),
            vec!["ca_journals has no id or data column; the CA journal was not compared with the keys".into()],
        );
    };
    let mut journals = Vec::new();
    let mut problems = Vec::new();
    for row in rows {
        let id = match row.get(id_at) {
            Some(Value::Int(i)) => *i,
            _ => -1,
        };
        let data: &[u8] = match row.get(data_at) {
            Some(Value::Bytes(b)) => b,
            Some(Value::Text(t)) => t.as_bytes(),
            _ => &[],
        };
        match journal_keys(data) {
            Ok(keys) => journals.push(Journal { id, keys }),
            Err(e) => problems.push(format!(
                "CA journal {id} cannot be decoded ({e}); it was not compared with the keys"
            )),
        }
    }
    (journals, problems)
}

/// What the key store holds, for [`compare`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyStore {
    /// The key IDs of a `keys.json` that was read.
    Keys(BTreeSet<String>),
    /// No keys file (missing, or not backed up): no keys at all.
    Missing,
}

/// Warnings where the CA journals and the key store disagree: an authority
/// the server uses (active or prepared) whose key is not in the store, and a
/// CA key in the store that no journal names. With several journals (one per
/// server sharing the datastore), the first warning is given only when no
/// journal is fully backed by the keys.
#[must_use]
pub fn compare(journals: &[Journal], store: &KeyStore, store_name: &str) -> Vec<String> {
    let held = match store {
        KeyStore::Keys(k) => k.clone(),
        KeyStore::Missing => BTreeSet::new(),
    };
    let mut warnings = Vec::new();
    let missing: Vec<(i64, Vec<&JournalKey>)> = journals
        .iter()
        .map(|j| {
            let mut m: Vec<&JournalKey> = j
                .keys
                .iter()
                .filter(|k| k.status.in_use() && !held.contains(&k.key_id))
                .collect();
            m.sort();
            m.dedup_by(|a, b| a.key_id == b.key_id);
            (j.id, m)
        })
        .collect();
    let backed = missing.iter().any(|(_, m)| m.is_empty());
    if !backed {
        for (id, keys) in &missing {
            let names: Vec<String> = keys
                .iter()
                .map(|k| {
                    format!(
                        "{} ({}, authority {})",
                        k.key_id,
                        k.status.name(),
                        k.authority_id
                    )
                })
                .collect();
            warnings.push(format!(
                "CA journal {id} names keys that {store_name} does not hold: {}; a SPIRE server with these keys \
                 drops those authorities and, without an active one, mints a new CA (agents must learn the new root)",
                names.join(", ")
            ));
        }
    }
    let named: BTreeSet<&str> = journals
        .iter()
        .flat_map(|j| &j.keys)
        .map(|k| k.key_id.as_str())
        .collect();
    let ca_key = |id: &str| {
        ["x509-CA-", "JWT-Signer-", "WIT-Signer-"]
            .iter()
            .any(|p| id.starts_with(p))
    };
    let unnamed: Vec<&str> = held
        .iter()
        .map(String::as_str)
        .filter(|id| ca_key(id) && !named.contains(id))
        .collect();
    if !unnamed.is_empty() {
        warnings.push(format!(
            "{store_name} holds keys that no CA journal in the datastore names: {} (keys from another \
             datastore or snapshot? the server will not use them for its current authorities)",
            unnamed.join(", ")
        ));
    }
    warnings
}

/// One protobuf field as read from the wire.
struct Field<'a> {
    number: u64,
    value: Wire<'a>,
}

enum Wire<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

/// Splits a protobuf message into its fields (wire format only: varint,
/// 64-bit, length-delimited and 32-bit; groups are refused).
fn fields(mut data: &[u8]) -> Result<Vec<Field<'_>>, String> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let tag = varint(&mut data)?;
        let number = tag >> 3;
        if number == 0 {
            return Err("field number 0".into());
        }
        let value = match tag & 7 {
            0 => Wire::Varint(varint(&mut data)?),
            1 => {
                data = data.get(8..).ok_or("truncated 64-bit field")?;
                Wire::Fixed
            }
            2 => {
                let len = usize::try_from(varint(&mut data)?).map_err(|_| "length too large")?;
                if len > data.len() {
                    return Err("truncated length-delimited field".into());
                }
                let (bytes, rest) = data.split_at(len);
                data = rest;
                Wire::Bytes(bytes)
            }
            5 => {
                data = data.get(4..).ok_or("truncated 32-bit field")?;
                Wire::Fixed
            }
            w => return Err(format!("unsupported wire type {w}")),
        };
        out.push(Field { number, value });
    }
    Ok(out)
}

fn varint(data: &mut &[u8]) -> Result<u64, String> {
    let mut v = 0u64;
    for i in 0..10 {
        let (&b, rest) = data.split_first().ok_or("truncated varint")?;
        *data = rest;
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("varint longer than 10 bytes".into())
}

/// Test helpers: a `journal.Entries` message built by hand.
#[cfg(test)]
pub(crate) mod testing {
    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    fn bytes_field(n: u64, b: &[u8], out: &mut Vec<u8>) {
        varint(n << 3 | 2, out);
        varint(b.len() as u64, out);
        out.extend_from_slice(b);
    }

    /// Entries with `(kind, slot, status)`: kind 1 X.509 CA, 2 JWT, 3 WIT.
    pub(crate) fn entries(list: &[(u64, &str, u64)]) -> Vec<u8> {
        let mut out = Vec::new();
        for &(kind, slot, status) in list {
            let (status_field, authority_field) = if kind == 1 { (5, 6) } else { (6, 7) };
            let mut e = Vec::new();
            bytes_field(1, slot.as_bytes(), &mut e);
            varint(2 << 3, &mut e);
            varint(1_700_000_000, &mut e);
            bytes_field(3, &[0x30, 0x82, 1, 2, 3], &mut e);
            varint(status_field << 3, &mut e);
            varint(status, &mut e);
            bytes_field(authority_field, format!("auth-{slot}").as_bytes(), &mut e);
            // A field from a later SPIRE: skipped.
            varint(15 << 3 | 5, &mut e);
            e.extend_from_slice(&[1, 2, 3, 4]);
            bytes_field(kind, &e, &mut out);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_json_ids_only_and_unknown_fields_ignored() {
        let ids = key_ids_from_keys_json(
            br#"{"keys": {"x509-CA-A": "MIGHAgEAMBMG", "JWT-Signer-A": "MIGH"}, "later": 1}"#,
        )
        .unwrap();
        assert_eq!(
            ids.into_iter().collect::<Vec<_>>(),
            vec!["JWT-Signer-A".to_string(), "x509-CA-A".to_string()]
        );
        assert!(key_ids_from_keys_json(b"{}").unwrap().is_empty());
        let err = key_ids_from_keys_json(b"{\"keys\": \"MIGHAgEAMBMG-secret\"").unwrap_err();
        assert!(!err.contains("MIGH"), "{err}");
        assert!(key_ids_from_keys_json(b"not json").is_err());
    }

    #[test]
    fn journal_entries_decode_to_key_ids() {
        let data = testing::entries(&[(1, "A", 3), (1, "B", 2), (2, "A", 3), (3, "B", 4)]);
        let keys = journal_keys(&data).unwrap();
        let ids: Vec<(&str, EntryStatus)> =
            keys.iter().map(|k| (k.key_id.as_str(), k.status)).collect();
        assert_eq!(
            ids,
            vec![
                ("x509-CA-A", EntryStatus::Active),
                ("x509-CA-B", EntryStatus::Prepared),
                ("JWT-Signer-A", EntryStatus::Active),
                ("WIT-Signer-B", EntryStatus::Old),
            ]
        );
        assert_eq!(keys[0].authority_id, "auth-A");
        assert!(journal_keys(&[]).unwrap().is_empty());
        // Damaged input is an error, never a panic.
        assert!(journal_keys(&data[..data.len() - 3]).is_err());
        assert!(journal_keys(&[0xff; 11]).is_err());
        assert!(journal_keys(&[0x0b]).is_err()); // group start
    }

    fn journal(id: i64, list: &[(u64, &str, u64)]) -> Journal {
        Journal {
            id,
            keys: journal_keys(&testing::entries(list)).unwrap(),
        }
    }

    fn held(ids: &[&str]) -> KeyStore {
        KeyStore::Keys(ids.iter().map(|s| (*s).to_string()).collect())
    }

    #[test]
    fn compare_warns_both_ways() {
        let j = [journal(1, &[(1, "A", 3), (2, "A", 3), (1, "B", 4)])];
        assert!(compare(&j, &held(&["x509-CA-A", "JWT-Signer-A"]), "keys.json").is_empty());
        // The old slot B entry's key may be gone: no warning for it.
        let w = compare(&j, &held(&["x509-CA-A"]), "keys.json");
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("JWT-Signer-A (active, authority auth-A)"),
            "{w:?}"
        );
        let w = compare(&j, &KeyStore::Missing, "keys.json");
        assert!(
            w[0].contains("x509-CA-A") && w[0].contains("JWT-Signer-A"),
            "{w:?}"
        );
        let w = compare(
            &j,
            &held(&["x509-CA-A", "JWT-Signer-A", "x509-CA-C", "other"]),
            "keys.json",
        );
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("no CA journal in the datastore names: x509-CA-C"),
            "{w:?}"
        );
        assert!(w[0].contains("names: x509-CA-C (keys from"), "{w:?}");
        // No journal at all: every CA key is unnamed.
        assert_eq!(compare(&[], &held(&["x509-CA-A"]), "k").len(), 1);
        assert!(compare(&[], &KeyStore::Missing, "k").is_empty());
    }

    #[test]
    fn several_journals_need_one_backed_by_the_keys() {
        let j = [journal(1, &[(1, "A", 3)]), journal(2, &[(1, "B", 3)])];
        assert!(compare(&j, &held(&["x509-CA-B"]), "k").is_empty());
        assert_eq!(compare(&j, &held(&[]), "k").len(), 2);
    }

    proptest::proptest! {
        #[test]
        fn decoding_never_panics(junk in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let _ = journal_keys(&junk);
            let _ = key_ids_from_keys_json(&junk);
        }
    }
}
