//! What flowd learned, kept on the node across restarts and upgrades: the answers each pod was given
//! (name, CNAME chain, addresses, TTLs, when each came), in one versioned JSON file under a hostPath.
//! Without tapd, nothing else could tell a restarted flowd why the grants in `br-int` are there, nor
//! let a rule added later grant from an answer given before the restart.
//!
//! The file is written atomically (a temporary file, synced, renamed over the old one) and bounded;
//! a missing, unreadable, foreign (another node's, another version) or corrupt file is ignored with
//! one warning. Nothing is trusted past its expiry: an answer comes back with the arrival time it
//! had, so it justifies a flow exactly as long as it did before; and only to the very pod it was
//! given to (same name and uid, same address).

use crate::{
    engine::{Engine, Remembered},
    model::{PodInfo, PodKey},
    ovs::FlowProgrammer,
};
use dnsflow_dnstap::{Answer, DnsName, DnsResponse};
use serde::{Deserialize, Serialize};
use std::{
    io::{Read as _, Write as _},
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

/// The file format's version: a file of another is not read.
const VERSION: u32 = 1;
/// Addresses kept at most: the node-wide grant cap's order of magnitude (each ~100 bytes of JSON).
pub const MAX_RECORDS: usize = 500_000;
/// The file is not read beyond this.
pub const MAX_FILE_BYTES: u64 = 64 << 20;
/// How often a running flowd writes what it knows.
pub const SAVE_EVERY: Duration = Duration::from_secs(30);

#[derive(Debug, Serialize, Deserialize)]
struct File {
    version: u32,
    /// The node it was written on: a file moved to another node is not believed.
    node: String,
    answers: Vec<Saved>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Saved {
    namespace: String,
    pod: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    uid: Option<String>,
    client: IpAddr,
    qname: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    chain: Vec<String>,
    records: Vec<SavedRecord>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedRecord {
    ip: IpAddr,
    ttl: u32,
    /// When the answer came, in milliseconds since the Unix epoch.
    at_ms: u64,
}

/// Why the file was not used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path} is larger than {MAX_FILE_BYTES} bytes")]
    TooLarge { path: PathBuf },
    #[error("{path} is not flowd's state: {error}")]
    Corrupt {
        path: PathBuf,
        error: serde_json::Error,
    },
    #[error("{path} is version {found}, not {VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("{path} was written on node {found:?}, not this one")]
    Foreign { path: PathBuf, found: String },
    #[error("cannot write {path}: {error}")]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The engine's answers as the file holds them; at most [`MAX_RECORDS`] addresses, the most recent
/// first.
fn snapshot(node: &str, remembered: Vec<(PodInfo, Vec<Remembered>)>, now: Instant) -> File {
    let wall_now = SystemTime::now();
    let wall = |at: Instant| {
        unix_ms(match now.checked_duration_since(at) {
            Some(ago) => wall_now - ago,
            None => wall_now,
        })
    };
    let mut answers: Vec<Saved> = remembered
        .into_iter()
        .flat_map(|(pod, all)| {
            all.into_iter().map(move |r| Saved {
                namespace: pod.key.namespace.clone(),
                pod: pod.key.name.clone(),
                uid: pod.uid.clone(),
                client: r.response.client,
                qname: r.response.qname.to_string(),
                chain: r
                    .response
                    .cname_chain
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
                records: r
                    .response
                    .answers
                    .iter()
                    .map(|a| SavedRecord {
                        ip: a.ip,
                        ttl: a.ttl,
                        at_ms: r.at.get(&a.ip).map_or(unix_ms(wall_now), |t| wall(*t)),
                    })
                    .collect(),
            })
        })
        .collect();
    answers.sort_by_key(|s| std::cmp::Reverse(s.records.iter().map(|r| r.at_ms).max()));
    let mut kept = 0;
    answers.retain(|s| {
        kept += s.records.len();
        kept <= MAX_RECORDS
    });
    File {
        version: VERSION,
        node: node.to_owned(),
        answers,
    }
}

/// Writes what `engine` knows to `path`, atomically. Returns how many answers.
pub fn save<P: FlowProgrammer>(
    path: &Path,
    node: &str,
    engine: &Engine<P>,
) -> Result<usize, StateError> {
    let file = snapshot(node, engine.remembered(), Instant::now());
    let write_error = |error| StateError::Write {
        path: path.to_path_buf(),
        error,
    };
    let bytes = serde_json::to_vec(&file).map_err(|e| write_error(e.into()))?;
    let tmp = path.with_extension("tmp");
    let mut out = std::fs::File::create(&tmp).map_err(write_error)?;
    out.write_all(&bytes).map_err(write_error)?;
    out.sync_all().map_err(write_error)?;
    drop(out);
    std::fs::rename(&tmp, path).map_err(write_error)?;
    if let Some(dir) = path.parent().and_then(|d| std::fs::File::open(d).ok()) {
        let _ = dir.sync_all();
    }
    Ok(file.answers.len())
}

/// Reads `path` (written on `node`) and gives `engine` back every answer still within its expiry,
/// to the pod it was given to. Returns how many answers were restored. Call it once the cluster's
/// pods are known.
pub fn restore<P: FlowProgrammer>(
    path: &Path,
    node: &str,
    engine: &Engine<P>,
) -> Result<usize, StateError> {
    let read = |error| StateError::Read {
        path: path.to_path_buf(),
        error,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .map_err(read)?
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(StateError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    let file: File = serde_json::from_slice(&bytes).map_err(|error| StateError::Corrupt {
        path: path.to_path_buf(),
        error,
    })?;
    if file.version != VERSION {
        return Err(StateError::Version {
            path: path.to_path_buf(),
            found: file.version,
        });
    }
    if file.node != node {
        return Err(StateError::Foreign {
            path: path.to_path_buf(),
            found: file.node,
        });
    }
    let settings = engine.settings().clone();
    let (now, wall_now) = (Instant::now(), unix_ms(SystemTime::now()));
    let mut restored = 0;
    for saved in file.answers.into_iter().take(MAX_RECORDS) {
        let (Ok(qname), Ok(chain)) = (
            DnsName::new(&saved.qname),
            saved
                .chain
                .iter()
                .map(|c| DnsName::new(c))
                .collect::<Result<Vec<_>, _>>(),
        ) else {
            continue;
        };
        let pod = PodInfo {
            key: PodKey::new(saved.namespace, saved.pod),
            uid: saved.uid,
            ips: vec![saved.client],
            node: node.to_owned(),
        };
        for r in saved.records.into_iter().take(MAX_RECORDS) {
            // As long as it justified a flow before the restart, and no longer.
            let ago = Duration::from_millis(wall_now.saturating_sub(r.at_ms));
            if ago >= Duration::from_secs(settings.idle_timeout(r.ttl).into()) {
                continue;
            }
            let Some(at) = now.checked_sub(ago) else {
                continue;
            };
            let resp = DnsResponse::noerror(
                saved.client,
                qname.clone(),
                chain.clone(),
                vec![Answer {
                    ip: r.ip,
                    ttl: r.ttl,
                }],
            );
            restored += usize::from(engine.restore(&pod, resp, at));
        }
    }
    Ok(restored)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::EngineSettings, egressfirewall::EgressFirewall, ovs::Recording,
        rules::FirewallRules,
    };
    use serde_json::json;

    fn engine(uid: &str) -> Engine<Recording> {
        let e = Engine::new(EngineSettings::for_kind(), Recording::new(None));
        e.set_node("n1");
        let ef = EgressFirewall::inline(
            "ns1",
            json!([{"type": "Allow", "to": {"dnsName": "example.com"}}]),
        )
        .unwrap();
        e.set_rules(FirewallRules::from_egress_firewall(&ef).unwrap());
        e.upsert_pod(PodInfo {
            uid: Some(uid.into()),
            key: PodKey::new("ns1", "pod1"),
            ips: vec![IpAddr::from([10, 244, 1, 5])],
            node: "n1".into(),
        });
        e
    }

    fn answer(name: &str, ip: [u8; 4], ttl: u32) -> DnsResponse {
        DnsResponse::noerror(
            IpAddr::from([10, 244, 1, 5]),
            DnsName::new(name).unwrap(),
            vec![DnsName::new("edge.example.net").unwrap()],
            vec![Answer { ip: ip.into(), ttl }],
        )
    }

    fn granted(e: &Engine<Recording>) -> Vec<(IpAddr, u64)> {
        let now = SystemTime::now();
        let mut v: Vec<(IpAddr, u64)> = e
            .grants(None, None)
            .iter()
            .map(|g| {
                let left = g.expires.duration_since(now).unwrap_or_default().as_secs();
                (g.key.dst, left)
            })
            .collect();
        v.sort();
        v
    }

    /// A restart gives every pod its answers back with the expiry they had: the grants are the same,
    /// the time left too (within a second), and an answer past its expiry is not restored.
    #[test]
    fn a_restart_keeps_every_answer_and_its_remaining_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("answers.json");
        let before = engine("u1");
        let now = Instant::now();
        before.on_dns(
            answer("www.example.com", [192, 0, 2, 7], 600),
            now - Duration::from_secs(100),
        );
        before.on_dns(answer("api.example.com", [192, 0, 2, 8], 60), now);
        // Arrived long enough ago that it justifies nothing any more.
        before.on_dns(
            answer("old.example.com", [192, 0, 2, 9], 5),
            now - Duration::from_secs(400),
        );
        assert_eq!(save(&path, "n1", &before).unwrap(), 3);

        let after = engine("u1");
        assert_eq!(restore(&path, "n1", &after).unwrap(), 2);
        let (was, is) = (granted(&before), granted(&after));
        let dsts = |v: &[(IpAddr, u64)]| v.iter().map(|g| g.0).collect::<Vec<_>>();
        assert_eq!(
            dsts(&is),
            [IpAddr::from([192, 0, 2, 7]), IpAddr::from([192, 0, 2, 8])]
        );
        for ((_, left_before), (dst, left_after)) in was
            .iter()
            .filter(|g| is.iter().any(|i| i.0 == g.0))
            .zip(&is)
        {
            assert!(
                left_before.abs_diff(*left_after) <= 1,
                "{dst}: {left_before} s, then {left_after} s"
            );
        }
        let reason = after.grants(None, None)[0].reason.clone().unwrap();
        assert!(format!("{reason:?}").contains("example.com"), "{reason:?}");
    }

    /// A pod recreated under the same name (another uid) or another node's file gets nothing; a
    /// corrupt or missing file is an error the caller logs once.
    #[test]
    fn nothing_is_restored_to_another_pod_or_from_a_file_that_is_not_ours() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("answers.json");
        let before = engine("u1");
        before.on_dns(
            answer("www.example.com", [192, 0, 2, 7], 600),
            Instant::now(),
        );
        save(&path, "n1", &before).unwrap();

        assert_eq!(
            restore(&path, "n1", &engine("u2")).unwrap(),
            0,
            "another pod"
        );
        assert!(matches!(
            restore(&path, "n2", &engine("u1")),
            Err(StateError::Foreign { .. })
        ));
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("\"version\":1", "\"version\":9")).unwrap();
        assert!(matches!(
            restore(&path, "n1", &engine("u1")),
            Err(StateError::Version { found: 9, .. })
        ));
        std::fs::write(&path, b"{\"version\":1,").unwrap();
        assert!(matches!(
            restore(&path, "n1", &engine("u1")),
            Err(StateError::Corrupt { .. })
        ));
        assert!(matches!(
            restore(&dir.path().join("none.json"), "n1", &engine("u1")),
            Err(StateError::Read { .. })
        ));
        // Hostile names are skipped, not trusted.
        std::fs::write(
            &path,
            serde_json::to_vec(&json!({"version": 1, "node": "n1", "answers": [{
                "namespace": "ns1", "pod": "pod1", "client": "10.244.1.5", "qname": "bad name",
                "records": [{"ip": "192.0.2.7", "ttl": 600, "at_ms": unix_ms(SystemTime::now())}]
            }]}))
            .unwrap(),
        )
        .unwrap();
        assert_eq!(restore(&path, "n1", &engine("u1")).unwrap(), 0);
    }
}
