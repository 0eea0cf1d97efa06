//! `GET /v1/admin/members` and `POST /v1/admin/members` (docs/DESIGN.md
//! §4.11): the configuration in effect, and one membership change at a
//! time on the primary (the decision is `replication::config`).

use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use kvproto::admin::MembersRequest;
use kvproto::code;

use super::query::{NoParams, Params};
use super::{read_body, ApiError, Shared};
use crate::node::Runtime;
use crate::replication::config::{self, Action, ChangeRefusal};
use crate::replication::node::{MembersError, Replicator};
use crate::storage::Op;

/// A members request body is a few URLs: far below this.
const MAX_BODY_BYTES: usize = 4 << 10;
/// The commit wait a request may ask for, at most.
const MAX_TIMEOUT_MS: u64 = 600_000;

/// The primary/secondary runtime, or 409 `masterless` / `no_peers`.
fn replicator(st: &Shared) -> Result<std::sync::Arc<Replicator>, ApiError> {
    match st.node.runtime() {
        Runtime::PrimarySecondary(r) => Ok(r),
        Runtime::Masterless(_) => Err(ApiError::new(
            StatusCode::CONFLICT,
            code::MASTERLESS,
            "this node is in masterless mode: its membership is not a replicated configuration",
        )),
        Runtime::Single | Runtime::Switching => Err(ApiError::new(
            StatusCode::CONFLICT,
            code::NO_PEERS,
            "this node runs alone (no --peers): it has no cluster configuration; \
             start it with --peers to change membership",
        )),
    }
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::bad_request(code::INVALID_MEMBER, message)
}

/// The one action of a request, its URL normalized and checked.
pub fn parse_action(raw: &[u8]) -> Result<(Action, Option<u64>), ApiError> {
    let bad = |e: serde_json::Error| invalid(format!("bad members request: {e}"));
    let value: serde_json::Value = serde_json::from_slice(raw).map_err(bad)?;
    // `null` would read as absence: a field is given with a value or left out.
    let null = value
        .as_object()
        .and_then(|m| m.iter().find(|(_, v)| v.is_null()));
    if let Some((field, _)) = null {
        return Err(invalid(format!(
            "{field} is null: give a value or leave it out"
        )));
    }
    let req: MembersRequest = serde_json::from_value(value).map_err(bad)?;
    let mut actions = Vec::new();
    if let Some(u) = req.add_learner {
        actions.push(Action::AddLearner(config::normalize(&u)));
    }
    if let Some(u) = req.promote {
        actions.push(Action::Promote(config::normalize(&u)));
    }
    if let Some(u) = req.remove {
        actions.push(Action::Remove(config::normalize(&u)));
    }
    let [action] = <[Action; 1]>::try_from(actions).map_err(|a| {
        invalid(format!(
            "exactly one of add_learner, promote, remove is needed, not {}",
            a.len()
        ))
    })?;
    config::check_url(action.url()).map_err(invalid)?;
    if req.timeout_ms == Some(0) || req.timeout_ms.is_some_and(|t| t > MAX_TIMEOUT_MS) {
        return Err(invalid(format!("timeout_ms must be 1..={MAX_TIMEOUT_MS}")));
    }
    Ok((action, req.timeout_ms))
}

fn refused(e: ChangeRefusal) -> ApiError {
    let code = match &e {
        ChangeRefusal::FixedQuorum => code::FIXED_QUORUM,
        ChangeRefusal::InProgress { .. } => code::CONFIG_CHANGE_IN_PROGRESS,
        ChangeRefusal::AlreadyMember(_) => code::ALREADY_MEMBER,
        ChangeRefusal::NotMember(_) => code::NOT_MEMBER,
        ChangeRefusal::NotLearner(_) => code::NOT_LEARNER,
        ChangeRefusal::LearnerBehind { .. } => code::LEARNER_BEHIND,
        ChangeRefusal::RemoveSelf => code::REMOVE_SELF,
        ChangeRefusal::LastVoter(_) => code::LAST_VOTER,
        ChangeRefusal::Invalid(_) => return invalid(e.to_string()),
    };
    ApiError::new(StatusCode::CONFLICT, code, e.to_string())
}

/// `GET /v1/admin/members` on any primary/secondary node.
pub async fn show(State(st): State<Shared>, _: Params<NoParams>) -> Result<Response, ApiError> {
    Ok(Json(replicator(&st)?.members()).into_response())
}

/// `POST /v1/admin/members` on the primary: appends the configuration
/// with one member changed and waits for its commit.
pub async fn change(
    State(st): State<Shared>,
    uri: Uri,
    _: Params<NoParams>,
    body: Body,
) -> Result<Response, ApiError> {
    let raw = read_body(&st, body, MAX_BODY_BYTES, "members request").await?;
    let (action, timeout_ms) = parse_action(&raw)?;
    let r = replicator(&st)?;
    // A secondary points at the primary (307), as for any write.
    st.check_primary(&uri)?;
    let (next, _one_at_a_time) = r.plan_change(&action).await.map_err(|e| match e {
        MembersError::NotPrimary => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            code::NO_PRIMARY,
            "this node stopped being the primary; retry at the new one",
        )
        .retry_after(1),
        MembersError::Refused(why) => refused(why),
    })?;
    let timeout = timeout_ms.map_or(st.node.commit_timeout(), Duration::from_millis);
    tracing::info!(node = %st.node.node_id(), ?action, voters = ?next.voters, learners = ?next.learners, "appending a new configuration");
    // In effect once appended; a commit timeout leaves it so (503).
    st.node
        .write_within(Op::Config { config: next }, timeout)
        .await?;
    Ok(Json(r.members()).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code_of(raw: &str) -> Option<&'static str> {
        parse_action(raw.as_bytes()).err().map(|e| e.code)
    }

    #[test]
    fn a_request_is_exactly_one_well_formed_action() {
        let (a, t) = parse_action(br#"{"add_learner":"http://127.0.0.1:9/"}"#).unwrap();
        assert_eq!(a, Action::AddLearner("http://127.0.0.1:9".into()));
        assert_eq!(t, None);
        let (a, t) = parse_action(br#"{"remove":"http://a:1","timeout_ms":5}"#).unwrap();
        assert_eq!(a, Action::Remove("http://a:1".into()));
        assert_eq!(t, Some(5));
        for bad in [
            "",
            "{}",
            "[]",
            r#"{"promote":"http://a:1","remove":"http://a:1"}"#,
            r#"{"add_learner":"a:1"}"#,
            r#"{"add_learner":"http://a:1/x"}"#,
            r#"{"add_learner":"http://a:1","extra":1}"#,
            r#"{"add_learner":"http://a:1","timeout_ms":0}"#,
            r#"{"add_learner":7}"#,
            r#"{"add_learner":"http://a:1","timeout_ms":null}"#,
        ] {
            assert_eq!(code_of(bad), Some(code::INVALID_MEMBER), "{bad}");
        }
    }
}
