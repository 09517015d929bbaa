// The header work of a forwarded gateway request, done in one call from wasm (`gateway.rs`):
// crossing the boundary once per header name and value cost more than the rest of the request.
//
// `incoming` is the partner's request's Headers (immutable, so copied); `authorization`, `host`
// and every header whose name starts with `prefix` are dropped; `names` and `values` are the
// signed identity headers, one per line (a field name or value cannot hold a line break).
// Returns the runtime's `fetch` promise, redirects not followed.
export function forwardUpstream(url, method, incoming, prefix, names, values, body) {
  const headers = new Headers(incoming);
  // Collected first: deleting while iterating skips entries. Names come back lower-cased.
  const dropped = [];
  for (const name of headers.keys()) {
    if (name === "authorization" || name === "host" || name.startsWith(prefix)) {
      dropped.push(name);
    }
  }
  for (const name of dropped) {
    headers.delete(name);
  }
  const setNames = names.split("\n");
  const setValues = values.split("\n");
  if (setNames.length !== setValues.length) {
    throw new TypeError("forwardUpstream: one value per header name");
  }
  for (let i = 0; i < setNames.length; i++) {
    headers.set(setNames[i], setValues[i]);
  }
  const init = { method, headers, redirect: "manual" };
  if (body !== undefined) {
    init.body = body;
  }
  return fetch(url, init);
}
