//! Small text helpers shared by the Admin API and the proxy.

use std::borrow::Cow;

/// The value of one hex digit.
pub(crate) fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The civil date (year, month, day; proleptic Gregorian) of a day counted from the Unix
/// epoch, after Howard Hinnant's algorithm: what log lines stamp their time with.
pub fn civil_date(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// An IP address as text. IPv4 is written digit by digit: the standard formatter's machinery
/// costs more than the rest of a rate-limit check, which needs this on every request.
pub fn ip_text(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let mut s = String::with_capacity(15);
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    s.push('.');
                }
                if octet >= 100 {
                    s.push(char::from(b'0' + octet / 100));
                }
                if octet >= 10 {
                    s.push(char::from(b'0' + octet / 10 % 10));
                }
                s.push(char::from(b'0' + octet % 10));
            }
            s
        }
        std::net::IpAddr::V6(v6) => v6.to_string(),
    }
}

/// The name in a Host value or an authority's host: without its port or a trailing dot
/// (`admin.internal.` is the same name), IPv6 literals kept whole with their brackets.
pub fn host_name(raw: &str) -> &str {
    if raw.starts_with('[') {
        return raw.find(']').map_or(raw, |i| &raw[..=i]);
    }
    let host = raw.rsplit_once(':').map_or(raw, |(h, _)| h);
    host.strip_suffix('.').filter(|h| !h.is_empty()).unwrap_or(host)
}

/// Decodes `%XX` escapes and `+` (as a space), as query strings are written. Malformed escapes
/// are kept as they are. Borrows when there is nothing to decode.
pub fn percent_decode(s: &str) -> Cow<'_, str> {
    if !s.bytes().any(|b| b == b'%' || b == b'+') {
        return Cow::Borrowed(s);
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => match (bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

/// The `key=value` pairs of a query string, undecoded; a bare `key` has an empty value.
pub fn query_pairs(query: &str) -> impl Iterator<Item = (&str, &str)> {
    query.split('&').filter(|kv| !kv.is_empty()).map(|kv| kv.split_once('=').unwrap_or((kv, "")))
}

/// The first value of `name` in a query string, undecoded.
pub fn query_param<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query_pairs(query).find_map(|(k, v)| (k == name).then_some(v))
}

/// The value of the first cookie in one `Cookie` header line whose name `is_name` accepts.
pub fn cookie(line: &str, is_name: impl Fn(&str) -> bool) -> Option<&str> {
    line.split(';').find_map(|kv| {
        let (k, v) = kv.trim().split_once('=')?;
        is_name(k).then_some(v)
    })
}

/// Replaces each `$name` in `text` with what `get` gives for it (nothing when unset), as
/// APISIX's `vars_combinations` and `var_combination` keys do. `None` when not one name had a
/// value.
pub fn interpolate<S: AsRef<str>>(text: &str, get: impl Fn(&str) -> Option<S>) -> Option<String> {
    let (out, resolved) = substitute_counting(text, get);
    (resolved > 0).then_some(out)
}

/// Replaces each `$name` in `text` with what `get` gives for it, and with nothing when unset
/// (templates such as `redirect`'s `uri`).
pub fn substitute<S: AsRef<str>>(text: &str, get: impl Fn(&str) -> Option<S>) -> String {
    if !text.contains('$') {
        return text.to_string();
    }
    substitute_counting(text, get).0
}

fn substitute_counting<S: AsRef<str>>(text: &str, get: impl Fn(&str) -> Option<S>) -> (String, usize) {
    let mut out = String::with_capacity(text.len());
    let mut resolved = 0;
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let len = after.bytes().take_while(|b| b.is_ascii_alphanumeric() || *b == b'_').count();
        if len == 0 {
            out.push('$');
        } else if let Some(v) = get(&after[..len]) {
            out.push_str(v.as_ref());
            resolved += 1;
        }
        rest = &after[len..];
    }
    out.push_str(rest);
    (out, resolved)
}

#[cfg(test)]
mod tests {
    #[test]
    fn ip_text_matches_the_standard_formatter() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut samples: Vec<std::net::IpAddr> = ["0.0.0.0", "255.255.255.255", "10.0.0.9", "100.10.1.0", "::1", "2001:db8::8a2e:370:7334"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        for _ in 0..2000 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            samples.push(std::net::IpAddr::V4(std::net::Ipv4Addr::from(rng as u32)));
        }
        for ip in samples {
            assert_eq!(super::ip_text(ip), ip.to_string());
        }
    }

    use super::*;

    #[test]
    fn queries_and_cookies() {
        assert_eq!(query_param("a=1&b=2&a=3", "a"), Some("1"));
        assert_eq!(query_param("flag&b=2", "flag"), Some(""));
        assert_eq!(query_param("b=2", "a"), None);
        assert_eq!(cookie("x=1; y=2", |k| k == "y"), Some("2"));
        assert_eq!(cookie("x=1", |k| k == "y"), None);
    }

    #[test]
    fn decoding() {
        assert_eq!(percent_decode("plain"), "plain");
        assert_eq!(percent_decode("a%20b+c"), "a b c");
        assert_eq!(percent_decode("service_id%3D1"), "service_id=1");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }
}
