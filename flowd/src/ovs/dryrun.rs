//! A [`FlowProgrammer`] that changes nothing: it prints the exact `ovs-ofctl --bundle add-flows`
//! input each batch would send (`flowd replay --dry-run-ofctl`). Without a bridge there is nothing to
//! learn from: the flows take the shape of OVN 23.03.1's ([`Template::stand_in`], in the caller's table),
//! and pods get stand-in datapath keys, announced in a `#` comment line (which `ovs-ofctl` skips).

use super::{
    discovery::PortKeys,
    flow::{self, FlowEvent, FlowOp, ParsedFlow},
    template::{LearnError, Template},
    FlowProgrammer, OvsError, Result,
};
use std::{
    collections::HashMap,
    io::Write,
    sync::{Mutex, MutexGuard},
};
use tokio::sync::mpsc;

struct State {
    out: Box<dyn Write + Send>,
    keys: HashMap<String, PortKeys>,
    /// Kept so that the monitor streams never end.
    monitors: Vec<mpsc::Sender<FlowEvent>>,
}

/// See the module doc.
pub struct DryRun {
    template: Template,
    state: Mutex<State>,
}

impl std::fmt::Debug for DryRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DryRun")
            .field("template", &self.template)
            .finish_non_exhaustive()
    }
}

/// Stand-in logical switch key for every pod of a dry run (one node switch)...
const DRY_RUN_METADATA: u64 = 1;
/// ...and its router port's key; pods' port keys follow it.
const DRY_RUN_UPLINK: u32 = 1;

impl DryRun {
    /// A dry run whose flows go to EF table `table`.
    pub fn new(table: u8, out: Box<dyn Write + Send>) -> Self {
        Self {
            template: Template::stand_in(table, DRY_RUN_METADATA, DRY_RUN_UPLINK),
            state: Mutex::new(State {
                out,
                keys: HashMap::new(),
                monitors: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl FlowProgrammer for DryRun {
    async fn apply(&self, ops: &[FlowOp]) -> Result<()> {
        let text = flow::render_batch(ops);
        let mut s = self.lock();
        s.out
            .write_all(text.as_bytes())
            .and_then(|()| s.out.flush())
            .map_err(|source| OvsError::Io {
                program: "dry-run output",
                error: source,
            })
    }

    async fn dump(&self, _prefix: u32) -> Result<Vec<ParsedFlow>> {
        Ok(Vec::new())
    }

    async fn monitor(&self, _table: u8) -> Result<mpsc::Receiver<FlowEvent>> {
        let (tx, rx) = mpsc::channel(1);
        self.lock().monitors.push(tx);
        Ok(rx)
    }

    async fn learn_template(
        &self,
        _priority_base: u16,
        _table: Option<u8>,
    ) -> Result<Result<Template, LearnError>> {
        Ok(Ok(self.template.clone()))
    }

    async fn port_keys(&self, iface_ids: &[String]) -> Result<HashMap<String, PortKeys>> {
        let mut s = self.lock();
        let mut announced = Vec::new();
        for id in iface_ids {
            if !s.keys.contains_key(id) {
                let reg14 = u32::try_from(s.keys.len())
                    .ok()
                    .and_then(|n| n.checked_add(DRY_RUN_UPLINK + 1))
                    .unwrap_or(u32::MAX);
                s.keys.insert(
                    id.clone(),
                    PortKeys {
                        metadata: DRY_RUN_METADATA,
                        reg14,
                    },
                );
                announced.push((id.clone(), reg14));
            }
        }
        for (id, reg14) in announced {
            // iface-ids are Kubernetes names (DNS-1123), never DNS answers; this is a comment line.
            let _ = writeln!(
                s.out,
                "# {id}: stand-in keys metadata={DRY_RUN_METADATA:#x},reg14={reg14:#x} (no bridge to read them from)"
            );
        }
        Ok(iface_ids
            .iter()
            .filter_map(|id| Some((id.clone(), *s.keys.get(id)?)))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ovs::{Actions, Cookie, FlowAction, FlowMatch, FlowSpec};
    use std::sync::Arc;

    /// A writer the test can read back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn prints_the_exact_bundle_and_announces_stand_in_keys() {
        let out = Shared::default();
        let dry = DryRun::new(46, Box::new(out.clone()));
        let keys = dry.port_keys(&["ns1_pod1".into()]).await.unwrap();
        let again = dry.port_keys(&["ns1_pod1".into()]).await.unwrap();
        assert_eq!(keys, again, "stable stand-in keys");
        let k = keys["ns1_pod1"];
        let op = FlowOp::Add(FlowSpec {
            cookie: Cookie::new(1, 2, 11000),
            matches: FlowMatch {
                table: 46,
                priority: 11000,
                tier: None,
                hint: None,
                metadata: k.metadata,
                reg14: k.reg14,
                outport: Some(DRY_RUN_UPLINK),
                src: "10.244.1.5".parse().unwrap(),
                dst: "142.250.1.1".parse().unwrap(),
                l4: None,
            },
            idle_timeout: 330,
            hard_timeout: None,
            action: FlowAction::Continue(Actions::resubmit(47)),
        });
        dry.apply(std::slice::from_ref(&op)).await.unwrap();
        let t = dry.learn_template(11000, None).await.unwrap().unwrap();
        assert_eq!((t.table, t.uplink(k.metadata)), (46, Some(DRY_RUN_UPLINK)));
        assert!(dry.dump(1).await.unwrap().is_empty());
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].starts_with("# ns1_pod1: stand-in keys metadata=0x1,reg14=0x2"));
        assert_eq!(format!("{}\n", lines[1]), flow::render_batch(&[op]));
    }
}
