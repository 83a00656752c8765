// The playground: generate text from this server (streamed), colour it by probability, and look inside
// the recurrent cells, or score any text. Plain script, no build; it calls only this server: models,
// generate, inspect, score.
"use strict";

const $ = (id) => document.getElementById(id);

const page = {
  models: new Map(), // name -> its entry of GET /models
  modelsShown: null, // what the model list shows, to redraw it only when the server's models change
  modelsProblem: false, // whether the message shown is about listing the models
  controller: null, // the AbortController of the generation in flight
  tokens: [], // generated characters: {char, logprob?, top?}
  drawn: 0, // how many of them the output shows (drawn once a frame)
  drawScheduled: false,
  withLogprobs: false, // whether the last generation asked for them
  copies: [], // the last generation's copied spans: {start, end, offset} into its text and the training text
  inspection: null, // the last POST /inspect answer
  scored: [], // the last POST /score answer's characters: {char, logprob, top}
  maxInspectChars: null,
};

// The request fields the server may name in an error, and the control that sets each.
const FIELD_CONTROLS = {
  prompt: "prompt", model: "model", temperature: "temperature", top_k: "top-k", top_p: "top-p",
  max_new_chars: "max-new-chars", seed: "seed", stop: "stop", text: "inspect-text", layer: "layer",
  grammar: "constraint", "grammar.value": "constraint", frequency_penalty: "frequency-penalty",
  presence_penalty: "presence-penalty", copies: "copies-min",
};

// -- talking to the server ---------------------------------------------------------------------------

function requestHeaders() {
  const headers = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

function getJson(path) {
  return fetch(path, { headers: requestHeaders() });
}

function postJson(path, body, signal) {
  return fetch(path, { method: "POST", headers: requestHeaders(), body: JSON.stringify(body), signal });
}

// A sentence for people about a 4xx/5xx answer, and the request field at fault if the server named one.
async function explain(response) {
  let error = {};
  try {
    error = (await response.json()).error || {};
  } catch (_) { /* a body that is not ours: the status says enough */ }
  const detail = error.message || response.statusText || "no details";
  const field = error.field || null;
  switch (response.status) {
    case 401:
      return {
        field: "api-key",
        text: $("api-key").value.trim()
          ? `The server refused the API key (${detail}). Check the "API key" field.`
          : `This server needs an API key: enter it in the "API key" field. (${detail})`,
      };
    case 413:
      return { field, text: `The request is larger than this server accepts (${detail}).` };
    case 422: {
      const hint = error.code === "unknown_characters" ? ` Tick "Skip characters the model does not know" to leave them out.` : "";
      return { field, text: `The server refused a value: ${detail}.${hint}` };
    }
    case 429: {
      const retry = response.headers.get("Retry-After");
      const why = error.code === "queue_full" ? ": its generation queue is full" : "";
      return { field, text: `The server is busy${why}. Try again ${retry ? `in ${retry} s` : "in a moment"}.` };
    }
    case 503:
      return { field, text: `The server is not ready or is shutting down (${detail}).` };
    default:
      return { field, text: `The server answered ${response.status}: ${detail}.` };
  }
}

function showError(where, problem) {
  $(where).textContent = problem ? problem.text : "";
  const control = problem && problem.field && $(FIELD_CONTROLS[problem.field] || problem.field);
  if (control) control.setAttribute("aria-invalid", "true");
}

function clearErrors(where, form) {
  showError(where, null);
  for (const control of $(form).querySelectorAll("[aria-invalid]")) control.removeAttribute("aria-invalid");
}

// Calls onEvent(name, data) for each Server-Sent Event of a fetch response; keep-alive comments skipped.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) onEvent(name, JSON.parse(data.join("\n")));
    }
  }
}

// -- models and limits -------------------------------------------------------------------------------

// The server reloads its model directory while it runs (docs/SERVICE.md, "Hot reload"): the list is asked
// for again this often while the page is visible, so a model added or removed shows without a page reload.
const MODELS_POLL_MS = 5000;

async function loadModels() {
  let response;
  try {
    response = await getJson("models");
  } catch (error) {
    showModelsProblem({ text: `Could not reach the server: ${error.message}.` });
    return;
  }
  if (!response.ok) {
    showModelsProblem(await explain(response));
    return;
  }
  const listing = await response.json();
  const loaded = listing.models.filter((m) => m.status === "loaded");
  const shown = JSON.stringify([listing.default, loaded.map((m) => [m.name, m.cell, m.layers, m.hidden])]);
  if (shown === page.modelsShown && !page.modelsProblem) return; // unchanged: leave the list (and its focus) be
  page.modelsShown = shown;
  page.models = new Map(loaded.map((m) => [m.name, m]));
  const select = $("model");
  const layer = $("layer").value;
  const chosen = page.models.has(select.value) ? select.value : listing.default;
  select.replaceChildren();
  for (const [name, info] of page.models) {
    const label = `${name}${name === listing.default ? " (default)" : ""}, ${info.cell} ${info.layers}×${info.hidden}`;
    select.append(new Option(label, name, false, name === chosen));
  }
  if (page.modelsProblem) clearErrors("error", "generate-form");
  page.modelsProblem = false;
  fillLayers();
  if ([...$("layer").options].some((o) => o.value === layer)) $("layer").value = layer;
}

function showModelsProblem(problem) {
  page.modelsProblem = true;
  showError("error", { ...problem, text: `Could not list the models. ${problem.text}` });
}

// The largest lengths this server accepts, from its API description (open to all).
async function loadLimits() {
  try {
    const doc = await (await fetch("openapi.json")).json();
    const schemas = doc.components.schemas;
    const maxChars = schemas.GenerateRequest.properties.max_new_chars.maximum;
    if (maxChars) $("max-new-chars").max = String(maxChars);
    page.maxInspectChars = schemas.InspectRequest.properties.text.maxLength || null;
  } catch (_) { /* the server checks the limits anyway */ }
}

function fillLayers() {
  const info = page.models.get($("model").value);
  const select = $("layer");
  select.replaceChildren();
  const layers = info ? info.layers : 1;
  for (let layer = layers - 1; layer >= 0; layer -= 1) {
    const where = layer === layers - 1 ? "top" : layer === 0 ? "lowest" : "";
    select.append(new Option(`${layer + 1} of ${layers}${where ? ` (${where})` : ""}`, String(layer)));
  }
}

// -- generation --------------------------------------------------------------------------------------

// The value of a number field: undefined when empty; a problem naming the field when it is not a number.
function numberField(id, label) {
  const input = $(id);
  if (input.validity.badInput) throw { field: id, text: `${label}: enter a number.` };
  const text = input.value.trim();
  if (text === "") return undefined;
  // Seeds can exceed what a JavaScript number holds exactly: send the digits as typed.
  if (/^\d{16,}$/.test(text) && JSON.rawJSON) return JSON.rawJSON(text);
  return Number(text);
}

function unknownChars() {
  return $("drop-unknown").checked ? "drop" : "error";
}

function stopStrings() {
  return $("stop").value.split("\n").filter((line) => line !== "")
    .map((line) => line.replace(/\\(n|t|\\)/g, (_, c) => ({ n: "\n", t: "\t", "\\": "\\" })[c]));
}

function generateBody() {
  const body = { prompt: $("prompt").value, stream: true, logprobs: $("colour").checked, unknown_chars: unknownChars() };
  if ($("model").value) body.model = $("model").value;
  const numbers = {
    temperature: ["temperature", "Temperature"], top_k: ["top-k", "Top-k"], top_p: ["top-p", "Top-p"],
    max_new_chars: ["max-new-chars", "Maximum characters"],
    frequency_penalty: ["frequency-penalty", "Frequency penalty"],
    presence_penalty: ["presence-penalty", "Presence penalty"],
  };
  if (!$("random-seed").checked) numbers.seed = ["seed", "Seed"];
  for (const [name, [id, label]] of Object.entries(numbers)) {
    const value = numberField(id, label);
    if (value !== undefined) body[name] = value;
  }
  const stop = stopStrings();
  if (stop.length) body.stop = stop;
  if ($("constraint").value) body.grammar = { type: "regex", value: $("constraint").value };
  if ($("copies").checked) body.copies = { min_chars: numberField("copies-min", "Shortest copied span") };
  return body;
}

function setRunning(running) {
  $("generate").disabled = running;
  $("stop-button").disabled = !running;
  $("output").setAttribute("aria-busy", String(running));
}

function resetOutput(prompt) {
  page.tokens = [];
  page.copies = [];
  page.drawn = 0;
  $("prompt-echo").textContent = prompt;
  $("generated").replaceChildren();
  $("count").textContent = "";
  hideCharInfo();
}

async function generate(event) {
  event.preventDefault();
  if (page.controller) return;
  clearErrors("error", "generate-form");
  let body;
  try {
    body = generateBody();
  } catch (problem) {
    showError("error", problem);
    return;
  }
  resetOutput(body.prompt);
  page.withLogprobs = body.logprobs;
  showProbabilities();
  page.controller = new AbortController();
  setRunning(true);
  $("status").textContent = "Generating…";
  try {
    await streamInto(body, page.controller.signal);
  } catch (error) {
    if (error.name === "AbortError") {
      $("status").textContent = `Stopped after ${page.tokens.length} characters.`;
    } else {
      showError("error", { text: `The generation failed: ${error.message}.` });
      $("status").textContent = "Failed.";
    }
  } finally {
    drawPending(); // what arrived since the last frame, before the status says how much there is
    page.controller = null;
    setRunning(false);
  }
}

async function streamInto(body, signal) {
  const response = await postJson("generate", body, signal);
  if (!response.ok) {
    showError("error", await explain(response));
    $("status").textContent = "Not generated: see the message above.";
    return;
  }
  let finished = false;
  await readEvents(response, (name, data) => {
    if (name === "chunk") appendTokens(data);
    else if (name === "done") finished = finish(data);
    else if (name === "error") {
      showError("error", { text: `The generation failed: ${data.error.message}.` });
      finished = true;
    }
  });
  if (!finished) {
    showError("error", { text: "The stream ended early: the server closed the connection." });
    $("status").textContent = `Cut off after ${page.tokens.length} characters.`;
  }
}

function appendTokens(chunk) {
  const tokens = chunk.logprobs || Array.from(chunk.text, (char) => ({ char }));
  for (const token of tokens) page.tokens.push(token);
  // Chunks come up to 100 times a second and each drawing lays out the whole output: draw at most
  // once a frame, so that a long stream never keeps the page too busy to answer the Stop button.
  if (!page.drawScheduled) {
    page.drawScheduled = true;
    requestAnimationFrame(drawPending);
  }
}

function drawPending() {
  page.drawScheduled = false;
  const start = page.drawn;
  const tokens = page.tokens.slice(start);
  if (!tokens.length) return;
  page.drawn = page.tokens.length;
  const box = $("output");
  const following = box.scrollTop + box.clientHeight >= box.scrollHeight - 4; // keep the newest text in view
  const fragment = document.createDocumentFragment();
  if (coloured()) tokens.forEach((token, i) => fragment.append(probabilitySpan(token, start + i)));
  else fragment.append(tokens.map((t) => t.char).join(""));
  $("generated").append(fragment);
  if (following) box.scrollTop = box.scrollHeight;
  $("count").textContent = `${page.tokens.length} characters`;
}

const FINISH = { length: "reached the maximum length", stop: "met a stop string", deadline: "hit the server's time limit" };

function finish(done) {
  drawPending();
  const reason = done.choices.length ? done.choices[0].finish_reason : "length";
  // With a pattern, "stop" may also mean that the match is complete.
  const why = reason === "stop" && $("constraint").value ? "completed the pattern or met a stop string" : FINISH[reason] || reason;
  $("status").textContent = `Done: ${page.tokens.length} characters, ${why}; seed ${done.seed}.`;
  const copies = done.choices.length ? done.choices[0].copies : undefined;
  if (copies) {
    page.copies = copies;
    markCopies();
    const spans = copies.length === 1 ? "1 span" : `${copies.length} spans`;
    $("status").textContent += ` ${spans} copied from the training text${copies.length ? " (marked)" : ""}.`;
  }
  if ($("random-seed").checked) $("seed").value = String(done.seed); // untick "Random seed" to reuse it
  return true;
}

function stopGenerating() {
  if (page.controller) page.controller.abort();
}

// -- probability colours -----------------------------------------------------------------------------

function coloured() {
  return $("colour").checked && page.withLogprobs;
}

// Red for unlikely, through yellow, to green for likely; always light, so dark text stays readable.
function probabilityColour(p) {
  return `hsl(${Math.round(120 * Math.min(1, Math.max(0, p)))}, 75%, 80%)`;
}

function visible(char) {
  return { "\n": "↵", " ": "␣", "\t": "⇥" }[char] || char;
}

function charSpan(char) {
  const span = document.createElement("span");
  span.className = char === "\n" ? "char newline" : "char"; // the stylesheet shows a line break as ↵
  span.tabIndex = -1;
  span.textContent = char;
  return span;
}

function probabilitySpan(token, index) {
  const span = charSpan(token.char);
  span.dataset.index = String(index);
  span.style.backgroundColor = probabilityColour(Math.exp(token.logprob));
  return span;
}

function showProbabilities() {
  $("probability-legend").hidden = !coloured();
  const target = $("generated");
  hideCharInfo();
  if (coloured()) target.replaceChildren(...page.tokens.map(probabilitySpan));
  else target.replaceChildren(page.tokens.map((t) => t.char).join(""));
  page.drawn = page.tokens.length;
  markCopies();
}

// -- copied spans ------------------------------------------------------------------------------------

// Marks the characters of page.copies (spans may overlap): coloured characters get an underline, plain
// text is cut into runs, each copied run a <mark> that says where in the training text it stands.
function markCopies() {
  if (!page.copies.length) return;
  const covering = new Array(page.tokens.length).fill(null); // character index -> the first span covering it
  for (const span of page.copies) {
    for (let i = span.start; i < Math.min(span.end, covering.length); i++) covering[i] ??= span;
  }
  if (coloured()) {
    for (const el of $("generated").querySelectorAll(".char")) {
      if (covering[Number(el.dataset.index)]) el.classList.add("copied");
    }
    return;
  }
  const parts = [];
  for (let i = 0; i < covering.length;) {
    let j = i;
    while (j < covering.length && Boolean(covering[j]) === Boolean(covering[i])) j++;
    const text = page.tokens.slice(i, j).map((t) => t.char).join("");
    if (covering[i]) {
      const mark = document.createElement("mark");
      mark.className = "copied";
      mark.textContent = text;
      mark.title = `copied: stands in the training text from character ${covering[i].offset}`;
      parts.push(mark);
    } else parts.push(text);
    i = j;
  }
  $("generated").replaceChildren(...parts);
}

function toggleColours() {
  if ($("colour").checked && !page.withLogprobs && page.tokens.length) {
    $("status").textContent = "Generate again to see the probabilities: this text was generated without them.";
  }
  showProbabilities();
}

function probabilityInfo(token) {
  const table = document.createElement("table");
  for (const alternative of token.top) {
    const row = table.insertRow();
    if (alternative.char === token.char) row.className = "chosen";
    row.insertCell().textContent = JSON.stringify(alternative.char);
    row.insertCell().textContent = `${(100 * Math.exp(alternative.logprob)).toFixed(1)} %`;
  }
  const head = document.createElement("div");
  head.textContent = `${JSON.stringify(token.char)}: ${(100 * Math.exp(token.logprob)).toFixed(1)} %; the likeliest were`;
  return [head, table];
}

// -- the tooltip shared by both coloured texts --------------------------------------------------------

function showCharInfo(span, content) {
  const box = $("char-info");
  box.replaceChildren(...content);
  box.hidden = false;
  const rect = span.getBoundingClientRect();
  box.style.left = `${window.scrollX + rect.left}px`;
  box.style.top = `${window.scrollY + rect.bottom + 4}px`;
  span.setAttribute("aria-describedby", "char-info");
}

function hideCharInfo() {
  $("char-info").hidden = true;
  for (const span of document.querySelectorAll("[aria-describedby='char-info']")) span.removeAttribute("aria-describedby");
}

function infoFor(span) {
  const index = Number(span.dataset.index);
  if (span.closest("#generated")) return page.tokens[index] && page.tokens[index].top ? probabilityInfo(page.tokens[index]) : null;
  if (span.closest("#inspect-output")) return activationInfo(index);
  if (span.closest("#score-output")) return page.scored[index] ? probabilityInfo(page.scored[index]) : null;
  return null;
}

function onCharEvent(event) {
  const span = event.target.closest && event.target.closest(".char");
  if (!span) return;
  const content = infoFor(span);
  if (content) showCharInfo(span, content);
}

// Arrow keys step through the characters of a coloured text: one tab stop for the whole text.
function stepThroughChars(event) {
  const text = event.currentTarget;
  const spans = text.querySelectorAll(".char");
  if (!spans.length) return;
  const current = document.activeElement.closest(".char");
  let index = current ? Array.prototype.indexOf.call(spans, current) : -1;
  if (event.key === "ArrowRight") index = Math.min(spans.length - 1, index + 1);
  else if (event.key === "ArrowLeft") index = Math.max(0, index - 1);
  else if (event.key === "Home") index = 0;
  else if (event.key === "End") index = spans.length - 1;
  else if (event.key === "Escape") { hideCharInfo(); return; }
  else return;
  event.preventDefault();
  spans[index].focus();
}

// -- look inside -------------------------------------------------------------------------------------

// Blue for negative, white for 0, red for positive; never darker than 66 % lightness (dark text stays readable).
function activationColour(value) {
  const v = Math.max(-1, Math.min(1, value));
  return `hsl(${v >= 0 ? 4 : 212}, 85%, ${Math.round(100 - 34 * Math.abs(v))}%)`;
}

function useGeneratedText() {
  let text = $("prompt-echo").textContent + page.tokens.map((t) => t.char).join("");
  if (page.maxInspectChars && text.length > page.maxInspectChars) {
    text = text.slice(0, page.maxInspectChars);
    $("inspect-status").textContent = `The text was cut to the first ${page.maxInspectChars} characters, this server's limit.`;
  }
  $("inspect-text").value = text;
}

// -- scoring a text ------------------------------------------------------------------------------------

async function score(event) {
  event.preventDefault();
  clearErrors("score-error", "score-form");
  const body = { text: $("score-text").value, top_logprobs: 5, unknown_chars: unknownChars() };
  if ($("model").value) body.model = $("model").value;
  $("score-button").disabled = true;
  $("score-status").textContent = "Scoring the text…";
  try {
    const response = await postJson("score", body);
    if (!response.ok) {
      const problem = await explain(response);
      if (problem.field === "text") problem.field = "score-text";
      showError("score-error", problem);
      $("score-status").textContent = "";
      return;
    }
    showScores(await response.json());
  } catch (error) {
    showError("score-error", { text: `Could not score the text: ${error.message}.` });
    $("score-status").textContent = "";
  } finally {
    $("score-button").disabled = false;
  }
}

function showScores(answer) {
  page.scored = answer.logprobs;
  const count = answer.logprobs.length;
  $("score-summary").textContent = `${answer.model}: ${count} characters, ${answer.nats_per_char.toFixed(3)} nats ` +
    `(${answer.bits_per_char.toFixed(3)} bits) per character; log-probability of the whole text ${answer.total_logprob.toFixed(2)}.`;
  $("score-status").textContent = `Scored ${count} characters.`;
  $("score-output").replaceChildren(...answer.logprobs.map(probabilitySpan));
  $("score-result").hidden = false;
  hideCharInfo();
}

async function inspect(event) {
  event.preventDefault();
  clearErrors("inspect-error", "inspect-form");
  const body = { text: $("inspect-text").value, unknown_chars: unknownChars() };
  if ($("model").value) body.model = $("model").value;
  if ($("layer").value !== "") body.layer = Number($("layer").value);
  $("inspect-button").disabled = true;
  $("inspect-status").textContent = "Reading the text…";
  try {
    const response = await postJson("inspect", body);
    if (!response.ok) {
      showError("inspect-error", await explain(response));
      $("inspect-status").textContent = "";
      return;
    }
    showInspection(await response.json());
  } catch (error) {
    showError("inspect-error", { text: `Could not look inside: ${error.message}.` });
    $("inspect-status").textContent = "";
  } finally {
    $("inspect-button").disabled = false;
  }
}

function showInspection(answer) {
  page.inspection = answer;
  const what = answer.quantity === "tanh(c)" ? "tanh of the cell state c" : "the hidden state h";
  $("inspect-summary").textContent = `${answer.model}: ${answer.cell.toUpperCase()} layer ${answer.layer + 1} of ` +
    `${answer.layers}, ${answer.hidden} cells, each value ${what}, after each of ${answer.chars.length} characters.`;
  $("inspect-status").textContent = `Read ${answer.chars.length} characters.`;
  const cell = $("cell");
  cell.max = String(answer.hidden - 1);
  $("cell-help").textContent = `0 to ${answer.hidden - 1}`;
  const best = answer.features.find((f) => f.cells.length);
  cell.value = String(best ? best.cells[0].cell : Math.min(Number(cell.value) || 0, answer.hidden - 1));
  const text = $("inspect-output");
  text.replaceChildren(...answer.chars.map((char, i) => {
    const span = charSpan(char);
    span.dataset.index = String(i);
    return span;
  }));
  fillFeatures(answer.features);
  $("inspect-result").hidden = false;
  colourByCell();
}

function fillFeatures(features) {
  const body = $("features").tBodies[0];
  body.replaceChildren();
  for (const feature of features) {
    const row = body.insertRow();
    const head = document.createElement("th");
    head.scope = "row";
    head.textContent = feature.description;
    row.append(head);
    const cells = row.insertCell();
    if (!feature.cells.length) cells.textContent = "does not vary in this text";
    for (const { cell, correlation } of feature.cells) {
      const button = document.createElement("button");
      button.type = "button";
      button.dataset.cell = String(cell);
      button.textContent = `cell ${cell} (r = ${correlation.toFixed(2)})`;
      button.addEventListener("click", () => { $("cell").value = String(cell); colourByCell(); });
      cells.append(button);
    }
  }
}

function chosenCell() {
  const answer = page.inspection;
  const cell = Math.trunc(Number($("cell").value));
  return Number.isFinite(cell) && cell >= 0 && cell < answer.hidden ? cell : null;
}

function colourByCell() {
  if (!page.inspection) return;
  const cell = chosenCell();
  $("cell").setAttribute("aria-invalid", String(cell === null));
  if (cell === null) return;
  const rows = page.inspection.activations;
  $("inspect-output").querySelectorAll(".char").forEach((span, i) => {
    span.style.backgroundColor = activationColour(rows[i][cell]);
  });
  for (const button of $("features").querySelectorAll("button")) {
    button.setAttribute("aria-pressed", String(Number(button.dataset.cell) === cell));
  }
  hideCharInfo();
}

function activationInfo(index) {
  const cell = chosenCell();
  if (cell === null || !page.inspection) return null;
  const char = page.inspection.chars[index];
  const value = page.inspection.activations[index][cell];
  const line = document.createElement("div");
  line.textContent = `${JSON.stringify(char)}: cell ${cell} = ${value.toFixed(3)}`;
  return [line];
}

// -- wiring ------------------------------------------------------------------------------------------

function paintLegends() {
  for (const swatch of document.querySelectorAll("[data-probability]")) {
    swatch.style.backgroundColor = probabilityColour(Number(swatch.dataset.probability));
  }
  for (const swatch of document.querySelectorAll("[data-activation]")) {
    swatch.style.backgroundColor = activationColour(Number(swatch.dataset.activation));
  }
}

function start() {
  $("generate-form").addEventListener("submit", generate);
  $("stop-button").addEventListener("click", stopGenerating);
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("generate-form").requestSubmit();
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && page.controller) stopGenerating();
  });
  $("random-seed").addEventListener("change", () => { $("seed").disabled = $("random-seed").checked; });
  $("colour").addEventListener("change", toggleColours);
  $("api-key").addEventListener("change", loadModels);
  $("model").addEventListener("change", fillLayers);
  $("use-output").addEventListener("click", useGeneratedText);
  $("inspect-form").addEventListener("submit", inspect);
  $("score-form").addEventListener("submit", score);
  $("score-use-output").addEventListener("click", () => {
    $("score-text").value = $("prompt-echo").textContent + page.tokens.map((t) => t.char).join("");
  });
  $("cell").addEventListener("input", colourByCell);
  for (const text of [$("output"), $("inspect-output"), $("score-output")]) {
    text.addEventListener("mouseover", onCharEvent);
    text.addEventListener("focusin", onCharEvent);
    text.addEventListener("mouseleave", hideCharInfo);
    text.addEventListener("focusout", hideCharInfo);
    text.addEventListener("keydown", stepThroughChars);
  }
  paintLegends();
  loadLimits();
  loadModels();
  setInterval(() => { if (!document.hidden) loadModels(); }, MODELS_POLL_MS);
}

start();
