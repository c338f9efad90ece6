//! Upstream connections kept for later absolute-form requests.
//!
//! A connection is kept per (upstream, origin): whatever the upstream does with a kept-alive
//! connection (a careful proxy parses every request; a sloppy one pipes the connection to the
//! first request's origin for good, as pproxy does), a request on it only ever goes to the
//! origin it was opened for. Kept per data-plane worker (a thread-local map: the worker's
//! connections never leave its thread, and no lock is taken), at most
//! `dial.keep_idle_max` per key, for `dial.keep_idle`.
//!
//! The pool also learns which HTTP upstreams close their connection after every absolute-form
//! request (tinyproxy does, without saying `Connection: close`): a kept connection found closed
//! soon after it was put back, twice, marks the upstream, and its later plain-HTTP requests go
//! through CONNECT tunnels to the origin, which the origin keeps alive. An upstream that refuses
//! such a tunnel is marked too and gets absolute-form again.
//!
//! A kept connection idle past `server.keepalive_release_after` lets go of hyper's client
//! state (its read and write buffers and its request channel, ~25 KiB): its sender is dropped,
//! its task hands the connection back ([`parked`]), and a request that takes it starts a new
//! client on it, as a client connection's parked state is taken up again.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use hyper::client::conn::http1::SendRequest;
use proxygate_core::{Target, UpstreamId};
use rustc_hash::FxBuildHasher;

use super::Body;
use crate::io::BoxedIo;
use crate::metrics::KeptMetrics;

/// Where a kept connection stands.
pub(crate) enum State {
    /// hyper's client on it: a request goes out on this sender.
    Live(SendRequest<Body>),
    /// Its sender dropped to let hyper's state go; its task is handing the connection back.
    Parking,
    /// The connection alone: a request that takes it starts a client on it.
    Parked(BoxedIo),
}

impl State {
    /// Whether the connection is open as far as can be told without waiting (one being handed
    /// back by its task is).
    fn open(&self) -> bool {
        match self {
            State::Live(sender) => !sender.is_closed(),
            State::Parking => true,
            State::Parked(io) => still_open(io),
        }
    }
}

/// An upstream connection and what it carries.
pub(crate) struct Kept {
    pub(crate) state: State,
    /// Names the connection (see [`conn_id`]).
    pub(crate) conn: u64,
    /// It is a tunnel to the origin (requests in origin form), not a connection to an HTTP
    /// proxy (requests in absolute form).
    pub(crate) tunnel: bool,
    pub(crate) since: Instant,
}

/// (upstream, origin).
pub(crate) type Key = (UpstreamId, Target);

/// A kept connection found closed this soon after it was put back means its upstream closes
/// after every request.
const CLOSED_SOON: Duration = Duration::from_secs(2);
/// Times an upstream must be seen closing before requests through it go in tunnels.
const CLOSINGS_TO_LEARN: u32 = 2;
/// How long what was learned about an upstream holds.
const LEARNED_FOR: Duration = Duration::from_secs(600);

/// A map hashed by FxHash rather than SipHash: a keep-alive request looks its key up twice
/// (taken, put back). FxHash is not keyed, so a client could pick origins whose keys collide;
/// it gains nothing by it, as `idle` never holds more than [`KEPT_PER_WORKER`] keys and
/// `upstreams` is keyed by the pool's own ids.
type FxMap<K, V> = HashMap<K, V, FxBuildHasher>;

struct Pool {
    /// Per key, oldest first: a request takes the newest, a full list drops the oldest.
    idle: FxMap<Key, VecDeque<Kept>>,
    /// Connections in `idle`, all keys together.
    kept: usize,
    /// What was learned per upstream: every upstream this worker sent absolute-form requests
    /// through in the last [`LEARNED_FOR`], so up to the whole pool on every worker.
    upstreams: FxMap<UpstreamId, Learned>,
    /// The origin of [`Learned::at`].
    epoch: Instant,
    /// Requests this worker sent on a kept connection, so far.
    reused: u64,
    /// What of this worker's figures the gateway's metrics hold ([`publish`]).
    published: Published,
}

/// What a worker last added to its gateway's [`KeptMetrics`]: its kept connections by state,
/// and its requests on kept connections. The metrics are shared by every worker, so each adds
/// what changed since its last time, and takes its kept connections back off when its thread
/// ends.
#[derive(Default)]
struct Published {
    /// The metrics added to (its gateway's), once [`publish`] has run.
    into: Option<KeptMetrics>,
    live: i64,
    parked: i64,
    reused: u64,
}

impl Default for Pool {
    fn default() -> Self {
        Pool {
            idle: FxMap::default(),
            kept: 0,
            upstreams: FxMap::default(),
            epoch: Instant::now(),
            reused: 0,
            published: Published::default(),
        }
    }
}

impl Drop for Pool {
    /// The worker's thread ends, and its kept connections with it: they leave the gauges, and
    /// the requests counted since the last [`publish`] join the counter.
    fn drop(&mut self) {
        let p = &self.published;
        if let Some(m) = &p.into {
            m.live.sub(p.live);
            m.parked.sub(p.parked);
            m.reused.inc_by(self.reused - p.reused);
        }
    }
}

impl Pool {
    /// `now` in whole seconds on this worker's clock (0 before its epoch).
    fn secs(&self, now: Instant) -> u32 {
        u32::try_from(now.saturating_duration_since(self.epoch).as_secs()).unwrap_or(u32::MAX)
    }
}

/// Whether what was learned at `at` still holds at `now`, both in seconds on the worker's
/// clock ([`Pool::secs`]): for [`LEARNED_FOR`], to the second.
fn holds(at: u32, now: u32) -> bool {
    u64::from(now.saturating_sub(at)) < LEARNED_FOR.as_secs()
}

/// Idle upstream connections one worker keeps at most, all (upstream, origin) pairs together:
/// each holds a descriptor, and a client touring many origins must not pile them up.
pub(crate) const KEPT_PER_WORKER: usize = 1024;

/// 8 bytes, so 16 per map slot with its key (an `Instant` made slots of 32): with 10,000
/// upstreams, 16,384 slots of 17 bytes with their control bytes, ~280 KB per worker rather
/// than the ~540 massif found (results-2026-11-30.md, "A pool's memory in long use").
#[derive(Debug, Clone, Copy)]
struct Learned {
    /// When last learned, in seconds on the worker's clock ([`Pool::secs`]).
    at: u32,
    /// Closings seen, up to 255 (only [`CLOSINGS_TO_LEARN`] matters).
    closings: u8,
    /// It refused a CONNECT to a plain-HTTP origin.
    refuses_tunnels: bool,
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
    static NEXT_CONN: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn with<T>(f: impl FnOnce(&mut Pool) -> T) -> T {
    POOL.with(|p| f(&mut p.borrow_mut()))
}

/// A name for a new upstream connection, unique on this worker.
pub(crate) fn conn_id() -> u64 {
    NEXT_CONN.with(|n| {
        let id = n.get().wrapping_add(1);
        n.set(id);
        id
    })
}

/// Upstream connection `conn` (to `key`'s origin through its upstream) of this worker ended.
/// If it was kept (idle) here, the other side closed it: it goes, and an HTTP upstream that
/// closes right after its responses is learned from it at once, not only when a later request
/// finds it closed.
pub(crate) fn ended(key: &Key, conn: u64, now: Instant) {
    with(|pool| {
        let Some(list) = pool.idle.get_mut(key) else {
            return;
        };
        let Some(i) = list.iter().position(|k| k.conn == conn) else {
            return;
        };
        let Some(k) = list.remove(i) else {
            return;
        };
        if list.is_empty() {
            pool.idle.remove(key);
        }
        pool.kept -= 1;
        learn_closed(pool, key.0, k.tunnel, k.since, now);
    });
}

/// A kept connection to `target` through `upstream` not known to be closed (the newest
/// first), if one is younger than `keep_idle`. The caller waits for it to be ready (a response
/// just read may still be winding down on it) and treats a failure there as a closed one.
pub(crate) fn take(
    upstream: UpstreamId,
    target: &Target,
    keep_idle: Duration,
    now: Instant,
) -> Option<Kept> {
    with(|pool| {
        let key = (upstream, target.clone());
        let list = pool.idle.get_mut(&key)?;
        let mut found = None;
        let mut closed = Vec::new();
        let before = list.len();
        let mut at = list.len();
        while at > 0 {
            at -= 1;
            let k = &list[at];
            if now.duration_since(k.since) >= keep_idle {
                // This one and every older one.
                list.drain(..=at);
                break;
            }
            // Being handed back by its task: left for later.
            if matches!(k.state, State::Parking) {
                continue;
            }
            let open = k.state.open();
            let Some(k) = list.remove(at) else { break };
            if open {
                found = Some(k);
                break;
            }
            // Closed by the other side while idle.
            closed.push((k.tunnel, k.since));
        }
        let gone = before - list.len();
        if list.is_empty() {
            pool.idle.remove(&key);
        }
        pool.kept -= gone;
        for (tunnel, since) in closed {
            learn_closed(pool, upstream, tunnel, since, now);
        }
        found
    })
}

/// Keeps an upstream connection whose last response ended cleanly.
pub(crate) fn put(
    upstream: UpstreamId,
    target: Target,
    sender: SendRequest<Body>,
    conn: u64,
    tunnel: bool,
    max: usize,
    now: Instant,
) {
    if sender.is_closed() {
        // Closed as soon as the response ended.
        with(|pool| learn_closed(pool, upstream, tunnel, now, now));
        return;
    }
    if max == 0 {
        return;
    }
    with(|pool| {
        if pool.kept >= KEPT_PER_WORKER {
            // Full: this one closes (the kept ones are at least as fresh as it is useful).
            return;
        }
        let list = pool.idle.entry((upstream, target)).or_default();
        if list.len() >= max {
            // The oldest goes: it is the likeliest to have been closed.
            list.pop_front();
            pool.kept -= 1;
        }
        pool.kept += 1;
        list.push_back(Kept {
            state: State::Live(sender),
            conn,
            tunnel,
            since: now,
        });
    });
}

/// What is known of `upstream`, fresh as of `now`.
fn learned(pool: &mut Pool, upstream: UpstreamId, now: Instant) -> &mut Learned {
    let at = pool.secs(now);
    let l = pool.upstreams.entry(upstream).or_insert(Learned {
        at,
        closings: 0,
        refuses_tunnels: false,
    });
    l.at = at;
    l
}

/// One more closing seen from an upstream.
fn closed(l: &mut Learned) {
    l.closings = l.closings.saturating_add(1);
}

fn learn_closed(pool: &mut Pool, upstream: UpstreamId, tunnel: bool, since: Instant, now: Instant) {
    if !tunnel && now.duration_since(since) < CLOSED_SOON {
        closed(learned(pool, upstream, now));
    }
}

/// A connection kept since `since` turned out closed when it was used: an HTTP upstream that
/// closes right after every response is learned from it.
pub(crate) fn found_closed(upstream: UpstreamId, tunnel: bool, since: Instant, now: Instant) {
    with(|pool| learn_closed(pool, upstream, tunnel, since, now));
}

/// The upstream said it closes the connection after the response (`Connection: close`).
pub(crate) fn closing(upstream: UpstreamId, now: Instant) {
    with(|pool| closed(learned(pool, upstream, now)));
}

/// What was learned about an HTTP upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Known {
    /// It was seen closing its connection after every absolute-form request.
    pub(crate) closes: bool,
    /// It refused a CONNECT tunnel to a plain-HTTP origin.
    pub(crate) refuses_tunnels: bool,
}

/// What was learned about `upstream` lately.
pub(crate) fn known(upstream: UpstreamId, now: Instant) -> Known {
    with(|pool| {
        let now = pool.secs(now);
        pool.upstreams
            .get(&upstream)
            .filter(|l| holds(l.at, now))
            .map(|l| Known {
                closes: u32::from(l.closings) >= CLOSINGS_TO_LEARN,
                refuses_tunnels: l.refuses_tunnels,
            })
            .unwrap_or_default()
    })
}

/// The upstream answered a tunnel to a plain-HTTP origin with a refusal: absolute-form again.
pub(crate) fn refuses_tunnels(upstream: UpstreamId, now: Instant) {
    with(|pool| learned(pool, upstream, now).refuses_tunnels = true);
}

/// Kept connections idle for `release_after` let go of hyper's state: their senders are
/// dropped, and their tasks hand the connections back ([`parked`]). Run every second on every
/// worker.
pub(crate) fn release(release_after: Duration, now: Instant) {
    with(|pool| {
        for k in pool.idle.values_mut().flat_map(|list| list.iter_mut()) {
            if matches!(k.state, State::Live(_)) && now.duration_since(k.since) >= release_after {
                k.state = State::Parking;
            }
        }
    });
}

/// A request went out on a kept connection.
pub(crate) fn reused() {
    with(|pool| pool.reused += 1);
}

/// Adds to `metrics` what changed on this worker since its last call: its kept connections by
/// state, and its requests on kept connections. Run every second on every worker.
pub(crate) fn publish(metrics: &KeptMetrics) {
    with(|pool| {
        let (mut live, mut parked) = (0, 0);
        for k in pool.idle.values().flat_map(|list| list.iter()) {
            match k.state {
                State::Live(_) => live += 1,
                State::Parking | State::Parked(_) => parked += 1,
            }
        }
        let p = &mut pool.published;
        let m = p.into.get_or_insert_with(|| metrics.clone());
        m.live.add(live - p.live);
        m.parked.add(parked - p.parked);
        m.reused.inc_by(pool.reused - p.reused);
        (p.live, p.parked, p.reused) = (live, parked, pool.reused);
    });
}

/// The task of kept connection `conn` (to `key`'s origin through its upstream) hands it back
/// without hyper's state, after [`release`] dropped its sender. `Some(io)`: not wanted (no
/// longer kept, or not being parked), to be closed.
pub(crate) fn parked(key: &Key, conn: u64, io: BoxedIo) -> Option<BoxedIo> {
    with(|pool| {
        let kept = pool
            .idle
            .get_mut(key)
            .and_then(|list| list.iter_mut().find(|k| k.conn == conn));
        match kept {
            Some(k) if matches!(k.state, State::Parking) => {
                k.state = State::Parked(io);
                None
            }
            _ => Some(io),
        }
    })
}

/// Whether a parked connection is open as far as its socket tells without waiting: nothing to
/// read (the other side has neither closed it nor sent what nobody asked for). A stream that is
/// not plain TCP (TLS) is taken as open: a request that finds it closed goes again on a new
/// connection, as on any kept one.
fn still_open(io: &BoxedIo) -> bool {
    let Some((tcp, _)) = crate::io::tcp_under(io) else {
        return true;
    };
    let mut byte = [0u8; 1];
    let mut buf = tokio::io::ReadBuf::new(&mut byte);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    tcp.poll_peek(&mut cx, &mut buf).is_pending()
}

/// Drops the kept connections older than `keep_idle` or closed, and what was learned long ago.
/// Run now and then on every worker, so idle connections do not outlive their use.
pub(crate) fn sweep(keep_idle: Duration, now: Instant) {
    with(|pool| {
        pool.idle.retain(|_, list| {
            list.retain(|k| now.duration_since(k.since) < keep_idle && k.state.open());
            !list.is_empty()
        });
        pool.kept = pool.idle.values().map(VecDeque::len).sum();
        let now = pool.secs(now);
        pool.upstreams.retain(|_, l| holds(l.at, now));
    });
}

/// Connections kept now on this worker.
#[cfg(test)]
pub(crate) fn kept() -> usize {
    with(|pool| {
        let n = pool.idle.values().map(VecDeque::len).sum();
        assert_eq!(n, pool.kept, "the running count drifted");
        n
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper_util::rt::TokioIo;

    async fn sender() -> (SendRequest<Body>, tokio::io::DuplexStream) {
        let (ours, theirs) = tokio::io::duplex(1024);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(ours))
            .await
            .unwrap();
        tokio::spawn(conn);
        (sender, theirs)
    }

    /// Puts `n` new connections to `t` through `upstream`, capped at `max`; returns their ids,
    /// oldest first. Their far ends go to `peers`, to be held open.
    async fn put_many(
        (upstream, t): (UpstreamId, &Target),
        n: usize,
        tunnel: bool,
        max: usize,
        now: Instant,
        peers: &mut Vec<tokio::io::DuplexStream>,
    ) -> Vec<u64> {
        let mut ids = Vec::new();
        for _ in 0..n {
            let (s, p) = sender().await;
            peers.push(p);
            let id = conn_id();
            ids.push(id);
            put(upstream, t.clone(), s, id, tunnel, max, now);
        }
        ids
    }

    fn target(s: &str) -> Target {
        Target::parse_authority(s).unwrap()
    }

    #[tokio::test]
    async fn a_kept_connection_serves_only_its_upstream_and_origin() {
        let now = Instant::now();
        let idle = Duration::from_secs(30);
        let (a, _pa) = sender().await;
        put(UpstreamId(1), target("a.example:80"), a, 1, false, 4, now);
        assert!(take(UpstreamId(2), &target("a.example:80"), idle, now).is_none());
        assert!(take(UpstreamId(1), &target("b.example:80"), idle, now).is_none());
        assert!(take(UpstreamId(1), &target("a.example:8080"), idle, now).is_none());
        let got = take(UpstreamId(1), &target("a.example:80"), idle, now).unwrap();
        assert!(!got.tunnel);
        // Taken: nobody else gets it.
        assert!(take(UpstreamId(1), &target("a.example:80"), idle, now).is_none());
        assert!(matches!(got.state, State::Live(_)));
    }

    #[tokio::test]
    async fn kept_connections_expire_and_are_bounded() {
        let now = Instant::now();
        let t = target("c.example:80");
        let mut peers = Vec::new();
        put_many((UpstreamId(3), &t), 5, true, 3, now, &mut peers).await;
        assert_eq!(kept(), 3);
        let later = now + Duration::from_secs(31);
        assert!(take(UpstreamId(3), &t, Duration::from_secs(30), later).is_none());
        assert_eq!(kept(), 0);
        let (s, _p) = sender().await;
        put(UpstreamId(3), t.clone(), s, conn_id(), true, 3, now);
        sweep(Duration::from_secs(30), later);
        assert_eq!(kept(), 0);
    }

    /// A hundred responses end at once on one (upstream, origin), as under a hundred keep-alive
    /// clients of one origin: by default every connection is kept for the requests that follow
    /// (newest first); past a cap the oldest go.
    #[tokio::test]
    async fn a_busy_origin_keeps_what_its_responses_hand_back() {
        let now = Instant::now();
        let idle = Duration::from_secs(30);
        let (busy, capped) = (target("busy.example:80"), target("capped.example:80"));
        let mut peers = Vec::new();
        let max = crate::config::DEFAULT_KEEP_IDLE_MAX;
        let ids = put_many((UpstreamId(5), &busy), 100, false, max, now, &mut peers).await;
        for want in ids.iter().rev() {
            let k = take(UpstreamId(5), &busy, idle, now).unwrap();
            assert_eq!(k.conn, *want);
        }
        assert!(take(UpstreamId(5), &busy, idle, now).is_none());

        let ids = put_many((UpstreamId(6), &capped), 5, false, 3, now, &mut peers).await;
        for want in ids[2..].iter().rev() {
            assert_eq!(take(UpstreamId(6), &capped, idle, now).unwrap().conn, *want);
        }
        assert_eq!(kept(), 0);
    }

    #[tokio::test]
    async fn a_worker_keeps_a_bounded_number_and_forgets_what_the_other_side_closed() {
        let now = Instant::now();
        let mut peers = Vec::new();
        for i in 0..KEPT_PER_WORKER + 5 {
            let (s, p) = sender().await;
            peers.push(p);
            put(
                UpstreamId(9),
                target(&format!("o{i}.example:80")),
                s,
                conn_id(),
                false,
                4,
                now,
            );
        }
        assert_eq!(kept(), KEPT_PER_WORKER);
        // The other side closes one: it goes at once, and the closing is learned.
        let t = target("o0.example:80");
        let conn = with(|pool| pool.idle[&(UpstreamId(9), t.clone())][0].conn);
        ended(
            &(UpstreamId(9), t.clone()),
            conn,
            now + Duration::from_millis(10),
        );
        assert_eq!(kept(), KEPT_PER_WORKER - 1);
        assert!(take(UpstreamId(9), &t, Duration::from_secs(30), now).is_none());
        // Unknown connections and keys are nothing.
        ended(&(UpstreamId(9), t), conn, now);
        sweep(Duration::from_secs(30), now + Duration::from_secs(31));
        assert_eq!(kept(), 0);
    }

    /// Each worker adds to the shared metrics what changed since its last publish, and takes
    /// its kept connections back off the gauges when its thread ends, counting the requests it
    /// had not published yet: summed over workers, the figures are the process's.
    #[test]
    fn a_worker_publishes_what_changed_and_takes_it_back_when_it_ends() {
        fn read(m: &KeptMetrics) -> (i64, i64, u64) {
            (m.live.get(), m.parked.get(), m.reused.get())
        }
        /// Runs `f` on a worker thread of its own, which ends afterwards.
        fn on_worker<F: Future<Output = ()> + 'static>(m: &KeptMetrics, f: fn(KeptMetrics) -> F) {
            let m = m.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(f(m));
            })
            .join()
            .unwrap();
        }
        async fn first(m: KeptMetrics) {
            let now = Instant::now();
            let t = target("published.example:80");
            let mut peers = Vec::new();
            put_many((UpstreamId(21), &t), 3, false, 8, now, &mut peers).await;
            reused();
            reused();
            publish(&m);
            assert_eq!(read(&m), (3, 0, 2));
            publish(&m);
            assert_eq!(read(&m), (3, 0, 2), "publishing again adds nothing");
            assert!(take(UpstreamId(21), &t, Duration::from_secs(30), now).is_some());
            publish(&m);
            assert_eq!(read(&m), (2, 0, 2));
            // Idle past the release: parked (being handed back counts as parked).
            release(Duration::ZERO, now);
            reused();
            publish(&m);
            assert_eq!(read(&m), (0, 2, 3));
            // Counted after the last publish: added as the thread ends.
            reused();
        }
        async fn second(m: KeptMetrics) {
            let mut peers = Vec::new();
            let t = target("second.example:80");
            put_many(
                (UpstreamId(22), &t),
                1,
                false,
                8,
                Instant::now(),
                &mut peers,
            )
            .await;
            publish(&m);
            assert_eq!(read(&m), (1, 0, 4));
        }
        let metrics = crate::metrics::Metrics::unregistered();
        let m = metrics.kept();
        on_worker(m, first);
        assert_eq!(
            read(m),
            (0, 0, 4),
            "the ended worker's connections left the gauges"
        );
        // Another worker's figures add to what the first left.
        on_worker(m, second);
        assert_eq!(read(m), (0, 0, 4));
    }

    /// What the pool holds for `conn` to `key`.
    fn state_of(key: &Key, conn: u64) -> Option<&'static str> {
        with(|pool| {
            let k = pool.idle.get(key)?.iter().find(|k| k.conn == conn)?;
            Some(match k.state {
                State::Live(_) => "live",
                State::Parking => "parking",
                State::Parked(_) => "parked",
            })
        })
    }

    /// Waits (a bounded while) for `conn`'s task to hand it back.
    async fn until_parked(key: &Key, conn: u64) {
        for _ in 0..1000 {
            if state_of(key, conn) == Some("parked") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("{conn} not parked: {:?}", state_of(key, conn));
    }

    /// A loopback TCP connection kept for `key` and parked; the far end's socket.
    async fn parked_over_tcp(key: &Key, now: Instant) -> tokio::net::TcpStream {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ours = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (theirs, _) = l.accept().await.unwrap();
        let conn = keep_client(key, Box::new(ours), now).await;
        release(Duration::ZERO, now);
        until_parked(key, conn).await;
        theirs
    }

    /// Waits (a bounded while) until what the other side did reaches the socket of `key`'s
    /// parked connection (its readiness).
    async fn until_seen(key: &Key) {
        for _ in 0..1000 {
            if !with(|pool| pool.idle[key][0].state.open()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// A client on `io`, as the gateway opens one, kept for `key` under a new id.
    async fn keep_client(key: &Key, io: BoxedIo, now: Instant) -> u64 {
        let conn = conn_id();
        let sender = crate::http::client_handshake(io, 8192, key.clone(), conn)
            .await
            .unwrap();
        put(key.0, key.1.clone(), sender, conn, false, 4, now);
        conn
    }

    #[tokio::test]
    async fn an_idle_connection_lets_hyper_go_and_a_request_takes_it_up_again() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let now = Instant::now();
        let key = (UpstreamId(11), target("p.example:80"));
        let (ours, mut theirs) = tokio::io::duplex(4096);
        let conn = keep_client(&key, Box::new(ours), now).await;
        let after = Duration::from_secs(1);
        release(after, now + Duration::from_millis(999));
        assert_eq!(state_of(&key, conn), Some("live"), "released too soon");
        release(after, now + after);
        until_parked(&key, conn).await;
        assert_eq!(kept(), 1);

        // A request takes it: a new client on the same stream, which the far end answers.
        let k = take(key.0, &key.1, Duration::from_secs(30), now + after).unwrap();
        assert_eq!(kept(), 0);
        let State::Parked(io) = k.state else {
            panic!("not parked");
        };
        let mut sender = crate::http::client_handshake(io, 8192, key.clone(), conn)
            .await
            .unwrap();
        let far = tokio::spawn(async move {
            let mut head = Vec::new();
            let mut b = [0u8; 1024];
            while !head.ends_with(b"\r\n\r\n") {
                let n = theirs.read(&mut b).await.unwrap();
                assert!(n > 0, "closed before the request");
                head.extend_from_slice(&b[..n]);
            }
            theirs
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await
                .unwrap();
            (head, theirs)
        });
        let req = http::Request::get("/x")
            .header("host", "p.example")
            .body(crate::http::empty())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let (head, _theirs) = far.await.unwrap();
        assert!(head.starts_with(b"GET /x HTTP/1.1\r\n"), "{head:?}");
    }

    #[tokio::test]
    async fn a_parked_connection_closed_by_the_other_side_is_not_taken() {
        let now = Instant::now();
        let key = (UpstreamId(12), target("q.example:80"));
        let theirs = parked_over_tcp(&key, now).await;
        drop(theirs);
        until_seen(&key).await;
        assert!(take(key.0, &key.1, Duration::from_secs(30), now).is_none());
        assert_eq!(kept(), 0);
    }

    #[tokio::test]
    async fn a_parked_connection_the_other_side_wrote_to_is_not_taken() {
        // Bytes nobody asked for (a late response, a 408 before a close): what comes next on it
        // could be read as the answer to the next request.
        use tokio::io::AsyncWriteExt;
        let now = Instant::now();
        let key = (UpstreamId(13), target("w.example:80"));
        let mut theirs = parked_over_tcp(&key, now).await;
        theirs
            .write_all(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
            .await
            .unwrap();
        until_seen(&key).await;
        assert!(take(key.0, &key.1, Duration::from_secs(30), now).is_none());
        assert_eq!(kept(), 0);
    }

    #[test]
    fn learned_fits_a_16_byte_slot() {
        assert_eq!(std::mem::size_of::<(UpstreamId, Learned)>(), 16);
    }

    #[tokio::test]
    async fn an_upstream_is_known_to_close_after_two_closings_and_to_refuse_tunnels() {
        let now = Instant::now();
        let idle = Duration::from_secs(30);
        let t = target("d.example:80");
        let up = UpstreamId(4);
        assert_eq!(known(up, now), Known::default());
        for _ in 0..2 {
            let (s, peer) = sender().await;
            put(up, t.clone(), s, conn_id(), false, 4, now);
            // The upstream closes the idle connection.
            drop(peer);
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert!(take(up, &t, idle, now + Duration::from_millis(50)).is_none());
        }
        assert!(known(up, now).closes);
        assert!(!known(up, now).refuses_tunnels);
        refuses_tunnels(up, now);
        assert!(known(up, now).refuses_tunnels);
        // Learned things are forgotten in time, to the second.
        let almost = now + LEARNED_FOR - Duration::from_secs(2);
        sweep(idle, almost);
        assert!(known(up, almost).closes);
        let past = now + LEARNED_FOR + Duration::from_secs(1);
        assert_eq!(known(up, past), Known::default());
        sweep(idle, past);
        assert_eq!(known(up, now), Known::default());
    }
}
