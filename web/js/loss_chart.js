// Live loss chart on the "Train Wan S2V LoRA" node.
//
// The training node sends one `wan_s2v.train` websocket event per optimizer step:
//   {node, step, total, loss, lr, eta, eval_loss?, output_name}
// (nodes/train_nodes.py). This extension keeps the history in the node's properties
// (`wan_s2v_loss`), so it is saved with the workflow and comes back on reload, and draws
// the loss (raw and smoothed), the eval loss (dots) and the learning rate (dashed, own scale)
// below the node's widgets.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_TYPE = "WanS2VTrainLora";
const EVENT = "wan_s2v.train";
const PROP = "wan_s2v_loss";
const CHART_H = 170;
const MAX_POINTS = 4000;
const COLORS = {
  bg: "#1b1b1b", grid: "#333", text: "#bbb", raw: "rgba(90,160,255,0.35)", smooth: "#5aa0ff",
  eval: "#ffb347", lr: "#7fd17f",
};

function emptyHistory() {
  return { step: [], loss: [], lr: [], eval: [], total: 0, eta: null, output_name: "" };
}

function history(node) {
  node.properties = node.properties || {};
  let h = node.properties[PROP];
  if (!h || !Array.isArray(h.step)) {
    h = emptyHistory();
    node.properties[PROP] = h;
  }
  return h;
}

function addPoint(node, data) {
  const h = history(node);
  const step = Number(data.step);
  if (!Number.isFinite(step)) return;
  // A new run (or a resume) restarts at an earlier step: drop what comes at or after it.
  if (h.step.length && step <= h.step[h.step.length - 1]) {
    let keep = h.step.findIndex((s) => s >= step);
    if (keep < 0) keep = h.step.length;
    h.step.length = keep;
    h.loss.length = keep;
    h.lr.length = keep;
    h.eval = h.eval.filter((p) => p[0] < step);
  }
  h.step.push(step);
  h.loss.push(Number(data.loss));
  h.lr.push(Number(data.lr));
  if (data.eval_loss !== undefined && data.eval_loss !== null) h.eval.push([step, Number(data.eval_loss)]);
  h.total = Number(data.total) || h.total;
  h.eta = data.eta ?? null;
  h.output_name = data.output_name ?? h.output_name;
  if (h.step.length > MAX_POINTS) {
    // Keep every other point of the older half: bounded size in the saved workflow.
    const half = Math.floor(h.step.length / 2);
    for (const key of ["step", "loss", "lr"]) {
      h[key] = h[key].slice(0, half).filter((_, i) => i % 2 === 0).concat(h[key].slice(half));
    }
  }
}

function fmt(v) {
  if (!Number.isFinite(v)) return "-";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e4)) return v.toExponential(2);
  return v.toFixed(a < 1 ? 4 : 3);
}

function fmtEta(s) {
  if (!Number.isFinite(s) || s <= 0) return "";
  if (s < 90) return ` · eta ${Math.round(s)}s`;
  if (s < 5400) return ` · eta ${Math.round(s / 60)}m`;
  return ` · eta ${(s / 3600).toFixed(1)}h`;
}

function widgetsBottom(node) {
  let bottom = LiteGraph.NODE_TITLE_HEIGHT || 30;
  for (const w of node.widgets || []) {
    if (w.name === undefined) continue;
    const y = w.last_y ?? w.y;
    if (!Number.isFinite(y)) continue;
    const h = w.computeSize ? w.computeSize(node.size[0])[1] : LiteGraph.NODE_WIDGET_HEIGHT || 20;
    bottom = Math.max(bottom, y + h);
  }
  return bottom;
}

// Below the widgets: the chart, then (once the run rendered validation videos, see
// validation_preview.js) the preview. The chart takes the spare height when there is no preview.
const PREVIEW_H = 220;
const VALIDATION_PROP = "wan_s2v_validation";

function hasPreview(node) {
  const v = node.properties?.[VALIDATION_PROP];
  return !!(v && Array.isArray(v.videos) && v.videos.length);
}

function layout(node) {
  const top = widgetsBottom(node) + 8;
  const preview = hasPreview(node);
  const need = top + CHART_H + (preview ? PREVIEW_H + 8 : 0) + 8;
  if (node.size[1] < need) node.size[1] = need; // grow once; the user can resize further
  const x = 8, w = node.size[0] - 16;
  if (!preview) return { chart: { x, y: top, w, h: node.size[1] - top - 8 }, preview: null };
  const previewH = node.size[1] - top - CHART_H - 16;
  return {
    chart: { x, y: top, w, h: CHART_H },
    preview: { x, y: top + CHART_H + 8, w, h: previewH },
  };
}

function drawChart(node, ctx) {
  if (node.flags?.collapsed) return;
  const h = history(node);
  const box = layout(node).chart;
  const x0 = box.x, y0 = box.y, w = box.w, hgt = box.h;
  ctx.save();
  ctx.fillStyle = COLORS.bg;
  ctx.strokeStyle = COLORS.grid;
  ctx.lineWidth = 1;
  ctx.beginPath();
  ctx.roundRect ? ctx.roundRect(x0, y0, w, hgt, 6) : ctx.rect(x0, y0, w, hgt);
  ctx.fill();
  ctx.stroke();
  ctx.font = "11px sans-serif";
  ctx.fillStyle = COLORS.text;
  const n = h.step.length;
  if (!n) {
    ctx.fillText("loss chart: waiting for training steps", x0 + 8, y0 + 18);
    ctx.restore();
    node.__wanS2VChartDraws = (node.__wanS2VChartDraws || 0) + 1;
    return;
  }
  const last = n - 1;
  const header = `step ${h.step[last]}/${h.total || "?"} · loss ${fmt(h.loss[last])}` +
    (h.eval.length ? ` · eval ${fmt(h.eval[h.eval.length - 1][1])}` : "") +
    ` · lr ${fmt(h.lr[last])}` + fmtEta(h.eta);
  ctx.fillText(header, x0 + 8, y0 + 14);

  const pad = { l: 44, r: 10, t: 22, b: 16 };
  const px = x0 + pad.l, py = y0 + pad.t, pw = w - pad.l - pad.r, ph = hgt - pad.t - pad.b;
  const values = h.loss.concat(h.eval.map((p) => p[1])).filter(Number.isFinite);
  let lo = Math.min(...values), hi = Math.max(...values);
  if (!(hi > lo)) { hi = lo + 1e-6; lo -= 1e-6; }
  const xMax = Math.max(h.total || 0, h.step[last], 1);
  const xMin = Math.min(h.step[0], 1);
  const sx = (s) => px + ((s - xMin) / Math.max(xMax - xMin, 1)) * pw;
  const sy = (v) => py + ph - ((v - lo) / (hi - lo)) * ph;

  // Grid and y labels.
  ctx.strokeStyle = COLORS.grid;
  ctx.fillStyle = COLORS.text;
  for (let i = 0; i <= 3; i++) {
    const v = lo + ((hi - lo) * i) / 3;
    const y = sy(v);
    ctx.beginPath(); ctx.moveTo(px, y); ctx.lineTo(px + pw, y); ctx.stroke();
    ctx.fillText(fmt(v), x0 + 4, y + 4);
  }
  ctx.fillText(String(xMax), px + pw - ctx.measureText(String(xMax)).width, py + ph + 13);

  // Learning rate (own scale, dashed).
  const lrs = h.lr.filter(Number.isFinite);
  const lrHi = Math.max(...lrs, 0);
  if (lrHi > 0) {
    ctx.strokeStyle = COLORS.lr;
    ctx.setLineDash([4, 3]);
    ctx.beginPath();
    h.step.forEach((s, i) => {
      const y = py + ph - (h.lr[i] / lrHi) * ph * 0.95;
      i ? ctx.lineTo(sx(s), y) : ctx.moveTo(sx(s), y);
    });
    ctx.stroke();
    ctx.setLineDash([]);
  }
  // Raw loss.
  ctx.strokeStyle = COLORS.raw;
  ctx.beginPath();
  h.step.forEach((s, i) => (i ? ctx.lineTo(sx(s), sy(h.loss[i])) : ctx.moveTo(sx(s), sy(h.loss[i]))));
  ctx.stroke();
  // Smoothed loss (EMA).
  ctx.strokeStyle = COLORS.smooth;
  ctx.lineWidth = 2;
  ctx.beginPath();
  let ema = h.loss[0];
  const alpha = n > 50 ? 0.05 : 0.2;
  h.step.forEach((s, i) => {
    ema = i ? ema + alpha * (h.loss[i] - ema) : ema;
    i ? ctx.lineTo(sx(s), sy(ema)) : ctx.moveTo(sx(s), sy(ema));
  });
  ctx.stroke();
  // Eval loss.
  ctx.fillStyle = COLORS.eval;
  for (const [s, v] of h.eval) {
    ctx.beginPath(); ctx.arc(sx(s), sy(v), 3, 0, Math.PI * 2); ctx.fill();
  }
  // Legend.
  ctx.font = "10px sans-serif";
  let lx = px + 4;
  for (const [label, color] of [["loss", COLORS.smooth], ["eval", COLORS.eval], ["lr", COLORS.lr]]) {
    ctx.fillStyle = color;
    ctx.fillText(label, lx, py + ph - 4);
    lx += ctx.measureText(label).width + 10;
  }
  ctx.restore();
  node.__wanS2VChartDraws = (node.__wanS2VChartDraws || 0) + 1;
}

function nodeIn(graph, id) {
  return graph?.getNodeById?.(Number(id)) || graph?.getNodeById?.(id) || null;
}

function findNode(id) {
  if (!app.graph || id === undefined || id === null) return null;
  // Inside a subgraph the id is a path ("12:5"): the subgraph node 12 of the root graph,
  // then node 5 of its subgraph.
  const parts = String(id).split(":");
  let graph = app.graph;
  for (const part of parts.slice(0, -1)) {
    graph = nodeIn(graph, part)?.subgraph;
    if (!graph) return null;
  }
  return nodeIn(graph, parts[parts.length - 1]);
}

app.registerExtension({
  name: "wan_s2v_trainer.loss_chart",

  async setup() {
    api.addEventListener(EVENT, (event) => {
      const data = event.detail || {};
      const node = findNode(data.node);
      if (!node || node.type !== NODE_TYPE) return;
      addPoint(node, data);
      node.setDirtyCanvas?.(true, false);
      app.graph.setDirtyCanvas?.(true, false);
    });
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE_TYPE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      history(this);
      if (this.size && this.size[1] < widgetsBottom(this) + CHART_H + 16) {
        this.size[1] += CHART_H + 16;
      }
      return result;
    };
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      const result = onDrawForeground?.apply(this, arguments);
      try {
        drawChart(this, ctx);
      } catch (err) {
        console.warn("[wan_s2v_trainer] loss chart:", err);
      }
      return result;
    };
  },
});

// For tests and other extensions (validation_preview.js draws into layout(node).preview).
export { addPoint, findNode, history, layout, NODE_TYPE, PROP, VALIDATION_PROP };
