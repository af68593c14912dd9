// The SDK every function sees, evaluated once per gateway runtime. `__host` holds the
// runtime's natives (engine.rs); everything else is plain JavaScript.
(() => {
  const host = globalThis.__host;
  delete globalThis.__host;
  const G = globalThis;
  // Held here, so the answer path neither looks them up per call nor follows a function's
  // changes to the globals.
  const stringify = JSON.stringify;
  const protoOf = Object.getPrototypeOf;
  const ObjectProto = Object.prototype;
  const ArrayProto = Array.prototype;

  // The ids of timers, fetches and database operations cross as 32-bit numbers: each count
  // starts again at 1 past the largest, so a realm that lives long never runs out of them.
  const after = (id) => (id >= 0xffffffff ? 1 : id + 1);

  // Timers: the engine keeps the due times, this keeps the callbacks.
  let nextTimer = 1;
  const timers = new Map();
  G.setTimeout = (fn, ms, ...args) => {
    const id = nextTimer;
    nextTimer = after(id);
    const refused = host.timer(id, Math.max(0, Number(ms) || 0));
    if (refused) throw new Error(refused);
    timers.set(id, () => fn(...args));
    return id;
  };
  // Only a timer still pending is cleared in the engine: it keeps nothing for other ids.
  G.clearTimeout = (id) => { if (timers.delete(id)) host.clearTimer(id); };
  const fireTimer = (id) => { const f = timers.get(id); timers.delete(id); if (f) f(); };

  // UTF-8 and base64. Encoding and decoding are native: linear in the bytes, and decoding
  // replaces each maximal ill-formed subpart with one U+FFFD, as WHATWG's decoder does.
  class TextEncoder {
    get encoding() { return "utf-8"; }
    // Lone surrogates become U+FFFD, as WHATWG's encoder makes them.
    encode(s = "") { const t = wellFormed(String(s)); return host.encode(t, t.length); }
  }
  // Held, so that a function replacing them breaks no other's encoding.
  const wellFormed = Function.prototype.call.bind(String.prototype.toWellFormed);
  const sliceText = Function.prototype.call.bind(String.prototype.slice);
  const fromCharCode = String.fromCharCode;
  const apply = Reflect.apply;
  const hasOwn = Object.hasOwn;
  const defineOwn = Object.defineProperty;
  // Header fields cross to the engine as a list of [name, value] strings, bounded here before
  // the engine copies them out of the runtime: at most as many fields, and code units in all,
  // as the engine takes bytes (its own bounds). Each field is defined on the list, so no
  // setter a function put on Array.prototype sees the list or adds to it.
  const MAX_FIELDS = 1000;
  const MAX_FIELD_UNITS = 256 * 1024;
  const fieldsOf = (headers) => {
    const list = [];
    let units = 0;
    headers.forEach((v, k) => {
      k = "" + k;
      v = "" + v;
      units += k.length + v.length;
      if (list.length >= MAX_FIELDS) throw new RangeError(`more than ${MAX_FIELDS} header fields; at most ${MAX_FIELDS} may be sent`);
      if (units > MAX_FIELD_UNITS) throw new RangeError("header fields of more than 256 KiB; at most that may be sent");
      defineOwn(list, list.length, { value: [k, v], writable: true, enumerable: true, configurable: true });
    });
    return list;
  };
  // Bytes are read through the constructor and getters held here, never through a view's own
  // properties, `instanceof` or `subarray` (which follows `Symbol.species`): a function that
  // changes the globals or the typed arrays' prototypes gets other bytes at most, never
  // anything but bytes.
  const U8 = Uint8Array;
  const getterOf = (proto, name) => Function.prototype.call.bind(Object.getOwnPropertyDescriptor(proto, name).get);
  const TypedArrayProto = Object.getPrototypeOf(U8.prototype);
  const taBuffer = getterOf(TypedArrayProto, "buffer"), taOffset = getterOf(TypedArrayProto, "byteOffset"), taLength = getterOf(TypedArrayProto, "byteLength");
  const dvBuffer = getterOf(DataView.prototype, "buffer"), dvOffset = getterOf(DataView.prototype, "byteOffset"), dvLength = getterOf(DataView.prototype, "byteLength");
  const isView = ArrayBuffer.isView;
  // Bytes `from` to `to` of typed array `u`, as a new view.
  const bytesIn = (u, from, to) => new U8(taBuffer(u), taOffset(u) + from, to - from);
  const setBytes = Function.prototype.call.bind(TypedArrayProto.set);
  const UTF8_LABELS = ["utf-8", "utf8", "unicode-1-1-utf-8", "unicode11utf8", "unicode20utf8", "x-unicode20utf8"];
  // How many bytes at the end of `u` begin a sequence that the next chunk may complete.
  const cut = (u) => {
    const n = taLength(u);
    for (let back = 1; back <= 3 && back <= n; back++) {
      const c = u[n - back];
      if ((c & 0xc0) === 0x80) continue;
      const need = c >= 0xc2 && c < 0xe0 ? 2 : c >= 0xe0 && c < 0xf0 ? 3 : c >= 0xf0 && c < 0xf5 ? 4 : 1;
      if (back >= need) return 0;
      // The second byte's range depends on the first (no overlong, surrogate or past-U+10FFFF form).
      if (back > 1) {
        const d = u[n - back + 1];
        const [lo, hi] = c === 0xe0 ? [0xa0, 0xbf] : c === 0xed ? [0x80, 0x9f] : c === 0xf0 ? [0x90, 0xbf] : c === 0xf4 ? [0x80, 0x8f] : [0x80, 0xbf];
        if (d < lo || d > hi) return 0;
      }
      return back;
    }
    return 0;
  };
  const bytesOf = (b) => {
    if (!isView(b)) return new U8(b);
    try { return new U8(taBuffer(b), taOffset(b), taLength(b)); } catch { return new U8(dvBuffer(b), dvOffset(b), dvLength(b)); }
  };
  class TextDecoder {
    constructor(label = "utf-8", options = {}) {
      const name = String(label).replace(/^[\t\n\f\r ]+|[\t\n\f\r ]+$/g, "").toLowerCase();
      if (!UTF8_LABELS.includes(name)) throw new RangeError(`TextDecoder: encoding "${label}" is not supported (only utf-8 is)`);
      this._fatal = Boolean(options && options.fatal);
      this._ignoreBOM = Boolean(options && options.ignoreBOM);
      // With `stream`, the bytes of a sequence cut at a chunk's end wait for the next chunk.
      this._held = null;
      this._started = false;
    }
    get encoding() { return "utf-8"; }
    get fatal() { return this._fatal; }
    get ignoreBOM() { return this._ignoreBOM; }
    decode(b, options = {}) {
      const stream = Boolean(options && options.stream);
      let u = b === undefined ? new U8(0) : bytesOf(b);
      if (this._held) {
        const held = this._held, h = taLength(held), n = taLength(u);
        const joined = new U8(h + n);
        setBytes(joined, held);
        setBytes(joined, u, h);
        u = joined;
        this._held = null;
      }
      const keep = stream ? cut(u) : 0;
      if (keep) {
        const n = taLength(u);
        this._held = new U8(bytesIn(u, n - keep, n));
        u = bytesIn(u, 0, n - keep);
      }
      // A byte order mark is dropped at the start of a stream only.
      // The length of the text that crosses, whatever the view's `length` getter says.
      const text = latin1(u);
      const s = host.decode(text, text.length, this._fatal, this._ignoreBOM || this._started);
      this._started = stream && (this._started || taLength(u) > 0);
      if (typeof s !== "string") throw new TypeError("TextDecoder: the data is not valid UTF-8");
      return s;
    }
  }
  G.TextEncoder = TextEncoder;
  G.TextDecoder = TextDecoder;
  const B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  G.btoa = (s) => {
    s = String(s);
    let out = "";
    for (let i = 0; i < s.length; i += 3) {
      const a = s.charCodeAt(i), b = s.charCodeAt(i + 1), c = s.charCodeAt(i + 2);
      if (a > 255 || b > 255 || c > 255) throw new Error("btoa: the string has characters outside Latin-1");
      const n = (a << 16) | ((b || 0) << 8) | (c || 0);
      out += B64[n >> 18] + B64[(n >> 12) & 63] + (i + 1 < s.length ? B64[(n >> 6) & 63] : "=") + (i + 2 < s.length ? B64[n & 63] : "=");
    }
    return out;
  };
  G.atob = (s) => {
    s = String(s).replace(/[\t\n\f\r ]/g, "").replace(/=+$/, "");
    if (/[^A-Za-z0-9+/]/.test(s) || s.length % 4 === 1) throw new Error("atob: not base64");
    let out = "";
    for (let i = 0; i < s.length; i += 4) {
      const n = (B64.indexOf(s[i]) << 18) | (B64.indexOf(s[i + 1]) << 12) | ((B64.indexOf(s[i + 2]) & 63) << 6) | (B64.indexOf(s[i + 3]) & 63);
      out += String.fromCharCode(n >> 16);
      if (i + 2 < s.length) out += String.fromCharCode((n >> 8) & 255);
      if (i + 3 < s.length) out += String.fromCharCode(n & 255);
    }
    return out;
  };

  // URLSearchParams and URL (absolute http(s) URLs and relative references against a base).
  const enc = (s) => encodeURIComponent(s).replace(/%20/g, "+");
  const dec = (s) => { try { return decodeURIComponent(s.replace(/\+/g, " ")); } catch { return s; } };
  class URLSearchParams {
    constructor(init = "") {
      this._list = [];
      if (typeof init === "string") {
        for (const part of init.replace(/^\?/, "").split("&")) {
          if (!part) continue;
          const i = part.indexOf("=");
          this._list.push(i < 0 ? [dec(part), ""] : [dec(part.slice(0, i)), dec(part.slice(i + 1))]);
        }
      } else if (init && typeof init[Symbol.iterator] === "function") {
        for (const [k, v] of init) this._list.push([String(k), String(v)]);
      } else if (init && typeof init === "object") {
        for (const k of Object.keys(init)) this._list.push([k, String(init[k])]);
      }
    }
    append(k, v) { this._list.push([String(k), String(v)]); this._changed(); }
    delete(k) { this._list = this._list.filter(([n]) => n !== k); this._changed(); }
    get(k) { const e = this._list.find(([n]) => n === k); return e ? e[1] : null; }
    getAll(k) { return this._list.filter(([n]) => n === k).map(([, v]) => v); }
    has(k) { return this._list.some(([n]) => n === k); }
    set(k, v) {
      const i = this._list.findIndex(([n]) => n === k);
      if (i < 0) this._list.push([String(k), String(v)]);
      else { this._list[i] = [String(k), String(v)]; this._list = this._list.filter(([n], j) => n !== k || j === i); }
      this._changed();
    }
    sort() { this._list.sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0)); this._changed(); }
    forEach(f) { for (const [k, v] of this._list) f(v, k, this); }
    keys() { return this._list.map(([k]) => k)[Symbol.iterator](); }
    values() { return this._list.map(([, v]) => v)[Symbol.iterator](); }
    entries() { return this._list.map((e) => [e[0], e[1]])[Symbol.iterator](); }
    [Symbol.iterator]() { return this.entries(); }
    get size() { return this._list.length; }
    toString() { return this._list.map(([k, v]) => enc(k) + "=" + enc(v)).join("&"); }
    _changed() { if (this._url) this._url._search = this._list.length ? "?" + this.toString() : ""; }
  }
  G.URLSearchParams = URLSearchParams;
  const URL_RE = /^([a-zA-Z][a-zA-Z0-9+.-]*):\/\/(?:([^:@/?#]*)(?::([^@/?#]*))?@)?(\[[^\]]*\]|[^:/?#]*)(?::(\d*))?([^?#]*)(\?[^#]*)?(#.*)?$/;
  const DEFAULT_PORT = { "http:": "80", "https:": "443", "ws:": "80", "wss:": "443" };
  class URL {
    constructor(input, base) {
      input = String(input);
      let m = URL_RE.exec(input);
      if (!m && base !== undefined) {
        const b = new URL(base);
        let path = input, search = "", hash = "";
        const h = path.indexOf("#"); if (h >= 0) { hash = path.slice(h); path = path.slice(0, h); }
        const q = path.indexOf("?"); if (q >= 0) { search = path.slice(q); path = path.slice(0, q); }
        if (input.startsWith("//")) return new URL(b.protocol + input);
        if (!path.startsWith("/")) path = path === "" ? b.pathname : b.pathname.replace(/[^/]*$/, "") + path;
        const segs = [];
        for (const s of path.split("/").slice(1)) { if (s === "..") segs.pop(); else if (s !== ".") segs.push(s); }
        return new URL(b.origin + "/" + segs.join("/") + (search || (path === b.pathname && q < 0 ? b.search : "")) + hash);
      }
      if (!m) throw new TypeError("Invalid URL: " + input);
      this.protocol = m[1].toLowerCase() + ":";
      this.username = m[2] || "";
      this.password = m[3] || "";
      this.hostname = m[4].toLowerCase();
      if (!this.hostname) throw new TypeError("Invalid URL: " + input);
      this.port = m[5] && m[5] !== DEFAULT_PORT[this.protocol] ? m[5] : "";
      this.pathname = m[6] || "/";
      this._search = m[7] && m[7] !== "?" ? m[7] : "";
      this.hash = m[8] && m[8] !== "#" ? m[8] : "";
    }
    get host() { return this.hostname + (this.port ? ":" + this.port : ""); }
    get origin() { return this.protocol + "//" + this.host; }
    get search() { return this._search; }
    set search(s) { s = String(s); this._search = s && s !== "?" ? (s[0] === "?" ? s : "?" + s) : ""; this._params = undefined; }
    get searchParams() {
      if (!this._params) { this._params = new URLSearchParams(this._search); this._params._url = this; }
      return this._params;
    }
    get href() {
      const auth = this.username ? this.username + (this.password ? ":" + this.password : "") + "@" : "";
      return this.protocol + "//" + auth + this.host + this.pathname + this.search + this.hash;
    }
    toString() { return this.href; }
    toJSON() { return this.href; }
  }
  G.URL = URL;

  // Headers, Response, and the function-side fetch.
  // As WHATWG's: values of a name are joined with ", ", except `set-cookie`'s, which stay one
  // field each (a cookie's `Expires` holds a comma) and are listed by `getSetCookie()`.
  class Headers {
    constructor(init) {
      this._map = new Map();
      this._cookies = [];
      if (init instanceof Headers) init.forEach((v, k) => this.append(k, v));
      else if (Array.isArray(init)) for (const [k, v] of init) this.append(k, v);
      else if (init && typeof init === "object") for (const k of Object.keys(init)) this.append(k, init[k]);
    }
    append(k, v) {
      k = String(k).toLowerCase();
      if (k === "set-cookie") { this._cookies.push(String(v)); return; }
      const o = this._map.get(k);
      this._map.set(k, o === undefined ? String(v) : o + ", " + v);
    }
    set(k, v) { k = String(k).toLowerCase(); if (k === "set-cookie") this._cookies = [String(v)]; else this._map.set(k, String(v)); }
    get(k) {
      k = String(k).toLowerCase();
      if (k === "set-cookie") return this._cookies.length ? this._cookies.join(", ") : null;
      const v = this._map.get(k);
      return v === undefined ? null : v;
    }
    getSetCookie() { return this._cookies.slice(); }
    has(k) { k = String(k).toLowerCase(); return k === "set-cookie" ? this._cookies.length > 0 : this._map.has(k); }
    delete(k) { k = String(k).toLowerCase(); if (k === "set-cookie") this._cookies = []; else this._map.delete(k); }
    forEach(f) { for (const [k, v] of this.entries()) f(v, k, this); }
    entries() { const out = [...this._map.entries()]; for (const c of this._cookies) out.push(["set-cookie", c]); return out[Symbol.iterator](); }
    keys() { return [...this.entries()].map((e) => e[0])[Symbol.iterator](); }
    values() { return [...this.entries()].map((e) => e[1])[Symbol.iterator](); }
    [Symbol.iterator]() { return this.entries(); }
  }
  G.Headers = Headers;
  const bodyBytes = (body) => {
    if (body === undefined || body === null) return null;
    if (typeof body === "string") return body;
    if (body instanceof ArrayBuffer || ArrayBuffer.isView(body)) return bytesOf(body);
    if (body instanceof URLSearchParams) return body.toString();
    return String(body);
  };
  class Response {
    constructor(body, init = {}) {
      this.status = init.status === undefined ? 200 : init.status | 0;
      if (this.status < 200 || this.status > 599) throw new RangeError("Response status must be in 200..599");
      this.statusText = init.statusText || "";
      this.headers = new Headers(init.headers);
      this._body = bodyBytes(body);
      if (typeof this._body === "string" && !this.headers.has("content-type")) this.headers.set("content-type", "text/plain; charset=utf-8");
    }
    get ok() { return this.status >= 200 && this.status < 300; }
    async text() { return this._body === null ? "" : typeof this._body === "string" ? this._body : new TextDecoder().decode(this._body); }
    async json() { return JSON.parse(await this.text()); }
    async arrayBuffer() { const b = typeof this._body === "string" ? new TextEncoder().encode(this._body) : this._body || new Uint8Array(0); return b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength); }
    static json(data, init = {}) { const r = new Response(JSON.stringify(data), init); r.headers.set("content-type", "application/json"); return r; }
  }
  G.Response = Response;

  const MAX_URL = 65536;
  let nextFetch = 1;
  const fetches = new Map();
  G.fetch = (input, init = {}) => new Promise((resolve, reject) => {
    const url = String(input instanceof URL ? input.href : input);
    const headers = new Headers(init.headers);
    // The type a body of text or of form fields has, unless the caller named one.
    if (!headers.has("content-type")) {
      if (typeof init.body === "string") headers.set("content-type", "text/plain;charset=UTF-8");
      else if (init.body instanceof URLSearchParams) headers.set("content-type", "application/x-www-form-urlencoded;charset=UTF-8");
    }
    const list = fieldsOf(headers);
    const body = bodyBytes(init.body);
    const id = nextFetch;
    nextFetch = after(id);
    fetches.set(id, { resolve, reject });
    try {
      const method = String(init.method || "GET").toUpperCase();
      // Checked here, before the engine copies them out of the runtime.
      if (url.length > MAX_URL) throw new TypeError(`fetch refused: the URL is longer than ${MAX_URL} characters`);
      if (method.length > 64) throw new TypeError("fetch refused: the method is longer than 64 characters");
      const refused = host.fetch(id, method, url, list, body === null ? null : wire(body));
      if (refused) throw new TypeError(refused);
    } catch (e) {
      fetches.delete(id);
      reject(e);
    }
  });
  const fetched = (id, error, status, headers, body) => {
    const f = fetches.get(id);
    fetches.delete(id);
    if (!f) return;
    if (error) f.reject(new TypeError(error));
    else f.resolve(new Response(status === 204 || status === 304 ? null : body, { status: Math.max(200, status), headers }));
  };

  // Crypto.
  const ALGS = { "SHA-1": 1, "SHA-256": 256, "SHA-384": 384, "SHA-512": 512 };
  G.crypto = {
    randomUUID: () => host.uuid(),
    getRandomValues: (arr) => {
      if (!ArrayBuffer.isView(arr) || arr instanceof Float32Array || arr instanceof Float64Array || arr instanceof DataView) throw new TypeError("crypto.getRandomValues: an integer typed array is needed");
      if (arr.byteLength > 65536) { const e = new Error("crypto.getRandomValues: at most 65536 bytes at a time, not " + arr.byteLength); e.name = "QuotaExceededError"; throw e; }
      bytesOf(arr).set(new Uint8Array(host.random(arr.byteLength)));
      return arr;
    },
    subtle: {
      digest: async (alg, data) => {
        const name = typeof alg === "string" ? alg : alg && alg.name;
        const n = ALGS[String(name).toUpperCase()];
        if (!n) throw new Error("crypto.subtle.digest: unsupported algorithm " + name);
        return host.digest(n, wire(typeof data === "string" ? new TextEncoder().encode(data) : data));
      },
    },
  };

  // Console: lines go to the function's log.
  const show = (v) => {
    if (typeof v === "string") return v;
    if (v instanceof Error) return v.stack ? v.message + "\n" + v.stack : String(v);
    try { const s = JSON.stringify(v); return s === undefined ? String(v) : s; } catch { return String(v); }
  };
  // A line crosses to the engine cut to what it keeps (and a little more, for the mark that
  // says it was cut) and well formed: a lone surrogate is U+FFFD there.
  // What crosses is text whatever a function did to the arrays' methods, so its length is its
  // own: a line made otherwise would cross whole, however long, before the engine cut it.
  const kept = (s) => (typeof s === "string" ? wellFormed(s.length > 8196 ? sliceText(s, 0, 8196) : s) : "(a line that is not text)");
  const line = (level) => (...args) => host.log(level, kept(args.map(show).join(" ")));
  G.console = { log: line("info"), info: line("info"), debug: line("debug"), warn: line("warn"), error: line("error") };

  // The database: `imp.db()` (alias `cloud.database()`), MongoDB's collection methods over
  // the node's document engine. Every method is one operation sent as JSON; its answer comes
  // back as JSON, and a failure as a DatabaseError with `code` and `status`.
  let nextDb = 1;
  const dbCalls = new Map();
  const dbOp = (req) => new Promise((resolve, reject) => {
    const id = nextDb;
    nextDb = after(id);
    dbCalls.set(id, { resolve, reject });
    try {
      const op = JSON.stringify(req);
      const refused = host.db(id, op, op.length);
      if (refused) throw dbError({ message: refused, code: "unavailable", status: 503 });
    } catch (e) {
      dbCalls.delete(id);
      reject(e);
    }
  });
  const dbError = (e) => {
    const err = new Error(e.message);
    err.name = "DatabaseError";
    err.code = e.code;
    err.status = e.status;
    return err;
  };
  const dbDone = (id, error, out) => {
    const c = dbCalls.get(id);
    dbCalls.delete(id);
    if (!c) return;
    if (error) c.reject(dbError(JSON.parse(error)));
    else c.resolve(JSON.parse(out));
  };
  class Cursor {
    constructor(send, filter, options) { this._send = send; this._filter = filter; this._options = { ...options }; }
    sort(s) { this._options.sort = s; return this; }
    limit(n) { this._options.limit = n; return this; }
    skip(n) { this._options.skip = n; return this; }
    project(p) { this._options.projection = p; return this; }
    toArray() { return this._send("find", { filter: this._filter, options: this._options }); }
    explain() { return this._send("explain", { filter: this._filter, options: this._options }); }
  }
  class Collection {
    constructor(name, tx) { this.collectionName = name; this._tx = tx; }
    _send(op, args) { return dbOp({ op, collection: this.collectionName, tx: this._tx, ...args }); }
    insertOne(doc) { return this._send("insertOne", { doc }); }
    insertMany(docs) { return this._send("insertMany", { docs }); }
    findOne(filter = {}, options = {}) { return this._send("findOne", { filter, options }); }
    find(filter = {}, options = {}) { return new Cursor((op, a) => this._send(op, a), filter, options); }
    countDocuments(filter = {}) { return this._send("countDocuments", { filter }); }
    updateOne(filter, update, options = {}) { return this._send("updateOne", { filter, update, options }); }
    updateMany(filter, update, options = {}) { return this._send("updateMany", { filter, update, options }); }
    replaceOne(filter, doc, options = {}) { return this._send("replaceOne", { filter, doc, options }); }
    deleteOne(filter = {}) { return this._send("deleteOne", { filter }); }
    deleteMany(filter = {}) { return this._send("deleteMany", { filter }); }
    createIndex(keys, options = {}) { return this._send("createIndex", { keys, options }); }
    dropIndex(name) { return this._send("dropIndex", { name }); }
    drop() { return this._send("drop", {}); }
  }
  const database = (tx) => ({
    collection: (name) => new Collection(String(name), tx),
    collections: () => dbOp({ op: "collections" }),
    transaction: async (fn) => {
      if (tx !== undefined) throw new Error("transactions do not nest");
      const { tx: id } = await dbOp({ op: "begin" });
      let out;
      try {
        out = await fn(database(id));
      } catch (e) {
        await dbOp({ op: "abort", tx: id }).catch(() => {});
        throw e;
      }
      await dbOp({ op: "commit", tx: id });
      return out;
    },
  });

  // The SDK: `imp` (alias `cloud`). `env`, `shared` and `invoke` follow the call running.
  const shared = new Map();
  let vars = {};
  const imp = {
    get env() { return vars; },
    get shared() { const env = host.environment(); let m = shared.get(env); if (!m) { m = new Map(); shared.set(env, m); } return m; },
    fetch: (...a) => G.fetch(...a),
    db: () => database(undefined),
    database: () => database(undefined),
    invoke: async (name, body) => {
      const mod = await import("@/" + String(name));
      const ctx = { method: "POST", path: "/" + name, query: {}, headers: {}, body, requestId: "", user: undefined };
      const out = await shapes(mod.default, ctx);
      return out instanceof Ended ? out.value : out;
    },
  };
  G.imp = imp;
  G.cloud = imp;

  // What an Express-style handler ended with.
  class Ended { constructor(value) { this.value = value; } }

  // Shapes: `(ctx) => value` and `(req, res) => ...` (Express), both to one response.
  const shapes = async (fn, ctx) => {
    if (typeof fn !== "function") throw new TypeError("the default export is not a function");
    if (fn.length < 2) return fn(ctx);
    let done;
    const ended = new Promise((r) => { done = r; });
    const res = {
      statusCode: 200,
      headers: new Headers(),
      status(n) { this.statusCode = n | 0; return this; },
      // An array of values (cookies, say) is one field each, as Express sends them.
      set(k, v) {
        if (typeof k === "object") { for (const n of Object.keys(k)) this.set(n, k[n]); return this; }
        if (Array.isArray(v)) { this.headers.delete(k); for (const x of v) this.headers.append(k, x); } else this.headers.set(k, v);
        return this;
      },
      header(k, v) { return this.set(k, v); },
      type(t) { this.headers.set("content-type", t.includes("/") ? t : t === "json" ? "application/json" : t === "html" ? "text/html; charset=utf-8" : "text/plain; charset=utf-8"); return this; },
      json(v) { if (!this.headers.has("content-type")) this.headers.set("content-type", "application/json"); return this.end(JSON.stringify(v)); },
      // As Express: an object is JSON, a string HTML, bytes an octet stream, unless a type was set.
      send(v) {
        const bytes = v instanceof ArrayBuffer || ArrayBuffer.isView(v);
        if (v !== null && typeof v === "object" && !bytes) return this.json(v);
        if (!this.headers.has("content-type") && (typeof v === "string" || bytes)) this.headers.set("content-type", bytes ? "application/octet-stream" : "text/html; charset=utf-8");
        return this.end(v);
      },
      end(v) { done(new Response(v === undefined ? null : v, { status: this.statusCode, headers: this.headers })); return this; },
    };
    await fn(ctx, res);
    return new Ended(await ended);
  };

  // Bytes cross to the engine as a Latin-1 string, text as itself: [binary, string].
  const latin1 = (u) => { let s = ""; const n = taLength(u); for (let i = 0; i < n; i += 8192) s += apply(fromCharCode, null, bytesIn(u, i, i + 8192 < n ? i + 8192 : n)); return s; };
  // The third is the string's length, so that the engine takes the room for its copies
  // before it makes them.
  const wire = (b) => { const s = typeof b === "string" ? b : latin1(bytesOf(b)); return [typeof b !== "string", s, s.length]; };
  // JSON text crosses as itself; a long text as a body on the wire, whose length the engine
  // takes from the gateway's budget before it copies the text out of the runtime.
  const json = (s) => (s.length < 4096 ? s : [200, [["content-type", "application/json"]], [false, s, s.length]]);
  const toResponse = (out) => {
    if (out !== null && typeof out === "object") {
      // A plain object or array, the common answer, is JSON: it crosses as its text alone.
      const proto = protoOf(out);
      if (proto === ObjectProto || proto === ArrayProto) return json(stringify(out) ?? "null");
      if (out instanceof Ended) out = out.value;
    }
    if (out instanceof Response) {
      return [out.status, fieldsOf(out.headers), wire(out._body === null ? "" : out._body)];
    }
    if (out === undefined) return [204, [], wire("")];
    if (typeof out === "string") return [200, [["content-type", "text/plain; charset=utf-8"]], wire(out)];
    if (out instanceof ArrayBuffer || ArrayBuffer.isView(out)) return [200, [["content-type", "application/octet-stream"]], wire(out)];
    return json(stringify(out) ?? "null");
  };

  // A form's fields are the object's own properties whatever their names (`__proto__`,
  // `toString`): a client's input never reshapes the object's prototype.
  const parseBody = (type, text) => {
    type = (type || "").toLowerCase();
    if (type.includes("json")) { try { return JSON.parse(text); } catch { return text; } }
    if (type.includes("application/x-www-form-urlencoded")) {
      const o = {};
      for (const [k, v] of new URLSearchParams(text)) {
        defineOwn(o, k, { value: hasOwn(o, k) ? [].concat(o[k], v) : v, writable: true, enumerable: true, configurable: true });
      }
      return o;
    }
    return text;
  };

  // Frozen all the way down: a variable holding an object or an array is the same for every
  // call. Only what the engine made (plain JSON values) is frozen this way.
  const freezeOne = Object.freeze;
  const ownKeys = Reflect.ownKeys;
  const deepFreeze = (v) => {
    if (v !== null && typeof v === "object") {
      freezeOne(v);
      const keys = ownKeys(v);
      for (let i = 0; i < keys.length; i++) deepFreeze(v[keys[i]]);
    }
    return v;
  };

  // Called by the engine: runs one call to its response [status, headers, body].
  G.__weir = {
    // `req` becomes the call's context. A function that answers without waiting is
    // answered without a promise.
    run: (fn, req, vs) => {
      vars = vs;
      if (req.body !== undefined) req.body = parseBody(req.headers["content-type"], req.body);
      if (typeof fn === "function" && fn.length < 2) {
        const out = fn(req);
        return out !== null && typeof out === "object" && typeof out.then === "function" ? Promise.resolve(out).then(toResponse) : toResponse(out);
      }
      return shapes(fn, req).then(toResponse);
    },
    setVars: (vs) => { vars = vs; },
    // An error's text as the engine keeps it: its first `n` units, lone surrogates replaced,
    // so that only those are copied out of the runtime.
    cut: (s, n) => wellFormed(s.length > n ? sliceText(s, 0, n) : s),
    // Taken before any function runs: the engine freezes `ctx.user` and the variables with it.
    freeze: deepFreeze,
    // Names the engine gives every call's context, held as this object's keys so that they
    // stay made: a name no live object holds is freed when a call ends and made again by the
    // next one.
    names: Object.freeze({
      appId: 0, grantId: 0, name: 0, user: 0, requestId: 0,
      host: 0, "user-agent": 0, accept: 0, "accept-encoding": 0, "accept-language": 0, authorization: 0,
      apikey: 0, "content-type": 0, "content-length": 0, cookie: 0, origin: 0, referer: 0,
      "x-request-id": 0, "x-real-ip": 0, "x-forwarded-for": 0, "x-forwarded-proto": 0, "x-forwarded-host": 0,
      "x-consumer-username": 0, "x-credential-identifier": 0,
    }),
    // Objects laid out as the engine lays out a call's context, one for each step, and
    // headers as common clients send them. QuickJS frees an object's layout (its shape)
    // with the last object that has it, so without these every call would make its
    // context's layouts again, property by property. Never frozen: freezing changes them.
    layouts: [
      { method: 0 }, { method: 0, path: 0 }, { method: 0, path: 0, query: 0 },
      { method: 0, path: 0, query: 0, headers: 0 },
      { method: 0, path: 0, query: 0, headers: 0, body: 0 },
      { method: 0, path: 0, query: 0, headers: 0, requestId: 0 },
      { method: 0, path: 0, query: 0, headers: 0, body: 0, requestId: 0 },
      { method: 0, path: 0, query: 0, headers: 0, requestId: 0, user: 0 },
      { method: 0, path: 0, query: 0, headers: 0, body: 0, requestId: 0, user: 0 },
      { host: 0 }, { host: 0, "user-agent": 0 }, { host: 0, "user-agent": 0, accept: 0 },
      // The object JSON.stringify wraps its value in.
      { "": 0 },
    ],
    fireTimer,
    dropTimers: (ids) => { for (let i = 0; i < ids.length; i++) timers.delete(ids[i]); },
    // A call ended without waiting for these: their answers will not come.
    dropOutbound: (f, d) => { for (let i = 0; i < f.length; i++) fetches.delete(f[i]); for (let i = 0; i < d.length; i++) dbCalls.delete(d[i]); },
    fetched,
    dbDone,
  };
})();
