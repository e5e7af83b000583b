// The search page: the URL holds the query and the filters; results come from POST /web/search,
// pictures from /web/thumb/ID and /web/view/ID (by item id, never by path).
"use strict";

const FILTERS = ["kind", "after", "before", "near", "camera", "under", "sort"];
const RELEVANT = 0.5; // with rerank, hits the reranker judges less likely relevant than this are hidden
const K = 50;

const $ = (selector) => document.querySelector(selector);
let hits = []; // the records shown, in order
let viewed = -1; // the hit open in the viewer
let example = null; // a photo to search with, as a data: URI (too big for the URL)

function params() {
  return new URLSearchParams(location.search);
}

// The form shows what the URL says.
function showParams(p) {
  $("#q").value = p.get("q") || "";
  const filters = $("#filters");
  for (const name of FILTERS) filters.elements[name].value = p.get(name) || filters.elements[name].options?.[0].value || "";
  filters.elements.rerank.checked = p.get("rerank") === "1";
  filters.elements.all.checked = p.get("all") === "1";
}

// A new search goes into the URL (so it can be bookmarked and shared), then runs.
function go(changes) {
  const p = params();
  for (const [name, value] of Object.entries(changes)) {
    if (value) p.set(name, value);
    else p.delete(name);
  }
  history.pushState(null, "", "?" + p.toString());
  run();
}

function formChanges() {
  const filters = $("#filters").elements;
  const changes = { q: $("#q").value.trim() };
  for (const name of FILTERS) changes[name] = filters[name].value.trim();
  if (changes.sort === "score") changes.sort = "";
  changes.rerank = filters.rerank.checked ? "1" : "";
  changes.all = filters.all.checked ? "1" : "";
  return changes;
}

async function run() {
  const p = params();
  showParams(p);
  const body = { k: Number(p.get("k")) || K, rerank: p.get("rerank") === "1" };
  for (const name of FILTERS) if (p.get(name)) body[name] = p.get(name);
  if (p.get("like")) body.like = Number(p.get("like"));
  else if (example && p.get("example") === "1") body.query = { image: example };
  else if (p.get("q")) body.query = p.get("q");
  else {
    show([], "");
    delete $("#results").dataset.count; // no search yet
    return;
  }
  $("#example-preview").hidden = !body.query?.image;
  delete $("#results").dataset.count; // set again when this search's hits are shown
  status("Searching…");
  const started = performance.now();
  let answer;
  try {
    answer = await fetch("/web/search", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
  } catch (error) {
    status(`The server did not answer: ${error.message}`, true);
    return;
  }
  const records = await answer.json().catch(() => null);
  if (!answer.ok || !Array.isArray(records)) {
    status(records?.error?.message || `The server answered ${answer.status}`, true);
    show([], null);
    return;
  }
  const seconds = ((performance.now() - started) / 1000).toFixed(2);
  const relevant = body.rerank && p.get("all") !== "1"
    ? records.filter((r) => r.rerank_score != null && r.rerank_score >= RELEVANT)
    : records;
  const hidden = records.length - relevant.length;
  show(relevant, `${relevant.length} hits in ${seconds} s` +
    (hidden ? ` · ${hidden} judged not relevant are hidden (tick “Show all”)` : ""));
}

function status(text, isError = false) {
  $("#status").textContent = text;
  $("#status").classList.toggle("error", isError);
}

function show(records, message) {
  hits = records;
  if (message !== null) status(message);
  const grid = $("#results");
  grid.replaceChildren(...records.map(tile));
  grid.dataset.count = records.length; // tests and scripts: the search is done
}

function name(path) {
  return path.split(/[\\/]/).pop();
}

function place(r) {
  if (r.page != null) return `page ${r.page}`;
  if (r.start_s != null) return `${clock(r.start_s)}–${clock(r.end_s)}`;
  return "";
}

function clock(seconds) {
  const s = Math.floor(seconds);
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}

function tile(r, n) {
  const figure = document.createElement("figure");
  figure.className = "hit";
  Object.assign(figure.dataset, { path: r.path, kind: r.kind, score: r.score, id: r.id });
  if (r.rerank_score != null) figure.dataset.rerankScore = r.rerank_score;
  if (r.page != null) figure.dataset.page = r.page;
  if (r.start_s != null) Object.assign(figure.dataset, { start: r.start_s, end: r.end_s });
  if (r.date) figure.dataset.date = r.date;

  const open = document.createElement("button");
  open.type = "button";
  open.className = "open";
  open.title = r.path;
  const img = document.createElement("img");
  img.src = `/web/thumb/${r.id}`;
  img.loading = "lazy";
  img.alt = name(r.path);
  img.width = 200;
  img.height = 200;
  open.append(img);
  open.addEventListener("click", () => view(n));

  const caption = document.createElement("figcaption");
  const title = document.createElement("span");
  title.className = "name";
  title.textContent = `${name(r.path)} ${place(r)}`.trim();
  const facts = document.createElement("span");
  facts.className = "facts";
  facts.textContent = [
    r.kind,
    r.score != null ? `score ${r.score.toFixed(3)}` : "",
    r.rerank_score != null ? `rerank ${r.rerank_score.toFixed(2)}` : "",
    r.date ? r.date.slice(0, 10) : "",
  ].filter(Boolean).join(" · ");
  const like = document.createElement("button");
  like.type = "button";
  like.className = "like";
  like.textContent = "More like this";
  like.addEventListener("click", () => moreLike(r.id));
  caption.append(title, facts, like);
  figure.append(open, caption);
  return figure;
}

function moreLike(id) {
  $("#viewer").close();
  go({ like: String(id), q: "", example: "" });
}

// The viewer: a photo or page at screen size, a video from its moment, a text's first lines.
async function view(n) {
  if (n < 0 || n >= hits.length) return;
  viewed = n;
  const r = hits[n];
  const body = $("#viewer-body");
  let content;
  if (r.kind === "video") {
    content = document.createElement("video");
    content.controls = true;
    content.autoplay = true;
    content.muted = true;
    content.preload = "auto";
    const start = r.start_s ?? 0;
    content.addEventListener("loadedmetadata", () => { content.currentTime = start; }, { once: true });
    content.src = `/web/view/${r.id}`;
    content.dataset.start = start;
  } else if (r.kind === "text") {
    content = document.createElement("pre");
    content.textContent = "…";
    fetch(`/web/view/${r.id}`).then((answer) => answer.text()).then((text) => {
      if (viewed === n) content.textContent = text;
    });
  } else {
    content = document.createElement("img");
    content.src = `/web/view/${r.id}`;
    content.alt = name(r.path);
  }
  content.className = "viewed";
  body.replaceChildren(content);
  $("#viewer-caption").textContent = `${n + 1} of ${hits.length} · ${r.path}` +
    (place(r) ? ` · ${place(r)}` : "") + (r.date ? ` · ${r.date.slice(0, 19).replace("T", " ")}` : "");
  if (!$("#viewer").open) $("#viewer").showModal();
}

function closeViewer() {
  $("#viewer-body").replaceChildren(); // stops a video
  viewed = -1;
}

// Search by example: a photo chosen or dropped, sent as a data: URI.
function searchWith(file) {
  if (!file || !file.type.startsWith("image/")) {
    status(`${file ? file.name : "that"} is not an image; choose a photo to search with`, true);
    return;
  }
  const reader = new FileReader();
  reader.addEventListener("load", () => {
    example = reader.result;
    $("#example-preview").src = URL.createObjectURL(file);
    go({ example: "1", q: "", like: "" });
  });
  reader.readAsDataURL(file);
}

document.addEventListener("DOMContentLoaded", () => {
  $("#search").addEventListener("submit", (event) => {
    event.preventDefault();
    go({ ...formChanges(), like: "", example: "" });
  });
  $("#filters").addEventListener("change", () => go(formChanges()));
  $("#filters").addEventListener("submit", (event) => {
    event.preventDefault();
    go(formChanges());
  });
  $("#example").addEventListener("change", (event) => searchWith(event.target.files[0]));
  document.addEventListener("dragover", (event) => event.preventDefault());
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    searchWith(event.dataTransfer.files[0]);
  });
  $("#previous").addEventListener("click", () => view(viewed - 1));
  $("#next").addEventListener("click", () => view(viewed + 1));
  $("#close").addEventListener("click", () => $("#viewer").close());
  $("#like-viewed").addEventListener("click", () => moreLike(hits[viewed].id));
  $("#viewer").addEventListener("close", closeViewer);
  document.addEventListener("keydown", (event) => {
    if (!$("#viewer").open) return;
    if (event.key === "ArrowRight") view(viewed + 1);
    else if (event.key === "ArrowLeft") view(viewed - 1);
    // Escape: the dialog closes itself
  });
  window.addEventListener("popstate", run);
  run();
});
