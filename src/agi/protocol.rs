//! The FastAGI wire format, as Asterisk speaks it (see `tests/fixtures/agi/`).
//!
//! * Asterisk sends the environment: `agi_key: value\n` lines, then an empty line.
//!   `agi_network_script` is the URL path after the host, possibly with `?query`;
//!   dialplan arguments arrive as `agi_arg_1`, `agi_arg_2`, ...
//! * Then the server writes one command line at a time and reads its reply:
//!   `200 result=N [(data)] [endpos=N]`; `100 result=0 Trying...` before a later 200;
//!   `510 Invalid or unknown command`; `511 Command Not Permitted on a dead channel`;
//!   `520-...` usage lines ending with `520 End of proper usage.`.
//! * `HANGUP\n` arrives whenever the caller hangs up, also between a command and its
//!   reply, and once more after the server closes (Asterisk's AGISIGHUP default).
//!
//! Every read is bounded in size and time: a session that breaks a limit is closed
//! with an [`AgiError`] and affects nothing else.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

/// Size and time limits for one session.
#[derive(Debug, Clone, Copy)]
pub struct AgiLimits {
    /// The whole environment block, in bytes.
    pub max_header_bytes: usize,
    /// Lines in the environment block.
    pub max_header_lines: usize,
    /// One line (header or reply).
    pub max_line_bytes: usize,
    /// The whole environment block must arrive within this time.
    pub header_timeout: Duration,
    /// One reply line must arrive within this time.
    pub read_timeout: Duration,
    /// Lines in one reply (a `520-` usage text).
    pub max_reply_lines: usize,
}

impl Default for AgiLimits {
    fn default() -> Self {
        super::AgiConfig::default().limits()
    }
}

/// Why a session was ended.
#[derive(Debug, thiserror::Error)]
pub enum AgiError {
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
    #[error("the agi_* environment did not arrive within {0:?} (slow or stalled sender)")]
    HeaderTimeout(Duration),
    #[error("no reply from Asterisk within {0:?}")]
    ReadTimeout(Duration),
    #[error("agi_* environment larger than {0} bytes")]
    HeaderTooLarge(usize),
    #[error("agi_* environment has more than {0} lines")]
    TooManyHeaderLines(usize),
    #[error("line longer than {0} bytes")]
    LineTooLong(usize),
    #[error("reply longer than {0} lines")]
    ReplyTooLong(usize),
    #[error("not FastAGI: {0:?}")]
    Garbage(String),
    #[error("connection closed by Asterisk")]
    Closed,
    #[error("refusing to send a command containing a line break: {0:?}")]
    BadCommand(String),
}

impl AgiError {
    /// A short sample of hostile input for the log line, never the whole thing.
    fn garbage(line: &[u8]) -> AgiError {
        let n = line.len().min(60);
        AgiError::Garbage(String::from_utf8_lossy(&line[..n]).into_owned())
    }
}

/// The `agi_*` environment of one session. The block is kept as one string and the
/// pairs as spans into it (one allocation instead of two per line).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgiEnv {
    raw: String,
    /// `(key_start, key_end, value_start, value_end)` into `raw`, in wire order.
    spans: Vec<(u32, u32, u32, u32)>,
    /// Script name from `agi_network_script` without the leading `/` and the query.
    pub script: String,
    /// Decoded `?query` parameters of `agi_network_script`, in order.
    pub query: Vec<(String, String)>,
    /// `agi_arg_1`, `agi_arg_2`, ... in number order.
    pub args: Vec<String>,
}

impl AgiEnv {
    /// Build from the header lines (without line ends, without the closing empty line).
    pub fn from_lines<'a>(lines: impl IntoIterator<Item = &'a str>) -> Result<AgiEnv, AgiError> {
        let mut raw = String::new();
        for l in lines {
            raw.push_str(l);
            raw.push('\n');
        }
        AgiEnv::parse(raw)
    }

    /// Parse a block of `\n`-terminated header lines.
    fn parse(raw: String) -> Result<AgiEnv, AgiError> {
        let mut spans = Vec::with_capacity(24);
        let mut numbered_args: Vec<(u32, String)> = Vec::new();
        let mut pos = 0usize;
        for line in raw.split_terminator('\n') {
            let start = pos;
            pos += line.len() + 1;
            let Some(colon) = line.find(':') else {
                return Err(AgiError::garbage(line.as_bytes()));
            };
            let key = &line[..colon];
            // Asterisk writes "key: value"; an empty value is "key: " (fixture 12).
            let vstart = if line[colon + 1..].starts_with(' ') {
                colon + 2
            } else {
                colon + 1
            };
            let value = &line[vstart..];
            let valid_key = key.starts_with("agi_")
                && key.len() <= 64
                && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !valid_key {
                return Err(AgiError::garbage(line.as_bytes()));
            }
            if let Some(n) = key.strip_prefix("agi_arg_")
                && let Ok(n) = n.parse::<u32>()
            {
                numbered_args.push((n, value.to_string()));
            }
            spans.push((
                start as u32,
                (start + colon) as u32,
                (start + vstart) as u32,
                (start + line.len()) as u32,
            ));
        }
        numbered_args.sort_by_key(|(n, _)| *n);
        let mut env = AgiEnv {
            raw,
            spans,
            script: String::new(),
            query: Vec::new(),
            args: numbered_args.into_iter().map(|(_, v)| v).collect(),
        };
        let full = env.get("agi_network_script").unwrap_or("");
        let (path, query) = match full.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (full, None),
        };
        let script = path.trim_start_matches('/').to_string();
        let query = query.map(parse_query).unwrap_or_default();
        env.script = script;
        env.query = query;
        Ok(env)
    }

    /// Every `agi_*` pair, in wire order, values exactly as sent.
    pub fn vars(&self) -> impl ExactSizeIterator<Item = (&str, &str)> + '_ {
        self.spans.iter().map(move |&(ks, ke, vs, ve)| {
            (
                &self.raw[ks as usize..ke as usize],
                &self.raw[vs as usize..ve as usize],
            )
        })
    }

    /// The value of `key` (e.g. `agi_callerid`), if sent.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.vars().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// A `?query` parameter of the script URL.
    pub fn query_param(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The caller's number, unless Asterisk marks it unknown.
    pub fn caller_id(&self) -> Option<&str> {
        known(self.get("agi_callerid"))
    }

    /// The channel's unique id (used as the call id in logs).
    pub fn uniqueid(&self) -> &str {
        self.get("agi_uniqueid").unwrap_or("")
    }
}

/// Asterisk writes `unknown` (or nothing) for absent caller data.
pub(crate) fn known(v: Option<&str>) -> Option<&str> {
    v.map(str::trim)
        .filter(|v| !v.is_empty() && !v.eq_ignore_ascii_case("unknown"))
}

/// Decode `a=1&b=x%20y` (also `+` as space); undecodable escapes are kept as written.
pub fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Asterisk's answer to one command.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// `200 result=N [(data)] [endpos=N]`.
    Success {
        result: i64,
        data: Option<String>,
        endpos: Option<u64>,
    },
    /// `510 Invalid or unknown command`.
    InvalidCommand(String),
    /// `511 Command Not Permitted on a dead channel ...`.
    DeadChannel(String),
    /// `520` usage text (all lines, without the codes).
    Usage(Vec<String>),
}

/// What one reply line is.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ReplyLine {
    Hangup,
    Trying,
    Final(Reply),
    UsageStart(String),
    Other,
}

/// Classify one reply line (without its line end).
pub(crate) fn classify(line: &str) -> ReplyLine {
    if line == "HANGUP" {
        return ReplyLine::Hangup;
    }
    if let Some(rest) = line.strip_prefix("200 ") {
        return match parse_200(rest) {
            Some(r) => ReplyLine::Final(r),
            None => ReplyLine::Other,
        };
    }
    if line.starts_with("100 ") {
        return ReplyLine::Trying;
    }
    if let Some(rest) = line.strip_prefix("510") {
        return ReplyLine::Final(Reply::InvalidCommand(rest.trim().to_string()));
    }
    if let Some(rest) = line.strip_prefix("511") {
        return ReplyLine::Final(Reply::DeadChannel(rest.trim().to_string()));
    }
    if let Some(rest) = line.strip_prefix("520-") {
        return ReplyLine::UsageStart(rest.to_string());
    }
    if let Some(rest) = line.strip_prefix("520 ") {
        return ReplyLine::Final(Reply::Usage(vec![rest.to_string()]));
    }
    ReplyLine::Other
}

/// `result=1 (some data) endpos=1234`.
fn parse_200(rest: &str) -> Option<Reply> {
    let rest = rest.trim_start().strip_prefix("result=")?;
    let num_end = rest
        .char_indices()
        .find(|&(i, c)| !(c.is_ascii_digit() || (i == 0 && c == '-')))
        .map(|(i, _)| i)
        .unwrap_or(rest.len());
    let result: i64 = rest[..num_end].parse().ok()?;
    let mut tail = rest[num_end..].trim_start();
    let mut data = None;
    if let Some(inner) = tail.strip_prefix('(') {
        // Data may itself contain ')': the closing one is the last before " endpos=" or
        // the end of the line.
        let close = match inner.rfind(") endpos=") {
            Some(i) => Some(i),
            None => inner.rfind(')'),
        };
        let close = close?;
        data = Some(inner[..close].to_string());
        tail = inner[close + 1..].trim_start();
    }
    let endpos = tail
        .strip_prefix("endpos=")
        .and_then(|n| n.trim().parse::<u64>().ok());
    Some(Reply::Success {
        result,
        data,
        endpos,
    })
}

/// One FastAGI connection with its limits.
pub struct AgiConn<S> {
    io: BufReader<S>,
    limits: AgiLimits,
    line: Vec<u8>,
    /// Asterisk sent `HANGUP`: the caller is gone.
    hung_up: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> AgiConn<S> {
    pub fn new(stream: S, limits: AgiLimits) -> Self {
        AgiConn {
            // Asterisk's environment block is ~550 bytes; longer lines just take more reads.
            io: BufReader::with_capacity(1024, stream),
            limits,
            line: Vec::with_capacity(256),
            hung_up: false,
        }
    }

    /// True once Asterisk sent `HANGUP` (the caller hung up).
    pub fn hung_up(&self) -> bool {
        self.hung_up
    }

    /// Read one line of at most `max_line_bytes` into `self.line` (without its line
    /// end); `Ok(false)` on a clean EOF between lines.
    async fn read_line(&mut self) -> Result<bool, AgiError> {
        self.line.clear();
        let max = self.limits.max_line_bytes;
        loop {
            let buf = self.io.fill_buf().await?;
            if buf.is_empty() {
                return if self.line.is_empty() {
                    Ok(false)
                } else {
                    Err(AgiError::Closed)
                };
            }
            match memchr::memchr(b'\n', buf) {
                Some(i) => {
                    if self.line.len() + i > max {
                        return Err(AgiError::LineTooLong(max));
                    }
                    self.line.extend_from_slice(&buf[..i]);
                    self.io.consume(i + 1);
                    break;
                }
                None => {
                    let n = buf.len();
                    if self.line.len() + n > max {
                        return Err(AgiError::LineTooLong(max));
                    }
                    self.line.extend_from_slice(buf);
                    self.io.consume(n);
                }
            }
        }
        if self.line.last() == Some(&b'\r') {
            self.line.pop();
        }
        Ok(true)
    }

    /// The line just read, as text.
    fn line_text(&self) -> Result<&str, AgiError> {
        std::str::from_utf8(&self.line).map_err(|_| AgiError::garbage(&self.line))
    }

    /// Read the `agi_*` environment block, within the header limits and deadline.
    pub async fn read_env(&mut self) -> Result<AgiEnv, AgiError> {
        let limit = self.limits.header_timeout;
        match tokio::time::timeout(limit, self.read_env_inner()).await {
            Ok(r) => r,
            Err(_) => Err(AgiError::HeaderTimeout(limit)),
        }
    }

    async fn read_env_inner(&mut self) -> Result<AgiEnv, AgiError> {
        let mut raw = String::with_capacity(640);
        let mut lines = 0usize;
        loop {
            if !self.read_line().await? {
                return Err(AgiError::Closed);
            }
            let line = self.line_text()?;
            if line.is_empty() {
                break;
            }
            if raw.len() + line.len() + 1 > self.limits.max_header_bytes {
                return Err(AgiError::HeaderTooLarge(self.limits.max_header_bytes));
            }
            if lines >= self.limits.max_header_lines {
                return Err(AgiError::TooManyHeaderLines(self.limits.max_header_lines));
            }
            // Fail fast on garbage instead of waiting for the whole block.
            if lines == 0 && !line.starts_with("agi_") {
                return Err(AgiError::garbage(line.as_bytes()));
            }
            raw.push_str(line);
            raw.push('\n');
            lines += 1;
        }
        AgiEnv::parse(raw)
    }

    /// Send one command line and read its final reply (skipping `100 Trying` and noting
    /// `HANGUP` lines).
    pub async fn command(&mut self, cmd: &str) -> Result<Reply, AgiError> {
        if cmd.contains(['\n', '\r']) {
            return Err(AgiError::BadCommand(cmd.to_string()));
        }
        let mut out = Vec::with_capacity(cmd.len() + 1);
        out.extend_from_slice(cmd.as_bytes());
        out.push(b'\n');
        self.io.get_mut().write_all(&out).await?;
        self.read_reply().await
    }

    async fn read_reply(&mut self) -> Result<Reply, AgiError> {
        let mut usage: Option<Vec<String>> = None;
        let mut lines = 0usize;
        loop {
            lines += 1;
            if lines > self.limits.max_reply_lines {
                return Err(AgiError::ReplyTooLong(self.limits.max_reply_lines));
            }
            let limit = self.limits.read_timeout;
            match tokio::time::timeout(limit, self.read_line()).await {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => return Err(AgiError::Closed),
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(AgiError::ReadTimeout(limit)),
            }
            let line = self.line_text()?;
            if let Some(text) = usage.as_mut() {
                // Inside a 520- block every line is usage text until "520 End...".
                match line.strip_prefix("520 ") {
                    Some(last) => {
                        text.push(last.to_string());
                        return Ok(Reply::Usage(std::mem::take(text)));
                    }
                    None => text.push(line.to_string()),
                }
                continue;
            }
            match classify(line) {
                ReplyLine::Hangup => self.hung_up = true,
                ReplyLine::Trying => {}
                ReplyLine::Final(r) => return Ok(r),
                ReplyLine::UsageStart(first) => usage = Some(vec![first]),
                ReplyLine::Other => return Err(AgiError::garbage(line.as_bytes())),
            }
        }
    }

    /// Resolves when Asterisk says something while no command is pending: `Ok` for
    /// `HANGUP` or EOF (the caller left), an error for anything else. Cancel-safe until
    /// the first byte arrives (it only peeks), so it can race a lookup in `select!`.
    pub async fn caller_gone(&mut self) -> Result<(), AgiError> {
        if self.io.fill_buf().await?.is_empty() {
            return Ok(());
        }
        let limit = self.limits.read_timeout;
        match tokio::time::timeout(limit, self.read_line()).await {
            Ok(Ok(false)) => {
                self.hung_up = true;
                Ok(())
            }
            Ok(Ok(true)) if self.line == b"HANGUP" => {
                self.hung_up = true;
                Ok(())
            }
            Ok(Ok(true)) => Err(AgiError::garbage(&self.line)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(AgiError::ReadTimeout(limit)),
        }
    }

    /// Close our side (FIN), then read what Asterisk still sends (its `HANGUP`) until it
    /// closes too, bounded in bytes and time, so the socket ends without a reset.
    pub async fn finish(&mut self, linger: Duration) {
        if self.io.get_mut().shutdown().await.is_err() {
            return;
        }
        let drain = async {
            let mut scratch = [0u8; 256];
            let mut left = 4096usize;
            while left > 0 {
                match self.io.read(&mut scratch).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        };
        let _ = tokio::time::timeout(linger, drain).await;
    }

    /// The underlying stream.
    pub fn get_mut(&mut self) -> &mut S {
        self.io.get_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_classified() {
        assert_eq!(
            classify("200 result=1"),
            ReplyLine::Final(Reply::Success {
                result: 1,
                data: None,
                endpos: None
            })
        );
        assert_eq!(
            classify("200 result=-1 (timeout) endpos=12345"),
            ReplyLine::Final(Reply::Success {
                result: -1,
                data: Some("timeout".into()),
                endpos: Some(12345)
            })
        );
        assert_eq!(
            classify("200 result=1 (a (b) c)"),
            ReplyLine::Final(Reply::Success {
                result: 1,
                data: Some("a (b) c".into()),
                endpos: None
            })
        );
        assert_eq!(classify("100 result=0 Trying..."), ReplyLine::Trying);
        assert_eq!(classify("HANGUP"), ReplyLine::Hangup);
        assert!(matches!(
            classify("511 Command Not Permitted on a dead channel or intercept routine"),
            ReplyLine::Final(Reply::DeadChannel(_))
        ));
        assert!(matches!(
            classify("510 Invalid or unknown command"),
            ReplyLine::Final(Reply::InvalidCommand(_))
        ));
        assert!(matches!(
            classify("520-Invalid command syntax.  Proper usage follows:"),
            ReplyLine::UsageStart(_)
        ));
        assert_eq!(classify("200 nonsense"), ReplyLine::Other);
        assert_eq!(classify("hello"), ReplyLine::Other);
    }

    #[test]
    fn env_parses_script_query_and_args() {
        let env = AgiEnv::from_lines([
            "agi_network: yes",
            "agi_network_script: autodistribution?trunk=74951234570&name=A%20B+C",
            "agi_callerid: 79161234567",
            "agi_accountcode: ",
            "agi_arg_2: second",
            "agi_arg_1: first",
        ])
        .unwrap();
        assert_eq!(env.script, "autodistribution");
        assert_eq!(env.query_param("trunk"), Some("74951234570"));
        assert_eq!(env.query_param("name"), Some("A B C"));
        assert_eq!(env.args, vec!["first", "second"]);
        assert_eq!(env.get("agi_accountcode"), Some(""));
        assert_eq!(env.caller_id(), Some("79161234567"));
    }

    #[test]
    fn env_rejects_garbage_lines() {
        assert!(matches!(
            AgiEnv::from_lines(["GET / HTTP/1.1"]),
            Err(AgiError::Garbage(_))
        ));
        assert!(matches!(
            AgiEnv::from_lines(["agi_x y: 1"]),
            Err(AgiError::Garbage(_))
        ));
    }

    #[test]
    fn percent_decoding_keeps_bad_escapes() {
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("%41"), "A");
    }
}
