//! The one thread that owns the SQLite connection.
//!
//! Every read and write of the daemon goes through a queue to this thread, so the async
//! event loop never waits on disk. The thread takes whatever is queued (up to
//! [`MAX_BATCH`] operations) and runs it in ONE transaction, each operation inside its own
//! savepoint: under load many enqueues share one commit (one fsync), while a failing
//! operation is rolled back alone. Results are handed back only after the commit, so a
//! caller that got `Ok` knows its data is on disk.

use std::sync::Arc;
use std::sync::mpsc;

use rusqlite::Connection;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use super::StoreError;

/// At most this many operations share one transaction.
pub(crate) const MAX_BATCH: usize = 512;

/// One queued unit of work, type-erased.
pub(crate) trait Op: Send {
    /// Run inside the batch transaction (within a savepoint).
    fn run(&mut self, conn: &Connection) -> Result<(), StoreError>;
    /// Deliver the outcome: the run's output if the batch committed, else the error.
    fn finish(self: Box<Self>, committed: Result<(), &StoreError>);
}

/// Where a result goes: an async waiter or a blocking one.
pub(crate) enum Reply<T> {
    Async(oneshot::Sender<Result<T, StoreError>>),
    Sync(mpsc::SyncSender<Result<T, StoreError>>),
}

struct FnOp<F, T> {
    f: Option<F>,
    out: Option<Result<T, StoreError>>,
    reply: Option<Reply<T>>,
    /// Held until the op is finished: this is what bounds the queue.
    permit: Option<OwnedSemaphorePermit>,
}

impl<F, T> Op for FnOp<F, T>
where
    F: FnOnce(&Connection) -> Result<T, StoreError> + Send,
    T: Send,
{
    fn run(&mut self, conn: &Connection) -> Result<(), StoreError> {
        let Some(f) = self.f.take() else {
            return Ok(());
        };
        match f(conn) {
            Ok(v) => {
                self.out = Some(Ok(v));
                Ok(())
            }
            Err(e) => {
                // The savepoint is rolled back; the error itself goes to the caller.
                let shown = StoreError::Batch(e.to_string());
                self.out = Some(Err(e));
                Err(shown)
            }
        }
    }

    fn finish(mut self: Box<Self>, committed: Result<(), &StoreError>) {
        let out = match (committed, self.out.take()) {
            (_, Some(Err(e))) => Err(e),
            (Ok(()), Some(Ok(v))) => Ok(v),
            (Err(e), Some(Ok(_))) => Err(StoreError::Batch(e.to_string())),
            (_, None) => Err(StoreError::Batch("operation did not run".into())),
        };
        // Free the queue slot before the caller can observe the result.
        drop(self.permit.take());
        match self.reply.take() {
            Some(Reply::Async(tx)) => {
                let _ = tx.send(out);
            }
            Some(Reply::Sync(tx)) => {
                let _ = tx.send(out);
            }
            None => {}
        }
    }
}

/// The sending side, shared by all clones of a `Store`.
pub(crate) struct Writer {
    tx: mpsc::Sender<Box<dyn Op>>,
    slots: Arc<Semaphore>,
}

impl Writer {
    /// Start the thread on an open connection. `queue` bounds how many async
    /// operations may wait at once; callers beyond that wait for a slot.
    pub(crate) fn start(conn: Connection, queue: usize, name: String) -> std::io::Result<Writer> {
        let (tx, rx) = mpsc::channel::<Box<dyn Op>>();
        std::thread::Builder::new()
            .name("kolokol-sqlite".into())
            .spawn(move || run_thread(conn, rx, &name))?;
        Ok(Writer {
            tx,
            slots: Arc::new(Semaphore::new(queue.max(1))),
        })
    }

    /// Run `f` on the database thread; await the result (after commit).
    pub(crate) async fn call<F, T>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Closed)?;
        let (tx, rx) = oneshot::channel();
        let op = FnOp {
            f: Some(f),
            out: None,
            reply: Some(Reply::Async(tx)),
            permit: Some(permit),
        };
        self.tx.send(Box::new(op)).map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Run `f` on the database thread and block this thread until it is committed.
    ///
    /// For the synchronous traits (`crm::JobSteps`, `crm::TokenStore`) whose contract is
    /// "durable when this returns". On tokio's multi-thread runtime (the daemon) the
    /// wait is moved off the event loop with `block_in_place`; elsewhere it blocks
    /// the caller for one commit. Not bounded by the queue: these calls are few
    /// (one per CRM step) and must not deadlock behind the enqueue backlog.
    pub(crate) fn call_blocking<F, T>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = mpsc::sync_channel(1);
        let op = FnOp {
            f: Some(f),
            out: None,
            reply: Some(Reply::Sync(tx)),
            permit: None,
        };
        self.tx.send(Box::new(op)).map_err(|_| StoreError::Closed)?;
        let wait = move || rx.recv().map_err(|_| StoreError::Closed)?;
        let multi = tokio::runtime::Handle::try_current()
            .map(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
            .unwrap_or(false);
        if multi {
            tokio::task::block_in_place(wait)
        } else {
            wait()
        }
    }

    /// How many async operations are queued or running right now.
    pub(crate) fn queued(&self, capacity: usize) -> usize {
        capacity.saturating_sub(self.slots.available_permits())
    }
}

fn run_thread(mut conn: Connection, rx: mpsc::Receiver<Box<dyn Op>>, name: &str) {
    let mut batch: Vec<Box<dyn Op>> = Vec::with_capacity(MAX_BATCH);
    // Ends when every `Store` clone is gone and the queue is drained.
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let committed = run_batch(&mut conn, &mut batch);
        if let Err(e) = &committed {
            tracing::error!(db = %name, error = %e, ops = batch.len(), "SQLite transaction failed");
        }
        for op in batch.drain(..) {
            op.finish(committed.as_ref().map(|_| ()));
        }
    }
    tracing::debug!(db = %name, "SQLite thread stopped");
}

fn run_batch(conn: &mut Connection, batch: &mut [Box<dyn Op>]) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    for op in batch.iter_mut() {
        tx.execute_batch("SAVEPOINT op")?;
        // A panicking operation (a bug) fails alone instead of killing the thread
        // that every caller depends on.
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| op.run(&tx)));
        match ran {
            Ok(Ok(())) => tx.execute_batch("RELEASE op")?,
            Ok(Err(_)) | Err(_) => tx.execute_batch("ROLLBACK TO op; RELEASE op")?,
        }
    }
    tx.commit()?;
    Ok(())
}
