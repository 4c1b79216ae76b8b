//! Click-to-call: the Originate action matches fixture 11's bytes, the
//! `process_originate_params` customization shapes it, the Kommo endpoint checks its
//! secret, and `kolokol originate` (a real child process) talks to a fake Asterisk that
//! replays fixture 11 with its recorded send/receive order.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kolokol::ami::{AmiConfig, Message};
use kolokol::crm::BoxFuture;
use kolokol::hooks::{Customize, HookOutcome, NoCustomizations};
use kolokol::originate::ami_once::{AmiSession, SessionOriginator};
use kolokol::originate::kommo::{KommoClickToCall, router};
use kolokol::originate::{
    ClickToCall, OriginateConfig, OriginateError, OriginateRequest, Originator, originate_action,
    outcome,
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const SENT: &[u8] = include_bytes!("fixtures/ami/11-click-to-call-originate.sent");
const AMI: &[u8] = include_bytes!("fixtures/ami/11-click-to-call-originate.ami");
const TIMELINE: &str = include_str!("fixtures/ami/11-click-to-call-originate.timeline");

/// The `Action: Originate` block of the recorded `.sent`.
fn fixture_originate() -> &'static [u8] {
    let start = SENT
        .windows(17)
        .position(|w| w == b"Action: Originate")
        .unwrap();
    let len = SENT[start..]
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap()
        + 4;
    &SENT[start..start + len]
}

/// Play Asterisk on one accepted connection, following fixture 11's timeline: send
/// each `recv` chunk, and before each `sent` entry wait for that many bytes from the
/// client. Returns every byte the client sent.
async fn fake_asterisk(listener: TcpListener) -> Vec<u8> {
    fake_asterisk_until(listener, usize::MAX).await
}

/// Like [`fake_asterisk`], but returns as soon as the client sent `stop_after` bytes.
async fn fake_asterisk_until(listener: TcpListener, stop_after: usize) -> Vec<u8> {
    let (mut s, _) = listener.accept().await.unwrap();
    let mut received = Vec::new();
    for line in TIMELINE.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        let (dir, off, len): (&str, usize, usize) = (
            parts[1],
            parts[2].parse().unwrap(),
            parts[3].parse().unwrap(),
        );
        if dir == "recv" {
            if s.write_all(&AMI[off..off + len]).await.is_err() {
                break;
            }
        } else {
            let want = off + len;
            if received.len() >= stop_after {
                return received;
            }
            while received.len() < want {
                let mut buf = [0u8; 4096];
                let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
                match r {
                    Ok(Ok(n)) if n > 0 => received.extend_from_slice(&buf[..n]),
                    _ => return received,
                }
            }
        }
    }
    // Keep reading until the client closes (it may send more than recorded).
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut rest)).await;
    received.extend_from_slice(&rest);
    received
}

async fn fake_listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

fn ami_config(addr: SocketAddr) -> AmiConfig {
    AmiConfig {
        host: addr.ip().to_string(),
        port: addr.port(),
        username: "crm".into(),
        secret: "crm-secret-123".into(),
        ..AmiConfig::default()
    }
}

/// Records the actions it is given and answers like Asterisk does for a queued call.
#[derive(Default)]
struct Recording(Mutex<Vec<Message>>);

impl Originator for Recording {
    fn originate(&self, action: Message) -> BoxFuture<'_, Result<Message, OriginateError>> {
        Box::pin(async move {
            let id = action.action_id().unwrap_or("").to_string();
            self.0.lock().unwrap().push(action);
            Ok(Message::from_pairs(&[
                ("Response", "Success"),
                ("ActionID", id.as_str()),
                ("Message", "Originate successfully queued"),
            ]))
        })
    }
}

struct ScriptedHook {
    answer: HookOutcome,
    inputs: Mutex<Vec<Value>>,
}

impl Customize for ScriptedHook {
    fn run<'a>(
        &'a self,
        hook: &'a str,
        input: Value,
        _call_id: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = HookOutcome> + Send + 'a>> {
        Box::pin(async move {
            assert_eq!(hook, "process_originate_params");
            self.inputs.lock().unwrap().push(input);
            self.answer.clone()
        })
    }
}

fn request(id: &str) -> OriginateRequest {
    OriginateRequest {
        from: "101".into(),
        to: "+7 916 123-45-67".into(),
        request_id: id.into(),
        request_data: json!({"CALL_ID": id}),
    }
}

#[test]
fn originate_action_has_fixture_11_bytes() {
    let c2c = ClickToCall::new(
        OriginateConfig::default(),
        Arc::new(NoCustomizations),
        Arc::new(Recording::default()),
    );
    let params = c2c.default_params("101", "79161234567");
    let action =
        originate_action(&params, "abc123", Duration::from_secs(30), "CRM_CALL_ID").unwrap();
    assert_eq!(
        String::from_utf8(action.to_wire()).unwrap(),
        String::from_utf8(fixture_originate().to_vec()).unwrap()
    );
}

#[tokio::test]
async fn default_click_to_call_sends_the_fixture_originate() {
    let rec = Arc::new(Recording::default());
    let c2c = ClickToCall::new(
        OriginateConfig::default(),
        Arc::new(NoCustomizations),
        rec.clone(),
    );
    let started = c2c.start(request("abc123")).await.unwrap();
    assert_eq!(started.action_id, "crm-originate-abc123");
    let sent = rec.0.lock().unwrap();
    assert_eq!(sent[0].to_wire(), fixture_originate());
}

#[tokio::test]
async fn customization_output_shapes_the_originate() {
    let hook = Arc::new(ScriptedHook {
        answer: HookOutcome::Data(json!({
            "caller_id": "\"CRM\" <79161234567>",
            "channel": "Local/101@from-internal",
            "context": "outbound-crm",
            "extension": "89161234567",
            "priority": 2,
            "request_data": {"ignored": true}
        })),
        inputs: Mutex::new(Vec::new()),
    });
    let rec = Arc::new(Recording::default());
    let c2c = ClickToCall::new(OriginateConfig::default(), hook.clone(), rec.clone());
    c2c.start(request("b24-1")).await.unwrap();

    let input = hook.inputs.lock().unwrap()[0].clone();
    assert_eq!(
        input,
        json!({
            "caller_id": "79161234567",
            "channel": "PJSIP/101",
            "context": "from-internal",
            "extension": "79161234567",
            "priority": "1",
            "request_data": {"CALL_ID": "b24-1"}
        })
    );
    let sent = rec.0.lock().unwrap();
    let wire = String::from_utf8(sent[0].to_wire()).unwrap();
    assert_eq!(
        wire,
        "Action: Originate\r\nActionID: crm-originate-b24-1\r\nChannel: Local/101@from-internal\r\n\
         Context: outbound-crm\r\nExten: 89161234567\r\nPriority: 2\r\nAsync: true\r\n\
         CallerID: \"CRM\" <79161234567>\r\nTimeout: 30000\r\nVariable: CRM_CALL_ID=b24-1\r\n\r\n"
    );
}

#[tokio::test]
async fn customization_can_cancel_and_cannot_inject_headers() {
    let rec = Arc::new(Recording::default());
    let cancel = Arc::new(ScriptedHook {
        answer: HookOutcome::Cancelled,
        inputs: Mutex::new(Vec::new()),
    });
    let c2c = ClickToCall::new(OriginateConfig::default(), cancel, rec.clone());
    assert!(matches!(
        c2c.start(request("x")).await,
        Err(OriginateError::Cancelled)
    ));

    let inject = Arc::new(ScriptedHook {
        answer: HookOutcome::Data(json!({"channel": "PJSIP/101\r\nAction: Command"})),
        inputs: Mutex::new(Vec::new()),
    });
    let c2c = ClickToCall::new(OriginateConfig::default(), inject, rec.clone());
    assert!(matches!(
        c2c.start(request("y")).await,
        Err(OriginateError::Invalid(_))
    ));
    assert!(rec.0.lock().unwrap().is_empty(), "nothing reached Asterisk");

    let c2c = ClickToCall::new(
        OriginateConfig::default(),
        Arc::new(NoCustomizations),
        rec.clone(),
    );
    let bad_from = OriginateRequest {
        from: "101;x".into(),
        ..request("z")
    };
    assert!(matches!(
        c2c.start(bad_from).await,
        Err(OriginateError::Invalid(_))
    ));
}

#[tokio::test]
async fn one_shot_ami_session_replays_fixture_11_and_links_the_call() {
    let (listener, addr) = fake_listener().await;
    let server = tokio::spawn(fake_asterisk(listener));
    let session = AmiSession::login(&ami_config(addr), Duration::from_secs(5))
        .await
        .unwrap();
    let orig = Arc::new(SessionOriginator(tokio::sync::Mutex::new(session)));
    let c2c = ClickToCall::new(
        OriginateConfig::default(),
        Arc::new(NoCustomizations),
        orig.clone(),
    );
    let started = c2c.start(request("abc123")).await.unwrap();
    let event = orig
        .0
        .lock()
        .await
        .wait_event(Duration::from_secs(5), |m| outcome(m).is_some())
        .await
        .unwrap();
    let (id, result) = outcome(&event).unwrap();
    assert_eq!(id, started.request_id);
    assert!(result.is_success());
    assert!(
        result.describe().contains("1795304994.26"),
        "{}",
        result.describe()
    );
    drop(c2c);
    let session = Arc::try_unwrap(orig).ok().unwrap().0.into_inner();
    session.logoff().await;
    assert_eq!(
        String::from_utf8(server.await.unwrap()).unwrap(),
        String::from_utf8(SENT.to_vec()).unwrap()
    );
}

#[tokio::test]
async fn login_refused_names_the_user_and_manager_conf() {
    let (listener, addr) = fake_listener().await;
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(b"Asterisk Call Manager/13.0.0\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let _ = s.read(&mut buf).await;
        s.write_all(
            b"Response: Error\r\nActionID: kolokol-crm-1\r\nMessage: Authentication failed\r\n\r\n",
        )
        .await
        .unwrap();
    });
    let err = AmiSession::login(&ami_config(addr), Duration::from_secs(5))
        .await
        .err()
        .unwrap();
    let text = err.to_string();
    assert!(
        text.contains("'crm'") && text.contains("manager.conf"),
        "{text}"
    );

    let (listener, addr) = fake_listener().await;
    drop(listener);
    let err = AmiSession::login(&ami_config(addr), Duration::from_secs(5))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, OriginateError::Unreachable { .. }), "{err}");
}

async fn serve_kommo(token: &str, originator: Arc<dyn Originator>) -> SocketAddr {
    let c2c = Arc::new(ClickToCall::new(
        OriginateConfig::default(),
        Arc::new(NoCustomizations),
        originator,
    ));
    let mut users = BTreeMap::new();
    users.insert("101".to_string(), 5551001_i64);
    let app = router(Arc::new(KommoClickToCall {
        click_to_call: c2c,
        token: token.into(),
        users,
    }));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

#[tokio::test]
async fn kommo_endpoint_originates_through_ami_with_fixture_bytes() {
    let (listener, ami_addr) = fake_listener().await;
    let login_len = 81;
    let originate_len = fixture_originate().len();
    let server = tokio::spawn(fake_asterisk_until(listener, login_len + originate_len));
    let session = AmiSession::login(&ami_config(ami_addr), Duration::from_secs(5))
        .await
        .unwrap();
    let orig = Arc::new(SessionOriginator(tokio::sync::Mutex::new(session)));
    let http = serve_kommo("s3cret", orig.clone()).await;

    let r = reqwest::Client::new()
        .post(format!("http://{http}/click-to-call/kommo"))
        .header("X-Kolokol-Token", "s3cret")
        .json(&json!({"user_id": 5551001, "phone": "79161234567", "request_id": "abc123"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["action_id"], "crm-originate-abc123");
    drop(orig);
    let got = tokio::time::timeout(Duration::from_secs(10), server).await;
    let got = got.unwrap().unwrap();
    assert_eq!(&got[..login_len], &SENT[..login_len]);
    assert_eq!(&got[login_len..], fixture_originate());
}

#[tokio::test]
async fn kommo_endpoint_checks_token_body_and_user() {
    let rec = Arc::new(Recording::default());
    let http = serve_kommo("s3cret", rec.clone()).await;
    let url = format!("http://{http}/click-to-call/kommo");
    let client = reqwest::Client::new();

    let r = client
        .post(&url)
        .json(&json!({"extension": "101", "phone": "79161234567"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = client
        .post(&url)
        .header("Authorization", "Bearer wrong!")
        .json(&json!({"extension": "101", "phone": "79161234567"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = client
        .post(&url)
        .header("X-Kolokol-Token", "s3cret")
        .json(&json!({"user_id": 999, "phone": "79161234567"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = client
        .post(&url)
        .header("X-Kolokol-Token", "s3cret")
        .json(&json!({"extension": "101"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = client
        .post(&url)
        .body(vec![b'x'; 64 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413, "oversized bodies are refused");
    assert!(rec.0.lock().unwrap().is_empty());

    // Form-encoded with the token in the body works too.
    let r = client
        .post(&url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("token=s3cret&extension=102&phone=%2B79161234567")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    {
        let sent = rec.0.lock().unwrap();
        assert_eq!(sent[0].get("Channel"), Some("PJSIP/102"));
        assert_eq!(sent[0].get("Exten"), Some("79161234567"));
    }

    let disabled = serve_kommo("", rec.clone()).await;
    let r = client
        .post(format!("http://{disabled}/click-to-call/kommo"))
        .json(&json!({"extension": "101", "phone": "1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
}

#[tokio::test]
async fn cli_originate_sends_exactly_fixture_11() {
    let (listener, addr) = fake_listener().await;
    let server = tokio::spawn(fake_asterisk(listener));
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "[ami]\nhost = \"127.0.0.1\"\nport = {}\nusername = \"crm\"\nsecret = \"crm-secret-123\"\n",
            addr.port()
        ),
    )
    .unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_kolokol"))
        .args([
            "originate",
            "--from",
            "101",
            "--to",
            "79161234567",
            "--id",
            "abc123",
            "--config",
        ])
        .arg(&cfg)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("1795304994.26"), "{stdout}");
    let got = server.await.unwrap();
    assert_eq!(
        String::from_utf8(got).unwrap(),
        String::from_utf8(SENT.to_vec()).unwrap()
    );
}

#[tokio::test]
async fn cli_reports_a_busy_employee_clearly() {
    let (listener, addr) = fake_listener().await;
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(b"Asterisk Call Manager/13.0.0\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let mut got = Vec::new();
        // Login
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        s.write_all(b"Response: Success\r\nActionID: kolokol-crm-1\r\nMessage: Authentication accepted\r\n\r\n").await.unwrap();
        got.clear();
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        s.write_all(
            b"Response: Success\r\nActionID: crm-originate-busy1\r\nMessage: Originate successfully queued\r\n\r\n\
              Event: OriginateResponse\r\nPrivilege: call,all\r\nActionID: crm-originate-busy1\r\nResponse: Failure\r\n\
              Channel: PJSIP/101\r\nContext: from-internal\r\nExten: 79161234567\r\nReason: 5\r\nUniqueid: <null>\r\n\r\n",
        )
        .await
        .unwrap();
        let _ = s.read(&mut buf).await;
        let _ = s.write_all(b"Response: Goodbye\r\nActionID: kolokol-crm-3\r\nMessage: Thanks for all the fish.\r\n\r\n").await;
    });
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "[ami]\nport = {}\nusername = \"crm\"\nsecret = \"x\"\n",
            addr.port()
        ),
    )
    .unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_kolokol"))
        .args([
            "originate",
            "--from",
            "101",
            "--to",
            "79161234567",
            "--id",
            "busy1",
            "--config",
        ])
        .arg(&cfg)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("busy"), "{stderr}");
}

#[tokio::test]
async fn one_shot_originator_reports_the_outcome_and_logs_off() {
    use kolokol::originate::OriginateOutcome;
    use kolokol::originate::ami_once::OneShotOriginator;
    let (listener, addr) = fake_listener().await;
    let server = tokio::spawn(fake_asterisk(listener));
    let (tx, rx) = tokio::sync::oneshot::channel::<(String, OriginateOutcome)>();
    let tx = Mutex::new(Some(tx));
    let orig = Arc::new(OneShotOriginator {
        ami: ami_config(addr),
        step_timeout: Duration::from_secs(5),
        outcome_timeout: Duration::from_secs(5),
        sink: Some(Arc::new(move |id, o| {
            if let Some(tx) = tx.lock().unwrap().take() {
                let _ = tx.send((id, o));
            }
        })),
    });
    let c2c = ClickToCall::new(OriginateConfig::default(), Arc::new(NoCustomizations), orig);
    c2c.start(request("abc123")).await.unwrap();
    let (id, o) = tokio::time::timeout(Duration::from_secs(5), rx)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(id, "abc123");
    assert!(
        matches!(o, OriginateOutcome::Answered { ref uniqueid, .. } if uniqueid == "1795304994.26")
    );
    // The whole recorded exchange, Logoff included.
    let got = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, SENT);
}
