//! The gateway's nftables table, written to the kernel over netlink (`NETLINK_NETFILTER`,
//! one nf_tables batch), without the `nft` program: the container image has none.
//!
//! [`table_batch`] builds the batch from the configuration (pure, unit-tested);
//! [`install`] and [`remove`] send it. The table, as `nft list table ip kuberaya-gateway`
//! prints it:
//!
//! ```text
//! table ip kuberaya-gateway {
//!     chain postrouting { type nat hook postrouting priority srcnat; policy accept;
//!         ip saddr 100.64.0.0/16 oifname != "kr-gw0" masquerade }
//!     chain forward { type filter hook forward priority filter; policy accept;
//!         oifname "kr-gw0" ct state established,related accept
//!         oifname "kr-gw0" drop }
//!     chain output { type filter hook output priority filter; policy accept;
//!         oifname "kr-gw0" ct state established,related accept
//!         oifname "kr-gw0" drop }
//! }
//! ```
//!
//! With an IPv6 tunnel range ([`install_dual_stack`]) the same table is built in family
//! `ip6` as well (`ip6 saddr fd6b:7261:7961::/64 oifname != "kr-gw0" masquerade`, the same
//! forward and output chains), in the same batch: IPv6 ClusterIPs are not routed back to
//! the tunnel's ULA range either, and nobody in the cluster may open a connection into
//! the tunnel over IPv6 more than over IPv4.
//!
//! The batch first adds then deletes any table of that name and then adds it anew, all in
//! one transaction: a table left by a crashed gateway is replaced, never doubled, and a
//! failure leaves the old state. Expressions are encoded as `nft` itself compiles them
//! (payload, bitwise and cmp for a prefix; meta oifname against the 16-byte name; ct
//! state's bits masked in host byte order), so `nft list` shows them as above.

use ipnet::{Ipv4Net, Ipv6Net};

use super::netlink::{Conn, Msg, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST, NetlinkError};

/// The nftables table the gateway owns (family `ip`, and `ip6` for an IPv6 tunnel range).
pub const TABLE: &str = "kuberaya-gateway";

// linux/netfilter/nfnetlink.h and nf_tables.h.
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
/// Register 1 (16 bytes: room for an interface name); 0 is the verdict register.
const NFT_REG_1: u32 = 1;
const NFT_REG_VERDICT: u32 = 0;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_META_OIFNAME: u32 = 7;
const NFT_CT_STATE: u32 = 0;
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;
const NF_INET_FORWARD: u32 = 2;
const NF_INET_LOCAL_OUT: u32 = 3;
const NF_INET_POST_ROUTING: u32 = 4;
/// `IFNAMSIZ`: interface names are compared over 16 bytes, NUL-padded.
const IFNAMSIZ: usize = 16;
/// Conntrack state bits (`NF_CT_STATE_BIT`): established is 1 << 1, related 1 << 2.
pub const CT_STATE_ESTABLISHED: u32 = 1 << 1;
pub const CT_STATE_RELATED: u32 = 1 << 2;
/// The offset of the source address in the IPv4 header.
const IPV4_SADDR: u32 = 12;
/// The offset of the source address in the IPv6 header.
const IPV6_SADDR: u32 = 8;

/// An nftables address family the gateway builds its table in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `ip`
    V4,
    /// `ip6`
    V6,
}

impl Family {
    fn nfproto(self) -> u8 {
        match self {
            Family::V4 => NFPROTO_IPV4,
            Family::V6 => NFPROTO_IPV6,
        }
    }
}

/// `cmp` operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    Eq = 0,
    Neq = 1,
}

/// One nf_tables expression, all working on register 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    /// `len` bytes of the network header at `offset`.
    Payload {
        offset: u32,
        len: u32,
    },
    /// The output interface's name.
    MetaOifname,
    /// The connection's conntrack state bits (host byte order).
    CtState,
    /// `reg = reg & mask` (xor 0).
    And(Vec<u8>),
    Cmp(Cmp, Vec<u8>),
    Masquerade,
    Accept,
    Drop,
}

/// `ip saddr <range>`: the address loaded, masked to the prefix and compared.
pub fn saddr_in(range: Ipv4Net) -> Vec<Expr> {
    vec![
        Expr::Payload {
            offset: IPV4_SADDR,
            len: 4,
        },
        Expr::And(range.netmask().octets().to_vec()),
        Expr::Cmp(Cmp::Eq, range.network().octets().to_vec()),
    ]
}

/// `ip6 saddr <range>`: as [`saddr_in`], over the 16 bytes of an IPv6 source address.
pub fn saddr_in_v6(range: Ipv6Net) -> Vec<Expr> {
    vec![
        Expr::Payload {
            offset: IPV6_SADDR,
            len: 16,
        },
        Expr::And(range.netmask().octets().to_vec()),
        Expr::Cmp(Cmp::Eq, range.network().octets().to_vec()),
    ]
}

/// `oifname ==/!= <device>`.
pub fn oifname(op: Cmp, device: &str) -> Vec<Expr> {
    let mut name = device.as_bytes().to_vec();
    name.resize(IFNAMSIZ.max(name.len()), 0);
    vec![Expr::MetaOifname, Expr::Cmp(op, name)]
}

/// `ct state established,related`: any of the two bits set.
pub fn established_or_related() -> Vec<Expr> {
    vec![
        Expr::CtState,
        Expr::And((CT_STATE_ESTABLISHED | CT_STATE_RELATED).to_ne_bytes().to_vec()),
        Expr::Cmp(Cmp::Neq, 0u32.to_ne_bytes().to_vec()),
    ]
}

/// A base chain: its name, type, hook and priority (policy accept).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chain {
    pub name: &'static str,
    pub kind: &'static str,
    pub hook: u32,
    pub priority: i32,
}

/// The chains and their rules, in order.
pub fn rules(device: &str, range: Ipv4Net) -> Vec<(Chain, Vec<Vec<Expr>>)> {
    rules_from(device, saddr_in(range))
}

/// The chains and rules of the `ip6` table: the same as [`rules`], for an IPv6 range.
pub fn rules_v6(device: &str, range: Ipv6Net) -> Vec<(Chain, Vec<Vec<Expr>>)> {
    rules_from(device, saddr_in_v6(range))
}

/// The chains and rules, `from_tunnel` matching a source address in the tunnel range.
fn rules_from(device: &str, from_tunnel: Vec<Expr>) -> Vec<(Chain, Vec<Vec<Expr>>)> {
    let into_tunnel = |name, hook| {
        let chain = Chain {
            name,
            kind: "filter",
            hook,
            priority: 0,
        };
        // Into the tunnel: replies of the peers' own connections only (forwarded or local).
        let accept = [oifname(Cmp::Eq, device), established_or_related(), vec![Expr::Accept]].concat();
        let drop = [oifname(Cmp::Eq, device), vec![Expr::Drop]].concat();
        (chain, vec![accept, drop])
    };
    let postrouting = Chain {
        name: "postrouting",
        kind: "nat",
        hook: NF_INET_POST_ROUTING,
        priority: 100,
    };
    let masquerade = [from_tunnel, oifname(Cmp::Neq, device), vec![Expr::Masquerade]].concat();
    vec![
        (postrouting, vec![masquerade]),
        into_tunnel("forward", NF_INET_FORWARD),
        into_tunnel("output", NF_INET_LOCAL_OUT),
    ]
}

/// `nfgenmsg`: the family, version 0 and a resource id (big-endian).
fn nfgenmsg(family: u8, res_id: u16) -> [u8; 4] {
    let r = res_id.to_be_bytes();
    [family, 0, r[0], r[1]]
}

fn nft_msg(family: Family, ty: u16, flags: u16) -> Msg {
    Msg::new(
        (NFNL_SUBSYS_NFTABLES << 8) | ty,
        NLM_F_REQUEST | NLM_F_ACK | flags,
        &nfgenmsg(family.nfproto(), 0),
    )
}

fn table(family: Family, ty: u16, flags: u16) -> Msg {
    let mut m = nft_msg(family, ty, flags);
    m.str(NFTA_TABLE_NAME, TABLE);
    m
}

fn chain(family: Family, c: &Chain) -> Msg {
    let mut m = nft_msg(family, NFT_MSG_NEWCHAIN, NLM_F_CREATE);
    m.str(NFTA_CHAIN_TABLE, TABLE)
        .str(NFTA_CHAIN_NAME, c.name)
        .nest(NFTA_CHAIN_HOOK, |m| {
            m.be32(NFTA_HOOK_HOOKNUM, c.hook)
                .be32(NFTA_HOOK_PRIORITY, c.priority as u32);
        })
        .be32(NFTA_CHAIN_POLICY, NF_ACCEPT)
        .str(NFTA_CHAIN_TYPE, c.kind);
    m
}

fn rule(family: Family, chain: &str, exprs: &[Expr]) -> Msg {
    let mut m = nft_msg(family, NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND);
    m.str(NFTA_RULE_TABLE, TABLE)
        .str(NFTA_RULE_CHAIN, chain)
        .nest(NFTA_RULE_EXPRESSIONS, |m| {
            for e in exprs {
                m.nest(NFTA_LIST_ELEM, |m| expr(m, e));
            }
        });
    m
}

/// `nested(NFTA_DATA_VALUE)`, how nf_tables carries constants.
fn data(m: &mut Msg, ty: u16, bytes: &[u8]) {
    m.nest(ty, |m| {
        m.attr(NFTA_DATA_VALUE, bytes);
    });
}

fn expr(m: &mut Msg, e: &Expr) {
    let name = match e {
        Expr::Payload { .. } => "payload",
        Expr::MetaOifname => "meta",
        Expr::CtState => "ct",
        Expr::And(_) => "bitwise",
        Expr::Cmp(..) => "cmp",
        Expr::Masquerade => "masq",
        Expr::Accept | Expr::Drop => "immediate",
    };
    m.str(NFTA_EXPR_NAME, name);
    if *e == Expr::Masquerade {
        return; // no attributes
    }
    m.nest(NFTA_EXPR_DATA, |m| match e {
        // NFTA_PAYLOAD_DREG, _BASE, _OFFSET, _LEN
        Expr::Payload { offset, len } => {
            m.be32(1, NFT_REG_1)
                .be32(2, NFT_PAYLOAD_NETWORK_HEADER)
                .be32(3, *offset)
                .be32(4, *len);
        }
        // NFTA_META_DREG, _KEY
        Expr::MetaOifname => {
            m.be32(1, NFT_REG_1).be32(2, NFT_META_OIFNAME);
        }
        // NFTA_CT_DREG, _KEY
        Expr::CtState => {
            m.be32(1, NFT_REG_1).be32(2, NFT_CT_STATE);
        }
        // NFTA_BITWISE_SREG, _DREG, _LEN, _MASK, _XOR
        Expr::And(mask) => {
            m.be32(1, NFT_REG_1).be32(2, NFT_REG_1).be32(3, mask.len() as u32);
            data(m, 4, mask);
            data(m, 5, &vec![0; mask.len()]);
        }
        // NFTA_CMP_SREG, _OP, _DATA
        Expr::Cmp(op, value) => {
            m.be32(1, NFT_REG_1).be32(2, *op as u32);
            data(m, 3, value);
        }
        // NFTA_IMMEDIATE_DREG, _DATA: a verdict
        Expr::Accept | Expr::Drop => {
            let code = if *e == Expr::Accept { NF_ACCEPT } else { NF_DROP };
            m.be32(1, NFT_REG_VERDICT).nest(2, |m| {
                m.nest(NFTA_DATA_VERDICT, |m| {
                    m.be32(NFTA_VERDICT_CODE, code);
                });
            });
        }
        Expr::Masquerade => unreachable!("no attributes"),
    });
}

/// An nf_tables transaction: the messages in order, between batch begin and end.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Every message of the datagram, numbered from 1.
    pub msgs: Vec<Vec<u8>>,
}

impl Batch {
    fn new(body: Vec<Msg>) -> Batch {
        let delimiter = |ty| Msg::new(ty, NLM_F_REQUEST, &nfgenmsg(0, NFNL_SUBSYS_NFTABLES));
        let all = std::iter::once(delimiter(NFNL_MSG_BATCH_BEGIN))
            .chain(body)
            .chain(std::iter::once(delimiter(NFNL_MSG_BATCH_END)));
        Batch {
            msgs: all.zip(1..).map(|(m, seq)| m.finish(seq)).collect(),
        }
    }

    /// The acknowledgements to wait for: one per message between begin and end.
    pub fn acks(&self) -> usize {
        self.msgs.len() - 2
    }
}

/// The messages that replace the table of `family` with `chains`: add, delete and add
/// the table, then the chains and rules.
fn replace_table(family: Family, chains: Vec<(Chain, Vec<Vec<Expr>>)>) -> Vec<Msg> {
    let mut body = vec![
        table(family, NFT_MSG_NEWTABLE, NLM_F_CREATE),
        table(family, NFT_MSG_DELTABLE, 0),
        table(family, NFT_MSG_NEWTABLE, NLM_F_CREATE),
    ];
    for (c, rs) in chains {
        body.push(chain(family, &c));
        body.extend(rs.iter().map(|r| rule(family, c.name, r)));
    }
    body
}

/// The messages that delete the table of `family` (an add first, so that a missing table
/// is no error).
fn delete_table(family: Family) -> Vec<Msg> {
    vec![
        table(family, NFT_MSG_NEWTABLE, NLM_F_CREATE),
        table(family, NFT_MSG_DELTABLE, 0),
    ]
}

/// The whole table, replacing any earlier one: add, delete and add the table, then the
/// chains and rules of [`rules`].
pub fn table_batch(device: &str, range: Ipv4Net) -> Batch {
    Batch::new(replace_table(Family::V4, rules(device, range)))
}

/// Both tables in one transaction: the `ip` one of [`table_batch`], then the `ip6` one of
/// [`rules_v6`] when there is an IPv6 tunnel range, or, when there is none, the deletion of
/// any `ip6` table (left by an earlier dual-stack run).
pub fn dual_stack_batch(device: &str, range: Ipv4Net, range_v6: Option<Ipv6Net>) -> Batch {
    let mut body = replace_table(Family::V4, rules(device, range));
    match range_v6 {
        Some(r) => body.extend(replace_table(Family::V6, rules_v6(device, r))),
        None => body.extend(delete_table(Family::V6)),
    }
    Batch::new(body)
}

/// Delete the table (an add first, so that a missing table is no error).
pub fn delete_batch() -> Batch {
    Batch::new(delete_table(Family::V4))
}

/// Delete both tables, `ip` and `ip6`, in one transaction; missing ones are no error.
pub fn delete_dual_stack_batch() -> Batch {
    Batch::new([delete_table(Family::V4), delete_table(Family::V6)].concat())
}

fn send(batch: &Batch) -> Result<(), NetlinkError> {
    Conn::open(netlink_sys::protocols::NETLINK_NETFILTER)?.request(&batch.msgs, batch.acks())
}

/// Install the table in the calling thread's network namespace (needs CAP_NET_ADMIN).
pub fn install(device: &str, range: Ipv4Net) -> Result<(), NetlinkError> {
    send(&table_batch(device, range))
}

/// Install the `ip` table and, with an IPv6 tunnel range, the `ip6` one, in one
/// transaction ([`dual_stack_batch`]): both or neither (needs CAP_NET_ADMIN). IPv6
/// masquerading needs nothing more of the kernel than IPv4's (nf_nat, nft_masq).
pub fn install_dual_stack(device: &str, range: Ipv4Net, range_v6: Option<Ipv6Net>) -> Result<(), NetlinkError> {
    send(&dual_stack_batch(device, range, range_v6))
}

/// Remove the table, if there is one.
pub fn remove() -> Result<(), NetlinkError> {
    send(&delete_batch())
}

/// Remove both tables, those there are ([`install_dual_stack`]'s counterpart).
pub fn remove_dual_stack() -> Result<(), NetlinkError> {
    send(&delete_dual_stack_batch())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::netlink;

    /// Attributes as (type, value).
    type Attrs = Vec<(u16, Vec<u8>)>;

    /// The type of a message (without the subsystem) and its attributes.
    fn decode(msg: &[u8]) -> (u16, Attrs) {
        let m = netlink::messages(msg).next().expect("one message");
        let attrs = netlink::attrs(&m.payload[4..]).map(|(t, v)| (t, v.to_vec())).collect();
        (m.ty & 0xff, attrs)
    }

    fn range() -> Ipv4Net {
        "100.64.0.0/16".parse().unwrap()
    }

    /// The names of a rule message's expressions and each one's attributes.
    fn exprs(msg: &[u8]) -> Vec<(String, Attrs)> {
        let (ty, attrs) = decode(msg);
        assert_eq!(ty, NFT_MSG_NEWRULE);
        let list = &attrs.iter().find(|(t, _)| *t == NFTA_RULE_EXPRESSIONS).unwrap().1;
        netlink::attrs(list)
            .map(|(t, elem)| {
                assert_eq!(t, NFTA_LIST_ELEM);
                let inner: Vec<_> = netlink::attrs(elem).collect();
                let name = std::str::from_utf8(inner[0].1)
                    .unwrap()
                    .trim_end_matches('\0')
                    .to_string();
                let data = inner
                    .get(1)
                    .map(|(_, d)| netlink::attrs(d).map(|(t, v)| (t, v.to_vec())).collect())
                    .unwrap_or_default();
                (name, data)
            })
            .collect()
    }

    /// The value inside `nested(NFTA_DATA_VALUE)`.
    fn value(nested: &[u8]) -> Vec<u8> {
        let (t, v) = netlink::attrs(nested).next().unwrap();
        assert_eq!(t, NFTA_DATA_VALUE);
        v.to_vec()
    }

    #[test]
    fn the_batch_replaces_the_table_in_one_transaction() {
        let b = table_batch("kr-gw0", range());
        let types: Vec<u16> = b.msgs.iter().map(|m| netlink::messages(m).next().unwrap().ty).collect();
        let nft = |t: u16| (NFNL_SUBSYS_NFTABLES << 8) | t;
        assert_eq!(
            types,
            [
                NFNL_MSG_BATCH_BEGIN,
                nft(NFT_MSG_NEWTABLE),
                nft(NFT_MSG_DELTABLE),
                nft(NFT_MSG_NEWTABLE),
                nft(NFT_MSG_NEWCHAIN),
                nft(NFT_MSG_NEWRULE),
                nft(NFT_MSG_NEWCHAIN),
                nft(NFT_MSG_NEWRULE),
                nft(NFT_MSG_NEWRULE),
                nft(NFT_MSG_NEWCHAIN),
                nft(NFT_MSG_NEWRULE),
                nft(NFT_MSG_NEWRULE),
                NFNL_MSG_BATCH_END,
            ]
        );
        assert_eq!(b.acks(), 11);
        // Sequence numbers 1.., the delimiters addressed to the nf_tables subsystem.
        for (i, m) in b.msgs.iter().enumerate() {
            assert_eq!(netlink::messages(m).next().unwrap().seq, i as u32 + 1);
        }
        let begin = netlink::messages(&b.msgs[0]).next().unwrap();
        assert_eq!(begin.payload, [0, 0, 0, 10]);
        let first = netlink::messages(&b.msgs[1]).next().unwrap();
        assert_eq!(first.flags, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE);
        assert_eq!(&first.payload[..4], &[NFPROTO_IPV4, 0, 0, 0]);
        assert_eq!(
            decode(&b.msgs[2]).1,
            [(NFTA_TABLE_NAME, b"kuberaya-gateway\0".to_vec())]
        );

        let d = delete_batch();
        let types: Vec<u16> = d.msgs.iter().map(|m| decode(m).0).collect();
        assert_eq!(
            types,
            [
                NFNL_MSG_BATCH_BEGIN,
                NFT_MSG_NEWTABLE,
                NFT_MSG_DELTABLE,
                NFNL_MSG_BATCH_END
            ]
        );
        assert_eq!(d.acks(), 2);
    }

    #[test]
    fn chains_carry_their_hook_priority_type_and_policy() {
        let b = table_batch("kr-gw0", range());
        let (ty, attrs) = decode(&b.msgs[4]);
        assert_eq!(ty, NFT_MSG_NEWCHAIN);
        let get = |t| attrs.iter().find(|(k, _)| *k == t).unwrap().1.clone();
        assert_eq!(get(NFTA_CHAIN_NAME), b"postrouting\0");
        assert_eq!(get(NFTA_CHAIN_TYPE), b"nat\0");
        assert_eq!(get(NFTA_CHAIN_POLICY), NF_ACCEPT.to_be_bytes());
        let hook: Vec<_> = netlink::attrs(&get(NFTA_CHAIN_HOOK))
            .map(|(t, v)| (t, v.to_vec()))
            .collect();
        assert_eq!(
            hook,
            [
                (NFTA_HOOK_HOOKNUM, NF_INET_POST_ROUTING.to_be_bytes().to_vec()),
                (NFTA_HOOK_PRIORITY, 100u32.to_be_bytes().to_vec())
            ]
        );
        let (_, fwd) = decode(&b.msgs[6]);
        assert!(fwd.contains(&(NFTA_CHAIN_TYPE, b"filter\0".to_vec())));
        assert!(fwd.contains(&(NFTA_CHAIN_NAME, b"forward\0".to_vec())));
        let (_, out) = decode(&b.msgs[9]);
        assert!(out.contains(&(NFTA_CHAIN_NAME, b"output\0".to_vec())));
    }

    #[test]
    fn the_masquerade_matches_the_range_by_prefix_and_other_interfaces() {
        let b = table_batch("kr-gw0", "10.128.0.0/9".parse().unwrap());
        let e = exprs(&b.msgs[5]);
        let names: Vec<&str> = e.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["payload", "bitwise", "cmp", "meta", "cmp", "masq"]);
        // ip saddr: 4 bytes at offset 12 of the network header into register 1.
        assert_eq!(
            e[0].1,
            [
                (1, NFT_REG_1.to_be_bytes().to_vec()),
                (2, NFT_PAYLOAD_NETWORK_HEADER.to_be_bytes().to_vec()),
                (3, 12u32.to_be_bytes().to_vec()),
                (4, 4u32.to_be_bytes().to_vec())
            ]
        );
        // A /9: mask 255.128.0.0, xor 0, then equal to the network.
        assert_eq!(e[1].1[2], (3, 4u32.to_be_bytes().to_vec()));
        assert_eq!(value(&e[1].1[3].1), [255, 128, 0, 0]);
        assert_eq!(value(&e[1].1[4].1), [0, 0, 0, 0]);
        assert_eq!(e[2].1[1], (2, (Cmp::Eq as u32).to_be_bytes().to_vec()));
        assert_eq!(value(&e[2].1[2].1), [10, 128, 0, 0]);
        // oifname != "kr-gw0", the name NUL-padded to IFNAMSIZ.
        assert_eq!(e[3].1[1], (2, NFT_META_OIFNAME.to_be_bytes().to_vec()));
        assert_eq!(e[4].1[1], (2, (Cmp::Neq as u32).to_be_bytes().to_vec()));
        assert_eq!(value(&e[4].1[2].1), b"kr-gw0\0\0\0\0\0\0\0\0\0\0");
        assert!(e[5].1.is_empty(), "masq has no attributes");
    }

    #[test]
    fn into_the_tunnel_only_established_or_related_is_accepted() {
        let b = table_batch("kr-gw0", range());
        for (accept, drop) in [(7, 8), (10, 11)] {
            let e = exprs(&b.msgs[accept]);
            let names: Vec<&str> = e.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(names, ["meta", "cmp", "ct", "bitwise", "cmp", "immediate"]);
            assert_eq!(e[1].1[1], (2, (Cmp::Eq as u32).to_be_bytes().to_vec()));
            assert_eq!(e[2].1[1], (2, NFT_CT_STATE.to_be_bytes().to_vec()));
            // The state bits in host byte order: established 2 | related 4.
            assert_eq!(value(&e[3].1[3].1), 6u32.to_ne_bytes());
            assert_eq!(e[4].1[1], (2, (Cmp::Neq as u32).to_be_bytes().to_vec()));
            assert_eq!(value(&e[4].1[2].1), [0; 4]);
            let verdict = |imm: &[(u16, Vec<u8>)]| {
                assert_eq!(imm[0], (1, NFT_REG_VERDICT.to_be_bytes().to_vec()));
                let (t, v) = netlink::attrs(&imm[1].1).next().unwrap();
                assert_eq!(t, NFTA_DATA_VERDICT);
                let (t, code) = netlink::attrs(v).next().unwrap();
                assert_eq!(t, NFTA_VERDICT_CODE);
                u32::from_be_bytes(code.try_into().unwrap())
            };
            assert_eq!(verdict(&e[5].1), NF_ACCEPT);
            let e = exprs(&b.msgs[drop]);
            let names: Vec<&str> = e.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(names, ["meta", "cmp", "immediate"]);
            assert_eq!(verdict(&e[2].1), NF_DROP);
        }
    }

    /// The nfgenmsg family of each message of a batch (the delimiters carry none: 0).
    fn families(b: &Batch) -> Vec<u8> {
        b.msgs
            .iter()
            .map(|m| netlink::messages(m).next().unwrap().payload[0])
            .collect()
    }

    #[test]
    fn a_dual_stack_batch_builds_the_ip6_table_like_the_ip_one_in_the_same_transaction() {
        let v6: Ipv6Net = "fd6b:7261:7961::/64".parse().unwrap();
        let b = dual_stack_batch("kr-gw0", range(), Some(v6));
        let v4 = table_batch("kr-gw0", range());
        // The ip table's messages first, unchanged (begin .. last rule), then the same
        // shape again for ip6, then the end.
        let inner = v4.msgs.len() - 1;
        assert_eq!(b.msgs.len(), 2 * inner);
        assert_eq!(&b.msgs[..inner], &v4.msgs[..inner]);
        assert_eq!(b.acks(), 2 * v4.acks());
        let types = |b: &Batch| -> Vec<u16> { b.msgs.iter().map(|m| decode(m).0).collect() };
        assert_eq!(types(&b)[inner..2 * inner - 1], types(&v4)[1..inner]);
        let fams = families(&b);
        assert!(fams[1..inner].iter().all(|f| *f == NFPROTO_IPV4), "{fams:?}");
        assert!(
            fams[inner..2 * inner - 1].iter().all(|f| *f == NFPROTO_IPV6),
            "{fams:?}"
        );
        // Sequence numbers stay 1.. over the whole datagram.
        for (i, m) in b.msgs.iter().enumerate() {
            assert_eq!(netlink::messages(m).next().unwrap().seq, i as u32 + 1);
        }

        // The ip6 masquerade: 16 bytes at offset 8 of the IPv6 header, masked to the /64.
        let e = exprs(&b.msgs[inner + 4]);
        let names: Vec<&str> = e.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["payload", "bitwise", "cmp", "meta", "cmp", "masq"]);
        assert_eq!(e[0].1[2], (3, 8u32.to_be_bytes().to_vec()));
        assert_eq!(e[0].1[3], (4, 16u32.to_be_bytes().to_vec()));
        assert_eq!(e[1].1[2], (3, 16u32.to_be_bytes().to_vec()));
        assert_eq!(value(&e[1].1[3].1), [[0xff; 8], [0; 8]].concat());
        assert_eq!(value(&e[1].1[4].1), [0; 16]);
        assert_eq!(value(&e[2].1[2].1), v6.network().octets());
        assert_eq!(value(&e[4].1[2].1), b"kr-gw0\0\0\0\0\0\0\0\0\0\0");
        // Into the tunnel, the same two rules per chain as for IPv4.
        for accept in [inner + 6, inner + 9] {
            let names: Vec<String> = exprs(&b.msgs[accept]).into_iter().map(|(n, _)| n).collect();
            assert_eq!(names, ["meta", "cmp", "ct", "bitwise", "cmp", "immediate"]);
        }
    }

    #[test]
    fn without_an_ipv6_range_the_batch_deletes_any_ip6_table_and_removal_takes_both() {
        let b = dual_stack_batch("kr-gw0", range(), None);
        let v4 = table_batch("kr-gw0", range());
        let inner = v4.msgs.len() - 1;
        assert_eq!(&b.msgs[..inner], &v4.msgs[..inner]);
        let tail: Vec<(u16, u8)> = b.msgs[inner..]
            .iter()
            .zip(&families(&b)[inner..])
            .map(|(m, f)| (decode(m).0, *f))
            .collect();
        assert_eq!(
            tail,
            [
                (NFT_MSG_NEWTABLE, NFPROTO_IPV6),
                (NFT_MSG_DELTABLE, NFPROTO_IPV6),
                (NFNL_MSG_BATCH_END, 0)
            ]
        );

        let d = delete_dual_stack_batch();
        let all: Vec<(u16, u8)> = d.msgs.iter().zip(families(&d)).map(|(m, f)| (decode(m).0, f)).collect();
        assert_eq!(
            all,
            [
                (NFNL_MSG_BATCH_BEGIN, 0),
                (NFT_MSG_NEWTABLE, NFPROTO_IPV4),
                (NFT_MSG_DELTABLE, NFPROTO_IPV4),
                (NFT_MSG_NEWTABLE, NFPROTO_IPV6),
                (NFT_MSG_DELTABLE, NFPROTO_IPV6),
                (NFNL_MSG_BATCH_END, 0)
            ]
        );
        assert_eq!(d.acks(), 4);
    }
}
