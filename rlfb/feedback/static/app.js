// The rater's page: one item at a time from GET /api/next, one POST /api/judgments per judgment.
// Model text is only ever set with textContent, never parsed as HTML.
"use strict";

const state = { token: null, item: null, busy: false, editing: false };
const $ = (id) => document.getElementById(id);

function readToken() {
  // A token in the URL fragment (#token=...) never reaches the server's logs; keep it for this tab only.
  const match = /(?:^|[#&])token=([^&]+)/.exec(window.location.hash);
  if (match) {
    sessionStorage.setItem("rlfb-token", decodeURIComponent(match[1]));
    history.replaceState(null, "", window.location.pathname);
  }
  return sessionStorage.getItem("rlfb-token");
}

function say(text) { $("status").textContent = text; }

async function api(method, path, body) {
  const options = { method, headers: { Authorization: "Bearer " + state.token } };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  let data = null;
  try { data = await response.json(); } catch (error) { data = null; }
  if (!response.ok) {
    const message = data && data.error ? data.error : "HTTP " + response.status;
    const failure = new Error(message);
    failure.status = response.status;
    throw failure;
  }
  return data;
}

function showProgress(progress) {
  const goal = progress.goal;
  $("progress-text").textContent = goal
    ? `${progress.rater_judgments} / ${goal} judged (all raters: ${progress.total_judgments})`
    : `${progress.rater_judgments} judged (all raters: ${progress.total_judgments})`;
  $("progress-bar").max = goal || Math.max(1, progress.rater_judgments);
  $("progress-bar").value = progress.rater_judgments;
}

function textBlock(label, text) {
  const box = document.createElement("div");
  const caption = document.createElement("p");
  caption.className = "label";
  caption.textContent = label;
  const body = document.createElement("pre");
  body.className = "completion";
  body.textContent = text;
  box.append(caption, body);
  return box;
}

function render(item) {
  state.item = item;
  $("prompt").textContent = item.prompt;
  const list = $("completions");
  list.replaceChildren();
  if (item.completions.length === 2) {
    list.append(textBlock("A", item.completions[0]), textBlock("B", item.completions[1]));
  } else {
    list.append(textBlock("Completion", item.completions[0]));
  }
  for (const group of document.querySelectorAll(".group")) {
    group.hidden = !item.kinds.includes(group.dataset.kind);
  }
  const rating = $("rating");
  rating.replaceChildren();
  const [low, high] = item.scale;
  for (let value = low; value <= high; value += 1) {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = String(value);
    button.title = `Rate ${value} (key: ${value})`;
    button.addEventListener("click", () => judge("rating", { rating: value }));
    rating.append(button);
  }
  $("version").textContent = item.policy_version;
  closeEditor();
  showProgress(item.progress);
  $("item").hidden = false;
  say("");
}

async function next() {
  try {
    render(await api("GET", "/api/next"));
  } catch (error) {
    if (error.status === 401) { signOut(error.message); return; }
    say(error.message);
    setTimeout(next, 2000);
  }
}

async function judge(kind, value) {
  if (!state.item || state.busy || !state.item.kinds.includes(kind)) return;
  state.busy = true;
  const body = { item_id: state.item.item_id, kind, value, request_id: crypto.randomUUID() };
  for (let attempt = 0; ; attempt += 1) {
    try {
      const answer = await api("POST", "/api/judgments", body);  // the same request_id on a retry: stored once
      showProgress(answer.progress);
      break;
    } catch (error) {
      if (error.status || attempt >= 4) { say(error.message); state.busy = false; return; }
      await new Promise((resolve) => setTimeout(resolve, 500 * (attempt + 1)));
    }
  }
  state.busy = false;
  await next();
}

function openEditor() {
  if (!state.item || !state.item.kinds.includes("edit")) return;
  state.editing = true;
  $("editor").hidden = false;
  $("edit-text").value = state.item.completions[0];
  $("edit-text").focus();
}

function closeEditor() {
  state.editing = false;
  $("editor").hidden = true;
}

function signOut(message) {
  sessionStorage.removeItem("rlfb-token");
  state.token = null;
  $("item").hidden = true;
  $("signin").hidden = false;
  say(message || "");
}

function onKey(event) {
  if (state.editing) {
    if (event.key === "Escape") { closeEditor(); event.preventDefault(); }
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      judge("edit", { text: $("edit-text").value });
      event.preventDefault();
    }
    return;
  }
  if (!state.item || event.ctrlKey || event.metaKey || event.altKey || event.target.tagName === "INPUT") return;
  const key = event.key.toLowerCase();
  const keys = {
    y: () => judge("binary", { label: 1 }), arrowup: () => judge("binary", { label: 1 }),
    n: () => judge("binary", { label: 0 }), arrowdown: () => judge("binary", { label: 0 }),
    a: () => judge("choice", { chosen: 0 }), arrowleft: () => judge("choice", { chosen: 0 }),
    b: () => judge("choice", { chosen: 1 }), arrowright: () => judge("choice", { chosen: 1 }),
    e: openEditor,
  };
  if (keys[key]) { keys[key](); event.preventDefault(); return; }
  const [low, high] = state.item.scale;
  const digit = Number(key);
  if (/^[0-9]$/.test(key) && digit >= low && digit <= high) { judge("rating", { rating: digit }); event.preventDefault(); }
}

function start() {
  $("up").addEventListener("click", () => judge("binary", { label: 1 }));
  $("down").addEventListener("click", () => judge("binary", { label: 0 }));
  $("choose-a").addEventListener("click", () => judge("choice", { chosen: 0 }));
  $("choose-b").addEventListener("click", () => judge("choice", { chosen: 1 }));
  $("edit").addEventListener("click", openEditor);
  $("edit-submit").addEventListener("click", () => judge("edit", { text: $("edit-text").value }));
  $("edit-cancel").addEventListener("click", closeEditor);
  $("signin").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem("rlfb-token", $("token").value.trim());
    state.token = $("token").value.trim();
    $("signin").hidden = true;
    next();
  });
  document.addEventListener("keydown", onKey);
  state.token = readToken();
  if (state.token) { next(); } else { $("signin").hidden = false; }
}

document.addEventListener("DOMContentLoaded", start);
