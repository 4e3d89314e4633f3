//! Which pieces of a blob a peer has, one bit per piece.
//!
//! The byte layout is BitTorrent's (piece 0 is the most significant bit of byte 0, spare bits in
//! the last byte are zero), so the same bytes go on the wire, into the handshake and onto disk.

/// Why bytes do not form a bitfield of the expected size, or an index does not fit one.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BitfieldError {
    #[error("bitfield for {pieces} pieces must be {expected} bytes, got {actual}")]
    WrongLength { pieces: u32, expected: usize, actual: usize },
    #[error("bitfield has bits set past its last piece")]
    SpareBitsSet,
    #[error("piece {index} is out of range for a bitfield of {pieces} pieces")]
    OutOfRange { index: u32, pieces: u32 },
}

/// A fixed-size set of piece indices `0..len`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Bitfield {
    len: u32,
    bytes: Vec<u8>,
}

/// Bytes needed for `len` bits.
fn byte_len(len: u32) -> usize {
    // u32 -> usize is lossless on every platform Shoal targets (32 and 64 bit).
    (len as usize).div_ceil(8)
}

/// The mask of bit `index` inside its byte, MSB first.
fn mask(index: u32) -> u8 {
    0x80 >> (index % 8)
}

impl Bitfield {
    /// An empty bitfield (no pieces) for a blob of `len` pieces.
    pub fn new(len: u32) -> Bitfield {
        Bitfield { len, bytes: vec![0; byte_len(len)] }
    }

    /// A bitfield with every piece set, for seeders that hold the whole blob.
    pub fn full(len: u32) -> Bitfield {
        let mut bf = Bitfield { len, bytes: vec![0xff; byte_len(len)] };
        bf.clear_spare_bits();
        bf
    }

    /// Decode untrusted bytes (from a peer or disk) for a blob of `len` pieces.
    pub fn from_bytes(len: u32, bytes: &[u8]) -> Result<Bitfield, BitfieldError> {
        let expected = byte_len(len);
        if bytes.len() != expected {
            return Err(BitfieldError::WrongLength { pieces: len, expected, actual: bytes.len() });
        }
        let bf = Bitfield { len, bytes: bytes.to_vec() };
        let mut clean = bf.clone();
        clean.clear_spare_bits();
        if clean != bf {
            return Err(BitfieldError::SpareBitsSet);
        }
        Ok(bf)
    }

    fn clear_spare_bits(&mut self) {
        let used = self.len % 8;
        if used != 0 {
            if let Some(last) = self.bytes.last_mut() {
                *last &= !(0xffu8 >> used);
            }
        }
    }

    fn check(&self, index: u32) -> Result<usize, BitfieldError> {
        if index < self.len {
            Ok((index / 8) as usize)
        } else {
            Err(BitfieldError::OutOfRange { index, pieces: self.len })
        }
    }

    /// Number of pieces this bitfield covers.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// Whether the bitfield covers no pieces at all (a zero-size blob).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether piece `index` is set; out-of-range indices are never set.
    pub fn get(&self, index: u32) -> bool {
        match self.check(index) {
            Ok(byte) => self.bytes[byte] & mask(index) != 0,
            Err(_) => false,
        }
    }

    /// Set piece `index`; returns whether it was newly set.
    pub fn set(&mut self, index: u32) -> Result<bool, BitfieldError> {
        let byte = self.check(index)?;
        let was = self.bytes[byte] & mask(index) != 0;
        self.bytes[byte] |= mask(index);
        Ok(!was)
    }

    /// Clear piece `index`; returns whether it was set before.
    pub fn clear(&mut self, index: u32) -> Result<bool, BitfieldError> {
        let byte = self.check(index)?;
        let was = self.bytes[byte] & mask(index) != 0;
        self.bytes[byte] &= !mask(index);
        Ok(was)
    }

    /// Number of pieces set.
    pub fn count(&self) -> u32 {
        self.bytes.iter().map(|b| b.count_ones()).sum()
    }

    /// Whether every piece is set (vacuously true for zero pieces).
    pub fn is_complete(&self) -> bool {
        self.count() == self.len
    }

    /// The set piece indices in increasing order.
    pub fn iter_set(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.len).filter(|&i| self.get(i))
    }

    /// The missing piece indices in increasing order.
    pub fn iter_missing(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.len).filter(|&i| !self.get(i))
    }

    /// The wire/disk form.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The wire/disk form, owned.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.bytes.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_is_empty_and_full_is_complete() {
        let bf = Bitfield::new(10);
        assert_eq!(bf.len(), 10);
        assert_eq!(bf.count(), 0);
        assert!(!bf.is_complete());
        let full = Bitfield::full(10);
        assert_eq!(full.count(), 10);
        assert!(full.is_complete());
        assert_eq!(full.as_bytes(), &[0xff, 0xc0]);
    }

    #[test]
    fn zero_pieces() {
        let bf = Bitfield::new(0);
        assert!(bf.is_empty());
        assert!(bf.is_complete());
        assert!(bf.to_bytes().is_empty());
        assert_eq!(Bitfield::full(0), bf);
        assert_eq!(Bitfield::from_bytes(0, &[]), Ok(bf));
    }

    #[test]
    fn msb_first_layout() {
        let mut bf = Bitfield::new(16);
        bf.set(0).unwrap();
        bf.set(9).unwrap();
        bf.set(15).unwrap();
        assert_eq!(bf.as_bytes(), &[0b1000_0000, 0b0100_0001]);
        assert_eq!(bf.iter_set().collect::<Vec<_>>(), vec![0, 9, 15]);
    }

    #[test]
    fn set_clear_get_report_changes() {
        let mut bf = Bitfield::new(9);
        assert_eq!(bf.set(8), Ok(true));
        assert_eq!(bf.set(8), Ok(false));
        assert!(bf.get(8));
        assert_eq!(bf.clear(8), Ok(true));
        assert_eq!(bf.clear(8), Ok(false));
        assert!(!bf.get(8));
    }

    #[test]
    fn out_of_range_is_an_error_not_a_panic() {
        let mut bf = Bitfield::new(9);
        assert_eq!(bf.set(9), Err(BitfieldError::OutOfRange { index: 9, pieces: 9 }));
        assert_eq!(bf.clear(u32::MAX), Err(BitfieldError::OutOfRange { index: u32::MAX, pieces: 9 }));
        assert!(!bf.get(9));
        assert!(!bf.get(u32::MAX));
    }

    #[test]
    fn iterators_partition_the_range() {
        let mut bf = Bitfield::new(12);
        for i in [1, 3, 11] {
            bf.set(i).unwrap();
        }
        assert_eq!(bf.iter_set().collect::<Vec<_>>(), vec![1, 3, 11]);
        assert_eq!(bf.iter_missing().collect::<Vec<_>>(), vec![0, 2, 4, 5, 6, 7, 8, 9, 10]);
        assert_eq!(bf.count(), 3);
    }

    #[test]
    fn bytes_round_trip() {
        let mut bf = Bitfield::new(21);
        for i in [0, 7, 8, 20] {
            bf.set(i).unwrap();
        }
        let bytes = bf.to_bytes();
        assert_eq!(bytes.len(), 3);
        assert_eq!(Bitfield::from_bytes(21, &bytes), Ok(bf));
    }

    #[test]
    fn from_bytes_rejects_wrong_length() {
        assert_eq!(
            Bitfield::from_bytes(9, &[0]),
            Err(BitfieldError::WrongLength { pieces: 9, expected: 2, actual: 1 })
        );
        assert_eq!(
            Bitfield::from_bytes(8, &[0, 0]),
            Err(BitfieldError::WrongLength { pieces: 8, expected: 1, actual: 2 })
        );
    }

    #[test]
    fn from_bytes_rejects_spare_bits() {
        assert_eq!(Bitfield::from_bytes(9, &[0, 0x40]), Err(BitfieldError::SpareBitsSet));
        assert_eq!(Bitfield::from_bytes(9, &[0, 0x01]), Err(BitfieldError::SpareBitsSet));
        assert!(Bitfield::from_bytes(9, &[0xff, 0x80]).unwrap().is_complete());
        assert!(Bitfield::from_bytes(8, &[0xff]).unwrap().is_complete());
    }
}
