//! flowd's Kubernetes state against the fake API server: what the watchers report, relists after
//! `410 Gone`, bookmarks, selectors, and the API calls flowd makes compared with its RBAC.

use crate::apiserver::{egress_firewall, node, pod, FakeApiServer, Resource};
use flowd::watch::{self, Change, ClusterEvent, ClusterStream, SyncState, WatchStats};
use futures::StreamExt as _;
use kube::ResourceExt as _;
use serde_json::json;
use std::{sync::Arc, time::Duration};

/// Long enough for a watcher's backoff and relist on a loaded 2-core machine.
const WAIT: Duration = Duration::from_secs(20);

pub const NODE: &str = "node1";

/// A short description of one event, for assertions.
fn describe(event: &ClusterEvent) -> String {
    fn change<K: kube::Resource>(what: &str, c: &Change<K>) -> String {
        match c {
            Change::Applied(o) => format!("{what} applied {}", name(o)),
            Change::Deleted(o) => format!("{what} deleted {}", name(o)),
            Change::Synced => format!("{what} synced"),
        }
    }
    fn name<K: kube::Resource>(o: &K) -> String {
        match o.namespace() {
            Some(ns) => format!("{ns}/{}", o.name_any()),
            None => o.name_any(),
        }
    }
    match event {
        ClusterEvent::Pod(c) => change("pod", c),
        ClusterEvent::Firewall(c) => change("ef", c),
        ClusterEvent::Node(c) => change("node", c),
    }
}

/// Reads events until one described as `want` arrives; returns everything read, in order.
async fn until(stream: &mut ClusterStream, want: &str) -> Vec<String> {
    let mut seen = Vec::new();
    let result = tokio::time::timeout(WAIT, async {
        while let Some(ev) = stream.next().await {
            let d = describe(&ev);
            seen.push(d.clone());
            if d == want {
                return;
            }
        }
    })
    .await;
    assert!(result.is_ok(), "no {want:?} within {WAIT:?}; saw {seen:?}");
    seen
}

/// Reads until all three watches have synced once.
async fn until_synced(stream: &mut ClusterStream) -> Vec<String> {
    let mut sync = SyncState::default();
    let mut seen = Vec::new();
    let result = tokio::time::timeout(WAIT, async {
        while let Some(ev) = stream.next().await {
            seen.push(describe(&ev));
            if sync.note(&ev) {
                return;
            }
        }
    })
    .await;
    assert!(result.is_ok(), "not synced within {WAIT:?}; saw {seen:?}");
    seen
}

pub async fn cluster_with_two_pods() -> FakeApiServer {
    let api = FakeApiServer::start().await;
    api.apply(node(NODE, "127.0.0.0/24"));
    api.apply(node("node2", "10.244.2.0/24"));
    api.apply(pod("demo", "client", NODE, "127.0.0.11"));
    api.apply(pod("demo", "other", NODE, "127.0.0.12"));
    api.apply(pod("demo", "elsewhere", "node2", "10.244.2.5"));
    api.apply(egress_firewall(
        "demo",
        json!([{"type": "Allow", "to": {"dnsName": "example.com"}},
               {"type": "Deny", "to": {"cidrSelector": "0.0.0.0/0"}}]),
    ));
    api
}

#[tokio::test]
async fn watchers_list_this_nodes_pods_every_firewall_and_this_node_then_follow_changes() {
    let api = cluster_with_two_pods().await;
    let stats = Arc::new(WatchStats::default());
    let mut events = watch::cluster(&api.client(), NODE, &stats);
    let mut seen = until_synced(&mut events).await;
    seen.sort();
    assert_eq!(
        seen,
        [
            "ef applied demo/default",
            "ef synced",
            "node applied node1",
            "node synced",
            "pod applied demo/client",
            "pod applied demo/other",
            "pod synced",
        ]
    );

    api.apply(pod("demo", "late", NODE, "127.0.0.13"));
    assert_eq!(until(&mut events, "pod applied demo/late").await.len(), 1);
    // A pod of another node never shows up; the next change of this node's does, alone.
    api.apply(pod("demo", "far", "node2", "10.244.2.6"));
    api.delete(Resource::Pods, "demo", "other");
    assert_eq!(
        until(&mut events, "pod deleted demo/other").await,
        ["pod deleted demo/other"]
    );
    api.apply(egress_firewall("demo", json!([])));
    assert_eq!(
        until(&mut events, "ef applied demo/default").await,
        ["ef applied demo/default"]
    );
    api.delete(Resource::EgressFirewalls, "demo", "default");
    until(&mut events, "ef deleted demo/default").await;
    assert_eq!(stats.errors.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[tokio::test]
async fn after_410_gone_the_relist_reports_what_was_deleted_while_away() {
    let api = cluster_with_two_pods().await;
    let stats = Arc::new(WatchStats::default());
    let mut events = watch::cluster(&api.client(), NODE, &stats);
    until_synced(&mut events).await;
    let lists = api.count(Resource::Pods, "list");

    api.delete_unseen_and_expire(Resource::Pods, "demo", "client");
    let seen = until(&mut events, "pod deleted demo/client").await;
    assert!(
        api.count(Resource::Pods, "list") > lists,
        "no relist after 410"
    );
    // The relist re-announces nothing that did not change: only the deletion and the new sync.
    assert!(
        seen.iter()
            .all(|s| s.ends_with("synced") || s == "pod deleted demo/client"),
        "{seen:?}"
    );
    // And the watch goes on from the relist.
    api.apply(pod("demo", "after", NODE, "127.0.0.14"));
    until(&mut events, "pod applied demo/after").await;
}

#[tokio::test]
async fn bookmarks_move_the_watch_on_without_a_relist() {
    let api = cluster_with_two_pods().await;
    let stats = Arc::new(WatchStats::default());
    let mut events = watch::cluster(&api.client(), NODE, &stats);
    until_synced(&mut events).await;
    let lists = api.count(Resource::Pods, "list");
    // Let the watches start, then bookmark them.
    tokio::time::sleep(Duration::from_millis(300)).await;
    api.bookmark();
    api.apply(pod("demo", "next", NODE, "127.0.0.15"));
    assert_eq!(
        until(&mut events, "pod applied demo/next").await,
        ["pod applied demo/next"]
    );
    assert_eq!(api.count(Resource::Pods, "list"), lists);
    let watches = api.requests();
    assert!(watches.iter().filter(|r| r.verb == "watch").all(|r| r
        .query
        .get("allowWatchBookmarks")
        .map(String::as_str)
        == Some("true")));
}

#[tokio::test]
async fn tapd_discovery_watches_dns_pods_by_label_in_one_namespace() {
    let api = FakeApiServer::start().await;
    let mut dns = pod("kube-system", "coredns-a", "node2", "10.244.2.2");
    dns["metadata"]["labels"] = json!({"k8s-app": "kube-dns"});
    api.apply(dns.clone());
    let mut not_dns = pod("kube-system", "etcd", "node2", "10.244.2.3");
    not_dns["metadata"]["labels"] = json!({"component": "etcd"});
    api.apply(not_dns);
    let mut elsewhere = dns.clone();
    elsewhere["metadata"]["namespace"] = json!("default");
    api.apply(elsewhere);

    let stats = Arc::new(WatchStats::default());
    let mut changes = watch::dns_pods(&api.client(), "kube-system", "k8s-app=kube-dns", &stats);
    let mut names = Vec::new();
    while let Some(c) = tokio::time::timeout(WAIT, changes.next()).await.unwrap() {
        match c {
            Change::Applied(p) => {
                names.push(format!("{}/{}", p.namespace().unwrap(), p.name_any()))
            }
            Change::Synced => break,
            Change::Deleted(p) => panic!("deleted {}", p.name_any()),
        }
    }
    assert_eq!(names, ["kube-system/coredns-a"]);
    let listed = api.requests();
    let list = listed.iter().find(|r| r.verb == "list").unwrap();
    assert_eq!(list.namespace.as_deref(), Some("kube-system"));
    assert_eq!(list.query["labelSelector"], "k8s-app=kube-dns");
}

/// Every request flowd's watchers sent is one that `REQUIRED_ACCESS` (and so the ClusterRole) allows.
pub fn assert_requests_within_rbac(api: &FakeApiServer) {
    let requests = api.requests();
    assert!(!requests.is_empty());
    for r in requests {
        let resource = r
            .resource
            .unwrap_or_else(|| panic!("flowd called an unknown API: {r:?}"));
        let (group, plural) = resource.rbac();
        let allowed = watch::REQUIRED_ACCESS.iter().any(|a| {
            a.group == group && a.resource == plural && a.verbs.contains(&r.verb.as_str())
        });
        assert!(allowed, "{r:?} is not in REQUIRED_ACCESS");
    }
}

#[tokio::test]
async fn every_call_the_watchers_make_is_in_required_access() {
    let api = cluster_with_two_pods().await;
    let stats = Arc::new(WatchStats::default());
    let mut events = watch::cluster(&api.client(), NODE, &stats);
    until_synced(&mut events).await;
    let mut dns = watch::dns_pods(&api.client(), "kube-system", "k8s-app=kube-dns", &stats);
    while !matches!(
        tokio::time::timeout(WAIT, dns.next()).await.unwrap(),
        Some(Change::Synced)
    ) {}
    // Watchers only watch while polled: keep both going until their watches are open.
    let drain = tokio::spawn(async move {
        futures::future::join(events.for_each(|_| async {}), dns.for_each(|_| async {})).await
    });
    tokio::time::timeout(WAIT, async {
        while api.count(Resource::Pods, "watch") < 2 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap();
    drain.abort();
    assert_requests_within_rbac(&api);
    // Every verb REQUIRED_ACCESS lists is really used: the ClusterRole grants nothing idle.
    for a in watch::REQUIRED_ACCESS {
        for verb in a.verbs {
            assert!(
                api.requests().iter().any(|r| r.resource.map(Resource::rbac)
                    == Some((a.group, a.resource))
                    && r.verb == *verb),
                "{a:?} {verb} never used"
            );
        }
    }
}
