// The page served at GET /clinvla/ui: a search box over /clinvla/search, thumbnails through
// Orthanc's own /instances/{id}/preview, links to Orthanc Explorer's study page. Self-contained
// (no external script or style), and every URL is relative so that it works behind a reverse proxy
// that mounts Orthanc under a prefix. Text from the server is inserted with textContent only.
#pragma once

namespace clinvla_orthanc {

inline const char* ui_page() {
  return R"HTML(<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ClinVLA search</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
  form { display: flex; gap: .5rem; margin-bottom: 1rem; }
  input[type=search] { flex: 1; font-size: 1rem; padding: .4rem; }
  input[type=number] { width: 4.5rem; }
  #status { color: #666; margin-bottom: 1rem; font-size: .9rem; }
  #error { color: #b00020; white-space: pre-wrap; }
  .hit { display: flex; gap: 1rem; align-items: center; border-bottom: 1px solid #ddd; padding: .5rem 0; }
  .hit img { width: 128px; height: 128px; object-fit: contain; background: #000; }
  .score { font-variant-numeric: tabular-nums; color: #555; }
</style>
</head>
<body>
<h1>ClinVLA: search the studies of this Orthanc</h1>
<form id="form">
  <input type="search" id="q" placeholder="e.g. small right pleural effusion" required maxlength="2000" autofocus>
  <label>k <input type="number" id="k" value="10" min="1" max="1000"></label>
  <button type="submit">Search</button>
</form>
<div id="status"></div>
<div id="error"></div>
<div id="results"></div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
function el(tag, text) { const e = document.createElement(tag); if (text !== undefined) e.textContent = text; return e; }
function explorer(study) { return "../app/explorer.html#study?uuid=" + encodeURIComponent(study); }
function show(hits) {
  const box = $("results");
  box.replaceChildren();
  for (const h of hits) {
    const row = el("div"); row.className = "hit";
    const link = el("a"); link.href = explorer(h.study);
    if (h.frontal_instance) {
      const img = el("img"); img.alt = "frontal view"; img.loading = "lazy";
      img.src = "../instances/" + encodeURIComponent(h.frontal_instance) + "/preview";
      link.appendChild(img);
    }
    row.appendChild(link);
    const text = el("div");
    const t = h.tags || {};
    const title = el("a", (t.PatientName || "?") + " | " + (t.StudyDate || "") + " | " + (t.StudyDescription || ""));
    title.href = explorer(h.study);
    text.appendChild(title);
    text.appendChild(el("div", "score " + h.score.toFixed(4) + " | PatientID " + (t.PatientID || "") +
                                  " | Accession " + (t.AccessionNumber || "")));
    text.lastChild.className = "score";
    row.appendChild(text);
    box.appendChild(row);
  }
  if (!hits.length) box.appendChild(el("p", "No indexed study yet."));
}
async function refreshStatus() {
  try {
    const r = await fetch("status");
    const s = await r.json();
    $("status").textContent = s.enabled
      ? s.indexed + " studies indexed, " + s.queue + " waiting"
      : "disabled: " + s.disabled_reason;
  } catch (e) { $("status").textContent = "status unavailable: " + e; }
}
$("form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  $("error").textContent = "";
  const url = "search?q=" + encodeURIComponent($("q").value) + "&k=" + encodeURIComponent($("k").value);
  try {
    const r = await fetch(url);
    const body = await r.text();
    if (!r.ok) { $("error").textContent = "HTTP " + r.status + ": " + body; return; }
    show(JSON.parse(body).results);
  } catch (e) { $("error").textContent = String(e); }
});
refreshStatus();
</script>
</body>
</html>
)HTML";
}

}  // namespace clinvla_orthanc
