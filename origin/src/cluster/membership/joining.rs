//! How the member list follows its sources: DNS answered again, entries new to it checked once
//! before they count, and an entry that answers as another member taken as its second
//! address. Kept apart from the health checks (`membership.rs`), which only move members up
//! and down.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use tracing::{info, warn};

use super::{Member, Membership};
use crate::cluster::member_entry::Source;

impl Membership {
    /// Resolve every DNS source again and bring the member list in line with the answers.
    pub(super) async fn refresh(&self) {
        let mut answers = Vec::new();
        for (index, source) in self.sources.iter().enumerate() {
            let answer = match source {
                Source::Fixed(_) => continue,
                Source::Dns { host, port } => self.dns.addrs(host, *port).await,
                Source::Srv(name) => self.dns.srv(name).await,
            };
            match answer {
                Ok(ids) => answers.push((index, ids)),
                Err(reason) => warn!(?source, %reason, "cluster DNS lookup failed; keeping the last answer"),
            }
        }
        let mut changed = false;
        let joined: Vec<String>;
        {
            let mut table = self.lock();
            for (index, ids) in answers {
                table.resolved.insert(index, ids);
            }
            let mut wanted: BTreeSet<String> = table.resolved.values().flatten().cloned().collect();
            for source in &self.sources {
                if let Source::Fixed(id) = source {
                    wanted.insert(id.clone());
                }
            }
            wanted.remove(&self.me);
            let gone: Vec<String> = table.others.keys().filter(|id| !wanted.contains(*id)).cloned().collect();
            for id in gone {
                if let Some(m) = table.others.remove(&id) {
                    info!(member = %id, "cluster member left the member list");
                    changed |= !m.is_self && !m.alias;
                }
            }
            joined = wanted.into_iter().filter(|id| !table.others.contains_key(id)).collect();
        }
        changed |= self.admit(joined).await;
        if changed {
            self.bump();
        }
    }

    /// Put entries new to the member list in it once each has been checked once: before its
    /// first reply an entry cannot be told apart from this origin or another member under a
    /// second address, and counted live meanwhile it would be placed on as a member of its
    /// own (a write's two owners one origin) and named in the member list GC compares. An
    /// entry whose check fails joins up all the same, so origins that start together work
    /// at once (it goes down after `health_fails` failures, as any member), unless it is
    /// this origin's own address ([`Membership::is_own_address`]): at start this origin's
    /// listener is not up yet to answer for it. `true` if the member list changed.
    async fn admit(&self, joined: Vec<String>) -> bool {
        if joined.is_empty() {
            return false;
        }
        // Whether a failed entry is this host's own address is a system call: asked before
        // the table's lock is taken.
        let results: Vec<_> = self
            .check_each(joined)
            .await
            .into_iter()
            .map(|(id, result)| {
                let own = result.is_err() && self.is_own_address(&id);
                (id, result, own)
            })
            .collect();
        let mut table = self.lock();
        let mut admitted = Vec::new();
        for (id, result, own) in results {
            if let std::collections::btree_map::Entry::Vacant(slot) = table.others.entry(id.clone()) {
                info!(member = %id, "cluster member joined the member list");
                let fixed = self.sources.iter().any(|s| matches!(s, Source::Fixed(f) if *f == id));
                slot.insert(Member { named_by_dns: !fixed, ..Member::new() });
                admitted.push((id, result, own));
            }
        }
        let mut changed = false;
        for (id, result, own) in admitted {
            let alias = matches!(&result, Ok(r) if r.id != id && table.others.contains_key(&r.id));
            if let Some(member) = table.others.get_mut(&id) {
                if own {
                    info!(member = %id, "cluster member looks like this origin's own address; not counted until it answers");
                    member.maybe_self = true;
                }
                self.apply(&id, member, result, alias);
                changed |= !member.is_self && !member.alias && !member.maybe_self;
            }
        }
        // An older entry that answered as one of these is a second address of it from now
        // on, not at its next check: counted until then, it was a second owner on the same
        // machine.
        let known: BTreeSet<String> = table.others.keys().cloned().collect();
        for (id, member) in table.others.iter_mut() {
            let second =
                member.answered.as_ref().is_some_and(|a| a != id && *a != self.me && known.contains(a));
            if second && !member.alias {
                info!(member = %id, answered = ?member.answered, "cluster member is another member under a second address; counting it once");
                changed |= member.live();
                member.alias = true;
            }
        }
        changed
    }

    /// Whether entry `id` is an address of this host with this origin's advertised port: the
    /// address a `dns+` name gives for this origin (its pod's IP), checked without asking it
    /// (an address is this host's when a socket can be bound to it).
    fn is_own_address(&self, id: &str) -> bool {
        let (Ok(entry), Some(port)) =
            (id.parse::<SocketAddr>(), self.me.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()))
        else {
            return false;
        };
        entry.port() == port && std::net::UdpSocket::bind((entry.ip(), 0)).is_ok()
    }
}
