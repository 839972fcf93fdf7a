// Live refresh for the NOC pages: every element with `data-refresh` is replaced with
// the HTML fragment at that URL every `data-refresh-seconds` (on <body>). The pages are
// complete without this script; it only keeps them current. No inline script, so the
// pages run under `script-src 'self'`.
(function () {
  "use strict";

  var seconds = Number(document.body.getAttribute("data-refresh-seconds")) || 0;
  var targets = document.querySelectorAll("[data-refresh]");
  if (!seconds || !targets.length || !window.fetch) {
    return;
  }
  var status = document.getElementById("refresh-status");
  var busy = false;

  function say(text) {
    if (status) {
      status.textContent = text;
    }
  }

  function refresh(element) {
    return fetch(element.getAttribute("data-refresh"), {
      credentials: "same-origin",
      cache: "no-store",
      redirect: "manual",
      headers: { Accept: "text/html" },
    }).then(function (response) {
      if (response.status === 401 || response.type === "opaqueredirect") {
        // The session ended: the full page sends the browser to the login form.
        window.location.reload();
        throw new Error("logged out");
      }
      if (!response.ok) {
        throw new Error("HTTP " + response.status);
      }
      return response.text().then(function (html) {
        // Same-origin, server-rendered and escaped fragment of this very page.
        element.innerHTML = html;
      });
    });
  }

  function tick() {
    if (busy || document.hidden) {
      return;
    }
    busy = true;
    Promise.all(Array.prototype.map.call(targets, refresh))
      .then(function () {
        say("Updated " + new Date().toISOString().slice(11, 19) + " UTC.");
      })
      .catch(function (error) {
        say("Refresh failed (" + error.message + "); retrying.");
      })
      .then(function () {
        busy = false;
      });
  }

  window.setInterval(tick, seconds * 1000);
  document.addEventListener("visibilitychange", function () {
    if (!document.hidden) {
      tick();
    }
  });
})();
