//! Kubernetes objects for a manifest: the nodes as a StatefulSet behind a
//! headless Service, a PodDisruptionBudget, the credentials as Secrets, the
//! manifest kvsup reads in the cluster as a ConfigMap, and kvsup as a
//! one-replica Deployment. Pure: manifest, options and the credentials'
//! file contents in, objects out (serde values, emitted as YAML).
//!
//! The StatefulSet's pods share one template, but each node has its own
//! kvd command line. The template's command is a `sh -c` script that picks
//! the line of the pod's node by `$HOSTNAME` (a StatefulSet pod's host name
//! is its pod name, `<cluster>-<i>`), each line exactly
//! [`launch::kvd_args`] of that node: one visible script, no second copy of
//! the flag logic, and the image needs nothing but a POSIX `sh`.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

use crate::creds::Layout;
use crate::launch::{self, Start};
use crate::manifest::{Manifest, Runtime};

/// The state dir inside every pod: a node's PVC is mounted there (its data
/// dir `<stateDir>/<node>/data` is on it), kvsup's pod has an emptyDir
/// there, and the credentials are mounted at `<stateDir>/creds` in both.
pub const STATE_DIR: &str = "/var/lib/kvstore";

/// Where kvsup's pod finds the manifest (the ConfigMap's mount).
pub const MANIFEST_DIR: &str = "/etc/kvstore";
pub const MANIFEST_FILE: &str = "cluster.yaml";

/// Where the image holds the binaries.
pub const KVD: &str = "/usr/local/bin/kvd";
pub const KVSUP: &str = "/usr/local/bin/kvsup";

/// Each node's volume claim.
pub const STORAGE: &str = "10Gi";

/// Mode of every mounted credential file: kvsup refuses a secret readable
/// by group or others. 0o600.
const SECRET_MODE: u32 = 0o600;

#[derive(Debug, Clone)]
pub struct Options {
    pub namespace: String,
    pub image: String,
}

/// The names the nodes must have: the StatefulSet (and its Service) is
/// named after the cluster, so its pod `i` is `<cluster>-<i>`, reached at
/// `<cluster>-<i>.<cluster>.<namespace>.svc.cluster.local` (or the same
/// without `.cluster.local`). All nodes share one port (the pod template
/// has one). Refused otherwise, with the node list to write.
pub fn check_nodes(m: &Manifest, ns: &str) -> Result<(), String> {
    check_dns_label("namespace", ns)?;
    let sts = &m.metadata.name;
    let port = m.spec.nodes[0].port;
    let wrong = m.spec.nodes.iter().enumerate().find(|(i, n)| {
        let pod = format!("{sts}-{i}");
        let long = format!("{pod}.{sts}.{ns}.svc.cluster.local");
        let short = format!("{pod}.{sts}.{ns}.svc");
        let at = n.address.as_deref().unwrap_or("");
        n.name != pod || (at != long && at != short) || n.port != port
    });
    let Some((i, n)) = wrong else {
        return Ok(());
    };
    let want: Vec<String> = (0..m.spec.nodes.len())
        .map(|i| {
            format!(
                "    - {{name: {sts}-{i}, port: {port}, address: \
                 {sts}-{i}.{sts}.{ns}.svc.cluster.local, runtime: external}}"
            )
        })
        .collect();
    Err(format!(
        "spec.nodes[{i}] ({} at {}:{}) is not pod {i} of StatefulSet {sts:?} in namespace \
         {ns:?}: node i must be named {sts}-i, have the address of its pod in the headless \
         Service {sts:?}, and every node the same port; write the nodes as\n  nodes:\n{}",
        n.name,
        n.host(),
        n.port,
        want.join("\n")
    ))
}

fn check_dns_label(what: &str, s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} {s:?} must be 1 to 63 of a-z, 0-9 and '-', not starting or ending with '-'"
        ))
    }
}

/// The manifest as kvsup in the cluster reads it: its state dir is the
/// pod's, and every node is external (the StatefulSet runs them).
pub fn in_cluster_manifest(m: &Manifest) -> Manifest {
    let mut m = m.clone();
    m.spec.state_dir = STATE_DIR.into();
    for n in &mut m.spec.nodes {
        n.runtime = Runtime::External;
    }
    m
}

/// Every object, in the order `kubectl apply` should create them. `creds`
/// holds the credential files by name (`ca.pem`, `n0.key`, ...) when the
/// manifest says `tls: auto`.
pub fn objects(
    m: &Manifest,
    o: &Options,
    creds: Option<&BTreeMap<String, String>>,
) -> Result<Vec<Value>, String> {
    check_nodes(m, &o.namespace)?;
    if o.image.trim().is_empty() {
        return Err("--image must name an image".into());
    }
    let inside = in_cluster_manifest(m);
    let text = serde_yaml_ng::to_string(&inside).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    if let Some(files) = creds {
        let (nodes, sup) = split_creds(m, files)?;
        out.push(secret(m, o, &node_secret(m), nodes));
        out.push(secret(m, o, &kvsup_secret(m), sup));
    }
    out.push(config_map(m, o, &text));
    out.push(service(m, o));
    out.push(stateful_set(&inside, o));
    out.push(disruption_budget(m, o));
    out.push(deployment(m, o));
    Ok(out)
}

/// The objects as one multi-document YAML stream.
pub fn to_yaml(objects: &[Value]) -> Result<String, String> {
    let mut out = String::new();
    for o in objects {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(o).map_err(|e| e.to_string())?);
    }
    Ok(out)
}

fn node_secret(m: &Manifest) -> String {
    format!("{}-node-creds", m.metadata.name)
}

fn kvsup_secret(m: &Manifest) -> String {
    format!("{}-kvsup-creds", m.metadata.name)
}

type Files = BTreeMap<String, String>;

/// The nodes' files (every node's certificate and key, the CA certificate,
/// the token file of hashes) and the rest, which only kvsup's pod mounts:
/// the two tokens' secrets and the CA key. No node needs a token's secret
/// or the CA key. kvsup never signs with the CA key either, but its daemon
/// checks that the whole set is there when it loads it.
fn split_creds(m: &Manifest, files: &Files) -> Result<(Files, Files), String> {
    let names: Vec<String> = m.spec.nodes.iter().map(|n| n.name.clone()).collect();
    let mut nodes = Files::new();
    let mut sup = Files::new();
    for name in Layout::names(&names) {
        let text = files
            .get(&name)
            .ok_or_else(|| format!("the credentials lack {name}"))?;
        let for_nodes = name == "ca.pem"
            || name == "tokens.json"
            || names
                .iter()
                .any(|n| name == format!("{n}.pem") || name == format!("{n}.key"));
        let into = if for_nodes { &mut nodes } else { &mut sup };
        into.insert(name, text.clone());
    }
    Ok((nodes, sup))
}

fn labels(m: &Manifest, component: &str) -> Value {
    json!({
        "app.kubernetes.io/name": "kvstore",
        "app.kubernetes.io/instance": m.metadata.name,
        "app.kubernetes.io/component": component,
    })
}

fn meta(m: &Manifest, o: &Options, name: &str, component: &str) -> Value {
    json!({"name": name, "namespace": o.namespace, "labels": labels(m, component)})
}

fn secret(m: &Manifest, o: &Options, name: &str, files: Files) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta(m, o, name, "credentials"),
        "type": "Opaque",
        "stringData": files,
    })
}

fn config_map(m: &Manifest, o: &Options, manifest: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta(m, o, &format!("{}-manifest", m.metadata.name), "supervisor"),
        "data": {MANIFEST_FILE: manifest},
    })
}

/// Headless, and publishing pods that are not ready: the nodes and kvsup
/// reach each node by its pod's DNS name also while it replays its WAL,
/// and while its storage refuses writes (`/ready` is 503 then, DESIGN
/// §2.3), when kvsup must still see it to fail it over.
fn service(m: &Manifest, o: &Options) -> Value {
    let port = m.spec.nodes[0].port;
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(m, o, &m.metadata.name, "node"),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": true,
            "selector": labels(m, "node"),
            "ports": [{"name": "kvd", "port": port, "targetPort": port}],
        },
    })
}

/// `/ready` and `/health` take no token (DESIGN §2.18) and no client
/// certificate; the kubelet does not check the server's certificate.
fn probe(path: &str, tls: bool, period: u32, failures: u32) -> Value {
    json!({
        "httpGet": {"path": path, "port": "kvd", "scheme": if tls { "HTTPS" } else { "HTTP" }},
        "periodSeconds": period,
        "timeoutSeconds": 2,
        "failureThreshold": failures,
    })
}

/// Dropped capabilities, no privilege escalation, a read-only root. Root
/// (uid 0) because the credential files of a Secret volume belong to root
/// and must be mode 0600 for kvsup; with an `fsGroup` they would be
/// group-readable and refused.
fn container_security() -> Value {
    json!({
        "runAsUser": 0,
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "capabilities": {"drop": ["ALL"]},
    })
}

/// The `sh -c` script of the node pods: `exec` of the pod's node's kvd line.
pub fn node_script(inside: &Manifest) -> String {
    let state = Path::new(STATE_DIR);
    let layout = inside.spec.tls_auto().then(|| Layout::in_state_dir(state));
    let mut s = String::from("case \"$HOSTNAME\" in\n");
    for n in &inside.spec.nodes {
        let data = launch::data_dir(state, &n.name);
        let args = launch::kvd_args(inside, n, &data, Start::Join, layout.as_ref());
        let line: Vec<String> = std::iter::once(KVD.to_string())
            .chain(args)
            .map(|a| sh_quote(&a))
            .collect();
        s.push_str(&format!("  {}) exec {} ;;\n", n.name, line.join(" ")));
    }
    s.push_str(&format!(
        "  *) echo \"pod $HOSTNAME is no node of cluster {}\" >&2; exit 1 ;;\nesac\n",
        inside.metadata.name
    ));
    s
}

/// One word for a POSIX shell: as is when it is plain, else single-quoted.
pub fn sh_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"@%+=:,./-_".contains(&b));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// The nodes: one pod each, started all at once (`Parallel`): they are
/// peers, not a chain; with `OrderedReady` a pod whose storage refuses
/// writes (never ready) would hold back every pod after it, and each pod
/// would wait out the one before it replaying its WAL.
fn stateful_set(inside: &Manifest, o: &Options) -> Value {
    let m = inside;
    let tls = m.spec.tls_auto();
    let port = m.spec.nodes[0].port;
    let mut mounts = vec![json!({"name": "data", "mountPath": STATE_DIR})];
    let mut volumes = Vec::new();
    if tls {
        mounts.push(json!({"name": "creds", "mountPath": creds_dir(), "readOnly": true}));
        volumes.push(json!({"name": "creds", "secret": {
            "secretName": node_secret(m), "defaultMode": SECRET_MODE}}));
    }
    json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": meta(m, o, &m.metadata.name, "node"),
        "spec": {
            "serviceName": m.metadata.name,
            "replicas": m.spec.nodes.len(),
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": labels(m, "node")},
            "template": {
                "metadata": {"labels": labels(m, "node")},
                "spec": {
                    "enableServiceLinks": false,
                    "terminationGracePeriodSeconds": 30,
                    "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{
                        "name": "kvd",
                        "image": o.image,
                        "command": ["/bin/sh", "-c", node_script(m)],
                        "ports": [{"name": "kvd", "containerPort": port}],
                        "readinessProbe": probe("/ready", tls, 2, 3),
                        "livenessProbe": probe("/health", tls, 10, 6),
                        // Recovery replays the WAL before kvd answers.
                        "startupProbe": probe("/health", tls, 2, 300),
                        "securityContext": container_security(),
                        "volumeMounts": mounts,
                    }],
                    "volumes": volumes,
                },
            },
            "volumeClaimTemplates": [{
                "metadata": {"name": "data"},
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "resources": {"requests": {"storage": STORAGE}},
                },
            }],
        },
    })
}

fn creds_dir() -> String {
    Layout::in_state_dir(Path::new(STATE_DIR))
        .dir
        .display()
        .to_string()
}

fn disruption_budget(m: &Manifest, o: &Options) -> Value {
    json!({
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": meta(m, o, &m.metadata.name, "node"),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels(m, "node")}},
    })
}

/// kvsup: one replica, and `Recreate` so that two never drive the nodes at
/// once. Its API listens on the pod's loopback only, so the liveness probe
/// is `kvsup status` inside the pod (which also proves the token works).
fn deployment(m: &Manifest, o: &Options) -> Value {
    let manifest = format!("{MANIFEST_DIR}/{MANIFEST_FILE}");
    let mut mounts = vec![
        json!({"name": "manifest", "mountPath": MANIFEST_DIR, "readOnly": true}),
        json!({"name": "state", "mountPath": STATE_DIR}),
    ];
    let mut volumes = vec![
        json!({"name": "manifest", "configMap": {"name": format!("{}-manifest", m.metadata.name)}}),
        json!({"name": "state", "emptyDir": {}}),
    ];
    if m.spec.tls_auto() {
        mounts.push(json!({"name": "creds", "mountPath": creds_dir(), "readOnly": true}));
        volumes.push(json!({"name": "creds", "projected": {
            "defaultMode": SECRET_MODE,
            "sources": [
                {"secret": {"name": node_secret(m)}},
                {"secret": {"name": kvsup_secret(m)}},
            ],
        }}));
    }
    let name = format!("{}-kvsup", m.metadata.name);
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta(m, o, &name, "supervisor"),
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": labels(m, "supervisor")},
            "template": {
                "metadata": {"labels": labels(m, "supervisor")},
                "spec": {
                    "enableServiceLinks": false,
                    "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{
                        "name": "kvsup",
                        "image": o.image,
                        "command": [KVSUP, "apply", "--foreground", "-f", manifest, "--kvd", KVD],
                        "livenessProbe": {
                            "exec": {"command": [KVSUP, "status", "-f", manifest]},
                            "initialDelaySeconds": 10,
                            "periodSeconds": 30,
                            "timeoutSeconds": 10,
                        },
                        "securityContext": container_security(),
                        "volumeMounts": mounts,
                    }],
                    "volumes": volumes,
                },
            },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(ns: &str, extra: &str) -> Manifest {
        let node = |i: u32| {
            format!(
                "    - {{name: kv-{i}, port: 7001, address: kv-{i}.kv.{ns}.svc.cluster.local, \
                 runtime: external}}\n"
            )
        };
        let text = format!(
            "apiVersion: kvstore/v1\nkind: Cluster\nmetadata: {{name: kv}}\nspec:\n  \
             stateDir: /srv/kv\n  nodes:\n{}{}{}{extra}",
            node(0),
            node(1),
            node(2)
        );
        Manifest::parse(&text, "m").unwrap()
    }

    fn opts() -> Options {
        Options {
            namespace: "prod".into(),
            image: "kvstore:1".into(),
        }
    }

    fn creds(m: &Manifest) -> Files {
        let names: Vec<String> = m.spec.nodes.iter().map(|n| n.name.clone()).collect();
        Layout::names(&names)
            .into_iter()
            .map(|n| (n.clone(), format!("<{n}>")))
            .collect()
    }

    fn kind<'a>(objs: &'a [Value], k: &str) -> Vec<&'a Value> {
        objs.iter().filter(|o| o["kind"] == k).collect()
    }

    #[test]
    fn nodes_must_be_the_pods_of_the_stateful_set_and_the_error_says_what_to_write() {
        let m = manifest("prod", "  tls: auto\n");
        assert!(check_nodes(&m, "prod").is_ok());
        let e = check_nodes(&m, "default").unwrap_err();
        assert!(e.starts_with("spec.nodes[0]"), "{e}");
        assert!(
            e.contains("- {name: kv-2, port: 7001, address: kv-2.kv.default.svc.cluster.local"),
            "{e}"
        );
        let mut short = m.clone();
        short.spec.nodes[1].address = Some("kv-1.kv.prod.svc".into());
        assert!(check_nodes(&short, "prod").is_ok());
        let mut swapped = m.clone();
        swapped.spec.nodes.swap(0, 1);
        assert!(check_nodes(&swapped, "prod").is_err());
        let mut port = m.clone();
        port.spec.nodes[2].port = 7002;
        assert!(check_nodes(&port, "prod")
            .unwrap_err()
            .starts_with("spec.nodes[2]"));
        assert!(check_nodes(&m, "Prod").is_err());
    }

    #[test]
    fn the_objects_are_the_ones_asked_for_and_the_ca_key_stays_out_of_the_nodes() {
        let m = manifest("prod", "  tls: auto\n");
        let c = creds(&m);
        let objs = objects(&m, &opts(), Some(&c)).unwrap();
        for k in [
            "Service",
            "StatefulSet",
            "PodDisruptionBudget",
            "ConfigMap",
            "Deployment",
        ] {
            assert_eq!(kind(&objs, k).len(), 1, "{k}");
        }
        assert!(objs.iter().all(|o| o["metadata"]["namespace"] == "prod"));
        let secrets = kind(&objs, "Secret");
        assert_eq!(secrets.len(), 2);
        let nodes = &secrets[0]["stringData"];
        assert!(nodes.get("ca.key").is_none() && nodes.get("admin.token").is_none());
        assert_eq!(nodes["kv-1.key"], "<kv-1.key>");
        assert_eq!(secrets[1]["stringData"]["ca.key"], "<ca.key>");
        let svc = kind(&objs, "Service")[0];
        assert_eq!(svc["spec"]["clusterIP"], "None");
        assert_eq!(svc["spec"]["publishNotReadyAddresses"], true);
        let sts = kind(&objs, "StatefulSet")[0];
        assert_eq!(sts["spec"]["replicas"], 3);
        let pod = &sts["spec"]["template"]["spec"];
        assert_eq!(pod["volumes"][0]["secret"]["defaultMode"], 0o600);
        let c0 = &pod["containers"][0];
        assert_eq!(c0["readinessProbe"]["httpGet"]["path"], "/ready");
        assert_eq!(c0["readinessProbe"]["httpGet"]["scheme"], "HTTPS");
        assert_eq!(c0["livenessProbe"]["httpGet"]["path"], "/health");
        let pdb = kind(&objs, "PodDisruptionBudget")[0];
        assert_eq!(pdb["spec"]["maxUnavailable"], 1);
        let dep = kind(&objs, "Deployment")[0];
        assert_eq!(dep["spec"]["replicas"], 1);
        assert_eq!(dep["spec"]["strategy"]["type"], "Recreate");
        let plain = manifest("prod", "  kvdArgs: [\"--insecure\"]\n");
        let objs = objects(&plain, &opts(), None).unwrap();
        assert!(kind(&objs, "Secret").is_empty());
        assert!(to_yaml(&objs).unwrap().contains("scheme: HTTP\n"));
    }

    #[test]
    fn the_config_map_holds_the_manifest_kvsup_reads_inside_the_cluster() {
        let mut m = manifest("prod", "  tls: auto\n");
        m.spec.nodes[0].runtime = Runtime::Process;
        let objs = objects(&m, &opts(), Some(&creds(&m))).unwrap();
        let text = kind(&objs, "ConfigMap")[0]["data"][MANIFEST_FILE]
            .as_str()
            .unwrap()
            .to_string();
        let back = Manifest::parse(&text, "cm").unwrap();
        assert_eq!(back, in_cluster_manifest(&m));
        assert_eq!(back.spec.state_dir, Path::new(STATE_DIR));
        assert!(back.spec.nodes.iter().all(|n| n.external()));
    }

    #[test]
    fn each_pod_runs_exactly_the_kvd_line_of_its_node() {
        let m = in_cluster_manifest(&manifest("prod", "  tls: auto\n"));
        let script = node_script(&m);
        let layout = Layout::in_state_dir(Path::new(STATE_DIR));
        for n in &m.spec.nodes {
            let data = launch::data_dir(Path::new(STATE_DIR), &n.name);
            let args = launch::kvd_args(&m, n, &data, Start::Join, Some(&layout));
            let want = format!("  {}) exec {KVD} {} ;;\n", n.name, args.join(" "));
            assert!(script.contains(&want), "{want}\nnot in\n{script}");
        }
        assert!(script.contains("--tls-key /var/lib/kvstore/creds/kv-0.key"));
        assert!(!script.contains("--role primary"));
        assert!(script.starts_with("case \"$HOSTNAME\" in\n"));
    }

    #[test]
    fn shell_words_are_quoted_when_they_must_be() {
        assert_eq!(sh_quote("--peers"), "--peers");
        assert_eq!(
            sh_quote("https://a:1,https://b:1"),
            "https://a:1,https://b:1"
        );
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), "'it'\\''s'");
        assert_eq!(sh_quote(""), "''");
        assert_eq!(sh_quote("$x"), "'$x'");
    }
}
