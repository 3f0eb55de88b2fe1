// Progressive enhancement only: the form works without it. Moves focus to the error summary and
// groups card digits in fours as the visitor types. Never logs or sends anything.
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  var summary = document.getElementById("error-summary");
  if (summary) { summary.focus(); }
  Array.prototype.forEach.call(document.querySelectorAll('input[data-format="card"]'), function (input) {
    input.addEventListener("input", function () {
      var digits = input.value.replace(/\D/g, "").slice(0, 19);
      var grouped = digits.replace(/(\d{4})(?=\d)/g, "$1 ");
      if (grouped !== input.value) {
        input.value = grouped;
      }
    });
  });
});
