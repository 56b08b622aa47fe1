//! Network partitions between processes on one machine, on loopback (as root; see
//! docs/testing.md): each node runs as its own unix user, an nftables table marks
//! every new connection with the uid of the socket that opened it, and a cut drops
//! every packet of a connection opened by one side towards the other side's ports
//! (both directions of established connections included). Clients, running as root,
//! reach every node throughout.

use std::process::{Command, Stdio};

use super::Cluster;

/// The unix user node `id` runs as: created once (a system user without a home or a
/// shell), reused by later runs. Returns (uid, gid).
pub fn node_user(id: usize) -> (u32, u32) {
    let name = format!("ringkv-node-{id}");
    let exists = Command::new("id")
        .arg("-u")
        .arg(&name)
        .output()
        .expect("id");
    if !exists.status.success() {
        let status = Command::new("useradd")
            .args(["-r", "-M", "-s", "/usr/sbin/nologin", "-U", &name])
            .status()
            .expect("useradd runs (the partition tests need root)");
        // 9: created meanwhile by a parallel run.
        assert!(
            status.success() || status.code() == Some(9),
            "useradd {name}"
        );
    }
    let number = |flag: &str| -> u32 {
        let out = Command::new("id")
            .arg(flag)
            .arg(&name)
            .output()
            .expect("id");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("a numeric id")
    };
    (number("-u"), number("-g"))
}

/// An nftables table of this test process: the connection marking, and the cuts.
pub struct Partitioner {
    table: String,
    /// Each node's (uid, gid) and its ports, by node id - 1.
    users: Vec<(u32, u32)>,
    ports: Vec<std::ops::Range<u16>>,
}

impl Partitioner {
    /// Loads the marking table; call before the nodes start, so every connection
    /// between them is marked when it opens.
    pub fn new(users: &[(u32, u32)]) -> Partitioner {
        let table = format!("ringkv_test_{}", std::process::id());
        let marks: Vec<String> = users
            .iter()
            .enumerate()
            .map(|(i, (uid, _))| format!("{uid} : {}", i + 1))
            .collect();
        nft(&format!(
            "add table inet {table}\n\
             add chain inet {table} marking {{ type filter hook output priority -150; }}\n\
             add rule inet {table} marking ct state new ct mark set meta skuid map {{ {} }}\n\
             add chain inet {table} cuts {{ type filter hook output priority 0; }}\n",
            marks.join(", ")
        ));
        Partitioner {
            table,
            users: users.to_vec(),
            ports: Vec::new(),
        }
    }

    /// Learns the nodes' ports once the cluster exists.
    pub fn attach(&mut self, cluster: &Cluster) {
        self.ports = (1..=cluster.size()).map(|id| cluster.ports(id)).collect();
    }

    /// Cuts `side` (node ids) from every other node, both ways.
    pub fn cut(&self, side: &[usize]) {
        let other: Vec<usize> = (1..=self.users.len())
            .filter(|id| !side.contains(id))
            .collect();
        let marks = |ids: &[usize]| {
            ids.iter()
                .map(|id| id.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let ports = |ids: &[usize]| {
            ids.iter()
                .map(|id| {
                    let range = &self.ports[id - 1];
                    format!("{}-{}", range.start, range.end - 1)
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let table = &self.table;
        nft(&format!(
            "add rule inet {table} cuts meta l4proto tcp ct mark {{ {} }} ct original proto-dst {{ {} }} drop\n\
             add rule inet {table} cuts meta l4proto tcp ct mark {{ {} }} ct original proto-dst {{ {} }} drop\n",
            marks(side),
            ports(&other),
            marks(&other),
            ports(side)
        ));
    }

    /// Removes every cut.
    pub fn heal(&self) {
        nft(&format!("flush chain inet {} cuts\n", self.table));
    }

    /// Whether node `from`'s user can open a TCP connection to node `to`'s native
    /// port right now (a probe through the same marking the nodes get).
    pub fn can_connect(&self, from: usize, to: usize) -> bool {
        let port = self.ports[to - 1].start;
        let (uid, gid) = self.users[from - 1];
        let probe = format!("exec 3<>/dev/tcp/127.0.0.1/{port}");
        let status = Command::new("setpriv")
            .args([
                "--reuid",
                &uid.to_string(),
                "--regid",
                &gid.to_string(),
                "--clear-groups",
            ])
            .args(["timeout", "2", "bash", "-c", &probe])
            .stderr(Stdio::null())
            .status()
            .expect("setpriv runs");
        status.success()
    }
}

impl Drop for Partitioner {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &self.table])
            .status();
    }
}

fn nft(script: &str) {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("nft runs (apt-get install nftables; the partition tests need root)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "nft -f failed on:\n{script}");
}
