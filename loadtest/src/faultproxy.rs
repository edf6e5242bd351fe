//! A TCP proxy between the harness's clients and the gateway that injects
//! client-side faults, for `chaos` and `herd`:
//!
//! - **cut**: both sockets of a link are closed with `SO_LINGER` 0, so the
//!   client and the gateway each get an RST in the middle of whatever they
//!   were sending — a network path that dies, not a polite close;
//! - **pause**: the link stops reading from the gateway for a while, so the
//!   gateway sees a peer that does not read (a zero window behind a small
//!   receive buffer) and, once its queue is full, closes it as a slow
//!   consumer (4003); what the gateway wrote before is forwarded afterwards;
//! - **down**: every link is cut and new connections are held (accepted,
//!   not carried) until the network is up again, when they all go through
//!   at once — a herd.
//!
//! Each client binds its own source address ([`client_ip`]), so the proxy
//! knows which client a link carries; the link to the gateway is bound to
//! the same address, so the gateway's logs and per-address limits see the
//! client's address too. Bytes are copied as they come: TLS passes through.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Notify;
use tokio::time::Instant;

/// The source address of client `i` (127.2.0.10 onwards, 200 per /24): one
/// per client, so the proxy can tell the links apart.
pub fn client_ip(i: usize) -> IpAddr {
    let (hi, lo) = (i / 200, i % 200);
    IpAddr::V4(Ipv4Addr::new(
        127,
        2 + (hi / 256) as u8,
        (hi % 256) as u8,
        10 + lo as u8,
    ))
}

/// The most clients [`client_ip`] has addresses for (127.2.0.0 – 127.9.255.255).
pub const MAX_CLIENTS: usize = 8 * 256 * 200;

/// One carried connection's controls.
struct Link {
    cut: Notify,
    /// Stop reading from the gateway until this instant.
    paused_until: Mutex<Option<Instant>>,
}

struct Inner {
    /// The gateways, tried in turn (the next link starts at the next one).
    upstreams: Vec<SocketAddr>,
    turn: AtomicU64,
    rcvbuf: Option<u32>,
    links: Mutex<HashMap<IpAddr, Arc<Link>>>,
    down: AtomicBool,
    /// Wakes the connections held while down.
    up: Notify,
    /// Links carried since the start.
    accepted: AtomicU64,
    /// Links cut by [`FaultProxy::cut`] or [`FaultProxy::set_down`].
    cuts: AtomicU64,
    /// Connections refused because the gateway did not answer (down, restarting).
    upstream_failures: AtomicU64,
}

/// The proxy; dropping it leaves the accept loop running until the runtime ends.
pub struct FaultProxy {
    addr: SocketAddr,
    inner: Arc<Inner>,
}

impl FaultProxy {
    /// Listens on an ephemeral port of 127.0.0.1 and carries every
    /// connection to `upstream`. `rcvbuf` bounds the receive buffer of the
    /// gateway side (so a paused link fills the gateway's queue quickly).
    pub async fn start(upstream: &str, rcvbuf: Option<u32>) -> Result<FaultProxy> {
        FaultProxy::start_many(&[upstream.to_owned()], rcvbuf).await
    }

    /// As [`FaultProxy::start`], spreading the links over several gateways:
    /// each new link goes to the next one in turn, or to the one after it
    /// when that one does not answer (restarting, drained) — what a load
    /// balancer in front of a fleet does.
    pub async fn start_many(upstreams: &[String], rcvbuf: Option<u32>) -> Result<FaultProxy> {
        let mut addrs = Vec::with_capacity(upstreams.len());
        for upstream in upstreams {
            addrs.push(
                tokio::net::lookup_host(upstream.as_str())
                    .await
                    .with_context(|| format!("resolve gateway address {upstream}"))?
                    .next()
                    .with_context(|| format!("gateway address {upstream}: no address"))?,
            );
        }
        if addrs.is_empty() {
            anyhow::bail!("fault proxy: no gateway address");
        }
        let l = TcpListener::bind("127.0.0.1:0")
            .await
            .context("fault proxy: bind 127.0.0.1:0")?;
        let addr = l.local_addr()?;
        let inner = Arc::new(Inner {
            upstreams: addrs,
            turn: AtomicU64::new(0),
            rcvbuf,
            links: Mutex::new(HashMap::new()),
            down: AtomicBool::new(false),
            up: Notify::new(),
            accepted: AtomicU64::new(0),
            cuts: AtomicU64::new(0),
            upstream_failures: AtomicU64::new(0),
        });
        let i = inner.clone();
        tokio::spawn(async move {
            while let Ok((down, peer)) = l.accept().await {
                let _ = down.set_nodelay(true);
                tokio::spawn(carry(i.clone(), down, peer.ip()));
            }
        });
        Ok(FaultProxy { addr, inner })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Cuts the link of the client at `ip` (RST both ways); false when it has none.
    pub fn cut(&self, ip: IpAddr) -> bool {
        let link = self.lock().get(&ip).cloned();
        match link {
            Some(l) => {
                self.inner.cuts.fetch_add(1, Relaxed);
                l.cut.notify_one();
                true
            }
            None => false,
        }
    }

    /// Stops forwarding what the gateway sends to the client at `ip` for
    /// `d`; false when it has no link.
    pub fn pause(&self, ip: IpAddr, d: Duration) -> bool {
        match self.lock().get(&ip) {
            Some(l) => {
                if let Ok(mut p) = l.paused_until.lock() {
                    *p = Some(Instant::now() + d);
                }
                true
            }
            None => false,
        }
    }

    /// Down: cuts every link and holds new connections; up: carries again
    /// (the held ones first, all at once).
    pub fn set_down(&self, down: bool) {
        self.inner.down.store(down, Relaxed);
        if !down {
            self.inner.up.notify_waiters();
        } else {
            let links: Vec<Arc<Link>> = self.lock().values().cloned().collect();
            for l in links {
                self.inner.cuts.fetch_add(1, Relaxed);
                l.cut.notify_one();
            }
        }
    }

    /// Links carried now.
    pub fn live(&self) -> usize {
        self.lock().len()
    }

    /// (links accepted, links cut, connections refused for want of a gateway).
    pub fn counts(&self) -> (u64, u64, u64) {
        (
            self.inner.accepted.load(Relaxed),
            self.inner.cuts.load(Relaxed),
            self.inner.upstream_failures.load(Relaxed),
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Arc<Link>>> {
        self.inner
            .links
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Closes with RST (no FIN, no TIME_WAIT): what a dead path looks like.
fn reset(s: TcpStream) {
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    drop(s);
}

/// Connects to the next gateway in turn, or the one after it when that
/// one refuses.
async fn connect_upstream(i: &Inner, ip: IpAddr) -> std::io::Result<TcpStream> {
    let n = i.upstreams.len();
    let first = i.turn.fetch_add(1, Relaxed) as usize;
    let mut last = std::io::Error::from(std::io::ErrorKind::NotConnected);
    for k in 0..n {
        match connect_to(i, i.upstreams[(first + k) % n], ip).await {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

async fn connect_to(i: &Inner, upstream: SocketAddr, ip: IpAddr) -> std::io::Result<TcpStream> {
    let s = match upstream {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let Some(n) = i.rcvbuf {
        s.set_recv_buffer_size(n)?;
        // Loopback's MSS is 64 KiB: a receive buffer smaller than one
        // segment never reopens a usable window once it closed (the sender
        // sits in zero-window probes, a few KB/s), which is a stall of the
        // harness, not a slow consumer. Segments well under the buffer keep
        // the window working.
        socket2::SockRef::from(&s).set_tcp_mss(n / 4)?;
    }
    if ip.is_ipv4() == upstream.is_ipv4() {
        s.bind(SocketAddr::new(ip, 0))?;
    }
    let up = tokio::time::timeout(Duration::from_secs(5), s.connect(upstream))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    up.set_nodelay(true)?;
    Ok(up)
}

/// Carries one connection until either side closes or the link is cut.
async fn carry(i: Arc<Inner>, mut down: TcpStream, ip: IpAddr) {
    while i.down.load(Relaxed) {
        let up = i.up.notified();
        tokio::pin!(up);
        up.as_mut().enable();
        if !i.down.load(Relaxed) {
            break;
        }
        up.await;
    }
    let mut up = match connect_upstream(&i, ip).await {
        Ok(u) => u,
        Err(_) => {
            i.upstream_failures.fetch_add(1, Relaxed);
            reset(down);
            return;
        }
    };
    i.accepted.fetch_add(1, Relaxed);
    let link = Arc::new(Link {
        cut: Notify::new(),
        paused_until: Mutex::new(None),
    });
    if let Ok(mut m) = i.links.lock() {
        m.insert(ip, link.clone());
    }
    let cut = {
        let (mut dr, mut dw) = down.split();
        let (mut ur, mut uw) = up.split();
        let to_gateway = async {
            let mut b = vec![0u8; 16 * 1024];
            loop {
                match dr.read(&mut b).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if uw.write_all(&b[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            }
        };
        let to_client = async {
            let mut b = vec![0u8; 16 * 1024];
            loop {
                let until = link.paused_until.lock().ok().and_then(|mut p| p.take());
                if let Some(t) = until {
                    tokio::time::sleep_until(t).await;
                }
                match ur.read(&mut b).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if dw.write_all(&b[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            }
        };
        tokio::select! {
            _ = to_gateway => false,
            _ = to_client => false,
            _ = link.cut.notified() => true,
        }
    };
    if let Ok(mut m) = i.links.lock()
        && m.get(&ip).is_some_and(|l| Arc::ptr_eq(l, &link))
    {
        m.remove(&ip);
    }
    if cut {
        reset(down);
        reset(up);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_addresses_are_distinct_loopback_addresses() {
        let mut seen = std::collections::HashSet::new();
        for i in (0..MAX_CLIENTS).step_by(7).chain([MAX_CLIENTS - 1]) {
            let ip = client_ip(i);
            assert!(ip.is_loopback(), "{ip}");
            assert!(seen.insert(ip), "{ip} twice");
        }
        assert_eq!(client_ip(0).to_string(), "127.2.0.10");
        assert_eq!(client_ip(200).to_string(), "127.2.1.10");
    }
}

#[cfg(test)]
mod io_tests {
    use super::*;

    /// Bytes the client gets in `d` from an upstream that writes 1 KiB every 5 ms.
    async fn read_for(c: &mut TcpStream, d: Duration) -> usize {
        let mut b = vec![0u8; 64 * 1024];
        let mut n = 0;
        let end = Instant::now() + d;
        while let Ok(Ok(k)) = tokio::time::timeout_at(end, c.read(&mut b)).await {
            if k == 0 {
                break;
            }
            n += k;
        }
        n
    }

    #[tokio::test]
    async fn pause_stops_forwarding_and_cut_resets() {
        let up = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let up_addr = up.local_addr().expect("addr");
        tokio::spawn(async move {
            let (mut s, _) = up.accept().await.expect("accept");
            let chunk = vec![7u8; 1024];
            while s.write_all(&chunk).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        let p = FaultProxy::start(&up_addr.to_string(), Some(4096))
            .await
            .expect("proxy");
        let ip = client_ip(0);
        let s = TcpSocket::new_v4().expect("socket");
        s.bind(SocketAddr::new(ip, 0)).expect("bind client");
        let mut c = s.connect(p.addr()).await.expect("connect");
        assert!(read_for(&mut c, Duration::from_millis(300)).await > 10 * 1024);
        assert_eq!(p.live(), 1);
        assert!(p.pause(ip, Duration::from_millis(1500)));
        // One chunk may be in flight; then nothing while paused.
        read_for(&mut c, Duration::from_millis(100)).await;
        let during = read_for(&mut c, Duration::from_millis(1000)).await;
        assert!(during <= 2048, "{during} bytes forwarded while paused");
        // Afterwards what was held comes, then the stream goes on.
        assert!(read_for(&mut c, Duration::from_millis(800)).await > 10 * 1024);
        assert!(p.cut(ip));
        let mut b = [0u8; 1024];
        let mut r = c.read(&mut b).await;
        while matches!(r, Ok(n) if n > 0) {
            r = c.read(&mut b).await;
        }
        assert!(
            matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "{r:?}"
        );
    }
}
