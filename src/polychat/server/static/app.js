// polychat web chat. Talks to /api/web (see polychat/server/web.py) and /v1/models; renders model output as
// sanitised Markdown (marked + DOMPurify + highlight.js, served under /vendor: see polychat/server/faces/vendor.py).

const $ = (id) => document.getElementById(id);

const ui = {
  root: document.documentElement,
  sidebar: $("sidebar"),
  scrim: $("scrim"),
  openSidebar: $("open-sidebar"),
  closeSidebar: $("close-sidebar"),
  newChat: $("new-conversation"),
  search: $("search"),
  list: $("conversation-list"),
  emptyList: $("empty-list"),
  language: $("language"),
  theme: $("theme"),
  title: $("title"),
  model: $("model"),
  instructionsButton: $("instructions-button"),
  instructionsDialog: $("instructions-dialog"),
  instructionsForm: $("instructions-form"),
  systemPrompt: $("system-prompt"),
  presets: $("presets"),
  thread: $("thread"),
  welcome: $("welcome"),
  suggestions: $("suggestions"),
  messages: $("messages"),
  composer: $("composer"),
  input: $("message-input"),
  send: $("send-button"),
  stop: $("stop-button"),
  editing: $("editing"),
  cancelEdit: $("cancel-edit"),
  toast: $("toast"),
  template: $("message-template"),
  keyDialog: $("key-dialog"),
  keyInput: $("key-input"),
  keyWrong: $("key-wrong"),
};

const state = {
  lang: "en",
  strings: {},
  fallback: {},
  models: [],
  aliases: {},
  defaultModel: "",
  conversations: [],
  current: null, // the open conversation, or null for a new one not created yet
  messages: [], // {role, content} of the open conversation
  pendingSystemPrompt: "",
  generating: false,
  controller: null,
  editing: false,
  answers: 0,
  view: 0, // counts re-renders of the thread, so a late answer does not land in another conversation's view
};

// ---- small helpers -------------------------------------------------------------------------------------------------

const storage = {
  get(key, fallback = null) {
    try {
      return localStorage.getItem(`polychat.${key}`) ?? fallback;
    } catch {
      return fallback;
    }
  },
  set(key, value) {
    try {
      localStorage.setItem(`polychat.${key}`, value);
    } catch {
      /* private mode: not remembered */
    }
  },
};

const t = (key) => state.strings[key] ?? state.fallback[key] ?? key;

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function icon(name) {
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "icon");
  const use = document.createElementNS("http://www.w3.org/2000/svg", "use");
  use.setAttribute("href", `#i-${name}`);
  svg.append(use);
  return svg;
}

function button(className, iconName, labelKey, testid) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = className;
  b.append(icon(iconName));
  b.setAttribute("aria-label", t(labelKey));
  b.title = t(labelKey);
  b.dataset.i18nAriaLabel = labelKey;
  b.dataset.i18nTitle = labelKey;
  if (testid) b.dataset.testid = testid;
  return b;
}

let toastTimer = 0;
function toast(text) {
  ui.toast.textContent = text;
  ui.toast.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => (ui.toast.hidden = true), 1800);
}

class ApiError extends Error {
  constructor(status, message, code) {
    super(message || `HTTP ${status}`);
    this.status = status;
    this.code = code || "";
  }
}

// With API keys configured on the server, every call carries the key the user gave (kept in localStorage).
function withKey(headers) {
  const key = storage.get("apiKey");
  return key ? { ...headers, Authorization: `Bearer ${key}` } : headers;
}

// A 401 means the server wants a key (or another one): ask for it; saving it reloads the page with it.
function askForKey() {
  if (ui.keyDialog.open) return;
  ui.keyWrong.hidden = !storage.get("apiKey");
  ui.keyInput.value = "";
  ui.keyDialog.showModal();
  ui.keyInput.focus();
}

async function errorFrom(response) {
  const problem = await response.json().catch(() => ({}));
  const error = problem.error && typeof problem.error === "object" ? problem.error : problem;
  if (response.status === 401) askForKey();
  return new ApiError(response.status, error.message, error.code);
}

async function api(method, path, body) {
  let response;
  try {
    response = await fetch(path, {
      method,
      headers: withKey(body === undefined ? {} : { "Content-Type": "application/json" }),
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (error) {
    throw new ApiError(0, error.message, "network");
  }
  if (!response.ok) throw await errorFrom(response);
  return response.status === 204 ? null : response.json();
}

// ---- language and theme --------------------------------------------------------------------------------------------

async function loadStrings(lang) {
  const response = await fetch(`/static/i18n/${lang}.json`);
  if (!response.ok) throw new Error(`no strings for ${lang}`);
  return response.json();
}

async function setLanguage(lang, remember = true) {
  if (!["en", "ru"].includes(lang)) lang = "en";
  try {
    state.strings = lang === "en" && Object.keys(state.fallback).length ? state.fallback : await loadStrings(lang);
  } catch {
    lang = "en";
    state.strings = state.fallback;
  }
  state.lang = lang;
  ui.root.lang = lang;
  ui.language.value = lang;
  if (remember) storage.set("lang", lang);
  applyStrings();
}

function applyStrings() {
  for (const el of document.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  for (const el of document.querySelectorAll("[data-i18n-placeholder]")) el.placeholder = t(el.dataset.i18nPlaceholder);
  for (const el of document.querySelectorAll("[data-i18n-title]")) el.title = t(el.dataset.i18nTitle);
  for (const el of document.querySelectorAll("[data-i18n-aria-label]")) {
    el.setAttribute("aria-label", t(el.dataset.i18nAriaLabel));
  }
  updateTitle();
  renderModels();
  renderList();
}

function applyTheme(theme) {
  ui.root.dataset.theme = theme;
}

function currentTheme() {
  return ui.root.dataset.theme || (matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light");
}

// ---- Markdown ------------------------------------------------------------------------------------------------------

let renderer = null; // {marked, purify, hljs} once the libraries have loaded

const PURIFY = {
  FORBID_TAGS: [
    "img", "style", "form", "input", "button", "textarea", "select", "option", "iframe", "frame", "object", "embed",
    "video", "audio", "source", "track", "picture", "svg", "math", "link", "meta", "base", "dialog", "template",
  ],
  FORBID_ATTR: ["style", "srcset", "id", "name", "class", "formaction", "action", "background", "poster"],
  ALLOW_DATA_ATTR: false,
  ALLOW_ARIA_ATTR: false,
};

async function loadRenderer() {
  try {
    const [markedModule, purifyModule, hljsModule] = await Promise.all([
      import("/vendor/marked.js"),
      import("/vendor/purify.js"),
      import("/vendor/highlight.js"),
    ]);
    const purify = purifyModule.default;
    const hljs = hljsModule.default;
    hljs.configure({ ignoreUnescapedHTML: true });
    const marked = new markedModule.Marked({ gfm: true, breaks: true, async: false });
    marked.use({
      renderer: {
        // Raw HTML in model output is shown as text, never parsed: `<img onerror=...>` stays a harmless string.
        html({ text, block }) {
          return block ? `<p>${escapeHtml(text)}</p>` : escapeHtml(text);
        },
        // No images from model output (they would be requests to wherever the model points): a link instead.
        image({ href, text }) {
          const label = escapeHtml(text || t("image"));
          return /^https?:/i.test(href || "") ? `<a href="${escapeHtml(href)}">[${label}]</a>` : `[${label}]`;
        },
      },
    });
    purify.addHook("afterSanitizeAttributes", (node) => {
      if (node.tagName === "A") {
        const href = node.getAttribute("href") || "";
        if (!/^(https?:|mailto:|#)/i.test(href)) node.removeAttribute("href");
        node.setAttribute("target", "_blank");
        node.setAttribute("rel", "noopener noreferrer nofollow");
      }
    });
    renderer = { marked, purify, hljs };
    document.body.dataset.renderer = "markdown";
  } catch (error) {
    console.warn("polychat: Markdown libraries not available, showing plain text", error);
    renderer = null;
    document.body.dataset.renderer = "plain";
  }
}

function renderMarkdown(el, text) {
  if (!renderer) {
    el.classList.add("plain");
    el.textContent = text;
    return;
  }
  // `class` is dropped by the sanitiser: code languages are carried through a private attribute meanwhile.
  const html = renderer.marked.parse(text).replace(/<code class="language-([\w+#.-]{1,40})">/g, '<code title="$1">');
  el.innerHTML = renderer.purify.sanitize(html, PURIFY);
  for (const code of el.querySelectorAll("pre > code")) decorateCode(code);
}

function decorateCode(code) {
  const lang = (code.getAttribute("title") || "").toLowerCase();
  code.removeAttribute("title");
  const pre = code.parentElement;
  const { hljs } = renderer;
  if (lang && hljs.getLanguage(lang)) {
    code.className = `language-${lang}`;
    hljs.highlightElement(code);
  } else if (!lang && code.textContent.length < 4000) {
    const result = hljs.highlightAuto(code.textContent);
    if (result.relevance > 5) {
      code.innerHTML = result.value; // highlight.js escapes the code it wraps in its spans
      code.classList.add("hljs");
    }
  }
  const block = document.createElement("div");
  block.className = "code-block";
  const head = document.createElement("div");
  head.className = "code-head";
  const name = document.createElement("span");
  name.textContent = lang || "text";
  const copy = button("small-button", "copy", "copy_code", "copy-code");
  const label = document.createElement("span");
  label.dataset.i18n = "copy";
  label.textContent = t("copy");
  copy.append(label);
  copy.addEventListener("click", () => copyText(code.textContent, copy));
  head.append(name, copy);
  pre.replaceWith(block);
  block.append(head, pre);
}

// ---- models --------------------------------------------------------------------------------------------------------

async function loadModels() {
  const [models, config] = await Promise.all([api("GET", "/v1/models"), api("GET", "/api/web/config")]);
  const served = models.data.map((m) => m.id);
  state.aliases = config.aliases || {};
  state.models = served;
  state.defaultModel = config.default_model || served[0] || "";
  renderModels();
}

function renderModels() {
  const chosen = ui.model.value || preferredModel();
  ui.model.replaceChildren();
  const own = state.models.filter((m) => !(m in state.aliases));
  const aliases = state.models.filter((m) => m in state.aliases);
  const group = (labelKey, names, describe) => {
    const g = document.createElement("optgroup");
    g.label = t(labelKey);
    for (const name of names) {
      const option = document.createElement("option");
      option.value = name;
      option.textContent = describe ? `${name} → ${state.aliases[name]}` : name;
      g.append(option);
    }
    return g;
  };
  if (own.length) ui.model.append(group("models_group", own, false));
  if (aliases.length) ui.model.append(group("aliases_group", aliases, true));
  const wanted = state.current ? state.current.model : chosen;
  ui.model.value = state.models.includes(wanted) ? wanted : state.defaultModel;
  ui.model.title = ui.model.value;
}

function preferredModel() {
  const remembered = storage.get("model");
  return remembered && state.models.includes(remembered) ? remembered : state.defaultModel;
}

// ---- the conversation list -----------------------------------------------------------------------------------------

async function refreshList() {
  try {
    const query = ui.search.value.trim();
    const found = await api("GET", `/api/web/conversations?search=${encodeURIComponent(query)}`);
    state.conversations = found.conversations;
  } catch (error) {
    console.warn("polychat: could not list conversations", error);
  }
  renderList();
}

function renderList() {
  ui.list.replaceChildren();
  for (const conversation of state.conversations) ui.list.append(listItem(conversation));
  ui.emptyList.hidden = state.conversations.length > 0;
  ui.emptyList.textContent = ui.search.value.trim() ? t("no_matches") : t("no_conversations");
}

function listItem(conversation) {
  const li = document.createElement("li");
  li.className = "conversation";
  li.dataset.testid = "conversation-item";
  li.dataset.id = conversation.id;
  if (state.current && state.current.id === conversation.id) li.classList.add("active");
  const open = document.createElement("button");
  open.type = "button";
  open.className = "open";
  open.textContent = conversation.title || t("untitled");
  open.title = conversation.title || t("untitled");
  open.addEventListener("click", () => openConversation(conversation.id));
  const actions = document.createElement("div");
  actions.className = "row-actions";
  const rename = button("small-button", "edit", "rename", "rename-conversation");
  rename.addEventListener("click", () => startRename(li, conversation));
  const remove = button("small-button", "trash", "delete", "delete-conversation");
  remove.addEventListener("click", () => confirmDelete(remove, conversation));
  actions.append(rename, remove);
  li.append(open, actions);
  return li;
}

function startRename(li, conversation) {
  const input = document.createElement("input");
  input.className = "rename-input";
  input.value = conversation.title;
  input.dataset.testid = "rename-input";
  input.setAttribute("aria-label", t("rename"));
  li.replaceChildren(input);
  input.focus();
  input.select();
  let done = false;
  const finish = async (save) => {
    if (done) return;
    done = true;
    const title = input.value.trim();
    if (save && title && title !== conversation.title) {
      try {
        const changed = await api("PATCH", `/api/web/conversations/${conversation.id}`, { title });
        if (state.current && state.current.id === changed.id) state.current = changed;
      } catch (error) {
        toast(error.message);
      }
    }
    updateTitle();
    await refreshList();
  };
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter") finish(true);
    if (event.key === "Escape") {
      event.stopPropagation();
      finish(false);
    }
  });
  input.addEventListener("blur", () => finish(true));
}

function confirmDelete(remove, conversation) {
  if (!remove.classList.contains("confirm")) {
    remove.classList.add("confirm");
    remove.replaceChildren(document.createTextNode(t("confirm_delete")));
    remove.dataset.testid = "confirm-delete";
    setTimeout(() => renderList(), 4000);
    return;
  }
  deleteConversation(conversation.id);
}

async function deleteConversation(id) {
  try {
    await api("DELETE", `/api/web/conversations/${id}`);
  } catch (error) {
    if (error.status !== 404) return toast(error.message);
  }
  if (state.current && state.current.id === id) newChat();
  toast(t("deleted"));
  await refreshList();
}

// ---- the open conversation -----------------------------------------------------------------------------------------

function updateTitle() {
  const title = state.current ? state.current.title || t("untitled") : t("new_chat");
  ui.title.textContent = title;
  document.title = state.current && state.current.title ? `${state.current.title} · polychat` : "polychat";
  const prompt = state.current ? state.current.system_prompt : state.pendingSystemPrompt;
  ui.instructionsButton.classList.toggle("on", Boolean(prompt && prompt.trim()));
}

function newChat() {
  if (state.generating) stopGeneration();
  state.current = null;
  state.messages = [];
  state.pendingSystemPrompt = "";
  setEditing(false);
  if (location.hash) history.pushState(null, "", location.pathname);
  renderThread();
  renderModels();
  updateTitle();
  renderList();
  closeSidebar();
  ui.input.focus();
}

async function openConversation(id, push = true) {
  if (state.generating) await stopGeneration();
  let found;
  try {
    found = await api("GET", `/api/web/conversations/${encodeURIComponent(id)}`);
  } catch (error) {
    if (error.status === 404) {
      history.replaceState(null, "", location.pathname);
      newChat();
      return;
    }
    toast(error.message);
    return;
  }
  state.current = found.conversation;
  state.messages = found.messages;
  setEditing(false);
  if (push && location.hash !== `#${id}`) history.pushState(null, "", `#${id}`);
  renderThread();
  renderModels();
  updateTitle();
  renderList();
  closeSidebar();
  scrollToEnd(true);
}

function renderThread() {
  state.view += 1;
  ui.messages.replaceChildren();
  for (const message of state.messages) {
    const node = messageNode(message.role, message.content);
    // An answer the server stopped writing (it was stopped or died mid-answer): what was written, and a note.
    if (message.interrupted) addNote(node, t("interrupted"), "interrupted-note");
    ui.messages.append(node);
  }
  updateActions();
}

function addNote(node, text, testid) {
  const note = document.createElement("div");
  note.className = "note";
  note.dataset.testid = testid;
  note.textContent = text;
  node.querySelector(".bubble").append(note);
}

function messageNode(role, content) {
  const node = ui.template.content.firstElementChild.cloneNode(true);
  node.classList.add(role === "user" ? "user" : "assistant");
  node.dataset.testid = role === "user" ? "message-user" : "message-assistant";
  node.dataset.role = role;
  setContent(node, content);
  return node;
}

function setContent(node, content) {
  node.text = content;
  const el = node.querySelector(".content");
  if (node.dataset.role === "user") el.textContent = content;
  else renderMarkdown(el, content);
}

function updateActions() {
  const nodes = [...ui.messages.querySelectorAll(".message[data-role]")];
  const lastUser = nodes.findLast((n) => n.dataset.role === "user" && !n.classList.contains("failed"));
  const lastAssistant = nodes.findLast((n) => n.dataset.role === "assistant");
  for (const node of nodes) {
    const actions = node.querySelector(".actions");
    actions.replaceChildren();
    node.classList.toggle("last", node === lastAssistant && node === nodes.at(-1));
    if (node.classList.contains("failed")) continue;
    const copy = button("small-button", "copy", "copy", "copy-message");
    copy.addEventListener("click", () => copyText(node.text, copy));
    actions.append(copy);
    if (node === lastUser && !state.generating) {
      const edit = button("small-button", "edit", "edit", "edit-message");
      edit.addEventListener("click", () => startEdit(node.text));
      actions.append(edit);
    }
    if (node === lastAssistant && node === nodes.at(-1) && !state.generating) {
      const again = button("small-button", "redo", "regenerate", "regenerate");
      again.addEventListener("click", () => regenerate());
      actions.append(again);
    }
  }
  ui.welcome.hidden = nodes.length > 0 || ui.messages.querySelector(".error-card") !== null;
}

function isNearEnd() {
  const t = ui.thread;
  return t.scrollHeight - t.scrollTop - t.clientHeight < 120;
}

function scrollToEnd(force = false) {
  if (force || isNearEnd()) ui.thread.scrollTop = ui.thread.scrollHeight;
}

async function copyText(text, origin) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    const area = document.createElement("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  toast(t("copied"));
  if (origin) {
    const use = origin.querySelector("use");
    if (use) {
      use.setAttribute("href", "#i-check");
      setTimeout(() => use.setAttribute("href", "#i-copy"), 1500);
    }
  }
}

// ---- errors --------------------------------------------------------------------------------------------------------

const ERROR_KEYS = {
  network: "error_network",
  upstream_unreachable: "error_unreachable",
  all_providers_failed: "error_all_failed",
  rate_limited: "error_rate_limited",
  overloaded: "error_overloaded",
  upstream_timeout: "error_timeout",
  busy: "error_busy",
  not_found: "error_not_found",
};

function errorCard(error, promptKept) {
  const card = document.createElement("div");
  card.className = "error-card";
  card.dataset.testid = "error-message";
  card.setAttribute("role", "alert");
  const title = document.createElement("strong");
  title.textContent = t("error_title");
  const key = ERROR_KEYS[error.code] || (error.status === 429 ? "error_rate_limited" : "error_generic");
  const text = document.createElement("span");
  text.textContent = t(key);
  card.append(title, text);
  if (error.message && error.code !== "network") {
    const detail = document.createElement("span");
    detail.className = "detail";
    detail.textContent = error.message;
    card.append(detail);
  }
  if (promptKept) {
    const kept = document.createElement("span");
    kept.className = "detail";
    kept.textContent = t("prompt_kept");
    card.append(kept);
  }
  return card;
}

function clearTransient() {
  for (const el of ui.messages.querySelectorAll(".error-card, .message.failed")) el.remove();
}

// ---- sending and streaming -----------------------------------------------------------------------------------------

function setBusy(busy) {
  state.generating = busy;
  document.body.dataset.generating = String(busy);
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  updateActions();
}

function setEditing(editing) {
  state.editing = editing;
  ui.editing.hidden = !editing;
}

function startEdit(text) {
  setEditing(true);
  ui.input.value = text;
  autosize();
  ui.input.focus();
  ui.input.setSelectionRange(text.length, text.length);
}

async function ensureConversation() {
  if (state.current) return state.current;
  const model = ui.model.value || state.defaultModel;
  // Titled after the first prompt (the server shortens it), so it has a name even if the answer fails.
  const created = await api("POST", "/api/web/conversations", {
    model,
    title: ui.input.value,
    system_prompt: state.pendingSystemPrompt,
  });
  state.current = created;
  state.messages = [];
  state.pendingSystemPrompt = "";
  history.pushState(null, "", `#${created.id}`);
  updateTitle();
  refreshList();
  return created;
}

async function send() {
  const text = ui.input.value;
  if (!text.trim() || state.generating) return;
  clearTransient();
  let conversation;
  try {
    conversation = await ensureConversation();
  } catch (error) {
    ui.messages.append(errorCard(error, false));
    updateActions();
    return;
  }
  const editing = state.editing;
  setEditing(false);
  ui.input.value = "";
  autosize();
  if (editing) {
    const nodes = [...ui.messages.querySelectorAll(".message[data-role]")];
    const lastUser = nodes.findLastIndex((n) => n.dataset.role === "user");
    if (lastUser >= 0) {
      for (const node of nodes.slice(lastUser)) node.remove();
      state.messages = state.messages.slice(0, lastUser);
    }
  }
  const userNode = messageNode("user", text);
  ui.messages.append(userNode);
  updateActions();
  scrollToEnd(true);
  const url = `/api/web/conversations/${conversation.id}/messages`;
  await stream(url, { content: text, edit: editing }, text, userNode, editing);
}

async function regenerate() {
  if (state.generating || !state.current) return;
  clearTransient();
  const nodes = [...ui.messages.querySelectorAll(".message[data-role]")];
  const lastUser = nodes.findLastIndex((n) => n.dataset.role === "user");
  if (lastUser < 0) return;
  for (const node of nodes.slice(lastUser + 1)) node.remove();
  state.messages = state.messages.slice(0, lastUser + 1);
  await stream(`/api/web/conversations/${state.current.id}/regenerate`, undefined, null, null);
}

async function stream(url, body, prompt, userNode, editing = false) {
  const conversation = state.current;
  const view = state.view;
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  const node = messageNode("assistant", "");
  node.classList.add("streaming");
  ui.messages.append(node);
  updateActions();
  scrollToEnd(true);

  let text = "";
  let began = false;
  let dropped = 0;
  let finish = null;
  let failure = null;
  let frame = 0;
  const paint = () => {
    frame = 0;
    setContent(node, text);
    scrollToEnd();
  };
  const handle = (event) => {
    if (event.type === "start") {
      began = true;
      dropped = event.dropped || 0;
    }
    else if (event.type === "token") {
      text += event.text;
      if (!frame) frame = requestAnimationFrame(paint);
    } else if (event.type === "done") {
      finish = event;
      if (event.began) began = true;
    } else if (event.type === "error") {
      failure = new ApiError(502, event.message, event.code);
    }
  };

  try {
    let response;
    try {
      response = await fetch(url, {
        method: "POST",
        headers: withKey({ "Content-Type": "application/json", Accept: "text/event-stream" }),
        body: body === undefined ? undefined : JSON.stringify(body),
        signal: controller.signal,
      });
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new ApiError(0, error.message, "network");
    }
    if (!response.ok) throw await errorFrom(response);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(line.startsWith("data: ") ? 6 : 5))
          .join("\n");
        if (data) handle(JSON.parse(data));
      }
    }
  } catch (error) {
    if (error.name === "AbortError") finish = finish || { stopped: true, began };
    else failure = error instanceof ApiError ? error : new ApiError(0, error.message, "network");
  } finally {
    if (frame) cancelAnimationFrame(frame);
    state.controller = null;
  }

  node.classList.remove("streaming");
  setBusy(false);
  if (view !== state.view) {
    // The browser moved to another conversation meanwhile: its view is not this answer's.
    await refreshList();
    finished();
    return;
  }
  if (began) {
    if (prompt !== null) state.messages.push({ role: "user", content: prompt });
    if (text) {
      setContent(node, text);
      state.messages.push({ role: "assistant", content: text });
      const note = document.createElement("div");
      note.className = "note";
      const notes = [];
      if (dropped) notes.push(t("context_dropped"));
      if (finish && finish.stopped) notes.push(t("stopped"));
      else if (finish && finish.reason === "length") notes.push(t("length_limit"));
      note.textContent = notes.join(" ");
      if (note.textContent) node.querySelector(".bubble").append(note);
    } else {
      node.remove();
    }
    if (failure) ui.messages.append(errorCard(failure, false));
  } else if (prompt === null || editing) {
    // Nothing was stored, and the view had already dropped messages the server still has: show the server's.
    await openConversation(conversation.id, false);
    if (editing) {
      setEditing(true);
      ui.input.value = prompt;
      autosize();
    }
    if (failure) ui.messages.append(errorCard(failure, prompt !== null));
  } else {
    node.remove();
    // Nothing was stored: the prompt goes back into the input box, so it is not lost.
    if (!ui.input.value) {
      ui.input.value = prompt;
      autosize();
    }
    if (failure) {
      userNode.classList.add("failed");
      ui.messages.append(errorCard(failure, true));
    } else {
      userNode.remove();
    }
  }
  updateActions();
  scrollToEnd();
  const fresh = await api("GET", `/api/web/conversations/${conversation.id}`).catch(() => null);
  if (fresh && view === state.view) {
    state.current = fresh.conversation;
    updateTitle();
  }
  await refreshList();
  if (!matchMedia("(max-width: 800px)").matches) ui.input.focus();
  finished();
}

// How many answers have ended (a hook for tests and scripts: ``body[data-answers]``).
function finished() {
  state.answers += 1;
  document.body.dataset.answers = String(state.answers);
}

async function stopGeneration() {
  if (!state.generating) return;
  const controller = state.controller;
  const conversation = state.current;
  if (conversation) {
    // The server stops the generation and ends the stream itself; the abort is the fallback.
    await api("POST", `/api/web/conversations/${conversation.id}/stop`).catch(() => null);
  }
  setTimeout(() => {
    if (controller && state.controller === controller) controller.abort();
  }, 1500);
}

// ---- instructions --------------------------------------------------------------------------------------------------

function openInstructions() {
  ui.systemPrompt.value = state.current ? state.current.system_prompt : state.pendingSystemPrompt;
  markPreset();
  ui.instructionsDialog.showModal();
  ui.systemPrompt.focus();
}

function markPreset() {
  const value = ui.systemPrompt.value.trim();
  for (const chip of ui.presets.querySelectorAll("[data-preset]")) {
    const preset = chip.dataset.preset;
    const text = preset === "none" ? "" : t(`preset_text_${preset}`);
    chip.classList.toggle("selected", value === text);
  }
}

async function saveInstructions() {
  const prompt = ui.systemPrompt.value.trim();
  if (state.current) {
    try {
      state.current = await api("PATCH", `/api/web/conversations/${state.current.id}`, { system_prompt: prompt });
    } catch (error) {
      toast(error.message);
      return;
    }
  } else {
    state.pendingSystemPrompt = prompt;
  }
  updateTitle();
  toast(t("instructions_saved"));
}

// ---- layout --------------------------------------------------------------------------------------------------------

function openSidebar() {
  ui.sidebar.classList.add("open");
  ui.scrim.hidden = false;
}

function closeSidebar() {
  ui.sidebar.classList.remove("open");
  ui.scrim.hidden = true;
}

function autosize() {
  ui.input.style.height = "auto";
  ui.input.style.height = `${Math.min(ui.input.scrollHeight, 220)}px`;
}

// ---- wiring --------------------------------------------------------------------------------------------------------

function wire() {
  ui.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  ui.input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  ui.input.addEventListener("input", autosize);
  ui.stop.addEventListener("click", () => stopGeneration());
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && state.generating && !ui.instructionsDialog.open) {
      event.preventDefault();
      stopGeneration();
    }
  });
  ui.cancelEdit.addEventListener("click", () => {
    setEditing(false);
    ui.input.value = "";
    autosize();
  });
  ui.newChat.addEventListener("click", () => newChat());
  let searchTimer = 0;
  ui.search.addEventListener("input", () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(refreshList, 200);
  });
  ui.language.addEventListener("change", () => setLanguage(ui.language.value));
  ui.theme.addEventListener("click", () => {
    const next = currentTheme() === "dark" ? "light" : "dark";
    applyTheme(next);
    storage.set("theme", next);
  });
  ui.model.addEventListener("change", async () => {
    const model = ui.model.value;
    ui.model.title = model;
    storage.set("model", model);
    if (state.current) {
      try {
        state.current = await api("PATCH", `/api/web/conversations/${state.current.id}`, { model });
      } catch (error) {
        toast(error.message);
      }
    }
  });
  ui.instructionsButton.addEventListener("click", openInstructions);
  ui.presets.addEventListener("click", (event) => {
    const chip = event.target.closest("[data-preset]");
    if (!chip) return;
    const preset = chip.dataset.preset;
    ui.systemPrompt.value = preset === "none" ? "" : t(`preset_text_${preset}`);
    markPreset();
  });
  ui.systemPrompt.addEventListener("input", markPreset);
  ui.instructionsDialog.addEventListener("close", () => {
    if (ui.instructionsDialog.returnValue === "save") saveInstructions();
  });
  ui.suggestions.addEventListener("click", (event) => {
    const chip = event.target.closest("[data-suggestion]");
    if (!chip) return;
    ui.input.value = chip.textContent;
    send();
  });
  ui.keyDialog.addEventListener("close", () => {
    const key = ui.keyInput.value.trim();
    if (ui.keyDialog.returnValue === "save" && key) {
      storage.set("apiKey", key);
      location.reload();
    }
  });
  ui.keyDialog.addEventListener("cancel", (event) => event.preventDefault()); // nothing works without it
  ui.openSidebar.addEventListener("click", openSidebar);
  ui.closeSidebar.addEventListener("click", closeSidebar);
  ui.scrim.addEventListener("click", closeSidebar);
  window.addEventListener("popstate", () => {
    const id = location.hash.slice(1);
    if (id) openConversation(id, false);
    else newChat();
  });
}

async function main() {
  const theme = storage.get("theme");
  if (theme === "dark" || theme === "light") applyTheme(theme);
  wire();
  const rendering = loadRenderer();
  try {
    state.fallback = await loadStrings("en");
  } catch {
    state.fallback = {};
  }
  const lang = storage.get("lang") || (navigator.language || "en").slice(0, 2);
  await setLanguage(lang, false);
  // A 401 opens the key dialog instead (see askForKey).
  const modelsFailed = (error) => error.status === 401 || toast(error.message);
  await Promise.all([loadModels().catch(modelsFailed), refreshList(), rendering]);
  const id = location.hash.slice(1);
  if (id) await openConversation(id, false);
  else renderThread();
  document.body.dataset.ready = "true";
  ui.input.focus();
}

main();
