// The coordinator's read API and POST /rpc, with the viewer token taken from the page's own URL.

const token = new URLSearchParams(window.location.search).get("token");

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }

  get unauthorized() {
    return this.status === 401 || this.status === -32001;
  }

  /** Retrying cannot help: no access, or the thing asked for does not exist. */
  get fatal() {
    return this.unauthorized || this.status === 404 || this.status === -32004;
  }
}

function headers(extra = {}) {
  return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
}

/** GET a JSON view of /api/v1; throws ApiError on a non-2xx answer or a network failure. */
export async function get(path) {
  let response;
  try {
    response = await fetch(`/api/v1${path}`, { headers: headers({ Accept: "application/json" }), cache: "no-store" });
  } catch (error) {
    throw new ApiError(0, "the coordinator cannot be reached");
  }
  let body = null;
  try {
    body = await response.json();
  } catch (error) {
    body = null;
  }
  if (!response.ok) {
    const message = body && typeof body.error === "string" ? body.error : `HTTP ${response.status}`;
    throw new ApiError(response.status, message);
  }
  return body;
}

let rpcIds = 0;

/** One JSON-RPC call over POST /rpc. */
export async function rpc(method, params) {
  let response;
  try {
    response = await fetch("/rpc", {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify({ jsonrpc: "2.0", id: ++rpcIds, method, params }),
      cache: "no-store",
    });
  } catch (error) {
    throw new ApiError(0, "the coordinator cannot be reached");
  }
  const body = await response.json().catch(() => null);
  if (!body) throw new ApiError(response.status, `HTTP ${response.status}`);
  if (body.error) throw new ApiError(body.error.code, body.error.message);
  return body.result;
}

/** The /ws address, carrying the token as ?token= (a browser cannot set headers on a WebSocket). */
export function socketUrl() {
  const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
  const query = token ? `?token=${encodeURIComponent(token)}` : "";
  return `${scheme}//${window.location.host}/ws${query}`;
}

export function hasToken() {
  return token !== null;
}
