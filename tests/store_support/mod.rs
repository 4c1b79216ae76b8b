//! Shared helpers for the store tests: stage events and a CRM stand-in that behaves
//! like a real one (fails, asks to retry later, rejects, blocks) and records what it did.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kolokol::calls::{CallFull, Stage, StageEvent};
use kolokol::crm::{BoxFuture, Connector, CrmError, DeliveryReport, Job, JobSteps, Responsible};
use kolokol::store::{StorageConfig, Store};

/// A temp state dir and a config pointing at it.
pub fn temp_store() -> (tempfile::TempDir, StorageConfig, Store) {
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = StorageConfig {
        state_dir: dir.path().join("state"),
        ..Default::default()
    };
    let store = Store::open(&cfg).expect("open store");
    (dir, cfg, store)
}

pub fn call_full(call_id: &str) -> CallFull {
    CallFull {
        id: call_id.to_string(),
        client_phone: "+79161234567".into(),
        line_number: "74950000000".into(),
        answered_by: "101".into(),
        result: 200,
        duration: 42,
        talk_duration: 30,
        ..Default::default()
    }
}

pub fn event(call_id: &str, stage: Stage, conv: Option<&str>) -> StageEvent {
    StageEvent {
        stage,
        conversation_id: conv.map(str::to_string),
        call_full: call_full(call_id),
    }
}

/// The four stages of one answered call, in order.
pub fn call_stages(call_id: &str) -> Vec<StageEvent> {
    let conv = format!("{call_id}.1");
    vec![
        event(call_id, Stage::ConversationRequested, Some(&conv)),
        event(call_id, Stage::ConversationAccepted, Some(&conv)),
        event(call_id, Stage::ConversationEnded, Some(&conv)),
        event(call_id, Stage::CallEnded, None),
    ]
}

/// What the test CRM answers to one delivery.
#[derive(Debug, Clone)]
pub enum Answer {
    Ok,
    Retry(Option<Duration>),
    Reject(&'static str),
    Block,
    Panic,
    /// Do the first step, then never answer (the process "dies" here).
    HangAfterCreate,
    /// Take this long, then succeed.
    Slow(Duration),
}

/// One delivery as the CRM saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub job_id: i64,
    pub call_id: String,
    pub stage: Stage,
    pub conversation_id: Option<String>,
    pub attempts: u32,
    pub at: Instant,
}

#[derive(Default)]
pub struct State {
    /// Scripted answers per call id (consumed in order), then `Ok`.
    pub script: HashMap<String, VecDeque<Answer>>,
    /// Scripted answers for any call, consumed before the per-call ones.
    pub global: VecDeque<Answer>,
    pub seen: Vec<Seen>,
    /// Entities "created in the CRM", by job idempotency (call|stage|conv) → count.
    pub created: HashMap<String, u32>,
    /// Notes "added in the CRM", by the same key → count.
    pub notes: HashMap<String, u32>,
    /// Calls with a delivery in progress, to catch two jobs of one call at once.
    pub in_progress: HashSet<String>,
    pub overlap: bool,
}

/// A CRM stand-in with two idempotent steps per job: "create" (an entity) then "note".
pub struct TestCrm {
    pub name: &'static str,
    pub state: Arc<Mutex<State>>,
    /// Delay of every successful delivery (lets concurrency show).
    pub delay: Duration,
}

impl TestCrm {
    pub fn new(name: &'static str) -> Arc<TestCrm> {
        Arc::new(TestCrm {
            name,
            state: Arc::default(),
            delay: Duration::ZERO,
        })
    }

    pub fn with_delay(name: &'static str, delay: Duration) -> Arc<TestCrm> {
        Arc::new(TestCrm {
            name,
            state: Arc::default(),
            delay,
        })
    }

    pub fn script(&self, call_id: &str, answers: Vec<Answer>) {
        self.state
            .lock()
            .unwrap()
            .script
            .insert(call_id.to_string(), answers.into());
    }

    pub fn script_all(&self, answers: Vec<Answer>) {
        self.state.lock().unwrap().global = answers.into();
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    /// Successful deliveries (a note was added), by call, in order.
    pub fn delivered_stages(&self, call_id: &str) -> Vec<(Stage, Option<String>)> {
        let st = self.state.lock().unwrap();
        let mut v: Vec<_> = st
            .seen
            .iter()
            .filter(|s| s.call_id == call_id)
            .cloned()
            .collect();
        v.sort_by_key(|s| s.at);
        // keep only the attempts that succeeded: the last attempt of each job
        let mut out = Vec::new();
        let mut last: HashMap<i64, usize> = HashMap::new();
        for (i, s) in v.iter().enumerate() {
            last.insert(s.job_id, i);
        }
        let mut idx: Vec<usize> = last.values().copied().collect();
        idx.sort();
        for i in idx {
            out.push((v[i].stage, v[i].conversation_id.clone()));
        }
        out
    }
}

fn key(job: &Job) -> String {
    format!(
        "{}|{}|{}",
        job.call_full.id,
        job.stage.as_str(),
        job.conversation_id.as_deref().unwrap_or("")
    )
}

impl Connector for TestCrm {
    fn name(&self) -> &'static str {
        self.name
    }

    fn wants(&self, _stage: Stage) -> bool {
        true
    }

    fn deliver<'a>(
        &'a self,
        job: &'a Job,
        steps: &'a dyn JobSteps,
    ) -> BoxFuture<'a, Result<DeliveryReport, CrmError>> {
        Box::pin(async move {
            let call_id = job.call_full.id.clone();
            let answer = {
                let mut st = self.state.lock().unwrap();
                st.seen.push(Seen {
                    job_id: job.id,
                    call_id: call_id.clone(),
                    stage: job.stage,
                    conversation_id: job.conversation_id.clone(),
                    attempts: job.attempts,
                    at: Instant::now(),
                });
                if !st.in_progress.insert(call_id.clone()) {
                    st.overlap = true;
                }
                let global = st.global.pop_front();
                global.or_else(|| st.script.get_mut(&call_id).and_then(|q| q.pop_front()))
            };
            let res = self.answer(job, steps, answer.unwrap_or(Answer::Ok)).await;
            self.state.lock().unwrap().in_progress.remove(&call_id);
            res
        })
    }

    fn find_responsible<'a>(
        &'a self,
        _phone: &'a str,
    ) -> BoxFuture<'a, Result<Option<Responsible>, CrmError>> {
        Box::pin(async { Ok(None) })
    }
}

impl TestCrm {
    async fn answer(
        &self,
        job: &Job,
        steps: &dyn JobSteps,
        answer: Answer,
    ) -> Result<DeliveryReport, CrmError> {
        match answer {
            Answer::Retry(retry_after) => {
                return Err(CrmError::Retryable {
                    message: "503 Service Unavailable".into(),
                    retry_after,
                });
            }
            Answer::Reject(why) => {
                return Err(CrmError::Rejected {
                    message: format!("400 Bad Request: {why}"),
                });
            }
            Answer::Block => {
                return Err(CrmError::Blocked {
                    message: "403 Forbidden: account blocked".into(),
                });
            }
            Answer::Panic => panic!("test connector panics as asked"),
            Answer::Slow(d) => tokio::time::sleep(d).await,
            Answer::Ok | Answer::HangAfterCreate => {}
        }
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let k = key(job);
        // step 1: create the entity unless a previous attempt did
        let entity = match steps.get("create") {
            Some(v) => v,
            None => {
                let mut st = self.state.lock().unwrap();
                let n = st.created.entry(k.clone()).or_insert(0);
                *n += 1;
                let v = serde_json::json!({"entity_id": 1000 + job.id});
                drop(st);
                steps.put("create", &v).map_err(|e| CrmError::Retryable {
                    message: e,
                    retry_after: None,
                })?;
                v
            }
        };
        if matches!(answer, Answer::HangAfterCreate) {
            std::future::pending::<()>().await;
        }
        // step 2: the note
        if steps.get("note").is_none() {
            *self.state.lock().unwrap().notes.entry(k).or_insert(0) += 1;
            steps
                .put("note", &serde_json::json!({"note_id": 5000 + job.id}))
                .map_err(|e| CrmError::Retryable {
                    message: e,
                    retry_after: None,
                })?;
        }
        Ok(serde_json::json!({"entity": entity, "stage": job.stage.as_str()}))
    }
}

/// Wait (polling, up to `limit`) until `f` holds.
pub async fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    f()
}
