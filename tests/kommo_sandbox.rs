//! The sandbox Kommo's own contract: the documented shapes and rules the connector
//! relies on, checked with plain HTTP requests.

use kolokol::sandbox::kommo::{self as sb, SandboxKommo};
use serde_json::{Value, json};

struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    fn new(s: &SandboxKommo) -> Self {
        Api {
            http: reqwest::Client::new(),
            base: s.base_url(),
        }
    }
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, String, Option<Value>) {
        let mut rb = self.http.request(method, format!("{}{}", self.base, path));
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb.send().await.unwrap();
        let status = r.status().as_u16();
        let ct = r
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let text = r.text().await.unwrap();
        (status, ct, serde_json::from_str(&text).ok())
    }
}

const T: Option<&str> = Some(sb::LONG_LIVED_TOKEN);

#[tokio::test]
async fn shapes_auth_and_search() {
    let s = SandboxKommo::start().await.unwrap();
    s.set_rate_limit(1000.0);
    let api = Api::new(&s);
    let (st, ct, body) = api
        .send(reqwest::Method::GET, "/api/v4/users", None, None)
        .await;
    assert_eq!(st, 401);
    assert_eq!(ct, "application/problem+json");
    assert_eq!(body.unwrap()["status"], json!(401));
    let (st, ct, body) = api
        .send(reqwest::Method::GET, "/api/v4/users", T, None)
        .await;
    assert_eq!((st, ct.as_str()), (200, "application/hal+json"));
    assert_eq!(
        body.unwrap()["_embedded"]["users"]
            .as_array()
            .unwrap()
            .len(),
        3
    );

    let (st, _, body) = api
        .send(
            reqwest::Method::GET,
            "/api/v4/contacts?query=9161234567",
            T,
            None,
        )
        .await;
    assert_eq!((st, body), (204, None), "no match → 204 No Content");

    // Validation errors: 400 problem+json with validation-errors per item.
    let (st, ct, body) = api
        .send(
            reqwest::Method::POST,
            "/api/v4/contacts",
            T,
            Some(json!([{"name": "ok"}, {"name": "bad", "custom_fields_values": [{"field_id": 1, "values": [{"value": "x"}]}]}])),
        )
        .await;
    assert_eq!((st, ct.as_str()), (400, "application/problem+json"));
    let body = body.unwrap();
    let ve = &body["validation-errors"][0];
    assert_eq!(ve["request_id"], json!("1"));
    assert_eq!(
        ve["errors"][0]["path"],
        json!("custom_fields_values.0.field_id")
    );
    assert!(
        s.snapshot().contacts.is_empty(),
        "a rejected batch adds nothing"
    );

    let (st, _, body) = api
        .send(
            reqwest::Method::POST,
            "/api/v4/contacts",
            T,
            Some(json!([{"name": "Ivan", "custom_fields_values": [{"field_id": sb::PHONE_FIELD_ID, "values": [{"enum_code": "WORK", "value": "+7 916 123-45-67"}]}]}])),
        )
        .await;
    assert_eq!(st, 200);
    let id = body.unwrap()["_embedded"]["contacts"][0]["id"]
        .as_i64()
        .unwrap();
    let (st, _, body) = api
        .send(
            reqwest::Method::GET,
            "/api/v4/contacts?query=9161234567&with=leads",
            T,
            None,
        )
        .await;
    assert_eq!(st, 200);
    let c = &body.unwrap()["_embedded"]["contacts"][0];
    assert_eq!(c["id"], json!(id));
    assert_eq!(c["custom_fields_values"][0]["field_code"], json!("PHONE"));
    assert_eq!(c["_embedded"]["leads"], json!([]));
}

#[tokio::test]
async fn calls_attach_by_last_ten_digits_or_come_back_in_errors() {
    let s = SandboxKommo::start().await.unwrap();
    s.set_rate_limit(1000.0);
    let cid = s.add_contact("Ivan", "8 916 123 45 67", 5002);
    let api = Api::new(&s);
    let call = |phone: &str| json!({"direction": "inbound", "duration": 5, "source": "t", "phone": phone, "uniq": "u", "call_status": 4});
    let (st, _, body) = api
        .send(
            reqwest::Method::POST,
            "/api/v4/calls",
            T,
            Some(json!([call("+79161234567"), call("+79990000000")])),
        )
        .await;
    assert_eq!(st, 200);
    let body = body.unwrap();
    assert_eq!(
        body["_embedded"]["calls"][0]["entity_type"],
        json!("contact")
    );
    assert_eq!(body["_embedded"]["calls"][0]["entity_id"], json!(cid));
    assert_eq!(body["_embedded"]["errors"][0]["request_id"], json!("1"));
    assert_eq!(s.snapshot().calls.len(), 1, "no entity → not added");

    // One open lead → the call goes to the lead.
    let lid = s.add_lead("Deal", cid, sb::STATUS_FIRST, 5002);
    let (_, _, body) = api
        .send(
            reqwest::Method::POST,
            "/api/v4/calls",
            T,
            Some(json!([call("9161234567")])),
        )
        .await;
    assert_eq!(
        body.unwrap()["_embedded"]["calls"][0]["entity_id"],
        json!(lid)
    );

    let (st, _, body) = api
        .send(
            reqwest::Method::POST,
            "/api/v4/calls",
            T,
            Some(json!([{"direction": "up", "source": "t", "phone": "1"}])),
        )
        .await;
    assert_eq!(st, 400);
    let paths: Vec<Value> = body.unwrap()["validation-errors"][0]["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].clone())
        .collect();
    assert_eq!(paths, vec![json!("direction"), json!("duration")]);
}

#[tokio::test]
async fn oauth_rotation_expiry_and_limits() {
    let s = SandboxKommo::start().await.unwrap();
    let api = Api::new(&s);
    s.add_auth_code("c1");
    let grant = |extra: Value| {
        let mut b = json!({"client_id": sb::CLIENT_ID, "client_secret": sb::CLIENT_SECRET, "redirect_uri": "https://x/y"});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let (st, _, t1) = api
        .send(
            reqwest::Method::POST,
            "/oauth2/access_token",
            None,
            Some(grant(
                json!({"grant_type": "authorization_code", "code": "c1"}),
            )),
        )
        .await;
    assert_eq!(st, 200);
    let t1 = t1.unwrap();
    assert_eq!(t1["expires_in"], json!(86400));
    let r1 = t1["refresh_token"].as_str().unwrap().to_string();
    let (st, _, t2) = api
        .send(
            reqwest::Method::POST,
            "/oauth2/access_token",
            None,
            Some(grant(
                json!({"grant_type": "refresh_token", "refresh_token": r1}),
            )),
        )
        .await;
    assert_eq!(st, 200);
    let t2 = t2.unwrap();
    let (st, _, _) = api
        .send(
            reqwest::Method::POST,
            "/oauth2/access_token",
            None,
            Some(grant(
                json!({"grant_type": "refresh_token", "refresh_token": r1}),
            )),
        )
        .await;
    assert_eq!(st, 400, "a rotated refresh token is dead");

    let a2 = t2["access_token"].as_str().unwrap().to_string();
    let (st, _, _) = api
        .send(reqwest::Method::GET, "/api/v4/users", Some(&a2), None)
        .await;
    assert_eq!(st, 200);
    s.expire_access_tokens();
    let (st, _, _) = api
        .send(reqwest::Method::GET, "/api/v4/users", Some(&a2), None)
        .await;
    assert_eq!(st, 401);

    // 7 requests/s: a burst of 12 gets 429s with Retry-After.
    let mut statuses = Vec::new();
    for _ in 0..12 {
        statuses.push(
            api.send(reqwest::Method::GET, "/api/v4/users", T, None)
                .await
                .0,
        );
    }
    assert!(
        statuses.iter().filter(|s| **s == 200).count() <= 8,
        "{statuses:?}"
    );
    assert!(statuses.contains(&429), "{statuses:?}");

    s.set_rate_limit(1000.0);
    s.fail_next(1, 503);
    let r = reqwest::Client::new()
        .get(format!("{}/api/v4/users", s.base_url()))
        .bearer_auth(sb::LONG_LIVED_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    s.set_blocked(true);
    let (st, _, _) = api
        .send(reqwest::Method::GET, "/api/v4/users", T, None)
        .await;
    assert_eq!(st, 403);
}
