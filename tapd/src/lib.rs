//! tapd: reads dnstap from a DNS server over Frame Streams and streams decoded client responses over
//! gRPC (`dnsflow.v1.DnsTap/Subscribe`).

pub mod event;

pub use event::{Answer, DnsName, DnsResponse};
