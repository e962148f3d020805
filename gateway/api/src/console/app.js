// Haven's web console: a client of the gateway's API, with the operator's API token.
//
// Served by the gateway at /console/app.js under a Content-Security-Policy that refuses inline
// script and style. Every value from the API goes into the page as text (textContent,
// attributes), never as HTML. The token lives in this tab's sessionStorage only.
'use strict';

(() => {
  const TOKEN_KEY = 'haven.console.token';
  const REFRESH_MS = 2000;
  const ROLE_RANK = { viewer: 0, operator: 1, admin: 2 };

  const session = {
    token: null,
    caller: null,
    // Bumped whenever the refresh loop is (re)started or stopped: answers of an older loop
    // are dropped.
    generation: 0,
    timer: null,
    // The item whose points are shown, and the last JSON rendered per section.
    pointsRow: null,
    shown: {},
  };
  // Table rows of protected disks by `agent_id/disk`, updated in place.
  const rows = new Map();

  const $ = (id) => document.getElementById(id);

  // An element with attributes (`text` sets its text) and children (nodes or strings, which
  // become text).
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === 'text') node.textContent = String(value);
      else node.setAttribute(key, value === true ? '' : String(value));
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  }

  // Sets a node's (or an id's) text when it changed.
  function setText(target, text) {
    const node = typeof target === 'string' ? $(target) : target;
    const value = text === null || text === undefined ? '' : String(text);
    if (node.textContent !== value) node.textContent = value;
  }

  function setAttr(node, name, value) {
    const v = String(value);
    if (node.getAttribute(name) !== v) node.setAttribute(name, v);
  }

  // ---- Formatting ----

  function bytes(n) {
    if (typeof n !== 'number' || !Number.isFinite(n)) return '—';
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) {
      n /= 1024;
      i += 1;
    }
    return `${n.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
  }

  function seconds(s) {
    if (typeof s !== 'number' || !Number.isFinite(s)) return '—';
    if (s < 60) return `${s.toFixed(1)} s`;
    if (s < 3600) return `${(s / 60).toFixed(1)} min`;
    return `${(s / 3600).toFixed(1)} h`;
  }

  function when(ms) {
    return typeof ms === 'number' && ms > 0 ? new Date(ms).toLocaleString() : '—';
  }

  function list(values) {
    return Array.isArray(values) && values.length > 0 ? values.join(', ') : '—';
  }

  // ---- The API ----

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  // `method path` with the token: the JSON answer, or an ApiError with the API's own text.
  async function call(method, path) {
    let response;
    try {
      response = await fetch(path, {
        method,
        headers: { Authorization: `Bearer ${session.token}`, Accept: 'application/json' },
        cache: 'no-store',
        credentials: 'omit',
      });
    } catch (e) {
      throw new ApiError(0, `cannot reach the gateway (${method} ${path}): ${e.message}`);
    }
    const text = await response.text();
    let body = null;
    if (text) {
      try {
        body = JSON.parse(text);
      } catch (_) {
        body = null;
      }
    }
    if (!response.ok) {
      const message = body && typeof body.error === 'string'
        ? body.error
        : `HTTP ${response.status} for ${method} ${path}${text ? `: ${text.slice(0, 300)}` : ''}`;
      throw new ApiError(response.status, message);
    }
    return body;
  }

  // A promise's outcome as `{value}` or `{error}`.
  const settle = (promise) => promise.then((value) => ({ value }), (error) => ({ error }));

  const itemPath = (row) => `/v1/items/${encodeURIComponent(row.itemId)}`;

  // ---- Login ----

  async function logIn(token) {
    session.token = token;
    $('login-button').disabled = true;
    setText('login-error', '');
    setText('session', 'Checking the token…');
    try {
      const caller = await call('GET', '/v1/whoami');
      session.caller = caller;
      sessionStorage.setItem(TOKEN_KEY, token);
      $('token').value = '';
      setText('session', `Logged in as ${caller.name} (${caller.role})`);
      $('login').hidden = true;
      $('console').hidden = false;
      $('logout').hidden = false;
      startRefresh();
    } catch (e) {
      session.token = null;
      session.caller = null;
      sessionStorage.removeItem(TOKEN_KEY);
      setText('session', 'Not logged in');
      setText('login-error', e.message);
    } finally {
      $('login-button').disabled = false;
    }
  }

  function logOut(message) {
    stopRefresh();
    session.token = null;
    session.caller = null;
    session.pointsRow = null;
    session.shown = {};
    sessionStorage.removeItem(TOKEN_KEY);
    rows.clear();
    for (const id of ['machines-body', 'points-body', 'gateways-body', 'policies-body', 'plans',
      'events-list']) {
      $(id).replaceChildren();
    }
    for (const id of ['action-result', 'machines-error', 'points-error', 'pipeline-toml']) {
      setText(id, '');
    }
    $('points-table').hidden = true;
    $('console').hidden = true;
    $('logout').hidden = true;
    $('login').hidden = false;
    setText('session', 'Not logged in');
    setText('login-error', message || '');
    $('token').focus();
  }

  const mayOperate = () => (ROLE_RANK[session.caller && session.caller.role] || 0) >= 1;

  // ---- Refreshing ----

  function stopRefresh() {
    session.generation += 1;
    if (session.timer !== null) clearTimeout(session.timer);
    session.timer = null;
  }

  // Refreshes now, then every REFRESH_MS after each refresh ends.
  function startRefresh() {
    stopRefresh();
    const generation = session.generation;
    const loop = async () => {
      try {
        await refresh(generation);
      } catch (e) {
        if (e instanceof ApiError && e.status === 401) {
          logOut(e.message);
          return;
        }
        setText('refreshed', `Refresh failed: ${e.message}`);
      }
      if (generation === session.generation) session.timer = setTimeout(loop, REFRESH_MS);
    };
    loop();
  }

  async function refresh(generation) {
    const pointsRow = session.pointsRow;
    const [status, items, pipeline, events, points] = await Promise.all([
      settle(call('GET', '/v1/status')),
      settle(call('GET', '/v1/items')),
      settle(call('GET', '/v1/pipeline')),
      settle(call('GET', '/v1/events')),
      pointsRow ? settle(call('GET', `${itemPath(pointsRow)}/points`)) : null,
    ]);
    if (generation !== session.generation) return;
    for (const answer of [status, items, pipeline, events, points]) {
      if (answer && answer.error && answer.error.status === 401) throw answer.error;
    }
    renderMachines(status, items);
    renderGateways(status);
    renderPipeline(pipeline);
    renderEvents(events);
    if (points && pointsRow === session.pointsRow) renderPoints(pointsRow, points);
    setText('refreshed', `Updated ${new Date().toLocaleTimeString()}`);
  }

  // Whether `value` differs from what section `name` shows; remembers it.
  function changed(name, value) {
    const json = JSON.stringify(value === undefined ? null : value);
    if (session.shown[name] === json) return false;
    session.shown[name] = json;
    return true;
  }

  // ---- Protected machines ----

  // The replicas every master target reports: this gateway's own, and at a configuration
  // server those of every joined gateway, as of its last report.
  function replicas(status) {
    const out = [];
    if (!status) return out;
    if (status.master_target) {
      for (const r of status.master_target.replicas || []) out.push({ gateway: 'this gateway', r });
    }
    for (const g of status.config_server || []) {
      const mt = g.status && g.status.master_target;
      for (const r of (mt && mt.replicas) || []) out.push({ gateway: g.name, r });
    }
    return out;
  }

  // A replica's replication state for an operator, as `haven status` prints it (the rule of
  // `ReplicaStatus::state` in gateway/engine/src/status.rs), unless the status states it.
  function replicationState(r) {
    if (typeof r.state === 'string') return r.state;
    if (r.item_state && r.item_state !== 'protected') return 'stopped';
    if (r.error) return 'error';
    const disks = (r.report && r.report.disks) || [];
    const d = disks.find((x) => x.disk === r.disk);
    if (!d) return 'unknown';
    const behind = r.durable_seq < d.last_seq || (r.points === 0 && r.applied_seq < d.last_seq);
    if (d.state === 'protected' && behind) return 'catching-up';
    return d.state;
  }

  // One entry per protected disk from the status and the items, by machine and disk.
  function machineList(status, items) {
    const byKey = new Map();
    const entry = (agentId, machine, disk) => {
      const key = `${agentId}/${disk}`;
      if (!byKey.has(key)) {
        byKey.set(key, { key, agentId, machine, disk, gateway: null, replica: null, item: null });
      }
      return byKey.get(key);
    };
    for (const { gateway, r } of replicas(status)) {
      const e = entry(r.agent_id, r.machine_name, r.disk);
      e.gateway = gateway;
      e.replica = r;
    }
    for (const item of items || []) {
      const e = entry(item.agent_id, item.machine_name, item.disk);
      e.machine = item.machine_name;
      e.item = item;
    }
    const all = [...byKey.values()].sort(
      (a, b) => String(a.machine).localeCompare(String(b.machine)) || a.disk - b.disk,
    );
    // A machine with one disk is named by its name; one with several by `MACHINE/DISK`.
    const disks = new Map();
    for (const e of all) disks.set(e.machine, (disks.get(e.machine) || 0) + 1);
    for (const e of all) e.itemId = disks.get(e.machine) > 1 ? `${e.machine}/${e.disk}` : e.machine;
    return all;
  }

  const ACTIONS = {
    'test-failover': {
      label: 'Test failover',
      method: 'POST',
      path: (row) => `${itemPath(row)}/test-failover?point=latest`,
      running: (name) => `Starting a test failover of ${name}…`,
      done: (a, name) => `Test failover of ${name} started: ${a.uri} (point ${a.point && a.point.point}, ${a.writable ? 'writable' : 'read-only'})`,
    },
    'clean-up': {
      label: 'Clean up',
      method: 'DELETE',
      path: (row) => `${itemPath(row)}/test-failover`,
      running: (name) => `Cleaning up the test failover of ${name}…`,
      done: (a, name) => `Test failover of ${name} cleaned up (${a.uri}); its writes are discarded.`,
    },
    failover: {
      label: 'Fail over',
      method: 'POST',
      path: (row) => `${itemPath(row)}/failover?point=latest`,
      confirm: (name) => `Fail over ${name} to its latest recovery point? Replication of it stops.`,
      running: (name) => `Failing over ${name}…`,
      done: (a, name) => `Failover of ${name} started: the item is ${a.state}.`,
    },
    commit: {
      label: 'Commit',
      method: 'POST',
      path: (row) => `${itemPath(row)}/commit`,
      confirm: (name) => `Commit the failover of ${name}? Its other recovery points are deleted; this cannot be undone.`,
      running: (name) => `Committing the failover of ${name}…`,
      done: (a, name) => `Failover of ${name} committed: the item is ${a.state}.`,
    },
  };

  const rowName = (row) => (row.itemId === row.machine ? row.machine : `${row.machine} disk ${row.disk}`);

  function setResult(text, kind) {
    const node = $('action-result');
    setText(node, text);
    node.className = kind || '';
  }

  function makeRow(row) {
    const cell = (field) => el('td', { 'data-field': field });
    const n = {
      tr: el('tr', { 'data-machine': row.machine, 'data-disk': row.disk, 'data-agent': row.agentId }),
      cells: {
        machine: el('th', { scope: 'row', 'data-field': 'machine' }),
        disk: cell('disk'),
        replication: cell('replication'),
        rpo: cell('rpo'),
        points: cell('points'),
        item: cell('item-state'),
        test: cell('test-failover'),
      },
      buttons: {},
      busy: false,
      row,
    };
    const actions = el('td', { 'data-field': 'actions', class: 'actions' });
    const button = (action, label, onClick) => {
      const b = el('button', { type: 'button', 'data-action': action, text: label });
      b.addEventListener('click', onClick);
      n.buttons[action] = b;
      actions.append(b);
    };
    button('points', 'Points', () => showPoints(n.row));
    if (mayOperate()) {
      for (const [action, spec] of Object.entries(ACTIONS)) {
        button(action, spec.label, () => act(n, action));
      }
    }
    for (const c of Object.values(n.cells)) n.tr.append(c);
    n.tr.append(actions);
    return n;
  }

  function updateRow(n, row) {
    n.row = row;
    const r = row.replica;
    const item = row.item;
    const replication = r ? replicationState(r) : 'unknown';
    const itemState = item && item.item ? item.item.state : (r && r.item_state) || 'unknown';
    const points = item ? item.points : r ? r.points : null;
    // The items come from the master target now; the status is its last report.
    const uri = item ? (item.test_failover ? item.test_failover.uri : '') : (r && r.test_failover) || '';
    setAttr(n.tr, 'id', `item-${row.key.replace(/[^A-Za-z0-9_-]/g, '-')}`);
    setAttr(n.tr, 'data-machine', row.machine);
    setText(n.cells.machine, row.machine);
    setAttr(n.cells.machine, 'title', `agent ${row.agentId}${row.gateway ? `, at ${row.gateway}` : ''}`);
    setText(n.cells.disk, row.disk);
    setText(n.cells.replication, replication);
    setAttr(n.cells.replication, 'data-state', replication);
    setText(n.cells.rpo, r ? seconds(r.rpo_seconds) : '—');
    setText(n.cells.points, points === null || points === undefined ? '—' : points);
    setAttr(n.cells.points, 'data-points', points === null || points === undefined ? '' : points);
    setText(n.cells.item, itemState);
    setAttr(n.cells.item, 'data-item-state', itemState);
    setText(n.cells.test, uri || '—');
    setAttr(n.cells.test, 'data-uri', uri);
    n.state = { itemState, uri };
    updateButtons(n);
  }

  function updateButtons(n) {
    const { itemState, uri } = n.state || {};
    const allowed = {
      'test-failover': itemState === 'protected' && !uri,
      'clean-up': Boolean(uri),
      // The master target refuses a failover while a test failover runs.
      failover: (itemState === 'protected' || itemState === 'failover-failed') && !uri,
      commit: itemState === 'failed-over',
    };
    for (const [action, b] of Object.entries(n.buttons)) {
      const enabled = !n.busy && (action === 'points' || allowed[action]);
      if (b.disabled === enabled) b.disabled = !enabled;
      setAttr(b, 'aria-label', `${b.textContent}: ${rowName(n.row)}`);
    }
  }

  async function act(n, action) {
    const spec = ACTIONS[action];
    const row = n.row;
    const name = rowName(row);
    if (spec.confirm && !window.confirm(spec.confirm(name))) return;
    n.busy = true;
    updateButtons(n);
    setResult(spec.running(name), 'running');
    try {
      const answer = await call(spec.method, spec.path(row));
      setResult(spec.done(answer || {}, name), 'ok');
    } catch (e) {
      if (e.status === 401) {
        logOut(e.message);
        return;
      }
      setResult(`${spec.label} of ${name} failed: ${e.message}`, 'error');
    } finally {
      n.busy = false;
      updateButtons(n);
    }
    if (session.token) startRefresh();
  }

  function renderMachines(status, items) {
    const problems = [];
    if (status.error) problems.push(`Status: ${status.error.message}`);
    if (items.error) problems.push(`Items: ${items.error.message}`);
    setText('machines-error', problems.join(' — '));
    // Nothing to go by: keep the rows shown until an answer comes.
    if (status.error && items.error) return;
    const all = machineList(status.value, Array.isArray(items.value) ? items.value : null);
    const body = $('machines-body');
    const seen = new Set();
    all.forEach((row, i) => {
      let n = rows.get(row.key);
      if (!n) {
        n = makeRow(row);
        rows.set(row.key, n);
      }
      updateRow(n, row);
      seen.add(row.key);
      if (body.children[i] !== n.tr) body.insertBefore(n.tr, body.children[i] || null);
    });
    for (const [key, n] of rows) {
      if (!seen.has(key)) {
        n.tr.remove();
        rows.delete(key);
      }
    }
    $('machines-empty').hidden = all.length > 0;
  }

  // ---- Points ----

  function showPoints(row) {
    session.pointsRow = row;
    session.shown.points = undefined;
    setText('points-note', `Loading the recovery points of ${rowName(row)}…`);
    $('points').scrollIntoView({ block: 'start' });
    startRefresh();
  }

  function renderPoints(row, answer) {
    if (answer.error) {
      setText('points-error', `Points of ${rowName(row)}: ${answer.error.message}`);
      return;
    }
    setText('points-error', '');
    const points = Array.isArray(answer.value) ? answer.value : [];
    setText('points-note', `${points.length} recovery point${points.length === 1 ? '' : 's'} of ${rowName(row)}, oldest first.`);
    setText('points-caption', `Recovery points of ${rowName(row)}`);
    $('points-table').hidden = false;
    if (!changed('points', points)) return;
    $('points-body').replaceChildren(...points.map((p) => el(
      'tr',
      { 'data-point': p.point },
      el('th', { scope: 'row', text: p.point }),
      el('td', { text: p.kind }),
      el('td', { text: when(p.source_time_ms) }),
      el('td', { text: when(p.received_ms) }),
      el('td', { 'data-state': p.state, text: p.state }),
    )));
  }

  // ---- Gateways ----

  function renderGateways(status) {
    if (status.error) return;
    const s = status.value || {};
    let gateways = s.config_server;
    if (Array.isArray(gateways)) {
      setText('gateways-note', `${gateways.length} gateway${gateways.length === 1 ? '' : 's'} joined this configuration server (site ${s.site}).`);
    } else {
      const roles = [];
      if (s.process_server) roles.push('process-server');
      if (s.master_target) roles.push('master-target');
      setText('gateways-note', 'This gateway is not a configuration server: it shows itself only.');
      gateways = [{ name: 'this gateway', site: s.site, roles, connected: true, health: null, last_seen_ms: null, status: s }];
    }
    if (!changed('gateways', gateways)) return;
    $('gateways-body').replaceChildren(...gateways.map((g) => {
      const h = g.health || {};
      const connection = g.connected ? 'connected' : `gone since ${when(g.last_seen_ms)}`;
      // A process server's throughput to its master target and the RPO it can hold at the
      // current churn (none: the link does not keep up).
      const ps = (g.status || {}).process_server;
      const throughput = ps ? `${bytes(ps.upload_bytes_per_second)}/s (churn ${bytes(ps.churn_bytes_per_second)}/s)` : '—';
      const achievable = !ps ? '—'
        : typeof ps.achievable_rpo_seconds === 'number' ? `${ps.achievable_rpo_seconds.toFixed(1)} s`
          : 'none: the link does not keep up';
      return el(
        'tr',
        { 'data-gateway': g.name, 'data-connected': Boolean(g.connected) },
        el('th', { scope: 'row', text: g.name }),
        el('td', { text: g.site }),
        el('td', { text: list(g.roles) }),
        el('td', { 'data-state': g.connected ? 'connected' : 'gone', text: connection }),
        el('td', { text: typeof h.cpu_percent === 'number' ? `${h.cpu_percent.toFixed(1)} %` : '—' }),
        el('td', { text: bytes(h.memory_bytes) }),
        el('td', { text: typeof h.free_bytes === 'number' ? `${bytes(h.free_bytes)} of ${bytes(h.total_bytes)}` : '—' }),
        el('td', { text: throughput }),
        el('td', { text: achievable }),
        el('td', { text: when(g.last_seen_ms) }),
      );
    }));
  }

  // ---- Policies and recovery plans ----

  function policySettings(p, machines) {
    const parts = [];
    if (p.kind === 'replication') {
      parts.push(`RPO alert above ${p.rpo_threshold}`);
      parts.push(`crash-consistent point every ${p.crash_consistent_interval}`);
      parts.push(p.app_consistent_interval === 'off'
        ? 'no app-consistent points'
        : `app-consistent point every ${p.app_consistent_interval}`);
      const r = p.retention || {};
      if (r.window !== undefined) parts.push(`points kept for ${r.window}`);
      if (Array.isArray(r.tiers) && r.tiers.length > 0) {
        const tier = (t) => (!t.every || t.every === '0s'
          ? `all for the last ${t.for_last}`
          : `one per ${t.every} to ${t.for_last}`);
        parts.push(`thinned: ${r.tiers.map(tier).join(', ')}`);
      }
    } else if (p.kind === 'failback') {
      parts.push(`shut the replica down first: ${p.shutdown_replica ? 'yes' : 'no'}`);
      parts.push(`protect again after failback: ${p.reprotect_after_failback ? 'yes' : 'no'}`);
    }
    const users = machines
      .filter((m) => m.policy === p.name || m.failback_policy === p.name)
      .map((m) => m.name);
    parts.push(`machines: ${list(users)}`);
    return parts.join('; ');
  }

  function stepText(step) {
    switch (step.kind) {
      case 'failover': {
        const what = [...(step.machines || []), ...(step.groups || []).map((g) => `group ${g}`)];
        return `Fail over ${list(what)}`;
      }
      case 'script':
        return `Run “${step.run}” (at most ${step.timeout})`;
      case 'manual':
        return `Wait for an operator: ${step.message}`;
      default:
        return JSON.stringify(step);
    }
  }

  function renderPipeline(answer) {
    if (answer.error) {
      const text = answer.error.status === 404
        ? `No pipeline applied (${answer.error.message}).`
        : `Cannot read the pipeline: ${answer.error.message}`;
      if (changed('pipeline', text)) {
        setText('pipeline-note', text);
        $('pipeline-content').hidden = true;
      }
      return;
    }
    const view = answer.value || {};
    if (!changed('pipeline', view)) return;
    const p = view.pipeline || {};
    const name = p.deployment && p.deployment.name ? ` of deployment ${p.deployment.name}` : '';
    setText('pipeline-note', `Pipeline${name}, revision ${view.revision}${view.applied_ms ? `, applied ${when(view.applied_ms)}` : ''}. Read-only here: change it with haven apply.`);
    const machines = Array.isArray(p.machine) ? p.machine : [];
    const policies = Array.isArray(p.policy) ? p.policy : [];
    const plans = Array.isArray(p.plan) ? p.plan : [];
    $('policies-body').replaceChildren(...(policies.length > 0
      ? policies.map((pol) => el(
        'tr',
        { 'data-policy': pol.name },
        el('th', { scope: 'row', text: pol.name }),
        el('td', { text: pol.kind }),
        el('td', { text: policySettings(pol, machines) }),
      ))
      : [el('tr', {}, el('td', { colspan: 3, text: 'No policies.' }))]));
    $('plans').replaceChildren(...(plans.length > 0
      ? plans.map((plan) => el(
        'article',
        { class: 'plan', 'data-plan': plan.name },
        el('h4', { text: plan.name }),
        el('ol', {}, ...(plan.step || []).map((s) => el('li', { 'data-kind': s.kind, text: stepText(s) }))),
      ))
      : [el('p', { class: 'muted', text: 'No recovery plans.' })]));
    setText('pipeline-toml', view.toml || '');
    $('pipeline-content').hidden = false;
  }

  // ---- Events ----

  function renderEvents(answer) {
    const node = $('events-list');
    if (answer.error) {
      const text = answer.error.status === 404 ? 'No events.' : `Cannot read events: ${answer.error.message}`;
      if (changed('events', text)) {
        setText('events-note', text);
        node.replaceChildren();
      }
      return;
    }
    const value = answer.value;
    const events = Array.isArray(value) ? value : (value && Array.isArray(value.events) ? value.events : []);
    if (!changed('events', events)) return;
    // Newest first, whatever order the API lists them in.
    const order = (e) => [Number(e.time_ms) || 0, Number(e.seq) || 0];
    const newest = [...events].sort((a, b) => {
      const [ta, sa] = order(a);
      const [tb, sb] = order(b);
      return tb - ta || sb - sa;
    }).slice(0, 100);
    setText('events-note', events.length === 0 ? 'No events.' : `${events.length} event${events.length === 1 ? '' : 's'}, newest first${events.length > 100 ? ' (the newest 100 shown)' : ''}.`);
    node.replaceChildren(...newest.map((e) => el(
      'li',
      { 'data-severity': e.severity, 'data-kind': e.kind },
      el('time', { text: when(e.time_ms) }),
      ' ',
      el('span', { class: 'severity', text: e.severity }),
      ' ',
      el('code', { text: e.kind }),
      e.gateway ? ` at ${e.gateway}` : '',
      e.item ? `, ${e.item}: ` : ': ',
      e.text,
    )));
  }

  // ---- Start ----

  $('login-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const token = $('token').value.trim();
    if (!token) {
      setText('login-error', 'Enter an API token.');
      return;
    }
    logIn(token);
  });
  $('logout').addEventListener('click', () => logOut(''));
  const saved = sessionStorage.getItem(TOKEN_KEY);
  if (saved) logIn(saved);
})();
