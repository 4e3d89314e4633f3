//! Pieces just verified, kept in memory for the local reader and the peers about to send them.
//!
//! A streaming `GET` used to read every piece back from the page cache a moment after the
//! download wrote it there: one blocking-pool job and one copy per 256 KiB, 6 % of the
//! agent's CPU in a 1 GiB pull from one seeder. Here the buffer the piece arrived and was
//! verified in goes to the reader instead, when a reader is within [`FRESH_PIECES`] of it
//! (the swarm asks for a reader's next pieces first, so when the network sets the pace they
//! arrive just ahead of it). The same pull paced at 150 MiB/s took 2.4-2.6 agent CPU-s
//! against 2.9-3.0 before, and ended at the pace's 6.8 s instead of 7.2 s. Pieces behind
//! every reader are dropped as readers move on, so a download holds at most [`FRESH_PIECES`]
//! pieces this way, and none without a reader.
//!
//! Peers are the other taker: in a swarm a piece is asked for by others within a second or
//! two of arriving (its `have` goes out in the next batch), and a fleet's agent sends on
//! about as many bytes as it receives. Each of those sends read the piece back on the
//! blocking pool. So the newest verified pieces, up to [`RECENT_BYTES`], stay in memory too
//! while the blob downloads, and a server sends from them when it can.
use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;

/// Pieces from the slowest reader's position on that may be kept in memory (4 MiB with
/// 1 MiB pieces, per download that has a reader).
pub const FRESH_PIECES: u32 = 4;

/// Bytes of the newest verified pieces a download keeps for peers' requests (16 pieces of
/// 512 KiB, a 128 MiB blob's, or 2.7 s of a 50 Mbit/s link's worth).
pub const RECENT_BYTES: usize = 8 * 1024 * 1024;

/// The kept pieces and where the slowest reader is.
#[derive(Debug, Default)]
pub(super) struct Fresh {
    /// The lowest piece index a local reader is at; `None`: no reader, nothing is kept.
    floor: Option<u32>,
    pieces: BTreeMap<u32, Bytes>,
    /// The newest verified pieces, oldest first, at most [`RECENT_BYTES`] of them.
    recent: VecDeque<(u32, Bytes)>,
    recent_bytes: usize,
}

impl Fresh {
    /// Readers are at `floor` or beyond (`None`: there is none): drop what lies outside the
    /// window from there.
    pub(super) fn set_floor(&mut self, floor: Option<u32>) {
        self.floor = floor;
        match floor {
            None => self.pieces.clear(),
            Some(lo) => self.pieces.retain(|&i, _| in_window(lo, i)),
        }
    }

    /// Keep verified piece `index`: for a reader about to want it, and among the newest for
    /// peers.
    pub(super) fn keep(&mut self, index: u32, data: Bytes) {
        if self.floor.is_some_and(|lo| in_window(lo, index)) {
            self.pieces.insert(index, data.clone());
        }
        if data.len() > RECENT_BYTES || self.recent.iter().any(|(i, _)| *i == index) {
            return;
        }
        self.recent_bytes += data.len();
        self.recent.push_back((index, data));
        while self.recent_bytes > RECENT_BYTES {
            match self.recent.pop_front() {
                Some((_, old)) => self.recent_bytes -= old.len(),
                None => break,
            }
        }
    }

    /// The bytes of piece `index` kept for a reader.
    pub(super) fn get(&self, index: u32) -> Option<&Bytes> {
        self.pieces.get(&index)
    }

    /// The bytes of piece `index` if kept for any taker: a reader or peers.
    pub(super) fn get_any(&self, index: u32) -> Option<&Bytes> {
        self.get(index).or_else(|| self.recent.iter().rev().find(|(i, _)| *i == index).map(|(_, d)| d))
    }

    /// Forget every kept piece (the blob failed, or it is complete and lives in its file).
    pub(super) fn clear(&mut self) {
        self.pieces.clear();
        self.recent.clear();
        self.recent_bytes = 0;
    }

    #[cfg(test)]
    pub(super) fn kept(&self) -> Vec<u32> {
        self.pieces.keys().copied().collect()
    }

    #[cfg(test)]
    pub(super) fn kept_recent(&self) -> Vec<u32> {
        self.recent.iter().map(|(i, _)| *i).collect()
    }
}

fn in_window(floor: u32, index: u32) -> bool {
    index >= floor && index - floor < FRESH_PIECES
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(i: u32) -> Bytes {
        Bytes::from(vec![i as u8; 8])
    }

    #[test]
    fn nothing_is_kept_without_a_reader() {
        let mut f = Fresh::default();
        f.keep(0, piece(0));
        assert!(f.kept().is_empty());
    }

    #[test]
    fn only_the_window_ahead_of_the_slowest_reader_is_kept() {
        let mut f = Fresh::default();
        f.set_floor(Some(10));
        for i in 8..20 {
            f.keep(i, piece(i));
        }
        assert_eq!(f.kept(), vec![10, 11, 12, 13]);
        assert_eq!(f.get(11), Some(&piece(11)));
        // The reader moves on: what it passed goes, the new window fills as pieces arrive.
        f.set_floor(Some(12));
        assert_eq!(f.kept(), vec![12, 13]);
        f.keep(15, piece(15));
        f.keep(16, piece(16));
        assert_eq!(f.kept(), vec![12, 13, 15]);
        // The last reader left.
        f.set_floor(None);
        assert!(f.kept().is_empty());
    }

    #[test]
    fn a_window_at_the_top_of_the_index_range_does_not_overflow() {
        let mut f = Fresh::default();
        f.set_floor(Some(u32::MAX - 1));
        f.keep(u32::MAX, piece(1));
        f.keep(0, piece(0));
        assert_eq!(f.kept(), vec![u32::MAX]);
    }

    #[test]
    fn the_newest_pieces_are_kept_for_peers_up_to_the_byte_bound() {
        let mut f = Fresh::default();
        let big = |i: u32| Bytes::from(vec![i as u8; RECENT_BYTES / 4]);
        for i in 0..6 {
            f.keep(i, big(i));
        }
        // No reader: nothing in the reader's window, the newest four for peers.
        assert!(f.kept().is_empty());
        assert_eq!(f.kept_recent(), vec![2, 3, 4, 5]);
        assert_eq!(f.get_any(5), Some(&big(5)));
        assert_eq!(f.get(5), None, "a reader gets only its window");
        assert_eq!(f.get_any(1), None, "evicted");
        // A piece kept twice counts once.
        f.keep(5, big(5));
        assert_eq!(f.kept_recent(), vec![2, 3, 4, 5]);
        // A reader's pieces are found for peers too; `clear` forgets both.
        f.set_floor(Some(9));
        f.keep(9, piece(9));
        assert_eq!(f.get_any(9), Some(&piece(9)));
        f.clear();
        assert_eq!(f.get_any(9), None);
        assert_eq!(f.get_any(4), None);
    }
}
