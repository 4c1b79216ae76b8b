//! The demo world: a simulated PBX (the recorded fixtures replayed with fresh ids, paced
//! like a real office) and the sandbox Kommo and Bitrix24 servers, plus a config that
//! points kolokol at them. `kolokol demo` runs the real daemon in it; the end-to-end
//! tests run the real binary against it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::ami_server::{FakeAmi, FakeAmiOptions, FakeUser, Replay};
use super::bitrix24::{SandboxBitrix24, SandboxHandle};
use super::kommo::{self as sk, SandboxKommo};

/// AMI credentials of the simulated PBX.
pub const DEMO_AMI_USER: &str = "kolokol";
pub const DEMO_AMI_SECRET: &str = "kolokol-demo";
/// Password of the demo admin page.
pub const DEMO_ADMIN_PASSWORD: &str = "demo";

/// A recorded call scenario, built into the binary so the demo needs no files.
pub struct Scenario {
    pub name: &'static str,
    pub ami: &'static [u8],
    pub timeline: &'static str,
}

macro_rules! scenario {
    ($name:literal) => {
        Scenario {
            name: $name,
            ami: include_bytes!(concat!("../../tests/fixtures/ami/", $name, ".ami")),
            timeline: include_str!(concat!("../../tests/fixtures/ami/", $name, ".timeline")),
        }
    };
}

/// The call scenarios, in the order an office day replays them.
pub const SCENARIOS: &[Scenario] = &[
    scenario!("01-inbound-answered-recorded"),
    scenario!("02-inbound-noanswer-missed"),
    scenario!("03-inbound-busy"),
    scenario!("04-inbound-ringgroup-102-answers"),
    scenario!("05-inbound-queue-101-answers"),
    scenario!("06-inbound-blind-transfer-101-to-102"),
    scenario!("07-inbound-attended-transfer-101-to-102"),
    scenario!("08-outbound-101-answered"),
    scenario!("09-outbound-101-noanswer"),
    scenario!("10-internal-101-to-102"),
    scenario!("12-inbound-fastagi-autodistribution"),
    scenario!("13-inbound-abandoned-while-ringing"),
    scenario!("16-inbound-blind-transfer-sip-refer"),
    scenario!("17-inbound-queue-local-members-102-answers"),
];

/// The recordings MixMonitor made in the fixtures (the demo PBX "records" with them).
pub const RECORDINGS: &[(&str, &[u8])] = &[
    (
        "in",
        include_bytes!(
            "../../tests/fixtures/recordings/in-20261121-234741-79161234567-1795304861.0.wav"
        ),
    ),
    (
        "out",
        include_bytes!(
            "../../tests/fixtures/recordings/out-20261121-234919-79161234567-1795304959.20.wav"
        ),
    ),
];

/// The simulated PBX and sandbox CRMs, running.
pub struct DemoWorld {
    pub ami: FakeAmi,
    pub kommo: SandboxKommo,
    pub bitrix: SandboxHandle,
    /// Where the demo keeps its state, config and "PBX spool".
    pub dir: PathBuf,
}

impl DemoWorld {
    /// Start the simulated PBX and both sandboxes on ephemeral loopback ports.
    pub async fn start(dir: &Path) -> std::io::Result<DemoWorld> {
        std::fs::create_dir_all(dir.join("spool"))?;
        std::fs::create_dir_all(dir.join("state"))?;
        let ami = FakeAmi::start(FakeAmiOptions {
            users: vec![FakeUser::new(DEMO_AMI_USER, DEMO_AMI_SECRET, false)],
            ..FakeAmiOptions::default()
        })
        .await?;
        let kommo = SandboxKommo::start().await?;
        let bitrix = SandboxBitrix24::start().await?;
        Ok(DemoWorld {
            ami,
            kommo,
            bitrix,
            dir: dir.to_path_buf(),
        })
    }

    /// The config that points kolokol at this world, as TOML (what an admin would write).
    pub fn config_toml(&self, http_listen: &str) -> String {
        let spool = self.dir.join("spool");
        let state = self.dir.join("state");
        let hooks = self.dir.join("customizations");
        let public = format!("http://{http_listen}");
        let admin_hash = {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(DEMO_ADMIN_PASSWORD.as_bytes()))
        };
        format!(
            r#"# kolokol demo: a simulated PBX and sandbox CRMs on loopback.
[ami]
host = "127.0.0.1"
port = {ami_port}
username = "{DEMO_AMI_USER}"
secret = "{DEMO_AMI_SECRET}"
ping_interval = "5s"

[customizations]
dir = "{hooks}"

[records]
dir = "{spool}"
pbx_dir = "/var/spool/asterisk/monitor"

[storage]
state_dir = "{state}"
retry_min = "200ms"
retry_max = "5s"

[agi]
listen = "127.0.0.1:0"

[http]
listen = "{http_listen}"
public_url = "{public}"
admin_password_sha256 = "{admin_hash}"

[kommo]
base_url = "{kommo}"
long_lived_token = "{token}"
default_responsible_user_id = {admin}

[kommo.users]
"101" = 5002
"102" = 5003

[bitrix24]
webhook_url = "{bitrix}"
"#,
            ami_port = self.ami.local_addr().port(),
            hooks = hooks.display(),
            spool = spool.display(),
            state = state.display(),
            kommo = self.kommo.base_url(),
            token = sk::LONG_LIVED_TOKEN,
            admin = sk::ADMIN_USER_ID,
            bitrix = self.bitrix.webhook_url(),
        )
    }

    /// Replay one scenario as a new call (fresh ids). `speed` > 1 plays faster than
    /// recorded. MixMonitor files the scenario names are created in the demo spool.
    pub async fn play(&self, scenario: &Scenario, speed: f64) {
        let replay = Replay::from_ami_bytes(scenario.ami, Some(scenario.timeline))
            .timed(true)
            .speed(speed)
            .fresh_ids(true);
        let spool = self.dir.join("spool");
        self.ami
            .play_with(&replay, move |bytes| write_recordings(&spool, bytes))
            .await;
    }

    /// Replay one scenario exactly as recorded (original ids), as fast as possible.
    pub async fn play_original(&self, scenario: &Scenario) {
        let replay = Replay::from_ami_bytes(scenario.ami, Some(scenario.timeline));
        write_recordings(&self.dir.join("spool"), replay.bytes());
        self.ami.play(&replay).await;
    }
}

/// Put a recording under every MixMonitor file name the events mention (the simulated
/// PBX records each answered call with the fixture's wav).
pub fn write_recordings(spool: &Path, bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if line.trim_end() != "Variable: MIXMONITOR_FILENAME" {
            continue;
        }
        let Some(value) = lines.next().and_then(|l| l.strip_prefix("Value: ")) else {
            continue;
        };
        let Some(name) = Path::new(value.trim()).file_name() else {
            continue;
        };
        let name_text = name.to_string_lossy();
        let wav = RECORDINGS
            .iter()
            .find(|(prefix, _)| name_text.starts_with(prefix))
            .map_or(RECORDINGS[0].1, |(_, b)| *b);
        let path = spool.join(name);
        if !path.exists() {
            if let Err(e) = std::fs::write(&path, wav) {
                tracing::warn!(path = %path.display(), error = %e, "demo: cannot write recording");
            }
        }
    }
}

/// A pause between calls that feels like an office: 1-4 s at speed 1.
pub fn office_pause(speed: f64) -> Duration {
    use rand::Rng;
    let secs = rand::thread_rng().gen_range(1.0..4.0) / speed.max(0.1);
    Duration::from_secs_f64(secs)
}
