//! The runtime on its own: functions compiled and called on a gateway's engine, no sockets.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use weir_functions::engine::Table;
use weir_functions::live::FunctionHandler;
use weir_core::threads::{niceness, stat_field};
use weir_functions::{Engine, Failure, Function, Limits, Logs, Outcome, Request, User, source};

/// Versions of the functions tests make, distinct within the process as stored versions are
/// (the engine loads a module once per `env/name@version`: two functions sharing a version
/// would both run the first one's code).
static VERSIONS: AtomicU64 = AtomicU64::new(0);

fn func(env: &str, name: &str, files: &[(&str, &str)]) -> Arc<Function> {
    let files: BTreeMap<String, String> = files.iter().map(|(p, s)| (p.to_string(), s.to_string())).collect();
    let entry = files.keys().find(|k| k.starts_with("index")).cloned().unwrap();
    Arc::new(Function {
        env: env.into(),
        name: name.into(),
        version: format!("1-{}", VERSIONS.fetch_add(1, Ordering::Relaxed)),
        links: 0,
        compiled: Arc::new(source::compile(&files, &entry).unwrap()),
        methods: vec![],
        logs: Arc::new(Logs::default()),
    })
}

fn limits() -> Limits {
    Limits { cpu: Duration::from_millis(200), wall: Duration::from_secs(3), memory: 32 << 20, concurrency: 8 }
}

struct Gw {
    engine: Arc<Engine>,
    table: Table,
    vars: Arc<serde_json::Map<String, Value>>,
}

impl Gw {
    fn new(funcs: Vec<Arc<Function>>) -> Gw {
        let table: HashMap<String, Arc<Function>> = funcs.into_iter().map(|f| (f.name.clone(), f)).collect();
        Gw { engine: Engine::start("t", limits().memory, weir_functions::Services::default()).unwrap(), table: Arc::new(table), vars: Arc::new(json!({"GREETING": "hi"}).as_object().unwrap().clone()) }
    }

    async fn call(&self, name: &str, req: Request) -> Outcome {
        self.call_with(name, req, limits()).await
    }

    async fn call_with(&self, name: &str, req: Request, limits: Limits) -> Outcome {
        let f = self.table[name].clone();
        FunctionHandler::run(self.engine.clone(), f, self.table.clone(), self.vars.clone(), limits, Arc::default(), req).await.expect("under the concurrency cap")
    }
}

fn get(path: &str) -> Request {
    Request { method: "GET".into(), path: path.into(), request_id: "r1".into(), ..Request::default() }
}

/// Runs `f`, the only function of its gateway, reaching `reach`, with 5 s of CPU.
async fn run_alone(engine: Arc<Engine>, f: Arc<Function>, reach: weir_functions::Reach) -> Outcome {
    let table: Table = Arc::new(HashMap::from([(f.name.clone(), f.clone())]));
    let roomy = Limits { cpu: Duration::from_secs(5), ..limits() };
    FunctionHandler::run(engine, f, table, Arc::new(serde_json::Map::new()), roomy, Arc::new(reach), get("/")).await.expect("under the concurrency cap")
}

fn body_json(o: &Outcome) -> Value {
    let r = o.result.as_ref().unwrap_or_else(|e| panic!("{e:?}"));
    serde_json::from_slice(&r.body).unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&r.body)))
}

/// A function loaded ahead of its first call runs its top level as a call of it would: seeing
/// the gateway's variables, under the gateway's CPU budget (more than a second here).
#[tokio::test]
async fn a_module_loaded_ahead_of_its_calls_sees_the_variables_and_has_a_calls_budget() {
    let heavy = "const g = imp.env.GREETING; const t = Date.now(); while (Date.now() - t < 1200) {}\nconsole.info('loaded');\nexport default () => ({ g, loaded: true });";
    let gw = Gw::new(vec![func("dev", "heavy", &[("index.js", heavy)]), func("dev", "lazy", &[("index.js", "const g = imp.env.GREETING; export default () => ({ g })")])]);
    let roomy = Limits { cpu: Duration::from_secs(3), ..limits() };
    let load = weir_functions::engine::Load { func: gw.table["heavy"].clone(), table: gw.table.clone(), vars: gw.vars.clone(), cpu: roomy.cpu };
    assert_eq!(gw.engine.load(vec![load]), 1);
    let out = gw.call_with("heavy", get("/"), roomy).await;
    assert_eq!(body_json(&out), json!({"g": "hi", "loaded": true}));
    assert!(out.cpu < Duration::from_millis(500), "loaded before the call: {:?}", out.cpu);
    let lines = gw.table["heavy"].logs.since(0, 10);
    assert_eq!(lines.iter().map(|l| (l.level.as_str(), l.message.as_str())).collect::<Vec<_>>(), [("info", "loaded")], "its top level's lines are its own");
    // Loaded by its first call instead, the same.
    assert_eq!(body_json(&gw.call("lazy", get("/")).await), json!({"g": "hi"}));
}

/// What `TextEncoder` makes lives in the runtime's heap and counts against its memory limit.
#[tokio::test]
async fn encoded_bytes_count_against_the_memory_limit() {
    let gw = Gw::new(vec![func("dev", "hoard", &[("index.js", "const keep = []; export default () => { for (let i = 0; i < 64; i++) keep.push(new TextEncoder().encode('a'.repeat(4 << 20))); return keep.length; }")])]);
    assert_eq!(gw.call("hoard", get("/")).await.result, Err(Failure::Memory));
}

/// What the runtime runs of a function outside its call's turn (reading its error or answer,
/// dropping its timers) is bounded too; a header list that names one large string many times
/// is refused before it is copied; a timer delay that is no number is none; and promise jobs
/// that queue themselves for ever are not left to later calls.
#[tokio::test]
async fn a_function_cannot_run_past_its_limits_outside_its_turn() {
    let gw = Gw::new(vec![
        func("dev", "getter", &[("index.js", "export default async () => { throw { get message() { for (;;) {} } }; }")]),
        // Answered through a promise: its answer is read after the call's turn.
        func("dev", "answer", &[("index.js", "export default async () => { const r = new Response('x'); r.headers.forEach = () => { for (;;) {} }; return r; }")]),
        // Each that replaces a built-in has an environment (a realm) of its own.
        func("staging", "timers", &[("index.js", "export default () => { Map.prototype.delete = () => { for (;;) {} }; setTimeout(() => {}, 1e7); return 'left a timer'; }")]),
        func("dev", "headers", &[("index.js", "export default () => { const big = 'x'.repeat(1 << 20), h = {}; for (let i = 0; i < 300; i++) h['h' + i] = big; return new Response('', { headers: h }); }")]),
        func("dev", "fetched", &[("index.js", "export default async () => { const h = []; for (let i = 0; i < 2000; i++) h.push(['h' + i, 'v']); try { await fetch('http://api.example/', { headers: h }); } catch (e) { return e.name + ': ' + e.message; } }")]),
        func("prod", "nan", &[("index.js", "export default () => new Promise((r) => { Math.max = () => NaN; setTimeout(() => r('fired'), 5); })")]),
        func("dev", "spin", &[("index.js", "export default () => { const spin = () => { Promise.resolve().then(spin); }; for (let i = 0; i < 64; i++) spin(); return 'spun'; }")]),
        // A module whose top level never finishes, with jobs that queue each other again.
        func("dev", "module", &[("index.js", "const P = Promise.resolve(), beat = [0, 0, 0, 0]; let t = 0;\nconst s = (i) => { P.then(() => s(i)); beat[i] = ++t; beat.forEach((b, j) => { if (t - b > 16) { beat[j] = t; P.then(() => s(j)); } }); };\n[0, 1, 2, 3].forEach(s);\nawait new Promise(() => {});\nexport default () => 1;")]),
        func("qa", "length", &[("index.js", "export default () => { const r = new Response('x'); Array.prototype.push = function () { this.length = 2 ** 31; }; return r; }")]),
        func("dev", "hello", &[("index.js", "export default () => 'hello'")]),
    ]);
    let gw = &gw;
    let call = |name: &'static str| async move { tokio::time::timeout(Duration::from_secs(10), gw.call(name, get("/"))).await.unwrap_or_else(|_| panic!("{name}: no answer")) };
    let failed = |out: &Outcome| match &out.result {
        Err(Failure::Threw { message, .. }) => message.clone(),
        other => panic!("{other:?}"),
    };
    // The getter is stopped; the error reads as a bare throw.
    assert_eq!(failed(&call("getter").await), "the function threw");
    assert_eq!(call("answer").await.result, Err(Failure::Timeout("the call ran past its CPU budget")));
    assert_eq!(call("timers").await.result.unwrap().body, b"left a timer");
    assert!(failed(&call("headers").await).contains("header fields of more than 256 KiB"));
    assert_eq!(call("fetched").await.result.unwrap().body, b"RangeError: more than 1000 header fields; at most 1000 may be sent");
    assert_eq!(call("nan").await.result.unwrap().body, b"fired");
    // The jobs it leaves run on the next call's budget once; the runtime is then made afresh.
    let _ = call("spin").await;
    let _ = call("hello").await;
    for _ in 0..3 {
        let out = call("hello").await;
        assert_eq!(out.result.unwrap().body, b"hello");
        assert!(out.cpu < Duration::from_millis(100), "{:?}", out.cpu);
    }
    assert_eq!(call("module").await.result, Err(Failure::Timeout("the call ran past its CPU budget")));
    // An array whose length is past 2^31 fails the call, not the runtime (which would fail
    // every call in flight as stopped).
    let out = call("length").await;
    assert!(matches!(out.result, Err(Failure::Timeout(_) | Failure::Threw { .. })), "{:?}", out.result);
}

/// A request's query is the client's: own properties only (`__proto__` and `toString` are
/// keys like any other), a parameter given twice an array of its values.
#[tokio::test]
async fn a_query_is_made_of_own_properties() {
    let gw = Gw::new(vec![func("dev", "q", &[("index.js", "export default (ctx) => ({ plain: Object.getPrototypeOf(ctx.query) === Object.prototype, keys: Object.keys(ctx.query), proto: ctx.query.__proto__, a: ctx.query.a })")])]);
    let mut req = get("/");
    req.query = [("__proto__", "x"), ("toString", "y"), ("a", "1"), ("a", "2")].iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    assert_eq!(body_json(&gw.call("q", req).await), json!({"plain": true, "keys": ["__proto__", "toString", "a"], "proto": "x", "a": ["1", "2"]}));
}

/// A call's context has its fields in one order, each an own data property (writable,
/// enumerable, configurable), `body` (parsed by its type) and `user` only when the call has
/// them, whichever shape the handler has; and a setter a function put on `Object.prototype`
/// for those names sees none of them.
#[tokio::test]
async fn a_calls_context_is_a_plain_object_of_its_fields_in_order() {
    let look = "(ctx) => ({ keys: Object.keys(ctx), plain: Object.getPrototypeOf(ctx) === Object.prototype, \
        data: Object.keys(ctx).every((k) => { const d = Object.getOwnPropertyDescriptor(ctx, k); return 'value' in d && d.writable && d.enumerable && d.configurable; }), \
        seen: globalThis.seen ?? [], method: ctx.method, path: ctx.path, body: ctx.body, requestId: ctx.requestId })";
    let trap = |names: &str| format!("for (const k of [{names}]) Object.defineProperty(Object.prototype, k, {{ set(v) {{ (globalThis.seen ??= []).push(k); }}, configurable: true }});");
    let gw = Gw::new(vec![
        func("dev", "ctx", &[("index.js", &format!("{}\nconst look = {look};\nexport default (ctx) => look(ctx);", trap("'method', 'path', 'query', 'headers', 'body', 'requestId', 'user'")))]),
        // In a realm of its own, without `headers`: the `Response` that `res.json` makes sets
        // its own `headers`, which the trap would catch.
        func("prod", "express", &[("index.js", &format!("{}\nconst look = {look};\nexport default (req, res) => res.json(look(req));", trap("'method', 'path', 'query', 'body', 'requestId', 'user'")))]),
    ]);
    for name in ["ctx", "express"] {
        let out = body_json(&gw.call(name, get("/a")).await);
        assert_eq!(out, json!({"keys": ["method", "path", "query", "headers", "requestId"], "plain": true, "data": true, "seen": [], "method": "GET", "path": "/a", "requestId": "r1"}), "{name}");
        let mut req = get("/b");
        req.method = "POST".into();
        req.headers = vec![("content-type".into(), "application/json".into())];
        req.body = Some(r#"{"n": 1}"#.into());
        req.user = Some(User { name: "c1".into(), grant: None });
        let out = body_json(&gw.call(name, req).await);
        assert_eq!(out["keys"], json!(["method", "path", "query", "headers", "body", "requestId", "user"]), "{name}");
        assert_eq!((&out["data"], &out["seen"], &out["body"], &out["method"]), (&json!(true), &json!([]), &json!({"n": 1}), &json!("POST")), "{name}");
        let mut req = get("/c");
        req.user = Some(User { name: "c1".into(), grant: None });
        assert_eq!(body_json(&gw.call(name, req).await)["keys"], json!(["method", "path", "query", "headers", "requestId", "user"]), "{name}");
    }
}

/// The log lines held for calls in flight count against the gateway's memory limit: past it,
/// a call's later lines are not kept (and say so), and what the calls held is given back.
#[tokio::test]
async fn log_lines_held_for_calls_count_against_the_memory_limit() {
    let gw = Arc::new(Gw::new(vec![func("dev", "chatty", &[("index.js", "export default async () => { const s = 'x'.repeat(6000); for (let i = 0; i < 40; i++) console.log(s); await new Promise((r) => setTimeout(r, 300)); return 'done'; }")])]));
    let wide = Limits { concurrency: 256, ..limits() };
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let gw = gw.clone();
        calls.spawn(async move { gw.call_with("chatty", get("/"), wide).await });
    }
    let mut cut = 0;
    while let Some(out) = calls.join_next().await {
        let out = out.unwrap();
        assert_eq!(out.result.unwrap().body, b"done");
        cut += usize::from(out.logs.last().is_some_and(|l| l.message == "later lines of this call are not kept here (the gateway's memory limit)"));
    }
    // 200 calls of about 240 KiB of lines each hold more than the gateway's 32 MiB.
    assert!((1..200).contains(&cut), "{cut} calls had lines cut");
    assert_eq!(gw.call_with("chatty", get("/"), wide).await.logs.len(), 40, "given back");
}

/// Loading functions ahead gives way to calls: a call sent while many slow top levels wait to
/// be loaded is answered between them, not after them all; and a function no longer served
/// before its turn to load is not loaded.
#[tokio::test]
async fn loading_ahead_gives_way_to_calls_and_skips_what_is_no_longer_served() {
    // Each heavy top level spends 40 ms and counts itself in the environment's shared map.
    let heavy = "const t = Date.now(); while (Date.now() - t < 40) {}\nimp.shared.set('loaded', (imp.shared.get('loaded') ?? 0) + 1);\nexport default () => 'heavy';";
    let mut funcs: Vec<Arc<Function>> = (0..20).map(|i| func("dev", &format!("heavy{i}"), &[("index.js", heavy)])).collect();
    funcs.push(func("dev", "light", &[("index.js", "export default () => ({ loaded: imp.shared.get('loaded') ?? 0, last: imp.shared.get('last') ?? null })")]));
    let gw = Gw::new(funcs);
    let load = |name: &str| weir_functions::engine::Load { func: gw.table[name].clone(), table: gw.table.clone(), vars: gw.vars.clone(), cpu: limits().cpu };
    assert_eq!(gw.engine.load((0..20).map(|i| load(&format!("heavy{i}"))).collect()), 20);
    let first = body_json(&gw.call("light", get("/")).await)["loaded"].as_u64().unwrap();
    assert!(first < 10, "the call waited for {first} of 20 loads");
    // Everything served is loaded in the end.
    let shared = async || body_json(&gw.call("light", get("/")).await);
    let until = async |done: &dyn Fn(&Value) -> bool| {
        for _ in 0..200 {
            let v = shared().await;
            if done(&v) {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("not loaded: {}", shared().await);
    };
    until(&|v| v["loaded"] == 20).await;

    // Twenty more queued, then all but the last (in the queue too) no longer served before
    // their turn: of those the runtime loads the one still served, and at most one it had
    // started.
    let again: Vec<Arc<Function>> = (0..20).map(|i| func("dev", &format!("again{i}"), &[("index.js", &heavy.replace("'heavy'", &format!("'again{i}'; imp.shared.set('last', 'again{i}')")))])).collect();
    let table: Table = Arc::new(again.iter().map(|f| (f.name.clone(), f.clone())).chain([("light".to_string(), gw.table["light"].clone())]).collect());
    let loads: Vec<_> = again.iter().map(|f| weir_functions::engine::Load { func: f.clone(), table: table.clone(), vars: gw.vars.clone(), cpu: limits().cpu }).collect();
    gw.engine.load(loads.clone());
    gw.engine.load(vec![loads[19].clone()]);
    let v = until(&|v| v["last"] == "again19").await;
    assert!((21..=22).contains(&v["loaded"].as_u64().unwrap()), "{v}");
}

/// A runtime made afresh (here: a call ran it out of memory) loads again what it served.
#[tokio::test]
async fn a_runtime_made_afresh_loads_again_what_it_served() {
    let gw = Gw::new(vec![
        func("dev", "since", &[("index.js", "const at = Date.now(); export default () => Date.now() - at;")]),
        func("dev", "bomb", &[("index.js", "export default () => { const a = []; for (;;) a.push(new ArrayBuffer(1 << 20)) }")]),
    ]);
    let load = weir_functions::engine::Load { func: gw.table["since"].clone(), table: gw.table.clone(), vars: gw.vars.clone(), cpu: limits().cpu };
    assert_eq!(gw.engine.load(vec![load]), 1);
    let loaded_long_ago = async || {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let ago = body_json(&gw.call("since", get("/")).await).as_u64().unwrap();
        assert!(ago >= 300, "loaded {ago} ms before its first call: not ahead of it");
    };
    loaded_long_ago().await;
    assert_eq!(gw.call("bomb", get("/")).await.result, Err(Failure::Memory));
    loaded_long_ago().await;
}

/// A call resolves `imp.invoke` (an import at run time) with the table it was routed with,
/// though a call routed with another table ran since.
#[tokio::test]
async fn a_calls_imports_at_run_time_find_what_it_was_routed_with() {
    let a = func("dev", "a", &[("index.js", "export default async () => { await new Promise((r) => setTimeout(r, 150)); return imp.invoke('b', {}); }")]);
    let (b1, b2) = (func("dev", "b", &[("index.js", "export default () => 'b1'")]), func("dev", "b", &[("index.js", "export default () => 'b2'")]));
    let engine = Engine::start("tables", limits().memory, weir_functions::Services::default()).unwrap();
    let older: Table = Arc::new(HashMap::from([("a".to_string(), a.clone()), ("b".to_string(), b1.clone())]));
    let newer: Table = Arc::new(HashMap::from([("a".to_string(), a.clone()), ("b".to_string(), b2)]));
    let vars = Arc::new(serde_json::Map::new());
    let waits = tokio::spawn(FunctionHandler::run(engine.clone(), a, newer, vars.clone(), limits(), Arc::default(), get("/")));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let meanwhile = FunctionHandler::run(engine.clone(), b1, older, vars, limits(), Arc::default(), get("/")).await.unwrap();
    assert_eq!(meanwhile.result.unwrap().body, b"b1");
    assert_eq!(waits.await.unwrap().unwrap().result.unwrap().body, b"b2");
}

#[tokio::test]
async fn both_handler_shapes_answer_and_typescript_modules_import_each_other() {
    let gw = Gw::new(vec![
        func("dev", "hello", &[("index.ts", "import { greet } from './lib/greet';\nexport default async function (ctx: any): Promise<object> { return { msg: greet(ctx.query.name as string), method: ctx.method, path: ctx.path, id: ctx.requestId } }"), ("lib/greet.ts", "export const greet = (n: string): string => `hello ${n}`;")]),
        func("dev", "express", &[("index.js", "export default async (req, res) => { res.status(201).set('x-made', 'yes').json({ got: req.body }) }")]),
        func("dev", "text", &[("index.js", "export default () => 'plain'")]),
        func("dev", "resp", &[("index.js", "export default () => new Response('teapot', { status: 418, headers: { 'x-a': 'b' } })")]),
        func("dev", "caller", &[("index.js", "import hello from '@/hello';\nexport default async (ctx) => ({ viaImport: typeof hello, viaInvoke: await imp.invoke('text', {}) })")]),
    ]);
    let mut req = get("/dev/hello");
    req.query = vec![("name".into(), "ada".into())];
    let out = gw.call("hello", req).await;
    assert_eq!(body_json(&out), json!({"msg": "hello ada", "method": "GET", "path": "/dev/hello", "id": "r1"}));
    assert_eq!(out.result.as_ref().unwrap().headers, vec![weir_functions::engine::JSON_TYPE]);

    let mut req = get("/dev/express");
    req.method = "POST".into();
    req.headers = vec![("content-type".into(), "application/json".into())];
    req.body = Some(r#"{"a":[1,2]}"#.into());
    let out = gw.call("express", req).await;
    let reply = out.result.as_ref().unwrap();
    assert_eq!(reply.status, 201);
    assert!(reply.headers.contains(&("x-made".into(), "yes".into())));
    assert_eq!(body_json(&out), json!({"got": {"a": [1, 2]}}));

    let out = gw.call("text", get("/")).await;
    assert_eq!(out.result.as_ref().unwrap().body, b"plain");
    let out = gw.call("resp", get("/")).await;
    let reply = out.result.unwrap();
    assert_eq!((reply.status, reply.body.as_slice()), (418, &b"teapot"[..]));
    assert!(reply.headers.contains(&("x-a".into(), "b".into())));
    let out = gw.call("caller", get("/")).await;
    assert_eq!(body_json(&out), json!({"viaImport": "function", "viaInvoke": "plain"}));
}

#[tokio::test]
async fn every_value_answers_as_json_stringify_writes_it_whatever_the_function_does_to_the_globals() {
    let values = "class P { constructor() { this.a = 1; } }\n\
        const kinds = { plain: { x: [1, 'two', null] }, array: [1, { y: true }], bare: Object.assign(Object.create(null), { z: 3 }), instance: new P(), dated: { when: new Date(0) }, custom: { toJSON: () => 'mine' }, marker: { __weirResponse: true, value: 'inner' }, nothing: null };\n\
        export default (ctx) => kinds[ctx.query.kind]";
    let gw = Gw::new(vec![
        func("dev", "values", &[("index.js", values)]),
        func("dev", "hijack", &[("index.js", "export default () => { JSON.stringify = () => '\"hijacked\"'; Object.getPrototypeOf = () => null; return { still: 'json' }; }")]),
    ]);
    let cases = [
        ("plain", json!({"x": [1, "two", null]})),
        ("array", json!([1, {"y": true}])),
        ("bare", json!({"z": 3})),
        ("instance", json!({"a": 1})),
        ("dated", json!({"when": "1970-01-01T00:00:00.000Z"})),
        ("custom", json!("mine")),
        ("marker", json!({"__weirResponse": true, "value": "inner"})),
        ("nothing", json!(null)),
    ];
    for (kind, want) in cases {
        let mut req = get("/values");
        req.query = vec![("kind".into(), kind.into())];
        let out = gw.call("values", req).await;
        assert_eq!(out.result.as_ref().unwrap().headers, vec![weir_functions::engine::JSON_TYPE], "{kind}");
        assert_eq!(body_json(&out), want, "{kind}");
    }
    for _ in 0..2 {
        assert_eq!(body_json(&gw.call("hijack", get("/hijack")).await), json!({"still": "json"}));
    }
    let mut req = get("/values");
    req.query = vec![("kind".into(), "plain".into())];
    assert_eq!(body_json(&gw.call("values", req).await), json!({"x": [1, "two", null]}), "another function of the gateway after the globals changed");
}

#[tokio::test]
async fn headers_sent_twice_are_joined_and_the_caller_is_an_object() {
    let gw = Gw::new(vec![
        func("dev", "who", &[("index.js", "export default (ctx) => ({ headers: ctx.headers, user: ctx.user ?? null })")]),
        func("dev", "rename", &[("index.js", "export default (ctx) => { try { ctx.user.name = 'someone'; } catch { return { refused: ctx.user.name }; } return { renamed: ctx.user.name }; }")]),
    ]);
    let mut req = get("/who");
    req.headers = vec![("accept".into(), "a/b".into()), ("x-v".into(), "1".into()), ("accept".into(), "c/d".into()), ("x-v".into(), "2".into()), ("x-v".into(), "3".into())];
    let grant = weir_plugins::grant_usage::Grantee { application: "app-1".into(), grant: "gr-1".into() };
    req.user = Some(User { name: "gw-dev-app-1".into(), grant: Some(Arc::new(grant)) });
    assert_eq!(body_json(&gw.call("who", req).await), json!({"headers": {"accept": "a/b, c/d", "x-v": "1, 2, 3"}, "user": {"name": "gw-dev-app-1", "appId": "app-1", "grantId": "gr-1"}}));
    let mut req = get("/who");
    req.user = Some(User { name: "__proto__".into(), grant: None });
    assert_eq!(body_json(&gw.call("who", req).await)["user"], json!({"name": "__proto__"}), "a consumer that is no grant has a name alone");
    assert_eq!(body_json(&gw.call("who", get("/who")).await), json!({"headers": {}, "user": null}));
    // The caller is one object per consumer and grant, which no call can change for the next.
    let as_grant = |app: &str| {
        let mut req = get("/");
        let grant = weir_plugins::grant_usage::Grantee { application: app.into(), grant: "gr-1".into() };
        req.user = Some(User { name: "gw-dev-app-1".into(), grant: Some(Arc::new(grant)) });
        req
    };
    assert_eq!(body_json(&gw.call("rename", as_grant("app-1")).await), json!({"refused": "gw-dev-app-1"}));
    assert_eq!(body_json(&gw.call("who", as_grant("app-1")).await)["user"]["name"], "gw-dev-app-1");
    assert_eq!(body_json(&gw.call("who", as_grant("app-2")).await)["user"]["appId"], "app-2", "a grant made anew is seen anew");
}

#[tokio::test]
async fn the_gateway_variables_keep_a_proto_key_as_a_property_and_take_any_json() {
    let mut gw = Gw::new(vec![func("dev", "env", &[("index.js", "export default () => ({ keys: Object.keys(imp.env).sort(), proto: imp.env.__proto__, plain: Object.getPrototypeOf(imp.env) === Object.prototype })")])]);
    gw.vars = Arc::new(json!({"__proto__": "p", "A": "b"}).as_object().unwrap().clone());
    assert_eq!(body_json(&gw.call("env", get("/")).await), json!({"keys": ["A", "__proto__"], "proto": "p", "plain": true}), "a __proto__ key stays a property");
    gw.vars = Arc::new(json!({"roles": ["a"], "n": 1}).as_object().unwrap().clone());
    let out = gw.call("env", get("/")).await;
    assert_eq!(body_json(&out)["keys"], json!(["n", "roles"]), "other values go through the JSON parser");
    // Frozen all the way down: no call changes a variable's array for the next.
    let gw = Gw { vars: gw.vars.clone(), ..Gw::new(vec![func("dev", "grow", &[("index.js", "export default () => { try { imp.env.roles.push('admin'); } catch {} return imp.env.roles; }")])]) };
    for _ in 0..2 {
        assert_eq!(body_json(&gw.call("grow", get("/")).await), json!(["a"]));
    }
}

/// A URL or method past its bound is refused in the runtime, before the engine copies it out.
#[tokio::test]
async fn a_fetch_with_a_huge_url_or_method_is_refused_before_it_is_copied() {
    let gw = Gw::new(vec![func("dev", "huge", &[("index.js", "export default async () => {
        const out = [];
        for (const t of [() => fetch('http://api.example/' + 'a'.repeat(70000)), () => fetch('http://api.example/', { method: 'X'.repeat(65) })]) {
          try { await t(); out.push('sent'); } catch (e) { out.push(e.message); }
        }
        return out;
      }")])]);
    assert_eq!(body_json(&gw.call("huge", get("/")).await), json!(["fetch refused: the URL is longer than 65536 characters", "fetch refused: the method is longer than 64 characters"]));
}

/// Each cookie is a field of its own, from `Headers` and from Express's `res.set` alike; other
/// names' values are joined as WHATWG's `Headers` joins them.
#[tokio::test]
async fn each_cookie_is_a_header_field_of_its_own() {
    let gw = Gw::new(vec![
        func("dev", "express", &[("index.js", "export default (req, res) => res.set('Set-Cookie', ['a=1; Expires=Wed, 21 Oct 2026 07:28:00 GMT', 'b=2']).set('X-A', ['1', '2']).end('ok')")]),
        func("dev", "whatwg", &[("index.js", "export default () => {
            const h = new Headers([['Set-Cookie', 'a=1'], ['x-b', '1']]);
            h.append('set-cookie', 'b=2');
            h.append('X-B', '2');
            return new Response(JSON.stringify({ list: h.getSetCookie(), joined: h.get('set-cookie'), b: h.get('x-b'), has: h.has('Set-Cookie') }), { headers: h });
        }")]),
    ]);
    let fields = |out: &Outcome, name: &str| -> Vec<String> { out.result.as_ref().unwrap().headers.iter().filter(|(k, _)| k == name).map(|(_, v)| v.to_string()).collect() };
    let out = gw.call("express", get("/")).await;
    assert_eq!(fields(&out, "set-cookie"), ["a=1; Expires=Wed, 21 Oct 2026 07:28:00 GMT", "b=2"]);
    assert_eq!(fields(&out, "x-a"), ["1, 2"]);
    // As the gateway answers: each cookie a field, and no field of the connection's.
    let mut out = gw.call("express", get("/")).await;
    out.result.as_mut().unwrap().headers.extend([("upgrade", "h2c"), ("keep-alive", "timeout=1"), ("te", "trailers"), ("content-length", "1")].map(|(k, v)| (k.into(), v.into())));
    let answered = weir_functions::live::respond(out, false, &limits());
    assert_eq!(answered.headers().get_all("set-cookie").iter().count(), 2);
    assert!(["upgrade", "keep-alive", "te", "content-length"].iter().all(|k| !answered.headers().contains_key(*k)), "{:?}", answered.headers());
    let out = gw.call("whatwg", get("/")).await;
    assert_eq!(fields(&out, "set-cookie"), ["a=1", "b=2"]);
    assert_eq!(body_json(&out), json!({"list": ["a=1", "b=2"], "joined": "a=1, b=2", "b": "1, 2", "has": true}));
}

/// The response made of an answer has one `content-type`: JSON's for a value, the function's
/// own when it set one, whether that is JSON's or another.
#[tokio::test]
async fn a_response_has_the_type_of_its_answer_once() {
    let gw = Gw::new(vec![
        func("dev", "value", &[("index.js", "export default () => ({ a: 1 })")]),
        func("dev", "own-json", &[("index.js", "export default () => new Response('[1]', { headers: { 'content-type': 'application/json' } })")]),
        func("dev", "own-type", &[("index.js", "export default () => new Response('<p>', { headers: { 'Content-Type': 'text/html' } })")]),
        func("dev", "thrown", &[("index.js", "export default () => { throw new Error('no') }")]),
    ]);
    for (name, want) in [("value", "application/json"), ("own-json", "application/json"), ("own-type", "text/html"), ("thrown", "application/json")] {
        let answered = weir_functions::live::respond(gw.call(name, get("/")).await, false, &limits());
        let types: Vec<_> = answered.headers().get_all(http::header::CONTENT_TYPE).iter().map(|v| v.to_str().unwrap().to_string()).collect();
        assert_eq!(types, [want], "{name}");
    }
}

/// A form's fields are own properties whatever their names: a client's `__proto__` field does
/// not reshape the body object.
#[tokio::test]
async fn a_forms_fields_are_own_properties_whatever_their_names() {
    let gw = Gw::new(vec![func("dev", "form", &[("index.js", "export default (ctx) => ({ plain: Object.getPrototypeOf(ctx.body) === Object.prototype, keys: Object.keys(ctx.body), proto: ctx.body.__proto__, text: String(ctx.body.toString) })")])]);
    let mut req = get("/");
    req.method = "POST".into();
    req.headers.push(("content-type".into(), "application/x-www-form-urlencoded".into()));
    req.body = Some("__proto__=a&toString=b&toString=c&x=1".into());
    assert_eq!(body_json(&gw.call("form", req).await), json!({"plain": true, "keys": ["__proto__", "toString", "x"], "proto": "a", "text": "b,c"}));
}

/// The scheduling policy (`SCHED_BATCH` is 3) and niceness of this process's thread named
/// `name`, if it runs.
fn thread_sched(name: &str) -> Option<(u32, i32)> {
    std::fs::read_dir("/proc/self/task").unwrap().flatten().find_map(|t| {
        let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
        if comm.trim_end() != name {
            return None;
        }
        let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
        // The policy is the 41st field.
        Some((stat_field(&stat, 41)?, niceness(&stat)?))
    })
}

#[tokio::test]
async fn a_runtime_thread_runs_as_batch_work_at_the_process_niceness_and_ends_with_its_engine() {
    let nice = niceness(&std::fs::read_to_string("/proc/thread-self/stat").unwrap()).unwrap();
    let engine = Engine::start("sched", limits().memory, weir_functions::Services::default()).unwrap();
    let started = Instant::now();
    let seen = loop {
        match thread_sched("fn-sched") {
            Some((3, n)) => break n,
            _ if started.elapsed() > Duration::from_secs(5) => panic!("no batch runtime thread: {:?}", thread_sched("fn-sched")),
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    };
    assert_eq!(seen, nice, "the runtime keeps the niceness it was started with");
    drop(engine);
    while thread_sched("fn-sched").is_some() {
        assert!(started.elapsed() < Duration::from_secs(5), "the runtime thread outlived its engine");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// What the loop runs of a function's JavaScript outside a call's segment counts towards its
/// runtime's business: calls whose errors' getters spin (read as each call settles, up to the
/// loop's own budget for such reads) make their runtime nice, as calls spinning themselves
/// would. Calls that wait on timers, however many, leave theirs at its niceness: the loop
/// resting is not counted.
#[tokio::test]
async fn javascript_the_loop_runs_between_segments_counts_towards_a_busy_runtime_and_waits_do_not() {
    let table = |f: Arc<Function>| -> Table { Arc::new(HashMap::from([(f.name.clone(), f)])) };
    let slow = func("dev", "slow", &[("index.js", "export default () => new Promise((_, no) => setTimeout(() => no({ get message() { for (;;) {} } }), 0))")]);
    let wait = func("dev", "wait", &[("index.js", "export default () => new Promise((r) => setTimeout(() => r({ waited: true }), 150))")]);
    let home = niceness(&std::fs::read_to_string("/proc/thread-self/stat").unwrap()).unwrap();
    let spinning = Engine::start("hk-spin", limits().memory, weir_functions::Services::default()).unwrap();
    let waiting = Engine::start("hk-wait", limits().memory, weir_functions::Services::default()).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut callers = Vec::new();
    for (engine, f) in [(&spinning, &slow), (&waiting, &wait)] {
        for _ in 0..4 {
            let (engine, f, table, stop) = (engine.clone(), f.clone(), table(f.clone()), stop.clone());
            callers.push(tokio::spawn(async move {
                let mut outcomes = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let out = FunctionHandler::run(engine.clone(), f.clone(), table.clone(), Arc::new(serde_json::Map::new()), limits(), Arc::default(), get("/")).await.expect("under the concurrency cap");
                    outcomes.push(out.result.map(|r| r.body));
                }
                outcomes
            }));
        }
    }
    let started = Instant::now();
    while !spinning.nice() {
        assert!(started.elapsed() < Duration::from_secs(30), "the runtime whose loop spins in getters never went nice");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let went = started.elapsed();
    // Past the busy windows it takes, and a window more for the waiting one's.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let mut outcomes = Vec::new();
    for c in callers {
        outcomes.push(c.await.unwrap());
    }
    // Three busy windows of a second, the first perhaps begun before the calls.
    assert!(went >= Duration::from_secs(2), "{went:?}: nice before its busy windows were over");
    assert_eq!(thread_sched("fn-hk-spin").map(|(_, n)| n), Some(19), "its thread runs at the nicest niceness");
    assert!(!waiting.nice(), "a runtime whose calls wait on timers is not busy");
    assert_eq!(thread_sched("fn-hk-wait").map(|(_, n)| n), Some(home));
    // The getters were stopped at the loop's budget; the calls were answered all the same.
    let (spun, waited) = outcomes.split_at(4);
    for out in spun.iter().flatten() {
        match out {
            Err(Failure::Threw { message, .. }) => assert_eq!(message, "the function threw"),
            other => panic!("{other:?}"),
        }
    }
    assert!(spun.iter().map(Vec::len).sum::<usize>() >= 8, "{:?}", spun.iter().map(Vec::len).collect::<Vec<_>>());
    for out in waited.iter().flatten() {
        assert_eq!(out.as_deref().map_err(|e| format!("{e:?}")), Ok(&b"{\"waited\":true}"[..]));
    }
    assert!(waited.iter().map(Vec::len).sum::<usize>() >= 8);
}

#[tokio::test]
async fn the_sdk_works_inside_a_function() {
    let gw = Gw::new(vec![func("dev", "sdk", &[("index.js", r#"
export default async (ctx) => {
  console.log('start', { n: 1 });
  console.error('oops');
  const waited = await new Promise((r) => setTimeout(() => r('late'), 20));
  const cancelled = setTimeout(() => { throw new Error('must not fire') }, 1);
  clearTimeout(cancelled);
  const digest = new Uint8Array(await crypto.subtle.digest('SHA-256', new TextEncoder().encode('abc')));
  const hex = Array.from(digest).map((b) => b.toString(16).padStart(2, '0')).join('');
  const u = new URL('https://api.example.com:8443/a/b?x=1&y=two#frag');
  u.searchParams.append('z', '3');
  const q = new URLSearchParams({ a: '1 2', b: 'é' });
  imp.shared.set('count', (imp.shared.get('count') || 0) + 1);
  return {
    waited, hex, uuid: crypto.randomUUID(),
    url: [u.hostname, u.port, u.pathname, u.searchParams.get('y'), u.href],
    query: q.toString(),
    b64: [btoa('hello'), atob('aGVsbG8=')],
    utf8: new TextDecoder().decode(new TextEncoder().encode('héllo ✓')),
    env: imp.env.GREETING, cloud: cloud === imp, count: imp.shared.get('count'),
  };
}"#)])]);
    let out = gw.call("sdk", get("/")).await;
    let v = body_json(&out);
    assert_eq!(v["waited"], "late");
    assert_eq!(v["hex"], "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    let uuid = v["uuid"].as_str().unwrap();
    assert_eq!((uuid.len(), &uuid[14..15]), (36, "4"));
    assert_eq!(v["url"], json!(["api.example.com", "8443", "/a/b", "two", "https://api.example.com:8443/a/b?x=1&y=two&z=3#frag"]));
    assert_eq!(v["query"], "a=1+2&b=%C3%A9");
    assert_eq!(v["b64"], json!(["aGVsbG8=", "hello"]));
    assert_eq!(v["utf8"], "héllo ✓");
    assert_eq!((v["env"].as_str(), v["cloud"].as_bool(), v["count"].as_i64()), (Some("hi"), Some(true), Some(1)));
    assert_eq!(out.logs.iter().map(|l| (l.level.as_str(), l.message.as_str(), l.request_id.as_str())).collect::<Vec<_>>(), [("info", "start {\"n\":1}", "r1"), ("error", "oops", "r1")]);
    assert_eq!(gw.table["sdk"].logs.since(0, 10).len(), 2);
    let again = gw.call("sdk", get("/")).await;
    assert_eq!(body_json(&again)["count"], 2, "imp.shared lives across calls");
}

#[tokio::test]
async fn errors_loops_and_memory_bombs_fail_the_call_and_the_next_call_is_fine() {
    let gw = Gw::new(vec![
        func("dev", "throws", &[("index.js", "export default () => { throw new Error('bad thing') }")]),
        func("dev", "loop", &[("index.js", "export default () => { for (;;) {} }")]),
        func("dev", "later-loop", &[("index.js", "export default async () => { await new Promise((r) => setTimeout(r, 5)); while (true) {} }")]),
        func("dev", "bomb", &[("index.js", "export default () => { const a = []; for (let i = 0; ; i++) { a.push(new ArrayBuffer(1 << 20)); if (i % 8 == 0) console.log(String(i)); } }")]),
        func("dev", "crumbs", &[("index.js", "export default () => { const a = []; while (true) a.push({}); }")]),
        func("dev", "hoard", &[("index.js", "const keep = [];\nexport default () => { for (let i = 0; i < 200000; i++) keep.push({ i }); return keep.length; }")]),
        func("dev", "crumbs-async", &[("index.js", "export default async () => { const a = []; while (true) { a.push({}); if (a.length % 100000 == 0) await null; } }")]),
        func("dev", "sleep", &[("index.js", "export default () => new Promise((r) => setTimeout(r, 10000))")]),
        func("dev", "ok", &[("index.js", "export default () => ({ ok: true })")]),
    ]);
    let out = gw.call("throws", get("/")).await;
    match out.result {
        Err(Failure::Threw { message, stack, .. }) => {
            assert_eq!(message, "bad thing");
            assert!(stack.contains("index.js"), "{stack}");
        }
        other => panic!("{other:?}"),
    }
    for name in ["loop", "later-loop"] {
        // The budget is CPU time: on a machine busy with other tests the thread may get less
        // than its core, and the call lasts longer than its budget. Each try must end in time
        // out, never before its budget; one of three must end within the bound.
        let mut tries = Vec::new();
        for _ in 0..3 {
            let t = Instant::now();
            let out = gw.call(name, get("/")).await;
            let took = t.elapsed();
            assert!(matches!(out.result, Err(Failure::Timeout(_))), "{name}: {:?}", out.result);
            assert!(took >= Duration::from_millis(200), "{name}: {took:?}");
            tries.push(took);
            if took < Duration::from_millis(220 + 20) {
                break;
            }
        }
        assert!(tries.iter().any(|t| *t < Duration::from_millis(220 + 20)), "{name}: the 200 ms budget ended after {tries:?}");
    }
    let out = gw.call("bomb", get("/")).await;
    assert_eq!(out.result, Err(Failure::Memory));
    // Small objects fill the heap to its last bytes, where QuickJS throws a bare null.
    let out = gw.call_with("crumbs", get("/"), Limits { cpu: Duration::from_secs(20), ..limits() }).await;
    assert!(matches!(&out.result, Err(Failure::Threw { message, .. }) if message.contains("memory")) || out.result == Err(Failure::Memory), "{:?}", out.result);
    assert_eq!(body_json(&gw.call("ok", get("/")).await), json!({"ok": true}));
    // The same between awaits: the call fails at once rather than waiting out its wall-clock
    // limit, and leaves nothing behind for the next.
    let t = Instant::now();
    let out = gw.call_with("crumbs-async", get("/"), Limits { cpu: Duration::from_secs(20), ..limits() }).await;
    assert_eq!(out.result, Err(Failure::Memory));
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(body_json(&gw.call("ok", get("/")).await), json!({"ok": true}));
    // What a function keeps past its calls fills the runtime: the call that meets the limit
    // fails as out of memory, whatever QuickJS could still say, and the runtime is made afresh
    // for the calls after it, which would all fail in a runtime left full.
    let roomy = Limits { cpu: Duration::from_secs(20), ..limits() };
    assert_eq!(body_json(&gw.call_with("hoard", get("/"), roomy).await), json!(200000));
    assert_eq!(gw.call_with("hoard", get("/"), roomy).await.result, Err(Failure::Memory));
    assert_eq!(body_json(&gw.call("ok", get("/")).await), json!({"ok": true}));
    assert_eq!(body_json(&gw.call_with("hoard", get("/"), roomy).await), json!(200000), "a fresh runtime, with the function's module made anew");
    let t = Instant::now();
    let out = gw.call_with("sleep", get("/"), Limits { wall: Duration::from_millis(300), ..limits() }).await;
    assert!(matches!(out.result, Err(Failure::Timeout(m)) if m.contains("wall")), "{:?}", out.result);
    assert!(t.elapsed() < Duration::from_millis(400));
    assert_eq!(body_json(&gw.call("ok", get("/")).await), json!({"ok": true}));
}

/// What a failed call answers with is bounded however large the error a function throws, and
/// a status a function sets on a `Response` after making it is a final one or a 500.
#[tokio::test]
async fn a_huge_error_or_an_informational_status_is_no_answer() {
    let gw = Gw::new(vec![
        func("dev", "error", &[("index.js", "export default () => { throw new Error('x'.repeat(1 << 22)); }")]),
        func("dev", "string", &[("index.js", "export default () => { throw 'é'.repeat(1 << 21); }")]),
        // A lone surrogate past what is kept: only the part kept is read out of the runtime,
        // and that part is all `x`.
        func("dev", "tail", &[("index.js", "export default () => { throw new Error('x'.repeat(1 << 22) + '\\ud800'); }")]),
        func("dev", "early", &[("index.js", "export default () => { const r = new Response('x'); r.status = 101; return r; }")]),
        func("dev", "late", &[("index.js", "export default () => { const r = new Response('x'); r.status = 599; return r; }")]),
    ]);
    for name in ["error", "string"] {
        match gw.call(name, get("/")).await.result {
            Err(Failure::Threw { message, stack, .. }) => {
                assert!(message.len() <= weir_functions::TEXT_KEPT + 3 && message.ends_with('…'), "{name}: {} bytes", message.len());
                assert!(stack.len() <= weir_functions::TEXT_KEPT + 3, "{name}: {} bytes of stack", stack.len());
            }
            other => panic!("{name}: {other:?}"),
        }
    }
    match gw.call("tail", get("/")).await.result {
        Err(Failure::Threw { message, .. }) => assert_eq!(message, format!("{}…", "x".repeat(weir_functions::TEXT_KEPT))),
        other => panic!("{other:?}"),
    }
    assert_eq!(gw.call("early", get("/")).await.result.map(|r| r.status), Ok(500));
    assert_eq!(gw.call("late", get("/")).await.result.map(|r| r.status), Ok(599));
}

/// What decoding copies outside the runtime counts against the gateway's memory limit, and a
/// log line copies out only what it keeps.
#[tokio::test]
async fn decoding_and_logging_copy_out_no_more_than_the_gateway_may_hold() {
    // A 24 MiB body waits to be sent (of the gateway's 32 MiB outside the runtime) while 3 MiB
    // are decoded: their 12 MiB of copies are past what is left.
    let held = Arc::new(Held::default());
    let engine = held.engine("decoding");
    let f = func("dev", "decode", &[("index.js", "export default async () => {
        const sent = fetch('http://api.example/in', { method: 'POST', body: 'y'.repeat(24 << 20) });
        const tries = [
          () => new TextDecoder().decode(new Uint8Array(3 << 20).fill(0xff)).length,
          () => crypto.subtle.digest('SHA-256', new Uint8Array(5 << 20).fill(0x80)),
          () => new TextEncoder().encode('\\u00e9'.repeat(9 << 20)).length,
        ];
        const out = [];
        for (const t of tries) { try { await t(); out.push('done'); } catch (e) { out.push(e.name + ': ' + e.message); } }
        await sent;
        return out.join('\\n');
      }")]);
    let reach = weir_functions::Reach { allow: Arc::new(vec!["api.example".into()]), database: None };
    let running = tokio::spawn(run_alone(engine.clone(), f.clone(), reach.clone()));
    held.reach(1).await;
    held.release();
    assert_eq!(
        String::from_utf8(running.await.unwrap().result.unwrap().body).unwrap(),
        "RangeError: TextDecoder: the data is too large for this gateway's memory limit\nRangeError: crypto.subtle.digest: the data is too large for this gateway's memory limit\nRangeError: TextEncoder: the text is too large for this gateway's memory limit"
    );
    // Alone, the same decode, digest and encoding are done.
    let f = func("dev", "alone", &[("index.js", "export default async () => [new TextDecoder().decode(new Uint8Array(3 << 20).fill(0xff)).length, (await crypto.subtle.digest('SHA-256', new Uint8Array(5 << 20).fill(0x80))).byteLength, new TextEncoder().encode('\\u00e9'.repeat(9 << 20)).length]")]);
    assert_eq!(body_json(&run_alone(engine, f, reach).await), json!([3 << 20, 32, 18 << 20]));
    let gw = Gw::new(vec![
        func("dev", "small", &[("index.js", "export default () => new TextDecoder().decode(new Uint8Array([0x68, 0xc3, 0xa9, 0xff]))")]),
        func("dev", "log", &[("index.js", "export default () => { console.log('é'.repeat(4 << 20)); console.log('half \\ud800 of a pair'); return 'logged'; }")]),
        func("dev", "surrogate", &[("index.js", "export default () => { throw new Error('half \\udc00 of a pair'); }")]),
    ]);
    assert_eq!(gw.call("small", get("/")).await.result.unwrap().body, "hé\u{fffd}".as_bytes());
    let out = gw.call("log", get("/")).await;
    assert_eq!(out.result.unwrap().body, b"logged");
    let line = &out.logs[0].message;
    assert!(line.len() <= weir_functions::TEXT_KEPT + 3 && line.ends_with('…'), "{} bytes", line.len());
    // A lone surrogate, which no Rust string holds, is U+FFFD in a line and in an error.
    assert_eq!(out.logs[1].message, "half \u{fffd} of a pair");
    match gw.call("surrogate", get("/")).await.result {
        Err(Failure::Threw { message, .. }) => assert_eq!(message, "half \u{fffd} of a pair"),
        other => panic!("{other:?}"),
    }
}

/// An answer's body is copied out of the runtime only once its copies are taken from the
/// gateway's budget, and a long JSON answer crosses the same way; a log line made of something
/// else than text (the arrays' methods replaced) crosses as a mark, not as whatever it makes.
#[tokio::test]
async fn answers_and_log_lines_are_copied_out_only_within_the_gateways_budget() {
    // A 24 MiB body waits to be sent (of the gateway's 32 MiB outside the runtime): the 10 MiB
    // that copying a 5 MiB answer of bytes takes are past what is left.
    let held = Arc::new(Held::default());
    let engine = held.engine("answers");
    let reach = weir_functions::Reach { allow: Arc::new(vec!["api.example".into()]), database: None };
    let f = func("dev", "big", &[("index.js", "export default () => { fetch('http://api.example/in', { method: 'POST', body: 'y'.repeat(24 << 20) }).catch(() => {}); return new Uint8Array(5 << 20); }")]);
    assert_eq!(run_alone(engine.clone(), f, reach.clone()).await.result.map(|r| r.body.len()), Err(Failure::Memory));
    held.release();
    let f = func("dev", "alone", &[("index.js", "export default () => new Uint8Array(5 << 20)")]);
    assert_eq!(run_alone(engine.clone(), f, reach.clone()).await.result.map(|r| r.body.len()), Ok(5 << 20));
    let f = func("dev", "long", &[("index.js", "export default () => ({ text: '\\u00e9'.repeat(5000) })")]);
    let out = run_alone(engine.clone(), f, reach.clone()).await;
    assert_eq!(body_json(&out), json!({ "text": "\u{e9}".repeat(5000) }));
    assert_eq!(out.result.unwrap().headers, vec![weir_functions::engine::JSON_TYPE]);
    let f = func("dev", "join", &[("index.js", "export default () => { Array.prototype.join = function () { return { length: 0, toString: () => 'x'.repeat(1 << 20) }; }; console.log('a', 'b'); return 'logged'; }")]);
    let out = run_alone(engine.clone(), f, reach.clone()).await;
    assert_eq!(out.result.unwrap().body, b"logged");
    assert_eq!(out.logs[0].message, "(a line that is not text)");
    // Header fields are bounded before they cross, whatever the headers' own methods hand over.
    let f = func("dev", "fields", &[("index.js", "export default () => { Headers.prototype.forEach = function (f) { f('v', 'x'.repeat(300000)); }; return new Response('hi'); }")]);
    match run_alone(engine, f, reach).await.result {
        Err(Failure::Threw { message, .. }) => assert_eq!(message, "header fields of more than 256 KiB; at most that may be sent"),
        other => panic!("{other:?}"),
    }
}

/// A function that changes the typed arrays' globals and prototypes gets bytes at most into the
/// engine's decoder, never a string that is not well formed.
#[tokio::test]
async fn a_function_reshaping_typed_arrays_hands_the_decoder_bytes_only() {
    let gw = Gw::new(vec![
        func("dev", "instance", &[("index.js", "export default () => {
            Object.defineProperty(Uint8Array, Symbol.hasInstance, { value: () => true });
            return Array.from(new TextDecoder().decode(new Uint16Array([0xD800, 0x41])), (c) => c.codePointAt(0));
        }")]),
        func("dev", "species", &[("index.js", "export default () => {
            class E extends Uint8Array { static get [Symbol.species]() { return function (b, o, n) { return new Uint16Array(n || 1).fill(0xD800); }; } }
            Object.defineProperty(Uint8Array, Symbol.species, { get: () => E[Symbol.species] });
            const d = new TextDecoder();
            return [new TextDecoder().decode(new E([0x68, 0x69])), d.decode(new E([0x68, 0xc3]), { stream: true }) + d.decode(new E([0xa9]))];
        }")]),
        func("dev", "getters", &[("index.js", "export default () => {
            const proto = Object.getPrototypeOf(Uint8Array.prototype);
            for (const k of ['buffer', 'byteOffset', 'byteLength']) Object.defineProperty(proto, k, { get() { return k === 'buffer' ? new Uint16Array([0xD800]).buffer : 0; } });
            globalThis.Uint8Array = function () { return { length: 1, 0: 0xD800 }; };
            return new TextDecoder().decode(new Uint16Array([0x6968]));
        }")]),
    ]);
    assert_eq!(body_json(&gw.call("instance", get("/")).await), json!([0, 0xFFFD, 0x41, 0]));
    assert_eq!(body_json(&gw.call("species", get("/")).await), json!(["hi", "hé"]));
    assert_eq!(gw.call("getters", get("/")).await.result.unwrap().body, b"hi");
}

/// `ctx.user` is frozen by the `Object.freeze` the SDK took before any function ran: one that
/// replaces the global cannot leave a consumer's object open to later calls.
#[tokio::test]
async fn a_replaced_object_freeze_leaves_ctx_user_frozen() {
    let gw = Gw::new(vec![
        func("dev", "tamper", &[("index.js", "export default () => { Object.freeze = (x) => x; return 'replaced'; }")]),
        func("dev", "who", &[("index.js", "export default (ctx) => { try { ctx.user.name = 'admin'; } catch (e) { return 'frozen'; } return 'open: ' + ctx.user.name; }")]),
    ]);
    assert_eq!(gw.call("tamper", get("/")).await.result.unwrap().body, b"replaced");
    let as_user = Request { user: Some(User { name: "alice".into(), grant: None }), ..get("/") };
    assert_eq!(gw.call("who", as_user).await.result.unwrap().body, b"frozen");
}

/// A renewal begun while a call waits goes through though what started it cleared meanwhile:
/// promise jobs left over by two calls pile up, a waiting call's turn runs them out, and the
/// calls held for the renewal start once the waiting call ends.
#[tokio::test]
async fn calls_held_for_a_renewal_start_though_the_leftover_jobs_ran_out() {
    let gw = Arc::new(Gw::new(vec![
        func("dev", "wait", &[("index.js", "export default () => new Promise((r) => setTimeout(() => r({ waited: true }), 700))")]),
        func("dev", "spin", &[("index.js", "export default () => { const until = Date.now() + 250; const spin = () => { if (Date.now() < until) Promise.resolve().then(spin); }; for (let i = 0; i < 8; i++) Promise.resolve().then(spin); return 'spun'; }")]),
        func("dev", "ok", &[("index.js", "export default () => ({ ok: true })")]),
    ]));
    let roomy = Limits { wall: Duration::from_secs(10), ..limits() };
    let waiting = {
        let gw = gw.clone();
        tokio::spawn(async move { gw.call_with("wait", get("/"), roomy).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Each leaves jobs queued past its budget, which the next turn's call runs on.
    for _ in 0..2 {
        let _ = gw.call("spin", get("/")).await;
    }
    let held = {
        let gw = gw.clone();
        tokio::spawn(async move { gw.call_with("ok", get("/"), roomy).await })
    };
    assert_eq!(body_json(&waiting.await.unwrap()), json!({"waited": true}));
    let out = tokio::time::timeout(Duration::from_secs(3), held).await.expect("the held call is answered").unwrap();
    assert_eq!(body_json(&out), json!({"ok": true}));
    assert_eq!(body_json(&gw.call("ok", get("/")).await), json!({"ok": true}));
}

/// A string search QuickJS runs in C, which no interrupt stops (about 10^12 comparisons): the
/// node's watchdog puts the runtime's thread under the idle policy and marks the runtime stuck
/// for its gateway to replace, about `STALLED_CPU` past the call's CPU deadline.
#[tokio::test]
async fn a_runtime_stuck_in_a_built_in_runs_on_idle_cpu_only_and_is_given_up() {
    // A gateway of its own: its thread's name is no other test's.
    let mut gw = Gw::new(vec![func("dev", "search", &[("index.js", "export default () => 'a'.repeat(1 << 21).indexOf('a'.repeat(1 << 20) + 'b')")])]);
    gw.engine = Engine::start("stuck-rt", limits().memory, weir_functions::Services::default()).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    gw.engine.when_stuck(move || {
        let _ = tx.send(Instant::now());
    });
    let started = Instant::now();
    let engine = gw.engine.clone();
    let (f, table, vars) = (gw.table["search"].clone(), gw.table.clone(), gw.vars.clone());
    let _running = tokio::spawn(async move { FunctionHandler::run(engine, f, table, vars, limits(), Arc::default(), get("/")).await.map(|o| o.result) });
    // The thread needs 2.2 s of CPU: on a busy machine that takes longer.
    let found = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(60))).await.unwrap().expect("the watchdog finds the runtime stuck");
    let took = found - started;
    assert!(took >= Duration::from_millis(200) + Duration::from_secs(2), "{took:?}: not before the deadline and the CPU allowed past it");
    assert!(gw.engine.stuck());
    assert_eq!(thread_sched("fn-stuck-rt").map(|(policy, _)| policy), Some(5), "the stuck thread runs under the idle policy");
}

/// Source as deep as a file may be, in the shapes that still compile: QuickJS's own parser
/// has a stack limit, so loading it fails the call, and the runtime goes on.
#[tokio::test]
async fn code_nested_as_deep_as_a_file_allows_fails_its_call_and_nothing_else() {
    let deep = |unit: &str, end: &str| format!("export default () => {}{end};\n", unit.repeat((source::MAX_FILE_BYTES - 64) / unit.len()));
    let gw = Gw::new(vec![
        func("dev", "not", &[("index.js", &deep("!", "1"))]),
        func("dev", "plus", &[("index.js", &deep("1+", "1"))]),
        func("dev", "conditional", &[("index.js", &deep("0?1:", "1"))]),
        func("dev", "arrow", &[("index.js", &deep("()=>", "1"))]),
        func("dev", "ok", &[("index.js", "export default () => ({ ok: true })")]),
    ]);
    for name in ["not", "plus", "conditional", "arrow"] {
        let out = gw.call_with(name, get("/"), Limits { cpu: Duration::from_secs(20), ..limits() }).await;
        // QuickJS refuses a module too deep for its stack limit, and the runtime answers the
        // next call.
        match (name, &out.result) {
            // A sum is a loop to QuickJS, however long.
            ("plus", Ok(_)) => assert_eq!(body_json(&out), json!((source::MAX_FILE_BYTES - 64) / 2 + 1)),
            ("not" | "conditional", Err(Failure::Threw { message, .. })) => assert_eq!(message, "Maximum call stack size exceeded"),
            // Its parser past its depth, in its own words (which words depends on where its
            // stack limit cuts in, so on how much stack the engine's frames below it take), or
            // its stack limit.
            ("arrow", Err(Failure::Threw { message, .. })) => assert!(["missing formal parameter", "Maximum call stack size exceeded"].contains(&message.as_str()) || message.starts_with("unexpected token in expression: '=> () =>"), "{message}"),
            (name, other) => panic!("{name}: {other:?}"),
        }
        assert_eq!(body_json(&gw.call("ok", get("/")).await), json!({"ok": true}), "after {name}");
    }
}

/// A caller that stops waiting does not give its place back while the runtime still has its
/// call: otherwise callers that hang up could queue calls without end behind a slow one. A call
/// nobody waits for any more is not started.
#[tokio::test]
async fn a_call_whose_caller_left_keeps_its_place_until_the_runtime_drops_it() {
    let gw = Gw::new(vec![
        func("dev", "busy", &[("index.js", "export default () => { imp.shared.set('n', (imp.shared.get('n') || 0) + 1); for (;;) {} }")]),
        func("dev", "count", &[("index.js", "export default () => imp.shared.get('n')")]),
    ]);
    let cap = Limits { concurrency: 2, ..limits() };
    let mut admitted = 0;
    for _ in 0..10 {
        let run = FunctionHandler::run(gw.engine.clone(), gw.table["busy"].clone(), gw.table.clone(), gw.vars.clone(), cap, Arc::default(), get("/"));
        match tokio::time::timeout(Duration::from_millis(20), run).await {
            // Admitted, and left waiting.
            Err(_) => admitted += 1,
            Ok(refused) => assert!(refused.is_none(), "{refused:?}"),
        }
    }
    assert_eq!(admitted, 2, "two places, held by the calls their callers left");
    // The first runs out its 200 ms of CPU; the second, still queued behind it, is dropped
    // unstarted; then both places are free again.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(body_json(&gw.call_with("count", get("/"), cap).await), json!(1));
}

/// A call's place is given back before its caller hears the answer: a caller that calls again
/// at once, with every place taken, is not refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_answered_may_call_again_at_once() {
    let gw = Gw::new(vec![func("dev", "ok", &[("index.js", "export default () => ({ ok: true })")])]);
    let one = Limits { concurrency: 1, ..limits() };
    for n in 0..500 {
        let out = FunctionHandler::run(gw.engine.clone(), gw.table["ok"].clone(), gw.table.clone(), gw.vars.clone(), one, Arc::default(), get("/")).await;
        assert!(out.is_some(), "call {n} was refused");
    }
}

/// A call whose caller went away (a client that closed its connection) ends within a second
/// or so, and gives back its place, though it waits on a long timer.
#[tokio::test]
async fn a_call_whose_caller_went_away_gives_back_its_place() {
    let gw = Gw::new(vec![func("dev", "wait", &[("index.js", "export default () => new Promise((r) => setTimeout(() => r('done'), 20000))")])]);
    let one = Limits { concurrency: 1, wall: Duration::from_secs(30), ..limits() };
    let run = || FunctionHandler::run(gw.engine.clone(), gw.table["wait"].clone(), gw.table.clone(), gw.vars.clone(), one, Arc::default(), get("/"));
    assert!(tokio::time::timeout(Duration::from_millis(100), run()).await.is_err(), "it waits; its caller goes");
    let t = Instant::now();
    loop {
        match tokio::time::timeout(Duration::from_millis(50), run()).await {
            // Refused: the place is still taken.
            Ok(None) => {
                assert!(t.elapsed() < Duration::from_secs(5), "the place was not given back");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            // Taken: it waits, and its caller goes too.
            Err(_) => break,
            Ok(Some(out)) => panic!("{:?}", out.result),
        }
    }
}

#[tokio::test]
async fn calls_past_the_concurrency_cap_are_refused_and_waits_interleave() {
    let gw = Gw::new(vec![func("dev", "slow", &[("index.js", "export default () => new Promise((r) => setTimeout(() => r('done'), 300))")])]);
    let cap = Limits { concurrency: 3, ..limits() };
    let t = Instant::now();
    let mut running = Vec::new();
    for _ in 0..3 {
        let (engine, f, table, vars) = (gw.engine.clone(), gw.table["slow"].clone(), gw.table.clone(), gw.vars.clone());
        running.push(tokio::spawn(FunctionHandler::run(engine, f, table, vars, cap, Arc::default(), get("/"))));
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let refused = FunctionHandler::run(gw.engine.clone(), gw.table["slow"].clone(), gw.table.clone(), gw.vars.clone(), cap, Arc::default(), get("/")).await;
    assert!(refused.is_none());
    for r in running {
        assert_eq!(r.await.unwrap().unwrap().result.unwrap().body, b"done");
    }
    // Three 300 ms waits ran side by side on the gateway's one thread.
    assert!(t.elapsed() < Duration::from_millis(600), "{:?}", t.elapsed());
}


#[tokio::test]
async fn the_lines_a_call_answers_with_are_bounded() {
    let gw = Gw::new(vec![
        func("dev", "chatty", &[("index.js", "export default () => { for (let i = 0; i < 1200; i++) console.log('line ' + i); return 'ok' }")]),
        func("dev", "wordy", &[("index.js", "const long = 'x'.repeat(9000);\nexport default () => { for (let i = 0; i < 100; i++) console.log('line ' + i + ' ' + long); return 'ok' }")]),
    ]);
    let marker = "later lines of this call are not kept here (past 1000 lines or 256 KiB)";
    let out = gw.call("chatty", get("/")).await;
    assert_eq!(out.result.as_ref().unwrap().body, b"ok");
    assert_eq!(out.logs.len(), weir_functions::LOG_LINES + 1);
    assert_eq!(out.logs[999].message, "line 999");
    let last = out.logs.last().unwrap();
    assert_eq!((last.level.as_str(), last.message.as_str()), ("warn", marker));
    // The function's own buffer keeps its last lines.
    let kept = gw.table["chatty"].logs.since(0, usize::MAX);
    assert_eq!(kept.len(), weir_functions::LOG_LINES);
    assert_eq!(kept.last().unwrap().message, "line 1199");

    // Long lines are cut, and a call keeps 256 KiB of them.
    let out = gw.call("wordy", get("/")).await;
    let cut = 8192 + '…'.len_utf8();
    assert!(out.logs.iter().all(|l| l.message.len() <= cut));
    assert_eq!(out.logs.len(), weir_functions::CALL_LOG_BYTES / cut + 1);
    assert_eq!(out.logs.last().unwrap().message, marker);
}

#[tokio::test]
async fn a_gateway_keeps_so_many_timers_and_frees_them_with_the_call() {
    let gw = Gw::new(vec![
        func("dev", "timers", &[("index.js", "export default () => { let n = 0; try { for (;;) { clearTimeout(setTimeout(() => {}, 60000)); n++; } } catch (e) { return { n, message: e.message }; } }")]),
        func("dev", "one", &[("index.js", "export default () => new Promise((r) => setTimeout(() => r('fired'), 5))")]),
    ]);
    let roomy = Limits { cpu: Duration::from_secs(10), ..limits() };
    let out = gw.call_with("timers", get("/"), roomy).await;
    assert_eq!(body_json(&out), json!({"n": weir_functions::engine::TIMERS_PENDING, "message": "this gateway has 100000 timers pending; no more may be set until some fire or are cleared"}));
    // Cleared timers count until they would have fired or their call ends: the call's went
    // with it.
    assert_eq!(gw.call("one", get("/")).await.result.unwrap().body, b"fired");
    // A gateway with less memory keeps fewer, as they stand for its memory outside the runtime.
    assert_eq!([1 << 20, 32 << 20, 64 << 10].map(weir_functions::engine::timers_at_most), [4096, weir_functions::engine::TIMERS_PENDING, 1024]);
}

/// Calls 64 times a function that answers `answer` and leaves behind a MiB its runtime keeps
/// only if what the call left is not freed when it ends: kept, they would pass the runtime's
/// 32 MiB.
async fn leaves_nothing_behind(code: &str, answer: &[u8]) {
    let gw = Gw::new(vec![func("dev", "leaves", &[("index.js", code)])]);
    for i in 0..64 {
        let out = gw.call("leaves", get("/")).await;
        assert_eq!(out.result.as_ref().map(|r| r.body.as_slice()), Ok(answer), "call {i}");
    }
}

#[tokio::test]
async fn timers_a_call_leaves_behind_are_freed_when_it_ends() {
    leaves_nothing_behind("export default () => { const big = 'x'.repeat(1 << 20) + Math.random(); for (let i = 0; i < 4; i++) setTimeout(() => big.length, 60000); return 'set'; }", b"set").await;
}

#[tokio::test]
async fn fetches_a_call_does_not_wait_for_are_freed_when_it_ends() {
    // The fetch's reaction holds the MiB, in the SDK's table of fetches in flight.
    leaves_nothing_behind("export default () => { const big = 'x'.repeat(1 << 20) + Math.random(); fetch('http://api.example/').then(() => big.length, () => big.length); return 'sent'; }", b"sent").await;
}

#[tokio::test]
async fn a_fetched_body_is_given_back_to_the_gateways_budget_once_in_the_runtime() {
    // The fetcher takes each 12 MiB body from the budget (the gateway's 32 MiB), as the
    // node's does while it reads; kept, the third would not fit.
    let services = weir_functions::Services {
        fetcher: Some(Arc::new(|f: weir_functions::engine::FetchRequest| {
            let taken = f.budget.take(12 << 20);
            (f.reply)(if taken { Ok((200, vec![], vec![1u8; 12 << 20])) } else { Err("the budget is spent".into()) });
        })),
        database: None,
    };
    let engine = Engine::start("budget", limits().memory, services).unwrap();
    let f = func("dev", "thrice", &[("index.js", "export default async () => { const sizes = []; for (let i = 0; i < 3; i++) sizes.push((await (await fetch('http://api.example/big')).arrayBuffer()).byteLength); return sizes; }")]);
    let out = run_alone(engine, f, weir_functions::Reach { allow: Arc::new(vec!["api.example".into()]), database: None }).await;
    assert_eq!(body_json(&out), json!([12 << 20, 12 << 20, 12 << 20]));
}

/// WHATWG and Express details: a request body's type, the decoder's replacement of ill-formed
/// input (one U+FFFD per maximal subpart), its `fatal`, BOM and label handling, the encoder's
/// of lone surrogates, the bound on random bytes, and what `res.send` says it sends.
#[tokio::test]
async fn fetch_bodies_get_their_type_text_decodes_leniently_and_send_types_as_express() {
    let services = weir_functions::Services {
        fetcher: Some(Arc::new(|f: weir_functions::engine::FetchRequest| {
            let ty = f.headers.iter().find(|(k, _)| k == "content-type").map_or("none".to_string(), |(_, v)| v.clone());
            (f.reply)(Ok((200, vec![], ty.into_bytes())));
        })),
        database: None,
    };
    let engine = Engine::start("details", limits().memory, services).unwrap();
    let code = "export default async () => {
      const ty = async (init) => (await fetch('http://api.example/', init)).text();
      let quota;
      try { crypto.getRandomValues(new Uint8Array(65537)); } catch (e) { quota = e.name; }
      return {
        text: await ty({ method: 'POST', body: 'hi' }),
        form: await ty({ method: 'POST', body: new URLSearchParams({ a: '1' }) }),
        named: await ty({ method: 'POST', body: 'hi', headers: { 'Content-Type': 'application/x-thing' } }),
        bytes: await ty({ method: 'POST', body: new Uint8Array([1]) }),
        lenient: new TextDecoder().decode(new Uint8Array([0xf4, 0x5a, 0x7a, 0x7a, 0xc0, 0x80, 0xed, 0xa0, 0x80, 0xe2, 0x82])),
        fatal: (() => { try { return new TextDecoder('UTF-8', { fatal: true }).decode(new Uint8Array([0x61, 0xe2, 0x82])); } catch (e) { return e.name; } })(),
        bom: [new TextDecoder().decode(new Uint8Array([0xef, 0xbb, 0xbf, 0x61])), new TextDecoder('utf8', { ignoreBOM: true }).decode(new Uint8Array([0xef, 0xbb, 0xbf, 0x61])).length],
        view: new TextDecoder().decode(new Uint8Array([0x78, 0xc3, 0xa9, 0x79]).subarray(1, 3)),
        label: [' unicode20utf8 ', 'latin1', '\\u00a0utf-8'].map((l) => { try { return new TextDecoder(l).encoding; } catch (e) { return e.name; } }),
        stream: (() => {
          const d = new TextDecoder('utf-8', { fatal: true });
          return [d.decode(new Uint8Array([0xef, 0xbb, 0xbf, 0x61, 0xe2, 0x82]), { stream: true }), d.decode(new Uint8Array([0xac, 0xf0, 0x9f]), { stream: true }), d.decode(new Uint8Array([0x98, 0x80]))];
        })(),
        lone: Array.from(new TextEncoder().encode('a\\ud800b')),
        most: crypto.getRandomValues(new Uint8Array(65536)).length,
        quota,
      };
    }";
    let out = run_alone(engine.clone(), func("dev", "details", &[("index.js", code)]), weir_functions::Reach { allow: Arc::new(vec!["api.example".into()]), database: None }).await;
    assert_eq!(
        body_json(&out),
        json!({
            "text": "text/plain;charset=UTF-8", "form": "application/x-www-form-urlencoded;charset=UTF-8", "named": "application/x-thing", "bytes": "none",
            "lenient": "\u{fffd}Zzz\u{fffd}\u{fffd}\u{fffd}\u{fffd}\u{fffd}\u{fffd}", "fatal": "TypeError", "bom": ["a", 2], "view": "é", "label": ["utf-8", "RangeError", "RangeError"], "stream": ["a", "€", "😀"],
            "lone": [0x61, 0xef, 0xbf, 0xbd, 0x62], "most": 65536, "quota": "QuotaExceededError"
        })
    );
    for (sent, ty) in [("'<b>hi</b>'", "text/html; charset=utf-8"), ("new Uint8Array([1, 2])", "application/octet-stream"), ("{ a: 1 }", "application/json")] {
        let f = func("dev", "express", &[("index.js", &format!("export default (req, res) => res.send({sent})"))]);
        let out = run_alone(engine.clone(), f, weir_functions::Reach::default()).await;
        let reply = out.result.unwrap();
        assert_eq!(reply.headers.iter().find(|(k, _)| k == "content-type").map(|(_, v)| v.as_ref()), Some(ty), "{sent}");
    }
}

/// Outbound work handed to the node and not yet answered: the fetcher and the database
/// runner below hold every answer until the test lets them go.
#[derive(Default)]
struct Held {
    fetches: std::sync::Mutex<Vec<weir_functions::engine::FetchRequest>>,
    ops: std::sync::Mutex<Vec<weir_functions::DbRequest>>,
}

impl Held {
    fn count(&self) -> usize {
        self.fetches.lock().unwrap().len() + self.ops.lock().unwrap().len()
    }

    /// Waits (up to 2 s) until `n` things are held.
    async fn reach(&self, n: usize) {
        let t = Instant::now();
        while self.count() < n && t.elapsed() < Duration::from_secs(2) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A gateway's engine whose fetches and database operations are held here.
    fn engine(self: &Arc<Self>, gateway: &str) -> Arc<Engine> {
        let (h1, h2) = (self.clone(), self.clone());
        let services = weir_functions::Services {
            fetcher: Some(Arc::new(move |f| h1.fetches.lock().unwrap().push(f))),
            database: Some(Arc::new(move |op| h2.ops.lock().unwrap().push(op))),
        };
        Engine::start(gateway, limits().memory, services).unwrap()
    }

    /// Answers everything held.
    fn release(&self) {
        for f in std::mem::take(&mut *self.fetches.lock().unwrap()) {
            (f.reply)(Ok((200, vec![], b"{}".to_vec())));
        }
        for op in std::mem::take(&mut *self.ops.lock().unwrap()) {
            (op.reply)(Ok("null".into()));
        }
    }
}

#[tokio::test]
async fn a_gateway_has_at_most_so_many_fetches_and_database_operations_in_flight() {
    let cap = weir_functions::engine::OUTBOUND_IN_FLIGHT;
    let held = Arc::new(Held::default());
    let engine = held.engine("held");
    let flood = func(
        "dev",
        "flood",
        &[(
            "index.js",
            "export default async () => {
               const fetches = Array.from({ length: 60 }, () => fetch('http://api.example/x'));
               const reads = Array.from({ length: 20 }, () => imp.db().collection('c').findOne({}));
               // Refused where it is asked for: nothing of it is kept to be refused later.
               let early = false;
               reads[19].catch(() => { early = true; });
               await null;
               const refusedAtOnce = early;
               const all = await Promise.allSettled([...fetches, ...reads]);
               const refused = all.filter((r) => r.status === 'rejected').map((r) => r.reason.message);
               const statuses = [...new Set(all.filter((r) => r.status === 'rejected').map((r) => r.reason.status))];
               return { answered: all.length - refused.length, refused: refused.length, why: [...new Set(refused)], early: refusedAtOnce, statuses };
             }",
        )],
    );
    let one = func("dev", "one", &[("index.js", "export default async () => (await fetch('http://api.example/y')).status")]);
    let table: Table = Arc::new([flood.clone(), one.clone()].into_iter().map(|f| (f.name.clone(), f)).collect());
    let reach = Arc::new(weir_functions::Reach { allow: Arc::new(vec!["api.example".into()]), database: Some(weir_functions::DbScope { name: "held".into(), limits: Default::default() }) });
    let vars = Arc::new(serde_json::Map::new());
    let call = |f: &Arc<Function>| FunctionHandler::run(engine.clone(), f.clone(), table.clone(), vars.clone(), limits(), reach.clone(), get("/"));

    let flooding = tokio::spawn(call(&flood));
    held.reach(cap).await;
    // Past the cap, the rest were refused at once: nothing more reaches the node.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(held.count(), cap);
    // While they are held, another call's fetch is refused too, with a message that says why.
    let out = call(&one).await.unwrap();
    match &out.result {
        Err(Failure::Threw { message, .. }) => assert!(message.starts_with("fetch to http://api.example/y refused: this fetch would make more than 64"), "{message}"),
        other => panic!("{other:?}"),
    }
    held.release();
    let body = body_json(&flooding.await.unwrap().unwrap());
    assert_eq!(body["answered"], 64, "{body}");
    assert_eq!(body["refused"], 16, "{body}");
    assert_eq!(body["early"], true, "{body}");
    // The refused database calls fail as the database's own refusals do: 503.
    assert_eq!(body["statuses"], json!([503]), "{body}");
    for why in body["why"].as_array().unwrap() {
        assert!(why.as_str().unwrap().contains("more than 64 fetches and database operations of this gateway in flight"), "{why}");
    }
    // Answered, they free their places: a fetch goes out again.
    let next = tokio::spawn(call(&one));
    held.reach(1).await;
    assert_eq!(held.count(), 1);
    held.release();
    assert_eq!(body_json(&next.await.unwrap().unwrap()), json!(200));
    // Places whose answers are dropped unanswered are freed as well.
    let _flooding = tokio::spawn(call(&flood));
    held.reach(cap).await;
    assert_eq!(held.count(), cap);
    held.fetches.lock().unwrap().clear();
    held.ops.lock().unwrap().clear();
    let again = tokio::spawn(call(&one));
    held.reach(1).await;
    assert_eq!(held.count(), 1);
    held.release();
    assert_eq!(body_json(&again.await.unwrap().unwrap()), json!(200));
}

#[tokio::test]
async fn request_bodies_count_against_the_gateways_limit_until_sent() {
    let held = Arc::new(Held::default());
    let engine = held.engine("bodies");
    // Two 12 MiB bodies wait to be sent; a third would make 36 of the gateway's 32 MiB.
    let f = func(
        "dev",
        "posts",
        &[(
            "index.js",
            "export default async () => {
               const body = 'y'.repeat(12 << 20), post = () => fetch('http://api.example/in', { method: 'POST', body });
               const sent = [post(), post()];
               let third;
               try { await post(); } catch (e) { third = e.message; }
               return { statuses: (await Promise.all(sent)).map((r) => r.status), third };
             }",
        )],
    );
    let reach = weir_functions::Reach { allow: Arc::new(vec!["api.example".into()]), database: None };
    let call = || run_alone(engine.clone(), f.clone(), reach.clone());
    // Twice: the bytes of the first call's bodies are given back once they are sent.
    for _ in 0..2 {
        let running = tokio::spawn(call());
        held.reach(2).await;
        assert_eq!(held.fetches.lock().unwrap().iter().map(|f| f.body.as_ref().map_or(0, Vec::len)).collect::<Vec<_>>(), [12 << 20, 12 << 20]);
        held.release();
        let body = body_json(&running.await.unwrap());
        assert_eq!(body, json!({"statuses": [200, 200], "third": "fetch to http://api.example/in refused: the request and the fetches in flight would pass this gateway's memory limit"}));
    }
}

#[tokio::test]
async fn database_operations_count_against_the_gateways_limit_until_run() {
    let held = Arc::new(Held::default());
    let engine = held.engine("ops");
    // Four inserts of 7 MiB wait to run; a fifth would make 35 of the gateway's 32 MiB.
    let f = func(
        "dev",
        "inserts",
        &[(
            "index.js",
            "export default async () => {
               const c = imp.db().collection('c'), doc = { text: 'y'.repeat(7 << 20) }, insert = () => c.insertOne(doc);
               const sent = [insert(), insert(), insert(), insert()];
               let fifth;
               try { await insert(); } catch (e) { fifth = `${e.status} ${e.message}`; }
               await Promise.all(sent);
               return { fifth };
             }",
        )],
    );
    let reach = weir_functions::Reach { allow: Arc::default(), database: Some(weir_functions::DbScope { name: "ops".into(), limits: Default::default() }) };
    // Twice: the bytes of the first call's operations are given back once they have run.
    for _ in 0..2 {
        let running = tokio::spawn(run_alone(engine.clone(), f.clone(), reach.clone()));
        held.reach(4).await;
        assert_eq!(held.ops.lock().unwrap().len(), 4);
        held.release();
        let body = body_json(&running.await.unwrap());
        assert_eq!(body["fifth"], json!("503 this database operation and the fetches and database results outside this gateway's runtime would pass its memory limit"));
    }
}

/// Each environment of a gateway has a realm of its own in the gateway's runtime: what a
/// function of one changes of the globals, the SDK's state or the intrinsics, another
/// environment's functions never see, and it loads no function of another environment.
#[tokio::test]
async fn environments_of_a_gateway_share_no_globals_and_load_only_their_own_functions() {
    let engine = Engine::start("realms", limits().memory, weir_functions::Services::default()).unwrap();
    let look = "export default () => ({ marker: typeof globalThis.marker, mapped: [1].map((x) => x + 1), parsed: JSON.parse('{\"a\":1}'), shared: imp.shared.get('k') ?? null, sdk: typeof globalThis.__weir })";
    let prod_look = func("prod", "look", &[("index.js", look)]);
    let staging_look = func("staging", "look", &[("index.js", look)]);
    let module = format!("fn:prod/look@{}/index.js", prod_look.version);
    let tamper = format!(
        "export default async () => {{
           JSON.parse = () => 'tampered'; Array.prototype.map = function () {{ return ['tampered'] }}; globalThis.marker = 'dev'; imp.shared.set('k', 'dev');
           const tried = async (name) => {{ try {{ await import(name); return 'loaded' }} catch (e) {{ return 'refused' }} }};
           return {{ named: await tried({module:?}), sibling: await tried('@/look'), other: await imp.invoke('look', {{}}).then(() => 'ran', () => 'refused'), sdk: typeof globalThis.__weir }};
         }}"
    );
    let dev_tamper = func("dev", "tamper", &[("index.js", &tamper)]);
    let table = |fs: &[&Arc<Function>]| -> Table { Arc::new(fs.iter().map(|f| (f.name.clone(), Arc::clone(f))).collect()) };
    let (dev, staging, prod) = (table(&[&dev_tamper]), table(&[&staging_look]), table(&[&prod_look]));
    let call = |f: &Arc<Function>, t: &Table| FunctionHandler::run(engine.clone(), f.clone(), t.clone(), Arc::default(), limits(), Arc::default(), get("/"));
    let clean = json!({"marker": "undefined", "mapped": [2], "parsed": {"a": 1}, "shared": null, "sdk": "undefined"});
    assert_eq!(body_json(&call(&prod_look, &prod).await.unwrap()), clean);
    // Dev tampers with its realm and reaches for prod's function by its module's name and by
    // `@/look` (dev has none of that name): both refused.
    let out = call(&dev_tamper, &dev).await.unwrap();
    assert_eq!(body_json(&out), json!({"named": "refused", "sibling": "refused", "other": "refused", "sdk": "undefined"}));
    // Prod and staging (a realm made after the tampering) see none of it.
    assert_eq!(body_json(&call(&prod_look, &prod).await.unwrap()), clean);
    assert_eq!(body_json(&call(&staging_look, &staging).await.unwrap()), clean);
}

#[tokio::test]
async fn large_replies_count_against_the_gateways_limit_until_sent() {
    let gw = Gw::new(vec![func("dev", "big", &[("index.js", "export default () => 'z'.repeat(12 << 20)")]), func("dev", "small", &[("index.js", "export default () => ({ ok: true })")])]);
    // Two 12 MiB answers not yet sent hold 24 of the gateway's 32 MiB: a third fails as
    // running out of memory, a small one still answers.
    let first = gw.call("big", get("/")).await;
    let second = gw.call("big", get("/")).await;
    assert_eq!([&first, &second].map(|o| o.result.as_ref().map(|r| r.body.len()).ok()), [Some(12 << 20); 2]);
    assert_eq!(gw.call("big", get("/")).await.result, Err(Failure::Memory));
    assert_eq!(body_json(&gw.call("small", get("/")).await), json!({"ok": true}));
    // The response made of one holds its bytes until it goes (sent, or dropped as here).
    let response = weir_functions::live::respond(first, false, &limits());
    assert_eq!(gw.call("big", get("/")).await.result, Err(Failure::Memory));
    drop(response);
    assert_eq!(gw.call("big", get("/")).await.result.map(|r| r.body.len()), Ok(12 << 20));
    drop(second);
}

#[tokio::test]
async fn database_results_count_against_the_gateways_limit_until_the_runtime_has_them() {
    // Every read answers 12 MiB at once; three answered in one turn would make 36 of the
    // gateway's 32 MiB outside its runtime.
    let services = weir_functions::Services {
        fetcher: None,
        database: Some(Arc::new(|op: weir_functions::DbRequest| (op.reply)(Ok(format!("\"{}\"", "z".repeat(12 << 20)))))),
    };
    let engine = Engine::start("results", limits().memory, services).unwrap();
    let f = func(
        "dev",
        "reads",
        &[(
            "index.js",
            "export default async () => {
               const read = () => imp.db().collection('c').findOne({}).then((doc) => doc.length, (e) => `${e.status} ${e.message}`);
               return [await Promise.all([read(), read(), read()]), await read()];
             }",
        )],
    );
    let out = run_alone(engine, f, weir_functions::Reach { allow: Arc::default(), database: Some(weir_functions::DbScope { name: "results".into(), limits: Default::default() }) }).await;
    let refused = "503 the result and the fetches and database results outside this gateway's runtime would pass its memory limit";
    // Once the runtime has taken them, their bytes are given back: the next read fits.
    assert_eq!(body_json(&out), json!([[12 << 20, 12 << 20, refused], 12 << 20]));
}

/// A runtime that has loaded many versions is made afresh without failing a call: new calls
/// wait while the one in flight finishes.
#[tokio::test]
async fn a_runtime_renewed_after_many_versions_fails_no_call() {
    let gw = Gw::new(vec![func("dev", "slow", &[("index.js", "export default () => new Promise((r) => setTimeout(() => r('slow done'), 200))")])]);
    let slow = tokio::spawn(FunctionHandler::run(gw.engine.clone(), gw.table["slow"].clone(), gw.table.clone(), gw.vars.clone(), limits(), Arc::default(), get("/")));
    tokio::time::sleep(Duration::from_millis(20)).await;
    for i in 0..600 {
        let f = func("dev", "v", &[("index.js", &format!("export default () => ({{ v: {i} }})"))]);
        let out = FunctionHandler::run(gw.engine.clone(), f, gw.table.clone(), gw.vars.clone(), limits(), Arc::default(), get("/")).await.unwrap();
        assert_eq!(body_json(&out), json!({"v": i}), "call {i}");
    }
    assert_eq!(slow.await.unwrap().unwrap().result.unwrap().body, b"slow done");
}

/// A gateway whose function `mark` sets a mark in its environment's state, kept until the
/// runtime is made afresh; the gateway is returned marked.
async fn marked() -> Gw {
    let gw = Gw::new(vec![func("dev", "mark", &[("index.js", "export default (ctx) => { if (ctx.query.set) imp.shared.set('mark', 1); return imp.shared.get('mark') ?? 'gone' }")])]);
    let mut set = get("/");
    set.query = vec![("set".into(), "1".into())];
    assert_eq!(body_json(&gw.call("mark", set).await), json!(1));
    gw
}

/// Whether `gw`'s runtime is the one `marked` marked.
async fn still_marked(gw: &Gw) -> bool {
    gw.call("mark", get("/")).await.result.unwrap().body != b"gone"
}

/// A gateway serving many functions keeps its runtime: only versions followed by others pile
/// up.
#[tokio::test]
async fn a_runtime_serving_many_functions_is_not_renewed_for_them() {
    let gw = marked().await;
    for i in 0..600 {
        let f = func("dev", &format!("f{i}"), &[("index.js", &format!("export default () => ({{ v: {i} }})"))]);
        let out = FunctionHandler::run(gw.engine.clone(), f, gw.table.clone(), gw.vars.clone(), limits(), Arc::default(), get("/")).await.unwrap();
        assert_eq!(body_json(&out), json!({"v": i}), "call {i}");
    }
    assert!(still_marked(&gw).await, "the same runtime");
}

/// Functions no lowering serves any more (deleted, or renamed) count as versions followed by
/// others: a gateway that keeps making and dropping functions has its runtime made afresh.
#[tokio::test]
async fn functions_served_no_more_count_towards_renewal() {
    let gw = marked().await;
    let served = |f: &Arc<Function>| weir_functions::engine::Load { func: f.clone(), table: gw.table.clone(), vars: gw.vars.clone(), cpu: limits().cpu };
    for i in 0..600 {
        // Each lowering serves `mark` and one other function, the one before it gone.
        let f = func("dev", &format!("f{i}"), &[("index.js", &format!("export default () => ({{ v: {i} }})"))]);
        gw.engine.load(vec![served(&gw.table["mark"]), served(&f)]);
        let out = FunctionHandler::run(gw.engine.clone(), f, gw.table.clone(), gw.vars.clone(), limits(), Arc::default(), get("/")).await.unwrap();
        assert_eq!(body_json(&out), json!({"v": i}), "call {i}");
    }
    assert!(!still_marked(&gw).await, "a fresh runtime");
}

/// Sources stay with their loaded versions: past so many bytes of versions since followed by
/// others (three of a function of 64 files of 500 KiB) the runtime is made afresh, its
/// environments' state with it.
#[tokio::test]
async fn a_runtime_renewed_after_many_bytes_of_versions_fails_no_call() {
    let gw = marked().await;
    let filler = format!("export const s = \"{}\";\n", "x".repeat(500 << 10));
    for i in 0..4 {
        let mut files: Vec<(String, String)> = (0..63).map(|n| (format!("f{n}.js"), filler.clone())).collect();
        files.push(("index.js".into(), format!("export default () => ({{ v: {i} }})")));
        let files: Vec<(&str, &str)> = files.iter().map(|(p, s)| (p.as_str(), s.as_str())).collect();
        let f = func("dev", "big", &files);
        let out = FunctionHandler::run(gw.engine.clone(), f, gw.table.clone(), gw.vars.clone(), limits(), Arc::default(), get("/")).await.unwrap();
        assert_eq!(body_json(&out), json!({"v": i}), "call {i}");
    }
    assert!(!still_marked(&gw).await, "a fresh runtime");
}
