//! `Link` headers (RFC 8288) as registries send them on paged answers: which value is the
//! next page, and whether following it keeps the client's credentials on the registry.

/// The URL a `Link` header's `rel="next"` value names (RFC 8288: values separated by commas,
/// each `<target>` with `;` parameters, `rel` a space-separated list), resolved against the
/// page it came with (`page`), if it is on `base`'s own scheme, host and port (a link
/// elsewhere is not followed: the client's credentials go with the request).
pub(crate) fn next_page(base: &str, page: &str, link: &str) -> Option<String> {
    let target = link_values(link).into_iter().find_map(|(target, params)| {
        let is_next = params.iter().any(|p| {
            let Some((name, value)) = p.split_once('=') else { return false };
            name.trim().eq_ignore_ascii_case("rel")
                && value.trim().trim_matches('"').split_whitespace().any(|r| r.eq_ignore_ascii_case("next"))
        });
        is_next.then_some(target)
    })?;
    let base = reqwest::Url::parse(base).ok()?;
    let url = reqwest::Url::parse(page).ok()?.join(&target).ok()?;
    let same = url.scheme() == base.scheme()
        && url.host_str() == base.host_str()
        && url.port_or_known_default() == base.port_or_known_default();
    same.then(|| url.to_string())
}

/// A `Link` header's values: each target and its parameters. Commas inside `<...>` or
/// quotes do not separate values.
fn link_values(header: &str) -> Vec<(String, Vec<String>)> {
    let mut values = Vec::new();
    let (mut current, mut in_target, mut in_quotes) = (String::new(), false, false);
    for c in header.chars() {
        match c {
            '<' if !in_quotes => in_target = true,
            '>' if !in_quotes => in_target = false,
            '"' if !in_target => in_quotes = !in_quotes,
            ',' if !in_target && !in_quotes => {
                values.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    values.push(current);
    values
        .into_iter()
        .filter_map(|v| {
            let mut parts = v.split(';');
            let target = parts.next()?.trim().strip_prefix('<')?.strip_suffix('>')?.to_string();
            Some((target, parts.map(|p| p.trim().to_string()).collect()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_page_is_the_link_whose_rel_is_next() {
        let (base, page) = ("https://r.example", "https://r.example/v2/a/referrers/d");
        let next = |link: &str| next_page(base, page, link);
        assert_eq!(
            next("</v2/a/referrers/d?last=x>; rel=\"next\"").as_deref(),
            Some("https://r.example/v2/a/referrers/d?last=x")
        );
        // Several values, in any order; a rel list; a query-only target against the page.
        assert_eq!(
            next("<?last=p>; rel=\"prev\", <?last=n>; rel=\"next\", <?last=z>; rel=\"last\"").as_deref(),
            Some("https://r.example/v2/a/referrers/d?last=n")
        );
        assert_eq!(
            next("<?n=1,2>; rel=\"last next\"").as_deref(),
            Some("https://r.example/v2/a/referrers/d?n=1,2")
        );
        assert_eq!(next("<?last=p>; rel=\"prev\""), None);
        assert_eq!(next("<https://elsewhere.example/v2/a/referrers/d?last=x>; rel=\"next\""), None);
        assert_eq!(next("<http://r.example/v2/a/referrers/d?last=x>; rel=\"next\""), None, "another scheme");
    }
}
