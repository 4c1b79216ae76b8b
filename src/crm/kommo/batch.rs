//! Coalescing single-item creates into Kommo's array endpoints.
//!
//! Kommo takes arrays on every create (`/api/v4/contacts`, `/leads`, `/leads/unsorted/sip`,
//! `/calls`, `/tasks`) and counts one request against the 7 requests/s limit however
//! many items it carries. Each outbox job still speaks in single items; a [`Batcher`]
//! per endpoint gathers the items that arrive while the previous request is waiting
//! for the rate limiter or for Kommo (group commit), plus a short `batch_window`, and
//! sends them as one array. When the connector is idle an item goes out alone at once;
//! after an outage, with many calls queued, the number of requests per call drops.
//!
//! Answers are matched back by `request_id`, which Kommo echoes per item (both in
//! `_embedded.<key>` and in `errors`/`validation-errors`). We set it to the item's
//! index in the batch.
//!
//! A 400 `validation-errors` answer refuses the whole array, so one bad item (say, a
//! customization returning a broken field) must not sink its neighbours: the batch is
//! then split and each item sent alone, which gives every job its own verdict.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::oneshot;

use super::NAME;
use super::client::{KommoClient, KommoError};
use crate::crm::CrmError;

/// What Kommo said about one item of a batch.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ItemAnswer {
    /// The item's entry of `_embedded.<key>` (with `id`), if it was created.
    pub item: Option<Value>,
    /// The entries of `errors` that name this item.
    pub errors: Vec<Value>,
}

type Reply = oneshot::Sender<Result<ItemAnswer, CrmError>>;

struct Pending {
    item: Value,
    reply: Reply,
}

#[derive(Default)]
struct Queue {
    items: Vec<Pending>,
    /// A flusher task is running: new items only need to be queued.
    flushing: bool,
}

/// One array endpoint's batcher. Cheap to share behind `Arc`.
pub struct Batcher {
    client: Arc<KommoClient>,
    path: &'static str,
    key: &'static str,
    max_items: usize,
    window: Duration,
    queue: Mutex<Queue>,
}

impl Batcher {
    /// A batcher posting to `path` whose answer lists created items under
    /// `_embedded.<key>`; at most `max_items` per request (1 turns batching off).
    pub fn new(
        client: Arc<KommoClient>,
        path: &'static str,
        key: &'static str,
        max_items: usize,
        window: Duration,
    ) -> Arc<Batcher> {
        Arc::new(Batcher {
            client,
            path,
            key,
            max_items: max_items.clamp(1, 250),
            window,
            queue: Mutex::new(Queue::default()),
        })
    }

    /// Send `item` (in a batch with whatever else is queued) and wait for its verdict.
    pub async fn submit(self: &Arc<Self>, item: Value) -> Result<ItemAnswer, CrmError> {
        let (tx, rx) = oneshot::channel();
        let start_flusher = {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            q.items.push(Pending { item, reply: tx });
            !std::mem::replace(&mut q.flushing, true)
        };
        if start_flusher {
            tokio::spawn(self.clone().flush());
        }
        rx.await.unwrap_or_else(|_| {
            Err(CrmError::Retryable {
                message: format!("Kommo {}: the batch sender stopped", self.path),
                retry_after: None,
            })
        })
    }

    /// Send batches until the queue is empty.
    async fn flush(self: Arc<Self>) {
        // If this task dies, the next submit must start a new one.
        let _reset = ResetOnDrop(&self.queue);
        if !self.window.is_zero() {
            tokio::time::sleep(self.window).await;
        }
        loop {
            let batch: Vec<Pending> = {
                let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                if q.items.is_empty() {
                    q.flushing = false;
                    return;
                }
                let n = q.items.len().min(self.max_items);
                q.items.drain(..n).collect()
            };
            self.send(batch).await;
        }
    }

    async fn send(&self, batch: Vec<Pending>) {
        let body = Value::Array(
            batch
                .iter()
                .enumerate()
                .map(|(i, p)| with_request_id(&p.item, i))
                .collect(),
        );
        if batch.len() > 1 {
            tracing::debug!(
                crm = NAME,
                path = self.path,
                items = batch.len(),
                "sending a Kommo batch"
            );
        }
        match self.client.post(self.path, &body).await {
            Ok(answer) => {
                let mut answers = split_answer(&answer, self.key, batch.len());
                for (p, a) in batch.into_iter().zip(answers.drain(..)) {
                    let _ = p.reply.send(Ok(a));
                }
            }
            Err(KommoError::Validation { .. }) if batch.len() > 1 => {
                tracing::warn!(
                    crm = NAME,
                    path = self.path,
                    items = batch.len(),
                    "Kommo refused a batch (400): sending its items one by one to find the bad one"
                );
                for p in batch {
                    let one = with_request_id(&p.item, 0);
                    let verdict = match self.client.post(self.path, &Value::Array(vec![one])).await
                    {
                        Ok(answer) => {
                            Ok(split_answer(&answer, self.key, 1).pop().unwrap_or_default())
                        }
                        Err(e) => Err(CrmError::from(e)),
                    };
                    let _ = p.reply.send(verdict);
                }
            }
            Err(e) => {
                let e = CrmError::from(e);
                for p in batch {
                    let _ = p.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

struct ResetOnDrop<'a>(&'a Mutex<Queue>);

impl Drop for ResetOnDrop<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut q = self.0.lock().unwrap_or_else(|p| p.into_inner());
            q.flushing = false;
            // Dropping the senders answers every waiter with "batch sender stopped".
            q.items.clear();
        }
    }
}

/// `item` with `request_id` set to its index in the batch (objects only).
fn with_request_id(item: &Value, index: usize) -> Value {
    let mut v = item.clone();
    if let Value::Object(m) = &mut v {
        m.insert("request_id".into(), json!(index.to_string()));
    }
    v
}

fn request_index(v: &Value) -> Option<usize> {
    match v.get("request_id")? {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_u64().map(|n| n as usize),
        _ => None,
    }
}

/// Split a batch answer into one [`ItemAnswer`] per item, by `request_id`. An answer
/// without `request_id`s can only be matched for a one-item batch.
pub fn split_answer(answer: &Value, key: &str, n: usize) -> Vec<ItemAnswer> {
    let mut out = vec![ItemAnswer::default(); n];
    let created = answer
        .pointer(&format!("/_embedded/{key}"))
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    for (pos, item) in created.iter().enumerate() {
        let idx = request_index(item).or((n == 1 && pos == 0).then_some(0));
        if let Some(slot) = idx.and_then(|i| out.get_mut(i)) {
            slot.item = Some(item.clone());
        }
    }
    for p in ["/_embedded/errors", "/errors"] {
        for e in answer
            .pointer(p)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let idx = request_index(e).or((n == 1).then_some(0));
            if let Some(slot) = idx.and_then(|i| out.get_mut(i)) {
                slot.errors.push(e.clone());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_matched_by_request_id_not_position() {
        let answer = json!({"_embedded": {
            "calls": [{"id": 11, "request_id": "2"}, {"id": 10, "request_id": "0"}],
            "errors": [{"request_id": "1", "status": 404, "detail": "Entity with this phone number not found"}],
        }});
        let a = split_answer(&answer, "calls", 3);
        assert_eq!(
            a[0].item.as_ref().and_then(|i| i.get("id")),
            Some(&json!(10))
        );
        assert_eq!(a[1].item, None);
        assert_eq!(a[1].errors.len(), 1);
        assert_eq!(
            a[2].item.as_ref().and_then(|i| i.get("id")),
            Some(&json!(11))
        );
        assert!(a[0].errors.is_empty() && a[2].errors.is_empty());
    }

    #[test]
    fn a_single_item_answer_without_request_id_is_that_item() {
        let answer = json!({"_embedded": {"contacts": [{"id": 5}]}, "errors": [{"detail": "x"}]});
        let a = split_answer(&answer, "contacts", 1);
        assert_eq!(a[0].item, Some(json!({"id": 5})));
        assert_eq!(a[0].errors.len(), 1);
        // With several items an unlabelled answer cannot be attributed.
        let a = split_answer(&answer, "contacts", 2);
        assert_eq!(a, vec![ItemAnswer::default(); 2]);
    }

    #[test]
    fn request_ids_are_indexes_and_replace_any_from_hooks() {
        let v = with_request_id(&json!({"uniq": "c1", "request_id": "hook"}), 3);
        assert_eq!(v["request_id"], json!("3"));
        assert_eq!(v["uniq"], json!("c1"));
    }
}
