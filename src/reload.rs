//! Hot reload: the policies are rebuilt off the request path — when the files change on disk
//! (debounced), on `SIGHUP`, or when asked — and the new plan is swapped in atomically. A
//! broken edit never takes effect: the old plan keeps serving, and the error, with its
//! location, is logged and kept in [`ReloadStatus`] until a good version loads. Counters live
//! in the store, so they survive a reload: a limit whose rate changed counts its existing
//! counter against the new rate; a removed limit's counters expire.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};

use crate::clock::{Clock, Timestamp};
use crate::diagnostic::PolicyErrors;
use crate::engine::Engine;
use crate::plan::Plan;
use crate::store::Store;

/// How long the files must stay quiet before a change is loaded.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(250);

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The policy files changed on disk.
    Watch,
    /// `SIGHUP`.
    Signal,
    /// An operator (the admin API).
    Request,
}

impl Trigger {
    fn name(self) -> &'static str {
        match self {
            Trigger::Watch => "file change",
            Trigger::Signal => "SIGHUP",
            Trigger::Request => "request",
        }
    }
}

/// Where reloading stands: the plan serving, and the last failure if it is not fixed yet.
#[derive(Debug, Clone)]
pub struct ReloadStatus {
    /// The version of the plan serving.
    pub version: Arc<str>,
    /// When it was loaded (the engine's clock).
    pub loaded_at: Timestamp,
    /// The last reload's problems, rendered with their locations, until a good version
    /// loads.
    pub last_error: Option<String>,
    /// When the last reload failed.
    pub failed_at: Option<Timestamp>,
    /// Reloads that swapped a plan in.
    pub succeeded: u64,
    /// Reloads refused because the policies were broken.
    pub failed: u64,
}

/// Builds plans and swaps them into an engine, one reload at a time.
#[derive(Clone)]
pub struct Reloader {
    inner: Arc<Inner>,
}

type Load = dyn Fn() -> Result<Plan, PolicyErrors> + Send + Sync;
type Swap = dyn Fn(Plan) -> Arc<str> + Send + Sync;
type Now = dyn Fn() -> Timestamp + Send + Sync;

struct Inner {
    load: Box<Load>,
    swap: Box<Swap>,
    now: Box<Now>,
    status: Mutex<ReloadStatus>,
    /// One reload at a time: two at once could swap in the older plan last.
    running: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

impl Reloader {
    /// Reloads `engine`'s plan with what `load` builds (it reads the files each time).
    pub fn new<S: Store, C: Clock>(
        engine: Arc<Engine<S, C>>,
        load: impl Fn() -> Result<Plan, PolicyErrors> + Send + Sync + 'static,
    ) -> Self {
        let version = engine.plan().version().into();
        let loaded_at = engine.now();
        let now = {
            let engine = Arc::clone(&engine);
            move || engine.now()
        };
        let swap = move |plan: Plan| {
            let version: Arc<str> = plan.version().into();
            engine.swap_plan(plan);
            version
        };
        Reloader {
            inner: Arc::new(Inner {
                load: Box::new(load),
                swap: Box::new(swap),
                now: Box::new(now),
                status: Mutex::new(ReloadStatus {
                    version,
                    loaded_at,
                    last_error: None,
                    failed_at: None,
                    succeeded: 0,
                    failed: 0,
                }),
                running: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// Where reloading stands.
    pub fn status(&self) -> ReloadStatus {
        self.inner
            .status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Rebuilds the plan now (on a blocking thread) and swaps it in; on problems the old
    /// plan stays and the problems are returned, logged and kept in the status.
    pub async fn reload(&self, trigger: Trigger) -> Result<Arc<str>, Arc<PolicyErrors>> {
        let _one_at_a_time = self.inner.running.lock().await;
        let inner = Arc::clone(&self.inner);
        let built = tokio::task::spawn_blocking(move || (inner.load)()).await;
        let built = match built {
            Ok(built) => built,
            // The loader panicked: report it as a problem, keep serving.
            Err(e) => Err(PolicyErrors::new(vec![
                crate::diagnostic::PolicyError::whole_file("reload", format!("{e}")),
            ])),
        };
        let mut status = self
            .inner
            .status
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match built {
            Ok(plan) => {
                let previous = Arc::clone(&status.version);
                let version = (self.inner.swap)(plan);
                status.version = Arc::clone(&version);
                status.loaded_at = (self.inner.now)();
                status.last_error = None;
                status.failed_at = None;
                status.succeeded += 1;
                tracing::info!(
                    trigger = trigger.name(),
                    %previous,
                    plan = %version,
                    "policies reloaded"
                );
                Ok(version)
            }
            Err(errors) => {
                let rendered = errors.render_plain(100);
                status.last_error = Some(rendered.clone());
                status.failed_at = Some((self.inner.now)());
                status.failed += 1;
                tracing::error!(
                    trigger = trigger.name(),
                    plan = %status.version,
                    problems = errors.total(),
                    "the policies do not compile; the plan in use keeps serving:\n{rendered}"
                );
                Err(Arc::new(errors))
            }
        }
    }

    /// Watches `paths` (directories recursively; a file through its directory) and reloads
    /// once they have been quiet for `debounce` after a change. Watching stops when the
    /// returned guard is dropped.
    pub fn watch(
        &self,
        paths: &[PathBuf],
        debounce: Duration,
    ) -> Result<WatchGuard, notify::Error> {
        let reloader = self.clone();
        watch_paths(paths, debounce, "policy", move || {
            let reloader = reloader.clone();
            async move {
                let _ = reloader.reload(Trigger::Watch).await;
            }
        })
    }

    /// Reloads on every `SIGHUP` until the returned task is aborted.
    #[cfg(unix)]
    pub fn on_sighup(&self) -> std::io::Result<tokio::task::JoinHandle<()>> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangups = signal(SignalKind::hangup())?;
        let reloader = self.clone();
        Ok(tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                let _ = reloader.reload(Trigger::Signal).await;
            }
        }))
    }
}

/// Watches `paths` (directories recursively; a file through its directory) and runs
/// `changed` once they have been quiet for `debounce` after a change (one run at a time;
/// changes during a run bring one more). `what` names the files in the log. Watching stops
/// when the returned guard is dropped.
pub fn watch_paths<F, Fut>(
    paths: &[PathBuf],
    debounce: Duration,
    what: &'static str,
    mut changed: F,
) -> Result<WatchGuard, notify::Error>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        match event {
            Ok(event) if matches!(event.kind, EventKind::Access(_)) => {}
            // A full channel already holds a pending change: nothing is lost.
            Ok(_) => {
                let _ = tx.try_send(());
            }
            Err(e) => tracing::warn!(error = %e, what, "watching files failed"),
        }
    })?;
    for path in watch_roots(paths) {
        watcher.watch(&path, RecursiveMode::Recursive)?;
        tracing::info!(path = %path.display(), what, "watching for changes");
    }
    let task = tokio::spawn(async move {
        while rx.recv().await.is_some() {
            // Editors write in bursts (a temporary file, a rename, a chmod): wait until the
            // files are quiet.
            loop {
                match tokio::time::timeout(debounce, rx.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_quiet) => break,
                }
            }
            changed().await;
        }
    });
    Ok(WatchGuard {
        _watcher: watcher,
        task,
    })
}

/// Keeps a watch alive; dropping it stops watching.
#[derive(Debug)]
pub struct WatchGuard {
    _watcher: notify::RecommendedWatcher,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The directories to watch: each directory given, and the directory of each file given
/// (editors save by writing a new file and renaming it over the old one, which a watch on
/// the file itself would lose), without repeats.
fn watch_roots(paths: &[PathBuf]) -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = Vec::new();
    for path in paths {
        let root = if path.is_dir() {
            path.clone()
        } else {
            path.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
        };
        let root = root.canonicalize().unwrap_or(root);
        if !roots.contains(&root) {
            roots.push(root);
        }
    }
    roots
}
