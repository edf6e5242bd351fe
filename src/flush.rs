//! A connection's output waits for the end of its shard's turn.
//!
//! A message fanned out to a room queues one envelope on every member's
//! connection and wakes each connection's task; a woken task writes all
//! its queue holds with one `send`. That `send`, with the TCP work behind
//! it, costs far more than the envelopes it carries (about 6 µs against
//! 0.1 µs per envelope on the benchmark machine: `docs/bench-notes.md`,
//! "Envelopes per write"), so what decides a shard's CPU per delivery at
//! high load is how many envelopes each send carries.
//!
//! Woken at once, a task runs in the same pass of the executor as the
//! publishes that woke it, and sends before the input of the next poll of
//! the ring (more publishes, from any connection or shard) is read. So the
//! wake-up of a connection that has output is not handed to the executor
//! at once: [`wake`] puts it in this shard's list, and the shard's
//! [`run`] task wakes the whole list after the executor's next poll of its
//! ring. Whatever that poll brings is fanned out into the same queues
//! first and leaves in the same sends. No time is waited beyond that poll:
//! an idle shard polls again at once.
//!
//! The list is per thread, because a shard is one thread (and one
//! executor), and the callers of [`Conn::wake`](crate::conn::Conn::wake)
//! (replies, the router, the heartbeat) do not all have the shard at hand.
//! On a thread where no [`run`] task is running (unit tests, benchmarks),
//! [`wake`] wakes at once.

use std::cell::RefCell;
use std::future::poll_fn;
use std::task::{Poll, Waker};
use std::time::Duration;

thread_local! {
    /// Wake-ups held until the next poll of the ring.
    static HELD: RefCell<Vec<Waker>> = const { RefCell::new(Vec::new()) };
    /// The [`run`] task of this thread's shard, while it runs (set at its
    /// first poll, cleared when it is dropped).
    static FLUSHER: RefCell<Option<Waker>> = const { RefCell::new(None) };
}

/// The list's capacity kept between turns; a larger one (after a fan-out
/// to very many connections) is given back once the turns are small again.
const KEEP: usize = 1024;

/// Wakes a connection's task after the executor's next poll of its ring
/// (at once where no [`run`] task is running on this thread).
pub fn wake(w: &Waker) {
    FLUSHER.with(|f| match f.borrow().as_ref() {
        None => w.wake_by_ref(),
        Some(flusher) => {
            let first = HELD.with(|h| {
                let mut h = h.borrow_mut();
                h.push(w.clone());
                h.len() == 1
            });
            if first {
                flusher.wake_by_ref();
            }
        }
    });
}

/// The shard's flusher: whenever wake-ups are held, waits for the next poll
/// of the ring, then wakes them all. Runs until the shard's executor ends.
pub async fn run() {
    let _running = Running;
    let mut batch: Vec<Waker> = Vec::new();
    loop {
        poll_fn(|cx| {
            if HELD.with(|h| h.borrow().is_empty()) {
                FLUSHER.with(|f| {
                    let mut f = f.borrow_mut();
                    if !f.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                        *f = Some(cx.waker().clone());
                    }
                });
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
        // A timer due in a microsecond is seen when the reactor next polls
        // the ring: the task comes back after that poll, with the tasks the
        // poll woke ahead of the connections it wakes. (Should the thread
        // be held up for longer between here and the timer's first poll,
        // the timer is ready at once: a send goes out one poll early.)
        glommio::timer::sleep(Duration::from_micros(1)).await;
        HELD.with(|h| std::mem::swap(&mut *h.borrow_mut(), &mut batch));
        let n = batch.len();
        for w in batch.drain(..) {
            w.wake();
        }
        if batch.capacity() > KEEP.max(4 * n) {
            batch.shrink_to(KEEP);
        }
    }
}

/// Clears the thread's state when the flusher's task is dropped (its
/// executor ends), so that later wake-ups on the thread are not held for
/// a flusher that is gone. The held ones are dropped, not woken: their
/// tasks go with the same executor.
struct Running;

impl Drop for Running {
    fn drop(&mut self) {
        drop(FLUSHER.with(|f| f.borrow_mut().take()));
        drop(HELD.with(|h| std::mem::take(&mut *h.borrow_mut())));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    use std::task::{Wake, Waker};
    use std::time::Duration;

    /// A waker that records that it was woken.
    struct Flag(AtomicBool);

    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, SeqCst);
        }
    }

    /// Asks [`super::wake`] for a wake-up from a task, and reports whether
    /// it was given at once, whether it was held, and whether it was given
    /// within a few milliseconds of the executor's time.
    fn wake_through_flush(with_flusher: bool) -> (bool, bool, bool) {
        glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .spawn(move || async move {
                if with_flusher {
                    glommio::spawn_local(super::run()).detach();
                    // Let the flusher start.
                    glommio::timer::sleep(Duration::from_millis(1)).await;
                }
                let flag = Arc::new(Flag(AtomicBool::new(false)));
                let waker = Waker::from(flag.clone());
                super::wake(&waker);
                // Nothing else runs while this task does: what `wake` did is
                // seen as it left it.
                let at_once = flag.0.load(SeqCst);
                let held = super::HELD.with(|h| h.borrow().len()) == 1;
                for _ in 0..100 {
                    if flag.0.load(SeqCst) {
                        break;
                    }
                    glommio::timer::sleep(Duration::from_millis(1)).await;
                }
                (at_once, held, flag.0.load(SeqCst))
            })
            .expect("executor")
            .join()
            .expect("join")
    }

    #[test]
    fn a_held_wake_up_is_given_after_the_next_poll() {
        let (at_once, held, given) = wake_through_flush(true);
        assert!(!at_once, "with a flusher the wake-up is not given at once");
        assert!(held, "the wake-up waits in the list");
        assert!(given, "the flusher gives it");
    }

    #[test]
    fn without_a_flusher_a_wake_up_is_given_at_once() {
        let (at_once, held, given) = wake_through_flush(false);
        assert!(at_once, "no flusher: given at once");
        assert!(!held, "nothing is held without a flusher");
        assert!(given);
    }
}
