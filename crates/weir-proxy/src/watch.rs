//! Keeps the published snapshot in step with the store: list, compile, swap; then apply each
//! watched change and swap again. When the store is unreachable the last snapshot keeps serving.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use weir_store::{SharedStore, WatchMessage};

use crate::snapshot::{Builder, Changes, Snapshot};

/// How long the config must stay unchanged before an overlay of recent route changes is folded
/// into a full build.
const FOLD_AFTER: Duration = Duration::from_secs(1);
use crate::state::ConfigState;

/// Runs forever. `loaded` turns true once the first full config is live.
pub async fn follow(
    store: SharedStore,
    prefix: String,
    mut builder: Builder,
    target: Arc<ArcSwap<Snapshot>>,
    loaded: watch::Sender<bool>,
) {
    let dir = format!("{prefix}/");
    let mut backoff = Duration::from_millis(100);
    loop {
        let (kvs, revision) = match store.list(&dir).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list config; serving the last good snapshot");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let mut state = ConfigState::from_list(&prefix, &kvs, revision);
        target.store(Arc::new(builder.build(&state)));
        let _ = loaded.send(true);
        tracing::info!(revision, routes = state.routes.len(), "config loaded");
        let mut events = match store.watch(&dir, revision + 1).await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch config");
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        loop {
            // With an overlay in place, a quiet moment folds it into a full build, so matching
            // goes back to one router.
            let msg = if builder.has_overlay() {
                match tokio::time::timeout(FOLD_AFTER, events.recv()).await {
                    Ok(m) => m,
                    Err(_) => {
                        target.store(Arc::new(builder.build(&state)));
                        continue;
                    }
                }
            } else {
                events.recv().await
            };
            let Some(msg) = msg else { break };
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
            if changes.any() {
                let started = std::time::Instant::now();
                target.store(Arc::new(builder.update(&state, &changes)));
                tracing::debug!(revision = state.revision, took = ?started.elapsed(), "config applied");
            }
        }
        tracing::info!("config watch ended; listing again");
    }
}
