// tests/ide/ide.test.mjs - build/agentsmithy-server as the AgentSmithy VS Code
// extension sees it: launched with its argv, watched through status.json,
// stopped with SIGTERM, its /health read and its streams read with Node's
// fetch. `node tests/ide/ide.test.mjs [name-substring...]`; prints one
// "ok"/"not ok" line per test and "# summary: N passed, M failed".
import {
  ISO_UTC, TestError, check, cleanupAll, deadPid, fail, getJson, launch, makeRoot, occupy, openStream,
  rawRequest, readStatus, readStatusStrict, serverPath, statusPath, waitFor, waitReady, watchStatus,
  within, writeStatus,
} from './lib.mjs';
import fs from 'node:fs';

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
