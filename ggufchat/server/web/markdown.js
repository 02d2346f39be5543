// A small Markdown renderer for model replies. Safe by construction: the source text is HTML-escaped
// before any markup is added, the only tags produced are the ones written below, and links keep only
// http(s) targets. Covers what chat models write: fenced code, inline code, bold / italic /
// strikethrough, headings, lists (nested), block quotes, rules, tables and links. A fence that is not
// closed yet (a reply still streaming) renders as code up to the end.

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

export function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

const FENCE = /^( {0,3})(`{3,}|~{3,})\s*([\w+#.-]*)[^`]*$/;
const HEADING = /^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$/;
const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
const QUOTE = /^ {0,3}> ?/;
const ITEM = /^([ \t]*)([-*+]|\d{1,9}[.)])[ \t]+(.*)$/;
const TABLE_SEP = /^ {0,3}\|?[ \t]*:?-+:?[ \t]*(\|[ \t]*:?-+:?[ \t]*)*\|?[ \t]*$/;

const blank = (line) => /^\s*$/.test(line);
const indentOf = (line) => line.match(/^[ \t]*/)[0].replace(/\t/g, "    ").length;

function startsBlock(line) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || ITEM.test(line);
}

export function renderMarkdown(source) {
  const lines = source.replace(/\r\n?/g, "\n").replace(/\0/g, "").split("\n");
  return renderLines(lines);
}

function renderLines(lines) {
  const out = [];
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (blank(line)) {
      i++;
      continue;
    }
    const fence = FENCE.exec(line);
    if (fence) {
      i = renderFence(lines, i, fence, out);
      continue;
    }
    const heading = HEADING.exec(line);
    if (heading) {
      const level = heading[1].length;
      out.push(`<h${level}>${inline(heading[2])}</h${level}>`);
      i++;
      continue;
    }
    if (RULE.test(line)) {
      out.push("<hr>");
      i++;
      continue;
    }
    if (QUOTE.test(line)) {
      const inner = [];
      while (i < lines.length && QUOTE.test(lines[i])) inner.push(lines[i++].replace(QUOTE, ""));
      out.push(`<blockquote>${renderLines(inner)}</blockquote>`);
      continue;
    }
    if (ITEM.test(line)) {
      i = renderList(lines, i, out);
      continue;
    }
    if (line.includes("|") && i + 1 < lines.length && TABLE_SEP.test(lines[i + 1]) && lines[i + 1].includes("-")) {
      i = renderTable(lines, i, out);
      continue;
    }
    const paragraph = [line.trim()];
    i++;
    while (i < lines.length && !blank(lines[i]) && !startsBlock(lines[i])) paragraph.push(lines[i++].trim());
    out.push(`<p>${paragraph.map(inline).join("<br>")}</p>`);
  }
  return out.join("\n");
}

function renderFence(lines, i, fence, out) {
  const [, indent, marker, lang] = fence;
  const closing = new RegExp(`^ {0,3}${marker[0] === "`" ? "`" : "~"}{${marker.length},}[ \\t]*$`);
  const body = [];
  i++;
  while (i < lines.length && !closing.test(lines[i])) {
    // Drop the fence's own indentation from its lines (a fence inside a list item, say).
    body.push(lines[i].startsWith(indent) ? lines[i].slice(indent.length) : lines[i].trimStart());
    i++;
  }
  const cls = lang ? ` class="language-${escapeHtml(lang)}"` : "";
  out.push(`<pre><code${cls}>${escapeHtml(body.join("\n"))}</code></pre>`);
  return i + 1; // past the closing fence (or the end)
}

function renderList(lines, i, out) {
  const first = ITEM.exec(lines[i]);
  const base = indentOf(first[1]);
  const ordered = /\d/.test(first[2]);
  const items = [];
  let loose = false;
  while (i < lines.length) {
    const m = ITEM.exec(lines[i]);
    if (!m || indentOf(m[1]) > base + 1 || indentOf(m[1]) < base || /\d/.test(m[2]) !== ordered) break;
    const contentIndent = indentOf(m[1]) + m[2].length + 1;
    const body = [m[3]];
    i++;
    while (i < lines.length) {
      const line = lines[i];
      if (blank(line)) {
        let j = i;
        while (j < lines.length && blank(lines[j])) j++;
        if (j < lines.length && indentOf(lines[j]) > base) {
          // A blank line inside an item (before its nested content) makes the list loose.
          for (; i < j; i++) body.push("");
          loose = true;
          continue;
        }
        if (j < lines.length && ITEM.test(lines[j]) && indentOf(lines[j]) === base) loose = true;
        i = j;
        break;
      }
      if (indentOf(line) > base) {
        body.push(line.replace(/^[ \t]+/, (ws) => " ".repeat(Math.max(0, indentOf(ws) - contentIndent))));
        i++;
        continue;
      }
      if (startsBlock(line)) break;
      body.push(line.trim()); // a lazy continuation line
      i++;
    }
    items.push(body);
  }
  const start = ordered ? parseInt(first[2], 10) : 1;
  const open = ordered ? (start !== 1 ? `<ol start="${start}">` : "<ol>") : "<ul>";
  const html = items.map((body) => {
    let inner = renderLines(body);
    // Tight lists: no <p> around an item's first paragraph.
    if (!loose && inner.startsWith("<p>")) {
      const end = inner.indexOf("</p>");
      inner = inner.slice(3, end) + inner.slice(end + 4);
    }
    return `<li>${inner}</li>`;
  });
  out.push(`${open}${html.join("")}${ordered ? "</ol>" : "</ul>"}`);
  return i;
}

function splitRow(line) {
  let row = line.trim();
  if (row.startsWith("|")) row = row.slice(1);
  if (row.endsWith("|") && !row.endsWith("\\|")) row = row.slice(0, -1);
  return row.split(/(?<!\\)\|/).map((cell) => cell.trim().replace(/\\\|/g, "|"));
}

function renderTable(lines, i, out) {
  const head = splitRow(lines[i]);
  const aligns = splitRow(lines[i + 1]).map((cell) => {
    const left = cell.startsWith(":");
    const right = cell.endsWith(":");
    return left && right ? "center" : right ? "right" : left ? "left" : "";
  });
  const cell = (tag, text, k) => {
    const align = aligns[k] ? ` class="align-${aligns[k]}"` : "";
    return `<${tag}${align}>${inline(text)}</${tag}>`;
  };
  const rows = [];
  i += 2;
  while (i < lines.length && !blank(lines[i]) && lines[i].includes("|")) {
    const cells = splitRow(lines[i++]);
    rows.push(`<tr>${head.map((_, k) => cell("td", cells[k] ?? "", k)).join("")}</tr>`);
  }
  out.push(`<div class="table-wrap"><table><thead><tr>${head.map((h, k) => cell("th", h, k)).join("")}</tr></thead>` +
           `<tbody>${rows.join("")}</tbody></table></div>`);
  return i;
}

// ------------------------------------------------------------------ inline
const CODE_SPAN = /(`+)([\s\S]*?[^`])\1(?!`)/g;
const LINK = /\[([^\]\n]+)\]\((https?:\/\/[^\s()<>]+)\)/g;
const BARE_URL = /\bhttps?:\/\/[^\s<>()]*[^\s<>().,;:!?'"*_~\]]/g;

// Inline markup on one line of raw text. Code spans and links are cut out first and replaced by
// placeholders (\0n\0: the source has no \0), so emphasis never reaches into code or into a URL.
export function inline(text) {
  const held = [];
  const hold = (html) => `\0${held.push(html) - 1}\0`;
  let s = text.replace(CODE_SPAN, (_, ticks, code) => hold(`<code>${escapeHtml(code.trim() || code)}</code>`));
  s = s.replace(LINK, (_, label, url) => hold(link(url, emphasis(escapeHtml(label)))));
  s = s.replace(BARE_URL, (url) => hold(link(url, escapeHtml(url))));
  s = emphasis(escapeHtml(s));
  return s.replace(/\0(\d+)\0/g, (_, n) => held[Number(n)]);
}

function link(url, label) {
  return `<a href="${escapeHtml(url)}" target="_blank" rel="noopener noreferrer">${label}</a>`;
}

function emphasis(s) {
  return s
    .replace(/\*\*(?=\S)([\s\S]*?\S)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^\w])__(?=\S)([\s\S]*?\S)__(?!\w)/g, "$1<strong>$2</strong>")
    .replace(/(^|[^*\w])\*(?=[^\s*])([^*]*?[^\s*])\*(?![*\w])/g, "$1<em>$2</em>")
    .replace(/(^|[^\w])_(?=[^\s_])([^_]*?[^\s_])_(?!\w)/g, "$1<em>$2</em>")
    .replace(/~~(?=\S)([\s\S]*?\S)~~/g, "<del>$1</del>");
}
