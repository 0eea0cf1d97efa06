//! Crash model of `meta`: a node's epoch and vote, persisted through the
//! `Fs` seam, over the simulated disk that loses power at a chosen moment
//! (see `sim` for what a crash leaves on disk).
//!
//! Proves, over many seeded crash points (several power cuts per seed, the
//! node rebooting after each): a node that answered "granted" to a
//! candidate in epoch E never grants a vote in E to another candidate, and
//! the epoch it answers in never goes back; it boots after every crash.
//! After each reboot every candidate asks again for the newest epoch the
//! node granted, so a lost vote is asked about, not merely possible.
//!
//! The voter takes the steps of the replication runtime's vote handler
//! (`replication::node`, `handle_vote` and `enter_epoch`) with the same
//! functions: `vote_step` decides and says what `meta` to persist,
//! [`MetaStore::store`] persists it, and only then is the answer sent; an
//! epoch learned from a primary (`adopted`) is persisted, with no vote,
//! before it is acted on.

mod sim;

use std::collections::BTreeMap;
use std::sync::Arc;

use kvd::replication::node::{adopted, vote_step};
use kvd::replication::rules::{LogPos, VoteRequest};
use kvd::storage::{Error, Meta, MetaStore};
use kvproto::Mode;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sim::SimFs;

const DATA_DIR: &str = "/sim/data";
const CANDIDATES: [&str; 3] = ["n1", "n2", "n3"];

/// The node under test: its `meta`, as read at boot and kept since.
struct Voter {
    store: MetaStore,
    meta: Meta,
}

impl Voter {
    /// Boots on `fs`: reads `meta`, or creates it for a fresh data dir.
    fn boot(fs: &SimFs) -> Result<Voter, Error> {
        let store = MetaStore::new(Arc::new(fs.clone()), DATA_DIR);
        let (meta, _) = store.load_or_init("n0", Mode::PrimarySecondary)?;
        Ok(Voter { store, meta })
    }

    /// Answers `req` (whether the vote is granted), or fails with nothing
    /// answered when persisting the decision failed.
    fn vote(&mut self, req: &VoteRequest) -> Result<bool, Error> {
        let (decision, next) = vote_step(&self.meta, LogPos::ZERO, req);
        if let Some(next) = next {
            self.persist(next)?;
        }
        Ok(decision.granted)
    }

    /// A primary of `epoch` was seen: a newer epoch is adopted, with no
    /// vote, before anything else happens.
    fn adopt(&mut self, epoch: u64) -> Result<(), Error> {
        if epoch <= self.meta.epoch {
            return Ok(());
        }
        let next = adopted(&self.meta, epoch);
        self.persist(next)
    }

    fn persist(&mut self, next: Meta) -> Result<(), Error> {
        self.store.store(&next)?;
        self.meta = next;
        Ok(())
    }
}

/// What the rest of the cluster has heard from the node, across its
/// crashes: the grants it answered and the newest epoch it answered in.
#[derive(Default)]
struct Heard {
    granted: BTreeMap<u64, String>,
    newest_epoch: u64,
    /// Reboots after which a candidate other than the one granted asked
    /// for the newest granted epoch while the node was still in it.
    contested_probes: u64,
}

impl Heard {
    /// Records an answer the node sent in `epoch`; panics if it breaks a
    /// promise made before.
    fn answered(&mut self, what: &str, epoch: u64, candidate: &str, granted: bool) {
        assert!(
            epoch >= self.newest_epoch,
            "{what}: the node answered in epoch {} and later in epoch {epoch}: \
             it went back to an older epoch",
            self.newest_epoch
        );
        self.newest_epoch = epoch;
        if !granted {
            return;
        }
        let first = self
            .granted
            .entry(epoch)
            .or_insert_with(|| candidate.into());
        assert_eq!(
            first, candidate,
            "{what}: the node granted its vote in epoch {epoch} to {first} and then to \
             {candidate}: two votes in one epoch"
        );
    }
}

/// One random event: a vote request (sometimes a pre-vote, for the current
/// epoch or a newer or older one), or a primary's epoch seen.
fn step(rng: &mut StdRng, voter: &mut Voter, heard: &mut Heard, what: &str) -> Result<(), Error> {
    let epoch = (voter.meta.epoch + rng.gen_range(0..3)).saturating_sub(rng.gen_range(0..2));
    if rng.gen_bool(0.15) {
        voter.adopt(epoch)?;
        heard.answered(what, voter.meta.epoch, "", false);
        return Ok(());
    }
    let candidate = CANDIDATES[rng.gen_range(0..CANDIDATES.len())];
    let req = VoteRequest {
        epoch,
        candidate: candidate.into(),
        last: LogPos::ZERO,
        pre_vote: rng.gen_bool(0.2),
    };
    let granted = voter.vote(&req)?;
    // A pre-vote is answered as the vote would be, but promises nothing.
    if !req.pre_vote {
        heard.answered(what, voter.meta.epoch, candidate, granted);
    }
    Ok(())
}

/// After a reboot: every candidate asks for the newest epoch the node has
/// granted (only the one it granted may get it).
fn probe(voter: &mut Voter, heard: &mut Heard, what: &str) {
    let Some((&epoch, winner)) = heard.granted.iter().next_back() else {
        return;
    };
    if voter.meta.epoch == epoch {
        heard.contested_probes += 1;
    }
    let winner = winner.clone();
    for candidate in CANDIDATES {
        let req = VoteRequest {
            epoch,
            candidate: candidate.into(),
            last: LogPos::ZERO,
            pre_vote: false,
        };
        let granted = voter
            .vote(&req)
            .unwrap_or_else(|e| panic!("{what}: the disk works again, yet: {e}"));
        if granted {
            assert_eq!(
                candidate, winner,
                "{what}: the node granted its vote in epoch {epoch} to {winner} and, after \
                 the crash, to {candidate}: two votes in one epoch"
            );
        }
        heard.answered(what, voter.meta.epoch, candidate, granted);
    }
}

/// Power cuts per seed: the node reboots after each and carries on.
const CRASHES_PER_SEED: u64 = 4;

/// Runs one seed: events until the power fails, reboot, check, again.
fn crash_seed(seed: u64, heard: &mut Heard) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut fs = SimFs::default();
    for round in 0..CRASHES_PER_SEED {
        // Each persisted decision costs five operations (create, write,
        // fsync, rename, directory fsync): this reaches every one of them
        // for the first decisions, and a few dozen decisions in.
        let crash_at = rng.gen_range(0..120);
        let what = format!("seed {seed}, power cut {round} at operation {crash_at}");
        fs.crash_after(crash_at);
        if let Ok(mut voter) = Voter::boot(&fs) {
            while step(&mut rng, &mut voter, heard, &what).is_ok() {}
        }
        assert!(
            fs.crashed(),
            "{what}: the events stopped before the power failed"
        );
        fs = fs.reboot(&mut rng).0;
        let mut voter = Voter::boot(&fs)
            .unwrap_or_else(|e| panic!("{what}: the node does not boot after the crash: {e}"));
        heard.answered(&what, voter.meta.epoch, "", false);
        probe(&mut voter, heard, &what);
    }
}

#[test]
fn a_vote_granted_before_a_crash_is_never_granted_again_to_another() {
    let mut contested = 0;
    for seed in 0..3000 {
        let mut heard = Heard::default();
        crash_seed(seed, &mut heard);
        contested += heard.contested_probes;
    }
    // Evidence that the property was put to the test: reboots that found
    // the node still in an epoch it had granted, which others then asked for.
    assert!(
        contested >= 5000,
        "too few reboots into a granted epoch to prove anything: {contested}"
    );
}
