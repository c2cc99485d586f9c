//! The wire contract shared by tapd and flowd: the `dnsflow.v1` gRPC services and the dnstap schema.
//!
//! Code is generated at build time from `proto/` by protox, so no system `protoc` is needed.
//! [`FILE_DESCRIPTOR_SET`] feeds gRPC server reflection, which lets `grpcurl` list and call the
//! services without local `.proto` files.

/// `dnsflow.v1`: tapd's `DnsTap` event stream and flowd's `Flowd` inspection API.
pub mod v1 {
    #![allow(missing_docs, missing_debug_implementations, clippy::all)]
    tonic::include_proto!("dnsflow.v1");
}

/// The dnstap schema (`dnstap.Dnstap`), as carried in Frame Streams data frames.
pub mod dnstap {
    #![allow(missing_docs, missing_debug_implementations, clippy::all)]
    tonic::include_proto!("dnstap");
}

/// Encoded `FileDescriptorSet` of every `.proto` in this crate (including the well-known types they
/// import), for `tonic_reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("descriptor");

/// The Frame Streams content type that dnstap senders announce.
pub const DNSTAP_CONTENT_TYPE: &str = "protobuf:dnstap.Dnstap";

pub use prost;
pub use prost_types;

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    #[test]
    fn descriptor_set_names_every_service() {
        let fds = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET)
            .expect("valid descriptor set");
        let services: Vec<String> = fds
            .file
            .iter()
            .flat_map(|f| {
                f.service
                    .iter()
                    .map(move |s| format!("{}.{}", f.package(), s.name()))
            })
            .collect();
        assert!(
            services.contains(&"dnsflow.v1.DnsTap".to_string()),
            "{services:?}"
        );
        assert!(
            services.contains(&"dnsflow.v1.Flowd".to_string()),
            "{services:?}"
        );
        assert!(fds
            .file
            .iter()
            .any(|f| f.name() == "google/protobuf/timestamp.proto"));
    }

    #[test]
    fn dnstap_roundtrip_keeps_client_response_fields() {
        let msg = dnstap::Dnstap {
            identity: Some(b"coredns-abc".to_vec()),
            r#type: dnstap::dnstap::Type::Message as i32,
            message: Some(dnstap::Message {
                r#type: dnstap::message::Type::ClientResponse as i32,
                query_address: Some(vec![10, 244, 1, 5]),
                response_message: Some(vec![0; 12]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let back = dnstap::Dnstap::decode(msg.encode_to_vec().as_slice()).expect("decodes");
        assert_eq!(back, msg);
    }
}
