//! The trace file: framing around the `postcard` encoding of [`super::event`]'s types.
//!
//! ```text
//! magic        8 bytes  "DOMDMATR"
//! version      u16 LE   FORMAT_VERSION
//! header len   u16 LE   then the postcard encoding of a Header
//! records      repeated: u16 LE length, then the postcard encoding of a Record
//! ```
//!
//! A file is read as hostile input: lengths are bounded ([`MAX_RECORD`]), a record that does
//! not decode is an error naming its offset, and a file cut short (a recorder killed
//! mid-write) ends at its last complete record, with the cut reported.

use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use super::event::{Event, Header, Record, FORMAT_VERSION};

/// The first bytes of a trace file.
pub const MAGIC: [u8; 8] = *b"DOMDMATR";

/// Largest encoded record or header accepted, bytes.
pub const MAX_RECORD: usize = 1024;

/// What can go wrong recording or reading a trace.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The file could not be created, written or read.
    #[error("trace file {0}: {1}")]
    Io(PathBuf, #[source] io::Error),
    /// Not a trace file.
    #[error("{0} is not a domdma trace (no DOMDMATR magic); record one with `domdma-device --trace FILE`")]
    NotATrace(PathBuf),
    /// A trace of another format version.
    #[error(
        "{path} is a trace of format version {found}; this build reads version {FORMAT_VERSION}"
    )]
    Version {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u16,
    },
    /// A header or record that does not decode.
    #[error("{path}: corrupt {what} at byte offset {offset}: {why}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// "header" or "record".
        what: &'static str,
        /// Offset of its length field.
        offset: u64,
        /// Why.
        why: String,
    },
    /// The writer thread panicked.
    #[error("the trace writer for {0} panicked")]
    WriterPanicked(PathBuf),
}

/// Write the magic, the version and `header`.
pub fn write_header(out: &mut impl Write, header: &Header) -> io::Result<()> {
    out.write_all(&MAGIC)?;
    out.write_all(&FORMAT_VERSION.to_le_bytes())?;
    write_framed(out, header)
}

/// Append one record.
#[inline]
pub fn write_record(out: &mut impl Write, record: &Record) -> io::Result<()> {
    write_framed(out, record)
}

fn write_framed<T: serde::Serialize>(out: &mut impl Write, value: &T) -> io::Result<()> {
    let mut buf = [0u8; MAX_RECORD];
    let body = postcard::to_slice(value, &mut buf)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let len = u16::try_from(body.len()).map_err(|_| io::ErrorKind::InvalidData)?;
    out.write_all(&len.to_le_bytes())?;
    out.write_all(body)
}

/// A trace file opened for reading: its header, then its records one by one.
#[derive(Debug)]
pub struct TraceReader<R> {
    input: R,
    path: PathBuf,
    offset: u64,
    /// The file's header.
    pub header: Header,
    /// Bytes at the end that do not make a whole record (a recorder stopped mid-write).
    pub truncated: bool,
}

impl TraceReader<BufReader<File>> {
    /// Open `path` and read its header.
    pub fn open(path: &Path) -> Result<Self, TraceError> {
        let f = File::open(path).map_err(|e| TraceError::Io(path.to_owned(), e))?;
        Self::new(BufReader::with_capacity(1 << 20, f), path)
    }
}

impl<R: Read> TraceReader<R> {
    /// Read the header from `input` (named `path` in errors).
    pub fn new(mut input: R, path: &Path) -> Result<Self, TraceError> {
        let path = path.to_owned();
        let mut magic = [0u8; 10];
        match input.read_exact(&mut magic) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(TraceError::NotATrace(path))
            }
            Err(e) => return Err(TraceError::Io(path, e)),
        }
        if magic[..8] != MAGIC {
            return Err(TraceError::NotATrace(path));
        }
        let found = u16::from_le_bytes([magic[8], magic[9]]);
        if found != FORMAT_VERSION {
            return Err(TraceError::Version { path, found });
        }
        let mut buf = [0u8; MAX_RECORD];
        let offset = magic.len() as u64;
        let header = match read_framed(&mut input, &mut buf) {
            Ok(Some(body)) => postcard::from_bytes(body).map_err(|e| e.to_string()),
            Ok(None) => Err("the file ends inside the header".to_owned()),
            Err(Frame::Io(e)) => return Err(TraceError::Io(path, e)),
            Err(Frame::Bad(why)) => Err(why),
        }
        .map_err(|why| TraceError::Corrupt {
            path: path.clone(),
            what: "header",
            offset,
            why,
        })?;
        let mut r = Self {
            input,
            path,
            offset,
            header,
            truncated: false,
        };
        r.offset += 2 + framed_len(&r.header);
        Ok(r)
    }

    /// The next record; None at the end of the file (or at a record cut short, with
    /// [`TraceReader::truncated`] set).
    pub fn next_record(&mut self) -> Result<Option<Record>, TraceError> {
        let mut buf = [0u8; MAX_RECORD];
        let at = self.offset;
        let body = match read_framed(&mut self.input, &mut buf) {
            Ok(Some(body)) => body,
            Ok(None) => return Ok(None),
            Err(Frame::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                self.truncated = true;
                return Ok(None);
            }
            Err(Frame::Io(e)) => return Err(TraceError::Io(self.path.clone(), e)),
            Err(Frame::Bad(why)) => {
                return Err(TraceError::Corrupt {
                    path: self.path.clone(),
                    what: "record",
                    offset: at,
                    why,
                })
            }
        };
        let len = body.len() as u64;
        let rec = postcard::from_bytes(body).map_err(|e| TraceError::Corrupt {
            path: self.path.clone(),
            what: "record",
            offset: at,
            why: e.to_string(),
        })?;
        self.offset += 2 + len;
        Ok(Some(rec))
    }
}

impl<R: Read> Iterator for TraceReader<R> {
    type Item = Result<Record, TraceError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_record().transpose()
    }
}

/// A whole trace: header, records in time order, and whether the file was cut short.
#[derive(Debug, Clone)]
pub struct Trace {
    /// The header.
    pub header: Header,
    /// Every record, ordered by time (stable: records of one time keep file order).
    pub records: Vec<Record>,
    /// The file ended inside a record.
    pub truncated: bool,
}

impl Trace {
    /// Events the recorder dropped (its writer fell behind): the last running total the
    /// trace holds, 0 when none was lost.
    pub fn dropped(&self) -> u64 {
        (self.records.iter())
            .filter_map(|r| match r.event {
                Event::Dropped { total } => Some(total),
                _ => None,
            })
            .max()
            .unwrap_or(0)
    }
}

/// Read all of `path`.
pub fn read_all(path: &Path) -> Result<Trace, TraceError> {
    let mut r = TraceReader::open(path)?;
    let mut records = Vec::new();
    while let Some(rec) = r.next_record()? {
        records.push(rec);
    }
    records.sort_by_key(|r| r.t_ns);
    Ok(Trace {
        header: r.header,
        records,
        truncated: r.truncated,
    })
}

enum Frame {
    Io(io::Error),
    Bad(String),
}

/// Read one length-prefixed body into `buf`; None at a clean end of input.
fn read_framed<'b>(input: &mut impl Read, buf: &'b mut [u8]) -> Result<Option<&'b [u8]>, Frame> {
    let mut len = [0u8; 2];
    match input.read(&mut len[..1]) {
        Ok(0) => return Ok(None),
        Ok(_) => {}
        Err(e) => return Err(Frame::Io(e)),
    }
    input.read_exact(&mut len[1..]).map_err(Frame::Io)?;
    let n = usize::from(u16::from_le_bytes(len));
    if n == 0 || n > buf.len() {
        return Err(Frame::Bad(format!(
            "length {n} is outside 1..={}",
            buf.len()
        )));
    }
    input.read_exact(&mut buf[..n]).map_err(Frame::Io)?;
    Ok(Some(&buf[..n]))
}

fn framed_len<T: serde::Serialize>(value: &T) -> u64 {
    postcard::experimental::serialized_size(value).map_or(0, |n| n as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::event::{Event, TraceConfig};

    fn header() -> Header {
        Header {
            device_version: 2,
            start_unix_ns: 1,
            config: TraceConfig {
                queues: 4,
                domains: 16,
                iova_width: 48,
                iotlb_entries: 1024,
                max_transfer: 1 << 26,
                strict_iotlb: false,
            },
            data: false,
        }
    }

    fn encoded(records: &[Record]) -> Vec<u8> {
        let mut out = Vec::new();
        write_header(&mut out, &header()).unwrap();
        for r in records {
            write_record(&mut out, r).unwrap();
        }
        out
    }

    fn records() -> Vec<Record> {
        vec![
            Record {
                t_ns: 5,
                event: Event::Doorbell { queue: 1, tail: 3 },
            },
            Record {
                t_ns: 9,
                event: Event::Fetch {
                    queue: 1,
                    slot: 2,
                    iova: 0x1000,
                    bus: 0x2000,
                    desc: [u64::MAX; 8],
                },
            },
        ]
    }

    #[test]
    fn records_round_trip_and_offsets_are_counted() {
        let bytes = encoded(&records());
        let mut r = TraceReader::new(&bytes[..], Path::new("t")).unwrap();
        assert_eq!(r.header, header());
        let got: Vec<_> = r.by_ref().map(Result::unwrap).collect();
        assert_eq!(got, records());
        assert!(!r.truncated);
        assert_eq!(r.offset, bytes.len() as u64);
    }

    #[test]
    fn a_file_cut_inside_a_record_ends_at_the_last_whole_one() {
        let bytes = encoded(&records());
        for cut in 1..20 {
            let short = &bytes[..bytes.len() - cut];
            let mut r = TraceReader::new(short, Path::new("t")).unwrap();
            let got: Vec<_> = r.by_ref().map(Result::unwrap).collect();
            assert_eq!(got, records()[..1], "cut {cut}");
            assert!(r.truncated);
        }
    }

    #[test]
    fn hostile_files_are_errors_not_panics() {
        let bad_magic = b"NOTATRACE!".to_vec();
        assert!(matches!(
            TraceReader::new(&bad_magic[..], Path::new("t")),
            Err(TraceError::NotATrace(_))
        ));
        let mut other = encoded(&[]);
        other[8] = 99;
        assert!(matches!(
            TraceReader::new(&other[..], Path::new("t")),
            Err(TraceError::Version { found: 99, .. })
        ));
        // A record with a huge length, and one that does not decode.
        for tail in [&[0xff, 0xff][..], &[0x02, 0x00, 0xff, 0xff][..]] {
            let mut bytes = encoded(&[]);
            bytes.extend_from_slice(tail);
            let mut r = TraceReader::new(&bytes[..], Path::new("t")).unwrap();
            let e = r.next_record().unwrap_err();
            assert!(
                matches!(e, TraceError::Corrupt { what: "record", .. }),
                "{e}"
            );
        }
    }
}
