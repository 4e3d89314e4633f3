//! Splits a `/v2/...` path into the endpoint it names. Repository names contain slashes, so
//! the path is matched from its end, as the spec's grammar implies.

/// The endpoint a path names, with its raw (not yet validated) parts.
#[derive(Debug, PartialEq, Eq)]
pub enum Route<'a> {
    Base,
    Catalog,
    Blob { name: &'a str, digest: &'a str },
    UploadStart { name: &'a str },
    Upload { name: &'a str, id: &'a str },
    Manifest { name: &'a str, reference: &'a str },
    Tags { name: &'a str },
    Referrers { name: &'a str, digest: &'a str },
}

/// Match a request path; `None` means 404 without a spec body.
pub fn parse_route(path: &str) -> Option<Route<'_>> {
    let rest = path.strip_prefix("/v2")?;
    if rest.is_empty() || rest == "/" {
        return Some(Route::Base);
    }
    let rest = rest.strip_prefix('/')?;
    if rest == "_catalog" {
        return Some(Route::Catalog);
    }
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Some(Route::Tags { name });
    }
    if let Some(name) = rest.strip_suffix("/blobs/uploads").or_else(|| rest.strip_suffix("/blobs/uploads/")) {
        return Some(Route::UploadStart { name });
    }
    let (head, last) = rest.rsplit_once('/')?;
    if last.is_empty() {
        return None;
    }
    if let Some(name) = head.strip_suffix("/blobs/uploads") {
        return Some(Route::Upload { name, id: last });
    }
    if let Some(name) = head.strip_suffix("/blobs") {
        return Some(Route::Blob { name, digest: last });
    }
    if let Some(name) = head.strip_suffix("/manifests") {
        return Some(Route::Manifest { name, reference: last });
    }
    if let Some(name) = head.strip_suffix("/referrers") {
        return Some(Route::Referrers { name, digest: last });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(parse_route("/v2/"), Some(Route::Base));
        assert_eq!(parse_route("/v2"), Some(Route::Base));
        assert_eq!(parse_route("/v2/_catalog"), Some(Route::Catalog));
        assert_eq!(parse_route("/v2/a/b/tags/list"), Some(Route::Tags { name: "a/b" }));
        assert_eq!(parse_route("/v2/a/blobs/uploads/"), Some(Route::UploadStart { name: "a" }));
        assert_eq!(parse_route("/v2/a/blobs/uploads"), Some(Route::UploadStart { name: "a" }));
        assert_eq!(parse_route("/v2/a/b/blobs/uploads/xyz"), Some(Route::Upload { name: "a/b", id: "xyz" }));
        assert_eq!(parse_route("/v2/a/blobs/sha256:1"), Some(Route::Blob { name: "a", digest: "sha256:1" }));
        assert_eq!(
            parse_route("/v2/x/manifests/latest"),
            Some(Route::Manifest { name: "x", reference: "latest" })
        );
        // A repository may itself be called "blobs" or "manifests".
        assert_eq!(
            parse_route("/v2/blobs/manifests/manifests/v1"),
            Some(Route::Manifest { name: "blobs/manifests", reference: "v1" })
        );
        assert_eq!(
            parse_route("/v2/r/referrers/sha256:1"),
            Some(Route::Referrers { name: "r", digest: "sha256:1" })
        );
        assert_eq!(parse_route("/v2/r/unknown/x"), None);
        assert_eq!(parse_route("/v3/"), None);
        assert_eq!(parse_route("/v2/r/manifests/"), None);
    }
}
