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

/// Adds gRPC server reflection (v1, and v1alpha, which grpcurl 1.8 speaks) to `router`, advertising
/// `services` and `grpc.health.v1.Health`: the descriptor set holds both daemons' services, and each
/// port lists only what it serves.
pub fn add_reflection(
    router: tonic::transport::server::Router,
    services: &[&'static str],
) -> Result<tonic::transport::server::Router, tonic_reflection::server::Error> {
    let builder = || {
        let b = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name(tonic_health::pb::health_server::SERVICE_NAME);
        services.iter().fold(b, |b, s| b.with_service_name(*s))
    };
    Ok(router
        .add_service(builder().build_v1()?)
        .add_service(builder().build_v1alpha()?))
}

/// proto3 JSON as grpcurl prints and reads it (camelCase names, defaults left out, 64-bit integers as
/// strings, timestamps in RFC 3339), for any message of [`FILE_DESCRIPTOR_SET`]: the descriptors
/// describe the mapping, so a new field needs no code here.
pub mod json {
    use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage, SerializeOptions};
    use std::sync::LazyLock;

    static POOL: LazyLock<Result<DescriptorPool, String>> = LazyLock::new(|| {
        DescriptorPool::decode(super::FILE_DESCRIPTOR_SET).map_err(|e| e.to_string())
    });

    fn descriptor(full_name: &str) -> Result<prost_reflect::MessageDescriptor, String> {
        let pool = POOL.as_ref().map_err(|e| format!("descriptor set: {e}"))?;
        pool.get_message_by_name(full_name)
            .ok_or_else(|| format!("no message {full_name} in the descriptor set"))
    }

    /// `message` (of protobuf type `full_name`, e.g. `dnsflow.v1.DnsEvent`) as grpcurl prints it.
    pub fn to_json<M: prost::Message>(
        message: &M,
        full_name: &str,
    ) -> Result<serde_json::Value, String> {
        let mut dynamic = DynamicMessage::new(descriptor(full_name)?);
        dynamic
            .transcode_from(message)
            .map_err(|e| format!("{full_name}: {e}"))?;
        dynamic
            .serialize_with_options(
                serde_json::value::Serializer,
                &SerializeOptions::new().skip_default_fields(true),
            )
            .map_err(|e| format!("{full_name}: {e}"))
    }

    /// Reads `value` as a `full_name` message. Field names may be camelCase (grpcurl) or as in the
    /// `.proto`; 64-bit integers may be strings or numbers; fields this build does not know (from a
    /// newer tapd) are ignored.
    pub fn from_json<M: prost::Message + Default>(
        value: &serde_json::Value,
        full_name: &str,
    ) -> Result<M, String> {
        let mut track = serde_path_to_error::Track::new();
        let dynamic = DynamicMessage::deserialize_with_options(
            descriptor(full_name)?,
            serde_path_to_error::Deserializer::new(value, &mut track),
            &DeserializeOptions::new().deny_unknown_fields(false),
        )
        .map_err(|e| match track.path().to_string().as_str() {
            "." => e.to_string(),
            path => format!("{path}: {e}"),
        })?;
        dynamic.transcode_to().map_err(|e| e.to_string())
    }
}

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
