//! The audit trail: one JSON record per decision, to a Kafka topic, an AMQP exchange or a
//! JSON-lines file rotated by size, for a SIEM. The record is part of the message's delivery:
//! the source message is acknowledged only once its publish and its audit record are both
//! confirmed, so no decision goes unrecorded (a redelivered message is recorded again; records
//! carry the message's stable id). Records never hold the token, only its fingerprint.
//!
//! Schema [`SCHEMA`] (versioned: fields are only ever added within a version):
//! `schema`, `time` (RFC 3339, ms), `instance`, `route`, `message_id`, `source`
//! (`{broker: "kafka", topic, partition, offset}` or `{broker: "amqp", queue, exchange,
//! routing_key}`), `verdict` (`accepted` | `rejected`), `reason` and `detail` (rejected),
//! and what is known of the token: `issuer` (verified `iss`), `subject`, `kid`, `jti`,
//! `fingerprint`. Unknown values are `null`.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::SystemTime;

use serde::Serialize;

use crate::config::file::AuditFileConfig;
use crate::envelope::{Envelope, HeaderData, Origin, Outgoing};
use crate::sink::{Confirm, PublishError, Sink};
use crate::verify::{Facts, Rejection};

/// The record schema's name and version.
pub const SCHEMA: &str = "tokengate.audit/1";

#[derive(Serialize)]
struct Record<'a> {
    schema: &'static str,
    time: String,
    instance: Option<&'a str>,
    route: &'a str,
    message_id: String,
    source: Source<'a>,
    verdict: &'static str,
    reason: Option<&'static str>,
    detail: Option<&'a str>,
    issuer: Option<&'a str>,
    subject: Option<&'a str>,
    kid: Option<&'a str>,
    jti: Option<&'a str>,
    fingerprint: Option<&'a str>,
}

#[derive(Serialize)]
#[serde(tag = "broker", rename_all = "snake_case")]
enum Source<'a> {
    Kafka { topic: &'a str, partition: i32, offset: i64 },
    Amqp { queue: &'a str, exchange: &'a str, routing_key: &'a str },
}

/// The JSON record of one decision.
pub fn record(
    instance: Option<&str>,
    route: &str,
    env: &Envelope,
    rejection: Option<&Rejection>,
    facts: &Facts,
    at: SystemTime,
) -> Vec<u8> {
    let source = match &env.origin {
        Origin::Kafka { topic, partition, offset } => Source::Kafka { topic, partition: *partition, offset: *offset },
        Origin::Amqp { queue, exchange, routing_key, .. } => Source::Amqp { queue, exchange, routing_key },
    };
    let r = Record {
        schema: SCHEMA,
        time: humantime::format_rfc3339_millis(at).to_string(),
        instance,
        route,
        message_id: env.message_id(),
        source,
        verdict: if rejection.is_some() { "rejected" } else { "accepted" },
        reason: rejection.map(|r| r.reason.code()),
        detail: rejection.map(|r| r.detail.as_str()),
        issuer: facts.issuer.as_deref(),
        subject: facts.subject.as_deref(),
        kid: facts.kid.as_deref(),
        jti: facts.jti.as_deref(),
        fingerprint: facts.fingerprint.as_deref(),
    };
    serde_json::to_vec(&r).expect("a record of strings and numbers serializes")
}

/// Where records go.
pub struct Audit {
    instance: Option<String>,
    dest: Dest,
}

enum Dest {
    Broker(Box<Sink>),
    File(Mutex<JsonLines>),
}

impl Audit {
    /// Records to a broker destination.
    pub fn broker(sink: Sink, instance: Option<String>) -> Audit {
        Audit { instance, dest: Dest::Broker(Box::new(sink)) }
    }

    /// Records to a JSON-lines file (opened now: a file that cannot be opened is a start error).
    pub fn file(config: &AuditFileConfig, instance: Option<String>) -> std::io::Result<Audit> {
        Ok(Audit { instance, dest: Dest::File(Mutex::new(JsonLines::open(config)?)) })
    }

    /// Where records go, for logs.
    pub fn describe(&self) -> String {
        match &self.dest {
            Dest::Broker(s) => s.describe(),
            Dest::File(f) => format!("file {}", f.lock().expect("not poisoned").path.display()),
        }
    }

    /// Writes the record of one decision; the returned future resolves once it is confirmed
    /// (a broker's confirm; for a file, written to the OS, and synced if configured).
    pub async fn write(
        &self,
        route: &str,
        env: &Envelope,
        rejection: Option<&Rejection>,
        facts: &Facts,
    ) -> Result<Confirm, PublishError> {
        let line = record(self.instance.as_deref(), route, env, rejection, facts, SystemTime::now());
        match &self.dest {
            Dest::Broker(sink) => {
                let out = Outgoing {
                    key: Some(env.message_id().into_bytes()),
                    payload: Some(line),
                    headers: vec![("content-type".into(), HeaderData::Bytes(b"application/json".to_vec()))],
                    timestamp_ms: None,
                    origin: env.origin.clone(),
                    amqp: None,
                    amqp_headers: None,
                    facts: None,
                    prepared: None,
                };
                sink.send(out).await
            }
            Dest::File(f) => {
                let written = f.lock().expect("not poisoned").append(&line);
                written.map_err(|e| PublishError::Failed(format!("audit file: {e}")))?;
                Ok(Box::pin(std::future::ready(Ok(()))))
            }
        }
    }

    /// Syncs a file destination (shutdown).
    pub fn sync(&self) {
        if let Dest::File(f) = &self.dest
            && let Err(e) = f.lock().expect("not poisoned").file.sync_data()
        {
            tracing::error!(error = %e, "audit file sync failed");
        }
    }
}

/// An append-only JSON-lines file, rotated by size: `path` -> `path.1` -> ... -> `path.keep`.
struct JsonLines {
    path: PathBuf,
    file: std::fs::File,
    size: u64,
    max_bytes: u64,
    keep: u32,
    fsync: bool,
}

impl JsonLines {
    fn open(c: &AuditFileConfig) -> std::io::Result<JsonLines> {
        let file = open_append(&c.path)?;
        let size = file.metadata()?.len();
        Ok(JsonLines { path: c.path.clone(), file, size, max_bytes: c.max_bytes, keep: c.keep, fsync: c.fsync })
    }

    /// Appends one line in one write (a reader never sees half a record).
    fn append(&mut self, record: &[u8]) -> std::io::Result<()> {
        let len = record.len() as u64 + 1;
        if self.size > 0 && self.size + len > self.max_bytes {
            self.rotate()?;
        }
        let mut line = Vec::with_capacity(record.len() + 1);
        line.extend_from_slice(record);
        line.push(b'\n');
        self.file.write_all(&line)?;
        self.size += len;
        if self.fsync {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.file.sync_data()?;
        let numbered = |n: u32| {
            let mut p = self.path.clone().into_os_string();
            p.push(format!(".{n}"));
            PathBuf::from(p)
        };
        if self.keep == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            for n in (1..self.keep).rev() {
                if numbered(n).exists() {
                    std::fs::rename(numbered(n), numbered(n + 1))?;
                }
            }
            std::fs::rename(&self.path, numbered(1))?;
        }
        self.file = open_append(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

fn open_append(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    let mut o = std::fs::OpenOptions::new();
    o.create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o640);
    o.open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::Reason;

    fn kafka_message() -> Envelope {
        Envelope {
            key: None,
            payload: Some(b"p".to_vec()),
            headers: vec![("authorization".into(), HeaderData::Bytes(b"Bearer secret.token.value".to_vec()))],
            timestamp_ms: None,
            origin: Origin::Kafka { topic: "orders".into(), partition: 1, offset: 42 },
            amqp: None,
            amqp_headers: None,
            defect: None,
        }
    }

    #[test]
    fn a_record_is_the_documented_schema_and_never_the_token() {
        let facts = Facts { fingerprint: Some("ab12".into()), ..Facts::default() };
        let r = Rejection::new(Reason::Expired, "exp passed");
        let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_800_000_000_123);
        let line = record(Some("gate-1"), "orders", &kafka_message(), Some(&r), &facts, at);
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "schema": "tokengate.audit/1", "time": "2027-01-15T08:00:00.123Z", "instance": "gate-1",
                "route": "orders", "message_id": "orders/1/42",
                "source": {"broker": "kafka", "topic": "orders", "partition": 1, "offset": 42},
                "verdict": "rejected", "reason": "expired", "detail": "exp passed",
                "issuer": null, "subject": null, "kid": null, "jti": null, "fingerprint": "ab12"
            })
        );
        assert!(!String::from_utf8_lossy(&line).contains("secret.token"));
    }

    #[tokio::test]
    async fn a_file_rotates_by_size_and_keeps_so_many() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let config = AuditFileConfig { path: path.clone(), max_bytes: 4096, keep: 2, fsync: false };
        let audit = Audit::file(&config, None).unwrap();
        let facts = Facts::default();
        for _ in 0..60 {
            audit.write("orders", &kafka_message(), None, &facts).await.unwrap().await.unwrap();
        }
        let lines = |p: &std::path::Path| std::fs::read_to_string(p).map(|t| t.lines().count()).unwrap_or(0);
        let rotated = [path.clone(), dir.path().join("audit.jsonl.1"), dir.path().join("audit.jsonl.2")];
        assert!(rotated.iter().all(|p| p.exists()), "current file and two rotated ones");
        assert!(!dir.path().join("audit.jsonl.3").exists(), "no more than keep = 2");
        assert!(rotated.iter().all(|p| std::fs::metadata(p).unwrap().len() <= 4096));
        let total: usize = rotated.iter().map(|p| lines(p)).sum();
        assert!(total < 60 && total > 20, "older records rotated out: {total}");
        for p in &rotated {
            for l in std::fs::read_to_string(p).unwrap().lines() {
                serde_json::from_str::<serde_json::Value>(l).expect("every line is one whole record");
            }
        }
    }
}
