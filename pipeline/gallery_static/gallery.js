// The gallery's page script (inlined into gallery/index.html by pipeline/gallery.py).
//
// Reads the asset table from the JSON block #gallery-data and shows one page of cards at a time
// (#page=N&q=TEXT&status=S) or one asset's detail (#asset=ID). Media load lazily: thumbnails with
// loading="lazy" on the current page only, a turntable when its card is hovered or tapped, a 3D
// viewer (shared script in static/) and the asset's model (models/<id>.<kind>.js) when a detail
// opens. Dataset text only ever goes into textContent and attributes: it cannot become markup.
//
// Inside MLflow's artifact view the page runs in a sandboxed blob: iframe where relative URLs
// resolve to nothing: there thumbnails come from each asset's MLflow run (get-artifact), and
// turntables, 3D views and downloads are left to the dataset's own copy of this page.
(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("gallery-data").textContent);
  var ASSETS = DATA.assets;
  var BY_ID = {};
  ASSETS.forEach(function (asset) { BY_ID[asset.id] = asset; });
  var IN_MLFLOW = window.location.protocol === "blob:";
  var MLFLOW_BASE = IN_MLFLOW ? mlflowBase() : null;
  var main = document.getElementById("cards");
  var detail = document.getElementById("detail");
  var text = document.getElementById("filter-text");
  var status = document.getElementById("filter-status");
  var count = document.getElementById("shown-count");
  var state = { page: 0, q: "", status: "", asset: null };
  var cleanups = [];
  var frameHash = ""; // the route inside MLflow's frame, where a blob: URL's fragment cannot change

  function mlflowBase() {
    // The MLflow UI that made this frame: its URL without the #route, else the blob's origin.
    var referrer = (document.referrer || "").split("#")[0];
    if (referrer) { return referrer.replace(/[^/]*$/, ""); }
    return new URL(window.location.href).origin + "/";
  }

  function encodePath(path) { return path.split("/").map(encodeURIComponent).join("/"); }
  function datasetUrl(path) { return DATA.dataset + "/" + encodePath(path); }
  function thumbUrl(asset, role) {
    if (IN_MLFLOW) {
      return role === "preview" && asset.run && asset.status === "succeeded"
        ? MLFLOW_BASE + "get-artifact?path=thumbnail.jpg&run_uuid=" + encodeURIComponent(asset.run) : null;
    }
    return asset.thumbs[role] ? encodePath(asset.thumbs[role]) : null;
  }

  function el(tag, attrs, content) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (key) {
      if (attrs[key] !== null && attrs[key] !== undefined && attrs[key] !== false) { node.setAttribute(key, attrs[key]); }
    });
    (Array.isArray(content) ? content : [content]).forEach(function (child) {
      if (child === null || child === undefined) { return; }
      node.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
    });
    return node;
  }

  function formatValue(value) {
    if (typeof value === "number") { return Number.isInteger(value) ? String(value) : value.toPrecision(4); }
    if (value === null || typeof value === "string" || typeof value === "boolean") { return String(value); }
    return JSON.stringify(value);
  }

  function table(values) {
    var keys = Object.keys(values || {}).sort();
    if (!keys.length) { return null; }
    return el("table", { "class": "metrics" }, keys.map(function (key) {
      return el("tr", {}, [el("th", {}, key), el("td", {}, formatValue(values[key]))]);
    }));
  }

  function badge(value) { return el("span", { "class": "badge " + value }, value); }
  function variantLabel(asset) { return asset.variant === null ? "variant ?" : "variant " + asset.variant; }

  // ------------------------------------------------------------------ state <-> URL hash
  function currentHash() { return IN_MLFLOW ? frameHash : window.location.hash; }

  function go(hash) {
    if (IN_MLFLOW) { frameHash = hash; route(); } else { window.location.hash = hash; }
  }

  function readHash() {
    var params = new URLSearchParams(currentHash().replace(/^#/, ""));
    state.asset = params.get("asset");
    state.page = Math.max(0, parseInt(params.get("page") || "1", 10) - 1) || 0;
    state.q = params.get("q") || "";
    state.status = params.get("status") || "";
  }

  function listHash(page) {
    var params = new URLSearchParams();
    params.set("page", String(page + 1));
    if (state.q) { params.set("q", state.q); }
    if (state.status) { params.set("status", state.status); }
    return "#" + params.toString();
  }

  // ------------------------------------------------------------------ the list
  function filtered() {
    var query = state.q.trim().toLowerCase();
    return ASSETS.filter(function (asset) {
      return (!query || asset.prompt.toLowerCase().indexOf(query) !== -1) && (!state.status || asset.status === state.status);
    });
  }

  function paginate(list) {
    // Prompt groups (consecutive assets of one prompt) stay on one page unless one alone is larger.
    var pages = [], page = [], group = [];
    function flushGroup() {
      if (page.length && page.length + group.length > DATA.pageCards) { pages.push(page); page = []; }
      page = page.concat(group);
      group = [];
    }
    list.forEach(function (asset) {
      if (group.length && group[0].prompt !== asset.prompt) { flushGroup(); }
      group.push(asset);
    });
    if (group.length) { flushGroup(); }
    if (page.length) { pages.push(page); }
    return pages;
  }

  function turntableSlot(asset) {
    var file = asset.files.turntable;
    if (!file || IN_MLFLOW) { return null; }
    var slot = el("figure", { "class": "turntable-slot", tabindex: "0", title: "turntable: hover or tap to play" },
      [el("span", { "class": "play" }, "\u25B6 turntable"), el("figcaption", {}, "turntable")]);
    var media = null;
    function start() {
      if (!media) {
        media = /\.gif$/i.test(file)
          ? el("img", { "class": "turntable", alt: "turntable", src: datasetUrl(file) })
          : el("video", { "class": "turntable", src: datasetUrl(file), muted: "", loop: "", playsinline: "", preload: "none" });
        if (media.tagName === "VIDEO") { media.muted = true; }
        slot.insertBefore(media, slot.firstChild);
        slot.classList.add("playing");
      }
      if (media.tagName === "VIDEO") { media.play().catch(function () {}); }
    }
    function stop() { if (media && media.tagName === "VIDEO") { media.pause(); } }
    slot.addEventListener("mouseenter", start);
    slot.addEventListener("mouseleave", stop);
    slot.addEventListener("click", function () { if (media && media.tagName === "VIDEO" && !media.paused) { stop(); } else { start(); } });
    return slot;
  }

  function verdictLine(asset) {
    return asset.verdict ? el("p", { "class": "verdict " + asset.verdict.kind }, asset.verdict.text) : null;
  }

  function card(asset) {
    var media = [];
    ["reference", "preview"].forEach(function (role) {
      var src = thumbUrl(asset, role);
      if (src) {
        media.push(el("figure", {}, [el("img", { "class": role, alt: role, src: src, loading: "lazy", decoding: "async" }), el("figcaption", {}, role)]));
      }
    });
    var slot = turntableSlot(asset);
    if (slot) { media.push(slot); }
    var missing = asset.status === "succeeded" && !IN_MLFLOW
      ? ["reference", "preview", "turntable"].filter(function (role) { return !asset.files[role]; }) : [];
    if (asset.status === "succeeded" && !IN_MLFLOW && !asset.files.mesh && !asset.files.splats) { missing.push("mesh.glb or splats.ply"); }
    return el("article", {
      "class": "asset status-" + asset.status, id: "asset-" + asset.id,
      "data-asset-id": asset.id, "data-status": asset.status, "data-prompt": asset.prompt,
    }, [
      el("div", { "class": "asset-head" }, [
        el("strong", {}, variantLabel(asset)), " ", badge(asset.status), " ",
        el("a", { "class": "asset-link", href: "#asset=" + encodeURIComponent(asset.id) }, IN_MLFLOW ? "details" : "3D view, downloads"), " ",
        el("code", { "class": "muted" }, asset.id),
      ]),
      verdictLine(asset),
      media.length ? el("div", { "class": "media" }, media) : null,
      missing.length ? el("p", { "class": "missing" }, "missing: " + missing.join(", ")) : null,
      asset.error || asset.status !== "succeeded" ? el("pre", { "class": "error" }, asset.error || "failed without an error message") : null,
      table(asset.metrics),
    ]);
  }

  function pager(nav, pages) {
    nav.replaceChildren();
    if (pages.length <= 1) { return; }
    function link(label, page, disabled) {
      return disabled ? el("span", { "class": "muted" }, label) : el("a", { href: listHash(page), "data-page": String(page + 1) }, label);
    }
    nav.appendChild(link("\u2039 previous", state.page - 1, state.page === 0));
    nav.appendChild(el("span", { "class": "page-of" }, " page " + (state.page + 1) + " of " + pages.length + " "));
    nav.appendChild(link("next \u203A", state.page + 1, state.page >= pages.length - 1));
  }

  function renderList() {
    var list = filtered();
    var pages = paginate(list);
    state.page = Math.min(state.page, Math.max(pages.length - 1, 0));
    var sections = [], current = pages[state.page] || [], group = null;
    current.forEach(function (asset) {
      if (!group || group.prompt !== asset.prompt) {
        group = { prompt: asset.prompt, variants: el("div", { "class": "variants" }) };
        sections.push(el("section", { "class": "prompt-group", "data-prompt": asset.prompt }, [el("h2", { "class": "prompt" }, asset.prompt), group.variants]));
      }
      group.variants.appendChild(card(asset));
    });
    main.replaceChildren.apply(main, sections.length ? sections : [el("p", {}, ASSETS.length ? "No asset matches the filters." : "No assets in the manifest yet.")]);
    count.textContent = list.length + " shown";
    pager(document.getElementById("pager-top"), pages);
    pager(document.getElementById("pager-bottom"), pages);
  }

  // ------------------------------------------------------------------ one asset
  var loadedScripts = {};
  var modelWaiters = {};

  function loadScript(src) {
    if (!loadedScripts[src]) {
      loadedScripts[src] = new Promise(function (resolve, reject) {
        var script = el("script", { src: src });
        script.onload = resolve;
        script.onerror = function () { delete loadedScripts[src]; reject(new Error("cannot load " + src)); };
        document.head.appendChild(script);
      });
    }
    return loadedScripts[src];
  }

  window.galleryModel = function (id, kind, base64) {
    var waiter = modelWaiters[id + "/" + kind];
    if (waiter) { delete modelWaiters[id + "/" + kind]; waiter(base64); }
  };

  function loadModel(id, kind, script) {
    var data = new Promise(function (resolve) { modelWaiters[id + "/" + kind] = resolve; });
    return loadScript(encodePath(script)).then(function () {
      delete loadedScripts[encodePath(script)]; // each model script runs once per open; do not keep it cached
      return data;
    }).then(function (base64) {
      var binary = atob(base64), bytes = new Uint8Array(binary.length);
      for (var i = 0; i < binary.length; i++) { bytes[i] = binary.charCodeAt(i); }
      return bytes;
    });
  }

  function reportModel(stateName, detailText) {
    document.body.dataset.modelState = stateName;
    if (window.parent !== window) {
      window.parent.postMessage({ source: "modedreamer-gallery", state: stateName, detail: String(detailText || "") }, "*");
    }
  }

  function showMesh(box, asset, script) {
    var viewer = el("model-viewer", {
      id: "viewer", alt: "3D model: " + asset.prompt, "camera-controls": "", "touch-action": "pan-y",
      loading: "eager", reveal: "auto", "shadow-intensity": "1", exposure: "1", "interaction-prompt": "none",
    });
    viewer.addEventListener("load", function () { reportModel("loaded", ""); });
    viewer.addEventListener("error", function (event) { reportModel("error", event.detail && event.detail.type); });
    box.replaceChildren(viewer);
    Promise.all([loadScript(DATA.viewers.mesh), loadModel(asset.id, "glb", script)]).then(function (results) {
      var url = URL.createObjectURL(new Blob([results[1]], { type: "model/gltf-binary" }));
      cleanups.push(function () { URL.revokeObjectURL(url); });
      viewer.setAttribute("src", url);
    }).catch(function (error) { reportModel("error", error.message); box.appendChild(el("p", { "class": "missing" }, error.message)); });
  }

  function showSplats(box, asset) {
    var canvas = el("canvas", { id: "splat-viewer", "class": "splat-canvas", width: "900", height: "480" });
    box.replaceChildren(canvas, el("p", { "class": "note" }, "Gaussian splats, drawn in your browser by the project's splat viewer: drag to orbit, wheel to zoom."));
    Promise.all([loadScript(DATA.viewers.splat), loadModel(asset.id, "splat", asset.model.script)]).then(function (results) {
      var viewer = window.SplatViewer.create(canvas, results[1], asset.model.camera);
      cleanups.push(function () { viewer.dispose(); });
      document.body.dataset.splatState = "rendered";
      reportModel("loaded", "splats");
    }).catch(function (error) { reportModel("error", error.message); box.appendChild(el("p", { "class": "missing" }, error.message)); });
  }

  function viewerSection(asset) {
    var model = asset.model;
    if (IN_MLFLOW) {
      return el("p", { "class": "missing" }, "3D view, turntable and downloads: open gallery/index.html in the dataset directory (this copy lives in MLflow, which cannot reach the dataset's files).");
    }
    if (!model) { return el("p", { "class": "missing" }, "No 3D file for this asset."); }
    var box = el("div", { "class": "viewer-box" });
    var views = [];
    if (model.kind === "splat" && model.script) { views.push(["splats", function () { showSplats(box, asset); }]); }
    if (model.kind === "glb" && model.script) { views.push(["mesh", function () { showMesh(box, asset, model.script); }]); }
    if (model.kind === "splat" && model.mesh_script) { views.push(["extracted mesh", function () { showMesh(box, asset, model.mesh_script); }]); }
    var notes = [model.note, model.mesh_note].filter(Boolean).map(function (note) { return el("p", { "class": "missing" }, note); });
    if (!views.length) { return el("div", {}, notes); }
    var tabs = el("div", { "class": "tabs" }, views.map(function (view, index) {
      var button = el("button", { type: "button", "data-view": view[0] }, view[0]);
      button.addEventListener("click", function () { disposeViewers(); view[1](); });
      return index === 0 ? button : [" ", button];
    }).flat());
    views[0][1]();
    return el("div", {}, [views.length > 1 ? tabs : null, box].concat(notes));
  }

  function downloads(asset) {
    if (IN_MLFLOW) { return null; }
    var links = DATA.downloads.filter(function (pair) { return asset.files[pair[0]]; }).map(function (pair) {
      var file = asset.files[pair[0]];
      return el("li", {}, [el("a", { href: datasetUrl(file), download: file.split("/").pop(), "data-role": pair[0] }, pair[1]), " ", el("code", { "class": "muted" }, file)]);
    });
    return links.length ? el("div", {}, [el("h3", {}, "Downloads"), el("ul", { "class": "downloads" }, links)]) : null;
  }

  function fullMedia(asset) {
    if (IN_MLFLOW) {
      var thumb = thumbUrl(asset, "preview");
      return thumb ? el("div", { "class": "media" }, [el("figure", {}, [el("img", { "class": "preview", alt: "preview", src: thumb }), el("figcaption", {}, "preview (from the asset's MLflow run)")])]) : null;
    }
    var parts = ["reference", "preview"].filter(function (role) { return asset.files[role]; }).map(function (role) {
      return el("figure", {}, [el("img", { "class": role, alt: role, src: datasetUrl(asset.files[role]), loading: "lazy" }), el("figcaption", {}, role)]);
    });
    var turntable = asset.files.turntable;
    if (turntable) {
      parts.push(el("figure", {}, [/\.gif$/i.test(turntable)
        ? el("img", { "class": "turntable", alt: "turntable", src: datasetUrl(turntable) })
        : el("video", { "class": "turntable", src: datasetUrl(turntable), controls: "", loop: "", muted: "", playsinline: "", preload: "metadata" }),
        el("figcaption", {}, "turntable")]));
    }
    return parts.length ? el("div", { "class": "media" }, parts) : null;
  }

  function disposeViewers() {
    cleanups.splice(0).forEach(function (cleanup) { try { cleanup(); } catch (error) { /* already gone */ } });
    delete document.body.dataset.modelState;
    delete document.body.dataset.splatState;
  }

  function renderDetail(asset) {
    disposeViewers();
    var details = Object.assign({ asset_id: asset.id, status: asset.status, variant: asset.variant }, asset.details);
    detail.replaceChildren(el("div", { "class": "detail-body" }, [
      el("p", {}, el("a", { href: listHash(state.page), id: "close-detail" }, "\u2190 all assets")),
      el("h1", { "class": "prompt" }, asset.prompt),
      el("p", {}, [variantLabel(asset), " ", badge(asset.status)]),
      verdictLine(asset),
      asset.error ? el("pre", { "class": "error" }, asset.error) : null,
      asset.status === "succeeded" ? viewerSection(asset) : null,
      fullMedia(asset),
      downloads(asset),
      el("h2", {}, "Metrics"), table(asset.metrics) || el("p", { "class": "missing" }, "none"),
      Object.keys(asset.scores || {}).length ? el("h2", {}, "Evaluation scores") : null,
      Object.keys(asset.scores || {}).length ? table(asset.scores) : null,
      el("h2", {}, "Details"), table(details),
    ]));
    detail.classList.remove("hidden");
    document.body.classList.add("detail-open");
  }

  function closeDetail() {
    disposeViewers();
    detail.classList.add("hidden");
    detail.replaceChildren();
    document.body.classList.remove("detail-open");
  }

  // ------------------------------------------------------------------ wiring
  function route() {
    readHash();
    text.value = state.q;
    status.value = state.status;
    var asset = state.asset && BY_ID[state.asset];
    if (asset) { renderDetail(asset); } else { closeDetail(); renderList(); }
  }

  function setFilters() {
    state.q = text.value;
    state.status = status.value;
    state.page = 0;
    var hash = listHash(0);
    if (IN_MLFLOW) { frameHash = hash; } else if (window.location.hash !== hash) { history.replaceState(null, "", hash); }
    renderList();
  }

  if (IN_MLFLOW) {
    var note = document.getElementById("mlflow-note");
    note.textContent = "Viewing inside MLflow: thumbnails come from the assets' runs; turntables, 3D views and downloads open from the dataset's gallery.";
    note.classList.remove("hidden");
  }
  text.addEventListener("input", setFilters);
  status.addEventListener("change", setFilters);
  document.addEventListener("keydown", function (event) {
    if (event.key === "Escape" && state.asset) { go(listHash(state.page)); }
  });
  document.addEventListener("click", function (event) { // in-page links route here (also in MLflow's frame)
    var link = event.target.closest && event.target.closest("a[href^='#']");
    if (link && !event.defaultPrevented && event.button === 0 && !event.metaKey && !event.ctrlKey) {
      event.preventDefault();
      go(link.getAttribute("href"));
    }
  });
  window.addEventListener("hashchange", route);
  route();
})();
