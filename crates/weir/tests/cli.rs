//! `weir login` and `weir fn` against a real node: the CLI binary, run in a home of its own,
//! pulls a gateway's functions to files, deploys what changed, invokes, reads and follows logs,
//! promotes, and fails in one line.

mod common;

use std::io::BufRead as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{KEY, Weir, send};
use serde_json::{Value, json};

async fn v1(w: &Weir, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let body = body.map(|b| b.to_string());
    let r = send(w.admin, method, &format!("/v1/{path}"), &[("x-api-key", KEY)], body.as_deref()).await;
    (r.status, r.json())
}

const ME: &str = "export default async function (ctx) { console.log(\"hi\", ctx.body?.a); return { v: 1, got: ctx.body }; }";

/// A node (the platform is on by default), gateway `cli` started, an owner token for it, two
/// functions: `user` (two files, one in a subdirectory) and `user/me`; and a home for the CLI.
struct Setup {
    w: Weir,
    token: String,
    /// `http://` the admin listener.
    server: String,
    home: tempfile::TempDir,
}

async fn setup() -> Setup {
    let w = Weir::start();
    let (s, b) = v1(&w, "POST", "api-gateways", Some(json!({"name": "Cli", "gatewayId": "cli"}))).await;
    assert_eq!(s, 201, "{b}");
    let started = Instant::now();
    while v1(&w, "GET", "api-gateways/cli", None).await.1["phase"] != "Started" {
        assert!(started.elapsed() < Duration::from_secs(10), "the gateway never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (s, b) = v1(&w, "POST", "tokens", Some(json!({"name": "ci", "role": "owner", "gateways": ["cli"]}))).await;
    assert_eq!(s, 201, "{b}");
    let token = b["token"].as_str().unwrap().to_string();
    let user = json!({"name": "user", "methods": ["GET", "POST"], "description": "Users", "tags": ["people"],
        "source": {"files": {"index.ts": "import { greet } from './lib/greet';\nexport default () => ({ greeting: greet() });\n",
            "lib/greet.ts": "export const greet = () => 'hello';\n"}, "entrypoint": "index.ts"}});
    let me = json!({"name": "user/me", "methods": ["GET", "POST"], "source": {"code": ME}});
    for f in [user, me] {
        let (s, b) = v1(&w, "POST", "api-gateways/cli/functions", Some(f)).await;
        assert_eq!(s, 201, "{b}");
    }
    let server = format!("http://{}", w.admin);
    Setup { w, token, server, home: tempfile::tempdir().unwrap() }
}

/// The CLI with `args`, in `home` (its HOME; no XDG_CONFIG_HOME and no WEIR_* settings but
/// those in `env`): exit code, stdout, stderr.
fn weir(home: &Path, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = cli(home, args, env);
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let until = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > until {
            let _ = child.kill();
            panic!("weir {args:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn cli(home: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_weir"));
    cmd.args(args).env("HOME", home);
    for var in ["XDG_CONFIG_HOME", "WEIR_SERVER", "WEIR_GATEWAY", "WEIR_TOKEN", "WEIR_ADMIN_KEY"] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    cmd
}

/// Runs and expects exit 0; stdout.
fn ok(home: &Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let (code, out, err) = weir(home, args, env);
    assert_eq!(code, 0, "weir {args:?}: {out}{err}");
    out
}

/// Runs and expects exit 1 with exactly one line on stderr; that line.
fn fails(home: &Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let (code, out, err) = weir(home, args, env);
    assert_eq!(code, 1, "weir {args:?}: {out}{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    assert!(err.starts_with("weir: ") && !err.contains("panicked"), "{err}");
    err.trim_end().to_string()
}

async fn version(w: &Weir, full: &str) -> Value {
    v1(w, "GET", &format!("api-gateways/cli/functions/{}", full.replace('/', "%2F")), None).await.1["version"].clone()
}

#[tokio::test]
async fn functions_go_from_the_server_to_files_and_back_and_run() {
    let Setup { w, token, server, home } = setup().await;
    let home = home.path();

    // Logged in: the server and token are kept for the user alone.
    let out = ok(home, &["login", "--server", &server, "--token", &token], &[]);
    assert_eq!(out.lines().count(), 1, "{out}");
    let saved = home.join(".config/weir/credentials.json");
    let creds: Value = serde_json::from_slice(&std::fs::read(&saved).unwrap()).unwrap();
    assert_eq!((creds["server"].as_str(), creds["token"].as_str()), (Some(server.as_str()), Some(token.as_str())));
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&saved).unwrap().permissions()) & 0o777, 0o600);

    // Pulled: every file at its path, and a function.yaml each; a nested function stays apart.
    let project = tempfile::tempdir().unwrap();
    let dir = project.path().to_str().unwrap();
    let out = ok(home, &["fn", "--gateway", "cli", "pull", dir], &[]);
    assert_eq!(out.lines().filter(|l| l.starts_with("pulled ")).count(), 2, "{out}");
    let fns = project.path().join("functions");
    assert_eq!(std::fs::read_to_string(fns.join("user/me/index.ts")).unwrap(), ME);
    assert_eq!(std::fs::read_to_string(fns.join("user/lib/greet.ts")).unwrap(), "export const greet = () => 'hello';\n");
    let yaml = std::fs::read_to_string(fns.join("user/function.yaml")).unwrap();
    assert!(yaml.contains("description: Users") && yaml.contains("people") && yaml.contains("POST"), "{yaml}");
    assert!(!yaml.contains("entrypoint"), "index.ts goes without saying: {yaml}");

    // Nothing edited, nothing sent; one function edited, one update.
    let gw = [("WEIR_GATEWAY", "cli")];
    let out = ok(home, &["fn", "deploy", dir], &gw);
    assert_eq!(out.lines().filter(|l| l.starts_with("unchanged ")).count(), 2, "{out}");
    std::fs::write(fns.join("user/me/index.ts"), ME.replace("v: 1", "v: 2")).unwrap();
    let out = ok(home, &["fn", "deploy", dir], &gw);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines, ["unchanged user", "updated user/me (version 2)", "deployed to dev: 0 created, 1 updated, 1 unchanged"], "{out}");
    assert_eq!((version(&w, "dev/user/me").await, version(&w, "dev/user").await), (json!(2), json!(1)));
    let r = w.until("/dev/user/me", &[("host", "cli.localhost")], |r| r.json()["v"] == 2).await;
    assert_eq!(r.status, 200);
    assert_eq!(w.until("/dev/user", &[("host", "cli.localhost")], |r| r.status == 200).await.json(), json!({"greeting": "hello"}));

    // A new directory is a new function; in staging it may only arrive by promotion.
    std::fs::create_dir_all(fns.join("fresh")).unwrap();
    std::fs::write(fns.join("fresh/main.ts"), "export default () => 'fresh'").unwrap();
    std::fs::write(fns.join("fresh/function.yaml"), "entrypoint: main.ts\nmethods: [get]\n").unwrap();
    let err = fails(home, &["fn", "deploy", dir, "--env", "staging"], &gw);
    assert!(err.contains("promotion"), "{err}");
    let out = ok(home, &["fn", "deploy", dir], &gw);
    assert!(out.contains("created fresh (version 1)") && out.contains("1 created, 0 updated, 2 unchanged"), "{out}");
    assert_eq!(w.until("/dev/fresh", &[("host", "cli.localhost")], |r| r.status == 200).await.text(), "fresh");

    // Invoked: the answer on stdout, the function's log on stderr.
    let (code, out, err) = weir(home, &["fn", "invoke", "user/me", "--data", r#"{"a":1}"#], &gw);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap(), json!({"v": 2, "got": {"a": 1}}), "{out}");
    assert!(err.contains(" hi 1"), "{err}");

    // Its logs, then followed: a new line shows once, and nothing is printed twice.
    let out = ok(home, &["fn", "logs", "user/me"], &gw);
    assert!(out.lines().any(|l| l.ends_with(" hi 1") && l.split(' ').count() == 4), "time level message: {out}");
    let mut follower = cli(home, &["fn", "logs", "user/me", "--follow"], &gw).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = follower.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    let wait_for = |want: &str, seen: &mut Vec<String>| {
        let until = Instant::now() + Duration::from_secs(15);
        while !seen.iter().any(|l| l.ends_with(want)) {
            let left = until.saturating_duration_since(Instant::now());
            seen.push(rx.recv_timeout(left).unwrap_or_else(|_| panic!("no line ending {want:?} followed: {seen:?}")));
        }
    };
    wait_for(" hi 1", &mut seen);
    // The poll that brings "hi 43" asks from the time of "hi 42", so it holds that line again.
    for a in [42, 43] {
        let (s, b) = v1(&w, "POST", "api-gateways/cli/functions/dev%2Fuser%2Fme/invoke", Some(json!({"body": {"a": a}}))).await;
        assert_eq!(s, 200, "{b}");
        wait_for(&format!(" hi {a}"), &mut seen);
    }
    seen.extend(rx.try_iter());
    follower.kill().unwrap();
    follower.wait().unwrap();
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), seen.len(), "{seen:?}");
    assert_eq!(seen.iter().filter(|l| l.ends_with(" hi 42")).count(), 1, "{seen:?}");

    // A function that answers an error: exit 1.
    let (s, b) = v1(&w, "PATCH", "api-gateways/cli/functions/dev%2Ffresh", Some(json!({"source": {"files": {"main.ts": "export default () => new Response('no', { status: 418 })"}, "entrypoint": "main.ts"}}))).await;
    assert_eq!(s, 200, "{b}");
    let (code, out, _) = weir(home, &["fn", "invoke", "fresh", "--method", "get"], &gw);
    assert_eq!((code, out.trim()), (1, "no"));
    // A method it does not answer: the 405 a request would get.
    let (code, out, _) = weir(home, &["fn", "invoke", "fresh"], &gw);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("POST is not one of this function's methods"), "{out}");
}

#[tokio::test]
async fn a_function_is_promoted_and_answers_in_staging() {
    // The node is kept (bound), not dropped with the rest.
    let Setup { w: _node, token, server, home } = setup().await;
    let env = [("WEIR_SERVER", server), ("WEIR_GATEWAY", "cli".into()), ("WEIR_TOKEN", token)];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = ok(home.path(), &["fn", "promote", "user/me", "--to", "staging", "--semver", "1.0.0", "--changelog", "first"], &env);
    assert_eq!(out.trim(), "promoted user/me dev → staging (version 1)");
    let out = ok(home.path(), &["fn", "invoke", "user/me", "--env", "staging", "--data", r#"{"a":3}"#], &env);
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap(), json!({"v": 1, "got": {"a": 3}}), "{out}");
    // Pulled from staging, then deployed there unchanged.
    let project = tempfile::tempdir().unwrap();
    let dir = project.path().to_str().unwrap();
    let out = ok(home.path(), &["fn", "pull", dir, "--env", "staging"], &env);
    assert!(out.contains("pulled staging/user/me"), "{out}");
    let out = ok(home.path(), &["fn", "deploy", dir, "--env", "staging"], &env);
    assert!(out.contains("unchanged user/me") && out.contains("0 created, 0 updated, 1 unchanged"), "{out}");
}

#[tokio::test]
async fn every_failure_is_one_line_on_stderr_and_exit_1() {
    let Setup { w, server, home, token: _ } = setup().await;
    let home = home.path();
    let project = tempfile::tempdir().unwrap();
    let dir = project.path().to_str().unwrap();

    let err = fails(home, &["fn", "--server", &server, "--gateway", "cli", "pull", dir], &[]);
    assert_eq!(err, "weir: no token: pass --token, set WEIR_TOKEN or run weir login");
    let err = fails(home, &["fn", "--gateway", "cli", "pull", dir], &[("WEIR_TOKEN", "t")]);
    assert_eq!(err, "weir: no server: pass --server, set WEIR_SERVER or run weir login");
    let err = fails(home, &["fn", "--server", &server, "--token", "t", "logs", "user/me"], &[]);
    assert_eq!(err, "weir: no gateway: pass --gateway or set WEIR_GATEWAY");

    let err = fails(home, &["fn", "--server", &server, "--gateway", "cli", "--token", "wit_wrong", "pull", dir], &[]);
    assert!(err.starts_with("weir: 401 unauthorized: "), "{err}");
    let err = fails(home, &["fn", "invoke", "nope"], &[("WEIR_SERVER", &server), ("WEIR_GATEWAY", "cli"), ("WEIR_TOKEN", "wit_wrong")]);
    assert!(err.starts_with("weir: 401 unauthorized: "), "{err}");
    assert!(!project.path().join("functions").exists(), "nothing was written");

    let dead = format!("http://{}", common::dead_port());
    let err = fails(home, &["fn", "--server", &dead, "--gateway", "cli", "--token", "t", "pull", dir], &[]);
    assert!(err.contains("connecting to") && err.contains("refused"), "{err}");
    let err = fails(home, &["login", "--server", "https://127.0.0.1:1", "--token", "t"], &[]);
    assert!(err.contains("https is not supported"), "{err}");
    assert!(!home.join(".config").exists(), "nothing was saved");

    // With a valid login, the server's own refusals are one line too.
    let admin_token = v1(&w, "POST", "tokens", Some(json!({"name": "v", "role": "viewer", "gateways": ["cli"]}))).await.1["token"].as_str().unwrap().to_string();
    ok(home, &["login", "--server", &server, "--token", &admin_token], &[]);
    let err = fails(home, &["fn", "--gateway", "cli", "logs", "nope"], &[]);
    assert!(err.starts_with("weir: 404 not_found: "), "{err}");
    let err = fails(home, &["fn", "--gateway", "cli", "invoke", "user/me", "--data", "{}"], &[]);
    assert!(err.starts_with("weir: 403 forbidden: "), "a viewer may not run functions: {err}");
    let err = fails(home, &["fn", "--gateway", "cli", "invoke", "user/me", "--data", "{oops"], &[]);
    assert!(err.starts_with("weir: --data is not JSON"), "{err}");
}

/// A deploy past the gateway's publishing pace waits as the server asks and then finishes:
/// every function arrives, none is left half deployed.
#[tokio::test]
async fn a_deploy_waits_out_the_gateways_publishing_pace() {
    // 1,000 bytes a second after a burst of 60,000, nearly all of it taken by one save.
    let w = common::platform::on_loopback("  functions:\n    publish_bytes_per_minute: 60000\n");
    common::platform::started_gateway(&w, "paced").await;
    let (s, b) = v1(&w, "POST", "tokens", Some(json!({"name": "ci", "role": "owner", "gateways": ["paced"]}))).await;
    assert_eq!(s, 201, "{b}");
    let token = b["token"].as_str().unwrap().to_string();
    let big = json!({"name": "big", "source": {"code": format!("// {}\nexport default () => 'big'", "x".repeat(28_000))}});
    let (s, b) = v1(&w, "POST", "api-gateways/paced/functions", Some(big)).await;
    assert_eq!(s, 201, "{b}");
    // Two functions of about 4.5 KB each with their history entries: each waits a few seconds.
    let project = tempfile::tempdir().unwrap();
    for name in ["a", "b"] {
        let dir = project.path().join("functions").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("index.ts"), format!("// {}\nexport default () => '{name}'\n", "y".repeat(2_000))).unwrap();
        std::fs::write(dir.join("function.yaml"), "methods: [GET]\n").unwrap();
    }
    let home = tempfile::tempdir().unwrap();
    let server = format!("http://{}", w.admin);
    let env = [("WEIR_SERVER", server.as_str()), ("WEIR_TOKEN", token.as_str()), ("WEIR_GATEWAY", "paced")];
    let (code, out, err) = weir(home.path(), &["fn", "deploy", project.path().to_str().unwrap()], &env);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("deployed to dev: 2 created, 0 updated, 0 unchanged"), "{out}");
    assert!(err.contains("the server asks to publish more slowly; trying again in"), "{err}");
    for name in ["a", "b"] {
        assert_eq!(w.until(&format!("/dev/{name}"), &[("host", "paced.localhost")], |r| r.status == 200).await.text(), name);
    }
}
