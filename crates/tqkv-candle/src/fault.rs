//! A [`KvCache`] wrapper that fails on a chosen call, for testing that the layers built on the
//! trait (an attention layer, a model step over many layers, a server) leave every cache as it
//! was when one call in the middle of a step fails. The wrapper goes into the layer; its
//! [`FaultSwitch`] stays with the test and arms one fault at a time.

use crate::cache::{KvCache, MemoryUsage};
use crate::error::{Error, Result};
use candle_core::Tensor;
use std::sync::{Arc, Mutex};

/// Which call fails, counted from when the fault is armed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultAt {
    /// The n-th append (0: the next), before the inner cache sees it.
    Append(usize),
    /// The n-th attend, after the inner cache appended the step's tokens.
    Attend(usize),
}

#[derive(Debug, Default)]
struct Armed {
    fault: Option<FaultAt>,
    appends: usize,
    attends: usize,
}

/// Arms the faults of a [`FaultCache`] from outside the layer that owns it.
#[derive(Debug, Clone, Default)]
pub struct FaultSwitch(Arc<Mutex<Armed>>);

impl FaultSwitch {
    /// Arms one fault (replacing an armed one); it fires once.
    pub fn arm(&self, at: FaultAt) {
        if let Ok(mut a) = self.0.lock() {
            *a = Armed {
                fault: Some(at),
                appends: 0,
                attends: 0,
            };
        }
    }

    /// Whether the armed fault has not fired yet.
    pub fn armed(&self) -> bool {
        self.0.lock().map(|a| a.fault.is_some()).unwrap_or(false)
    }

    /// Counts a call; true when it is the one to fail (the fault is then disarmed).
    fn fire(&self, append: bool) -> bool {
        let Ok(mut a) = self.0.lock() else {
            return false;
        };
        let n = if append {
            a.appends += 1;
            a.appends - 1
        } else {
            a.attends += 1;
            a.attends - 1
        };
        let hit = match a.fault {
            Some(FaultAt::Append(k)) => append && k == n,
            Some(FaultAt::Attend(k)) => !append && k == n,
            None => false,
        };
        if hit {
            a.fault = None;
        }
        hit
    }
}

/// Delegates every call to an inner cache, except the one its [`FaultSwitch`] armed, which
/// fails with [`Error::Protocol`] ("injected fault").
pub struct FaultCache {
    inner: Box<dyn KvCache>,
    switch: FaultSwitch,
}

impl FaultCache {
    /// Wraps `inner`, with its switch (no fault armed).
    pub fn new(inner: Box<dyn KvCache>) -> (Self, FaultSwitch) {
        let switch = FaultSwitch::default();
        (
            FaultCache {
                inner,
                switch: switch.clone(),
            },
            switch,
        )
    }

    /// The wrapped cache.
    pub fn into_inner(self) -> Box<dyn KvCache> {
        self.inner
    }
}

fn injected() -> Error {
    Error::Protocol("injected fault".into())
}

impl KvCache for FaultCache {
    fn append(&mut self, k: &Tensor, v: &Tensor, lens: Option<&[usize]>) -> Result<()> {
        if self.switch.fire(true) {
            return Err(injected());
        }
        self.inner.append(k, v, lens)
    }

    fn attend(&self, q: &Tensor, scale: f64) -> Result<Tensor> {
        if self.switch.fire(false) {
            return Err(injected());
        }
        self.inner.attend(q, scale)
    }

    fn seq_lens(&self) -> &[usize] {
        self.inner.seq_lens()
    }

    fn begin_step(&mut self) -> Result<()> {
        self.inner.begin_step()
    }

    fn poll_step(&self) -> Result<()> {
        self.inner.poll_step()
    }

    fn check_step(&self) -> Result<()> {
        self.inner.check_step()
    }

    fn commit_step(&mut self) {
        self.inner.commit_step()
    }

    fn rollback_step(&mut self) -> Result<()> {
        self.inner.rollback_step()
    }

    fn reset(&mut self) {
        self.inner.reset()
    }

    fn memory(&self) -> MemoryUsage {
        self.inner.memory()
    }

    fn kind_name(&self) -> String {
        self.inner.kind_name()
    }
}
