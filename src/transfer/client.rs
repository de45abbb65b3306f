//! The command line's side of export and import: `cowsnap export` streams
//! an archive from the daemon into a file (or stdout), `cowsnap import`
//! streams a file (or stdin) to the daemon. Both show a progress bar on a
//! terminal.

use std::fs::File;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, ValueEnum};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::progress::Progress;
use super::server::CHUNK_BYTES;
use crate::cli::ClientOptions;
use crate::proto::cowsnap::admin::v1 as pb;
use crate::proto::cowsnap::admin::v1::admin_client::AdminClient;

/// Largest message accepted from or sent to the daemon.
const MAX_MESSAGE: usize = 16 << 20;

/// `export` arguments.
#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    /// The snapshot: a name, an id or a unique id prefix; it must be
    /// committed.
    #[arg(value_name = "REF")]
    pub reference: String,
    /// Where to write the archive (`-`: standard output). Written to
    /// FILE.partial first and renamed when complete.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: PathBuf,
    /// Also export every ancestor, each as a diff from its parent, so the
    /// import recreates the chain.
    #[arg(long)]
    pub chain: bool,
    /// `tar` (portable, any backend) or `btrfs-send` (btrfs on both sides,
    /// faster).
    #[arg(long, value_enum, default_value = "tar")]
    pub format: FormatArg,
    /// Compression of the archive.
    #[arg(long, value_enum, default_value = "zstd")]
    pub compression: CompressionArg,
    /// btrfs-send only: send only the changes from the snapshot's parent,
    /// which the importing side must hold (imported from here earlier).
    #[arg(long)]
    pub incremental: bool,
}

/// `import` arguments.
#[derive(Debug, Clone, Args)]
pub struct ImportArgs {
    /// The archive (`-`: standard input).
    #[arg(value_name = "FILE")]
    pub input: PathBuf,
    /// Name of the imported snapshot [default: its name in the archive].
    #[arg(long, value_name = "K")]
    pub key: Option<String>,
}

/// Archive format on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    /// Tar entries of the files.
    Tar,
    /// btrfs send streams.
    BtrfsSend,
}

/// Compression on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompressionArg {
    /// zstd.
    Zstd,
    /// gzip.
    Gzip,
}

/// Why a transfer failed.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The socket could not be dialled.
    #[error(
        "cannot connect to the cowsnap daemon at {address}: {detail} (is it running? choose its socket with --address or COWSNAP_ADDRESS)"
    )]
    Connect {
        /// The socket.
        address: String,
        /// Why.
        detail: String,
    },
    /// The daemon refused or failed.
    #[error("{}", .0.message())]
    Status(#[from] tonic::Status),
    /// A local file could not be read or written.
    #[error("{0}")]
    Local(String),
}

impl ExportArgs {
    /// The wire request.
    pub fn request(&self) -> pb::ExportRequest {
        pb::ExportRequest {
            r#ref: self.reference.clone(),
            chain: self.chain,
            format: match self.format {
                FormatArg::Tar => pb::ArchiveFormat::Tar,
                FormatArg::BtrfsSend => pb::ArchiveFormat::BtrfsSend,
            } as i32,
            compression: match self.compression {
                CompressionArg::Zstd => pb::ArchiveCompression::Zstd,
                CompressionArg::Gzip => pb::ArchiveCompression::Gzip,
            } as i32,
            incremental: self.incremental,
        }
    }
}

/// An admin client on the daemon's socket.
pub async fn connect(address: &Path) -> Result<AdminClient<Channel>, TransferError> {
    let channel =
        crate::client::connect_channel(address)
            .await
            .map_err(|e| TransferError::Connect {
                address: address.display().to_string(),
                detail: with_causes(&e),
            })?;
    Ok(AdminClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE))
}

fn with_causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(&format!(": {s}"));
        source = s.source();
    }
    out
}

/// Streams an export into `out`; returns the archive's size in bytes.
pub async fn export_to(
    client: &mut AdminClient<Channel>,
    request: pb::ExportRequest,
    out: &mut dyn Write,
    progress: &Progress,
) -> Result<u64, TransferError> {
    let mut stream = client.export(request).await?.into_inner();
    let mut total = 0u64;
    while let Some(chunk) = stream.message().await? {
        out.write_all(&chunk.data)
            .map_err(|e| TransferError::Local(format!("writing the archive: {e}")))?;
        total += chunk.data.len() as u64;
        progress.add(chunk.data.len() as u64);
    }
    out.flush()
        .map_err(|e| TransferError::Local(format!("writing the archive: {e}")))?;
    Ok(total)
}

/// Streams the archive read from `input` to the daemon's import; the
/// imported snapshot is named `key` (None: its name in the archive).
pub async fn import_from(
    client: &mut AdminClient<Channel>,
    input: Box<dyn Read + Send>,
    key: Option<String>,
    progress: &Progress,
) -> Result<pb::Snapshot, TransferError> {
    let (tx, rx) = mpsc::channel::<pb::ImportChunk>(4);
    let progress_feed = progress.clone();
    // Reading the file blocks: a thread feeds the request stream. It stops
    // when the daemon answers early (the receiver is dropped).
    let reader = tokio::task::spawn_blocking(move || -> Result<(), String> {
        let mut input = input;
        let mut key = key.unwrap_or_default();
        loop {
            let mut data = vec![0u8; CHUNK_BYTES];
            let mut len = 0;
            while len < data.len() {
                match input.read(&mut data[len..]) {
                    Ok(0) => break,
                    Ok(n) => len += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(format!("reading the archive: {e}")),
                }
            }
            data.truncate(len);
            progress_feed.add(len as u64);
            let chunk = pb::ImportChunk {
                key: std::mem::take(&mut key),
                data,
            };
            if tx.blocking_send(chunk).is_err() || len == 0 {
                return Ok(());
            }
        }
    });
    let answer = client.import(ReceiverStream::new(rx)).await;
    let read = reader
        .await
        .map_err(|e| TransferError::Local(format!("reading the archive: {e}")))?;
    // A local read error explains the daemon's "truncated" answer.
    read.map_err(TransferError::Local)?;
    Ok(answer?.into_inner())
}

/// `cowsnap export`: prints nothing on success unless stderr is a terminal.
pub fn run_export(options: &ClientOptions, args: ExportArgs) -> ExitCode {
    let to_stdout = args.output.as_os_str() == "-";
    if to_stdout && std::io::stdout().is_terminal() {
        eprintln!("cowsnap: refusing to write an archive to a terminal (use -o FILE)");
        return ExitCode::from(2);
    }
    let partial = partial_path(&args.output);
    let result = block_on(async {
        let mut client = connect(&options.address).await?;
        let mut out: Box<dyn Write> = if to_stdout {
            Box::new(std::io::stdout().lock())
        } else {
            Box::new(std::io::BufWriter::with_capacity(
                1 << 20,
                File::create(&partial).map_err(|e| {
                    TransferError::Local(format!("creating {}: {e}", partial.display()))
                })?,
            ))
        };
        let progress = Progress::new(&format!("export {}", args.reference), None);
        let start = Instant::now();
        let written = export_to(&mut client, args.request(), &mut out, &progress).await;
        progress.finish();
        drop(out);
        Ok::<_, TransferError>((written?, start.elapsed(), progress.is_visible()))
    });
    match result {
        Ok((bytes, elapsed, shown)) => {
            if !to_stdout && let Err(e) = std::fs::rename(&partial, &args.output) {
                eprintln!(
                    "cowsnap: renaming {} to {}: {e}",
                    partial.display(),
                    args.output.display()
                );
                let _ = std::fs::remove_file(&partial);
                return ExitCode::from(1);
            }
            if shown {
                eprintln!(
                    "exported {} to {} ({})",
                    args.reference,
                    args.output.display(),
                    rate(bytes, elapsed)
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            if !to_stdout {
                let _ = std::fs::remove_file(&partial);
            }
            eprintln!("cowsnap: {e}");
            ExitCode::from(1)
        }
    }
}

/// `cowsnap import`: prints the imported snapshot's name (with --json, a
/// JSON object with its name and id).
pub fn run_import(options: &ClientOptions, args: ImportArgs) -> ExitCode {
    let from_stdin = args.input.as_os_str() == "-";
    let (input, total): (Box<dyn Read + Send>, Option<u64>) = if from_stdin {
        (Box::new(std::io::stdin()), None)
    } else {
        match File::open(&args.input) {
            Ok(f) => {
                let total = f.metadata().ok().filter(|m| m.is_file()).map(|m| m.len());
                (Box::new(f), total)
            }
            Err(e) => {
                eprintln!("cowsnap: opening {}: {e}", args.input.display());
                return ExitCode::from(1);
            }
        }
    };
    let result = block_on(async {
        let mut client = connect(&options.address).await?;
        let progress = Progress::new(&format!("import {}", args.input.display()), total);
        let start = Instant::now();
        let answer = import_from(&mut client, input, args.key.clone(), &progress).await;
        progress.finish();
        let shown = progress.is_visible();
        Ok::<_, TransferError>((answer?, progress.position(), start.elapsed(), shown))
    });
    match result {
        Ok((snapshot, bytes, elapsed, shown)) => {
            if options.json {
                let doc = serde_json::json!({
                    "name": snapshot.key,
                    "id": snapshot.id,
                    "parent": snapshot.parent,
                });
                println!("{doc}");
            } else {
                println!("{}", snapshot.key);
            }
            if shown {
                eprintln!("imported {} ({})", snapshot.key, rate(bytes, elapsed));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cowsnap: {e}");
            ExitCode::from(1)
        }
    }
}

fn partial_path(output: &Path) -> PathBuf {
    let mut name = output.file_name().unwrap_or_default().to_owned();
    name.push(".partial");
    output.with_file_name(name)
}

fn rate(bytes: u64, elapsed: std::time::Duration) -> String {
    let mib = bytes as f64 / (1024.0 * 1024.0);
    let secs = elapsed.as_secs_f64().max(1e-3);
    format!("{mib:.1} MiB in {secs:.1} s, {:.1} MiB/s", mib / secs)
}

fn block_on<T>(
    f: impl std::future::Future<Output = Result<T, TransferError>>,
) -> Result<T, TransferError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| TransferError::Local(format!("starting the async runtime: {e}")))?
        .block_on(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_file_sits_next_to_the_output() {
        assert_eq!(
            partial_path(Path::new("/tmp/x/layer.tar.zst")),
            PathBuf::from("/tmp/x/layer.tar.zst.partial")
        );
        assert_eq!(partial_path(Path::new("a")), PathBuf::from("a.partial"));
    }

    #[test]
    fn command_line_options_become_the_wire_request() {
        let args = ExportArgs {
            reference: "r".into(),
            output: "o".into(),
            chain: false,
            format: FormatArg::BtrfsSend,
            compression: CompressionArg::Gzip,
            incremental: true,
        };
        let r = args.request();
        assert_eq!(r.format, pb::ArchiveFormat::BtrfsSend as i32);
        assert_eq!(r.compression, pb::ArchiveCompression::Gzip as i32);
        assert!(r.incremental && !r.chain);
    }
}
