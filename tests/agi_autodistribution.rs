//! FastAGI autodistribution on real sockets: fixture 12 replayed byte for byte, every
//! hostile-client failure mode, the deadline, the cache and the customization.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kolokol::agi::{
    AgiConfig, AgiServer, AutodistHandler, Autodistributor, LookupError, ResponsibleCache,
    ResponsibleLookup,
};
use kolokol::crm::{BoxFuture, Responsible};
use kolokol::hooks::{Customize, HookOutcome, NoCustomizations};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const FIXTURE_IN: &[u8] = include_bytes!("fixtures/agi/12-autodistribution.in");
const FIXTURE_OUT: &[u8] = include_bytes!("fixtures/agi/12-autodistribution.out");
const SNIPPET: &str =
    include_str!("fixtures/asterisk-conf/extensions-autodistribution-snippet.conf");
const AGI_README: &str = include_str!("../src/agi/README.md");

/// The `agi_*` block of fixture 12 (through the empty line).
fn fixture_header() -> &'static [u8] {
    let end = FIXTURE_IN
        .windows(2)
        .position(|w| w == b"\n\n")
        .expect("fixture has a header")
        + 2;
    &FIXTURE_IN[..end]
}

/// Asterisk's lines after the header: the two `200 result=1` and the final `HANGUP`.
fn fixture_replies() -> Vec<&'static [u8]> {
    let rest = &FIXTURE_IN[fixture_header().len()..];
    rest.split_inclusive(|b| *b == b'\n').collect()
}

/// A header like fixture 12's, with another script URL and caller.
fn header(script: &str, callerid: &str) -> Vec<u8> {
    let text = std::str::from_utf8(fixture_header()).unwrap();
    text.replace(
        "agi_network_script: autodistribution\n",
        &format!("agi_network_script: {script}\n"),
    )
    .replace(
        "agi_callerid: 79161234567\n",
        &format!("agi_callerid: {callerid}\n"),
    )
    .into_bytes()
}

/// Lookup from a table, counting calls, optionally slow or failing.
#[derive(Default)]
struct TableLookup {
    table: HashMap<String, Responsible>,
    delay: Duration,
    fail: bool,
    calls: AtomicUsize,
}

impl TableLookup {
    fn with(phone: &str, ext: &str, name: &str) -> TableLookup {
        let mut t = TableLookup::default();
        t.table.insert(phone.into(), responsible(ext, name));
        t
    }
}

fn responsible(ext: &str, name: &str) -> Responsible {
    Responsible {
        extension: ext.into(),
        name: name.into(),
        entity: json!({"type": "contact", "id": 42}),
    }
}

impl ResponsibleLookup for TableLookup {
    fn find_responsible<'a>(
        &'a self,
        phone: &'a str,
    ) -> BoxFuture<'a, Result<Option<Responsible>, LookupError>> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            if self.fail {
                return Err(LookupError::Crm {
                    crm: "kommo".into(),
                    message: "503 Service Unavailable".into(),
                });
            }
            Ok(self.table.get(phone).cloned())
        })
    }
}

/// A customization that records its input and answers what it was told.
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
            assert_eq!(hook, "autodistribution");
            self.inputs.lock().unwrap().push(input);
            self.answer.clone()
        })
    }
}

struct Running {
    addr: SocketAddr,
    auto: Arc<Autodistributor>,
    stop: CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn test_config() -> AgiConfig {
    AgiConfig {
        listen: "127.0.0.1:0".into(),
        header_timeout: Duration::from_millis(300),
        read_timeout: Duration::from_millis(500),
        ..AgiConfig::default()
    }
}

async fn start(
    config: AgiConfig,
    lookup: Arc<dyn ResponsibleLookup>,
    hooks: Arc<dyn Customize>,
) -> Running {
    let cache = Arc::new(ResponsibleCache::from_config(&config));
    let auto = Arc::new(Autodistributor::new(&config, lookup, cache, hooks));
    let server = AgiServer::bind(&config).await.unwrap().route(
        "autodistribution",
        Arc::new(AutodistHandler::new(&config, auto.clone())),
    );
    let addr = server.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(server.run(stop.clone()));
    Running { addr, auto, stop }
}

/// Play Asterisk: send `header`, answer every command line with the next of `replies`,
/// and return what the server wrote plus whether it closed its side.
async fn play(addr: SocketAddr, header: &[u8], replies: &[&[u8]]) -> (Vec<u8>, bool) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    w.write_all(header).await.unwrap();
    let mut written = Vec::new();
    let mut replies = replies.iter();
    loop {
        let mut line = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(5), r.read_until(b'\n', &mut line))
            .await
            .expect("server answered within 5 s")
            .unwrap_or(0);
        if n == 0 {
            // Server closed: Asterisk sends its HANGUP (AGISIGHUP) and closes.
            let _ = w.write_all(b"HANGUP\n").await;
            return (written, true);
        }
        written.extend_from_slice(&line);
        match replies.next() {
            Some(reply) => w.write_all(reply).await.unwrap(),
            None => return (written, false),
        }
    }
}

/// Read until EOF (or 3 s); returns the bytes and whether EOF came.
async fn read_to_close(stream: &mut TcpStream) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut out)).await;
    (out, matches!(r, Ok(Ok(_)) | Ok(Err(_))))
}

#[tokio::test]
async fn fixture_12_replayed_gives_the_recorded_replies() {
    let config = AgiConfig {
        name_variable: "CALLERID(name)".into(),
        ..test_config()
    };
    let lookup = Arc::new(TableLookup::with("79161234567", "102", "Ivan Petrov"));
    let srv = start(config, lookup, Arc::new(NoCustomizations)).await;
    let replies = fixture_replies();
    assert_eq!(replies.len(), 3, "two 200 replies and the HANGUP");
    let (written, closed) = play(srv.addr, fixture_header(), &replies[..2]).await;
    assert_eq!(
        String::from_utf8_lossy(&written),
        String::from_utf8_lossy(FIXTURE_OUT)
    );
    assert!(closed, "the server closes after setting the variables");
}

#[tokio::test]
async fn default_variable_names_are_kolokol_dst_and_kolokol_name() {
    let lookup = Arc::new(TableLookup::with(
        "79161234567",
        "102",
        "Ivan \"the\" Petrov",
    ));
    let srv = start(test_config(), lookup, Arc::new(NoCustomizations)).await;
    let (written, closed) = play(
        srv.addr,
        fixture_header(),
        &[b"200 result=1\n", b"200 result=1\n"],
    )
    .await;
    assert_eq!(
        String::from_utf8(written).unwrap(),
        "SET VARIABLE KOLOKOL_DST 102\nSET VARIABLE KOLOKOL_NAME \"Ivan \\\"the\\\" Petrov\"\n"
    );
    assert!(closed);
}

#[tokio::test]
async fn query_string_phone_and_args_are_understood() {
    let lookup = Arc::new(TableLookup::with("79160000001", "103", ""));
    let srv = start(test_config(), lookup, Arc::new(NoCustomizations)).await;
    let mut h = header(
        "autodistribution?phone=79160000001&trunk=74951234570",
        "79161234567",
    );
    // Dialplan arguments arrive as agi_arg_N before the empty line.
    h.truncate(h.len() - 1);
    h.extend_from_slice(b"agi_arg_1: x\nagi_arg_2: y\n\n");
    let (written, closed) = play(srv.addr, &h, &[b"200 result=1\n"]).await;
    assert_eq!(
        String::from_utf8(written).unwrap(),
        "SET VARIABLE KOLOKOL_DST 103\n"
    );
    assert!(closed);
}

#[tokio::test]
async fn unknown_caller_sets_nothing_and_is_negatively_cached() {
    let lookup = Arc::new(TableLookup::default());
    let srv = start(test_config(), lookup.clone(), Arc::new(NoCustomizations)).await;
    for _ in 0..2 {
        let (written, closed) = play(srv.addr, fixture_header(), &[]).await;
        assert!(written.is_empty());
        assert!(closed);
    }
    assert_eq!(
        lookup.calls.load(Ordering::SeqCst),
        1,
        "second call answered from the negative cache"
    );
}

#[tokio::test]
async fn found_answers_are_cached_and_warm_fills_the_cache() {
    let lookup = Arc::new(TableLookup::with("79161234567", "102", "Ivan Petrov"));
    let srv = start(test_config(), lookup.clone(), Arc::new(NoCustomizations)).await;
    for _ in 0..3 {
        let (written, _) = play(
            srv.addr,
            fixture_header(),
            &[b"200 result=1\n", b"200 result=1\n"],
        )
        .await;
        assert!(
            String::from_utf8(written)
                .unwrap()
                .starts_with("SET VARIABLE KOLOKOL_DST 102\n")
        );
    }
    assert_eq!(lookup.calls.load(Ordering::SeqCst), 1);

    // A registration that learned the responsible user warms the cache: no lookup.
    srv.auto
        .cache()
        .warm("+7 (916) 555-01-00", responsible("101", "Anna"));
    let (written, _) = play(
        srv.addr,
        &header("autodistribution", "79165550100"),
        &[b"200 result=1\n", b"200 result=1\n"],
    )
    .await;
    assert!(
        String::from_utf8(written)
            .unwrap()
            .starts_with("SET VARIABLE KOLOKOL_DST 101\n")
    );
    assert_eq!(lookup.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn crm_errors_are_not_cached() {
    let lookup = Arc::new(TableLookup {
        fail: true,
        ..TableLookup::default()
    });
    let srv = start(test_config(), lookup.clone(), Arc::new(NoCustomizations)).await;
    for _ in 0..2 {
        let (written, closed) = play(srv.addr, fixture_header(), &[]).await;
        assert!(written.is_empty());
        assert!(closed);
    }
    assert_eq!(lookup.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn slow_crm_misses_the_deadline_then_its_answer_serves_the_next_call() {
    let config = AgiConfig {
        deadline: Duration::from_millis(150),
        ..test_config()
    };
    let mut table = TableLookup::with("79161234567", "102", "Ivan Petrov");
    table.delay = Duration::from_millis(800);
    let lookup = Arc::new(table);
    let srv = start(config, lookup.clone(), Arc::new(NoCustomizations)).await;

    let t0 = Instant::now();
    let (written, closed) = play(srv.addr, fixture_header(), &[]).await;
    let took = t0.elapsed();
    assert!(written.is_empty(), "nothing set when the CRM is late");
    assert!(closed);
    assert!(took >= Duration::from_millis(150), "{took:?}");
    assert!(
        took < Duration::from_millis(700),
        "returned at the deadline, not after the CRM: {took:?}"
    );

    // The lookup went on in the background and filled the cache.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (written, _) = play(
        srv.addr,
        fixture_header(),
        &[b"200 result=1\n", b"200 result=1\n"],
    )
    .await;
    assert!(
        String::from_utf8(written)
            .unwrap()
            .starts_with("SET VARIABLE KOLOKOL_DST 102\n")
    );
    assert_eq!(lookup.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn concurrent_calls_from_one_number_share_one_lookup() {
    let mut table = TableLookup::with("79161234567", "102", "");
    table.delay = Duration::from_millis(100);
    let lookup = Arc::new(table);
    let srv = start(test_config(), lookup.clone(), Arc::new(NoCustomizations)).await;
    let mut tasks = Vec::new();
    for _ in 0..5 {
        let addr = srv.addr;
        tasks.push(tokio::spawn(async move {
            play(addr, fixture_header(), &[b"200 result=1\n"]).await.0
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), b"SET VARIABLE KOLOKOL_DST 102\n");
    }
    assert_eq!(lookup.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn customization_sees_the_seed_input_and_can_change_the_route() {
    let hook = Arc::new(ScriptedHook {
        answer: HookOutcome::Data(json!({"number": 103, "name": "VIP client"})),
        inputs: Mutex::new(Vec::new()),
    });
    let lookup = Arc::new(TableLookup::with("79161234567", "102", "Ivan Petrov"));
    let srv = start(test_config(), lookup, hook.clone()).await;
    let (written, _) = play(
        srv.addr,
        fixture_header(),
        &[b"200 result=1\n", b"200 result=1\n"],
    )
    .await;
    assert_eq!(
        String::from_utf8(written).unwrap(),
        "SET VARIABLE KOLOKOL_DST 103\nSET VARIABLE KOLOKOL_NAME \"VIP client\"\n"
    );
    let inputs = hook.inputs.lock().unwrap();
    let input = &inputs[0];
    assert_eq!(input["number"], "102");
    assert_eq!(input["name"], "Ivan Petrov");
    assert_eq!(input["from"], "79161234567");
    assert_eq!(input["trunk"], "74951234570");
    assert_eq!(input["entity"], json!({"type": "contact", "id": 42}));
    assert_eq!(input["request_data"]["agi_uniqueid"], "1795305008.28");
    assert!(
        input.get("error").is_none(),
        "read-only fields only when not empty"
    );
}

#[tokio::test]
async fn customization_can_cancel_and_sees_the_crm_error() {
    let hook = Arc::new(ScriptedHook {
        answer: HookOutcome::Cancelled,
        inputs: Mutex::new(Vec::new()),
    });
    let lookup = Arc::new(TableLookup::with("79161234567", "102", "Ivan Petrov"));
    let srv = start(test_config(), lookup, hook.clone()).await;
    let (written, closed) = play(srv.addr, fixture_header(), &[]).await;
    assert!(written.is_empty());
    assert!(closed);

    let failing = Arc::new(TableLookup {
        fail: true,
        ..TableLookup::default()
    });
    let hook2 = Arc::new(ScriptedHook {
        answer: HookOutcome::Data(json!({"number": "104"})),
        inputs: Mutex::new(Vec::new()),
    });
    let srv2 = start(test_config(), failing, hook2.clone()).await;
    let (written, _) = play(srv2.addr, fixture_header(), &[b"200 result=1\n"]).await;
    assert_eq!(
        written, b"SET VARIABLE KOLOKOL_DST 104\n",
        "the hook may route even when the CRM is down"
    );
    let input = hook2.inputs.lock().unwrap()[0].clone();
    assert_eq!(input["number"], "");
    assert!(input["error"].as_str().unwrap().contains("503"), "{input}");
}

#[tokio::test]
async fn hangup_while_looking_up_ends_the_session_without_commands() {
    let mut table = TableLookup::with("79161234567", "102", "");
    table.delay = Duration::from_secs(2);
    let srv = start(test_config(), Arc::new(table), Arc::new(NoCustomizations)).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(fixture_header()).await.unwrap();
    s.write_all(b"HANGUP\n").await.unwrap();
    let t0 = Instant::now();
    let (out, closed) = read_to_close(&mut s).await;
    assert!(out.is_empty(), "{:?}", String::from_utf8_lossy(&out));
    assert!(closed);
    assert!(
        t0.elapsed() < Duration::from_millis(1500),
        "did not wait for the lookup"
    );
}

#[tokio::test]
async fn hangup_before_a_reply_stops_further_commands() {
    let lookup = Arc::new(TableLookup::with("79161234567", "102", "Ivan Petrov"));
    let srv = start(test_config(), lookup, Arc::new(NoCustomizations)).await;
    // The caller hangs up between our command and its reply: HANGUP, then the 200.
    let (written, closed) = play(
        srv.addr,
        fixture_header(),
        &[b"HANGUP\n200 result=1\n", b"200 result=1\n"],
    )
    .await;
    assert_eq!(written, b"SET VARIABLE KOLOKOL_DST 102\n");
    assert!(closed);
}

#[tokio::test]
async fn dead_channel_511_stops_the_script() {
    let lookup = Arc::new(TableLookup::with("79161234567", "102", "Ivan Petrov"));
    let srv = start(test_config(), lookup, Arc::new(NoCustomizations)).await;
    let (written, closed) = play(
        srv.addr,
        fixture_header(),
        &[
            b"511 Command Not Permitted on a dead channel or intercept routine\n",
            b"200 result=1\n",
        ],
    )
    .await;
    assert_eq!(written, b"SET VARIABLE KOLOKOL_DST 102\n");
    assert!(closed);
}

#[tokio::test]
async fn trying_then_200_and_520_usage_are_read_to_the_end() {
    let lookup = Arc::new(TableLookup::with("79161234567", "102", "Ivan Petrov"));
    let srv = start(test_config(), lookup, Arc::new(NoCustomizations)).await;
    let usage: &[u8] = b"520-Invalid command syntax.  Proper usage follows:\n Usage: SET VARIABLE <variablename> <value>\n\tSets a variable to the current channel.\n520 End of proper usage.\n";
    let (written, closed) = play(
        srv.addr,
        fixture_header(),
        &[b"100 result=0 Trying...\n200 result=1\n", usage],
    )
    .await;
    assert_eq!(
        String::from_utf8(written).unwrap(),
        "SET VARIABLE KOLOKOL_DST 102\nSET VARIABLE KOLOKOL_NAME \"Ivan Petrov\"\n"
    );
    assert!(
        closed,
        "a usage reply ends the script cleanly, not by timeout"
    );

    let (written, closed) = play(
        srv.addr,
        fixture_header(),
        &[b"510 Invalid or unknown command\n"],
    )
    .await;
    assert_eq!(
        written, b"SET VARIABLE KOLOKOL_DST 102\n",
        "no second command after 510"
    );
    assert!(closed);
}

/// A hostile connection is closed and a normal session run meanwhile is unaffected.
async fn assert_rejected_while_others_work(srv: &Running, hostile: Vec<u8>, trickle: bool) {
    let addr = srv.addr;
    let hostile_task = tokio::spawn(async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        if trickle {
            // One byte every 50 ms: the 300 ms header deadline must cut this off.
            for b in hostile.iter() {
                if s.write_all(&[*b]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        } else {
            let _ = s.write_all(&hostile).await;
        }
        read_to_close(&mut s).await
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (written, closed) = play(
        addr,
        fixture_header(),
        &[b"200 result=1\n", b"200 result=1\n"],
    )
    .await;
    assert!(
        String::from_utf8(written)
            .unwrap()
            .starts_with("SET VARIABLE KOLOKOL_DST 102\n")
    );
    assert!(closed);
    let (out, closed) = hostile_task.await.unwrap();
    assert!(out.is_empty(), "nothing is sent to a hostile client");
    assert!(closed, "the hostile connection is closed");
}

#[tokio::test]
async fn oversized_endless_garbage_and_slow_clients_are_cut_off_alone() {
    let lookup = Arc::new(TableLookup::with("79161234567", "102", "Ivan Petrov"));
    let srv = start(test_config(), lookup, Arc::new(NoCustomizations)).await;

    // One endless line.
    let mut long = b"agi_network: ".to_vec();
    long.extend(std::iter::repeat_n(b'y', 64 * 1024));
    assert_rejected_while_others_work(&srv, long, false).await;

    // Endless header lines, each valid.
    let many: Vec<u8> = (0..5000)
        .flat_map(|i| format!("agi_x{i}: 1\n").into_bytes())
        .collect();
    assert_rejected_while_others_work(&srv, many, false).await;

    // Garbage: HTTP on the AGI port, and binary noise.
    assert_rejected_while_others_work(&srv, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), false)
        .await;
    assert_rejected_while_others_work(&srv, vec![0xff, 0xfe, 0x00, b'\n', b'\n'], false).await;

    // Slowloris: a valid header sent too slowly.
    assert_rejected_while_others_work(&srv, fixture_header().to_vec(), true).await;
}

#[tokio::test]
async fn garbage_reply_to_a_command_closes_only_that_session() {
    let lookup = Arc::new(TableLookup::with("79161234567", "102", "Ivan Petrov"));
    let srv = start(test_config(), lookup, Arc::new(NoCustomizations)).await;
    let (written, closed) = play(
        srv.addr,
        fixture_header(),
        &[b"HTTP/1.1 200 OK\n", b"200 result=1\n"],
    )
    .await;
    assert_eq!(written, b"SET VARIABLE KOLOKOL_DST 102\n");
    assert!(closed);
    let (written, _) = play(
        srv.addr,
        fixture_header(),
        &[b"200 result=1\n", b"200 result=1\n"],
    )
    .await;
    assert!(
        written.starts_with(b"SET VARIABLE KOLOKOL_DST 102\n"),
        "the next session works"
    );
}

#[tokio::test]
async fn silent_asterisk_after_a_command_times_out() {
    let lookup = Arc::new(TableLookup::with("79161234567", "102", ""));
    let srv = start(test_config(), lookup, Arc::new(NoCustomizations)).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(fixture_header()).await.unwrap();
    // Never answer the command: the 500 ms read timeout closes the session.
    let (out, closed) = read_to_close(&mut s).await;
    assert_eq!(out, b"SET VARIABLE KOLOKOL_DST 102\n");
    assert!(closed);
}

#[tokio::test]
async fn client_disconnects_do_not_disturb_the_server() {
    let lookup = Arc::new(TableLookup::with("79161234567", "102", "Ivan Petrov"));
    let srv = start(test_config(), lookup, Arc::new(NoCustomizations)).await;
    // Connect and leave at once; leave in the middle of the header; leave after it.
    drop(TcpStream::connect(srv.addr).await.unwrap());
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(&fixture_header()[..100]).await.unwrap();
    drop(s);
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(fixture_header()).await.unwrap();
    drop(s);
    let (written, closed) = play(
        srv.addr,
        fixture_header(),
        &[b"200 result=1\n", b"200 result=1\n"],
    )
    .await;
    assert_eq!(
        written.len(),
        "SET VARIABLE KOLOKOL_DST 102\nSET VARIABLE KOLOKOL_NAME \"Ivan Petrov\"\n".len()
    );
    assert!(closed);
}

#[tokio::test]
async fn connections_over_the_cap_are_closed_at_once() {
    let config = AgiConfig {
        max_connections: 1,
        header_timeout: Duration::from_secs(2),
        ..test_config()
    };
    let lookup = Arc::new(TableLookup::with("79161234567", "102", ""));
    let srv = start(config, lookup, Arc::new(NoCustomizations)).await;
    // Hold the only slot with a half-sent header.
    let mut holder = TcpStream::connect(srv.addr).await.unwrap();
    holder.write_all(b"agi_network: yes\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut second = TcpStream::connect(srv.addr).await.unwrap();
    let _ = second.write_all(fixture_header()).await;
    let t0 = Instant::now();
    let (out, closed) = read_to_close(&mut second).await;
    assert!(out.is_empty());
    assert!(closed);
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "closed at once, not queued"
    );
    // The holder finishes normally.
    holder.write_all(&fixture_header()[17..]).await.unwrap();
    let (out, _) = {
        let mut buf = vec![0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(2), holder.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        buf.truncate(n);
        (buf, ())
    };
    assert_eq!(out, b"SET VARIABLE KOLOKOL_DST 102\n");
}

#[tokio::test]
async fn unknown_script_is_closed_without_commands() {
    let lookup = Arc::new(TableLookup::with("79161234567", "102", ""));
    let srv = start(test_config(), lookup, Arc::new(NoCustomizations)).await;
    let (written, closed) = play(srv.addr, &header("no-such-script", "79161234567"), &[]).await;
    assert!(written.is_empty());
    assert!(closed);
}

#[tokio::test]
async fn http_get_autodistribution_returns_the_bare_extension() {
    let lookup = Arc::new(TableLookup::with("79161234567", "102", "Ivan Petrov"));
    let srv = start(test_config(), lookup, Arc::new(NoCustomizations)).await;
    let app = kolokol::agi::http::router(srv.auto.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let client = reqwest::Client::new();

    let r = client
        .get(format!(
            "http://{http}/autodistribution?phone=79161234567&trunk=74951234570"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-kolokol-name"], "Ivan Petrov");
    assert_eq!(r.text().await.unwrap(), "102");

    let r = client
        .get(format!("http://{http}/autodistribution?phone=79990000000"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.text().await.unwrap(),
        "",
        "CURL() must get an empty value"
    );

    let r = client
        .get(format!("http://{http}/autodistribution"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.text().await.unwrap(), "");
}

#[test]
fn agi_section_reads_documented_keys() {
    let c = kolokol::config::Config::from_toml(
        "[agi]\nlisten = \"0.0.0.0:4573\"\ndeadline = \"800ms\"\nname_variable = \"CALLERID(name)\"\nnegative_cache_ttl = \"30s\"\n",
        std::path::Path::new("c.toml"),
    )
    .unwrap();
    assert_eq!(c.agi.deadline, Duration::from_millis(800));
    assert_eq!(c.agi.name_variable, "CALLERID(name)");
    assert_eq!(c.agi.dst_variable, "KOLOKOL_DST");
    assert_eq!(c.agi.negative_cache_ttl, Duration::from_secs(30));
}

#[test]
fn readme_dialplan_matches_the_recorded_snippet() {
    // Every dialplan line of the recorded configuration appears verbatim in the docs.
    let lines: Vec<&str> = SNIPPET
        .lines()
        .map(|l| l.split(';').next().unwrap_or("").trim_end())
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert!(lines.len() >= 6);
    for l in lines {
        assert!(AGI_README.contains(l), "src/agi/README.md lacks: {l}");
    }
    assert!(AGI_README.contains(
        "${CURL(http://127.0.0.1:8088/autodistribution?phone=${CALLERID(num)}&trunk=${EXTEN})}"
    ));
}

/// A CRM connector that only answers lookups (the other methods are not used here).
struct LookupOnly {
    name: &'static str,
    answer: Result<Option<Responsible>, ()>,
}

impl kolokol::crm::Connector for LookupOnly {
    fn name(&self) -> &'static str {
        self.name
    }
    fn wants(&self, _stage: kolokol::calls::Stage) -> bool {
        false
    }
    fn deliver<'a>(
        &'a self,
        _job: &'a kolokol::crm::Job,
        _steps: &'a dyn kolokol::crm::JobSteps,
    ) -> BoxFuture<'a, Result<kolokol::crm::DeliveryReport, kolokol::crm::CrmError>> {
        Box::pin(async {
            Err(kolokol::crm::CrmError::Rejected {
                message: "lookup-only test connector".into(),
            })
        })
    }
    fn find_responsible<'a>(
        &'a self,
        _phone: &'a str,
    ) -> BoxFuture<'a, Result<Option<Responsible>, kolokol::crm::CrmError>> {
        Box::pin(async move {
            self.answer
                .clone()
                .map_err(|_| kolokol::crm::CrmError::Retryable {
                    message: "timeout".into(),
                    retry_after: None,
                })
        })
    }
}

#[tokio::test]
async fn crm_lookup_asks_each_crm_and_trusts_not_found_only_when_all_answered() {
    use kolokol::agi::CrmLookup;
    use kolokol::crm::Connector;
    let down = || {
        Arc::new(LookupOnly {
            name: "kommo",
            answer: Err(()),
        }) as Arc<dyn Connector>
    };
    let none = || {
        Arc::new(LookupOnly {
            name: "bitrix24",
            answer: Ok(None),
        }) as Arc<dyn Connector>
    };
    let found = || {
        Arc::new(LookupOnly {
            name: "bitrix24",
            answer: Ok(Some(responsible("105", "B24 client"))),
        }) as Arc<dyn Connector>
    };
    let l = CrmLookup::new(vec![down(), found()]);
    assert_eq!(
        l.find_responsible("79161234567")
            .await
            .unwrap()
            .unwrap()
            .extension,
        "105"
    );
    let l = CrmLookup::new(vec![none(), none()]);
    assert!(l.find_responsible("79161234567").await.unwrap().is_none());
    let l = CrmLookup::new(vec![down(), none()]);
    let err = l.find_responsible("79161234567").await.unwrap_err();
    assert!(err.to_string().contains("kommo"), "{err}");
}

#[tokio::test]
async fn without_an_installed_customization_the_hook_is_skipped() {
    let hook = Arc::new(ScriptedHook {
        answer: HookOutcome::Data(json!({"number": "103"})),
        inputs: Mutex::new(Vec::new()),
    });
    let config = test_config();
    let cache = Arc::new(ResponsibleCache::from_config(&config));
    let lookup = Arc::new(TableLookup::with("79161234567", "102", "Ivan Petrov"));
    let auto = Autodistributor::new(&config, lookup, cache, hook.clone()).with_customization(false);
    let route = auto
        .route(&kolokol::agi::AutodistRequest {
            phone: "79161234567".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(route.number, "102");
    assert!(hook.inputs.lock().unwrap().is_empty());
}
