//! vfio-user wire format: the message header, the commands, and the payload structures,
//! with parsing and encoding.
//!
//! Layouts follow QEMU's `docs/interop/vfio-user.rst`. All integers are in host byte order
//! (the protocol is defined for a client and server on the same host). Parsing never
//! panics: a payload that is too short or carries an `argsz` below the structure's size is a
//! [`ProtoError`], which the server answers with `EINVAL`. Trailing bytes after a fixed-size
//! structure are ignored, as the message size, not `argsz`, delimits a request.

use serde_json::{json, Value};
use thiserror::Error;
use vfio_bindings::bindings::vfio;

/// Size of the message header in bytes.
pub const HEADER_SIZE: usize = 16;

/// Header flags: mask of the message type bits.
pub const FLAGS_TYPE_MASK: u32 = 0xf;
/// Header flags, type value: a command.
pub const FLAGS_TYPE_COMMAND: u32 = 0x0;
/// Header flags, type value: a reply.
pub const FLAGS_TYPE_REPLY: u32 = 0x1;
/// Header flags: the sender wants no reply to this command (posted writes).
pub const FLAGS_NO_REPLY: u32 = 1 << 4;
/// Header flags: the reply reports an error; the header's error field holds an errno.
pub const FLAGS_ERROR: u32 = 1 << 5;

/// Protocol major version we speak. A client proposing another major is refused.
pub const VERSION_MAJOR: u16 = 0;
/// Highest protocol minor version we speak; the reply carries `min(proposed, this)`.
/// QEMU 10.1+ proposes 0.0 and rejects a reply with a higher minor than it proposed.
pub const VERSION_MINOR: u16 = 1;

/// `max_msg_fds` we advertise: QEMU accepts at most 16 and splits a `SET_IRQS` with more
/// eventfds into several messages, so 16 makes a typical MSI-X setup one message.
pub const MAX_MSG_FDS: u32 = 16;
/// `max_data_xfer_size` we advertise: the largest `count` of a region read or write
/// (QEMU's default; it accepts up to 64 MiB).
pub const MAX_DATA_XFER_SIZE: u32 = 1 << 20;
/// `pgsizes` we advertise: DMA mappings are in 4 KiB units.
pub const PGSIZES: u64 = 4096;
/// `max_dma_maps` we advertise (QEMU accepts at most 65535). Each mapping with a file
/// descriptor keeps that descriptor open, so this also bounds our descriptor use.
pub const MAX_DMA_MAPS: u32 = 8192;

/// Largest message we accept into memory: a region write of [`MAX_DATA_XFER_SIZE`] bytes,
/// its access header, and slack for the version JSON and future fields.
pub const MAX_MESSAGE_SIZE: usize = HEADER_SIZE + 4096 + MAX_DATA_XFER_SIZE as usize;
/// Messages up to this size that exceed [`MAX_MESSAGE_SIZE`] are read and discarded in
/// bounded chunks and answered with `E2BIG`; larger ones end the connection.
pub const MAX_DISCARD_SIZE: usize = 64 << 20;

// The bounds fit together, and stay within what QEMU's client accepts
// (hw/vfio-user/proxy.c: max_msg_fds <= 16, max_data_xfer_size <= 64 MiB,
// max_dma_maps <= 65535).
const _: () = {
    assert!(HEADER_SIZE + 16 + MAX_DATA_XFER_SIZE as usize <= MAX_MESSAGE_SIZE);
    assert!(MAX_MESSAGE_SIZE < MAX_DISCARD_SIZE);
    assert!(MAX_MSG_FDS <= 16);
    assert!(MAX_DATA_XFER_SIZE <= 64 << 20);
    assert!(MAX_DMA_MAPS <= 65535);
};

/// A vfio-user command code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Command {
    /// Version and capability negotiation.
    Version = 1,
    /// Make a range of client memory available for DMA.
    DmaMap = 2,
    /// Withdraw a DMA range.
    DmaUnmap = 3,
    /// Device flags and region/IRQ counts.
    DeviceGetInfo = 4,
    /// Information about one region.
    DeviceGetRegionInfo = 5,
    /// I/O file descriptors for a region (ioeventfd/ioregionfd).
    DeviceGetRegionIoFds = 6,
    /// Information about one interrupt type.
    DeviceGetIrqInfo = 7,
    /// Configure interrupt signalling.
    DeviceSetIrqs = 8,
    /// Read from a region.
    RegionRead = 9,
    /// Write to a region.
    RegionWrite = 10,
    /// Server-to-client DMA read.
    DmaRead = 11,
    /// Server-to-client DMA write.
    DmaWrite = 12,
    /// Reset the device.
    DeviceReset = 13,
    /// Dirty page logging (obsolete).
    DirtyPages = 14,
    /// Several small region writes in one message.
    RegionWriteMulti = 15,
    /// Device feature get/set/probe (migration).
    DeviceFeature = 16,
    /// Read migration data.
    MigDataRead = 17,
    /// Write migration data.
    MigDataWrite = 18,
}

impl Command {
    /// The command with code `code`, if it is one the protocol defines.
    pub fn from_code(code: u16) -> Option<Self> {
        use Command::*;
        Some(match code {
            1 => Version,
            2 => DmaMap,
            3 => DmaUnmap,
            4 => DeviceGetInfo,
            5 => DeviceGetRegionInfo,
            6 => DeviceGetRegionIoFds,
            7 => DeviceGetIrqInfo,
            8 => DeviceSetIrqs,
            9 => RegionRead,
            10 => RegionWrite,
            11 => DmaRead,
            12 => DmaWrite,
            13 => DeviceReset,
            14 => DirtyPages,
            15 => RegionWriteMulti,
            16 => DeviceFeature,
            17 => MigDataRead,
            18 => MigDataWrite,
            _ => return None,
        })
    }
}

/// A malformed message payload. The server answers it with `EINVAL`.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtoError {
    /// The payload is shorter than the structure it must hold.
    #[error("{what}: payload is {got} bytes, need at least {need}")]
    Truncated {
        /// The structure being parsed.
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        got: usize,
    },
    /// The `argsz` field is smaller than the structure.
    #[error("{what}: argsz {argsz} is below the structure size {min}")]
    ArgszTooSmall {
        /// The structure being parsed.
        what: &'static str,
        /// The `argsz` received.
        argsz: u32,
        /// The smallest valid `argsz`.
        min: u32,
    },
    /// A region write whose `count` does not match the data that follows it.
    #[error("region write: count {count} but {data} data bytes follow")]
    WriteCountMismatch {
        /// The `count` field.
        count: u32,
        /// Data bytes in the payload.
        data: usize,
    },
    /// The version data is not valid UTF-8 JSON of the expected shape.
    #[error("version data: {0}")]
    BadVersionData(String),
}

/// Reads fixed-width host-endian integers from a byte slice.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// Start reading `buf`, which must hold at least `need` bytes for structure `what`.
    fn new(buf: &'a [u8], what: &'static str, need: usize) -> Result<Self, ProtoError> {
        if buf.len() < need {
            return Err(ProtoError::Truncated {
                what,
                need,
                got: buf.len(),
            });
        }
        Ok(Self { buf, pos: 0 })
    }

    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        // Callers only read within the length checked in `new`.
        out.copy_from_slice(&self.buf[self.pos..self.pos + N]);
        self.pos += N;
        out
    }

    fn u16(&mut self) -> u16 {
        u16::from_ne_bytes(self.take())
    }

    fn u32(&mut self) -> u32 {
        u32::from_ne_bytes(self.take())
    }

    fn u64(&mut self) -> u64 {
        u64::from_ne_bytes(self.take())
    }

    fn rest(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }
}

/// Appends host-endian integers to a byte vector.
trait Put {
    fn put_u16(&mut self, v: u16);
    fn put_u32(&mut self, v: u32);
    fn put_u64(&mut self, v: u64);
}

impl Put for Vec<u8> {
    fn put_u16(&mut self, v: u16) {
        self.extend_from_slice(&v.to_ne_bytes());
    }
    fn put_u32(&mut self, v: u32) {
        self.extend_from_slice(&v.to_ne_bytes());
    }
    fn put_u64(&mut self, v: u64) {
        self.extend_from_slice(&v.to_ne_bytes());
    }
}

/// A fixed-width field of a wire structure.
trait Field: Sized {
    fn read(r: &mut Reader<'_>) -> Self;
    fn put(self, v: &mut Vec<u8>);
}

impl Field for u32 {
    fn read(r: &mut Reader<'_>) -> Self {
        r.u32()
    }
    fn put(self, v: &mut Vec<u8>) {
        v.put_u32(self);
    }
}

impl Field for u64 {
    fn read(r: &mut Reader<'_>) -> Self {
        r.u64()
    }
    fn put(self, v: &mut Vec<u8>) {
        v.put_u64(self);
    }
}

/// A fixed-layout payload that starts with `argsz`: the structure, its size, `parse` (the
/// payload must hold the structure, and `argsz` must cover it) and `encode`, fields in
/// declaration order.
macro_rules! wire_struct {
    (
        $(#[$meta:meta])*
        pub struct $name:ident ($what:literal, $size:literal) {
            $( $(#[$fmeta:meta])* pub $field:ident: $ty:ty, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty, )*
        }

        // The declared size is the fields' (no padding on the wire).
        const _: () = assert!($size == 0 $(+ std::mem::size_of::<$ty>())*);

        impl $name {
            /// Size of the structure.
            pub const SIZE: usize = $size;

            #[doc = concat!("Parse a ", $what, " payload.")]
            pub fn parse(payload: &[u8]) -> Result<Self, ProtoError> {
                let mut r = Reader::new(payload, $what, Self::SIZE)?;
                // Struct expression fields are evaluated in the order written.
                let m = Self { $( $field: Field::read(&mut r), )* };
                check_argsz($what, m.argsz, Self::SIZE)?;
                Ok(m)
            }

            /// Encode.
            pub fn encode(&self) -> Vec<u8> {
                let mut v = Vec::with_capacity(Self::SIZE);
                $( Field::put(self.$field, &mut v); )*
                v
            }
        }
    };
}

fn check_argsz(what: &'static str, argsz: u32, min: usize) -> Result<(), ProtoError> {
    // `min` is a structure size, far below u32::MAX.
    let min = min as u32;
    if argsz < min {
        return Err(ProtoError::ArgszTooSmall { what, argsz, min });
    }
    Ok(())
}

/// The 16-byte header every message starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    /// Message ID, chosen by the sender and echoed in the reply.
    pub id: u16,
    /// Command code ([`Command`]); also set in the reply.
    pub command: u16,
    /// Size of the whole message including this header.
    pub size: u32,
    /// Type, No_reply and Error flags (`FLAGS_*`).
    pub flags: u32,
    /// errno of an error reply; reserved in commands.
    pub error: u32,
}

impl Header {
    /// Decode a header.
    pub fn parse(bytes: &[u8; HEADER_SIZE]) -> Self {
        let mut r = Reader { buf: bytes, pos: 0 };
        Self {
            id: r.u16(),
            command: r.u16(),
            size: r.u32(),
            flags: r.u32(),
            error: r.u32(),
        }
    }

    /// Encode the header.
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut out = [0u8; HEADER_SIZE];
        self.encode_to(&mut out);
        out
    }

    /// Encode the header into `out` (exactly [`HEADER_SIZE`] bytes), without allocating.
    pub fn encode_to(&self, out: &mut [u8]) {
        out[0..2].copy_from_slice(&self.id.to_le_bytes());
        out[2..4].copy_from_slice(&self.command.to_le_bytes());
        out[4..8].copy_from_slice(&self.size.to_le_bytes());
        out[8..12].copy_from_slice(&self.flags.to_le_bytes());
        out[12..16].copy_from_slice(&self.error.to_le_bytes());
    }

    /// The message type bits (`FLAGS_TYPE_*`).
    pub fn msg_type(&self) -> u32 {
        self.flags & FLAGS_TYPE_MASK
    }

    /// Whether the sender asked for no reply.
    pub fn no_reply(&self) -> bool {
        self.flags & FLAGS_NO_REPLY != 0
    }

    /// Payload length, or `None` when the size field is smaller than the header itself
    /// (the stream cannot be resynchronised after that).
    pub fn payload_len(&self) -> Option<usize> {
        (self.size as usize).checked_sub(HEADER_SIZE)
    }

    /// The defined command, if any.
    pub fn cmd(&self) -> Option<Command> {
        Command::from_code(self.command)
    }
}

/// The header of a successful reply to `request` of `size` bytes in all.
pub fn reply_header(request: &Header, size: usize) -> Header {
    Header {
        id: request.id,
        command: request.command,
        // Replies are bounded by MAX_MESSAGE_SIZE, far below u32::MAX.
        size: size as u32,
        flags: FLAGS_TYPE_REPLY,
        error: 0,
    }
}

/// Encode a successful reply to `request` carrying `payload`.
pub fn encode_reply(request: &Header, payload: &[u8]) -> Vec<u8> {
    let size = HEADER_SIZE + payload.len();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&reply_header(request, size).encode());
    out.extend_from_slice(payload);
    out
}

/// Encode an error reply to `request` with `errno` (header only, as the spec requires).
pub fn encode_error(request: &Header, errno: u32) -> [u8; HEADER_SIZE] {
    Header {
        id: request.id,
        command: request.command,
        size: HEADER_SIZE as u32,
        flags: FLAGS_TYPE_REPLY | FLAGS_ERROR,
        error: errno,
    }
    .encode()
}

/// Encode a command message; for clients and tests.
pub fn encode_command(id: u16, command: u16, flags: u32, payload: &[u8]) -> Vec<u8> {
    let size = HEADER_SIZE + payload.len();
    let header = Header {
        id,
        command,
        size: u32::try_from(size).unwrap_or(u32::MAX),
        flags: FLAGS_TYPE_COMMAND | (flags & !FLAGS_TYPE_MASK),
        error: 0,
    };
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(payload);
    out
}

// ---- VERSION ----

/// Capabilities exchanged in the version JSON (`{"capabilities": {...}}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Most file descriptors the sender can receive in one message.
    pub max_msg_fds: u32,
    /// Largest `count` of a data transfer the sender accepts.
    pub max_data_xfer_size: u32,
    /// DMA page sizes, or'ed together.
    pub pgsizes: u64,
    /// Most DMA mappings valid at once.
    pub max_dma_maps: u32,
}

impl Capabilities {
    /// What the spec says a peer that sends no capabilities supports.
    pub const DEFAULT: Self = Self {
        max_msg_fds: 1,
        max_data_xfer_size: 1 << 20,
        pgsizes: 4096,
        max_dma_maps: 65535,
    };

    /// What this server supports.
    pub const SERVER: Self = Self {
        max_msg_fds: MAX_MSG_FDS,
        max_data_xfer_size: MAX_DATA_XFER_SIZE,
        pgsizes: PGSIZES,
        max_dma_maps: MAX_DMA_MAPS,
    };

    /// The JSON text (without the terminating NUL).
    pub fn to_json(&self) -> String {
        json!({
            "capabilities": {
                "max_msg_fds": self.max_msg_fds,
                "max_data_xfer_size": self.max_data_xfer_size,
                "pgsizes": self.pgsizes,
                "max_dma_maps": self.max_dma_maps,
            }
        })
        .to_string()
    }

    /// Parse version data: optional UTF-8 JSON, NUL-terminated or not. Empty data means the
    /// defaults. Unknown keys are ignored; a known key of the wrong type is an error.
    pub fn parse(data: &[u8]) -> Result<Self, ProtoError> {
        let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
        if data[end..].iter().any(|&b| b != 0) {
            return Err(ProtoError::BadVersionData(
                "bytes after the terminating NUL".into(),
            ));
        }
        let text = &data[..end];
        let mut caps = Self::DEFAULT;
        if text.iter().all(u8::is_ascii_whitespace) {
            return Ok(caps);
        }
        let value: Value = serde_json::from_slice(text)
            .map_err(|e| ProtoError::BadVersionData(format!("not JSON: {e}")))?;
        let obj = value
            .as_object()
            .ok_or_else(|| ProtoError::BadVersionData("not a JSON object".into()))?;
        let Some(c) = obj.get("capabilities") else {
            return Ok(caps);
        };
        let c = c
            .as_object()
            .ok_or_else(|| ProtoError::BadVersionData("capabilities is not an object".into()))?;
        let num = |key: &str| -> Result<Option<u64>, ProtoError> {
            match c.get(key) {
                None => Ok(None),
                Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                    ProtoError::BadVersionData(format!("{key} is not an unsigned integer"))
                }),
            }
        };
        let num32 = |key: &str| -> Result<Option<u32>, ProtoError> {
            num(key)?
                .map(|v| {
                    u32::try_from(v)
                        .map_err(|_| ProtoError::BadVersionData(format!("{key} is too large")))
                })
                .transpose()
        };
        if let Some(v) = num32("max_msg_fds")? {
            caps.max_msg_fds = v;
        }
        if let Some(v) = num32("max_data_xfer_size")? {
            caps.max_data_xfer_size = v;
        }
        if let Some(v) = num("pgsizes")? {
            caps.pgsizes = v;
        }
        if let Some(v) = num32("max_dma_maps")? {
            caps.max_dma_maps = v;
        }
        Ok(caps)
    }
}

/// A `VFIO_USER_VERSION` message (request or reply).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// Major version.
    pub major: u16,
    /// Minor version.
    pub minor: u16,
    /// The capabilities, parsed.
    pub caps: Capabilities,
}

impl Version {
    /// Size of the fixed part.
    pub const SIZE: usize = 4;

    /// Parse a version payload.
    pub fn parse(payload: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(payload, "version", Self::SIZE)?;
        let major = r.u16();
        let minor = r.u16();
        let caps = Capabilities::parse(r.rest())?;
        Ok(Self { major, minor, caps })
    }

    /// Encode a version payload with NUL-terminated JSON capabilities.
    pub fn encode(&self) -> Vec<u8> {
        let json = self.caps.to_json();
        let mut v = Vec::with_capacity(Self::SIZE + json.len() + 1);
        v.put_u16(self.major);
        v.put_u16(self.minor);
        v.extend_from_slice(json.as_bytes());
        v.push(0);
        v
    }
}

// ---- DMA_MAP / DMA_UNMAP ----

/// DMA_MAP flag: the server may read the range.
pub const DMA_MAP_FLAG_READ: u32 = vfio::VFIO_DMA_MAP_FLAG_READ;
/// DMA_MAP flag: the server may write the range.
pub const DMA_MAP_FLAG_WRITE: u32 = vfio::VFIO_DMA_MAP_FLAG_WRITE;
/// DMA_UNMAP flag: return a dirty bitmap (not supported).
pub const DMA_UNMAP_FLAG_GET_DIRTY_BITMAP: u32 = vfio::VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP;
/// DMA_UNMAP flag: unmap every range; address and size are ignored. (Bit 1, as
/// `VFIO_DMA_UNMAP_FLAG_ALL` in `<linux/vfio.h>`, which QEMU sends.)
pub const DMA_UNMAP_FLAG_ALL: u32 = vfio::VFIO_DMA_UNMAP_FLAG_ALL;

wire_struct! {
    /// A `VFIO_USER_DMA_MAP` request.
    pub struct DmaMap ("DMA_MAP", 32) {
        /// Size of this structure (32).
        pub argsz: u32,
        /// `DMA_MAP_FLAG_*`.
        pub flags: u32,
        /// Offset of the range in the file descriptor sent with the message.
        pub offset: u64,
        /// Base DMA (bus) address.
        pub address: u64,
        /// Length in bytes.
        pub size: u64,
    }
}

wire_struct! {
    /// A `VFIO_USER_DMA_UNMAP` request, echoed in the reply.
    pub struct DmaUnmap ("DMA_UNMAP", 24) {
        /// Maximum reply payload size (at least 24).
        pub argsz: u32,
        /// `DMA_UNMAP_FLAG_*`.
        pub flags: u32,
        /// Base DMA address.
        pub address: u64,
        /// Length in bytes.
        pub size: u64,
    }
}

// ---- DMA_READ / DMA_WRITE (server to client) ----

/// The fixed part of DMA_READ and DMA_WRITE, requests and replies: bus address and byte
/// count (64-bit, as QEMU 10.1+ and libvfio-user send it). A DMA_READ reply and a
/// DMA_WRITE request carry `count` data bytes after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DmaRw {
    /// Bus (DMA) address.
    pub address: u64,
    /// Bytes to move.
    pub count: u64,
}

impl DmaRw {
    /// Size of the fixed part.
    pub const SIZE: usize = 16;

    /// Parse the fixed part; returns it and the bytes after it.
    pub fn parse(payload: &[u8]) -> Result<(Self, &[u8]), ProtoError> {
        let mut r = Reader::new(payload, "DMA_READ/DMA_WRITE", Self::SIZE)?;
        let m = Self {
            address: r.u64(),
            count: r.u64(),
        };
        Ok((m, r.rest()))
    }

    /// Encode the fixed part followed by `data`.
    pub fn encode(&self, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::SIZE + data.len());
        v.put_u64(self.address);
        v.put_u64(self.count);
        v.extend_from_slice(data);
        v
    }
}

// ---- DEVICE_GET_INFO ----

/// `VFIO_DEVICE_FLAGS_RESET`: the device supports DEVICE_RESET.
pub const DEVICE_FLAGS_RESET: u32 = vfio::VFIO_DEVICE_FLAGS_RESET;
/// `VFIO_DEVICE_FLAGS_PCI`: the device is a PCI device.
pub const DEVICE_FLAGS_PCI: u32 = vfio::VFIO_DEVICE_FLAGS_PCI;

wire_struct! {
    /// A `VFIO_USER_DEVICE_GET_INFO` request or reply.
    pub struct DeviceInfo ("DEVICE_GET_INFO", 16) {
        /// Request: maximum reply size; reply: size of the full reply (16).
        pub argsz: u32,
        /// `DEVICE_FLAGS_*`.
        pub flags: u32,
        /// Number of regions.
        pub num_regions: u32,
        /// Number of interrupt types.
        pub num_irqs: u32,
    }
}

// ---- DEVICE_GET_REGION_INFO ----

/// Number of PCI regions (`VFIO_PCI_NUM_REGIONS`): BAR0-5, ROM, config space, VGA.
pub const PCI_NUM_REGIONS: u32 = vfio::VFIO_PCI_NUM_REGIONS;
/// Region index of the expansion ROM (`VFIO_PCI_ROM_REGION_INDEX`).
pub const PCI_ROM_REGION_INDEX: u32 = vfio::VFIO_PCI_ROM_REGION_INDEX;
/// Region index of PCI configuration space (`VFIO_PCI_CONFIG_REGION_INDEX`).
pub const PCI_CONFIG_REGION_INDEX: u32 = vfio::VFIO_PCI_CONFIG_REGION_INDEX;

/// Region flag: the client may read the region.
pub const REGION_INFO_FLAG_READ: u32 = vfio::VFIO_REGION_INFO_FLAG_READ;
/// Region flag: the client may write the region.
pub const REGION_INFO_FLAG_WRITE: u32 = vfio::VFIO_REGION_INFO_FLAG_WRITE;
/// Region flag: the region can be mmapped through a file descriptor in the reply.
pub const REGION_INFO_FLAG_MMAP: u32 = vfio::VFIO_REGION_INFO_FLAG_MMAP;
/// Region flag: capabilities follow the structure.
pub const REGION_INFO_FLAG_CAPS: u32 = vfio::VFIO_REGION_INFO_FLAG_CAPS;

wire_struct! {
    /// A `VFIO_USER_DEVICE_GET_REGION_INFO` request or reply (`struct vfio_region_info`).
    pub struct RegionInfo ("DEVICE_GET_REGION_INFO", 32) {
        /// Request: maximum reply size; reply: size of the full reply.
        pub argsz: u32,
        /// `REGION_INFO_FLAG_*`.
        pub flags: u32,
        /// Region index.
        pub index: u32,
        /// Offset of the first capability, 0 if none.
        pub cap_offset: u32,
        /// Region size in bytes.
        pub size: u64,
        /// mmap offset of the region.
        pub offset: u64,
    }
}

// ---- DEVICE_GET_IRQ_INFO / DEVICE_SET_IRQS ----

/// Number of PCI interrupt types (`VFIO_PCI_NUM_IRQS`): INTx, MSI, MSI-X, ERR, REQ.
pub const PCI_NUM_IRQS: u32 = vfio::VFIO_PCI_NUM_IRQS;
/// IRQ index of INTx.
pub const PCI_INTX_IRQ_INDEX: u32 = vfio::VFIO_PCI_INTX_IRQ_INDEX;
/// IRQ index of MSI.
pub const PCI_MSI_IRQ_INDEX: u32 = vfio::VFIO_PCI_MSI_IRQ_INDEX;
/// IRQ index of MSI-X.
pub const PCI_MSIX_IRQ_INDEX: u32 = vfio::VFIO_PCI_MSIX_IRQ_INDEX;
/// IRQ index of the error notification.
pub const PCI_ERR_IRQ_INDEX: u32 = vfio::VFIO_PCI_ERR_IRQ_INDEX;
/// IRQ index of the device request notification.
pub const PCI_REQ_IRQ_INDEX: u32 = vfio::VFIO_PCI_REQ_IRQ_INDEX;

/// IRQ info flag: the interrupt type can signal an eventfd.
pub const IRQ_INFO_EVENTFD: u32 = vfio::VFIO_IRQ_INFO_EVENTFD;
/// IRQ info flag: MASK/UNMASK actions are supported.
pub const IRQ_INFO_MASKABLE: u32 = vfio::VFIO_IRQ_INFO_MASKABLE;
/// IRQ info flag: the interrupt masks itself when triggered.
pub const IRQ_INFO_AUTOMASKED: u32 = vfio::VFIO_IRQ_INFO_AUTOMASKED;
/// IRQ info flag: vectors are set up as a set and cannot be resized.
pub const IRQ_INFO_NORESIZE: u32 = vfio::VFIO_IRQ_INFO_NORESIZE;

/// SET_IRQS data type: no data.
pub const IRQ_SET_DATA_NONE: u32 = vfio::VFIO_IRQ_SET_DATA_NONE;
/// SET_IRQS data type: one bool byte per sub-index follows the structure.
pub const IRQ_SET_DATA_BOOL: u32 = vfio::VFIO_IRQ_SET_DATA_BOOL;
/// SET_IRQS data type: eventfds arrive as SCM_RIGHTS ancillary data.
pub const IRQ_SET_DATA_EVENTFD: u32 = vfio::VFIO_IRQ_SET_DATA_EVENTFD;
/// SET_IRQS action: mask.
pub const IRQ_SET_ACTION_MASK: u32 = vfio::VFIO_IRQ_SET_ACTION_MASK;
/// SET_IRQS action: unmask.
pub const IRQ_SET_ACTION_UNMASK: u32 = vfio::VFIO_IRQ_SET_ACTION_UNMASK;
/// SET_IRQS action: trigger.
pub const IRQ_SET_ACTION_TRIGGER: u32 = vfio::VFIO_IRQ_SET_ACTION_TRIGGER;
/// Mask of the SET_IRQS data type bits.
pub const IRQ_SET_DATA_TYPE_MASK: u32 = vfio::VFIO_IRQ_SET_DATA_TYPE_MASK;
/// Mask of the SET_IRQS action bits.
pub const IRQ_SET_ACTION_TYPE_MASK: u32 = vfio::VFIO_IRQ_SET_ACTION_TYPE_MASK;

wire_struct! {
    /// A `VFIO_USER_DEVICE_GET_IRQ_INFO` request or reply (`struct vfio_irq_info`).
    pub struct IrqInfo ("DEVICE_GET_IRQ_INFO", 16) {
        /// Request: maximum reply size; reply: 16.
        pub argsz: u32,
        /// `IRQ_INFO_*`.
        pub flags: u32,
        /// Interrupt type index (`VFIO_PCI_*_IRQ_INDEX`).
        pub index: u32,
        /// Number of interrupts of this type.
        pub count: u32,
    }
}

/// A `VFIO_USER_DEVICE_SET_IRQS` request (`struct vfio_irq_set`) and its bool data.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IrqSet {
    /// Size of the request including data (20 for eventfd and none).
    pub argsz: u32,
    /// One `IRQ_SET_DATA_*` bit and one `IRQ_SET_ACTION_*` bit.
    pub flags: u32,
    /// Interrupt type index.
    pub index: u32,
    /// First sub-index.
    pub start: u32,
    /// Number of sub-indexes.
    pub count: u32,
    /// For `IRQ_SET_DATA_BOOL`: `count` bool bytes; empty otherwise.
    pub data: Vec<u8>,
}

impl IrqSet {
    /// Size of the fixed structure.
    pub const SIZE: usize = 20;

    /// Parse; for `IRQ_SET_DATA_BOOL` the `count` data bytes must follow.
    pub fn parse(payload: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(payload, "DEVICE_SET_IRQS", Self::SIZE)?;
        let mut m = Self {
            argsz: r.u32(),
            flags: r.u32(),
            index: r.u32(),
            start: r.u32(),
            count: r.u32(),
            data: Vec::new(),
        };
        check_argsz("DEVICE_SET_IRQS", m.argsz, Self::SIZE)?;
        if m.flags & IRQ_SET_DATA_BOOL != 0 {
            let rest = r.rest();
            let n = m.count as usize;
            if rest.len() < n {
                return Err(ProtoError::Truncated {
                    what: "DEVICE_SET_IRQS bool data",
                    need: Self::SIZE + n,
                    got: payload.len(),
                });
            }
            m.data = rest[..n].to_vec();
        }
        Ok(m)
    }

    /// Encode (with the bool data, if any).
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::SIZE + self.data.len());
        v.put_u32(self.argsz);
        v.put_u32(self.flags);
        v.put_u32(self.index);
        v.put_u32(self.start);
        v.put_u32(self.count);
        v.extend_from_slice(&self.data);
        v
    }
}

// ---- REGION_READ / REGION_WRITE ----

/// The access header of `VFIO_USER_REGION_READ` and `VFIO_USER_REGION_WRITE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RegionAccess {
    /// Offset into the region.
    pub offset: u64,
    /// Region index.
    pub region: u32,
    /// Number of bytes.
    pub count: u32,
}

impl RegionAccess {
    /// Size of the access header.
    pub const SIZE: usize = 16;

    /// Parse a region read request.
    pub fn parse_read(payload: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(payload, "REGION_READ", Self::SIZE)?;
        Ok(Self {
            offset: r.u64(),
            region: r.u32(),
            count: r.u32(),
        })
    }

    /// Parse a region write request; returns the access and its data, whose length must
    /// equal `count`.
    pub fn parse_write(payload: &[u8]) -> Result<(Self, &[u8]), ProtoError> {
        let mut r = Reader::new(payload, "REGION_WRITE", Self::SIZE)?;
        let a = Self {
            offset: r.u64(),
            region: r.u32(),
            count: r.u32(),
        };
        let data = r.rest();
        if data.len() != a.count as usize {
            return Err(ProtoError::WriteCountMismatch {
                count: a.count,
                data: data.len(),
            });
        }
        Ok((a, data))
    }

    /// Encode the access header followed by `data` (a read reply or a write request).
    pub fn encode(&self, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::SIZE + data.len());
        self.encode_to(&mut v);
        v.extend_from_slice(data);
        v
    }

    /// Append the access header to `out` (no allocation when `out` has room).
    pub fn encode_to(&self, out: &mut Vec<u8>) {
        out.put_u64(self.offset);
        out.put_u32(self.region);
        out.put_u32(self.count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_flags() {
        let h = Header {
            id: 0x1234,
            command: Command::RegionWrite as u16,
            size: 40,
            flags: FLAGS_NO_REPLY,
            error: 0,
        };
        let bytes = h.encode();
        assert_eq!(&bytes[0..2], &0x1234u16.to_ne_bytes());
        assert_eq!(&bytes[2..4], &10u16.to_ne_bytes());
        assert_eq!(&bytes[4..8], &40u32.to_ne_bytes());
        let back = Header::parse(&bytes);
        assert_eq!(back, h);
        assert!(back.no_reply());
        assert_eq!(back.msg_type(), FLAGS_TYPE_COMMAND);
        assert_eq!(back.payload_len(), Some(24));
        assert_eq!(back.cmd(), Some(Command::RegionWrite));
    }

    #[test]
    fn header_hostile_sizes() {
        let mut h = Header {
            size: 3,
            ..Default::default()
        };
        assert_eq!(h.payload_len(), None);
        h.size = u32::MAX;
        assert_eq!(h.payload_len(), Some(u32::MAX as usize - HEADER_SIZE));
        h.command = 0x7fff;
        assert_eq!(h.cmd(), None);
        assert_eq!(Command::from_code(0), None);
        assert_eq!(Command::from_code(19), None);
        for c in 1..=18 {
            assert_eq!(Command::from_code(c).map(|c| c as u16), Some(c));
        }
    }

    #[test]
    fn replies() {
        let req = Header {
            id: 7,
            command: 5,
            size: 48,
            flags: 0,
            error: 0,
        };
        let r = encode_reply(&req, &[1, 2, 3]);
        let h = Header::parse(r[..HEADER_SIZE].try_into().unwrap());
        assert_eq!(h.id, 7);
        assert_eq!(h.command, 5);
        assert_eq!(h.size, 19);
        assert_eq!(h.flags, FLAGS_TYPE_REPLY);
        assert_eq!(&r[HEADER_SIZE..], &[1, 2, 3]);

        let e = Header::parse(&encode_error(&req, libc::EINVAL as u32));
        assert_eq!(e.size, HEADER_SIZE as u32);
        assert_eq!(e.flags, FLAGS_TYPE_REPLY | FLAGS_ERROR);
        assert_eq!(e.error, libc::EINVAL as u32);
        assert_eq!(e.id, 7);

        let c = encode_command(9, 13, FLAGS_NO_REPLY | FLAGS_TYPE_REPLY, &[]);
        let h = Header::parse(c[..HEADER_SIZE].try_into().unwrap());
        assert_eq!(h.flags, FLAGS_NO_REPLY, "type bits are forced to command");
        assert_eq!(h.size, 16);
    }

    #[test]
    fn vfio_constants_match_the_protocol_spec() {
        // The bit positions the vfio-user spec tables give.
        assert_eq!((DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE), (1, 2));
        assert_eq!((DEVICE_FLAGS_RESET, DEVICE_FLAGS_PCI), (1, 2));
        assert_eq!(IRQ_SET_ACTION_TRIGGER, 1 << 5);
        assert_eq!(IRQ_INFO_NORESIZE, 1 << 3);
        assert_eq!((PCI_NUM_REGIONS, PCI_CONFIG_REGION_INDEX), (9, 7));
        assert_eq!((PCI_NUM_IRQS, PCI_MSIX_IRQ_INDEX), (5, 2));
    }

    #[test]
    fn version_round_trip() {
        let v = Version {
            major: 0,
            minor: 1,
            caps: Capabilities::SERVER,
        };
        let bytes = v.encode();
        assert_eq!(*bytes.last().unwrap(), 0, "JSON is NUL-terminated");
        assert_eq!(Version::parse(&bytes).unwrap(), v);
        let json: Value = serde_json::from_slice(&bytes[4..bytes.len() - 1]).unwrap();
        assert_eq!(json["capabilities"]["max_msg_fds"], 16);
        assert_eq!(json["capabilities"]["pgsizes"], 4096);
        assert_eq!(
            json["capabilities"]["max_data_xfer_size"],
            MAX_DATA_XFER_SIZE
        );
        assert_eq!(json["capabilities"]["max_dma_maps"], MAX_DMA_MAPS);
    }

    #[test]
    fn version_parses_qemu_capabilities() {
        // What QEMU 10.1's caps_json() sends (hw/vfio-user/proxy.c).
        let json = br#"{"capabilities":{"migration":{"pgsize":4096,"max_bitmap_size":268435456},"max_msg_fds":16,"max_data_xfer_size":1048576,"pgsizes":4096,"max_dma_maps":65535,"write_multiple":true}}"#;
        let mut payload = vec![0, 0, 0, 0];
        payload.extend_from_slice(json);
        payload.push(0);
        let v = Version::parse(&payload).unwrap();
        assert_eq!((v.major, v.minor), (0, 0));
        assert_eq!(v.caps.max_msg_fds, 16);
        assert_eq!(v.caps.max_dma_maps, 65535);
    }

    #[test]
    fn version_without_or_with_empty_capabilities() {
        let v = Version::parse(&[0, 0, 1, 0]).unwrap();
        assert_eq!(v.caps, Capabilities::DEFAULT);
        let mut p = vec![0, 0, 0, 0];
        p.extend_from_slice(b"{}\0");
        assert_eq!(Version::parse(&p).unwrap().caps, Capabilities::DEFAULT);
        let mut p = vec![0, 0, 0, 0];
        p.extend_from_slice(b"{\"capabilities\":{\"max_msg_fds\":4}}");
        assert_eq!(Version::parse(&p).unwrap().caps.max_msg_fds, 4);
    }

    #[test]
    fn version_hostile() {
        assert!(matches!(
            Version::parse(&[0, 0, 0]),
            Err(ProtoError::Truncated {
                need: 4,
                got: 3,
                ..
            })
        ));
        for bad in [
            &b"{not json\0"[..],
            b"[1,2]\0",
            b"{\"capabilities\":3}\0",
            b"{\"capabilities\":{\"max_msg_fds\":-1}}\0",
            b"{\"capabilities\":{\"max_msg_fds\":\"16\"}}\0",
            b"{\"capabilities\":{\"max_msg_fds\":4294967296}}\0",
            b"{}\0garbage",
            b"\xff\xfe\0",
        ] {
            let mut p = vec![0, 0, 0, 0];
            p.extend_from_slice(bad);
            assert!(
                matches!(Version::parse(&p), Err(ProtoError::BadVersionData(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn dma_map_round_trip_and_hostile() {
        let m = DmaMap {
            argsz: 32,
            flags: DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
            offset: 0x1000,
            address: 0x8000_0000,
            size: 0x20_0000,
        };
        let bytes = m.encode();
        assert_eq!(bytes.len(), DmaMap::SIZE);
        assert_eq!(DmaMap::parse(&bytes).unwrap(), m);
        assert!(matches!(
            DmaMap::parse(&bytes[..31]),
            Err(ProtoError::Truncated { .. })
        ));
        let bad = DmaMap { argsz: 31, ..m }.encode();
        assert!(matches!(
            DmaMap::parse(&bad),
            Err(ProtoError::ArgszTooSmall { argsz: 31, .. })
        ));
        let mut longer = bytes.clone();
        longer.extend_from_slice(&[0xaa; 8]);
        assert_eq!(DmaMap::parse(&longer).unwrap(), m, "trailing bytes ignored");
    }

    #[test]
    fn dma_unmap_round_trip_and_hostile() {
        let m = DmaUnmap {
            argsz: 24,
            flags: DMA_UNMAP_FLAG_ALL,
            address: 0,
            size: 0,
        };
        assert_eq!(DMA_UNMAP_FLAG_ALL, 2, "VFIO_DMA_UNMAP_FLAG_ALL is bit 1");
        let bytes = m.encode();
        assert_eq!(DmaUnmap::parse(&bytes).unwrap(), m);
        assert!(DmaUnmap::parse(&bytes[..23]).is_err());
        assert!(DmaUnmap::parse(&DmaUnmap { argsz: 0, ..m }.encode()).is_err());
        assert!(DmaUnmap::parse(&[]).is_err());
    }

    #[test]
    fn device_info_round_trip_and_hostile() {
        let m = DeviceInfo {
            argsz: 16,
            flags: DEVICE_FLAGS_PCI | DEVICE_FLAGS_RESET,
            num_regions: 9,
            num_irqs: 5,
        };
        let bytes = m.encode();
        assert_eq!(DeviceInfo::parse(&bytes).unwrap(), m);
        assert!(DeviceInfo::parse(&bytes[..15]).is_err());
        assert!(DeviceInfo::parse(&DeviceInfo { argsz: 8, ..m }.encode()).is_err());
        // The vfio_user crate's client sends argsz 32 (it counts the header): accepted.
        assert!(DeviceInfo::parse(&DeviceInfo { argsz: 32, ..m }.encode()).is_ok());
    }

    #[test]
    fn region_info_round_trip_and_hostile() {
        let m = RegionInfo {
            argsz: 32,
            flags: REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE,
            index: 7,
            cap_offset: 0,
            size: 256,
            offset: 0,
        };
        let bytes = m.encode();
        assert_eq!(RegionInfo::parse(&bytes).unwrap(), m);
        assert!(RegionInfo::parse(&bytes[..16]).is_err());
        assert!(RegionInfo::parse(&RegionInfo { argsz: 16, ..m }.encode()).is_err());
    }

    #[test]
    fn irq_info_round_trip_and_hostile() {
        let m = IrqInfo {
            argsz: 16,
            flags: IRQ_INFO_EVENTFD,
            index: 2,
            count: 4,
        };
        let bytes = m.encode();
        assert_eq!(IrqInfo::parse(&bytes).unwrap(), m);
        assert!(IrqInfo::parse(&bytes[..12]).is_err());
        assert!(IrqInfo::parse(&IrqInfo { argsz: 15, ..m }.encode()).is_err());
    }

    #[test]
    fn irq_set_round_trip_and_hostile() {
        let m = IrqSet {
            argsz: 20,
            flags: IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
            index: 2,
            start: 0,
            count: 4,
            data: vec![],
        };
        let bytes = m.encode();
        assert_eq!(bytes.len(), IrqSet::SIZE);
        assert_eq!(IrqSet::parse(&bytes).unwrap(), m);
        assert!(IrqSet::parse(&bytes[..19]).is_err());
        assert!(IrqSet::parse(
            &IrqSet {
                argsz: 0,
                ..m.clone()
            }
            .encode()
        )
        .is_err());

        let b = IrqSet {
            argsz: 23,
            flags: IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_TRIGGER,
            count: 3,
            data: vec![1, 0, 1],
            ..m.clone()
        };
        assert_eq!(IrqSet::parse(&b.encode()).unwrap(), b);
        // Bool data shorter than count.
        let mut short = b.encode();
        short.pop();
        assert!(matches!(
            IrqSet::parse(&short),
            Err(ProtoError::Truncated { .. })
        ));
        // A hostile count does not allocate: it fails on the length check.
        let huge = IrqSet {
            count: u32::MAX,
            data: vec![],
            ..b
        };
        assert!(IrqSet::parse(&huge.encode()).is_err());
    }

    #[test]
    fn region_access_round_trip_and_hostile() {
        let a = RegionAccess {
            offset: 0x10,
            region: 0,
            count: 4,
        };
        let w = a.encode(&[1, 2, 3, 4]);
        let (back, data) = RegionAccess::parse_write(&w).unwrap();
        assert_eq!(back, a);
        assert_eq!(data, &[1, 2, 3, 4]);
        assert_eq!(RegionAccess::parse_read(&a.encode(&[])).unwrap(), a);
        assert!(RegionAccess::parse_read(&w[..15]).is_err());
        // count larger or smaller than the data that follows.
        assert!(matches!(
            RegionAccess::parse_write(&w[..19]),
            Err(ProtoError::WriteCountMismatch { count: 4, data: 3 })
        ));
        let mut longer = w.clone();
        longer.push(5);
        assert!(RegionAccess::parse_write(&longer).is_err());
        let huge = RegionAccess {
            count: u32::MAX,
            ..a
        };
        assert!(RegionAccess::parse_write(&huge.encode(&[0; 4])).is_err());
    }
}
