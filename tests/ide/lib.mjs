// tests/ide/lib.mjs - launch build/agentsmithy-server the way the AgentSmithy
// VS Code extension does (src/services/server/ProcessManager.ts, release
// 1.9.0), watch ROOT/.agentsmithy/status.json, and read streams with Node's
// fetch (undici), as the extension's SSE reader does.
//
// Nothing here sleeps in place of a condition: waitFor() polls a condition up
// to a deadline, and stops early (with the server's log) if the server exits.
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
export const repo = path.resolve(here, '..', '..');
export const serverPath = path.resolve(process.env.AGENTSMITHY_SERVER || path.join(repo, 'build', 'agentsmithy-server'));
// Built by run.sh; when absent, tests that need the write trace fail saying so.
export const traceShim = process.env.STATUS_TRACE_SO || '';

export const delay = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

export class TestError extends Error {
  constructor(message) {
    super(message);
    this.name = "TestError";
  }
}

// Fails the test with `message` (and, when given, a server's log tail).
export function fail(message, server) {
  throw new TestError(server ? `${message}\n${server.logTail()}` : message);
}

export function check(condition, message, server) {
  if (!condition) fail(message, server);
}

// Polls `pred` (sync or async) every `interval` ms until it returns a truthy
// value, which it returns. Throws at the deadline, or as soon as `server`
// (if given) has exited, with `what` and the server's log.
export async function waitFor(pred, { timeout = 20000, interval = 5, what = 'condition', server } = {}) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const value = await pred();
    if (value) return value;
    if (server && server.exit) fail(`server exited (${server.exitText()}) while waiting for ${what}`, server);
    if (Date.now() >= deadline) fail(`timed out after ${timeout} ms waiting for ${what}`, server);
    await delay(interval);
  }
}

// Runs `promise` with a deadline; rejects with `what` when it passes.
export async function within(ms, promise, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new TestError(`timed out after ${ms} ms: ${what}`)), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

// ---------------------------------------------------------------------------
// Workspace roots and status.json
// ---------------------------------------------------------------------------

const cleanups = [];

// Runs (and forgets) the cleanups registered by the current test, newest first.
export async function cleanupAll() {
  while (cleanups.length) {
    const f = cleanups.pop();
    try {
      await f();
    } catch {
      // best effort
    }
  }
}

export async function makeRoot() {
  const root = await fsp.mkdtemp(path.join(os.tmpdir(), 'agentsmithy-ide-'));
  cleanups.push(() => fsp.rm(root, { recursive: true, force: true }));
  return root;
}

export const statusPath = (root) => path.join(root, '.agentsmithy', 'status.json');

// Where the server keeps its dialogs by default (no --store, no --store-path).
export const storePath = (root) => path.join(root, '.agentsmithy', 'agentsmithy.sqlite3');

// What the extension's readStatus() does: the parsed object, or null for a
// missing or unparsable file. `strict` also reports which it was.
export function readStatus(root) {
  return readStatusStrict(root).doc;
}

export function readStatusStrict(root) {
  let text;
  try {
    text = fs.readFileSync(statusPath(root), 'utf8');
  } catch (e) {
    return { exists: false, doc: null, error: e.code };
  }
  try {
    const doc = JSON.parse(text);
    return { exists: true, doc: doc && typeof doc === 'object' && !Array.isArray(doc) ? doc : null, text };
  } catch (e) {
    return { exists: true, doc: null, text, error: `unparsable (${e.message}): ${JSON.stringify(text.slice(0, 200))}` };
  }
}

export function writeStatus(root, doc) {
  fs.mkdirSync(path.join(root, '.agentsmithy'), { recursive: true });
  fs.writeFileSync(statusPath(root), JSON.stringify(doc, null, 2));
}

// Samples status.json every `interval` ms until stop(): every state seen (in
// order, consecutive duplicates folded) and every read of an existing file
// that did not parse (a partial write seen from outside).
export function watchStatus(root, interval = 2) {
  const seen = [];
  const torn = [];
  let reads = 0;
  let running = true;
  const loop = (async () => {
    while (running) {
      const r = readStatusStrict(root);
      reads++;
      if (r.exists && !r.doc) torn.push(r.error || 'not an object');
      if (r.doc) {
        const key = `${r.doc.server_status}`;
        if (seen[seen.length - 1] !== key) seen.push(key);
      }
      await delay(interval);
    }
  })();
  return {
    seen,
    torn,
    get reads() {
      return reads;
    },
    async stop() {
      running = false;
      await loop;
    },
  };
}

// The states the server wrote, in order, from the LD_PRELOAD trace.
export function readTrace(file) {
  let text;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch {
    return [];
  }
  return text
    .split('\n\x1e\n')
    .filter((record) => record.trim() !== '')
    .map((record) => {
      try {
        return JSON.parse(record);
      } catch (e) {
        return { unparsable: record, error: e.message };
      }
    });
}

export const ISO_UTC = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|\+00:00)$/;

// ---------------------------------------------------------------------------
// The server process
// ---------------------------------------------------------------------------

export class ServerProcess {
  constructor(proc, root, trace) {
    this.proc = proc;
    this.root = root;
    this.trace = trace; // the LD_PRELOAD trace file, or null
    this.log = '';
    this.exit = null; // {code, signal} once exited
    proc.stdout.setEncoding('utf8');
    proc.stderr.setEncoding('utf8');
    proc.stdout.on('data', (d) => (this.log += d));
    proc.stderr.on('data', (d) => (this.log += d));
    this.exited = new Promise((resolve) => {
      proc.on('exit', (code, signal) => {
        this.exit = { code, signal };
        resolve(this.exit);
      });
    });
    this.closed = once(proc, 'close'); // exit, and its pipes drained
  }
  get pid() {
    return this.proc.pid;
  }
  exitText() {
    if (!this.exit) return 'running';
    return this.exit.signal ? `signal ${this.exit.signal}` : `status ${this.exit.code}`;
  }
  logTail(lines = 25) {
    const all = this.log.trimEnd().split('\n');
    return `--- server log (pid ${this.pid}, ${this.exitText()}), last ${Math.min(lines, all.length)} lines:\n` +
      all.slice(-lines).map((l) => `  | ${l}`).join('\n');
  }
  states() {
    return this.trace ? readTrace(this.trace) : [];
  }
  signal(name) {
    if (!this.exit) this.proc.kill(name);
  }
  // Waits for the exit and its output (fails after `timeout` ms).
  async waitExit(timeout = 15000, what = 'the server to exit') {
    await within(timeout, this.closed, what);
    return this.exit;
  }
  // The extension's stop(): SIGTERM, then SIGKILL if it has not exited after
  // `grace` ms, which here also fails the test.
  async stop(grace = 10000) {
    if (this.exit) return this.exit;
    this.signal('SIGTERM');
    try {
      await within(grace, this.closed, 'exit after SIGTERM');
    } catch (e) {
      this.signal('SIGKILL');
      await this.closed;
      fail(`the server did not exit within ${grace} ms of SIGTERM (killed)`, this);
    }
    return this.exit;
  }
}

// An environment like the extension's (process.env), without the settings
// that would change what the test means unless it sets them itself.
export function baseEnv(extra = {}) {
  const env = { ...process.env };
  for (const k of [
    'SERVER_PORT', 'SERVER_HOST', 'AGENTSMITHY_TOKEN', 'LOG_LEVEL', 'LOG_FORMAT', 'LOG_COLORS', 'LD_PRELOAD', 'STATUS_TRACE',
    'AGENTSMITHY_STORE', 'OPENAI_BASE_URL', 'AGENTSMITHY_MODEL',
  ]) {
    delete env[k];
  }
  return { ...env, ...extra };
}

// Spawns the server exactly as the extension does:
//   SERVER --workdir ROOT --ide vscode --no-log-colors
// with cwd = the binary's directory. `args` are appended (e.g. --port P);
// `trace` records every status.json write through the LD_PRELOAD shim.
export function launch(root, { args = [], env = {}, trace = false } = {}) {
  const fullEnv = baseEnv(env);
  let traceFile = null;
  if (trace) {
    if (!traceShim || !fs.existsSync(traceShim)) {
      fail(`the status.json write trace needs the shim (STATUS_TRACE_SO=${JSON.stringify(traceShim)}); run tests/ide/run.sh`);
    }
    traceFile = path.join(os.tmpdir(), `agentsmithy-ide-trace-${process.pid}-${Math.random().toString(36).slice(2)}`);
    cleanups.push(() => fsp.rm(traceFile, { force: true }));
    fullEnv.LD_PRELOAD = traceShim;
    fullEnv.STATUS_TRACE = traceFile;
    // A sanitized build would refuse a preloaded library listed before its runtime.
    fullEnv.ASAN_OPTIONS = [process.env.ASAN_OPTIONS, 'verify_asan_link_order=0'].filter(Boolean).join(':');
  }
  if (!fs.existsSync(serverPath)) fail(`no server binary at ${serverPath} (make, or set AGENTSMITHY_SERVER)`);
  const proc = spawn(serverPath, ['--workdir', root, '--ide', 'vscode', '--no-log-colors', ...args], {
    cwd: path.dirname(serverPath),
    env: fullEnv,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const server = new ServerProcess(proc, root, traceFile);
  cleanups.push(async () => {
    if (!server.exit) {
      server.signal('SIGKILL');
      await server.closed;
    }
  });
  return server;
}

// What the extension's waitForStatusFile() waits for: server_status "ready"
// with a numeric port and a server_pid other than the one status.json named
// before the launch. Also checks that the pid is the process we started.
export async function waitReady(server, { oldPid = null, timeout = 20000 } = {}) {
  const doc = await waitFor(
    () => {
      const s = readStatus(server.root);
      if (!s || s.server_status !== 'ready' || typeof s.port !== 'number') return null;
      if (oldPid !== null && s.server_pid === oldPid) return null;
      return s;
    },
    { timeout, what: `status.json to say "ready" with a port and a new server_pid (old ${oldPid})`, server },
  );
  check(doc.server_pid === server.pid, `status.json names server_pid ${doc.server_pid}, not the process started (${server.pid})`, server);
  // The trace shim records a write just after its rename: wait (bounded) for
  // the ready write to be recorded too, so a check of the trace cannot race it.
  if (server.trace) {
    await waitFor(
      () => {
        const states = server.states();
        return states.length > 0 && states[states.length - 1].server_status === 'ready';
      },
      { timeout: 5000, what: 'the trace to record the ready write', server },
    );
  }
  return doc;
}

// A pid that is certainly dead: a child that exited (and that libuv reaped).
export async function deadPid() {
  const child = spawn(process.execPath, ['-e', ''], { stdio: 'ignore' });
  const pid = child.pid;
  await once(child, 'exit');
  await waitFor(() => {
    try {
      process.kill(pid, 0);
      return false;
    } catch (e) {
      return e.code === 'ESRCH';
    }
  }, { timeout: 5000, what: `pid ${pid} to be reaped` });
  return pid;
}

// Listens on host:port (0: any); resolves to {port, close} or, when the port
// is taken already, to {port, close, taken: true}.
export function occupy(port, host = '127.0.0.1') {
  return new Promise((resolve, reject) => {
    const srv = net.createServer((socket) => socket.destroy());
    srv.once('error', (e) => {
      if (e.code === 'EADDRINUSE') resolve({ port, taken: true, close: async () => {} });
      else reject(e);
    });
    srv.listen({ port, host, exclusive: true }, () => {
      cleanups.push(() => new Promise((r) => srv.close(() => r())));
      resolve({ port: srv.address().port, close: () => new Promise((r) => srv.close(() => r())) });
    });
  });
}

// ---------------------------------------------------------------------------
// HTTP and SSE
// ---------------------------------------------------------------------------

export const base = (port) => `http://127.0.0.1:${port}`;

export async function getJson(port, p) {
  const res = await fetch(base(port) + p, { signal: AbortSignal.timeout(10000) });
  const text = await res.text();
  let body = null;
  try {
    body = JSON.parse(text);
  } catch {
    // left null
  }
  return { status: res.status, headers: res.headers, body, text };
}

// A REST call as the extension's ApiService makes it: Accept:
// application/json and, with a JSON body, Content-Type: application/json.
export async function apiRequest(port, method, p, body) {
  const headers = { Accept: 'application/json' };
  const init = { method, headers, signal: AbortSignal.timeout(10000) };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const res = await fetch(base(port) + p, init);
  const text = await res.text();
  let parsed = null;
  try {
    parsed = JSON.parse(text);
  } catch {
    // left null
  }
  return { status: res.status, headers: res.headers, body: parsed, text };
}

export function chatBody(query, extra = {}) {
  return JSON.stringify({ messages: [{ role: 'user', content: query }], stream: true, ...extra });
}

// Opens a stream with fetch as the extension's StreamService does. For an
// answer other than 200 there is no reader; `text` holds its body.
// `headers` are added to (or override) the defaults.
export async function openStream(port, { method = 'POST', query = 'Hello', body, search = '', headers = {} } = {}) {
  const init = {
    method,
    headers: { Accept: 'text/event-stream', ...(method === 'POST' ? { 'Content-Type': 'application/json' } : {}), ...headers },
  };
  if (method === 'POST') init.body = body ?? chatBody(query);
  const res = await fetch(base(port) + '/api/chat' + search, init);
  if (res.status !== 200) return { res, reader: null, text: await res.text() };
  return { res, reader: new SseReader(res.body.getReader()) };
}

// Splits a fetch body into SSE events (the JSON of each `data:` line).
export class SseReader {
  constructor(reader) {
    this.reader = reader;
    this.decoder = new TextDecoder();
    this.buffer = '';
    this.queue = [];
    this.events = [];
    this.ended = false; // the body ended cleanly (read() gave done: true)
  }
  // The next event; null at a clean end. A cut connection rejects, as the
  // underlying reader.read() does.
  async next() {
    for (;;) {
      if (this.queue.length) return this.queue.shift();
      if (this.ended) return null;
      const { value, done } = await this.reader.read();
      if (done) {
        this.ended = true;
        continue;
      }
      this.buffer += this.decoder.decode(value, { stream: true });
      let cut;
      while ((cut = this.buffer.indexOf('\n\n')) >= 0) {
        const block = this.buffer.slice(0, cut);
        this.buffer = this.buffer.slice(cut + 2);
        const data = block.split('\n').filter((l) => l.startsWith('data:')).map((l) => l.slice(5).replace(/^ /, '')).join('\n');
        if (data === '') continue; // a comment (": ping")
        let event;
        try {
          event = JSON.parse(data);
        } catch {
          event = { unparsable: data };
        }
        this.events.push(event);
        this.queue.push(event);
      }
    }
  }
  // Reads to the end; resolves to the events, rejects if the body was cut.
  async all() {
    while ((await this.next()) !== null) {
      // collect
    }
    return this.events;
  }
  // Reads until an event satisfies pred; returns it (fails at a clean end).
  async until(pred, what) {
    for (;;) {
      const e = await this.next();
      if (e === null) fail(`the stream ended before ${what}; events: ${JSON.stringify(this.events).slice(0, 500)}`);
      if (pred(e)) return e;
    }
  }
}

// A raw HTTP/1.1 request (node:http, one connection) to see the response
// head as sent: status and headers, and the body text.
export function rawRequest(port, { method = 'GET', path: p = '/', headers = {}, body } = {}) {
  return new Promise((resolve, reject) => {
    const agent = new http.Agent({ keepAlive: false });
    const req = http.request({ host: '127.0.0.1', port, method, path: p, headers, agent, timeout: 15000 }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (d) => (text += d));
      res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, rawHeaders: res.rawHeaders, text }));
      res.on('error', reject);
    });
    req.on('timeout', () => req.destroy(new Error('raw request timed out')));
    req.on('error', reject);
    if (body) req.write(body);
    req.end();
  });
}
