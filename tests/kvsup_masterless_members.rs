//! A masterless cluster run by kvsup grows from 3 nodes to 4 and back by
//! editing its manifest, under 16 writers: every node ends with every
//! acknowledged write and the same digest, and the removed node's peers
//! no longer hold it in their sets.

use std::sync::Arc;
use std::time::Duration;

use kvstore_testkit::sup::{manifest_text, Supervised};
use kvstore_testkit::sup_change::{
    assert_nothing_lost, events, kvsup, manifest, node_urls, wait_change_over, Load,
};
use kvstore_testkit::{free_port, http_get, wait_until};
use serde_json::Value;
use tempfile::TempDir;

const EXTRA: &str = "  mode: masterless\n";

/// Applies node list `nodes` and waits for the change to be done.
async fn change_nodes(c: &Arc<Supervised>, name: &str, nodes: &[(String, u16)]) -> Value {
    let m = manifest(c, name, &manifest_text("test", nodes, c.sup_port, EXTRA));
    let (ok, out) = kvsup(c, &["apply", "-f", &m]).await;
    assert!(ok && out.contains("spec.nodes:"), "{out}");
    let st = wait_change_over(c, Duration::from_secs(180));
    assert_eq!(st["change"]["state"], "done", "{st:#}\n{}", events(c));
    c.wait_ready(Duration::from_secs(60)).unwrap()
}

/// The peer set node `port` runs with now.
fn peers_of(port: u16) -> Vec<String> {
    let (code, body) = http_get(port, "/v1/admin/peers", Duration::from_secs(2)).unwrap();
    assert_eq!(code, 200);
    let v: Value = serde_json::from_slice(&body).unwrap();
    serde_json::from_value(v["peers"].clone()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_masterless_cluster_grows_to_four_and_back_with_equal_digests() {
    let tmp = TempDir::new().unwrap();
    let c = Arc::new(Supervised::apply(tmp.path(), 3, EXTRA).unwrap());
    let mut nodes = c.nodes.clone();
    let load = Load::start(&c, 16);
    load.more(100).await;

    let n3 = ("n3".to_string(), free_port());
    nodes.push(n3.clone());
    let st = change_nodes(&c, "four.yaml", &nodes).await;
    assert_eq!(st["nodes"].as_array().unwrap().len(), 4, "{st:#}");
    for (name, port) in &nodes {
        assert_eq!(peers_of(*port).len(), 3, "{name}'s peers");
    }
    load.more(100).await;

    // The first node leaves: the others drop it from their sets.
    let (gone, gone_port) = nodes.remove(0);
    let st = change_nodes(&c, "three.yaml", &nodes).await;
    assert_eq!(st["nodes"].as_array().unwrap().len(), 3, "{st:#}");
    let gone_url = format!("http://127.0.0.1:{gone_port}");
    for (name, port) in &nodes {
        let peers = peers_of(*port);
        assert!(!peers.contains(&gone_url), "{name}: {peers:?}");
        assert_eq!(peers.len(), 2, "{name}: {peers:?}");
    }
    assert!(
        wait_until(Duration::from_secs(10), || http_get(
            gone_port,
            "/health",
            Duration::from_millis(500)
        )
        .is_err()),
        "{gone} still answers after its removal"
    );
    load.more(100).await;
    let (acked, failed, pause) = load.finish().await;
    assert_eq!(node_urls(&c).len(), 3);
    // Every remaining node holds every acknowledged write (n3 included,
    // which joined with none of the first ones), and their digests agree.
    assert_nothing_lost(&c, &acked).await;
    let metrics = c.metrics().unwrap();
    for kind in ["add_node", "remove_node"] {
        let line = format!("kvsup_changes_total{{kind=\"{kind}\",result=\"ok\"}} 1");
        assert!(metrics.contains(&line), "{line} missing:\n{metrics}");
    }
    eprintln!(
        "masterless 3 -> 4 -> 3: {} writes acknowledged, {failed} failed, longest pause {} ms",
        acked.len(),
        pause.as_millis()
    );
}
