//! `weir login` and `weir fn`: a gateway's cloud functions from the command line, through the
//! platform's API (`/v1/api-gateways/{gid}/functions`) on a node's admin listener.
//!
//! Every failure is one line on stderr and exit status 1 (`main` prints the error); what a
//! command did is printed on stdout, a line per function.

mod client;
mod project;

use std::collections::HashSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use serde_json::{Value, json};

pub use client::{Endpoint, send};

use self::project::Spec;

#[derive(Args)]
pub struct LoginArgs {
    /// The node's admin listener, as `http://host:port`.
    #[arg(long)]
    server: String,
    /// A platform token (`POST /v1/tokens`).
    #[arg(long)]
    token: String,
}

#[derive(Args)]
pub struct FnArgs {
    /// The node's admin listener (else `WEIR_SERVER`, else the one `weir login` saved).
    #[arg(long, global = true)]
    server: Option<String>,
    /// The gateway's id (else `WEIR_GATEWAY`).
    #[arg(long, global = true)]
    gateway: Option<String>,
    /// A platform token (else `WEIR_TOKEN`, else the one `weir login` saved).
    #[arg(long, global = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: FnCommand,
}

const ENVIRONMENTS: [&str; 3] = ["dev", "staging", "prod"];

/// How long a deploy waits out the gateway's publishing pace in all: a refusal that asks for
/// longer than is left fails the deploy.
const PACE_WAIT: Duration = Duration::from_secs(600);

#[derive(Subcommand)]
enum FnCommand {
    /// Write the environment's functions to DIR/functions/<name>/: their files and a
    /// function.yaml each.
    Pull {
        #[arg(default_value = ".")]
        dir: PathBuf,
        #[arg(long, default_value = "dev", value_parser = ENVIRONMENTS)]
        env: String,
    },
    /// Send the functions of DIR/functions/ that differ from the environment's copies; new
    /// ones are created (in dev: other environments get functions by promotion).
    Deploy {
        #[arg(default_value = ".")]
        dir: PathBuf,
        #[arg(long, default_value = "dev", value_parser = ENVIRONMENTS)]
        env: String,
    },
    /// Run a function on the server without its route's plugins: its answer's body on
    /// stdout, its log lines on stderr; exits 1 when it answered 400 or more.
    Invoke {
        name: String,
        /// The request body, as JSON.
        #[arg(long)]
        data: Option<String>,
        /// The request's method (POST when not given); one the function does not answer is a 405.
        #[arg(long, short = 'X')]
        method: Option<String>,
        #[arg(long, default_value = "dev", value_parser = ENVIRONMENTS)]
        env: String,
    },
    /// Print a function's last log lines (of the node answering).
    Logs {
        name: String,
        #[arg(long, default_value = "dev", value_parser = ENVIRONMENTS)]
        env: String,
        /// Keep printing new lines, asking every second, until interrupted.
        #[arg(long, short)]
        follow: bool,
    },
    /// Copy a function to the next environment.
    Promote {
        name: String,
        #[arg(long, value_parser = ENVIRONMENTS)]
        to: String,
        #[arg(long, default_value = "dev", value_parser = ENVIRONMENTS)]
        from: String,
        #[arg(long)]
        semver: Option<String>,
        #[arg(long)]
        changelog: Option<String>,
    },
}

/// What `weir login` keeps.
#[derive(serde::Serialize, serde::Deserialize)]
struct Credentials {
    server: String,
    token: String,
}

/// `$XDG_CONFIG_HOME/weir/credentials.json`, else `$HOME/.config/weir/credentials.json`.
fn credentials_path() -> anyhow::Result<PathBuf> {
    let dir = match std::env::var_os("XDG_CONFIG_HOME").map(PathBuf::from).filter(|p| p.is_absolute()) {
        Some(dir) => dir,
        None => PathBuf::from(std::env::var_os("HOME").filter(|h| !h.is_empty()).context("neither XDG_CONFIG_HOME nor HOME is set")?).join(".config"),
    };
    Ok(dir.join("weir").join("credentials.json"))
}

fn load_credentials() -> anyhow::Result<Option<Credentials>> {
    let path = credentials_path()?;
    match std::fs::read(&path) {
        Ok(raw) => serde_json::from_slice(&raw).map(Some).with_context(|| format!("{}: not what weir login writes; run it again", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// `weir login`: keeps the server and token for later commands, readable by the user only.
pub fn login(args: &LoginArgs) -> anyhow::Result<ExitCode> {
    let server = Endpoint::parse(&args.server)?;
    anyhow::ensure!(!args.token.trim().is_empty(), "--token is empty");
    let path = credentials_path()?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).with_context(|| format!("creating {}", dir.display()))?;
    let creds = Credentials { server: server.to_string(), token: args.token.trim().to_string() };
    // Written beside and renamed over, so a reader never sees half a file, and with the mode
    // set before the token is in it.
    let tmp = path.with_extension("json.tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let write = || -> std::io::Result<()> {
        let mut f = opts.open(&tmp)?;
        #[cfg(unix)]
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        f.write_all(&serde_json::to_vec_pretty(&creds).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    write().with_context(|| format!("writing {}", path.display()))?;
    say(format_args!("logged in to {server} (saved in {})", path.display()))?;
    Ok(ExitCode::SUCCESS)
}

/// `weir fn ...`.
pub fn functions(args: FnArgs) -> anyhow::Result<ExitCode> {
    let api = Api::resolve(args.server, args.gateway, args.token)?;
    match args.command {
        FnCommand::Pull { dir, env } => pull(&api, &dir, &env),
        FnCommand::Deploy { dir, env } => deploy(&api, &dir, &env),
        FnCommand::Invoke { name, data, method, env } => invoke(&api, &name, &env, data.as_deref(), method.as_deref()),
        FnCommand::Logs { name, env, follow } => logs(&api, &name, &env, follow),
        FnCommand::Promote { name, to, from, semver, changelog } => {
            let mut body = json!({"targetStage": to});
            if let Some(s) = semver {
                body["semver"] = json!(s);
            }
            if let Some(c) = changelog {
                body["changelog"] = json!(c);
            }
            let answer = api.call("POST", &format!("{}/deploy-to-stage", api.function(&from, &name)), Some(&body))?;
            say(format_args!("promoted {name} {from} → {to} (version {})", answer["function"]["version"]))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The platform API of one gateway, as one caller.
struct Api {
    server: Endpoint,
    gateway: String,
    auth: String,
}

/// `flag`, else the environment variable `var`; empty counts as unset.
fn setting(flag: Option<String>, var: &str) -> Option<String> {
    flag.or_else(|| std::env::var(var).ok()).map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

/// A failure the server reported (`{"error": {"kind", "message", "problems"}}`), as one line.
#[derive(Debug)]
struct ServerError(String);

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ServerError {}

impl ServerError {
    fn of(status: u16, reason: &str, body: &[u8]) -> ServerError {
        let one_line = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
        let line = match serde_json::from_slice::<Value>(body) {
            Ok(v) if v["error"].is_object() => {
                let e = &v["error"];
                let kind = e["kind"].as_str().unwrap_or(reason);
                let mut message = one_line(e["message"].as_str().unwrap_or_default());
                let problems = e["problems"].as_array().into_iter().flatten().filter_map(Value::as_str).map(one_line);
                let problems: Vec<String> = problems.filter(|p| !message.contains(p.as_str())).collect();
                if !problems.is_empty() {
                    message = format!("{message}: {}", problems.join("; "));
                }
                format!("{status} {kind}: {message}")
            }
            _ => {
                let text = one_line(&String::from_utf8_lossy(body));
                let text: String = text.chars().take(300).collect();
                format!("{status} {}: {text}", reason.to_ascii_lowercase())
            }
        };
        ServerError(line)
    }
}

impl Api {
    fn resolve(server: Option<String>, gateway: Option<String>, token: Option<String>) -> anyhow::Result<Api> {
        let (mut server, gateway, mut token) = (setting(server, "WEIR_SERVER"), setting(gateway, "WEIR_GATEWAY"), setting(token, "WEIR_TOKEN"));
        if (server.is_none() || token.is_none())
            && let Some(saved) = load_credentials()?
        {
            server = server.or(Some(saved.server));
            token = token.or(Some(saved.token));
        }
        let server = server.context("no server: pass --server, set WEIR_SERVER or run weir login")?;
        let gateway = gateway.context("no gateway: pass --gateway or set WEIR_GATEWAY")?;
        let token = token.context("no token: pass --token, set WEIR_TOKEN or run weir login")?;
        Ok(Api { server: Endpoint::parse(&server)?, gateway, auth: format!("Bearer {token}") })
    }

    /// `/v1/api-gateways/{gid}/functions`.
    fn functions(&self) -> String {
        format!("/v1/api-gateways/{}/functions", client::encode(&self.gateway))
    }

    /// One function: its full name (`dev/user/me`) as one path segment.
    fn function(&self, env: &str, name: &str) -> String {
        format!("{}/{}", self.functions(), client::encode(&format!("{env}/{name}")))
    }

    /// A call whose answer is JSON; an answer of 400 or more is an error.
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        let body = body.map(Value::to_string);
        let r = send(&self.server, method, path, &[("authorization", &self.auth)], body.as_deref().map(str::as_bytes))?;
        json_of(&r, method, path)
    }

    /// A save (`POST`/`PATCH` of a function): as [`Api::call`], but a refusal for the
    /// gateway's publishing pace (429 with `Retry-After`) is waited out and the save sent
    /// again, while `waited` (what the deploy has waited so far) stays within [`PACE_WAIT`].
    fn publish(&self, method: &str, path: &str, body: &Value, waited: &mut Duration) -> anyhow::Result<Value> {
        let text = body.to_string();
        loop {
            let r = send(&self.server, method, path, &[("authorization", &self.auth)], Some(text.as_bytes()))?;
            let left = PACE_WAIT.saturating_sub(*waited);
            match r.retry_after {
                Some(secs) if r.status == 429 && Duration::from_secs(secs.max(1)) <= left => {
                    let wait = Duration::from_secs(secs.max(1));
                    tell(format_args!("the server asks to publish more slowly; trying again in {} s", wait.as_secs()));
                    std::thread::sleep(wait);
                    *waited += wait;
                }
                _ => return json_of(&r, method, path),
            }
        }
    }

    /// Every function of `env`, by bare name.
    fn list(&self, env: &str) -> anyhow::Result<Vec<Value>> {
        let answer = self.call("GET", &format!("{}?environment={}", self.functions(), client::encode(env)), None)?;
        Ok(answer["list"].as_array().cloned().unwrap_or_default())
    }
}

/// An answer's JSON; an answer of 400 or more is an error.
fn json_of(r: &client::Response, method: &str, path: &str) -> anyhow::Result<Value> {
    if r.status >= 400 {
        return Err(ServerError::of(r.status, &r.reason, &r.body).into());
    }
    serde_json::from_slice(&r.body).with_context(|| format!("{method} {path}: the server answered {} with no JSON", r.status))
}

/// One line on stdout, flushed (a `--follow` reader sees it at once); a closed stdout is an
/// error, not a panic.
fn say(line: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(line).and_then(|()| out.write_all(b"\n")).and_then(|()| out.flush()).context("writing to stdout")
}

/// One line on stderr; a closed stderr is ignored (there is nowhere left to say so).
fn tell(line: std::fmt::Arguments<'_>) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_fmt(line).and_then(|()| err.write_all(b"\n"));
}

fn pull(api: &Api, dir: &Path, env: &str) -> anyhow::Result<ExitCode> {
    let list = api.list(env)?;
    for f in &list {
        let written = project::write(dir, f)?;
        say(format_args!("pulled {} → {}", f["name"].as_str().unwrap_or_default(), written.display()))?;
    }
    say(format_args!("{} function(s) of {env} in {}", list.len(), dir.join("functions").display()))?;
    Ok(ExitCode::SUCCESS)
}

fn deploy(api: &Api, dir: &Path, env: &str) -> anyhow::Result<ExitCode> {
    let local = project::read(dir)?;
    let mut remote = std::collections::BTreeMap::new();
    for f in api.list(env)? {
        if let Some(name) = f["functionName"].as_str() {
            remote.insert(name.to_string(), Spec::from_api(&f).with_context(|| name.to_string())?);
        }
    }
    // Everything is checked before anything is sent: a deploy that cannot finish changes
    // nothing.
    if env != "dev"
        && let Some(name) = local.keys().find(|n| !remote.contains_key(*n))
    {
        anyhow::bail!("{name} is not in {env}: functions are created in dev and reach {env} by promotion (weir fn promote {name} --to {env})");
    }
    let (mut created, mut updated, mut unchanged) = (0, 0, 0);
    let mut waited = Duration::ZERO;
    for (name, spec) in &local {
        match remote.get(name) {
            Some(theirs) if spec.matches(theirs) => {
                unchanged += 1;
                say(format_args!("unchanged {name}"))?;
            }
            Some(_) => {
                let answer = api.publish("PATCH", &api.function(env, name), &spec.body(), &mut waited).with_context(|| format!("updating {name}"))?;
                updated += 1;
                say(format_args!("updated {name} (version {})", answer["version"]))?;
            }
            None => {
                let mut body = spec.body();
                body["name"] = json!(name);
                let answer = api.publish("POST", &api.functions(), &body, &mut waited).with_context(|| format!("creating {name}"))?;
                created += 1;
                say(format_args!("created {name} (version {})", answer["version"]))?;
            }
        }
    }
    say(format_args!("deployed to {env}: {created} created, {updated} updated, {unchanged} unchanged"))?;
    Ok(ExitCode::SUCCESS)
}

/// A log line as `time level message`.
fn log_line(l: &Value) -> String {
    let field = |k: &str| l[k].as_str().unwrap_or_default().to_string();
    format!("{} {} {}", field("time"), field("level"), field("message"))
}

fn invoke(api: &Api, name: &str, env: &str, data: Option<&str>, method: Option<&str>) -> anyhow::Result<ExitCode> {
    let mut body = json!({});
    if let Some(method) = method {
        body["method"] = json!(method.to_ascii_uppercase());
    }
    if let Some(data) = data {
        body["body"] = serde_json::from_str(data).map_err(|e| anyhow::anyhow!("--data is not JSON: {e}"))?;
    }
    let answer = api.call("POST", &format!("{}/invoke", api.function(env, name)), Some(&body))?;
    for l in answer["logs"].as_array().into_iter().flatten() {
        tell(format_args!("{}", log_line(l)));
    }
    match &answer["body"] {
        Value::String(text) => say(format_args!("{text}"))?,
        other => say(format_args!("{}", serde_json::to_string_pretty(other)?))?,
    }
    let status = answer["status"].as_u64().unwrap_or(0);
    if status >= 400 {
        tell(format_args!("weir: {name} answered {status}"));
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn logs(api: &Api, name: &str, env: &str, follow: bool) -> anyhow::Result<ExitCode> {
    let path = format!("{}/logs?limit=100", api.function(env, name));
    let lines = |since: Option<&str>| -> anyhow::Result<Vec<Value>> {
        let path = match since {
            Some(t) => format!("{path}&since={}", client::encode(t)),
            None => path.clone(),
        };
        Ok(api.call("GET", &path, None)?["list"].as_array().cloned().unwrap_or_default())
    };
    let key = |l: &Value| (l["time"].to_string(), l["requestId"].to_string(), l["message"].to_string());
    let mut since: Option<String> = None;
    // The lines already printed that the next answer may hold again: it holds the lines at or
    // after the last time seen, all of which were in this answer.
    let mut seen = HashSet::new();
    loop {
        let batch = lines(since.as_deref())?;
        for l in &batch {
            if !seen.contains(&key(l)) {
                say(format_args!("{}", log_line(l)))?;
            }
        }
        if !follow {
            return Ok(ExitCode::SUCCESS);
        }
        if let Some(last) = batch.last().and_then(|l| l["time"].as_str()) {
            since = Some(last.to_string());
            seen = batch.iter().map(key).collect();
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}
