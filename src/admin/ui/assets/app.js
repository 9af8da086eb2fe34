// kvgate dashboard: plain JavaScript, no build step, no dependencies.
// Every action is one admin API call (same origin, session cookie, CSRF
// header on state-changing methods); the page can do nothing the API cannot.
'use strict';

const REFRESH_MS = 2000;
const HISTORY = 90; // samples kept for the charts (3 minutes)
const RESULTS = ['HIT', 'MISS', 'STALE', 'REVALIDATED', 'BYPASS'];
const COLORS = { HIT: '#1a7f37', MISS: '#b35900', STALE: '#8250df', REVALIDATED: '#0969da', BYPASS: '#57606a' };

const state = {
  csrf: sessionStorage.getItem('kvgate-csrf'),
  timer: null,
  samples: [], // /stats snapshots, oldest first
  counters: null,
};

const $ = (id) => document.getElementById(id);

// ---------- helpers ----------

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === 'class') e.className = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else if (v !== false && v !== null && v !== undefined) e.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function svg(tag, attrs) {
  const e = document.createElementNS('http://www.w3.org/2000/svg', tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

function fmtBytes(n) {
  if (n === null || n === undefined) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n : n.toFixed(1)) + ' ' + units[i];
}

function fmtPct(x, digits = 1) {
  return x === null || x === undefined || Number.isNaN(x) ? '–' : (x * 100).toFixed(digits) + ' %';
}

function fmtNum(n) {
  return n === null || n === undefined ? '–' : Number(n).toLocaleString('en-US');
}

function fmtSecs(s) {
  if (s < 0) return 'expired ' + fmtSecs(-s) + ' ago';
  if (s < 120) return s + ' s';
  if (s < 7200) return Math.round(s / 60) + ' min';
  if (s < 172800) return Math.round(s / 3600) + ' h';
  return Math.round(s / 86400) + ' d';
}

function say(msg, isError) {
  const s = $('status');
  s.textContent = msg || '';
  s.classList.toggle('error', !!isError);
}

// ---------- the API ----------

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(method, path, body) {
  const headers = {};
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  if (method !== 'GET' && method !== 'HEAD' && state.csrf) headers['X-CSRF-Token'] = state.csrf;
  const r = await fetch(path, {
    method, headers, credentials: 'same-origin', cache: 'no-store',
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = null;
  const text = await r.text();
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = text; }
  if (!r.ok) {
    const message = (data && data.error) || ('HTTP ' + r.status);
    if (r.status === 401 && path !== '/ui/session') signedOut(message);
    throw new ApiError(r.status, message);
  }
  return data;
}

const enc = encodeURIComponent;

// ---------- sign-in ----------

function signedOut(message) {
  state.csrf = null;
  sessionStorage.removeItem('kvgate-csrf');
  stopRefresh();
  $('nav').hidden = true;
  $('sign-out').hidden = true;
  showPage('signin');
  if (message) $('signin-error').textContent = message;
}

async function signIn(ev) {
  ev.preventDefault();
  const button = $('signin-submit');
  const err = $('signin-error');
  err.textContent = '';
  button.disabled = true;
  button.textContent = 'Signing in…';
  try {
    const r = await api('POST', '/ui/session', { token: $('token').value });
    state.csrf = r.csrf;
    sessionStorage.setItem('kvgate-csrf', r.csrf);
    $('token').value = '';
    signedIn();
  } catch (e) {
    err.textContent = e.message;
    $('token').focus();
  } finally {
    button.disabled = false;
    button.textContent = 'Sign in';
  }
}

function signedIn() {
  $('nav').hidden = false;
  $('sign-out').hidden = false;
  $('signin-error').textContent = '';
  if (!location.hash || location.hash === '#signin') location.hash = '#cache';
  route();
}

async function signOut() {
  try { await api('DELETE', '/ui/session'); } catch (_) { /* gone already */ }
  signedOut('');
  say('Signed out.');
}

// ---------- navigation ----------

const PAGES = ['signin', 'cache', 'flags', 'experiments', 'users'];

function showPage(name) {
  for (const p of PAGES) $('page-' + p).hidden = p !== name;
  for (const a of document.querySelectorAll('#nav a')) {
    if (a.dataset.page === name) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  document.title = name.charAt(0).toUpperCase() + name.slice(1) + ' · kvgate';
  if (name === 'signin') $('token').focus();
}

function route() {
  if (!state.csrf) return signedOut('');
  const name = (location.hash || '#cache').slice(1);
  const page = PAGES.includes(name) && name !== 'signin' ? name : 'cache';
  showPage(page);
  say('');
  stopRefresh();
  if (page === 'cache') { refreshCache(); state.timer = setInterval(refreshCache, REFRESH_MS); }
  if (page === 'flags') loadFlags();
  if (page === 'experiments') loadExperiments();
}

function stopRefresh() {
  if (state.timer) clearInterval(state.timer);
  state.timer = null;
}

// ---------- cache page ----------

async function refreshCache() {
  await Promise.all([refreshStats(), loadEntries()]);
}

async function refreshStats() {
  let s;
  try { s = await api('GET', '/stats'); } catch (e) { if (e.status !== 401) say('Cannot read /stats: ' + e.message, true); return; }
  state.samples.push(s);
  if (state.samples.length > HISTORY + 1) state.samples.shift();
  renderStats();
}

/// Rates between consecutive snapshots: one point per interval.
function intervals() {
  const out = [];
  const xs = state.samples;
  for (let i = 1; i < xs.length; i++) {
    const a = xs[i - 1], b = xs[i];
    const dt = Math.max((b.time_ms - a.time_ms) / 1000, 0.001);
    const rps = {};
    let total = 0;
    for (const r of RESULTS) { rps[r] = Math.max(0, (b.requests[r] - a.requests[r]) / dt); total += rps[r]; }
    const dHit = b.requests.HIT - a.requests.HIT;
    const dAll = b.requests_total - a.requests_total;
    const dCount = b.origin.latency_count - a.origin.latency_count;
    const dSum = b.origin.latency_sum_seconds - a.origin.latency_sum_seconds;
    out.push({
      rps, total,
      ratio: dAll > 0 ? dHit / dAll : null,
      latencyMs: dCount > 0 ? (dSum / dCount) * 1000 : null,
    });
  }
  return out;
}

function renderStats() {
  const s = state.samples[state.samples.length - 1];
  const iv = intervals();
  const last = iv[iv.length - 1];
  $('n-hit-ratio').textContent = fmtPct(s.hit_ratio);
  $('n-hit-ratio-sub').textContent = fmtNum(s.requests.HIT) + ' hits of ' + fmtNum(s.requests_total) + ' since start';
  $('n-rps').textContent = last ? last.total.toFixed(1) : '–';
  $('n-rps-sub').textContent = last ? RESULTS.filter((r) => last.rps[r] > 0).map((r) => r + ' ' + last.rps[r].toFixed(1)).join(' · ') : 'measuring…';
  const meanAll = s.origin.latency_count > 0 ? (s.origin.latency_sum_seconds / s.origin.latency_count) * 1000 : null;
  $('n-latency').textContent = last && last.latencyMs !== null ? last.latencyMs.toFixed(1) + ' ms'
    : meanAll !== null ? meanAll.toFixed(1) + ' ms' : '–';
  $('n-latency-sub').textContent = fmtNum(s.origin.requests) + ' origin requests, ' + fmtNum(s.origin.errors) + ' failed';
  $('n-entries').textContent = fmtNum(s.cache.entries);
  $('n-version').textContent = 'version ' + s.cache.version + ', ' + fmtNum(s.cache.tags) + ' tags';
  $('n-bytes').textContent = fmtBytes(s.cache.bytes);
  const meter = $('n-bytes-meter');
  meter.max = s.cache.max_bytes || 1;
  meter.value = s.cache.bytes;
  $('n-bytes-sub').textContent = 'of ' + fmtBytes(s.cache.max_bytes) + ' (' + fmtPct(s.cache.bytes / (s.cache.max_bytes || 1)) + ')';
  $('n-evictions').textContent = fmtNum(s.cache.evictions);
  $('n-purged').textContent = fmtNum(s.purged_entries) + ' purged, ' + fmtNum(s.cache.expired) + ' expired';

  drawLines($('chart-rps'), RESULTS.map((r) => ({ color: COLORS[r], values: iv.map((x) => x.rps[r]) })), null);
  drawLines($('chart-ratio'), [{ color: COLORS.HIT, values: iv.map((x) => x.ratio) }], 1);
  drawLines($('chart-latency'), [{ color: COLORS.MISS, values: iv.map((x) => x.latencyMs) }], null);
  const legend = $('legend-rps');
  if (!legend.childElementCount) {
    for (const r of RESULTS) legend.append(el('li', {}, el('span', { class: 'swatch swatch-' + r.toLowerCase() }), r));
  }
}

/// Polylines over the last HISTORY intervals; gaps (null) break a line.
function drawLines(target, series, fixedMax) {
  const W = 300, H = 90, PAD = 4;
  let max = fixedMax || 0;
  if (!fixedMax) for (const s of series) for (const v of s.values) if (v !== null && v > max) max = v;
  if (!max) max = 1;
  target.replaceChildren();
  for (const y of [0.5, 1]) {
    target.append(svg('line', { x1: 0, x2: W, y1: H - PAD - y * (H - 2 * PAD), y2: H - PAD - y * (H - 2 * PAD), class: 'grid' }));
  }
  const label = svg('text', { x: 2, y: 10, class: 'axis' });
  label.textContent = fixedMax === 1 ? '100 %' : (max >= 10 ? Math.round(max) : max.toFixed(1));
  target.append(label);
  for (const s of series) {
    const n = s.values.length;
    let pts = [];
    const flush = () => {
      if (pts.length > 1) target.append(svg('polyline', { points: pts.join(' '), fill: 'none', stroke: s.color, 'stroke-width': 2, 'vector-effect': 'non-scaling-stroke' }));
      // A lone point (the first interval, or between gaps) is a short tick.
      if (pts.length === 1) {
        const [x, y] = pts[0].split(',');
        target.append(svg('line', { x1: x - 3, x2: x, y1: y, y2: y, stroke: s.color, 'stroke-width': 3, 'vector-effect': 'non-scaling-stroke' }));
      }
      pts = [];
    };
    s.values.forEach((v, i) => {
      if (v === null || v === undefined) return flush();
      // A fresh page spreads its first points; a full history fills the width.
      const span = Math.min(HISTORY, Math.max(n, 15)) - 1;
      const x = W - (n - 1 - i) * (W / span);
      const y = H - PAD - (v / max) * (H - 2 * PAD);
      pts.push(x.toFixed(1) + ',' + y.toFixed(1));
    });
    flush();
  }
}

async function loadEntries(ev) {
  if (ev) ev.preventDefault();
  const q = new URLSearchParams({ limit: '100' });
  const prefix = $('entries-prefix').value.trim();
  const tag = $('entries-tag').value.trim();
  if (prefix) q.set('prefix', prefix);
  if (tag) q.set('tag', tag);
  let r;
  try { r = await api('GET', '/entries?' + q); } catch (e) { $('entries-note').textContent = e.message; return; }
  const body = $('entries-table').tBodies[0];
  body.replaceChildren(...r.entries.map((e) => el('tr', { class: e.current ? '' : 'old' },
    el('td', { class: 'path' }, e.path, e.current ? null : el('span', { class: 'badge' }, 'old version')),
    el('td', {}, e.status),
    el('td', {}, fmtBytes(e.size)),
    el('td', {}, fmtSecs(e.age_secs)),
    el('td', {}, fmtSecs(e.ttl_secs)),
    el('td', {}, e.tags.join(', ')),
    el('td', {}, e.variant.map(([k, v]) => k + '=' + (v === null ? '∅' : v)).join(', ')))));
  $('entries-note').textContent = r.entries.length === 0 ? 'No entries match.'
    : r.entries.length + ' shown' + (r.next_cursor ? ' (more exist: narrow the filter)' : '') + '.';
}

async function purge(ev) {
  ev.preventDefault();
  const kind = document.querySelector('input[name="purge-kind"]:checked').value;
  const target = $('purge-target').value.trim();
  const soft = $('purge-soft').checked;
  const out = $('purge-result');
  out.classList.remove('error');
  try {
    const r = await api('POST', '/purge', { [kind]: [target], soft });
    const what = { urls: 'URL', prefixes: 'prefix', tags: 'tag' }[kind];
    out.textContent = (soft ? 'Marked ' + r.purged + ' entr' + (r.purged === 1 ? 'y' : 'ies') + ' stale'
      : 'Removed ' + r.purged + ' entr' + (r.purged === 1 ? 'y' : 'ies')) + ' for ' + what + ' ' + target + '.';
    await refreshCache();
  } catch (e) {
    out.textContent = 'Purge refused: ' + e.message;
    out.classList.add('error');
  }
}

function askVersionBump() {
  $('version-dialog').showModal();
  $('version-cancel').focus();
}

async function versionDialogClosed() {
  if ($('version-dialog').returnValue !== 'confirm') return;
  const out = $('version-result');
  try {
    const r = await api('POST', '/version');
    out.textContent = 'Cache version is now ' + r.version + '.';
    await refreshCache();
  } catch (e) {
    out.textContent = 'Refused: ' + e.message;
  }
}

// ---------- flags page ----------

async function counters() {
  state.counters = await api('GET', '/counters');
  return state.counters;
}

async function loadFlags() {
  const body = $('flags-table').tBodies[0];
  let c;
  try { c = await counters(); } catch (e) {
    body.replaceChildren();
    $('flags-note').textContent = e.status === 404 ? 'The edge layer is not configured ([edge] in the config): there are no flags.' : e.message;
    return;
  }
  const names = Object.keys(c.flag_evaluations);
  body.replaceChildren(...names.map((n) => el('tr', {}, el('th', { scope: 'row' }, n), el('td', {}, fmtNum(c.flag_evaluations[n])))));
  $('flags-note').textContent = names.length === 0 ? 'No flags are configured.'
    : 'Defaults come from the config file. Look a user up to see their values and set or clear an override.';
}

async function showFlagsForUser(ev) {
  if (ev) ev.preventDefault();
  const user = $('flags-user').value.trim();
  await renderUser(user, $('flags-user-view'), { flagsOnly: true });
}

// ---------- users page ----------

async function lookUpUser(ev) {
  if (ev) ev.preventDefault();
  await renderUser($('users-id').value.trim(), $('users-view'), {});
}

/// A user's flags (with override controls), variants, preferences, headers.
async function renderUser(user, target, opts) {
  target.replaceChildren();
  if (!user) return;
  let u;
  try { u = await api('GET', '/users/' + enc(user)); } catch (e) {
    target.append(el('p', { class: 'error', role: 'alert' }, e.message));
    return;
  }
  const redraw = () => renderUser(user, target, opts);
  const rows = Object.entries(u.flags).map(([name, f]) => el('tr', {},
    el('th', { scope: 'row' }, name, f.description ? el('span', { class: 'desc' }, f.description) : null),
    el('td', { class: 'value' }, JSON.stringify(f.value)),
    el('td', {}, el('span', { class: 'badge badge-' + f.source }, f.source)),
    el('td', { class: 'actions' }, flagControls(name, f, user, redraw))));
  const parts = [
    el('div', { class: 'card' },
      el('h2', {}, 'Flags for ', el('code', {}, u.user_id)),
      el('div', { class: 'scroll' }, el('table', { class: 'flags-user' },
        el('thead', {}, el('tr', {}, el('th', { scope: 'col' }, 'Flag'), el('th', { scope: 'col' }, 'Value'), el('th', { scope: 'col' }, 'Source'), el('th', { scope: 'col' }, 'Override'))),
        el('tbody', {}, rows))),
      el('p', { class: 'result', role: 'status', 'aria-live': 'polite', id: target.id + '-result' })),
  ];
  if (!opts.flagsOnly) {
    const exps = Object.entries(u.experiments).map(([name, x]) => el('tr', {},
      el('th', { scope: 'row' }, name),
      el('td', {}, x.variant === null ? 'not in the experiment' : x.variant),
      el('td', {}, x.assigned === null ? 'none yet' : x.assigned),
      el('td', {}, el('button', { type: 'button', class: 'quiet', onclick: async () => {
        try { await api('DELETE', '/experiments/' + enc(name) + '/users/' + enc(user)); redraw(); } catch (e) { say(e.message, true); }
      } }, 'Reset assignment'))));
    parts.push(el('div', { class: 'card' }, el('h2', {}, 'Experiments'),
      exps.length ? el('div', { class: 'scroll' }, el('table', {},
        el('thead', {}, el('tr', {}, el('th', { scope: 'col' }, 'Experiment'), el('th', { scope: 'col' }, 'Variant now'), el('th', { scope: 'col' }, 'Stored assignment'), el('th', { scope: 'col' }, ''))),
        el('tbody', {}, exps))) : el('p', {}, 'No experiments are configured.')));
    parts.push(el('div', { class: 'card' }, el('h2', {}, 'Preferences'), el('pre', {}, JSON.stringify(u.preferences, null, 2))));
    parts.push(el('div', { class: 'card' }, el('h2', {}, 'Headers the origin receives'),
      el('dl', { class: 'headers' }, Object.entries(u.headers).flatMap(([k, v]) => [el('dt', {}, k), el('dd', {}, el('code', {}, v))]))));
  }
  target.append(...parts);
}

function flagControls(name, f, user, redraw) {
  const setTo = async (value) => {
    const out = document.querySelector('[id$="-view-result"]');
    try {
      await api('PUT', '/flags/' + enc(name) + '/users/' + enc(user), value);
      await redraw();
      say('Override set: ' + name + ' = ' + JSON.stringify(value) + ' for ' + user + '.');
    } catch (e) { if (out) out.textContent = e.message; say(e.message, true); }
  };
  const controls = [];
  if (typeof f.value === 'boolean') {
    controls.push(el('button', { type: 'button', 'data-flag': name, 'aria-pressed': String(f.value), class: 'toggle',
      onclick: () => setTo(!f.value) }, f.value ? 'On — turn off' : 'Off — turn on'));
  } else {
    const id = 'ov-' + name.replace(/[^A-Za-z0-9_-]/g, '_');
    const input = el('input', { id, value: typeof f.value === 'string' ? f.value : JSON.stringify(f.value), size: 10 });
    controls.push(el('label', { for: id, class: 'visually-hidden' }, 'New value for ' + name), input,
      el('button', { type: 'button', 'data-set': name, onclick: () => setTo(typeof f.value === 'number' ? Number(input.value) : input.value) }, 'Set'));
  }
  if (f.source === 'override') {
    controls.push(el('button', { type: 'button', class: 'quiet', 'data-clear': name, onclick: async () => {
      try { await api('DELETE', '/flags/' + enc(name) + '/users/' + enc(user)); await redraw(); say('Override cleared: ' + name + ' for ' + user + '.'); } catch (e) { say(e.message, true); }
    } }, 'Clear override'));
  }
  return controls;
}

// ---------- experiments page ----------

async function loadExperiments() {
  const list = $('experiments-list');
  let c;
  try { c = await counters(); } catch (e) {
    list.replaceChildren();
    $('experiments-note').textContent = e.status === 404 ? 'The edge layer is not configured ([edge] in the config): there are no experiments.' : e.message;
    return;
  }
  const names = Object.keys(c.exposures);
  const cards = [];
  for (const name of names) {
    let x;
    try { x = await api('GET', '/experiments/' + enc(name)); } catch (e) { cards.push(el('p', { class: 'error' }, name + ': ' + e.message)); continue; }
    cards.push(experimentCard(x));
  }
  list.replaceChildren(...cards);
  $('experiments-note').textContent = names.length === 0 ? 'No experiments are configured.'
    : 'Exposures are counted by this process since it started. Weights, traffic and targeting come from the config file; '
      + 'the admin API does not report conversions yet, so no result can be computed here.';
}

function experimentCard(x) {
  const maxExp = Math.max(1, ...x.variants.map((v) => v.exposures));
  return el('article', { class: 'card experiment' },
    el('h2', {}, x.name),
    x.description ? el('p', {}, x.description) : null,
    el('p', { class: 'help' }, 'Traffic ' + fmtPct(x.traffic, 0) + (x.path_prefix ? ', on paths under ' + x.path_prefix : ', on every path')
      + '; header ' + x.header + '; ' + fmtNum(x.exposures) + ' exposures.'),
    el('div', { class: 'scroll' }, el('table', {},
      el('thead', {}, el('tr', {}, el('th', { scope: 'col' }, 'Variant'), el('th', { scope: 'col' }, 'Weight'), el('th', { scope: 'col' }, 'Share'), el('th', { scope: 'col' }, 'Exposures'), el('th', { scope: 'col' }, ''))),
      el('tbody', {}, x.variants.map((v) => el('tr', {},
        el('th', { scope: 'row' }, v.name),
        el('td', {}, v.weight),
        el('td', {}, fmtPct(v.share)),
        el('td', {}, fmtNum(v.exposures)),
        el('td', { class: 'bar-cell' }, barSvg(v.exposures / maxExp))))))));
}

function barSvg(fraction) {
  const s = svg('svg', { viewBox: '0 0 100 10', preserveAspectRatio: 'none', class: 'bar', 'aria-hidden': 'true' });
  s.append(svg('rect', { x: 0, y: 0, width: Math.max(0, Math.min(100, fraction * 100)).toFixed(1), height: 10, class: 'bar-fill' }));
  return s;
}

// ---------- start ----------

async function start() {
  $('signin-form').addEventListener('submit', signIn);
  $('sign-out').addEventListener('click', signOut);
  $('entries-form').addEventListener('submit', loadEntries);
  $('purge-form').addEventListener('submit', purge);
  $('version-bump').addEventListener('click', askVersionBump);
  $('version-dialog').addEventListener('close', versionDialogClosed);
  $('flags-user-form').addEventListener('submit', showFlagsForUser);
  $('users-form').addEventListener('submit', lookUpUser);
  window.addEventListener('hashchange', route);
  if (!state.csrf) return signedOut('');
  try {
    await api('GET', '/ui/session');
    signedIn();
  } catch (_) {
    signedOut('');
  }
}

start();
