//! Who may do what in which repository: `[[auth.rules]]` by repository pattern (first match
//! wins), else each user's `access` and the `anonymous` default. Pure functions.

use serde::{Deserialize, Serialize};

/// What a client may do where no rule matches (the older, registry-wide setting).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// Nothing at all.
    None,
    /// Reads only.
    Pull,
    /// Reads, writes and deletes.
    #[default]
    Push,
}

/// One action on a repository, as in a token scope (`repository:<name>:pull,push,delete`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    Pull,
    Push,
    Delete,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Pull => "pull",
            Action::Push => "push",
            Action::Delete => "delete",
        }
    }

    pub fn parse(s: &str) -> Option<Action> {
        match s {
            "pull" => Some(Action::Pull),
            "push" => Some(Action::Push),
            "delete" => Some(Action::Delete),
            _ => None,
        }
    }
}

/// One `[[auth.rules]]` entry. In the user lists, `"*"` means every authenticated user.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// A repository name pattern: `*` matches any run of characters, `/` included
    /// (`team/*`, `*`, `library/busybox`).
    pub repositories: String,
    #[serde(default)]
    pub pull: Vec<String>,
    /// Push implies pull (a client must read what it pushes).
    #[serde(default)]
    pub push: Vec<String>,
    #[serde(default)]
    pub delete: Vec<String>,
    /// Clients without credentials may pull.
    #[serde(default)]
    pub anonymous_pull: bool,
}

/// Who is asking, once authenticated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    Anonymous,
    User(String),
    /// A cluster process identified by the transport (TLS client certificate).
    Node(String),
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Principal::Anonymous => f.write_str("-"),
            Principal::User(u) => f.write_str(u),
            Principal::Node(n) => write!(f, "node:{n}"),
        }
    }
}

/// Whether `name` matches `pattern` (`*` matches any run of characters).
pub fn matches(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == b'*')
}

fn listed(list: &[String], user: &str) -> bool {
    list.iter().any(|u| u == "*" || u == user)
}

/// The first rule matching `repo`.
pub fn rule_for<'a>(rules: &'a [Rule], repo: &str) -> Option<&'a Rule> {
    rules.iter().find(|r| r.matches(repo))
}

/// How the published policy (what agents, and anyone who asks, read) writes an exact
/// repository name, a pattern without `*`: `sha256:` and the name's SHA-256 in hex. An agent
/// matches a name it is asked for; the publication no longer lists private repositories'
/// names (a guessed name can still be checked). Names never hold `:`, so no configured
/// pattern is taken for one.
pub const HASHED_NAME: &str = "sha256:";

/// A repository name as [`HASHED_NAME`] writes it.
pub fn hashed_name(name: &str) -> String {
    use sha2::Digest as _;
    format!("{HASHED_NAME}{}", hex::encode(sha2::Sha256::digest(name.as_bytes())))
}

impl Rule {
    /// Whether this rule's pattern (or its hashed exact name) takes `repo`.
    pub fn matches(&self, repo: &str) -> bool {
        if self.repositories.starts_with(HASHED_NAME) {
            return self.repositories == hashed_name(repo);
        }
        matches(&self.repositories, repo)
    }

    /// This rule as the policy publishes it: an exact name hashed, the user lists left out
    /// (agents decide anonymous pulls alone; users' rights are in their tokens).
    pub fn published(&self) -> Rule {
        let repositories = if self.repositories.contains('*') || self.repositories.starts_with(HASHED_NAME) {
            self.repositories.clone()
        } else {
            hashed_name(&self.repositories)
        };
        Rule { repositories, anonymous_pull: self.anonymous_pull, ..Rule::default() }
    }
}

/// The actions `principal` may take in `repo`. `default` is the access where no rule
/// matches (the user's `access`, or `anonymous` for a client without credentials).
pub fn allowed(rules: &[Rule], principal: &Principal, default: Access, repo: &str) -> Vec<Action> {
    if let Principal::Node(_) = principal {
        return vec![Action::Pull];
    }
    let Some(rule) = rule_for(rules, repo) else {
        return match default {
            Access::None => vec![],
            Access::Pull => vec![Action::Pull],
            Access::Push => vec![Action::Pull, Action::Push, Action::Delete],
        };
    };
    let mut out = Vec::new();
    match principal {
        Principal::User(u) => {
            if rule.anonymous_pull || listed(&rule.pull, u) || listed(&rule.push, u) {
                out.push(Action::Pull);
            }
            if listed(&rule.push, u) {
                out.push(Action::Push);
            }
            if listed(&rule.delete, u) {
                out.push(Action::Delete);
            }
        }
        _ => {
            if rule.anonymous_pull {
                out.push(Action::Pull);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert!(matches("team/*", "team/app"));
        assert!(matches("team/*", "team/a/b"));
        assert!(!matches("team/*", "teams/app"));
        assert!(matches("*", "x"));
        assert!(matches("*/base", "lib/base"));
        assert!(!matches("*/base", "lib/base2"));
        assert!(matches("a*b*c", "axxbyyc"));
        assert!(!matches("library/busybox", "library/busybox2"));
    }

    fn rules() -> Vec<Rule> {
        vec![
            Rule {
                repositories: "private/*".into(),
                pull: vec!["alice".into()],
                push: vec!["ci".into()],
                delete: vec!["ci".into()],
                anonymous_pull: false,
            },
            Rule {
                repositories: "public/*".into(),
                push: vec!["*".into()],
                anonymous_pull: true,
                ..Rule::default()
            },
        ]
    }

    /// The published form of a rule hides an exact name and decides as the rule does; a
    /// pattern stays as it is.
    #[test]
    fn a_published_exact_name_is_hashed_and_matches_the_same() {
        let exact =
            Rule { repositories: "team/secret-app".into(), pull: vec!["alice".into()], ..Rule::default() };
        let published = exact.published();
        assert!(!published.repositories.contains("secret"), "{}", published.repositories);
        assert!(published.pull.is_empty());
        for name in ["team/secret-app", "team/secret-ap", "team/secret-app2", "team"] {
            assert_eq!(published.matches(name), exact.matches(name), "{name}");
        }
        let public = Rule { repositories: "pub/*".into(), anonymous_pull: true, ..Rule::default() };
        assert_eq!(public.published().repositories, "pub/*");
        assert_eq!(published.published(), published, "publishing twice changes nothing");
        let rules = vec![exact.published(), public.published()];
        let anonymous = |repo| allowed(&rules, &Principal::Anonymous, Access::Pull, repo);
        assert_eq!(anonymous("team/secret-app"), vec![], "the hashed rule still shadows the default");
        assert_eq!(anonymous("team/other"), vec![Action::Pull]);
    }

    #[test]
    fn first_matching_rule_decides() {
        let r = rules();
        let alice = Principal::User("alice".into());
        let ci = Principal::User("ci".into());
        assert_eq!(allowed(&r, &alice, Access::Push, "private/app"), vec![Action::Pull]);
        assert_eq!(
            allowed(&r, &ci, Access::None, "private/app"),
            vec![Action::Pull, Action::Push, Action::Delete]
        );
        assert_eq!(allowed(&r, &Principal::Anonymous, Access::Push, "private/app"), vec![]);
        assert_eq!(allowed(&r, &Principal::Anonymous, Access::None, "public/app"), vec![Action::Pull]);
        assert_eq!(allowed(&r, &alice, Access::None, "public/app"), vec![Action::Pull, Action::Push]);
        // No rule: the default.
        assert_eq!(allowed(&r, &alice, Access::Pull, "other"), vec![Action::Pull]);
        assert_eq!(allowed(&r, &Principal::Anonymous, Access::None, "other"), vec![]);
        assert_eq!(
            allowed(&r, &Principal::Node("n".into()), Access::None, "private/app"),
            vec![Action::Pull]
        );
    }
}
