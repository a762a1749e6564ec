// The search page: plain DOM, no framework, nothing loaded from elsewhere (the CSP forbids it).
// Report text is only ever set with textContent, never innerHTML: it is archive data, not markup.
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "clinvla-token";
let thumbUrls = [];  // blob: URLs of the shown thumbnails, revoked when the grid is replaced

// study keys may hold slashes (CheXpert: patient00001/study1): encode each segment, keep the slashes
const keyPath = (key) => key.split("/").map(encodeURIComponent).join("/");

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

class AuthNeeded extends Error {}

// Every API call goes through here: it adds the bearer token when one was given, and turns an
// answer other than 2xx into an Error whose message is the service's own explanation.
async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.set("Authorization", "Bearer " + token);
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    $("token-form").hidden = false;
    $("token").focus();
    let detail = "this service needs a token";
    try { detail = (await response.json()).detail || detail; } catch (_) { /* not JSON */ }
    throw new AuthNeeded(detail);
  }
  if (!response.ok) {
    let detail = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      detail = body.message || (typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail));
    } catch (_) { /* keep the status line */ }
    throw new Error(detail);
  }
  return response;
}

async function loadThumbnail(img, key) {
  try {
    // fetched, not <img src>: an <img> request cannot carry the Authorization header
    const blob = await (await api(`/studies/${keyPath(key)}/thumbnail?size=256`)).blob();
    const url = URL.createObjectURL(blob);
    thumbUrls.push(url);
    img.src = url;
  } catch (err) {
    img.alt = "no thumbnail: " + err.message;
  }
}

function snippet(text, limit = 220) {
  if (!text) return "(no report)";
  const flat = text.replace(/\s+/g, " ").trim();
  return flat.length > limit ? flat.slice(0, limit - 1) + "…" : flat;
}

function render(results, heading, sourceKey = null) {
  thumbUrls.forEach(URL.revokeObjectURL);
  thumbUrls = [];
  const grid = $("results");
  grid.replaceChildren();
  for (const hit of results) {
    const card = $("card").content.firstElementChild.cloneNode(true);
    card.dataset.key = hit.study_key;
    if (hit.study_key === sourceKey) card.classList.add("source");
    card.querySelector(".rank").textContent = "#" + hit.rank;
    const score = typeof hit.score === "number" ? hit.score.toFixed(3) : "–";
    card.querySelector(".score").textContent = score;
    card.querySelector(".score").title = hit.local_score == null ? "global score"
      : `score after re-ranking (local ${hit.local_score.toFixed(3)})`;
    card.querySelector(".views").textContent = (hit.views || []).join(" + ");
    card.querySelector(".key").textContent = hit.study_key;
    card.querySelector(".report").textContent = snippet(hit.report);
    card.querySelector(".report").title = hit.report || "";
    const img = card.querySelector(".thumb");
    img.alt = "frontal view of " + hit.study_key;
    loadThumbnail(img, hit.study_key);
    card.querySelector(".more").addEventListener("click", () => moreLikeThis(hit.study_key));
    grid.appendChild(card);
  }
  setStatus(results.length ? `${results.length} results ${heading}` : `no results ${heading}`);
}

async function run(button, work) {
  button.disabled = true;
  setStatus("searching…");
  try {
    await work();
  } catch (err) {
    setStatus(err instanceof AuthNeeded ? err.message + " (enter it above)" : "error: " + err.message, true);
  } finally {
    button.disabled = false;
  }
}

function kValue() { return Number($("k").value) || 10; }

async function searchText(event) {
  event.preventDefault();
  const text = $("text").value;
  await run($("search-button"), async () => {
    const body = { text, k: kValue(), rerank: Number($("rerank").value) || 0 };
    const response = await api("/search/text", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    render((await response.json()).results, `for “${text}”`);
  });
}

async function moreLikeThis(key) {
  await run($("search-button"), async () => {
    const response = await api(`/studies/${keyPath(key)}/similar?k=${kValue()}`);
    render((await response.json()).results, `like ${key}`, key);
  });
}

async function searchImage(event) {
  event.preventDefault();
  await run($("image-button"), async () => {
    const form = new FormData();
    form.append("frontal", $("frontal").files[0]);
    if ($("lateral").files.length) form.append("lateral", $("lateral").files[0]);
    form.append("k", String(kValue()));
    const response = await api("/search/image", { method: "POST", body: form });
    render((await response.json()).results, `like the uploaded image`);
  });
}

async function showIndex() {
  try {
    const info = await (await api("/health")).json();
    const studies = info.studies ?? info.ntotal;
    const parts = [];
    if (studies != null) parts.push(`${studies} studies`);
    if (info.limits && info.limits.max_k) {
      $("k").max = info.limits.max_k;
      parts.push(`k ≤ ${info.limits.max_k}`);
    }
    $("index-info").textContent = parts.join(" · ");
    $("token-form").hidden = true;
  } catch (err) {
    setStatus(err instanceof AuthNeeded ? "enter the access token to search" : "error: " + err.message,
              err instanceof AuthNeeded ? false : true);
  }
}

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  $("token").value = "";
  setStatus("");
  showIndex();
});
$("text-form").addEventListener("submit", searchText);
$("image-form").addEventListener("submit", searchImage);
showIndex();
