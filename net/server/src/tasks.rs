//! Detached tasks that a stopping shard waits for.
//!
//! When a glommio executor exits it drops the tasks still alive, unfinished. A task
//! dropped with I/O in flight leaves the operation in the kernel: glommio only queues
//! its cancellation, which nobody submits any more, then exits the rings and frees the
//! buffers those operations read into. The kernel can still complete such a read into
//! heap memory that has been handed out again. (The "unaligned tcache chunk" aborts
//! first blamed on this were a race on glommio's MeshBuilder; see `ShardMeshes` in
//! runtime.rs.) Files dropped that late are
//! never closed either, since glommio closes them on its next trip to the kernel. So
//! every task that may hold a socket, a file or I/O in flight is spawned through a
//! group, and a stopping shard waits until the group is empty.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::rc::Rc;
use std::task::{Poll, Waker};

/// Tasks counted while they run; `ended` waits until none is left.
#[derive(Clone, Default)]
pub struct TaskGroup(Rc<Inner>);

#[derive(Default)]
struct Inner {
    live: Cell<usize>,
    /// Who waits in `ended`, woken when the last task ends.
    waiting: RefCell<Vec<Waker>>,
}

/// Held by each task of the group; counts it out however it ends (or is dropped).
struct Member(Rc<Inner>);

impl Drop for Member {
    fn drop(&mut self) {
        let live = self.0.live.get() - 1;
        self.0.live.set(live);
        if live == 0 {
            for waker in std::mem::take(&mut *self.0.waiting.borrow_mut()) {
                waker.wake();
            }
        }
    }
}

impl TaskGroup {
    pub fn new() -> TaskGroup {
        TaskGroup::default()
    }

    /// Runs `work` as a task of this group on the current executor.
    pub fn spawn(&self, work: impl Future<Output = ()> + 'static) {
        self.0.live.set(self.0.live.get() + 1);
        let member = Member(self.0.clone());
        glommio::spawn_local(async move {
            let _member = member;
            work.await;
        })
        .detach();
    }

    /// Waits until no task of this group is running (at once if none is).
    pub async fn ended(&self) {
        std::future::poll_fn(|cx| {
            if self.0.live.get() == 0 {
                Poll::Ready(())
            } else {
                self.0.waiting.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}
