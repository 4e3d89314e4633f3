//! Connections between simulated hosts: connecting under the real node budget, the
//! handshake, closing, and the server side, which answers requests one after the other per
//! connection (an origin's super-seeding may decline one), each piece a unit of the
//! connection's fluid flow. An origin sends only as many pieces at once as it has send
//! slots (`turns`); a connection waiting for one hears keep-alives.

use super::*;
use shoal_p2p::piece_sends::SEND_HOLD;

impl Sim {
    pub(super) fn conn_to(&self, node: usize, blob: usize, peer: &PeerId) -> Option<ConnId> {
        let d = self.nodes[node].downloads[blob].as_ref()?;
        d.outbound
            .iter()
            .copied()
            .find(|&c| self.conn(c).is_some_and(|k| self.nodes[k.server].peer_id == *peer))
    }

    pub(super) fn connect(&mut self, node: usize, blob: usize, addr: SocketAddr) {
        let Some(slot) = self.nodes[node].flow.connection_slot() else {
            if let Some(d) = self.download(node, blob) {
                d.state.connect_abandoned(addr);
            }
            return;
        };
        let Some(&server) = self.by_addr.get(&addr) else {
            if let Some(d) = self.download(node, blob) {
                d.state.connect_failed(addr);
            }
            return;
        };
        self.counters.connects += 1;
        let conn = Conn {
            generation: 0,
            live: true,
            client: node,
            server,
            blob,
            established: false,
            queue: VecDeque::new(),
            sending: None,
            flow: None,
            bytes_done: 0,
            counted: None,
            _slot: Some(slot),
            _blob_slot: None,
            turn: false,
            waiting_since: None,
            reminder_bytes: 0,
            held_send: None,
        };
        let id = match self.free_conns.pop() {
            Some(idx) => {
                let generation = self.conns[idx as usize].generation.wrapping_add(1);
                self.conns[idx as usize] = Conn { generation, ..conn };
                ConnId { idx, generation }
            }
            None => {
                self.conns.push(conn);
                ConnId { idx: (self.conns.len() - 1) as u32, generation: 0 }
            }
        };
        // TCP's handshake, then the protocol's (both ways).
        self.after(2 * self.rtt, Ev::ConnectDone(id));
    }

    pub(super) fn connect_done(&mut self, c: ConnId) {
        let Some(conn) = self.conn(c) else { return };
        let (node, server, blob) = (conn.client, conn.server, conn.blob);
        let now = self.instant();
        if self.download(node, blob).is_none() {
            self.free(c);
            return;
        }
        let s = &self.nodes[server];
        let max_inbound = if s.origin { ORIGIN_MAX_INBOUND } else { AGENT_MAX_INBOUND };
        let blob_slot = s.blob_peers.take(self.metas[blob].digest().clone());
        let Some(bitfield) =
            s.have[blob].clone().filter(|_| s.alive && s.inbound_count < max_inbound && blob_slot.is_some())
        else {
            let addr = s.addr;
            self.free(c);
            if let Some(d) = self.download(node, blob) {
                d.state.connect_failed(addr);
            }
            self.want_fill(node, blob);
            return;
        };
        let (peer, addr) = (s.peer_id, s.addr);
        let client_id = self.nodes[node].peer_id;
        let counted = match (&s.super_seed, &self.nodes[node].have[blob]) {
            (Some(ss), Some(theirs)) => Some(ss.join(self.metas[blob].digest(), theirs, client_id)),
            _ => None,
        };
        let s = &mut self.nodes[server];
        s.inbound_count += 1;
        s.inbound[blob].push(c);
        if let Some(conn) = self.conn_mut(c) {
            conn.established = true;
            conn.counted = counted;
            conn._blob_slot = blob_slot;
        }
        let Some(d) = self.download(node, blob) else { return };
        if d.state.connected(peer, addr, bitfield, now) {
            d.outbound.push(c);
            self.want_fill(node, blob);
        } else {
            self.close(c, false);
        }
    }

    /// Close a connection. `tell_client`: the server side went away, so the client's state
    /// hears of it (a client that closes it itself already knows).
    pub(super) fn close(&mut self, c: ConnId, tell_client: bool) {
        let Some(conn) = self.conn(c) else { return };
        let (node, server, blob, established, flow) =
            (conn.client, conn.server, conn.blob, conn.established, conn.flow);
        let bytes = self.conn_bytes(c).all;
        if let Some(f) = flow {
            self.counters.wasted_bytes += self.net.sent(f, self.now) as u64;
            self.net.remove_flow(f);
        }
        let mut work = VecDeque::new();
        if established {
            let held = self.conn_mut(c).and_then(|k| k.held_send.take().and(k.sending));
            if let Some(index) = held {
                self.piece_send_ended(server, blob, index, &mut work);
            }
            self.stop_waiting(c, &mut work);
        }
        let counted = self.conn_mut(c).and_then(|k| k.counted.take());
        let now = self.instant();
        if established {
            let client_id = self.nodes[node].peer_id;
            let s = &mut self.nodes[server];
            s.inbound_count -= 1;
            s.inbound[blob].retain(|&x| x != c);
            if let (Some(ss), Some(counted)) = (&s.super_seed, counted) {
                ss.leave(self.metas[blob].digest(), &counted, client_id, now);
            }
        }
        let peer = self.nodes[server].peer_id;
        let n = &mut self.nodes[node];
        n.closed_bytes += bytes;
        if let Some(d) = n.downloads[blob].as_mut() {
            d.outbound.retain(|&x| x != c);
            if tell_client {
                d.state.closed(&peer);
                self.want_fill(node, blob);
            }
        }
        self.free(c);
        self.serve_all(work);
    }

    pub(super) fn free(&mut self, c: ConnId) {
        if let Some(conn) = self.conn_mut(c) {
            conn.live = false;
            conn.queue.clear();
            conn._slot = None;
            conn._blob_slot = None;
            conn.counted = None;
            self.free_conns.push(c.idx);
        }
    }

    /// The server side of a connection takes its next request: an origin may decline it
    /// (super-seeding), else the piece streams on the connection's flow. At an origin with
    /// send slots the connection first waits for one.
    pub(super) fn serve_next(&mut self, c: ConnId) {
        self.serve_all(VecDeque::from([c]));
    }

    /// Serve connections in turn, and those a slot given back on the way goes to (a queue,
    /// not recursion: a slot can pass through a thousand declines in one instant).
    fn serve_all(&mut self, mut work: VecDeque<ConnId>) {
        while let Some(c) = work.pop_front() {
            self.serve_one(c, &mut work);
        }
    }

    fn serve_one(&mut self, c: ConnId, work: &mut VecDeque<ConnId>) {
        let now = self.instant();
        loop {
            let at = self.now;
            let Some(conn) = self.conn_mut(c) else { return };
            if conn.sending.is_some() {
                return;
            }
            if conn.queue.is_empty() {
                if let Some(f) = conn.flow.take() {
                    self.net.remove_flow(f);
                }
                self.stop_waiting(c, work);
                return;
            }
            let (server, client, blob, flow, turn, waiting) =
                (conn.server, conn.client, conn.blob, conn.flow, conn.turn, conn.waiting_since.is_some());
            if let Some(turns) = self.nodes[server].turns.as_mut().filter(|_| !turn) {
                if waiting {
                    return;
                }
                let granted = turns.ask(c);
                let Some(conn) = self.conn_mut(c) else { return };
                if !granted {
                    conn.waiting_since = Some(at);
                    if let Some(f) = conn.flow.take() {
                        self.net.remove_flow(f);
                    }
                    return;
                }
                conn.turn = true;
            }
            // The first queued piece not already sent to as many peers as one piece may be.
            let node = &self.nodes[server];
            let pick = match (&node.piece_sends, self.conn(c)) {
                (_, None) => return,
                (None, Some(_)) => Some(0),
                (Some(sends), Some(conn)) => conn.queue.iter().position(|&i| sends.is_free(&(blob, i))),
            };
            let Some(pos) = pick else {
                if !waiting {
                    self.nodes[server].piece_waiters.push(c);
                    if let Some(conn) = self.conn_mut(c) {
                        conn.waiting_since = Some(at);
                        if let Some(f) = conn.flow.take() {
                            self.net.remove_flow(f);
                        }
                    }
                }
                return;
            };
            if waiting && self.nodes[server].piece_sends.is_some() {
                self.nodes[server].piece_waiters.retain(|&k| k != c);
                if let Some(conn) = self.conn_mut(c) {
                    conn.end_wait(at);
                }
            }
            let Some(index) = self.conn_mut(c).and_then(|conn| conn.queue.remove(pos)) else { return };
            let s = &self.nodes[server];
            let held = s.have[blob].as_ref().is_some_and(|h| h.get(index));
            let claimed = held
                && s.super_seed.as_ref().is_none_or(|ss| {
                    let meta = &self.metas[blob];
                    ss.claim(meta.digest(), index, self.nodes[client].peer_id, now)
                });
            if !claimed {
                if held {
                    self.counters.declines += 1;
                    self.after(self.half_rtt, Ev::DeclineArrives(c, index));
                }
                self.give_back_turn(c, work);
                continue;
            }
            let len = self.piece_len(blob, index) as f64;
            match flow {
                Some(f) => {
                    let horizon = self.horizon();
                    if let Some(done) = self.net.next_unit(f, len, self.now, horizon) {
                        self.schedule(done.at, Ev::FlowDone(done));
                    }
                }
                None => {
                    let uses = self.uses(server, client);
                    let f = self.net.add_flow(&uses, len, Owner::Conn(c), self.now);
                    if let Some(conn) = self.conn_mut(c) {
                        conn.flow = Some(f);
                    }
                }
            }
            if let Some(conn) = self.conn_mut(c) {
                conn.sending = Some(index);
            }
            // Free: `pick` found it so, and nothing was sent since.
            let slot = self.nodes[server].piece_sends.as_ref().and_then(|s| s.take((blob, index)));
            let holds_turn = self.conn(c).is_some_and(|k| k.turn);
            if slot.is_some() || holds_turn {
                let id = self.next_send_id;
                self.next_send_id += 1;
                if let Some(conn) = self.conn_mut(c) {
                    conn.held_send = Some((id, slot));
                }
                self.after(nanos(SEND_HOLD), Ev::SendHoldOver(c, id));
            }
            return;
        }
    }

    /// A send has held its turn and counted against its piece's limit for `SEND_HOLD`: it
    /// goes on outside both, as the real server's (`p2p/src/server.rs`) does, so a slow
    /// receiver keeps neither an origin's upload slot nor a piece's send from the others.
    pub(super) fn send_hold_over(&mut self, c: ConnId, id: u64) {
        let Some(conn) = self.conn_mut(c) else { return };
        if conn.held_send.as_ref().map(|(held, _)| *held) != Some(id) {
            return;
        }
        let (_, slot) = conn.held_send.take().unzip();
        let (server, blob, sending) = (conn.server, conn.blob, conn.sending);
        let mut work = VecDeque::new();
        if let (Some(index), Some(Some(_))) = (sending, slot) {
            self.piece_send_ended(server, blob, index, &mut work);
        }
        self.give_back_turn(c, &mut work);
        self.serve_all(work);
    }

    /// A send of `index` at `server` ended (sent, or cut off; its caller dropped its place):
    /// a connection waiting for a free send of that piece may go on.
    fn piece_send_ended(&mut self, server: usize, blob: usize, index: u32, work: &mut VecDeque<ConnId>) {
        let waiters = self.nodes[server].piece_waiters.iter().copied();
        work.extend(
            waiters.filter(|&w| self.conn(w).is_some_and(|k| k.blob == blob && k.queue.contains(&index))),
        );
    }

    /// `c` gives its send slot back (a piece sent or declined): it goes to the first in
    /// line, who is queued to be served.
    fn give_back_turn(&mut self, c: ConnId, work: &mut VecDeque<ConnId>) {
        let Some(conn) = self.conn_mut(c) else { return };
        if !std::mem::take(&mut conn.turn) {
            return;
        }
        let server = conn.server;
        let Some(next) = self.nodes[server].turns.as_mut().and_then(|t| t.give_back()) else { return };
        let at = self.now;
        if let Some(conn) = self.conn_mut(next) {
            conn.turn = true;
            conn.end_wait(at);
        }
        work.push_back(next);
    }

    /// `c` has nothing to send any more (or closes): it leaves the line, or gives its slot
    /// back.
    fn stop_waiting(&mut self, c: ConnId, work: &mut VecDeque<ConnId>) {
        let at = self.now;
        let Some(conn) = self.conn_mut(c) else { return };
        let server = conn.server;
        if conn.end_wait(at) {
            if let Some(t) = self.nodes[server].turns.as_mut() {
                t.leave(c);
            }
            self.nodes[server].piece_waiters.retain(|&k| k != c);
        }
        self.give_back_turn(c, work);
    }

    /// The client cancelled a request: it leaves the queue, and a connection with nothing
    /// left to send leaves the line for a slot.
    pub(super) fn cancel_arrives(&mut self, c: ConnId, index: u32) {
        let Some(conn) = self.conn_mut(c) else { return };
        conn.queue.retain(|&i| i != index);
        if conn.queue.is_empty() && conn.sending.is_none() {
            let mut work = VecDeque::new();
            self.stop_waiting(c, &mut work);
            self.serve_all(work);
        }
    }

    /// The links a transfer from `from` to `to` loads: data one way, ACKs the other.
    pub(super) fn uses(&self, from: usize, to: usize) -> [(LinkId, f64); 4] {
        let (f, t, a) = (&self.nodes[from], &self.nodes[to], self.cfg.ack_overhead);
        [(f.up, 1.0), (t.down, 1.0), (t.up, a), (f.down, a)]
    }

    pub(super) fn piece_sent(&mut self, c: ConnId) {
        let now = self.instant();
        let Some(conn) = self.conn_mut(c) else { return };
        let Some(index) = conn.sending.take() else { return };
        let (server, client, blob) = (conn.server, conn.client, conn.blob);
        let len = self.piece_len(blob, index);
        if let Some(conn) = self.conn_mut(c) {
            conn.bytes_done += len;
        }
        let s = &self.nodes[server];
        if let Some(ss) = &s.super_seed {
            self.counters.origin_bytes += len;
            ss.sent_in_full(
                self.metas[blob].digest(),
                index,
                self.nodes[client].peer_id,
                self.metas[blob].piece_count(),
                now,
            );
        }
        self.after(self.half_rtt, Ev::PieceArrives(c, index));
        // One piece per turn: the slot goes to the first in line, and this connection asks
        // again behind it.
        let mut work = VecDeque::new();
        if self.conn_mut(c).is_some_and(|k| k.held_send.take().is_some()) {
            self.piece_send_ended(server, blob, index, &mut work);
        }
        self.give_back_turn(c, &mut work);
        work.push_back(c);
        self.serve_all(work);
    }
}
