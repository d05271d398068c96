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
//! those deleted since come back.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

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
    /// In the snapshot but gone from the live datastore: they come back.
    pub come_back: u64,
}

/// Keys present on one side only.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct KeyDiff {
    /// Live but not in the snapshot: gone after the restore.
    pub created_since: u64,
    /// In the snapshot but not live: back after the restore.
    pub deleted_since: u64,
    pub created_examples: Vec<String>,
    pub deleted_examples: Vec<String>,
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
                if token_examples.len() < SAMPLE {
                    token_examples.push(a.spiffe_id.clone());
                }
            } else if other_examples.len() < SAMPLE {
                other_examples.push(a.spiffe_id.clone());
            }
        }
    }
    out.come_back = (snap.len() - seen.len()) as u64;
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
        assert_eq!(i.come_back, 1);
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
