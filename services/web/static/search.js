// The vidsearch search page: builds /api/search requests from the form and renders
// the answer as cards. Plain ES module, no dependencies; every URL is relative to
// the page's <base>, so the page works wherever Serve mounts it. Text from the
// index (titles, ids) is only ever set as textContent, never parsed as HTML.

const $ = (id) => document.getElementById(id);
const form = $("search-form");
const query = $("q");
const tags = $("tags");
const minDuration = $("min-duration");
const maxDuration = $("max-duration");
const topK = $("top-k");
const rerank = $("rerank");
const keyRow = $("key-row");
const apiKey = $("api-key");
const submit = $("submit");
const statusLine = $("status");
const errorBox = $("error");
const results = $("results");
const template = $("card-template");

const KEY_COOKIE = "vidsearch_key";
// How close the player must already be to the best moment before we leave it alone.
const MOMENT_TOLERANCE_S = 0.05;
let inFlight = null;

function formatTime(seconds) {
  if (seconds < 60) return `${seconds.toFixed(2)} s`;
  const minutes = Math.floor(seconds / 60);
  return `${minutes}:${(seconds - minutes * 60).toFixed(1).padStart(4, "0")}`;
}

function basePath() {
  return new URL(document.baseURI).pathname;
}

function showError(message) {
  errorBox.textContent = message;
  errorBox.hidden = false;
}

function clearError() {
  errorBox.hidden = true;
  errorBox.textContent = "";
}

// Tags go in as JSON strings so that a tag like "2024" stays a keyword, not a number.
function tagList() {
  return tags.value.split(",").map((t) => t.trim()).filter((t) => t.length > 0);
}

// The API request: the form's fields in /api/search's parameters.
function apiParams() {
  const params = new URLSearchParams();
  params.set("q", query.value);
  if (topK.value.trim() !== "") params.set("top_k", topK.value.trim());
  if (!rerank.checked) params.set("rerank", "false");
  const wanted = tagList();
  if (wanted.length > 0) params.append("filter", `tags=${wanted.map((t) => JSON.stringify(t)).join(",")}`);
  if (minDuration.value.trim() !== "") params.append("filter", `duration_s>=${minDuration.value.trim()}`);
  if (maxDuration.value.trim() !== "") params.append("filter", `duration_s<=${maxDuration.value.trim()}`);
  return params;
}

// The page's own address mirrors the form, so a search can be bookmarked or shared.
function pageParams() {
  const params = new URLSearchParams();
  params.set("q", query.value);
  if (tags.value.trim()) params.set("tags", tags.value.trim());
  if (minDuration.value.trim()) params.set("min_duration", minDuration.value.trim());
  if (maxDuration.value.trim()) params.set("max_duration", maxDuration.value.trim());
  if (topK.value.trim() && topK.value.trim() !== "10") params.set("top_k", topK.value.trim());
  if (!rerank.checked) params.set("rerank", "false");
  return params;
}

function restoreForm() {
  const params = new URLSearchParams(window.location.search);
  query.value = params.get("q") ?? "";
  tags.value = params.get("tags") ?? "";
  minDuration.value = params.get("min_duration") ?? "";
  maxDuration.value = params.get("max_duration") ?? "";
  if (params.has("top_k")) topK.value = params.get("top_k");
  rerank.checked = params.get("rerank") !== "false";
  return query.value.trim() !== "";
}

function checkForm() {
  if (query.value.trim() === "") return "Type a sentence to search for.";
  const lo = minDuration.value.trim(), hi = maxDuration.value.trim();
  if (lo !== "" && hi !== "" && Number(lo) > Number(hi)) return "Duration: “from” is larger than “to”.";
  return null;
}

function saveKey() {
  const key = apiKey.value;
  if (key === "") return;
  document.cookie = `${KEY_COOKIE}=${encodeURIComponent(key)}; path=${basePath()}; SameSite=Strict`;
}

async function search() {
  const problem = checkForm();
  if (problem !== null) {
    showError(problem);
    query.focus();
    return;
  }
  clearError();
  if (!keyRow.hidden) saveKey();
  history.replaceState(null, "", `?${pageParams()}`);
  if (inFlight !== null) inFlight.abort();
  const controller = new AbortController();
  inFlight = controller;
  results.dataset.state = "loading";
  results.setAttribute("aria-busy", "true");
  submit.disabled = true;
  statusLine.textContent = "Searching…";
  const started = performance.now();
  try {
    const response = await fetch(`api/search?${apiParams()}`, {
      headers: { Accept: "application/json" }, credentials: "same-origin", signal: controller.signal,
    });
    const body = await response.json().catch(() => null);
    if (!response.ok) {
      failed(response.status, body);
      return;
    }
    render(body, performance.now() - started);
  } catch (err) {
    if (err.name === "AbortError") return; // a newer search replaced this one
    results.dataset.state = "error";
    statusLine.textContent = "";
    showError(`The search service did not answer: ${err.message}`);
  } finally {
    if (inFlight === controller) {
      inFlight = null;
      submit.disabled = false;
      results.removeAttribute("aria-busy");
    }
  }
}

function failed(status, body) {
  results.dataset.state = "error";
  results.replaceChildren();
  statusLine.textContent = "";
  const message = body?.error?.message ?? `HTTP ${status}`;
  if (status === 401) {
    keyRow.hidden = false;
    showError(`This server needs an API key. ${message}`);
    apiKey.focus();
    return;
  }
  showError(status === 503 ? `The search service is not ready: ${message}` : message);
}

function render(body, roundTripMs) {
  const t = body.timings ?? {};
  const ms = (v) => `${Number(v ?? 0).toFixed(1)} ms`;
  const parts = [
    `${body.results.length} result${body.results.length === 1 ? "" : "s"}`,
    body.reranked ? "re-ranked" : "recall only (not re-ranked)",
    `model ${body.model_version}`,
    `index ${body.index}`,
    `encode ${ms(t.encode_ms)}, recall ${ms(t.recall_ms)}, rerank ${ms(t.rerank_ms)}, server ${ms(t.total_ms)}`,
    `round trip ${ms(roundTripMs)}`,
  ];
  statusLine.textContent = parts.join(" · ");
  results.dataset.modelVersion = body.model_version;
  results.replaceChildren(...body.results.map((hit, i) => card(hit, i + 1, body.reranked)));
  results.dataset.state = "done";
}

function titleOf(hit) {
  const meta = hit.payload?.metadata;
  const title = (meta && typeof meta === "object" ? meta.title : null) ?? hit.summary?.title;
  return typeof title === "string" && title.trim() !== "" ? title : hit.video_id;
}

function card(hit, rank, reranked) {
  const node = template.content.firstElementChild.cloneNode(true);
  const id = encodeURIComponent(hit.video_id);
  const moment = Number(hit.best_moment_seconds ?? 0);
  const title = titleOf(hit);
  const when = formatTime(moment);
  node.dataset.videoId = hit.video_id;
  node.dataset.moment = String(moment);
  node.setAttribute("aria-label", `Result ${rank}: ${title}`);

  const video = node.querySelector("video");
  const poster = node.querySelector(".poster");
  const thumb = node.querySelector(".thumb");
  thumb.src = `thumb/${id}?t=${moment.toFixed(3)}`;
  thumb.alt = `${title} at ${when}`;
  // A long video's best segment (moment): its span, beside the best frame's time.
  const segments = Number(hit.segment_count ?? 1);
  const span = segments > 1
    ? ` · ${formatTime(Number(hit.segment_start_s ?? 0))}–${formatTime(Number(hit.segment_end_s ?? 0))}` : "";
  node.querySelector(".badge").textContent = `▶ ${when}${span}`;
  poster.setAttribute("aria-label", `Play ${title} from ${when}`);
  // The fragment starts the player at the best moment; browsers that ignore it get currentTime.
  video.src = `media/${id}#t=${moment.toFixed(3)}`;
  video.setAttribute("aria-label", `${title} (player)`);
  video.addEventListener("loadedmetadata", () => {
    if (video.played.length === 0 && Math.abs(video.currentTime - moment) > MOMENT_TOLERANCE_S) {
      video.currentTime = moment;
    }
  });
  video.addEventListener("error", () => {
    node.querySelector(".jump").disabled = true;
    node.querySelector(".jump").textContent = "This video cannot be played here";
  });
  const play = (fromMoment) => {
    poster.hidden = true;
    if (fromMoment) video.currentTime = moment;
    video.play().catch(() => {}); // autoplay refusal: the controls are there
    video.focus();
  };
  poster.addEventListener("click", () => play(false));

  node.querySelector(".title").textContent = title;
  node.querySelector(".video-id").textContent = `#${rank} · ${hit.video_id}`;
  node.querySelector(".fused").textContent = Number(hit.score).toFixed(3);
  node.querySelector(".recall").textContent = Number(hit.recall_score).toFixed(4);
  node.querySelector(".rerank").textContent = reranked ? Number(hit.rerank_score).toFixed(4) : "–";
  node.querySelector(".moment").textContent = when;
  const jump = node.querySelector(".jump");
  jump.textContent = "▶ Play from the best moment";
  jump.setAttribute("aria-label", `Play ${title} from the best moment, ${when}`);
  jump.addEventListener("click", () => play(true));
  return node;
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  search();
});
$("key-save").addEventListener("click", () => {
  saveKey();
  search();
});
apiKey.addEventListener("keydown", (event) => {
  if (event.key === "Enter") {
    event.preventDefault();
    saveKey();
    search();
  }
});

if (restoreForm()) search();
else query.focus();
