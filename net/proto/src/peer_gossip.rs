//! The wire form of gossip ([`ringkv_cluster::GossipMessage`]), carried in peer frames
//! beside replication messages (`crate::peer_message::PeerFrame::Gossip`) and read in
//! place like them.

use ringkv_cluster::{GossipMessage, MemberAddress, MemberState, MemberStatus, NodeId};

use crate::peer_message::PeerWireError;

/// The archived form of a [`GossipMessage`].
#[derive(rkyv::Archive, rkyv::Serialize, Debug, Clone, PartialEq, Eq)]
pub enum WireGossip {
    Syn { members: Vec<WireMember> },
    Ack { members: Vec<WireMember> },
    Heartbeat { incarnation: u64, heartbeat: u64 },
}

#[derive(rkyv::Archive, rkyv::Serialize, Debug, Clone, PartialEq, Eq)]
pub struct WireMember {
    node: u32,
    incarnation: u64,
    heartbeat: u64,
    /// 0 joining, 1 up, 2 leaving.
    status: u8,
    native: String,
    resp: String,
    shards: u16,
    ring_epoch: u64,
}

impl From<&GossipMessage> for WireGossip {
    fn from(message: &GossipMessage) -> Self {
        let members = |states: &[MemberState]| states.iter().map(WireMember::from).collect();
        match message {
            GossipMessage::Syn { members: states } => WireGossip::Syn {
                members: members(states),
            },
            GossipMessage::Ack { members: states } => WireGossip::Ack {
                members: members(states),
            },
            GossipMessage::Heartbeat {
                incarnation,
                heartbeat,
            } => WireGossip::Heartbeat {
                incarnation: *incarnation,
                heartbeat: *heartbeat,
            },
        }
    }
}

impl From<&MemberState> for WireMember {
    fn from(state: &MemberState) -> Self {
        WireMember {
            node: state.node.0,
            incarnation: state.incarnation,
            heartbeat: state.heartbeat,
            status: match state.status {
                MemberStatus::Joining => 0,
                MemberStatus::Up => 1,
                MemberStatus::Leaving => 2,
            },
            native: state.address.native.clone(),
            resp: state.address.resp.clone(),
            shards: state.address.shards,
            ring_epoch: state.ring_epoch,
        }
    }
}

impl ArchivedWireGossip {
    /// The message this archive means, read in place.
    pub(crate) fn to_message(&self) -> Result<GossipMessage, PeerWireError> {
        let members = |wire: &rkyv::vec::ArchivedVec<ArchivedWireMember>| {
            wire.iter()
                .map(ArchivedWireMember::to_state)
                .collect::<Result<Vec<MemberState>, PeerWireError>>()
        };
        Ok(match self {
            ArchivedWireGossip::Syn { members: wire } => GossipMessage::Syn {
                members: members(wire)?,
            },
            ArchivedWireGossip::Ack { members: wire } => GossipMessage::Ack {
                members: members(wire)?,
            },
            ArchivedWireGossip::Heartbeat {
                incarnation,
                heartbeat,
            } => GossipMessage::Heartbeat {
                incarnation: incarnation.to_native(),
                heartbeat: heartbeat.to_native(),
            },
        })
    }
}

impl ArchivedWireMember {
    fn to_state(&self) -> Result<MemberState, PeerWireError> {
        let status = match self.status {
            0 => MemberStatus::Joining,
            1 => MemberStatus::Up,
            2 => MemberStatus::Leaving,
            value => {
                let what = "member status";
                return Err(PeerWireError::UnknownForwardField { what, value });
            }
        };
        Ok(MemberState {
            node: NodeId(self.node.to_native()),
            incarnation: self.incarnation.to_native(),
            heartbeat: self.heartbeat.to_native(),
            status,
            address: MemberAddress {
                native: self.native.to_string(),
                resp: self.resp.to_string(),
                shards: self.shards.to_native(),
            },
            ring_epoch: self.ring_epoch.to_native(),
        })
    }
}
