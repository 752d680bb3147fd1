// tests/ide/ide.test.mjs - build/agentsmithy-server as the AgentSmithy VS Code
// extension sees it: launched with its argv, watched through status.json,
// stopped with SIGTERM, its /health read, its streams read with Node's
// fetch, and the chat panel's dialog flows replayed against its default
// SQLite store. `node tests/ide/ide.test.mjs [name-substring...]`; prints one
// "ok"/"not ok" line per test and "# summary: N passed, M failed".
import {
  ISO_UTC, TestError, apiRequest, check, cleanupAll, deadPid, fail, getJson, launch, makeRoot, occupy,
  openStream, rawRequest, readStatus, readStatusStrict, serverPath, statusPath, storePath, waitFor,
  waitReady, watchStatus, within, writeStatus,
} from './lib.mjs';
import fs from 'node:fs';
import path from 'node:path';

const tests = [];
const test = (name, fn, timeout = 60000) => tests.push({ name, fn, timeout });

const QUERY = 'Hello from the IDE test: ünïcode 🚀 and "quotes"\nsecond line';
const LONG = 'Tell me a long story';
const SHUTDOWN_ERROR = 'Server is shutting down (graceful shutdown)';

// Checks the server wrote exactly these states, in order, one write each.
function checkStates(server, expected) {
  const states = server.states();
  const names = states.map((s) => s.server_status);
  check(JSON.stringify(names) === JSON.stringify(expected),
    `status.json writes: ${JSON.stringify(names)}, expected ${JSON.stringify(expected)}\n` +
    `(trace: ${JSON.stringify(states).slice(0, 1500)})`, server);
  let last = '';
  for (const s of states) {
    check(ISO_UTC.test(s.server_updated_at ?? ''), `server_updated_at not ISO 8601 UTC in ${JSON.stringify(s)}`, server);
    check(s.server_updated_at >= last, `server_updated_at went back: ${s.server_updated_at} after ${last}`, server);
    last = s.server_updated_at;
  }
  return states;
}

// A fresh ROOT, the server launched for it, and, once it is ready, a POST
// /api/chat stream asking `query`.
async function serverWithStream(query) {
  const root = await makeRoot();
  const server = launch(root);
  const { port } = await waitReady(server);
  const { reader, res, text } = await openStream(port, { query });
  check(reader, `POST /api/chat: ${res.status} ${text}`, server);
  return { root, server, reader };
}

// ---------------------------------------------------------------------------
// Launch and status.json
// ---------------------------------------------------------------------------

test('launch: the extension argv starts it; status.json goes starting, ready, stopping, stopped', async () => {
  const root = await makeRoot();
  const watch = watchStatus(root);
  const server = launch(root, { trace: true });
  const ready = await waitReady(server);
  check(ISO_UTC.test(ready.server_started_at ?? ''), `server_started_at: ${ready.server_started_at}`, server);
  const health = await getJson(ready.port, '/health');
  check(health.status === 200 && health.body?.pid === server.pid,
    `/health on the port status.json names (${ready.port}): ${health.status} ${health.text}`, server);

  const exit = await server.stop();
  await watch.stop();
  check(exit.code === 0, `exit after SIGTERM: ${server.exitText()}, expected status 0`, server);

  const final = readStatusStrict(root);
  check(final.doc, `status.json after exit: ${final.error}`, server);
  check(final.doc.server_status === 'stopped', `final server_status ${final.doc.server_status}, expected stopped`, server);
  for (const gone of ['server_pid', 'port']) {
    check(!(gone in final.doc), `${gone} still in status.json after stopped: ${final.text}`, server);
  }
  check(ISO_UTC.test(final.doc.server_updated_at ?? ''), `server_updated_at: ${final.doc.server_updated_at}`, server);
  check(watch.torn.length === 0, `a reader saw a partial status.json ${watch.torn.length} times of ${watch.reads}: ${watch.torn[0]}`, server);

  const states = checkStates(server, ['starting', 'ready', 'stopping', 'stopped']);
  for (const s of states.slice(0, 3)) {
    check(s.server_pid === server.pid, `${s.server_status} names server_pid ${s.server_pid}, not ${server.pid}`, server);
  }
  for (const s of states.slice(1, 3)) {
    check(s.port === ready.port, `${s.server_status} names port ${s.port}, not ${ready.port}`, server);
  }
  check(states[0].server_started_at === ready.server_started_at, 'server_started_at changed after starting', server);

  check(!server.log.includes('\x1b['), `the log has ANSI colour codes with --no-log-colors and a pipe:\n${JSON.stringify(server.log.slice(0, 300))}`, server);
  check(/vscode/.test(server.log), 'the log does not mention the IDE (--ide vscode)', server);
  return `states seen by polling: ${watch.seen.join(' → ')}; ${watch.reads} reads`;
});

test('/health: config_valid true, config_errors null, ide "vscode", and the status fields', async () => {
  const root = await makeRoot();
  const server = launch(root);
  const ready = await waitReady(server);
  const { status, body, text } = await getJson(ready.port, '/health');
  check(status === 200 && body, `/health: ${status} ${text}`, server);
  check(body.config_valid === true, `config_valid: ${JSON.stringify(body.config_valid)} (${text})`, server);
  check('config_errors' in body && body.config_errors === null, `config_errors: ${JSON.stringify(body.config_errors)} (${text})`, server);
  check(body.ide === 'vscode', `ide: ${JSON.stringify(body.ide)} (${text})`, server);
  check(body.status === 'ok', `status: ${JSON.stringify(body.status)}`, server);
  check(body.server_status === 'ready', `server_status: ${JSON.stringify(body.server_status)}`, server);
  check(body.pid === server.pid, `pid: ${body.pid}, expected ${server.pid}`, server);
  check(body.port === ready.port, `port: ${body.port}, expected ${ready.port}`, server);
  check(body.active_streams === 0, `active_streams: ${JSON.stringify(body.active_streams)}`, server);
  await server.stop();
});

test('a second server for the same ROOT exits 1 naming the first one\'s port and pid, touching nothing', async () => {
  const root = await makeRoot();
  const first = launch(root);
  const ready = await waitReady(first);
  const before = fs.readFileSync(statusPath(root), 'utf8');

  const second = launch(root, { trace: true });
  const exit = await second.waitExit(15000, 'the second server to exit');
  check(exit.code === 1, `second server: ${second.exitText()}, expected status 1`, second);
  check(second.log.includes(String(ready.port)), `the refusal does not name port ${ready.port}`, second);
  check(second.log.includes(String(first.pid)), `the refusal does not name pid ${first.pid}`, second);
  check(second.states().length === 0, `the refused server wrote status.json: ${JSON.stringify(second.states())}`, second);
  check(fs.readFileSync(statusPath(root), 'utf8') === before, 'status.json changed after the refusal', second);

  const health = await getJson(ready.port, '/health');
  check(health.body?.pid === first.pid, `the first server is not serving any more: ${health.text}`, first);
  const exitFirst = await first.stop();
  check(exitFirst.code === 0, `first server: ${first.exitText()}`, first);
  check(readStatus(root)?.server_status === 'stopped', 'first server did not end stopped', first);
});

test('a stale status.json naming a dead pid as ready is marked crashed, then the new server starts', async () => {
  const root = await makeRoot();
  const dead = await deadPid();
  writeStatus(root, {
    server_status: 'ready', server_pid: dead, port: 8765,
    server_started_at: '2026-01-01T00:00:00.000000+00:00', server_updated_at: '2026-01-01T00:00:00.000000+00:00',
    scan_status: 'done', scan_progress: 100, scan_task_id: 'abc', error: null,
  });
  const server = launch(root, { trace: true });
  const ready = await waitReady(server, { oldPid: dead });
  const states = server.states();
  check(states.length >= 3, `status.json writes: ${JSON.stringify(states.map((s) => s.server_status))}`, server);
  const [crashed, starting] = states;
  check(crashed.server_status === 'crashed', `first write: ${JSON.stringify(crashed)}, expected crashed`, server);
  check(!('server_pid' in crashed) && !('port' in crashed), `crashed keeps pid/port: ${JSON.stringify(crashed)}`, server);
  check(typeof crashed.server_error === 'string' && crashed.server_error.includes(String(dead)),
    `crashed server_error does not name pid ${dead}: ${JSON.stringify(crashed.server_error)}`, server);
  check(starting.server_status === 'starting' && starting.server_pid === server.pid, `second write: ${JSON.stringify(starting)}`, server);
  checkStates(server, ['crashed', 'starting', 'ready']);
  for (const [k, v] of Object.entries({ scan_status: 'done', scan_progress: 100, scan_task_id: 'abc', error: null })) {
    check(k in ready && ready[k] === v, `foreign field ${k} not kept: ${JSON.stringify(ready[k])}`, server);
  }
  check(!('server_error' in ready), `ready still has server_error: ${ready.server_error}`, server);
  await server.stop();
});

test('a server killed with SIGKILL leaves ready behind; the next launch marks it crashed and starts', async () => {
  const root = await makeRoot();
  const first = launch(root);
  await waitReady(first);
  first.signal('SIGKILL');
  await first.waitExit();
  const left = readStatus(root);
  check(left?.server_status === 'ready' && left.server_pid === first.pid, `after SIGKILL: ${JSON.stringify(left)}`);

  const second = launch(root, { trace: true });
  await waitReady(second, { oldPid: first.pid });
  const [crashed] = checkStates(second, ['crashed', 'starting', 'ready']);
  check(crashed.server_error?.includes(String(first.pid)), `crashed server_error: ${JSON.stringify(crashed.server_error)}`, second);
  await second.stop();
  check(readStatus(root)?.server_status === 'stopped', 'did not end stopped', second);
});

// ---------------------------------------------------------------------------
// Ports
// ---------------------------------------------------------------------------

async function checkTakenPort({ args = [], env = {}, how }) {
  const root = await makeRoot();
  const taken = await occupy(0);
  const server = launch(root, { args: args.map((a) => a.replace('PORT', String(taken.port))), env: Object.fromEntries(Object.entries(env).map(([k, v]) => [k, v.replace('PORT', String(taken.port))])) });
  const exit = await server.waitExit(15000, `the server to exit when ${how} ${taken.port} is taken`);
  check(exit.code === 1, `${how} ${taken.port} taken: ${server.exitText()}, expected status 1`, server);
  check(server.log.includes(String(taken.port)), `the message does not name port ${taken.port}`, server);
  const s = readStatusStrict(root);
  check(s.doc, `status.json after the failed start: ${s.error}`, server);
  check(s.doc.server_status === 'error', `server_status ${s.doc.server_status}, expected error`, server);
  check(String(s.doc.server_error ?? '').includes(String(taken.port)), `server_error does not name the port: ${JSON.stringify(s.doc.server_error)}`, server);
  check(!('server_pid' in s.doc) && !('port' in s.doc), `error keeps pid/port: ${s.text}`, server);
}

test('an explicit --port that is taken: exit 1 naming the port, status.json says error', () =>
  checkTakenPort({ args: ['--port', 'PORT'], how: '--port' }));

test('a SERVER_PORT that is taken: exit 1 naming the port, status.json says error', () =>
  checkTakenPort({ env: { SERVER_PORT: 'PORT' }, how: 'SERVER_PORT' }));

test('no --port and no SERVER_PORT with 8765 taken: the next free port, named in status.json and the log', async () => {
  const root = await makeRoot();
  const held = await occupy(8765); // taken by us, or by someone else already: either way taken
  const server = launch(root);
  const ready = await waitReady(server);
  check(ready.port > 8765 && ready.port < 8765 + 200, `port ${ready.port}, expected 8766..8964`, server);
  const health = await getJson(ready.port, '/health');
  check(health.body?.pid === server.pid, `/health on ${ready.port}: ${health.text}`, server);
  check(server.log.includes(String(ready.port)), `the log does not say port ${ready.port}`, server);
  await server.stop();
  await held.close();
  return held.taken ? '8765 was taken by another process already' : '8765 held by the test';
});

// ---------------------------------------------------------------------------
// Streams
// ---------------------------------------------------------------------------

function checkUserFirst(events, query, server) {
  check(events.length >= 2, `events: ${JSON.stringify(events)}`, server);
  const [user] = events;
  check(user.type === 'user', `first event: ${JSON.stringify(user)}, expected type "user"`, server);
  check(user.content === query, `user content ${JSON.stringify(user.content)}, expected ${JSON.stringify(query)}`, server);
  check(typeof user.dialog_id === 'string' && user.dialog_id !== '', `user event dialog_id: ${JSON.stringify(user.dialog_id)}`, server);
  for (const e of events) {
    check(e.dialog_id === user.dialog_id, `event with another dialog_id: ${JSON.stringify(e)}`, server);
  }
  check(events.filter((e) => e.type === 'user').length === 1, 'more than one user event', server);
  check(events[events.length - 1].type === 'done', `last event: ${JSON.stringify(events[events.length - 1])}`, server);
}

test('POST /api/chat: the first event is {"type":"user","content":<the query>}', async () => {
  const root = await makeRoot();
  const server = launch(root);
  const { port } = await waitReady(server);
  const { res, reader, text } = await openStream(port, { query: QUERY });
  check(res.status === 200, `POST /api/chat: ${res.status} ${text ?? ''}`, server);
  checkUserFirst(await within(20000, reader.all(), 'the POST stream'), QUERY, server);

  // The last user message of a conversation is the query.
  const convo = JSON.stringify({
    messages: [{ role: 'user', content: 'first' }, { role: 'assistant', content: 'reply' }, { role: 'user', content: 'second' }],
    stream: true,
  });
  const again = await openStream(port, { body: convo });
  check(again.reader, `POST /api/chat (conversation): ${again.res.status} ${again.text}`, server);
  checkUserFirst(await within(20000, again.reader.all(), 'the conversation stream'), 'second', server);

  // As sent on the wire: an event stream, and no "Connection: close".
  const raw = await rawRequest(port, {
    method: 'POST', path: '/api/chat', body: convo,
    headers: { 'Content-Type': 'application/json', Accept: 'text/event-stream', Connection: 'keep-alive' },
  });
  check(raw.status === 200 && /text\/event-stream/.test(raw.headers['content-type'] ?? ''), `raw: ${raw.status} ${JSON.stringify(raw.headers)}`, server);
  check(!/close/i.test(raw.headers.connection ?? ''), `stream answer says Connection: ${raw.headers.connection}`, server);
  await server.stop();
});

test('GET /api/chat?message=...: the first event is {"type":"user","content":<the query>}', async () => {
  const root = await makeRoot();
  const server = launch(root);
  const { port } = await waitReady(server);
  const { res, reader, text } = await openStream(port, { method: 'GET', search: '?message=' + encodeURIComponent(QUERY) });
  check(res.status === 200, `GET /api/chat?message=...: ${res.status} ${text ?? ''}`, server);
  checkUserFirst(await within(20000, reader.all(), 'the GET stream'), QUERY, server);
  await server.stop();
});

test('fetch: a complete stream ends cleanly (done: true right after the done event)', async () => {
  const { server, reader } = await serverWithStream(QUERY);
  let events;
  try {
    events = await within(20000, reader.all(), 'the complete stream');
  } catch (e) {
    fail(`a complete stream threw from the reader: ${e.message} ${e.cause?.message ?? ''}`, server);
  }
  check(reader.ended, 'the reader did not report done: true', server);
  check(events[events.length - 1]?.type === 'done' && events[events.length - 1].done === true,
    `last event before the end: ${JSON.stringify(events[events.length - 1])}`, server);
  check(!events.some((e) => e.type === 'error'), `error event in a complete stream: ${JSON.stringify(events)}`, server);
  await server.stop();
});

test('fetch: a server killed with SIGKILL mid-stream surfaces as an error thrown from the reader', async () => {
  const { server, reader } = await serverWithStream(LONG);
  await within(20000, reader.until((e) => e.type === 'chat', 'a chat event'), 'the first chat event');
  await within(20000, reader.until((e) => e.type === 'chat', 'a second chat event'), 'a second chat event');
  server.signal('SIGKILL');
  await server.waitExit();
  let thrown = null;
  try {
    await within(15000, reader.all(), 'the reader after SIGKILL');
  } catch (e) {
    if (e instanceof TestError) throw e;
    thrown = e;
  }
  check(!reader.events.some((e) => e.type === 'done'), 'a done event after SIGKILL?', server);
  check(thrown !== null, `the cut stream ended like a complete one (read() gave done: true after ${reader.events.length} events, no done event): a crash looks like an end`, server);
  return `reader.read() rejected: ${thrown.name}: ${thrown.message}${thrown.cause ? ` (cause: ${thrown.cause.code ?? thrown.cause.message})` : ''}`;
});

test('SIGTERM mid-stream: the shutdown error, then done, then a clean end; exit 0; status.json stopped', async () => {
  const { root, server, reader } = await serverWithStream(LONG);
  await within(20000, reader.until((e) => e.type === 'chat', 'a chat event'), 'the first chat event');
  server.signal('SIGTERM');
  let events;
  try {
    events = await within(15000, reader.all(), 'the stream after SIGTERM');
  } catch (e) {
    fail(`the stream was cut at the graceful shutdown: ${e.message}`, server);
  }
  const n = events.length;
  check(n >= 2 && events[n - 1].type === 'done', `last event: ${JSON.stringify(events[n - 1])}`, server);
  const err = events[n - 2];
  check(err.type === 'error' && err.code === 'shutdown' && err.error === SHUTDOWN_ERROR,
    `event before done: ${JSON.stringify(err)}, expected {"type":"error","error":"${SHUTDOWN_ERROR}","code":"shutdown"}`, server);
  const exit = await server.waitExit();
  check(exit.code === 0, `exit: ${server.exitText()}`, server);
  check(readStatus(root)?.server_status === 'stopped', `status.json: ${JSON.stringify(readStatus(root))}`, server);
});

// ---------------------------------------------------------------------------
// Dialogs: the chat panel's flows, replayed as the extension makes them
// (chatWebviewProvider.ts, ApiService.ts; agentsmithy-dialogs-api.md §1, §2,
// §4): its requests, in its order, with its headers, against the default
// store (no store flags: SQLite in ROOT/.agentsmithy/agentsmithy.sqlite3).
// ---------------------------------------------------------------------------

const DIALOG_ID = /^[A-Za-z0-9_-]{1,128}$/;
const PAGE = 20; // PAGINATION.DEFAULT_PAGE_SIZE: every history call sends ?limit=20
// The stream events after which the extension awaits GET .../session.
const SESSION_AFTER = new Set(['user', 'tool_call', 'file_edit', 'chat_end', 'reasoning_end', 'done']);

// Orders two timestamps: as strings when they have the same shape.
const stampCmp = (a, b) => (a.length === b.length ? (a < b ? -1 : a > b ? 1 : 0) : Date.parse(a) - Date.parse(b));

// A REST call the extension needs answered 200 with a JSON object: its body.
async function apiOk(server, port, method, p, body) {
  const what = `${method} ${p}${body === undefined ? '' : ` ${JSON.stringify(body)}`}`;
  const r = await apiRequest(port, method, p, body);
  check(r.status === 200, `${what}: ${r.status} ${r.text}`, server);
  check(r.body !== null && typeof r.body === 'object' && !Array.isArray(r.body), `${what}: not a JSON object: ${r.text}`, server);
  check(/^application\/json\b/.test(r.headers.get('content-type') ?? ''), `${what}: Content-Type ${r.headers.get('content-type')}`, server);
  return r.body;
}

// A dialog as ApiService parses it: {id, title (a string or null), created_at, updated_at}.
function checkDialog(d, what, server) {
  check(d && typeof d === 'object' && DIALOG_ID.test(d.id ?? ''), `${what}: bad id in ${JSON.stringify(d)}`, server);
  check(d.title === null || typeof d.title === 'string', `${what}: title ${JSON.stringify(d.title)} in ${JSON.stringify(d)}`, server);
  for (const k of ['created_at', 'updated_at']) {
    check(ISO_UTC.test(d[k] ?? ''), `${what}: ${k} not ISO 8601 UTC in ${JSON.stringify(d)}`, server);
  }
  check(stampCmp(d.updated_at, d.created_at) >= 0, `${what}: updated_at before created_at in ${JSON.stringify(d)}`, server);
}

// GET /api/dialogs: well-formed dialogs, newest updated_at first, and a
// current_dialog_id that is one of them (there is always one).
async function listDialogs(server, port) {
  const list = await apiOk(server, port, 'GET', '/api/dialogs');
  check(Array.isArray(list.dialogs), `GET /api/dialogs: no dialogs array: ${JSON.stringify(list)}`, server);
  list.dialogs.forEach((d, i) => checkDialog(d, `GET /api/dialogs dialogs[${i}]`, server));
  const ids = list.dialogs.map((d) => d.id);
  check(new Set(ids).size === ids.length, `GET /api/dialogs lists an id twice: ${JSON.stringify(ids)}`, server);
  for (let i = 1; i < list.dialogs.length; i++) {
    check(stampCmp(list.dialogs[i - 1].updated_at, list.dialogs[i].updated_at) >= 0,
      `GET /api/dialogs is not newest first: ${JSON.stringify(list.dialogs)}`, server);
  }
  check(typeof list.current_dialog_id === 'string' && ids.includes(list.current_dialog_id),
    `GET /api/dialogs: current_dialog_id ${JSON.stringify(list.current_dialog_id)} is not a listed dialog: ${JSON.stringify(list)}`, server);
  return list;
}

const idsOf = (list) => list.dialogs.map((d) => d.id);

// GET /api/dialogs/{id}/history?limit=20[&before=B], as HistoryService asks
// for it, checked against §4: idx on exactly the user and chat events, dense;
// first_idx and last_idx those of the page, 0 and 0 when it is empty.
async function historyPage(server, port, id, before) {
  const p = `/api/dialogs/${id}/history?limit=${PAGE}${before === undefined ? '' : `&before=${before}`}`;
  const page = await apiOk(server, port, 'GET', p);
  const bad = (why) => `GET ${p}: ${why}: ${JSON.stringify(page).slice(0, 1500)}`;
  check(page.dialog_id === id, bad('dialog_id'), server);
  check(Array.isArray(page.events) && typeof page.has_more === 'boolean', bad('events or has_more'), server);
  for (const e of page.events) {
    check((e.type === 'user' || e.type === 'chat') === ('idx' in e), bad(`idx on a ${e.type} event (only user and chat carry one)`), server);
  }
  const numbered = page.events.filter((e) => 'idx' in e);
  numbered.forEach((e, i) => check(Number.isInteger(e.idx) && e.idx === numbered[0].idx + i, bad('idx not dense'), server));
  const first = numbered.length ? numbered[0].idx : 0;
  const last = numbered.length ? numbered[numbered.length - 1].idx : 0;
  check(page.first_idx === first && page.last_idx === last, bad(`first_idx/last_idx, expected ${first}/${last}`), server);
  return page;
}

// Checks a history page holds exactly `messages` ([type, content] pairs)
// from idx `first` on, no turn marked as anything but complete, and has_more.
function checkPage(page, first, messages, hasMore, what, server) {
  const got = page.events.filter((e) => 'idx' in e).map((e) => [e.idx, e.type, e.content]);
  const want = messages.map(([type, content], i) => [first + i, type, content]);
  check(JSON.stringify(got) === JSON.stringify(want), `${what}: messages ${JSON.stringify(got)}, expected ${JSON.stringify(want)}`, server);
  check(page.has_more === hasMore, `${what}: has_more ${page.has_more}, expected ${hasMore}`, server);
  const marked = page.events.filter((e) => 'outcome' in e);
  check(marked.length === 0, `${what}: a completed turn marked ${JSON.stringify(marked)}`, server);
}

// GET /api/dialogs/{id}/session: the extension swallows its failures, but
// this server has it: nothing to approve. A network failure is swallowed as
// the extension does: after a chat stream's done the server closes that
// connection without "Connection: close", and undici may have pooled it and
// sent this request on it just before the close arrived (issue 19's "no
// connection lost").
let sessionNetworkFailures = 0;
async function sessionStatus(server, port, id) {
  let s;
  try {
    s = await apiOk(server, port, 'GET', `/api/dialogs/${id}/session`);
  } catch (e) {
    if (!(e instanceof TypeError)) throw e;
    sessionNetworkFailures++;
    console.log(`# GET /session: ${e.message} (${sessionNetworkFailures} so far), as the extension does: ignored`);
    return;
  }
  check(s.has_unapproved === false && Array.isArray(s.changed_files), `GET /api/dialogs/${id}/session: ${JSON.stringify(s)}`, server);
}

// The panel opening (§2.2): GET /current, that dialog's last page, the list
// (which must name the same current dialog), the config (optional: a 404 is
// only logged), the session.
async function openPanel(server, port) {
  const current = await apiOk(server, port, 'GET', '/api/dialogs/current');
  check(typeof current.id === 'string' && DIALOG_ID.test(current.id), `GET /api/dialogs/current: no current dialog: ${JSON.stringify(current)}`, server);
  if ('meta' in current) checkDialog(current.meta, 'GET /api/dialogs/current meta', server);
  const page = await historyPage(server, port, current.id);
  const list = await listDialogs(server, port);
  check(list.current_dialog_id === current.id,
    `GET /api/dialogs/current says ${current.id}, GET /api/dialogs says current_dialog_id ${list.current_dialog_id}`, server);
  const config = await apiRequest(port, 'GET', '/api/config');
  check(config.status === 200 || config.status === 404, `GET /api/config: ${config.status} ${config.text}`, server);
  await sessionStatus(server, port, current.id);
  return { id: current.id, current, page, list };
}

// A message sent from the panel (§2.3, §2.4): the extension's body (fields
// left undefined dropped by JSON.stringify) and headers; GET .../session
// awaited after the events it polls on; at done, GET history?limit=20 at
// once (the re-render), before the rest of the body is read. Returns the
// events, the dialog, the assistant text the client received (its chat
// chunks) and that history page.
async function sendFromPanel(server, port, text, { dialogId, context } = {}) {
  const body = JSON.stringify({ messages: [{ role: 'user', content: text }], context, stream: true, dialog_id: dialogId });
  const { res, reader, text: answer } = await openStream(port, { body, headers: { 'Cache-Control': 'no-cache' } });
  check(reader, `POST /api/chat ${body.slice(0, 300)}: ${res.status} ${answer}`, server);
  let page = null;
  await within(30000, (async () => {
    for (let e; (e = await reader.next()) !== null;) {
      const known = dialogId ?? e.dialog_id;
      if (SESSION_AFTER.has(e.type) && known) await sessionStatus(server, port, known);
      if (e.type === 'done' && e.dialog_id) page = await historyPage(server, port, e.dialog_id);
    }
  })(), `the chat stream for ${JSON.stringify(text)}`);
  const { events } = reader;
  checkUserFirst(events, text, server);
  const id = events[0].dialog_id;
  if (dialogId) check(id === dialogId, `the stream's dialog_id is ${id}, not the one sent (${dialogId})`, server);
  const errors = events.filter((e) => e.type === 'error');
  check(errors.length === 0, `error events in the stream: ${JSON.stringify(errors)}`, server);
  check(page, 'no history reload: done without a dialog_id', server);
  const reply = events.filter((e) => e.type === 'chat').map((e) => e.content).join('');
  check(reply.trim() !== '', `no assistant text in the stream: ${JSON.stringify(events).slice(0, 500)}`, server);
  return { events, id, reply, page };
}

// _switchToDialog(id) (§2.5), for switch, create and delete: PATCH
// /current?id= (no body), the dialog's last page, the list (whose
// current_dialog_id the header follows), the session.
async function switchTo(server, port, id) {
  await apiOk(server, port, 'PATCH', `/api/dialogs/current?id=${encodeURIComponent(id)}`);
  const page = await historyPage(server, port, id);
  const list = await listDialogs(server, port);
  check(list.current_dialog_id === id, `after PATCH /api/dialogs/current?id=${id}, GET /api/dialogs says current_dialog_id ${list.current_dialog_id}`, server);
  await sessionStatus(server, port, id);
  return { page, list };
}

// "+" (§2.5): POST /api/dialogs {}, which answers the whole dialog and makes
// it current, then _switchToDialog(new id). The GET /current between them is
// the test's, not the extension's.
async function createFromPanel(server, port) {
  const created = await apiOk(server, port, 'POST', '/api/dialogs', {});
  checkDialog(created, 'POST /api/dialogs {}', server);
  check(created.title === null, `POST /api/dialogs {}: title ${JSON.stringify(created.title)}, expected null`, server);
  const current = await apiOk(server, port, 'GET', '/api/dialogs/current');
  check(current.id === created.id, `after POST /api/dialogs (${created.id}), GET /api/dialogs/current says ${current.id}`, server);
  const switched = await switchTo(server, port, created.id);
  checkPage(switched.page, 0, [], false, `the new dialog's history`, server);
  check(idsOf(switched.list)[0] === created.id, `the new dialog ${created.id} does not head the list: ${JSON.stringify(idsOf(switched.list))}`, server);
  return { created, ...switched };
}

// Rename (§2.5): PATCH /api/dialogs/{id} {"title"} (trimmed by the
// extension), then GET /api/dialogs.
async function renameFromPanel(server, port, id, title) {
  const renamed = await apiOk(server, port, 'PATCH', `/api/dialogs/${id}`, { title });
  check(renamed.id === id && renamed.title === title && typeof renamed.updated_at === 'string',
    `PATCH /api/dialogs/${id} {"title"}: ${JSON.stringify(renamed)}, expected {"id","title":${JSON.stringify(title)},"updated_at",...}`, server);
  const list = await listDialogs(server, port);
  const listed = list.dialogs.find((d) => d.id === id);
  check(listed?.title === title, `after the rename GET /api/dialogs lists ${JSON.stringify(listed)}, expected title ${JSON.stringify(title)}`, server);
  return { renamed, list };
}

// Delete (§2.5): DELETE /api/dialogs/{id}, GET /api/dialogs and, when it was
// the current dialog, _switchToDialog(dialogs[0].id).
async function deleteFromPanel(server, port, id, currentId) {
  await apiOk(server, port, 'DELETE', `/api/dialogs/${id}`);
  const list = await listDialogs(server, port);
  check(!idsOf(list).includes(id), `GET /api/dialogs still lists the deleted ${id}: ${JSON.stringify(idsOf(list))}`, server);
  const switched = id === currentId ? await switchTo(server, port, list.dialogs[0].id) : null;
  return { list, switched };
}

// The deleted dialog is gone for every dialog route.
async function checkGone(server, port, id) {
  for (const p of [`/api/dialogs/${id}`, `/api/dialogs/${id}/history?limit=${PAGE}`]) {
    const r = await apiRequest(port, 'GET', p);
    check(r.status === 404, `GET ${p} after its DELETE: ${r.status} ${r.text}, expected 404`, server);
  }
  const r = await apiRequest(port, 'PATCH', `/api/dialogs/current?id=${id}`);
  check(r.status === 404, `PATCH /api/dialogs/current?id=${id} after its DELETE: ${r.status} ${r.text}, expected 404`, server);
}

const panelContext = (root) => ({
  current_file: { path: path.join(root, 'src', 'app.ts'), language: 'typescript', content: 'export const answer = 42;\n' },
});

async function panelServer() {
  const root = await makeRoot();
  const server = launch(root);
  const { port } = await waitReady(server);
  return { root, server, port };
}

test('dialogs: the panel opens on a fresh ROOT: one current dialog, listed, empty; SQLite at .agentsmithy/agentsmithy.sqlite3', async () => {
  const { root, server, port } = await panelServer();
  const panel = await openPanel(server, port);
  check(JSON.stringify(idsOf(panel.list)) === JSON.stringify([panel.id]),
    `a fresh ROOT lists ${JSON.stringify(panel.list)}, expected just the current dialog ${panel.id}`, server);
  checkPage(panel.page, 0, [], false, 'the fresh dialog\'s history', server);
  check(panel.page.total_events === 0, `the fresh dialog's total_events: ${panel.page.total_events}`, server);
  const again = await apiOk(server, port, 'GET', '/api/dialogs/current');
  check(again.id === panel.id, `GET /api/dialogs/current again: ${again.id}, before ${panel.id}`, server);
  const again2 = await listDialogs(server, port);
  check(JSON.stringify(again2) === JSON.stringify(panel.list), `GET /api/dialogs again: ${JSON.stringify(again2)}, before ${JSON.stringify(panel.list)}`, server);

  let head;
  try {
    head = fs.readFileSync(storePath(root)).subarray(0, 16).toString('latin1');
  } catch (e) {
    fail(`no dialog store at ${storePath(root)} (${e.code}); .agentsmithy holds ${JSON.stringify(fs.readdirSync(path.dirname(storePath(root))))}`, server);
  }
  check(head === 'SQLite format 3\0', `${storePath(root)} is not an SQLite database: ${JSON.stringify(head)}`, server);
  const exit = await server.stop();
  check(exit.code === 0, `exit after SIGTERM: ${server.exitText()}`, server);
});

test('dialogs: two turns from the panel; after each done the history is what the client received', async () => {
  const { root, server, port } = await panelServer();
  const panel = await openPanel(server, port);
  const one = await sendFromPanel(server, port, QUERY, { dialogId: panel.id, context: panelContext(root) });
  checkPage(one.page, 0, [['user', QUERY], ['chat', one.reply]], false, 'the history after the first done', server);

  const second = 'And a second question, in the same dialog';
  const two = await sendFromPanel(server, port, second, { dialogId: one.id });
  const other = two.events.filter((e) => e.dialog_id !== panel.id);
  check(other.length === 0, `second stream events without dialog_id ${panel.id}: ${JSON.stringify(other).slice(0, 500)}`, server);
  checkPage(two.page, 0, [['user', QUERY], ['chat', one.reply], ['user', second], ['chat', two.reply]], false,
    'the history after the second done', server);

  const list = await listDialogs(server, port);
  check(JSON.stringify(idsOf(list)) === JSON.stringify([panel.id]), `after two turns the list is ${JSON.stringify(idsOf(list))}, expected [${panel.id}]`, server);
  check(stampCmp(list.dialogs[0].updated_at, panel.list.dialogs[0].updated_at) > 0,
    `updated_at not bumped by the turns: ${list.dialogs[0].updated_at}, at open ${panel.list.dialogs[0].updated_at}`, server);
  await server.stop();
});

test('dialogs: past a page, ?limit=20 gives the last 20 messages and before= scrolls up (§4)', async () => {
  const { server, port } = await panelServer();
  const panel = await openPanel(server, port);
  const all = [];
  for (let i = 0; i < 11; i++) {
    const text = `Message ${i} from the paging test`;
    const turn = await sendFromPanel(server, port, text, { dialogId: panel.id });
    all.push(['user', text], ['chat', turn.reply]);
    const first = Math.max(0, all.length - PAGE);
    checkPage(turn.page, first, all.slice(first), first > 0, `the history after turn ${i + 1}`, server);
  }
  // 22 messages: the last page is idx 2..21; scrolling up from its first_idx gives 0..1.
  const last = await historyPage(server, port, panel.id);
  check(last.first_idx === 2 && last.last_idx === 21, `last page: first_idx ${last.first_idx}, last_idx ${last.last_idx}`, server);
  checkPage(await historyPage(server, port, panel.id, last.first_idx), 0, all.slice(0, 2), false, `?before=${last.first_idx}`, server);
  // After DOM pruning the cursor is any idx.
  checkPage(await historyPage(server, port, panel.id, 21), 1, all.slice(1, 21), true, '?before=21', server);
  checkPage(await historyPage(server, port, panel.id, 7), 0, all.slice(0, 7), false, '?before=7', server);
  checkPage(await historyPage(server, port, panel.id, 0), 0, [], false, '?before=0', server);
  await server.stop();
});

test('dialogs: "+" creates a dialog that becomes current and heads the list; switching back keeps the old history', async () => {
  const { server, port } = await panelServer();
  const panel = await openPanel(server, port);
  const old = panel.id;
  const first = await sendFromPanel(server, port, 'A question in the first dialog', { dialogId: old });

  const { created, list } = await createFromPanel(server, port);
  check(created.id !== old, `POST /api/dialogs answered the existing dialog ${old}`, server);
  check(JSON.stringify(idsOf(list)) === JSON.stringify([created.id, old]), `after "+" the list is ${JSON.stringify(idsOf(list))}, expected [${created.id}, ${old}]`, server);
  const inNew = await sendFromPanel(server, port, 'A question in the new dialog', { dialogId: created.id });
  checkPage(inNew.page, 0, [['user', 'A question in the new dialog'], ['chat', inNew.reply]], false, 'the new dialog\'s history', server);

  const back = await switchTo(server, port, old);
  check(JSON.stringify(back.page) === JSON.stringify(first.page),
    `the old dialog's history after the switch:\n${JSON.stringify(back.page)}\nbefore:\n${JSON.stringify(first.page)}`, server);
  const current = await apiOk(server, port, 'GET', '/api/dialogs/current');
  check(current.id === old, `after switching back GET /api/dialogs/current says ${current.id}, expected ${old}`, server);

  // A message bumps its dialog to the head of the list (what the delete flow's dialogs[0] relies on).
  const again = await sendFromPanel(server, port, 'Back in the first dialog', { dialogId: old });
  checkPage(again.page, 0, [['user', 'A question in the first dialog'], ['chat', first.reply], ['user', 'Back in the first dialog'], ['chat', again.reply]],
    false, 'the old dialog\'s history after another turn', server);
  const after = await listDialogs(server, port);
  check(JSON.stringify(idsOf(after)) === JSON.stringify([old, created.id]), `after a turn in ${old} the list is ${JSON.stringify(idsOf(after))}`, server);
  check(after.current_dialog_id === old, `current_dialog_id ${after.current_dialog_id}, expected ${old}`, server);
  const newPage = await historyPage(server, port, created.id);
  check(JSON.stringify(newPage) === JSON.stringify(inNew.page), `the new dialog's history changed: ${JSON.stringify(newPage)}`, server);
  await server.stop();
});

test('dialogs: rename answers the dialog with its title, and the list shows it', async () => {
  const { server, port } = await panelServer();
  const panel = await openPanel(server, port);
  const a = panel.id;
  const turn = await sendFromPanel(server, port, 'Something to rename', { dialogId: a });
  const { created } = await createFromPanel(server, port);
  const b = created.id;
  const before = (await listDialogs(server, port)).dialogs.find((d) => d.id === a);

  // Not the current dialog.
  const t1 = 'Renamed from the IDE: ünïcode 🚀 "quotes"';
  const r1 = await renameFromPanel(server, port, a, t1);
  check(stampCmp(r1.renamed.updated_at, before.updated_at) > 0, `the rename did not bump updated_at: ${r1.renamed.updated_at} (was ${before.updated_at})`, server);
  check(idsOf(r1.list)[0] === a, `the renamed dialog does not head the list: ${JSON.stringify(r1.list.dialogs)}`, server);
  check(r1.list.current_dialog_id === b, `the rename changed the current dialog to ${r1.list.current_dialog_id}`, server);
  check(r1.list.dialogs.find((d) => d.id === b).title === null, `the other dialog got a title: ${JSON.stringify(r1.list.dialogs)}`, server);

  // The current one, then the first one again.
  const r2 = await renameFromPanel(server, port, b, 'Second dialog');
  check(r2.list.current_dialog_id === b, `current_dialog_id ${r2.list.current_dialog_id} after renaming it`, server);
  const r3 = await renameFromPanel(server, port, a, 'Renamed twice');
  check(r3.list.dialogs.find((d) => d.id === b).title === 'Second dialog', `titles after two renames: ${JSON.stringify(r3.list.dialogs)}`, server);
  const page = await historyPage(server, port, a);
  check(JSON.stringify(page) === JSON.stringify(turn.page), `the rename changed the history: ${JSON.stringify(page)}`, server);
  await server.stop();
});

test('dialogs: delete gives 404 afterwards; the current one is replaced by the most recent, the last one by a new dialog', async () => {
  const { server, port } = await panelServer();
  const panel = await openPanel(server, port);
  const a = panel.id;
  const inA = await sendFromPanel(server, port, 'Kept until deleted', { dialogId: a });
  const b = (await createFromPanel(server, port)).created.id;
  await sendFromPanel(server, port, 'In the second dialog', { dialogId: b });
  const c = (await createFromPanel(server, port)).created.id;
  await switchTo(server, port, a);

  // Not the current dialog: the extension does not switch.
  const d1 = await deleteFromPanel(server, port, b, a);
  check(JSON.stringify(idsOf(d1.list)) === JSON.stringify([c, a]) && d1.list.current_dialog_id === a,
    `after deleting ${b} (not current): ${JSON.stringify(d1.list)}, expected [${c}, ${a}] with ${a} current`, server);
  await checkGone(server, port, b);
  const aPage = await historyPage(server, port, a);
  check(JSON.stringify(aPage) === JSON.stringify(inA.page), `deleting ${b} changed ${a}'s history: ${JSON.stringify(aPage)}`, server);

  // The current dialog: the most recent remaining one becomes current.
  const d2 = await deleteFromPanel(server, port, a, a);
  check(JSON.stringify(idsOf(d2.list)) === JSON.stringify([c]) && d2.list.current_dialog_id === c,
    `after deleting the current ${a}: ${JSON.stringify(d2.list)}, expected [${c}] with ${c} current`, server);
  await checkGone(server, port, a);

  // The last dialog: a new, empty one is current, and the panel works in it.
  const d3 = await deleteFromPanel(server, port, c, c);
  const fresh = d3.list.dialogs[0]?.id;
  check(d3.list.dialogs.length === 1 && ![a, b, c].includes(fresh) && d3.list.current_dialog_id === fresh,
    `after deleting the last dialog ${c}: ${JSON.stringify(d3.list)}, expected one new current dialog`, server);
  checkPage(d3.switched.page, 0, [], false, 'the new dialog\'s history', server);
  await checkGone(server, port, c);
  const current = await apiOk(server, port, 'GET', '/api/dialogs/current');
  check(current.id === fresh, `GET /api/dialogs/current after deleting the last dialog: ${current.id}, expected ${fresh}`, server);
  const turn = await sendFromPanel(server, port, 'A fresh start', { dialogId: fresh });
  checkPage(turn.page, 0, [['user', 'A fresh start'], ['chat', turn.reply]], false, 'the new dialog\'s history after a turn', server);
  await server.stop();
});

test('dialogs: after SIGTERM and a relaunch on the same ROOT, the dialogs, titles, current one and histories are kept', async () => {
  const { root, server, port } = await panelServer();
  const panel = await openPanel(server, port);
  const a = panel.id;
  const token = `kept-${process.pid}-${Date.now()}`;
  const q1 = `Remember ${token}: ünïcode 🚀`;
  const one = await sendFromPanel(server, port, q1, { dialogId: a, context: panelContext(root) });
  const two = await sendFromPanel(server, port, 'A second turn', { dialogId: a });
  const b = (await createFromPanel(server, port)).created.id;
  await sendFromPanel(server, port, 'In the second dialog', { dialogId: b });
  await renameFromPanel(server, port, a, 'Kept across restarts ü');
  await switchTo(server, port, a);
  const list = await listDialogs(server, port);
  const pages = { [a]: await historyPage(server, port, a), [b]: await historyPage(server, port, b) };
  checkPage(pages[a], 0, [['user', q1], ['chat', one.reply], ['user', 'A second turn'], ['chat', two.reply]], false, 'before the restart', server);

  const exit = await server.stop();
  check(exit.code === 0, `exit after SIGTERM: ${server.exitText()}`, server);
  const stored = [storePath(root), `${storePath(root)}-wal`]
    .filter((f) => fs.existsSync(f))
    .map((f) => fs.readFileSync(f).toString('latin1'))
    .join('');
  check(stored.includes(token), `${storePath(root)} (and its -wal) do not hold the message sent`, server);

  const again = launch(root);
  const { port: port2 } = await waitReady(again, { oldPid: server.pid });
  const reopened = await openPanel(again, port2);
  check(reopened.id === a, `after the relaunch the current dialog is ${reopened.id}, expected ${a}`, again);
  check(JSON.stringify(reopened.list) === JSON.stringify(list),
    `GET /api/dialogs after the relaunch:\n${JSON.stringify(reopened.list)}\nbefore:\n${JSON.stringify(list)}`, again);
  for (const id of [a, b]) {
    const page = id === a ? reopened.page : await historyPage(again, port2, id);
    check(JSON.stringify(page) === JSON.stringify(pages[id]),
      `${id}'s history after the relaunch:\n${JSON.stringify(page)}\nbefore:\n${JSON.stringify(pages[id])}`, again);
  }
  const three = await sendFromPanel(again, port2, 'After the restart', { dialogId: a });
  checkPage(three.page, 0, [['user', q1], ['chat', one.reply], ['user', 'A second turn'], ['chat', two.reply], ['user', 'After the restart'], ['chat', three.reply]],
    false, 'the history after a turn past the restart', again);
  await again.stop();
});

// ---------------------------------------------------------------------------

const filters = process.argv.slice(2);
const selected = filters.length ? tests.filter((t) => filters.some((f) => t.name.includes(f))) : tests;
console.log(`# server: ${serverPath}; node ${process.version}; ${selected.length} tests`);
let passed = 0;
let failed = 0;
for (const [i, t] of selected.entries()) {
  const started = Date.now();
  try {
    const note = await within(t.timeout, Promise.resolve().then(t.fn), `test "${t.name}"`);
    passed++;
    console.log(`ok ${i + 1} - ${t.name} (${Date.now() - started} ms)${note ? `\n  # ${note}` : ''}`);
  } catch (e) {
    failed++;
    const text = e instanceof Error ? (e.name === 'Error' || e.name === 'TypeError' ? e.stack : e.message) : String(e);
    console.log(`not ok ${i + 1} - ${t.name} (${Date.now() - started} ms)\n${String(text).split('\n').map((l) => `  # ${l}`).join('\n')}`);
  } finally {
    await cleanupAll();
  }
}
console.log(`# summary: ${passed} passed, ${failed} failed`);
process.exit(failed === 0 ? 0 : 1);
