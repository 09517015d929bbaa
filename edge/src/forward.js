// The header work of a forwarded gateway request, done in one call from wasm (`gateway.rs`):
// crossing the boundary once per header name and value cost more than the rest of the request.
//
// `spec` holds the rest, one item per line (a URL, a method, a field name or a field value cannot
// hold a line break): the URL, the method, the prefix of the header names to drop, then each
// signed header's name and value. One string, because each string that crosses from wasm costs
// a decode of its own. `incoming` is the partner's request's Headers: the upstream request's
// Headers are a copy of them, less `authorization`, `host` and every name with the prefix, plus
// the signed ones. Returns the runtime's `fetch` promise, redirects not followed.
export function forwardUpstream(spec, incoming, body) {
  const lines = spec.split("\n");
  if (lines.length < 3 || lines.length % 2 === 0) {
    throw new TypeError("forwardUpstream: a URL, a method, a prefix, then name and value pairs");
  }
  const prefix = lines[2];
  const headers = new Headers(incoming);
  // Collected first: deleting while iterating skips entries. Names come back lower-cased.
  const dropped = [];
  headers.forEach((_value, name) => {
    if (name === "authorization" || name === "host" || name.startsWith(prefix)) {
      dropped.push(name);
    }
  });
  for (const name of dropped) {
    headers.delete(name);
  }
  for (let i = 3; i < lines.length; i += 2) {
    headers.set(lines[i], lines[i + 1]);
  }
  const init = { method: lines[1], headers, redirect: "manual" };
  if (body !== undefined) {
    init.body = body;
  }
  return fetch(lines[0], init);
}
