//! `deploy/` and the Containerfiles: every overlay renders with `kubectl kustomize`, every rendered object
//! passes `kubernetes-validate`, and the pieces agree with each other and with the code (socket path,
//! environment variable names, RBAC, images, the files the Containerfiles copy).

use flowd::watch::ApiAccess;
use serde_yaml::Value;
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

/// The dnstap socket, as CoreDNS, both containers and tapd must all see it.
const DNSTAP_SOCKET: &str = "/var/run/dnstap/dnstap.sock";
/// Images the overlays deploy, as the README builds them.
const FLOWD_IMAGE: &str = "localhost/dnsflow/flowd:0.1.0";
const TAPD_IMAGE: &str = "localhost/dnsflow/tapd:0.1.0";
/// Kinds kubernetes-validate has no schema for (OpenShift's own API): checked here by hand instead.
const KINDS_WITHOUT_SCHEMA: &[&str] = &["SecurityContextConstraints"];
/// Variables read by other programs than flowd and tapd: the Rust log filter, and the node address that
/// the kubelet substitutes into FLOWD_METRICS_LISTEN.
const FOREIGN_ENV: &[&str] = &["RUST_LOG", "NODE_IP"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} (scripts/test installs it): {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn kustomize(dir: &Path) -> Vec<Value> {
    let yaml = run(Command::new("kubectl").arg("kustomize").arg(dir));
    serde_yaml::Deserializer::from_str(&yaml)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn render(overlay: &str) -> Vec<Value> {
    kustomize(&root().join("deploy/overlays").join(overlay))
}

/// Validates every object with a schema (strict: unknown fields are errors); returns the kinds skipped.
fn validate(objects: &[Value]) -> BTreeSet<String> {
    let dir = tempfile::tempdir().unwrap();
    let mut skipped = BTreeSet::new();
    let mut files = Vec::new();
    for (i, o) in objects.iter().enumerate() {
        let kind = o["kind"].as_str().unwrap().to_string();
        if KINDS_WITHOUT_SCHEMA.contains(&kind.as_str()) {
            skipped.insert(kind);
            continue;
        }
        let path = dir.path().join(format!("{i:02}-{kind}.yaml"));
        std::fs::write(&path, serde_yaml::to_string(o).unwrap()).unwrap();
        files.push(path);
    }
    let out = run(Command::new("kubernetes-validate")
        .args(["--strict", "--no-warn"])
        .args(&files));
    assert_eq!(
        out.matches(" passed ").count(),
        files.len(),
        "not every object passed:\n{out}"
    );
    skipped
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name} rendered"))
}

fn pod_spec(workload: &Value) -> &Value {
    &workload["spec"]["template"]["spec"]
}

/// Containers and init containers (tapd is a native sidecar: an init container that keeps running).
fn container<'a>(workload: &'a Value, name: &str) -> &'a Value {
    let spec = pod_spec(workload);
    ["containers", "initContainers"]
        .iter()
        .filter_map(|k| spec[*k].as_sequence())
        .flatten()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn env_value<'a>(c: &'a Value, name: &str) -> &'a str {
    c["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .and_then(|e| e["value"].as_str())
        .unwrap_or_else(|| panic!("{} sets no {name}", c["name"].as_str().unwrap()))
}

fn env_names(c: &Value) -> BTreeSet<String> {
    c["env"]
        .as_sequence()
        .into_iter()
        .flatten()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .filter(|n| !FOREIGN_ENV.contains(&n.as_str()))
        .collect()
}

/// The environment variables a clap command reads, subcommands included.
fn clap_env_names(cmd: &clap::Command) -> BTreeSet<String> {
    let mut names: BTreeSet<String> = cmd
        .get_arguments()
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .collect();
    for sub in cmd.get_subcommands() {
        names.extend(clap_env_names(sub));
    }
    names
}

fn flowd_env_names() -> BTreeSet<String> {
    use clap::CommandFactory as _;
    clap_env_names(&flowd::config::Cli::command())
}

/// What `tapd --help` prints: this test crate cannot link tapd, so flags are read from the binary.
fn tapd_help() -> String {
    let out = Command::new(dnsflow_testkit::tapd_binary())
        .arg("--help")
        .output()
        .expect("tapd --help");
    assert!(out.status.success(), "tapd --help");
    String::from_utf8(out.stdout).expect("UTF-8 help")
}

/// The environment variables tapd reads, as its `--help` names them (`[env: TAPD_SOCKET=]`).
fn tapd_env_names() -> BTreeSet<String> {
    let names: BTreeSet<String> = tapd_help()
        .split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split('=').next())
        .map(str::to_string)
        .collect();
    assert!(names.contains("TAPD_SOCKET"), "{names:?}");
    names
}

/// The volume mounted at `path` in container `c` is an emptyDir of the pod (never a hostPath).
fn mounted_empty_dir(workload: &Value, c: &Value, path: &str) -> String {
    let mount = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == path)
        .unwrap_or_else(|| panic!("{} does not mount {path}", c["name"].as_str().unwrap()));
    let name = mount["name"].as_str().unwrap();
    let volume = pod_spec(workload)["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap();
    assert!(
        volume.get("emptyDir").is_some(),
        "{name} is not an emptyDir: {volume:?}"
    );
    name.to_string()
}

/// The dnstap plumbing of one DNS workload: Corefile line, shared emptyDir, tapd's socket setting, tapd's
/// image, and tapd running as CoreDNS's non-root uid.
/// The Secret volume of `workload` that container `c` mounts at the directory of `path`.
fn mounted_secret<'a>(workload: &'a Value, c: &Value, path: &str) -> &'a str {
    let dir = Path::new(path).parent().unwrap();
    let mount = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| Path::new(m["mountPath"].as_str().unwrap()) == dir)
        .unwrap_or_else(|| panic!("nothing mounted at {}", dir.display()));
    assert_eq!(mount["readOnly"], true, "{mount:?}");
    let volume = pod_spec(workload)["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    volume["secret"]["secretName"]
        .as_str()
        .unwrap_or_else(|| panic!("{} is not a Secret", dir.display()))
}

/// gRPC between flowd and tapd is mutual TLS, wired the same way in the workloads, in cert-manager's
/// certificates for `variant`, and in `deploy/tls/make-certs.sh`: each side reads its files from its
/// own Secret, tapd proves the name flowd expects, and flowd's and the operator's names are ones tapd
/// admits by default.
fn check_tls(objects: &[Value], dns: &Value, variant: &str) {
    let flowd_ds = find(objects, "DaemonSet", "flowd");
    let flowd = container(flowd_ds, "flowd");
    let tapd = container(dns, "tapd");
    let tapd_secret = mounted_secret(dns, tapd, env_value(tapd, "TAPD_TLS_CERT"));
    for var in ["TAPD_TLS_KEY", "TAPD_TLS_CLIENT_CA"] {
        assert_eq!(mounted_secret(dns, tapd, env_value(tapd, var)), tapd_secret);
    }
    let flowd_secret = mounted_secret(flowd_ds, flowd, env_value(flowd, "FLOWD_TAPD_TLS_CERT"));
    for var in ["FLOWD_TAPD_TLS_KEY", "FLOWD_TAPD_TLS_CA"] {
        assert_eq!(
            mounted_secret(flowd_ds, flowd, env_value(flowd, var)),
            flowd_secret
        );
    }
    let server_name = env_value(flowd, "FLOWD_TAPD_SERVER_NAME");
    // flowd's metrics listen on the node's own address, where the kubelet probes them.
    let node_ip = flowd["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "NODE_IP")
        .expect("NODE_IP");
    assert_eq!(
        node_ip["valueFrom"]["fieldRef"]["fieldPath"],
        "status.hostIP"
    );
    assert_eq!(env_value(flowd, "FLOWD_METRICS_LISTEN"), "$(NODE_IP):9541");
    assert_eq!(flowd["readinessProbe"]["httpGet"]["port"], 9541);
    let admitted = tapd_help()
        .split("[default: flowd.dnsflow")
        .nth(1)
        .map(|rest| format!("flowd.dnsflow{}", rest.split(']').next().unwrap()))
        .expect("tapd --help gives the default client names");

    let certs = kustomize(&root().join("deploy/tls/cert-manager").join(variant));
    // cert-manager's kinds: kubernetes-validate has no schema for them, so their fields are checked
    // here, by what they must agree with.
    assert!(certs
        .iter()
        .all(|o| o["apiVersion"] == "cert-manager.io/v1"));
    let cert = |name: &str| find(&certs, "Certificate", name)["spec"].clone();
    let names = |spec: &Value| -> Vec<String> {
        spec["dnsNames"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|n| n.as_str().unwrap().to_string())
            .collect()
    };
    let tapd_cert = find(&certs, "Certificate", "tapd-tls");
    assert_eq!(
        tapd_cert["metadata"]["namespace"],
        dns["metadata"]["namespace"]
    );
    assert_eq!(tapd_cert["spec"]["secretName"], tapd_secret);
    assert_eq!(names(&tapd_cert["spec"]), [server_name]);
    assert!(serde_yaml::to_string(&tapd_cert["spec"]["usages"])
        .unwrap()
        .contains("server auth"));
    let flowd_cert = find(&certs, "Certificate", "flowd-tls");
    assert_eq!(
        flowd_cert["metadata"]["namespace"],
        flowd_ds["metadata"]["namespace"]
    );
    assert_eq!(flowd_cert["spec"]["secretName"], flowd_secret);
    for client in ["flowd-tls", "dnsflow-operator"] {
        let spec = cert(client);
        assert!(serde_yaml::to_string(&spec["usages"])
            .unwrap()
            .contains("client auth"));
        for name in names(&spec) {
            assert!(
                admitted.split(',').any(|a| a == name),
                "{name} not in {admitted}"
            );
        }
    }
    // Every leaf comes from the one CA, which the ClusterIssuer signs with.
    let ca = find(&certs, "ClusterIssuer", "dnsflow-ca");
    assert_eq!(
        ca["spec"]["ca"]["secretName"],
        cert("dnsflow-ca")["secretName"]
    );
    for leaf in ["tapd-tls", "flowd-tls", "dnsflow-operator"] {
        assert_eq!(cert(leaf)["issuerRef"]["name"], "dnsflow-ca");
    }

    // The script for clusters without cert-manager makes the same identities.
    let script = std::fs::read_to_string(root().join("deploy/tls/make-certs.sh")).unwrap();
    assert!(script.contains("set -- tapd:server flowd:client operator:client"));
    assert_eq!(server_name, "tapd.dnsflow");
}

fn check_tapd_sidecar(dns: &Value, dns_container: &str) {
    let tapd = container(dns, "tapd");
    let coredns = container(dns, dns_container);
    let socket_dir = Path::new(DNSTAP_SOCKET).parent().unwrap().to_str().unwrap();
    let a = mounted_empty_dir(dns, tapd, socket_dir);
    let b = mounted_empty_dir(dns, coredns, socket_dir);
    assert_eq!(a, b, "coredns and tapd must share one volume");
    assert_eq!(env_value(tapd, "TAPD_SOCKET"), DNSTAP_SOCKET);
    assert_eq!(tapd["restartPolicy"], "Always", "tapd is a native sidecar");
    let sc = &tapd["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(
        sc["runAsUser"], 65532,
        "CoreDNS's uid, so the socket is writable by it"
    );
    assert_reads_its_env(tapd, &tapd_env_names());
}

/// Every variable the manifest gives container `c` is one its program reads (`known`, from clap).
fn assert_reads_its_env(c: &Value, known: &BTreeSet<String>) {
    let names = env_names(c);
    assert!(
        names.is_subset(known),
        "{} does not read {:?}",
        c["name"].as_str().unwrap(),
        names.difference(known).collect::<Vec<_>>()
    );
}

/// The manifest's flowd settings, given to flowd's own parser as flags: they parse and validate.
fn check_flowd_settings_parse(flowd: &Value) {
    // The kubelet substitutes the node's address, IPv4 or IPv6.
    for node_ip in ["10.89.0.2", "fd00:10:89::2"] {
        flowd_run_args(flowd, node_ip).validate().unwrap();
    }
}

/// What `flowd run` makes of the manifest's settings for container `flowd` on a node at `node_ip`.
fn flowd_run_args(flowd: &Value, node_ip: &str) -> flowd::config::RunArgs {
    use clap::{CommandFactory as _, Parser as _};
    let cmd = flowd::config::Cli::command();
    let run = cmd.find_subcommand("run").unwrap();
    let mut argv = vec!["flowd".to_string(), "run".to_string()];
    for e in flowd["env"].as_sequence().unwrap() {
        let name = e["name"].as_str().unwrap();
        if FOREIGN_ENV.contains(&name) {
            continue;
        }
        let value = match e["value"].as_str() {
            Some(v) => v.replace("$(NODE_IP)", node_ip),
            // From the downward API.
            None => "node1".to_string(),
        };
        let arg = run
            .get_arguments()
            .find(|a| a.get_env().is_some_and(|v| v == name))
            .unwrap();
        argv.push(format!("--{}", arg.get_long().unwrap()));
        argv.push(value);
    }
    let cli = flowd::config::Cli::try_parse_from(&argv)
        .unwrap_or_else(|e| panic!("flowd rejects the manifest's settings {argv:?}: {e}"));
    match cli.command {
        flowd::config::Command::Run(args) => *args,
        other => panic!("{other:?}"),
    }
}

/// flowd finds this DNS workload's tapds: same namespace, its pods carry the selector's labels, and the
/// port is tapd's gRPC port.
fn check_discovery(objects: &[Value], dns: &Value) {
    let flowd = container(find(objects, "DaemonSet", "flowd"), "flowd");
    assert_eq!(
        env_value(flowd, "FLOWD_TAPD_NAMESPACE"),
        dns["metadata"]["namespace"].as_str().unwrap()
    );
    let labels = &dns["spec"]["template"]["metadata"]["labels"];
    for term in env_value(flowd, "FLOWD_TAPD_SELECTOR").split(',') {
        let (k, v) = term.split_once('=').unwrap();
        assert_eq!(labels[k], v, "DNS pods lack {term}");
    }
    let listen = env_value(container(dns, "tapd"), "TAPD_LISTEN");
    assert_eq!(
        listen.rsplit_once(':').unwrap().1,
        env_value(flowd, "FLOWD_TAPD_PORT")
    );
}

/// The Role in OVN-K's namespace grants flowd exactly `OVN_CONFIG_ACCESS` on the one ConfigMap its
/// `FLOWD_OVN_CONFIG` names, and the Role in the DNS Service's namespace exactly
/// `DNS_SERVICE_ACCESS` on the one Service its `FLOWD_DNS_SERVICE` names; both bound to flowd's
/// ServiceAccount.
fn check_ovn_config_access(objects: &[Value]) {
    check_role_by_name(
        objects,
        "FLOWD_OVN_CONFIG",
        "dnsflow-flowd-ovn-config",
        flowd::watch::OVN_CONFIG_ACCESS,
    );
    check_role_by_name(
        objects,
        "FLOWD_DNS_SERVICE",
        "dnsflow-flowd-dns-service",
        flowd::watch::DNS_SERVICE_ACCESS,
    );
}

/// The Role `role` grants flowd exactly `access` on the one object flowd's `env` names.
fn check_role_by_name(objects: &[Value], env: &str, role_name: &str, access: ApiAccess) {
    let flowd = container(find(objects, "DaemonSet", "flowd"), "flowd");
    let source: flowd::ovnkube::ObjectRef = env_value(flowd, env).parse().unwrap();
    let role = find(objects, "Role", role_name);
    assert_eq!(role["metadata"]["namespace"], source.namespace.as_str());
    let rules = role["rules"].as_sequence().unwrap();
    assert_eq!(rules.len(), 1, "{rules:?}");
    let strings = |k: &str| -> Vec<String> {
        rules[0][k]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(strings("apiGroups"), [access.group]);
    assert_eq!(strings("resources"), [access.resource]);
    assert_eq!(strings("resourceNames"), [source.name.as_str()]);
    assert_eq!(strings("verbs"), access.verbs);
    let binding = find(objects, "RoleBinding", role_name);
    assert_eq!(binding["metadata"]["namespace"], source.namespace.as_str());
    assert_eq!(binding["roleRef"]["kind"], "Role");
    assert_eq!(binding["roleRef"]["name"], role_name);
    assert_eq!(binding["subjects"][0]["name"], "flowd");
    assert_eq!(binding["subjects"][0]["namespace"], "dnsflow");
}

/// Whether a NetworkPolicy port entry admits `protocol`/`port`.
fn admits(entry: &Value, protocol: &str, port: u64) -> bool {
    let proto = entry["protocol"].as_str().unwrap_or("TCP");
    let Some(first) = entry["port"].as_u64() else {
        return proto == protocol && entry.get("port").is_none();
    };
    let last = entry["endPort"].as_u64().unwrap_or(first);
    proto == protocol && (first..=last).contains(&port)
}

/// The NetworkPolicy on the DNS pods admits tapd's gRPC port only from the host-network namespace
/// (`host_network`, the label that selects it), and every other port those pods declare from anywhere.
fn check_tapd_policy(objects: &[Value], dns: &Value, host_network: (&str, &str)) {
    let policy = find(objects, "NetworkPolicy", "dnsflow-tapd");
    assert_eq!(
        policy["metadata"]["namespace"],
        dns["metadata"]["namespace"]
    );
    let labels = &dns["spec"]["template"]["metadata"]["labels"];
    for (k, v) in policy["spec"]["podSelector"]["matchLabels"]
        .as_mapping()
        .unwrap()
    {
        assert_eq!(
            &labels[k.as_str().unwrap()],
            v,
            "the policy selects other pods"
        );
    }
    assert_eq!(policy["spec"]["policyTypes"][0], "Ingress");
    let flowd = container(find(objects, "DaemonSet", "flowd"), "flowd");
    let grpc: u64 = env_value(flowd, "FLOWD_TAPD_PORT").parse().unwrap();
    let rules = policy["spec"]["ingress"].as_sequence().unwrap();
    let open = |protocol: &str, port: u64| {
        rules.iter().any(|r| {
            r.get("from").is_none()
                && r["ports"]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .any(|e| admits(e, protocol, port))
        })
    };
    assert!(!open("TCP", grpc), "tapd's gRPC port is open to every pod");
    let admitting: Vec<&Value> = rules
        .iter()
        .filter(|r| {
            r["ports"]
                .as_sequence()
                .unwrap()
                .iter()
                .any(|e| admits(e, "TCP", grpc))
        })
        .collect();
    assert_eq!(admitting.len(), 1, "{admitting:?}");
    let from = admitting[0]["from"].as_sequence().unwrap();
    assert_eq!(from.len(), 1);
    assert!(from[0].get("podSelector").is_none() && from[0].get("ipBlock").is_none());
    let selector = &from[0]["namespaceSelector"]["matchLabels"];
    assert_eq!(selector.as_mapping().unwrap().len(), 1);
    assert_eq!(selector[host_network.0], host_network.1);
    // Everything else the DNS pods serve (DNS, metrics, probes, tapd's 9531) as before the policy.
    let mut ports = vec![("UDP", 53), ("TCP", 53)];
    for c in pod_spec(dns)["containers"].as_sequence().unwrap() {
        for p in c["ports"].as_sequence().into_iter().flatten() {
            let proto = p["protocol"].as_str().unwrap_or("TCP");
            let port = p["containerPort"].as_u64().unwrap();
            if (proto, port) != ("TCP", grpc) {
                ports.push((if proto == "UDP" { "UDP" } else { "TCP" }, port));
            }
        }
        for probe in ["livenessProbe", "readinessProbe"] {
            if let Some(port) = c[probe]["httpGet"]["port"].as_u64() {
                ports.push(("TCP", port));
            }
        }
    }
    for (proto, port) in ports {
        assert!(open(proto, port), "{proto}/{port} of the DNS pods is shut");
    }
}

fn check_flowd(objects: &[Value]) {
    let ds = find(objects, "DaemonSet", "flowd");
    let spec = pod_spec(ds);
    assert_eq!(spec["hostNetwork"], true);
    assert_eq!(spec["serviceAccountName"], "flowd");
    assert!(spec["tolerations"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|t| t["operator"] == "Exists" && t.get("key").is_none()));
    let flowd = container(ds, "flowd");
    assert_eq!(flowd["image"], FLOWD_IMAGE);
    assert_eq!(
        flowd["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let node = flowd["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "FLOWD_NODE_NAME")
        .expect("FLOWD_NODE_NAME");
    assert_eq!(node["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
    check_flowd_settings_parse(flowd);
    assert_reads_its_env(flowd, &flowd_env_names());
    let ovs = spec["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["hostPath"]["path"] == "/var/run/openvswitch")
        .expect("the OVS run directory");
    assert!(flowd["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|m| m["name"] == ovs["name"] && m["mountPath"] == "/var/run/openvswitch"));
    // What the pods were told outlives the container: the state file is on a hostPath.
    let state = env_value(flowd, "FLOWD_STATE_FILE");
    let state_dir = std::path::Path::new(&state)
        .parent()
        .unwrap()
        .to_str()
        .unwrap();
    let kept = spec["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["hostPath"]["path"] == state_dir)
        .expect("a hostPath for the state file");
    assert!(flowd["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|m| m["name"] == kept["name"] && m["mountPath"] == state_dir));
    for probe in ["livenessProbe", "readinessProbe"] {
        assert!(flowd.get(probe).is_some(), "flowd has no {probe}");
    }
    assert!(flowd["resources"]["requests"].get("cpu").is_some());
    check_cluster_role(find(objects, "ClusterRole", "dnsflow-flowd"));
    check_ovn_config_access(objects);
    let binding = find(objects, "ClusterRoleBinding", "dnsflow-flowd");
    assert_eq!(binding["roleRef"]["name"], "dnsflow-flowd");
    assert_eq!(binding["subjects"][0]["name"], "flowd");
    assert_eq!(binding["subjects"][0]["namespace"], "dnsflow");
}

/// The ClusterRole grants exactly `REQUIRED_ACCESS`: nothing flowd does not call, nothing missing.
fn check_cluster_role(role: &Value) {
    let granted: BTreeSet<(String, String, String)> = role["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|r| {
            let strings = |k: &str| -> Vec<String> {
                r[k].as_sequence()
                    .unwrap()
                    .iter()
                    .map(|s| s.as_str().unwrap().to_string())
                    .collect()
            };
            let (groups, resources, verbs) =
                (strings("apiGroups"), strings("resources"), strings("verbs"));
            assert!(r.get("resourceNames").is_none() && r.get("nonResourceURLs").is_none());
            let mut out = Vec::new();
            for g in &groups {
                for res in &resources {
                    for v in &verbs {
                        out.push((g.clone(), res.clone(), v.clone()));
                    }
                }
            }
            out
        })
        .collect();
    let required: BTreeSet<(String, String, String)> = flowd::watch::REQUIRED_ACCESS
        .iter()
        .flat_map(|a| {
            a.verbs
                .iter()
                .map(|v| (a.group.to_string(), a.resource.to_string(), v.to_string()))
        })
        .collect();
    assert_eq!(granted, required);
}

fn images(objects: &[Value]) -> BTreeSet<String> {
    objects
        .iter()
        .filter_map(|o| {
            let spec = pod_spec(o);
            spec.get("containers")?;
            Some(
                ["containers", "initContainers"]
                    .iter()
                    .filter_map(|k| spec[*k].as_sequence())
                    .flatten()
                    .map(|c| c["image"].as_str().unwrap().to_string())
                    .collect::<Vec<_>>(),
            )
        })
        .flatten()
        .collect()
}

#[test]
fn kind_overlay_renders_validates_and_ties_together() {
    let objects = render("kind");
    assert_eq!(validate(&objects), BTreeSet::new());
    check_flowd(&objects);

    let corefile = find(&objects, "ConfigMap", "coredns")["data"]["Corefile"]
        .as_str()
        .unwrap();
    let line = format!("dnstap unix://{DNSTAP_SOCKET} full");
    assert_eq!(
        corefile.lines().filter(|l| l.trim() == line).count(),
        1,
        "{corefile}"
    );
    let coredns = find(&objects, "Deployment", "coredns");
    assert_eq!(coredns["metadata"]["namespace"], "kube-system");
    // flowd learns from both sources here: the replies it holds, and tapd beside CoreDNS.
    assert!(hears_tapd(&objects));
    check_tapd_sidecar(coredns, "coredns");
    check_discovery(&objects, coredns);
    check_tapd_policy(
        &objects,
        coredns,
        ("kubernetes.io/metadata.name", "ovn-host-network"),
    );
    check_tls(&objects, coredns, "kind");
    // The Corefile the Deployment mounts is the one carrying the dnstap line.
    assert!(pod_spec(coredns)["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|v| v["configMap"]["name"] == "coredns"));

    let imgs = images(&objects);
    assert!(
        imgs.contains(FLOWD_IMAGE) && imgs.contains(TAPD_IMAGE),
        "{imgs:?}"
    );
    assert!(
        imgs.iter()
            .all(|i| [FLOWD_IMAGE, TAPD_IMAGE].contains(&i.as_str()) || i.contains("coredns")),
        "{imgs:?}"
    );
}

/// The opt-in tapd for OpenShift: the overlay with tapd switched on, and the `dns-default` patch.
const OPENSHIFT_TAPD: &str = "deploy/optional/openshift-tapd";
/// The DNS operator's namespace.
const OPENSHIFT_DNS: &str = "openshift-dns";
/// The only objects the OpenShift overlay puts in `openshift-dns`: read access to its one Service.
const DNS_SERVICE_ROLE: &str = "dnsflow-flowd-dns-service";

/// The Secret volume `name` of `workload`.
fn secret_volume<'a>(workload: &'a Value, name: &str) -> &'a Value {
    let volume = pod_spec(workload)["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["secret"]["secretName"] == name)
        .unwrap_or_else(|| panic!("no Secret volume {name}"));
    &volume["secret"]
}

/// Whether `flowd` listens to tapd with the manifest's settings (`--tapd`, `FLOWD_TAPD`).
fn hears_tapd(objects: &[Value]) -> bool {
    let flowd = container(find(objects, "DaemonSet", "flowd"), "flowd");
    flowd_run_args(flowd, "10.89.0.2").upstream.tapd
}

/// The SCC admits what flowd's DaemonSet asks for, and only flowd's ServiceAccount may use it.
fn check_scc(objects: &[Value]) {
    let flowd = container(find(objects, "DaemonSet", "flowd"), "flowd");
    let selinux = flowd["securityContext"]["seLinuxOptions"]["type"].clone();
    assert_eq!(selinux, "spc_t");
    let scc = find(objects, "SecurityContextConstraints", "dnsflow-flowd");
    assert_eq!(scc["allowHostNetwork"], true);
    assert_eq!(scc["allowHostDirVolumePlugin"], true);
    assert_eq!(scc["allowPrivilegedContainer"], false);
    assert_eq!(scc["seccompProfiles"][0], "runtime/default");
    assert_eq!(scc["seLinuxContext"]["seLinuxOptions"]["type"], selinux);
    for cap in flowd["securityContext"]["capabilities"]["add"]
        .as_sequence()
        .unwrap()
    {
        assert!(scc["allowedCapabilities"]
            .as_sequence()
            .unwrap()
            .contains(cap));
    }
    let volumes = scc["volumes"].as_sequence().unwrap();
    for v in pod_spec(find(objects, "DaemonSet", "flowd"))["volumes"]
        .as_sequence()
        .unwrap()
    {
        let kind = ["hostPath", "emptyDir", "secret"]
            .into_iter()
            .find(|k| v.get(*k).is_some())
            .unwrap_or_else(|| panic!("a volume of another kind: {v:?}"));
        assert!(volumes.iter().any(|a| a == kind), "the SCC refuses {kind}");
    }
    let use_scc = find(objects, "ClusterRole", "dnsflow-flowd-scc");
    assert_eq!(use_scc["rules"][0]["resourceNames"][0], "dnsflow-flowd");
    assert_eq!(use_scc["rules"][0]["verbs"][0], "use");
    let binding = find(objects, "RoleBinding", "dnsflow-flowd-scc");
    assert_eq!(binding["subjects"][0]["name"], "flowd");
}

/// Whether `o` is one of the DNS operator's own objects, or a patch of one: its DaemonSet or
/// ConfigMap `dns-default` (CoreDNS and its Corefile), or the operator's configuration.
fn touches_the_dns_operator(o: &Value) -> bool {
    let kind = o["kind"].as_str().unwrap_or_default();
    let api = o["apiVersion"].as_str().unwrap_or_default();
    let name = o["metadata"]["name"].as_str().unwrap_or_default();
    api.starts_with("operator.openshift.io/")
        || (name == "dns-default" && kind != "Service")
        || (o["metadata"]["namespace"] == OPENSHIFT_DNS
            && ["DaemonSet", "ConfigMap"].contains(&kind))
}

#[test]
fn openshift_overlay_renders_validates_and_changes_nothing_in_openshift_dns() {
    let objects = render("openshift");
    let skipped = validate(&objects);
    assert_eq!(
        skipped,
        KINDS_WITHOUT_SCHEMA.iter().map(|s| s.to_string()).collect()
    );
    check_flowd(&objects);
    check_scc(&objects);

    // flowd learns from the DNS replies it holds in br-int only: no tapd, so no DNS-pod watch and
    // no TLS Secret to wait for.
    let ds = find(&objects, "DaemonSet", "flowd");
    assert_eq!(env_value(container(ds, "flowd"), "FLOWD_TAPD"), "false");
    assert!(!hears_tapd(&objects));
    assert_eq!(secret_volume(ds, "flowd-tls")["optional"], true);

    // In the DNS operator's namespace only the Role (and its binding) that lets flowd read the one
    // Service dns-default; nothing that is, or patches, the operator's DaemonSet, Corefile or
    // configuration; no tapd and no NetworkPolicy anywhere.
    for o in &objects {
        let what = format!(
            "{} {}",
            o["kind"].as_str().unwrap(),
            o["metadata"]["name"].as_str().unwrap()
        );
        if o["metadata"]["namespace"] == OPENSHIFT_DNS {
            assert!(
                ["Role", "RoleBinding"].contains(&o["kind"].as_str().unwrap())
                    && o["metadata"]["name"] == DNS_SERVICE_ROLE,
                "{what} in {OPENSHIFT_DNS}"
            );
        }
        assert!(!touches_the_dns_operator(o), "{what}");
        assert_ne!(o["kind"], "NetworkPolicy", "{what}");
    }
    let role = find(&objects, "Role", DNS_SERVICE_ROLE);
    assert_eq!(role["rules"][0]["resources"][0], "services");
    assert_eq!(role["rules"][0]["resourceNames"][0], "dns-default");
    assert!(!images(&objects).contains(TAPD_IMAGE));
    // Nor does the overlay's directory hold such a patch for `oc patch` to apply by hand.
    let dir = root().join("deploy/overlays/openshift");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("dnstap"), "{}", path.display());
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let o: Value = serde::Deserialize::deserialize(doc).unwrap();
            assert!(!touches_the_dns_operator(&o), "{}: {o:?}", path.display());
        }
    }

    // The walk-through keeps the DNS operator Managed; only the opt-in section speaks of Unmanaged.
    let readme = std::fs::read_to_string(root().join("deploy/README.md")).unwrap();
    let walk_through = readme
        .split_once("\n## OpenShift\n")
        .expect("an OpenShift section")
        .1
        .split("\n## ")
        .next()
        .unwrap();
    for step in [
        "Unmanaged",
        "managementState",
        "dns-default-tapd.yaml",
        "dnstap",
    ] {
        assert!(
            !walk_through.contains(step),
            "the OpenShift walk-through says {step}"
        );
    }
}

/// A `dns-default` DaemonSet shaped like the one OpenShift's DNS operator writes (trimmed to what the
/// patch touches), so the patch can be rendered and validated the way `oc patch` applies it.
const OPENSHIFT_DNS_DEFAULT: &str = r#"
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: dns-default
  namespace: openshift-dns
  labels: {dns.operator.openshift.io/owning-dns: default}
spec:
  selector:
    matchLabels: {dns.operator.openshift.io/daemonset-dns: default}
  template:
    metadata:
      labels: {dns.operator.openshift.io/daemonset-dns: default}
    spec:
      serviceAccountName: dns
      priorityClassName: system-node-critical
      containers:
        - name: dns
          image: quay.io/openshift/origin-coredns:latest
          command: ["coredns"]
          args: ["-conf", "/etc/coredns/Corefile"]
          volumeMounts:
            - {name: config-volume, mountPath: /etc/coredns, readOnly: true}
        - name: kube-rbac-proxy
          image: quay.io/openshift/origin-kube-rbac-proxy:latest
      volumes:
        - name: config-volume
          configMap:
            name: dns-default
            items: [{key: Corefile, path: Corefile}]
"#;

#[test]
fn openshift_opt_in_tapd_and_dns_default_patch_render_validate_and_tie_together() {
    let dir = root().join(OPENSHIFT_TAPD);
    let objects = kustomize(&dir);
    let skipped = validate(&objects);
    assert_eq!(
        skipped,
        KINDS_WITHOUT_SCHEMA.iter().map(|s| s.to_string()).collect()
    );
    check_flowd(&objects);
    check_scc(&objects);
    // It is the OpenShift overlay plus tapd's NetworkPolicy, with flowd subscribing to tapd and
    // waiting for its TLS Secret.
    let plain = render("openshift");
    let added: Vec<&Value> = objects
        .iter()
        .filter(|o| {
            !plain
                .iter()
                .any(|p| p["kind"] == o["kind"] && p["metadata"] == o["metadata"])
        })
        .collect();
    assert_eq!(added.len(), 1, "{added:?}");
    assert_eq!(added[0]["kind"], "NetworkPolicy");
    let ds = find(&objects, "DaemonSet", "flowd");
    assert_eq!(env_value(container(ds, "flowd"), "FLOWD_TAPD"), "true");
    assert!(hears_tapd(&objects));
    assert_eq!(secret_volume(ds, "flowd-tls")["optional"], false);

    // The tapd patch, applied to a dns-default like the operator's, as `oc patch` would.
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("dns-default.yaml"), OPENSHIFT_DNS_DEFAULT).unwrap();
    std::fs::copy(
        dir.join("dns-default-tapd.yaml"),
        work.path().join("dns-default-tapd.yaml"),
    )
    .unwrap();
    std::fs::write(
        work.path().join("kustomization.yaml"),
        "resources: [dns-default.yaml]\npatches: [{path: dns-default-tapd.yaml}]\nimages:\n  - {name: dnsflow/tapd, newName: localhost/dnsflow/tapd, newTag: \"0.1.0\"}\n",
    )
    .unwrap();
    let patched = kustomize(work.path());
    assert_eq!(validate(&patched), BTreeSet::new());
    let dns = find(&patched, "DaemonSet", "dns-default");
    check_tapd_sidecar(dns, "dns");
    check_discovery(&objects, dns);
    check_tapd_policy(
        &objects,
        dns,
        ("policy-group.network.openshift.io/host-network", ""),
    );
    check_tls(&objects, dns, "openshift");
    assert_eq!(container(dns, "tapd")["image"], TAPD_IMAGE);
    // The patch adds to the operator's containers; it does not replace them.
    assert_eq!(container(dns, "kube-rbac-proxy")["name"], "kube-rbac-proxy");

    // The README's opt-in section says what it costs, and its Corefile step adds the very line the
    // kind Corefile carries.
    let readme = std::fs::read_to_string(root().join("deploy/README.md")).unwrap();
    let section = readme
        .split_once("\n## tapd on OpenShift (unsupported)\n")
        .expect("a section on the opt-in tapd for OpenShift")
        .1
        .split("\n## ")
        .next()
        .unwrap()
        // As read, whatever the line breaks.
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    for says in [
        OPENSHIFT_TAPD,
        "Unmanaged",
        "Red Hat does not support",
        &format!("dnstap unix://{DNSTAP_SOCKET} full"),
    ] {
        assert!(
            section.contains(says),
            "the opt-in section does not say {says:?}"
        );
    }
    let patch_doc = std::fs::read_to_string(dir.join("dns-default-tapd.yaml")).unwrap();
    assert!(patch_doc.contains("openshift-dns patch daemonset dns-default"));
}

/// Clusters that enforce `baseline` by default admit flowd's pods: a host-network node agent with a
/// hostPath to OVS's sockets needs the `privileged` Pod Security level in its namespace.
#[test]
fn the_dnsflow_namespace_is_privileged_for_pod_security_in_every_overlay() {
    for (what, objects) in [
        ("kind", render("kind")),
        ("openshift", render("openshift")),
        (OPENSHIFT_TAPD, kustomize(&root().join(OPENSHIFT_TAPD))),
    ] {
        let ds = find(&objects, "DaemonSet", "flowd");
        let namespace = find(
            &objects,
            "Namespace",
            ds["metadata"]["namespace"].as_str().unwrap(),
        );
        let labels = &namespace["metadata"]["labels"];
        for mode in ["enforce", "audit", "warn"] {
            assert_eq!(
                labels[&format!("pod-security.kubernetes.io/{mode}")],
                "privileged",
                "{what}: {mode}"
            );
        }
        // What needs it.
        assert_eq!(pod_spec(ds)["hostNetwork"], true);
        assert!(pod_spec(ds)["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|v| v.get("hostPath").is_some()));
    }
}

#[test]
fn containerfiles_copy_what_the_workspace_has_and_tag_what_the_overlays_deploy() {
    let readme = std::fs::read_to_string(root().join("deploy/README.md")).unwrap();
    for (file, bin, image) in [
        ("Containerfile.flowd", "flowd", FLOWD_IMAGE),
        ("Containerfile.tapd", "tapd", TAPD_IMAGE),
    ] {
        let text = std::fs::read_to_string(root().join(file)).unwrap();
        // Multi-stage: a Rust builder, then a runtime image that gets only the binary.
        let stages: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
        assert_eq!(stages.len(), 2, "{file}: {stages:?}");
        assert!(stages[0].contains("rust:") && stages[0].ends_with(" AS build"));
        let mut copied = Vec::new();
        for line in text
            .lines()
            .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
        {
            let words: Vec<&str> = line.split_whitespace().collect();
            for src in &words[1..words.len() - 1] {
                assert!(root().join(src).exists(), "{file} copies missing {src}");
                copied.push(root().join(src).canonicalize().unwrap());
            }
        }
        // cargo resolves the whole workspace, even to build one binary: every member must be there.
        let workspace = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
        let members: Vec<&str> = workspace
            .lines()
            .find_map(|l| l.strip_prefix("members = ["))
            .expect("the workspace lists its members")
            .trim_end_matches(']')
            .split(',')
            .map(|m| m.trim().trim_matches('"'))
            .collect();
        assert!(members.contains(&"dnstap"), "{members:?}");
        for member in &members {
            let member = root().join(member).canonicalize().unwrap();
            assert!(
                copied.contains(&member),
                "{file} does not copy {}",
                member.display()
            );
        }
        // What the crates it compiles embed at compile time must be in the build context too (the
        // other daemon and the test kit are only read as manifests).
        let other = if bin == "flowd" { "tapd" } else { "flowd" };
        for embedded in members
            .iter()
            .filter(|m| **m != other && **m != "testkit")
            .flat_map(|c| embedded_files(&root().join(c).join("src")))
        {
            assert!(
                copied.iter().any(|c| embedded.starts_with(c)),
                "{file} does not copy {}, which {bin} embeds",
                embedded.display()
            );
        }
        let build = format!("-p {bin} --bin {bin}");
        assert!(text.contains(&build), "{file} does not build {bin}");
        let manifest = std::fs::read_to_string(root().join(bin).join("Cargo.toml")).unwrap();
        assert!(manifest.contains(&format!("name = \"{bin}\"")));
        assert!(root().join(bin).join("src/main.rs").exists());
        assert!(
            text.contains(&format!(
                "COPY --from=build /out/{bin} /usr/local/bin/{bin}"
            )),
            "{file}"
        );
        let tag = format!("-f {file} -t {image} .");
        assert!(
            text.contains(&tag),
            "{file} does not say how to build {image}"
        );
        assert!(
            readme.contains(&tag),
            "deploy/README.md does not build {image}"
        );
    }
    let tapd = std::fs::read_to_string(root().join("Containerfile.tapd")).unwrap();
    assert!(tapd.contains("USER 65532:65532"), "tapd runs as non-root");
    let flowd = std::fs::read_to_string(root().join("Containerfile.flowd")).unwrap();
    assert!(
        flowd.contains("openvswitch-common"),
        "flowd needs ovs-ofctl"
    );
}

/// Every file that `include_str!`/`include_bytes!` under `dir` names, resolved.
fn embedded_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(embedded_files(&path));
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        for part in text.split("include_").skip(1) {
            let Some(rest) = part
                .strip_prefix("str!(\"")
                .or_else(|| part.strip_prefix("bytes!(\""))
            else {
                continue;
            };
            let literal = &rest[..rest.find('"').unwrap()];
            let resolved = path.parent().unwrap().join(literal);
            out.push(resolved.canonicalize().unwrap_or(resolved));
        }
    }
    out
}
