//! Starting and stopping a node: resolve limits, check that no other
//! process serves our ports, start one pinned shard per CPU, the admin
//! thread and the signal thread; on SIGTERM/SIGINT drain and exit.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::time::Duration;

use glommio::channels::channel_mesh::MeshBuilder;
use glommio::net::TcpListener;
use glommio::{LocalExecutorBuilder, Placement};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use std::rc::Rc;
use tracing::{error, info, warn};

use crate::admission::Admission;
use crate::backbone::Backbone;
use crate::backbone::embedded::{Embedded, MESH_CHANNEL, Mesh, MeshMsg};
use crate::backbone::history::HistoryStore;
use crate::backbone::nats::NatsBackbone;
use crate::config::Config;
use crate::listener::accept_loop;
use crate::metrics::{ShardMetrics, Transport};
use crate::node::Node;
use crate::settings::ShardConfig;
use crate::shard::Shard;

/// File descriptors kept for everything that is not a client connection
/// (listeners, io_uring, logs, admin, backbone, /proc reads).
const FD_RESERVE: usize = 256;
/// The longest a shard runs tasks without polling its ring (glommio's
/// preemption timer).
const PREEMPT: Duration = Duration::from_millis(2);

/// A start-up failure, with what to fix.
#[derive(Debug)]
pub struct StartError(pub String);

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}

/// Raises the soft open-files limit to the hard one (allowed without
/// privileges) and returns it.
fn open_files_limit() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write/read only the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    usize::try_from(lim.rlim_cur)
        .unwrap_or(usize::MAX)
        .min(1 << 30)
}

/// The connection limit: the configured one, or 90 % of what the open-files
/// limit leaves after the reserve; never more than the descriptors allow.
pub fn connection_limits(configured: usize, nofile: usize) -> Result<(usize, usize), StartError> {
    let usable = nofile.saturating_sub(FD_RESERVE);
    if usable < 16 {
        return Err(StartError(format!(
            "the open-files limit (RLIMIT_NOFILE = {nofile}) leaves no room for connections; raise it (LimitNOFILE= in the systemd unit)"
        )));
    }
    let auto = usable * 9 / 10;
    let max = if configured == 0 { auto } else { configured };
    if max > usable {
        return Err(StartError(format!(
            "limits.max_connections = {configured} is more than the open-files limit allows (RLIMIT_NOFILE = {nofile}, {FD_RESERVE} kept in reserve): at most {usable}"
        )));
    }
    // Sockets told 4007 hold a descriptor for a moment: bound them by what is left.
    let refusing = (usable - max).clamp(1, 1024);
    Ok((max, refusing))
}

/// Fails when another process already serves `addr`: glommio binds with
/// SO_REUSEPORT, so a stale process would silently take part of the load.
/// A connect, not a bind: sockets of a previous run left in TIME_WAIT make a
/// plain bind fail, though nobody serves the port (a restart right after a
/// crash must work). A program listening without SO_REUSEPORT makes the
/// shards' bind fail, with its own error.
fn probe(key: &str, addr: SocketAddr) -> Result<(), StartError> {
    let mut target = addr;
    if target.ip().is_unspecified() {
        target.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    if target.port() == 0 {
        return Ok(());
    }
    // A process killed a moment ago still answers for a few milliseconds
    // while the kernel tears its sockets down: only an address that keeps
    // answering for about half a second is taken.
    for attempt in 0..5 {
        if std::net::TcpStream::connect_timeout(&target, Duration::from_millis(300)).is_err() {
            return Ok(());
        }
        if attempt < 4 {
            std::thread::sleep(Duration::from_millis(120));
        }
    }
    Err(StartError(format!(
        "{key} = {addr}: another process already serves this address (a stale edgegate?); stop it first"
    )))
}

fn node_id(cfg: &Config) -> String {
    if !cfg.backbone.node_id.is_empty() {
        return cfg.backbone.node_id.clone();
    }
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let name = if ok {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    };
    if name.is_empty() {
        "edgegate".into()
    } else {
        name
    }
}

/// Which CPUs the shards run on.
fn shard_cpus(cfg: &Config) -> Result<Vec<usize>, StartError> {
    let online: Vec<usize> = match glommio::CpuSet::online() {
        Ok(set) => {
            let mut v: Vec<usize> = set.iter().map(|l| l.cpu).collect();
            v.sort_unstable();
            v
        }
        Err(_) => (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect(),
    };
    if !cfg.shards.cpus.is_empty() {
        for c in &cfg.shards.cpus {
            if !online.contains(c) {
                return Err(StartError(format!(
                    "shards.cpus names CPU {c}, which is not online (online: {online:?})"
                )));
            }
        }
        let n = if cfg.shards.count == 0 {
            cfg.shards.cpus.len()
        } else {
            cfg.shards.count
        };
        return Ok((0..n)
            .map(|i| cfg.shards.cpus[i % cfg.shards.cpus.len()])
            .collect());
    }
    let n = if cfg.shards.count == 0 {
        online.len().max(1)
    } else {
        cfg.shards.count
    };
    Ok((0..n).map(|i| online[i % online.len()]).collect())
}

/// SIGHUP: re-reads what can change without a restart (the TLS
/// certificate and key, for now). A file that fails its checks is refused
/// with a log line naming it; the certificate in use stays.
fn reload(tls: Option<&crate::tls::CertStore>, node: &Node) {
    let Some(store) = tls else {
        info!("SIGHUP: nothing to reload (no [tls] certificate configured)");
        return;
    };
    match store.reload() {
        Ok(()) => {
            store.export_expiry(&node.credentials);
            info!(
                cert_chain = %store.paths().cert_chain.display(),
                key = %store.paths().key.display(),
                "SIGHUP: TLS certificate reloaded; new handshakes use it"
            )
        }
        Err(e) => {
            error!(error = %e, "SIGHUP: TLS certificate reload refused; still serving the previous certificate")
        }
    }
}

/// Runs the node until SIGTERM/SIGINT, then drains. Returns once every
/// shard has finished.
pub fn run(cfg: Config) -> Result<(), StartError> {
    let nofile = open_files_limit();
    let (max_connections, max_refusing) = connection_limits(cfg.limits.max_connections, nofile)?;
    let cpus = shard_cpus(&cfg)?;
    let n = cpus.len();

    let mut listens: Vec<(&str, SocketAddr, Transport)> = Vec::new();
    if let Some(a) = cfg.ws.listen {
        listens.push(("ws.listen", a, Transport::Ws));
    }
    if let Some(a) = cfg.tcp.listen {
        listens.push(("tcp.listen", a, Transport::Tcp));
    }
    for (key, addr, _) in &listens {
        probe(key, *addr)?;
    }
    let admin = match cfg.admin.listen {
        Some(a) => Some(std::net::TcpListener::bind(a).map_err(|e| {
            StartError(format!(
                "admin.listen = {a}: cannot listen ({e}); is another process serving it?"
            ))
        })?),
        None => None,
    };

    let api_listener = match cfg.api.listen {
        Some(a) => Some(std::net::TcpListener::bind(a).map_err(|e| {
            StartError(format!(
                "api.listen = {a}: cannot listen ({e}); is another process serving it?"
            ))
        })?),
        None => None,
    };

    let node_name = node_id(&cfg);
    let metrics: Vec<Arc<ShardMetrics>> =
        (0..n).map(|_| Arc::new(ShardMetrics::default())).collect();
    // The services thread's counters and webhook queue exist before the
    // backbone, which emits lifecycle events into them.
    let mut prepared = crate::api::wanted(&cfg).then(|| crate::api::prepare(&cfg));
    let bus = prepared.as_ref().map(|p| p.bus.clone()).unwrap_or_default();
    // The NATS backbone thread starts before the shards: they get their
    // links at birth. It connects (and reconnects) in the background; the
    // node is not ready until it is connected.
    let nats = cfg.backbone.kind == crate::config::BackboneKind::Nats;
    let (mut nats_links, nats_state, cluster) = if nats {
        let (links, state, cluster) = crate::backbone::nats::start(
            &cfg.backbone.nats,
            &cfg.backbone.subject_prefix,
            &node_name,
            metrics.clone(),
            cfg.history.recovery_limit,
            &cfg.presence,
            bus.clone(),
        )
        .map_err(StartError)?;
        if let Some(p) = prepared.as_mut() {
            // Events emitted elsewhere go out on P.events.* too.
            p.bus = p.bus.with_publisher(cluster.publisher());
        }
        (
            links.into_iter().map(Some).collect::<Vec<_>>(),
            Some(state),
            Some(cluster),
        )
    } else {
        ((0..n).map(|_| None).collect(), None, None)
    };
    // Embedded: the node's per-user connection counts live on the services
    // thread (user.* events, info's users); NATS keeps its own.
    let (users_tx, users_rx) = if !nats && (cfg.api.listen.is_some() || cfg.webhooks.url.is_some())
    {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    // Embedded: the owner shard of a room emits its events (to webhooks).
    let room_events = (!nats && cfg.webhooks.url.is_some()).then(|| bus.clone());
    let services_stats = prepared.as_ref().map(|p| p.stats.clone());
    let mut api_links: Vec<Option<crate::api::ShardLink>> = match prepared {
        Some(p) => {
            let start = crate::api::Start {
                node: node_name.clone(),
                metrics: metrics.clone(),
                listener: api_listener,
                cluster,
                users: users_rx,
            };
            crate::api::start(&cfg, p, start)
                .map_err(|e| StartError(format!("cannot start the services thread: {e}")))?
                .into_iter()
                .map(Some)
                .collect()
        }
        None => (0..n).map(|_| None).collect(),
    };
    let node = Arc::new(Node {
        backbone: nats_state,
        open: AtomicUsize::new(0),
        max_connections,
        refusing: AtomicUsize::new(0),
        max_refusing,
        shutdown: AtomicBool::new(false),
        shards_ready: AtomicUsize::new(0),
        shards_done: AtomicUsize::new(0),
        shards_stopped: AtomicUsize::new(0),
        metrics,
        services: services_stats,
        admin_token: cfg.admin.token.clone(),
        credentials: Default::default(),
        // Bounded and small: the admin thread asks one shard at a time.
        admin_queues: (0..n).map(|_| crossbeam_channel::bounded(4)).collect(),
        posts: (0..n).map(|_| crate::sse::PostLane::default()).collect(),
    });
    let mut scfg = ShardConfig::from_config(&cfg, n, node_name.clone());
    if scfg.sse_path.is_some() {
        // One key for the node: any shard can tell its tokens.
        scfg.sse_key = Some(Arc::new(
            crate::sse::SessionKey::random().map_err(StartError)?,
        ));
    }
    if cfg.auth.mode == crate::config::AuthMode::Jwt {
        // Read and parse the key now: a bad file must stop the start, not
        // the first client.
        let verifier = crate::auth::Verifier::start(&cfg.auth, node.credentials.jwks.clone())
            .map_err(StartError)?;
        scfg.auth = Some(Arc::new(verifier));
    }
    // TLS: read and check the certificate now (a bad file stops the start,
    // naming it); one store for the node, reloaded on SIGHUP.
    let tls_store = match crate::tls::CertPaths::from_config(&cfg.tls) {
        Some(paths) => Some(crate::tls::CertStore::load(paths).map_err(|e| StartError(e.0))?),
        None => None,
    };
    if let Some(store) = &tls_store {
        store.export_expiry(&node.credentials);
        use crate::tls::{ALPN_HTTP11, TlsAcceptorHandle};
        if cfg.ws.tls {
            scfg.tls_ws =
                Some(TlsAcceptorHandle::new(store, &[ALPN_HTTP11]).map_err(|e| StartError(e.0))?);
        }
        if cfg.tcp.tls {
            scfg.tls_tcp = Some(TlsAcceptorHandle::new(store, &[]).map_err(|e| StartError(e.0))?);
        }
    }
    // QUIC: its own rustls config (TLS 1.3, ALPN edgegate/1) over the same
    // store, so a reload reaches QUIC too; each shard binds its endpoint below.
    let quic = match cfg.quic.listen {
        Some(addr) => Some(
            crate::transport::quic::setup(addr, tls_store.as_ref(), &scfg).map_err(StartError)?,
        ),
        None => None,
    };
    info!(
        node = %node_name, shards = n, ?cpus, max_connections, open_files = nofile,
        ws = ?cfg.ws.listen, tcp = ?cfg.tcp.listen, quic = ?cfg.quic.listen, admin = ?cfg.admin.listen,
        "edgegate starting"
    );
    if matches!(cfg.auth.mode, crate::config::AuthMode::None) {
        warn!(
            "auth mode \"none\": clients name themselves in hello.meta.user. This is for development only; set [auth] mode = \"jwt\" in production"
        );
    }

    let signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .map_err(|e| StartError(format!("cannot install signal handlers: {e}")))?;
    {
        let node = node.clone();
        let mut signals = signals;
        let tls_store = tls_store.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    if sig == SIGHUP {
                        reload(tls_store.as_deref(), &node);
                        continue;
                    }
                    info!(signal = sig, "shutting down");
                    crate::admin::start_drain(&node, "signal");
                    break;
                }
            })
            .map_err(|e| StartError(format!("cannot start the signal thread: {e}")))?;
    }
    if let Some(l) = admin {
        crate::admin::spawn(l, node.clone())
            .map_err(|e| StartError(format!("cannot start the admin thread: {e}")))?;
    }

    let mesh = MeshBuilder::<MeshMsg, _>::full(n, MESH_CHANNEL);
    let mut handles = Vec::with_capacity(n);
    for (id, cpu) in cpus.into_iter().enumerate() {
        let node = node.clone();
        let scfg = scfg.clone();
        let mesh = mesh.clone();
        let nats_link = nats_links[id].take();
        let api_link = api_links[id].take();
        let reports = crate::events::Reports {
            users: users_tx.clone(),
            events: room_events.clone(),
            node: Arc::from(node_name.as_str()),
        };
        let quic = quic.clone();
        let listens: Vec<(String, SocketAddr, Transport)> = listens
            .iter()
            .map(|(k, a, t)| (k.to_string(), *a, *t))
            .collect();
        let h = LocalExecutorBuilder::new(Placement::Fixed(cpu))
            .name(&format!("shard-{id}"))
            // We do no file I/O: keep the registered DMA memory small (it
            // counts against RLIMIT_MEMLOCK without CAP_IPC_LOCK).
            .io_memory(256 << 10)
            // However busy the shard, its ring is polled at least this often:
            // new input is seen, and the output `flush` holds for the next
            // poll goes out (the default is 100 ms).
            .preempt_timer(PREEMPT)
            .spawn(move || async move {
                let links = Links {
                    nats: nats_link,
                    api: api_link,
                    reports,
                };
                let r = shard_main(id, scfg, node.clone(), mesh, links, listens, quic).await;
                node.shards_done.fetch_add(1, SeqCst);
                if r.is_err() {
                    node.shutdown.store(true, SeqCst);
                }
                r
            })
            .map_err(|e| StartError(format!("cannot start shard {id} on CPU {cpu}: {e}")))?;
        handles.push(h);
    }
    // Type=notify: READY=1 once every shard listens (or give up waiting
    // when a shard failed; its error is reported below).
    while node.shards_ready.load(SeqCst) < n && node.shards_done.load(SeqCst) == 0 {
        std::thread::sleep(Duration::from_millis(5));
    }
    if node.shards_ready.load(SeqCst) == n {
        crate::sdnotify::notify("READY=1\nSTATUS=serving");
    }
    let mut first_err = None;
    for h in handles {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                error!(error = %e, "shard failed");
                first_err.get_or_insert(e);
            }
            Err(e) => {
                first_err.get_or_insert(StartError(format!("shard thread failed: {e}")));
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => {
            info!("all connections closed; bye");
            Ok(())
        }
    }
}

/// A shard's links to the node's other threads.
struct Links {
    /// The NATS backbone's bridge (`kind = "nats"`).
    nats: Option<NatsBackbone>,
    /// The services thread's (API, HTTP services, hooks).
    api: Option<crate::api::ShardLink>,
    /// Embedded: per-user connection changes and room events for the
    /// services thread and the webhooks.
    reports: crate::events::Reports,
}

async fn shard_main(
    id: usize,
    cfg: ShardConfig,
    node: Arc<Node>,
    mesh: Mesh,
    links: Links,
    listens: Vec<(String, SocketAddr, Transport)>,
    quic: Option<crate::transport::quic::QuicSetup>,
) -> Result<(), StartError> {
    let Links { nats, api, reports } = links;
    let n = cfg.shards;
    // Every shard joins the mesh (glommio's join waits for all of them),
    // whichever backbone the node uses.
    // History lives on the owner shards of the embedded backbone.
    let history = (nats.is_none() && cfg.history.enabled)
        .then(|| HistoryStore::new(cfg.history.clone(), &cfg.epoch_prefix));
    let presence = (nats.is_none() && cfg.presence).then(|| cfg.presence_cfg.clone());
    let embedded = Embedded::join(
        mesh,
        n,
        id,
        node.metrics[id].clone(),
        history,
        presence,
        reports,
    )
    .await
    .map_err(StartError)?;
    let backbone: Rc<dyn Backbone> = match nats {
        Some(link) => Rc::new(link),
        None => embedded,
    };
    let mut shard = Shard::new(id, cfg, node.clone(), backbone.clone());
    if let Some(link) = api {
        shard = shard.with_api(link);
    }
    let shard = Rc::new(shard);
    shard.serve_api();
    shard.serve_posts();
    let weak = Rc::downgrade(&shard);
    let probe = Rc::downgrade(&shard);
    backbone.start(
        Box::new(move |ev| {
            if let Some(shard) = weak.upgrade() {
                shard.on_event(ev);
            }
        }),
        Box::new(move |ch| {
            probe
                .upgrade()
                .is_some_and(|s| s.router.borrow().subscribers(ch) > 0)
        }),
    );
    let admission = Rc::new(Admission::new(&shard.cfg));
    let mut accepts = Vec::new();
    for (key, addr, transport) in listens {
        let l = TcpListener::bind(addr)
            .map_err(|e| StartError(format!("shard {id}: {key} = {addr}: bind failed: {e}")))?;
        accepts.push(glommio::spawn_local(accept_loop(
            shard.clone(),
            admission.clone(),
            l,
            transport,
        )));
    }
    let quic = match quic {
        Some(q) => {
            let ep = q.bind().map_err(|e| {
                StartError(format!(
                    "shard {id}: quic.listen = {}: bind failed: {e}",
                    q.addr
                ))
            })?;
            accepts.push(glommio::spawn_local(crate::listener::quic_accept_loop(
                shard.clone(),
                admission.clone(),
                ep.clone(),
            )));
            Some(ep)
        }
        None => None,
    };
    // Connections' output waits for the next poll of the ring (`flush`);
    // detached, the flusher runs as long as the shard's executor.
    glommio::spawn_local(crate::flush::run()).detach();
    node.shards_ready.fetch_add(1, SeqCst);
    let stop_quic = quic.clone();
    shard
        .run_clock(move || {
            drop(accepts);
            if let Some(ep) = stop_quic {
                // New connection attempts are refused from now on.
                ep.set_server_config(None);
            }
        })
        .await;
    if let Some(ep) = quic {
        // Let the CONNECTION_CLOSEs of the drain go out before the shard ends.
        let _ = glommio::timer::timeout(Duration::from_secs(1), async {
            ep.wait_idle().await;
            Ok(())
        })
        .await;
    }
    // Let the other shards' forwarders see us go.
    let _ = glommio::timer::sleep(Duration::from_millis(1)).await;
    if node.shards_ready.load(Relaxed) == 0 {
        return Err(StartError("no shard started".into()));
    }
    Ok(())
}
