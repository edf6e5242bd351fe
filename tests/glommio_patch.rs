//! The patched glommio (`third_party/glommio`, `third_party/README.md`)
//! behaves as upstream where the patch changed its layout: stream
//! timeouts (now boxed and registered when first set), `connect` and
//! `accept` (their socket addresses boxed) and a datagram received through
//! the ring (`recvmsg`, its header boxed); and where the patch changed its
//! behaviour, it does what the patch says (the sleep barrier, a turn that
//! runs at least one task).

use std::future::Future;
use std::io::ErrorKind;
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream, UdpSocket};
use glommio::{LocalExecutorBuilder, Placement};

fn run<F: Future<Output = ()> + 'static>(f: impl FnOnce() -> F + Send + 'static) {
    LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(256 << 10)
        .spawn(move || async move { f().await })
        .expect("executor")
        .join()
        .expect("test body");
}

#[test]
fn timeouts_connect_accept_and_recvmsg_behave_as_upstream() {
    run(|| async {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = glommio::spawn_local(async move { listener.accept().await.unwrap() });
        let mut client = TcpStream::connect(addr).await.unwrap();
        let mut server = accepted.await;

        assert_eq!(server.read_timeout(), None);
        assert!(server.set_read_timeout(Some(Duration::ZERO)).is_err());
        let wait = Duration::from_millis(50);
        server.set_read_timeout(Some(wait)).unwrap();
        assert_eq!(server.read_timeout(), Some(wait));
        let mut buf = [0u8; 8];
        let t = Instant::now();
        let e = server.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
        assert!(t.elapsed() >= wait, "timed out after {:?}", t.elapsed());

        // The stream still works, and a cleared timeout stays cleared.
        client.write_all(b"hi").await.unwrap();
        let n = server.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"hi");
        server.set_read_timeout(None).unwrap();
        assert_eq!(server.read_timeout(), None);
        let reading = glommio::spawn_local(async move {
            let mut buf = [0u8; 8];
            let n = server.read(&mut buf).await.unwrap();
            buf[..n].to_vec()
        });
        glommio::timer::sleep(wait * 2).await;
        client.write_all(b"late").await.unwrap();
        assert_eq!(reading.await, b"late");

        // A receiver already waiting when the datagram comes: the ring's recvmsg.
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let rx_addr = rx.local_addr().unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx_addr = tx.local_addr().unwrap();
        let received = glommio::spawn_local(async move {
            let mut buf = [0u8; 16];
            let (n, from) = rx.recv_from(&mut buf).await.unwrap();
            (buf[..n].to_vec(), from)
        });
        glommio::timer::sleep(Duration::from_millis(10)).await;
        tx.send_to(b"dgram", rx_addr).await.unwrap();
        let (got, from) = received.await;
        assert_eq!(got, b"dgram");
        assert_eq!(from, tx_addr);
    });
}

/// A thread outside the executor wakes a task on it, over and over, while
/// the executor keeps going to sleep between wake-ups: the sleep/wake
/// handshake whose barrier the patch changed (a fence on each side instead
/// of `membarrier` on the sleeping side). A lost wake-up leaves the
/// executor asleep for good (nothing else would wake it), and the test
/// fails on its deadline instead of hanging.
#[test]
fn wakes_from_another_thread_are_never_lost() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

    const ROUNDS: u64 = 20_000;
    let ping = Arc::new(AtomicU64::new(0));
    let pong = Arc::new(AtomicU64::new(0));
    let waker = Arc::new(atomic_waker::AtomicWaker::new());
    let (done_tx, done_rx) = std::sync::mpsc::channel();

    let (p, q, w) = (ping.clone(), pong.clone(), waker.clone());
    std::thread::spawn(move || {
        run(move || async move {
            for i in 1..=ROUNDS {
                std::future::poll_fn(|cx| {
                    w.register(cx.waker());
                    if p.load(SeqCst) >= i {
                        std::task::Poll::Ready(())
                    } else {
                        std::task::Poll::Pending
                    }
                })
                .await;
                q.store(i, SeqCst);
            }
        });
        let _ = done_tx.send(());
    });

    let deadline = Instant::now() + Duration::from_secs(120);
    for i in 1..=ROUNDS {
        ping.store(i, SeqCst);
        waker.wake();
        while pong.load(SeqCst) < i {
            assert!(
                Instant::now() < deadline,
                "round {i}: the executor missed a wake-up (pong {})",
                pong.load(SeqCst)
            );
            std::thread::yield_now();
        }
    }
    done_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("executor finished");
}

/// A preemption timer that expires before the executor gets to its task
/// queues (the thread was descheduled for longer than the timer, or the
/// timer is that short) must not leave a woken task unrun: upstream then
/// found "nothing ran" and put the executor to sleep with the task still
/// queued, until some unrelated event woke it. A shard started on a busy
/// machine hung that way, forever, in the shard mesh's join (no timer and
/// no I/O was pending to wake it). With a timer of a nanosecond every
/// turn is preempted at once; each `run` must still finish.
#[test]
fn an_expired_preemption_timer_never_parks_runnable_work() {
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let ex = LocalExecutorBuilder::new(Placement::Unbound)
            .io_memory(256 << 10)
            .preempt_timer(Duration::from_nanos(1))
            .make()
            .expect("executor");
        for i in 0..1_000u32 {
            let got = ex.run(async move {
                // A task of its own, woken from another, as the mesh's join
                // waits on the tasks that connect its channels.
                glommio::spawn_local(async move { i + 1 }).await
            });
            assert_eq!(got, i + 1);
        }
        let _ = done_tx.send(());
    });
    done_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("every run finished: the executor never slept on runnable work");
}
