//! Random sequences of set/delete/bulk/restart
//! against a real kvd give the same contents as a `BTreeMap` model.

use std::collections::BTreeMap;

use bytes::Bytes;
use kvstore_testkit::node::{self, client, field, http, status};
use kvstore_testkit::Kvd;
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use tempfile::TempDir;

/// A small key space, so sets, deletes and bulks keep hitting the same keys.
/// Some names exercise URL encoding on the way.
const KEYS: [&str; 6] = ["a", "b/c", "with space", "ünï", "d", "e%20f"];

#[derive(Debug, Clone)]
enum Step {
    Set(usize, Vec<u8>),
    Delete(usize),
    /// Distinct keys: the API does not define duplicates within one bulk.
    Bulk(BTreeMap<usize, Vec<u8>>),
    /// SIGKILL (`kill`) or SIGTERM, then start again on the same data dir.
    Restart {
        kill: bool,
    },
}

fn value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        // Text, including the empty value.
        "[a-z0-9 ]{0,12}".prop_map(String::into_bytes),
        // Arbitrary bytes: bulk sends these as base64.
        vec(any::<u8>(), 0..12),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    let key = 0..KEYS.len();
    prop_oneof![
        4 => (key.clone(), value()).prop_map(|(k, v)| Step::Set(k, v)),
        2 => key.clone().prop_map(Step::Delete),
        2 => btree_map(key, value(), 1..=KEYS.len()).prop_map(Step::Bulk),
        1 => any::<bool>().prop_map(|kill| Step::Restart { kill }),
    ]
}

/// Every key of the key space reads back as the model says, and the node
/// counts exactly the model's keys.
async fn check(
    c: &kvclient::Client,
    http: &reqwest::Client,
    kvd: &Kvd,
    model: &BTreeMap<usize, Vec<u8>>,
    when: &str,
) -> Result<(), TestCaseError> {
    for (i, key) in KEYS.iter().enumerate() {
        let got = c
            .get(key)
            .await
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(
            got.as_deref(),
            model.get(&i).map(Vec::as_slice),
            "{}: key {:?}",
            when,
            key
        );
    }
    let s = status(http, kvd).await;
    prop_assert_eq!(
        field(&s, "keys"),
        model.len() as u64,
        "{}: status keys",
        when
    );
    Ok(())
}

async fn run(steps: Vec<Step>) -> Result<(), TestCaseError> {
    let tmp = TempDir::new().unwrap();
    let mut kvd = node::start(&tmp, &[]);
    let c = client(&kvd);
    let http = http();
    let mut model: BTreeMap<usize, Vec<u8>> = BTreeMap::new();

    for (n, step) in steps.iter().enumerate() {
        match step {
            Step::Set(k, v) => {
                c.set(KEYS[*k], v.clone()).await.unwrap();
                model.insert(*k, v.clone());
            }
            Step::Delete(k) => {
                let out = c.delete(KEYS[*k]).await.unwrap();
                let existed = model.remove(k).is_some();
                prop_assert_eq!(out.deleted, existed, "step {}: delete's deleted flag", n);
            }
            Step::Bulk(items) => {
                let pairs: Vec<(String, Bytes)> = items
                    .iter()
                    .map(|(k, v)| (KEYS[*k].to_string(), Bytes::from(v.clone())))
                    .collect();
                c.bulk_set(&pairs).await.unwrap();
                model.extend(items.iter().map(|(k, v)| (*k, v.clone())));
            }
            Step::Restart { kill } => {
                if *kill {
                    kvd.kill9().unwrap();
                } else {
                    let exit = kvd.terminate().unwrap();
                    prop_assert!(exit.success(), "SIGTERM exit status {}", exit);
                }
                node::restart(&mut kvd);
                check(
                    &c,
                    &http,
                    &kvd,
                    &model,
                    &format!("after restart at step {n}"),
                )
                .await?;
            }
        }
    }
    check(&c, &http, &kvd, &model, "at the end").await
}

proptest! {
    // Each case starts real processes; a couple of dozen keep the suite fast
    // while still mixing every operation with both kinds of restart.
    #![proptest_config(ProptestConfig {
        cases: 24,
        max_shrink_iters: 100,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_operations_match_a_model_map(steps in vec(step(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(run(steps))?;
    }
}
