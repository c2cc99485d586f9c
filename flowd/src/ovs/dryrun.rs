//! A [`FlowProgrammer`] that changes nothing: it prints the exact `ovs-ofctl --bundle add-flows`
//! input each batch would send (`flowd replay --dry-run-ofctl`). Without a bridge there is nothing to
//! discover, so the ACL target comes from the caller and pods get stand-in datapath keys, announced
//! in a `#` comment line (which `ovs-ofctl` skips).

use super::{
    discovery::{AclTarget, PortKeys},
    flow::{self, FlowEvent, FlowOp, ParsedFlow},
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
    target: AclTarget,
    state: Mutex<State>,
}

impl std::fmt::Debug for DryRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DryRun")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

/// Stand-in logical switch key for every pod of a dry run (one node switch).
const DRY_RUN_METADATA: u64 = 1;

impl DryRun {
    pub fn new(target: AclTarget, out: Box<dyn Write + Send>) -> Self {
        Self {
            target,
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
                source,
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

    async fn discover_acl(&self, _priority_base: u16) -> Result<Option<AclTarget>> {
        Ok(Some(self.target.clone()))
    }

    async fn port_keys(&self, iface_ids: &[String]) -> Result<HashMap<String, PortKeys>> {
        let mut s = self.lock();
        let mut announced = Vec::new();
        for id in iface_ids {
            if !s.keys.contains_key(id) {
                let reg14 = u32::try_from(s.keys.len() + 2).unwrap_or(u32::MAX);
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
