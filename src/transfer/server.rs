//! The admin API's Export and Import calls (src/admin.rs delegates here):
//! bridges between gRPC streams and the blocking export and import, which
//! run on tokio's blocking pool, counted as in flight.
//!
//! Export writes into a bounded channel that the response stream drains, so
//! a slow client slows the export instead of filling memory; when the
//! client goes away the channel closes, the export fails on its next write
//! and removes its views. Import reads from a bounded channel that a task
//! fills from the request stream; if the client goes away mid-stream the
//! channel reports it and the import rolls back.

use std::io::{self, Read, Write};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use super::{Compression, ExportOptions, Format, begin_export, import};
use crate::grpc::{run_blocking, status};
use crate::inventory::Detail;
use crate::proto::cowsnap::admin::v1 as pb;
use crate::snapshotter::Snapshotter;

/// Bytes per ExportChunk message.
pub const CHUNK_BYTES: usize = 1 << 20;
/// Messages buffered between the export and the client.
const CHANNEL_DEPTH: usize = 4;

/// The Export response stream.
pub type ExportStream = Pin<Box<dyn Stream<Item = Result<pb::ExportChunk, Status>> + Send>>;

/// Options from the wire request.
fn options(r: pb::ExportRequest) -> Result<ExportOptions, Status> {
    let format = match pb::ArchiveFormat::try_from(r.format) {
        Ok(pb::ArchiveFormat::Tar) => Format::Tar,
        Ok(pb::ArchiveFormat::BtrfsSend) => Format::BtrfsSend,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "export: unknown format {}",
                r.format
            )));
        }
    };
    let compression = match pb::ArchiveCompression::try_from(r.compression) {
        Ok(pb::ArchiveCompression::Zstd) => Compression::Zstd,
        Ok(pb::ArchiveCompression::Gzip) => Compression::Gzip,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "export: unknown compression {}",
                r.compression
            )));
        }
    };
    Ok(ExportOptions {
        reference: r.r#ref,
        chain: r.chain,
        incremental: r.incremental,
        format,
        compression,
    })
}

/// Starts an export; errors about the request are returned before any
/// data, later ones end the stream.
pub async fn export_stream(
    core: Arc<Snapshotter>,
    in_flight: Arc<AtomicUsize>,
    request: pb::ExportRequest,
) -> Result<ExportStream, Status> {
    let opts = options(request)?;
    let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
    let (ready_tx, ready_rx) = oneshot::channel::<Result<(), Status>>();
    let stream_tx = tx.clone();
    tokio::spawn(async move {
        let done = run_blocking(&core, &in_flight, "admin.export", move |c| {
            let export = match begin_export(c, opts) {
                Ok(e) => e,
                Err(e) => {
                    let _ = ready_tx.send(Err(status("admin.export", &e)));
                    return Err(e);
                }
            };
            let _ = ready_tx.send(Ok(()));
            export.write(ChunkWriter::new(stream_tx)).map(|_| ())
        })
        .await;
        if let Err(st) = done {
            // Reaches the client unless it is gone (or the error was sent
            // as the call's answer already).
            let _ = tx.send(Err(st)).await;
        }
    });
    match ready_rx.await {
        Ok(Ok(())) => Ok(Box::pin(ReceiverStream::new(rx))),
        Ok(Err(st)) => Err(st),
        Err(_) => Err(Status::internal(
            "admin.export: the export stopped before starting",
        )),
    }
}

/// Runs an import of the archive the client streams; answers with the
/// imported snapshot.
pub async fn import_stream(
    core: Arc<Snapshotter>,
    in_flight: Arc<AtomicUsize>,
    mut stream: Streaming<pb::ImportChunk>,
) -> Result<Detail, Status> {
    let first = stream
        .message()
        .await?
        .ok_or_else(|| Status::invalid_argument("admin.import: the archive is empty"))?;
    let key = first.key;
    let (tx, rx) = mpsc::channel::<io::Result<Vec<u8>>>(CHANNEL_DEPTH);
    let pump = async move {
        if tx.send(Ok(first.data)).await.is_err() {
            return;
        }
        loop {
            let item = match stream.message().await {
                Ok(Some(chunk)) => Ok(chunk.data),
                Ok(None) => return,
                Err(st) => Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    format!("the client's stream failed: {}", st.message()),
                )),
            };
            let failed = item.is_err();
            if tx.send(item).await.is_err() || failed {
                return;
            }
        }
    };
    let work = run_blocking(&core, &in_flight, "admin.import", move |c| {
        let name = import(c, ChunkReader::new(rx), Some(&key))?;
        c.inspect(&name)
    });
    let pump = tokio::spawn(pump);
    let detail = work.await;
    // Stop reading the client once the import is over (it failed early,
    // or the archive's trailer came before the end of the stream).
    pump.abort();
    detail
}

/// A `Write` that sends the bytes as ExportChunk messages.
struct ChunkWriter {
    tx: mpsc::Sender<Result<pb::ExportChunk, Status>>,
    buf: Vec<u8>,
}

impl ChunkWriter {
    fn new(tx: mpsc::Sender<Result<pb::ExportChunk, Status>>) -> Self {
        ChunkWriter {
            tx,
            buf: Vec::with_capacity(CHUNK_BYTES),
        }
    }

    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let data = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK_BYTES));
        self.tx
            .blocking_send(Ok(pb::ExportChunk { data }))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client went away"))
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK_BYTES - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK_BYTES {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// A `Read` over the chunks the request stream delivers.
struct ChunkReader {
    rx: mpsc::Receiver<io::Result<Vec<u8>>>,
    chunk: Vec<u8>,
    pos: usize,
}

impl ChunkReader {
    fn new(rx: mpsc::Receiver<io::Result<Vec<u8>>>) -> Self {
        ChunkReader {
            rx,
            chunk: Vec::new(),
            pos: 0,
        }
    }
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.chunk.len() {
            match self.rx.blocking_recv() {
                Some(Ok(c)) => {
                    self.chunk = c;
                    self.pos = 0;
                }
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Unit conversions checked without a daemon.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_options_map_to_export_options() {
        let o = options(pb::ExportRequest {
            r#ref: "x".into(),
            chain: true,
            format: pb::ArchiveFormat::BtrfsSend as i32,
            compression: pb::ArchiveCompression::Gzip as i32,
            incremental: false,
        })
        .unwrap();
        assert_eq!(o.format, Format::BtrfsSend);
        assert_eq!(o.compression, Compression::Gzip);
        assert!(o.chain);
        let bad = options(pb::ExportRequest {
            format: 42,
            ..Default::default()
        });
        assert_eq!(bad.unwrap_err().code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn chunk_reader_reads_across_chunks_and_reports_stream_errors() {
        let (tx, rx) = mpsc::channel(4);
        tx.try_send(Ok(b"ab".to_vec())).unwrap();
        tx.try_send(Ok(b"cde".to_vec())).unwrap();
        drop(tx);
        let mut out = String::new();
        ChunkReader::new(rx).read_to_string(&mut out).unwrap();
        assert_eq!(out, "abcde");
        let (tx, rx) = mpsc::channel(4);
        tx.try_send(Err(io::Error::other("gone"))).unwrap();
        assert!(ChunkReader::new(rx).read(&mut [0; 4]).is_err());
    }

    #[test]
    fn chunk_writer_sends_full_chunks_then_the_rest() {
        let (tx, mut rx) = mpsc::channel(8);
        let mut w = ChunkWriter::new(tx);
        w.write_all(&vec![7u8; CHUNK_BYTES + 10]).unwrap();
        w.flush().unwrap();
        let a = rx.try_recv().unwrap().unwrap();
        let b = rx.try_recv().unwrap().unwrap();
        assert_eq!((a.data.len(), b.data.len()), (CHUNK_BYTES, 10));
        drop(rx);
        assert!(w.write_all(&vec![0u8; CHUNK_BYTES]).is_err());
    }
}
