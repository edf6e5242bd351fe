// Serves the repository's files for the demo page (ES modules cannot load
// from file://): node examples/chat/serve.mjs [port], then open
// http://127.0.0.1:8000/examples/chat/?gw=ws://127.0.0.1:8080/ws&user=alice
import { createServer } from "node:http";
import { readFile } from "node:fs/promises";
import { extname, join, normalize } from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = fileURLToPath(new URL("../..", import.meta.url));
const TYPES = { ".html": "text/html", ".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css", ".map": "application/json" };

/** Starts the server on `port` (0: any); resolves with it. */
export function serve(port = 8000, host = "127.0.0.1") {
  const server = createServer(async (req, res) => {
    let path = normalize(decodeURIComponent(new URL(req.url, "http://x").pathname));
    if (path.endsWith("/")) path += "index.html";
    const type = TYPES[extname(path)];
    if (!type || path.includes("..") || !/^\/(examples|client-js\/dist)\//.test(path)) {
      res.writeHead(404).end("not found");
      return;
    }
    try {
      const body = await readFile(join(ROOT, path));
      res.writeHead(200, { "content-type": type }).end(body);
    } catch {
      res.writeHead(404).end("not found");
    }
  });
  return new Promise((resolve) => server.listen(port, host, () => resolve(server)));
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const s = await serve(Number(process.argv[2] ?? 8000));
  const { port } = s.address();
  console.log(`demo: http://127.0.0.1:${port}/examples/chat/?gw=ws://127.0.0.1:8080/ws&user=alice`);
}
