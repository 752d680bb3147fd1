'use strict';
// Browser tests of issue 10, run by `node --test` (see run.sh): headless Debian Chromium driven
// by puppeteer-core against real build/agentsmithy-server processes and real signals.

const {test, before, after} = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const http = require('node:http');
const path = require('node:path');
const h = require('./harness');

const SHUTDOWN_TEXT = 'Server is shutting down (graceful shutdown)';
const SNIPPET_FILE = path.join(__dirname, 'spec-client-snippet.js');
const SPEC_FILE = process.env.AGENTSMITHY_SPEC ||
  path.resolve(h.ROOT, '..', 'shared', 'seed', 'graceful-shutdown.md');
const SHORT = {demo: {tokens: 5, interval_ms: 10}};  // a stream that ends by itself at once

let browser;
before(async () => { browser = await h.launchBrowser(); });
after(async () => { if (browser) await browser.close(); });

// Runs fn(page) in a fresh browser context; on failure keeps a screenshot for a person.
async function withPage(name, fn) {
  const page = await h.newPage(browser);
  try {
    return await fn(page);
  } catch (e) {
    try {
      const file = await h.screenshot(page, `failed-${name}.png`);
      e.message += `\n(screenshot: ${file}; console: ${JSON.stringify(page.consoleMessages)})`;
    } catch (_) { /* the page is gone */ }
    throw e;
  } finally {
    await page.closeAll();
  }
}

async function withServer(opts, fn) {
  const server = await h.startServer(opts);
  try {
    return await fn(server);
  } catch (e) {
    e.message += `\n--- server log ---\n${server.log()}`;
    throw e;
  } finally {
    await server.stop();
  }
}

// Waits for the last turn to hold n chunks; fails at once if the turn ended before that.
async function chunksAtLeast(page, n, ms) {
  await page.waitForFunction((n) => {
    const t = document.querySelector('#transcript .turn:last-of-type');
    return t && (Number(t.dataset.chunks) >= n || t.dataset.state !== 'streaming');
  }, {timeout: ms}, n);
  const t = await h.lastTurn(page);
  assert.ok(t.chunks >= n, `the turn ended after ${t.chunks} chunks, before ${n}: ${JSON.stringify(t.notices)}`);
}

// ---- 1. the chat page through a graceful shutdown --------------------------------------------
for (const transport of ['fetch', 'eventsource']) {
  test(`chat page (${transport}): the long story streams, SIGINT shows the shutdown notice and the end of the stream`,
       {timeout: 90000}, () => withServer({}, (server) => withPage(`chat-shutdown-${transport}`, async (page) => {
    await h.openChatPage(page, server.url);
    await h.ask(page, 'Tell me a long story', {transport});

    // Chunks arrive one after another: some, then more while the turn is still streaming.
    await chunksAtLeast(page, 5, 20000);
    const early = await h.lastTurn(page);
    assert.equal(early.state, 'streaming');
    assert.match(early.content, /^Chapter 1\. /);
    await chunksAtLeast(page, early.chunks + 3, 20000);
    assert.equal((await h.lastTurn(page)).state, 'streaming');

    server.signal('SIGINT');
    const t = await h.turnEnded(page, 20000);
    // Kept for a person to look at, whatever the checks below say.
    const shot = await h.screenshot(page, transport === 'fetch' ? 'chat-shutdown.png'
                                                                 : 'chat-shutdown-eventsource.png');
    assert.deepEqual(await server.exited, {code: 0, signal: null}, 'the server exits 0 after the drain');
    assert.match(server.log(), /\b1 streams? notified/, "the server notified the one open stream");

    assert.equal(t.state, 'done', `the turn ends with done: ${JSON.stringify(t.notices)}`);
    assert.equal(t.ended, 1, 'the end-of-stream marker is shown once');
    assert.equal(t.shutdown, true);
    assert.deepEqual(t.notices, [{kind: 'shutdown', code: 'shutdown', text: SHUTDOWN_TEXT}],
                     'exactly one notice: the shutdown, and no error or lost connection');
    assert.equal(t.status.state, 'done');
    assert.match(t.status.text, /shutting down/);
    assert.ok(t.chunks > early.chunks && t.content.startsWith(early.content), 'the text kept growing');
    assert.ok(t.chunks < 700, `the story was cut by the shutdown (${t.chunks} of 774 chunks)`);
    assert.ok(t.dialogId.length > 0, 'the events carry the dialog id');

    assert.ok(fs.statSync(shot).size > 10000, 'the screenshot was written');
    assert.deepEqual(page.consoleErrors(), [], 'no console errors');
  })));
}

// ---- 2. the server serves this page -----------------------------------------------------------
function get(url) {
  return new Promise((resolve, reject) => {
    http.get(url, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (c) => { body += c; });
      res.on('end', () => resolve({status: res.statusCode, headers: res.headers, body}));
    }).on('error', reject);
  });
}

test('GET / serves examples/chat.html as it is on disk; --no-chat-page turns it off', {timeout: 30000}, async () => {
  await withServer({}, async (server) => {
    const res = await get(server.url + '/');
    assert.equal(res.status, 200);
    assert.match(res.headers['content-type'] || '', /^text\/html/);
    assert.equal(res.body, fs.readFileSync(h.CHAT_PAGE, 'utf8'),
                 'the embedded page is examples/chat.html (rebuild the server after editing it)');
  });
  await withServer({args: ['--no-chat-page']}, async (server) => {
    const res = await get(server.url + '/');
    assert.equal(res.status, 404);
  });
});

// ---- 3. the spec's client, verbatim ------------------------------------------------------------
test("the spec's client snippet, verbatim, on an EventSource: logs the shutdown, closes on done, one request",
     {timeout: 90000}, async () => {
  const snippet = fs.readFileSync(SNIPPET_FILE, 'utf8');
  if (fs.existsSync(SPEC_FILE)) {  // the copy must be the spec's text, byte for byte
    const md = fs.readFileSync(SPEC_FILE, 'utf8');
    const section = md.slice(md.indexOf('## Client Implementation'));
    const block = /```javascript\n([\s\S]*?)```/.exec(section);
    assert.ok(block, `no javascript block under "Client Implementation" in ${SPEC_FILE}`);
    assert.equal(snippet, block[1], `${SNIPPET_FILE} differs from the spec's snippet`);
  }
  const html = `<!doctype html><meta charset="utf-8"><link rel="icon" href="data:,"><title>spec client</title>
<script>
  // Instrumentation only: records the order of what the snippet does.
  window.__trace = [];
  const realLog = console.log;
  console.log = function (...args) { window.__trace.push('log:' + args.join(' ')); return realLog.apply(this, args); };
  const realClose = EventSource.prototype.close;
  EventSource.prototype.close = function () { window.__trace.push('close'); return realClose.call(this); };
</script>
<script>
const es = new EventSource('/api/chat?message=' + encodeURIComponent('Tell me a long story'));
es.addEventListener('message', (e) => { window.__trace.push('message:' + JSON.parse(e.data).type); });
${snippet}
</script>`;
  await withServer({}, async (server) => {
    const proxy = await h.startProxy({upstreamPort: server.port, pages: {'/spec-client.html': html}});
    try {
      await withPage('spec-client', async (page) => {
        await page.goto(proxy.url + '/spec-client.html');
        await page.waitForFunction(() => window.__trace.filter((x) => x === 'message:chat').length >= 5,
                                   {timeout: 20000});
        server.signal('SIGINT');
        await page.waitForFunction(() => window.__trace.includes('close'), {timeout: 20000});
        assert.deepEqual(await server.exited, {code: 0, signal: null});
        const trace = await page.evaluate(() => window.__trace);
        const tail = trace.filter((x) => x !== 'message:chat');
        assert.deepEqual(tail.slice(-4), ['message:error', 'log:Server is shutting down', 'message:done', 'close'],
                         `the snippet logs the shutdown, then closes on done: ${JSON.stringify(tail)}`);
        assert.equal(trace.filter((x) => x === 'log:Server is shutting down').length, 1);
        assert.equal(await page.evaluate(() => es.readyState), 2, 'es is CLOSED');
        assert.ok(page.consoleMessages.some((m) => m.type === 'log' && m.text === 'Server is shutting down'));

        // On the wire: ids on every event, and a retry: before the shutdown's final events.
        const gets = proxy.api('GET');
        assert.equal(gets.length, 1);
        assert.equal(gets[0].status, 200);
        const events = h.parseSse(gets[0].body);
        const dataEvents = events.filter((e) => e.data !== '');
        assert.ok(dataEvents.every((e) => /^\d+$/.test(e.id || '')), 'every event has a numeric id: line');
        const ids = dataEvents.map((e) => Number(e.id));
        assert.ok(ids.every((id, i) => i === 0 || id > ids[i - 1]), `ids increase: ${ids.slice(-5)}`);
        const types = dataEvents.map((e) => JSON.parse(e.data).type);
        assert.deepEqual(types.slice(-2), ['error', 'done']);
        const errorEvent = JSON.parse(dataEvents[dataEvents.length - 2].data);
        assert.equal(errorEvent.error, SHUTDOWN_TEXT);
        assert.equal(errorEvent.code, 'shutdown');
        const retryAt = events.findIndex((e) => e.retry !== null);
        const errorAt = events.findIndex((e) => e.data !== '' && JSON.parse(e.data).type === 'error');
        const lastChatAt = events.map((e) => e.data !== '' && JSON.parse(e.data).type).lastIndexOf('chat');
        assert.ok(retryAt > lastChatAt && retryAt <= errorAt, `retry: comes after the last chunk, by the error (${retryAt}, ${lastChatAt}, ${errorAt})`);
        const retry = Number(events[retryAt].retry);
        assert.ok(retry >= 1000 && retry <= 5000, `retry ${retry} in [1000, 5000]`);

        // A closed EventSource never comes back: watch for longer than the retry it was given.
        await new Promise((resolve) => setTimeout(resolve, retry + 1500));
        assert.equal(proxy.api().length, 1, 'the server saw exactly one /api/chat request');
        assert.equal(server.count(/stream started/), 1, 'and generated one stream');
        assert.deepEqual(page.consoleErrors(), []);
      });
    } finally {
      await proxy.close();
    }
  });
});

// ---- 4. an EventSource that never calls close() ------------------------------------------------
test('an EventSource that never calls close(): reconnects with Last-Event-ID, gets 204, stays closed; one generation',
     {timeout: 60000}, () => withServer({}, async (server) => {
  const html = `<!doctype html><meta charset="utf-8"><link rel="icon" href="data:,"><title>no close</title>
<script>
window.__trace = [];
const es = new EventSource('/api/chat?message=hi&context=' + encodeURIComponent(${JSON.stringify(JSON.stringify(SHORT))}));
es.onopen = () => window.__trace.push({type: '#open'});
es.onmessage = (e) => window.__trace.push({type: JSON.parse(e.data).type, lastEventId: e.lastEventId});
es.onerror = () => window.__trace.push({type: '#error', readyState: es.readyState});
</script>`;
  const proxy = await h.startProxy({upstreamPort: server.port, pages: {'/no-close.html': html}});
  try {
    await withPage('no-close', async (page) => {
      await page.goto(proxy.url + '/no-close.html');
      await page.waitForFunction(() => window.__trace.some((e) => e.type === 'done'), {timeout: 20000});
      const done = (await page.evaluate(() => window.__trace)).find((e) => e.type === 'done');
      assert.ok(done.lastEventId !== '', 'the done event carried an id');

      // Chromium reconnects after its default 3 s (no retry: on a normal end).
      const second = await proxy.waitFor(() => proxy.api('GET')[1], 15000, 'the reconnect');
      assert.equal(second.headers['last-event-id'], done.lastEventId, 'the reconnect sends Last-Event-ID');
      await proxy.waitFor(() => second.status !== null, 10000, 'the answer to the reconnect');
      assert.equal(second.status, 204);
      await page.waitForFunction(() => es.readyState === 2, {timeout: 10000});
      const trace = await page.evaluate(() => window.__trace);
      assert.deepEqual(trace.filter((e) => e.type === '#error').map((e) => e.readyState), [0, 2],
                       'an error on the normal end (CONNECTING), then the 204 closes it');
      assert.equal(trace.filter((e) => e.type === 'done').length, 1);

      // CLOSED is final: nothing more comes for longer than Chromium's 3 s reconnect delay.
      await new Promise((resolve) => setTimeout(resolve, 4000));
      assert.equal(proxy.api().length, 2, `exactly two requests: ${proxy.api().map((r) => r.status)}`);
      assert.equal(await page.evaluate(() => es.readyState), 2);
      assert.equal(server.count(/stream started/), 1, 'the server generated the answer once');
    });
  } finally {
    await proxy.close();
  }
}));

// ---- 5. the page from another origin ------------------------------------------------------------
test('the page from another origin: with --cors-origin the preflight and both transports work; without it the browser is refused',
     {timeout: 90000}, async () => {
  const chatHtml = fs.readFileSync(h.CHAT_PAGE, 'utf8');
  const origin = await h.startProxy({pages: {'/': chatHtml}});  // a static server on a second port
  try {
    // Allowed: the server lists the page's origin.
    await withServer({args: ['--cors-origin', origin.origin]}, async (server) => {
      const proxy = await h.startProxy({upstreamPort: server.port});  // observes what the server answers
      try {
        await withPage('cors-allowed', async (page) => {
          await page.goto(origin.url + '/');
          await h.ask(page, 'hello', {transport: 'fetch', serverUrl: proxy.url, context: SHORT});
          let t = await h.turnEnded(page);
          assert.equal(t.state, 'done', JSON.stringify(t.notices));
          assert.equal(t.chunks, 5);
          const preflight = proxy.requests.find((r) => r.method === 'OPTIONS' && r.path === '/api/chat');
          assert.ok(preflight, 'the browser sent a preflight');
          assert.equal(preflight.headers.origin, origin.origin);
          assert.ok(preflight.status >= 200 && preflight.status < 300, `preflight answered ${preflight.status}`);
          const post = proxy.api('POST')[0];
          assert.equal(post.status, 200);
          assert.equal(post.resHeaders['access-control-allow-origin'], origin.origin);

          // The dialogs API across origins too: the list after the turn, then a new dialog.
          const listed = await proxy.waitFor(() => proxy.requests.find((r) => r.method === 'GET' && r.path === '/api/dialogs' && r.ended),
                                             10000, 'the list after the turn');
          assert.equal(listed.status, 200);
          assert.equal(listed.resHeaders['access-control-allow-origin'], origin.origin);
          await h.waitForView(page, (v) => v.state === 'ready' && v.dialogs.length === 1 && v.dialogs[0].current,
                              {what: 'the list from the other origin'});
          await page.click('#new-dialog');
          const created = await h.waitForView(page, (v) => v.dialogs.length === 2 && v.dialogs[0].current && v.history === 'ready',
                                              {what: 'the new dialog'});
          assert.equal(proxy.requests.filter((r) => r.method === 'POST' && r.path === '/api/dialogs' && r.status === 200).length, 1);
          await h.ask(page, 'hello', {transport: 'eventsource', serverUrl: proxy.url, context: SHORT});
          t = await h.turnEnded(page);
          assert.equal(t.state, 'done', JSON.stringify(t.notices));
          assert.equal(t.chunks, 5);
          assert.equal(t.dialogId, created.dialogId, 'the question went to the new dialog');
          const getReq = proxy.api('GET')[0];
          assert.equal(getReq.headers.origin, origin.origin);
          assert.equal(getReq.resHeaders['access-control-allow-origin'], origin.origin);
          assert.equal(new URL(getReq.url, proxy.url).searchParams.get('dialog_id'), created.dialogId);
          // Only the page's load-time GET /api/dialogs failed: it went to the static origin (no
          // server URL yet), which has no API and answers 404.
          const errors = page.consoleErrors().filter((m) => !m.url.startsWith(origin.url + '/api/dialogs'));
          assert.deepEqual(errors, []);
        });
      } finally {
        await proxy.close();
      }
    });

    // Refused: no cors origins.
    await withServer({}, async (server) => {
      const proxy = await h.startProxy({upstreamPort: server.port});
      try {
        await withPage('cors-refused', async (page) => {
          await page.goto(origin.url + '/');
          await h.ask(page, 'hello', {transport: 'fetch', serverUrl: proxy.url, context: SHORT});
          let t = await h.turnEnded(page);
          assert.equal(t.state, 'failed');
          assert.equal(t.notices.length, 1);
          assert.match(t.notices[0].text, /Could not reach the server/);
          const preflight = proxy.requests.find((r) => r.method === 'OPTIONS');
          assert.ok(preflight && (preflight.status < 200 || preflight.status >= 300),
                    `the preflight is refused (${preflight && preflight.status})`);
          assert.equal(proxy.api('POST').length, 0, 'the POST is never sent');

          await h.ask(page, 'hello', {transport: 'eventsource', serverUrl: proxy.url, context: SHORT});
          t = await h.turnEnded(page);
          assert.equal(t.state, 'failed');
          assert.equal(t.events, 0, 'no event reaches the page');
          const getReq = proxy.api('GET')[0];
          assert.ok(getReq, 'the EventSource GET was sent');
          assert.equal(getReq.resHeaders && getReq.resHeaders['access-control-allow-origin'], undefined);
          const cors = page.consoleErrors().filter((m) => /CORS policy/.test(m.text));
          assert.ok(cors.length >= 2, `Chromium reports both refusals as CORS: ${JSON.stringify(page.consoleErrors())}`);
        });
      } finally {
        await proxy.close();
      }
    });
  } finally {
    await origin.close();
  }
});

// ---- 6. the token --------------------------------------------------------------------------------
test('AGENTSMITHY_TOKEN: the page with the token streams over fetch (Bearer) and EventSource (access_token); without it 401',
     {timeout: 90000}, () => withServer({env: {AGENTSMITHY_TOKEN: 'secret'}}, async (server) => {
  const proxy = await h.startProxy({upstreamPort: server.port});
  try {
    await withPage('token', async (page) => {
      await h.openChatPage(page, proxy.url);  // GET / itself needs no token
      // The dialogs API needs it: refused until the token is entered, then the list loads.
      let v = await h.waitForView(page, (v) => v.state === 'failed', {what: 'the list refused'});
      assert.match(v.error, /HTTP 401/);
      await page.evaluate(() => {
        const token = document.getElementById('token');
        token.value = 'secret';
        token.dispatchEvent(new Event('change'));
      });
      v = await h.waitForView(page, (v) => v.state === 'ready' && v.history === 'ready' && v.dialogs.length === 1,
                              {what: 'the list with the token'});
      assert.equal(v.error, null);
      const dialogCalls = proxy.requests.filter((r) => r.path.startsWith('/api/dialogs'));
      assert.deepEqual(dialogCalls.map((r) => [r.headers.authorization, r.status]),
                       [[undefined, 401], ['Bearer secret', 200], ['Bearer secret', 200]],
                       'list without the token, then list and history with it');

      await h.ask(page, 'hello', {transport: 'fetch', token: 'secret', context: SHORT});
      let t = await h.turnEnded(page);
      assert.equal(t.state, 'done', JSON.stringify(t.notices));
      assert.equal(t.chunks, 5);
      let req = proxy.api('POST').at(-1);
      assert.equal(req.headers.authorization, 'Bearer secret');
      assert.ok(!/access_token/.test(req.url), 'fetch does not put the token in the URL');
      assert.equal(req.status, 200);

      await page.click('#new-dialog');
      await h.ask(page, 'hello', {transport: 'eventsource', token: 'secret', context: SHORT});
      t = await h.turnEnded(page);
      assert.equal(t.state, 'done', JSON.stringify(t.notices));
      assert.equal(t.chunks, 5);
      req = proxy.api('GET').at(-1);
      assert.equal(new URL(req.url, proxy.url).searchParams.get('access_token'), 'secret');
      assert.equal(req.headers.authorization, undefined);
      assert.equal(req.headers.referer, undefined, 'no Referer (the page sets no-referrer)');
      assert.equal(req.status, 200);
      assert.equal(server.count(/stream started/), 2);

      // Without the token, and with a wrong one.
      for (const [transport, token] of [['fetch', ''], ['eventsource', ''], ['fetch', 'wrong'], ['eventsource', 'wrong']]) {
        await page.click('#new-dialog');
        await h.ask(page, 'hello', {transport, token, context: SHORT});
        t = await h.turnEnded(page);
        assert.equal(t.state, 'failed', `${transport} token=${token}: ${JSON.stringify(t)}`);
        assert.equal(t.events, 0);
        req = proxy.api(transport === 'fetch' ? 'POST' : 'GET').at(-1);
        assert.equal(req.status, 401, `${transport} token=${token}`);
        if (transport === 'fetch') assert.match(t.notices.at(-1).text, /^HTTP 401: /);
      }
      // The query parameter is for the GET route only.
      const status = await page.evaluate(async () => (await fetch('/api/chat?access_token=secret', {
        method: 'POST', headers: {'Content-Type': 'application/json'},
        body: JSON.stringify({messages: [{role: 'user', content: 'hi'}], stream: true})})).status);
      assert.equal(status, 401, 'POST ignores ?access_token=');
      assert.equal(server.count(/stream started/), 2, 'no refused request generated anything');
    });
  } finally {
    await proxy.close();
  }
}));

// ---- 7. a lost connection -----------------------------------------------------------------------
for (const transport of ['fetch', 'eventsource']) {
  test(`chat page (${transport}): the server killed mid-stream (SIGKILL) is reported as a lost connection`,
       {timeout: 60000}, () => withServer({}, (server) => withPage(`lost-${transport}`, async (page) => {
    await h.openChatPage(page, server.url);
    await h.ask(page, 'Tell me a long story', {transport});
    await chunksAtLeast(page, 3, 20000);
    server.signal('SIGKILL');
    const t = await h.turnEnded(page, 20000);
    assert.equal((await server.exited).signal, 'SIGKILL');
    assert.equal(t.state, 'lost', JSON.stringify(t));
    assert.equal(t.ended, 0, 'no end-of-stream marker without done');
    assert.deepEqual(t.notices.map((n) => n.kind), ['lost']);
    assert.match(t.notices[0].text, /Connection lost/);
    assert.equal(t.status.state, 'lost');
    assert.equal(await page.$eval('#send', (b) => b.disabled), false, 'the page is ready for the next question');
  })));
}

// ---- 8. rendering, against a scripted SSE server -------------------------------------------------
// A stand-in for the server that sends reasoning and tool_call events (the demo sends neither),
// holds the stream open until the test releases it, and frames with CRLF and split writes.
// It also answers the page's dialogs calls: one dialog, d1, whose history is history(limit).
async function startScripted({history = () => ({events: [], total_events: 0, has_more: false, first_idx: 0, last_idx: 0})} = {}) {
  const chatHtml = fs.readFileSync(h.CHAT_PAGE, 'utf8');
  const s = {releases: [], requests: [], dialogRequests: []};
  const server = http.createServer((req, res) => {
    if (req.url === '/') {
      res.writeHead(200, {'Content-Type': 'text/html; charset=utf-8'});
      res.end(chatHtml);
      return;
    }
    const url = new URL(req.url, 'http://127.0.0.1');
    if (url.pathname.startsWith('/api/dialogs')) {
      s.dialogRequests.push({method: req.method, url: req.url});
      const reply = (status, body) => {
        res.writeHead(status, {'Content-Type': 'application/json'});
        res.end(JSON.stringify(body));
      };
      if (req.method === 'GET' && url.pathname === '/api/dialogs') {
        return reply(200, {current_dialog_id: 'd1', dialogs: [{id: 'd1', title: 'Scripted', created_at: '2026-01-01T00:00:00Z',
                                                               updated_at: '2026-01-01T00:00:00Z'}]});
      }
      if (req.method === 'GET' && url.pathname === '/api/dialogs/d1/history') {
        return reply(200, {dialog_id: 'd1', ...history(Number(url.searchParams.get('limit')))});
      }
      return reply(404, {error: 'not scripted'});
    }
    let body = '';
    req.on('data', (c) => { body += c; });
    req.on('end', () => {
      s.requests.push({method: req.method, url: req.url, body});
      const cut = /cut/.test(req.url) || /cut/.test(body);
      res.writeHead(200, {'Content-Type': 'text/event-stream', 'Cache-Control': 'no-cache'});
      let id = 0;
      const frame = (ev) => `id: ${++id}\r\ndata: ${JSON.stringify({...ev, dialog_id: 'd1'})}\r\n\r\n`;
      res.write(': hello\r\n\r\n');
      res.write(frame({type: 'reasoning_start'}));
      const r1 = frame({type: 'reasoning', content: 'Thinking about '});
      res.write(r1.slice(0, 7));        // split inside the field
      res.write(r1.slice(7, -1));       // ... and between CR and LF
      res.write(r1.slice(-1));
      res.write(frame({type: 'reasoning', content: 'the question.'}) + frame({type: 'reasoning_end'}));
      res.write(frame({type: 'tool_call', name: 'read_file', args: {path: 'README.md', lines: [1, 2]}}));
      res.write(frame({type: 'chat_start'}) + frame({type: 'chat', content: 'Hello, '}));
      s.releases.push(() => {
        if (cut) { res.end(frame({type: 'chat', content: 'wor'})); return; }  // ends without done
        res.end(frame({type: 'chat', content: 'world ✓'}) + frame({type: 'chat_end'}) + frame({type: 'done', done: true}));
      });
    });
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  s.url = `http://127.0.0.1:${server.address().port}`;
  s.close = () => new Promise((resolve) => { server.closeAllConnections?.(); server.close(() => resolve()); });
  return s;
}

for (const transport of ['fetch', 'eventsource']) {
  test(`chat page (${transport}): renders reasoning and tool_call as they arrive; a stream that ends without done is a lost connection`,
       {timeout: 60000}, async () => {
    const s = await startScripted();
    try {
      await withPage(`render-${transport}`, async (page) => {
        await page.goto(s.url + '/');
        await h.ask(page, 'show me', {transport});
        await page.waitForFunction(() => document.querySelector('.turn:last-of-type [data-role=content]')?.textContent === 'Hello, ',
                                   {timeout: 20000});
        let t = await h.lastTurn(page);
        assert.equal(t.state, 'streaming', 'all of this shows while the stream is still open');
        assert.equal(t.reasoning, 'Thinking about the question.');
        assert.equal(await page.$eval('.turn:last-of-type [data-role=reasoning]', (d) => getComputedStyle(d).fontStyle), 'italic');
        assert.equal(t.toolCalls.length, 1);
        assert.equal(t.toolCalls[0].name, 'read_file');
        assert.deepEqual(JSON.parse(t.toolCalls[0].args), {path: 'README.md', lines: [1, 2]});
        s.releases.shift()();
        t = await h.turnEnded(page);
        assert.equal(t.state, 'done');
        assert.equal(t.content, 'Hello, world ✓');
        assert.equal(t.ended, 1);
        assert.deepEqual(t.notices, []);
        if (transport === 'fetch') {  // the second question: the dialog and only the new message
          await h.ask(page, 'cut it', {transport});
          await page.waitForFunction(() => document.querySelector('.turn:last-of-type [data-role=content]')?.textContent === 'Hello, ',
                                     {timeout: 20000});
          const sent = JSON.parse(s.requests.at(-1).body);
          assert.equal(sent.dialog_id, 'd1');
          assert.deepEqual(sent.messages, [{role: 'user', content: 'cut it'}], 'the server remembers the earlier turns');
          assert.equal(sent.stream, true);
        } else {
          await h.ask(page, 'cut it', {transport});
          await page.waitForFunction(() => document.querySelector('.turn:last-of-type [data-role=content]')?.textContent === 'Hello, ',
                                     {timeout: 20000});
          const url = new URL(s.requests.at(-1).url, s.url);
          assert.equal(url.pathname, '/api/chat');
          assert.equal(url.searchParams.get('message'), 'cut it');
          assert.equal(url.searchParams.get('dialog_id'), 'd1');
        }
        s.releases.shift()();
        t = await h.turnEnded(page);
        assert.equal(t.state, 'lost', JSON.stringify(t));
        assert.equal(t.content, 'Hello, wor');
        assert.deepEqual(t.notices.map((n) => n.kind), ['lost']);
        assert.deepEqual(page.consoleErrors(), []);
      });
    } finally {
      await s.close();
    }
  });
}

// ---- 9. dialogs ----------------------------------------------------------------------------------
async function getJson(url) {
  const res = await get(url);
  assert.equal(res.status, 200, `GET ${url}: ${res.body}`);
  return JSON.parse(res.body);
}

const pick = (t) => ({source: t.source, user: t.user, content: t.content});

test('chat page dialogs: a reload shows the history; New dialog; switching back shows its history; a reload keeps the current dialog',
     {timeout: 120000}, () => withServer({}, (server) => withPage('dialogs', async (page) => {
  const posted = [];  // the bodies of POST /api/chat, as Chromium sent them
  page.on('request', (r) => {
    if (r.method() === 'POST' && new URL(r.url()).pathname === '/api/chat') posted.push(JSON.parse(r.postData()));
  });
  await h.openChatPage(page, server.url);
  let v = await h.waitForView(page, (v) => v.state === 'ready' && v.history === 'ready', {what: 'the first load'});
  assert.equal(v.dialogs.length, 1, 'the server keeps a current dialog from the start');
  const d1 = v.dialogs[0].id;
  assert.deepEqual(v.dialogs[0], {id: d1, current: true, title: 'New dialog', untitled: true});
  assert.equal(v.dialogId, d1);
  assert.deepEqual(v.turns, []);
  assert.ok(v.empty);

  // A question, answered, then a reload: the history shows both as they were.
  const q1 = 'Hello <b>there</b> & "friends"';
  await h.ask(page, q1);
  let t = await h.turnEnded(page);
  assert.equal(t.state, 'done', JSON.stringify(t.notices));
  assert.equal(t.dialogId, d1);
  const a1 = t.content;
  assert.ok(a1.startsWith(`You said: "${q1}".`), a1);
  assert.deepEqual(posted.at(-1), {messages: [{role: 'user', content: q1}], stream: true, dialog_id: d1});

  await page.reload({waitUntil: 'load'});
  v = await h.waitForView(page, (v) => v.state === 'ready' && v.history === 'ready' && v.turns.length > 0,
                          {what: 'the history after a reload'});
  assert.equal(v.dialogId, d1);
  assert.deepEqual(v.turns.map(pick), [{source: 'history', user: q1, content: a1}]);
  assert.equal(v.turns[0].outcome, 'completed');
  assert.deepEqual(v.turns[0].notices, []);
  assert.equal(await page.$$eval('#transcript b', (b) => b.length), 0, 'the question is shown as text, not HTML');
  assert.deepEqual(v.dialogs.map((d) => [d.id, d.current]), [[d1, true]]);

  // New dialog: the transcript empties, the list has two, the new one on top and current.
  await page.click('#new-dialog');
  v = await h.waitForView(page, (v, d1) => v.dialogs.length === 2 && v.dialogId && v.dialogId !== d1 && v.history === 'ready',
                          {arg: d1, what: 'the new dialog'});
  const d2 = v.dialogId;
  assert.deepEqual(v.turns, []);
  assert.ok(v.empty);
  assert.deepEqual(v.dialogs.map((d) => [d.id, d.current]), [[d2, true], [d1, false]]);
  assert.equal((await getJson(server.url + '/api/dialogs/current')).id, d2, "the server's current dialog");

  const q2 = 'A second dialog';
  await h.ask(page, q2);
  t = await h.turnEnded(page);
  assert.equal(t.state, 'done', JSON.stringify(t.notices));
  assert.equal(t.dialogId, d2);
  const a2 = t.content;
  assert.ok(a2.startsWith(`You said: "${q2}".`), a2);
  assert.deepEqual(posted.at(-1), {messages: [{role: 'user', content: q2}], stream: true, dialog_id: d2});
  await h.waitForView(page, (v) => v.state === 'ready', {what: 'the list refreshed after the turn'});

  // Back to the first: its history, and it is current on the server.
  await page.click(`#dialog-list li[data-dialog-id="${d1}"] [data-role=open]`);
  v = await h.waitForView(page, (v, d1) => v.dialogId === d1 && v.history === 'ready' && v.turns.length > 0 &&
                                           v.dialogs.some((d) => d.id === d1 && d.current),
                          {arg: d1, what: 'the first dialog again'});
  assert.deepEqual(v.turns.map(pick), [{source: 'history', user: q1, content: a1}]);
  assert.deepEqual(v.dialogs.filter((d) => d.current).map((d) => d.id), [d1]);
  assert.equal((await getJson(server.url + '/api/dialogs/current')).id, d1);

  // A follow-up there: only the new message goes, with the dialog; then that dialog tops the list.
  const q3 = 'And a follow-up';
  await h.ask(page, q3);
  t = await h.turnEnded(page);
  assert.equal(t.state, 'done', JSON.stringify(t.notices));
  assert.equal(t.dialogId, d1);
  const a3 = t.content;
  assert.deepEqual(posted.at(-1), {messages: [{role: 'user', content: q3}], stream: true, dialog_id: d1});
  v = await h.waitForView(page, (v, d1) => v.dialogs.length === 2 && v.dialogs[0].id === d1, {arg: d1, what: 'the list in updated_at order'});
  assert.deepEqual(v.dialogs.map((d) => [d.id, d.current]), [[d1, true], [d2, false]]);

  // A reload: still the first dialog, with both of its turns.
  await page.reload({waitUntil: 'load'});
  v = await h.waitForView(page, (v) => v.state === 'ready' && v.history === 'ready' && v.turns.length > 0,
                          {what: 'the history after the second reload'});
  assert.equal(v.dialogId, d1);
  assert.deepEqual(v.turns.map(pick), [{source: 'history', user: q1, content: a1}, {source: 'history', user: q3, content: a3}]);
  assert.deepEqual(v.dialogs.map((d) => [d.id, d.current]), [[d1, true], [d2, false]]);
  assert.equal(v.error, null);
  const other = (await getJson(`${server.url}/api/dialogs/${d2}/history`)).events.map((e) => [e.type, e.content]);
  assert.deepEqual(other, [['user', q2], ['chat', a2]], 'the second dialog kept its own turn');
  await h.screenshot(page, 'chat-dialogs.png');
  assert.deepEqual(page.consoleErrors(), []);
})));

test('chat page dialogs: rename and delete; a title is shown as text', {timeout: 90000},
     () => withServer({}, (server) => withPage('dialogs-rename', async (page) => {
  const TITLE = '<img src=x onerror="window.__xss=1">Plans & "notes"';
  const prompts = [];
  page.on('dialog', async (d) => {
    prompts.push({type: d.type(), message: d.message()});
    if (d.type() === 'prompt') await d.accept(TITLE);
    else await d.accept();
  });
  await h.openChatPage(page, server.url);
  let v = await h.waitForView(page, (v) => v.state === 'ready' && v.history === 'ready', {what: 'the first load'});
  const d1 = v.dialogId;
  await h.ask(page, 'first');
  assert.equal((await h.turnEnded(page)).state, 'done');
  await page.click('#new-dialog');
  v = await h.waitForView(page, (v) => v.dialogs.length === 2 && v.dialogs[0].current && v.history === 'ready',
                          {what: 'the new dialog'});
  const d2 = v.dialogId;

  // Rename the first (not the current one): PATCH /api/dialogs/{id}; the list shows the title as text.
  const row1 = `#dialog-list li[data-dialog-id="${d1}"]`;
  await page.hover(row1);
  await page.click(`${row1} [data-role=rename]`);
  v = await h.waitForView(page, (v, [d1, title]) => v.dialogs.some((d) => d.id === d1 && d.title === title),
                          {arg: [d1, TITLE], what: 'the new title'});
  assert.deepEqual(prompts.map((p) => p.type), ['prompt']);
  assert.equal(v.dialogs.find((d) => d.id === d1).untitled, false);
  assert.equal(await page.$$eval('#dialog-list img', (i) => i.length), 0, 'no element made from the title');
  assert.equal(await page.evaluate(() => window.__xss), undefined);
  assert.equal(v.dialogId, d2, 'renaming does not switch');
  const listed = await getJson(server.url + '/api/dialogs');
  assert.equal(listed.dialogs.find((d) => d.id === d1).title, TITLE);

  // Delete the current one: the server makes the first current again, and the page shows it.
  const row2 = `#dialog-list li[data-dialog-id="${d2}"]`;
  await page.hover(row2);
  await page.click(`${row2} [data-role=delete]`);
  v = await h.waitForView(page, (v, d1) => v.dialogs.length === 1 && v.dialogId === d1 && v.history === 'ready' && v.turns.length > 0,
                          {arg: d1, what: 'the first dialog after the delete'});
  assert.deepEqual(prompts.map((p) => p.type), ['prompt', 'confirm']);
  assert.deepEqual(v.dialogs, [{id: d1, current: true, title: TITLE, untitled: false}]);
  assert.deepEqual(v.turns.map((t) => t.user), ['first']);
  assert.equal((await getJson(server.url + '/api/dialogs/current')).id, d1);
  assert.equal((await get(`${server.url}/api/dialogs/${d2}/history`)).status, 404);
  assert.deepEqual(page.consoleErrors(), []);
})));

test('chat page dialogs: renders a history with reasoning, tool calls, edits and a cut answer; "Show earlier messages" loads more',
     {timeout: 60000}, async () => {
  const all = [
    {type: 'user', content: 'q0', idx: 0},
    {type: 'reasoning', content: 'Thinking first.'},
    {type: 'chat', content: 'Answer zero.', idx: 1},
    {type: 'user', content: 'Read <i>a.md</i>', idx: 2},
    {type: 'reasoning', content: 'Let me look.'},
    {type: 'chat', content: 'It says hi.', idx: 3},
    {type: 'tool_call', id: 'c1', name: 'read_file', args: {path: 'a.md'}},
    {type: 'file_edit', file: 'a.md', diff: '+hi'},
    {type: 'user', content: 'q2', idx: 4},
    {type: 'chat', content: 'Half an ans', idx: 5, outcome: 'shutdown'},
  ];
  // The page asks for the last 50 messages; this dialog answers 4 (idx 2..5) and has_more, then
  // all 6 when asked for 100.
  const history = (limit) => (limit >= 100
    ? {events: all, total_events: all.length, has_more: false, first_idx: 0, last_idx: 5}
    : {events: all.slice(3), total_events: all.length, has_more: true, first_idx: 2, last_idx: 5});
  const s = await startScripted({history});
  try {
    await withPage('history-render', async (page) => {
      await page.goto(s.url + '/');
      let v = await h.waitForView(page, (v) => v.state === 'ready' && v.history === 'ready' && v.turns.length > 0,
                                  {what: 'the scripted history'});
      assert.equal(v.dialogId, 'd1');
      assert.deepEqual(v.dialogs, [{id: 'd1', current: true, title: 'Scripted', untitled: false}]);
      assert.ok(v.loadEarlier, 'has_more: a button for earlier messages');
      assert.deepEqual(v.turns.map((t) => t.user), ['Read <i>a.md</i>', 'q2']);
      assert.equal(await page.$$eval('#transcript i', (i) => i.length), 0);
      assert.deepEqual(v.turns[0], {
        source: 'history', state: 'history', outcome: 'completed', user: 'Read <i>a.md</i>', content: 'It says hi.',
        reasoning: 'Let me look.', toolCalls: [{name: 'read_file', args: {path: 'a.md'}}],
        notices: [{kind: 'info', text: 'Edited a.md'}]});
      assert.equal(v.turns[1].outcome, 'shutdown');
      assert.equal(v.turns[1].content, 'Half an ans');
      assert.deepEqual(v.turns[1].notices.map((n) => n.kind), ['shutdown']);

      await page.click('#load-earlier');
      v = await h.waitForView(page, (v) => v.history === 'ready' && v.turns.length === 3, {what: 'the earlier messages'});
      assert.equal(v.loadEarlier, false);
      assert.deepEqual(v.turns.map((t) => [t.user, t.content, t.reasoning]),
                       [['q0', 'Answer zero.', 'Thinking first.'], ['Read <i>a.md</i>', 'It says hi.', 'Let me look.'], ['q2', 'Half an ans', null]]);
      assert.deepEqual(s.dialogRequests.map((r) => r.method + ' ' + r.url),
                       ['GET /api/dialogs', 'GET /api/dialogs/d1/history?limit=50', 'GET /api/dialogs/d1/history?limit=100']);
      assert.deepEqual(page.consoleErrors(), []);
    });
  } finally {
    await s.close();
  }
});
