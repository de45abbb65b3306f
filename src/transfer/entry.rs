//! Reading one tar entry: its pax records, its metadata and its data
//! (plain, or pax 1.0 sparse with the holes left as holes).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;

use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid};

use super::pack::PAX_XATTR;
use crate::error::{Error, IoContext, Result};

/// What the pax records of an entry say.
#[derive(Default)]
pub struct Pax {
    /// The `mtime` record.
    pub mtime: Option<TimeSpec>,
    /// `SCHILY.xattr.*` records: name and value.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// pax 1.0 sparse: the file's real size.
    pub sparse_realsize: Option<u64>,
}

/// Turns an error reading the archive into the error the importer reports.
pub fn read_error(e: io::Error) -> Error {
    Error::InvalidArgument(format!("the archive is damaged or truncated: {e}"))
}

/// An archive that says something impossible.
pub fn bad(msg: String) -> Error {
    Error::InvalidArgument(msg)
}

/// Mode bits, owner and mtime of an entry.
pub fn entry_meta(header: &tar::Header, pax: &Pax) -> Result<(u32, (Uid, Gid), TimeSpec)> {
    let mode = header.mode().map_err(read_error)? & 0o7777;
    let uid = header.uid().map_err(read_error)?;
    let gid = header.gid().map_err(read_error)?;
    let mtime = match pax.mtime {
        Some(t) => t,
        None => TimeSpec::new(
            i64::try_from(header.mtime().map_err(read_error)?).unwrap_or(i64::MAX),
            0,
        ),
    };
    let uid = u32::try_from(uid).map_err(|_| bad(format!("uid {uid} out of range")))?;
    let gid = u32::try_from(gid).map_err(|_| bad(format!("gid {gid} out of range")))?;
    Ok((mode, (Uid::from_raw(uid), Gid::from_raw(gid)), mtime))
}

pub fn read_pax<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Pax> {
    let mut pax = Pax::default();
    let Some(exts) = entry.pax_extensions().map_err(read_error)? else {
        return Ok(pax);
    };
    let mut sparse_major = None;
    for ext in exts {
        let ext = ext.map_err(read_error)?;
        let key = ext.key_bytes();
        let value = ext.value_bytes();
        if let Some(name) = key.strip_prefix(PAX_XATTR.as_bytes()) {
            pax.xattrs.push((name.to_vec(), value.to_vec()));
        } else if key == b"mtime" {
            pax.mtime = Some(parse_pax_time(value)?);
        } else if key == b"GNU.sparse.major" {
            sparse_major = Some(value.to_vec());
        } else if key == b"GNU.sparse.realsize" {
            pax.sparse_realsize = Some(parse_decimal(value)?);
        }
    }
    if pax.sparse_realsize.is_some() && sparse_major.as_deref() != Some(b"1") {
        return Err(bad("only pax 1.0 sparse entries are supported".into()));
    }
    Ok(pax)
}

fn parse_decimal(v: &[u8]) -> Result<u64> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            bad(format!(
                "bad number {:?} in the archive",
                String::from_utf8_lossy(v)
            ))
        })
}

/// Parses a pax time: seconds, optionally with a fraction (`-12.5`).
fn parse_pax_time(v: &[u8]) -> Result<TimeSpec> {
    let s = std::str::from_utf8(v).map_err(|_| bad("pax mtime is not text".into()))?;
    let err = || bad(format!("bad pax mtime {s:?}"));
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let negative = int.starts_with('-');
    let secs: i64 = int.parse().map_err(|_| err())?;
    if frac.len() > 9 && !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err());
    }
    let digits: String = frac.chars().take(9).collect();
    let mut nanos: i64 = if digits.is_empty() {
        0
    } else {
        format!("{digits:0<9}").parse().map_err(|_| err())?
    };
    let mut secs = secs;
    if negative && nanos > 0 {
        secs -= 1;
        nanos = 1_000_000_000 - nanos;
    }
    Ok(TimeSpec::new(secs, nanos))
}

/// Copies a plain file's data.
pub fn copy_data<R: Read>(
    entry: &mut R,
    file: &mut File,
    shown: &dyn Fn() -> String,
) -> Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = entry.read(&mut buf).map_err(read_error)?;
        if n == 0 {
            return Ok(());
        }
        file.write_all(&buf[..n])
            .context(|| format!("write {}", shown()))?;
    }
}

/// Writes a pax 1.0 sparse file: the map, then each region at its offset;
/// the holes stay holes.
pub fn write_sparse<R: Read>(
    entry: &mut R,
    file: &File,
    real: u64,
    shown: &dyn Fn() -> String,
) -> Result<()> {
    // The map: decimal numbers one a line, padded to 512-byte blocks.
    let mut numbers: Vec<u64> = Vec::new();
    let mut want: Option<usize> = None;
    let mut line = Vec::new();
    let mut block = [0u8; 512];
    'blocks: loop {
        entry.read_exact(&mut block).map_err(read_error)?;
        for &b in &block {
            if b != b'\n' {
                line.push(b);
                continue;
            }
            numbers.push(parse_decimal(&line)?);
            line.clear();
            if want.is_none() {
                let count =
                    usize::try_from(numbers[0]).map_err(|_| bad("sparse map too large".into()))?;
                if count > 1 << 24 {
                    return Err(bad("sparse map too large".into()));
                }
                want = Some(1 + 2 * count);
            }
            if Some(numbers.len()) == want {
                break 'blocks;
            }
        }
        if line.len() > 40 {
            return Err(bad("bad sparse map in the archive".into()));
        }
    }
    let mut end = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    for pair in numbers[1..].chunks_exact(2) {
        let (off, len) = (pair[0], pair[1]);
        if off < end || off.checked_add(len).is_none_or(|e| e > real) {
            return Err(bad(format!("bad sparse map for {}", shown())));
        }
        let mut done = 0u64;
        while done < len {
            let n = usize::try_from(len - done)
                .unwrap_or(usize::MAX)
                .min(buf.len());
            entry.read_exact(&mut buf[..n]).map_err(read_error)?;
            file.write_all_at(&buf[..n], off + done)
                .context(|| format!("write {}", shown()))?;
            done += n as u64;
        }
        end = off + len;
    }
    let mut rest = [0u8; 1];
    if entry.read(&mut rest).map_err(read_error)? != 0 {
        return Err(bad(format!(
            "sparse data of {} longer than its map",
            shown()
        )));
    }
    file.set_len(real)
        .context(|| format!("truncate {}", shown()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times_parse_with_and_without_fractions() {
        assert_eq!(parse_pax_time(b"12").unwrap(), TimeSpec::new(12, 0));
        assert_eq!(
            parse_pax_time(b"12.5").unwrap(),
            TimeSpec::new(12, 500_000_000)
        );
        assert_eq!(
            parse_pax_time(b"12.000000001").unwrap(),
            TimeSpec::new(12, 1)
        );
        assert_eq!(
            parse_pax_time(b"-1.5").unwrap(),
            TimeSpec::new(-2, 500_000_000)
        );
        assert!(parse_pax_time(b"x").is_err());
    }
}
