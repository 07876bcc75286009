// castiron dashboard: live deployment progress (server-sent events), live router counters,
// and a reload of running job pages. No framework, no build step.
"use strict";

function cell(text) {
  const td = document.createElement("td");
  td.textContent = text;
  return td;
}

function followDeployment(table) {
  const source = new EventSource(table.dataset.events + "?after=" + (table.dataset.after || "0"));
  const body = table.querySelector("tbody");
  const outcome = document.getElementById("outcome");
  document.body.dataset.live = "connected";
  source.addEventListener("step", (event) => {
    const step = JSON.parse(event.data);
    const row = document.createElement("tr");
    for (const value of [step.seq, step.step, step.state, step.at]) row.appendChild(cell(String(value)));
    body.appendChild(row);
  });
  source.addEventListener("outcome", (event) => {
    const done = JSON.parse(event.data);
    outcome.textContent = done.outcome;
    outcome.className = "o-" + done.outcome;
    document.getElementById("error").textContent = done.error || "";
    document.body.dataset.live = "done";
    source.close();
  });
}

function refreshCounters(table) {
  const body = table.querySelector("tbody");
  const tick = () => {
    fetch(table.dataset.src, { credentials: "same-origin" })
      .then((response) => (response.ok ? response.json() : null))
      .then((data) => {
        if (!data || !data.counters || data.counters.length === 0) return;
        body.replaceChildren(...data.counters.map((c) => {
          const row = document.createElement("tr");
          for (const value of [c.release, c.requests, c.responses_2xx, c.responses_5xx, c.connect_errors, c.p95_ms.toFixed(1)]) {
            row.appendChild(cell(String(value)));
          }
          return row;
        }));
      })
      .catch(() => {});
  };
  setInterval(tick, 3000);
}

document.addEventListener("DOMContentLoaded", () => {
  const steps = document.querySelector("table[data-events]");
  if (steps) followDeployment(steps);
  const counters = document.querySelector("table[data-src]");
  if (counters) refreshCounters(counters);
  const running = document.querySelector("[data-reload]");
  if (running) setTimeout(() => window.location.reload(), Number(running.dataset.reload));
});
