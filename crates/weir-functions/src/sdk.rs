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
