//! What a restore must not bring back from an older snapshot, and what it
//! carries over from the live datastore it replaces (spire-reference §11).
//!
//! A snapshot is older than the deployment it is restored into. Restored
//! as it is, it would bring back join tokens used since (replayable to
//! attest as an existing agent), an own trust bundle without the CA roots,
//! JWT keys, revocations and taints added since, and entries whose revision
//! numbers agents already hold; and it would forget agents that attested or
//! renewed their SVID since. The rules here change rows as they stream into
//! the staging tables, so the target still goes from "as it was" to "as
//! asked" in one swap:
//!
//! - **join tokens** (on unless told): with a live datastore, only the
//!   snapshot's tokens that still exist live come back; without one, the
//!   unexpired ones are dropped;
//! - **own trust bundle** (on unless told): the live `data` of the own trust
//!   domain's bundle replaces the snapshot's;
//! - **revision numbers** (on unless told): a restored entry whose live
//!   version has another revision gets one above both;
//! - **live agents** (asked for): `attested_node_entries` and
//!   `node_resolver_map_entries` come from the live datastore, with the alias
//!   entries SPIRE made for live `join_token` agents that the snapshot lacks.
//!
//! The rules know SPIRE's tables, never an engine.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use crate::datastore::{Catalogue, Datastore, SnapshotRead, Table, Value};
use crate::error::{Error, Result};

/// Which rules run. Every field is off by default, which means every
/// safety rule is on and live agents are not carried.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleOptions {
    /// Carry the live agents (and what belongs with them) into the restored data.
    pub keep_live_agents: bool,
    /// Restore the snapshot's join tokens as they are.
    pub keep_snapshot_join_tokens: bool,
    /// Restore the snapshot's own trust bundle as it is.
    pub keep_snapshot_bundle: bool,
    /// Restore entries' revision numbers as they are.
    pub keep_snapshot_revisions: bool,
}

const AGENTS: &str = "attested_node_entries";
const NODE_SELECTORS: &str = "node_resolver_map_entries";
const ENTRIES: &str = "registered_entries";
const TOKENS: &str = "join_tokens";
const BUNDLES: &str = "bundles";
/// Tables whose rows are keyed by `registered_entries.id`.
const ENTRY_CHILDREN: [&str; 3] = ["selectors", "dns_names", "federated_registration_entries"];
/// At most this many examples are listed per rule.
const EXAMPLES: usize = 5;

/// A live table's rows, with its column names.
#[derive(Debug, Clone, Default)]
struct LiveRows {
    columns: Vec<String>,
    rows: Vec<Vec<Value>>,
}

impl LiveRows {
    fn at(&self, column: &str) -> Option<usize> {
        self.columns.iter().position(|c| c == column)
    }

    /// The rows in `table`'s column order (a column the live table lacks is NULL).
    fn shaped_for(&self, table: &Table) -> Vec<Vec<Value>> {
        let map: Vec<Option<usize>> = table.columns.iter().map(|c| self.at(&c.name)).collect();
        self.rows
            .iter()
            .map(|row| {
                map.iter()
                    .map(|p| p.and_then(|p| row.get(p).cloned()).unwrap_or(Value::Null))
                    .collect()
            })
            .collect()
    }
}

/// What the rules need from the live datastore, read in one consistent read.
#[derive(Debug, Default)]
pub struct LiveFacts {
    /// The target holds SPIRE's tables (a live datastore to compare with).
    present: bool,
    /// The own trust domain, as `spiffe://<name>`, when the data names it.
    trust_domain: Option<String>,
    tokens: HashSet<String>,
    own_bundle: Option<(Value, Value)>,
    /// entry id → revision number.
    revisions: HashMap<String, i64>,
    agents: LiveRows,
    node_selectors: LiveRows,
    /// Alias entries of live join-token agents, with their child rows.
    aliases: LiveRows,
    alias_children: BTreeMap<String, LiveRows>,
    max_entry_id: i64,
    /// The largest `id` of each table keyed by entry id (those that have one).
    max_child_ids: HashMap<String, i64>,
}

fn text(v: &Value) -> Option<&str> {
    match v {
        Value::Text(s) => Some(s),
        _ => None,
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        _ => None,
    }
}

/// `spiffe://name` of a SPIFFE ID.
fn trust_domain_of(id: &str) -> Option<String> {
    let rest = id.strip_prefix("spiffe://")?;
    let name = rest.split('/').next().filter(|n| !n.is_empty())?;
    Some(format!("spiffe://{name}"))
}

impl LiveFacts {
    /// Reads the facts from `target` (nothing when it holds no SPIRE tables).
    ///
    /// # Errors
    /// A failed read of the target.
    pub async fn read(target: &dyn Datastore, options: &RuleOptions) -> Result<Self> {
        let mut read = target.begin_snapshot().await?;
        let result = async {
            let catalogue = read.catalogue().await?;
            Self::read_in(read.as_mut(), &catalogue, options).await
        }
        .await;
        let finished = read.finish().await;
        let facts = result?;
        finished?;
        Ok(facts)
    }

    async fn read_in(
        read: &mut dyn SnapshotRead,
        catalogue: &Catalogue,
        options: &RuleOptions,
    ) -> Result<Self> {
        let mut facts = Self::default();
        if catalogue.table(TOKENS).is_none() || catalogue.table(ENTRIES).is_none() {
            return Ok(facts);
        }
        facts.present = true;
        let all = |catalogue: &Catalogue, name: &str| catalogue.table(name).cloned();
        let mut tables: HashMap<&str, LiveRows> = HashMap::new();
        for name in [AGENTS, NODE_SELECTORS, ENTRIES, TOKENS, BUNDLES]
            .into_iter()
            .chain(ENTRY_CHILDREN)
        {
            let Some(table) = all(catalogue, name) else {
                continue;
            };
            let mut rows = LiveRows {
                columns: table.columns.iter().map(|c| c.name.clone()).collect(),
                rows: Vec::new(),
            };
            super::restore::for_each_batch(read, &table, |batch| rows.rows.extend(batch)).await?;
            tables.insert(name, rows);
        }
        // The own trust domain: the agents' (spiffe://<td>/spire/agent/…),
        // or the one entries parented by its servers name.
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        let agents = tables.remove(AGENTS).unwrap_or_default();
        if let Some(at) = agents.at("spiffe_id") {
            for row in &agents.rows {
                if let Some(td) = row.get(at).and_then(text).and_then(trust_domain_of) {
                    *seen.entry(td).or_default() += 1;
                }
            }
        }
        let entries = tables.remove(ENTRIES).unwrap_or_default();
        let (id_at, entry_id_at, parent_at, revision_at) = (
            entries.at("id"),
            entries.at("entry_id"),
            entries.at("parent_id"),
            entries.at("revision_number"),
        );
        if seen.is_empty()
            && let Some(p) = parent_at
        {
            for row in &entries.rows {
                if let Some(parent) = row.get(p).and_then(text)
                    && parent.ends_with("/spire/server")
                    && let Some(td) = trust_domain_of(parent)
                {
                    *seen.entry(td).or_default() += 1;
                }
            }
        }
        facts.trust_domain = seen.into_iter().max_by_key(|(_, n)| *n).map(|(td, _)| td);
        for row in &entries.rows {
            if let (Some(id), Some(rev)) = (
                entry_id_at.and_then(|p| row.get(p)).and_then(text),
                revision_at.and_then(|p| row.get(p)).and_then(int),
            ) {
                facts.revisions.insert(id.to_string(), rev);
            }
            if let Some(id) = id_at.and_then(|p| row.get(p)).and_then(int) {
                facts.max_entry_id = facts.max_entry_id.max(id);
            }
        }
        let tokens = tables.remove(TOKENS).unwrap_or_default();
        if let Some(at) = tokens.at("token") {
            facts.tokens = tokens
                .rows
                .iter()
                .filter_map(|r| r.get(at).and_then(text).map(str::to_string))
                .collect();
        }
        let bundles = tables.remove(BUNDLES).unwrap_or_default();
        if let (Some(td), Some(td_at), Some(data_at), Some(updated_at)) = (
            facts.trust_domain.as_deref(),
            bundles.at("trust_domain"),
            bundles.at("data"),
            bundles.at("updated_at"),
        ) {
            facts.own_bundle = bundles
                .rows
                .iter()
                .find(|r| r.get(td_at).and_then(text) == Some(td))
                .map(|r| (r[data_at].clone(), r[updated_at].clone()));
        }
        if options.keep_live_agents {
            // Alias entries SPIRE made for join-token agents (parented by the agent).
            let join_agents: HashSet<&str> = match (agents.at("spiffe_id"), agents.at("data_type"))
            {
                (Some(id), Some(kind)) => agents
                    .rows
                    .iter()
                    .filter(|r| r.get(kind).and_then(text) == Some("join_token"))
                    .filter_map(|r| r.get(id).and_then(text))
                    .collect(),
                _ => HashSet::new(),
            };
            let mut alias_ids: HashSet<i64> = HashSet::new();
            let mut aliases = LiveRows {
                columns: entries.columns.clone(),
                rows: Vec::new(),
            };
            if let Some(p) = parent_at {
                for row in &entries.rows {
                    if row
                        .get(p)
                        .and_then(text)
                        .is_some_and(|parent| join_agents.contains(parent))
                    {
                        if let Some(id) = id_at.and_then(|i| row.get(i)).and_then(int) {
                            alias_ids.insert(id);
                        }
                        aliases.rows.push(row.clone());
                    }
                }
            }
            for child in ENTRY_CHILDREN {
                let Some(rows) = tables.remove(child) else {
                    continue;
                };
                let Some(at) = rows.at("registered_entry_id") else {
                    continue;
                };
                if let Some(id_at) = rows.at("id") {
                    let max = rows
                        .rows
                        .iter()
                        .filter_map(|r| r.get(id_at).and_then(int))
                        .max();
                    facts
                        .max_child_ids
                        .insert(child.to_string(), max.unwrap_or(0));
                }
                let kept = LiveRows {
                    rows: rows
                        .rows
                        .iter()
                        .filter(|r| {
                            r.get(at)
                                .and_then(int)
                                .is_some_and(|id| alias_ids.contains(&id))
                        })
                        .cloned()
                        .collect(),
                    columns: rows.columns,
                };
                facts.alias_children.insert(child.to_string(), kept);
            }
            facts.aliases = aliases;
            facts.agents = agents;
            facts.node_selectors = tables.remove(NODE_SELECTORS).unwrap_or_default();
        }
        Ok(facts)
    }
}

/// What the rules did (or, in a plan, would do), for the report and `--json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RulesReport {
    /// A live datastore was there to compare with.
    pub live_datastore: bool,
    /// The own trust domain the bundle rule used, when known.
    pub trust_domain: Option<String>,
    pub join_tokens: TokenRule,
    pub own_bundle: BundleRule,
    pub revisions: RevisionRule,
    /// Present when live agents were carried.
    pub agents: Option<AgentRule>,
    /// What the operator must do next.
    pub notes: Vec<String>,
}

/// The join-token rule.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TokenRule {
    /// `live` (only tokens still live kept), `unexpired-dropped` (no live
    /// datastore), or `snapshot` (kept as they are, as told).
    pub mode: &'static str,
    pub kept: u64,
    /// Used (or deleted) since the snapshot: gone from the live datastore.
    pub dropped_gone_live: u64,
    /// Unexpired, with no live datastore to tell whether they were used.
    pub dropped_unexpired: u64,
}

/// The own-bundle rule.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BundleRule {
    /// `live`, `snapshot` (as told, or no live bundle to keep), or `none`
    /// (the own trust domain is not known).
    pub kept: &'static str,
    /// The snapshot's own bundle differed from the live one.
    pub differed: bool,
}

/// The revision-number rule.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RevisionRule {
    /// Entries whose revision number was moved above the live one.
    pub moved: u64,
    /// A few of their entry ids.
    pub examples: Vec<String>,
}

/// Where the restored agent rows came from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AgentRule {
    /// Agent rows taken from the live datastore (all of them).
    pub from_live: u64,
    /// The snapshot's agent rows left out in their favour.
    pub snapshot_rows_replaced: u64,
    /// Agents in the snapshot that are not live (evicted since): not restored.
    pub only_in_snapshot: u64,
    /// Agents live but not in the snapshot (attested since): kept.
    pub only_live: u64,
    /// Node selectors taken from the live datastore.
    pub node_selectors_from_live: u64,
    /// Alias entries of live join-token agents that the snapshot lacked, carried with their selectors.
    pub alias_entries_carried: u64,
    /// A few of the agents attested since the snapshot.
    pub examples_only_live: Vec<String>,
}

/// The rules applied to a stream of snapshot rows, table by table.
#[derive(Debug)]
pub struct RowRules {
    facts: LiveFacts,
    options: RuleOptions,
    now: i64,
    report: RulesReport,
    snapshot_agents: HashSet<String>,
    snapshot_entries: HashSet<String>,
    snapshot_max_entry_id: i64,
    /// Old live id → new id of each carried alias entry.
    alias_ids: HashMap<i64, i64>,
    /// The largest snapshot `id` of each table keyed by entry id.
    snapshot_max_child_ids: HashMap<String, i64>,
}

impl RowRules {
    #[must_use]
    pub fn new(facts: LiveFacts, options: &RuleOptions, now: i64) -> Self {
        let mut report = RulesReport {
            live_datastore: facts.present,
            trust_domain: facts.trust_domain.clone(),
            ..RulesReport::default()
        };
        report.join_tokens.mode = if options.keep_snapshot_join_tokens {
            "snapshot"
        } else if facts.present {
            "live"
        } else {
            "unexpired-dropped"
        };
        report.own_bundle.kept = if options.keep_snapshot_bundle || !facts.present {
            "snapshot"
        } else if facts.own_bundle.is_some() {
            "live"
        } else {
            "none"
        };
        if options.keep_live_agents {
            report.agents = Some(AgentRule {
                from_live: facts.agents.rows.len() as u64,
                node_selectors_from_live: facts.node_selectors.rows.len() as u64,
                ..AgentRule::default()
            });
        }
        if facts.present {
            report.notes.push(
                "restart every SPIRE server after the restore: with the events-based cache on, a running \
                 server never sees the restored rows"
                    .into(),
            );
        }
        Self {
            facts,
            options: options.clone(),
            now,
            report,
            snapshot_agents: HashSet::new(),
            snapshot_entries: HashSet::new(),
            snapshot_max_entry_id: 0,
            alias_ids: HashMap::new(),
            snapshot_max_child_ids: HashMap::new(),
        }
    }

    /// Whether the carried live agents need `table` loaded last: alias
    /// entries get ids past the snapshot's, so the entries table must be
    /// read before the tables keyed by entry id.
    #[must_use]
    pub fn load_order(&self, tables: &[Table]) -> Vec<Table> {
        let mut ordered: Vec<Table> = tables.to_vec();
        if self.options.keep_live_agents {
            ordered.sort_by_key(|t| u8::from(ENTRY_CHILDREN.contains(&t.name.as_str())));
        }
        ordered
    }

    /// Whether [`Self::apply`] may change or count rows of `table`.
    #[must_use]
    pub fn looks_at(table: &str) -> bool {
        [TOKENS, BUNDLES, ENTRIES, AGENTS, NODE_SELECTORS].contains(&table)
            || ENTRY_CHILDREN.contains(&table)
    }

    /// Whether [`Self::apply`] may change or drop rows of `table` with these
    /// options and live facts. When it may not, the table loads exactly the
    /// snapshot's rows, whose content hash the object reads already checked.
    /// Mirrors the arms of [`Self::apply`] that edit rows.
    #[must_use]
    pub fn may_change(&self, table: &str) -> bool {
        match table {
            TOKENS => !self.options.keep_snapshot_join_tokens,
            BUNDLES => self.report.own_bundle.kept == "live",
            ENTRIES => !self.options.keep_snapshot_revisions && !self.facts.revisions.is_empty(),
            AGENTS | NODE_SELECTORS => self.options.keep_live_agents,
            _ => false,
        }
    }

    /// Changes a batch of the snapshot's `table` rows in place (rows may be dropped).
    pub fn apply(&mut self, table: &Table, batch: &mut Vec<Vec<Value>>) {
        let at = |name: &str| table.columns.iter().position(|c| c.name == name);
        match table.name.as_str() {
            TOKENS if !self.options.keep_snapshot_join_tokens => {
                let (Some(token_at), Some(expiry_at)) = (at("token"), at("expiry")) else {
                    return;
                };
                let (facts, now) = (&self.facts, self.now);
                let rule = &mut self.report.join_tokens;
                batch.retain(|row| {
                    let keep = if facts.present {
                        row.get(token_at)
                            .and_then(text)
                            .is_some_and(|t| facts.tokens.contains(t))
                    } else {
                        row.get(expiry_at).and_then(int).is_none_or(|e| e <= now)
                    };
                    match (keep, facts.present) {
                        (true, _) => rule.kept += 1,
                        (false, true) => rule.dropped_gone_live += 1,
                        (false, false) => rule.dropped_unexpired += 1,
                    }
                    keep
                });
            }
            BUNDLES if self.report.own_bundle.kept == "live" => {
                let (Some(td_at), Some(data_at), Some(updated_at)) =
                    (at("trust_domain"), at("data"), at("updated_at"))
                else {
                    return;
                };
                let td = self.facts.trust_domain.as_deref();
                let Some((data, updated)) = &self.facts.own_bundle else {
                    return;
                };
                for row in batch.iter_mut() {
                    if row.get(td_at).and_then(text) == td {
                        if row[data_at] != *data {
                            self.report.own_bundle.differed = true;
                        }
                        row[data_at] = data.clone();
                        row[updated_at] = updated.clone();
                    }
                }
            }
            ENTRIES => {
                let (entry_at, rev_at, id_at) = (at("entry_id"), at("revision_number"), at("id"));
                for row in batch.iter_mut() {
                    if let Some(id) = id_at.and_then(|p| row.get(p)).and_then(int) {
                        self.snapshot_max_entry_id = self.snapshot_max_entry_id.max(id);
                    }
                    let Some(entry) = entry_at.and_then(|p| row.get(p)).and_then(text) else {
                        continue;
                    };
                    if self.options.keep_live_agents {
                        self.snapshot_entries.insert(entry.to_string());
                    }
                    if self.options.keep_snapshot_revisions {
                        continue;
                    }
                    let (Some(rev_at), Some(&live)) = (rev_at, self.facts.revisions.get(entry))
                    else {
                        continue;
                    };
                    let Some(restored) = row.get(rev_at).and_then(int) else {
                        continue;
                    };
                    if restored != live {
                        let rule = &mut self.report.revisions;
                        rule.moved += 1;
                        if rule.examples.len() < EXAMPLES {
                            rule.examples.push(entry.to_string());
                        }
                        row[rev_at] = Value::Int(restored.max(live).saturating_add(1));
                    }
                }
            }
            AGENTS | NODE_SELECTORS if self.options.keep_live_agents => {
                if table.name == AGENTS
                    && let Some(id_at) = at("spiffe_id")
                {
                    self.snapshot_agents.extend(
                        batch
                            .iter()
                            .filter_map(|r| r.get(id_at).and_then(text).map(str::to_string)),
                    );
                    if let Some(rule) = self.report.agents.as_mut() {
                        rule.snapshot_rows_replaced += batch.len() as u64;
                    }
                }
                batch.clear();
            }
            child if self.options.keep_live_agents && ENTRY_CHILDREN.contains(&child) => {
                if let Some(id_at) = at("id") {
                    let max = batch
                        .iter()
                        .filter_map(|r| r.get(id_at).and_then(int))
                        .max();
                    let seen = self
                        .snapshot_max_child_ids
                        .entry(child.to_string())
                        .or_default();
                    *seen = (*seen).max(max.unwrap_or(0));
                }
            }
            _ => {}
        }
    }

    /// Rows to add to `table` after the snapshot's (the carried live rows).
    ///
    /// # Errors
    /// A carried alias entry's new id would overflow.
    pub fn extra_rows(&mut self, table: &Table) -> Result<Vec<Vec<Value>>> {
        if !self.options.keep_live_agents {
            return Ok(Vec::new());
        }
        match table.name.as_str() {
            AGENTS => {
                let rows = self.facts.agents.shaped_for(table);
                if let Some(rule) = self.report.agents.as_mut() {
                    let live: HashSet<String> = match self.facts.agents.at("spiffe_id") {
                        Some(at) => self
                            .facts
                            .agents
                            .rows
                            .iter()
                            .filter_map(|r| r.get(at).and_then(text).map(str::to_string))
                            .collect(),
                        None => HashSet::new(),
                    };
                    rule.only_in_snapshot = self.snapshot_agents.difference(&live).count() as u64;
                    let mut since: Vec<&String> = live.difference(&self.snapshot_agents).collect();
                    since.sort();
                    rule.only_live = since.len() as u64;
                    rule.examples_only_live = since.into_iter().take(EXAMPLES).cloned().collect();
                }
                Ok(rows)
            }
            NODE_SELECTORS => Ok(self.facts.node_selectors.shaped_for(table)),
            ENTRIES => {
                // Alias entries the snapshot lacks, with ids past both sides'.
                let (Some(id_at), Some(entry_at)) = (
                    self.facts.aliases.at("id"),
                    self.facts.aliases.at("entry_id"),
                ) else {
                    return Ok(Vec::new());
                };
                let mut next = self.snapshot_max_entry_id.max(self.facts.max_entry_id);
                let mut carried = LiveRows {
                    columns: self.facts.aliases.columns.clone(),
                    rows: Vec::new(),
                };
                for row in &self.facts.aliases.rows {
                    let in_snapshot = row
                        .get(entry_at)
                        .and_then(text)
                        .is_some_and(|e| self.snapshot_entries.contains(e));
                    let Some(old) = row.get(id_at).and_then(int) else {
                        continue;
                    };
                    if in_snapshot {
                        continue;
                    }
                    next = next.checked_add(1).ok_or_else(|| {
                        Error::Integrity("registered_entries ids would overflow".into())
                    })?;
                    self.alias_ids.insert(old, next);
                    let mut row = row.clone();
                    row[id_at] = Value::Int(next);
                    carried.rows.push(row);
                }
                if let Some(rule) = self.report.agents.as_mut() {
                    rule.alias_entries_carried = carried.rows.len() as u64;
                }
                Ok(carried.shaped_for(table))
            }
            child if ENTRY_CHILDREN.contains(&child) => {
                let Some(rows) = self.facts.alias_children.get(child) else {
                    return Ok(Vec::new());
                };
                let Some(at) = rows.at("registered_entry_id") else {
                    return Ok(Vec::new());
                };
                let mut carried = LiveRows {
                    columns: rows.columns.clone(),
                    rows: Vec::new(),
                };
                // A child row's own id (if it has one) goes past both sides' ids.
                let id_at = carried.at("id");
                let mut next_id = self
                    .snapshot_max_child_ids
                    .get(child)
                    .copied()
                    .unwrap_or(0)
                    .max(self.facts.max_child_ids.get(child).copied().unwrap_or(0));
                for row in &rows.rows {
                    let Some(new) = row
                        .get(at)
                        .and_then(int)
                        .and_then(|old| self.alias_ids.get(&old))
                    else {
                        continue;
                    };
                    let mut row = row.clone();
                    row[at] = Value::Int(*new);
                    if let Some(id_at) = id_at {
                        next_id = next_id.checked_add(1).ok_or_else(|| {
                            Error::Integrity(format!("{child} ids would overflow"))
                        })?;
                        row[id_at] = Value::Int(next_id);
                    }
                    carried.rows.push(row);
                }
                Ok(carried.shaped_for(table))
            }
            _ => Ok(Vec::new()),
        }
    }

    /// What the rules did.
    #[must_use]
    pub fn report(&self) -> RulesReport {
        self.report.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::ColumnKind;

    fn table(name: &str, columns: &[(&str, ColumnKind)]) -> Table {
        Table::of_columns(name, columns)
    }

    fn tokens_table() -> Table {
        table(
            TOKENS,
            &[
                ("id", ColumnKind::Integer),
                ("token", ColumnKind::Text),
                ("expiry", ColumnKind::Integer),
            ],
        )
    }

    fn token(id: i64, t: &str, expiry: i64) -> Vec<Value> {
        vec![Value::Int(id), Value::Text(t.into()), Value::Int(expiry)]
    }

    #[test]
    fn without_a_live_datastore_unexpired_tokens_are_dropped() {
        let mut rules = RowRules::new(LiveFacts::default(), &RuleOptions::default(), 1000);
        let mut batch = vec![
            token(1, "old", 999),
            token(2, "now", 1000),
            token(3, "later", 1001),
        ];
        rules.apply(&tokens_table(), &mut batch);
        assert_eq!(batch, vec![token(1, "old", 999), token(2, "now", 1000)]);
        let r = rules.report().join_tokens;
        assert_eq!(
            (r.mode, r.kept, r.dropped_unexpired),
            ("unexpired-dropped", 2, 1)
        );
    }

    #[test]
    fn with_a_live_datastore_only_tokens_still_live_come_back() {
        let facts = LiveFacts {
            present: true,
            tokens: ["unused".to_string()].into(),
            ..LiveFacts::default()
        };
        let mut rules = RowRules::new(facts, &RuleOptions::default(), 1000);
        let mut batch = vec![token(1, "unused", 5000), token(2, "used-since", 5000)];
        rules.apply(&tokens_table(), &mut batch);
        assert_eq!(batch, vec![token(1, "unused", 5000)]);
        let r = rules.report().join_tokens;
        assert_eq!((r.mode, r.kept, r.dropped_gone_live), ("live", 1, 1));
        // As told, every token comes back.
        let told = RuleOptions {
            keep_snapshot_join_tokens: true,
            ..RuleOptions::default()
        };
        let mut rules = RowRules::new(LiveFacts::default(), &told, 1000);
        let mut batch = vec![token(1, "a", 5000)];
        rules.apply(&tokens_table(), &mut batch);
        assert_eq!(batch.len(), 1);
    }

    #[test]
    fn the_live_own_bundle_and_revisions_above_the_live_ones() {
        let facts = LiveFacts {
            present: true,
            trust_domain: Some("spiffe://example.org".into()),
            own_bundle: Some((Value::Bytes(vec![9]), Value::Text("t-live".into()))),
            revisions: [("e1".to_string(), 7), ("e2".to_string(), 3)].into(),
            ..LiveFacts::default()
        };
        let mut rules = RowRules::new(facts, &RuleOptions::default(), 0);
        let bundles = table(
            BUNDLES,
            &[
                ("id", ColumnKind::Integer),
                ("updated_at", ColumnKind::Text),
                ("trust_domain", ColumnKind::Text),
                ("data", ColumnKind::Bytes),
            ],
        );
        let mut batch = vec![
            vec![
                Value::Int(1),
                Value::Text("t-old".into()),
                Value::Text("spiffe://example.org".into()),
                Value::Bytes(vec![1]),
            ],
            vec![
                Value::Int(2),
                Value::Text("t-fed".into()),
                Value::Text("spiffe://other.org".into()),
                Value::Bytes(vec![2]),
            ],
        ];
        rules.apply(&bundles, &mut batch);
        assert_eq!(batch[0][3], Value::Bytes(vec![9]));
        assert_eq!(batch[0][1], Value::Text("t-live".into()));
        assert_eq!(batch[0][0], Value::Int(1), "the row keeps its id");
        assert_eq!(
            batch[1][3],
            Value::Bytes(vec![2]),
            "federated bundles as they were"
        );
        let entries = table(
            ENTRIES,
            &[
                ("id", ColumnKind::Integer),
                ("entry_id", ColumnKind::Text),
                ("revision_number", ColumnKind::Integer),
            ],
        );
        let mut batch = vec![
            vec![Value::Int(1), Value::Text("e1".into()), Value::Int(5)],
            vec![Value::Int(2), Value::Text("e2".into()), Value::Int(3)],
            vec![Value::Int(3), Value::Text("e3".into()), Value::Int(4)],
        ];
        rules.apply(&entries, &mut batch);
        assert_eq!(batch[0][2], Value::Int(8), "above the live 7");
        assert_eq!(batch[1][2], Value::Int(3), "the same revision: unchanged");
        assert_eq!(batch[2][2], Value::Int(4), "not live: unchanged");
        let r = rules.report();
        assert_eq!((r.own_bundle.kept, r.own_bundle.differed), ("live", true));
        assert_eq!(
            (r.revisions.moved, r.revisions.examples.clone()),
            (1, vec!["e1".to_string()])
        );
    }

    /// The restore skips its second content hash of a table when
    /// `may_change` says the rules leave it alone: under every option and
    /// live-datastore combination, `apply` must then keep each batch as it was.
    #[test]
    fn tables_the_rules_say_they_leave_alone_come_through_unchanged() {
        let text = |s: &str| Value::Text(s.into());
        let samples: Vec<(Table, Vec<Vec<Value>>)> = vec![
            (
                tokens_table(),
                vec![token(1, "unused", 5000), token(2, "gone", 10)],
            ),
            (
                table(
                    BUNDLES,
                    &[
                        ("id", ColumnKind::Integer),
                        ("updated_at", ColumnKind::Text),
                        ("trust_domain", ColumnKind::Text),
                        ("data", ColumnKind::Bytes),
                    ],
                ),
                vec![vec![
                    Value::Int(1),
                    text("t-old"),
                    text("spiffe://example.org"),
                    Value::Bytes(vec![1]),
                ]],
            ),
            (
                table(
                    ENTRIES,
                    &[
                        ("id", ColumnKind::Integer),
                        ("entry_id", ColumnKind::Text),
                        ("revision_number", ColumnKind::Integer),
                    ],
                ),
                vec![vec![Value::Int(1), text("e1"), Value::Int(5)]],
            ),
            (
                table(
                    AGENTS,
                    &[("id", ColumnKind::Integer), ("spiffe_id", ColumnKind::Text)],
                ),
                vec![vec![Value::Int(1), text("spiffe://example.org/agent")]],
            ),
            (
                table(NODE_SELECTORS, &[("id", ColumnKind::Integer)]),
                vec![vec![Value::Int(1)]],
            ),
            (
                table(
                    "selectors",
                    &[("id", ColumnKind::Integer), ("type", ColumnKind::Text)],
                ),
                vec![vec![Value::Int(1), text("unix")]],
            ),
            (
                table("ca_journals", &[("id", ColumnKind::Integer)]),
                vec![vec![Value::Int(1)]],
            ),
        ];
        let live = || LiveFacts {
            present: true,
            trust_domain: Some("spiffe://example.org".into()),
            tokens: ["unused".to_string()].into(),
            own_bundle: Some((Value::Bytes(vec![9]), text("t-live"))),
            revisions: [("e1".to_string(), 7)].into(),
            ..LiveFacts::default()
        };
        let mut changes_seen = 0;
        for bits in 0..16u8 {
            let options = RuleOptions {
                keep_live_agents: bits & 1 != 0,
                keep_snapshot_join_tokens: bits & 2 != 0,
                keep_snapshot_bundle: bits & 4 != 0,
                keep_snapshot_revisions: bits & 8 != 0,
            };
            for facts in [LiveFacts::default(), live()] {
                let mut rules = RowRules::new(facts, &options, 1000);
                for (t, rows) in &samples {
                    let mut batch = rows.clone();
                    rules.apply(t, &mut batch);
                    if batch != *rows {
                        changes_seen += 1;
                        assert!(
                            rules.may_change(&t.name),
                            "{} changed under {options:?} though may_change said no",
                            t.name
                        );
                    }
                }
            }
        }
        assert!(changes_seen > 0, "the samples exercise the rules");
    }

    #[test]
    fn trust_domains_are_read_from_spiffe_ids() {
        assert_eq!(
            trust_domain_of("spiffe://example.org/spire/agent/x").as_deref(),
            Some("spiffe://example.org")
        );
        assert_eq!(
            trust_domain_of("spiffe://example.org").as_deref(),
            Some("spiffe://example.org")
        );
        assert_eq!(trust_domain_of("spiffe:///x"), None);
        assert_eq!(trust_domain_of("https://x"), None);
    }
}
