//! Netlink framing for the TUN data plane's kernel configuration ([`super::nft`],
//! [`super::forwarding`]): messages are built as bytes by pure functions ([`Msg`]) and
//! sent by [`Conn`], the only part that touches a socket.
//!
//! Hand-written rather than a crate: the two message families we need (an nf_tables batch
//! and one RTM_SETLINK attribute) are a few nested attributes each; the Rust nf_tables
//! crate (`rustables`) is GPL-3.0, and `netlink-packet-route`'s `InetDevConf` emits every
//! devconf field, where we must set forwarding alone. `netlink-sys` provides the socket.

use std::io;

/// `NLMSG_ERROR`: an error, or an acknowledgement when its code is 0.
pub const NLMSG_ERROR: u16 = 2;
/// `NLMSG_DONE`: the end of a dump.
pub const NLMSG_DONE: u16 = 3;
pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
/// `NLM_F_ROOT | NLM_F_MATCH`.
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLM_F_CREATE: u16 = 0x400;
pub const NLM_F_APPEND: u16 = 0x800;
/// Set on an attribute holding attributes.
pub const NLA_F_NESTED: u16 = 0x8000;
/// The netlink message header's size.
pub const HEADER: usize = 16;
/// `NLMSGERR_ATTR_MSG`: the kernel's text in an extended acknowledgement.
const NLMSGERR_ATTR_MSG: u16 = 1;
/// `NLM_F_ACK_TLVS`: an error message carries extended-ack attributes.
const NLM_F_ACK_TLVS: u16 = 0x200;

fn align(n: usize) -> usize {
    (n + 3) & !3
}

/// One netlink message under construction: the header, a fixed family header, then
/// attributes (type-length-value, 4-byte aligned).
#[derive(Debug, Clone)]
pub struct Msg {
    buf: Vec<u8>,
}

impl Msg {
    /// A message of type `ty` with `flags`, followed by the family header `fixed` (e.g.
    /// `nfgenmsg`, `ifinfomsg`).
    pub fn new(ty: u16, flags: u16, fixed: &[u8]) -> Msg {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by `finish`
        buf.extend_from_slice(&ty.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // sequence number, set by `finish`
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        buf.extend_from_slice(fixed);
        buf.resize(align(buf.len()), 0);
        Msg { buf }
    }

    /// An attribute with raw bytes.
    pub fn attr(&mut self, ty: u16, value: &[u8]) -> &mut Msg {
        let len = u16::try_from(4 + value.len()).expect("a netlink attribute fits in 64 KiB");
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(value);
        self.buf.resize(align(self.buf.len()), 0);
        self
    }

    /// A NUL-terminated string attribute.
    pub fn str(&mut self, ty: u16, s: &str) -> &mut Msg {
        let mut v = Vec::with_capacity(s.len() + 1);
        v.extend_from_slice(s.as_bytes());
        v.push(0);
        self.attr(ty, &v)
    }

    /// A 32-bit attribute in network byte order (nf_tables' `NLA_BE32`).
    pub fn be32(&mut self, ty: u16, v: u32) -> &mut Msg {
        self.attr(ty, &v.to_be_bytes())
    }

    /// A 32-bit attribute in host byte order (`NLA_U32`).
    pub fn u32(&mut self, ty: u16, v: u32) -> &mut Msg {
        self.attr(ty, &v.to_ne_bytes())
    }

    /// An attribute holding the attributes `inner` adds (`NLA_F_NESTED` set).
    pub fn nest(&mut self, ty: u16, inner: impl FnOnce(&mut Msg)) -> &mut Msg {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0, 0]);
        self.buf.extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        inner(self);
        let len = u16::try_from(self.buf.len() - start).expect("a netlink attribute fits in 64 KiB");
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    /// The message's bytes, with its length and sequence number.
    pub fn finish(&self, seq: u32) -> Vec<u8> {
        let mut b = self.buf.clone();
        let len = u32::try_from(b.len()).expect("a netlink message fits in 4 GiB");
        b[0..4].copy_from_slice(&len.to_ne_bytes());
        b[8..12].copy_from_slice(&seq.to_ne_bytes());
        b
    }
}

/// One received message: header fields and what follows the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received<'a> {
    pub ty: u16,
    pub flags: u16,
    pub seq: u32,
    pub payload: &'a [u8],
}

/// The messages in `buf` (one datagram may hold several); stops at a malformed one.
pub fn messages(mut buf: &[u8]) -> impl Iterator<Item = Received<'_>> {
    std::iter::from_fn(move || {
        let len = u32::from_ne_bytes(buf.get(0..4)?.try_into().ok()?) as usize;
        if len < HEADER || len > buf.len() {
            return None;
        }
        let m = Received {
            ty: u16::from_ne_bytes([buf[4], buf[5]]),
            flags: u16::from_ne_bytes([buf[6], buf[7]]),
            seq: u32::from_ne_bytes(buf[8..12].try_into().ok()?),
            payload: &buf[HEADER..len],
        };
        buf = buf.get(align(len)..).unwrap_or(&[]);
        Some(m)
    })
}

/// The attributes in `buf` as (type without flags, value); stops at a malformed one.
pub fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = u16::from_ne_bytes(buf.get(0..2)?.try_into().ok()?) as usize;
        if len < 4 || len > buf.len() {
            return None;
        }
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & 0x3fff;
        let value = &buf[4..len];
        buf = buf.get(align(len)..).unwrap_or(&[]);
        Some((ty, value))
    })
}

/// A netlink request failed.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The socket itself (opening, sending, receiving).
    #[error("netlink socket: {0}")]
    Socket(#[from] io::Error),
    /// The kernel answered with an error code (e.g. EPERM without CAP_NET_ADMIN,
    /// EOPNOTSUPP without nf_tables), and its extended-ack text when it gave one.
    #[error("the kernel refused message {seq}: {errno}{}", detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Kernel {
        seq: u32,
        errno: io::Error,
        detail: Option<String>,
    },
    #[error("netlink: {0}")]
    Protocol(&'static str),
}

impl NetlinkError {
    /// The kernel's errno, when the kernel refused.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            NetlinkError::Socket(e) | NetlinkError::Kernel { errno: e, .. } => e.raw_os_error(),
            NetlinkError::Protocol(_) => None,
        }
    }
}

/// The error (or acknowledgement, `Ok`) an `NLMSG_ERROR` payload carries.
pub fn ack(m: &Received<'_>) -> Result<(), NetlinkError> {
    let code = m
        .payload
        .get(0..4)
        .map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes")))
        .ok_or(NetlinkError::Protocol("short error message"))?;
    if code == 0 {
        return Ok(());
    }
    // With NETLINK_CAP_ACK the request is echoed as its header only; the extended-ack
    // attributes follow it.
    let detail = (m.flags & NLM_F_ACK_TLVS != 0)
        .then(|| m.payload.get(4 + HEADER..))
        .flatten()
        .and_then(|tlvs| attrs(tlvs).find(|(ty, _)| *ty == NLMSGERR_ATTR_MSG))
        .map(|(_, v)| String::from_utf8_lossy(v.split(|b| *b == 0).next().unwrap_or(v)).into_owned());
    Err(NetlinkError::Kernel {
        seq: m.seq,
        errno: io::Error::from_raw_os_error(-code),
        detail,
    })
}

/// A netlink socket of one protocol in the calling thread's network namespace.
pub struct Conn {
    sock: netlink_sys::Socket,
}

impl Conn {
    /// Open a socket of `protocol` (`netlink_sys::protocols::NETLINK_*`).
    pub fn open(protocol: isize) -> Result<Conn, NetlinkError> {
        let mut sock = netlink_sys::Socket::new(protocol)?;
        sock.bind_auto()?;
        // Short acknowledgements with the kernel's explanation, where it gives one.
        sock.set_cap_ack(true)?;
        sock.set_ext_ack(true)?;
        Ok(Conn { sock })
    }

    /// Send `msgs` in one datagram (an nf_tables batch is one) and wait for `acks`
    /// acknowledgements; the first error fails. The kernel handles a request while it is
    /// sent, so every answer is queued when `send` returns: this never waits on the kernel.
    pub fn request(&self, msgs: &[Vec<u8>], acks: usize) -> Result<(), NetlinkError> {
        self.send(msgs)?;
        let mut seen = 0;
        while seen < acks {
            let (buf, _) = self.sock.recv_from_full()?;
            for m in messages(&buf) {
                if m.ty == NLMSG_ERROR {
                    ack(&m)?;
                    seen += 1;
                }
            }
        }
        Ok(())
    }

    /// Send a dump request and collect the payloads of the messages of type `ty`.
    pub fn dump(&self, msg: Vec<u8>, ty: u16) -> Result<Vec<Vec<u8>>, NetlinkError> {
        self.send(&[msg])?;
        let mut out = Vec::new();
        loop {
            let (buf, _) = self.sock.recv_from_full()?;
            for m in messages(&buf) {
                match m.ty {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => ack(&m)?,
                    t if t == ty => out.push(m.payload.to_vec()),
                    _ => {}
                }
            }
        }
    }

    fn send(&self, msgs: &[Vec<u8>]) -> Result<(), NetlinkError> {
        let bytes = msgs.concat();
        let sent = self.sock.send(&bytes, 0)?;
        if sent != bytes.len() {
            return Err(NetlinkError::Protocol("short send"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_aligned_and_nests_measure_their_content() {
        let mut m = Msg::new(0x0a00, NLM_F_REQUEST, &[2, 0, 0, 0]);
        m.str(1, "ab").nest(4, |m| {
            m.be32(1, 2);
        });
        let b = m.finish(7);
        assert_eq!(u32::from_ne_bytes(b[0..4].try_into().unwrap()) as usize, b.len());
        assert_eq!(u32::from_ne_bytes(b[8..12].try_into().unwrap()), 7);
        // "ab\0": length 7, padded to 8.
        assert_eq!(&b[20..28], &[7, 0, 1, 0, b'a', b'b', 0, 0]);
        // The nest: its header and one 8-byte attribute, flagged nested.
        assert_eq!(u16::from_ne_bytes([b[28], b[29]]), 12);
        assert_eq!(u16::from_ne_bytes([b[30], b[31]]), 4 | NLA_F_NESTED);
        assert_eq!(&b[36..40], &[0, 0, 0, 2], "big-endian value");
        let parsed: Vec<_> = messages(&b).collect();
        assert_eq!(parsed.len(), 1);
        let top: Vec<_> = attrs(&parsed[0].payload[4..]).collect();
        assert_eq!(top[0], (1, &b"ab\0"[..]));
        assert_eq!(top[1].0, 4, "the nested flag is masked off");
        assert_eq!(attrs(top[1].1).collect::<Vec<_>>(), [(1, &[0, 0, 0, 2][..])]);
    }

    #[test]
    fn an_error_carries_its_errno_and_the_kernels_text() {
        let mut payload = (-1i32).to_ne_bytes().to_vec();
        payload.extend_from_slice(&Msg::new(0x0a00, NLM_F_REQUEST, &[]).finish(3));
        let mut m = Msg::new(NLMSG_ERROR, NLM_F_ACK_TLVS, &payload);
        m.str(NLMSGERR_ATTR_MSG, "nope");
        let b = m.finish(3);
        let got = ack(&messages(&b).next().unwrap()).unwrap_err();
        assert_eq!(got.raw_os_error(), Some(libc::EPERM));
        let text = got.to_string();
        assert!(text.contains("os error 1") && text.contains("(nope)"), "{text}");
        let ok = Msg::new(NLMSG_ERROR, 0, &0i32.to_ne_bytes()).finish(4);
        assert!(ack(&messages(&ok).next().unwrap()).is_ok());
    }
}
