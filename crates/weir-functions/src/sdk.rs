//! The natives behind the SDK's crypto.

use ring::rand::{SecureRandom, SystemRandom};

/// `n` bytes from the operating system's CSPRNG.
pub(crate) fn random(n: usize) -> Vec<u8> {
    let mut out = vec![0u8; n];
    // The system generator fails only when the OS cannot give randomness at all.
    SystemRandom::new().fill(&mut out).expect("the system random generator works");
    out
}

/// A version 4 UUID from the CSPRNG.
pub(crate) fn uuid() -> String {
    let mut b = random(16);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..])
}

/// A request id in the form of a UUID, unique in this process: random bits drawn once, with
/// a counter mixed in (cheaper than the CSPRNG per request; an id is not a secret).
pub(crate) fn request_id() -> String {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static BASE: OnceLock<[u8; 16]> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut b = *BASE.get_or_init(|| random(16).try_into().unwrap_or([0; 16]));
    let n = NEXT.fetch_add(1, Ordering::Relaxed).to_be_bytes();
    for (i, x) in n.iter().enumerate() {
        b[8 + i] ^= x;
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [b'-'; 36];
    let mut at = 0;
    for (i, x) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            at += 1;
        }
        out[at] = HEX[(x >> 4) as usize];
        out[at + 1] = HEX[(x & 15) as usize];
        at += 2;
    }
    // ASCII throughout.
    String::from_utf8(out.to_vec()).unwrap_or_default()
}

/// SHA-1 (`1`) or SHA-2 (`256`, `384`, `512`) of `data`.
pub(crate) fn digest(bits: u32, data: &[u8]) -> Option<Vec<u8>> {
    let alg = match bits {
        1 => &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        256 => &ring::digest::SHA256,
        384 => &ring::digest::SHA384,
        512 => &ring::digest::SHA512,
        _ => return None,
    };
    Some(ring::digest::digest(alg, data).as_ref().to_vec())
}

#[cfg(test)]
mod tests {
    #[test]
    fn request_ids_are_uuid_shaped_and_distinct() {
        let (a, b) = (super::request_id(), super::request_id());
        assert_ne!(a, b);
        assert_eq!((a.len(), &a[14..15], a.matches('-').count()), (36, "4", 4));
        // 8-4-4-4-12 lowercase hex digits.
        for id in [&a, &b] {
            assert!(id.char_indices().all(|(i, c)| if [8, 13, 18, 23].contains(&i) { c == '-' } else { matches!(c, '0'..='9' | 'a'..='f') }), "{id}");
        }
        let u = super::uuid();
        assert_eq!((u.len(), &u[14..15]), (36, "4"));
    }
}
