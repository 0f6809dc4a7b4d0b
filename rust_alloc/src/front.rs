//! The liquidation front end: the server's HTTP/2 listener.
//!
//! RecordLiquidation is the high-rate call: the front end takes each call's message off the
//! wire and queues it; one writer thread hands everything queued to Python as one batch (one
//! database transaction, one durable commit) and answers each call from the batch's result.
//! Every other call is forwarded, as it is, to the grpc.aio server behind it on loopback.
//! Python then spends nothing per call on HTTP/2, and nothing but its own work per batch.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::mpsc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Either, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{oneshot, watch};

/// gRPC status codes used by the front end itself.
const INTERNAL: i32 = 13;
const RESOURCE_EXHAUSTED: i32 = 8;
const UNIMPLEMENTED: i32 = 12;
const UNAVAILABLE: i32 = 14;

/// A RecordLiquidation request is a few hundred bytes; anything far larger is refused
/// before it is buffered.
const MESSAGE_BYTES_MAX: usize = 64 * 1024;
// HTTP/2 flow control: a stream may have 4 MiB in flight, a connection 64 MiB, so that a
// client that stops reading a forwarded stream holds up at most its own streams' share of
// the one connection to grpc.aio that every forwarded call shares.
const STREAM_WINDOW_BYTES: u32 = 4 * 1024 * 1024;
const CONNECTION_WINDOW_BYTES: u32 = 64 * 1024 * 1024;
// A compressed request may not inflate beyond this.
const INFLATED_BYTES_MAX: u64 = 1024 * 1024;

/// One call's answer: the serialized response message, or a status code and its message.
enum Reply {
    Message(Bytes),
    Status(i32, String),
}

struct Pending {
    message: Bytes,
    reply: oneshot::Sender<Reply>,
}

struct Shared {
    method: String,
    backend: String,
    queue: mpsc::Sender<Pending>,
    client: Client<HttpConnector, Incoming>,
}

type ReplyBody = Either<Incoming, GrpcReply>;

/// The listener, its runtime and the writer thread; `stop` drains them.
#[pyclass(module = "ledger._alloc")]
pub struct FrontEnd {
    port: u16,
    runtime: Option<tokio::runtime::Runtime>,
    // Bound at construction, served from start().
    listener: Option<TcpListener>,
    shared: Option<Arc<Shared>>,
    stop_signal: Option<watch::Sender<Option<Duration>>>,
    server: Option<tokio::task::JoinHandle<()>>,
    writer: Option<JoinHandle<()>>,
}

#[pymethods]
impl FrontEnd {
    /// Listen on `listen` (HOST:PORT); answer `method` (a full gRPC path) through
    /// `record(messages: list[bytes]) -> list[bytes | tuple[int, str]]`, called on one writer
    /// thread with up to `batch_max` queued messages; forward other calls to
    /// 127.0.0.1:`backend_port`.
    #[new]
    #[pyo3(signature = (listen, backend_port, method, record, *, batch_max = 1024, reuse_port = false))]
    fn new(
        py: Python<'_>,
        listen: &str,
        backend_port: u16,
        method: String,
        record: Py<PyAny>,
        batch_max: usize,
        reuse_port: bool,
    ) -> PyResult<Self> {
        if batch_max == 0 {
            return Err(PyValueError::new_err("batch_max: must be at least 1"));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("ledger-front")
            .enable_all()
            .build()
            .map_err(|e| PyRuntimeError::new_err(format!("cannot start the front end: {e}")))?;
        let listener = py
            .detach(|| runtime.block_on(bind(listen, reuse_port)))
            .map_err(|e| PyOSError::new_err(format!("cannot listen on {listen}: {e}")))?;
        let port = listener
            .local_addr()
            .map_err(|e| PyOSError::new_err(e.to_string()))?
            .port();

        let (queue, pending) = mpsc::channel::<Pending>();
        let writer = std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || write_batches(pending, record, batch_max))
            .map_err(|e| PyRuntimeError::new_err(format!("cannot start the writer: {e}")))?;

        let mut client = Client::builder(TokioExecutor::new());
        client
            .http2_only(true)
            .http2_initial_stream_window_size(STREAM_WINDOW_BYTES)
            .http2_initial_connection_window_size(CONNECTION_WINDOW_BYTES);
        // Without TCP_NODELAY a forwarded unary call waits out Nagle's algorithm against the
        // peer's delayed ACK: about 40 ms a call instead of a fraction of one.
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let shared = Arc::new(Shared {
            method,
            backend: format!("http://127.0.0.1:{backend_port}"),
            queue,
            client: client.build(connector),
        });
        let (stop_signal, _) = watch::channel(None);
        Ok(Self {
            port,
            runtime: Some(runtime),
            listener: Some(listener),
            shared: Some(shared),
            stop_signal: Some(stop_signal),
            server: None,
            writer: Some(writer),
        })
    }

    /// Start accepting connections (once).
    fn start(&mut self) -> PyResult<()> {
        let (Some(runtime), Some(signal)) = (&self.runtime, &self.stop_signal) else {
            return Err(PyRuntimeError::new_err("the front end is stopped"));
        };
        let (Some(listener), Some(shared)) = (self.listener.take(), self.shared.take()) else {
            return Err(PyRuntimeError::new_err("the front end is already started"));
        };
        self.server = Some(runtime.spawn(serve(listener, shared, signal.subscribe())));
        Ok(())
    }

    #[getter]
    fn port(&self) -> u16 {
        self.port
    }

    /// Stop accepting, let calls in flight finish for up to `grace_seconds`, then close
    /// every connection and wait for the writer's last batch.
    fn stop(&mut self, py: Python<'_>, grace_seconds: f64) {
        let grace = if grace_seconds.is_nan() || grace_seconds <= 0.0 {
            Duration::ZERO
        } else {
            Duration::try_from_secs_f64(grace_seconds).unwrap_or(Duration::MAX)
        };
        let (Some(runtime), Some(signal)) = (self.runtime.take(), self.stop_signal.take()) else {
            return;
        };
        let server = self.server.take();
        let writer = self.writer.take();
        let unstarted = (self.listener.take(), self.shared.take());
        py.detach(move || {
            drop(unstarted);
            let _ = signal.send(Some(grace));
            if let Some(server) = server {
                let _ = runtime.block_on(server);
            }
            runtime.shutdown_timeout(Duration::from_secs(1));
            if let Some(writer) = writer {
                let _ = writer.join();
            }
        });
    }
}

impl Drop for FrontEnd {
    fn drop(&mut self) {
        if let Some(signal) = self.stop_signal.take() {
            let _ = signal.send(Some(Duration::ZERO));
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

async fn bind(listen: &str, reuse_port: bool) -> std::io::Result<TcpListener> {
    let mut last = None;
    for address in tokio::net::lookup_host(listen).await? {
        match bind_one(address, reuse_port) {
            Ok(listener) => return Ok(listener),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no address to listen on")))
}

fn bind_one(address: SocketAddr, reuse_port: bool) -> std::io::Result<TcpListener> {
    let socket = if address.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    if reuse_port {
        socket.set_reuseport(true)?;
    }
    socket.bind(address)?;
    socket.listen(1024)
}

async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stopped: watch::Receiver<Option<Duration>>,
) {
    let graceful = GracefulShutdown::new();
    let grace = loop {
        tokio::select! {
            changed = stopped.changed() => {
                break if changed.is_ok() { (*stopped.borrow()).unwrap_or_default() } else { Duration::ZERO };
            }
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    // Out of file descriptors, say: try again shortly rather than spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let shared = shared.clone();
                let service = service_fn(move |request| handle(shared.clone(), request));
                let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                builder
                    .timer(TokioTimer::new())
                    .initial_stream_window_size(STREAM_WINDOW_BYTES)
                    .initial_connection_window_size(CONNECTION_WINDOW_BYTES);
                let connection = builder.serve_connection(TokioIo::new(stream), service);
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    let _ = connection.await;
                });
            }
        }
    };
    drop(listener);
    drop(shared);
    let _ = tokio::time::timeout(grace, graceful.shutdown()).await;
}

async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<ReplyBody>, Infallible> {
    if request.uri().path() == shared.method {
        return Ok(record(&shared, request).await.map(Either::Right));
    }
    Ok(forward(&shared, request).await)
}

/// A RecordLiquidation call: its one message goes to the writer's queue, and the call waits
/// for its batch. A client that goes away only drops its side of the reply.
async fn record(shared: &Shared, request: Request<Incoming>) -> Response<GrpcReply> {
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let is_grpc = header("content-type").is_some_and(|v| {
        let media = v.split(';').next().unwrap_or_default().trim();
        media == "application/grpc" || media == "application/grpc+proto"
    });
    let encoding = header("grpc-encoding");
    if !is_grpc {
        return Response::builder()
            .status(StatusCode::UNSUPPORTED_MEDIA_TYPE)
            .body(GrpcReply::empty())
            .unwrap_or_default();
    }
    let body = match Limited::new(request.into_body(), MESSAGE_BYTES_MAX + 5)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            let code = if e.is::<http_body_util::LengthLimitError>() {
                RESOURCE_EXHAUSTED
            } else {
                INTERNAL
            };
            return grpc_reply(Reply::Status(code, format!("request: {e}")));
        }
    };
    let message = match unframe(body, encoding.as_deref()) {
        Ok(message) => message,
        Err((code, text)) => return grpc_reply(Reply::Status(code, text)),
    };
    let (reply, answer) = oneshot::channel();
    if shared.queue.send(Pending { message, reply }).is_err() {
        return grpc_reply(Reply::Status(UNAVAILABLE, "the server is stopping".into()));
    }
    match answer.await {
        Ok(reply) => grpc_reply(reply),
        Err(_) => grpc_reply(Reply::Status(UNAVAILABLE, "the server is stopping".into())),
    }
}

/// The single message of a unary request body: a 5-byte prefix (compressed flag, length),
/// inflated if the client compressed it with `encoding` (gzip or deflate, as grpc offers).
fn unframe(mut body: Bytes, encoding: Option<&str>) -> Result<Bytes, (i32, String)> {
    if body.len() < 5 {
        return Err((INTERNAL, "request: no complete gRPC message".into()));
    }
    let compressed = body.get_u8();
    let length = body.get_u32() as usize;
    if length == body.len() && compressed != 0 {
        return inflate(&body, encoding.unwrap_or("identity"));
    }
    if length != body.len() {
        return Err((
            INTERNAL,
            format!(
                "request: a gRPC message of {length} bytes, {} received",
                body.len()
            ),
        ));
    }
    Ok(body)
}

fn inflate(compressed: &[u8], encoding: &str) -> Result<Bytes, (i32, String)> {
    use std::io::Read;
    let mut inflated = Vec::new();
    let read = match encoding {
        "gzip" => flate2::read::GzDecoder::new(compressed)
            .take(INFLATED_BYTES_MAX + 1)
            .read_to_end(&mut inflated),
        "deflate" => flate2::read::ZlibDecoder::new(compressed)
            .take(INFLATED_BYTES_MAX + 1)
            .read_to_end(&mut inflated),
        other => {
            return Err((
                UNIMPLEMENTED,
                format!("grpc-encoding: {other:?} is not supported (gzip, deflate or none)"),
            ))
        }
    };
    match read {
        Ok(_) if inflated.len() as u64 > INFLATED_BYTES_MAX => Err((
            RESOURCE_EXHAUSTED,
            format!("request: inflates beyond {INFLATED_BYTES_MAX} bytes"),
        )),
        Ok(_) => Ok(Bytes::from(inflated)),
        Err(e) => Err((
            INTERNAL,
            format!("request: cannot inflate its {encoding} message: {e}"),
        )),
    }
}

/// Any other call, forwarded as it is to the grpc.aio server: headers, body and trailers
/// stream both ways, and a client's cancel resets the forwarded stream.
async fn forward(shared: &Shared, request: Request<Incoming>) -> Response<ReplyBody> {
    let (mut parts, body) = request.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    parts.uri = match format!("{}{path}", shared.backend).parse::<Uri>() {
        Ok(uri) => uri,
        Err(e) => {
            return grpc_reply(Reply::Status(INTERNAL, format!("path {path:?}: {e}")))
                .map(Either::Right)
        }
    };
    match shared
        .client
        .request(Request::from_parts(parts, body))
        .await
    {
        Ok(response) => response.map(Either::Left),
        Err(e) => grpc_reply(Reply::Status(
            UNAVAILABLE,
            format!("the ledger service is not reachable: {e}"),
        ))
        .map(Either::Right),
    }
}

/// The writer thread: waits (without the GIL) for queued calls, takes up to `batch_max` of
/// them and calls `record` once for the batch.
fn write_batches(pending: mpsc::Receiver<Pending>, record: Py<PyAny>, batch_max: usize) {
    while let Ok(first) = pending.recv() {
        let mut batch = vec![first];
        while batch.len() < batch_max {
            match pending.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        // A call whose client went away (a cancel, its deadline) is not recorded.
        batch.retain(|call| !call.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let replies = Python::attach(|py| call_record(py, &record, &batch));
        for (call, reply) in batch.into_iter().zip(replies) {
            let _ = call.reply.send(reply);
        }
    }
    Python::attach(|_py| drop(record));
}

fn call_record(py: Python<'_>, record: &Py<PyAny>, batch: &[Pending]) -> Vec<Reply> {
    let failed = |text: String| {
        batch
            .iter()
            .map(|_| Reply::Status(INTERNAL, text.clone()))
            .collect()
    };
    let messages = match PyList::new(py, batch.iter().map(|p| PyBytes::new(py, &p.message))) {
        Ok(list) => list,
        Err(e) => return failed(format!("internal error: {e}")),
    };
    let result = match record.call1(py, (messages,)) {
        Ok(result) => result,
        Err(e) => {
            e.print(py);
            return failed("internal error: the batch failed".into());
        }
    };
    match result.extract::<Vec<Bound<'_, PyAny>>>(py) {
        Ok(items) if items.len() == batch.len() => items.iter().map(to_reply).collect(),
        _ => failed("internal error: the batch returned a wrong number of results".into()),
    }
}

fn to_reply(item: &Bound<'_, PyAny>) -> Reply {
    if let Ok(bytes) = item.cast::<PyBytes>() {
        return Reply::Message(Bytes::copy_from_slice(bytes.as_bytes()));
    }
    match item.extract::<(i32, String)>() {
        Ok((code, text)) => Reply::Status(code, text),
        Err(e) => Reply::Status(INTERNAL, format!("internal error: {e}")),
    }
}

fn grpc_reply(reply: Reply) -> Response<GrpcReply> {
    let mut trailers = HeaderMap::new();
    let data = match reply {
        Reply::Message(message) => {
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            let mut framed = BytesMut::with_capacity(5 + message.len());
            framed.put_u8(0);
            framed.put_u32(u32::try_from(message.len()).unwrap_or(u32::MAX));
            framed.put_slice(&message);
            Some(framed.freeze())
        }
        Reply::Status(code, text) => {
            trailers.insert("grpc-status", HeaderValue::from(code));
            if let Ok(value) = HeaderValue::from_str(&percent_encode(&text)) {
                trailers.insert("grpc-message", value);
            }
            None
        }
    };
    let mut response = Response::new(GrpcReply {
        data,
        trailers: Some(trailers),
    });
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert(
        "grpc-accept-encoding",
        HeaderValue::from_static("identity,deflate,gzip"),
    );
    response
}

/// grpc-message is percent-encoded UTF-8: everything outside printable ASCII, and '%'.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// A unary gRPC response body: at most one data frame, then the trailers.
#[derive(Default)]
pub struct GrpcReply {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl GrpcReply {
    fn empty() -> Self {
        Self::default()
    }
}

impl Body for GrpcReply {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unframe_takes_exactly_one_message() {
        let mut framed = BytesMut::new();
        framed.put_u8(0);
        framed.put_u32(3);
        framed.put_slice(b"abc");
        assert_eq!(
            unframe(framed.freeze(), None).ok(),
            Some(Bytes::from_static(b"abc"))
        );
        assert!(unframe(Bytes::from_static(&[0, 0, 0, 0, 4, 1, 2]), None).is_err());
        assert!(unframe(Bytes::from_static(&[1, 0, 0, 0, 0]), None).is_err());
        assert!(unframe(Bytes::from_static(&[0, 0]), None).is_err());
    }

    #[test]
    fn grpc_message_is_percent_encoded() {
        assert_eq!(percent_encode("a 100% ≥"), "a 100%25 %E2%89%A5");
    }
}
