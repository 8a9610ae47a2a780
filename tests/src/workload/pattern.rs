//! The deterministic byte stream clients send and verify: the same seed always gives the same
//! bytes, however the stream is cut into chunks, so a receiver checks data without buffering it.
#![forbid(unsafe_code)]

/// An endless pseudo-random byte stream (xorshift64*, seeded through splitmix64 so that small
/// seeds such as connection indices give unrelated streams).
#[derive(Debug, Clone)]
pub struct Pattern {
    state: u64,
    /// The current word; bytes `used..` have not been handed out yet.
    word: [u8; 8],
    used: usize,
}

impl Pattern {
    #[must_use]
    pub fn new(seed: u64) -> Self {
        // xorshift must not start at 0; splitmix64 maps exactly one seed there.
        let state = match splitmix64(seed) {
            0 => 0x9e37_79b9_7f4a_7c15,
            state => state,
        };
        Self {
            state,
            word: [0; 8],
            used: 8,
        }
    }

    fn next_word(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Writes the next `out.len()` bytes of the stream into `out`.
    pub fn fill(&mut self, out: &mut [u8]) {
        let pending = (8 - self.used).min(out.len());
        out[..pending].copy_from_slice(&self.word[self.used..self.used + pending]);
        self.used += pending;
        let mut words = out[pending..].chunks_exact_mut(8);
        for chunk in &mut words {
            chunk.copy_from_slice(&self.next_word().to_le_bytes());
        }
        let rest = words.into_remainder();
        if !rest.is_empty() {
            self.word = self.next_word().to_le_bytes();
            rest.copy_from_slice(&self.word[..rest.len()]);
            self.used = rest.len();
        }
    }
}

fn splitmix64(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(seed: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0; len];
        Pattern::new(seed).fill(&mut out);
        out
    }

    #[test]
    fn chunking_does_not_change_the_stream() {
        let whole = stream(3, 10_000);
        for chunk_sizes in [&[1][..], &[3, 5, 7], &[8], &[13, 1, 64, 2], &[4096]] {
            let mut pattern = Pattern::new(3);
            let mut pieces = Vec::new();
            let mut sizes = chunk_sizes.iter().cycle();
            while pieces.len() < whole.len() {
                let size = (*sizes.next().unwrap()).min(whole.len() - pieces.len());
                let mut chunk = vec![0; size];
                pattern.fill(&mut chunk);
                pieces.extend_from_slice(&chunk);
            }
            assert_eq!(pieces, whole, "chunks {chunk_sizes:?}");
        }
    }

    #[test]
    fn same_seed_same_bytes_other_seed_other_bytes() {
        assert_eq!(stream(0, 1000), stream(0, 1000));
        assert_ne!(stream(0, 64), stream(1, 64));
        assert_ne!(stream(1, 64), stream(2, 64));
    }

    #[test]
    fn bytes_look_random() {
        let bytes = stream(7, 1 << 16);
        let mut counts = [0_u32; 256];
        for byte in &bytes {
            counts[usize::from(*byte)] += 1;
        }
        // 256 expected per value; a stuck or short-period generator is far off.
        assert!(
            counts.iter().all(|count| (150..=370).contains(count)),
            "{counts:?}"
        );
        assert!(bytes.windows(8).take(1000).all(|w| w != [0; 8]));
    }

    #[test]
    fn empty_fill_is_a_no_op() {
        let mut pattern = Pattern::new(5);
        pattern.fill(&mut []);
        let mut out = [0; 16];
        pattern.fill(&mut out);
        assert_eq!(out.to_vec(), stream(5, 16));
    }
}
