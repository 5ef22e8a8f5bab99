// Validation previews on the "Train Wan S2V LoRA" node.
//
// The training node sends one `wan_s2v.validation` websocket event per validation render:
//   {node, step, output_name, videos: [{filename, subfolder, type, url}]}
// (nodes/train_runner.py); the mp4s lie under ComfyUI's output folder and come from /view.
// This extension keeps the latest render (and the steps before it) in the node's properties
// (`wan_s2v_validation`), so it is saved with the workflow and shown again after a reload, and
// draws the videos (muted, looping) below the loss chart, in the box loss_chart.js leaves for
// them. A click on a video opens the mp4 (with its audio) in a new tab.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { findNode, layout, NODE_TYPE, VALIDATION_PROP } from "./loss_chart.js";

const EVENT = "wan_s2v.validation";
const MAX_HISTORY = 50;
const HEADER_H = 18;
const COLORS = { bg: "#1b1b1b", border: "#333", text: "#bbb" };

function fileOf(v) {
  return { filename: String(v.filename), subfolder: String(v.subfolder ?? ""), type: String(v.type ?? "output") };
}

function setValidation(node, data) {
  const step = Number(data.step);
  if (!Number.isFinite(step) || !Array.isArray(data.videos)) return;
  node.properties = node.properties || {};
  const videos = data.videos.map(fileOf);
  // A new run (or a resume) restarts at an earlier step: drop what comes at or after it.
  const history = (node.properties[VALIDATION_PROP]?.history || []).filter((h) => h.step < step);
  history.push({ step, videos });
  node.properties[VALIDATION_PROP] = {
    step, output_name: data.output_name ?? "", videos, history: history.slice(-MAX_HISTORY),
  };
}

function viewURL(v) {
  const query = new URLSearchParams(fileOf(v));
  return api.apiURL(`/view?${query}`);
}

// One <video> per case, kept on the node (not serialised) and rebuilt when the files change.
// They sit in the page, almost invisible, so that the browser keeps playing them.
let holder = null;

function videoHolder() {
  if (!holder) {
    holder = document.createElement("div");
    holder.style.cssText = "position:fixed;left:0;bottom:0;width:2px;height:2px;overflow:hidden;" +
      "opacity:0.01;pointer-events:none;z-index:-1";
    document.body.appendChild(holder);
  }
  return holder;
}

function dropVideos(node) {
  for (const el of node.__wanS2VVideos?.els || []) {
    el.pause();
    el.removeAttribute("src");
    el.load();
    el.remove();
  }
  node.__wanS2VVideos = null;
}

function videosOf(node) {
  const state = node.properties?.[VALIDATION_PROP];
  const key = JSON.stringify(state?.videos || []);
  if (node.__wanS2VVideos?.key === key) return node.__wanS2VVideos.els;
  dropVideos(node);
  const els = (state?.videos || []).map((v) => {
    const el = document.createElement("video");
    Object.assign(el, { muted: true, loop: true, autoplay: true, playsInline: true, preload: "auto" });
    el.width = 2;
    el.height = 2;
    const redraw = () => node.setDirtyCanvas?.(true, false);
    el.addEventListener("loadeddata", redraw);
    el.addEventListener("error", redraw);
    if (el.requestVideoFrameCallback) {
      const tick = () => {
        if (!el.isConnected) return;
        redraw();
        el.requestVideoFrameCallback(tick);
      };
      el.requestVideoFrameCallback(tick);
    }
    el.src = viewURL(v);
    videoHolder().appendChild(el);
    el.play?.().catch(() => {}); // autoplay may be refused: the first frame is drawn anyway
    return el;
  });
  node.__wanS2VVideos = { key, els };
  return els;
}

function cells(box, count) {
  const top = box.y + HEADER_H, h = box.h - HEADER_H - 4, w = box.w / Math.max(count, 1);
  return Array.from({ length: count }, (_, i) => ({ x: box.x + i * w, y: top, w, h }));
}

function drawPreview(node, ctx) {
  if (node.flags?.collapsed) return;
  const box = layout(node).preview;
  const state = node.properties?.[VALIDATION_PROP];
  if (!box || !state) return;
  const els = videosOf(node);
  ctx.save();
  ctx.fillStyle = COLORS.bg;
  ctx.strokeStyle = COLORS.border;
  ctx.beginPath();
  ctx.roundRect ? ctx.roundRect(box.x, box.y, box.w, box.h, 6) : ctx.rect(box.x, box.y, box.w, box.h);
  ctx.fill();
  ctx.stroke();
  ctx.font = "11px sans-serif";
  ctx.fillStyle = COLORS.text;
  ctx.fillText(`validation · step ${state.step} · ${els.length} video(s) · click to open`, box.x + 8, box.y + 13);
  let frames = 0;
  cells(box, els.length).forEach((cell, i) => {
    const el = els[i];
    const pad = 4;
    if (el.readyState >= 2 && el.videoWidth) {
      const scale = Math.min((cell.w - 2 * pad) / el.videoWidth, (cell.h - pad) / el.videoHeight);
      const w = el.videoWidth * scale, h = el.videoHeight * scale;
      ctx.drawImage(el, cell.x + (cell.w - w) / 2, cell.y + (cell.h - h) / 2, w, h);
      frames += 1;
    } else {
      ctx.fillText(el.error ? "cannot play this video here" : "loading…", cell.x + pad + 4, cell.y + 16);
    }
  });
  ctx.restore();
  node.__wanS2VPreviewDraws = (node.__wanS2VPreviewDraws || 0) + 1;
  node.__wanS2VPreviewFrames = frames;
}

app.registerExtension({
  name: "wan_s2v_trainer.validation_preview",

  async setup() {
    api.addEventListener(EVENT, (event) => {
      const data = event.detail || {};
      const node = findNode(data.node);
      if (!node || node.type !== NODE_TYPE) return;
      setValidation(node, data);
      node.setDirtyCanvas?.(true, true);
      app.graph.setDirtyCanvas?.(true, true);
    });
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE_TYPE) return;
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      const result = onDrawForeground?.apply(this, arguments);
      try {
        drawPreview(this, ctx);
      } catch (err) {
        console.warn("[wan_s2v_trainer] validation preview:", err);
      }
      return result;
    };
    const onMouseDown = nodeType.prototype.onMouseDown;
    nodeType.prototype.onMouseDown = function (event, pos) {
      const box = layout(this).preview;
      const state = this.properties?.[VALIDATION_PROP];
      if (box && state && pos[1] >= box.y && pos[1] <= box.y + box.h && pos[0] >= box.x && pos[0] <= box.x + box.w) {
        const index = Math.floor(((pos[0] - box.x) / box.w) * state.videos.length);
        const video = state.videos[Math.min(Math.max(index, 0), state.videos.length - 1)];
        if (video) {
          window.open(viewURL(video), "_blank");
          return true;
        }
      }
      return onMouseDown?.apply(this, arguments);
    };
    const onRemoved = nodeType.prototype.onRemoved;
    nodeType.prototype.onRemoved = function () {
      dropVideos(this);
      return onRemoved?.apply(this, arguments);
    };
  },
});

// For tests and other extensions.
export { setValidation, viewURL };
