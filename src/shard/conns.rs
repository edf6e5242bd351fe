//! The connection table: every connection a shard owns, by slab slot.
//!
//! A slot is reused once its connection is gone, so anything that names a
//! connection from afar (a timer check, a backbone answer) carries the
//! connection's serial too and is dropped when the slot holds a newer one.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;

use slab::Slab;

use crate::conn::Conn;
use crate::metrics::Transport;

/// The shard's connections.
pub struct ConnTable {
    slab: RefCell<Slab<Rc<Conn>>>,
    serial: Cell<u64>,
}

impl Default for ConnTable {
    /// Serials start at the process's start time (Unix ms × 1024): a
    /// connection's name (`node-shard-serial`) is never given again by a
    /// restarted node, so the publish-deduplication key scoped to it
    /// (`user:conn:id`, a JetStream `Nats-Msg-Id`) cannot make the stream
    /// drop a new client's message as a retry of an old one.
    fn default() -> Self {
        ConnTable {
            slab: RefCell::new(Slab::new()),
            serial: Cell::new(crate::auth::unix_ms() << 10),
        }
    }
}

impl ConnTable {
    /// Adds a connection accepted at `now_ms`, with the next serial.
    pub fn insert(&self, transport: Transport, peer: SocketAddr, now_ms: u64) -> Rc<Conn> {
        let serial = self.serial.get() + 1;
        self.serial.set(serial);
        let mut slab = self.slab.borrow_mut();
        let entry = slab.vacant_entry();
        let conn = Rc::new(Conn::new(
            serial,
            entry.key() as u32,
            transport,
            peer,
            now_ms,
        ));
        entry.insert(conn.clone());
        conn
    }

    /// The connection in slot `key`, if its serial matches (`serial` may
    /// be the low 32 bits only, as timer entries keep it).
    pub fn get(&self, key: u32, serial: u64, low32: bool) -> Option<Rc<Conn>> {
        let slab = self.slab.borrow();
        slab.get(key as usize)
            .filter(|c| {
                if low32 {
                    c.serial as u32 == serial as u32
                } else {
                    c.serial == serial
                }
            })
            .cloned()
    }

    /// Removes `conn` (a no-op when its slot already holds another).
    pub fn remove(&self, conn: &Conn) {
        let mut slab = self.slab.borrow_mut();
        if slab
            .get(conn.key as usize)
            .is_some_and(|c| c.serial == conn.serial)
        {
            slab.remove(conn.key as usize);
        }
    }

    /// Connections held.
    pub fn len(&self) -> usize {
        self.slab.borrow().len()
    }

    /// True when no connection is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A snapshot of every connection (for drain and `/connz`: off the
    /// message path).
    pub fn all(&self) -> Vec<Rc<Conn>> {
        self.slab.borrow().iter().map(|(_, c)| c.clone()).collect()
    }

    /// Runs `f` over the connections in `keys` that are still there
    /// (fan-out: no clone, one borrow).
    pub fn for_each_key(&self, keys: &[u32], mut f: impl FnMut(&Rc<Conn>)) {
        let slab = self.slab.borrow();
        for &k in keys {
            if let Some(c) = slab.get(k as usize) {
                f(c);
            }
        }
    }
}
