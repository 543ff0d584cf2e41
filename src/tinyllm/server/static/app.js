// tinyllm's page: stream the custom model and GPT-2 side by side, show the prompt's GPT-2 tokens and,
// on request, each generated token's probability and its top-5 alternatives. Plain ES module, no deps.

const MODELS = ["custom", "gpt2"];
const TOP_LOGPROBS = 5;
const TOKENIZE_DEBOUNCE_MS = 250;
const READY_POLL_MS = 15000;
const READY_POLL_LOADING_MS = 2000;
const KEY_STORAGE = "tinyllm.apiKey";

const $ = (selector, root = document) => root.querySelector(selector);

const els = {
  form: $("#prompt-form"),
  prompt: $("#prompt"),
  generate: $("#generate"),
  stop: $("#stop"),
  showProbs: $("#show-probs"),
  formStatus: $("#form-status"),
  chips: $("#token-chips"),
  tokenCount: $("#token-count"),
  tokenizerName: $("#tokenizer-name"),
  truncate: $("#truncate"),
  apiKey: $("#api-key"),
  rememberKey: $("#remember-key"),
  apiKeyBox: $("#api-key-box"),
  popover: $("#popover"),
};

const panels = Object.fromEntries(
  MODELS.map((model) => {
    const root = $(`#panel-${model}`);
    return [
      model,
      {
        root,
        badge: $('[data-role="badge"]', root),
        notice: $('[data-role="notice"]', root),
        output: $('[data-role="output"]', root),
        stat: (name) => $(`[data-stat="${name}"]`, root),
      },
    ];
  }),
);

let running = null; // {controller} while a generation is in flight

// --- talking to the server -------------------------------------------------------------------------

function headers(json = true) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = els.apiKey.value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

/** The human-readable reason in an error response: OpenAI `{error: {message}}`, FastAPI `{detail}`, or text. */
async function errorMessage(response) {
  const text = await response.text().catch(() => "");
  try {
    const body = JSON.parse(text);
    if (body?.error?.message) return body.error.message;
    if (typeof body?.error === "string") return body.error;
    if (typeof body?.detail === "string") return body.detail;
    if (Array.isArray(body?.detail)) {
      return body.detail.map((d) => `${(d.loc || []).slice(1).join(".") || "request"}: ${d.msg}`).join("; ");
    }
    if (typeof body?.message === "string") return body.message;
  } catch {
    /* not JSON */
  }
  const plain = text.trim();
  // a proxy's HTML error page, or a long body, says less than the status line
  const statusLine = `${response.status} ${response.statusText}`.trim();
  if (!plain || plain.startsWith("<") || plain.length > 300) return statusLine;
  return plain;
}

/** What a failed fetch means to the user: fetch() and a body read fail with a TypeError when the connection does
 * ("Failed to fetch", "network error", "Load failed" depending on the browser). */
function networkMessage(error, { midStream = false } = {}) {
  if (!(error instanceof TypeError)) return `Error: ${error.message}`;
  return midStream
    ? `Lost the connection to the server (${error.message}).`
    : `Cannot reach the server: is it running? (${error.message})`;
}

/** Flag the API-key box; it opens when a key first turns out to be needed, not on every 401 after (it would
 * cover the prompt while the user types: each keystroke's /tokenize answers 401 too). */
function markKeyNeeded(needed) {
  const was = els.apiKeyBox.classList.contains("needed");
  els.apiKeyBox.classList.toggle("needed", needed);
  if (needed && !was) els.apiKeyBox.open = true;
}

/** Yield each `data:` payload of a server-sent-events body, parsed as JSON ("[DONE]" ends it). */
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
      const data = event
        .split(/\r?\n/)
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

// --- model readiness -----------------------------------------------------------------------------

/** {loaded, reason} for one model from /ready, whichever of the usual shapes it uses. */
function readiness(body, model) {
  let entry = body?.models?.[model];
  if (entry === undefined && Array.isArray(body?.models)) {
    entry = body.models.find((m) => m.id === model || m.name === model || m.model === model);
  }
  if (entry === undefined) entry = body?.[model];
  if (entry === undefined) return null;
  if (typeof entry === "boolean") return { loaded: entry, state: entry ? "ready" : "unavailable", reason: null };
  if (typeof entry === "string") return { loaded: entry === "ready", state: entry, reason: null };
  const state = entry.state ?? entry.status ?? (entry.loaded ?? entry.ready ? "ready" : "unavailable");
  const loaded = state === "ready" || state === "loaded";
  return {
    loaded,
    state,
    reason: entry.error ?? entry.reason ?? entry.detail ?? entry.message ?? null,
    parameters: entry.parameters ?? null,
    context: entry.context_length ?? null,
  };
}

const contexts = {}; // model -> its context length in tokens, from /ready

/** 124M, 6.8M, 85K: a parameter count as model cards write it. */
function parameterCount(n) {
  const [value, unit] = n >= 1e9 ? [n / 1e9, "B"] : n >= 1e6 ? [n / 1e6, "M"] : [n / 1e3, "K"];
  return `${value >= 10 ? Math.round(value) : value.toFixed(1)}${unit}`;
}

/** The panel title's hint: where the model comes from, and its size once /ready has said it. */
function setModelFacts(model, state) {
  const hint = $(`#title-${model} .hint`);
  const origin = model === "custom" ? "trained here" : "pretrained";
  hint.textContent = state?.parameters ? `${origin}, ${parameterCount(state.parameters)} parameters` : origin;
  if (state?.context) contexts[model] = state.context;
}

function setBadge(model, text, kind) {
  const { badge } = panels[model];
  badge.textContent = text;
  badge.className = `badge ${kind || ""}`.trim();
}

function setNotice(model, text, { error = false } = {}) {
  const { notice } = panels[model];
  notice.hidden = !text;
  notice.textContent = text || "";
  notice.classList.toggle("error", error);
}

/** Update each panel's badge (and notice) from /ready; true while a model is still loading. */
async function refreshReady() {
  let loading = false;
  let response;
  let body;
  try {
    response = await fetch("/ready", { headers: headers(false) });
    body = response.status === 401 ? null : await response.json();
  } catch {
    for (const model of MODELS) if (!running) setBadge(model, "server unreachable", "bad");
    return false;
  }
  if (response.status === 401) markKeyNeeded(true);
  for (const model of MODELS) {
    if (running) continue; // the stream owns the badge while it runs
    const panel = panels[model];
    const fromReady = (text) => {
      setNotice(model, text);
      panel.notice.dataset.source = "ready";
    };
    const state = body && readiness(body, model);
    if (state) setModelFacts(model, state);
    if (response.status === 401) {
      setBadge(model, "API key needed", "bad");
    } else if (!state) {
      setBadge(model, "unknown", "");
    } else if (state.loaded) {
      setBadge(model, "ready", "ok");
      if (["ready", "auth"].includes(panel.notice.dataset.source)) setNotice(model, "");
    } else if (state.state === "loading") {
      loading = true;
      setBadge(model, "loading…", "busy");
      fromReady("Still loading; this panel updates when the model is ready.");
    } else {
      setBadge(model, "not loaded", "bad");
      fromReady(`Not loaded: ${state.reason || "no reason given"}`);
    }
  }
  return loading;
}

/** Poll /ready: often while a model loads, rarely otherwise, never in a hidden tab. */
let readyTimer = 0;
async function pollReady() {
  clearTimeout(readyTimer);
  const loading = document.visibilityState === "visible" ? await refreshReady() : false;
  readyTimer = setTimeout(pollReady, loading || running ? READY_POLL_LOADING_MS : READY_POLL_MS); // a run skips the badges
}

/** A generation found a model still loading: look again soon rather than at the next slow poll. */
function pollReadySoon() {
  clearTimeout(readyTimer);
  readyTimer = setTimeout(pollReady, READY_POLL_LOADING_MS);
}

// --- the prompt's tokens -------------------------------------------------------------------------

/** A token as the popup shows it: escaped like a JSON string, except a token that holds part of a character,
 * which the server already writes in OpenAI's form ("bytes:\\xe6\\x97"). */
function tokenLabel(token) {
  return token.startsWith("bytes:") ? token : JSON.stringify(token).slice(1, -1);
}

/** Text with whitespace made visible: a faint · for a space, ↵ for a newline, → for a tab. */
function visibleText(text) {
  const fragment = document.createDocumentFragment();
  for (const part of text.split(/([ \n\t])/)) {
    if (!part) continue;
    const symbol = { " ": "·", "\n": "↵", "\t": "→" }[part];
    if (symbol) {
      const ws = document.createElement("span");
      ws.className = "ws";
      ws.textContent = symbol;
      fragment.append(ws);
    } else {
      fragment.append(part);
    }
  }
  return fragment;
}

let tokenizeTimer = 0;
let tokenizeController = null;

function scheduleTokenize() {
  clearTimeout(tokenizeTimer);
  tokenizeTimer = setTimeout(tokenize, TOKENIZE_DEBOUNCE_MS);
}

async function tokenize() {
  tokenizeController?.abort();
  const controller = (tokenizeController = new AbortController());
  const text = els.prompt.value;
  let body;
  try {
    const response = await fetch("/tokenize", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify({ text }),
      signal: controller.signal,
    });
    if (!response.ok) {
      if (response.status === 401) markKeyNeeded(true);
      els.tokenCount.textContent = `Tokenizer unavailable: ${await errorMessage(response)}`;
      els.tokenizerName.textContent = "";
      els.chips.replaceChildren();
      return;
    }
    body = await response.json();
  } catch (error) {
    if (error.name !== "AbortError") els.tokenCount.textContent = `Tokenizer unavailable: ${networkMessage(error)}`;
    return;
  }
  const ids = body.ids || [];
  const tokens = body.tokens || ids.map(String);
  els.tokenizerName.textContent =
    body.tokenizer === "gpt2" ? "GPT-2 BPE" : `${body.model ?? "model"}'s BPE (${body.tokenizer})`;
  const chips = ids.map((id, i) => {
    const li = document.createElement("li");
    li.className = "chip";
    li.title = `token ${i + 1}: id ${id}`;
    const t = document.createElement("span");
    t.className = "chip-text";
    t.append(visibleText(tokens[i] ?? ""));
    const n = document.createElement("span");
    n.className = "chip-id";
    n.textContent = id;
    li.append(t, n);
    return li;
  });
  if (!chips.length) {
    const li = document.createElement("li");
    li.className = "empty";
    li.textContent = "Type a prompt to see how it splits into tokens.";
    chips.push(li);
  }
  els.chips.replaceChildren(...chips);
  const chars = [...text].length;
  let count = `${ids.length} token${ids.length === 1 ? "" : "s"} · ${chars} characters`;
  const context = contexts[body.model];
  if (context && ids.length > context - 1) {
    count +=
      ` · longer than the ${body.model} model's context (${context} tokens, 1 kept to generate):` +
      " tick “Cut long prompts to fit” or shorten it";
  }
  els.tokenCount.textContent = count;
}

// --- generation ----------------------------------------------------------------------------------

const INTEGER_FIELDS = ["max_tokens", "top_k", "seed"];

/** A sampling field's value; a blank field takes the page's default (the seed's default is blank: random). */
function number(id) {
  const input = document.getElementById(id);
  const text = input.value.trim() === "" ? input.defaultValue : input.value;
  if (text.trim() === "" || input.disabled) return undefined;
  const value = Number(text); // "1e2" is 100 (parseInt read 1)
  return Number.isFinite(value) ? value : undefined;
}

/** The first sampling field the server would refuse or misread, with why; else null. The browser gives "" for
 * text it cannot read as a number ("1e", "--1"): that is an error here, not a blank field. */
function badField() {
  for (const input of document.querySelectorAll(".controls input[type=number]")) {
    const label = document.querySelector(`label[for="${input.id}"]`)?.firstChild?.textContent.trim() || input.id;
    if (input.validity.badInput) return { input, message: `${label} is not a number.` };
    const value = number(input.id);
    if (value === undefined) continue;
    if (INTEGER_FIELDS.includes(input.id) && !Number.isSafeInteger(value)) {
      const most = input.max || Number.MAX_SAFE_INTEGER;
      return { input, message: `${label} must be a whole number up to ${most}.` };
    }
    const min = input.min === "" ? -Infinity : Number(input.min);
    const max = input.max === "" ? Infinity : Number(input.max);
    if (value < min || value > max) {
      const range = Number.isFinite(max) ? `between ${input.min} and ${input.max}` : `at least ${input.min}`;
      return { input, message: `${label} must be ${range}.` };
    }
  }
  return null;
}

function requestBody(model) {
  const body = {
    model,
    prompt: els.prompt.value,
    max_tokens: number("max_tokens"),
    temperature: number("temperature"),
    top_p: number("top_p"),
    top_k: number("top_k"),
    min_p: number("min_p"),
    repetition_penalty: number("repetition_penalty"),
    seed: number("seed"),
    truncate_prompt: els.truncate.checked || undefined,
    stream: true,
    stream_options: { include_usage: true },
    logprobs: TOP_LOGPROBS,
  };
  for (const key of Object.keys(body)) if (body[key] === undefined) delete body[key];
  return body;
}

function resetPanel(model) {
  const panel = panels[model];
  const echo = document.createElement("span");
  echo.className = "prompt-echo";
  echo.textContent = els.prompt.value;
  panel.output.replaceChildren(echo);
  setNotice(model, "");
  panel.notice.dataset.source = "";
  for (const name of ["tokens", "rate", "ttft", "finish"]) panel.stat(name).textContent = "–";
}

/** One generated token (or a run of tokens whose text only resolves together) as a span with its logprobs. */
function tokenSpan(text, entries) {
  const span = document.createElement("span");
  span.className = "tok";
  span.textContent = text;
  span.tabIndex = -1;
  span._entries = entries; // [{token, logprob, top: {token: logprob}}]
  const lp = entries.length ? entries[entries.length - 1].logprob : null;
  if (lp != null) span.style.setProperty("--p", Math.exp(lp).toFixed(3));
  return span;
}

/** Stream one model into its panel; resolves when the stream ends, fails, or is aborted. */
async function runModel(model, signal) {
  const panel = panels[model];
  resetPanel(model);
  setBadge(model, "generating…", "busy");
  panel.output.classList.add("streaming");
  panel.output.setAttribute("aria-busy", "true"); // read out once complete, not token by token
  const t0 = performance.now();
  let tFirst = 0;
  let tLast = 0;
  let count = 0;
  let finish = null;
  let usageTokens = null;
  let pending = []; // logprob entries whose text the server is still holding back (partial UTF-8)

  const showStats = () => {
    const n = usageTokens ?? count;
    panel.stat("tokens").textContent = n;
    if (tFirst) panel.stat("ttft").textContent = `${Math.round(tFirst - t0)} ms`;
    let rate = null;
    if (n >= 2 && tLast > tFirst) rate = (n - 1) / ((tLast - tFirst) / 1000);
    else if (n >= 1 && tLast > t0) rate = n / ((tLast - t0) / 1000);
    if (rate != null) panel.stat("rate").textContent = rate.toFixed(1);
  };

  const append = (text, logprobs) => {
    const entries = (logprobs?.tokens || []).map((token, i) => ({
      token,
      logprob: logprobs.token_logprobs?.[i] ?? null,
      top: logprobs.top_logprobs?.[i] ?? null,
    }));
    count += entries.length || (text ? 1 : 0);
    pending.push(...entries);
    if (!text) return;
    const out = panel.output;
    const following = out.scrollHeight - out.scrollTop - out.clientHeight < 40; // keep the newest text in view
    // Usually each token's string is its text. Where they differ (a character split across tokens, text held
    // back for a stop string) the tokens that don't line up share one span.
    let rest = text;
    while (pending.length && pending[0].token && rest.startsWith(pending[0].token)) {
      const entry = pending.shift();
      out.append(tokenSpan(entry.token, [entry]));
      rest = rest.slice(entry.token.length);
    }
    if (rest) {
      out.append(tokenSpan(rest, pending));
      pending = [];
    }
    if (following) out.scrollTop = out.scrollHeight;
  };

  try {
    const response = await fetch("/v1/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(requestBody(model)),
      signal,
    });
    if (!response.ok) {
      const message = await errorMessage(response);
      if (response.status === 401) {
        markKeyNeeded(true);
        setNotice(model, `Unauthorized: ${message}. Enter the server's API key above.`, { error: true });
        panel.notice.dataset.source = "auth"; // cleared once a key makes the model answer again
        finish = "unauthorized";
      } else if (response.status === 503 && /still loading/.test(message)) {
        panel.output.replaceChildren();
        setNotice(model, "Still loading; try again in a few seconds.");
        panel.notice.dataset.source = "ready"; // cleared by the /ready poll once it is loaded
        finish = "loading";
        pollReadySoon();
      } else if (response.status === 503) {
        panel.output.replaceChildren();
        setNotice(model, `Not loaded: ${message}`);
        setBadge(model, "not loaded", "bad");
        finish = "not loaded";
      } else {
        const hint = /allow truncation/.test(message) ? " (tick “Cut long prompts to fit”)" : "";
        setNotice(model, `Error ${response.status}: ${message}${hint}`, { error: true });
        finish = "error";
      }
      return finish;
    }
    markKeyNeeded(false);
    for await (const chunk of sseEvents(response)) {
      if (chunk.error) {
        const message = chunk.error.message || String(chunk.error);
        setNotice(model, `Error: ${message}`, { error: true });
        finish = "error";
        break;
      }
      const choice = chunk.choices?.[0];
      if (chunk.usage?.completion_tokens != null) usageTokens = chunk.usage.completion_tokens;
      if (!choice) continue;
      const now = performance.now();
      if (choice.text || choice.logprobs?.tokens?.length) {
        if (!tFirst) tFirst = now;
        tLast = now;
      }
      append(choice.text || "", choice.logprobs);
      if (choice.finish_reason) finish = choice.finish_reason;
      showStats();
    }
    if (pending.length) {
      // generated but left out of the text: the end-of-text token, or a stop sequence
      const cut = tokenSpan(pending.map((e) => e.token).join(""), pending);
      cut.classList.add("cut");
      cut.title = "generated, but not part of the text (end of text or a stop sequence)";
      panel.output.append(cut);
      pending = [];
    }
    if (!finish) {
      // neither a finish reason nor an error: the connection closed early (a proxy, a restart)
      setNotice(model, "The stream ended before the model finished: the connection closed.", { error: true });
      finish = "interrupted";
    }
  } catch (error) {
    if (error.name === "AbortError") {
      finish = "stopped";
    } else {
      setNotice(model, networkMessage(error, { midStream: Boolean(tFirst) }), { error: true });
      finish = "error";
      if (error instanceof TypeError) pollReadySoon(); // the badges say "server unreachable" soon, not in 15 s
    }
  } finally {
    panel.output.classList.remove("streaming");
    panel.output.removeAttribute("aria-busy");
    showStats();
    panel.stat("finish").textContent = finish ?? "–";
    if (finish === "not loaded") setBadge(model, "not loaded", "bad");
    else if (finish === "loading") setBadge(model, "loading…", "busy");
    else if (["error", "unauthorized", "interrupted"].includes(finish)) setBadge(model, finish, "bad");
    else setBadge(model, finish === "stopped" ? "stopped" : "done", finish === "stopped" ? "" : "ok");
    const first = panel.output.querySelector(".tok");
    if (first) first.tabIndex = els.showProbs.checked ? 0 : -1;
  }
  return finish;
}

function formError(message, field) {
  els.formStatus.textContent = message;
  els.formStatus.classList.add("error");
  field.focus();
}

async function generate() {
  if (running) return;
  if (!els.prompt.value) return formError("Type a prompt first.", els.prompt);
  const bad = badField();
  if (bad) return formError(bad.message, bad.input);
  const controller = new AbortController();
  running = { controller };
  hidePopover();
  const hadFocus = document.activeElement === els.generate; // a keyboard user keeps a focused control
  els.stop.disabled = false;
  if (hadFocus) els.stop.focus();
  els.generate.disabled = true;
  els.formStatus.classList.remove("error");
  els.formStatus.textContent = "Generating…";
  const t0 = performance.now();
  const finishes = await Promise.all(MODELS.map((model) => runModel(model, controller.signal)));
  running = null;
  els.generate.disabled = false;
  const stopHadFocus = document.activeElement === els.stop || document.activeElement === document.body;
  els.stop.disabled = true;
  if (hadFocus && stopHadFocus) els.generate.focus();
  const seconds = ((performance.now() - t0) / 1000).toFixed(1);
  const failed = finishes.every((f) => ["error", "unauthorized", "not loaded", "loading", "interrupted"].includes(f));
  els.formStatus.classList.toggle("error", failed && !controller.signal.aborted);
  els.formStatus.textContent = controller.signal.aborted
    ? `Stopped after ${seconds} s.`
    : failed
      ? "Neither model answered: see the panels."
      : `Done in ${seconds} s.`;
}

function stop() {
  running?.controller.abort();
}

// --- probabilities popover ------------------------------------------------------------------------

let activeToken = null;
let pinned = false;

function percent(logprob) {
  const p = Math.exp(logprob) * 100;
  return p >= 10 ? `${p.toFixed(1)}%` : p >= 0.01 ? `${p.toFixed(2)}%` : "<0.01%";
}

function popoverContent(entries) {
  const fragment = document.createDocumentFragment();
  for (const entry of entries) {
    const head = document.createElement("div");
    head.className = "pop-head";
    const token = document.createElement("span");
    token.className = "pop-token";
    token.append(visibleText(tokenLabel(entry.token)));
    const prob = document.createElement("span");
    prob.className = "pop-prob";
    prob.textContent = entry.logprob == null ? "?" : percent(entry.logprob);
    if (entry.logprob != null) prob.title = `logprob ${entry.logprob.toFixed(3)}`;
    head.append(token, prob);
    fragment.append(head);
    const top = Object.entries(entry.top || {}).sort((a, b) => b[1] - a[1]);
    if (top.length) {
      const list = document.createElement("ol");
      list.className = "pop-list";
      list.setAttribute("aria-label", "Top alternatives");
      for (const [alt, lp] of top) {
        const li = document.createElement("li");
        if (alt === entry.token) li.className = "chosen";
        li.style.setProperty("--w", `${Math.min(100, Math.exp(lp) * 100).toFixed(1)}%`);
        const a = document.createElement("span");
        a.className = "alt";
        a.append(visibleText(tokenLabel(alt)));
        const pct = document.createElement("span");
        pct.className = "pct";
        pct.textContent = percent(lp);
        li.append(a, pct);
        list.append(li);
      }
      fragment.append(list);
    }
  }
  if (entries.length > 1) {
    const note = document.createElement("p");
    note.className = "pop-note";
    note.textContent = `${entries.length} tokens that arrived as one piece of text.`;
    fragment.append(note);
  }
  if (entries.length) {
    const note = document.createElement("p");
    note.className = "pop-note";
    note.textContent = "The model's own probabilities, before temperature, top-k/p and penalties.";
    fragment.append(note);
  } else {
    const note = document.createElement("p");
    note.className = "pop-note";
    note.textContent = "No probabilities for this text.";
    fragment.append(note);
  }
  return fragment;
}

function showPopover(span) {
  if (!els.showProbs.checked || !span?._entries) return;
  activeToken?.classList.remove("active");
  activeToken?.removeAttribute("aria-describedby");
  activeToken = span;
  span.classList.add("active");
  span.setAttribute("aria-describedby", "popover");
  const pop = els.popover;
  pop.replaceChildren(popoverContent(span._entries));
  pop.hidden = false;
  const rect = span.getBoundingClientRect();
  const width = pop.offsetWidth;
  const height = pop.offsetHeight;
  const left = Math.max(8, Math.min(rect.left, document.documentElement.clientWidth - width - 8));
  const below = rect.bottom + 6;
  const top = below + height > window.innerHeight && rect.top - height - 6 > 0 ? rect.top - height - 6 : below;
  pop.style.left = `${left + window.scrollX}px`;
  pop.style.top = `${top + window.scrollY}px`;
}

function hidePopover() {
  els.popover.hidden = true;
  activeToken?.classList.remove("active");
  activeToken?.removeAttribute("aria-describedby");
  activeToken = null;
  pinned = false;
}

const tokenFrom = (event) => event.target.closest?.(".output .tok");

function applyProbsToggle() {
  const on = els.showProbs.checked;
  for (const model of MODELS) {
    const out = panels[model].output;
    out.classList.toggle("probs", on);
    out.querySelectorAll(".tok").forEach((tok, i) => {
      tok.tabIndex = on && i === 0 ? 0 : -1;
    });
  }
  if (!on) hidePopover();
}

/** Arrow keys move between a panel's tokens (one tab stop per panel: a roving tabindex). */
function moveFocus(event) {
  const span = tokenFrom(event);
  if (!span) return;
  const tokens = [...span.parentElement.querySelectorAll(".tok")];
  const i = tokens.indexOf(span);
  const target = {
    ArrowRight: tokens[i + 1],
    ArrowDown: tokens[i + 1],
    ArrowLeft: tokens[i - 1],
    ArrowUp: tokens[i - 1],
    Home: tokens[0],
    End: tokens[tokens.length - 1],
  }[event.key];
  if (!target) return;
  event.preventDefault();
  span.tabIndex = -1;
  target.tabIndex = 0;
  target.focus();
}

// --- wiring --------------------------------------------------------------------------------------

function wire() {
  const saved = localStorage.getItem(KEY_STORAGE);
  if (saved) {
    els.apiKey.value = saved;
    els.rememberKey.checked = true;
  }
  const storeKey = () => {
    if (els.rememberKey.checked && els.apiKey.value.trim()) localStorage.setItem(KEY_STORAGE, els.apiKey.value.trim());
    else localStorage.removeItem(KEY_STORAGE);
  };
  let keyTimer = 0;
  els.apiKey.addEventListener("input", () => {
    storeKey();
    markKeyNeeded(false);
    for (const model of MODELS) {
      // a 401's notice no longer applies to the new key (the next /ready poll sets the badge)
      if (panels[model].notice.dataset.source === "auth") {
        setNotice(model, "");
        panels[model].notice.dataset.source = "";
        panels[model].stat("finish").textContent = "–";
      }
    }
    scheduleTokenize();
    clearTimeout(keyTimer);
    keyTimer = setTimeout(refreshReady, TOKENIZE_DEBOUNCE_MS);
  });
  els.rememberKey.addEventListener("change", storeKey);

  els.form.addEventListener("submit", (event) => {
    event.preventDefault();
    generate();
  });
  els.stop.addEventListener("click", stop);
  els.prompt.addEventListener("input", () => {
    scheduleTokenize();
    if (els.formStatus.classList.contains("error")) {
      els.formStatus.classList.remove("error"); // "Type a prompt first." and the like no longer apply
      els.formStatus.textContent = "";
    }
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      generate();
    } else if (event.key === "Escape") {
      if (!els.popover.hidden) hidePopover();
      else if (els.apiKeyBox.open && els.apiKeyBox.contains(document.activeElement)) {
        els.apiKeyBox.open = false;
        $("summary", els.apiKeyBox).focus();
      } else if (running) stop();
    }
  });

  els.showProbs.addEventListener("change", applyProbsToggle);
  for (const model of MODELS) {
    const out = panels[model].output;
    out.addEventListener("mouseover", (e) => !pinned && tokenFrom(e) && showPopover(tokenFrom(e)));
    out.addEventListener("mouseleave", () => !pinned && hidePopover());
    out.addEventListener("focusin", (e) => tokenFrom(e) && showPopover(tokenFrom(e)));
    out.addEventListener("focusout", (e) => {
      if (!pinned && !e.relatedTarget?.closest?.(".output .tok")) hidePopover();
    });
    out.addEventListener("keydown", moveFocus);
    out.addEventListener("click", (e) => {
      const span = tokenFrom(e);
      if (!span || !els.showProbs.checked) return;
      if (pinned && activeToken === span) return hidePopover();
      showPopover(span);
      pinned = true; // a tap keeps it open until the next tap elsewhere
    });
  }
  document.addEventListener("click", (e) => {
    if (pinned && !tokenFrom(e) && !els.popover.contains(e.target)) hidePopover();
    if (els.apiKeyBox.open && !els.apiKeyBox.contains(e.target)) els.apiKeyBox.open = false; // a dropdown
  });
  window.addEventListener("resize", () => activeToken && showPopover(activeToken));

  applyProbsToggle();
  tokenize();
  pollReady();
}

wire();
