// A small, safe Markdown renderer for the chat page (no external code).
// Everything is HTML-escaped first; only the constructs below become markup, and links keep
// http(s)/mailto URLs only. Supports fenced code, headings, lists, quotes, tables, rules, emphasis.
(function (global) {
  "use strict";

  function escapeHtml(s) {
    return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
  }

  function inline(text) {
    // text is raw; code spans are cut out first so their content is not formatted
    var out = "";
    var parts = text.split(/(`+[^`]*?`+)/);
    for (var i = 0; i < parts.length; i++) {
      var p = parts[i];
      if (i % 2 === 1 && /^`+/.test(p)) {
        out += "<code>" + escapeHtml(p.replace(/^`+|`+$/g, "")) + "</code>";
        continue;
      }
      var h = escapeHtml(p);
      h = h.replace(/\[([^\]]+)\]\(([^)\s]+)\)/g, function (m, label, url) {
        var raw = url.replace(/&amp;/g, "&");
        if (!/^(https?:|mailto:)/i.test(raw)) return m;
        return '<a href="' + url + '" target="_blank" rel="noopener noreferrer">' + label + "</a>";
      });
      h = h.replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>")
        .replace(/__([^_]+)__/g, "<strong>$1</strong>")
        .replace(/~~([^~]+)~~/g, "<del>$1</del>")
        .replace(/(^|[^*])\*([^*\s][^*]*)\*/g, "$1<em>$2</em>")
        .replace(/(^|[^\w_])_([^_\s][^_]*)_(?!\w)/g, "$1<em>$2</em>");
      out += h;
    }
    return out;
  }

  function isTableSep(line) {
    return /^\s*\|?\s*:?-{2,}:?\s*(\|\s*:?-{2,}:?\s*)*\|?\s*$/.test(line);
  }

  function cells(line) {
    return line.trim().replace(/^\|/, "").replace(/\|$/, "").split("|").map(function (c) {
      return inline(c.trim());
    });
  }

  function render(src) {
    var lines = String(src).replace(/\r\n?/g, "\n").split("\n");
    var html = [];
    var i = 0;
    while (i < lines.length) {
      var line = lines[i];
      var m;
      if ((m = line.match(/^\s*(```+|~~~+)\s*([\w+-]*)\s*$/))) {  // fenced code (may be unfinished)
        var fence = m[1], lang = m[2], code = [];
        i++;
        while (i < lines.length && lines[i].trim().indexOf(fence) !== 0) { code.push(lines[i]); i++; }
        i++;
        html.push("<pre><code" + (lang ? ' class="language-' + escapeHtml(lang) + '"' : "") + ">" +
                  escapeHtml(code.join("\n")) + "</code></pre>");
        continue;
      }
      if (/^\s*$/.test(line)) { i++; continue; }
      if ((m = line.match(/^(#{1,6})\s+(.*)$/))) {
        var n = m[1].length;
        html.push("<h" + n + ">" + inline(m[2]) + "</h" + n + ">");
        i++; continue;
      }
      if (/^\s*([-*_])(\s*\1){2,}\s*$/.test(line)) { html.push("<hr>"); i++; continue; }
      if (/^\s*>/.test(line)) {
        var quote = [];
        while (i < lines.length && /^\s*>/.test(lines[i])) { quote.push(lines[i].replace(/^\s*>\s?/, "")); i++; }
        html.push("<blockquote>" + render(quote.join("\n")) + "</blockquote>");
        continue;
      }
      if (line.indexOf("|") >= 0 && i + 1 < lines.length && isTableSep(lines[i + 1])) {
        var head = cells(line);
        i += 2;
        var rows = [];
        while (i < lines.length && lines[i].indexOf("|") >= 0 && !/^\s*$/.test(lines[i])) { rows.push(cells(lines[i])); i++; }
        html.push("<table><thead><tr>" + head.map(function (c) { return "<th>" + c + "</th>"; }).join("") +
                  "</tr></thead><tbody>" + rows.map(function (r) {
                    return "<tr>" + r.map(function (c) { return "<td>" + c + "</td>"; }).join("") + "</tr>";
                  }).join("") + "</tbody></table>");
        continue;
      }
      if ((m = line.match(/^\s*([-*+]|\d+[.)])\s+/))) {
        var ordered = /\d/.test(m[1]);
        var items = [];
        var re = ordered ? /^\s*\d+[.)]\s+(.*)$/ : /^\s*[-*+]\s+(.*)$/;
        while (i < lines.length) {
          var im = lines[i].match(re);
          if (im) { items.push(im[1]); i++; }
          else if (items.length && /^\s{2,}\S/.test(lines[i])) { items[items.length - 1] += "\n" + lines[i].trim(); i++; }
          else break;
        }
        var tag = ordered ? "ol" : "ul";
        html.push("<" + tag + ">" + items.map(function (it) {
          return "<li>" + inline(it).replace(/\n/g, "<br>") + "</li>";
        }).join("") + "</" + tag + ">");
        continue;
      }
      var para = [];
      while (i < lines.length && !/^\s*$/.test(lines[i]) && !/^(#{1,6})\s/.test(lines[i]) &&
             !/^\s*(```|~~~)/.test(lines[i]) && !/^\s*>/.test(lines[i]) &&
             !(para.length && /^\s*([-*+]|\d+[.)])\s+/.test(lines[i]))) {
        para.push(lines[i]); i++;
      }
      if (!para.length) { para.push(lines[i]); i++; }
      html.push("<p>" + para.map(inline).join("<br>") + "</p>");
    }
    return html.join("\n");
  }

  global.renderMarkdown = render;
  global.escapeHtml = escapeHtml;
})(window);
