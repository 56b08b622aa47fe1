//! `ringkv admin`: membership changes asked of a running member (see
//! `ringkv_server::ring_change`). A node joins with `ringkv server --join`.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use ringkv_proto::RingChangeRequest;
use ringkv_server::ring_change::{self, Answer, describe};

#[derive(Subcommand)]
pub enum AdminCommand {
    /// The node at --addr hands its partitions off to the others and leaves the ring;
    /// stop it once this says it left (with --wait) or `ringkv status` shows it gone.
    Leave(LeaveArgs),
    /// A new node takes over every partition of a dead one (gone for good): asked of
    /// the member at --addr; then start the new node with `ringkv server --join`.
    Replace(ReplaceArgs),
    /// The ring view of the node at --addr.
    Ring(RingArgs),
}

#[derive(Args)]
pub struct LeaveArgs {
    /// The leaving node's native address.
    #[arg(long, default_value = "127.0.0.1:7500")]
    addr: String,
    /// Wait until the node has handed every partition off (at most this many seconds).
    #[arg(long)]
    wait: Option<u64>,
}

#[derive(Args)]
pub struct ReplaceArgs {
    /// The dead node's id.
    dead: u32,
    /// The new node, as id@host:port (its native address).
    #[arg(long)]
    with: String,
    /// A running member's native address.
    #[arg(long, default_value = "127.0.0.1:7500")]
    addr: String,
}

#[derive(Args)]
pub struct RingArgs {
    #[arg(long, default_value = "127.0.0.1:7500")]
    addr: String,
}

const ASK_WAIT: Duration = Duration::from_secs(5);

pub fn run(command: AdminCommand) -> anyhow::Result<()> {
    match command {
        AdminCommand::Leave(args) => leave(args),
        AdminCommand::Replace(args) => replace(args),
        AdminCommand::Ring(args) => {
            print_view(&ring_change::view(&args.addr, ASK_WAIT)?);
            Ok(())
        }
    }
}

fn leave(args: LeaveArgs) -> anyhow::Result<()> {
    let node_id = ring_change::view(&args.addr, ASK_WAIT)?.node_id;
    let answer = ring_change::change(&args.addr, RingChangeRequest::Leave { node_id }, ASK_WAIT)?;
    print_view(&answer);
    let Some(seconds) = args.wait else {
        return Ok(());
    };
    let deadline = Instant::now() + Duration::from_secs(seconds);
    loop {
        let answer = ring_change::view(&args.addr, ASK_WAIT)?;
        let view = &answer.view;
        if view.is_stable() && !view.is_member(ringkv_cluster::NodeId(node_id)) {
            println!(
                "node {node_id} left the ring (epoch {}): stop it now",
                view.epoch()
            );
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "node {node_id} has not left after {seconds} s: {} partition(s) still to move",
                view.pending().count()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn replace(args: ReplaceArgs) -> anyhow::Result<()> {
    let (id, native) = (args.with.split_once('@'))
        .and_then(|(id, addr)| Some((id.parse::<u32>().ok()?, addr.to_owned())))
        .with_context(|| format!("--with '{}' is not id@host:port", args.with))?;
    let partitions = ring_change::view(&args.addr, ASK_WAIT)?
        .view
        .ring()
        .partition_count();
    let request = RingChangeRequest::Replace {
        dead: args.dead,
        node_id: id,
        native: native.clone(),
        partitions,
    };
    print_view(&ring_change::change(&args.addr, request, ASK_WAIT)?);
    println!(
        "now start node {id}: ringkv server --node-id {id} --listen {native} --partitions {partitions} --join {} --replace {}",
        args.addr, args.dead
    );
    Ok(())
}

fn print_view(answer: &Answer) {
    let view = &answer.view;
    let members: Vec<u32> = view.ring().members().map(|m| m.node.0).collect();
    println!(
        "node {}: ring epoch {}, members {members:?}, {}",
        answer.node_id,
        view.epoch(),
        match view.change() {
            Some(change) => format!(
                "{} in progress, {} partition(s) to move",
                describe(&change),
                view.pending().count()
            ),
            None => "no change in progress".into(),
        }
    );
}
