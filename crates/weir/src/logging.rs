//! The process log on stderr: text (coloured only on a terminal) or one JSON object per line,
//! with a level filter that SIGHUP can change.

use std::io::IsTerminal as _;

use tracing::field::{Field, Visit};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::config::{LogConfig, LogFormat};

/// rustls warns about what clients send (an IP address as SNI, say): one line per connection
/// that the gateway can do nothing about.
const DEFAULT_FILTER: &str = "info,rustls=error";

/// Changes the level filter of the running process.
pub struct LogHandle {
    filter: reload::Handle<EnvFilter, Registry>,
}

/// The filter in force: `RUST_LOG` when set (it wins, for debugging a deployed config), else
/// `log.level`, else the default.
fn filter(level: Option<&str>) -> Result<EnvFilter, String> {
    if let Ok(env) = std::env::var("RUST_LOG") {
        return EnvFilter::try_new(env).map_err(|e| format!("RUST_LOG: {e}"));
    }
    EnvFilter::try_new(level.unwrap_or(DEFAULT_FILTER)).map_err(|e| format!("log.level: {e}"))
}

/// Whether `level` is a filter `tracing` accepts.
pub fn check_level(level: &str) -> Result<(), String> {
    EnvFilter::try_new(level).map(|_| ()).map_err(|e| e.to_string())
}

pub fn init(cfg: &LogConfig) -> LogHandle {
    let filter = filter(cfg.level.as_deref()).unwrap_or_else(|e| {
        eprintln!("weir: {e}; using {DEFAULT_FILTER}");
        EnvFilter::new(DEFAULT_FILTER)
    });
    let (filter, handle) = reload::Layer::new(filter);
    let ansi = std::io::stderr().is_terminal();
    let (text, json) = match cfg.format {
        LogFormat::Text => (Some(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi)), None),
        LogFormat::Json => (None, Some(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(false).event_format(Json))),
    };
    tracing_subscriber::registry().with(filter).with(text).with(json).init();
    LogHandle { filter: handle }
}

impl LogHandle {
    pub fn set_level(&self, level: Option<&str>) -> Result<(), String> {
        let f = filter(level)?;
        self.filter.reload(f).map_err(|e| e.to_string())
    }
}

/// One JSON object per event: `time`, `level`, `target`, `message`, then the event's fields.
struct Json;

impl<S, N> FormatEvent<S, N> for Json
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, _ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &tracing::Event<'_>) -> std::fmt::Result {
        let meta = event.metadata();
        let mut fields = Fields(serde_json::Map::new());
        fields.0.insert("time".into(), weir_proxy::access::rfc3339(std::time::SystemTime::now()).into());
        fields.0.insert("level".into(), meta.level().as_str().into());
        fields.0.insert("target".into(), meta.target().into());
        event.record(&mut fields);
        writeln!(writer, "{}", serde_json::Value::Object(fields.0))
    }
}

struct Fields(serde_json::Map<String, serde_json::Value>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().into(), format!("{value:?}").into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
}
