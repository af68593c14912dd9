//! Keeps the published snapshot in step with the store: list, compile, swap; then apply each
//! watched change and swap again. When the store is unreachable the last snapshot keeps serving.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::watch;
use weir_store::settled::Applied;
use weir_store::{SharedStore, WatchMessage};

use crate::partition::Relower;
use crate::snapshot::{Builder, PartCompiled, Snapshot};

/// How long the config must stay unchanged before an overlay of recent route changes is folded
/// into a full build.
const FOLD_AFTER: Duration = Duration::from_secs(1);
use crate::state::{Changes, ConfigState};

/// How the data plane stands with its store, for `/status/ready`.
pub struct SyncStatus {
    loaded: AtomicBool,
    connected: AtomicBool,
    revision: AtomicI64,
    /// When the store last answered (a list, or a watched change).
    last_heard: Mutex<Option<Instant>>,
    /// What the published snapshot serves (what traffic meets).
    applied: watch::Sender<Applied>,
}

impl Default for SyncStatus {
    fn default() -> Self {
        SyncStatus {
            loaded: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            revision: AtomicI64::new(0),
            last_heard: Mutex::new(None),
            applied: watch::Sender::new(Applied::default()),
        }
    }
}

impl SyncStatus {
    /// Follows the newest revision traffic is served at: a write of that revision or older is
    /// live on this node.
    pub fn applied(&self) -> watch::Receiver<Applied> {
        self.applied.subscribe()
    }

    /// Publishes what the last snapshot serves; no revision goes back.
    fn published(&self, now: Applied) {
        self.applied.send_if_modified(|a| {
            let next = Applied { revision: now.revision.max(a.revision), seen: now.seen.max(a.seen), pending: now.pending };
            let changed = next != *a;
            *a = next;
            changed
        });
    }

    fn heard(&self, revision: i64) {
        self.revision.store(revision, Ordering::Relaxed);
        self.connected.store(true, Ordering::Relaxed);
        *self.last_heard.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    fn lost(&self) {
        self.connected.store(false, Ordering::Relaxed);
    }

    /// Whether the first full config is live.
    pub fn is_ready(&self) -> bool {
        self.loaded.load(Ordering::Relaxed)
    }

    /// The revision served, whether the store is reachable, and how long ago it last answered.
    pub fn report(&self) -> serde_json::Value {
        let since = self.last_heard.lock().unwrap_or_else(|p| p.into_inner()).map(|t| t.elapsed().as_millis() as u64);
        serde_json::json!({
            "loaded": self.is_ready(),
            "revision": self.revision.load(Ordering::Relaxed),
            "store_connected": self.connected.load(Ordering::Relaxed),
            "last_heard_ms_ago": since,
        })
    }
}

/// Puts `snapshot` in service; the one it replaces is freed off this loop (`background`).
fn publish(target: &ArcSwap<Snapshot>, snapshot: Snapshot) {
    crate::background::reclaim(target.swap(Arc::new(snapshot)));
}

/// Runs forever. `loaded` turns true once the first full config is live; `status` follows
/// how the store answers.
pub async fn follow(
    store: SharedStore,
    prefix: String,
    mut builder: Builder,
    target: Arc<ArcSwap<Snapshot>>,
    loaded: watch::Sender<bool>,
    status: Arc<SyncStatus>,
) {
    let dir = format!("{prefix}/");
    let mut backoff = Duration::from_millis(100);
    let (relower, mut relowers) = Relower::channel();
    builder.attach(&relower);
    // Changed partitions compile off this loop, so that one gateway's long compile holds up
    // no other's change; `applied` waits for them.
    builder.defer_parts();
    let (compiled_tx, mut compiled) = tokio::sync::mpsc::unbounded_channel::<PartCompiled>();
    let hand_off = |builder: &mut Builder, state: &ConfigState| {
        for job in builder.next_compiles(state) {
            let tx = compiled_tx.clone();
            let slow = job.slow();
            let compile = move || {
                let _ = tx.send(job.run());
            };
            match slow {
                true => crate::background::run_slowly(compile),
                false => {
                    tokio::task::spawn_blocking(compile);
                }
            }
        }
    };
    loop {
        let (kvs, revision) = match store.list(&dir).await {
            Ok(r) => r,
            Err(e) => {
                status.lost();
                tracing::warn!(error = %e, "cannot list config; serving the last good snapshot");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let mut state = ConfigState::claiming(&prefix, &kvs, revision, builder.claims());
        publish(&target, builder.build(&state));
        // Partitions still compiling from before are compiled again once they are done.
        hand_off(&mut builder, &state);
        status.heard(revision);
        status.published(builder.applied(revision));
        status.loaded.store(true, Ordering::Relaxed);
        let _ = loaded.send(true);
        tracing::info!(revision, routes = state.routes.len(), "config loaded");
        let mut events = match store.watch(&dir, revision + 1).await {
            Ok(w) => w,
            Err(e) => {
                status.lost();
                tracing::warn!(error = %e, "cannot watch config");
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        // When the store last said something: a second after, an overlay is folded.
        let mut heard = tokio::time::Instant::now();
        loop {
            // With an overlay in place, a quiet moment folds it into a full build, so matching
            // goes back to one router.
            let overlay = builder.has_overlay();
            let msg = tokio::select! {
                m = events.recv() => m,
                Some(key) = relowers.recv() => {
                    // A contributor finished work for a partition off this loop: lowered again
                    // with the other partitions it finished by now.
                    let mut changes = Changes { extra: vec![key], ..Changes::default() };
                    while let Ok(key) = relowers.try_recv() {
                        changes.extra.push(key);
                    }
                    publish(&target, builder.update(&state, &changes));
                    hand_off(&mut builder, &state);
                    status.published(builder.applied(state.revision));
                    continue;
                }
                Some(done) = compiled.recv() => {
                    if let Some(snapshot) = builder.install(done) {
                        publish(&target, snapshot);
                    }
                    hand_off(&mut builder, &state);
                    status.published(builder.applied(state.revision));
                    continue;
                }
                _ = tokio::time::sleep_until(heard + FOLD_AFTER), if overlay => {
                    publish(&target, builder.fold(&state));
                    hand_off(&mut builder, &state);
                    continue;
                }
            };
            let Some(msg) = msg else { break };
            heard = tokio::time::Instant::now();
            let mut changes = Changes::default();
            let mut next = Some(msg);
            let mut compacted = false;
            // Apply everything already queued before compiling once.
            while let Some(msg) = next.take() {
                match msg {
                    WatchMessage::Events { revision, events } => state.apply(&prefix, revision, &events, &mut changes),
                    WatchMessage::Compacted => {
                        compacted = true;
                        break;
                    }
                }
                next = events.try_recv().ok();
            }
            if compacted {
                break;
            }
            status.heard(state.revision);
            if changes.any() {
                let started = std::time::Instant::now();
                publish(&target, builder.update(&state, &changes));
                hand_off(&mut builder, &state);
                tracing::debug!(revision = state.revision, took = ?started.elapsed(), "config applied");
            }
            status.published(builder.applied(state.revision));
        }
        status.lost();
        tracing::info!("config watch ended; listing again");
    }
}
