//! OCI and Docker media types, and builders for the manifests the tests push.
//!
//! Manifests are serialized pretty-printed with a trailing newline so that a
//! registry which re-encodes instead of storing the exact bytes is caught.

use crate::content::{random_bytes, sha256};
use serde_json::{json, Map, Value};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";

/// Every manifest type the tests push, for `Accept` headers.
pub const ACCEPT_ALL: &str = "application/vnd.oci.image.manifest.v1+json, \
     application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.docker.distribution.manifest.list.v2+json";

/// The two-byte `{}` blob the OCI image spec names as the empty descriptor.
pub const EMPTY_JSON: &[u8] = b"{}";

/// Content and its descriptor fields.
#[derive(Clone, Debug)]
pub struct Blob {
    pub media_type: String,
    pub data: Vec<u8>,
    pub digest: String,
}

impl Blob {
    pub fn new(media_type: &str, data: Vec<u8>) -> Blob {
        Blob { media_type: media_type.to_string(), digest: sha256(&data), data }
    }

    /// A random layer of `len` bytes.
    pub fn random_layer(media_type: &str, len: usize) -> Blob {
        Blob::new(media_type, random_bytes(len))
    }

    /// A small, unique image config.
    pub fn config(media_type: &str) -> Blob {
        let config = json!({
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": []},
            "config": {"Labels": {"test.nonce": crate::content::unique_token()}},
        });
        Blob::new(media_type, to_pretty_bytes(&config))
    }

    pub fn descriptor(&self) -> Value {
        json!({
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.data.len(),
        })
    }
}

/// A manifest (or index) ready to push: bytes, digest and media type.
#[derive(Clone, Debug)]
pub struct Manifest {
    pub media_type: String,
    pub bytes: Vec<u8>,
    pub digest: String,
}

impl Manifest {
    pub fn from_value(media_type: &str, value: &Value) -> Manifest {
        Manifest::from_bytes(media_type, to_pretty_bytes(value))
    }

    pub fn from_bytes(media_type: &str, bytes: Vec<u8>) -> Manifest {
        Manifest { media_type: media_type.to_string(), digest: sha256(&bytes), bytes }
    }

    /// The descriptor of this manifest, as an index entry or a `subject`.
    pub fn descriptor(&self) -> Value {
        json!({
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.bytes.len(),
        })
    }
}

/// An image manifest value: `schemaVersion`, `mediaType`, `config`, `layers`.
/// Works for OCI and Docker schema 2 alike (pass the matching media types).
pub fn image_manifest_value(media_type: &str, config: &Blob, layers: &[Blob]) -> Value {
    json!({
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": config.descriptor(),
        "layers": layers.iter().map(Blob::descriptor).collect::<Vec<_>>(),
    })
}

/// An index value listing `children` as linux/amd64, linux/arm64, ...
pub fn index_value(media_type: &str, children: &[&Manifest]) -> Value {
    const ARCHES: [&str; 4] = ["amd64", "arm64", "ppc64le", "s390x"];
    let manifests: Vec<Value> = children
        .iter()
        .enumerate()
        .map(|(i, child)| {
            let mut descriptor = child.descriptor();
            descriptor["platform"] = json!({
                "architecture": ARCHES[i % ARCHES.len()],
                "os": "linux",
            });
            descriptor
        })
        .collect();
    json!({
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": manifests,
    })
}

/// An OCI artifact manifest pointing at `subject`: empty config, one layer,
/// and the given `artifactType` (none: the config media type stands in) and
/// annotations.
pub fn artifact_value(
    subject: &Manifest,
    artifact_type: Option<&str>,
    config: &Blob,
    layer: &Blob,
    annotations: &[(&str, &str)],
) -> Value {
    let mut value = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.descriptor(),
        "layers": [layer.descriptor()],
        "subject": subject.descriptor(),
    });
    if let Some(artifact_type) = artifact_type {
        value["artifactType"] = json!(artifact_type);
    }
    if !annotations.is_empty() {
        value["annotations"] = annotations_value(annotations);
    }
    value
}

/// A JSON object of string annotations.
pub fn annotations_value(annotations: &[(&str, &str)]) -> Value {
    let map: Map<String, Value> = annotations.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
    Value::Object(map)
}

/// Pretty-printed JSON with a trailing newline.
pub fn to_pretty_bytes(value: &Value) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(value).expect("serialize JSON");
    bytes.push(b'\n');
    bytes
}
