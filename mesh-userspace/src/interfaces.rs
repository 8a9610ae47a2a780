//! Which interfaces of the agent's network namespace are the host-side ends of pods: where the TC
//! programs attach (per-interface counters, and the STRICT mTLS gate).
//!
//! A name prefix only fits one CNI (bridge and flannel use `veth*`, Calico `cali*`, Cilium
//! `lxc*`, the AWS VPC CNI `eni*`, the local testbed `vh*`). What they share is the kind of
//! device: a `veth` (or `netkit`) pair whose other end is in another network namespace (the
//! pod's), and no address of its own on the host side (bridge ports and routed pod links have
//! none; the node's uplink has the node's address). `Auto` selects exactly those, from the
//! kernel's link table (rtnetlink); a prefix list is still accepted for odd setups.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// How pod interfaces are recognised.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum PodInterfaces {
    /// Every veth/netkit whose peer is in another namespace and which has no address.
    Auto,
    /// Interfaces whose name starts with one of these.
    Prefixes(Vec<String>),
}

impl std::str::FromStr for PodInterfaces {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "auto" {
            return Ok(Self::Auto);
        }
        let prefixes: Vec<String> = s
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(str::to_owned)
            .collect();
        if prefixes.is_empty() {
            return Err("give `auto` or a comma-separated list of interface name prefixes".into());
        }
        Ok(Self::Prefixes(prefixes))
    }
}

/// One link as rtnetlink reports it (the parts the choice looks at).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `veth` or `netkit`.
    pub pod_kind: bool,
    /// The peer is in another network namespace (`IFLA_LINK_NETNSID` present).
    pub peer_elsewhere: bool,
}

impl PodInterfaces {
    /// The pod interfaces (ifindex → name) among `links`, given the names of the interfaces
    /// that carry an IPv4 address.
    #[must_use]
    pub fn select(&self, links: &[Link], addressed: &BTreeSet<String>) -> BTreeMap<u32, String> {
        links
            .iter()
            .filter(|l| match self {
                Self::Auto => l.pod_kind && l.peer_elsewhere && !addressed.contains(&l.name),
                Self::Prefixes(p) => p.iter().any(|p| l.name.starts_with(p.as_str())),
            })
            .map(|l| (l.index, l.name.clone()))
            .collect()
    }

    /// The pod interfaces of the calling thread's network namespace. A failure to read the link
    /// table is logged and yields none (the counters and the gate wait for the next pass).
    #[must_use]
    pub fn current(&self) -> BTreeMap<u32, String> {
        let links = match self {
            Self::Auto => match dump_links() {
                Ok(links) => links,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the link table (rtnetlink)");
                    return BTreeMap::new();
                }
            },
            Self::Prefixes(_) => names_only(),
        };
        self.select(&links, &addressed())
    }
}

/// Interfaces by name only (for prefix matching: no rtnetlink needed).
fn names_only() -> Vec<Link> {
    nix::net::if_::if_nameindex()
        .map(|list| {
            list.iter()
                .filter_map(|i| {
                    Some(Link {
                        index: i.index(),
                        name: i.name().to_str().ok()?.to_owned(),
                        pod_kind: false,
                        peer_elsewhere: false,
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Names of the interfaces that have an IPv4 address.
fn addressed() -> BTreeSet<String> {
    nix::ifaddrs::getifaddrs()
        .map(|addrs| {
            addrs
                .filter(|a| {
                    a.address
                        .as_ref()
                        .and_then(|s| s.as_sockaddr_in())
                        .is_some()
                })
                .map(|a| a.interface_name)
                .collect()
        })
        .unwrap_or_default()
}

/// Sends one rtnetlink request (`NLM_F_REQUEST` and `flags`) in the calling thread's network
/// namespace; the socket is returned for the answers.
pub fn send_rtnetlink(message: RouteNetlinkMessage, flags: u16) -> std::io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut request = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(message));
    request.header.flags = NLM_F_REQUEST | flags;
    request.header.sequence_number = 1;
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0)?;
    Ok(socket)
}

/// Every link of the namespace, from an `RTM_GETLINK` dump.
pub fn dump_links() -> std::io::Result<Vec<Link>> {
    let socket = send_rtnetlink(
        RouteNetlinkMessage::GetLink(LinkMessage::default()),
        NLM_F_DUMP,
    )?;

    let mut links = Vec::new();
    let mut receive = vec![0; 64 * 1024];
    loop {
        let size = socket.recv(&mut &mut receive[..], 0)?;
        let mut offset = 0;
        while offset < size {
            let message: NetlinkMessage<RouteNetlinkMessage> =
                NetlinkMessage::deserialize(&receive[offset..size])
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
            match message.payload {
                NetlinkPayload::Done(_) => return Ok(links),
                NetlinkPayload::Error(e) => {
                    return Err(std::io::Error::other(format!("RTM_GETLINK: {e:?}")));
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                    links.push(describe(&link));
                }
                _ => {}
            }
            let len = message.header.length as usize;
            if len == 0 {
                break;
            }
            offset += len;
        }
    }
}

fn describe(link: &LinkMessage) -> Link {
    let mut out = Link {
        index: link.header.index,
        name: String::new(),
        pod_kind: false,
        peer_elsewhere: false,
    };
    for attr in &link.attributes {
        match attr {
            LinkAttribute::IfName(name) => out.name.clone_from(name),
            LinkAttribute::LinkNetNsId(_) => out.peer_elsewhere = true,
            LinkAttribute::LinkInfo(infos) => {
                out.pod_kind = infos
                    .iter()
                    .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth | InfoKind::Netkit)));
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str, pod_kind: bool, peer_elsewhere: bool) -> Link {
        Link {
            index,
            name: name.into(),
            pod_kind,
            peer_elsewhere,
        }
    }

    #[test]
    fn auto_picks_unaddressed_veths_whose_peer_is_elsewhere() {
        let links = [
            link(1, "lo", false, false),
            link(2, "eth0", false, false),
            link(3, "cni0", false, false),
            link(4, "veth1a2b", true, true),
            link(5, "cali77", true, true),
            link(6, "lxc9", true, true),
            // The node's uplink to another namespace has the node's address.
            link(7, "link0", true, true),
            // Both ends in this namespace: not a pod.
            link(8, "deadend0", true, false),
        ];
        let addressed: BTreeSet<String> = ["eth0", "cni0", "link0"].map(String::from).into();
        let chosen = PodInterfaces::Auto.select(&links, &addressed);
        assert_eq!(
            chosen.values().cloned().collect::<Vec<_>>(),
            ["veth1a2b", "cali77", "lxc9"]
        );
    }

    #[test]
    fn prefixes_match_names() {
        let p: PodInterfaces = "vh, cali".parse().unwrap();
        let links = [
            link(1, "vha", false, false),
            link(2, "cali1", false, false),
            link(3, "eth0", false, false),
        ];
        assert_eq!(p.select(&links, &BTreeSet::new()).len(), 2);
        assert_eq!("auto".parse::<PodInterfaces>(), Ok(PodInterfaces::Auto));
        assert!(",".parse::<PodInterfaces>().is_err());
    }
}
