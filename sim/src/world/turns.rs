//! An origin's send slots as its peer server hands them out (`PeerServer::upload_slots`, a
//! tokio semaphore, which serves waiters first come, first served): a connection with a
//! request to send takes a slot if one is free and nobody waits, else waits in line; a
//! slot given back goes straight to the first in line. One piece per turn: a connection
//! that sent a piece gives its slot back and asks again, at the back of the line.

use std::collections::VecDeque;

use super::ConnId;

pub(super) struct Turns {
    limit: usize,
    sending: usize,
    line: VecDeque<ConnId>,
}

impl Turns {
    pub(super) fn new(limit: usize) -> Turns {
        Turns { limit: limit.max(1), sending: 0, line: VecDeque::new() }
    }

    /// `c` has a request to send: whether it takes a slot now; if not, it is in line (the
    /// caller asks once per wait).
    pub(super) fn ask(&mut self, c: ConnId) -> bool {
        if self.sending < self.limit && self.line.is_empty() {
            self.sending += 1;
            return true;
        }
        self.line.push_back(c);
        false
    }

    /// A slot is given back: the connection it goes to, if any waits.
    pub(super) fn give_back(&mut self) -> Option<ConnId> {
        match self.line.pop_front() {
            Some(next) => Some(next),
            None => {
                self.sending = self.sending.saturating_sub(1);
                None
            }
        }
    }

    /// `c` no longer waits (its requests were cancelled, or it closed).
    pub(super) fn leave(&mut self, c: ConnId) {
        self.line.retain(|&k| k != c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(idx: u32) -> ConnId {
        ConnId { idx, generation: 0 }
    }

    #[test]
    fn slots_go_first_come_first_served_and_straight_to_the_next_in_line() {
        let mut t = Turns::new(2);
        assert!(t.ask(conn(1)));
        assert!(t.ask(conn(2)));
        assert!(!t.ask(conn(3)));
        assert!(!t.ask(conn(4)));
        t.leave(conn(3));
        assert_eq!(t.give_back(), Some(conn(4)));
        // A sender asking again goes behind those already waiting.
        assert!(!t.ask(conn(1)));
        assert_eq!(t.give_back(), Some(conn(1)));
        assert_eq!(t.give_back(), None);
        assert_eq!(t.give_back(), None);
        assert!(t.ask(conn(5)));
        assert!(t.ask(conn(6)));
        assert!(!t.ask(conn(7)));
    }
}
