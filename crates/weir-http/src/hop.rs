//! What one hop does to a request's header section on its way to a node: it adds the fields
//! that describe the client (`X-Forwarded-*`, `X-Real-IP`) and drops the connection-scoped
//! ones. An HTTP/1.1 node gets this as the head is written, so the request's map is neither
//! grown nor rehashed for it; an HTTP/2 node gets it applied to the map.
//!
//! The fields a client's `Connection` names are removed from the request when it arrives
//! ([`strip_connection_named`]), before plugins run: what plugins set later is the gateway's
//! own and always goes out. A client's `X-Forwarded-*` fields are replaced unless its address
//! is trusted (`proxy.trusted_addresses`, as APISIX's `trusted_addresses`).

use http::header::{self, HeaderMap, HeaderName, HeaderValue};


pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
pub static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Connection-scoped fields that must not be forwarded (RFC 9110 §7.6.1).
static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    // One string match: cheaper than comparing against each name in turn.
    matches!(name.as_str(), "connection" | "keep-alive" | "proxy-connection" | "te" | "trailer" | "transfer-encoding" | "upgrade")
}

/// Whether an answer of `status` passes field `name` on to the client: no connection-scoped
/// field does, but a 101's and a 426's `Upgrade`, which say what to switch to (RFC 9110
/// requires it of a 426).
pub fn passes_in_answer(status: u16, name: &HeaderName) -> bool {
    !is_hop_by_hop(name) || ((status == 101 || status == 426) && name == header::UPGRADE)
}

/// The names a Connection field lists: connection-scoped as well.
pub fn connection_named(value: &HeaderValue, into: &mut Vec<HeaderName>) {
    let names = value.as_bytes().split(|&b| b == b',').map(<[u8]>::trim_ascii);
    into.extend(names.filter_map(|n| HeaderName::from_bytes(n).ok()).filter(|n| !is_hop_by_hop(n)));
}

/// Removes from a client's request the fields its Connection field names, except those this
/// hop needs whatever the client says (Host, and the body's framing).
pub fn strip_connection_named(headers: &mut HeaderMap) {
    if !headers.contains_key(header::CONNECTION) {
        return;
    }
    let mut named = Vec::new();
    for v in headers.get_all(header::CONNECTION) {
        connection_named(v, &mut named);
    }
    for n in &named {
        if n != header::HOST && n != header::CONTENT_LENGTH {
            headers.remove(n);
        }
    }
}

/// Removes connection-scoped fields, and those the Connection field names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none; one pass over the names is cheaper than seven lookups.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let mut named = Vec::new();
    for v in headers.get_all(header::CONNECTION) {
        connection_named(v, &mut named);
    }
    for n in named.iter().chain(&HOP_BY_HOP) {
        headers.remove(n);
    }
}

/// The header changes of one request on its way out.
pub struct Hop {
    forwarded_for: HeaderValue,
    real_ip: HeaderValue,
    /// Set only when the client sent none: theirs is kept, as APISIX keeps it.
    proto: Option<HeaderValue>,
    host: Option<HeaderValue>,
    port: Option<HeaderValue>,
    /// The protocol of a WebSocket handshake on a route that allows it: Upgrade and Connection
    /// then go out with it.
    upgrade: Option<HeaderValue>,
    /// Whether the client sent any connection-scoped field.
    scoped: bool,
    /// The client sent `X-Forwarded-Proto`, `-Host` or `-Port` of its own that must not go out.
    replaced: bool,
}

/// Facts of this hop the new fields carry.
pub struct Client<'a> {
    pub ip: &'a HeaderValue,
    pub scheme: &'static str,
    pub port: &'a HeaderValue,
    /// The Host the client asked for, for X-Forwarded-Host.
    pub host: Option<HeaderValue>,
    /// Whether the client's own `X-Forwarded-*` fields are believed.
    pub trusted: bool,
}

impl Hop {
    /// Reads what the request already carries in one pass over its fields.
    pub fn new(headers: &HeaderMap, client: Client<'_>, upgrade: Option<HeaderValue>) -> Hop {
        let mut prior: Option<Vec<u8>> = None;
        let (mut has_proto, mut has_host, mut has_port, mut scoped) = (false, false, false, false);
        for (name, value) in headers {
            if *name == X_FORWARDED_FOR {
                if !client.trusted {
                    continue;
                }
                // Every value the client sent, in order, then this client's address.
                let list = prior.get_or_insert_with(Vec::new);
                if !list.is_empty() {
                    list.extend_from_slice(b", ");
                }
                list.extend_from_slice(value.as_bytes());
            } else if *name == X_FORWARDED_PROTO {
                has_proto = true;
            } else if *name == X_FORWARDED_HOST {
                has_host = true;
            } else if *name == X_FORWARDED_PORT {
                has_port = true;
            } else if is_hop_by_hop(name) {
                scoped = true;
            }
        }
        let theirs = client.trusted && (has_proto || has_host || has_port);
        let replaced = !client.trusted && (has_proto || has_host || has_port);
        let (has_proto, has_host, has_port) = if theirs { (has_proto, has_host, has_port) } else { (false, false, false) };
        let forwarded_for = match prior {
            Some(mut list) => {
                list.extend_from_slice(b", ");
                list.extend_from_slice(client.ip.as_bytes());
                HeaderValue::from_bytes(&list).unwrap_or_else(|_| client.ip.clone())
            }
            None => client.ip.clone(),
        };
        Hop {
            forwarded_for,
            real_ip: client.ip.clone(),
            proto: (!has_proto).then(|| HeaderValue::from_static(client.scheme)),
            host: if has_host { None } else { client.host },
            port: (!has_port).then(|| client.port.clone()),
            upgrade,
            scoped,
            replaced,
        }
    }

    /// Whether a field of the request stays out of what is sent.
    fn drops(&self, name: &HeaderName, framed: bool) -> bool {
        *name == X_FORWARDED_FOR
            || *name == X_REAL_IP
            || (framed && name == header::CONTENT_LENGTH)
            || (self.scoped && is_hop_by_hop(name))
            || (self.replaced && (*name == X_FORWARDED_PROTO || *name == X_FORWARDED_HOST || *name == X_FORWARDED_PORT))
    }

    fn added(&self) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
        static CONNECTION_UPGRADE: HeaderValue = HeaderValue::from_static("upgrade");
        [
            (&X_FORWARDED_FOR, Some(&self.forwarded_for)),
            (&X_REAL_IP, Some(&self.real_ip)),
            (&X_FORWARDED_PROTO, self.proto.as_ref()),
            (&X_FORWARDED_HOST, self.host.as_ref()),
            (&X_FORWARDED_PORT, self.port.as_ref()),
            (&header::CONNECTION, self.upgrade.as_ref().map(|_| &CONNECTION_UPGRADE)),
            (&header::UPGRADE, self.upgrade.as_ref()),
        ]
        .into_iter()
        .filter_map(|(n, v)| Some((n, v?)))
    }

    /// Applies the changes to the request's map (for a node that is not written to as
    /// HTTP/1.1 text). gRPC's `te: trailers`, the one TE value HTTP/2 allows, is kept.
    pub fn apply(&self, headers: &mut HeaderMap) {
        let te_trailers = headers.get(header::TE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
        if self.scoped {
            for n in &HOP_BY_HOP {
                headers.remove(n);
            }
        }
        if te_trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
        for (n, v) in self.added() {
            headers.insert(n.clone(), v.clone());
        }
    }
}

impl Fields for Hop {
    fn encode(&self, headers: &HeaderMap, framed: bool, buf: &mut Vec<u8>) {
        for (name, value) in headers {
            if !self.drops(name, framed) {
                encode_field(name, value, buf);
            }
        }
        for (name, value) in self.added() {
            encode_field(name, value, buf);
        }
    }
}

/// Writes a request's header fields as they go out: a proxy adds and drops fields here rather
/// than in the request's map.
pub trait Fields: Sync {
    /// `framed`: the body's framing field is written apart, so Content-Length stays out.
    fn encode(&self, headers: &HeaderMap, framed: bool, buf: &mut Vec<u8>);
}

/// The request's fields as they are.
pub struct AsIs;

impl Fields for AsIs {
    fn encode(&self, headers: &HeaderMap, framed: bool, buf: &mut Vec<u8>) {
        for (name, value) in headers {
            if !(framed && name == header::CONTENT_LENGTH) {
                encode_field(name, value, buf);
            }
        }
    }
}

pub fn encode_field(name: &HeaderName, value: &HeaderValue, buf: &mut Vec<u8>) {
    buf.extend_from_slice(name.as_str().as_bytes());
    buf.extend_from_slice(b": ");
    buf.extend_from_slice(value.as_bytes());
    buf.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(host: Option<&'static str>) -> (HeaderValue, HeaderValue, Option<HeaderValue>) {
        (HeaderValue::from_static("10.0.0.9"), HeaderValue::from_static("9080"), host.map(HeaderValue::from_static))
    }

    fn hop(headers: &HeaderMap, upgrade: Option<&'static str>) -> Hop {
        hop_from(headers, upgrade, true)
    }

    fn hop_from(headers: &HeaderMap, upgrade: Option<&'static str>, trusted: bool) -> Hop {
        let (ip, port, host) = client(Some("api.test"));
        Hop::new(headers, Client { ip: &ip, scheme: "http", port: &port, host, trusted }, upgrade.map(HeaderValue::from_static))
    }

    fn written(h: &Hop, headers: &HeaderMap) -> String {
        let mut buf = Vec::new();
        h.encode(headers, false, &mut buf);
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn written_and_applied_agree() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("api.test"));
        headers.append(X_FORWARDED_FOR.clone(), HeaderValue::from_static("1.1.1.1"));
        headers.append(X_FORWARDED_FOR.clone(), HeaderValue::from_static("2.2.2.2"));
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("https"));
        headers.insert(X_REAL_IP.clone(), HeaderValue::from_static("forged"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert("x-kept", HeaderValue::from_static("yes"));
        strip_connection_named(&mut headers);
        let h = hop(&headers, None);
        let text = written(&h, &headers);
        assert_eq!(
            text,
            "host: api.test\r\nx-forwarded-proto: https\r\nx-kept: yes\r\nx-forwarded-for: 1.1.1.1, 2.2.2.2, 10.0.0.9\r\n\
             x-real-ip: 10.0.0.9\r\nx-forwarded-host: api.test\r\nx-forwarded-port: 9080\r\n"
        );
        let mut applied = headers.clone();
        h.apply(&mut applied);
        for line in text.lines() {
            let (n, v) = line.split_once(": ").unwrap();
            assert_eq!(applied.get_all(n).iter().map(|v| v.to_str().unwrap()).collect::<Vec<_>>(), [v], "{n}");
        }
        assert!(!applied.contains_key("x-secret") && !applied.contains_key("keep-alive") && !applied.contains_key(header::CONNECTION));
        assert_eq!(applied[header::TE], "trailers", "gRPC's TE survives for HTTP/2");
    }

    #[test]
    fn an_untrusted_client_forwarded_fields_are_replaced() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("api.test"));
        headers.insert(X_FORWARDED_FOR.clone(), HeaderValue::from_static("1.1.1.1"));
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("https"));
        headers.insert(X_FORWARDED_HOST.clone(), HeaderValue::from_static("evil.test"));
        headers.insert(X_FORWARDED_PORT.clone(), HeaderValue::from_static("1"));
        headers.insert(X_REAL_IP.clone(), HeaderValue::from_static("forged"));
        let h = hop_from(&headers, None, false);
        let text = written(&h, &headers);
        assert_eq!(
            text,
            "host: api.test\r\nx-forwarded-for: 10.0.0.9\r\nx-real-ip: 10.0.0.9\r\nx-forwarded-proto: http\r\n\
             x-forwarded-host: api.test\r\nx-forwarded-port: 9080\r\n"
        );
        let mut applied = headers.clone();
        h.apply(&mut applied);
        for line in text.lines() {
            let (n, v) = line.split_once(": ").unwrap();
            assert_eq!(applied.get_all(n).iter().map(|v| v.to_str().unwrap()).collect::<Vec<_>>(), [v], "{n}");
        }
    }

    #[test]
    fn connection_never_names_host_away() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("close, X-Consumer-Username, Host, content-length"));
        h.insert(header::HOST, HeaderValue::from_static("api.test"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        h.insert("x-consumer-username", HeaderValue::from_static("forged"));
        strip_connection_named(&mut h);
        assert!(!h.contains_key("x-consumer-username"));
        assert!(h.contains_key(header::HOST) && h.contains_key(header::CONTENT_LENGTH) && h.contains_key(header::CONNECTION));
    }

    #[test]
    fn only_a_switch_or_its_refusal_passes_upgrade_on() {
        assert!(passes_in_answer(426, &header::UPGRADE) && passes_in_answer(101, &header::UPGRADE));
        assert!(!passes_in_answer(200, &header::UPGRADE) && !passes_in_answer(426, &header::CONNECTION));
        assert!(passes_in_answer(200, &header::SERVER));
    }

    #[test]
    fn upgrades_go_out_with_their_protocol() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        let text = written(&hop(&headers, Some("websocket")), &headers);
        assert!(text.ends_with("connection: upgrade\r\nupgrade: websocket\r\n"), "{text}");
        assert_eq!(text.matches("upgrade:").count(), 1, "{text}");
        let text = written(&hop(&headers, None), &headers);
        assert!(!text.contains("upgrade"), "no upgrade on a route without websocket: {text}");
    }

    #[test]
    fn strip_removes_named_fields() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("close, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }
}
