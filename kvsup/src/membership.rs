//! What a node change asks of the cluster next: pure decisions from the
//! configuration in effect on the primary (primary/secondary) or from the
//! node list (masterless). The daemon (`daemon/members.rs`) reads the
//! configuration, acts on the step, and reads it again, so that a retried
//! or resumed change never repeats a step that already took effect.

use kvproto::admin::{Members, MembersRequest};

/// The next step of a node change in a primary/secondary cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberStep {
    /// The configuration is what the change wants, and committed.
    Done,
    /// It is, but not committed yet: look again shortly.
    Wait,
    /// Add the node as a learner.
    AddLearner,
    /// Make the learner a voter (once it has caught up).
    Promote,
    /// Take the node out of the configuration.
    Remove,
}

impl MemberStep {
    /// The members request for this step on node `url`; none for
    /// [`MemberStep::Done`] and [`MemberStep::Wait`].
    pub fn request(self, url: &str) -> Option<MembersRequest> {
        let url = Some(url.to_string());
        match self {
            MemberStep::Done | MemberStep::Wait => None,
            MemberStep::AddLearner => Some(MembersRequest {
                add_learner: url,
                ..MembersRequest::default()
            }),
            MemberStep::Promote => Some(MembersRequest {
                promote: url,
                ..MembersRequest::default()
            }),
            MemberStep::Remove => Some(MembersRequest {
                remove: url,
                ..MembersRequest::default()
            }),
        }
    }
}

/// Adding node `url`: a learner first, then a voter.
pub fn add_step(url: &str, m: &Members) -> MemberStep {
    let voter = m.voters.iter().any(|v| v == url);
    let learner = m.learners.iter().any(|l| l == url);
    match (voter, learner, m.committed) {
        (true, _, true) => MemberStep::Done,
        (true, _, false) => MemberStep::Wait,
        // A change is committed before the next may be asked for.
        (false, true, false) => MemberStep::Wait,
        (false, true, true) => MemberStep::Promote,
        (false, false, _) => MemberStep::AddLearner,
    }
}

/// Removing node `url`, voter or learner.
pub fn remove_step(url: &str, m: &Members) -> MemberStep {
    let member = m.voters.iter().chain(&m.learners).any(|u| u == url);
    match (member, m.committed) {
        (true, _) => MemberStep::Remove,
        (false, true) => MemberStep::Done,
        (false, false) => MemberStep::Wait,
    }
}

/// A node as the choice of whom to hand the primary to sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub name: String,
    /// Running, answering and ready.
    pub healthy: bool,
    /// A voter of its configuration in effect (a learner cannot lead).
    pub voter: bool,
}

/// Whom the primary hands over to before node `removing` (the primary)
/// leaves: the first healthy voter in list order that is not it.
pub fn handover_target<'a>(removing: &str, nodes: &'a [Candidate]) -> Option<&'a str> {
    nodes
        .iter()
        .find(|n| n.name != removing && n.healthy && n.voter)
        .map(|n| n.name.as_str())
}

/// Masterless: the peer set each of `urls` is given (every other one of
/// them), in list order.
pub fn peer_sets(urls: &[String]) -> Vec<(String, Vec<String>)> {
    urls.iter()
        .map(|me| {
            let peers = urls.iter().filter(|u| *u != me).cloned().collect();
            (me.clone(), peers)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const U: &str = "http://127.0.0.1:9003";

    fn members(voters: &[&str], learners: &[&str], committed: bool) -> Members {
        Members {
            committed,
            index: 7,
            voters: voters.iter().map(|s| s.to_string()).collect(),
            learners: learners.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn an_added_node_is_a_learner_first_then_a_voter() {
        let a = "http://127.0.0.1:9000";
        assert_eq!(
            add_step(U, &members(&[a], &[], true)),
            MemberStep::AddLearner
        );
        assert_eq!(add_step(U, &members(&[a], &[U], false)), MemberStep::Wait);
        assert_eq!(add_step(U, &members(&[a], &[U], true)), MemberStep::Promote);
        assert_eq!(add_step(U, &members(&[a, U], &[], false)), MemberStep::Wait);
        assert_eq!(add_step(U, &members(&[a, U], &[], true)), MemberStep::Done);
    }

    #[test]
    fn a_removed_node_leaves_as_voter_or_learner_and_is_done_once_committed() {
        let a = "http://127.0.0.1:9000";
        assert_eq!(
            remove_step(U, &members(&[a, U], &[], true)),
            MemberStep::Remove
        );
        assert_eq!(
            remove_step(U, &members(&[a], &[U], true)),
            MemberStep::Remove
        );
        assert_eq!(remove_step(U, &members(&[a], &[], false)), MemberStep::Wait);
        assert_eq!(remove_step(U, &members(&[a], &[], true)), MemberStep::Done);
    }

    #[test]
    fn each_step_asks_for_exactly_its_action() {
        let r = MemberStep::Promote.request(U).unwrap();
        assert_eq!(
            (r.promote.as_deref(), r.add_learner, r.remove),
            (Some(U), None, None)
        );
        assert!(MemberStep::Done.request(U).is_none());
        assert!(MemberStep::Wait.request(U).is_none());
        let r = MemberStep::Remove.request(U).unwrap();
        assert_eq!(r.remove.as_deref(), Some(U));
    }

    #[test]
    fn the_primary_hands_over_to_a_healthy_voter_never_a_learner() {
        let c = |name: &str, healthy, voter| Candidate {
            name: name.into(),
            healthy,
            voter,
        };
        let nodes = [
            c("n0", true, true),
            c("n1", false, true),
            c("n3", true, false),
            c("n2", true, true),
        ];
        assert_eq!(handover_target("n0", &nodes), Some("n2"));
        assert_eq!(handover_target("n2", &nodes), Some("n0"));
        assert_eq!(handover_target("n0", &nodes[..3]), None);
    }

    #[test]
    fn every_masterless_node_gets_all_the_others() {
        let urls: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let sets = peer_sets(&urls);
        assert_eq!(sets[1], ("b".into(), vec!["a".into(), "c".into()]));
        assert_eq!(sets.len(), 3);
    }
}
