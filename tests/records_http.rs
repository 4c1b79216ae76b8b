//! `GET /records/<token>.<ext>` over a real socket: byte-exact full and ranged downloads,
//! HEAD, refused tokens, path traversal.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kolokol::records::http::{RecordsHttp, router};
use kolokol::records::{ConvertSettings, DirCatalog, LinkSigner, convert_file};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECRET: &[u8] = b"test-secret-0123456789";
const SECRET_CONTENT: &[u8] = b"TOP-SECRET-CONTENT-DO-NOT-SERVE";

struct Server {
    addr: SocketAddr,
    base: String,
    signer: LinkSigner,
    store: PathBuf,
    _tmp: tempfile::TempDir,
}

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/recordings/in-20261121-234741-79161234567-1795304861.0.wav")
}

/// A server with: `call-1.mp3` (a converted fixture), `big.mp3` (3 MiB of pseudo-random
/// bytes, to cross many chunks), `only-wav.wav`, and a secret file next to the store.
async fn start() -> Server {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    std::fs::create_dir(&store).unwrap();
    std::fs::write(tmp.path().join("secret.mp3"), SECRET_CONTENT).unwrap();
    std::fs::write(tmp.path().join("passwd"), SECRET_CONTENT).unwrap();
    convert_file(
        &fixture(),
        &store.join("call-1.mp3"),
        &ConvertSettings::default(),
    )
    .unwrap();
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let big: Vec<u8> = (0..3 * 1024 * 1024)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 32) as u8
        })
        .collect();
    std::fs::write(store.join("big.mp3"), &big).unwrap();
    std::fs::copy(fixture(), store.join("only-wav.wav")).unwrap();

    let signer = LinkSigner::new(SECRET, None);
    let catalog = Arc::new(DirCatalog::new(&store));
    let app = router(RecordsHttp::new(catalog, signer.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Server {
        addr,
        base: format!("http://{addr}"),
        signer,
        store,
        _tmp: tmp,
    }
}

/// A request written by hand, so nothing normalizes the path on the way.
async fn raw(addr: SocketAddr, method: &str, path: &str) -> (u16, String, Vec<u8>) {
    let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    sock.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    sock.read_to_end(&mut buf).await.unwrap();
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("no header end");
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("no status");
    (status, head, buf[split + 4..].to_vec())
}

fn header<'a>(r: &'a reqwest::Response, name: &str) -> &'a str {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

#[tokio::test]
async fn full_and_ranged_downloads_are_byte_exact() {
    let srv = start().await;
    let client = reqwest::Client::new();
    for id in ["call-1", "big"] {
        let want = std::fs::read(srv.store.join(format!("{id}.mp3"))).unwrap();
        let len = want.len();
        let url = srv.signer.link(&srv.base, id);

        let r = client.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "content-type"), "audio/mpeg");
        assert_eq!(header(&r, "accept-ranges"), "bytes");
        assert_eq!(header(&r, "content-length"), len.to_string());
        assert_eq!(
            r.bytes().await.unwrap().as_ref(),
            &want[..],
            "{id}: full body"
        );

        let cases: Vec<(String, usize, usize)> = vec![
            ("bytes=0-99".into(), 0, 99),
            ("bytes=100-".into(), 100, len - 1),
            ("bytes=-333".into(), len - 333, len - 1),
            (format!("bytes=1000-{}", len + 5000), 1000, len - 1),
            (format!("bytes={}-{}", len / 2, len / 2), len / 2, len / 2),
            (
                format!("bytes={}-{}", 70_000.min(len / 3), len - 2),
                70_000.min(len / 3),
                len - 2,
            ),
        ];
        for (range, a, b) in cases {
            let r = client
                .get(&url)
                .header("Range", &range)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 206, "{id} {range}");
            assert_eq!(header(&r, "content-range"), format!("bytes {a}-{b}/{len}"));
            assert_eq!(header(&r, "content-length"), (b - a + 1).to_string());
            assert_eq!(header(&r, "content-type"), "audio/mpeg");
            let body = r.bytes().await.unwrap();
            assert_eq!(body.as_ref(), &want[a..=b], "{id} {range}");
        }

        // Unsatisfiable: 416 with the length.
        for range in [format!("bytes={len}-"), "bytes=-0".to_string()] {
            let r = client
                .get(&url)
                .header("Range", &range)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 416, "{range}");
            assert_eq!(header(&r, "content-range"), format!("bytes */{len}"));
        }
        // Unparseable or multi-range: the whole file.
        for range in ["bytes=5-2", "lines=1-2", "bytes=0-1,4-5"] {
            let r = client
                .get(&url)
                .header("Range", range)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{range}");
            assert_eq!(r.bytes().await.unwrap().len(), len);
        }
    }
}

#[tokio::test]
async fn head_reports_length_without_body() {
    let srv = start().await;
    let len = std::fs::metadata(srv.store.join("call-1.mp3"))
        .unwrap()
        .len();
    let url = srv.signer.link("", "call-1");
    let (status, head, body) = raw(srv.addr, "HEAD", &url).await;
    assert_eq!(status, 200, "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains(&format!("content-length: {len}")), "{head}");
    assert!(lower.contains("content-type: audio/mpeg"), "{head}");
    assert!(lower.contains("accept-ranges: bytes"), "{head}");
    assert!(body.is_empty());
}

#[tokio::test]
async fn wav_is_served_when_that_is_what_exists() {
    let srv = start().await;
    let want = std::fs::read(srv.store.join("only-wav.wav")).unwrap();
    let r = reqwest::get(srv.signer.link_ext(&srv.base, "only-wav", "wav"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-type"), "audio/wav");
    assert_eq!(r.bytes().await.unwrap().as_ref(), &want[..]);
    // Other extensions are not recordings.
    let tok = srv.signer.token("call-1");
    for ext in ["txt", "html", "mp3x", ""] {
        let r = reqwest::get(format!("{}/records/{tok}.{ext}", srv.base))
            .await
            .unwrap();
        assert!(
            r.status() == 404 || r.status() == 403,
            "{ext}: {}",
            r.status()
        );
    }
}

#[tokio::test]
async fn bad_tampered_and_expired_tokens_are_refused() {
    let srv = start().await;
    let client = reqwest::Client::new();
    let get = |url: String| {
        let c = client.clone();
        async move { c.get(url).send().await.unwrap().status().as_u16() }
    };
    let good = srv.signer.token("call-1");
    assert_eq!(get(format!("{}/records/{good}.mp3", srv.base)).await, 200);

    // Flip each part of the token in turn.
    let parts: Vec<&str> = good.split('.').collect();
    let mut sig: Vec<u8> = parts[2].bytes().collect();
    sig[5] = if sig[5] == b'A' { b'B' } else { b'A' };
    let flipped_sig = format!(
        "{}.{}.{}",
        parts[0],
        parts[1],
        String::from_utf8(sig).unwrap()
    );
    let other_id = format!("{}.{}.{}", "YmlnCg", parts[1], parts[2]);
    let with_expiry = format!("{}.{}.{}", parts[0], "4102444800", parts[2]);
    let foreign = LinkSigner::new(b"some-other-secret-xyz", None).token("call-1");
    let expired = srv.signer.token_at("call-1", Some(1_000_000_000));
    for (what, tok) in [
        ("flipped signature", flipped_sig),
        ("id swapped", other_id),
        ("expiry added", with_expiry),
        ("other secret", foreign),
        ("expired", expired),
        ("garbage", "hello".to_string()),
        ("empty signature", format!("{}.0.", parts[0])),
        ("too long", "A".repeat(5000)),
    ] {
        assert_eq!(
            get(format!("{}/records/{tok}.mp3", srv.base)).await,
            403,
            "{what}"
        );
    }

    // Correctly signed, but the id is not in the catalog.
    let unknown = srv.signer.link(&srv.base, "no-such-call");
    assert_eq!(get(unknown).await, 404);
    // Correctly signed ids that try to leave the folder: the catalog refuses them.
    for id in [
        "../secret",
        "../passwd",
        "/etc/passwd",
        "..",
        "call-1/../../secret",
    ] {
        let url = srv.signer.link(&srv.base, id);
        assert_eq!(get(url).await, 404, "{id}");
    }
}

#[tokio::test]
async fn path_traversal_is_refused() {
    let srv = start().await;
    let good = srv.signer.token("call-1");
    let attempts = [
        "/records/../secret.mp3".to_string(),
        "/records/../../etc/passwd".to_string(),
        "/records/..%2Fsecret.mp3".to_string(),
        "/records/..%2F..%2Fpasswd".to_string(),
        "/records/%2e%2e%2fsecret.mp3".to_string(),
        "/records/%2E%2E/secret.mp3".to_string(),
        "/records/..%5Csecret.mp3".to_string(),
        "/records/%252e%252e%252fsecret.mp3".to_string(),
        "/records/secret.mp3".to_string(),
        "/records/passwd".to_string(),
        format!("/records/{good}.mp3/../../secret.mp3"),
        format!("/records/{good}/..%2F..%2Fsecret.mp3"),
        format!("/records/..%2F{good}.mp3"),
        "/records/%00.mp3".to_string(),
        "/records/".to_string(),
        "/records".to_string(),
    ];
    for path in attempts {
        let (status, head, body) = raw(srv.addr, "GET", &path).await;
        assert!(
            matches!(status, 400 | 403 | 404),
            "{path}: status {status}\n{head}"
        );
        assert!(
            !body
                .windows(SECRET_CONTENT.len())
                .any(|w| w == SECRET_CONTENT),
            "{path}: leaked the file"
        );
    }
    // And the server still serves good links afterwards.
    let (status, _, body) = raw(srv.addr, "GET", &format!("/records/{good}.mp3")).await;
    assert_eq!(status, 200);
    assert_eq!(body, std::fs::read(srv.store.join("call-1.mp3")).unwrap());
}
