//! What a simulated host's downloads do, as `p2p/src/swarm.rs` does it for a real agent:
//! start, tick, announce to the real tracker store, carry out the state machine's actions,
//! fetch from the origin over HTTP, take in pieces and spread `have`s, finish, fail and leave.

use super::*;

impl Sim {
    pub(super) fn start(&mut self, node: usize) {
        let host = self.host(node);
        self.nodes[node].alive = true;
        self.nodes[node].started = true;
        self.started_at[host] = Some(self.now);
        self.blobs_left[host] = self.metas.len();
        let now = self.instant();
        for blob in 0..self.metas.len() {
            let meta = &self.metas[blob];
            let have = Bitfield::new(meta.piece_count());
            let n = &self.nodes[node];
            let rng = StdRng::seed_from_u64(self.cfg.seed ^ ((node as u64) << 20) ^ blob as u64);
            let mut state = match SwarmState::with_rng(
                self.cfg.scheduler.clone(),
                n.peer_id,
                n.addr,
                meta,
                have.clone(),
                now,
                rng,
            ) {
                Ok(s) => s,
                Err(_) => {
                    self.fail(node);
                    return;
                }
            };
            if let Some(blacklist) = n.flow.blacklist_for(meta, now) {
                state = state.with_blacklist(blacklist);
            }
            let actions = state.start();
            let slot = n.flow.join();
            let n = &mut self.nodes[node];
            n.have[blob] = Some(have);
            n.downloads[blob] = Some(Download { state, slot, outbound: Vec::new(), fill_pending: false });
            self.after(nanos(TICK), Ev::Tick(node, blob));
            self.act(node, blob, actions);
            self.want_fill(node, blob);
        }
        self.after(nanos(ANNOUNCE_INTERVAL), Ev::SeedAnnounce(node));
    }

    pub(super) fn tick(&mut self, node: usize, blob: usize) {
        let Some(d) = self.nodes[node].downloads[blob].as_ref() else { return };
        let received: Vec<(PeerId, ConnBytes)> = d
            .outbound
            .iter()
            .filter_map(|&c| self.conn(c).map(|k| (self.nodes[k.server].peer_id, self.conn_bytes(c))))
            .collect();
        let now = self.instant();
        let Some(d) = self.download(node, blob) else { return };
        let result = d.state.tick(now, &received);
        let traded = d.state.take_rotations();
        self.counters.rotations += traded;
        match result {
            Ok(actions) => {
                self.act(node, blob, actions);
                self.after(nanos(TICK), Ev::Tick(node, blob));
                self.want_fill(node, blob);
            }
            Err(_) => self.fail(node),
        }
    }

    /// The origins the tracker lists as seeders: it learns of a lost one only when its
    /// cached list of seeders expires.
    pub(super) fn origin_seeders(&self) -> Vec<PeerInfo> {
        let ttl = nanos(SEEDER_CACHE_TTL);
        self.nodes[..self.origins()]
            .iter()
            .filter(|n| n.lost_at.is_none_or(|at| self.now < at.saturating_add(ttl)))
            .map(|n| PeerInfo { peer_id: n.hex.clone(), addr: n.addr, complete: true, origin: true })
            .collect()
    }

    pub(super) fn announce(&mut self, node: usize, blob: usize) {
        if self.download(node, blob).is_none() {
            return;
        }
        let peers = if self.cfg.tracker_dead {
            None
        } else {
            let now = self.instant();
            let origins = self.origin_seeders();
            let (digest, n) = (self.metas[blob].digest(), &self.nodes[node]);
            if self.tracker.announce(digest, &n.hex, n.addr, false, now) {
                Some(self.tracker.handout(
                    digest,
                    &n.hex,
                    &origins,
                    HANDOUT_LIMIT,
                    now,
                    &mut self.tracker_rng,
                ))
            } else {
                None
            }
        };
        self.after(self.rtt, Ev::AnnounceReply(node, blob, peers));
    }

    /// The agent's seeding loop: every interval, announce each complete blob as complete.
    pub(super) fn seed_announce(&mut self, node: usize) {
        if !self.nodes[node].alive {
            return;
        }
        if !self.cfg.tracker_dead {
            let now = self.instant();
            for blob in 0..self.metas.len() {
                let n = &self.nodes[node];
                if n.have[blob].as_ref().is_some_and(Bitfield::is_complete) {
                    self.tracker.announce(self.metas[blob].digest(), &n.hex, n.addr, true, now);
                }
            }
        }
        self.after(nanos(ANNOUNCE_INTERVAL), Ev::SeedAnnounce(node));
    }

    /// Carry out a download's decisions, as `Swarm::act` does.
    pub(super) fn act(&mut self, node: usize, blob: usize, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Connect(addr) => self.connect(node, blob, addr),
                Action::Request { peer, index } => match self.conn_to(node, blob, &peer) {
                    Some(c) => self.after(self.half_rtt, Ev::RequestArrives(c, index)),
                    None => {
                        if let Some(d) = self.download(node, blob) {
                            d.state.request_failed(&peer, index);
                        }
                    }
                },
                Action::Cancel { peer, index } => {
                    if let Some(c) = self.conn_to(node, blob, &peer) {
                        self.after(self.half_rtt, Ev::CancelArrives(c, index));
                    }
                }
                Action::TimedOut { peer, index } => {
                    self.counters.piece_timeouts += 1;
                    if let Some(c) = self.conn_to(node, blob, &peer) {
                        self.after(self.half_rtt, Ev::CancelArrives(c, index));
                    }
                }
                Action::Disconnect(peer) => {
                    if let Some(c) = self.conn_to(node, blob, &peer) {
                        self.close(c, false);
                    }
                }
                Action::Fetch { index } => match (0..self.origins()).find(|&o| self.nodes[o].alive) {
                    Some(origin) => self.after(self.half_rtt, Ev::FetchStart { node, blob, index, origin }),
                    None => self.after(self.rtt, Ev::FetchFailed(node, blob, index)),
                },
                Action::Announce { after } => self.after(nanos(after), Ev::AnnounceSend(node, blob)),
            }
        }
    }

    pub(super) fn fetch_start(&mut self, node: usize, blob: usize, index: u32, origin: usize) {
        if self.download(node, blob).is_none() {
            return;
        }
        if !self.nodes[origin].alive {
            self.after(self.half_rtt, Ev::FetchFailed(node, blob, index));
            return;
        }
        let uses = self.uses(origin, node);
        let len = self.piece_len(blob, index) as f64;
        self.net.add_flow(&uses, len, Owner::Fetch { node, blob, index, origin }, self.now);
    }

    /// A verified piece reaches `node`'s download, from a peer or the HTTP fallback.
    pub(super) fn receive(&mut self, node: usize, blob: usize, from: PeerId, index: u32) {
        let now = self.instant();
        let len = self.piece_len(blob, index);
        if self.nodes[node].downloads[blob].is_none() {
            return;
        }
        let Some(have) = self.nodes[node].have[blob].as_mut() else { return };
        let fresh = !have.get(index);
        if fresh {
            let _ = have.set(index);
            let host = self.host(node);
            self.progress[host].got(self.now, self.image_pieces);
            self.spread_have(node, blob, index);
        } else {
            self.counters.duplicate_bytes += len;
        }
        let Some(d) = self.download(node, blob) else { return };
        match d.state.stored(from, index, Stored::Ok, now) {
            Ok(actions) => self.act(node, blob, actions),
            Err(_) => {
                self.fail(node);
                return;
            }
        }
        if self.download(node, blob).is_some_and(|d| d.state.is_complete()) {
            self.finish(node, blob);
        } else {
            self.want_fill(node, blob);
        }
    }

    /// `node` got piece `index`: its server tells its downloaders (`have`), and it tells the
    /// origins it is connected to, whose super-seeding counts holders.
    pub(super) fn spread_have(&mut self, node: usize, blob: usize, index: u32) {
        let peer = self.nodes[node].peer_id;
        let now = self.instant();
        let inbound = self.nodes[node].inbound[blob].clone();
        for c in inbound {
            let Some(client) = self.conn(c).map(|k| k.client) else { continue };
            let Some(d) = self.download(client, blob) else { continue };
            d.state.have(&peer, index, now);
            // The loop runs `fill` after every event; only a `have` that opens a request
            // can change what it decides.
            let picker = d.state.picker();
            if !picker.have().get(index) && picker.in_flight(index) == 0 {
                self.want_fill(client, blob);
            }
        }
        let outbound =
            self.nodes[node].downloads[blob].as_ref().map(|d| d.outbound.clone()).unwrap_or_default();
        for c in outbound {
            let Some(server) = self.conn(c).map(|k| k.server) else { continue };
            let gained = match &self.nodes[server].super_seed {
                Some(ss) => ss.gained(self.metas[blob].digest(), index),
                None => false,
            };
            if gained {
                if let Some(counted) = self.conn_mut(c).and_then(|k| k.counted.as_mut()) {
                    let _ = counted.set(index);
                }
            }
        }
    }

    /// A download completed: its connections close, the node announces itself complete and
    /// goes on seeding.
    pub(super) fn finish(&mut self, node: usize, blob: usize) {
        let outbound =
            self.nodes[node].downloads[blob].as_ref().map(|d| d.outbound.clone()).unwrap_or_default();
        for c in outbound {
            self.close(c, false);
        }
        let now = self.instant();
        if let Some(mut d) = self.nodes[node].downloads[blob].take() {
            let blacklist = d.state.take_blacklist();
            self.nodes[node].flow.keep_blacklist(&self.metas[blob], blacklist, now);
        }
        if !self.cfg.tracker_dead {
            let n = &self.nodes[node];
            self.tracker.announce(self.metas[blob].digest(), &n.hex, n.addr, true, now);
        }
        let host = self.host(node);
        self.blobs_left[host] = self.blobs_left[host].saturating_sub(1);
        if self.blobs_left[host] == 0 && self.finished_at[host].is_none() {
            self.finished_at[host] = Some(self.now);
            self.running -= 1;
        }
    }

    /// A host's download gave up (the state machine's `Fatal`).
    pub(super) fn fail(&mut self, node: usize) {
        let host = self.host(node);
        if !self.failed[host] && self.finished_at[host].is_none() {
            self.failed[host] = true;
            self.running -= 1;
        }
        self.drop_downloads(node);
    }

    pub(super) fn drop_downloads(&mut self, node: usize) {
        for blob in 0..self.metas.len() {
            let outbound =
                self.nodes[node].downloads[blob].as_ref().map(|d| d.outbound.clone()).unwrap_or_default();
            for c in outbound {
                self.close(c, false);
            }
            self.nodes[node].downloads[blob] = None;
        }
    }

    /// A node's process dies: every connection to and from it closes, its HTTP transfers
    /// (as an origin) fail.
    pub(super) fn leave(&mut self, node: usize) {
        if !self.nodes[node].alive {
            return;
        }
        if !self.nodes[node].origin {
            let host = self.host(node);
            if self.finished_at[host].is_none() && !self.failed[host] {
                self.failed[host] = true;
                self.running -= 1;
            }
        }
        self.drop_downloads(node);
        self.nodes[node].alive = false;
        self.nodes[node].lost_at = Some(self.now);
        for blob in 0..self.metas.len() {
            for c in self.nodes[node].inbound[blob].clone() {
                self.close(c, true);
            }
        }
        // Connections still being set up to it fail when their handshake is due. Its HTTP
        // fetches end (no process reads them: left, they took the origin's uplink and counted
        // as its bytes), and fetches from it (an origin lost) fail at their clients.
        let fetches: Vec<(FlowId, Owner)> = self.net.flows_where(
            |o| matches!(o, Owner::Fetch { origin, node: client, .. } if *origin == node || *client == node),
        );
        for (f, owner) in fetches {
            self.net.remove_flow(f);
            if let Owner::Fetch { node: client, blob, index, .. } = owner {
                if client != node {
                    self.after(self.half_rtt, Ev::FetchFailed(client, blob, index));
                }
            }
        }
    }
}
