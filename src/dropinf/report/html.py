"""The report page: one self-contained HTML file (no network; images inline as data URLs).

All example content travels as JSON inside a ``<script type="application/json">`` block and is put
on the page with ``textContent`` (never innerHTML), so any text — HTML tags, quotes, scripts in a
tweet — shows as written. Each training example's content is stored once however many queries
name it; the query list is paged and a query's entries are built only when it is opened, so
hundreds of queries render at once. Everything written from Python (settings, findings, plot
labels) goes through ``html.escape``.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#1f3b57;color:#fff;padding:10px 18px}header h1{font-size:19px;margin:0}
nav a{color:#cfe3f7;margin-right:16px;text-decoration:none;font-weight:600}
main{padding:10px 18px}section{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px 14px;margin:10px 0}
h2{font-size:16px;margin:4px 0 8px}.sign{background:#eef5fb;border-left:4px solid #1f6fb2;padding:6px 10px}
.warning{background:#fff4e0;border-left:4px solid #e08a00;padding:6px 10px;margin:4px 0}
.note{background:#f2f2f2;border-left:4px solid #999;padding:6px 10px;margin:4px 0}
#qwrap{display:flex;gap:14px}#qlist{width:300px;flex:none}#qlist input{width:100%;box-sizing:border-box}
.qitem{padding:4px 6px;border-bottom:1px solid #eee;cursor:pointer;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.qitem:hover{background:#f0f6fc}.qitem.sel{background:#dbeafa}#qdetail{flex:1;min-width:0}
.cols{display:flex;gap:14px}.col{flex:1;min-width:0}.entry{border:1px solid #e4e4e4;border-radius:5px;padding:6px;margin:5px 0}
.help .score{color:#1a7f37}.harm .score{color:#c62828}.score{font-weight:700;font-family:monospace}
.meta{color:#555;font-size:12px}.badge{background:#c62828;color:#fff;border-radius:3px;padding:0 5px;font-size:11px;margin-left:4px}
.text{white-space:pre-wrap;word-break:break-word}img{image-rendering:pixelated;display:block;margin:3px 0}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
.pager button{margin:4px 2px}
.gen{line-height:1.9}.tok{padding:1px 2px;border-radius:3px;margin:0 1px;white-space:pre}.entry.pick{outline:2px solid #1f6fb2}
"""

JS = r"""
const D = JSON.parse(document.getElementById('data').textContent);
const el = (tag, cls, text) => { const e = document.createElement(tag); if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = text; return e; };
const fmt = v => (Math.abs(v) >= 1e4 || (Math.abs(v) < 1e-3 && v !== 0)) ? v.toExponential(3) : v.toFixed(4);
function content(c, box) {
  if (c.img) { const i = el('img'); i.src = c.img; i.alt = 'example image'; box.appendChild(i); }
  if (c.text !== undefined) box.appendChild(el('div', 'text', c.text));
}
function trainEntry(id, score, rank, cls) {
  const c = D.train[String(id)] || {}; const e = el('div', 'entry ' + cls);
  const head = el('div', 'meta'); head.appendChild(el('span', 'score', fmt(score)));
  head.appendChild(document.createTextNode('  #' + rank + '  train id ' + id + (c.label !== undefined ? '  label: ' + c.label : '')));
  if (c.mark) head.appendChild(el('span', 'badge', c.mark));
  e.appendChild(head); content(c, e); return e;
}
let page = 0, filtered = D.queries.map((q, j) => j), selected = 0; const PER = 50;
function showQuery(j) {
  selected = j; const q = D.queries[j]; const box = document.getElementById('qdetail'); box.replaceChildren();
  box.appendChild(el('h2', null, 'Query id ' + q.id));
  const m = el('div', 'meta');
  m.textContent = (q.label !== undefined ? 'label: ' + q.label + '   ' : '') + (q.pred !== undefined ? 'prediction: ' + q.pred + '   ' : '')
    + D.measure + ': ' + fmt(q.loss);
  box.appendChild(m); const qc = el('div', 'entry'); content(q, qc); box.appendChild(qc);
  const gen = q.gen ? el('div', 'entry gen') : null; if (gen) box.appendChild(gen);
  const cols = el('div', 'cols');
  for (const [key, title, cls] of [['harmful', 'Most harmful (I > 0: up-weighting raises the query\'s ' + D.measure + ')', 'harm'],
                                   ['helpful', 'Most helpful (I < 0: up-weighting lowers it)', 'help']]) {
    const col = el('div', 'col ' + key); col.appendChild(el('h2', null, title));
    q[key].forEach(([id, s], r) => { const e = trainEntry(id, s, r + 1, cls);
      if (gen) { e.style.cursor = 'pointer'; e.onclick = () => showTokens(q, id, gen, e); } col.appendChild(e); });
    cols.appendChild(col);
  }
  box.appendChild(cols);
  if (gen && q.harmful.length) showTokens(q, q.harmful[0][0], gen, cols.querySelector('.entry'));
  drawList();
}
function showTokens(q, id, gen, entry) {
  document.querySelectorAll('.entry.pick').forEach(x => x.classList.remove('pick')); if (entry) entry.classList.add('pick');
  const s = q.gen.scores[String(id)] || []; const top = Math.max(1e-30, ...s.map(Math.abs));
  gen.replaceChildren(el('div', 'meta', 'Completion, token by token: influence of train id ' + id
    + ' on each token (red: raises its loss, green: lowers it; click a training example to switch)'));
  const line = el('div');
  q.gen.tokens.forEach((t, i) => { const v = s[i] || 0; const a = Math.min(1, Math.abs(v) / top);
    const sp = el('span', 'tok', t); sp.dataset.score = v; sp.title = 'I = ' + fmt(v);
    sp.style.background = v > 0 ? 'rgba(198,40,40,' + a + ')' : 'rgba(26,127,55,' + a + ')'; line.appendChild(sp); });
  gen.appendChild(line);
}
function drawList() {
  const list = document.getElementById('qitems'); list.replaceChildren();
  filtered.slice(page * PER, (page + 1) * PER).forEach(j => {
    const q = D.queries[j]; const it = el('div', 'qitem' + (j === selected ? ' sel' : ''),
      'id ' + q.id + ' · ' + D.measure + ' ' + fmt(q.loss) + ' · ' + (q.text || q.label || ''));
    it.onclick = () => showQuery(j); list.appendChild(it);
  });
  document.getElementById('pageinfo').textContent = 'page ' + (page + 1) + ' of ' + Math.max(1, Math.ceil(filtered.length / PER))
    + ' (' + filtered.length + ' queries)';
}
function setPage(d) { page = Math.min(Math.max(0, page + d), Math.max(0, Math.ceil(filtered.length / PER) - 1)); drawList(); }
document.getElementById('qfilter').oninput = ev => { const t = ev.target.value.toLowerCase();
  filtered = D.queries.map((q, j) => j).filter(j => { const q = D.queries[j];
    return !t || String(q.id) === t || (q.text || '').toLowerCase().includes(t) || (q.label || '').toLowerCase().includes(t); });
  page = 0; drawList(); };
function showSuspicious() {
  const box = document.getElementById('suslist'); const S = D.suspicious; if (!S) return;
  S.rows.forEach(([id, s], r) => box.appendChild(trainEntry(id, s, r + 1, 'harm')));
}
if (D.queries.length) showQuery(0); else document.getElementById('qdetail').textContent = 'No queries in this report.';
showSuspicious();
"""


def histogram_svg(values: np.ndarray, title: str, marked: np.ndarray | None = None, bins: int = 40,
                  width: int = 520, height: int = 170) -> str:
    """An inline SVG histogram (counts on a linear axis); ``marked`` overlays a second set in red."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return f"<p>{html.escape(title)}: no values.</p>"
    lo, hi = float(v.min()), float(v.max())
    if hi == lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    counts = np.histogram(v, edges)[0]
    mcounts = np.histogram(np.asarray(marked, dtype=np.float64), edges)[0] if marked is not None else None
    top = max(int(counts.max()), 1)
    pl, pw, ph = 40, width - 50, height - 50
    bw = pw / bins
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
             f'<text x="{pl}" y="14" font-size="13">{html.escape(title)}</text>']
    for j, c in enumerate(counts):
        h = ph * c / top
        parts.append(f'<rect x="{pl + j * bw:.1f}" y="{20 + ph - h:.1f}" width="{max(bw - 1, 1):.1f}" height="{h:.1f}" '
                     f'fill="#5b8fc7"><title>[{edges[j]:.3g}, {edges[j + 1]:.3g}): {c}</title></rect>')
        if mcounts is not None and mcounts[j]:
            hm = ph * mcounts[j] / top
            parts.append(f'<rect x="{pl + j * bw:.1f}" y="{20 + ph - hm:.1f}" width="{max(bw - 1, 1):.1f}" '
                         f'height="{hm:.1f}" fill="#c62828" opacity="0.8"/>')
    y0 = 20 + ph
    parts.append(f'<line x1="{pl}" y1="{y0}" x2="{pl + pw}" y2="{y0}" stroke="#333"/>')
    zero = pl + pw * (0 - lo) / (hi - lo)
    if pl <= zero <= pl + pw:
        parts.append(f'<line x1="{zero:.1f}" y1="20" x2="{zero:.1f}" y2="{y0}" stroke="#333" stroke-dasharray="3,3"/>')
    parts.append(f'<text x="{pl}" y="{y0 + 14}" font-size="11">{lo:.3g}</text>'
                 f'<text x="{pl + pw}" y="{y0 + 14}" font-size="11" text-anchor="end">{hi:.3g}</text>'
                 f'<text x="{pl - 4}" y="26" font-size="11" text-anchor="end">{top}</text>')
    parts.append("</svg>")
    return "".join(parts)


def write_html(path: str | Path, data: dict, histograms: list[str]) -> Path:
    """data: title, sign, findings [{level, text}], settings [[key, value]], measure, queries
    [{id, text?, img?, label?, pred?, loss, helpful [[id, score]], harmful [[id, score]],
    gen? {tokens [text], scores {train id: [score per token]}}}], train
    {id: {text?, img?, label?, mark?}}, suspicious {title, explain, rows [[id, score]]} or None."""
    path = Path(path)
    e = html.escape
    findings = "".join(f'<div class="{e(f["level"])}"><b>{e(f["level"])}:</b> {e(f["text"])}</div>'
                       for f in data["findings"]) or '<div class="note">No problems detected.</div>'
    settings = "".join(f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>" for k, v in data["settings"])
    sus = data.get("suspicious")
    sus_html = (f'<section id="suspicious"><h2>{e(sus["title"])}</h2><p>{e(sus["explain"])}</p>'
                f'<div id="suslist"></div></section>') if sus else ""
    blob = json.dumps(data, separators=(",", ":"), default=float).replace("<", "\\u003c")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(data["title"])}</title><style>{CSS}</style></head>
<body><header><h1>{e(data["title"])}</h1>
<nav><a href="#queries">Queries</a><a href="#suspicious">Suspicious training examples</a>
<a href="#distributions">Score distributions</a><a href="#settings">Settings</a></nav></header>
<main>
<section id="guidance"><div class="sign">{e(data["sign"])}</div>{findings}</section>
<section id="queries"><h2>Queries: their most helpful and most harmful training examples</h2>
<div id="qwrap"><div id="qlist"><input id="qfilter" placeholder="filter by id, text or label">
<div class="pager"><button onclick="setPage(-1)">‹ prev</button><button onclick="setPage(1)">next ›</button>
<span id="pageinfo" class="meta"></span></div><div id="qitems"></div></div>
<div id="qdetail"></div></div></section>
{sus_html}
<section id="distributions"><h2>Score distributions</h2>{"".join(histograms)}</section>
<section id="settings"><h2>Settings of this run</h2><table>{settings}</table></section>
</main>
<script id="data" type="application/json">{blob}</script>
<script>{JS}</script>
</body></html>
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path
