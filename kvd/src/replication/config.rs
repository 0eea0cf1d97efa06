//! Cluster membership (docs/DESIGN.md §4.11): the configuration as a log
//! record, and every decision about it as a plain function (the rules
//! layer: no I/O).
//!
//! A configuration is a set of members, each a node's advertised base URL,
//! each a voter or a learner. The configuration in effect on a node is the
//! newest configuration record in its log, committed or not (Raft: it
//! takes effect when appended); a log with none uses the bootstrap
//! configuration, this node and `--peers`, all voters. Changes are Raft's
//! single-server changes: one member added, promoted or removed at a time,
//! so that any majority of the old voters and any majority of the new
//! voters share a node.
//!
//! # Record body (op 12; docs/DESIGN.md §3.3), integers little-endian
//!
//! ```text
//! count u16 (1..=64) | count x (role u8: 1 voter, 2 learner | url_len u16 | url UTF-8)
//! ```

use kvproto::bytes::{PutLe, Reader};

/// Number of votes (or durable copies) that make a majority of
/// `cluster_size` nodes. Any two majorities share a node.
pub fn majority(cluster_size: usize) -> usize {
    cluster_size / 2 + 1
}

/// Members one configuration may hold at most.
pub const MAX_MEMBERS: usize = 64;
/// Bytes one member's URL may take at most.
pub const MAX_URL_BYTES: usize = 256;

const ROLE_VOTER: u8 = 1;
const ROLE_LEARNER: u8 = 2;

/// A cluster configuration: voters and learners, each by base URL (no
/// trailing `/`), in the order they joined.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub voters: Vec<String>,
    pub learners: Vec<String>,
}

/// A node's base URL as members are named: trailing `/` trimmed.
pub fn normalize(url: &str) -> String {
    url.trim_end_matches('/').to_string()
}

/// Whether `url` is `http(s)://host:port` (no path, query, user or space;
/// port 1..=65535) and no longer than [`MAX_URL_BYTES`].
pub fn check_url(url: &str) -> Result<(), String> {
    if url.len() > MAX_URL_BYTES {
        return Err(format!("a member URL is at most {MAX_URL_BYTES} bytes"));
    }
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| format!("{url:?} is not http(s)://host:port"))?;
    let bad = |why: &str| format!("{url:?} is not http(s)://host:port: {why}");
    if rest
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || "/?#@\\".contains(c))
    {
        return Err(bad("no path, query, user or space may follow the port"));
    }
    let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    if host.is_empty() || host == "[" {
        return Err(bad("no host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 && !port.starts_with('+') => Ok(()),
        _ => Err(bad("the port is not 1..=65535")),
    }
}

impl Config {
    /// The configuration of a log without a configuration record: this
    /// node and its `--peers`, all voters.
    pub fn bootstrap(me: &str, peers: &[String]) -> Config {
        let mut voters = vec![normalize(me)];
        for p in peers {
            let p = normalize(p);
            if !voters.contains(&p) {
                voters.push(p);
            }
        }
        Config {
            voters,
            learners: Vec::new(),
        }
    }

    pub fn is_voter(&self, url: &str) -> bool {
        self.voters.iter().any(|v| v == url)
    }

    pub fn is_learner(&self, url: &str) -> bool {
        self.learners.iter().any(|v| v == url)
    }

    pub fn is_member(&self, url: &str) -> bool {
        self.is_voter(url) || self.is_learner(url)
    }

    /// Every member, voters first.
    pub fn members(&self) -> impl Iterator<Item = &String> {
        self.voters.iter().chain(&self.learners)
    }

    /// §4.9's checks: well-formed URLs, at most [`MAX_MEMBERS`], no
    /// duplicates, at least one voter.
    pub fn validate(&self) -> Result<(), String> {
        if self.voters.is_empty() {
            return Err("a configuration needs at least one voter".into());
        }
        let n = self.voters.len() + self.learners.len();
        if n > MAX_MEMBERS {
            return Err(format!(
                "a configuration has at most {MAX_MEMBERS} members, not {n}"
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for m in self.members() {
            check_url(m)?;
            if !seen.insert(m.as_str()) {
                return Err(format!("{m} is a member twice"));
            }
        }
        Ok(())
    }

    /// Bytes [`Config::encode`] writes.
    pub fn encoded_len(&self) -> usize {
        2 + self.members().map(|m| 3 + m.len()).sum::<usize>()
    }

    /// The record body (see the module docs). The configuration must have
    /// passed [`Config::validate`] (so every count and length fits).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.put_u16((self.voters.len() + self.learners.len()) as u16);
        for (role, list) in [(ROLE_VOTER, &self.voters), (ROLE_LEARNER, &self.learners)] {
            for m in list {
                out.push(role);
                out.put_str16(m);
            }
        }
    }

    /// Reads a record body written by [`Config::encode`] and validates it.
    pub fn decode(r: &mut Reader<'_>) -> Result<Config, String> {
        let short = || "configuration record ends early".to_string();
        let count = usize::from(r.u16().ok_or_else(short)?);
        if count == 0 || count > MAX_MEMBERS {
            return Err(format!("configuration member count {count} is not 1..=64"));
        }
        let mut cfg = Config::default();
        for _ in 0..count {
            let role = r.u8().ok_or_else(short)?;
            let len = usize::from(r.u16().ok_or_else(short)?);
            let bytes = r.bytes(len).ok_or_else(short)?;
            let url = std::str::from_utf8(bytes)
                .map_err(|_| "a member URL is not UTF-8".to_string())?
                .to_string();
            match role {
                ROLE_VOTER => cfg.voters.push(url),
                ROLE_LEARNER => cfg.learners.push(url),
                other => return Err(format!("member role {other} is not 1 or 2")),
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

/// A configuration in effect on a node: the record's log index (0 for the
/// bootstrap configuration) and the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InEffect {
    pub index: u64,
    pub config: Config,
}

/// What `--join` leaves a node with until its log holds a configuration:
/// a learner of an unknown configuration (no voters, so it never counts
/// votes or acknowledgements).
pub fn joining() -> InEffect {
    InEffect {
        index: 0,
        config: Config::default(),
    }
}

// ---------------------------------------------------------------------------
// Counting by voters
// ---------------------------------------------------------------------------

/// The voters a majority of `config` needs.
pub fn voter_quorum(config: &Config) -> usize {
    majority(config.voters.len())
}

/// The highest index durable on a majority of `config`'s voters, as a
/// primary at `me` counts it: itself only if a voter (up to `my_durable`),
/// each other voter by its match index in `matches` (absent: 0); learners'
/// acknowledgements never count. 0 when the configuration has no voter.
pub fn replicated_by_voters(
    config: &Config,
    me: &str,
    my_durable: u64,
    matches: &[(&str, u64)],
) -> u64 {
    let mut held: Vec<u64> = config
        .voters
        .iter()
        .map(|v| {
            if v == me {
                my_durable
            } else {
                matches
                    .iter()
                    .find(|(url, _)| url == v)
                    .map_or(0, |(_, m)| *m)
            }
        })
        .collect();
    if held.is_empty() {
        return 0;
    }
    held.sort_unstable_by(|a, b| b.cmp(a));
    held[voter_quorum(config) - 1]
}

/// How many of `config`'s voters a set of answers counts, the candidate
/// (or primary) `me` included when it is a voter: `answered(url)` says
/// whether that voter's answer counts.
pub fn count_voters(config: &Config, me: &str, answered: impl Fn(&str) -> bool) -> usize {
    config
        .voters
        .iter()
        .filter(|v| *v == me || answered(v))
        .count()
}

// ---------------------------------------------------------------------------
// Changes
// ---------------------------------------------------------------------------

/// One membership change (`POST /v1/admin/members`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    AddLearner(String),
    Promote(String),
    Remove(String),
}

impl Action {
    pub fn url(&self) -> &str {
        match self {
            Action::AddLearner(u) | Action::Promote(u) | Action::Remove(u) => u,
        }
    }
}

/// Why a change was refused (nothing changed). Each maps to a 409 code.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChangeRefusal {
    #[error("the quorum is fixed by --sync-replicas: membership changes need the voter majority")]
    FixedQuorum,
    #[error(
        "a configuration change is in progress: the newest configuration (index {config_index}) \
         or this primary's first entry of its epoch (index {lead_from}) is not committed yet \
         (commit index {commit})"
    )]
    InProgress {
        config_index: u64,
        lead_from: u64,
        commit: u64,
    },
    #[error("{0} is already a member")]
    AlreadyMember(String),
    #[error("{0} is not a member")]
    NotMember(String),
    #[error("{0} is not a learner")]
    NotLearner(String),
    #[error(
        "learner {url} is at index {match_index}, behind the commit index {commit}: \
         it must catch up before it is promoted"
    )]
    LearnerBehind {
        url: String,
        match_index: u64,
        commit: u64,
    },
    #[error("the primary cannot remove itself: transfer leadership first")]
    RemoveSelf,
    #[error("{0} is the only voter")]
    LastVoter(String),
    #[error("the new configuration is invalid: {0}")]
    Invalid(String),
}

/// What a primary knows when it judges a change.
#[derive(Clone, Debug)]
pub struct ChangeState<'a> {
    /// The configuration in effect (the primary's newest).
    pub current: &'a InEffect,
    /// This primary's advertised URL.
    pub me: &'a str,
    /// The commit index.
    pub commit: u64,
    /// The first index of this primary's epoch (its no-op's).
    pub lead_from: u64,
    /// `--sync-replicas` was given.
    pub fixed_quorum: bool,
}

/// Judges `action` against `state`: the new configuration (the current one
/// with exactly one member changed), or why not. `match_of(url)` is a
/// member's match index on this primary.
pub fn check_change(
    state: &ChangeState<'_>,
    action: &Action,
    match_of: impl Fn(&str) -> u64,
) -> Result<Config, ChangeRefusal> {
    if state.fixed_quorum {
        return Err(ChangeRefusal::FixedQuorum);
    }
    // Raft's rule: one change at a time, and only once an entry of this
    // leader's term has committed (else a change appended by a deposed
    // leader and this one could both be decided by disjoint majorities).
    if state.commit < state.current.index || state.commit < state.lead_from {
        return Err(ChangeRefusal::InProgress {
            config_index: state.current.index,
            lead_from: state.lead_from,
            commit: state.commit,
        });
    }
    let cur = &state.current.config;
    let mut next = cur.clone();
    match action {
        Action::AddLearner(u) => {
            if cur.is_member(u) {
                return Err(ChangeRefusal::AlreadyMember(u.clone()));
            }
            next.learners.push(u.clone());
        }
        Action::Promote(u) => {
            if !cur.is_member(u) {
                return Err(ChangeRefusal::NotMember(u.clone()));
            }
            if !cur.is_learner(u) {
                return Err(ChangeRefusal::NotLearner(u.clone()));
            }
            let m = match_of(u);
            if m < state.commit {
                return Err(ChangeRefusal::LearnerBehind {
                    url: u.clone(),
                    match_index: m,
                    commit: state.commit,
                });
            }
            next.learners.retain(|l| l != u);
            next.voters.push(u.clone());
        }
        Action::Remove(u) => {
            if !cur.is_member(u) {
                return Err(ChangeRefusal::NotMember(u.clone()));
            }
            if u == state.me {
                return Err(ChangeRefusal::RemoveSelf);
            }
            if cur.voters.len() == 1 && cur.is_voter(u) {
                return Err(ChangeRefusal::LastVoter(u.clone()));
            }
            next.voters.retain(|v| v != u);
            next.learners.retain(|l| l != u);
        }
    }
    next.validate().map_err(ChangeRefusal::Invalid)?;
    Ok(next)
}

// ---------------------------------------------------------------------------
// History: the configuration at every index of a log
// ---------------------------------------------------------------------------

/// The configuration records of a log from the newest at or before its
/// base (the snapshot's index) on, oldest first: what a cut suffix reverts
/// to, and what a snapshot at any index of the log carries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct History {
    records: Vec<(u64, Config)>,
}

impl History {
    /// A log whose base (snapshot) carries `base` (none: no configuration
    /// record at or before it).
    pub fn new(base: Option<(u64, Config)>) -> History {
        History {
            records: base.into_iter().collect(),
        }
    }

    /// A configuration record appended at `index` (after every other).
    pub fn push(&mut self, index: u64, config: Config) {
        debug_assert!(self.records.last().is_none_or(|(i, _)| *i < index));
        self.records.push((index, config));
    }

    /// Entries `from` on are cut: their configurations are gone.
    pub fn truncate_from(&mut self, from: u64) {
        self.records.retain(|(i, _)| *i < from);
    }

    /// Entries through `base` are in a snapshot: keep the newest of them
    /// (the snapshot's configuration) and every later one.
    pub fn compact_to(&mut self, base: u64) {
        let keep = self.records.partition_point(|(i, _)| *i <= base);
        if keep > 1 {
            self.records.drain(..keep - 1);
        }
    }

    /// The newest configuration record, if any.
    pub fn newest(&self) -> Option<(u64, &Config)> {
        self.records.last().map(|(i, c)| (*i, c))
    }

    /// The configuration record in effect at `index` (the newest at or
    /// before it), if any.
    pub fn at(&self, index: u64) -> Option<(u64, &Config)> {
        let n = self.records.partition_point(|(i, _)| *i <= index);
        n.checked_sub(1).map(|k| {
            let (i, c) = &self.records[k];
            (*i, c)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(n: u16) -> String {
        format!("http://127.0.0.1:{n}")
    }

    fn cfg(voters: &[u16], learners: &[u16]) -> Config {
        Config {
            voters: voters.iter().map(|n| u(*n)).collect(),
            learners: learners.iter().map(|n| u(*n)).collect(),
        }
    }

    #[test]
    fn urls_are_host_and_port_only() {
        for ok in [
            "http://127.0.0.1:1",
            "https://node-a.example:65535",
            "http://[::1]:80",
        ] {
            assert_eq!(check_url(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "127.0.0.1:80",
            "ftp://a:1",
            "http://a",
            "http://:80",
            "http://a:0",
            "http://a:65536",
            "http://a:80/x",
            "http://a:80?x",
            "http://u@a:80",
            "http://a b:80",
            "http://a:+80",
        ] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
        assert!(check_url(&format!("http://{}:1", "a".repeat(300))).is_err());
    }

    #[test]
    fn bootstrap_is_me_and_peers_all_voters() {
        let c = Config::bootstrap(&(u(1) + "/"), &[u(2), u(3) + "/", u(2)]);
        assert_eq!(c, cfg(&[1, 2, 3], &[]));
    }

    #[test]
    fn encoding_round_trips_and_refuses_damage() {
        let c = cfg(&[1, 2], &[3]);
        let mut out = Vec::new();
        c.encode(&mut out);
        assert_eq!(out.len(), c.encoded_len());
        assert_eq!(Config::decode(&mut Reader::new(&out)), Ok(c.clone()));
        for cut in 0..out.len() {
            assert!(
                Config::decode(&mut Reader::new(&out[..cut])).is_err(),
                "{cut}"
            );
        }
        let mut role = out.clone();
        role[2] = 3;
        assert!(Config::decode(&mut Reader::new(&role)).is_err());
        // Only learners: no voter.
        let mut learners_only = Vec::new();
        cfg(&[], &[1]).encode(&mut learners_only);
        assert!(Config::decode(&mut Reader::new(&learners_only)).is_err());
        let mut dup = Vec::new();
        cfg(&[1, 1], &[]).encode(&mut dup);
        assert!(Config::decode(&mut Reader::new(&dup)).is_err());
        assert!(Config::decode(&mut Reader::new(&[0, 0])).is_err());
    }

    #[test]
    fn validate_bounds_the_members() {
        let many = Config {
            voters: (1..=65).map(u).collect(),
            learners: vec![],
        };
        assert!(many.validate().is_err());
        let max = Config {
            voters: (1..=64).map(u).collect(),
            learners: vec![],
        };
        assert_eq!(max.validate(), Ok(()));
        assert!(cfg(&[1], &[1]).validate().is_err(), "voter and learner");
    }

    #[test]
    fn commit_counts_voters_only() {
        let me = u(1);
        let (u2, u3, u4) = (u(2), u(3), u(4));
        let c = cfg(&[1, 2, 3], &[4]);
        // The learner holds 9 but never counts; voters 2 and 3 hold 5, 3.
        let m = [(u2.as_str(), 5), (u3.as_str(), 3), (u4.as_str(), 9)];
        assert_eq!(replicated_by_voters(&c, &me, 7, &m), 5);
        // Both voter secondaries down: the learner alone commits nothing.
        let m = [(u4.as_str(), 9)];
        assert_eq!(replicated_by_voters(&c, &me, 7, &m), 0);
        // 5 voters: 3 needed.
        let c5 = cfg(&[1, 2, 3, 4, 5], &[]);
        let m = [(u2.as_str(), 6), (u3.as_str(), 4)];
        assert_eq!(replicated_by_voters(&c5, &me, 7, &m), 4);
        let m = [(u2.as_str(), 6)];
        assert_eq!(replicated_by_voters(&c5, &me, 7, &m), 0);
        // A primary that is not a voter does not count itself.
        let c = cfg(&[2, 3], &[1]);
        let m = [(u2.as_str(), 6), (u3.as_str(), 2)];
        assert_eq!(replicated_by_voters(&c, &me, 9, &m), 2);
        // A single voter commits alone.
        assert_eq!(replicated_by_voters(&cfg(&[1], &[2]), &me, 4, &[]), 4);
        assert_eq!(replicated_by_voters(&Config::default(), &me, 4, &[]), 0);
    }

    #[test]
    fn count_voters_counts_me_only_as_a_voter() {
        let c = cfg(&[1, 2, 3], &[4]);
        assert_eq!(count_voters(&c, &u(1), |_| false), 1);
        assert_eq!(count_voters(&c, &u(1), |_| true), 3);
        assert_eq!(count_voters(&c, &u(4), |x| x == u(2)), 1);
        assert_eq!(voter_quorum(&c), 2);
    }

    fn state<'a>(cur: &'a InEffect, commit: u64) -> ChangeState<'a> {
        ChangeState {
            current: cur,
            me: "http://127.0.0.1:1",
            commit,
            lead_from: 5,
            fixed_quorum: false,
        }
    }

    #[test]
    fn changes_are_one_member_at_a_time_with_every_refusal() {
        let cur = InEffect {
            index: 3,
            config: cfg(&[1, 2, 3], &[4]),
        };
        let st = state(&cur, 10);
        let none = |_: &str| 0;
        let full = |_: &str| 10;
        assert_eq!(
            check_change(&st, &Action::AddLearner(u(5)), none),
            Ok(cfg(&[1, 2, 3], &[4, 5]))
        );
        assert_eq!(
            check_change(&st, &Action::AddLearner(u(2)), none),
            Err(ChangeRefusal::AlreadyMember(u(2)))
        );
        assert_eq!(
            check_change(&st, &Action::Promote(u(4)), full),
            Ok(cfg(&[1, 2, 3, 4], &[]))
        );
        assert_eq!(
            check_change(&st, &Action::Promote(u(4)), |_| 9),
            Err(ChangeRefusal::LearnerBehind {
                url: u(4),
                match_index: 9,
                commit: 10
            })
        );
        assert_eq!(
            check_change(&st, &Action::Promote(u(2)), full),
            Err(ChangeRefusal::NotLearner(u(2)))
        );
        assert_eq!(
            check_change(&st, &Action::Promote(u(9)), full),
            Err(ChangeRefusal::NotMember(u(9)))
        );
        assert_eq!(
            check_change(&st, &Action::Remove(u(9)), full),
            Err(ChangeRefusal::NotMember(u(9)))
        );
        assert_eq!(
            check_change(&st, &Action::Remove(u(1)), full),
            Err(ChangeRefusal::RemoveSelf)
        );
        assert_eq!(
            check_change(&st, &Action::Remove(u(2)), full),
            Ok(cfg(&[1, 3], &[4]))
        );
        assert_eq!(
            check_change(&st, &Action::Remove(u(4)), full),
            Ok(cfg(&[1, 2, 3], &[]))
        );
        // Not committed: the configuration, or this epoch's no-op.
        let in_progress = |commit| {
            matches!(
                check_change(&state(&cur, commit), &Action::AddLearner(u(5)), none),
                Err(ChangeRefusal::InProgress { .. })
            )
        };
        assert!(in_progress(2), "configuration not committed");
        assert!(in_progress(4), "no-op not committed");
        assert!(!in_progress(5));
        let fixed = ChangeState {
            fixed_quorum: true,
            ..st.clone()
        };
        assert_eq!(
            check_change(&fixed, &Action::AddLearner(u(5)), none),
            Err(ChangeRefusal::FixedQuorum)
        );
        // The last voter (not ourselves: a primary that is no voter).
        let lone = InEffect {
            index: 3,
            config: cfg(&[2], &[1]),
        };
        assert_eq!(
            check_change(&state(&lone, 10), &Action::Remove(u(2)), full),
            Err(ChangeRefusal::LastVoter(u(2)))
        );
        // The member cap.
        let big = InEffect {
            index: 0,
            config: Config {
                voters: (1..=64).map(u).collect(),
                learners: vec![],
            },
        };
        assert!(matches!(
            check_change(&state(&big, 10), &Action::AddLearner(u(99)), none),
            Err(ChangeRefusal::Invalid(_))
        ));
    }

    #[test]
    fn history_reverts_a_cut_suffix_and_survives_compaction() {
        let mut h = History::new(None);
        assert_eq!(h.newest(), None);
        h.push(4, cfg(&[1], &[2]));
        h.push(9, cfg(&[1, 2], &[]));
        h.push(12, cfg(&[1, 2], &[3]));
        assert_eq!(h.at(3), None);
        assert_eq!(h.at(10).map(|(i, _)| i), Some(9));
        h.truncate_from(12);
        assert_eq!(h.newest(), Some((9, &cfg(&[1, 2], &[]))));
        h.compact_to(10);
        assert_eq!(h.newest().map(|(i, _)| i), Some(9));
        h.push(15, cfg(&[1, 2], &[7]));
        h.compact_to(20);
        assert_eq!(h.at(20).map(|(i, _)| i), Some(15));
        assert_eq!(h.records.len(), 1);
    }
}
