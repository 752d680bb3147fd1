'use strict';
// Helpers for the browser tests: the real server as a child process, a counting reverse proxy,
// a static origin, and headless Chromium through puppeteer-core. Nothing here sleeps in place
// of a condition: every wait is on an event (a log line, a request, a DOM state) with a bound.

const {spawn} = require('node:child_process');
const {EventEmitter} = require('node:events');
const fs = require('node:fs');
const http = require('node:http');
const os = require('node:os');
const path = require('node:path');

const ROOT = path.resolve(__dirname, '..', '..');
const SERVER_BIN = path.resolve(ROOT, process.env.AGENTSMITHY_SERVER || 'build/agentsmithy-server');
const CHROMIUM = process.env.CHROMIUM_BIN || '/usr/bin/chromium';
const CHAT_PAGE = path.join(ROOT, 'examples', 'chat.html');
const ARTIFACTS = path.resolve(ROOT, process.env.BROWSER_ARTIFACTS || 'build/browser');
// Before the server embeds the page, tests can be pointed at the file on disk.
const PAGE_FROM_DISK = process.env.AGENTSMITHY_CHAT_PAGE_FROM_DISK === '1';

// Resolves when pred() is truthy, re-checking on every `emitter` 'change'; rejects after ms.
function until(emitter, pred, ms, what) {
  return new Promise((resolve, reject) => {
    const check = () => {
      let v;
      try { v = pred(); } catch (e) { done(); reject(e); return; }
      if (v) { done(); resolve(v); }
    };
    const timer = setTimeout(() => { done(); reject(new Error(`timed out after ${ms} ms waiting for ${what}`)); }, ms);
    const done = () => { clearTimeout(timer); emitter.off('change', check); };
    emitter.on('change', check);
    check();
  });
}

// ---- the server under test ---------------------------------------------------------------
// Starts build/agentsmithy-server on a free port with a fresh --workdir and --log-level debug.
async function startServer({args = [], env = {}} = {}) {
  if (!fs.existsSync(SERVER_BIN)) throw new Error(`${SERVER_BIN} is missing: run make build/agentsmithy-server`);
  const workdir = fs.mkdtempSync(path.join(os.tmpdir(), 'agentsmithy-browser-'));
  const childEnv = {...process.env};
  // Settings from the caller's environment must not leak into a test's server.
  for (const k of ['AGENTSMITHY_TOKEN', 'AGENTSMITHY_CORS_ORIGINS', 'SERVER_HOST', 'SERVER_PORT',
                   'LOG_LEVEL', 'LOG_FORMAT']) delete childEnv[k];
  Object.assign(childEnv, env);
  const proc = spawn(SERVER_BIN, ['--workdir', workdir, '--port', '0', '--log-level', 'debug', ...args],
                     {env: childEnv, stdio: ['ignore', 'pipe', 'pipe']});
  const s = new EventEmitter();
  s.setMaxListeners(100);
  s.proc = proc;
  s.workdir = workdir;
  s.lines = [];
  s.exit = null;
  let partial = '';
  const onData = (chunk) => {
    partial += chunk.toString('utf8');
    const parts = partial.split('\n');
    partial = parts.pop();
    for (const l of parts) s.lines.push(l);
    s.emit('change');
  };
  proc.stdout.on('data', onData);
  proc.stderr.on('data', onData);
  s.exited = new Promise((resolve) => proc.on('exit', (code, signal) => {
    if (partial) s.lines.push(partial);
    s.exit = {code, signal};
    s.emit('change');
    resolve(s.exit);
  }));
  s.log = () => s.lines.join('\n');
  s.count = (re) => s.lines.filter((l) => re.test(l)).length;
  s.waitForLog = (re, ms = 10000) => until(s, () => s.lines.find((l) => re.test(l)), ms, `server log ${re}`);
  s.signal = (sig) => proc.kill(sig);
  s.stop = async () => {
    if (!s.exit) { proc.kill('SIGTERM'); }
    const timer = setTimeout(() => { if (!s.exit) proc.kill('SIGKILL'); }, 10000);
    await s.exited;
    clearTimeout(timer);
    fs.rmSync(workdir, {recursive: true, force: true});
  };
  try {
    const ready = await until(s, () => s.exit || s.lines.find((l) => /ready on \S+:\d+/.test(l)), 15000,
                              'the server to log "ready on HOST:PORT"');
    if (s.exit) throw new Error(`server exited ${JSON.stringify(s.exit)} before ready:\n${s.log()}`);
    s.port = Number(/ready on \S+:(\d+)/.exec(ready)[1]);
  } catch (e) {
    await s.stop();
    throw e;
  }
  s.url = `http://127.0.0.1:${s.port}`;
  return s;
}

// ---- a counting reverse proxy / static origin ---------------------------------------------
// Forwards every request to 127.0.0.1:upstreamPort (Host rewritten, bytes streamed as they
// come) and records it: method, url, headers, status, response text. `pages` maps a path to
// an HTML string served by the proxy itself (not forwarded, recorded with local: true). With no
// upstreamPort it is just a static origin.
async function startProxy({upstreamPort = null, pages = {}} = {}) {
  const p = new EventEmitter();
  p.setMaxListeners(100);
  p.requests = [];
  const sockets = new Set();
  const server = http.createServer((req, res) => {
    const pathname = req.url.split('?')[0];
    const entry = {method: req.method, url: req.url, path: pathname, headers: req.headers,
                   status: null, resHeaders: null, body: '', ended: false, local: false};
    p.requests.push(entry);
    const page = pages[pathname];
    if (page !== undefined && (req.method === 'GET' || req.method === 'HEAD')) {
      entry.local = true;
      entry.status = 200;
      res.writeHead(200, {'Content-Type': 'text/html; charset=utf-8', 'Cache-Control': 'no-store'});
      res.end(typeof page === 'function' ? page() : page);
      entry.ended = true;
      p.emit('change');
      return;
    }
    if (!upstreamPort) {
      entry.local = true;
      entry.status = 404;
      res.writeHead(404, {'Content-Type': 'text/plain'});
      res.end('not found');
      entry.ended = true;
      p.emit('change');
      return;
    }
    const headers = {...req.headers, host: `127.0.0.1:${upstreamPort}`};
    const up = http.request({host: '127.0.0.1', port: upstreamPort, method: req.method, path: req.url,
                             headers, agent: false}, (upRes) => {
      entry.status = upRes.statusCode;
      entry.resHeaders = upRes.headers;
      res.writeHead(upRes.statusCode, upRes.headers);
      res.flushHeaders();
      p.emit('change');
      upRes.on('data', (c) => {
        if (entry.body.length < 4 * 1024 * 1024) entry.body += c.toString('utf8');
        res.write(c);
        p.emit('change');
      });
      upRes.on('end', () => { entry.ended = true; res.end(); p.emit('change'); });
      upRes.on('error', (e) => { entry.error = e.message; res.destroy(); p.emit('change'); });
      upRes.on('aborted', () => { entry.error = 'aborted'; res.destroy(); p.emit('change'); });
    });
    up.on('error', (e) => {
      entry.error = e.message;
      if (entry.status === null) entry.status = 502;
      if (!res.headersSent) { res.writeHead(502, {'Content-Type': 'text/plain'}); res.end(e.message); } else res.destroy();
      p.emit('change');
    });
    res.on('close', () => { if (!entry.ended) up.destroy(); });  // the browser went away
    req.pipe(up);
  });
  server.on('connection', (sock) => { sock.setNoDelay(true); sockets.add(sock); sock.on('close', () => sockets.delete(sock)); });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  p.port = server.address().port;
  p.url = `http://127.0.0.1:${p.port}`;
  p.origin = p.url;
  p.api = (method) => p.requests.filter((r) => r.path === '/api/chat' && (!method || r.method === method));
  p.waitFor = (pred, ms, what) => until(p, pred, ms, what);
  p.close = () => new Promise((resolve) => { for (const s of sockets) s.destroy(); server.close(() => resolve()); });
  return p;
}

// ---- the browser ---------------------------------------------------------------------------
async function launchBrowser() {
  const puppeteer = require('puppeteer-core');
  return puppeteer.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--disable-quic', '--no-first-run',
           '--no-default-browser-check', '--disable-background-networking', '--disable-component-update',
           '--disable-sync', '--disable-extensions', '--window-size=1000,800'],
    defaultViewport: {width: 1000, height: 800},
    protocolTimeout: 60000,
  });
}

// A page in its own browser context (no shared cache or cookies), with its console recorded.
async function newPage(browser) {
  const context = await browser.createBrowserContext();
  const page = await context.newPage();
  page.consoleMessages = [];
  // url: where it came from (for a failed request, the request's URL).
  page.on('console', (m) => page.consoleMessages.push({type: m.type(), text: m.text(), url: (m.location() || {}).url || ''}));
  page.on('pageerror', (e) => page.consoleMessages.push({type: 'pageerror', text: String(e && e.message || e)}));
  page.consoleErrors = () => page.consoleMessages.filter((m) => m.type === 'error' || m.type === 'pageerror');
  page.closeAll = () => context.close().catch(() => {});
  return page;
}

// Opens the chat page the server serves at GET / (or examples/chat.html from disk, answered
// for that one URL by request interception, with AGENTSMITHY_CHAT_PAGE_FROM_DISK=1).
async function openChatPage(page, baseUrl) {
  const url = baseUrl + '/';
  if (PAGE_FROM_DISK) {
    await page.setRequestInterception(true);
    page.on('request', (r) => {
      if (r.url() === url && r.method() === 'GET') {
        r.respond({status: 200, contentType: 'text/html; charset=utf-8', body: fs.readFileSync(CHAT_PAGE, 'utf8')});
      } else {
        r.continue();
      }
    });
  }
  const res = await page.goto(url, {waitUntil: 'load'});
  if (!res || res.status() !== 200) throw new Error(`GET ${url} answered ${res && res.status()}`);
  await page.waitForSelector('#chat-form');
}

// Fills the composer and sends. opts: transport ('fetch'|'eventsource'), token, context, serverUrl.
async function ask(page, message, opts = {}) {
  await page.evaluate((message, opts) => {
    document.getElementById('transport-' + (opts.transport || 'fetch')).checked = true;
    document.getElementById('token').value = opts.token || '';
    document.getElementById('context').value = opts.context ? JSON.stringify(opts.context) : '';
    document.getElementById('server-url').value = opts.serverUrl || '';
  }, message, opts);
  await page.click('#message');
  await page.type('#message', message);
  await page.click('#send');
}

// Resolves with the last turn's state once it is no longer "streaming".
async function turnEnded(page, ms = 20000) {
  await page.waitForFunction(() => {
    const t = document.querySelector('#transcript .turn:last-of-type');
    return t && t.dataset.state !== 'streaming';
  }, {timeout: ms});
  return lastTurn(page);
}

function lastTurn(page) {
  return page.evaluate(() => {
    const t = document.querySelector('#transcript .turn:last-of-type');
    if (!t) return null;
    const q = (sel) => Array.from(t.querySelectorAll(sel));
    return {
      state: t.dataset.state, transport: t.dataset.transport, events: Number(t.dataset.events),
      chunks: Number(t.dataset.chunks), shutdown: t.dataset.shutdown === 'true', dialogId: t.dataset.dialogId || '',
      content: t.querySelector('[data-role=content]').textContent,
      reasoning: t.querySelector('[data-role=reasoning]').hidden ? null : t.querySelector('[data-role=reasoning-text]').textContent,
      toolCalls: q('[data-role=tool-call]').map((c) => ({name: c.dataset.name, args: c.querySelector('[data-role=tool-args]').textContent})),
      notices: q('[data-role=notice]').map((n) => ({kind: n.dataset.kind, code: n.dataset.code, text: n.textContent})),
      ended: q('[data-role=end]').length,
      status: {state: document.getElementById('status').dataset.state, text: document.getElementById('status').textContent},
    };
  });
}

// What the page shows of its dialogs: the list (newest first), the transcript's dialog and
// its turns (from the history or streamed live), and the last dialog error. Runs in the page.
function dialogSnapshot() {
  const list = document.getElementById('dialogs');
  const tr = document.getElementById('transcript');
  const error = document.getElementById('dialogs-error');
  return {
    state: list.dataset.state,
    dialogs: Array.from(document.querySelectorAll('#dialog-list > li')).map((li) => {
      const title = li.querySelector('[data-role=title]');
      return {id: li.dataset.dialogId, current: li.dataset.current === 'true', title: title.textContent,
              untitled: title.dataset.untitled === 'true'};
    }),
    error: error.hidden ? null : error.textContent,
    dialogId: tr.dataset.dialogId || null,
    history: tr.dataset.history,
    loadEarlier: !!document.getElementById('load-earlier'),
    empty: !!document.getElementById('empty'),
    turns: Array.from(tr.querySelectorAll('.turn')).map((t) => {
      const reasoning = t.querySelector('[data-role=reasoning]');
      return {
        source: t.dataset.source || 'live', state: t.dataset.state, outcome: t.dataset.outcome || null,
        user: t.querySelector('[data-role=user]') ? t.querySelector('[data-role=user]').textContent : null,
        content: t.querySelector('[data-role=content]').textContent,
        reasoning: reasoning.hidden ? null : reasoning.querySelector('[data-role=reasoning-text]').textContent,
        toolCalls: Array.from(t.querySelectorAll('[data-role=tool-call]')).map((c) => ({
          name: c.dataset.name, args: JSON.parse(c.querySelector('[data-role=tool-args]').textContent)})),
        notices: Array.from(t.querySelectorAll('[data-role=notice]')).map((n) => ({kind: n.dataset.kind, text: n.textContent})),
      };
    }),
  };
}

function dialogView(page) {
  return page.evaluate(dialogSnapshot);
}

// Resolves with the dialog view once pred(view, arg) holds, checked in the page on every frame:
// pred runs there, so it sees only its arguments (arg: anything JSON).
async function waitForView(page, pred, {arg = null, ms = 20000, what = 'the dialog view'} = {}) {
  try {
    await page.waitForFunction(`(${pred})((${dialogSnapshot})(), ${JSON.stringify(arg)})`, {timeout: ms});
  } catch (e) {
    let view;
    try { view = await dialogView(page); } catch (_) { view = '(page gone)'; }
    throw new Error(`${e.message}: waiting for ${what}; the page shows ${JSON.stringify(view)}`);
  }
  return dialogView(page);
}

async function screenshot(page, name) {
  fs.mkdirSync(ARTIFACTS, {recursive: true});
  const file = path.join(ARTIFACTS, name);
  await page.screenshot({path: file, fullPage: false});
  return file;
}

// The events of an SSE response body, as EventSource would parse them (for checks on the wire).
function parseSse(text) {
  const events = [];
  let cur = {data: [], id: null, retry: null};
  for (const line of text.split(/\r\n|\r|\n/)) {
    if (line === '') {
      if (cur.data.length || cur.retry !== null || cur.id !== null) events.push({...cur, data: cur.data.join('\n')});
      cur = {data: [], id: null, retry: null};
      continue;
    }
    if (line.startsWith(':')) continue;
    const i = line.indexOf(':');
    const field = i < 0 ? line : line.slice(0, i);
    let value = i < 0 ? '' : line.slice(i + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'data') cur.data.push(value);
    else if (field === 'id') cur.id = value;
    else if (field === 'retry') cur.retry = value;
  }
  return events;
}

module.exports = {ROOT, SERVER_BIN, CHAT_PAGE, ARTIFACTS, PAGE_FROM_DISK, until, startServer, startProxy,
                  launchBrowser, newPage, openChatPage, ask, turnEnded, lastTurn, screenshot, parseSse,
                  dialogView, waitForView};
