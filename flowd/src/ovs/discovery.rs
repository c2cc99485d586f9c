//! Runtime discovery of each pod's datapath keys in `br-int`, from `ovs-ofctl`/`ovs-vsctl` output (what
//! flowd's flows look like is learned in [`super::template`]). Nothing is hard-coded: keys are OVN's.
//!
//! Every parser here takes the tools' output as hostile text: bounded, never panicking, ignoring what
//! it does not understand.

use std::collections::HashMap;

/// More interfaces than this on one bridge is not a Kubernetes node; the rest is ignored.
pub const MAX_INTERFACES: usize = 65_536;

/// A pod's logical datapath keys, as OVN's table-0 flow for its OVS port loads them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortKeys {
    /// Logical switch tunnel key (`metadata`).
    pub metadata: u64,
    /// Logical port tunnel key (`reg14`).
    pub reg14: u32,
}

/// Reads `ovs-vsctl --format=json --columns=ofport,external_ids list Interface` into
/// `iface-id -> ofport`. Interfaces without an ofport yet (`-1` or `[]`) are left out.
pub fn parse_interfaces(json: &str) -> HashMap<String, u32> {
    let mut out = HashMap::new();
    let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
        return out;
    };
    let Some(rows) = v.get("data").and_then(|d| d.as_array()) else {
        return out;
    };
    for row in rows.iter().take(MAX_INTERFACES) {
        let Some(row) = row.as_array() else { continue };
        let (Some(ofport), Some(ids)) = (row.first(), row.get(1)) else {
            continue;
        };
        let Some(ofport) = ofport.as_i64().and_then(|p| u32::try_from(p).ok()) else {
            continue;
        };
        // OVSDB JSON map: ["map", [[key, value], ...]]
        let Some(pairs) = ids.get(1).and_then(|p| p.as_array()) else {
            continue;
        };
        for pair in pairs {
            if let (Some("iface-id"), Some(id)) = (
                pair.get(0).and_then(|k| k.as_str()),
                pair.get(1).and_then(|v| v.as_str()),
            ) {
                out.insert(id.to_owned(), ofport);
            }
        }
    }
    out
}

/// Reads `ovs-ofctl dump-flows --no-names <bridge> table=0` into `ofport -> PortKeys`, from OVN's
/// per-port flows `in_port=N actions=...load:K->OXM_OF_METADATA[],load:P->NXM_NX_REG14[]...`.
pub fn parse_port_keys(dump: &str) -> HashMap<u32, PortKeys> {
    let mut out = HashMap::new();
    for line in dump.lines() {
        let Some((head, actions)) = line.split_once(" actions=") else {
            continue;
        };
        let Some(in_port) = head
            .split([',', ' '])
            .find_map(|t| t.strip_prefix("in_port="))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let mut metadata = None;
        let mut reg14 = None;
        for action in actions.split(',') {
            let Some(load) = action.strip_prefix("load:") else {
                continue;
            };
            let Some((value, dst)) = load.split_once("->") else {
                continue;
            };
            let Some(value) = value
                .strip_prefix("0x")
                .and_then(|v| u64::from_str_radix(v, 16).ok())
            else {
                continue;
            };
            match dst {
                "OXM_OF_METADATA[]" => metadata = Some(value),
                "NXM_NX_REG14[]" => reg14 = u32::try_from(value).ok(),
                _ => {}
            }
        }
        if let (Some(metadata), Some(reg14)) = (metadata, reg14) {
            out.insert(in_port, PortKeys { metadata, reg14 });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines from a real OVN 23.03.1 `br-int` (node switch with a load balancer and an EgressFirewall).
    const DUMP: &str = "NXST_FLOW reply (xid=0x8):
 cookie=0x23533ff8, duration=1.028s, table=0, n_packets=0, n_bytes=0, idle_age=1, priority=100,in_port=1 actions=load:0x5->NXM_NX_REG13[],load:0x6->NXM_NX_REG11[],load:0x3->NXM_NX_REG12[],load:0x1->OXM_OF_METADATA[],load:0x1->NXM_NX_REG14[],resubmit(,8)
 cookie=0x5343bea0, duration=1.015s, table=0, n_packets=0, n_bytes=0, idle_age=1, priority=100,in_port=2 actions=load:0x8->NXM_NX_REG13[],load:0x6->NXM_NX_REG11[],load:0x3->NXM_NX_REG12[],load:0x1->OXM_OF_METADATA[],load:0x2->NXM_NX_REG14[],resubmit(,8)
 cookie=0x0, duration=5.266s, table=0, n_packets=0, n_bytes=0, idle_age=5, priority=0 actions=drop
 cookie=0x333, duration=1.0s, table=19, n_packets=0, n_bytes=0, idle_age=1, priority=10500,ip,reg0=0x80/0x80,reg14=0x1,metadata=0x1,nw_dst=5.5.5.5 actions=load:0x1->NXM_NX_XXREG0[97],resubmit(,20)
 cookie=0x334, duration=1.0s, table=19, n_packets=0, n_bytes=0, idle_age=1, priority=10500,ip,reg0=0x80/0x80,reg14=0x2,metadata=0x1,nw_dst=5.5.5.5 actions=load:0x1->NXM_NX_XXREG0[97],resubmit(,20)
 cookie=0x335, duration=1.0s, table=19, n_packets=0, n_bytes=0, idle_age=1, priority=10500,ip,reg0=0x80/0x80,reg14=0x3,metadata=0x1,nw_dst=5.5.5.5 actions=load:0x1->NXM_NX_XXREG0[97],resubmit(,20)
 cookie=0x336, duration=1.0s, table=19, n_packets=0, n_bytes=0, idle_age=1, priority=10500,ip,reg0=0x80/0x80,reg14=0x4,metadata=0x1,nw_dst=5.5.5.5 actions=load:0x1->NXM_NX_XXREG0[97],resubmit(,20)
 cookie=0x337, duration=1.0s, table=19, n_packets=0, n_bytes=0, idle_age=1, priority=10500,ip,reg0=0x80/0x80,reg14=0x5,metadata=0x1,nw_dst=5.5.5.5 actions=load:0x1->NXM_NX_XXREG0[97],resubmit(,20)
 cookie=0x111, duration=1.0s, table=18, n_packets=0, n_bytes=0, idle_age=1, priority=2001,ip,reg0=0x80/0x80,reg14=0x1,metadata=0x1 actions=load:0x1->NXM_NX_XXREG0[97],resubmit(,19)
 cookie=0x222, duration=1.0s, table=46, n_packets=0, n_bytes=0, idle_age=1, priority=2001,ip,reg0=0x80/0x80,reg15=0x1,metadata=0x1 actions=load:0x1->NXM_NX_XXREG0[97],resubmit(,47)
 cookie=0x79ee24c9, duration=3.298s, table=46, n_packets=0, n_bytes=0, idle_age=3, priority=65532,icmp6,metadata=0x1,ipv6_src=fe80::/10,icmp_type=132 actions=resubmit(,47)
 cookie=0xf1bb7908, duration=0.010s, table=46, n_packets=0, n_bytes=0, idle_age=0, priority=11000,ip,reg0=0x80/0x80,reg14=0x1,metadata=0x1,nw_dst=1.2.3.4 actions=load:0x1->NXM_NX_XXREG0[97],resubmit(,47)
 cookie=0xfae8f7ad, duration=0.010s, table=46, n_packets=0, n_bytes=0, idle_age=0, priority=11000,ip,reg0=0x100/0x100,reg14=0x1,metadata=0x1,nw_dst=1.2.3.4 actions=resubmit(,47)
 cookie=0xf8401e09, duration=3.288s, table=46, n_packets=0, n_bytes=0, idle_age=3, priority=10999,ip,reg0=0x400/0x400,reg14=0x1,metadata=0x1 actions=ct(commit,zone=NXM_NX_REG13[0..15],nat(src),exec(load:0x1->NXM_NX_CT_MARK[0]))
 cookie=0xbed979c, duration=3.287s, table=46, n_packets=0, n_bytes=0, idle_age=3, priority=10999,ip,reg0=0x200/0x200,reg14=0x1,metadata=0x1 actions=drop
 cookie=0xbed979c, duration=3.287s, table=46, n_packets=0, n_bytes=0, idle_age=3, priority=10999,ip,reg0=0x200/0x200,reg14=0x2,metadata=0x1 actions=drop
";

    #[test]
    fn reads_port_keys_from_table_zero() {
        let keys = parse_port_keys(DUMP);
        assert_eq!(keys.len(), 2);
        assert_eq!(
            keys[&2],
            PortKeys {
                metadata: 1,
                reg14: 2
            }
        );
    }

    use proptest::prelude::*;

    proptest! {
        /// Tool output is hostile until parsed: fragments of real lines in any order, and arbitrary
        /// text, never make a parser panic, and whatever they yield is well-formed.
        #[test]
        fn parsers_survive_any_output(
            parts in proptest::collection::vec(prop_oneof![
                proptest::sample::select(vec![
                    " cookie=0x646e736600012af8", ", table=46", ", duration=1s", " priority=11000",
                    ",reg14=0x1", ",metadata=0x1", ",reg15=0x2", ",tcp6", ",ip", ",nw_src=1.2.3.4",
                    ",ipv6_dst=::1", ",tp_dst=443", ",tp_dst=99999", " actions=", "drop", "resubmit(,47)",
                    "load:0x1->OXM_OF_METADATA[]", ",load:0xffffffffff->NXM_NX_REG14[]", " in_port=3",
                    "\n", " event=DELETED reason=idle", " event=ADDED", "(", ")", "=", ",", " ",
                ]).prop_map(str::to_owned),
                "\\PC{0,12}",
            ], 0..40),
        ) {
            let text: String = parts.concat();
            for line in text.lines() {
                if let Some(f) = super::super::flow::parse_flow_line(line) {
                    if let Some(m) = f.fields.and_then(|x| x.flow_match(f.table, 1)) {
                        proptest::prop_assert_eq!(m.src.is_ipv4(), m.dst.is_ipv4());
                    }
                }
                let _ = super::super::flow::parse_monitor_line(line);
            }
            let _ = parse_port_keys(&text);
            let _ = parse_interfaces(&text);
        }
    }

    #[test]
    fn reads_iface_ids_from_vsctl_json() {
        let json = r#"{"data":[[1,["map",[["iface-id","ns1_pod1"],["attached-mac","x"]]]],[-1,["map",[["iface-id","ns1_new"]]]],[["set",[]],["map",[]]],[3,["map",[["iface-id","ns1_pod2"]]]]],"headings":["ofport","external_ids"]}"#;
        let m = parse_interfaces(json);
        assert_eq!(m.len(), 2);
        assert_eq!((m["ns1_pod1"], m["ns1_pod2"]), (1, 3));
        assert!(parse_interfaces("{not json").is_empty());
    }
}
