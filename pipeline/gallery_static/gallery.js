// Index page filter (inlined by pipeline/gallery.py). Reads data-* attributes and toggles a class;
// it never writes HTML, so prompt text cannot become markup.
(function () {
  "use strict";
  var text = document.getElementById("filter-text");
  var status = document.getElementById("filter-status");
  var count = document.getElementById("shown-count");
  function apply() {
    var query = text.value.trim().toLowerCase();
    var wanted = status.value;
    var shown = 0;
    document.querySelectorAll("section.prompt-group").forEach(function (group) {
      var visibleInGroup = 0;
      group.querySelectorAll("article.asset").forEach(function (card) {
        var ok = (!query || card.dataset.prompt.toLowerCase().indexOf(query) !== -1) &&
                 (!wanted || card.dataset.status === wanted);
        card.classList.toggle("hidden", !ok);
        if (ok) { visibleInGroup += 1; }
      });
      group.classList.toggle("hidden", visibleInGroup === 0);
      shown += visibleInGroup;
    });
    count.textContent = shown + " shown";
  }
  text.addEventListener("input", apply);
  status.addEventListener("change", apply);
  apply();
})();
