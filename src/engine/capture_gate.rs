//! Keeps CUDA graph capture safe when several threads of one process drive GPUs.
//!
//! ONNX Runtime captures a session's CUDA graph in CUDA's global capture mode. While one
//! thread captures, a CUDA call from any other thread of the process that may synchronize (a
//! stream synchronization, an allocation, a copy) invalidates the capture, and the failed
//! capture can leave streams of both threads unusable for the next runs. A worker with a GPU
//! consumer per device runs one engine thread per GPU, so a first job at a new shape on one
//! GPU broke the jobs running on the other (seen on a two-GPU H200 host).
//!
//! The gate is a process-wide reader-writer lock that lets a waiting capture go first:
//! - a thread that drives a GPU holds it shared for each unit of work ([`gpu_work`]: one job,
//!   one batch, a model load or release);
//! - before the engine builds a session that captures a CUDA graph, the thread trades its
//!   shared hold for an exclusive one ([`exclusive_for_capture`]) and keeps it to the end of
//!   that unit of work, which holds the capturing runs. Other GPU threads wait at their next
//!   unit of work; the thread itself waits until the others finish the one they are in.
//!
//! Captures happen once per shape and session, so the exclusive holds are rare. A thread that
//! holds nothing (a single-engine program such as the `generate` command) is not gated.

use std::cell::Cell;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

/// Who holds the gate. Writers go first: once a capture waits, new shared holds wait behind
/// it, so that a consumer taking job after job back to back cannot keep it waiting (a plain
/// `RwLock` lets a reader that re-locks at once win that race again and again).
struct State {
    shared: usize,
    exclusive: bool,
    exclusive_waiting: usize,
}

struct Gate {
    state: Mutex<State>,
    changed: Condvar,
}

static GATE: Gate = Gate {
    state: Mutex::new(State {
        shared: 0,
        exclusive: false,
        exclusive_waiting: 0,
    }),
    changed: Condvar::new(),
};

impl Gate {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait<'a>(&self, state: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed
            .wait(state)
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn enter_shared(&self) {
        let mut state = self.lock();
        while state.exclusive || state.exclusive_waiting > 0 {
            state = self.wait(state);
        }
        state.shared += 1;
    }

    fn leave_shared(&self) {
        let mut state = self.lock();
        state.shared -= 1;
        if state.shared == 0 {
            self.changed.notify_all();
        }
    }

    /// Trade a shared hold for an exclusive one.
    fn upgrade(&self) {
        let mut state = self.lock();
        state.shared -= 1;
        state.exclusive_waiting += 1;
        self.changed.notify_all();
        while state.exclusive || state.shared > 0 {
            state = self.wait(state);
        }
        state.exclusive_waiting -= 1;
        state.exclusive = true;
    }

    fn leave_exclusive(&self) {
        let mut state = self.lock();
        state.exclusive = false;
        self.changed.notify_all();
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Hold {
    None,
    Shared,
    Exclusive,
}

thread_local! {
    static HELD: Cell<Hold> = const { Cell::new(Hold::None) };
}

/// This thread's hold on the gate for one unit of GPU work; released when dropped. Nested
/// calls on a thread that already holds the gate return a hold that releases nothing.
#[must_use = "the gate is released when this is dropped"]
pub struct GpuWork {
    outermost: bool,
}

/// Hold the gate shared for one unit of GPU work on this thread (see the module docs).
pub fn gpu_work() -> GpuWork {
    if HELD.get() != Hold::None {
        return GpuWork { outermost: false };
    }
    GATE.enter_shared();
    HELD.set(Hold::Shared);
    GpuWork { outermost: true }
}

impl Drop for GpuWork {
    fn drop(&mut self) {
        if !self.outermost {
            return;
        }
        match HELD.replace(Hold::None) {
            Hold::Shared => GATE.leave_shared(),
            Hold::Exclusive => GATE.leave_exclusive(),
            Hold::None => {}
        }
    }
}

/// Called before building a session that captures a CUDA graph: if this thread holds the gate
/// shared, wait until no other thread holds it and hold it exclusively for the rest of the
/// unit of work. Nothing happens when the thread holds it exclusively already or not at all.
pub(crate) fn exclusive_for_capture() {
    if HELD.get() == Hold::Shared {
        GATE.upgrade();
        HELD.set(Hold::Exclusive);
    }
}

/// Whether this thread holds the gate exclusively (for tests and logs).
pub fn holds_exclusive() -> bool {
    HELD.get() == Hold::Exclusive
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{mpsc, Arc, Mutex};
    use std::thread;
    use std::time::Duration;

    // The gate is process-wide: these tests run in one test so that they do not interleave.
    #[test]
    fn capture_waits_for_other_threads_and_excludes_them_until_released() {
        // Nesting: an inner hold releases nothing; an upgrade without a hold does nothing.
        exclusive_for_capture();
        assert!(!holds_exclusive());
        {
            let _outer = gpu_work();
            {
                let _inner = gpu_work();
            }
            assert!(
                HELD.get() == Hold::Shared,
                "an inner drop released the hold"
            );
        }
        assert!(HELD.get() == Hold::None);

        // Another thread in a unit of work: the capturing thread waits for it.
        let (other_started, started) = mpsc::channel();
        let (release_other, release) = mpsc::channel::<()>();
        let other = thread::spawn(move || {
            let _work = gpu_work();
            other_started.send(()).unwrap();
            release.recv().unwrap();
        });
        started.recv().unwrap();
        let (captured_tx, captured) = mpsc::channel();
        let (end_capture, end) = mpsc::channel::<()>();
        let capturer = thread::spawn(move || {
            let _work = gpu_work();
            exclusive_for_capture();
            captured_tx.send(holds_exclusive()).unwrap();
            end.recv().unwrap();
        });
        assert!(
            captured.recv_timeout(Duration::from_millis(300)).is_err(),
            "the capture began while another thread was in a unit of GPU work"
        );
        release_other.send(()).unwrap();
        other.join().unwrap();
        assert!(captured.recv_timeout(Duration::from_secs(10)).unwrap());

        // While the capture holds the gate, a new unit of work elsewhere waits.
        let (entered_tx, entered) = mpsc::channel();
        let late = thread::spawn(move || {
            let _work = gpu_work();
            entered_tx.send(()).unwrap();
        });
        assert!(
            entered.recv_timeout(Duration::from_millis(300)).is_err(),
            "another thread started GPU work during a capture"
        );
        end_capture.send(()).unwrap();
        capturer.join().unwrap();
        entered.recv_timeout(Duration::from_secs(10)).unwrap();
        late.join().unwrap();

        // A waiting capture goes first: a thread that ends a unit of work and starts the next
        // at once (a saturated consumer) waits behind it instead of winning the gate back.
        let order = Arc::new(Mutex::new(Vec::new()));
        let (busy_holds, holds) = mpsc::channel();
        let (let_go, go) = mpsc::channel::<()>();
        let busy = {
            let order = Arc::clone(&order);
            thread::spawn(move || {
                let work = gpu_work();
                busy_holds.send(()).unwrap();
                go.recv().unwrap();
                drop(work);
                let _next = gpu_work();
                order.lock().unwrap().push("next unit");
            })
        };
        holds.recv().unwrap();
        let capturer = {
            let order = Arc::clone(&order);
            thread::spawn(move || {
                let _work = gpu_work();
                exclusive_for_capture();
                order.lock().unwrap().push("capture");
                thread::sleep(Duration::from_millis(50));
            })
        };
        // Let the capture start waiting, then end the busy thread's unit.
        thread::sleep(Duration::from_millis(200));
        let_go.send(()).unwrap();
        busy.join().unwrap();
        capturer.join().unwrap();
        assert_eq!(*order.lock().unwrap(), ["capture", "next unit"]);
    }
}
