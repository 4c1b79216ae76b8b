//! The autodistribution cache warmed by a CRM registration, through the real daemon
//! (`kolokol::daemon::run`): the simulated PBX plays fixture 12's recorded call, the
//! sandbox Kommo and Bitrix24 register it over real HTTP, and the client's next FastAGI
//! session is answered from memory. The sandboxes' request logs prove it: no contact
//! search, no Bitrix24 lookup for that session.

mod bitrix24_support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kolokol::calls::{Direction, Stage};
use kolokol::crm::kommo::KommoConnector;
use kolokol::crm::{Connector, Job, LearnedResponsible, MemoryTokenStore};
use kolokol::hooks::NoCustomizations;
use kolokol::sandbox::ami_server::Replay;
use kolokol::sandbox::demo::DemoWorld;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const FIXTURE_IN: &[u8] = include_bytes!("fixtures/agi/12-autodistribution.in");
const CLIENT: &str = "79161234567";

/// Fixture 12's `agi_*` block (through the empty line), with another caller.
fn agi_header(callerid: &str) -> Vec<u8> {
    let end = FIXTURE_IN
        .windows(2)
        .position(|w| w == b"\n\n")
        .expect("fixture has a header")
        + 2;
    String::from_utf8_lossy(&FIXTURE_IN[..end])
        .replace(
            "agi_callerid: 79161234567\n",
            &format!("agi_callerid: {callerid}\n"),
        )
        .into_bytes()
}

/// Play Asterisk for one session: every command gets `200 result=1`; returns the
/// commands kolokol sent before closing.
async fn agi_session(addr: SocketAddr, callerid: &str) -> String {
    let stream = TcpStream::connect(addr).await.expect("FastAGI connect");
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    w.write_all(&agi_header(callerid))
        .await
        .expect("header sent");
    let mut commands = String::new();
    loop {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(5), r.read_line(&mut line))
            .await
            .expect("kolokol answers within 5 s")
            .unwrap_or(0);
        if n == 0 {
            let _ = w.write_all(b"HANGUP\n").await;
            return commands;
        }
        commands.push_str(&line);
        w.write_all(b"200 result=1\n").await.expect("reply sent");
    }
}

/// Kommo contact searches and Bitrix24 lookup-chain searches so far.
fn lookups(world: &DemoWorld) -> (usize, usize) {
    let kommo = world
        .kommo
        .snapshot()
        .requests
        .iter()
        .filter(|r| r.method == "GET" && r.path == "/api/v4/contacts")
        .count();
    let bitrix = world.bitrix.snapshot().count("crm.duplicate.findbycomm");
    (kommo, bitrix)
}

async fn metric(http: SocketAddr, series: &str) -> u64 {
    let Ok(r) = reqwest::get(format!("http://{http}/metrics")).await else {
        return 0;
    };
    let text = r.text().await.unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_call_warms_the_cache_for_the_clients_next_call() {
    let dir = tempfile::tempdir().expect("temp dir");
    let world = DemoWorld::start(dir.path()).await.expect("demo world");
    world.kommo.set_rate_limit(1000.0);
    world.bitrix.set_rate(1000.0, 1000);
    let http = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let toml = world
        .config_toml(&http.to_string())
        .replace("[kommo]\n", "[kommo]\nrate_limit = 1000.0\n")
        .replace(
            "[bitrix24]\n",
            "[bitrix24]\nrate_per_sec = 1000.0\nburst = 1000\n",
        );
    let config_path = dir.path().join("config.toml");
    let config =
        kolokol::config::Config::from_toml(&toml, &config_path).expect("demo config is valid");
    let kommo_cfg = config.kommo.clone().expect("demo config has [kommo]");

    let cancel = CancellationToken::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let daemon = tokio::spawn(kolokol::daemon::run(
        config,
        cancel.clone(),
        false,
        Some(tx),
    ));
    let listening = tokio::time::timeout(Duration::from_secs(20), rx)
        .await
        .expect("daemon starts")
        .expect("daemon reports its addresses");
    let agi = listening
        .agi
        .expect("FastAGI is enabled in the demo config");
    assert!(
        world.ami.wait_logged_in(1, Duration::from_secs(20)).await,
        "daemon logs in to the simulated PBX"
    );

    // The client's first call: nobody knows them yet, the dialplan's default applies
    // (and "nobody" is cached).
    let before = lookups(&world);
    let first = agi_session(agi, CLIENT).await;
    assert_eq!(first, "", "unknown client: nothing set");
    let after_first = lookups(&world);
    assert!(
        after_first.0 > before.0 && after_first.1 > before.1,
        "an unknown client is looked up in both CRMs: {before:?} -> {after_first:?}"
    );

    // Fixture 12's recorded call: the client is answered by 102 and registered.
    let replay = Replay::from_fixture(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/ami/12-inbound-fastagi-autodistribution.ami"),
    )
    .expect("fixture 12")
    .timed(false);
    kolokol::sandbox::demo::write_recordings(&dir.path().join("spool"), replay.bytes());
    world.ami.play(&replay).await;
    let warmed = "kolokol_agi_cache_warmed_total{crm=\"kommo\"}";
    let start = Instant::now();
    while metric(listening.http, warmed).await < 1 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the Kommo registration warms the cache (kommo calls: {:?})",
            world.kommo.snapshot().calls
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        world.kommo.snapshot().contacts_with_phone(CLIENT).len(),
        1,
        "the registration created the client's contact"
    );

    // The next call is routed from memory: not one CRM request for it.
    let before = lookups(&world);
    let second = agi_session(agi, CLIENT).await;
    assert_eq!(
        lookups(&world),
        before,
        "answered from the cache, no contact search or Bitrix24 lookup"
    );
    assert_eq!(
        second,
        "SET VARIABLE KOLOKOL_DST 102\nSET VARIABLE KOLOKOL_NAME \"Contact +79161234567\"\n",
        "routed to the employee who answered the registered call"
    );

    // The warmed answer is the one a real Kommo lookup gives now.
    let kommo = KommoConnector::new(
        kommo_cfg,
        Arc::new(MemoryTokenStore::default()),
        Arc::new(NoCustomizations),
    )
    .expect("Kommo connector");
    let looked_up = kommo
        .find_responsible(CLIENT)
        .await
        .expect("Kommo answers")
        .expect("the client has a responsible employee");
    assert_eq!(looked_up.extension, "102");
    assert_eq!(
        second,
        format!(
            "SET VARIABLE KOLOKOL_DST {}\nSET VARIABLE KOLOKOL_NAME \"{}\"\n",
            looked_up.extension, looked_up.name
        )
    );

    // Control: a number nobody registered is still looked up (the counters see it).
    let before = lookups(&world);
    assert_eq!(agi_session(agi, "79990001122").await, "");
    let after = lookups(&world);
    assert!(after.0 > before.0, "{before:?} -> {after:?}");

    cancel.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), daemon).await;
}

/// Bitrix24: the finished call's entity, read once, gives exactly `find_responsible`'s
/// answer, including a responsible changed by the registration itself.
#[tokio::test]
async fn bitrix24_report_gives_the_lookup_answer_after_set_responsible() {
    use bitrix24_support::*;
    let h = harness(|c, _| c.set_responsible_on_answer = true).await;
    // The client's contact belongs to 102; 101 answers the call and becomes responsible.
    h.sb.add_entity("CONTACT", "Ivan", &["+7 (916) 123-45-67"], 12, "");
    let mut c = call("1795304861.0", Direction::Inbound, CLIENT, "74951234567");
    conv(&mut c, "1795304861.1", "101", true);
    c.answered_by = "101".into();
    h.deliver(Stage::ConversationAccepted, Some("1795304861.1"), &c)
        .await
        .expect("accepted");
    ended(&mut c, "101", 200, 4, 7);
    let report = h
        .deliver(Stage::CallEnded, None, &c)
        .await
        .expect("call ended");
    let job = Job {
        id: 99,
        connector: "bitrix24".into(),
        stage: Stage::CallEnded,
        conversation_id: None,
        call_full: c.clone(),
        attempts: 0,
    };
    let gets = |h: &Harness| h.sb.snapshot().count("crm.contact.get");
    let before = gets(&h);
    let learned = h.b24.responsible_from_report(&job, &report).await;
    assert_eq!(gets(&h), before + 1, "one read of the bound entity");
    let looked_up = h
        .b24
        .find_responsible(CLIENT)
        .await
        .expect("lookup works")
        .expect("client has a responsible");
    assert_eq!(
        looked_up.extension, "101",
        "set_responsible_on_answer applied"
    );
    assert_eq!(
        learned,
        Some(LearnedResponsible::Found {
            phone: CLIENT.into(),
            responsible: looked_up,
        })
    );

    // Other stages, and a report without an entity, say nothing (and cost nothing).
    let before = gets(&h);
    let ring = Job {
        stage: Stage::ConversationAccepted,
        ..job.clone()
    };
    assert_eq!(h.b24.responsible_from_report(&ring, &report).await, None);
    let unbound =
        serde_json::json!({"call_id": "x", "crm_entity_type": null, "crm_entity_id": null});
    assert_eq!(h.b24.responsible_from_report(&job, &unbound).await, None);
    assert_eq!(gets(&h), before);
}
