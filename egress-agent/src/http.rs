//! `/metrics`, `/healthz` and `/readyz` over HTTP/1.1 (hyper), bounded for a listener on the
//! node's network: a request head of at most 8 KiB and 32 headers, sent within 5 seconds;
//! one request per connection, each connection done within 10 seconds; at most 32
//! connections at once (more wait in the listen backlog).
use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode, header, server::conn::http1, service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::TcpListener,
    sync::{Semaphore, watch},
};

use crate::metrics::{CONTENT_TYPE, Exposition, Reloads, Snapshot};

/// Connections served at once.
const MAX_CONNECTIONS: usize = 32;
/// How long a client may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection may last in all, e.g. with a client that reads its answer slowly.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of a request head at most: hyper's smallest read buffer. A longer head is
/// answered 431.
const MAX_HEAD: usize = 8192;
const MAX_HEADERS: usize = 32;

pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr}"))
}

/// What the endpoints answer from: the latest snapshot and the reload counters.
#[derive(Debug)]
pub struct Endpoints {
    exposition: Exposition,
    snapshots: watch::Receiver<Option<Snapshot>>,
}

impl Endpoints {
    pub fn new(snapshots: watch::Receiver<Option<Snapshot>>, reloads: &Reloads) -> Endpoints {
        Endpoints {
            exposition: Exposition::new(snapshots.clone(), reloads),
            snapshots,
        }
    }

    fn answer<B>(&self, request: &Request<B>) -> Response<Full<Bytes>> {
        const TEXT: &str = "text/plain; charset=utf-8";
        if !matches!(*request.method(), Method::GET | Method::HEAD) {
            return respond(StatusCode::METHOD_NOT_ALLOWED, TEXT, "GET or HEAD only\n");
        }
        let ready = self.snapshots.borrow().is_some();
        match (request.uri().path(), ready) {
            ("/healthz", _) => respond(StatusCode::OK, TEXT, "ok\n"),
            ("/readyz", true) => respond(StatusCode::OK, TEXT, "ready\n"),
            ("/readyz", false) => {
                respond(StatusCode::SERVICE_UNAVAILABLE, TEXT, "not attached yet\n")
            }
            ("/metrics", _) => respond(StatusCode::OK, CONTENT_TYPE, self.exposition.encode()),
            _ => respond(StatusCode::NOT_FOUND, TEXT, "not found\n"),
        }
    }
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

/// Serves until the listener fails.
pub async fn serve(listener: TcpListener, endpoints: Endpoints) -> anyhow::Result<()> {
    let endpoints = Arc::new(endpoints);
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        // Accepting only with a permit in hand leaves the connections beyond the limit in
        // the kernel's backlog, where they cost the agent nothing.
        let permit = Arc::clone(&permits).acquire_owned().await?;
        let (stream, peer) = listener.accept().await?;
        let endpoints = Arc::clone(&endpoints);
        tokio::spawn(async move {
            if let Err(e) = connection(TokioIo::new(stream), endpoints).await {
                log::debug!("HTTP connection from {peer}: {e:#}");
            }
            drop(permit);
        });
    }
}

/// Answers one request on `io` within the limits above.
async fn connection<I>(io: I, endpoints: Arc<Endpoints>) -> anyhow::Result<()>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = service_fn(move |request| {
        let response = endpoints.answer(&request);
        async move { Ok::<_, Infallible>(response) }
    });
    let serving = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(MAX_HEAD)
        .max_headers(MAX_HEADERS)
        .keep_alive(false)
        .serve_connection(io, service);
    tokio::time::timeout(CONNECTION_TIMEOUT, serving)
        .await
        .context("the connection outlasted its time")?
        .context("serving")
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};

    use super::*;

    /// A connection served over an in-memory pipe; the client's end.
    fn connect() -> (DuplexStream, tokio::task::JoinHandle<anyhow::Result<()>>) {
        let (_tx, snapshots) = watch::channel(None);
        let endpoints = Arc::new(Endpoints::new(snapshots, &Reloads::default()));
        let (client, server) = tokio::io::duplex(4 * MAX_HEAD);
        let served = tokio::spawn(connection(TokioIo::new(server), endpoints));
        (client, served)
    }

    async fn read_response(client: &mut DuplexStream) -> String {
        let mut response = Vec::new();
        client.read_to_end(&mut response).await.expect("read");
        String::from_utf8(response).expect("UTF-8")
    }

    /// A head sent in pieces is read whole and answered; the connection closes after one
    /// request.
    #[tokio::test]
    async fn a_request_head_in_pieces_is_answered() {
        let (mut client, served) = connect();
        for piece in ["GET ", "/readyz", " HTTP/1.1\r\nHost: x\r\n", "\r\n"] {
            client.write_all(piece.as_bytes()).await.expect("write");
            tokio::task::yield_now().await;
        }
        let response = read_response(&mut client).await;
        assert!(
            response.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{response}"
        );
        assert!(
            response.ends_with("\r\n\r\nnot attached yet\n"),
            "{response}"
        );
        served.await.expect("join").expect("served");
    }

    #[tokio::test]
    async fn metrics_are_text_format_and_other_methods_are_refused() {
        let (mut client, served) = connect();
        client
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let response = read_response(&mut client).await;
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(
            response.contains("\r\ncontent-type: text/plain; version=0.0.4; charset=utf-8\r\n"),
            "{response}"
        );
        assert!(response.contains("\negress_ready 0\n"), "{response}");
        served.await.expect("join").expect("served");

        let (mut client, _served) = connect();
        client
            .write_all(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            .await
            .expect("write");
        let response = read_response(&mut client).await;
        assert!(response.starts_with("HTTP/1.1 405 "), "{response}");
    }

    #[tokio::test]
    async fn a_head_past_the_limit_is_refused() {
        let (mut client, _served) = connect();
        let mut head = b"GET /metrics HTTP/1.1\r\nX-Padding: ".to_vec();
        head.resize(2 * MAX_HEAD, b'a');
        client.write_all(&head).await.expect("write");
        let response = read_response(&mut client).await;
        assert!(response.starts_with("HTTP/1.1 431 "), "{response}");
    }

    /// A client that never finishes its head loses the connection after `HEAD_TIMEOUT`.
    #[tokio::test(start_paused = true)]
    async fn a_head_never_finished_is_cut_off() {
        let (mut client, _served) = connect();
        let start = tokio::time::Instant::now();
        client
            .write_all(b"GET /metrics HTTP/1.1\r\n")
            .await
            .expect("write");
        let response = read_response(&mut client).await;
        assert!(!response.contains("200 OK"), "{response}");
        let waited = start.elapsed();
        assert!(
            waited >= HEAD_TIMEOUT && waited < CONNECTION_TIMEOUT,
            "{waited:?}"
        );
    }
}
