// The duplicates page: groups from GET /web/dupes side by side, the suggested keeper marked. It deletes nothing.
"use strict";

const $ = (selector) => document.querySelector(selector);

async function load() {
  const p = new URLSearchParams(location.search);
  const form = $("#dupes-filters").elements;
  form.kind.value = p.get("kind") || "";
  form.threshold.value = p.get("threshold") || "0.95";
  const answer = await fetch(`/web/dupes?${p.toString()}`);
  const groups = await answer.json().catch(() => null);
  if (!answer.ok || !Array.isArray(groups)) {
    $("#status").textContent = groups?.error?.message || `The server answered ${answer.status}`;
    $("#status").classList.add("error");
    return;
  }
  $("#status").textContent = `${groups.length} groups of duplicates; nothing is deleted from this page.`;
  $("#groups").replaceChildren(...groups.map(section));
  $("#groups").dataset.count = groups.length;
}

function section(group) {
  const part = document.createElement("section");
  part.className = "dupes";
  part.dataset.type = group.type;
  const title = document.createElement("h2");
  title.textContent = `Group ${group.group}: ${group.type} duplicates (${group.kind})`;
  const grid = document.createElement("div");
  grid.className = "group";
  grid.append(...group.members.map(member));
  part.append(title, grid);
  return part;
}

function member(m) {
  const figure = document.createElement("figure");
  figure.className = "hit" + (m.keep ? " keeper" : "");
  Object.assign(figure.dataset, { path: m.path, id: m.id, keep: m.keep, similarity: m.similarity });
  const link = document.createElement("a");
  link.className = "open";
  link.href = `/web/view/${m.id}`;
  link.target = "_blank";
  link.rel = "noopener";
  const img = document.createElement("img");
  img.src = `/web/thumb/${m.id}`;
  img.loading = "lazy";
  img.alt = m.path;
  link.append(img);
  const caption = document.createElement("figcaption");
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = m.path.split(/[\\/]/).pop();
  name.title = m.path;
  const facts = document.createElement("span");
  facts.className = "facts";
  facts.textContent = [m.width && m.height ? `${m.width}×${m.height}` : "", m.size ? `${Math.round(m.size / 1024)} KiB` : "",
    `similarity ${m.similarity.toFixed(3)}`].filter(Boolean).join(" · ");
  caption.append(name, facts);
  if (m.keep) {
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.textContent = "keep";
    caption.append(badge);
  }
  figure.append(link, caption);
  return figure;
}

document.addEventListener("DOMContentLoaded", load);
