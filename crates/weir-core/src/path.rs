//! The normal form of a request path, which routes are matched against and plugins see.
//!
//! Routes are matched on what a path means, not on how a client spelled it, as nginx's `$uri`
//! (which APISIX matches on) does: every `%XX` escape is decoded, `.` and `..` segments are
//! resolved, and runs of slashes are merged into one. A path that climbs above the root, holds
//! a malformed escape or a NUL byte (escaped or not) is refused (nginx answers those with 400).
//!
//! The path sent on to the upstream is the normal form again percent-encoded where a path
//! needs it, so the upstream is asked for exactly what was matched: `/%61dmin/x`,
//! `//admin/x`, `/public/../admin/x` and `/admin%2Fx` all reach it as `/admin/x`.

use std::borrow::Cow;

use crate::text::hex;

/// Why a path has no normal form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// A `%` not followed by two hex digits.
    BadEscape,
    /// `%00`, or a NUL byte as it is.
    Nul,
    /// A `..` segment above the root.
    AboveRoot,
}

impl std::fmt::Display for PathError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PathError::BadEscape => "malformed percent-escape in the path",
            PathError::Nul => "NUL in the path",
            PathError::AboveRoot => "the path climbs above the root",
        })
    }
}

/// A path in normal form, both as matched and as sent on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalPath {
    /// Decoded: what routes are matched against (bytes that are not UTF-8 read as U+FFFD).
    pub decoded: String,
    /// The decoded path percent-encoded where a path component needs it: what plugins see and
    /// the upstream is sent.
    pub encoded: String,
}

/// Whether `path` may not be in normal form: one pass over the bytes, no allocation. Every
/// path for which this is false is its own normal form.
pub fn may_need_normalizing(path: &str) -> bool {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return true;
    }
    let mut prev = 0u8;
    for &x in b {
        // An escape, a byte the normal form escapes (UTF-8, `"`, `\`, ...), `//`, or `/.`.
        if x == b'%' || !keeps(x) || (prev == b'/' && (x == b'/' || x == b'.')) {
            return true;
        }
        prev = x;
    }
    false
}

/// The normal form of an origin-form path (without its query).
pub fn normalize(path: &str) -> Result<NormalPath, PathError> {
    // 1. Decode every escape.
    let raw = path.as_bytes();
    let mut bytes = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if b == b'%' {
            let (Some(hi), Some(lo)) = (raw.get(i + 1).copied().and_then(hex), raw.get(i + 2).copied().and_then(hex)) else {
                return Err(PathError::BadEscape);
            };
            let v = hi << 4 | lo;
            if v == 0 {
                return Err(PathError::Nul);
            }
            bytes.push(v);
            i += 3;
        } else if b == 0 {
            return Err(PathError::Nul);
        } else {
            bytes.push(b);
            i += 1;
        }
    }
    // 2. Resolve dot segments and merge slashes.
    let mut segments: Vec<&[u8]> = Vec::new();
    let mut trailing = false;
    for seg in bytes.split(|&b| b == b'/') {
        match seg {
            b"" => trailing = true,
            b"." => trailing = true,
            b".." => {
                if segments.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
                trailing = true;
            }
            s => {
                segments.push(s);
                trailing = false;
            }
        }
    }
    let mut normal = Vec::with_capacity(bytes.len() + 1);
    for s in &segments {
        normal.push(b'/');
        normal.extend_from_slice(s);
    }
    if segments.is_empty() || trailing {
        normal.push(b'/');
    }
    // 3. Encode again what a path cannot carry as it is.
    let mut encoded = String::with_capacity(normal.len());
    for &b in &normal {
        if keeps(b) {
            encoded.push(char::from(b));
        } else {
            const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
            encoded.push('%');
            encoded.push(char::from(DIGITS[usize::from(b >> 4)]));
            encoded.push(char::from(DIGITS[usize::from(b & 15)]));
        }
    }
    let decoded = match String::from_utf8_lossy(&normal) {
        Cow::Borrowed(_) => String::from_utf8(normal).unwrap_or_default(),
        Cow::Owned(s) => s,
    };
    Ok(NormalPath { decoded, encoded })
}

/// Bytes a path segment carries unescaped (RFC 3986 `pchar` less `%`), and `/`.
fn keeps(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'=' | b':' | b'@' | b'/')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn enc(p: &str) -> String {
        normalize(p).map(|n| n.encoded).unwrap_or_else(|e| format!("error: {e:?}"))
    }

    #[test]
    fn spellings_of_one_path_have_one_normal_form() {
        for p in [
            "/admin/x",
            "/%61dmin/x",
            "/%61%64%6d%69%6e/x",
            "/%61%64%6D%69%6E/x",
            "//admin/x",
            "/./admin/x",
            "/public/../admin/x",
            "/public/%2e%2e/admin/x",
            "/public/%2E%2E/admin/x",
            "/public/.%2e/admin/x",
            "/admin%2fx",
            "/admin%2Fx",
            "/%2fadmin/x",
            "/%2Fadmin%2F%2Fx",
            "/admin/./x",
            "/admin/y/../x",
            "/admin//x",
            "/admin/x/.",
        ] {
            let want = if p.ends_with("/.") { "/admin/x/" } else { "/admin/x" };
            assert_eq!(enc(p), want, "{p}");
        }
    }

    #[test]
    fn raw_and_escaped_spellings_are_one_form() {
        for (a, b) in [("/café", "/caf%C3%A9"), ("/a\"b", "/a%22b"), ("/a|b", "/a%7Cb"), ("/a\\b", "/a%5Cb")] {
            assert!(may_need_normalizing(a), "{a}");
            assert_eq!(normalize(a), normalize(b), "{a} {b}");
            assert_eq!(normalize(a).unwrap().encoded, b);
        }
        assert!(!may_need_normalizing("/plain/path-1.2_x~y;z=1"));
    }

    #[test]
    fn bad_paths_are_refused() {
        assert_eq!(normalize("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(normalize("/a%4"), Err(PathError::BadEscape));
        assert_eq!(normalize("/a%"), Err(PathError::BadEscape));
        assert_eq!(normalize("/a%00b"), Err(PathError::Nul));
        assert_eq!(normalize("/a\0b"), Err(PathError::Nul), "raw, as escaped");
        assert_eq!(normalize("/.."), Err(PathError::AboveRoot));
        assert_eq!(normalize("/a/../../b"), Err(PathError::AboveRoot));
        assert_eq!(normalize("/%2e%2e/etc/passwd"), Err(PathError::AboveRoot));
    }

    #[test]
    fn what_a_path_cannot_carry_is_encoded_again() {
        let n = normalize("/caf%C3%A9/a%20b%3Fc%23d%25").unwrap();
        assert_eq!(n.decoded, "/café/a b?c#d%");
        assert_eq!(n.encoded, "/caf%C3%A9/a%20b%3Fc%23d%25");
        assert_eq!(enc("/"), "/");
        assert_eq!(enc("//"), "/");
        assert_eq!(enc("/a/"), "/a/");
        assert_eq!(enc("/a/.."), "/");
        assert_eq!(enc("/%7Euser"), "/~user");
        assert_eq!(normalize("/%ff").unwrap().decoded, "/\u{fffd}");
        assert_eq!(normalize("/%ff").unwrap().encoded, "/%FF");
    }

    proptest! {
        /// The normal form is a fixed point, and a path the cheap scan passes is its own.
        #[test]
        fn normal_form_is_stable(path in "/[a-z./%2eEfF0-9A;\\\"{}|^\\[\\]é漢 ~+]{0,24}") {
            if let Ok(n) = normalize(&path) {
                prop_assert!(!n.encoded.contains("//"));
                prop_assert!(!n.encoded.split('/').any(|s| s == "." || s == ".."));
                let again = normalize(&n.encoded).unwrap();
                prop_assert_eq!(&again, &n);
                if !may_need_normalizing(&path) {
                    prop_assert_eq!(n.encoded, path);
                }
            }
        }
    }
}
