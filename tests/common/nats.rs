//! What the NATS tests share: where the server is, a stream of each test's
//! own, and skipping (or, under `BEHEST_STREAM_REQUIRE_NATS=1`, failing)
//! when no server answers.

use behest_stream::nats::NatsConfig;

/// The server the tests use: `BEHEST_STREAM_NATS_URL`, or the local one.
pub fn url() -> String {
    std::env::var("BEHEST_STREAM_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

/// A configuration for a stream and subjects of their own, named by `unique`.
pub fn config_named(url: &str, unique: &str) -> NatsConfig {
    let mut config = NatsConfig::new(url);
    config.stream = format!("BEHEST_TEST_{unique}");
    config.prefix = format!("bt{unique}");
    config
}

/// A configuration for a fresh stream on [`url`].
pub fn fresh_config() -> NatsConfig {
    config_named(&url(), &uuid::Uuid::now_v7().simple().to_string())
}

/// True when CI asked for NATS tests to fail rather than skip.
pub fn required() -> bool {
    std::env::var("BEHEST_STREAM_REQUIRE_NATS").as_deref() == Ok("1")
}

/// `Some` of what opened; `None`, with the reason printed, when it could
/// not (no server) and NATS is not required; a failure when it is.
pub fn or_skip<T, E: std::fmt::Display>(opened: Result<T, E>) -> Option<T> {
    match opened {
        Ok(value) => Some(value),
        Err(error) => {
            skip(&format!("no NATS JetStream server ({error})"));
            None
        }
    }
}

/// Prints why a test is skipped, or fails it if NATS is required.
pub fn skip(reason: &str) {
    assert!(!required(), "BEHEST_STREAM_REQUIRE_NATS=1 but {reason}");
    eprintln!("skipping: {reason}");
}

/// Deletes the test's stream.
pub async fn delete_stream(config: &NatsConfig) {
    let client = async_nats::connect(config.url.as_str()).await.unwrap();
    async_nats::jetstream::new(client)
        .delete_stream(&config.stream)
        .await
        .unwrap();
}
