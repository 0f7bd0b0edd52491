// Feature Atlas site: sorting and filtering of a layer's tiles, copy buttons for SQL.
// Plain JS, no dependencies, works from file://. Data is read from data- attributes
// and written with textContent only: nothing from the dataset is ever parsed as HTML.
(function () {
  "use strict";

  function num(el, key) {
    var v = el.dataset[key];
    return v === "" || v === undefined ? NaN : parseFloat(v);
  }

  function setupLayer() {
    var box = document.getElementById("tiles");
    if (!box) return;
    var tiles = Array.prototype.slice.call(box.children);
    tiles.forEach(function (t) {
      try { t._labels = JSON.parse(t.dataset.labels || "[]"); } catch (e) { t._labels = []; }
    });
    var sort = document.getElementById("sort");
    var dead = document.getElementById("dead");
    var minfire = document.getElementById("minfire");
    var label = document.getElementById("label");
    var count = document.getElementById("count");
    document.getElementById("controls").addEventListener("submit", function (e) { e.preventDefault(); });

    function apply(initial) {
      var key = sort.value, desc = key.charAt(0) === "-";
      if (desc) key = key.slice(1);
      var sorted = tiles.slice().sort(function (a, b) {
        var x = num(a, key), y = num(b, key);
        if (isNaN(x) && isNaN(y)) return num(a, "channel") - num(b, "channel");
        if (isNaN(x)) return 1;
        if (isNaN(y)) return -1;
        if (x !== y) return desc ? y - x : x - y;
        return num(a, "channel") - num(b, "channel");
      });
      var f = parseFloat(minfire.value) / 100 || 0, lab = label.value, want = dead.value, shown = 0;
      sorted.forEach(function (t) {
        var ok = true;
        var isDead = t.dataset.dead === "1";
        if (want === "dead" && !isDead) ok = false;
        if (want === "live" && isDead) ok = false;
        if (f > 0 && !(num(t, "fire") >= f)) ok = false;
        if (lab && t._labels.indexOf(lab) < 0) ok = false;
        t.classList.toggle("hidden", !ok);
        if (ok) shown++;
        box.appendChild(t);
      });
      count.textContent = shown + " of " + tiles.length + " channels";
      if (initial === true) return;
      var state = [sort.value, want, minfire.value, lab].map(encodeURIComponent).join("&");
      try { history.replaceState(null, "", "#" + state); } catch (e) { /* file:// may refuse */ }
    }

    // Restore a view from the address (sort&dead&minfire&label), so a filtered view can be linked.
    if (location.hash.length > 1) {
      var p = location.hash.slice(1).split("&").map(function (s) {
        try { return decodeURIComponent(s); } catch (e) { return ""; }
      });
      function pick(sel, v) {
        for (var i = 0; i < sel.options.length; i++) if (sel.options[i].value === v) { sel.value = v; return; }
      }
      if (p[0]) pick(sort, p[0]);
      if (p[1]) pick(dead, p[1]);
      if (p[2] && !isNaN(parseFloat(p[2]))) minfire.value = p[2];
      if (p[3]) pick(label, p[3]);
    }
    [sort, dead, minfire, label].forEach(function (el) {
      el.addEventListener("change", apply);
      el.addEventListener("input", apply);
    });
    apply(true);
  }

  function setupCopy() {
    var buttons = document.querySelectorAll("button.copy");
    Array.prototype.forEach.call(buttons, function (b) {
      b.addEventListener("click", function () {
        var code = b.closest(".sql").querySelector("code");
        var text = code.textContent;
        function done(ok) {
          b.textContent = ok ? "copied" : "select and copy";
          setTimeout(function () { b.textContent = "copy"; }, 1500);
        }
        function fallback() {
          var r = document.createRange();
          r.selectNodeContents(code);
          var s = window.getSelection();
          s.removeAllRanges();
          s.addRange(r);
          var ok = false;
          try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
          done(ok);
        }
        if (navigator.clipboard && window.isSecureContext) {
          navigator.clipboard.writeText(text).then(function () { done(true); }, fallback);
        } else {
          fallback();
        }
      });
    });
  }

  setupLayer();
  setupCopy();
})();
