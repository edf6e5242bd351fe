//! edgegate patch: the queue that carries the endpoint's events to one
//! connection (incoming packets, close, rebind).
//!
//! Upstream uses a tokio unbounded channel, whose shared state and first
//! block of 32 slots are about 800 bytes per connection, queued events or
//! not. A connection has one producer (the endpoint) and one consumer (its
//! driver), and the queue is nearly always empty: a `VecDeque` and a waker
//! behind a mutex do the same in 80 bytes, and the queue's buffer is
//! released whenever the driver finds it empty.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll, Waker},
};

/// A queue with one sending and one receiving end.
pub(crate) fn channel<T>() -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Mutex::new(State {
        queue: VecDeque::new(),
        waker: None,
        sender: true,
        receiver: true,
    }));
    (Sender(shared.clone()), Receiver(shared))
}

struct State<T> {
    queue: VecDeque<T>,
    /// The receiver's, while it waits for an event.
    waker: Option<Waker>,
    /// Whether each end is still there.
    sender: bool,
    receiver: bool,
}

fn lock<T>(m: &Mutex<State<T>>) -> MutexGuard<'_, State<T>> {
    // Nothing here panics while holding the lock; a poisoned lock's state is
    // still consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The sending end (the endpoint's).
pub(crate) struct Sender<T>(Arc<Mutex<State<T>>>);

impl<T> std::fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender").finish_non_exhaustive()
    }
}

impl<T> Sender<T> {
    /// Queues `value` and wakes the receiver; gives `value` back when the
    /// receiver is gone.
    pub(crate) fn send(&self, value: T) -> Result<(), T> {
        let waker = {
            let mut s = lock(&self.0);
            if !s.receiver {
                return Err(value);
            }
            s.queue.push_back(value);
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let waker = {
            let mut s = lock(&self.0);
            s.sender = false;
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// The receiving end (the connection driver's).
pub(crate) struct Receiver<T>(Arc<Mutex<State<T>>>);

impl<T> std::fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver").finish_non_exhaustive()
    }
}

impl<T> Receiver<T> {
    /// The next event; `Ready(None)` once the queue is empty and the sender
    /// gone.
    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut s = lock(&self.0);
        if let Some(v) = s.queue.pop_front() {
            return Poll::Ready(Some(v));
        }
        if !s.sender {
            return Poll::Ready(None);
        }
        if s.queue.capacity() != 0 {
            s.queue = VecDeque::new();
        }
        match &mut s.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            w => *w = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let queued = {
            let mut s = lock(&self.0);
            s.receiver = false;
            s.waker = None;
            std::mem::take(&mut s.queue)
        };
        drop(queued); // outside the lock
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn order_wakeups_and_ends() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let (tx, mut rx) = channel();
        assert!(rx.poll_recv(&mut cx).is_pending());
        tx.send(1).unwrap();
        tx.send(2).unwrap();
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "woken once, on the first");
        assert_eq!(rx.poll_recv(&mut cx), Poll::Ready(Some(1)));
        assert_eq!(rx.poll_recv(&mut cx), Poll::Ready(Some(2)));
        assert!(rx.poll_recv(&mut cx).is_pending());
        drop(tx);
        assert_eq!(count.0.load(Ordering::SeqCst), 2, "woken when the sender goes");
        assert_eq!(rx.poll_recv(&mut cx), Poll::Ready(None));
        let (tx, rx) = channel();
        drop(rx);
        assert_eq!(tx.send(3), Err(3));
    }
}
