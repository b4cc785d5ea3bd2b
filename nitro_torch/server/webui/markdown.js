// Markdown to DOM, safe by construction: every piece of model text lands in the page through
// document.createTextNode / textContent, never through innerHTML, so `<script>` or `<img onerror>`
// in a model's answer shows as literal text. Links are kept only for http(s) URLs.
//
// Supported: paragraphs (single newlines become line breaks), ATX headings, **bold**, __bold__,
// *italic*, _italic_, ~~strike~~, `inline code`, fenced ``` code blocks (language label and a Copy
// button; an unclosed fence, as while streaming, runs to the end), - / * / + and 1. lists,
// > blockquotes, --- rules, [text](http...) links and bare http(s) URLs.

const FENCE = /^\s{0,3}(`{3,}|~{3,})\s*([\w+#.-]*)/;
const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const RULE = /^\s{0,3}([-*_])(\s*\1){2,}\s*$/;
const BULLET = /^(\s*)[-*+]\s+(.*)$/;
const ORDERED = /^(\s*)(\d{1,9})[.)]\s+(.*)$/;
const QUOTE = /^\s{0,3}>\s?(.*)$/;

const INLINE = new RegExp([
  "(`+)([^`]|[^`][\\s\\S]*?[^`])\\1(?!`)",               // 1,2: code span
  "\\*\\*(?=\\S)([\\s\\S]*?\\S)\\*\\*",                   // 3: bold
  "(?<![\\w])__(?=\\S)([\\s\\S]*?\\S)__(?![\\w])",        // 4: bold
  "~~(?=\\S)([\\s\\S]*?\\S)~~",                           // 5: strike
  "\\*(?=[^\\s*])([\\s\\S]*?[^\\s*])\\*",                 // 6: italic
  "(?<![\\w])_(?=[^\\s_])([\\s\\S]*?[^\\s_])_(?![\\w])",  // 7: italic
  "\\[([^\\]\\n]+)\\]\\(\\s*([^\\s()]+)\\s*\\)",          // 8,9: link
  "(https?:\\/\\/[^\\s<>\"'`]*[^\\s<>\"'`.,;:!?)\\]])",   // 10: bare URL
].join("|"));

/** A safe href for `url`, or null: only absolute http(s) URLs become links. */
export function safeUrl(url) {
  try {
    const parsed = new URL(url);
    return parsed.protocol === "http:" || parsed.protocol === "https:" ? parsed.href : null;
  } catch {
    return null;
  }
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function link(href, label) {
  const anchor = el("a");
  anchor.href = href;
  anchor.target = "_blank";
  anchor.rel = "noopener noreferrer";
  appendInline(anchor, label);
  return anchor;
}

function appendText(parent, text) {
  // Single newlines inside a paragraph become <br>, as chat models expect.
  const lines = text.split("\n");
  lines.forEach((line, i) => {
    if (i > 0) parent.appendChild(el("br"));
    if (line) parent.appendChild(document.createTextNode(line));
  });
}

/** Appends `text` with inline Markdown to `parent`. */
export function appendInline(parent, text) {
  let rest = text;
  while (rest) {
    const match = INLINE.exec(rest);
    if (!match) {
      appendText(parent, rest);
      return;
    }
    appendText(parent, rest.slice(0, match.index));
    parent.appendChild(inlineNode(match));
    rest = rest.slice(match.index + match[0].length);
  }
}

function inlineNode(m) {
  if (m[1] !== undefined) return el("code", "inline-code", m[2].replace(/^ (.*) $/s, "$1"));
  const nested = (tag, inner) => {
    const node = el(tag);
    appendInline(node, inner);
    return node;
  };
  if (m[3] !== undefined) return nested("strong", m[3]);
  if (m[4] !== undefined) return nested("strong", m[4]);
  if (m[5] !== undefined) return nested("del", m[5]);
  if (m[6] !== undefined) return nested("em", m[6]);
  if (m[7] !== undefined) return nested("em", m[7]);
  if (m[8] !== undefined) {
    const href = safeUrl(m[9]);
    return href ? link(href, m[8]) : document.createTextNode(m[0]);
  }
  const href = safeUrl(m[10]);
  return href ? link(href, m[10]) : document.createTextNode(m[10]);
}

async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    await navigator.clipboard.writeText(text);
    return;
  }
  // Plain http on another host is not a secure context: fall back to a hidden textarea.
  const area = el("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.style.position = "fixed";
  area.style.opacity = "0";
  document.body.appendChild(area);
  area.select();
  try {
    document.execCommand("copy");
  } finally {
    area.remove();
  }
}

function codeBlock(language, code) {
  const wrapper = el("div", "code-block");
  const header = el("div", "code-header");
  header.appendChild(el("span", "code-lang", language || "text"));
  const button = el("button", "copy-button", "Copy");
  button.type = "button";
  button.dataset.testid = "copy-code";
  button.addEventListener("click", async () => {
    try {
      await copyText(code);
      button.textContent = "Copied";
    } catch {
      button.textContent = "Copy failed";
    }
    setTimeout(() => { button.textContent = "Copy"; }, 1500);
  });
  header.appendChild(button);
  const pre = el("pre");
  const codeEl = el("code", null, code);
  if (language) codeEl.dataset.language = language;
  pre.appendChild(codeEl);
  wrapper.append(header, pre);
  return wrapper;
}

/** Parses the lines of a list starting at `start`; returns [node, next line index]. */
function parseList(lines, start) {
  const ordered = ORDERED.test(lines[start]);
  const pattern = ordered ? ORDERED : BULLET;
  const list = el(ordered ? "ol" : "ul");
  if (ordered) {
    const first = Number(lines[start].match(ORDERED)[2]);
    if (first !== 1) list.start = first;
  }
  let i = start;
  let item = null;
  while (i < lines.length) {
    const line = lines[i];
    const match = line.match(pattern);
    if (match) {
      item = el("li");
      appendInline(item, ordered ? match[3] : match[2]);
      list.appendChild(item);
    } else if (line.trim() && /^\s+\S/.test(line) && item) {
      item.appendChild(el("br"));
      appendInline(item, line.trim());
    } else {
      break;
    }
    i += 1;
  }
  return [list, i];
}

function startsBlock(line) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || BULLET.test(line)
    || ORDERED.test(line) || QUOTE.test(line);
}

/** One block starting at lines[i]; returns [node or null, next line index]. */
function parseBlock(lines, i) {
  const line = lines[i];
  const fence = line.match(FENCE);
  if (fence) {
    const closing = new RegExp(`^\\s{0,3}${fence[1][0]}{${fence[1].length},}\\s*$`);
    let end = i + 1;
    while (end < lines.length && !closing.test(lines[end])) end += 1;
    return [codeBlock(fence[2], lines.slice(i + 1, end).join("\n")), end + 1];
  }
  const heading = line.match(HEADING);
  if (heading) {
    const node = el(`h${heading[1].length}`);
    appendInline(node, heading[2]);
    return [node, i + 1];
  }
  if (RULE.test(line)) return [el("hr"), i + 1];
  if (BULLET.test(line) || ORDERED.test(line)) return parseList(lines, i);
  if (QUOTE.test(line)) {
    const inner = [];
    let end = i;
    while (end < lines.length && QUOTE.test(lines[end])) inner.push(lines[end++].match(QUOTE)[1]);
    const quote = el("blockquote");
    quote.appendChild(renderMarkdown(inner.join("\n")));
    return [quote, end];
  }
  if (!line.trim()) return [null, i + 1];
  let end = i + 1;
  while (end < lines.length && lines[end].trim() && !startsBlock(lines[end])) end += 1;
  const paragraph = el("p");
  appendInline(paragraph, lines.slice(i, end).join("\n"));
  return [paragraph, end];
}

/** Renders Markdown `text` into a DocumentFragment built only from DOM nodes. */
export function renderMarkdown(text) {
  const fragment = document.createDocumentFragment();
  const lines = String(text ?? "").replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  while (i < lines.length) {
    const [node, next] = parseBlock(lines, i);
    if (node) fragment.appendChild(node);
    i = next;
  }
  return fragment;
}
