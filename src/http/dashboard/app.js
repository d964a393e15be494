// eventsys dashboard: plain JavaScript, no framework and no build step, so
// the binary can embed it and it runs offline. It only uses the public HTTP
// API (API.md), the same one curl users have: the page is a client like any
// other, which keeps it honest.
//
// Data flow: /topology once, to draw the diagram; /tables, /queues and
// /handlers polled every POLL_MS for the figures (cheap snapshots); the
// change log live from /events/stream (Server-Sent Events) for the feed and
// for instant flashes. If the stream is missing or drops, polling goes on.
'use strict';

const POLL_MS = 500;
const FEED_MAX = 150; // rows kept in the live feed: enough to read, cheap to render
const PAGE_SIZE = 20; // records per page in the inspector
const SCAN_PAGES = 50; // causation lookups scan at most this many /events pages of 1000

const SVG_NS = 'http://www.w3.org/2000/svg';
const $ = (selector, root = document) => root.querySelector(selector);

const state = {
  topology: null,
  nodes: new Map(), // node id -> { kind, group, shape } for the SVG elements
  signatures: new Map(), // node id -> last figures seen, so only real changes flash
  queues: new Map(), // queue name -> last /queues entry (handlers read `retried` from it)
  deadLetterSignatures: new Map(), // queue name -> counters when its dead letters were fetched
  tick: 0,
  inspect: { table: null, cursors: [null], count: 0, signature: '' },
  feed: { paused: false, held: [], pending: [] },
  stream: { abort: null, retry: null, lastId: null },
};

// ---------------------------------------------------------------- helpers

/** Creates an element (HTML or SVG) with attributes and children. */
function el(tag, attrs = {}, ...children) {
  const svg = ['svg', 'g', 'path', 'rect', 'ellipse', 'polygon', 'text', 'tspan', 'title', 'marker', 'defs'].includes(tag);
  const node = svg ? document.createElementNS(SVG_NS, tag) : document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'text') node.textContent = value;
    else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? '' : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

// ---------------------------------------------------------------- access

/**
 * The token this tab was given, if the server asks for one. It is kept in
 * sessionStorage: for this tab only, gone when it closes.
 */
const TOKEN_KEY = 'eventsys-token';
const auth = { token: sessionStorage.getItem(TOKEN_KEY), role: 'operator', name: 'anonymous' };

/** Headers that carry the token, if there is one. */
function withToken(headers) {
  if (auth.token) headers.authorization = `Bearer ${auth.token}`;
  return headers;
}

/** Asks for a token (when the server wants one, or the one given was refused), then starts again. */
function askForToken(message) {
  const form = $('#auth');
  $('#auth-message').textContent = message;
  form.hidden = false;
  form.onsubmit = (e) => {
    e.preventDefault();
    const token = $('#auth-token').value.trim();
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    location.reload();
  };
  $('#auth-token').focus();
}

/**
 * Learns the caller's role, and hides the controls it cannot use (elements
 * marked `data-needs="producer"` or `"operator"`, by the style sheet).
 * False when the server wants a token it was not given.
 */
async function identify() {
  try {
    const me = await api('GET', '/whoami');
    Object.assign(auth, { role: me.role, name: me.name });
    document.body.dataset.role = me.role;
    if (me.tokens) {
      $('#whoami').hidden = false;
      $('#whoami-name').textContent = `${me.name} · ${me.role}`;
      $('#whoami-forget').onclick = () => { sessionStorage.removeItem(TOKEN_KEY); location.reload(); };
    }
    return true;
  } catch (error) {
    if (error.status !== 401) throw error;
    askForToken(auth.token ? 'The server does not know that token; enter another.' : 'This server asks for a token.');
    return false;
  }
}

/** Calls the API; a failure throws an Error carrying the problem+json `detail`. */
async function api(method, path, body) {
  const init = { method, headers: withToken({ accept: 'application/json' }) };
  if (body !== undefined) {
    init.headers['content-type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const text = await response.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch {
    // Not JSON (should not happen on this API): keep the text for the message.
  }
  if (!response.ok) {
    const error = new Error((json && json.detail) || text || `${response.status} ${response.statusText}`);
    error.status = response.status;
    throw error;
  }
  return json;
}

/** Shows an API error in the page: a person driving the demo must see why a click did nothing. */
function showError(context, error) {
  const box = $('#errors');
  const message = `${context}: ${error.message || error}`;
  // The same failure repeated (say, every poll) stays one line.
  for (const line of box.children) if (line.dataset.message === message) return;
  const line = el('div', { class: 'error', 'data-message': message },
    el('span', { text: message }),
    el('button', { type: 'button', class: 'dismiss', 'aria-label': 'dismiss', text: '×', onclick: () => line.remove() }));
  box.append(line);
  while (box.children.length > 5) box.firstChild.remove();
}

/** Restarts a node's flash animation (removing the class alone would not replay it). */
function flash(element) {
  if (!element) return;
  element.classList.remove('flash');
  void element.getBoundingClientRect(); // force a style flush so the animation starts again
  element.classList.add('flash');
}

/** Polls `check` until it returns a truthy value, for at most `ms`. */
async function waitFor(check, ms = 15000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error('timed out waiting for the pipeline');
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

let uidCounter = 0;
/** A suffix unique per click, so repeated demo runs add records instead of no-ops. */
function uid() {
  uidCounter += 1;
  return `${Date.now().toString(36)}${uidCounter.toString(36)}`;
}

const fmt = (n) => (typeof n === 'number' ? n.toLocaleString('en') : '–');
const tableOf = (event) => String(event.source || '').replace(/^\/tables\//, '');
const changeOf = (event) => String(event.type || '').replace(/^eventsys\.record\./, '');

// ---------------------------------------------------------------- diagram

const NODE_W = 170;
const NODE_H = 84;
const COL_GAP = 84;
const ROW_GAP = 16;
const MARGIN = { left: 56, top: 14, right: 14, bottom: 52 };

/**
 * Places nodes in columns by flow depth. Edges from a handler back into a
 * table that feeds a queue (the recursive series -> episodes loop) are drawn
 * as feedback, so the rest is acyclic and can be ranked by longest path.
 */
function layout(topology) {
  const kind = new Map(topology.nodes.map((n) => [n.id, n.kind]));
  const feedsQueue = new Set(topology.edges.filter((e) => kind.get(e.to) === 'queue').map((e) => e.from));
  const loopsBack = (e) => kind.get(e.from) === 'handler' && feedsQueue.has(e.to);
  // Any other cycle (the saga's new attempt back onto encode_queue) is
  // broken at the edge a depth-first walk from the sources closes it with.
  const closing = new Set();
  const onPath = new Set();
  const seen = new Set();
  const walk = (id) => {
    seen.add(id);
    onPath.add(id);
    for (const e of topology.edges) {
      if (e.from !== id || loopsBack(e)) continue;
      if (onPath.has(e.to)) closing.add(e);
      else if (!seen.has(e.to)) walk(e.to);
    }
    onPath.delete(id);
  };
  const targets = new Set(topology.edges.map((e) => e.to));
  for (const n of topology.nodes) if (!targets.has(n.id) && !seen.has(n.id)) walk(n.id);
  const isFeedback = (e) => loopsBack(e) || closing.has(e);
  const forward = topology.edges.filter((e) => !isFeedback(e));

  // Longest-path ranks (Kahn's algorithm); anything left in a cycle stays at 0.
  const rank = new Map(topology.nodes.map((n) => [n.id, 0]));
  const indegree = new Map(topology.nodes.map((n) => [n.id, 0]));
  for (const e of forward) indegree.set(e.to, (indegree.get(e.to) || 0) + 1);
  const ready = topology.nodes.filter((n) => indegree.get(n.id) === 0).map((n) => n.id);
  while (ready.length) {
    const id = ready.shift();
    for (const e of forward.filter((edge) => edge.from === id)) {
      rank.set(e.to, Math.max(rank.get(e.to), rank.get(id) + 1));
      indegree.set(e.to, indegree.get(e.to) - 1);
      if (indegree.get(e.to) === 0) ready.push(e.to);
    }
  }

  const columns = [];
  for (const n of topology.nodes) (columns[rank.get(n.id)] ||= []).push(n.id);
  const tallest = Math.max(...columns.map((c) => (c ? c.length : 0)));
  const pitch = NODE_H + ROW_GAP;
  const height = tallest * pitch;
  const position = new Map();
  columns.forEach((column, c) => {
    if (!column) return;
    const x = MARGIN.left + c * (NODE_W + COL_GAP);
    // A full column is spread evenly; a sparse one sits level with what feeds it.
    const wanted = column.map((id, i) => {
      const from = forward.filter((e) => e.to === id && position.has(e.from)).map((e) => position.get(e.from).y);
      const even = MARGIN.top + (height - column.length * pitch) / 2 + i * pitch;
      return column.length === tallest || !from.length ? even : from.reduce((a, b) => a + b) / from.length;
    });
    let floor = MARGIN.top;
    column.forEach((id, i) => {
      const y = Math.max(wanted[i], floor);
      position.set(id, { x, y });
      floor = y + pitch;
    });
  });
  const width = MARGIN.left + columns.length * (NODE_W + COL_GAP) - COL_GAP + MARGIN.right;
  return { position, width, height: MARGIN.top + height + MARGIN.bottom, isFeedback };
}

/** The outline of each kind of node: cylinder, parallelogram or box. */
function shape(kind, w, h) {
  if (kind === 'table') {
    const ry = 8;
    return [
      el('path', { class: 'shape', d: `M0,${ry} A${w / 2},${ry} 0 0 1 ${w},${ry} V${h - ry} A${w / 2},${ry} 0 0 1 0,${h - ry} Z` }),
      el('ellipse', { class: 'lid', cx: w / 2, cy: ry, rx: w / 2, ry }),
    ];
  }
  if (kind === 'queue') {
    const skew = 14;
    return [el('polygon', { class: 'shape', points: `${skew},0 ${w},0 ${w - skew},${h} 0,${h}` })];
  }
  return [el('rect', { class: 'shape', width: w, height: h, rx: 3 }), el('path', { class: 'lid', d: `M8,0 V${h} M${w - 8},0 V${h}` })];
}

/** The live figures inside a node; classes are what updates (and tests) look for. */
function figures(kind, w) {
  const text = (attrs, value = '') => el('text', attrs, value);
  if (kind === 'table') {
    return [
      text({ class: 'count', x: w / 2, y: 50, 'text-anchor': 'middle' }, '–'),
      text({ class: 'drops', x: w / 2, y: 70, 'text-anchor': 'middle' }, ''),
    ];
  }
  if (kind === 'queue') {
    return [
      el('rect', { class: 'bar-bg', x: 22, y: 32, width: w - 44, height: 12, rx: 2 }),
      el('rect', { class: 'bar', x: 22, y: 32, width: 0, height: 12, rx: 2 }),
      text({ class: 'depth', x: w / 2, y: 60, 'text-anchor': 'middle' }, ''),
      text({ class: 'flow', x: w / 2, y: 76, 'text-anchor': 'middle' }, ''),
    ];
  }
  return [
    text({ class: 'processed', x: w / 2, y: 40, 'text-anchor': 'middle' }, ''),
    text({ class: 'failures', x: w / 2, y: 57, 'text-anchor': 'middle' }, ''),
    text({ class: 'circuit', x: w / 2, y: 74, 'text-anchor': 'middle' }, ''),
  ];
}

function drawDiagram(topology) {
  const svg = $('#diagram');
  const { position, width, height, isFeedback } = layout(topology);
  svg.setAttribute('viewBox', `0 0 ${width} ${height}`);
  svg.replaceChildren(el('defs', {},
    el('marker', { id: 'arrow', viewBox: '0 0 10 10', refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: 'auto-start-reverse' },
      el('path', { d: 'M0,0 L10,5 L0,10 z', class: 'arrowhead' }))));

  const edges = el('g', { class: 'edges' });
  const labels = el('g', { class: 'labels' });
  const labelled = new Set(); // each label is drawn once: several edges share one, e.g. "change"
  const bottom = height - MARGIN.bottom + 26;
  for (const edge of topology.edges) {
    const a = position.get(edge.from);
    const b = position.get(edge.to);
    if (!a || !b) continue;
    let d;
    let mid;
    if (isFeedback(edge)) {
      // Down from the handler, along the bottom, up the left margin, into the table.
      const sx = a.x + NODE_W / 2;
      const lx = MARGIN.left - 30;
      const ty = b.y + NODE_H / 2;
      d = `M${sx},${a.y + NODE_H} V${bottom} H${lx} V${ty} H${b.x}`;
      mid = { x: (sx + lx) / 2, y: bottom - 6 };
    } else {
      const x1 = a.x + NODE_W;
      const y1 = a.y + NODE_H / 2;
      const x2 = b.x;
      const y2 = b.y + NODE_H / 2;
      const bend = (x2 - x1) / 2;
      d = `M${x1},${y1} C${x1 + bend},${y1} ${x2 - bend},${y2} ${x2},${y2}`;
      mid = { x: (x1 + x2) / 2, y: (y1 + y2) / 2 - 6 };
    }
    edges.append(el('path', {
      class: `edge${isFeedback(edge) ? ' feedback' : ''}`, d, 'marker-end': 'url(#arrow)',
      'data-from': edge.from, 'data-to': edge.to, 'data-scenarios': edge.scenarios.join(' '),
    }, el('title', { text: `${edge.from} → ${edge.to}: ${edge.label}` })));
    if (!labelled.has(edge.label)) {
      labelled.add(edge.label);
      // Labels between columns wrap to fit the gap; the long bottom run has room.
      const lines = isFeedback(edge) ? [edge.label] : wrap(edge.label, 11);
      const top = mid.y - (lines.length - 1) * 6;
      labels.append(el('text', { class: 'edge-label', 'text-anchor': 'middle', 'data-scenarios': edge.scenarios.join(' ') },
        lines.map((line, i) => el('tspan', { x: mid.x, y: top + i * 12 }, line))));
    }
  }

  const nodes = el('g', { class: 'nodes' });
  for (const node of topology.nodes) {
    const { x, y } = position.get(node.id);
    const group = el('g', {
      class: `node ${node.kind}${node.id.startsWith('raw_') ? ' raw' : ''}`,
      transform: `translate(${x},${y})`, tabindex: 0, role: 'button',
      'data-node': node.id, 'data-kind': node.kind, 'data-scenarios': node.scenarios.join(' '),
      onclick: () => selectNode(node),
      onkeydown: (e) => { if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); selectNode(node); } },
    },
    el('title', { text: `${node.kind} ${node.id} · scenarios ${node.scenarios.join(', ')}` }),
    shape(node.kind, NODE_W, NODE_H),
    el('text', { class: 'name', x: NODE_W / 2, y: node.kind === 'table' ? 28 : 20, 'text-anchor': 'middle' }, node.id),
    figures(node.kind, NODE_W));
    nodes.append(group);
    state.nodes.set(node.id, { kind: node.kind, group });
  }
  svg.append(edges, labels, nodes);
}

/** Splits a label into lines of at most `width` characters, at spaces. */
function wrap(label, width) {
  const lines = [];
  for (const word of label.split(' ')) {
    const last = lines.length - 1;
    if (last >= 0 && lines[last].length + 1 + word.length <= width) lines[last] += ` ${word}`;
    else lines.push(word);
  }
  return lines;
}

/** Dims everything outside one scenario, so its path stands out. */
function focusScenario(number) {
  for (const item of document.querySelectorAll('#diagram [data-scenarios]')) {
    const inside = number === null || item.dataset.scenarios.split(' ').includes(String(number));
    item.classList.toggle('dim', !inside);
  }
}

function drawScenarioChips(topology) {
  const chips = $('#scenario-chips');
  chips.replaceChildren(...topology.scenarios.map((s) => el('button', {
    type: 'button', class: 'chip', 'data-scenario': s.number, title: s.summary,
    onmouseenter: () => focusScenario(s.number), onmouseleave: () => focusScenario(null),
    onfocus: () => focusScenario(s.number), onblur: () => focusScenario(null),
  }, `${s.number} · ${s.name}`)));
  // The "Drive it" cards highlight their scenario too.
  for (const card of document.querySelectorAll('#drive .card')) {
    card.addEventListener('mouseenter', () => focusScenario(Number(card.dataset.scenario)));
    card.addEventListener('mouseleave', () => focusScenario(null));
  }
}

/** Clicking a node opens what there is to do with it. */
function selectNode(node) {
  if (node.kind === 'table') {
    $('#inspect-table').value = node.id;
    inspectTable(node.id);
    $('#inspect').scrollIntoView({ behavior: 'smooth', block: 'start' });
  } else {
    const target = node.kind === 'queue' ? `#dead-letters-${node.id}` : `#fault-${node.id}`;
    $(target)?.scrollIntoView({ behavior: 'smooth', block: 'center' });
    flash($(target));
  }
}

// ---------------------------------------------------------------- figures

/** Sets a node's texts; flashes it when they differ from the last poll. */
function setFigures(id, texts, extra) {
  const node = state.nodes.get(id);
  if (!node) return;
  for (const [cls, value] of Object.entries(texts)) {
    const text = node.group.querySelector(`.${cls}`);
    if (text && text.textContent !== value) text.textContent = value;
  }
  if (extra) extra(node.group);
  const signature = JSON.stringify(texts);
  const before = state.signatures.get(id);
  state.signatures.set(id, signature);
  if (before !== undefined && before !== signature) flash(node.group);
}

function showTables(tables) {
  for (const t of tables) {
    // Views (scenario 5) are drawn apart: only their handler writes them.
    document.querySelector(`[data-node="${t.name}"]`)?.classList.toggle('view', t.kind === 'view');
    setFigures(t.name, {
      count: fmt(t.count),
      drops: `stale ${fmt(t.stats.stale)} · no-op ${fmt(t.stats.unchanged)}`,
    });
  }
  const current = tables.find((t) => t.name === state.inspect.table);
  if (current) {
    // Refresh the open page when its table changed, so the inspector stays live.
    const signature = JSON.stringify(current.stats) + current.count;
    if (state.inspect.signature && signature !== state.inspect.signature) loadPage();
    state.inspect.signature = signature;
  }
}

function showQueues(queues) {
  for (const q of queues) {
    state.queues.set(q.name, q);
    const fill = q.capacity ? Math.min(1, q.depth / q.capacity) : 0;
    setFigures(q.name, {
      depth: `${fmt(q.depth)} / ${fmt(q.capacity)} queued`,
      flow: `in-flight ${fmt(q.in_flight)} · backlog ${fmt(q.backlog ?? q.depth)}`,
    }, (group) => {
      const bar = group.querySelector('.bar');
      const full = Number(group.querySelector('.bar-bg').getAttribute('width'));
      // A queue holding anything shows at least a sliver, even at 1/1024.
      bar.setAttribute('width', q.depth > 0 ? Math.max(3, fill * full) : 0);
      bar.classList.toggle('high', fill > 0.8);
    });
    // Dead letters are fetched only when this queue's counters move.
    const signature = `${q.enqueued}/${q.processed}/${q.failed}/${q.dead_lettered}/${q.retried}`;
    if (state.deadLetterSignatures.get(q.name) !== signature) {
      state.deadLetterSignatures.set(q.name, signature);
      loadDeadLetters(q.name);
    }
  }
}

function showHandlers(handlers) {
  for (const h of handlers) {
    const queue = state.queues.get(h.queue);
    setFigures(h.name, {
      processed: `processed ${fmt(h.processed)}`,
      failures: `failed ${fmt(h.failed)} · retried ${fmt(queue ? queue.retried : undefined)}`,
      circuit: `circuit ${h.circuit.replace('_', '-')}`,
    }, (group) => { group.dataset.circuit = h.circuit; });
    const badge = $(`#circuit-${h.name}`);
    if (badge) {
      badge.textContent = `circuit ${h.circuit.replace('_', '-')}`;
      badge.dataset.circuit = h.circuit;
    }
  }
}

function setBadge(id, stateName, text) {
  const badge = $(id);
  badge.dataset.state = stateName;
  badge.textContent = text;
}

/** One poll of the snapshots; schedules the next only when this one ends, so polls never pile up. */
async function poll() {
  try {
    // /queues first in the same batch: handlers show their queue's `retried`.
    const [tables, queues, handlers] = await Promise.all([api('GET', '/tables'), api('GET', '/queues'), api('GET', '/handlers')]);
    showTables(tables.tables);
    showQueues(queues.queues);
    showHandlers(handlers.handlers);
    if (state.tick % 4 === 0) await loadFaults();
    state.tick += 1;
    setBadge('#poll-status', 'ok', 'figures: live');
  } catch (error) {
    setBadge('#poll-status', 'down', 'figures: server unreachable');
  } finally {
    // A hidden tab polls slowly: nobody is watching.
    setTimeout(poll, document.hidden ? POLL_MS * 8 : POLL_MS);
  }
}

// ---------------------------------------------------------------- event stream and feed

/**
 * Subscribes to the change log, with `fetch` rather than EventSource
 * (which cannot send the token). Without a cursor the server starts at
 * the latest event, which is what a dashboard wants: what happens now.
 * When the stream breaks it resumes from the last event seen (sending
 * Last-Event-ID, as EventSource would); `lagged` means we fell too far
 * behind, and a 410 that our cursor is gone: both start again from now.
 */
function connectStream() {
  clearTimeout(state.stream.retry);
  if (state.stream.abort) state.stream.abort.abort();
  const abort = new AbortController();
  state.stream.abort = abort;
  const headers = withToken({ accept: 'text/event-stream' });
  if (state.stream.lastId) headers['last-event-id'] = state.stream.lastId;
  const again = (badge, text, ms) => {
    if (abort.signal.aborted) return;
    setBadge('#stream-status', badge, text);
    state.stream.retry = setTimeout(connectStream, ms);
  };
  fetch('/events/stream', { headers, signal: abort.signal }).then(async (response) => {
    if (!response.ok) {
      // Our cursor is no longer retained (410), or the stream is refused:
      // try again later from the present.
      state.stream.lastId = null;
      again('down', 'events: unavailable (figures still polled)', 5000);
      return;
    }
    setBadge('#stream-status', 'ok', 'events: live');
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, '');
        if (dispatch(block) === 'lagged') {
          state.stream.lastId = null;
          setBadge('#stream-status', 'warn', 'events: fell behind, catching up');
          connectStream();
          return;
        }
      }
    }
    again('warn', 'events: reconnecting', 1000);
  }).catch(() => again('warn', 'events: reconnecting', 2000));
}

/** One server-sent event block: hands a change to `receive`; returns the event's name. */
function dispatch(block) {
  let name = 'message';
  const data = [];
  for (const line of block.split(/\r?\n/)) {
    if (line.startsWith(':')) continue;
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
    if (field === 'event') name = value;
    else if (field === 'data') data.push(value);
    else if (field === 'id') state.stream.lastId = value;
  }
  if (name === 'lagged' || data.length === 0) return name;
  try {
    receive(JSON.parse(data.join('\n')));
  } catch {
    // not a change
  }
  return name;
}

/** One change from the stream: flash its table now, and queue it for the feed. */
function receive(event) {
  flash(state.nodes.get(tableOf(event))?.group);
  if (state.feed.paused) {
    state.feed.held.push(event);
    if (state.feed.held.length > FEED_MAX) state.feed.held.shift();
    $('#feed-note').textContent = `paused · ${state.feed.held.length} held`;
    return;
  }
  state.feed.pending.push(event);
  // Rendering once per frame keeps a burst of thousands of events cheap.
  if (state.feed.pending.length === 1) requestAnimationFrame(renderFeed);
}

function renderFeed() {
  const feed = $('#feed');
  const filter = $('#feed-filter').value;
  const rows = state.feed.pending.slice(-FEED_MAX).map(feedRow);
  state.feed.pending = [];
  feed.prepend(...rows.reverse());
  while (feed.children.length > FEED_MAX) feed.lastChild.remove();
  if (filter) applyFeedFilter();
}

function feedRow(event) {
  const table = tableOf(event);
  const change = changeOf(event);
  const time = event.time ? new Date(event.time).toLocaleTimeString('en', { hour12: false }) : '';
  return el('li', { 'data-table': table, 'data-change': change, title: `correlation ${event.correlationid || '–'}` },
    el('span', { class: 'seq', text: `#${event.sequence ?? event.id}` }),
    el('span', { class: 'time', text: time }),
    el('span', { class: `change ${change}`, text: change }),
    el('span', { class: 'table', text: table }),
    el('a', { href: '#', class: 'subject', text: event.subject || '', onclick: (e) => { e.preventDefault(); openRecord(table, event.subject); } }));
}

function applyFeedFilter() {
  const filter = $('#feed-filter').value;
  for (const row of $('#feed').children) row.hidden = Boolean(filter) && row.dataset.table !== filter;
}

/** The topology's tables, and the audit trail of operator actions, which is in no scenario. */
function tableNames(topology) {
  return [...topology.nodes.filter((n) => n.kind === 'table').map((n) => n.id), 'audit'];
}

function setupFeed(topology) {
  const tables = tableNames(topology);
  $('#feed-filter').append(...tables.map((t) => el('option', { value: t, text: t })));
  $('#feed-filter').addEventListener('change', applyFeedFilter);
  $('#feed-pause').addEventListener('click', () => {
    const paused = !state.feed.paused;
    state.feed.paused = paused;
    $('#feed-pause').textContent = paused ? 'Resume' : 'Pause';
    $('#feed-pause').setAttribute('aria-pressed', String(paused));
    if (!paused) {
      // Events held while paused are shown on resume, in order.
      const held = state.feed.held;
      state.feed.held = [];
      $('#feed-note').textContent = '';
      for (const event of held) state.feed.pending.push(event);
      if (state.feed.pending.length) requestAnimationFrame(renderFeed);
    } else {
      $('#feed-note').textContent = 'paused';
    }
  });
  $('#feed-clear').addEventListener('click', () => $('#feed').replaceChildren());
}

// ---------------------------------------------------------------- inspector

function setupInspector(topology) {
  const select = $('#inspect-table');
  const tables = tableNames(topology);
  select.append(...tables.map((t) => el('option', { value: t, text: t })));
  select.addEventListener('change', () => inspectTable(select.value));
  $('#records-first').addEventListener('click', () => { state.inspect.cursors = [null]; loadPage(); });
  $('#records-prev').addEventListener('click', () => {
    if (state.inspect.cursors.length > 1) state.inspect.cursors.pop();
    loadPage();
  });
  $('#records-next').addEventListener('click', () => {
    const next = $('#records-next').dataset.after;
    if (next) {
      state.inspect.cursors.push(next);
      loadPage();
    }
  });
  inspectTable(tables.includes('episodes') ? 'episodes' : tables[0]);
}

function inspectTable(table) {
  state.inspect = { table, cursors: [null], count: 0, signature: '' };
  $('#inspect-table').value = table;
  loadPage();
}

/** Loads the current page of the inspected table (`after` cursors are kept as a stack for Previous). */
async function loadPage() {
  const { table, cursors } = state.inspect;
  if (!table) return;
  const after = cursors[cursors.length - 1];
  const query = `limit=${PAGE_SIZE}${after ? `&after=${encodeURIComponent(after)}` : ''}`;
  try {
    const page = await api('GET', `/tables/${encodeURIComponent(table)}?${query}`);
    if (state.inspect.table !== table) return; // the user moved on while this loaded
    $('#inspect-count').textContent = `${fmt(page.count)} records`;
    $('#records tbody').replaceChildren(...(page.records.length ? page.records.map((record) => el('tr', {
      'data-record': record.id, tabindex: 0,
      onclick: () => openRecord(table, record.id),
      onkeydown: (e) => { if (e.key === 'Enter') openRecord(table, record.id); },
    },
    el('td', { class: 'id', text: record.id }),
    el('td', { class: 'version', text: record.version }),
    el('td', { class: 'summary', text: summary(record.data) }))) : [el('tr', {}, el('td', { colspan: 3, class: 'muted', text: 'no records yet: try a button under "Drive it"' }))]));
    const first = (cursors.length - 1) * PAGE_SIZE + 1;
    $('#records-page').textContent = page.records.length ? `${first}–${first + page.records.length - 1} of ${fmt(page.count)}` : '';
    $('#records-next').disabled = !page.next;
    $('#records-prev').disabled = cursors.length <= 1;
    if (page.next) $('#records-next').dataset.after = page.next;
    else delete $('#records-next').dataset.after;
  } catch (error) {
    showError(`GET /tables/${table}`, error);
  }
}

/** A short line for a record: its title or name, else its first fields. */
function summary(data) {
  if (!data || typeof data !== 'object') return String(data);
  const { id, ...rest } = data;
  const lead = rest.title || rest.name;
  const text = lead ? `${lead}  ${JSON.stringify(rest)}` : JSON.stringify(rest);
  return text.length > 90 ? `${text.slice(0, 89)}…` : text;
}

async function openRecord(table, id) {
  const detail = $('#record-detail');
  detail.hidden = false;
  detail.dataset.table = table;
  detail.dataset.record = id;
  $('#record-title').textContent = `${table} / ${id}`;
  $('#causation').replaceChildren(el('li', { class: 'muted', text: 'scanning the change log…' }));
  $('#correlated').replaceChildren();
  try {
    const record = await api('GET', `/tables/${encodeURIComponent(table)}/${encodeURIComponent(id)}`);
    $('#record-version').textContent = record.version;
    $('#record-data').textContent = JSON.stringify(record.data, null, 2);
  } catch (error) {
    // A deleted record has no data left, but its history still explains why.
    $('#record-version').textContent = '–';
    $('#record-data').textContent = error.status === 404 ? '(not in the table: deleted or not yet written)' : error.message;
  }
  detail.scrollIntoView({ behavior: 'smooth', block: 'nearest' });
  showCausation(table, id);
}

/**
 * The chain of changes behind a record. /events has no filter by table or
 * record, so we scan the retained log in pages (bounded), keep every event
 * by id, then walk `causationid` back from the record's latest change.
 */
async function showCausation(table, id) {
  const chain = $('#causation');
  const byId = new Map();
  const history = [];
  let after = 0;
  let truncated = false;
  try {
    for (let page = 0; ; page += 1) {
      if (page === SCAN_PAGES) { truncated = true; break; }
      const result = await api('GET', `/events?after=${after}&limit=1000`);
      for (const event of result.events) {
        byId.set(event.id, event);
        if (tableOf(event) === table && event.subject === id) history.push(event);
      }
      if (!result.events.length || result.next === after) break;
      after = result.next;
    }
  } catch (error) {
    chain.replaceChildren(el('li', { class: 'muted', text: `the change log is not available (${error.message})` }));
    return;
  }
  if ($('#record-detail').dataset.record !== id) return; // another record was opened meanwhile

  const steps = [];
  const seen = new Set();
  for (let event = history[history.length - 1]; event && !seen.has(event.id);) {
    seen.add(event.id);
    steps.push(event);
    const cause = event.causationid && event.causationid !== event.id ? byId.get(event.causationid) : null;
    if (!cause && event.causationid && event.causationid !== event.id) {
      steps.push({ missing: event.causationid });
    }
    event = cause;
  }
  const items = steps.map((step, i) => step.missing
    ? el('li', { class: 'muted', text: `caused by ${step.missing} (not a table change: e.g. a queued job)` })
    : el('li', { 'data-seq': step.sequence },
      el('span', { class: `change ${changeOf(step)}`, text: changeOf(step) }),
      ` ${tableOf(step)} / `, el('code', { text: step.subject }),
      el('span', { class: 'muted', text: ` · #${step.sequence} · ${step.time || ''}${i === 0 ? ' · latest change' : ''}` })));
  if (!items.length) items.push(el('li', { class: 'muted', text: 'no retained change for this record' }));
  if (truncated) items.push(el('li', { class: 'muted', text: `only the oldest ${SCAN_PAGES * 1000} events were scanned` }));
  chain.replaceChildren(...items);

  // Everything else that the same request caused: the fan-out of one write.
  const correlation = history.length ? history[history.length - 1].correlationid : null;
  if (correlation) {
    const related = [...byId.values()].filter((e) => e.correlationid === correlation && !seen.has(e.id));
    $('#correlated').replaceChildren(
      el('h4', { text: `Same request (${related.length} more change${related.length === 1 ? '' : 's'})` }),
      el('ul', { class: 'related' }, related.slice(0, 30).map((e) => el('li', {},
        el('span', { class: `change ${changeOf(e)}`, text: changeOf(e) }), ` ${tableOf(e)} / ${e.subject}`))));
  }
  $('#record-detail').dataset.history = String(history.length);
}

// ---------------------------------------------------------------- operate: dead letters and faults

function setupOperate(topology) {
  const queues = topology.nodes.filter((n) => n.kind === 'queue').map((n) => n.id);
  const handlers = topology.nodes.filter((n) => n.kind === 'handler').map((n) => n.id);
  $('#queues-ops').replaceChildren(...queues.map((queue) => el('div', { class: 'ops', id: `dead-letters-${queue}`, 'data-queue': queue },
    el('div', { class: 'ops-head' },
      el('strong', { text: queue }),
      el('span', { class: 'dl-count muted', text: '0 dead letters' }),
      el('span', { class: 'spacer' }),
      el('button', { type: 'button', id: `redrive-${queue}`, onclick: () => redrive(queue) }, 'Redrive'),
      el('button', { type: 'button', id: `discard-${queue}`, class: 'danger', onclick: (e) => discard(queue, e.currentTarget) }, 'Discard')),
    el('ol', { class: 'dl-list' }))));
  $('#handlers-ops').replaceChildren(...handlers.map((handler) => el('form', { class: 'ops', id: `fault-${handler}`, 'data-handler': handler,
    onsubmit: (e) => { e.preventDefault(); applyFault(handler, e.currentTarget); } },
  el('div', { class: 'ops-head' },
    el('strong', { text: handler }),
    el('span', { class: 'circuit-badge', id: `circuit-${handler}`, text: 'circuit –' }),
    el('span', { class: 'spacer' }),
    el('span', { class: 'fault-state muted', id: `fault-state-${handler}`, text: 'no fault' })),
  el('div', { class: 'fault-fields' },
    el('label', {}, 'failure rate ', el('input', { type: 'number', name: 'failure_rate', min: 0, max: 1, step: 0.05, value: 0.5, required: true })),
    el('label', {}, el('input', { type: 'checkbox', name: 'permanent' }), ' permanent'),
    el('label', {}, 'delay ms ', el('input', { type: 'number', name: 'delay_ms', min: 0, max: 60000, step: 50, value: 0, required: true }))),
  el('div', { class: 'fault-buttons' },
    el('button', { type: 'submit', id: `fault-apply-${handler}` }, 'Inject fault'),
    el('button', { type: 'button', id: `fault-clear-${handler}`, class: 'secondary', onclick: () => clearFault(handler) }, 'Clear fault')))));
}

async function loadDeadLetters(queue) {
  const box = $(`#dead-letters-${queue}`);
  if (!box) return;
  try {
    const { dead_letters: letters } = await api('GET', `/queues/${encodeURIComponent(queue)}/dead-letters`);
    box.querySelector('.dl-count').textContent = `${fmt(letters.length)} dead letter${letters.length === 1 ? '' : 's'}`;
    box.dataset.count = String(letters.length);
    const shown = letters.slice(-50).reverse(); // newest first; a long list is summarised
    const rows = shown.map((letter) => el('li', { 'data-dead-letter': letter.event.id || '' },
      el('code', { class: 'subject', text: letter.event.subject || letter.event.id || '?' }),
      el('span', { class: 'error-text', text: letter.error }),
      el('span', { class: 'muted', text: `${letter.attempts} attempt${letter.attempts === 1 ? '' : 's'} · ${new Date(letter.failed_at).toLocaleTimeString('en', { hour12: false })}` })));
    if (letters.length > shown.length) rows.push(el('li', { class: 'muted', text: `and ${letters.length - shown.length} older` }));
    box.querySelector('.dl-list').replaceChildren(...rows);
    box.classList.toggle('has-letters', letters.length > 0);
  } catch (error) {
    showError(`GET /queues/${queue}/dead-letters`, error);
  }
}

async function redrive(queue) {
  try {
    const result = await api('POST', `/queues/${encodeURIComponent(queue)}/dead-letters/redrive`);
    flash($(`#dead-letters-${queue}`));
    $(`#dead-letters-${queue} .dl-count`).textContent = `redriven ${fmt(result.redriven)}`;
  } catch (error) {
    showError(`redrive ${queue}`, error);
  }
  loadDeadLetters(queue);
}

/** Discarding loses data, so the button asks for a second click instead of a blocking dialog. */
async function discard(queue, button) {
  if (button.dataset.armed !== '1') {
    button.dataset.armed = '1';
    button.textContent = 'Really discard?';
    setTimeout(() => { button.dataset.armed = ''; button.textContent = 'Discard'; }, 3000);
    return;
  }
  button.dataset.armed = '';
  button.textContent = 'Discard';
  try {
    await api('DELETE', `/queues/${encodeURIComponent(queue)}/dead-letters`);
  } catch (error) {
    showError(`discard ${queue}`, error);
  }
  loadDeadLetters(queue);
}

function describeFault(fault) {
  if (!fault) return 'no fault';
  const parts = [`failing ${Math.round(fault.failure_rate * 100)}%`];
  if (fault.permanent) parts.push('permanent');
  if (fault.delay_ms) parts.push(`+${fault.delay_ms} ms`);
  return parts.join(' · ');
}

function showFault(handler, fault) {
  const label = $(`#fault-state-${handler}`);
  if (!label) return;
  label.textContent = describeFault(fault);
  label.dataset.active = fault ? '1' : '0';
  $(`#fault-${handler}`).classList.toggle('faulty', Boolean(fault));
}

async function loadFaults() {
  const { faults } = await api('GET', '/faults');
  for (const [handler, fault] of Object.entries(faults)) showFault(handler, fault);
}

async function applyFault(handler, form) {
  const body = {
    failure_rate: Number(form.elements.failure_rate.value),
    permanent: form.elements.permanent.checked,
    delay_ms: Number(form.elements.delay_ms.value),
  };
  try {
    const result = await api('PUT', `/faults/${encodeURIComponent(handler)}`, body);
    showFault(handler, result.fault);
  } catch (error) {
    showError(`fault on ${handler}`, error);
  }
}

async function clearFault(handler) {
  try {
    await api('DELETE', `/faults/${encodeURIComponent(handler)}`);
    showFault(handler, null);
  } catch (error) {
    showError(`clear fault on ${handler}`, error);
  }
}

// ---------------------------------------------------------------- scenarios

const post = (kind, records) => api('POST', `/raw/${kind}`, records);
const outcomes = (response) => response.results.map((r) => r.outcome).join(', ');
/** Whether a record is visible in a table yet (404 means not, or no longer). */
async function exists(table, id) {
  try {
    await api('GET', `/tables/${encodeURIComponent(table)}/${encodeURIComponent(id)}`);
    return true;
  } catch (error) {
    if (error.status === 404) return false;
    throw error;
  }
}
const iso = (msAgo) => new Date(Date.now() - msAgo).toISOString();

const scenarios = {
  // 1: mixed schemas on one queue, plus the two writes a table must drop.
  async 1(report) {
    const s = uid();
    const actors = [
      { id: `actor-${s}-1`, name: 'Ada Lovelace', birth_date: '1815-12-10' },
      { id: `actor-${s}-2`, name: 'Alan Turing', birth_date: '1912-06-23' },
    ];
    await post('actors', actors);
    const movie = { id: `movie-${s}`, title: 'The Imitation Game', year: 2014, actor_ids: [actors[1].id], updated_at: iso(60000) };
    const first = await post('movies', movie);
    // The vendor's previous version shows up late: older, so dropped as stale.
    const late = await post('movies', { ...movie, title: 'Imitation Game (working title)', updated_at: iso(120000) });
    // The same record sent again with a fresh timestamp: equal data, a no-op.
    const again = await post('movies', { ...movie, updated_at: iso(0) });
    report(`movie-${s}: ${outcomes(first)}; late older version: ${outcomes(late)}; re-send: ${outcomes(again)}`);
  },

  // 2: a series splits into episodes; a newer version's list is the complete set.
  async 2(report) {
    const s = uid();
    const series = `series-${s}`;
    const episode = (n) => ({ id: `${series}-e${n}`, title: `Episode ${n}`, season: 1, number: n });
    await post('series', { id: series, title: 'The Event Loop', updated_at: iso(1000), episodes: [episode(1), episode(2), episode(3)] });
    report(`${series}: 3 episodes sent, waiting for them to come back through raw_queue…`);
    await waitFor(() => exists('episodes', episode(3).id));
    const v2 = await post('series', { id: series, title: 'The Event Loop', updated_at: iso(0), episodes: [episode(1), episode(2)] });
    report(`${series}: newer version (${outcomes(v2)}) lists 2 episodes; waiting for episode 3's delete…`);
    await waitFor(async () => !(await exists('episodes', episode(3).id)));
    report(`${series}: done, 3 episodes split off, then episode 3 deleted by the newer version`);
  },

  // 3: the video is visible at once; its encodes come later, one job per rendition.
  async 3(report) {
    const s = uid();
    const video = {
      id: `video-${s}`, title: 'Keynote', duration_s: 3600,
      renditions: [
        { id: '360p', codec: 'h264', height: 360, bitrate_kbps: 800 },
        { id: '720p', codec: 'h264', height: 720, bitrate_kbps: 3000 },
        { id: '1080p', codec: 'av1', height: 1080, bitrate_kbps: 4500 },
      ],
    };
    const result = await post('videos', video);
    report(`video-${s}: ${outcomes(result)}; 3 encode jobs on encode_queue (slow on purpose)`);
  },

  // 4: a complete set that leaves one actor out deletes it, downstream too.
  async 4(report) {
    const s = uid();
    const ids = [1, 2, 3].map((n) => `actor-${s}-${n}`);
    const names = ['Grace Hopper', 'Edsger Dijkstra', 'Barbara Liskov'];
    await post('actors', ids.map((id, i) => ({ id, name: names[i], updated_at: iso(1000) })));
    await waitFor(() => exists('actors', ids[2]));
    // The vendor's full export: every actor we hold, re-sent as it is, but the last new one.
    const records = [];
    for (let after = null, page = 0; ; page += 1) {
      if (page === 10) throw new Error('over 10000 raw actors: too many to re-send from the page');
      const result = await api('GET', `/tables/raw_actors?limit=1000${after ? `&after=${encodeURIComponent(after)}` : ''}`);
      for (const r of result.records) if (r.id !== ids[2]) records.push({ ...r.data, id: r.id, updated_at: r.version });
      if (!result.next) break;
      after = result.next;
    }
    const result = await api('PUT', '/raw/actors', { records });
    report(`PUT ${records.length} actors: ${result.unchanged} unchanged, deleted ${result.deleted.join(', ') || 'nothing'}`);
    await waitFor(async () => !(await exists('actors', ids[2])));
    report(`done: ${result.deleted.join(', ')} deleted from raw_actors and then from actors`);
  },

  // 5: the view follows the standard tables, whatever order records arrive in.
  async 5(report) {
    const s = uid();
    const actor = `actor-${s}`;
    const later = { id: `movie-${s}-2`, title: 'Hidden Figures', year: 2016, actor_ids: [actor] };
    await post('movies', { id: `movie-${s}-1`, title: 'The Imitation Game', year: 2014, actor_ids: [actor] });
    report(`movie-${s}-1 names ${actor}, who is not known yet: no filmography entry…`);
    await waitFor(() => exists('movies', `movie-${s}-1`));
    await post('actors', { id: actor, name: 'Katherine Johnson' });
    await waitFor(() => exists('filmography', actor));
    report(`${actor} arrived: filmography has them with movie-${s}-1; now a second movie…`);
    await post('movies', later);
    const entry = await waitFor(async () => {
      const record = await api('GET', `/tables/filmography/${encodeURIComponent(actor)}`);
      return record.data.movies.length === 2 ? record : null;
    });
    report(`filmography/${actor}: ${entry.data.movies.map((m) => `${m.title} (${m.year})`).join(', ')}`);
  },

  // 6: a saga: encodes fail for good, the publication is compensated, a
  // retry after the fault is cleared publishes it.
  async 6(report) {
    const s = uid();
    const video = `video-${s}`;
    const publication = async (status) => {
      try {
        const record = await api('GET', `/tables/publications/${encodeURIComponent(video)}`);
        return record.data.status === status ? record.data : null;
      } catch (error) {
        if (error.status === 404) return null;
        throw error;
      }
    };
    await api('PUT', '/faults/encode_handler', { failure_rate: 1, permanent: true });
    try {
      await post('videos', {
        id: video, title: 'Launch', renditions: [
          { id: '480p', codec: 'h264', height: 480 },
          { id: '1080p', codec: 'av1', height: 1080 },
        ],
      });
      report(`${video}: publication pending; encode_handler fails every job for good…`);
      const compensated = await waitFor(() => publication('compensated'));
      report(`${video}: compensated (${compensated.reason}); clearing the fault and retrying…`);
    } finally {
      await api('DELETE', '/faults/encode_handler');
    }
    const retried = await api('POST', `/publications/${encodeURIComponent(video)}/retry`);
    report(`${video}: attempt ${retried.attempt} re-encodes ${retried.jobs} renditions…`);
    const published = await waitFor(() => publication('published'));
    report(`${video}: published in attempt ${published.attempt}, ${published.done} of ${published.total} encoded`);
  },

  // A record raw_handler cannot standardise: a permanent failure.
  async bad(report) {
    const result = await post('movies', { id: `bad-movie-${uid()}`, title: '   ' });
    report(`raw write ${outcomes(result)}; raw_handler will dead-letter it (empty title)`);
  },
};

function setupScenarios() {
  for (const [key, run] of Object.entries(scenarios)) {
    const button = $(`#scenario-${key}`);
    const result = $(`#scenario-${key}-result`);
    button.addEventListener('click', async () => {
      button.disabled = true;
      result.className = 'result running';
      const report = (text) => { result.textContent = text; };
      report('running…');
      try {
        await run(report);
        result.className = 'result ok';
        result.dataset.done = String(Number(result.dataset.done || 0) + 1);
      } catch (error) {
        result.className = 'result failed';
        report(`failed: ${error.message}`);
        showError(`scenario ${key}`, error);
      } finally {
        button.disabled = false;
      }
    });
  }
}

// ---------------------------------------------------------------- start

async function start() {
  try {
    if (!(await identify())) return;
  } catch (error) {
    showError('GET /whoami', error);
  }
  setupScenarios();
  let topology;
  try {
    topology = await api('GET', '/topology');
  } catch (error) {
    showError('GET /topology', error);
    return;
  }
  state.topology = topology;
  drawDiagram(topology);
  drawScenarioChips(topology);
  setupFeed(topology);
  setupInspector(topology);
  setupOperate(topology);
  connectStream();
  await poll();
  // Marks the page as fully wired; the browser test waits for it.
  document.body.dataset.ready = '1';
}

start();
