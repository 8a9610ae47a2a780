//! Connections to local pods that keep the client's address (a tunnel stream from a pod of
//! another node reaches the destination pod from that pod's address, not from this node's), so
//! `getpeername()`, access logs and address allowlists in the destination see the real client.
//!
//! Three parts work together:
//! - the agent's socket is `IP_TRANSPARENT`, bound to the client's address, and carries
//!   `SO_MARK` [`marks::AGENT_TRANSPARENT`] (the STRICT gate lets its SYN pass);
//! - the TC program on the pod's veth marks the pod's answers to such a socket
//!   [`marks::REPLY_TO_AGENT`] (it looks the socket up in this namespace);
//! - a policy rule sends packets with that mark to a table whose one route is `local default`,
//!   so they are delivered to this node (to the agent's socket), not routed to the client's node.
//!
//! The rule and the route are installed by [`install_reply_route`] and removed with the datapath
//! ([`remove_reply_route`]). Without them the agent connects from its own address, as before.
use std::{
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
};

use mesh_common::marks;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    route::{
        RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
        RouteType,
    },
    rule::{RuleAction, RuleAttribute, RuleHeader, RuleMessage},
};
use nix::sys::socket::{setsockopt, sockopt};
use tokio::net::{TcpSocket, TcpStream};

/// Connects to `target` from `source` (an address of another node), port chosen by the kernel.
///
/// # Errors
/// Creating, marking or binding the socket (`EPERM` without `CAP_NET_ADMIN`), or the connect.
pub async fn connect_from(source: Ipv4Addr, target: SocketAddrV4) -> io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    setsockopt(&socket, sockopt::IpTransparent, &true)?;
    setsockopt(&socket, sockopt::Mark, &marks::AGENT_TRANSPARENT)?;
    socket.bind(SocketAddr::V4(SocketAddrV4::new(source, 0)))?;
    socket.connect(SocketAddr::V4(target)).await
}

/// Installs (idempotently) the rule and route that bring marked answers to this node, in the
/// calling thread's network namespace.
///
/// # Errors
/// What rtnetlink answered.
pub fn install_reply_route() -> io::Result<()> {
    let lo = nix::net::if_::if_nametoindex("lo").map_err(io::Error::from)?;
    request(
        RouteNetlinkMessage::NewRoute(reply_route(lo)),
        NLM_F_CREATE | NLM_F_REPLACE,
    )?;
    // A rule cannot be replaced: remove an old one (an agent that crashed) first.
    absent_is_fine(request(RouteNetlinkMessage::DelRule(reply_rule()), 0))?;
    request(
        RouteNetlinkMessage::NewRule(reply_rule()),
        NLM_F_CREATE | NLM_F_EXCL,
    )
}

/// Removes the rule and the route; what is already gone is fine.
///
/// # Errors
/// What rtnetlink answered, other than "not there".
pub fn remove_reply_route() -> io::Result<()> {
    let lo = nix::net::if_::if_nametoindex("lo").map_err(io::Error::from)?;
    for message in [
        RouteNetlinkMessage::DelRule(reply_rule()),
        RouteNetlinkMessage::DelRoute(reply_route(lo)),
    ] {
        absent_is_fine(request(message, 0))?;
    }
    Ok(())
}

/// A deletion's answer, where "not there" (`ENOENT`) is success.
fn absent_is_fine(result: io::Result<()>) -> io::Result<()> {
    match result {
        Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ENOENT as i32) => Ok(()),
        other => other,
    }
}

/// `local 0.0.0.0/0 dev lo table REPLY_TABLE`.
fn reply_route(lo: u32) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header = RouteHeader {
        address_family: AddressFamily::Inet,
        destination_prefix_length: 0,
        protocol: RouteProtocol::Static,
        scope: RouteScope::Host,
        kind: RouteType::Local,
        ..m.header
    };
    m.attributes = vec![
        RouteAttribute::Table(marks::REPLY_TABLE),
        RouteAttribute::Destination(RouteAddress::Inet(Ipv4Addr::UNSPECIFIED)),
        RouteAttribute::Oif(lo),
    ];
    m
}

/// `fwmark REPLY_TO_AGENT lookup REPLY_TABLE priority REPLY_TABLE`.
fn reply_rule() -> RuleMessage {
    let mut m = RuleMessage::default();
    m.header = RuleHeader {
        family: AddressFamily::Inet,
        action: RuleAction::ToTable,
        ..m.header
    };
    m.attributes = vec![
        RuleAttribute::FwMark(marks::REPLY_TO_AGENT),
        RuleAttribute::FwMask(u32::MAX),
        RuleAttribute::Table(marks::REPLY_TABLE),
        RuleAttribute::Priority(marks::REPLY_TABLE),
    ];
    m
}

/// Sends one request and waits for the kernel's acknowledgement.
fn request(message: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
    let socket = crate::interfaces::send_rtnetlink(message, NLM_F_ACK | flags)?;
    let mut receive = vec![0; 8192];
    let size = socket.recv(&mut &mut receive[..], 0)?;
    let answer: NetlinkMessage<RouteNetlinkMessage> = NetlinkMessage::deserialize(&receive[..size])
        .map_err(|e| io::Error::other(e.to_string()))?;
    match answer.payload {
        NetlinkPayload::Error(e) => match e.code {
            None => Ok(()),
            Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
        },
        other => Err(io::Error::other(format!(
            "unexpected rtnetlink answer: {other:?}"
        ))),
    }
}
