//! A plain HTTP/1.1 client for plugins that call out (loggers, mirrors): one request per
//! connection, `http://` only.

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;

/// Sends `req` to `authority` (`host:port`) and answers the response status.
pub(crate) async fn send(authority: &str, req: http::Request<Full<Bytes>>) -> Result<http::StatusCode, String> {
    let stream = tokio::net::TcpStream::connect(authority).await.map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    Ok(resp.status())
}

/// `host:port` of an `http://` URI (port 80 when none is given).
pub(crate) fn authority(uri: &http::Uri) -> Result<String, String> {
    if uri.scheme_str() != Some("http") {
        return Err("only http:// is supported".into());
    }
    let host = uri.host().ok_or("a host is required")?;
    Ok(format!("{host}:{}", uri.port_u16().unwrap_or(80)))
}
