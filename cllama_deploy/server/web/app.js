// The chat page: multi-turn conversation, streamed over /v1/chat/completions (server-sent events).
(function () {
  "use strict";
  var $ = function (id) { return document.getElementById(id); };
  var history = [];        // [{role, content}] without the system prompt
  var controller = null;   // AbortController of the running request

  var stored = JSON.parse(localStorage.getItem("cllama-chat-settings") || "{}");
  ["apiKey", "system", "temperature", "topP", "topK", "repeatPenalty", "maxTokens", "seed"].forEach(function (id) {
    if (stored[id] !== undefined) $(id).value = stored[id];
  });
  function save() {
    var s = {};
    ["apiKey", "system", "temperature", "topP", "topK", "repeatPenalty", "maxTokens", "seed"].forEach(function (id) { s[id] = $(id).value; });
    localStorage.setItem("cllama-chat-settings", JSON.stringify(s));
    $("temperatureVal").textContent = $("temperature").value;
    $("topPVal").textContent = $("topP").value;
  }
  document.querySelectorAll("aside input, aside textarea").forEach(function (el) { el.addEventListener("input", save); });
  save();

  function headers() {
    var h = { "Content-Type": "application/json" };
    var key = $("apiKey").value.trim();
    if (key) h["Authorization"] = "Bearer " + key;
    return h;
  }

  function status(text) { $("status").textContent = text || ""; }

  function loadModels() {
    fetch("/v1/models", { headers: headers() }).then(function (r) {
      return r.json().then(function (body) { return { ok: r.ok, status: r.status, body: body }; });
    }).then(function (res) {
      if (!res.ok) {
        status(res.status === 401 ? "Enter the server's API key." : (res.body.error && res.body.error.message) || "cannot list models");
        if (res.status === 503) setTimeout(loadModels, 2000);
        return;
      }
      var sel = $("model"), current = sel.value;
      sel.innerHTML = "";
      res.body.data.forEach(function (m) {
        var o = document.createElement("option");
        o.value = m.id; o.textContent = m.id; sel.appendChild(o);
      });
      if (current) sel.value = current;
      status("");
    }).catch(function (e) { status("cannot reach the server: " + e); });
  }
  $("apiKey").addEventListener("change", loadModels);

  function addMessage(role, text) {
    var div = document.createElement("div");
    div.className = "msg " + role;
    var label = document.createElement("div");
    label.className = "role"; label.textContent = role;
    var content = document.createElement("div");
    content.className = "content";
    if (role === "assistant") content.innerHTML = window.renderMarkdown(text);
    else content.textContent = text;
    div.appendChild(label); div.appendChild(content);
    $("messages").appendChild(div);
    $("messages").scrollTop = $("messages").scrollHeight;
    return div;
  }

  function number(id, parse) {
    var v = $(id).value.trim();
    if (v === "") return undefined;
    var n = parse(v);
    return isNaN(n) ? undefined : n;
  }

  function busy(on) {
    $("send").disabled = on; $("stop").disabled = !on;
  }

  async function send(text) {
    history.push({ role: "user", content: text });
    addMessage("user", text);
    var div = addMessage("assistant", "");
    var content = div.querySelector(".content");
    var messages = [];
    var sys = $("system").value.trim();
    if (sys) messages.push({ role: "system", content: sys });
    messages = messages.concat(history);
    var body = {
      model: $("model").value || undefined, messages: messages, stream: true,
      stream_options: { include_usage: true },
      temperature: number("temperature", parseFloat), top_p: number("topP", parseFloat),
      top_k: number("topK", parseInt), repeat_penalty: number("repeatPenalty", parseFloat),
      max_completion_tokens: number("maxTokens", parseInt), seed: number("seed", parseInt)
    };
    controller = new AbortController();
    busy(true); status("");
    var answer = "", finish = null, usage = null, t0 = performance.now();
    try {
      var resp = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal });
      if (!resp.ok) {
        var err = await resp.json().catch(function () { return {}; });
        throw new Error((err.error && err.error.message) || ("HTTP " + resp.status));
      }
      var reader = resp.body.getReader(), decoder = new TextDecoder("utf-8"), buf = "";
      for (;;) {
        var r = await reader.read();
        if (r.done) break;
        buf += decoder.decode(r.value, { stream: true });
        var events = buf.split("\n\n");
        buf = events.pop();
        for (var i = 0; i < events.length; i++) {
          var line = events[i].split("\n").filter(function (l) { return l.indexOf("data:") === 0; }).map(function (l) { return l.slice(5).trim(); }).join("");
          if (!line || line === "[DONE]") continue;
          var ev = JSON.parse(line);
          if (ev.error) throw new Error(ev.error.message);
          if (ev.usage) usage = ev.usage;
          (ev.choices || []).forEach(function (c) {
            if (c.delta && c.delta.content) {
              answer += c.delta.content;
              content.innerHTML = window.renderMarkdown(answer);
              $("messages").scrollTop = $("messages").scrollHeight;
            }
            if (c.finish_reason) finish = c.finish_reason;
          });
        }
      }
      history.push({ role: "assistant", content: answer });
      var meta = document.createElement("div");
      meta.className = "meta";
      var secs = (performance.now() - t0) / 1000;
      meta.textContent = "finish: " + finish + (usage ? " · " + usage.completion_tokens + " tokens · " +
        (usage.completion_tokens / secs).toFixed(1) + " tok/s" : "");
      div.appendChild(meta);
      div.setAttribute("data-finish", finish || "");
    } catch (e) {
      if (e.name === "AbortError") {
        history.push({ role: "assistant", content: answer });
        div.setAttribute("data-finish", "aborted");
      } else {
        div.classList.add("error");
        content.textContent = (answer ? answer + "\n\n" : "") + "Error: " + e.message;
        history.pop();
        div.setAttribute("data-finish", "error");
      }
    } finally {
      busy(false); controller = null;
    }
  }

  $("composer").addEventListener("submit", function (e) {
    e.preventDefault();
    var text = $("prompt").value;
    if (!text.trim() || controller) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", function (e) {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("composer").requestSubmit(); }
  });
  $("stop").addEventListener("click", function () { if (controller) controller.abort(); });
  $("clear").addEventListener("click", function () { history = []; $("messages").innerHTML = ""; });
  loadModels();
})();
