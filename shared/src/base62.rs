//! Base62 (`0-9A-Za-z`) helpers shared by keys, key ids and checksums.

/// The alphabet, in the order the checksum encoding uses for digit values.
pub(crate) const ALPHABET: &[u8; 62] =
    b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// The largest multiple of 62 that fits in a byte (4 × 62). Bytes at or above it
/// are discarded so that `byte % 62` is uniform: no modulo bias.
const UNBIASED_LIMIT: u8 = 248;

pub(crate) fn is_base62(byte: u8) -> bool {
    byte.is_ascii_alphanumeric()
}

/// Fills `out` with uniformly distributed base62 characters, drawing random bytes
/// from `fill_random` as needed (rejection sampling).
pub(crate) fn random_chars(out: &mut [u8], fill_random: &mut dyn FnMut(&mut [u8])) {
    let mut pool = [0u8; 64];
    let mut filled = 0;
    while filled < out.len() {
        fill_random(&mut pool);
        for &byte in &pool {
            if filled == out.len() {
                break;
            }
            if byte < UNBIASED_LIMIT {
                out[filled] = ALPHABET[usize::from(byte % 62)];
                filled += 1;
            }
        }
    }
}

/// Encodes `value` as exactly `N` base62 digits, most significant first, zero-padded.
pub(crate) fn encode_fixed<const N: usize>(mut value: u64) -> [u8; N] {
    let mut out = [ALPHABET[0]; N];
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(value % 62) as usize];
        value /= 62;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_fixed_pads_and_orders_digits() {
        assert_eq!(&encode_fixed::<6>(0), b"000000");
        assert_eq!(&encode_fixed::<6>(61), b"00000z");
        assert_eq!(&encode_fixed::<6>(62), b"000010");
        assert_eq!(&encode_fixed::<6>(u64::from(u32::MAX)), b"4gfFC3");
    }

    #[test]
    fn random_chars_skips_biased_bytes() {
        // A source that yields only bytes >= 248 first, then 0..: the first ones must be dropped.
        let mut calls = 0;
        let mut source = |buf: &mut [u8]| {
            calls += 1;
            let fill = if calls == 1 { 255 } else { 63 };
            buf.fill(fill);
        };
        let mut out = [0u8; 10];
        random_chars(&mut out, &mut source);
        assert_eq!(calls, 2);
        assert_eq!(&out, b"1111111111", "63 % 62 == 1");
    }

    #[test]
    fn random_chars_is_roughly_uniform() {
        // A deterministic xorshift source: every symbol should appear, none dominate.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut source = |buf: &mut [u8]| {
            for b in buf {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *b = (state >> 32).to_le_bytes()[0];
            }
        };
        let mut out = vec![0u8; 62 * 1000];
        random_chars(&mut out, &mut source);
        let mut counts = [0u32; 62];
        for c in out {
            let idx = ALPHABET.iter().position(|&a| a == c).expect("alphabet");
            counts[idx] += 1;
        }
        let (min, max) = (counts.iter().min().copied(), counts.iter().max().copied());
        assert!(min > Some(850) && max < Some(1150), "counts {counts:?}");
    }
}
