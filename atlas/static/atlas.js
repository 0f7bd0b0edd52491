// Feature Atlas site: sorting and filtering of a layer's tiles (the label filter: the label each tile shows), their pictures loaded as they come
// into view, the channel and image pages' SQL (static/sql.js), copy buttons for SQL. Plain JS, no dependencies, works from file://. Data is read from
// data- attributes and written with textContent only: nothing from the dataset is ever parsed as HTML.
(function () {
  "use strict";

  // How far beyond the viewport a tile's pictures are fetched: about two rows of tiles, so that
  // scrolling shows pictures, not empty boxes, while a layer of thousands of channels fetches only
  // the first screens at load. Fixed here rather than left to the browser's loading="lazy", whose
  // distance varies by browser and connection and which file:// pages do not always honour.
  var LAZY_MARGIN = "600px";

  function setupLazy() {
    var imgs = document.querySelectorAll("img[data-src]");
    if (!imgs.length) return;
    function load(img) {
      img.src = img.getAttribute("data-src");
      img.removeAttribute("data-src");
    }
    if (!("IntersectionObserver" in window)) {  // a very old browser: everything, as before
      Array.prototype.forEach.call(imgs, load);
      return;
    }
    var io = new IntersectionObserver(function (entries) {
      entries.forEach(function (e) {
        if (e.isIntersecting) {
          io.unobserve(e.target);
          load(e.target);
        }
      });
    }, { rootMargin: LAZY_MARGIN + " 0px" });
    // Hidden tiles (filtered out) have no box and never intersect: they load when shown.
    Array.prototype.forEach.call(imgs, function (img) { io.observe(img); });
    document.documentElement.setAttribute("data-lazy-margin", LAZY_MARGIN);
  }

  function num(el, key) {
    var v = el.dataset[key];
    return v === "" || v === undefined ? NaN : parseFloat(v);
  }

  function setupLayer() {
    var box = document.getElementById("tiles");
    if (!box) return;
    var tiles = Array.prototype.slice.call(box.children);
    var KEYS = ["channel", "max", "mean", "std", "fire"];
    tiles.forEach(function (t) {
      // the label the tile shows (the most frequent of its top-k): what the label filter matches
      t._label = t.dataset.label || "";
      // numbers parsed once: a sort of thousands of tiles compares each many times
      t._num = {};
      KEYS.forEach(function (k) { t._num[k] = num(t, k); });
      t._dead = t.dataset.dead === "1";
    });
    var sort = document.getElementById("sort");
    var dead = document.getElementById("dead");
    var minfire = document.getElementById("minfire");
    var label = document.getElementById("label");
    var count = document.getElementById("count");
    document.getElementById("controls").addEventListener("submit", function (e) { e.preventDefault(); });

    var order = "channel";  // the order the tiles are in: the page's own, by channel

    function apply(initial) {
      var key = sort.value, desc = key.charAt(0) === "-";
      if (desc) key = key.slice(1);
      if (sort.value !== order) {
        var sorted = tiles.slice().sort(function (a, b) {
          var x = a._num[key], y = b._num[key];
          if (isNaN(x) && isNaN(y)) return a._num.channel - b._num.channel;
          if (isNaN(x)) return 1;
          if (isNaN(y)) return -1;
          if (x !== y) return desc ? y - x : x - y;
          return a._num.channel - b._num.channel;
        });
        // one DOM move for the whole order (a fragment): thousands of tiles re-lay out once, not per tile
        var frag = document.createDocumentFragment();
        sorted.forEach(function (t) { frag.appendChild(t); });
        box.appendChild(frag);
        order = sort.value;
      }
      var f = parseFloat(minfire.value) / 100 || 0, lab = label.value, want = dead.value, shown = 0;
      tiles.forEach(function (t) {
        var ok = true;
        var isDead = t._dead;
        if (want === "dead" && !isDead) ok = false;
        if (want === "live" && isDead) ok = false;
        if (f > 0 && !(t._num.fire >= f)) ok = false;
        if (lab && t._label !== lab) ok = false;
        if (t.classList.contains("hidden") === ok) t.classList.toggle("hidden", !ok);
        if (ok) shown++;
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

  // A channel's or an image's SQL section: the queries, shipped once in static/sql.js with {L} for the
  // layer's SQL literal and {C} for the page's number, written in from the section's data- attributes (as
  // text: nothing is parsed as HTML), in the same markup a page with its queries inline has.
  function setupSql() {
    var all = window.ATLAS_SQL || {};
    Array.prototype.forEach.call(document.querySelectorAll("section[data-sql]"), function (sec) {
      var l = sec.getAttribute("data-l") || "", c = sec.getAttribute("data-c") || "";
      (all[sec.getAttribute("data-sql")] || []).forEach(function (item) {
        var box = document.createElement("div"), head = document.createElement("div");
        var title = document.createElement("span"), button = document.createElement("button");
        var pre = document.createElement("pre"), code = document.createElement("code");
        box.className = "sql";
        head.className = "sqlhead";
        title.textContent = item.title;
        button.type = "button";
        button.className = "copy";
        button.setAttribute("data-copy", "sql");
        button.textContent = "copy";
        // one pass: a layer's literal holding "{C}" stays as it is
        code.textContent = item.sql.replace(/\{([LC])\}/g, function (_, k) { return k === "L" ? l : c; });
        head.appendChild(title);
        head.appendChild(button);
        pre.appendChild(code);
        box.appendChild(head);
        box.appendChild(pre);
        sec.appendChild(box);
      });
    });
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
  setupLazy();  // after the layer's view is restored from the address: only what it shows is fetched
  setupSql();  // before the copy buttons are wired: its sections get theirs
  setupCopy();
})();
