//! What a restore changes for a live SPIRE deployment, shown before it acts.
//!
//! SPIRE agents authenticate with an SVID whose serial the server keeps in
//! `attested_node_entries` (spire-reference §8). After a restore:
//! - an agent that attested after the snapshot is unknown ("not attested") and
//!   must attest again;
//! - an agent whose SVID rotated after the snapshot presents a serial that
//!   matches neither `serial_number` nor `new_serial_number` and is rejected
//!   until it re-attests;
//! - `join_token` agents cannot re-attest on their own: they need a new token.
//!
//! Registration entries and bundles created since the snapshot disappear, and
//! those deleted since come back; entries changed since (selectors, parent
//! ID, TTLs, DNS names, admin/downstream, federates-with) go back to their
//! snapshot version. The report also compares join tokens (counts only: they
//! are secrets), federation relationships and CA journal entries.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};

use serde::Serialize;

use crate::datastore::{Table, Value};

/// How many example keys each list carries, so a report stays readable.
pub const SAMPLE: usize = 10;

/// An attested agent as the restore sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentFacts {
    pub spiffe_id: String,
    /// The node attestor (`data_type`): `join_token`, `k8s_psat`, `aws_iid`, ...
    pub attestor: String,
    pub serial_number: String,
    pub new_serial_number: String,
}

/// The agents that will have to attest again.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AgentImpact {
    /// Attested after the snapshot: unknown once it is restored.
    pub attested_since: u64,
    /// SVID rotated after the snapshot: rejected until they re-attest.
    pub rotated_since: u64,
    /// Of the above, `join_token` agents, which cannot re-attest without a new token.
    pub join_token_agents: u64,
    /// Up to [`SAMPLE`] SPIFFE IDs of affected agents, join-token agents first.
    pub examples: Vec<String>,
    /// Every affected join-token agent's SPIFFE ID, sorted: each needs a new
    /// token (`spire-server token generate`) to attest again.
    pub join_token_agent_ids: Vec<String>,
    /// In the snapshot but gone from the live datastore: they come back.
    pub come_back: u64,
}

/// Keys present on one side only, and keys on both sides whose content differs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct KeyDiff {
    /// Live but not in the snapshot: gone after the restore.
    pub created_since: u64,
    /// In the snapshot but not live: back after the restore.
    pub deleted_since: u64,
    pub created_examples: Vec<String>,
    pub deleted_examples: Vec<String>,
    /// On both sides with other content: back to the snapshot's version.
    pub changed_since: u64,
    pub changed_examples: Vec<String>,
}

/// Registration entries changed since the snapshot, by what changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EntryChanges {
    /// Per aspect (`selectors`, `parent_id`, `ttls`, `dns_names`,
    /// `admin_downstream`, `federates_with`, `spiffe_id_hint`): how many
    /// entries differ in it, and a few of their entry ids.
    pub by_aspect: BTreeMap<&'static str, AspectChanges>,
}

/// Entries that differ in one aspect.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AspectChanges {
    pub count: u64,
    pub examples: Vec<String>,
}

/// Join tokens on each side (never their values: they are secrets).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TokenImpact {
    pub in_snapshot: u64,
    pub live: u64,
    /// In the snapshot, gone live: used (or deleted) since.
    pub used_since: u64,
    /// Live, not in the snapshot: issued since; gone after the restore, so
    /// agents not yet attested with them need new ones.
    pub issued_since: u64,
}

/// What a registration entry is made of, in the aspects the report names.
const ASPECTS: [&str; 7] = [
    "parent_id",
    "ttls",
    "admin_downstream",
    "spiffe_id_hint",
    "selectors",
    "dns_names",
    "federates_with",
];
const SELECTORS: usize = 4;
const DNS_NAMES: usize = 5;
const FEDERATES_WITH: usize = 6;

/// A value as text that reads the same from every engine (booleans as 0/1).
fn canonical(v: &Value) -> String {
    match v {
        Value::Null => "\0null".into(),
        Value::Bool(b) => i64::from(*b).to_string(),
        Value::Int(i) => i.to_string(),
        Value::Float(f) => f.to_string(),
        Value::Text(t) => t.clone(),
        Value::Bytes(b) => b.iter().map(|x| format!("{x:02x}")).collect(),
        Value::Timestamp(t) => t.unix_timestamp().to_string(),
    }
}

fn digest<'a>(parts: impl IntoIterator<Item = &'a str>) -> u64 {
    let mut h = DefaultHasher::new();
    for p in parts {
        p.hash(&mut h);
    }
    h.finish()
}

/// What one side (the snapshot, or the live datastore) holds, as digests:
/// collected batch by batch, in any table order.
#[derive(Debug, Default)]
pub struct SideDigests {
    /// The agents, as the impact on them is worked out.
    pub agents: Vec<AgentFacts>,
    /// Entry row id → (entry id, digests of the aspects read from the row).
    entries: HashMap<i64, (String, [u64; 4])>,
    /// Entry row id → XOR of its selectors', DNS names' and federated bundle ids' digests.
    children: HashMap<i64, [u64; 3]>,
    federates: HashMap<i64, Vec<i64>>,
    bundle_ids: HashMap<i64, String>,
    /// Trust domain → digest of the bundle's data.
    pub bundles: HashMap<String, u64>,
    /// Trust domain → digest of the relationship.
    pub federation: HashMap<String, u64>,
    /// CA journal row (by its active X.509 authority, else its id) → digest.
    pub ca_journals: HashMap<String, u64>,
    tokens: HashSet<u64>,
}

impl SideDigests {
    /// The tables a side is read from.
    pub const TABLES: [&'static str; 9] = [
        "attested_node_entries",
        "registered_entries",
        "selectors",
        "dns_names",
        "federated_registration_entries",
        "bundles",
        "federated_trust_domains",
        "ca_journals",
        "join_tokens",
    ];

    /// Takes in one batch of `table`'s rows.
    pub fn collect(&mut self, table: &Table, batch: &[Vec<Value>]) {
        let at = |name: &str| table.columns.iter().position(|c| c.name == name);
        let get = |row: &[Value], p: Option<usize>| -> String {
            p.and_then(|p| row.get(p))
                .map(canonical)
                .unwrap_or_default()
        };
        let id = |row: &[Value], p: Option<usize>| -> Option<i64> {
            match p.and_then(|p| row.get(p)) {
                Some(Value::Int(i)) => Some(*i),
                _ => None,
            }
        };
        match table.name.as_str() {
            "attested_node_entries" => {
                let text = |row: &[Value], p: Option<usize>| -> String {
                    match p.and_then(|p| row.get(p)) {
                        Some(Value::Null) | None => String::new(),
                        Some(v) => canonical(v),
                    }
                };
                let (spiffe_id, attestor, serial, new_serial) = (
                    at("spiffe_id"),
                    at("data_type"),
                    at("serial_number"),
                    at("new_serial_number"),
                );
                for row in batch {
                    self.agents.push(AgentFacts {
                        spiffe_id: text(row, spiffe_id),
                        attestor: text(row, attestor),
                        serial_number: text(row, serial),
                        new_serial_number: text(row, new_serial),
                    });
                }
            }
            "registered_entries" => {
                let cols = |names: &[&str]| names.iter().map(|n| at(n)).collect::<Vec<_>>();
                let (row_id, entry_id) = (at("id"), at("entry_id"));
                let aspects = [
                    cols(&["parent_id"]),
                    cols(&["ttl", "jwt_svid_ttl", "expiry"]),
                    cols(&["admin", "downstream", "store_svid"]),
                    cols(&["spiffe_id", "hint", "additional_attributes"]),
                ];
                for row in batch {
                    let Some(n) = id(row, row_id) else { continue };
                    let mut d = [0u64; 4];
                    for (slot, columns) in d.iter_mut().zip(&aspects) {
                        let texts: Vec<String> = columns.iter().map(|p| get(row, *p)).collect();
                        *slot = digest(texts.iter().map(String::as_str));
                    }
                    self.entries.insert(n, (get(row, entry_id), d));
                }
            }
            "selectors" | "dns_names" => {
                let slot = usize::from(table.name == "dns_names");
                let (entry, ty, value) = (at("registered_entry_id"), at("type"), at("value"));
                for row in batch {
                    let Some(n) = id(row, entry) else { continue };
                    let d = digest([get(row, ty).as_str(), get(row, value).as_str()]);
                    self.children.entry(n).or_default()[slot] ^= d;
                }
            }
            "federated_registration_entries" => {
                let (bundle, entry) = (at("bundle_id"), at("registered_entry_id"));
                for row in batch {
                    if let (Some(b), Some(e)) = (id(row, bundle), id(row, entry)) {
                        self.federates.entry(e).or_default().push(b);
                    }
                }
            }
            "bundles" => {
                let (row_id, td, data) = (at("id"), at("trust_domain"), at("data"));
                for row in batch {
                    if let Some(n) = id(row, row_id) {
                        self.bundle_ids.insert(n, get(row, td));
                    }
                    self.bundles
                        .insert(get(row, td), digest([get(row, data).as_str()]));
                }
            }
            "federated_trust_domains" => {
                let td = at("trust_domain");
                let rest: Vec<Option<usize>> = [
                    "bundle_endpoint_url",
                    "bundle_endpoint_profile",
                    "endpoint_spiffe_id",
                    "implicit",
                ]
                .iter()
                .map(|n| at(n))
                .collect();
                for row in batch {
                    let texts: Vec<String> = rest.iter().map(|p| get(row, *p)).collect();
                    self.federation
                        .insert(get(row, td), digest(texts.iter().map(String::as_str)));
                }
            }
            "ca_journals" => {
                let (row_id, x509, jwt, data) = (
                    at("id"),
                    at("active_x509_authority_id"),
                    at("active_jwt_authority_id"),
                    at("data"),
                );
                for row in batch {
                    let authority = get(row, x509);
                    let key = if authority.is_empty() {
                        format!("journal row {}", get(row, row_id))
                    } else {
                        authority
                    };
                    let d = digest([get(row, jwt).as_str(), get(row, data).as_str()]);
                    self.ca_journals.insert(key, d);
                }
            }
            "join_tokens" => {
                let token = at("token");
                // Digests only: a token is a secret and is never kept or shown.
                self.tokens
                    .extend(batch.iter().map(|row| digest([get(row, token).as_str()])));
            }
            _ => {}
        }
    }

    /// Entry id → the digest of each aspect (child rows included).
    fn entry_aspects(&self) -> HashMap<String, [u64; 7]> {
        self.entries
            .iter()
            .map(|(n, (entry_id, row))| {
                let children = self.children.get(n).copied().unwrap_or_default();
                let mut federates: Vec<&str> = self
                    .federates
                    .get(n)
                    .map(|ids| {
                        ids.iter()
                            .map(|b| self.bundle_ids.get(b).map_or("?", String::as_str))
                            .collect()
                    })
                    .unwrap_or_default();
                federates.sort_unstable();
                let mut all = [0u64; 7];
                all[..4].copy_from_slice(row);
                all[SELECTORS] = children[0];
                all[DNS_NAMES] = children[1];
                all[FEDERATES_WITH] = digest(federates);
                (entry_id.clone(), all)
            })
            .collect()
    }

    /// Entry id → one digest of the whole entry.
    #[must_use]
    pub fn entry_digests(&self) -> HashMap<String, u64> {
        self.entry_aspects()
            .into_iter()
            .map(|(k, a)| {
                (
                    k,
                    digest(
                        a.iter()
                            .map(|x| x.to_string())
                            .collect::<Vec<_>>()
                            .iter()
                            .map(String::as_str),
                    ),
                )
            })
            .collect()
    }
}

/// Which aspects of the entries on both sides differ.
#[must_use]
pub fn entry_changes(snapshot: &SideDigests, live: &SideDigests) -> EntryChanges {
    let snap = snapshot.entry_aspects();
    let mut out = EntryChanges::default();
    let mut live_entries: Vec<(String, [u64; 7])> = live.entry_aspects().into_iter().collect();
    live_entries.sort();
    for (entry_id, live_aspects) in live_entries {
        let Some(snap_aspects) = snap.get(&entry_id) else {
            continue;
        };
        for (i, name) in ASPECTS.iter().enumerate() {
            if snap_aspects[i] != live_aspects[i] {
                let a = out.by_aspect.entry(name).or_default();
                a.count += 1;
                if a.examples.len() < SAMPLE {
                    a.examples.push(entry_id.clone());
                }
            }
        }
    }
    out
}

/// Compares join tokens (by digest: never their values).
#[must_use]
pub fn token_impact(snapshot: &SideDigests, live: &SideDigests) -> TokenImpact {
    TokenImpact {
        in_snapshot: snapshot.tokens.len() as u64,
        live: live.tokens.len() as u64,
        used_since: snapshot.tokens.difference(&live.tokens).count() as u64,
        issued_since: live.tokens.difference(&snapshot.tokens).count() as u64,
    }
}

/// Compares two keyed sets of digests: created, deleted and changed keys.
#[must_use]
pub fn keyed_diff(snapshot: &HashMap<String, u64>, live: &HashMap<String, u64>) -> KeyDiff {
    let mut out = key_diff(snapshot.keys().cloned(), live.keys().cloned());
    let mut changed: Vec<&String> = live
        .iter()
        .filter(|(k, d)| snapshot.get(*k).is_some_and(|s| s != *d))
        .map(|(k, _)| k)
        .collect();
    changed.sort();
    out.changed_since = changed.len() as u64;
    out.changed_examples = changed.into_iter().take(SAMPLE).cloned().collect();
    out
}

/// Compares the snapshot's agents with the live datastore's.
pub fn agent_impact(
    snapshot: impl IntoIterator<Item = AgentFacts>,
    live: impl IntoIterator<Item = AgentFacts>,
) -> AgentImpact {
    let snap: HashMap<String, (String, String)> = snapshot
        .into_iter()
        .map(|a| (a.spiffe_id, (a.serial_number, a.new_serial_number)))
        .collect();
    let mut out = AgentImpact::default();
    let mut seen: HashSet<&str> = HashSet::new();
    let (mut token_examples, mut other_examples) = (Vec::new(), Vec::new());
    for a in live {
        let affected = match snap.get_key_value(a.spiffe_id.as_str()) {
            None => {
                out.attested_since += 1;
                true
            }
            Some((key, (serial, new_serial))) => {
                seen.insert(key.as_str());
                // Banned agents (empty serial) stay banned either way.
                let current_known = a.serial_number.is_empty()
                    || &a.serial_number == serial
                    || &a.serial_number == new_serial;
                if current_known {
                    false
                } else {
                    out.rotated_since += 1;
                    true
                }
            }
        };
        if affected {
            if a.attestor == "join_token" {
                out.join_token_agents += 1;
                out.join_token_agent_ids.push(a.spiffe_id.clone());
                if token_examples.len() < SAMPLE {
                    token_examples.push(a.spiffe_id.clone());
                }
            } else if other_examples.len() < SAMPLE {
                other_examples.push(a.spiffe_id.clone());
            }
        }
    }
    out.come_back = (snap.len() - seen.len()) as u64;
    out.join_token_agent_ids.sort();
    token_examples.extend(other_examples);
    token_examples.truncate(SAMPLE);
    out.examples = token_examples;
    out
}

/// Compares two sets of keys (entry IDs, trust domains).
pub fn key_diff(
    snapshot: impl IntoIterator<Item = String>,
    live: impl IntoIterator<Item = String>,
) -> KeyDiff {
    let mut snap: HashSet<String> = snapshot.into_iter().collect();
    let mut out = KeyDiff::default();
    let mut live: Vec<String> = live.into_iter().collect();
    live.sort();
    for k in live {
        if !snap.remove(&k) {
            out.created_since += 1;
            if out.created_examples.len() < SAMPLE {
                out.created_examples.push(k);
            }
        }
    }
    out.deleted_since = snap.len() as u64;
    let mut rest: Vec<String> = snap.into_iter().collect();
    rest.sort();
    rest.truncate(SAMPLE);
    out.deleted_examples = rest;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(id: &str, attestor: &str, serial: &str, new_serial: &str) -> AgentFacts {
        AgentFacts {
            spiffe_id: id.into(),
            attestor: attestor.into(),
            serial_number: serial.into(),
            new_serial_number: new_serial.into(),
        }
    }

    #[test]
    fn agents_new_or_rotated_since_must_reattest() {
        let snapshot = vec![
            agent("a", "k8s_psat", "1", ""),
            agent("b", "join_token", "2", "3"),
            agent("c", "aws_iid", "4", ""),
            agent("gone", "aws_iid", "9", ""),
        ];
        let live = vec![
            agent("a", "k8s_psat", "1", ""),   // unchanged
            agent("b", "join_token", "3", ""), // rotated to the prepared serial: still known
            agent("c", "aws_iid", "5", ""),    // rotated since: rejected
            agent("d", "join_token", "7", ""), // attested since, join token
        ];
        let i = agent_impact(snapshot, live);
        assert_eq!(i.attested_since, 1);
        assert_eq!(i.rotated_since, 1);
        assert_eq!(i.join_token_agents, 1);
        assert_eq!(i.examples, vec!["d".to_string(), "c".to_string()]);
        assert_eq!(i.join_token_agent_ids, vec!["d".to_string()]);
        assert_eq!(i.come_back, 1);
    }

    fn entries_table(columns: &[&str]) -> Table {
        let typed: Vec<(&str, crate::datastore::ColumnKind)> = columns
            .iter()
            .map(|c| (*c, crate::datastore::ColumnKind::Text))
            .collect();
        Table::of_columns("", &typed)
    }

    /// One side: entries e1 (id 1) and e2 (id 2), a selector each, e2
    /// federating with bundle 7, and a join token.
    fn side(
        e1_ttl: i64,
        e2_selector: &str,
        bundle_7: &str,
        token: &str,
        admin: Value,
    ) -> SideDigests {
        let mut d = SideDigests::default();
        let mut entries = entries_table(&["id", "entry_id", "parent_id", "ttl", "admin"]);
        entries.name = "registered_entries".into();
        let t = |s: &str| Value::Text(s.into());
        d.collect(
            &entries,
            &[
                vec![Value::Int(1), t("e1"), t("p"), Value::Int(e1_ttl), admin],
                vec![
                    Value::Int(2),
                    t("e2"),
                    t("p"),
                    Value::Int(60),
                    Value::Int(0),
                ],
            ],
        );
        let mut selectors = entries_table(&["registered_entry_id", "type", "value"]);
        selectors.name = "selectors".into();
        d.collect(
            &selectors,
            &[
                vec![Value::Int(1), t("unix"), t("uid:0")],
                vec![Value::Int(2), t("unix"), t(e2_selector)],
            ],
        );
        let mut bundles = entries_table(&["id", "trust_domain", "data"]);
        bundles.name = "bundles".into();
        d.collect(
            &bundles,
            &[vec![Value::Int(7), t(bundle_7), Value::Bytes(vec![1])]],
        );
        let mut federated = entries_table(&["bundle_id", "registered_entry_id"]);
        federated.name = "federated_registration_entries".into();
        d.collect(&federated, &[vec![Value::Int(7), Value::Int(2)]]);
        let mut tokens = entries_table(&["token"]);
        tokens.name = "join_tokens".into();
        d.collect(&tokens, &[vec![t(token)]]);
        d
    }

    #[test]
    fn entry_changes_name_the_aspect_that_changed() {
        let snapshot = side(60, "uid:1", "spiffe://a.org", "tok-1", Value::Bool(false));
        // Same content (booleans read as 0/1 from another engine): nothing changed.
        let same = side(60, "uid:1", "spiffe://a.org", "tok-1", Value::Int(0));
        assert!(entry_changes(&snapshot, &same).by_aspect.is_empty());
        assert_eq!(
            keyed_diff(&snapshot.entry_digests(), &same.entry_digests()).changed_since,
            0
        );
        // TTL of e1, a selector of e2, the trust domain e2 federates with.
        let live = side(120, "uid:2", "spiffe://b.org", "tok-2", Value::Bool(false));
        let c = entry_changes(&snapshot, &live);
        let names: Vec<&str> = c.by_aspect.keys().copied().collect();
        assert_eq!(names, vec!["federates_with", "selectors", "ttls"]);
        assert_eq!(c.by_aspect["ttls"].examples, vec!["e1".to_string()]);
        assert_eq!(c.by_aspect["selectors"].examples, vec!["e2".to_string()]);
        let d = keyed_diff(&snapshot.entry_digests(), &live.entry_digests());
        assert_eq!(
            (d.changed_since, d.created_since, d.deleted_since),
            (2, 0, 0)
        );
        let t = token_impact(&snapshot, &live);
        assert_eq!(
            (t.in_snapshot, t.live, t.used_since, t.issued_since),
            (1, 1, 1, 1)
        );
    }

    #[test]
    fn key_diff_counts_both_sides() {
        let d = key_diff(
            ["e1", "e2", "e3"].map(String::from),
            ["e2", "e3", "e4", "e5"].map(String::from),
        );
        assert_eq!((d.created_since, d.deleted_since), (2, 1));
        assert_eq!(d.created_examples, vec!["e4".to_string(), "e5".to_string()]);
        assert_eq!(d.deleted_examples, vec!["e1".to_string()]);
    }
}
