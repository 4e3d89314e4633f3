//! Manifest parsing and validation: what a pushed manifest is, what it references, and what
//! the referrers API needs to know about it. The stored bytes are never re-serialized.

use std::collections::HashMap;

use oci_spec::image::{Descriptor as OciDescriptor, ImageIndex, ImageManifest};
use serde::{Deserialize, Serialize};

use crate::digest::Digest;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";

/// Layer media types the image spec calls non-distributable ("foreign"): such a layer may be
/// absent from the registry (clients fetch it from its `urls`, or already have it), so a
/// manifest that references it is accepted without it, and agents never fetch it.
pub const NON_DISTRIBUTABLE: [&str; 4] = [
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
];

/// Whether a layer of `media_type` is non-distributable.
pub fn is_non_distributable(media_type: &str) -> bool {
    NON_DISTRIBUTABLE.contains(&media_type)
}

/// Default size limit for a manifest, the 4 MiB the spec suggests registries accept.
pub const DEFAULT_MAX_MANIFEST_SIZE: u64 = 4 * 1024 * 1024;

/// Why a manifest is refused (`MANIFEST_INVALID`).
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("Docker schema 1 manifests are not supported; push with a client that writes schema 2 or OCI")]
    Schema1,
    #[error("unsupported manifest media type {0:?}")]
    UnsupportedMediaType(String),
    #[error("Content-Type {header:?} does not match the manifest's mediaType {body:?}")]
    MediaTypeMismatch { header: String, body: String },
    #[error("manifest is not valid JSON of its media type: {0}")]
    Malformed(String),
    #[error("schemaVersion must be 2")]
    SchemaVersion,
    #[error("descriptor digest {0:?} is invalid or uses an unsupported algorithm")]
    BadDigest(String),
}

/// The kind of manifest, which decides what its references are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Image,
    Index,
}

/// A descriptor of a manifest as the referrers API lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReferrerDescriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub annotations: Option<HashMap<String, String>>,
}

/// The tag under which a registry without the referrers API keeps an index of `subject`'s
/// referrers (spec, "Referrers Tag Schema"): the algorithm cut to 32 characters, `-`, the
/// encoded part cut to 64 (a sha512 subject's tag is `sha512-` and its first 64 hex
/// characters, as clients push it), characters a tag may not hold replaced with `-`.
pub fn referrers_tag(subject: &Digest) -> String {
    let cut = |s: &str, n: usize| -> String {
        s.chars()
            .take(n)
            .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') { c } else { '-' })
            .collect()
    };
    format!("{}-{}", cut(subject.algorithm().name(), 32), cut(subject.hex(), 64))
}

/// The descriptors an image index lists: a referrers API answer, or the index a referrers tag
/// names.
pub fn index_descriptors(bytes: &[u8]) -> Result<Vec<ReferrerDescriptor>, ManifestError> {
    #[derive(Deserialize)]
    struct Index {
        #[serde(default)]
        manifests: Vec<ReferrerDescriptor>,
    }
    let index: Index = serde_json::from_slice(bytes).map_err(|e| ManifestError::Malformed(e.to_string()))?;
    Ok(index.manifests)
}

/// What the registry must know about a manifest to store it.
#[derive(Clone, Debug)]
pub struct ParsedManifest {
    /// The media type it is stored and served with.
    pub media_type: String,
    /// Blobs (config, layers) that must already be in the repository.
    pub blobs: Vec<Digest>,
    /// Non-distributable layers: referenced, but not required to be in the repository.
    pub foreign: Vec<Digest>,
    /// Manifests (index entries) that must already be in the repository.
    pub children: Vec<Digest>,
    /// The manifest this one refers to (referrers API), if any.
    pub subject: Option<Digest>,
    pub artifact_type: Option<String>,
    pub annotations: Option<HashMap<String, String>>,
}

impl ParsedManifest {
    /// The descriptor listed by the referrers API for this manifest.
    pub fn referrer_descriptor(&self, digest: &Digest, size: u64) -> ReferrerDescriptor {
        ReferrerDescriptor {
            media_type: self.media_type.clone(),
            digest: digest.clone(),
            size,
            artifact_type: self.artifact_type.clone(),
            annotations: self.annotations.clone(),
        }
    }
}

/// Just the fields needed to tell manifest kinds apart before full parsing.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Probe {
    media_type: Option<String>,
    manifests: Option<serde_json::Value>,
    config: Option<serde_json::Value>,
}

fn kind_of(media_type: &str) -> Result<Kind, ManifestError> {
    match media_type {
        OCI_MANIFEST | DOCKER_MANIFEST => Ok(Kind::Image),
        OCI_INDEX | DOCKER_MANIFEST_LIST => Ok(Kind::Index),
        DOCKER_SCHEMA1 | DOCKER_SCHEMA1_SIGNED => Err(ManifestError::Schema1),
        other => Err(ManifestError::UnsupportedMediaType(other.to_string())),
    }
}

fn digest_of(d: &OciDescriptor) -> Result<Digest, ManifestError> {
    let s = d.digest().to_string();
    s.parse().map_err(|_| ManifestError::BadDigest(s))
}

/// Parse and validate a pushed manifest. `content_type` is the request's Content-Type, if any.
pub fn parse_manifest(content_type: Option<&str>, bytes: &[u8]) -> Result<ParsedManifest, ManifestError> {
    let header_type = content_type
        .map(|c| c.split(';').next().unwrap_or("").trim().to_string())
        .filter(|c| !c.is_empty() && c != "application/json" && c != "application/octet-stream");
    if let Some(h) = &header_type {
        if h == DOCKER_SCHEMA1 || h == DOCKER_SCHEMA1_SIGNED {
            return Err(ManifestError::Schema1);
        }
    }
    let probe: Probe = serde_json::from_slice(bytes).map_err(|e| ManifestError::Malformed(e.to_string()))?;
    if let (Some(h), Some(b)) = (&header_type, &probe.media_type) {
        if h != b {
            return Err(ManifestError::MediaTypeMismatch { header: h.clone(), body: b.clone() });
        }
    }
    let media_type = match (header_type, probe.media_type) {
        (Some(t), _) | (None, Some(t)) => t,
        (None, None) if probe.manifests.is_some() => OCI_INDEX.to_string(),
        (None, None) if probe.config.is_some() => OCI_MANIFEST.to_string(),
        (None, None) => {
            return Err(ManifestError::Malformed("no mediaType and no config or manifests".into()))
        }
    };
    match kind_of(&media_type)? {
        Kind::Image => {
            let m: ImageManifest =
                serde_json::from_slice(bytes).map_err(|e| ManifestError::Malformed(e.to_string()))?;
            if m.schema_version() != 2 {
                return Err(ManifestError::SchemaVersion);
            }
            let mut blobs = vec![digest_of(m.config())?];
            let mut foreign = Vec::new();
            for layer in m.layers() {
                if is_non_distributable(layer.media_type().as_ref()) {
                    foreign.push(digest_of(layer)?);
                } else {
                    blobs.push(digest_of(layer)?);
                }
            }
            // Empty or missing: the config's media type (the spec's referrers rule).
            let artifact_type = m
                .artifact_type()
                .as_ref()
                .map(|a| a.to_string())
                .filter(|a| !a.is_empty())
                .or_else(|| Some(m.config().media_type().to_string()));
            Ok(ParsedManifest {
                media_type,
                blobs,
                foreign,
                children: Vec::new(),
                subject: m.subject().as_ref().map(digest_of).transpose()?,
                artifact_type,
                annotations: m.annotations().clone(),
            })
        }
        Kind::Index => {
            let i: ImageIndex =
                serde_json::from_slice(bytes).map_err(|e| ManifestError::Malformed(e.to_string()))?;
            if i.schema_version() != 2 {
                return Err(ManifestError::SchemaVersion);
            }
            let children = i.manifests().iter().map(digest_of).collect::<Result<Vec<_>, _>>()?;
            Ok(ParsedManifest {
                media_type,
                blobs: Vec::new(),
                foreign: Vec::new(),
                children,
                subject: i.subject().as_ref().map(digest_of).transpose()?,
                // Empty or missing: none (the spec's referrers rule for an index).
                artifact_type: i.artifact_type().as_ref().map(|a| a.to_string()).filter(|a| !a.is_empty()),
                annotations: i.annotations().clone(),
            })
        }
    }
}

#[cfg(test)]
mod referrers_tests {
    use super::*;

    #[test]
    fn the_referrers_tag_is_the_digest_cut_to_a_tag() {
        let d = Digest::of(crate::digest::Algorithm::Sha256, b"x");
        assert_eq!(referrers_tag(&d), format!("sha256-{}", d.hex()));
        // The spec's example: the encoded part cut to 64 characters.
        let long = Digest::of(crate::digest::Algorithm::Sha512, b"x");
        let tag = referrers_tag(&long);
        assert_eq!(tag, format!("sha512-{}", &long.hex()[..64]));
        assert!(tag.parse::<crate::name::Tag>().is_ok(), "{tag}");
    }

    #[test]
    fn an_index_gives_its_descriptors() {
        let d = Digest::of(crate::digest::Algorithm::Sha256, b"sig");
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{d}","size":12,"artifactType":"application/example","annotations":{{"a":"b"}},"platform":{{"os":"linux"}}}}]}}"#
        );
        let found = index_descriptors(body.as_bytes()).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].digest.clone(), found[0].size), (d, 12));
        assert_eq!(found[0].artifact_type.as_deref(), Some("application/example"));
        assert!(index_descriptors(b"{}").unwrap().is_empty());
        assert!(index_descriptors(b"not json").is_err());
        assert!(
            index_descriptors(br#"{"manifests":[{"digest":"sha256:00","size":1,"mediaType":"x"}]}"#).is_err()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Algorithm;

    fn d(s: &str) -> String {
        Digest::of(Algorithm::Sha256, s.as_bytes()).to_string()
    }

    fn image(media_type: Option<&str>) -> String {
        let mt = media_type.map(|m| format!(r#""mediaType":"{m}","#)).unwrap_or_default();
        format!(
            r#"{{"schemaVersion":2,{mt}"config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":2}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":3}}]}}"#,
            d("c"),
            d("l")
        )
    }

    #[test]
    fn non_distributable_layers_are_referenced_but_not_required() {
        for foreign_type in NON_DISTRIBUTABLE {
            let body = format!(
                r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":2}},"layers":[{{"mediaType":"{foreign_type}","digest":"{}","size":3,"urls":["https://example.com/layer"]}},{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":3}}]}}"#,
                d("c"),
                d("foreign"),
                d("l")
            );
            let m = parse_manifest(Some(OCI_MANIFEST), body.as_bytes()).unwrap();
            assert_eq!(m.blobs.iter().map(|b| b.to_string()).collect::<Vec<_>>(), vec![d("c"), d("l")]);
            assert_eq!(m.foreign.iter().map(|b| b.to_string()).collect::<Vec<_>>(), vec![d("foreign")]);
        }
        assert!(!is_non_distributable("application/vnd.oci.image.layer.v1.tar+gzip"));
    }

    #[test]
    fn parses_image_manifest_references() {
        let m = parse_manifest(Some(OCI_MANIFEST), image(Some(OCI_MANIFEST)).as_bytes()).unwrap();
        assert_eq!(m.media_type, OCI_MANIFEST);
        assert_eq!(m.blobs.len(), 2);
        assert_eq!(m.artifact_type.as_deref(), Some("application/vnd.oci.image.config.v1+json"));
        assert!(m.subject.is_none());
    }

    #[test]
    fn an_empty_artifact_type_counts_as_missing() {
        let body = image(Some(OCI_MANIFEST)).replacen('{', r#"{"artifactType":"","#, 1);
        let m = parse_manifest(Some(OCI_MANIFEST), body.as_bytes()).unwrap();
        assert_eq!(m.artifact_type.as_deref(), Some("application/vnd.oci.image.config.v1+json"));
        let index = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","artifactType":"","manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":5}}]}}"#,
            d("a")
        );
        assert_eq!(parse_manifest(Some(OCI_INDEX), index.as_bytes()).unwrap().artifact_type, None);
    }

    #[test]
    fn media_type_from_body_when_no_header() {
        let m = parse_manifest(None, image(Some(DOCKER_MANIFEST)).as_bytes()).unwrap();
        assert_eq!(m.media_type, DOCKER_MANIFEST);
        let m = parse_manifest(None, image(None).as_bytes()).unwrap();
        assert_eq!(m.media_type, OCI_MANIFEST);
    }

    #[test]
    fn parses_index_children_and_subject() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","artifactType":"application/x.sig","manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":5,"platform":{{"architecture":"arm64","os":"linux"}}}}],"subject":{{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":9}}}}"#,
            d("a"),
            d("s")
        );
        let m = parse_manifest(Some(OCI_INDEX), body.as_bytes()).unwrap();
        assert_eq!(m.children, vec![d("a").parse().unwrap()]);
        assert_eq!(m.subject, Some(d("s").parse().unwrap()));
        assert_eq!(m.artifact_type.as_deref(), Some("application/x.sig"));
    }

    #[test]
    fn rejects_bad_manifests() {
        assert!(matches!(parse_manifest(Some(OCI_MANIFEST), b"{not json"), Err(ManifestError::Malformed(_))));
        assert!(matches!(parse_manifest(Some(DOCKER_SCHEMA1_SIGNED), b"{}"), Err(ManifestError::Schema1)));
        assert!(matches!(
            parse_manifest(
                None,
                br#"{"schemaVersion":1,"mediaType":"application/vnd.docker.distribution.manifest.v1+json"}"#
            ),
            Err(ManifestError::Schema1)
        ));
        assert!(matches!(
            parse_manifest(Some(OCI_INDEX), image(Some(OCI_MANIFEST)).as_bytes()),
            Err(ManifestError::MediaTypeMismatch { .. })
        ));
        assert!(matches!(
            parse_manifest(Some("text/plain"), image(None).as_bytes()),
            Err(ManifestError::UnsupportedMediaType(_))
        ));
        let bad_digest = image(None).replace(&d("l"), "md5:abc");
        assert!(parse_manifest(None, bad_digest.as_bytes()).is_err());
        let v1 = image(None).replace("\"schemaVersion\":2", "\"schemaVersion\":3");
        assert!(matches!(parse_manifest(None, v1.as_bytes()), Err(ManifestError::SchemaVersion)));
    }
}
