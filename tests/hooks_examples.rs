//! Every shipped example in `customizations/examples/`, enabled the documented way
//! (copied into a customizations folder, mode 0755) and run through the real binary:
//! `kolokol hook run NAME --config ... --input FILE`. Also `kolokol hook list`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_kolokol");

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("customizations/examples")
}

/// A customizations folder and a config pointing at it.
struct Site {
    root: tempfile::TempDir,
}

impl Site {
    fn new() -> Site {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("customizations")).unwrap();
        std::fs::write(
            root.path().join("config.toml"),
            format!(
                "[customizations]\ndir = \"{}\"\n",
                root.path().join("customizations").display()
            ),
        )
        .unwrap();
        Site { root }
    }

    fn dir(&self) -> PathBuf {
        self.root.path().join("customizations")
    }

    /// `install -m 0755 examples/<file> <dir>/`, optionally editing the text first.
    fn enable(&self, file: &str, edit: impl Fn(String) -> String) {
        let text = std::fs::read_to_string(examples_dir().join(file)).unwrap();
        let dest = self.dir().join(file);
        std::fs::write(&dest, edit(text)).unwrap();
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn run(&self, hook: &str, input: &Value) -> (bool, Value, String) {
        let input_path = self.root.path().join(format!("{hook}.input.json"));
        std::fs::write(&input_path, input.to_string()).unwrap();
        let out = Command::new(BIN)
            .args(["hook", "run", hook, "--config"])
            .arg(self.root.path().join("config.toml"))
            .arg("--input")
            .arg(&input_path)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let value = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("{hook}: stdout is not JSON ({e}): {stdout:?} / {stderr}"));
        (out.status.success(), value, stderr)
    }

    /// Run and expect the script's data to be used.
    fn data(&self, hook: &str, input: &Value) -> Value {
        let (ok, value, stderr) = self.run(hook, input);
        assert!(ok, "{hook} failed: {stderr}");
        assert!(stderr.contains("succeeded"), "{hook}: {stderr}");
        value
    }

    fn cancelled(&self, hook: &str, input: &Value) {
        let (ok, value, stderr) = self.run(hook, input);
        assert!(ok, "{hook}: {stderr}");
        assert_eq!(value, Value::Null);
        assert!(
            stderr.contains("cancelled by customization"),
            "{hook}: {stderr}"
        );
    }
}

fn keep(s: String) -> String {
    s
}

fn call_full(line: &str, result: u16) -> Value {
    json!({
        "id": "1700000000.7", "direction": "inbound", "client_phone": "89161234567",
        "line_number": line, "answered_by": "101", "result": result, "record": "",
        "duration": 20, "talk_duration": 5
    })
}

#[test]
fn every_hook_has_a_shipped_example_and_readme_section() {
    let readme = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("customizations/README.md"),
    )
    .unwrap();
    for hook in kolokol::hooks::Hook::ALL {
        let name = hook.as_str();
        let found = std::fs::read_dir(examples_dir())
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().split('.').next() == Some(name));
        assert!(found, "no example for {name}");
        assert!(
            readme.contains(&format!("## {name}")),
            "README has no section for {name}"
        );
    }
    assert!(readme.contains("## call_full"));
}

#[test]
fn need_registration_example_blacklists_lines() {
    let site = Site::new();
    site.enable("need_registration.py", keep);
    let input = |line: &str| json!({"call_full": call_full(line, 200), "call_stage": "call_ended"});
    assert_eq!(
        site.data("need_registration", &input("74950000000")),
        json!({"result": false})
    );
    assert_eq!(
        site.data("need_registration", &input("74951234567")),
        json!({"result": true})
    );
    // The white list, once filled in, filters by the answering extension.
    site.enable("need_registration.py", |s| {
        s.replace(
            "EXTENSION_WHITELIST = set()",
            "EXTENSION_WHITELIST = {\"102\"}",
        )
    });
    assert_eq!(
        site.data("need_registration", &input("74951234567")),
        json!({"result": false})
    );
}

#[test]
fn process_call_params_example_marks_short_calls() {
    let site = Site::new();
    site.enable("process_call_params.py", keep);
    let input = json!({
        "call_full": call_full("74951234567", 200), "call_result": "", "call_status": 4,
        "direction": "inbound", "duration": 5, "link": "https://x/r.mp3",
        "phone": "+79161234567", "source": "kolokol"
    });
    let out = site.data("process_call_params", &input);
    assert_eq!(out["call_result"], "Short call (under 10 s)");
    assert!(out.get("link").is_none() && out.get("call_full").is_none());
    assert_eq!(out["phone"], "+79161234567");
}

#[test]
fn process_client_phone_example_formats_international() {
    let site = Site::new();
    site.enable("process_client_phone.py", keep);
    for (given, want) in [
        ("8 (916) 123-45-67", "+79161234567"),
        ("79161234567", "+79161234567"),
        ("9161234567", "+79161234567"),
        ("+44 20 7946 0958", "+44 20 7946 0958"),
    ] {
        let input =
            json!({"phone": given, "call_full": call_full("1", 200), "call_stage": "call_ended"});
        assert_eq!(
            site.data("process_client_phone", &input),
            json!({"phone": want}),
            "{given}"
        );
    }
}

#[test]
fn contact_and_lead_creation_examples_tag_and_route() {
    let site = Site::new();
    site.enable("process_contact_creation_params.py", keep);
    site.enable("process_lead_creation_params.py", keep);
    let contact = site.data(
        "process_contact_creation_params",
        &json!({
            "call_full": call_full("74951234567", 200), "name": "Contact +79161234567",
            "responsible_user_id": 5, "tags": ["kolokol"], "custom_fields_values": []
        }),
    );
    assert_eq!(
        contact["tags"],
        json!(["kolokol", "Asterisk", "Moscow office"])
    );
    assert_eq!(contact["name"], "Client +79161234567");
    assert!(contact.get("call_full").is_none());

    let lead = site.data(
        "process_lead_creation_params",
        &json!({
            "call_full": call_full("74957654321", 486),
            "_embedded": {"contacts": [{"id": 9}], "tags": [{"name": "kolokol"}]},
            "name": "+79161234567 - missed incoming", "pipeline_id": 1, "status_id": 2,
            "responsible_user_id": 5
        }),
    );
    assert_eq!(
        lead["_embedded"]["tags"],
        json!([{"name": "kolokol"}, {"name": "Missed call"}])
    );
    assert_eq!(lead["pipeline_id"], 8000001);
    assert!(lead.get("status_id").is_none());
}

#[test]
fn originate_example_rewrites_numbers_and_blocks_some() {
    let site = Site::new();
    site.enable("process_originate_params.py", keep);
    let input = |ext: &str| {
        json!({"params": {
            "caller_id": "101", "channel": "PJSIP/101", "context": "from-internal",
            "extension": ext, "priority": "1", "request_data": {"user": 5}
        }})
    };
    let out = site.data("process_originate_params", &input("+7 (916) 123-45-67"));
    assert_eq!(
        out,
        json!({"caller_id": "101", "channel": "PJSIP/101", "context": "from-internal",
               "extension": "89161234567", "priority": "1"})
    );
    let out = site.data("process_originate_params", &input("+44 20 7946 0958"));
    assert_eq!(out["extension"], "810442079460958");
    assert_eq!(out["context"], "from-internal-intl");
    site.cancelled("process_originate_params", &input("8 800 555 35 35"));
}

#[test]
fn record_file_path_example_prefers_mp3_and_falls_back() {
    let site = Site::new();
    site.enable("process_record_file_path.py", keep);
    let rec = site.root.path().join("rec");
    std::fs::create_dir(&rec).unwrap();
    let wav = rec.join("in-1700000000.7.wav");
    let mp3 = rec.join("in-1700000000.7.mp3");
    std::fs::write(&wav, b"RIFF").unwrap();
    let input = json!({"call_full": call_full("1", 200), "path": wav});
    assert_eq!(
        site.data("process_record_file_path", &input),
        json!({"path": wav})
    );
    std::fs::write(&mp3, b"ID3").unwrap();
    assert_eq!(
        site.data("process_record_file_path", &input),
        json!({"path": mp3})
    );
    // Nothing found: empty data, kolokol keeps its own path (not a failure).
    let (ok, value, stderr) = site.run(
        "process_record_file_path",
        &json!({"call_full": {}, "path": "/nonexistent/x.wav"}),
    );
    assert!(ok && value.is_null(), "{stderr}");
    assert!(stderr.contains("returned empty data"), "{stderr}");
}

#[test]
fn task_example_sets_text_and_a_future_deadline() {
    let site = Site::new();
    site.enable("process_task_creation_params.py", keep);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let out = site.data(
        "process_task_creation_params",
        &json!({
            "call_full": call_full("1", 487), "complete_till": 0, "created_by": 0,
            "entity_id": 9, "entity_type": "contacts", "is_completed": false,
            "responsible_user_id": 5, "task_type": 1, "text": "Call back"
        }),
    );
    let text = out["text"].as_str().unwrap();
    assert!(
        text.starts_with("Missed call from 89161234567 at "),
        "{text}"
    );
    let due = out["complete_till"].as_u64().unwrap();
    assert!(due > now && due < now + 4 * 86400, "due {due}, now {now}");
    assert_eq!(out["entity_id"], 9);
}

#[test]
fn autodistribution_example_routes_vips_and_read_only_fields_are_dropped() {
    let site = Site::new();
    site.enable("autodistribution.py", keep);
    let input = |from: &str| {
        json!({
            "number": "101", "name": "Anna Smirnova", "from": from, "trunk": "prov",
            "request_data": {"from": from}, "entity": {"name": "Ivan Petrov-Vodkin Senior"}
        })
    };
    assert_eq!(
        site.data("autodistribution", &input("89161234567")),
        json!({"number": "100", "name": "VIP Ivan Petrov-Vodk"})
    );
    assert_eq!(
        site.data("autodistribution", &input("84950000000")),
        json!({"number": "101", "name": "Anna Smirnova"})
    );
    // An admin's edit that echoes everything back and forgets the 20-character limit:
    // kolokol still drops the read-only fields and cuts the name, with a warning.
    site.enable("autodistribution.py", |s| {
        s.replace(
            "    print(json.dumps({\"state\": \"success\", \"data\": result}))",
            "    request.update(result)\n    request[\"name\"] = \"A very long name for a phone display\"\n    print(json.dumps({\"state\": \"success\", \"data\": request}))",
        )
    });
    let (ok, value, stderr) = site.run("autodistribution", &input("89161234567"));
    assert!(ok, "{stderr}");
    assert_eq!(
        value,
        json!({"number": "100", "name": "A very long name for"})
    );
    assert!(stderr.contains("cut to 20 characters"), "{stderr}");
}

#[test]
fn post_registration_example_appends_to_its_journal() {
    let site = Site::new();
    let journal = site.root.path().join("journal.jsonl");
    site.enable("post_registration.sh", |s| {
        s.replace(
            "JOURNAL=/var/log/kolokol/post_registration.jsonl",
            &format!("JOURNAL={}", journal.display()),
        )
    });
    let a = json!({"call_full": call_full("1", 200), "call_stage": "call_ended", "crm": "kommo"});
    let b =
        json!({"call_full": call_full("2", 486), "call_stage": "call_ended", "crm": "bitrix24"});
    assert_eq!(site.data("post_registration", &a), json!({}));
    assert_eq!(site.data("post_registration", &b), json!({}));
    let lines: Vec<Value> = std::fs::read_to_string(&journal)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines, vec![a, b]);
}

#[test]
fn update_examples_protect_existing_entities() {
    let site = Site::new();
    site.enable("process_contact_update_params.py", keep);
    site.enable("process_lead_update_params.py", keep);
    let fields = json!([{"field_id": 1, "values": [{"enum_code": "WORK", "value": "+7916"}]}]);
    let out = site.data(
        "process_contact_update_params",
        &json!({"call_full": {}, "id": 3, "name": "Ivan", "responsible_user_id": 5,
                "custom_fields_values": fields}),
    );
    assert_eq!(out, json!({"id": 3, "custom_fields_values": fields}));
    site.cancelled(
        "process_contact_update_params",
        &json!({"call_full": {}, "id": 3, "name": "Ivan"}),
    );

    site.cancelled(
        "process_lead_update_params",
        &json!({"call_full": {}, "id": 7, "status_id": 142, "pipeline_id": 1}),
    );
    assert_eq!(
        site.data(
            "process_lead_update_params",
            &json!({"call_full": {}, "id": 7, "status_id": 100, "pipeline_id": 1, "name": "L"}),
        ),
        json!({"id": 7, "name": "L"})
    );
}

#[test]
fn unsorted_example_names_the_source_after_the_line() {
    let site = Site::new();
    site.enable("process_unsorted_creation_params.py", keep);
    let out = site.data(
        "process_unsorted_creation_params",
        &json!({
            "call_full": call_full("74951234567", 486), "source_uid": "1700000000.7",
            "source_name": "kolokol", "pipeline_id": 1, "metadata": {"phone": "+7916"},
            "_embedded": {"leads": [{"name": "+7916 - missed"}], "contacts": [{"name": "C"}]}
        }),
    );
    assert_eq!(out["source_name"], "Website");
    assert_eq!(
        out["_embedded"]["leads"][0]["name"],
        "+7916 - missed (Website)"
    );
    assert!(out.get("call_full").is_none());
}

#[test]
fn examples_run_from_the_examples_folder_with_their_sample_input() {
    // `kolokol hook run NAME --dir customizations/examples` tries an example before
    // enabling it, with the built-in sample input.
    for hook in kolokol::hooks::Hook::ALL {
        if hook == kolokol::hooks::Hook::PostRegistration {
            continue; // writes to /var/log/kolokol
        }
        let out = Command::new(BIN)
            .args(["hook", "run", hook.as_str(), "--dir"])
            .arg(examples_dir())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{hook}: {stderr}");
        assert!(!stderr.contains("FAILED"), "{hook}: {stderr}");
    }
}

#[test]
fn hook_list_and_failures_through_the_cli() {
    let site = Site::new();
    site.enable("process_client_phone.py", keep);
    std::fs::write(
        site.dir().join("need_registration.sh"),
        "#!/bin/sh\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(
        site.dir().join("need_registration.sh"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    std::fs::write(
        site.root.path().join("config.toml"),
        format!(
            "[customizations]\ndir = \"{}\"\n[customizations.timeouts]\nprocess_client_phone = \"1500ms\"\n",
            site.dir().display()
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["hook", "list", "--config"])
        .arg(site.root.path().join("config.toml"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let line = |hook: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{hook} ")))
            .unwrap_or_else(|| panic!("{hook} not listed: {text}"))
            .to_string()
    };
    assert!(line("process_client_phone").contains("installed: process_client_phone.py"));
    assert!(line("process_client_phone").contains("1s 500ms"));
    assert!(line("need_registration").contains("NOT EXECUTABLE"));
    assert!(line("process_record_file_path").contains("10s"));
    assert!(line("autodistribution").contains("not installed"));
    assert!(text.lines().filter(|l| l.contains("  ")).count() >= 13);

    // A failing hook: exit code 1, the reason and the default on stderr.
    let (ok, _, stderr) = {
        let out = Command::new(BIN)
            .args(["hook", "run", "need_registration", "--config"])
            .arg(site.root.path().join("config.toml"))
            .output()
            .unwrap();
        (
            out.status.success(),
            (),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert!(!ok);
    assert!(stderr.contains("not executable"), "{stderr}");
    assert!(stderr.contains("the daemon would use the default: the call is registered"));

    // Input from stdin.
    let mut child = Command::new(BIN)
        .args([
            "hook",
            "run",
            "process_client_phone",
            "--input",
            "-",
            "--config",
        ])
        .arg(site.root.path().join("config.toml"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(br#"{"phone": "89031112233"}"#).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v, json!({"phone": "+79031112233"}));

    // An unknown hook name is a usage error that lists the real names.
    let out = Command::new(BIN)
        .args(["hook", "run", "need_registrations"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("process_client_phone"));
}
