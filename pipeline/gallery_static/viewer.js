// Asset page: record the 3D view's load state on <body> (data-model-state) and tell an embedding
// page (e.g. MLflow's artifact view iframe) through postMessage. Inlined by pipeline/gallery.py.
(function () {
  "use strict";
  var viewer = document.getElementById("viewer");
  if (!viewer) { return; }
  function report(state, detail) {
    document.body.dataset.modelState = state;
    if (window.parent !== window) {
      window.parent.postMessage({ source: "modedreamer-gallery", state: state, detail: String(detail || "") }, "*");
    }
  }
  viewer.addEventListener("load", function () { report("loaded", ""); });
  viewer.addEventListener("error", function (event) {
    var detail = event.detail && event.detail.type ? event.detail.type : "error";
    report("error", detail);
  });
})();
