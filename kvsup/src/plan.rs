//! The change planner: what an apply does to a running cluster, decided
//! from the running manifest, the kvd binary the nodes run, the new
//! manifest and binary, and the change under way (if any). One change per
//! apply, or a refusal that names what to do instead; nothing is changed
//! by a refused apply (docs/DESIGN.md §8.6).
//!
//! Pure: the daemon computes the binaries' checksums and acts on the plan.

use std::collections::HashSet;
use std::path::PathBuf;

use serde::Serialize;

use crate::manifest::{Manifest, Mode, NodeSpec};

/// A kvd binary as the nodes run it: its path and a checksum of its
/// content, so that a binary replaced in place counts as a new one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BinaryId {
    pub path: PathBuf,
    /// Hex SHA-256 of the file's content.
    pub sha256: String,
}

impl BinaryId {
    /// `path (sha256 1a2b3c4d…)`, for the plan's lines and events.
    pub fn describe(&self) -> String {
        let short: String = self.sha256.chars().take(12).collect();
        format!("{} (sha256 {short})", self.path.display())
    }
}

/// What a node runs, beyond its place in the cluster: the settings a
/// rolling change moves the nodes to, one node at a time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeSettings {
    pub index: bool,
    pub kvd_args: Vec<String>,
    pub kvd: BinaryId,
}

impl NodeSettings {
    /// The settings manifest `m` gives its nodes with binary `kvd`.
    pub fn of(m: &Manifest, kvd: &BinaryId) -> NodeSettings {
        NodeSettings {
            index: m.spec.index,
            kvd_args: m.spec.kvd_args.clone(),
            kvd: kvd.clone(),
        }
    }

    /// One line per setting that differs from `self` to `to`.
    pub fn changes_to(&self, to: &NodeSettings) -> Vec<String> {
        let mut out = Vec::new();
        if self.index != to.index {
            out.push(format!("spec.index: {} -> {}", self.index, to.index));
        }
        if self.kvd_args != to.kvd_args {
            out.push(format!(
                "spec.kvdArgs: {:?} -> {:?}",
                self.kvd_args, to.kvd_args
            ));
        }
        if self.kvd != to.kvd {
            out.push(format!(
                "kvd binary: {} -> {}",
                self.kvd.describe(),
                to.kvd.describe()
            ));
        }
        out
    }
}

/// The kind of a change the daemon carries out over time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    Rolling,
    AddNode,
    RemoveNode,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Rolling => "rolling",
            ChangeKind::AddNode => "add_node",
            ChangeKind::RemoveNode => "remove_node",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeState {
    Running,
    Done,
    Failed,
}

impl ChangeState {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeState::Running => "running",
            ChangeState::Done => "done",
            ChangeState::Failed => "failed",
        }
    }
}

/// The last change the daemon started, as `kvsup status` shows it
/// (`"change"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChangeStatus {
    pub kind: ChangeKind,
    /// The plan's lines.
    pub what: Vec<String>,
    /// What it does now (or did last), e.g. `restarting n1`.
    pub step: String,
    pub nodes_done: Vec<String>,
    /// Nodes not yet on the change's settings.
    pub nodes_left: Vec<String>,
    pub state: ChangeState,
    /// Why it failed.
    pub reason: Option<String>,
    /// The settings generation it moves the nodes to.
    pub generation: u64,
}

impl ChangeStatus {
    pub fn running(&self) -> bool {
        self.state == ChangeState::Running
    }

    /// A rolling change that stopped with nodes not yet on its settings:
    /// an apply of the same manifest resumes it.
    pub fn unfinished_rolling(&self) -> bool {
        self.kind == ChangeKind::Rolling
            && self.state == ChangeState::Failed
            && !self.nodes_left.is_empty()
    }
}

/// What an apply does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Settings taken at once (a live mode switch, `healthCheck`,
    /// `restart`, `rollout`, `backup`, `chaos`); empty: nothing changes.
    Settings(Vec<String>),
    /// Restart the nodes one at a time onto new settings (`what`);
    /// `settings` are taken at once, as in [`Plan::Settings`].
    Rolling {
        what: Vec<String>,
        settings: Vec<String>,
    },
    AddNode(NodeSpec),
    RemoveNode(String),
}

impl Plan {
    /// The plan as lines, as `kvsup apply` (and `--dry-run`) prints it.
    pub fn lines(&self) -> Vec<String> {
        match self {
            Plan::Settings(lines) => lines.clone(),
            Plan::Rolling { what, settings } => {
                let mut out = vec![format!(
                    "rolling change, one node at a time: {}",
                    what.join("; ")
                )];
                out.extend(settings.iter().cloned());
                out
            }
            Plan::AddNode(n) => vec![format!(
                "spec.nodes: add node {} on {}:{}",
                n.name,
                n.host(),
                n.port
            )],
            Plan::RemoveNode(name) => vec![format!("spec.nodes: remove node {name}")],
        }
    }

    /// The kind of the change the daemon carries out, if it is one.
    pub fn change_kind(&self) -> Option<ChangeKind> {
        match self {
            Plan::Settings(_) => None,
            Plan::Rolling { .. } => Some(ChangeKind::Rolling),
            Plan::AddNode(_) => Some(ChangeKind::AddNode),
            Plan::RemoveNode(_) => Some(ChangeKind::RemoveNode),
        }
    }
}

/// Why an apply is refused: each reason names what to do instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal(pub Vec<String>);

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join("; "))
    }
}

impl std::error::Error for Refusal {}

/// Fewest nodes a primary/secondary cluster is left with by a removal:
/// with fewer than 3, a majority is every node, so the loss of one stops
/// elections and the cluster could not fail over.
pub const MIN_PRIMARY_SECONDARY_NODES: usize = 3;

/// The plan for applying `new` (with binary `new_kvd`) to a cluster that
/// runs `running` with `running_kvd`, while `in_progress` is the last
/// change the daemon started (if any).
pub fn plan(
    running: &Manifest,
    running_kvd: &BinaryId,
    new: &Manifest,
    new_kvd: &BinaryId,
    in_progress: Option<&ChangeStatus>,
) -> Result<Plan, Refusal> {
    let planned = plan_change(running, running_kvd, new, new_kvd, in_progress);
    match in_progress.filter(|c| c.running()) {
        // While a change runs, any other edit (even one refused for its
        // own reasons) waits for it: the running manifest is half way.
        Some(c) if planned != Ok(Plan::Settings(Vec::new())) => Err(Refusal(vec![format!(
            "a change is in progress: {} ({}), step: {}; wait for it or see kvsup status",
            c.kind.as_str(),
            c.what.join("; "),
            c.step
        )])),
        _ => planned,
    }
}

/// [`plan`] but for a change in progress.
fn plan_change(
    running: &Manifest,
    running_kvd: &BinaryId,
    new: &Manifest,
    new_kvd: &BinaryId,
    in_progress: Option<&ChangeStatus>,
) -> Result<Plan, Refusal> {
    fixed_fields(running, new)?;
    let nodes = node_change(running, new)?;
    let rolling =
        NodeSettings::of(running, running_kvd).changes_to(&NodeSettings::of(new, new_kvd));
    let mode_switch = running.spec.mode != new.spec.mode;
    let settings = settings_lines(running, new);
    let unfinished = in_progress.filter(|c| c.unfinished_rolling());
    let plan = match nodes {
        Some(node_plan) => {
            let mut others = Vec::new();
            if !rolling.is_empty() {
                others.push(format!("a rolling change ({})", rolling.join("; ")));
            }
            if mode_switch {
                others.push("a mode switch".to_string());
            }
            if !settings.is_empty() && !mode_switch {
                others.push(format!("other changes ({})", settings.join("; ")));
            }
            if !others.is_empty() {
                return Err(Refusal(vec![format!(
                    "{} cannot go with {} in one apply: apply the node change alone, then the rest",
                    node_plan.lines().join(", "),
                    others.join(" and ")
                )]));
            }
            if let Some(c) = unfinished {
                return Err(Refusal(vec![format!(
                    "the rolling change that stopped at {} is unfinished ({} not on it yet): apply \
                     its manifest again to resume it (or apply the previous settings), then \
                     change the nodes",
                    c.step,
                    c.nodes_left.join(", ")
                )]));
            }
            node_plan
        }
        None if !rolling.is_empty() && mode_switch => {
            return Err(Refusal(vec![format!(
                "a mode switch ({} -> {}) and a rolling change ({}) go in separate applies: \
                 apply one, then the other",
                running.spec.mode.as_str(),
                new.spec.mode.as_str(),
                rolling.join("; ")
            )]));
        }
        None if !rolling.is_empty() => Plan::Rolling {
            what: rolling,
            settings,
        },
        None => match unfinished {
            // Same settings as the stopped rolling change: it resumes.
            Some(c) if !mode_switch => Plan::Rolling {
                what: vec![format!(
                    "resume the stopped change on {} ({})",
                    c.nodes_left.join(", "),
                    c.what.join("; ")
                )],
                settings,
            },
            Some(c) => {
                return Err(Refusal(vec![format!(
                    "the rolling change that stopped at {} is unfinished ({} not on it yet): \
                     apply its manifest again to resume it before a mode switch",
                    c.step,
                    c.nodes_left.join(", ")
                )]));
            }
            None => Plan::Settings(settings),
        },
    };
    Ok(plan)
}

/// The fields a running cluster cannot change at all.
fn fixed_fields(running: &Manifest, new: &Manifest) -> Result<(), Refusal> {
    let (a, b) = (&running.spec, &new.spec);
    let mut refused = Vec::new();
    if running.metadata.name != new.metadata.name {
        refused.push(format!(
            "metadata.name {:?} -> {:?}: this supervisor runs cluster {:?}",
            running.metadata.name, new.metadata.name, running.metadata.name
        ));
    }
    if a.state_dir != b.state_dir {
        refused.push("spec.stateDir: cannot change on a running cluster".into());
    }
    if a.supervisor != b.supervisor {
        refused.push("spec.supervisor.port: cannot change on a running cluster".into());
    }
    if a.tls != b.tls {
        refused.push(
            "spec.tls: a running cluster cannot turn TLS on or off (kvsup down, then apply)".into(),
        );
    }
    if refused.is_empty() {
        Ok(())
    } else {
        Err(Refusal(refused))
    }
}

/// The one node added or removed, if the node lists differ; a refusal for
/// any other difference. The order of the list does not count.
fn node_change(running: &Manifest, new: &Manifest) -> Result<Option<Plan>, Refusal> {
    let (old, now) = (&running.spec.nodes, &new.spec.nodes);
    let old_names: HashSet<&str> = old.iter().map(|n| n.name.as_str()).collect();
    let new_names: HashSet<&str> = now.iter().map(|n| n.name.as_str()).collect();
    let mut refused = Vec::new();
    for n in now {
        if let Some(o) = running.node(&n.name) {
            if o != n {
                refused.push(format!(
                    "node {}: {}: an existing node's port, address and runtime cannot change; \
                     remove it and add a new node instead (one apply each)",
                    n.name,
                    edits(o, n).join(", ")
                ));
            }
        }
    }
    let removed: Vec<&NodeSpec> = old
        .iter()
        .filter(|n| !new_names.contains(n.name.as_str()))
        .collect();
    let added: Vec<&NodeSpec> = now
        .iter()
        .filter(|n| !old_names.contains(n.name.as_str()))
        .collect();
    // A node whose name changed shows as one removed and one added at the
    // same endpoint.
    for a in &added {
        if let Some(r) = removed
            .iter()
            .find(|r| r.host() == a.host() && r.port == a.port)
        {
            refused.push(format!(
                "node {} renamed to {}: a node's name cannot change (it names its data and \
                 its identity); remove it and add a new node instead (one apply each)",
                r.name, a.name
            ));
        }
    }
    if !refused.is_empty() {
        return Err(Refusal(refused));
    }
    if removed.len() * 2 > old.len() {
        return Err(Refusal(vec![format!(
            "removing {} of {} nodes at once would remove a majority of the cluster, which \
             then could not elect or commit: remove one node per apply",
            removed.len(),
            old.len(),
        )]));
    }
    if added.len() + removed.len() > 1 {
        return Err(Refusal(vec![format!(
            "spec.nodes: {}: add or remove one node per apply",
            [names("adds", &added), names("removes", &removed)]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(" and ")
        )]));
    }
    if let Some(r) = removed.first() {
        let min = match running.spec.mode {
            Mode::PrimarySecondary => MIN_PRIMARY_SECONDARY_NODES,
            _ => 1,
        };
        if now.len() < min {
            return Err(Refusal(vec![format!(
                "removing {} leaves {} node(s); a primary/secondary cluster keeps at least \
                 {min}, so that it can still elect a primary when one fails (switch to \
                 masterless first to run fewer)",
                r.name,
                now.len()
            )]));
        }
        return Ok(Some(Plan::RemoveNode(r.name.clone())));
    }
    Ok(added.first().map(|a| Plan::AddNode((*a).clone())))
}

/// `adds n3, n4`, or nothing when `nodes` is empty.
fn names(verb: &str, nodes: &[&NodeSpec]) -> Option<String> {
    (!nodes.is_empty()).then(|| {
        format!(
            "{verb} {}",
            nodes
                .iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

/// What differs between two entries of one node.
fn edits(a: &NodeSpec, b: &NodeSpec) -> Vec<String> {
    let mut out = Vec::new();
    if a.port != b.port {
        out.push(format!("port {} -> {}", a.port, b.port));
    }
    if a.address != b.address {
        out.push(format!("address {} -> {}", a.host(), b.host()));
    }
    if a.runtime != b.runtime {
        out.push(format!("runtime {:?} -> {:?}", a.runtime, b.runtime).to_lowercase());
    }
    out
}

/// The changes taken at once, one line each.
fn settings_lines(running: &Manifest, new: &Manifest) -> Vec<String> {
    let (a, b) = (&running.spec, &new.spec);
    let mut out = Vec::new();
    if a.mode != b.mode {
        out.push(format!(
            "spec.mode: {} -> {} (live mode switch)",
            a.mode.as_str(),
            b.mode.as_str()
        ));
    }
    if a.health_check != b.health_check {
        out.push(format!(
            "spec.healthCheck: {:?} -> {:?}",
            a.health_check, b.health_check
        ));
    }
    if a.restart != b.restart {
        out.push(format!("spec.restart: {:?} -> {:?}", a.restart, b.restart));
    }
    if a.rollout != b.rollout {
        out.push(format!("spec.rollout: {:?} -> {:?}", a.rollout, b.rollout));
    }
    if a.backup != b.backup {
        out.push(format!("spec.backup: {:?} -> {:?}", a.backup, b.backup));
    }
    if a.chaos != b.chaos {
        out.push(format!("spec.chaos: {:?} -> {:?}", a.chaos, b.chaos));
    }
    out
}

/// A node as the next step of a rolling change sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollNode {
    pub name: String,
    /// It runs the change's settings already.
    pub updated: bool,
    /// Running, answering and ready.
    pub healthy: bool,
    /// `runtime: external`: kvsup cannot restart it.
    pub external: bool,
}

/// The next step of a rolling change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RollStep {
    /// Restart this node onto the new settings.
    Restart(String),
    /// Move the primary to this updated, healthy secondary first.
    Switchover(String),
    /// Every node kvsup runs is on the new settings.
    Done,
    /// Nothing can be done now (no primary known yet, or no updated
    /// secondary healthy): look again shortly.
    Wait(String),
}

/// What a rolling change does next. Primary/secondary: the secondaries
/// first, then a switchover to an updated healthy secondary, then the old
/// primary (never restarted while it leads, so that no restart is a
/// failover); masterless: in list order. `nodes` in the daemon's order.
pub fn next_step(mode: Mode, primary: Option<&str>, nodes: &[RollNode]) -> RollStep {
    let todo: Vec<&RollNode> = nodes.iter().filter(|n| !n.updated && !n.external).collect();
    if todo.is_empty() {
        return RollStep::Done;
    }
    if mode != Mode::PrimarySecondary || nodes.len() < 2 {
        return RollStep::Restart(todo[0].name.clone());
    }
    let Some(primary) = primary else {
        return RollStep::Wait("no primary is known yet".into());
    };
    if let Some(n) = todo.iter().find(|n| n.name != primary) {
        return RollStep::Restart(n.name.clone());
    }
    // Only the primary is left.
    match nodes
        .iter()
        .find(|n| n.name != primary && n.updated && n.healthy)
    {
        Some(to) => RollStep::Switchover(to.name.clone()),
        None => RollStep::Wait(format!(
            "no updated secondary is healthy to take over from {primary}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
apiVersion: kvstore/v1
kind: Cluster
metadata: {name: demo}
spec:
  mode: primary-secondary
  stateDir: .kvsup/demo
  nodes:
    - {name: n0, port: 8765}
    - {name: n1, port: 8766}
    - {name: n2, port: 8767}
  healthCheck: {intervalMs: 200, failureThreshold: 3}
  supervisor: {port: 8700}
";

    fn m(text: &str) -> Manifest {
        Manifest::parse(text, "m").unwrap()
    }

    fn good() -> Manifest {
        m(GOOD)
    }

    fn kvd(sum: &str) -> BinaryId {
        BinaryId {
            path: "/opt/kv/kvd".into(),
            sha256: sum.into(),
        }
    }

    /// `plan` from GOOD with binary `a` to `new` with binary `a`.
    fn from_good(new: &str) -> Result<Plan, Refusal> {
        plan(&good(), &kvd("a"), &m(new), &kvd("a"), None)
    }

    fn refused(new: &str) -> String {
        from_good(new).unwrap_err().to_string()
    }

    fn with_nodes(nodes: &[&str]) -> String {
        let list: String = nodes.iter().map(|n| format!("    - {n}\n")).collect();
        GOOD.replace(
            "    - {name: n0, port: 8765}\n    - {name: n1, port: 8766}\n    - {name: n2, port: 8767}\n",
            &list,
        )
    }

    fn rolling(status: ChangeState, left: &[&str]) -> ChangeStatus {
        ChangeStatus {
            kind: ChangeKind::Rolling,
            what: vec!["spec.kvdArgs: [] -> [\"--sync-replicas=1\"]".into()],
            step: "restarting n1".into(),
            nodes_done: vec!["n2".into()],
            nodes_left: left.iter().map(|s| s.to_string()).collect(),
            state: status,
            reason: None,
            generation: 2,
        }
    }

    const N3: &str = "{name: n3, port: 8768}";

    #[test]
    fn the_same_manifest_changes_nothing() {
        assert_eq!(from_good(GOOD), Ok(Plan::Settings(vec![])));
        // The order of the node list does not count.
        let shuffled = with_nodes(&[
            "{name: n2, port: 8767}",
            "{name: n0, port: 8765}",
            "{name: n1, port: 8766}",
        ]);
        assert_eq!(from_good(&shuffled), Ok(Plan::Settings(vec![])));
    }

    #[test]
    fn live_settings_are_listed_one_line_each() {
        let new = GOOD
            .replace("intervalMs: 200", "intervalMs: 500")
            .replace("mode: primary-secondary", "mode: masterless");
        let Ok(Plan::Settings(lines)) = from_good(&new) else {
            panic!("{:?}", from_good(&new));
        };
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].contains("live mode switch"), "{lines:?}");
        assert!(lines[1].starts_with("spec.healthCheck"), "{lines:?}");
        let rollout = format!("{GOOD}  rollout: {{readyTimeoutMs: 5000}}\n");
        let Ok(Plan::Settings(lines)) = from_good(&rollout) else {
            panic!()
        };
        assert!(lines[0].starts_with("spec.rollout"), "{lines:?}");
    }

    #[test]
    fn kvd_args_index_and_the_binary_make_a_rolling_change() {
        let args = format!("{GOOD}  kvdArgs: [\"--sync-replicas=1\"]\n");
        let Ok(Plan::Rolling { what, settings }) = from_good(&args) else {
            panic!("{:?}", from_good(&args));
        };
        assert_eq!(what, ["spec.kvdArgs: [] -> [\"--sync-replicas=1\"]"]);
        assert!(settings.is_empty());
        let index = format!("{GOOD}  index: true\n");
        let Ok(Plan::Rolling { what, .. }) = from_good(&index) else {
            panic!()
        };
        assert_eq!(what, ["spec.index: false -> true"]);
        // The same path with other content counts: a binary replaced in place.
        let p = plan(&good(), &kvd("a"), &good(), &kvd("b"), None).unwrap();
        let Plan::Rolling { what, .. } = &p else {
            panic!("{p:?}")
        };
        assert!(what[0].starts_with("kvd binary: /opt/kv/kvd"), "{what:?}");
        assert!(p.lines()[0].starts_with("rolling change, one node at a time"));
        // A live setting with it is taken at once.
        let both = args.replace("intervalMs: 200", "intervalMs: 300");
        let Ok(Plan::Rolling { settings, .. }) = from_good(&both) else {
            panic!()
        };
        assert_eq!(settings.len(), 1);
    }

    #[test]
    fn a_rolling_change_and_a_mode_switch_go_in_separate_applies() {
        let new = format!("{GOOD}  kvdArgs: [\"--sync-replicas=1\"]\n")
            .replace("mode: primary-secondary", "mode: masterless");
        let e = refused(&new);
        assert!(e.contains("separate applies"), "{e}");
    }

    #[test]
    fn one_node_added_or_removed_is_a_node_change() {
        let add = with_nodes(&[
            "{name: n0, port: 8765}",
            "{name: n1, port: 8766}",
            "{name: n2, port: 8767}",
            N3,
        ]);
        let Ok(Plan::AddNode(n)) = from_good(&add) else {
            panic!("{:?}", from_good(&add))
        };
        assert_eq!((n.name.as_str(), n.port), ("n3", 8768));
        // From four, one removed (in another order).
        let four = m(&add);
        let three = m(&with_nodes(&[
            N3,
            "{name: n1, port: 8766}",
            "{name: n0, port: 8765}",
        ]));
        let p = plan(&four, &kvd("a"), &three, &kvd("a"), None);
        assert_eq!(p, Ok(Plan::RemoveNode("n2".into())));
        assert_eq!(p.unwrap().lines(), ["spec.nodes: remove node n2"]);
    }

    #[test]
    fn more_than_one_node_per_apply_is_refused() {
        let two = with_nodes(&[
            "{name: n0, port: 8765}",
            "{name: n1, port: 8766}",
            "{name: n2, port: 8767}",
            N3,
            "{name: n4, port: 8769}",
        ]);
        let e = refused(&two);
        assert!(
            e.contains("adds n3, n4: add or remove one node per apply"),
            "{e}"
        );
        // One added and one removed is two changes too.
        let swap = with_nodes(&["{name: n0, port: 8765}", "{name: n1, port: 8766}", N3]);
        let e = refused(&swap);
        assert!(e.contains("adds n3 and removes n2"), "{e}");
        // Two of five is no majority: the one-at-a-time rule speaks.
        let five = m(&two);
        let e = plan(&five, &kvd("a"), &good(), &kvd("a"), None).unwrap_err();
        assert!(
            e.to_string().contains("removes n3, n4: add or remove one"),
            "{e}"
        );
    }

    #[test]
    fn removing_a_majority_is_said_as_such_before_the_one_at_a_time_rule() {
        let one = with_nodes(&["{name: n0, port: 8765}"]);
        let e = refused(&one);
        assert!(
            e.contains("removing 2 of 3 nodes at once would remove a majority"),
            "{e}"
        );
        // Half of four is no majority: the one-at-a-time rule speaks.
        let four = m(&with_nodes(&[
            "{name: n0, port: 8765}",
            "{name: n1, port: 8766}",
            "{name: n2, port: 8767}",
            N3,
        ]));
        let two = m(&with_nodes(&["{name: n0, port: 8765}", N3]));
        let e = plan(&four, &kvd("a"), &two, &kvd("a"), None).unwrap_err();
        assert!(
            e.to_string()
                .contains("removes n1, n2: add or remove one node per apply"),
            "{e}"
        );
    }

    #[test]
    fn primary_secondary_keeps_three_nodes_and_masterless_one() {
        let e = refused(&with_nodes(&[
            "{name: n0, port: 8765}",
            "{name: n1, port: 8766}",
        ]));
        assert!(e.contains("keeps at least 3"), "{e}");
        assert!(e.contains("masterless"), "{e}");
        let ml = GOOD.replace("mode: primary-secondary", "mode: masterless");
        let two = with_nodes(&["{name: n0, port: 8765}", "{name: n1, port: 8766}"])
            .replace("mode: primary-secondary", "mode: masterless");
        let p = plan(&m(&ml), &kvd("a"), &m(&two), &kvd("a"), None);
        assert_eq!(p, Ok(Plan::RemoveNode("n2".into())));
        let one = with_nodes(&["{name: n0, port: 8765}"])
            .replace("mode: primary-secondary", "mode: masterless");
        let p = plan(&m(&two), &kvd("a"), &m(&one), &kvd("a"), None);
        assert_eq!(p, Ok(Plan::RemoveNode("n1".into())));
    }

    #[test]
    fn an_existing_nodes_endpoint_runtime_or_name_cannot_change() {
        let e = refused(&GOOD.replace("port: 8767", "port: 8768"));
        assert!(e.contains("node n2: port 8767 -> 8768"), "{e}");
        assert!(e.contains("remove it and add a new node"), "{e}");
        let e = refused(&GOOD.replace(
            "{name: n1, port: 8766}",
            "{name: n1, port: 8766, address: 127.0.0.2}",
        ));
        assert!(e.contains("address 127.0.0.1 -> 127.0.0.2"), "{e}");
        let e = refused(&format!(
            "{}  tls: auto\n",
            GOOD.replace(
                "{name: n1, port: 8766}",
                "{name: n1, port: 8766, runtime: external}"
            )
        ));
        assert!(e.contains("spec.tls"), "{e}");
        let e = refused(&GOOD.replace("name: n2,", "name: n9,"));
        assert!(e.contains("node n2 renamed to n9"), "{e}");
    }

    #[test]
    fn a_node_change_goes_alone() {
        let add = with_nodes(&[
            "{name: n0, port: 8765}",
            "{name: n1, port: 8766}",
            "{name: n2, port: 8767}",
            N3,
        ]);
        let e = refused(&format!("{add}  kvdArgs: [\"--sync-replicas=1\"]\n"));
        assert!(e.contains("cannot go with a rolling change"), "{e}");
        let e = refused(&add.replace("mode: primary-secondary", "mode: masterless"));
        assert!(e.contains("a mode switch"), "{e}");
        let e = refused(&add.replace("intervalMs: 200", "intervalMs: 300"));
        assert!(e.contains("other changes (spec.healthCheck"), "{e}");
        let e = plan(&good(), &kvd("a"), &m(&add), &kvd("b"), None).unwrap_err();
        assert!(e.to_string().contains("kvd binary"), "{e}");
    }

    #[test]
    fn the_fixed_fields_are_refused_as_before() {
        for (from, to, field) in [
            (
                "stateDir: .kvsup/demo",
                "stateDir: .kvsup/other",
                "spec.stateDir",
            ),
            ("{port: 8700}", "{port: 8701}", "spec.supervisor.port"),
            ("{name: demo}", "{name: other}", "metadata.name"),
        ] {
            let e = refused(&GOOD.replace(from, to));
            assert!(e.contains(field), "{field}: {e}");
        }
        let e = refused(&format!("{GOOD}  tls: auto\n"));
        assert!(e.contains("spec.tls"), "{e}");
    }

    #[test]
    fn any_change_while_another_runs_is_refused_and_a_no_op_is_not() {
        let running = rolling(ChangeState::Running, &["n1", "n0"]);
        let args = format!("{GOOD}  kvdArgs: [\"--sync-replicas=1\"]\n");
        let e = plan(&good(), &kvd("a"), &m(&args), &kvd("a"), Some(&running)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "a change is in progress: rolling (spec.kvdArgs: [] -> [\"--sync-replicas=1\"]), \
             step: restarting n1; wait for it or see kvsup status"
        );
        let e = plan(
            &good(),
            &kvd("a"),
            &m(&GOOD.replace("intervalMs: 200", "intervalMs: 300")),
            &kvd("a"),
            Some(&running),
        );
        assert!(e.is_err());
        let same = plan(&good(), &kvd("a"), &good(), &kvd("a"), Some(&running));
        assert_eq!(same, Ok(Plan::Settings(vec![])));
        // An edit refused for its own reasons waits for the change too.
        let two = with_nodes(&["{name: n0, port: 8765}"]);
        let e = plan(&good(), &kvd("a"), &m(&two), &kvd("a"), Some(&running)).unwrap_err();
        assert!(e.to_string().starts_with("a change is in progress"), "{e}");
        // A finished change holds nothing up.
        let done = rolling(ChangeState::Done, &[]);
        assert!(plan(&good(), &kvd("a"), &m(&args), &kvd("a"), Some(&done)).is_ok());
    }

    #[test]
    fn the_same_manifest_resumes_a_stopped_rolling_change() {
        let failed = rolling(ChangeState::Failed, &["n1", "n0"]);
        let p = plan(&good(), &kvd("a"), &good(), &kvd("a"), Some(&failed)).unwrap();
        let Plan::Rolling { what, .. } = &p else {
            panic!("{p:?}")
        };
        assert!(
            what[0].starts_with("resume the stopped change on n1, n0"),
            "{what:?}"
        );
        // Nodes are not changed while some run other settings.
        let add = with_nodes(&[
            "{name: n0, port: 8765}",
            "{name: n1, port: 8766}",
            "{name: n2, port: 8767}",
            N3,
        ]);
        let e = plan(&good(), &kvd("a"), &m(&add), &kvd("a"), Some(&failed)).unwrap_err();
        assert!(
            e.to_string().contains("apply its manifest again to resume"),
            "{e}"
        );
        // A failed change with every node on it is over.
        let over = rolling(ChangeState::Failed, &[]);
        let p = plan(&good(), &kvd("a"), &good(), &kvd("a"), Some(&over));
        assert_eq!(p, Ok(Plan::Settings(vec![])));
    }

    fn rn(name: &str, updated: bool, healthy: bool) -> RollNode {
        RollNode {
            name: name.into(),
            updated,
            healthy,
            external: false,
        }
    }

    #[test]
    fn a_rolling_change_restarts_the_secondaries_then_moves_the_primary() {
        let ps = Mode::PrimarySecondary;
        let all_old = [
            rn("n0", false, true),
            rn("n1", false, true),
            rn("n2", false, true),
        ];
        assert_eq!(
            next_step(ps, Some("n0"), &all_old),
            RollStep::Restart("n1".into())
        );
        let one = [
            rn("n0", false, true),
            rn("n1", true, true),
            rn("n2", false, true),
        ];
        assert_eq!(
            next_step(ps, Some("n0"), &one),
            RollStep::Restart("n2".into())
        );
        let two = [
            rn("n0", false, true),
            rn("n1", true, false),
            rn("n2", true, true),
        ];
        assert_eq!(
            next_step(ps, Some("n0"), &two),
            RollStep::Switchover("n2".into())
        );
        let sick = [
            rn("n0", false, true),
            rn("n1", true, false),
            rn("n2", true, false),
        ];
        assert!(matches!(
            next_step(ps, Some("n0"), &sick),
            RollStep::Wait(_)
        ));
        // After the switchover the old primary is a secondary like any other.
        assert_eq!(
            next_step(ps, Some("n2"), &two),
            RollStep::Restart("n0".into())
        );
        let done = [
            rn("n0", true, true),
            rn("n1", true, true),
            rn("n2", true, true),
        ];
        assert_eq!(next_step(ps, Some("n2"), &done), RollStep::Done);
        assert!(matches!(next_step(ps, None, &all_old), RollStep::Wait(_)));
    }

    #[test]
    fn masterless_rolls_in_order_and_external_nodes_are_left_alone() {
        let ml = Mode::Masterless;
        let mut nodes = [
            rn("n0", true, true),
            rn("n1", false, true),
            rn("n2", false, true),
        ];
        assert_eq!(next_step(ml, None, &nodes), RollStep::Restart("n1".into()));
        nodes[1].external = true;
        assert_eq!(next_step(ml, None, &nodes), RollStep::Restart("n2".into()));
        nodes[2].updated = true;
        assert_eq!(next_step(ml, None, &nodes), RollStep::Done);
    }
}
