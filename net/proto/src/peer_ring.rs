//! The wire form of a ring view ([`ringkv_cluster::RingView`]), which ring keepers push
//! to each other (`crate::peer_message::PeerFrame::Ring`). It carries the ring in
//! force (members, owners, epoch), the change in progress and the partitions still to
//! move; the next ring is recomputed from the change on arrival, never taken from the
//! wire, and every part is checked ([`ringkv_cluster::Ring::from_parts`]).

use ringkv_cluster::{Member, NodeId, Ring, RingChange, RingView, ZoneId};

use crate::peer_message::PeerWireError;

/// The archived form of a [`RingView`].
#[derive(rkyv::Archive, rkyv::Serialize, Debug, Clone, PartialEq, Eq)]
pub struct WireView {
    replicas: u8,
    epoch: u64,
    members: Vec<WireMember>,
    owners: Vec<u32>,
    change: Option<WireChange>,
    pending: Vec<u32>,
}

#[derive(rkyv::Archive, rkyv::Serialize, Debug, Clone, PartialEq, Eq)]
pub struct WireMember {
    node: u32,
    zone: Option<u32>,
}

#[derive(rkyv::Archive, rkyv::Serialize, Debug, Clone, PartialEq, Eq)]
pub enum WireChange {
    Join { member: WireMember },
    Leave { node: u32 },
    Replace { dead: u32, member: WireMember },
}

impl From<&Member> for WireMember {
    fn from(member: &Member) -> Self {
        WireMember {
            node: member.node.0,
            zone: member.zone.map(|z| z.0),
        }
    }
}

impl From<&RingView> for WireView {
    fn from(view: &RingView) -> Self {
        let ring = view.ring();
        WireView {
            // N is at most `Quorum::N_MAX` (16).
            replicas: view.replicas() as u8,
            epoch: ring.epoch(),
            members: ring.members().map(WireMember::from).collect(),
            owners: ring.owners().iter().map(|o| o.0).collect(),
            change: view.change().map(|change| match change {
                RingChange::Join(member) => WireChange::Join {
                    member: WireMember::from(&member),
                },
                RingChange::Leave(node) => WireChange::Leave { node: node.0 },
                RingChange::Replace { dead, with } => WireChange::Replace {
                    dead: dead.0,
                    member: WireMember::from(&with),
                },
            }),
            pending: view.pending().map(|p| p.0).collect(),
        }
    }
}

fn member(wire: &ArchivedWireMember) -> Member {
    let node = NodeId(wire.node.to_native());
    match wire.zone.as_ref() {
        Some(zone) => Member::in_zone(node, ZoneId(zone.to_native())),
        None => Member::new(node),
    }
}

impl ArchivedWireView {
    /// The view this archive describes, checked.
    pub fn to_view(&self) -> Result<RingView, PeerWireError> {
        let invalid = |e: &dyn std::fmt::Display| PeerWireError::Ring(e.to_string());
        let members: Vec<Member> = self.members.iter().map(member).collect();
        let owners = self.owners.iter().map(|o| NodeId(o.to_native())).collect();
        let ring =
            Ring::from_parts(&members, owners, self.epoch.to_native()).map_err(|e| invalid(&e))?;
        let change = self.change.as_ref().map(|change| match change {
            ArchivedWireChange::Join { member: m } => RingChange::Join(member(m)),
            ArchivedWireChange::Leave { node } => RingChange::Leave(NodeId(node.to_native())),
            ArchivedWireChange::Replace { dead, member: m } => RingChange::Replace {
                dead: NodeId(dead.to_native()),
                with: member(m),
            },
        });
        let pending: Vec<u32> = self.pending.iter().map(|p| p.to_native()).collect();
        let replicas = usize::from(self.replicas);
        RingView::from_parts(ring, replicas, change, &pending).map_err(|e| invalid(&e))
    }
}

#[cfg(test)]
impl WireView {
    /// The view with partition 0 owned by a node that is no member.
    pub(crate) fn stranger_owner(mut self) -> WireView {
        self.owners[0] = u32::MAX >> 1;
        self
    }

    /// The view with a change that joins `node`.
    pub(crate) fn joining_member(mut self, node: u32) -> WireView {
        self.change = Some(WireChange::Join {
            member: WireMember { node, zone: None },
        });
        self
    }
}
