// pixseek's search page: plain JS over the JSON API (/docs). No build step, no dependencies.
"use strict";

const PAGE = 60;
const $ = (id) => document.getElementById(id);

// One search: its text, its example (an indexed id or an uploaded file) and how far it got.
// `serial` tells a stale response (from a search since replaced) from the current one.
// Until the rerank toggle is touched the library's default applies and the toggle shows it.
const state = {
  q: "", like: null, likeHit: null, upload: null, offset: 0, more: false, busy: false, serial: 0,
  rerankTouched: false,
};
let hits = []; // every result shown, in order, for the viewer's previous/next
let current = -1; // index in hits shown by the viewer

async function api(url, options = {}) {
  const response = await fetch(url, { credentials: "same-origin", ...options });
  const body = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

// A photo's files, by id: the server never takes a path from the page.
const thumbnailUrl = (id) => `/api/images/${id}/thumbnail`;
const originalUrl = (id) => `/api/images/${id}/original`;

function params() {
  const p = new URLSearchParams({ k: PAGE, offset: state.offset });
  if (state.q) p.set("q", state.q);
  if (state.like !== null && !state.upload) p.set("like", state.like);
  const negative = $("not").value.trim();
  if (negative) p.append("not", negative);
  for (const name of ["under", "after", "before"]) {
    if ($(name).value) p.set(name, $(name).value);
  }
  if (state.rerankTouched) p.set("rerank", $("rerank").checked);
  return p;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function remember() {
  const p = new URLSearchParams();
  if (state.q) p.set("q", state.q);
  if (state.like !== null && !state.upload) p.set("like", state.like);
  history.replaceState(null, "", p.toString() ? `?${p}` : location.pathname);
}

async function search() {
  state.serial += 1;
  state.busy = false;
  state.offset = 0;
  state.more = false;
  hits = [];
  $("grid").replaceChildren();
  showExample();
  remember();
  if (!state.q && state.like === null && !state.upload) {
    setStatus("Type what you are looking for.");
    return;
  }
  await loadMore();
}

async function loadMore() {
  if (state.busy) return;
  state.busy = true;
  const serial = state.serial;
  setStatus(state.offset ? "Loading more…" : "Searching…");
  try {
    const url = `/api/search${state.upload ? "/image" : ""}?${params()}`;
    let options = {};
    if (state.upload) {
      const form = new FormData();
      form.append("image", state.upload, state.upload.name || "upload");
      options = { method: "POST", body: form };
    }
    const page = await api(url, options);
    if (serial !== state.serial) return; // a newer search started meanwhile
    render(page.results);
    if (!state.rerankTouched && state.q) $("rerank").checked = page.reranked;
    state.offset += page.results.length;
    state.more = page.more && page.results.length > 0;
    setStatus(hits.length ? `${countText()} (${page.took_ms} ms${page.reranked ? ", reranked" : ""})`
                          : "No matching photos.");
  } catch (error) {
    if (serial === state.serial) setStatus(error.message, true);
    state.more = false;
  } finally {
    if (serial === state.serial) state.busy = false;
  }
  if (serial === state.serial && state.more && nearBottom()) loadMore(); // a tall screen
}

// Every photo is listed, best match first, so the count says how many score 0.5 or more (for a
// calibrated model: as likely a match as not) among those shown, not that all of them match.
function countText() {
  const good = hits.filter((hit) => hit.score >= 0.5).length;
  const scoring = `${good} scoring 0.5 or more`;
  return state.more ? `${scoring} among the best ${hits.length} photos (more as you scroll)`
                    : `${scoring} among all ${hits.length} photos, best first`;
}

function scoreText(hit) {
  return `match ${hit.score.toFixed(2)}`;
}

function nearBottom() {
  return $("sentinel").getBoundingClientRect().top < window.innerHeight + 600;
}

function render(results) {
  const fragment = document.createDocumentFragment();
  for (const hit of results) {
    const index = hits.push(hit) - 1;
    const tile = document.createElement("figure");
    tile.className = "tile";
    tile.dataset.id = hit.id;
    const img = document.createElement("img");
    img.src = thumbnailUrl(hit.id);
    img.loading = "lazy";
    img.decoding = "async";
    img.alt = hit.caption || basename(hit.path);
    img.addEventListener("click", () => openViewer(index));
    const caption = document.createElement("figcaption");
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = scoreText(hit);
    score.title = "How well the photo matches, from 0 to 1 (0.5: as likely a match as not)";
    const like = document.createElement("button");
    like.type = "button";
    like.className = "like";
    like.textContent = "More like this";
    like.addEventListener("click", () => moreLike(hit));
    caption.append(score, like);
    tile.append(img, caption);
    fragment.append(tile);
  }
  $("grid").append(fragment);
}

function basename(path) {
  return path.split(/[\\/]/).pop();
}

function moreLike(hit) {
  $("viewer").close();
  state.like = hit.id;
  state.upload = null;
  state.q = "";
  $("q").value = "";
  state.likeHit = hit;
  search();
  window.scrollTo({ top: 0 });
}

function searchByFile(file) {
  if (!file) return;
  state.upload = file;
  state.like = null;
  state.q = $("q").value.trim();
  search();
}

function showExample() {
  const box = $("example");
  if (state.upload) {
    if (box.dataset.src) URL.revokeObjectURL(box.dataset.src);
    box.dataset.src = URL.createObjectURL(state.upload);
    $("example-img").src = box.dataset.src;
    $("example-name").textContent = state.upload.name || "your photo";
  } else if (state.like !== null) {
    $("example-img").src = thumbnailUrl(state.like);
    $("example-name").textContent = state.likeHit ? basename(state.likeHit.path) : `#${state.like}`;
  }
  box.hidden = !state.upload && state.like === null;
}

function openViewer(index) {
  const hit = hits[index];
  if (!hit) return;
  current = index;
  $("viewer-img").src = `${thumbnailUrl(hit.id)}?size=1280`;
  $("viewer-img").alt = hit.caption || basename(hit.path);
  $("viewer-path").textContent = hit.path;
  const facts = [scoreText(hit)];
  if (hit.taken_at) facts.push(new Date(hit.taken_at).toLocaleString());
  if (hit.width && hit.height) facts.push(`${hit.width} × ${hit.height}`);
  $("viewer-facts").textContent = facts.join(" · ");
  $("viewer-caption").textContent = hit.caption || "";
  $("viewer-original").href = originalUrl(hit.id);
  if (!$("viewer").open) $("viewer").showModal();
}

async function showInfo() {
  try {
    const info = await api("/api/info");
    $("info").textContent = `${info.images.toLocaleString()} photos` +
      (info.failed ? ` (${info.failed} failed)` : "") + ` · ${info.model || "no model yet"}` +
      (info.newer_model ? ` (${info.newer_model} is newer: pixseek index --reindex)` : "");
    $("rerank").disabled = !info.rerank_available;
    if (!info.rerank_available) $("rerank").parentElement.title = "Reranking is not available";
    const under = $("under");
    under.replaceChildren(under.options[0]);
    for (const folder of info.folders) under.append(new Option(folder, folder));
    $("index").hidden = !info.index_folders.length;
    $("index").title = info.index_folders.join("\n");
  } catch (error) {
    $("info").textContent = error.message;
  }
}

async function pollJob() {
  const job = await api("/api/index").catch((error) => ({ state: "failed", error: error.message }));
  $("index").disabled = job.state === "running";
  if (job.state === "running") {
    $("job").textContent = `Indexing… ${job.done} / ${job.total}`;
    setTimeout(pollJob, 1000);
    return;
  }
  $("job").textContent = job.state === "failed" ? `Indexing failed: ${job.error}`
    : job.state === "done" ? `Indexed: ${job.report.embedded} new or changed, ${job.report.failed} failed`
    : "";
  if (job.state === "done") showInfo();
}

function wire() {
  $("search").addEventListener("submit", (event) => {
    event.preventDefault();
    state.q = $("q").value.trim();
    search();
  });
  $("file").addEventListener("change", () => searchByFile($("file").files[0]));
  $("example-clear").addEventListener("click", () => {
    state.like = null;
    state.upload = null;
    $("file").value = "";
    state.q = $("q").value.trim();
    search();
  });
  for (const id of ["under", "after", "before"]) {
    $(id).addEventListener("change", () => search());
  }
  $("rerank").addEventListener("change", () => {
    state.rerankTouched = true;
    search();
  });
  $("viewer-close").addEventListener("click", () => $("viewer").close());
  $("viewer").addEventListener("click", (event) => {
    if (event.target === $("viewer")) $("viewer").close(); // a click on the backdrop
  });
  $("viewer-like").addEventListener("click", () => moreLike(hits[current]));
  document.addEventListener("keydown", (event) => {
    if (!$("viewer").open) return;
    if (event.key === "ArrowRight") openViewer(Math.min(current + 1, hits.length - 1));
    if (event.key === "ArrowLeft") openViewer(Math.max(current - 1, 0));
  });
  $("index").addEventListener("click", async () => {
    try {
      await api("/api/index", { method: "POST" });
    } catch (error) {
      $("job").textContent = error.message;
      return;
    }
    pollJob();
  });

  // Drop a photo anywhere on the page to search by it.
  let depth = 0;
  const hasFiles = (event) => [...event.dataTransfer.types].includes("Files");
  window.addEventListener("dragenter", (event) => {
    if (!hasFiles(event)) return;
    depth += 1;
    $("drop").hidden = false;
  });
  window.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (!depth) $("drop").hidden = true;
  });
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => {
    event.preventDefault();
    depth = 0;
    $("drop").hidden = true;
    searchByFile(event.dataTransfer.files[0]);
  });

  new IntersectionObserver((entries) => {
    if (entries[0].isIntersecting && state.more) loadMore();
  }, { rootMargin: "600px" }).observe($("sentinel"));
}

wire();
showInfo();
pollJob();
const start = new URLSearchParams(location.search);
state.q = start.get("q") || "";
$("q").value = state.q;
state.like = /^\d+$/.test(start.get("like") || "") ? Number(start.get("like")) : null;
search();
