//! Request variables, as `vars` expressions and plugins name them (nginx's and APISIX's names).

use std::borrow::Cow;
use std::net::SocketAddr;

use http::header::{self, HeaderMap};
use http::{Method, Uri};
use weir_core::expr::Vars;
use weir_core::text::{cookie, ip_text, percent_decode, query_pairs};

/// Read lazily from the request: nothing is computed until a variable is asked for.
pub struct RequestVars<'a> {
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
    /// Lower-case, without port.
    pub host: Option<&'a str>,
    pub remote: SocketAddr,
    pub local: SocketAddr,
    pub scheme: &'static str,
}

impl Vars for RequestVars<'_> {
    fn get(&self, name: &str) -> Option<Cow<'_, str>> {
        if let Some(arg) = name.strip_prefix("arg_") {
            let query = self.uri.query()?;
            return query_pairs(query)
                .find_map(|(k, v)| (percent_decode(k) == arg).then(|| Cow::Owned(percent_decode(v).into_owned())));
        }
        if let Some(h) = name.strip_prefix("http_") {
            let header = h.replace('_', "-");
            return self.headers.get(header.as_str()).and_then(|v| v.to_str().ok()).map(Cow::Borrowed);
        }
        if let Some(c) = name.strip_prefix("cookie_") {
            return self
                .headers
                .get_all(header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .find_map(|line| cookie(line, |k| k == c))
                .map(Cow::Borrowed);
        }
        match name {
            "uri" => Some(Cow::Borrowed(self.uri.path())),
            "request_uri" => Some(Cow::Borrowed(self.uri.path_and_query().map_or("/", |p| p.as_str()))),
            "args" | "query_string" => self.uri.query().map(Cow::Borrowed),
            "host" => self.host.map(Cow::Borrowed),
            "request_method" => Some(Cow::Borrowed(self.method.as_str())),
            "remote_addr" => Some(Cow::Owned(ip_text(self.remote.ip()))),
            "remote_port" => Some(Cow::Owned(self.remote.port().to_string())),
            "server_addr" => Some(Cow::Owned(ip_text(self.local.ip()))),
            "server_port" => Some(Cow::Owned(self.local.port().to_string())),
            "scheme" => Some(Cow::Borrowed(self.scheme)),
            _ => None,
        }
    }
}
