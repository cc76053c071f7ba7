//! What the AMQP source and destination share: the connection (bounded setup), the short-string
//! limit, and queue argument values.

use lapin::types::AMQPValue;
use lapin::{Connection, ConnectionProperties};

/// Longest wait for a connection handshake or an ack on a broker that stopped answering.
pub const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// AMQP short strings (queue and exchange names, routing keys, header names) hold at most 255 bytes.
pub const MAX_SHORT_STRING: usize = 255;

/// Opens a connection named `name` (shown in the broker's management UI), then runs `setup` on
/// it, the whole bounded by [`TIMEOUT`]: a broker that accepts TCP while still starting can
/// leave a handshake hanging.
pub async fn connect<T, F, Fut>(url: &str, name: &str, setup: F) -> anyhow::Result<T>
where
    F: FnOnce(Connection) -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let open = async {
        let props = ConnectionProperties::default().with_connection_name(name.to_owned().into());
        setup(Connection::connect(url, props).await?).await
    };
    tokio::time::timeout(TIMEOUT, open).await.map_err(|_| anyhow::anyhow!("AMQP connection setup timed out"))?
}

/// A queue argument (`x-queue-type = "quorum"`, `x-max-length = 10000`) as AMQP carries it.
pub fn value(v: &toml::Value) -> Result<AMQPValue, String> {
    Ok(match v {
        toml::Value::String(s) => AMQPValue::LongString(s.as_bytes().to_vec().into()),
        toml::Value::Integer(i) => AMQPValue::LongLongInt(*i),
        toml::Value::Boolean(b) => AMQPValue::Boolean(*b),
        toml::Value::Float(f) => AMQPValue::Double(*f),
        other => {
            return Err(format!("a queue argument is a string, integer, float or boolean, not {}", other.type_str()));
        }
    })
}
