// The review page: one comparison at a time, three questions, answers saved as they are given.
// The server decides which comparison comes next (the rater's first one not fully answered), so a
// reload, a closed tab or a restarted server shows the same comparison with the answers already given.
"use strict";

const $ = (id) => document.getElementById(id);
const KEYS = { a: "left", arrowleft: "left", s: "tie", arrowdown: "tie", d: "right", arrowright: "right" };
const LABELS = { left: "\u2190 Left", tie: "Tie", right: "Right \u2192" };
const STORE = "dpdmd-review-rater";

let config = null;       // /api/config: questions, choices, default rater
let rater = "";
let item = null;         // the comparison shown (null: none, or all done)
let answers = {};        // question id -> "left" | "tie" | "right", as shown
let current = 0;         // index of the highlighted question (-1: all answered)
let pending = 0;         // answers sent and not yet confirmed saved
let queue = Promise.resolve();  // answers are sent one after the other, in the order given

async function getJSON(url, options) {
  const response = await fetch(url, options);
  let body;
  try { body = await response.json(); } catch (e) { body = {}; }
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

function questionIds() { return config.questions.map((q) => q.id); }

function allAnswered() { return questionIds().every((q) => q in answers); }

function firstUnanswered(from) {
  const ids = questionIds();
  for (let k = 0; k < ids.length; k++) {
    const i = (from + k) % ids.length;
    if (!(ids[i] in answers)) return i;
  }
  return -1;
}

function buildQuestions() {
  const box = $("questions");
  box.textContent = "";
  config.questions.forEach((q, i) => {
    const row = document.createElement("div");
    row.className = "question";
    row.dataset.q = q.id;
    row.innerHTML = `<span class="num">${i + 1}</span><span class="text"></span>`;
    row.querySelector(".text").textContent = q.text;
    row.addEventListener("click", () => { current = i; render(); });
    for (const choice of config.choices) {
      const b = document.createElement("button");
      b.type = "button";
      b.dataset.q = q.id;
      b.dataset.choice = choice;
      b.textContent = LABELS[choice];
      b.addEventListener("click", (e) => { e.stopPropagation(); current = i; give(choice); });
      row.appendChild(b);
    }
    box.appendChild(row);
  });
}

function render() {
  document.querySelectorAll(".question").forEach((row, i) => {
    row.classList.toggle("current", i === current);
    row.querySelectorAll("button").forEach((b) => b.classList.toggle("chosen", answers[b.dataset.q] === b.dataset.choice));
  });
  $("next").disabled = !(item && allAnswered() && pending === 0);
  document.body.dataset.pending = String(pending);
}

// Up to 3 seeds in a row, more in a near-square grid (9 -> 3 x 3).
function gridColumns(r) { return r <= 3 ? r : Math.ceil(Math.sqrt(r)); }

function fillGrid(el, urls, side) {
  const cols = gridColumns(urls.length);
  el.style.setProperty("--cols", cols);
  el.style.setProperty("--rows", Math.ceil(urls.length / cols));
  el.textContent = "";
  urls.forEach((url, k) => {
    const img = document.createElement("img");
    img.src = url;
    img.alt = `${side} ${k + 1}`;
    // Small images (a toy's 16 x 16) shown large: sharp pixels rather than a blur.
    img.addEventListener("load", () => { img.classList.toggle("upscaled", img.naturalWidth * 2 <= img.clientWidth); });
    el.appendChild(img);
  });
}

async function loadItem() {
  const data = await getJSON(`/api/item?rater=${encodeURIComponent(rater)}`);
  $("progress").textContent = `${data.done} / ${data.total} done`;
  item = data.item;
  if (!item) {
    $("review").hidden = true;
    $("done").hidden = false;
    return;
  }
  answers = { ...item.answers };
  $("prompt").textContent = item.prompt;
  document.body.dataset.n = String(item.n);
  fillGrid($("left"), item.images.left, "left");
  fillGrid($("right"), item.images.right, "right");
  current = Math.max(firstUnanswered(0), 0);
  $("review").hidden = false;
  setStatus("");
  render();
}

function give(choice) {
  if (!item || current < 0) return;
  const q = questionIds()[current];
  const n = item.n;
  answers[q] = choice;
  current = firstUnanswered(current + 1);
  pending += 1;
  render();
  queue = queue.then(async () => {
    try {
      await getJSON("/api/answer", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ rater, n, question: q, choice }),
      });
      setStatus("saved");
    } catch (e) {
      if (item && item.n === n && answers[q] === choice) delete answers[q];
      setStatus(`not saved (${e.message}): answer again`, true);
    } finally {
      pending -= 1;
      render();
    }
  });
}

async function next() {
  await queue;
  if (!item || !allAnswered()) return;
  try {
    await loadItem();
  } catch (e) {
    setStatus(`cannot load the next comparison (${e.message}): is the server running?`, true);
  }
}

function onKey(e) {
  if (e.ctrlKey || e.metaKey || e.altKey || e.target.tagName === "INPUT" || !item || $("review").hidden) return;
  const key = e.key.toLowerCase();
  if (key in KEYS) {
    e.preventDefault();
    if (current < 0) current = questionIds().length - 1;  // all answered: a key changes the last question
    give(KEYS[key]);
  } else if (/^[1-9]$/.test(key) && Number(key) <= questionIds().length) {
    current = Number(key) - 1;
    render();
  } else if (key === "enter" || key === "n") {
    e.preventDefault();
    next();
  }
}

function setRater(name) {
  rater = name.trim();
  localStorage.setItem(STORE, rater);
  const url = new URL(location.href);
  url.searchParams.set("rater", rater);
  history.replaceState(null, "", url);  // a reload keeps the rater
  $("rater-shown").textContent = rater;
  $("who").hidden = false;
  $("rater-form").hidden = true;
}

function askRater() {
  item = null;
  $("review").hidden = true;
  $("done").hidden = true;
  $("who").hidden = true;
  $("rater-form").hidden = false;
  $("rater-name").focus();
}

async function start() {
  config = await getJSON("/api/config");
  buildQuestions();
  $("next").addEventListener("click", next);
  document.addEventListener("keydown", onKey);
  $("rater-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    setRater($("rater-name").value);
    await loadItem();
  });
  $("change-rater").addEventListener("click", () => {
    localStorage.removeItem(STORE);
    askRater();
  });
  const name = new URLSearchParams(location.search).get("rater") || localStorage.getItem(STORE) || config.default_rater;
  if (name && name.trim()) {
    setRater(name);
    await loadItem();
  } else {
    askRater();
  }
}

start().catch((e) => {
  document.body.insertAdjacentHTML("afterbegin", '<p id="fatal" class="error"></p>');
  $("fatal").textContent = `The review page could not start: ${e.message}`;
});
