//! Server processes that tests start: each in a process group of its own, so that stopping
//! it stops its children too (nginx's workers, a Redis fork), and marked in its environment
//! so that `scripts/test.sh` can check that the suite left nothing running.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// The environment variable every server a test starts carries (children inherit it). Not
/// `TOLLGATE_…`: `tollgate serve` refuses settings it does not know.
pub const MARK: &str = "SPAWNED_BY_TOLLGATE_TESTS";

/// Spawns `command` as the leader of a new process group, marked with [`MARK`].
pub fn spawn(command: &mut Command) -> std::io::Result<Child> {
    command.process_group(0).env(MARK, "1").spawn()
}

fn group(child: &Child) -> Pid {
    Pid::from_raw(i32::try_from(child.id()).expect("a pid fits in i32"))
}

/// Sends `signal` to the whole group of `child`.
pub fn signal_group(child: &Child, signal: Signal) {
    let _ = killpg(group(child), signal);
}

/// Kills the whole group at once (SIGKILL), as a crash would, and reaps the leader.
pub fn kill_group(child: &mut Child) {
    signal_group(child, Signal::SIGKILL);
    let _ = child.wait();
}

/// Stops the group gracefully: `signal` (nginx's SIGQUIT, SIGTERM for most), up to `grace`
/// for the leader to exit, then SIGKILL for whatever of the group is left.
pub fn stop_group(child: &mut Child, signal: Signal, grace: Duration) {
    signal_group(child, signal);
    let step = Duration::from_millis(10);
    for _ in 0..grace.as_millis().div_ceil(step.as_millis()) {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(step);
    }
    // Workers outlive a master that exited; the group still names them.
    signal_group(child, Signal::SIGKILL);
    let _ = child.wait();
}

/// A process that is killed with its group when dropped, for helpers that may give up on
/// it (a wait that panics).
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            kill_group(&mut self.0);
        }
    }
}
