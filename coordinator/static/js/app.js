// The dashboard's shell: hash routes to pages, the header's connection state, and the clock of live durations.

import { fill, h, tick } from "./dom.js";
import { connection } from "./live.js";
import { TasksetPage } from "./pages/taskset.js";
import { TasksetsPage } from "./pages/tasksets.js";
import { TrialPage } from "./pages/trial.js";
import { WorkersPage } from "./pages/workers.js";

const PAGES = { tasksets: TasksetsPage, taskset: TasksetPage, trial: TrialPage, workers: WorkersPage };

/** #/tasksets?before=9, #/tasksets/12, #/tasksets/12/files/345, #/tasksets/12/files/345/trials/678,
 *  #/trials/678, #/workers */
export function parseRoute(hash) {
  const [path, query = ""] = hash.replace(/^#/, "").split("?");
  const parts = path.split("/").filter(Boolean);
  const params = new URLSearchParams(query);
  const id = (text) => (/^[1-9][0-9]{0,17}$/.test(text || "") ? Number(text) : null);
  if (parts.length === 0 || (parts.length === 1 && parts[0] === "tasksets")) {
    return { name: "tasksets", before: id(params.get("before")) };
  }
  if (parts[0] === "tasksets" && id(parts[1])) {
    const route = { name: "taskset", id: id(parts[1]), file: null, trial: null };
    if (parts.length === 2) return route;
    if (parts[2] === "files" && id(parts[3])) {
      route.file = id(parts[3]);
      if (parts.length === 4) return route;
      if (parts[4] === "trials" && id(parts[5]) && parts.length === 6) {
        route.trial = id(parts[5]);
        return route;
      }
    }
  }
  if (parts[0] === "trials" && id(parts[1]) && parts.length === 2) return { name: "trial", id: id(parts[1]) };
  if (parts[0] === "workers" && parts.length === 1) return { name: "workers" };
  return { name: "unknown", path };
}

const view = document.getElementById("view");
let page = null;

function navigate() {
  const route = parseRoute(window.location.hash);
  for (const item of document.querySelectorAll("[data-nav]")) {
    const current = item.dataset.nav === (route.name === "workers" ? "workers" : "tasksets");
    item.classList.toggle("current", current);
    if (current) item.setAttribute("aria-current", "page");
    else item.removeAttribute("aria-current");
  }
  if (page && page.matches(route)) {
    page.update(route);
    return;
  }
  if (page) page.unmount();
  page = null;
  window.scrollTo(0, 0);
  const Page = PAGES[route.name];
  if (!Page) {
    fill(view, h("div", { class: "page-head" }, h("h1", {}, "Nothing here")),
      h("div", { class: "notice" }, "This address does not name a page of the dashboard. ",
        h("a", { href: "#/tasksets" }, "See the tasksets"), "."));
    document.title = "testfleet";
    return;
  }
  const root = h("div", { class: "page" });
  fill(view, root);
  page = new Page(root, route);
}

// -- the connection indicator ----------------------------------------------------------

const indicator = document.getElementById("connection");

function showConnection() {
  const { state, retryAt } = connection;
  indicator.dataset.state = state;
  const label = indicator.querySelector(".label");
  const retry = indicator.querySelector("button");
  retry.hidden = state !== "reconnecting";
  switch (state) {
    case "live":
      label.textContent = "Live";
      indicator.title = "Receiving updates from the coordinator";
      break;
    case "connecting":
      label.textContent = "Connecting…";
      break;
    case "reconnecting": {
      const seconds = retryAt ? Math.max(0, Math.ceil((retryAt - Date.now()) / 1000)) : 0;
      label.textContent = seconds > 0 ? `Reconnecting in ${seconds} s` : "Reconnecting…";
      indicator.title = "The connection to the coordinator dropped; the page resyncs when it is back";
      break;
    }
    case "unauthorized":
      label.textContent = "No access";
      indicator.title = "This coordinator needs a viewer token: add ?token=… to the address";
      break;
    default:
      label.textContent = "";
  }
}

indicator.querySelector("button").addEventListener("click", () => connection.retryNow());
connection.addEventListener("change", showConnection);

setInterval(() => {
  tick(view);
  if (connection.state === "reconnecting") showConnection();
}, 1000);

window.addEventListener("hashchange", navigate);
showConnection();
navigate();
