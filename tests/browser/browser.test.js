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

          await page.click('#new-dialog');
          await h.ask(page, 'hello', {transport: 'eventsource', serverUrl: proxy.url, context: SHORT});
          t = await h.turnEnded(page);
          assert.equal(t.state, 'done', JSON.stringify(t.notices));
          assert.equal(t.chunks, 5);
          const getReq = proxy.api('GET')[0];
          assert.equal(getReq.headers.origin, origin.origin);
          assert.equal(getReq.resHeaders['access-control-allow-origin'], origin.origin);
          assert.deepEqual(page.consoleErrors(), []);
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
async function startScripted() {
  const chatHtml = fs.readFileSync(h.CHAT_PAGE, 'utf8');
  const s = {releases: [], requests: []};
  const server = http.createServer((req, res) => {
    if (req.url === '/') {
      res.writeHead(200, {'Content-Type': 'text/html; charset=utf-8'});
      res.end(chatHtml);
      return;
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
        if (transport === 'fetch') {  // the second question carries the dialog and the history
          await h.ask(page, 'cut it', {transport});
          await page.waitForFunction(() => document.querySelector('.turn:last-of-type [data-role=content]')?.textContent === 'Hello, ',
                                     {timeout: 20000});
          const sent = JSON.parse(s.requests.at(-1).body);
          assert.equal(sent.dialog_id, 'd1');
          assert.deepEqual(sent.messages.map((m) => m.role), ['user', 'assistant', 'user']);
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
