// Dashboard step: reload the page every data-refresh seconds; a form being used or sent stops the reload.
(function () {
  "use strict";
  var seconds = Number(document.body.getAttribute("data-refresh")) || 0;
  if (seconds <= 0) {
    return;
  }
  var timer = window.setTimeout(function () {
    var url = new URL(window.location.href);
    url.searchParams.delete("msg"); // a flash message is shown once
    url.searchParams.delete("err");
    window.location.replace(url.toString());
  }, seconds * 1000);
  function stop() {
    window.clearTimeout(timer);
  }
  document.addEventListener("submit", stop);
  document.addEventListener("focusin", function (event) {
    if (event.target.closest && event.target.closest("form")) {
      stop();
    }
  });
})();
